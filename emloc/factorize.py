"""Activation-aware truncated SVD (docs/method.md step 2), the maths behind one emulator layer.

With the calibration second moment `C = Σ_tokens xᵀx = Q diag(l) Qᵀ` (scaled by `trace(C)/in`,
tiny eigenvalues clamped) and `S = Q diag(√l)`, so that `S Sᵀ = C`:

    W S = U Σ Vᵀ,   u = U_k Σ_k^½  (out x k),   v = Σ_k^½ V_kᵀ S⁻¹ = Σ_k^-½ U_kᵀ W  (k x in)

and `W_E = u v = U_k U_kᵀ W` minimises `‖X (W - W_E)ᵀ‖_F` over rank-k matrices. The second form of `v`
(since `V_k = (W S)ᵀ U_k Σ_k⁻¹`) is the one computed: it needs no `S⁻¹` (see `balanced_factors`).
Without statistics `S = I` (plain SVD). Three solvers give the top-k singular pairs of `M = W S`:

- "full":       torch.linalg.svd(M)
- "gram":       eigh of the smaller Gram matrix (`M Mᵀ` or `Mᵀ M`), then the other side by one product;
                for a layer with out <= in and statistics, `M Mᵀ = W C Wᵀ` is formed from `C` directly and
                no whitening is needed (see `output_gram_factors`)
- "randomized": torch.svd_lowrank(M, q = k + oversample, niter) (Halko et al.)

Every eigendecomposition, and every Gram matrix it is taken of, is float64; the products around them are
float32, on the device the caller picks (the layer's, or a GPU). Real LLM and diffusion-transformer layers
have a few input channels 10³-10⁴ times the rest ("massive activations"): C's eigenvalues then span ten
decades or more, and a float32 eigh, whose error is ~1e-7 of the largest eigenvalue, loses the small ones
that weight the ordinary inputs (see EIGEN_FLOOR for the measurements).

Consumer GPUs run float64 at 1/32-1/64 of float32's rate (reviews/gpu-path.md F10), so where the compute device
is such a GPU (`float64_is_fast`) the Gram products are "split": formed in float32 with the dynamic range
taken out first, and only the small pieces that carry it done in float64 (`_gram`, `_weighted_gram_split`); the
eigendecompositions stay float64 on the device (their cost is bound by memory traffic more than by float64
arithmetic), with a retry on the CPU when the GPU's eigensolver fails (`symmetric_eigh`, F11). Every float32
product here runs with TF32 and reduced-precision matmuls off (`exact_float32`), whatever the process set.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

SOLVERS = ("full", "gram", "randomized")
DEFAULT_SOLVER = "gram"  # fastest solver within 0.5% of full SVD's error: benchmarks/emulator_speed.py
# Eigenvalues of C / (trace(C)/in) -- whose mean is 1 -- are clamped to at least EIGEN_FLOOR, so the floor is
# relative to the *mean* eigenvalue and never binds on a real spectrum, however large its top eigenvalue.
# Chosen by measurement on random 512->128 and 128->512 layers, 4096 calibration tokens with massive activations
# (those of tests/test_massive_activations.py and two channels x10^4 on the 512-wide layer too; error on ordinary
# inputs, excess over the float64 optimum, every solver): a floor of 1e-6 binds when two channels are x10^4 on
# every token (512->128: +1.2%, 128->512: +105%), 1e-7 still on the 128-wide one (+3.7%); every floor from 1e-8
# down to 0 is within 0.07% on all of them, rank-deficient C included. 1e-9 sits two decades below the first
# that binds, still clamps the negative rounding of a singular C and, for a float64 C of rank < k, weights the
# input directions C never saw by W's own energy. (The floor used to be 1e-6 of the *largest* eigenvalue: it
# clamped 85 to 511 of the eigenvalues on those layers.)
EIGEN_FLOOR = 1e-9
GRAM_CHUNK = 1024  # columns per float64 block when forming a Gram matrix: the transient stays out x 1024
RANDOMIZED_OVERSAMPLE = 16
RANDOMIZED_POWER_ITERATIONS = 4


FINITE_CHECK_CHUNK = 1 << 22  # elements per chunk of all_finite: 4M, a ~24 MB transient whatever the tensor
PRODUCTS = ("float64", "split")  # how Gram products are formed: see the module docstring
# GPUs whose float64 runs at half float32's rate (P100, V100, A100, H100/H200, B200); every other CUDA device
# (GeForce, RTX workstation, L4/L40, Jetson) runs it at 1/32-1/64 and gets the "split" products
FAST_FLOAT64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
# "split" W C Wᵀ: the MASSIVE_MAX input channels with the largest C_jj (the massive ones, activations 10x the typical
# RMS or more, are among them: a layer has a handful) enter C's rows and columns in float64, the rest in float32
# after equilibration by sqrt(diag C)
MASSIVE_MAX = 256


def _matmul_backends() -> list:
    """The per-backend float32 matmul settings (torch >= 2.9: `torch.backends.<cuda|mkldnn>.matmul.fp32_precision`)."""
    found = []
    for name in ("cuda", "mkldnn"):
        matmul = getattr(getattr(torch.backends, name, None), "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            found.append(matmul)
    return found


@contextlib.contextmanager
def exact_float32():
    """Float32 matmuls in full float32 inside (no TF32 on CUDA, no bfloat16 in oneDNN on the CPU), restoring the
    process's settings on exit. An environment that enables TF32 (`torch.backends.cuda.matmul.allow_tf32 = True`,
    `set_float32_matmul_precision("high")`) would otherwise round Σxᵀx and the factorisation products to 10 bits of
    mantissa and lose the small eigenvalues this module keeps (reviews/gpu-path.md F17). Set through the
    per-backend `fp32_precision` ("ieee"), which reads and restores whichever API the user set it with."""
    backends = _matmul_backends()
    if not backends:  # an older torch: the legacy flags only
        saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved[0])
            torch.backends.cuda.matmul.allow_tf32 = saved[1]
        return
    saved = [matmul.fp32_precision for matmul in backends]
    for matmul in backends:
        matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        for matmul, value in zip(backends, saved):
            matmul.fp32_precision = value


def _exact(function):
    """`function` run inside exact_float32."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with exact_float32():
            return function(*args, **kwargs)
    return wrapper


