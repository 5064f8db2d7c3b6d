"""The point-mass inside test on a cast's cells by the dtype's bits (``TableLayout.cast_inside``,
``CAST_INSIDE_BITS``, p46b): a weight it calls inside must be inside its own cell of the table by
more than the margin (soundness: the same ``min(x - lo, hi - x)`` numbers), and
``ParamGrid._inside`` must give the table's mask exactly, the undecided ones tested there.
Inputs that break a careless version: cell edges and ties (midpoints), an ulp and 1e-9 around
them, +-0 and the cell around 0, subnormals, the largest finite values and the overflow cells
(fp16 past 65520), +-inf, NaN, float64 values off the float32 grid. Exact (booleans)."""

import math

import pytest
import torch

import mis_lightning.functional.table as T
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.base import _POINT_MASS_MARGIN
from mis_lightning.quantization.casts import cast_cell_values

F64 = torch.float64


def _inputs(dt: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    mids = T.table_layout(cast_cell_values(dt), torch.device("cpu")).mids
    pick = lambda t: t[torch.randint(0, t.numel(), (4000,), generator=gen)]  # noqa: E731
    m, v = pick(mids), pick(cast_cell_values(dt))
    up, down = torch.tensor(math.inf, dtype=F64), torch.tensor(-math.inf, dtype=F64)
    top = float(torch.finfo(dt).max)
    parts = [torch.randn(4000, generator=gen, dtype=F64) * 10.0 ** k for k in range(-12, 6, 2)]
    parts += [torch.randn(4000, generator=gen).to(F64) * 10.0 ** k for k in (-6, -2, 0, 3)]  # float32 weights
    parts += [m, torch.nextafter(m, up), torch.nextafter(m, down), m + 1e-9, m - 1e-9, m * (1 + 3e-9),
              v, torch.nextafter(v, up), -v]
    parts.append(torch.tensor([0.0, -0.0, 1e-9, -1e-9, 2e-9, 5e-324, math.inf, -math.inf, math.nan,
                               top, -top, top * (1 + 2.0**-12), 65519.0, 65520.0, 65521.0, 3.3961775e38, 1e300], dtype=F64))
    return torch.cat(parts)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_cast_inside_is_sound_and_mostly_decides(dt):
    layout = T.table_layout(cast_cell_values(dt), torch.device("cpu"))
    assert layout.cast_dtype == dt
    x = _inputs(dt)
    fast = layout.cast_inside(x, _POINT_MASS_MARGIN)
    cell = layout.cells(x)
    lo, hi = layout.padded.index_select(0, cell), layout.padded.index_select(0, cell + 1)
    exact = torch.minimum(x - lo, hi - x) > _POINT_MASS_MARGIN
    assert not bool((fast & ~exact).any()), x[fast & ~exact][:8]  # never inside where the table says not
    assert int((fast & exact).sum()) > 0.8 * int(exact.sum())  # (a test that decides nothing is no cut)


@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
def test_inside_mask_equals_the_tables(monkeypatch, scheme):
    """``ParamGrid._inside`` on a cast grid: the same mask with the bits' test on and off."""
    x = _inputs(torch.float16 if scheme == "fp16" else torch.bfloat16)
    lin = torch.nn.Linear(x.numel(), 1)
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    assert g.kind == "table" and T.table_layout(g.values, x.device).cast_dtype is not None
    scale, zp, code, _, bounds = g._chunk_grid(0, x.numel())
    got = g._inside(x, scale, zp, code, bounds)
    monkeypatch.setattr(T, "CAST_INSIDE_BITS", False)
    want = g._inside(x, scale, zp, code, bounds)
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < x.numel()


def test_other_tables_are_not_cast_tables():
    """A float8 table (and a cast table with one value changed) takes the table path."""
    assert T.table_layout(cast_cell_values(torch.float16)[:-1].clone(), torch.device("cpu")).cast_dtype is None
    vals = cast_cell_values(torch.bfloat16).clone()
    vals[100] = vals[100] * (1 + 2.0**-20)
    assert T.table_layout(vals, torch.device("cpu")).cast_dtype is None
    from mis_lightning.quantization.casts import representable_values
    assert T.table_layout(representable_values(torch.float8_e4m3fn), torch.device("cpu")).cast_dtype is None
