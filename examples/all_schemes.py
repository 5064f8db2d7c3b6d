"""Every registered quantization scheme on one small MLP: size, sparsity and privacy side by side.

Trains a 128-8-1 MLP (1,041 weights) on 20,000 synthetic regression records to (near) its penalised minimum, then
``mis_lightning.assess`` scores every scheme of the registry (schemes that cannot run on
this machine, e.g. ``int4_weight_only_tinygemm`` without CUDA, appear as error rows).

Run:  python examples/all_schemes.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml

WEIGHT_DECAY = 1e-3


def main() -> ml.Report:
    torch.manual_seed(0)
    n, d = 20_000, 128
    X = torch.randn(n + 1000, d)
    y = torch.tanh(X[:, :8].sum(-1) / 3) + 0.1 * torch.randn(n + 1000)
    train, val = TensorDataset(X[:n], y[:n]), TensorDataset(X[n:], y[n:])
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out.squeeze(-1) - t) ** 2

    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        penalty = sum((p**2).sum() for p in model.parameters())
        loss = loss_fn(model(X[:n]), y[:n]).mean() + WEIGHT_DECAY / 2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    report = ml.assess(
        model, ml.available_schemes(), DataLoader(train, batch_size=500), loss_fn,
        weight_decay=WEIGHT_DECAY, num_records=512,  # estimator by cost: exact for these 1,041 weights
        val_dataloader=DataLoader(val, batch_size=1000), strict=False,
    )
    print(f"n = {report.n}, d = {report.d}, baseline leakage {report.baseline_leakage:.4f}")
    print(report.table())
    for w in report.warnings:
        print("note:", w)
    return report


if __name__ == "__main__":
    main()
