"""A researcher's trial of ``MISCallback`` on a small Transformer classifier (nu41b;
docs/benchmarks.md, "nu41b"): ``nn.Embedding`` + a learned position table + one
``nn.TransformerEncoderLayer`` + ``LayerNorm`` + a Linear head (d = 2,610) on a synthetic
sequence task (is token 3 more frequent than token 5 in 8 tokens of 12?), Adam with coupled weight
decay, TensorBoard and (if installed) MLflow loggers; prints the fit + assessment wall time, the
table and the estimator.

    python benchmarks/nu41b_transformer_trial.py                               # plain
    python benchmarks/nu41b_transformer_trial.py --precision bf16-mixed
    python benchmarks/nu41b_transformer_trial.py --accumulate 2               # batch 64, 2 micro-batches
    python benchmarks/nu41b_transformer_trial.py --batch-size 128             # the same objective in one batch

Runtime: ~15-30 s on one CPU thread (15 epochs of 512 records, then 5 schemes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import MISCallback

VOCAB, LENGTH, WIDTH, CLASSES = 12, 8, 16, 2
SCHEMES = ["none", "int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2", "bf16"]


def make_data(n: int, seed: int) -> TensorDataset:
    """Token sequences [n, LENGTH] and labels [n]: 1 where token 3 outnumbers token 5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    y = ((x == 3).sum(1) > (x == 5).sum(1)).long()
    return TensorDataset(x, y)


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


class TinyTransformer(pl.LightningModule):
    def __init__(self, weight_decay: float = 1e-3, lr: float = 3e-3) -> None:
        super().__init__()
        self.weight_decay, self.lr = weight_decay, lr
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.randn(LENGTH, WIDTH) * 0.1)
        self.enc = nn.TransformerEncoderLayer(WIDTH, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.enc(self.emb(x) + self.pos)).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = per_sample_loss(self(x), y).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", per_sample_loss(out, y).mean())
        self.log("val_acc", (out.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def main(argv: list[str] | None = None) -> MISCallback:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default=None, help="log folder (default: a temporary one)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = a.out or tempfile.mkdtemp(prefix="nu41b_")
    pl.seed_everything(0)
    loggers = [TensorBoardLogger(out, name="tb")]
    try:
        import mlflow  # noqa: F401
        loggers.append(MLFlowLogger(experiment_name="nu41b", tracking_uri=f"sqlite:///{out}/mlflow.db",
                                    artifact_location=f"file://{os.path.abspath(out)}/mlartifacts"))
    except ImportError:
        print("mlflow not installed: TensorBoard only")
    callback = MISCallback(schemes=SCHEMES, loss_fn=per_sample_loss)
    kw = {"precision": a.precision} if a.precision else {}
    trainer = pl.Trainer(max_epochs=a.epochs, callbacks=[callback], logger=loggers, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=a.accumulate, **kw)
    t0 = time.perf_counter()
    trainer.fit(TinyTransformer(), DataLoader(make_data(512, 1), batch_size=a.batch_size, shuffle=True),
                DataLoader(make_data(256, 2), batch_size=128))
    print(f"fit + assessment: {time.perf_counter() - t0:.1f} s; logs in {out}")
    print(callback.report.table())
    print("estimator:", callback.report.estimation.get("estimator"), "|", callback.report.estimation.get("reason"))
    return callback


if __name__ == "__main__":
    main()
