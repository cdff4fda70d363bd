"""What the planner knows about FLUX.2 [dev] / [klein] (registered as "flux2" in pipelines/runner/registry.py
PLANNING): how its blocks spend activation memory (`flux2_architecture`), its text encoder as a prompt encoder,
and how to read and build a FLUX.2 model on meta.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from emloc.architecture import ArchitectureSpec, BlockStack, Component
from pipelines.diffusion_common.planning import read_pipeline, transformer_class_of, vae_component
from pipelines.runner.planning import Fetch, Planning, component, on_meta, streamed_params

from . import layout as flux2_layout

TRANSFORMER = "Flux2Transformer2DModel"
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")

# FLUX.2 (SwiGLU MLPs of ratio 3, q/k RMSNorm and rotary in float32), measured the same way in bf16 at h = 128 and
# 256: a double block saves 38.2·h bytes per token, a single block 40.2·h, each + 12 bytes per head; split here as
# 11h (double) / 12h (single) in the dtype and 4h + 3·heads in float32 (within 0.5% of both widths).
FLUX2_DOUBLE_SAVED_PER_H = 11
FLUX2_SINGLE_SAVED_PER_H = 12


def flux2_architecture(transformer_config: dict, components: tuple[Component, ...] = (), text_tokens: int = 512
                       ) -> ArchitectureSpec:
    """FLUX.2: 128-channel tokens of 2x2-patched 32-channel latents, (H/16)(W/16) of them, and 512 text tokens
    through the double blocks (two streams), then one concatenated stream through the single blocks."""
    heads, head_dim = transformer_config["num_attention_heads"], transformer_config["attention_head_dim"]
    h = heads * head_dim
    m = int(h * transformer_config.get("mlp_ratio", 3.0))
    fp32 = 4 * h + 3 * heads
    text_width = transformer_config.get("joint_attention_dim", 15360)
    return ArchitectureSpec(
        family="flux",
        # widest: ff.linear_in's SwiGLU input (2m); in a single block to_qkv_mlp_proj's output (3h + 2m)
        stacks=(BlockStack("double blocks", "transformer_blocks", h, "all", FLUX2_DOUBLE_SAVED_PER_H * h, fp32,
                           streams=2, widest_per_token=2 * m),
                BlockStack("single blocks", "single_transformer_blocks", h, "all", FLUX2_SINGLE_SAVED_PER_H * h, fp32,
                           widest_per_token=3 * h + 2 * m)),
        default_compress=flux2_layout.COMPRESS, default_lora_targets=flux2_layout.LORA_TARGETS,
        text_tokens=text_tokens, pixels_per_token=16, components=components,
        text_width=text_width,
        lora_input_groups=(r"attn\.(to_q|to_k|to_v)", r"attn\.(add_q_proj|add_k_proj|add_v_proj)"),
        lora_inputs_saved=(r"attn\.(to_out\.0|to_add_out)",), shared_fp32_per_token=2 * head_dim,
        # a calibration batch on the device: packed latents and prompt embeddings, 4 int64 position ids per token
        pass_inputs=(("image", transformer_config.get("in_channels", 128), 32), ("text", text_width, 32)))


def _text_encoder_component(config: dict) -> Component:
    """A FLUX.2 text encoder (Mistral3 for [dev], Qwen3 for [klein]) as a prompt encoder, built on meta: per token
    it keeps every layer's hidden state (the pipeline stacks three of them) and one layer's MLP working set."""
    import transformers
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    model_class = getattr(transformers, (config.get("architectures") or ["AutoModel"])[0])
    built = AutoConfig.for_model(config["model_type"], **fields)
    model = on_meta(lambda: model_class(built))
    text = getattr(built, "text_config", built)
    working = (text.num_hidden_layers + 1) * text.hidden_size + 3 * text.intermediate_size
    return component("text_encoder", model, prompt_encoder=True, working_per_token=working,
                     streamed_params=streamed_params(model))


def build(bundle: dict) -> tuple[nn.Module, ArchitectureSpec]:
    """The FLUX.2 transformer on meta, its text encoder (a prompt encoder) and VAE counted as components."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    components, text_tokens = bundle["components"], int(bundle.get("max_sequence_length", 512))
    config = {k: v for k, v in components["transformer"].items() if not k.startswith("_")}
    transformer = on_meta(lambda: Flux2Transformer2DModel.from_config(config))
    extras = []
    if "text_encoder" in components:
        extras.append(_text_encoder_component(components["text_encoder"]))
    if "vae" in components:
        extras.append(vae_component(AutoencoderKLFlux2, components["vae"]))
    entry = sum(p.numel() for name in flux2_layout.PASS_ENTRY for p in transformer.get_submodule(name).parameters())
    return transformer, replace(flux2_architecture(config, tuple(extras), text_tokens), entry_params=entry,
                                entry_kept=True)


def read(fetch: Fetch, name: str) -> dict | None:
    """A FLUX.2 pipeline or transformer (every FLUX.2 text encoder takes 512 tokens)."""
    bundle = read_pipeline(fetch, name, TRANSFORMER, COMPONENTS)
    if bundle is not None:
        bundle["max_sequence_length"] = 512
    return bundle


def claims(bundle: dict) -> bool:
    return bundle.get("family") == "flux" and transformer_class_of(bundle) == TRANSFORMER


PLANNING = Planning(read=read, claims=claims, build=build, reads=f"FLUX.2 (diffusers {TRANSFORMER})")
