"""The redesigned math layer (issue 10): one cell kernel, the caller's compile policy, the
scoring forms and the interval as functions, the public ``Estimate`` interface, and the
deprecated aliases of renamed names (``w`` -> ``influence``, ``lam`` -> ``mean_abs``,
``num_samples`` -> ``mc_draws``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
import mis_lightning.functional as F
import mis_lightning.functional.grids as G
from mis_lightning.estimation import estimate
from mis_lightning.functional import fastpath

F64 = torch.float64


def mse(o, t):
    return ((o - t) ** 2).reshape(o.shape[0], -1).sum(-1)


def _cells(d=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, dtype=F64, generator=g)
    sigma = torch.exp(torch.randn(d, dtype=F64, generator=g)) * 0.3
    edges = torch.sort(torch.randn(d, 9, dtype=F64, generator=g) * 2 + theta[:, None], -1).values
    edges[:, 0], edges[:, -1] = -math.inf, math.inf
    return theta, sigma, edges


def test_one_cell_kernel_for_statistics_moments_and_grids():
    """cell_statistics, cell_moments and the grid paths share one kernel: bit-identical
    moments (before, cell_statistics summed diff^2/p and the grid path used unmirrored tails)."""
    theta, sigma, edges = _cells()
    st, mm = F.cell_statistics(theta, sigma, edges), F.cell_moments(theta, sigma, edges)
    for name in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(st, name), getattr(mm, name)), name
    assert G.moments_from_alpha_fast is F.cells.moments_from_alpha
    # Far upper tail: the cell [8, 9] sd has probability 6.2e-16 - 1.1e-19; unmirrored
    # Phi(9) - Phi(8) in float64 is 6.66e-16 (7% off).
    t = F.cells.cell_terms(torch.tensor([[8.0, 9.0]], dtype=F64))
    want = (torch.special.ndtr(torch.tensor(-8.0, dtype=F64)) - torch.special.ndtr(torch.tensor(-9.0, dtype=F64)))
    assert float(t.prob[0, 0]) == pytest.approx(float(want), rel=1e-12)


def test_compile_policy_is_the_callers_not_the_environment(monkeypatch):
    """The math layer no longer reads MIS_LIGHTNING_COMPILE: a caller that passes no policy gets
    "auto" (no compilation for one small workload) even with the variable set to "1"."""
    fastpath.GUARD.reset()
    for key in ("compiled", "compiled_codes"):
        monkeypatch.setitem(G._FUSED_STATE, key, None)
    monkeypatch.setenv("MIS_LIGHTNING_COMPILE", "1")
    c = G.TABLE_MIN_ELEMENTS + 10
    g = torch.Generator().manual_seed(1)
    scale = torch.full((c,), 0.01, dtype=F64)
    theta = torch.randn(c, dtype=F64, generator=g) * 0.3
    G.affine_cell_moments(theta, scale / 2, scale, torch.zeros(c, dtype=F64), -128, 127)
    assert G._FUSED_STATE["compiled_codes"] is None
    assert F.CompilePolicy.parse("1") == F.CompilePolicy("always")
    assert F.CompilePolicy.parse("off") == F.CompilePolicy("never")
    assert F.CompilePolicy.parse(None) == F.CompilePolicy()
    with pytest.raises(ValueError, match=r"MIS_LIGHTNING_COMPILE must be 'auto'.*got 'sometimes'"):
        F.CompilePolicy.parse("sometimes", source="MIS_LIGHTNING_COMPILE")
    with pytest.raises(ValueError, match=r"CompilePolicy.mode must be .* got 'maybe'"):
        F.CompilePolicy("maybe")  # type: ignore[arg-type]
    fastpath.GUARD.reset()


def test_assess_reads_the_compile_environment_once_and_names_it(monkeypatch):
    torch.manual_seed(0)
    X, y = torch.randn(64, 3), torch.randn(64, 1)
    monkeypatch.setenv("MIS_LIGHTNING_COMPILE", "sometimes")
    with pytest.raises(ValueError, match=r"^MIS_LIGHTNING_COMPILE must be"):
        ml.assess(nn.Linear(3, 1), ["rtn_int8"], DataLoader(TensorDataset(X, y), batch_size=16), mse,
                  num_records=16, uncertainty_draws=0)


def test_resolve_method_and_draw_budget():
    kw = dict(d=100, quantized=True, clt_error=0.001, n_eff=50.0, influence_stored=True,
              num_records=512, coarse=100)
    assert F.resolve_method("auto", **kw) == "clt"
    assert F.resolve_method("auto", **{**kw, "d": 1}) == "exact1d"
    assert F.resolve_method("auto", **{**kw, "n_eff": 3.0}) == "mc"
    assert F.resolve_method("auto", **{**kw, "clt_error": math.nan}) == "mc"  # NaN fails the check
    assert F.resolve_method("auto", **{**kw, "n_eff": 3.0, "influence_stored": False}) == "clt"
    assert F.resolve_method("auto", **{**kw, "n_eff": 3.0, "coarse": 10**6}) == "clt"  # over budget
    assert F.resolve_method("mc", **kw) == "mc"
    # 5e8 // (512 * 101) = 9668 by cost; 2^24 // 512 = 32768 by memory
    assert F.mc_draws_for(512, 100) == 9668
    assert F.mc_draws_for(512, 10**7) == F.leakage.MIN_MC_DRAWS
    assert F.coarse_count([torch.tensor([0.0, 0.5, F.FINE_KAPPA, 1.0]), None]) == 1


def test_bootstrap_interval_values():
    draws = [0.10, 0.12, 0.14, 0.16, 0.18]
    lo, hi = F.bootstrap_interval(draws, 0.15, 0.0)
    assert lo == pytest.approx(0.108, abs=1e-12) and hi == pytest.approx(0.172, abs=1e-12)
    lo, hi = F.bootstrap_interval(draws, 0.30, 0.01)  # widened to hold the plug-in, then by 1.2816 se
    assert lo == pytest.approx(0.108 - 0.012816, abs=1e-12) and hi == pytest.approx(0.30 + 0.012816, abs=1e-12)
    lo, hi = F.bootstrap_interval([0.1, 0.2], 0.15)  # < 5 draws: mean +- 1.2816 sd
    sd = math.sqrt(0.005)
    assert lo == pytest.approx(0.15 - 1.2816 * sd, abs=1e-12) and hi == pytest.approx(0.15 + 1.2816 * sd, abs=1e-12)
    lo, hi = F.bootstrap_interval(draws, 0.28, gaussian_plug_in=0.14)  # Monte Carlo: draws x 2
    assert lo == pytest.approx(0.216, abs=1e-12) and hi == pytest.approx(0.344, abs=1e-12)
    with pytest.raises(ValueError, match="at least one draw"):
        F.bootstrap_interval([], 0.1)


def test_bootstrap_interval_ends_stay_within_a_leakage_s_range():
    """A leakage is a TV, in [0, 1]: the record pad and the Monte Carlo rescaling of the draws
    must not carry an end past 1 (nor below 0). Near saturation: plug-in 0.99, draws up to
    0.999 (p90 0.997), record se 0.02 (pad 0.0256): uncapped, the upper end was 1.023."""
    draws = [0.97, 0.98, 0.99, 0.995, 0.999]
    lo, hi = F.bootstrap_interval(draws, 0.99, 0.02)
    assert hi == 1.0 and lo == pytest.approx(0.974 - 0.025632, abs=1e-5)  # p10 0.974
    lo, hi = F.bootstrap_interval([0.6, 0.62], 0.99, gaussian_plug_in=0.5)  # draws x 1.98 > 1
    assert hi == 1.0 and 0.0 <= lo <= 0.99
    lo, hi = F.bootstrap_interval([0.001, 0.002, 0.003, 0.004, 0.005], 0.003, 0.01)
    assert lo == 0.0 and hi == pytest.approx(0.0046 + 0.012816, abs=1e-6)


def test_hybrid_mc_without_coarse_coordinates_is_the_gaussian_form():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(30, 20, dtype=F64, generator=g)
    mc = F.HybridMC(30)
    mc.update(w, None)  # unquantized: all Gaussian
    got = mc.compute(500, 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, F.baseline_leakage(w, 500), rtol=1e-15, atol=0)
    one = F.exact1d_leakage(w[:, 0], torch.tensor([F.cells.SQRT_2_OVER_PI], dtype=F64), 500)
    torch.testing.assert_close(one, F.baseline_leakage(w[:, :1], 500), rtol=1e-15, atol=1e-18)


@pytest.mark.parametrize("f32", [False, True])
def test_estimate_power_sums_factored_equal_stored(f32, monkeypatch):
    """Estimate.power_sums (what assess reads, instead of private fields) gives the same sums
    from the layer factors (influences not stored) as from the stored influences: to 1e-8 in
    float64, to the stated 1e-4 with the factored sums' float32 GEMMs (pf28)."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4}) if f32 else frozenset())
    # the stored influences of K-FAC layers are psi's, the factored ones the gradients' (dg31;
    # method.md section 4): the sums are compared on the same (gradients') influences
    import importlib
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_INFLUENCES", False)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(120, 4, generator=g, dtype=F64)
    y = X[:, :1] + 0.1 * torch.randn(120, 1, generator=g, dtype=F64)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    dl = DataLoader(TensorDataset(X, y), batch_size=30)
    stored = estimate(m, dl, mse, mode="diagonal", hessian="ggn", num_records=40)
    factored = estimate(m, dl, mse, mode="diagonal", hessian="ggn", num_records=40, budget=64)
    assert stored.influence_stored and not factored.influence_stored and factored.factors is not None
    for name in stored.names:
        numel = stored.theta[name].numel()
        cols = torch.rand(numel, 3, generator=g, dtype=F64)
        a = stored.power_sums(name, {2: cols, 4: cols})
        b = factored.power_sums(name, {2: cols, 4: cols})
        w = stored.influence[:, slice(*stored.offsets[name])]
        torch.testing.assert_close(a[2], w.square() @ cols, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a[4], w.pow(4) @ cols, rtol=1e-12, atol=1e-12)
        for p in (2, 4):
            torch.testing.assert_close(b[p], a[p], rtol=lf.POWER_SUMS_F32_RTOL if f32 else 1e-8,
                                       atol=0.0 if f32 else 1e-10)
    with pytest.raises(ValueError, match=r"powers 2 and 4, got \[3\]"):
        stored.power_sums(stored.names[0], {3: cols})


