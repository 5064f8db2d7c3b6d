"""A newcomer's own LightningModule with the README's callback: a 3-class MLP (20 -> 32 -> 3, d = 771)
on 2,000 synthetic records in dict batches, Adam (lr 1e-2, weight_decay 1e-3), 5 epochs; and the
misuses a user tries first (docs/benchmarks.md, "nux56").

    python benchmarks/newcomer_callback.py [MODE]

MODE: ``ok`` (default; the callback with ``batch_fn=``), ``nobatchfn`` (dict batches without
``batch_fn=``: TypeError before the first step), ``typo`` (``intx_weight_only_in4``:
UnknownSchemeError when the callback is built), ``noval`` (no validation loader: the verdict ranks by
leakage alone), ``bn`` (a BatchNorm1d: its running statistics are released unscored), ``gru`` (a GRU
among the assessed weights: ValueError at setup naming ``params=``). Prints the console and then
``callback.report.table()``. Run it with ``OMP_NUM_THREADS=1`` and without on a busy machine to see
the thread count's cost (README, "The Lightning callback"). Writes ``lightning_logs/`` in the working
directory.
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mis_lightning import MISCallback

MODES = ("ok", "nobatchfn", "typo", "noval", "bn", "gru")


class DictData(Dataset):
    """``n`` records ``{"features": [20], "label": class in 0..2}``; the labelling weights are fixed."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 20, generator=g)
        w = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
        self.y = (self.x @ w + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "label": self.y[i]}


class GRUNet(nn.Module):
    """Reads the 20 features as a sequence of 5 steps of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.view(-1, 5, 4))
        return self.head(out[:, -1])


class Classifier(pl.LightningModule):
    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode == "bn":
            self.net = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
        elif mode == "gru":
            self.net = GRUNet()
        else:
            self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["features"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        logits = self(batch["features"])
        self.log("val_loss", F.cross_entropy(logits, batch["label"]))
        self.log("val_acc", (logits.argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-3)


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def batch_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["features"], batch["label"]


def main(mode: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    pl.seed_everything(0)
    train = DataLoader(DictData(2000, 1), batch_size=64, shuffle=True)
    val = DataLoader(DictData(500, 2), batch_size=256)
    schemes = ["int8_weight_only", "intx_weight_only_in4" if mode == "typo" else "intx_weight_only_int4"]
    extra = {} if mode == "nobatchfn" else {"batch_fn": batch_fn}
    cb = MISCallback(schemes, loss_fn=per_sample_loss, **extra)
    trainer = pl.Trainer(max_epochs=5, callbacks=[cb], enable_progress_bar=False)
    trainer.fit(Classifier(mode), train, *([] if mode == "noval" else [val]))
    print(cb.report.table())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ok")
