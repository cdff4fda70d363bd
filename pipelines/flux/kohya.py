"""The FLUX.1 LoRA in the kohya / sd-scripts key style, the one ComfyUI, Forge and kohya_ss load.

Those tools name layers after the original FLUX.1 model (black-forest-labs' `flux/model.py`), not after
diffusers: `double_blocks.{i}.img_attn.qkv` is one linear whose output rows are diffusers' `to_q`, `to_k`
and `to_v` stacked, and `single_blocks.{i}.linear1` stacks `to_q`, `to_k`, `to_v` and `proj_mlp`. A key
is `lora_unet_<native module, dots as underscores>` with `.lora_down.weight` (r x in), `.lora_up.weight`
(out x r) and `.alpha`; the update is `ΔW = (alpha / r) · up @ down`.

Joining parts whose LoRAs differ (after correction every part has its own A) is exact at rank Σ r_i, the
way sd-scripts converts a split-qkv LoRA: `down = [A_q; A_k; A_v]` and `up = blockdiag(B_q, B_k, B_v)`, so
`up @ down = [B_q A_q; B_k A_k; B_v A_v]`, each part's rows of the joined weight. When every part shares one
A, the join keeps rank r: `down = A`, `up = [B_q; B_k; B_v]`. The LoRA scaling is folded into `up` and
`alpha` is written equal to each key's rank, so every loader applies scale 1 and the file means what the
diffusers file means.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

KOHYA_FILE = "flux_lora_kohya.safetensors"

# diffusers module inside a double block -> (native module, its place among the joined parts)
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0), "ff.net.0.proj": ("img_mlp.0", 0), "ff.net.2": ("img_mlp.2", 0),
    "norm1.linear": ("img_mod.lin", 0),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_add_out": ("txt_attn.proj", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0),
    "norm1_context.linear": ("txt_mod.lin", 0),
}
SINGLE_BLOCK = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0), "norm.linear": ("modulation.lin", 0),
}
OUTSIDE_BLOCKS = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # rows (scale, shift) in diffusers, (shift, scale) native
}
JOINED_PARTS = {"img_attn.qkv": 3, "txt_attn.qkv": 3, "linear1": 4}
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}
BLOCK = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")


def native_module(module: str) -> tuple[str, int]:
    """A diffusers FLUX.1 transformer module -> (its native FLUX.1 module, its part index within that module)."""
    match = BLOCK.match(module)
    if match is None:
        if module in OUTSIDE_BLOCKS:
            return OUTSIDE_BLOCKS[module], 0
    else:
        table, prefix = (DOUBLE_BLOCK, "double_blocks") if match["kind"] == "transformer_blocks" \
            else (SINGLE_BLOCK, "single_blocks")
        if match["rest"] in table:
            native, part = table[match["rest"]]
            return f"{prefix}.{match['index']}.{native}", part
    raise ValueError(f"the LoRA layer {module!r} has no name in the kohya / ComfyUI FLUX format")


def kohya_name(native: str) -> str:
    """`double_blocks.0.img_attn.qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`."""
    return "lora_unet_" + native.replace(".", "_")


def kohya_lora_state(factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     out_features: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """`{diffusers module: (A, B)}` with the scaling already in B -> the kohya state dict.

    `out_features` (diffusers module -> rows of its weight) sizes the zero rows of a joined module's part
    that was not trained; it is needed only when such a part is missing.
    """
    groups: dict[str, dict[int, tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for module, (a, b) in factors.items():
        native, part = native_module(module)
        groups.setdefault(native, {})[part] = (module, a.detach().float().cpu(), b.detach().float().cpu())
    state = {}
    for native, parts in sorted(groups.items()):
        count = JOINED_PARTS.get(_inside_block(native), 1)
        down, up = _joined(native, parts, count, out_features or {})
        if native in SWAPPED_HALVES:  # diffusers' rows are (scale, shift), the native layer's (shift, scale)
            scale, shift = up.chunk(2, dim=0)
            up = torch.cat([shift, scale], dim=0)
        name = kohya_name(native)
        state[f"{name}.lora_down.weight"] = down.contiguous()  # (rank, in)
        state[f"{name}.lora_up.weight"] = up.contiguous()  # (out, rank)
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha / rank = 1: the scale is in up
    return state


def _joined(native: str, parts: dict, count: int, out_features: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one native module from its parts' (A, B), exact: up @ down stacks every part's B A."""
    if count == 1:
        _, a, b = parts[0]
        return a, b
    present = [parts[i] for i in range(count) if i in parts]
    if len(present) == count and all(torch.equal(p[1], present[0][1]) for p in present):
        return present[0][1], torch.cat([p[2] for p in present], dim=0)  # one shared A: rank r
    blocks = []
    for i in range(count):
        if i in parts:
            blocks.append(parts[i][2])
            continue
        sibling = present[0][0]
        missing = _sibling_name(sibling, native, i)
        if missing not in out_features:
            raise ValueError(f"{native}: part {missing!r} has no LoRA and its size is unknown; pass out_features")
        blocks.append(torch.zeros(out_features[missing], 0))  # its rows of the joined weight stay as they are
    down = torch.cat([p[1] for p in present], dim=0)  # (Σ r_i, in)
    return down, torch.block_diag(*blocks)  # (Σ out_i, Σ r_i)


def _inside_block(native: str) -> str:
    """`double_blocks.0.img_attn.qkv` -> `img_attn.qkv`; names outside the blocks stay as they are."""
    return native.split(".", 2)[2] if native.startswith(("double_blocks.", "single_blocks.")) else native


def _sibling_name(module: str, native: str, part: int) -> str:
    """The diffusers name of part `part` of the joined `native` module that `module` belongs to."""
    block = BLOCK.match(module)
    table = DOUBLE_BLOCK if block["kind"] == "transformer_blocks" else SINGLE_BLOCK
    rest = next(k for k, (n, p) in table.items() if n == _inside_block(native) and p == part)
    return f"{block['kind']}.{block['index']}.{rest}"


def write_kohya_lora(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], folder: Path,
                     out_features: dict[str, int] | None = None, base_model: str = "") -> Path:
    """Write `folder/flux_lora_kohya.safetensors` (the file for ComfyUI, Forge and kohya_ss)."""
    from safetensors.torch import save_file

    state = kohya_lora_state(factors, out_features)  # a layer with no kohya name fails here, before any file
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KOHYA_FILE
    metadata = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                "emloc_note": "scale folded into lora_up; alpha equals each key's rank"}
    if base_model:
        metadata["emloc_base_model"] = str(base_model)
    save_file(state, str(path), metadata=metadata)
    return path
