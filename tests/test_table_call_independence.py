"""An element's cell moments on the bf16 / fp16 value tables do not depend on the other elements
of its call (fx49): each of 200 elements of every regime (settled, windowed runs, the core in
closed form, exact windows, ties, the overflow cells) alone, then all in one call and in the
reversed order: every field bitwise the same, full and kappa-only calls.

Before, the windowed path's sums over a window's cells or runs were torch's ``sum(0)``, which
groups a column's rows by the column's position and the tensor's width (7 / 13 of 300 such
elements 4.4e-16 apart, p48a), and a call with nothing settled skipped the overflow closed form
(5e-15). ``cells.FIXED_ORDER_SUMS`` (each column first row to last) and ``_table_sum_moments``'
one path fix both. (float8 tables are not covered: calls from 4096 elements on read the
interpolation table, a path chosen by the call's size, within 1e-13 of the exact sums.)"""

from __future__ import annotations

import pytest
import torch

from mis_lightning.functional import fastpath as fp
from mis_lightning.functional import table as T
from mis_lightning.quantization.casts import cast_cell_values

F64 = torch.float64


def _elements(values: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    top = float(values[-2])
    th = (torch.rand(n, generator=g, dtype=F64) * 2 - 1) * torch.exp(torch.randn(n, generator=g, dtype=F64) * 4) * top / 50
    sg = th.abs().clamp_min(1e-3) * torch.exp(torch.randn(n, generator=g, dtype=F64) * 3) * 0.01
    mids = 0.5 * (values[1:] + values[:-1])
    th[:4] = mids[[100, 5000, 30000, 40000]]  # ties: sd-0 weights on an edge
    sg[:4] = 0.0
    th[4:8] = torch.tensor([7e4, -9e4, 1e5, 3e5], dtype=F64)  # beyond fp16's overflow edge
    sg[4:8] = torch.tensor([15000.0, 15999.0, 3e4, 1e6], dtype=F64)
    return th, sg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_an_element_alone_and_in_any_call_bitwise(dtype, kappa_only, monkeypatch):
    monkeypatch.setattr(fp.GUARD, "sample_size", lambda *a, **k: 0)  # (the fast paths' own numbers)
    values = cast_cell_values(dtype)
    th, sg = _elements(values, 200, 0)
    sc = torch.ones_like(th)

    def fields(m):
        return torch.stack([m.kappa, m.mean_abs, m.m4, m.coverage], 1).nan_to_num(nan=-7.0)

    alone = torch.cat([fields(T.table_cell_moments(th[i:i + 1], sg[i:i + 1], values, sc[i:i + 1], kappa_only=kappa_only))
                       for i in range(th.numel())])
    together = fields(T.table_cell_moments(th, sg, values, sc, kappa_only=kappa_only))
    reversed_ = fields(T.table_cell_moments(th.flip(0), sg.flip(0), values, sc, kappa_only=kappa_only)).flip(0)
    assert torch.equal(together, alone), (together - alone).abs().max(0)
    assert torch.equal(reversed_, alone)
