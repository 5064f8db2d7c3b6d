"""The backends' exact shortcuts (p47c) against the masks they replace: the float8 codes' NaN test
on their bit patterns (``torchao_backend._float8_has_nan``) and the casts' overflow test from the
weight's extremes (``casts._overflows``), each with its switch on and off; and the torchao copies
that share the float weights ``quantize_`` replaces (``base.SHARE_REPLACED_WEIGHTS``)."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.quantization import casts
from mis_lightning.quantization import torchao_backend as tb


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("dt", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
def test_float8_nan_from_bits_is_isnan_on_every_pattern(monkeypatch, dt, on):
    monkeypatch.setattr(tb, "FLOAT8_NAN_FROM_BITS", on)
    base = torch.tensor([0x38, 0x00, 0x80, 0x01], dtype=torch.uint8)  # finite patterns of every format
    for i in range(256):
        t = torch.cat([base, torch.tensor([i], dtype=torch.uint8)]).view(dt)
        assert tb._float8_has_nan(t) == bool(torch.isnan(t.to(torch.float32)).any()), (dt, i)
    assert not tb._float8_has_nan(torch.empty(0, dtype=dt))


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("src", [torch.float32, torch.float64])
def test_cast_overflow_from_extremes_is_the_mask(monkeypatch, dt, src, on):
    monkeypatch.setattr(casts, "OVERFLOW_FROM_EXTREMES", on)
    top = torch.finfo(dt).max
    mid = (top + 2.0 ** math.ceil(math.log2(top))) / 2  # the overflow midpoint: ties go to inf
    inf, nan = float("inf"), float("nan")
    ulp = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}[src] * mid
    for v in (1.0, top, -top, mid - ulp, -(mid - ulp), mid, -mid, 2 * mid, inf, -inf, nan):
        w = torch.tensor([0.5, -0.25, v], dtype=src)
        cast = w.to(dt)
        truth = bool((torch.isinf(cast) & torch.isfinite(w)).any())
        assert casts._overflows(w, cast) == truth, (dt, src, v)
    assert not casts._overflows(torch.empty(0, dtype=src), torch.empty(0, dtype=dt))
