"""The transfer gap: how much of a LoRA's effect is lost or distorted when it moves from the emulator to the
full model, measured at the model's output on held-out inputs, per correction method, λ and layer type.

    PYTHONPATH=. python benchmarks/transfer_gap.py [--backend flux|vlm|both] [--model FOLDER] [--seeds 0,1]
        [--ratios 0.3,0.5,0.7] [--methods paper,weighted,rank2r]

    gap = ‖f_full+ΔW′(x) - f_emu+ΔW(x)‖ / ‖f_emu+ΔW(x) - f_emu(x)‖

summed over every held-out input (Frobenius norms over all of them at once). It mixes two errors: the base
models' own difference `f_full(x) - f_emu(x)` (printed as "base error"), and the LoRA's effect changing on the
way. The second table isolates the latter, `‖(f_full+ΔW′ - f_full) - (f_emu+ΔW - f_emu)‖ / ‖f_emu+ΔW - f_emu‖`
("effect distortion"). ΔW is the LoRA the run machine
trained on the emulator (pipelines/runner: calibrate -> emulate -> train, the demo's suggested settings);
ΔW′ is `emloc.correct_lora(..., lam, method)` of it. 0 means the full model with the corrected LoRA computes
what training saw; 1 means an error as large as the LoRA's whole effect. λ = 0 is the uncorrected adapter
(the same for every method). Held-out inputs:
- flux: noised latents of the run's own training images at timesteps drawn from the training density, with
  noise from a seed training never used; output = the transformer's prediction.
- vlm: "Whose mug is this?" on unseen mug images (pipelines/demo/data.py, seed 8); output = the logits at the
  positions that predict the answer's tokens.

Per layer type: the correction applied to one type of layer only (the others keep the uncorrected LoRA), so
the table says how much of the gap each type closes. Types by module name: attention q/k/v (to_q, to_k,
to_v, add_*_proj, q/k/v_proj), attention out (to_out.0, to_add_out, o_proj), MLP (the rest: ff, ff_context,
proj_mlp, the single blocks' proj_out, gate/up/down_proj).

The run folders keep their statistics (`keep_statistics`), because the "weighted" and "rank2r" methods read
Σ xᵀx at correction time and a default (streamed) run does not keep it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emloc  # noqa: E402
from pipelines.demo import FLUX_DIR, VLM_DIR, FLUX_SEQUENCE_LENGTH, data  # noqa: E402
from pipelines.runner import Run, RunSettings  # noqa: E402
from pipelines.runner.registry import demo_suggestions  # noqa: E402
from pipelines.runner.models import emulator_model  # noqa: E402
from pipelines.runner.stages import STATS_FILE  # noqa: E402

FLUX_PROMPT = "a sks shape on a white background"
LAMS = [0.0, 0.5, 1.0, 3.0, 10.0, math.inf]
TYPE_LAMS = [3.0, math.inf]
HELD_OUT_SEED = 987_654  # no step's seed (stages.step_seed: seed·1_000_003 + step) for seeds < 10⁴ and steps < 12k,
# nor a calibration generator's (the run seed)
LAYER_TYPES = {
    "attention q/k/v": re.compile(r".*\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|q_proj|k_proj|v_proj)$"),
    "attention out": re.compile(r".*\.(to_out\.0|to_add_out|o_proj)$"),
}


def layer_type(name: str) -> str:
    return next((kind for kind, pattern in LAYER_TYPES.items() if pattern.fullmatch(name)), "MLP")


def make_run(backend: str, model: Path, ratio: float, seed: int, work: Path, steps: int) -> Run:
    """calibrate -> emulate -> train with the run machine, at the demo's suggested settings, statistics kept."""
    suggested = demo_suggestions(model)
    names = {f.name for f in fields(RunSettings)}
    run_fields = {k: v for k, v in suggested.items() if k in names}
    extra = {k: v for k, v in suggested.items() if k not in names}
    if steps:
        run_fields["steps"] = steps
    settings = RunSettings(model=str(model), ratio=ratio, seed=seed, device="cpu", mixed_precision="no",
                           keep_statistics=True, **run_fields)
    folder = work / f"run-{backend}-r{ratio}"
    if backend == "flux":
        from pipelines.flux.backend import FluxSettings

        images = work / "sks"
        if not images.exists():
            data.write_subject_images(images, count=4, seed=7)
        allowed = {f.name for f in fields(FluxSettings)}
        extra = {k: v for k, v in extra.items() if k in allowed}
        extra.setdefault("max_sequence_length", FLUX_SEQUENCE_LENGTH)
        backend_settings = FluxSettings(images=str(images), prompt=FLUX_PROMPT, trigger="sks", **extra)
    else:
        from pipelines.internvl.backend import VlmSettings

        train = work / "mugs-train"
        if not train.exists():
            rows = data.write_mug_images(train, per_owner=4, seed=7)
            with open(train / "qa.jsonl", "w") as f:
                for path, question, answer in rows:
                    f.write(json.dumps({"image": path.name, "question": question, "answer": answer}) + "\n")
        allowed = {f.name for f in fields(VlmSettings)}
        backend_settings = VlmSettings(data=str(train / "qa.jsonl"), **{k: v for k, v in extra.items() if k in allowed})
    run = Run.create(folder, backend, settings, backend_settings)
    run.execute(["calibrate", "emulate", "train"])
    return run


