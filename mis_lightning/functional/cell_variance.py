"""The finite cells' summed variance ``V = sum_k p_k Var_k`` of a symmetric float format's value
table under a normal whose sd dwarfs every finite cell (method.md section 5): the term a cast's
overflow cells leave to the finite ones (``table._open_overflow_kappa``: fp16 bootstrap draws
beyond +-65520, sds of 2e4-2e8 on the 1e7 MLP's second layer, whose exact windows cost ~1.5 us an
element).

Standard units ``u = u0 + r x`` (``x`` in units of the scale, ``u0 = -theta / sd``, ``r = scale /
sd``). A cell of width ``w`` (sd units) centred at ``c`` has ``p Var = p w^2 / 12 - p w^4 (6 c^2 +
4) / 1440 + O(w^6)`` (:mod:`~mis_lightning.functional.runs`' series divided by ``p``), so with
``s(x)`` the width of the cell holding ``x`` (scale units)

    V = (r^3 / 12) int s(x)^2 phi(u0 + r x) dx - (r^5 / 1440) int s(x)^4 (6 u^2 + 4) phi(u) dx + O((r w_max)^6)

(``w_max`` the widest finite cell; the ``w^4`` term alone is at most ``(r w_max)^4 / 144``: 1.1e-13
at fp16's top cell and sd 16,000, measured 4.6e-14; the rest below 1e-17 there). The integrals
split at a run edge ``X`` (:class:`~mis_lightning.functional.runs.RunTable`; the table is
symmetric, so ``-X`` is one too), the largest with ``r X <= CORE_SPAN``:

* the core ``[-X, X]``: ``phi``'s Taylor series about ``u0``, ``phi^(n)(u0) = (-1)^n He_n(u0)
  phi(u0)`` (and ``(6 u^2 + 4) phi = 6 phi'' + 10 phi``), against the table's moments ``int_{-X}^{X}
  s^j x^n dx`` (``j`` 2 and 4; odd ``n`` 0) to ``n = CORE_TERMS``, ``t = r X``. Its truncation is
  below ``0.4335 t^n / sqrt(n!)`` of ``r^3 M_0 / 12`` per term (Cramer's bound ``|He_n(u)|
  exp(-u^2 / 4) <= 1.0865 sqrt(n!)``): ``2^42 / sqrt(42!) ~ 1.2e-13`` of a term at most ~3e-7;
* the runs outside it on both sides (fp16 at sd >= 16,000: at most three a side): each run's
  probability and ``int u^2 phi`` from the smaller tails, as the run sums
  (:func:`~mis_lightning.functional.runs.run_moments`).

Measured: within 1e-15 of 40-digit sums over every cell (docs/benchmarks.md, "p48a").

Tensors ``[c]`` float64 throughout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .cells import _pdf, column_sums
from .runs import per_table, run_table

# Half-width of the Taylor core in sd units (its truncation bound above holds up to 2)
CORE_SPAN = 2.0
# The highest (even) power of the core's series at t = CORE_SPAN
CORE_TERMS = 40
# The neglected terms' bound, 0.4335 sum_{n > N} t^n / sqrt(n!), relative to r^3 M_0 / 12 (itself at
# most (r w_max)^2 t / 6 < 1e-6), at t = CORE_SPAN with N = CORE_TERMS (every element takes all of them)
CORE_TOL = 1e-12


def _tail_bound(t: float, n_max: int) -> float:
    return 0.4335 * sum(t**n / math.sqrt(math.factorial(n)) for n in range(n_max + 2, n_max + 80, 2))


# the series to CORE_TERMS meets CORE_TOL over the whole core (one bound at its widest t; rv48: the
# bisection of the largest t per power that stood here ran at import, ~25 ms CPU, its table unused)
assert _tail_bound(CORE_SPAN, CORE_TERMS) <= CORE_TOL


class VarianceTable:
    """What :func:`finite_cell_variance` reads of one value table: the run table's positive
    edges ``X_k`` (scale units), the moments ``coef[k, m] = M_2m(X_k) / (X_k^2m (2m)!)`` of the
    cores ``[-X_k, X_k]`` (float64, ``[K, CORE_TERMS / 2 + 1]``), each run's step beyond ``X_k``,
    and ``w_max`` (the widest finite cell). ``ok`` is False where the table is not symmetric about
    0 with a central run holding it (then nothing else is set)."""

    def __init__(self, values: Tensor, device: torch.device) -> None:
        self.values = values.detach().to(device=device, dtype=torch.float64).clone()
        rt = run_table(values, torch.device("cpu"))
        e, h = rt.edges.numpy(), rt.steps.numpy()
        n_runs = h.size
        mid = n_runs // 2  # the central run (holding 0) of a symmetric table
        self.ok = bool(n_runs % 2 == 1 and np.array_equal(e, -e[::-1]) and np.array_equal(h, h[::-1])
                       and e[mid] < 0.0 < e[mid + 1])
        if not self.ok:
            return
        x = e[mid + 1:]  # positive edges X_0 < X_1 < ... (X_0 the central run's)
        steps = h[mid:]  # steps[0]: the central run; steps[k]: the run [X_{k-1}, X_k]
        powers = np.arange(0, CORE_TERMS + 1, 2)
        fact = np.array([math.factorial(int(p)) for p in powers], dtype=np.float64)
        coef = np.empty((2, x.size, powers.size))
        for k in range(x.size):
            # int_0^{X_k} s^j x^p dx in units of X_k^(p + 1): the central half-run then the runs up to X_k
            lo = np.concatenate([[0.0], x[:k]]) / x[k]
            hi = x[: k + 1] / x[k]
            span = (hi[:, None] ** (powers + 1) - lo[:, None] ** (powers + 1)) * (x[k] / (powers + 1) / fact)
            for i, j in enumerate((2, 4)):  # M_p / (X_k^p p!), both halves (even p)
                coef[i, k] = 2.0 * (steps[: k + 1, None] ** j * span).sum(0)
        self.edges = torch.from_numpy(x.copy()).to(device)
        self.coef_t = torch.from_numpy(coef[0].T.copy()).to(device)  # [powers, K]
        self.coef4_t = torch.from_numpy(coef[1].T.copy()).to(device)
        self.outer_steps = torch.from_numpy(steps[1:].copy()).to(device)  # run [X_{k-1}, X_k]: index k - 1
        self.w_max = float(h.max())


_TABLES: dict[tuple[int, int, str], VarianceTable] = {}


def variance_table(values: Tensor, device: torch.device) -> VarianceTable:
    """The :class:`VarianceTable` of ``values`` (cached per table and device)."""
    return per_table(_TABLES, values, device, VarianceTable)


# |u0| beyond which the core's density is 0 in float64 (phi(38.5) underflows): the series takes u0
# clamped here (its He_n stay finite; phi(+-60) is 0 either way)
_U_MAX = 60.0
# elements per block of the series' [powers, block] temporaries
_BLOCK = 1 << 14


def finite_cell_variance(u0: Tensor, r: Tensor, vt: VarianceTable) -> Tensor:
    """``V`` of the module doc (``[c]`` float64, sd^2 units, to ``O((r w_max)^6)``) for standard
    offsets ``u0 = -theta / sd`` and ``r = scale / sd`` (``[c]`` each, finite, ``r > 0`` with ``r
    X_0 <= CORE_SPAN``: the caller's range; raises ``ValueError`` otherwise) on the table of ``vt``
    (``vt.ok``). Element-wise: an element's value does not depend on the call's others."""
    if not vt.ok:
        raise ValueError("finite_cell_variance: the table is not symmetric about a central run")
    # the core's edge per element: the largest X_k with r X_k <= CORE_SPAN
    k = torch.searchsorted(vt.edges, CORE_SPAN / r, right=True) - 1
    if bool((k < 0).any()) or not bool(torch.isfinite(u0).all()):
        raise ValueError("finite_cell_variance: an element's sd is below its table's central run or u0 not finite")
    out = torch.empty_like(u0)
    for a in range(0, u0.numel(), _BLOCK):
        sl = slice(a, a + _BLOCK)
        out[sl] = _variance_block(u0[sl], r[sl], k[sl], vt)
    return out


def _variance_block(u0: Tensor, r: Tensor, k: Tensor, vt: VarianceTable) -> Tensor:
    """:func:`finite_cell_variance` of one block (``k``: each element's core edge index)."""
    n_edges = vt.edges.numel()
    r2 = r.square()
    t2 = (r * vt.edges.index_select(0, k)).square()
    c2, c4 = vt.coef_t.index_select(1, k), vt.coef4_t.index_select(1, k)  # [powers, b]: each element's core
    # the core: sum_n He_n(u0) t^n c2_n / 12 - r^2 sum_n (6 He_(n+2) + 10 He_n) t^n c4_n / 1440 over
    # even n (the w^4 term: (6 u^2 + 4) phi = 6 phi'' + 10 phi), times r^3 phi(u0); He by its
    # recurrence He_(n+1) = u He_n - n He_(n-1), the sums as it goes
    u = u0.clamp(-_U_MAX, _U_MAX)
    he_prev, he = torch.ones_like(u), u
    acc2, g = c2[0].clone(), c4[0]  # g: t^n c4_n of the last even n, waiting for He_(n+2)
    acc4 = 10.0 * g
    tn = torch.ones_like(u)
    for n in range(1, CORE_TERMS + 2):
        he_prev, he = he, torch.mul(he_prev, -float(n)).addcmul_(u, he)  # He_(n+1)
        if n % 2 == 0:
            continue
        m = (n + 1) // 2  # He_(2m) now
        acc4.addcmul_(he, g, value=6.0)
        if m < c2.shape[0]:
            tn = tn * t2
            a = he * tn
            acc2.addcmul_(a, c2[m])
            g = tn * c4[m]
            acc4.addcmul_(he, g, value=10.0)
    v = r * r2 * _pdf(u0) * (acc2 / 12.0 - r2 * acc4 / 1440.0)
    k_min = int(k.min())
    if k_min + 1 < n_edges:
        # the runs beyond each element's core, both sides: runs k + 1 .. (edges X_k .. X_(K-1)),
        # padded to the block's most by zero-width runs at the table's end (which add exactly 0)
        j = k.unsqueeze(0) + torch.arange(n_edges - k_min, device=k.device).unsqueeze(-1)  # [m + 1, b]
        xe = vt.edges[j.clamp(max=n_edges - 1)]
        w2 = torch.where(j[:-1] < n_edges - 1, vt.outer_steps[j[:-1].clamp(max=n_edges - 2)].square(), 0.0)
        rw2 = r2 * w2
        for sign in (1.0, -1.0):
            e = torch.addcmul(u0, r, xe, value=sign)  # increasing along dim 0 (sign 1) or decreasing
            lo, hi = (e[:-1], e[1:]) if sign > 0 else (e[1:], e[:-1])
            q_lo, q_hi, p_lo, p_hi = _tails(lo), _tails(hi), _pdf(lo), _pdf(hi)
            prob = torch.where(lo > 0, q_lo - q_hi, torch.where(hi <= 0, q_hi - q_lo, 1.0 - q_lo - q_hi)).clamp_min(0.0)
            i2 = prob - (hi * p_hi - lo * p_lo)  # int u^2 phi over each run
            v = v + column_sums(rw2 * (prob / 12.0 - rw2 * (6.0 * i2 + 4.0 * prob) / 1440.0))
    return v


def _tails(a: Tensor) -> Tensor:
    return torch.special.ndtr(-a.abs())


__all__ = ["CORE_SPAN", "CORE_TERMS", "VarianceTable", "finite_cell_variance", "variance_table"]
