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
