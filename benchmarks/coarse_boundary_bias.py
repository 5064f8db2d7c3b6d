"""The plug-in on coarse boundary grids (steps of 4-8 sd, every population weight on a cell
boundary): its value and 80% interval on the trainings of ``validate.py --coverage``'s OLS
``d = 2`` setting (n = 400, rho 0.5), and the exact truth recomputed on fresh targets.

    python benchmarks/coarse_boundary_bias.py --trainings 12 --targets 160

Same trainings as ``validate.py --coverage --settings 1`` (rng ``[7, d, n]``, ``seed=k``),
scoring only the grids named in ``--grids`` (positions ``centre`` / ``quarter`` /
``boundary``); docs/benchmarks.md, section acc43.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning.groundtruth import compare as C  # noqa: E402
from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402

POSITIONS = {"centre": 0.0, "quarter": 0.25, "boundary": 0.5}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainings", type=int, default=12)
    p.add_argument("--targets", type=int, default=0, help="fresh exact-truth targets per grid (0: none)")
    p.add_argument("--truth-seed", type=int, default=1, help="targets' seed (the coverage cache used 0)")
    p.add_argument("--grids", nargs="+", default=["4:boundary", "8:boundary"], help="STEP_SD:POSITION")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    s = GT.make_setting("linear", 2, 400, rho=0.5)
    grids = []
    for spec in a.grids:
        c, pos = spec.split(":")
        grids.append(GT.StepGrid(f"step{float(c):g}sd/{pos}", s.sd * float(c), offset=POSITIONS[pos],
                                 origin=s.theta_star))
    out = {"grids": [g.name for g in grids], "truth": {}, "values": [], "intervals": [], "regimes": [],
           "position_gaps": [], "warned": []}
    t0 = time.time()
    if a.targets:
        for g in grids:
            est, ci = GT.exact_truth_ols_2d(s, g, Z=a.targets, K=150, seed=a.truth_seed, oracle_records=64_000)
            out["truth"][g.name] = [est, *ci]
            print(f"truth {g.name}: {est:.5f} [{ci[0]:.5f}, {ci[1]:.5f}] ({a.targets} targets, seed {a.truth_seed})",
                  flush=True)
    t1 = time.time()
    rng = np.random.default_rng([7, s.d, s.n])
    for k in range(a.trainings):
        _, est, mdl, _ = C.train_and_estimate(s, rng, num_records=min(s.n, 1000))
        rep = C.score(est, mdl, [C.scheme_for(g) for g in grids], uncertainty_draws=16, seed=k, mc_draws=4096)
        r = [rep.schemes[C.scheme_for(g).name] for g in grids]
        out["values"].append([x.leakage for x in r])
        out["intervals"].append([list(x.interval) for x in r])
        out["regimes"].append([x.interval_regime for x in r])
        out["position_gaps"].append([x.position_gap for x in r])
        warned = " ".join(w for w in rep.warnings if w.startswith("position-dominated"))
        out["warned"].append([f"{x.name} (" in warned for x in r])  # named by the position warning
        print(k, " ".join(f"{x.leakage:.5f} [{x.interval[0]:.5f}, {x.interval[1]:.5f}] gap {x.position_gap:.3f}"
                          f"{' W' if w else ''}" for x, w in zip(r, out["warned"][-1])), flush=True)
    v = np.array(out["values"]).reshape(a.trainings, len(grids))
    print(f"truth {t1 - t0:.0f} s, trainings {time.time() - t1:.0f} s")
    for j, g in enumerate(grids[:len(grids) if a.trainings > 1 else 0]):
        print(f"{g.name}: plug-in mean {v[:, j].mean():.5f} sd {v[:, j].std(ddof=1):.5f}; "
              f"warned {sum(w[j] for w in out['warned'])}/{a.trainings}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
