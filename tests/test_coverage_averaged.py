"""The averaged regime's ground truth (``groundtruth.averaged``; docs/validation.md, "Coverage in
the averaged regime"): its closed forms against the library, and a small coverage run."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from mis_lightning.groundtruth import averaged as AV

AS = importlib.import_module("mis_lightning.assess")


def _score(tr: AV.Training, pop: AV.Population, seed: int):
    rep = AS.score_schemes(tr.estimate, tr.model, [AV.StepGridScheme(pop.step)], uncertainty_draws=16, seed=seed,
                           covariance="independent")
    return rep.schemes["step"]


def test_kappa_closed_form_matches_the_library_cells():
    """``kappa_step`` (scipy, the truth's) equals the library's cell moments of the same
    affine grid (``ParamGrid.moments``, what the scoring reads) at steps 0.25-8 sd and any
    position: within 1e-10 above 0.5 sd (both exact sums over the cells, float64), and within the
    library's documented bound ``h^6 / 1728`` of its fine-grid expansion at steps ``h <= 0.5`` sd
    (docs/functional-accuracy.md section 4; ``kappa_step`` matches 40-digit mpmath sums to 1e-15
    there: measured 8.7e-6 at h = 0.49, the bound's 8.8e-6 at 0.5)."""
    pop = AV.make_population(8, 40, steps=1.0, seed=3)
    rng = np.random.default_rng(0)
    r = np.exp(rng.uniform(math.log(0.25), math.log(8.0), pop.d))
    u = rng.uniform(-0.5, 0.5, pop.d)
    sigma = pop.sigma
    step = r * sigma
    theta = (rng.integers(-3, 4, pop.d) + u) * step
    model = torch.nn.Linear(pop.in_features, pop.out_features, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta).reshape(model.weight.shape))
    grids, _ = AV.StepGridScheme(step)._quantize_copy(model)
    lib = grids["weight"].moments(torch.from_numpy(theta), torch.from_numpy(sigma), 0, pop.d).kappa
    ours = AV.kappa_step(u, r)
    err = np.abs(lib.numpy() - ours)
    fine = r <= 0.5
    assert float(err[~fine].max()) < 1e-10
    assert bool((err[fine] <= r[fine] ** 6 / 1728 + 1e-12).all())
    assert ours.min() < 0.05 and ours.max() > 0.6  # coarse mid-cell and boundary positions both present


@pytest.mark.parametrize("path,f32", [("stored", False), ("factored", False), ("factored", True)])
def test_the_truth_is_the_library_value_at_the_population(path, f32, monkeypatch):
    """Scored at ``theta-hat = theta*`` with the true ``sigma`` the library's plug-in is the
    truth's own quantity: equal within 1e-9 relative (float64 sums of 512 terms; a 4-sd grid,
    where the library's cells are exact sums, see the test above). With the factored power
    sums' float32 GEMMs (pf28; each sum within 1e-4, the leakage measured within 6e-9 on the
    benchmark MLPs): within 1e-7."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4}) if f32 else frozenset())
    pop = AV.make_population(16, 32, steps=4.0, seed=1)
    truth, se = AV.truth(pop)
    assert se == 0.0
    r = _score(AV.training(pop, 0, path=path, at_population=True), pop, 0)
    assert r.leakage == pytest.approx(truth, rel=1e-7 if f32 else 1e-9)
    assert r.interval_regime == "averaged"


def test_the_centre_error_has_the_draws_spread_and_is_mostly_the_populations():
    """Per weight, over uniform positions: the draws' centre errs by exactly the draws' sd
    (per harmonic of kappa both are ``1 - rho^2`` of its power; quadrature to 1e-3), and on a
    4-sd grid 96% of that error is the population's fixed part (``1 - rho^2``, ``rho =
    exp(-2 pi^2 / 16)``: sqrt(1 - 0.085) = 0.957), the same in every training."""
    for r in (3.0, 4.0, 8.0):
        t = AV.centre_error_decomposition(r)
        assert t["total_rms"] == pytest.approx(t["draws_sd"], rel=1e-3)
    t4 = AV.centre_error_decomposition(4.0)
    rho = math.exp(-2 * math.pi ** 2 / 16)
    assert t4["fixed_rms"] / t4["draws_sd"] == pytest.approx(math.sqrt(1 - rho ** 2), abs=0.01)


def test_small_averaged_coverage_is_near_its_design():
    """64 populations (512 weights, 4-sd grid, spread positions), one training each, the
    report's 80% interval. Design (method.md section 3, averaged regime): the centre's error has
    the draws' sd (test above) and the half-width is sqrt(2) x the draws' p90 - median, so the
    mean half-width over the rms error of the centre should be near sqrt(2) x 1.14 (the p10/p90
    of 16 draws read ~1.14 sd) = 1.6. Measured 1.55 and 56/64 covered; with the sqrt(2) factor
    removed 1.11 and 48/64 (cv25's session probe ``no_sqrt2.py``, not kept); since cg30 (the
    spread also held around the debiased plug-in, 1.38x wider here) 1.69 and 58/64. Bounds: the ratio
    in [1.3, 2.5] (its sampling relative se over 64 populations is ~9%: 1.3 is ~2 se below the
    measured value, 1.11 fails), coverage at least 45/64 (0.70; binomial 0.5% tail at 0.83).
    Deterministic seeds."""
    covered, err, half = 0, [], []
    for p in range(64):
        pop = AV.make_population(16, 32, steps=4.0, seed=100 + p)
        truth, _ = AV.truth(pop)
        lo, hi = _score(AV.training(pop, p), pop, p).interval
        covered += int(lo <= truth <= hi)
        err.append((lo + hi) / 2 - truth)
        half.append((hi - lo) / 2)
    ratio = float(np.mean(half) / np.sqrt(np.mean(np.square(err))))
    assert 1.3 <= ratio <= 2.5, ratio
    assert covered >= 45, covered


def test_spread_tv_reference_against_quadrature():
    """The correlated design's reference TV ``TV(N(delta, v), N(0, 1))`` (numpy closed form by the
    densities' crossings) against scipy quadrature of ``|p1 - p0| / 2``: within 1e-9 (quad's
    tolerance), and the pure shift ``2 Phi(delta / 2) - 1`` at ``v = 1``."""
    from scipy import integrate, stats

    for delta, v in [(0.0, 0.9), (0.05, 0.99), (0.3, 0.97), (1.2, 0.6), (2.5, 0.95), (0.7, 1.0)]:
        ref = AV.spread_tv_reference(np.array([delta]), np.array([v]))[0]
        f = lambda x, delta=delta, v=v: abs(stats.norm.pdf(x, delta, math.sqrt(v)) - stats.norm.pdf(x)) / 2  # noqa: E731
        quad = integrate.quad(f, -12, 12, points=[0.0, delta], limit=400, epsabs=1e-12)[0]
        assert ref == pytest.approx(quad, abs=1e-9)


def test_ols_reference_limits():
    """``ols_truth``: a grid of 0.02 sd reads the unquantized value (``kappa = 1 - 3.3e-5``; the
    correlated channel amplifies it by ``1 / lambda_min`` of the correlation along its weakest
    directions: measured 1.6e-4, bound 1e-3); coarser grids read less (quantization never raises the leakage);
    the population game's shift ``h / (1 - h)`` puts it ``~h / 2`` above the fixed-design
    game's (0.4-1.2% at ``h = d / n = 0.016``)."""
    des = AV.make_ols_design(16, 1000, 0.9, seed=1)
    base = AV.ols_truth(des, None)
    assert AV.ols_truth(des, 0.02) == pytest.approx(base, rel=1e-3)
    vals = [AV.ols_truth(des, r) for r in (0.75, 1.4, 4.0, 8.0)]
    assert base > vals[0] > vals[1] > vals[2] > vals[3] > 0
    ratio = base / AV.ols_truth(des, None, game="fixed")
    assert 1.004 < ratio < 1.012, ratio


