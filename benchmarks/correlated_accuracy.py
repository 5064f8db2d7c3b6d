"""The correlated headline's forms against exact box-conditional means (docs/method.md,
"Correlated coordinates").

    python benchmarks/correlated_accuracy.py [--records 4] [--boxes 4000] [--seed 5]

For d in {2, 5, 10}, equicorrelated R with rho in {0, 0.6, 0.9}, uniform grids of step
0.25..8 sd at random offsets and random records w ~ N(0, R): the exact first-order quantity
E_U |w' R^-1 m(U)| (groundtruth/correlated_reference.py, GHK box means) against the Gaussian
channel form and the copula Monte Carlo form of functional/correlated.py. Prints the ratio
form / exact per setting and the range per step class. ``--factor``: also the forms through a factor
``R = L L'`` (``SandwichFactor``: Cholesky's ``L``, left inverse ``L^-T``; the path of the exact
estimator's own factor, rc46), against the same exact values (acc46).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mis_lightning import functional as F  # noqa: E402
from mis_lightning.functional.correlated import Correlation, SandwichFactor, correlated_mc_mean_abs  # noqa: E402
from mis_lightning.groundtruth.correlated_reference import exact_mean_abs  # noqa: E402

SQ = math.sqrt(2 / math.pi)


def grid_stats(step: torch.Tensor, offset: torch.Tensor, half: int = 40) -> F.CellStatistics:
    k = torch.arange(-half, half + 1, dtype=torch.float64)
    edges = (k.unsqueeze(0) + offset.unsqueeze(1)) * step.unsqueeze(1)
    d = step.numel()
    return F.cell_statistics(torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64), edges)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=4)
    ap.add_argument("--boxes", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--factor", action="store_true", help="also the forms through a Cholesky SandwichFactor")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(a.seed)
    ranges: dict[tuple[str, float], list[float]] = {}
    print("d rho step | gaussian/exact | mc/exact | exact se (rel)")
    for d in (2, 5, 10):
        for rho in (0.0, 0.6, 0.9):
            R = (1 - rho) * torch.eye(d, dtype=torch.float64) + rho * torch.ones(d, d, dtype=torch.float64)
            for step in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
                h = torch.full((d,), step, dtype=torch.float64)
                off = torch.rand(d, dtype=torch.float64, generator=g)
                w = torch.randn(a.records, d, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(R).T
                exact, se = exact_mean_abs(R, w, h, off, num_boxes=a.boxes)
                st = grid_stats(h, off)
                gauss = SQ * Correlation(full=R).quadratic(w, st.kappa).sqrt()
                mc, _ = correlated_mc_mean_abs(Correlation(full=R), w, st.kappa, torch.arange(d), st, 40000,
                                               torch.Generator().manual_seed(1))
                mc = torch.minimum(mc, SQ * Correlation(full=R).quadratic(w).sqrt())
                rg, rm = gauss / exact, mc / exact
                cls = "<=1" if step <= 1 else ("2" if step == 2 else f"4-8 rho={rho}")
                ranges.setdefault(("gauss", cls), []).extend(rg.tolist())
                ranges.setdefault(("mc", cls), []).extend(rm.tolist())
                if a.factor:
                    L = torch.linalg.cholesky(R)
                    cf = Correlation(full=R, sandwich=SandwichFactor(torch.linalg.eigvalsh(R), L,
                                                                     torch.linalg.inv(L).T.contiguous()))
                    gf = SQ * cf.quadratic(w, st.kappa).sqrt()
                    mf, _ = correlated_mc_mean_abs(cf, w, st.kappa, torch.arange(d), st, 40000,
                                                   torch.Generator().manual_seed(1))
                    mf = torch.minimum(mf, SQ * cf.quadratic(w).sqrt())
                    ranges.setdefault(("gauss factor", cls), []).extend((gf / exact).tolist())
                    ranges.setdefault(("mc factor", cls), []).extend((mf / exact).tolist())
                    ranges.setdefault(("gauss factor / gauss", cls), []).extend((gf / gauss).tolist())
                print(d, rho, step, "|", " ".join(f"{x:.3f}" for x in rg.tolist()), "|",
                      " ".join(f"{x:.3f}" for x in rm.tolist()), "|", f"{float((se / exact).max()):.3f}", flush=True)
    print("\nrange of form / exact per step class:")
    for (form, cls), v in sorted(ranges.items()):
        print(f"  {form:5s} step {cls:12s}: {min(v):.6g} .. {max(v):.6g}")


if __name__ == "__main__":
    main()
