"""The preview phase of the dry run (pipelines/planner/trace.py): each preview variant, held as the plan's preview
mode says, through the run's own variants.preview_variant on fake tensors (issue 26): FLUX's denoising steps and
VAE decode, InternVL's prefill and generated tokens (_preview_step)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn

import emloc
from emloc.trace import ShapeReader, materialize_fake, traced

from .trace_inputs import _emulator_on_meta, _fill_cache, _lora_dtype

# generated tokens after the prefill (InternVL) and denoising steps (FLUX) the trace runs: each further one only
# lengthens the KV cache by one token (counted by the formula) or replaces the latents, so the peak is reached
STEPS = 2


class _StandInOutputs:
    """variants.RunOutputs of a dry run: the emulator's structure as load_emulator builds it, its factors and the
    adapters as shapes (float32 on the host, as adapter_factors returns them from the files)."""

    def __init__(self, setup, backend):
        self.setup, self.backend = setup, backend

    def emulator(self, run, model: nn.Module) -> ShapeReader:
        _emulator_on_meta(model, self.backend.default_rules(self.setup.ratio))
        return ShapeReader.of_module(model, self.backend.dtype)

    def adapter(self, folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        run_settings = self.backend.run
        model = self.backend.skeleton()
        return {name: (torch.empty(run_settings.rank, model.get_submodule(name).in_features),
                       torch.empty(model.get_submodule(name).out_features, run_settings.rank))
                for name in emloc.lora_target_names(model, run_settings.lora_targets or
                                                    self.backend.default_lora_targets())}


def preview_mode_of(estimate) -> str:
    """The preview mode (variants.PREVIEW_MODES) the plan's preview estimate stands for."""
    return "offload" if estimate.offloaded else "files" if estimate.streamed else "whole"


def _preview_step(setup, backend, model: nn.Module, vae: nn.Module | None) -> None:
    """One preview of a variant, as the pipeline runs it. FLUX: STEPS denoising steps of the transformer on the
    cache's prompt embeddings at the plan's resolution (batch 1), each one's prediction replacing the latents as the
    scheduler's step does, then the VAE's decode of the latents with the transformer still held (the pipeline's
    order). InternVL: the language model's prefill over the plan's sequence with its KV cache and the last token's
    logits, then STEPS generated tokens on that cache, one at a time (generate's loop)."""
    with torch.no_grad():
        if setup.bundle["family"] == "flux":
            batch = next(iter(backend.calibration_batches()))
            for _ in range(STEPS):
                prediction = backend.calibration_forward(model, batch)[0]
                latents = batch["hidden_states"]
                batch = {**batch, "hidden_states": (latents.float() - prediction.float()).to(latents.dtype)}
                del prediction, latents
            del batch
            if vae is not None:
                side = setup.plan.resolution // 8
                latents = torch.empty(1, vae.config.latent_channels, side, side, dtype=backend.dtype,
                                      device=backend.device)
                image = vae.decode(latents, return_dict=False)[0]
                del latents, image  # the pipeline postprocesses the image on the host
        else:
            ids = torch.zeros(1, setup.plan.seq_len, dtype=torch.long, device=backend.device)
            cache = _empty_kv_cache(model, backend)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for _ in range(STEPS):
                del out
                out = model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            del out, cache


def _class_image_latents(setup, backend, vae: nn.Module) -> None:
    """Prior preservation's class images are drawn by the base variant, held as the preview holds it (the plan's
    "class_images" phase is the preview's); each drawn image is then encoded by the VAE with that model still held
    (DreamBoothData.write_class_images): one encode at the plan's resolution, beside the base variant."""
    with torch.no_grad():
        image = torch.empty(1, 3, setup.plan.resolution, setup.plan.resolution, dtype=backend.dtype,
                            device=backend.device)
        latents = vae.encode(image).latent_dist
        del image, latents


