"""MISCallback under ddp_spawn (2 CPU ranks, gloo) whose ranks' first batches choose apart (ddp56).

A 25-weight 5-output linear model fitted 3 epochs on 90 records under a masked least squares: even
records label outputs 0-1 (2 loss directions), odd ones all 5; the callback's shards are
``records[rank::2]``, so rank 0's first batch needs 2 Gauss-Newton directions (exact) and rank 1's 5
(sampled labels; ``EXACT_MAX_PARAMS`` is 0 here so that ``"auto"`` takes the per-layer Gauss-Newton
diagonal on this small model). Prints the callback's report figure and, on the fitted weights, one
process's (``MISIndicator``, all 90 records in one batch).

    PYTHONPATH=$PWD python benchmarks/ddp_choice_callback.py ddp_spawn 2 OUT_DIR
"""

import importlib
import json
import sys

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import MISCallback, MISIndicator

E = importlib.import_module("mis_lightning.estimation.estimate")
E.EXACT_MAX_PARAMS = 0  # (at import: the spawned ranks import this module too)


def masked_loss(o, t):
    return 0.5 * (t[:, 5:] * (o - t[:, :5]) ** 2).sum(1)


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=g)
    mask = torch.zeros(90, 5)
    mask[:, :2], mask[1::2] = 1, 1  # odd records (rank 1's shard): all 5
    y = X @ torch.randn(4, 5, generator=g) + 0.5 * torch.randn(90, 5, generator=g)
    return TensorDataset(X, torch.cat([y, mask], 1))


class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 5)

    def forward(self, x):
        return self.lin(x)

    def training_step(self, b, i):
        return masked_loss(self(b[0]), b[1]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(strategy, devices, out):
    cb = MISCallback(["rtn_int4"], loss_fn=masked_loss, uncertainty_draws=0, dirpath=out, covariance="independent")
    tr = pl.Trainer(strategy=strategy, devices=devices, accelerator="cpu", max_epochs=3, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
    pl.seed_everything(0)
    m = M()
    tr.fit(m, DataLoader(data(), batch_size=15, shuffle=False))
    ref = MISIndicator(m, masked_loss, ["rtn_int4"], uncertainty_draws=0, covariance="independent",
                       num_training_records=90)
    X, T = data().tensors
    ref.update(X, T)
    res = ref.compute()
    r = json.load(open(f"{out}/mis_report.json"))
    print("REF one process, one batch, the fitted weights:", float(res["rtn_int4"]["leakage"]), ref.accumulator.estimator)
    print("CALLBACK report:", r["schemes"]["rtn_int4"]["leakage"], r["estimation"]["estimator"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    fit(sys.argv[1], int(sys.argv[2]), sys.argv[3])
