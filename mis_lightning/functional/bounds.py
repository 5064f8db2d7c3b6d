"""Cell moments when the release also bounds the weight (method.md section 5, "Grids bounded
by the release").

A weight-derived scale gives values away: a symmetric absmax scale ``s = max|w| / c`` releases
the block's largest magnitude ``m``, so every weight of the block is known to lie in
``[-m, m]``; an asymmetric min/max scale releases ``[min(w_min, 0), max(w_max, 0)]``. Given
the release, the two outer cells of the grid are cut at these bounds and what lies beyond
them is a separate event (the release would differ): the partition the indicator reads is the
grid's cells clipped to ``[lower, upper]`` plus ``(-inf, lower)`` and ``(upper, inf)``.
Left unbounded, an absmax grid reads the outer codes' cells as ``[(qmax - 1/2) s, inf)``
instead of ``[(qmax - 1/2) s, qmax s]``: a low leakage for coarse grids with few weights
(``rtn_int2``, d = 5: 9% below the exact truth, docs/validation.md).

The functions here correct the unbounded moments of the grid paths, only for the elements
whose bounds lie within ``CUTOFF_SIGMAS`` of the weight (the others are unchanged: the
bound's cells carry < 1e-15 of their mass):

* end-cell bounds (``upper`` in the top cell, ``lower`` in the bottom cell, the common case):
  the exact change of splitting that cell at the bound is added;
* steps above ``FINE_STEP`` sd with a bound inside an inner cell: exact cell sums over the
  window's edges clipped to the bounds;
* fine steps with a bound inside an inner cell: the fine-grid expansion with its end cells at
  the bound (the cut cell is read as part of the fine interior: error of the order of the
  expansion's own, ``5e-4 h^2``).

All tensors are per element (``[c]``, float64, parameter units).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .cells import SQRT_2_OVER_PI, CellMoments, moments_from_alpha
from .kernel import _MAX_WINDOW, CUTOFF_SIGMAS, FINE_STEP, fine_grid_moments, windowed_moments

_WINDOWS = (2, 3, 4, 6, 10, 18, 64, 256, _MAX_WINDOW)
_ROWS_BUDGET = 1 << 18


def bounds_in_reach(theta: Tensor, sigma: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``[c]`` bool: the elements with a bound within ``CUTOFF_SIGMAS`` sd (or beyond it:
    a weight outside its bounds, e.g. a bootstrap draw)."""
    reach = CUTOFF_SIGMAS * sigma
    return ((upper - theta) <= reach) | ((theta - lower) <= reach)


