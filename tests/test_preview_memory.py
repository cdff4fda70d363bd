"""What each preview variant holds on the device in every preview mode, against what the run's plan counts
(issue 25, review F1), and the reads the full-model variants of one preview share (F7). On the CPU the "device"
is the CPU, so what a streamed model holds is told by its parameters that are not on `meta` (a streamed block
is read onto the device before it runs and sent back to `meta` after), plus what its stream keeps beside them
(the block read ahead, blocks kept between forwards, the LoRA factors)."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image

from emloc.architecture import summarize
from emloc.memory import GiB, MemorySettings, plan_memory
from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.flux.backend import FluxSettings
from pipelines.internvl.backend import VlmSettings
from pipelines.planner.catalogue import load_meta_model
from pipelines.planner.runs import plan_settings
from pipelines.runner import Run, RunSettings, variants
from pipelines.runner.settings import PREVIEW_VARIANTS
from vlm_fixtures import save_tiny_internvl, write_colour_csv

# the parts of a preview estimate that are the previewed model itself (not the pipeline's encoders and VAE)
MODEL_PARTS = ("weights", "weights (one block)", "weights (outside the blocks)", "lora")


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-preview-memory")
    model = save_tiny_flux(root / "tiny-flux-dev", guidance=True)
    write_subject_images(root / "dog", count=3, seed=4)
    flux = FluxSettings(images=str(root / "dog"), prompt="sks dog", resolution=32, max_sequence_length=16,
                        preview_steps=2)
    settings = RunSettings(model=str(model), ratio=0.5, calibration_samples=2, steps=2, lr=1e-2, device="cpu",
                           ram_gb=1000.0)
    run = Run.create(root / "runs" / "flux", "flux", settings, flux)
    run.execute()
    return run


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-preview-memory")
    model = save_tiny_internvl(root / "tiny-internvl")
    write_colour_csv(root / "colours")
    settings = RunSettings(model=str(model), ratio=0.5, calibration_samples=8, steps=2, rank=4, lr=3e-3,
                           device="cpu", ram_gb=1000.0)
    run = Run.create(root / "runs" / "vlm", "vlm", settings,
                     VlmSettings(data=str(root / "colours" / "qa.csv"), max_new_tokens=3, preview_samples=2))
    run.execute()
    return run


def _use_mode(run: Run, mode: str, spare_gib: float = 0.0) -> None:
    """Preview as a plan that chose `mode` would, leaving `spare_gib` of the budget free (blocks kept: half)."""
    plan = run.info["plan"]
    plan["phases"]["preview"]["mode"] = mode
    plan["ram_budget_gib"] = plan["phases"]["preview"]["host_gib"] + spare_gib


def planned_model_bytes(run: Run, mode: str) -> int:
    """What the plan counts on the device for the previewed model in `mode` (whole, or streamed)."""
    settings = plan_settings(run.settings, run.backend)
    memory = MemorySettings(**{f.name: getattr(settings, f.name) for f in fields(MemorySettings)})
    memory.offload = mode != "whole"
    meta = load_meta_model(run.settings.model)
    parts = plan_memory(summarize(meta.model, meta.arch), meta.arch, memory).get("preview", "emloc").parts
    return sum(parts.get(name, 0) for name in MODEL_PARTS)


class DeviceWatch:
    """The peak of what `model` holds on the device while it runs, seen before and after every submodule runs."""

    def __init__(self, model: torch.nn.Module, blocks: list[str]):
        self.model, self.blocks, self.peak, self.most_blocks = model, blocks, 0, 0
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps it
        self.handles = [m.register_forward_pre_hook(lambda *_: self.look()) for m in model.modules()]
        self.handles += [m.register_forward_hook(lambda *_: self.look()) for m in model.modules()]

    def look(self) -> None:
        held = sum(p.nbytes for p in self.model.parameters() if p.device.type != "meta")
        stream = getattr(self.model, "emloc_stream", None)
        self.peak = max(self.peak, held + (stream.held_bytes if stream is not None else 0))
        loaded = sum(any(p.device.type != "meta" for p in self.base.get_submodule(b).parameters())
                     for b in self.blocks)
        self.most_blocks = max(self.most_blocks, loaded)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", ["flux", "vlm"])
def test_every_preview_variant_holds_on_the_device_what_the_plan_counts(family, flux_run, vlm_run):
    """In mode "whole" a variant may hold the whole model; in "offload" and "files" every variant, the emulator
    too, holds at most one block in the model, as the plan counts it. What the budget leaves beyond the plan (half
    of it: `resident_budget`) may hold the block read ahead and blocks kept, never more."""
    run = flux_run if family == "flux" else vlm_run
    skeleton = run.backend.skeleton()
    blocks = run.backend.blockwise(skeleton, run.backend.checkpoint()).blocks
    largest = max(sum(p.numel() for p in skeleton.get_submodule(b).parameters()) for b in blocks) * 4  # float32
    for mode, spare in [(m, 0.0) for m in variants.PREVIEW_MODES] + [("files", 2 * 2.5 * largest / GiB)]:
        _use_mode(run, mode, spare)  # spare: room for the block read ahead and one or two kept
        assert variants.preview_mode(run) == mode
        assert variants.resident_budget(run) == pytest.approx(spare * GiB / 2, abs=2)
        planned = planned_model_bytes(run, mode) + variants.resident_budget(run)
        shared = variants.shared_weights(run)
        for label in PREVIEW_VARIANTS:
            model = variants.preview_variant(run, label, shared)
            watch = DeviceWatch(model, blocks)
            with torch.no_grad():
                run.backend.generate(model, label)
            watch.remove()
            variants.finish_variant(model)
            assert watch.peak > 0, (mode, label)
            assert watch.peak <= planned, (mode, spare, label, watch.peak, planned)  # exact counts: no tolerance
            if mode != "whole":
                assert watch.most_blocks == 1, (mode, label, watch.most_blocks)
            del model
        if spare:  # the room was used: blocks were kept
            assert 0 < shared.cache.used <= variants.resident_budget(run) - largest
    run.backend.release()


def test_the_preview_stage_frees_the_pipeline_with_the_stage(flux_run):
    """FLUX.1's text encoders and VAE stay loaded across the variants (the plan counts them beside every one) and
    leave with the stage."""
    _use_mode(flux_run, "files")
    flux_run.preview("previews-released")
    assert flux_run.backend._pipe is None


def _images(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize("family", ["flux", "vlm"])
def test_full_model_variants_share_their_reads_and_give_the_same_previews(family, flux_run, vlm_run, monkeypatch):
    """With room on the device the full-model variants keep the blocks they read, and the ones after the first read
    nothing: the full model is read from its files once per preview instead of once per forward of each variant
    (denoising step, or generated token); the previews are the very same."""
    run = flux_run if family == "flux" else vlm_run
    readers, forwards = [], [0]
    shared_weights, preview_variant = variants.shared_weights, variants.preview_variant

    def counted(r, label, shared=None):  # counts the full model's forwards (denoising steps, generated tokens)
        model = preview_variant(r, label, shared)
        if label != "emulator + LoRA":
            model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        return model

    monkeypatch.setattr(variants, "shared_weights", lambda r: readers.append(shared_weights(r)) or readers[-1])
    monkeypatch.setattr(variants, "preview_variant", counted)
    stored, in_blocks = _stored_bytes(run)
    outputs = {}
    for spare in (0.0, 1.0):  # 1 GiB spare: half of it keeps the (tiny) model's blocks
        _use_mode(run, "files", spare)
        folder = run.preview(f"previews-reuse-{spare}")
        outputs[spare] = _images(folder) if family == "flux" else \
            [item["answers"] for item in json.loads((folder / "previews.json").read_text())["items"]]
    streamed, kept = (r.reader.bytes_read for r in readers)
    assert kept == stored  # every tensor read once, for the three variants together
    per_run = forwards[0] // 2
    assert per_run >= 3 * 2  # three variants, at least two steps or tokens each
    if family == "flux":  # every forward reads every block; what is outside the blocks is read once
        assert streamed == stored + (per_run - 1) * in_blocks, (streamed, stored, per_run, in_blocks)
    else:  # the vision blocks run once per answer, the language blocks once per token
        assert streamed >= stored + 2 * in_blocks
    if family == "flux":
        assert outputs[0.0].keys() == outputs[1.0].keys()
        for name in outputs[0.0]:
            assert np.array_equal(outputs[0.0][name], outputs[1.0][name]), name
    else:
        assert outputs[0.0] == outputs[1.0]


def _stored_bytes(run: Run) -> tuple[int, int]:
    """(bytes of every weight the streamed model reads, bytes of those inside its blocks), as stored in the files."""
    reader, model = run.backend.checkpoint(), run.backend.skeleton()
    blocks = run.backend.blockwise(model, reader).blocks
    sizes = {n: reader.read(n).nbytes for n, _ in model.named_parameters() if n in reader}
    return sum(sizes.values()), sum(v for n, v in sizes.items() if any(n.startswith(b + ".") for b in blocks))


def test_cached_reader_reads_each_tensor_once_within_its_budget(tmp_path):
    """What fits the budget is read from the files once and then comes from RAM; the rest is read every time."""
    from safetensors.torch import save_file

    from emloc.checkpoint import CheckpointReader
    from emloc.host_cache import CachedReader

    tensors = {f"block.{i}.weight": torch.full((256,), float(i)) for i in range(4)}  # 1 KiB each
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for budget, expected in ((None, 4 * 1024), (2 * 1024, 4 * 1024 + 2 * 2 * 1024), (0, 3 * 4 * 1024)):
        reader = CachedReader(CheckpointReader([tmp_path / "model.safetensors"]), budget)
        for _ in range(3):
            for name, tensor in tensors.items():
                assert torch.equal(reader.read(name), tensor)
        assert reader.bytes_read == expected, budget
        assert reader.used <= (budget if budget is not None else 4 * 1024)
        reader.close()
        assert reader.used == 0 and not reader.held
