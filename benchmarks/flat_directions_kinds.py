"""Exact flat directions of a model's symmetries: what ``assess`` reads on each kind (sy27;
docs/validation.md, "Exact flat directions"; method.md section 6).

The 3-2-1 tanh MLP of ``tests/test_flat_directions.py`` (fitted by float64 L-BFGS to a target of
its class, n = 1000) and variants with a symmetry: a constant-1 input column beside the bias, a
duplicated input column, ``weight_norm`` on the first layer, a ReLU 3-3-1 MLP without and with
weight decay (rescaling), a tanh 3-3-3 softmax classifier (the logits' shift), Linear + LayerNorm
(no affine) + tanh. Per model, every record kept, ``uncertainty_draws=0``: the unquantized
leakage, the diagnostics ``flat_directions``, ``negative_eigenvalues_flipped``,
``minimum_offset_sd``, ``gradient_norm_ratio`` and the curvature / minimum warnings.
``--cost``: CPU time of ``estimate.flat_directions`` against ``sandwich_compute`` at d = 2,000
(R = 512 records; without and with 3 exact flat directions). Runtime: ~1 min CPU; ``--cost``
~15 s.

    python benchmarks/flat_directions_kinds.py
    python benchmarks/flat_directions_kinds.py --cost
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


def fit(m, x, y, loss, wd=0.0):
    """Float64 L-BFGS to the (penalised) minimum."""
    opt = torch.optim.LBFGS(m.parameters(), max_iter=300, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        v = loss(m(x), y).mean() + 0.5 * wd * sum((p ** 2).sum() for p in m.parameters())
        v.backward()
        return v

    for _ in range(3):
        opt.step(closure)
    return m


def kinds() -> None:
    from test_flat_directions import _fit, _plain, mse
    from torch.nn.utils.parametrizations import weight_norm

    import mis_lightning as ml

    _, x, y = _fit()
    n = x.shape[0]

    def run(tag, m, x, y, loss, **kw):
        r = ml.assess(m.float(), ["none"], DataLoader(TensorDataset(x.float(), y), batch_size=250), loss,
                      num_records=n, uncertainty_draws=0, **kw)
        d = r.diagnostics
        warned = [w[:40] for w in r.warnings if "curvature" in w or "not at a min" in w]
        print(f"{tag:34s} none {r.baseline_leakage:.6f} flat {d.get('flat_directions')} "
              f"neg {d.get('negative_eigenvalues_flipped')} off {d.get('minimum_offset_sd'):.3g} "
              f"ratio {d.get('gradient_norm_ratio'):.1e} warn {warned}", flush=True)

    torch.manual_seed(0)
    relu = fit(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)).double(), x, y, mse)
    run("relu mlp, no decay", relu, x, y.float(), mse)
    relu_wd = fit(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)).double(), x, y, mse, 1e-3)
    run("relu mlp, decay 1e-3", relu_wd, x, y.float(), mse, weight_decay=1e-3)
    # duplicated input column: W' = [w_0/2, W_1:, w_0/2] on [x, x_0]
    m = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    m.load_state_dict(_fit()[0].state_dict())
    dup = nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        w = m[0].weight.clone()
        dup[0].weight.copy_(torch.cat([w[:, :1] / 2, w[:, 1:], w[:, :1] / 2], 1))
        dup[0].bias.copy_(m[0].bias)
        dup[2].load_state_dict(m[2].state_dict())
    run("plain", m, x, y.float(), mse)
    run("duplicated input column", dup, torch.cat([x, x[:, :1]], 1), y.float(), mse)

    def ce(o, t):
        return nn.functional.cross_entropy(o, t, reduction="none")

    g = torch.Generator().manual_seed(5)
    xc = torch.randn(n, 3, generator=g, dtype=torch.float64)
    yc = (xc @ torch.randn(3, 3, generator=g, dtype=torch.float64)
          + torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    clf = fit(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double(), xc, yc, ce)
    run("softmax classifier (shift)", clf, xc, yc, ce)
    # LayerNorm after the first layer (no affine): the scale of 0.weight / 0.bias is flat up to LN's eps
    torch.manual_seed(0)
    ln = fit(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Tanh(),
                           nn.Linear(4, 1)).double(), x, y, mse)
    run("linear+LayerNorm (eps 1e-5)", ln, x, y.float(), mse)
    # a constant-1 column beside the bias, and weight_norm (the test models)
    b = nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        b[0].weight.copy_(torch.cat([m[0].weight, m[0].bias[:, None] / 2], 1))
        b[0].bias.copy_(m[0].bias / 2)
        b[2].load_state_dict(m[2].state_dict())
    run("constant-1 column + bias", b, torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1), y.float(), mse)
    wn = _plain()
    wn[0] = weight_norm(wn[0])
    run("weight_norm first layer", wn, x, y.float(), mse)


def cost() -> None:
    import importlib

    # the module (the package's ``estimate`` name is the function)
    est = importlib.import_module("mis_lightning.estimation.estimate")

    torch.manual_seed(0)
    d, r, n = 2000, 512, 5000
    for sym in (0, 3):
        g = torch.randn(r, d, dtype=torch.float64)
        gall = torch.randn(4 * d, d, dtype=torch.float64)
        if sym:  # exact flat directions: every gradient orthogonal to them, H null there
            q = torch.linalg.qr(torch.randn(d, sym, dtype=torch.float64)).Q
            g, gall = g - (g @ q) @ q.T, gall - (gall @ q) @ q.T
        gg = gall.T @ gall / gall.shape[0]
        t = time.process_time()
        flat = est.flat_directions(gg, gg, g, 0.0, 1e-7)
        t1 = time.process_time() - t
        t = time.process_time()
        est.sandwich_compute(gg, gg, g.mean(0), g, n, 1e-8, {}, flat=flat)
        t2 = time.process_time() - t
        print(f"d {d}, {sym} flat: flat_directions {t1:.2f} s CPU (found {flat.shape[1]}), "
              f"sandwich_compute {t2:.2f} s CPU", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cost", action="store_true", help="the cost of flat_directions instead (see above)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    torch.set_num_threads(1)
    cost() if args.cost else kinds()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
