"""Weights whose sd dwarfs the window their release bounds them to (``WIDE_SD_CLOSED_FORM``,
``functional/wide.py``, docs/method.md section 5): the closed form ``kappa = 1 - lambda S``,
exact ``mean_abs``, ``m4 = 3``, coverage 1.

References and tolerances:
* the exact partition sums of ``tests/_wide_reference.py`` (Gauss-Legendre per cell, each
  moment as a deficit): ``kappa_cf - kappa_exact`` in ``[-2^-53, bound + 2^-53]`` (the derived
  bound; ``2^-53``: a float64 near 1 is held to that), ``3 - m4_exact`` in ``[0, 6 M^2 S]``,
  ``mean_abs`` within 1e-15 (an exact formula: rounding only);
* the grid paths (switch off) on the same weights: ``kappa`` within the bound + 1e-15 (they are
  exact sums there up to ~1e-15), ``m4`` within its bound + 1e-13;
* the dispatch: gated weights never reach the grid paths (fails without the gate), the others
  are the paths' own (1e-13 relative: the same operations on fewer elements).
"""

import math

import pytest
import torch

import mis_lightning.quantization.base as qb
from mis_lightning.functional import bounds as fbounds
from mis_lightning.functional.wide import (
    WIDE_MAX_WINDOW,
    WIDE_TOL,
    affine_cube_sum,
    table_cube_sum,
    wide_sd_error_bound,
    wide_sd_moments,
)
from mis_lightning.quantization import get_scheme
from tests._wide_reference import exact_deficits, partition_edges

F64 = torch.float64
ULP = 2.0**-53
SQ = math.sqrt(2.0 / math.pi)


def _grid(scheme: str, rows: int = 8, cols: int = 64):
    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    return g, lin.weight.detach().reshape(-1).to(F64)


def _cube(g, lo, hi, scale, zp):
    if g.kind == "affine":
        le, he, step = g._outer_edges(scale, zp)
        return affine_cube_sum(lo, hi, le, he, step)
    return table_cube_sum(lo, hi, scale.to(F64), g.values)


