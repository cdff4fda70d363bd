"""The real models the app offers, and their weightless (`meta` device) builds for the VRAM planner.

Offline, a catalogue id is built from its config in assets/models/<name>.json (copied from the hub's
config.json files, see shared/models/README.md). A local folder works too (an InternVL folder with
config.json, a diffusers FLUX folder with model_index.json, or a FluxTransformer2DModel folder), and a
hub id outside the catalogue when the hub is reachable (config files only, never weights).

The ArchitectureSpec of each family states how its blocks spend activation memory (emloc/memory.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from emloc.architecture import ArchitectureSpec, BlockStack, Component
from pipelines.flux.backend import DOUBLE_LORA, SINGLE_LORA
from pipelines.flux2 import layout as flux2_layout
from pipelines.internvl.backend import LANGUAGE_LINEARS, LORA_TARGETS, VISION_LINEARS
from pipelines.runner.registry import ROOT
from pipelines.runner.streaming import block_names

log = logging.getLogger(__name__)

ASSETS = ROOT / "assets" / "models"
FAMILIES = ("flux", "vlm")

# Saved activations per token and block, measured with torch 2.13 saved-tensor hooks (bf16, frozen base, SDPA,
# LoRA through emloc.attach_lora), the LoRA inputs' float32 copies counted apart (emloc/memory.py):
# FLUX double block 10·h elements in the dtype, single block 9·h; both 2h + 3·heads + 2·head_dim in float32
# (q/k RMSNorm inputs, attention log-sum-exp, rotary cos/sin). At h = 3072 with LoRA r = 16 on all linears
# that is 194 and 188 KiB per token.
FLUX_DOUBLE_SAVED_PER_H = 10
FLUX_SINGLE_SAVED_PER_H = 9
VAE_LIVE_TENSORS = 6  # VAE decode working set: ~6 live tensors of block_out_channels[0] channels per output pixel
# The layers each backend compresses and trains, taken from the backends so that the plan is the run's.
FLUX_COMPRESS = r"(transformer_blocks|single_transformer_blocks)\.\d+\..+"  # as FluxBackend.default_rules
FLUX_LORA = (rf"transformer_blocks\.\d+\.({DOUBLE_LORA})", rf"single_transformer_blocks\.\d+\.({SINGLE_LORA})")
# FLUX.2 (SwiGLU MLPs of ratio 3, q/k RMSNorm and rotary in float32), measured the same way in bf16 at h = 128 and
# 256: a double block saves 38.2·h bytes per token, a single block 40.2·h, each + 12 bytes per head; split here as
# 11h (double) / 12h (single) in the dtype and 4h + 3·heads in float32 (within 0.5% of both widths).
FLUX2_DOUBLE_SAVED_PER_H = 11
FLUX2_SINGLE_SAVED_PER_H = 12


@dataclass(frozen=True)
class CatalogueEntry:
    """A model the app offers by name."""

    model_id: str  # hub id
    display_name: str
    family: str  # "flux" or "vlm"
    published_params: float  # parameters of the trained model as published (FLUX: the transformer)
    asset: Path  # the offline config bundle
    backend: str = ""  # the run backend that trains it ("flux2" for FLUX.2); "": the family's own


@dataclass
class MetaModel:
    """A weightless build of a model and how it spends memory."""

    model_id: str
    display_name: str
    family: str
    model: nn.Module  # on the meta device: the transformer (FLUX) or the whole InternVL
    arch: ArchitectureSpec
    backend: str = ""  # the run backend that trains it: "flux", "flux2" or "vlm"


def catalogue() -> dict[str, CatalogueEntry]:
    """Every model in assets/models/, by hub id."""
    entries = []
    for path in ASSETS.glob("*.json"):
        doc = json.loads(path.read_text())
        entries.append(CatalogueEntry(doc["id"], doc["display_name"], doc["family"], float(doc["published_params"]), path,
                                      doc.get("backend", doc["family"])))
    return {e.model_id: e for e in sorted(entries, key=lambda e: (e.family, e.published_params, e.model_id))}


def _find_entry(model_id: str) -> CatalogueEntry | None:
    entries = catalogue()
    if model_id in entries:
        return entries[model_id]
    short = {e.model_id.split("/")[-1].lower(): e for e in entries.values()}
    return short.get(model_id.lower())


def _largest_piece(model: nn.Module) -> int:
    """Parameters of the largest unit streamed at once: a child of a ModuleList, or one module's own weights."""
    best = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, nn.ModuleList):
            own = max([own, *(sum(p.numel() for p in c.parameters()) for c in module.children())])
        best = max(best, own)
    return best


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flux_architecture(transformer_config: dict, components: tuple[Component, ...] = (), text_tokens: int = 512
                      ) -> ArchitectureSpec:
    """FLUX: image tokens (H/16)(W/16) and text tokens flow through 19 double and 38 single blocks."""
    heads, head_dim = transformer_config["num_attention_heads"], transformer_config["attention_head_dim"]
    h = heads * head_dim
    fp32 = 2 * h + 3 * heads + 2 * head_dim
    return ArchitectureSpec(
        family="flux",
        # widest: the MLP hidden (4h); in a single block the attention output and the MLP hidden concatenated (5h)
        stacks=(BlockStack("double blocks", "transformer_blocks", h, "all", FLUX_DOUBLE_SAVED_PER_H * h, fp32, streams=2,
                           widest_per_token=4 * h),
                BlockStack("single blocks", "single_transformer_blocks", h, "all", FLUX_SINGLE_SAVED_PER_H * h, fp32,
                           widest_per_token=5 * h)),
        default_compress=(FLUX_COMPRESS,), default_lora_targets=FLUX_LORA,
        text_tokens=text_tokens, pixels_per_token=16, components=components,
        text_width=transformer_config.get("joint_attention_dim", 4096),
        lora_input_groups=(r"attn\.(to_q|to_k|to_v)|proj_mlp", r"attn\.(add_q_proj|add_k_proj|add_v_proj)"),
        lora_inputs_saved=(r"attn\.(to_out\.0|to_add_out)",), shared_fp32_per_token=2 * head_dim)


