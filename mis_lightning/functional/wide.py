"""Cell moments of weights whose sd dwarfs the window the release bounds them to (method.md
section 5, "Weights whose sd spans the bounded window").

A release with weight-derived scales bounds each weight to ``[lower, upper]`` (the block's
absmax or min/max, :mod:`~mis_lightning.functional.bounds`): its partition is the grid's cells
clipped to the bounds plus the two regions beyond them, which the release gives away
(``m(U) = U``). In standard units ``u = (x - theta) / sigma`` let the window ``[L, U]`` hold
``0`` (``theta`` strictly inside its bounds), ``W = U - L`` its width and ``M = max(-L, U)``.
Then, exactly,

* ``1 - kappa = sum_k p_k Var(u | cell k)`` (``E u^2 = 1`` and the revealed regions keep all of
  theirs);
* ``sqrt(2/pi) - mean_abs = 2 (phi(0) - phi(min(l, r)))``, ``l``, ``r`` the distances from
  ``theta`` to the edges of its own clipped cell (only the cell holding ``0`` loses ``E|u|``);
* ``0 <= 3 - m4 <= 6 M^2 (1 - kappa)`` (on a cell within ``|u| <= M``,
  ``E u^4 - mu^4 = Var(u^2) + Var(u) (E u^2 + mu^2) <= 6 M^2 Var(u)``).

With ``S = phi(0) C3 / (12 sigma^3)``, ``C3`` the sum of the clipped cells' cubed widths
(parameter units; the Sheppard term ``h^2 P / 12`` of a uniform grid of step ``h``), each cell
of width ``w <= W`` obeys ``lambda S_k <= p_k Var_k <= S_k`` with
``lambda = exp(-M^2 / 2) - M^2 W^2 exp(M^2 / 2) / 12``: the upper side because ``mu_k``
minimises the second moment and ``phi <= phi(0)``, the lower because ``phi >= phi(0) exp(-M^2/2)``
on the window and ``|mu_k - c_k| p_k <= M S_k`` (``|phi'| <= M phi(0)``). So the closed form

    kappa = 1 - lambda S,   mean_abs as above (exact),   m4 = 3,   coverage = 1

reads at least the exact ``kappa`` (the conservative side) and errs by at most
``(1 - lambda) S ~ M^2 S / 2`` in ``kappa`` and ``6 M^2 S`` in ``m4``
(:func:`wide_sd_error_bound`). The grid paths it replaces (windowed sums, the fine-grid
expansion between the bounds, the outer-cell split; ~100-500 element-wise operations) carry
their own errors of up to ``5e-4 h^2`` (the expansion) there.

All tensors are per element (``[c]``, float64, parameter units).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .cells import _INV_SQRT_2PI, SQRT_2_OVER_PI, CellMoments
from .masks import count_set
from .runs import per_table

# The closed form applies where the bounded window is at most this many sd wide (the error
# bound's derivation keeps the exp(+-M^2/2) factors exact, so it holds at any W; below 0.5 the
# gate's 6 M^2 S is the larger of its two bounds, wide_sd_parts). 0.1 until p55b: the 1e5 MLP's
# first layer has windows of 0.016-0.39 sd, and the 0.1-0.5 ones went to the paths (~100-500
# element-wise operations a weight against ~60) though the gate bounds their error alike...
WIDE_MAX_WINDOW = 0.5
# ... and where its error bound (the larger of kappa's and m4's, absolute) is at most this. The
# gate's 6 M^2 S bounds m4's error; kappa's, (1 - lambda) S <= 0.524 M^2 S, is at most 0.0873 of
# it (8.7e-10, on the conservative side). That is within the 2e-9 the bootstrap draws' shortcuts
# already accept (assess.POSITION_FREE_STEP, POSITION_FREE_WIDE_TOL), of the order of the grid
# paths' own errors there (the fine-grid expansion's 5e-4 h^2: 1e-9 at steps of 1.4e-3 sd) and
# far below the estimate's statistical noise. (The series forms on stored and table cells keep
# their own functional.wide_series.SERIES_TOL, 1e-11.) 1e-11 until tol47: 1e-9 takes 4-5% off the
# 1e5 MLP's steady scoring call and moves its leakages by at most 4.2e-14 relative; 1e-8 since p55b
# (with the window at 0.5: 4-15% off that call in fresh-process pairs, 13% in-process; mis moved
# by at most 9.4e-10 relative; docs/method.md section 5, "Weights whose sd spans the bounded window"; docs/benchmarks.md, "wsd34",
# "p47d", "tol47", "p55b"). The bound is kappa's: the correlated headline reads kappa through
# (1 - kappa) / kappa, whose relative error is up to 1 - lambda (13% at W = 0.5); rv55r measured
# its moves at -4.1e-7 to +3.4e-6 relative on a 5k-weight MLP (1.2e-9 at the old gate), whose in-sample
# factor form is not monotone in kappa (its own-row-out divisor 1 + beta(kappa); cf55)
WIDE_TOL = 1e-8
# value tables up to this many values (float8, float4, nf4: bounded formats whose cubed widths
# sum without cancellation); the 16-bit tables (65k values up to 3e38) take the paths
WIDE_TABLE_MAX_VALUES = 4096
# wide_sd_parts and own_cell_mean_abs in place on their own temporaries, ok's bound as 6 M^2 S
# alone (the larger of the two inside the window: the same mask); bitwise the same kappa,
# mean_abs and ok (wd38). False: as before (tests, A/B)
WIDE_PARTS_IN_PLACE = True


def _cube(x: Tensor) -> Tensor:
    # x * x * x: torch's pow(x, 3) on float64 took ~4x the time of two multiplications
    return x * x * x


def affine_cube_sum(lower: Tensor, upper: Tensor, low_edge: Tensor, high_edge: Tensor, step: Tensor) -> Tensor:
    """``C3 = sum_k w_k^3`` over the cells of a uniform grid clipped to ``[lower, upper]``.

    Args:
        lower, upper: ``[c]`` finite bounds, ``lower < upper`` (parameter units).
        low_edge, high_edge: ``[c]`` the grid's first and last inner edge (the upper edge of the
            lowest cell, the lower edge of the highest: ``(qmin + 1/2 - zp) s``, ``(qmax - 1/2 - zp) s``).
        step: ``[c]`` the step ``s > 0``.

    Returns:
        ``[c]`` float64: the inner edges inside ``[lower, upper]`` run from ``a`` to ``b``
        (``n = (b - a) / s`` whole cells), plus the two cut cells ``a - lower`` and ``upper - b``;
        no inner edge inside: one cell ``upper - lower``.
    """
    lo, hi = lower.to(torch.float64), upper.to(torch.float64)
    le, s = low_edge.to(torch.float64), step.to(torch.float64)
    top = torch.round((high_edge.to(torch.float64) - le) / s)
    n_lo = torch.ceil((lo - le) / s).clamp(min=0.0)
    n_hi = torch.minimum(torch.floor((hi - le) / s), top)
    some = n_lo <= n_hi
    a = le + n_lo * s
    b = le + n_hi * s
    inner = _cube((a - lo).clamp_min(0.0)) + (n_hi - n_lo) * _cube(s) + _cube((hi - b).clamp_min(0.0))
    return torch.where(some, inner, _cube(hi - lo))


class CubeTable:
    """Prefix sums of a value table's finite cells' cubed widths (units of the scale):
    ``prefix[i] = sum_{j < i} (mids[j + 1] - mids[j])^3`` over the cell edges ``mids``."""

    def __init__(self, values: Tensor, device: torch.device) -> None:
        self.values = values.detach().to(device=device, dtype=torch.float64).clone()
        self.mids = 0.5 * (self.values[1:] + self.values[:-1])
        w3 = _cube(self.mids[1:] - self.mids[:-1])
        self.prefix = torch.cat([w3.new_zeros(1), torch.cumsum(w3, 0)])


_CUBE_TABLES: dict = {}


def table_cube_sum(lower: Tensor, upper: Tensor, scale: Tensor, values: Tensor) -> Tensor:
    """``C3`` (see :func:`affine_cube_sum`) of a value table ``values * scale`` (``values``:
    ``[V]`` sorted, finite) clipped to ``[lower, upper]`` (``[c]`` each, ``lower < upper``;
    ``scale > 0``); ``[c]`` float64, parameter units."""
    s = scale.to(torch.float64)
    ct = per_table(_CUBE_TABLES, values, s.device, CubeTable)
    x_lo, x_hi = lower.to(torch.float64) / s, upper.to(torch.float64) / s
    i0 = torch.searchsorted(ct.mids, x_lo)  # the first edge >= x_lo
    i1 = torch.searchsorted(ct.mids, x_hi, right=True) - 1  # the last edge <= x_hi
    some = i0 <= i1
    j0 = i0.clamp(0, ct.mids.numel() - 1)
    j1 = i1.clamp(0, ct.mids.numel() - 1)
    a, b = ct.mids.index_select(0, j0), ct.mids.index_select(0, j1)
    mid = ct.prefix.index_select(0, j1) - ct.prefix.index_select(0, j0)
    inner = _cube((a - x_lo).clamp_min(0.0)) + mid.clamp_min(0.0) + _cube((x_hi - b).clamp_min(0.0))
    return torch.where(some, inner, _cube(x_hi - x_lo)) * _cube(s)


def wide_sd_error_bound(sigma: Tensor, lower: Tensor, upper: Tensor, theta: Tensor, cube: Tensor,
                        width: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(S, lambda, bound)`` ``[c]`` of :func:`wide_sd_moments`: the Sheppard deficit
    ``S = phi(0) C3 / (12 sigma^3)``, the factor ``lambda`` of the module doc and the larger of
    the two error bounds, ``max((1 - lambda) S, 6 M^2 S)`` (absolute, on ``kappa`` and ``m4``).
    ``width``: ``upper - lower`` where the caller has it."""
    sg = sigma.to(torch.float64)
    th = theta.to(torch.float64)
    w = (upper - lower if width is None else width) / sg
    m = torch.maximum(th - lower, upper - th) / sg
    m2 = m * m
    S = (_INV_SQRT_2PI / 12.0) * cube / _cube(sg)
    lam = torch.exp(-0.5 * m2) - m2 * w * w * torch.exp(0.5 * m2) / 12.0
    return S, lam, torch.maximum((1.0 - lam) * S, 6.0 * m2 * S)


