"""The spread term (method.md section 4, "Spread term"): a member narrows the spread of the
release along its own direction as well as shifting its mean, so the per-record leakage is
``TV(N(delta, 1 - h), N(0, 1))`` instead of the pure mean-shift ``2 Phi(delta / 2) - 1``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import functional as F
from mis_lightning.assess import run_estimation
from mis_lightning.config import EstimationConfig
from mis_lightning.estimation.estimate import LEVERAGE_CAP

_SQRT_2PI = math.sqrt(2 * math.pi)


def _tv_quad(delta: float, h: float) -> float:
    """TV of N(delta, 1 - h) against N(0, 1) by adaptive quadrature, split where the densities cross
    (roots from numpy, independent of the library's closed form)."""
    s = math.sqrt(1 - h)
    # the normal densities written out: quad calls f on one float at a time, where scipy.stats'
    # pdf (its generic argument machinery) cost 3.7 of the baseline test's 4 CPU s; the 114
    # records' mean is bitwise the same, the 30 grid values within 1.1e-16 (ts42)
    f = lambda x: abs(math.exp(-0.5 * ((x - delta) / s) ** 2) / (s * _SQRT_2PI)  # noqa: E731
                      - math.exp(-0.5 * x * x) / _SQRT_2PI)
    # log f1 - log f0 = 0  <=>  h x^2 - 2 delta x + delta^2 + (1 - h) log(1 - h) = 0
    roots = sorted(r.real for r in np.roots([h, -2 * delta, delta**2 + (1 - h) * math.log(1 - h)]) if abs(r.imag) < 1e-12)
    knots = [-40.0] + [r for r in roots if -40 < r < 40 + delta] + [40.0 + delta]
    return 0.5 * sum(integrate.quad(f, a, b, epsabs=1e-13, epsrel=1e-11, limit=200)[0] for a, b in zip(knots, knots[1:]))


@pytest.mark.parametrize("delta", [0.0, 1e-3, 0.1, 0.5, 1.5, 4.0])
@pytest.mark.parametrize("h", [1e-6, 0.005, 0.07, 0.3, 0.9])
def test_spread_tv_matches_quadrature(delta: float, h: float) -> None:
    # closed form vs adaptive quadrature: both exact up to rounding; 1e-9 absolute is far above
    # either's error and far below any figure the library reports (4 significant digits)
    got = float(F.spread_tv(torch.tensor(delta, dtype=torch.float64), torch.tensor(h, dtype=torch.float64)))
    assert got == pytest.approx(_tv_quad(delta, h), abs=1e-9)


def test_spread_tv_reproduces_the_documented_ols_figures() -> None:
    # method.md section 4: every record at leverage h, delta = sqrt(h) |z|: +0.44/1.6/5.2/10.8 %
    z = torch.tensor(stats.norm.ppf((np.arange(20000) + 0.5) / 20000), dtype=torch.float64).abs()
    for h, gain in [(0.005, 1.0044), (0.02, 1.0159), (0.07, 1.0516), (0.15, 1.1084)]:
        d = math.sqrt(h) * z
        r = F.spread_tv(d, torch.tensor(h, dtype=torch.float64)).mean() / F.spread_tv(d, torch.tensor(0.0)).mean()
        assert float(r) == pytest.approx(gain, abs=2e-4)


def test_h_zero_is_the_first_order_form_exactly() -> None:
    t = torch.rand(200, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.6
    g = F.saturate(t)
    assert torch.equal(F.saturate_spread(t, None), g)
    assert torch.equal(F.saturate_spread(t, torch.zeros_like(t)), g)
    assert F.with_spread(g, t, None) is g
    assert torch.equal(F.with_spread(g, t, torch.zeros_like(t)), g)
    # continuity: a tiny leverage moves nothing visible
    assert torch.allclose(F.saturate_spread(t, torch.full_like(t, 1e-12)), g, rtol=0, atol=1e-11)


def test_spread_is_monotone_finite_and_quantized_never_above_unquantized() -> None:
    delta = torch.linspace(0, 6, 301, dtype=torch.float64)[:, None]
    h = torch.linspace(0, LEVERAGE_CAP, 200, dtype=torch.float64)[None, :]
    tv = F.spread_tv(delta, h)
    assert bool(torch.isfinite(tv).all()) and bool((tv >= 0).all()) and bool((tv <= 1).all())
    assert bool((tv.diff(dim=0) >= -1e-15).all())  # more shift: more leakage
    assert bool((tv.diff(dim=1) >= -1e-15).all())  # more narrowing: more leakage
    assert bool((tv[:, 1:] >= tv[:, :1] - 1e-15).all())  # never below the mean-shift form
    gen = torch.Generator().manual_seed(1)
    t_u = torch.rand(500, dtype=torch.float64, generator=gen) * 0.8
    t_q = t_u * torch.rand(500, dtype=torch.float64, generator=gen)  # a release keeps part of it
    lev = torch.rand(500, dtype=torch.float64, generator=gen) * LEVERAGE_CAP
    q = F.with_spread(F.saturate(t_q), t_u, lev)
    u = F.with_spread(F.saturate(t_u), t_u, lev)
    assert bool((q <= u + 1e-12).all()) and bool((q >= F.saturate(t_q) - 1e-12).all())
    assert torch.allclose(u, F.saturate_spread(t_u, lev), rtol=0, atol=1e-12)


def _ols(n: int, d: int, seed: int) -> tuple[torch.nn.Module, DataLoader, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = X @ np.linspace(-1, 1, d) + rng.standard_normal(n)
    th = np.linalg.solve(X.T @ X, X.T @ y)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(th, dtype=torch.float32)[None])
    th32 = model.weight.detach().double().numpy()[0]
    ds = TensorDataset(torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    X32, y32 = (t.numpy().astype(np.float64) for t in ds.tensors)
    return model, DataLoader(ds, batch_size=64), X32, y32, th32


def _mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (out[:, 0] - t) ** 2


def test_estimate_carries_the_hat_values_only_with_the_correction() -> None:
    model, loader, X, _, _ = _ols(120, 6, 0)
    hat = np.einsum("ij,jk,ik->i", X, np.linalg.inv(X.T @ X), X)
    def est(**kw):
        return run_estimation(model, loader, _mse, EstimationConfig(num_records=120, **kw))

    e = est(mode="exact")
    assert e.leverage is not None and e.leverage.shape == (120,)
    # the stored records (all of them here, in the estimator's own order; the pairing with the
    # influences is checked end to end below)
    np.testing.assert_allclose(np.sort(e.leverage.numpy()), np.sort(hat), rtol=1e-6)
    assert est(mode="exact", leverage_correction=False).leverage is None
    # the diagonal estimator (hc27): its one mean leverage per direction for every record, here
    # d / n (least squares without decay: the diagonal trace is d); none without the correction
    dg = est(mode="diagonal")
    np.testing.assert_allclose(dg.leverage.numpy(), np.full(120, 6 / 120), rtol=1e-12)
    assert est(mode="diagonal", leverage_correction=False).leverage is None


def test_ols_baseline_is_the_spread_tv_of_the_leave_one_out_shift() -> None:
    """End to end at d / n = 0.07: the unquantized baseline of ``assess`` is the mean over the
    records of TV(N(delta_i, 1 - h_i), N(0, 1)) with the leave-one-out (HC2) shift
    ``delta_i^2 = c~_i' V_HC2^-1 c~_i / n`` (method.md section 4), recomputed here in numpy with
    quadrature. The first-order mean-shift form reads ~5% lower here, so the old code fails."""
    n, d = 114, 8
    model, loader, X, y, th = _ols(n, d, 3)
    e = y - X @ th
    A = np.linalg.inv(X.T @ X)
    h = np.einsum("ij,jk,ik->i", X, A, X)
    g = -X * e[:, None]
    c = g - g.mean(0)
    V = (c / (1 - h)[:, None]).T @ c / n  # HC2
    ct = c / (1 - h)[:, None]
    delta = np.sqrt(np.einsum("ij,jk,ik->i", ct, np.linalg.inv(V), ct) / n)
    ref = np.mean([_tv_quad(dl, hh) for dl, hh in zip(delta, h)])
    shift_only = np.mean(2 * stats.norm.cdf(delta / 2) - 1)
    rep = ml.assess(model, ["none"], loader, _mse, num_records=n, uncertainty_draws=0)
    assert rep.diagnostics["leverage_correction"]
    # float32 data and weights against the float64 reference: 1e-5 relative
    assert rep.baseline_leakage == pytest.approx(ref, rel=1e-5)
    assert rep.schemes["none"].leakage == pytest.approx(ref, rel=1e-5)
    assert rep.diagnostics["baseline_leakage_without_spread"] == pytest.approx(shift_only, rel=1e-5)
    assert ref > 1.03 * shift_only


def test_quantized_scheme_stays_below_the_baseline_and_keeps_first_order_without_leverage() -> None:
    model, loader, *_ = _ols(114, 8, 4)
    schemes = ["none", "intx_weight_only_int4", "intx_weight_only_int2"]
    rep = ml.assess(model, schemes, loader, _mse, num_records=114, uncertainty_draws=0)
    old = ml.assess(model, schemes, loader, _mse, num_records=114, uncertainty_draws=0, leverage_correction=False)
    for k in schemes[1:]:
        r = rep.schemes[k]
        assert math.isfinite(r.leakage) and r.leakage <= rep.baseline_leakage * (1 + 1e-9)
        # the spread term never lowers a figure (the first-order value is its h = 0 limit)
        assert r.leakage >= old.schemes[k].leakage * (1 - 1e-9) or r.leakage_independent is not None
    assert "baseline_leakage_without_spread" not in old.diagnostics


def test_gaussian_channel_reduces_to_one_dimension_with_rho() -> None:
    """Correlated Gaussian channel (method.md section 3): ``Y = U + e``, ``Cov e = diag((1 - k)/k)``.
    Member ``U ~ N(mu, R - b b')`` with the narrowing along the shift (``b = sqrt(h) mu / delta_u``),
    non-member ``N(0, R)``. Whitened by ``P = R + Cov e`` both differ along one direction only, so
    the exact TV is ``TV(N(sqrt(mu'P^-1 mu), 1 - b'P^-1 b), N(0, 1))``; the library's ``with_spread``
    on the channel form (``rho = s2_q / s2_u``) must give it to rounding."""
    gen = torch.Generator().manual_seed(5)
    d, R_, n = 5, 16, 300
    A = torch.randn(d, d, dtype=torch.float64, generator=gen)
    cov = A @ A.T + 0.5 * torch.eye(d, dtype=torch.float64)
    sd = cov.diagonal().sqrt()
    corr = cov / sd[:, None] / sd[None, :]
    W = torch.randn(R_, d, dtype=torch.float64, generator=gen) * 3
    kappa = torch.rand(d, dtype=torch.float64, generator=gen) * 0.9 + 0.05
    h = torch.rand(R_, dtype=torch.float64, generator=gen) * 0.3
    rc = F.correlated.RecordCorrelation.full(corr)
    t_u = rc.gaussian_mean_abs(W) / (2 * math.sqrt(n))
    t_q = rc.gaussian_mean_abs(W, kappa) / (2 * math.sqrt(n))
    got = F.with_spread(F.saturate(t_q), t_u, h)
    P = corr + torch.diag((1 - kappa) / kappa)
    mu = W / math.sqrt(n)
    dq2 = torch.einsum("rj,jk,rk->r", mu, torch.linalg.inv(P), mu)
    du2 = torch.einsum("rj,jk,rk->r", mu, torch.linalg.inv(corr), mu)
    want = F.spread_tv(dq2.sqrt(), h * dq2 / du2)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_spread_keeps_saturated_and_empty_records_finite() -> None:
    t = torch.tensor([0.0, 1e-300, 0.3, 50.0, math.inf], dtype=torch.float64)
    h = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    out = F.saturate_spread(t, h)
    assert bool(torch.isfinite(out).all()) and float(out[-1]) == 1.0 and float(out[-2]) == pytest.approx(1.0)
    leak = F.saturate(t)
    got = F.with_spread(leak, t, h)
    assert bool(torch.isfinite(got).all()) and bool((got >= leak - 1e-15).all())
    # a record with no unquantized leakage gets none from the spread either
    assert float(F.with_spread(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                               torch.full((1,), 0.5, dtype=torch.float64))) == 0.0


def test_unquantized_level_against_the_exact_population_truth_of_64_weight_rows() -> None:
    """Regression against an independent exact truth of the population game (random Gaussian
    design; docs/validation.md, eighteenth and nineteenth sessions: ex18 ``sym64``, numpy/scipy
    only, mixtures over 80 designs, pooled over 424 targets: 0.04791 +- 0.00034).
    ``Linear(64, 1)``, ``n = 3000`` (``d / n = 0.021``), noise sd 5, 30 trainings as in ex18.
    Tolerance 1.5%: the truth's se is 0.7% and the mean over 30 trainings' 0.6% (combined 0.9%);
    the first-order-shift level read 0.979 (2.1% low, fails), with the spread term 0.996."""
    rng_t = np.random.default_rng(2)
    theta = rng_t.uniform(-0.5, 0.5, 64)
    theta[3], theta[40] = 1.0, -0.8
    n, d, s = 3000, 64, 5.0
    rng = np.random.default_rng(99)
    vals = []
    for _ in range(30):
        X = rng.standard_normal((n, d))
        y = X @ theta + s * rng.standard_normal(n)
        th = np.linalg.solve(X.T @ X, X.T @ y)
        model = torch.nn.Linear(d, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor(th, dtype=torch.float32)[None])
        ds = TensorDataset(torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
        # one batch of all 3,000 records: the per-batch passes were 60% of the test's time; against
        # batch 256 the 30 figures move by <= 5.6e-16 relative (float64 sums in another order)
        rep = ml.assess(model, ["none"], DataLoader(ds, batch_size=n), _mse, uncertainty_draws=0)
        vals.append(rep.baseline_leakage)
    assert float(np.mean(vals)) / 0.04791 == pytest.approx(1.0, abs=0.015)


@pytest.mark.parametrize("C", [2, 3, 4, 10])
def test_per_direction_leverage_divides_by_the_softmax_rank_whatever_the_rounding(C: int) -> None:
    """A softmax cross-entropy's loss Hessian ``L = diag(p) - p p'`` has rank ``C - 1`` exactly
    (its null direction is the all-ones vector); numerically that eigenvalue is ~1e-16 and
    ``matrix_rank``'s float64 default tolerance counted it for ~40% of the records at C = 2,
    halving their per-direction leverage (the spread term and HC2 correction) at random."""
    from mis_lightning.estimation.estimate import _leverage

    g = torch.Generator().manual_seed(1)
    R, d, n = 400, 5, 1000
    p = (2 * torch.randn(R, C, generator=g, dtype=torch.float64)).softmax(-1)  # no class below ~1e-4
    L = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    J = torch.randn(R, C, d, generator=g, dtype=torch.float64)
    C_ = torch.randn(R, d, generator=g, dtype=torch.float64)
    diag: dict = {}
    _, _, hp, _ = _leverage(C_, torch.eye(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64) * 0.5,
                         J, L, n, True, diag)
    A = L @ (J @ (0.5 * J.transpose(1, 2))) / n
    h = torch.diagonal(A, dim1=1, dim2=2).sum(-1)
    torch.testing.assert_close(hp, h / (C - 1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("estimation", ["exact", "diagonal"])
def test_the_independent_value_beside_a_correlated_headline_carries_the_spread_term(estimation: str) -> None:
    """``SchemeResult.leakage_independent`` is the figure ``covariance="independent"`` gives (the
    same estimate and first-order sums): only the covariance form differs. It was the first-order
    value while the headline had the spread term (fu28: a 2,100-weight ridge at d / n = 0.26 whose
    factor and independent headlines were both 0.2065 showed "independent-coordinate value 0.1798"
    beside them; the spread term alone was +15%). Deterministic (Gaussian form, no draws): 1e-9."""
    model, loader, *_ = _ols(114, 8, 4)
    schemes = ["none", "intx_weight_only_int4"]
    kw = dict(num_records=114, uncertainty_draws=0, estimation=estimation, method="clt")
    auto = ml.assess(model, schemes, loader, _mse, **kw)
    indep = ml.assess(model, schemes, loader, _mse, covariance="independent", **kw)
    assert auto.diagnostics["leverage_correction"]
    for k in schemes:
        assert auto.schemes[k].covariance != "independent"
        assert auto.schemes[k].leakage_independent == pytest.approx(indep.schemes[k].leakage, rel=1e-9)
    assert auto.diagnostics["baseline_leakage_independent"] == pytest.approx(indep.baseline_leakage, rel=1e-9)
