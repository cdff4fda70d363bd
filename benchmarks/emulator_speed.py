"""Emulator construction speed: seconds and error per solver, on real layer shapes.

    python benchmarks/emulator_speed.py [--device cuda] [--shapes 3072x3072,3072x12288] [--ratios 0.3,0.5]

Shapes are `in x out`. Weights are random Gaussian (a flat spectrum: the hardest case for the
randomized solver); the calibration second moment is anisotropic, `C = diag(l) + G Gᵀ` with `l`
log-spaced over four decades and a rank-64 random part, so whitening does real work. Whitening
(eigh of C) is timed once per shape and paid once per distinct input by the solvers that need it
("full", "randomized", and "gram" where out > in; "gram" on a layer with out <= in factors W C Wᵀ and
never whitens); "solver s" excludes it, "total s" adds it where the solver needs it. Error is the
relative activation-weighted error ‖X(W-W_E)ᵀ‖/‖XWᵀ‖; "vs full" its relative excess over full SVD's.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emloc.factorize import SOLVERS, low_rank_factors, needs_whitening, weighted_error, whitening  # noqa: E402
from emloc.rules import rank_for_ratio  # noqa: E402

REAL_SHAPES = "3072x3072,3072x12288,12288x3072,3584x18944,5120x27648"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronise(device)
    start = time.perf_counter()
    result = fn()
    synchronise(device)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=REAL_SHAPES, help="comma-separated INxOUT")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ratios = [float(r) for r in args.ratios.split(",")]
    solvers = args.solvers.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    warm = torch.randn(256, 128, device=device)  # first LAPACK/cuSOLVER calls pay one-off set-up costs
    for solver in solvers:
        low_rank_factors(warm, 16, warm.T @ warm, solver)
    print(f"device: {name}; torch {torch.__version__}; float32\n")
    print("| shape (in x out) | whitening s | solver | ratio | rank | solver s | total s | error | vs full |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        n_in, n_out = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        weight = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(device)
        spread = torch.logspace(-2, 2, n_in)[torch.randperm(n_in, generator=g)]
        low = torch.randn(n_in, 64, generator=g)
        second_moment = (torch.diag(spread) + low @ low.T).to(device)
        del low
        white, t_white = timed(lambda: whitening(second_moment), device)
        for ratio in ratios:
            rank = rank_for_ratio(n_in, n_out, ratio)
            errors = {}
            for solver in solvers:
                whitens = needs_whitening(n_out, n_in, solver)
                (u, v), seconds = timed(lambda: low_rank_factors(weight, rank, second_moment, solver,
                                                                 white=white if whitens else None), device)
                errors[solver] = weighted_error(weight, u @ v, second_moment)
                excess = errors[solver] / errors["full"] - 1 if "full" in errors else float("nan")
                total = seconds + (t_white if whitens else 0.0)
                print(f"| {n_in}x{n_out} | {f'{t_white:.2f}' if whitens else 'not needed'} | {solver} | {ratio} | {rank} "
                      f"| {seconds:.2f} | {total:.2f} | {errors[solver]:.4f} | {excess:+.2%} |", flush=True)
                del u, v
        del weight, second_moment, white
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