SCHEMES = ["rtn_int4", "int8_weight_only", "intx_weight_only_int4_g32", "intx_weight_only_int4_g32_asym",
           "float8_weight_only"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("ratio", [3e2, 3e3, 3e4, 1e6])
def test_closed_form_within_its_bound_of_the_exact_partition(scheme, ratio, monkeypatch):
    """sd from 300 to 1e6 steps (per-row, per-group, asymmetric and RTN bounds, float8's table):
    every weight the closed form answers is within its derived bound of the exact partition sums,
    on the conservative side for kappa, and within the bound of the grid paths."""
    if _closed_form_checked(scheme, ratio, monkeypatch) is None:
        assert ratio <= 3e3


@pytest.mark.parametrize(("scheme", "ratio"), [("int8_weight_only", 1e3), ("float8_weight_only", 3e3)])
def test_windows_past_a_tenth_of_an_sd_take_it_within_the_bound(scheme, ratio, monkeypatch):
    """p55b: the 1e5 MLP's first-layer regime (int8: sd ~1e3 steps, windows of 0.1-0.5 sd): weights
    whose bounds lie between 0.1 and WIDE_MAX_WINDOW sd apart take the closed form where its bound
    is at most WIDE_TOL, within that bound of the exact partition sums as above (fails with the
    window at its former 0.1: none is taken)."""
    got = _closed_form_checked(scheme, ratio, monkeypatch)
    assert got is not None
    gated, width = got
    assert int((gated & (width > 0.1)).sum()) >= 20


def _closed_form_checked(scheme: str, ratio: float, monkeypatch) -> tuple | None:
    """The closed form on ``scheme``'s grid at sd ``ratio`` steps (lognormal spread 0.3), checked
    against the exact partition sums and the grid paths; ``(gated, window in sd)`` ``[c]``, or
    ``None`` (after checking the moments are the paths' own) where no weight is gated."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    g, theta = _grid(scheme)
    c = theta.numel()
    scale, zp, _, _, bounds = g._chunk_grid(0, c)
    sigma = ratio * scale.to(F64) * torch.exp(0.3 * torch.randn(c, generator=torch.Generator().manual_seed(1),
                                                                dtype=F64))
    # (the closed form alone: float8's series for the windows it leaves, tests/test_table_wide_series.py)
    monkeypatch.setattr(qb, "TABLE_WIDE_SERIES", False)
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", True)
    new = g.moments(theta, sigma, 0, c)
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", False)
    old = g.moments(theta, sigma, 0, c)
    lo, hi = bounds[0].to(F64), bounds[1].to(F64)
    _, _, bound = wide_sd_error_bound(sigma, lo, hi, theta, _cube(g, lo, hi, scale, zp))
    gated = (hi - lo <= WIDE_MAX_WINDOW * sigma) & (theta > lo) & (theta < hi) & (bound <= WIDE_TOL)
    if not bool(gated.any()):  # bounds too far apart (or the bound above WIDE_TOL): the paths alone
        for f in ("kappa", "mean_abs", "m4", "coverage"):
            assert torch.equal(getattr(new, f), getattr(old, f))
        return None
    m4_bound = 6.0 * (torch.maximum(theta - lo, hi - theta) / sigma) ** 2 * _cube(g, lo, hi, scale, zp) \
        / (12.0 * sigma**3) / math.sqrt(2 * math.pi)
    for i in torch.nonzero(gated).squeeze(-1)[::7].tolist():
        dk, dm, d4 = exact_deficits(float(theta[i]), float(sigma[i]),
                                    partition_edges(g, i, float(lo[i]), float(hi[i]), float(scale[i]), float(zp[i])))
        b = float(bound[i])
        err_k = dk - (1.0 - float(new.kappa[i]))  # kappa_cf - kappa_exact
        assert -ULP <= err_k <= b + ULP, (i, err_k, b)
        assert 0.0 <= d4 <= float(m4_bound[i]) * (1 + 1e-12) + 1e-300, (i, d4, float(m4_bound[i]))
        assert float(new.m4[i]) == 3.0 and float(new.coverage[i]) == 1.0
        assert abs((SQ - float(new.mean_abs[i])) - dm) <= 1e-15, (i, dm)
    kb = bound[gated] + 1e-15
    assert bool(((new.kappa - old.kappa)[gated].abs() <= kb).all())
    assert bool(((new.m4 - old.m4)[gated].abs() <= m4_bound[gated] + 1e-13).all())
    # the others: the paths' own
    for f in ("kappa", "mean_abs", "m4", "coverage"):
        torch.testing.assert_close(getattr(new, f)[~gated], getattr(old, f)[~gated], rtol=1e-13, atol=0.0)
    return gated, (hi - lo) / sigma


@pytest.mark.parametrize("w", [1e-3, 1e-2, 0.1, 0.5, 1.0])
def test_bound_holds_on_a_uniform_grid_at_every_position(w):
    """The functional form alone, on a uniform grid of 4 to 64 cells between bounds ``w`` sd
    apart, the weight at 41 positions across the window and the bounds off the grid's edges (cut
    cells): the bound holds at any window width (the gate stops at WIDE_MAX_WINDOW sd for its
    size, not its validity)."""
    for cells in (4, 17, 64):
        sigma = 1.0
        step = w / cells
        lower, upper = -0.37 * step, (cells - 0.37) * step + 0.21 * step  # cut cells at both ends
        theta = torch.linspace(lower, upper, 43, dtype=F64)[1:-1]
        n = theta.numel()
        lo, hi = torch.full((n,), lower, dtype=F64), torch.full((n,), upper, dtype=F64)
        s = torch.full((n,), step, dtype=F64)
        le, he = torch.zeros(n, dtype=F64), torch.full((n,), (cells - 1) * step, dtype=F64)  # edges k * step
        cube = affine_cube_sum(lo, hi, le - 0.0 * s, he, s)
        sg = torch.full((n,), sigma, dtype=F64)
        own_lo = torch.floor(theta / step) * step
        own_hi = own_lo + step
        own_lo = torch.where(own_lo < 0, -math.inf, own_lo)
        own_hi = torch.where(own_hi > (cells - 1) * step, math.inf, own_hi)
        mm, _ = wide_sd_moments(theta, sg, lo, hi, cube, own_lo, own_hi)
        S, lam, bound = wide_sd_error_bound(sg, lo, hi, theta, cube)
        edges = torch.cat([torch.tensor([lower], dtype=F64), torch.arange(cells, dtype=F64) * step,
                           torch.tensor([upper], dtype=F64)])
        edges = edges[(edges >= lower) & (edges <= upper)].unique()
        for i in range(n):
            dk, dm, d4 = exact_deficits(float(theta[i]), sigma, edges)
            err_k = dk - (1.0 - float(mm.kappa[i]))
            assert -ULP <= err_k <= float((1 - lam[i]) * S[i]) + ULP, (w, cells, i, err_k)
            m = max(float(theta[i]) - lower, upper - float(theta[i]))
            assert 0.0 <= d4 <= 6 * m * m * float(S[i]) * (1 + 1e-12), (w, cells, i)
            assert abs((SQ - float(mm.mean_abs[i])) - dm) <= 1e-15
            # the Sheppard term: C3 holds the cut cells exactly (n whole cells of step^3 + the two cut ones)
        assert float(cube[0]) == pytest.approx((cells - 1) * step**3 + (0.37 * step) ** 3 + (0.84 * step) ** 3,
                                               rel=1e-12)


def test_table_cube_sum_is_the_clipped_cells():
    """``table_cube_sum`` against a direct sum over float8 e4m3's cells clipped to bounds inside
    cells, on edges and off the table's range."""
    allv = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(F64)
    v = allv[torch.isfinite(allv)].unique()
    mids = 0.5 * (v[1:] + v[:-1])
    for lo, hi in ((-448.0, 448.0), (-430.0, 447.0), (-0.3, 0.9), (float(mids[100]), float(mids[140])), (3.1, 3.2)):
        e = mids[(mids > lo) & (mids < hi)]
        e = torch.cat([torch.tensor([lo], dtype=F64), e, torch.tensor([hi], dtype=F64)])
        ref = float(((e[1:] - e[:-1]) ** 3).sum()) * 2.0**3
        got = float(table_cube_sum(torch.tensor([lo * 2.0], dtype=F64), torch.tensor([hi * 2.0], dtype=F64),
                                   torch.tensor([2.0], dtype=F64), v)[0])
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-300)


