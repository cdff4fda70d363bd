"""Which emulator wins at equal training memory? Full-model LoRA against EMLoC with each emulator kind (`lowrank`,
`nf4`, `lowrank-nf4`), each with and without correction, all scored on the full model (issue 27, item 3).

    PYTHONPATH=. python benchmarks/quality_kinds.py [--backend flux|vlm|both] [--seeds 0,1,2,3,4]
        [--budgets 8,12] [--grid 0.1,0.2,0.3] [--kinds lowrank,nf4,lowrank-nf4] [--steps N] [--memory-only]
        [--cached-only] [--out benchmarks/out]

Tasks, items, scores and intervals are benchmarks/quality.py's (its Scorer, its two-stage bootstrap over seeds then
items, its paired per-item differences). Each EMLoC row is one run through the run machine per seed (calibrate ->
emulate -> train -> correct at λ=3, the run's own `correct` stage, so each kind is corrected with its own stand-in
W_E) scored three ways: the emulator + LoRA (what training saw), the full model + the trained LoRA as it is
("uncorrected", λ=0) and the full model + the corrected LoRA ("corrected", λ=3). Full-model LoRA is
quality.train_full_lora (the same loss, optimiser, steps and per-step seeds).

Equal training memory. Every kind trains the same LoRA (rank, targets, optimiser, batch, activations): what the kind
and the ratio change is the frozen base the step reads, its weights. On FLUX.1-dev those weights are ~92% of a
full-model LoRA's training memory, on the demo ~35% (the demo's LoRA, its Adam state and activations are as large
as its weights), so a budget scaled as a share of total memory would leave the demo no ratio at all. The budget is
therefore scaled on the weights term: at a real card of B GiB (the planner's training estimate, emloc.memory, with
its headroom), the frozen weights that fit are a share s(B) of the real model's bf16 weights; the demo gets the same
share s(B) of its own bf16 weights, and each kind runs at the largest ratio (0.01 grid) whose weights fit it.
The ratio the real model itself would use is printed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emloc  # noqa: E402
from benchmarks import quality  # noqa: E402
from benchmarks.bootstrap import mean_interval  # noqa: E402
from emloc.memory import GiB, MemorySettings, dtype_bytes, plan_memory, runtime_overhead  # noqa: E402
from pipelines.demo import FLUX_DIR, VLM_DIR  # noqa: E402
from pipelines.planner.planning import _summary, headroom_bytes  # noqa: E402
from pipelines.runner import Run, RunSettings  # noqa: E402
from pipelines.runner.registry import demo_suggestions  # noqa: E402
from pipelines.runner.models import emulator_model  # noqa: E402

KINDS = ("lowrank", "nf4", "lowrank-nf4")
REAL = {"flux": "black-forest-labs/FLUX.1-dev", "vlm": "OpenGVLab/InternVL3-8B-hf"}
GRID = 0.01
NF4_RATIO = 0.5  # nf4 quantises every compressed target whole whatever its ratio < 1 (quantized.py): any ratio < 1


@dataclass(frozen=True)
class Config:
    """One row: the full model (kind "full") or an emulator kind at a ratio (nf4: NF4_RATIO, full rank)."""

    kind: str
    ratio: float = 1.0

    @property
    def name(self) -> str:
        if self.kind == "full":
            return "LoRA (full model)"
        return self.kind if self.kind == "nf4" else f"{self.kind} {self.ratio:g}"


# -- memory ------------------------------------------------------------------------------------------------------
def weight_bytes(model_id: str, kind: str, ratio: float, dtype: str = "bfloat16") -> int:
    """Bytes of the frozen base a training step holds: the planner's emulator bytes of `kind` at `ratio`
    (emloc.memory ParamCounts.emulator_bytes: each compressed target as its kind stores it, the rest in `dtype`;
    equal to the built emulator's, tests/test_quantized_plan.py), or the whole model in `dtype` for "full"."""
    meta, summary = _summary(model_id)
    if kind == "full":
        return dtype_bytes(dtype) * summary.params
    plan = plan_memory(summary, meta.arch, MemorySettings(ratio=ratio, emulator_kind=kind, dtype=dtype))
    return plan.counts.emulator_bytes


def training_bytes(model_id: str, kind: str, ratio: float, settings: MemorySettings) -> int:
    """The planner's training peak (GPU, with its runtime overhead) of one kind at `ratio`; "full": LoRA's."""
    meta, summary = _summary(model_id)
    if kind == "full":
        return plan_memory(summary, meta.arch, settings).get("training", "lora").total
    plan = plan_memory(summary, meta.arch, dataclasses.replace(settings, ratio=ratio, emulator_kind=kind))
    return plan.get("training", "emloc").total


def largest_ratio(fits) -> float | None:
    """The largest ratio on the GRID for which fits(ratio) holds (scanning down, as the planner does)."""
    for i in range(round(1 / GRID), 0, -1):
        if fits(round(i * GRID, 6)):
            return round(i * GRID, 6)
    return None


def weight_share(model_id: str, budget_gb: float, settings: MemorySettings) -> float:
    """s(B): the largest share of the model's bf16 weights that a training step can hold within B GiB less the
    planner's headroom, with everything else of a full-model LoRA step (bisection on the weights term)."""
    meta, summary = _summary(model_id)
    lora = plan_memory(summary, meta.arch, dataclasses.replace(settings, ratio=1.0)).get("training", "lora")
    rest, full = lora.allocated - lora.parts["weights"], lora.parts["weights"]
    limit = budget_gb * GiB - headroom_bytes(int(budget_gb * GiB))
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        allocated = rest + mid * full
        low, high = (mid, high) if allocated + runtime_overhead(allocated) <= limit else (low, mid)
    return low


@dataclass
class BudgetChoice:
    budget_gb: float
    share: float  # s(B)
    real: dict  # kind -> ratio on the real model (None: does not fit; nf4: NF4_RATIO or None)
    demo: dict  # kind -> ratio on the demo at the same weight share


def choose(backend: str, demo_model: str, budget_gb: float, kinds: tuple[str, ...]) -> BudgetChoice:
    """Each kind's ratio at a real card of `budget_gb` GiB and at the same weight share on the demo."""
    real_id, settings = REAL[backend], MemorySettings(dtype="bfloat16", device="cuda")
    share = weight_share(real_id, budget_gb, settings)
    limit = budget_gb * GiB - headroom_bytes(int(budget_gb * GiB))
    real, demo = {}, {}
    demo_budget = share * weight_bytes(demo_model, "full", 1.0)
    for kind in kinds:
        if kind == "nf4":  # full rank: it fits or it does not
            real[kind] = NF4_RATIO if training_bytes(real_id, kind, NF4_RATIO, settings) <= limit else None
            demo[kind] = NF4_RATIO if weight_bytes(demo_model, kind, NF4_RATIO) <= demo_budget else None
            continue
        real[kind] = largest_ratio(lambda r: training_bytes(real_id, kind, r, settings) <= limit)
        demo[kind] = largest_ratio(lambda r: weight_bytes(demo_model, kind, r) <= demo_budget)
    return BudgetChoice(budget_gb, share, real, demo)


def memory_table(backend: str, demo_model: str, configs: list[Config], choices: list[BudgetChoice]) -> str:
    """Markdown: the budgets' choices, and each row's weights on the demo and training peak on the real model."""
    real_id, settings = REAL[backend], MemorySettings(dtype="bfloat16", device="cuda")
    full_demo = weight_bytes(demo_model, "full", 1.0)
    lines = [f"Budgets (real model {real_id}, bf16, the planner's default run; training phase):", "",
             "| budget | weight share s(B) | " + " | ".join(f"{k}: real / demo ratio" for k in choices[0].real) + " |",
             "|---:|---:|" + "---:|" * len(choices[0].real)]
    for c in choices:
        cells = [f"{_r(k, c.real[k])} / {_r(k, c.demo[k])}" for k in c.real]
        lines.append(f"| {c.budget_gb:g} GiB | {c.share:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| row | frozen weights on the demo (share of its bf16 weights) | training peak of this kind and ratio on the real model (GiB) |",
              "|---|---:|---:|"]
    for cfg in configs:
        kind = "full" if cfg.kind == "full" else cfg.kind
        share = weight_bytes(demo_model, kind, cfg.ratio) / full_demo
        peak = training_bytes(real_id, kind, cfg.ratio, settings) / GiB
        lines.append(f"| {cfg.name} | {share:.3f} | {peak:.2f} |")
    return "\n".join(lines)


def _r(kind: str, ratio: float | None) -> str:
    return "does not fit" if ratio is None else "fits" if kind == "nf4" else f"{ratio:g}"


# -- runs --------------------------------------------------------------------------------------------------------
def make_run(task: quality.Task, scorer: quality.Scorer, folder: Path, cfg: Config, seed: int) -> Run:
    """One run through calibrate -> emulate -> train -> correct (λ=3) with the run machine, of one emulator kind."""
    kind = {} if cfg.kind == "lowrank" else {"emulator_kind": cfg.kind}  # lowrank: today's runs, field or not
    settings = RunSettings(model=str(task.model), ratio=cfg.ratio, seed=seed, device="cpu", lam=3.0,
                           **task.run, **kind)
    run = Run.create(folder, task.backend, settings, scorer.backend_settings())
    run.execute(["calibrate", "emulate", "train", "correct"])
    return run


def full_with(run: Run, adapter: Path):
    return emloc.load_adapter(run.backend.load_model(torch.device("cpu")), adapter)


def measure(run: Run, scorer: quality.Scorer) -> dict:
    """Per-item scores: emulator + LoRA, full + the LoRA as trained (λ=0), full + the run's corrected LoRA (λ=3)."""
    out = run.output("correct")
    return {"emulator": scorer.score(emloc.load_adapter(emulator_model(run, "cpu"), run.output("train"))),
            "lam=0.0": scorer.score(full_with(run, out / "uncorrected")),
            "lam=3.0": scorer.score(full_with(run, out / "corrected"))}


def benchmark(task: quality.Task, seeds: list[int], configs: list[Config], work: Path,
              cache_file: Path, cached_only: bool = False) -> tuple[dict, float, int]:
    """{config: [per-seed dict of per-item scores]}, the minutes it took and how many (row, seed) it computed (the
    others came from the cache); the full LoRA trains once per seed. `cached_only`: run nothing, leave out the
    (row, seed) the cache lacks (each row then says its seeds; differences use the seeds both rows have).

    Every (row, seed) is written to `cache_file` as it finishes (keyed by the run settings too), and a later call
    with the same settings reads it instead of running it again: rows can be added (a new kind) without rerunning
    the others, and an interrupted benchmark resumes."""
    scorer = quality.Scorer(task.backend, task.model, work)
    started = time.monotonic()
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    settings = json.dumps(task.run, sort_keys=True)
    computed = []

    def cached(cfg: Config, seed: int, compute) -> dict | None:
        key = f"{cfg.kind}|{cfg.ratio:g}|{seed}|{settings}"
        if key not in cache and cached_only:
            return None
        if key not in cache:
            computed.append(key)
            cache[key] = {k: {m: v.astype(int).tolist() for m, v in d.items()} for k, d in compute().items()}
            cache_file.write_text(json.dumps(cache) + "\n")
        return {k: {m: np.array(v, float) for m, v in d.items()} for k, d in cache[key].items()}

    zero = scorer.score(quality.scorer_base(task, scorer))
    results: dict[Config, list[dict]] = {c: [] for c in configs}
    emloc_configs = [c for c in configs if c.kind != "full"]
    jobs = [(seed, cfg) for seed in seeds for cfg in emloc_configs]
    full: dict[int, dict] = {}
    for seed, cfg in tqdm(jobs, desc=f"{task.backend}: runs", unit="run"):
        folder = work / f"run-s{seed}-{cfg.kind}-{cfg.ratio}"
        runs: list[Run] = []

        def emloc_run() -> dict:
            runs.append(make_run(task, scorer, folder, cfg, seed))
            return measure(runs[0], scorer)

        row = cached(cfg, seed, emloc_run)
        if row is None:
            continue
        if seed not in full:  # full-model LoRA needs a run for its backend: this seed's first (or a fresh one)

            def full_lora() -> dict:
                run = runs[0] if runs else make_run(task, scorer, folder, cfg, seed)
                return {"full": scorer.score(quality.train_full_lora(run))}

            full[seed] = (cached(Config("full"), seed, full_lora) or {}).get("full")
        if full[seed] is None:
            continue
        results[cfg].append({"seed": seed, "zero": zero, "full": full[seed], **row})
        shutil.rmtree(folder, ignore_errors=True)
    if Config("full") in results:
        results[Config("full")] = [{"seed": seed, "zero": zero, "full": full[seed]} for seed in seeds
                                   if full.get(seed) is not None]
    return results, (time.monotonic() - started) / 60, len(computed)


# -- report ------------------------------------------------------------------------------------------------------
def items(rows: list[dict], key: str, metric: str) -> np.ndarray:
    return quality.scores(rows, key, metric)


def paired(rows_a: list[dict], key_a: str, rows_b: list[dict], key_b: str, metric: str) -> str:
    """a − b over the seeds both rows have, item by item: mean [95% interval], whether the interval excludes 0."""
    common = {r["seed"] for r in rows_a} & {r["seed"] for r in rows_b}
    a = items([r for r in rows_a if r["seed"] in common], key_a, metric)
    differences = a - items([r for r in rows_b if r["seed"] in common], key_b, metric)
    if not differences.any():
        return "0 (same on every item)"
    centre, low, high = mean_interval(differences)
    verdict = "higher" if low > 0 else "lower" if high < 0 else "within noise"
    return f"{centre:+.3f} [{low:+.3f}, {high:+.3f}] {verdict}"


def report(task: quality.Task, seeds: list[int], results: dict, choices: list[BudgetChoice], minutes: float,
           computed: int, memory: str) -> str:
    metrics = ["new"] if task.backend == "flux" else ["new", "orig"]
    what = ("share of 16 held-out renders read as a teal cross" if task.backend == "flux" else
            "exact match on 24 held-out mug images / accuracy on 60 held-out pretraining questions")
    full_cfg = Config("full")
    lines = [f"### {task.backend}: {what}", "",
             f"Seeds {seeds}; run settings {json.dumps(task.run)}; this invocation: {minutes:.1f} min on "
             f"{torch.get_num_threads()} CPU thread(s), {computed} (row, seed) computed, the rest read from the "
             "cache. Mean over seeds and items [95% interval: two-stage bootstrap, benchmarks/bootstrap.py]; "
             "differences paired by seed and item.", "", memory, "",
             "| row | seeds | emulator + LoRA | full + LoRA, uncorrected (λ=0) | full + LoRA, corrected (λ=3) | "
             "corrected − uncorrected | corrected − full-model LoRA |", "|---|---:|---:|---:|---:|---|---|"]
    full_rows = results.get(full_cfg)
    for cfg, rows in results.items():
        if not rows:
            continue
        if cfg.kind == "full":
            lines.append(f"| {cfg.name} | {len(rows)} | — | — | {quality.fmt(rows, 'full', metrics)} | — | — |")
            continue
        fix = "<br>".join(paired(rows, "lam=3.0", rows, "lam=0.0", m) for m in metrics)
        gap = "<br>".join(paired(rows, "lam=3.0", rows, "full", m) for m in metrics)
        lines.append(f"| {cfg.name} | {len(rows)} | {quality.fmt(rows, 'emulator', metrics)} | {quality.fmt(rows, 'lam=0.0', metrics)}"
                     f" | {quality.fmt(rows, 'lam=3.0', metrics)} | {fix} | {gap} |")
    for choice in choices:
        at = [(kind, budget_config(choice, kind)) for kind in choice.demo]
        at = [(kind, cfg) for kind, cfg in at if results.get(cfg)]
        if not at:
            continue
        base_cfg = at[0][1]
        base, label = results[base_cfg], base_cfg.name
        lines += ["", f"At {choice.budget_gb:g} GiB on {REAL[task.backend]} (weights share {choice.share:.3f}; "
                  f"{'/'.join(metrics)}), each corrected and uncorrected, against {label} corrected:", "",
                  f"| row | real model's ratio | uncorrected | corrected | corrected − {label} corrected | "
                  f"uncorrected − {label} corrected |", "|---|---|---:|---:|---|---|"]
        for kind, cfg in at:
            rows = results[cfg]
            lines.append(f"| {cfg.name} | {_r(kind, choice.real[kind])} | {quality.fmt(rows, 'lam=0.0', metrics)} | "
                         f"{quality.fmt(rows, 'lam=3.0', metrics)} | "
                         + "<br>".join(paired(rows, "lam=3.0", base, "lam=3.0", m) for m in metrics)
                         + " | "
                         + "<br>".join(paired(rows, "lam=0.0", base, "lam=3.0", m) for m in metrics)
                         + " |")
        if full_rows:
            cells = "<br>".join(paired(full_rows, "full", base, "lam=3.0", m) for m in metrics)
            lines.append(f"| {full_cfg.name} (does not fit) | — | — | {quality.fmt(full_rows, 'full', metrics)} | "
                         f"{cells} | — |")
    return "\n".join(lines)


def budget_config(choice: BudgetChoice, kind: str) -> Config | None:
    """The row a budget runs for `kind` (None: none). lowrank-nf4 is not run where nf4 fits: at any ratio < 1 it
    stores fewer elements of the same layers in the same 4 bits, so nf4 (full rank) is the one to compare."""
    ratio = choice.demo[kind]
    if ratio is None or (kind == "lowrank-nf4" and choice.demo.get("nf4") is not None):
        return None
    return Config(kind, ratio)


def configs_for(choices: list[BudgetChoice], grid: list[float], kinds: tuple[str, ...]) -> list[Config]:
    """Full-model LoRA, lowrank on the grid, and every kind at each budget's demo ratio (deduplicated, in order)."""
    wanted = [Config("full")] + [Config("lowrank", r) for r in grid if "lowrank" in kinds]
    for choice in choices:
        wanted += [c for c in (budget_config(choice, k) for k in choice.demo) if c is not None]
    if "nf4" in kinds:
        wanted.append(Config("nf4", NF4_RATIO))  # the row even where no budget here holds it (reference)
    return list(dict.fromkeys(wanted))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("flux", "vlm", "both"), default="flux")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated run seeds (5 or more for the intervals)")
    parser.add_argument("--budgets", default="8,12", help="real cards in GiB (the real model's planner training peak)")
    parser.add_argument("--grid", default="0.1,0.2,0.3", help="lowrank ratios run whatever the budgets")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--steps", type=int, default=0, help="override the training steps (0: the task's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-only", action="store_true", help="print the budgets and rows, run nothing")
    parser.add_argument("--cached-only", action="store_true",
                        help="report from --out's cache only: run nothing, leave out what it lacks")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = tuple(args.kinds.split(","))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"--kinds: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
    grid = [float(r) for r in args.grid.split(",") if r]
    quality.FLUX_TASK.model, quality.VLM_TASK.model = FLUX_DIR, VLM_DIR
    run_fields = {f.name for f in dataclasses.fields(RunSettings)}
    if "nf4" in "".join(kinds) and "emulator_kind" not in run_fields and not args.memory_only:
        parser.error("this checkout's RunSettings has no emulator_kind: run with --kinds lowrank")
    suggested = {k: v for k, v in demo_suggestions(FLUX_DIR).items() if k in run_fields}
    quality.FLUX_TASK.run = {**suggested, **quality.FLUX_TASK.run}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for task in (quality.FLUX_TASK, quality.VLM_TASK):
        if args.backend not in ("both", task.backend):
            continue
        if args.steps:
            task.run["steps"] = args.steps
        choices = [choose(task.backend, str(task.model), float(b), kinds) for b in args.budgets.split(",")]
        configs = configs_for(choices, grid, kinds)
        memory = memory_table(task.backend, str(task.model), configs, choices)
        if args.memory_only:
            print(memory + "\n", flush=True)
            continue
        work = Path(tempfile.mkdtemp(prefix=f"quality-kinds-{task.backend}-"))
        try:
            results, minutes, computed = benchmark(task, seeds, configs, work,
                                         Path(args.out) / f"quality_kinds_{task.backend}_cache.json",
                                         args.cached_only)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        text = report(task, seeds, results, choices, minutes, computed, memory)
        print(text + "\n", flush=True)
        (Path(args.out) / f"quality_kinds_{task.backend}.md").write_text(text + "\n")
        raw = {cfg.name: rows for cfg, rows in results.items()}
        (Path(args.out) / f"quality_kinds_{task.backend}_items.json").write_text(
            json.dumps(raw, default=lambda a: a.astype(int).tolist()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
