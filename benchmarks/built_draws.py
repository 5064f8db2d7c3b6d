"""Bootstrap draws built from 4 evaluations per weight vs evaluated draws (issue 13).

The averaged-regime interval (method.md section 3, "The uncertainty interval") reads the
leakage at ``D`` parametric-bootstrap draws (cells re-read around ``theta + sigma * xi``).
Evaluating every draw costs ``D`` cell-moment passes per scheme; the draws are now built from
two antithetic pairs of evaluations per weight (``assess._draw_moments``: each weight's mean
and variance of the kappa change, then ``kappa + mu + sqrt(v) * zeta_b``, antithetic zeta). This script
measures, per model and scheme, the draws' leakage distribution (median, p10, p90) and the
report's interval under

* ``evaluated 256``: every one of 256 draws evaluated (the reference: the old construction
  with 16x its draws),
* ``evaluated 16``: the old default (every draw evaluated),
* ``built 16``: the new default,

over ``--seeds`` scoring seeds, and the scoring time of the 16-draw variants, in one process:

    python benchmarks/built_draws.py                         # MLP 1e4 / 1e5, CNN; 5 seeds
    python benchmarks/built_draws.py --models mlp1e5 --seeds 3 --json out.json

Errors are in units of the reference draws' half-width (p90 - p10) / 2, and the largest
error of an interval end as a share of the reference interval's width (what a user reads: the
interval also holds the records' standard error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2", "float8_weight_only"]


def build(kind: str):
    import torch
    from assess_speed import train_adam, trained_mlp

    if kind.startswith("mlp"):
        return trained_mlp(kind[3:], 4096)
    from beyond_linear import build as bl_build

    torch.manual_seed(0)
    model, ds, _, loss_fn = bl_build(kind, 2048)
    loader = torch.utils.data.DataLoader(ds, batch_size=256)
    train_adam(model, loader, loss_fn)
    return model, loader, loss_fn


def run(kind: str, seeds: int) -> list[dict]:
    import importlib

    import torch

    A = importlib.import_module("mis_lightning.assess")  # the module (the package exports the function)
    from mis_lightning.config import stage_configs
    from mis_lightning.functional import interval as FI

    captured: list[tuple] = []
    real = FI.leakage_interval

    def spy(value, record_se, n, **kw):
        out = real(value, record_se, n, **kw)
        t = kw["draws"].to(torch.float64)
        q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        captured.append((value, q, (out.lo, out.hi), out.regime))
        return out

    FI.leakage_interval = spy
    model, loader, loss_fn = build(kind)
    d = sum(p.numel() for p in model.parameters())
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    rows = []
    for scheme in SCHEMES:
        res: dict[str, list] = {}
        for label, draws, built in (("evaluated 256", 256, False), ("evaluated 16", 16, False), ("built 16", 16, True)):
            A.BUILT_DRAWS_MIN = 5 if built else 10**9
            for s in range(1 if draws == 256 else seeds):
                captured.clear()
                cfg = dataclasses.replace(sc_cfg, uncertainty_draws=draws, seed=s)
                t0 = time.process_time()
                rep = A.score_schemes(est, model, [scheme], scoring_config=cfg)
                cpu = time.process_time() - t0
                r = rep.schemes[scheme]
                if r.error or not captured:
                    break
                value, q, ends, regime = captured[-1]
                res.setdefault(label, []).append({"q": q, "ends": ends, "cpu": cpu, "regime": regime, "value": value})
        A.BUILT_DRAWS_MIN = 5
        if "evaluated 256" not in res:
            continue
        ref = res["evaluated 256"][0]
        half = max((ref["q"][2] - ref["q"][0]) / 2, 1e-300)
        row = {"model": kind, "d": d, "scheme": scheme, "regime": ref["regime"], "value": ref["value"],
               "ref_q": ref["q"], "ref_ends": ref["ends"], "half": half}
        for label in ("evaluated 16", "built 16"):
            runs = res.get(label, [])
            if not runs:
                continue
            err = [max(abs(r["q"][i] - ref["q"][i]) for i in range(3)) / half for r in runs]
            end_err = [max(abs(r["ends"][i] - ref["ends"][i]) for i in range(2)) / half for r in runs]
            width = max(ref["ends"][1] - ref["ends"][0], 1e-300)
            width_err = [max(abs(r["ends"][i] - ref["ends"][i]) for i in range(2)) / width for r in runs]
            row[label] = {"max_quantile_error": max(err), "mean_quantile_error": statistics.mean(err),
                          "max_end_error": max(end_err), "mean_end_error": statistics.mean(end_err),
                          "max_end_error_of_width": max(width_err),
                          "cpu_s": statistics.median(r["cpu"] for r in runs), "runs": runs}
        rows.append(row)
        e, b = row.get("evaluated 16", {}), row.get("built 16", {})
        print(f"| {kind} ({d:,}) | {scheme} | {ref['regime']} | {half:.3g} | "
              f"{e.get('mean_quantile_error', float('nan')):.2f} / {e.get('max_quantile_error', float('nan')):.2f} | "
              f"{b.get('mean_quantile_error', float('nan')):.2f} / {b.get('max_quantile_error', float('nan')):.2f} | "
              f"{e.get('mean_end_error', float('nan')):.2f} / {b.get('mean_end_error', float('nan')):.2f} | "
              f"{e.get('max_end_error_of_width', float('nan')):.1%} / {b.get('max_end_error_of_width', float('nan')):.1%} | "
              f"{e.get('cpu_s', float('nan')):.2f} / {b.get('cpu_s', float('nan')):.2f} |", flush=True)
    FI.leakage_interval = real
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp1e4", "mlp1e5", "cnn"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print("| model (weights) | scheme | regime | reference half-width | quantile error, evaluated 16: mean / max "
          "| built 16: mean / max | interval-end error, evaluated 16 / built 16 (mean) "
          "| largest end error / interval width, evaluated 16 / built 16 | scoring CPU s, evaluated 16 / built 16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for kind in args.models:
        rows += run(kind, args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
