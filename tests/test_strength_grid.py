"""The strength grid of the Preview step (issue 29 item 4): the corrected LoRA at several strengths through the same
run machine path as the previews, its memory what the plan counts for "full + corrected LoRA", its strength 1 and 0
columns the very previews of the corrected LoRA and of the base model, progress reported per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.runner import variants
from pipelines.runner.requests import parse_scales, parse_seeds, strength_label
import test_preview_memory as preview_memory
from test_preview_memory import DeviceWatch, _use_mode, planned_model_bytes

flux_run, vlm_run = preview_memory.flux_run, preview_memory.vlm_run  # the same tiny finished runs (module fixtures)


def _images(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.float32) for p in sorted(folder.glob("*.png"))
            if p.name != "grid.png"}


@pytest.mark.parametrize("mode", ["whole", "files"])
def test_every_strength_holds_what_the_plan_counts_for_the_corrected_lora(mode, flux_run):
    """A strength scales the corrected adapter's B factors in place: no strength holds more than the plan's preview
    of the full model with the corrected LoRA (exact counts, no tolerance)."""
    run = flux_run
    _use_mode(run, mode)
    skeleton = run.backend.skeleton()
    blocks = run.backend.blockwise(skeleton, run.backend.checkpoint()).blocks
    planned = planned_model_bytes(run, mode) + variants.resident_budget(run)
    shared = variants.shared_weights(run)
    for strength in (0.0, 0.5, 1.25):
        model = variants.strength_variant(run, strength, shared)
        watch = DeviceWatch(model, blocks)
        with torch.no_grad():
            run.backend.generate(model, strength_label(strength))
        watch.remove()
        variants.finish_variant(model)
        assert 0 < watch.peak <= planned, (mode, strength, watch.peak, planned)
    run.backend.release()


def test_a_strength_multiplies_each_layers_lora_update(flux_run):
    """On an adapted layer, output(t) - output(0) = t · (output(1) - output(0)), to float32 rounding."""
    run = flux_run
    _use_mode(run, "whole")
    layer = next(n for n, m in variants.strength_variant(run, 1.0).named_modules() if n.endswith("attn.to_q"))
    x = torch.randn(3, variants.strength_variant(run, 1.0).get_submodule(layer).in_features,
                    generator=torch.Generator().manual_seed(0))
    out = {t: variants.strength_variant(run, t).get_submodule(layer)(x).detach() for t in (1.0, 0.5, 1.25)}
    base = variants.preview_variant(run, "base").get_submodule(layer.removeprefix("base_model.model."))(x).detach()
    delta = out[1.0] - base
    assert delta.abs().max() > 1e-4  # the LoRA changes this layer
    for t in (0.5, 1.25):
        torch.testing.assert_close(out[t] - base, t * delta, atol=1e-5, rtol=1e-4)


def test_the_grid_runs_as_a_preview_job_with_progress_per_image(flux_run):
    """`Run.preview(scales=...)` renders every prompt x seed at each strength; strength 1 gives the very images of
    the previews' corrected LoRA and strength 0 those of the base model; a progress event per image."""
    run = flux_run
    _use_mode(run, "files")
    events = []
    run.callbacks.append(events.append)
    try:
        usual = run.preview("previews-usual")
        grid = run.preview("previews-grid", scales=[0.0, 0.5, 1.0])
    finally:
        run.callbacks.remove(events.append)
    spec = json.loads((grid / "grid.json").read_text())
    assert spec["scales"] == [0.0, 0.5, 1.0] and spec["labels"][0] == "LoRA strength 0 (base model)"
    before, after = _images(usual), _images(grid)
    requests = run.backend.preview_count()
    assert len(after) == 3 * requests
    for seed in run.backend.settings.preview_seeds:
        name = lambda label: next(n for n in before if n.startswith(label) and n.endswith(f"seed{seed}.png"))  # noqa: E731
        same = {"lora-strength-1__": "full-corrected-lora__", "lora-strength-0-base-model__": "base__"}
        for grid_prefix, preview_prefix in same.items():
            grid_name = next(n for n in after if n.startswith(grid_prefix) and n.endswith(f"seed{seed}.png"))
            np.testing.assert_array_equal(after[grid_name], before[name(preview_prefix)])
        half = next(n for n in after if n.startswith("lora-strength-0-5__") and n.endswith(f"seed{seed}.png"))
        assert not np.array_equal(after[half], before[name("base__")])
    steps = [e.step for e in events if e.stage == "grid" and ": image " in e.message]
    assert steps == list(range(1, 3 * requests + 1)) and {e.total for e in events if e.stage == "grid"} == {3 * requests}


def test_the_answers_grid_asks_each_question_at_each_strength(vlm_run):
    grid = vlm_run.preview("previews-grid", scales=[0.0, 1.0])
    data = json.loads((grid / "previews.json").read_text())
    usual = json.loads((vlm_run.output("preview") / "previews.json").read_text())
    assert len(data["items"]) == len(usual["items"]) > 0
    for item, before in zip(data["items"], usual["items"]):
        assert item["question"] == before["question"]
        assert item["answers"]["LoRA strength 1"] == before["answers"]["full + corrected LoRA"]
        assert item["answers"]["LoRA strength 0 (base model)"] == before["answers"]["base"]


def test_seeds_and_strengths_are_read_as_typed_and_bad_ones_are_said_in_words():
    assert parse_seeds("1000-1015") == list(range(1000, 1016)) and parse_seeds("1, 5, 9") == [1, 5, 9]
    assert parse_scales("0, 0.5, 1, 1.25") == [0.0, 0.5, 1.0, 1.25]
    for text, words in [("1-", "whole numbers or ranges"), ("5-2", "runs backwards"), ("1, 1", "given twice"),
                        ("0-40", "use 1 to 16 seeds"), ("", "at least one seed")]:
        with pytest.raises(ValueError, match=words):
            parse_seeds(text, "Seeds")
    for text, words in [("0, a", "not a number"), ("-1", "outside 0 to 4"), ("1, 1.0", "twice"), ("", "at least")]:
        with pytest.raises(ValueError, match=words):
            parse_scales(text)


def test_the_cli_reads_seed_ranges_and_says_a_bad_one_in_its_flags_words(flux_run, capsys):
    from pipelines.runner import cli

    with pytest.raises(SystemExit) as exit_code:
        cli.preview(["--run", str(flux_run.dir), "--seed", "5-2"])
    assert exit_code.value.code == 2
    assert "--seed: the range 5-2 runs backwards; write it as 2-5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.preview(["--run", str(flux_run.dir), "--scales", "0, x"])
    assert "--scales must be numbers separated by commas" in capsys.readouterr().err
    parser = __import__("argparse").ArgumentParser()
    cli.add_settings_options(parser, type(flux_run.backend.settings), "flux", preview=True)
    given = cli.given_settings(type(flux_run.backend.settings), parser.parse_args(["--seed", "1000-1002", "--seed", "7"]))
    assert given["preview_seeds"] == [1000, 1001, 1002, 7]