def test_correlated_ols_interval_covers_the_closed_form_reference():
    """cv29: the averaged-regime interval beside the CORRELATED headline (the default
    ``covariance``: "full", from the exact estimator) on fixed-design least squares with AR(1)
    0.9 inputs (d = 64, n = 4,000; the weights' correlation up to 0.67): the reference
    :func:`AV.ols_truth` is the headline's quantity at ``theta*`` with the exact ``sigma``,
    correlation and leverages (population game).

    Every record is stored (``num_records = n``), so the records' error is small and the width
    is the bootstrap draws' (grids of 4 and 8 sd: half-widths ~4.5% and ~9% of the value). The
    independent form reads 2-8% above the correlated one here, so an interval left in the
    independent form misses above on the 4-sd grid. Asserts, over 3 trainings x 2 grids: each in
    the averaged regime with the full correlation, the carry exercised on the 4-sd grid, the
    headline within 12% of the reference (measured sd over trainings 2-5%), and at least 5 of the
    6 intervals contain the reference (measured coverage at rho = 0.9 with every record stored:
    1.00 on the 4-sd grid, 0.825 on the 8-sd one, 40 each, ``benchmarks/coverage_averaged.py --ols
    0 0.9 --ols-records 4000``, docs/validation.md cv29: two or more misses then have probability
    ~8%; seeds 0-2, fixed beforehand). Can fail: a change of the interval's centre, width or carry, or a bias of a
    few percent of the correlated form, sigma-hat or the leverage correction (what it pins)."""
    import mis_lightning as ml

    des = AV.make_ols_design(64, 4000, 0.9, seed=0)
    steps = (4.0, 8.0)
    truth = {f"step{r:g}": AV.ols_truth(des, r) for r in steps}
    covered = 0
    for t in range(3):
        model, loader, _ = AV.ols_training(des, t)
        rep = ml.assess(model, [AV.ols_scheme(des, r) for r in steps], loader, AV.squared_loss, seed=t,
                        num_records=des.n)
        for name, ref in truth.items():
            r = rep.schemes[name]
            assert r.covariance == "full" and r.interval_regime == "averaged", (r.covariance, r.interval_regime)
            if name == "step4":
                assert r.leakage_independent > 1.04 * r.leakage  # the carry is exercised
            assert r.leakage == pytest.approx(ref, rel=0.12)
            lo, hi = r.interval
            covered += int(lo <= ref <= hi)
    assert covered >= 5, covered


