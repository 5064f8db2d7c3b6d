"""The storage rounding of a bf16 / fp16 model's trained weights (method.md section 5, "Weights
stored in bf16 / fp16").

A model trained and stored in a 16-bit float format ``D`` holds ``w = rnd_D(theta-hat)``, and
every scheme quantizes ``w``: the release is ``Q(rnd_D(theta-hat))``. So, in the Gaussian model of
the continuous ``theta-hat``, the cell of a code is the set of real values whose *stored* value
has that code: a union of storage cells (the intervals that round to one ``D`` value), and each
edge is the midpoint between the last ``D`` value of one code and the first of the next. The
edges move by up to half a storage ulp from the grid's own edges: 0.25 int8 step near a bf16
block's absmax (docs/quantization.md).

Overflow: ``rnd_D`` sends every real value from the midpoint between ``D``'s largest finite
value and the next power of two on (fp16: ``|x| >= 65520``; bf16: ``>= (2 - 2^-8) 2^127``) to
``+-inf``, a stored value of its own: the largest value's storage cell ends there and an unbounded
cell of ``inf`` lies beyond, released as ``Q(inf)``. The storage cells' table
(:func:`storage_values`) holds that power of two (:func:`overflow_value`, 65536; ``2^128``) at each
end standing for ``+-inf`` (as ``casts.cast_cell_values``), and the stored edges and bounds take it
as the value after the largest one (:func:`stored_edges`, :func:`stored_bounds`), the keys being
those of ``+-inf`` itself (:func:`as_stored`). Formerly the largest value's cell ran on to
infinity: kappa read low, 0.229 for 0.428 at fp16's 65504 with sd 9.8, 0 for a ``bf16`` cast of an
fp16-stored weight there (tests/test_stored_overflow.py).

This module holds the dtype arithmetic; :class:`~mis_lightning.quantization.ParamGrid` locates the
codes of the stored values with the backend's own arithmetic and sums the cells
(``storage_dtype``). Tensors hold ``D`` values as float64, any shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .cells import CellMoments
from .table import table_cell_moments

#: the dtypes whose storage rounding is modelled
STORAGE_DTYPES = (torch.bfloat16, torch.float16)


def _ordered(x: Tensor, dtype: torch.dtype) -> Tensor:
    """int32 keys of ``D`` values (float64 ``x``), increasing with the value (+-0 both 0)."""
    bits = x.to(dtype).view(torch.int16).to(torch.int32)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFF))


def _from_ordered(o: Tensor, dtype: torch.dtype) -> Tensor:
    bits = torch.where(o >= 0, o, (-o) | 0x8000)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)  # as int16 two's complement
    return bits.to(torch.int16).view(dtype).to(torch.float64)


def next_stored(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The next ``D`` value above each ``D`` value ``x`` (float64)."""
    return _from_ordered(_ordered(x, dtype) + 1, dtype)


