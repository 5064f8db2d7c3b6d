"""The wide-sd closed form's per-element work in fewer operations (wd38), bitwise:

* ``WIDE_PARTS_IN_PLACE`` (functional/wide.py): ``wide_sd_parts`` and ``own_cell_mean_abs`` on
  their own temporaries, and ``ok``'s bound as ``6 M^2 S`` alone. Inside the window
  (``W <= WIDE_MAX_WINDOW = 0.5``, so ``M <= W``) ``(1 - lambda) S <= 0.524 M^2 S`` plus the
  rounding of ``1 - lambda`` (a few 1e-16 times ``S <= phi(0) W^3 / 12``): whenever
  ``6 M^2 S <= WIDE_TOL`` the other bound is below it too, so ``max(...) <= WIDE_TOL`` is the same
  mask. Reference: the switch off (the old operations, through ``wide_sd_error_bound``), every
  field bitwise, on sweeps that put ``6 M^2 S`` on both sides of ``WIDE_TOL`` by an ulp, weights
  an ulp inside their bounds, windows an ulp either side of ``WIDE_MAX_WINDOW`` sd, ``M`` near 0 (where
  ``1 - lambda`` is rounding alone), sd 0 / inf / NaN and NaN bounds.
* ``WIDE_CUBE_BLOCKS`` (quantization/base.py): a chunk's ``C3`` from the grid's per-block values,
  expanded: bitwise the per-element ``affine_cube_sum`` / ``table_cube_sum``, on per-row, per-group,
  asymmetric, float8 and dead-block grids, over ranges that start and end inside rows.
"""

import math

import pytest
import torch

import mis_lightning.functional.wide as W
import mis_lightning.quantization.base as qb
from mis_lightning.functional.masks import any_along, any_set
from mis_lightning.functional.wide import (
    WIDE_MAX_WINDOW,
    WIDE_TOL,
    affine_cube_sum,
    table_cube_sum,
    wide_sd_parts,
)
from mis_lightning.quantization import get_scheme

F64 = torch.float64
PHI0 = 1.0 / math.sqrt(2.0 * math.pi)


def _bits(t):
    return t.contiguous().view(torch.int64) if t.dtype == F64 else t


def _same(a, b):
    """Bitwise equal, but for NaN's sign and payload (NaN at the same places: an element whose
    inputs are NaN, never read: ``ok`` is False there)."""
    if a.shape != b.shape:
        return False
    if a.dtype == F64:
        na, nb = torch.isnan(a), torch.isnan(b)
        return torch.equal(na, nb) and torch.equal(_bits(a)[~na], _bits(b)[~nb])
    return torch.equal(a, b)


def _sweep():
    """Weights, sd, bounds and C3 (a uniform grid's cells clipped to the bounds) around the edges
    of the window and of the error bound."""
    g = torch.Generator().manual_seed(3)
    n = 4000
    lo = -torch.rand(n, generator=g, dtype=F64) - 0.5
    hi = torch.rand(n, generator=g, dtype=F64) + 0.5
    width = hi - lo
    u = torch.rand(n, generator=g, dtype=F64)
    th = lo + u * width
    # M near 0: theta at the window's centre (1 - lambda is rounding alone there)
    th[:200] = 0.5 * (lo[:200] + hi[:200])
    # an ulp inside either bound, and on them
    th[200:300] = torch.nextafter(lo[200:300], hi[200:300])
    th[300:400] = torch.nextafter(hi[300:400], lo[300:400])
    th[400:450] = lo[400:450]
    # sd from the window's edge (W = 0.1 sd, an ulp either side) to 1e4 windows
    ratio = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(1.0 / WIDE_MAX_WINDOW), math.log(1e5), generator=g))
    sg = width * ratio
    edge = width / WIDE_MAX_WINDOW
    sg[450:500] = edge[450:500]
    sg[500:550] = torch.nextafter(edge[500:550], torch.zeros(50, dtype=F64))
    sg[550:600] = torch.nextafter(edge[550:600], torch.full((50,), math.inf, dtype=F64))
    step = width / torch.randint(1, 40, (n,), generator=g).to(F64)
    cube = affine_cube_sum(lo, hi, lo + step * 0.37, hi - step * 0.61, step)
    # 6 M^2 S on both sides of WIDE_TOL by an ulp: solve for sigma on a part of the sweep
    m = torch.maximum(th - lo, hi - th)
    k = slice(600, 1400)
    # 6 M^2 S = 6 m^2 / sg^2 * phi0 cube / (12 sg^3)  ->  sg^5 = 6 m^2 phi0 cube / (12 TOL)
    target = (6.0 * m[k] ** 2 * PHI0 * cube[k] / (12.0 * WIDE_TOL)) ** 0.2
    jitter = torch.tensor([1.0 - 2e-16, 1.0, 1.0 + 2e-16, 1.0 - 1e-9, 1.0 + 1e-9], dtype=F64).repeat(160)
    sg[k] = torch.maximum(target * jitter, edge[k] * 1.0001)
    # the revealed-side bound alone passing (1 - lambda) S <= TOL < 6 M^2 S: M^2 S in (TOL / 6, TOL / 0.6)
    k2 = slice(1400, 1800)
    target2 = (2.0 * m[k2] ** 2 * PHI0 * cube[k2] / (12.0 * WIDE_TOL)) ** 0.2
    sg[k2] = torch.maximum(target2, edge[k2] * 1.0001)
    sg[1800] = 0.0
    sg[1801] = math.inf
    sg[1802] = math.nan
    lo[1803] = math.nan
    hi[1804] = math.inf
    return th, sg, lo, hi, cube, step


