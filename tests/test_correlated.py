"""The correlated headline (functional/correlated.py, method.md section 3 "Correlated
coordinates") against exact box-conditional means, its limits, collinear inputs, the factor
model and the pool protocol."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import assess
from mis_lightning import functional as F
from mis_lightning.functional.correlated import RCOND as C_RCOND
from mis_lightning.functional.correlated import (
    Correlation,
    RecordCorrelation,
    correlated_mc_mean_abs,
)
from mis_lightning.groundtruth.correlated_reference import bivariate_exact_mean_abs, exact_mean_abs

SQ = math.sqrt(2 / math.pi)


def _equicorrelated(d: int, rho: float) -> torch.Tensor:
    return (1 - rho) * torch.eye(d, dtype=torch.float64) + rho * torch.ones(d, d, dtype=torch.float64)


def _grid_stats(step: torch.Tensor, offset: torch.Tensor, half: int = 40) -> F.CellStatistics:
    k = torch.arange(-half, half + 1, dtype=torch.float64)
    edges = (k.unsqueeze(0) + offset.unsqueeze(1)) * step.unsqueeze(1)
    d = step.numel()
    return F.cell_statistics(torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64), edges)


@pytest.mark.parametrize("d,rho,step", [(2, 0.9, 0.5), (3, 0.6, 1.0), (3, 0.9, 1.0), (5, 0.9, 0.25)])
def test_fine_grids_match_exact_box_means(d, rho, step):
    # Steps <= 1 sd: the issue's 5% target. The reference's outer Monte Carlo error is ~1.2%
    # (4,000 boxes), so 5% plus 2 standard errors cannot pass a form that ignores the
    # correlation (the independent form is off by 10-30% here, checked below).
    g = torch.Generator().manual_seed(d * 10 + int(rho * 10))
    R = _equicorrelated(d, rho)
    w = torch.randn(3, d, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(R).T
    h, off = torch.full((d,), step, dtype=torch.float64), torch.rand(d, dtype=torch.float64, generator=g)
    exact, se = exact_mean_abs(R, w, h, off, num_boxes=4000, budget=3_000_000)
    stats = _grid_stats(h, off)
    approx = SQ * Correlation(full=R).quadratic(w, stats.kappa).sqrt()
    assert torch.all((approx - exact).abs() <= 0.05 * exact + 2 * se), (approx / exact)
    mc, mc_se = correlated_mc_mean_abs(Correlation(full=R), w, stats.kappa, torch.arange(d), stats, 20000,
                                       torch.Generator().manual_seed(1))
    assert torch.all((mc - exact).abs() <= 0.05 * exact + 2 * (se + mc_se)), (mc / exact)
    independent = SQ * (w.square() @ stats.kappa).sqrt()
    assert torch.any((independent - exact).abs() > 0.08 * exact)  # the correlation matters here


def test_limits_of_the_channel_form():
    g = torch.Generator().manual_seed(0)
    d = 6
    A = torch.randn(d, d, dtype=torch.float64, generator=g)
    Sigma = A @ A.T + 0.1 * torch.eye(d, dtype=torch.float64)
    R = F.correlated.correlation_from_covariance(Sigma)
    w = torch.randn(5, d, dtype=torch.float64, generator=g)
    c = Correlation(full=R)
    maha = (w * torch.linalg.solve(R, w.T).T).sum(-1)
    # kappa = 1: the Mahalanobis form; kappa = 0: nothing; any kappa: never above kappa = 1
    assert torch.allclose(c.quadratic(w), maha, rtol=1e-9)
    assert torch.allclose(c.quadratic(w, torch.ones(d, dtype=torch.float64)), maha, rtol=1e-9)
    assert torch.all(c.quadratic(w, torch.zeros(d, dtype=torch.float64)) == 0)
    for _ in range(20):
        k = torch.rand(d, dtype=torch.float64, generator=g)
        assert torch.all(c.quadratic(w, k) <= maha * (1 + 1e-9))
        k2 = k * torch.rand(d, dtype=torch.float64, generator=g)  # coarser everywhere
        assert torch.all(c.quadratic(w, k2) <= c.quadratic(w, k) * (1 + 1e-9))
    # a diagonal correlation gives the independent form sum_j w_j^2 kappa_j exactly
    k = torch.rand(d, dtype=torch.float64, generator=g)
    assert torch.allclose(Correlation(full=torch.eye(d, dtype=torch.float64)).quadratic(w, k),
                          w.square() @ k, rtol=1e-12)


def _ols(X: torch.Tensor, y: torch.Tensor) -> nn.Linear:
    """Least squares with an intercept (minimum-norm solution when columns repeat)."""
    m = nn.Linear(X.shape[1], 1).double()
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    theta = torch.linalg.pinv(Xa) @ y[:, 0]
    with torch.no_grad():
        m.weight.copy_(theta[:-1].unsqueeze(0))
        m.bias.copy_(theta[-1:])
    return m


def _loss(out, t):
    return (out - t).square().squeeze(-1)


def test_collinear_features_give_the_same_baseline_every_run():
    # Duplicated feature columns make Sigma singular; the pseudo-inverse (eigendecomposition
    # with a cutoff) gives the baseline of the model without the duplicates, on every run.
    g = torch.Generator().manual_seed(3)
    n = 300
    X = torch.randn(n, 4, dtype=torch.float64, generator=g)
    y = (X @ torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64) + 0.5 * torch.randn(n, dtype=torch.float64,
                                                                                             generator=g))[:, None]
    Xd = torch.cat([X, X[:, :2]], 1)
    values = []
    for Xi in (X, Xd, Xd, Xd):
        m = _ols(Xi, y)
        dl = DataLoader(TensorDataset(Xi, y), batch_size=50)
        r = assess(m, ["none"], dl, _loss, estimation="exact", weight_decay=0.0, num_records=n, uncertainty_draws=0)
        assert r.estimation["covariance"] == "full"
        values.append(r.baseline_leakage)
    assert values[1] == values[2] == values[3]
    assert values[1] == pytest.approx(values[0], rel=1e-6)


def test_pool_protocol_and_game_are_reported():
    g = torch.Generator().manual_seed(4)
    n = 200
    X = torch.randn(n, 3, dtype=torch.float64, generator=g)
    y = (X.sum(1) + torch.randn(n, dtype=torch.float64, generator=g))[:, None]
    m = _ols(X, y).float()  # torchao's int8 takes float32 weights
    dl = DataLoader(TensorDataset(X.float(), y.float()), batch_size=50)
    r = assess(m, ["none", "int8_weight_only"], dl, _loss, estimation="exact", weight_decay=0.0, num_records=n,
               uncertainty_draws=0)
    # unquantized: 2 Phi(delta / 2) - 1 in the population game, 2 Phi(sqrt(2) delta / 2) - 1 in the pool protocol
    est_mahal = r.schemes["none"]
    assert est_mahal.pool_leakage == pytest.approx(r.baseline_pool_leakage, rel=1e-12)
    assert r.baseline_pool_leakage > r.baseline_leakage * 1.3
    assert "population" in r.game and "pool" in r.game
    assert r.schemes["int8_weight_only"].pool_leakage <= r.baseline_pool_leakage * (1 + 1e-9)
    assert r.schemes["none"].leakage == pytest.approx(r.baseline_leakage, rel=1e-12)
    back = type(r).from_dict(r.to_dict())
    assert back.baseline_pool_leakage == r.baseline_pool_leakage


def test_factor_model_is_close_to_the_full_form():
    # A model where both run: the cross-fitted factor model from the stored records against
    # the full correlation of the exact estimator (d = 9, 400 records).
    g = torch.Generator().manual_seed(5)
    n = 400
    Z = torch.randn(n, 3, dtype=torch.float64, generator=g)
    X = torch.cat([Z, Z @ torch.randn(3, 5, dtype=torch.float64, generator=g)
                   + 0.3 * torch.randn(n, 5, dtype=torch.float64, generator=g)], 1)
    y = (X[:, :3].sum(1) + torch.randn(n, dtype=torch.float64, generator=g))[:, None]
    m = _ols(X, y)
    dl = DataLoader(TensorDataset(X, y), batch_size=100)
    out = {}
    for cov in ("full", "factor"):
        r = assess(m, ["none"], dl, _loss, estimation="exact", weight_decay=0.0, num_records=n,
                   uncertainty_draws=0, covariance=cov)
        out[cov] = r.baseline_leakage
    # Cross-fitted (out-of-sample) Mahalanobis norms of an inverted sample correlation of 200
    # records run above the full form (Wishart: ~m / (m - d - 1)): +5% here before the factor
    # model corrected it (inverse-Wishart scaling, Tyler's shape, left-out directions at their
    # mean eigenvalue), -0.4% after; within 4% (the folds' own noise).
    assert out["factor"] == pytest.approx(out["full"], rel=0.04)


def test_covariance_option_errors_name_the_fix():
    with pytest.raises(ValueError, match="covariance must be"):
        F  # noqa: B018
        from mis_lightning.config import ScoringConfig
        ScoringConfig(covariance="diag")
    w = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=">= 8 stored records"):
        RecordCorrelation.cross_fitted(w, 2)


@pytest.mark.parametrize("d,rho,steps", [(5, 0.9, [4.0] * 5), (6, 0.9, [4.0] * 3 + [0.25] * 3), (4, 0.6, [8.0] * 4)])
def test_coarse_correlated_weights_follow_the_exact_boxes(d, rho, steps):
    # Coarse grids with strong correlation: the joint boxes carry information a combination of
    # the coordinates' own cell means misses (the copula form reads up to 25% low there). The
    # exact box-mean form (GHK over the coarse weights, the channel for the fine ones) must be
    # within 5% of the reference plus 2 standard errors of each (both Monte Carlo, ~2-4%).
    g = torch.Generator().manual_seed(int(10 * rho) + d)
    R = _equicorrelated(d, rho)
    h = torch.tensor(steps, dtype=torch.float64)
    off = torch.rand(d, dtype=torch.float64, generator=g)
    w = torch.randn(3, d, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(R).T
    exact, se = exact_mean_abs(R, w, h, off, num_boxes=3000, budget=3_000_000)
    stats = _grid_stats(h, off)
    coarse = torch.nonzero(stats.kappa < F.FINE_KAPPA).squeeze(-1)
    k = torch.arange(-40, 41, dtype=torch.float64)
    alpha = ((k.unsqueeze(0) + off.unsqueeze(1)) * h.unsqueeze(1))[coarse]
    value, vse = F.correlated.exact_box_mean_abs(Correlation(full=R), w, stats.kappa, coarse, alpha,
                                                 generator=torch.Generator().manual_seed(3))
    assert torch.all((value - exact).abs() <= 0.05 * exact + 2 * (se + vse)), value / exact


def test_monte_carlo_forms_carry_little_noise_where_the_cells_are_nearly_gaussian():
    """Both Monte Carlo forms (the exact box means and the copula cells) with their default
    draws, on cells fine enough (0.3 sd) that ``E|.|`` is the Gaussian form's
    ``sqrt(2/pi) sd`` to ~1e-3: the mean over records must be within 1% of it. The draws
    are common to all records, so without the control variate (the Gaussian channel on the
    same draws) the mean keeps a ~1/sqrt(draws) error: 2-4% measured at 1,024 draws; with it
    the box form's spread over seeds is about 0.4% (seeds 0-5: 0.993-1.006, mean 0.998)."""
    d, rho = 8, 0.6
    R = _equicorrelated(d, rho)
    g = torch.Generator().manual_seed(11)
    h = torch.full((d,), 0.3, dtype=torch.float64)
    off = torch.rand(d, dtype=torch.float64, generator=g)
    w = torch.randn(6, d, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(R).T
    stats = _grid_stats(h, off)
    corr = Correlation(full=R)
    everything = torch.arange(d)
    k = torch.arange(-40, 41, dtype=torch.float64)
    alpha = (k.unsqueeze(0) + off.unsqueeze(1)) * h.unsqueeze(1)
    gauss = math.sqrt(2 / math.pi) * corr.quadratic(w, stats.kappa).sqrt()
    for seed in range(3):
        box, _ = F.correlated.exact_box_mean_abs(corr, w, stats.kappa, everything, alpha,
                                                 generator=torch.Generator().manual_seed(seed))
        cop, _ = F.correlated.correlated_mc_mean_abs(corr, w, stats.kappa, everything, stats, 1024,
                                                     torch.Generator().manual_seed(seed))
        for value in (box, cop):
            assert abs(float(value.mean() / gauss.mean()) - 1) < 0.01, (seed, value / gauss)


@pytest.mark.parametrize("rho,step,offset", [(0.5, 4.0, 0.5), (0.5, 4.0, 0.0), (0.8, 8.0, 0.2), (0.5, 2.0, 0.3)])
def test_exact_box_form_against_the_bivariate_closed_form(rho, step, offset):
    """Every weight coarse, ``d = 2``: against an exact sum over the cells (Tallis' truncated
    bivariate normal means, cell probabilities by quadrature; no simulation). Mid-cell at 4 sd
    the simulator's noise inside ``|.|`` read 15-20% high with plain GHK draws (antithetic pairs
    and a sum over the distinct boxes since); now within 0.5% over 8 seeds (standard errors
    0.2-0.8%), so 3% is a bound the old form fails at the mid-cell positions."""
    g = torch.Generator().manual_seed(int(100 * rho + 10 * step))
    R = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    w = torch.randn(3, 2, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(R).T
    h = torch.full((2,), step, dtype=torch.float64)
    off = torch.full((2,), offset, dtype=torch.float64)
    exact = bivariate_exact_mean_abs(rho, w, h, off)
    k = torch.arange(-40, 41, dtype=torch.float64)
    alpha = (k.unsqueeze(0) + off.unsqueeze(1)) * h.unsqueeze(1)
    kappa = _grid_stats(h, off).kappa
    value, se = F.correlated.exact_box_mean_abs(Correlation(full=R), w, kappa, torch.arange(2), alpha,
                                                generator=torch.Generator().manual_seed(0))
    assert torch.all(se <= 0.01 * exact), se / exact
    assert torch.all((value / exact - 1).abs() <= 0.03), value / exact


def test_bivariate_closed_form_is_the_independent_product_at_rho_zero():
    """The reference itself at ``rho = 0``: each coordinate's cell means are then the
    univariate truncated means, and ``E|a_1 m_1 + a_2 m_2|`` a double sum over 1-d cells."""
    from mis_lightning.groundtruth.correlated_reference import _Phi, _phi

    h, off = torch.tensor([3.0, 5.0], dtype=torch.float64), torch.tensor([0.3, 0.5], dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0], [0.5, 0.7]], dtype=torch.float64)
    cells = []
    for j in range(2):
        e = torch.cat([torch.tensor([-math.inf], dtype=torch.float64),
                       (torch.arange(-6, 7, dtype=torch.float64) + off[j]) * h[j],
                       torch.tensor([math.inf], dtype=torch.float64)])
        lo, hi = e[:-1], e[1:]
        p = _Phi(hi) - _Phi(lo)
        m = torch.where(p > 0, (_phi(lo) - _phi(hi)) / p.clamp_min(1e-300), 0.0)  # far cells: no mass
        cells.append((p, m))
    (p1, m1), (p2, m2) = cells
    want = (p1[:, None, None] * p2[None, :, None]
            * (m1[:, None, None] * w[:, 0] + m2[None, :, None] * w[:, 1]).abs()).sum((0, 1))
    got = bivariate_exact_mean_abs(0.0, w, h, off)
    assert torch.allclose(got, want, rtol=1e-10), (got, want)