def held_out_inputs(run: Run, work: Path, count: int) -> list[tuple[dict, torch.Tensor | None]]:
    """(model kwargs, answer-predicting positions or None) of each held-out input."""
    backend = run.backend
    if backend.name == "flux":
        generator = torch.Generator().manual_seed(HELD_OUT_SEED)
        return [(backend._batch(generator, 1)["kwargs"], None) for _ in range(count)]
    from pipelines.internvl.inputs import IGNORE, collate, to_device
    from pipelines.internvl.data import QASample

    rows = data.write_mug_images(work / "mugs-test", per_owner=max(1, count // 4), seed=8)
    out = []
    for path, question, answer in rows[:count]:
        encoded = backend.packer.encode(QASample((str(path),), ((question, answer),)))
        batch = to_device(collate([encoded], backend.packer.tokenizer.pad_token_id), backend.device)
        labels = batch.pop("labels")[0]
        positions = (labels != IGNORE).nonzero().flatten() - 1  # logits at t predict token t + 1
        out.append((batch, positions))
    return out


@contextlib.contextmanager
def lora_hooks(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Add `(x Aᵀ)(s B)ᵀ` to each named layer's output (a dense or a factored layer alike, any rank)."""
    handles = []
    for name, (a, sb) in factors.items():
        def hook(module, args, output, a=a, sb=sb):
            x = args[0]
            return output + ((x.to(a.dtype) @ a.T) @ sb.T).to(output.dtype)  # (…, in) -> (…, r) -> (…, out)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def outputs(model: torch.nn.Module, inputs, factors=None) -> list[torch.Tensor]:
    """The model's output on each held-out input (FLUX: the prediction; InternVL: answer-position logits)."""
    model.eval()
    found = []
    with lora_hooks(model, factors or {}):
        for kwargs, positions in inputs:
            result = model(**kwargs)
            if positions is None:
                found.append(result[0].float())
            else:
                found.append(result.logits[0, positions].float())
    return found


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b)))


def measure(run: Run, inputs, methods: list[str]) -> dict:
    """Gaps of every (method, λ), and of each layer type corrected alone, for one trained run."""
    state, config = emloc.read_adapter(run.output("train"))
    stats = emloc.second_moments(run.load_tensors(run.output("calibrate") / STATS_FILE))
    scaling = emloc.lora_scaling(config)
    full = run.backend.load_model(torch.device("cpu"))
    emulator = emulator_model(run, "cpu")
    emulator_plain = outputs(emulator, inputs)
    target = outputs(emulator, inputs, emloc.adapter_factors(state, config))  # what training saw
    effect = distance(target, emulator_plain)
    full_plain = outputs(full, inputs)
    result = {"effect": effect, "full, no LoRA": distance(full_plain, target) / effect,
              "base error": distance(full_plain, emulator_plain) / effect, "gaps": {}, "distortion": {}, "types": {}}
    change_on_emulator = [t - e for t, e in zip(target, emulator_plain)]
    names = list(emloc.adapter_factors(state, config))
    for method in methods:
        for lam in LAMS:
            started = time.monotonic()
            fixed = emloc.correct_lora(full, emulator, state, scaling, lam=lam, progress=False, method=method,
                                       second_moments=stats)
            factors = emloc.adapter_factors(fixed, config)
            seconds = time.monotonic() - started
            corrected = outputs(full, inputs, factors)
            result["gaps"][(method, lam)] = (distance(corrected, target) / effect, seconds)
            change_on_full = [c - f for c, f in zip(corrected, full_plain)]
            result["distortion"][(method, lam)] = distance(change_on_full, change_on_emulator) / effect
            if lam not in TYPE_LAMS:
                continue
            uncorrected = emloc.adapter_factors(state, config)
            for kind in sorted({layer_type(n) for n in names}):
                mixed = {n: (factors[n] if layer_type(n) == kind else uncorrected[n]) for n in names}
                result["types"][(method, lam, kind)] = distance(outputs(full, inputs, mixed), target) / effect
    return result


def lam_name(lam: float) -> str:
    return "∞" if math.isinf(lam) else f"{lam:g}"


