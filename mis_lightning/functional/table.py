"""Value-table grids (float8, bfloat16, float16 and other formats): any sorted set of
representable values times a per-element scale, cells bounded by the midpoints of adjacent
values; their cell edges and cell moments (method.md section 5).

All tensors are per element (``[c]``, one chunk of a flattened parameter).
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref

import numpy as np
import torch
from torch import Tensor

from . import kernel as _kernel
from .cell_variance import CORE_SPAN, VarianceTable, finite_cell_variance, variance_table
from .cells import (
    _INV_SQRT_2PI,
    _TINY_PROB,
    SQRT_2_OVER_PI,
    CellMoments,
    _pdf,
    column_sums,
    moments_from_alpha,
)
from .fastpath import GUARD, verify_sample
from .formats import format_values
from .interp import interp_table
from .kernel import (
    _MAX_WINDOW,
    CUTOFF_SIGMAS,
    FINE_STEP,
    REFERENCE_FINE_STEP,
    _float64_inputs,
    fine_grid_moments,
    in_blocks,
    own_cell_mean_abs,
    windowed_moments,
)
from .masks import all_set, any_set
from .runs import RUN_MAX_STEP, RunTable, per_table, run_moments, run_table
from .versions import tensor_version

# Window half-widths for value tables beyond their ``half_window`` (float grids get finer
# towards zero, so a window may need many edges).
_TABLE_BUCKETS = (32, 64, 128, 256)
# Floats per [rows, edges] working tensor of the windowed sums.
_ROWS_BUDGET = 1 << 20
# Name of the path, as the self-check warnings print it.
TABLE_PATH = "the float-format cell sums (fine-grid expansion)"


def table_boundaries(theta: Tensor, values: Tensor, scale: Tensor, half_window: int) -> Tensor:
    """Cell edges ``[c, 2*half_window + 2]`` on a non-uniform grid ``values * scale``.

    Args:
        theta: ``[c]`` weights (parameter units).
        values: ``[V]`` sorted, unique, finite representable values of the format (e.g.
            every finite float8_e4m3fn value), in units of ``scale``.
        scale: ``[c]`` per-element positive scale (1 for plain dtype casts).
        half_window: edges each side of the element's cell.

    The element's cell is found by nearest value (ties to the upper value; the backend's
    own code, where known, is checked against it by the callers).
    """
    mids = table_layout(values, values.device).mids  # [V-1] edges between consecutive values
    x = theta.to(torch.float64) / scale.to(torch.float64)
    cell = torch.searchsorted(mids, x, right=True)  # index of the value whose cell holds x
    i = torch.arange(-half_window + 1, half_window + 1, device=theta.device)
    e = cell.unsqueeze(-1) + i  # edge e separates values e-1 and e, i.e. mids[e-1]
    valid_low = e >= 1
    valid_high = e <= mids.numel()
    edges = mids[(e - 1).clamp(0, mids.numel() - 1)]
    edges = torch.where(valid_low, edges, torch.full_like(edges, -math.inf))
    edges = torch.where(valid_high, edges, torch.full_like(edges, math.inf))
    edges = edges * scale.to(torch.float64).unsqueeze(-1)
    inf = torch.full_like(edges[:, :1], math.inf)
    return torch.cat([-inf, edges, inf], dim=-1)


_LAYOUT_SERIALS = itertools.count()


class TableLayout:
    """What the cell sums of one value table read that depends on the table alone: the values
    (float64), the cell edges ``mids`` (midpoints of adjacent values) and ``changes`` (the
    cumulative count of step changes between consecutive finite cells: cells ``a..b`` are
    uniform when ``changes[a - 1] == changes[b - 1]``). Built once per table and device
    (:func:`table_layout`); the per-call arithmetic it replaces was O(V) (bf16 and fp16:
    ~65k values) on every call, whatever the call's size."""

    def __init__(self, values: Tensor, device: torch.device) -> None:
        self.values = values.detach().to(device=device, dtype=torch.float64).clone()
        self.serial = next(_LAYOUT_SERIALS)  # (a key of per-layout caches that no later layout takes)
        v = self.values
        self.mids = 0.5 * (v[1:] + v[:-1])
        self._guide = _bit_guide(self.mids.cpu().numpy()) if device.type == "cpu" else None
        if self._guide is not None:
            self.a_lo, self.a_hi, self.shift, self.neg0, self.pos0 = self._guide[:5]
            self.guide1, self.gmid = (torch.from_numpy(t) for t in self._guide[5:])
        self.wide = _wide_span(self.mids)
        # the finite cells' ends: the unbounded cells lie below lo_edge and from hi_edge on
        self.lo_edge, self.hi_edge = (float(self.mids[0]), float(self.mids[-1])) if self.mids.numel() else (0.0, 0.0)
        inf = torch.full((1,), math.inf, dtype=torch.float64, device=device)
        self.padded = torch.cat([-inf, self.mids, inf])  # cell k's edges: padded[k], padded[k + 1]
        # the float format whose values these are (float8: every finite value; float16 / bfloat16:
        # a cast's cells, with +-2^(emax + 1) at the ends), or None
        self.format_dtype = _format_dtype(self.values)
        self._edges_by_bits: tuple[Tensor, Tensor] | None = None
        self._pattern_cells: tuple[Tensor, Tensor] | None = None
        self._edges_np: tuple[np.ndarray, np.ndarray] | None = None

    @functools.cached_property
    def changes(self) -> Tensor:
        """``[V - 2]`` int64: the cumulative count of step changes between consecutive finite
        cells (built on first read: the 16-bit casts' layouts are never asked for it)."""
        widths = self.mids[1:] - self.mids[:-1]  # width of finite value cell k is widths[k - 1]
        change = ~torch.isclose(widths[1:], widths[:-1], rtol=1e-9, atol=0.0)
        return torch.cat([change.new_zeros(1, dtype=torch.long), change.long().cumsum(0)])

    def _format_edges(self) -> tuple[Tensor, Tensor]:
        """Per bit pattern ``m`` of a magnitude below the format's largest finite value (``[top]``
        float64 each): the lower and upper edge of its value's cell, ``0.5 * (a + b)`` of the
        neighbouring values as :attr:`mids` (the value below 0 is minus the smallest one)."""
        if self._edges_by_bits is None:
            dt = self.format_dtype
            assert dt is not None
            ints = torch.int16 if torch.finfo(dt).bits == 16 else torch.int8
            top = int(torch.tensor(torch.finfo(dt).max, dtype=dt).view(ints))
            v = torch.arange(0, top + 1, dtype=torch.int32).to(ints).view(dt).to(torch.float64)
            below = torch.cat([-v[1:2], v[:-2]])  # the neighbour below v[0 .. top - 1]
            dev = self.mids.device
            self._edges_by_bits = ((0.5 * (v[:-1] + below)).to(dev), (0.5 * (v[1:] + v[:-1])).to(dev))
        return self._edges_by_bits

    def edges_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """:attr:`mids` and :attr:`padded` as numpy arrays (views of the CPU tensors; kept)."""
        if self._edges_np is None:
            self._edges_np = (self.mids.cpu().numpy(), self.padded.cpu().numpy())
        return self._edges_np

    def pattern_cells(self) -> tuple[Tensor, Tensor] | None:
        """For a 16-bit float format's table (float16 / bfloat16 casts, :attr:`format_dtype`):
        per signed bit pattern ``p`` (``[65536]`` float64 each, indexed by ``p & 0xFFFF``) the
        edges :attr:`padded` ``[k]``, ``[k + 1]`` of the cell ``k = searchsorted(mids, v, right=True)``
        holding the pattern's value ``v`` (``+-inf``: the unbounded end cells; NaN patterns: NaN);
        ``None`` for other tables. Built once per layout (:func:`_own_facts`' bit route)."""
        if self._pattern_cells is None:
            dt = self.format_dtype
            if dt is None or torch.finfo(dt).bits != 16:
                return None
            v = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dt).to(torch.float64)
            dev = self.mids.device
            # the layout's bucket guide where it has one (cells: searchsorted's answer exactly, on
            # every float64 including +-inf and NaN; ~10x fewer ns per element on 65k patterns)
            k = self.cells(v) if PATTERN_CELLS_BY_GUIDE and self._guide is not None \
                else torch.searchsorted(self.mids.cpu(), v, right=True)
            nan = torch.isnan(v)
            lo = torch.where(nan, math.nan, self.padded.cpu()[k])
            hi = torch.where(nan, math.nan, self.padded.cpu()[(k + 1).clamp_(max=self.padded.numel() - 1)])
            self._pattern_cells = (lo.to(dev), hi.to(dev))
        return self._pattern_cells

    def format_inside(self, th: Tensor, sc: Tensor | None, margin: float) -> Tensor:
        """``[c]`` bool, for a float format's table (:attr:`format_dtype` set): ``True`` where the
        weight ``th`` (float64 ``[c]``) is proven inside its own cell, scaled by ``sc`` (float64
        ``[c]``, positive; ``None``: 1), by more than ``margin * sc`` on each side, with
        ``min(th - lo, hi - th)`` the same float64 numbers as from :meth:`cells` and
        :attr:`padded` on ``th / sc`` (``lo``, ``hi`` the edges times ``sc``); ``False`` where not
        proven (ties and near-edges, the top cells, NaN): the caller tests those on the table
        (:data:`FORMAT_INSIDE_BITS`).

        A candidate value ``v`` (``|th / sc|`` cast to the format, clamped below its largest
        finite value) gives the candidate cell's edges, the midpoints to its neighbours (the next
        magnitudes by the bit pattern; below 0, minus the smallest one), from two tables over the
        bit patterns built as the layout's midpoints (:meth:`_format_edges`). If the weight lies
        in it by more than the margin it is the own cell (the cells are disjoint; a margin of
        1e-9 of the scale is far above ``th / sc``'s rounding), whatever rounding the cast did;
        the cells are symmetric about 0 and ``min(th - lo, hi - th)`` is the same number for
        ``th`` and ``-th`` (exact negations), so ``|th|`` stands for ``th``. Two gathers from
        tables of 128 (float8) or 32k values instead of :meth:`cells`' two from ~65k-row guides and
        two for the edges: the 1e7 MLP's point-mass tests on fp16, bf16 and float8
        (docs/benchmarks.md, "p46b")."""
        assert self.format_dtype is not None
        dt = self.format_dtype
        ints = torch.int16 if torch.finfo(dt).bits == 16 else torch.int8
        lo_tab, hi_tab = self._format_edges()
        ath = th.view(torch.int64).bitwise_and(_MAGNITUDE).view(torch.float64)  # |th| (sign bit cleared)
        ax = ath if sc is None else ath / sc
        # (NaN, the top value and beyond: a wrong candidate, not proven)
        m = ax.to(dt).view(ints).clamp_(0, lo_tab.numel() - 1).to(torch.int32)
        lo, hi = lo_tab.index_select(0, m), hi_tab.index_select(0, m)
        if sc is not None:
            lo.mul_(sc)
            hi.mul_(sc)
        d = torch.sub(ath, lo, out=lo)
        return torch.minimum(d, hi.sub_(ath), out=d) > (margin if sc is None else margin * sc)

    def cells(self, x: Tensor) -> Tensor:
        """``torch.searchsorted(mids, x, right=True)`` (the value cell holding each ``x``,
        float64 ``[c]``; NaN: past the top, as there), exactly, from the bits of ``x``: its
        magnitude's exponent and leading mantissa bits pick a bucket that holds at most one cell
        edge, then one comparison (:func:`_bit_guide`). 12 element-wise operations (no `where`) instead of a
        binary search over the edges (bf16 / fp16: 65k edges, 16 steps: ~50 ns per element)."""
        if self._guide is None or x.device.type != "cpu" or x.dtype != torch.float64:
            return torch.searchsorted(self.mids, x, right=True)
        x = x.contiguous()
        bits = x.view(torch.int64)
        row = torch.bitwise_and(bits, _MAGNITUDE).clamp_(self.a_lo, self.a_hi)
        row.bitwise_right_shift_(self.shift)
        # the row, neg0 - q below 0 and q + pos0 otherwise (NaN of either sign: not below 0), without
        # a where (a third of the call): with s = -(x < 0) (0 or -1), q ^ s is q or -q - 1, and
        # s & (neg0 + 1 - pos0) adds what the negative side needs
        sign = (x < 0).long().neg_()
        row.bitwise_xor_(sign).add_(sign.bitwise_and_(self.neg0 + 1 - self.pos0)).add_(self.pos0)
        return self.guide1.index_select(0, row).sub_((x < self.gmid.index_select(0, row)).long())


def _format_dtype(values: Tensor) -> torch.dtype | None:
    """The float format whose values ``values`` (float64, sorted) are: every finite value of a
    float8 format (``quantization.casts.representable_values``), or of float16 / bfloat16 with
    ``+-2^(emax + 1)`` at the ends (the cast's cells, ``quantization.casts.cast_cell_values``);
    ``None`` for any other table."""
    for dt, ends in ((torch.float8_e4m3fn, False), (torch.float8_e5m2, False),
                     (torch.float16, True), (torch.bfloat16, True)):
        if values.numel() != _FORMAT_SIZE[dt]:
            continue
        want = format_values(dt)
        if ends:
            end = torch.tensor([2.0 ** math.ceil(math.log2(float(torch.finfo(dt).max)))], dtype=torch.float64)
            want = torch.cat([-end, want, end])
        if torch.equal(values.cpu(), want):
            return dt
    return None


# TableLayout.pattern_cells finds its 65,536 patterns' cells through the layout's bucket guide
# (TableLayout.cells) instead of a binary search over ~65k edges: the same indices (p53b; a
# first call's one-time build, twice: bf16 and fp16). False: torch.searchsorted (tests, A/B)
PATTERN_CELLS_BY_GUIDE = True


# values in a format's table: the finite ones (+0 and -0 merged; the casts' two overflow ends too)
_FORMAT_SIZE = {torch.float8_e4m3fn: 253, torch.float8_e5m2: 247,
                torch.float16: 2 * (2**15 - 2**10) - 1 + 2, torch.bfloat16: 2 * (2**15 - 2**7) - 1 + 2}
# ParamGrid's point-mass inside test on a float format's table proves most weights inside by the
# format's bits (TableLayout.format_inside) and tests only the others on the table: the same mask.
# False: every weight on the table (A/B)
FORMAT_INSIDE_BITS = True


def _wide_span(mids: Tensor) -> float | None:
    """The least cell edge ``T > 0`` such that at least ``2 * _MAX_WINDOW`` edges lie in
    ``[-T, T]`` (``searchsorted(mids, T, right=True) - searchsorted(mids, -T, right=True) >=
    2 * _MAX_WINDOW``), or ``None`` (a table with fewer edges: float8). A reach
    ``[x - r, x + r]`` covering ``[-T, T]`` then needs more than ``_MAX_WINDOW`` edges on one
    side of ``x`` (:func:`_sum_prelude`'s ``need``; searchsorted is monotone), whatever ``x``:
    bf16 / fp16 weights whose sd spans 0 (:func:`_settled`)."""
    pos = mids[mids > 0]
    if mids.numel() < 2 * _MAX_WINDOW or pos.numel() == 0 or not bool(torch.isfinite(mids).all()):
        return None
    if not WIDE_SPAN_BISECT:
        span = torch.searchsorted(mids, pos, right=True) - torch.searchsorted(mids, -pos, right=True)
        ok = torch.nonzero(span >= 2 * _MAX_WINDOW).squeeze(-1)
        return float(pos[ok[0]]) if ok.numel() else None
    # the span (edges in (-T, T]) never falls as T grows: bisect over the positive edges for the
    # first that reaches it (~17 scalar searches, not two over all ~32k of them: sm42, ~4 ms ->
    # ~0.2 ms per 16-bit table on a first call); the same edge
    m = mids.detach().cpu().numpy()
    p = pos.detach().cpu().numpy()

    def enough(i: int) -> bool:
        return int(np.searchsorted(m, p[i], side="right") - np.searchsorted(m, -p[i], side="right")) >= 2 * _MAX_WINDOW

    lo, hi = 0, p.size  # the answer's index lies in [lo, hi]; hi: none reaches it
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return float(pos[lo]) if lo < p.size else None


# The table layout's one-time searches in fewer operations (sm42; the same results: False, the
# full scans, for tests and A/B): _wide_span by bisection, _bit_guide past the shifts with fewer
# rows than edges.
WIDE_SPAN_BISECT = True
GUIDE_SKIP_FEW_ROWS = True

_MAGNITUDE = (1 << 63) - 1  # a float64's bits without the sign: its magnitude, ordered as an integer
_GUIDE_MAX_ROWS = 1 << 21
# Below this many edges searchsorted is as fast (16 values, NF4-like: 10.6 against 11.6 ns per
# element; float8 e4m3's 252 edges: 33 against 11-21, bf16 57 against 13, fp16 77 against 12).
_GUIDE_MIN_EDGES = 64


