"""The 16-bit casts' bootstrap draws kept at the main kappa where a bound allows it (cd50;
``assess.CAST_DRAWS_BOUNDED``, ``table.settled_drift_bound``).

The bound: where every position ``p`` in ``[theta - X sd, theta + X sd]`` is settled (its 8.5-sd
reach covers ``[-T, T]`` and stays within the finite cells, its own cell at most ``FINE_STEP`` sd),
``kappa(p) = 1 - h^2/12 + h^4/144`` with ``h`` at most the own cell's width at ``|theta| + X sd``
over sd, so ``|kappa(p) - k_main| <= max(h_R^2 / 12, 1 - k_main)``. Reference: ``table_cell_moments``
itself (what a draw evaluates) at 41 positions across the range and at its ends, on adversarial
elements: sd at the settling threshold each side, mixed fine and coarse cells, sd 0, fp16's spill
(reach past +-65520) and overflow (positions beyond it) elements, positions at binade edges.
Tolerance: the bound itself (it already carries 1e-15 for float64's rounding of the polynomial).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.functional.kernel import CUTOFF_SIGMAS
from mis_lightning.quantization.base import ParamGrid
from mis_lightning.quantization.casts import cast_cell_values

A = importlib.import_module("mis_lightning.assess")
F64 = torch.float64
CASTS = [torch.float16, torch.bfloat16]
D = 16


def _kappa(th: torch.Tensor, sg: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return T.table_cell_moments(th, sg, values, torch.ones_like(th), kappa_only=True).kappa


def _adversarial(dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(theta, sigma, X)``: elements around every regime boundary of the settle."""
    layout = T.table_layout(cast_cell_values(dtype), torch.device("cpu"))
    wide, top = layout.wide, layout.hi_edge
    n = 400
    th = torch.randn(n, dtype=F64, generator=gen) * torch.exp(torch.randn(n, dtype=F64, generator=gen) * 3)
    x = torch.rand(n, dtype=F64, generator=gen) * 4.0
    sg = torch.exp(torch.randn(n, dtype=F64, generator=gen) * 2) * (th.abs() + wide)
    # sd at the reach threshold |theta| + X sd + T = 8.5 sd, each side by a hair
    thr = (th.abs() + wide) / (CUTOFF_SIGMAS - x)
    near = torch.cat([thr * (1 + 1e-9), thr * (1 - 1e-9), thr * (1 + 1e-3)])
    th, x, sg = th.repeat(4), x.repeat(4), torch.cat([sg, near])
    # sd 0; positions from theta at a binade's edge (the own cell doubles past it)
    edge = torch.tensor([2.0 ** k for k in range(-6, 8)], dtype=F64)
    th = torch.cat([th, torch.zeros(3), edge * (1 - 1e-7), -edge])
    sg = torch.cat([sg, torch.zeros(3), edge * 0.4, edge * 0.3])
    x = torch.cat([x, torch.full((3,), 2.0), torch.full((2 * edge.numel(),), 2.857)])
    # coarse: sd of 0.3 - 3 own cells around binade edges (the reach into the wider cells beyond;
    # windowed exact sums, not the settle)
    k = torch.arange(-4, 9, dtype=F64).repeat_interleave(8)
    cell = 2.0 ** k * (2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7)
    frac = torch.tensor([-3, -1, -0.5, 0, 0.2, 1, 2, 5], dtype=F64).repeat(13)
    th = torch.cat([th, 2.0 ** k + frac * cell])
    sg = torch.cat([sg, cell * torch.tensor([0.3, 0.5, 0.8, 1.2, 2.0, 3.0, 1.0, 0.7], dtype=F64).repeat(13)])
    x = torch.cat([x, torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64).repeat(26)])
    # 3 sd below a binade's edge, X 3, sd of 10 - 100 own cells: at the range's top half the reach
    # lies in cells twice as wide (exact window sums: a deficit ~2.5 h^2 / 12, theta-hat's ~h^2 / 12)
    k2 = torch.arange(-4, 9, dtype=F64).repeat_interleave(3)
    cell2 = 2.0 ** k2 * (2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8)
    sd2 = cell2 * torch.tensor([10.0, 30.0, 100.0], dtype=F64).repeat(13)
    th = torch.cat([th, 2.0 ** k2 - 1.5 * cell2 - 3.0 * sd2])  # (the top: the last narrow cell)
    sg = torch.cat([sg, sd2])
    x = torch.cat([x, torch.full((k2.numel(),), 3.0, dtype=F64)])
    # near the top: reach past the finite cells (fp16 spill), positions beyond them (overflow)
    big = torch.tensor([top * 0.5, top * 0.9, -top * 0.95, top * 1.2, 1e3, 7.7e3], dtype=F64)
    th = torch.cat([th, big, big])
    sg = torch.cat([sg, big.abs() / 8.0, big.abs() * 0.5 + 1e4])
    x = torch.cat([x, torch.full((2 * big.numel(),), 2.9)])
    return th, sg, x


