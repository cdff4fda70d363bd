"""Emulator construction speed: seconds and error per solver, on real layer shapes and on massive activations.

    python benchmarks/emulator_speed.py [--device cuda] [--shapes 3072x3072,3072x12288] [--ratios 0.3,0.5]
                                        [--massive 512x128,128x512] [--cases offset,x1e3,x1e4,token,few]

Shapes are `in x out`. Weights are random Gaussian (a flat spectrum: the hardest case for the randomized
solver). Two kinds of rows:

- `--shapes` (default: real layer shapes): the calibration second moment is anisotropic, `C = diag(l) + G Gᵀ`
  with `l` log-spaced over four decades and a rank-64 random part, so whitening does real work; the error is
  measured on the calibration distribution itself.
- `--massive` (default 512x128,128x512; "" for none): calibration inputs with massive activations, as real LLM
  and diffusion-transformer layers have. Ordinary tokens have features whose scales span two decades, mixed by
  a random rotation; max(4096, 2·in) of them are calibrated, with (`--cases`)
    offset  one channel +1000 on every token
    x1e3    two channels x10³ on every token          x1e4  the same, x10⁴
    token   one token among them with 10⁶ in two channels (an attention sink)
    few     in/2 tokens only (C rank-deficient), one channel +1000 on every token
  and the error is measured on 4096 fresh *ordinary* tokens (no massive activations). A "plain SVD" row (no
  statistics) shows what activation awareness is worth there.

Whitening (eigh of C) is timed once per shape and paid once per distinct input by the solvers that need it
("full", "randomized", and "gram" where out > in; "gram" on a layer with out <= in factors W C Wᵀ and never
whitens); "solver s" excludes it, "total s" adds it where the solver needs it. Error is the relative
activation-weighted error ‖X(W-W_E)ᵀ‖/‖XWᵀ‖; "optimum" is that of the dense float64 optimum, `U_k U_kᵀ W` with
`U_k` the top-k left singular vectors of `W S` (`S Sᵀ = C`, float64 eigh and SVD), and "vs optimum" the
solver's relative excess over it (the optimum costs a float64 eigh and SVD per layer: minutes on a CPU for the
real shapes). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emloc.factorize import SOLVERS, low_rank_factors, needs_whitening, whitening  # noqa: E402
from emloc.rules import rank_for_ratio  # noqa: E402

REAL_SHAPES = "3072x3072,3072x12288,12288x3072,3584x18944,5120x27648"
MASSIVE_SHAPES = "512x128,128x512"
MASSIVE_CASES = ("offset", "x1e3", "x1e4", "token", "few")


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronise(device)
    start = time.perf_counter()
    result = fn()
    synchronise(device)
    return result, time.perf_counter() - start


def anisotropic_layer(n_in: int, n_out: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`(W, C)`: the error is measured on the calibration distribution."""
    weight = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    spread = torch.logspace(-2, 2, n_in)[torch.randperm(n_in, generator=g)]
    low = torch.randn(n_in, 64, generator=g)
    second_moment = torch.diag(spread) + low @ low.T
    return weight, second_moment


