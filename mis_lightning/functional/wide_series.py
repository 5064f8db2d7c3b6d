"""Cell moments of a weight whose sd spans its release's bounded window, on any partition of the
window into cells, as a Taylor series about the window's centre with a derived error bound
(method.md section 5, "The bounded window on stored grids").

Standardise ``u = (x - theta) / sigma``. The window ``[lower, upper]`` has centre ``u0`` and
half-width ``rho`` (sd units; ``W = 2 rho``), ``M = |u0| + rho`` bounds ``|u|`` on it and
``umin = max(|u0| - rho, 0)`` is its distance from the weight (0 when the weight lies inside;
a bootstrap draw may lie beyond a bound). The window is cut into cells ``k`` of width ``w_k`` and
midpoint ``c_k`` (the regions beyond the bounds are revealed: no deficit). With
``I_n = int t^n phi(c_k + t) dt`` over ``|t| <= w_k / 2`` and ``delta_k = I_1 / I_0`` (the cell
mean's offset from ``c_k``), exactly (expand ``(c + t)^2``, ``(c + t)^4`` and ``(c + delta)^4``)

* ``1 - kappa = D2 = sum_k I_2 - I_0 delta_k^2``,
* ``3 - m4 = D4 = sum_k int g_k(t) phi(c_k + t) dt - I_0 (6 c^2 delta^2 + 4 c delta^3 + delta^4)``,
  ``g_k(t) = 6 c_k^2 t^2 + 4 c_k t^3 + t^4 = t^2 (6 c^2 + 4 c t + t^2) >= 0``.

The subtracted terms are ``>= 0`` (``6 c^2 + 4 c delta + delta^2 > 0``) and small: on a cell
``phi`` varies by at most ``exp(M w)`` and ``|phi'| <= M phi``, so ``|delta_k| <= d1 w_k^2``,
``d1 = M exp(M W) / 12``, and they total at most ``Ec2 = phi(umin) M^2 exp(M W) C5 / 144`` and
``Ec4 = phi(umin) C5 d1^2 (6 M^2 + 4 M d1 W^2 + d1^2 W^4)`` (``C5 = sum w_k^5``).

The linear parts take ``phi(u0 + s) = phi(u0) sum_{n<N} (-1)^n He_n(u0) s^n / n!`` (``s``: the
position about the window's centre, ``|s| <= rho``), whose remainder is at most
``K phi(0) exp(-umin^2 / 4) rho^N / sqrt(N!)`` (Cramer's inequality ``|He_n(x)| exp(-x^2/4)
<= K sqrt(n!)``, ``K = 1.086435``), on integrands ``>= 0`` (``t^2``, ``g_k``), so the truncated sums
``A2``, ``A4`` miss the linear parts by at most ``Es2`` = that times ``C3 / 12`` and ``Es4 = Es2
(6 M^2 + 2 M W + W^2 / 4)`` (``sum int g_k <= (6 M^2 + 2 M W + W^2/4) C3 / 12``). With ``Er``, a
bound on the float64 rounding of each sum (``2^-50 N`` times its terms' absolute sum):

    kappa = 1 - A2 + Es2 + Ec2 + Er2    reads at least the exact kappa, by at most 2 Es2 + Ec2 + 2 Er2,
    m4 = 3 - A4 + Ec4 / 2               within Es4 + Ec4 / 2 + Er4 of the exact m4.

``A2``, ``A4`` are sums over the cells of polynomials in their midpoints and widths: in units of
the window's half-width about its centre (``m_k``, ``v_k``), per window the sums
``sum_k m_k^p int_{|t| <= v_k/2} t^e dt`` (:func:`series_coefficients`, once per window, which
depend on the window's cells alone), and per element its ``u0`` and ``rho``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from .cells import _INV_SQRT_2PI

# terms N of the series at most (even); an element whose bound needs more keeps the exact sums.
# At rho = 1/2 (W = 1 sd) 24 terms leave 3e-17 of the Sheppard term C3 / 12
SERIES_TERMS = 24
# the series is taken where the bounded window is at most this many sd wide ...
SERIES_MAX_WINDOW = 1.0
# ... and its centre at most this many of its half-widths' sd-units squared from the weight
# (rho |u0| <= 4): the alternating terms (rho u0)^n / n! then stay below ~11 for a sum ~e^-4,
# a cancellation of ~2^9 against float64's 2^-53 (a draw 8.5 sd beyond a window 1 sd wide)
SERIES_MAX_SHIFT = 4.0
# ... and where its derived error bound on kappa (and on m4 where m4 is kept) is at most this; its
# truncation takes at most a 16th of it. Not functional.wide.WIDE_TOL (1e-8 since p55b): the
# terms chosen for kappa's bound at a looser figure leave m4's own bound above it on bf16 blocks
# (tests/test_stored_wide_series.py), which would send m4 to the exact stored-cell sums, the
# path this form replaced (docs/method.md section 5, "The bounded window on stored grids", "p43b")
SERIES_TOL = 1e-11
# Cramer's constant: |He_n(x)| exp(-x^2 / 4) <= K sqrt(n!) for every n and x
_CRAMER = 1.086435
# the terms' kinds h(m, t) of A2 and A4: (power of m, power of t)
_KINDS = ((0, 2), (1, 2), (2, 2), (0, 3), (1, 3), (0, 4))


@lru_cache(maxsize=8)
def _binomials(N: int) -> Tensor:
    """``[N, N]`` float64: ``binom(n, i)`` (0 for ``i > n``)."""
    return torch.tensor([[float(math.comb(n, i)) if i <= n else 0.0 for i in range(N)] for n in range(N)],
                        dtype=torch.float64)


def series_terms(rho: Tensor, factor: Tensor, tol: float) -> int:
    """The fewest even terms ``N`` (up to :data:`SERIES_TERMS`) whose truncation bound
    ``rho^N / sqrt(N!) factor`` is at most ``tol`` for every element (``rho``, ``factor``:
    ``[c]``, ``factor`` the rest of ``Es2``, module doc); :data:`SERIES_TERMS` where none is
    (those elements then fail their error bound)."""
    for N in range(4, SERIES_TERMS, 2):
        if bool((rho**N / math.sqrt(math.factorial(N)) * factor <= tol).all()):
            return N
    return SERIES_TERMS


def series_coefficients(edges: Tensor, N: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per window ``(Q, c3, c5)``.

    Args:
        edges: ``[R, K]`` float64 sorted cell edges of each window in its own units (``(x -
            x0) / H``, the bounds at ``-1`` and ``1`` first and last; cells of width 0 allowed).
        N: the series' terms.

    Returns:
        ``Q`` ``[R, 6, N]``: ``sum_k int_{|t| <= v_k/2} m_k^b t^a (m_k + t)^n dt`` for the kinds
        ``(b, a)`` of ``_KINDS`` and ``n < N``; ``c3``, ``c5`` ``[R]``: ``sum v_k^3``, ``sum v_k^5``.
    """
    v = torch.diff(edges, dim=-1)
    m = 0.5 * (edges[:, 1:] + edges[:, :-1])
    P, E = N + 2, N + 4
    mp = torch.stack([m**p for p in range(P + 1)], -1)  # [R, K, P+1]
    # int t^e dt over |t| <= v/2: v^(e+1) / (2^e (e + 1)) for even e, 0 for odd
    te = torch.stack([v ** (e + 1) / (2.0**e * (e + 1)) if e % 2 == 0 else torch.zeros_like(v)
                      for e in range(E + 1)], -1)  # [R, K, E+1]
    S = torch.einsum("rkp,rke->rpe", mp, te)  # sum_k m^p int t^e
    B = _binomials(N).to(edges.device)
    Q = []
    if SERIES_FLAT_GATHER:
        # each kind's [R, N, N] gather as one index_select over S's flattened (p, e) entries: the
        # same values in the same layout (contiguous [R, N, N]), so the same sums
        flat = S.reshape(S.shape[0], (P + 1) * (E + 1))
        for idx in _kind_gathers(N, P, E).to(edges.device):
            Q.append((flat.index_select(1, idx).view(S.shape[0], N, N) * B).sum(-1))
    else:
        n = torch.arange(N, device=edges.device).unsqueeze(-1)
        i = torch.arange(N, device=edges.device).unsqueeze(0)
        for b, a in _KINDS:
            # sum_i binom(n, i) sum_k m^(b + n - i) int t^(a + i)
            p_idx = (b + n - i).clamp(0, P)
            Q.append((S[:, p_idx, (a + i).expand_as(p_idx)] * B).sum(-1))
    return torch.stack(Q, 1), te[:, :, 2].sum(-1) * 12.0, te[:, :, 4].sum(-1) * 80.0


