"""Bytes read from the model's files per preview request, per preview mode (issue 25 item 3, review F7).

    PYTHONPATH=. python benchmarks/preview_reads.py [--steps 28] [--tokens 8]

Trains the shipped demo models (assets/models/demo-flux, demo-internvl; a few steps, on the CPU) on the tests'
tiny data, then renders one preview request (one prompt at one seed; one question) in each preview mode and counts
the bytes `CheckpointReader.read` returns (the tensors read from the safetensors files, as stored: float32 here),
and the preview's wall time on this CPU. Modes "files" and "offload" are rendered as a run whose plan chose them;
"files, blocks kept" with a RAM budget that leaves room for the blocks (the full-model variants keep them and read
each once). Runs unchanged on older code (the count is a wrapper around `CheckpointReader.read`); there "offload"
loads each full variant with from_pretrained, which the count does not see (the table says so).
Prints a markdown table and writes benchmarks/out/preview_reads.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "out"
DEMO = ROOT / "assets" / "models"
KiB = 1024


def _count_reads() -> list[int]:
    """Wrap CheckpointReader.read to add up the bytes of every tensor it returns; returns the running count."""
    from emloc import checkpoint

    count, read = [0], checkpoint.CheckpointReader.read

    def counted(self, name, device="cpu", dtype=None):
        tensor = read(self, name, device, dtype)
        count[0] += tensor.nbytes
        return tensor

    checkpoint.CheckpointReader.read = counted
    return count


def _runs(root: Path, steps: int, tokens: int) -> dict:
    from flux_fixtures import write_subject_images
    from pipelines.flux.backend import FluxSettings
    from pipelines.internvl.backend import VlmSettings
    from pipelines.runner import Run, RunSettings
    from vlm_fixtures import write_colour_csv

    write_subject_images(root / "dog", count=3, seed=4)
    flux = Run.create(root / "flux", "flux", RunSettings(model=str(DEMO / "demo-flux"), ratio=0.5, calibration_samples=2,
                                                         steps=2, device="cpu", ram_gb=1000.0),
                      FluxSettings(images=str(root / "dog"), prompt="sks dog", resolution=32, preview_steps=steps))
    write_colour_csv(root / "colours")
    vlm = Run.create(root / "vlm", "vlm", RunSettings(model=str(DEMO / "demo-internvl"), ratio=0.5, calibration_samples=8,
                                                      steps=2, rank=4, device="cpu", ram_gb=1000.0),
                     VlmSettings(data=str(root / "colours" / "qa.csv"), max_new_tokens=tokens, preview_samples=1))
    for run in (flux, vlm):
        run.execute()
    return {"FLUX.1 demo": flux, "InternVL demo": vlm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=28, help="FLUX denoising steps per preview image")
    parser.add_argument("--tokens", type=int, default=8, help="InternVL answer tokens per preview question")
    parser.add_argument("--label", default="", help="a name for this code (e.g. its commit) in the table")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    count = _count_reads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, run in _runs(Path(tmp), args.steps, args.tokens).items():
            plan = run.info["plan"]
            files = sum(f.stat().st_size for f in run.backend.checkpoint().files)
            for mode, spare in (("whole", None), ("files", 0.0), ("files, blocks kept", 1.0), ("offload", 0.0)):
                plan["phases"]["preview"]["mode"] = mode.split(",")[0]
                if spare is not None:  # the plan's RAM budget: what the preview needs, plus `spare` GiB
                    plan["ram_budget_gib"] = plan["phases"]["preview"]["host_gib"] + spare
                count[0] = 0
                start = time.perf_counter()
                run.preview(f"previews-{mode.replace(', ', '-').replace(' ', '-')}")
                rows.append((model, mode, count[0], files, time.perf_counter() - start))
    label = f" ({args.label})" if args.label else ""
    lines = [f"Bytes read from the model's files per preview request{label}: FLUX {args.steps} steps, one image; "
             f"InternVL {args.tokens} answer tokens, one question; four variants each.", "",
             "| model | preview mode | KiB read from the files | × the files (FLUX: the transformer) | seconds (this CPU) |",
             "|---|---|---:|---:|---:|"]
    for model, mode, read, files, seconds in rows:
        lines.append(f"| {model} | {mode} | {read / KiB:,.0f} | {read / files:.1f} | {seconds:.1f} |")
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"preview_reads{('-' + args.label) if args.label else ''}.md").write_text(table + "\n")
    print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
    main()
