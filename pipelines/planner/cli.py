"""`python launch.py plan`: will a run fit, phase by phase, before anything is downloaded?

    python launch.py plan --model black-forest-labs/FLUX.1-dev --budget-gb 24 --ram-gb 32
    python launch.py plan --model assets/models/demo-flux --device cpu --ram-gb 8
    python launch.py plan --model OpenGVLab/InternVL3-38B-hf --budget-gb 24 --seq-len 2048 --optimizer adamw8bit
    python launch.py plan --list

Prints a markdown table (phase x method -> GiB, what fits) and the recommended compression ratio.
Every flag but --model, --list and --rule comes from PlanSettings (pipelines/planner/planning.py).
Exit codes: 0 planned, 1 nothing fits the budget, 2 bad settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

# Importing emloc imports peft, which imports bitsandbytes; on a CPU-only machine it logs a notice about
# missing CPU kernels that has nothing to do with planning. Silence it before the import.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from emloc.memory import GiB, OPTIMIZERS
from emloc.quantized import EMULATOR_KINDS

from .catalogue import load_meta_model
from .planning import OFFLOAD_MODES, PlanSettings, detect_gpu, plan_run

FLAG_NAMES = {"lora_rank": ["--rank", "--lora-rank"], "lora_targets": ["--lora-target"], "rules": ["--rule"]}
CHOICES = {"emulator_kind": EMULATOR_KINDS, "optimizer": OPTIMIZERS, "offload": OFFLOAD_MODES, "dtype": ("bfloat16", "float16", "float32")}
FLOAT_FIELDS = ("budget_gb", "ratio", "ram_gb")  # default None, so their type cannot be read from the default


def _rule(text: str) -> tuple[str, float]:
    pattern, sep, ratio = text.rpartition("=")
    try:
        if not sep:
            raise ValueError
        return pattern, float(ratio)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rule is REGEX=RATIO (e.g. 'transformer_blocks\\..*=0.3'); got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="catalogue id (see --list), hub id or local model folder")
    parser.add_argument("--list", action="store_true", help="list the catalogue's models and exit")
    parser.add_argument("--trace", action="store_true",
                        help="also run the run's own code on fake tensors at the model's real size (no weights, no "
                             "GPU; about 10-30 s) and print each phase's traced peak beside the formula's")
    first = ("budget_gb", "ram_gb", "device")  # the budgets first
    for f in sorted(dataclasses.fields(PlanSettings), key=lambda f: first.index(f.name) if f.name in first else 9):
        names = FLAG_NAMES.get(f.name, ["--" + f.name.replace("_", "-")])
        help_text = f.metadata.get("help", "")
        if f.name == "rules":
            parser.add_argument(*names, dest=f.name, type=_rule, action="append", default=[],
                                help="REGEX=RATIO compression rule, repeatable; first match wins (overrides --ratio)")
        elif f.name == "lora_targets":
            parser.add_argument(*names, dest=f.name, action="append", default=[], help=help_text + " (repeatable)")
        elif isinstance(f.default, bool):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = float if f.name in FLOAT_FIELDS else str if f.name == "emulator_kind" else type(f.default)
            parser.add_argument(*names, dest=f.name, type=kind, default=f.default, choices=CHOICES.get(f.name),
                                help=help_text)
    return parser


def _list_models() -> str:
    from .catalogue import catalogue

    rows = ["| id | name | family | parameters |", "|---|---|---|---:|"]
    rows += [f"| {e.model_id} | {e.display_name} | {e.family} | {e.published_params / 1e9:.2f} B |"
             for e in catalogue().values()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, print the plan; return the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as stop:  # argparse already printed what was wrong (or the help)
        return int(stop.code or 0)
    if args.list:
        print(_list_models())
        return 0
    if not args.model:
        print("error: give --model (a catalogue id from `launch.py plan --list`, a hub id or a local folder)",
              file=sys.stderr)
        return 2
    try:
        load_meta_model(args.model)  # an unknown model is reported before anything else
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PlanSettings)}
    values["rules"], values["lora_targets"] = tuple(values["rules"]), tuple(values["lora_targets"])
    if values["ram_gb"] is None:
        import psutil

        values["ram_gb"] = psutil.virtual_memory().available / GiB
        print(f"RAM budget: {values['ram_gb']:.2f} GiB available on this machine now (detected; --ram-gb to plan "
              "for another).\n")
    if values["budget_gb"] is None and values["device"] != "cpu":
        gpu = detect_gpu()
        if gpu is None:
            print("error: no CUDA GPU found on this machine, so there is no GPU budget to plan against; "
                  "give one with --budget-gb (e.g. --budget-gb 24 for a 24 GB card), or plan a CPU run with "
                  "--device cpu", file=sys.stderr)
            return 2
        name, total = gpu
        values["budget_gb"] = total / GiB
        print(f"Budget: {name}, {total / GiB:.2f} GiB total memory (detected).\n")
    try:
        plan = plan_run(args.model, PlanSettings(**values))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.to_markdown())
    if plan.recommended is None and plan.emloc_fits() is False:  # no ratio fits, or the given rules do not
        print(f"\nerror: {plan.reason}", file=sys.stderr)
        return 1
    if args.trace:
        return _trace(args.model, values, plan.ratio)
    return 0


def _trace(model: str, values: dict, ratio: float) -> int:
    """Print the trace of every phase beside the formula (pipelines/planner/trace.py), then end the process."""
    import os

    from .trace import format_traces, trace_plan

    shape = {k: v for k, v in values.items() if k not in ("budget_gb", "ram_gb", "ratio")}
    print()
    try:
        print(format_traces(model, values["budget_gb"],
                            trace_plan(model, values["budget_gb"], values["ram_gb"], ratio=ratio, **shape)))
        code = 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    # the stand-in GPU's device guard can abort the interpreter's shutdown after the work is done (trace.main)
    os._exit(code)