def _bit_guide(mids: np.ndarray) -> tuple | None:
    """The bucket guide of :meth:`TableLayout.cells` for the sorted cell edges ``mids``
    (float64), or ``None`` where none fits (then ``searchsorted``).

    A float64 ``x``'s magnitude bits ``a`` (an integer as ordered as ``|x|``), clamped to
    ``[a_lo, a_hi]`` (the bits of the smallest nonzero and the largest ``|mid|``) and shifted
    right by ``shift`` bits, give a bucket ``q`` in ``[q_lo, q_hi]``; with the sign, a row
    (negative ``x``: ``q_hi - q``, rows ``0 .. q_hi - q_lo``; otherwise ``q - q_lo`` after those)
    whose values form an interval. ``shift`` is the largest (fewest rows) for which every row
    holds at most one edge (float formats: 52 minus their mantissa bits; float8 e4m3 ~300 rows,
    bf16 ~65k, fp16 ~86k). Per row: ``guide1 = 1 + #edges below the row's least value`` and
    ``gmid`` the first edge at or above it (``+inf`` past the last); then
    ``#edges <= x = guide1 - (x < gmid)``, NaN (a non-negative row, the top one) included:
    ``n``, as ``searchsorted``. Checked here: rows of the edges strictly increasing, the top row's
    ``gmid`` the largest edge."""
    n = mids.size
    if n < _GUIDE_MIN_EDGES or not np.all(np.isfinite(mids)) or not np.all(np.diff(mids) > 0):
        return None
    mags = np.abs(mids)
    if not np.any(mags > 0):
        return None
    a_lo = int(mags[mags > 0].min().view(np.int64))
    a_hi = int(mags.max().view(np.int64))
    bits = mids.view(np.int64) & _MAGNITUDE
    for mant in range(0, 31):
        shift = 52 - mant
        q_lo, q_hi = a_lo >> shift, a_hi >> shift
        rows_half = q_hi - q_lo + 1
        if 2 * rows_half > _GUIDE_MAX_ROWS:
            return None
        if GUIDE_SKIP_FEW_ROWS and 2 * rows_half < n:
            # fewer rows than edges: two edges share a row (pigeonhole), so the test below fails
            # (sm42: bf16 / fp16 skip 7-10 passes over their ~32k edges on a first call)
            continue
        q = np.clip(bits, a_lo, a_hi) >> shift
        rows = np.where(mids < 0, q_hi - q, q - q_lo + rows_half)
        if not np.all(np.diff(rows) > 0):
            continue
        qs = np.arange(q_lo, q_hi + 1, dtype=np.int64)
        with np.errstate(invalid="ignore"):
            # least value of each row: negative rows (q = q_hi .. q_lo) -(largest magnitude of
            # bucket q), -inf for the top bucket; non-negative rows the smallest magnitude, +0
            # for the bottom bucket (it holds every magnitude below a_lo)
            neg_least = -(((qs[::-1] + 1) << shift) - 1).view(np.float64)
            neg_least[0] = -np.inf
            pos_least = (qs << shift).view(np.float64).copy()
            pos_least[0] = 0.0
        least = np.concatenate([neg_least, pos_least])
        guide = np.searchsorted(mids, least, side="left")
        gmid = np.concatenate([mids, [np.inf]])[guide]
        if guide[-1] != n - 1:  # NaN and +inf (the top row) must land past the last edge
            return None
        return (a_lo, a_hi, shift, q_hi, rows_half - q_lo, (guide + 1).astype(np.int64), gmid.astype(np.float64))
    return None


_LAYOUTS: dict[tuple[int, int, str], TableLayout] = {}


def table_layout(values: Tensor, device: torch.device) -> TableLayout:
    """The :class:`TableLayout` of ``values`` (cached per table and device)."""
    return per_table(_LAYOUTS, values, device, TableLayout)


def table_cell_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int = 18,
    path_elements: int | None = None, kappa_only: bool = False,
) -> CellMoments:
    """Cell moments on a non-uniform grid (float formats), skipping frozen elements.

    Args:
        theta, sigma: ``[c]`` weights and their standard deviations (parameter units).
        values: ``[V]`` sorted representable values (units of ``scale``).
        scale: ``[c]`` per-element positive scale.
        half_window: the least number of edges each side of the windowed sums of the previous
            path and the reference (the fast path sizes each window by the edges within 8.5 sd).
        path_elements: the size of the call whose path these elements take (default ``c``):
            the live elements of a chunk mostly of point masses (the sd-0 closed form,
            ``ParamGrid._own_moments``) are given alone and take the path of a call of that
            many elements of which the others are frozen (an element's moments never read
            another's; the interpolation table's choices count the call's size).
        kappa_only: only ``kappa`` is read (the pool protocol's call, the draws): the elements
            settled by their own cell (:func:`_settled`) get no ``mean_abs`` or ``m4`` (NaN
            there); ``kappa`` is bitwise the same but where the kappa-only closed form of the
            overflow elements serves (:data:`OVERFLOW_CLOSED_FORM`: within 5e-15 of the full
            call's), and the self-check compares it alone. ``mean_abs``, ``m4`` and ``coverage``
            (and the fast path's closed-form mask) may then be one value expanded (stride 0, a
            16-bit cast's call settled whole: :data:`UNIT_KAPPA_INTO`): read them, never write them.

    Returns:
        float64 :class:`CellMoments` ``[c]`` from the float-format fast path
        (:func:`_table_fast_moments`: for float8 tables on the CPU, in calls of at least
        ``INTERP_MIN_ELEMENTS`` (2^15) elements, kappa and m4 of elements
        whose own cell is at most 4 sd wide interpolated from a table of exact sums, within
        1e-7 in kappa and 1e-6 in m4, :mod:`~mis_lightning.functional.interp`; otherwise frozen
        elements skipped, the fine-grid expansion where the grid is fine and uniform within
        8.5 sd, a closed form for the fine core of the table around 0, exact sums elsewhere;
        equal to exact cell sums within 1e-13 in kappa and 1e-11 in m4 outside the
        fine-expansion and interpolated elements, tests/test_float_grid_fast.py; the closed-form
        runs of equal cells within 2.1e-12 and 6.7e-11, tests/test_float_runs.py). It is
        checked against exact sums on a sample (at first use per thread count, then every few
        calls; :mod:`~mis_lightning.functional.fastpath`); on disagreement it is disabled for
        the process with a ``RuntimeWarning`` and the previous windowed sums are used (then the
        reference sums, should those disagree too). Under ``torch.inference_mode`` or on
        inference tensors it runs outside inference mode on their copies (its caches read
        tensors' version counters, which inference tensors do not keep).
    """
    if torch.is_inference_mode_enabled() or any(t.is_inference() for t in (theta, sigma, values, scale)):
        with torch.inference_mode(False):
            theta, sigma, values, scale = (t.clone() if t.is_inference() else t for t in (theta, sigma, values, scale))
            return table_cell_moments(theta, sigma, values, scale, half_window, path_elements, kappa_only)
    if TABLE_PATH in GUARD.disabled:
        return table_reference_moments(theta, sigma, values, scale, half_window)
    if FLOAT_PATH in GUARD.disabled:
        out, core = _table_cell_moments(theta, sigma, values, scale, half_window, FINE_STEP), None
    else:
        # the interpolation table pays for its octaves at first use (0.1-1.2 s each): worth it
        # on large calls only (a small model's exact sums take less than one octave's build)
        size = max(theta.numel(), path_elements or 0)
        out, core = _table_fast_moments(theta, sigma, values, scale, interpolate=size >= INTERP_MIN_ELEMENTS,
                                        min_build=OCTAVE_MIN_ELEMENTS, call_elements=size, kappa_only=kappa_only)
    path = TABLE_PATH if core is None else FLOAT_PATH

    def steps() -> tuple[Tensor, list[Tensor]]:
        th, sg, sc = _float64_inputs(theta, sigma, scale)
        # the own cells' edges from the layout's bit guide (:func:`_own_facts`): the values
        # table_boundaries(th, values, sc, 1)[:, 1:3] gives (its binary search over 65k edges
        # was ~0.1 s per 1e7 scoring in the checks' strata)
        own_lo, own_hi = _own_facts(th, sc, table_layout(values, th.device))
        h = (own_hi - own_lo) / sg
        return h, [h <= FINE_STEP, h > FINE_STEP] + ([] if core is None else [core])

    ok = verify_sample(
        path, theta.shape[0], out, steps,
        lambda idx: _table_cell_moments(theta[idx], sigma[idx], values, scale[idx], half_window,
                                        REFERENCE_FINE_STEP, merge_sd=CHECK_MERGE_SD),
        "exact cell sums" if core is None else TABLE_PATH, kappa_only=kappa_only)
    if ok:
        return out
    if core is None:
        return table_reference_moments(theta, sigma, values, scale, half_window)
    return table_cell_moments(theta, sigma, values, scale, half_window)  # FLOAT_PATH now disabled


def table_reference_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int = 18
) -> CellMoments:
    """Reference cell moments on a float-format grid: exact sums over every edge within 8.5 sd
    (the fine-grid expansion only where a window would exceed 512 edges, or below
    ``REFERENCE_FINE_STEP``). Arguments and returns as :func:`table_cell_moments`."""
    return _table_cell_moments(theta, sigma, values, scale, half_window, REFERENCE_FINE_STEP)


def _table_cell_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int, fine_step: float,
    merge_sd: float = 0.0,
) -> CellMoments:
    """Cell moments on a non-uniform grid (float formats), skipping frozen elements.

    Elements whose own cell's edges lie beyond 8.5 sigma are frozen (moments 0); elements
    whose own cell is narrower than 0.5 sigma *and* whose grid is uniform within 8.5 sigma
    use the fine-grid expansion with their local step; the rest sum over every edge within
    8.5 sigma (at least ``half_window`` each side), grouped by the window they need.

    A float grid is not uniform everywhere: its step halves at each binade edge towards
    zero. The fine-grid expansion with the local step is therefore used only where no step
    change lies within 8.5 sigma (it was off by up to 1.5e-2 in kappa for float8 e4m3 next
    to a binade edge), and the window is sized by counting the edges within 8.5 sigma
    (a fixed 18 edges of >= 0.5 sigma misses part of 8.5 sigma when the cells shrink
    towards zero; kappa was off by up to 3e-5). Both are checked against the full cell sum
    in tests/test_grids.py. Where more than ``_MAX_WINDOW`` edges lie within 8.5 sigma on
    one side and the own cell is fine (float16 steps below ~0.033 sigma next to a binade
    edge, or windows reaching into the tiny cells near zero) the fine expansion with the
    local step is used: it is then off by at most ``(h_max^2 - h_min^2) / 12`` with
    ``h_max``, ``h_min`` the largest and smallest steps within 8.5 sigma (kappa ~
    ``1 - E[h(U)^2] / 12``), i.e. <= h^2/4 at a single binade edge. Elements with
    more than ``_MAX_WINDOW`` edges within 8.5 sigma whose own cell is not fine (weights at or
    beyond the largest value with a very wide sigma) are summed over every edge of the table
    (:func:`_whole_table_sums`), or, with ``merge_sd > 0`` (the self-checks' reference), with
    the cells narrower than ``merge_sd`` sd in closed form (:func:`_merged_table_sums`).
    """
    th, sg, sc = _float64_inputs(theta, sigma, scale)
    c = th.shape[0]
    kappa = torch.zeros(c, dtype=torch.float64, device=th.device)
    mean_abs, m4 = torch.zeros_like(kappa), torch.zeros_like(kappa)
    coverage = torch.ones_like(kappa)
    own = table_boundaries(th, values, sc, 1)[:, 1:3]  # the element's own cell edges
    frozen = ((th - own[:, 0]) / sg > CUTOFF_SIGMAS) & ((own[:, 1] - th) / sg > CUTOFF_SIGMAS)
    h_local = (own[:, 1] - own[:, 0]) / sg  # inf for the outermost cells

    # Value cells (index k: between mids[k-1] and mids[k]) holding theta and the two ends
    # of its 8.5-sigma reach, in units of the scale.
    v = values.to(device=th.device, dtype=torch.float64)
    mids = 0.5 * (v[1:] + v[:-1])
    reach = CUTOFF_SIGMAS * sg / sc
    x = th / sc
    cell = torch.searchsorted(mids, x, right=True)
    cell_lo = torch.searchsorted(mids, x - reach, right=True)
    cell_hi = torch.searchsorted(mids, x + reach, right=True)
    # Edges needed each side: those within the reach plus the first one beyond it.
    need = torch.maximum(cell - cell_lo, cell_hi - cell) + 1
    # Uniform within the reach: the cells cell_lo..cell_hi are all finite and no step
    # change lies between them (counted with a cumulative sum over the table).
    widths = mids[1:] - mids[:-1]  # width of finite value cell k is widths[k - 1]
    change = ~torch.isclose(widths[1:], widths[:-1], rtol=1e-9, atol=0.0)
    changes = torch.cat([change.new_zeros(1, dtype=torch.long), change.long().cumsum(0)])
    inner = (cell_lo >= 1) & (cell_hi <= mids.numel() - 1)
    a = (cell_lo - 1).clamp(0, max(changes.numel() - 1, 0))
    b = (cell_hi - 1).clamp(0, max(changes.numel() - 1, 0))
    uniform = inner & (changes[b] == changes[a])

    # Windows wider than _MAX_WINDOW edges cannot be summed: the expansion is used there even
    # by the reference (fine_step < FINE_STEP).
    fine = ~frozen & (((h_local <= fine_step) & uniform) | ((h_local <= FINE_STEP) & inner & (need > _MAX_WINDOW)))
    if bool(fine.any()):
        fm = fine_grid_moments(h_local[fine])
        kappa[fine], mean_abs[fine], m4[fine] = fm.kappa, fm.mean_abs, fm.m4
        if _kernel.EXACT_FINE_MEAN_ABS:  # (exact: the own cell's edges, own_cell_mean_abs)
            mean_abs[fine] = own_cell_mean_abs((own[fine, 0] - th[fine]) / sg[fine], (own[fine, 1] - th[fine]) / sg[fine])
    rest = ~(frozen | fine)
    if merge_sd > 0.0:
        _merged_table_sums((kappa, mean_abs, m4, coverage), rest & (need > _MAX_WINDOW),
                           table_layout(values, th.device), th, sg, sc, merge_sd)
    else:
        _whole_table_sums((kappa, mean_abs, m4, coverage), rest & (need > _MAX_WINDOW), mids, th, sg, sc)
    rest &= need <= _MAX_WINDOW
    windows = sorted({half_window, *(w for w in _TABLE_BUCKETS if w > half_window), _MAX_WINDOW})
    if bool(rest.any()):
        # A window of m edges each side (2m + 2 edges, those past the table's ends empty cells)
        # wider than the whole table (mids.numel() + 2 edges) sums the same cells over every
        # edge of the table instead, in fewer terms: float8 (254 edges) elements whose sd spans
        # most of it took windows of 256 each side, 514 edges (the first-use self-check's
        # reference on a 1e5 model: ~2x its cost). Exact sums either way (the empty cells add
        # exact zeros; the sums' order, and so their last bits, differ).
        bucket = torch.tensor(windows, device=th.device)
        m = bucket[torch.searchsorted(bucket, need.clamp(min=half_window, max=_MAX_WINDOW))]
        whole = rest & (2 * m + 2 > mids.numel() + 2)
        _whole_table_sums((kappa, mean_abs, m4, coverage), whole, mids, th, sg, sc)
        rest &= ~whole
    if bool(rest.any()):
        windowed_moments(
            (kappa, mean_abs, m4, coverage), torch.nonzero(rest).squeeze(-1),
            need[rest].clamp(min=half_window, max=_MAX_WINDOW), windows,
            _ROWS_BUDGET, lambda ii, m: table_boundaries(th[ii], values, sc[ii], m), th, sg)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)


# _whole_table_sums' blocks: elements (rows x the table's edges) per block, and the fewest rows. Each
# row's sums are its own (a reduction over its edges), whatever the block: float8 (254 edges) takes
# 258 rows a block, whose ~15 temporaries of 0.5 MB stay in cache (sm38: the 1e5 first call's float8
# self-check reference, 2,014 rows in one block of 4 MB temporaries, 42-63 -> 30 ms and 14-16k -> 2k
# page faults; later calls 15-16 -> 11 ms); the 16-bit tables (63-65k edges) keep 16 rows, as under
# the former budget of _ROWS_BUDGET elements.
_WHOLE_BLOCK = 1 << 16
_WHOLE_MIN_ROWS = 16


