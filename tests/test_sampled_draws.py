"""Subsampled bootstrap draws (issue 13; method.md section 3, "Subsampled draws"): a large
chunk evaluates the built draws' moments on a random sixteenth of its rows (at least one per
group), scaled as
Horvitz-Thompson estimates, with the centre's sample noise from random groups."""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import pytest
import torch

from mis_lightning.quantization.base import ParamGrid
from mis_lightning.quantization.casts import representable_values

A = importlib.import_module("mis_lightning.assess")
F64 = torch.float64
D = 16  # the default uncertainty_draws


def _affine_grid(rows: int, cols: int) -> tuple:
    """An int4-like grid with per-row absmax scales and weights whose sd spans 0.3-4 steps:
    coarse cells (kappa moves with the position) and the clamped ends (support bounds)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(rows, cols, dtype=F64, generator=gen)
    m = w.abs().amax(1, keepdim=True)
    scale = m / 7.0
    g = ParamGrid(name="w", shape=(rows, cols), kind="affine", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=4.0, scale=scale, block_size=(1, cols), zero_point=torch.zeros_like(scale),
                  qmin=-8, qmax=7)
    g.reveal(w.float(), "absmax")
    sigma = (scale.expand(rows, cols).reshape(-1) * (0.25 + 3.75 * torch.rand(rows * cols, dtype=F64, generator=gen)))
    return g, w.reshape(-1), sigma


def _fp8_grid(rows: int, cols: int) -> tuple:
    values = representable_values(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, dtype=F64, generator=gen) * 0.1
    m = w.abs().amax(1, keepdim=True)
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=8.0, scale=m / 448.0, block_size=(1, cols), values=values)
    g.reveal(w.float(), "absmax")
    sigma = torch.rand(rows * cols, dtype=F64, generator=gen) * 0.03 + 1e-3
    return g, w.reshape(-1), sigma


# kappa tolerance of the value tables' interpolation (docs/benchmarks.md: <= 1e-7; the sample
# reads the 8 positions in one call, the full evaluation one call per position)
TOL = {"affine": 1e-12, "table": 1e-7}


def _chunk(kind: str, rows: int, cols: int) -> tuple:
    """A fresh grid of ``kind`` (its caches empty), its weights, sds, main kappa and the draws' noise."""
    g, th, sg = (_affine_grid if kind == "affine" else _fp8_grid)(rows, cols)
    k_main = g.moments(th, sg, 0, rows * cols).kappa
    xi = torch.randn(A._draw_noise_rows(D), rows * cols, dtype=F64, generator=torch.Generator().manual_seed(1))
    return g, th, sg, k_main, xi


@functools.cache
def _full_parts(kind: str, rows: int, cols: int) -> tuple:
    """The fully evaluated draws' parts of :func:`_chunk`'s chunk (the reference), once per kind
    and size for both sample units, on a grid of its own (0.7 / 1.2-1.4 CPU s a call for the
    affine / table kinds); deterministic: bitwise the same as a per-test evaluation."""
    g, th, sg, k_main, xi = _chunk(kind, rows, cols)
    full, mix, _ = A._draw_parts(g, th, sg, 0, rows * cols, k_main, xi, D, None)
    return full, mix