@pytest.mark.parametrize("dtype", CASTS)
def test_bound_holds_against_each_position(dtype):
    """Every finite bound covers the change of kappa at 43 positions across ``[-X, X]`` sd;
    sd 0 and the fp16 elements reaching past +-65520 get no bound; the bound is finite for most
    elements (not vacuous) and within 2x of the largest change seen on some (tight)."""
    values = cast_cell_values(dtype)
    th, sg, x = _adversarial(dtype, torch.Generator().manual_seed(5))
    k_main = _kappa(th, sg, values)
    bound = T.settled_drift_bound(th, sg, x, k_main, values)
    fin = torch.isfinite(bound)
    assert bool((bound[sg == 0] == math.inf).all())
    layout = T.table_layout(values, torch.device("cpu"))
    past = th.abs() + (x + CUTOFF_SIGMAS) * sg >= layout.hi_edge
    assert bool(past.any()) and bool((bound[past] == math.inf).all())
    assert int(fin.sum()) > th.numel() // 3
    t = torch.cat([torch.linspace(-1.0, 1.0, 41, dtype=F64), torch.tensor([-1.0, 1.0], dtype=F64) * (1 - 1e-15)])
    worst = torch.zeros_like(th)
    for u in t:
        p = th + sg * (x * u)
        worst = torch.maximum(worst, (_kappa(p, sg, values) - k_main).abs())
    assert bool((worst[fin] <= bound[fin]).all()), float((worst - bound)[fin].max())
    # a main kappa from elsewhere (0.5): the bound covers its own deficit; outside [0, 1]: none
    half = T.settled_drift_bound(th, sg, x, torch.full_like(k_main, 0.5), values)
    assert bool((half[fin] >= 0.5).all())
    assert bool((T.settled_drift_bound(th, sg, x, k_main + 2.0, values) == math.inf).all())
    # tight where the change is the own cell's (no sd-0, not 1 - k_main dominated): some within 2x
    live = fin & (worst > 0)
    assert bool((worst[live] * 2.0 >= bound[live]).any())


@pytest.mark.parametrize("dtype", CASTS)
def test_monotone_cells(dtype):
    """The bound's premise: a 16-bit cast's own cells never narrow as ``|value|`` grows (checked
    over every finite cell of the table)."""
    layout = T.table_layout(cast_cell_values(dtype), torch.device("cpu"))
    mids = layout.mids
    w = mids[1:] - mids[:-1]
    centre = 0.5 * (mids[1:] + mids[:-1])
    pos, neg = w[centre > 0], w[centre < 0].flip(0)
    assert bool((pos[1:] >= pos[:-1]).all()) and bool((neg[1:] >= neg[:-1]).all())


def _cast_grid(dtype: torch.dtype, rows: int, cols: int) -> ParamGrid:
    return ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                     bits_per_weight=16.0, scale=torch.ones(1, 1), block_size=(rows, cols),
                     values=cast_cell_values(dtype), release_dtype=dtype)


@pytest.mark.parametrize("dtype", CASTS)
def test_switch_keeps_main_within_bound(dtype, monkeypatch):
    """A chunk like the 1e7 MLP's first layer (sd ~30x |theta|): with the switch the draws' parts
    are zero (no evaluation); without it the 8 evaluated positions' kappa lie within
    ``CAST_DRAWS_TOL`` (fp16: the default; bf16: 1e-4) and within each element's bound of the main
    kappa. A chunk holding one
    fp16 element past +-65520 (or one sd-0 weight beside a coarse one) is evaluated as before,
    bitwise. Fails with the switch's branch removed (parts not zero)."""
    rows, cols = 16, 64
    c = rows * cols
    gen = torch.Generator().manual_seed(11)
    g = _cast_grid(dtype, rows, cols)
    th = torch.randn(c, dtype=F64, generator=gen) * 0.02
    sg = (th.abs() + 0.01) * 30.0
    k_main = _kappa(th, sg, g.values)
    xi = torch.randn(A._draw_noise_rows(D), c, dtype=F64, generator=gen)
    pos = torch.cat([torch.stack([xi[0], -xi[0], xi[1], -xi[1]]),
                     A._GH_X[A._GH_X != 0].unsqueeze(-1).expand(-1, c)])
    if dtype == torch.bfloat16:  # (bf16's bound here ~4e-5: above the default, fp16's ~7e-7 below it)
        monkeypatch.setattr(A, "CAST_DRAWS_TOL", 1e-4)
    monkeypatch.setattr(A, "CAST_DRAWS_BOUNDED", False)
    exact, _, _ = A._draw_parts(g, th, sg, 0, c, k_main, xi, D, None, table_at_once=True)
    ev, _ = A._evaluated_draws(g, th, sg, 0, c, k_main, pos, None, table_at_once=True)
    bound = T.settled_drift_bound(th, sg, pos.abs().amax(0), k_main, g.values)
    assert bool(((ev - k_main).abs() <= bound).all()) and bool((bound <= A.CAST_DRAWS_TOL).all())
    assert bool((exact != 0).any())  # the exact path moves: the switch changes something
    monkeypatch.setattr(A, "CAST_DRAWS_BOUNDED", True)
    basis, mix, _ = A._draw_parts(g, th, sg, 0, c, k_main, xi, D, None, table_at_once=True)
    assert bool((basis == 0).all()) and mix.shape == (D, 1 + (D + 1) // 2)
    # one element past the bound (fp16: its reach beyond +-65520; bf16: sd 0 beside a coarse cell
    # is still, so a coarse element instead): the chunk evaluated, bitwise the switch off's
    th2, sg2 = th.clone(), sg.clone()
    if dtype == torch.float16:
        th2[5], sg2[5] = 3e4, 1e4
    else:
        th2[5], sg2[5] = 1.5, 1e-3
    k2 = _kappa(th2, sg2, g.values)
    on, _, _ = A._draw_parts(g, th2, sg2, 0, c, k2, xi, D, None, table_at_once=True)
    monkeypatch.setattr(A, "CAST_DRAWS_BOUNDED", False)
    off, _, _ = A._draw_parts(g, th2, sg2, 0, c, k2, xi, D, None, table_at_once=True)
    assert torch.equal(on, off) and bool((off != 0).any())
