"""A researcher's own model (not from the examples): CNN + BatchNorm + Dropout, dict batches,
a tied-weight layer, a layer called twice, left in train mode, CSVLogger, Adam with weight decay.

usage: python benchmarks/own_cnn_callback.py OUTDIR [--no-cb] [--no-batchfn] [--loss bk|scalar]
"""
from __future__ import annotations

import random
import sys
import time

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

torch.set_num_threads(1)


class Blobs(Dataset):
    """3-class 8x8 images: class c has a bright square at a class-dependent corner, plus noise."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        x = 0.8 * torch.randn(n, 1, 8, 8, generator=g)
        for c, (r, s) in enumerate([(0, 0), (4, 4), (0, 4)]):
            m = self.y == c
            x[m, :, r:r + 4, s:s + 4] += 1.0
        self.x = x

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class TiedCNN(pl.LightningModule):
    def __init__(self, lr: float = 3e-3, wd: float = 1e-3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.enc = nn.Linear(64, 16)
        self.mid = nn.Linear(16, 16)
        self.mid2 = nn.Linear(16, 16)
        self.mid2.weight = self.mid.weight          # tied weight
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 3)
        self.lr, self.wd = lr, wd

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)
        h = self.drop(F.relu(self.enc(h)))
        h = F.relu(self.mid(h))
        h = F.relu(self.mid(h))                     # layer called twice
        h = F.relu(self.mid2(h))                    # the tied copy
        return self.head(h)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        out = self(batch["x"])
        self.log("val_loss", F.cross_entropy(out, batch["y"]))
        self.log("val_acc", (out.argmax(-1) == batch["y"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.wd)


def per_sample_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def per_sample_loss_bk(outputs, targets):     # wrong: [B, k]
    return F.binary_cross_entropy_with_logits(outputs, F.one_hot(targets, 3).float(), reduction="none")


def dict_batch(batch):
    return batch["x"], batch["y"]


def make(outdir, cb=True, batchfn=True, loss="ok", schemes=None, train=True, **cbkw):
    pl.seed_everything(0, workers=True)
    model = TiedCNN()
    import os
    tr = DataLoader(Blobs(int(os.environ.get("NU_N", 384)), 1), batch_size=64, shuffle=True)
    va = DataLoader(Blobs(192, 2), batch_size=96)
    callbacks = [ModelCheckpoint(dirpath=f"{outdir}/ckpt", save_last=True)]
    mis = None
    if cb:
        from mis_lightning import MISCallback
        lf = {"ok": per_sample_loss, "bk": per_sample_loss_bk}[loss]
        kw = dict(schemes=schemes or ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2"],
                  loss_fn=lf, utility_metrics={"acc": MulticlassAccuracy(3)})
        if batchfn:
            kw["batch_fn"] = dict_batch
        kw.update(cbkw)
        mis = MISCallback(**kw)
        callbacks.append(mis)
    trainer = pl.Trainer(max_epochs=4, callbacks=callbacks, logger=CSVLogger(outdir, name="csv"),
                         enable_progress_bar=False, deterministic=True, enable_model_summary=False)
    return model, tr, va, trainer, mis


def run(outdir, **kw):
    model, tr, va, trainer, mis = make(outdir, **kw)
    assert model.training
    t = time.time()
    trainer.fit(model, train_dataloaders=tr, val_dataloaders=va)
    dt = time.time() - t
    state = {
        "sd": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": trainer.optimizers[0].state_dict(),
        "rng": torch.get_rng_state().clone(),
        "np": np.random.get_state()[1].copy(),
        "py": random.getstate(),
        "training": {n: m.training for n, m in model.named_modules()},
        "next_rand": torch.rand(3),
        "fit_s": dt,
    }
    return state, mis, trainer


if __name__ == "__main__":
    out = sys.argv[1]
    args = sys.argv[2:]
    st, mis, trainer = run(out, cb="--no-cb" not in args, batchfn="--no-batchfn" not in args)
    print("fit seconds", round(st["fit_s"], 1))
    if mis is not None and mis.report is not None:
        print(mis.report.table())
    torch.save(st, f"{out}/state.pt")
