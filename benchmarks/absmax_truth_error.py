"""How exact is the exact absmax truth of the coverage study? (linear d = 2, n = 400, rho = 0.5)

The coverage study's truth of a grid (``ground_truth.exact_truth_ols``) averages per-target exact
TVs over ``Z`` targets with a control variate ``c`` (the first-order formula with the true
parameters), whose mean ``E c`` is itself a Monte Carlo over records. This script separates the
three errors for ``rtn_int8`` (docs/benchmarks.md, section cov43):

* ``E c``: the spread of its estimate over ``--oracle-seeds`` independent samples of 4,000
  records (the library's default) and their pooled mean;
* the targets: the control-variate estimate on ``--targets`` fresh targets with the pooled
  ``E c``, and the spread of the estimates of blocks of 32 targets (the coverage truth's size);
* data processing: the unquantized TV on the same designs and releases
  (``exact_tv_ols_unquantized``), an upper bound that a fine absmax grid must sit just below.

    python benchmarks/absmax_truth_error.py                  # 1,024 targets: ~4 min on one core
    python benchmarks/absmax_truth_error.py --targets 128    # quicker, noisier

In ``d = 2`` the other weight's box given the released one is 1-d, whose GHK probability is exact
(4 draws give the values of 64), so a target costs ~0.2 s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=1024, help="fresh targets (the [1, 177] stream)")
    ap.add_argument("--oracle-seeds", type=int, default=64, help="samples of 4,000 records for E c")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--K", type=int, default=40, help="designs per target (the coverage truth's 40)")
    ap.add_argument("--M", type=int, default=1500, help="releases per target (the coverage truth's 1,500)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = GT.make_setting("linear", 2, 400, rho=0.5)
    g = GT.AbsmaxGrid(f"rtn_int{args.bits}", args.bits)

    means = np.array([GT.oracle_mean(s, [g], 4000, k)[0][0] for k in range(args.oracle_seeds)])
    ec, ec_se = float(means.mean()), float(means.std(ddof=1) / np.sqrt(len(means)))
    print(f"E c: seed 0 (4,000 records, the coverage truth's) {means[0]:.6f}; pooled over {len(means)} seeds "
          f"{ec:.6f} +- {ec_se:.6f}; one seed's sd {means.std(ddof=1):.6f} ({means.std(ddof=1) / ec:.2%})")

    Z = args.targets
    zx, zy = GT.draw_records(s, Z, np.random.default_rng([1, 177]))
    tv = np.zeros((Z, 2))
    for i in range(Z):
        tv[i, 0] = GT.exact_tv_ols_absmax(s, g, zx[i], zy[i], K=args.K, M=args.M, draws=4, seed=1 + i)[0]
        tv[i, 1] = GT.exact_tv_ols_unquantized(s, zx[i], zy[i], K=args.K, M=args.M, seed=1 + i)[0]
    c = GT.oracle_first_order(s, g, zx, zy)[:, None]
    for lab, col in ((g.name, 0), ("unquantized", 1)):
        est, ci = GT.cv_estimate(tv[:, col:col + 1], c, np.array([ec]), boot=1000, level=0.8, seed=0,
                                 c_mean_se=np.array([ec_se]))
        print(f"{lab}: {Z} targets, control variate with the pooled E c: {est[0]:.5f} (80% CI {ci[0, 0]:.5f}-"
              f"{ci[0, 1]:.5f}); plain mean {tv[:, col].mean():.5f} +- {tv[:, col].std() / np.sqrt(Z):.5f}")
    d = tv[:, 0] / tv[:, 1] - 1
    print(f"{g.name} / unquantized - 1 on the same releases: mean {d.mean():+.4%}, per target {d.min():+.3%}.."
          f"{d.max():+.3%}")
    blocks = [GT.cv_estimate(tv[k:k + 32, :1], c[k:k + 32], np.array([ec]), boot=1)[0][0] for k in range(0, Z - 31, 32)]
    if len(blocks) > 1:
        print(f"blocks of 32 targets ({len(blocks)}): sd {np.std(blocks, ddof=1):.5f} "
              f"({np.std(blocks, ddof=1) / np.mean(blocks):.1%} of their mean), range {min(blocks):.5f}-{max(blocks):.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
