"""What the planner knows about FLUX.1 (registered as "flux" in pipelines/runner/registry.py PLANNING): how its
blocks spend activation memory (`flux_architecture`), and how to read and build a FLUX.1 model on meta.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from emloc.architecture import ArchitectureSpec, BlockStack, Component
from pipelines.diffusion_common.planning import read_pipeline, transformer_class_of, vae_component
from pipelines.runner.planning import Fetch, Planning, component, on_meta, param_count, streamed_params

from .backend import DOUBLE_LORA, PASS_ENTRY, SINGLE_LORA

TRANSFORMER = "FluxTransformer2DModel"
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")

# Saved activations per token and block, measured with torch 2.13 saved-tensor hooks (bf16, frozen base, SDPA,
# LoRA through emloc.attach_lora), the LoRA inputs' float32 copies counted apart (emloc/memory.py):
# FLUX double block 10·h elements in the dtype, single block 9·h; both 2h + 3·heads + 2·head_dim in float32
# (q/k RMSNorm inputs, attention log-sum-exp, rotary cos/sin). At h = 3072 with LoRA r = 16 on all linears
# that is 194 and 188 KiB per token.
FLUX_DOUBLE_SAVED_PER_H = 10
FLUX_SINGLE_SAVED_PER_H = 9
# The layers each backend compresses and trains, taken from the backends so that the plan is the run's.
FLUX_COMPRESS = r"(transformer_blocks|single_transformer_blocks)\.\d+\..+"  # as FluxBackend.default_rules
FLUX_LORA = (rf"transformer_blocks\.\d+\.({DOUBLE_LORA})", rf"single_transformer_blocks\.\d+\.({SINGLE_LORA})")


def flux_architecture(transformer_config: dict, components: tuple[Component, ...] = (), text_tokens: int = 512
                      ) -> ArchitectureSpec:
    """FLUX: image tokens (H/16)(W/16) and text tokens flow through 19 double and 38 single blocks."""
    heads, head_dim = transformer_config["num_attention_heads"], transformer_config["attention_head_dim"]
    h = heads * head_dim
    fp32 = 2 * h + 3 * heads + 2 * head_dim
    text_width = transformer_config.get("joint_attention_dim", 4096)
    return ArchitectureSpec(
        family="flux",
        # widest: the MLP hidden (4h); in a single block the attention output and the MLP hidden concatenated (5h)
        stacks=(BlockStack("double blocks", "transformer_blocks", h, "all", FLUX_DOUBLE_SAVED_PER_H * h, fp32, streams=2,
                           widest_per_token=4 * h),
                BlockStack("single blocks", "single_transformer_blocks", h, "all", FLUX_SINGLE_SAVED_PER_H * h, fp32,
                           widest_per_token=5 * h)),
        default_compress=(FLUX_COMPRESS,), default_lora_targets=FLUX_LORA,
        text_tokens=text_tokens, pixels_per_token=16, components=components,
        text_width=text_width,
        lora_input_groups=(r"attn\.(to_q|to_k|to_v)|proj_mlp", r"attn\.(add_q_proj|add_k_proj|add_v_proj)"),
        lora_inputs_saved=(r"attn\.(to_out\.0|to_add_out)",), shared_fp32_per_token=2 * head_dim,
        # a calibration batch on the device: packed latents and prompt embeddings, 3 position ids per token
        pass_inputs=(("image", transformer_config.get("in_channels", 64) + 3, 0), ("text", text_width + 3, 0)))


def build(bundle: dict) -> tuple[nn.Module, ArchitectureSpec]:
    """The FLUX.1 transformer on meta, its CLIP and T5 text encoders and VAE counted as components."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    components, text_tokens = bundle["components"], int(bundle.get("max_sequence_length", 512))
    config = {k: v for k, v in components["transformer"].items() if not k.startswith("_")}
    transformer = on_meta(lambda: FluxTransformer2DModel.from_config(config))
    extras = []
    if "text_encoder" in components or "text_encoder_2" in components:
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        # prompt encoders: the cache stage (and a preview of a prompt typed later) runs them once, before any
        # transformer is on the device, then frees them. CLIP is held whole; T5-XXL streams block by block
        # (FluxBackend._pipeline), holding its embeddings and one block. Per token one block's working set:
        # its input and output, the MLP's hidden (d_ff) twice, and T5's eager attention scores (heads x tokens) with
        # their float32 softmax (3 elements in the dtype)
        for name, make in (("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig(**c))),
                           ("text_encoder_2", lambda c: T5EncoderModel(T5Config(**c)))):
            if name in components:
                model = on_meta(lambda: make(components[name]))
                width = model.config.hidden_size
                ff = getattr(model.config, "d_ff", None) or model.config.intermediate_size
                scores = 3 * model.config.num_heads * text_tokens if name == "text_encoder_2" else 0
                held = streamed_params(model) if name == "text_encoder_2" else param_count(model)
                extras.append(component(name, model, prompt_encoder=True,
                                        working_per_token=2 * width + 2 * ff + scores, streamed_params=held))
    if "vae" in components:
        extras.append(vae_component(AutoencoderKL, components["vae"]))
    entry = sum(p.numel() for name in PASS_ENTRY for p in transformer.get_submodule(name).parameters())
    return transformer, replace(flux_architecture(config, tuple(extras), text_tokens), entry_params=entry,
                                entry_kept=True)


def read(fetch: Fetch, name: str) -> dict | None:
    """A FLUX.1 pipeline or transformer; [schnell] was distilled for 256 T5 tokens, [dev] for 512."""
    bundle = read_pipeline(fetch, name, TRANSFORMER, COMPONENTS)
    if bundle is not None:
        bundle["max_sequence_length"] = 256 if "schnell" in name.lower() else 512
    return bundle


def claims(bundle: dict) -> bool:
    # a transformer config without a class name is taken for FLUX.1 (the first diffusers family)
    return bundle.get("family") == "flux" and transformer_class_of(bundle) in (None, TRANSFORMER)


PLANNING = Planning(read=read, claims=claims, build=build, reads=f"FLUX.1 (diffusers {TRANSFORMER})")
