"""Stored-cell sums over the distinct edges of each window (issue 13, bf41).

A weight stored in bf16 and quantized by a finer grid (the ``fp16`` scheme: 8 fp16 codes per bf16
storage cell near most values), or clipped at its bounds, has windows of stored-cell edges
(:meth:`~mis_lightning.quantization.ParamGrid._storage_moments`) made of runs of equal edges: the
grid's codes that no stored value rounds into are empty cells of width 0. A weight whose sd spans
fp16's whole range sums 131,074 edges of which 8,706 are distinct. An empty cell adds exactly
``+0`` to every sum (:func:`~mis_lightning.functional.cells.erfc_cell_terms`), so the terms
(``erfc``, ``exp`` and ~25 other element-wise operations per edge) are computed once per distinct
edge, and only the row sums run over the full window: each non-empty cell's term is copied to its
place among ``+0`` at the empty ones, and summed in the same order as
:func:`~mis_lightning.functional.cells.moments_from_alpha_erfc` sums them. The result is bitwise
that function's wherever ``erfc`` and ``exp`` give an edge the same value in both layouts (torch's
CPU kernels take the last < 16 elements of a tensor through the scalar C library instead of
the vectorised SLEEF code: where the two round differently, one cell's term differs by an ulp,
kappa by < 1e-16 relative).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cells import SQRT_2_OVER_PI, CellMoments, erfc_cell_terms, moments_from_alpha_erfc

#: evaluate each window's distinct edges once (False: every edge, the pre-bf41 path; A/B)
DISTINCT_EDGES = True
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
    # the distinct edges, the rows one after another: cell k of this one long row (edges at
    # places k, k + 1) is the full cell ending at edge at[k + 1] (row at // E, column at % E - 1),
    # or, where that edge starts a row, a cell across two rows (not read)
    at = torch.nonzero(keep.view(-1)).squeeze(-1)
    prob, diff, ratio, sq = erfc_cell_terms(alpha.reshape(-1).index_select(0, at).unsqueeze(0))
    end = at[1:]
    inside = torch.nonzero(end % E != 0).squeeze(-1)
    place = (end - end // E - 1).index_select(0, inside)  # the cell's place in the flat [c, K] cells

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
