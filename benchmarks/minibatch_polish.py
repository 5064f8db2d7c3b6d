"""Minibatch Adam marks every figure ``*``; a full-batch L-BFGS finish on the same objective clears it
(cv53, nux51 #9: "every own-model fit marks every row *"; the README's advice for such users).

A tanh MLP 10-8-2 (d = 106 weights), n = 2,000 records (d / n = 0.053), cross-entropy, weight decay
1e-3 in the objective ``mean(loss) + wd / 2 |theta|^2``; 20 epochs of Adam (lr 1e-2, batches of 64),
assessed; then one ``torch.optim.LBFGS`` call (strong-Wolfe line search, ``max_iter`` iterations,
full batch, same objective), assessed again. Printed for each: the gradient norm ratio, the Newton
step in sampling sds, each row's ``indicative`` reasons and the warnings (one line each).

    OMP_NUM_THREADS=1 python benchmarks/minibatch_polish.py [--max-iter 1000]    # ~7 s CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mis_lightning as ml
from mis_lightning._warning_lines import warning_line

N, D_IN, WD = 2000, 10, 1e-3
SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2"]


def ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def show(tag: str, model: nn.Module, loader: DataLoader) -> None:
    r = ml.assess(model, SCHEMES, loader, ce, weight_decay=WD)
    dg = r.diagnostics
    print(f"{tag}: gradient norm ratio {dg.get('gradient_norm_ratio', float('nan')):.3g}, Newton step "
          f"{dg.get('minimum_offset_sd', float('nan')):.3g} sd; indicative: "
          f"{sorted({str(row.get('indicative')) for row in r.rows()})}")
    for w in r.warnings:
        print(f"  warning: {warning_line(w)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations of the finish (one call)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    X = torch.randn(N, D_IN)
    y = (X @ torch.randn(D_IN) + 0.5 * torch.randn(N) > 0).long()
    model = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, 2))

    def objective(i: torch.Tensor | slice) -> torch.Tensor:
        return ce(model(X[i]), y[i]).mean() + WD / 2 * sum((p ** 2).sum() for p in model.parameters())

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for i in torch.randperm(N).split(64):
            opt.zero_grad()
            objective(i).backward()
            opt.step()
    loader = DataLoader(TensorDataset(X, y), batch_size=500)
    show("after 20 Adam epochs", model, loader)
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=args.max_iter, line_search_fn="strong_wolfe",
                              tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = objective(slice(None))
        loss.backward()
        return loss

    lbfgs.step(closure)
    show(f"after a full-batch L-BFGS finish (max_iter={args.max_iter})", model, loader)


if __name__ == "__main__":
    main()
