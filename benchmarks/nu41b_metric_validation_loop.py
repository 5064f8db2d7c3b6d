"""``MISIndicator`` in a LightningModule's validation loop, as docs/lightning.md ("In a
LightningModule's validation loop") writes it (nu41b): the training records come as a second
validation loader, ``on_validation_epoch_end`` computes, logs with ``self.log_dict`` and resets.
Prints each epoch's ``mis/int8_weight_only`` and the record count it saw, whether ``reset()``
emptied the states, and whether the weights and the RNG stream after ``fit`` equal a fit without
the Metric. ``--self-log`` tries the torchmetrics idiom ``self.log("mis", self.mis)`` instead
(Lightning refuses it: ``compute()`` returns a dict).

    python benchmarks/nu41b_metric_validation_loop.py
    python benchmarks/nu41b_metric_validation_loop.py --self-log

Runtime: ~5 s on one CPU thread (two fits of 3 epochs, 256 records, d = 418, exact estimator).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import MISIndicator

VOCAB, LENGTH = 12, 8


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    return TensorDataset(x, ((x == 3).sum(1) > (x == 5).sum(1)).long())


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


class AttentionNet(pl.LightningModule):
    def __init__(self, with_metric: bool = True, self_log: bool = False, n_train: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.att = nn.MultiheadAttention(8, 1, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)
        self.with_metric, self.self_log = with_metric, self_log
        self.history: list[tuple[int, int, float, int]] = []  # epoch, records seen, MIS, records after reset
        if with_metric:
            self.mis = MISIndicator(self, per_sample_loss, ["int8_weight_only", "intx_weight_only_int4"],
                                    num_training_records=n_train, num_records=64, uncertainty_draws=0,
                                    weight_decay=1e-2)

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.att(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return per_sample_loss(self(x), y).mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        if dataloader_idx == 0:
            self.log("val_loss", per_sample_loss(self(x), y).mean(), add_dataloader_idx=False)
        elif self.with_metric:
            self.mis.update(x, y)

    def on_validation_epoch_end(self):
        if not self.with_metric:
            return
        if self.self_log:
            self.log("mis", self.mis)
            return
        if not self.trainer.sanity_checking:
            seen = int(self.mis.s_n)
            out = self.mis.compute()
            self.log_dict({f"mis/{s}": v["mis"] for s, v in out.items()})
        self.mis.reset()
        if not self.trainer.sanity_checking:
            self.history.append((self.current_epoch, seen, float(out["int8_weight_only"]["mis"]), int(self.mis.s_n)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-2)


def fit(with_metric: bool, self_log: bool = False, epochs: int = 3) -> tuple[AttentionNet, float]:
    pl.seed_everything(0)
    train, val = make_data(256, 1), make_data(128, 2)
    model = AttentionNet(with_metric, self_log, len(train))
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True),
                [DataLoader(val, batch_size=64), DataLoader(train, batch_size=64)])
    return model, torch.rand(1).item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--self-log", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.self_log:
        try:
            fit(True, self_log=True)
        except ValueError as e:
            print("self.log(name, metric) refused by Lightning:", str(e)[:160])
        return
    with_m, r1 = fit(True)
    without, r0 = fit(False)
    for epoch, seen, mis, after in with_m.history:
        print(f"epoch {epoch}: records seen {seen}, mis/int8_weight_only {mis:.4f}, records after reset {after}")
    same = all(torch.equal(p, q) for p, q in zip(with_m.parameters(), without.parameters()))
    print("weights identical with and without the Metric:", same, "| RNG after fit identical:", r1 == r0)


if __name__ == "__main__":
    main()
