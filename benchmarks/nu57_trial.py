"""A researcher's trial of ``MISCallback`` under training set-ups earlier trials (nu41b-nu49) had not
met (nu57; docs/benchmarks.md, "nu57"). Each case fits a small classifier with and without the
callback, checks that nothing the user owns moved (final weights and buffers, optimizer state, the
RNG streams after fit, the last checkpoint's weights / optimizer / loops) and compares the
callback's leakage and utility with ``mis_lightning.assess`` on the same trained model and records
(same options).

    python benchmarks/nu57_trial.py datamodule  # LightningDataModule: prepare_data, setup(stage), random_split
    python benchmarks/nu57_trial.py iterable    # IterableDataset of records (own shuffle), limit_train_batches, workers
    python benchmarks/nu57_trial.py twice       # trainer.fit twice on one Trainer (max_epochs raised in between)
    python benchmarks/nu57_trial.py overfit     # Trainer(overfit_batches=2) on a shuffled loader
    python benchmarks/nu57_trial.py dictout     # forward returns {"logits", "features"}; torchmetrics Accuracy
    python benchmarks/nu57_trial.py gru         # GRU over packed variable-length sequences, a head assessed
    python benchmarks/nu57_trial.py compile     # nn.Module.compile() in place; a torch.compile'd forward method
    python benchmarks/nu57_trial.py truecast    # precision="bf16-true" / "64-true": the weights themselves cast
    python benchmarks/nu57_trial.py trainmode   # hooks keeping Dropout on in validation / BatchNorm frozen in training
    python benchmarks/nu57_trial.py all

Runtime: about a minute per case at load 9 on 2 shared cores (1 thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, random_split

import mis_lightning as ml
from mis_lightning import MISCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nu43_trial import ckpt_core, make_data, per_sample_loss, rng, same, snapshot  # noqa: E402

SCHEMES = ["none", "rtn_int8", "rtn_int4", "rtn_int2"]
WD, NREC, EPOCHS = 1e-2, 64, 3
TRAIN, VAL = make_data(512, 1), make_data(256, 2)


class Net(pl.LightningModule):
    """``20 -> 16 -> 3`` tanh MLP with optional Dropout / BatchNorm / dict outputs / compiled forward."""

    def __init__(self, *, dropout: float = 0.0, batchnorm: bool = False, dict_out: bool = False,
                 mc_val: bool = False, freeze_bn: bool = False, in_dim: int = 20) -> None:
        super().__init__()
        self.weight_decay, self.dict_out, self.mc_val, self.freeze_bn = WD, dict_out, mc_val, freeze_bn
        self.body = nn.Sequential(nn.Linear(in_dim, 16), *( [nn.BatchNorm1d(16)] if batchnorm else []), nn.Tanh(),
                                  nn.Dropout(dropout))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        out = self.head(h)
        return {"logits": out, "features": h} if self.dict_out else out

    def logits(self, x):
        out = self(x)
        return out["logits"] if self.dict_out else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        return per_sample_loss(self.logits(x), y).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", per_sample_loss(self.logits(x), y).mean())

    def on_validation_model_eval(self):  # Monte Carlo dropout in validation: the user's choice
        super().on_validation_model_eval()
        if self.mc_val:
            for m in self.modules():
                if isinstance(m, nn.Dropout):
                    m.train()

    def on_train_epoch_start(self):  # fine-tuning habit: BatchNorm statistics frozen while training
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.eval()

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=2e-2,
                                weight_decay=self.weight_decay)


def dict_loss(out, y):
    return per_sample_loss(out["logits"], y)


def dict_logits(out, y):
    return out["logits"], y


def trainer(out: str, cb: MISCallback | None, **kw) -> pl.Trainer:
    opts = dict(max_epochs=EPOCHS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu", deterministic=True, default_root_dir=out, num_sanity_val_steps=0)
    opts.update(kw)
    ck = ModelCheckpoint(dirpath=os.path.join(out, "ck"), save_last=True)
    return pl.Trainer(callbacks=[ck] + ([cb] if cb else []), **opts)


def run_pair(tag: str, go, *, cb_kw: dict | None = None, loss_fn=per_sample_loss):
    """``go(trainer_factory, callback or None) -> model``: fitted seeded with and without the callback.

    Returns (model, callback, untouched dict, seconds)."""
    res = {}
    for with_cb in (True, False):
        with tempfile.TemporaryDirectory() as d:
            pl.seed_everything(0, verbose=False)
            cb = MISCallback(SCHEMES, loss_fn=loss_fn, **{"num_records": NREC, **(cb_kw or {})}) if with_cb else None
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model, tr = go(lambda d=d, cb=cb, **kw: trainer(d, cb, **kw), cb)
            last = Path(d, "ck", "last.ckpt")
            res[with_cb] = dict(model=model, cb=cb, tr=tr, rng=rng(), state=snapshot(model),
                                opt=tr.optimizers[0].state_dict() if tr.optimizers else None,
                                ck=ckpt_core(last) if last.exists() else None, s=time.perf_counter() - t0,
                                warns=[str(w.message) for w in caught])
    a, b = res[True], res[False]
    untouched = {"weights+buffers": same(a["state"], b["state"]), "optimizer": same(a["opt"], b["opt"]),
                 "rng": same(a["rng"], b["rng"]), "checkpoint": same(a["ck"], b["ck"])}
    print(f"[{tag}] fit+callback {a['s']:.1f} s (without {b['s']:.1f} s); identical without the callback: "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in untouched.items()))
    return a["model"], a["cb"], untouched, a["warns"]


def agree(tag: str, model, cb, records, *, val=None, batch_size: int = 64, **kw):
    """The callback's report against ``assess`` on the same weights, records and options."""
    if cb is None or cb.report is None:
        print(f"[{tag}] NO REPORT; last_error: {str(getattr(cb, 'last_error', None))[:400]}")
        return None
    rep = cb.report
    kw.setdefault("loss_fn", per_sample_loss)
    kw.setdefault("weight_decay", WD)  # the callback reads the module's attribute; assess is told
    loss_fn = kw.pop("loss_fn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ml.assess(model, SCHEMES, records if isinstance(records, DataLoader) else
                        DataLoader(records, batch_size=batch_size), loss_fn, num_records=NREC,
                        val_dataloader=val if val is not None else DataLoader(VAL, batch_size=128), **kw)
    print(f"[{tag}] n cb {rep.n} / assess {ref.n}; d {rep.d} / {ref.d}; estimator {rep.estimation.get('estimator')}"
          f" / {ref.estimation.get('estimator')}; weight_decay {rep.estimation.get('weight_decay')}"
          f" / {ref.estimation.get('weight_decay')}")
    worst = 0.0
    marks = [{r["scheme"]: r.get("indicative", "") for r in x.rows()} for x in (rep, ref)]
    for s in SCHEMES:
        x, y = rep.schemes[s], ref.schemes[s]
        if x.error or y.error:
            print(f"   {s:9s} error cb {x.error!s:.100} | assess {y.error!s:.100}")
            continue
        rel = abs(x.leakage - y.leakage) / max(abs(y.leakage), 1e-300)
        worst = max(worst, rel)
        ux, uy = x.utility.get("loss", float("nan")), y.utility.get("loss", float("nan"))
        print(f"   {s:9s} leakage cb {x.leakage:.6f}{'*' if marks[0].get(s) else ' '} assess {y.leakage:.6f}"
              f"{'*' if marks[1].get(s) else ' '} rel {rel:.1e}; utility loss cb {ux:.5f} assess {uy:.5f}")
    print(f"   marks cb: {sorted(set(marks[0].values()))}")
    heads = sorted({w.split(".")[0][:110] for w in rep.warnings})
    print(f"   report warnings ({len(rep.warnings)}): " + " | ".join(heads))
    only_cb = sorted({w[:90] for w in rep.warnings} - {w[:90] for w in ref.warnings})
    only_as = sorted({w[:90] for w in ref.warnings} - {w[:90] for w in rep.warnings})
    if only_cb or only_as:
        print(f"   warnings only in the callback: {only_cb}\n   warnings only in assess: {only_as}")
    return worst


