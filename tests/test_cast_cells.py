"""The value tables' cells at and beyond a format's largest value against the real casts (fh38).

* ``bf16`` / ``fp16`` casts (torch's ``.to(dtype)``) overflow to ``inf`` from the midpoint
  between the largest finite value and the next power of two (65520; 3.3961775e38): the
  grid's table (``casts.cast_cell_values``) ends in that power of two, standing for ``inf``, so
  its cells are the cast's; ``cell_value`` gives ``inf`` there, as the release holds.
* ``float8_weight_only`` (torchao) clamps ``w / scale`` to the format's largest value before
  its cast: saturation, the table's unbounded top cell holding the largest value (the raw
  ``float8_e5m2`` cast would give ``inf`` instead; torchao never asks for it).

Plus the kappa such a cell changes, against the test's own sums over every cell
(tests/test_table_open_cells.py's reference): before, fp16's 65504 cell ran on to infinity,
kappa 0.2 low at 65504 with sd 10 and 7e-5 low at sd 1e5 around 0."""

from __future__ import annotations

import math

import pytest
import torch
from _every_cell import _every_cell
from torch import nn

from mis_lightning.functional import table as T
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.casts import cast_cell_values, representable_values

F64 = torch.float64


def _probe(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 weights just below and just above every table edge (midpoint) that float32 can
    hold off the edge, and far beyond the ends (float32 max)."""
    mids = (0.5 * (values[1:] + values[:-1])).to(torch.float32)
    below = torch.nextafter(mids, torch.tensor(-math.inf))
    above = torch.nextafter(mids, torch.tensor(math.inf))
    big = torch.finfo(torch.float32).max
    return torch.cat([below, above, torch.tensor([big, -big, 0.999 * big, -0.999 * big])])


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_cells_are_the_casts(name, dtype):
    values = cast_cell_values(dtype)
    assert torch.equal(values[1:-1], representable_values(dtype))
    w = _probe(values, dtype)
    real = w.to(dtype).to(F64)  # the cast: +-inf from the overflow midpoint on
    mids = 0.5 * (values[1:] + values[:-1])
    cell = values[torch.searchsorted(mids, w.to(F64), right=True)]
    expect = torch.where(cell.abs() > float(torch.finfo(dtype).max), cell * math.inf, cell)
    assert torch.equal(real, expect)
    assert bool(torch.isinf(real).any())
    # the scheme's grid: its cells and released values (cell_value) are the real release's
    lin = nn.Linear(w.numel(), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w.reshape(1, -1))
    res = get_scheme(name).apply(lin)
    g = res.grids["weight"]
    assert torch.equal(g.values, values)
    released = res.model.weight.detach().reshape(-1).to(F64)
    assert torch.equal(released, real)
    assert torch.equal(g.cell_value(w.to(F64), 0, g.numel), released)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_release_saturates_as_the_table_cells(dtype):
    """torchao's float8 quantization of weights at and beyond the scale's range: the largest
    value (its clamp), never inf or NaN: the table's unbounded top cell."""
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    values = representable_values(dtype)
    top = float(torch.finfo(dtype).max)
    x = torch.tensor([0.5 * top, top, 1.01 * top, 1.2 * top, 3 * top, 1e6 * top], dtype=torch.float32)
    x = torch.cat([x, -x])
    scale = torch.tensor([1.0])
    q = qp._quantize_affine_float8(x, scale, float8_dtype=dtype).to(F64)
    mids = 0.5 * (values[1:] + values[:-1])
    assert torch.equal(q, values[torch.searchsorted(mids, x.to(F64), right=True)])
    assert bool(torch.isfinite(q).all())


@pytest.mark.parametrize("th,sg", [(65504.0, 10.0), (65504.0, 300.0), (60000.0, 3000.0), (0.01, 3e4),
                                   (0.01, 1e5), (-0.3, 1e6), (-70000.0, 2e4)])
def test_overflow_cell_kappa_against_every_cell(th, sg):
    """kappa on the cast's cells (the 65504 cell ending at 65520, inf beyond) within the paths'
    tolerance of the every-cell sums (the fine expansion's error where the reach covers 0:
    (32 / sd)^2 / 12, tests/test_table_open_cells.py; 1e-11 elsewhere); the finite table's
    cells read lower by up to 0.2 here (the difference asserted: the cell is not a no-op)."""
    values = cast_cell_values(torch.float16)
    t, s = torch.tensor([th], dtype=F64), torch.tensor([sg], dtype=F64)
    ref, _ = _every_cell(t, s, values)
    old, _ = _every_cell(t, s, representable_values(torch.float16).to(F64))
    got = T.table_cell_moments(t, s, values, torch.ones_like(t))
    tol = ((32.0 / sg) ** 2 / 12.0 if abs(th) < 8.5 * sg else 0.0) + 1e-11
    assert abs(float(got.kappa - ref)) <= tol
    assert float(ref - old) > 10 * tol
