"""The estimation pass against an Adam epoch of the same model, both measured in one process
at the same machine load (issue 13's Done-when: "the estimation pass at most 2 epochs";
docs/benchmarks.md, "es33").

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt      # once: the model and its data
    python benchmarks/estimation_epochs.py /tmp/m1e7.pt [--rounds 3] [--json /tmp/e.json]

Each round runs the default "assess" ``run_estimation`` on the saved model (round 1 is the
process's first call, as a user's), then one Adam epoch (lr 1e-3, batch 256, the loss of
first_call.py's ``train``) on a copy of it, each timed in CPU seconds (``time.process_time``,
one thread): the ratio within a round is free of the load that other processes put on the
machine, which moves both. The line per round gives the estimation, the epoch, their ratio and
the estimation's system time and page faults (``getrusage``: fresh memory mapped and zeroed by
the kernel, a cost that grows with the machine's load). Run with
``nice -n 10 env OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1`` on a shared machine. To compare two
checkouts, run it alternately from each (``cd CHECKOUT && PYTHONPATH=$PWD python
PATH/TO/estimation_epochs.py ...``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first (PYTHONPATH=$PWD does the same)
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _epoch(model, loader, loss_fn) -> float:
    import torch

    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    c0 = time.process_time()
    for xb, yb in loader:
        opt.zero_grad()
        loss_fn(m(xb), yb).mean().backward()
        opt.step()
    return time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the rounds' figures here")
    args = ap.parse_args(argv)

    from benchmarks.first_call import load_saved
    from mis_lightning.assess import run_estimation

    saved, model, loader, loss_fn, est_cfg, _ = load_saved(args.path)
    rows = []
    for r in range(args.rounds):
        u0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = time.process_time()
        run_estimation(model, loader, loss_fn, est_cfg)
        e = time.process_time() - c0
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        ep = _epoch(model, loader, loss_fn)
        row = {"round": r + 1, "estimation_s": e, "epoch_s": ep, "epochs": e / ep,
               "estimation_sys_s": u1.ru_stime - u0.ru_stime, "estimation_page_faults": u1.ru_minflt - u0.ru_minflt,
               "load": os.getloadavg()[0]}
        rows.append(row)
        print(f"size {saved['size']} round {r + 1}: estimation {e:.2f} s (sys {row['estimation_sys_s']:.2f} s, "
              f"{row['estimation_page_faults']} page faults); epoch {ep:.2f} s; estimation = {e / ep:.2f} epochs; "
              f"load {row['load']:.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": saved["size"], "rounds": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
