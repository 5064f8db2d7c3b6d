"""The first scoring call's one-time tables built without a sort or a two-index gather (p48c):

* ``functional.formats.format_values`` (the float grids' value tables: ``casts.representable_values``
  and the table layouts' format test) from a sign-magnitude format's non-negative bit patterns
  against the sort of every finite pattern (``FORMAT_VALUES_BY_BITS`` False), bit for bit, on
  every 8- and 16-bit float format this torch has; and against an independent enumeration (each
  pattern decoded by ``struct``'s IEEE half for float16, by shifting into a float32 for bfloat16);
* ``functional.wide_series.series_coefficients``'s flat gather (``SERIES_FLAT_GATHER``) against
  the advanced indexing it replaces, bit for bit, on random windows, and against the defining
  sum ``sum_i binom(n, i) sum_k m^(b + n - i) int t^(a + i)`` evaluated term by term (``math.fsum``;
  within 1e-13 of the terms' absolute sum: float64 sums in another order).
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

import mis_lightning.functional.formats as FM
import mis_lightning.functional.wide_series as WS
from mis_lightning.quantization.casts import cast_cell_values, representable_values

_FORMATS = [getattr(torch, n) for n in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                        "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


@pytest.mark.parametrize("dtype", _FORMATS, ids=str)
def test_format_values_by_bits_equal_the_sort(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = FM.format_values(dtype)
    monkeypatch.setattr(FM, "FORMAT_VALUES_BY_BITS", False)
    slow = FM.format_values(dtype)
    assert fast.dtype == torch.float64 and fast.shape == slow.shape
    assert torch.equal(_bits(fast), _bits(slow))  # +0 kept, no -0
    assert bool((fast[1:] > fast[:-1]).all())
    assert int((fast == 0).sum()) <= 1 and not bool(torch.signbit(fast[fast == 0]).any())


def test_format_values_against_independent_decoding() -> None:
    # float16: IEEE half decoded by struct ('e'); bfloat16: the top half of a float32
    half = {struct.unpack("<e", struct.pack("<H", p))[0] for p in range(1 << 16)}
    half = sorted(v for v in half if math.isfinite(v))
    assert torch.equal(FM.format_values(torch.float16), torch.tensor(half, dtype=torch.float64))
    bf = {struct.unpack("<f", struct.pack("<I", p << 16))[0] for p in range(1 << 16)}
    bf = sorted(v for v in bf if math.isfinite(v))
    assert torch.equal(FM.format_values(torch.bfloat16), torch.tensor(bf, dtype=torch.float64))
    # the cached tables of the grids are these
    assert torch.equal(representable_values(torch.bfloat16), torch.tensor(bf, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.int8])
def test_format_values_rejects_other_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="8- or 16-bit float dtype"):
        FM.format_values(dtype)
    with pytest.raises(ValueError, match="8- or 16-bit float dtype"):
        representable_values(dtype)


_EVERY_FLOAT = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point},
                      key=str)


@pytest.mark.parametrize("dtype", _EVERY_FLOAT, ids=str)
def test_every_float_dtype_lists_its_values_or_raises_value_error(dtype: torch.dtype) -> None:
    # every floating dtype of this torch: a format of one value a bit pattern gets its table, any
    # other (float32 / float64, a packed format such as float4_e2m1fn_x2, which raised torch's
    # NotImplementedError) the documented ValueError naming the dtype, from each public entry
    # (cast_cell_values: the bf16 / fp16 casts' tables only; float8_e8m0fnu's was not increasing)
    for f in (FM.format_values, representable_values, cast_cell_values):
        if dtype in _FORMATS and (f is not cast_cell_values or dtype in (torch.float16, torch.bfloat16)):
            v = f(dtype)
            assert v.dtype == torch.float64 and bool(torch.isfinite(v).all()) and bool((v[1:] > v[:-1]).all())
        else:
            with pytest.raises(ValueError, match=f"8- or 16-bit float dtype.*{dtype}"):
                f(dtype)


def _windows(rows: int, cells: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.sort(torch.rand(rows, cells + 1, generator=g, dtype=torch.float64) * 2 - 1, -1).values
    if rows:
        e[:, 0], e[:, -1] = -1.0, 1.0
        e[0, 1:3] = e[0, 1]  # a cell of width 0
    return e


@pytest.mark.parametrize(("rows", "cells", "N"), [(251, 1, 24), (0, 1, 24), (1, 2, 4), (37, 8, 10), (300, 4, 24),
                                                  (2048, 16, 12)])
def test_series_flat_gather_equals_indexing(rows: int, cells: int, N: int, monkeypatch: pytest.MonkeyPatch) -> None:
    e = _windows(rows, cells, rows + N)
    fast = WS.series_coefficients(e, N)
    monkeypatch.setattr(WS, "SERIES_FLAT_GATHER", False)
    slow = WS.series_coefficients(e, N)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def test_series_coefficients_against_the_defining_sum() -> None:
    N = 8
    e = _windows(5, 3, 1)
    Q, c3, c5 = WS.series_coefficients(e, N)
    for r in range(e.shape[0]):
        m = [0.5 * (float(e[r, k]) + float(e[r, k + 1])) for k in range(e.shape[1] - 1)]
        v = [float(e[r, k + 1]) - float(e[r, k]) for k in range(e.shape[1] - 1)]

        def tint(ex: int, vk: float) -> float:  # int_{|t| <= v/2} t^ex dt
            return 0.0 if ex % 2 else vk ** (ex + 1) / (2.0**ex * (ex + 1))

        for kind, (b, a) in enumerate(WS._KINDS):
            for n in range(N):
                terms = [math.comb(n, i) * mk ** (b + n - i) * tint(a + i, vk)
                         for i in range(n + 1) for mk, vk in zip(m, v)]
                # (terms of both signs cancel: the tolerance scales with their absolute sum)
                assert abs(float(Q[r, kind, n]) - math.fsum(terms)) <= 1e-13 * sum(map(abs, terms))
        assert float(c3[r]) == pytest.approx(sum(vk**3 for vk in v), rel=1e-13)
        assert float(c5[r]) == pytest.approx(sum(vk**5 for vk in v), rel=1e-13)
