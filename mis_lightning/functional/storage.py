"""The storage rounding of a bf16 / fp16 model's trained weights (method.md section 5, "Weights
stored in bf16 / fp16").

A model trained and stored in a 16-bit float format ``D`` holds ``w = rnd_D(theta-hat)``, and
every scheme quantizes ``w``: the release is ``Q(rnd_D(theta-hat))``. So, in the Gaussian model of
the continuous ``theta-hat``, the cell of a code is the set of real values whose *stored* value
has that code: a union of storage cells (the intervals that round to one ``D`` value), and each
edge is the midpoint between the last ``D`` value of one code and the first of the next. The
edges move by up to half a storage ulp from the grid's own edges: 0.25 int8 step near a bf16
block's absmax (docs/quantization.md).

This module holds the dtype arithmetic; :class:`~mis_lightning.quantization.ParamGrid` locates the
codes of the stored values with the backend's own arithmetic and sums the cells
(``storage_dtype``). Tensors hold ``D`` values as float64, any shape.
"""

from __future__ import annotations

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


_VALUES: dict[torch.dtype, Tensor] = {}


def _values_by_key(dtype: torch.dtype) -> Tensor:
    """float64 ``[65535]``: the ``D`` value of each ordered key ``o`` (:func:`_ordered`) at
    ``o + 32767``: a key's value is one gather instead of the bit arithmetic of
    :func:`_from_ordered` (512 KiB, built once per dtype)."""
    if dtype not in _VALUES:
        _VALUES[dtype] = _from_ordered(torch.arange(-32767, 32768, dtype=torch.int32), dtype)
    return _VALUES[dtype]


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
        ``[..., K]`` float64: ``(u + next_D(u)) / 2`` with ``u`` the largest ``D`` value whose key
        is below ``upper_key`` (an empty cell, one no ``D`` value rounds into, gets two equal edges).
    """
    fin = torch.isfinite(raw)
    e = torch.where(fin, raw, torch.zeros_like(raw))
    # o: the ordered key of the largest D value <= e (the cast rounds to nearest: one down if above)
    r = e.to(dtype)
    bits = r.view(torch.int16).to(torch.int32)
    o = torch.where(bits >= 0, bits, -(bits & 0x7FFF)) - (r.to(torch.float64) > e).to(torch.int32)
    vals = _values_by_key(dtype).to(raw.device)
    at = o.long() + 32767  # the value of key o + i: vals[at + i]
    # u = o + 1, o or o - 1: the key is non-decreasing, so count the candidates below upper_key
    below = ((key(vals.take(at + 1)) < upper_key).to(torch.int32)
             + (key(vals.take(at)) < upper_key).to(torch.int32))
    u = at - 1 + below
    return torch.where(fin, 0.5 * (vals.take(u) + vals.take(u + 1)), raw)


def stored_bounds(lower: Tensor, upper: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The bounds a release puts on the continuous weights of a block whose stored extremes are
    ``lower`` / ``upper`` (``D`` values; ``+-inf``: none): a weight that is not the extreme is
    stored strictly inside, so the continuous weight lies within the midpoints next to them.
    (Where a bound is not attained, e.g. the 0 of a one-signed min/max block, this is tighter
    than the truth by half an ulp of 0, which moves mass to the revealed tail: conservative.)"""
    lo_f, hi_f = torch.isfinite(lower), torch.isfinite(upper)
    lo0 = torch.where(lo_f, lower, torch.zeros_like(lower))
    hi0 = torch.where(hi_f, upper, torch.zeros_like(upper))
    lo = torch.where(lo_f, 0.5 * (lo0 + next_stored(lo0, dtype)), lower)
    hi = torch.where(hi_f, 0.5 * (prev_stored(hi0, dtype) + hi0), upper)
    return lo, hi


_FINITE: dict[torch.dtype, Tensor] = {}


def storage_values(dtype: torch.dtype) -> Tensor:
    """float64 ``[V]``: every finite ``D`` value, sorted, ``+-0`` once (bf16: 65,281; fp16: 63,489),
    built once per dtype (shared: do not modify)."""
    if dtype not in _FINITE:
        v = _values_by_key(dtype)
        _FINITE[dtype] = torch.unique(v[torch.isfinite(v)])
    return _FINITE[dtype]


def storage_cell_moments(theta: Tensor, sigma: Tensor, dtype: torch.dtype) -> CellMoments:
    """Cell moments of the storage grid itself: the release ``rnd_D(theta-hat)`` of a weight stored
    in ``D`` and left unquantized (method.md section 5, "Weights stored in bf16 / fp16").

    Args:
        theta, sigma: ``[c]`` the stored weights and their standard deviations (parameter units).
        dtype: the storage dtype ``D`` (bfloat16 / float16).

    Returns:
        float64 :class:`CellMoments` ``[c]``: the cells are the storage cells, the midpoints of
        adjacent ``D`` values, summed by :func:`~mis_lightning.functional.table_cell_moments` over
        the table of every finite ``D`` value at scale 1 (its accuracy: within 1e-13 of exact cell
        sums in kappa). ``kappa`` is below 1 by about ``(ulp / sd)^2 / 12`` where sd spans a few
        storage ulps, and falls towards 0 below one ulp.
    """
    th = theta.to(torch.float64)
    return table_cell_moments(th, sigma.to(torch.float64), storage_values(dtype), torch.ones_like(th))
