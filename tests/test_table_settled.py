"""Value-table elements settled by their own cell (``table._settled``): frozen ones and fine
ones whose 8.5-sd reach covers ``[-T, T]`` (``TableLayout.wide``, so more than ``_MAX_WINDOW``
edges within reach) take the fine-grid expansion without the windowed path's regimes
(bf16 / fp16 weights whose sd spans 0: every weight of the 1e7 benchmark MLP; and on any
table, float8 too, the frozen ones, e.g. sd 0). The result
must be bit for bit the windowed path's (``_table_window_moments``, the path before), on
every element and the closed-form mask, whichever elements are settled."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.functional.kernel import _MAX_WINDOW
from mis_lightning.quantization.torchao_backend import representable_values

F64 = torch.float64
FIELDS = ("kappa", "mean_abs", "m4", "coverage")


def _mixed(n: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and sds across the regimes: sds spanning 0 (settled fine), sds of a few cells
    (windowed, runs, core), sd 0 (frozen), sds beyond the table's top, weights far out."""
    g = torch.Generator().manual_seed(seed)
    th = torch.randn(n, generator=g, dtype=F64) * 0.05 * scale
    kind = torch.randint(0, 6, (n,), generator=g)
    rel = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(1e-4), math.log(1e3), generator=g))
    sg = th.abs() * rel
    sg = torch.where(kind == 0, torch.zeros_like(sg), sg)  # frozen
    sg = torch.where(kind == 1, torch.full_like(sg, 0.7 * scale), sg)  # spans 0
    th = torch.where(kind == 2, th * 1e4, th)  # far from 0, small relative sd
    sg = torch.where(kind == 3, torch.full_like(sg, 1e5 * scale), sg)  # wider than fp16's range
    th = torch.where(kind == 4, torch.zeros_like(th), th)  # exactly on the zero value
    return th, sg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_settled_equals_windowed_path(dtype):
    """float8 (too few edges for ``wide``): frozen elements only are settled."""
    values = representable_values(dtype).to(F64)
    layout = T.table_layout(values, torch.device("cpu"))
    small = dtype == torch.float8_e4m3fn
    assert (layout.wide is None) if small else (layout.wide is not None and layout.wide > 0)
    for scale_kind, seed in (("one", 0), ("rows", 1)):
        n = 3 * (1 << 15) + 77  # several blocks of in_blocks and a ragged one
        th, sg = _mixed(n, 1.0, seed)
        sc = torch.ones_like(th) if scale_kind == "one" else torch.exp(torch.randn(n, dtype=F64) * 2)
        th = th * sc
        sg = sg * sc
        if small:  # float8 settles only when most weights have sd 0 (dead units): 60% here
            sg = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(seed + 9), dtype=F64) < 0.6,
                             torch.zeros_like(sg), sg)
        before, closed_before = T._table_window_moments(th, sg, values, sc)
        after, closed_after = T._table_sum_moments(th, sg, values, sc)
        for f in FIELDS:
            assert torch.equal(getattr(before, f), getattr(after, f)), (dtype, scale_kind, f)
        assert torch.equal(closed_before, closed_after)
        # the test covers both kinds of element: settled and windowed (a mixed call)
        _, _, _, done = T._settled(*T._float64_inputs(th, sg, sc), layout)
        assert 0.2 * n < int(done.sum()) < 0.9 * n
    # a call every element of which is settled returns at once, equal too
    th = torch.randn(1 << 16, dtype=F64) * 0.02
    sg = torch.zeros_like(th) if small else torch.full_like(th, 0.6)
    before, _ = T._table_window_moments(th, sg, values, torch.ones_like(th))
    after, closed = T._table_sum_moments(th, sg, values, torch.ones_like(th))
    assert not bool(closed.any())
    for f in FIELDS:
        assert torch.equal(getattr(before, f), getattr(after, f)), f


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_wide_span_is_the_least_edge_with_enough_edges(dtype):
    """``T``: more than ``2 * _MAX_WINDOW`` edges in ``[-T, T]`` (so a reach covering it needs
    more than ``_MAX_WINDOW`` on one side), and the positive edge below it has fewer; float8
    has too few edges for any (None: every element takes the windowed path)."""
    layout = T.TableLayout(representable_values(dtype).to(F64), torch.device("cpu"))
    m = layout.mids
    if m.numel() < 2 * _MAX_WINDOW:
        assert layout.wide is None
        return
    t = torch.tensor([layout.wide], dtype=F64)
    span = torch.searchsorted(m, t, right=True) - torch.searchsorted(m, -t, right=True)
    assert int(span) >= 2 * _MAX_WINDOW
    below = m[(m > 0) & (m < layout.wide)].max().reshape(1)
    span_below = torch.searchsorted(m, below, right=True) - torch.searchsorted(m, -below, right=True)
    assert int(span_below) < 2 * _MAX_WINDOW
