"""The HC2 term with several loss directions per record against an exact expectation (method.md section 4,
"Gradient covariance"; docs/benchmarks.md "hc59").

A linear model with K = 3 outputs per record, ``f_i = Q_i theta`` (``Q_i [K, d]`` orthonormal rows), loss
``(y_i - f_i)' L_i (y_i - f_i) / 2`` with ``y_i = Q_i theta_0 + e_i``, ``e_i ~ N(0, L_i^-1)`` (the information
equality holds: the gradient's covariance is the loss's curvature, so the target is ``V = H``), no penalty. The
in-sample gradients ``c_i = -Q_i' r^_i`` are linear in the Gaussian noise, so the expectation of any form that is
a sum of per-record quadratics in ``c_i`` is that form summed over the noise's square-root columns: exact, no
sampling. The leave-one-out refit of this model is the Woodbury step itself (quadratic loss), so the estimator's
shift is exact here and the covariance carries the whole finite-sample question.
"""
from __future__ import annotations

import sys

import pytest
import torch

import mis_lightning.estimation.estimate  # noqa: F401  (the module, not the function the package exports)

E = sys.modules["mis_lightning.estimation.estimate"]


def _design(n: int = 40, d: int = 15, K: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, d, K, generator=g, dtype=torch.float64))[0].transpose(1, 2)  # [n, K, d]
    # anisotropic curvature: one stiff output direction per record, stiffer on a few records (their A_i
    # then has one large eigenvalue: the case a mean over the directions understates)
    U = torch.linalg.qr(torch.randn(n, K, K, generator=g, dtype=torch.float64))[0]
    lam = torch.tensor([1.0, 0.15, 0.05], dtype=torch.float64).repeat(n, 1)
    lam[:6, 0] = 12.0
    L = (U * lam.unsqueeze(-2)) @ U.transpose(1, 2)
    H = torch.einsum("ikd,ikl,ile->de", Q, L, Q) / n
    return Q, L, H


def _expected_v(Q, L, H) -> torch.Tensor:
    """``E[V_HC2]`` of the library's form: ``c_i = -Q_i' r^_i``, ``r^_i = s_i - L_i Q_i H^-1 sum_j Q_j' s_j / n``
    with ``s_j = L_j e_j ~ N(0, L_j)``; the form is a sum of per-record quadratics in ``c_i`` with record
    factors fixed by the design, so its expectation is its sum over the columns of ``Cov(s)^1/2``."""
    n, K, d = Q.shape
    Hinv = torch.linalg.inv(H)
    Lh = torch.stack([torch.linalg.cholesky(x) for x in L])  # L_j = Lh Lh'
    total = torch.zeros(d, d, dtype=torch.float64)
    for j in range(n):
        for k in range(K):
            s = torch.zeros(n, K, dtype=torch.float64)
            s[j] = Lh[j][:, k]  # one column of Cov(s)^1/2
            pull = Hinv @ torch.einsum("ikd,ik->d", Q, s) / n  # theta_hat - theta_0
            r = s - torch.einsum("ikl,ild,d->ik", L, Q, pull)
            C = -torch.einsum("ikd,ik->id", Q, r)  # the in-sample gradients (their mean is 0: no penalty)
            _, V, _, _ = E._leverage(C, C.T @ C / n, Hinv, Q, L, n, True, {})
            total += V
    return total


@pytest.mark.parametrize("form", ["matrix", "per_direction"])
def test_hc2_is_unbiased_in_every_output_direction(form: str, monkeypatch) -> None:
    """Whitened by the true ``V = H``, ``E[V_HC2]`` is the identity under the matrix form: every eigenvalue
    within 1e-9 of 1 (float64 rounding of a 120-term sum; the form is exact for this model). The per-direction
    form ``1 / (1 - h_i / K)`` (the library's before docs/benchmarks.md "hc59") is unbiased only in each record's
    own ``L_i^-1`` trace: here its eigenvalues read 0.36-0.96, mean 0.73 (the deficit sits in the stiff output
    directions that carry ``H``), so it fails the matrix form's bound by far."""
    monkeypatch.setattr(E, "HC2_FORM", form, raising=False)
    Q, L, H = _design()
    n = Q.shape[0]
    Hinv = torch.linalg.inv(H)
    # the design as intended: no record at the cap, some with one leverage direction well above the mean
    top = torch.stack([torch.linalg.eigvals(L[i] @ Q[i] @ Hinv @ Q[i].T / n).real.max() for i in range(n)])
    h = torch.stack([torch.trace(L[i] @ Q[i] @ Hinv @ Q[i].T / n) for i in range(n)])
    assert float(top.max()) < E.LEVERAGE_CAP
    assert int((top > 2.5 * h / 3).sum()) >= 6
    ev, U = torch.linalg.eigh(H)
    Hmh = (U * ev.rsqrt()) @ U.T
    W = torch.linalg.eigvalsh(Hmh @ _expected_v(Q, L, H) @ Hmh)
    if form == "matrix":
        assert float((W - 1).abs().max()) < 1e-9, W
    else:  # the per-direction form: low along the stiff directions (the A/B switch still reads it)
        assert float(W.min()) < 0.5 and float(W.max()) < 1.0, W


