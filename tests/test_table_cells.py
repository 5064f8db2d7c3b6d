"""The value cell of each weight on a value-table grid from the bits of its float64 position
(``TableLayout.cells``, the float-format fast path's lookup): exactly
``torch.searchsorted(mids, x, right=True)``, which it replaces (4-6x faster for bf16 / fp16,
docs/benchmarks.md), on every edge and value of the float formats, one ulp either side of each,
0, -0, +-inf, NaN, the smallest and largest doubles and random positions of every magnitude."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional.table import TableLayout
from mis_lightning.quantization.torchao_backend import representable_values

F64 = torch.float64


def _tables() -> dict[str, torch.Tensor]:
    out = {str(dt).split(".")[-1]: representable_values(dt).to(F64)
           for dt in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16)}
    g = torch.Generator().manual_seed(0)
    # not float formats: an asymmetric table with an edge at exactly 0, and random values
    out["asymmetric"] = torch.cat([torch.linspace(-3.0, -0.5, 50, dtype=F64), torch.tensor([0.5], dtype=F64),
                                   torch.linspace(1.0, 2.0, 40, dtype=F64)])
    out["random"] = torch.unique(torch.randn(500, generator=g, dtype=F64) * 10)
    return out


@pytest.mark.parametrize("name", sorted(_tables()))
def test_cells_equal_searchsorted(name):
    values = _tables()[name]
    layout = TableLayout(values, torch.device("cpu"))
    if name in ("float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"):
        assert layout._guide is not None  # the fast lookup is the one tested
    m = layout.mids
    g = torch.Generator().manual_seed(1)

    def nxt(t, d):
        return torch.nextafter(t, torch.full_like(t, d))

    sign = torch.randint(0, 2, (100_000,), generator=g) * 2 - 1
    x = torch.cat([
        m, nxt(m, math.inf), nxt(m, -math.inf), values, nxt(values, math.inf), nxt(values, -math.inf),
        torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 5e-324, -5e-324, 2.2e-308,
                      1.7976931348623157e308, -1.7976931348623157e308], dtype=F64),
        torch.exp(torch.empty(100_000, dtype=F64).uniform_(-745.0, 709.0, generator=g)) * sign,
        (torch.rand(100_000, generator=g, dtype=F64) * 2 - 1) * float(values.abs().max()) * 1.2,
    ])
    assert torch.equal(layout.cells(x), torch.searchsorted(m, x, right=True))
    # a non-contiguous float64 view and a float32 tensor (searchsorted on a cast) too
    assert torch.equal(layout.cells(x[::3]), torch.searchsorted(m, x[::3].contiguous(), right=True))
    x32 = x.float()
    assert torch.equal(layout.cells(x32), torch.searchsorted(m, x32.double(), right=True))
