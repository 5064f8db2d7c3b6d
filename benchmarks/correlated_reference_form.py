"""The Gaussian channel form (the form of the correlated headline and of the closed-form reference
of ``benchmarks/coverage_averaged.py --ols``) against the exact first-order value
``E_U |a' R^-1 m(U)|`` (``groundtruth.correlated_reference.exact_mean_abs``: GHK box means over
outer draws of the grid offsets ``U``) at ``theta*`` of the OLS design, per record (cv29;
docs/validation.md, "The reference's form"; method.md section 3, "Correlated coordinates").

Per (rho, step in sd): the mean over the records of channel / exact and its range, the exact
value's relative standard error, and exact / unquantized. The exact value's GHK draws per box are
``min(16384, max(256, budget // (boxes x d)))``: at rho = 0.9 its bias dominates with the default
256 (``--boxes 500 --budget`` so that each box gets 4,096 or 16,384 draws moves the ratio towards 1).
Runtime: ~3 s CPU per (rho, step) with the defaults; ~10 s at 4,096 draws per box (500 boxes).

    python benchmarks/correlated_reference_form.py                      # d = 64, n = 4000, 12 rows
    python benchmarks/correlated_reference_form.py --rhos 0.9 --steps 1.4 4 --spread-sd 6 \\
        --boxes 500 --budget 524288000                                  # 16,384 GHK draws per box
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from mis_lightning.groundtruth import averaged as AV
    from mis_lightning.groundtruth.correlated_reference import exact_mean_abs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--rhos", nargs="+", type=float, default=[0.0, 0.5, 0.9])
    ap.add_argument("--steps", nargs="+", type=float, default=[0.75, 1.4, 4.0, 8.0], help="grid steps in sd")
    ap.add_argument("--records", type=int, default=32, help="records of design 0 scored")
    ap.add_argument("--spread-sd", type=float, default=None,
                    help="theta*_j = sigma_j U(-s, s) (default: make_ols_design's)")
    ap.add_argument("--boxes", type=int, default=4000, help="outer draws of U (exact_mean_abs num_boxes)")
    ap.add_argument("--budget", type=int, default=6_000_000, help="GHK draws x coordinates over all boxes")
    ap.add_argument("--seed", type=int, default=1, help="exact_mean_abs's seed")
    args = ap.parse_args(argv)
    d, n = args.d, args.n
    kw = {} if args.spread_sd is None else {"spread_sd": args.spread_sd}
    for rho in args.rhos:
        des = AV.make_ols_design(d, n, rho, seed=0, **kw)
        b = des.inverse_gram
        dg = np.sqrt(np.diag(b))
        corr = b / dg[:, None] / dg[None]
        a = math.sqrt(n) * (des.X[: args.records] @ b) / dg[None]  # standardised influences [R, d]
        unq = math.sqrt(2 / math.pi) * np.sqrt(np.einsum("ij,ij->i", a, np.linalg.solve(corr, a.T).T))
        for r in args.steps:
            t0 = time.process_time()
            u = des.theta_star / (r * des.sigma)
            kappa = AV.kappa_step(u, np.full(d, r))
            kh = np.sqrt(kappa)
            m = np.eye(d) - np.diag(kappa) + kh[:, None] * corr * kh[None]  # the channel's quantized covariance
            uk = a * kh[None]
            chan = math.sqrt(2 / math.pi) * np.sqrt(np.einsum("ij,ij->i", uk, np.linalg.solve(m, uk.T).T))
            ex, se = exact_mean_abs(torch.from_numpy(corr), torch.from_numpy(a), torch.full((d,), r, dtype=torch.float64),
                                    torch.from_numpy(np.mod(0.5 - u, 1.0)), num_boxes=args.boxes,
                                    budget=args.budget, seed=args.seed)
            ex, se = ex.numpy(), se.numpy()
            per_box = int(min(16384, max(256, args.budget // (args.boxes * d))))
            ratio = chan / ex
            print(f"rho {rho} step {r}: channel / exact first order: mean {ratio.mean():.3f} "
                  f"(records {ratio.min():.3f}-{ratio.max():.3f}), exact's rel se {np.mean(se / ex):.3f}, "
                  f"~{per_box} GHK draws per box; exact / unquantized {np.mean(ex / unq):.3f} "
                  f"[{time.process_time() - t0:.0f} s CPU]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
