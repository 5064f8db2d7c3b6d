"""What a researcher sees on the console when adding ``MISCallback`` to a small CNN (ux56a; nux55:
six warnings for a 3-layer CNN trained with Adam).

Trains one of two CNNs with Adam through a Lightning ``Trainer`` carrying ``MISCallback`` as the
README shows it (two schemes, ``loss_fn=`` only; ``batch_fn=`` for the dict batches of ``nux55``),
records every ``UserWarning`` the callback raises, and prints: their count and characters, each
line, the stationarity figures the not-at-a-minimum test reads (the Newton step in sampling sds,
limit 1; the mean gradient's norm over a per-sample gradient's, limit 0.1) and the headline leakage.

Models (random tensors, no download):

* ``cnn``: Conv2d(1, 8, 3) -> pool -> Conv2d(8, 16, 3) -> pool -> Linear(400, 10), 5,258 weights, on
  2,000 MNIST-shaped ``[1, 28, 28]`` normal records labelled by a fixed linear teacher plus noise;
  ``--channels 2 4`` gives a 1,106-weight one.
* ``nux55``: nux55's dict-batch CNN (Conv2d(1, 4, 3) -> pool -> Linear(64, 16) -> Linear(16, 3), 1,131
  weights) on 2,000 8x8 records, ``Adam(lr=3e-3, weight_decay=1e-3)``, a validation loader.

Run from the repository root (the library imported from ``PYTHONPATH``: set it to another checkout
to compare)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/ux56a_console.py --model cnn --epochs 3 [--info]
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/ux56a_console.py --model nux55 --epochs 15
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mis_lightning import MISCallback


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per record, ``[B]``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def batch_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A dict batch -> ``(inputs, targets)``."""
    return batch["x"], batch["y"]


class CNN(pl.LightningModule):
    """Two convolutions and a Linear head on ``[1, 28, 28]`` inputs, 10 classes; Adam."""

    def __init__(self, channels: tuple[int, int] = (8, 16), weight_decay: float = 0.0):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, channels[0], 3), nn.Conv2d(channels[0], channels[1], 3)
        self.fc = nn.Linear(channels[1] * 5 * 5, 10)
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(F.max_pool2d(torch.relu(self.c2(h)), 2).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return per_sample_loss(self(x), y).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=self.weight_decay)


class DictRecords(Dataset):
    """nux55's records: 8x8 normal inputs, 3 classes from a fixed linear score plus noise."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        w = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(123))
        score = (self.x * w).sum(dim=(1, 2, 3)) + 0.5 * torch.randn(n, generator=g)
        self.y = (score > 0).long() + (score > 2).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class Nux55CNN(pl.LightningModule):
    """nux55's CNN, dict batches, ``Adam(lr=3e-3, weight_decay=1e-3)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(64, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))

    def training_step(self, batch, batch_idx):
        return per_sample_loss(self(batch["x"]), batch["y"]).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", per_sample_loss(self(batch["x"]), batch["y"]).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3, weight_decay=1e-3)


def teacher_records(n: int, seed: int) -> TensorDataset:
    """``n`` normal ``[1, 28, 28]`` records, labels the argmax of a fixed linear teacher plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    w = torch.randn(10, 28 * 28, generator=torch.Generator().manual_seed(7))
    return TensorDataset(x, (x.flatten(1) @ w.T + 3 * torch.randn(n, 10, generator=g)).argmax(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["cnn", "nux55"], default="cnn")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--channels", type=int, nargs=2, default=[8, 16], help="cnn: the two convolutions' channels")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="cnn: Adam's (coupled) weight_decay")
    ap.add_argument("--info", action="store_true",
                    help="also print the callback's INFO lines (before training, and the closing line naming its files)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # this script's output only
    infos: list[str] = []
    if args.info:  # the callback's lines go through Lightning's rank_zero_info
        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("MISCallback: "):
                    infos.append(record.getMessage())

        rz = logging.getLogger("pytorch_lightning.utilities.rank_zero")
        rz.setLevel(logging.INFO)
        rz.addHandler(Keep())
        rz.propagate = False
    pl.seed_everything(0, verbose=False)
    if args.model == "cnn":
        model = CNN(tuple(args.channels), args.weight_decay)
        cb = MISCallback(["int8_weight_only", "intx_weight_only_int4"], loss_fn=per_sample_loss)
        loaders = (DataLoader(teacher_records(2000, 0), batch_size=64, shuffle=True),)
    else:
        model = Nux55CNN()
        cb = MISCallback(["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2"],
                         loss_fn=per_sample_loss, batch_fn=batch_fn, weight_decay=None)
        loaders = (DataLoader(DictRecords(2000, 0), batch_size=64, shuffle=True),
                   DataLoader(DictRecords(500, 1), batch_size=256))
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[cb], default_root_dir=root, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=True)
        trainer.fit(model, *loaders)
    said = [str(w.message) for w in rec if str(w.message).startswith("MISCallback: ")]
    d, n = cb.report.d, cb.report.n
    dg = cb.report.diagnostics
    print(f"model {args.model}, d = {d:,}, n = {n:,}, {args.epochs} epoch(s); report warnings {len(cb.report.warnings)} "
          f"({sum(map(len, cb.report.warnings)):,} characters in full)")
    lines = [ln for s in said for ln in s.splitlines()]
    print(f"console: {len(said)} UserWarning(s), {sum(map(len, said)):,} characters, {len(lines)} line(s), longest "
          f"line {max(map(len, lines), default=0)}")
    for s in said:
        print("  " + s)
    for s in infos:
        print("  info: " + s)
    print(f"Newton step {dg.get('minimum_offset_sd', float('nan')):.3g} sd (limit 1), gradient norm ratio "
          f"{dg.get('gradient_norm_ratio', float('nan')):.3g} (limit 0.1), not_at_minimum "
          f"{bool(dg.get('not_at_minimum'))}; baseline leakage {cb.report.baseline_leakage:.4f}")


if __name__ == "__main__":
    main()
