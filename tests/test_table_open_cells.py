"""Value-table weights whose fine-grid expansion's 8.5-sd reach passes the table's finite cells
into the unbounded end cells (``table._open_fine_moments``; fp16 weights near 0 with sds of
~4e3 and more: the 1e7 benchmark MLP's second layer under ``fp16``). Before, the fast path,
the draws and the self-check's reference all took the expansion alone there: kappa 1 where
the cells give 0.997 / 0.669 / 0.637 at sd 3e4 / 1e6 / 1e8 (tb37).

Reference: the test's own float64 sums over every cell of the table (edges the midpoints of
consecutive finite values, enumerated here from the bit patterns; the two end cells
unbounded). Tolerance: the fine expansion's own error, ``(w_max / sd)^2 / 12`` with ``w_max``
the widest finite cell (fp16 32, bf16 2^120): the variances of the finite cells are taken
with the own cell's step (``_open_fine_moments``' docstring), plus 1e-12 for rounding."""

from __future__ import annotations

import math

import pytest
import torch
from _every_cell import _every_cell, _finite_values

from mis_lightning.functional import table as T
from mis_lightning.functional.kernel import CUTOFF_SIGMAS, REFERENCE_FINE_STEP
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64


def _cases(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    top = float(torch.finfo(dtype).max)
    if dtype == torch.float16:
        th = [0.01, -0.3, 2.0, 1500.0, -30000.0, 60000.0, 70000.0, -1e5]
        sg = [4.5e3, 8e3, 3e4, 1e5, 1e6, 1e8, 1e10]
    else:
        th = [0.5, -2.0, 1e30, 0.3 * top]
        sg = [0.07 * top, 0.2 * top, top, 10 * top]
    t, s = torch.meshgrid(torch.tensor(th, dtype=F64), torch.tensor(sg, dtype=F64), indexing="ij")
    return t.reshape(-1), s.reshape(-1)


def _open(th, sg, values):
    """Elements of the new regime: the reach covers 0 and passes the finite cells' ends."""
    mids = 0.5 * (values[1:] + values[:-1])
    r = CUTOFF_SIGMAS * sg
    return (th - r < 0) & (th + r > 0) & ((th - r < mids[0]) | (th + r >= mids[-1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_open_end_cells_against_every_cell(dtype):
    values = _finite_values(dtype)
    assert torch.equal(values, representable_values(dtype).to(F64))
    th, sg = _cases(dtype)
    sel = _open(th, sg, values)
    assert int(sel.sum()) >= 10
    th, sg = th[sel], sg[sel]
    ref_k, ref_m4 = _every_cell(th, sg, values)
    w_max = float((values[1:] - values[:-1]).max())
    tol = (w_max / sg) ** 2 / 12.0 + 1e-12
    one = torch.ones_like(th)
    full = T.table_cell_moments(th, sg, values, one)
    ko = T.table_cell_moments(th, sg, values, one, kappa_only=True)
    assert torch.equal(full.kappa, ko.kappa)
    err = full.kappa - ref_k
    assert bool((err.abs() <= tol).all()), (th[err.abs() > tol], sg[err.abs() > tol], err[err.abs() > tol])
    # m4: the same expansion (the finite cells' E[u^4|k] - mu^4 ~ c^2 w^2 / 2)
    assert bool(((full.m4 - ref_m4).abs() <= 6.0 * (1.0 + (th / sg) ** 2) * tol * 12).all())
    # the fast path's draws and pool calls meet the same cells: kappa well below 1 where most
    # of the mass lies beyond the table (the expansion alone read 1.0 there)
    far = sg > 20 * float(torch.finfo(dtype).max)
    if bool(far.any()):
        assert bool((full.kappa[far] < 0.7).all())
    # the self-check's reference (merged cells below 2e-3 sd, exact beyond): within its bound
    refc = T._table_cell_moments(th, sg, values, one, 18, REFERENCE_FINE_STEP, merge_sd=T.CHECK_MERGE_SD)
    assert bool(((refc.kappa - ref_k).abs() <= T.CHECK_MERGE_SD**2 / 4 + tol).all())


def test_settled_and_windowed_paths_agree_on_open_cells():
    """The settling pass and the windowed path give the open-cell elements the same numbers
    (a call mixing them with windowed elements; kappa-only too)."""
    values = representable_values(torch.float16).to(F64)
    g = torch.Generator().manual_seed(3)
    n = 5000
    th = torch.randn(n, generator=g, dtype=F64) * 100.0
    sg = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(1.0), math.log(1e9), generator=g))
    sc = torch.ones_like(th)
    assert int(_open(th, sg, values).sum()) > n // 4
    for ko in (False, True):
        before, cb = T._table_window_moments(th, sg, values, sc, ko)
        after, ca = T._table_sum_moments(th, sg, values, sc, ko)
        for f in ("kappa",) if ko else ("kappa", "mean_abs", "m4", "coverage"):  # kappa-only: kappa is read
            assert torch.equal(getattr(before, f), getattr(after, f)), (ko, f)
        assert torch.equal(cb, ca)