def wide_deficit_bound(sigma: Tensor, cube: Tensor) -> Tensor:
    """``[c]`` ``S = phi(0) C3 / (12 sigma^3)``: at EVERY position of the weight (inside its bounds
    or not) ``0 <= 1 - kappa <= S`` when every cell of the bounded window is finite (each clipped
    cell's ``p_k Var_k <= phi(0) w_k^3 / 12`` in sd units; the regions beyond the bounds are
    revealed). So kappa moves by at most ``S`` between any two positions (the bootstrap draws'
    shortcut, ``assess._position_free``). ``sigma``, ``cube``: ``[c]`` (parameter units)."""
    sg = sigma.to(torch.float64)
    return (_INV_SQRT_2PI / 12.0) * cube / _cube(sg)


def wide_sd_moments(theta: Tensor, sigma: Tensor, lower: Tensor, upper: Tensor, cube: Tensor,
                    own_lo: Tensor | None, own_hi: Tensor | None) -> tuple[CellMoments, Tensor]:
    """The closed form of the module doc and where it applies.

    Args:
        theta, sigma: ``[c]`` weights and sd (parameter units).
        lower, upper: ``[c]`` the release's bounds.
        cube: ``[c]`` ``C3`` of the cells clipped to the bounds (:func:`affine_cube_sum`,
            :func:`table_cube_sum`).
        own_lo, own_hi: ``[c]`` the edges of each weight's own cell (``-inf`` / ``inf`` for the
            grid's outer cells); clipped to the bounds here. ``None``: ``mean_abs`` is not
            computed (NaN; a caller that reads ``kappa`` alone).

    Returns:
        ``(moments, ok)``: float64 :class:`CellMoments` ``[c]`` (``kappa = 1 - lambda S``,
        ``mean_abs`` exact, ``m4 = 3``, coverage 1) and ``ok`` ``[c]`` bool, the elements it
        holds for: ``lower < theta < upper``, ``upper - lower <= WIDE_MAX_WINDOW sigma`` and
        :func:`wide_sd_error_bound` at most ``WIDE_TOL`` (the others' moments are meaningless:
        sd 0, NaN or infinite bounds all fail).
    """
    kappa, mean_abs, ok = wide_sd_parts(theta, sigma, lower, upper, cube, own_lo, own_hi)
    return CellMoments(kappa=kappa, mean_abs=torch.full_like(kappa, math.nan) if mean_abs is None else mean_abs,
                       m4=torch.full_like(kappa, 3.0), coverage=torch.ones_like(kappa)), ok


