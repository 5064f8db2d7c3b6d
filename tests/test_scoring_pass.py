"""The one-pass scoring of issue 13 (``assess._joint_sums``): every scheme and bootstrap draw
in one streaming pass per parameter, against the whole-parameter per-draw path it replaced."""

from __future__ import annotations

import copy
import functools
import importlib
import math

import pytest
import torch
from _joint_switch import joint_pass_on_off  # tests/_joint_switch.py
from _nets import trained_relu_mlp  # tests/_nets.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.config import stage_configs
from mis_lightning.quantization import get_scheme

A = importlib.import_module("mis_lightning.assess")
LF = importlib.import_module("mis_lightning.estimation.linear_factors")

SCHEMES = ["rtn_int4", "int8_weight_only", "rtn_int2", "intx_weight_only_int4_g32"]


def _estimate(kind: str):
    """A small trained ReLU MLP and its estimate with stored, factored or recomputed influences:
    a private deep copy of the one computed per kind (the 12 calls here train and estimate 3
    times, not 12)."""
    return copy.deepcopy(_estimate_once(kind))


@functools.cache
def _estimate_once(kind: str):
    model, x, y = trained_relu_mlp()
    opts = {"estimation": "diagonal", "num_records": 64, "hessian": "ggn" if kind != "recomputed" else "auto"}
    if kind != "stored":
        opts["budget"] = 1000  # too small to store the [R, d] influences
    est_cfg, _, _ = stage_configs("assess", None, None, opts)
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    est = A.run_estimation(model, loader, lambda o, t: (o[:, 0] - t) ** 2, est_cfg)
    if kind == "recomputed":
        est.factors = None  # the generic path: per-sample gradients recomputed per record block
    assert est.influence_stored == (kind == "stored")
    assert (est.factors is not None) == (kind == "factored")
    return model, est


def _prepared(est, model, draws=16):
    preps = [A._prepare_scheme(est, model, get_scheme(s), draws) for s in SCHEMES]
    col = 1
    for p in preps:
        p.column = col
        col += 2 + p.num_draws
    return preps


