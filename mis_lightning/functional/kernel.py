"""Shared kernels of the grid paths (method.md section 5): regime constants, the fine-grid
expansion, the uniform-grid ``(h, t)`` table, the branch-free fused kernel of affine grids
and its compile policy, and the windowed exact cell sums.

The compile policy is an argument (:class:`CompilePolicy`), decided by the caller: nothing
here reads the environment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from . import gather as _gather
from .cells import _INV_SQRT_2PI, SQRT_2_OVER_PI, CellMoments, _pdf, moments_from_alpha
from .fastpath import GUARD

# Edges further than this many standard deviations from theta carry < 1e-15 of kappa.
CUTOFF_SIGMAS = 8.5
# At or below this grid step (in standard deviations) the fine-grid expansion is used:
# kappa = 1 - h^2/12 + h^4/144 with error < 6e-4 h^6 (< 1e-5 at h = 0.5), measured
# against the full cell sum in tests/test_grids.py.
FINE_STEP = 0.5
# The widest window (edges each side) an exact sum goes to.
_MAX_WINDOW = 512
# Below this step (sd units) an exact sum would need more than _MAX_WINDOW edges each side:
# the reference paths use the fine-grid expansion there (error < 6e-4 h^6 < 1e-14).
REFERENCE_FINE_STEP = CUTOFF_SIGMAS / (_MAX_WINDOW - 1)


def _float64_inputs(theta: Tensor, sigma: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
    """``theta``, ``sigma`` (floored at the smallest positive float: ``sigma = 0`` means a frozen
    code, not a division by zero) and the grid tensors, all in float64."""
    sg = sigma.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    return (theta.to(torch.float64), sg, *(t.to(torch.float64) for t in rest))


# The fine-grid expansion's m4 to h^4: 3 - h^2/2 + 7 h^4/80 (the per-cell p mu^4 series, sympy,
# summed over a uniform grid: its h^4 density integrates to 7/80 over the line; exact m4 does not
# move with the position, ~1e-27). Error +0.0153 h^6 (2.3e-4 at h = 0.5) against -0.084 h^4 (5.2e-3)
# without; the fourth cumulant m4 - 3 kappa^2 the Gaussian form's diagnostic sums is +h^4/40 to
# leading order (without the term: -h^4/16). The end-cell forms add 7 h^4/80 P(a, b), continuous
# with it as the ends recede (their own error, O(h^2) near the ends, is unchanged; fx50).
# False: 3 - h^2/2 (A/B)
FINE_M4_H4 = True
_M4_H4 = 7.0 / 80.0


def fine_m4(h2: Tensor) -> Tensor:
    """The fine-grid expansion's ``m4`` (``[c]`` float64) from the squared step ``h2`` (sd units):
    ``3 - h^2/2 + 7 h^4/80`` (:data:`FINE_M4_H4`; ``3 - h^2/2`` without it)."""
    m4 = 3.0 - 0.5 * h2
    return m4 + _M4_H4 * (h2 * h2) if FINE_M4_H4 else m4


# The fine-grid expansion's mean_abs, sqrt(2/pi) - 0.05 h^2, is an average over theta's position in
# its own cell: off by up to +-0.05 h^2 (4e-3 at h = 0.29 on bf16 weights, tie48). The table paths'
# fine elements take own_cell_mean_abs instead, exact whatever the other cells (fx49). False: the
# expansion's (A/B)
EXACT_FINE_MEAN_ABS = True


def own_cell_mean_abs(lower: Tensor, upper: Tensor) -> Tensor:
    """``E|m|`` (``[c]`` float64) exactly from the own cell's edges in sd units (``lower <= 0 <=
    upper``, ``[c]`` each, ``-inf`` / ``inf`` for an unbounded cell): every other cell, and any
    region a bounded release gives away, lies on one side of 0, so its ``p |mu| = |int u phi|``
    and these telescope to ``phi(lower)`` below and ``phi(upper)`` above; the own cell adds
    ``|phi(lower) - phi(upper)|``. So ``E|m| = 2 max(phi(lower), phi(upper))`` for any partition
    (method.md section 3's ``mean_abs``), clamped to ``[0, sqrt(2/pi)]``."""
    return (2.0 * torch.maximum(_pdf(lower), _pdf(upper))).clamp(0.0, SQRT_2_OVER_PI)


# The affine grids' fine elements (the fused kernel, compiled and eager; the per-regime and
# reference paths; the fine form between a release's bounds, functional.bounds) take the same
# identity, E|m| = 2 phi(d) with d the distance to the nearest cell edge (affine_fine_mean_abs),
# not the expansion's average: 4.4e-3 off at h = 0.3, 1.2e-2 at h = 0.5 (fx49 found, fx50).
# False: the expansion's (A/B)
EXACT_AFFINE_MEAN_ABS = True


def affine_fine_mean_abs(th: Tensor, sg: Tensor, s: Tensor, zp: Tensor, qmin: Tensor | float,
                         qmax: Tensor | float) -> Tensor:
    """``E|m|`` (``[c]`` float64) exactly on an affine grid: ``2 phi(d)``, ``d`` the distance
    (sd units) from ``th`` to the nearest cell edge ``(k + 1/2 - zp) s``, ``k`` in ``[qmin,
    qmax - 1]`` (the clamped end cells have no outer edge). The nearest edge is always one of
    the own cell's, so this is :func:`own_cell_mean_abs`'s ``2 max(phi(lower), phi(upper))``
    (method.md section 3's ``mean_abs``, exact on any partition), with the own cell found from
    ``th``'s position modulo the step, not from a code (a weight outside its backend code's
    cell included). ``th``, ``sg`` (floored, > 0), ``s`` (> 0), ``zp``: ``[c]`` float64,
    parameter units; ``qmin < qmax``: the code range (numbers or 0-d tensors)."""
    # in place on one temporary (the fused kernel's hot path): the nearest edge, then d, then
    # 2 phi(d) = sqrt(2/pi) exp(-d^2/2), in [0, sqrt(2/pi)] (exp <= 1 for real d)
    e = (th / s).add_(zp).floor_().clamp_(qmin, qmax - 1).add_(0.5).sub_(zp).mul_(s)
    d = torch.sub(th, e, out=e).div_(sg)
    return d.square_().mul_(-0.5).exp_().mul_(SQRT_2_OVER_PI)


def fine_grid_moments(h: Tensor, lower: Tensor | None = None, upper: Tensor | None = None, *,
                      kappa_only: bool = False) -> CellMoments:
    """Cell moments of a fine uniform grid of step ``h`` (standard units).

    Far from the ends of the code range: ``kappa = 1 - h^2/12 + h^4/144`` (error < 6e-4 h^6);
    ``m4 = 3 - h^2/2 + 7 h^4/80`` (:func:`fine_m4`; error 0.0153 h^6); ``mean_abs = sqrt(2/pi)
    - 0.05 h^2``, an average over theta's position in its cell (the exact value moves with it by
    up to +-0.05 h^2, +-0.1 h^2 near the range ends): the grid paths replace it by the exact
    own-cell form, :func:`own_cell_mean_abs` / :func:`affine_fine_mean_abs`, which need the
    position this function is not given.

    ``lower``/``upper`` (standardised edges of the two unbounded end cells, ``-inf``/``+inf``
    when far): the interior ``(lower, upper)`` is a fine grid (``m ~ U`` with the same
    corrections, integrated over the interior) and the end cells are exact:
    ``kappa = I2 - (h^2/12 - h^4/144) P + phi(a)^2/Phi(a) + phi(b)^2/(1 - Phi(b))`` with
    ``P = Phi(b) - Phi(a)`` and ``Ik = int_a^b u^k phi(u) du``. This is what a weight whose
    standard deviation spans the whole code range needs (its window would be thousands of
    cells wide).

    ``kappa_only``: ``mean_abs`` and ``m4`` are not computed (NaN); ``kappa`` is bitwise the
    same (the same operations).
    """
    h2 = h.to(torch.float64) ** 2
    if lower is None and upper is None:
        kappa = 1.0 - h2 / 12.0 + h2 * h2 / 144.0
        if kappa_only:
            nan = torch.full_like(h2, math.nan)
            return CellMoments(kappa=kappa, mean_abs=nan, m4=nan, coverage=torch.ones_like(h2))
        mean_abs = SQRT_2_OVER_PI - 0.05 * h2
        return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=fine_m4(h2), coverage=torch.ones_like(h2))
    a = (torch.full_like(h2, -math.inf) if lower is None else lower.to(torch.float64))
    b = (torch.full_like(h2, math.inf) if upper is None else upper.to(torch.float64))
    if kappa_only:
        nan = torch.full_like(h2, math.nan)
        return CellMoments(kappa=_fine_with_ends_kappa(h2, a, b), mean_abs=nan, m4=nan,
                           coverage=torch.ones_like(h2))
    kappa, mean_abs, m4 = _fine_with_ends(h2, a, b)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=torch.ones_like(h2))


