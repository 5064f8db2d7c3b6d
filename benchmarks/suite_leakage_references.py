"""tests/test_leakage.py's Gaussian-model test against the references it is checked with (ts38):
per size, the CPU seconds of the cases, the largest relative se, the mean and largest relative
error of the Monte Carlo value, the worst margins of the per-record rules (as fractions of the
exact value) and the smallest bias ``b`` of the MC value (``mc * (1 +- b)``) that fails the test.

Run against a checkout's tests (the old tree for the A/B: its own references):

    PYTHONPATH=.:tests python benchmarks/suite_leakage_references.py
    PYTHONPATH=OLD:OLD/tests python benchmarks/suite_leakage_references.py   # another checkout

Runtime: ~7-11 CPU s.
"""

from __future__ import annotations

import time

import numpy as np
import test_leakage as T
import torch


def first_failure(d: int, cases: list[dict], b: float) -> str | None:
    """The test's assertions on the MC values scaled by ``1 + b``: the first rule that fails."""
    rel = []
    for c in cases:
        ex, se = c["exact"], np.sqrt(c["exact_se"] ** 2 + c["mc_se"] ** 2)
        mc = c["mc"] * (1 + b)
        err = np.abs(mc - ex)
        rel.append(mc / ex - 1)
        if not np.all(err <= 2.0 * c["shift"] * ex + 4 * se):
            return "shift"
        if d >= 50 and not np.all(err <= 0.03 * ex + 4 * se):
            return "3%"
    return None if abs(np.mean(np.concatenate(rel))) < 0.015 else "mean"


def main() -> None:
    torch.set_num_threads(1)
    for d, records, draws in T.GAUSSIAN_SIZES[1:]:
        t = time.process_time()
        cases = [T.gaussian_model_case(d, n, h, records, draws, T._seed(d, n, h))
                 for n in (200, 5000) for h in T.GAUSSIAN_GRID_STEPS]
        cpu = time.process_time() - t
        rel = np.concatenate([c["mc"] / c["exact"] - 1 for c in cases])
        se = [np.sqrt(c["exact_se"] ** 2 + c["mc_se"] ** 2) for c in cases]
        margin = {k: min(np.min((f * c["exact"] + 4 * s - np.abs(c["mc"] - c["exact"])) / c["exact"])
                         for c, s in zip(cases, se) for f in [0.03 if k == "3%" else 2 * c["shift"]])
                  for k in ("shift", "3%")}
        fails = {}
        for sign in (1, -1):
            for b in np.arange(0.0, 0.2, 0.0025):
                rule = first_failure(d, cases, sign * b)
                if rule:
                    fails[f"{sign * b:+.4f}"] = rule
                    break
        print(f"d={d}: CPU {cpu:.2f} s; max rel se {max(np.max(s / c['exact']) for c, s in zip(cases, se)):.4f}; "
              f"mean rel err {rel.mean():+.4f} (limit 0.015); max |rel err| {np.abs(rel).max():.4f}; "
              f"worst margin 'shift' {margin['shift']:.4f}, '3%' {margin['3%']:.4f} (x exact); fails at bias {fails}")


if __name__ == "__main__":
    main()