def test_the_gate_dispatches_and_only_where_it_holds(monkeypatch):
    """One chunk mixing gated weights with weights whose bounds are too far apart (sd small), a
    bound error above the tolerance, sd 0 and a weight on its bound (a block's absmax): the gated
    ones never reach the grid paths (fails without the gate: every element went there), the
    others are the paths' own; kappa_only gives the same kappa; a draw outside its bounds
    (``use_codes=False``) takes the paths."""
    g, theta = _grid("rtn_int4", rows=8, cols=64)
    c = theta.numel()
    scale, zp, _, _, bounds = g._chunk_grid(0, c)
    sigma = 1e4 * scale.to(F64)
    sigma[::5] = 3.0 * scale[::5].to(F64)  # bounds ~15 sd apart: no
    sigma[1::11] = 0.0  # sd 0: no
    sigma[2::13] = 20.0 * scale[2::13].to(F64)  # W ~0.75 > WIDE_MAX_WINDOW (0.5): no
    seen: list[int] = []
    kernel = qb.affine_cell_moments  # the affine grid path's kernel: which weights reach it

    def spy(th, *a, **k):
        seen.append(th.shape[0])
        return kernel(th, *a, **k)

    monkeypatch.setattr(qb, "affine_cell_moments", spy)
    # (the grid paths as such: the fine steps' one-pass bounded form would take most of the
    # ungated weights before the kernel; tests/test_fine_moments.py)
    monkeypatch.setattr(fbounds, "FUSED_FINE_MOMENTS", False)
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", True)
    new = g.moments(theta, sigma, 0, c)
    n_new = sum(seen)
    new_k = g.moments(theta, sigma, 0, c, kappa_only=True)
    seen.clear()
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", False)
    old = g.moments(theta, sigma, 0, c)
    n_old = sum(seen)
    assert n_old == c
    lo, hi = bounds[0].to(F64), bounds[1].to(F64)
    on_bound = (theta <= lo) | (theta >= hi)
    assert bool(on_bound.any())
    gated = (hi - lo <= WIDE_MAX_WINDOW * sigma) & ~on_bound
    rev = g.revealed.reshape(-1)[:c]  # (given their moments after the paths: REVEALED_SKIPPED, cm36)
    assert bool(rev.any()) and not bool((gated & rev).any())
    assert n_new == c - int((gated | rev).sum())  # the gated and revealed weights skip the paths, nothing else does
    assert bool((new.m4[gated] == 3.0).all())
    for f in ("kappa", "mean_abs", "m4", "coverage"):
        torch.testing.assert_close(getattr(new, f)[~gated], getattr(old, f)[~gated], rtol=1e-13, atol=0.0)
    torch.testing.assert_close(new_k.kappa, new.kappa, rtol=0.0, atol=0.0)
    # draws: a weight pushed beyond its bound takes the paths, the rest the closed form
    seen.clear()
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", True)
    draw = theta.clone()
    draw[3] = float(hi[3]) + 0.1 * float(scale[3])
    got = g.moments(draw, sigma, 0, c, use_codes=False)
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", False)
    ref = g.moments(draw, sigma, 0, c, use_codes=False)
    assert abs(float(got.kappa[3]) - float(ref.kappa[3])) <= 1e-13
    # element 4 (inside its bounds): within its own derived bound (not WIDE_TOL, a gate) plus the
    # paths' 1e-13 above
    _, _, b4 = wide_sd_error_bound(sigma[4:5], lo[4:5], hi[4:5], draw[4:5].to(F64), _cube(g, lo, hi, scale, zp)[4:5])
    assert abs(float(got.kappa[4]) - float(ref.kappa[4])) <= float(b4[0]) + 1e-13


