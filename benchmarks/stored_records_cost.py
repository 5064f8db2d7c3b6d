"""CPU time and figures of one ``assess`` with the exact estimator and R of n records stored, on
an OLS design whose rows are scaled by ``1 + |x_1|`` (spread leverages; lo29: the per-record HC2
self term's cost and the one-selection figures of docs/validation.md, "The HC2 term with R < n stored records").

``nn.Linear(d, 1)`` at its least-squares solution (float64), n records, batches of 500;
``assess(..., ["rtn_int8", "rtn_int4", "rtn_int2"], num_records=R, seed=0, estimation="exact")``.
Prints the call's CPU time, the baseline and each scheme's leakage, interval and method. Run it on
two checkouts (``--root``) interleaved for before / after. Runtime: ~5 s CPU at d = 400, n = R =
3,000; 20-30 s at d = 1,500, n = 4,000, R = 2,048.

    python benchmarks/stored_records_cost.py 1500 4000 2048
    python benchmarks/stored_records_cost.py 1500 4000 2048 --root /path/to/checkout-before
    python benchmarks/stored_records_cost.py 400 3000 3000        # every record stored
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("d", type=int, help="features (weights d + 1)")
    ap.add_argument("n", type=int, help="training records")
    ap.add_argument("records", type=int, help="R, the records stored")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout whose mis_lightning is measured (default: this file's)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))
    import mis_lightning as ml

    torch.set_num_threads(1)
    d, n = args.d, args.n
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x * (1 + x[:, :1].abs())  # some leverage spread
    y = x @ (torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d)) + torch.randn(n, generator=g, dtype=torch.float64)
    m = nn.Linear(d, 1).double()
    with torch.no_grad():
        a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, y).solution
        m.weight.copy_(sol[:d][None])
        m.bias.copy_(sol[d:])

    def mse(o, t):
        return 0.5 * (o.squeeze(-1) - t) ** 2

    t0 = time.process_time()
    res = ml.assess(m, ["rtn_int8", "rtn_int4", "rtn_int2"], DataLoader(TensorDataset(x, y), batch_size=500), mse,
                    num_records=args.records, seed=0, estimation="exact")
    cpu = time.process_time() - t0
    print(f"{ml.__file__}: cpu {cpu:.1f}s  baseline {res.baseline_leakage:.5f} "
          + " ".join(f"{k} {v.leakage:.5f} [{v.interval[0]:.5f}, {v.interval[1]:.5f}] {v.method}"
                     for k, v in res.schemes.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
