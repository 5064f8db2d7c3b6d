"""The bootstrap draws' padded positions (``assess._padded_positions``, ``DRAW_PAD_BY_MASK``): the
positions that can move plus the first position-free ones up to the fused path's size, ascending,
as one ``nonzero`` of a mask instead of a ``sort`` of the two lists. Pinned against an independent
reference (Python's ``sorted`` of the union), and the draws of ``_evaluated_draws`` and
``_affine_draws_at_once`` bit for bit with the switch off (the sort), padding included."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mis_lightning.functional import affine
from mis_lightning.functional.fastpath import GUARD
from tests.test_draw_kappa_only import _grid_and_weights

A = importlib.import_module("mis_lightning.assess")  # the module (the package exports the function)
F64 = torch.float64


class _Ops(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _reference(free: torch.Tensor, path_min: int) -> list[int]:
    moving = [i for i, f in enumerate(free.tolist()) if not f]
    pad = [i for i, f in enumerate(free.tolist()) if f][: path_min - len(moving)]
    return sorted(moving + pad)


@pytest.mark.parametrize("n, p_free, path_min", [
    (1, 1.0, 4), (7, 0.5, 8), (100, 0.0, 150), (100, 1.0, 64), (1000, 0.9, 300), (1000, 0.5, 2000),
    (70_000, 0.99, affine.TABLE_MIN_ELEMENTS), (70_000, 0.6, affine.TABLE_MIN_ELEMENTS)])
@pytest.mark.parametrize("by_mask", [True, False])
def test_padded_positions_are_the_sorted_union(n, p_free, path_min, by_mask, monkeypatch):
    monkeypatch.setattr(A, "DRAW_PAD_BY_MASK", by_mask)
    gen = torch.Generator().manual_seed(n + path_min)
    free = torch.rand(n, generator=gen) < p_free
    idx = torch.nonzero(~free).squeeze(-1)
    if idx.numel() >= path_min:  # (the callers pad only below the path's size)
        free[idx[path_min - 1:]] = True
        idx = torch.nonzero(~free).squeeze(-1)
    before = free.clone()
    with _Ops() as ops:
        got = A._padded_positions(free, idx, path_min)
    assert got.dtype == torch.int64 and got.tolist() == _reference(free, path_min)
    assert torch.equal(free, before)  # the caller's mask is not modified
    assert (ops.count["sort"] == 0) == by_mask


def _draws(fn, by_mask: bool, monkeypatch, *args) -> tuple[torch.Tensor, Counter[str]]:
    monkeypatch.setattr(A, "DRAW_PAD_BY_MASK", by_mask)
    GUARD.reset()
    with _Ops() as ops:
        out = fn(*args)
    return (out[0] if isinstance(out, tuple) else out), ops.count


def test_evaluated_draws_bitwise_with_the_sort(monkeypatch):
    """Per-position calls of a chunk of at least ``TABLE_MIN_ELEMENTS`` whose movers are fewer
    (each padded; the position-free mask given, ``freedom``): the same draws with either form,
    and the mask's form sorts nothing."""
    g, w, sigma, gen = _grid_and_weights(64, 600, 7, seed=52)
    c = w.numel()
    k_main = g.moments(w, sigma, 0, c).kappa
    xi = torch.randn(8, c, generator=gen, dtype=F64)
    free = torch.rand(8, c, generator=gen) > 0.1  # ~3.8k movers a position, below the path's 2^15
    args = (g, w, sigma, 0, c, k_main, xi, None)
    new, ops_new = _draws(lambda *a: A._evaluated_draws(*a, freedom=(free,)), True, monkeypatch, *args)
    old, ops_old = _draws(lambda *a: A._evaluated_draws(*a, freedom=(free,)), False, monkeypatch, *args)
    assert ops_old["sort"] == 8 and ops_new["sort"] == 0  # every position was padded
    assert torch.equal(new, old)
    assert bool((new[~free] != k_main.expand(8, c)[~free]).any())  # the draws move kappa


@pytest.mark.parametrize("movers", [1, 5_000, affine.TABLE_MIN_ELEMENTS - 1])
def test_affine_draws_at_once_bitwise_with_the_sort(movers, monkeypatch):
    """Every position's movers in one call, padded to ``TABLE_MIN_ELEMENTS`` pairs: the same draws
    with either form."""
    g, w, sigma, gen = _grid_and_weights(16, 512, 127, seed=movers)
    c = w.numel()
    k_main = g.moments(w, sigma, 0, c).kappa
    xi = torch.randn(8, c, generator=gen, dtype=F64)
    free = torch.ones(8 * c, dtype=torch.bool)
    free[torch.randperm(8 * c, generator=gen)[:movers]] = False
    free = free.reshape(8, c)
    args = (g, w, sigma, 0, c, k_main, xi, free, None)
    new, ops_new = _draws(A._affine_draws_at_once, True, monkeypatch, *args)
    old, ops_old = _draws(A._affine_draws_at_once, False, monkeypatch, *args)
    assert ops_old["sort"] > 0 and ops_new["sort"] == 0
    assert torch.equal(new, old)
    moved = ~free
    assert bool((new[moved] != k_main.expand(8, c)[moved]).any())