def _per_draw_reference(est, prepared, chunk, seed):
    """The path before issue 13: per scheme, whole-parameter kappa columns at theta-hat, at each
    bootstrap draw (every element evaluated) and in the pool protocol, stacked into one
    ``[numel, M]`` float64 block and summed by one ``Estimate.power_sums`` call."""
    out = {}
    for pi, name in enumerate(est.names):
        numel = est.theta[name].numel()
        reader = A._InfluenceReader(est, name)
        step = max(1, chunk // reader.unit) * reader.unit
        cols = [torch.ones(numel, dtype=torch.float64)]
        m4s = [torch.full((numel,), 3.0, dtype=torch.float64)]
        main = [0]
        for prep in prepared:
            main.append(len(cols))
            if name in prep.grids:
                gen = torch.Generator().manual_seed(seed + 7919 * (pi + 1))
                A._param_moments(est, prep, name, step, gen)
                cols.append(prep.kappa[name])
                m4s.append(prep.m4[name])
                cols += prep.draws[name]
                cols.append(prep.kappa_pool[name])
            else:
                cols.append(cols[0])
                m4s.append(m4s[0])
                cols += [cols[0]] * (prep.num_draws + 1)
        K, M4 = torch.stack(cols, 1), torch.stack(m4s, 1)
        Km = K[:, main]
        ps = est.power_sums(name, {2: K, 4: torch.cat([M4 - 3 * Km**2, Km**2], 1)})
        out[name] = (ps[2], ps[4], main)
    return out


@pytest.mark.parametrize("kind,f32", [("stored", False), ("factored", False), ("recomputed", False),
                                      ("factored", True)])
# 450: the 64 x 24 first weight in 4 chunks, the last one partial, cut inside rows where the reader's
# unit is 1 (stored, recomputed) and at 7 whole rows where it is 64 (factored): the streamed path
# across chunks as chunk=100 (16-24 chunks) exercised it, with the same bound/exact branches
# taken, at a third of the cost (ts36)
@pytest.mark.parametrize("chunk", [1 << 18, 450])
def test_one_pass_equals_per_draw_path(kind, chunk, f32, monkeypatch):
    """Every column (baseline, each scheme's main, 16 draws, pool) of every parameter: the
    streamed sums equal the whole-parameter per-draw path to 1e-10 relative (float64, same
    draws; the only differences are the order of the sums and the draws written as
    differences from the main kappa, ~1e-15 measured). With the factored power sums' float32
    GEMMs (pf28; both paths use them, on other column sets): to their stated 1e-4."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4}) if f32 else frozenset())
    rtol = lf.POWER_SUMS_F32_RTOL if f32 else 1e-10
    model, est = _estimate(kind)
    prepared = _prepared(est, model)
    new = A._joint_sums(est, prepared, chunk, 0, keep_moments=False)
    ref = _per_draw_reference(est, _prepared(est, model), chunk, 0)
    ncols = 1 + sum(2 + 16 for _ in SCHEMES)
    for name in est.names:
        s2, s4, main = ref[name]
        assert len(new[name]) == ncols == s2.shape[1]
        for m in range(ncols):
            torch.testing.assert_close(new[name][m].s2, s2[:, m], rtol=rtol, atol=1e-300)
        nm = len(main)
        assert not new[name][0].bound
        for j, m in enumerate(main):
            got = new[name][m]
            if got.bound:  # streamed: the scheme-free bounds, and the exact sums on demand
                assert j > 0
                torch.testing.assert_close(got.s22, s4[:, nm], rtol=rtol, atol=1e-300)
                torch.testing.assert_close(got.s4, 3.0 * s4[:, nm], rtol=rtol, atol=1e-300)
                assert bool((got.s4 >= s4[:, j].abs()).all()) and bool((got.s22 >= s4[:, nm + j]).all())
                got = A._exact_fourth_sums(est, prepared[j - 1], {name: got}, chunk, None)[name]
                assert not got.bound
            torch.testing.assert_close(got.s4, s4[:, j], rtol=rtol, atol=1e-12 if not f32 else 0.0)
            torch.testing.assert_close(got.s22, s4[:, nm + j], rtol=rtol, atol=1e-300)


def test_draws_differ_from_main_and_shared_across_schemes():
    """The draws are real draws (some coarse weight moved: the int2 columns differ from the
    main), and the same positions serve every scheme: two listings of one grid give identical
    draw columns."""
    model, est = _estimate("factored")
    preps = [A._prepare_scheme(est, model, get_scheme(s), 8) for s in ["rtn_int2", "rtn_int2"]]
    preps[1].scheme = get_scheme("rtn_int3")  # a second object; its grid is rtn_int2's
    preps[0].column, preps[1].column = 1, 11
    sums = A._joint_sums(est, preps, 1 << 18, 0, keep_moments=False)
    name = est.names[0]
    main, draws = sums[name][1].s2, [c.s2 for c in sums[name][2:10]]
    assert max(float((d - main).abs().max()) for d in draws) > 1e-6 * float(main.abs().max())
    for b in range(8):
        assert torch.equal(sums[name][2 + b].s2, sums[name][12 + b].s2)


def test_draw_normals_float32_rule(monkeypatch):
    """DRAW_NORMALS_FLOAT32 (p49b): the draws' normals are the generator's float32 normals widened
    to float64 (bitwise), with N(0, 1)'s mean, variance and fourth moment to 5 standard errors of
    2e6 normals, and |xi| <= sqrt(48 ln 2) (Box-Muller on 24-bit uniforms); off: the float64
    stream, as before p49b."""
    monkeypatch.setattr(A, "DRAW_NORMALS_FLOAT32", True)
    x = A._draw_normals(20, 100_000, torch.Generator().manual_seed(5))
    ref = torch.randn(20, 100_000, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    assert x.dtype == torch.float64 and torch.equal(x, ref.to(torch.float64))
    n = x.numel()
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.square().mean()) - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(float(x.pow(4).mean()) - 3.0) < 5 * math.sqrt(96 / n)
    assert float(x.abs().max()) <= math.sqrt(48 * math.log(2))
    monkeypatch.setattr(A, "DRAW_NORMALS_FLOAT32", False)
    y = A._draw_normals(20, 100_000, torch.Generator().manual_seed(5))
    assert torch.equal(y, torch.randn(20, 100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))


def test_joint_pass_draws_read_the_normals_switch(monkeypatch):
    """The joint pass takes its draws' normals from _draw_normals: with DRAW_NORMALS_FLOAT32 on and
    off the baseline, main and pool columns are bitwise the same and the draws' columns differ (another
    realization; each equals the per-draw path on its own normals: test_one_pass_equals_per_draw_path)."""
    model, est = _estimate("factored")
    out = {}
    for flag in (True, False):
        monkeypatch.setattr(A, "DRAW_NORMALS_FLOAT32", flag)
        out[flag] = A._joint_sums(est, _prepared(est, model), 1 << 18, 0, keep_moments=False)
    moved = 0
    for name in est.names:
        col = 1
        for _ in SCHEMES:
            for m in (0, col, col + 17):  # baseline, main, pool
                assert torch.equal(out[True][name][m].s2, out[False][name][m].s2)
            moved += sum(not torch.equal(out[True][name][m].s2, out[False][name][m].s2)
                         for m in range(col + 1, col + 17))
            col += 18
    assert moved > 0


def test_position_free_elements_keep_their_kappa_exactly():
    """Elements the shortcut skips (step at most 1 sd, far from the clamped ends) have the same
    kappa at every draw as at theta-hat: to 1e-15 where the step is at most 0.5 sd (the same
    formula of h), to 5e-9 up to 1 sd (kappa's position dependence there is 2e-9 at most,
    exp(-2 pi^2 sigma^2 / h^2)), and the whole draw equals a full evaluation at the draw to the
    same 5e-9; steps above 1 sd are never skipped."""
    model, est = _estimate("factored")
    prep = A._prepare_scheme(est, model, get_scheme("int8_weight_only"), 4)
    name = est.names[0]
    g = prep.grids[name]
    n = est.theta[name].numel()
    scale, _, _ = g.element_grid(0, n)
    th = est.theta[name].to(torch.float64)
    # sds that put the steps between 0.3 and 1.3 sd of the weight
    ratio = 0.3 + torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sg = scale / ratio
    xi = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    free = A._position_free(g, th, sg, 0, n, xi)
    assert free is not None and 0 < float(free.float().mean()) < 1
    fixed = (scale <= 0) | (g.revealed.reshape(-1).bool() if g.revealed is not None else False)
    assert not bool((free & (ratio > A.POSITION_FREE_STEP) & ~fixed).any())  # only revealed/dead ones
    k_main = g.moments(th, sg, 0, n).kappa
    fast, _ = A._evaluated_draws(g, th, sg, 0, n, k_main, xi, None)
    for b in range(4):
        full = g.moments(th + sg * xi[b], sg, 0, n, use_codes=False).kappa
        torch.testing.assert_close(fast[b], full, rtol=0, atol=5e-9)
        fine = free[b] & (ratio <= 0.5)
        assert bool(fine.any()) and bool((free[b] & (ratio > 0.9)).any())
        torch.testing.assert_close(full[fine], k_main[fine], rtol=0, atol=1e-15)
        torch.testing.assert_close(full[free[b]], k_main[free[b]], rtol=0, atol=5e-9)


@pytest.mark.parametrize("kind", ["stored", "factored"])
def test_streamed_memory_is_bounded_by_the_chunk(kind, monkeypatch):
    """Streamed parameters never build whole-parameter columns: every block handed to the
    power sums has at most ``chunk`` rows, and no per-scheme moments of whole parameters are
    left after the pass (the state per scheme is its ``[R]`` sums)."""
    model, est = _estimate(kind)
    seen = []
    real = A._InfluenceReader.sums

    def spy(self, a, b, columns, rows=None):
        seen.extend(int(c.shape[0]) for c in columns.values())
        return real(self, a, b, columns, rows)

    monkeypatch.setattr(A._InfluenceReader, "sums", spy)
    preps = _prepared(est, model)
    chunk = 256
    A._joint_sums(est, preps, chunk, 0, keep_moments=False)
    assert seen and max(seen) <= chunk
    for p in preps:
        assert not p.kappa and not p.m4 and not p.draws and not p.kappa_pool


def test_memory_cap_on_draws_only_for_recomputed_parameters(monkeypatch):
    """``KAPPA_BUDGET`` (whole-parameter columns) cuts the draws only where the influences are
    recomputed; streamed parameters keep all 16 draws whatever their size."""
    monkeypatch.setattr(A, "KAPPA_BUDGET", 3 * 1536)
    for kind, expect in (("factored", 16), ("recomputed", 1)):
        model, est = _estimate(kind)
        prep = A._prepare_scheme(est, model, get_scheme("int8_weight_only"), 16)
        assert prep.num_draws == expect, kind


@pytest.mark.parametrize(("load", "policy", "expect"), [(9.0, None, 1), (9.0, "PASSIVE", 2), (0.5, None, 2)])
def test_scoring_threads(load, policy, expect, monkeypatch):
    """One thread on an oversubscribed machine unless the wait policy is passive; the caller's
    thread count comes back afterwards, also after an exception."""
    from mis_lightning import threads

    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with threads.scoring_threads() as n:
                assert n == expect == torch.get_num_threads()
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_estimation_pass_runs_on_one_thread_on_an_oversubscribed_machine(monkeypatch):
    """nux56: the estimation pass took 84 s on torch's 2 threads against 6.8 s on 1 at load 9;
    each ``MomentAccumulator.update`` and its ``finalize`` now run under ``scoring_threads``
    (every front end's), and the caller's thread count comes back."""
    from mis_lightning import threads
    from mis_lightning.estimation.estimate import MomentAccumulator

    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen = []

    def loss_fn(out, y):
        seen.append(torch.get_num_threads())
        return torch.nn.functional.mse_loss(out, y, reduction="none").sum(-1)

    torch.manual_seed(0)
    acc = MomentAccumulator(nn.Linear(3, 2), loss_fn, mode="diagonal")
    real = acc._finalize
    monkeypatch.setattr(acc, "_finalize", lambda state: (seen.append(-torch.get_num_threads()), real(state))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        acc.update((torch.randn(16, 3), torch.randn(16, 2)))
        assert torch.get_num_threads() == 2
        acc.finalize()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1, -1}, seen


@pytest.mark.parametrize("step, position, sigma_pos", [
    (4.0, 0.5, None),  # coarse, mid-cell: the change is even in xi (a minimum)
    (4.0, 0.0, None),  # coarse, on a boundary (a maximum)
    (2.5, 0.3, None),
    (2.0, 0.5, None),
    (0.2, None, 6.5),  # fine step, 1.5 sd inside the clamped top end: kappa moves with the end
])
def test_built_draws_have_the_evaluated_draws_mean_and_variance(step, position, sigma_pos):
    """Per element, the draws built from two antithetic pairs (``assess._draw_moments``) have
    the mean and the variance of the kappa change of evaluated draws (``_evaluated_draws``):
    one element repeated over 20,000 copies with independent positions, the built mean and
    variance (read off the draws at zeta = 0 and 1) averaged over the copies against the mean
    and variance of one evaluated draw per copy. Tolerance: 5 standard errors (a mean off by
    5%, or the plain sample variance of the four correlated values, fails)."""
    from mis_lightning.quantization.base import ParamGrid

    N, sigma = 20_000, 1.0
    h = step * sigma
    qmin, qmax = -8, 7
    if sigma_pos is None:
        theta = (0.5 + position) * h  # position in the cell of code 1, from its lower edge 0.5 h
    else:
        theta = (qmax - 0.5) * h - (sigma_pos - 5.0) * sigma  # 1.5 sd inside the top end
    g = ParamGrid(name="w", shape=(N,), kind="affine", dequantized=torch.zeros(N), bits_per_weight=4.0,
                  scale=torch.full((N,), h), block_size=(1,), zero_point=torch.zeros(N), qmin=qmin, qmax=qmax)
    th = torch.full((N,), theta, dtype=torch.float64)
    sg = torch.full((N,), sigma, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    k_main = g.moments(th, sg, 0, N, use_codes=False).kappa
    # rows: the two pairs' positions, then 5 draws' zeta (antithetic: +zeta_0..2, -zeta_0..1)
    xi = torch.randn(A._draw_noise_rows(5), N, dtype=torch.float64, generator=gen)
    xi[2], xi[3] = 0.0, 1.0  # zeta = 0 and 1: the draws mu and mu + sd
    built, _ = A._draw_moments(g, th, sg, 0, N, k_main, xi, 5, None)
    mu, var = built[0] - k_main, (built[1] - built[0]).square()
    torch.testing.assert_close(built[4], 2 * built[0] - built[1])  # the antithetic draw of zeta = 1
    # evaluated: one independent draw per copy
    ev, _ = A._evaluated_draws(g, th, sg, 0, N, k_main, torch.randn(1, N, dtype=torch.float64, generator=gen), None)
    dl = ev[0] - k_main
    m_e, v_e = float(dl.mean()), float(dl.var())
    se_m = (v_e / N + float(mu.var()) / N) ** 0.5
    se_v = ((float((dl - m_e).pow(4).mean()) - v_e**2) / N + float(var.var()) / N) ** 0.5
    assert v_e > 1e-8  # kappa moves in every case
    assert abs(float(mu.mean()) - m_e) <= 5 * se_m
    assert abs(float(var.mean()) - v_e) <= 5 * se_v


def test_streamed_fourth_power_sums_bound_or_exact(monkeypatch):
    """Streamed influences: a scheme's Edgeworth estimate is the scheme-free bound
    ``B / (8 s2^2)`` when that bound is within the tolerance (int8 here), else the exact value
    from the second pass, equal to the stored-influence path's to 1e-10 relative (rtn_int4,
    rtn_int2, g32 here: the bounds fail on this 1,585-weight MLP); the note "beyond its
    tolerance" follows the exact value either way (method.md section 3, "Gaussian form's
    diagnostics"). The factored sums in float64 (their float32 GEMMs, within 1e-4, are held by
    test_one_pass_equals_per_draw_path and tests/test_factored_sums.py)."""
    import mis_lightning.estimation.linear_factors as lf
    from mis_lightning import functional as F

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    # the stored influences of K-FAC layers are psi's, the streamed (factored) ones the gradients'
    # (dg31; method.md section 4): the subject here is the streamed sums, on the same influences
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_INFLUENCES", False)

    _, sc, _ = stage_configs("assess", None, None, {})
    reps = {}
    for kind in ("stored", "factored"):
        # not the cached estimate: the stored one with the gradients' influences
        model, est = _estimate_once.__wrapped__(kind) if kind == "stored" else _estimate(kind)
        reps[kind] = A.score_schemes(est, model, SCHEMES, scoring_config=sc).schemes
    kinds = set()
    for s in SCHEMES:
        exact, got = reps["stored"][s].clt_error_estimate, reps["factored"][s].clt_error_estimate
        if abs(got - exact) <= 1e-10 * exact:
            kinds.add("exact")
        else:
            assert exact < got <= F.CLT_TOLERANCE, s
            kinds.add("bound")
        beyond = [any("beyond its tolerance" in n for n in reps[k][s].notes) for k in ("stored", "factored")]
        if reps["stored"][s].method == "clt":
            assert beyond[0] == beyond[1], s
        else:  # the stored path switched to Monte Carlo where the Gaussian form failed: noted there
            assert beyond[1], s
    assert kinds == {"exact", "bound"}


def test_exact_fourth_power_sums_read_the_pass_columns(monkeypatch):
    """fc26: a scheme whose bound fails (rtn_int4, rtn_int2, g32 on this MLP) sums its exact
    fourth powers from the columns kept in the joint pass, without computing its cell moments
    at theta-hat again; its figures are bitwise those of the recomputation (kept columns off:
    ``FOURTH_KEEP_BYTES = 0``), and a chunk whose moments state changed since (here: every
    state read differs) is recomputed, with the same figures."""
    from mis_lightning.quantization.base import ParamGrid

    _, sc, _ = stage_configs("assess", None, None, {})
    second_pass = []
    real_exact, real_moments = A._exact_fourth_sums_of, ParamGrid.moments
    inside = [False]

    def exact(*a, **k):
        inside[0] = True
        try:
            return real_exact(*a, **k)
        finally:
            inside[0] = False

    def moments(self, *a, **k):
        if inside[0]:
            second_pass.append(1)
        return real_moments(self, *a, **k)

    monkeypatch.setattr(A, "_exact_fourth_sums_of", exact)
    monkeypatch.setattr(ParamGrid, "moments", moments)

    def run():
        second_pass.clear()
        model, est = _estimate("factored")
        rep = A.score_schemes(est, model, SCHEMES, scoring_config=sc).schemes
        return {s: (r.leakage, r.interval, r.clt_error_estimate, r.method, tuple(r.notes)) for s, r in rep.items()}, \
            len(second_pass)

    kept, n_kept = run()
    assert n_kept == 0  # every bounded layer's columns were kept
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", 0)
    recomputed, n_re = run()
    assert n_re > 0 and kept == recomputed
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", 1 << 25)
    tick = iter(range(1 << 30))
    monkeypatch.setattr(A, "_moments_state", lambda policy, elements=0: next(tick))
    changed, n_ch = run()
    assert n_ch == n_re and changed == recomputed


def _materialised_influence(est, name):
    """``[R, numel]`` float64 ``w_rj = -(g_rj - gbar_j) / sqrt(V_jj)`` of a factored parameter, from
    its per-sample gradients ``g_r = d_r x_r^T`` (weight) or ``d_r`` (bias), materialised."""
    from mis_lightning.estimation.linear_factors import standardised_influence

    fac, bias = est._factor_of(name)
    gm, vd = est._centring(name, slice(0, est.theta[name].numel()))
    g = fac.d if bias else (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(fac.d.shape[0], -1)
    return standardised_influence(g.double(), gm.double(), vd.double())


def _binomial_magnitude(est, name, col):
    """``[R]`` ``sum_j (|g_rj| + |gbar_j|)^4 |col_j| / V_jj^2`` over a factored parameter's live weights:
    the magnitude of the terms of the binomial expansion of ``sum_j (g_rj - gbar_j)^4 col_j / V_jj^2``
    that ``linear_factors.factored_power_sums`` sums (and a bound on ``sum_j w_rj^4 |col_j|``)."""
    from mis_lightning.estimation.linear_factors import V_NONE

    fac, bias = est._factor_of(name)
    gm, vd = est._centring(name, slice(0, est.theta[name].numel()))
    g = fac.d.double() if bias else (fac.d.double().unsqueeze(-1) * fac.x.double().unsqueeze(1)).reshape(fac.d.shape[0], -1)
    live = vd > V_NONE
    scale = torch.where(live, vd.clamp_min(V_NONE).square().reciprocal(), torch.zeros((), dtype=torch.float64))
    return (g.abs() + gm.abs()).pow(4) @ (scale * col.abs())


def _assert_binomial_close(got, ref, magnitude, numel):
    """``|got - ref| <= 2 (numel + 16) u magnitude`` per record (``u = 2^-53``): float64 sums of
    ``numel`` terms (at most ~16 roundings a term: powers, products, the binomial
    coefficient and the division by ``V^2``), each sum's error within ``gamma_(numel + 16)`` of its
    terms' magnitude (Higham's bound), the library's binomial expansion and the materialised reference
    (its ``w = -(g - gbar) / sqrt(V)`` cancels as the expansion does) each. A bound relative to the
    result is not one: where ``g_rj ~ gbar_j`` the expansion's terms cancel (m48: a record whose
    fourth sum is one weight's with ``(|g| + |gbar|) / |g - gbar| = 55``, ``55^4 = 9e6``: 8.7e-10
    relative off the exact rational sum, 0.84 ``u`` of the magnitude; the materialised sum 3.7e-15)."""
    assert got.shape == ref.shape == magnitude.shape
    tol = 2.0 * (numel + 16) * 2.0 ** -53 * magnitude
    bad = (got - ref).abs() > tol
    assert not bool(bad.any()), f"{int(bad.sum())} records off by more than the float64 bound: {(got - ref).abs()[bad]} > {tol[bad]}"


def test_exact_fourth_sums_of_every_scheme_in_one_call_per_chunk(monkeypatch):
    """pw34: the schemes whose bounds fail sum their exact fourth powers in one pass for all of
    them, one power-sum call per chunk (the per-scheme passes made one per scheme and chunk); each
    scheme's sums equal materialised float64 sums ``sum_j w^4 (m4 - 3 kappa^2)`` and
    ``sum_j w^4 kappa^2`` (``w`` materialised from the factors in float64) within the float64 bound of
    :func:`_assert_binomial_close` (the signed column keeps the call in float64; ~1e-15 relative
    measured, 8.7e-10 on a record whose expansion cancels, m48), and the reports with and
    without the joint pass agree to 1e-12 (the GEMMs' column sets differ: ~1e-16)."""
    _, sc, _ = stage_configs("assess", None, None, {})
    model, est = _estimate("factored")
    prepared = _prepared(est, model)
    sums = A._joint_sums(est, prepared, 1 << 18, 0, keep_moments=False)
    need = [p for p in prepared if any(sums[name][p.column].bound for name in est.names)]
    assert len(need) >= 2
    calls = []
    real_sums = A._InfluenceReader.sums

    def counted(self, a, b, columns, rows=None):
        calls.append((self.name, a))
        return real_sums(self, a, b, columns, rows)

    monkeypatch.setattr(A._InfluenceReader, "sums", counted)
    jobs = [(p, {name: sums[name][p.column] for name in est.names}) for p in need]
    got = A._exact_fourth_sums_of(est, jobs, 1 << 18, None)
    bounded = {name for _, main in jobs for name in est.names if main[name].bound}
    assert len(calls) == len(bounded)  # one call per (parameter, chunk) for every scheme
    for (p, main), res in zip(jobs, got):
        for name in (n for n in est.names if main[n].bound):
            mm = p.grids[name].moments(est.theta[name].double(), est.sigma[name].double(), 0, est.theta[name].numel())
            w4 = _materialised_influence(est, name).pow(4)
            for got_m, col in ((res[name].s4, mm.m4 - 3.0 * mm.kappa.square()), (res[name].s22, mm.kappa.square())):
                _assert_binomial_close(got_m, w4 @ col, _binomial_magnitude(est, name, col), col.numel())
            assert not res[name].bound
    monkeypatch.setattr(A._InfluenceReader, "sums", real_sums)

    def run():
        m, e = _estimate("factored")
        rep = A.score_schemes(e, m, SCHEMES, scoring_config=sc).schemes
        return {s: (r.leakage, *r.interval, r.clt_error_estimate) for s, r in rep.items()}

    joint = run()
    monkeypatch.setattr(A, "JOINT_EXACT_FOURTH", False)
    alone = run()
    for s in SCHEMES:
        torch.testing.assert_close(torch.tensor(joint[s]), torch.tensor(alone[s]), rtol=1e-12, atol=0.0)


def test_finishing_forms_run_under_the_scoring_thread_scope(monkeypatch):
    """fu25 / sm25: the exact box-mean form (phase C, after the pass) spun 2 OpenMP threads on a
    loaded 2-core machine (1.6 -> 19.7 s CPU); each scheme's finishing runs under the same
    one-thread scope as the pass when the machine is oversubscribed."""
    from mis_lightning import threads

    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen = []
    real = A._finish_scheme

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(A, "_finish_scheme", spy)
    model, est = _estimate("stored")
    _, sc, _ = stage_configs("assess", None, None, {"uncertainty_draws": 0})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        A.score_schemes(est, model, ["rtn_int4"], scoring_config=sc)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_chunk_facts_do_not_outlive_the_pass(monkeypatch):
    """sc33's per-chunk facts (``quantization.base.REUSE_CHUNK_FACTS``: chunk-sized float64
    expansions kept for the pool call) are freed when the scoring pass ends, also when it raises:
    a module-level cache must not hold memory in the user's process after the call."""
    import mis_lightning.quantization.base as qb

    model, est = _estimate("stored")
    _, sc, _ = stage_configs("assess", None, None, {"uncertainty_draws": 2})
    kept = []
    real = qb._fact_put

    def spy(*a, **k):
        real(*a, **k)
        kept.append(sum(len(v) for v in qb._FACTS.values()))

    monkeypatch.setattr(qb, "_fact_put", spy)
    A.score_schemes(est, model, ["rtn_int4", "bf16"], scoring_config=sc)
    assert kept and max(kept) > 0  # the cache was used during the pass
    assert all(not v for v in qb._FACTS.values())

    def boom(*a, **k):
        real(*a, **k)
        raise RuntimeError("boom")

    monkeypatch.setattr(qb, "_fact_put", boom)
    with pytest.raises(RuntimeError, match="boom"):
        A.score_schemes(est, model, ["rtn_int4"], scoring_config=sc)
    assert all(not v for v in qb._FACTS.values())


def _reference_unit_facts(th: torch.Tensor, sg: torch.Tensor) -> tuple[float, float, bool, bool]:
    """The joint pass's unit-kappa facts as computed before p51c: on the float64 copies, the live
    weights (sd above float64's tiny) by a masked select."""
    sg_c, th_c = sg.to(torch.float64), th.to(torch.float64)
    live_sd = (sg_c / A.POOL_SIGMA_RATIO)[sg_c > torch.finfo(torch.float64).tiny]
    n = live_sd.numel()
    return (float(live_sd.min()) if n else 0.0), float(th_c.abs().max()), n == sg.numel(), n > 0


@pytest.mark.parametrize("held", [torch.float32, torch.float64])
@pytest.mark.parametrize("held_switch", [True, False])
def test_unit_chunk_facts_are_the_float64_masked_facts_bitwise(monkeypatch, held, held_switch):
    """``_unit_chunk_facts`` (UNIT_FACTS_HELD, p51c: read off the estimate's held tensors, one
    minimum, a masked one only where some sd is not positive) gives bitwise the float64 copies'
    masked-select facts: every weight live, some of sd 0 (either sign) or negative, none live, a
    NaN sd, float32 subnormal and huge sds, float64 sds below float64's tiny, an empty chunk is
    not asked; per held dtype, switch on and off (the division by POOL_SIGMA_RATIO of the least
    value is the least quotient: 20,000 random sds spanning 2^-140..2^100 below); zeros with no
    negative sd (float32: the least live one read off the bits), only the largest finite and inf."""
    monkeypatch.setattr(A, "UNIT_FACTS_HELD", held_switch)
    gen = torch.Generator().manual_seed(7)
    c = 20_000
    th = (torch.randn(c, dtype=torch.float64, generator=gen) * 3.0).to(held)
    spread = torch.exp2(torch.empty(c, dtype=torch.float64).uniform_(-140.0, 100.0, generator=gen))
    sds = {"live": spread.to(held).clamp_min(torch.finfo(held).tiny if held == torch.float64 else 1e-45)}
    some = sds["live"].clone()
    some[::7] = 0.0
    some[3], some[10] = -0.0, -1e-30
    sds["some sd 0"] = some
    zeros = sds["live"].clone()  # sd 0 and -0, no negative one (float32: the least live sd by its bits)
    zeros[::7] = 0.0
    zeros[4] = -0.0
    sds["sd 0, none negative"] = zeros
    big = torch.zeros(c, dtype=held)
    big[[5, 9]] = torch.tensor([float(torch.finfo(held).max), math.inf], dtype=held)  # the largest finite and inf
    sds["huge only"] = big
    sds["none live"] = torch.zeros(c, dtype=held)
    nan = sds["live"].clone()
    nan[11] = math.nan
    sds["nan"] = nan
    one = torch.zeros(c, dtype=held)
    one[-1] = 1e-45 if held == torch.float32 else 1e-320  # one live weight, float32 subnormal / below tiny
    sds["one tiny"] = one
    for case, sg in sds.items():
        assert sg.dtype == held
        sg_c = sg.to(torch.float64)
        got = A._unit_chunk_facts(th, sg, th.to(torch.float64), sg_c, sg_c / A.POOL_SIGMA_RATIO)
        want = _reference_unit_facts(th, sg)
        assert got[2:] == want[2:], case
        assert got[1] == want[1], case
        assert got[0] == want[0] or (math.isnan(got[0]) and math.isnan(want[0])), (case, got, want)
    assert not A._unit_chunk_facts(th, sds["one tiny"], th.double(), sds["one tiny"].double(),
                                   sds["one tiny"].double() / A.POOL_SIGMA_RATIO)[2]
    if held == torch.float64:  # below float64's tiny: not live (the moments paths' floor)
        assert not A._unit_chunk_facts(th, sds["one tiny"], th, sds["one tiny"], sds["one tiny"] / A.POOL_SIGMA_RATIO)[3]


def test_frozen_with_still_is_the_two_counts():
    """``_frozen_with_still`` (FROZEN_COUNTS_FUSED, p51c) counts what the joint pass's two counts
    did: kappa below FROZEN_KAPPA, plus the never-moved weights at or above it where the kappas' dot
    with the never-moved mask is positive; on kappas at, just below and above FROZEN_KAPPA, 0, 1,
    2/pi, +inf and negative, few and most weights never moved, the dot positive, 0 and NaN; the
    chunk's threshold, built once, serves its next column."""
    F = A.FROZEN_KAPPA
    vals = torch.tensor([0.0, F, math.nextafter(F, 0.0), math.nextafter(F, 1.0), 1.0, 2 / math.pi, math.inf,
                         -1e-3, 0.5], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    c = 4096
    cases = 0
    for share in (0.1, 0.9):
        still = torch.rand(c, generator=gen) < share
        thr = None
        for finite in (False, True):
            k = vals[torch.randint(0, vals.numel() - (1 if finite else 0), (c,), generator=gen)]
            # (+inf on never-moved weights only: elsewhere it would make the dot NaN, inf x 0)
            k = k.clamp_max(1.0) if finite else torch.where(k.isinf() & ~still, 0.5, k)
            for s_k in (float(torch.dot(k, still.double())), 0.0, -1.0, math.nan):
                want = int((k < F).sum()) + (int(((k >= F) & still).sum()) if s_k > 0 else 0)
                got, thr = A._frozen_with_still(k, still, s_k, thr)
                assert got == want, (share, finite, s_k)
                cases += s_k > 0
    assert thr is not None and cases == 4
    assert torch.equal(thr.isnan(), still) and bool((thr[~still] == F).all())


@pytest.mark.parametrize("flags", [("UNIT_FACTS_HELD",), ("FROZEN_COUNTS_FUSED",)])
def test_joint_pass_count_switches_leave_the_sums_and_counts_bitwise(monkeypatch, flags):
    """UNIT_FACTS_HELD and FROZEN_COUNTS_FUSED (p51c) on and off: the joint pass's every column,
    each scheme's d_eff and frozen (pinned) count bitwise the same, on the factored estimate with its
    first layer's sds 1e6 times larger and half of them 0 (unit-kappa chunks: unit columns with point
    masses), a third of the other parameters' weights at sd 0 (evaluated columns with never-moved
    weights), and the schemes' float8 and fp16 grids too."""
    model, est = _estimate("factored")
    for i, name in enumerate(est.names):
        sg = est.sigma[name].clone()
        if i == 0:  # the 1e7 MLP's first-layer regime (sd 1e3-1e4 steps), half at sd 0: unit columns with point masses
            sg = sg * 1e6
            sg.view(-1)[::2] = 0.0
        else:  # evaluated columns, a third of the weights never moved
            sg.view(-1)[::3] = 0.0
        est.sigma[name] = sg
    schemes = SCHEMES + ["float8_weight_only", "fp16"]
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", 0)  # (kept fourth-power columns skip the unit-kappa test)
    out = {}
    for flag in (True, False):
        for f in flags:
            monkeypatch.setattr(A, f, flag)
        prepared = [A._prepare_scheme(est, model, get_scheme(s), 16) for s in schemes]
        sums = A._joint_sums(est, prepared, 1 << 18, 0, keep_moments=False)
        out[flag] = (sums, [(p.d_eff, p.frozen, {k: (v.d_eff, v.pinned_fraction) for k, v in p.layers.items()})
                            for p in prepared])
    assert out[True][1] == out[False][1]
    assert any(fr > 0 for _, fr, _ in out[True][1])
    for name in est.names:
        for x, y in zip(out[True][0][name], out[False][0][name]):
            assert torch.equal(x.s2, y.s2) and torch.equal(x.s4, y.s4)


def test_zero_sd_inert_reads_the_variances(monkeypatch):
    """``_zero_sd_inert`` (INERT_ZERO_SD_UNIT, p52b): a chunk's sd-0 weights are inert where each
    has V at most V_NONE (0, negative, NaN: the power sums' dead weights) or infinite (the rounding
    gradients' mark: ``A / inf = 0``), not where one has a finite V above V_NONE (an influence), nor
    where an sd lies in ``(0, tiny]`` (the paths' sd 0, not never moved), nor without never-moved
    weights, with stored influences or the switch off."""
    from mis_lightning.estimation.linear_factors import V_NONE

    _, est = _estimate("factored")
    name = est.names[0]
    n = est.sigma[name].numel()
    reader = A._InfluenceReader(est, name)
    sg = est.sigma[name].reshape(-1).clone()
    sg[::3] = 0.0
    still = A.never_moved(sg)
    v0 = est._v_diag[name].clone()
    for marks, want in (([math.inf], True), ([0.0], True), ([0.0, math.inf, -1.0, math.nan], True),
                        ([V_NONE], True), ([math.inf, 0.5], False), ([1e-30], False)):
        v = v0.reshape(-1).clone()
        idx = still.nonzero().reshape(-1)
        v[idx] = torch.tensor(marks, dtype=v.dtype).repeat(idx.numel() // len(marks) + 1)[: idx.numel()]
        est._v_diag[name] = v.reshape(v0.shape)
        assert A._zero_sd_inert(reader, sg, 0, n, still) is want, marks
        monkeypatch.setattr(A, "INERT_ZERO_SD_UNIT", False)
        assert A._zero_sd_inert(reader, sg, 0, n, still) is False
        monkeypatch.setattr(A, "INERT_ZERO_SD_UNIT", True)
    assert A._zero_sd_inert(reader, sg, 0, n, None) is False  # (no never-moved weight in the parameter)
    tiny = sg.to(torch.float64)
    tiny[1] = 1e-310  # sd 0 to the paths, not never moved
    assert A._zero_sd_inert(reader, tiny, 0, n, A.never_moved(tiny)) is False
    _, stored = _estimate("stored")
    assert A._zero_sd_inert(A._InfluenceReader(stored, name), sg, 0, n, still) is False


@pytest.mark.parametrize("mark", ["inf", "zero", "finite"])
def test_inert_zero_sd_unit_chunks_skip_the_point_masses(monkeypatch, mark):
    """INERT_ZERO_SD_UNIT (p52b) on and off on the factored estimate with its first layer's sds 1e6
    times larger and half of them 0 (unit-kappa chunks with point masses in every grid), those
    weights' V infinite (the rounding gradients' mark), 0 (no variance) or left finite (an
    influence: the switch must not apply). Every scheme's d_eff, pinned count and per-layer figures
    bitwise the same. Inert weights: no point-mass test on; the power sums are float32-path sums of
    the same exact sums (an inert weight's terms are exact zeros, its kappa 0 or 1), each side within
    the run-time bound's POWER_SUMS_F32_RTOL of them (else summed in float64), so within
    2 rtol / (1 - rtol) relative of each other -- what moves is the float32 GEMMs' rounding over
    fewer distinct columns (the 1e7 MLP: 8.4e-8 at most). Finite V: the point masses tested and the
    sums bitwise (dropping them would move the main columns by their weights' share of sum w^2,
    ~half here: far beyond the bound)."""
    model, est = _estimate("factored")
    first = est.names[0]
    for i, name in enumerate(est.names):
        sg = est.sigma[name].clone()
        if i == 0:
            sg = sg * 1e6
            sg.view(-1)[::2] = 0.0
            if mark != "finite":
                v = est._v_diag[name].clone()
                v.view(-1)[::2] = math.inf if mark == "inf" else 0.0
                est._v_diag[name] = v
        est.sigma[name] = sg
    schemes = SCHEMES + ["float8_weight_only"]
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", 0)  # (kept fourth-power columns skip the unit-kappa test)
    out, calls = joint_pass_on_off(monkeypatch, est, model, schemes, "INERT_ZERO_SD_UNIT", "_unit_columns")
    assert calls[False] > 0  # (the fixture has unit chunks with point masses)
    assert calls[True] == (calls[False] if mark == "finite" else 0)
    f32 = LF.POWER_SUMS_F32_RTOL
    rtol = 2.0 * f32 / (1.0 - f32)
    assert out[True][1] == out[False][1]
    assert any(fr > 0 for _, fr, _ in out[True][1])
    for name in est.names:
        for x, y in zip(out[True][0][name], out[False][0][name]):
            if mark == "finite" or name != first:
                assert torch.equal(x.s2, y.s2) and torch.equal(x.s4, y.s4)
            else:
                for u, w in ((x.s2, y.s2), (x.s4, y.s4)):
                    assert torch.allclose(u, w, rtol=rtol, atol=0.0), float(((u - w).abs() / w.abs()).max())


def test_an_interval_end_read_nan_is_no_interval_said_and_not_judged(monkeypatch):
    """rv56s: the correlated form can fail its certificate at a corner of the interval's kappa box
    while the headline holds, giving an interval with a NaN end; compared as "no overlap", the
    verdict called that row clearly different. Now the row has no interval, a warning names the
    scheme, and the report's comparisons treat a NaN end (an older report) as no interval."""
    from mis_lightning import report as R

    real = A._finish_scheme

    def nan_end(est, prep, *a, **k):
        res = real(est, prep, *a, **k)
        if prep.scheme.name == "rtn_int2" and res.interval is not None:
            res.interval = (res.interval[0], math.nan)
            res.layers[next(iter(res.layers))].leakage = math.nan
        return res

    monkeypatch.setattr(A, "_finish_scheme", nan_end)
    model, est = _estimate("stored")
    rep = A.score_schemes(est, model, SCHEMES)
    assert rep.schemes["rtn_int2"].interval is None and math.isfinite(rep.schemes["rtn_int2"].leakage)
    assert rep.schemes["rtn_int4"].interval is not None
    assert any(w.startswith("no 80% interval for rtn_int2:") for w in rep.warnings), rep.warnings
    first = next(iter(rep.schemes["rtn_int2"].layers))
    assert any(w.startswith("per-layer figures not available") and f"rtn_int2: {first}" in w
               for w in rep.warnings), rep.warnings
    a = {"leakage": 0.2, "leakage_p10": 0.1, "leakage_p90": math.nan}
    b = {"leakage": 0.5, "leakage_p10": 0.45, "leakage_p90": 0.55}
    assert R._overlap(a, b) is None and R._overlap(b, a) is None
    assert R.has_interval(b) and not R.has_interval(a) and not R.has_interval({"leakage_p10": "-", "leakage_p90": 1})
    none = {**a, "leakage_p10": None, "leakage_p90": None}
    for c in (b, {"leakage": 0.21, "leakage_p10": 0.15, "leakage_p90": 0.3}):
        assert R._unresolved(a, c) == R._unresolved(none, c) and R._unresolved(c, a) == R._unresolved(c, none)