@pytest.mark.parametrize("kind", ["affine", "table"])
@pytest.mark.parametrize("unit", [1, 256])
def test_sampled_draws_are_the_evaluated_moments_on_the_sample(kind, unit):
    """On the sampled rows the subsampled draws' parts are the fully evaluated ones scaled by
    ``1 / pi`` (the mean) and ``1 / sqrt(pi)`` (the sd parts), within the kappa tolerance of
    the grid's path (affine 1e-12, value tables 1e-7, relative to a part's largest value on the
    chunk); the groups partition the mean part; ``pi`` is the sampled share of the rows."""
    rows, cols = 160, 256
    g, th, sg, k_main, xi = _chunk(kind, rows, cols)
    c = rows * cols
    full, mix_f = _full_parts(kind, rows, cols)
    sample = A._draw_sample(c, unit, torch.Generator().manual_seed(2))
    elem, grp, pi = sample
    assert pi == pytest.approx(round(A.DRAW_SAMPLE_FRACTION * c / unit) / (c / unit))
    assert elem.numel() == round(pi * c)
    basis, mix, groups = A._sampled_draw_parts(g, th, sg, 0, c, k_main, xi, D, None, sample)
    # the positions given on the sample only (what the scoring pass draws): bitwise the same parts
    on = A._sampled_draw_parts(g, th, sg, 0, c, k_main, xi[:, elem].clone(), D, None, sample, xi_on_sample=True)
    assert all(torch.equal(u, v) for u, v in zip(on, (basis, mix, groups)))
    torch.testing.assert_close(mix, mix_f)
    assert basis.shape == (full.shape[0], elem.numel()) and groups.shape == (A.DRAW_SAMPLE_GROUPS, elem.numel())
    assert float(full[0].abs().max()) > 1e-4 and float(full[1:].abs().max()) > 1e-4  # kappa moves
    tol = TOL[kind]
    assert float((basis[0] * pi - full[0, elem]).abs().max()) <= tol * max(1.0, float(full[0].abs().max()))
    err_sd = (basis[1:] * math.sqrt(pi) - full[1:, elem]).abs().max()
    assert float(err_sd) <= tol * max(1.0, float(full[1:].abs().max()))
    torch.testing.assert_close(groups.sum(0), basis[0], rtol=0, atol=1e-15)
    assert bool(((groups != 0).sum(0) <= 1).all())
    # balanced groups of whole rows
    sizes = torch.bincount(grp, minlength=A.DRAW_SAMPLE_GROUPS) // unit
    assert int(sizes.max() - sizes.min()) <= 1


def test_sampled_sums_are_unbiased_and_the_group_noise_is_calibrated():
    """Over 300 samples of a coarse int4-like chunk (random influences, R = 32 records): the
    per-record sums of ``w^2 mu`` and of ``w^4 v`` from the sample average to the full
    evaluation's (within 4 standard errors of the mean over samples), and the random-group
    variance estimate of the centre (a linear functional: the mean over records) averages to
    the centre's variance over samples (ratio in [0.75, 1.33]; 300 samples give its sd ~0.08; the
    groups treat the quarter sample as drawn with replacement, so the estimate is conservative by
    up to 1 / (1 - 1/4): seeds 9-12 read 1.13-1.38 at this size, 1.18 for the seed used; dividing by
    G instead of G (G - 1) reads 8.3). A 64 x 64 chunk: 7 s instead of 51 s for 160 x 256."""
    rows, cols = 64, 64  # 16 of the 64 rows sampled: 2 per group (the statistics' power is in the 300 samples)
    g, th, sg = _affine_grid(rows, cols)
    c, R, G = rows * cols, 32, A.DRAW_SAMPLE_GROUPS
    k_main = g.moments(th, sg, 0, c).kappa
    xi = torch.randn(A._draw_noise_rows(D), c, dtype=F64, generator=torch.Generator().manual_seed(1))
    full, _, _ = A._draw_parts(g, th, sg, 0, c, k_main, xi, D, None)
    w2 = torch.randn(R, c, dtype=F64, generator=torch.Generator().manual_seed(4)).square()
    mu_f = w2 @ full[0]
    var_f = w2.square() @ full[1:].square().mean(0)  # sum w^4 v, v read off the built parts
    gen = torch.Generator().manual_seed(9)
    mus, vars_, est_var = [], [], []
    for _ in range(300):
        sample = A._draw_sample(c, cols, gen)
        basis, _, groups = A._sampled_draw_parts(g, th, sg, 0, c, k_main, xi, D, None, sample)
        ws = w2[:, sample[0]]
        mus.append(ws @ basis[0])
        vars_.append(ws.square() @ basis[1:].square().mean(0))
        gm = (ws @ groups.T).mean(0)  # [G] the groups' centre sums, mean over records
        reps = G * gm
        est_var.append(float((reps - reps.mean()).square().sum() / (G * (G - 1))))
    mus_t, var_t = torch.stack(mus), torch.stack(vars_)
    for est, ref in ((mus_t, mu_f), (var_t, var_f)):
        se = est.std(0) / math.sqrt(est.shape[0])
        assert bool(((est.mean(0) - ref).abs() <= 4 * se + 1e-12).all())
    centre = mus_t.mean(1)
    ratio = sum(est_var) / len(est_var) / float(centre.var())
    assert 0.75 <= ratio <= 1.33, ratio