def float64_is_fast(device: torch.device | str) -> bool:
    """Whether `device` runs float64 at a useful rate: the CPU, and the CUDA devices of FAST_FLOAT64_CAPABILITIES.
    Any other accelerator is taken to be a consumer GPU's kind (slow or no float64), so it gets the "split"
    products; the planner counts that path, and the dry run's stand-in GPU (emloc/trace.py) traces it."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    return tuple(torch.cuda.get_device_capability(device)) in FAST_FLOAT64_CAPABILITIES


def products_for(device: torch.device | str) -> str:
    """"float64" Gram products where float64 is fast, "split" elsewhere (see the module docstring)."""
    return "float64" if float64_is_fast(device) else "split"


def factorisation_placement(device: torch.device | str) -> dict[str, str]:
    """Where and in what precision the factorisation of a layer on `device` runs, as emulator.json records it:
    {"device", "gram_products" ("float64" or "split"), "eigh" ("float64 on <device>; retried on cpu on failure")}."""
    device = torch.device(device)
    return {"device": str(device), "gram_products": products_for(device),
            "eigh": f"float64 on {device}" + ("" if device.type == "cpu" else "; retried on cpu if it fails")}


@functools.cache
def _announce(where: str, products: str) -> None:
    log.info("emulator factorisation on %s: Gram products %s, eigendecompositions float64 on %s", where,
             "in float64" if products == "float64" else "in float32 with the massive channels in float64", where)


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh` of a symmetric float64 matrix (lower triangle read), ascending, on the matrix's device,
    guarded against eigensolver failures (reviews/gpu-path.md F11: cuSOLVER has failed on rank-deficient
    matrices such as the modulation layers' statistics, PyTorch issues #94772 and #105359).

    The diagonal is shifted by `EIGEN_FLOOR·trace/n` first, and the shift taken off the eigenvalues again (the
    eigenvectors of `A + εI` are those of `A`): exact matrices of rank 0 or with a zero trace then still have a
    positive diagonal. A shift does not separate repeated eigenvalues, so on a RuntimeError (torch.linalg.LinAlgError,
    a cuSOLVER status error, out of memory) or a non-finite result the eigh is retried on the CPU in float64, and if
    LAPACK's eigh fails there too, the SVD of the same matrix (another LAPACK algorithm) gives it. The matrix is
    modified in place (it is always the caller's own float64 temporary). Returns float64 tensors on its device."""
    device, n = matrix.device, matrix.shape[0]
    shift = float(EIGEN_FLOOR * matrix.diagonal().abs().sum() / max(n, 1))
    matrix.diagonal().add_(shift)
    attempts = [("eigh", device)] + ([("eigh", torch.device("cpu"))] if device.type != "cpu" else []) + \
        [("svd", torch.device("cpu"))]
    for index, (how, where) in enumerate(attempts):
        try:
            a = matrix.to(where)
            if how == "eigh":
                eigenvalues, vectors = torch.linalg.eigh(a)
            else:  # A = U S Vᵀ: for a symmetric A the eigenvalues are S with the sign of uᵢ·vᵢ
                u, sv, vh = torch.linalg.svd(a)
                eigenvalues = sv * torch.sign((u * vh.T).sum(0))
                eigenvalues, order = eigenvalues.sort()
                vectors = u[:, order]
            if not (all_finite(eigenvalues) and all_finite(vectors)):
                raise torch.linalg.LinAlgError(f"eigh on {where} returned NaN or inf")
        except RuntimeError as err:  # LinAlgError is a RuntimeError; so are cuSOLVER statuses and device OOM
            if index == len(attempts) - 1:
                raise
            log.warning("%s of a %dx%d float64 matrix on %s failed (%s); retrying with %s on %s", how, n, n, where,
                        str(err).splitlines()[0][:200], *attempts[index + 1])
            continue
        eigenvalues -= shift
        if index:
            log.info("the %dx%d eigendecomposition was done by %s on %s in float64", n, n, how, where)
        return eigenvalues.to(device), vectors.to(device)
    raise AssertionError("unreachable")