def clip_boundaries(edges: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Cell edges ``[c, K+1]`` with the inner ones clipped to ``[lower, upper]`` (each ``[c]``).

    The first and last edges (``-inf``/``+inf`` in every window of the grid paths) stay: the
    cells beyond the bounds become empty and the mass beyond them one outer cell each. Exact
    for any window that covers ``CUTOFF_SIGMAS`` sd (a bound farther than the window's last
    finite edge is out of reach)."""
    inner = torch.maximum(torch.minimum(edges[:, 1:-1], upper.unsqueeze(-1)), lower.unsqueeze(-1))
    return torch.cat([edges[:, :1], inner, edges[:, -1:]], dim=-1)


def _split_delta(theta: Tensor, sigma: Tensor, edge: Tensor, bound: Tensor, top: bool) -> tuple[Tensor, ...]:
    """The change of ``(kappa, mean_abs, m4)`` when the outer cell ``[edge, inf)`` (``top``) or
    ``(-inf, edge]`` is split at ``bound`` (beyond ``edge``): exact cell terms."""
    sg = sigma.clamp_min(torch.finfo(torch.float64).tiny)
    e = ((edge - theta) / sg).unsqueeze(-1)
    b = ((bound - theta) / sg).unsqueeze(-1)
    inf = torch.full_like(e, math.inf)
    if top:
        split, whole = torch.cat([e, b, inf], -1), torch.cat([e, inf], -1)
    else:
        split, whole = torch.cat([-inf, b, e], -1), torch.cat([-inf, e], -1)
    ms, mw = moments_from_alpha(split), moments_from_alpha(whole)
    return ms.kappa - mw.kappa, ms.mean_abs - mw.mean_abs, ms.m4 - mw.m4


def _add(mm: CellMoments, idx: Tensor, delta: tuple[Tensor, ...]) -> None:
    dk, dl, d4 = delta
    mm.kappa[idx] = (mm.kappa[idx] + dk).clamp(0.0, 1.0)
    mm.mean_abs[idx] = (mm.mean_abs[idx] + dl).clamp(0.0, SQRT_2_OVER_PI)
    mm.m4[idx] = mm.m4[idx] + d4


def bounded_moments(
    mm: CellMoments,
    theta: Tensor,
    sigma: Tensor,
    lower: Tensor,
    upper: Tensor,
    low_edge: Tensor,
    high_edge: Tensor,
    step: Tensor | None,
    edges: Callable[[Tensor, int], Tensor],
) -> CellMoments:
    """The grid's cell moments ``mm`` (unbounded outer cells) corrected for bounds the release
    puts on each weight (see the module doc and method.md section 5).

    Args:
        mm: ``[c]`` unbounded moments from a grid path (not modified).
        theta, sigma: ``[c]`` weights and standard deviations (parameter units).
        lower, upper: ``[c]`` bounds given by the release (``-inf``/``inf``: none).
        low_edge, high_edge: ``[c]`` the upper edge of the grid's lowest cell and the lower
            edge of its highest (parameter units).
        step: ``[c]`` a uniform grid's step (parameter units), or ``None`` (a value table:
            no fine-grid form; inner bounds take exact window sums).
        edges: ``edges(ii, m) -> [len(ii), 2m + 2]`` unbounded cell edges around elements
            ``ii`` (the grid's ``boundaries``); clipped here.

    Returns:
        float64 :class:`CellMoments` ``[c]`` (a new object; ``coverage`` as the sums give it).
    """
    th, sg = theta.to(torch.float64), sigma.to(torch.float64)
    lo, hi = lower.to(torch.float64), upper.to(torch.float64)
    reach = bounds_in_reach(th, sg, lo, hi)
    if not bool(reach.any()):
        return mm
    out = CellMoments(kappa=mm.kappa.clone(), mean_abs=mm.mean_abs.clone(), m4=mm.m4.clone(),
                      coverage=mm.coverage.clone())
    idx = torch.nonzero(reach).squeeze(-1)
    t, s, lb, ub = th[idx], sg[idx], lo[idx], hi[idx]
    le, he = low_edge.to(torch.float64)[idx], high_edge.to(torch.float64)[idx]
    # a bound inside an inner cell (beyond it, whole cells are "another release")
    inner = (ub < he) | (lb > le)
    cut = CUTOFF_SIGMAS * s
    split = ~inner  # bounds in (or beyond) the grid's own end cells: those cells are cut
    # fine steps: the expansion between the grid edges nearest inside the bounds, then the
    # cut cells exactly (a partial cell next to a bound is a cell of its own)
    a, b = le, he
    if step is not None:
        st = step.to(torch.float64)[idx]
        fine = (st <= FINE_STEP * s) & (st > 0)
        top_k = torch.floor((he - le) / st.where(fine, torch.ones_like(st)) + 0.5)
        ka = torch.ceil((lb - le) / st).clamp(0.0, None)
        kb = torch.floor((ub - le) / st)
        a = torch.where(fine, le + torch.minimum(ka, top_k) * st, le)
        b = torch.where(fine, le + torch.minimum(kb, top_k) * st, he)
        sel = fine & inner & (a <= b)
        if bool(sel.any()):
            sub = idx[sel]
            ts, ss, cs = t[sel], s[sel], cut[sel]
            a_std = torch.where(ts - a[sel] > cs, torch.full_like(ts, -math.inf), (a[sel] - ts) / ss)
            b_std = torch.where(b[sel] - ts > cs, torch.full_like(ts, math.inf), (b[sel] - ts) / ss)
            fm = fine_grid_moments(st[sel] / ss, a_std, b_std)
            out.kappa[sub], out.mean_abs[sub], out.m4[sub] = fm.kappa, fm.mean_abs, fm.m4
            out.coverage[sub] = 1.0
            split = split | sel
    # other inner bounds (coarser steps, value tables): exact sums over clipped windows
    sel = ~split
    if bool(sel.any()):
        sub = idx[sel]
        if step is None:
            need = torch.full((sub.numel(),), float(_WINDOWS[-2]), dtype=torch.float64)
        else:
            need = (torch.ceil(CUTOFF_SIGMAS * sg[sub] / step.to(torch.float64)[sub]) + 1).clamp(max=_MAX_WINDOW)
        windowed_moments(
            (out.kappa, out.mean_abs, out.m4, out.coverage), sub, need, _WINDOWS, _ROWS_BUDGET,
            lambda ii, m: clip_boundaries(edges(ii, m), lo[ii], hi[ii]), th, sg.clamp_min(1e-300))
    # the outer cell [b, inf) cut at the bound beyond it (and (-inf, a] likewise)
    top = split & (ub > b) & (ub - t <= cut)
    if bool(top.any()):
        _add(out, idx[top], _split_delta(t[top], s[top], b[top], ub[top], True))
    bot = split & (lb < a) & (t - lb <= cut)
    if bool(bot.any()):
        _add(out, idx[bot], _split_delta(t[bot], s[bot], a[bot], lb[bot], False))
    return out


__all__ = ["bounded_moments", "bounds_in_reach", "clip_boundaries"]