def _own(th, lo, hi, step):
    # a uniform grid's own cell around theta (edges at lo + 0.37 step + k step), the outer cells open
    first = lo + 0.37 * step
    k = torch.floor((th - first) / step)
    own_lo = torch.where(k >= 0, first + k * step, -math.inf)
    own_hi = torch.where(first + (k + 1) * step < hi - 0.61 * step + 0.5 * step, first + (k + 1) * step, math.inf)
    return own_lo, own_hi


@pytest.mark.parametrize("given_window", [False, True])
@pytest.mark.parametrize("with_mean_abs", [False, True])
def test_parts_in_place_bitwise(monkeypatch, given_window, with_mean_abs):
    th, sg, lo, hi, cube, step = _sweep()
    own_lo, own_hi = _own(th, lo, hi, step) if with_mean_abs else (None, None)
    window = ((hi - lo <= WIDE_MAX_WINDOW * sg) & (th > lo) & (th < hi)) if given_window else None
    monkeypatch.setattr(W, "WIDE_PARTS_IN_PLACE", False)
    old = wide_sd_parts(th, sg, lo, hi, cube, own_lo, own_hi, window)
    monkeypatch.setattr(W, "WIDE_PARTS_IN_PLACE", True)
    args = [t.clone() for t in (th, sg, lo, hi, cube)]
    fresh = (None, None) if own_lo is None else (own_lo.clone(), own_hi.clone())
    new = wide_sd_parts(*args, *fresh, window, own_fresh=True)
    # the inputs other than the caller's own temporaries are untouched
    for a, b in zip(args, (th, sg, lo, hi, cube)):
        assert _same(a, b)
    assert _same(old[0], new[0]) and _same(old[2], new[2])
    assert (old[1] is None) == (new[1] is None)
    if old[1] is not None:
        assert _same(old[1], new[1])
    # the sweep reaches what it is meant to: both outcomes at the bound's edge, the window's edge
    ok = new[2]
    assert bool(ok[600:1400].any()) and not bool(ok[600:1400].all())
    # sd 0 / NaN, NaN and infinite bounds fail (an infinite sd passes, kappa 1: the old form's too)
    assert not bool(ok[[1800, 1802, 1803, 1804]].any())


def test_the_cut_keeps_the_mask_only_inside_the_window():
    """Inside the window the larger bound is 6 M^2 S (so the cut is the same mask); on the sweep's
    elements where (1 - lambda) S <= WIDE_TOL < 6 M^2 S the mask is False (a cut to the other bound
    would pass them); outside the window (W = 3-5 sd) (1 - lambda) S exceeds 6 M^2 S, so the cut
    holds only with the window's test."""
    th, sg, lo, hi, cube, _ = _sweep()
    S, lam, _ = W.wide_sd_error_bound(sg, lo, hi, th, cube)
    m2 = (torch.maximum(th - lo, hi - th) / sg) ** 2
    a, b = (1.0 - lam) * S, 6.0 * m2 * S
    window = (hi - lo <= WIDE_MAX_WINDOW * sg) & (th > lo) & (th < hi)
    fin = window & torch.isfinite(a) & torch.isfinite(b)
    assert bool((a[fin] <= b[fin]).all())
    between = fin & (a <= WIDE_TOL) & (b > WIDE_TOL)
    assert int(between.sum()) > 50
    _, _, ok = wide_sd_parts(th, sg, lo, hi, cube, None, None)
    assert not bool(ok[between].any())
    # outside the window
    sg_wide = (hi - lo) / 4.0
    S2, lam2, _ = W.wide_sd_error_bound(sg_wide, lo, hi, th, cube)
    m2w = (torch.maximum(th - lo, hi - th) / sg_wide) ** 2
    inside = (th > lo) & (th < hi) & torch.isfinite(S2)
    assert bool(((1.0 - lam2) * S2 > 6.0 * m2w * S2)[inside].any())


SCHEMES = ["rtn_int4", "int8_weight_only", "intx_weight_only_int4_g32", "intx_weight_only_int4_g32_asym",
           "float8_weight_only"]


