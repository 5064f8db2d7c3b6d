"""The estimation pass with loader batches merged (``estimation/batching.py``) against the
same pass batch by batch, alternated in one process on the benchmark Transformer of
``beyond_linear.py`` (n = 4096, loader batches of 64, 3 training epochs first).

    python benchmarks/merged_batches.py --threads 1
    python benchmarks/merged_batches.py --threads 2 --model cnn

Prints the training epoch (wall, CPU) and per round the estimation pass's (wall, CPU) seconds
for "unmerged" (``_records_per_update`` patched to 1) and "merged" (the default).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT)), sys.path.insert(0, str(ROOT.parent))

import beyond_linear as BL  # noqa: E402

from mis_lightning.assess import run_estimation  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402

E = importlib.import_module("mis_lightning.estimation.estimate")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="transformer", choices=["transformer", "cnn"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, ds, _, ce = BL.build(args.model, 4096)
    loader = DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        BL.epoch(model, loader, ce, opt)
    print("epoch (wall, cpu)", [tuple(round(v, 3) for v in BL.timed(BL.epoch, model, loader, ce, opt)[1:])
                                for _ in range(2)])
    model.eval()
    plain = DataLoader(ds, batch_size=64)
    run_estimation(model, DataLoader(Subset(ds, range(128)), batch_size=64), ce, EstimationConfig())
    orig, res = E._records_per_update, {}
    try:
        for _ in range(args.rounds):
            for merge in (False, True):
                E._records_per_update = orig if merge else (lambda fac, b, *_: 1)
                _, wall, cpu = BL.timed(run_estimation, model, plain, ce, EstimationConfig())
                res.setdefault("merged" if merge else "unmerged", []).append((round(wall, 2), round(cpu, 2)))
    finally:
        E._records_per_update = orig
    for k, v in res.items():
        print(k, v)


if __name__ == "__main__":
    main()
