"""Rescore the stored coverage trainings of one ``validate.py`` setting against its cached truth.

    python benchmarks/coverage_rescore.py --settings N [--old-targets Z] [--old-oracle R] [--write]

The report's intervals do not depend on the truth, so the 12 seeded trainings of
``validate.py --coverage --trainings 12 --settings N`` stored in ``docs/figures/coverage_rows.json``
(their intervals and plug-in values) are scored against the truth cached under
``validate.coverage_key`` of ``COVERAGE_PLAN[N]`` (``truth_linear_exact.json`` for the linear
settings, ``truth_logistic_coupled.json`` for the logistic one), and against an earlier truth of
the same setting for comparison: the key with ``--old-targets`` targets (default: the plan's) and
the control variate's mean over ``--old-oracle`` records (default 64,000, what every coverage
truth used before cov45 / cov45b). Per grid: both truths, the new truth's interval (its 80%
interval over targets, or the logistic bracket), coverage of the old and the new truth (and of
the bracket's ends), the misses (how far below / above the interval the truth lay, % of the
truth), the plug-ins' mean and the first-order value with the true parameters (``E c``, the
control variate's mean over ``validate.ORACLE_RECORDS_COVERAGE`` records, read from the cache's
``"<key> E c"`` or computed: ~2 CPU min for 19 grids, seconds in ``d = 1``) relative to the
truth. ``--write`` stores the new truth and coverage in the rows (``truth_ci`` / ``truth_bracket``
where cached). docs/benchmarks.md, sections cov45 and cov45b.
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

FIGS = ROOT / "docs" / "figures"


def old_key_of(key: str, Z: int, old_targets: int, old_oracle: int) -> str:
    """The cache key of the same setting's truth on ``old_targets`` targets and ``old_oracle`` records."""
    return key.replace(f"Z={Z} ", f"Z={old_targets} ").replace(f"oracle={V.ORACLE_RECORDS_COVERAGE}",
                                                                f"oracle={old_oracle}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", type=int, required=True, help="index into validate.COVERAGE_PLAN")
    ap.add_argument("--cache", type=Path, default=None, help="truth cache (default: the setting's file)")
    ap.add_argument("--rows", type=Path, default=FIGS / "coverage_rows.json")
    ap.add_argument("--old-targets", type=int, default=None, help="targets of the truth to compare with")
    ap.add_argument("--old-oracle", type=int, default=64_000, help="records behind that truth's E c")
    ap.add_argument("--write", action="store_true", help="store the new truth and coverage in the rows")
    a = ap.parse_args(argv)
    if not 0 <= a.settings < len(V.COVERAGE_PLAN):
        raise SystemExit(f"--settings {a.settings}: COVERAGE_PLAN has {len(V.COVERAGE_PLAN)} settings")
    model, d, n, rho, Z, M = V.COVERAGE_PLAN[a.settings]
    s = GT.make_setting(model, d, n, rho=rho)
    grids = V.coverage_grids(s)
    cache_path = a.cache or FIGS / ("truth_logistic_coupled.json" if model == "logistic" else "truth_linear_exact.json")
    cache = json.loads(cache_path.read_text())
    key = V.coverage_key(s, Z, M)
    old_key = old_key_of(key, Z, Z if a.old_targets is None else a.old_targets, a.old_oracle)
    for k in (key, old_key):
        if k not in cache:
            raise SystemExit(f"{cache_path} holds no {k!r} (run validate.py --coverage --settings {a.settings} "
                             "--truth-cache ...)")
    truth, old = np.asarray(cache[key]), np.asarray(cache[old_key])
    bracket = np.asarray(cache[key + " bracket"]) if key + " bracket" in cache else None
    ci = np.asarray(cache[key + " ci"]) if key + " ci" in cache else None
    if key + " E c" in cache:  # stored with the truth
        ec, ec_se = (np.asarray(v) for v in cache[key + " E c"])
    else:
        ec, ec_se = GT.oracle_mean(s, grids, V.ORACLE_RECORDS_COVERAGE, 0)
    saved = json.loads(a.rows.read_text())
    rows = {r["grid"]: r for r in saved["rows"] if r["setting"] == s.label()}
    if not rows:
        raise SystemExit(f"{a.rows} holds no rows of {s.label()!r}")
    print(f"{s.label()}: {key!r} against {old_key!r}; {len(next(iter(rows.values()))['intervals'])} trainings")
    print("| grid | old truth | truth [interval] | coverage old -> new | bracket ends | misses (truth vs interval, % of "
          "truth) | plug-ins / truth | E c / truth |")
    print("|---|---|---|---|---|---|---|---|")
    for g, grid in enumerate(grids):
        r = rows[grid.name]
        iv = np.asarray(r["intervals"])
        t = truth[g]
        cov_new = float(np.mean((iv[:, 0] <= t) & (t <= iv[:, 1])))
        cov_old = float(np.mean((iv[:, 0] <= old[g]) & (old[g] <= iv[:, 1])))
        band = bracket if bracket is not None else ci
        ends = None if bracket is None else [float(np.mean((iv[:, 0] <= e) & (e <= iv[:, 1]))) for e in bracket[g]]
        miss = [f"{(t - hi) / t:+.2%}" if t > hi else f"{(t - lo) / t:+.2%}"
                for lo, hi in iv if not lo <= t <= hi]
        vals = np.asarray(r["values"])
        print(f"| {grid.name} | {old[g]:.6f} | {t:.6f}" + ("" if band is None else f" [{band[g, 0]:.6f}, {band[g, 1]:.6f}]")
              + f" | {cov_old:.0%} -> {cov_new:.0%} | " + ("-" if ends is None else f"{ends[0]:.0%} / {ends[1]:.0%}")
              + f" | {', '.join(miss) or '-'} | {vals.mean() / t - 1:+.2%} | {ec[g] / t - 1:+.2%} (se {ec_se[g] / t:.2%}) |")
        if a.write:
            r.update(truth=float(t), coverage=cov_new)
            if ci is not None:
                r["truth_ci"] = ci[g].tolist()
            if bracket is not None:
                r.update(truth_bracket=bracket[g].tolist(), coverage_of_bracket_ends=ends)
    if a.write:
        saved["note"] = saved["note"] + (f" cov45b: the {s.label()} rows rescored against {key!r} "
                                          f"(benchmarks/coverage_rescore.py --settings {a.settings} --write).")
        a.rows.write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