def catch(tag: str, fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the trial reports what the user meets
        print(f"[{tag}] {type(exc).__name__}: {str(exc)[:600]}")


# -- datamodule --------------------------------------------------------------------------------------
class DM(pl.LightningDataModule):
    """prepare_data writes nothing; setup('fit') splits a pool with ``random_split`` (global RNG)."""

    def __init__(self, seeded: bool) -> None:
        super().__init__()
        self.seeded, self.calls = seeded, []

    def setup(self, stage: str) -> None:
        self.calls.append(stage)
        pool = make_data(640, 3)
        g = torch.Generator().manual_seed(5) if self.seeded else None
        self.train_set, self.val_set = random_split(pool, [512, 128], **({"generator": g} if g else {}))

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=128)


def datamodule(args) -> None:
    for seeded in (True, False):
        tag = f"datamodule, random_split {'seeded' if seeded else 'on the global RNG'}"
        holder = {}

        def go(make_trainer, cb, seeded=seeded, holder=holder):
            holder["dm"] = dm = DM(seeded)
            tr, m = make_trainer(), Net()
            tr.fit(m, datamodule=dm)
            return m, tr

        m, cb, _, _ = run_pair(tag, go)
        dm = m.trainer.datamodule  # the callback's fit's own data module
        print(f"   setup calls {dm.calls}; split equal to the fit without the callback: "
              f"{dm.train_set.indices == holder['dm'].train_set.indices}")
        agree(tag, m, cb, dm.train_set, val=DataLoader(dm.val_set, batch_size=128))


