"""sd-0 (floored) and tiny-sd weights exactly on, or within a few sd of, a cell edge (tie48).

A weight the data never moves has its sd floored to float64's smallest normal (method.md
section 5, "sd-0 weights"); where it lies exactly on an edge of its own cell (a float32 weight on
an fp16 / bf16 midpoint: ~1 in 2^13 / 2^16 weights) it is no point mass: half of its (vanishing)
normal lies in each cell, and the exact sums give two half-normal cells, ``(kappa, mean_abs, m4,
coverage) = (2/pi, sqrt(2/pi), 4/pi^2, 1)``. The value tables' windowed path standardised its
edges as ``-theta/sd + (scale/sd) * edge``: with ``|theta| / sd`` overflowing (``|theta|``
above ~4 at the floor) that was ``-inf + inf`` (kappa 0, NaN at the fp16 table's top midpoint
65520, whose upper cell is unbounded), and wherever ``|theta| / sd`` is large it lost ``|theta /
sd| * 2^-52`` sd to cancellation (kappa off by ~0.6 at sd 1e-16 on float8 and fp16 ties, ~1e-3
at ``|theta| / sd ~ 1e13``). Unchecked calls (the self-checks run on a process's first calls
only) returned those numbers; ``table.SD_FLOOR_TIES`` copied them to every tie.

References: the reference path (:func:`~mis_lightning.functional.table.table_reference_moments`,
``(edge - theta) / sd``, every edge within 8.5 sd) and the closed form above; at the grid level
the exact sums over the grid's own clipped edges (``ParamGrid.boundaries``,
:func:`~mis_lightning.functional.cells.cell_moments`) with the release's revealed tails
(:func:`~mis_lightning.functional.bounds.reveal_beyond_bounds`). Tolerance 1e-12 (the same cell
terms summed in another order; the fast path's other approximations, the fine-grid expansion and
the interpolation table, do not serve these elements: their own cells are wider than 4 sd).
"""

from __future__ import annotations

import math

import pytest
import torch

import mis_lightning.functional.fastpath as fp
from mis_lightning.functional import table as T
from mis_lightning.functional.bounds import clip_boundaries, reveal_beyond_bounds
from mis_lightning.functional.cells import cell_moments
from mis_lightning.quantization.casts import cast_cell_values, representable_values
from tests.test_point_mass import _grid

F64 = torch.float64
FLOOR = torch.finfo(F64).tiny
FIELDS = ("kappa", "mean_abs", "m4", "coverage")
HALVES = (2.0 / math.pi, math.sqrt(2.0 / math.pi), 4.0 / math.pi**2, 1.0)  # two half-normal cells
TOL = 1e-12


@pytest.fixture
def unchecked(monkeypatch):
    """Self-checks off: every call is an unchecked one (as after a process's first calls)."""
    monkeypatch.setattr(fp.GUARD, "sample_size", lambda *a, **k: 0)


def _midpoints(values: torch.Tensor, near: list[float]) -> torch.Tensor:
    """The table's midpoints at or just above each of ``near`` and its top one, both signs."""
    mids = 0.5 * (values[1:] + values[:-1])
    pick = [int(torch.searchsorted(mids, torch.tensor(x, dtype=F64))) for x in near] + [mids.numel() - 1]
    m = mids[torch.tensor(pick)]
    return torch.cat([m, -m])


