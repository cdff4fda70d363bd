"""Shaped stand-ins of what the run reads, for the dry run's phases (pipelines/planner/trace.py, trace_preview.py):
the emulator's structure as load_emulator builds it from the run's files, the run's cache of encoded data, and the
dtype train() gives LoRA weights."""

from __future__ import annotations

import torch
from torch import nn

import emloc
from emloc.emulator import set_submodule
from emloc.lowrank import LowRankLinear


def _emulator_on_meta(model: nn.Module, rules) -> nn.Module:
    """The emulator's structure, as `load_emulator(model, folder, device="meta")` gives it from the run's files."""
    for name, (linear, ratio) in emloc.target_linears(model, emloc.normalise_rules(rules)).items():
        rank = emloc.factored_rank(linear.in_features, linear.out_features, ratio)
        if rank:
            set_submodule(model, name, LowRankLinear(linear.in_features, linear.out_features, rank,
                                                     bias=linear.bias is not None, device="meta"))
    return model


def _fill_cache(setup, backend) -> None:
    """The run's cache (what build_cache writes from the user's data), as stand-ins of its shapes: two images,
    two prompts, so that whichever a step draws exists. Call inside `traced()`."""
    device, p = backend.device, setup.plan
    if setup.bundle["family"] == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler

        transformer = setup.bundle["components"]["transformer"]
        flux2 = setup.family_backend == "flux2"
        channels = transformer["in_channels"] // 4  # both pack 2x2 latent patches into a token
        side = p.resolution // 8
        tokens = backend.settings.max_sequence_length
        latent = [[torch.empty(channels, side, side, device=device) for _ in range(2)] for _ in range(2)]
        backend.cache.update(
            guidance=bool(transformer.get("guidance_embeds")), transformer=dict(transformer),
            index={"_class_name": "Flux2Pipeline" if flux2 else "FluxPipeline", "is_distilled": True},
            meta={"images": ["a", "b"], "views": 2, "image_text": [0, 1], "texts": ["a", "b"], "shift_factor": 0.0,
                  "scaling_factor": 1.0, "vae_scale_factor": 8},
            mean=latent, std=latent, embeds=[torch.empty(tokens, transformer["joint_attention_dim"], device=device)] * 2,
            pooled=[torch.empty(transformer.get("pooled_projection_dim", 768), device=device)] * 2,
            bn=(torch.empty(1, transformer["in_channels"], 1, 1, device=device),) * 2)
        backend.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        return
    from types import SimpleNamespace

    config = setup.bundle["config"]
    tiles = p.image_tiles
    side = config["vision_config"]["image_size"][0] if isinstance(config["vision_config"].get("image_size"), list) \
        else config["vision_config"].get("image_size", 448)
    sample = {"input_ids": torch.zeros(p.seq_len, dtype=torch.long), "labels": torch.zeros(p.seq_len, dtype=torch.long),
              "pixel_values": torch.empty(tiles, 3, side, side)}
    backend.encoded = [sample] * max(2, p.calibration_samples)  # calibration draws that many samples
    backend._packer = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0))


def _lora_dtype(name: str, tensor: torch.Tensor) -> torch.dtype | None:
    return torch.float32 if ".lora_" in name else None  # train(): trainable weights in float32