def flux2_architecture(transformer_config: dict, components: tuple[Component, ...] = (), text_tokens: int = 512
                       ) -> ArchitectureSpec:
    """FLUX.2: 128-channel tokens of 2x2-patched 32-channel latents, (H/16)(W/16) of them, and 512 text tokens
    through the double blocks (two streams), then one concatenated stream through the single blocks."""
    heads, head_dim = transformer_config["num_attention_heads"], transformer_config["attention_head_dim"]
    h = heads * head_dim
    m = int(h * transformer_config.get("mlp_ratio", 3.0))
    fp32 = 4 * h + 3 * heads
    return ArchitectureSpec(
        family="flux",
        # widest: ff.linear_in's SwiGLU input (2m); in a single block to_qkv_mlp_proj's output (3h + 2m)
        stacks=(BlockStack("double blocks", "transformer_blocks", h, "all", FLUX2_DOUBLE_SAVED_PER_H * h, fp32,
                           streams=2, widest_per_token=2 * m),
                BlockStack("single blocks", "single_transformer_blocks", h, "all", FLUX2_SINGLE_SAVED_PER_H * h, fp32,
                           widest_per_token=3 * h + 2 * m)),
        default_compress=flux2_layout.COMPRESS, default_lora_targets=flux2_layout.LORA_TARGETS,
        text_tokens=text_tokens, pixels_per_token=16, components=components,
        text_width=transformer_config.get("joint_attention_dim", 15360),
        lora_input_groups=(r"attn\.(to_q|to_k|to_v)", r"attn\.(add_q_proj|add_k_proj|add_v_proj)"),
        lora_inputs_saved=(r"attn\.(to_out\.0|to_add_out)",), shared_fp32_per_token=2 * head_dim)


def _text_encoder_component(config: dict) -> Component:
    """A FLUX.2 text encoder (Mistral3 for [dev], Qwen3 for [klein]) as a prompt encoder, built on meta: per token
    it keeps every layer's hidden state (the pipeline stacks three of them) and one layer's MLP working set."""
    import transformers
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    model_class = getattr(transformers, (config.get("architectures") or ["AutoModel"])[0])
    built = AutoConfig.for_model(config["model_type"], **fields)
    model = _on_meta(lambda: model_class(built))
    text = getattr(built, "text_config", built)
    working = (text.num_hidden_layers + 1) * text.hidden_size + 3 * text.intermediate_size
    return Component("text_encoder", _params(model), _largest_piece(model), prompt_encoder=True,
                     working_per_token=working, streamed_params=_streamed_params(model))