def massive_layer(n_in: int, n_out: int, case: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(W, C of the calibration tokens, C of 4096 ordinary tokens)`, the statistics summed in float64."""
    weight = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    scales = torch.logspace(-1, 1, n_in, dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))[0]

    def ordinary(count: int) -> torch.Tensor:  # (count, in)
        return (torch.randn(count, n_in, generator=g, dtype=torch.float64) * scales) @ mixing

    x = ordinary(n_in // 2 if case == "few" else max(4096, 2 * n_in))
    hot = torch.randperm(n_in, generator=g)[:2]
    if case in ("offset", "few"):
        x[:, hot[0]] += 1e3
    elif case in ("x1e3", "x1e4"):
        x[:, hot] *= 1e3 if case == "x1e3" else 1e4
    elif case == "token":
        x[0, hot] = 1e6
    else:
        raise ValueError(f"unknown massive-activation case {case!r}; choose from {', '.join(MASSIVE_CASES)}")
    x_ordinary = ordinary(4096)
    return weight, x.T @ x, x_ordinary.T @ x_ordinary


def error_on(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """‖X(W - W_E)ᵀ‖/‖XWᵀ‖ = sqrt(tr(D C Dᵀ) / tr(W C Wᵀ)), D = W - W_E, in float64."""
    w, c = weight.double(), second_moment.double()
    d = w - approx.double()
    return float((((d @ c) * d).sum() / ((w @ c) * w).sum()).sqrt())


def optimum_error(weight: torch.Tensor, calibration: torch.Tensor, ordinary: torch.Tensor | None, rank: int) -> float:
    """The error on `ordinary` (None: on the calibration inputs) of the float64 optimum for `calibration`."""
    w = weight.double()
    lam, q = torch.linalg.eigh(calibration.double())
    m = w @ (q * lam.clamp_min(0).sqrt())  # W S: (out, in)
    if ordinary is None:  # Eckart-Young: the error is the tail of the singular values of W S
        sigma = torch.linalg.svdvals(m)
        return float((sigma[rank:].square().sum() / sigma.square().sum()).sqrt())
    u = torch.linalg.svd(m, full_matrices=False)[0][:, :rank]  # U_k: (out, k)
    return error_on(w, u @ (u.T @ w), ordinary)


def rows_for(weight, calibration, ordinary, label, ratios, solvers, device, plain: bool) -> None:
    """One table row per ratio and solver for one layer; `ordinary` None: the error is on the calibration inputs."""
    n_out, n_in = weight.shape
    measured_on = calibration if ordinary is None else ordinary
    w, c = weight.to(device), calibration.float().to(device)  # statistics as a run keeps them: float32
    white, t_white = timed(lambda: whitening(c), device)
    for ratio in ratios:
        rank = rank_for_ratio(n_in, n_out, ratio)
        best = optimum_error(weight, calibration, ordinary, rank)
        for solver in solvers + (["plain SVD"] if plain else []):
            aware = solver != "plain SVD"
            whitens = aware and needs_whitening(n_out, n_in, solver)
            (u, v), seconds = timed(lambda: low_rank_factors(w, rank, c if aware else None, solver if aware else "full",
                                                             white=white if whitens else None), device)
            error = error_on(weight, (u @ v).cpu(), measured_on)
            total = seconds + (t_white if whitens else 0.0)
            print(f"| {n_in}x{n_out} | {label} | {f'{t_white:.2f}' if whitens else 'not needed'} | {solver} | {ratio} "
                  f"| {rank} | {seconds:.2f} | {total:.2f} | {error:.4f} | {best:.4f} | {error / best - 1:+.2%} |",
                  flush=True)
            del u, v
    white = w = c = None  # free this layer's device copies (not `del`: the timed lambdas above read them)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=REAL_SHAPES, help="comma-separated INxOUT with an anisotropic C; '' for none")
    parser.add_argument("--massive", default=MASSIVE_SHAPES, help="comma-separated INxOUT with massive activations")
    parser.add_argument("--cases", default=",".join(MASSIVE_CASES), help="massive-activation cases")
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
    print(f"device: {name}; torch {torch.__version__}; float32 (eighs float64)\n")
    print("| shape (in x out) | calibration | whitening s | solver | ratio | rank | solver s | total s | error "
          "| optimum | vs optimum |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape in filter(None, args.shapes.split(",")):
        n_in, n_out = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        weight, calibration = anisotropic_layer(n_in, n_out, g)
        rows_for(weight, calibration, None, "anisotropic C", ratios, solvers, device, plain=False)
    for shape in filter(None, args.massive.split(",")):
        n_in, n_out = (int(v) for v in shape.lower().split("x"))
        for case in args.cases.split(","):
            g = torch.Generator(device="cpu").manual_seed(args.seed)
            weight, calibration, ordinary = massive_layer(n_in, n_out, case, g)
            rows_for(weight, calibration, ordinary, f"massive: {case}", ratios, solvers, device, plain=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
