"""A researcher's trial of ``MISCallback`` on a small residual CNN (nu42b; docs/benchmarks.md,
"nu42b"): Conv2d + BatchNorm2d (train mode while training) + ReLU, one residual block, an
``AdaptiveAvgPool2d``, ``Dropout`` and a Linear head, on synthetic 8 x 8 images of 4 classes;
cross-entropy with label smoothing, SGD with momentum and weight decay, a cosine LR schedule,
gradient clipping, float32 on CPU.

    python benchmarks/nu42b_resnet_trial.py single     # one process: fit + table
    python benchmarks/nu42b_resnet_trial.py ddp        # 2 CPU processes (ddp_spawn, gloo) vs one process
    python benchmarks/nu42b_resnet_trial.py ddp_script --out DIR   # strategy="ddp" (this script relaunched)
    python benchmarks/nu42b_resnet_trial.py resume     # stop, resume from a checkpoint, with/without the callback
    python benchmarks/nu42b_resnet_trial.py misconfig  # the errors a misconfiguration gets, and when
    python benchmarks/nu42b_resnet_trial.py all

Runtime: ~1-2 min of one CPU thread for ``all``.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import MISCallback

SIZE, CLASSES, WIDTH = 8, 4, 8
SCHEMES = ["none", "int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32", "rtn_int4", "rtn_int2"]
SMOOTHING, WEIGHT_DECAY = 0.1, 5e-4


def make_data(n: int, seed: int) -> TensorDataset:
    """Images [n, 1, 8, 8] and labels [n]: class c has a bright 4 x 4 square in quadrant c, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.9 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    for c in range(CLASSES):
        r, s = 4 * (c // 2), 4 * (c % 2)
        x[y == c, :, r:r + 4, s:s + 4] += 1.0
    return TensorDataset(x, y)


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing, one loss per record ([B])."""
    return F.cross_entropy(out, y, label_smoothing=SMOOTHING, reduction="none")


def scalar_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The common mistake: the batch mean (shape [])."""
    return F.cross_entropy(out, y, label_smoothing=SMOOTHING)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(pl.LightningModule):
    def __init__(self, lr: float = 0.05, epochs: int = 6) -> None:
        super().__init__()
        self.lr, self.epochs, self.weight_decay = lr, epochs, WEIGHT_DECAY
        self.stem = nn.Sequential(nn.Conv2d(1, WIDTH, 3, padding=1, bias=False), nn.BatchNorm2d(WIDTH), nn.ReLU())
        self.block = Block(WIDTH)
        self.pool, self.drop = nn.AdaptiveAvgPool2d(2), nn.Dropout(0.2)  # 2 x 2 cells: a 32-wide head
        self.head = nn.Linear(4 * WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.pool(self.block(self.stem(x))).flatten(1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = per_sample_loss(self(x), y).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", per_sample_loss(out, y).mean(), sync_dist=True)
        self.log("val_acc", (out.argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)}


def loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(make_data(512, 1), batch_size=batch_size, shuffle=True),
            DataLoader(make_data(256, 2), batch_size=128))


def trainer(out: str, epochs: int, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=CSVLogger(out), default_root_dir=out,
                      enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                      accelerator="cpu", deterministic=True, **kw)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


# -- (a) one process -----------------------------------------------------------------------------
def single(out: str, epochs: int = 6, schemes=SCHEMES, **cb_kw) -> tuple[MISCallback, ResNet]:
    pl.seed_everything(0)
    cb = MISCallback(schemes, loss_fn=per_sample_loss, **cb_kw)
    model = ResNet(epochs=epochs)
    t0 = time.perf_counter()
    trainer(out, epochs, [cb]).fit(model, *loaders())
    print(f"(a) fit + assessment {time.perf_counter() - t0:.1f} s")
    print(cb.report.table())
    print("estimator:", cb.report.estimation.get("estimator"), "|", cb.report.estimation.get("reason"))
    return cb, model


class BufferDigest(pl.Callback):
    """Each rank's BatchNorm buffers and weights at the end of fit, written to ``<out>/rank<k>.pt``
    (module level: ddp_spawn pickles it)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.out, exist_ok=True)
        torch.save(state(pl_module), os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


# -- (b) DDP -------------------------------------------------------------------------------------
def ddp(out: str, epochs: int = 3, strategy: str = "ddp_spawn") -> None:
    """Fit under 2 CPU processes, then assess the weights it copied back with ``assess`` in this
    process on all the training records: the DDP estimation pass sums each rank's shard."""
    pl.seed_everything(0)
    cb = MISCallback(SCHEMES, loss_fn=per_sample_loss, num_records=128)
    model = ResNet(epochs=epochs)
    train, val = loaders(batch_size=32)  # 32 per rank: 64 a step, as in one process
    t0 = time.perf_counter()
    tr = trainer(out, epochs, [BufferDigest(os.path.join(out, "ranks")), cb], strategy=strategy, devices=2)
    tr.fit(model, train, val)
    if tr.global_rank != 0:
        return
    print(f"(b) {strategy} fit + assessment {time.perf_counter() - t0:.1f} s")
    import json
    reports = list(Path(out).rglob("mis_report.json"))
    print("reports:", [str(p) for p in reports])
    rep = json.loads(reports[0].read_text())
    one = ml.assess(model, SCHEMES, DataLoader(train.dataset, batch_size=64), per_sample_loss,
                    weight_decay=WEIGHT_DECAY, num_records=128, val_dataloader=val)
    r0, r1 = (torch.load(os.path.join(out, "ranks", f"rank{k}.pt")) for k in range(2))
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    print("ranks' state_dict entries that differ at fit end:", differ or "none")
    print("n: ddp", rep["n"], "one process", one.n, "| estimator", rep["estimation"]["estimator"],
          one.estimation["estimator"])
    for s in SCHEMES:
        a, b = rep["schemes"][s], one.schemes[s]
        if a.get("error") or b.error:
            print(f"  {s:28s} error: ddp {a.get('error')!s:.60} | one {b.error!s:.60}")
            continue
        rel = abs(a["leakage"] - b.leakage) / max(abs(b.leakage), 1e-300)
        urel = abs(a["utility"]["loss"] - b.utility["loss"]) / b.utility["loss"]
        print(f"  {s:28s} leakage ddp {a['leakage']:.10f} one {b.leakage:.10f} rel {rel:.1e} | "
              f"utility loss rel {urel:.1e}")
    # the same training in one process (batches of 64): not the same weights (per-rank BatchNorm
    # batch statistics over 32 records, the DistributedSampler's order)
    pl.seed_everything(0)
    cb1 = MISCallback(SCHEMES, loss_fn=per_sample_loss, num_records=128)
    m1 = ResNet(epochs=epochs)
    trainer(out + "_one", epochs, [cb1]).fit(m1, *loaders(batch_size=64))
    s0, s1 = state(model), state(m1)
    for k in ("stem.0.weight", "head.weight", "block.bn2.running_mean"):
        print(f"  trained in one process vs DDP: {k} max |diff| {float((s0[k] - s1[k]).abs().max()):.3g} "
              f"(max |w| {float(s1[k].abs().max()):.3g})")
    print("  leakage (DDP-trained / one-process-trained):",
          ", ".join(f"{k} {rep['schemes'][k]['leakage']:.4f} / {r.leakage:.4f}"
                    for k, r in cb1.report.schemes.items() if not r.error))


# -- (c) resume ----------------------------------------------------------------------------------
def resume(out: str, epochs: int = 4, stop: int = 2) -> None:
    """Fit ``stop`` epochs with ModelCheckpoint + EarlyStopping, resume to ``epochs`` from the last
    checkpoint; the same without the callback: weights, BatchNorm buffers, optimizer state, RNG and
    checkpoints' entries (except the callback's own) must be equal."""
    def cbs(d: str) -> list:
        return [ModelCheckpoint(dirpath=os.path.join(d, "ckpt"), save_last=True, monitor="val_loss"),
                EarlyStopping(monitor="val_loss", patience=3)]

    res = {}
    for with_cb in (True, False):
        d = os.path.join(out, "cb" if with_cb else "plain")
        pl.seed_everything(0)
        mis = MISCallback(SCHEMES[:3], loss_fn=per_sample_loss, num_records=128) if with_cb else None
        model = ResNet(epochs=epochs)
        trainer(d, stop, cbs(d) + ([mis] if mis else [])).fit(model, *loaders())
        first = copy.deepcopy(mis.state_dict()) if mis else None
        ckpt = torch.load(os.path.join(d, "ckpt", "last.ckpt"), weights_only=False)
        mis2 = MISCallback(SCHEMES[:3], loss_fn=per_sample_loss, num_records=128) if with_cb else None
        model2 = ResNet(epochs=epochs)
        tr = trainer(d, epochs, cbs(d) + ([mis2] if mis2 else []))
        tr.fit(model2, *loaders(), ckpt_path=os.path.join(d, "ckpt", "last.ckpt"))
        res[with_cb] = dict(state=state(model2), opt=tr.optimizers[0].state_dict(), rng=rng_states(), ckpt=ckpt,
                            first=first, mis=mis2)
    a, b = res[True], res[False]
    print("(c) resumed weights + BatchNorm buffers equal with/without callback:", same(a["state"], b["state"]))
    print("    optimizer state equal:", all(torch.equal(x["momentum_buffer"], y["momentum_buffer"])
                                          for x, y in zip(a["opt"]["state"].values(), b["opt"]["state"].values())))
    print("    RNG equal:", torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
          and a["rng"][2] == b["rng"][2])
    ca, cb_ = a["ckpt"], b["ckpt"]
    print("    checkpoint keys with / without:", sorted(ca), "|", sorted(cb_))
    print("    checkpoint state_dict equal:", same(ca["state_dict"], cb_["state_dict"]))
    print("    checkpoint callbacks:", sorted(ca["callbacks"]))
    print("    history after first fit:", [(h["stage"], h["epoch"], h["step"]) for h in a["first"]["history"]])
    print("    history after resumed fit:", [(h["stage"], h["epoch"], h["step"]) for h in a["mis"].history])
    print(a["mis"].report.table())


# -- misconfiguration ----------------------------------------------------------------------------
def misconfig(out: str) -> None:
    def attempt(label, fn):
        t0 = time.perf_counter()
        try:
            fn()
            print(f"  {label}: NO ERROR")
        except BaseException as exc:  # noqa: BLE001 - shown to the user
            print(f"  {label}: {type(exc).__name__} after {time.perf_counter() - t0:.1f} s: {str(exc)[:400]}")

    print("misconfiguration:")
    attempt("unknown scheme", lambda: MISCallback(["int4_wieght_only"], loss_fn=per_sample_loss))

    steps = []

    class Count(pl.Callback):
        def on_train_batch_end(self, *a):
            steps.append(1)

    def scalar():
        pl.seed_everything(0)
        trainer(os.path.join(out, "scalar"), 2, [MISCallback(SCHEMES[:2], loss_fn=scalar_loss), Count()]).fit(
            ResNet(), *loaders())
    attempt("scalar loss", scalar)
    print("    training steps taken before the error:", len(steps))

    def lam():
        pl.seed_everything(0)
        trainer(os.path.join(out, "lambda"), 1,
                [MISCallback(SCHEMES[:2], loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none"))],
                strategy="ddp_spawn", devices=2).fit(ResNet(), *loaders())
    attempt("lambda under ddp_spawn", lam)

    def only_g32():
        pl.seed_everything(0)
        trainer(os.path.join(out, "g32"), 1, [MISCallback(["intx_weight_only_int4_g32"], loss_fn=per_sample_loss),
                                              Count()]).fit(ResNet(), *loaders())
    steps.clear()
    attempt("only a group-32 scheme (it quantizes the 32-wide head only: no error, 91% in float)", only_g32)
    print("    training steps taken before the error:", len(steps))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["single", "ddp", "ddp_script", "resume", "misconfig", "all"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    out = a.out or tempfile.mkdtemp(prefix="nu42b_")
    if a.what in ("single", "all"):
        single(os.path.join(out, "single"))
    if a.what in ("ddp", "all"):
        ddp(os.path.join(out, "ddp"))
    if a.what == "ddp_script":  # strategy="ddp": Lightning relaunches this script for rank 1
        ddp(os.path.join(out, "ddp_script"), strategy="ddp")
    if a.what in ("resume", "all"):
        resume(os.path.join(out, "resume"))
    if a.what in ("misconfig", "all"):
        misconfig(os.path.join(out, "misconfig"))


if __name__ == "__main__":
    main()
