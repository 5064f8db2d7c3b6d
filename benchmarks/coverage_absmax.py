"""Coverage of the report's 80% interval for the absmax releases (``rtn_int8/4/2``) alone.

The same 12 seeded trainings per setting as ``benchmarks/validate.py --coverage`` (generator
``[7, d, n]``, ``train_and_estimate``, ``score(..., uncertainty_draws=16, seed=k,
mc_draws=4096)``), the ``rtn_int*`` schemes scored on their own; the truths are the ones stored
in ``docs/figures/coverage_rows.json`` (pooled exact absmax truths for linear ``d = 2, 5``,
LR-test lower bounds for logistic). Prints, per grid, the stored mean plug-in and coverage
next to the current code's; ``--write`` puts the new intervals into coverage_rows.json.
About 30-80 s per setting on one core:

    python benchmarks/coverage_absmax.py --settings linear:2:400 linear:5:1000 logistic:2:1000

``--family torchao`` scores torchao's symmetric per-row grids instead (``intx_weight_only_int*``:
``scale = m / (qmax + 1/2)``, ``ground_truth.TorchaoSymmetricGrid``), whose truths are not in
coverage_rows.json: give them with ``--truth`` (``ground_truth.exact_truth_ols``):

    python benchmarks/coverage_absmax.py --settings linear:5:1000 --family torchao --bits 4 2 \
        --truth torchao_int4=0.0XXXX torchao_int2=0.0XXXX
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning.groundtruth import compare as C  # noqa: E402
from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402

ROWS = ROOT / "docs" / "figures" / "coverage_rows.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["linear:2:400", "linear:5:1000", "logistic:2:1000"],
                    help="model:d:n (rho 0.5 for linear, 0 for logistic, as COVERAGE_PLAN)")
    ap.add_argument("--trainings", type=int, default=12)
    ap.add_argument("--write", action="store_true", help="store the new rows in coverage_rows.json")
    ap.add_argument("--family", choices=["rtn", "torchao"], default="rtn")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    ap.add_argument("--truth", nargs="*", default=[], help="grid=value truths (torchao grids)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    saved = json.loads(ROWS.read_text())
    for spec in args.settings:
        model, d, n = spec.split(":")
        d, n = int(d), int(n)
        s = GT.make_setting(model, d, n, rho=0.5 if model == "linear" else 0.0)
        kind = GT.AbsmaxGrid if args.family == "rtn" else GT.TorchaoSymmetricGrid
        grids = [kind(f"{args.family}_int{b}", b) for b in args.bits]
        given = {k: float(v) for k, v in (t.split("=") for t in args.truth)}
        schemes = [C.scheme_for(g) for g in grids]
        rng = np.random.default_rng([7, d, n])
        t0 = time.time()
        vals, ivs = [], []
        for k in range(args.trainings):
            _, est, mdl, _ = C.train_and_estimate(s, rng, num_records=min(n, 1000))
            if args.family == "torchao":  # torchao's configs take float32 weights (as groundtruth/ptq.py)
                mdl = mdl.float()
            rep = C.score(est, mdl, schemes, uncertainty_draws=16, seed=k, mc_draws=4096)
            vals.append([rep.schemes[sc.name].leakage for sc in schemes])
            ivs.append([list(rep.schemes[sc.name].interval) for sc in schemes])
        for j, g in enumerate(grids):
            row = next((r for r in saved["rows"] if r["setting"] == s.label() and r["grid"] == g.name), None)
            t = given.get(g.name, row["truth"] if row is not None else float("nan"))
            iv = [v[j] for v in ivs]
            cov = sum(a <= t <= b for a, b in iv) / len(iv)
            width = statistics.median(b - a for a, b in iv)
            stored = ("" if row is None else f" | stored mean {np.mean(row['values']):.5f} "
                      f"coverage {row['coverage']:.0%} width {row['width']:.5f}")
            print(f"{s.label()} {g.name}: truth {t:.5f}{stored} | now mean {np.mean([v[j] for v in vals]):.5f} "
                  f"(range {min(v[j] for v in vals):.5f}-{max(v[j] for v in vals):.5f}) coverage {cov:.0%} "
                  f"width {width:.5f}", flush=True)
            if args.write and row is not None:
                row.update(intervals=iv, values=[v[j] for v in vals], coverage=cov, width=width)
        print(f"  {s.label()}: {time.time() - t0:.0f} s", flush=True)
    if args.write:
        ROWS.write_text(json.dumps(saved, indent=0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
