"""Every finite value of an 8- or 16-bit float format, sorted (the value tables of the float
grids: ``quantization.casts.representable_values`` and the table layouts' format test,
``functional.table._format_dtype``; method.md section 5, the cast and float8 grids).

The formats with a sign bit (IEEE-like ``float16``, ``bfloat16``, ``float8_e4m3fn``,
``float8_e5m2`` and the ``fnuz`` float8 formats) store a value as sign and magnitude: the bit
patterns ``0 .. p(max)`` (``p(max)``: the pattern of ``finfo.max``) are the non-negative finite
values in increasing order, and every negative finite value is the negation of a positive one
(the ``fnuz`` formats have no ``-0``, their pattern ``0x80`` is NaN; IEEE's ``-0`` merges with
``+0``). The sorted values are therefore ``-v[p(max)], ..., -v[1], v[0] = +0, ..., v[p(max)]``
without a sort; the same float64 numbers, bit for bit (``+0`` kept), as the sort of every
finite pattern (``torch.unique``), which other formats (no sign bit: ``float8_e8m0fnu``) and
:data:`FORMAT_VALUES_BY_BITS` False take. tests/test_format_values.py checks both against
each other on every format torch has.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

# the sign-magnitude formats whose sorted values are built from the non-negative patterns (above);
# names looked up so that a torch without one of them still imports this module
_SIGN_MAGNITUDE = frozenset(
    getattr(torch, n) for n in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                "float8_e5m2fnuz") if hasattr(torch, n))
# True: the sign-magnitude formats' values from their non-negative bit patterns (no sort: ~1.7 ->
# ~0.1 ms a 16-bit format, twice per format on a first scoring call); False: the sort of every
# finite pattern for every format (A/B; bitwise the same tables)
FORMAT_VALUES_BY_BITS = True


@cache
def _value_format(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a float format of one value per 8- or 16-bit pattern whose patterns
    this torch converts to float64 (not a packed format such as ``float4_e2m1fn_x2``, two 4-bit
    values a byte, whose ``finfo`` may read 8 bits but which has no conversion kernel)."""
    if not dtype.is_floating_point:
        return False
    try:
        bits = torch.finfo(dtype).bits
    except TypeError:  # (finfo refuses some formats: float4_e2m1fn_x2 on torch 2.13)
        return False
    if bits not in (8, 16) or 8 * dtype.itemsize != bits:
        return False
    try:
        torch.zeros(1, dtype=torch.int16 if bits == 16 else torch.int8).view(dtype).to(torch.float64)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def check_format_dtype(dtype: torch.dtype, who: str) -> None:
    """Raise ``ValueError`` naming ``dtype`` and the caller ``who`` unless ``dtype`` is a float
    format whose every value :func:`format_values` can list (one value per 8- or 16-bit pattern,
    converted to float64 by this torch)."""
    if not _value_format(dtype):
        raise ValueError(f"{who} needs an 8- or 16-bit float dtype (one value a bit pattern, convertible "
                         f"to float64), got {dtype}")


def format_values(dtype: torch.dtype) -> Tensor:
    """Every finite value of the 8- or 16-bit float format ``dtype``, float64 ``[V]``, sorted,
    ``+0`` and ``-0`` merged into ``+0`` (a new tensor on every call).

    Raises:
        ValueError: ``dtype`` is not an 8- or 16-bit floating dtype of one value a bit pattern
            (:func:`check_format_dtype`: also a packed format such as ``float4_e2m1fn_x2``).
    """
    check_format_dtype(dtype, "format_values")
    ints = torch.int16 if torch.finfo(dtype).bits == 16 else torch.int8
    if FORMAT_VALUES_BY_BITS and dtype in _SIGN_MAGNITUDE:
        top = int(torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(ints))
        pos = torch.arange(0, top + 1, dtype=torch.int32).to(ints).view(dtype).to(torch.float64)
        return torch.cat([pos[1:].flip(0).neg_(), pos])
    half = 1 << (torch.finfo(dtype).bits - 1)
    vals = torch.arange(-half, half, dtype=torch.int32).to(ints).view(dtype).to(torch.float64)
    return torch.unique(vals[torch.isfinite(vals)])  # sorted; -0.0 == 0.0 merged


__all__ = ["FORMAT_VALUES_BY_BITS", "check_format_dtype", "format_values"]
