"""Stress: tests/test_ddp.py's one ddp_spawn world (``run_world``, the Lightning fit with the
metric workloads) and test_callback_under_ddp_spawn_writes_one_report's checks, repeated under CPU load.

The test failed once in a loaded full-suite run: rank 1 died with SIGABRT ("terminate called
without an active exception") after ``Trainer.fit`` returned, at the gloo process group's
teardown. This script runs the test's body ``--runs`` times in one process while ``--burners``
busy-loop processes load the cores, and counts the runs that failed and how.

    python benchmarks/ddp_teardown_stress.py --runs 20 --burners 4

Prints one line per run and a final ``failed k / runs`` line.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _burn(stop, parent: int) -> None:
    x = 0
    while not stop.is_set() and os.getppid() == parent:  # also ends when the parent was killed
        for i in range(100_000):
            x += i * i


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--burners", type=int, default=4)
    args = ap.parse_args()
    import test_ddp  # the test's own body, unchanged

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    burners = [ctx.Process(target=_burn, args=(stop, os.getpid()), daemon=True) for _ in range(args.burners)]
    for p in burners:
        p.start()
    failed = []
    try:
        for k in range(args.runs):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    world = test_ddp.run_world(Path(tmp), *test_ddp.make_owner_and_data())
                    test_ddp.test_callback_under_ddp_spawn_writes_one_report(world)
                    status = "ok"
                except BaseException as exc:  # noqa: BLE001 - counted, not re-raised
                    status = f"FAILED {type(exc).__name__}: {exc}"
                    failed.append(k)
                    traceback.print_exc()
            print(f"run {k}: {status} ({time.perf_counter() - t0:.1f} s wall, load {os.getloadavg()[0]:.1f})",
                  flush=True)
    finally:
        stop.set()
        for p in burners:
            p.join(5)
    print(f"failed {len(failed)} / {args.runs} (runs {failed}) with {args.burners} burners", flush=True)


if __name__ == "__main__":
    main()
