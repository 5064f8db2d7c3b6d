"""``MISCallback`` under three conditions nu57 left (docs/benchmarks.md, "nu58"): a reshuffling stream
trained for one epoch under ``limit_train_batches``; a stream whose training batches a batch-transfer
hook augments at random; Monte Carlo dropout at validation. Each prints what the callback reports
beside ``mis_lightning.assess`` on the records that were (or were not) trained on.

    python benchmarks/nu58_trial.py oneepoch    # reshuffling stream, max_epochs=1, limit_train_batches=3
    python benchmarks/nu58_trial.py workers     # unshuffled stream sharded over 2 workers, limit_train_batches=3
    python benchmarks/nu58_trial.py augment     # unshuffled / reshuffling stream, a hook adding noise in training
    python benchmarks/nu58_trial.py mcdropout   # Dropout kept on in validation: which model's utility is reported
    python benchmarks/nu58_trial.py all

Runtime: under a minute per case at load 9 on 2 shared cores (1 thread).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

import mis_lightning as ml
from mis_lightning import MISCallback
from mis_lightning.evaluation import evaluate_utility

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nu57_trial  # noqa: E402
from nu43_trial import per_sample_loss  # noqa: E402
from nu57_trial import NREC, SCHEMES, TRAIN, VAL, WD, Net, Stream  # noqa: E402


def _fit(model, train, cb, seed=0, **kw):
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opts = dict(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", deterministic=True, default_root_dir=d, num_sanity_val_steps=0,
                    enable_checkpointing=False)
        opts.update(kw)
        pl.seed_everything(seed, verbose=False)
        pl.Trainer(callbacks=[cb], **opts).fit(model, train, DataLoader(VAL, batch_size=128))
    return [str(w.message) for w in caught]


def _figures(rep) -> str:
    marks = {r["scheme"]: r.get("indicative", "") for r in rep.rows()}
    return ", ".join(f"{s} {rep.schemes[s].leakage:.5f}{'*' if marks.get(s) else ''}" for s in SCHEMES)


def _assess(model, idx) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ml.assess(model, SCHEMES, DataLoader(Subset(TRAIN, idx), batch_size=64), per_sample_loss,
                      weight_decay=WD, num_records=NREC)
    return f"n={r.n}: {_figures(r)}"


def _stream_lines(rep) -> None:
    for w in rep.warnings:
        if "stream" in w or "limit_train_batches" in w or "hook" in w:
            print(f"   warning: {w[:330]}")


def oneepoch(args) -> None:
    """One epoch of 3 batches of 64 from a stream reshuffled each pass (its own generator), 3 seeds."""
    for seed in range(3):
        pl.seed_everything(seed, verbose=False)
        stream, m = Stream(TRAIN), Net()
        cb = MISCallback(SCHEMES, loss_fn=per_sample_loss, num_records=NREC)
        _fit(m, DataLoader(stream, batch_size=64), cb, seed=seed, limit_train_batches=3)
        trained = [i for p in stream.passes if p for i in p[:192]]
        g = torch.Generator().manual_seed(7)  # the stream's own generator replayed: the copy reads pass 2
        nxt = [torch.randperm(len(TRAIN), generator=g)[:192].tolist() for _ in range(2)][-1]
        print(f"[oneepoch, seed {seed}] training passes {len([p for p in stream.passes if p])}; records trained on "
              f"{len(trained)}; the next pass's first 192: {len(set(nxt) - set(trained))} never trained on")
        print(f"   callback (n={cb.report.n}): {_figures(cb.report)}")
        print(f"   assess on the next pass's first 192 {_assess(m, nxt)}")
        print(f"   assess on the records trained on    {_assess(m, trained)}")
        _stream_lines(cb.report)


def workers(args) -> None:
    """An unshuffled stream sharded over 2 workers (``Stream``: ``order[id::2]``), one epoch of 3 batches
    of 64: worker 0 yields batches 1 and 3, worker 1 batch 2, so the training read records 0-127 and the
    even ones 128-254, while the copy, read in one process, yields records 0-191."""
    pl.seed_everything(0, verbose=False)
    m = Net()
    cb = MISCallback(SCHEMES, loss_fn=per_sample_loss, num_records=NREC)
    _fit(m, DataLoader(Stream(TRAIN, shuffle=False), batch_size=64, num_workers=2), cb, limit_train_batches=3)
    trained, copy = list(range(128)) + list(range(128, 256, 2)), list(range(192))
    print(f"[workers] records trained on {len(trained)}; assessed {len(copy)}, {len(set(copy) - set(trained))} "
          f"never trained on; callback (n={cb.report.n}): {_figures(cb.report)}")
    print(f"   assess on the copy's first 192      {_assess(m, copy)}")
    print(f"   assess on the records trained on    {_assess(m, trained)}")
    _stream_lines(cb.report)


class Noisy(Net):
    """Gaussian noise on the inputs in a batch-transfer hook, in training only (Lightning's pattern)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x + 0.3 * torch.randn_like(x), y) if self.trainer.training else (x, y)


def augment(args) -> None:
    """A stream, unshuffled or reshuffled, its batches augmented in a hook; 3 epochs of 3 batches."""
    for shuffle in (False, True):
        pl.seed_everything(0, verbose=False)
        stream, m = Stream(TRAIN, shuffle=shuffle), Noisy()
        cb = MISCallback(SCHEMES, loss_fn=per_sample_loss, num_records=NREC)
        _fit(m, DataLoader(stream, batch_size=64), cb, limit_train_batches=3, max_epochs=3)
        passes = [p[:192] for p in stream.passes if p]
        trained = sorted({i for p in passes for i in p})
        print(f"[augment, {'reshuffled' if shuffle else 'unshuffled'}] records trained on {len(trained)}; "
              f"callback (n={cb.report.n}): {_figures(cb.report)}")
        print(f"   assess on the records trained on (clean) {_assess(m, trained)}")
        _stream_lines(cb.report)


def mcdropout(args) -> None:
    """Dropout(0.3) kept on in validation by on_validation_model_eval: the user's val_loss is an
    MC-dropout average; the callback's utility is the eval-mode (deterministic) model's."""
    pl.seed_everything(0, verbose=False)
    m = Net(dropout=0.3, mc_val=True)
    cb = MISCallback(["none", "rtn_int8"], loss_fn=per_sample_loss, num_records=NREC)
    _fit(m, DataLoader(TRAIN, batch_size=64, shuffle=True), cb, max_epochs=3)
    val = DataLoader(VAL, batch_size=128)
    m.eval()
    det = evaluate_utility(m, val, per_sample_loss)["loss"]
    m.on_validation_model_eval()  # the user's validation mode: dropout on (evaluate_utility would set eval)
    torch.manual_seed(0)
    with torch.no_grad():
        mc = [float(torch.cat([per_sample_loss(m(x), y) for x, y in val]).mean()) for _ in range(20)]
        avg = float(torch.cat([per_sample_loss(torch.stack([m(x).softmax(-1) for _ in range(20)]).mean(0).log(), y)
                               for x, y in val]).mean())  # the MC-dropout predictive (20 draws averaged)
    m.eval()
    print(f"[mcdropout] callback utility loss: none {cb.report.schemes['none'].utility['loss']:.5f}, rtn_int8 "
          f"{cb.report.schemes['rtn_int8'].utility['loss']:.5f}; eval-mode model {det:.5f}; dropout on (the "
          f"user's validation), 20 draws: mean {sum(mc) / len(mc):.5f}, range {min(mc):.5f} to {max(mc):.5f}; the 20-draw averaged "
          f"predictive's {avg:.5f}")
    for w in cb.report.warnings:
        if "dropout" in w.lower() or "eval mode" in w:
            print(f"   warning: {w[:400]}")


CASES = {"oneepoch": oneepoch, "workers": workers, "augment": augment, "mcdropout": mcdropout}


def main() -> None:
    nu57_trial.main(CASES, __doc__)


if __name__ == "__main__":
    main()
