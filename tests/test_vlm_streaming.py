"""The InternVL backend streams: every forward-only phase reads the tiny checkpoint block by block from its files,
and gives what the loaded model gives (the same forward, statistics, emulator, corrected LoRA and previews)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emloc.blockwise import BlockwiseModel
from emloc.calibration import StatsCollector
from pipelines.internvl.backend import ChatPacker, VlmBackend, VlmSettings, collate, load_vlm, load_vlm_processing
from pipelines.internvl.data import QASample, pairs_to_samples
from pipelines.runner import Run, RunSettings, models, variants
from vlm_fixtures import save_tiny_internvl, write_colour_csv


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("colours")
    rows = write_colour_csv(folder)
    return folder, rows


@pytest.fixture(scope="module")
def encoded(checkpoint, colour_data) -> tuple[list[dict], int]:
    """The colour samples packed as the backend packs them, and the pad token."""
    folder, rows = colour_data
    parts = load_vlm_processing(str(checkpoint))
    packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length)
    samples = pairs_to_samples(rows, base=folder).samples + [QASample((), (("Name a colour.", "red"),))]
    return [packer.encode(s) for s in samples], parts.tokenizer.pad_token_id


def backend_for(model: Path) -> VlmBackend:
    return VlmBackend(RunSettings(model=str(model)), VlmSettings(), torch.device("cpu"))


def streamed_for(model: Path) -> BlockwiseModel:
    backend = backend_for(model)
    return backend.blockwise(backend.skeleton(), backend.checkpoint())


def inputs(encoded: list[dict], pad: int, pad_by: int = 0) -> dict[str, torch.Tensor]:
    """A batch of `encoded` without labels; `pad_by` extra padding tokens at the end of every row."""
    batch = collate(encoded, pad)
    batch.pop("labels")
    if pad_by:
        rows = batch["input_ids"].shape[0]
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((rows, pad_by), pad)], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(rows, pad_by, dtype=torch.long)], 1)
    return batch


@torch.no_grad()
def streamed_forward(streamed: BlockwiseModel, batch: dict) -> dict:
    """The batch through every block, each read from the files and freed after it (as stream_emulator does)."""
    state = streamed.enter(streamed, batch)
    for name in streamed.blocks:
        streamed.load(name)
        state = streamed.step(streamed, name, state)
        streamed.unload(name)
    return state


@torch.no_grad()
def streamed_statistics(streamed: BlockwiseModel, batch: dict) -> dict[str, torch.Tensor]:
    """Σ xᵀx of every linear layer inside the blocks, masked by `token_mask` as stream_emulator masks it."""
    state, sums = streamed.enter(streamed, batch), {}
    for name in streamed.blocks:
        block = streamed.load(name)
        linears = {f"{name}.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        with StatsCollector(linears, torch.float32) as collector:
            collector.mask = streamed.token_mask(state)
            state = streamed.step(streamed, name, state)
            collector.next_batch()
        sums.update(collector.result())
        streamed.unload(name)
    return sums


# ------------------------------------------------------------------------------------------------ the files


def test_both_checkpoint_key_formats_name_every_parameter_of_the_model(checkpoint, tmp_path):
    """save_pretrained writes `language_model.model.` / `vision_tower.` keys, transformers-native hub repositories
    `model.language_model.` ones; the reader maps both onto the model's names, with the same tensors."""
    loaded = load_vlm(str(checkpoint))
    native = tmp_path / "native"
    shutil.copytree(checkpoint, native, ignore=shutil.ignore_patterns("*.safetensors"))
    state = {k: v.contiguous() for k, v in loaded.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(native / "model.safetensors"), metadata={"format": "pt"})
    saved_keys = set(load_file(str(checkpoint / "model.safetensors")))
    assert any(k.startswith("language_model.model.") for k in saved_keys)  # the old prefixes, as written
    assert not any(k.startswith("language_model.model.") for k in state)
    wanted = {n for n, _ in loaded.named_parameters()}  # lm_head.weight is the embeddings' (tied)
    for folder in (checkpoint, native):
        reader = backend_for(folder).checkpoint()
        assert set(reader.where) == wanted, folder.name
        for name in ("model.language_model.layers.1.mlp.up_proj.weight", "model.vision_tower.embeddings.cls_token",
                     "model.multi_modal_projector.linear_1.bias"):
            torch.testing.assert_close(reader.read(name), loaded.get_parameter(name), rtol=0, atol=0)