def _diagonal_relu_mlp():
    """The 64 -> 24 -> 1 ReLU MLP of ``_nets``, its diagonal estimate (64 stored records, the
    Gauss-Newton Hessian) and the scoring configuration of the same call."""
    from _nets import trained_relu_mlp
    from torch.utils.data import DataLoader, TensorDataset

    from mis_lightning.config import stage_configs

    model, x, y = trained_relu_mlp()
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None,
                                       {"estimation": "diagonal", "num_records": 64, "hessian": "ggn",
                                        "budget": 1000})
    est = A.run_estimation(model, DataLoader(TensorDataset(x, y), batch_size=128),
                           lambda o, t: (o[:, 0] - t) ** 2, est_cfg)
    return model, est, sc_cfg


# The sampled run's draws' centre (the draws' median) against the full run's, in units of
# sqrt(2) x the sample noise the sampled run reports: the two runs read independent normals on the
# sampled parameter (the sample's own ``[rows, m]`` block against the chunk's ``[rows, c]``), so
# Var(m_s - m_f) = Var(m_s) + Var(m_f) <= 2 Var(m_s) (the full centre's Monte Carlo variance,
# sum w^4 Var(mu_j), is at most the Horvitz-Thompson one, sum w^4 Var(mu_j) / pi, plus its sampling
# variance); the reported noise estimates sd(m_s) from DRAW_SAMPLE_GROUPS = 8 random groups (7
# degrees of freedom), so the ratio is at most a Student t_7: P(|t_7| > 6) = 5.4e-4 where the full
# centre is as noisy as the sampled one, 6e-5 where it is exact (the ratio's sd over 24 seeds x 2
# schemes x both normals' precisions: 0.57-0.71 of t_7's worst case; docs/benchmarks.md, "p51c").
CENTRE_T = 6.0


def _averaged_ends_bound(full: dict, samp: dict, level: float) -> tuple[float, float, float, float]:
    """``(|m_s - m_f|, its allowance, bound on |lo_s - lo_f|, bound on |hi_s - hi_f|)`` of one scheme's
    averaged-regime interval (``functional.interval.leakage_interval``) in a full and a sampled run
    with the same plug-in ``v`` and record error: each end is ``min``/``max`` of ``m + sqrt 2 d``,
    ``m + sqrt 2 d + 2 (v - m)`` and ``v`` (``d`` the draws' p10 / p90 distance from their median
    ``m``), less / plus ``pad = z1 hypot(record_se, noise)``; ``min``, ``max`` are 1-Lipschitz, so
    ``|end_s - end_f| <= |dm| + sqrt 2 |dd| + |dpad|`` with ``|dd| <= max(|d_f|, |d_s|)`` (``d`` of
    one sign); ``dm`` is allowed ``CENTRE_T sqrt 2`` times the sampled run's reported noise."""
    a = 0.5 * (1.0 - level)
    qs = torch.tensor([a, 0.5, 1.0 - a], dtype=F64)
    (lo_f, m_f, hi_f), (lo_s, m_s, hi_s) = (
        [float(x) for x in torch.quantile(r["draws"].to(F64), qs)] for r in (full, samp))
    z1 = A.F.interval.normal_quantile(0.5 * (1.0 + level))
    dpad = z1 * (math.hypot(samp["record_se"], samp["noise"]) - math.hypot(full["record_se"], full["noise"]))
    dm = abs(m_s - m_f)
    return (dm, CENTRE_T * math.sqrt(2.0) * samp["noise"],
            dm + math.sqrt(2.0) * max(m_f - lo_f, m_s - lo_s) + abs(dpad),
            dm + math.sqrt(2.0) * max(hi_f - m_f, hi_s - m_s) + abs(dpad))


