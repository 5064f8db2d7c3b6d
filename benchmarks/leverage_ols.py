"""The leverage correction against the exact OLS references of ``validate.py`` (settings 0-1).

    python benchmarks/leverage_ols.py [--trainings 10]

Settings 0-1 of ``validate.COVERAGE_PLAN`` (OLS d = 1, n = 1000; OLS d = 2, n = 400, rho 0.5):
the exact truth of each step grid (0.5-8 sd, three positions) as in the coverage study, then
``--trainings`` independently trained models, each scored with the exact estimator's
``leverage_correction`` off and on. Prints, per setting, the mean relative error of the
indicator against the truth (off / on, over grids and trainings) and the largest on/off ratio.
d / n is 0.001-0.005 there, so the correction should move the values by well under 1%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from validate import COVERAGE_PLAN, coverage_grids  # noqa: E402

from mis_lightning.groundtruth import compare as C  # noqa: E402
from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainings", type=int, default=10)
    args = ap.parse_args()
    for model, d, n, rho, Z, M in COVERAGE_PLAN[:2]:
        s = GT.make_setting(model, d, n, rho=rho)
        grids = [g for g in coverage_grids(s) if isinstance(g, GT.StepGrid)]
        if d == 2:
            truth = np.array([GT.exact_truth_ols_2d(s, g, Z=Z, K=150)[0] for g in grids])
        else:
            truth = GT.ground_truth(s, grids, Z=Z, M=M or 2000, boot=50, histogram=False).estimate
        vals = {False: [], True: []}
        lev = []
        for k in range(args.trainings):
            for lc in (False, True):
                rng = np.random.default_rng([7, d, n, k])  # the same dataset for off and on
                _, est, mdl, _ = C.train_and_estimate(s, rng, num_records=min(n, 1000), leverage_correction=lc)
                rep = C.score(est, mdl, [C.scheme_for(g) for g in grids], uncertainty_draws=0, seed=k,
                              mc_draws=4096)
                vals[lc].append([rep.schemes[C.scheme_for(g).name].leakage for g in grids])
                lev.append(est.diagnostics["mean_leverage"])
        off, on = np.array(vals[False]), np.array(vals[True])
        keep = truth > 1e-3
        rel_off = np.abs(off[:, keep] / truth[keep] - 1).mean()
        rel_on = np.abs(on[:, keep] / truth[keep] - 1).mean()
        print(f"{s.label()}: mean leverage {np.mean(lev):.4f}; mean |rel. err| vs exact truth over "
              f"{keep.sum()} grids x {args.trainings} trainings: off {rel_off:.4f}, on {rel_on:.4f}; "
              f"on/off ratio {np.min(on / off):.4f}-{np.max(on / off):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