def test_skeleton_has_real_buffers_and_finish_loading_ties_the_head(checkpoint):
    backend = backend_for(checkpoint)
    model = backend.skeleton()
    assert all(p.device.type == "meta" for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())
    torch.testing.assert_close(buffers["model.language_model.rotary_emb.inv_freq"],
                               load_vlm(str(checkpoint)).model.language_model.rotary_emb.inv_freq)
    backend.checkpoint().materialize(model, "", "cpu")
    backend.finish_loading(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight


# ------------------------------------------------------------------------------------------ the forward


@pytest.mark.parametrize("rows", [[0], [1, 8], [8]], ids=["one image", "image + text-only, padded", "text only"])
def test_blockwise_forward_is_the_models_forward(checkpoint, encoded, rows):
    samples, pad = encoded
    batch = inputs([samples[i] for i in rows], pad)
    assert "pixel_values" in batch or rows == [8]
    model = load_vlm(str(checkpoint))
    with torch.no_grad():
        expected = model(**batch)
        expected_hidden = model.model(**batch).last_hidden_state
    streamed = streamed_for(checkpoint)
    state = streamed_forward(streamed, batch)
    hidden = streamed.load("model.language_model.norm")(state["hidden"])
    logits = hidden @ streamed.reader.read("model.language_model.embed_tokens.weight").T  # the tied head
    real = batch["attention_mask"].bool()  # padded rows: the model's outputs there are not defined alike
    torch.testing.assert_close(hidden[real], expected_hidden[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[real], expected.logits[real], rtol=1e-5, atol=1e-5)


def test_padding_never_enters_the_statistics(checkpoint, encoded):
    samples, pad = encoded
    streamed = streamed_for(checkpoint)
    plain = streamed_statistics(streamed, inputs(samples[:1], pad))
    padded = streamed_statistics(streamed, inputs(samples[:1], pad, pad_by=7))
    assert plain.keys() == padded.keys() and any("vision_tower" in k for k in plain) and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(padded[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ the runs


@pytest.mark.slow  # two InternVL runs: 28 s
def test_streamed_run_builds_the_emulator_the_two_step_run_builds(checkpoint, colour_data, tmp_path):
    """The default run reads the model block by block from its files; keeping the statistics switches to the
    two-step path (whole model, every layer's Σ xᵀx). Both give the same emulator and the same corrected LoRA;
    only the two-step run's folder holds statistics."""
    folder, _ = colour_data
    reports, adapters = {}, {}
    for keep in (False, True):
        settings = RunSettings(model=str(checkpoint), ratio=0.5, calibration_samples=8, steps=2, rank=4, lr=1e-3,
                               keep_statistics=keep, device="cpu")
        run = Run.create(tmp_path / f"keep-{keep}", "vlm", settings, VlmSettings(data=str(folder / "qa.csv")))
        assert models.streams(run) != keep
        run.execute(["calibrate", "emulate", "train", "correct"])
        reports[keep] = json.loads((run.dir / "emulator" / "report.json").read_text())
        adapters[keep] = load_file(str(run.dir / "lora" / "corrected" / "adapter_model.safetensors"))
        assert (run.dir / "calibration" / "stats.safetensors").exists() == keep
        assert (run.dir / "emulator" / "emulator-00000.safetensors").exists() != keep  # one file per block
    assert reports[False]["fingerprint"] == reports[True]["fingerprint"]
    assert [r["name"] for r in reports[False]["layers"]] == [r["name"] for r in reports[True]["layers"]]
    for streamed, whole in zip(reports[False]["layers"], reports[True]["layers"]):
        assert streamed["rank"] == whole["rank"]
        assert abs(streamed["error"] - whole["error"]) <= 1e-4 * max(whole["error"], 1.0), streamed["name"]
    assert adapters[False].keys() == adapters[True].keys() and adapters[True]
    for key in (k for k in adapters[True] if ".lora_A." in k):  # ΔW = B A (A' = Pᵀ is defined up to signs)
        b = key.replace(".lora_A.", ".lora_B.")
        delta = {keep: adapters[keep][b] @ adapters[keep][key] for keep in (False, True)}
        gap = float((delta[False] - delta[True]).norm() / delta[True].norm().clamp_min(1e-12))
        assert gap < 1e-3, (key, gap)


@pytest.mark.slow  # two InternVL runs: 39 s
def test_previews_streamed_from_the_files_equal_previews_of_the_loaded_model(checkpoint, colour_data, tmp_path):
    """Below the memory budget the full model's previews read it block by block, the LoRA added to its layers'
    outputs; offloaded (read once into host RAM, each block moved to the device as it runs) the same.
    Both give the answers of the loaded model with the PEFT adapter."""
    folder, _ = colour_data
    settings = RunSettings(model=str(checkpoint), ratio=0.5, calibration_samples=8, steps=4, rank=4, lr=3e-3,
                           device="cpu", ram_gb=1000.0)
    run = Run.create(tmp_path / "preview", "vlm", settings,
                     VlmSettings(data=str(folder / "qa.csv"), max_new_tokens=4, preview_samples=3))
    run.execute()
    assert variants.preview_mode(run) == "whole" and run.info["plan"]["phases"]["preview"]["mode"] == "whole"
    loaded = json.loads((run.dir / "previews" / "previews.json").read_text())
    assert len(loaded["items"]) == 3
    for mode in ("files", "offload"):  # as plans under a small --ram-gb, or a small GPU with enough RAM, say
        run.info["plan"]["phases"]["preview"]["mode"] = mode
        assert variants.preview_mode(run) == mode
        other = json.loads((run.preview(f"previews-{mode}") / "previews.json").read_text())
        assert [item["answers"] for item in other["items"]] == [item["answers"] for item in loaded["items"]], mode
