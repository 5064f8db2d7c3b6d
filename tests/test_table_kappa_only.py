"""``kappa_only`` on the value tables' path (tb36): the pool protocol's calls and the draws read
``kappa`` alone, so ``table_cell_moments`` (given it by ``ParamGrid._path_moments``) leaves the
settled elements' ``mean_abs`` and ``m4`` uncomputed (NaN); ``kappa`` is bitwise the full call's,
on every regime of the 16-bit casts and float8 (settled, windowed, runs, core, interpolated), and
through ``ParamGrid.moments``."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import fastpath
from mis_lightning.functional import table as T
from mis_lightning.quantization.base import ParamGrid
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64


def _weights(dtype: torch.dtype, c: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Weights and sds over every regime: sd 0, far below a cell, spanning the table, beyond it."""
    vals = representable_values(dtype)
    top = float(vals.max())
    g = torch.Generator().manual_seed(seed)
    sc = torch.ones(c, dtype=F64) if dtype != torch.float8_e4m3fn else \
        torch.exp(torch.empty(c, dtype=F64).uniform_(-8.0, -2.0, generator=g))
    th = torch.randn(c, generator=g, dtype=F64) * sc * torch.exp(torch.empty(c, dtype=F64).uniform_(-6, 6, generator=g))
    th = th.clamp(-1.1 * top * sc, 1.1 * top * sc)
    sg = th.abs() * torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1e-5), math.log(1e3), generator=g))
    sg[:: 7] = 0.0
    return vals, th, sg, sc


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("c", [3000, 1 << 15])
def test_kappa_only_table_moments_are_bitwise_the_full_kappa(dtype, c):
    vals, th, sg, sc = _weights(dtype, c, 4)
    full = T.table_cell_moments(th, sg, vals, sc)
    ko = T.table_cell_moments(th, sg, vals, sc, kappa_only=True)
    assert torch.equal(ko.kappa, full.kappa)
    if dtype != torch.float8_e4m3fn:  # the 16-bit casts settle most elements by their own cell
        assert bool(torch.isnan(ko.m4).any()) and bool(torch.isnan(ko.mean_abs).any())


def test_grid_pool_calls_pass_kappa_only_to_the_table(monkeypatch):
    """``ParamGrid.moments(kappa_only=True)`` on a value table asks the table path for kappa alone,
    and its kappa is the full call's."""
    vals = representable_values(torch.float16)
    rows, cols = 64, 128
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=16.0, scale=torch.ones(rows, 1, dtype=F64), block_size=(1, cols), values=vals)
    _, th, sg, _ = _weights(torch.float16, rows * cols, 9)
    seen = []
    real = T.table_cell_moments

    def spy(*a, **kw):
        seen.append(kw.get("kappa_only", False))
        return real(*a, **kw)

    import mis_lightning.quantization.base as base
    monkeypatch.setattr(base, "table_cell_moments", spy)
    full = g.moments(th, sg, 0, rows * cols)
    ko = g.moments(th, sg, 0, rows * cols, kappa_only=True)
    assert seen == [False, True]
    assert torch.equal(full.kappa, ko.kappa)


def _pool_alone_and_spy(monkeypatch, c: int):
    """fp16 weights of ``c`` elements, the pool protocol's kappa computed alone (no sharing), and
    ``located``: the sizes ``_own_facts`` locates cells for from now on (sharing on)."""
    vals, th, sg, sc = _weights(torch.float16, c, 11)
    # the path's periodic self-check (every RECHECK_EVERY calls of the process) locates cells for
    # its reference: where the suite's earlier calls land one on this test's pool call it counts as
    # located again; the counting is about the cell sharing alone
    monkeypatch.setattr(fastpath, "RECHECK_EVERY", 1 << 40)
    monkeypatch.setattr(T, "SHARE_OWN_CELLS", False)
    alone = T.table_cell_moments(th, sg / math.sqrt(2.0), vals, sc, kappa_only=True).kappa
    monkeypatch.setattr(T, "SHARE_OWN_CELLS", True)
    located: list[int] = []
    real = T._own_facts
    monkeypatch.setattr(T, "_own_facts", lambda *a, **kw: located.append(a[0].shape[0]) or real(*a, **kw))
    return vals, th, sg, sc, alone, located


@pytest.mark.parametrize("c", [3000, 3 * (1 << 15) + 17])
def test_pool_call_reads_the_main_calls_own_cells(c, monkeypatch):
    """The pool protocol's kappa-only call on the same weight and scale tensors as the main call
    (sd / sqrt 2) reads the main call's own cells (``SHARE_OWN_CELLS``) instead of locating them
    again, bitwise what it computes alone; a weight tensor modified in place, or another one,
    recomputes them; the entry serves one call."""
    vals, th, sg, sc, alone, located = _pool_alone_and_spy(monkeypatch, c)
    T.table_cell_moments(th, sg, vals, sc)
    n_main = len(located)
    assert n_main >= 1 and sum(located) == c
    pool = T.table_cell_moments(th, sg / math.sqrt(2.0), vals, sc, kappa_only=True).kappa
    assert len(located) == n_main  # read, not located again
    assert torch.equal(pool, alone)
    assert T._OWN_CELLS == []  # taken out by the call it served
    # a second kappa-only call locates its cells itself
    again = T.table_cell_moments(th, sg / math.sqrt(2.0), vals, sc, kappa_only=True).kappa
    assert len(located) == 2 * n_main and torch.equal(again, alone)
    # a weight tensor changed in place after the main call: recomputed, its own values
    T.table_cell_moments(th, sg, vals, sc)
    th2 = th.clone()
    th.mul_(1.5)
    moved = T.table_cell_moments(th, sg / math.sqrt(2.0), vals, sc, kappa_only=True).kappa
    monkeypatch.setattr(T, "SHARE_OWN_CELLS", False)
    assert torch.equal(moved, T.table_cell_moments(th2 * 1.5, sg / math.sqrt(2.0), vals, sc, kappa_only=True).kappa)


