"""The series of :mod:`~mis_lightning.functional.wide_series` on a value table's own cells, one
window per block, from the table's prefix sums (method.md section 5, "The bounded window on value
tables").

A value-table grid (float8, float4, nf4: at most ``WIDE_TABLE_MAX_VALUES`` values ``v``, scale
``s``) with bounds ``[lower, upper]`` per block: take the window about the table's 0,
``[-H, H]``, ``H = max(|lower|, |upper|)`` (it holds the bounded one; the table's cells clipped
to the bounds, the regions beyond them revealed: no cells). In units of ``H`` each whole cell's
series sums (``int m^b t^a (m + t)^n dt``) are the table's own, in units of its largest magnitude
``vmax``, times ``lam^(b + a + n + 1)``, ``lam = s vmax / H``: so a window's sums are a difference
of the table's prefix sums, scaled, plus its two cut end cells computed directly
(:func:`table_window_coefficients`). Per element, with ``u0 = -theta / sigma`` and
``rho = H / sigma``, :func:`table_series_moments` reads the series of ``wide_series`` with the
same truncation and cell-mean bounds ``Es``, ``Ec``; its rounding bound is Cramer's: ``phi(u0)
|g_n| <= K phi(0) exp(-u0^2 / 4) rho^n / sqrt(n!)``, summed over ``n`` at most ``K phi(0) sqrt(2)
exp(rho^2 - u0^2 / 4)`` (Cauchy-Schwarz), times a per-window bound ``qb`` on the error of each
coefficient (the prefix sums' cancellation, the kinds' combination) plus float64's rounding of the
``N``-term sums and of the recurrence (``2^-48 N`` of the largest coefficient). ``m4``'s six kinds
enter as three combinations (``6 c^2 t^2 + 4 c t^3 + t^4`` with ``c = u0 + rho m``, by their power
of ``u0``).

All sums float64; ``kappa`` reads at least the exact cell sums' value, by at most ``err``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from . import gather as _gather
from .cells import _INV_SQRT_2PI
from .runs import per_table
from .wide_series import (
    _CRAMER,
    _KINDS,
    SERIES_TERMS,
    fourth_moment_error_terms,
    series_coefficients,
)

# sum_n phi(u0) |g_n| <= _GSUM exp(rho^2 - u0^2 / 4) (module doc)
_GSUM = _CRAMER * _INV_SQRT_2PI * math.sqrt(2.0)


@lru_cache(maxsize=32)
def _cell_plan(N: int, kinds: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(p, e, coef)`` ``[kinds, N, N]``: ``int_{|t| <= v/2} m^b t^a (m + t)^n dt = sum_i coef
    m^p v^(e + 1)`` over ``i`` (``binom(n, i) m^(b + n - i) int t^(a + i)``; odd powers of ``t``
    integrate to 0, so the terms of one ``n`` share a sign)."""
    P = N + 2
    n = torch.arange(N).unsqueeze(-1)
    i = torch.arange(N).unsqueeze(0)
    B = torch.tensor([[float(math.comb(a, b)) if b <= a else 0.0 for b in range(N)] for a in range(N)],
                     dtype=torch.float64)
    ps, es, cs = [], [], []
    for b, a in _KINDS[:kinds]:
        e = a + i
        ps.append((b + n - i).clamp(0, P).expand(N, N))
        es.append(e.expand(N, N))
        cs.append(B * (e % 2 == 0) / (2.0 ** e.to(torch.float64) * (e + 1)))
    return torch.stack(ps), torch.stack(es), torch.stack(cs)