def _streamed_params(model: nn.Module) -> int:
    """Parameters a text encoder streamed as the run streams it (pipelines.runner.streaming) holds at once: its
    blocks are read one at a time, everything outside them (embeddings, LM head) is held throughout."""
    blocks = [sum(p.numel() for p in model.get_submodule(name).parameters()) for name in block_names(model)]
    return _params(model) - sum(blocks) + max(blocks, default=0)


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
    side = vision.get("image_size", [448, 448])[0] // vision.get("patch_size", [14, 14])[0]
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
        shared_per_token=2 * head_dim)


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _build_flux2(components: dict[str, dict], text_tokens: int) -> tuple[nn.Module, ArchitectureSpec]:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    config = {k: v for k, v in components["transformer"].items() if not k.startswith("_")}
    transformer = _on_meta(lambda: Flux2Transformer2DModel.from_config(config))
    extras = []
    if "text_encoder" in components:
        extras.append(_text_encoder_component(components["text_encoder"]))
    if "vae" in components:
        extras.append(_vae_component(AutoencoderKLFlux2, components["vae"]))
    return transformer, flux2_architecture(config, tuple(extras), text_tokens)


def _vae_component(cls: type, config: dict) -> Component:
    """A VAE of class `cls` built on meta from its config: its size and its decode working set per pixel."""
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = _on_meta(lambda: cls.from_config(values))
    return Component("vae", _params(vae), _largest_piece(vae), VAE_LIVE_TENSORS * values["block_out_channels"][0])


def _build_flux(components: dict[str, dict], text_tokens: int) -> tuple[nn.Module, ArchitectureSpec]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    if components["transformer"].get("_class_name") == "Flux2Transformer2DModel":
        return _build_flux2(components, text_tokens)

    config = {k: v for k, v in components["transformer"].items() if not k.startswith("_")}
    transformer = _on_meta(lambda: FluxTransformer2DModel.from_config(config))
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
                model = _on_meta(lambda: make(components[name]))
                width = model.config.hidden_size
                ff = getattr(model.config, "d_ff", None) or model.config.intermediate_size
                scores = 3 * model.config.num_heads * text_tokens if name == "text_encoder_2" else 0
                held = _streamed_params(model) if name == "text_encoder_2" else _params(model)
                extras.append(Component(name, _params(model), _largest_piece(model), prompt_encoder=True,
                                        working_per_token=2 * width + 2 * ff + scores, streamed_params=held))
    if "vae" in components:
        extras.append(_vae_component(AutoencoderKL, components["vae"]))
    return transformer, flux_architecture(config, tuple(extras), text_tokens)


def _build_vlm(config: dict) -> tuple[nn.Module, ArchitectureSpec]:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    model = _on_meta(lambda: InternVLForConditionalGeneration(InternVLConfig(**fields)))
    return model, vlm_architecture(config)


def _read_folder(folder: Path) -> dict:
    """A bundle {"family", "config" | "components", "max_sequence_length"} from a local model folder."""
    index = folder / "model_index.json"
    if index.is_file():
        components = {name: json.loads((folder / name / "config.json").read_text())
                      for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
                      if (folder / name / "config.json").is_file()}
        if "transformer" not in components:
            raise ValueError(f"{folder}: model_index.json but no transformer/config.json; is it a FLUX pipeline folder?")
        return {"family": "flux", "components": components}
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has neither config.json nor model_index.json; point --model at a model folder")
    bundle = _bundle_from_config(json.loads(config_file.read_text()), str(folder))
    processor = folder / "processor_config.json"  # the image tokens per tile the processor really writes
    if bundle["family"] == "vlm" and processor.is_file():
        tokens = json.loads(processor.read_text()).get("image_seq_length")
        if isinstance(tokens, int) and tokens > 0:
            bundle["config"] = {**bundle["config"], "image_seq_length": tokens}
    return bundle


