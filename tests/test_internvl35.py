"""InternVL3.5-HF: a Qwen3 language model (head_dim apart from hidden/heads, q/k norms) and a chat template that
writes `<image>` for an image part. A tiny one built from its config: the packing, the streamed forward, a whole
headless run (streaming included), the planner offline, and the catalogue's published sizes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from emloc import LoraSettings, attach_lora
from emloc.architecture import summarize
from pipelines.internvl.backend import ChatPacker, VlmBackend, VlmSettings, collate, load_vlm, load_vlm_processing
from pipelines.internvl.data import QASample, pairs_to_samples
from pipelines.internvl.planning import vlm_architecture
from pipelines.planner.catalogue import load_meta_model
from pipelines.planner.planning import PlanSettings, plan_run
from pipelines.runner import Run, RunSettings, models
from vlm_fixtures import save_tiny_internvl, save_tiny_internvl35, write_colour_csv

PUBLISHED = {"1B": 1.1e9, "2B": 2.3e9, "4B": 4.7e9, "8B": 8.5e9}  # vision + language, model cards (to 0.1 B)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_internvl35(tmp_path_factory.mktemp("tiny-internvl35"))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("colours")
    return folder, write_colour_csv(folder)


def _packer(folder: Path) -> ChatPacker:
    parts = load_vlm_processing(str(folder))
    return ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length)


def test_an_image_template_packs_as_the_img_context_template_does(checkpoint, colour_data, tmp_path):
    folder, rows = colour_data
    samples = pairs_to_samples(rows, base=folder).samples[:2] + [QASample((), (("Name a colour.", "red"),))]
    qwen3, qwen2 = _packer(checkpoint), _packer(save_tiny_internvl(tmp_path / "img-context"))
    assert (qwen3.placeholder, qwen2.placeholder) == ("<image>", "<IMG_CONTEXT>")
    for sample in samples:
        a, b = qwen3.encode(sample), qwen2.encode(sample)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    context = qwen3.tokenizer.context_image_token_id
    assert int((qwen3.encode(samples[0])["input_ids"] == context).sum()) == qwen3.image_seq_length


def test_a_template_without_an_image_placeholder_is_refused_in_words(checkpoint):
    packer = _packer(checkpoint)
    packer.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="writes neither <IMG_CONTEXT> nor <image> for an image part"):
        packer.placeholder  # noqa: B018


def test_the_checkpoint_is_a_qwen3_internvl(checkpoint):
    model = load_vlm(str(checkpoint))
    assert model.config.text_config.model_type == "qwen3"
    assert hasattr(model.model.language_model.layers[0].self_attn, "q_norm")


def test_blockwise_forward_is_the_models_forward(checkpoint, colour_data):
    folder, rows = colour_data
    packer = _packer(checkpoint)
    samples = pairs_to_samples(rows, base=folder).samples[:1] + [QASample((), (("Name a colour.", "red"),))]
    batch = collate([packer.encode(s) for s in samples], packer.tokenizer.pad_token_id)
    batch.pop("labels")
    model = load_vlm(str(checkpoint))
    with torch.no_grad():
        expected = model.model(**batch).last_hidden_state
    backend = VlmBackend(RunSettings(model=str(checkpoint)), VlmSettings(), torch.device("cpu"))
    streamed = backend.blockwise(backend.skeleton(), backend.checkpoint())
    with torch.no_grad():
        state = streamed.enter(streamed, batch)
        for name in streamed.blocks:
            streamed.load(name)
            state = streamed.step(streamed, name, state)
            streamed.unload(name)
        hidden = streamed.load("model.language_model.norm")(state["hidden"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-5, atol=1e-5)


def test_a_headless_streamed_run_completes_and_previews(checkpoint, colour_data, tmp_path):
    folder, _ = colour_data
    settings = RunSettings(model=str(checkpoint), ratio=0.5, calibration_samples=8, steps=4, rank=4, lr=3e-3,
                           device="cpu")
    run = Run.create(tmp_path / "run", "vlm", settings,
                     VlmSettings(data=str(folder / "qa.csv"), max_new_tokens=4, preview_samples=2))
    assert models.streams(run)
    run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    assert all(stage["status"] == "done" for stage in info["stages"].values())
    assert (run.dir / "lora" / "corrected" / "adapter_model.safetensors").is_file()
    previews = json.loads((run.dir / "previews" / "previews.json").read_text())
    assert len(previews["items"]) == 2 and len(previews["items"][0]["answers"]) == 4


def test_the_planner_plans_the_folder_offline(checkpoint):
    meta = load_meta_model(str(checkpoint))
    assert meta.family == "vlm"
    plan = plan_run(str(checkpoint), PlanSettings(budget_gb=1.5, seq_len=64, image_tiles=1))
    assert plan.memory.counts.full == sum(p.numel() for p in load_vlm(str(checkpoint)).parameters())
    assert plan.recommended is not None


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_catalogue_internvl35_builds_with_its_published_size(size):
    meta = load_meta_model(f"OpenGVLab/InternVL3_5-{size}-HF")
    assert meta.model.config.text_config.model_type == "qwen3"
    assert abs(summarize(meta.model, meta.arch).params - PUBLISHED[size]) <= 0.05e9
    assert plan_run(meta.model_id, PlanSettings(budget_gb=24)).recommended is not None


def test_qwen3_decoder_layer_saves_what_the_activation_model_says():
    """The planner's per-token activations of a Qwen3 layer (q/k norms, head_dim apart) against saved tensors."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    from emloc.memory import ADAPTER_BYTES, activation_bytes_per_token
    from test_memory import TINY_INTERNVL, _saved_bytes

    text = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 160, "num_hidden_layers": 1}
    config = copy.deepcopy(TINY_INTERNVL)
    config["text_config"] = text
    stack = vlm_architecture(config).stacks[1]
    qwen = Qwen3Config(**{k: v for k, v in text.items() if k != "model_type"})
    qwen._attn_implementation = "sdpa"
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.layer = Qwen3DecoderLayer(qwen, 0).to(torch.bfloat16)
    peft_model = attach_lora(holder, LoraSettings(rank=4, targets=[r"layer\..*_proj"]))
    n = 96
    x = torch.randn(1, n, 64, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(n)[None]
    rotary = Qwen3RotaryEmbedding(qwen)(x, positions)
    measured = _saved_bytes(peft_model, lambda: holder.layer(x, position_ids=positions, position_embeddings=rotary))
    lora = sum(ADAPTER_BYTES * (m.in_features + 4) for m in holder.modules() if hasattr(m, "lora_A"))
    assert measured == pytest.approx(n * activation_bytes_per_token(stack, 2, lora), rel=0.03)
