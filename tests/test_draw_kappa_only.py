"""The bootstrap draws read only ``kappa``: ``kappa_only`` skips the ``mean_abs`` and ``m4``
terms of the eager cell-moment forms and of the bounded grids' outer-cell split. These tests
pin that the kappa is bitwise the one the full forms give, on every regime (frozen, fine,
fine near a clamped end, table, two-edge, exact window sums; bounds cut in the end cells and
inside inner cells), on both the per-regime path (small chunks) and the eager fused kernel
(chunks of at least ``TABLE_MIN_ELEMENTS``), and through ``assess._evaluated_draws``."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from mis_lightning.functional import affine, bounds, kernel
from mis_lightning.functional.fastpath import GUARD, verify_sample
from mis_lightning.quantization.base import ParamGrid

A = importlib.import_module("mis_lightning.assess")  # the module (the package exports the function)
F64 = torch.float64


def _grid_and_weights(rows: int, cols: int, qmax: int, seed: int, bounded: bool = True, qmin: int | None = None):
    """A per-row symmetric absmax grid (codes ``[-qmax - 1, qmax]``, scale ``absmax / qmax``,
    bounds ``[-absmax, absmax]`` as the release gives them) and weights whose sd ranges from
    far below the step (frozen) to many times the whole grid (fine, near both ends)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    absmax = w.abs().amax(1, keepdim=True)
    scale = absmax / qmax
    g = ParamGrid(name="w", shape=(rows, cols), kind="affine", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=float(math.log2(2 * qmax + 2)), scale=scale, block_size=(1, cols),
                  zero_point=torch.zeros(rows, 1, dtype=F64), qmin=-qmax - 1 if qmin is None else qmin, qmax=qmax)
    if bounded:
        g.support = (-absmax, absmax)
    c = rows * cols
    step = scale.expand(rows, cols).reshape(-1)
    # sd from 1e-3 to 3e2 steps (log-uniform): every regime of the cell-moment paths
    sigma = step * torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1e-3), math.log(3e2), generator=gen))
    return g, w.reshape(-1), sigma, gen


def _moments(g: ParamGrid, th, sg, kappa_only: bool):
    c = th.numel()
    scale, zp, _ = g.element_grid(0, c)
    return g.element_moments(th, sg, scale, zp, None, g.element_bounds(0, c), None, kappa_only=kappa_only)


@pytest.mark.parametrize("rows, cols", [(16, 250), (64, 600)])  # per-regime path; eager fused kernel
@pytest.mark.parametrize("qmax", [7, 127])
@pytest.mark.parametrize("bounded", [True, False])
def test_kappa_only_moments_are_bitwise_the_full_kappa(rows, cols, qmax, bounded):
    g, w, sigma, gen = _grid_and_weights(rows, cols, qmax, seed=qmax + cols, bounded=bounded)
    assert (rows * cols >= affine.TABLE_MIN_ELEMENTS) == (cols == 600)
    # weights off their trained values (the draws' positions), some beyond the bounds
    th = w + sigma * torch.randn(w.numel(), generator=gen, dtype=F64)
    GUARD.reset()
    full = _moments(g, th, sigma, kappa_only=False)
    GUARD.reset()
    fast = _moments(g, th, sigma, kappa_only=True)
    assert not GUARD.disabled
    assert torch.equal(fast.kappa, full.kappa)
    assert bool(torch.isfinite(full.kappa).all())


