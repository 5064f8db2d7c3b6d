"""A/B of ``functional.interval.FORM_SEARCH`` on the stored coverage trainings of one setting.

    python benchmarks/interval_form_search_ab.py --settings N [--first A --last B] [--grids G ...] [--out F]
    python benchmarks/interval_form_search_ab.py --settings N --report F [F ...]

Re-trains ``validate.py``'s seeded trainings ``A .. B - 1`` of ``COVERAGE_PLAN[N]`` (the stream
of ``benchmarks/coverage_extend.py``) and scores them with the flag ON; the flag-OFF intervals are
the stored rows of ``docs/figures/coverage_rows.json`` (what the OFF code reproduces). ``--report``
prints per grid the coverage (+- binomial se) OFF -> ON against the row's truth and its bracket's
ends, the misses below / above, and the median width ratio ON / OFF. docs/benchmarks.md, section cov47
(after iv46's candidate-position A/B, not merged).
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

from mis_lightning.functional import interval as I  # noqa: E402
from mis_lightning.groundtruth import compare as C  # noqa: E402
from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402


def cov(iv: np.ndarray, t: float) -> str:
    p = float(np.mean((iv[:, 0] <= t) & (t <= iv[:, 1])))
    return f"{p:.0%}+-{np.sqrt(p * (1 - p) / len(iv)):.0%}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", type=int, required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--last", type=int, default=None)
    ap.add_argument("--grids", nargs="*", default=None, help="grid names (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--off", action="store_true", help="score with the flag OFF (reproduction check)")
    ap.add_argument("--report", type=Path, nargs="*", default=None)
    ap.add_argument("--at", type=float, nargs="*", default=[],
                    help="one further truth per --grids grid (e.g. a bracket end not in the rows)")
    ap.add_argument("--rows", type=Path, default=ROOT / "docs" / "figures" / "coverage_rows.json")
    a = ap.parse_args(argv)
    model, d, n, rho, _, _ = V.COVERAGE_PLAN[a.settings]
    s = GT.make_setting(model, d, n, rho=rho)
    grids = [g for g in V.coverage_grids(s) if a.grids is None or g.name in a.grids]
    rows = {r["grid"]: r for r in json.loads(a.rows.read_text())["rows"] if r["setting"] == s.label()}
    if a.report is not None:
        got: dict[int, dict] = {}
        for f in a.report:
            got.update({t["k"]: t for t in json.loads(f.read_text())["trainings"]})
        ks = sorted(got)
        print(f"{s.label()}: {len(ks)} trainings")
        print("| grid | coverage OFF -> ON | bracket ends OFF -> ON | misses below / above OFF -> ON "
              "| median width ON / OFF | max |")
        print("|---|---|---|---|---|---|")
        for grid in grids:
            r = rows[grid.name]
            if grid.name not in got[ks[0]]["intervals"]:
                continue
            off = np.asarray(r["intervals"])[ks]
            on = np.asarray([got[k]["intervals"][grid.name] for k in ks])
            extra = [a.at[grids.index(grid)]] if len(a.at) == len(grids) else []
            ends = " ; ".join(f"{cov(off, e)} -> {cov(on, e)}" for e in r.get("truth_bracket", []) + extra)
            ratio = (on[:, 1] - on[:, 0]) / (off[:, 1] - off[:, 0])
            t = r["truth"]
            miss = " -> ".join(f"{int(np.sum(iv[:, 1] < t))} / {int(np.sum(iv[:, 0] > t))}" for iv in (off, on))
            print(f"| {grid.name} | {cov(off, t)} -> {cov(on, t)} | {ends or '-'} | {miss} | "
                  f"{np.median(ratio):.3f} | {ratio.max():.3f} |")
        return 0
    I.FORM_SEARCH = not a.off
    last = a.last if a.last is not None else len(rows[grids[0].name]["intervals"])
    out = a.out or Path(f"interval_form_search_ab_{a.settings}_{a.first}.json")
    res = json.loads(out.read_text()) if out.exists() else {"trainings": []}
    done = {t["k"] for t in res["trainings"]}
    rng = np.random.default_rng([7, d, n])
    for k in range(last):
        _, est, mdl, _ = C.train_and_estimate(s, rng, num_records=min(n, 1000))  # advances the stream
        if k < a.first or k in done:
            continue
        t0 = time.process_time()
        rep = C.score(est, mdl, [C.scheme_for(g) for g in grids], uncertainty_draws=16, seed=k, mc_draws=4096)
        res["trainings"].append({"k": k, "cpu_s": time.process_time() - t0,
                                 "intervals": {g.name: list(rep.schemes[C.scheme_for(g).name].interval) for g in grids},
                                 "values": {g.name: float(rep.schemes[C.scheme_for(g).name].leakage) for g in grids}})
        out.write_text(json.dumps(res))
        print(f"training {k}: {time.process_time() - t0:.1f} CPU s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