def _close(got, ref, fields, what) -> None:
    for f in fields:
        a, b = getattr(got, f), getattr(ref, f)
        assert bool(torch.isfinite(a).all()), (what, f, a)
        err = (a - b).abs()
        assert float(err.max()) <= TOL, (what, f, a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_floored_sd_on_a_cast_tables_midpoint(dtype, kappa_only, unchecked):
    """The reported case: float32 weights on an fp16 / bf16 midpoint at |theta| 0.5, 8, 1000 and
    the table's top one (fp16 65520: the edge of the overflow cell), sd at the floor. Before:
    kappa 0 from |theta| ~4 on, NaN at the top (2/pi by the reference)."""
    values = cast_cell_values(dtype)
    th = _midpoints(values, [0.5, 8.0, 1000.0])
    assert torch.equal(th, th.float().double())  # float32 weights
    sg, sc = torch.full_like(th, FLOOR), torch.ones_like(th)
    ref = T.table_reference_moments(th, sg, values, sc)
    for f, v in zip(FIELDS, HALVES):
        torch.testing.assert_close(getattr(ref, f), torch.full_like(th, v), rtol=0.0, atol=TOL)
    fields = ("kappa", "coverage") if kappa_only else FIELDS
    _close(T.table_cell_moments(th, sg, values, sc, kappa_only=kappa_only), ref, fields, "table_cell_moments")
    window, _ = T._table_window_moments(th, sg, values, sc, kappa_only)
    _close(window, ref, FIELDS, "windowed path")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_floored_ties_beside_settled_weights(dtype, kappa_only, unchecked, monkeypatch):
    """The ties as a call leaves them after its settled weights (``SD_FLOOR_TIES``: one windowed
    evaluation per tie geometry, its numbers copied): every tie the reference's numbers, with the
    shortcut on and off; the top midpoints (an unbounded cell above) too."""
    values = cast_cell_values(dtype)
    ties = _midpoints(values, [2.0**-20, 0.5, 3.0, 5.0, 8.0, 1000.0, 3e4])
    g = torch.Generator().manual_seed(0)
    th = torch.cat([torch.randn(4000, generator=g, dtype=F64) * 0.05, ties])
    sg = torch.cat([torch.full((4000,), 0.7, dtype=F64), torch.full_like(ties, FLOOR)])
    sc = torch.ones_like(th)
    tie = sg == FLOOR
    ref = T.table_reference_moments(th[tie], sg[tie], values, sc[tie])
    fields = ("kappa", "coverage") if kappa_only else FIELDS
    for on in (True, False):
        monkeypatch.setattr(T, "SD_FLOOR_TIES", on)
        T._TIE_MOMENTS.clear()
        out, _ = T._table_sum_moments(th, sg, values, sc, kappa_only)
        got = T.CellMoments(*(getattr(out, f)[tie] for f in FIELDS))
        _close(got, ref, fields, f"SD_FLOOR_TIES={on}")



@pytest.mark.parametrize("kappa_only", [False, True])
def test_tie_cache_follows_the_exact_offsets_switch(kappa_only, unchecked, monkeypatch):
    """``_TIE_MOMENTS`` (SD_FLOOR_TIES) is keyed on ``EXACT_EDGE_OFFSETS`` too: the ties of a call take
    the windowed path's numbers of the switch as it is now, not those cached under the other setting
    (an A/B of the switch in one process, ``first_call.py ab --flag``, read the first run's numbers:
    2/pi with the switch off, where the windowed path gives 0 above ``|theta| ~ 4`` at the floor; rv48)."""
    values = cast_cell_values(torch.float16)
    ties = _midpoints(values, [8.0, 1000.0])[:2]  # |theta| / FLOOR overflows: the old form's kappa 0
    th = torch.cat([torch.full((64,), 0.5, dtype=F64), ties])
    sg = torch.cat([torch.zeros(64, dtype=F64), torch.full_like(ties, FLOOR)])
    sc = torch.ones_like(th)
    T._TIE_MOMENTS.clear()
    for exact in (True, False, True):
        monkeypatch.setattr(T, "EXACT_EDGE_OFFSETS", exact)
        out, closed = T._table_sum_moments(th, sg, values, sc, kappa_only)
        alone, _ = T._table_window_moments(ties, sg[64:], values, sc[64:], kappa_only)
        assert torch.equal(out.kappa[64:], alone.kappa), (exact, out.kappa[64:], alone.kappa)
        # (the two settings differ here: 2/pi, the reference's, against the old form's 0 / NaN)
        assert bool((alone.kappa == 2.0 / math.pi).all()) == exact, alone.kappa
    T._TIE_MOMENTS.clear()

def _float8_case(dtype: torch.dtype, scale: float, sd: float, offset: float):
    values = representable_values(dtype).to(F64)
    mids = 0.5 * (values[1:] + values[:-1])
    mids = mids[mids.abs() >= 2.0**-6]  # normal cells (at these sds no cell near 0 is fine anyway)
    th = mids * scale + offset * sd
    return values, th, torch.full_like(th, sd), torch.full_like(th, scale)


@pytest.mark.parametrize("sd", [FLOOR, 1e-300, 1e-30, 1e-16, 1e-13])
@pytest.mark.parametrize("scale", [1.0, 2.0**-9, 0.0123, 37.5])
def test_tiny_sd_on_and_near_a_float8_edge(sd, scale, unchecked):
    """float8 tables with a scale (``scale / sd`` overflows at the floor for scales above ~4), sds
    that are not the floor (``1 / sd`` rounded: ``theta / sd`` and ``(scale / sd) * edge`` round
    apart), weights on every edge and 0.3 / 1 / 3 sd beside it. Before: kappa 0 / NaN at the
    smallest sds, off by up to ~0.6 at 1e-16 and 1e-13."""
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for offset in (0.0, 0.3, -1.0, 3.0):
            values, th, sg, sc = _float8_case(dtype, scale, sd, offset)
            ref = T.table_reference_moments(th, sg, values, sc)
            _close(T.table_cell_moments(th, sg, values, sc), ref, FIELDS, (dtype, offset))


@pytest.mark.parametrize("sd", [1e-30, 1e-13, 1e-9])
def test_tiny_sd_near_a_cast_tables_edge(sd, unchecked):
    """fp16 / bf16 weights of every magnitude from 2^-10 to the top, on a midpoint and 0.3 / 1 / 3
    sd beside it, at sds whose ``|theta| / sd`` reaches 1e13-1e35. Before: kappa off by up to
    ~0.6 (fp16 at sd 1e-13: 0.56)."""
    for dtype in (torch.float16, torch.bfloat16):
        values = cast_cell_values(dtype)
        mids = 0.5 * (values[1:] + values[:-1])
        keep = (mids.abs() >= 2.0**-10) & (mids.abs() <= 6e4)
        pick = torch.nonzero(keep).squeeze(-1)[::97]
        for offset in (0.0, 0.3, -1.0, 3.0):
            th = mids[pick] + offset * sd
            sg, sc = torch.full_like(th, sd), torch.ones_like(th)
            ref = T.table_reference_moments(th, sg, values, sc)
            _close(T.table_cell_moments(th, sg, values, sc), ref, FIELDS, (dtype, offset))


# every grid kind: affine (symmetric with bounds, asymmetric), value tables with a scale (float8) and
# without (fp16, bf16), the quotient grid (a bf16 model's int8); weights x3000: theta / sd overflows
GRID_CASES = [("rtn_int8", torch.float32), ("int8_weight_only", torch.float32),
              ("intx_weight_only_int4_g32_asym", torch.float32), ("float8_weight_only", torch.float32),
              ("float8_weight_only_per_tensor", torch.float32), ("fp16", torch.float32), ("bf16", torch.float32),
              ("intx_weight_only_int8_g32", torch.bfloat16)]


@pytest.mark.parametrize("scheme, dtype", GRID_CASES, ids=[c[0] + ("-bf16" if c[1] != torch.float32 else "")
                                                            for c in GRID_CASES])
@pytest.mark.parametrize("size", [(64, 64), (256, 128)], ids=["small", "fused"])  # fused: the 2^15-element paths
def test_grids_sd0_weights_on_their_cell_edges(scheme, dtype, size, unchecked):
    """``ParamGrid.moments`` (the point-mass proof, the grid paths, the bounds' split, the draws'
    positions without codes, kappa-only) on dead rows' weights (sd 0, some 1e-200) put on an edge
    of their own cell inside the release's bounds, against the exact sums over the grid's clipped
    edges with the revealed tails. Before: the float8 and 16-bit tables' ties at |theta| above
    ~4 (kappa 0, NaN at the top)."""
    if scheme not in ("fp16", "bf16", "rtn_int8"):
        pytest.importorskip("torchao")
    rows, cols = size
    g, theta0 = _grid(scheme, rows, cols, dtype, mult=3000.0)
    c = theta0.numel()
    scale, zp, code = g.element_grid(0, c)
    lo, hi = g._own_edges(theta0, scale.to(F64), zp, code)
    bounds = g.element_bounds(0, c)
    inf = torch.full_like(theta0, math.inf)
    blo, bhi = (-inf, inf) if bounds is None else (bounds[0].to(F64), bounds[1].to(F64))
    live = (torch.arange(rows) % 8 == 3).repeat_interleave(cols)
    sigma = torch.where(live, scale.to(F64) * 0.7, torch.zeros_like(theta0))
    dead = torch.nonzero(~live).squeeze(-1)
    theta = theta0.clone()
    for ii, edge in ((dead[::7], lo), (dead[3::11], hi)):
        inside = torch.isfinite(edge[ii]) & (edge[ii] >= blo[ii]) & (edge[ii] <= bhi[ii])
        theta[ii] = torch.where(inside, edge[ii], theta[ii])
    sigma[dead[5::13]] = 1e-200
    rev, _ = g._revealed_at(0, c, theta.device)
    tied = (sigma < 1e-100) & (theta != theta0)
    if rev is not None:
        tied &= ~rev
    assert int(tied.sum()) > 20
    for kw in (dict(), dict(kappa_only=True), dict(use_codes=False)):
        got = g.moments(theta, sigma, 0, c, **kw)
        # (sd 0: no edge beyond the own cell's two within reach; 4 each side, the tied weights only)
        if kw.get("use_codes", True):
            edges = g.boundaries(theta, 0, c, 4)
        else:  # a draw's position: its cell from the grid alone
            edges = g._edges(theta, scale, zp, None, 4)
            edges = edges if bounds is None else clip_boundaries(edges, blo, bhi)
        ii = torch.nonzero(tied).squeeze(-1)
        ref = cell_moments(theta[ii], sigma[ii], edges[ii])
        if bounds is not None:
            reveal_beyond_bounds(ref, torch.arange(ii.numel()), theta[ii], sigma[ii], blo[ii], bhi[ii])
        fields = ("kappa",) if kw.get("kappa_only") else ("kappa", "mean_abs", "m4")
        for f in fields:
            a, b = getattr(got, f).to(F64)[ii], getattr(ref, f)
            assert bool(torch.isfinite(a).all()), (kw, f)
            assert float((a - b).abs().max()) <= TOL, (kw, f, float((a - b).abs().max()))
