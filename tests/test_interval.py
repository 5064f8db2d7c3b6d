"""The uncertainty interval against the exact OLS ground truth (issue 12).

OLS as ``nn.Linear(2, 1, bias=False)``, AR(1) design rho = 0.5, n = 400, a fixed grid of
step 4 sd with the population weights mid-cell or on a cell boundary: the extreme positions,
where the old bootstrap-percentile interval could not reach the truth. Truth:
``ground_truth.exact_truth_ols_2d`` (exact given the design, control-variate average over
60 targets; its 80% CI is within +-3% of the value, far inside the intervals' widths).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mis_lightning.assess import score_schemes
from mis_lightning.functional import correlated as FC
from mis_lightning.functional import interval as FI
from mis_lightning.groundtruth import compare as C
from mis_lightning.groundtruth import ground_truth as GT

TRAININGS = 12


@pytest.fixture(scope="module")
def study():
    torch.set_num_threads(1)
    s = GT.make_setting("linear", 2, 400, rho=0.5)
    grids = [GT.StepGrid(f"step{c:g}sd/{lab}", s.sd * c, offset=o, origin=s.theta_star)
             for c, o, lab in ((4, 0.0, "centre"), (4, 0.5, "boundary"), (2, 0.0, "centre"))]
    # K = 50 designs per target (was 200: the truth's CPU s 4.5-5.8 -> 1.9): the three truths move
    # by -0.25%, -0.08%, -0.11% and their 80% CIs stay +-2.6%, +-0.3%, +-2.6% (the targets' spread,
    # not the designs', sets them); coverage 12/12/12 and the old construction's 0/12 unchanged
    truth = [GT.exact_truth_ols_2d(s, g, Z=60, K=50)[0] for g in grids]
    # scored without a truth: a fine grid, whose figure the position warning must not name
    grids.append(GT.StepGrid("step0.5sd/boundary", s.sd * 0.5, offset=0.5, origin=s.theta_star))
    captured: list[dict] = []
    real = FI.leakage_interval

    def spy(value, record_se, n, **kw):  # keep what the old construction needs
        captured.append({"value": value, "se": record_se, "draws": kw["draws"].clone()})
        return real(value, record_se, n, **kw)

    rng = np.random.default_rng(12)
    new, old, regimes, figures, named = [], [], [], [], []
    mp = pytest.MonkeyPatch()
    mp.setattr(FI, "leakage_interval", spy)
    # The exact box form's Monte Carlo budgets at 1/8 of the defaults (outer draws 2M -> 262k
    # per call at d = 2): 28 -> 15 CPU s for the study. Against the defaults: the interval ends
    # move by median 0.14%, at most 2.5% relative (the MC noise, sqrt(8) x the default's); the
    # closest end to a truth is 3.2% (boundary) / 9.7% (step 2 sd) from it either way, coverage
    # 12/12 / 12/12 / 12/12 both ways; the ratio-carried step-2-sd failure of the docstring was
    # a bias of that size on every training, not noise, and is still caught.
    mp.setattr(FC, "ALL_COARSE_BUDGET", FC.ALL_COARSE_BUDGET // 8)
    mp.setattr(FC, "EXACT_BUDGET", FC.EXACT_BUDGET // 8)
    try:
        for k in range(TRAININGS):
            _, est, model, _ = C.train_and_estimate(s, rng)
            captured.clear()
            rep = score_schemes(est, model, [C.scheme_for(g) for g in grids], uncertainty_draws=16, seed=k,
                        mc_draws=4096)
            new.append([rep.schemes[f"step:{g.name}"].interval for g in grids])
            regimes.append([rep.schemes[f"step:{g.name}"].interval_regime for g in grids])
            figures.append([rep.schemes[f"step:{g.name}"].leakage for g in grids])
            warned = " ".join(w for w in rep.warnings if w.startswith("position-dominated"))
            named.append([f"step:{g.name} (" in warned for g in grids])
            old.append([_old_interval(c) for c in captured])
    finally:
        mp.undo()
    return truth, np.array(new), np.array(old), regimes, (np.array(figures), np.array(named))


def _old_interval(c: dict) -> tuple[float, float]:
    """The construction before issue 12: bootstrap p10-p90 widened to the plug-in and by
    1.28 record standard errors."""
    t, v, se = c["draws"], c["value"], c["se"]
    lo, hi = float(torch.quantile(t, 0.1)), float(torch.quantile(t, 0.9))
    return max(min(lo, v) - 1.2816 * se, 0.0), max(hi, v) + 1.2816 * se


def test_exact_truth_matches_the_issue_figures(study):
    truth = study[0]
    # issue 12: mid-cell 0.0035; boundary ~0.017-0.018 (first-order boundary value 0.0180)
    assert truth[0] == pytest.approx(0.0035, rel=0.08)
    assert 0.015 < truth[1] < 0.019


@pytest.mark.parametrize("g, position", [(0, "mid-cell"), (1, "boundary"), (2, "mid-cell, step 2 sd")])
def test_interval_covers_exact_truth(study, g, position):
    """At least 10 of 12 independent trainings cover the truth (nominal 80%: a true 80%
    interval gives >= 10/12 with probability 0.56 only, so the construction must be
    conservative at the extreme positions -- it is: the box range contains the truth
    whenever the box holds theta*, probability 0.9 over both coordinates).

    Step 2 sd mid-cell (truth 0.0133) failed before the ends were computed with the weights'
    correlation: the correlated / independent ratio is 0.93 with every weight mid-cell but
    ~1.0 at the trained positions, so the ratio-carried lower end sat at 0.0135-0.0138 (5 of
    12 covered)."""
    truth, new, _, regimes, _ = study
    covered = (new[:, g, 0] <= truth[g]) & (truth[g] <= new[:, g, 1])
    assert int(covered.sum()) >= 10, (position, truth[g], new[:, g].tolist())
    assert all(r[g] == "position-dominated" for r in regimes)


def test_step2sd_mid_cell_truth(study):
    """The exact truth at step 2 sd mid-cell is the CORRELATED first-order value (0.0130 with
    the true parameters), 7% below the independent-coordinate one (0.0139)."""
    assert study[0][2] == pytest.approx(0.0133, rel=0.06)


def test_old_construction_fails_mid_cell(study):
    """The bootstrap-percentile interval sits above the truth mid-cell (issue: 0-6 of 12)."""
    truth, _, old, _, _ = study
    covered = (old[:, 0, 0] <= truth[0]) & (truth[0] <= old[:, 0, 1])
    assert int(covered.sum()) <= 6, old[:, 0].tolist()


def test_position_warning_names_the_coarse_figures_read_low(study):
    """With every population weight on a cell boundary of a 4-sd grid the figure (the plug-in at
    the trained weights) reads 0.69x the exact truth on average (docs/benchmarks.md, acc43): each
    training whose figure is more than 5% below the truth has the warning naming the scheme
    (its interval reaches > POSITION_GAP_WARN above the figure beyond the records' widening),
    and the 0.5-sd grid, whose upper end sits ~7% above its figure from the record average
    alone (measured gaps beyond it 0-0.8%), is never named. Fails without the warning, and
    with the records' widening left in the gap."""
    truth, _, _, _, (figures, named) = study
    low = figures[:, 1] < 0.95 * truth[1]
    assert low.sum() >= 3, figures[:, 1].tolist()  # the case the warning is for occurs here
    assert named[low, 1].all(), (figures[:, 1].tolist(), named[:, 1].tolist())
    assert not named[:, 3].any()


def test_box_halfwidth_sidak():
    assert FI.box_halfwidth(0.8, 1) == pytest.approx(1.2816, abs=1e-4)
    assert FI.box_halfwidth(0.8, 2) == pytest.approx(float(torch.special.ndtri(torch.tensor(0.5 * (1 + math.sqrt(0.8)), dtype=torch.float64))), abs=1e-9)
    with pytest.raises(ValueError, match="level must be in"):
        FI.box_halfwidth(1.0, 1)


def test_averaged_regime_is_at_most_sqrt2_wider_than_the_bootstrap_hull():
    draws = torch.linspace(0.010, 0.020, 17, dtype=torch.float64)
    iv = FI.leakage_interval(0.015, 0.0, 1000, draws=draws)
    assert iv.regime == "averaged"
    q10, q90 = (float(x) for x in torch.quantile(draws, torch.tensor([0.1, 0.9], dtype=torch.float64)))
    assert iv.hi - iv.lo == pytest.approx(math.sqrt(2) * (q90 - q10), rel=1e-9)


def test_position_range_finds_centre_and_boundary():
    """Step 4 sd, trained weight 1 sd off the centre: with a 1.28 sd box the minimum of
    kappa is at the centre (t = -1) and the maximum on the boundary (t = +1)."""
    theta = torch.tensor([1.0], dtype=torch.float64)  # cell [-2, 2] around 0 ... centre at 0
    sigma = torch.tensor([1.0], dtype=torch.float64)
    edges = torch.tensor([[-math.inf] + [-2.0 + 4 * k for k in range(-3, 5)] + [math.inf]], dtype=torch.float64)
    r = FI.position_range(theta, sigma, edges, FI.box_halfwidth(0.8, 1), num_points=257)
    assert float(r.low[0]) == pytest.approx(0.0, abs=0.02)
    assert float(r.high[0]) == pytest.approx(2.0, abs=0.02)  # the boundary, inside the box


def test_position_range_searches_sigma():
    """Step 4 sd, trained weight mid-cell: kappa there grows with sigma (wider law, more
    mass across the edges), so with a sigma range the minimum is read at the smaller sigma
    and the spread is wider than without it."""
    theta, sigma = torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    edges = torch.tensor([[-math.inf] + [-2.0 + 4 * k for k in range(-3, 5)] + [math.inf]], dtype=torch.float64)
    plain = FI.position_range(theta, sigma, edges, 0.5)
    r = FI.position_range(theta, sigma, edges, 0.5, sigma_rel=torch.tensor([0.1], dtype=torch.float64))
    assert float(r.low_sigma[0]) == pytest.approx(0.9)
    assert float(r.high_sigma[0]) == pytest.approx(1.1)
    assert float(r.spread[0]) > float(plain.spread[0])
    assert float(plain.low_sigma[0]) == 1.0  # no sigma range: the plug-in sigma


def _gaussian_arms(rho: float, shift: np.ndarray, M: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    L = np.linalg.cholesky(np.array([[1.0, rho], [rho, 1.0]]))
    draw = lambda m: rng.standard_normal((M, 2)) @ L.T + m  # noqa: E731
    return {"in": draw(shift), "out": draw(0.0), "null": draw(0.0)}


def test_full_covariance_lr_test_reaches_the_gaussian_tv():
    """The reference's LR test between N(shift, R) and N(0, R), R = [[1, .9], [.9, 1]],
    shift (0.2, 0), a grid of step 0.25 sd (nearly continuous): the exact TV is
    2 Phi(D / 2) - 1 with the Mahalanobis D = 0.2 / sqrt(0.19) = 0.459, i.e. 0.182. The
    full-covariance test reaches it (within 0.02: 4.4 se of a difference of proportions over
    2 folds of 12,000 draws per arm; seeded); the independent-coordinate test, which ignores the
    correlation, tests theta_1 alone and cannot: 2 Phi(0.1) - 1 = 0.080 (<= 0.11)."""
    from scipy import stats

    shift = np.array([0.2, 0.0])
    sims = _gaussian_arms(0.9, shift, 24_000, 3)
    mom = GT.ArmMoments.of(sims["out"])
    grid = GT.StepGrid("fine", np.full(2, 0.25))
    D = math.sqrt(shift @ np.linalg.solve(np.array([[1.0, 0.9], [0.9, 1.0]]), shift))
    exact = 2 * stats.norm.cdf(D / 2) - 1
    full, null = GT.tv_lr_test(grid, sims, mom)
    indep, _ = GT.tv_lr_test(grid, sims, mom, covariance="independent")
    assert exact == pytest.approx(0.182, abs=1e-3)
    assert full == pytest.approx(exact, abs=0.02)
    assert indep < 0.11
    assert abs(null) < 0.02


def test_averaged_interval_reaches_the_plug_in_debiased_by_the_draws_centre():
    """cg30: the plug-in reads each weight's cells smoothed over one sd of its position, the draws'
    centre over two variances, so ``med - value`` estimates the plug-in's smoothing bias (first
    order) and ``2 value - med`` is the plug-in without it. The averaged interval holds the
    draws' spread (sqrt(2) x their p10 / p90 distances) around both centres: with the draws'
    median 0.003 below the plug-in the upper end is ``2 value - med + sqrt(2) (q90 - med)``,
    the lower end the draws' own; mirrored when the median is above. Exact arithmetic on the
    given draws (1e-12)."""
    draws = torch.linspace(0.010, 0.020, 17, dtype=torch.float64)
    q10, med, q90 = (float(x) for x in torch.quantile(draws, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)))
    s2 = math.sqrt(2.0)
    up = FI.leakage_interval(med + 0.003, 0.0, 1000, draws=draws)
    assert up.regime == "averaged"
    assert up.hi == pytest.approx(med + 0.006 + s2 * (q90 - med), abs=1e-12)
    assert up.lo == pytest.approx(med - s2 * (med - q10), abs=1e-12)
    down = FI.leakage_interval(med - 0.003, 0.0, 1000, draws=draws)
    assert down.lo == pytest.approx(med - 0.006 - s2 * (med - q10), abs=1e-12)
    assert down.hi == pytest.approx(med + s2 * (q90 - med), abs=1e-12)


def test_interval_ends_stay_within_a_leakage_s_range():
    """A leakage is a TV, in [0, 1]. Near saturation (plug-in 0.99, record se 0.02: pad 0.0256)
    every branch of ``leakage_interval`` -- averaged with and without draws (the cg30 shift
    included), nothing coarse, position-dominated -- pads past 1 before the cut; the ends must
    stay in [0, 1] and hold the plug-in (cv31; ``Interval.__post_init__`` is the cut: without
    it the upper ends are 1.016-1.059)."""
    draws = torch.linspace(0.95, 0.999, 17, dtype=torch.float64)
    edges = torch.tensor([[-math.inf] + [-2.0 + 4 * k for k in range(-3, 5)] + [math.inf]], dtype=torch.float64)
    one = torch.tensor([0.0], dtype=torch.float64)
    infl = torch.full((8, 1), 50.0, dtype=torch.float64) + torch.arange(8, dtype=torch.float64)[:, None]
    cases = {
        "averaged": FI.leakage_interval(0.99, 0.02, 1000, draws=draws),
        "averaged, median above": FI.leakage_interval(0.96, 0.02, 1000, draws=draws),
        "no draws": FI.leakage_interval(0.99, 0.02, 1000),
        "nothing coarse": FI.leakage_interval(0.99, 0.02, 1000, theta=one[:0], sigma=one[:0],
                                              boundaries=edges[:0], influence=infl[:, :0]),
        "position-dominated": FI.leakage_interval(0.99, 0.02, 4, theta=one, sigma=one + 1.0, boundaries=edges,
                                                  influence=infl, method="clt"),
    }
    assert cases["position-dominated"].regime == "position-dominated"
    for name, iv in cases.items():
        value = 0.96 if "above" in name else 0.99
        assert 0.0 <= iv.lo <= value <= iv.hi <= 1.0, (name, iv)
        assert iv.hi == 1.0, (name, iv)  # each case pads past 1: the cut is exercised


def _exact_mixed_form(w: torch.Tensor, g: torch.Tensor, n: float, theta: float, sigma: float,
                      edges: torch.Tensor) -> float:
    """The Monte Carlo form of one quantized coordinate plus a Gaussian part, exactly:
    per record ``E |w m + g Z|`` with ``m`` the cell's conditional mean of ``N(0, 1)`` (probability
    ``p_c``) and ``Z ~ N(0, 1)``: ``sum_c p_c (g 2 phi(mu / g) + mu (2 Phi(mu / g) - 1))``, ``mu = w m_c``,
    then saturated and averaged as :func:`FI.leakage_at`."""
    from mis_lightning.functional.cells import cell_terms
    from mis_lightning.functional.leakage import saturate

    t = cell_terms((edges - theta) / sigma)
    p, m = t.prob[0], torch.where(t.live[0], t.diff[0] / t.prob[0].clamp_min(1e-300), torch.zeros(()))
    mu = w[:, None] * m[None]  # [R, K]
    r = mu / g[:, None]
    e = g[:, None] * 2 * torch.exp(-0.5 * r * r) / math.sqrt(2 * math.pi) + mu * torch.erf(r / math.sqrt(2))
    return float(saturate((e * p).sum(-1) / (2 * math.sqrt(n))).mean())


def test_form_search_reaches_the_exact_forms_maximum_over_the_box(monkeypatch):
    """On a grid of step 1 sd kappa is flat in the position (its variation ~exp(-2 pi^2)), but the
    Monte Carlo form -- each cell's conditional mean, not only its variance -- is not: with the
    plug-in mid-cell, the form over the box peaks with an edge at the population value, here
    more than 3% above it (exact, by quadrature over the cells; the test asserts > 3%). With
    ``FORM_SEARCH`` the upper end reaches that maximum carried to the plug-in (the same-seed change
    added); tolerance 0.6% below: the same-seed Monte Carlo difference of two positions (4,096 draws: sd 0.55% of the value here, cov47; the seed is fixed, so the test is
    deterministic) and the 25-point grid across the box (it misses an edge by <= 0.07 sd: <= 0.1%). Without it the kappa search reads the plug-in, 2.3%
    short of the maximum: the test fails."""
    torch.manual_seed(0)
    R, n = 400, 1000.0
    w = torch.randn(R, dtype=torch.float64) * 1.3
    g = torch.full((R,), 0.3, dtype=torch.float64)  # the other coordinates' Gaussian sd (unquantized)
    theta, sigma = torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    edges = torch.tensor([[-math.inf] + [k + 0.5 for k in range(-12, 12)] + [math.inf]], dtype=torch.float64)
    value = _exact_mixed_form(w, g, n, 0.0, 1.0, edges)  # the plug-in (mid-cell: the form's minimum)
    z = FI.box_halfwidth(0.9, 1)
    # the upper end's cells are read at sigma (1 + z1 se), se = sd(w^2) / (2 sqrt n) (the step in sd units)
    s_hi = 1.0 + FI.normal_quantile(0.9) * 0.5 * float(w.square().std()) / math.sqrt(n)
    exact_max = max(_exact_mixed_form(w, g, n, float(c), s_hi, edges) for c in torch.linspace(-z, z, 101))
    assert exact_max / value - 1 > 0.03  # the effect the search must find (kappa alone does not)
    kw = {"theta": theta, "sigma": sigma, "boundaries": edges, "influence": w[:, None],
          "gaussian_s2": g.square(), "method": "mc"}
    for flag in (False, True):
        monkeypatch.setattr(FI, "FORM_SEARCH", flag)
        iv = FI.leakage_interval(value, 0.0, n, generator=torch.Generator().manual_seed(3), **kw)
        assert iv.regime == "position-dominated"
        if flag:
            # above: ON also keeps the kappa-searched end, one Monte Carlo evaluation (sd ~0.7% here)
            assert exact_max * (1 - 0.006) <= iv.hi <= exact_max * (1 + 0.02)
            assert iv.lo <= value <= iv.hi
        else:
            off = iv
            assert iv.hi < exact_max * (1 - 0.006)
    assert iv.lo <= off.lo and iv.hi >= off.hi  # ON holds the kappa-searched interval


def test_form_extremes_names_mismatched_shapes():
    """rv47: a ``sigma`` / ``box_sigma`` / ``boundaries`` whose length is not ``theta``'s was
    truncated silently or failed deep inside; each is named."""
    w = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta, one2 = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    edges = torch.tensor([[-math.inf, -0.5, 0.5, math.inf]] * 2, dtype=torch.float64)
    for kw, name in ((dict(sigma=torch.ones(3, dtype=torch.float64)), "sigma"),
                     (dict(sigma=torch.ones(1, dtype=torch.float64)), "sigma"),
                     (dict(sigma=one2, box_sigma=torch.ones(3, dtype=torch.float64)), "box_sigma"),
                     (dict(sigma=one2, boundaries=edges[:1]), "boundaries")):
        b = kw.pop("boundaries", edges)
        with pytest.raises(ValueError, match=rf"^{name} must have shape"):
            FI.form_extremes(w, 1000.0, theta, kw.pop("sigma"), b, 1.0, mc_draws=64, num_points=3, **kw)
    lo, hi = FI.form_extremes(w, 1000.0, theta, one2, edges, 1.0, mc_draws=64, num_points=3)
    assert lo.shape == hi.shape == (2,)


def test_a_fine_grid_is_not_labelled_position_dominated():
    """pl48 (nux48): bf16, fp16 and int8 rows of a model whose weights' sd is far above their cell
    widths (d_eff 56.9993 of 57) were marked ``pos.``, "set by where few coarse weights sit in
    their cells": with no coarse weight there is no position uncertainty, the interval is the
    record error alone (value +- z standard errors, the averaged regime without draws), and it
    is labelled ``"averaged"``; a coarse grid (rtn_int2 on the same model) stays
    position-dominated. The figures are unchanged (only the label and position_gap)."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import mis_lightning as ml

    value, se = 0.07, 0.002
    iv = FI.leakage_interval(value, se, 1000, theta=torch.empty(0, dtype=torch.float64))
    z = FI.normal_quantile(0.9)
    assert iv.regime == "averaged" and iv.terms == 0.0
    assert (iv.lo, iv.hi) == pytest.approx((value - z * se, value + z * se), rel=1e-12)

    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 4, generator=g)
    y = X @ torch.tensor([1.0, -0.5, 0.3, 0.2]) + torch.randn(400, generator=g)
    m = nn.Linear(4, 1)
    with torch.no_grad():  # the least-squares fit: at the minimum
        sol = torch.linalg.lstsq(torch.cat([X, torch.ones(400, 1)], 1), y[:, None]).solution
        m.weight.copy_(sol[:4].T)
        m.bias.copy_(sol[4])

    def mse(o, t):
        return 0.5 * (o.squeeze(-1) - t) ** 2

    rep = ml.assess(m, ["bf16", "fp16", "rtn_int2"], DataLoader(TensorDataset(X, y), batch_size=100), mse)
    lines = rep.table().splitlines()
    for k in ("bf16", "fp16"):
        s = rep.schemes[k]
        assert s.interval is not None and s.d_eff > 0.99 * s.d  # a fine grid: leaks like float
        assert s.interval_regime == "averaged" and s.position_gap is None, (k, s.interval_regime)
        assert "pos." not in next(ln for ln in lines if ln.startswith(k + " "))
    assert rep.schemes["rtn_int2"].interval_regime == "position-dominated"
    assert "pos." in next(ln for ln in lines if ln.startswith("rtn_int2 "))
