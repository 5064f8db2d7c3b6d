"""rv54c: healthy models L-BFGS-polished to the minimum (weight decay 1e-3) at d/n 0.20-0.95 (every row "*"): the
near-identity bias clause of the verdict (report.near_identity_bias). docs/benchmarks.md, "rv54c"."""
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, "benchmarks")
import ux54e_off_minimum_checks as u

from mis_lightning.report import near_identity_bias

torch.set_num_threads(1)
for n, hidden, seed in [(400, 8, 0), (200, 8, 1), (120, 8, 2), (250, 16, 3), (90, 8, 4), (95, 8, 5), (170, 16, 6), (100, 8, 7)]:
    g = torch.Generator().manual_seed(7 + seed)
    X = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = torch.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] - 0.3 * X[:, 3] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    X, y = X.float(), y.float()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 1), nn.Flatten(0))
    u._polish(model, X, y, rounds=3, max_iter=3000, history_size=50)
    rep = u._assess(model, DataLoader(TensorDataset(X, y), batch_size=512), ["int8_weight_only", "bf16", "intx_weight_only_int4"], num_records=n)
    rows, dg = rep.rows(), rep.diagnostics
    print(f"n={n} d={rows[0]['d']} d/n={rows[0]['d']/n:.2f} base {rep.baseline_leakage:.4f} mean lev {dg.get('mean_leverage'):.3f} notmin {dg.get('not_at_minimum')}",
          [(r['scheme'], round(r['leakage'], 4), round(r['d_eff'], 1), r.get('indicative')) for r in rows],
          "bias:", None if (b := near_identity_bias(rows)) is None else (b[0]['scheme'], round(b[1], 4)), flush=True)
    if "--first-order" in sys.argv:
        for r in (rep, u._assess(model, DataLoader(TensorDataset(X, y), batch_size=512), ["int8_weight_only", "bf16"],
                                 num_records=n, leverage_correction=False)):
            print(f"  leverage correction {r.diagnostics.get('leverage_correction')}: base {r.baseline_leakage:.4f}",
                  *(f"{k} {s.leakage:.4f} ({100 * (1 - s.leakage / r.baseline_leakage):.1f}% below)"
                    for k, s in r.schemes.items() if k != "intx_weight_only_int4"), flush=True)