def all_finite(tensor: torch.Tensor) -> bool:
    """`torch.isfinite(tensor).all()` in chunks: on a 15 360² statistic the one-shot check allocates `abs`
    (0.88 GiB) and two boolean masks, the whole of a 0.66 GiB miss of the FLUX calibration peak."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(FINITE_CHECK_CHUNK))


@dataclass
class Whitening:
    """`S = Q diag(√l)`, kept as its parts: `W S` is one product and a column scaling."""

    q: torch.Tensor  # (in, in) orthonormal eigenvectors of C
    sqrt_l: torch.Tensor  # (in,)

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """`W S`: (out, in) @ (in, in) -> (out, in)."""
        return (w @ self.q) * self.sqrt_l


def _energy_scale(c: torch.Tensor) -> torch.Tensor:
    """`trace(C)/in`, the scale both factorisations divide C by; a ValueError when C holds no energy."""
    scale = torch.trace(c) / c.shape[0]
    if not torch.isfinite(scale) or scale <= 0:
        raise ValueError("calibration second moment has no positive energy (all inputs were zero?)")
    return scale


def _top_eigen(gram: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` leading eigenvectors of a symmetric (float64) Gram matrix and the square roots of their
    eigenvalues (the singular values), largest first, returned in `dtype`."""
    eigenvalues, vectors = symmetric_eigh(gram)  # ascending; reads the lower triangle only
    return vectors[:, -rank:].flip(-1).to(dtype), eigenvalues[-rank:].flip(-1).clamp_min(0).sqrt().to(dtype)


def _gram64(a: torch.Tensor) -> torch.Tensor:
    """`a aᵀ` in float64 for a (small, big) float32 `a`, GRAM_CHUNK columns at a time: (small, small).

    The entries of a Gram matrix of a layer with massive activations span ~10¹⁰; float32 accumulation would
    bury the small eigenvalues under rounding of ~1e-7 of the largest.
    """
    gram = torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64, device=a.device)
    for block in a.split(GRAM_CHUNK, dim=1):
        block = block.double()  # (small, chunk)
        gram.addmm_(block, block.T)
    return gram


