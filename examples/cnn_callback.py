"""MISCallback on a small CNN (Conv2d + BatchNorm2d + a Linear head), in seconds on a CPU.

The integer schemes quantize every layer weight: the Linear head through torchao, the
convolution kernels per output channel over flattened kernels (the library's round-to-nearest
on torchao's primitives; torch has no weight-only quantized convolution). The table's
``float`` column is the share of assessed weights left in float (here the BatchNorm scales and
the biases); the warnings say per layer type how the weights were quantized.

Run:  python examples/cnn_callback.py
"""

from __future__ import annotations

import tempfile

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import MISCallback


class SmallCNN(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per record, shape [B]."""
    return F.cross_entropy(outputs, targets, reduction="none")


def data(n: int = 4096, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def main(max_epochs: int = 12) -> MISCallback:
    pl.seed_everything(0)
    # 4,096 training records for 396 weights (d / n ~ 0.1: the regime the analysis needs; with a
    # few hundred records every figure is flagged as indicative and the schemes look alike)
    mis = MISCallback(["int8_weight_only", "intx_weight_only_int4", "rtn_int4"], loss_fn=per_sample_loss)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, callbacks=[mis], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tempfile.mkdtemp(prefix="mis_cnn_"))
    # the validation records measure each quantized copy's utility (the table's loss column)
    trainer.fit(SmallCNN(), DataLoader(data(), batch_size=128, shuffle=True), DataLoader(data(128, seed=1), batch_size=64))
    print(mis.report.table())
    return mis


if __name__ == "__main__":
    main()
