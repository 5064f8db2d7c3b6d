"""A researcher's trial of ``MISCallback`` / ``MISIndicator`` under training conditions earlier
trials had not met (nu43; docs/benchmarks.md, "nu43"): mixed precision, a frozen backbone,
``torch.compile``, the Trainer's loop options, unused parameters and a dict-returning
``training_step``. Each case fits a small MLP classifier (20 inputs, 3 classes, 1,024 synthetic
records, Adam with coupled L2 = the objective's ``weight_decay``) with and without the callback,
checks that nothing the user owns moved (final weights, optimizer state, RNG stream after fit,
checkpoint weights/optimizer/loops), and compares the callback's leakage with
``mis_lightning.assess`` on the same trained weights and records (float32, no autocast).

    python benchmarks/nu43_trial.py precision   # fp32 / bf16-mixed / 16-mixed, MISIndicator under bf16 autocast
    python benchmarks/nu43_trial.py frozen      # requires_grad_(False) backbone; torch.no_grad backbone
    python benchmarks/nu43_trial.py compile     # trainer.fit(torch.compile(m)); compiled in configure_model
    python benchmarks/nu43_trial.py loops       # accumulate/clip, limit_train_batches, fast_dev_run, max_steps, validate/test, resume
    python benchmarks/nu43_trial.py unused      # an auxiliary head the forward never uses; training_step -> {"loss": ...}
    python benchmarks/nu43_trial.py all

Runtime (1 thread): about 100 CPU s (190 s wall at load 4) for ``all`` (``compile`` uses the ``aot_eager`` backend by
default, ``--backend inductor`` compiles C++ too).
"""

from __future__ import annotations

import argparse
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
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import MISCallback, MISIndicator

SCHEMES = ["int8_weight_only", "rtn_int4", "rtn_int2"]
WD, NREC = 1e-2, 64


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = ((x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.8).long())
    return TensorDataset(x, y)


TRAIN, VAL = make_data(1024, 1), make_data(256, 2)


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), y, reduction="none")


class Net(pl.LightningModule):
    """``20 -> H -> H -> 3`` tanh MLP (H = 8: 267 weights); ``backbone`` = the first two Linear layers."""

    def __init__(self, hidden: int = 8, freeze: str | None = None, aux: bool = False, dict_loss: bool = False,
                 compile_in_configure: str | None = None, mis_metric: bool = False) -> None:
        super().__init__()
        self.weight_decay, self.freeze, self.dict_loss = WD, freeze, dict_loss
        self.backbone = nn.Sequential(nn.Linear(20, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 3)
        self.aux = nn.Linear(hidden, 1) if aux else None  # registered, never used in forward
        if freeze == "requires_grad":
            self.backbone.requires_grad_(False)
        self.compile_in_configure = compile_in_configure
        self.mis = MISIndicator(self, per_sample_loss, SCHEMES, num_records=NREC, num_training_records=len(TRAIN),
                                weight_decay=WD) if mis_metric else None
        self.mis_out: list[dict] = []

    def configure_model(self) -> None:
        if self.compile_in_configure and not isinstance(self.backbone, torch._dynamo.eval_frame.OptimizedModule):
            self.backbone = torch.compile(self.backbone, backend=self.compile_in_configure)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze == "no_grad":
            with torch.no_grad():
                h = self.backbone(x)
        else:
            h = self.backbone(x)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = per_sample_loss(self(x), y).mean()
        return {"loss": loss, "n": len(y)} if self.dict_loss else loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        if dataloader_idx == 0:
            self.log("val_loss", per_sample_loss(self(x), y).mean(), add_dataloader_idx=False)
        elif self.mis is not None:
            self.mis.update(x, y)  # under the precision plugin's autocast with "bf16-mixed"

    def on_validation_epoch_end(self):
        if self.mis is not None and not self.trainer.sanity_checking:
            self.mis_out.append({k: float(v["leakage"]) for k, v in self.mis.compute().items()})
        if self.mis is not None:
            self.mis.reset()

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", per_sample_loss(self(x), y).mean())

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=2e-2,
                                weight_decay=self.weight_decay)


