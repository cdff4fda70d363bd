"""Activation-aware truncated SVD (DESIGN.md step 2), the maths behind one emulator layer.

With the calibration second moment `C = Σ_tokens xᵀx = Q diag(l) Qᵀ` (scaled by `trace(C)/in`,
tiny eigenvalues clamped) and `S = Q diag(√l)`, so that `S Sᵀ = C`:

    W S = U Σ Vᵀ,   u = U_k Σ_k^½  (out x k),   v = Σ_k^½ V_kᵀ S⁻¹  (k x in),   S⁻¹ = diag(1/√l) Qᵀ

and `W_E = u v` minimises `‖X (W - W_E)ᵀ‖_F` over rank-k matrices. Without statistics `S = I`
(plain SVD). Three solvers give the top-k singular triplets of `M = W S`:

- "full":       torch.linalg.svd(M)
- "gram":       eigh of the smaller Gram matrix (`M Mᵀ` or `Mᵀ M`), then the other side by one product;
                for a layer with out <= in and statistics, `M Mᵀ = W C Wᵀ` is formed from `C` directly and
                no whitening is needed (see `output_gram_factors`)
- "randomized": torch.svd_lowrank(M, q = k + oversample, niter) (Halko et al.)

All maths runs in float32 on the device the caller picks (the layer's, or a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SOLVERS = ("full", "gram", "randomized")
DEFAULT_SOLVER = "gram"  # fastest solver within 0.5% of full SVD's error: benchmarks/emulator_speed.py
EIGEN_FLOOR = 1e-6  # eigenvalues of the scaled C below this (relative to the largest) are clamped to it
RANDOMIZED_OVERSAMPLE = 16
RANDOMIZED_POWER_ITERATIONS = 4


FINITE_CHECK_CHUNK = 1 << 22  # elements per chunk of all_finite: 4M, a ~24 MB transient whatever the tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """`torch.isfinite(tensor).all()` in chunks: on a 15 360² statistic the one-shot check allocates `abs`
    (0.88 GiB) and two boolean masks, the whole of a 0.66 GiB miss of the FLUX calibration peak."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(FINITE_CHECK_CHUNK))


@dataclass
class Whitening:
    """`S = Q diag(√l)` and `S⁻¹ = diag(1/√l) Qᵀ`, kept as their parts so that no inverse is ever formed."""

    q: torch.Tensor  # (in, in) orthonormal eigenvectors of C
    sqrt_l: torch.Tensor  # (in,)

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """`W S`: (out, in) @ (in, in) -> (out, in)."""
        return (w @ self.q) * self.sqrt_l

    def inverse_right(self, m: torch.Tensor) -> torch.Tensor:
        """`M S⁻¹`: (k, in) -> (k, in)."""
        return (m / self.sqrt_l) @ self.q.T


def _energy_scale(c: torch.Tensor) -> torch.Tensor:
    """`trace(C)/in`, the scale both factorisations divide C by; a ValueError when C holds no energy."""
    scale = torch.trace(c) / c.shape[0]
    if not torch.isfinite(scale) or scale <= 0:
        raise ValueError("calibration second moment has no positive energy (all inputs were zero?)")
    return scale