# -- iterable ----------------------------------------------------------------------------------------
class Stream(IterableDataset):
    """Records of an in-memory tensor pair, reshuffled every pass by its own generator; shards by worker."""

    def __init__(self, ds: TensorDataset, shuffle: bool = True) -> None:
        self.x, self.y = ds.tensors
        self.g, self.shuffle = torch.Generator().manual_seed(7), shuffle
        self.passes: list[list[int]] = []  # the indices each pass yielded (in this process, no workers)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.g) if self.shuffle else torch.arange(len(self.y))
        info = torch.utils.data.get_worker_info()
        if info is not None:
            order = order[info.id::info.num_workers]
        self.passes.append([])
        for i in order.tolist():
            self.passes[-1].append(i)
            yield self.x[i], self.y[i]


def iterable(args) -> None:
    for tag, kw, tkw, records in (
            ("IterableDataset, own shuffle", {}, {}, TRAIN),
            ("IterableDataset, unshuffled, limit_train_batches=3", {"shuffle": False}, {"limit_train_batches": 3},
             torch.utils.data.Subset(TRAIN, range(192))),
            ("IterableDataset, 2 workers (sharded by worker)", {"num_workers": 2}, {}, TRAIN)):
        def go(make_trainer, cb, kw=kw, tkw=tkw):
            kw = dict(kw)
            nw = kw.pop("num_workers", 0)
            tr, m = make_trainer(**tkw), Net()
            tr.fit(m, DataLoader(Stream(TRAIN, **kw), batch_size=64, num_workers=nw),
                   DataLoader(VAL, batch_size=128))
            return m, tr

        def case(tag=tag, go=go, records=records):
            m, cb, _, _ = run_pair(tag, go)
            agree(tag, m, cb, records)
        catch(tag, case)
    shuffled_limited(args)


def shuffled_limited(args) -> None:
    """A stream that reshuffles every pass, cut by ``limit_train_batches``: which records were trained on."""
    tag = "IterableDataset, own shuffle, limit_train_batches=3"
    holder = {}

    def go(make_trainer, cb):
        tr, m = make_trainer(limit_train_batches=3), Net()
        holder["stream"] = stream = Stream(TRAIN)
        tr.fit(m, DataLoader(stream, batch_size=64), DataLoader(VAL, batch_size=128))
        return m, tr

    m, cb, _, _ = run_pair(tag, go)
    passes = [p for p in holder["stream"].passes if p]  # the fit without the callback: the same passes
    trained = sorted({i for p in passes for i in p[:192]})
    print(f"   training passes {len(passes)}; distinct records trained on {len(trained)}; the callback's n "
          f"{cb.report.n if cb.report else None}")
    print("   callback notes/warnings: " + " | ".join(w[:200] for w in (cb.report.warnings if cb.report else [])
                                                        if "limit_train_batches" in w or "iterable" in w))
    g = torch.Generator().manual_seed(7)  # the stream's passes replayed: the copy's next pass is one more
    perms = [torch.randperm(len(TRAIN), generator=g)[:192].tolist() for _ in range(len(passes) + 1)]
    nxt = perms[-1]
    print(f"   the next pass's first 192 records: {len(set(nxt) - set(trained))} never trained on")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, idx in (("the next pass's first 192", nxt), ("the records trained on", trained)):
            r = ml.assess(m, SCHEMES, DataLoader(torch.utils.data.Subset(TRAIN, idx), batch_size=64), per_sample_loss,
                          weight_decay=WD, num_records=NREC)
            print(f"   assess on {name} (n={r.n}): " + ", ".join(f"{s} {r.schemes[s].leakage:.5f}" for s in SCHEMES)
                  + f"; marks {sorted({x.get('indicative', '') for x in r.rows()})}")
    if cb.report:
        print("   callback: " + ", ".join(f"{s} {cb.report.schemes[s].leakage:.5f}" for s in SCHEMES)
              + f"; marks {sorted({r.get('indicative', '') for r in cb.report.rows()})}")
        if args is not None and args.table:
            print(cb.report.table())


