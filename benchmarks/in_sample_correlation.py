"""The correlated headline's unquantized form without the exact estimator: the stored records'
in-sample correlation (``RecordCorrelation.in_sample``) and the cross-fitted factor model
(``RecordCorrelation.cross_fitted``) against the exact estimator's ``mean_i sqrt(g_i' V^+ g_i)``
(``Estimate.mahalanobis`` with ``leverage_correction=False``) on the same trained model.

Per case: train to the minimum (L-BFGS, weight decay 1e-3), estimate once with
``mode="exact"`` (the truth) and once with ``mode="diagonal"`` (the stored rows ``W`` the
headline reads), then the mean of ``sqrt(w' A^+ w)`` over the stored records for each form,
divided by the truth (1 = exact): ``in-sample`` as scored (each record with its own row taken out
and the common rescaling, dx32), ``own row in`` the form before dx32. ``in_sample`` falls back to the cross-fitted model where
the rows are linearly independent (rank ``R``), as ``assess`` does.

    python benchmarks/in_sample_correlation.py                          # R = 512, every case
    python benchmarks/in_sample_correlation.py --records 256 --cases lora2 ols64
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

E = importlib.import_module("mis_lightning.estimation.estimate")
C = importlib.import_module("mis_lightning.functional.correlated")

CASES = ["lora2", "lora4", "relu6", "mlp16", "mlp32", "ols64", "logit64", "ar09", "bigd_ar9"]


class LoRA(nn.Module):
    """A rank-``r`` adapter (A, B trainable) over a frozen Linear and head: exact null directions."""

    def __init__(self, r: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.base, self.head = nn.Linear(8, 8), nn.Linear(8, 1)
        self.A, self.B = nn.Linear(8, r, bias=False), nn.Linear(r, 8, bias=False)
        for p in [*self.base.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.base(x) + self.B(self.A(x))))


def _ar1(n: int, k: int, rho: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    x = torch.empty_like(z)
    x[:, 0] = z[:, 0]
    for j in range(1, k):
        x[:, j] = rho * x[:, j - 1] + math.sqrt(1 - rho ** 2) * z[:, j]
    return x


def _reg(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    return x, torch.tanh(x @ torch.randn(k, generator=g)) + 0.3 * torch.randn(n, generator=g)


def mse(o, t):
    return F.mse_loss(o.squeeze(-1), t, reduction="none")


def bce(o, t):
    return F.binary_cross_entropy_with_logits(o.squeeze(-1), t, reduction="none")


def make(case: str):
    """``(model, x, y, loss)``."""
    torch.manual_seed(1)
    if case.startswith("lora"):
        return (LoRA(int(case[4:])), *_reg(800, 8), mse)
    if case.startswith("relu"):
        return (nn.Sequential(nn.Linear(6, int(case[4:])), nn.ReLU(), nn.Linear(int(case[4:]), 1)), *_reg(800, 6), mse)
    if case.startswith("mlp"):
        h = int(case[3:])
        return (nn.Sequential(nn.Linear(8, h), nn.Tanh(), nn.Linear(h, 1)), *_reg(800, 8), mse)
    if case in ("ols64", "ar09", "logit64"):
        n, k = 2000, 63
        x = _ar1(n, k, 0.9) if case == "ar09" else torch.randn(n, k, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(4)
        beta = torch.randn(k, generator=g) / 4
        if case == "logit64":
            return nn.Linear(k, 1), x, torch.bernoulli(torch.sigmoid(x @ beta), generator=g), bce
        return nn.Linear(k, 1), x, x @ beta + 0.5 * torch.randn(n, generator=g), mse
    if case == "bigd_ar9":  # d = 865 > R = 512
        x = _ar1(3000, 16, 0.9)
        y = torch.tanh(x @ torch.randn(16, generator=torch.Generator().manual_seed(5)) / 3) \
            + 0.3 * torch.randn(3000, generator=torch.Generator().manual_seed(6))
        return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 1)), x, y, mse
    raise KeyError(case)


def train(model: nn.Module, x, y, loss_fn, wd: float = 1e-3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y).mean() + wd / 2 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=512, help="stored records R (num_records)")
    ap.add_argument("--cases", nargs="+", default=CASES)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':9s} {'n':>5s} {'d':>5s} {'rank':>5s} | {'truth':>7s} | {'cross-fitted':>12s} {'in-sample':>9s}"
          f" {'own row in':>10s}")
    for case in args.cases:
        model, x, y, loss = make(case)
        train(model, x, y, loss)
        batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, len(x), 100)]
        kw = dict(num_records=args.records, weight_decay=1e-3)
        truth = float(E.estimate(model, batches, loss, mode="exact", leverage_correction=False, **kw).mahalanobis.mean())
        W = E.estimate(model, batches, loss, mode="diagonal", **kw).influence.to(torch.float64)

        def form(rc, W=W, truth=truth) -> float:
            return float(rc._apply(W, lambda c, w: c.quadratic(w)).sqrt().mean()) / truth

        ins = C.RecordCorrelation.in_sample(W)
        rank = int(torch.linalg.matrix_rank(W @ W.T, rtol=C.RCOND, hermitian=True))
        cross = form(C.RecordCorrelation.cross_fitted(W, 64))
        inside = form(ins) if ins is not None else float("nan")
        # the form before dx32: each record scored with its own row in the matrix
        plain = form(C.RecordCorrelation.in_sample(W, loo=False)) if ins is not None else float("nan")
        print(f"{case:9s} {len(x):5d} {W.shape[1]:5d} {rank:5d} | {truth:7.3f} | {cross:12.3f} "
              f"{inside:9.3f} {plain:10.3f}{'' if ins is not None else ' (rank R: cross-fitted)'}", flush=True)


if __name__ == "__main__":
    main()
