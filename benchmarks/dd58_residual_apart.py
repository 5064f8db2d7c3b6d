"""dd58's reproducer (docs/benchmarks.md "dd58"): under DDP a ``"ggn_residual"`` block that one process's first batch
found zero, and left out of its sums, while every process's first batches together did not.

tests/test_ddp.py's ``_TwoHeads`` (a shared tanh layer, head ``a``, head ``b`` through a tanh; 73 weights) under
``estimation="exact", hessian="ggn_residual"``, its loss head ``a``'s cross-entropy plus head ``b``'s where the
record carries its label; 64 records in batches of 16, split 32 / 32 over 2 gloo processes
(``torch.multiprocessing.spawn``), process 1's first batch (records 32-47) carrying no ``b`` label: its ``b1``
residual block is zero there, and process 1 left it out of every batch. Prints each process's ``rtn_int4``
leakage, ``residual_*`` diagnostics and the row's ``*`` phrases, against one process reading the 64 records
(its first batch labelled) under ``hessian="ggn_residual"`` and under ``hessian="exact"`` (every block: the
reference). ~1 min.

    python benchmarks/dd58_residual_apart.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def run(batches: list[list[int]], hessian: str) -> list:
    """``[leakage, residual_* diagnostics, the rtn_int4 row's * phrases]`` of one run over ``batches``."""
    from test_ddp import _two_heads_data, _two_heads_loss, _TwoHeads

    from mis_lightning import MISIndicator

    x, t = _two_heads_data()
    t[32:48, 2] = 0.0
    met = MISIndicator(_TwoHeads(), _two_heads_loss, ["rtn_int4"], uncertainty_draws=0, estimation="exact",
                       hessian=hessian, num_records=64)
    for idx in batches:
        met.update(x[idx], t[idx])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = met.compute()
    row = next(r for r in met.report.rows() if r["scheme"] == "rtn_int4")
    return [float(out["rtn_int4"]["leakage"]),
            {k: v for k, v in met.report.diagnostics.items() if k.startswith("residual_")}, row["indicative"]]


def worker(rank: int, prefix: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29534")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    Path(f"{prefix}_rank{rank}.json").write_text(json.dumps(run([list(range(a, a + 16)) for a in
                                                                 range(32 * rank, 32 * rank + 32, 16)], "ggn_residual")))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    torch.set_num_threads(1)
    every = [list(range(a, a + 16)) for a in range(0, 64, 16)]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "apart")
        mp.spawn(worker, args=(prefix,), nprocs=2)
        for r in range(2):
            print(f"process {r} of 2:", Path(f"{prefix}_rank{r}.json").read_text())
    print("one process, hessian='ggn_residual':", run(every, "ggn_residual"))
    print("one process, hessian='exact':", run(every, "exact"))


if __name__ == "__main__":
    main()
