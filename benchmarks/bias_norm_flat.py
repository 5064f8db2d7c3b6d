"""Why the exact estimator does not find a conv / Linear bias before a BatchNorm flat, and what finding
it would do (docs/benchmarks.md, "cor52").

In eval mode a BatchNorm subtracts its running mean, so raising a layer's bias by ``t`` on channel ``c``
and lowering the norm's bias by ``t gamma_c / sqrt(var_c + eps)`` changes nothing: a straight line of
equal loss for fixed ``gamma``. ``flat_directions`` misses it off the minimum. ``diagnose`` (hd51's CNN,
benchmarks/misleading_headlines.py) prints, along each such direction ``u``: every record's gradient
relative to ``|G|``, ``u' H u`` relative to the largest curvature (both float64 rounding), and then the
rule's stages: the directions along which every record's gradient is rounding, and the curvature the
objective has on their span (the coupling of ``u`` to ``gamma``'s scale directions through the mean
gradient). ``ab`` assesses hd51's CNN and tests/test_unseen_records.py's BatchNorm MLP (minibatch Adam,
60 steps) as they are and with those directions passed to ``flat_directions`` as known tangents (as the
attention heads' are), and prints what moves.

Run from the repo root: ``OMP_NUM_THREADS=1 python benchmarks/bias_norm_flat.py diagnose`` (or ``ab``);
about 1 min each on one loaded core.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml

E = sys.modules["mis_lightning.estimation.estimate"]  # the module (the package's `estimate` is a function)
torch.set_num_threads(1)


def _headlines():
    spec = importlib.util.spec_from_file_location("misleading_headlines",
                                                  Path(__file__).with_name("misleading_headlines.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cnn() -> tuple[nn.Module, DataLoader, object]:
    """hd51's CNN (seed 0, Lightning, Adam 3 epochs), its body in eval mode, its 300 records."""
    import pytorch_lightning as pl

    mh = _headlines()
    pl.seed_everything(0, workers=True)
    m = mh.CNN()
    mh.trainer(3, None).fit(m, DataLoader(mh.Images(300, 1), batch_size=32, shuffle=True),
                            DataLoader(mh.Images(100, 2), batch_size=50))
    return copy.deepcopy(m.body).eval(), DataLoader(mh.Images(300, 1), batch_size=300), mh


def bn_mlp() -> tuple[nn.Module, DataLoader]:
    """tests/test_unseen_records.py's BatchNorm MLP: minibatch Adam, 60 steps in train mode."""
    torch.manual_seed(0)
    X = torch.randn(300, 4)
    y = X[:, 0] - X[:, 1] ** 2 + 0.2 * torch.randn(300)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for i in range(60):
        b = slice(50 * (i % 6), 50 * (i % 6) + 50)
        opt.zero_grad()
        F.mse_loss(m(X[b]).squeeze(-1), y[b]).backward()
        opt.step()
    return m.eval(), DataLoader(TensorDataset(X, y), batch_size=100)


def tangents(m: nn.Sequential) -> torch.Tensor:
    """``[d, k]``: per channel, +1 on the layer's bias, ``-gamma / sqrt(var + eps)`` on the norm's (the
    assessed parameters in ``named_parameters`` order; the layer at index 0, its norm at index 1)."""
    names = [k for k, _ in m.named_parameters()]
    off, o = {}, 0
    for k, p in m.named_parameters():
        off[k], o = o, o + p.numel()
    norm = m[1]
    # in float64 from the stored float32 values, as the estimator's passes compute (in float32 the
    # tangent itself is off by ~1e-8 and every record's gradient along it reads ~1e-9 of |G|, not rounding)
    scale = norm.weight.detach().double() / (norm.running_var.double() + norm.eps).sqrt()
    T = torch.zeros(o, scale.numel(), dtype=torch.float64)
    ch = torch.arange(scale.numel())
    T[off[names[1]] + ch, ch] = 1.0
    T[off["1.bias"] + ch, ch] = -scale
    return T


def with_known(T: torch.Tensor):
    """``flat_directions`` with ``T`` added to its ``known`` tangents."""
    orig = E.flat_directions

    def patched(gg, H, G=None, decay=0.0, precision=0.0, known=None):
        return orig(gg, H, G, decay, precision, T if known is None else torch.cat([known, T], 1))
    return orig, patched