def _whole_table_sums(out: tuple[Tensor, Tensor, Tensor, Tensor], sel: Tensor, mids: Tensor, th: Tensor,
                      sg: Tensor, sc: Tensor) -> None:
    """Exact sums over every edge of the table for the elements ``sel`` (in place): those with
    more than ``_MAX_WINDOW`` edges within 8.5 sd whose own cell is not fine (weights at or
    beyond the largest value with an sd wider than the table's top binades). Windows of
    ``_MAX_WINDOW`` edges each side used to miss cells there (float16 at 65504, sd 5e5:
    kappa 0.645 against 0.694)."""
    if not bool(sel.any()):
        return
    idx = torch.nonzero(sel).squeeze(-1)
    inf = torch.full((1,), math.inf, dtype=torch.float64, device=th.device)
    # rows per block: ~_WHOLE_BLOCK elements (cache-sized temporaries), at least _WHOLE_MIN_ROWS
    step = max(_WHOLE_MIN_ROWS, _WHOLE_BLOCK // (mids.numel() + 2))
    for a in range(0, idx.numel(), step):
        ii = idx[a : a + step]
        edges = torch.cat([-inf, mids, inf]).unsqueeze(0) * sc[ii].unsqueeze(-1)
        mm = moments_from_alpha((edges - th[ii].unsqueeze(-1)) / sg[ii].unsqueeze(-1))
        for t, v in zip(out, (mm.kappa, mm.mean_abs, mm.m4, mm.coverage)):
            t[ii] = v


# The self-checks' reference (table_cell_moments' verify_sample) sums the cells of a table
# narrower than this many sd in closed form where an element's sd spans more than _MAX_WINDOW
# edges (_merged_table_sums): its kappa is then off the exact sums by at most CHECK_MERGE_SD^2 / 4
# (1e-6), mean_abs by 0.1 CHECK_MERGE_SD^2 and m4 by 2 CHECK_MERGE_SD^2 (<= 8e-6), against the
# check's tolerance of 2e-4, 2e-4 and 1e-3 (fastpath.APPROXIMATION). fp16 weights beyond 65504
# with an sd of 2e4-1e5 (the 1e7 MLP's draws) summed all 63k edges of the table (70-210 ms a check).
CHECK_MERGE_SD = 2e-3


def _valley(layout: TableLayout) -> tuple[int, Tensor, Tensor] | None:
    """``(m, dec, inc)`` when the widths of the table's finite cells (cell ``k`` in ``1..n-1``
    between ``mids[k - 1]`` and ``mids[k]``) fall to cell ``m`` and rise after it (float
    formats: their step halves towards 0): ``dec`` the widths of cells ``m, m - 1, .., 1``
    (non-decreasing), ``inc`` those of cells ``m, .., n - 1`` (non-decreasing); ``None``
    otherwise (or with fewer than 2 finite cells). Cached on the layout."""
    if not hasattr(layout, "_valley"):
        w = layout.mids[1:] - layout.mids[:-1]  # w[k - 1]: cell k
        out = None
        if w.numel() >= 2:
            m = int(torch.argmin(w))
            dec, inc = w[: m + 1].flip(0), w[m:]
            if bool((dec[1:] >= dec[:-1]).all()) and bool((inc[1:] >= inc[:-1]).all()):
                out = (m + 1, dec.contiguous(), inc.contiguous())
        layout._valley = out
    return layout._valley


def _merged_table_sums(out: tuple[Tensor, Tensor, Tensor, Tensor], sel: Tensor, layout: TableLayout,
                       th: Tensor, sg: Tensor, sc: Tensor, merge_sd: float) -> None:
    """:func:`_whole_table_sums` (in place, for the elements ``sel``) with the cells narrower
    than ``merge_sd`` sd in closed form: on a table whose widths fall then rise
    (:func:`_valley`) they form one run of cells ``R = [A, B]`` (standardised), whose exact
    contribution sum_k p_k mu_k^2 is ``int_R u^2 phi - sum_k p_k Var_k`` with each cell's
    variance at most ``w_k^2 / 4`` (Popoviciu): kappa takes ``int_R u^2 phi``, off by at most
    ``merge_sd^2 / 4`` (from above); m4 ``int_R u^4 phi`` (``E[U^4] - mu^4 <= 6 mu^2 w^2 / 4
    + 4 |mu| w^3 + w^4`` and ``sum p mu^2 <= 1``: at most ``2 merge_sd^2``); mean_abs the
    variation of phi over ``R`` (exact off the cell holding 0, within ``2 (phi(0) - phi(w / 2))
    <= 0.1 merge_sd^2`` there); coverage ``P(R)``. The cells outside ``R`` are summed exactly. Elements with no such cells, or tables that are
    not valley-shaped, take :func:`_whole_table_sums`. Only the self-checks' reference uses it
    (the fallback sums stay exact)."""
    if not bool(sel.any()):
        return
    valley = _valley(layout)
    mids = layout.mids
    if valley is None:
        _whole_table_sums(out, sel, mids, th, sg, sc)
        return
    n = mids.numel()
    m, dec, inc = valley
    idx = torch.nonzero(sel).squeeze(-1)
    t = merge_sd * sg[idx] / sc[idx]  # the widest merged cell, units of the scale
    # cells j_lo..j_hi (1 <= j_lo, j_hi <= n - 1) are at most t wide; none when j_lo > j_hi
    j_lo = m - torch.searchsorted(dec, t, right=True) + 1
    j_hi = m + torch.searchsorted(inc, t, right=True) - 1
    merged = j_lo <= j_hi
    if not bool(merged.all()):
        rest = torch.zeros_like(sel)
        rest[idx[~merged]] = True
        _whole_table_sums(out, rest, mids, th, sg, sc)
        idx, j_lo, j_hi = idx[merged], j_lo[merged], j_hi[merged]
        if idx.numel() == 0:
            return
    padded = layout.padded  # cell k's edges: padded[k], padded[k + 1]
    th_i, sg_i, sc_i = th[idx].unsqueeze(-1), sg[idx].unsqueeze(-1), sc[idx].unsqueeze(-1)
    # the exact cells below R: edges padded[0..j_lo] (the last is A), then A repeated (empty cells)
    lo_rows = torch.minimum(torch.arange(int(j_lo.max()) + 1, device=th.device), j_lo.unsqueeze(-1))
    # the exact cells above R: B repeated, then edges padded[j_hi + 1 .. n + 1] (B first)
    width = int((n + 1 - j_hi).max())
    hi_rows = torch.maximum(torch.arange(n + 2 - width, n + 2, device=th.device), (j_hi + 1).unsqueeze(-1))
    below = moments_from_alpha((padded[lo_rows] * sc_i - th_i) / sg_i)
    above = moments_from_alpha((padded[hi_rows] * sc_i - th_i) / sg_i)
    a = ((padded[j_lo] * sc_i.squeeze(-1)) - th_i.squeeze(-1)) / sg_i.squeeze(-1)
    b = ((padded[j_hi + 1] * sc_i.squeeze(-1)) - th_i.squeeze(-1)) / sg_i.squeeze(-1)
    pa, pb = _pdf(a), _pdf(b)
    qa, qb = _tails(a), _tails(b)
    prob = torch.where(a > 0, qa - qb, torch.where(b <= 0, qb - qa, 1.0 - qa - qb)).clamp_min(0.0)
    i2 = prob - (b * pb - a * pa)  # int_a^b u^2 phi
    i4 = 3.0 * prob - ((b**3 + 3.0 * b) * pb - (a**3 + 3.0 * a) * pa)  # int_a^b u^4 phi
    tv = torch.where((a >= 0) | (b <= 0), (pa - pb).abs(), 2.0 * _INV_SQRT_2PI - pa - pb)
    kappa, mean_abs, m4, coverage = out
    kappa[idx] = (below.kappa + above.kappa + i2).clamp(0.0, 1.0)
    mean_abs[idx] = (below.mean_abs + above.mean_abs + tv).clamp(0.0, SQRT_2_OVER_PI)
    m4[idx] = below.m4 + above.m4 + i4
    coverage[idx] = below.coverage + above.coverage + prob


# ------------------------------------------------------------------ float-format fast path
# A float format is fine (cells much narrower than sigma) over a core around 0 that may hold
# most of its values (the subnormals and the small binades), while its cells grow
# geometrically away from 0. Summing every cell of that core costs hundreds of erfc/exp per
# weight (float8 e4m3 has 253 values; a weight whose sd spans the whole table summed 514
# edges). The core is instead summed in closed form: per cell of width w and centre c (sd
# units), exactly
#     p mu^2 = int_cell u^2 phi - phi(c) [w^3/12 - w^5 (c^2 + 9)/1440
#                                         + w^7 (17 c^4 + 94 c^2 + 135)/483840
#                                         - w^9 (47 c^6 + 433 c^4 + 943 c^2 + 525)/58060800] + O(w^11)
#     p mu^4 = int_cell u^4 phi - phi(c) [w^3 c^2/2 - w^5 (c^4 + 21 c^2 - 3)/240
#                                         + w^7 (51 c^6 + 482 c^4 + 1755 c^2 - 270)/241920
#                                         - w^9 (47 c^8/9676800 + 2279 c^6/29030400 + 47 c^4/151200
#                                                + 7 c^2/18432 - 1/18432)] + O(w^11)
# (series of diff^2/p and diff^4/p^3 in w, derived with sympy; the w^9 terms as in runs.py). The
# integrals telescope over the core into one closed form; the w^3 .. w^9 sums over the core's
# cells are sums of a smooth function against the discrete measures sum_k W_k^(3,5,7,9) delta(C_k)
# of the table (W, C in units of the core's largest |C|, zmax): a Gaussian quadrature rule of Q
# nodes for the W^3 measure (interpolatory weights on the same nodes for W^5, W^7, W^9) reduces
# each to Q exp evaluations, Q the fewest nodes of _CORE_RULES whose span covers the core's
# extent in sd units (r zmax). Valid while every core cell is <= _CORE_MAX_STEP sd wide and the
# core lies within _CORE_MAX_SPAN sd of 0 (Taylor remainder of the rules); measured against the
# exact sums over every value (tests/test_fp8_core_rules.py, tests/test_float_grid_fast.py):
# kappa <= 1e-13, m4 <= 1.1e-11. The spans per node count keep the quadrature's share below
# ~1e-12 (float8 e4m3, the whole table as core, 20,000 weights: 4 nodes 2e-13 up to 0.3 sd,
# 6 nodes 3e-14 to 0.6, 8 nodes 6e-13 to 0.9, 10 nodes 5e-14 to 1.2, 12 nodes 5e-13 to 1.5,
# 16 nodes 4e-13 to 2.0). Cells up to 0.2 sd: at 0.3 sd the series left float8 e5m2's m4 off by
# 5.8e-10 (its cells are a quarter binade). Cells outside the core and within 8.5 sd are summed
# exactly (a few dozen at most), and mean_abs telescopes exactly: sum_k |phi(a_k) - phi(b_k)| =
# 2 max(phi(l), phi(u)) over the own cell (l, u).
# Quadrature rules (nodes Q, largest span in sd units): an element uses the fewest nodes whose
# span covers its core's (``r * zmax``); the last rule's span is the core's limit.
_CORE_RULES = ((4, 0.25), (6, 0.6), (8, 0.8), (10, 1.2), (12, 1.5), (16, 2.0))
_CORE_NODES = _CORE_RULES[-1][0]
_CORE_MAX_STEP = 0.2  # sd units
_CORE_MAX_SPAN = _CORE_RULES[-1][1]  # sd units
# Powers of the cell width in the per-cell series (w^3, w^5, w^7, w^9) and the coefficients
# _CORE_COEF[k, l, col]: the weight of phi(c) c^2k times w^(_CORE_ORDERS[l]) in output column
# col (kappa columns 0..L-1, m4 columns L..2L-1): minus the series of p mu^2 and p mu^4 above
# (the w^9 terms of runs.py's docstring).
_CORE_ORDERS = (3, 5, 7, 9)
_CORE_POWERS = 5  # phi c^2k for k = 0..4


def _core_coefficients() -> np.ndarray:
    nl = len(_CORE_ORDERS)
    coef = np.zeros((_CORE_POWERS, nl, 2 * nl))
    k2 = {3: {0: 1.0 / 12.0},
          5: {1: -1.0 / 1440.0, 0: -9.0 / 1440.0},
          7: {2: 17.0 / 483840.0, 1: 94.0 / 483840.0, 0: 135.0 / 483840.0},
          9: {3: -47.0 / 58060800.0, 2: -433.0 / 58060800.0, 1: -943.0 / 58060800.0, 0: -525.0 / 58060800.0}}
    k4 = {3: {1: 0.5},
          5: {2: -1.0 / 240.0, 1: -21.0 / 240.0, 0: 3.0 / 240.0},
          7: {3: 51.0 / 241920.0, 2: 482.0 / 241920.0, 1: 1755.0 / 241920.0, 0: -270.0 / 241920.0},
          9: {4: -47.0 / 9676800.0, 3: -2279.0 / 29030400.0, 2: -47.0 / 151200.0, 1: -7.0 / 18432.0,
              0: 1.0 / 18432.0}}
    for col0, series in ((0, k2), (nl, k4)):
        for li, order in enumerate(_CORE_ORDERS):
            for k, v in series[order].items():
                coef[k, li, col0 + li] = -v  # p mu^2k = int u^2k phi - phi(c) g(c)
    return coef


_CORE_COEF = _core_coefficients()
# The core path is taken when the exact window would need more edges each side than this.
_CORE_MIN_NEED = 8
# ... and when its side windows are at least this many edges narrower than the exact window.
_CORE_MIN_SAVING = 6
# Elements per block of the closed-form core's kernel (edge-major rows; measured on the 1e5
# MLP's float8 chunks: 2,048 -> 70 ms, 16,384 -> 38 ms, 65,536 -> 68 ms per 65,536 elements).
_CORE_BLOCK = 1 << 14
_ZERO = torch.zeros((), dtype=torch.float64)
# Groups (:func:`_groups`) up to which one scan per group is cheaper than one sort.
_SCAN_GROUPS = 8
# Run counts of the closed-form run path's groups (runs past an element's last add exactly 0).
# Up to 32 where the windowed paths are the alternative; up to 128 (_WIDE_RUN_BUCKETS, pf30)
# for the elements that would otherwise be summed over every edge of the table
# (:func:`_whole_table_sums`): an sd wider than a 16-bit table's top binades reaches every run
# of it (float16: ~80) and the exact sums took all of its 63k edges (the 1e7 MLP's fp16 draws
# around weights of sd 2-3e4: ~7% of its first scoring call). Measured against those exact sums
# (tests/test_float_runs.py): kappa within 2.1e-12, m4 within 5.4e-11, the error growing where
# the table lies beyond ~3 sd of the weight.
_RUN_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_WIDE_RUN_BUCKETS = _RUN_BUCKETS + (48, 64, 96, 128)
# ... where the runs of cells at most this many sd wide are one closed-form region (tb37: an sd of
# 2e4 on float16 leaves 73 of its 117 runs below 1e-6 sd): kappa off the exact cells by at most
# WIDE_RUN_MERGE_SD^2 / 4 = 2.5e-13 (from above), m4 by 2e-12, below the runs' own 2.1e-12 /
# 5.4e-11 (_run_path). 0: every run summed apart, as before
WIDE_RUN_MERGE_SD = 1e-6
# Side widths (edges) of the closed-form core's groups: steps of ~25% (the padding to a bucket
# is computed for nothing; the earlier buckets (1, 2, 3, 4, 6, 10, 18, 32, ...) padded a weight needing
# 19 edges to 32, on both sides).
_SIDE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128,
                 160, 192, 224, 256, 320, 384, 448, _MAX_WINDOW)
# Name of the path, as the self-check warnings print it.
FLOAT_PATH = "the float-format fast path (closed-form core, exact outer cells)"