def averaged(per_seed: list[dict]) -> dict:
    """Mean over seeds of every number in measure()'s result, with the largest distance of a seed from it."""
    first = per_seed[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = {k: averaged([{"v": r[key][k]} for r in per_seed])["v"] for k in value}
        elif isinstance(value, tuple):
            out[key] = tuple(averaged([{"v": r[key][i]} for r in per_seed])["v"] for i in range(len(value)))
        else:
            values = [r[key] for r in per_seed]
            mean = sum(values) / len(values)
            out[key] = (mean, max(abs(v - mean) for v in values)) if len(values) > 1 else (mean, 0.0)
    return out


def cell(value: tuple[float, float]) -> str:
    mean, spread = value
    return f"{mean:.3f} ± {spread:.3f}" if spread else f"{mean:.3f}"


def report(backend: str, model: Path, results: dict[float, dict], methods: list[str], seeds: list[int], count: int,
           minutes: float) -> str:
    mean_of = "mean ± largest distance of a seed from the mean" if len(seeds) > 1 else "one seed"
    lines = [f"### {backend}: {model}", "",
             f"Seeds {seeds} ({mean_of}), {count} held-out inputs, {minutes:.1f} min on {torch.get_num_threads()} "
             "CPU thread(s). λ = 0 is the uncorrected LoRA (the same for every method).", ""]
    for key, title in (("gaps", "gap = ‖f_full+ΔW′(x) - f_emu+ΔW(x)‖ / ‖f_emu+ΔW(x) - f_emu(x)‖ (0: the full model "
                                 "does what training saw)"),
                       ("distortion", "effect distortion = ‖(f_full+ΔW′ - f_full) - (f_emu+ΔW - f_emu)‖ / "
                                      "‖f_emu+ΔW - f_emu‖ (the base models' own difference left out)")):
        lines += [title + ":", "", "| ratio | λ | " + " | ".join(methods) + " |", "|---:|---:|" + "---:|" * len(methods)]
        for ratio, result in results.items():
            for lam in LAMS:
                values = [result[key][(m, lam)] for m in methods]
                cells = [cell(v[0] if isinstance(v[0], tuple) else v) for v in values]
                lines.append(f"| {ratio} | {lam_name(lam)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Base error ‖f_full - f_emu‖ / effect, and the full model without LoRA (gap of ΔW′ = 0): " + "; ".join(
        f"ratio {ratio}: {cell(r['base error'])}, {cell(r['full, no LoRA'])}" for ratio, r in results.items()), ""]
    kinds = sorted({k for r in results.values() for (_, _, k) in r["types"]})
    lines += ["One layer type corrected, the others uncorrected (gap):", "",
              "| ratio | corrected | " + " | ".join(f"{m} λ={lam_name(lam)}" for m in methods for lam in TYPE_LAMS) + " |",
              "|---:|---|" + "---:|" * (len(methods) * len(TYPE_LAMS))]
    for ratio, result in results.items():
        for kind in kinds:
            cells = [cell(result["types"][(m, lam, kind)]) for m in methods for lam in TYPE_LAMS]
            lines.append(f"| {ratio} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per correction of the whole adapter (λ = ∞): " + ", ".join(
        f"{m} {sum(r['gaps'][(m, math.inf)][1][0] for r in results.values()) / len(results):.2f}" for m in methods)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("flux", "vlm", "both"), default="both")
    parser.add_argument("--model", default="", help="model folder (one backend only; default: that backend's demo)")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--methods", default=",".join(emloc.CORRECTION_METHODS))
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds (numbers are means over them)")
    parser.add_argument("--held-out", type=int, default=16, help="held-out inputs per backend")
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the demo's suggested)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    if args.model and args.backend == "both":
        parser.error("--model needs one --backend (flux or vlm)")
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = args.methods.split(",")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for backend in ("flux", "vlm"):
        if args.backend not in ("both", backend):
            continue
        model = Path(args.model) if args.model else (FLUX_DIR if backend == "flux" else VLM_DIR)
        work = Path(tempfile.mkdtemp(prefix=f"transfer-gap-{backend}-"))
        started = time.monotonic()
        try:
            results = {}
            for ratio in ratios:
                per_seed = []
                for seed in seeds:
                    run = make_run(backend, model, ratio, seed, work / f"seed-{seed}", args.steps)
                    per_seed.append(measure(run, held_out_inputs(run, work, args.held_out), methods))
                    print(f"{backend} ratio {ratio} seed {seed}: done after {(time.monotonic() - started) / 60:.1f} "
                          "min", file=sys.stderr, flush=True)
                results[ratio] = averaged(per_seed)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        text = report(backend, model, results, methods, seeds, args.held_out, (time.monotonic() - started) / 60)
        print(text + "\n", flush=True)
        (Path(args.out) / f"transfer_gap_{backend}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