def loaders(shuffle: bool = True) -> tuple[DataLoader, DataLoader]:
    return DataLoader(TRAIN, batch_size=64, shuffle=shuffle), DataLoader(VAL, batch_size=128)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def rng() -> tuple:
    return torch.get_rng_state(), torch.from_numpy(np.random.get_state()[1].copy()), random.getstate()


def ckpt_core(path: Path) -> dict:
    ck = torch.load(path, weights_only=False)
    return {k: ck[k] for k in ("state_dict", "optimizer_states", "loops", "lr_schedulers", "epoch", "global_step")
            if k in ck}


def fit(out: str, make_model, *, callback: bool, cb_kw: dict | None = None, fit_kw: dict | None = None,
        shuffle: bool = True, **tkw):
    """Seeded fit; returns (model, trainer, callback, rng after fit, checkpoint core or None)."""
    pl.seed_everything(0, verbose=False)
    model = make_model()
    cb = MISCallback(SCHEMES, loss_fn=per_sample_loss, num_records=NREC, **(cb_kw or {})) if callback else None
    ck = ModelCheckpoint(dirpath=os.path.join(out, "ck"), save_last=True)
    kw = dict(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", deterministic=True, default_root_dir=out)
    kw.update(tkw)
    if kw.get("fast_dev_run"):
        kw.pop("max_epochs")
    tr = pl.Trainer(callbacks=[ck] + ([cb] if cb else []), **kw)
    train, val = loaders(shuffle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(model, train, val, **(fit_kw or {}))
    last = Path(out, "ck", "last.ckpt")
    return model, tr, cb, rng(), (ckpt_core(last) if last.exists() else None)


def compare(tag: str, make_model, *, fit_kw: dict | None = None, records=None, shuffle: bool = True,
            assess_model=None, cb_kw: dict | None = None, **tkw) -> tuple:
    """Fit with and without the callback; print what differs and the callback vs assess figures."""
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        t0 = time.perf_counter()
        m1, tr1, cb, r1, c1 = fit(d1, make_model, callback=True, fit_kw=fit_kw, shuffle=shuffle, cb_kw=cb_kw, **tkw)
        t1 = time.perf_counter()
        m0, tr0, _, r0, c0 = fit(d2, make_model, callback=False, fit_kw=fit_kw, shuffle=shuffle, **tkw)
        untouched = {"weights": same(snapshot(m1), snapshot(m0)),
                     "optimizer": same(tr1.optimizers[0].state_dict(), tr0.optimizers[0].state_dict()),
                     "rng after fit": same(r1, r0),
                     "checkpoint": (c1 is None and c0 is None) or same(c1, c0)}
    print(f"[{tag}] fit+callback {t1 - t0:.1f} s; identical without the callback: "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in untouched.items()))
    if cb is None or cb.report is None:
        print(f"[{tag}] no report (last_error: {getattr(cb, 'last_error', None)})")
        return cb, m1, None
    rep = cb.report
    ds = records if records is not None else TRAIN
    target = assess_model(m1) if assess_model else m1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ml.assess(target, SCHEMES, DataLoader(ds, batch_size=64), per_sample_loss, weight_decay=WD,
                        num_records=NREC, val_dataloader=loaders()[1])
    print(f"[{tag}] n={rep.n} (assess n={ref.n}), d={rep.d}, estimator: {rep.estimation.get('estimator')}")
    for s in SCHEMES:
        a, b = rep.schemes[s], ref.schemes[s]
        if a.error or b.error:
            print(f"   {s:18s} error cb {a.error!s:.80} | assess {b.error!s:.80}")
            continue
        print(f"   {s:18s} leakage cb {a.leakage:.6f} assess {b.leakage:.6f} rel "
              f"{abs(a.leakage - b.leakage) / abs(b.leakage):.1e}; utility loss cb {a.utility['loss']:.5f} "
              f"assess {b.utility['loss']:.5f}")
    for w in rep.warnings:
        if any(k in w for k in ("frozen", "never moved", "require grad", "no optimizer", "precision", "autocast",
                                 "batches", "records", "compile")):
            print(f"   warning: {w[:300]}")
    return cb, m1, ref


# -- (1) precision ---------------------------------------------------------------------------------
def precision(args) -> None:
    for prec in ("32-true", "bf16-mixed", "16-mixed"):
        try:
            compare(f"precision={prec}", Net, precision=prec)
        except Exception as exc:  # noqa: BLE001 - the trial reports what the user meets
            print(f"[precision={prec}] {type(exc).__name__}: {str(exc)[:300]}")
    # above 10,000 weights (float32 per-sample passes), assessed in on_validation_epoch_end
    compare("precision=bf16-mixed, 11,619 weights, every_n_val_epochs=1", lambda: Net(hidden=96),
            precision="bf16-mixed", max_epochs=1, cb_kw={"every_n_val_epochs": 1})
    # the documented MISIndicator idiom in validation_step, where "bf16-mixed" autocasts: a model
    # above 10,000 weights (the float32 per-sample passes)
    for prec in ("32-true", "bf16-mixed"):
        pl.seed_everything(0, verbose=False)
        model = Net(hidden=96, mis_metric=True)
        tr = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", precision=prec, num_sanity_val_steps=0, enable_checkpointing=False)
        train, val = loaders()
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tr.fit(model, train, [val, DataLoader(TRAIN, batch_size=64)])
                ref = ml.assess(model, SCHEMES, DataLoader(TRAIN, batch_size=64), per_sample_loss, weight_decay=WD,
                                num_records=NREC)
                with torch.autocast("cpu", dtype=torch.bfloat16):  # a user's autocast region around assess
                    inside = ml.assess(model, SCHEMES, DataLoader(TRAIN, batch_size=64), per_sample_loss,
                                       weight_decay=WD, num_records=NREC)
            print(f"[assess inside torch.autocast('cpu', bfloat16), precision={prec}, d={ref.d}]: "
                  + "; ".join(f"{s} inside {inside.schemes[s].leakage:.6f} outside {ref.schemes[s].leakage:.6f}"
                              for s in SCHEMES))
            got = model.mis_out[-1]
            print(f"[MISIndicator in validation_step, precision={prec}, d={ref.d}] {time.perf_counter() - t0:.1f} s: "
                  + "; ".join(f"{s} metric {got[s]:.6f} assess {ref.schemes[s].leakage:.6f} "
                              f"rel {abs(got[s] - ref.schemes[s].leakage) / ref.schemes[s].leakage:.1e}" for s in SCHEMES))
        except Exception as exc:  # noqa: BLE001
            print(f"[MISIndicator in validation_step, precision={prec}] {type(exc).__name__}: {str(exc)[:300]}")


# -- (2) frozen backbone ---------------------------------------------------------------------------
def frozen(args) -> None:
    compare("frozen: backbone.requires_grad_(False)", lambda: Net(freeze="requires_grad"))
    compare("frozen: backbone under torch.no_grad in forward", lambda: Net(freeze="no_grad"))


# -- (3) torch.compile -----------------------------------------------------------------------------
def compiled(args) -> None:
    backend = args.backend
    holder = {}

    def make():
        holder["plain"] = Net()
        return torch.compile(holder["plain"], backend=backend)

    cb, m, _ = compare(f"compile: trainer.fit(torch.compile(m, backend={backend!r}))", make,
                       assess_model=lambda m: getattr(m, "_orig_mod", m))
    print("   the model passed is", type(m).__name__, "; its forward compiled:",
          type(getattr(m, "_orig_mod", m).forward).__name__)
    cb, m, _ = compare(f"compile: backbone compiled in configure_model ({backend})",
                       lambda: Net(compile_in_configure=backend))
    print("   parameter names:", [n for n, _ in m.named_parameters()][:2], "...; report params:",
          list(cb.report.schemes[SCHEMES[0]].layers)[:2] if cb and cb.report else None)


# -- (4) the Trainer's loop options ----------------------------------------------------------------
def loops(args) -> None:
    compare("accumulate_grad_batches=4, gradient_clip_val=0.5", Net, accumulate_grad_batches=4, gradient_clip_val=0.5)
    compare("limit_train_batches=3 (unshuffled)", Net, limit_train_batches=3, shuffle=False,
            records=torch.utils.data.Subset(TRAIN, range(3 * 64)))
    compare("limit_train_batches=3 (shuffled)", Net, limit_train_batches=3)
    compare("max_steps=5 (stops mid-epoch, unshuffled)", Net, max_steps=5, shuffle=False,
            records=torch.utils.data.Subset(TRAIN, range(5 * 64)))
    with tempfile.TemporaryDirectory() as d:
        _, tr, cb, _, _ = fit(d, Net, callback=True, fast_dev_run=True)
        print(f"[fast_dev_run=True] report n={getattr(cb.report, 'n', None)}, report_path={cb.report_path}, "
              f"files written: {sorted(p.name for p in Path(d).rglob('*') if p.is_file())}")
    with tempfile.TemporaryDirectory() as d:
        m, tr, cb, _, _ = fit(d, Net, callback=True)
        runs, path = len(cb.history), cb.report_path
        mtime = path.stat().st_mtime_ns
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.validate(m, loaders()[1], verbose=False)
            tr.test(m, loaders()[1], verbose=False)
        print(f"[validate/test after fit] runs before {runs} after {len(cb.history)}; report rewritten: "
              f"{path.stat().st_mtime_ns != mtime}; report kept: {cb.report is not None}")
    # resume: stop after 2 epochs, resume to 4 from last.ckpt; vs 4 epochs straight
    with tempfile.TemporaryDirectory() as d:
        fit(d, Net, callback=True, max_epochs=2)
        last = str(Path(d, "ck", "last.ckpt"))
        keep = os.path.join(d, "resume_from.ckpt")
        os.replace(last, keep)
        compare("resume from epoch 2 to 4 (ckpt_path)", Net, fit_kw={"ckpt_path": keep})
    with tempfile.TemporaryDirectory() as d:  # resumed mid-epoch
        fit(d, Net, callback=True, max_steps=12, shuffle=False)
        keep = os.path.join(d, "resume_from.ckpt")
        os.replace(str(Path(d, "ck", "last.ckpt")), keep)
        compare("resume from step 12 (mid-epoch 1) to 4 epochs", Net, fit_kw={"ckpt_path": keep}, shuffle=False)


# -- (5) unused parameters, dict loss --------------------------------------------------------------
def unused(args) -> None:
    cb, m, ref = compare("an auxiliary head never used in forward", lambda: Net(aux=True))
    # the same weights assessed without the unused head: its weights carry no leakage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        without = ml.assess(m, SCHEMES, DataLoader(TRAIN, batch_size=64), per_sample_loss, weight_decay=WD,
                            num_records=NREC, val_dataloader=loaders()[1],
                            params=[n for n, _ in m.named_parameters() if not n.startswith("aux.")])
    for s in SCHEMES:
        a, b = cb.report.schemes[s], without.schemes[s]
        print(f"   {s:18s} with the unused head: leakage {a.leakage:.6f} d_eff {a.d_eff:.3f} | params= without it: "
              f"leakage {b.leakage:.6f} d_eff {b.d_eff:.3f}")
    compare("training_step returns {'loss': ..., 'n': ...}", lambda: Net(dict_loss=True))


CASES = {"precision": precision, "frozen": frozen, "compile": compiled, "loops": loops, "unused": unused}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=[*CASES, "all"])
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend for the compile case")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    for name, fn in CASES.items():
        if args.case in (name, "all"):
            fn(args)
    print(f"total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