def test_scoring_evaluates_the_draws_on_a_sample_of_a_large_parameter(monkeypatch):
    """End to end (a 64 -> 24 -> 1 MLP, the sampling threshold lowered to its 1,536-weight
    layer, factored influences): the draws' cell moments are evaluated on a sample of the
    first layer's rows (8 of its 24: at least one per group) instead of every row; the
    headline, d_eff and the pool value are bitwise those of the full evaluation; the sample
    noise is reported into the interval, the draws' centre moves by at most ``CENTRE_T sqrt 2``
    times it, and each interval end by at most what that centre, the draws' spread and the
    noise's pad explain (:func:`_averaged_ends_bound`; the two runs' draws are independent
    realizations on the sampled layer: a fixed share of the width is no bound, the ends moved
    by up to 7-8% of it over 24 seeds with float64 or float32 normals)."""
    model, est, sc_cfg = _diagonal_relu_mlp()
    assert est.factors is not None and not est.influence_stored
    counted = {"n": 0}
    real = A._draw_parts

    def counting(grid, th, *args, **kw):
        counted["n"] += th.numel()
        return real(grid, th, *args, **kw)

    monkeypatch.setattr(A, "_draw_parts", counting)
    noise = []
    real_noise = A._draw_sample_noise
    monkeypatch.setattr(A, "_draw_sample_noise", lambda *a: noise.append(real_noise(*a)) or noise[-1])
    seen: list[dict] = []
    real_iv = A.F.interval.leakage_interval
    level = inspect.signature(real_iv).parameters["level"].default

    def spy(value, record_se, n, **kw):
        iv = real_iv(value, record_se, n, **kw)
        seen.append({"draws": kw["draws"], "record_se": record_se, "noise": kw.get("draw_noise", 0.0),
                     "regime": iv.regime})
        return iv

    monkeypatch.setattr(A.F.interval, "leakage_interval", spy)
    schemes = ["rtn_int4", "rtn_int2"]
    monkeypatch.setattr(A, "DRAW_SAMPLE_MIN_WEIGHTS", 1 << 40)
    rep_full = A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
    n_full = counted["n"]
    counted["n"] = 0
    ivs_full = seen[:]
    seen.clear()
    monkeypatch.setattr(A, "DRAW_SAMPLE_MIN_WEIGHTS", 1024)
    monkeypatch.setattr(A, "DRAW_SAMPLE_MIN_ROWS", 16)
    rep = A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
    n_sampled = counted["n"]
    first = est.theta[est.names[0]].numel()
    # the first layer (1,536 weights, 24 rows of 64) is sampled: 8 of its 24 rows
    assert n_full - n_sampled == len(schemes) * (first - 8 * 64)
    assert any(v > 0 for v in noise)
    assert len(ivs_full) == len(seen) == len(schemes)
    for s, f, p in zip(schemes, ivs_full, seen):
        a, b = rep_full.schemes[s], rep.schemes[s]
        assert a.leakage == b.leakage and a.d_eff == b.d_eff and a.pool_leakage == b.pool_leakage
        assert f["regime"] == p["regime"] == "averaged" and f["noise"] == 0.0 < p["noise"]
        dm, allowed, d_lo, d_hi = _averaged_ends_bound(f, p, level)
        assert dm <= allowed, (s, dm, allowed)
        tiny = 1e-12 * (a.interval[1] - a.interval[0])  # the ends' own float64 roundings
        assert abs(a.interval[0] - b.interval[0]) <= d_lo + tiny, (s, a.interval, b.interval, d_lo)
        assert abs(a.interval[1] - b.interval[1]) <= d_hi + tiny, (s, a.interval, b.interval, d_hi)


def test_scoring_draws_the_positions_on_the_sample_only(monkeypatch):
    """The scoring pass draws the bootstrap positions ``xi`` of a sampled chunk on its sampled
    elements only (``rows x m`` standard normals, not ``rows x c``: a sixteenth; pf29), and the
    draws read them: the chunk's draw parts are those of :func:`_sampled_draw_parts` given those
    normals. The 64 -> 24 -> 1 MLP of the test above, its 1,536-weight layer sampled (8 of 24 rows)."""
    model, est, sc_cfg = _diagonal_relu_mlp()
    monkeypatch.setattr(A, "DRAW_SAMPLE_MIN_WEIGHTS", 1024)
    monkeypatch.setattr(A, "DRAW_SAMPLE_MIN_ROWS", 16)
    drawn: list[tuple[int, ...]] = []
    real_randn = torch.randn

    def counting_randn(*size, **kw):
        out = real_randn(*size, **kw)
        if kw.get("generator") is not None:
            drawn.append(tuple(out.shape))
        return out

    seen: list[tuple] = []
    real_parts = A._sampled_draw_parts

    def parts(grid, th, sg, a, b, k_main, xi, draws, policy, sample, **kw):
        seen.append((tuple(xi.shape), sample[0].numel(), b - a, kw.get("xi_on_sample", False)))
        return real_parts(grid, th, sg, a, b, k_main, xi, draws, policy, sample, **kw)

    monkeypatch.setattr(A.torch, "randn", counting_randn)
    monkeypatch.setattr(A, "_sampled_draw_parts", parts)
    A.score_schemes(est, model, ["rtn_int4"], scoring_config=sc_cfg)
    first = est.theta[est.names[0]].numel()
    rows = A._draw_noise_rows(D)
    assert seen and all(on and shape == (rows, m) and c == first and m == 8 * 64 for shape, m, c, on in seen)
    assert (rows, 8 * 64) in drawn and (rows, first) not in drawn
