"""An ordinary Lightning training, plus MISCallback in two lines.

The LightningModule and the DataModule below know nothing about mis_lightning: a small MLP
regression on synthetic data, trained to the minimum of its objective (mean squared error / 2
plus an explicit L2 penalty) by full-batch L-BFGS: ``configure_optimizers`` returns
``torch.optim.LBFGS`` and the training loader holds the whole training set in one batch, so each
epoch is one L-BFGS step on the full objective. (Adam on minibatches stops near the minimum,
not at it; the callback's report then warns "not at a minimum" and "negative curvature".) The
callback is given the per-sample loss explicitly (``loss_fn``) and the penalty coefficient
(``weight_decay``), assesses three quantization schemes at the end of ``fit`` and logs
``mis/<scheme>/...`` to the CSV logger, next to the usual metrics.

Run:  python examples/callback_example.py   (CPU, well under a minute)
"""

from __future__ import annotations

import csv
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import MISCallback

WEIGHT_DECAY = 1e-3


class MLPRegressor(pl.LightningModule):
    def __init__(self, num_features: int = 8, hidden: int = 16, lr: float = 1.0, max_iter: int = 100):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        mse = nn.functional.mse_loss(self(x), y)
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        loss = 0.5 * mse + 0.5 * WEIGHT_DECAY * penalty
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_mse", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        # Lightning passes the closure (training_step + backward) that L-BFGS re-evaluates
        return torch.optim.LBFGS(self.parameters(), lr=self.hparams.lr, max_iter=self.hparams.max_iter,
                                 history_size=20, line_search_fn="strong_wolfe")


class SyntheticData(pl.LightningDataModule):
    def __init__(self, n_train: int = 2000, n_val: int = 500, num_features: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n_train + n_val, num_features, generator=g)
        y = torch.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] - 0.3 * X[:, 3] + 0.3 * torch.randn(n_train + n_val, generator=g)
        self.train_set = TensorDataset(X[:n_train], y[:n_train])
        self.val_set = TensorDataset(X[n_train:], y[n_train:])

    def train_dataloader(self):
        # the whole training set in one batch: L-BFGS minimises the full objective
        return DataLoader(self.train_set, batch_size=len(self.train_set))

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=500)


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The objective's data term per record, shape [B]: a module-level function, not a lambda,
    so that strategies that spawn processes (``ddp_spawn``) can pickle the callback."""
    return 0.5 * (outputs - targets) ** 2


MAX_EPOCHS = 10  # one L-BFGS step (up to max_iter iterations) per epoch


def main(root: str | None = None, max_epochs: int = MAX_EPOCHS) -> Path:
    root = root or tempfile.mkdtemp(prefix="mis_example_")
    pl.seed_everything(0)
    logger = CSVLogger(root, name="mlp")

    # the callback: per-sample loss of the objective's data term and its L2 coefficient; the
    # estimator by cost (the exact sandwich for this 161-weight MLP: the diagonal one ignores the
    # weights' correlation, which the report warns about)
    # (per-channel int4/int2: torchao's default per-group-32 needs layers 32 wide or more)
    mis = MISCallback(["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2"],
                      weight_decay=WEIGHT_DECAY, loss_fn=per_sample_loss)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=logger, callbacks=[mis], log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False)
    # MISCallback also raises each report warning as a Python warning (for runs that never print
    # the table); this script prints the table, which lists every warning: once is enough
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MISCallback: ")
        trainer.fit(MLPRegressor(), datamodule=SyntheticData())

    metrics_csv = Path(logger.log_dir) / "metrics.csv"
    with open(metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    logged = {k: v for r in rows for k, v in r.items() if k.startswith("mis/") and v != ""}
    print(f"\nlogged to {metrics_csv}:")
    for k in sorted(logged):
        print(f"  {k:40s} {float(logged[k]):.6g}")
    print("\n" + mis.report.table())  # the table, its legend, the verdict and every warning (once)
    print(f"\nreport: {mis.report_path}\nfigure: {mis.figure_path}")
    return metrics_csv


if __name__ == "__main__":
    torch.set_num_threads(1)  # small models run fastest on one thread, busy machines most (docs/estimation.md)
    main()