def _bundle_from_config(config: dict, where: str) -> dict:
    if config.get("_class_name") in ("FluxTransformer2DModel", "Flux2Transformer2DModel"):
        return {"family": "flux", "components": {"transformer": config}}
    if config.get("model_type") == "internvl":
        return {"family": "vlm", "config": config}
    raise ValueError(f"{where}: not a FLUX.1 / FLUX.2 transformer or a transformers-native InternVL config "
                     f"(model_type {config.get('model_type')!r}); the planner supports {', '.join(FAMILIES)}")


def _read_hub(model_id: str) -> dict:
    """Config files of a hub repository (no weights); fails with a clear message offline."""
    known = ", ".join(catalogue())
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ValueError(f"unknown model {model_id!r}: not in the catalogue ({known}), not a local folder, "
                         "and the hub is offline (HF_HUB_OFFLINE); pass a catalogue id or a folder with config.json")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        try:
            index = json.loads(Path(hf_hub_download(model_id, "model_index.json")).read_text())
        except HfHubHTTPError:
            index = None
        if index is not None:
            components = {name: json.loads(Path(hf_hub_download(model_id, f"{name}/config.json")).read_text())
                          for name in ("transformer", "text_encoder", "text_encoder_2", "vae") if name in index}
            return {"family": "flux", "components": components}
        return _bundle_from_config(json.loads(Path(hf_hub_download(model_id, "config.json")).read_text()), model_id)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        why = ("the hub is unreachable and the config is not cached" if isinstance(err, LocalEntryNotFoundError)
               else f"{type(err).__name__}: no such repository, or it is gated and needs a login")
        raise ValueError(f"unknown model {model_id!r}: not in the catalogue ({known}) and its config could not be "
                         f"read from the hub ({why}); check the id, or pass a local folder with config.json") from None


def meta_model_from_bundle(bundle: dict) -> tuple[nn.Module, ArchitectureSpec]:
    """Build a config bundle (the format of assets/models/*.json) on the meta device.

    flux: {"family": "flux", "components": {"transformer": {...}, "text_encoder": ..., "vae": ...},
    "max_sequence_length": 512}; vlm: {"family": "vlm", "config": {InternVL config.json}}.
    """
    if bundle.get("family") == "flux":
        return _build_flux(bundle["components"], int(bundle.get("max_sequence_length", 512)))
    if bundle.get("family") == "vlm":
        return _build_vlm(bundle["config"])
    raise ValueError(f"unknown model family {bundle.get('family')!r}; expected one of {', '.join(FAMILIES)}")


@functools.lru_cache(maxsize=16)
def load_meta_model(id_or_path: str) -> MetaModel:
    """A catalogue id, a local folder or a hub id, built on the meta device (cached: build once per process)."""
    if not isinstance(id_or_path, str) or not id_or_path.strip():
        raise ValueError("give a model: a catalogue id such as black-forest-labs/FLUX.1-dev, or a local folder")
    entry = _find_entry(id_or_path)
    if entry is not None:
        bundle, model_id, name = json.loads(entry.asset.read_text()), entry.model_id, entry.display_name
    elif Path(id_or_path).expanduser().is_dir():
        folder = Path(id_or_path).expanduser()
        bundle, model_id, name = _read_folder(folder), str(folder), folder.name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", id_or_path):
        bundle, model_id, name = _read_hub(id_or_path), id_or_path, id_or_path.split("/")[-1]
    else:
        raise ValueError(f"unknown model {id_or_path!r}: not in the catalogue ({', '.join(catalogue())}) "
                         "and not a folder; pass a catalogue id, a hub id (owner/name) or a local folder")
    if bundle["family"] == "flux" and "max_sequence_length" not in bundle:
        bundle["max_sequence_length"] = 256 if "schnell" in model_id.lower() else 512
    model, arch = meta_model_from_bundle(bundle)
    log.info("built %s on the meta device", model_id)
    return MetaModel(model_id, name, bundle["family"], model, arch, backend_of(bundle))


def backend_of(bundle: dict) -> str:
    """The run backend of a config bundle: "flux2" for a Flux2Transformer2DModel, else the family's own."""
    transformer = bundle.get("components", {}).get("transformer", {})
    if bundle.get("backend"):
        return bundle["backend"]
    return "flux2" if transformer.get("_class_name") == "Flux2Transformer2DModel" else bundle["family"]
