"""The estimation pass and the scoring pass on 1 and 2 torch threads, alternating (docs/benchmarks.md,
"nux56"; README, "The Lightning callback": the assessment drops to one thread on a busy machine).

    python benchmarks/estimation_threads.py [--rounds 2]

Model: benchmarks/newcomer_callback.py's MLP (20 -> 32 -> 3, d = 771) after 5 Adam epochs on 2,000
synthetic records (a plain loop, no Lightning); ``run_estimation`` then ``score_schemes`` with
int8_weight_only and intx_weight_only_int4, each timed (wall and CPU seconds) at 1, 2, 1, 2, ...
threads, with the 1-minute load. Start it without ``OMP_NUM_THREADS`` and without
``OMP_WAIT_POLICY=PASSIVE``, as a user's script starts: both passes drop to one thread by themselves
on an oversubscribed machine (mis_lightning/threads.py; the estimation pass since lead56), so the "threads 2" rows
read the one-thread rule there.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.assess import run_estimation, score_schemes


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2000, 20)
    y = (x @ torch.randn(20, 3) + 0.5 * torch.randn(2000, 3)).argmax(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(5):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True):
            opt.zero_grad()
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    cfg = ml.EstimationConfig(weight_decay=1e-3)
    for nt in (1, 2) * args.rounds:
        torch.set_num_threads(nt)
        t0, c0 = time.perf_counter(), time.process_time()
        est = run_estimation(model, train, loss_fn, cfg)
        t1, c1 = time.perf_counter(), time.process_time()
        score_schemes(est, model, ["int8_weight_only", "intx_weight_only_int4"])
        t2, c2 = time.perf_counter(), time.process_time()
        print(f"threads {nt}: estimation {t1 - t0:.1f} s wall {c1 - c0:.1f} s CPU; scoring {t2 - t1:.1f} s wall "
              f"{c2 - c1:.1f} s CPU; load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
