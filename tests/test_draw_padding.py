"""The bootstrap draws' padded positions (``assess._padded_positions``, ``DRAW_PAD_BY_MASK``): the
positions that can move plus the first position-free ones up to the fused path's size, ascending,
as one ``nonzero`` of a mask instead of a ``sort`` of the two lists. Pinned against an independent
reference (Python's ``sorted`` of the union), and the draws of ``_evaluated_draws`` and
``_affine_draws_at_once`` bit for bit with the switch off (the sort), padding included."""

from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mis_lightning.functional import affine, kernel
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
    monkeypatch.setattr(A, "DRAW_POSITIONS_UNPADDED", False)  # (the padding's two forms)
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


def _with_calls(monkeypatch, g, fn) -> tuple[torch.Tensor, list[tuple[int, int | None]]]:
    """``fn()`` and each ``g.element_moments`` call's ``(elements, path_elements)`` in it."""
    calls: list[tuple[int, int | None]] = []
    em = type(g).element_moments

    def spy(self, theta, *a, **k):
        calls.append((theta.shape[0], k.get("path_elements")))
        return em(self, theta, *a, **k)

    monkeypatch.setattr(type(g), "element_moments", spy)
    GUARD.reset()
    try:
        return fn(), calls
    finally:
        monkeypatch.setattr(type(g), "element_moments", em)


def _pairs_draws(monkeypatch, unpadded: bool, g, args) -> tuple[torch.Tensor, list[tuple[int, int | None]]]:
    """``_affine_draws_at_once`` with ``DRAW_PAIRS_UNPADDED`` set, and its ``element_moments`` calls."""
    monkeypatch.setattr(A, "DRAW_PAIRS_UNPADDED", unpadded)
    return _with_calls(monkeypatch, g, lambda: A._affine_draws_at_once(*args))


def test_affine_draw_pairs_alone_on_the_padded_calls_path(monkeypatch):
    """A sample's pairs (``D c`` below ``TABLE_MIN_ELEMENTS``) of a chunk of at least that many
    (``_chunk_elements``, as ``_sampled_draw_parts`` marks it): evaluated alone with
    ``path_elements`` (``DRAW_PAIRS_UNPADDED``), bit for bit the draws of the call padded with
    repeats to the fused kernel's size, which they take (not the sparse form of a call of their
    own size)."""
    g, w, sigma, gen = _grid_and_weights(2, 512, 7, seed=56, bounded=False)  # (no closed form first)
    c = w.numel()
    k_main = g.moments(w, sigma, 0, c).kappa
    xi = torch.randn(8, c, generator=gen, dtype=F64)
    free = (torch.rand(8, c, generator=gen) > 0.5)  # ~4k movers of 2^13 pairs
    g._chunk_elements = affine.TABLE_MIN_ELEMENTS  # (the sampled chunk's size)
    args = (g, w, sigma, 0, c, k_main, xi, free, None)
    fused = kernel._fused_kernel
    n_fused = [0]

    def spy(*a, **k):
        n_fused[0] += 1
        return fused(*a, **k)

    monkeypatch.setattr(kernel, "_fused_kernel", spy)
    new, calls_new = _pairs_draws(monkeypatch, True, g, args)
    old, calls_old = _pairs_draws(monkeypatch, False, g, args)
    n = int((~free).sum())
    assert calls_old == [(affine.TABLE_MIN_ELEMENTS, None)]  # padded with repeats
    assert calls_new == [(n, affine.TABLE_MIN_ELEMENTS)]  # the pairs alone
    assert n_fused[0] == 2  # both on the fused kernel
    assert torch.equal(new, old)
    assert bool((new[~free] != k_main.expand(8, c)[~free]).any())  # the draws move kappa
    del g._chunk_elements  # a chunk of its own size: its own call's (sparse) path
    _, calls_own = _pairs_draws(monkeypatch, True, g, args)
    assert calls_own == [(n, None)] and n_fused[0] == 2


def test_path_elements_refused_where_not_affine_or_below_the_call():
    g, w, sigma, _ = _grid_and_weights(2, 64, 7, seed=1)
    c = w.numel()
    scale, zp, _ = g.element_grid(0, c)
    with pytest.raises(ValueError, match="path_elements=10"):
        g.element_moments(w, sigma, scale, zp, None, g.element_bounds(0, c), None, path_elements=10)
    t = replace(g, kind="table", values=torch.tensor([-1.0, 0.0, 1.0], dtype=F64), qmin=0, qmax=0)
    with pytest.raises(ValueError, match="affine grid without storage_dtype"):
        t.element_moments(w, sigma, scale, zp, None, g.element_bounds(0, c), None, path_elements=2 * c)


@pytest.mark.parametrize("at_once", [False, True])
def test_draw_movers_alone_on_the_padded_calls_path(at_once, monkeypatch):
    """``DRAW_POSITIONS_UNPADDED``: a draw's movers (fewer than ``TABLE_MIN_ELEMENTS``, of a call of
    at least that many) evaluated alone with ``path_elements``, not padded with position-free
    elements: the movers' kappa bit for bit the padded call's, every position-free element at
    ``k_main`` exactly, where the padding recomputed the padded ones within the shortcut's tolerance."""
    rows, cols = (64, 600) if not at_once else (16, 512)
    g, w, sigma, gen = _grid_and_weights(rows, cols, 127, seed=56 + at_once)
    c = w.numel()
    scale, zp, _ = g.element_grid(0, c)
    # (at theta-hat on the fused kernel's path too, as a sampled chunk's main call of 2^16 weights)
    k_main = g.element_moments(w, sigma, scale, zp, None, g.element_bounds(0, c),
                               path_elements=max(c, affine.TABLE_MIN_ELEMENTS)).kappa
    D = 2 if not at_once else 8  # (a position's call is 2^15: two of them)
    xi = torch.randn(D, c, generator=gen, dtype=F64)
    real = A._position_free(g, w, sigma, 0, c, xi, k_main)  # (those whose kappa the shortcut keeps)
    assert real is not None
    # movers below 2^15 (a position's, or all): some others declared free too (their kappa unchecked)
    free = real | (torch.rand(D, c, generator=gen) > (0.2 if not at_once else 0.1))

    def run(unpadded: bool):
        monkeypatch.setattr(A, "DRAW_POSITIONS_UNPADDED", unpadded)
        if at_once:
            return _with_calls(monkeypatch, g, lambda: A._affine_draws_at_once(g, w, sigma, 0, c, k_main, xi, free, None))
        return _with_calls(monkeypatch, g, lambda: A._evaluated_draws(g, w, sigma, 0, c, k_main, xi, None,
                                                                      freedom=(free,))[0])

    new, calls_new = run(True)
    old, calls_old = run(False)
    movers = (~free).sum(1).tolist() if not at_once else [int((~free).sum())]
    assert calls_old == [(affine.TABLE_MIN_ELEMENTS, None)] * len(movers)
    assert calls_new == [(m, affine.TABLE_MIN_ELEMENTS) for m in movers]
    moved, kept = ~free, k_main.expand(D, c)
    assert torch.equal(new[moved], old[moved])  # the movers: the padded call's kappa
    assert torch.equal(new[free], kept[free])  # the position-free ones: k_main
    padded = real & (old != kept)
    assert bool(padded.any())  # (the padding recomputed some position-free ones) ...
    assert float((old - kept)[padded].abs().max()) <= A.POSITION_FREE_WIDE_TOL  # ... within the shortcut's tolerance