def test_exact_box_form_with_every_coarse_weight_pinned_keeps_a_control_variate():
    """Coarse weights whose one box spans +-8 sd (kappa ~ 0, e.g. a 2-bit zero cell) next to
    unquantized ones: ``E[U_C | box, Y_F] = E[U_C | Y_F]`` to 1e-15, so the exact value is the
    Gaussian ``sqrt(2/pi) sd(E[a'U | Y_F])`` per record. Without a control variate the mean kept
    the shared outer draws' ~1/sqrt(1024) error (4% spread over seeds in a 4-weight OLS model);
    the fine weights' surrogate brings it within 0.2% at every seed."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 4, dtype=torch.float64, generator=g)
    C = A @ A.T + 2 * torch.eye(4, dtype=torch.float64)
    R = C / torch.outer(C.diag().sqrt(), C.diag().sqrt())
    w = torch.randn(6, 4, dtype=torch.float64, generator=g)
    kappa = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    alpha = torch.tensor([[-8.0, 8.0], [-8.0, 8.0]], dtype=torch.float64)
    a = torch.linalg.solve(R, w.T).T                              # R^-1 w
    t = (a @ R[:, 2:]).T                                          # Cov(Y_F, a'U), Y_F = U_F
    sd = (t * torch.linalg.solve(R[2:, 2:], t)).sum(0).sqrt()
    exact = math.sqrt(2 / math.pi) * sd
    for seed in range(4):
        value, se = F.correlated.exact_box_mean_abs(Correlation(full=R), w, kappa, torch.arange(2), alpha,
                                                    generator=torch.Generator().manual_seed(seed))
        assert torch.all((value / exact - 1).abs() <= 2e-3), (seed, value / exact)
        assert torch.all(se <= 2e-3 * exact)


@pytest.mark.parametrize("d,m,rho", [(64, 256, 0.0), (101, 512, 0.0), (101, 512, 0.5), (300, 256, 0.0), (8, 256, 0.9)])
def test_factor_model_scores_new_records_without_inflation(d, m, rho):
    """The cross-fitted factor model scores records it was not fitted on; its mean
    ``sqrt(w' A^-1 w)`` must match the true correlation's. Influences with a per-record scale
    (regression residuals, classifier errors multiply a record's whole influence). The old
    model read 1.16 (d = 64: inverse-Wishart), 1.27-1.50 (d = 101 > rank 64: left-out
    directions given ~sigma^2 / d) and 1.26 (d = 300 > m: heavy-tailed spectrum); a fresh user
    measured the unquantized headline 15-80% above the exact estimator's. Tolerance: the
    benchmark reads 0.98-1.08 over these settings (benchmarks/factor_correlation_bias.py)."""
    g = torch.Generator().manual_seed(d + m)
    idx = torch.arange(d)
    R = rho ** (idx[:, None] - idx[None, :]).abs().double()
    C = torch.linalg.cholesky(R)

    def draw(k):
        return (torch.randn(k, d, dtype=torch.float64, generator=g) @ C.T) * torch.randn(k, 1, dtype=torch.float64,
                                                                                         generator=g)

    ratios = []
    for _ in range(2):
        corr = F.correlated.Correlation.from_influences(draw(m), 64)
        new = draw(2000)
        truth = (new * torch.linalg.solve(R, new.T).T).sum(-1)
        ratios.append(float(corr.quadratic(new).sqrt().mean() / truth.sqrt().mean()))
    assert 0.94 <= sum(ratios) / 2 <= 1.10


def _ar1_ols(rho: float, n: int = 2000, k: int = 16) -> tuple[nn.Module, DataLoader]:
    """OLS ``nn.Linear(k, 1)`` fitted exactly on an AR(1) Gaussian design (correlation ``rho``)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(k)
    R = rho ** (idx[:, None] - idx[None, :]).abs().double()
    X = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(R).T
    Y = X @ (torch.randn(k, generator=g, dtype=torch.float64) / 4) + torch.randn(n, generator=g, dtype=torch.float64)
    m = nn.Linear(k, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.linalg.lstsq(X, Y.unsqueeze(-1)).solution.T)
    return m, DataLoader(TensorDataset(X, Y), batch_size=500)


def _sq(o, y):
    return (o.squeeze(-1) - y) ** 2


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_diagonal_sigma_on_correlated_weights_is_measured_and_warned(rho):
    """The diagonal sandwich's sigma is the conditional sd of a weight; with an AR(1) design the
    marginal one (exact estimator) is larger by sqrt(VIF), VIF = (1 + rho^2) / (1 - rho^2) = 9.53
    for an interior coordinate at rho = 0.9. The report's variance inflation factor (from the
    stored records' gradients) must read it (within 20%: 2,000 records, a shrunk factor model),
    and the warning must be there at rho = 0.9 and absent at rho = 0 (VIF 1). Since dg30 the
    diagonal sigma carries the K-FAC factor sqrt(VIF) of its Linear layer (exact for one
    least-squares layer): the exact / diagonal sigma ratio is 1 within 10% (sampling of V against
    H; it was sqrt(VIF) = 3.1 before) and the warning says the correction was applied."""
    m, loader = _ar1_ols(rho)
    mse = _sq

    reps = {e: assess(m, ["none"], loader, mse, estimation=e, uncertainty_draws=0) for e in ("diagonal", "exact")}
    vif = reps["diagonal"].diagnostics["variance_inflation_median"]
    want = (1 + rho**2) / (1 - rho**2)
    assert abs(vif - want) <= 0.2 * want, (vif, want)
    warned = [w for w in reps["diagonal"].warnings if "variance inflation factor" in w]
    assert bool(warned) == (rho > 0), warned
    assert "variance_inflation_median" not in reps["exact"].diagnostics
    from mis_lightning.estimation import estimate
    sig = {e: estimate(m, loader, mse, mode=e).sigma["weight"].flatten() for e in ("diagonal", "exact")}
    ratio = float((sig["exact"] / sig["diagonal"]).median())
    assert abs(ratio - 1.0) <= 0.1, (ratio, want)
    if rho > 0:
        assert "Kronecker-factored (K-FAC)" in warned[0], warned
        # ux48: the warning was the K-FAC model and its measured accuracy in full (1,098 characters here,
        # 2,231 on nux47's CNN); it says what was corrected, and the detail is in the report's JSON
        assert len(warned[0]) < 600, len(warned[0])
        detail = reps["diagonal"].diagnostics["variance_inflation_detail"]
        assert "0.81x the exact estimator's" in detail and "0.81x" not in warned[0]
        assert json.loads(reps["diagonal"].to_json())["diagnostics"]["variance_inflation_detail"] == detail


def _within_row_vif(w: torch.Tensor) -> float:
    """The median over the columns of ``w [m, p]`` of ``diag(C^-1) (m - p - 1) / (m - 1)`` (at least 1),
    ``C`` their sample correlation (uncentred second moments: the influences are centred), the lower
    median as ``torch.median`` takes it."""
    m, p = w.shape
    s = w.double().T @ w.double() / m
    c = s / torch.outer(s.diagonal().sqrt(), s.diagonal().sqrt())
    return float((torch.linalg.inv(c).diagonal() * (m - p - 1) / (m - 1)).clamp_min(1.0).median())


def test_diagonal_sigma_check_above_a_quarter_of_the_records_reads_within_rows():
    """d > num_records / 4: the correlation of all d weights is not estimable (a factor model's
    inverse saturates at 1 / shrinkage: median VIF 1,000 on a d / n = 46 ChEMBL MLP); the check
    then reads the VIF within the first row of each weight tensor (a lower bound). OLS on an
    AR(1) design (64 features, 2,000 records), 240 records stored (4 d = 256 > 240): the figure is
    the within-row VIF of the stored records' influences over the row's first 240 / 8 = 30 weights
    (recomputed here to 1e-9), and it estimates the same VIF of all 2,000 records' influences
    within [0.7, 2] times it (rho = 0.9: truth 9.9; 2,000 random 240-record subsets read 0.82-1.63
    times it, the records the content hash keeps are such a subset: m48); warned at rho = 0.9,
    not at rho = 0 (truth 1.03, read below 2). (m48: 48 records of a 16-feature design read 3.10
    against a [4, 16] window, the 11th percentile of 48-record subsets, whose window held for 63%
    of them: the hash-kept records change with the design's last-bit rounding.)"""
    from mis_lightning.assess import run_estimation
    from mis_lightning.config import stage_configs

    k, m_rec = 64, 240
    p = m_rec // 8

    def influences(m, loader, n):
        cfg = stage_configs("assess", None, None, {"estimation": "diagonal", "num_records": n})[0]
        return run_estimation(m, loader, _sq, cfg).influence

    for rho, warned in ((0.9, True), (0.0, False)):
        m, loader = _ar1_ols(rho, k=k)
        rep = assess(m, ["none"], loader, _sq, estimation="diagonal", uncertainty_draws=0, num_records=m_rec)
        vif = rep.diagnostics["variance_inflation_median"]
        w = [x for x in rep.warnings if "within single rows" in x]
        assert bool(w) == warned, (rho, vif, w)
        assert abs(vif - _within_row_vif(influences(m, loader, m_rec)[:, :p])) <= 1e-9 * vif, vif
        truth = _within_row_vif(influences(m, loader, 2000)[:, :p])
        assert 0.7 * truth <= vif <= 2.0 * truth, (rho, vif, truth)
        assert (vif > 2.0) == warned, (rho, vif, truth)


def test_in_sample_correlation_reads_the_exact_baseline_where_records_show_null_directions():
    """A rank-2 LoRA adapter (A, B trainable over a frozen layer: the scaling symmetry leaves
    exact null directions in the influences, d = 32 < R = 512 records). The diagonal estimator's
    headline reads the stored records' own sample correlation (RecordCorrelation.in_sample): its
    unquantized value within 10% of the exact estimator's g'V^+g form (measured 1.03; the
    cross-fitted Tyler-shape factor model read 3.2x). Tolerance 10%: the two estimators'
    records' influences differ. (The quantized figures also carry the diagonal sigma's own
    error on correlated weights, which the variance-inflation warning reports: not tested here.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, generator=g)) + 0.3 * torch.randn(800, generator=g)

    class LoRA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.base, self.head = nn.Linear(8, 8), nn.Linear(8, 1)
            self.A, self.B = nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)
            for p in [*self.base.parameters(), *self.head.parameters()]:
                p.requires_grad_(False)

        def forward(self, x):
            return self.head(torch.tanh(self.base(x) + self.B(self.A(x)))).squeeze(-1)

    m = LoRA()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean() / 2 + 5e-4 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)

    def mse(o, t):
        return 0.5 * (o - t) ** 2

    dl = DataLoader(TensorDataset(x, y), batch_size=100)
    out = {}
    for est in ("exact", "diagonal"):
        r = assess(m, ["rtn_int8"], dl, mse, estimation=est, num_records=512, weight_decay=1e-3,
                   leverage_correction=False if est == "exact" else "auto", uncertainty_draws=0)
        out[est] = (r.baseline_leakage, r.schemes["rtn_int8"].leakage, r.estimation["covariance"])
    assert out["diagonal"][2] == "factor" and out["exact"][2] == "full"
    assert out["diagonal"][0] == pytest.approx(out["exact"][0], rel=0.10)


def test_in_sample_correlation_mean_form_is_the_rank_and_defers_on_independent_rows():
    g = torch.Generator().manual_seed(2)
    # d = 20 < R = 64: the rows show the rank; the mean in-sample form is the rank (trace identity)
    W = torch.randn(64, 20, dtype=torch.float64, generator=g) @ torch.randn(20, 20, dtype=torch.float64, generator=g)
    rc = RecordCorrelation.in_sample(W)
    assert rc is not None and rc.kind == "factor" and rc.fit == "in_sample"
    q = rc.parts[0][1].quadratic(W)
    assert float(q.mean()) == pytest.approx(20.0, rel=1e-4)  # shrinkage 1e-6
    # exact null directions (a rank-12 influence in 20 coordinates): the rank, not d
    W12 = torch.randn(64, 12, dtype=torch.float64, generator=g) @ torch.randn(12, 20, dtype=torch.float64, generator=g)
    assert float(RecordCorrelation.in_sample(W12).parts[0][1].quadratic(W12).mean()) == pytest.approx(12.0, rel=1e-4)
    # d >= R with linearly independent rows: every in-sample form would be R; the caller cross-fits
    assert RecordCorrelation.in_sample(torch.randn(16, 40, dtype=torch.float64, generator=g)) is None
    # d >= R, rank just below R (a spectrum's tail, as on the ChEMBL MPNN: 251 of 256): not a
    # null space, cross-fitted; a clear null space (rank 30 of 64 in 200 coordinates): in-sample
    def rank_rows(r):
        return torch.randn(64, r, dtype=torch.float64, generator=g) @ torch.randn(r, 200, dtype=torch.float64, generator=g)

    assert RecordCorrelation.in_sample(rank_rows(60)) is None
    low = rank_rows(30)
    assert float(RecordCorrelation.in_sample(low).parts[0][1].quadratic(low).mean()) == pytest.approx(30.0, rel=1e-4)
    with pytest.raises(ValueError, match=">= 8 stored records"):
        RecordCorrelation.in_sample(torch.randn(4, 2, dtype=torch.float64))


def test_in_sample_shared_form_is_monotone_at_deficits_near_one_and_matches_a_40_digit_reference():
    """cf55: the in-sample factor form's shared channel ``u'M^-1u`` at deficits ``1 - kappa`` of
    1e-9..1e-6 (the noise ``(1 - kappa)`` against the shrinkage 1e-6 in ``M``'s remainder, so such
    deficits move the form): monotone as the deficits shrink, and each record within 1e-13 of a
    40-digit solve of the ``d x d`` ``M`` (float64 reads ~2e-16 here). The headline's moves the
    other way (rv55r) come from the leave-one-out divisor ``1 + beta(kappa)``, not from here."""
    mpmath = pytest.importorskip("mpmath")
    g = torch.Generator().manual_seed(5)
    W = torch.randn(64, 4, dtype=torch.float64, generator=g) @ torch.randn(4, 20, dtype=torch.float64, generator=g)
    c = RecordCorrelation.in_sample(W).parts[0][1]
    assert c.self_mean and c.factor.shape[1] == 4
    deficit = 10.0 ** (-9 + 3 * torch.rand(20, dtype=torch.float64, generator=g))
    deficit[:5] = 0.5 * torch.rand(5, dtype=torch.float64, generator=g)  # coarse weights, unscaled
    mpmath.mp.dps = 40
    L, res = c.factor.tolist(), c.residual.tolist()

    def reference(k: torch.Tensor, w: torch.Tensor) -> float:
        kk = [mpmath.mpf(x) for x in k.tolist()]
        M = mpmath.matrix(20, 20)
        for i in range(20):
            for j in range(20):
                M[i, j] = mpmath.sqrt(kk[i] * kk[j]) * mpmath.fsum(mpmath.mpf(L[i][a]) * L[j][a] for a in range(4))
            M[i, i] += 1 - kk[i] + kk[i] * mpmath.mpf(res[i])
        u = mpmath.matrix([mpmath.sqrt(kk[i]) * mpmath.mpf(x) for i, x in enumerate(w.tolist())])
        return float((u.T * mpmath.lu_solve(M, u))[0])

    fine = torch.arange(20) >= 5
    forms = []
    for f in (1.1, 1.0, 0.9, 0.5, 0.1):
        k = 1.0 - deficit * torch.where(fine, f, 1.0)
        q = c._factor_quadratic(W[:3], k)
        for i in range(3):
            assert float(q[i]) == pytest.approx(reference(k, W[i]), rel=1e-13)
        forms.append(q)
    for lo, hi in zip(forms, forms[1:]):
        assert bool((hi > lo).all())  # each scaling moves every form by > 1e-10 relative: strict


def _scaled_column_rows(R: int, d: int, big: float) -> torch.Tensor:
    """cf55's rows: rank 4 plus 1e-3 noise in ``d`` coordinates, column 0 times ``big`` (the
    leverage correction at d / n > 1 left stored "unit" influences 1e10 apart in scale)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(R, 4, generator=g, dtype=torch.float64) @ torch.randn(4, d, generator=g, dtype=torch.float64)
    W = W + 1e-3 * torch.randn(R, d, generator=g, dtype=torch.float64)
    W[:, 0] *= big
    return W


def _factor_model_mp(c, k: torch.Tensor):
    """``(mp, kk, D, A, core)``: the factor model ``c``'s ``M = diag(D) + AA'`` at ``k`` and its core
    ``I + A'D^-1A`` in 60 digits (mpmath lists; ``kk`` the kappas)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    L, res = c.factor.tolist(), c.residual.tolist()
    d, r = len(L), len(L[0])
    kk = [mp.mpf(x) for x in k.tolist()]
    D = [max(1 - kk[i] + kk[i] * mp.mpf(res[i]), mp.mpf(C_RCOND)) for i in range(d)]
    A = [[mp.sqrt(kk[i]) * mp.mpf(L[i][a]) for a in range(r)] for i in range(d)]
    core = mp.matrix(r, r)
    for a in range(r):
        for b in range(r):
            core[a, b] = (1 if a == b else 0) + mp.fsum(A[i][a] * A[i][b] / D[i] for i in range(d))
    return mp, kk, D, A, core


def _factor_form_reference(c, k: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """``u'M^-1u`` of the factor model ``c`` at ``k`` in 60 digits (Woodbury in mpmath: rank <= 4)."""
    mp, kk, D, A, core = _factor_model_mp(c, k)
    d, r = len(A), len(A[0])
    out = []
    for w in rows.tolist():
        u = [mp.sqrt(kk[i]) * mp.mpf(x) for i, x in enumerate(w)]
        y = mp.matrix([mp.fsum(A[i][a] * u[i] / D[i] for i in range(d)) for a in range(r)])
        out.append(float(mp.fsum(u[i] ** 2 / D[i] for i in range(d)) - (y.T * mp.lu_solve(core, y))[0]))
    return out


def test_factor_forms_keep_their_digits_at_any_column_scale_against_a_60_digit_reference(monkeypatch):
    """cf56: the in-sample factor form ``u'M^-1u`` (plain, the stored rows themselves) of rows whose
    column 0 is 1e3-1e9 times the rest, at d / R = 40 / 64 and 64 / 32, unquantized and quantized:
    Woodbury's difference and the stationary form read it up to 1e10 times off (s / q up to 5e17;
    the headline read 0 or a wrong finite figure); the variational form at the core's solution
    (``Correlation._variational``) reads it to 1e-12 (measured <= 1.4e-13; float64 input)."""
    import mis_lightning.functional.correlated as C

    worst_old = 0.0
    for R, d in ((64, 40), (32, 64)):
        kq = 1.0 - 0.5 * torch.rand(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for big in (1e3, 1e6, 1e9):
            W = _scaled_column_rows(R, d, big)
            c = RecordCorrelation.in_sample(W, loo=False).parts[0][1]
            for k in (torch.ones(d, dtype=torch.float64), kq):
                ref = torch.tensor(_factor_form_reference(c, k, W[:2]), dtype=torch.float64)
                q = c._factor_quadratic(W[:2], k)
                assert torch.allclose(q, ref, rtol=1e-12, atol=0.0), (R, d, big, q, ref)
                monkeypatch.setattr(C, "FACTOR_FORM_VARIATIONAL", False)  # the old forms, unchecked
                monkeypatch.setattr(C, "FACTOR_FORM_CHECK", False)
                worst_old = max(worst_old, float(((c._factor_quadratic(W[:2], k) - ref) / ref).abs().max()))
                monkeypatch.setattr(C, "FACTOR_FORM_VARIATIONAL", True)
                monkeypatch.setattr(C, "FACTOR_FORM_CHECK", True)
    assert worst_old > 1.0  # what the old forms read on the same rows: off by orders


def test_every_factor_form_that_cannot_be_certified_reads_nan(monkeypatch):
    """cf56: each form that leaves Woodbury's plain difference is bracketed, rounding included, and
    reads NaN where the bracket is wider than ``FACTOR_FORM_RTOL`` of it: the plain in-sample form
    and a layer's wide block (``_factor_quadratic``), the leave-one-out own rows
    (``_certified_solve``), a layer's narrow block (``_narrow_quadratic``: a Cholesky of an ``M``
    past float64 succeeds with digits of nothing) and a factor model built directly (the
    cross-fitted parts' class; their own fits, unit columns with a 1e-3 remainder, keep
    ``s / q <= d / 1e-3``). Without the check each read a finite value off by >= 1e-4 (up to
    orders) here."""
    import mis_lightning.functional.correlated as C

    def both(fn):
        on = fn()
        monkeypatch.setattr(C, "FACTOR_FORM_CHECK", False)
        off = fn()
        monkeypatch.setattr(C, "FACTOR_FORM_CHECK", True)
        return on, off

    # the old (stationary) value at x1e9 is off by orders: the check makes it NaN
    monkeypatch.setattr(C, "FACTOR_FORM_VARIATIONAL", False)
    W = _scaled_column_rows(64, 40, 1e9)
    ones = torch.ones(40, dtype=torch.float64)
    c = RecordCorrelation.in_sample(W, loo=False).parts[0][1]
    ref = torch.tensor(_factor_form_reference(c, ones, W[:3]), dtype=torch.float64)
    for form in (lambda: c._factor_quadratic(W[:3], ones),                      # plain in-sample
                 lambda: c.restrict(slice(0, 20))._factor_quadratic(W[:3, :20], ones[:20]),  # wide block
                 lambda: c._certified_solve(W[:3], ones)[1]):                    # leave-one-out's v'M^-1v
        on, off = both(form)
        assert bool(on.isnan().all()) and bool(off.isfinite().all())
    assert float(((both(lambda: c._factor_quadratic(W[:3], ones))[1] - ref) / ref).abs().min()) > 1.0
    monkeypatch.setattr(C, "FACTOR_FORM_VARIATIONAL", True)
    # a narrow block (d = 2 <= rank 2): certified at columns 1e6 times the rest, its own value (the
    # reference to 1e-13); at 1e16 the bracket's variational end (t = A'x) cannot tell and the
    # Woodbury path cannot certify either, but M (condition 11) is well conditioned: the residual's
    # bound certifies it (cf57; NaN before, conservatively), the reference to 1e-13
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 40, generator=g, dtype=torch.float64)
    X = X + 1e-2 * torch.randn(64, 40, generator=g, dtype=torch.float64)
    X[:, 0] *= 1e16
    X[:, 1] *= 1e16 / 3
    blk = RecordCorrelation.in_sample(X, loo=False).parts[0][1].restrict(slice(0, 2))
    assert blk.factor.shape[0] <= blk.factor.shape[1]
    k4 = torch.ones(2, dtype=torch.float64)
    assert torch.allclose(blk._factor_quadratic(X[:4, :2], k4),
                          torch.tensor(_factor_form_reference(blk, k4, X[:4, :2]), dtype=torch.float64),
                          rtol=1e-13, atol=0.0)
    monkeypatch.setattr(C, "FACTOR_FORM_RESIDUAL_BOUND", False)
    assert bool(blk._factor_quadratic(X[:4, :2], k4).isnan().all())
    monkeypatch.setattr(C, "FACTOR_FORM_RESIDUAL_BOUND", True)
    # a narrow block whose M is past float64 (two columns 1e-10 apart in direction, remainders 1e-6:
    # condition 1.4e16): NaN; unchecked, its forms read up to 12 times off (cf57)
    Ln = torch.tensor([[1e8, 1e8], [1e8, 1e8 * (1 + 1e-10)]], dtype=torch.float64)
    near = Correlation(factor=Ln, residual=torch.full((2,), 1e-6, dtype=torch.float64))
    un = (Ln @ torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).T
    un = un + 1e-3 * torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    on, off = both(lambda: near._factor_quadratic(un, k4))
    ref = torch.tensor(_factor_form_reference(near, k4, un), dtype=torch.float64)
    assert bool(on.isnan().all()) and float(((off - ref) / ref).abs().max()) > 1e-4
    # at 1e6 the same block is certified, the narrow path's own value (the reference to 1e-13)
    X[:, 0] /= 1e10
    X[:, 1] /= 1e10
    blk = RecordCorrelation.in_sample(X, loo=False).parts[0][1].restrict(slice(0, 2))
    assert blk.factor.shape[0] <= blk.factor.shape[1]
    on, off = both(lambda: blk._factor_quadratic(X[:4, :2], k4))
    assert torch.equal(on, off)
    assert torch.allclose(on, torch.tensor(_factor_form_reference(blk, k4, X[:4, :2]), dtype=torch.float64),
                          rtol=1e-13, atol=0.0)
    # a factor model given directly (the cross-fitted parts' class) with loadings 1e12: s / q ~ 1e30
    L = torch.randn(30, 2, generator=g, dtype=torch.float64)
    L[0] *= 1e12
    direct = Correlation(factor=L, residual=torch.full((30,), 1e-9, dtype=torch.float64))
    u = L @ torch.randn(2, 3, generator=g, dtype=torch.float64)
    on, off = both(lambda: direct._factor_quadratic(u.T, torch.ones(30, dtype=torch.float64)))
    ref = torch.tensor(_factor_form_reference(direct, torch.ones(30, dtype=torch.float64), u.T), dtype=torch.float64)
    assert bool(on.isnan().all()) and float(((off - ref) / ref).abs().max()) > 1e-4


def test_in_sample_forms_that_lost_their_digits_read_nan_not_a_silent_value(monkeypatch):
    """cf55: a column of the stored unit influences 1e9 times the rest (the leverage correction's
    scaling at d / n > 1 reached 9e20 in mean square) leaves the in-sample Gram rank 1 and every
    Woodbury form negative, clamped to 0: the headline read 0.0 (silently low). The stored records'
    mean own form against its trace target (``IN_SAMPLE_TRACE_RTOL``) made every form NaN. Since
    cf56 the forms keep their digits (the variational form) and the target its own (the rest
    off the kept span as the projection's residual, not a difference): the mean own form equals the
    target to 1e-10 and the forms are finite; with the old forms the trace check still reads NaN,
    and without it 0.0. Healthy columns agree to ~1e-8 and read bitwise as without the check."""
    import mis_lightning.functional.correlated as C

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 40, generator=g, dtype=torch.float64)
    wild = _scaled_column_rows(64, 40, 1e9)
    ones = torch.ones(40, dtype=torch.float64)
    healthy = RecordCorrelation.in_sample(W).gaussian_mean_abs(W)
    assert bool(torch.isfinite(healthy).all())
    cw = RecordCorrelation.in_sample(wild).parts[0][1]
    assert cw.self_mean and bool(torch.isfinite(RecordCorrelation.in_sample(wild).gaussian_mean_abs(wild)).all())
    assert float(cw._certified_solve(wild, ones)[1].mean()) == pytest.approx(cw.trace_target, rel=1e-10)
    c = RecordCorrelation.in_sample(W).parts[0][1]
    own = float((W * c._solve(W, ones)).sum(-1).mean())
    assert own == pytest.approx(c.trace_target, rel=1e-8)
    monkeypatch.setattr(C, "IN_SAMPLE_TRACE_CHECK", False)
    assert torch.equal(RecordCorrelation.in_sample(W).gaussian_mean_abs(W), healthy)
    monkeypatch.setattr(C, "IN_SAMPLE_TRACE_CHECK", True)
    monkeypatch.setattr(C, "FACTOR_FORM_VARIATIONAL", False)  # the old forms: the trace check's NaN
    monkeypatch.setattr(C, "FACTOR_FORM_CHECK", False)
    assert bool(torch.isnan(RecordCorrelation.in_sample(wild).gaussian_mean_abs(wild)).all())
    monkeypatch.setattr(C, "IN_SAMPLE_TRACE_CHECK", False)  # and without it the old, silent value
    assert float(RecordCorrelation.in_sample(wild).gaussian_mean_abs(wild).max()) == 0.0


