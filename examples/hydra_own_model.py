"""The ``mis-lightning`` Hydra app on a model and data of your own, swept over schemes and seeds.

The LightningModule and the DataModule below are ordinary Lightning code that knows nothing of
mis_lightning; the app needs of them only (docs/hydra.md, "Your own model and data"):

* the model takes ``num_features`` (filled from the datamodule), returns outputs ``[B]`` (predictions;
  logits for binary data), and has ``per_sample_loss(outputs, targets) -> [B]`` (the data term of
  its training objective) and ``weight_decay`` (its L2 coefficient ``lambda`` of
  ``lambda / 2 |theta|^2``);
* the datamodule has, after ``setup()``, ``num_features``, ``task`` (``"regression"`` or
  ``"binary"``), ``n_train``, ``train_dataset`` (every training record, read once in order by the
  assessment) and a ``val_dataloader()``. Its batches here are dicts ``{"x", "y"}``, so the app is
  told how to split them: ``batch_fn=<module>.xy`` (without it the job stops before training,
  naming ``batch_fn``).

Their configs are stored in Hydra's ConfigStore (``data=toy``, ``model=tiny``) before the app's
entry point runs, as they would be in a package of yours; a config directory
(``hydra.searchpath=[file:///abs/my_conf]``) does the same from YAML files. This script runs one
multirun, 2 schemes x 2 seeds (each seed a new data draw and a new training), whose
``aggregate.md`` compares the schemes per seed and across the seeds, then assesses one job's
checkpoint with other schemes (``mode=assess``), without training.

Run:  python examples/hydra_own_model.py   (CPU, under a minute; outputs under
MIS_LIGHTNING_OUTPUT_DIR or a temporary dir)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.config_store import ConfigStore
from torch import nn
from torch.utils.data import DataLoader, Dataset


class DictRecords(Dataset):
    """Records ``{"x": [F], "y": []}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def xy(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The app's ``batch_fn``: ``(inputs, targets)`` of a dict batch (module level: importable)."""
    return batch["x"], batch["y"]


class ToyRegression(pl.LightningDataModule):
    """``y = tanh(x w) + noise``: ``n_train`` training and ``n_val`` validation records of ``d``
    standard-normal features, drawn from ``seed``."""

    def __init__(self, n_train: int = 600, n_val: int = 200, d: int = 6, noise: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()  # logged, and saved in model.ckpt: mode=assess rebuilds the same data
        self.task, self.num_features, self.n_train, self.batch_size = "regression", d, n_train, n_train

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.hparams.seed)
        n = self.hparams.n_train + self.hparams.n_val
        x = torch.randn(n, self.hparams.d, generator=g)
        y = torch.tanh(x @ torch.randn(self.hparams.d, generator=g)) + self.hparams.noise * torch.randn(n, generator=g)
        k = self.hparams.n_train
        self.train_dataset, self.val_dataset = DictRecords(x[:k], y[:k]), DictRecords(x[k:], y[k:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)  # full batch

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size)


class TinyMLP(pl.LightningModule):
    """A tanh MLP trained to the minimum of ``mean 0.5 (f(x) - y)^2 + weight_decay / 2 |theta|^2`` by
    full-batch L-BFGS (the minimum the analysis assumes; Adam would stop near it, and the report says so)."""

    def __init__(self, num_features: int, hidden: int = 4, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # [B]

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs - targets) ** 2  # [B]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = xy(batch)
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        loss = self.per_sample_loss(self(x), y).mean() + 0.5 * self.weight_decay * penalty
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, y = xy(batch)
        self.log("val_loss", self.per_sample_loss(self(x), y).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), max_iter=100, line_search_fn="strong_wolfe",
                                 tolerance_grad=1e-9, tolerance_change=1e-12)


def store_configs(module: str) -> None:
    """``data=toy`` and ``model=tiny``: what ``my_conf/data/toy.yaml`` and ``my_conf/model/tiny.yaml``
    would hold (``num_features: ???`` is filled from the datamodule; ``seed`` follows the app's)."""
    cs = ConfigStore.instance()
    cs.store(group="data", name="toy", node={"_target_": f"{module}.ToyRegression", "n_train": 600,
                                             "n_val": 200, "d": 6, "seed": "${seed}"})
    cs.store(group="model", name="tiny", node={"_target_": f"{module}.TinyMLP", "num_features": "???",
                                               "hidden": 4, "weight_decay": 1e-2})  # d = 33, d / n = 0.055


def app(*overrides: str) -> None:
    """``mis-lightning <overrides>`` in this process (the console script's entry point)."""
    from mis_lightning.cli import main

    argv, sys.argv = sys.argv, ["mis-lightning", *overrides]
    try:
        main()
    finally:
        sys.argv = argv


if __name__ == "__main__":
    torch.set_num_threads(1)
    store_configs("__main__")  # this script's classes; in a package: "my_pkg.models"
    out = Path(os.environ.get("MIS_LIGHTNING_OUTPUT_DIR") or tempfile.mkdtemp()) / "hydra_own_model"
    common = ["data=toy", "model=tiny", "batch_fn=__main__.xy", "trainer.max_epochs=10", "progress=false",
              "logger=csv", "mis.scoring.uncertainty_draws=2"]
    app("-m", *common, "quantizer=int8_weight_only,intx_weight_only_int2", "seed=0,1",
        f"hydra.sweep.dir={out / 'sweep'}")
    md = (out / "sweep" / "aggregate.md").read_text()
    assert "## Across seeds" in md and "verdict across jobs 0, 2 (seed=0)" in md, md
    print(md.split("## Across seeds")[1].split("## Warnings")[0])
    # the seed=1 job's model (job 1: int8_weight_only, seed=1) under other schemes, without training
    app(*common, "mode=assess", f"ckpt_path={out / 'sweep' / '1_int8_weight_only_seed-1' / 'model.ckpt'}",
        "schemes=[intx_weight_only_int4,bf16]", f"hydra.run.dir={out / 'assess'}")
    assert (out / "assess" / "report.json").is_file()
    print(f"sweep: {out / 'sweep'}  assessment of a checkpoint: {out / 'assess'}")