def test_one_direction_records_keep_the_scalar_form(monkeypatch) -> None:
    """Where ``rank(L_i) = 1`` (one output, a two-class softmax) both forms are ``c c' / (1 - h_i)``: the
    matrix switch moves nothing there (bitwise)."""
    g = torch.Generator().manual_seed(3)
    n, d = 30, 8
    J = torch.randn(n, 1, d, generator=g, dtype=torch.float64)
    L = torch.rand(n, 1, 1, generator=g, dtype=torch.float64) + 0.1
    H = torch.einsum("ikd,ikl,ile->de", J, L, J) / n + 0.05 * torch.eye(d, dtype=torch.float64)
    C = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = {}
    for form in ("matrix", "per_direction"):
        monkeypatch.setattr(E, "HC2_FORM", form, raising=False)
        out[form] = E._leverage(C, C.T @ C / n, torch.linalg.inv(H), J, L, n, True, {})
    assert torch.equal(out["matrix"][1], out["per_direction"][1])
    assert torch.equal(out["matrix"][0], out["per_direction"][0])


def test_the_matrix_form_with_a_record_of_tiny_gradient_stays_finite() -> None:
    """A record whose gradient is tiny (a float64 softmax fitted to a logit gap of ~180: ``|c| < 1e-77``) with
    ``R < n`` stored: its rank-one self-term weight ``(c' c^)^2 / |c|^4 - 1`` took ``|c|^4``, which underflows to 0,
    and 0 / 0 made ``V_bar`` (every figure) NaN (docs/benchmarks.md "rv59b"). The weight does not depend on the
    gradient's scale (``c^`` is linear in ``c``): the same ``beta`` at ``|c|`` scaled by 1e-100 as unscaled, and a
    subnormal ``|c|^2`` (nothing left to read) takes the per-direction weight, finite."""
    Q, L, H = _design()
    g = torch.Generator().manual_seed(1)
    R, n, d = 12, 40, H.shape[0]
    C = torch.randn(R, d, generator=g, dtype=torch.float64)
    V = C.T @ C / R
    Hinv = torch.linalg.inv(H)
    beta = {}
    for scale in (1.0, 1e-100, 1e-160):
        Cs = C.clone()
        Cs[0] *= scale
        _, Vs, _, beta[scale] = E._leverage(Cs, V, Hinv, Q[:R], L[:R], n, True, {})
        assert torch.isfinite(Vs).all() and torch.isfinite(beta[scale]).all(), scale
    # exact in real arithmetic; the ratio of two sums of R products: round-off of a few 1e-16
    torch.testing.assert_close(beta[1e-100], beta[1.0], rtol=1e-12, atol=0.0)


def test_one_direction_records_with_a_stored_subset_are_bitwise_the_scalar_sum() -> None:
    """With ``R < n`` stored and every record of one loss direction, ``V_bar`` is the scalar form's
    ``(1 + a_bar) V + kappa (C a - a_bar C)' C`` as summed before the matrix form (the matrix records' terms
    summed apart, none here): bitwise, as docs/benchmarks.md "hc59" says one direction's figures do not move
    (the sum regrouped read 8e-17 of V off it: docs/benchmarks.md "rv59b")."""
    g = torch.Generator().manual_seed(5)
    R, n, d = 50, 400, 30
    C = torch.randn(R, d, generator=g, dtype=torch.float64)
    J = torch.randn(R, 1, d, generator=g, dtype=torch.float64)
    L = torch.rand(R, 1, 1, generator=g, dtype=torch.float64) + 0.1
    Hinv = torch.linalg.inv(torch.einsum("ikd,ikl,ile->de", J, L, J) / R + torch.eye(d, dtype=torch.float64))
    V = C.T @ C / R
    _, got, hp, beta = E._leverage(C, V, Hinv, J, L, n, True, {})
    a = hp / (1 - hp)
    abar, kappa = float(a.mean()), (n - 1) / (n * (R - 1))
    Ca = C * a.unsqueeze(-1)
    want = V * (1.0 + abar) + kappa * ((Ca - abar * C).T @ C)
    assert torch.equal(got, 0.5 * (want + want.T))
    assert torch.equal(beta, (n - R) / (n * (R - 1)) * (a - abar))
