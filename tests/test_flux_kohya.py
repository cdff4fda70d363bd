"""The kohya / ComfyUI-style FLUX LoRA file means what the diffusers file means, in the tools that read it.

Three readers: diffusers' kohya converter (`FluxPipeline.load_lora_weights` / `lora_state_dict`), and
ComfyUI's key mapping for FLUX LoRAs, written out below from ComfyUI's public source.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from flux_fixtures import build_tiny_flux
from pipelines.flux.export import diffusers_lora_state, scaled_factors, write_diffusers_lora, write_kohya_export
from pipelines.flux.kohya import KOHYA_FILE, kohya_lora_state

RANK, ALPHA = 4, 8.0  # scaling s = 2: a loader that ignored it would be off by 2x

# ComfyUI, comfy/utils.py `flux_to_diffusers`: each diffusers weight is rows [offset, offset + size) of a weight of
# the native FLUX model (h = hidden size; the single blocks' MLP is 4h wide). `swap` marks the one layer whose two
# halves (scale, shift) are stored the other way round. comfy/lora.py `model_lora_keys_unet` then maps the kohya
# name `lora_unet_<native weight name without .weight, dots as underscores>` onto every native weight
# `diffusion_model.<name>.weight`, and `load_lora` reads `<name>.lora_up.weight`, `.lora_down.weight`, `.alpha`.
def comfyui_flux_map(double: int, single: int, h: int) -> dict[str, tuple[str, int, int, bool]]:
    """diffusers module -> (native module, row offset, rows, swap halves)."""
    rows: dict[str, tuple[str, int, int, bool]] = {}
    for i in range(double):
        d, n = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, parts in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for j, part in enumerate(parts):
                rows[f"{d}.attn.{part}"] = (f"{n}.{stream}_attn.qkv", j * h, h, False)
        for ours, native in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                             ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                             ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                             ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            rows[f"{d}.{ours}"] = (f"{n}.{native}", 0, -1, False)
    for i in range(single):
        d, n = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            rows[f"{d}.{part}"] = (f"{n}.linear1", j * h, h, False)
        rows[f"{d}.proj_mlp"] = (f"{n}.linear1", 3 * h, 4 * h, False)
        rows[f"{d}.norm.linear"] = (f"{n}.modulation.lin", 0, -1, False)
        rows[f"{d}.proj_out"] = (f"{n}.linear2", 0, -1, False)
    for ours, native in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"),
                         ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                         ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                         ("context_embedder", "txt_in"),
                         ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                         ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                         ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                         ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")):
        rows[ours] = (native, 0, -1, False)
    rows["norm_out.linear"] = ("final_layer.adaLN_modulation.1", 0, -1, True)
    return rows


def comfyui_kohya_names(double: int, single: int, h: int) -> set[str]:
    """The `lora_unet_...` names ComfyUI maps for a FLUX model of this depth (model_lora_keys_unet)."""
    return {"lora_unet_" + native.replace(".", "_") for native, *_ in comfyui_flux_map(double, single, h).values()}


def random_adapter(model: torch.nn.Module, modules: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT state dict with random A and B on `modules` (B is not zero, so the LoRA changes the model)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in modules:
        layer = model.get_submodule(name)
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=generator) * 0.1
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=generator) * 0.1
    return state


def every_mapped_linear(model: torch.nn.Module) -> list[str]:
    names = comfyui_flux_map(2, 2, 32)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n in names]


def inputs() -> dict:
    torch.manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, 16), "encoder_hidden_states": torch.randn(1, 8, 32),
            "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.6]), "guidance": torch.tensor([3.5]),
            "img_ids": torch.rand(16, 3), "txt_ids": torch.zeros(8, 3), "return_dict": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny [dev]-style pipeline, a random LoRA on every layer either format can name, and both files."""
    folder = tmp_path_factory.mktemp("kohya")
    pipe = build_tiny_flux(guidance=True, scratch=folder / "scratch")
    modules = every_mapped_linear(pipe.transformer)
    state = random_adapter(pipe.transformer, modules)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules)
    rows = {n: m.out_features for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    diffusers_file = write_diffusers_lora(state, config, folder / "diffusers")
    kohya_file = write_kohya_export(state, config, folder / "kohya", rows)
    with torch.no_grad():
        base = pipe.transformer(**inputs())[0]
    return {"pipe": pipe, "state": state, "config": config, "modules": modules, "diffusers": diffusers_file,
            "kohya": kohya_file, "base": base}


def outputs_with(pipe, lora: dict[str, torch.Tensor]) -> torch.Tensor:
    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(dict(lora))
    with torch.no_grad():
        return pipe.transformer(**inputs())[0]


def test_kohya_keys_are_names_comfyui_maps_for_flux(tiny):
    keys = load_file(str(tiny["kohya"])).keys()
    assert tiny["kohya"].name == KOHYA_FILE
    names = {k.split(".", 1)[0] for k in keys}
    assert names <= comfyui_kohya_names(2, 2, 32), names - comfyui_kohya_names(2, 2, 32)
    # load_lora reads exactly these three per layer; anything else is "lora key not loaded"
    assert keys == {f"{n}.{part}" for n in names for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear2", "lora_unet_double_blocks_0_img_mlp_0",
            "lora_unet_double_blocks_0_txt_mlp_2", "lora_unet_double_blocks_0_img_attn_proj",
            "lora_unet_double_blocks_0_txt_attn_proj", "lora_unet_double_blocks_0_img_mod_lin",
            "lora_unet_single_blocks_0_modulation_lin", "lora_unet_final_layer_adaLN_modulation_1"} <= names


def test_joined_qkv_is_rank_three_r_and_exact_when_the_parts_differ(tiny):
    kohya = load_file(str(tiny["kohya"]))
    factors = scaled_factors(tiny["state"], ALPHA / RANK)
    down, up = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], \
        kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert down.shape == (3 * RANK, 32) and up.shape == (3 * 32, 3 * RANK)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * RANK
    expected = torch.cat([factors[f"transformer_blocks.0.attn.{p}"][1] @ factors[f"transformer_blocks.0.attn.{p}"][0]
                          for p in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(up @ down, expected, rtol=0, atol=1e-6)
    linear1 = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert linear1.shape == (3 * 32 + 4 * 32, 4 * RANK)


def test_joined_qkv_keeps_rank_r_when_the_parts_share_a_and_fills_an_untrained_part_with_zeros():
    a = torch.randn(RANK, 32)
    shared = {f"transformer_blocks.0.attn.{p}": (a, torch.randn(32, RANK)) for p in ("to_q", "to_k", "to_v")}
    state = kohya_lora_state(shared)
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (RANK, 32)
    two = {k: v for k, v in shared.items() if not k.endswith("to_k")}
    with pytest.raises(ValueError, match="size is unknown"):
        kohya_lora_state(two)
    state = kohya_lora_state(two, {"transformer_blocks.0.attn.to_k": 32})
    delta = state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] @ \
        state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert delta.shape == (96, 32) and delta[32:64].abs().max() == 0
    torch.testing.assert_close(delta[64:], two["transformer_blocks.0.attn.to_v"][1] @ a)


def test_comfyui_mapping_of_the_kohya_file_gives_the_outputs_of_the_diffusers_file(tiny):
    """ComfyUI adds (alpha / rank) · up @ down to each native weight; on diffusers' layers that is each part's rows."""
    kohya = load_file(str(tiny["kohya"]))
    pipe = copy.deepcopy(tiny["pipe"])
    rows = comfyui_flux_map(2, 2, 32)
    with torch.no_grad():
        for module, (native, offset, size, swap) in rows.items():
            name = "lora_unet_" + native.replace(".", "_")
            if f"{name}.lora_up.weight" not in kohya:
                continue
            up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
            delta = (kohya[f"{name}.alpha"].item() / down.shape[0]) * up @ down
            delta = delta if size < 0 else delta[offset:offset + size]
            if swap:
                shift, scale = delta.chunk(2)
                delta = torch.cat([scale, shift])
            pipe.transformer.get_submodule(module).weight += delta
        comfy = pipe.transformer(**inputs())[0]
    with_diffusers = outputs_with(tiny["pipe"], load_file(str(tiny["diffusers"])))
    torch.testing.assert_close(comfy, with_diffusers, rtol=1e-4, atol=1e-4)
    assert (with_diffusers - tiny["base"]).abs().max() > 1e-3


def test_kohya_file_through_diffusers_gives_the_outputs_of_the_diffusers_file(tiny):
    """What diffusers 0.42.1 can read of the file, on the tiny model: its converter assumes FLUX.1's widths for
    `linear1` (3072, 3072, 3072, 12288) and names the layers outside the blocks (img_in, final_layer, ...) without
    the `transformer.` prefix its loader keeps, so those are dropped. Both files are compared on the double
    blocks and the single blocks' linear2 (proj_out); the next test converts linear1 at the real widths."""
    kohya = {k: v for k, v in load_file(str(tiny["kohya"])).items()
             if k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) and "_linear1." not in k}
    single_parts = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".proj_mlp.")
    diffusers = {k: v for k, v in load_file(str(tiny["diffusers"])).items()
                 if k.startswith("transformer.transformer_blocks.") or
                 (k.startswith("transformer.single_transformer_blocks.") and not any(p in k for p in single_parts))}
    assert len(kohya) == 3 * (2 * 10 + 2 * 2) and len(diffusers) == 2 * (2 * 14 + 2 * 2)
    with_kohya = outputs_with(tiny["pipe"], kohya)
    torch.testing.assert_close(with_kohya, outputs_with(tiny["pipe"], diffusers), rtol=1e-4, atol=1e-4)
    assert (with_kohya - tiny["base"]).abs().max() > 1e-3