# series_coefficients gathers each kind's S[:, p(n, i), e(i)] by one index_select over S's
# flattened (p, e) entries (p46c/p48c: aten::index with two index tensors took ~2.4 ms a kind for
# float8's 251-cell table, a first call's one-time cost); False: advanced indexing (A/B, the same
# values)
SERIES_FLAT_GATHER = True


@lru_cache(maxsize=8)
def _kind_gathers(N: int, P: int, E: int) -> Tensor:
    """``[len(_KINDS), N * N]`` long: per kind ``(b, a)`` the flat index ``p * (E + 1) + e`` of
    ``S[:, p, e]`` (``S``: ``[R, P + 1, E + 1]``) for ``p = clamp(b + n - i, 0, P)``, ``e = a + i``,
    row-major over ``(n, i)``."""
    n = torch.arange(N).unsqueeze(-1)
    i = torch.arange(N).unsqueeze(0)
    return torch.stack([((b + n - i).clamp(0, P) * (E + 1) + (a + i)).reshape(-1) for b, a in _KINDS])


def series_moments(u0: Tensor, rho: Tensor, Q: Tensor, c3: Tensor, c5: Tensor, kappa_only: bool
                   ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(kappa, err, m4, err4)`` ``[c]`` float64 of the module doc: each element's window centre
    ``u0`` and half-width ``rho`` (sd units) and its window's :func:`series_coefficients`
    (gathered: ``Q`` ``[c, 6, N]``, or ``[c, 1, N]``, the first kind alone, when ``kappa_only``;
    ``c3``, ``c5`` ``[c]``); ``err``, ``err4``: the bounds (absolute) on ``kappa`` and ``m4``.
    ``kappa_only``: ``m4`` and ``err4`` are ``None`` (``kappa`` and ``err`` bitwise the same)."""
    N = Q.shape[-1]
    # g_n = (-1)^n He_n(u0) rho^n / n!, by He's recurrence: g_(n+1) = -(rho u0 g_n + rho^2 g_(n-1)) / (n + 1)
    g = [torch.ones_like(u0), -rho * u0]
    r2 = rho * rho
    for k in range(1, N - 1):
        g.append(-(rho * u0 * g[k] + r2 * g[k - 1]) / (k + 1))
    G = torch.stack(g[:N], -1)  # [c, N]
    phi = _INV_SQRT_2PI * torch.exp(-0.5 * u0 * u0)
    M = u0.abs() + rho
    W = 2.0 * rho
    umin = (u0.abs() - rho).clamp_min(0.0)
    phimax = _INV_SQRT_2PI * torch.exp(-0.5 * umin * umin)
    M2, r3 = M * M, r2 * rho
    C3, C5 = c3 * r3, c5 * r3 * r2
    grow = torch.exp(M * W)
    tail = _CRAMER * _INV_SQRT_2PI * torch.exp(-0.25 * umin * umin) * rho**N / math.sqrt(math.factorial(N))
    rnd = 2.0**-50 * N
    t2 = G * Q[:, 0]
    A2 = phi * r3 * t2.sum(-1)
    Er2 = rnd * phi * r3 * t2.abs().sum(-1)
    Es2 = tail * C3 / 12.0
    Ec2 = phimax * M2 * grow * C5 / 144.0
    kappa = (1.0 - A2 + Es2 + Ec2 + Er2).clamp(0.0, 1.0)
    err = 2.0 * (Es2 + Er2) + Ec2
    if kappa_only:
        return kappa, err, None, None
    # g_k = 6 c^2 t^2 + 4 c t^3 + t^4 with c = u0 + rho m (t, m in the window's units; t^e: rho^e)
    r4, r5 = r3 * rho, r3 * r2
    w = torch.stack([6.0 * r3 * u0 * u0, 12.0 * r4 * u0, 6.0 * r5, 4.0 * r4 * u0, 4.0 * r5, r5], -1)  # [c, 6]
    t4 = G.unsqueeze(1) * Q * w.unsqueeze(-1)
    A4 = phi * t4.sum((-1, -2))
    Er4 = rnd * phi * t4.abs().sum((-1, -2))
    Es4, Ec4 = fourth_moment_error_terms(M, M2, W, grow, phimax, C5, Es2)
    m4 = 3.0 - A4 + 0.5 * Ec4
    return kappa, err, m4, Es4 + 0.5 * Ec4 + Er4



def fourth_moment_error_terms(M: Tensor, M2: Tensor, W: Tensor, grow: Tensor | float, phimax: Tensor | float,
                              C5: float, Es2: Tensor) -> tuple[Tensor, Tensor]:
    """The fourth moment's truncation and curvature error terms ``(Es4, Ec4)`` of the series
    (docs/method.md section 5, "The bounded window on stored grids"), from kappa's ``Es2`` and the window's ``M``, ``M^2``,
    ``W``, growth ``grow``, density bound ``phimax`` and ``C5``: shared by the stored grids' series
    and the value tables' (:mod:`~mis_lightning.functional.wide_table`)."""
    d1 = M * grow / 12.0
    Es4 = Es2 * (6.0 * M2 + 2.0 * M * W + 0.25 * W * W)
    Ec4 = phimax * C5 * d1 * d1 * (6.0 * M2 + 4.0 * M * d1 * W * W + d1 * d1 * W**4)
    return Es4, Ec4

__all__ = ["SERIES_MAX_SHIFT", "SERIES_MAX_WINDOW", "SERIES_TERMS", "SERIES_TOL", "fourth_moment_error_terms", "series_coefficients",
           "series_moments", "series_terms"]
