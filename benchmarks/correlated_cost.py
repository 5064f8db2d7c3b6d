"""Cost of the correlated headline against the independent-coordinate one (issue 11).

    python benchmarks/correlated_cost.py [--sizes 500,2000,5000] [--repeats 2]

MLP regressions of about ``d`` weights (n = 4 d records so that d << n), trained a few Adam
epochs; ``assess`` with 4 schemes, default options, once with ``covariance="independent"`` and
once with the default (``"auto"``: full correlation with the exact estimator, d <= 2000; a
cross-fitted factor model from the stored records otherwise). Prints the seconds of each and
their ratio (best of ``--repeats``), in one process so that the ratio is what counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mis_lightning import assess  # noqa: E402

SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2", "bf16"]


def make(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = max(2, d // 20)
    p = max(2, (d - 1 - hidden) // (hidden + 1) - 1)
    n = 4 * d
    X = torch.randn(n, p, generator=g)
    y = (X[:, :3].sum(1) + 0.5 * torch.randn(n, generator=g))[:, None]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(p, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dl = DataLoader(TensorDataset(X, y), batch_size=256, shuffle=True)
    for _ in range(30):
        for xb, yb in dl:
            opt.zero_grad()
            ((model(xb) - yb) ** 2).mean().backward()
            opt.step()
    return model, DataLoader(TensorDataset(X, y), batch_size=256)


def loss(out, t):
    return (out - t).square().squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500,2000,5000")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    print("d | estimator | covariance | independent s | correlated s | ratio | leakage int4 ind / corr")
    for d in (int(x) for x in a.sizes.split(",")):
        model, dl = make(d)
        times, reps = {}, {}
        for cov in ("independent", "auto"):
            best = float("inf")
            for _ in range(a.repeats):
                t = time.perf_counter()
                reps[cov] = assess(model, SCHEMES, dl, loss, covariance=cov, weight_decay=0.0)
                best = min(best, time.perf_counter() - t)
            times[cov] = best
        r = reps["auto"]
        dd = sum(p.numel() for p in model.parameters())
        print(f"{dd} | {r.estimation['estimator']} | {r.estimation['covariance']} | {times['independent']:.2f} | "
              f"{times['auto']:.2f} | {times['auto'] / times['independent']:.2f} | "
              f"{reps['independent'].schemes['intx_weight_only_int4'].leakage:.4f} / "
              f"{r.schemes['intx_weight_only_int4'].leakage:.4f}", flush=True)


if __name__ == "__main__":
    main()
