"""Move the cached logistic coverage truth (``validate.py --coverage --settings 3``) to the
control variate's mean over ``validate.ORACLE_RECORDS`` records without refitting its 10^6
datasets.

    python benchmarks/logistic_truth_oracle_shift.py --beta-datasets 40000

The truth is ``groundtruth.logistic.exact_truth_logistic``'s control-variate mean over 32 targets,
``mean(v) - beta (mean(c) - E c)``: linear in ``E c``, so moving ``E c`` from 4,000 records (what
the cache held) to 64,000 moves each estimate by ``beta (E c(64,000) - E c(4,000))``. ``beta`` is
the slope of the per-target values on the exactly known control variate; a run on the same
targets with fewer datasets gives noisier per-target values but the same slope in expectation.
Each end of the cached bracket moves by its estimate's ``beta`` (the Gaussian test's for the
lower end, the plug-in's for the upper), the truth follows (``validate.logistic_truth_from``);
written under the key ``validate.py`` reads (docs/benchmarks.md, section cov44). ~30 CPU s.
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
from mis_lightning.groundtruth import logistic as LG  # noqa: E402

OLD_ORACLE_RECORDS = 4000  # exact_truth_logistic's default, what the cached truth used
OLD_TARGETS = 32  # the cached truth's targets (COVERAGE_PLAN's until cov45's 128)


def slope(v: np.ndarray, c: np.ndarray) -> float:
    """``cv_estimate``'s ``beta`` of one column (0 where the control variate is uninformative)."""
    sv, sc = v.std(), c.std()
    if not (sv > 0 and sc > 1e-12 * max(abs(v.mean()), 1e-300)):
        return 0.0
    r = np.corrcoef(v, c)[0, 1]
    return float(r * sv / sc) if np.isfinite(r) and r >= 0.3 else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beta-datasets", type=int, default=40_000, help="datasets of the slope's run")
    ap.add_argument("--cache", type=Path, default=ROOT / "docs" / "figures" / "truth_logistic_coupled.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, d, n, rho, _, M = V.COVERAGE_PLAN[3]
    Z = OLD_TARGETS
    s = GT.make_setting(model, d, n, rho=rho)
    grids = V.coverage_grids(s)
    cache = json.loads(a.cache.read_text())
    old = f"{s.label()} Z={Z} M={M} coupled"
    if old not in cache:
        raise SystemExit(f"{a.cache} holds no {old!r}")
    r = LG.exact_truth_logistic(s, grids, Z=Z, M=a.beta_datasets, seed=0, oracle_records=OLD_ORACLE_RECORDS,
                                bin_sd=V.LOGISTIC_ABSMAX_BIN_SD)
    zx, zy = GT.draw_records(s, Z, np.random.default_rng([0, 77]))  # exact_truth_logistic's targets
    c = np.stack([GT.oracle_first_order(s, g, zx, zy) for g in grids], 1)
    beta = {e: np.array([slope(r[e + "_z"][:, g], c[:, g]) for g in range(len(grids))]) for e in ("test", "plug")}
    ec_old, _ = GT.oracle_mean(s, grids, OLD_ORACLE_RECORDS, 0)
    ec_new, _ = GT.oracle_mean(s, grids, V.ORACLE_RECORDS, 0)
    br = np.asarray(cache[old + " bracket"])
    lo = br[:, 0] + beta["test"] * (ec_new - ec_old)
    hi = br[:, 1] + beta["plug"] * (ec_new - ec_old)
    truth, bracket = V.logistic_truth_from(lo, lo, hi)
    # the key of a 64,000-record E c (coverage_key now names ORACLE_RECORDS_COVERAGE's 1,024,000)
    key = V.coverage_key(s, Z, M).replace(f"oracle={V.ORACLE_RECORDS_COVERAGE}", f"oracle={V.ORACLE_RECORDS}")
    cache[key], cache[key + " bracket"] = truth.tolist(), bracket.tolist()
    cache[key + " note"] = (
        f"{old!r} moved to E c over {V.ORACLE_RECORDS} records: each bracket end + beta (E c({V.ORACLE_RECORDS}) - "
        f"E c({OLD_ORACLE_RECORDS})), beta from M = {a.beta_datasets} on the same targets "
        "(benchmarks/logistic_truth_oracle_shift.py)")
    a.cache.write_text(json.dumps(cache, indent=1))
    old_truth = np.asarray(cache[old])
    for g, grid in enumerate(grids):
        print(f"{grid.name:20s} E c {ec_old[g]:.5f} -> {ec_new[g]:.5f}; beta test/plug {beta['test'][g]:.2f}/"
              f"{beta['plug'][g]:.2f}; truth {old_truth[g]:.5f} -> {truth[g]:.5f} "
              f"({truth[g] / max(old_truth[g], 1e-300) - 1:+.2%}), bracket {bracket[g, 0]:.5f}-{bracket[g, 1]:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
