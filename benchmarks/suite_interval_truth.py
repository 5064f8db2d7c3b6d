"""tests/test_interval.py's study: how the exact truth (``ground_truth.exact_truth_ols_2d``) moves with
its budget (``Z`` targets, ``K`` designs per target) against the assertions' margins (ts38). Runs the
study fixture's 12 trainings once (as the tests do), then the truth at each budget: its CPU seconds,
the three truths, their 80% CI half-widths, the issue figures' margins, each grid's coverage by
the 12 intervals, the old construction's mid-cell coverage, the nearest interval end.

    PYTHONPATH=.:tests python benchmarks/suite_interval_truth.py --budgets 60x200 60x50

Runtime: ~15 CPU s for the study plus ~1.5 (K = 50) to ~5 (K = 200) per budget.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import test_interval as TI
import torch

from mis_lightning.groundtruth import ground_truth as GT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", default=["60x200", "60x50"], help="ZxK pairs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fixture = TI.study._get_wrapped_function() if hasattr(TI.study, "_get_wrapped_function") else TI.study.__wrapped__
    t = time.process_time()
    _, new, old, _ = fixture()
    print(f"study (the fixture, its own truth included): {time.process_time() - t:.2f} CPU s")
    s = GT.make_setting("linear", 2, 400, rho=0.5)
    grids = [GT.StepGrid(f"step{c:g}sd/{lab}", s.sd * c, offset=o, origin=s.theta_star)
             for c, o, lab in ((4, 0.0, "centre"), (4, 0.5, "boundary"), (2, 0.0, "centre"))]
    for zk in args.budgets:
        z, k = (int(x) for x in zk.split("x"))
        t = time.process_time()
        tr = [GT.exact_truth_ols_2d(s, g, Z=z, K=k) for g in grids]
        cpu = time.process_time() - t
        v = [x[0] for x in tr]
        half = [(x[1][1] - x[1][0]) / 2 / x[0] for x in tr]
        cover = [int(((new[:, g, 0] <= v[g]) & (v[g] <= new[:, g, 1])).sum()) for g in range(3)]
        old_cover = int(((old[:, 0, 0] <= v[0]) & (v[0] <= old[:, 0, 1])).sum())
        near = [float(np.min(np.abs(new[:, g, :] - v[g])) / v[g]) for g in range(3)]
        print(f"Z={z} K={k}: {cpu:.2f} CPU s; truths {[f'{x:.5f}' for x in v]}; 80% CI half-widths "
              f"{[f'{x:.2%}' for x in half]}; truth[0] / 0.0035 - 1 = {v[0] / 0.0035 - 1:+.2%} (tol 8%); "
              f"truth[1] {v[1]:.5f} in (0.015, 0.019); truth[2] / 0.0133 - 1 = {v[2] / 0.0133 - 1:+.2%} (tol 6%); "
              f"covered {cover} of 12 (need >= 10); old construction mid-cell {old_cover} (need <= 6); "
              f"nearest end {[f'{x:.1%}' for x in near]}")


if __name__ == "__main__":
    main()
