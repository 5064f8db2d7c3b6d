"""Ground truth for a non-nearest PTQ scheme (torchao HQQ, per row) against the indicator.

For a linear-regression setting (OLS, one output row of d weights) the ground truth
(retraining simulation, docs/validation.md "How the ground truth is computed") is computed
for torchao's HQQ scale-only release and, for reference, for the round-to-nearest absmax
release of the same bit widths (``rtn_int<b>``); the indicator of each is the mean over
``--models`` independently trained models (HQQ: Monte Carlo re-quantization scoring;
rtn: the analytic grid).

    python benchmarks/validate_ptq.py                 # d = 8, n = 500, bits 5..8 (~3 min)
    python benchmarks/validate_ptq.py --d 4 --n 300 --bits 4,5,6,7 --models 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--bits", default="5,6,7,8")
    ap.add_argument("--Z", type=int, default=40, help="target records of the ground truth")
    ap.add_argument("--M", type=int, default=4000, help="simulated datasets per target and arm")
    ap.add_argument("--models", type=int, default=4, help="trained models whose indicators are averaged")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from mis_lightning.groundtruth import compare as C
    from mis_lightning.groundtruth import ground_truth as GT
    from mis_lightning.groundtruth import ptq as P

    torch.set_num_threads(1)
    bits = [int(b) for b in args.bits.split(",")]
    s = GT.make_setting("linear", args.d, args.n, seed=args.seed)
    hqq = [P.HQQGrid(f"hqq_int{b}", b) for b in bits]
    rtn = [GT.AbsmaxGrid(f"rtn_int{b}", b) for b in bits]
    truth = GT.ground_truth(s, hqq + rtn, Z=args.Z, M=args.M, seed=args.seed, exact=False, histogram=False,
                            boot=300)
    # HQQ: the best of three LR tests (cross-fitted), the absmax-style one included
    th_h, ci_h = P.ground_truth_hqq(s, hqq, Z=args.Z, M=args.M, seed=args.seed)
    rng = np.random.default_rng([args.seed, 555, s.d, s.n])
    vh, vr = [], []
    for k in range(args.models):
        _, est, model, _ = C.train_and_estimate(s, rng)
        vh.append(P.indicator(hqq, est, model, seed=args.seed + k))
        vr.append(C.indicator(s, rtn, est, model, draws=0, seed=args.seed + k)[0])
    vh, vr = np.mean(vh, 0), np.mean(vr, 0)
    base = float(np.mean([C.indicator(s, rtn[:1], est, model, draws=0)[2][0]]))
    print(f"{s.label()}: baseline leakage {base:.4f}; truth = cross-fitted LR-test bound "
          f"(Z = {args.Z}, M = {args.M}), indicator = mean of {args.models} trained models")
    print("| bits | HQQ truth [80% CI] | HQQ indicator | rel. err | rtn truth [80% CI] | rtn indicator | rel. err | HQQ truth, absmax LR test only |")
    print("|---|---|---|---|---|---|---|---|")
    G = len(bits)
    for i, b in enumerate(bits):
        th, ch = th_h[i], ci_h[i]
        tr, cr = truth.estimate[G + i], truth.ci[G + i]
        print(f"| {b} | {th:.4f} [{ch[0]:.4f}, {ch[1]:.4f}] | {vh[i]:.4f} | {vh[i] / th - 1:+.1%} | "
              f"{tr:.4f} [{cr[0]:.4f}, {cr[1]:.4f}] | {vr[i]:.4f} | {vr[i] / tr - 1:+.1%} | {truth.estimate[i]:.4f} |")


if __name__ == "__main__":
    main()
