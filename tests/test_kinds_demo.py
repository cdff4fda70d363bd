"""Each emulator kind, headless on the two demo models (issue 27, "what it must show"): `launch.py train
--emulator-kind K` runs every stage, the emulator is stored as K says, and the corrected adapter loads with plain
diffusers / transformers + PEFT on the unquantised model and changes what it computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emloc.quantized import EMULATOR_KINDS
from pipelines.runner import cli

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ROOT / "assets" / "models"


def _train(args: list[str], out: Path) -> dict:
    assert cli.main([*args, "--steps", "12", "--checkpoint-every", "6",
                     "--sample-every", "0", "--quiet", "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert all(stage["status"] == "done" for stage in info["stages"].values())
    return info


def _stored_as(out: Path, kind: str) -> None:
    emulator = json.loads((out / "emulator" / "emulator.json").read_text())
    assert emulator["kind"] == kind and emulator["layers"]
    assert {spec["kind"] for spec in emulator["layers"].values()} == {kind}
    from safetensors import safe_open

    keys = set()
    for file in (out / "emulator").glob("emulator*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys |= set(handle.keys())
    quantised = any(k.endswith(".codes") for k in keys)
    assert quantised == (kind != "lowrank")


@pytest.mark.slow  # a whole FLUX demo run per kind: ~40 s each on one thread
@pytest.mark.parametrize("kind", EMULATOR_KINDS)
def test_flux_demo_run_of_each_kind_loads_in_plain_diffusers(kind, tmp_path):
    from pipelines.demo import data
    from pipelines.demo.evaluate import load_flux_demo

    images = data.write_subject_images(tmp_path / "photos", count=4, seed=0)[0].parent
    out = tmp_path / "run"
    _train(["--backend", "flux", "--model", str(DEMOS / "demo-flux"), "--images", str(images), "--prompt",
            "a photo of sks shape on a white background", "--emulator-kind", kind, "--preview-steps", "2"], out)
    _stored_as(out, kind)
    pipe = load_flux_demo(DEMOS / "demo-flux")  # the unquantised model, plain diffusers
    transformer = pipe.transformer
    config = transformer.config
    torch.manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, config.in_channels),
              "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim),
              "pooled_projections": torch.randn(1, config.pooled_projection_dim), "timestep": torch.tensor([0.6]),
              "guidance": torch.tensor([3.5]) if config.guidance_embeds else None, "img_ids": torch.rand(16, 3),
              "txt_ids": torch.zeros(8, 3), "return_dict": False}
    with torch.no_grad():
        base = transformer(**inputs)[0]
        pipe.load_lora_weights(str(out / "lora" / "diffusers"), weight_name="pytorch_lora_weights.safetensors")
        tuned = transformer(**inputs)[0]
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-5


@pytest.mark.slow  # a whole InternVL demo run per kind: ~30 s each on one thread
@pytest.mark.parametrize("kind", EMULATOR_KINDS)
def test_internvl_demo_run_of_each_kind_loads_in_plain_transformers_and_peft(kind, tmp_path):
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    from pipelines.demo import data

    rows = data.write_mug_images(tmp_path / "mugs", per_owner=2, seed=0)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"image": str(p), "question": q, "answer": a}) + "\n" for p, q, a in rows))
    out = tmp_path / "run"
    _train(["--backend", "vlm", "--model", str(DEMOS / "demo-internvl"), "--data", str(qa), "--emulator-kind", kind,
            "--max-new-tokens", "4"], out)
    _stored_as(out, kind)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    model = InternVLForConditionalGeneration.from_pretrained(str(DEMOS / "demo-internvl"), dtype=torch.float32).eval()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(model, str(out / "lora" / "corrected")).eval()(input_ids=ids).logits
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-5
