"""The leverage correction against the exact OLS references of ``validate.py`` (settings 0-1).

    python benchmarks/leverage_ols.py [--trainings 10]

Settings 0-1 of ``validate.COVERAGE_PLAN`` (OLS d = 1, n = 1000; OLS d = 2, n = 400, rho 0.5):
the exact truth of each step grid (0.5-8 sd, three positions) as in the coverage study, then
(d = 2: the centred positions only)
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

FAMILIES = (("<= 1 sd", ("step0.5sd", "step1sd")), ("2 sd", ("step2sd",)), ("4-8 sd", ("step4sd", "step8sd")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainings", type=int, default=10)
    args = ap.parse_args()
    for model, d, n, rho, Z, M in COVERAGE_PLAN[:2]:
        s = GT.make_setting(model, d, n, rho=rho)
        grids = [g for g in coverage_grids(s) if isinstance(g, GT.StepGrid)
                 and (d == 1 or g.name.endswith("/centre"))]  # d = 2: the exact truth costs minutes a grid
        if d == 2:
            truth = np.array([GT.exact_truth_ols_2d(s, g, Z=Z, K=150)[0] for g in grids])
            base_truth = None
        else:
            truth = GT.ground_truth(s, grids, Z=Z, M=M or 2000, boot=50, histogram=False).estimate
            zx, zy = GT.draw_records(s, 200, np.random.default_rng(11))
            base_truth = float(np.mean([GT.exact_tv_ols_1d(s, None, float(zx[i, 0]), float(zy[i]), K=400)
                                        for i in range(200)]))
        vals = {False: [], True: []}
        base = {False: [], True: []}
        lev = []
        for k in range(args.trainings):
            for lc in (False, True):
                rng = np.random.default_rng([7, d, n, k])  # the same dataset for off and on
                _, est, mdl, _ = C.train_and_estimate(s, rng, num_records=min(n, 1000), leverage_correction=lc)
                rep = C.score(est, mdl, [C.scheme_for(g) for g in grids], uncertainty_draws=0, seed=k,
                              mc_draws=4096)
                vals[lc].append([rep.schemes[C.scheme_for(g).name].leakage for g in grids])
                base[lc].append(rep.baseline_leakage)
                lev.append(est.diagnostics["mean_leverage"])
        off, on = np.array(vals[False]), np.array(vals[True])
        b_off, b_on = np.array(base[False]), np.array(base[True])
        line = (f"{s.label()}: mean leverage {np.mean(lev):.4f}; baseline (unquantized) off {b_off.mean():.5f}, "
                f"on {b_on.mean():.5f}, on/off {np.min(b_on / b_off):.5f}-{np.max(b_on / b_off):.5f}")
        if base_truth is not None:
            line += (f", exact truth {base_truth:.5f} (|rel. err| off {abs(b_off.mean() / base_truth - 1):.4f}, "
                     f"on {abs(b_on.mean() / base_truth - 1):.4f})")
        print(line)
        names = [g.name.split("/")[0] for g in grids]
        for fam, pre in FAMILIES:
            sel = np.array([nm in pre for nm in names]) & (truth > 1e-3)
            if not sel.any():
                continue
            e_off = np.abs(off[:, sel].mean(0) / truth[sel] - 1)
            e_on = np.abs(on[:, sel].mean(0) / truth[sel] - 1)
            print(f"  step {fam} ({sel.sum()} grids): |rel. err| of the mean over {args.trainings} trainings vs "
                  f"exact truth: off {e_off.mean():.4f} (max {e_off.max():.4f}), on {e_on.mean():.4f} "
                  f"(max {e_on.max():.4f}); on/off {np.min(on[:, sel] / off[:, sel]):.4f}-"
                  f"{np.max(on[:, sel] / off[:, sel]):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
