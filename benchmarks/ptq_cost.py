"""Cost of scoring the calibrated / optimised PTQ schemes against one round-to-nearest scheme.

For each model (a ChEMBL-sized MLP probe, 12 -> 4 -> 1 with n = 711 records, and a wider
64 -> 32 -> 8 MLP with n = 2,000), the estimate is computed once, then every scheme is scored
alone with ``score_schemes(est, model, [scheme], calibration_data=loader)`` and timed:
quantization, calibration, the Monte Carlo re-quantization (``REQUANT_DRAWS`` runs of the
scheme, calibration included) for the non-nearest ones, and the leakage. The ratio is to
``int8_weight_only`` (torchao, round to nearest, analytic cell moments). The Monte Carlo
standard error of each non-nearest scheme's ``d_eff`` (jackknife over the draws) is read
from its note.

    python benchmarks/ptq_cost.py                   # both models, 1 thread
    python benchmarks/ptq_cost.py --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "awq_int8_weight_only",
           "awq_int8_dynamic_activation_int8_weight", "smooth_quant_int8_dynamic_activation_int8_weight",
           "smooth_quant_int8_weight_only", "intx_weight_only_int4_hqq", "intx_weight_only_int2_hqq",
           "gptq_int8_weight_only"]
MODELS = {"chembl_probe": (12, 4, 1, 711), "mlp_64_32_8": (64, 32, 8, 2000)}


def _setup(name: str):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    f, h, o, n = MODELS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, f, generator=g) * torch.linspace(0.3, 2.0, f)
    y = torch.tanh(x @ torch.randn(f, o, generator=g) / f ** 0.5) + 0.3 * torch.randn(n, o, generator=g)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(f, h), nn.Tanh(), nn.Linear(h, o))
    opt = torch.optim.LBFGS(m.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).sum(-1).mean() + 1e-3 * sum((p ** 2).sum() for p in m.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return m, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=1, help="timings per scheme (the minimum is kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.config import EstimationConfig, ScoringConfig
    from mis_lightning.quantization.requantize import REQUANT_DRAWS

    torch.set_num_threads(args.threads)
    out = {}
    for name in args.models.split(","):
        model, loader = _setup(name)
        mse = lambda o, t: ((o - t) ** 2).sum(-1)  # noqa: E731
        est = run_estimation(model, loader, mse, EstimationConfig(num_records=128, weight_decay=1e-3))
        cfg = ScoringConfig(uncertainty_draws=0, strict=False)
        rows = {}
        score_schemes(est, model, SCHEMES[:2], scoring_config=cfg)  # warm-up (first-call overheads)
        for s in SCHEMES:
            best, rep = float("inf"), None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                rep = score_schemes(est, model, [s], scoring_config=cfg, calibration_data=loader)
                best = min(best, time.perf_counter() - t0)
            r = rep.schemes[s]
            se = next((m for m in (re.search(r"codes only: ([\d.e+-]+) \+- ([\d.e+-]+)", t) for t in r.notes) if m), None)
            rows[s] = {"seconds": best, "error": r.error, "leakage": r.leakage, "d_eff": r.d_eff,
                       "mc_codes_only_d_eff": float(se.group(1)) if se else None,
                       "mc_d_eff_se": float(se.group(2)) if se else None}
        ref = rows["int8_weight_only"]["seconds"]
        print(f"\n{name}: d = {est.d}, n = {est.n}, Monte Carlo draws {REQUANT_DRAWS}, "
              f"{args.threads} thread(s); reference int8_weight_only {ref:.3f} s")
        print("| scheme | seconds | x int8_weight_only | leakage | d_eff | codes-only MC d_eff (s.e.) |")
        print("|---|---|---|---|---|---|")
        for s, v in rows.items():
            if v["error"]:
                print(f"| `{s}` | - | - | error: {v['error'][:60]}... | - | - |")
                continue
            se = (f"{v['mc_codes_only_d_eff']:.2f} ({v['mc_d_eff_se']:.2g})" if v["mc_d_eff_se"] is not None
                  else "- (analytic)")
            print(f"| `{s}` | {v['seconds']:.3f} | {v['seconds'] / ref:.1f} | {v['leakage']:.4f} | "
                  f"{v['d_eff']:.2f} | {se} |")
        out[name] = {"d": est.d, "n": est.n, "draws": REQUANT_DRAWS, "schemes": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