def test_a_nonfinite_correlated_figure_names_the_correlation_not_the_method():
    """rv55r: a NaN that only the factor correlation gave was reported as "a numerical failure of
    the 'mc' form"; the error (and the baseline's warning) now name the correlation where the
    independent-coordinate value beside it is finite."""
    A = importlib.import_module("mis_lightning.assess")  # (the package's ``assess`` name is the function)

    g = torch.Generator().manual_seed(5)
    W = torch.randn(64, 4, dtype=torch.float64, generator=g) @ torch.randn(4, 20, dtype=torch.float64, generator=g)
    rc = RecordCorrelation.in_sample(W)
    msg = A._nonfinite_error("mc", rc, 0.97)
    assert "factor correlation" in msg and "sample correlation, numerical rank 4, 64 records" in msg
    assert "not of the 'mc' form" in msg and "covariance='independent'" in msg and "0.97" in msg
    for independent in (math.nan, None):  # nothing finite beside it: the method's form, as before
        assert "numerical failure of the 'mc' form" in A._nonfinite_error("mc", rc, independent)
    assert "numerical failure of the 'clt' form" in A._nonfinite_error("clt", None, 0.5)
    warn = A._nonfinite_baseline_warning(rc, 1.0)
    assert warn.startswith("the baseline leakage is not finite under the weights' factor correlation") and "reads 1" in warn