def _gram(a: torch.Tensor, products: str) -> torch.Tensor:
    """`a aᵀ` (small, small) in float64 for a (small, big) float32 `a`. "split": the rows are scaled to unit norm
    (n), `â âᵀ` is a float32 product of numbers of one size, and `a aᵀ = diag(n) (â âᵀ) diag(n)` is rescaled in
    float64: each entry keeps float32's relative precision however the rows' norms differ, which is where a
    whitened layer's range sits (the columns of `W S` are scaled by √l)."""
    if products == "float64":
        return _gram64(a)
    norms = a.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (small,)
    unit = a / norms[:, None]
    gram = (unit @ unit.T).double()  # (small, big) @ (big, small): float32 products
    norms = norms.double()
    return gram.mul_(norms[:, None]).mul_(norms[None, :])


def whitening(second_moment: torch.Tensor) -> Whitening:
    """Eigen-decompose the calibration second moment `C` into a whitening transform `S`, `S Sᵀ ≈ C`.

    The eigh runs in float64 (see the module docstring); `S` is kept in float32.
    """
    c = second_moment.to(torch.float64, copy=True)  # (in, in); the caller's statistics stay as they are
    c /= _energy_scale(c)
    # accumulated in floating point, C is symmetric only up to rounding: eigh reads its lower triangle only
    eigenvalues, q = symmetric_eigh(c)
    del c
    sqrt_l = eigenvalues.clamp_min(EIGEN_FLOOR).sqrt()  # the mean eigenvalue is 1 here
    return Whitening(q=q.float(), sqrt_l=sqrt_l.float())