def test_release_own_cells_frees_the_kept_entry():
    vals, th, sg, sc = _weights(torch.float16, 4000, 13)
    T.table_cell_moments(th, sg, vals, sc)
    assert len(T._OWN_CELLS) == 1
    T.release_own_cells()
    assert T._OWN_CELLS == []


def test_pool_call_reads_a_kappa_only_main_calls_own_cells(monkeypatch):
    """``SHARE_OWN_CELLS_KAPPA_ONLY`` (p47b): a kappa-only main call (``assess.MAIN_KAPPA_ONLY``)
    keeps the cells it located too, and the pool protocol's call reads them: bitwise its own
    kappa, the entry taken out; with the switch off it locates them again."""
    vals, th, sg, sc, alone, located = _pool_alone_and_spy(monkeypatch, 3000)
    for on in (True, False):
        monkeypatch.setattr(T, "SHARE_OWN_CELLS_KAPPA_ONLY", on)
        T.release_own_cells()
        located.clear()
        T.table_cell_moments(th, sg, vals, sc, kappa_only=True)
        n_main = len(located)
        assert n_main >= 1
        pool = T.table_cell_moments(th, sg / math.sqrt(2.0), vals, sc, kappa_only=True).kappa
        assert torch.equal(pool, alone)
        assert len(located) == (n_main if on else 2 * n_main)
        assert T._OWN_CELLS == [] or not on


@pytest.mark.parametrize("c", [4096, 1 << 16])
def test_pool_call_reads_the_main_calls_live_gathers(c, monkeypatch):
    """``quantization.base.SHARE_LIVE_GATHERS`` (p48a): on a chunk mostly of sd-0 point masses
    (the 1e7 MLP's second layer) ``ParamGrid.moments`` gives the table path the live elements as
    gathered tensors; the pool protocol's call (sd / sqrt 2, the same weight tensor) gets the main
    call's, so the main call's own cells serve it (``_own_facts`` located once): kappa bitwise the
    switch off's, where each call gathers and locates its own."""
    import mis_lightning.quantization.base as base

    monkeypatch.setattr(fastpath.GUARD, "sample_size", lambda path, c: 0)  # (no self-check locating cells too)
    vals = representable_values(torch.float16)
    cols = 128
    g = ParamGrid(name="w", shape=(c // cols, cols), kind="table", dequantized=torch.zeros(c // cols, cols),
                  bits_per_weight=16.0, scale=torch.ones(c // cols, 1, dtype=F64), block_size=(1, cols), values=vals)
    _, th, sg, _ = _weights(torch.float16, c, 17)
    gen = torch.Generator().manual_seed(3)
    sg[torch.rand(c, generator=gen) < 0.9] = 0.0  # point masses but for ~10% live weights
    located: list[int] = []
    real = T._own_facts
    monkeypatch.setattr(T, "_own_facts", lambda *a, **kw: located.append(a[0].shape[0]) or real(*a, **kw))
    out = {}
    for on in (False, True):
        monkeypatch.setattr(base, "SHARE_LIVE_GATHERS", on)
        base.release_chunk_facts()
        T.release_own_cells()
        located.clear()
        main = g.moments(th, sg, 0, c, kappa_only=True).kappa
        n_main = len(located)
        pool = g.moments(th, sg / math.sqrt(2.0), 0, c, kappa_only=True).kappa
        out[on] = (main, pool, n_main, len(located))
    assert out[False][2] >= 1 and out[False][3] == 2 * out[False][2]
    assert out[True][3] == out[True][2] == out[False][2]  # the pool call located nothing
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert base._LIVE_GATHERS == []  # taken out by the call it served
    # a weight tensor changed in place between the calls: gathered again, its own values. Only live
    # weights move (by 0.1%: the same live indices), so the index comparison alone cannot refuse the
    # main call's gathers: the version key must (rv48: th.mul_(1.25) moved which weights are live)
    monkeypatch.setattr(base, "SHARE_LIVE_GATHERS", True)
    g.moments(th, sg, 0, c, kappa_only=True)
    ii = base._LIVE_GATHERS[-1][1]
    th.index_put_((ii[:5],), th.index_select(0, ii[:5]) * 1.001)
    moved = g.moments(th, sg / math.sqrt(2.0), 0, c, kappa_only=True).kappa
    monkeypatch.setattr(base, "SHARE_LIVE_GATHERS", False)
    base.release_chunk_facts()
    assert torch.equal(moved, g.moments(th.clone(), sg / math.sqrt(2.0), 0, c, kappa_only=True).kappa)
