"""Move a cached linear coverage truth to the control variate's mean over
``validate.ORACLE_RECORDS_COVERAGE`` records without recomputing its per-target values.

    python benchmarks/coverage_truth_oracle_shift.py --settings 2 [--beta 1.0] [--write]

A coverage truth is the control-variate mean over targets ``mean(v) - beta (mean(c) - E c)``
(``ground_truth.cv_estimate``): linear in ``E c``, so moving ``E c`` from ``--old-oracle``
records (64,000, what the cached truth used) to ``ORACLE_RECORDS_COVERAGE`` moves the estimate by
``beta (E c(new) - E c(old))``, the same for every target. ``beta`` (the slope of the per-target
values on the control variate) is not cached; ``--beta`` states it. Measured where the truths were
recomputed (cov45b): OLS ``d = 1`` 1.00-1.07 on the grids whose truth is above 10^-3, ``d = 2``
0.91-1.07 (4-sd centre 0.76, 8-sd quarter 0.83); so ``beta = 1`` errs by <= 0.1 of a shift of
0.1-0.4% in ``d = 5``. The truth's 80% interval moves with it (it kept the old ``E c``'s larger
standard error: slightly wide). ``--write`` stores the result under ``validate.coverage_key`` with
a ``" note"`` saying how it was obtained, and ``" E c"``. ~2 CPU min (the two ``E c``, 19 grids).
docs/benchmarks.md, section cov45b.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import validate as V  # noqa: E402

from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", type=int, required=True, help="index into validate.COVERAGE_PLAN (linear)")
    ap.add_argument("--cache", type=Path, default=ROOT / "docs" / "figures" / "truth_linear_exact.json")
    ap.add_argument("--old-oracle", type=int, default=64_000, help="records behind the cached truth's E c")
    ap.add_argument("--beta", type=float, default=1.0, help="slope of the truth on E c")
    ap.add_argument("--write", action="store_true", help="store the moved truth under validate.py's key")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, d, n, rho, Z, M = V.COVERAGE_PLAN[a.settings]
    if model != "linear":
        raise SystemExit(f"--settings {a.settings} is {model}: benchmarks/logistic_truth_oracle_shift.py moves it")
    s = GT.make_setting(model, d, n, rho=rho)
    grids = V.coverage_grids(s)
    cache = json.loads(a.cache.read_text())
    key = V.coverage_key(s, Z, M)
    old = key.replace(f"oracle={V.ORACLE_RECORDS_COVERAGE}", f"oracle={a.old_oracle}")
    if old not in cache:
        raise SystemExit(f"{a.cache} holds no {old!r}")
    ec_old, _ = GT.oracle_mean(s, grids, a.old_oracle, 0)
    ec_new, se_new = GT.oracle_mean(s, grids, V.ORACLE_RECORDS_COVERAGE, 0)
    shift = a.beta * (ec_new - ec_old)
    truth = np.asarray(cache[old]) + shift
    ci = np.asarray(cache[old + " ci"]) + shift[:, None] if old + " ci" in cache else None
    for g, grid in enumerate(grids):
        t0 = cache[old][g]
        print(f"{grid.name:20s} E c {ec_old[g]:.6f} -> {ec_new[g]:.6f}; truth {t0:.6f} -> {truth[g]:.6f} "
              f"({truth[g] / max(t0, 1e-300) - 1:+.2%})")
    if a.write:
        cache[key] = truth.tolist()
        if ci is not None:
            cache[key + " ci"] = ci.tolist()
        cache[key + " E c"] = [ec_new.tolist(), se_new.tolist()]
        cache[key + " note"] = (
            f"{old!r} moved to E c over {V.ORACLE_RECORDS_COVERAGE} records: + beta (E c({V.ORACLE_RECORDS_COVERAGE}) - "
            f"E c({a.old_oracle})), beta = {a.beta} (benchmarks/coverage_truth_oracle_shift.py), not recomputed")
        a.cache.write_text(json.dumps(cache, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