# -- fit twice -----------------------------------------------------------------------------------------
def twice(args) -> None:
    tag = "trainer.fit twice on one Trainer (3 then 5 epochs)"
    holder = {}

    def go(make_trainer, cb):
        tr, m = make_trainer(), Net()
        tr.fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
        if cb is not None:
            holder["first"] = (cb.report, list(cb.history), cb.report_path)
        tr.fit_loop.max_epochs = 5
        tr.fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
        return m, tr

    m, cb, _, _ = run_pair(tag, go)
    first, hist, path = holder["first"]
    print(f"   first fit report path {path.name if path else None}, runs {len(hist)}; second: "
          f"{cb.report_path.name if cb.report_path else None}, runs {len(cb.history)}, global_step {m.trainer.global_step}, "
          f"report is the first's: {cb.report is first}")
    agree(tag, m, cb, TRAIN)


# -- overfit_batches ---------------------------------------------------------------------------------
def overfit(args) -> None:
    """``Trainer(overfit_batches=2)``: Lightning trains (and validates) on the first 2 batches, unshuffled."""
    tag = "overfit_batches=2 (a shuffled loader given)"

    def go(make_trainer, cb):
        tr, m = make_trainer(overfit_batches=2), Net()
        tr.fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
        return m, tr

    m, cb, _, _ = run_pair(tag, go)
    agree(tag, m, cb, torch.utils.data.Subset(TRAIN, range(128)))


# -- dict outputs ------------------------------------------------------------------------------------
def dictout(args) -> None:
    import torchmetrics
    tag = "forward returns {'logits', 'features'}; Accuracy through output_transform"
    acc = {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=3)}

    def go(make_trainer, cb):
        tr, m = make_trainer(), Net(dict_out=True)
        tr.fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
        return m, tr

    m, cb, _, _ = run_pair(tag, go, loss_fn=dict_loss,
                           cb_kw={"utility_metrics": acc, "output_transform": dict_logits})
    agree(tag, m, cb, TRAIN, loss_fn=dict_loss,
          metrics={"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=3)},
          output_transform=dict_logits)
    if cb.report is not None:
        print("   acc cb " + ", ".join(f"{s} {cb.report.schemes[s].utility.get('acc', float('nan')):.4f}" for s in SCHEMES))


# -- GRU ---------------------------------------------------------------------------------------------
def make_seqs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 11, (n,), generator=g)
    x = torch.randn(n, 10, 4, generator=g)
    mask = torch.arange(10)[None] < lens[:, None]
    x = x * mask[..., None]
    s = (x[..., 0].sum(1) / lens)
    y = (s > 0).long() + (s > 0.4).long()
    return TensorDataset(x, lens, y)


SEQ_TRAIN, SEQ_VAL = make_seqs(384, 4), make_seqs(128, 5)


def seq_batch(batch):
    x, lens, y = batch
    return (x, lens), y


class GRUNet(pl.LightningModule):
    """GRU(4 -> 8) over records of 3-10 steps, its last valid step -> Linear(8, 3); ``packed``: through
    ``pack_padded_sequence`` (the usual idiom), else on the padded batch, the last valid step gathered."""

    def __init__(self, packed: bool = True) -> None:
        super().__init__()
        self.weight_decay, self.packed = WD, packed
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, inputs):
        x, lens = inputs
        if self.packed:
            packed = nn.utils.rnn.pack_padded_sequence(x, lens.cpu(), batch_first=True, enforce_sorted=False)
            _, h = self.rnn(packed)
            return self.head(h[-1])
        out, _ = self.rnn(x)
        return self.head(out[torch.arange(len(lens)), lens - 1])

    def training_step(self, batch, batch_idx):
        inputs, y = seq_batch(batch)
        return per_sample_loss(self(inputs), y).mean()

    def validation_step(self, batch, batch_idx):
        inputs, y = seq_batch(batch)
        self.log("val_loss", per_sample_loss(self(inputs), y).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-2, weight_decay=WD)