def top_singular(m: torch.Tensor, rank: int, solver: str,
                 products: str = "float64") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` singular triplets `(U_k (out,k), Σ_k (k,), V_k (in,k))` of `m` by `solver`."""
    if solver == "full":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    if solver == "gram":
        return _gram_svd(m, rank, products)
    if solver == "randomized":
        q = min(rank + RANDOMIZED_OVERSAMPLE, *m.shape)
        u, s, v = torch.svd_lowrank(m, q=q, niter=RANDOMIZED_POWER_ITERATIONS)
        return u[:, :rank], s[:rank], v[:, :rank]
    raise ValueError(f"unknown svd solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def _gram_svd(m: torch.Tensor, rank: int, products: str = "float64") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # eigh of the smaller Gram matrix costs min(out,in)^3 instead of a full SVD of M; squaring doubles the
    # decades M's singular values span, which float32 cannot hold for a layer with massive activations
    # (+8% error on a 128->512 layer with two channels x10^3), so the Gram and its eigh are float64
    # (or, "split", the Gram is equilibrated float32 rescaled in float64: _gram).
    out_f, in_f = m.shape
    wide = out_f <= in_f
    vectors, sigma = _top_eigen(_gram(m if wide else m.T, products), rank, m.dtype)  # (small, small)
    safe = sigma.clamp_min(sigma.max().clamp_min(1e-30) * 1e-7)
    if wide:
        return vectors, sigma, (m.T @ vectors) / safe  # V_k = Mᵀ U_k Σ_k⁻¹
    return (m @ vectors) / safe, sigma, vectors  # U_k = M V_k Σ_k⁻¹


def needs_whitening(out_features: int, in_features: int, solver: str) -> bool:
    """Whether `low_rank_factors` whitens `C` (an in x in eigh) for this layer shape and solver."""
    return not (solver == "gram" and out_features <= in_features)


def _weighted_gram64(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`W C Wᵀ` in float64 from `w` (out, in) and `c` (in, in), one GRAM_CHUNK² block of `c` at a time.

    Float64 because W C Wᵀ has C's dynamic range (see `_gram64`); blockwise so that no float64 copy of W
    or C exists: the transient is (out, chunk) twice and (chunk, chunk).
    """
    n_out, n_in = w.shape
    gram = torch.zeros(n_out, n_out, dtype=torch.float64, device=w.device)
    for cols in range(0, n_in, GRAM_CHUNK):
        right = slice(cols, cols + GRAM_CHUNK)
        wc = torch.zeros(n_out, min(GRAM_CHUNK, n_in - cols), dtype=torch.float64, device=w.device)
        for rows in range(0, n_in, GRAM_CHUNK):
            left = slice(rows, rows + GRAM_CHUNK)
            wc.addmm_(w[:, left].double(), c[left, right].double())  # (out, chunk) @ (chunk, chunk)
        gram.addmm_(wc, w[:, right].double().T)  # (W C)[:, right] @ W[:, right]ᵀ -> (out, out)
    return gram


def _massive_channels(c: torch.Tensor) -> torch.Tensor:
    """Indices of the input channels whose rows and columns of C enter in float64: the MASSIVE_MAX largest
    diagonal entries (int64, on C's device), which hold every massive channel (C_jj above 100x the median) a layer
    has in practice. Always that many, massive or not: the split is exact for any set of channels, extra
    ones only add float64 precision, and a fixed count keeps every shape independent of the values (the dry run
    traces this code on tensors without values)."""
    return c.diagonal().argsort(descending=True)[:MASSIVE_MAX]


def _weighted_gram_split(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`W C Wᵀ` (out, out) in float64 from float32 products: with J the massive channels and R the rest,

        W C Wᵀ = W_R C_RR W_Rᵀ + P W_Jᵀ + W_J P_Rᵀ,   P = W C_{:,J},  P_R = W_R C_RJ,

    where W_R C_RR W_Rᵀ = (W_R D) Ĉ (W_R D)ᵀ, Ĉ = D⁻¹ C_RR D⁻¹ (D = √diag C: unit diagonal), is formed in float32
    one GRAM_CHUNK² block of C at a time, and the rank-|J| terms in float64 (out·in·|J| operations). What float32
    cannot hold, the 10⁶-10¹² ratio of massive to ordinary channels, is in the float64 terms only."""
    n_out, n_in = w.shape
    hot = _massive_channels(c)
    root = c.diagonal().float().clamp_min(torch.finfo(torch.float32).tiny).sqrt()  # D, (in,)
    a = w * root  # W D: (out, in) float32
    a[:, hot] = 0  # W_R D: the massive columns enter below, in float64
    inverse = 1 / root
    gram = torch.zeros(n_out, n_out, dtype=torch.float32, device=w.device)
    for cols in range(0, n_in, GRAM_CHUNK):
        right = slice(cols, cols + GRAM_CHUNK)
        ac = torch.zeros(n_out, min(GRAM_CHUNK, n_in - cols), dtype=torch.float32, device=w.device)
        for rows in range(0, n_in, GRAM_CHUNK):
            left = slice(rows, rows + GRAM_CHUNK)
            block = c[left, right].float() * inverse[left, None] * inverse[None, right]  # Ĉ block: (chunk, chunk)
            ac.addmm_(a[:, left], block)  # (out, chunk) @ (chunk, chunk)
        gram.addmm_(ac, a[:, right].T)  # -> (out, out)
    del a, ac
    gram = gram.double()
    if len(hot):
        c_hot = c[:, hot].double()  # C_{:,J}: (in, |J|)
        w_hot = w[:, hot].double()  # W_J: (out, |J|)
        p = torch.zeros(n_out, len(hot), dtype=torch.float64, device=w.device)
        for rows in range(0, n_in, GRAM_CHUNK):
            p.addmm_(w[:, rows:rows + GRAM_CHUNK].double(), c_hot[rows:rows + GRAM_CHUNK])  # W C_{:,J}
        p_rest = p - w_hot @ c_hot[hot]  # W_R C_RJ = W C_{:,J} - W_J C_JJ
        gram.addmm_(p, w_hot.T).addmm_(w_hot, p_rest.T)
    return gram


@torch.no_grad()
@_exact
def output_gram_factors(w: torch.Tensor, second_moment: torch.Tensor, rank: int,
                        products: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of docs/method.md step 2 without whitening, for out <= in (float32 `w`).

    With `S Sᵀ = C` and `W S = U Σ Vᵀ`: `(W S)(W S)ᵀ = W C Wᵀ = U Σ² Uᵀ`, and since
    `V_kᵀ S⁻¹ = Σ_k⁻¹ U_kᵀ W S S⁻¹`, the factors are `u = U_k Σ_k^½`, `v = Σ_k^-½ U_kᵀ W`: the
    same `W_E = U_k U_kᵀ W`, from an out x out eigh instead of an in x in one and no `S⁻¹`. On
    FLUX's single-block proj_out (15 360 -> 3072) that is 3072³ instead of 15 360³. `C` is scaled
    by `trace(C)/in` and floored as `whitening` does (`+ EIGEN_FLOOR·I` here: like the clamp, it keeps
    unseen input directions weighted). `W C Wᵀ` and its eigh are float64 (see the module docstring); `products`
    (default: products_for(w.device)) "split" forms W C Wᵀ by `_weighted_gram_split`.
    """
    products = products or products_for(w.device)
    _announce(str(w.device), products)
    c = second_moment.to(w.device)  # float32 or float64, read a block at a time: no copy on the compute device
    scale = _energy_scale(c).double()
    # (out, out); eigh reads its lower triangle, as whitening's reads C's
    g = _weighted_gram64(w, c) if products == "float64" else _weighted_gram_split(w, c)
    del c
    g /= scale
    g.add_(_gram(w, products), alpha=EIGEN_FLOOR)  # W (C/scale + floor·I) Wᵀ
    u_k, sigma = _top_eigen(g, rank, w.dtype)
    return balanced_factors(u_k, sigma, w)


@torch.no_grad()
@_exact
def low_rank_factors(
    weight: torch.Tensor,
    rank: int,
    second_moment: torch.Tensor | None = None,
    solver: str = "full",
    white: Whitening | None = None,
    products: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors `(u (out,k), v (k,in))` of the activation-aware rank-k approximation of `weight`.

    `white` may carry a precomputed whitening of `second_moment` (layers that read the same input,
    such as q/k/v, share one). `products`: how the "gram" solver forms its Gram matrices, "float64" or "split"
    (default: products_for(the weight's device): "split" on a GPU whose float64 is slow).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown svd solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    products = products or products_for(weight.device)
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {', '.join(PRODUCTS)}; got {products!r}")
    w = weight.float()
    if second_moment is not None and not needs_whitening(*w.shape, solver):
        return output_gram_factors(w, second_moment, rank, products)
    _announce(str(w.device), products)
    if white is None and second_moment is not None:
        white = whitening(second_moment.to(w.device))
    m = white.right(w) if white is not None else w  # W S: (out, in)
    u_k, sigma, _ = top_singular(m, rank, solver, products)
    return balanced_factors(u_k, sigma, w)


def balanced_factors(u_k: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`u = U_k Σ_k^½` (out, k) and `v = Σ_k^-½ U_kᵀ W` (k, in) from the top-k left singular pairs of `W S`.

    `v` equals the method's `Σ_k^½ V_kᵀ S⁻¹`, because `V_k = (W S)ᵀ U_k Σ_k⁻¹`, so `V_kᵀ S⁻¹ = Σ_k⁻¹ U_kᵀ W`;
    no `S⁻¹` is applied, so input directions C hardly saw (eigenvalues at the floor) never multiply the
    float32 rounding of the SVD by `1/√floor` (with S⁻¹, a 1.6% element error at floor 1e-9 on a C from
    fewer tokens than inputs; 1e-6 this way). Singular values below 1e-7 of the largest are clamped there
    (a rank above the rank of W S).
    """
    root = sigma.clamp_min(sigma.max().clamp_min(1e-30) * 1e-7).sqrt()
    return u_k * root, (u_k.T @ w) / root[:, None]


@torch.no_grad()
@_exact
def weighted_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor | None) -> float:
    """Relative activation-weighted error `‖X (W - W_E)ᵀ‖_F / ‖X Wᵀ‖_F`, i.e. with `C = XᵀX`
    `sqrt(tr(D C Dᵀ) / tr(W C Wᵀ))`, `D = W - W_E`; the Frobenius error when `C` is None."""
    w = weight.float()
    d = w - approx.float()
    if second_moment is None:
        return float(d.norm() / w.norm().clamp_min(1e-30))
    c = second_moment.float().to(w.device)
    num = (d @ c).mul_(d).sum()  # in place: `(d @ c) * d` held one more out x in float32 beside w, d and W_E
    del d
    den = (w @ c).mul_(w).sum()
    return float((num.clamp_min(0) / den.clamp_min(1e-30)).sqrt())
