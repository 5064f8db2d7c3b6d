"""Rescore the logistic coverage rows against the cached coupled truth of ``validate.py``'s plan.

    python benchmarks/logistic_coverage_rescore.py [--write]

The report's intervals do not depend on the truth, so the 12 seeded trainings of
``validate.py --coverage --trainings 12 --settings 3`` stored in ``docs/figures/coverage_rows.json``
(their intervals and plug-in values) are scored against the truth cached under
``validate.coverage_key`` of ``COVERAGE_PLAN[3]`` (``TRUTH_TARGETS_LOGISTIC`` targets, ``M =
10^6``), and against the previous truth (``--old-targets``, 32) for comparison. Per grid: both
truths, the new bracket and its estimates' own 80% intervals over targets, coverage of the truth
and of the bracket's ends, the misses (how far below / above the interval the truth lay), the
plug-ins' mean and the first-order value with the true parameters (``E c``, the control variate's
mean over ``validate.ORACLE_RECORDS_LOGISTIC`` records) relative to the truth: the first-order
shortfall. ``--write`` stores the new truth, coverage and bracket in the rows. ~2 CPU min (``E c``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import validate as V  # noqa: E402

from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "docs" / "figures" / "truth_logistic_coupled.json")
    ap.add_argument("--rows", type=Path, default=ROOT / "docs" / "figures" / "coverage_rows.json")
    ap.add_argument("--old-targets", type=int, default=32, help="targets of the truth to compare with")
    ap.add_argument("--old-oracle", type=int, default=64_000, help="records behind that truth's E c")
    ap.add_argument("--write", action="store_true", help="store the new truth and coverage in the rows")
    a = ap.parse_args(argv)
    model, d, n, rho, Z, M = V.COVERAGE_PLAN[3]
    s = GT.make_setting(model, d, n, rho=rho)
    grids = V.coverage_grids(s)
    cache = json.loads(a.cache.read_text())
    key = V.coverage_key(s, Z, M)
    old_key = key.replace(f"Z={Z} ", f"Z={a.old_targets} ").replace(f"oracle={V.ORACLE_RECORDS_LOGISTIC}",
                                                                    f"oracle={a.old_oracle}")
    for k in (key, old_key):
        if k not in cache:
            raise SystemExit(f"{a.cache} holds no {k!r} (run validate.py --coverage --settings 3 --truth-cache ...)")
    truth, bracket = np.asarray(cache[key]), np.asarray(cache[key + " bracket"])
    old = np.asarray(cache[old_key])
    est_ci = cache.get(key + " estimates_ci")
    if key + " E c" in cache:  # stored with the truth
        ec, ec_se = (np.asarray(v) for v in cache[key + " E c"])
    else:
        ec, ec_se = GT.oracle_mean(s, grids, V.ORACLE_RECORDS_LOGISTIC, 0)
    saved = json.loads(a.rows.read_text())
    rows = {r["grid"]: r for r in saved["rows"] if r["setting"] == s.label()}
    print(f"{s.label()}: {key!r} against {old_key!r}; {len(next(iter(rows.values()))['intervals'])} trainings")
    print(f"| grid | truth {a.old_targets} | truth {Z} [bracket] | test / plug 80% over targets | coverage 32 -> 128 | "
          "bracket ends | misses (truth vs interval, % of truth) | plug-ins / truth | E c / truth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for g, grid in enumerate(grids):
        r = rows[grid.name]
        iv = np.asarray(r["intervals"])
        t = truth[g]
        cov_new = float(np.mean((iv[:, 0] <= t) & (t <= iv[:, 1])))
        cov_old = float(np.mean((iv[:, 0] <= old[g]) & (old[g] <= iv[:, 1])))
        ends = [float(np.mean((iv[:, 0] <= e) & (e <= iv[:, 1]))) for e in bracket[g]]
        miss = [f"{(t - hi) / t:+.2%}" if t > hi else f"{(t - lo) / t:+.2%}"
                for lo, hi in iv if not lo <= t <= hi]
        ci = ""
        if est_ci is not None:
            ci = " / ".join(f"{est_ci[e][g][0]:.5f}-{est_ci[e][g][1]:.5f}" for e in ("test", "plug"))
        vals = np.asarray(r["values"])
        print(f"| {grid.name} | {old[g]:.5f} | {t:.5f} [{bracket[g, 0]:.5f}, {bracket[g, 1]:.5f}] | {ci} | "
              f"{cov_old:.0%} -> {cov_new:.0%} | {ends[0]:.0%} / {ends[1]:.0%} | {', '.join(miss) or '-'} | "
              f"{vals.mean() / t - 1:+.2%} | {ec[g] / t - 1:+.2%} (se {ec_se[g] / t:.2%}) |")
        if a.write:
            r.update(truth=float(t), coverage=cov_new, truth_bracket=bracket[g].tolist(), coverage_of_bracket_ends=ends,
                     truth_targets=Z)
    if a.write:
        saved["note"] = saved["note"] + (f" cov45: the logistic rows rescored against the coupled truth on {Z} targets "
                                          "(benchmarks/logistic_coverage_rescore.py --write).")
        a.rows.write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