def test_edge_heavy_positions_are_covered_through_the_plug_ins_bias():
    """cg30: population weights crowded near their cells' edges (``|u|`` uniform on [0.25, 0.5],
    512 weights, a 12-sd grid, Rademacher records: no record error, the width is the draws').
    There ``kappa`` peaks, the plug-in reads it smoothed over one sd and is low: closed form
    ``E[sum kappa(theta-hat)] / sum kappa(theta*)`` = 0.974 (:func:`AV.smoothed_kappa`), and the
    draws' centre (two variances) lower still, so an interval around the draws missed the truth
    below in 3 of these 4 trainings. The first-order debiased plug-in ``2 value - med`` reads
    ``2 E kappa_1 - E kappa_2`` = 1.020 of the truth here (the smoothing's residual per harmonic
    is ``(1 - e^-x)^2`` instead of ``1 - e^-x``), and the interval now reaches it: all 4 contain
    the truth (measured upper ends 1.001-1.044 of it; seeds 0-3 fixed beforehand). Can fail: an
    interval that ignores the plug-in's smoothing bias (the old one: 1 of 4)."""
    rng = np.random.default_rng(1)
    out_f, in_f, r = 8, 64, 12.0
    d = out_f * in_f
    n = 16 * d
    row_sd = np.exp(rng.uniform(math.log(0.5), math.log(2.0), out_f))
    u = rng.uniform(0.25, 0.5, d) * rng.choice([-1.0, 1.0], d)
    sigma = np.repeat(row_sd, in_f) / math.sqrt(n)
    theta = (rng.integers(-3, 4, d) + u) * r * sigma
    pop = AV.Population(out_f, in_f, n, row_sd, np.full(d, r), u, theta, "rademacher")
    k0 = AV.kappa_step(u, pop.step_sd).sum()
    k1 = AV.smoothed_kappa(u, pop.step_sd, 1.0, nodes=60).sum()
    k2 = AV.smoothed_kappa(u, pop.step_sd, 2.0, nodes=60).sum()
    assert k1 / k0 < 0.98 and (2 * k1 - k2) / k0 > 1.0, (k1 / k0, (2 * k1 - k2) / k0)  # the design
    truth, _ = AV.truth(pop)
    covered = 0
    for t in range(4):
        lo, hi = _score(AV.training(pop, t), pop, t).interval
        covered += int(lo <= truth <= hi)
    assert covered == 4, covered


def test_diagonal_estimators_unquantized_headline_reads_the_ols_reference():
    """dx32: the diagonal estimator's correlated headline (the stored records' in-sample
    correlation, ``RecordCorrelation.in_sample``) on fixed-design least squares, d = 64,
    n = 1,000, R = 512 stored (the library's default), AR(1) 0.9 inputs, against the closed-form
    reference :func:`AV.ols_truth` (unquantized: exact). Before dx32 it read 1.05 (each record
    scored with its own row in the matrix: the compression of the large forms, ``d / 2R``),
    while its independent form (same ``sigma``, ``w`` and leverage term) read 1.00: measured
    1.051-1.052 over 16 trainings at n = 4,000, rho 0 and 0.9, sd 0.7-0.9% per training
    (docs/validation.md, "The diagonal estimator's unquantized headline 5% high"). Asserts one training within 2.5% (about 3 sd); the old form
    reads 1.05 here. Can fail: a bias of the in-sample form, of ``sigma``, ``w`` or the diagonal
    leverage term."""
    import mis_lightning as ml

    des = AV.make_ols_design(64, 1000, 0.9, seed=0)
    ref = AV.ols_truth(des, None)
    ratios = []
    for t in range(1):
        model, loader, _ = AV.ols_training(des, t)
        rep = ml.assess(model, ["none"], loader, AV.squared_loss, seed=t, estimation="diagonal",
                        uncertainty_draws=0)
        assert rep.schemes["none"].covariance == "factor"
        ratios.append(rep.schemes["none"].leakage / ref)
    assert float(np.mean(ratios)) == pytest.approx(1.0, abs=0.025), ratios