def _top_eigen(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` leading eigenvectors of a symmetric Gram matrix and the square roots of their eigenvalues
    (the singular values), largest first."""
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    return vectors[:, -rank:].flip(-1), eigenvalues[-rank:].flip(-1).clamp_min(0).sqrt()


def whitening(second_moment: torch.Tensor) -> Whitening:
    """Eigen-decompose the calibration second moment `C` into a whitening transform `S`, `S Sᵀ ≈ C`."""
    c = second_moment.float()
    c = (c + c.T) * 0.5  # accumulated in floating point, C is symmetric only up to rounding
    eigenvalues, q = torch.linalg.eigh(c / _energy_scale(c))
    eigenvalues = eigenvalues.clamp_min(EIGEN_FLOOR * eigenvalues.max().clamp_min(1e-30))
    return Whitening(q=q, sqrt_l=eigenvalues.sqrt())


def top_singular(m: torch.Tensor, rank: int, solver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` singular triplets `(U_k (out,k), Σ_k (k,), V_k (in,k))` of `m` by `solver`."""
    if solver == "full":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    if solver == "gram":
        return _gram_svd(m, rank)
    if solver == "randomized":
        q = min(rank + RANDOMIZED_OVERSAMPLE, *m.shape)
        u, s, v = torch.svd_lowrank(m, q=q, niter=RANDOMIZED_POWER_ITERATIONS)
        return u[:, :rank], s[:rank], v[:, :rank]
    raise ValueError(f"unknown svd solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def _gram_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # eigh of the smaller Gram matrix costs min(out,in)^3 instead of a full SVD of M; squaring
    # loses the smallest singular values in float32, but those are exactly the ones truncated away.
    out_f, in_f = m.shape
    wide = out_f <= in_f
    vectors, sigma = _top_eigen(m @ m.T if wide else m.T @ m, rank)  # (small, small)
    safe = sigma.clamp_min(sigma.max().clamp_min(1e-30) * 1e-7)
    if wide:
        return vectors, sigma, (m.T @ vectors) / safe  # V_k = Mᵀ U_k Σ_k⁻¹
    return (m @ vectors) / safe, sigma, vectors  # U_k = M V_k Σ_k⁻¹


def needs_whitening(out_features: int, in_features: int, solver: str) -> bool:
    """Whether `low_rank_factors` whitens `C` (an in x in eigh) for this layer shape and solver."""
    return not (solver == "gram" and out_features <= in_features)


def _power_max_eigenvalue(c: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """The largest eigenvalue of the symmetric positive semi-definite `c`, by power iteration."""
    x = torch.ones(c.shape[0], dtype=c.dtype, device=c.device)
    value = torch.zeros((), dtype=c.dtype, device=c.device)
    for _ in range(iterations):
        y = c @ x
        value = y.norm()
        if value <= 0:
            break
        x = y / value
    return value


@torch.no_grad()
def output_gram_factors(w: torch.Tensor, second_moment: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of DESIGN.md step 2 without whitening, for out <= in (float32 `w`).

    With `S Sᵀ = C` and `W S = U Σ Vᵀ`: `(W S)(W S)ᵀ = W C Wᵀ = U Σ² Uᵀ`, and since
    `V_kᵀ S⁻¹ = Σ_k⁻¹ U_kᵀ W S S⁻¹`, the factors are `u = U_k Σ_k^½`, `v = Σ_k^-½ U_kᵀ W`: the
    same `W_E = U_k U_kᵀ W`, from an out x out eigh instead of an in x in one and no `S⁻¹`. On
    FLUX's single-block proj_out (15 360 -> 3072) that is 3072³ instead of 15 360³. `C` is scaled
    by `trace(C)/in` and floored as `whitening` does (`+ floor·l_max·I` here: it changes the kept
    eigenvalues by a relative 1e-6 and, like the clamp, keeps unseen input directions weighted).
    """
    c = second_moment.to(w.device).float()  # no copy for float32 statistics on the compute device
    scale = _energy_scale(c)
    floor = EIGEN_FLOOR * _power_max_eigenvalue(c) / scale
    g = (w @ c) @ w.T  # (out, out); symmetrising g symmetrises C (C is symmetric only up to rounding)
    del c
    g = (g + g.T) * (0.5 / scale)
    g += floor * (w @ w.T)  # W (C/scale + floor·I) Wᵀ
    u_k, sigma = _top_eigen(g, rank)
    root = sigma.clamp_min(sigma.max().clamp_min(1e-30) * 1e-7).sqrt()
    return u_k * root, (u_k.T @ w) / root[:, None]


@torch.no_grad()
def low_rank_factors(
    weight: torch.Tensor,
    rank: int,
    second_moment: torch.Tensor | None = None,
    solver: str = "full",
    white: Whitening | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors `(u (out,k), v (k,in))` of the activation-aware rank-k approximation of `weight`.

    `white` may carry a precomputed whitening of `second_moment` (layers that read the same input,
    such as q/k/v, share one).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown svd solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    w = weight.float()
    if second_moment is not None and not needs_whitening(*w.shape, solver):
        return output_gram_factors(w, second_moment, rank)
    if white is None and second_moment is not None:
        white = whitening(second_moment.to(w.device))
    m = white.right(w) if white is not None else w  # W S: (out, in)
    u_k, sigma, v_k = top_singular(m, rank, solver)
    root = sigma.sqrt()
    u = u_k * root  # U_k Σ_k^½: (out, k)
    v = root[:, None] * v_k.T  # Σ_k^½ V_kᵀ: (k, in)
    if white is not None:
        v = white.inverse_right(v)  # ... S⁻¹
    return u, v


@torch.no_grad()
def weighted_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor | None) -> float:
    """Relative activation-weighted error `‖X (W - W_E)ᵀ‖_F / ‖X Wᵀ‖_F`, i.e. with `C = XᵀX`
    `sqrt(tr(D C Dᵀ) / tr(W C Wᵀ))`, `D = W - W_E`; the Frobenius error when `C` is None."""
    w = weight.float()
    d = w - approx.float()
    if second_moment is None:
        return float(d.norm() / w.norm().clamp_min(1e-30))
    c = second_moment.float().to(w.device)
    num = ((d @ c) * d).sum()
    den = ((w @ c) * w).sum()
    return float((num.clamp_min(0) / den.clamp_min(1e-30)).sqrt())