def prev_stored(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The next ``D`` value below each ``D`` value ``x`` (float64)."""
    return _from_ordered(_ordered(x, dtype) - 1, dtype)


def stored(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``rnd_D(x)`` (nearest, ties to even: the cast), as float64."""
    return x.to(dtype).to(torch.float64)


def stored_floor(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The largest ``D`` value ``<= x`` (finite float64 ``x`` within ``D``'s range)."""
    r = stored(x, dtype)
    return torch.where(r > x, prev_stored(r, dtype), r)


def storage_ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The gap between ``rnd_D(|x|)`` and the next ``D`` value (float64): the width of a
    storage cell near ``x``."""
    r = stored_floor(x.abs().clamp_max(torch.finfo(dtype).max / 2), dtype)
    return next_stored(r, dtype) - r


def overflow_value(dtype: torch.dtype) -> float:
    """The power of two after ``D``'s largest finite value (fp16 65536, bf16 ``2^128``): the value
    standing for ``inf`` in the storage cells' tables; the midpoint between it and the largest
    value is where the cast overflows (round half to even sends the midpoint itself to ``inf``:
    the largest value's significand is odd)."""
    return 2.0 ** math.ceil(math.log2(float(torch.finfo(dtype).max)))


def overflow_threshold(dtype: torch.dtype) -> float:
    """Where ``rnd_D`` overflows: ``|x| >=`` the midpoint between the largest finite value and
    :func:`overflow_value` is stored as ``+-inf`` (fp16 65520, bf16 ``(2 - 2^-8) 2^127``)."""
    return 0.5 * (float(torch.finfo(dtype).max) + overflow_value(dtype))


def as_stored(v: Tensor, dtype: torch.dtype) -> Tensor:
    """The stored values the storage cells' values stand for: ``+-inf`` for ``+-``:func:`overflow_value`
    (float64, ``v``'s shape): what a backend's arithmetic is given to key the overflow cells."""
    return torch.where(v.abs() > float(torch.finfo(dtype).max), v * math.inf, v)


_VALUES: dict[torch.dtype, Tensor] = {}


def _values_by_key(dtype: torch.dtype) -> Tensor:
    """float64 ``[65535]``: the ``D`` value of each ordered key ``o`` (:func:`_ordered`) at
    ``o + 32767``: a key's value is one gather instead of the bit arithmetic of
    :func:`_from_ordered` (512 KiB, built once per dtype; ``+-inf`` at ``+-`` :func:`_inf_key`,
    NaN beyond)."""
    if dtype not in _VALUES:
        _VALUES[dtype] = _from_ordered(torch.arange(-32767, 32768, dtype=torch.int32), dtype)
    return _VALUES[dtype]


def _inf_key(dtype: torch.dtype) -> int:
    """The ordered key of ``+inf`` (fp16 ``0x7C00``, bf16 ``0x7F80``); ``-inf``'s is its negative."""
    return int(_ordered(torch.tensor([math.inf], dtype=torch.float64), dtype)[0])


_MIDS: dict[torch.dtype, Tensor] = {}


def _mid_values_by_key(dtype: torch.dtype) -> Tensor:
    """:func:`_values_by_key` with ``+-inf`` replaced by ``+-`` :func:`overflow_value` (NaN beyond):
    the midpoint of two neighbours is the storage cells' edge between them, the overflow
    threshold next to ``+-inf``."""
    if dtype not in _MIDS:
        v = _values_by_key(dtype).clone()
        top = overflow_value(dtype)
        v[torch.isinf(v)] = torch.copysign(torch.tensor(top, dtype=torch.float64), v[torch.isinf(v)])
        _MIDS[dtype] = v
    return _MIDS[dtype]


def stored_edges(raw: Tensor, upper_key: Tensor, key: Callable[[Tensor], Tensor], dtype: torch.dtype) -> Tensor:
    """Edges of the stored cells from a grid's own edges.

    Args:
        raw: ``[..., K]`` the grid's edges in parameter units (``+-inf`` kept): edge ``i`` lies
            below the cell of key ``upper_key[..., i]``, within one ``D`` ulp of the real
            threshold of the backend's arithmetic.
        upper_key: ``[..., K]`` float64 the key of the cell above each edge.
        key: ``key(v) -> [..., K]`` the key of the cell holding each stored value ``v`` (``D``
            values, ``[..., K]``), by the backend's own arithmetic, non-decreasing in ``v``.
        dtype: the storage dtype ``D``.

    Returns:
        ``[..., K]`` float64: ``(u + next_D(u)) / 2`` with ``u`` the largest ``D`` value, ``+-inf``
        included, whose key is below ``upper_key`` (an empty cell, one no ``D`` value rounds into,
        gets two equal edges). Next to ``+-inf`` the edge is the overflow threshold (fp16
        ``+-65520``): ``key`` is asked for the key of ``+-inf`` itself; with no such ``u``,
        ``-inf``, with ``u = +inf``, ``+inf``.
    """
    fin = torch.isfinite(raw)
    e = torch.where(fin, raw, torch.zeros_like(raw))
    # o: the ordered key of the largest D value <= e (the cast rounds to nearest: one down if above;
    # e beyond the overflow threshold casts to inf, one down: the largest finite value)
    r = e.to(dtype)
    bits = r.view(torch.int16).to(torch.int32)
    o = torch.where(bits >= 0, bits, -(bits & 0x7FFF)) - (r.to(torch.float64) > e).to(torch.int32)
    vals = _values_by_key(dtype).to(raw.device)
    mids = _mid_values_by_key(dtype).to(raw.device)
    lo_at, hi_at = 32767 - _inf_key(dtype), 32767 + _inf_key(dtype)  # -inf's and +inf's places
    at = o.long() + 32767  # the value of key o + i: vals[at + i]; o in [-inf's key, the largest's]
    # u = o + 1, o or o - 1: the key is non-decreasing, so count the candidates below upper_key
    below = ((key(vals.take(at + 1)) < upper_key).to(torch.int32)
             + (key(vals.take(at)) < upper_key).to(torch.int32))
    u = at - 1 + below
    uc = u.clamp(lo_at, hi_at - 1)
    edge = 0.5 * (mids.take(uc) + mids.take(uc + 1))
    edge = torch.where(u < lo_at, -math.inf, torch.where(u >= hi_at, math.inf, edge))
    return torch.where(fin, edge, raw)


def stored_bounds(lower: Tensor, upper: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The bounds a release puts on the continuous weights of a block whose stored extremes are
    ``lower`` / ``upper`` (``D`` values; ``+-inf``: none): a weight that is not the extreme is
    stored strictly inside, so the continuous weight lies within the midpoints next to them.
    (Where a bound is not attained, e.g. the 0 of a one-signed min/max block, this is tighter
    than the truth by half an ulp of 0, which moves mass to the revealed tail: conservative.)
    Next to ``+-inf`` (a lower extreme at the largest value, an upper one at the most negative) the
    midpoint is the overflow threshold (fp16 ``+-65520``), not ``+-inf``."""
    lo_f, hi_f = torch.isfinite(lower), torch.isfinite(upper)
    lo0 = torch.where(lo_f, lower, torch.zeros_like(lower))
    hi0 = torch.where(hi_f, upper, torch.zeros_like(upper))
    top = overflow_value(dtype)
    nxt, prv = next_stored(lo0, dtype).clamp(-top, top), prev_stored(hi0, dtype).clamp(-top, top)
    lo = torch.where(lo_f, 0.5 * (lo0 + nxt), lower)
    hi = torch.where(hi_f, 0.5 * (prv + hi0), upper)
    return lo, hi


_FINITE: dict[torch.dtype, Tensor] = {}


def storage_values(dtype: torch.dtype) -> Tensor:
    """float64 ``[V]``: the storage cells' values: every finite ``D`` value, sorted, ``+-0`` once,
    and at each end ``+-`` :func:`overflow_value` standing for ``+-inf`` (bf16: 65,283; fp16:
    63,491; the midpoints of adjacent values are the storage cells' edges, the overflow threshold
    at the ends; :func:`as_stored` gives the stored values), built once per dtype (shared: do not
    modify)."""
    if dtype not in _FINITE:
        v = _values_by_key(dtype)
        end = torch.tensor([overflow_value(dtype)], dtype=torch.float64)
        _FINITE[dtype] = torch.cat([-end, torch.unique(v[torch.isfinite(v)]), end])
    return _FINITE[dtype]


def storage_cell_moments(theta: Tensor, sigma: Tensor, dtype: torch.dtype) -> CellMoments:
    """Cell moments of the storage grid itself: the release ``rnd_D(theta-hat)`` of a weight stored
    in ``D`` and left unquantized (method.md section 5, "Weights stored in bf16 / fp16").

    Args:
        theta, sigma: ``[c]`` the stored weights and their standard deviations (parameter units).
        dtype: the storage dtype ``D`` (bfloat16 / float16).

    Returns:
        float64 :class:`CellMoments` ``[c]``: the cells are the storage cells, the midpoints of
        adjacent ``D`` values and the overflow cells beyond the largest ones, summed by :func:`~mis_lightning.functional.table_cell_moments` over
        the table of every finite ``D`` value at scale 1 (its accuracy: within 1e-13 of exact cell
        sums in kappa). ``kappa`` is below 1 by about ``(ulp / sd)^2 / 12`` where sd spans a few
        storage ulps, and falls towards 0 below one ulp.
    """
    th = theta.to(torch.float64)
    return table_cell_moments(th, sigma.to(torch.float64), storage_values(dtype), torch.ones_like(th))
