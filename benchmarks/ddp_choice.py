"""Two gloo CPU processes whose first batches make "auto"'s Gauss-Newton choice apart (ddp56).

A 2,005-weight linear model with 5 outputs (``"auto"``: the diagonal sandwich, the per-layer program's
Gauss-Newton diagonal, ``ggn_mode="auto"``) on 90 records under a masked least squares: records 0-59
label outputs 0-1 (2 loss directions), records 60-89 all 5. Rank 0 reads records 0-59 in batches of
30 (2 directions: the exact Gauss-Newton diagonal), rank 1 records 60-89 (5 > 3: sampled labels);
``--empty``: rank 1 reads none. ``--agree``: every rank runs ``world_choice.agree`` after its pass (as
``MISCallback`` does). Prints one process's figures (all 90 records in one batch; and in batches of 30
from record 0) and each rank's ``[rtn_int4 leakage, n, estimator, per-sample program]`` (or its error).

    PYTHONPATH=$PWD python benchmarks/ddp_choice.py [--agree] [--empty]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mis_lightning import MISIndicator


def data() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 400, generator=g, dtype=torch.float64)
    T = torch.randn(90, 5, generator=g, dtype=torch.float64)
    mask = torch.zeros(90, 5, dtype=torch.float64)
    mask[:, :2], mask[60:] = 1, 1
    torch.manual_seed(0)
    return X, torch.cat([T, mask], 1), nn.Linear(400, 5).double()


def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (t[:, 5:] * (o - t[:, :5]) ** 2).sum(1)


def run(idx: torch.Tensor, bs: int, agree: bool = False) -> list:
    X, Y, model = data()

    def new() -> MISIndicator:
        return MISIndicator(model, loss, ["rtn_int4"], uncertainty_draws=0, weight_decay=1e-2, num_training_records=90)

    def read(met: MISIndicator) -> None:
        for a in range(0, len(idx), bs):
            met.update(X[idx[a:a + bs]], Y[idx[a:a + bs]])

    box = [new()]
    read(box[0])
    if agree:
        from mis_lightning.estimation import world_choice as W

        def reread(choice: dict) -> None:
            box[0] = new()
            W.force(box[0].accumulator, choice)
            read(box[0])

        W.agree(box[0].accumulator, len(idx) > 0, W.gather_objects, reread)
    out = box[0].compute()
    acc = box[0].accumulator
    return [float(out["rtn_int4"]["leakage"]), box[0].report.n, acc.estimator, type(acc.factored).__name__]


def worker(rank: int, path: str, agree: bool, empty: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    idx = torch.arange(0, 60) if rank == 0 else torch.arange(60, 60 if empty else 90)
    try:
        res = run(idx, 30, agree)
    except Exception as exc:  # noqa: BLE001 - printed by the parent
        res = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(path, f"r{rank}.json"), "w") as fh:
        json.dump(res, fh)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agree", action="store_true")
    ap.add_argument("--empty", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("one process, one batch:", run(torch.arange(90), 90))
    print("one process, batches of 30:", run(torch.arange(90), 30))
    with tempfile.TemporaryDirectory() as path:
        mp.spawn(worker, args=(path, args.agree, args.empty), nprocs=2, join=True)
        for r in range(2):
            with open(os.path.join(path, f"r{r}.json")) as fh:
                print(f"rank {r}:", json.load(fh))


if __name__ == "__main__":
    main()
