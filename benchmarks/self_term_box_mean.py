"""The box-mean (GHK) form with each stored record's HC2 self term carried by the Gaussian
channel's ratio, against the same form run with each record's own matrix ``R_bar - beta x x'``
built explicitly, and against the shared matrix alone (lo29; docs/validation.md, "The HC2 term with R < n stored records", "The
Monte Carlo and box-mean forms"; ``tests/test_leverage.py::
test_box_mean_form_carries_each_records_self_term`` checks the same at a smaller size).

A heteroscedastic, high-leverage OLS design (rows scaled by ``chi2_3``, error sd ``0.3 + |x_1|``),
d = 40, n = 400, R = 40 stored records (d / R = 1: a large self term), 8 coarse weights on 2-sd
grids at random offsets, the others at kappa 0.8, 4,096 outer draws. Prints the mean over the
records of the three forms and the largest per-record ratio. Runtime: ~2 min CPU.

    python benchmarks/self_term_box_mean.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mis_lightning.estimation.estimate import sandwich_compute  # noqa: E402
from mis_lightning.functional.cells import cell_moments  # noqa: E402
from mis_lightning.functional.correlated import Correlation, exact_box_mean_abs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--d", type=int, default=40)
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--coarse", type=int, default=8, help="coarse weights (on 2-sd grids)")
    args = ap.parse_args(argv)
    n, d, R, c = args.n, args.d, args.records, args.coarse
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = X * (torch.distributions.Chi2(3.0).sample((n, 1)).double() / 3).rsqrt()
    e = torch.randn(n, generator=g, dtype=torch.float64) * (0.3 + X[:, 0].abs())
    y = X @ torch.ones(d, dtype=torch.float64) / d**.5 + e
    b = torch.linalg.lstsq(X, y).solution
    G = X * (X @ b - y)[:, None]
    C = G - G.mean(0)
    V = C.T @ C / n
    H = X.T @ X / n
    J, L = X[:, None, :], torch.ones(n, 1, 1, dtype=torch.float64)
    idx = torch.randperm(n, generator=g)[:R]
    rec = {}
    _, w, _, corr = sandwich_compute(V, H, torch.zeros(d, dtype=torch.float64), C[idx], n, 1e-10, {}, jacobians=J[idx],
                                     loss_hessians=L[idx], correct_leverage=True, records=rec)
    x, beta = rec["self_term"], rec["self_weight"]
    print("beta range", float(beta.min()), float(beta.max()))
    kappa = torch.ones(d, dtype=torch.float64)
    ci = torch.arange(c)
    # coarse cells: step 2 sd grid at random offsets
    off = torch.rand(c, generator=g, dtype=torch.float64)
    alpha = torch.stack([(torch.arange(-6, 7, dtype=torch.float64) - off[j]) * 2.0 for j in range(c)])
    kappa[ci] = cell_moments(torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64), alpha).kappa
    kappa[c:] = 0.8
    carried, _ = exact_box_mean_abs(Correlation(full=corr, self_term=x, self_weight=beta), w, kappa, ci, alpha,
                                    outer_draws=4096, generator=torch.Generator().manual_seed(1))
    shared, _ = exact_box_mean_abs(Correlation(full=corr), w, kappa, ci, alpha, outer_draws=4096,
                                   generator=torch.Generator().manual_seed(1))
    own = torch.empty(R, dtype=torch.float64)
    for r in range(R):
        Ri = corr - beta[r] * torch.outer(x[r], x[r])
        own[r] = exact_box_mean_abs(Correlation(full=Ri), w[r:r + 1], kappa, ci, alpha, outer_draws=4096,
                                    generator=torch.Generator().manual_seed(1))[0][0]
    print(f"box form, mean over {R} records: shared {float(shared.mean()):.5f}  ratio-carried {float(carried.mean()):.5f}  "
          f"explicit own matrix {float(own.mean()):.5f}  (carried/explicit - 1: {float(carried.mean() / own.mean() - 1):+.4f}, "
          f"shared/explicit - 1: {float(shared.mean() / own.mean() - 1):+.4f}); per record |carried/own - 1| max "
          f"{float((carried / own - 1).abs().max()):.4f}")

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
