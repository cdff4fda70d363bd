"""The planner's formulas against the run's own code traced on fake tensors at the real models' sizes (issue 26).

Each trace runs in a subprocess (`python -m pipelines.planner.trace`): the stand-in GPU's Python device guard can
abort an exiting interpreter after the work is done (see pipelines/planner/trace.py `main`), which must not take
the test process with it. A tensor left on the wrong device raises inside the trace, so the subprocess fails and so
does the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3
BELOW = 0.05  # the formula may be at most 5% below the trace
# How far above the trace each phase's formula may be (relative, absolute bytes), and why it is above (the numbers:
# benchmarks/README.md, "Traced at full size"):
# training: +1..5% (two steps are traced: the second backward runs beside the optimizer's state, which a one-step
# trace missed, and made the formula look 1.2-1.4 GiB above on FLUX.2 [dev] and InternVL3-38B);
# correction: none beyond the 5% (the formula counted both adapters and both float32 layer copies on the device,
# 2.8x the trace on FLUX.1-dev, until emloc/memory.py's _correction was fixed against this test).
# emulator (the streamed calibration + construction pass, traced on the "split" Gram products a consumer GPU runs):
# +0..15%, the most where a wide layer's factorisation is the peak (FLUX.1-dev at ratio 0.86): the formula's
# EIGH64·n² for an eigh is LAPACK's measured workspace, which a trace on fake tensors cannot see (the stand-in eigh
# allocates its outputs only); hence 20%.
# preview (each variant's denoising steps and VAE decode, or prefill and generated tokens): the formula adds the
# VAE decode's working set (0.38 GiB at 512 px; traced alone it equals the formula's) to the transformer's, which
# the trace has freed by then (the allocator keeps its blocks reserved: emloc/memory.py _with_components), hence
# 0.45 GiB.
ABOVE = {"training": (0.05, 0), "correction": (0.05, 0), "emulator": (0.20, 0), "preview": (0.05, int(0.45 * GiB))}
MAIN_MODELS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.2-dev", "black-forest-labs/FLUX.2-klein-4B",
               "OpenGVLab/InternVL3-8B-hf", "OpenGVLab/InternVL3-38B-hf", "OpenGVLab/InternVL3_5-8B-HF")


def _run(code_or_module: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *code_or_module], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the trace printed nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return lines


def trace(model: str, budget_gb: float, phases: str = "emulator,training,correction,preview") -> list[dict]:
    return _run(["-m", "pipelines.planner.trace", model, str(budget_gb), "", phases])


def check_formula_against_trace(row: dict) -> None:
    relative, absolute = ABOVE[row["phase"]]
    formula, traced = row["formula_device"], row["traced_device"]
    assert traced > 0, row
    assert formula >= (1 - BELOW) * traced, (
        f"{row['phase']}: the formula ({formula / GiB:.2f} GiB) is below the trace ({traced / GiB:.2f} GiB)")
    assert formula <= (1 + relative) * traced + absolute, (
        f"{row['phase']}: the formula ({formula / GiB:.2f} GiB) is above the trace ({traced / GiB:.2f} GiB) "
        "by more than its stated margin")
    # the host's formula also counts file pages and the interpreter, which are no tensors: only a lower bound here
    assert row["formula_host"] >= (1 - BELOW) * row["traced_host"], (
        f"{row['phase']}: the host formula ({row['formula_host'] / GiB:.2f} GiB) is below the traced host tensors "
        f"({row['traced_host'] / GiB:.2f} GiB)")


def test_formula_holds_every_traced_phase_of_flux2_klein():
    rows = trace("black-forest-labs/FLUX.2-klein-4B", 12)
    assert [r["phase"] for r in rows] == ["emulator", "training", "correction", "preview"]
    for row in rows:
        check_formula_against_trace(row)


def test_the_streamed_pass_holds_one_block_whatever_the_depth():
    """Nothing of a block outlives it in the streamed calibration + construction pass (the last layer's whitening
    and statistics, kept into the next block, made InternVL's extrapolated trace 26-51% above the formula), so the
    pass's peak is the same at 1, 2 and 3 language blocks."""
    code = """
import json, os, sys
from pipelines.planner import trace as T
from pipelines.planner.planning import PlanSettings
from pipelines.planner.catalogue import backend_of
bundle = T._bundle("OpenGVLab/InternVL3-8B-hf")
setup = T._Setup("OpenGVLab/InternVL3-8B-hf", backend_of(bundle), bundle, PlanSettings(budget_gb=12), 0.3)
peaks = [T._trace_emulator(setup, setup.backend({"vision": 1, "language": depth}))[0] for depth in (1, 2, 3)]
print(json.dumps({"peaks": peaks}))
sys.stdout.flush()
os._exit(0)
"""
    peaks = _run(["-c", code])[0]["peaks"]
    assert max(peaks) - min(peaks) <= 0.001 * max(peaks), peaks


def test_depth_extrapolation_equals_a_deeper_trace():
    """The per-block increments measured at depth 2 give the depth-3 peak exactly (blocks are alike)."""
    code = """
import json, os, sys
from pipelines.planner import trace as T
from pipelines.planner.planning import PlanSettings
from pipelines.planner.catalogue import backend_of
bundle = T._bundle("black-forest-labs/FLUX.2-klein-4B")
setup = T._Setup("black-forest-labs/FLUX.2-klein-4B", backend_of(bundle), bundle, PlanSettings(budget_gb=12), 0.4)
full = {"transformer_blocks": 3, "single_transformer_blocks": 3}
device, host, _ = T._extrapolated(setup, T._trace_training, full)
deep = T._trace_training(setup, setup.backend(full))
print(json.dumps({"extrapolated": device, "traced": deep[0]}))
sys.stdout.flush()
os._exit(0)
"""
    row = _run(["-c", code])[0]
    assert abs(row["extrapolated"] - row["traced"]) <= 0.01 * row["traced"], row


def test_a_tensor_left_on_the_host_fails_the_trace():
    from emloc.trace import trace_device, traced

    with traced() as counter:
        weight = torch.empty(64, 64, device=trace_device())
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([weight, torch.empty(64, 64)])
    assert counter.peak["gpu"] == 64 * 64 * 4


def test_counter_frees_a_storage_when_its_last_view_dies():
    from emloc.trace import trace_device, traced

    with traced() as counter:
        block = torch.empty(1024, 1024, device=trace_device())
        view = block[:10]
        del block
        assert counter.live["gpu"] == 4 * 1024 ** 2  # the view keeps the storage
        del view
        assert counter.live["gpu"] == 0
        assert counter.peak["gpu"] == 4 * 1024 ** 2


@pytest.mark.slow
@pytest.mark.parametrize("model", MAIN_MODELS)
@pytest.mark.parametrize("budget_gb", (12, 24))
def test_formula_holds_the_traced_phases_of_the_main_models(model, budget_gb):
    rows = trace(model, budget_gb)
    if "error" in rows[0]:  # no ratio fits: nothing is recommended, so there is no plan to check
        assert "no ratio fits" in rows[0]["error"]
        return
    for row in rows:
        check_formula_against_trace(row)