def test_exact_box_form_takes_a_weight_the_data_never_moves():
    """A weight with no variance (a dead unit: its row and column of the correlation are 0 up
    to rounding, its influences 0) made the outer draws' Cholesky fail or not by the sign of
    that rounding, and the headline then switched to the copula form with the loader's batch
    size. The covariance is floored now: the form runs whatever the rounding's sign, and gives
    the same value as with a positive rounding."""
    d, rho = 4, 0.6
    R = _equicorrelated(d, rho)
    g = torch.Generator().manual_seed(5)
    h = torch.full((d,), 4.0, dtype=torch.float64)
    off = torch.rand(d, dtype=torch.float64, generator=g)
    w = torch.randn(3, d, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(R).T
    stats = _grid_stats(h, off)
    k = torch.arange(-40, 41, dtype=torch.float64)
    alpha = (k.unsqueeze(0) + off.unsqueeze(1)) * h.unsqueeze(1)
    out = []
    for noise in (1e-11, -1e-11):
        Rd = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        Rd[:d, :d] = R
        Rd[d, d] = noise  # the dead weight's variance: rounding of 0, either sign
        wd = torch.cat([w, torch.zeros(3, 1, dtype=torch.float64)], 1)
        kd = torch.cat([stats.kappa, torch.ones(1, dtype=torch.float64)])
        got, _ = F.correlated.exact_box_mean_abs(Correlation(full=Rd), wd, kd, torch.arange(d), alpha,
                                                 generator=torch.Generator().manual_seed(3))
        out.append(got)
    assert torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=0)


