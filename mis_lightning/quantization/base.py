"""The scheme protocol: a quantized copy of a model plus the grid of every parameter it quantizes.

A :class:`QuantizationScheme` never touches the model it is given: ``apply`` deep-copies it,
runs the real backend on the copy, and reads each quantized parameter's grid (codes,
scales, zero points, block sizes) back from the backend's own tensors into a
:class:`ParamGrid`. Parameters the scheme leaves in float appear in ``unquantized`` with the
reason (layer type not supported, width not a multiple of the group size, excluded by
``filter_fn``, outside the assessed parameters, ...) and are scored as unprotected
(``kappa = 1``; a weight stored in bf16 / fp16 on its storage grid,
:mod:`~mis_lightning.quantization.storage_grid`).

Shared (tied) parameters: a weight held by several modules is quantized in every module that
holds it, or in none (left in float everywhere, with the reason): the released copy never
holds a quantized and a float version of one parameter.
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from functools import partial
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .._fields import CheckedFields
from .._modelcopy import SharedWeights, private_copy
from ..functional import (
    CellMoments,
    CompilePolicy,
    affine_boundaries,
    affine_cell_moments,
    table_boundaries,
    table_cell_moments,
)
from ..functional import affine as _affine
from ..functional import bounds as _bounds
from ..functional import gather as _gather
from ..functional import kernel as _kernel
from ..functional import point_proof as _proof
from ..functional import table as _table
from ..functional import wide as _wide
from ..functional.affine import affine_codes
from ..functional.bounds import (
    bounded_fine_moments,
    bounded_moments,
    bounds_in_reach,
    clip_boundaries,
    fine_kappa_elements,
    reveal_beyond_bounds,
)
from ..functional.cells import _INV_SQRT_2PI, SQRT_2_OVER_PI
from ..functional.distinct import (
    DISTINCT_ROWS_BUDGET,
    distinct_edge_moments,
    run_starts,
    table_window_moments,
)
from ..functional.kernel import _MAX_WINDOW, CUTOFF_SIGMAS, EAGER_BLOCK, windowed_moments
from ..functional.kernel import own_cell_mean_abs as kernel_own_cell_mean_abs
from ..functional.masks import any_set, count_set
from ..functional.quotient import (
    quotient_boundaries,
    quotient_cell_moments,
    quotient_cells,
    quotient_inverse,
    quotient_thresholds,
)
from ..functional.storage import (
    STORAGE_DTYPES,
    as_stored,
    overflow_threshold,
    storage_cell_moments,
    storage_ulp,
    storage_values,
    stored,
    stored_bounds,
    stored_edges,
)
from ..functional.table import _open_fine_moments, table_layout
from ..functional.versions import tensor_version
from ..functional.wide import (
    WIDE_MAX_WINDOW,
    WIDE_TABLE_MAX_VALUES,
    affine_cube_sum,
    own_cell_mean_abs,
    table_cube_sum,
    wide_deficit_bound,
    wide_sd_parts,
)
from ..functional.wide_series import (
    SERIES_MAX_SHIFT,
    SERIES_MAX_WINDOW,
    SERIES_TOL,
    series_coefficients,
    series_moments,
    series_terms,
)
from ..functional.wide_table import (
    series_table,
    table_series_moments,
    table_series_terms,
    table_window_coefficients,
    table_window_cubes,
)

FilterFn = Callable[[nn.Module, str], bool]
# sd / step above which a quotient grid (torchao intx on bf16 / fp16 weights) is scored on its
# midpoints: the real cells' sums cost 5-17x there and their difference is <= 1e-3 of kappa
# (int8 in bf16, the widest cells; tests/test_lowp_quotient_cells.py pins the bound)
QUOTIENT_EXACT_MAX_SD = 8.0
# sd above which a grid on bf16 / fp16 weights (``storage_dtype``) is scored on its own edges, in
# storage ulps at the edges within reach: the stored cells' edges sit within half an ulp of them,
# and their sums cost 2-20x the affine kernel's (docs/benchmarks.md, "st30": in fp16 at 2.5-8
# steps the switch saves 7x; in bf16 hardly anything); the difference fades as 1 / (sd / ulp)^2
# (tests/test_storage_rounding.py pins it: kappa within 2e-4 relative at 16 ulps)
STORAGE_EXACT_MAX_ULPS = 16.0
# ... and where sd exceeds STORAGE_FINE_CELLS of the grid's own cells only (kappa then hardly
# depends on the position within a cell: the stored edges' first-order effect is gone)
STORAGE_FINE_CELLS = 2.0
# window half-widths of the stored cells' exact sums (an element takes the first that holds the
# cells within its 8.5 sd): ~1.2x apart, so a window holds at most ~20 % more edges than needed
# Beyond _MAX_WINDOW (grids with more keys than the storage grid has values within reach: fp16 on a
# bf16 model near 0, where neither holds the other's values) 1.4x apart up to a 16-bit table's keys:
# an element is never scored on other cells than its stored ones (st31)
_STORAGE_WINDOWS = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 17, 20, 24, 29, 35, 42, 50, 60, 72, 86, 103, 124, 149,
                    179, 215, 258, 310, 372, 446, _MAX_WINDOW, 724, 1024, 1448, 2048, 2896, 4096, 5793, 8192,
                    11585, 16384, 23170, 32768, 46341, 65536)
# keys each side up to which an element whose reach passes a storage overflow threshold (fp16
# +-65520) that the grid keys apart from the largest value takes the stored cells' sums at any sd
# (ParamGrid._overflow_in_reach; fs40): beyond, the grid's own cells, which run on past the
# threshold (kappa high: conservative, up to 0.18 at fp16's 65504 with sd 3e3 under bf16): exact
# sums over the ~38k bf16 keys of fp16's range cost ~4 ms an element (fp16 1e6 scoring 10 -> 96 s)
STORAGE_OVERFLOW_MAX_WINDOW = _MAX_WINDOW
# runs of equal (scale, zero point) per chunk up to which a grid with more keys than 2 * _MAX_WINDOW
# is checked for storage cells (:meth:`ParamGrid._storage_cells`: one key per D value, 65k, per run)
_STORAGE_CELL_RUNS = 4
# kappa by which the storage cells may read an element high and still stand for its stored cells
# (:meth:`ParamGrid._storage_cells`: cells holding several D values within reach, bounded; on the
# conservative side). At 1e-12 fp16 on bf16 weights of sd ~2e-3 whose reach spans 0 missed it by
# 1.5% and took the stored cells' window sums over ~20k fp16 keys: 150 us per weight at 64 ulps
STORAGE_CELLS_KAPPA = 1e-10
# ... counting only merged cells up to this width (parameter units; wider ones disqualify: they
# could only pass at sd above ~5e3 x their width)
_MERGED_MAX_WIDTH = 2.0**-20
# floats per [rows, edges] working tensor of those sums: ~30 element-wise operations per edge run
# 3-4x faster on cache-sized temporaries (2^16 floats: 16 ns per edge, 2^20: 60; 1 thread)
_STORAGE_ROWS_BUDGET = 1 << 16


def _runs(new: Tensor) -> tuple[Tensor, Tensor]:
    """``(run id [c], first index of each run [r])`` of consecutive elements, ``new [c - 1]``
    marking where element ``i + 1`` starts a run (a block with its own grid)."""
    gid = torch.cat([new.new_zeros(1, dtype=torch.long), new.long().cumsum(0)])
    return gid, torch.nonzero(torch.cat([new.new_ones(1), new])).squeeze(-1)


# sd-0 weights (dead units: no record moves them, pf31/pf32) lying strictly inside their own cell
# and bounds are a point mass in one cell: moments (kappa, mean_abs, m4, coverage) = (0, 0, 0, 1),
# what every grid path's frozen regime returns for them (both edges beyond 8.5 sd). Chunks in which
# at least POINT_MASS_MIN_FRACTION of the elements are such are scored on the others alone
# (ParamGrid._own_moments; 94% of the 1e7 MLP's second layer); False: every element on the paths.
POINT_MASS_CLOSED_FORM = True
POINT_MASS_MIN_FRACTION = 0.25
# distance (relative to the element's scale) an sd-0 weight must keep from its cell's edges and
# its bounds: far above the ulps by which the paths' own edge arithmetic may differ (they then
# all see both edges beyond 8.5 sd of a floored sd), far below any cell width (fp8's subnormal
# cells are 2^-9 of the scale); a weight closer than this goes through the paths
_POINT_MASS_MARGIN = 1e-9
# calls of at least this many elements take the kernels' large-call paths (the fused affine
# kernel, affine.TABLE_MIN_ELEMENTS; the float8 interpolation table, table.INTERP_MIN_ELEMENTS):
# the remaining elements of such a chunk take the path of a call of this many, of which the others
# are point masses (bitwise the same moments): given alone, as standing for a call of that size
# (the paths' path_elements), or padded with point-mass elements of the chunk up to it
_POINT_MASS_PATH_MIN = 1 << 15
# the live elements alone (path_elements) on affine and value-table grids: their cost follows
# their count (pf32's padding doubled a 1e7 second-layer chunk's ~16-20k live elements; pad34);
# False, and quotient grids (whose fine-step split re-enters the closed form on its subsets): padded
POINT_MASS_LIVE_ONLY = True

# weights whose sd dwarfs the window their release bounds them to (the bounds within
# functional.wide.WIDE_MAX_WINDOW sd of each other; the 1e7 MLP's first layer: sd 1e3-1e6 steps)
# take the closed form of functional.wide (kappa = 1 - lambda S, mean_abs exact, m4 = 3) where its
# derived error bound is at most functional.wide.WIDE_TOL (docs/method.md section 5, "Weights whose sd spans the bounded window");
# False: the grid paths (windowed sums, fine-grid expansion, outer-cell split) for every element
WIDE_SD_CLOSED_FORM = True
# ParamGrid.wide_shares (the compile policy's count of the fused kernel's coming elements) counts
# the sd-0 point masses of runs mostly of them as never reaching the kernel. False: counted as
# reaching it (the count before p46b; A/B)
SHARES_COUNT_SD_ZERO = True
# Weights of a grid on bf16 / fp16 weights (``storage_dtype``) whose bounded window is at most
# functional.wide_series.SERIES_MAX_WINDOW (1) sd wide, inside it or beyond a bound (a bootstrap
# draw), take the series of functional.wide_series on the stored cells themselves (one row of
# stored edges per block, ParamGrid._stored_wide) where its derived error bound on kappa is at most
# functional.wide_series.SERIES_TOL (1e-11, kappa on the conservative side; m4 from the exact sums where its
# own bound exceeds it): docs/method.md section 5, "The bounded window on stored grids". Before, a bound within reach sent every
# such weight to the exact stored-cell sums over the whole code range (bf16 1e6 MLP: ~90-110 s of
# scoring against ~4.5 s on float32 weights). False: the exact stored-cell sums for them
STORED_WIDE_CLOSED_FORM = True
# gathered per-window sums per block of that form's per-element step (float64: 2 MiB)
_SERIES_BLOCK = 1 << 18
# Weights of a value-table grid of at most functional.wide.WIDE_TABLE_MAX_VALUES values (float8,
# float4, nf4) whose bounded window (taken about the table's 0: half-width max(|lower|, |upper|))
# is at most SERIES_MAX_WINDOW sd wide and which the wide-sd closed form left (a window past its
# WIDE_MAX_WINDOW, or its error bound above WIDE_TOL) take the series of functional.wide_series on
# the grid's own cells (ParamGrid._table_series: per window, the table's prefix sums of the
# per-cell series plus the two cut end cells) where its derived error bound on kappa (and on m4, in
# a full call) is at most SERIES_TOL: kappa on the conservative side, within 1e-11 of the exact cell
# sums (p43b; before, the exact window sums over every cell of the table: sm42's float8 1e5 MLP,
# 84% of the elements). False: those elements on the paths
TABLE_WIDE_SERIES = True

# The scoring pass reads each chunk of a parameter several times per grid: its cell moments at sd
# and at sd / sqrt(2) (the pool protocol), with the same weights, grid and bounds. What does not
# depend on sd is kept from the last few calls (REUSE_CHUNK_FACTS; False: recomputed every call):
# a grid's per-element expansion of a range (ParamGrid._chunk_grid) and the sd-0 elements'
# "strictly inside their cell and bounds" test (ParamGrid._point_masses), and the wide-sd closed
# form's cubed cell widths of a whole chunk (ParamGrid._wide_closed, cm35). Each entry is keyed by
# the identity and version counter of every tensor it was computed from (weak references: an
# entry never keeps its inputs alive, and a freed input's entry cannot match a new tensor), so an
# in-place change or a new tensor recomputes it. Float64 per element: ~5 chunk-sized tensors per
# entry, _FACT_SLOTS entries (module-level: release_chunk_facts() frees them).
REUSE_CHUNK_FACTS = True
# ParamGrid.chunk_deficit_bound / chunk_wide_deficit read a chunk's per-block facts (C3, the widest
# window, the bounds' reach) off one computation over the whole parameter's blocks, kept on the grid
# per tensor version, not ~40 small operations per chunk and grid (p49b: 252 calls, ~0.18 s of a
# steady 1e7 scoring call). Element-wise values and exact maxima: bitwise the same facts. False:
# per chunk, as before (A/B)
WHOLE_BLOCK_FACTS = True
# ParamGrid.moments writes the revealed elements' moments into the fields in place where the call
# that made them allocated them (_FreshMoments: the sd-0 closed form, the wide-sd closed form, the
# merges), instead of four out-of-place masked_fill copies of the chunk (2 MiB each at 2^18 weights:
# 1.7 ms per call, the largest single cost of the 1e7 integer grids' calls, cm35); the same values.
# False: always the copies
REVEALED_IN_PLACE = True
# A kappa_only call (the pool protocol's, the draws') on a chunk mostly of point masses
# (ParamGrid._own_moments) returns mean_abs, m4 and coverage as one NaN expanded to the chunk:
# its callers read kappa alone, and the three zero / one tensors, their copies of the live
# elements' values and their revealed fills cost ~3 ms per 2^18-weight call (cm35). False: the
# point masses' (0, 0, 1) and the paths' values, as in a full call
KAPPA_ONLY_STANDINS = True
# Revealed elements (ParamGrid.revealed: a block's absmax, min or max) are given their moments by
# ParamGrid.moments after the paths, which overwrite all four fields: on affine and value-table
# grids (no storage rounding) they are left out of the paths (never strictly inside their bounds,
# they were the wide-sd form's and the point masses' leftovers: one in 32 weights of a g32 grid,
# 8,192 per 2^18-weight chunk on the exact sums and the outer-cell split), the others taking the
# paths of the call they would have shared (path_elements). False: on the paths, then overwritten
REVEALED_SKIPPED = True
# the sd-0 inside test (ParamGrid._inside) as min(th - max(lo, lower), min(hi, upper) - th) > margin
# and the affine own-cell edges (ParamGrid._own_edges) with one q0 - z on integer zero points, in
# place: the same mask and edges bitwise, in ~half the operations (ws37). False: as before
INSIDE_FUSED = True
# The sd-0 test of a chunk's sd (sigma <= tiny, its count, the others' indices) kept for the
# grids' calls that read the same sd tensor (the last two: a chunk's main and pool sd), and a chunk
# whose sd-0 elements are all point masses or known (revealed) takes the sd > 0 ones' indices as its
# live ones, without a pass over the chunk per call (ws37; bitwise the same). False: per call
SD_ZERO_SHARED = True
# the sd-0 inside test in blocks of kernel.EAGER_BLOCK elements (False: one pass over the chunk);
# its ~25 element-wise operations on chunk-sized temporaries ran ~2x slower (sc33)
POINT_MASS_BLOCKS = True
# ParamGrid.point_masses_at on affine grids and float formats' tables (float8) of 2-D weights with
# blocks along a row (per-row, per-group scales), whole rows per chunk: the sd-0 inside test proven
# for a whole chunk by one number per weight on the blocks' own values (functional.point_proof; no
# per-element expansion of the grid), the weights it does not prove (each block's absmax on its
# bound, near-edges, NaN) tested as before: the same mask bitwise (p47b; docs/benchmarks.md).
# False: the per-element test
POINT_MASS_PROOF = True
# ParamGrid.point_masses_at (the unit-kappa chunks' test, not the moments' own split): an sd-0
# weight strictly inside the cell it lies in (the nearest code's, by the same margin) and inside
# the release's bounds is a point mass whatever the backend's code says. Its moments are (0, 0,
# 0, 1) on every path: each cell's edges lie >= 1e-9 cells / the floored sd (~1e297 sd) from it,
# so every pdf term is 0 and the cell holding it has mean 0 (method.md section 5). torchao's
# float32 quotients put ~20 sd-0 weights of the 1e7 MLP's 2.weight ~2e-6 cells outside their
# code's cell (p47b): their chunks now take the unit columns (p47e). False: the code's cell
POINT_MASS_ANY_CELL = True
# The wide-sd closed form's C3 of a whole chunk (ParamGrid._wide_closed) computed once per block
# of the grid (its bounds, scale and zero point are per-block values) and then expanded, instead
# of ~34 element-wise operations per element: bitwise the same (the same IEEE operations on the
# same values; the expansion is a copy). Where the chunk's tensors are ParamGrid._chunk_grid's
# (the range known); False, or other tensors: per element, as before (wd38)
WIDE_CUBE_BLOCKS = True
# A kappa_only call of the wide-sd closed form on a whole chunk whose tensors are the chunk's grid
# (ParamGrid._chunk_grid's: its C3 computed per block, WIDE_CUBE_BLOCKS) keeps that C3 for the next
# call on it too, as a full call does: the joint pass's main call is kappa_only where nothing reads
# its m4 (assess.MAIN_KAPPA_ONLY), and the pool call after it then reads its C3 instead of
# computing it again (bitwise the same: C3 depends on the chunk's grid and bounds alone). False:
# only full calls keep it (pf40, A/B)
CUBE_KEPT_KAPPA_ONLY = True
# ParamGrid._own_moments on a value table gives its live elements (a chunk mostly of point masses:
# the 1e7 MLP's second layer, ~16k of 2^18 weights) to the table path as gathered weight and scale
# tensors; the pool protocol's call on the same chunk (the same weight and scale tensors, equal
# live indices) now gets the main call's gathered tensors themselves (held between the two only),
# so that the table path's own cells, kept by the main call for the same tensors
# (functional.table.SHARE_OWN_CELLS), serve it: bitwise the same numbers. False: gathered per call
SHARE_LIVE_GATHERS = True
_LIVE_GATHERS: list[tuple[tuple, Tensor, Tensor, Tensor]] = []


def _live_gathers(theta: Tensor, scale: Tensor, ii: Tensor) -> tuple[Tensor, Tensor]:
    """``(theta[ii], scale[ii])``, the tensors an earlier call returned where it was given the
    same ``theta`` and ``scale`` (unchanged since: their version counters) and equal indices
    (:data:`SHARE_LIVE_GATHERS`; the entry is taken out by the call it serves, and replaced by
    each call that gathers). The tensors returned are read, never written, by the callers."""
    if _LIVE_GATHERS:
        key, idx, th_l, sc_l = _LIVE_GATHERS.pop()
        if _key_matches(key, (theta, scale), ()) and (idx is ii or torch.equal(idx, ii)):
            return th_l, sc_l
    th_l, sc_l = theta.index_select(0, ii), scale.index_select(0, ii)
    if not (theta.is_inference() or scale.is_inference()):  # (no version counter to key on)
        _LIVE_GATHERS.append((_fact_key((theta, scale)), ii, th_l, sc_l))
    return th_l, sc_l


# A 16-bit cast's sd-0 weights that are not point masses (ties, near-edges: on the 1e7 MLP's second
# layer ~45 a bf16, ~200 an fp16 chunk) get their moments without the table call
# (functional.table.SD_ZERO_APART, table.sd_zero_moments); the split of a chunk's non-point indices
# into them and the live ones is held for the next call on the same weights, scale, table and
# kappa_only with equal point masses and sd-0 weights (the pool protocol's after the main one: whose
# sd-0 weights' moments do not read sd; the same live indices, so the live gathers and own cells are shared
# as before). One entry, freed with the chunk facts
_SD_ZERO_SPLIT: list[tuple[tuple, Tensor, Tensor, Tensor, Tensor, CellMoments, Tensor]] = []


def _sd_zero_split(theta: Tensor, scale: Tensor, values: Tensor, kappa_only: bool, point: Tensor, zero: Tensor
                   ) -> tuple[Tensor | None, CellMoments | None, Tensor]:
    """``(sd-0 indices, their moments, live indices)`` of a table grid's elements that are not
    point masses (``~point``, ``[c]`` bool; ``zero``: ``[c]`` bool, sd 0), or ``(None, None, their
    indices)`` where the table path must take them all
    (:func:`~mis_lightning.functional.table.sd_zero_moments`); kept as above, the held split read
    where ``point`` and the sd-0 weights among its others are equal (no pass forming the indices)."""
    extra = (kappa_only, frozenset(_table.GUARD.disabled))  # (a path disabled since: the table's numbers)
    if _SD_ZERO_SPLIT:
        key, h_point, idx, h_zero, zz, zm, live = _SD_ZERO_SPLIT[0]
        if _key_matches(key, (theta, scale, values), extra) and torch.equal(h_point, point) \
                and torch.equal(h_zero, zero.index_select(0, idx)):
            return zz, zm, live
    idx = torch.nonzero(point.logical_not()).squeeze(-1)
    on_zero = zero.index_select(0, idx)
    i_np, z_np = idx.numpy(), on_zero.numpy()  # (the split of ~10-20k indices: numpy's boolean selection)
    zz = torch.from_numpy(i_np[z_np])
    if zz.numel() == idx.numel():
        return None, None, idx
    zm = _table.sd_zero_moments(theta.index_select(0, zz), values, kappa_only)
    if zm is None:
        return None, None, idx
    live = torch.from_numpy(i_np[~z_np])
    if not (theta.is_inference() or scale.is_inference()):  # (no version counter to key on)
        _SD_ZERO_SPLIT[:] = [(_fact_key((theta, scale, values), extra), point, idx, on_zero, zz, zm, live)]
    return zz, zm, live


_FACT_SLOTS = 4
_FACTS: dict[str, list[tuple[tuple, Any]]] = {"grid": [], "inside": [], "cube": [], "blocks": []}


def _fact_key(tensors: Iterable[Tensor | None], extra: tuple = ()) -> tuple:
    """A key of :data:`_FACTS`: per tensor a weak reference and its version counter (``None``
    kept as is; an inference tensor's counter is ``None``, :func:`tensor_version`, and its key
    matches nothing), then ``extra`` (plain values compared by ``==``)."""
    return tuple(None if t is None else (weakref.ref(t), tensor_version(t)) for t in tensors) + extra


def _key_matches(key: tuple, tensors: tuple[Tensor | None, ...], extra: tuple) -> bool:
    n = len(tensors)
    if len(key) != n + len(extra) or key[n:] != extra:
        return False
    for k, t in zip(key[:n], tensors):
        if (k is None) != (t is None):
            return False
        if t is not None and (k[1] is None or k[0]() is not t or k[1] != tensor_version(t)):
            return False
    return True


def _fact_get(kind: str, tensors: tuple[Tensor | None, ...], extra: tuple) -> Any:
    """The entry computed from these tensors, taken out of the cache: each serves one later call
    (the pool protocol's after the main one), so chunk-sized tensors are held only between the two
    (held longer, they kept glibc from reusing freed chunks: in a replay of the 1e7 calls, page
    faults rose from ~100 to 20-35k per round and CPU time by up to 38%)."""
    slots = _FACTS[kind]
    for i, (key, value) in enumerate(slots):
        if _key_matches(key, tensors, extra):
            del slots[i]
            return value
    return None


def _fact_put(kind: str, tensors: tuple[Tensor | None, ...], extra: tuple, value: Any) -> None:
    slots = _FACTS[kind]
    slots.insert(0, (_fact_key(tensors, extra), value))
    del slots[_FACT_SLOTS:]


def release_chunk_facts() -> None:
    """Free the per-chunk facts kept for the next call (:data:`REUSE_CHUNK_FACTS`) and the
    shared per-element expansions (:data:`SHARE_EXPANSIONS`)."""
    for slots in _FACTS.values():
        slots.clear()
    _EXPANSIONS.clear()
    _LIVE_GATHERS.clear()
    _SD_ZERO_SPLIT.clear()
    _SD_ZERO.clear()
    _REVEALED.clear()
    _THETA_F32.clear()
    _proof.release_shared_proofs()


# QuantizationScheme.apply's copy holds the weights the backend only reads and then replaces
# (_replaced_weights: torchao's quantize_ on the chosen Linear layers) on the model's own storage
# instead of a deep copy of each, written once and dropped unread (the 1e7 MLP: 40 MB a torchao
# scheme); whatever the backend leaves of them gets its own values afterwards
# (_modelcopy.SharedWeights.release, which raises on one written in place: by then the write has
# reached the model's storage, so only the library's own torchao classes share, whose configs and
# hooks only read it, torchao_backend._SHARES_REPLACED, and never under inference mode, rv47). False:
# every parameter deep-copied (A/B)
SHARE_REPLACED_WEIGHTS = True


# The grids of one parameter often expand bitwise-equal per-block tensors over the same chunk:
# the bounds of every absmax grid of one block size (int8, int4 and float8 per row on the 1e7 MLP),
# the zero points of the symmetric ones. ParamGrid._chunk_grid reads one expansion for all of them
# (each a chunk-sized copy, ~1-3 ms per 2^18 weights); the entries of other ranges are dropped
# at each lookup, so only the current chunk's are held (cm35). False: one expansion per grid.
SHARE_EXPANSIONS = True
_EXPANSIONS: list[tuple[tuple, Any, int, Tensor]] = []


def _shared_expansion(t: Tensor | None, role: str, block_size: tuple[int, ...], shape: tuple[int, ...],
                      start: int, end: int) -> Tensor:
    """``_expand_blocks(t)`` (``None``: zeros) over ``start:end``, or the tensor an earlier call
    returned for a bitwise-equal ``t`` (:func:`_same_value`, unchanged since: its version counter)
    of the same ``role``, blocks, shape and range. The result is shared: never written."""
    key = (role, start, end, tuple(block_size), tuple(shape),
           None if t is None else (t.dtype, tuple(t.shape), t.device))
    _EXPANSIONS[:] = [e for e in _EXPANSIONS if e[0][1:3] == (start, end)]
    for k, ref, version, out in _EXPANSIONS:
        if k != key:
            continue
        if t is None:
            return out
        held = ref()
        if held is not None and version is not None and tensor_version(held) == version and _same_value(held, t):
            return out
    if t is None:
        out, ref, version = torch.zeros(end - start, dtype=torch.float64), None, 0
    else:
        out = _expand_blocks(t.to(torch.float64), block_size, shape, start, end)
        ref, version = weakref.ref(t), tensor_version(t)
    _EXPANSIONS.append((key, ref, version, out))
    return out


# ... and the per-element scale of a grid of at most _SMALL_SCALE blocks (the bf16 / fp16 casts:
# one scale of 1 per tensor) is shared with an equal one's expansion on the same range (the other
# cast's: one chunk-sized copy per chunk, not one per cast), and ParamGrid._chunk_grid finds no
# dead block from the blocks' values when every one is positive (no [c] comparison and scan): the
# same values (p51d). False: one expansion per grid, the [c] test
SHARE_SMALL_SCALES = True
_SMALL_SCALE = 64


_DEQUANTIZED_KEPT: ContextVar[bool] = ContextVar("mis_lightning_dequantized_kept", default=True)


@contextmanager
def zero_counts_only() -> Iterator[None]:
    """Within the block, a backend that can count the zeros of its release without keeping it
    may leave a grid's ``dequantized`` empty and set :attr:`ParamGrid.zero_count` instead
    (:func:`dequantized_kept` is ``False``). For callers that read nothing else of ``dequantized``
    (the scoring's scheme preparation): a backend's full float32 release per weight and scheme
    is fresh memory (1e7 MLP: ~25k page faults and 0.05 s per torchao scheme)."""
    with _flag_off(_DEQUANTIZED_KEPT):
        yield


@contextmanager
def _flag_off(flag: ContextVar[bool]) -> Iterator[None]:
    """``flag`` False within the block (reset after it, also on an error)."""
    token = flag.set(False)
    try:
        yield
    finally:
        flag.reset(token)


def dequantized_kept() -> bool:
    """``False`` inside :func:`zero_counts_only` (backends then may count zeros instead)."""
    return _DEQUANTIZED_KEPT.get()


_RELEASE_READ: ContextVar[bool] = ContextVar("mis_lightning_release_read", default=True)


@contextmanager
def release_unread() -> Iterator[None]:
    """Within the block the caller reads nothing of :meth:`QuantizationScheme.apply`'s quantized
    model (no utility, no forward: a scoring call without validation data), only its grids and
    notes: a scheme whose :attr:`~QuantizationScheme.grids_from_source` is true may then read the
    model itself instead of a deep copy, write nothing, and return ``model=None`` (the dtype
    casts: a copy of every floating weight per call, fresh pages above glibc's mmap threshold
    for a 32 MiB layer; docs/benchmarks.md "p56b"). Use with :func:`zero_counts_only`."""
    with _flag_off(_RELEASE_READ):
        yield


def release_read() -> bool:
    """``False`` inside :func:`release_unread`."""
    return _RELEASE_READ.get()


# (weak reference to the weights, (version, block size, rule, dtype, shape), scale facts)
_SHARED_SCALE_FACTS: ContextVar[list | None] = ContextVar("mis_lightning_shared_scale_facts", default=None)


@contextmanager
def scale_facts_shared(shared: list) -> Iterator[None]:
    """Within the block, grids that :meth:`ParamGrid.reveal` the same weights (the same tensor at
    the same version) with the same block size and rule share one :func:`scale_facts` call and its
    tensors, which every reader reads and none writes; ``shared`` (a list, empty at first) holds
    them across blocks: a scoring call's schemes with per-row absmax scales (int8, int8 dynamic,
    intx per row, float8) reveal the same facts (at 1e7, ~0.1 s and a weight-sized bool
    mask per further scheme)."""
    token = _SHARED_SCALE_FACTS.set(shared)
    try:
        yield
    finally:
        _SHARED_SCALE_FACTS.reset(token)


#: packages whose tensor subclasses hold already-quantized weights
_QUANT_PACKAGES = ("torchao", "optimum.quanto", "bitsandbytes")
#: torch's quantized module namespaces (``quantize_dynamic`` / ``convert`` outputs)
_QUANT_MODULES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


class SchemeError(RuntimeError):
    """A scheme could not be applied; the message names the scheme and the reason."""


class SchemeUnavailableError(SchemeError):
    """The scheme's backend, config or kernels are missing on this machine."""


def _quantized_kind(t: Tensor) -> str | None:
    """What makes ``t`` an already-quantized tensor (``None`` for a plain float tensor)."""
    if t.is_quantized:
        return f"a torch quantized tensor ({t.dtype})"
    for k in type(t).__mro__:
        mod = getattr(k, "__module__", "") or ""
        if mod.startswith(_QUANT_PACKAGES):
            return f"a {mod.split('.')[0]} {type(t).__name__}"
    return None


def _same_value(a: Any, b: Any) -> bool:
    """Bitwise equality of grid fields: tensors by dtype, shape, device and bytes (no float
    comparison: ``-0.0 != 0.0`` here, and equal NaNs are equal), tuples element by element,
    anything else by ``==`` and type."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if a is b:
            return True
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        # the bytes: a view as uint8 of the flat contiguous values (any dtype, bool included)
        return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                and all(_same_value(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def _wide_candidates(theta: Tensor, sigma: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``[c]`` bool: strictly inside bounds at most ``WIDE_MAX_WINDOW`` sd apart (the wide-sd closed
    form's first test; sd 0, NaN and infinite bounds fail it)."""
    return (upper - lower <= WIDE_MAX_WINDOW * sigma) & (theta > lower) & (theta < upper)


class _SdZero:
    """The sd-0 elements of one sd tensor (:func:`_sd_zero`): ``mask`` ``[c]`` bool, ``count``,
    and :meth:`live`, the others' indices (sorted, computed once)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask, self.count, self._live = mask, count_set(mask) if COUNT_SET else int(mask.sum()), None

    def live(self) -> Tensor:
        if self._live is None:
            self._live = torch.nonzero(~self.mask).squeeze(-1)
        return self._live


_SD_ZERO: list[tuple[tuple, _SdZero]] = []
# The sd-0 and point-mass counts (_SdZero, ParamGrid._point_split: a 2^18-weight mask per grid and
# chunk, ~500 a 1e7 scoring) by torch.count_nonzero (masks.count_set), not a bool sum: the same
# integers, ~0.12 ms a mask fewer (p50a). False: int(mask.sum())
COUNT_SET = True
# ParamGrid._revealed_at's (mask, indices) of the last _FACT_SLOTS (revealed tensor, range) pairs,
# kept, not taken out as _FACTS' entries are: every grid of a chunk whose revealed is the same
# tensor (the schemes' shared scale facts: int8, int4 and float8 per row) reads them, in the main
# and the pool call and in the point-mass proof (the mask a view of ParamGrid.revealed, the indices
# a few per block: nothing chunk-sized held)
_REVEALED: list[tuple[tuple, tuple[Tensor, Tensor]]] = []


# the last chunk's weights cast to float32 for the point-mass proof (functional.point_proof.PROOF_FLOAT32):
# every grid of the chunk reads the one cast (keyed as _FACTS' entries; cleared with them)
_THETA_F32: list[tuple[tuple, Tensor]] = []


def _theta_f32(theta: Tensor) -> Tensor:
    """``theta`` (float64 ``[c]``) cast to float32, computed once for every grid of a chunk."""
    for key, t32 in _THETA_F32:
        if _key_matches(key, (theta,), ()):
            return t32
    t32 = theta.to(torch.float32)
    if not theta.is_inference():  # (inference tensors: no version counter)
        _THETA_F32[:] = [(_fact_key((theta,)), t32)]
    return t32


def _f32_proof_layout(s: Tensor, inv: Tensor, z: Tensor | None, lower: Tensor, upper: Tensor
                      ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, float] | None:
    """The float32 proof's per-block facts (:data:`~mis_lightning.functional.point_proof.PROOF_FLOAT32`):
    ``(1 / s, zero point, lower / s, upper / s, err)`` float32 ``[rows, blocks]`` (the bounds in
    cells; ``lower``, ``upper`` as :meth:`ParamGrid._point_proof_layout`'s) and
    :func:`~mis_lightning.functional.point_proof.f32_gap_error` of the largest bound and zero point
    in cells; ``None`` where a scale is outside
    :data:`~mis_lightning.functional.point_proof.F32_SCALE_RANGE` (the float64 proof then)."""
    lo_s, hi_s = _proof.F32_SCALE_RANGE
    if not (float(s.min()) >= lo_s and float(s.max()) <= hi_s):
        return None
    lower_c, upper_c = lower * inv, upper * inv
    cells = max(float(lower_c.abs().max()), float(upper_c.abs().max()),
                0.0 if z is None else float(z.abs().max()))
    return (inv.to(torch.float32), None if z is None else z.to(torch.float32), lower_c.to(torch.float32),
            upper_c.to(torch.float32), _proof.f32_gap_error(cells))


def _sd_zero(sigma: Tensor) -> _SdZero:
    """``sigma <= tiny`` (float64's smallest normal, to which every path floors sd) of a chunk's
    sd, with its count: every grid of the chunk reads the same sd tensor (the main call's; the
    pool call's, computed once per chunk by assess), so its facts serve them all
    (:data:`SD_ZERO_SHARED`: the last two sd tensors, keyed as :data:`_FACTS`' entries)."""
    keep = SD_ZERO_SHARED and not sigma.is_inference()  # (inference tensors: no version counter)
    if keep:
        for key, fact in _SD_ZERO:
            if _key_matches(key, (sigma,), ()):
                return fact
    fact = _SdZero(sigma.to(torch.float64) <= torch.finfo(torch.float64).tiny)
    if keep:
        _SD_ZERO.insert(0, (_fact_key((sigma,)), fact))
        del _SD_ZERO[2:]
    return fact


def _pick(t: Any, ii: Tensor) -> Any:
    """``t[ii]`` of a tensor, of each tensor of a tuple, or ``None``."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_gather.take(x, ii) for x in t)
    return _gather.take(t, ii)


class _FreshMoments(CellMoments):
    """:class:`CellMoments` whose four fields the call that returned them allocated: distinct
    tensors that nothing else holds yet, so :meth:`ParamGrid.moments` may write them in place
    (:data:`REVEALED_IN_PLACE`). Any other moments may share a field with another field, a cache
    or an input, and are copied."""


class _KappaOnlyMoments(CellMoments):
    """:class:`CellMoments` of a ``kappa_only`` call whose ``kappa`` the call allocated (as
    :class:`_FreshMoments`') and whose other three fields are one NaN, expanded (stride 0: no
    chunk-sized tensor; :data:`KAPPA_ONLY_STANDINS`): :meth:`ParamGrid.moments` writes ``kappa``
    alone in place."""


def _merge_moments(c: int, device: torch.device, parts: list[tuple[Tensor, Callable[[Tensor], CellMoments]]]) -> CellMoments:
    """``[c]`` float64 moments assembled from ``(indices, moments of those indices)`` parts."""
    out = [torch.empty(c, dtype=torch.float64, device=device) for _ in range(4)]
    for ii, fn in parts:
        if ii.numel():
            sub = fn(ii)
            for o, f in zip(out, ("kappa", "mean_abs", "m4", "coverage")):
                o[ii] = getattr(sub, f).to(torch.float64)
    return _FreshMoments(*out)


def check_float_model(model: nn.Module) -> None:
    """Refuse a model that is already quantized (torchao / quanto / bitsandbytes tensor
    subclasses, torch quantized tensors or ``torch.ao.nn.quantized`` modules).

    The library estimates the trained *float* weights and quantizes copies of them itself;
    on integer codes the estimation is meaningless and every scheme fails in dispatch.

    Raises:
        ValueError: naming the first parameter (or module) that holds a quantized tensor.
    """
    bad: list[str] = []
    for name, p in model.named_parameters():
        kind = _quantized_kind(p)
        if kind is not None:
            bad.append(f"parameter {name!r} holds {kind}")
    flagged: list[str] = []
    for fqn, m in model.named_modules():
        # a quantized layer's own parts (a dynamic Linear's _packed_params) are not counted again (nux52 #7)
        if type(m).__module__.startswith(_QUANT_MODULES) and not any(
                fqn.startswith(f"{f}.") or not f for f in flagged):
            flagged.append(fqn)
            bad.append(f"module {fqn or '<root>'!r} is a quantized {type(m).__module__}.{type(m).__name__}")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(
            f"the model is already quantized: {bad[0]}{more}. Assess the float model: pass the "
            "trained model before quantize_ / quantize_dynamic, and name the scheme (e.g. "
            "'int8_weight_only'); mis_lightning quantizes its own copies")


def parameter_uses(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """``id(parameter) -> [(module fqn, attribute, module), ...]``: every module that holds
    each parameter (a tied weight has several), in ``named_modules`` order."""
    uses: dict[int, list[tuple[str, str, nn.Module]]] = {}
    seen: set[tuple[int, str]] = set()
    for fqn, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is None or (id(mod), attr) in seen:
                continue
            seen.add((id(mod), attr))
            uses.setdefault(id(p), []).append((fqn, attr, mod))
    return uses


def _holder(fqn: str, attr: str, mod: nn.Module) -> str:
    return f"{type(mod).__name__} {fqn or '<root>'!r}.{attr}"


def _expand_blocks(block_tensor: Tensor, block_size: tuple[int, ...], shape: tuple[int, ...],
                   start: int, end: int) -> Tensor:
    """Per-element values ``[end - start]`` of a per-block tensor, for a flat element range.

    ``block_tensor`` has one entry per block of ``block_size`` (shape ``ceil(shape/block)``,
    or anything that reshapes to it, e.g. ``[N, 1]`` for per-row); a block size of 1 along a
    dim means one entry per index of that dim.
    """
    if not shape:
        return block_tensor.reshape(-1)[:1].expand(end - start).clone()
    return _rows_to_elements(_block_rows(block_tensor, block_size, shape, start, end), block_size, shape, start, end)


def _block_rows(block_tensor: Tensor, block_size: tuple[int, ...], shape: tuple[int, ...],
                start: int, end: int) -> Tensor:
    """``[r, nb_last]``: the per-block values of the ``r`` rows (of the last dim, ``shape`` at
    least 1-D) that elements ``start:end`` touch, one entry per block of each row;
    :func:`_rows_to_elements` expands them (:func:`_expand_blocks`' two halves: a function of
    the blocks' values alone computed on these rows, then expanded, gives each element what it
    gives on the expanded values)."""
    nblocks = [math.ceil(s / b) for s, b in zip(shape, block_size)]
    # Whole rows of the last dim: the block index of each touched row (a few per chunk), then
    # one repeat along the last dim, instead of per-element index arithmetic (the scoring
    # pass expands a chunk's scales for every evaluation).
    last = shape[-1]
    r0, r1 = start // last, (end - 1) // last + 1
    rem = torch.arange(r0, r1, device=block_tensor.device)
    lead_block = torch.zeros_like(rem)
    stride, bstride = 1, 1
    for s_ in shape[:-1]:
        stride *= s_
    for dim in range(len(shape) - 1):
        stride //= shape[dim]
        bstride = math.prod(nblocks[dim + 1: -1])
        coord = torch.div(rem, stride, rounding_mode="floor")
        rem = rem - coord * stride
        lead_block = lead_block + torch.div(coord, block_size[dim], rounding_mode="floor") * bstride
    return _gather.take(block_tensor.reshape(-1, nblocks[-1]), lead_block)  # [r1 - r0, nb_last]


def _rows_to_elements(rows: Tensor, block_size: tuple[int, ...], shape: tuple[int, ...],
                      start: int, end: int) -> Tensor:
    """``[end - start]``: :func:`_block_rows`' ``rows`` expanded to the elements ``start:end``."""
    last, b_last = shape[-1], block_size[-1]
    r0 = start // last
    if b_last > 1:  # each block's value b_last times: a broadcast copy (repeat_interleave built an
        # index tensor first: 2-4x the time on the 1e7 MLP's per-row scales and bounds, cm35)
        r, nb = rows.shape
        full = rows.unsqueeze(-1).expand(r, nb, b_last).reshape(r, nb * b_last)[:, :last]
    else:
        full = rows
    return full.reshape(-1)[start - r0 * last: end - r0 * last]


def _block_view(t: Tensor, block_size: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """``t`` padded to whole blocks and viewed as ``[nb_0, b_0, nb_1, b_1, ...]``."""
    shape = tuple(t.shape)
    pads = []
    for s, b in zip(reversed(shape), reversed(block_size)):
        pads += [0, (-s) % b]
    tp = torch.nn.functional.pad(t, pads, value=float("nan")) if any(pads) else t
    view = []
    for s, b in zip(tp.shape, block_size):
        view += [s // b, b]
    return tp.reshape(view), tuple(tp.shape)


# Elements per slab of the scale facts (:func:`scale_facts`): the whole-tensor form made ~6
# tensor-sized temporaries per parameter and scheme (|w|, its NaN-filled copies, the mask), mapped
# and zeroed page by page: 182k of the 1e7 scoring pass's 0.69M minor page faults (pad34).
_SCALE_FACT_SLAB = 1 << 16
# absmax facts of a slab whose every block maximum is finite read that one amax for the mask and the
# bounds (the NaN-filled copies, there for NaN padding, equal |w| there); False: two NaN-filled maxima (A/B)
FINITE_FACTS_ONE_MAX = True


def _scale_facts_slab(t: Tensor, block_size: tuple[int, ...], rule: str, mask: bool, support: bool
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`scale_facts` of a tensor of whole blocks along dim 0 (or the last, partial one)."""
    if rule not in ("absmax", "minmax"):
        raise ValueError(f"rule must be 'absmax' or 'minmax', got {rule!r}")
    view, padded = _block_view(t, block_size)
    red = tuple(range(1, 2 * t.dim(), 2))
    revealed = lo = hi = None
    if rule == "absmax":
        a = view.abs()
        # every block's max |w| finite (amax propagates NaN): both NaN-filled maxima below are it
        top = a.amax(dim=red, keepdim=True) if FINITE_FACTS_ONE_MAX else None
        if top is not None and not bool(torch.isfinite(top).all()):
            top = None
        if mask:
            m = top if top is not None else torch.nan_to_num(a, nan=-1.0).amax(dim=red, keepdim=True)
            # an all-zero block ties every element at the maximum: the released scale (0, or the
            # clamped floor) gives all of them away, as minmax does (scored 0 before: a
            # discontinuity, the same row at 1e-20 read the baseline)
            revealed = a == m
        if support:
            hi = (top.amax(dim=red) if top is not None else torch.nan_to_num(a, nan=0.0).amax(dim=red)).to(torch.float64)
            lo = -hi
    else:
        top = torch.nan_to_num(view, nan=-float("inf")).amax(dim=red, keepdim=True)
        bottom = torch.nan_to_num(view, nan=float("inf")).amin(dim=red, keepdim=True)
        if mask:
            revealed = (view == top) | (view == bottom)
        if support:
            nb = tuple(top.shape[i] for i in range(0, 2 * t.dim(), 2))
            hi = top.reshape(nb).to(torch.float64).clamp_min(0.0)
            lo = bottom.reshape(nb).to(torch.float64).clamp_max(0.0)
    if revealed is not None:
        revealed = revealed.reshape(padded)[tuple(slice(0, s) for s in t.shape)]
    return revealed, lo, hi


def scale_facts(theta: Tensor, block_size: tuple[int, ...], rule: Literal["absmax", "minmax"],
                mask: bool = True, support: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(revealed, lower, upper)``: :func:`revealed_by_scale` (``mask``) and
    :func:`support_by_scale` (``support``) in one pass (``None`` for what is not asked), computed
    on slabs of whole blocks along dim 0 of about ``_SCALE_FACT_SLAB`` elements: the same
    comparisons and maxima per block, so the same values as one pass over the tensor, without
    its tensor-sized temporaries.

    Raises:
        ValueError: an unknown ``rule``.
    """
    # |w|, max and == are exact in the weights' own float dtype: no float64 copy of the tensor
    t = theta.detach() if theta.is_floating_point() else theta.detach().to(torch.float64)
    if t.dim() == 0 or t.numel() <= _SCALE_FACT_SLAB:
        r, lo, hi = _scale_facts_slab(t, block_size, rule, mask, support)
        return (None if r is None else r.clone()), lo, hi
    b0 = block_size[0]
    rows = max(b0, _SCALE_FACT_SLAB // max(1, t[0].numel()) // b0 * b0)
    nblocks = tuple(math.ceil(s / b) for s, b in zip(t.shape, block_size))
    revealed = torch.empty(t.shape, dtype=torch.bool, device=t.device) if mask else None
    lo = torch.empty(nblocks, dtype=torch.float64, device=t.device) if support else None
    hi = torch.empty(nblocks, dtype=torch.float64, device=t.device) if support else None
    for r0 in range(0, t.shape[0], rows):
        r1 = min(r0 + rows, t.shape[0])
        part = _scale_facts_slab(t[r0:r1], block_size, rule, mask, support)
        if revealed is not None:
            revealed[r0:r1] = part[0]
        if lo is not None and hi is not None:
            blocks = slice(r0 // b0, math.ceil(r1 / b0))
            lo[blocks], hi[blocks] = part[1], part[2]
    return revealed, lo, hi


def revealed_by_scale(theta: Tensor, block_size: tuple[int, ...], rule: Literal["absmax", "minmax"]) -> Tensor:
    """Boolean mask (``theta``'s shape) of the weights a weight-derived scale gives away.

    ``"absmax"`` (symmetric scales ``s = max|w| / c``): the element(s) of largest magnitude
    in each block, which the released float scale determines exactly; ``"minmax"``
    (asymmetric ``scale, zero_point`` from ``min w, max w``): the smallest and largest
    element of each block. Both are scored as unquantized (``kappa = 1``). For ``"minmax"``
    that over-reveals, on the safe side: torchao's float scale gives the range
    ``max(w_max, 0) - min(w_min, 0)`` exactly, but its integer zero point places the extremes
    only to within a cell (and a block of one sign reveals one end only); an independent exact
    truth on ``intx_weight_only_int{2,4}_g32_asym`` OLS rows read 1.00-1.03x (docs/validation.md).
    Computed by :func:`scale_facts`.

    Raises:
        ValueError: an unknown ``rule``.
    """
    revealed = scale_facts(theta, block_size, rule, support=False)[0]
    assert revealed is not None
    return revealed


def support_by_scale(theta: Tensor, block_size: tuple[int, ...], rule: Literal["absmax", "minmax"]
                     ) -> tuple[Tensor, Tensor]:
    """Per-block bounds ``(lower, upper)`` (float64, ``ceil(shape / block_size)``) that a
    weight-derived scale releases on every weight of its block.

    ``"absmax"``: ``[-m, m]`` with ``m = max |w|`` (the released scale is ``m / c``);
    ``"minmax"``: ``[min(w_min, 0), max(w_max, 0)]`` (torchao's ``choose_qparams_affine`` and
    torch's min/max observers widen the range to hold 0). Given the release, the grid's outer
    cells end at these bounds (:func:`~mis_lightning.functional.bounds.bounded_moments`,
    method.md section 5). Computed by :func:`scale_facts`.

    Raises:
        ValueError: an unknown ``rule``.
    """
    _, lo, hi = scale_facts(theta, block_size, rule, mask=False)
    assert lo is not None and hi is not None
    return lo, hi


@dataclass
class ParamGrid:
    """The grid of one quantized parameter tensor (all element indices are flat, row-major).

    Attributes:
        name: the parameter's name in the original model (``model.named_parameters()``).
        shape: the parameter's shape.
        kind: ``"affine"`` (integer codes, ``(q - zero_point) * scale``), ``"table"``
            (non-uniform: ``values * scale``, e.g. float8 / bfloat16 / float16) or
            ``"quotient"`` (integer codes as ``"affine"``, but the backend rounds the quotient
            ``w * rnd(1 / scale)`` to ``quotient_dtype`` before the integer rounding: torchao's
            intx on bf16 / fp16 weights; cells from :mod:`~mis_lightning.functional.quotient`).
        dequantized: the backend's own dequantized tensor (float32, ``shape``); empty where
            the backend counted its zeros instead (:attr:`zero_count`).
        bits_per_weight: storage per element including scales and zero points.
        scale, zero_point: per-block tensors (``block_size`` layout).
        block_size: elements per block along each dim.
        qmin, qmax: affine code range.
        codes: the backend's integer codes (affine) or ``None``.
        values: sorted representable values in units of ``scale`` (table grids).
        revealed: boolean mask (``shape``) of elements whose value the released scale gives
            away exactly (see :func:`revealed_by_scale`); scored as unquantized.
        scale_rule: how the released scales follow the weights (``"absmax"``, ``"minmax"``,
            ``"none"``), as :meth:`reveal` recorded it.
        support: per-block ``(lower, upper)`` bounds (``scale``'s layout, float64) that the
            release puts on every weight of the block (see :func:`support_by_scale`), or
            ``None``; the outer cells are cut at them (method.md section 5).
        rounding: how the backend picked each weight's code. ``"nearest"``: the nearest grid
            point of a grid that stays fixed when one weight moves, so the cell moments follow
            in closed form from the grid (:meth:`moments`). Anything else (``"stochastic"``,
            ``"gptq"``, ``"data_dependent"``, ...): the cell of a weight depends on more than
            the grid, and scoring re-runs the scheme on perturbed weights instead (the Monte
            Carlo re-quantization of :mod:`~mis_lightning.quantization.requantize`,
            method.md section 5).
        quotient_dtype: the dtype of the rounded quotient (``kind == "quotient"`` only).
        storage_dtype: the dtype the trained weights are stored in (bfloat16 / float16), or
            ``None`` (float32 / float64: continuous). The scheme quantized ``rnd(theta-hat)``:
            each cell is the set of real weights whose stored value has its code, with edges at
            the storage midpoints next to the grid's own (:mod:`~mis_lightning.functional.storage`,
            method.md section 5). Set by :meth:`QuantizationScheme.apply` for round-to-nearest grids.
        quantize_arith: how the backend computes the quotient of a weight (affine grids):
            ``"div"`` (``theta / scale`` in float64, this library's RTN) or ``"mul_inv32"``
            (``theta * (1 / scale)`` in float32, torch's and torchao's float32 scales). Read where
            the stored weights' codes must be the backend's (:meth:`cell_value`, ``storage_dtype``).
        product_dtype: the dtype the backend computes a released value ``(q - zero_point) *
            scale`` (or ``value * scale``) in; ``None``: float64 (exact for a float32 scale).
        release_dtype: the dtype the release holds its values in (the model's dtype where the
            backend writes them back or dequantizes to it); ``None``: as computed.
        zero_count: released values exactly 0 (NaN counts as non-zero), where the backend
            counted them without keeping ``dequantized`` (:func:`zero_counts_only`); ``None``:
            count them in ``dequantized``.
    """

    name: str
    shape: tuple[int, ...]
    kind: Literal["affine", "table", "quotient"]
    dequantized: Tensor
    bits_per_weight: float
    scale: Tensor
    block_size: tuple[int, ...]
    zero_point: Tensor | None = None
    qmin: int = 0
    qmax: int = 0
    codes: Tensor | None = None
    values: Tensor | None = None
    revealed: Tensor | None = None
    support: tuple[Tensor, Tensor] | None = None
    scale_rule: str = "none"
    rounding: str = "nearest"
    method: str = ""
    quotient_dtype: torch.dtype | None = None
    storage_dtype: torch.dtype | None = None
    quantize_arith: str = "div"
    product_dtype: torch.dtype | None = None
    release_dtype: torch.dtype | None = None
    zero_count: int | None = None

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    def reveal(self, theta: Tensor, rule: Literal["absmax", "minmax"]) -> None:
        """Record what a weight-derived scale ``rule`` gives away about the trained weights
        ``theta`` (this grid's shape, its ``block_size``): the elements it determines exactly
        (:attr:`revealed`) and the bounds on every other one (:attr:`support`)."""
        shared = _SHARED_SCALE_FACTS.get()  # (the key only there: inference tensors have no version)
        version = None if shared is None else tensor_version(theta)
        key = None if version is None else (version, tuple(self.block_size), rule, theta.dtype, tuple(theta.shape))
        facts = None if key is None else next(
            (v for ref, k, v in shared if ref() is theta and k == key), None)
        if facts is None:
            facts = scale_facts(theta, self.block_size, rule)
            if key is not None:
                shared.append((weakref.ref(theta), key, facts))
        revealed, lo, hi = facts
        assert revealed is not None and lo is not None and hi is not None
        self.revealed, self.support = revealed, (lo, hi)
        self.scale_rule = rule

    def scale_setters(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The weights that set each element's released range ``[lo, hi]`` (``theta``: the
        trained weights): ``(lo_index, lo_sign, hi_index, hi_sign)``, each ``[numel]``, with
        ``lo = lo_sign * theta[lo_index]`` (flat indices; sign 0: that end is 0, set by no
        weight). Absmax scales: ``[-m, m]``, ``m = |theta|`` of the block's largest magnitude
        (the first on ties); min/max scales: ``[min(w_min, 0), max(w_max, 0)]``.

        Raises:
            ValueError: the grid's scales do not follow the weights (``scale_rule == "none"``).
        """
        if self.scale_rule not in ("absmax", "minmax"):
            raise ValueError(f"grid {self.name!r}: its scales do not follow the weights ({self.scale_rule!r})")
        t = theta.detach().to(torch.float64).reshape(self.shape)
        view, _ = _block_view(t, self.block_size)
        nd = t.dim()
        nbs = [view.shape[2 * i] for i in range(nd)]
        blk = view.permute(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2)).reshape(*nbs, -1)

        def per_element(local: Tensor) -> Tensor:
            flat = torch.zeros_like(local)
            rem = local
            for i in range(nd):  # unravel the block-local index, add the block's corner, ravel
                inner = math.prod(self.block_size[i + 1:])
                coord = torch.div(rem, inner, rounding_mode="floor")
                rem = rem - coord * inner
                corner = torch.arange(nbs[i]).reshape([-1 if j == i else 1 for j in range(nd)]) * self.block_size[i]
                flat = flat * self.shape[i] + corner + coord
            return _expand_blocks(flat.to(torch.float64), self.block_size, self.shape, 0, self.numel).long()

        def signs(v: Tensor) -> Tensor:
            return _expand_blocks(v.to(torch.float64), self.block_size, self.shape, 0, self.numel)

        if self.scale_rule == "absmax":
            local = torch.nan_to_num(blk.abs(), nan=-1.0).argmax(-1)  # [nb_0, ...] index within the block
            idx = per_element(local)
            sg = torch.sign(t.reshape(-1)[idx])
            return idx, -sg, idx, sg
        lo_local = torch.nan_to_num(blk, nan=math.inf).argmin(-1)
        hi_local = torch.nan_to_num(blk, nan=-math.inf).argmax(-1)
        lo_val = torch.gather(blk, -1, lo_local.unsqueeze(-1)).squeeze(-1)
        hi_val = torch.gather(blk, -1, hi_local.unsqueeze(-1)).squeeze(-1)
        return per_element(lo_local), signs(lo_val < 0), per_element(hi_local), signs(hi_val > 0)

    def _outer_edges(self, scale: Tensor, zp: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(low_edge, high_edge, step)`` per element: the upper edge of the lowest cell, the
        lower edge of the highest, and the uniform step (``None`` for value tables and stored
        cells, ``storage_dtype``, whose edges are the storage midpoints next to the grid's own)."""
        if self.storage_dtype is not None:
            low, high, _ = replace(self, storage_dtype=None)._outer_edges(scale, zp)
            z = zp.to(torch.float64)
            if self.kind == "affine":
                k_low, k_high = torch.full_like(low, self.qmin + 1.0), torch.full_like(high, float(self.qmax))
            elif self.kind == "quotient":
                k_low, k_high = self.qmin + 1.0 - z, self.qmax - z
            else:
                assert self.values is not None
                k_low, k_high = torch.ones_like(low), torch.full_like(high, self.values.numel() - 1.0)
            pair = stored_edges(torch.stack([low, high], -1), torch.stack([k_low, k_high], -1),
                                lambda v: self._stored_key(v, scale, zp), self.storage_dtype)
            return pair[:, 0], pair[:, 1], None
        s = scale.to(torch.float64)
        if self.kind == "affine":
            z = zp.to(torch.float64)
            return (self.qmin + 0.5 - z) * s, (self.qmax - 0.5 - z) * s, s
        if self.kind == "quotient":
            inv, lo, hi = self._quotient(scale, zp)
            t, j0 = quotient_thresholds(self._qdtype)
            t = t.to(s.device)
            # the upper edge of the lowest cell (lo) and the lower edge of the highest (hi)
            return t[(lo - j0).long()] / inv, t[(hi - 1 - j0).long()] / inv, None
        assert self.values is not None
        v = self.values.to(torch.float64)
        return 0.5 * (v[0] + v[1]) * s, 0.5 * (v[-2] + v[-1]) * s, None

    def element_bounds(self, start: int, end: int, *, shared: bool = False) -> tuple[Tensor, Tensor] | None:
        """``(lower, upper)`` ``[c]`` float64 of elements ``start:end`` (:attr:`support`), or ``None``.
        With ``storage_dtype``: the bounds on the continuous weights, the storage midpoints inside
        the stored extremes (:func:`~mis_lightning.functional.storage.stored_bounds`).
        ``shared``: the tensors may be those of another grid whose per-block values are bitwise
        equal, on the same range (:data:`SHARE_EXPANSIONS`): read them, never write them."""
        if self.support is None:
            return None
        lo = self._elem(self.support[0], start, end, "lower" if shared else None)
        hi = self._elem(self.support[1], start, end, "upper" if shared else None)
        if self.storage_dtype is not None:
            return stored_bounds(lo, hi, self.storage_dtype)
        return lo, hi

    def _elem(self, t: Tensor | None, start: int, end: int, role: str | None = None) -> Tensor:
        """``t``'s per-element values of elements ``start:end`` (float64; ``None``: zeros);
        ``role`` (what ``t`` is): shared with equal expansions (:func:`_shared_expansion`)."""
        if role is not None and SHARE_EXPANSIONS:
            return _shared_expansion(t, role, self.block_size, self.shape, start, end)
        if t is None:
            return torch.zeros(end - start, dtype=torch.float64)
        return _expand_blocks(t.to(torch.float64), self.block_size, self.shape, start, end)

    def element_grid(self, start: int, end: int, *, shared: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(scale [c], zero_point [c], code [c] or None)`` for elements ``start:end``. ``shared``:
        as :meth:`element_bounds`, for the zero point, and for the scale where it has at most
        :data:`_SMALL_SCALE` blocks (:data:`SHARE_SMALL_SCALES`: the casts' scale 1; the scales of
        two distinct grids otherwise differ)."""
        small = shared and SHARE_SMALL_SCALES and self.scale.numel() <= _SMALL_SCALE
        scale = self._elem(self.scale, start, end, "scale" if small else None)
        zp = self._elem(self.zero_point, start, end, "zero_point" if shared else None)
        code = None
        if self.codes is not None:
            code = self.codes.reshape(-1)[start:end].to(torch.float64)
        return scale, zp, code

    def moments(self, theta: Tensor, sigma: Tensor, start: int, end: int,
                use_codes: bool = True, compile_policy: CompilePolicy | None = None,
                kappa_only: bool = False) -> CellMoments:
        """Cell moments of elements ``start:end`` given their weights and std (each ``[c]``).

        ``use_codes=False`` locates each weight's cell from the grid alone (for weights other
        than the trained ones, e.g. the parametric bootstrap of the uncertainty interval).
        ``compile_policy``: the caller's :class:`~mis_lightning.functional.CompilePolicy`.
        ``kappa_only``: only ``kappa`` is read (:meth:`element_moments`; ``kappa`` bitwise the same).
        """
        scale, zp, code, dead, bounds = self._chunk_grid(start, end)
        if not use_codes:
            code = None
        rev, rev_ii = self._revealed_at(start, end, theta.device)
        any_rev = rev_ii is not None and rev_ii.numel() > 0
        known = rev if any_rev and REVEALED_SKIPPED and self.storage_dtype is None and self.kind != "quotient" else None
        mm = self.element_moments(theta, sigma, scale, zp, code, bounds, compile_policy,
                                  kappa_only=kappa_only, known=known)
        if dead is not None:
            zero = torch.zeros_like(mm.kappa)
            mm = _FreshMoments(kappa=torch.where(dead, zero, mm.kappa),
                               mean_abs=torch.where(dead, zero, mm.mean_abs),
                               m4=torch.where(dead, zero, mm.m4),
                               coverage=torch.where(dead, torch.ones_like(zero), mm.coverage))
        if rev is not None:
            # Elements the released scale / zero point give away exactly (the absmax of a
            # symmetric block, the min and max of an asymmetric one) leak like float weights:
            # a stored weight's value given away is rnd_D(theta-hat), the storage grid's (st31)
            if any_rev and self.storage_dtype is not None:
                ii = rev_ii
                sm = storage_cell_moments(theta[ii], sigma[ii], self.storage_dtype)
                out = []
                for f in ("kappa", "mean_abs", "m4", "coverage"):
                    t = getattr(mm, f).to(torch.float64).clone()
                    t[ii] = getattr(sm, f)
                    out.append(t)
                mm = CellMoments(*out)
            elif any_rev and REVEALED_IN_PLACE and isinstance(mm, _KappaOnlyMoments):
                mm.kappa.index_fill_(0, rev_ii, 1.0)
            elif any_rev and REVEALED_IN_PLACE and isinstance(mm, _FreshMoments):
                for t, v in zip((mm.kappa, mm.mean_abs, mm.m4, mm.coverage), (1.0, SQRT_2_OVER_PI, 3.0, 1.0)):
                    t.index_fill_(0, rev_ii, v)
            elif any_rev:  # (new tensors: the moments' fields may be shared)
                mm = CellMoments(kappa=mm.kappa.masked_fill(rev, 1.0),
                                 mean_abs=mm.mean_abs.masked_fill(rev, SQRT_2_OVER_PI),
                                 m4=mm.m4.masked_fill(rev, 3.0),
                                 coverage=mm.coverage.masked_fill(rev, 1.0))
        return mm

    def _revealed_at(self, start: int, end: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """``(mask [c] bool, indices [r] int64)`` of the revealed elements of ``start:end``
        (:attr:`revealed`), or ``(None, None)`` without them. Kept for the later calls on the same
        range of every grid whose :attr:`revealed` is the same tensor (:data:`REUSE_CHUNK_FACTS`,
        :data:`_REVEALED`: the pool call's after the main one, the other schemes' with the same
        scale facts, the point-mass proof's): the indices write the revealed elements' moments in
        place (a few per block, not a pass over the chunk's mask per field). Read, never
        written, by the callers."""
        if self.revealed is None:
            return None, None
        extra = (start, end, str(device))
        if REUSE_CHUNK_FACTS:
            for key, hit in _REVEALED:
                if _key_matches(key, (self.revealed,), extra):
                    return hit
        rev = self.revealed.reshape(-1)[start:end].to(device)
        out = (rev, torch.nonzero(rev).squeeze(-1))
        if REUSE_CHUNK_FACTS:
            _REVEALED.insert(0, (_fact_key((self.revealed,), extra), out))
            del _REVEALED[_FACT_SLOTS:]
        return out

    def _chunk_grid(self, start: int, end: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None,
                                                         tuple[Tensor, Tensor] | None]:
        """``(scale, zero_point, code, dead, bounds)`` of elements ``start:end`` as :meth:`moments`
        reads them: :meth:`element_grid` with dead blocks (scale 0) at scale 1 and code
        ``zero_point``, ``dead`` their mask (``None``: none) and :meth:`element_bounds`. Kept for
        the next calls on the same range while the grid's tensors are unchanged
        (:data:`REUSE_CHUNK_FACTS`); the tensors returned are read, never written, by the callers."""
        src = (self.scale, self.zero_point, self.codes,
               *(self.support if self.support is not None else (None, None)))
        extra = (start, end, self.block_size, self.shape, self.storage_dtype, self.support is None)
        if REUSE_CHUNK_FACTS:
            hit = _fact_get("grid", src, extra)
            if hit is not None:
                return hit
        scale, zp, code = self.element_grid(start, end, shared=True)
        # A block whose scale is 0 (torchao float8 on an all-zero row or group: every element
        # is exactly 0) is a one-cell grid {0}: no cell information (moments 0). Its scale
        # reveals max |w| = 0, i.e. every element exactly (``revealed`` in moments(): kappa 1).
        # (a scale of a few blocks, every one positive: no element's is 0, without a [c] test)
        few = SHARE_SMALL_SCALES and self.scale.numel() <= _SMALL_SCALE and bool((self.scale > 0).all())
        dead: Tensor | None = None if few else scale <= 0
        if dead is not None and any_set(dead):
            scale = torch.where(dead, torch.ones_like(scale), scale)
            if code is not None:
                code = torch.where(dead, zp, code)
        else:
            dead = None
        out = (scale, zp, code, dead, self.element_bounds(start, end, shared=True))
        if REUSE_CHUNK_FACTS:
            _fact_put("grid", src, extra, out)
        return out

    def element_moments(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor,
                        code: Tensor | None = None, bounds: tuple[Tensor, Tensor] | None = None,
                        compile_policy: CompilePolicy | None = None, kappa_only: bool = False,
                        known: Tensor | None = None, path_elements: int | None = None) -> CellMoments:
        """Cell moments of any elements given their per-element grid parameters (each ``[c]``:
        ``scale > 0``, ``zero_point``, the backend's ``code`` or ``None``, and the release's
        ``bounds``, :attr:`support` expanded; ``None``: unbounded). Dead blocks and revealed
        elements are :meth:`moments`' business. ``kappa_only``: only ``kappa`` is needed (the
        bootstrap draws); affine grids may then leave ``mean_abs`` and ``m4`` uncomputed (NaN)
        or uncorrected for the bounds, and a chunk mostly of point masses returns ``mean_abs``,
        ``m4`` and ``coverage`` as one NaN expanded to ``[c]`` (stride 0: read them, never write
        them; :data:`KAPPA_ONLY_STANDINS`); ``kappa`` is bitwise the same. With ``storage_dtype``:
        elements within ``STORAGE_EXACT_MAX_ULPS`` storage ulps on the stored cells (exact window
        sums), the others on the grid's own edges; where the stored cells within an element's reach
        are the storage cells themselves (a grid that holds every ``D`` value there: ``fp16`` or
        ``bf16`` on a bf16 model), the storage grid's moments
        (:func:`~mis_lightning.functional.storage.storage_cell_moments`), at any sd. ``known``:
        ``[c]`` bool, elements whose four fields the caller overwrites (:meth:`moments`' revealed
        ones, :data:`REVEALED_SKIPPED`): affine and value-table grids without ``storage_dtype``
        may leave them off the paths (their values then unspecified); ``None``: none.
        ``path_elements`` (affine grids without ``storage_dtype``; at least ``c``): the elements take
        the kernel paths of a call of that many elements of which they are a part, e.g. a sample
        of pairs standing for the larger call it was padded to before (the fused affine kernel from
        ``affine.TABLE_MIN_ELEMENTS``; the kernels are element-wise, so each element's moments are
        those of the larger call's, up to the vectorised transcendentals' scalar tail, an ulp:
        :func:`~mis_lightning.functional.kernel.in_blocks`); ``None``: the call's own size.

        Raises:
            ValueError: ``path_elements`` on another grid, or below ``c``."""
        if path_elements is not None and (self.kind != "affine" or self.storage_dtype is not None
                                          or path_elements < theta.shape[0]):
            raise ValueError(f"grid {self.name!r}: path_elements={path_elements} needs an affine grid without "
                             f"storage_dtype and at least the call's {theta.shape[0]} elements "
                             f"(kind {self.kind!r}, storage_dtype {self.storage_dtype})")
        if self.storage_dtype is not None:
            same = self._storage_cells(theta, sigma, scale, zero_point, bounds)
            if same is not None and bool(same.any()):
                D = self.storage_dtype
                return _merge_moments(theta.shape[0], theta.device, [
                    (torch.nonzero(same).squeeze(-1), lambda ii: storage_cell_moments(theta[ii], sigma[ii], D)),
                    (torch.nonzero(~same).squeeze(-1),
                     lambda ii: self._stored_grid_moments(theta[ii], sigma[ii], scale[ii], zero_point[ii],
                                                          _pick(code, ii), _pick(bounds, ii), compile_policy,
                                                          kappa_only))])
            return self._stored_grid_moments(theta, sigma, scale, zero_point, code, bounds, compile_policy,
                                             kappa_only)
        return self._own_moments(theta, sigma, scale, zero_point, code, bounds, compile_policy, kappa_only,
                                 None if self.kind == "quotient" else known, path_elements)

    def _stored_grid_moments(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor,
                             code: Tensor | None, bounds: tuple[Tensor, Tensor] | None,
                             compile_policy: CompilePolicy | None, kappa_only: bool) -> CellMoments:
        """``storage_dtype`` grids: elements whose sd dwarfs their bounded window in the wide-sd
        closed form on the stored cells (:meth:`_stored_wide`, :data:`STORED_WIDE_CLOSED_FORM`);
        the others within ``STORAGE_EXACT_MAX_ULPS`` storage ulps (or ``STORAGE_FINE_CELLS``
        cells, or a bound within reach) on the stored cells, the rest on the grid's own edges."""
        if STORED_WIDE_CLOSED_FORM and WIDE_SD_CLOSED_FORM and bounds is not None:
            closed = self._stored_wide(theta, sigma, scale, zero_point, code, bounds, kappa_only)
            if closed is not None:
                jj, kappa, mean_abs, m4, _, err4 = closed
                c = theta.shape[0]
                cov = torch.ones_like(kappa)
                if err4 is not None and bool((err4 > SERIES_TOL).any()):
                    # m4's bound fails where kappa's holds (a draw far beyond a bound): m4 from
                    # the exact stored-cell sums (kappa stays the series', as a kappa_only call's)
                    bad = torch.nonzero(err4 > SERIES_TOL).squeeze(-1)
                    kb = jj.index_select(0, bad)
                    sub = self._stored_paths(theta[kb], sigma[kb], scale[kb], zero_point[kb], _pick(code, kb),
                                             _pick(bounds, kb), compile_policy, False)
                    m4[bad] = sub.m4.to(torch.float64)
                if jj.numel() == c:
                    return _FreshMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=cov)
                rest = torch.ones(c, dtype=torch.bool, device=theta.device)
                rest[jj] = False
                kk = torch.nonzero(rest).squeeze(-1)
                return _merge_moments(c, theta.device, [
                    (jj, lambda _: CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=cov)),
                    (kk, lambda ii: self._stored_paths(theta[ii], sigma[ii], scale[ii], zero_point[ii],
                                                       _pick(code, ii), _pick(bounds, ii), compile_policy,
                                                       kappa_only))])
        return self._stored_paths(theta, sigma, scale, zero_point, code, bounds, compile_policy, kappa_only)

    def _stored_wide(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor, code: Tensor | None,
                     bounds: tuple[Tensor, Tensor], kappa_only: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None] | None:
        """The weights whose sd spans their bounded window, on the stored cells in closed form
        (:mod:`~mis_lightning.functional.wide_series`): ``(ii, kappa, mean_abs, m4, err, err4)``,
        the indices of the elements it holds for (``[m]``: bounds, the stored bounds of
        :meth:`element_bounds`, at most ``SERIES_MAX_WINDOW`` sd apart, their centre within
        ``SERIES_MAX_SHIFT`` of the weight, inside them or beyond one, and kappa's error bound
        ``err`` at most ``SERIES_TOL``), their float64 moments and ``m4``'s error bound ``err4``,
        which may exceed ``SERIES_TOL`` (the caller then takes ``m4`` elsewhere); ``kappa_only``:
        ``mean_abs`` and ``m4`` NaN, ``err4`` ``None`` (``kappa`` and ``err`` bitwise the same).
        Coverage 1 is the caller's. ``None`` when none qualifies or the grid has more than
        ``WIDE_TABLE_MAX_VALUES`` keys.

        The series holds on any partition of the window: here the cells are the stored ones (the
        grid's cells as the stored weights fall into them: edges at storage midpoints, empty cells
        of width 0), clipped to the stored bounds as :meth:`_storage_moments` clips them, from
        one row of stored edges per run of elements with equal scale, zero point and bounds (a
        block). ``kappa`` reads at least the exact stored-cell sums' value and at most
        ``SERIES_TOL`` above it, ``m4`` is within ``SERIES_TOL`` of theirs, ``mean_abs`` exact on the
        stored own cell (docs/method.md section 5, "The bounded window on stored grids")."""
        n_edges = (self.qmax - self.qmin) if self.kind != "table" else self.values.numel() - 1  # type: ignore[union-attr]
        if n_edges + 1 > WIDE_TABLE_MAX_VALUES:
            return None
        th, sg = theta.to(torch.float64), sigma.to(torch.float64)
        lo, hi = bounds[0].to(torch.float64), bounds[1].to(torch.float64)
        # the window at most SERIES_MAX_WINDOW sd wide, its centre within SERIES_MAX_SHIFT (the
        # series' cancellation) of the weight, inside its bounds or beyond one (a bootstrap draw;
        # sd 0, NaN and infinite bounds fail)
        x0_all, half_all = 0.5 * (lo + hi), 0.5 * (hi - lo)
        cand = ((hi - lo <= SERIES_MAX_WINDOW * sg) & (hi > lo)
                & (half_all * (th - x0_all).abs() <= SERIES_MAX_SHIFT * sg * sg))
        n = int(cand.sum())
        if n == 0:
            return None
        ii = torch.nonzero(cand).squeeze(-1) if n < cand.numel() else None

        def pick(t: Tensor) -> Tensor:
            return t if ii is None else t.index_select(0, ii)

        th, sg, lo, hi = pick(th), pick(sg), pick(lo), pick(hi)
        s64, z64 = pick(scale.to(torch.float64)), pick(zero_point.to(torch.float64))
        # one row of stored edges per run of equal grid and bounds (the layout of _stored_table)
        new = (s64[1:] != s64[:-1]) | (z64[1:] != z64[:-1]) | (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        gid, first = _runs(new)
        su, zu, lu, hu = s64[first], z64[first], lo[first], hi[first]
        low = self._lowest_key(su, zu)
        h = (n_edges + 1) // 2
        width = 2 * h + 2
        rows = max(1, _STORAGE_ROWS_BUDGET // width)
        x0, half = 0.5 * (lu + hu), 0.5 * (hu - lu)
        tab, unit = [], []
        for a in range(0, su.numel(), rows):
            b = a + rows
            t = self._stored_window(su[a:b], su[a:b], zu[a:b], low[a:b] + h, h)
            tab.append(t)
            # the cells clipped to the bounds (edges beyond them, and the +-inf beyond the code
            # range, fall on a bound: cells of width 0; the regions beyond are revealed), in the
            # window's units
            lb, ub = lu[a:b].unsqueeze(-1), hu[a:b].unsqueeze(-1)
            inner = torch.minimum(torch.maximum(t[:, 1:-1], lb), ub)
            unit.append((torch.cat([lb, inner, ub], dim=-1) - x0[a:b].unsqueeze(-1)) / half[a:b].unsqueeze(-1))
        e = torch.cat(unit)
        hw = half.index_select(0, gid)
        u0, rho = (x0.index_select(0, gid) - th) / sg, hw / sg
        # the fewest terms whose truncation takes at most a 16th of the tolerance on every element
        umin = (u0.abs() - rho).clamp_min(0.0)
        c3 = (torch.diff(e, dim=-1) ** 3).sum(-1).index_select(0, gid) * rho**3
        # (kappa's bound alone: a kappa_only call takes the same terms, so the same kappa)
        factor = 0.44 * torch.exp(-0.25 * umin * umin) * c3 / 12.0  # (Cramer K phi(0) < 0.44)
        N = series_terms(rho, factor, SERIES_TOL / 16.0)
        # per-block power sums in blocks of windows: their [windows, cells, ~2N] temporaries stay
        # cache-sized (a 2^18-weight chunk of int8 g32 blocks: 8,192 windows of 257 cells)
        step = max(1, _STORAGE_ROWS_BUDGET // (e.shape[1] * (2 * N + 8)))
        parts = [series_coefficients(e[a:a + step], N) for a in range(0, e.shape[0], step)]
        Q, q3, q5 = (torch.cat([p[i] for p in parts]) for i in range(3))
        m = th.shape[0]
        kappa, err = torch.empty_like(th), torch.empty_like(th)
        m4 = None if kappa_only else torch.empty_like(th)
        err4 = None if kappa_only else torch.empty_like(th)
        if kappa_only:  # (A2's sums alone)
            Q = Q[:, :1].contiguous()
        # per element in blocks of about _SERIES_BLOCK gathered sums
        block = max(1024, _SERIES_BLOCK // (Q.shape[1] * N))
        for a in range(0, m, block):
            sl = slice(a, a + block)
            g = gid[sl]
            k, eb, m4b, e4b = series_moments(u0[sl], rho[sl], Q.index_select(0, g), q3.index_select(0, g),
                                             q5.index_select(0, g), kappa_only)
            kappa[sl], err[sl] = k, eb
            if m4 is not None and err4 is not None and m4b is not None and e4b is not None:
                m4[sl], err4[sl] = m4b, e4b
        ok = err <= SERIES_TOL
        if not bool(ok.any()):
            return None
        keep = torch.nonzero(ok).squeeze(-1)
        idx = keep if ii is None else ii.index_select(0, keep)
        kappa, err = kappa.index_select(0, keep), err.index_select(0, keep)
        if m4 is None or err4 is None:
            nan = torch.full_like(kappa, math.nan)
            return idx, kappa, nan, nan.clone(), err, None
        # column j of a row: the edge below key low + j
        th, sg, lo, hi = (t.index_select(0, keep) for t in (th, sg, lo, hi))
        g = gid.index_select(0, keep)
        center = self._center(th, s64.index_select(0, keep), z64.index_select(0, keep),
                              None if code is None else pick(code).index_select(0, keep))
        col = (center - low.index_select(0, g)).long() + g * width
        flat = torch.cat(tab).reshape(-1)
        mean_abs = own_cell_mean_abs(th, sg, lo, hi, flat.take(col), flat.take(col + 1))
        return idx, kappa, mean_abs, m4.index_select(0, keep), err, err4.index_select(0, keep)

    def _stored_paths(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor,
                      code: Tensor | None, bounds: tuple[Tensor, Tensor] | None,
                      compile_policy: CompilePolicy | None, kappa_only: bool) -> CellMoments:
        """:meth:`_stored_grid_moments` without the wide-sd closed form: the exact stored-cell sums
        or the grid's own edges, as :meth:`_storage_exact` decides."""
        exact, center, need, wide = self._storage_exact(theta, sigma, scale, zero_point, code, bounds)
        own = replace(self, storage_dtype=None)
        if wide is None:
            if bool(exact.all()):
                return self._storage_moments(theta, sigma, scale, zero_point, center, need, bounds,
                                             compile_policy, kappa_only)
            if not bool(exact.any()):
                return own.element_moments(theta, sigma, scale, zero_point, code, bounds, compile_policy, kappa_only)
        # (wide elements are never exact: the three groups are disjoint)
        groups = [
            (torch.nonzero(exact).squeeze(-1),
             lambda ii: self._storage_moments(theta[ii], sigma[ii], scale[ii], zero_point[ii], center[ii],
                                              need[ii], _pick(bounds, ii), compile_policy, kappa_only)),
            (torch.nonzero(~exact if wide is None else ~exact & ~wide).squeeze(-1),
             lambda ii: own.element_moments(theta[ii], sigma[ii], scale[ii], zero_point[ii], _pick(code, ii),
                                            _pick(bounds, ii), compile_policy, kappa_only))]
        if wide is not None:
            groups.append((torch.nonzero(wide).squeeze(-1),
                           lambda ii: self._overflow_open_moments(theta[ii], sigma[ii], scale[ii], kappa_only,
                                                                 zero_point[ii])))
        return _merge_moments(theta.shape[0], theta.device, [(ii, f) for ii, f in groups if ii.numel()])

    def _own_moments(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor,
                     code: Tensor | None, bounds: tuple[Tensor, Tensor] | None,
                     compile_policy: CompilePolicy | None, kappa_only: bool,
                     known: Tensor | None = None, path_elements: int | None = None) -> CellMoments:
        """The grid's own cells (no storage rounding); point-mass elements in closed form
        (:meth:`_point_masses`); ``known`` (affine and value-table grids) and ``path_elements``
        (affine grids): as :meth:`element_moments`."""
        if POINT_MASS_CLOSED_FORM:
            c = theta.shape[0]
            # (the size of the call whose paths the elements take: a padded call's, path_elements)
            c_path = c if path_elements is None else max(c, path_elements)
            found = self._point_split(theta, sigma, scale, zero_point, code, bounds)
            if found is not None:
                point, n_point, zf = found
                n = c - n_point
                # the elements to score are the sd > 0 ones (the sd's kept indices, no pass over the
                # chunk) when every sd-0 element is a point mass or known (revealed: never inside)
                live = take = None
                apart: tuple[Tensor, CellMoments] | None = None  # (sd-0 weights not point masses, their moments)
                if zf is not None and (n_point == zf.count or (known is not None and not any_set(
                        torch.logical_xor(point, zf.mask).logical_and_(~known)))):
                    live = zf.live()
                elif _table.SD_ZERO_APART and zf is not None and known is None and POINT_MASS_LIVE_ONLY \
                        and self.kind == "table" and self.values is not None and theta.device.type == "cpu" \
                        and self._unit_scale():
                    # a 16-bit cast's sd-0 weights that are not point masses (ties, near-edges)
                    # without the table call (table.sd_zero_moments; the same numbers)
                    zz, zm, live = _sd_zero_split(theta, scale, self.values, kappa_only, point, zf.mask)
                    if zz is not None and zm is not None:
                        apart = (zz, zm)
                else:
                    take = ~point
                kappa = torch.zeros(c, dtype=torch.float64, device=theta.device)
                standin = kappa_only and KAPPA_ONLY_STANDINS
                if standin:  # kappa alone is read: the others NaN, one stride-0 value (no chunk-sized tensor)
                    mean_abs = m4 = coverage = torch.full((1,), math.nan, dtype=torch.float64,
                                                          device=theta.device).expand(c)
                else:
                    mean_abs, m4, coverage = torch.zeros_like(kappa), torch.zeros_like(kappa), torch.ones_like(kappa)
                m = n
                if known is not None:  # (the path's size as with them: the others' paths unchanged)
                    if live is not None:
                        live = live[~known.index_select(0, live)]
                        m = live.numel()
                    else:
                        assert take is not None
                        take &= ~known
                        m = int(take.sum())
                if m:
                    size = None if m == n else n  # (the known ones' call: a call of n elements' path)
                    if n < _POINT_MASS_PATH_MIN <= c_path:
                        if (POINT_MASS_LIVE_ONLY and self.kind in ("affine", "table")) or c_path > c:
                            size = _POINT_MASS_PATH_MIN  # the live ones alone, on the whole chunk's path
                        else:
                            # padded with point-mass elements (the chunk's first ones) so that the live
                            # ones take the whole chunk's path; their moments are read from the call.
                            # One scan for the indices, in the chunk's order (no sort of a gathered list)
                            size = None
                            if take is None:
                                take = ~point
                                if known is not None:
                                    take &= ~known
                            take |= point & (torch.cumsum(point, 0, dtype=torch.int32) <= _POINT_MASS_PATH_MIN - m)
                            live = None
                    ii = torch.nonzero(take).squeeze(-1) if live is None else live
                    sel = lambda t: t.index_select(0, ii)  # noqa: E731
                    th_l, sc_l = _live_gathers(theta, scale, ii) if SHARE_LIVE_GATHERS and self.kind == "table" \
                        else (sel(theta), sel(scale))
                    if apart is not None and size is None:  # (the live weights take the path of the n as before)
                        size = n
                    sub = self._path_moments(th_l, sigma.index_select(0, ii), sc_l, sel(zero_point),
                                             None if code is None else sel(code),
                                             None if bounds is None else (sel(bounds[0]), sel(bounds[1])),
                                             compile_policy, kappa_only, size)
                    for part, got in ((ii, sub),) if apart is None else ((ii, sub), apart):
                        for o, f in zip((kappa, mean_abs, m4, coverage), ("kappa", "mean_abs", "m4", "coverage")):
                            o.index_copy_(0, part, getattr(got, f).to(torch.float64))
                            if standin:
                                break
                if standin:
                    return _KappaOnlyMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)
                return _FreshMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)
        return self._path_moments(theta, sigma, scale, zero_point, code, bounds, compile_policy, kappa_only,
                                  None if path_elements is None else max(theta.shape[0], path_elements), known=known)

    def wide_shares(self, theta: Tensor, sigma: Tensor, free_tol: float, samples: int = 4096) -> tuple[float, float]:
        """``(closed, free)``: the share of the grid's elements the wide-sd closed form takes
        (:meth:`_wide_sd`) and the share whose kappa the bootstrap draws keep
        (:meth:`wide_position_free` at ``free_tol``), on ``samples`` elements in 8 evenly spaced
        runs; ``(0.0, 0.0)`` where the closed form is off or the grid has no bounds. ``theta``, ``sigma``:
        ``[numel]`` (flat, parameter units). What :mod:`~mis_lightning.assess` leaves out of the
        fused kernel's coming elements (the compile policy's count): those elements never reach
        it. So do, with :data:`SHARES_COUNT_SD_ZERO`, the sd-0 elements of the runs where they are
        at least :data:`POINT_MASS_MIN_FRACTION` of it, where every other sampled element of the
        tensor (but revealed ones) takes the closed form (the point masses' closed form,
        :meth:`_own_moments`, then leaves nothing to a path) and, where every other one is free
        too, in the draws' share (no element moves: none evaluated; the 1e7 MLP's second layer,
        94% dead units: 63M elements counted, none reached the kernel)."""
        wide = WIDE_SD_CLOSED_FORM and self.support is not None
        points = SHARES_COUNT_SD_ZERO and POINT_MASS_CLOSED_FORM
        if not wide:
            return 0.0, 0.0
        n = self.numel
        run = max(1, min(n, samples) // 8)
        closed_hits = free_hits = seen = zero_hits = zero_free = 0
        all_closed = all_free = True
        for a in sorted({int(i) for i in torch.linspace(0, max(n - run, 0), 8).round().tolist()}):
            b = min(a + run, n)
            scale, zp, code = self.element_grid(a, b)
            live = scale > 0  # (dead blocks: the one-cell grid of moments(), not the closed form)
            sg = sigma[a:b].to(torch.float64)
            seen += b - a
            free = torch.zeros_like(live)
            ok_live = torch.zeros_like(live)  # (the run's elements the closed form takes)
            if wide:
                bounds = self.element_bounds(a, b)
                assert bounds is not None
                closed = self._wide_closed(theta[a:b].to(torch.float64), sg,
                                           torch.where(live, scale, torch.ones_like(scale)), zp,
                                           code, bounds, kappa_only=True)
                if closed is not None:
                    ii, _, _, ok = closed
                    closed_hits += int((ok & live).sum()) if ii is None else int((ok & live[ii]).sum())
                    if ii is None:
                        ok_live = ok
                    else:
                        ok_live[ii] = ok
                free = self.wide_position_free(sg, scale, zp, bounds, free_tol)
            if points:
                # sd 0 never takes the wide-sd closed form (no double count); counted only where
                # every other sampled weight of the tensor does (else the live ones' path, padded to
                # a chunk's, and the draws' evaluations may take the sd-0 ones to the kernel)
                zero = (sg <= torch.finfo(torch.float64).tiny) & live
                n_zero = int(zero.sum())
                # (revealed weights: never on a path either, REVEALED_SKIPPED; dead blocks: one cell)
                done = zero | ~live
                if self.revealed is not None:
                    done |= self.revealed.reshape(-1)[a:b].to(torch.bool)
                all_closed &= bool((done | ok_live).all())
                all_free &= bool((done | free).all())
                if n_zero >= POINT_MASS_MIN_FRACTION * (b - a):
                    zero_hits += n_zero
                    zero_free += int((zero & ~free).sum())
            free_hits += int(free.sum())
        if points and all_closed:
            closed_hits += zero_hits
            if all_free:
                free_hits += zero_free
        return (closed_hits / seen, free_hits / seen) if seen else (0.0, 0.0)

    def wide_position_free(self, sigma: Tensor, scale: Tensor, zero_point: Tensor,
                           bounds: tuple[Tensor, Tensor], tol: float) -> Tensor:
        """``[c]`` bool: affine-grid elements whose bounded window is at most ``WIDE_MAX_WINDOW``
        sd wide and whose kappa bound ``S`` (:func:`~mis_lightning.functional.wide.wide_deficit_bound`)
        is at most ``tol``: their kappa lies in ``[1 - S, 1]`` wherever the weight sits, so it moves
        by at most ``tol`` between theta-hat and any bootstrap draw (``[c]`` tensors as
        :meth:`element_grid` / :meth:`element_bounds` give them; all False off affine grids or
        with the closed form off)."""
        lo, hi = bounds
        sg = sigma.to(torch.float64)
        free = (hi - lo <= WIDE_MAX_WINDOW * sg) & (scale > 0)
        if not WIDE_SD_CLOSED_FORM or self.kind != "affine" or self.storage_dtype is not None or not any_set(free):
            return free & False
        ii = torch.nonzero(free).squeeze(-1)
        low_edge, high_edge, step = self._outer_edges(scale[ii], zero_point[ii])
        assert step is not None
        cube = affine_cube_sum(lo[ii], hi[ii], low_edge, high_edge, step)
        free[ii] = wide_deficit_bound(sg[ii], cube) <= tol
        return free

    def _wide_closed(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor, code: Tensor | None,
                     bounds: tuple[Tensor, Tensor], kappa_only: bool
                     ) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor] | None:
        """:meth:`_wide_sd`'s closed form on its candidates: ``(ii, kappa, mean_abs, ok)``, ``ii`` the
        candidates' indices (``None``: every element, when they are most), the others ``[m]`` over
        them (``mean_abs``: ``None`` when ``kappa_only``), ``ok`` where the error bound holds;
        ``None`` when the grid takes no closed form or no element is a candidate."""
        if self.kind == "quotient" or (self.kind == "table" and (
                self.values is None or self.values.numel() > WIDE_TABLE_MAX_VALUES)):
            return None
        c = theta.shape[0]
        lo, hi = bounds
        # (sd 0, NaN and infinite bounds all fail the first test); in cache-sized blocks (its
        # chunk-sized temporaries cost 2-5 ms per 2^18 weights, a tenth of the closed form)
        cand = torch.empty(c, dtype=torch.bool, device=theta.device)
        for a in range(0, c, EAGER_BLOCK):
            sl = slice(a, a + EAGER_BLOCK)
            cand[sl] = _wide_candidates(theta[sl], sigma[sl], lo[sl], hi[sl])
        n = int(cand.sum())
        if n == 0:
            return None
        # most elements: the whole chunk (no gathers; the others' values are discarded)
        ii = torch.nonzero(cand).squeeze(-1) if 2 * n < c else None
        args = [theta, sigma, scale, zero_point, lo, hi] + ([] if code is None else [code])
        if ii is not None:
            args = [t.index_select(0, ii) for t in args]
        m = args[0].shape[0]
        # the candidates' test is ok's first three where the inputs are float64 (the same operations)
        same = ii is None and all(t.dtype == torch.float64 for t in (theta, sigma, lo, hi))
        kappa = torch.empty(m, dtype=torch.float64, device=theta.device)
        ok = torch.empty(m, dtype=torch.bool, device=theta.device)
        mean_abs = None if kappa_only else torch.empty_like(kappa)
        # C3 of the whole chunk depends on the grid and bounds alone: the main call's serves the
        # pool call's (REUSE_CHUNK_FACTS; a float8 chunk's table_cube_sum ~3 ms per 2^18 weights)
        kept = keep = None
        if ii is None and REUSE_CHUNK_FACTS:
            src = (lo, hi, scale, zero_point, self.values)
            extra = (self.kind, self.qmin, self.qmax)
            kept = _fact_get("cube", src, extra)
            if kept is None and not kappa_only:
                keep = torch.empty(c, dtype=torch.float64, device=theta.device)
        blocks = self._chunk_cube(scale, zero_point, bounds) if ii is None and kept is None else None
        if blocks is not None and (keep is not None or CUBE_KEPT_KAPPA_ONLY and REUSE_CHUNK_FACTS):
            # (kappa_only: kept only where the tensors are the chunk's grid, as the main and pool
            # calls read it, not the draws' other tensors; held, not copied)
            keep = blocks
        # in cache-sized blocks: ~60 element-wise operations (kernel.EAGER_BLOCK); the one-pass form
        # (functional.wide.FUSED_WIDE_SD) on one scratch for the call's blocks
        fused = _wide.FUSED_WIDE_SD
        scratch = _wide.WideScratch(min(m, EAGER_BLOCK), theta.device) if fused else None
        for a in range(0, m, EAGER_BLOCK):
            th, sg, sc, zp, lb, ub, *cd = (t[a:a + EAGER_BLOCK].to(torch.float64) for t in args)
            if kept is not None:
                cube = kept[a:a + EAGER_BLOCK]
            elif blocks is not None:
                cube = blocks[a:a + EAGER_BLOCK]
            elif self.kind == "affine":
                low_edge, high_edge, step = self._outer_edges(sc, zp)
                assert step is not None
                cube = affine_cube_sum(lb, ub, low_edge, high_edge, step)
            else:
                assert self.values is not None
                cube = table_cube_sum(lb, ub, sc, self.values)
            if keep is not None and blocks is None:
                keep[a:a + EAGER_BLOCK] = cube
            if scratch is not None:
                sl = slice(a, a + EAGER_BLOCK)
                _wide.wide_sd_block(th, sg, lb, ub, cube, cand[sl] if same else None, kappa[sl], ok[sl],
                                    None if mean_abs is None else mean_abs[sl],
                                    partial(self._own_edges64, th, sc, zp, cd[0] if cd else None), scratch)
                continue
            # kappa alone (the pool protocol's call, the draws): no own cell, mean_abs NaN
            own_lo, own_hi = (None, None) if kappa_only else self._own_edges(th, sc, zp, cd[0] if cd else None)
            k, ma, good = wide_sd_parts(th, sg, lb, ub, cube, own_lo, own_hi,
                                        cand[a:a + EAGER_BLOCK] if same else None, own_fresh=True)
            kappa[a:a + EAGER_BLOCK], ok[a:a + EAGER_BLOCK] = k, good
            if mean_abs is not None and ma is not None:
                mean_abs[a:a + EAGER_BLOCK] = ma
        if keep is not None:
            _fact_put("cube", src, extra, keep)
        return ii, kappa, mean_abs, ok

    def _chunk_cube(self, scale: Tensor, zero_point: Tensor, bounds: tuple[Tensor, Tensor]) -> Tensor | None:
        """``C3`` ``[c]`` (float64, parameter units; :func:`~mis_lightning.functional.wide.affine_cube_sum`,
        :func:`~mis_lightning.functional.wide.table_cube_sum`) of the chunk whose per-element
        ``scale``, ``zero_point`` and ``bounds`` are the very tensors :meth:`_chunk_grid` returned
        for it (still held: its range is read from that entry), computed on the grid's per-block
        values of the chunk's rows and expanded (:data:`WIDE_CUBE_BLOCKS`): bitwise what the
        per-element computation gives. ``None`` where the range is not known or the switch is off."""
        if not (WIDE_CUBE_BLOCKS and REUSE_CHUNK_FACTS) or self.storage_dtype is not None \
                or self.support is None or not self.shape:
            return None
        src = (self.scale, self.zero_point, self.codes, *self.support)
        rng = None
        for key, value in _FACTS["grid"]:
            if value[0] is scale and value[1] is zero_point and value[4] is not None \
                    and value[4][0] is bounds[0] and value[4][1] is bounds[1] \
                    and _key_matches(key, src, key[len(src):]):
                rng = key[len(src):len(src) + 2]
                break
        if rng is None:
            return None
        start, end = rng

        def rows(t: Tensor | None) -> Tensor:
            if t is None:  # (a zero point of None: zeros, as _elem expands it)
                return torch.zeros(shape_rows, dtype=torch.float64)
            return _block_rows(t.to(torch.float64), self.block_size, self.shape, start, end)

        lo = _block_rows(self.support[0].to(torch.float64), self.block_size, self.shape, start, end)
        shape_rows = lo.shape
        hi, sc, zp = rows(self.support[1]), rows(self.scale), rows(self.zero_point)
        sc = torch.where(sc <= 0, torch.ones_like(sc), sc)  # dead blocks at scale 1, as _chunk_grid
        cube = self._cube_sums(lo, hi, sc, zp)
        return _rows_to_elements(cube.reshape(shape_rows), self.block_size, self.shape, start, end)

    def _cube_sums(self, lo: Tensor, hi: Tensor, sc: Tensor, zp: Tensor) -> Tensor:
        """Each block's ``C3`` (the cells' cubed widths summed within its bounds ``lo``, ``hi``;
        float64, flat over the blocks) for an affine grid or a value table."""
        flat = [t.reshape(-1) for t in (lo, hi, sc, zp)]
        if self.kind == "affine":
            low_edge, high_edge, step = self._outer_edges(flat[2], flat[3])
            assert step is not None
            return affine_cube_sum(flat[0], flat[1], low_edge, high_edge, step)
        assert self.values is not None
        return table_cube_sum(flat[0], flat[1], flat[2], self.values)

    def chunk_deficit_bound(self, start: int, end: int, sd_min: float, theta_max: float) -> float:
        """An upper bound on ``1 - kappa`` at any position of each weight and on ``|3 - m4|`` at any
        weight of magnitude at most ``theta_max`` (parameter units), over elements ``start:end``
        whose sd is at least ``sd_min > 0``, from the grid's per-block values alone (no pass over
        the elements); ``inf`` where no such bound is known.

        On a grid whose release bounds each block (:attr:`support`, finite) and whose cells within
        the bounds are finite (affine grids, value tables of at most ``WIDE_TABLE_MAX_VALUES``
        values), without storage rounding, dead blocks or another rounding than nearest:
        ``0 <= 1 - kappa <= S = phi(0) C3 / (12 sigma^3)`` at every position
        (:func:`~mis_lightning.functional.wide.wide_deficit_bound`) and
        ``0 <= 3 - m4 <= 6 M^2 (1 - kappa)`` with ``M`` the farther bound's distance in sd
        (method.md section 5, "Weights whose sd spans the bounded window"), ``M <= (theta_max +
        max(|lower|, |upper|)) / sigma``. Returned: ``S_max max(1, 6 M_max^2)`` with the blocks'
        largest ``C3`` and the least sd (the joint pass's unit-kappa chunks, ``assess.UNIT_KAPPA_TOL``)."""
        facts = self._bounded_blocks(start, end, sd_min, theta_max)
        if facts is None:
            return math.inf
        _, _, c3, reach = facts
        s = (_INV_SQRT_2PI / 12.0) * c3 / sd_min ** 3
        return s * max(1.0, 6.0 * (reach / sd_min) ** 2)

    def _bounded_blocks(self, start: int, end: int, sd_min: float, theta_max: float
                        ) -> tuple[Tensor, float, float, float] | None:
        """``(C3 [r, nb], widest window, largest C3, reach)`` of the blocks of the rows elements
        ``start:end`` touch (:func:`_block_rows`; float64, parameter units; ``reach = theta_max +
        max(|lower|, |upper|)`` bounds every weight's distance to its farther bound), or ``None``
        where :meth:`chunk_deficit_bound` knows no bound (no finite bounds, dead blocks, storage
        rounding, another rounding than nearest, tables of more than ``WIDE_TABLE_MAX_VALUES``)."""
        if self.storage_dtype is not None or self.support is None or not self.shape or self.kind == "quotient" \
                or self.rounding != "nearest" or not sd_min > 0.0 or not math.isfinite(theta_max) \
                or (self.kind == "table" and (self.values is None or self.values.numel() > WIDE_TABLE_MAX_VALUES
                                              or not bool(torch.isfinite(self.values).all()))):
            return None
        # (the chunk's next call, chunk_wide_deficit after chunk_deficit_bound, reads the same facts)
        src = (*self.support, self.scale, self.zero_point, self.values)
        extra = (start, end, theta_max, self.kind, self.qmin, self.qmax, self.block_size)
        if REUSE_CHUNK_FACTS:
            hit = _fact_get("blocks", src, extra)
            if hit is not None:
                return hit[0]
        out = self._rows_of_whole_facts(start, end, theta_max) if WHOLE_BLOCK_FACTS else None
        if out is None:
            out = self._block_facts(start, end, theta_max)
        elif out is False:
            out = None
        if REUSE_CHUNK_FACTS:
            _fact_put("blocks", src, extra, (out,))
        return out

    def _rows_of_whole_facts(self, start: int, end: int, theta_max: float
                             ) -> tuple[Tensor, float, float, float] | bool | None:
        """:meth:`_block_facts` of elements ``start:end`` read off the whole parameter's per-block
        facts (:data:`WHOLE_BLOCK_FACTS`): its rows' slice of ``C3`` and the maxima over those rows
        of the per-row maxima; ``False`` where :meth:`_block_facts` gives ``None`` (a row's
        checks failed, or a maximum not finite), ``None`` where the whole facts do not apply
        (some row of the parameter fails the checks: computed per chunk, as before)."""
        whole = self._whole_block_facts()
        if whole is None:
            return None
        cube, width, c3, ext = whole
        last = self.shape[-1]
        r0, r1 = start // last, (end - 1) // last + 1  # (_block_rows' rows)
        c3_max = float(c3[r0:r1].max())
        reach = theta_max + float(ext[r0:r1].max())
        if not (math.isfinite(c3_max) and math.isfinite(reach)):
            return False
        return cube[r0:r1], float(width[r0:r1].max()), c3_max, reach

    def _whole_block_facts(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """``(C3 [rows, nb], window [rows], C3 [rows], max(|lower|, |upper|) [rows])``: each block's
        ``C3`` (:meth:`_cube_sums`) over the whole parameter's rows of the last dim
        (:func:`_block_rows`), then per row the widest window, the largest ``C3`` and the farther
        bound's magnitude; ``None`` where some block fails :meth:`_block_facts`' checks (dead
        blocks, infinite or empty bounds). Kept per tensor version (the grid's chunks read it in
        turn). Element-wise values and exact maxima: a chunk's slice gives :meth:`_block_facts`'
        facts bitwise."""
        assert self.support is not None
        src = (self.scale, self.zero_point, *self.support)
        hit = self.__dict__.get("_whole_block_fact")
        if hit is not None and _key_matches(hit[0], src, ()):
            return hit[1]
        key = _fact_key(src)
        numel = math.prod(self.shape)
        vals = self._block_values(0, numel) if numel else None
        out = None
        if vals is not None:
            lo, hi, sc, zp = vals
            cube = self._cube_sums(lo, hi, sc, zp).reshape(lo.shape)
            out = (cube, (hi - lo).amax(1), cube.amax(1), torch.maximum(lo.abs(), hi.abs()).amax(1))
        self.__dict__["_whole_block_fact"] = (key, out)
        return out

    def _block_values(self, start: int, end: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """``(lower, upper, scale, zero point)`` ``[r, nb]`` float64 of the blocks of the rows
        elements ``start:end`` touch (:func:`_block_rows`), or ``None`` where some block is dead
        (scale not positive) or its bounds infinite or empty (:meth:`_block_facts`' checks)."""
        assert self.support is not None

        def rows(t: Tensor | None) -> Tensor:
            if t is None:  # (a zero point of None: zeros, as _elem expands it)
                return torch.zeros(lo.shape, dtype=torch.float64)
            return _block_rows(t.to(torch.float64), self.block_size, self.shape, start, end)

        lo = _block_rows(self.support[0].to(torch.float64), self.block_size, self.shape, start, end)
        hi, sc, zp = rows(self.support[1]), rows(self.scale), rows(self.zero_point)
        if not bool((sc > 0).all()) or not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()) \
                or not bool((lo < hi).all()):
            return None  # dead blocks (kappa 0), infinite or empty bounds: the paths
        return lo, hi, sc, zp

    def _block_facts(self, start: int, end: int, theta_max: float) -> tuple[Tensor, float, float, float] | None:
        """:meth:`_bounded_blocks` computed (its checks of the grid passed)."""
        vals = self._block_values(start, end)
        if vals is None:
            return None
        lo, hi, sc, zp = vals
        cube = self._cube_sums(lo, hi, sc, zp).reshape(lo.shape)
        c3 = float(cube.max())
        reach = theta_max + float(torch.maximum(lo.abs(), hi.abs()).max())
        if not (math.isfinite(c3) and math.isfinite(reach)):
            return None
        return cube, float((hi - lo).max()), c3, reach

    def chunk_wide_deficit(self, start: int, end: int, sds: tuple[float, ...], theta_max: float
                           ) -> tuple[Tensor, list[float], list[float], list[float]] | None:
        """The wide-sd deficit of elements ``start:end`` as one scalar per chunk times per-block
        values: ``(C3 [r, nb], lam, err, S_max)`` (one ``lam``, ``err`` and ``S_max`` per least sd
        ``sd_min`` of ``sds``, e.g. theta-hat's and the pool protocol's) such that every weight of
        sd ``sigma >= sd_min > 0`` and magnitude at most ``theta_max`` (parameter units) has

            kappa_exact <= 1 - lam phi(0) C3_block / (12 sigma^3) <= kappa_exact + err

        at theta-hat (and ``|3 - m4| <= err``), ``C3 [r, nb]`` the blocks of the rows the elements
        touch (:func:`_block_rows`; :func:`_rows_to_elements` expands them); ``None`` where
        :meth:`chunk_deficit_bound` knows no bound or a window is wider than ``WIDE_MAX_WINDOW``
        sd. Why: method.md section 5 ("Weights whose sd spans the bounded window"): each clipped
        cell gives ``lam_j S_k <= p_k Var_k <= S_k`` with ``lam_j = exp(-M^2/2) - M^2 W^2
        exp(M^2/2) / 12`` decreasing in ``M`` (the farther bound's distance in sd) and ``W`` (the
        window), so ``lam`` at the chunk's largest ``M = reach / sd_min`` and ``W`` is below every
        weight's: the value reads at least the exact kappa (the conservative side) and at least
        the closed form's ``1 - lam_j S``, by at most ``err = max((1 - lam) S_max, 6 M^2 S_max)``
        (the closed form's own error terms at the chunk's worst weight; ``lam`` shrunk by
        ``1e-12`` relative for the rounding of ``S``). It holds at any position (inside the
        bounds or on them) for weights not revealed; revealed and sd-0 weights are the caller's."""
        facts = self._bounded_blocks(start, end, min(sds), theta_max)
        if facts is None:
            return None
        cube, width, c3, reach = facts
        lams, errs, smax = [], [], []
        for sd_min in sds:
            w, m = width / sd_min, reach / sd_min
            if w > WIDE_MAX_WINDOW:
                return None
            m2 = m * m
            lam = (math.exp(-0.5 * m2) - m2 * w * w * math.exp(0.5 * m2) / 12.0) * (1.0 - 1e-12)
            if not lam > 0.0:
                return None
            s = (_INV_SQRT_2PI / 12.0) * c3 / sd_min ** 3
            lams.append(lam)
            errs.append(max((1.0 - lam) * s, 6.0 * m2 * s))
            smax.append(s)
        return cube, lams, errs, smax

    def point_masses_at(self, theta: Tensor, sigma: Tensor, start: int, end: int) -> Tensor | None:
        """``[c]`` bool: the elements ``start:end`` whose moments are a point mass's (sd 0, strictly
        inside the cell they lie in, :data:`POINT_MASS_ANY_CELL`, else their code's, and inside the
        bounds: :meth:`_point_masses`, ``(0, 0, 0, 1)``) when every other
        sd-0 element is revealed (:attr:`revealed`: moments ``(1, sqrt(2/pi), 3, 1)``), else
        ``None`` (some sd-0 element is left to the paths, or too few are point masses to test:
        ``POINT_MASS_MIN_FRACTION``). The inside test is kept for :meth:`moments`' calls on the same
        range (``REUSE_CHUNK_FACTS``). ``theta``, ``sigma``: ``[c]`` (parameter units)."""
        if not POINT_MASS_CLOSED_FORM or self.storage_dtype is not None or self.kind == "quotient":
            return None
        if POINT_MASS_PROOF:
            proof = self._proven_points(theta, sigma, start, end)
            if proof is not None:
                return proof[0]
        scale, zp, code, dead, bounds = self._chunk_grid(start, end)
        if dead is not None:
            return None
        found = self._point_split(theta, sigma, scale, zp, None if POINT_MASS_ANY_CELL else code, bounds)
        if found is None:
            return None
        point, n_point, _ = found
        zf = _sd_zero(sigma)
        if n_point < zf.count and not self._rest_revealed(zf.mask, point, start, end, theta.device):
            return None
        return point

    def _rest_revealed(self, zero: Tensor, point: Tensor, start: int, end: int, device: torch.device) -> bool:
        """Whether every sd-0 element of ``start:end`` (``zero``, ``[c]`` bool) that is not a point
        mass (``point``, ``[c]`` bool) is revealed (:meth:`_revealed_at`): :meth:`point_masses_at`'s
        condition for an answer."""
        rev, _ = self._revealed_at(start, end, device)
        return rev is not None and not any_set(zero & ~point & ~rev)

    def _point_proof_layout(self) -> tuple | None:
        """The per-block facts :meth:`_proven_points` reads, or ``None`` where it does not apply:
        an affine grid of a 2-D tensor with the backend's integer codes and integer(-valued) zero points,
        or a float format's table (:attr:`TableLayout.format_dtype`, float8), with
        blocks along the last dim (``block_size (1, k)``, ``k`` dividing it), bounds
        (:attr:`support`), every scale finite and positive, and codes, zero points and bounds
        within :data:`~mis_lightning.functional.point_proof.PROOF_MAX_CELLS` cells. ``(k, inv,
        zero point or None, lower, upper, symmetric, scale, lo, hi, format)``, per block ``[rows,
        blocks]`` float64 (``lower = lo + s/2``, ``upper = hi - s/2``; format: the table's dtype
        or ``None``), then :func:`_f32_proof_layout`'s facts (or ``None``); kept per tensor version."""
        src = (self.scale, self.zero_point, self.codes,
               *(self.support if self.support is not None else (None, None)))
        hit = self.__dict__.get("_point_proof_fact")
        if hit is not None and _key_matches(hit[0], src, ()):
            return hit[1]
        key = _fact_key(src)
        out = None
        zp = self.zero_point
        fmt = None
        if self.kind == "table" and self.values is not None and self.codes is None and zp is None:
            fmt = table_layout(self.values, self.scale.device).format_dtype
        # (float zero points holding integers, as rtn's: the edges' arithmetic as exact as integers')
        affine = self.kind == "affine" and self.codes is not None and not self.codes.is_floating_point() \
            and (zp is None or not zp.is_floating_point() or bool(torch.equal(zp, zp.round())))
        if ((affine or fmt is not None) and len(self.shape) == 2 and self.support is not None
                and self.storage_dtype is None and len(self.block_size) == 2
                and self.block_size[0] == 1 and self.block_size[1] > 0 and self.shape[1] % self.block_size[1] == 0):
            rows, k = self.shape[0], self.block_size[1]
            nb = self.shape[1] // k
            if self.scale.numel() == rows * nb and all(t.numel() == rows * nb for t in self.support) \
                    and (zp is None or zp.numel() == rows * nb) and (fmt is not None or self.codes.numel() == self.numel):
                s = self.scale.reshape(rows, nb).to(torch.float64)
                lo, hi = (t.reshape(rows, nb).to(torch.float64) for t in self.support)
                z = None if zp is None or not bool(zp.any()) else zp.reshape(rows, nb).to(torch.float64)
                top = _proof.PROOF_MAX_CELLS
                ok = bool(torch.isfinite(s).all()) and bool((s > 0).all()) \
                    and (z is None or float(z.abs().max()) <= top / 2) \
                    and bool((lo.abs() <= top * s).all()) and bool((hi.abs() <= top * s).all())
                if ok and fmt is None:
                    assert self.codes is not None
                    cmin, cmax = torch.aminmax(self.codes.reshape(-1)) if self.codes.numel() else (torch.zeros(()),) * 2
                    ok = max(abs(int(cmin)), abs(int(cmax))) <= top / 2
                if ok:
                    inv = 1.0 / s
                    lower, upper = lo + 0.5 * s, hi - 0.5 * s
                    out = (k, inv, z, lower, upper, torch.equal(lo, -hi), s, lo, hi, fmt,
                           _f32_proof_layout(s, inv, z, lower, upper))
        self.__dict__["_point_proof_fact"] = (key, out)
        return out

    def _proven_points(self, theta: Tensor, sigma: Tensor, start: int, end: int) -> tuple[Tensor | None] | None:
        """:meth:`point_masses_at`'s answer, in a 1-tuple, where :meth:`_proven_point_mask`
        applies, else ``None`` (the caller's own test then) (:data:`POINT_MASS_PROOF`)."""
        if not self._proof_applies(theta, start, end):
            return None
        c = end - start
        zf = _sd_zero(sigma)
        if zf.count < max(1.0, POINT_MASS_MIN_FRACTION * c):
            return (None,)
        found = self._proven_point_mask(theta, zf.mask, start, end, zf.count)
        assert found is not None
        point, whole, n_point = found
        if n_point is None:
            n_point = int(torch.count_nonzero(point))
        if n_point < POINT_MASS_MIN_FRACTION * c:
            return (None,)
        # (whole: only revealed elements can be left)
        if n_point < zf.count and not whole and not self._rest_revealed(zf.mask, point, start, end, theta.device):
            return (None,)
        return (point,)

    def _proof_applies(self, theta: Tensor, start: int, end: int) -> bool:
        """:meth:`_point_proof_layout` holds, ``start:end`` is whole rows and ``theta`` its float64
        weights (contiguous, on the grid's device)."""
        width = self.shape[1] if len(self.shape) == 2 else 0
        return (self._point_proof_layout() is not None and width > 0 and start % width == 0 and end % width == 0
                and theta.dtype == torch.float64 and theta.is_contiguous() and theta.numel() == end - start
                and theta.device == self.scale.device)

    def _proven_point_mask(self, theta: Tensor, zero: Tensor, start: int, end: int,
                           zero_count: int | None = None) -> tuple[Tensor, bool, int | None] | None:
        """``(point, whole, count)``: ``point = zero & inside`` (``[c]`` bool, the inside test of
        :meth:`_inside` on the chunk's grid, bitwise), ``whole`` where every sd-0 weight but the
        revealed ones is in ``point`` (one reduction proved them, or the proof left a few, tested:
        :data:`~mis_lightning.functional.point_proof.PROOF_LEFT_TESTED`), and ``point``'s count where ``whole`` and ``zero_count``
        (``zero``'s) give it from the revealed ones alone, else ``None``; ``None`` where
        :meth:`_proof_applies` does not hold.

        The proof: :func:`~mis_lightning.functional.point_proof.affine_inside_gap` (affine grids) or
        :func:`~mis_lightning.functional.point_proof.format_cell_proven` with the bounds' terms (float
        formats' tables), on the blocks' own values; the weights it does not prove (a block's absmax
        on its bound; NaN; near an edge) and the revealed ones tested by :meth:`_inside`. ``zero``:
        ``[c]`` bool (the sd-0 weights)."""
        if not self._proof_applies(theta, start, end):
            return None
        lay = self._point_proof_layout()
        assert lay is not None
        k, inv, z, lower, upper, symmetric, s, lo, hi, fmt, f32 = lay
        width = self.shape[1]
        r0, r1 = start // width, end // width
        nb = width // k

        def per_block(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[r0:r1].unsqueeze(-1)

        th3 = theta.view(r1 - r0, nb, k)
        limit = 0.5 - _POINT_MASS_MARGIN - _proof.PROOF_SLACK
        _, rev_ii = self._revealed_at(start, end, theta.device)
        if rev_ii is not None and not rev_ii.numel():
            rev_ii = None
        own = None  # (float formats: the own cells the bits did not prove; None: all proven)
        if f32 is not None and _proof.PROOF_FLOAT32 and (fmt is not None or POINT_MASS_ANY_CELL):
            # G in float32, in cells, its error bound off the limit (f32_gap_error): the weights it
            # leaves go to the float64 test below, as the float64 proof's do (the same mask; the
            # nearest cell's: the backend's codes, POINT_MASS_ANY_CELL off, take the float64 proof)
            inv32, z32, lower32, upper32, err = f32
            th32 = _theta_f32(theta).view(r1 - r0, nb, k)
            limit -= err
            if fmt is not None:  # (the own cell from the format's bits; |x| - upper with symmetric bounds)
                x = th32.abs().mul_(per_block(inv32))
                own = _proof.format_cell_proven(x, fmt, _POINT_MASS_MARGIN)
            if fmt is not None and symmetric:
                g = x.sub_(per_block(upper32)).view(-1)
            else:
                g = _proof.gap_cells_f32(th32, per_block(inv32), per_block(z32), per_block(lower32),
                                         per_block(upper32), symmetric, own_cell=fmt is None).view(-1)
            if rev_ii is not None:
                g.index_fill_(0, rev_ii, 0.0)  # (tested below)
            whole = own is None and bool(g.amax() < limit)  # (NaN: not proven)
        elif fmt is not None:
            # the own cell from the format's bits, the bounds' terms as the affine grids' (one
            # number per weight; above 1/2 when out of bounds)
            ath = th3.abs()
            own = _proof.format_cell_proven(ath * per_block(inv), fmt, _POINT_MASS_MARGIN)
            g = _proof.bounds_gap(th3, per_block(inv), per_block(lower), per_block(upper), symmetric,
                                  abs_th=ath).view(-1)
            if rev_ii is not None:
                g.index_fill_(0, rev_ii, 0.0)  # (tested below)
            whole = own is None and bool(g.amax() < limit)  # (NaN: not proven)
        else:
            assert self.codes is not None
            # (POINT_MASS_ANY_CELL: the nearest cell's centre, not the backend code's)
            code = None if POINT_MASS_ANY_CELL else self.codes.reshape(self.shape)[r0:r1].reshape(r1 - r0, nb, k)
            g = _proof.affine_inside_gap(th3, per_block(inv), code, per_block(z),
                                         per_block(lower), per_block(upper), symmetric).view(-1)
            if rev_ii is not None:
                g.index_fill_(0, rev_ii, 0.0)  # (tested below)
            whole = bool(g.amax() < limit)  # (NaN: not proven)
        left = None  # (the sd-0 weights the proof left, tested with the revealed ones: PROOF_LEFT_TESTED)
        if not whole and _proof.PROOF_LEFT_TESTED:
            left = _proof.unproven_weights(g, limit, None if own is None else own.view(-1))
            left = left[zero[left]]  # (the revealed ones are not among them: G 0 there)
            whole = True  # (unless one of them is not inside: below)
        if whole:
            point = zero.clone()
            test = rev_ii if left is None else left if rev_ii is None else torch.cat([rev_ii, left])
        else:
            proven = g < limit
            if own is not None:
                proven &= own.view(-1)
            if rev_ii is not None:
                proven.index_fill_(0, rev_ii, False)
            point = zero & proven
            test = torch.nonzero(zero & ~proven).squeeze(-1)
        count = zero_count if whole else None
        if test is not None and test.numel():
            blk = test // k + r0 * nb
            zp = torch.zeros(test.numel(), dtype=torch.float64, device=theta.device) if z is None else z.reshape(-1)[blk]
            inside = self._inside(
                theta[test], s.reshape(-1)[blk], zp,
                None if self.codes is None or POINT_MASS_ANY_CELL
                else self.codes.reshape(-1)[start + test].to(torch.float64),
                (lo.reshape(-1)[blk], hi.reshape(-1)[blk]))
            tp = zero[test] & inside
            point[test] = tp
            if count is not None:
                count += int(tp.sum()) - int(zero[test].sum())
            if left is not None and left.numel() and not bool(tp[test.numel() - left.numel():].all()):
                whole, count = False, None  # (an sd-0 weight neither inside nor revealed: the caller's test finds it)
        return point, whole, count

    def _wide_sd(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor, code: Tensor | None,
                 bounds: tuple[Tensor, Tensor], compile_policy: CompilePolicy | None,
                 kappa_only: bool, path_elements: int | None = None,
                 known: Tensor | None = None) -> CellMoments | None:
        """The moments of every element when some lie strictly inside bounds at most
        ``WIDE_MAX_WINDOW`` sd apart and the closed form's error bound there is at most
        ``WIDE_TOL`` (:func:`~mis_lightning.functional.wide.wide_sd_moments`; the others on
        :meth:`_path_moments`), or ``None`` when none does (affine grids and value tables of at
        most ``WIDE_TABLE_MAX_VALUES`` values; ``[c]`` tensors as :meth:`element_moments`;
        ``kappa_only``: their ``mean_abs`` is NaN, not computed; ``path_elements``: as
        :meth:`_path_moments`, for the elements left to the paths; ``known``: elements left off
        them, as :meth:`element_moments`)."""
        closed = self._wide_closed(theta, sigma, scale, zero_point, code, bounds, kappa_only)
        if closed is None:
            return None
        ii, kappa, mean_abs, ok = closed
        c = theta.shape[0]
        if ii is None:
            take = ok
        else:
            take = torch.zeros(c, dtype=torch.bool, device=theta.device)
            _gather.put(take, ii, ok)
        nt = int(take.sum())
        if nt == 0:
            return None
        # kappa alone is read (KAPPA_ONLY_STANDINS): the other three one NaN, stride 0 (two or
        # three chunk-sized fills fewer; as _own_moments' point masses)
        standin = kappa_only and KAPPA_ONLY_STANDINS
        at = dst = None
        if ii is not None:
            at = _gather.positions(ok)  # (one nonzero for the two or three reads at ok)
            dst = _gather.take(ii, at)
            full = torch.zeros(c, dtype=torch.float64, device=theta.device)
            _gather.put(full, dst, _gather.take(kappa, at))
            kappa = full
        if standin:
            nan = torch.full((1,), math.nan, dtype=torch.float64, device=theta.device).expand(c)
            out: CellMoments = _KappaOnlyMoments(kappa=kappa, mean_abs=nan, m4=nan, coverage=nan)
        else:
            if mean_abs is None:  # (kappa_only with the stand-ins off: NaN, as before)
                mean_abs = torch.full((kappa.shape[0] if ii is None else ii.shape[0],), math.nan,
                                      dtype=torch.float64, device=theta.device)
            if ii is not None:
                assert at is not None and dst is not None
                full = torch.zeros(c, dtype=torch.float64, device=theta.device)
                _gather.put(full, dst, _gather.take(mean_abs, at))
                mean_abs = full
            out = _FreshMoments(kappa=kappa, mean_abs=mean_abs, m4=torch.full_like(kappa, 3.0),
                                coverage=torch.ones_like(kappa))
        if nt == c:
            return out
        # the rest (a block's absmax itself, weights nearer their bounds' reach, ...) on the paths,
        # but for the known ones (a revealed absmax: overwritten by the caller)
        # (not the closed form again: those it took are out, and it holds for none of the rest;
        # a value table's series next, TABLE_WIDE_SERIES)
        return self._rest_on_paths(out, ~take, nt, known, path_elements, theta, sigma, scale, zero_point, code,
                                   bounds, compile_policy, kappa_only, series=True)

    def _series_sd(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor, code: Tensor | None,
                   bounds: tuple[Tensor, Tensor], compile_policy: CompilePolicy | None, kappa_only: bool,
                   path_elements: int | None = None, known: Tensor | None = None) -> CellMoments | None:
        """The moments of every element when some take :meth:`_table_series` (the others, but for
        ``known``, on :meth:`_path_moments` without the closed forms), or ``None`` when none does
        or the grid takes no series (:data:`TABLE_WIDE_SERIES`). Arguments as :meth:`_wide_sd`."""
        if not TABLE_WIDE_SERIES or self.kind != "table" or self.values is None \
                or self.values.numel() > WIDE_TABLE_MAX_VALUES or self.storage_dtype is not None:
            return None
        c = theta.shape[0]
        if known is not None:
            free = torch.nonzero(~known).squeeze(-1)
            if free.numel() == 0:
                return None
            sel = lambda t: t.index_select(0, free)  # noqa: E731
            got = self._table_series(sel(theta), sel(sigma), sel(scale), sel(zero_point), _pick(code, free),
                                     (sel(bounds[0]), sel(bounds[1])), kappa_only)
            if got is None:
                return None
            got = (free.index_select(0, got[0]),) + got[1:]
        else:
            got = self._table_series(theta, sigma, scale, zero_point, code, bounds, kappa_only)
            if got is None:
                return None
        idx, kappa_s, mean_abs_s, m4_s = got
        nt = idx.numel()
        kappa = torch.zeros(c, dtype=torch.float64, device=theta.device)
        kappa.index_copy_(0, idx, kappa_s)
        standin = kappa_only and KAPPA_ONLY_STANDINS
        if standin:
            nan = torch.full((1,), math.nan, dtype=torch.float64, device=theta.device).expand(c)
            out: CellMoments = _KappaOnlyMoments(kappa=kappa, mean_abs=nan, m4=nan, coverage=nan)
        else:
            mean_abs = torch.full_like(kappa, math.nan)
            m4 = torch.full_like(kappa, math.nan)
            if mean_abs_s is not None:
                mean_abs.index_copy_(0, idx, mean_abs_s)
            if m4_s is not None:
                m4.index_copy_(0, idx, m4_s)
            out = _FreshMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=torch.ones_like(kappa))
        if nt == c:
            return out
        rest = torch.ones(c, dtype=torch.bool, device=theta.device)
        _gather.put(rest, idx, False)
        return self._rest_on_paths(out, rest, nt, known, path_elements, theta, sigma, scale, zero_point, code,
                                   bounds, compile_policy, kappa_only, series=False)

    def _rest_on_paths(self, out: CellMoments, rest: Tensor, nt: int, known: Tensor | None,
                       path_elements: int | None, theta: Tensor, sigma: Tensor, scale: Tensor,
                       zero_point: Tensor, code: Tensor | None, bounds: tuple[Tensor, Tensor],
                       compile_policy: CompilePolicy | None, kappa_only: bool, series: bool) -> CellMoments:
        """``out`` (a closed form's or series' moments of ``nt`` of the ``c`` elements) with the
        elements of the mask ``rest`` (but for ``known``: overwritten by the caller) filled from
        :meth:`_path_moments` (after :meth:`_series_sd` when ``series``). A chunk's live elements
        alone (``path_elements`` given) take the paths of the padded call's rest, as when the
        padding came along."""
        c = theta.shape[0]
        size = None if path_elements is None else path_elements - nt
        if known is not None:
            rest = rest & ~known
            left = int(rest.sum())
            if left == 0:
                return out
            if size is None and left < c - nt:  # (the path of the whole rest's call)
                size = c - nt
        jj = torch.nonzero(rest).squeeze(-1)
        args = (_gather.take(theta, jj), _gather.take(sigma, jj), _gather.take(scale, jj), _gather.take(zero_point, jj),
                _pick(code, jj), _pick(bounds, jj))
        sub = self._series_sd(*args, compile_policy, kappa_only, size) if series else None
        if sub is None:
            sub = self._path_moments(*args, compile_policy, kappa_only, size, wide=False)
        for o, f in zip((out.kappa, out.mean_abs, out.m4, out.coverage), ("kappa", "mean_abs", "m4", "coverage")):
            _gather.put(o, jj, getattr(sub, f).to(torch.float64))
            if isinstance(out, _KappaOnlyMoments):  # (the other three are stand-ins, stride 0)
                break
        return out

    def _table_series(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor, code: Tensor | None,
                      bounds: tuple[Tensor, Tensor], kappa_only: bool
                      ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None:
        """Value tables of at most ``WIDE_TABLE_MAX_VALUES`` values: the weights whose sd spans
        their bounded window, on the grid's own cells clipped to the bounds, by the series of
        :mod:`~mis_lightning.functional.wide_series` (docs/method.md section 5, "The bounded window on stored grids", "The bounded window on value tables"):
        ``(ii, kappa, mean_abs, m4)``, ``ii`` ``[m]`` the elements it holds for, their float64
        moments (``mean_abs`` exact on the own cell, :func:`~mis_lightning.functional.wide.own_cell_mean_abs`;
        ``mean_abs`` and ``m4`` ``None`` when ``kappa_only``; coverage 1 is the caller's), or
        ``None`` when none does.

        The series is taken about the table's 0 (the window ``[-H, H]``, ``H = max(|lower|,
        |upper|)``, holds the bounded one; the cells beyond the bounds are revealed: none), so
        that each window's sums are the table's per-cell prefix sums scaled by one unit per
        window plus its two cut end cells (:func:`~mis_lightning.functional.wide_series.table_window_coefficients`).
        It holds for: ``2 H`` at most ``SERIES_MAX_WINDOW`` sd, ``H |theta|`` at most
        ``SERIES_MAX_SHIFT`` sd^2 (a bootstrap draw may lie beyond a bound), kappa's error bound
        at most ``SERIES_TOL`` (``kappa`` reads at least the exact cell sums' value and at most
        ``SERIES_TOL`` above it) and, in a full call, ``m4``'s too. ``[c]`` tensors as
        :meth:`element_moments`, ``scale > 0``."""
        assert self.values is not None
        th, sg = theta.to(torch.float64), sigma.to(torch.float64)
        lo, hi = bounds[0].to(torch.float64), bounds[1].to(torch.float64)
        H = torch.maximum(lo.abs(), hi.abs())
        # (sd 0, NaN and infinite bounds fail)
        cand = (2.0 * H <= SERIES_MAX_WINDOW * sg) & (hi > lo) & (H * th.abs() <= SERIES_MAX_SHIFT * sg * sg)
        n = int(cand.sum())
        if n == 0:
            return None
        st = series_table(self.values, th.device)
        if st.vmax <= 0:
            return None
        ii = torch.nonzero(cand).squeeze(-1) if n < cand.numel() else None

        def pick(t: Tensor) -> Tensor:
            return t if ii is None else t.index_select(0, ii)

        th, sg, lo, hi, H = pick(th), pick(sg), pick(lo), pick(hi), pick(H)
        s64 = pick(scale.to(torch.float64))
        # one window per run of equal scale and bounds (a block)
        new = (s64[1:] != s64[:-1]) | (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        gid, first = _runs(new)
        unit = s64.index_select(0, first) * st.vmax
        lw, uw, lam = lo.index_select(0, first) / unit, hi.index_select(0, first) / unit, unit / H.index_select(0, first)
        u0, rho = -th / sg, H / sg
        # the fewest terms whose truncation bound at the largest rho and window C3 (Es2 of
        # wide_series at umin = 0: at least every element's) is at most a 16th of the tolerance
        # (a kappa_only call takes the same terms, so the same kappa)
        N = table_series_terms(float(rho.max()), float(table_window_cubes(st, lw, uw, lam).max()), SERIES_TOL / 16.0)
        K, qb, q3, q5 = table_window_coefficients(st, lw, uw, lam, N, kappa_only)
        m = th.shape[0]
        kappa, err = torch.empty_like(th), torch.empty_like(th)
        m4 = None if kappa_only else torch.empty_like(th)
        err4 = None if kappa_only else torch.empty_like(th)
        # per element in blocks of about _SERIES_BLOCK gathered sums
        block = max(1024, _SERIES_BLOCK // (K.shape[0] * N))
        for a in range(0, m, block):
            sl = slice(a, a + block)
            k, eb, m4b, e4b = table_series_moments(u0[sl], rho[sl], gid[sl], K, qb, q3, q5)
            kappa[sl], err[sl] = k, eb
            if m4 is not None and err4 is not None and m4b is not None and e4b is not None:
                m4[sl], err4[sl] = m4b, e4b
        ok = err <= SERIES_TOL
        if err4 is not None:
            ok &= err4 <= SERIES_TOL
        if not bool(ok.any()):
            return None
        keep = torch.nonzero(ok).squeeze(-1) if not bool(ok.all()) else None

        def kept(t: Tensor) -> Tensor:
            return t if keep is None else t.index_select(0, keep)

        idx = torch.arange(m, device=th.device) if keep is None else keep
        idx = idx if ii is None else ii.index_select(0, idx)
        if m4 is None:
            return idx, kept(kappa), None, None
        th, sg, lo, hi = kept(th), kept(sg), kept(lo), kept(hi)
        cd = None if code is None else kept(pick(code))
        own_lo, own_hi = self._own_edges(th, kept(s64), kept(pick(zero_point.to(torch.float64))), cd)
        return idx, kept(kappa), own_cell_mean_abs(th, sg, lo, hi, own_lo, own_hi, own_fresh=True), kept(m4)

    def _point_masses(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor,
                      code: Tensor | None, bounds: tuple[Tensor, Tensor] | None) -> Tensor | None:
        """``[c]`` bool: the elements whose moments are a point mass's, ``(0, 0, 0, 1)``, or
        ``None`` when fewer than :data:`POINT_MASS_MIN_FRACTION` of them are (the paths score all).

        A point mass: sd 0 (at most the smallest normal float64, which every path floors it to),
        the weight inside its own cell (the backend's ``code`` where given, else the nearest; the
        edges of :meth:`_edges`) and inside ``bounds``, by more than ``_POINT_MASS_MARGIN`` of its
        scale on each side. Its distribution is one cell, so it has no cell information: every
        path finds both edges beyond ``CUTOFF_SIGMAS`` sd (frozen) and returns ``(0, 0, 0, 1)``
        (tests/test_point_mass.py checks each grid kind's paths against this)."""
        found = self._point_split(theta, sigma, scale, zero_point, code, bounds)
        return None if found is None else found[0]

    def _point_split(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor,
                     code: Tensor | None, bounds: tuple[Tensor, Tensor] | None
                     ) -> tuple[Tensor, int, _SdZero | None] | None:
        """:meth:`_point_masses` as ``(mask, its count, sd-0 fact)`` (:func:`_sd_zero`; ``None``
        with :data:`SD_ZERO_SHARED` off)."""
        c = theta.shape[0]
        zf = _sd_zero(sigma)
        zero = zf.mask
        if zf.count < max(1.0, POINT_MASS_MIN_FRACTION * c):
            return None
        # whether each weight lies strictly inside its cell and bounds does not depend on sd: the
        # call at sd / sqrt(2) (pool protocol) on the same chunk reads the one at sd (REUSE_CHUNK_FACTS)
        src = (theta, scale, zero_point, code, *(bounds if bounds is not None else (None, None)), self.values)
        extra = (self.kind, self.qmin, self.qmax, self.quotient_dtype, self.storage_dtype, self.quantize_arith)
        inside = _fact_get("inside", src, extra) if REUSE_CHUNK_FACTS else None
        if inside is None and POINT_MASS_PROOF and bounds is None:
            inside = self._unit_format_inside(theta, scale, zero_point, code)
            if inside is not None and REUSE_CHUNK_FACTS:
                _fact_put("inside", src, extra, inside)
        if inside is None:
            # over the whole chunk (most of it is sd 0 here: gathers would cost more than they save),
            # in cache-sized blocks (comparisons of exactly rounded arithmetic: the same mask)
            block = EAGER_BLOCK if POINT_MASS_BLOCKS else c
            inside = torch.empty(c, dtype=torch.bool, device=theta.device)
            for a in range(0, c, block):
                sl = slice(a, a + block)
                inside[sl] = self._inside(theta[sl], scale[sl], zero_point[sl], None if code is None else code[sl],
                                          None if bounds is None else (bounds[0][sl], bounds[1][sl]))
            if REUSE_CHUNK_FACTS:
                _fact_put("inside", src, extra, inside)
        point = zero & inside
        n_point = count_set(point) if COUNT_SET else int(point.sum())
        if n_point < POINT_MASS_MIN_FRACTION * c:
            return None
        return point, n_point, (zf if SD_ZERO_SHARED else None)

    def _unit_format_inside(self, theta: Tensor, scale: Tensor, zero_point: Tensor,
                            code: Tensor | None) -> Tensor | None:
        """:meth:`_inside` (no bounds) on a float format's table at scale 1 (the bf16 / fp16 casts),
        or ``None`` on any other grid: the weights whose ``|theta| -/+`` the margin cast to the
        format alike (:func:`~mis_lightning.functional.point_proof.format_cell_proven`: one cell)
        proven inside, the others tested by :meth:`_inside`; one comparison of the two casts'
        bytes where every weight is proven (:data:`POINT_MASS_PROOF`). The same mask."""
        if self.kind != "table" or self.values is None or not self._unit_scale():
            return None
        fmt = table_layout(self.values, theta.device).format_dtype
        if fmt is None:
            return None
        th = theta.to(torch.float64)
        inside = _proof.format_cell_proven_abs(th, fmt, _POINT_MASS_MARGIN)
        if inside is None:
            return torch.ones(th.shape[0], dtype=torch.bool, device=th.device)
        ii = torch.nonzero(~inside).squeeze(-1)
        if ii.numel():
            inside[ii] = self._inside(th[ii], scale[ii], zero_point[ii], None if code is None else code[ii], None)
        return inside

    def _inside(self, theta: Tensor, scale: Tensor, zero_point: Tensor, code: Tensor | None,
                bounds: tuple[Tensor, Tensor] | None) -> Tensor:
        """``[c]`` bool: each weight inside its own cell (:meth:`_own_edges`) and ``bounds`` by more
        than ``_POINT_MASS_MARGIN`` of its scale on each side (element-wise)."""
        th, sc = theta.to(torch.float64), scale.to(torch.float64)
        if self.kind == "table" and _table.FORMAT_INSIDE_BITS and self.values is not None:
            layout = table_layout(self.values, th.device)
            unit = layout.format_dtype is not None and self._unit_scale()
            if layout.format_dtype is not None and (unit or self._positive_scale()):
                # a float format's cells: the own cell proven by the format's bits for most weights,
                # the others (ties, near-edges, the top cells) on the table below; the bounds as
                # there (th - max(lo, b) = min(th - lo, th - b) bitwise): the same mask
                own = layout.format_inside(th, None if unit else sc, _POINT_MASS_MARGIN)
                inside = own.clone()
                if bounds is not None:
                    margin = _POINT_MASS_MARGIN * sc
                    inside &= (th - bounds[0].to(torch.float64) > margin) & (bounds[1].to(torch.float64) - th > margin)
                if not bool(own.all()):
                    ii = torch.nonzero(~own).squeeze(-1)
                    sel = lambda t: t.index_select(0, ii)  # noqa: E731
                    inside.index_copy_(0, ii, self._inside_on_edges(
                        sel(th), sel(sc), sel(zero_point), None, None if bounds is None else (sel(bounds[0]), sel(bounds[1]))))
                return inside
        return self._inside_on_edges(th, sc, zero_point, code, bounds)

    def _unit_scale(self) -> bool:
        """Every block's scale exactly 1 (a dtype cast's grid)."""
        return self.scale.numel() <= 64 and bool((self.scale == 1).all())

    def _positive_scale(self) -> bool:
        """Every block's scale finite and positive (kept per scale tensor and version)."""
        s = self.scale
        key = (id(s), tensor_version(s))
        hit = self.__dict__.get("_positive_scale_fact")
        # (the fact holds its scale tensor: a replaced scale's id cannot pass for the old one's)
        if hit is None or key[1] is None or hit[0] != key or hit[2] is not s:
            hit = (key, bool(torch.isfinite(s).all()) and bool((s > 0).all()), s)
            self.__dict__["_positive_scale_fact"] = hit
        return hit[1]

    def _inside_on_edges(self, th: Tensor, sc: Tensor, zero_point: Tensor, code: Tensor | None,
                         bounds: tuple[Tensor, Tensor] | None) -> Tensor:
        """:meth:`_inside` on :meth:`_own_edges` (``th``, ``sc``: float64 ``[c]``)."""
        lo, hi = self._own_edges(th, sc, zero_point, code)
        margin = _POINT_MASS_MARGIN * sc
        if not INSIDE_FUSED:
            inside = (th - lo > margin) & (hi - th > margin)
            if bounds is not None:
                inside &= (th - bounds[0].to(torch.float64) > margin) & (bounds[1].to(torch.float64) - th > margin)
            return inside
        # the same mask in 7 operations after the edges (13 before, 8 of them comparisons and
        # ands): rounding is monotone, so th - max(lo, b) = min(th - lo, th - b) bitwise, and
        # min(d1, d2) > m iff both are (NaN: false either way); in place where _own_edges' tensors
        # are its own (affine, table; the quotient grids' are views of _edges')
        if self.kind == "quotient":
            lo, hi = lo.clone(), hi.clone()
        if bounds is not None:
            lo = torch.maximum(lo, bounds[0].to(torch.float64), out=lo)
            hi = torch.minimum(hi, bounds[1].to(torch.float64), out=hi)
        d = torch.sub(th, lo, out=lo)
        return torch.minimum(d, hi.sub_(th), out=d) > margin

    def _own_edges64(self, th: Tensor, sc: Tensor, zp: Tensor, code: Tensor | None,
                     idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`_own_edges` of the elements ``idx`` (``[k]`` positions; ``None``: all) as float64
        tensors of the call's own (free to overwrite)."""
        if idx is not None:
            th, sc, zp = th.index_select(0, idx), sc.index_select(0, idx), zp.index_select(0, idx)
            code = None if code is None else code.index_select(0, idx)
        lo, hi = self._own_edges(th, sc, zp, code)
        return (lo if lo.dtype == torch.float64 else lo.to(torch.float64),
                hi if hi.dtype == torch.float64 else hi.to(torch.float64))

    def _own_edges(self, th: Tensor, sc: Tensor, zp: Tensor, code: Tensor | None) -> tuple[Tensor, Tensor]:
        """The lower and upper edge ``[c]`` (parameter units, float64; ``-inf`` / ``inf`` for the
        outer cells) of each element's own cell on the grid's own edges: :meth:`_edges`' two
        middle columns at ``half_window = 1``, computed directly for affine grids and value tables
        (the cell of the table paths, :meth:`TableLayout.cells`)."""
        if self.kind == "affine":
            z = zp.to(torch.float64)
            q0 = affine_codes(th, sc, z, self.qmin, self.qmax) if code is None else code.to(torch.float64)
            if INSIDE_FUSED and (self.zero_point is None or not self.zero_point.is_floating_point()):
                # integer codes and zero points: (q0 - z) -/+ 0.5 is q0 -/+ 0.5 - z exactly (small
                # integers and halves); one subtraction, then in place on the call's own temporaries
                t = q0 - z
                lo = torch.where(q0 > self.qmin, (t - 0.5).mul_(sc), -math.inf)
                hi = torch.where(q0 < self.qmax, t.add_(0.5).mul_(sc), math.inf)
                return lo, hi
            lo = torch.where(q0 > self.qmin, (q0 - 0.5 - z) * sc, -math.inf)
            hi = torch.where(q0 < self.qmax, (q0 + 0.5 - z) * sc, math.inf)
            return lo, hi
        if self.kind == "table":
            assert self.values is not None
            layout = table_layout(self.values, th.device)
            cell = layout.cells(th / sc)
            return layout.padded.index_select(0, cell) * sc, layout.padded.index_select(0, cell + 1) * sc
        own = self._edges(th, sc, zp, code, 1)
        return own[:, 1], own[:, 2]

    def _path_moments(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor,
                      code: Tensor | None, bounds: tuple[Tensor, Tensor] | None,
                      compile_policy: CompilePolicy | None, kappa_only: bool,
                      path_elements: int | None = None, wide: bool = True,
                      known: Tensor | None = None, fused: bool = True) -> CellMoments:
        """The grid's own cells on the grid paths (every element); those whose sd spans their
        bounded window in closed form (:meth:`_wide_sd`; after the point masses: sd-0 weights never
        qualify, and the gate's test then runs on a mostly-sd-0 chunk's live elements alone).
        ``path_elements`` (affine and value-table grids): the elements take the paths of a call of
        that many (the kernels' ``path_elements``; :meth:`_own_moments` gives a chunk's live
        elements alone). ``wide=False``: no closed form (:meth:`_wide_sd`'s rest); ``known``: as
        :meth:`element_moments`, left off the paths after the closed form. ``fused=False``: no
        fused bounded fine form (:meth:`_fine_moments`' others)."""
        if wide and WIDE_SD_CLOSED_FORM and bounds is not None:
            closed = self._wide_sd(theta, sigma, scale, zero_point, code, bounds, compile_policy, kappa_only,
                                   path_elements, known)
            if closed is None:  # (none took the closed form: a value table's series, TABLE_WIDE_SERIES)
                closed = self._series_sd(theta, sigma, scale, zero_point, code, bounds, compile_policy,
                                         kappa_only, path_elements, known)
            if closed is not None:
                return closed
        if self.kind == "quotient":
            inv, lo, hi = self._quotient(scale, zero_point)
            fine = sigma.to(torch.float64) * inv > QUOTIENT_EXACT_MAX_SD
            if bool(fine.any()):
                return self._split_quotient_moments(fine, theta, sigma, scale, zero_point, code, bounds,
                                                    compile_policy, kappa_only)
        if self.kind == "affine" and bounds is not None and fused:
            got = self._fine_moments(theta, sigma, scale, zero_point, code, bounds, compile_policy, kappa_only,
                                     path_elements)
            if got is not None:
                return got
        if self.kind == "affine":
            mm = affine_cell_moments(theta, sigma, scale, zero_point, self.qmin, self.qmax, code=code,
                                     compile_policy=compile_policy, kappa_only=kappa_only,
                                     path_elements=path_elements)
        elif self.kind == "quotient":
            cell = None if code is None else code.to(torch.float64) - zero_point.to(torch.float64)
            mm = quotient_cell_moments(theta, sigma, inv, lo, hi, self._qdtype, cell=cell)
        else:
            assert self.values is not None
            mm = table_cell_moments(theta, sigma, self.values, scale, path_elements=path_elements,
                                    kappa_only=kappa_only)
        if bounds is not None:
            # the release bounds every weight of the block: outer cells cut at the bounds
            low_edge, high_edge, step = self._outer_edges(scale, zero_point)
            mm = bounded_moments(mm, theta, sigma, *bounds, low_edge, high_edge, step,
                                 lambda ii, m: self._edges(theta[ii], scale[ii], zero_point[ii],
                                                           None if code is None else code[ii], m),
                                 compile_policy, kappa_only=kappa_only, path_elements=path_elements)
        return mm

    def _fine_moments(self, theta: Tensor, sigma: Tensor, scale: Tensor, zero_point: Tensor, code: Tensor | None,
                      bounds: tuple[Tensor, Tensor], compile_policy: CompilePolicy | None, kappa_only: bool,
                      path_elements: int | None) -> CellMoments | None:
        """The moments on a bounded affine grid (:meth:`_path_moments`' arguments) with the
        elements of :func:`~mis_lightning.functional.bounds.fine_kappa_elements` in
        :func:`~mis_lightning.functional.bounds.bounded_fine_moments` (``kappa_only``: the other
        three fields NaN, :data:`KAPPA_ONLY_STANDINS`) and the others on the paths of the whole
        call's size (their numbers as before); ``None`` where none qualifies, the switch is off
        (:data:`~mis_lightning.functional.bounds.FUSED_FINE_MOMENTS`) or the call would run the
        compiled kernel (:func:`~mis_lightning.functional.kernel.compiled_due`: it and the
        compiled split then take every element, self-checked).
        The elements it takes count towards ``"auto"``'s threshold as if the kernel had run."""
        c = theta.shape[0]
        size = max(c, path_elements or 0)
        if not _bounds.FUSED_FINE_MOMENTS or self.storage_dtype is not None \
                or _kernel.compiled_due(size, compile_policy):
            return None
        th, sg = theta.to(torch.float64), sigma.to(torch.float64)
        lo, hi = bounds[0].to(torch.float64), bounds[1].to(torch.float64)
        low_edge, high_edge, step = self._outer_edges(scale, zero_point)
        if step is None:  # (stored cells: not a uniform grid)
            return None
        take = fine_kappa_elements(th, sg, step, lo, hi)
        n = count_set(take)
        if n == 0:
            return None

        def fused(ii: Tensor | None) -> CellMoments:
            sel = (lambda t: t) if ii is None else (lambda t: t.index_select(0, ii))  # noqa: E731
            args = tuple(sel(t) for t in (th, sg, step, low_edge, high_edge, lo, hi))
            m = args[0].shape[0]
            k = torch.empty(m, dtype=torch.float64, device=theta.device)
            ma, m4 = (None, None) if kappa_only else (torch.empty_like(k), torch.empty_like(k))
            # in cache-sized blocks (element-wise: the same numbers, kernel.in_blocks' note)
            for a in range(0, m, EAGER_BLOCK):
                got = bounded_fine_moments(*(t[a:a + EAGER_BLOCK] for t in args), kappa_only=kappa_only)
                k[a:a + EAGER_BLOCK] = got[0]
                if ma is not None and m4 is not None:
                    ma[a:a + EAGER_BLOCK], m4[a:a + EAGER_BLOCK] = got[1], got[2]
            if ma is not None and m4 is not None:
                return _FreshMoments(kappa=k, mean_abs=ma, m4=m4, coverage=torch.ones_like(k))
            if KAPPA_ONLY_STANDINS:  # (the other three one NaN, stride 0, as the other kappa-only calls)
                nan = torch.full((1,), math.nan, dtype=torch.float64, device=k.device).expand(k.shape[0])
                return _KappaOnlyMoments(kappa=k, mean_abs=nan, m4=nan, coverage=nan)
            return _FreshMoments(kappa=k, mean_abs=torch.full_like(k, math.nan), m4=torch.full_like(k, math.nan),
                                 coverage=torch.ones_like(k))

        if n == c:
            _kernel.count_fused(size, _affine.TABLE_MIN_ELEMENTS)  # (the rest's call counts itself)
            return fused(None)
        return _merge_moments(c, theta.device, [
            (torch.nonzero(take).squeeze(-1), fused),
            (torch.nonzero(~take).squeeze(-1),
             lambda ii: self._path_moments(theta[ii], sigma[ii], scale[ii], zero_point[ii], _pick(code, ii),
                                           _pick(bounds, ii), compile_policy, kappa_only, size, wide=False,
                                           fused=False))])

    def boundaries(self, theta: Tensor, start: int, end: int, half_window: int) -> Tensor:
        """Cell edges ``[c, 2*half_window + 2]`` around elements ``start:end`` (parameter units)."""
        scale, zp, code = self.element_grid(start, end)
        dead = scale <= 0  # one-cell grid {0}: see moments()
        if bool(dead.any()):
            scale = torch.where(dead, torch.ones_like(scale), scale)
            if code is not None:
                code = torch.where(dead, zp, code)
        edges = self._edges(theta, scale, zp, code, half_window)
        bounds = self.element_bounds(start, end)
        if bounds is not None:
            edges = clip_boundaries(edges, *bounds)
        if self.revealed is not None and self.storage_dtype is not None:
            # a stored weight the scale gives away is released as rnd_D(theta-hat): the storage cells
            rev = self.revealed.reshape(-1)[start:end].to(edges.device)
            if bool(rev.any()):
                ii = torch.nonzero(rev).squeeze(-1)
                th = theta.to(torch.float64)[ii]
                edges[ii] = table_boundaries(th, storage_values(self.storage_dtype), torch.ones_like(th), half_window)
        if bool(dead.any()):
            single = torch.full_like(edges[0], math.inf)
            single[: half_window + 1] = -math.inf
            edges = torch.where(dead.unsqueeze(-1), single, edges)
        return edges

    def _edges(self, theta: Tensor, scale: Tensor, zp: Tensor, code: Tensor | None, half_window: int) -> Tensor:
        """Unbounded cell edges ``[c, 2*half_window + 2]`` (per-element grid parameters); with
        ``storage_dtype`` those of the stored cells."""
        if self.storage_dtype is not None:
            return self._stored_window(theta, scale, zp, self._center(theta, scale, zp, code), half_window)
        if self.kind == "affine":
            return affine_boundaries(theta, scale, zp, self.qmin, self.qmax, half_window, code=code)
        if self.kind == "quotient":
            inv, lo, hi = self._quotient(scale, zp)
            cell = (quotient_cells(theta, inv, lo, hi, self._qdtype) if code is None
                    else code.to(torch.float64) - zp.to(torch.float64))
            return quotient_boundaries(cell, inv, lo, hi, self._qdtype, half_window)
        assert self.values is not None
        return table_boundaries(theta, self.values, scale, half_window)

    def _split_quotient_moments(self, fine: Tensor, theta: Tensor, sigma: Tensor, scale: Tensor,
                                zero_point: Tensor, code: Tensor | None, bounds: tuple[Tensor, Tensor] | None,
                                compile_policy: CompilePolicy | None, kappa_only: bool) -> CellMoments:
        """A quotient grid's moments where some elements' sd exceeds :data:`QUOTIENT_EXACT_MAX_SD`
        steps (``fine``): those on the midpoints (the affine grid of the same codes, bounds
        included), where the real cells' sums would cost 5-25x the affine ones and their difference
        fades as ``1 / (sd / step)^2`` (docs/quantization.md, "Backend notes": at 8 steps kappa
        within 1e-3 relative, mean_abs 3.3e-3, m4 1.9e-3, int8 in bf16, the widest cells); the
        rest on the real cells."""
        midpoints = replace(self, kind="affine", quotient_dtype=None)
        parts = []
        for grid, ii in ((midpoints, torch.nonzero(fine).squeeze(-1)), (self, torch.nonzero(~fine).squeeze(-1))):
            if ii.numel():
                sub = grid.element_moments(theta[ii], sigma[ii], scale[ii], zero_point[ii],
                                           None if code is None else code[ii],
                                           None if bounds is None else (bounds[0][ii], bounds[1][ii]),
                                           compile_policy, kappa_only=kappa_only)
                parts.append((ii, sub))
        out = []
        for f in ("kappa", "mean_abs", "m4", "coverage"):
            v = torch.empty(theta.shape[0], dtype=torch.float64, device=theta.device)
            for ii, sub in parts:
                v[ii] = getattr(sub, f).to(torch.float64)
            out.append(v)
        return CellMoments(*out)

    @property
    def _qdtype(self) -> torch.dtype:
        assert self.quotient_dtype is not None, f"grid {self.name!r}: a quotient grid needs quotient_dtype"
        return self.quotient_dtype

    def _quotient(self, scale: Tensor, zp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(inv, lo, hi)`` float64 ``[c]`` of a quotient grid: ``rnd(1 / scale)`` in the quotient's
        dtype (as the backend computes it; ``scale`` per element, exact in that dtype) and the
        quotient integers' range ``[qmin - zp, qmax - zp]``."""
        z = zp.to(torch.float64)
        inv = quotient_inverse(scale.to(self._qdtype))
        return inv, self.qmin - z, self.qmax - z

    def cell_value(self, theta: Tensor, start: int, end: int) -> Tensor:
        """The value the backend releases for each weight, from the grid alone (``[c]`` float64).

        The weight is first held as the model holds it (``storage_dtype``), then given its code
        by the backend's own arithmetic: affine grids ``clamp(round(theta / scale) + zero_point)``
        (halves to even; the quotient as ``quantize_arith`` says), table grids the nearest
        representable value (ties to even), quotient grids torchao's arithmetic in the quotient's
        dtype. The released value is the code's value computed in ``product_dtype`` and held in
        ``release_dtype`` (e.g. torchao's ``Int8Tensor.dequantize()`` on a bf16 weight:
        ``rnd_bf16(rnd_f32(q * scale))``). Tests check it bit for bit against the real release:
        the backend released the value of the cell the library scores.
        """
        scale, zp, _ = self.element_grid(start, end)
        th = theta.to(torch.float64)
        if self.storage_dtype is not None:
            th = stored(th, self.storage_dtype)
        live = scale > 0
        if self.kind == "quotient":
            # torchao quantize_affine / dequantize_affine, all in the quotient's dtype: released
            # (q - zp) * s rounded to that dtype
            dt = self._qdtype
            s_d = torch.where(live, scale, torch.ones_like(scale)).to(dt)
            j = self._quotient_code(th, scale, zp)
            val = (j.to(dt) * s_d).to(torch.float64)
            return torch.where(live, val, torch.zeros_like(th))
        safe = torch.where(live, scale, torch.ones_like(scale))
        if self.kind == "affine":
            z = zp.to(torch.float64)
            k = self._affine_code(th, scale, zp) - z
        else:
            assert self.values is not None
            k = self.values.to(torch.float64)[self._table_index(th, scale)]
        if self.product_dtype is not None:
            val = (k.to(self.product_dtype) * safe.to(self.product_dtype)).to(torch.float64)
        else:
            val = k * safe.to(torch.float64)
        if self.release_dtype is not None:
            val = val.to(self.release_dtype).to(torch.float64)
        return torch.where(live, val, torch.zeros_like(th))

    # -- the codes of given weights, by the backend's arithmetic (keys of the stored cells) --

    def _affine_code(self, th: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
        """The clamped code (float64, ``th``'s shape; per-element ``scale`` / ``zp`` broadcast on
        the last dim's left) the backend gives the weights ``th``."""
        s, z = scale.to(torch.float64), zp.to(torch.float64)
        if th.dim() > s.dim():
            s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        if self.quantize_arith == "mul_inv32":
            x = (th.to(torch.float32) * (1.0 / safe.to(torch.float32))).to(torch.float64)
        else:
            x = th / safe
        # integer zero points: round(theta/s) + zp; a float zero point (tinygemm's float-domain
        # zero) rounds theta/s + zp as a whole
        q = torch.where(z == torch.round(z), torch.round(x) + z, torch.round(x + z))
        return q.clamp(self.qmin, self.qmax)

    def _quotient_code(self, th: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
        """Quotient grids: ``j = q - zero_point`` (float64) torchao gives the weights ``th``."""
        dt = self._qdtype
        s, z = scale, zp.to(torch.float64)
        if th.dim() > s.dim():
            s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        s_d = torch.where(s > 0, s, torch.ones_like(s)).to(dt)
        j = torch.round(th.to(dt) * (1.0 / s_d)).to(torch.float64)
        return torch.minimum(torch.maximum(j, self.qmin - z), self.qmax - z)

    def _table_index(self, th: Tensor, scale: Tensor) -> Tensor:
        """Table grids: the index (long, ``th``'s shape) of the value each weight is cast to."""
        assert self.values is not None
        v = self.values.to(torch.float64)
        s = scale.to(torch.float64)
        if th.dim() > s.dim():
            s = s.unsqueeze(-1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        # the quotient as the backends compute it: in float32 where the weight and the scale are
        # float32 values (torchao's float8: w.float() / scale; a cast: scale 1), else in float64
        x = th / safe
        f32 = (th.to(torch.float32).to(torch.float64) == th) & (safe.to(torch.float32).to(torch.float64) == safe)
        x = torch.where(f32, (th.to(torch.float32) / safe.to(torch.float32)).to(torch.float64), x)
        mids = 0.5 * (v[1:] + v[:-1])
        pos = torch.searchsorted(mids, x, right=True)
        # a quotient exactly between two values goes to the even one (round half to even, as the
        # float casts do): in a table of every finite value of a float format, the bit patterns of
        # the values of one sign are consecutive integers counted from 0, so parity = distance to 0
        zero = torch.nonzero(v == 0).squeeze(-1)
        if zero.numel() == 1:
            tie = (pos > 0) & (x == mids[(pos - 1).clamp_min(0)])
            if bool(tie.any()):
                up_odd = ((pos - int(zero)).abs() % 2) == 1  # the upper value's pattern is odd
                pos = torch.where(tie & up_odd, pos - 1, pos)
        return pos

    def _stored_key(self, v: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
        """The key of the cell (float64: affine code, quotient ``j``, table index) holding each
        stored weight ``v``, by the backend's arithmetic; non-decreasing in ``v``."""
        if self.kind == "affine":
            return self._affine_code(v, scale, zp)
        if self.kind == "quotient":
            return self._quotient_code(v, scale, zp)
        return self._table_index(v, scale).to(torch.float64)

    def _center(self, theta: Tensor, scale: Tensor, zp: Tensor, code: Tensor | None) -> Tensor:
        """The key of each element's cell: the backend's ``code`` where given, else the key of
        the stored weight."""
        if code is not None and self.kind == "affine":
            return code.to(torch.float64)
        if code is not None and self.kind == "quotient":
            return code.to(torch.float64) - zp.to(torch.float64)
        assert self.storage_dtype is not None
        return self._stored_key(stored(theta.to(torch.float64), self.storage_dtype), scale, zp)

    def _stored_window(self, theta: Tensor, scale: Tensor, zp: Tensor, center: Tensor, half_window: int) -> Tensor:
        """The stored cells' edges ``[c, 2*half_window + 2]`` around the cells of key ``center``
        (the layout of :meth:`_edges`)."""
        assert self.storage_dtype is not None
        # a window wider than the grid holds +-inf beyond it: compute the grid's own width, pad
        # (the bounds' correction asks for 256-edge windows on a 16-code int4 grid)
        cells = (self.qmax - self.qmin) if self.kind != "table" else self.values.numel()  # type: ignore[union-attr]
        if half_window > cells:
            inner = self._stored_window(theta, scale, zp, center, cells)
            pad = half_window - cells
            return torch.cat([torch.full_like(inner[:, :1], -math.inf).expand(-1, pad + 1), inner[:, 1:-1],
                              torch.full_like(inner[:, :1], math.inf).expand(-1, pad + 1)], dim=-1)
        i = torch.arange(-half_window + 1, half_window + 1, dtype=torch.float64, device=theta.device)
        upper = center.unsqueeze(-1) + i  # the key of the cell above each inner edge
        if self.kind == "affine":
            raw = affine_boundaries(theta, scale, zp, self.qmin, self.qmax, half_window, code=center)
        elif self.kind == "quotient":
            inv, lo, hi = self._quotient(scale, zp)
            raw = quotient_boundaries(center, inv, lo, hi, self._qdtype, half_window)
        else:
            assert self.values is not None
            mids = table_layout(self.values, theta.device).mids
            e = upper.long()  # edge between values e - 1 and e
            inner = mids[(e - 1).clamp(0, mids.numel() - 1)] * scale.to(torch.float64).unsqueeze(-1)
            inner = torch.where(e >= 1, inner, torch.full_like(inner, -math.inf))
            inner = torch.where(e <= mids.numel(), inner, torch.full_like(inner, math.inf))
            inf = torch.full_like(inner[:, :1], math.inf)
            raw = torch.cat([-inf, inner, inf], dim=-1)
        inner = stored_edges(raw[:, 1:-1], upper, lambda v: self._stored_key(v, scale, zp), self.storage_dtype)
        return torch.cat([raw[:, :1], inner, raw[:, -1:]], dim=-1)

    def _storage_exact(self, theta: Tensor, sigma: Tensor, scale: Tensor, zp: Tensor,
                       code: Tensor | None, bounds: tuple[Tensor, Tensor] | None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(exact [c] bool, center [c], need [c], wide [c] bool or None)``: the elements scored on the stored cells (sd
        within ``STORAGE_EXACT_MAX_ULPS`` storage ulps at the edges within reach, or within
        ``STORAGE_FINE_CELLS`` of the grid's cells, or a bound within reach), their cell keys and
        the grid's keys each side they need (any number: the windows go up to the whole table;
        formerly an element needing more than ``_MAX_WINDOW`` was scored on the grid's own
        cells, 8x too fine for fp16 on a bf16 model: kappa up to 4.5e-3 too high). ``wide``: the
        elements not exact whose reach passes an overflow threshold the grid keys apart, with a
        window wider than ``STORAGE_OVERFLOW_MAX_WINDOW`` (:meth:`_overflow_open_moments`)."""
        D = self.storage_dtype
        assert D is not None
        th, sg = theta.to(torch.float64), sigma.to(torch.float64)
        reach = CUTOFF_SIGMAS * sg
        far = th.abs() + reach
        if bounds is not None:
            far = torch.minimum(far, torch.maximum(bounds[0].abs(), bounds[1].abs()).to(torch.float64))
        # the stored cells' edges move the moments by the first order of (half an ulp) / sd where
        # the grid is coarse (kappa follows the position within a cell), by its square where the
        # grid is fine (sd above STORAGE_FINE_CELLS cells: the position's effect is ~exp(-2 pi^2 (sd/h)^2))
        exact = (sg <= STORAGE_EXACT_MAX_ULPS * storage_ulp(far, D)) | (sg <= STORAGE_FINE_CELLS * self._cell_width(far, scale))
        if bounds is not None:
            # a bound within reach cuts a cell at the stored midpoint: first order at any sd
            exact = exact | bounds_in_reach(th, sg, bounds[0].to(torch.float64), bounds[1].to(torch.float64))
        center = self._center(th, scale, zp, code)
        k_lo = self._stored_key(stored(th - reach, D), scale, zp)
        k_hi = self._stored_key(stored(th + reach, D), scale, zp)
        over = self._overflow_in_reach(th, reach, scale, zp, k_lo, k_hi)
        need = torch.maximum(center - k_lo, k_hi - center) + 1
        wide = None
        if over is not None:
            # where the grid keys +-inf apart from the largest value, its own cells run on past the
            # overflow threshold where the stored ones end (kappa up to 0.18 high): the stored
            # cells' sums, where their window is not wider than STORAGE_OVERFLOW_MAX_WINDOW keys;
            # the others (fine: sd above 2 of the grid's cells) the open cells' closed form
            narrow = need <= STORAGE_OVERFLOW_MAX_WINDOW
            wide = over & ~narrow & ~exact
            exact = exact | (over & narrow)
            wide = wide if bool(wide.any()) else None
        return exact, center, need, wide

    def _overflow_in_reach(self, th: Tensor, reach: Tensor, scale: Tensor, zp: Tensor, k_lo: Tensor,
                           k_hi: Tensor) -> Tensor | None:
        """The elements whose reach (``th +- reach``, parameter units) passes the storage dtype's
        overflow threshold (fp16 ``+-65520``) on a side where the grid keys ``+-inf`` apart from the
        largest finite value (a ``bf16`` cast of fp16 weights: 65504 goes to bf16's 65536, ``inf``
        stays ``inf``): ``[c]`` bool, ``None`` where none. There the stored cells end at the
        threshold, an unbounded cell beyond, while the grid's own cells run on. ``k_lo`` / ``k_hi``
        (the keys of the reach's ends, ``[c]``) are clamped in place to one key past the largest
        value's: the keys between it and ``inf``'s hold no stored value (their edges all lie at
        the threshold), so the stored cells' window need not hold them (bf16's keys from 65536 to
        ``inf``: 16k each side)."""
        D = self.storage_dtype
        assert D is not None
        thr = overflow_threshold(D)
        up, down = th + reach >= thr, th - reach <= -thr
        out = up | down
        if not bool(out.any()):
            return None
        ii = torch.nonzero(out).squeeze(-1)
        s, z = scale[ii], zp[ii]
        top = float(torch.finfo(D).max)

        def key(v: float) -> Tensor:
            return self._stored_key(torch.full((ii.numel(),), v, dtype=torch.float64, device=th.device), s, z)

        k_top, k_bot = key(top), key(-top)
        k_hi[ii] = torch.minimum(k_hi[ii], k_top + 1)
        k_lo[ii] = torch.maximum(k_lo[ii], k_bot - 1)
        out = torch.zeros_like(out)
        out[ii] = (up[ii] & (key(math.inf) != k_top)) | (down[ii] & (key(-math.inf) != k_bot))
        return out

    def _overflow_open_moments(self, theta: Tensor, sigma: Tensor, scale: Tensor, kappa_only: bool,
                               zp: Tensor | None = None) -> CellMoments:
        """Cell moments ``[c]`` of elements whose reach passes the storage overflow threshold ``+-T``
        (fp16 65520) where the grid keys ``+-inf`` apart, with sd above 2 of the grid's cells
        (:meth:`_storage_exact`'s ``wide``): the finite stored cells, within ``(-T, T)``, in the
        fine-grid expansion, the two unbounded overflow cells beyond exact
        (:func:`~mis_lightning.functional.table._open_fine_moments`, the fp16 cast's open cells'
        form, with ``T`` for the table's ends): ``kappa = int_a^b u^2 phi - (h^2/12 - h^4/144)
        P(a, b)`` plus the end cells' ``p mu^2``, ``h`` the narrowest of the grid's cells within
        reach in sd (0 where the reach holds 0: a float table's cells shrink towards it), so the
        finite cells' variance is never over-counted (kappa high by at most their
        ``sum p_k (w_k^2 - h^2) / 12``; at sd above 2 cells, ``w_k <= sd / 2``). The stored edges
        are read at the grid's own, as the fine-sd switch reads them (second order). ``E|m|``:
        ``2 max(phi(l), phi(u))`` over the weight's own stored cell ``(l, u)`` (sd units; the
        overflow cell beyond ``T`` where the weight lies there): exact on any partition
        (:func:`~mis_lightning.functional.kernel.own_cell_mean_abs`; ``zp``: ``[c]`` zero points,
        default 0). With ``kernel.EXACT_AFFINE_MEAN_ABS`` False: ``2 phi(median(a, 0, b)) - 0.05
        h^2 P(a, b)`` (the fine cells' ``int |u| phi`` and the end cells' ``p |mu|``, the
        expansion's average over the position in the cell: off by up to ``0.05 h^2``). Formerly these read the grid's own cells running on past ``T``:
        kappa 0.18 high at fp16's 65504 under ``bf16`` with sd 1e4."""
        D = self.storage_dtype
        assert D is not None
        th, sg = theta.to(torch.float64), sigma.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
        thr = overflow_threshold(D)
        reach = CUTOFF_SIGMAS * sg
        near = torch.where((th - reach <= 0) & (th + reach >= 0), torch.zeros_like(th),
                           torch.minimum((th - reach).abs(), (th + reach).abs()))
        if self.kind == "affine":
            h = scale.to(torch.float64)
        elif self.kind == "table":
            assert self.values is not None
            mids = table_layout(self.values, th.device).mids
            s = scale.to(torch.float64)
            safe = torch.where(s > 0, s, torch.ones_like(s))
            k = torch.searchsorted(mids, near / safe).clamp(1, mids.numel() - 1)
            k2 = torch.searchsorted(mids, -near / safe).clamp(1, mids.numel() - 1)
            h = torch.minimum(mids[k] - mids[k - 1], mids[k2] - mids[k2 - 1]) * safe
        else:  # quotient: its cells' widths vary around the step; none counted (conservative)
            h = torch.zeros_like(th)
        h2 = (h / sg) ** 2
        ends = SimpleNamespace(lo_edge=-thr, hi_edge=thr)
        one = torch.ones_like(th)
        kappa, m4 = _open_fine_moments(th, sg, one, h2, ends, kappa_only)  # type: ignore[arg-type]
        if kappa_only:
            nan = torch.full_like(kappa, math.nan)
            return CellMoments(kappa=kappa, mean_abs=nan, m4=nan.clone(), coverage=one)
        if _kernel.EXACT_AFFINE_MEAN_ABS:
            # the own stored cell (the release's partition: the stored values' keys), exact
            z = torch.zeros_like(th) if zp is None else zp.to(torch.float64)
            own = self._stored_window(th, scale, z, self._center(th, scale, z, None), 1)
            mean_abs = kernel_own_cell_mean_abs((own[:, 1] - th) / sg, (own[:, 2] - th) / sg)
        else:
            a, b = (-thr - th) / sg, (thr - th) / sg
            prob = (torch.special.ndtr(b) - torch.special.ndtr(a)).clamp_min(0.0)
            mid = torch.minimum(torch.maximum(torch.zeros_like(a), a), b)
            mean_abs = (2.0 * torch.exp(-0.5 * mid * mid) / math.sqrt(2.0 * math.pi)
                        - 0.05 * h2 * prob).clamp(0.0, SQRT_2_OVER_PI)
        assert m4 is not None
        return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=one)

    def _storage_cells(self, theta: Tensor, sigma: Tensor, scale: Tensor, zp: Tensor,
                       bounds: tuple[Tensor, Tensor] | None) -> Tensor | None:
        """``[c]`` bool: the elements whose stored cells within reach (8.5 sd, and the cell beyond
        each end) are the storage cells themselves, or as good as: each storage midpoint is a stored
        edge (every ``D`` value has a key of its own: a grid finer than the storage grid, or equal;
        ``fp16`` on a bf16 model from 2^-17 to 65280, ``bf16`` on a bf16 model everywhere), except in
        cells that hold several ``D`` values ("merged") whose effect on kappa is at most
        ``STORAGE_CELLS_KAPPA`` (1e-10): a partition refined inside a cell ``m`` of width ``w_m`` gains
        ``p_m Var(u | m) <= p_m (w_m / sd)^2 / 4 <= (w_m / sd)^3 / (4 sqrt(2 pi))`` of kappa, summed
        over the merged cells within reach (``fp16`` on a bf16 model: fp16's subnormal cells, 2^-24
        wide, below 2^-17: a weight whose reach spans 0 qualifies from sd ~ 4e-4). The storage cells
        read kappa at most that much high (conservative). No bound of the release may lie within reach. ``None``:
        not checked (a grid of at most ``2 * _MAX_WINDOW`` keys, whose windows the stored cells'
        sums cover at any sd, or more than ``_STORAGE_CELL_RUNS`` runs of equal ``(scale, zero
        point)`` in the chunk)."""
        D = self.storage_dtype
        assert D is not None
        n_keys = (self.qmax - self.qmin) if self.kind != "table" else self.values.numel()  # type: ignore[union-attr]
        c = theta.shape[0]
        if n_keys <= 2 * _MAX_WINDOW or c == 0:
            return None
        s64, z64 = scale.to(torch.float64), zp.to(torch.float64)
        new = (s64[1:] != s64[:-1]) | (z64[1:] != z64[:-1])
        if int(new.sum()) + 1 > _STORAGE_CELL_RUNS:
            return None
        vals = storage_values(D).to(theta.device)
        V = vals.numel()
        th, sg = theta.to(torch.float64), sigma.to(torch.float64)
        reach = CUTOFF_SIGMAS * sg
        # the D values holding the ends of the reach, and one more each side (the cells beyond)
        lo = (torch.searchsorted(vals, stored(th - reach, D)) - 1).clamp(0, V - 1)
        hi = (torch.searchsorted(vals, stored(th + reach, D)) + 1).clamp(0, V - 1)
        gid = torch.cat([new.new_zeros(1, dtype=torch.long), new.long().cumsum(0)])
        first = torch.nonzero(torch.cat([new.new_ones(1), new])).squeeze(-1)
        gain = torch.empty(c, dtype=torch.float64, device=theta.device)  # sum of w_m^3 of merged cells in reach
        cache = self.__dict__.setdefault("_merged_cells", {})
        for r, i0 in enumerate(first.tolist()):
            key = (float(s64[i0]), float(z64[i0]), vals.device)
            if key not in cache:
                # the outermost values stand for +-inf (the overflow cells): key inf itself
                k = self._stored_key(as_stored(vals, D), s64[i0].expand(V), z64[i0].expand(V))
                # runs of D values sharing a key: one stored cell each, between the storage
                # midpoints around the run (the outermost cells: to the last D value)
                starts = torch.cat([k.new_ones(1, dtype=torch.bool), k[1:] != k[:-1]])
                run = torch.cumsum(starts.long(), 0) - 1
                sidx = torch.nonzero(starts).squeeze(-1)  # first D value of each run
                eidx = torch.cat([sidx[1:] - 1, sidx.new_full((1,), V - 1)])  # last
                mids = 0.5 * (vals[1:] + vals[:-1])
                left = torch.where(sidx > 0, mids[(sidx - 1).clamp_min(0)], vals[0])
                right = torch.where(eidx < V - 1, mids[eidx.clamp_max(V - 2)], vals[-1])
                w = torch.where(eidx > sidx, right - left, torch.zeros_like(left))
                # merged cells wider than _MERGED_MAX_WIDTH are counted, not summed: the prefix
                # sums then hold no term that would swamp the others (a 1e38-wide cell beyond
                # fp16's range next to 2^-24-wide subnormal cells)
                big = w > _MERGED_MAX_WIDTH
                w3 = torch.where(big, torch.zeros_like(w), w**3)
                cum = torch.cat([w3.new_zeros(1), w3.cumsum(0)])  # cum[j]: runs before run j
                nbig = torch.cat([big.new_zeros(1, dtype=torch.long), big.long().cumsum(0)])
                cache[key] = (run, cum, nbig)
            run, cum, nbig = cache[key]
            sel = torch.nonzero(gid == r).squeeze(-1)
            r_lo, r_hi = run[lo[sel]], run[hi[sel]] + 1
            gain[sel] = torch.where(nbig[r_hi] > nbig[r_lo], math.inf, cum[r_hi] - cum[r_lo])
        sgt = sg.clamp_min(torch.finfo(torch.float64).tiny)
        same = (gain / (4.0 * math.sqrt(2.0 * math.pi) * sgt ** 3) <= STORAGE_CELLS_KAPPA) & torch.isfinite(th) & (sg > 0)
        if bounds is not None:
            same &= ~bounds_in_reach(th, sg, bounds[0].to(torch.float64), bounds[1].to(torch.float64))
        return same

    def _cell_width(self, x: Tensor, scale: Tensor) -> Tensor:
        """An upper bound of the grid's own cell widths within ``|x|`` (parameter units, ``[c]``):
        the step (affine), two steps (quotient: bf16's widest cells are 1.5 steps), the cell of
        the value nearest ``|x|`` (tables of float formats: cells widen away from 0)."""
        s = scale.to(torch.float64)
        if self.kind == "affine":
            return s
        if self.kind == "quotient":
            return 2.0 * s
        assert self.values is not None
        mids = table_layout(self.values, x.device).mids
        safe = torch.where(s > 0, s, torch.ones_like(s))
        k = torch.searchsorted(mids, x.abs() / safe).clamp(1, mids.numel() - 1)
        lo_w = (mids[k] - mids[k - 1]) * safe
        k2 = torch.searchsorted(mids, -x.abs() / safe).clamp(1, mids.numel() - 1)
        return torch.maximum(lo_w, (mids[k2] - mids[k2 - 1]) * safe)

    def _storage_moments(self, theta: Tensor, sigma: Tensor, scale: Tensor, zp: Tensor, center: Tensor,
                         need: Tensor, bounds: tuple[Tensor, Tensor] | None,
                         compile_policy: CompilePolicy | None, kappa_only: bool) -> CellMoments:
        """Exact sums over the stored cells within 8.5 sd (``bounds``: already the stored ones,
        :meth:`element_bounds`); frozen elements 0, as on the other grids.

        The stored edges depend on the grid (scale, zero point, code) alone, not on the weight:
        they are computed once per block of the chunk (:meth:`_stored_table`: a row per run of
        elements with one scale and zero point) and each element's window, sized to the cells
        within its reach, is gathered from its block's row (else, where the table would hold more
        edges than the windows, computed for the element as before: the same edges). A weight with a bound within reach sums its window clipped at the bounds,
        the region beyond a bound read as revealed (as :func:`bounded_moments` reads inner
        bounds). ``kappa_only``: ``mean_abs`` and ``m4`` are NaN (``kappa`` bitwise the same).
        A window's runs of equal edges (empty cells: the fp16 scheme's codes between two bf16
        values, edges clipped at a bound) are evaluated once (:mod:`~mis_lightning.functional.distinct`:
        the table windows from the table's distinct edges, other windows deduplicated once built),
        the sums bitwise those over every edge."""
        th, sg = theta.to(torch.float64), sigma.to(torch.float64)
        c = th.shape[0]
        sgt = sg.clamp_min(torch.finfo(torch.float64).tiny)
        kappa = torch.zeros(c, dtype=torch.float64, device=th.device)
        mean_abs, m4 = torch.zeros_like(kappa), torch.zeros_like(kappa)
        coverage = torch.ones_like(kappa)
        if c == 0:
            return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)
        need = need.clamp(min=2, max=_STORAGE_WINDOWS[-1])
        window_edges = int((2 * need + 2).sum())
        table = self._stored_table(scale, zp, center, window_edges)
        if table is not None:
            flat, row, rel, last = table

            def edges(ii: Tensor, m: int) -> Tensor:
                # columns rel - m .. rel + m + 1 of the element's row; beyond the row: +-inf
                j = (rel[ii] - m).unsqueeze(-1) + torch.arange(2 * m + 2, device=th.device)
                e = flat.take(j.clamp(0, last) + row[ii].unsqueeze(-1))
                e[:, 0], e[:, -1] = -math.inf, math.inf
                return e
        else:
            def edges(ii: Tensor, m: int) -> Tensor:
                return self._stored_window(th[ii], scale[ii], zp[ii], center[ii], m)

        lo = hi = None
        window = edges
        if bounds is not None:
            lo, hi = bounds[0].to(torch.float64), bounds[1].to(torch.float64)
            reach = bounds_in_reach(th, sg, lo, hi)
            if bool(reach.any()):
                def window(ii: Tensor, m: int) -> Tensor:
                    # the inner edges clipped at the element's bounds: zero-width cells at a
                    # bound, one lumped cell beyond it (turned into the revealed region below)
                    e = edges(ii, m)
                    r = reach[ii].unsqueeze(-1)
                    inner = e[:, 1:-1]
                    clipped = torch.minimum(torch.maximum(inner, lo[ii].unsqueeze(-1)), hi[ii].unsqueeze(-1))
                    e[:, 1:-1] = torch.where(r, clipped, inner)
                    return e
            else:
                lo = hi = None
        sums = None
        if table is not None and lo is None:
            # (bounds clip a window's edges: those windows are built and deduplicated as edges)
            starts = run_starts(flat)

            def sums(ii: Tensor, m: int) -> CellMoments | None:
                return table_window_moments(flat, starts, row[ii], rel[ii], last, m, th[ii], sgt[ii], kappa_only)
        own = edges(torch.arange(c, device=th.device), 1)[:, 1:3]
        frozen = ((th - own[:, 0]) / sgt > CUTOFF_SIGMAS) & ((own[:, 1] - th) / sgt > CUTOFF_SIGMAS)
        if lo is not None:
            frozen = frozen & ~reach
        rest = torch.nonzero(~frozen).squeeze(-1)
        if rest.numel():
            windowed_moments((kappa, mean_abs, m4, coverage), rest, need[rest], _STORAGE_WINDOWS,
                             _STORAGE_ROWS_BUDGET, window, th, sgt,
                             kernel=lambda a: distinct_edge_moments(a, kappa_only=kappa_only), sums=sums,
                             sums_budget=DISTINCT_ROWS_BUDGET)
        mm = CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)
        if lo is not None and hi is not None:
            reveal_beyond_bounds(mm, torch.nonzero(reach).squeeze(-1), th, sg, lo, hi)
        return mm

    def _lowest_key(self, scale: Tensor, zp: Tensor) -> Tensor:
        """The lowest key of each grid ``[r]`` (float64) in the stored tables' layout."""
        if self.kind == "affine":
            return torch.full_like(scale, float(self.qmin))
        if self.kind == "quotient":
            return self.qmin - zp
        return torch.zeros_like(scale)

    def _stored_table(self, scale: Tensor, zp: Tensor, center: Tensor,
                      budget: int) -> tuple[Tensor, Tensor, Tensor, int] | None:
        """The stored edges of every code of each grid of elements ``[c]`` (one row per run of
        consecutive elements with one ``(scale, zero point)``: the blocks of a row-major chunk),
        or ``None`` where the table would hold more than ``budget`` edges (the elements' own
        windows then cost less). Row layout: :meth:`_stored_window` around key ``low + h``, ``low``
        the grid's lowest key, ``2h`` >= the number of edges: column ``j`` holds the edge below
        key ``low + j``; columns 0 and ``2h + 1`` are ``-inf`` / ``inf``, and so is any edge
        beyond the code range. Returns ``(table.reshape(-1), row [c], rel [c], 2h + 1)``:
        element ``i``'s row starts at ``row[i]`` of the flat table, and the edge below key
        ``center[i] + d`` is in its column ``rel[i] + d``."""
        s64, z64 = scale.to(torch.float64), zp.to(torch.float64)
        n_edges = (self.qmax - self.qmin) if self.kind != "table" else self.values.numel() - 1  # type: ignore[union-attr]
        h = (n_edges + 1) // 2
        width = 2 * h + 2
        new = (s64[1:] != s64[:-1]) | (z64[1:] != z64[:-1])
        if (int(new.sum()) + 1) * width > budget:
            return None
        gid, first = _runs(new)
        su, zu = s64[first], z64[first]
        low = self._lowest_key(su, zu)
        # in blocks of rows: the stored edges' ~40 element-wise operations on cache-sized temporaries
        rows = max(1, _STORAGE_ROWS_BUDGET // width)
        tab = torch.cat([self._stored_window(su[a:a + rows], su[a:a + rows], zu[a:a + rows], low[a:a + rows] + h, h)
                         for a in range(0, su.numel(), rows)])
        rel = (center - low[gid]).long()
        return tab.reshape(-1), gid * width, rel, width - 1

    #: fields no cell moment reads: a label, the footprint, and the freed backend output
    _NOT_CELLS: ClassVar[frozenset[str]] = frozenset({"name", "method", "bits_per_weight", "dequantized",
                                                       "product_dtype", "release_dtype", "zero_count"})

    def same_cells(self, other: ParamGrid) -> bool:
        """Whether ``other`` quantizes the weights exactly as this grid does: same class, and
        every field the cell moments can read (kind, shape, block size, code range, rounding,
        scale rule, and the tensors: scales, zero points, codes, values, revealed mask,
        support) equal bit for bit (same dtype, shape, and bytes: ``-0.0`` differs from ``0.0``,
        a NaN equals only the same NaN). Such grids give bitwise-identical cell moments at any
        weights; the scoring pass computes them once (e.g. ``int8_weight_only`` and
        ``int8_dynamic_activation_int8_weight``, which differ in activations only, which the
        release's weights do not hold). Fields outside ``_NOT_CELLS`` are compared whatever
        they are, so a field added later counts unless listed there. Cost: one pass over
        each tensor (the codes: 1 byte per weight for int8); ``False`` at the first
        difference."""
        if type(other) is not type(self):
            return False
        for f in fields(self):
            if f.name in self._NOT_CELLS:
                continue
            if not _same_value(getattr(self, f.name), getattr(other, f.name)):
                return False
        return True


def hook_reparametrization(module: nn.Module) -> tuple[str, str, str] | None:
    """``(parameter attribute, torch function, its removal)`` where ``module``'s ``weight`` is
    recomputed before every forward by the hook-based ``torch.nn.utils.weight_norm`` (from
    ``weight_g``, ``weight_v``) or ``torch.nn.utils.spectral_norm`` (from ``weight_orig``): the
    deprecated forms of the parametrizations, whose ``weight`` is a plain tensor attribute, not
    a parameter a scheme can quantize. ``None`` for any other module."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return (f"{hook.name}_g, {hook.name}_v", "torch.nn.utils.weight_norm",
                    f"torch.nn.utils.remove_weight_norm(module, {hook.name!r})")
        if isinstance(hook, SpectralNorm):
            return (f"{hook.name}_orig", "torch.nn.utils.spectral_norm",
                    f"torch.nn.utils.remove_spectral_norm(module, {hook.name!r})")
    return None


# what makes a parametrized weight quantizable (its value is what the release then holds)
_REMOVE_PARAMETRIZATION = ("torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') before "
                           "quantizing and assessing keeps the computed weight as a plain parameter, which "
                           "the schemes quantize")


def surgery_reasons(model: nn.Module) -> dict[str, str]:
    """``{module name: reason}`` for layer weights that are no parameter because of model
    surgery a scheme does not see through: ``torch.nn.utils.prune`` (``weight = weight_orig *
    weight_mask``, recomputed before each forward) and ``torch.nn.utils.parametrize``
    (``weight_norm``, ``spectral_norm``, ``orthogonal``): the reason a scheme finds nothing to
    quantize in such a model, and the fix."""
    out: dict[str, str] = {}
    for fqn, m in model.named_modules():
        if isinstance(getattr(m, "weight_orig", None), nn.Parameter) and isinstance(
                getattr(m, "weight_mask", None), Tensor):
            out[fqn or "model"] = (
                f"{type(m).__name__}.weight pruned by torch.nn.utils.prune (weight_orig * weight_mask, not a "
                "parameter): make the pruning permanent first (torch.nn.utils.prune.remove(module, 'weight'), "
                "or Lightning's ModelPruning(make_pruning_permanent=True))")
        elif torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            out[fqn or "model"] = (f"{type(m).__name__}.weight is parametrized (torch.nn.utils.parametrize): "
                                   "computed from its parametrization's parameters, not a plain weight; "
                                   + _REMOVE_PARAMETRIZATION)
        elif (hooked := hook_reparametrization(m)) is not None:
            out[fqn or "model"] = (f"{type(m).__name__}.weight is recomputed from {hooked[0]} before every forward "
                                   f"({hooked[1]}), not a parameter: {hooked[2]} keeps it as a plain parameter, "
                                   "which the schemes quantize")
    return out


def affine_grid(name: str, *, codes: Tensor, scale: Tensor, zero_point: Tensor,
                block_size: tuple[int, ...], qmin: int, qmax: int, dequantized: Tensor,
                code_bits: float, side_bits: float | None = None,
                asymmetric: bool = False, zero_count: int | None = None) -> ParamGrid:
    """An affine :class:`ParamGrid` (value ``(q - zero_point) * scale``) from a backend's codes.

    The helper every integer backend uses to build its grid, so that storage is counted one
    way: ``bits_per_weight = code_bits + side_bits / prod(block_size)``.

    Args:
        name: the parameter's name in the original model.
        codes: integer codes, the parameter's shape.
        scale, zero_point: per-block tensors (``block_size`` layout, e.g. ``[N, 1]`` per row).
        block_size: elements per block along each dim.
        qmin, qmax: the code range.
        dequantized: the backend's own released values (cast to float32, the parameter's shape);
            or empty, with their ``zero_count`` (:func:`zero_counts_only`).
        code_bits: bits per code (nominal: 4 for int4 codes held in int8 memory).
        side_bits: bits of one block's scale and zero point; ``None``: the scale's dtype, plus
            the zero point's when ``asymmetric`` (a symmetric zero point carries nothing).

    Returns:
        the grid (``kind="affine"``, ``rounding="nearest"``).
    """
    shape = tuple(codes.shape)
    if side_bits is None:
        side_bits = scale.element_size() * 8 + (zero_point.element_size() * 8 if asymmetric else 0)
    return ParamGrid(
        name=name, shape=shape, kind="affine",
        dequantized=dequantized.detach().to(torch.float32).reshape(shape if zero_count is None else (-1,)),
        bits_per_weight=code_bits + side_bits / math.prod(block_size),
        scale=scale, block_size=tuple(int(b) for b in block_size), zero_point=zero_point,
        qmin=int(qmin), qmax=int(qmax), codes=codes, zero_count=zero_count,
    )


@dataclass
class QuantizationResult:
    """What :meth:`QuantizationScheme.apply` returns.

    Attributes:
        model: the quantized copy (the original is untouched); ``None`` where the scheme gave
            its grids without one (:func:`release_unread`).
        grids: parameter name (as in the original model) -> :class:`ParamGrid`.
        unquantized: parameter name -> why the scheme left it in float (``kappa = 1``).
        scheme: the scheme's registry name.
        notes: backend messages worth showing (deprecations, fallbacks).
    """

    model: nn.Module | None
    grids: dict[str, ParamGrid]
    unquantized: dict[str, str]
    scheme: str
    notes: list[str] = field(default_factory=list)


class QuantizationScheme(ABC):
    """A named post-training quantization scheme.

    Subclasses implement :meth:`_quantize_copy`, which quantizes a private copy in place
    through the real backend and returns the grids read from the backend's tensors, and
    :meth:`supports` (the layer types the backend quantizes, ``layers`` in words).
    """

    #: registry name (a public contract: configs and reports use it)
    name: str = "scheme"
    #: which backend runs it ("torchao", "native", "builtin", ...)
    backend: str = "builtin"
    #: how the scheme's scales depend on the weights: ``"absmax"`` (symmetric), ``"minmax"``
    #: (asymmetric) or ``"none"`` (fixed grid, e.g. dtype casts). The weights a weight-derived
    #: scale determines exactly are scored as unquantized (see :func:`revealed_by_scale`).
    scale_rule: Literal["none", "absmax", "minmax"] = "none"
    #: the layers whose weights the scheme quantizes, in words (for reasons and reports)
    layers: str = "nn.Linear"
    #: how the backend rounds (see :attr:`ParamGrid.rounding`); ``apply`` stamps it on every
    #: grid that does not declare its own. Not ``"nearest"``: scored by Monte Carlo
    #: re-quantization (the real scheme on perturbed weights).
    rounding: str = "nearest"
    #: ``filter_fn(module, fqn) -> bool`` narrowing the layers (``None``: every supported one)
    filter_fn: FilterFn | None = None
    #: whether the backend overwrites the copy's weight tensors in place, so a tied weight reaches
    #: every holder (``rtn_*``, ``native_*_per_row``): :meth:`select_weights`' default ``in_place``,
    #: which the up-front checks read too (nu42a: they took every scheme as replacing the weight and
    #: said ``native_int8_per_row`` quantized no weight of a tied language model it quantizes)
    weights_in_place: ClassVar[bool] = False

    @property
    def grids_from_source(self) -> bool:
        """Whether, inside :func:`release_unread` and :func:`zero_counts_only`,
        :meth:`_quantize_copy` may be given the model itself (never written: the backend only
        reads it) and :meth:`apply` returns ``model=None``. Default ``False``: a private copy."""
        return False

    def _reads_source(self) -> bool:
        """Whether :meth:`apply` gives :meth:`_quantize_copy` the model itself now (no release read,
        zeros counted, :attr:`grids_from_source`)."""
        return not release_read() and not dequantized_kept() and self.grids_from_source

    def _given_source(self) -> bool:
        """Inside :meth:`_quantize_copy`: whether this call's model is the user's own (:meth:`apply`
        chose :meth:`_reads_source`), which the backend must not write; ``False`` for a copy (also
        a composite scheme's, whose candidates' ``_quantize_copy`` it calls on its own copy)."""
        return bool(getattr(self, "_source_given", False))

    def __init__(self, filter_fn: FilterFn | None = None) -> None:
        self.filter_fn = filter_fn

    def check_available(self) -> None:
        """Raise :class:`SchemeUnavailableError` if this machine cannot run the scheme."""

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`SchemeError` if the scheme cannot quantize ``model``'s weights as they
        are (e.g. a dtype its backend refuses), before anything is trained or copied; the
        model is not modified. Default: nothing to check."""

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> QuantizationScheme:
        """The scheme ready to quantize ``model``, given calibration batches (optional step).

        Data-free schemes (every built-in one) return ``self`` and never read ``batches``. A
        data-dependent scheme (GPTQ-, AWQ- or SmoothQuant-like) returns a scheme that holds
        what it learnt from the batches (e.g. per-layer input statistics) and declares a
        ``rounding`` other than ``"nearest"``, so that it is scored by Monte Carlo
        re-quantization. ``model`` and the batches must not be modified.

        Args:
            model: the float model to be quantized.
            batches: an iterable of the training batches (as the loader yields them).

        Returns:
            the calibrated scheme (``self`` when nothing is learnt).
        """
        return self

    def describe(self) -> dict:
        """Plain-type description for reports and configs."""
        return {"name": self.name, "backend": self.backend}

    def flat_spec(self) -> Any:
        """The grid rule (a :class:`~mis_lightning.quantization.beyond_linear.FlatSpec`) with
        which the scheme also quantizes convolutions, embeddings and attention projections,
        or ``None`` (the default): the scheme quantizes only the layers :meth:`supports`."""
        return None

    def supports(self, module: nn.Module) -> bool:
        """Whether the backend quantizes this module's ``weight`` (before ``filter_fn``)."""
        return isinstance(module, nn.Linear)

    def _replaced_weights(self, model: nn.Module) -> list[Tensor]:
        """Parameters of ``model`` that the backend only reads and then replaces in the copy by a
        new tensor (never writes): :meth:`apply`'s copy holds them on ``model``'s storage
        (:class:`~mis_lightning._modelcopy.SharedWeights`, :data:`SHARE_REPLACED_WEIGHTS`).
        Default: none (every parameter is copied)."""
        return []

    def _selected(self, module: nn.Module, fqn: str, default: Callable[[nn.Module], bool] | None = None) -> bool:
        if not (default or self.supports)(module):
            return False
        return self.filter_fn is None or bool(self.filter_fn(module, fqn))

    def _in_selection(self, p: Tensor) -> bool:
        """Whether ``p`` is among the parameters ``apply(params=...)`` restricts to."""
        # ids (in the copy) set by ``apply`` for the duration of one call; None: all
        only = getattr(self, "_only", None)
        return only is None or id(p) in only

    def select_weights(self, model: nn.Module, skip_reason: Callable[[nn.Module], str | None] | None = None,
                       in_place: bool | None = None,
                       ) -> tuple[dict[str, tuple[nn.Module, str, list[tuple[str, nn.Module]]]], dict[str, str], list[str]]:
        """Which layers' ``weight`` to quantize (the layer-selection helper of every backend:
        :meth:`supports`, ``filter_fn``, ``apply(params=...)`` and tied weights).

        Returns ``(chosen, reasons, notes)``: ``chosen`` maps the fqn of the first layer
        holding each weight to ``(layer, parameter name, [(fqn, layer) of the other layers
        holding the same weight])``; ``reasons`` maps weights left in float to why.

        A weight held by several modules (tied) is quantized once and must reach every
        holder. ``in_place`` backends (``None``: the class's :attr:`weights_in_place`; the copy's tensor is overwritten with its quantized
        values) do that by construction. Backends that *replace* the weight (torchao, torch's
        quantized modules) can do it only if every holder is a layer they quantize under the
        same config; otherwise the weight stays in float everywhere (the release would hold a
        float copy of it), with the reason.
        """
        if in_place is None:
            in_place = self.weights_in_place
        names = {id(p): n for n, p in model.named_parameters()}
        uses = parameter_uses(model)
        chosen: dict[str, tuple[nn.Module, str, list[tuple[str, nn.Module]]]] = {}
        reasons: dict[str, str] = {}
        notes: list[str] = []
        done: set[int] = set()
        for fqn, module in model.named_modules():
            # A parametrized weight (weight_norm, spectral_norm) is computed on every read, and
            # spectral_norm's read in train mode runs its power iteration, updating the user's
            # buffers: it is no parameter either (named_parameters holds its originals), so skip
            # it unread.
            if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
                continue
            w = getattr(module, "weight", None)
            if not isinstance(w, Tensor) or id(w) not in names or id(w) in done:
                continue
            if not self._selected(module, fqn) or not self._in_selection(w):
                continue
            done.add(id(w))
            name = names[id(w)]
            others = [(f, a, m) for f, a, m in uses.get(id(w), []) if m is not module]
            if others and not in_place:
                bad = [(f, a, m) for f, a, m in others
                       if a != "weight" or not self._selected(m, f)
                       or (skip_reason is not None and skip_reason(m) is not None)]
                if bad:
                    # name both holders: the parameter's name is often the other holder's
                    # ('emb.weight' for a Linear head tied to an Embedding), so "this layer" alone
                    # left the reader guessing which layer the scheme does quantize (fu32)
                    reasons[name] = (
                        f"tied weight: {_holder(fqn, 'weight', module)} is also held by "
                        f"{', '.join(_holder(*u) for u in bad)}, which scheme {self.name!r} does not "
                        "quantize with it (its backend pass skips that layer; a tied weight is not quantized "
                        "by two passes, and quantizing only some of its uses would release it in float "
                        "anyway): left in float everywhere")
                    continue
            r = skip_reason(module) if skip_reason is not None else None
            if r is not None:
                reasons[name] = r
                continue
            chosen[fqn] = (module, name, [(f, m) for f, _, m in others])
            if others:
                notes.append(f"{self.name}: weight {name!r} is shared by {_holder(fqn, 'weight', module)} "
                             f"and {', '.join(_holder(*u) for u in others)}; every holder releases "
                             "the same quantized weight")
        return chosen, reasons, notes

    _plan_weights = select_weights  # the name the backends used before

    def _float_reason(self, name: str, p: Tensor, holders: list[tuple[str, str, nn.Module]],
                      selected: bool = True) -> str:
        """Why a parameter without a grid stayed in float (when the backend gave no reason);
        ``holders``: its :func:`parameter_uses` in the original model."""
        if not selected:
            return "outside apply(params=): left in float in this copy"
        if holders and all(a.endswith("bias") for _, a, _ in holders):
            return f"bias: scheme {self.name!r} quantizes layer weights only"
        if not p.is_floating_point():
            return "not a floating-point parameter"
        supported = [(f, a, m) for f, a, m in holders if a == "weight" and self.supports(m)]
        if not supported:
            f, a, m = holders[0] if holders else ("?", name, nn.Module())
            if type(m).__name__ == "ParametrizationList":  # torch.nn.utils.parametrize (weight_norm, spectral_norm)
                layer = name.split(".parametrizations.")[0]
                how = ", ".join(type(q).__name__ for q in m) if isinstance(m, nn.ModuleList) else "a parametrization"
                return (f"parametrized weight of {layer!r} ({how}): the layer's weight is computed from it, "
                        f"and scheme {self.name!r} quantizes plain layer weights only; {_REMOVE_PARAMETRIZATION}")
            hooked = hook_reparametrization(m)
            if hooked is not None and a in [x.strip() for x in hooked[0].split(",")]:
                # the deprecated hook-based weight_norm / spectral_norm: a Linear's own name would
                # read "layer type Linear not supported" (nu45), which it is, as a plain layer
                return (f"{a} of {f!r} ({hooked[1]}: its forward pre-hook recomputes the layer's weight from "
                        f"{hooked[0]} before every forward, so that weight is no parameter): scheme {self.name!r} "
                        f"quantizes plain layer weights only; {hooked[2]} keeps the computed weight as a plain "
                        "parameter, which the schemes quantize")
            if a.endswith("_orig") and isinstance(getattr(m, a[:-5] + "_mask", None), Tensor):
                # torch.nn.utils.prune: the layer's weight is a plain tensor, orig * mask, recomputed
                # before every forward; the parameter is its unpruned original
                return (f"pruned weight of {f!r} (torch.nn.utils.prune: {a[:-5]} = {a} * {a[:-5]}_mask, "
                        f"not a parameter): make the pruning permanent first (torch.nn.utils.prune.remove"
                        f"(module, {a[:-5]!r}), or Lightning's ModelPruning(make_pruning_permanent=True)); "
                        f"scheme {self.name!r} quantizes plain layer weights only")
            also = ", convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d), embeddings (nn.Embedding, nn.EmbeddingBag) and attention projections" if self.flat_spec() is not None else ""
            return (f"{type(m).__name__}.{a}: layer type {type(m).__name__} not supported (scheme "
                    f"{self.name!r} quantizes the weights of {self.layers}{also} only)")
        if self.filter_fn is not None and not any(self.filter_fn(m, f) for f, _, m in supported):
            return f"excluded by the filter_fn of scheme {self.name!r}"
        return "left in float by the scheme"

    @abstractmethod
    def _quantize_copy(self, model: nn.Module) -> tuple[dict[str, ParamGrid], list[str]]:
        """Quantize ``model`` (already a private copy) in place; return grids and notes.

        May also return a third item, ``{parameter name: reason}``, for parameters the scheme
        would normally quantize but skipped (e.g. a layer whose width is not a multiple of the
        group size); every other parameter without a grid gets its reason from
        :meth:`_float_reason`. Honour :meth:`_in_selection` (``apply(params=...)``).
        """

    def apply(self, model: nn.Module, params: Collection[str] | None = None) -> QuantizationResult:
        """Quantize a deep copy of ``model``; the argument is never modified.

        Args:
            model: the float model.
            params: parameter names (as in ``model.named_parameters()``) to quantize; the
                layers holding other parameters stay in float in the copy. ``None``: every
                parameter the scheme quantizes (what the assessment scores and ``.model`` ships:
                the whole model quantized, frozen layers too, whose utility is measured; the
                leakage is that of the assessed parameters; a torchao-named scheme may take more
                layers than ``torchao.quantization.quantize_`` with its config: ``beyond_linear``).

        Raises:
            KeyError: a name in ``params`` is not a parameter of ``model``.
            SchemeUnavailableError: the backend cannot run here.
            SchemeError: the backend failed (the message names the scheme and the cause).
        """
        self.check_available()
        # no release read (release_unread): a backend that only reads the weights gets the model itself
        read_only = self._reads_source()
        shared = SharedWeights(() if read_only or not SHARE_REPLACED_WEIGHTS else self._replaced_weights(model))
        if read_only:
            copy_ = model  # (neither eval() nor any write: grids_from_source)
        else:
            copy_ = private_copy(model, f"copying the model for scheme {self.name!r}", shared=shared)
            copy_.eval()
        if params is not None:
            cparams = dict(copy_.named_parameters())
            unknown = [n for n in params if n not in cparams]
            if unknown:
                raise KeyError(f"params not in the model: {unknown}")
            # object.__setattr__: the built-in schemes are frozen dataclasses; the selection
            # is per call state, not a field
            object.__setattr__(self, "_only", {id(cparams[n]) for n in params})
            del cparams  # (no reference to the copy's parameters past the backend: shared.release)
        # (per call state, as _only: the backend is given the model itself, _given_source)
        object.__setattr__(self, "_source_given", read_only)
        try:
            out = self._quantize_copy(copy_)
        except SchemeError:
            raise
        except Exception as exc:  # backend errors: name the scheme and keep the cause
            raise SchemeError(f"scheme {self.name!r} failed in its backend: {type(exc).__name__}: {exc}") from exc
        finally:
            object.__setattr__(self, "_only", None)
            object.__setattr__(self, "_source_given", False)
            shared.release()  # whatever the backend left of the shared weights gets its own values
        grids, notes = out[0], out[1]
        reasons: dict[str, str] = out[2] if len(out) > 2 else {}
        params_ = dict(model.named_parameters())
        if self.rounding != "nearest":
            for g in grids.values():
                if g.rounding == "nearest":
                    g.rounding = self.rounding
        for n, g in grids.items():
            # a bf16 / fp16 model holds rnd(theta-hat): the scheme quantized the stored weight
            # (method.md section 5); Monte Carlo grids re-run the scheme on stored weights anyway
            dt = params_[n].dtype if n in params_ else None
            if dt in STORAGE_DTYPES and g.rounding == "nearest" and g.storage_dtype is None:
                g.storage_dtype = dt
        if self.scale_rule != "none":
            for n, g in grids.items():
                # a backend that set `revealed` itself (e.g. prescaled grids) knows better
                if n in params_ and g.revealed is None and tuple(params_[n].shape) == tuple(g.shape):
                    g.reveal(params_[n], self.scale_rule)
        uses = parameter_uses(model)
        unquantized = {n: reasons.get(n) or self._float_reason(n, p, uses.get(id(p), []),
                                                               params is None or n in params)
                       for n, p in params_.items() if n not in grids}
        return QuantizationResult(model=None if read_only else copy_, grids=grids, unquantized=unquantized,
                                  scheme=self.name, notes=notes)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k not in ("name", "backend"))
        return f"{type(self).__name__}({args})"


#: class-level attributes :meth:`SchemeConfig.describe` lists besides the fields
_DESCRIBED = ("bits", "granularity", "group_size", "mapping", "dtype")


def _plain(v: Any) -> Any:
    """A field value as a plain type for reports and configs (dtypes and enums as strings)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return str(v)


@dataclass(frozen=True)
class SchemeConfig(CheckedFields, QuantizationScheme):
    """Base of schemes written as frozen dataclasses, as torchao writes its ``*Config``s.

    A scheme is its fields: two schemes with equal fields are equal (and hash alike), its
    registry ``name`` is :attr:`base_name` plus the suffixes :meth:`name_parts` derives from
    the fields (so a name can never disagree with what the scheme does), and
    :meth:`describe` lists the fields. Validate (and normalise, with
    ``object.__setattr__``) in ``__post_init__``; ``dataclasses.replace(scheme, **changes)``
    builds a variant, which is what ``get_scheme(name, **kwargs)`` does.

    Subclasses set :attr:`base_name` (and :attr:`config_class` when they wrap a torchao
    config) and override :meth:`name_parts`. ``filter_fn`` is a keyword-only field that
    takes part in neither equality nor the name.
    """

    filter_fn: FilterFn | None = field(default=None, kw_only=True, compare=False, repr=False)

    #: the name's stem: torchao's config name in snake case, without ``Config``
    base_name: ClassVar[str] = "scheme"
    #: the torchao config class wrapped (a name in ``torchao.quantization``), or ""
    config_class: ClassVar[str] = ""

    def name_parts(self) -> list[str]:
        """Suffixes of the name, from the fields (none: the name is :attr:`base_name`).

        The convention: only what differs from torchao's defaults for the config, in the
        order dtype, granularity (``per_row``, ``per_tensor``, ``g<group size>``), mapping
        (``asym``), layout.
        """
        return []

    @property  # type: ignore[override]
    def name(self) -> str:
        """The registry name, derived from the fields (see :meth:`name_parts`)."""
        return "_".join([self.base_name, *self.name_parts()])

    def describe(self) -> dict:
        """``name``, ``backend``, ``config`` (when wrapping torchao), ``layers`` and every
        field except ``filter_fn``, as plain types."""
        out: dict[str, Any] = {"name": self.name, "backend": self.backend}
        if self.config_class:
            out["config"] = self.config_class
        out["layers"] = self.layers
        out.update({f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.repr})
        for k in _DESCRIBED:  # class-level facts of the scheme (e.g. int8's bits and mapping)
            if k not in out and hasattr(self, k):
                out[k] = _plain(getattr(self, k))
        if self.rounding != "nearest":
            out["rounding"] = self.rounding
        return out


@dataclass(frozen=True)
class NoQuantization(SchemeConfig):
    """The full-precision release (``none``): every parameter leaks as the baseline."""

    base_name: ClassVar[str] = "none"
    backend: ClassVar[str] = "builtin"

    def _quantize_copy(self, model: nn.Module) -> tuple[dict[str, ParamGrid], list[str]]:
        return {}, []

    def apply(self, model: nn.Module, params: Collection[str] | None = None) -> QuantizationResult:
        res = super().apply(model, params)
        res.unquantized = {n: "full precision release" for n in res.unquantized}
        return res