def test_diffusers_converter_reads_joined_layers_at_flux1_widths_exactly():
    """One double and one single block at FLUX.1's widths (hidden 3072, MLP 12288): only the LoRA factors are made."""
    h, generator = 3072, torch.Generator().manual_seed(1)
    shapes = {"transformer_blocks.0.attn.to_q": (h, h), "transformer_blocks.0.attn.to_k": (h, h),
              "transformer_blocks.0.attn.to_v": (h, h), "transformer_blocks.0.attn.add_q_proj": (h, h),
              "transformer_blocks.0.attn.add_k_proj": (h, h), "transformer_blocks.0.attn.add_v_proj": (h, h),
              "transformer_blocks.0.attn.to_out.0": (h, h), "transformer_blocks.0.ff.net.0.proj": (h, 4 * h),
              "transformer_blocks.0.norm1.linear": (h, 6 * h),
              "single_transformer_blocks.0.attn.to_q": (h, h), "single_transformer_blocks.0.attn.to_k": (h, h),
              "single_transformer_blocks.0.attn.to_v": (h, h), "single_transformer_blocks.0.proj_mlp": (h, 4 * h),
              "single_transformer_blocks.0.proj_out": (5 * h, h)}
    state = {}
    for module, (inputs_, outputs_) in shapes.items():
        state[f"{module}.lora_A.weight"] = torch.randn(RANK, inputs_, generator=generator)
        state[f"{module}.lora_B.weight"] = torch.randn(outputs_, RANK, generator=generator)
    from diffusers import FluxPipeline

    converted = FluxPipeline.lora_state_dict(kohya_lora_state(scaled_factors(state, 2.0)))
    converted = converted[0] if isinstance(converted, tuple) else converted
    ours = diffusers_lora_state(state, 2.0)
    assert set(converted) == {f"transformer.{k}" for k in ours}
    for module in shapes:
        a, b = (converted[f"transformer.{module}.lora_{p}.weight"] for p in "AB")
        expected = ours[f"{module}.lora_B.weight"] @ ours[f"{module}.lora_A.weight"]
        torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-5)
        assert a.shape[0] == RANK  # diffusers split the joined layer back into rank-r parts


def test_a_layer_with_no_kohya_name_writes_no_kohya_file_and_says_why(tmp_path, caplog):
    state = {"base_model.model.transformer_blocks.0.attn.norm_q.lora_A.weight": torch.ones(RANK, 16),
             "base_model.model.transformer_blocks.0.attn.norm_q.lora_B.weight": torch.ones(16, RANK)}
    assert write_kohya_export(state, LoraConfig(r=RANK, lora_alpha=ALPHA), tmp_path / "kohya", {}) is None
    assert not (tmp_path / "kohya").exists()
    assert "has no name in the kohya" in caplog.text
