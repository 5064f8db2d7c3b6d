"""The Lightning ddp_spawn test's callback (tests/test_ddp.py), in its own module: ddp_spawn
pickles it to the ranks, so it lives at a module's top level, and tests/test_ddp.py imports
pytorch_lightning only inside that test. The metric world's two spawned ranks import
tests/test_ddp.py to unpickle their workload: without pytorch_lightning at its top level each
rank's start is shorter: torch and the library ~4.2 CPU s, pytorch_lightning 1.9-2.2 s more
(measured in fresh processes)."""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import pytorch_lightning as pl
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
