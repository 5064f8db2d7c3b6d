"""Cell moments when the release also bounds the weight (method.md section 5, "Grids bounded
by the release").

A weight-derived scale gives values away: a symmetric absmax scale ``s = max|w| / c`` releases
the block's largest magnitude ``m``, so every weight of the block is known to lie in
``[-m, m]``; an asymmetric min/max scale releases ``[min(w_min, 0), max(w_max, 0)]``. Given
the release, the two outer cells of the grid are cut at these bounds. What lies beyond them is
another release, in which this weight is the block's new extreme and its scale gives the
weight away exactly: the moments read the region beyond a bound as revealed (``m(U) = U``
there, as for an unquantized weight), not as one lumped cell. (Read as a lumped cell, weights
of similar magnitude, a few tenths of a sd below the row's maximum, lost up to 10% of their
information on an int8 grid that loses none: an OLS row of 5 correlated weights read 4-14%
below a likelihood-ratio attack on the real release, fu/ra17.) The partition the moments read
is the grid's cells clipped to ``[lower, upper]`` plus the revealed regions ``(-inf, lower)``
and ``(upper, inf)``; the cell edges (:func:`clip_boundaries`, the Monte Carlo forms) keep
one outer cell there.
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
  expansion's own, ``5e-4 h^2``); ``mean_abs`` exact (``2 phi`` of the distance to the nearest
  grid edge, then the cut cells' exact change; ``kernel.EXACT_AFFINE_MEAN_ABS``).

All tensors are per element (``[c]``, float64, parameter units).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._user_warnings import warn
from . import kernel as _kernel
from .cells import _INV_SQRT_2PI, SQRT_2_OVER_PI, CellMoments, _pdf
from .fastpath import GUARD, SAME_ARITHMETIC, compare, sample_indices
from .kernel import (
    _FUSED_STATE,
    _MAX_WINDOW,
    COMPILED_PATH,
    CUTOFF_SIGMAS,
    EAGER_BLOCK,
    FINE_STEP,
    CompilePolicy,
    fine_grid_moments,
    windowed_moments,
)

_WINDOWS = (2, 3, 4, 6, 10, 18, 64, 256, _MAX_WINDOW)
# Elements per block of the eager correction (:func:`bounded_moments`; measured with the
# fused kernel's, kernel.EAGER_BLOCK: its temporaries stay in the cache)
BLOCK = EAGER_BLOCK
_ROWS_BUDGET = 1 << 18
# Relative distance (of the grid's span) within which a bound counts as on an end edge.
_SNAP = 1e-6
# An outer cell whose bound lies on its edge (every element: torchao's symmetric scales put
# -absmax on the bottom cell's edge, _bounded_block snaps it there) is revealed whole without the
# empty cut cell's terms (_edge_delta: one ndtr, one exp and ~15 element-wise operations fewer per
# element; bitwise the same). False: the general split, as before (A/B benchmarks)
SPLIT_ON_EDGE = True


def bounds_in_reach(theta: Tensor, sigma: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``[c]`` bool: the elements with a bound within ``CUTOFF_SIGMAS`` sd (or beyond it:
    a weight outside its bounds, e.g. a bootstrap draw)."""
    reach = CUTOFF_SIGMAS * sigma
    return ((upper - theta) <= reach) | ((theta - lower) <= reach)


