"""Stored-cell sums over the distinct edges of each window (issue 13).

A weight stored in bf16 and quantized by a finer grid (the ``fp16`` scheme: 8 fp16 codes per bf16
storage cell near most values), or clipped at its bounds, has windows of stored-cell edges
(:meth:`~mis_lightning.quantization.ParamGrid._storage_moments`) made of runs of equal edges: the
grid's codes that no stored value rounds into are empty cells of width 0. A weight whose sd spans
fp16's whole range sums 131,074 edges of which 8,706 are distinct. An empty cell adds exactly
``+0`` to every sum (:func:`~mis_lightning.functional.cells.erfc_cell_terms`), so the terms
(``erfc``, ``exp`` and ~25 other element-wise operations per edge) are computed once per distinct
edge, and only the row sums run over the full window: each non-empty cell's term is copied to its
place among ``+0`` at the empty ones, and summed in the same order as
:func:`~mis_lightning.functional.cells.moments_from_alpha_erfc` sums them. The result is that
function's bit for bit: every term is the same IEEE operations on the same two edges (torch's CPU
``exp`` and ``erfc`` run one vectorised code for every element of a tensor, its tail included:
an edge's value does not depend on its place; checked on 20,000 values, where the C library's
``erfc`` differs from torch's in 19% of them), the empty cells are ``+0`` in both, and the sums
run over the same ``[c, K]`` layout. :func:`table_window_moments` goes one step further for the
windows gathered from a table of stored edges: it finds a window's distinct edges from the
table's runs (a binary search per window) and never builds the window.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cells import SQRT_2_OVER_PI, CellMoments, erfc_cell_terms, moments_from_alpha_erfc

#: evaluate each window's distinct edges once (False: every edge, the pre-bf41 path; A/B)
DISTINCT_EDGES = True
#: the table windows of the stored cells (:func:`table_window_moments`) from the table's distinct
#: edges without building the windows (False: windows built, then deduplicated; A/B)
DISTINCT_TABLE_WINDOWS = True
#: window edges per :func:`table_window_moments` call (its row sums hold one float per edge):
#: the widest windows (92k-131k edges, ~2 ms of fixed costs a call) then share a call 8-11 at a time
DISTINCT_ROWS_BUDGET = 1 << 20
#: windows of fewer edges than this take the plain path (the dedup's ~6 passes over the window
#: outweigh the saving on the few-edge windows of the common case)
DISTINCT_MIN_EDGES = 64
#: the dedup is used where at most this share of a call's edges is distinct (each distinct edge
#: costs ~30 element-wise operations, the dedup ~3 passes over the full window plus ~2 per
#: row sum, and a plain edge ~30)
DISTINCT_MAX_SHARE = 0.5


def distinct_edge_moments(alpha: Tensor, kappa_only: bool = False) -> CellMoments:
    """:func:`~mis_lightning.functional.cells.moments_from_alpha_erfc` of ``alpha`` with each run of
    equal edges in a row evaluated once (see the module docstring).

    Args:
        alpha: ``[c, K+1]`` float64 standardised edges, non-decreasing along each row
            (``(edge - theta) / sigma``; ``+-inf`` allowed; equal edges: empty cells).
        kappa_only: ``mean_abs`` and ``m4`` NaN (as the plain function).

    Returns:
        :class:`~mis_lightning.functional.cells.CellMoments` ``[c]`` float64, bitwise the plain
        function's up to the ulp noted in the module docstring. Calls with windows of fewer than
        :data:`DISTINCT_MIN_EDGES` edges, or more than :data:`DISTINCT_MAX_SHARE` of them
        distinct, or with :data:`DISTINCT_EDGES` off, are the plain function's call.
    """
    c, E = alpha.shape
    if not DISTINCT_EDGES or E < DISTINCT_MIN_EDGES or c == 0:
        return moments_from_alpha_erfc(alpha, kappa_only)
    # keep[:, j]: edge j starts a run of equal edges (the first of a row always does)
    keep = torch.empty_like(alpha, dtype=torch.bool)
    keep[:, 0] = True
    torch.ne(alpha[:, 1:], alpha[:, :-1], out=keep[:, 1:])
    if int(keep.sum()) > DISTINCT_MAX_SHARE * alpha.numel():
        return moments_from_alpha_erfc(alpha, kappa_only)
    at = torch.nonzero(keep.view(-1)).squeeze(-1)
    rows = torch.div(at, E, rounding_mode="floor")
    return _placed_sums(alpha.reshape(-1).index_select(0, at), rows, at - rows * E, c, E, kappa_only)


def _placed_sums(alpha: Tensor, rows: Tensor, places: Tensor, c: int, E: int, kappa_only: bool) -> CellMoments:
    """The sums of :func:`~mis_lightning.functional.cells.moments_from_alpha_erfc` over ``[c, E]``
    windows from their distinct edges alone: ``alpha [n]`` (float64) the first edge of each run of
    equal edges of each window, the windows one after another, ``rows [n]`` its window and
    ``places [n]`` its place (0 .. E - 1; each window's first edge at place 0). Cell ``k`` of
    these edges as one long row (edges ``k``, ``k + 1``) is the window's cell ending at place
    ``places[k + 1]``; where ``k + 1`` starts the next window, a cell across two (not read)."""
    prob, diff, ratio, sq = erfc_cell_terms(alpha.unsqueeze(0))
    inside = torch.nonzero(rows[1:] == rows[:-1]).squeeze(-1)
    place = (rows[1:] * (E - 1) + places[1:] - 1).index_select(0, inside)  # in the flat [c, E - 1] cells

    def full_sum(t: Tensor) -> Tensor:
        # the terms at their places, +0 at the empty cells, summed as the plain function sums
        cells = torch.zeros(c * (E - 1), dtype=t.dtype, device=t.device)
        return cells.index_copy_(0, place, t[0].index_select(0, inside)).view(c, E - 1).sum(-1)

    kappa = full_sum(sq).clamp(0.0, 1.0)
    coverage = full_sum(prob)
    if kappa_only:
        nan = torch.full_like(kappa, math.nan)
        return CellMoments(kappa=kappa, mean_abs=nan, m4=nan, coverage=coverage)
    mean_abs = full_sum(diff.abs()).clamp(0.0, SQRT_2_OVER_PI)
    m4 = full_sum(sq * ratio * ratio)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)


def run_starts(flat: Tensor) -> Tensor:
    """``[s]`` int64: the places ``k >= 1`` of a flat table of edges (rows one after another) where
    ``flat[k] != flat[k - 1]``, ascending (:func:`table_window_moments`)."""
    return torch.nonzero(flat[1:] != flat[:-1]).squeeze(-1) + 1


def table_window_moments(flat: Tensor, starts: Tensor, row: Tensor, rel: Tensor, last: int, m: int,
                         theta: Tensor, sigma: Tensor, kappa_only: bool) -> CellMoments | None:
    """The stored-cell sums of windows gathered from a table of edges, from the table's distinct
    edges alone: what :func:`distinct_edge_moments` gives for the standardised edges of
    :meth:`~mis_lightning.quantization.ParamGrid._storage_moments`'s table windows, bit for bit,
    without building them.

    Args:
        flat: the table of edges (float64, rows one after another, each row non-decreasing and
            ``-inf`` at column 0, ``+inf`` at column ``last``); ``starts``: its :func:`run_starts`.
        row, rel: ``[r]`` int64 each element's row start in ``flat`` and the column of its own
            cell's lower edge; its window is columns ``rel - m .. rel + m + 1`` clamped to
            ``0 .. last``, the first edge read as ``-inf`` and the last as ``+inf``.
        last, m: the last column of a row; the window's half-width (``2m + 2`` edges).
        theta, sigma: ``[r]`` float64 weights and standard deviations (``sigma > 0``).
        kappa_only: as :func:`distinct_edge_moments`.

    Returns:
        :class:`~mis_lightning.functional.cells.CellMoments` ``[r]``, or ``None`` where the
        windows are short or mostly distinct (:data:`DISTINCT_MIN_EDGES`,
        :data:`DISTINCT_MAX_SHARE`; the caller builds the windows) or :data:`DISTINCT_EDGES` or
        :data:`DISTINCT_TABLE_WINDOWS` is off.
    """
    E = 2 * m + 2
    r = row.numel()
    if not (DISTINCT_EDGES and DISTINCT_TABLE_WINDOWS) or E < DISTINCT_MIN_EDGES or r == 0:
        return None
    # place p of a window holds column j_p = clamp(rel - m + p, 0, last). Runs start at place 0
    # (-inf), at 1 where its edge is not -inf, at 2m + 1 (+inf) where place 2m's edge is not +inf,
    # and between at the places whose column is unclamped (1 .. last) and starts a run of the table
    lo = row + (rel - m + 2).clamp_min(1)
    hi = row + (rel + m).clamp_max(last)
    a = torch.searchsorted(starts, lo)
    n = (torch.searchsorted(starts, hi, right=True) - a).clamp_min(0)
    total = int(n.sum())
    if total + 3 * r > DISTINCT_MAX_SHARE * r * E:
        return None
    el = torch.arange(r, device=flat.device)
    first = flat.take(row + (rel - m + 1).clamp(0, last))
    end = flat.take(row + (rel + m).clamp(0, last))
    in_el = torch.repeat_interleave(el, n)
    k = starts.index_select(0, a.index_select(0, in_el) + torch.arange(total, device=flat.device)
                            - (torch.cumsum(n, 0) - n).index_select(0, in_el))
    p_inner = k - row.index_select(0, in_el) - (rel - m).index_select(0, in_el)
    one = first != -math.inf
    top = end != math.inf
    rows = torch.cat([el, el[one], in_el, el[top]])
    places = torch.cat([torch.zeros_like(el), torch.ones_like(el)[one], p_inner,
                        torch.full_like(el, E - 1)[top]])
    # the windows one after another, places ascending within each (the inner places lie in 2 .. 2m)
    order = torch.argsort(rows * E + places)
    rows, places = rows.index_select(0, order), places.index_select(0, order)
    v = flat.take(row.index_select(0, rows) + (rel.index_select(0, rows) - m + places).clamp(0, last))
    v = torch.where(places == 0, -math.inf, torch.where(places == E - 1, math.inf, v))
    # standardised as windowed_moments standardises a window's edges (the same operations)
    alpha = (v - theta.index_select(0, rows)) / sigma.index_select(0, rows)
    return _placed_sums(alpha, rows, places, r, E, kappa_only)