def test_deprecated_aliases_warn_and_agree():
    theta, sigma, edges = _cells(d=5)
    st = F.cell_statistics(theta, sigma, edges)
    with pytest.warns(DeprecationWarning, match="use `mean_abs`"):
        assert st.lam is st.mean_abs
    with pytest.warns(DeprecationWarning, match="use `mean_abs=`"):
        mm = F.CellMoments(kappa=st.kappa, lam=st.mean_abs, m4=st.m4, coverage=st.coverage)
    assert torch.equal(mm.mean_abs, st.mean_abs)
    with pytest.raises(TypeError, match="not both"):
        F.CellMoments(st.kappa, st.mean_abs, st.m4, st.coverage, lam=st.mean_abs)
    w = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    new = F.record_leakage(w, st, 100, method="mc", mc_draws=256, generator=torch.Generator().manual_seed(5))
    with pytest.warns(DeprecationWarning, match=r"record_leakage\(num_samples=...\) is deprecated"):
        old = F.record_leakage(w=w, stats=st, n=100, method="mc", num_samples=256,
                               generator=torch.Generator().manual_seed(5))
    assert torch.equal(new, old)
    assert F.leakage.DEFAULT_NUM_SAMPLES == F.DEFAULT_MC_DRAWS
    X, y = torch.randn(50, 2, dtype=F64), torch.randn(50, 1, dtype=F64)
    est = estimate(nn.Linear(2, 1).double(), DataLoader(TensorDataset(X, y), batch_size=25), mse, num_records=10)
    with pytest.warns(DeprecationWarning, match="Estimate.influence"):
        assert est.w is est.influence
