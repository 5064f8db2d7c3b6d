"""Coverage of the exact OLS d = 2 truth with R < n stored records, where the leakage is most
sensitive to sigma (step 3-4 sd, population weights mid-cell or on a boundary): the position
search's ``sigma_rel`` over ``sqrt(n)`` (since rn28) against ``sqrt(R)`` before (rn28;
docs/validation.md, "sigma's sample"; method.md section 3, "The step in sd units").

Per grid: the exact truth (``groundtruth.ground_truth.exact_truth_ols_2d``), how many of the
trainings' 80% intervals contain it and the median width / truth; ``score_schemes`` with 16
uncertainty draws and 4,096 Monte Carlo draws, training ``k`` seeded ``k``. Run it on two
checkouts (``--root``) for before / after: the same trainings and seeds. Runtime: ~5-10 s CPU per
training at n = 2,000 plus ~1 min for the truths.

    python benchmarks/sigma_rel_coverage.py --n 2000 --records 128 --trainings 40
    python benchmarks/sigma_rel_coverage.py --n 2000 --records 128 --trainings 40 --root /path/to/checkout-before
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--records", type=int, default=128, help="R, the stored records")
    ap.add_argument("--trainings", type=int, default=40)
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout whose mis_lightning is measured (default: this file's)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))
    import mis_lightning
    from mis_lightning.assess import score_schemes
    from mis_lightning.groundtruth import compare as cmp
    from mis_lightning.groundtruth import ground_truth as gt

    torch.set_num_threads(1)
    n, r, t = args.n, args.records, args.trainings
    s = gt.make_setting("linear", 2, n, rho=0.5)
    grids = [gt.StepGrid(f"step{c:g}sd/{lab}", s.sd * c, offset=o, origin=s.theta_star)
             for c, o, lab in ((4, 0.0, "centre"), (4, 0.5, "boundary"), (3, 0.0, "centre"))]
    t0 = time.process_time()
    truth = [gt.exact_truth_ols_2d(s, g, Z=60, K=200)[0] for g in grids]
    print(mis_lightning.__file__, f"n={n} R={r} trainings={t}; truth {[round(v, 5) for v in truth]} "
          f"({time.process_time() - t0:.0f}s)", flush=True)
    rng = np.random.default_rng(12)
    covered = np.zeros(len(grids), int)
    widths: list[list[float]] = [[] for _ in grids]
    for k in range(t):
        _, est, model, _ = cmp.train_and_estimate(s, rng, num_records=r)
        rep = score_schemes(est, model, [cmp.scheme_for(g) for g in grids], uncertainty_draws=16, seed=k, mc_draws=4096)
        for i, g in enumerate(grids):
            lo, hi = rep.schemes[f"step:{g.name}"].interval
            covered[i] += lo <= truth[i] <= hi
            widths[i].append((hi - lo) / truth[i])
    for i, g in enumerate(grids):
        print(f"{g.name:20s} truth {truth[i]:.5f} covered {covered[i]}/{t}  median width/truth {np.median(widths[i]):.2f}")
    print(f"cpu {time.process_time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
