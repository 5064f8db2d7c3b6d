"""Add seeded trainings to the stored coverage rows of one ``validate.py`` setting.

    python benchmarks/coverage_extend.py --settings N --trainings K [--out FILE] [--write]

``validate.py --coverage --trainings T --settings N`` trains model ``k`` (``k < T``) from one
generator seeded ``[7, d, n]`` and scores it with ``seed=k``; the same stream continued gives
trainings ``T .. K - 1``, so the rows of ``docs/figures/coverage_rows.json`` (its first ``T``
trainings) are extended, not replaced: the first ``T`` models are re-trained (cheap) only to advance
the generator and are not re-scored. Each new training's intervals and plug-ins are checkpointed
to ``--out`` (default ``coverage_extend_<N>.json`` in the working directory) after it finishes,
and a rerun resumes from there; ``--write`` appends them to the rows (coverage recomputed against
each row's stored truth). ~14 CPU s a training in ``logistic d=2 n=1000`` (19 grids).
docs/benchmarks.md, section cov46.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import validate as V  # noqa: E402

from mis_lightning.groundtruth import compare as C  # noqa: E402
from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402


def table(rows: dict, grids: list, new: list[dict]) -> None:
    """Coverage per grid over the stored and new trainings, with its binomial standard error,
    against the row's truth and its bracket's ends (where it has one); the plug-ins' mean
    relative to the truth, and the misses' sides."""
    print("| grid | trainings | truth | coverage +- se | at the bracket's ends | misses below / above "
          "| plug-ins / truth |")
    print("|---|---|---|---|---|---|---|")
    for g, grid in enumerate(grids):
        r = rows[grid.name]
        iv = np.asarray(r["intervals"] + [t["intervals"][g] for t in new])
        vals = np.asarray(r["values"] + [t["values"][g] for t in new])
        t = r["truth"]
        hit = (iv[:, 0] <= t) & (t <= iv[:, 1])
        p, k = hit.mean(), len(hit)
        ends = "-" if "truth_bracket" not in r else " / ".join(
            f"{np.mean((iv[:, 0] <= e) & (e <= iv[:, 1])):.0%}" for e in r["truth_bracket"])
        print(f"| {grid.name} | {k} | {t:.6f} | {p:.0%} +- {np.sqrt(p * (1 - p) / k):.0%} | {ends} | "
              f"{int(np.sum(iv[:, 1] < t))} / {int(np.sum(iv[:, 0] > t))} | {vals.mean() / t - 1:+.2%} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", type=int, required=True, help="index into validate.COVERAGE_PLAN")
    ap.add_argument("--trainings", type=int, required=True, help="total trainings wanted (stored ones included)")
    ap.add_argument("--rows", type=Path, default=ROOT / "docs" / "figures" / "coverage_rows.json")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint of the new trainings")
    ap.add_argument("--write", action="store_true", help="append the new trainings to the rows")
    ap.add_argument("--report", action="store_true", help="train nothing: the table of the checkpoint")
    a = ap.parse_args(argv)
    if not 0 <= a.settings < len(V.COVERAGE_PLAN):
        raise SystemExit(f"--settings {a.settings}: COVERAGE_PLAN has {len(V.COVERAGE_PLAN)} settings")
    model, d, n, rho, _, _ = V.COVERAGE_PLAN[a.settings]
    s = GT.make_setting(model, d, n, rho=rho)
    grids = V.coverage_grids(s)
    saved = json.loads(a.rows.read_text())
    rows = {r["grid"]: r for r in saved["rows"] if r["setting"] == s.label()}
    if set(rows) != {g.name for g in grids}:
        raise SystemExit(f"{a.rows}: the rows of {s.label()!r} are not the grids of validate.coverage_grids")
    stored = len(rows[grids[0].name]["intervals"])
    out = a.out or Path(f"coverage_extend_{a.settings}.json")
    new = json.loads(out.read_text()) if out.exists() else {"setting": s.label(), "first": stored, "trainings": []}
    if new["setting"] != s.label() or new["first"] != stored:
        raise SystemExit(f"{out} holds trainings of another setting or another stored count")
    rng = np.random.default_rng([7, d, n])
    for k in range(0 if a.report else a.trainings):
        _, est, mdl, _ = C.train_and_estimate(s, rng, num_records=min(n, 1000))  # advances the stream
        if k < stored + len(new["trainings"]):
            continue
        t0 = time.process_time()
        rep = C.score(est, mdl, [C.scheme_for(g) for g in grids], uncertainty_draws=16, seed=k, mc_draws=4096)
        res = [rep.schemes[C.scheme_for(g).name] for g in grids]
        new["trainings"].append({"k": k, "intervals": [list(r.interval) for r in res],
                                 "values": [float(r.leakage) for r in res],
                                 "regimes": [r.interval_regime for r in res]})
        out.write_text(json.dumps(new))
        print(f"training {k}: {time.process_time() - t0:.1f} CPU s", flush=True)
    table(rows, grids, new["trainings"])
    if a.write:
        for g, grid in enumerate(grids):
            r = rows[grid.name]
            r["intervals"] += [t["intervals"][g] for t in new["trainings"]]
            r["values"] += [t["values"][g] for t in new["trainings"]]
            iv = np.asarray(r["intervals"])
            r["coverage"] = float(np.mean((iv[:, 0] <= r["truth"]) & (r["truth"] <= iv[:, 1])))
            r["width"] = float(np.median(iv[:, 1] - iv[:, 0]))
            if "truth_bracket" in r:
                r["coverage_of_bracket_ends"] = [float(np.mean((iv[:, 0] <= e) & (e <= iv[:, 1])))
                                                 for e in r["truth_bracket"]]
        total = stored + len(new["trainings"])
        saved["note"] += (f" cov46: {len(new['trainings'])} trainings added to the {s.label()} rows, {total} in all "
                          f"(benchmarks/coverage_extend.py --settings {a.settings} --trainings {total} --write).")
        a.rows.write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