def test_unbounded_and_large_tables_never_take_it(monkeypatch):
    """No bounds (a plain bf16 cast) or a 16-bit table: the switch changes nothing, bit for bit."""
    g, theta = _grid("bf16")
    c = theta.numel()
    sigma = torch.full((c,), 1e3, dtype=F64)
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", True)
    new = g.moments(theta, sigma, 0, c)
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", False)
    old = g.moments(theta, sigma, 0, c)
    for f in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(new, f), getattr(old, f))


@pytest.mark.parametrize("scheme", ["rtn_int4", "int8_weight_only", "intx_weight_only_int4_g32_asym"])
def test_draws_keep_kappa_where_it_cannot_leave_one_minus_S(scheme):
    """The bootstrap draws' shortcut (``ParamGrid.wide_position_free``, ``assess._position_free``):
    at every position of the weight, inside its bounds or beyond them (the draws' ``theta + sigma
    xi``), the exact deficit ``1 - kappa`` (tests/_wide_reference.py's partition sums) lies in
    ``[0, S]``, ``S = phi(0) C3 / (12 sigma^3)`` (``wide_deficit_bound``), so kappa moves by at most
    ``S <= POSITION_FREE_WIDE_TOL`` between theta-hat and any draw; the mask is exactly the weights
    with a window at most ``WIDE_MAX_WINDOW`` sd wide and ``S`` at most the tolerance (fails
    without the shortcut: no mask; tolerance: the reference's ~1e-15 relative)."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    from mis_lightning.assess import POSITION_FREE_WIDE_TOL
    from mis_lightning.functional.wide import wide_deficit_bound

    g, theta = _grid(scheme)
    c = theta.numel()
    scale, zp, _, _, bounds = g._chunk_grid(0, c)
    lo, hi = bounds[0].to(F64), bounds[1].to(F64)
    gen = torch.Generator().manual_seed(2)
    sigma = 10.0 ** (1.0 + 4.0 * torch.rand(c, generator=gen, dtype=F64)) * scale.to(F64)  # 10 to 1e5 steps
    free = g.wide_position_free(sigma, scale.to(F64), zp.to(F64), (lo, hi), POSITION_FREE_WIDE_TOL)
    S = wide_deficit_bound(sigma, _cube(g, lo, hi, scale, zp))
    want = (hi - lo <= WIDE_MAX_WINDOW * sigma) & (S <= POSITION_FREE_WIDE_TOL)
    assert torch.equal(free, want) and 0 < int(free.sum()) < c
    for i in torch.nonzero(free).squeeze(-1)[::9].tolist():
        edges = partition_edges(g, i, float(lo[i]), float(hi[i]), float(scale[i]), float(zp[i]))
        for xi in (-3.0, -0.7, 0.0, 0.4, 2.5):  # the draw's position, in sd units from theta-hat
            dk, _, _ = exact_deficits(float(theta[i]) + xi * float(sigma[i]), float(sigma[i]), edges)
            assert 0.0 <= dk <= float(S[i]) * (1 + 1e-12), (i, xi, dk, float(S[i]))


@pytest.mark.parametrize("scheme", ["rtn_int4", "int8_weight_only", "intx_weight_only_int4_g32_asym",
                                    "float8_weight_only"])
def test_whole_block_facts_give_the_per_chunk_facts_bitwise(scheme, monkeypatch):
    """``qb.WHOLE_BLOCK_FACTS`` (p49b): a chunk's per-block facts read off the whole parameter's
    (kept on the grid) equal the per-chunk computation bitwise: ``chunk_deficit_bound`` and
    ``chunk_wide_deficit`` (C3 per block, lam, err, S_max) on whole rows, partial rows and the whole
    weight; a grid with a dead block (scale 0) falls back to the per-chunk facts (``inf`` on the
    chunks that touch it, the same figures elsewhere)."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)  # (each call computes its facts)
    g, theta = _grid(scheme)
    c = theta.numel()
    scale, zp, _, _, bounds = g._chunk_grid(0, c)
    sd = 10.0 * float((bounds[1].to(F64) - bounds[0].to(F64)).max())
    tmax = float(theta.abs().max())
    ranges = [(0, 128), (128, 512), (37, 300), (0, c), (448, 512)]

    def facts(grid, whole):
        monkeypatch.setattr(qb, "WHOLE_BLOCK_FACTS", whole)
        return [(grid.chunk_deficit_bound(a, b, sd, tmax), grid.chunk_wide_deficit(a, b, (2 * sd, 3 * sd), tmax))
                for a, b in ranges]

    def same(x, y):
        for (bx, wx), (by, wy) in zip(x, y):
            assert bx == by and (wx is None) == (wy is None)
            if wx is not None:
                assert torch.equal(wx[0], wy[0]) and wx[1:] == wy[1:]

    old = facts(g, False)
    assert "_whole_block_fact" not in g.__dict__
    new = facts(g, True)
    assert g.__dict__["_whole_block_fact"][1] is not None  # (the whole facts were read)
    assert all(math.isfinite(b) for b, _ in new) and all(w is not None for _, w in new)
    same(new, old)
    g.scale = g.scale.clone()
    g.scale.view(-1)[g.scale.numel() // 2] = 0.0  # a dead block in row 4 (elements 256:320)
    dead = facts(g, True)
    assert g.__dict__["_whole_block_fact"][1] is None
    same(dead, facts(g, False))
    assert [math.isinf(b) for b, _ in dead] == [False, True, True, True, False]


@pytest.mark.parametrize("scheme", ["rtn_int4", "intx_weight_only_int4_g32_asym", "float8_weight_only"])
def test_chunk_deficit_bound_holds_at_every_position(scheme):
    """``ParamGrid.chunk_deficit_bound`` (the joint pass's unit-kappa chunks, ``assess.UNIT_KAPPA``)
    from the blocks' values alone: at one sd for the whole chunk (10 bounded windows: the bound is then
    within ~M^2 / 2 < 1% of the largest block's exact deficit, so a bound 10% too small fails) the
    exact ``1 - kappa`` (tests/_wide_reference.py's partition sums) of weights at theta-hat and at
    draws up to 3 sd away, and ``3 - m4`` at theta-hat, are at most the bound (1e-12 relative: the reference's
    rounding); a smaller least sd only raises it, sd 0 or a NaN weight give ``inf``, as does a grid
    of 16-bit floats (no finite bounded cells: bf16)."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    g, theta = _grid(scheme)
    c = theta.numel()
    scale, zp, _, _, bounds = g._chunk_grid(0, c)
    lo, hi = bounds[0].to(F64), bounds[1].to(F64)
    sd = 10.0 * float((hi - lo).max())  # (M <= 0.1: lambda > 0.99)
    tmax = float(theta.abs().max())
    bound = g.chunk_deficit_bound(0, c, sd, tmax)
    assert 0.0 < bound < 1e-3
    cube = _cube(g, lo, hi, scale, zp)
    worst = int(cube.argmax())
    edges_w = partition_edges(g, worst, float(lo[worst]), float(hi[worst]), float(scale[worst]), float(zp[worst]))
    dk_w, _, _ = exact_deficits(float(theta[worst]), sd, edges_w)
    assert dk_w > 0.9 * bound / max(1.0, 6.0 * ((tmax + float(torch.maximum(lo.abs(), hi.abs()).max())) / sd) ** 2)
    for i in list(range(0, c, 37)) + [worst]:
        edges = partition_edges(g, i, float(lo[i]), float(hi[i]), float(scale[i]), float(zp[i]))
        for xi in (-3.0, -0.4, 0.0, 1.1):
            dk, _, d4 = exact_deficits(float(theta[i]) + xi * sd, sd, edges)
            assert 0.0 <= dk <= bound * (1 + 1e-12), (i, xi, dk, bound)
            assert xi != 0.0 or 0.0 <= d4 <= bound * (1 + 1e-12), (i, d4, bound)  # (m4: at theta-hat)
    assert g.chunk_deficit_bound(0, c, sd / 2, tmax) > bound
    assert g.chunk_deficit_bound(0, c, 0.0, tmax) == math.inf
    assert g.chunk_deficit_bound(0, c, sd, math.nan) == math.inf
    bf = get_scheme("bf16").apply(torch.nn.Sequential(torch.nn.Linear(64, 8))).grids["0.weight"]
    assert bf.chunk_deficit_bound(0, 512, sd, tmax) == math.inf