def diagnose() -> None:
    net, dl, mh = cnn()
    seen = {}
    orig = E.flat_directions

    def spy(gg, H, G=None, decay=0.0, precision=0.0, known=None):
        seen.update(gg=gg, H=H, G=G, precision=precision)
        return orig(gg, H, G, decay, precision, known)
    E.flat_directions = spy
    rep = ml.assess(net, ["none"], dl, mh.ce, batch_fn=lambda b: (b["image"], b["label"]), estimation="exact")
    E.flat_directions = orig
    gg, H, G = seen["gg"], seen["H"], seen["G"]
    d = H.shape[0]
    print(f"flat directions found: {rep.diagnostics.get('flat_directions')} "
          f"{rep.diagnostics.get('flat_direction_parameters')}; gradient norm ratio "
          f"{rep.diagnostics['gradient_norm_ratio']:.3g}")
    # flat_directions' units: each weight's gradient second moment 1 (its D), curvatures of D H D
    gd = gg.diagonal().clamp_min(0)
    tol = 100 * d * torch.finfo(torch.float64).eps
    s = torch.where(gd > tol * gd.max(), gd, gd.max()).rsqrt()
    ggs, Hs, Gs = gg * torch.outer(s, s), 0.5 * (H + H.T) * torch.outer(s, s), G * s
    h_top = float(torch.linalg.eigvalsh(Hs).abs().max())
    T = tangents(net) / s.unsqueeze(-1)
    for c in range(T.shape[1]):
        u = T[:, c] / T[:, c].norm()
        print(f"channel {c}: |G u| / |G| = {float((Gs @ u).norm() / torch.linalg.matrix_norm(Gs, 2)):.2g}, "
              f"u'Hu / top = {float(u @ Hs @ u) / h_top:.2g}")
    e, Q = torch.linalg.eigh(ggs)
    U = Q[:, e <= float(e[-1]) / (100 * d) ** 2]
    _, sv, Vh = torch.linalg.svd(Gs @ U, full_matrices=True)
    sv = torch.cat([sv, sv.new_zeros(U.shape[1] - sv.numel())])
    U = U @ Vh.T[:, sv <= tol * float(torch.linalg.matrix_norm(Gs, 2))]
    c = torch.linalg.eigvalsh(U.T @ Hs @ U) / h_top
    cut = max(tol, min(seen["precision"], E.FLAT_CURVATURE_MAX))
    print(f"directions along which every record's gradient is rounding: {U.shape[1]}; curvature on their span "
          f"(of the largest): {c.min():.3g} .. {c.max():.3g}; within the cut {cut:.1g}: {int((c.abs() <= cut).sum())}")
    orig, patched = with_known(tangents(net))
    E.flat_directions = patched
    try:
        rep2 = ml.assess(net, ["none"], dl, mh.ce, batch_fn=lambda b: (b["image"], b["label"]), estimation="exact")
    finally:
        E.flat_directions = orig
    print(f"with the tangents known: {rep2.diagnostics.get('flat_directions')} "
          f"{rep2.diagnostics.get('flat_direction_parameters')}")


def ab() -> None:
    net, dl, mh = cnn()
    mlp, dl2 = bn_mlp()
    cases = {"hd51 CNN": (net, dl, mh.ce, lambda b: (b["image"], b["label"])),
             "BatchNorm MLP": (mlp, dl2, lambda o, t: F.mse_loss(o.squeeze(-1), t, reduction="none"), None)}
    keys = ("flat_directions", "not_at_minimum", "minimum_offset_sd", "stiff_offset_sd", "mean_leverage",
            "max_leverage")
    for label, (m, loader, loss, bf) in cases.items():
        for known in (False, True):
            orig, patched = with_known(tangents(m))
            E.flat_directions = patched if known else orig
            try:
                rep = ml.assess(m, ["none", "int8_weight_only"], loader, loss, batch_fn=bf, estimation="exact",
                                strict=False)
            finally:
                E.flat_directions = orig
            dg = rep.diagnostics
            print(f"{label}, tangents {'known' if known else 'as main'}: baseline {rep.baseline_leakage:.4f}, "
                  f"int8 {rep.schemes['int8_weight_only'].leakage:.4f}, "
                  + ", ".join(f"{k} {dg.get(k)!r:.6}" for k in keys))


if __name__ == "__main__":
    {"diagnose": diagnose, "ab": ab}[sys.argv[1]]()