def _vae(setup) -> nn.Module | None:
    """The preview pipeline's VAE on meta, from the bundle's config (FLUX); None for a family without one."""
    config = setup.bundle.get("components", {}).get("vae")
    if config is None:
        return None
    import diffusers

    from pipelines.runner.planning import on_meta

    values = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = on_meta(lambda: getattr(diffusers, config["_class_name"]).from_config(values))
    return vae.eval().requires_grad_(False)


def _whole_variant(setup, backend, label: str) -> nn.Module:
    """A variant of mode "whole" on `meta`, as load_model / emulator_model + load_adapter build it."""
    model = backend.skeleton()
    if label == "emulator + LoRA":
        model = _emulator_on_meta(model, backend.default_rules(setup.ratio))
    if label == "base":
        return model
    run_settings = backend.run
    return emloc.attach_lora(model, run_settings.lora(run_settings.lora_targets or backend.default_lora_targets()))


def _empty_kv_cache(model: nn.Module, backend):
    """The DynamicCache generate starts from, its layers already started: a layer's own lazy start builds
    `torch.tensor([], device=...)` from data, which the stand-in GPU cannot (it has no real allocator)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    text = model.config.text_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    width = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = DynamicCache()
    for _ in range(text.num_hidden_layers):
        layer = DynamicLayer()
        layer.dtype, layer.device, layer.is_initialized = backend.dtype, backend.device, True
        layer.keys, layer.values = (torch.empty(1, heads, 0, width, dtype=backend.dtype, device=backend.device)
                                    for _ in range(2))
        cache.layers.append(layer)
    return cache


def trace_preview(setup, backend) -> tuple[int, int]:
    """stages.preview's variants held as the plan's preview mode says (variants.preview_variant; the emulator
    first, then base, full + corrected and full + uncorrected LoRA), each running one forward (_preview_step); the
    base variant also encodes one drawn class image (_class_image_latents: the train stage's class-image drawing).
    Streamed modes run the run's own code, its file reads filled by a ShapeReader and _StandInOutputs; with no
    budget left beyond the plan (the run reads ahead and keeps blocks only in that room), one block at a time.
    Mode "whole" (load_model / emulator_model read every tensor from the files) is traced as what they build: the
    model (or emulator) with PEFT's LoRA, whole on the device."""
    from types import SimpleNamespace

    from pipelines.runner import variants

    mode = preview_mode_of(setup.preview)
    backend.checkpoint = lambda: ShapeReader.of_module(backend.skeleton(), backend.dtype)
    run = SimpleNamespace(backend=backend, settings=backend.run, output=lambda stage: Path(stage),
                          info={"plan": {"phases": {"preview": {"mode": mode, "streamed": mode != "whole"}}}})
    labels = ("emulator + LoRA", "base", "full + corrected LoRA", "full + uncorrected LoRA")
    whole = {label: _whole_variant(setup, backend, label) for label in labels} if mode == "whole" else {}
    vae = _vae(setup)
    real_outputs, variants.OUTPUTS = variants.OUTPUTS, _StandInOutputs(setup, backend)
    try:
        with traced() as counter:
            _fill_cache(setup, backend)
            if vae is not None:  # the pipeline's VAE, on the device beside every variant (pipe.to(device))
                materialize_fake(vae, backend.device, backend.dtype)
            shared = None
            for label in labels:
                if mode == "whole":  # PEFT's injection cannot run on fakes: built on meta above, filled here
                    model = materialize_fake(whole.pop(label), backend.device, backend.dtype, dtype_of=_lora_dtype)
                    backend.finish_loading(model)
                else:
                    if label != "emulator + LoRA" and shared is None:
                        shared = variants.shared_weights(run)
                    model = variants.preview_variant(run, label, shared)
                model.eval()
                try:
                    _preview_step(setup, backend, model, vae)
                    if label == "base" and vae is not None:
                        _class_image_latents(setup, backend, vae)
                finally:
                    variants.finish_variant(model)
                del model
                gc.collect()  # as stages.preview: a streamed variant and its StreamedForward refer to each other
            del shared, vae
    finally:
        variants.OUTPUTS = real_outputs
    return counter.peak.get(backend.device.type, 0), counter.peak.get("cpu", 0)
