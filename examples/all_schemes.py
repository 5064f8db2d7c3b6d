"""Every registered quantization scheme on one small MLP: size, sparsity and privacy side by side.

Trains a 128-8-1 MLP (1,041 weights) on 20,000 synthetic regression records to its penalised
minimum (full-batch L-BFGS on the float64 objective, 500 iterations: the analysis assumes the
released weights minimise the training objective; a float32 line search stalls short of it and
the report then warns "not at a minimum"), then ``mis_lightning.assess`` scores every scheme of
the registry (schemes that cannot run on this machine, e.g. ``int4_weight_only_tinygemm``
without CUDA, appear as error rows). The report's warnings are printed once, under the table.

Run:  python examples/all_schemes.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml

WEIGHT_DECAY = 1e-3


def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The objective's data term per record, shape [B] (squared target units / 2)."""
    return 0.5 * (out.squeeze(-1) - t) ** 2


def trained_model() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """The MLP at the minimum of ``mean loss_fn + WEIGHT_DECAY / 2 * ||theta||^2`` on the training
    set, and the (training, validation) data sets."""
    torch.manual_seed(0)
    n, d = 20_000, 128
    X = torch.randn(n + 1000, d)
    # a sum of 8 tanh ridges: every hidden unit has work to do (with one ridge, 7 of the 8 units are
    # redundant, the objective has near-flat saddle directions and L-BFGS crawls along them: the
    # report then warns "negative curvature")
    y = torch.tanh(X[:, :8] @ torch.randn(8, 8) / 3).sum(-1) / 2 + 0.1 * torch.randn(n + 1000)
    train, val = TensorDataset(X[:n], y[:n]), TensorDataset(X[n:], y[n:])
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    Xd, yd = X[:n].double(), y[:n].double()
    # full batch, float64: near the minimum the line search compares objective values that differ
    # below float32 resolution; the weights are released (and assessed) in float32
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, history_size=20, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        penalty = sum((p**2).sum() for p in model.parameters())
        loss = loss_fn(model(Xd), yd).mean() + WEIGHT_DECAY / 2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    return model.float(), train, val


def main() -> ml.Report:
    model, train, val = trained_model()
    report = ml.assess(
        model, ml.available_schemes(), DataLoader(train, batch_size=500), loss_fn,
        weight_decay=WEIGHT_DECAY, num_records=512,  # estimator by cost: exact for these 1,041 weights
        val_dataloader=DataLoader(val, batch_size=1000), strict=False,
    )
    print(f"n = {report.n}, d = {report.d}, baseline leakage {report.baseline_leakage:.4f}")
    print(report.table())  # the table, its legend, the verdict and every warning (once)
    return report


if __name__ == "__main__":
    main()