def _fine_with_ends(h2: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``kappa, mean_abs, m4`` of a fine grid (squared step ``h2``, sd units) whose interior
    ``(a, b)`` ends in two unbounded end cells (standardised edges; ``-inf``/``+inf``: no end
    within reach): see :func:`fine_grid_moments`. Elementwise only (the fused kernel inlines it)."""
    pa, pb = _pdf(a), _pdf(b)
    ca, cb = torch.special.ndtr(a), torch.special.ndtr(b)
    qb = torch.special.ndtr(-b)  # 1 - Phi(b) without cancellation
    P = (cb - ca).clamp_min(0.0)
    # u^k phi(u) vanishes at +-inf; write the finite-edge terms so inf * 0 never appears.
    ua = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    ub = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
    I2 = P - (ub * pb - ua * pa)
    I4 = 3.0 * P - ((ub**3 + 3 * ub) * pb - (ua**3 + 3 * ua) * pa)
    # int_a^b |u| phi = F(b) - F(a), F(u) = sign(u) (phi(0) - phi(u))
    I1 = torch.sign(b) * (_INV_SQRT_2PI - pb) - torch.sign(a) * (_INV_SQRT_2PI - pa)  # F(+-inf) = +-phi(0)
    end_k = torch.where(ca > 1e-300, pa * pa / ca.clamp_min(1e-300), torch.zeros_like(a)) + torch.where(
        qb > 1e-300, pb * pb / qb.clamp_min(1e-300), torch.zeros_like(b))
    mu_a = torch.where(ca > 1e-300, pa / ca.clamp_min(1e-300), torch.zeros_like(a))
    mu_b = torch.where(qb > 1e-300, pb / qb.clamp_min(1e-300), torch.zeros_like(b))
    kappa = (I2 - (h2 / 12.0 - h2 * h2 / 144.0) * P + end_k).clamp(0.0, 1.0)
    mean_abs = (I1 - 0.05 * h2 * P + pa + pb).clamp(0.0, SQRT_2_OVER_PI)
    m4 = I4 - 0.5 * h2 * I2 + ca * mu_a**4 + qb * mu_b**4
    if FINE_M4_H4:
        m4 = m4 + _M4_H4 * (h2 * h2) * P
    return kappa, mean_abs, m4


def _fine_with_ends_kappa(h2: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``kappa`` of :func:`_fine_with_ends` alone, by the same operations (bitwise equal; the
    bootstrap draws read nothing else): no ``mean_abs``, ``m4`` and their terms."""
    pa, pb = _pdf(a), _pdf(b)
    ca, cb = torch.special.ndtr(a), torch.special.ndtr(b)
    qb = torch.special.ndtr(-b)
    P = (cb - ca).clamp_min(0.0)
    # |x| < inf: isfinite's answer (NaN too) in 2 operations instead of 4
    ua = torch.where(a.abs() < math.inf, a, torch.zeros_like(a))
    ub = torch.where(b.abs() < math.inf, b, torch.zeros_like(b))
    I2 = P - (ub * pb - ua * pa)
    end_k = torch.where(ca > 1e-300, pa * pa / ca.clamp_min(1e-300), torch.zeros_like(a)) + torch.where(
        qb > 1e-300, pb * pb / qb.clamp_min(1e-300), torch.zeros_like(b))
    return (I2 - (h2 / 12.0 - h2 * h2 / 144.0) * P + end_k).clamp(0.0, 1.0)


# Elements per block of the eager element-wise kernels (the fused affine kernel here, the
# bounds' correction in bounds.py): ~100 element-wise operations each, whose chunk-sized
# temporaries (2^18 float64: 2 MiB each) ran 2-3x slower than cache-sized ones (measured on the
# 1e6 benchmark MLP's chunks, 1 thread: the outer-cell split 151 ns per element on the whole
# chunk, 66 / 55 / 49 / 47 / 52 ns in blocks of 2^12 / 2^13 / 2^14 / 2^15 / 2^16).
EAGER_BLOCK = 1 << 15


def in_blocks(kernel: Callable[..., tuple[Tensor, ...]], per_element: tuple[Tensor, ...], rest: tuple,
              block: int | None = None, **kw) -> tuple[Tensor, ...]:
    """``kernel(*per_element, *rest, **kw)`` of an element-wise kernel (every output ``[c]``,
    element ``i`` a function of element ``i`` of each ``per_element`` tensor alone), run on
    blocks of ``block`` (default ``EAGER_BLOCK``) elements and concatenated. The same numbers
    as one call up to the last bit: torch's vectorised transcendentals and its scalar loop for
    a tensor's last few elements may differ by an ulp, and which elements are last depends on
    the blocks (and on the subsets a kernel gathers)."""
    block = block or EAGER_BLOCK
    c = per_element[0].shape[0]
    if c <= block:
        return kernel(*per_element, *rest, **kw)
    parts = [kernel(*(t[s : s + block] for t in per_element), *rest, **kw) for s in range(0, c, block)]
    return tuple(torch.cat(p) for p in zip(*parts))


# ----------------------------------------------------------------- uniform-grid table
# On an infinite uniform grid the moments of an element depend only on the step h and the
# position t of theta in its cell (both in sd units): a 2-D table, computed once with the
# exact cell sums and read with bilinear interpolation, replaces ~2 h^-1 * 8.5 erfc/exp
# evaluations per element by four table reads.
TABLE_H_MAX = 19.0  # above: only the two own edges are within 8.5 sd
# How far (in cells) a weight may sit outside the cell of its given code and still be read
# from the table / two-edge form, which assume it inside (positions clamped to the cell):
# float32 rounding in the backends puts weights up to ~1e-5 cells outside (int8, |code| ~127);
# at 1e-4 cells the forms' extra error is <= 1.5e-6 (mean_abs; kappa and m4 unchanged) against
# exact cell sums, at 1e-3 it reaches 1.4e-4. Further out (bf16 arithmetic in HQQ: up to 0.19
# cells; a grid changed after its codes were taken; codes that are not the nearest) the element
# is recomputed exactly by the caller (``ok`` False): the table read 0.48 off at 0.1 cells.
OWN_CELL_SLACK = 1e-4
_TABLE_NH, _TABLE_NU = 256, 513
_TABLE: tuple[float, float, float, Tensor] | None = None


def _uniform_table_axes() -> tuple[float, float, float]:
    """``(lo, dlog, du)`` of :func:`_uniform_table`: its first ``log h``, its ``log h`` step and
    its ``|t| / h`` step (what the kernels read besides the table itself)."""
    lo, hi = math.log(FINE_STEP), math.log(TABLE_H_MAX)
    return lo, (hi - lo) / (_TABLE_NH - 1), 0.5 / (_TABLE_NU - 1)


def _uniform_table() -> tuple[float, float, float, Tensor]:
    global _TABLE
    if _TABLE is None:
        lo, hi = math.log(FINE_STEP), math.log(TABLE_H_MAX)
        logh = torch.linspace(lo, hi, _TABLE_NH, dtype=torch.float64)
        u = torch.linspace(0.0, 0.5, _TABLE_NU, dtype=torch.float64)
        vals = torch.empty(_TABLE_NH, _TABLE_NU, 3, dtype=torch.float64)
        hs = [math.exp(float(lk)) for lk in logh]
        windows = [math.ceil((CUTOFF_SIGMAS + 1.0) / hk) + 2 for hk in hs]
        # the rows of one window size M in one call (~20 calls, not 256): each row's edges and
        # sums are those of its own call (bitwise), only the Python and dispatch cost is shared
        for M in sorted(set(windows)):
            ks = [k for k, m in enumerate(windows) if m == M]
            hk = torch.tensor([hs[k] for k in ks], dtype=torch.float64).view(-1, 1, 1)
            i = torch.arange(-M, M, dtype=torch.float64)
            alpha = (i + 0.5) * hk - u.view(1, -1, 1) * hk  # [rows, NU, 2M] edges around t = u h
            inf = torch.full((len(ks), _TABLE_NU, 1), math.inf, dtype=torch.float64)
            mm = moments_from_alpha(torch.cat([-inf, alpha, inf], -1).reshape(len(ks) * _TABLE_NU, 2 * M + 2))
            vals[ks] = torch.stack([mm.kappa, mm.mean_abs, mm.m4], -1).reshape(len(ks), _TABLE_NU, 3)
        # Each entry holds its cell's four corners, so that a lookup is one gather of 12.
        pad = torch.cat([vals, vals[-1:]], 0)
        pad = torch.cat([pad, pad[:, -1:]], 1)
        corners = torch.cat([pad[:-1, :-1], pad[:-1, 1:], pad[1:, :-1], pad[1:, 1:]], -1)
        _TABLE = (*_uniform_table_axes(), corners.reshape(-1, 12))
    return _TABLE


def uniform_table_moments(h: Tensor, t: Tensor) -> CellMoments:
    """Moments on an infinite uniform grid of step ``h`` (``0.5 < h < 19``, sd units) for a
    weight at ``t`` from its cell's centre (``|t| <= h/2``), by bilinear interpolation in
    ``(log h, |t|/h)`` of a 256 x 513 table of exact cell sums (moments are even in ``t``)."""
    lo, dlog, du, table = _uniform_table()
    table = table.to(h.device)
    x = ((torch.log(h) - lo) / dlog).clamp(0.0, _TABLE_NH - 1 - 1e-9)
    y = ((t.abs() / h) / du).clamp(0.0, _TABLE_NU - 1 - 1e-9)
    i, j = x.floor(), y.floor()
    wx, wy = (x - i).unsqueeze(-1), (y - j).unsqueeze(-1)
    corners = table.index_select(0, (i * _TABLE_NU + j).long())  # [c, 12]
    v0 = torch.lerp(corners[:, 0:3], corners[:, 3:6], wy)
    v1 = torch.lerp(corners[:, 6:9], corners[:, 9:12], wy)
    v = torch.lerp(v0, v1, wx)
    return CellMoments(kappa=v[:, 0], mean_abs=v[:, 1], m4=v[:, 2], coverage=torch.ones_like(h))


def _table_read(h: Tensor, lower: Tensor, upper: Tensor, lo: Tensor, dlog: Tensor, du: Tensor,
                table: Tensor) -> Tensor:
    """``[c, 3]`` (kappa, mean_abs, m4) from the uniform-grid table in ``(log h, |t| / h)``,
    ``t`` the position from the cell centre (``h`` clamped to the table's range). An empty
    ``table`` (eager callers, :func:`~mis_lightning.functional.affine._kernel_table`) stands for
    :func:`_uniform_table`'s, built here at its first read."""
    if not torch.compiler.is_compiling() and table.numel() == 0:
        table = _uniform_table()[3].to(h.device)
    hc = h.clamp(FINE_STEP, TABLE_H_MAX)
    x = ((torch.log(hc) - lo) / dlog).clamp(0.0, _TABLE_NH - 1 - 1e-9)
    y = ((0.5 * (lower - upper).abs() / hc) / du).clamp(0.0, _TABLE_NU - 1 - 1e-9)
    i, j = x.floor(), y.floor()
    wx, wy = (x - i).unsqueeze(-1), (y - j).unsqueeze(-1)
    c = table[(i * _TABLE_NU + j).long()]
    v0 = c[:, 0:3] + wy * (c[:, 3:6] - c[:, 0:3])
    v1 = c[:, 6:9] + wy * (c[:, 9:12] - c[:, 6:9])
    return v0 + wx * (v1 - v0)


def _two_edges(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Moments when only the element's own two edges are within reach (``h >= 19``): cells
    ``(-inf, -lower], [-lower, upper], [upper, inf)`` in sd units."""
    pa, pb = _pdf(upper), _pdf(lower)
    qa, qb = torch.special.ndtr(-upper), torch.special.ndtr(-lower)
    pm = (1.0 - qa - qb).clamp_min(1e-300)
    dm = pb - pa
    zero = torch.zeros_like(lower)
    k_a = torch.where(qa > 1e-300, pa * pa / qa.clamp_min(1e-300), zero)
    k_b = torch.where(qb > 1e-300, pb * pb / qb.clamp_min(1e-300), zero)
    m_a = torch.where(qa > 1e-300, pa**4 / qa.clamp_min(1e-300) ** 3, zero)
    m_b = torch.where(qb > 1e-300, pb**4 / qb.clamp_min(1e-300) ** 3, zero)
    # an empty own cell (dm = 0: a weight of sd ~0 outside the cell of its backend code, which
    # rounded a float32 tie the other way) adds nothing: 0 / pm^3 was 0 / 0 (NaN m4) where pm
    # is floored at 1e-300; every other element's value is unchanged
    m_mid = torch.where(dm == 0, zero, dm**4 / pm**3)
    return (k_a + k_b + dm * dm / pm).clamp(0.0, 1.0), pa + pb + dm.abs(), m_a + m_b + m_mid


def _near_ends(h2: Tensor, to_min: Tensor, to_max: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fine steps whose sd reaches a clamped end: the fine interior and the two end cells
    exactly (:func:`_fine_with_ends`, as the per-regime path does)."""
    inf = torch.full_like(h2, math.inf)
    far_lo, far_hi = to_min > CUTOFF_SIGMAS, to_max > CUTOFF_SIGMAS
    return _fine_with_ends(h2, torch.where(far_lo, -inf, -to_min), torch.where(far_hi, inf, to_max))


def _near_ends_kappa(h2: Tensor, to_min: Tensor, to_max: Tensor) -> Tensor:
    """``kappa`` of :func:`_near_ends` alone (bitwise equal)."""
    inf = torch.full_like(h2, math.inf)
    far_lo, far_hi = to_min > CUTOFF_SIGMAS, to_max > CUTOFF_SIGMAS
    return _fine_with_ends_kappa(h2, torch.where(far_lo, -inf, -to_min), torch.where(far_hi, inf, to_max))


def _fused_affine(th: Tensor, sg: Tensor, s: Tensor, zp: Tensor, q0: Tensor, qmin: Tensor, qmax: Tensor,
                  lo: Tensor, dlog: Tensor, du: Tensor, table: Tensor, *,
                  kappa_only: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Moments of every element of an affine chunk.

    Frozen elements get 0, fine steps the expansion (with the end cells of the code range
    exact where the weight's sd reaches them: :func:`_near_ends`, the per-regime path's
    form; ``mean_abs`` exact, :func:`affine_fine_mean_abs`, with :data:`EXACT_AFFINE_MEAN_ABS`), steps in (0.5, 19) the table, larger steps the two-edge closed form (for weights
    inside the cell of their code ``q0``, up to ``OWN_CELL_SLACK`` cells: a weight further out
    is ``ok`` False unless its step is fine). Under
    ``torch.compile`` every form is computed for every element and selected with
    ``torch.where`` (branch-free: the whole function fuses into one loop); in eager mode each
    form runs only on its own elements (the same formulas per element: the self-check compares
    the two). Returns ``kappa, mean_abs, m4, ok`` where ``ok`` is False for the elements with a
    step above 0.5 sd whose cells reach a clamped end of the code range: the caller
    recomputes those exactly.

    ``kappa_only`` (eager only): ``mean_abs`` and ``m4`` are NaN, not computed; ``kappa`` is
    bitwise the same.
    """
    h = s / sg
    lower = (th - (q0 - 0.5 - zp) * s) / sg  # sd units to the element's own lower edge
    upper = ((q0 + 0.5 - zp) * s - th) / sg
    to_min = (th - (qmin + 0.5 - zp) * s) / sg
    to_max = ((qmax - 0.5 - zp) * s - th) / sg
    frozen = (lower > CUTOFF_SIGMAS) & (upper > CUTOFF_SIGMAS)
    interior = (to_min > CUTOFF_SIGMAS) & (to_max > CUTOFF_SIGMAS) & (q0 > qmin) & (q0 < qmax)
    h2 = h * h
    fine, big = h <= FINE_STEP, h >= TABLE_H_MAX
    near = fine & ~((to_min > CUTOFF_SIGMAS) & (to_max > CUTOFF_SIGMAS))
    zero = torch.zeros_like(h)
    # fine steps, far from the ends (cheap: every element)
    kappa = 1.0 - h2 / 12.0 + h2 * h2 / 144.0
    m4 = fine_m4(h2)
    if kappa_only and not torch.compiler.is_compiling():
        live = ~frozen
        for mask, form in ((live & ~fine & ~big, "table"), (live & big, "two"), (live & near, "near")):
            idx = torch.nonzero(mask).squeeze(-1)
            if idx.numel() == 0:
                continue
            sel = lambda t, ii=idx: t.index_select(0, ii)  # noqa: E731 - the values of t[idx]
            if form == "table":
                got = _table_read(sel(h), sel(lower), sel(upper), lo, dlog, du, table)[:, 0]
            elif form == "two":
                got = _two_edges(sel(lower), sel(upper))[0]
            else:
                got = _near_ends_kappa(sel(h2), sel(to_min), sel(to_max))
            kappa.index_copy_(0, idx, got)
        nan = torch.full_like(h, math.nan)
        return torch.where(frozen, zero, kappa), nan, nan, _ok(h, lower, upper, fine, frozen, interior, near)
    # fine steps' mean_abs: exact (the nearest edge; clamped ends too, near ones included), or the
    # expansion's average (and its end-cell form near the ends) with the switch off
    exact_ma = EXACT_AFFINE_MEAN_ABS
    mean_abs = affine_fine_mean_abs(th, sg, s, zp, qmin, qmax) if exact_ma else SQRT_2_OVER_PI - 0.05 * h2
    if torch.compiler.is_compiling():
        v = _table_read(h, lower, upper, lo, dlog, du, table)
        k2, l2, m2 = _two_edges(lower, upper)
        kn, ln, mn = _near_ends(h2, to_min, to_max)
        kappa = torch.where(fine, kappa, torch.where(big, k2, v[:, 0]))
        mean_abs = torch.where(fine, mean_abs, torch.where(big, l2, v[:, 1]))
        m4 = torch.where(fine, m4, torch.where(big, m2, v[:, 2]))
        kappa, m4 = torch.where(near, kn, kappa), torch.where(near, mn, m4)
        if not exact_ma:
            mean_abs = torch.where(near, ln, mean_abs)
    else:
        live = ~frozen
        for mask, form in ((live & ~fine & ~big, "table"), (live & big, "two"), (live & near, "near")):
            idx = torch.nonzero(mask).squeeze(-1)
            if idx.numel() == 0:
                continue
            sel = lambda t, ii=idx: _gather.take(t, ii)  # noqa: E731 - the values of t[idx]
            if form == "table":
                v = _table_read(sel(h), sel(lower), sel(upper), lo, dlog, du, table)
                got = (v[:, 0], v[:, 1], v[:, 2])
            elif form == "two":
                got = _two_edges(sel(lower), sel(upper))
            else:
                got = _near_ends(sel(h2), sel(to_min), sel(to_max))
                if exact_ma:  # (mean_abs exact already)
                    got = (got[0], None, got[2])
            for out, val in zip((kappa, mean_abs, m4), got):
                if val is not None:
                    _gather.put(out, idx, val)
    kappa, mean_abs, m4 = (torch.where(frozen, zero, t) for t in (kappa, mean_abs, m4))
    return kappa, mean_abs, m4, _ok(h, lower, upper, fine, frozen, interior, near)


def _ok(h: Tensor, lower: Tensor, upper: Tensor, fine: Tensor, frozen: Tensor, interior: Tensor,
        near: Tensor) -> Tensor:
    """The elements :func:`_fused_affine` computed: frozen ones, fine steps near the clamped ends,
    and interior ones whose step is fine (the expansion does not depend on the position) or
    whose weight lies in its own cell up to ``OWN_CELL_SLACK`` cells (the table and the
    two-edge form read the position clamped to the cell)."""
    own = torch.minimum(lower, upper) >= -OWN_CELL_SLACK * h
    return frozen | near | (interior & (fine | own))


def _fused_affine_codes(th: Tensor, sg: Tensor, s: Tensor, zp: Tensor, qmin: Tensor, qmax: Tensor,
                        lo: Tensor, dlog: Tensor, du: Tensor, table: Tensor, *,
                        kappa_only: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_fused_affine` with the round-to-nearest codes computed inside the same kernel."""
    frac = zp - torch.round(zp)
    q0 = torch.clamp(torch.round(th / s + frac) + (zp - frac), min=qmin, max=qmax)
    return (*_fused_affine(th, sg, s, zp, q0, qmin, qmax, lo, dlog, du, table, kappa_only=kappa_only), q0)


# torch.compile of the fused kernel: used once a process has pushed COMPILE_AFTER elements
# through it ("auto"), always or never, as the caller's CompilePolicy says (the front ends read
# it from MIS_LIGHTNING_COMPILE). Whatever the policy, the compiled kernel's output is checked
# against the eager kernel (fastpath.GUARD). The threshold is the break-even of the one-time
# compile: 6.4 s with a warm inductor cache (more when cold) against ~1.2e-7 s saved per
# element (docs/benchmarks.md, "Compile threshold"): ~5.6e7 elements. At 2e7 a fresh process
# scoring 2 schemes of a 1e6-weight MLP (2.1e7 elements) took 19.5 s compiled against 15.4 s eager.
COMPILE_AFTER = 100_000_000
_FUSED_STATE: dict[str, object] = {"elements": 0, "compiled": None, "compiled_codes": None, "failed": False}
# Name of the compiled path, as the self-check warnings print it.
COMPILED_PATH = "the torch.compile'd cell-moment kernel"

_ALWAYS, _NEVER = ("1", "true", "yes", "on", "always"), ("0", "false", "no", "off", "never")


@dataclass(frozen=True)
class CompilePolicy:
    """When the fused cell-moment kernel runs under ``torch.compile``.

    Attributes:
        mode: ``"auto"`` (once the process has pushed ``after`` elements through the kernel),
            ``"always"`` or ``"never"``.
        after: elements before ``"auto"`` compiles (compiling costs a few seconds once).

    Raises:
        ValueError: an unknown ``mode`` or a negative ``after``.
    """

    mode: Literal["auto", "always", "never"] = "auto"
    after: int = COMPILE_AFTER

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "always", "never"):
            raise ValueError(f"CompilePolicy.mode must be 'auto', 'always' or 'never', got {self.mode!r}")
        if self.after < 0:
            raise ValueError(f"CompilePolicy.after must be >= 0, got {self.after!r}")

    @classmethod
    def parse(cls, value: CompilePolicy | str | bool | None, source: str = "compile policy") -> CompilePolicy:
        """A policy from a policy, ``None`` (auto), a bool, or a string: ``"auto"``,
        ``"1"``/``"true"``/``"yes"``/``"on"``/``"always"``, ``"0"``/``"false"``/``"no"``/``"off"``/
        ``"never"`` (case-insensitive). ``source`` names the value in errors (e.g. an
        environment variable).

        Raises:
            ValueError: an unrecognised string.
        """
        if isinstance(value, CompilePolicy):
            return value
        if value is None:
            return cls()
        if isinstance(value, bool):
            return cls("always" if value else "never")
        v = str(value).strip().lower()
        if v == "auto":
            return cls()
        if v in _ALWAYS:
            return cls("always")
        if v in _NEVER:
            return cls("never")
        raise ValueError(f"{source} must be 'auto', one of {_ALWAYS} or one of {_NEVER}, got {value!r}")

    def wants(self, elements: int) -> bool:
        """Whether to compile after ``elements`` have gone through the kernel."""
        return self.mode == "always" or (self.mode == "auto" and elements > self.after)


def count_fused(size: int, least: int) -> None:
    """Count a call of ``size`` elements towards ``"auto"``'s threshold as the fused kernel does
    (calls of at least ``least`` elements, ``affine.TABLE_MIN_ELEMENTS``) where its caller
    computed them otherwise (``bounds.bounded_fine_moments``): the compile decision unchanged."""
    if size >= least:
        _FUSED_STATE["elements"] = int(_FUSED_STATE["elements"]) + size  # type: ignore[arg-type]


def compiled_due(size: int, policy: CompilePolicy | None = None) -> bool:
    """Whether a call of ``size`` elements would run the compiled fused kernel now
    (:func:`_fused_kernel`'s test, the element count left as it is)."""
    policy = policy or CompilePolicy()
    return policy.wants(int(_FUSED_STATE["elements"]) + size) and not _FUSED_STATE["failed"] \
        and COMPILED_PATH not in GUARD.disabled  # type: ignore[arg-type]


def _fused_kernel(c: int, with_codes: bool, policy: CompilePolicy | None = None):
    """The fused kernel to run on a chunk of ``c`` elements, and whether it is compiled."""
    policy = policy or CompilePolicy()
    _FUSED_STATE["elements"] = int(_FUSED_STATE["elements"]) + c  # type: ignore[arg-type]
    want = policy.wants(int(_FUSED_STATE["elements"]))  # type: ignore[arg-type]
    eager = _fused_affine if with_codes else _fused_affine_codes
    if not want or _FUSED_STATE["failed"] or COMPILED_PATH in GUARD.disabled:
        return eager, False
    key = "compiled" if with_codes else "compiled_codes"
    if _FUSED_STATE[key] is None:
        _FUSED_STATE[key] = torch.compile(eager, dynamic=True)
    return _FUSED_STATE[key], True


def windowed_moments(
    out: tuple[Tensor, Tensor, Tensor, Tensor],
    idx: Tensor,
    need: Tensor,
    windows: Iterable[int],
    rows_budget: int,
    edges: Callable[[Tensor, int], Tensor],
    theta: Tensor,
    sigma: Tensor,
    kernel: Callable[[Tensor], CellMoments] = moments_from_alpha,
    sums: Callable[[Tensor, int], CellMoments | None] | None = None,
    sums_budget: int = 0,
) -> None:
    """Exact cell sums of the elements ``idx``, grouped by the window they need (in place).

    Args:
        out: ``(kappa, mean_abs, m4, coverage)`` ``[c]`` float64 tensors, written at ``idx``.
        idx: ``[r]`` element indices; ``need``: ``[r]`` edges each side each one needs.
        windows: increasing half-widths; an element goes to the first that covers ``need``.
        rows_budget: floats per ``[rows, 2m + 2]`` working tensor (bounds memory).
        edges: ``edges(ii, m) -> [len(ii), 2m + 2]`` cell edges around elements ``ii``.
        theta, sigma: ``[c]`` float64 weights and standard deviations (parameter units).
        kernel: the cell sums of standardised edges ``[r, 2m + 2]`` (default
            :func:`~mis_lightning.functional.cells.moments_from_alpha`).
        sums: ``sums(ii, m)``: the moments of elements ``ii`` on their ``m`` window computed by
            the caller without ``edges`` (the stored cells' distinct edges,
            :func:`~mis_lightning.functional.distinct.table_window_moments`), or ``None``: the
            ``edges`` and ``kernel`` path for these rows.
        sums_budget: window edges per ``sums`` call (at least ``rows_budget``'s rows: its
            working tensors hold a window's distinct edges and one float per edge).
    """
    lo_bound = 0
    for m in windows:
        sel = (need > lo_bound) & (need <= m)
        lo_bound = m
        if not bool(sel.any()):
            continue
        group = idx[sel]
        step = max(1, rows_budget // (2 * m + 2))
        # (the caller's sums take more rows a call: a wide window's fixed costs shared)
        big = step if sums is None else max(step, sums_budget // (2 * m + 2))
        for a in range(0, group.numel(), big):
            jj = group[a : a + big]
            mm = None if sums is None else sums(jj, m)
            if mm is not None:
                for t, v in zip(out, (mm.kappa, mm.mean_abs, mm.m4, mm.coverage)):
                    t[jj] = v
                continue
            for b in range(0, jj.numel(), step):
                ii = jj[b : b + step]
                alpha = (edges(ii, m) - theta[ii].unsqueeze(-1)) / sigma[ii].unsqueeze(-1)
                mm = kernel(alpha)
                for t, v in zip(out, (mm.kappa, mm.mean_abs, mm.m4, mm.coverage)):
                    t[ii] = v
