"""rv57a's reproducer (docs/benchmarks.md "rv57a"): the ``"ggn_residual"`` block checks' diagnostics two gloo
processes report (``world_choice.world_residual``) against one process whose first batch is the union of the
processes' first batches, and one process reading every record in the same batches.

tests/test_estimation_conditions.py's ``_TinyCNN`` (``--act relu``: its ReLU, every block ratio 0; ``--act tanh``:
non-zero ratios), ``estimation="exact", hessian="ggn_residual"``, 64 records in batches of 16, ``rtn_int4``;
the processes split the records 32 / 32 (``split``) or 64 / 0 (``empty1``), each running ``world_choice.agree``
after its pass as ``MISCallback`` does. Prints each run's leakage and ``residual_*`` diagnostics. ~1 min.

    python benchmarks/rv57a_ddp_residual.py --act tanh
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SHARDS = {"split": ((0, 32), (32, 64)), "empty1": ((0, 64), (0, 0))}


def workload(rank: int | None, act: type[nn.Module], shards: tuple | None, union_first: bool = False) -> list:
    """``[leakage, residual_* diagnostics]`` of one run: this rank's shard, or (``rank=None``) all 64 records
    on one process, its first batch the union of the ranks' first batches where ``union_first``."""
    from test_estimation_conditions import _cnn_data, _TinyCNN, ce

    from mis_lightning import MISIndicator
    from mis_lightning.estimation import world_choice as W

    x, y = _cnn_data(64, classes=3)
    torch.manual_seed(0)
    met = MISIndicator(_TinyCNN(act=act).eval(), ce, ["rtn_int4"], uncertainty_draws=0, num_training_records=1000,
                       num_records=16, estimation="exact", hessian="ggn_residual")
    if rank is None:
        order = ([torch.cat([torch.arange(0, 16), torch.arange(32, 48)]), torch.arange(16, 32), torch.arange(48, 64)]
                 if union_first else [torch.arange(a, a + 16) for a in range(0, 64, 16)])
        for idx in order:
            met.update(x[idx], y[idx])
    else:
        lo, hi = shards[rank]
        for a in range(lo, hi, 16):
            met.update(x[a:a + 16], y[a:a + 16])

        def reread(_world: dict) -> None:
            raise AssertionError("no rank chooses apart here")

        W.agree(met.accumulator, hi > lo, W.gather_objects, reread)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = met.compute()
    return [float(out["rtn_int4"]["leakage"]),
            {k: v for k, v in met.report.diagnostics.items() if k.startswith("residual_")}]


def worker(rank: int, act: type[nn.Module], prefix: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    res = {name: workload(rank, act, s) for name, s in SHARDS.items()}
    Path(f"{prefix}_rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--act", choices=["relu", "tanh"], default="tanh")
    args = ap.parse_args()
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[args.act]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "residual")
        mp.spawn(worker, args=(act, prefix), nprocs=2)
        print("one process, batches of 16:", workload(None, act, None))
        print("one process, union first:  ", workload(None, act, None, union_first=True))
        for r in range(2):
            print(f"rank {r}:", Path(f"{prefix}_rank{r}.json").read_text())


if __name__ == "__main__":
    main()