def _gauss_rule(t: np.ndarray, w: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian quadrature of ``q`` nodes for the discrete measure ``sum_k w_k delta(t_k)``
    (``t`` in ``[-1, 1]``): discretized Stieltjes recurrence, then Golub-Welsch."""
    p_prev, p = np.zeros_like(t), np.ones_like(t)
    alpha, beta, norm_prev = [], [], 1.0
    for k in range(q):
        norm = float(np.sum(w * p * p))
        alpha.append(float(np.sum(w * t * p * p)) / norm)
        beta.append(norm if k == 0 else norm / norm_prev)
        p_prev, p = p, (t - alpha[-1]) * p - (0.0 if k == 0 else beta[-1]) * p_prev
        norm_prev = norm
    off = np.sqrt(beta[1:])
    nodes, vecs = np.linalg.eigh(np.diag(alpha) + np.diag(off, 1) + np.diag(off, -1))
    return nodes, beta[0] * vecs[0] ** 2


class _CoreRules:
    """Closed-form cores of one value table (units of the scale): core ``j`` holds the finite
    cells whose centre lies within ``zmax * 2^-j`` of 0 (while that is at least ``2 Q`` cells);
    ``rmax[j]`` (increasing in ``j``) is the largest ``scale / sigma`` for which it is valid.
    Quadrature rules are computed on first use of each core."""

    def __init__(self, values: Tensor, device: torch.device) -> None:
        v = values.detach().to("cpu", torch.float64).numpy()
        mids = 0.5 * (v[1:] + v[:-1])
        self._W, self._C = mids[1:] - mids[:-1], 0.5 * (mids[1:] + mids[:-1])  # cells 1..V-2
        self.device = device
        self.values = values.detach().to(device=device, dtype=torch.float64).clone()
        self.mids = torch.as_tensor(mids, dtype=torch.float64, device=device)
        lo, hi, rmax, zmax_all = [], [], [], []
        absc = np.abs(self._C)
        if absc.size >= 2 * _CORE_NODES:
            z = float(absc.max())
            while True:
                inside = np.nonzero(absc <= z)[0]
                if inside.size < 2 * _CORE_NODES:
                    break
                a, b = int(inside[0]), int(inside[-1])  # cells a..b: edges mids[a], mids[b + 1]
                if not lo or (lo[-1], hi[-1]) != (a, b + 1):
                    zmax = float(absc[a : b + 1].max())
                    lo.append(a)
                    hi.append(b + 1)
                    zmax_all.append(zmax)
                    rmax.append(min(_CORE_MAX_STEP / float(self._W[a : b + 1].max()), _CORE_MAX_SPAN / zmax))
                z *= 0.5
        self.lo = torch.tensor(lo, dtype=torch.long, device=device)
        self.hi = torch.tensor(hi, dtype=torch.long, device=device)
        self.rmax = torch.tensor(rmax, dtype=torch.float64, device=device)
        self.zmax = torch.tensor(zmax_all, dtype=torch.float64, device=device)  # [J] largest |centre|
        # per core j and rule i of _CORE_RULES (node count Q_i): its nodes (units of the scale)
        # nodes[j * NR + i] ([Q_i]) and the node weights contracted with the series'
        # coefficients combined[j * NR + i] ([5 Q_i, 2 L]): rows (power k, node q) weighting
        # exp(g) g^k with g = -c^2 / 2 (phi(c) c^2k = (-2)^k exp(g) g^k / sqrt(2 pi): the
        # kernel's form), columns (kappa, m4) x (w^3, w^5, w^7, w^9)
        self.nodes: list[Tensor | None] = [None] * (len(lo) * len(_CORE_RULES))
        self.combined: list[Tensor | None] = [None] * (len(lo) * len(_CORE_RULES))
        self._ready = np.zeros(len(lo), dtype=bool)

    def prepare(self, used: Tensor) -> None:
        """Compute the quadrature rules of the cores ``used`` (indices; those between their
        least and largest) not computed yet."""
        if used.numel() == 0 or self._ready.all():
            return
        coef = _CORE_COEF * ((-2.0) ** np.arange(_CORE_POWERS) * _INV_SQRT_2PI)[:, None, None]
        for j in range(int(used.min()), int(used.max()) + 1):
            if self._ready[j]:
                continue
            a, b = int(self.lo[j]), int(self.hi[j])
            zmax = float(self.zmax[j])
            # widths and centres in units of zmax (W^9 of bfloat16's 1e36-wide cells overflows
            # in the scale's units); the kernel multiplies by (r zmax)^p instead of r^p
            Wc, t = self._W[a:b] / zmax, self._C[a:b] / zmax
            # the discrete moments sum_k w_k^p t_k^n every rule reads (each rule reads a prefix in
            # n): formed once per core from powers formed once (the same arrays and sums as one
            # expression per rule and power: bitwise equal; 168 -> 48 sums per core)
            tn = [t**n for n in range(_CORE_NODES)]
            mom = {p: [np.sum(wp * tk) for tk in tn] for p, wp in ((p, Wc**p) for p in _CORE_ORDERS[1:])}
            w3c = Wc**3
            for i, (q, _) in enumerate(_CORE_RULES):
                x, w3 = _gauss_rule(t, w3c, q)
                vand = np.vander(x, q, increasing=True).T
                ws = [w3] + [np.linalg.solve(vand, np.array(mom[p][:q])) for p in _CORE_ORDERS[1:]]
                W = np.stack(ws)  # [L, Q]
                self.nodes[j * len(_CORE_RULES) + i] = torch.as_tensor(x * zmax, dtype=torch.float64,
                                                                       device=self.device)
                self.combined[j * len(_CORE_RULES) + i] = torch.as_tensor(
                    np.einsum("klc,lq->kqc", coef, W).reshape(_CORE_POWERS * q, -1), dtype=torch.float64,
                    device=self.device)
            self._ready[j] = True


_RULES: dict[tuple[int, int, str], _CoreRules] = {}


def _core_rules(values: Tensor, device: torch.device) -> _CoreRules:
    """The cores of ``values`` (cached per table and device)."""
    return per_table(_RULES, values, device, _CoreRules)


def _tails(alpha: Tensor) -> Tensor:
    """``P(N(0, 1) beyond |alpha|)``: the smaller tail (no cancellation in either)."""
    return torch.special.ndtr(-alpha.abs())


def _cell_terms(lo: Tensor, hi: Tensor, p_lo: Tensor, p_hi: Tensor, q_lo: Tensor, q_hi: Tensor
                ) -> tuple[Tensor, Tensor]:
    """``p mu^2`` and ``p mu^4`` of the cells ``(lo, hi)`` (standardised edges ``[c]`` each,
    ``+-inf`` allowed) from their edges' densities ``p_*`` and smaller tails ``q_*``: the terms
    of :func:`~mis_lightning.functional.cells.cell_terms` (same arithmetic), one cell per row."""
    prob = torch.where(lo > 0, q_lo - q_hi, torch.where(hi <= 0, q_hi - q_lo, 1.0 - q_lo - q_hi)).clamp_min_(0.0)
    diff = p_lo - p_hi
    live = prob > _TINY_PROB
    ratio = torch.where(live, torch.maximum(torch.minimum(diff / torch.where(live, prob, 1.0), hi), lo), 0.0)
    sq = diff * ratio
    return sq, sq * ratio * ratio


def _outer_cell_terms(e: Tensor, p: Tensor, t: Tensor, below: bool) -> tuple[Tensor, Tensor]:
    """``p mu^2`` and ``p mu^4`` of the unbounded cell below (``below``) or above the
    standardised edge ``e`` (``[c]``; ``p`` its density, ``t`` its smaller tail): the terms of
    :func:`_cell_terms` with one finite edge (diff ``-phi`` or ``+phi``, the mean kept inside
    the cell)."""
    prob = torch.where(e > 0, 1.0 - t, t) if below else torch.where(e > 0, t, 1.0 - t)
    live = prob > _TINY_PROB
    diff = -p if below else p
    ratio = diff / torch.where(live, prob, 1.0)
    ratio = torch.where(live, torch.minimum(ratio, e) if below else torch.maximum(ratio, e), 0.0)
    sq = diff * ratio
    return sq, sq * ratio * ratio


def _core_side_kernel(u0: Tensor, r: Tensor, e_lo: Tensor, e_hi: Tensor, nodes: Tensor, combined: Tensor,
                      zmax: float = 1.0, kappa_only: bool = False) -> tuple[Tensor, Tensor | None]:
    """``kappa`` and ``m4`` (``[c]`` each) of elements whose cells are one closed-form core plus
    exact cells each side (``M`` below, ``N`` above).

    Args:
        u0, r: ``[c]`` ``-theta / sigma`` and ``scale / sigma`` (a table value ``v`` sits at
            ``u0 + r v`` in sd units).
        e_lo: ``[M, c]`` the lower side's edges (units of the scale), farthest first, the last
            the core's lower edge (``-inf`` past the table's end); the cell below the first is
            unbounded.
        e_hi: ``[N, c]`` the upper side's edges, the first the core's upper edge (``+inf`` past
            the end); the cell above the last is unbounded.
        nodes, combined: the core's quadrature nodes ``[Q]`` (units of the scale) and contracted
            weights ``[5 Q, 8]`` (:class:`_CoreRules`; widths in units of ``zmax``).
        zmax: the core's largest ``|centre|`` (units of the scale).
        kappa_only: ``m4`` is not formed (``None``); ``kappa`` bitwise the same.

    Edge-major (the edges as ``[M + N, c]`` rows, the quadrature as ``[5 Q, c]`` rows and one
    ``[8, 5 Q] x [5 Q, c]`` product): every operation runs over contiguous rows of the block
    and the op count does not grow with ``M`` or ``N`` (the element-major ``[c, M + 1]`` cell sums and
    ``[c, 4 Q]`` products spent most of their time in concatenations and reductions over a
    short last axis: 92 -> 38 ms per 65,536 float8 elements of the 1e5 MLP)."""
    m, n = e_lo.shape[0], e_lo.shape[0] + e_hi.shape[0]
    # standardised edges, densities and smaller tails of both sides at once: rows 0..m-1 the
    # lower side (the core's lower edge a last), rows m..n-1 the upper (b first)
    alpha = torch.addcmul(u0, r, torch.cat([e_lo, e_hi]))  # [n, c]
    pdf, tail = _pdf(alpha), _tails(alpha)
    # the core (a, b): int_a^b u^2 phi and u^4 phi, then the w^3, w^5, w^7 corrections
    a, b, pa, pb, qa, qb = alpha[m - 1], alpha[m], pdf[m - 1], pdf[m], tail[m - 1], tail[m]
    P = torch.where(a > 0, qa - qb, torch.where(b <= 0, qb - qa, 1.0 - qa - qb)).clamp_min(0.0)
    ua = torch.where(torch.isfinite(a), a, 0.0)
    ub = torch.where(torch.isfinite(b), b, 0.0)
    kappa = P - (ub * pb - ua * pa)
    m4 = None if kappa_only else 3.0 * P - ((ub**3 + 3.0 * ub) * pb - (ua**3 + 3.0 * ua) * pa)
    # per node c = u0 + r x_q the powers exp(g) g^k, g = -c^2 / 2, k = 0..3 (rows k Q + q),
    # contracted with the node weights times the series' coefficients (their -2^k / sqrt(2 pi)
    # included: six passes over [Q, c])
    q, c = nodes.numel(), u0.numel()
    kp = combined.shape[0] // q
    powers = torch.empty(kp, q, c, dtype=torch.float64, device=u0.device)
    cq = torch.addcmul(u0, nodes.unsqueeze(-1), r)  # [Q, c]
    g = torch.addcmul(_ZERO, cq, cq, value=-0.5)
    torch.exp(g, out=powers[0])
    for k in range(1, kp):
        torch.mul(powers[k - 1], g, out=powers[k])
    F = combined.T @ powers.view(kp * q, c)  # [2 L, c]: (kappa, m4) x (w^3, w^5, ...)
    rz = r * zmax  # the rules' widths are in units of zmax
    r2 = rz * rz
    nl = F.shape[0] // 2
    fk, f4 = F[nl - 1], F[2 * nl - 1]
    for i in range(nl - 2, -1, -1):
        fk = torch.addcmul(F[i], r2, fk)
        if m4 is not None:
            f4 = torch.addcmul(F[nl + i], r2, f4)
    r3 = r2 * rz
    kappa += r3 * fk
    if m4 is not None:
        m4 += r3 * f4
    # the side cells, exactly: between consecutive edges of each side (row slices)...
    for lo, hi in ((slice(0, m - 1), slice(1, m)), (slice(m, n - 1), slice(m + 1, n))):
        if hi.stop > hi.start:
            t2, t4 = _cell_terms(alpha[lo], alpha[hi], pdf[lo], pdf[hi], tail[lo], tail[hi])
            kappa += column_sums(t2)
            if m4 is not None:
                m4 += column_sums(t4)
    # ...and the unbounded outer ones, (-inf, alpha[0]) and (alpha[-1], inf)
    for row, below in ((0, True), (n - 1, False)):
        t2, t4 = _outer_cell_terms(alpha[row], pdf[row], tail[row], below)
        kappa += t2
        if m4 is not None:
            m4 += t4
    return kappa.clamp_(0.0, 1.0), m4


def _groups(key: Tensor) -> list[tuple[int, Tensor]]:
    """``[(k, positions with key k), ...]`` for the keys present (small non-negative ints), each
    group's positions increasing: one scan per group when at most ``_SCAN_GROUPS`` are present,
    else one stable sort (2^18 keys: ~16 ms, ~1 ms per scan)."""
    counts = torch.bincount(key)
    present = torch.nonzero(counts).squeeze(-1).tolist()
    if len(present) == 1:
        return [(present[0], torch.arange(key.numel(), device=key.device))]
    if len(present) <= _SCAN_GROUPS:
        return [(k, torch.nonzero(key == k).squeeze(-1)) for k in present]
    order = torch.argsort(key, stable=True)
    ends = torch.cumsum(counts, 0).tolist()
    return [(k, order[ends[k] - int(counts[k]) : ends[k]]) for k in present]


def _core_side_moments(kappa: Tensor, m4: Tensor, idx: Tensor, core: Tensor, rule: Tensor, lo_e: Tensor,
                       hi_e: Tensor, need_lo: Tensor, need_hi: Tensor, rules: _CoreRules, th: Tensor, sg: Tensor,
                       sc: Tensor, kappa_only: bool = False) -> None:
    """``kappa`` and ``m4`` (written at ``idx``) of the elements ``idx`` whose cells are core
    ``core`` (``[r]``, indices into ``rules``), summed with at least quadrature rule ``rule``
    (``[r]``, indices into ``_CORE_RULES``: each group takes its elements' largest, so that the
    rule does not split the groups) plus exact cells out to ``need_lo`` / ``need_hi``
    finite edges each side of the core's edges ``mids[lo_e]``, ``mids[hi_e]`` (then the
    unbounded cell; edges past the table's ends are empty cells). Grouped by core and by each
    side's width bucketed in ``_SIDE_BUCKETS``, in blocks of ``_CORE_BLOCK`` elements
    (cache-sized working set). ``kappa_only``: ``m4`` is NaN there (not formed)."""
    mids = rules.mids
    n = mids.numel()
    zmax = rules.zmax.tolist()
    sizes = torch.tensor(_SIDE_BUCKETS, device=th.device)
    # one group per core and pair of side widths, each bucketed (edges past ``need`` lie
    # beyond 8.5 sd: < 1e-15 of kappa); the two sides apart (a weight far from 0 needs many
    # edges on the side away from the core and one towards it)
    b_lo, b_hi = torch.bucketize(need_lo, sizes), torch.bucketize(need_hi, sizes)
    nb = len(_SIDE_BUCKETS)
    key = (core * nb + b_lo) * nb + b_hi
    # idx holding every element (sorted, unique) is arange(c): no gathers; one group is
    # arange(r): each block a slice (same numbers, no index tensors of the chunk's size)
    full = idx.numel() == th.numel()
    u0, r = (-th / sg, sc / sg) if full else (-th[idx] / sg[idx], sc[idx] / sg[idx])
    groups = _groups(key)
    for kv, group in groups:
        jv, rest = divmod(kv, nb * nb)
        m_lo, m_hi = _SIDE_BUCKETS[rest // nb], _SIDE_BUCKETS[rest % nb]
        jq = jv * len(_CORE_RULES) + int(rule[group].max())
        off_lo = torch.arange(m_lo, device=th.device).unsqueeze(-1)
        off_hi = torch.arange(m_hi, device=th.device).unsqueeze(-1)
        block = max(1024, min(_CORE_BLOCK, (1 << 18) // (m_lo + m_hi + 2)))
        for s in range(0, group.numel(), block):
            g = slice(s, s + block) if len(groups) == 1 else group[s : s + block]
            el = lo_e[g] - (m_lo - 1) + off_lo  # [m_lo, r]: farthest first, the core's edge last
            eh = hi_e[g] + off_hi  # [m_hi, r]: the core's edge first
            e_lo = torch.where(el < 0, -math.inf, mids[el.clamp(0, n - 1)])
            e_hi = torch.where(eh >= n, math.inf, mids[eh.clamp(0, n - 1)])
            k, m4g = _core_side_kernel(u0[g], r[g], e_lo, e_hi, rules.nodes[jq], rules.combined[jq],  # type: ignore[arg-type]
                                       zmax[jv], kappa_only)
            if m4g is None:
                m4g = torch.full_like(k, math.nan)
            if full and len(groups) == 1:
                kappa[g], m4[g] = k, m4g
            else:
                dst = idx[g]
                kappa.index_copy_(0, dst, k)
                m4.index_copy_(0, dst, m4g)


def _run_path(out: tuple[Tensor, Tensor, Tensor, Tensor], cand: Tensor, cell_lo: Tensor, cell_hi: Tensor,
              own: tuple[Tensor, Tensor], need: Tensor, values: Tensor, th: Tensor, sg: Tensor, sc: Tensor,
              buckets: tuple[int, ...] = _RUN_BUCKETS, kappa_only: bool = False, merge_sd: float = 0.0) -> Tensor:
    """Moments (written into ``out`` = ``(kappa, mean_abs, m4, coverage)``) of the elements
    ``cand`` whose cells within 8.5 sd are all in runs of equal cells no wider than
    ``RUN_MAX_STEP`` sd (:mod:`~mis_lightning.functional.runs`), and the mask ``[c]`` of
    those done. ``cell_lo`` / ``cell_hi``: the value cells of each element's 8.5-sd reach;
    ``own``: its own cell's edges (parameter units). Taken only where the runs are fewer than
    half the exact window's edges (``need`` each side), at most ``buckets[-1]`` runs (the groups'
    run counts: :data:`_RUN_BUCKETS`, or :data:`_WIDE_RUN_BUCKETS` instead of whole-table sums).
    ``kappa_only``: their ``m4`` is NaN (not formed; ``kappa`` bitwise the same). ``merge_sd``
    (> 0): the runs whose cells are at most ``merge_sd`` sd wide (on a table whose run steps fall
    then rise, :func:`_run_valley`: one range of runs around 0) are one region of step 0, its
    contribution ``int u^2 phi`` (``int u^4 phi``), off the exact cells' by at most
    ``merge_sd^2 / 4`` in kappa (from above) and ``2 merge_sd^2`` in m4 (Popoviciu, as
    :func:`_merged_table_sums`); elements with fewer than two such runs are as without it."""
    kappa, mean_abs, m4, coverage = out
    done = torch.zeros_like(cand)
    rt = run_table(values, th.device)
    last = rt.run_of.numel() - 1  # the top (unbounded) cell; 0 is the bottom one
    if last < 2 or not bool(cand.any()):
        return done
    ii = torch.nonzero(cand).squeeze(-1)
    lo_c, hi_c = cell_lo[ii], cell_hi[ii]
    r0 = rt.run_of[lo_c.clamp(1, last - 1)]
    r1 = rt.run_of[hi_c.clamp(1, last - 1)]
    nr = r1 - r0 + 1
    ok = (nr <= buckets[-1]) & (2 * nr < need[ii])
    if not bool(ok.any()):
        return done
    if not bool(ok.all()):
        keep = torch.nonzero(ok).squeeze(-1)  # one scan, not one per boolean mask
        ii, lo_c, hi_c, r0, r1, nr = (t[keep] for t in (ii, lo_c, hi_c, r0, r1, nr))
    u0, r = -th[ii] / sg[ii], sc[ii] / sg[ii]
    # merged runs (merge_sd): runs ma..mb of each element (none where shift is 0) become its run
    # ma - r0 of step 0; the runs after it are shifted down by shift = mb - ma
    ma = shift = None
    valley = _run_valley(rt) if merge_sd > 0.0 else None
    if valley is not None:
        v_m, dec, inc = valley
        t = merge_sd * sg[ii] / sc[ii]  # the widest merged step, units of the scale
        ma = torch.maximum(v_m - torch.searchsorted(dec, t, right=True) + 1, r0)
        mb = torch.minimum(v_m + torch.searchsorted(inc, t, right=True) - 1, r1)
        shift = (mb - ma).clamp_min(0)
        nr = nr - shift
    bucket = torch.bucketize(nr, torch.tensor(buckets, device=th.device))
    for bv in torch.unique(bucket).tolist():
        m = buckets[bv]
        group = torch.nonzero(bucket == bv).squeeze(-1)
        off = torch.arange(m + 1, device=th.device).unsqueeze(-1)
        block = max(1024, min(_CORE_BLOCK, (1 << 18) // (4 * m + 4)))
        for s in range(0, group.numel(), block):
            g = group[s : s + block]
            # runs past r1 repeat its top edge: zero-width runs, which add exactly 0
            if shift is None:
                u = torch.addcmul(u0[g], r[g], rt.edges[torch.minimum(r0[g] + off, r1[g] + 1)])  # [m + 1, b]
                h = rt.steps[torch.minimum(r0[g] + off[:-1], r1[g])] * r[g]  # [m, b] sd units
            else:
                rel = off - (ma[g] - r0[g])  # run / edge index relative to the merged run
                idx = r0[g] + off + torch.where(rel > 0, shift[g], 0)
                u = torch.addcmul(u0[g], r[g], rt.edges[torch.minimum(idx, r1[g] + 1)])
                h = rt.steps[torch.minimum(idx[:-1], r1[g])] * r[g]
                h = torch.where((rel[:-1] == 0) & (shift[g] > 0), 0.0, h)
            fine = h.amax(0) <= RUN_MAX_STEP
            if not bool(fine.any()):
                continue
            k2, k4, p = run_moments(u, h, kappa_only)
            # the unbounded outer cells, where within reach
            for e, end, below in ((u[0], lo_c[g] == 0, True), (u[-1], hi_c[g] == last, False)):
                if bool(end.any()):
                    tail = _tails(e)
                    t2, t4 = _outer_cell_terms(e, _pdf(e), tail, below)
                    prob = torch.where(e > 0, 1.0 - tail, tail) if below else torch.where(e > 0, tail, 1.0 - tail)
                    zero = torch.zeros_like(t2)
                    k2 = k2 + torch.where(end, t2, zero)
                    if k4 is not None:
                        k4 = k4 + torch.where(end, t4, zero)
                    p = p + torch.where(end, prob, zero)
            sel = ii[g[fine]]
            kappa[sel], coverage[sel] = k2[fine].clamp(0.0, 1.0), p[fine]
            m4[sel] = math.nan if k4 is None else k4[fine]
            done[sel] = True
    if bool(done.any()):
        lower, upper = (own[0][done] - th[done]) / sg[done], (own[1][done] - th[done]) / sg[done]
        mean_abs[done] = own_cell_mean_abs(lower, upper)
    return done


def _run_valley(rt: RunTable) -> tuple[int, Tensor, Tensor] | None:
    """``(m, dec, inc)`` when the run steps of ``rt`` fall to run ``m`` and rise after it (float
    formats): ``dec`` the steps of runs ``m, m - 1, .., 0`` and ``inc`` those of ``m, ..``, each
    non-decreasing; ``None`` otherwise. Cached on the run table."""
    if not hasattr(rt, "_valley"):
        w = rt.steps
        out = None
        if w.numel() >= 2:
            m = int(torch.argmin(w))
            dec, inc = w[: m + 1].flip(0).contiguous(), w[m:].contiguous()
            if bool((dec[1:] >= dec[:-1]).all()) and bool((inc[1:] >= inc[:-1]).all()):
                out = (m, dec, inc)
        rt._valley = out  # type: ignore[attr-defined]
    return rt._valley  # type: ignore[attr-defined]


# _exact_windows standardises each edge as the reference does, ``(edge * scale - theta) / sd``: the
# difference first. False: ``u0 + r * edge`` with ``u0 = -theta / sd``, ``r = scale / sd`` (one
# fused pass, but off by ~|theta / sd| * 2^-52 in sd units: kappa 0 or NaN for an sd-0 weight on a
# cell edge, where theta / sd overflows or rounds apart from r * edge; ~1e-3 at |theta / sd| ~ 1e13; tie48)
EXACT_EDGE_OFFSETS = True


def _exact_windows(out: tuple[Tensor, Tensor, Tensor, Tensor], idx: Tensor, cell: Tensor, cell_lo: Tensor,
                   cell_hi: Tensor, mids: Tensor, th: Tensor, sg: Tensor, sc: Tensor) -> None:
    """Exact cell sums (written into ``out`` at ``idx``) over every cell within 8.5 sd: from
    each element's own cell (value index ``cell``) down to the cell ``cell_lo`` and up to
    ``cell_hi`` holding the ends of its reach, plus the two unbounded cells beyond (edges past
    the table's ends are empty cells). Edge-major, each side's width bucketed apart in
    ``_SIDE_BUCKETS`` (the windowed sums of the reference pad both sides to the wider one's
    bucket of ``_TABLE_BUCKETS``, element-major: ~2x the work); the same cell terms as
    :func:`~mis_lightning.functional.cells.cell_terms`, on edges standardised as the reference's,
    ``(edge * scale - theta) / sd`` (:data:`EXACT_EDGE_OFFSETS`: exact at an edge, 0, however
    large ``|theta| / sd``). ``mean_abs`` telescopes over the partition to ``2 max(phi(l), phi(u))``
    of the own cell ``(l, u)``; the coverage is the partition's, 1."""
    kappa, mean_abs, m4, coverage = out
    n = mids.numel()
    sizes = torch.tensor(_SIDE_BUCKETS, device=th.device)
    c0 = cell[idx]
    b_lo = torch.bucketize((c0 - cell_lo[idx] + 1).clamp(min=1), sizes)
    b_hi = torch.bucketize((cell_hi[idx] - c0 + 1).clamp(min=1), sizes)
    nb = len(_SIDE_BUCKETS)
    key = b_lo * nb + b_hi
    exact = EXACT_EDGE_OFFSETS
    if exact:
        ths, sgs, scs = th[idx], sg[idx], sc[idx]
    else:
        u0, r = -th[idx] / sg[idx], sc[idx] / sg[idx]
    for kv, group in _groups(key):
        m_lo, m_hi = _SIDE_BUCKETS[kv // nb], _SIDE_BUCKETS[kv % nb]
        # rows: the lower side farthest first (its last row the own cell's lower edge
        # mids[cell - 1]), then the upper side (its first row the own upper edge mids[cell])
        off = torch.cat([torch.arange(-m_lo, 0), torch.arange(0, m_hi)]).to(th.device).unsqueeze(-1)
        block = max(1024, min(_CORE_BLOCK, (1 << 18) // (m_lo + m_hi + 2)))
        for s in range(0, group.numel(), block):
            g = group[s : s + block]
            e = c0[g] + off  # [m_lo + m_hi, b] indices into mids
            edges = torch.where(e < 0, -math.inf, torch.where(e >= n, math.inf, mids[e.clamp(0, n - 1)]))
            if exact:  # the reference's (edge * scale - theta) / sd, in place (edges is new)
                alpha = edges.mul_(scs[g]).sub_(ths[g]).div_(sgs[g])
            else:
                alpha = torch.addcmul(u0[g], r[g], edges)
            pdf, tail = _pdf(alpha), _tails(alpha)
            t2, t4 = _cell_terms(alpha[:-1], alpha[1:], pdf[:-1], pdf[1:], tail[:-1], tail[1:])
            k, f = column_sums(t2), column_sums(t4)
            for row, below in ((0, True), (-1, False)):
                o2, o4 = _outer_cell_terms(alpha[row], pdf[row], tail[row], below)
                k += o2
                f += o4
            sel = idx[g]
            kappa[sel], m4[sel] = k.clamp_(0.0, 1.0), f
            mean_abs[sel] = (2.0 * torch.maximum(pdf[m_lo - 1], pdf[m_lo])).clamp(0.0, SQRT_2_OVER_PI)
            coverage[sel] = 1.0


# Calls below this many elements skip the float8 interpolation table (its build at first use,
# 0.1-1.2 s per octave of sd, costs more than their exact sums at 3e4-4e5 elements/s)
INTERP_MIN_ELEMENTS = 1 << 15
# ... and an octave of sd not built yet is built only for at least this many of a call's
# elements (the others sum exactly): vf22 measured a 116k-weight model building 33 octaves
# (9.9 s) for 323 interpolated weights, assess 4.6 -> 13.3 s. An octave serves every later call
# (main, draws, pool, other schemes: ~10 evaluations per weight), so it pays from a few
# thousand elements on.
OCTAVE_MIN_ELEMENTS = 1 << 12


# The table path's float64 inputs without a copy of sigma where it is float64 and already at or
# above the floor (its least value, one read, instead of clamp_min's new tensor: the fast path and
# the sums below it each floored the call's sigma again; the same values, p49c). The table path
# writes no sigma in place. False: kernel._float64_inputs
SD_FLOOR_BY_MIN = True


def _table_inputs(theta: Tensor, sigma: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
    """:func:`~.kernel._float64_inputs` (``theta``, ``sigma`` floored at the smallest positive
    float64, the grid tensors, float64), with ``sigma`` itself where it is float64 and its least
    value is at the floor or above (NaN: floored as there) (:data:`SD_FLOOR_BY_MIN`)."""
    if SD_FLOOR_BY_MIN and sigma.dtype == torch.float64 and sigma.numel() \
            and (_extremes(sigma)[0] if REACH_FROM_EXTREMES else float(sigma.amin())) >= torch.finfo(torch.float64).tiny:
        return (theta.to(torch.float64), sigma, *(t.to(torch.float64) for t in rest))
    return _float64_inputs(theta, sigma, *rest)


# The settle at scale 1 (_settled_unit) tests every element's 8.5-sd reach against [-T, T] and the
# finite cells' ends from the call's extremes where they prove it for every element: rounding is
# monotone, so each fl(theta - fl(8.5 sd)) is at most fl(max theta - fl(8.5 min sd)), each
# fl(fl(8.5 sd) + theta) at least fl(fl(8.5 min sd) + min theta) (and likewise the other two ends);
# where those four scalars pass, every element's reach does, and the block's four reductions and
# its three reach passes are skipped (its own-cell width test stays: per format). The extremes of
# a tensor are kept while it is unchanged (the last few tensors: the bf16 and fp16 calls on a chunk,
# main and pool, read the same theta and sd tensors; _table_inputs' least sd reads them too). The
# same numbers and mask: where the scalars do not prove it, the per-block test as before; calls of
# one block (the draws', the second layer's live weights) keep it (p51d).
# False: the per-block reach and reductions, _table_inputs' own amin
REACH_FROM_EXTREMES = True
_EXTREMES: list[tuple[weakref.ref, int, tuple[float, float]]] = []
_EXTREMES_SLOTS = 4


def _extremes(t: Tensor) -> tuple[float, float]:
    """``(amin, amax)`` of a non-empty tensor as floats (NaN where it holds one), kept for the same
    tensor while its version counter is unchanged (the last :data:`_EXTREMES_SLOTS` tensors;
    inference tensors, without a counter, are not kept)."""
    ver = tensor_version(t)
    if ver is not None:
        for ref, v, ext in _EXTREMES:
            if ref() is t and v == ver:
                return ext
    ext = (float(t.amin()), float(t.amax()))
    if ver is not None:
        _EXTREMES.insert(0, (weakref.ref(t), ver, ext))
        del _EXTREMES[_EXTREMES_SLOTS:]
    return ext


def _reach_settles(th: Tensor, sg: Tensor, layout: TableLayout) -> bool:
    """Whether every element's reach ``[theta - 8.5 sd, theta + 8.5 sd]``, formed as
    :func:`_settled_unit` forms it (float64, scale 1), covers ``[-T, T]`` (``T = layout.wide``) and
    stays within ``[layout.lo_edge, layout.hi_edge)``, proven from the extremes of ``th`` and ``sg``
    (``[c]`` float64, non-empty; :data:`REACH_FROM_EXTREMES`). ``False`` where they do not prove it
    (some element may still pass: the caller then tests each)."""
    wide = layout.wide
    if wide is None:
        return False
    t0, t1 = _extremes(th)
    s0, s1 = _extremes(sg)
    r0, r1 = s0 * CUTOFF_SIGMAS, s1 * CUTOFF_SIGMAS  # (Python floats: IEEE double, as torch's element-wise)
    # (NaN anywhere: every comparison fails)
    return t1 - r0 <= -wide and r0 + t0 >= wide and t0 - r1 >= layout.lo_edge and r1 + t1 < layout.hi_edge


def _table_fast_moments(theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor,
                        interpolate: bool = True, min_build: int = 0,
                        call_elements: int | None = None, kappa_only: bool = False) -> tuple[CellMoments, Tensor]:
    """The fast path of :func:`table_cell_moments` and the mask ``[c]`` of its closed-form or
    interpolated elements: for a symmetric float8 table (on the CPU), elements neither frozen
    nor beyond the table whose own cell is at most ``MAX_OWN_STEP`` sd wide (the unbounded top
    cell: its span up to the largest value) and whose sd lies
    in the interpolation table's range read ``kappa`` and ``m4`` from it
    (:mod:`~mis_lightning.functional.interp`; ``mean_abs`` telescoped exactly); the others, and
    every element of other tables, go through :func:`_table_sum_moments`. ``call_elements``: the
    size of the call the elements stand for (:func:`table_cell_moments`' ``path_elements``);
    ``kappa_only``: as there (:func:`_table_sum_moments`)."""
    th, sg, sc = _table_inputs(theta, sigma, scale)
    it = interp_table(values) if interpolate and th.device.type == "cpu" else None
    if it is None or th.numel() == 0:
        return _table_sum_moments(th, sg, values, sc, kappa_only)
    tab, k, ma, f = it.moments(th / sc, sg / sc, min_build=min_build, call_elements=call_elements)
    if not bool(tab.any()):
        return _table_sum_moments(th, sg, values, sc, kappa_only)
    if bool(tab.all()):
        return CellMoments(kappa=k, mean_abs=ma, m4=f, coverage=torch.ones_like(k)), tab
    rest = torch.nonzero(~tab).squeeze(-1)
    out, closed = _table_sum_moments(th[rest], sg[rest], values, sc[rest], kappa_only)
    k[rest], ma[rest], f[rest] = out.kappa, out.mean_abs, out.m4
    coverage = torch.ones_like(th)
    coverage[rest] = out.coverage
    mask = tab.clone()
    mask[rest] = closed
    return CellMoments(kappa=k, mean_abs=ma, m4=f, coverage=coverage), mask


def _sum_prelude(th: Tensor, sg: Tensor, sc: Tensor, layout: TableLayout) -> tuple[Tensor, ...]:
    """Per element (``[c]`` each, float64 parameter units): the value cells of ``theta`` and of
    the ends of its 8.5-sd reach, the edges each side it needs, its own cell's edges, whether it
    is frozen, its own cell's width in sd and whether the fine-grid expansion serves it (the
    regimes of :func:`_table_sum_moments`). Element-wise (:func:`~.kernel.in_blocks`)."""
    mids = layout.mids
    n = mids.numel()
    x = th / sc
    reach = CUTOFF_SIGMAS * sg / sc
    cell = layout.cells(x)  # torch.searchsorted(mids, ., right=True), from the bits
    cell_lo = layout.cells(x - reach)
    cell_hi = layout.cells(x + reach)
    need = torch.maximum(cell - cell_lo, cell_hi - cell) + 1
    inf = torch.full_like(th, math.inf)
    own_lo = torch.where(cell >= 1, mids[(cell - 1).clamp(0, max(n - 1, 0))] * sc, -inf)
    own_hi = torch.where(cell < n, mids[cell.clamp(max=max(n - 1, 0))] * sc, inf)
    frozen = ((th - own_lo) / sg > CUTOFF_SIGMAS) & ((own_hi - th) / sg > CUTOFF_SIGMAS)
    h_local = (own_hi - own_lo) / sg
    changes = layout.changes
    inner = (cell_lo >= 1) & (cell_hi <= n - 1)
    a = (cell_lo - 1).clamp(0, max(changes.numel() - 1, 0))
    b = (cell_hi - 1).clamp(0, max(changes.numel() - 1, 0))
    uniform = inner & (changes[b] == changes[a])
    # the expansion beyond _MAX_WINDOW edges only while the reach stays within the finite cells: it
    # knows nothing of the unbounded cells beyond the table's top (fp16 past 65504 with an sd of 3e4
    # or more: kappa 1 where the cells give 0.997 .. 0.637)
    fine = ~frozen & (h_local <= FINE_STEP) & inner & (uniform | (need > _MAX_WINDOW))
    # ... where it does not, a reach covering [-T, T] (_settled's) takes _open_fine_moments
    if layout.wide is None or not OPEN_CELLS_CLOSED_FORM:
        spill = torch.zeros_like(fine)
    else:
        spill = ~frozen & (h_local <= FINE_STEP) & ~inner & (x - reach <= -layout.wide) & (x + reach >= layout.wide)
    return cell, cell_lo, cell_hi, need, own_lo, own_hi, frozen, h_local, fine, spill


# The bf16 / fp16 casts' own cells (scale 1) from the weight's cast to the format: its bit pattern
# picks a candidate cell from two 64k-row tables (TableLayout.pattern_cells), kept where the weight
# lies in it (lo <= theta < hi: then it is searchsorted's cell, the cells being disjoint), located
# by TableLayout.cells otherwise (a cast rounding to the neighbour through float32, NaN): ~8
# element-wise passes instead of ~18; the same edges bit for bit (p49c). False: TableLayout.cells
OWN_CELLS_BY_BITS = True


def _own_facts(th: Tensor, sc: Tensor, layout: TableLayout, unit: bool = False) -> tuple[Tensor, Tensor]:
    """What :func:`_settled` reads that does not depend on the sd: the own cell's lower and upper
    edges (``[c]`` each, parameter units; ``-inf`` / ``inf`` at the unbounded end cells).
    ``unit``: every ``sc`` is 1 (the caller's check): a 16-bit format's table then takes the bit
    route (:data:`OWN_CELLS_BY_BITS`), the same numbers."""
    tabs = layout.pattern_cells() if unit and OWN_CELLS_BY_BITS and th.device.type == "cpu" else None
    if tabs is not None:
        dt = layout.format_dtype
        assert dt is not None
        p = th.to(dt).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
        own_lo, own_hi = tabs[0].index_select(0, p), tabs[1].index_select(0, p)
        ok = (own_lo <= th).logical_and_(th < own_hi)
        if not all_set(ok):  # (the others located as below: padded[cell] * 1 is padded[cell])
            ii = torch.nonzero(~ok).squeeze(-1)
            lo_i, hi_i = _own_facts(th.index_select(0, ii), sc.index_select(0, ii), layout)
            own_lo.index_copy_(0, ii, lo_i)
            own_hi.index_copy_(0, ii, hi_i)
        return own_lo, own_hi
    cell = layout.cells(th / sc)  # in 0..n: the own cell's edges are padded[cell], padded[cell + 1]
    # (-inf * sc and inf * sc are what _sum_prelude's where() gives at the ends, sc > 0)
    own_lo = layout.padded.index_select(0, cell).mul_(sc)
    own_hi = layout.padded.index_select(0, cell.add_(1)).mul_(sc)
    return own_lo, own_hi


def _settled_from(th: Tensor, sg: Tensor, sc: Tensor, own_lo: Tensor, own_hi: Tensor, layout: TableLayout,
                  kappa_only: bool = False) -> tuple[Tensor, ...]:
    """:func:`_settled` given :func:`_own_facts` (the same operations on the same values)."""
    x = th / sc
    reach = CUTOFF_SIGMAS * sg / sc
    frozen = ((th - own_lo) / sg > CUTOFF_SIGMAS) & ((own_hi - th) / sg > CUTOFF_SIGMAS)
    h_local = (own_hi - own_lo) / sg
    wide = layout.wide
    if wide is None:  # fewer edges than a reach can need (float8): frozen elements only
        fine, spill = torch.zeros_like(frozen), None
    else:
        # ... and within the finite cells (_sum_prelude's inner: the fine expansion ignores the
        # unbounded ones beyond the table's ends)
        lo_r, hi_r = x - reach, x + reach
        span = ~frozen & (h_local <= FINE_STEP) & (lo_r <= -wide) & (hi_r >= wide)
        # past the finite cells (not _sum_prelude's inner); a block with none keeps span as is
        out = (lo_r < layout.lo_edge).logical_or_(hi_r >= layout.hi_edge)
        spill = span & out if bool(out.any()) else None
        fine = span if spill is None else span & ~out
    # fine_grid_moments(h_local), its operations (bitwise), in place; frozen elements 0
    h2 = h_local**2
    kappa = (1.0 - h2 / 12.0).add_(h2 * h2 / 144.0).masked_fill_(frozen, 0.0)
    m4 = None
    if not kappa_only:
        mean_abs = (own_cell_mean_abs((own_lo - th) / sg, (own_hi - th) / sg) if _kernel.EXACT_FINE_MEAN_ABS
                    else SQRT_2_OVER_PI - 0.05 * h2).masked_fill_(frozen, 0.0)
        m4 = _kernel.fine_m4(h2).masked_fill_(frozen, 0.0)
    if wide is not None and spill is not None and OPEN_CELLS_CLOSED_FORM and bool(spill.any()):
        # the reach passes the table's ends: the unbounded cells too (_open_fine_moments)
        _open_fine_into(kappa, m4, spill, th, sg, sc, h2, layout)
        fine = fine | spill
    if kappa_only:
        return kappa, frozen | fine
    return kappa, mean_abs, m4, frozen | fine


# The settling pass at scale 1 (the bf16 / fp16 casts) in fewer element-wise passes, the same numbers
# and mask bit for bit (p49c): the frozen test only where an own cell is wider than FINE_STEP sd
# (a fine one is never frozen: both distances to its edges are at most its width), x = theta and
# reach = 8.5 sd (dividing by a scale of 1 is exact), and the mask from four reductions where every
# element of the block is fine with its reach within the table's finite cells (~12 passes
# instead of ~33). False: _settled_from
SETTLE_UNIT_FEWER_PASSES = True


def _settled_unit(th: Tensor, sg: Tensor, sc: Tensor, own_lo: Tensor, own_hi: Tensor, layout: TableLayout,
                  kappa_only: bool = False, out: Tensor | None = None, reach_ok: bool = False) -> tuple[Tensor, ...]:
    """:func:`_settled_from` where every ``sc`` is 1 and the table reaches ``layout.wide`` (a 16-bit
    cast's): the same ``kappa`` (``mean_abs``, ``m4``) on the elements of the mask, the same mask
    (``[c]`` each, float64 / bool); the others hold garbage, as there. ``out`` (kappa-only calls,
    :data:`UNIT_KAPPA_INTO`): ``kappa`` is written into it (``[c]`` float64, returned) and the mask
    is ``None`` where every element is settled (no mask formed). ``reach_ok``: every element's reach
    is known to settle (:func:`_reach_settles` on the call): only the widths are tested."""
    wide = layout.wide
    assert wide is not None
    assert out is None or kappa_only
    # _settled_from's arithmetic, in place where it allocated (1 - a is -a + 1, b + a is a + b:
    # the same roundings)
    h_local = torch.sub(own_hi, own_lo).div_(sg)
    h2 = h_local**2
    kappa = torch.div(h2, 12.0, out=out) if out is not None else torch.div(h2, 12.0)
    kappa.neg_().add_(1.0).add_(torch.mul(h2, h2).div_(144.0))
    m4 = None
    if not kappa_only:
        # (fx49's exact own-cell form where the switch is on, as _settled_from)
        mean_abs = (own_cell_mean_abs((own_lo - th) / sg, (own_hi - th) / sg) if _kernel.EXACT_FINE_MEAN_ABS
                    else torch.mul(h2, 0.05).neg_().add_(SQRT_2_OVER_PI))
        m4 = torch.mul(h2, 0.5).neg_().add_(3.0)
        if _kernel.FINE_M4_H4:  # (kernel.fine_m4's operations, in its order)
            m4.add_(torch.mul(h2, h2).mul_(_kernel._M4_H4))
    # (reach_ok: the four reach tests below are known to pass; the widths' test decides alone)
    fine_all = bool(th.numel()) and float(h_local.amax()) <= FINE_STEP if reach_ok else None
    if not fine_all:
        reach = torch.mul(sg, CUTOFF_SIGMAS)  # (/ sc: exact at 1)
        lo_r, hi_r = torch.sub(th, reach), reach.add_(th)
    # (NaN in any: a reduction fails, the masks below; amin / amax: aminmax was slower)
    if fine_all or (fine_all is None and th.numel() and float(h_local.amax()) <= FINE_STEP
                    and float(lo_r.amax()) <= -wide and float(hi_r.amin()) >= wide
                    and float(lo_r.amin()) >= layout.lo_edge and float(hi_r.amax()) < layout.hi_edge):
        if out is not None:
            return kappa, None
        done = torch.ones_like(th, dtype=torch.bool)  # every element fine, none frozen or past the ends
    else:
        fine_h = h_local <= FINE_STEP
        frozen = None
        if not all_set(fine_h):  # (the frozen test; fine elements are never frozen)
            frozen = ((th - own_lo) / sg > CUTOFF_SIGMAS) & ((own_hi - th) / sg > CUTOFF_SIGMAS)
            kappa.masked_fill_(frozen, 0.0)
            if m4 is not None:
                mean_abs.masked_fill_(frozen, 0.0)
                m4.masked_fill_(frozen, 0.0)
        span = fine_h.logical_and_(lo_r <= -wide).logical_and_(hi_r >= wide)
        beyond = (lo_r < layout.lo_edge).logical_or_(hi_r >= layout.hi_edge)  # reach past the finite cells
        if any_set(beyond):
            spill = span & beyond
            done = span.logical_and_(beyond.logical_not_())
            if OPEN_CELLS_CLOSED_FORM and any_set(spill):
                _open_fine_into(kappa, m4, spill, th, sg, sc, h2, layout)
                done.logical_or_(spill)
        else:
            done = span
        if frozen is not None:
            done.logical_or_(frozen)
    if kappa_only:
        return kappa, done
    return kappa, mean_abs, m4, done


def settled_drift_bound(theta: Tensor, sigma: Tensor, reach: Tensor, k_main: Tensor, values: Tensor) -> Tensor:
    """``[c]`` float64: an upper bound on ``|kappa(p) - k_main|`` over every position ``p`` in
    ``[theta - reach * sigma, theta + reach * sigma]`` at sd ``sigma`` (``[c]`` each, float64,
    parameter units, scale 1), ``kappa`` what :func:`table_cell_moments` gives on the 16-bit cast
    table ``values`` (bf16 / fp16 cells); ``inf`` where some position may leave the settled fine
    regime, or the table is not a 16-bit format's. The bootstrap draws' shortcut of the casts
    (``assess.CAST_DRAWS_BOUNDED``; method.md section 5, "The bootstrap draws").

    Where every position's 8.5-sd reach covers ``[-T, T]`` (``T = layout.wide``) and stays within
    the finite cells (``[lo_edge, hi_edge)``) and its own cell is at most ``FINE_STEP`` sd wide,
    the settle (:func:`_settled_unit`, :func:`_settled_from`) gives ``kappa = 1 - h^2/12 + h^4/144``
    with ``h`` the position's own cell width in sd, so ``0 <= 1 - kappa <= h^2 / 12`` (``h^2 <=
    12``). A float format's cell widths never fall with ``|p|``, so every ``h`` is at most
    ``h_R``, the own cell's width at ``R = |theta| + reach * sigma`` (and at ``-R``), and
    ``|kappa(p) - k_main| <= max(h_R^2 / 12, 1 - k_main)`` for any ``k_main`` in ``[0, 1]``
    (the main pass's value, however it was formed). Float64 rounding (~1e-16 in kappa, an ulp
    of a position) is covered by ``_DRIFT_SLACK`` on ``R`` and on the reach tests and
    ``_DRIFT_ROUNDING`` on the bound."""
    layout = table_layout(values, theta.device)
    inf = torch.full_like(theta, math.inf)
    if layout.wide is None or layout.format_dtype not in (torch.float16, torch.bfloat16) or theta.numel() == 0:
        return inf
    th, sg, x = theta.to(torch.float64), sigma.to(torch.float64), reach.to(torch.float64)
    big = th.abs() + (x + CUTOFF_SIGMAS) * sg
    slack = big * _DRIFT_SLACK
    # every position's reach: lo_r = p - 8.5 sd <= -T, hi_r >= T, lo_r >= lo_edge, hi_r < hi_edge
    ok = (th + (x - CUTOFF_SIGMAS) * sg + slack <= -layout.wide) & (th - (x - CUTOFF_SIGMAS) * sg - slack >= layout.wide)
    ok &= (th - (x + CUTOFF_SIGMAS) * sg - slack >= layout.lo_edge) & (th + (x + CUTOFF_SIGMAS) * sg + slack < layout.hi_edge)
    ok &= (sg > 0) & (k_main >= 0) & (k_main <= 1)
    r = (th.abs() + x * sg) * (1.0 + _DRIFT_SLACK)
    ones = torch.ones_like(r)
    lo_p, hi_p = _own_facts(r, ones, layout)
    lo_m, hi_m = _own_facts(-r, ones, layout)
    h = torch.maximum(hi_p - lo_p, hi_m - lo_m) / sg
    ok &= h <= FINE_STEP
    bound = torch.maximum(h * h / 12.0, 1.0 - k_main) + _DRIFT_ROUNDING
    return torch.where(ok, bound, inf)


_DRIFT_SLACK = 1e-12  # relative, on positions and reaches: far above float64's rounding of th + sd * xi
_DRIFT_ROUNDING = 1e-15  # absolute, on kappa: the polynomial's float64 rounding (a few ulp of 1)


# The fine elements whose reach covers [-T, T] and passes the table's finite cells (the fp16 cast's
# table: into its overflow cells beyond +-65520; sds of ~4e3 and more) take _open_fine_moments (kappa within the
# fine expansion's own error of the exact cell sums, ~1e-7). False: the exact paths (closed-form
# core, wide runs: within 1e-11, but ~5 us an element: the 1e7 MLP's fp16 scoring +4 s)
OPEN_CELLS_CLOSED_FORM = True


def _open_ends(th: Tensor, sg: Tensor, sc: Tensor, layout: TableLayout) -> tuple[Tensor, ...]:
    """What the closed forms beyond a table's finite cells (:func:`_open_fine_moments`,
    :func:`_open_overflow_kappa`) read of its two unbounded end cells, per element (``[c]``
    float64 inputs, parameter units): ``(prob, i2, f, pdf, p_end, ratio, sq)`` with ``prob`` the
    finite cells' probability ``P(a < U < b)``, ``i2 = int_a^b u^2 phi``, and per end cell (rows
    of ``[2, c]``: below ``a``, above ``b``) ``f`` the distance into its side of its edge, ``pdf``
    the density there, ``p_end`` its probability, ``ratio`` its ``|mu|`` and ``sq`` its ``p mu^2``."""
    # both ends as the rows of one [2, c] tensor (half the operations' launches): e = (a, b),
    # f = (-a, b) the distance into each end cell's side of its edge
    e = torch.stack([layout.lo_edge * sc - th, layout.hi_edge * sc - th]).div_(sg)
    f = torch.cat([e[:1].neg(), e[1:]])
    pdf, q = _pdf(e), _tails(e)
    a, b, qa, qb = e[0], e[1], q[0], q[1]
    prob = torch.where(a > 0, qa - qb, torch.where(b <= 0, qb - qa, 1.0 - qa - qb)).clamp_min_(0.0)
    # the end cells (P(U < a), P(U > b)): |mu| = phi / P, kept beyond the edge (_outer_cell_terms)
    p_end = torch.where(f > 0, q, 1.0 - q)
    live = p_end > _TINY_PROB
    ratio = torch.where(live, torch.maximum(pdf / torch.where(live, p_end, 1.0), f), 0.0)
    sq = pdf * ratio  # p mu^2 of each end cell
    i2 = prob - (f * pdf).sum(0)  # int_a^b u^2 phi
    return prob, i2, f, pdf, p_end, ratio, sq


def _open_fine_moments(th: Tensor, sg: Tensor, sc: Tensor, h2: Tensor, layout: TableLayout,
                       kappa_only: bool = False) -> tuple[Tensor, Tensor | None]:
    """``kappa`` and ``m4`` (``[c]`` each, float64) of fine elements (own cell ``sqrt(h2)`` sd
    wide, at most ``FINE_STEP``) whose 8.5-sd reach covers ``[-T, T]`` (:func:`_settled`) and
    passes the table's finite cells into an unbounded end cell (the fp16 cast's table,
    ``casts.cast_cell_values``: beyond +-65520, where the cast overflows to inf). Arguments ``[c]``, parameter units (``h2`` the own cell's squared width in
    sd). ``kappa_only``: ``m4`` is not formed (``None``; ``kappa`` bitwise the same).

    With ``a``, ``b`` the finite cells' ends (``layout.lo_edge``, ``layout.hi_edge``) in sd
    units, exactly ``kappa = int_a^b u^2 phi - sum_k p_k Var_k`` over the finite cells plus the
    two end cells' ``p mu^2`` (each cell's ``p mu^2 = int_cell u^2 phi - p Var``). The variances
    take the fine-grid expansion's local step, ``sum_k p_k Var_k = (h^2/12 - h^4/144) P(a, b)``;
    the end cells are exact (:func:`_outer_cell_terms`). ``m4 = int_a^b u^4 phi - (h^2/2)
    int_a^b u^2 phi`` plus the end cells' ``p mu^4`` (``E[u^4 | cell] - mu^4 ~ c^2 w^2 / 2``).
    Where the end cells hold nothing (``P(a, b) = 1``) this is the fine expansion; its error is
    the expansion's own, ``sum_k p_k (w_k^2 - h^2) / 12`` over the finite cells (``w_k`` their
    widths in sd): a float format's cells are at most its relative step (fp16 ``2^-10``) times
    their value wide, so ~``2^-20 E[(theta / sigma + u)^2] / 12`` (~1e-7; measured against the
    sums over every edge: tests/test_table_open_cells.py). Before it such elements took the
    expansion alone (kappa 1 where the cells give 0.637 at sd 1e8)."""
    prob, i2, f, pdf, p_end, ratio, sq = _open_ends(th, sg, sc, layout)
    kappa = (i2 - (h2 / 12.0 - h2 * h2 / 144.0) * prob + sq.sum(0)).clamp_(0.0, 1.0)
    if kappa_only:
        return kappa, None
    i4 = 3.0 * prob - ((f * f + 3.0) * f * pdf).sum(0)  # int_a^b u^4 phi
    m4 = i4 - 0.5 * h2 * i2 + (sq * ratio * ratio).sum(0)
    if _kernel.FINE_M4_H4:  # (the expansion's h^4 term over the finite cells, kernel.fine_m4)
        m4 = m4 + _kernel._M4_H4 * (h2 * h2) * prob
    return kappa, m4


def _open_fine_into(kappa: Tensor, m4: Tensor | None, sel: Tensor, th: Tensor, sg: Tensor, sc: Tensor,
                    h2: Tensor, layout: TableLayout) -> None:
    """:func:`_open_fine_moments` of the elements ``sel`` (``[c]`` bool) written into ``kappa``
    and ``m4`` (``None``: kappa alone), in place."""
    ii = torch.nonzero(sel).squeeze(-1)
    k, f = _open_fine_moments(th[ii], sg[ii], sc[ii], h2[ii], layout, m4 is None)
    kappa[ii] = k
    if m4 is not None and f is not None:
        m4[ii] = f


# A kappa-only call's elements the settling pass leaves (:func:`_table_sum_moments`) whose sd dwarfs
# every finite cell of a symmetric float table (the widest at most OVERFLOW_MAX_STEP sd: fp16 sds
# from 16,000 on; in practice bootstrap draws beyond +-65520, in the overflow cells, whose own cell
# is unbounded: 80k a call of the 1e7 MLP's fp16 draws, p47f) take :func:`_open_overflow_kappa`:
# the end cells exact and the finite cells' variances summed in closed form
# (:mod:`~mis_lightning.functional.cell_variance`, to O((w / sd)^6)): within 1e-15 of 40-digit sums
# over every cell, as the windowed path's runs it replaces (~1.5 us an element; p48a). False: the
# windowed path
OVERFLOW_CLOSED_FORM = True
OVERFLOW_MAX_STEP = 2e-3


def _open_overflow_kappa(th: Tensor, sg: Tensor, sc: Tensor, layout: TableLayout, vt: VarianceTable
                         ) -> tuple[Tensor, Tensor]:
    """``(kappa, coverage)`` (``[c]`` float64) of elements whose widest finite cell is at most
    ``OVERFLOW_MAX_STEP`` sd (the caller's selection; ``[c]`` float64 inputs, parameter units,
    sd finite and positive): ``kappa = int_a^b u^2 phi - V + the two end cells' p mu^2`` with ``a``,
    ``b`` the finite cells' ends in sd units, ``V`` their summed variance
    (:func:`~mis_lightning.functional.cell_variance.finite_cell_variance`, to ``O((w_max / sd)^6)``)."""
    prob, i2, f, pdf, p_end, ratio, sq = _open_ends(th, sg, sc, layout)
    v = finite_cell_variance(-th / sg, sc / sg, vt)
    return (i2 - v + sq.sum(0)).clamp_(0.0, 1.0), prob + p_end.sum(0)


def _overflow_split(th: Tensor, sg: Tensor, sc: Tensor, rest: Tensor, values: Tensor, layout: TableLayout
                    ) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(done [m] indices into the call, kappa [m], coverage [m])`` of the elements ``rest``
    (indices) that :func:`_open_overflow_kappa` serves (:data:`OVERFLOW_CLOSED_FORM`), or ``None``
    where none does (another table than a symmetric float format's, or no sd that wide)."""
    if layout.wide is None or layout.format_dtype is None:
        return None
    vt = variance_table(values, th.device)
    if not vt.ok:
        return None
    t, g, k = th.index_select(0, rest), sg.index_select(0, rest), sc.index_select(0, rest)
    r = k / g
    ok = (r * vt.w_max <= OVERFLOW_MAX_STEP) & (r > 0.0) & torch.isfinite(t) & (vt.edges[0] <= CORE_SPAN / r)
    if not bool(ok.any()):
        return None
    jj = torch.nonzero(ok).squeeze(-1)
    kappa, coverage = _open_overflow_kappa(t[jj], g[jj], k[jj], layout, vt)
    return rest.index_select(0, jj), kappa, coverage


def _settled(th: Tensor, sg: Tensor, sc: Tensor, layout: TableLayout, kappa_only: bool = False
             ) -> tuple[Tensor, ...]:
    """``kappa, mean_abs, m4`` (``[c]`` each) and the mask of the elements whose regime needs
    no more than their own cell: frozen (both own edges beyond 8.5 sd: 0) or fine (own cell at
    most ``FINE_STEP`` sd wide) with a reach ``[x - 8.5 sd, x + 8.5 sd]`` covering ``[-T, T]``
    (``layout.wide``: more than ``_MAX_WINDOW`` edges within reach, so :func:`_sum_prelude`'s
    ``fine``: the fine-grid expansion with the local step; tables with fewer edges, float8:
    frozen elements only, e.g. the dead units' weights, sd 0); where that reach passes the
    table's finite cells, the expansion with the end cells exact (:func:`_open_fine_moments`,
    the windowed path's ``spill``). The same operations as
    :func:`_sum_prelude` and :func:`~.kernel.fine_grid_moments` per element (bitwise); the
    others (mask False) hold garbage (not frozen: the expansion). Element-wise
    (:func:`~.kernel.in_blocks`). ``kappa_only``: ``kappa`` and the mask alone."""
    return _settled_from(th, sg, sc, *_own_facts(th, sc, layout), layout, kappa_only)


# The settling pass's sd-free facts (_own_facts) of the last full call on a table, per block, kept
# for the next kappa-only call on the same weights and scales (the pool protocol's, sd / sqrt 2:
# the same own cells; ParamGrid.moments gives both the same tensors), keyed by the tensors' identity
# and version counter (weak references: a new or modified tensor recomputes) and taken out by that
# call (held between the two only; sc33's page faults). One entry. False: recomputed every call
SHARE_OWN_CELLS = True
# ... kept by a kappa-only call too where it computed them (the joint pass's main call on a chunk
# no scheme reads m4 of, assess.MAIN_KAPPA_ONLY: the pool call after it then reads them; bf16 /
# fp16 on the 1e7 MLP's first layer, p47b). False: by full calls only
SHARE_OWN_CELLS_KAPPA_ONLY = True
_OWN_CELLS: list[tuple[tuple, list[tuple[Tensor, ...]]]] = []


def release_own_cells() -> None:
    """Free the own cells kept for the next kappa-only call (:data:`SHARE_OWN_CELLS`; the
    scoring pass calls it at its end)."""
    _OWN_CELLS.clear()


def _own_cells_key(th: Tensor, sc: Tensor, layout: TableLayout) -> tuple:
    return (weakref.ref(th), tensor_version(th), weakref.ref(sc), tensor_version(sc), id(layout), th.shape[0],
            _kernel.EAGER_BLOCK)


# the last scale tensor tested by _unit_scale: (weak reference, version counter, every value 1);
# a pool call reads its main call's (the same scale tensor: the chunk's grid, or the live gathers)
_UNIT_SCALE: list[tuple[weakref.ref, int, bool]] = []


def _unit_scale(sc: Tensor) -> bool:
    """Whether every value of ``sc`` (non-empty) is 1 (two reductions; kept for the same tensor
    while unchanged)."""
    if _UNIT_SCALE:
        ref, ver, unit = _UNIT_SCALE[0]
        if ver is not None and ref() is sc and ver == tensor_version(sc):
            return unit
    unit = float(sc.amin()) == 1.0 and float(sc.amax()) == 1.0
    _UNIT_SCALE[:] = [(weakref.ref(sc), tensor_version(sc), unit)]
    return unit


def _settled_blocks(th: Tensor, sg: Tensor, sc: Tensor, layout: TableLayout, kappa_only: bool,
                    into: bool = False) -> tuple[Tensor, ...]:
    """``in_blocks(_settled, (th, sg, sc), (layout,), kappa_only=kappa_only)`` (the same blocks,
    the same numbers), with the sd-free facts of each block kept by a full call and read by the
    next kappa-only call on the same tensors (:data:`SHARE_OWN_CELLS`). ``into`` (kappa-only
    calls, :data:`UNIT_KAPPA_INTO`): on the fewer-passes settle at scale 1 each block writes its
    ``kappa`` into one ``[c]`` tensor (no concatenation) and the mask is ``None`` where every
    element is settled (formed only from the first block that is not settled whole); elsewhere
    as without it."""
    facts = None
    if SHARE_OWN_CELLS and kappa_only and _OWN_CELLS:
        key, held = _OWN_CELLS.pop()
        k_th, v_th, k_sc, v_sc, lay, c, blk = key
        if v_th is not None and v_sc is not None and k_th() is th and v_th == tensor_version(th) and k_sc() is sc \
                and v_sc == tensor_version(sc) and lay == id(layout) \
                and c == th.shape[0] and blk == _kernel.EAGER_BLOCK:
            facts = held
    keep: list[tuple[Tensor, ...]] | None = [] if SHARE_OWN_CELLS and (
        not kappa_only or (SHARE_OWN_CELLS_KAPPA_ONLY and facts is None)) else None
    c, block = th.shape[0], _kernel.EAGER_BLOCK
    # every scale 1 (the bf16 / fp16 casts): the own cells' bit route and the fewer-passes settle
    unit = (OWN_CELLS_BY_BITS or SETTLE_UNIT_FEWER_PASSES) and layout.format_dtype is not None and c > 0 \
        and _unit_scale(sc)
    settle = _settled_unit if unit and SETTLE_UNIT_FEWER_PASSES and layout.wide is not None else _settled_from
    into = into and kappa_only and settle is _settled_unit
    # (every reach proven from the call's extremes: the blocks test their widths alone; calls of one
    # block keep their own test, which costs what the extremes would: the draws' and the live weights')
    reach_ok = REACH_FROM_EXTREMES and settle is _settled_unit and c > block and _reach_settles(th, sg, layout)
    kappa = torch.empty(c, dtype=torch.float64, device=th.device) if into else None
    done: Tensor | None = None
    parts = []
    for i, s in enumerate(range(0, c, block) if c > block else (0,)):
        sl = slice(s, s + block) if c > block else slice(None)
        t, g, k = th[sl], sg[sl], sc[sl]
        f = facts[i] if facts is not None else _own_facts(t, k, layout, unit)
        if keep is not None:
            keep.append(f)
        if kappa is None:
            parts.append(settle(t, g, k, *f, layout, kappa_only, reach_ok=True) if reach_ok
                         else settle(t, g, k, *f, layout, kappa_only))
            continue
        _, d = _settled_unit(t, g, k, *f, layout, True, out=kappa[sl], reach_ok=reach_ok)
        if d is not None:  # (the blocks before it were settled whole)
            if done is None:
                done = torch.ones(c, dtype=torch.bool, device=th.device)
            done[sl] = d
    if keep is not None:
        _OWN_CELLS[:] = [(_own_cells_key(th, sc, layout), keep)]
    if kappa is not None:
        return kappa, done
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(p) for p in zip(*parts))


# A kappa-only call at scale 1 on a 16-bit cast's table (the joint pass's main and pool calls and the
# draws of bf16 / fp16: every call of theirs on the 1e7 MLP) writes each block's kappa into one
# tensor (no per-block outputs joined by torch.cat) and, where every element is settled (a
# 2^18-weight chunk of the first layer: all of them), forms no mask and returns the fields nobody
# reads (mean_abs, m4: NaN; coverage 1; the closed-form mask: none) as one value expanded (stride
# 0, as ParamGrid._own_moments' KAPPA_ONLY_STANDINS), not four chunk-sized fills: kappa bitwise
# the same (p50a). False: the blocks' outputs joined, the fields filled
UNIT_KAPPA_INTO = True


# An sd-0 weight (sd floored to the same tiny value) lying exactly on an interior edge of the table
# at scale 1 (a float32 weight on an fp16 / bf16 midpoint: ~1 in 2^13 / 2^16 of them, ~30 / ~4 a
# 2^18-weight chunk of the 1e7 MLP's second layer) is no point mass; it was the only element of the
# windowed call of that chunk's main and pool calls (~0.7 ms a call for ~30 elements, p47f). Its moments
# are two half-normal cells with every other edge beyond ~1e290 sd (pdf and tails exactly 0): the same
# numbers for every such weight. They are the windowed path's own, taken from its call on the first
# such weight (per table, sd and kappa_only) and given to the others where a call's remaining
# elements are all such ties (bitwise: tests/test_table_ties.py). False: the windowed call
SD_FLOOR_TIES = True
# ... the ties' local geometries told apart by a dict over their rows (~30 a call) instead of
# torch.unique(dim=0) (about half of the ~0.27 ms a call, p48a); the same kinds and keys, each
# kind's first tie computing it as before (p49c). False: torch.unique
TIES_KINDS_BY_DICT = True
_TIES_MAX = 4096  # (a larger remainder is not mostly ties: the windowed call as before)
_TIE_MOMENTS: dict[tuple, tuple[float, float, float, float, bool]] = {}  # (bounded: a table's binades)


def _sd_floor_ties(th: Tensor, sg: Tensor, sc: Tensor, rest: Tensor, values: Tensor, layout: TableLayout,
                   kappa_only: bool) -> tuple[Tensor, ...] | None:
    """``(kappa, mean_abs, m4, coverage, closed)`` (``[r]`` each) of the elements ``rest`` (``[r]``
    indices into the float64 ``[c]`` inputs) when each is a tie (:data:`SD_FLOOR_TIES`: sd the same
    value in ``(0, tiny]``; scale 1; ``theta`` exactly its own cell's lower edge, both its cells
    finite), else ``None``. The numbers are :func:`_table_window_moments`' on one such element of
    the same local geometry (sign, binade, the two cells' widths, whether ``theta / sd``
    overflows; keyed so that no path's numbers are assumed alike across these: formerly the
    windowed path gave kappa 2/pi below ``|theta| ~ 4`` and 0 above at sd 2.2e-308; now 2/pi,
    the reference's, on each), cached per table, sd and ``kappa_only``."""
    t, g, k = th.index_select(0, rest), sg.index_select(0, rest), sc.index_select(0, rest)
    g0 = float(g[0])
    if not 0.0 < g0 <= torch.finfo(torch.float64).tiny or not bool((g == g0).all()) or not bool((k == 1.0).all()):
        return None
    own_lo, own_hi = _own_facts(t, k, layout, True)  # (every scale 1: checked above)
    # (lo_edge: the lowest edge, below which the cell is unbounded; own_hi finite: the upper cell bounded)
    if not bool(((t == own_lo) & (t > layout.lo_edge) & (own_hi < math.inf)).all()):
        return None
    below = layout.padded.index_select(0, layout.cells(t).sub_(1))
    geo = torch.stack([t.sign(), torch.frexp(t).exponent.to(t.dtype), own_hi - own_lo, own_lo - below,
                       (t / g0).isinf().to(t.dtype)], 1)
    if TIES_KINDS_BY_DICT:  # (the rows' distinct values in order of first appearance; the same keys)
        first: dict[tuple, int] = {}
        idx = [first.setdefault(tuple(row), len(first)) for row in geo.tolist()]
        kind_list, inv = list(first), torch.tensor(idx, dtype=torch.long, device=t.device)
    else:
        kinds, inv = torch.unique(geo, dim=0, return_inverse=True)
        kind_list = kinds.tolist()
    rows = []
    for r, kind in enumerate(kind_list):
        # (the paths switched off by a failed self-check in the key: the windowed path's numbers then)
        # (and the windowed path's own switch: an A/B of EXACT_EDGE_OFFSETS in one process read the
        # first setting's numbers for every tie; rv48)
        # (the layout's serial, never reused, not id(layout) + the table's address: a layout rebuilt
        # for a table changed in place, or another table at a freed one's address, could take a
        # freed layout's id and read its ties' numbers; keyed so before s51)
        key = (layout.serial, g0, kappa_only, frozenset(GUARD.disabled), EXACT_EDGE_OFFSETS, *kind)
        got = _TIE_MOMENTS.get(key)
        if got is None:
            i = int(torch.nonzero(inv == r)[0, 0])
            out, sub = _table_window_moments(t[i:i + 1], g[i:i + 1], values, k[i:i + 1], kappa_only)
            got = (float(out.kappa[0]), float(out.mean_abs[0]), float(out.m4[0]), float(out.coverage[0]), bool(sub[0]))
            _TIE_MOMENTS[key] = got
        rows.append(got)
    table = torch.tensor([r[:4] for r in rows], dtype=torch.float64, device=t.device).index_select(0, inv)
    closed = torch.tensor([r[4] for r in rows], dtype=torch.bool, device=t.device).index_select(0, inv)
    return (*table.unbind(1), closed)


# The sd-0 weights of a 16-bit cast at scale 1 that are not point masses (on or within the point-mass
# margin of an edge: ~45 a bf16, ~200 an fp16 2^18-weight chunk of the 1e7 MLP's second layer) get
# their moments without a table call (sd_zero_moments, called by ParamGrid._own_moments): frozen by
# the settle's own test (kappa 0), or ties whose moments _TIE_MOMENTS holds, keyed as _sd_floor_ties
# keys them but read by numpy on their few values (_ties_by_value). The table call then gets the live
# weights alone, which its settle takes whole (four reductions, not the element-wise masks; no
# nonzero, no ties' call). The same numbers bit for bit: an element's moments are its own whatever
# its call holds (the settle is element-wise, its spill and the windowed path see the same
# elements: fx49), and a tie's are the windowed path's on it alone either way. Anything else (a
# weight neither frozen nor a tie, NaN, a path disabled by a failed self-check, inference mode):
# None, the table call as before. False: the sd-0 weights in the table call (p51d's "Found")
SD_ZERO_APART = True
_TINY64 = torch.finfo(torch.float64).tiny
_FROZEN_SD0 = CUTOFF_SIGMAS * _TINY64  # (exact: 17 * 2^-1023)


def _ties_by_value(tv: np.ndarray, g0: float, values: Tensor, layout: TableLayout, kappa_only: bool
                   ) -> np.ndarray | None:
    """:func:`_sd_floor_ties`' ``kappa, mean_abs, m4, coverage`` (the rows of ``[4, r]`` float64) of the sd-0
    weights ``tv`` (``[r]`` float64, sd ``g0`` each, scale 1, a 16-bit cast's ``layout``), the same
    keys and numbers, their geometry read by numpy (the layout's ``padded`` edges around the cell
    ``searchsorted(mids, t, right=True)``); ``None`` where some weight is not a tie (its own cell's
    lower edge, above the lowest edge, its upper edge finite)."""
    mids, pad = layout.edges_numpy()
    cell = np.searchsorted(mids, tv, side="right")
    lo, hi, below = pad[cell], pad[cell + 1], pad[np.maximum(cell - 1, 0)]
    if not bool(np.all((tv == lo) & (tv > layout.lo_edge) & (hi < math.inf))):
        return None
    with np.errstate(over="ignore"):
        geo = zip(np.sign(tv).tolist(), np.frexp(tv)[1].astype(np.float64).tolist(), (hi - lo).tolist(),
                  (lo - below).tolist(), np.isinf(tv / g0).astype(np.float64).tolist())
    head = (layout.serial, g0, kappa_only, frozenset(GUARD.disabled), EXACT_EDGE_OFFSETS)
    rows = []
    for i, kind in enumerate(geo):
        key = (*head, *kind)
        got = _TIE_MOMENTS.get(key)
        if got is None:  # (the kind's first tie: as _sd_floor_ties computes it)
            one = torch.ones(1, dtype=torch.float64)
            out, sub = _table_window_moments(torch.tensor(tv[i:i + 1]), one * g0, values, one, kappa_only)
            got = (float(out.kappa[0]), float(out.mean_abs[0]), float(out.m4[0]), float(out.coverage[0]), bool(sub[0]))
            _TIE_MOMENTS[key] = got
        rows.append(got)
    return np.array([r[:4] for r in rows], dtype=np.float64).T


def sd_zero_moments(theta: Tensor, values: Tensor, kappa_only: bool = False) -> CellMoments | None:
    """The cell moments of sd-0 weights on a 16-bit cast's table at scale 1 without a table call
    (:data:`SD_ZERO_APART`): bitwise what :func:`table_cell_moments` gives them (sd 0, floored to
    float64's tiny; scale 1), whatever else its call holds.

    Args:
        theta: ``[z]`` the weights (parameter units; cast to float64).
        values: ``[V]`` the cast's sorted representable values (``casts.cast_cell_values``).
        kappa_only: as :func:`table_cell_moments` (a frozen weight's ``mean_abs`` and ``m4`` NaN).

    Returns:
        float64 :class:`CellMoments` ``[z]`` (rows of one ``[4, z]`` tensor: read them, never
        write them): frozen weights (both own edges beyond 8.5 sd, :func:`_settled_unit`'s test on
        :meth:`TableLayout.cells`' cell) ``kappa`` 0 (``mean_abs``, ``m4`` 0, ``coverage`` 1), ties
        (:func:`_sd_floor_ties`: a weight on its own cell's lower edge) their table's windowed
        moments; ``None`` where some weight is neither (NaN too), the table is not a 16-bit cast's, a
        table path is disabled (:data:`~.fastpath.GUARD`), under inference mode or off the CPU (the
        caller then gives them to :func:`table_cell_moments`)."""
    if not SD_ZERO_APART or theta.device.type != "cpu" or torch.is_inference_mode_enabled() \
            or theta.is_inference() or values.is_inference() or TABLE_PATH in GUARD.disabled \
            or FLOAT_PATH in GUARD.disabled:
        return None
    layout = table_layout(values, theta.device)
    if layout.wide is None or layout.format_dtype is None or torch.finfo(layout.format_dtype).bits != 16:
        return None
    # (a few weights a call: numpy's element-wise IEEE arithmetic on them, the same numbers as
    # torch's, without ~40 small torch operations)
    tv = theta.to(torch.float64).numpy()
    mids, pad = layout.edges_numpy()
    cell = np.searchsorted(mids, tv, side="right")  # TableLayout.cells (NaN: past the top)
    # the settle's frozen test: d / tiny > 8.5 is d > 8.5 tiny (d >= 0 scaled by a power of two:
    # exact, or inf where it overflows; NaN false either way: an infinite weight's inf - inf is NaN,
    # not frozen, quietly, as torch's)
    with np.errstate(invalid="ignore"):
        frozen = ((tv - pad[cell]) > _FROZEN_SD0) & ((pad[cell + 1] - tv) > _FROZEN_SD0)
    out = np.empty((4, tv.size))
    out[0], out[1:3], out[3] = 0.0, math.nan if kappa_only else 0.0, 1.0
    if not bool(frozen.all()):
        ti = np.flatnonzero(~frozen)
        tie = _ties_by_value(tv[ti], _TINY64, values, layout, kappa_only) if ti.size <= _TIES_MAX else None
        if tie is None:
            return None
        out[:, ti] = tie
    return CellMoments(*torch.from_numpy(out).unbind(0))


def _table_sum_moments(theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, kappa_only: bool = False
                       ) -> tuple[CellMoments, Tensor]:
    """The fast path of :func:`table_cell_moments` and the mask ``[c]`` of its closed-form
    elements. The elements that need no more than their own cell are settled first
    (:func:`_settled`: bf16 / fp16 weights whose sd spans 0, and frozen ones, e.g. sd 0: 97% of
    a float8 chunk of the 1e7 MLP's second layer); the others go through the windowed path
    (:func:`_table_window_moments`) as a subset, whose per-element values do not depend on
    which other elements it is given (its groups and blocks hold the same elements in the same
    order either way, and its sums over cells and runs add each element's terms in one order,
    :func:`~.cells.column_sums`): what the windowed path gives on the whole call, bitwise (formerly
    ~1 ulp apart beside other elements: 1.1e-16 on fp16 weights at sd 1.5e4). In a
    kappa-only call the elements whose sd dwarfs every finite cell take
    :func:`_open_overflow_kappa` (:data:`OVERFLOW_CLOSED_FORM`) before the windowed path, whatever
    else the call holds (a call with nothing settled too: tests/test_table_call_independence.py). ``kappa_only``: the settled elements' ``mean_abs`` and ``m4`` are NaN (not computed),
    and the windowed path's closed-form elements' ``m4`` (:func:`_run_path`,
    :func:`_core_side_moments`)."""
    th, sg, sc = _table_inputs(theta, sigma, scale)
    layout = table_layout(values, th.device)
    if th.numel() == 0:
        return _table_window_moments(th, sg, values, sc, kappa_only)
    if layout.wide is None and 2 * int((sg <= torch.finfo(torch.float64).tiny).sum()) < th.numel():
        # float8: only frozen elements can be settled; without many sd-0 weights (dead units)
        # the settling pass would cost more than it saves (a live 1e7 chunk: +8-18%)
        return _table_window_moments(th, sg, values, sc, kappa_only)
    if kappa_only:
        kappa, done = _settled_blocks(th, sg, sc, layout, True, UNIT_KAPPA_INTO)
        if done is None:  # every element settled (UNIT_KAPPA_INTO): the unread fields as one value expanded
            nan = torch.full((1,), math.nan, dtype=torch.float64, device=th.device).expand(th.shape[0])
            return (CellMoments(kappa=kappa, mean_abs=nan, m4=nan,
                                coverage=torch.ones(1, dtype=torch.float64, device=th.device).expand(th.shape[0])),
                    torch.zeros(1, dtype=torch.bool, device=th.device).expand(th.shape[0]))
        mean_abs, m4 = torch.full_like(kappa, math.nan), torch.full_like(kappa, math.nan)
    else:
        kappa, mean_abs, m4, done = _settled_blocks(th, sg, sc, layout, False)
    closed = torch.zeros_like(done)
    coverage = torch.ones_like(kappa)
    fewer = SETTLE_UNIT_FEWER_PASSES  # (the mask's reductions on its bytes: the same answers)
    if all_set(done) if fewer else bool(done.all()):
        return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage), closed
    # (a call with nothing settled still offers its elements to the ties and the overflow closed
    # form: an element takes the same path whatever else its call holds; before fx49 such a call
    # went to the windowed path whole: an fp16 draw beyond +-65520 took the windowed runs in a
    # kappa-only call of such draws alone and the closed form beside one settled weight, 5e-15 apart)
    rest = torch.nonzero(~done).squeeze(-1)
    if SD_FLOOR_TIES and rest.numel() <= _TIES_MAX:
        tie = _sd_floor_ties(th, sg, sc, rest, values, layout, kappa_only)
        if tie is not None:  # every element left is a tie: no windowed call
            kappa[rest], mean_abs[rest], m4[rest], coverage[rest], closed[rest] = tie
            return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage), closed
    if OVERFLOW_CLOSED_FORM and kappa_only:
        over = _overflow_split(th, sg, sc, rest, values, layout)
        if over is not None:  # (mean_abs and m4 NaN, as the settled elements' in a kappa-only call)
            ii, k_o, cov_o = over
            kappa[ii], coverage[ii], closed[ii] = k_o, cov_o, True
            mean_abs[ii], m4[ii] = math.nan, math.nan
            if ii.numel() == rest.numel():
                return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage), closed
            left = torch.ones(rest.numel(), dtype=torch.bool, device=rest.device)
            left[torch.searchsorted(rest, ii)] = False
            rest = rest[left]
    if rest.numel() == th.numel():  # nothing settled nor served: the windowed path on the call as given
        return _table_window_moments(th, sg, values, sc, kappa_only)
    out, sub = _table_window_moments(th[rest], sg[rest], values, sc[rest], kappa_only)
    kappa[rest], mean_abs[rest], m4[rest], coverage[rest] = out.kappa, out.mean_abs, out.m4, out.coverage
    closed[rest] = sub
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage), closed


def _table_window_moments(theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, kappa_only: bool = False
                          ) -> tuple[CellMoments, Tensor]:
    """The fast path of :func:`table_cell_moments` and the mask ``[c]`` of its closed-form
    elements. Same regimes as :func:`_table_cell_moments` (frozen; fine-grid expansion where
    the grid is fine and uniform within 8.5 sd, or where more than ``_MAX_WINDOW`` edges lie
    within 8.5 sd; otherwise exact sums), except that the exact sums of elements whose window
    holds more than ``_CORE_MIN_NEED`` edges each side and whose grid has a fine core
    around 0 (see the comment above ``_CORE_NODES``) sum that core in closed form, and that
    exact windows are as wide as the edges within 8.5 sd need (no 18-edge minimum).
    ``kappa_only``: the runs' and the core's ``m4`` are NaN (not formed; ``kappa`` bitwise the
    same: only ``kappa`` is read, :func:`table_cell_moments`)."""
    th, sg, sc = _float64_inputs(theta, sigma, scale)
    c = th.shape[0]
    dev = th.device
    layout = table_layout(values, dev)  # per table, not per call: O(V) (65k values for bf16/fp16)
    mids = layout.mids
    # the element-wise start on cache-sized blocks (integer and float arithmetic only: equal
    # bit for bit to one pass; 2^18-element chunks of temporaries cost 2-3x in memory traffic)
    cell, cell_lo, cell_hi, need, own_lo, own_hi, frozen, h_local, fine, spill = in_blocks(
        _sum_prelude, (th, sg, sc), (layout,))

    kappa = torch.zeros(c, dtype=torch.float64, device=dev)
    mean_abs, m4 = torch.zeros_like(kappa), torch.zeros_like(kappa)
    coverage = torch.ones_like(kappa)
    if bool(fine.any()):
        fm = fine_grid_moments(h_local[fine])
        kappa[fine], mean_abs[fine], m4[fine] = fm.kappa, fm.mean_abs, fm.m4
        if _kernel.EXACT_FINE_MEAN_ABS:
            mean_abs[fine] = own_cell_mean_abs((own_lo[fine] - th[fine]) / sg[fine], (own_hi[fine] - th[fine]) / sg[fine])
    if bool(spill.any()):
        # as _settled computes them: in its blocks, each block's elements gathered (the same
        # numbers whichever path an element takes)
        h2 = h_local**2
        mean_abs[spill] = (own_cell_mean_abs((own_lo[spill] - th[spill]) / sg[spill], (own_hi[spill] - th[spill]) / sg[spill])
                           if _kernel.EXACT_FINE_MEAN_ABS else SQRT_2_OVER_PI - 0.05 * h2[spill])
        block = _kernel.EAGER_BLOCK
        for s in range(0, c, block) if c > block else (0,):
            sl = slice(s, s + block) if c > block else slice(None)
            if bool(spill[sl].any()):
                _open_fine_into(kappa[sl], None if kappa_only else m4[sl], spill[sl], th[sl], sg[sl], sc[sl],
                                h2[sl], layout)
        if kappa_only:
            m4[spill] = math.nan
        fine = fine | spill
    rest = ~(frozen | fine)
    # runs of equal fine cells in closed form (well-determined weights: few binades within
    # reach, hundreds of cells), then the closed-form core (sds spanning the table's fine core).
    # Windows of more than _MAX_WINDOW edges keep the fine expansion with the local step above:
    # the reference does the same there, so the sampled self-check could not tell a more exact
    # value from a wrong one.
    runs = _run_path((kappa, mean_abs, m4, coverage), rest & (need > _CORE_MIN_NEED), cell_lo, cell_hi,
                     (own_lo, own_hi), need, values, th, sg, sc, _RUN_BUCKETS, kappa_only)
    rest &= ~runs
    core = torch.zeros_like(rest)
    wide = rest & (need > _CORE_MIN_NEED)
    if bool(wide.any()):
        rules = _core_rules(values, dev)
        ii = torch.nonzero(wide).squeeze(-1)
        every = ii.numel() == c  # every element (sds spanning the table): no gathers, they would copy

        def take(t: Tensor) -> Tensor:
            return t if every else t[ii]

        jj = torch.searchsorted(rules.rmax, take(sc) / take(sg))  # the largest valid core (rmax increasing)
        ok = jj < rules.rmax.numel()
        jc = jj.clamp(max=max(rules.rmax.numel() - 1, 0))
        lo_e, hi_e = rules.lo[jc], rules.hi[jc]
        # edges from the core outwards up to the first one beyond 8.5 sd (at least the core edge)
        need_lo = (lo_e - take(cell_lo) + 2).clamp(min=1)
        need_hi = (take(cell_hi) - hi_e + 1).clamp(min=1)
        # only where it saves work: the side windows plus the quadrature against the full window
        side = torch.maximum(need_lo, need_hi)
        ok &= (side + _CORE_MIN_SAVING < take(need)) & (side <= _MAX_WINDOW)
        if not bool(ok.all()):
            keep = torch.nonzero(ok).squeeze(-1)  # one scan, not one per boolean mask
            ii, jj, lo_e, hi_e, need_lo, need_hi = (t[keep] for t in (ii, jj, lo_e, hi_e, need_lo, need_hi))
            every = False
        core[ii] = True
    if bool(core.any()):
        rules.prepare(jj)
        # the fewest nodes whose span covers the core's, r * zmax (<= _CORE_MAX_SPAN by rmax)
        spans = torch.tensor([sp for _, sp in _CORE_RULES], dtype=torch.float64, device=dev)
        qi = torch.bucketize(take(sc) / take(sg) * rules.zmax[jj], spans).clamp_(max=len(_CORE_RULES) - 1)
        _core_side_moments(kappa, m4, ii, jj, qi, lo_e, hi_e, need_lo, need_hi, rules, th, sg, sc, kappa_only)
        lower, upper = (take(own_lo) - take(th)) / take(sg), (take(own_hi) - take(th)) / take(sg)
        ma = own_cell_mean_abs(lower, upper)
        if every:
            mean_abs.copy_(ma)
        else:
            mean_abs[ii] = ma
    rest = rest & ~core
    wide = rest & (need > _MAX_WINDOW)
    if bool(wide.any()):  # runs (up to 128) where they serve, then every edge of the table (pf30)
        wide_runs = _run_path((kappa, mean_abs, m4, coverage), wide, cell_lo, cell_hi, (own_lo, own_hi), need,
                              values, th, sg, sc, _WIDE_RUN_BUCKETS, kappa_only, WIDE_RUN_MERGE_SD)
        wide &= ~wide_runs
        runs = runs | wide_runs
    _whole_table_sums((kappa, mean_abs, m4, coverage), wide, mids, th, sg, sc)
    rest &= need <= _MAX_WINDOW
    if bool(rest.any()):
        _exact_windows((kappa, mean_abs, m4, coverage), torch.nonzero(rest).squeeze(-1), cell, cell_lo, cell_hi,
                       mids, th, sg, sc)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage), core | runs