def test_kappa_only_forms_equal_the_full_forms_elementwise():
    """The kappa-only forms (the fine grid with end cells, the outer-cell split) against the
    full forms' kappa, bitwise, over edges and bounds of every sign, far and infinite."""
    vals = torch.tensor([-math.inf, -40.0, -8.6, -8.5, -3.0, -0.7, -1e-9, 0.0, 1e-9, 0.4, 2.0, 8.5, 9.0, 40.0,
                         math.inf], dtype=F64)
    a, b = torch.meshgrid(vals, vals, indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    keep = a <= b
    a, b = a[keep], b[keep]
    for h in (1e-3, 0.1, 0.5):
        h2 = torch.full_like(a, h * h)
        assert torch.equal(kernel._fine_with_ends_kappa(h2, a, b), kernel._fine_with_ends(h2, a, b)[0])
    fin = torch.isfinite(a)  # the split's edge e is finite; its bound b may be far or infinite
    e, bb = a[fin], b[fin]
    assert torch.equal(bounds._split_delta_kappa(e, bb), bounds._split_delta(e, bb)[0])
    tmin, tmax = torch.meshgrid(vals[1:-1], vals[1:-1], indexing="ij")
    h2 = torch.full((tmin.numel(),), 0.04, dtype=F64)
    assert torch.equal(kernel._near_ends_kappa(h2, tmin.reshape(-1), tmax.reshape(-1)),
                       kernel._near_ends(h2, tmin.reshape(-1), tmax.reshape(-1))[0])


@pytest.mark.parametrize("rows, cols", [(16, 250), (64, 600)])
def test_evaluated_draws_equal_the_full_moments_path(rows, cols, monkeypatch):
    """``_evaluated_draws`` (kappa-only cell moments) gives bitwise the draws of the full
    moments, position-free elements and the fused path's padding included."""
    g, w, sigma, gen = _grid_and_weights(rows, cols, 7, seed=cols)
    c = w.numel()
    k_main = g.moments(w, sigma, 0, c).kappa
    xi = torch.randn(8, c, generator=gen, dtype=F64)
    GUARD.reset()
    new, _ = A._evaluated_draws(g, w, sigma, 0, c, k_main, xi, None)
    element_moments = ParamGrid.element_moments

    def full(self, *args, **kw):
        kw["kappa_only"] = False
        return element_moments(self, *args, **kw)

    monkeypatch.setattr(ParamGrid, "element_moments", full)
    GUARD.reset()
    old, _ = A._evaluated_draws(g, w, sigma, 0, c, k_main, xi, None)
    assert torch.equal(new, old)
    assert float((new != k_main).double().mean()) > 0.3  # the draws move kappa


def test_kappa_only_self_check_compares_kappa_and_still_catches_a_wrong_one():
    """A kappa-only output (``mean_abs``, ``m4`` NaN) passes the sample check when its kappa
    agrees with the reference, and fails it (disabling the path) when kappa is off."""
    c = 64
    h = torch.full((c,), 0.2, dtype=F64)
    ref = kernel.fine_grid_moments(h)
    fast = kernel.fine_grid_moments(h, kappa_only=True)
    assert torch.equal(fast.kappa, ref.kappa) and bool(fast.mean_abs.isnan().all())
    GUARD.reset()
    assert verify_sample("test path", c, fast, lambda: (h, []), lambda idx: kernel.fine_grid_moments(h[idx]),
                         "reference", kappa_only=True)
    GUARD.reset()
    off = kernel.fine_grid_moments(h, kappa_only=True)
    off.kappa[3] += 0.01
    with pytest.warns(RuntimeWarning, match="kappa"):
        assert not verify_sample("test path", c, off, lambda: (h, []), lambda idx: kernel.fine_grid_moments(h[idx]),
                                 "reference", kappa_only=True)
    GUARD.reset()


def test_kappa_only_moments_with_a_compiled_split_pass_its_self_check(monkeypatch):
    """With the outer-cell split compiled (large models; stood in for here by the eager split
    reported as compiled) and kappa-only cell moments (``mean_abs``, ``m4`` NaN, not computed),
    the split's self-check compares ``kappa`` alone: no false disagreement that would disable
    the compiled split, and ``kappa`` equal to the full path's."""
    import warnings

    monkeypatch.setattr(bounds, "_split_kernel", lambda policy: (bounds._split_chunk, True))
    # (the split itself: these fine steps would otherwise take the one-pass form, which a
    # compiled kernel leaves to the kernel and the split; tests/test_fine_moments.py)
    monkeypatch.setattr(bounds, "FUSED_FINE_MOMENTS", False)
    # codes [-7, 7]: both bounds (+-absmax) in the end cells, cut by the split (no inner bound)
    g, w, _, gen = _grid_and_weights(64, 600, 7, seed=5, qmin=-7)
    # sd of 0.5-3 times each row's absmax: every bound within reach, the chunk-wide split
    absmax = g.support[1].expand(64, 600).reshape(-1)
    sigma = absmax * torch.empty(w.numel(), dtype=F64).uniform_(0.5, 3.0, generator=gen)
    th = w + sigma * torch.randn(w.numel(), generator=gen, dtype=F64)
    GUARD.reset()
    full = _moments(g, th, sigma, kappa_only=False)
    GUARD.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fast = _moments(g, th, sigma, kappa_only=True)
    assert bounds.SPLIT_COMPILED_PATH not in GUARD.disabled
    assert GUARD.is_checked(bounds.SPLIT_COMPILED_PATH)
    assert torch.equal(fast.kappa, full.kappa)
    assert bool(fast.mean_abs.isnan().all())  # not computed upstream: what the check must not read
    GUARD.reset()
