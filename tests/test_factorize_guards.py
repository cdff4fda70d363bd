"""The factorisation's guards for the GPU path (reviews/gpu-path.md F11, F17), checked on the CPU: an eigensolver
that fails is retried (cuSOLVER has failed on rank-deficient statistics), a rank-deficient C shaped like a
modulation layer's gives the dense float64 answer, and TF32 switched on by the user changes nothing."""

from __future__ import annotations

import logging

import pytest
import torch

from emloc import low_rank_factors, rank_for_ratio
from emloc.calibration import StatsCollector
from emloc.factorize import (
    EIGEN_FLOOR,
    exact_float32,
    factorisation_placement,
    symmetric_eigh,
)


def modulation_layer(n_in=192, n_out=1152, samples=8, seed=0):
    """A layer shaped like FLUX's norm1.linear (3072 -> 18432, 6x wider) scaled down 16x, whose input is one
    token per calibration sample (silu(temb)): C = XᵀX has rank `samples` in `n_in` dimensions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
    x = torch.nn.functional.silu(torch.randn(samples, n_in, generator=g, dtype=torch.float64) * 2)
    return w, x


def dense_reference(w, c, rank):
    """docs/method.md step 2 in float64 by full SVD: C scaled by trace(C)/in, eigenvalues floored at EIGEN_FLOOR,
    S = Q diag(√l), W_E = U_k U_kᵀ W with U_k the top-k left singular vectors of W S."""
    values, q = torch.linalg.eigh(c / (torch.trace(c) / c.shape[0]))
    u = torch.linalg.svd(w @ (q * values.clamp_min(EIGEN_FLOOR).sqrt()), full_matrices=False)[0][:, :rank]
    return u @ u.T @ w


def failing_once(monkeypatch):
    """torch.linalg.eigh raises LinAlgError on its first call only, as cuSOLVER did in PyTorch #94772."""
    real, calls = torch.linalg.eigh, []

    def eigh(a, *args, **kwargs):
        calls.append(a.shape)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


@pytest.mark.parametrize("products", ["float64", "split"])
def test_rank_deficient_modulation_statistics_give_the_dense_float64_answer(products):
    w, x = modulation_layer()
    c = (x.T @ x).float()  # the statistics as a run keeps them; the reference reads the same numbers in float64
    assert int(torch.linalg.matrix_rank(x.T @ x)) == 8
    rank = rank_for_ratio(w.shape[1], w.shape[0], 0.45)
    assert rank > 8  # the directions C never saw decide most of the rank
    reference = dense_reference(w, c.double(), rank)
    u, v = low_rank_factors(w.float(), rank, c, "gram", products=products)
    approx = (u @ v).double()
    # on the calibration inputs both are exact to float32 rounding
    assert float((x @ (w - approx).T).norm() / (x @ w.T).norm()) < 1e-5
    # off them (directions C never saw) the floor weights inputs by W's own energy: the same error on fresh inputs
    # as the reference (W's singular values there are close together, so which of them fill the last ranks is
    # not unique; the error they leave is)
    fresh = torch.randn(512, w.shape[1], generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def error(a):
        return float((fresh @ (w - a).T).norm() / (fresh @ w.T).norm())

    assert error(approx) <= 1.01 * error(reference), (error(approx), error(reference))
    assert error(approx) < 0.99  # far better than dropping every direction C never saw


def test_an_eigensolver_failure_is_retried_and_gives_the_same_factors(monkeypatch, caplog):
    w, x = modulation_layer()
    c = (x.T @ x).float()
    rank = rank_for_ratio(w.shape[1], w.shape[0], 0.45)
    expected = low_rank_factors(w.float(), rank, c, "gram")
    calls = failing_once(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="emloc.factorize"):
        got = low_rank_factors(w.float(), rank, c, "gram")
    assert len(calls) >= 2 and "retrying with svd on cpu" in caplog.text
    emulated, reference = got[0] @ got[1], expected[0] @ expected[1]
    assert float((x.float() @ (emulated - reference).T).norm() / (x.float() @ reference.T).norm()) < 1e-5


def test_symmetric_eigh_survives_an_eigensolver_that_always_fails(monkeypatch):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 6, generator=g, dtype=torch.float64)
    matrix = a @ a.T  # rank 6 in 40, positive semi-definite
    l_ref, q_ref = torch.linalg.eigh(matrix)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    values, q = symmetric_eigh(matrix.clone())
    torch.testing.assert_close(values, l_ref, rtol=0, atol=1e-10 * float(l_ref.max()))
    top = slice(-6, None)  # the eigenvectors of the nonzero eigenvalues, up to sign
    torch.testing.assert_close((q[:, top] * q_ref[:, top]).sum(0).abs(), torch.ones(6, dtype=torch.float64),
                               rtol=0, atol=1e-8)


def test_the_diagonal_shift_is_taken_off_the_eigenvalues():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    matrix = a @ a.T
    values, _ = symmetric_eigh(matrix.clone())
    torch.testing.assert_close(values, torch.linalg.eigvalsh(matrix), rtol=0, atol=1e-12 * float(values.max()))


def settings():
    """The float32 matmul settings of both backends, as the per-backend API reads them (it never raises)."""
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)


def test_tf32_switched_on_by_the_user_changes_nothing_and_is_restored():
    """On the CPU the CUDA flag is a no-op, but float32_matmul_precision "medium" lets oneDNN use bfloat16; the
    guard sets full float32 ("ieee") inside and gives the user's settings back afterwards, whichever API set them."""
    w, x = modulation_layer(seed=3)
    c = (x.T @ x).float()
    rank = rank_for_ratio(w.shape[1], w.shape[0], 0.45)
    clean = low_rank_factors(w.float(), rank, c, "gram")
    old = settings()
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cuda.matmul.allow_tf32 = True  # the legacy flag too, as older scripts set it
        user = settings()
        with_tf32 = low_rank_factors(w.float(), rank, c, "gram")
        with exact_float32():
            inside = settings()
        collector = StatsCollector({"layer": torch.nn.Linear(4, 4)})
        with collector:
            collector.targets["layer"](torch.randn(3, 4))
        after = settings()
        legacy = torch.backends.cuda.matmul.allow_tf32  # still readable: the user's state is back as it was
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = old
    assert inside == ("ieee", "ieee")
    assert after == user == ("tf32", "bf16") and legacy is True
    for a, b in zip(with_tf32, clean):
        assert torch.equal(a, b)


def test_the_placement_of_the_factorisation_is_recorded():
    assert factorisation_placement("cpu") == {"device": "cpu", "gram_products": "float64", "eigh": "float64 on cpu"}
