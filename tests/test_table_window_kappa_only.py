"""``kappa_only`` through the value tables' windowed path (tb37): the closed-form runs
(:func:`~mis_lightning.functional.runs.run_moments`) and the closed-form core
(``table._core_side_kernel``) skip their ``m4`` sums in kappa-only calls (the draws, the pool
protocol), ``kappa`` bitwise the full call's; ``run_moments`` forms each edge's powers of ``u``
once and only those its edge polynomials read, bitwise the previous form (kept here)."""

from __future__ import annotations

import math

import torch

from mis_lightning.functional import runs as R
from mis_lightning.functional import table as T
from mis_lightning.functional.cells import _pdf, column_sums
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64


def _run_moments_before(u: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``run_moments`` as it was before tb37 (every power of ``u`` up to 15 at both edges of
    each run apart, each ``h`` polynomial twice): the reference for the bitwise test."""
    u = u.clamp(-R._FAR, R._FAR)
    pdf = _pdf(u)
    q = torch.special.ndtr(-u.abs())
    a, b = u[:-1], u[1:]
    qa, qb, pa, pb = q[:-1], q[1:], pdf[:-1], pdf[1:]
    m0 = torch.where(a > 0, qa - qb, torch.where(b <= 0, qb - qa, 1.0 - qa - qb)).clamp_min(0.0)
    a2, b2 = a * a, b * b
    ea, eb = a * pa, b * pb
    m = [m0]
    for k in (1, 2, 3, 4):
        m.append((2 * k - 1) * m[-1] - (eb - ea))
        ea, eb = ea * a2, eb * b2
    hp = [torch.ones_like(step), step]
    for _ in range(2, R._H_ORDER + 1):
        hp.append(hp[-1] * step)
    mom = [m[0], None, m[1], None, m[2], None, m[3], None, m[4]]
    s2 = sum(mom[i] * sum(hp[j] * v for j, v in hs) for i, hs in R._IN2)
    s4 = sum(mom[i] * sum(hp[j] * v for j, v in hs) for i, hs in R._IN4)
    up_a, up_b = [torch.ones_like(a), a], [torch.ones_like(b), b]
    for _ in range(2, R._U_POWERS):
        up_a.append(up_a[-1] * a)
        up_b.append(up_b[-1] * b)
    s2 = s2 + pb * R._eval(R._BD2, up_b, hp) - pa * R._eval(R._BD2, up_a, hp)
    s4 = s4 + pb * R._eval(R._BD4, up_b, hp) - pa * R._eval(R._BD4, up_a, hp)
    # (the sums over the runs as run_moments takes them: cells.column_sums, fx49)
    return column_sums(m[1] - s2), column_sums(m[2] - s4), column_sums(m0)


def test_run_moments_bitwise_the_previous_form():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        runs, c = int(torch.randint(1, 130, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
        spread = float(torch.rand(1, generator=g)) * 20.0 + 0.1
        u = torch.sort(torch.randn(runs + 1, c, dtype=F64, generator=g) * spread, dim=0).values
        h = torch.rand(runs, c, dtype=F64, generator=g) * R.RUN_MAX_STEP
        before = _run_moments_before(u, h)
        now = R.run_moments(u, h)
        for x, y in zip(before, now):
            assert torch.equal(x, y)
        k2, k4, p = R.run_moments(u, h, kappa_only=True)
        assert k4 is None and torch.equal(k2, before[0]) and torch.equal(p, before[2])


def _wide_fp16(c: int, seed: int) -> tuple[torch.Tensor, ...]:
    """fp16 weights whose sd spans the table (1e3 to 1e8, positions to 3e8): the draws of the 1e7
    MLP's first layer, which take the closed-form core and the wide runs."""
    vals = representable_values(torch.float16)
    g = torch.Generator().manual_seed(seed)
    sg = torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1e3), math.log(1e8), generator=g))
    th = torch.randn(c, dtype=F64, generator=g) * sg * 2.0
    return vals, th, sg, torch.ones(c, dtype=F64)


def test_kappa_only_skips_the_window_paths_m4():
    vals, th, sg, sc = _wide_fp16(4000, 3)
    seen = {"runs": 0, "core": 0}
    real_runs, real_core = R.run_moments, T._core_side_kernel

    def runs_spy(u, step, kappa_only=False):
        seen["runs"] += 1
        return real_runs(u, step, kappa_only)

    def core_spy(*a, **kw):
        seen["core"] += 1
        return real_core(*a, **kw)

    T.run_moments, T._core_side_kernel = runs_spy, core_spy
    try:
        full = T.table_cell_moments(th, sg, vals, sc)
        ko = T.table_cell_moments(th, sg, vals, sc, kappa_only=True)
    finally:
        T.run_moments, T._core_side_kernel = real_runs, real_core
    assert seen["runs"] > 0 and seen["core"] > 0  # both closed forms served these elements
    assert torch.equal(ko.kappa, full.kappa)
    assert bool(torch.isfinite(full.m4).all())
    # every element here takes a closed form (runs or core) or settles: none has an m4 formed
    assert bool(torch.isnan(ko.m4).all())


