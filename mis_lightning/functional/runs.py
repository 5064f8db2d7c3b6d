"""Closed-form cell moments over runs of equal cells of a value table (float formats).

A float format's cells are equal within a binade (bfloat16: 128 per binade, float16: 1,024,
float8 e4m3: 8) and change width only at binade edges. A weight whose sd is small against its
magnitude but large against the cells (bf16 / fp16 weights of a well-trained model: sigma ~0.1
of the weight) has hundreds of cells within 8.5 sd, spread over a few binades: the exact sums
evaluated every one of them (bf16 at 1e5 weights/s, 100x an integer grid). Here each maximal
run of equal cells (a binade's interior, or the single cell straddling a binade edge) is summed
in closed form, so the cost is per run, not per cell (method.md section 5).

The per-cell series (standard units, cell of width ``w`` and centre ``c``; ``table.py``):

    p mu^2 = int_cell u^2 phi - phi(c) g2(c),  g2 = w^3/12 - w^5 (c^2 + 9)/1440
                         + w^7 (17 c^4 + 94 c^2 + 135)/483840
                         - w^9 (47 c^6 + 433 c^4 + 943 c^2 + 525)/58060800
    p mu^4 = int_cell u^4 phi - phi(c) g4(c),  g4 = w^3 c^2/2 - w^5 (c^4 + 21 c^2 - 3)/240
                         + w^7 (51 c^6 + 482 c^4 + 1755 c^2 - 270)/241920
                         - w^9 (47 c^8/9676800 + 2279 c^6/29030400 + 47 c^4/151200
                                + 7 c^2/18432 - 1/18432)

summed over the ``K`` cells of a run ``[A, B]`` of width ``h`` by the midpoint Euler-Maclaurin
formula (``f = phi g``, ``D p = p' - u p`` so that ``(phi p)' = phi D p``):

    h sum_k f(c_k) = int_A^B f - h^2/24 [f']_A^B + 7 h^4/5760 [f''']_A^B - 31 h^6/967680 [f^(5)]_A^B
                     + 127 h^8/154828800 [f^(7)]_A^B + O(h^10)

with the series carried one order further (the ``w^9`` terms below, derived with sympy as the
others), kept to ``h^8``: the remainder is ``O(w^11)`` per cell, ``O(h^10)`` per run. The
integrals ``int_A^B u^2k phi`` are closed forms in ``Phi`` and ``phi`` at the run's edges, which
adjacent runs share. Valid for steps up to ``RUN_MAX_STEP`` sd; measured against the exact sums
in tests/test_float_runs.py.

All tensors are edge-major: ``[R + 1, c]`` run edges (standard units) and ``[R, c]`` steps for
``c`` elements of ``R`` runs each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from .cells import _pdf, column_sums
from .versions import tensor_version

T = TypeVar("T")

# Largest cell width (sd units) summed in closed form: the truncation error grows like h^10
# (three runs of 1-60 cells, steps up to h, 200 draws: kappa / m4 within 7e-15 / 4e-13 of the
# exact sums at h = 0.1, 9e-13 / 6.7e-11 at 0.2, 6.8e-12 / 5.2e-10 at 0.25;
# tests/test_float_runs.py).
RUN_MAX_STEP = 0.2

_FAR = 40.0
_U_POWERS = 16  # powers of u in the edge polynomials (degree 8 + 7 derivatives)
_H_ORDER = 8  # powers of h kept after dividing the Euler-Maclaurin sum by h
# (h power, coefficient B_2k(1/2) / (2k)!) of the midpoint Euler-Maclaurin formula
_EM = ((2, -1.0 / 24.0), (4, 7.0 / 5760.0), (6, -31.0 / 967680.0), (8, 127.0 / 154828800.0))


def _poly(terms: dict[tuple[int, int], float]) -> np.ndarray:
    """Coefficients ``[i, j]`` of ``u^i h^j`` from ``{(i, j): coef}``."""
    out = np.zeros((_U_POWERS, 16))
    for (i, j), v in terms.items():
        out[i, j] = v
    return out


# g2 and g4 of the module doc as polynomials in (u, h)
_G2 = _poly({(0, 3): 1 / 12, (2, 5): -1 / 1440, (0, 5): -9 / 1440,
             (4, 7): 17 / 483840, (2, 7): 94 / 483840, (0, 7): 135 / 483840,
             (6, 9): -47 / 58060800, (4, 9): -433 / 58060800, (2, 9): -943 / 58060800, (0, 9): -525 / 58060800})
_G4 = _poly({(2, 3): 1 / 2, (4, 5): -1 / 240, (2, 5): -21 / 240, (0, 5): 3 / 240,
             (6, 7): 51 / 241920, (4, 7): 482 / 241920, (2, 7): 1755 / 241920, (0, 7): -270 / 241920,
             (8, 9): -47 / 9676800, (6, 9): -2279 / 29030400, (4, 9): -47 / 151200, (2, 9): -7 / 18432,
             (0, 9): 1 / 18432})


def _d(p: np.ndarray) -> np.ndarray:
    """``D p = dp/du - u p`` on ``[i, j]`` coefficients (``(phi p)' = phi D p``)."""
    out = np.zeros_like(p)
    out[:-1] += p[1:] * np.arange(1, p.shape[0])[:, None]
    out[1:] -= p[:-1]
    return out


def _boundary(g: np.ndarray) -> np.ndarray:
    """``(1/h) sum_m e_m h^2m D^(2m-1) g``, truncated to ``h^_H_ORDER``: the run's edge terms
    are ``[phi(u) * this(u, h)]_A^B``."""
    out = np.zeros_like(g)
    for power, coef in _EM:
        dg = g
        for _ in range(power - 1):
            dg = _d(dg)
        shifted = np.zeros_like(g)
        shifted[:, power - 1:] = dg[:, : g.shape[1] - power + 1]  # times h^power / h
        out += coef * shifted
    out[:, _H_ORDER + 1:] = 0.0
    return out


def _interior(g: np.ndarray) -> np.ndarray:
    """``(1/h) g`` truncated to ``h^_H_ORDER``: weights of ``int_A^B u^i phi`` (``[i, j]``)."""
    out = np.zeros_like(g)
    out[:, :-1] = g[:, 1:]
    out[:, _H_ORDER + 1:] = 0.0
    return out


def _trim(p: np.ndarray) -> list[tuple[int, list[tuple[int, float]]]]:
    """Non-zero ``[i, j]`` coefficients as ``[(i, [(j, coef), ...]), ...]``."""
    return [(i, [(j, float(p[i, j])) for j in range(p.shape[1]) if p[i, j] != 0.0])
            for i in range(p.shape[0]) if np.any(p[i] != 0.0)]


_IN2, _IN4 = _trim(_interior(_G2)), _trim(_interior(_G4))
_BD2, _BD4 = _trim(_boundary(_G2)), _trim(_boundary(_G4))


def _eval(terms: list[tuple[int, list[tuple[int, float]]]], u_pow: list[Tensor], h_pow: list[Tensor]) -> Tensor:
    """``sum_i u^i sum_j coef_ij h^j`` from precomputed powers."""
    total = None
    for i, hs in terms:
        ch = None
        for j, v in hs:
            t = h_pow[j] * v
            ch = t if ch is None else ch + t
        t = u_pow[i] * ch
        total = t if total is None else total + t
    assert total is not None
    return total


def _edge_terms(terms: list[tuple[int, list[tuple[int, float]]]], up: list[Tensor], hp: list[Tensor]
                ) -> tuple[Tensor, Tensor]:
    """:func:`_eval` of ``terms`` at the runs' lower and upper edges (``(at a, at b)``, ``[R, c]``
    each) from the powers ``up`` of all ``R + 1`` edges (``[R + 1, c]`` each): each edge's powers are
    formed once (a run's upper edge is the next one's lower) and each ``h`` polynomial once (both
    edges read the run's own step): the same products and sums in the same order as ``_eval`` on
    ``a = u[:-1]`` and ``b = u[1:]``, so bitwise equal."""
    total_a = total_b = None
    for i, hs in terms:
        ch = None
        for j, v in hs:
            t = hp[j] * v
            ch = t if ch is None else ch + t
        assert ch is not None
        ta, tb = up[i][:-1] * ch, up[i][1:] * ch
        total_a = ta if total_a is None else total_a + ta
        total_b = tb if total_b is None else total_b + tb
    assert total_a is not None and total_b is not None
    return total_a, total_b


def _max_power(terms: list[tuple[int, list[tuple[int, float]]]]) -> int:
    return max(i for i, _ in terms)


def run_moments(u: Tensor, step: Tensor, kappa_only: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
    """``kappa`` and ``m4`` sums (``[c]`` each) and the probability of ``R`` consecutive runs of
    equal cells, per element.

    Args:
        u: ``[R + 1, c]`` the runs' edges in standard units (run ``r`` is ``[u[r], u[r + 1]]``;
            finite, increasing along the first axis).
        step: ``[R, c]`` each run's cell width (standard units, at most ``RUN_MAX_STEP``).
        kappa_only: the ``m4`` sum is not formed (``None`` in its place); the others bitwise
            the same.

    Returns:
        ``(sum p mu^2, sum p mu^4, sum p)`` over every cell of the runs (float64).
    """
    # beyond 40 sd phi and the tails are 0 in float64: clamping changes nothing and keeps the
    # edge polynomials (degree 11) finite
    u = u.clamp(-_FAR, _FAR)
    pdf = _pdf(u)
    q = torch.special.ndtr(-u.abs())  # the smaller tail at each edge
    a, b = u[:-1], u[1:]
    qa, qb, pa, pb = q[:-1], q[1:], pdf[:-1], pdf[1:]
    # int_A^B u^k phi for k = 0, 2, 4, 6, 8 (tail differences: no cancellation in either tail)
    m0 = torch.where(a > 0, qa - qb, torch.where(b <= 0, qb - qa, 1.0 - qa - qb)).clamp_min(0.0)
    a2, b2 = a * a, b * b
    ea, eb = a * pa, b * pb  # u^(2k+1) phi at the edges, k = 0 first
    m = [m0]
    for k in (1, 2, 3, 4):
        m.append((2 * k - 1) * m[-1] - (eb - ea))
        ea, eb = ea * a2, eb * b2
    hp = [torch.ones_like(step), step]
    for _ in range(2, _H_ORDER + 1):
        hp.append(hp[-1] * step)
    mom = [m[0], None, m[1], None, m[2], None, m[3], None, m[4]]
    s2 = sum(mom[i] * sum(hp[j] * v for j, v in hs) for i, hs in _IN2)
    # edge terms [phi(u) B(u, h)]_A^B: B evaluated with the run's own step at both its edges; the
    # powers of u the edge polynomials read (odd, up to 5 for kappa, 7 for m4), formed once per edge
    up = [torch.ones_like(u), u]
    for _ in range(2, _max_power(_BD2 if kappa_only else _BD2 + _BD4) + 1):
        up.append(up[-1] * u)
    ea2, eb2 = _edge_terms(_BD2, up, hp)
    s2 = s2 + pb * eb2 - pa * ea2
    if kappa_only:
        return column_sums(m[1] - s2), None, column_sums(m0)
    s4 = sum(mom[i] * sum(hp[j] * v for j, v in hs) for i, hs in _IN4)
    ea4, eb4 = _edge_terms(_BD4, up, hp)
    s4 = s4 + pb * eb4 - pa * ea4
    return column_sums(m[1] - s2), column_sums(m[2] - s4), column_sums(m0)


class RunTable:
    """The maximal runs of equal cells of a sorted value table (units of the scale).

    Attributes:
        edges: ``[R + 1]`` run ``r`` spans ``[edges[r], edges[r + 1]]`` (finite cells only:
            the table's two outer cells are unbounded and belong to no run).
        steps: ``[R]`` each run's cell width.
        run_of: ``[V]`` the run of each value's cell (``-1`` for the two unbounded cells).
    """

    def __init__(self, values: Tensor, device: torch.device) -> None:
        v = values.detach().to("cpu", torch.float64)
        mids = 0.5 * (v[1:] + v[:-1])
        widths = mids[1:] - mids[:-1]  # finite cells 1..V-2
        new = torch.ones(widths.numel(), dtype=torch.bool)
        new[1:] = ~torch.isclose(widths[1:], widths[:-1], rtol=1e-9, atol=0.0)
        first = torch.nonzero(new).squeeze(-1)  # first cell (offset by 1) of each run
        run = torch.cumsum(new.long(), 0) - 1
        self.edges = torch.cat([mids[first], mids[-1:]]).to(device)
        self.steps = widths[first].to(device)
        self.run_of = torch.cat([torch.tensor([-1]), run, torch.tensor([-1])]).to(device)
        self.values = values.detach().to(device=device, dtype=torch.float64).clone()


_RUN_TABLES: dict[tuple[int, int, str], RunTable] = {}


def per_table(cache: dict, values: Tensor, device: torch.device, build: Callable[[Tensor, torch.device], T]) -> T:
    """``build(values, device)``, cached in ``cache`` per value table and device (the entry keeps
    its own copy of ``values`` as ``.values``, compared before reuse)."""
    key = (values.data_ptr(), values.numel(), str(device))
    got = cache.get(key)
    # the same tensor object, unmodified since (the entry holds it: its address cannot be reused)
    # needs no comparison: 64 us per call for a 16-bit table's 65k values, ~2k calls per 1e7 scoring
    version = tensor_version(values)  # None: an inference tensor, compared every time
    if got is not None and version is not None and getattr(got, "_source", None) is values \
            and got._source_version == version:
        return got
    if got is None or got.values.shape != values.shape or not torch.equal(got.values, values.to(got.values)):
        got = cache[key] = build(values, device)
    got._source, got._source_version = values, version
    return got


def run_table(values: Tensor, device: torch.device) -> RunTable:
    """The :class:`RunTable` of ``values`` (cached per table and device)."""
    return per_table(_RUN_TABLES, values, device, RunTable)


__all__ = ["RUN_MAX_STEP", "RunTable", "run_moments", "run_table"]