def gru(args) -> None:
    def default_params():
        pl.seed_everything(0, verbose=False)
        with tempfile.TemporaryDirectory() as d:
            cb = MISCallback(SCHEMES, loss_fn=per_sample_loss, batch_fn=seq_batch, num_records=NREC)
            m = GRUNet()
            tr = trainer(d, cb)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tr.fit(m, DataLoader(SEQ_TRAIN, batch_size=32, shuffle=True), DataLoader(SEQ_VAL, batch_size=64))
            print(f"[GRU, every weight assessed] ran: global_step {tr.global_step}; report "
                  f"{cb.report is not None}; last_error {str(cb.last_error)[:300]}")
    catch("GRU, every weight assessed", default_params)
    head = {"batch_fn": seq_batch, "params": ["head.weight", "head.bias"]}
    for packed in (True, False):
        tag = f"GRU {'over packed sequences' if packed else 'on the padded batch, last valid step'}, params=head"

        def go(make_trainer, cb, packed=packed):
            tr, m = make_trainer(), GRUNet(packed)
            tr.fit(m, DataLoader(SEQ_TRAIN, batch_size=32, shuffle=True), DataLoader(SEQ_VAL, batch_size=64))
            return m, tr

        def case(tag=tag, go=go):
            m, cb, _, _ = run_pair(tag, go, cb_kw=head)
            with torch.no_grad():  # the two forwards agree on the trained weights
                x, lens, _ = SEQ_VAL.tensors
                m.packed = not m.packed
                other = m((x, lens))
                m.packed = not m.packed
                print(f"   packed vs padded forward on these weights: max |diff| {(m((x, lens)) - other).abs().max():.1e}")
            agree(tag, m, cb, SEQ_TRAIN, batch_size=32, val=DataLoader(SEQ_VAL, batch_size=64), **head)
        catch(tag, case)


# -- compile -------------------------------------------------------------------------------------------
class CompiledForward(Net):
    @torch.compile(backend="aot_eager")
    def forward(self, x):
        return super().forward(x)


def compiled(args) -> None:
    def inplace(make_trainer, cb):
        tr, m = make_trainer(), Net()
        m.compile(backend="aot_eager")
        tr.fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
        return m, tr

    def method(make_trainer, cb):
        tr, m = make_trainer(), CompiledForward()
        tr.fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
        return m, tr

    for tag, go in (("nn.Module.compile() in place (aot_eager)", inplace),
                    ("@torch.compile on forward (aot_eager)", method)):
        def case(tag=tag, go=go):
            m, cb, _, _ = run_pair(tag, go)
            agree(tag, m, cb, TRAIN)
        catch(tag, case)


# -- the weights cast: bf16-true / 64-true -----------------------------------------------------------
def truecast(args) -> None:
    for prec in ("bf16-true", "64-true"):
        tag = f"precision={prec!r}"

        def go(make_trainer, cb, prec=prec):
            tr, m = make_trainer(precision=prec), Net()
            tr.fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
            return m, tr

        def case(tag=tag, go=go, prec=prec):
            m, cb, _, _ = run_pair(tag, go)
            dt = next(m.parameters()).dtype
            print(f"   weights after fit: {dt}")
            # assess on the weights as trained, the records cast as the precision plugin casts them
            x, y = TRAIN.tensors
            agree(tag, m, cb, TensorDataset(x.to(dt), y),
                  val=DataLoader(TensorDataset(VAL.tensors[0].to(dt), VAL.tensors[1]), batch_size=128))
        catch(tag, case)


# -- train-mode hooks ------------------------------------------------------------------------------------
def trainmode(args) -> None:
    for tag, kw in (("Dropout(0.3) kept on in validation by on_validation_model_eval (MC dropout)",
                     {"dropout": 0.3, "mc_val": True}),
                    ("BatchNorm1d frozen (eval) in training by on_train_epoch_start", {"batchnorm": True, "freeze_bn": True}),
                    ("BatchNorm1d + Dropout(0.3) in train mode while training", {"batchnorm": True, "dropout": 0.3})):
        def go(make_trainer, cb, kw=kw):
            tr, m = make_trainer(), Net(**kw)
            tr.fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
            return m, tr

        def case(tag=tag, go=go):
            m, cb, _, _ = run_pair(tag, go)
            flags = {n: mod.training for n, mod in m.named_modules() if isinstance(mod, (nn.Dropout, nn.BatchNorm1d))}
            print(f"   training flags after fit: {flags}")
            agree(tag, m, cb, TRAIN)
        catch(tag, case)


CASES = {"datamodule": datamodule, "iterable": iterable, "twice": twice, "overfit": overfit, "dictout": dictout, "gru": gru,
         "compile": compiled, "truecast": truecast, "trainmode": trainmode}


def main(cases: dict | None = None, doc: str | None = None) -> None:
    """Run the case named on the command line (or all) of ``cases`` (this trial's by default; a later
    trial passes its own and its docstring)."""
    cases = CASES if cases is None else cases
    ap = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=[*cases, "all"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="print the callback's table where a case says so")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "mis_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.perf_counter()
    for name, fn in cases.items():
        if args.case in (name, "all"):
            fn(args)
    print(f"total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
