"""FLUX.2 in the catalogue and the planner: published sizes, the layer names the backend trains, activations
against saved tensors, and every phase of a [dev] plan at 24 GB of GPU and 32 GB of RAM, the prompt embeddings
(the text encoder streamed, then freed) included."""

from __future__ import annotations

import json

import pytest
import torch

from emloc import LoraSettings, attach_lora
from emloc.architecture import emulator_ranks, lora_targets, summarize
from emloc.memory import MemorySettings, plan_memory
from pipelines.planner.catalogue import load_meta_model, meta_model_from_bundle
from pipelines.planner.planning import PlanSettings, plan_run
from test_memory import _saved_bytes

DEV, KLEIN4, KLEIN9 = (f"black-forest-labs/FLUX.2-{n}" for n in ("dev", "klein-4B", "klein-9B"))
PUBLISHED = {DEV: 32.22e9, KLEIN4: 3.88e9, KLEIN9: 9.08e9}  # transformer, BFL / diffusers' conversion script
TINY = {"_class_name": "Flux2Transformer2DModel", "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
        "attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": [16, 16, 16, 16],
        "timestep_guidance_channels": 32, "guidance_embeds": True}


@pytest.mark.parametrize("model_id", list(PUBLISHED))
def test_flux2_transformers_count_their_published_size(model_id):
    meta = load_meta_model(model_id)
    assert meta.backend == "flux2" and meta.family == "flux"
    assert summarize(meta.model, meta.arch).params == pytest.approx(PUBLISHED[model_id], rel=0.002)
    components = {c.name: c for c in meta.arch.components}
    assert components["text_encoder"].prompt_encoder and not components["vae"].prompt_encoder
    assert components["vae"].params == pytest.approx(84.0e6, rel=0.005)


def test_klein_text_encoders_are_the_published_qwen3s():
    sizes = {m: {c.name: c.params for c in load_meta_model(m).arch.components}["text_encoder"] for m in (KLEIN4, KLEIN9)}
    assert sizes[KLEIN4] == pytest.approx(4.02e9, rel=0.005) and sizes[KLEIN9] == pytest.approx(8.19e9, rel=0.005)


def test_compression_and_lora_patterns_name_real_layers():
    meta = load_meta_model(KLEIN4)
    summary = summarize(meta.model, meta.arch)
    ranks = emulator_ranks(summary, [(p, 0.5) for p in meta.arch.default_compress])
    assert {"double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
            "single_stream_modulation.linear"} <= set(ranks)
    assert sum(1 for n in ranks if n.startswith("single_transformer_blocks.")) == 20 * 2
    assert sum(1 for n in ranks if n.startswith("transformer_blocks.")) == 5 * 12
    trained = {t.name.split(".", 2)[2] for t in lora_targets(summary, list(meta.arch.default_lora_targets))}
    assert trained == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                       "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out"}


def test_flux2_training_activations_match_saved_tensors():
    bundle = {"family": "flux", "max_sequence_length": 32, "components": {"transformer": TINY}}
    meta, arch = meta_model_from_bundle(bundle)
    settings = MemorySettings(ratio=0.5, lora_rank=4, resolution=128, gradient_checkpointing=False)
    predicted = plan_memory(summarize(meta, arch), arch, settings).get("training", "lora").parts["activations"]
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    model = Flux2Transformer2DModel.from_config({k: v for k, v in TINY.items() if not k.startswith("_")})
    model = model.to(torch.bfloat16)
    attach_lora(model, LoraSettings(rank=4, targets=list(arch.default_lora_targets)))
    side, text = 128 // 16, 32  # (H/16)(W/16) image tokens of 2x2-patched latents
    grid = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1),
                                      indexing="ij"), -1).reshape(-1, 4)
    text_ids = torch.zeros(text, 4)
    text_ids[:, 3] = torch.arange(text)
    inputs = dict(hidden_states=torch.randn(1, side * side, 16, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, text, 64, dtype=torch.bfloat16), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([4.0]), img_ids=grid.float(), txt_ids=text_ids)
    measured = _saved_bytes(model, lambda: model(**inputs))
    assert measured == pytest.approx(predicted, rel=0.10)


def test_dev_on_24_gb_and_32_gb_of_ram_plans_every_phase_with_the_encoder_streamed():
    plan = plan_run(DEV, PlanSettings(budget_gb=24, ram_gb=32))
    assert plan.recommended is not None and plan.emloc_fits()
    phases = {e.phase for e in plan.memory.estimates if e.method == "emloc"}
    assert phases == {"embeddings", "calibration", "emulator", "training", "correction", "preview"}
    embeddings = plan.get("embeddings", "emloc")
    # what stays loaded while the 24 B encoder streams (embeddings + LM head, 2.57 GiB) and one layer, not 45 GiB
    assert embeddings.streamed and 4.5 * 2 ** 30 < embeddings.total < 6 * 2 ** 30
    assert plan.get("embeddings", "inference").total > 44 * 2 ** 30  # plain inference holds the encoder whole
    assert plan.get("embeddings", "qlora").total < plan.get("embeddings", "lora").total / 3  # NF4 encoder
    # the encoder is freed after its phase: no later phase counts it
    for e in plan.memory.estimates:
        if e.phase != "embeddings":
            assert not any("text_encoder" in part for part in e.parts), (e.phase, e.method)
    table = plan.to_markdown()
    assert "| prompt embeddings |" in table and "FLUX.2 [dev]" in table


def test_flux1_plans_a_prompt_embeddings_phase_with_t5_streamed():
    """FLUX.1's T5-XXL streams block by block in its own phase (issue 25, F20), like FLUX.2's encoder."""
    plan = plan_run("black-forest-labs/FLUX.1-dev", PlanSettings(budget_gb=24))
    embeddings = plan.get("embeddings", "emloc")
    assert embeddings is not None and embeddings.streamed and "| prompt embeddings |" in plan.to_markdown()


def test_a_local_flux2_folder_plans_like_a_catalogue_id(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(TINY))
    meta = load_meta_model(str(tmp_path))
    assert meta.backend == "flux2"
    assert plan_run(str(tmp_path), PlanSettings(budget_gb=2, resolution=128)).recommended is not None