def wide_sd_parts(theta: Tensor, sigma: Tensor, lower: Tensor, upper: Tensor, cube: Tensor,
                  own_lo: Tensor | None, own_hi: Tensor | None, window: Tensor | None = None,
                  own_fresh: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`wide_sd_moments`' ``(kappa, mean_abs, ok)`` alone (``[c]`` each; ``mean_abs``
    ``None`` where ``own_lo`` or ``own_hi`` is): its constant ``m4`` and ``coverage`` are the
    caller's to fill (chunk-sized fills that a caller reading ``kappa`` alone never reads).
    ``window``: ``[c]`` bool, ``(upper - lower <= WIDE_MAX_WINDOW * sigma) & (lower < theta <
    upper)`` on these float64 tensors, where the caller computed it (``ok``'s first three tests).
    ``own_fresh``: ``own_lo`` / ``own_hi`` are the caller's own temporaries (overwritten here)."""
    th, sg = theta.to(torch.float64), sigma.to(torch.float64)
    if not WIDE_PARTS_IN_PLACE:
        width = upper - lower
        S, lam, bound = wide_sd_error_bound(sg, lower, upper, th, cube, width)
        if window is None:
            window = (width <= WIDE_MAX_WINDOW * sg) & (th > lower) & (th < upper)
        ok = window & (bound <= WIDE_TOL)
        kappa = (1.0 - lam * S).clamp(0.0, 1.0)
    else:
        # wide_sd_error_bound's operations in its order (bitwise the same S, lambda, kappa), on
        # this call's own temporaries
        w = (upper - lower).to(torch.float64)  # (float32 bounds: promoted as width / sg promotes them)
        if window is None:
            window = (w <= WIDE_MAX_WINDOW * sg) & (th > lower) & (th < upper)
        w.div_(sg)
        S = sg * sg
        S = torch.div((_INV_SQRT_2PI / 12.0) * cube, S.mul_(sg), out=S)
        m2 = th - lower
        t = upper - th
        m2 = torch.maximum(m2, t, out=m2).div_(sg)
        m2.mul_(m2)
        lam = torch.mul(m2, -0.5).exp_()
        t = torch.mul(m2, w, out=t).mul_(w)
        t.mul_(torch.mul(m2, 0.5, out=w).exp_()).div_(12.0)
        lam.sub_(t)
        # ok's bound is 6 M^2 S alone: inside the window (W <= 0.5, so M <= W) (1 - lambda) S <=
        # (M^2 / 2 + M^2 W^2 exp(M^2 / 2) / 12) S <= 0.524 M^2 S, and with S <= phi(0) W^3 / 12 the
        # rounding of 1 - lambda (a few 1e-16) adds at most ~1e-18: below 6 M^2 S <= WIDE_TOL
        # whenever that holds, so max((1 - lambda) S, 6 M^2 S) <= WIDE_TOL is the same mask
        # (tests/test_wide_parts.py)
        ok = torch.mul(m2, 6.0, out=t).mul_(S) <= WIDE_TOL
        ok &= window
        kappa = lam.mul_(S).neg_().add_(1.0).clamp_(0.0, 1.0)
    if own_lo is None or own_hi is None:
        return kappa, None, ok
    return kappa, own_cell_mean_abs(th, sg, lower, upper, own_lo, own_hi, own_fresh), ok


# wide_sd_block: the closed form of a block on the caller's scratch and output slices, its gate
# first (bitwise wide_sd_parts' ok) and kappa and mean_abs after it, on the whole block or, where
# the gate holds for at most WIDE_GATHER_BELOW of the block, on those elements alone (gathered);
# kappa = 1 - S / E + (6 M^2 S) W^2 E / 72 with E = exp(M^2 / 2) (one exp, not two, and the gate's
# product reused): within 1e-15 of wide_sd_parts' (mean_abs and ok bitwise; docs/benchmarks.md
# "p59a"). False: wide_sd_parts and own_cell_mean_abs per block, as before (tests, A/B)
FUSED_WIDE_SD = True
# the share of a block at or below which kappa and mean_abs are computed on the gate's elements
# alone (nine gathers, a nonzero and two scatters against ~30 operations on the block, the own
# cell's among them): measured on the 1e5 MLP's blocks, gathered / whole 0.92-0.98 at 31-35%,
# 1.02-1.08 at 46-49% (docs/benchmarks.md "p59a") ...
WIDE_GATHER_BELOW = 0.35
# ... and kappa alone (four gathers, a nonzero and a scatter against ~10 operations): the whole
# block was the cheaper down to 31% (gathered 1.14-1.15x there); gathered only where few are taken
WIDE_GATHER_BELOW_KAPPA = 0.1
# blocks of fewer elements never gather (each operation's fixed cost, ~5-10 us, outweighs the
# elements it would skip)
WIDE_GATHER_MIN = 4096


class WideScratch:
    """Four float64 buffers ``[n]`` for :func:`wide_sd_block` (one call's blocks of at most ``n``
    elements reuse them: no block-sized allocations). ``device``: where the blocks are."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        w, s, m2, t = torch.empty((4, n), dtype=torch.float64, device=device).unbind(0)
        self.rows = (w, s, m2, t)

    def take(self, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Four ``[c]`` views, ``c <= n`` (``ValueError`` naming both otherwise; the whole rows
        when ``c = n``: no view made per block)."""
        if c == self.n:
            return self.rows
        if c > self.n:
            raise ValueError(f"WideScratch: a block of {c} elements exceeds the scratch's {self.n}")
        w, s, m2, t = (r[:c] for r in self.rows)
        return w, s, m2, t


def _fused_kappa(e: Tensor, s: Tensor, w: Tensor, t: Tensor, out: Tensor) -> None:
    """``kappa = 1 - lambda S`` into ``out`` from ``e = M^2`` (sd units, squared), ``s = S``, ``w = W``
    (sd units) and ``t = 6 M^2 S`` (all ``[c]`` float64, overwritten): ``lambda S = S / E -
    M^2 W^2 E S / 12``, ``E = exp(M^2 / 2)``. Inside the window ``M, W <= 0.5`` and ``S <= phi(0)
    W^3 / 12``, so ``0 < lambda S < 1`` (no clamp needed where the gate holds)."""
    e.mul_(0.5).exp_()
    t.mul_(w.mul_(w)).mul_(e).div_(72.0)
    torch.sub(t, s.div_(e), out=out).add_(1.0)


def _fused_mean_abs(th: Tensor, sg: Tensor, clip: Tensor, own_lo: Tensor, own_hi: Tensor, out: Tensor) -> None:
    """:func:`own_cell_mean_abs` into ``out`` (``[c]`` float64) from ``clip = min(th - lower, upper -
    th)`` and the own cell's edges (float64 temporaries, overwritten); ``out`` may be ``clip``.
    Bitwise :func:`own_cell_mean_abs`: ``th - max(own_lo, lower) = min(th - own_lo, th - lower)``
    exactly (rounding is monotone), then its operations in its order."""
    x = torch.sub(th, own_lo, out=own_lo)
    torch.minimum(x, own_hi.sub_(th), out=x)
    torch.minimum(x, clip, out=out).div_(sg).clamp_min_(0.0)
    e = torch.mul(out, -0.5, out=own_hi).mul_(out).expm1_().mul_(2.0 * _INV_SQRT_2PI)
    torch.add(e, SQRT_2_OVER_PI, out=out).clamp_(0.0, SQRT_2_OVER_PI)


def wide_sd_block(th: Tensor, sg: Tensor, lower: Tensor, upper: Tensor, cube: Tensor, window: Tensor | None,
                  kappa: Tensor, ok: Tensor, mean_abs: Tensor | None,
                  own: Callable[[Tensor | None], tuple[Tensor, Tensor]] | None, scratch: WideScratch) -> int:
    """:func:`wide_sd_parts`' ``(kappa, mean_abs, ok)`` of one block written into ``kappa``,
    ``mean_abs`` and ``ok`` (``[c]`` float64 / bool slices of the caller's outputs), the gate first.

    Args:
        th, sg, lower, upper, cube: ``[c]`` float64 (parameter units), as :func:`wide_sd_parts`.
        window: ``[c]`` bool, ``ok``'s first three tests (as :func:`wide_sd_parts`), or ``None``.
        kappa, ok: ``[c]`` outputs; where ``ok`` is False, ``kappa`` (and ``mean_abs``) are
            meaningless (unwritten or partial sums). Where the gate holds for at most
            ``WIDE_GATHER_BELOW`` of a block of at least ``WIDE_GATHER_MIN`` elements
            (``WIDE_GATHER_BELOW_KAPPA`` without ``mean_abs``), the values are computed on those
            elements alone, else on the whole block.
        mean_abs: ``[c]`` output or ``None`` (kappa alone).
        own: with ``mean_abs``: ``own(idx)`` the edges ``(own_lo, own_hi)`` of the own cells of the
            elements ``idx`` (``[k]`` int64 positions in the block, ``None``: all ``c``), float64
            temporaries of the caller's (overwritten here), as :func:`own_cell_mean_abs`'s;
            called at most once, and only where the gate holds for some element.
        scratch: at least ``c`` elements.

    Returns:
        the number of elements the gate holds for.

    ``ok`` and ``mean_abs`` are bitwise :func:`wide_sd_parts`' (the gate's operations in its order;
    :func:`_fused_mean_abs`); ``kappa`` (:func:`_fused_kappa`: ``exp(-M^2 / 2)`` read as ``1 /
    exp(M^2 / 2)``, the sums in another order) within a few ulp of 1 and of ``S <= 4.2e-3``:
    ``|kappa - kappa'| <= 1e-15``."""
    c = th.shape[0]
    w, s, m2, t = scratch.take(c)
    torch.sub(upper, lower, out=w)
    if window is None:
        window = (w <= WIDE_MAX_WINDOW * sg) & (th > lower) & (th < upper)
    w.div_(sg)
    torch.mul(sg, sg, out=s).mul_(sg)
    torch.div(torch.mul(cube, _INV_SQRT_2PI / 12.0, out=t), s, out=s)  # S
    torch.sub(th, lower, out=m2)
    torch.sub(upper, th, out=t)
    if mean_abs is not None:
        torch.minimum(m2, t, out=mean_abs)  # the nearer bound (mean_abs's clip)
    torch.maximum(m2, t, out=m2).div_(sg)
    m2.mul_(m2)
    # the gate: 6 M^2 S <= WIDE_TOL inside the window (wide_sd_parts' mask, its operations)
    torch.mul(m2, 6.0, out=t).mul_(s)
    torch.le(t, WIDE_TOL, out=ok)
    ok &= window
    n = count_set(ok)
    if n == 0:
        return 0
    if own is None:
        mean_abs = None
    if c < WIDE_GATHER_MIN or n > (WIDE_GATHER_BELOW_KAPPA if mean_abs is None else WIDE_GATHER_BELOW) * c:
        _fused_kappa(m2, s, w, t, kappa)
        if mean_abs is not None and own is not None:
            _fused_mean_abs(th, sg, mean_abs, *own(None), mean_abs)
        return n
    idx = torch.nonzero(ok).squeeze(-1)
    k = torch.empty(n, dtype=torch.float64, device=th.device)
    _fused_kappa(m2.index_select(0, idx), s.index_select(0, idx), w.index_select(0, idx), t.index_select(0, idx), k)
    kappa.index_copy_(0, idx, k)
    if mean_abs is not None and own is not None:
        _fused_mean_abs(th.index_select(0, idx), sg.index_select(0, idx), mean_abs.index_select(0, idx), *own(idx), k)
        mean_abs.index_copy_(0, idx, k)
    return n


def own_cell_mean_abs(th: Tensor, sg: Tensor, lower: Tensor, upper: Tensor, own_lo: Tensor, own_hi: Tensor,
                      own_fresh: bool = False) -> Tensor:
    """``mean_abs`` ``[c]`` of weights strictly inside their bounds whose release reveals the regions
    beyond them: ``sqrt(2/pi) - 2 (phi(0) - phi(x))``, ``x`` the distance (sd units) from ``th`` to
    the nearer edge of its own cell ``[own_lo, own_hi]`` clipped to ``[lower, upper]`` (only the cell
    holding ``th`` loses ``E|u|``; exact on any partition). All ``[c]`` float64, parameter units.
    ``own_fresh``: ``own_lo`` / ``own_hi`` are float64 temporaries of the caller's, overwritten here."""
    # the own cell clipped to the bounds; x = the nearer edge (sd units, >= 0: a backend code's
    # cell may miss theta by an ulp at a float32 tie)
    if own_fresh and WIDE_PARTS_IN_PLACE and own_lo.dtype == own_hi.dtype == torch.float64:
        left = torch.sub(th, torch.maximum(own_lo, lower, out=own_lo), out=own_lo)
        right = torch.minimum(own_hi, upper, out=own_hi).sub_(th)
        x = torch.minimum(left, right, out=left).div_(sg).clamp_min_(0.0)
        # the same operations as below, in their order
        e = torch.mul(x, -0.5, out=right).mul_(x).expm1_().mul_(2.0 * _INV_SQRT_2PI)
        return e.add_(SQRT_2_OVER_PI).clamp_(0.0, SQRT_2_OVER_PI)
    left = th - torch.maximum(own_lo.to(torch.float64), lower)
    right = torch.minimum(own_hi.to(torch.float64), upper) - th
    x = (torch.minimum(left, right) / sg).clamp_min(0.0)
    # 2 (phi(0) - phi(x)) without cancellation
    return (SQRT_2_OVER_PI + 2.0 * _INV_SQRT_2PI * torch.expm1(-0.5 * x * x)).clamp(0.0, SQRT_2_OVER_PI)


__all__ = ["FUSED_WIDE_SD", "WIDE_GATHER_BELOW", "WIDE_GATHER_BELOW_KAPPA", "WIDE_GATHER_MIN", "WIDE_MAX_WINDOW", "WIDE_TOL", "WideScratch", "affine_cube_sum", "own_cell_mean_abs",
           "table_cube_sum", "wide_deficit_bound", "wide_sd_block", "wide_sd_error_bound", "wide_sd_moments",
           "wide_sd_parts"]
