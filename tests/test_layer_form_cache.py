"""The per-layer correlated forms cached per estimate (``assess._layer_mean_abs``; wf41): a
cached form is the fresh one bit for bit, and the key separates layers and kappas."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from mis_lightning.functional import correlated as C

assess = importlib.import_module("mis_lightning.assess")  # the package exports a function of that name


def _setup():
    g = torch.Generator().manual_seed(0)
    R, d = 64, 16
    W = torch.randn(R, 4, dtype=torch.float64, generator=g) @ torch.randn(4, d, dtype=torch.float64, generator=g)
    W = W + 0.3 * torch.randn(R, d, dtype=torch.float64, generator=g)
    rc = C.RecordCorrelation.cross_fitted(W, rank=3)
    est = SimpleNamespace(influence=W, offsets={"a": (0, 8), "b": (8, 16)}, n=R)
    return est, rc


def _fresh(est, rc, name, kappa):
    sl = slice(*est.offsets[name])
    return rc.restrict(sl).gaussian_mean_abs(est.influence[:, sl], kappa)


def test_cached_form_is_the_fresh_one_and_keyed_by_layer_and_kappa(monkeypatch):
    est, rc = _setup()
    calls = []
    orig = C.RecordCorrelation.gaussian_mean_abs
    monkeypatch.setattr(C.RecordCorrelation, "gaussian_mean_abs",
                        lambda self, w, k=None: calls.append(1) or orig(self, w, k))
    k1 = torch.linspace(0.2, 0.9, 8, dtype=torch.float64)  # one grid
    k2 = k1.flip(0)                                       # another grid: same values, other order
    a1 = assess._layer_mean_abs(est, rc, "a", k1)
    a2 = assess._layer_mean_abs(est, rc, "a", k2)
    b1 = assess._layer_mean_abs(est, rc, "b", k1)
    a0 = assess._layer_mean_abs(est, rc, "a", None)
    assert len(calls) == 4
    # the same values again (a fresh tensor, as another scheme's kappa vector), all-ones as None
    assert torch.equal(assess._layer_mean_abs(est, rc, "a", k1.clone()), a1)
    assert torch.equal(assess._layer_mean_abs(est, rc, "a", torch.ones(8, dtype=torch.float64)), a0)
    assert len(calls) == 4  # reused, not recomputed
    monkeypatch.setattr(C.RecordCorrelation, "gaussian_mean_abs", orig)
    # bit for bit the fresh forms (tolerance 0: the cache only skips a recomputation)
    for got, name, k in ((a1, "a", k1), (a2, "a", k2), (b1, "b", k1), (a0, "a", None)):
        assert torch.equal(got, _fresh(est, rc, name, k))
    # a key by the scheme's grid alone, or by the layer alone, would return one of these for another
    assert (a1 - a2).abs().max() > 1e-3 * a1.abs().max()
    assert (a1 - b1).abs().max() > 1e-3 * a1.abs().max()
    assert (a1 - a0).abs().max() > 1e-3 * a1.abs().max()


def test_narrow_block_form_matches_the_refined_solve():
    """A block no wider than the factor's rank (``d <= k``) is scored through its ``d x d`` matrix
    (``Correlation._narrow_quadratic``); against the refined Woodbury solve on the in-sample form
    (remainder 1e-6: the Woodbury difference cancels ~1e5 digits) within 1e-9 relative (both
    float64 with one refinement step; measured ~1e-12), at kappa 1 and a quantized kappa."""
    g = torch.Generator().manual_seed(1)
    R, d = 48, 40
    W = torch.randn(R, 6, dtype=torch.float64, generator=g) @ torch.randn(6, d, dtype=torch.float64, generator=g)
    W = W + 0.05 * torch.randn(R, d, dtype=torch.float64, generator=g)
    rc = C.RecordCorrelation.in_sample(W, loo=False)
    assert rc is not None
    corr = rc.parts[0][1]
    k = corr.factor.shape[1]
    kappas = (torch.ones(d, dtype=torch.float64),
              torch.rand(d, dtype=torch.float64, generator=g).clamp(0.05, 0.95))
    for width in (8, k):  # narrower than the rank, and as wide (the boundary takes the narrow form)
        block = corr.restrict(slice(0, width))
        assert block.factor.shape[0] <= block.factor.shape[1]
        for kappa in kappas:
            kb = kappa[:width]
            u = W[:, :width] * kb.sqrt()
            ref = (u * block._solve(u, kb)).sum(-1)
            got = block.quadratic(W[:, :width], kb)
            assert ((got - ref).abs() / ref.abs()).max() < 1e-9
