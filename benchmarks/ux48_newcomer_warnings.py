"""ux48: nux47's CNN through ``MISIndicator``: every warning ``compute()`` raises (category, origin,
length), the table, and the records-read and duplicate warnings for a ``drop_last`` loader and for
the training set fed twice without ``reset()`` (docs/benchmarks.md, "ux48").

    OMP_NUM_THREADS=1 python benchmarks/ux48_newcomer_warnings.py [--epochs 5]
    OMP_NUM_THREADS=1 python benchmarks/ux48_newcomer_warnings.py --ols   # every record twice on OLS

The repository is appended to ``sys.path``: ``PYTHONPATH=<another checkout>`` runs that one's code
(the "before" figures: the commit the session started from).

The model and data are nux47's: Conv2d(1,16,3)+BN+ReLU+MaxPool, Conv2d(16,32,3)+BN+ReLU+
AdaptiveAvgPool(4), Linear(512,28)+ReLU+Linear(28,10) (19,550 weights); 1,000 synthetic 10-class
16x16 images; Adam lr 3e-3, batches of 50, weight decay 1e-3; seeded here (nux47's were not).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import MISIndicator

SCHEMES = ["none", "int8_weight_only", "intx_weight_only_int4", "native_int8_per_row", "native_int8_dynamic"]


def cnn_and_data(epochs: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    templ = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 10, (1000,), generator=g)
    x = 0.6 * templ[y] + torch.randn(1000, 1, 16, 16, generator=g)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(512, 28), nn.ReLU(), nn.Linear(28, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(epochs):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval(), x, y


def ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, t, reduction="none")


def run(model: nn.Module, batches: list, label: str) -> MISIndicator:
    metric = MISIndicator(model, ce, SCHEMES, weight_decay=1e-3, num_training_records=1000)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for xb, yb in batches:
            metric.update(xb, yb)
        t0 = time.process_time()
        metric.compute()
    print(f"\n== {label}: compute {time.process_time() - t0:.1f} s CPU, n = {metric.report.n}")
    for w in rec:
        text = str(w.message)
        print(f"  {w.category.__name__} ({Path(w.filename).name}:{w.lineno}) {len(text)} chars: {text[:150]}")
    return metric


def ols_twice(n: int, d: int) -> None:
    """OLS fitted exactly; the same weights assessed from the distinct records and from every
    record twice (the mean loss's minimum is the same), every record stored."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = X @ (torch.randn(d, generator=g, dtype=torch.float64) / d**0.5) + torch.randn(n, generator=g, dtype=torch.float64)
    m = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.linalg.lstsq(X, Y[:, None]).solution.T)
    kw = dict(estimation="exact", method="clt", uncertainty_draws=0, num_records=4096)
    mse = lambda o, t: (o.squeeze(-1) - t) ** 2 / 2  # noqa: E731
    schemes = ["rtn_int8", "rtn_int4", "rtn_int2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        once = ml.assess(m, schemes, DataLoader(TensorDataset(X, Y), batch_size=500), mse, **kw)
        twice = ml.assess(m, schemes, DataLoader(TensorDataset(torch.cat([X, X]), torch.cat([Y, Y])), batch_size=500),
                          mse, **kw)
    ratios = [f"baseline {twice.baseline_leakage / once.baseline_leakage:.4f}"] + [
        f"{s} {twice.schemes[s].leakage / once.schemes[s].leakage:.4f}" for s in schemes]
    print(f"OLS n={n} d={d}: mean leverage {once.diagnostics['mean_leverage']:.3g} once, "
          f"{twice.diagnostics['mean_leverage']:.3g} twice; twice / once: {', '.join(ratios)}")
    print("  " + next(w for w in twice.warnings if "more than once" in w))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--ols", action="store_true")
    args = ap.parse_args()
    if args.ols:
        for n, d in ((1000, 3), (100, 40), (100, 60)):
            ols_twice(n, d)
        return
    model, x, y = cnn_and_data(args.epochs)
    once = run(model, [(x[a:a + 100], y[a:a + 100]) for a in range(0, 1000, 100)], "one pass")
    print(once.report.table())
    run(model, list(DataLoader(TensorDataset(x, y), batch_size=64, drop_last=True)), "drop_last=True, 64")
    twice = run(model, [(x[a:a + 100], y[a:a + 100]) for a in range(0, 1000, 100)] * 2, "fed twice")
    print("  " + next((w for w in twice.report.warnings if "repeat another" in w), "-"))
    for k in ("none", "int8_weight_only"):
        print(f"  {k}: leakage once {once.report.schemes[k].leakage:.4f}, twice {twice.report.schemes[k].leakage:.4f}"
              f" ({twice.report.schemes[k].leakage / once.report.schemes[k].leakage:.3f}x)")


if __name__ == "__main__":
    main()
