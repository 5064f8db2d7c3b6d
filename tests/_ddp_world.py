"""The callbacks of tests/test_ddp.py's one ddp_spawn world, in their own module: ddp_spawn
pickles them to the ranks, so they live at a module's top level (tests/test_ddp.py imports
pytorch_lightning only inside ``run_world``)."""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist


def _destroy_world(mark: str) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        Path(mark).write_text("destroyed")


class DestroyWorldAtExit(pl.Callback):
    """Destroys each spawned rank's gloo world (``destroy_process_group``) when the rank's
    interpreter exits, and marks it in ``<marks>/rank<k>`` (ux31).

    Lightning (2.6) registers that at-exit destruction for NCCL only
    (``lightning_fabric.utilities.distributed._init_dist_connection``); a gloo world is left to
    the interpreter's finalization, which tears its C++ objects down in no set order. Under load
    that killed rank 1 once in a full-suite run, after ``Trainer.fit`` had returned: SIGABRT,
    "terminate called without an active exception" (a thread object destroyed unjoined; the
    same message upstream for a gloo world not destroyed before a spawned process exits:
    pytorch/pytorch#190489). The library opens no process group and no thread, and its
    collectives (the estimation's ``all_gather_object``, the utility's ``strategy.broadcast``)
    complete before the hook returns; the world is the Trainer's, so its user ends it."""

    def __init__(self, marks: Path) -> None:
        self.marks = str(marks)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        atexit.register(_destroy_world, os.path.join(self.marks, f"rank{trainer.global_rank}"))


class MetricWorkloads(pl.Callback):
    """tests/test_ddp.py's metric checks, run in each rank of the Lightning world (ts37: one
    spawned world for the module instead of two).

    The self-assessing ``owner`` (with its data ``X``, ``y``) travels to the ranks as ddp_spawn
    sends a module: pickled with the Trainer by torch.multiprocessing (tensors into shared
    memory). Each rank updates and computes it when it is unpickled there (``__setstate__``),
    before Lightning opens the process group, so the compute reads that rank's states alone;
    ``setup`` (the rank now known) writes them to ``<out>/owner_rank{k}.pt``. After the fit, in
    the open world, ``on_fit_end`` runs ``test_ddp.metric_workloads`` (collective computes: every
    rank calls it, in the same order)."""

    def __init__(self, out: Path, owner: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
        self.out, self.owner, self.X, self.y = str(out), owner, X, y
        self.owner_result: dict | None = None
        self.parent_pid = os.getpid()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.parent_pid:  # in a spawned rank (multiprocessing.parent_process() is still None there)
            assert not (dist.is_available() and dist.is_initialized())
            torch.set_num_threads(1)
            self.owner.mis.update(self.X, self.y)
            self.owner_result = {"n": int(self.owner.mis.s_n),
                                 "leakage": float(self.owner.mis.compute()["rtn_int4"]["leakage"])}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.owner_result is not None:
            torch.save(self.owner_result, os.path.join(self.out, f"owner_rank{trainer.global_rank}.pt"))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import test_ddp

        test_ddp.metric_workloads(trainer.global_rank, self.out)


class RankStream(torch.utils.data.IterableDataset):
    """A stream of 48 records per process (process ``k`` of 2 yields records ``k, k + 2, ...`` of 96):
    process 0's in the same order at every pass, process 1's reshuffled at every pass from its own
    generator (tests/test_ddp.py's world of conditions seen on one process only)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.X = torch.randn(96, 4, generator=g)
        self.y = self.X[:, 0] + 0.1 * torch.randn(96, generator=g)
        self.passes = 0  # (a generator held by the dataset does not cross ddp_spawn here: the pass count seeds)

    def __iter__(self):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        X, y = self.X[rank::2], self.y[rank::2]
        self.passes += 1
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(self.passes)) if rank == 1 \
            else torch.arange(len(X))
        return iter(zip(X[order], y[order]))


class RankScaledLoss(pl.LightningModule):
    """A small regressor whose ``training_step`` returns a twentieth of its loss on process 1 only: there the
    loss the assessment computes is about 10 times training's (the assessed objective ``0.5 (o - y)^2`` over
    training's ``(o - y)^2 / 20``), on process 0 half of it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).mean() / (20.0 if self.global_rank == 1 else 1.0)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", ((self(x) - y) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ReportsOut(pl.Callback):
    """Writes each process's MISCallback report (its marked conditions, warnings and rows' marks) to
    ``<out>/report_rank{k}.json`` at the end of fit, after the MISCallback's own ``on_fit_end`` (placed
    after it in the Trainer's callbacks)."""

    KEYS = ("loss_mismatch", "stream_records_differ", "not_trained", "records_from_training_loader")

    def __init__(self, out: Path) -> None:
        self.out = str(out)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        cb = next(c for c in trainer.callbacks if type(c).__name__ == "MISCallback")
        rep = cb.report
        Path(self.out, f"report_rank{trainer.global_rank}.json").write_text(json.dumps({
            "diagnostics": {k: rep.diagnostics.get(k) for k in self.KEYS}, "warnings": rep.warnings,
            "marks": [r.get("indicative", "") for r in rep.rows() if not r.get("error")], "n": rep.n}))