def test_check_strata_read_the_layouts_own_cells(monkeypatch):
    """The self-check's strata (``table_cell_moments``' ``steps``) take the own cells' edges from
    the layout's bit guide (``_own_facts``), not ``table_boundaries``' binary search: the same
    edges, every regime (zeros of both signs, infinities, values, edges, far beyond the table)."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        vals = representable_values(dtype)
        layout = T.table_layout(vals, torch.device("cpu"))
        c = 20000
        sc = torch.ones(c, dtype=F64) if dtype != torch.float8_e4m3fn else \
            torch.exp(torch.empty(c, dtype=F64).uniform_(-8, -2, generator=g))
        th = torch.randn(c, generator=g, dtype=F64) * sc * torch.exp(torch.empty(c, dtype=F64).uniform_(-20, 12, generator=g))
        th[::11], th[::13], th[::17], th[::19] = 0.0, -0.0, math.inf, -math.inf
        th[::23] = float(vals.max()) * sc[::23]
        th[::29] = float(layout.mids[5]) * sc[::29]
        own = T.table_boundaries(th, vals, sc, 1)[:, 1:3]
        lo, hi = T._own_facts(th, sc, layout)
        assert torch.equal(own[:, 0], lo) and torch.equal(own[:, 1], hi)
    # and the check no longer calls table_boundaries (a first call per thread count is checked)
    calls = []
    real = T.table_boundaries
    monkeypatch.setattr(T, "table_boundaries", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    T.GUARD.reset()  # every path unchecked: the next call checks
    vals, th, sg, sc = _wide_fp16(3000, 5)
    checked = []
    real_verify = T.verify_sample

    def spy(path, n, out, steps, *a, **kw):
        checked.append(steps()[0])  # the strata alone (the reference's windows still read it)
        checked.append(len(calls))
        return real_verify(path, n, out, steps, *a, **kw)

    monkeypatch.setattr(T, "verify_sample", spy)
    T.table_cell_moments(th, sg, vals, sc)
    assert len(checked) == 2 and checked[1] == 0


def test_small_16bit_chunks_draw_in_one_table_call(monkeypatch):
    """A 16-bit cast's chunk too small to subsample, whose 8 draw positions make at least
    ``INTERP_MIN_ELEMENTS`` pairs (the 1e7 MLP's 4,096-weight biases and last layer), is scored in
    one table call (``assess.DRAWS_AT_ONCE_ELEMENTWISE``), the draws of one call per
    position up to the rounding of the exact windows' row sums (the 16-bit tables' moments never
    read the call's other elements; the reduction's order may depend on the call's size)."""
    import importlib

    from mis_lightning.functional.fastpath import GUARD
    from mis_lightning.quantization.base import ParamGrid

    A = importlib.import_module("mis_lightning.assess")
    import mis_lightning.quantization.base as base

    vals = representable_values(torch.float16)
    rows, cols = 1, 4096
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=16.0, scale=torch.ones(rows, 1, dtype=F64), block_size=(1, cols), values=vals)
    gen = torch.Generator().manual_seed(7)
    c = rows * cols
    th = torch.randn(c, generator=gen, dtype=F64) * 0.05
    sg = th.abs() * torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1e-4), math.log(1e6), generator=gen))
    sg[::9] = 0.0
    k_main = g.moments(th, sg, 0, c).kappa
    xi = torch.randn(8, c, generator=gen, dtype=F64)
    assert 8 * c >= T.INTERP_MIN_ELEMENTS
    calls = []
    real = base.table_cell_moments
    monkeypatch.setattr(base, "table_cell_moments", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    GUARD.reset()
    once, _ = A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None)
    n_once = len(calls)
    monkeypatch.setattr(A, "DRAWS_AT_ONCE_ELEMENTWISE", False)
    GUARD.reset()
    apart, _ = A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None)
    assert n_once == 1 and len(calls) - n_once == 8
    # the same paths; the exact windows' sums over rows may round differently in a call of
    # another size (the reduction's vector width): 1 ulp of kappa <= 1 measured on an AVX2
    # machine, 2 ulp (4.4e-16) on an AVX-512 one (session 48), nowhere in the 1e7 report (759
    # fields, 0 differ); a reassociated sum of a window's few non-negative terms stays within
    # a few ulp of 1, so 8 ulp (1.8e-15) still fails on any wrong path (kappa moves by > 1e-3)
    assert float((once - apart).abs().max()) <= 8 * torch.finfo(F64).eps
    assert float((once != k_main).double().mean()) > 0.3  # the draws move kappa