def _cell_sums(lo: Tensor, hi: Tensor, N: int, kinds: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~mis_lightning.functional.wide_series.series_coefficients` of one cell ``[lo, hi]``
    per row (``[r]`` each, window units): ``([r, kinds, N], sum v^3 [r], sum v^5 [r])``."""
    m, v = 0.5 * (lo + hi), hi - lo
    p, e, coef = (t.to(m.device) for t in _cell_plan(N, kinds))
    mp = torch.cat([torch.ones_like(m).unsqueeze(-1), m.unsqueeze(-1).expand(-1, N + 2).cumprod(-1)], -1)
    vp = v.unsqueeze(-1).expand(-1, N + 4).cumprod(-1)  # v^(e + 1), e = 0 .. N + 3
    Q = (_gather.take(mp, p.reshape(-1), 1).view(-1, *p.shape) * _gather.take(vp, e.reshape(-1), 1).view(-1, *e.shape)
         * coef).sum(-1)
    return Q, vp[:, 2], vp[:, 4]


class SeriesTable:
    """Per-cell :func:`~mis_lightning.functional.wide_series.series_coefficients` of a value table's
    finite cells (edges ``mids``, the midpoints of consecutive values, in units of the table's
    largest magnitude ``vmax``) as prefix sums over the cells: ``prefix[i]`` ``[6, SERIES_TERMS]``
    the sum over cells ``j < i``, ``prefix_abs`` that of their magnitudes, ``p3`` / ``p5`` of their
    cubed / fifth-power widths; ``degree`` ``[6, SERIES_TERMS]`` each entry's power of the unit."""

    def __init__(self, values: Tensor, device: torch.device) -> None:
        self.values = values.detach().to(device=device, dtype=torch.float64).clone()
        v = self.values
        self.vmax = float(v.abs().max()) if v.numel() else 0.0
        self.mids = 0.5 * (v[1:] + v[:-1]) / (self.vmax if self.vmax > 0 else 1.0)
        # (once per table: series_coefficients' one-cell rows, ~6 ms for float8's 252 cells)
        Q, c3, c5 = series_coefficients(torch.stack([self.mids[:-1], self.mids[1:]], -1), SERIES_TERMS)
        z = Q.new_zeros(1, *Q.shape[1:])
        self.prefix = torch.cat([z, torch.cumsum(Q, 0)])
        self.prefix_abs = torch.cat([z, torch.cumsum(Q.abs(), 0)])
        self.p3 = torch.cat([c3.new_zeros(1), torch.cumsum(c3, 0)])
        self.p5 = torch.cat([c5.new_zeros(1), torch.cumsum(c5, 0)])
        n = torch.arange(SERIES_TERMS, dtype=torch.float64, device=device)
        self.degree = torch.stack([n + (b + a + 1) for b, a in _KINDS])


_SERIES_TABLES: dict = {}


def series_table(values: Tensor, device: torch.device) -> SeriesTable:
    """The :class:`SeriesTable` of ``values`` (``[V]`` sorted, finite; cached per table and device)."""
    return per_table(_SERIES_TABLES, values, device, SeriesTable)



def _window_cells(st: SeriesTable, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Each window's whole cells (``j0 <= cell < j1``; none where ``~some``) and its cut end cells
    ``[lower, a]``, ``[b, upper]`` (``[lower, upper]`` and one of width 0 where no edge lies
    inside), table units: ``(some, j0, j1, a, b)``."""
    nm = st.mids.numel()
    i0 = torch.searchsorted(st.mids, lower)  # the first edge >= lower
    i1 = torch.searchsorted(st.mids, upper, right=True) - 1  # the last edge <= upper
    some = i0 <= i1
    j0, j1 = i0.clamp(0, nm - 1), i1.clamp(0, nm - 1)
    a = torch.where(some, st.mids.index_select(0, j0), upper)
    b = torch.where(some, st.mids.index_select(0, j1), upper)
    return some, j0, j1, a, b


def table_window_cubes(st: SeriesTable, lower: Tensor, upper: Tensor, lam: Tensor) -> Tensor:
    """``[R]`` ``sum w_k^3`` of each window's cells in units of ``H`` (the ``c3`` of
    :func:`table_window_coefficients`; arguments as there)."""
    some, j0, j1, a, b = _window_cells(st, lower, upper)
    whole = torch.where(some, st.p3.index_select(0, j1) - st.p3.index_select(0, j0), 0.0).clamp_min(0.0)
    return (whole + (a - lower) ** 3 + (upper - b) ** 3) * lam**3


def table_window_coefficients(st: SeriesTable, lower: Tensor, upper: Tensor, lam: Tensor, N: int,
                              kappa_only: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per window ``(K, qb, c3, c5)`` for :func:`table_series_moments`.

    Args:
        st: the table's :class:`SeriesTable`.
        lower, upper: ``[R]`` each window's bounds in table units (parameter units over
            ``scale vmax``), ``lower < upper``.
        lam: ``[R]`` the table unit in units of ``H`` (``scale vmax / H``).
        N: the series' terms (at most ``SERIES_TERMS``).
        kappa_only: the first kind alone.

    Returns:
        ``K`` ``[k, N, R]`` (``k`` = 1 or 3): the kinds ``t^2``, ``3 m t^2 + t^3`` and ``6 m^2 t^2 +
        4 m t^3 + t^4`` (``int ... (m + t)^n dt`` summed over the cells), ``qb`` ``[k, R]`` a bound on
        each one's error in the per-element sum per unit of ``sum_n |g_n|`` (module doc), ``c3``,
        ``c5`` ``[R]`` the cells' summed cubed and fifth-power widths (units of ``H``).
    """
    some, j0, j1, a, b = _window_cells(st, lower, upper)
    kinds = 1 if kappa_only else 6
    pw = lam.view(-1, 1, 1) ** st.degree[:kinds, :N]  # [R, k6, N]
    keep = some.view(-1, 1, 1)
    whole = torch.where(keep, st.prefix.index_select(0, j1)[:, :kinds, :N] - st.prefix.index_select(0, j0)[:, :kinds, :N],
                        0.0) * pw
    a1 = torch.where(keep, st.prefix_abs.index_select(0, j1)[:, :kinds, :N]
                     + st.prefix_abs.index_select(0, j0)[:, :kinds, :N], 0.0) * pw
    R = lower.shape[0]
    lam2 = lam.repeat(2)
    Qe, c3e, c5e = _cell_sums(torch.cat([lower, b]) * lam2, torch.cat([a, upper]) * lam2, N, kinds)
    Q = whole + Qe[:R] + Qe[R:]
    # the prefix differences' rounding: 2^-50 (V + N) of the magnitudes summed into them
    dq = (2.0**-50 * (st.mids.numel() + N)) * a1 + 2.0**-50 * Q.abs()
    if kappa_only:
        K, E = Q, dq
    else:
        # kinds (0,2) (1,2) (2,2) (0,3) (1,3) (0,4) combined by their weights' power of u0
        K = torch.stack([Q[:, 0], 3.0 * Q[:, 1] + Q[:, 3], 6.0 * Q[:, 2] + 4.0 * Q[:, 4] + Q[:, 5]], 1)
        A = Q.abs()
        E = torch.stack([dq[:, 0], 3.0 * dq[:, 1] + dq[:, 3] + 2.0**-50 * (3.0 * A[:, 1] + A[:, 3]),
                         6.0 * dq[:, 2] + 4.0 * dq[:, 4] + dq[:, 5] + 2.0**-50 * (6.0 * A[:, 2] + 4.0 * A[:, 4] + A[:, 5])],
                        1)
    # + the N-term sums' and the recurrence's rounding: 2^-48 N of the largest coefficient
    qb = E.amax(-1) + 2.0**-48 * N * K.abs().amax(-1)  # [R, k]
    c3 = torch.where(some, st.p3.index_select(0, j1) - st.p3.index_select(0, j0), 0.0).clamp_min(0.0) * lam**3 \
        + c3e[:R] + c3e[R:]
    c5 = torch.where(some, st.p5.index_select(0, j1) - st.p5.index_select(0, j0), 0.0).clamp_min(0.0) * lam**5 \
        + c5e[:R] + c5e[R:]
    return K.permute(1, 2, 0).contiguous(), qb.t().contiguous(), c3, c5


def table_series_terms(rho_max: float, c3_max: float, tol: float) -> int:
    """The fewest even terms ``N`` (up to ``SERIES_TERMS``) whose truncation bound ``Es2`` (the
    ``wide_series`` module doc: ``K phi(0) rho^(N + 3) c3 / (12 sqrt(N!))`` at ``umin = 0``, ``c3``
    in units of the window) at ``rho_max`` and ``c3_max`` (the largest of a call's elements and
    windows: at least each element's) is at most ``tol``; ``SERIES_TERMS`` where none is."""
    f = _CRAMER * _INV_SQRT_2PI * rho_max**3 * c3_max / 12.0
    for N in range(4, SERIES_TERMS, 2):
        if rho_max**N / math.sqrt(math.factorial(N)) * f <= tol:
            return N
    return SERIES_TERMS


def _int_pow(x: Tensor, n: int) -> Tensor:
    """``x^n`` (``n >= 1``) by squaring: a few multiplications, not ``pow``'s ~25x one."""
    out, base = None, x
    while True:
        if n & 1:
            out = base if out is None else out * base
        n >>= 1
        if not n:
            return out
        base = base * base


def table_series_moments(u0: Tensor, rho: Tensor, gid: Tensor, K: Tensor, qb: Tensor, c3: Tensor, c5: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(kappa, err, m4, err4)`` ``[c]`` float64: the series (``wide_series`` module doc) of each
    element (``u0 = -theta / sigma``, ``rho = H / sigma`` at most 1/2, ``[c]``) on its window
    ``gid`` (``[c]`` long) of :func:`table_window_coefficients` (``K``, ``qb``, ``c3``, ``c5``);
    ``err`` / ``err4`` the bounds (absolute) on ``kappa`` / ``m4``; ``m4``, ``err4`` ``None`` where
    ``K`` holds the first kind alone (the same ``kappa`` and ``err``)."""
    k, N, _ = K.shape

    def at(v: Tensor) -> Tensor:  # (1-d gathers: ~6x faster than a column gather of [N, R])
        return v.index_select(0, gid)

    # S_j = sum_n g_n K_j,n with g_n = (-1)^n He_n(u0) rho^n / n! by He's recurrence
    # g_n = -(rho u0 g_(n-1) + rho^2 g_(n-2)) / n, summed as it goes
    S = [at(K[j, 0]) for j in range(k)]
    au = (rho * u0).neg_()
    r2 = rho * rho
    br = r2.neg()
    g_prev = g = None
    for n in range(1, N):
        if n == 1:
            g_new = au
        elif n == 2:
            g_new = torch.mul(au, g).add_(br).div_(2.0)
        else:
            g_new = torch.mul(au, g).addcmul_(br, g_prev).div_(float(n))
        g_prev, g = g, g_new
        for j in range(k):
            S[j].addcmul_(g, at(K[j, n]))
    u2 = u0 * u0
    phi = torch.exp(-0.5 * u2).mul_(_INV_SQRT_2PI)
    r3 = r2 * rho
    ua = u0.abs()
    M = ua + rho
    W = 2.0 * rho
    umin = (ua - rho).clamp_min_(0.0)
    e4 = torch.exp(umin.mul_(umin).mul_(-0.25))
    phimax = e4 * e4 * _INV_SQRT_2PI
    M2 = M * M
    grow = torch.exp(M * W)
    C3, C5 = at(c3).mul_(r3), at(c5).mul_(r3 * r2)
    tail = _int_pow(rho, N).mul_(e4).mul_(_CRAMER * _INV_SQRT_2PI / math.sqrt(math.factorial(N)))
    # >= phi sum_n |g_n| (module doc), exp(rho^2) <= exp(1/4): exp(-u0^2 / 4) = sqrt(phi sqrt(2 pi))
    gs = torch.sqrt(phi * math.sqrt(2.0 * math.pi)).mul_(_GSUM * math.exp(0.25))
    Er2 = gs * r3 * at(qb[0])
    Es2 = tail * C3 / 12.0
    Ec2 = phimax * M2 * grow * C5 / 144.0
    A2 = phi * r3 * S[0]
    kappa = (1.0 - A2 + Es2 + Ec2 + Er2).clamp_(0.0, 1.0)
    err = 2.0 * (Es2 + Er2) + Ec2
    if k == 1:
        return kappa, err, None, None
    r4, r5 = r3 * rho, r3 * r2
    # 6 c^2 t^2 + 4 c t^3 + t^4, c = u0 + rho m (t, m in the window's units): u0^2, u0, 1
    w0, w1, w2 = 6.0 * r3 * u2, 4.0 * r4 * u0, r5
    A4 = phi * (w0 * S[0] + w1 * S[1] + w2 * S[2])
    Er4 = gs * (w0 * at(qb[0]) + w1.abs() * at(qb[1]) + w2 * at(qb[2]))
    Es4, Ec4 = fourth_moment_error_terms(M, M2, W, grow, phimax, C5, Es2)
    m4 = 3.0 - A4 + 0.5 * Ec4
    return kappa, err, m4, Es4 + 0.5 * Ec4 + Er4


__all__ = ["SeriesTable", "series_table", "table_series_moments", "table_series_terms", "table_window_coefficients",
           "table_window_cubes"]
