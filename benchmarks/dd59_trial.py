"""``MISCallback``'s stream check on the streams nu58 / rv58a left (docs/benchmarks.md, "dd59"): a reshuffling
stream that cannot be copied trained one epoch under ``limit_train_batches``; a stream whose passes begin with
the same batch and reshuffle after it; and, beside them, a shuffled map-style loader cut the same way. Each
prints what the callback reports (figures, ``*``) beside ``mis_lightning.assess`` on the records trained on and
on those the callback read; ``cost`` times the digest of one batch the check adds per training batch.

    python benchmarks/dd59_trial.py uncopyable  # reshuffling stream holding a lock, max_epochs=1, limit_train_batches=3
    python benchmarks/dd59_trial.py late        # passes begin with records 0-63 in order, the rest reshuffled
    python benchmarks/dd59_trial.py shuffled    # DataLoader(shuffle=True) over the 512 records, limit_train_batches=3
    python benchmarks/dd59_trial.py cost        # batch_digests of a [64, 20] and a [64, 3, 224, 224] batch
    python benchmarks/dd59_trial.py all

Runtime: under a minute per case at load 10 on 2 shared cores (1 thread).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mis_lightning import MISCallback
from mis_lightning._lightning_support import batch_digests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nu57_trial  # noqa: E402
from nu43_trial import per_sample_loss  # noqa: E402
from nu57_trial import NREC, SCHEMES, TRAIN, VAL, Net, Stream  # noqa: E402
from nu58_trial import _assess, _figures, _fit, _stream_lines  # noqa: E402


class Locked(Stream):
    """``Stream`` holding a lock: it cannot be deep-copied, so the callback reads the stream itself."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()


class LateShuffle(Stream):
    """Every pass yields records 0-63 in order, then the other 448 reshuffled by the stream's own generator."""

    def __iter__(self):
        order = torch.cat([torch.arange(64), 64 + torch.randperm(len(self.y) - 64, generator=self.g)])
        self.passes.append(order.tolist())
        return iter([(self.x[i], self.y[i]) for i in order.tolist()])


def _marked(rep) -> str:
    """How many rows carry the stream check's mark."""
    rows = [r for r in rep.rows() if not r.get("error")]
    k = sum("records assessed not those trained on" in r.get("indicative", "") for r in rows)
    return f"'records assessed not those trained on' on {k} of {len(rows)} rows"


def _stream_case(tag: str, make) -> None:
    for seed in range(3):
        pl.seed_everything(seed, verbose=False)
        stream, m = make(), Net()
        cb = MISCallback(SCHEMES, loss_fn=per_sample_loss, num_records=NREC)
        _fit(m, DataLoader(stream, batch_size=64), cb, seed=seed, limit_train_batches=3)
        trained, read = stream.passes[0][:192], stream.passes[-1][:192]  # the training's pass, the one assessed
        if len(stream.passes) == 1:  # a copy was read: replay the stream's generator for its next pass
            twin = make()
            iter(twin), iter(twin)
            read = twin.passes[-1][:192]
        print(f"[{tag}, seed {seed}] passes of the stream itself {len(stream.passes)}; trained on {len(trained)}; "
              f"the pass assessed: {len(set(read) - set(trained))} of 192 never trained on")
        print(f"   callback (n={cb.report.n}): {_figures(cb.report)}; {_marked(cb.report)}")
        print(f"   assess on the pass assessed         {_assess(m, read)}")
        print(f"   assess on the records trained on    {_assess(m, trained)}")
        _stream_lines(cb.report)


def uncopyable(args) -> None:
    """One epoch of 3 batches of 64 from a reshuffling stream that cannot be copied (3 seeds)."""
    _stream_case("uncopyable", lambda: Locked(TRAIN))


def late(args) -> None:
    """One epoch of 3 batches of 64 from a stream whose passes begin with the same batch (3 seeds)."""
    _stream_case("late", lambda: LateShuffle(TRAIN))


class Seen(pl.Callback):
    """The records of each training batch, by their inputs' rows (TRAIN's are distinct)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.index = {tuple(r.tolist()): i for i, r in enumerate(TRAIN.tensors[0])}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows += [self.index[tuple(r.tolist())] for r in batch[0]]


def shuffled(args) -> None:
    """DataLoader(shuffle=True) over 512 records, one epoch of 3 batches of 64 (3 seeds): the callback assesses
    every record the loader can draw, with a note."""
    for seed in range(3):
        pl.seed_everything(seed, verbose=False)
        m, seen = Net(), Seen()
        cb = MISCallback(SCHEMES, loss_fn=per_sample_loss, num_records=NREC)
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(callbacks=[cb, seen], max_epochs=1, limit_train_batches=3, logger=False, accelerator="cpu",
                       enable_progress_bar=False, enable_model_summary=False, deterministic=True, default_root_dir=d,
                       num_sanity_val_steps=0, enable_checkpointing=False).fit(
                m, DataLoader(TRAIN, batch_size=64, shuffle=True), DataLoader(VAL, batch_size=128))
        print(f"[shuffled, seed {seed}] trained on {len(set(seen.rows))} of 512; callback (n={cb.report.n}): "
              f"{_figures(cb.report)}; {_marked(cb.report)}")
        print(f"   assess on the records trained on    {_assess(m, sorted(set(seen.rows)))}")
        _stream_lines(cb.report)


def cost(args) -> None:
    """The stream check's one hashing per training batch recorded (``batch_digests``: bytes on the host)."""
    torch.set_num_threads(1)
    for shape in ((64, 20), (64, 3, 224, 224)):
        batch = (torch.randn(*shape), torch.randint(0, 10, (shape[0],)))
        batch_digests(batch)
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:
            batch_digests(batch)
            k += 1
        mb = sum(t.numel() * t.element_size() for t in batch) / 2**20
        print(f"[cost] batch {list(shape)} ({mb:.2f} MiB): {(time.perf_counter() - t0) / k * 1e3:.3f} ms per digest")


CASES = {"uncopyable": uncopyable, "late": late, "shuffled": shuffled, "cost": cost}


def main() -> None:
    nu57_trial.main(CASES, __doc__)


if __name__ == "__main__":
    main()
