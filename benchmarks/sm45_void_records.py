"""sm45: multi-task records whose every label is missing (NaN) are not members (item 4).

A 3-task logistic model (4 features, d = 15) fitted by L-BFGS to the minimum of the per-record
masked BCE + weight decay 1e-2; 20% of each label missing, and 30% of the records with none. The
same weights assessed (exact estimator, every record) on all the records with the decay as told,
and on the labelled records alone with the decay scaled by N / n (the same objective): with the
records without loss left out of n the two agree; counted (before sm45), the headline read the
labelled records' figure times about n / N.

Run:  OMP_NUM_THREADS=1 python benchmarks/sm45_void_records.py [n]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mis_lightning as ml  # noqa: E402


def per_record(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-record masked mean of the observed labels' BCE (0 for a record with none)."""
    seen = ~t.isnan()
    loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), reduction="none")
    return torch.where(seen, loss, 0.0).sum(-1) / seen.sum(-1).clamp_min(1)


def main(n: int = 400, p_void: float = 0.3, lam: float = 1e-2) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    X = torch.randn(n, 4, dtype=torch.float64)
    y = (torch.rand(n, 3, dtype=torch.float64) < torch.sigmoid(X[:, :3] * 1.5)).double()
    y[torch.rand(n, 3) < 0.2] = float("nan")
    y[torch.rand(n) < p_void] = float("nan")
    keep = ~y.isnan().all(1)
    print(f"records with every label missing: {int((~keep).sum())} of {n}")
    m = nn.Linear(4, 3).double()
    opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = per_record(m(X), y).mean() + lam / 2 * sum((p ** 2).sum() for p in m.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    schemes = ["none", "rtn_int8", "rtn_int4", "rtn_int2"]
    kw = dict(uncertainty_draws=0, estimation="exact", num_records=n)
    for name, xs, ys, wd in (("all records, decay as told", X, y, lam),
                             ("labelled records alone, decay x N/n", X[keep], y[keep], lam * n / int(keep.sum()))):
        rep = ml.assess(m, schemes, DataLoader(TensorDataset(xs, ys), batch_size=100), per_record, weight_decay=wd, **kw)
        print(f"{name}: n = {rep.n}; " + ", ".join(f"{k} {s.leakage:.5f}" for k, s in rep.schemes.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 400)
