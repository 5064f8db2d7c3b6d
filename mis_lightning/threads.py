"""Threads of the library's own parallel regions (issue 13, "OpenMP wait policy").

torch's CPU kernels run in OpenMP (libgomp) parallel regions. libgomp reads its wait policy
(``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) once, when torch is imported, and torch offers no call
to change it later: setting ``os.environ["OMP_WAIT_POLICY"]`` after ``import torch`` changed
nothing (measured, docs/benchmarks.md). With the default (active: idle threads spin), a
region whose threads share cores with other busy processes waits for descheduled spinners:
the scoring's memory-bound elementwise kernels ran 2-10x slower on 2 threads than on 1 on a
loaded 2-core machine, and 2.8x faster than 1 thread with ``OMP_WAIT_POLICY=PASSIVE``.

So the scoring pass, each scheme's finishing forms (Monte Carlo, box means) and the estimation
pass (each ``MomentAccumulator.update`` and its ``finalize``: every front end's) run on one
thread when the machine is oversubscribed (1-minute load
average above the number of cores) and the process was not started with a passive wait
policy; the caller's thread count is restored afterwards. To use every core on a busy
machine, start the process with ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
_told = False  # whether the one-thread decision was logged in this process


def _passive_wait() -> bool:
    return os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"


def _oversubscribed() -> bool:
    """Whether more threads are runnable than there are cores (1-minute load average)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return False
    return load > (os.cpu_count() or 1) + 0.5


@contextlib.contextmanager
def scoring_threads() -> Iterator[int]:
    """Run the enclosed block with the thread count the module docstring explains; yields it.

    The caller's ``torch.get_num_threads()`` is restored on exit (also on an exception).
    """
    global _told
    n = torch.get_num_threads()
    if n > 1 and not _passive_wait() and _oversubscribed():
        if not _told:  # once a process: the estimation pass enters this once a batch
            _told = True
            log.info("machine oversubscribed and OMP_WAIT_POLICY is not PASSIVE: the assessment runs on 1 "
                     "thread instead of %d (spinning OpenMP threads slow down on shared cores)", n)
        torch.set_num_threads(1)
        try:
            yield 1
        finally:
            torch.set_num_threads(n)
    else:
        yield n
