"""The point-mass inside test on a float format's cells by the format's bits
(``TableLayout.format_inside``, ``FORMAT_INSIDE_BITS``, p46b): a weight it calls inside must be
inside its own cell of the table by more than the margin (soundness: the same
``min(x - lo, hi - x)`` numbers), and ``ParamGrid._inside`` must give the table's mask exactly,
the undecided ones tested there. Inputs that break a careless version: cell edges and ties
(midpoints), an ulp and 1e-9 around them, +-0 and the cell around 0, subnormals, the largest
finite values and the cells beyond (fp16 past 65520, float8's unbounded top cell), +-inf, NaN,
float64 values off the float32 grid; float8 with per-row scales and the release's bounds.
Exact (booleans)."""

import math

import pytest
import torch

import mis_lightning.functional.table as T
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.base import _POINT_MASS_MARGIN
from mis_lightning.quantization.casts import cast_cell_values, representable_values

F64 = torch.float64
CAST = (torch.float16, torch.bfloat16)


def _values(dt: torch.dtype) -> torch.Tensor:
    return cast_cell_values(dt) if dt in CAST else representable_values(dt)


def _inputs(dt: torch.dtype, n: int = 3000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    mids = T.table_layout(_values(dt), torch.device("cpu")).mids
    pick = lambda t: t[torch.randint(0, t.numel(), (n,), generator=gen)]  # noqa: E731
    m, v = pick(mids), pick(_values(dt))
    up, down = torch.tensor(math.inf, dtype=F64), torch.tensor(-math.inf, dtype=F64)
    top = float(torch.finfo(dt).max)
    parts = [torch.randn(n, generator=gen, dtype=F64) * 10.0 ** k for k in range(-12, 6, 2)]
    parts += [torch.randn(n, generator=gen).to(F64) * 10.0 ** k for k in (-6, -2, 0, 3)]  # float32 weights
    parts += [m, torch.nextafter(m, up), torch.nextafter(m, down), m + 1e-9, m - 1e-9, m * (1 + 3e-9),
              v, torch.nextafter(v, up), -v]
    parts.append(torch.tensor([0.0, -0.0, 1e-9, -1e-9, 2e-9, 5e-324, math.inf, -math.inf, math.nan,
                               top, -top, top * (1 + 2.0**-12), 432.0, 433.0, 65519.0, 65520.0, 65521.0,
                               3.3961775e38, 1e300], dtype=F64))
    return torch.cat(parts)


def _table_mask(layout, th, sc):
    cell = layout.cells(th / sc)
    lo, hi = layout.padded.index_select(0, cell) * sc, layout.padded.index_select(0, cell + 1) * sc
    return torch.minimum(th - lo, hi - th) > _POINT_MASS_MARGIN * sc


@pytest.mark.parametrize("dt", [*CAST, torch.float8_e4m3fn, torch.float8_e5m2])
def test_format_inside_is_sound_and_mostly_decides(dt):
    layout = T.table_layout(_values(dt), torch.device("cpu"))
    assert layout.format_dtype == dt
    x = _inputs(dt)
    scales = [None] if dt in CAST else [None, 0.37, 3e-3]
    for s in scales:
        th = x if s is None else x * s
        sc = torch.ones_like(th) if s is None else torch.full_like(th, s)
        fast = layout.format_inside(th, None if s is None else sc, _POINT_MASS_MARGIN)
        exact = _table_mask(layout, th, sc)
        assert not bool((fast & ~exact).any()), th[fast & ~exact][:8]  # never inside where the table says not
        assert int((fast & exact).sum()) > 0.8 * int(exact.sum())  # (a test that decides nothing is no cut)


@pytest.mark.parametrize("scheme", ["fp16", "bf16", "float8_weight_only"])
def test_inside_mask_equals_the_tables(monkeypatch, scheme):
    """``ParamGrid._inside`` on the grid's chunk facts (float8: per-row scales and absmax bounds):
    the same mask with the bits' test on and off."""
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(scheme, torch.float8_e4m3fn)
    x = _inputs(dt, 1000)
    x = x[torch.isfinite(x) & (x.abs() < 1e30)] if dt not in CAST else x
    rows = 8
    x = x[: x.numel() // rows * rows]
    w = x.reshape(rows, -1).to(torch.float32)
    if dt not in CAST:
        w = w * torch.logspace(-3, 1, rows).unsqueeze(1)
    lin = torch.nn.Linear(w.shape[1], rows)
    with torch.no_grad():
        lin.weight.copy_(w)
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    assert g.kind == "table" and T.table_layout(g.values, torch.device("cpu")).format_dtype is not None
    th = lin.weight.detach().reshape(-1).to(F64)
    scale, zp, code, _, bounds = g._chunk_grid(0, th.numel())
    got = g._inside(th, scale, zp, code, bounds)
    monkeypatch.setattr(T, "FORMAT_INSIDE_BITS", False)
    want = g._inside(th, scale, zp, code, bounds)
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < th.numel()


def test_other_tables_are_not_format_tables():
    """Tables that differ from a format's values (one value off, an end missing) take the table path."""
    assert T.table_layout(cast_cell_values(torch.float16)[:-1].clone(), torch.device("cpu")).format_dtype is None
    vals = cast_cell_values(torch.bfloat16).clone()
    vals[100] = vals[100] * (1 + 2.0**-20)
    assert T.table_layout(vals, torch.device("cpu")).format_dtype is None
    assert T.table_layout(representable_values(torch.float16), torch.device("cpu")).format_dtype is None
    nf4 = torch.linspace(-1, 1, 16, dtype=F64)
    assert T.table_layout(nf4, torch.device("cpu")).format_dtype is None
