"""What the FLUX.1, FLUX.2 and InternVL backends put on the GPU, checked on the CPU (issue 25, review gpu-path.md
F2, F5, F6, F14, F16, F17): FLUX.2 samples without building its text encoder, cached embeddings stay on the host,
whole loads go straight to the device, the export snippets' GPU branches offload what the plan said does not fit,
the planner adds the VAE decode to the resident models, InternVL frees the CUDA cache and refuses a captioner that
does not fit."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2_fixtures import save_tiny_klein
from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.flux.backend import FluxBackend, FluxSettings
from pipelines.flux.export import load_snippet as flux_snippet
from pipelines.flux.export import offload_settings
from pipelines.flux2 import backend as flux2_backend
from pipelines.flux2.backend import Flux2Backend, Flux2Settings
from pipelines.runner import RunSettings

PROMPT = "a photo of sks dog"
GiB = 1024 ** 3


@pytest.fixture(scope="module")
def klein(tmp_path_factory) -> Path:
    return save_tiny_klein(tmp_path_factory.mktemp("models") / "klein-base", distilled=False)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("models") / "flux")


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subject")
    write_subject_images(folder, count=3, size=32)
    return folder


def _klein_backend(klein: Path, subject: Path, **preview) -> Flux2Backend:
    settings = Flux2Settings(images=str(subject), prompt=PROMPT, resolution=32, max_sequence_length=32,
                             preview_steps=1, **preview)
    backend = Flux2Backend(RunSettings(model=str(klein)), settings, torch.device("cpu"))
    backend.use_data(subject)
    return backend


@pytest.fixture(scope="module")
def klein_cache(klein, subject, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    _klein_backend(klein, subject).build_cache(folder)
    return folder


def _count_encoder_builds(monkeypatch) -> list:
    built = []
    original = flux2_backend.streamed_transformers_model

    def spy(*args, **kwargs):
        built.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(flux2_backend, "streamed_transformers_model", spy)
    return built


# -- F2: FLUX.2 sample rounds and previews from cached prompts never build the text encoder ----------------------
def test_a_flux2_sample_round_and_preview_with_cached_prompts_never_build_the_text_encoder(
        klein, subject, klein_cache, tmp_path, monkeypatch):
    from diffusers import Flux2Transformer2DModel

    built = _count_encoder_builds(monkeypatch)
    backend = _klein_backend(klein, subject)
    backend.load_cache(klein_cache)
    model = Flux2Transformer2DModel.from_pretrained(str(klein), subfolder="transformer").eval()
    with torch.no_grad():
        samples = backend.write_samples(tmp_path, model)
        images = backend.generate(model, "base")
    assert built == [] and backend._pipe.text_encoder is None
    assert len(images) == 1 and any(p.suffix == ".png" for p in samples)


def test_a_new_flux2_preview_prompt_is_encoded_before_the_preview_and_the_encoder_freed(
        klein, subject, klein_cache, monkeypatch):
    from diffusers import Flux2Transformer2DModel

    built = _count_encoder_builds(monkeypatch)
    backend = _klein_backend(klein, subject, preview_prompts=["sks dog on a beach"])
    backend.load_cache(klein_cache)  # the preview stage loads the cache before any model variant
    assert len(built) == 1 and backend._pipe.text_encoder is None
    assert backend.cache["typed"]["sks dog on a beach"].device.type == "cpu"
    model = Flux2Transformer2DModel.from_pretrained(str(klein), subfolder="transformer").eval()
    with torch.no_grad():
        for label in ("base", "full + corrected LoRA"):
            backend.generate(model, label)
    assert len(built) == 1  # encoded once, never again for the variants


# -- F16: cached embeddings on the CPU in the model dtype; the step moves its batch --------------------------------
@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_cached_embeddings_stay_on_the_cpu_in_the_model_dtype_and_give_the_loss_of_the_float32_cache(
        family, tiny_flux, klein, subject, klein_cache, tmp_path):
    """A GPU run's dtype (bf16) on the CPU: the bf16 cache gives exactly the loss the float32 cache, cast at each
    step (the code before), gave."""
    if family == "flux":
        from diffusers import FluxTransformer2DModel as Transformer

        model_dir = tiny_flux
        backend = FluxBackend(RunSettings(model=str(tiny_flux), batch_size=2),
                              FluxSettings(images=str(subject), prompt=PROMPT, resolution=32), torch.device("cpu"))
        backend.use_data(subject)
        backend.build_cache(tmp_path)
        cache = tmp_path
    else:
        from diffusers import Flux2Transformer2DModel as Transformer

        model_dir, backend, cache = klein, _klein_backend(klein, subject), klein_cache
    backend.dtype = torch.bfloat16  # what a CUDA device resolves to
    backend.load_cache(cache)
    held = [t for key in ("embeds", "pooled") for t in backend.cache.get(key, [])]
    held += [t for entry in backend._latents() for t in (entry["mean"], entry["std"])]  # every cached latent
    assert held and all(t.device.type == "cpu" for t in held)
    assert all(t.dtype == torch.bfloat16 for t in backend.cache["embeds"] + backend.cache.get("pooled", []))
    model = Transformer.from_pretrained(str(model_dir), subfolder="transformer", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        loss = backend.training_loss(model, 0, torch.Generator().manual_seed(7))
        stored = load_file(str(cache / "cache.safetensors"))  # the float32 cache the old code kept
        texts = range(len(backend.cache["meta"]["texts"]))
        backend.cache["embeds"] = [stored[f"text.{i}.embeds"] for i in texts]
        if family == "flux":
            backend.cache["pooled"] = [stored[f"text.{i}.pooled"] for i in texts]
        before = backend.training_loss(model, 0, torch.Generator().manual_seed(7))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, before, rtol=0, atol=1e-6)


# -- F14: whole loads go straight to the device --------------------------------------------------------------------
class _Loaded(torch.nn.Module):
    def to(self, *args, **kwargs):  # the spy stands in for a model already on the device
        return self


def test_load_model_loads_onto_an_accelerator_through_a_device_map_and_plainly_on_the_cpu(klein, tiny_flux,
                                                                                        monkeypatch):
    import diffusers
    import transformers

    from pipelines.demo import VLM_DIR
    from pipelines.internvl.inputs import load_vlm

    calls = []

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("device_map"))
        return _Loaded()

    for cls in (diffusers.FluxTransformer2DModel, diffusers.Flux2Transformer2DModel,
                transformers.InternVLForConditionalGeneration):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    flux = FluxBackend(RunSettings(model=str(tiny_flux)), FluxSettings(), torch.device("cpu"))
    flux2 = Flux2Backend(RunSettings(model=str(klein)), Flux2Settings(), torch.device("cpu"))
    for device in ("cuda:1", "cpu"):
        flux.load_model(torch.device(device))
        flux2.load_model(torch.device(device))
        load_vlm(str(VLM_DIR), device)
    assert calls == [{"": "cuda:1"}] * 3 + [None] * 3


# -- F6: the export snippets' GPU branches -------------------------------------------------------------------------
def _plan(mode: str, need: float, budget: float) -> dict:
    return {"gpu_budget_gib": budget, "phases": {"preview": {"mode": mode, "device_gib": need}}}


def test_flux_snippet_offloads_t5_only_when_the_plan_cannot_hold_it_and_uses_files_when_the_plan_did():
    def snippet(plan):
        text = flux_snippet("model", Path("lora"), PROMPT, 0, 512, 28, 3.5, 512, **offload_settings(plan, 8.87))
        compile(text, "snippet", "exec")
        return text

    whole = snippet(_plan("whole", 20, 24))
    assert "enable_group_offload" not in whole and ".to(device)" in whole
    roomy = snippet(_plan("offload", 3.2, 24))  # T5-XXL whole (8.87 GiB) fits beside the run's preview
    assert "pipe.enable_group_offload(" in roomy and "exclude_modules=['text_encoder', 'text_encoder_2', 'vae']" in roomy
    assert "offload_to_disk_path" not in roomy and "use_stream=True" in roomy
    tight = snippet(_plan("offload", 3.2, 12))  # 12.07 GiB > 12: T5 is offloaded block by block too
    assert "exclude_modules=['text_encoder', 'vae']" in tight
    files = snippet(_plan("files", 3.2, 24))  # host RAM cannot hold the model: blocks wait in files
    assert "offload_to_disk_path=tempfile.mkdtemp(" in files
    for text in (roomy, tight, files):  # the CPU branch is the plain pipeline, as the preview ran
        assert "else:\n    pipe.to(device)" in text and not text.split("pipe = ")[1].split("\n")[0].endswith(".to(device)")


def test_flux2_snippet_never_moves_the_text_encoder_to_the_gpu(klein, subject):
    backend = _klein_backend(klein, subject)
    for mode in ("offload", "files"):
        text = backend.export_snippet(Path("lora"), _plan(mode, 30, 24))
        compile(text, "snippet", "exec")
        assert "text_encoder.to(" not in text and "pipe.enable_group_offload(" in text
        assert 'exclude_modules=["vae"]' in text  # everything else, the text encoder included, is offloaded
        assert ("offload_to_disk_path" in text) == (mode == "files")


def test_internvl_snippet_leaves_headroom_on_the_runs_gpu():
    from pipelines.internvl.export import gpu_headroom, load_snippet

    text = load_snippet("model", Path("lora"), "photo.jpg", "What is it?", 256, offload=(24, 64), gpu_index=1)
    compile(text, "snippet", "exec")
    assert gpu_headroom(24) == pytest.approx(4.8) and gpu_headroom(8) == pytest.approx(2.0)
    assert 'max_memory={1: "19.2GiB", "cpu": "64GiB"}' in text and 'device = "cuda:1"' in text
    assert "offload_folder=" in text and "{0:" not in text
    plain = load_snippet("model", Path("lora"), "photo.jpg", "What is it?", 256)
    assert "device_map" not in plain and 'device = "cuda:0"' in plain


# -- F5 and F2: the planner's FLUX terms ---------------------------------------------------------------------------
def test_the_flux_preview_adds_the_vae_decode_to_the_resident_models():
    from emloc.memory import MemorySettings, estimate
    from pipelines.planner.catalogue import load_meta_model

    meta = load_meta_model("black-forest-labs/FLUX.1-dev")
    plans = {px: estimate(meta.model, meta.arch, MemorySettings(resolution=px, ratio=0.3)) for px in (512, 1024)}
    for px, plan in plans.items():
        preview = plan.get("preview", "emloc").parts
        decode = 2 * 6 * 128 * px * px  # bf16 · VAE_LIVE_TENSORS · the VAE's 128 first channels · pixels
        assert preview["working set (VAE decode)"] == decode
        assert preview["weights (vae)"] == pytest.approx(0.156 * GiB, rel=0.01)  # resident while it decodes
        assert preview["activations"] > 0  # a sum: the decode does not replace the rest
        training = plan.get("training", "emloc").parts
        assert training.get("sampling: VAE decode", decode) == decode
        assert training["inputs (the step's batch)"] == 2 * 512 * 4096  # one sample of T5 embeddings, bf16
    grew = plans[1024].get("preview", "emloc").total - plans[512].get("preview", "emloc").total
    assert grew >= 1.5 * GiB - 0.375 * GiB  # the decode alone grows by 1.125 GiB from 512 to 1024 px


def test_the_flux2_embeddings_phase_counts_the_streamed_encoders_embeddings_and_head():
    from emloc.memory import MemorySettings, estimate
    from pipelines.planner.catalogue import load_meta_model

    meta = load_meta_model("black-forest-labs/FLUX.2-dev")
    encoder = next(c for c in meta.arch.components if c.prompt_encoder)
    assert encoder.streamed_params == pytest.approx(1.93e9, rel=0.01)  # 1.378 B outside the blocks + one layer
    parts = estimate(meta.model, meta.arch, MemorySettings(ratio=0.32)).get("embeddings", "emloc").parts
    assert parts["weights (text_encoder, outside the blocks + one block)"] == pytest.approx(3.6 * GiB, rel=0.01)


# -- F17: InternVL frees the CUDA cache; the captioner is refused when it cannot fit -------------------------------
def test_internvl_release_empties_the_cuda_cache_when_there_is_one(monkeypatch):
    from pipelines.internvl.backend import VlmBackend

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        holder = types.SimpleNamespace(_packer=object())
        VlmBackend.release(holder)
        assert holder._packer is None
    assert emptied == [True]


def test_a_captioner_larger_than_the_free_gpu_is_refused_before_it_loads(monkeypatch):
    from pipelines.demo import VLM_DIR
    from pipelines.internvl import caption

    need = caption.captioner_bytes(str(VLM_DIR), 16, 40)
    assert need > GiB  # the runtime overhead alone is 1 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need - 1, 24 * GiB))
    with pytest.raises(ValueError, match="needs about .* GiB on the GPU .* --device cpu"):
        caption.Captioner(str(VLM_DIR), device="cuda")
    caption.check_captioner_fits(str(VLM_DIR), need, need)  # fits exactly: no error


# -- F20: FLUX.1's text encoders never share the device with the transformer ---------------------------------------
def test_flux1_dev_plans_on_an_8_gb_card_with_t5_streamed_in_its_own_phase():
    from pipelines.planner.planning import PlanSettings, plan_run

    plan = plan_run("black-forest-labs/FLUX.1-dev", PlanSettings(budget_gb=8, ram_gb=32))
    assert plan.recommended is not None  # refused before: T5-XXL whole (8.87 GiB) sat beside every preview
    embeddings = plan.get("embeddings", "emloc").parts
    assert embeddings["weights (text_encoder_2, outside the blocks + one block)"] < 0.7 * GiB  # not 8.87 GiB
    for e in plan.memory.estimates:
        if e.phase != "embeddings" and e.method == "emloc":
            assert not any("text_encoder" in part for part in e.parts), e.phase


def test_flux1_previews_and_samples_run_from_cached_embeddings_without_text_encoders(tiny_flux, subject, tmp_path,
                                                                                     monkeypatch):
    from diffusers import FluxTransformer2DModel

    import pipelines.flux.backend as flux_backend

    built = []
    original = flux_backend.streamed_transformers_model
    monkeypatch.setattr(flux_backend, "streamed_transformers_model",
                        lambda *a, **k: built.append(a[0]) or original(*a, **k))
    settings = FluxSettings(images=str(subject), prompt=PROMPT, resolution=32, preview_steps=1)
    backend = FluxBackend(RunSettings(model=str(tiny_flux)), settings, torch.device("cpu"))
    backend.use_data(subject)
    backend.build_cache(tmp_path)
    assert len(built) == 1  # the cache stage streams T5 once
    backend.release()
    backend.load_cache(tmp_path)
    model = FluxTransformer2DModel.from_pretrained(str(tiny_flux), subfolder="transformer").eval()
    with torch.no_grad():
        backend.write_samples(tmp_path, model)
        backend.generate(model, "base")
    assert len(built) == 1 and backend._pipe.text_encoder is None and backend._pipe.text_encoder_2 is None
    settings.preview_prompts = ["sks dog on a beach"]  # typed for a later preview: encoded when the cache loads
    backend.load_cache(tmp_path)
    assert len(built) == 2 and backend._pipe.text_encoder_2 is None
    with torch.no_grad():
        images = backend.generate(model, "base")
    assert len(built) == 2 and len(images) == 1