def _grid(scheme, rows=12, cols=96, dead_row=False):
    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        if dead_row:
            lin.weight[5].zero_()
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    return g, lin.weight.detach().reshape(-1).to(F64)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dead_row", [False, True])
def test_chunk_cube_by_blocks_is_the_per_element_sum(scheme, dead_row):
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    g, _ = _grid(scheme, dead_row=dead_row)
    n = g.numel
    for a, b in [(0, n), (96, 5 * 96), (40, 700), (97, 98), (n - 33, n)]:
        qb.release_chunk_facts()
        scale, zp, _, _, bounds = g._chunk_grid(a, b)
        got = g._chunk_cube(scale, zp, bounds)
        assert got is not None, (a, b)
        if g.kind == "affine":
            le, he, step = g._outer_edges(scale, zp)
            ref = affine_cube_sum(bounds[0], bounds[1], le, he, step)
        else:
            ref = table_cube_sum(bounds[0], bounds[1], scale, g.values)
        assert _same(got, ref), (scheme, a, b)
        # other tensors (a copy: the range unknown) take the per-element sum
        assert g._chunk_cube(scale.clone(), zp, bounds) is None
    qb.release_chunk_facts()


@pytest.mark.parametrize("scheme", ["int8_weight_only", "intx_weight_only_int4_g32_asym", "float8_weight_only"])
def test_moments_bitwise_with_the_block_cube(scheme, monkeypatch):
    """The closed form's moments (main call, then the pool call reading the kept C3) are bitwise
    the same with both switches off; the closed form does answer most weights here."""
    pytest.importorskip("torchao")
    g, theta = _grid(scheme)
    n = g.numel
    scale = g._chunk_grid(0, n)[0]
    sigma = 1e5 * scale.to(F64) * torch.exp(0.3 * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=F64))
    out = {}
    used = []
    real = qb.ParamGrid._chunk_cube

    def spy(self, *a):
        got = real(self, *a)
        used.append(got is not None)
        return got

    monkeypatch.setattr(qb.ParamGrid, "_chunk_cube", spy)
    for on in (True, False):
        monkeypatch.setattr(qb, "WIDE_CUBE_BLOCKS", on)
        monkeypatch.setattr(W, "WIDE_PARTS_IN_PLACE", on)
        qb.release_chunk_facts()
        main = g.moments(theta, sigma, 0, n)
        pool = g.moments(theta, sigma / math.sqrt(2.0), 0, n, kappa_only=True)
        out[on] = (main.kappa, main.mean_abs, main.m4, main.coverage, pool.kappa)
    for x, y in zip(out[True], out[False]):
        assert _same(x.to(F64), y.to(F64))
    assert float((out[True][2] == 3.0).double().mean()) > 0.5
    assert used[0] and not any(used[1:])  # the main call's C3 by blocks (the pool call's kept), then off
    qb.release_chunk_facts()


def test_mask_reductions_match_torch():
    g = torch.Generator().manual_seed(0)
    for shape in [(0,), (1,), (7,), (1 << 15,), (3, 5, 8), (9, 4, 64)]:
        for p in (0.0, 1e-3, 0.5, 1.0):
            m = torch.rand(shape, generator=g) < p
            assert any_set(m) == bool(m.any())
            assert any_set(m.T if m.dim() == 2 else m[..., ::2]) == bool((m.T if m.dim() == 2 else m[..., ::2]).any())
            if m.dim() == 3:
                for d in (0, 1, 2, -1):
                    assert torch.equal(any_along(m, d), m.any(d))


def test_chunk_cube_on_a_conv_weight_and_per_tensor_blocks():
    """4-D weights (blocks over the leading dims) and one block for the whole tensor."""
    import dataclasses

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3)
    g = get_scheme("rtn_int8").apply(torch.nn.Sequential(conv)).grids["0.weight"]
    per_tensor = dataclasses.replace(
        g, block_size=tuple(g.shape), scale=g.scale.reshape(-1)[:1].reshape(1, 1, 1, 1),
        zero_point=None if g.zero_point is None else g.zero_point.reshape(-1)[:1].reshape(1, 1, 1, 1),
        support=(g.support[0].reshape(-1).amin().reshape(1, 1, 1, 1), g.support[1].reshape(-1).amax().reshape(1, 1, 1, 1)),
        codes=None, revealed=None)
    for grid in (g, per_tensor):
        n = grid.numel
        for a, b in [(0, n), (7, n - 5), (40, 41), (45, 90)]:
            qb.release_chunk_facts()
            scale, zp, _, _, bounds = grid._chunk_grid(a, b)
            got = grid._chunk_cube(scale, zp, bounds)
            le, he, step = grid._outer_edges(scale, zp)
            assert got is not None and _same(got, affine_cube_sum(bounds[0], bounds[1], le, he, step)), (a, b)
    qb.release_chunk_facts()


def test_parts_in_place_bitwise_on_float32_bounds(monkeypatch):
    """Bounds held in float32 are promoted as the old ``width / sd`` promoted them."""
    th, sg, lo, hi, cube, _ = _sweep()
    lo32, hi32 = lo.float(), hi.float()
    monkeypatch.setattr(W, "WIDE_PARTS_IN_PLACE", False)
    old = wide_sd_parts(th, sg, lo32, hi32, cube, None, None)
    monkeypatch.setattr(W, "WIDE_PARTS_IN_PLACE", True)
    new = wide_sd_parts(th, sg, lo32, hi32, cube, None, None)
    assert new[0].dtype == F64 and _same(old[0], new[0]) and torch.equal(old[2], new[2])