def test_factor_quadratic_skips_the_refined_solve_where_woodbury_is_exact(monkeypatch):
    """The factor model's quadratic forms (the correlated headline and every per-layer value:
    85% of scoring a 9.4k-weight MLP, 8 schemes, in refined ``[R, d]`` solves) come from the
    Woodbury difference ``u'D^-1 u - y'C^-1 y``; only rows whose cancellation bound
    ``eps sqrt(d) u'D^-1 u / q`` exceeds ``QUADRATIC_TOLERANCE`` (records in the span of the
    factors with a tiny remainder: the in-sample form) take the corrected form
    (``Correlation._corrected_quadratic``, continued from the difference's own first pass; wf42).
    Both kinds of rows must read the refined solve's value to 1e-12 (the refined solve itself
    sits ~1e-12 from two refinement steps on such rows: the float64 floor of the sum)."""
    g = torch.Generator().manual_seed(4)
    m, d = 256, 300
    W = torch.randn(m, d, dtype=torch.float64, generator=g) * torch.rand(m, 1, dtype=torch.float64, generator=g).add(0.2)
    W[:, : d // 2] += torch.randn(m, 1, dtype=torch.float64, generator=g)
    kappa = torch.rand(d, dtype=torch.float64, generator=g)
    cross = Correlation.from_influences(W[: m // 2], 32)
    # the shared form's solve (loo=False: the records' own-row term, dx32, is applied on top of it)
    inside = RecordCorrelation.in_sample(W[:, :40], loo=False).parts[0][1]
    low = torch.randn(16, 5, dtype=torch.float64, generator=g) @ torch.randn(5, 40, dtype=torch.float64, generator=g)
    cases = [(cross, W[m // 2:], kappa), (cross, W[m // 2:], None), (inside, W[:, :40], kappa[:40]),
             (inside, low, None)]
    refined = []
    for corr, w, k in cases:
        kk = torch.ones(w.shape[1], dtype=torch.float64) if k is None else k
        u = w * kk.sqrt()
        refined.append((u * corr._solve(u, kk)).sum(-1))
    corrected_rows = []
    real_corrected = Correlation._corrected_quadratic

    def counting(u, *rest):
        corrected_rows.append(u.shape[0])
        return real_corrected(u, *rest)

    monkeypatch.setattr(Correlation, "_corrected_quadratic", staticmethod(counting))
    for (corr, w, k), ref in zip(cases, refined):
        corrected_rows.clear()
        got = corr.quadratic(w, k)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
        if corr is cross:  # cross-fitted records: the Woodbury difference alone
            assert sum(corrected_rows) == 0, corrected_rows
    # rows in the span of a 1e-6 remainder: the corrected form (a block wider than the rank: the
    # in-sample model above, d = rank = 40, takes the d x d form, Correlation._narrow_quadratic),
    # mixed with generic rows, which the bound accepts: exactly the in-span rows are corrected
    basis = torch.randn(5, 40, dtype=torch.float64, generator=g)
    span = Correlation(factor=basis.T / 3.0, residual=torch.full((40,), 1e-6, dtype=torch.float64))
    rows = torch.randn(16, 5, dtype=torch.float64, generator=g) @ basis
    rows[::2] = torch.randn(8, 40, dtype=torch.float64, generator=g)
    corrected_rows.clear()
    got = span.quadratic(rows)
    assert corrected_rows == [8], corrected_rows
    monkeypatch.setattr(Correlation, "_corrected_quadratic", real_corrected)
    torch.testing.assert_close(got, (rows * span._solve(rows, torch.ones(40, dtype=torch.float64))).sum(-1),
                               rtol=1e-12, atol=0)


def test_corrected_factor_form_against_a_known_quadratic_form():
    """``Correlation._factor_quadratic`` on rows ``u = M x0`` of a 1e-6 remainder, whose form
    ``u'M^-1 u = x0'M x0 = x0'D x0 + |A'x0|^2`` is known without cancellation: every row (all
    corrected: ``s / q`` 7e7-1e8 unquantized, 3e2-6e2 quantized; wider than the rank) within
    1e-12 relative of it (measured 5e-15, the refined solve 2.5e-15), where the Woodbury
    difference alone misses by 7e-8 unquantized (the test fails with the correction left out)."""
    g = torch.Generator().manual_seed(42)
    d, k, R = 300, 20, 24
    L = torch.randn(d, k, dtype=torch.float64, generator=g) / 2.0
    corr = Correlation(factor=L, residual=torch.full((d,), 1e-6, dtype=torch.float64))
    for kappa in (torch.ones(d, dtype=torch.float64), torch.rand(d, dtype=torch.float64, generator=g).clamp_min(0.05)):
        D = 1.0 - kappa + kappa * 1e-6
        A = kappa.sqrt().unsqueeze(-1) * L
        x0 = torch.randn(R, k, dtype=torch.float64, generator=g) @ A.T  # solutions in the factors' span
        u = x0 * D + (x0 @ A) @ A.T
        truth = (x0 * D * x0).sum(-1) + (x0 @ A).square().sum(-1)
        got = corr._factor_quadratic(u / kappa.sqrt(), kappa)
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=0)


def test_exact_box_form_simulates_fewer_quasi_random_draws_per_box(monkeypatch):
    """With fine weights (one box per outer draw) the GHK simulator runs 256 randomised
    quasi-Monte Carlo draws per box (was up to 1,024 plain ones: 1.5 of 2.0 s of a small
    model's assess): its noise is a few percent of the outer draws' variance, so the value
    stays within its standard error of the same form with 4x the plain draws per box."""
    d, rho = 6, 0.9
    R = _equicorrelated(d, rho)
    g = torch.Generator().manual_seed(96)
    h = torch.tensor([4.0] * 3 + [0.25] * 3, dtype=torch.float64)
    off = torch.rand(d, dtype=torch.float64, generator=g)
    w = torch.randn(4, d, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(R).T
    stats = _grid_stats(h, off)
    coarse = torch.nonzero(stats.kappa < F.FINE_KAPPA).squeeze(-1)
    assert coarse.numel() == 3
    k = torch.arange(-40, 41, dtype=torch.float64)
    alpha = ((k.unsqueeze(0) + off.unsqueeze(1)) * h.unsqueeze(1))[coarse]
    corr = Correlation(full=R)
    calls = []
    real = F.correlated.truncated_gaussian_means

    def spy(mean, chol, lo, hi, draws, generator=None, **kw):
        calls.append((draws, kw.get("qmc", False)))
        return real(mean, chol, lo, hi, draws, generator, **kw)

    values = []
    for seed in range(4):
        monkeypatch.setattr(F.correlated, "truncated_gaussian_means", spy)
        value, se = F.correlated.exact_box_mean_abs(corr, w, stats.kappa, coarse, alpha,
                                                    generator=torch.Generator().manual_seed(seed))
        monkeypatch.setattr(F.correlated, "truncated_gaussian_means",
                            lambda *a, **kw: real(*a[:4], 1024, a[5] if len(a) > 5 else kw.get("generator")))
        plain, pse = F.correlated.exact_box_mean_abs(corr, w, stats.kappa, coarse, alpha,
                                                     generator=torch.Generator().manual_seed(100 + seed))
        values.append((value, se, plain, pse))
    assert calls and all(c == (256, True) for c in calls), calls
    v = torch.stack([x[0] for x in values]).mean(0)
    p = torch.stack([x[2] for x in values]).mean(0)
    se = (torch.stack([x[1] for x in values]).square().mean(0) + torch.stack([x[3] for x in values]).square().mean(0)).sqrt() / 2
    assert torch.all((v - p).abs() <= 2 * se), ((v - p) / se)


def test_wide_boxes_keep_plain_draws(monkeypatch):
    """Quasi-Monte Carlo box draws only where at most EXACT_QMC_MAX_COARSE weights are coarse: a
    Sobol set's advantage fades with the dimension (28 coarse weights: 1.8x the plain draws'
    spread over seeds, sc24), so wider boxes keep the former plain draws and their count."""
    d = F.correlated.EXACT_QMC_MAX_COARSE + 3
    R = _equicorrelated(d, 0.5)
    g = torch.Generator().manual_seed(7)
    h = torch.tensor([4.0] * (d - 2) + [0.25] * 2, dtype=torch.float64)
    off = torch.rand(d, dtype=torch.float64, generator=g)
    w = torch.randn(3, d, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(R).T
    stats = _grid_stats(h, off)
    coarse = torch.nonzero(stats.kappa < F.FINE_KAPPA).squeeze(-1)
    assert coarse.numel() == d - 2 > F.correlated.EXACT_QMC_MAX_COARSE
    k = torch.arange(-40, 41, dtype=torch.float64)
    alpha = ((k.unsqueeze(0) + off.unsqueeze(1)) * h.unsqueeze(1))[coarse]
    calls = []
    real = F.correlated.truncated_gaussian_means

    def spy(mean, chol, lo, hi, draws, generator=None, **kw):
        calls.append((draws, kw.get("qmc", False)))
        return real(mean, chol, lo, hi, draws, generator, **kw)

    monkeypatch.setattr(F.correlated, "truncated_gaussian_means", spy)
    value, se = F.correlated.exact_box_mean_abs(Correlation(full=R), w, stats.kappa, coarse, alpha,
                                                outer_draws=64, generator=torch.Generator().manual_seed(0))
    assert calls and all(not q and n > F.correlated.EXACT_QMC_BOX_DRAWS for n, q in calls), calls
    assert torch.isfinite(value).all() and torch.isfinite(se).all()


def _ghk_reference(mean, chol, lo, hi, draws, generator, qmc):
    """The GHK simulator as written before sm25 ([N, D, c] layout, the draws through the factor
    before their weighted mean): the same uniforms, taken from the generator in the same order."""
    N, c = lo.shape
    half = max(1, (draws + 1) // 2)
    if qmc:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        base = torch.quasirandom.SobolEngine(c, scramble=True, seed=seed).draw(half, dtype=torch.float64)
        u = torch.remainder(base.unsqueeze(0) + torch.rand(N, 1, c, generator=generator, dtype=torch.float64), 1.0)
    else:
        u = torch.rand(N, half, c, generator=generator, dtype=torch.float64)
    u = torch.cat([u, 1.0 - u], 1)
    eps = torch.zeros(N, 2 * half, c, dtype=torch.float64)
    logw = torch.zeros(N, 2 * half, dtype=torch.float64)
    for k in range(c):
        s = eps[:, :, :k] @ chol[k, :k] if k else torch.zeros(N, 2 * half, dtype=torch.float64)
        a = ((lo - mean)[:, k : k + 1] - s) / chol[k, k]
        b = ((hi - mean)[:, k : k + 1] - s) / chol[k, k]
        x, p = F.correlated._truncated_normal(a, b, u[:, :, k])
        eps[:, :, k] = x
        logw += torch.log(p.clamp_min(1e-300))
    return mean + (torch.softmax(logw, dim=1).unsqueeze(-1) * (eps @ chol.T)).sum(1)


@pytest.mark.parametrize("c", [1, 3, 20])
@pytest.mark.parametrize("qmc", [False, True])
def test_ghk_layout_gives_the_former_simulator_to_rounding(c, qmc):
    """The GHK simulator with one contiguous plane per coordinate (sm25: 1.4-1.8x less CPU at
    c = 8-32) reads the same uniforms as the former [N, D, c] layout and returns its box means
    to rounding (at most 1.9e-14 measured at c = 1-32; the summation order of the factor's products
    differs), open and one-sided boxes included."""
    g = torch.Generator().manual_seed(c)
    A = torch.randn(c, c, dtype=torch.float64, generator=g)
    chol = torch.linalg.cholesky(A @ A.T / c + torch.eye(c, dtype=torch.float64))
    N = 40
    mean = 0.5 * torch.randn(N, c, dtype=torch.float64, generator=g)
    edges = torch.linspace(-6.0, 6.0, 4, dtype=torch.float64)
    pad = torch.cat([edges.new_tensor([-math.inf]), edges, edges.new_tensor([math.inf])])
    cell = torch.searchsorted(edges, 3.0 * torch.randn(N, c, dtype=torch.float64, generator=g))
    lo, hi = pad[cell], pad[cell + 1]
    got = F.correlated.truncated_gaussian_means(mean, chol, lo, hi, 64, torch.Generator().manual_seed(5), qmc=qmc)
    ref = _ghk_reference(mean, chol, lo, hi, 64, torch.Generator().manual_seed(5), qmc)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, rtol=0.0, atol=1e-12), float((got - ref).abs().max())


def _correlated_ols(monkeypatch):
    """``(model, loader, n)``: OLS on 20 correlated features (VIF ~ 100), 400 records, K-FAC's
    correction off (dg30): the diagonal sigma ~10x below the marginal sd makes rtn_int4's weights
    coarse (the factor model's Monte Carlo form, the averaged interval regime)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_CORRECTION", False)
    g = torch.Generator().manual_seed(28)
    n, d = 400, 20
    X = torch.randn(n, 1, dtype=torch.float64, generator=g) + 0.1 * torch.randn(n, d, dtype=torch.float64,
                                                                                 generator=g)
    y = (X @ (0.3 * torch.randn(d, dtype=torch.float64, generator=g))
         + torch.randn(n, dtype=torch.float64, generator=g))[:, None]
    return _ols(X, y), DataLoader(TensorDataset(X, y), batch_size=100), n


def test_averaged_interval_is_carried_from_the_form_of_its_draws(monkeypatch):
    # iv28: in the averaged regime the bootstrap draws are of the independent form, but the
    # interval was built around the CORRELATED plug-in (stretched down to it), then carried by
    # the correlated / independent ratio a second time: the headline sat at the top of its
    # interval, the lower end about half of it (fu28's MLP: 0.0631 in [0.0148, 0.0637]; a ratio
    # above 1 put an upper end past the baseline). Built around the independent plug-in and
    # carried by the ratio in t = G^-1(leakage) (both carries are ratios there), the headline
    # keeps the independent plug-in's relative position in its interval exactly.
    # Diagonal estimator + factor correlation on correlated features (VIF ~ 100): factor /
    # independent ~ 0.5 for rtn_int4, whose 21 coarse weights give the averaged regime. The
    # uncorrected diagonal sigma (K-FAC off, dg30): its sigma ~10x below the marginal sd is what
    # makes the int4 weights coarse here; the subject is the interval's construction.
    m, dl, n = _correlated_ols(monkeypatch)
    out = {cov: assess(m, ["rtn_int4"], dl, _loss, estimation="diagonal", weight_decay=0.0, num_records=n,
                       covariance=cov).schemes["rtn_int4"] for cov in ("factor", "independent")}

    def position(s) -> float:
        t = F.unsaturate(torch.tensor([s.interval[0], s.leakage, s.interval[1]], dtype=torch.float64))
        return float((t[1] - t[0]) / (t[2] - t[0]))

    fac, ind = out["factor"], out["independent"]
    assert fac.covariance == "factor" and fac.interval_regime == ind.interval_regime == "averaged"
    assert fac.leakage < 0.7 * ind.leakage  # the correlation matters here
    # the same construction, two exact ratios: equal to rounding (old code: 0.955 against 0.586), but for
    # the finite-sample correction's remainder, which each form reads from its own records and adds in
    # quadrature (method.md section 3, "The correction's remainder"): 1.0e-6 apart here, so 1e-5
    assert position(fac) == pytest.approx(position(ind), abs=1e-5)
    assert 0.1 < position(fac) < 0.9


def _scaled_rows(m: int, d: int, seed: int) -> torch.Tensor:
    """``[m, d]`` rows ``z e``: Gaussian directions times a per-record normal scale (a
    least-squares record's gradient, ``x`` times its residual); ``E w w' = I``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, dtype=torch.float64, generator=g) * torch.randn(m, 1, dtype=torch.float64, generator=g)


def test_in_sample_form_reads_the_true_mean_norm_without_the_records_own_row():
    """dx32. The in-sample form ``w'S^+w`` (``S`` from the R stored rows, each record's own row
    in it) has the right mean unquantized (the rank, trace identity) but too little spread: a
    record's own row pulls ``S`` towards it (``q = q_loo / (1 + q_loo / R)``), so the mean
    ``sqrt`` read high by about ``d / 2R`` for rows with a per-record normal scale, 1.05 at
    ``d / R = 64 / 512`` (the diagonal estimator's unquantized headline on cv29's OLS design,
    1.051 against 1.013 for the exact estimator). Quantized (``kappa < 1``) the inverse's
    bias shrinks as ``kappa^2`` and the own row's pull as ``kappa``, so the plain form read low
    there (0.983 at ``kappa = 0.5``). Truth in closed form for ``Sigma = I``: ``M = I``,
    ``E sqrt(kappa w'w) = sqrt(kappa) E|e| E|z|``. Tolerances: 1.5% for scaled rows (4 samples
    of 512 records; 6 samples read 0.992-1.006 over kappa 1-0.1, the old form 0.983-1.047),
    1% for Gaussian rows (0.9995-1.0005; old 0.985-1.0005)."""
    m, d = 512, 64
    ez = math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))  # E|z|, z ~ N(0, I_d)
    kappas = (1.0, 0.5)
    for scaled, tol in ((True, 0.015), (False, 0.01)):
        truth = SQ * (SQ if scaled else 1.0) * ez
        new, old = torch.zeros(len(kappas)), torch.zeros(len(kappas))
        for seed in range(4):
            W = _scaled_rows(m, d, seed) if scaled else \
                torch.randn(m, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            rc_new, rc_old = RecordCorrelation.in_sample(W), RecordCorrelation.in_sample(W, loo=False)
            for i, kap in enumerate(kappas):
                k = torch.full((d,), kap, dtype=torch.float64)
                new[i] += float(rc_new.gaussian_mean_abs(W, k).mean()) / (4 * truth * math.sqrt(kap))
                old[i] += float(rc_old.gaussian_mean_abs(W, k).mean()) / (4 * truth * math.sqrt(kap))
        for i, kap in enumerate(kappas):
            assert float(new[i]) == pytest.approx(1.0, abs=tol), (scaled, kap, float(new[i]))
        if scaled:  # the form before dx32, what the fix removes
            assert float(old[0]) > 1.035


def test_in_sample_own_row_term_is_the_dense_leave_one_out_channel_form():
    """dx32. Each record's form against a dense computation, unquantized and on a channel
    ``M = I - K + K^1/2 S K^1/2``: ``S_i = S - b w_i w_i'`` (``b = (1 - s) / R``), ``q_i =
    u'M_i^-1 u`` (the leverage ``b v'M^-1 v`` capped at ``IN_SAMPLE_LOO_LEVERAGE_CAP``), then one
    common factor per form: the records' forms relative to each other are the dense
    leave-one-out ones (1e-8), unquantized their mean is the shared form's (the trace identity,
    1e-10), and the Monte Carlo form's per-record ratio is ``sqrt(q / q_shared)``. Scored rows
    are the fitted ones times 1.3 (the diagonal estimator's leverage scale). Also a layer's
    block, rows that are not the stored records, and the records in another order (bitwise).
    rank / R = 8 / 64, inside ``IN_SAMPLE_LOO_MAX_RANK_SHARE``."""
    m, d = 64, 8
    W = _scaled_rows(m, d, 5)
    rc = RecordCorrelation.in_sample(W)
    corr = rc.parts[0][1]
    s = F.correlated.IN_SAMPLE_SHRINKAGE
    cap = F.correlated.IN_SAMPLE_LOO_LEVERAGE_CAP
    S = (1 - s) * W.T @ W / m + s * torch.eye(d, dtype=torch.float64)

    def dense(Sm, Wm, kappa):
        kh = kappa.sqrt()
        M = torch.diag(1 - kappa) + kh[:, None] * Sm * kh[None]
        Mi = torch.linalg.inv(M)
        u, v = 1.3 * Wm * kh, Wm * kh
        q0 = (u @ Mi * u).sum(-1)
        h = (1 - s) / m * (v @ Mi * v).sum(-1)
        own = torch.stack([u[i] @ torch.linalg.inv(M - (1 - s) / m * torch.outer(v[i], v[i])) @ u[i]
                           for i in range(m)])
        return q0, torch.where(h <= cap, own, q0 / (1 - h.clamp(max=cap)))

    g = torch.Generator().manual_seed(6)
    for kappa in (torch.ones(d, dtype=torch.float64), torch.rand(d, dtype=torch.float64, generator=g)):
        q0, own = dense(S, W, kappa)
        q = corr.quadratic(1.3 * W, kappa)
        c = q / own
        torch.testing.assert_close(c, torch.full_like(c, float(c.mean())), rtol=1e-8, atol=0)
        assert float(c.mean()) < 1.0  # the inverse's bias removed
        if bool((kappa == 1).all()):
            assert float(q.mean()) == pytest.approx(float(q0.mean()), rel=1e-10)
        torch.testing.assert_close(corr.self_term_ratio(1.3 * W, kappa), (q / q0).sqrt(), rtol=1e-8, atol=0)
    blk = rc.restrict(slice(0, 3)).parts[0][1]
    q0, own = dense(S[:3, :3], W[:, :3], torch.ones(3, dtype=torch.float64))
    q = blk.quadratic(1.3 * W[:, :3])
    torch.testing.assert_close(q / own, torch.full_like(q, float((q / own).mean())), rtol=1e-8, atol=0)
    assert float(q.mean()) == pytest.approx(float(q0.mean()), rel=1e-10)
    with pytest.raises(ValueError, match="rows must be the stored records"):
        corr.quadratic(W[:10])
    # the same records in another order (processes, batch sizes): the same figures to the last bit
    perm = torch.randperm(m, generator=g)
    kappa = torch.rand(d, dtype=torch.float64, generator=g)
    a = rc.gaussian_mean_abs(1.3 * W, kappa)
    b = RecordCorrelation.in_sample(W[perm]).gaussian_mean_abs(1.3 * W[perm], kappa)
    assert torch.equal(a[perm], b)


def test_in_sample_record_alone_along_a_direction_does_not_pull_the_others_down(monkeypatch):
    """dx32. A record alone along a direction has in-sample leverage 1 (its own row is all of
    ``S`` there): taken out, its form would be unbounded, and the common factor that keeps the
    mean would push every other record towards 0 (checked: 1e-4 of their value with the cap at
    1 - 1e-12). The leverage is capped at ``IN_SAMPLE_LOO_LEVERAGE_CAP`` (its form at most
    ``1 / (1 - cap)`` = 4 times its in-sample one): against the same rows without that
    direction the others keep 0.84-1.01 of their value (bound 0.75)."""
    m = 64
    W = torch.zeros(m, 9, dtype=torch.float64)
    W[:, :8] = _scaled_rows(m, 8, 7)
    W[0, 8] = 3.0  # record 0 alone along coordinate 8
    q = RecordCorrelation.in_sample(W).parts[0][1].quadratic(W)
    q8 = RecordCorrelation.in_sample(W[:, :8]).parts[0][1].quadratic(W[:, :8])
    assert torch.isfinite(q).all()
    assert float((q[1:] / q8[1:]).min()) > 0.75
    monkeypatch.setattr(F.correlated, "IN_SAMPLE_LOO_LEVERAGE_CAP", 1 - 1e-12)
    q = RecordCorrelation.in_sample(W).parts[0][1].quadratic(W)
    assert float((q[1:] / q8[1:]).max()) < 0.01


def test_in_sample_own_row_term_only_where_the_rank_is_a_small_share_of_the_records():
    """The own-row-out form (dx32) applies where the rows' rank is at most
    ``IN_SAMPLE_LOO_MAX_RANK_SHARE`` of the stored records (where it was checked against truths);
    above, the plain in-sample form, bitwise, which reads high (conservative). 8 weights:
    64 records take the new form (it differs from the plain one), 40 records (rank share 0.2)
    the plain one."""
    g = torch.Generator().manual_seed(3)
    kappa = torch.rand(8, dtype=torch.float64, generator=g)
    for m, new in ((64, True), (40, False)):
        W = _scaled_rows(m, 8, 5)
        a = RecordCorrelation.in_sample(W).gaussian_mean_abs(W, kappa)
        b = RecordCorrelation.in_sample(W, loo=False).gaussian_mean_abs(W, kappa)
        assert torch.equal(a, b) is not new, m


def _spectrum_correlation(d: int, low: float, seed: int = 0) -> torch.Tensor:
    """A ``[d, d]`` correlation with eigenvalues log-spaced from 1 down to ``low`` (a continuous
    spectrum, no gap), random eigenvectors, rescaled to a unit diagonal."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    S = Q @ torch.diag(torch.logspace(0, math.log10(low), d, dtype=torch.float64)) @ Q.T
    return F.correlated.correlation_from_covariance(S)


def _cutoff_case(low: float):
    d, R = 60, 200
    Rm = _spectrum_correlation(d, low)
    g = torch.Generator().manual_seed(1)
    # influences drawn from the correlation itself: they reach into its small directions
    Z = torch.randn(R, d, generator=g, dtype=torch.float64)
    W = Z @ torch.linalg.cholesky(Rm + 1e-14 * torch.eye(d, dtype=torch.float64)).T
    # the estimator's cut-free Mahalanobis norms (the cap of every quantized form): |Z|
    est = type("Est", (), {"influence": W, "d": d, "mahalanobis": Z.norm(dim=1)})()
    # most weights left in float (kappa 1: M keeps R's small directions there), a few coarse
    k = torch.ones(d, dtype=torch.float64)
    k[-2:] = 0.5
    return est, RecordCorrelation.full(Rm), k


def test_cutoff_check_flags_a_figure_set_by_the_pseudo_inverse_cutoff():
    # rc44: a correlation whose spectrum runs smoothly down to 1e-12 has directions between
    # RCOND and RCOND / 100 that R's rank rule keeps or drops (cf45: the full form's only cutoff,
    # on R and on its exactly observed block); a well-conditioned one (spectrum down to 1e-2) has
    # none. The move measured: 0.104 here vs 0 there (two coarse weights, the rest in float; the
    # same with the cutoff on M before cf45), on either side of CUTOFF_SENSITIVITY_MAX = 5%;
    # with the check made a no-op (CUTOFF_CHECK_FACTOR = 1) the first assertion below fails.
    from mis_lightning.report import CUTOFF_SENSITIVITY_MAX, Report, SchemeResult, leakage_marks
    A = importlib.import_module("mis_lightning.assess")  # (the package exports the function)
    est, rc, k = _cutoff_case(1e-12)
    assert rc.parts[0][1].rcond == F.correlated.RCOND and rc.with_rcond(1e-11).parts[0][1].rcond == 1e-11
    bad = A._cutoff_check(est, rc, k, 300.0)
    assert bad is not None and bad["move"] > CUTOFF_SENSITIVITY_MAX
    assert bad["leakage_fine_cutoff"] > bad["leakage"]  # the cutoff reads low
    est_ok, rc_ok, k_ok = _cutoff_case(1e-2)
    ok = A._cutoff_check(est_ok, rc_ok, k_ok, 300.0)
    assert ok is not None and ok["move"] < 1e-6
    assert A._cutoff_check(est, rc, torch.ones_like(k), 300.0) is None  # nothing quantized: no cutoff in play
    # the report: one merged warning naming the flagged scheme with both values, "~" on its row,
    # the field through JSON
    schemes = {name: SchemeResult(name=name, leakage=c["leakage"], mis=1 - c["leakage"], baseline_leakage=0.2,
                                  d_eff=1.0, d=60, zero_fraction=0.0, pinned_fraction=0.0, bits_per_weight=4.0,
                                  method="clt", cutoff_sensitivity=c) for name, c in (("bad", bad), ("ok", ok))}
    rep = Report(n=300, d=60, estimation={}, diagnostics={}, schemes=schemes, baseline_leakage=0.2, baseline_mis=0.8)
    w = A._cutoff_warning(rep)
    assert w is not None and "bad (" in w and "ok (" not in w and f"{bad['leakage_fine_cutoff']:.4g}" in w
    rows = {r["scheme"]: r for r in rep.rows()}
    assert "~" in leakage_marks(rows["bad"]) and "~" not in leakage_marks(rows["ok"])
    back = Report.from_dict(json.loads(rep.to_json()))
    assert back.schemes["bad"].cutoff_sensitivity == bad



# -- cf45: the full form in R's kept eigenspace, no cutoff on the channel matrix ------------------

def _pinv_cut(M: torch.Tensor, rhs: torch.Tensor, rcond: float) -> torch.Tensor:
    """``M^+ rhs`` with eigenvalues of ``M`` below ``rcond`` of the largest dropped (the library's
    pseudo-inverse before cf45)."""
    ev, Q = torch.linalg.eigh(0.5 * (M + M.T))
    inv = torch.where(ev > rcond * ev[-1], 1.0 / ev.clamp_min(1e-300), torch.zeros_like(ev))
    return Q @ (inv.unsqueeze(-1) * (Q.T @ rhs))


def _old_channel_quadratic(Rm: torch.Tensor, w: torch.Tensor, k: torch.Tensor, rcond: float) -> torch.Tensor:
    """The form before cf45: ``u'M^+u`` with the pseudo-inverse cutoff ``rcond`` on ``M``."""
    kh = k.sqrt()
    M = torch.diag(1.0 - k) + kh.unsqueeze(-1) * Rm * kh.unsqueeze(0)
    u = w * kh
    return (u * _pinv_cut(M, u.T, rcond).T).sum(-1)


def _channel_solve(Rm: torch.Tensor, w: torch.Tensor, x: torch.Tensor, b: torch.Tensor,
                   k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The old form by direct solves of ``M = I - K + K^1/2 R K^1/2`` (well conditioned in the
    tests that call it): ``u'M^-1u``, the coefficients ``M^-1 u / kappa^1/2`` (``[R, d]``) and the
    self term's ``u'(M - b K^1/2 x x' K^1/2)^-1 u``, ``u = kappa^1/2 w``."""
    kh = k.sqrt()
    M = torch.diag(1.0 - k) + kh.unsqueeze(-1) * Rm * kh.unsqueeze(0)
    Minv_u = torch.linalg.solve(M, (w * kh).T).T
    own = torch.stack([((w[i] * kh) @ torch.linalg.solve(
        torch.diag(1.0 - k) + kh.unsqueeze(-1) * (Rm - b[i] * torch.outer(x[i], x[i])) * kh.unsqueeze(0), w[i] * kh))
        for i in range(len(w))])
    return ((w * kh) * Minv_u).sum(-1), torch.where(kh > 0, Minv_u / kh.clamp_min(1e-300), 0.0), own


def test_full_form_equals_the_channel_matrix_form_on_a_well_conditioned_correlation():
    # Where M is well conditioned the cut-free form is the old one: measured 8e-16 (quadratic),
    # 2e-15 (coefficients), 1e-15 (self term); tolerance 1e-12, a few hundred times the round-off
    # of d = 30 solves of condition ~10
    g = torch.Generator().manual_seed(3)
    d = 30
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    Rm = F.correlated.correlation_from_covariance(A @ A.T + d * torch.eye(d, dtype=torch.float64))
    w = torch.randn(6, d, generator=g, dtype=torch.float64)
    x = torch.randn(6, d, generator=g, dtype=torch.float64)
    k = torch.rand(d, generator=g, dtype=torch.float64)
    k[:5], k[5:8] = 1.0, 0.0
    b = torch.full((6,), 0.01, dtype=torch.float64)
    quad, coef, direct = _channel_solve(Rm, w, x, b, k)
    c = Correlation(full=Rm)
    torch.testing.assert_close(c.quadratic(w, k), quad, rtol=1e-12, atol=0)
    torch.testing.assert_close(c.coefficients(w, k), coef, rtol=0, atol=1e-12 * float((coef * k.sqrt()).abs().max()))
    # the self term: each record through its own R - b x x' (Sherman-Morrison in the new basis)
    own = Correlation(full=Rm, self_term=x, self_weight=b).quadratic(w, k)
    torch.testing.assert_close(own, direct, rtol=1e-12, atol=0)


@pytest.mark.parametrize("gap", [1e-13, 2.0 ** -52])
def test_full_form_with_kappas_within_round_off_of_one(gap):
    # bf16 / fp16 casts of weights near 0 have kappa within 1e-12 of 1 (down to 1 - 4e-16 at sd 0.1;
    # rv45): W = kappa / (1 - kappa) ~ 1e13-4.5e15. The channel's I + F formed as I + C'WC rounded its
    # unit part by eps W, the form and its coefficients read 1e-4 to 10% off (either way) on this
    # well-conditioned R; the QR of [W^1/2 C; I] read within 4e-15. Against the channel matrix
    # M = I - K + K^1/2 R K^1/2 solved directly (well conditioned here: the old form, exact to
    # ~1e-15); tolerance 1e-10.
    g = torch.Generator().manual_seed(5)
    d = 16
    A = torch.randn(d, d + 4, generator=g, dtype=torch.float64)
    Rm = F.correlated.correlation_from_covariance(A @ A.T)
    w = torch.randn(6, d, generator=g, dtype=torch.float64)
    x = torch.randn(6, d, generator=g, dtype=torch.float64)
    k = 0.05 + 0.9 * torch.rand(d, generator=g, dtype=torch.float64)
    k[:8], k[8] = 1.0 - gap, 1.0
    b = torch.full((6,), 0.01, dtype=torch.float64)
    quad, coef, direct = _channel_solve(Rm, w, x, b, k)
    c = Correlation(full=Rm)
    torch.testing.assert_close(c.quadratic(w, k), quad, rtol=1e-10, atol=0)
    torch.testing.assert_close(c.coefficients(w, k), coef, rtol=0, atol=1e-10 * float((coef * k.sqrt()).abs().max()))
    own = Correlation(full=Rm, self_term=x, self_weight=b).quadratic(w, k)
    torch.testing.assert_close(own, direct, rtol=1e-10, atol=0)


def test_full_form_refuses_a_non_finite_kappa():
    # rv45: a NaN kappa is neither exact (>= 1) nor noisy (> 0) in the channel: it read as 0, the form
    # silently lower (the form before cf45 gave NaN). Now a ValueError naming the coordinate.
    k = torch.full((4,), 0.5, dtype=torch.float64)
    k[2] = math.nan
    with pytest.raises(ValueError, match=r"kappa is not finite at coordinate\(s\) \[2\] of 4"):
        Correlation(full=_equicorrelated(4, 0.3)).quadratic(torch.ones(2, 4, dtype=torch.float64), k)


def test_full_form_is_monotone_in_kappa_on_a_spectrum_down_to_1e_12():
    # mono44: with the cutoff on M, raising a coordinate's kappa moved an eigenvalue of M under the
    # cutoff and LOWERED s2 (a finer grid read less leakage). The information-matched channel's
    # s2 can only rise with kappa (more information about U), and the cut-free form is exactly
    # monotone (measured: no record lower, to the last bit); tolerance 1e-10 relative. R: a
    # spectrum running smoothly to 1e-12 (38 coordinates) and a pair correlated 1 - 5e-10 (its
    # small eigenvalue under the rank rule). The old form is checked to break monotonicity on
    # the same steps (there: the pair's second weight from kappa 1 - 1e-6 to 1), so this test can fail.
    d = 40
    Rm = torch.zeros(d, d, dtype=torch.float64)
    Rm[:38, :38] = _spectrum_correlation(38, 1e-12, seed=2)
    rho = 1.0 - 5e-10
    Rm[38:, 38:] = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(50, d, generator=g, dtype=torch.float64)
    c = Correlation(full=Rm)
    k = torch.rand(d, generator=g, dtype=torch.float64) * 0.9
    k[:19] = 1.0  # most weights unquantized: M keeps R's small directions there
    k[38:] = torch.tensor([1.0, 1.0 - 1e-6], dtype=torch.float64)
    worst_new, worst_old = 0.0, 0.0
    for j in range(19, d):
        for up in (0.5, 0.9, 0.999, 1.0):
            if up <= float(k[j]):
                continue
            k2 = k.clone()
            k2[j] = up
            new1, new2 = c.quadratic(w, k), c.quadratic(w, k2)
            old1, old2 = (_old_channel_quadratic(Rm, w, kk, F.correlated.RCOND) for kk in (k, k2))
            worst_new = max(worst_new, float(((new1 - new2) / new1).max()))
            worst_old = max(worst_old, float(((old1 - old2) / old1).max()))
    assert worst_new <= 1e-10, worst_new
    assert worst_old > 1e-2, worst_old  # the cutoff on M was not monotone here


def test_full_form_unquantized_is_the_mahalanobis_norm_within_the_rank_rule():
    # kappa = 1 everywhere (None, or given) gives w'R^+w over R's kept eigenspace (eigenvalues above
    # RCOND of the largest): the exact-observation branch with every coordinate exact. Tolerance
    # 1e-9 relative: the kept directions reach 1e-9, so their 1 / lambda carries ~1e-16 / 1e-9.
    d = 40
    Rm = _spectrum_correlation(d, 1e-12, seed=4)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(20, d, generator=g, dtype=torch.float64)
    ev, Q = torch.linalg.eigh(Rm)
    keep = ev > F.correlated.RCOND * ev[-1]
    want = ((w @ Q[:, keep]).square() / ev[keep]).sum(-1)
    c = Correlation(full=Rm)
    torch.testing.assert_close(c.quadratic(w), want, rtol=1e-9, atol=0)
    torch.testing.assert_close(c.quadratic(w, torch.ones(d, dtype=torch.float64)), want, rtol=1e-9, atol=0)
    assert 0 < int(keep.sum()) < d  # the rule is in play


@pytest.mark.parametrize("case", ["singular", "near_singular", "nearly_dependent_exact"])
def test_full_form_matches_the_channel_reference_on_singular_correlations(case):
    # Ground truth: groundtruth.correlated_reference.channel_quadratic, w'(R + V)^-1 w in 80-digit
    # arithmetic from the exact factor (exact observations as the limit Var e -> 1e-40; no
    # eigendecomposition). singular: rank 8 of 14 with two duplicated coordinates, both observed
    # exactly; near_singular: full rank, spectrum down to 1e-7 (above the rank rule, every
    # direction counts); nearly_dependent_exact: below. Tolerance 1e-7 relative: R is rounded to float64 before the library sees
    # it, which moves an eigenvalue of 1e-7 by ~1e-16 / 1e-7 of itself, and the nearly exact
    # weight (W = kappa / (1 - kappa) = 1e9) costs ~eps W in the solve (measured 1e-8 and 2e-11).
    from mis_lightning.groundtruth.correlated_reference import channel_quadratic
    g = torch.Generator().manual_seed(7 if case == "singular" else 8)
    d = 14
    if case == "singular":
        root = torch.randn(d, 8, generator=g, dtype=torch.float64)
        root[1] = root[0]  # a duplicated column of the inputs: identical rows of R
        root[3] = root[2]
    elif case == "nearly_dependent_exact":
        # two exact weights whose difference has variance ~1e-14 (far under R's rank rule): the
        # model says their exact observation reveals it (a rank rule on this block at RCOND read
        # pl44's MLP 16-34% below the 50-digit reference, cf45)
        root = torch.randn(d, 8, generator=g, dtype=torch.float64)
        root[1] = root[0] + 1e-7 * torch.randn(8, generator=g, dtype=torch.float64)
    else:
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        root = Q * torch.logspace(0, -3.5, d, dtype=torch.float64)  # eigenvalues 1 .. 1e-7
    root = root / root.norm(dim=1, keepdim=True)  # unit diagonal
    Rm = root @ root.T
    coef = torch.randn(5, root.shape[1], generator=g, dtype=torch.float64)
    w = coef @ root.T
    k = torch.rand(d, generator=g, dtype=torch.float64)
    k[:4] = 1.0  # the duplicated pairs (singular case) observed exactly
    k[4:6] = torch.tensor([0.0, 1.0 - 1e-9], dtype=torch.float64)  # nothing / nearly exact
    k[6:8] = 1.0
    truth = channel_quadratic(root, coef, k)
    c = Correlation(full=Rm)
    torch.testing.assert_close(c.quadratic(w, k), truth, rtol=1e-7, atol=0)
    # the Monte Carlo form's coefficients are the same estimator: Var(beta'Y) = s2 (beta = kappa c),
    # with the exact weights' share a'z (Correlation.exact_part; their own beta reach 1 / s, 1e7 in
    # the nearly dependent case, which beta'R beta cancels to 1e-3): U = B z, Y_N = U_N + e
    beta = c.coefficients(w, k) * k
    V = torch.where(k > 0, (1.0 - k) / k.clamp_min(1e-300), 0.0)
    B = c._basis()[0]
    noisy = (k > 0) & (k < 1)
    along_z = c.exact_part(w, k) + beta[:, noisy] @ B[noisy]
    var = along_z.square().sum(-1) + (beta.square() * V).sum(-1)
    torch.testing.assert_close(var, truth, rtol=1e-6, atol=0)


def test_copula_monte_carlo_with_nearly_dependent_exact_weights():
    # Two unquantized weights whose difference has variance ~1e-14: the channel's estimator weights
    # them by ~1e7, and float32 draws of U cancel that to noise; the form adds their share through
    # R's kept eigenspace (Correlation.exact_part). Coarse weights on a fine grid (0.05 sd), so the
    # Monte Carlo value is the Gaussian form's: measured within 0.1%; tolerance 2% (its standard
    # error ~0.1%). Summing beta_E'U_E in the float32 draws instead read 1.001-1.004 of it (the
    # control variate shares, and so absorbs, most of that round-off; cf45).
    g = torch.Generator().manual_seed(11)
    d = 12
    root = torch.randn(d, 8, generator=g, dtype=torch.float64)
    root[1] = root[0] + 1e-7 * torch.randn(8, generator=g, dtype=torch.float64)
    root = root / root.norm(dim=1, keepdim=True)
    Rm = root @ root.T
    w = torch.randn(4, 8, generator=g, dtype=torch.float64) @ root.T
    idx = torch.tensor([4, 5, 6])
    stats = _grid_stats(torch.full((3,), 0.05, dtype=torch.float64), torch.full((3,), 0.3, dtype=torch.float64), half=200)
    k = torch.full((d,), 0.5, dtype=torch.float64)
    k[:4] = 1.0
    k[idx] = stats.kappa.to(torch.float64)
    corr = Correlation(full=Rm)
    mc, se = correlated_mc_mean_abs(corr, w, k, idx, stats, 20000, torch.Generator().manual_seed(2))
    gauss = F.correlated.gaussian_mean_abs(corr, w, k)
    torch.testing.assert_close(mc, gauss, rtol=0.02, atol=0)
    # the box-mean form: its observation's covariance is floored there, so its outer draws go
    # through U = B z (measured 1.003-1.008, standard errors 0.3-0.6%; tolerance 3%)
    kk = torch.arange(-200, 201, dtype=torch.float64)
    alpha = (kk.unsqueeze(0) + 0.3) * 0.05 * torch.ones(3, 1, dtype=torch.float64)  # _grid_stats' edges
    box, bse = F.correlated.exact_box_mean_abs(corr, w, k, idx, alpha, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(box, gauss, rtol=0.03, atol=0)


def test_the_interval_ends_hold_the_in_sample_leave_one_out_form_which_is_not_monotone_in_kappa():
    """cf56: the interval's correlated ends read the form at the two corners of the ``kappa`` box
    (each coarse weight's smallest and largest ``kappa``), which holds its range only for a form
    monotone in every ``kappa``. The in-sample leave-one-out form is not (cf55: deficits ``1 - kappa``
    of 1e-9..1e-6 halved, the records' mean falls: the divisor ``1 + beta`` rises faster than the
    forms). ``RecordCorrelation.gaussian_ends`` pairs each corner's own-row-out form with the other
    corner's divisor: every record's value at 40 random interior ``kappa``s (and the corners) lies
    within its ends; the corners' own values, inverted for some records, did not hold them."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 4, dtype=torch.float64, generator=g) @ torch.randn(4, 20, dtype=torch.float64, generator=g)
    rc = RecordCorrelation.in_sample(W)
    assert rc.parts[0][1].self_mean
    for _ in range(2):  # (the generator's state of the measured case)
        torch.rand(20, dtype=torch.float64, generator=g)
    deficit = 0.9 * torch.rand(20, dtype=torch.float64, generator=g)
    k_lo, k_hi = 1.0 - deficit, 1.0 - 0.5 * deficit
    k_hi[:10] = k_lo[:10]  # half the weights move across the box
    f_lo, f_hi = rc.gaussian_mean_abs(W, k_lo), rc.gaussian_mean_abs(W, k_hi)
    assert bool((f_hi < f_lo).any()) and bool((f_hi > f_lo).any())  # not monotone: some records fall
    lo, hi = rc.gaussian_ends(W, k_lo, k_hi)
    for _ in range(40):
        k = k_lo + (k_hi - k_lo) * torch.rand(20, dtype=torch.float64, generator=g)
        v = rc.gaussian_mean_abs(W, k)
        assert bool((lo <= v).all()) and bool((v <= hi).all())
    for v in (f_lo, f_hi):
        assert bool((lo <= v).all()) and bool((v <= hi).all())
    assert float(((hi - f_hi).abs().max() + (f_lo - lo).abs().max()) / f_lo.mean()) < 0.05  # widened by beta's move
    # a monotone form (the plain in-sample form: no own row out) keeps its corners' values, bitwise
    plain = RecordCorrelation.in_sample(W, loo=False)
    p_lo, p_hi = plain.gaussian_ends(W, k_lo, k_hi)
    assert torch.equal(p_lo, plain.gaussian_mean_abs(W, k_lo)) and torch.equal(p_hi, plain.gaussian_mean_abs(W, k_hi))


def test_the_interval_ends_hold_the_leave_one_out_form_where_beta_peaks_at_a_mixed_corner(monkeypatch):
    """rv56s: ``beta`` (the common divisor's ``a_K = sum(h inside) / sum(vv)``) is not monotone in the
    ``kappa``s: raising those of low-leverage records (``vv`` below ``a_K / 2b``) lowers it. Two blocks
    of coordinates, 8 high-leverage records on the first, 56 low-leverage ones on the second: ``beta``
    is largest at the mixed corner (first block high, second low), where the low-leverage records'
    forms fall ~0.9% below the ends that pair the corners' betas (cf56's, ``CORRELATED_BETA_BOUNDS``
    off); the bounds over the box (``_inverse_bias_range``) hold them and every sampled vertex."""
    C = importlib.import_module("mis_lightning.functional.correlated")
    g = torch.Generator().manual_seed(0)
    W = torch.zeros(64, 20, dtype=torch.float64)
    W[:8, :10] = torch.randn(8, 3, dtype=torch.float64, generator=g) @ torch.randn(3, 10, dtype=torch.float64, generator=g)
    W[8:, 10:] = torch.randn(56, 3, dtype=torch.float64, generator=g) @ torch.randn(3, 10, dtype=torch.float64, generator=g)
    rc = RecordCorrelation.in_sample(W)
    corr = rc.parts[0][1]
    k_lo, k_hi = torch.full((20,), 0.3, dtype=torch.float64), torch.full((20,), 0.95, dtype=torch.float64)
    mixed = torch.cat([k_hi[:10], k_lo[10:]])
    x, b = corr.self_term.to(torch.float64), corr.self_weight.to(torch.float64)
    betas = [corr._in_sample_loo_parts(W, x, b, k)[2] for k in (k_lo, k_hi, mixed)]
    assert betas[2] > max(betas[:2])  # not monotone: the mixed corner's beta above both corners'
    v = rc.gaussian_mean_abs(W, mixed)
    monkeypatch.setattr(C, "CORRELATED_BETA_BOUNDS", False)
    lo, _ = rc.gaussian_ends(W, k_lo, k_hi)
    assert bool((v < lo).any())  # the corners' betas: records below the low end
    monkeypatch.setattr(C, "CORRELATED_BETA_BOUNDS", True)
    lo, hi = rc.gaussian_ends(W, k_lo, k_hi)
    for _ in range(8):
        k = torch.where(torch.rand(20, generator=g) < 0.5, k_hi, k_lo)
        f = rc.gaussian_mean_abs(W, k)
        assert bool((lo <= f).all()) and bool((f <= hi).all())
    assert bool((lo <= v).all())


def test_the_interval_ends_of_records_past_the_leverage_cap_are_not_vacuous(monkeypatch):
    """iv58: ``_inverse_bias_range`` bounded ``a_K = sum(h inside) / sum(vv)`` with ``h <= b vv``, not
    the ``h = min(b vv, cap)`` every ``a_K`` obeys, so with records past the cap (rv55r's MLP at d / N
    = 1.31: every record, ``b vv ~ 1e8``) ``beta``'s upper bound grew with ``b vv`` (2e30 there, 3 at
    the corners) and the low end of a saturated headline read 2.2e-11 around 1.0. Rows with one
    column 1e6 times the rest (the others fall below the factor model's cut; 87% of the records past
    the cap): on a box of one point (no ``kappa`` moves) the ends are the form there (base: 0.044 of
    it); over ``kappa`` in [0.8, 0.95] ``beta``'s bound stays within its value with every record at the
    cap (``a_K <= cap``; base 3.3e3) and the ends still hold every sampled point of the box."""
    C = importlib.import_module("mis_lightning.functional.correlated")
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 4, dtype=torch.float64, generator=g) @ torch.randn(4, 20, dtype=torch.float64, generator=g)
    W[:, 0] *= 1e6
    rc = RecordCorrelation.in_sample(W)
    corr = rc.parts[0][1]
    assert corr.self_mean
    x, b = corr.self_term.to(torch.float64), corr.self_weight.to(torch.float64)
    k = torch.full((20,), 0.9, dtype=torch.float64)
    assert float((b * corr._in_sample_loo_parts(W, x, b, k)[3] >= C.IN_SAMPLE_LOO_LEVERAGE_CAP).double().mean()) > 0.8
    v = rc.gaussian_mean_abs(W, k)
    lo, hi = rc.gaussian_ends(W, k, k)
    torch.testing.assert_close(lo, v, rtol=1e-12, atol=0)
    torch.testing.assert_close(hi, v, rtol=1e-12, atol=0)
    k_lo, k_hi = torch.full((20,), 0.8, dtype=torch.float64), torch.full((20,), 0.95, dtype=torch.float64)
    vv_lo, vv_hi = (corr._in_sample_loo_parts(W, x, b, kk)[3] for kk in (k_lo, k_hi))
    exact, approx1 = corr._loo_cache["unquantized"]
    r = C.IN_SAMPLE_LOO_LEVERAGE_CAP / approx1
    assert corr._inverse_bias_range(vv_lo, vv_hi, b)[1] <= (approx1 * r + (exact - approx1) * r * r) * (1 + 1e-12)
    lo, hi = rc.gaussian_ends(W, k_lo, k_hi)
    for i in range(40):
        kk = (torch.where(torch.rand(20, generator=g) < 0.5, k_hi, k_lo) if i % 2 else
              k_lo + (k_hi - k_lo) * torch.rand(20, dtype=torch.float64, generator=g))
        f = rc.gaussian_mean_abs(W, kk)
        assert bool((lo <= f).all()) and bool((f <= hi).all())


def test_factor_form_rows_that_pass_the_woodbury_test_are_certified_too(monkeypatch):
    """rv56s: ``_factor_quadratic`` trusted the Woodbury difference of rows with ``s / q`` below
    ``QUADRATIC_TOLERANCE / (eps sqrt(d))`` (~2.6e3 here), a rounding bound that assumes an exact
    core solve. Two loadings of 6.8e6 nearly opposite over remainders clamped at 1e-9 make the core
    ill-conditioned (~1e22): rows at ``s / q`` 4e2 and 2e3 passed the test 0.9% off the 60-digit
    reference, finite and unflagged (``FACTOR_FORM_WOODBURY_CHECK`` off). Certified, they read NaN
    (the bracket cannot hold 1e-4 there); a healthy model's rows keep the Woodbury value bitwise."""
    C = importlib.import_module("mis_lightning.functional.correlated")
    L = torch.tensor([[-6772801.638061039, 6760939.244185943], [-2.0198671977784755, 25.86870026314568],
                      [2.7825668845798237, 34.04805762151154]], dtype=torch.float64)
    direct = Correlation(factor=L, residual=torch.tensor([2.0432904067797093e-11, 6.187943908411396e-08,
                                                          1.2653126470166576e-06], dtype=torch.float64))
    rows = torch.tensor([[1028.6401072292142, -520.2126067094937, -0.00017993235971641255],
                         [1050.94210740592, 1309.7536195493356, 0.0003553626367956661]], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    ref = torch.tensor(_factor_form_reference(direct, ones, rows), dtype=torch.float64)
    monkeypatch.setattr(C, "FACTOR_FORM_WOODBURY_CHECK", False)
    old = direct._factor_quadratic(rows, ones)
    assert bool(old.isfinite().all()) and float(((old - ref) / ref).abs().min()) > 5e-3
    monkeypatch.setattr(C, "FACTOR_FORM_WOODBURY_CHECK", True)
    new = direct._factor_quadratic(rows, ones)
    assert bool((new.isnan() | ((new - ref).abs() <= C.FACTOR_FORM_RTOL * ref)).all()) and bool(new.isnan().all())
    # a healthy factor model (unit-scale loadings, remainders 1e-3..1): the Woodbury rows bitwise
    g = torch.Generator().manual_seed(3)
    Lh = torch.randn(30, 3, generator=g, dtype=torch.float64)
    healthy = Correlation(factor=Lh, residual=10 ** (-3 * torch.rand(30, generator=g, dtype=torch.float64)))
    u = torch.randn(16, 30, generator=g, dtype=torch.float64)
    k = 1 - 0.5 * torch.rand(30, generator=g, dtype=torch.float64)
    on = healthy._factor_quadratic(u, k)
    monkeypatch.setattr(C, "FACTOR_FORM_WOODBURY_CHECK", False)
    assert torch.equal(on, healthy._factor_quadratic(u, k))


def test_narrow_block_forms_are_certified_where_their_matrix_is_well_conditioned(monkeypatch):
    """cf57: a narrow block (``d = 2`` coordinates, rank 3: a layer's block of the in-sample model)
    whose loadings (1e13) dwarf its remainders (1e-2): ``M = D + AA'`` has condition 89, its forms are
    well determined, but the variational bound at ``t = A'x`` cancels ``|u|`` against ``|At|`` and the
    Woodbury core's condition passes float64's, so every form and leave-one-out form read NaN. The
    stationary form plus the residual's ``|r|^2 / lambda_min(M)`` (``_residual_gap``) certifies them,
    each within 1e-12 of a 60-digit reference, at ``kappa`` 1 and quantized. A core singular in
    float64 (loadings 1e20) raised ``LinAlgError`` from the leave-one-out solve; now a value or NaN."""
    import mis_lightning.functional.correlated as C

    g = torch.Generator().manual_seed(0)
    L = torch.randn(2, 3, generator=g, dtype=torch.float64) * torch.tensor([[1e13], [3e12]], dtype=torch.float64)
    c = Correlation(factor=L, residual=torch.tensor([1e-2, 5e-2], dtype=torch.float64))
    rows = (L @ torch.randn(3, 4, generator=g, dtype=torch.float64)).T
    M = torch.diag(c.residual) + L @ L.T
    assert float(torch.linalg.cond(M)) < 100.0
    for k in (torch.ones(2, dtype=torch.float64), torch.tensor([0.7, 0.9], dtype=torch.float64)):
        ref = torch.tensor(_factor_form_reference(c, k, rows), dtype=torch.float64)
        q = c._factor_quadratic(rows, k)
        vv = c._certified_solve(rows * k.sqrt(), k)[1]
        assert torch.allclose(q, ref, rtol=1e-12, atol=0.0), (q, ref)
        assert torch.allclose(vv, ref, rtol=1e-12, atol=0.0), (vv, ref)
        monkeypatch.setattr(C, "FACTOR_FORM_RESIDUAL_BOUND", False)  # the variational bound alone
        assert bool(c._factor_quadratic(rows, k).isnan().all())
        assert bool(c._certified_solve(rows * k.sqrt(), k)[1].isnan().all())
        monkeypatch.setattr(C, "FACTOR_FORM_RESIDUAL_BOUND", True)
    # one coordinate, loadings 1e20: the core I + A'D^-1A rounds to a singular [2, 2]
    c1 = Correlation(factor=torch.tensor([[1e20, 1e20]], dtype=torch.float64),
                     residual=torch.ones(1, dtype=torch.float64))
    one = torch.ones(1, dtype=torch.float64)
    vv = c1._certified_solve(torch.tensor([[3e20]], dtype=torch.float64), one)[1]
    assert bool(vv.isnan().all()) or torch.allclose(vv, torch.tensor([9e40 / (1.0 + 2e40)], dtype=torch.float64),
                                                    rtol=1e-12)


def test_factor_model_coefficients_read_nan_where_their_solve_lost_its_digits(monkeypatch):
    """cf57: the factor model's Monte Carlo weights (``Correlation.coefficients``, the correlated
    Monte Carlo form's ``c = K^-1/2 M^-1 u``) came from the refined Woodbury solve unchecked: on
    cf55's rows with column 0 1e6 / 1e9 times the rest (in-sample model, a quantized ``kappa``) they
    read 7e-4 / 1.8e5 off in ``M``'s norm (relative to ``sqrt(u'M^-1u)``, what moves the form's
    scale) against a 60-digit reference. Now each row is certified (``_certified_coefficients``)
    or NaN (the form then gives way to the certified Gaussian one); certified rows are within
    5e-5 there, rows of unscaled columns are unchanged (bitwise), and at 1e3 (kappa 1, within 7e-7)
    the compensated residual certifies what its plain rounding bound could not."""
    import mis_lightning.functional.correlated as C

    kq = 1.0 - 0.5 * torch.rand(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def m_norm_errors(c, coef, rows, k=kq):
        """``sqrt(e'Me / u'M^-1u)`` per row, ``e = K^1/2 c - M^-1 u``, in 60 digits (Woodbury: low rank)."""
        mp, kk, D, A, core = _factor_model_mp(c, k)
        d, r = len(A), len(A[0])
        out = []
        for w, cw in zip(rows.tolist(), coef.tolist()):
            u = [mp.sqrt(kk[i]) * mp.mpf(x) for i, x in enumerate(w)]
            z = mp.lu_solve(core, mp.matrix([mp.fsum(A[i][a] * u[i] / D[i] for i in range(d)) for a in range(r)]))
            y = [(u[i] - mp.fsum(A[i][a] * z[a] for a in range(r))) / D[i] for i in range(d)]
            e = [mp.sqrt(kk[i]) * mp.mpf(cw[i]) - y[i] for i in range(d)]
            eMe = mp.fsum(D[i] * e[i] ** 2 for i in range(d)) + mp.fsum(
                mp.fsum(A[i][a] * e[i] for i in range(d)) ** 2 for a in range(r))
            out.append(float(mp.sqrt(eMe / mp.fsum(u[i] * y[i] for i in range(d)))))
        return torch.tensor(out, dtype=torch.float64)

    for big, worst_old in ((1e6, 5e-4), (1e9, 1e3)):
        W = _scaled_column_rows(64, 40, big)
        c = RecordCorrelation.in_sample(W, loo=False).parts[0][1]
        new = c.coefficients(W[:6], kq)
        monkeypatch.setattr(C, "FACTOR_FORM_CHECK", False)
        old = c.coefficients(W[:6], kq)
        monkeypatch.setattr(C, "FACTOR_FORM_CHECK", True)
        assert bool(old.isfinite().all()) and float(m_norm_errors(c, old, W[:6]).max()) > worst_old
        fin = new.isfinite().all(-1)
        assert bool(new[~fin].isnan().all()) and int(fin.sum()) < 6
        if bool(fin.any()):
            assert float(m_norm_errors(c, new[fin], W[:6][fin]).max()) <= 5e-5
            assert torch.equal(new[fin], old[fin])
    # column 0 1e3 times the rest at kappa 1: the weights within 7e-7 in M's norm; the residual's plain
    # rounding bound (A'x cancels) could not tell, its compensated one (FACTOR_FORM_COMPENSATED) does
    W = _scaled_column_rows(64, 40, 1e3)
    c = RecordCorrelation.in_sample(W, loo=False).parts[0][1]
    ones = torch.ones(40, dtype=torch.float64)
    new = c.coefficients(W[:6], ones)
    assert bool(new.isfinite().all()) and float(m_norm_errors(c, new, W[:6], ones).max()) <= 5e-5
    monkeypatch.setattr(C, "FACTOR_FORM_COMPENSATED", False)
    assert bool(c.coefficients(W[:6], ones).isnan().all())
    monkeypatch.setattr(C, "FACTOR_FORM_COMPENSATED", True)
    W = _scaled_column_rows(64, 40, 1.0)
    c = RecordCorrelation.in_sample(W, loo=False).parts[0][1]
    new = c.coefficients(W[:6], kq)
    monkeypatch.setattr(C, "FACTOR_FORM_CHECK", False)
    assert torch.equal(new, c.coefficients(W[:6], kq))


def test_forms_that_cancel_past_float64_are_certified_through_a_compensated_residual(monkeypatch):
    """cf57: rows whose ``u - At`` cancels past float64 (cf55's rows with column 0 1e12 times the
    rest under the in-sample model's absolute 1e-6 remainder: ``s / q`` ~1e23) read NaN: the
    variational value's rounding bound (``eps sqrt(s / q)``) passed ``FACTOR_FORM_RTOL``. The
    residual again in twice float64's precision (``_compensated_residual``, Dot2) certifies them,
    within 1e-7 of a 60-digit reference (forms and leave-one-out solves, ``kappa`` 1 and quantized;
    records 1-4: record 0's quantized form stays NaN, its core's gap bound too wide); the residual itself is within Dot2's bound of the exact rational value."""
    from fractions import Fraction

    import mis_lightning.functional.correlated as C

    g = torch.Generator().manual_seed(4)
    A = torch.randn(7, 3, generator=g, dtype=torch.float64) * 1e8
    t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    u = t @ A.T + 1e-6 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    r = Correlation._compensated_residual(u, t, A)
    eps = torch.finfo(torch.float64).eps
    for i in range(5):
        for j in range(7):
            exact = Fraction(u[i, j].item()) - sum(Fraction(t[i, a].item()) * Fraction(A[j, a].item()) for a in range(3))
            terms = abs(u[i, j].item()) + sum(abs(t[i, a].item() * A[j, a].item()) for a in range(3))
            assert abs(float(Fraction(r[i, j].item()) - exact)) <= eps * abs(float(exact)) + (4 * eps) ** 2 * terms
    # r = u - (diag(D) + AA')x, likewise (the Monte Carlo weights' certificate)
    D = torch.rand(7, generator=g, dtype=torch.float64) * 1e-6
    x = torch.linalg.solve(torch.diag(D) + A @ A.T, u.T).T
    r, bound = Correlation._compensated_matrix_residual(u, x, D, A)
    for i in range(5):
        for j in range(7):
            exact = Fraction(u[i, j].item()) - Fraction(D[j].item()) * Fraction(x[i, j].item()) - sum(
                Fraction(A[j, a].item()) * Fraction(A[m, a].item()) * Fraction(x[i, m].item())
                for a in range(3) for m in range(7))
            assert abs(float(Fraction(r[i, j].item()) - exact)) <= float(bound[i, j])
    W = _scaled_column_rows(64, 40, 1e12)
    c = RecordCorrelation.in_sample(W, loo=False).parts[0][1]
    kq = 1.0 - 0.5 * torch.rand(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k in (torch.ones(40, dtype=torch.float64), kq):
        ref = torch.tensor(_factor_form_reference(c, k, W[1:5]), dtype=torch.float64)
        for form in (lambda k=k: c._factor_quadratic(W[1:5], k),
                     lambda k=k: c._certified_solve(W[1:5] * k.sqrt(), k)[1]):
            q = form()
            assert bool(q.isfinite().all()) and torch.allclose(q, ref, rtol=1e-7, atol=0.0), (q, ref)
            monkeypatch.setattr(C, "FACTOR_FORM_COMPENSATED", False)
            assert bool(form().isnan().all())
            monkeypatch.setattr(C, "FACTOR_FORM_COMPENSATED", True)


def test_a_monte_carlo_form_without_certified_weights_gives_way_to_the_gaussian_form_and_says_so(monkeypatch):
    """cf57: where the factor model's Monte Carlo weights are NaN (``Correlation.coefficients``: not
    certified), the correlated Monte Carlo form is not finite and the scheme takes the certified
    Gaussian form; that fall-back only logged, the row now notes it (the row's form still reads
    "mc"). OLS with correlated features, rtn_int4's coarse weights, ``covariance="factor"``."""
    m, dl, n = _correlated_ols(monkeypatch)

    def run():
        return assess(m, ["rtn_int4"], dl, _loss, estimation="diagonal", weight_decay=0.0, num_records=n,
                      covariance="factor", uncertainty_draws=0).schemes["rtn_int4"]

    said = "correlated Monte Carlo form not finite"
    plain = run()
    assert plain.method == "mc" and plain.covariance == "factor" and not any(said in x for x in plain.notes)
    coefficients = Correlation.coefficients

    def uncertified(self, influence, kappa):
        c = coefficients(self, influence, kappa)
        c[0] = math.nan  # one row whose solve could not be certified
        return c

    monkeypatch.setattr(Correlation, "coefficients", uncertified)
    fallen = run()
    assert math.isfinite(fallen.leakage) and fallen.leakage != plain.leakage
    assert any(said in x and "the Gaussian form" in x for x in fallen.notes), fallen.notes


def test_a_layers_block_is_decomposed_once_for_every_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scoring's per-layer forms restrict the full correlation to each layer's slice once per
    scheme (assess._layer_mean_abs, a new kappa each): the block's ``eigh`` is made once and shared
    (Correlation.restrict's cache, with_rcond's copies included), and every form is bitwise the one
    of a block built afresh. Before, each scheme redid it: 3 ``eigh`` of each weight block for three
    schemes, ~15% of the exact estimator's CPU on kf33's ReLU 20-80-5 at d = 2,085 (docs/benchmarks.md,
    "ex58"). A new ``full`` (another estimate) is decomposed anew."""
    g = torch.Generator().manual_seed(0)
    d, m = 12, 20
    A = torch.randn(d, 30, generator=g, dtype=torch.float64)
    R = A @ A.T / 30
    R = R / torch.outer(R.diagonal().sqrt(), R.diagonal().sqrt())
    w = torch.randn(m, d, generator=g, dtype=torch.float64)
    kappas = [None, torch.full((8,), 0.5, dtype=torch.float64), torch.linspace(0.1, 1.0, 8, dtype=torch.float64)]
    fresh = [F.correlated.RecordCorrelation.full(R[:8, :8].clone()).gaussian_mean_abs(w[:, :8], k) for k in kappas]
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *x, **k: calls.append(a.shape) or eigh(a, *x, **k))
    rc = F.correlated.RecordCorrelation.full(R)
    got = [rc.restrict(slice(0, 8)).gaussian_mean_abs(w[:, :8], k) for k in kappas]
    assert calls == [(8, 8)]
    for a, b in zip(got, fresh):
        assert torch.equal(a, b)
    fine = rc.with_rcond(1e-12)
    fine.restrict(slice(0, 8)).gaussian_mean_abs(w[:, :8], kappas[1])
    rc.restrict(slice(8, 12)).gaussian_mean_abs(w[:, 8:], None)
    assert calls == [(8, 8), (4, 4)]
    other = F.correlated.RecordCorrelation.full(R.clone())
    other.restrict(slice(0, 8)).gaussian_mean_abs(w[:, :8], None)
    assert calls == [(8, 8), (4, 4), (8, 8)]
