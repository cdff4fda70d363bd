"""What the planner knows about InternVL (registered as "vlm" in pipelines/runner/registry.py PLANNING): how its
vision tower and decoder spend activation memory (`vlm_architecture`), and how to read and build one on meta.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from emloc.architecture import ArchitectureSpec, BlockStack
from pipelines.runner.planning import Fetch, Planning, on_meta

from .backend import LANGUAGE_LINEARS, LORA_TARGETS, VISION_LINEARS
from .streaming import EMBEDDERS, MERGERS


def vlm_architecture(config: dict) -> ArchitectureSpec:
    """InternVL: image tiles through the vision tower, then the whole sequence through the Qwen2 / Qwen3 decoder.

    Saved per token and layer (SDPA, frozen base), counted op by op and checked with saved-tensor hooks:
    decoder 2q + 2kv + 3i + 2·head_dim in the dtype (q, attention output, k, v, gate, up, SiLU output, rotary
    cos/sin) and 2h + heads + 2 in float32 (two RMSNorm inputs, log-sum-exp, two rstd), Qwen3 adding its q/k
    norms' float32 inputs and rstd (q + kv + heads + kv heads); vision layer 9h + 2i
    (LayerNorms, q, k, v, attention output, projection input, layer scales, fc1 input, GELU input and output;
    the vision tower is frozen, so only one layer's working set counts).
    """
    text, vision = config["text_config"], config["vision_config"]
    h, i = text["hidden_size"], text["intermediate_size"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or h // heads  # Qwen3 sets it apart (InternVL3.5-1B: 16 heads of 128 at h 1024)
    q = heads * head_dim  # width of q and of the attention output
    kv_heads = text.get("num_key_value_heads", heads)
    kv = kv_heads * head_dim  # width of k (and of v)
    # Qwen3 RMS-normalises q and k per head before the rotary embedding: each norm keeps its float32 input and rstd
    qk_norm = q + kv + heads + kv_heads if text.get("model_type") == "qwen3" else 0
    hv, iv = vision["hidden_size"], vision["intermediate_size"]
    pixels = vision.get("image_size", [448, 448])[0]
    side = pixels // vision.get("patch_size", [14, 14])[0]
    return ArchitectureSpec(
        family="vlm",
        stacks=(BlockStack("vision layers", "model.vision_tower.encoder.layer", hv, "vision", 9 * hv + 2 * iv,
                           widest_per_token=iv),
                BlockStack("language layers", "model.language_model.layers", h, "text", 2 * q + 2 * kv + 3 * i + 2 * head_dim,
                           2 * h + heads + 2 + qk_norm, kv_per_token=2 * kv, widest_per_token=i)),
        default_compress=(LANGUAGE_LINEARS, VISION_LINEARS), default_lora_targets=(LORA_TARGETS,),
        vision_tokens_per_tile=side * side + 1,
        image_tokens_per_tile=int(config.get("image_seq_length", round((side * config.get("downsample_ratio", 0.5)) ** 2))),
        vocab_size=text["vocab_size"], quant_skip=(r"lm_head",),
        lora_input_groups=(r"self_attn\.(q|k|v)_proj", r"mlp\.(gate|up)_proj"), lora_inputs_saved=(r"self_attn\.o_proj",),
        shared_per_token=2 * head_dim,
        # a calibration batch on the device: its tiles' pixel values in float32 (3 x 448² per tile of side² + 1
        # vision tokens), its token ids and attention mask (int64)
        pass_inputs=(("vision", 0, 4 * 3 * pixels ** 2 / (side * side + 1)), ("text", 0, 16)))


def build(bundle: dict) -> tuple[nn.Module, ArchitectureSpec]:
    """The whole InternVLForConditionalGeneration on meta."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = bundle["config"]
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    model = on_meta(lambda: InternVLForConditionalGeneration(InternVLConfig(**fields)))
    # the streamed pass reads the embedders as the samples enter and the projector as they reach the language
    # layers, and frees both when the next block runs (streaming.py)
    entry = sum(p.numel() for name in (*EMBEDDERS, *MERGERS) for p in model.get_submodule(name).parameters())
    return model, replace(vlm_architecture(config), entry_params=entry, entry_kept=False)


def read(fetch: Fetch, name: str) -> dict | None:
    """A transformers-native InternVL (config.json model_type "internvl"), with the image tokens per tile its
    processor really writes (processor_config.json) when it has one."""
    if fetch("model_index.json") is not None:
        return None  # a diffusers pipeline
    config = fetch("config.json")
    if config is None or config.get("model_type") != "internvl":
        return None
    processor = fetch("processor_config.json") or {}
    tokens = processor.get("image_seq_length")
    if isinstance(tokens, int) and tokens > 0:
        config = {**config, "image_seq_length": tokens}
    return {"family": "vlm", "config": config}


def claims(bundle: dict) -> bool:
    return bundle.get("family") == "vlm"


PLANNING = Planning(read=read, claims=claims, build=build,
                    reads='InternVL (a transformers-native config.json, model_type "internvl")')