def clip_boundaries(edges: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Cell edges ``[c, K+1]`` (sorted rows, ``-inf``/``+inf`` at the ends) cut at
    ``[lower, upper]`` (each ``[c]``): the first inner edge at or above ``upper`` becomes
    ``upper`` and the ones after it ``+inf`` (and likewise below ``lower``), so the mass
    beyond a bound is one outer cell and a window that reaches a bound looks like one that
    reaches a clamped end of the code range (``leakage.window_too_narrow`` sees no lumped
    codes there). A bound beyond the window's last finite edge leaves the window as it is
    (out of reach for any window that covers ``CUTOFF_SIGMAS`` sd)."""
    inner = edges[:, 1:-1]
    up = upper.unsqueeze(-1)
    above = inner >= up
    first = above & (torch.cumsum(above.to(torch.int32), -1) == 1)
    inner = torch.where(first, up.expand_as(inner), torch.where(above, torch.full_like(inner, math.inf), inner))
    lo = lower.unsqueeze(-1)
    below = inner <= lo
    last = below & (torch.cumsum(below.flip(-1).to(torch.int32), -1).flip(-1) == 1)
    inner = torch.where(last, lo.expand_as(inner), torch.where(below, torch.full_like(inner, -math.inf), inner))
    return torch.cat([edges[:, :1], inner, edges[:, -1:]], dim=-1)


# 2 phi(0), as 2.0 * _pdf(0) gives it (exp(-0.0) is exactly 1)
_TWO_PHI0 = 2.0 * _INV_SQRT_2PI


# |b| at and beyond which _revealed_tail's phi(b) terms are 0: b^2 stays finite below it, and
# phi(b) is exactly 0 in float64 from |b| ~38.6 on (so the terms read 0 either way)
_FAR_B = 1e150


def _revealed_tail(b: Tensor, tail_b: Tensor, pb: Tensor, b_pos: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(E[U^2], E|U|, E[U^4])`` restricted to ``U > b`` (standardised; ``tail_b = P(U > b)``,
    ``pb = phi(b)``; ``b_pos``: ``b >= 0`` if the caller has it): the moments of a region where
    the release gives the weight away (``m(U) = U``): ``tail + b phi(b)``, ``phi(b)``
    (``2 phi(0) - phi(b)`` for ``b < 0``) and ``3 tail + (b^3 + 3 b) phi(b)``. (Written with
    scalar zeros, ``|b| < inf`` for ``isfinite`` and the constant ``2 phi(0)``: the same numbers
    bit for bit, in fewer element-wise operations.) ``|b|`` from ``_FAR_B`` on counts as
    infinite: ``phi(b)`` is 0 there and ``b^2`` would overflow, ``inf * 0`` a NaN ``m4`` (an
    sd-0 weight beyond its bound, ``b`` ~1e305 from the floored sd); below it the same
    operations as before."""
    fin = b.abs() < _FAR_B  # isfinite's answer (NaN: False) in 2 operations instead of 4
    bphi = torch.where(fin, b * pb, 0.0)
    b3phi = torch.where(fin, (b * b + 3.0) * bphi, 0.0)
    absm = torch.where(b >= 0 if b_pos is None else b_pos, pb, _TWO_PHI0 - pb)
    return tail_b + bphi, absm, 3.0 * tail_b + b3phi


def _cell_term(diff: Tensor, prob: Tensor, lo: Tensor, hi: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One cell's ``(kappa, mean_abs, m4)`` terms from ``diff = phi(lo) - phi(hi)`` and its
    probability: ``p mu^2``, ``p |mu|``, ``p mu^4`` with ``mu = diff / p`` kept inside
    ``[lo, hi]`` (an empty cell: 0; ``hi`` ``None``: ``+inf``, whose minimum is the ratio
    itself, NaN included)."""
    tiny = 1e-300
    live = prob > tiny
    r = diff / prob.clamp_min(tiny)
    if hi is not None:
        r = torch.minimum(r, hi)
    r = torch.where(live, torch.maximum(r, lo), 0.0)
    sq = diff * r
    return sq, diff.abs(), sq * r * r


def _split_delta(e: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The change of ``(kappa, mean_abs, m4)`` when the outer cell ``[e, inf)`` is split at
    ``b >= e`` into the cell ``[e, b)`` and the region beyond the bound, which the release
    gives away (:func:`_revealed_tail`; standardised; the bottom cell ``(-inf, e]`` by
    symmetry: negate both). The same terms as
    :func:`~mis_lightning.functional.cells.cell_terms` (tail probabilities without
    cancellation, conditional means kept inside their cells, empty cells dropped), written
    elementwise: two ``ndtr`` and two ``exp`` per element."""
    qe, qb = torch.special.ndtr(-e.abs()), torch.special.ndtr(-b.abs())  # the smaller tails
    e_pos, b_pos = e >= 0, b >= 0
    tail_e = torch.where(e_pos, qe, 1.0 - qe)  # P(U > e)
    tail_b = torch.where(b_pos, qb, 1.0 - qb)
    mid = torch.where(e_pos, qe - qb, torch.where(b <= 0, qb - qe, 1.0 - qe - qb)).clamp_min(0.0)
    pe, pb = _pdf(e), _pdf(b)
    kw, lw, mw = _cell_term(pe, tail_e, e, None)  # the cell [e, inf)
    ku, lu, mu = _revealed_tail(b, tail_b, pb, b_pos)
    km, lm, m4m = _cell_term(pe - pb, mid, e, b)
    return km + ku - kw, lm + lu - lw, m4m + mu - mw


def _cell_kappa(diff: Tensor, prob: Tensor, lo: Tensor, hi: Tensor | None) -> Tensor:
    """The ``kappa`` term of :func:`_cell_term` alone (the same operations)."""
    tiny = 1e-300
    live = prob > tiny
    r = diff / prob.clamp_min(tiny)
    if hi is not None:  # None: +inf (minimum(r, inf) is r, NaN included)
        r = torch.minimum(r, hi)
    r = torch.where(live, torch.maximum(r, lo), 0.0)
    return diff * r


def _split_delta_kappa(e: Tensor, b: Tensor) -> Tensor:
    """The ``kappa`` change of :func:`_split_delta` alone, by the same operations (bitwise
    equal; the bootstrap draws read nothing else)."""
    qe, qb = torch.special.ndtr(-e.abs()), torch.special.ndtr(-b.abs())
    e_pos = e >= 0
    tail_e = torch.where(e_pos, qe, 1.0 - qe)
    tail_b = torch.where(b >= 0, qb, 1.0 - qb)
    mid = torch.where(e_pos, qe - qb, torch.where(b <= 0, qb - qe, 1.0 - qe - qb)).clamp_min(0.0)
    pe, pb = _pdf(e), _pdf(b)
    kw = _cell_kappa(pe, tail_e, e, None)
    # _revealed_tail's first term (|b| < inf: isfinite's answer in 2 operations instead of 4)
    ku = tail_b + torch.where(b.abs() < math.inf, b * pb, 0.0)
    km = _cell_kappa(pe - pb, mid, e, b)
    return km + ku - kw


def _edge_delta(e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_split_delta` ``(e, e)``: the outer cell ``[e, inf)`` with its bound on its own
    edge (torchao's symmetric scales put ``-absmax`` on the bottom cell's edge), the whole cell
    revealed, bit for bit without the cut cell's terms. There the cut cell ``[e, b)`` is empty:
    its difference of densities and its probability are exact zeros, so its terms are ``+0.0``
    (:func:`_cell_term` of ``0 / 0``-free zeros) and adding them leaves the revealed tail's terms
    as they are (none of those is ``-0.0``: the tail probability is ``+0`` or more and ``+0``
    plus any number is not ``-0``). The same for every non-NaN ``e`` (``+-inf`` included); a NaN
    gives NaN either way (possibly another NaN payload)."""
    qe = torch.special.ndtr(-e.abs())
    e_pos = e >= 0
    tail_e = torch.where(e_pos, qe, 1.0 - qe)
    pe = _pdf(e)
    kw, lw, mw = _cell_term(pe, tail_e, e, None)
    ku, lu, mu = _revealed_tail(e, tail_e, pe, e_pos)
    return ku - kw, lu - lw, mu - mw


def _edge_delta_kappa(e: Tensor) -> Tensor:
    """The ``kappa`` change of :func:`_edge_delta` alone, by :func:`_split_delta_kappa`'s
    operations on ``(e, e)`` less the empty cut cell's ``+0.0`` (bitwise equal for non-NaN ``e``)."""
    qe = torch.special.ndtr(-e.abs())
    tail_e = torch.where(e >= 0, qe, 1.0 - qe)
    pe = _pdf(e)
    kw = _cell_kappa(pe, tail_e, e, None)
    ku = tail_e + torch.where(e.abs() < math.inf, e * pe, 0.0)
    return ku - kw


def _reveal_delta(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The change of ``(kappa, mean_abs, m4)`` when the lumped cell ``[b, inf)`` beyond a
    bound (standardised) is read as revealed instead (bottom: negate ``b``)."""
    qb = torch.special.ndtr(-b.abs())
    tail_b = torch.where(b >= 0, qb, 1.0 - qb)
    pb = _pdf(b)
    rk, rl, r4 = _revealed_tail(b, tail_b, pb)
    lk, ll, l4 = _cell_term(pb, tail_b, b, torch.full_like(b, math.inf))
    return rk - lk, rl - ll, r4 - l4


# Affine grids bounded by the release: the weights fine_kappa_elements selects take
# bounded_fine_moments, ~80 operators (~190 element passes a weight, the four edges' stacked) for
# what the fused kernel's fine form (kernel._near_ends) and the outer-cell split (_split_chunk /
# the inner-bound fine form of _bounded_block) compute in turn with ~410 (docs/benchmarks.md,
# "p58b": the 1e5 MLP's int4 grids' weights left by the wide-sd form). The same expansion and cut cells summed in
# another order: kappa and mean_abs within 1e-14 of the two-step form, m4 within 1e-11 (1.2e-12
# measured: the two-step form adds the unbounded end cell's p mu^4 and takes it away again).
# False: the kernel and the split (A/B)
FUSED_FINE_MOMENTS = True


def fine_kappa_elements(theta: Tensor, sigma: Tensor, step: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``[c]`` bool: the elements :func:`bounded_fine_moments` takes: bounds ``lower < upper``
    both within ``CUTOFF_SIGMAS`` sd of the weight (inside them or not: a bootstrap draw may lie
    beyond one), on a fine step (``0 < step <= FINE_STEP * sigma``, by the fused kernel's test
    ``step / sigma <= FINE_STEP`` and the inner-bound form's alike). Every edge the two-step form
    reads is then within reach (none counts as far) and its fine form applies on both sides.
    ``[c]`` float64 each, parameter units (sd 0, NaN: False)."""
    cut = CUTOFF_SIGMAS * sigma
    return ((lower < upper) & ((upper - theta).abs() <= cut) & ((theta - lower).abs() <= cut)
            & (step > 0) & (step / sigma <= FINE_STEP) & (step <= FINE_STEP * sigma))


def _edges_inside(lo: Tensor, hi: Tensor, le: Tensor, he: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` ``[c]``: the first and last edge ``le + k step`` (``k`` in ``[0, K]``, ``he`` the
    ``K``-th) inside the bounds ``[lo, hi]``; the end edges themselves where a bound is at or beyond
    them (``a > b``: none inside). An index the division rounds onto an edge the bound misses by
    float rounding gives the bound itself (a cut cell of no width): an ``a`` an ulp below ``lo``
    left the cell below out of the split that reveals it (kappa 0.11 against 0.9998 exact with
    ``lo`` an ulp above a grid edge), and the last index reads ``he`` itself, not ``le + K step``
    (an ulp above ``he``, ``a > b`` merged two cells: kappa 1.3e-3 low). ``[c]`` float64 each."""
    top_k = torch.floor((he - le) / step + 0.5)
    ka = torch.minimum(torch.ceil((lo - le) / step).clamp_min(0.0), top_k)
    kb = torch.minimum(torch.floor((hi - le) / step), top_k)
    a = torch.where(lo <= le, le, torch.where(ka >= top_k, he, le + ka * step).maximum(lo))
    b = torch.where(hi >= he, he, torch.where(kb >= top_k, he, le + kb * step).minimum(hi))
    return a, b


def bounded_fine_moments(theta: Tensor, sigma: Tensor, step: Tensor, low_edge: Tensor, high_edge: Tensor,
                         lower: Tensor, upper: Tensor, kappa_only: bool = False
                         ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(kappa, mean_abs, m4)`` ``[c]`` (float64) of weights on a fine uniform grid whose release
    bounds them to ``[lower, upper]`` and gives the regions beyond away (``m(U) = U``), for the
    elements of :func:`fine_kappa_elements`: the numbers of the fused kernel's fine form followed
    by the outer-cell split (:func:`bounded_moments`) in one formula (``kappa_only``: ``mean_abs``
    and ``m4`` ``None``, ``kappa`` the same).

    In sd units let ``l``, ``u`` be the bounds (snapped to the grid's end edges within
    ``_SNAP`` of its span, as :func:`_bounded_block`), ``a <= b`` the first and last grid edge
    inside them (``low_edge + k step``, ``k`` in ``[0, K]``, ``K`` the inner edges' count less
    one; none inside: ``a = b = u``), ``h`` the step. The partition is the revealed
    ``(-inf, l]``, the cut cell ``[l, a]``, whole cells of width ``h`` from ``a`` to ``b``, the cut
    cell ``[b, u]`` and the revealed ``[u, inf)``, so (method.md section 5; ``P(x, y) = Phi(y) -
    Phi(x)``, ``Ik(a, b) = int_a^b x^k phi``)

        kappa = Phi(l) - l phi(l) + Q(u) + u phi(u)                  (revealed: E U^2)
              + I2(a, b) - (h^2/12 - h^4/144) P(a, b)                (the fine expansion)
              + p mu^2 of [l, a] and of [b, u]                        (the cut cells)
        m4    = 3 Phi(l) - (l^3 + 3 l) phi(l) + 3 Q(u) + (u^3 + 3 u) phi(u)
              + I4(a, b) - h^2/2 I2(a, b) + 7 h^4/80 P(a, b) + p mu^4 of the cut cells
        mean_abs = 2 phi(d), ``d`` the distance from the weight to the nearest edge of the
              partition (its own cell's nearer edge; any partition: kernel.own_cell_mean_abs),
              ``sqrt(2/pi)`` for a weight beyond its bounds (every cell on one side)

    each cut cell's ``p mu^k`` from ``p mu = phi(x) - phi(y)`` with ``mu`` kept inside the cell,
    0 for an empty one (:func:`_cell_term`); ``m4``'s ``h^4`` term as
    :data:`~mis_lightning.functional.kernel.FINE_M4_H4` says. The fine expansion's errors are the
    two-step form's (:func:`~mis_lightning.functional.kernel.fine_grid_moments`); the rounding
    differs (tests/test_fine_moments.py). ``[c]`` float64 tensors, parameter units;
    ``low_edge``, ``high_edge``: the upper edge of the lowest cell and the lower edge of the
    highest (:meth:`ParamGrid._outer_edges`)."""
    th, sg = theta.to(torch.float64), sigma.to(torch.float64)
    le, he, st = low_edge.to(torch.float64), high_edge.to(torch.float64), step.to(torch.float64)
    tol = _SNAP * (he - le).abs()
    lo = torch.where((lower - le).abs() <= tol, le, lower.to(torch.float64))
    hi = torch.where((upper - he).abs() <= tol, he, upper.to(torch.float64))
    a, b = _edges_inside(lo, hi, le, he, st)  # (_bounded_block's)
    some = a <= b
    a, b = torch.where(some, a, hi), torch.where(some, b, hi)
    x = torch.stack([lo, a, b, hi]).sub_(th).div_(sg)  # [4, c]: l, a, b, u in sd units
    cdf = torch.special.ndtr(x)
    pdf = _pdf(x)
    xp = x * pdf
    h2 = (st / sg).square_()
    p_in = (cdf[2] - cdf[1]).clamp_min(0.0)
    i2 = p_in - (xp[2] - xp[1])
    q_u = 1.0 - cdf[3]
    kappa = i2 - (h2 / 12.0 - h2 * h2 / 144.0).mul_(p_in)
    kappa += (cdf[0] - xp[0]).add_(q_u).add_(xp[3])
    m4 = None
    if not kappa_only:
        x3p = (x.square() + 3.0).mul_(xp)  # (x^3 + 3 x) phi(x)
        m4 = (3.0 * p_in - (x3p[2] - x3p[1])).sub_((0.5 * h2).mul_(i2))
        if _kernel.FINE_M4_H4:
            m4 += (_kernel._M4_H4 * (h2 * h2)).mul_(p_in)
        m4 += (3.0 * cdf[0] - x3p[0]).add_(3.0 * q_u).add_(x3p[3])
    for i, j in ((0, 1), (2, 3)):  # the cut cells [l, a] and [b, u]
        prob = (cdf[j] - cdf[i]).clamp_min(0.0)
        diff = pdf[i] - pdf[j]
        r = diff / prob.clamp_min(1e-300)
        r = torch.where(prob > 1e-300, torch.maximum(torch.minimum(r, x[j], out=r), x[i], out=r), 0.0)
        sq = diff.mul_(r)
        kappa += sq
        if m4 is not None:
            m4 += sq.mul_(r).mul_(r)
    if kappa_only:
        return kappa.clamp_(0.0, 1.0), None, None
    # the nearest partition edge: the bounds, or the grid edge nearest the weight within [a, b]
    near = torch.minimum(torch.maximum(le + torch.round((th - le) / st) * st, a), b)
    d = torch.minimum(torch.minimum((th - lo).abs(), (hi - th).abs()), (th - near).abs()).div_(sg)
    inside = (th > lo) & (th < hi)
    mean_abs = torch.where(inside, (2.0 * _pdf(d)).clamp_(0.0, SQRT_2_OVER_PI), SQRT_2_OVER_PI)
    return kappa.clamp_(0.0, 1.0), mean_abs, m4


def _split_chunk(kappa: Tensor, mean_abs: Tensor, m4: Tensor, mask: Tensor, theta: Tensor, sigma: Tensor,
                 edge: Tensor, bound: Tensor, sign: Tensor, on_edge: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Elementwise over a chunk: the moments with the outer cell at ``edge`` cut at ``bound``
    where ``mask`` (``sign`` +1: the top cell, -1: the bottom one). Branch-free (compiled).
    ``on_edge`` (eager only): ``bound`` equals ``edge`` everywhere (:func:`_edge_delta`)."""
    sg = sigma.clamp_min(2.2250738585072014e-308)
    zero = torch.zeros_like(theta)
    e = torch.where(mask, sign * (edge - theta) / sg, zero)
    if on_edge:
        dk, dl, d4 = _edge_delta(e)
    else:
        dk, dl, d4 = _split_delta(e, torch.where(mask, sign * (bound - theta) / sg, zero))
    return ((kappa + torch.where(mask, dk, zero)).clamp(0.0, 1.0),
            (mean_abs + torch.where(mask, dl, zero)).clamp(0.0, SQRT_2_OVER_PI),
            m4 + torch.where(mask, d4, zero))


def _split_every(kappa: Tensor, mean_abs: Tensor, m4: Tensor, theta: Tensor, sigma: Tensor, edge: Tensor,
                 bound: Tensor, sign: Tensor, on_edge: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_split_chunk` where every element is cut (eager): its masks select everything, so
    it is the same arithmetic without them, bit for bit (a small model whose sd spans the grid
    cuts every element: the 1e5 benchmark MLP's torchao layers). ``on_edge``: ``bound`` equals
    ``edge`` everywhere (:func:`_edge_delta`)."""
    sg = sigma.clamp_min(2.2250738585072014e-308)
    e = sign * (edge - theta) / sg
    dk, dl, d4 = _edge_delta(e) if on_edge else _split_delta(e, sign * (bound - theta) / sg)
    return (kappa + dk).clamp(0.0, 1.0), (mean_abs + dl).clamp(0.0, SQRT_2_OVER_PI), m4 + d4


def _split_chunk_kappa(kappa: Tensor, mask: Tensor, theta: Tensor, sigma: Tensor, edge: Tensor, bound: Tensor,
                       sign: Tensor, on_edge: bool = False) -> Tensor:
    """The ``kappa`` of :func:`_split_chunk` alone (eager; bitwise equal). ``on_edge``: ``bound``
    equals ``edge`` everywhere (:func:`_edge_delta_kappa`)."""
    sg = sigma.clamp_min(2.2250738585072014e-308)
    e = sign * (edge - theta) / sg
    if bool(mask.all()):  # every element cut (a model whose sd spans the grid): no masking
        if on_edge:
            return (kappa + _edge_delta_kappa(e)).clamp(0.0, 1.0)
        return (kappa + _split_delta_kappa(e, sign * (bound - theta) / sg)).clamp(0.0, 1.0)
    zero = torch.zeros_like(theta)
    e = torch.where(mask, e, zero)
    if on_edge:
        return (kappa + torch.where(mask, _edge_delta_kappa(e), zero)).clamp(0.0, 1.0)
    b = torch.where(mask, sign * (bound - theta) / sg, zero)
    return (kappa + torch.where(mask, _split_delta_kappa(e, b), zero)).clamp(0.0, 1.0)


#: Name of the compiled split, as the self-check warnings print it.
SPLIT_COMPILED_PATH = "the torch.compile'd outer-cell split of bounded grids"
_SPLIT_STATE: dict[str, object] = {"compiled": None, "failed": False}


def _split_kernel(policy: CompilePolicy | None):
    """The split to run and whether it is compiled: compiled when the caller's policy compiles
    the cell-moment kernel at this point of the process (the same decision, no new compile
    surprise), unless compiling or the self-check failed."""
    policy = policy or CompilePolicy()
    want = policy.wants(int(_FUSED_STATE["elements"]))  # type: ignore[arg-type]
    if not want or _SPLIT_STATE["failed"] or SPLIT_COMPILED_PATH in GUARD.disabled \
            or COMPILED_PATH in GUARD.disabled:
        return _split_chunk, False
    if _SPLIT_STATE["compiled"] is None:
        _SPLIT_STATE["compiled"] = torch.compile(_split_chunk, dynamic=True)
    return _SPLIT_STATE["compiled"], True


def split_compiled() -> bool:
    """Whether the compiled split exists and passed its first-use check at this thread count."""
    return _SPLIT_STATE["compiled"] is not None and GUARD.is_checked(SPLIT_COMPILED_PATH)


def warm_up_split(mm: CellMoments, theta: Tensor, sigma: Tensor, scale: Tensor, qmax: int,
                  policy: CompilePolicy) -> None:
    """Run the chunk-wide split once (compiled and self-checked as ``policy`` says) on a chunk
    of an affine grid ``[qmin, qmax] * scale`` whose top cell every element has cut at
    ``(qmax - 1/2) * scale`` (``affine.warm_up_compiled_kernel`` calls it up front)."""
    s = scale.to(torch.float64)
    _apply_split(mm, torch.ones_like(s, dtype=torch.bool), theta.to(torch.float64), sigma.to(torch.float64),
                 (qmax - 1.5) * s, (qmax - 0.5) * s, True, policy)


def _apply_split(out: CellMoments, mask: Tensor, theta: Tensor, sigma: Tensor, edge: Tensor,
                 bound: Tensor, top: bool, policy: CompilePolicy | None, kappa_only: bool = False,
                 total: int | None = None) -> CellMoments:
    """Cut the outer cell at ``edge`` at ``bound`` for the elements ``mask``: on gathered
    elements when few, over the whole chunk (compiled as ``policy`` says, checked against the
    eager arithmetic on a sample) when most are concerned (large models whose sd spans the
    whole grid). ``kappa_only``: ``mean_abs`` and ``m4`` are left as they are (eager only;
    the compiled split computes all three, and its self-check then compares ``kappa`` alone:
    the inputs' ``mean_abs`` and ``m4`` may be NaN, not computed). ``total``: the elements of the
    block these are a subset of (:func:`_bounded_moments`), which the choice of path reads."""
    n = int(mask.sum())
    if n == 0:
        return out
    sign = 1.0 if top else -1.0
    # the bound on the edge itself everywhere (torchao's symmetric scales, the bottom cell): the
    # empty cut cell's terms left out (_edge_delta); the compiled split keeps its own arithmetic
    on_edge = SPLIT_ON_EDGE and torch.equal(edge, bound)
    if 2 * n < (mask.numel() if total is None else total):
        idx = torch.nonzero(mask).squeeze(-1)
        s = sigma[idx].clamp_min(torch.finfo(torch.float64).tiny)
        t = theta[idx]
        e = sign * (edge[idx] - t) / s
        if kappa_only:
            dk = _edge_delta_kappa(e) if on_edge else _split_delta_kappa(e, sign * (bound[idx] - t) / s)
            out.kappa[idx] = (out.kappa[idx] + dk).clamp(0.0, 1.0)
            return out
        dk, dl, d4 = _edge_delta(e) if on_edge else _split_delta(e, sign * (bound[idx] - t) / s)
        out.kappa[idx] = (out.kappa[idx] + dk).clamp(0.0, 1.0)
        out.mean_abs[idx] = (out.mean_abs[idx] + dl).clamp(0.0, SQRT_2_OVER_PI)
        out.m4[idx] = out.m4[idx] + d4
        return out
    args = (mask, theta, sigma, edge, bound, torch.tensor(sign, dtype=torch.float64, device=theta.device))
    kernel, compiled = _split_kernel(policy)
    c = theta.numel()
    if kappa_only and not compiled:
        return CellMoments(kappa=_split_chunk_kappa(out.kappa, *args, on_edge=on_edge), mean_abs=out.mean_abs,
                           m4=out.m4, coverage=out.coverage)
    if not compiled and bool(mask.all()):
        res = _split_every(out.kappa, out.mean_abs, out.m4, *args[1:], on_edge=on_edge)
        return CellMoments(kappa=res[0], mean_abs=res[1], m4=res[2], coverage=out.coverage)
    try:
        res = kernel(out.kappa, out.mean_abs, out.m4, *args) if compiled else \
            _split_chunk(out.kappa, out.mean_abs, out.m4, *args, on_edge=on_edge)
    except Exception as exc:  # noqa: BLE001 - a failed compilation falls back to eager, once
        if not compiled:
            raise
        warn(f"torch.compile of the outer-cell split failed ({type(exc).__name__}: {exc}); "
             "using the eager arithmetic", RuntimeWarning)
        _SPLIT_STATE["failed"], compiled = True, False
        res = _split_chunk(out.kappa, out.mean_abs, out.m4, *args)
    if compiled:
        variant = (top, str(theta.device))  # what compiled code may specialise on besides the size
        k = GUARD.sample_size(SPLIT_COMPILED_PATH, c, per_size=True, variant=variant)
        if k:
            idx = sample_indices(c, k, [mask])
            ref = _split_chunk(out.kappa[idx], out.mean_abs[idx], out.m4[idx], *(a[idx] for a in args[:-1]), args[-1])
            got = tuple(r[idx] for r in res)
            if kappa_only:  # mean_abs and m4 may be uncomputed (NaN) upstream: kappa alone is read
                zero = torch.zeros_like(got[0])
                got, ref = (got[0], zero, zero), (ref[0], zero, zero)
            GUARD.observe(SPLIT_COMPILED_PATH, got, ref)
            # NaN in both is agreement: an input NaN (a moment not computed upstream) goes through
            # both arithmetics alike; the check is of the kernel, not of its inputs (pf32 saw a
            # NaN m4 in both disable the compiled split for the rest of a 1e7 process)
            problem = compare(got, ref, torch.ones(idx.numel(), dtype=torch.float64), SAME_ARITHMETIC,
                              equal_nan=True)
            if problem:
                GUARD.fail(SPLIT_COMPILED_PATH, problem, "the eager arithmetic")
                res = _split_chunk(out.kappa, out.mean_abs, out.m4, *args)
            else:
                GUARD.passed(SPLIT_COMPILED_PATH, c, variant)
    return CellMoments(kappa=res[0], mean_abs=res[1], m4=res[2], coverage=out.coverage)


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
    compile_policy: CompilePolicy | None = None,
    kappa_only: bool = False,
    path_elements: int | None = None,
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
        compile_policy: the caller's :class:`~mis_lightning.functional.CompilePolicy`: the
            chunk-wide split is compiled when the cell-moment kernel is (and self-checked).
        kappa_only: only ``kappa`` is needed (the bootstrap draws): the eager outer-cell split
            leaves ``mean_abs`` and ``m4`` uncorrected; ``kappa`` is bitwise the same.
        path_elements: the size of the call these elements stand for (default ``c``): the live
            elements of a chunk mostly of point masses (``ParamGrid._own_moments``), given alone,
            choose the outer-cell split's path as a call of that many elements of which the
            others have no bound within reach.

    Returns:
        float64 :class:`CellMoments` ``[c]`` (a new object; ``coverage`` as the sums give it),
        or ``mm`` itself when no element has a bound within reach.

    Eager (the split not compiled), chunks of more than ``BLOCK`` elements are corrected in
    blocks of ``BLOCK``: every operation here is element by element (the window sums of inner
    bounds included: each element's window is its own), so the numbers are those of one pass
    over the chunk, bit for bit (tests/test_bounds.py), while the ~150 element-wise operations
    of the correction run on cache-sized temporaries instead of chunk-sized ones (2^18
    elements: 151 -> 48 ns per element for the outer-cell split alone, 1 thread).
    """
    c = theta.shape[0]
    if c <= BLOCK or _split_kernel(compile_policy)[1]:
        return _bounded_moments(mm, theta, sigma, lower, upper, low_edge, high_edge, step, edges,
                                compile_policy, kappa_only, max(c, path_elements or 0))
    outs = [torch.empty_like(t, dtype=torch.float64) for t in (mm.kappa, mm.mean_abs, mm.m4, mm.coverage)]
    changed = False
    for s in range(0, c, BLOCK):
        sl = slice(s, s + BLOCK)
        part = CellMoments(kappa=mm.kappa[sl], mean_abs=mm.mean_abs[sl], m4=mm.m4[sl], coverage=mm.coverage[sl])
        res = _bounded_moments(part, theta[sl], sigma[sl], lower[sl], upper[sl], low_edge[sl], high_edge[sl],
                               None if step is None else step[sl],
                               lambda ii, m, s=s: edges(ii + s, m), compile_policy, kappa_only)
        changed |= res is not part
        for o, v in zip(outs, (res.kappa, res.mean_abs, res.m4, res.coverage)):
            o[sl] = v
    if not changed:
        return mm
    return CellMoments(kappa=outs[0], mean_abs=outs[1], m4=outs[2], coverage=outs[3])


def _bounded_moments(
    mm: CellMoments,
    theta: Tensor,
    sigma: Tensor,
    lower: Tensor,
    upper: Tensor,
    low_edge: Tensor,
    high_edge: Tensor,
    step: Tensor | None,
    edges: Callable[[Tensor, int], Tensor],
    compile_policy: CompilePolicy | None,
    kappa_only: bool,
    total: int | None = None,
) -> CellMoments:
    """:func:`bounded_moments` on one chunk or block (same arguments and returns; ``total``: the
    size of the call it stands for, default its own). When fewer
    than half its elements have a bound within reach (e.g. sd-0 weights of dead units), the
    correction runs on those alone (:func:`_bounded_block` on the subset): every operation is
    element by element and each path gathers the same elements in the same order either way
    (the block's size keeps the outer-cell split's choice of path), so the numbers are the same
    bit for bit (tests/test_bounds.py)."""
    th, sg = theta.to(torch.float64), sigma.to(torch.float64)
    lo, hi = lower.to(torch.float64), upper.to(torch.float64)
    reach = bounds_in_reach(th, sg, lo, hi)
    nr = int(reach.sum())
    if nr == 0:
        return mm
    total = max(reach.numel(), total or 0)
    if 2 * nr >= total:
        return _bounded_block(mm, th, sg, lo, hi, low_edge, high_edge, step, edges, compile_policy, kappa_only,
                              reach, total)
    ix = torch.nonzero(reach).squeeze(-1)
    part = CellMoments(kappa=mm.kappa[ix], mean_abs=mm.mean_abs[ix], m4=mm.m4[ix], coverage=mm.coverage[ix])
    res = _bounded_block(part, th[ix], sg[ix], lo[ix], hi[ix], low_edge[ix], high_edge[ix],
                         None if step is None else step[ix], lambda ii, m: edges(ix[ii], m),
                         compile_policy, kappa_only, torch.ones_like(ix, dtype=torch.bool), total)
    out = CellMoments(kappa=mm.kappa.clone(), mean_abs=mm.mean_abs.clone(), m4=mm.m4.clone(),
                      coverage=mm.coverage.clone())
    for o, v in zip((out.kappa, out.mean_abs, out.m4, out.coverage), (res.kappa, res.mean_abs, res.m4, res.coverage)):
        o[ix] = v
    return out


def reveal_beyond_bounds(out: CellMoments, sub: Tensor, th: Tensor, sg: Tensor, lo: Tensor, hi: Tensor) -> None:
    """Moments of windows clipped at the bounds (:func:`clip_boundaries`: each ends in one
    lumped cell beyond a bound) turned into those of the bounded release (in place at ``sub``):
    the lumped cell beyond a bound within ``CUTOFF_SIGMAS`` sd is the region the release gives
    away (:func:`_reveal_delta`). ``out``: ``[c]`` float64 moments; ``th``, ``sg``, ``lo``,
    ``hi``: ``[c]`` float64 weights, sd and bounds (parameter units)."""
    ts, ss = th[sub], sg[sub].clamp_min(torch.finfo(torch.float64).tiny)
    for bound, sign in ((hi[sub], 1.0), (lo[sub], -1.0)):
        near = torch.isfinite(bound) & (sign * (bound - ts) <= CUTOFF_SIGMAS * ss)
        if bool(near.any()):
            dk, dl, d4 = _reveal_delta(sign * (bound - ts) / ss)
            zero = torch.zeros_like(dk)
            out.kappa[sub] = (out.kappa[sub] + torch.where(near, dk, zero)).clamp(0.0, 1.0)
            out.mean_abs[sub] = (out.mean_abs[sub] + torch.where(near, dl, zero)).clamp(0.0, SQRT_2_OVER_PI)
            out.m4[sub] = out.m4[sub] + torch.where(near, d4, zero)


def _bounded_block(mm: CellMoments, th: Tensor, sg: Tensor, lo: Tensor, hi: Tensor, low_edge: Tensor,
                   high_edge: Tensor, step: Tensor | None, edges: Callable[[Tensor, int], Tensor],
                   compile_policy: CompilePolicy | None, kappa_only: bool, reach: Tensor, total: int) -> CellMoments:
    """The correction of :func:`_bounded_moments` given the float64 inputs, the mask ``reach``
    (:func:`bounds_in_reach`, some element True) and ``total``, the size of the block these
    elements are (a subset of): the outer-cell split chooses its path by it."""
    out = CellMoments(kappa=mm.kappa.clone(), mean_abs=mm.mean_abs.clone(), m4=mm.m4.clone(),
                      coverage=mm.coverage.clone())
    le, he = low_edge.to(torch.float64), high_edge.to(torch.float64)
    # A bound on an end edge up to the scale's float rounding (torchao's symmetric scales put
    # -absmax on the bottom cell's edge) is that edge: nothing to cut.
    tol = _SNAP * (he - le).abs()
    lo = torch.where((lo - le).abs() <= tol, le, lo)
    hi = torch.where((hi - he).abs() <= tol, he, hi)
    cut = CUTOFF_SIGMAS * sg
    # a bound inside an inner cell (beyond it, whole cells are "another release")
    inner = reach & ((hi < he) | (lo > le))
    split = reach & ~inner  # bounds in (or beyond) the grid's own end cells: those cells are cut
    a, b = le, he  # the edges of the outer cells that are cut
    if bool(inner.any()):
        idx = torch.nonzero(inner).squeeze(-1)
        t, s, lb, ub, lei, hei = th[idx], sg[idx], lo[idx], hi[idx], le[idx], he[idx]
        coarse = torch.ones_like(t, dtype=torch.bool)
        if step is not None:
            # fine steps: the expansion between the grid edges nearest inside the bounds, then
            # the cut cells exactly (a partial cell next to a bound is a cell of its own)
            st = step.to(torch.float64)[idx]
            fine = (st <= FINE_STEP * s) & (st > 0)
            st1 = torch.where(fine, st, torch.ones_like(st))
            ai, bi = _edges_inside(lb, ub, lei, hei, st1)
            fine = fine & (ai <= bi)
            if bool(fine.any()):
                sub = idx[fine]
                ts, ss, cs, af, bf = t[fine], s[fine], CUTOFF_SIGMAS * s[fine], ai[fine], bi[fine]
                a_std = torch.where(ts - af > cs, torch.full_like(ts, -math.inf), (af - ts) / ss)
                b_std = torch.where(bf - ts > cs, torch.full_like(ts, math.inf), (bf - ts) / ss)
                fm = fine_grid_moments(st[fine] / ss, a_std, b_std)
                ma = fm.mean_abs
                if _kernel.EXACT_AFFINE_MEAN_ABS:
                    # exact before the split below (which adds the cut cells' exact change): 2 phi
                    # of the distance to the nearest grid edge within [af, bf] (the expansion's
                    # mean_abs is an average over the position in the cell)
                    sf, lf = st[fine], lei[fine]
                    near_edge = torch.minimum(torch.maximum(lf + torch.round((ts - lf) / sf) * sf, af), bf)
                    ma = (2.0 * _pdf((ts - near_edge) / ss)).clamp(0.0, SQRT_2_OVER_PI)
                out.kappa[sub], out.mean_abs[sub], out.m4[sub] = fm.kappa, ma, fm.m4
                out.coverage[sub] = 1.0
                a, b = le.clone(), he.clone()
                a[sub], b[sub] = af, bf
                split = split.clone()
                split[sub] = True
                coarse = ~fine
        # other inner bounds (coarser steps, value tables): exact sums over clipped windows
        if bool(coarse.any()):
            sub = idx[coarse]
            if step is None:
                need = torch.full((sub.numel(),), float(_WINDOWS[-2]), dtype=torch.float64)
            else:
                need = (torch.ceil(CUTOFF_SIGMAS * sg[sub] / step.to(torch.float64)[sub]) + 1).clamp(max=_MAX_WINDOW)
            windowed_moments(
                (out.kappa, out.mean_abs, out.m4, out.coverage), sub, need, _WINDOWS, _ROWS_BUDGET,
                lambda ii, m: clip_boundaries(edges(ii, m), lo[ii], hi[ii]), th, sg.clamp_min(1e-300))
            reveal_beyond_bounds(out, sub, th, sg, lo, hi)
    # the outer cell [b, inf) cut at the bound beyond it, the rest revealed (and (-inf, a]
    # likewise); a bound on the edge itself (torchao's symmetric scales) reveals the whole cell
    out = _apply_split(out, split & (hi >= b) & (hi - th <= cut), th, sg, b, hi, True, compile_policy, kappa_only,
                       total)
    out = _apply_split(out, split & (lo <= a) & (th - lo <= cut), th, sg, a, lo, False, compile_policy, kappa_only,
                       total)
    return out


__all__ = ["bounded_fine_moments", "bounded_moments", "bounds_in_reach", "clip_boundaries", "fine_kappa_elements",
           "reveal_beyond_bounds"]
