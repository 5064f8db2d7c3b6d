"""The full correlated form through the exact estimator's own factor against R's own eigenspace
(rc46; docs/benchmarks.md, "rc46"; method.md section 3, "Correlated coordinates").

On pl44's three models (``benchmarks/pl44_planner_bruteforce.py``): the directions each rule keeps
(``RCOND`` on ``R = corr(H^-1 V H^-1)``, on the gradient covariance's correlation), the mean
unquantized quadratic ``w'R^+w`` of each form against the estimator's ``g'V^+g`` (the unquantized
figure), and a few plans' leakage scored both ways on one estimate (``Estimate.correlation_factor``
left out for R's eigenspace).

    python benchmarks/rc46_sandwich_factor.py            # mlp, clf, frozen; about 30 CPU s

Runtime (1 thread): about 30 CPU s.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pl44_planner_bruteforce as B  # noqa: E402

from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.functional.correlated import RCOND, Correlation  # noqa: E402
from mis_lightning.quantization.mixed import MixedPrecisionScheme  # noqa: E402

PLANS = {"mlp": ["222", "444", "888"], "clf": ["4448", "2248", "2224"], "frozen": ["844", "334", "324"]}


def main() -> None:
    torch.set_num_threads(1)
    for kind, plans in PLANS.items():
        model, tr, va, lossf, _ = B.build(kind)
        est = run_estimation(model, tr, lossf, EstimationConfig(weight_decay=B.WD))
        f = est.correlation_factor
        w, m2 = est.influence.to(torch.float64), est.mahalanobis.to(torch.float64).square()
        ev = torch.linalg.eigvalsh(est.correlation.to(torch.float64))
        q_r = Correlation(full=est.correlation).quadratic(w)
        q_f = Correlation(full=est.correlation, sandwich=f).quadratic(w)
        print(f"## {kind}: d = {est.d}, n = {est.n}; directions kept at RCOND = {RCOND:g}: R {int((ev > RCOND * ev[-1]).sum())}, "
              f"V {int(f.keep(RCOND).sum())}; mean g'V+g {float(m2.mean()):.4g}, w'R+w {float(q_r.mean()):.4g} "
              f"({int((q_r > m2 * (1 + 1e-6)).sum())} of {w.shape[0]} records above it), factor {float(q_f.mean()):.4g} "
              f"(max rel. diff. {float(((q_f - m2).abs() / m2).max()):.1e})")
        layers = [k for k in est.offsets if k.endswith("weight")] if kind != "frozen" else ["0.weight", "2.weight", "4.weight"]
        schemes = [MixedPrecisionScheme(dict(zip(layers, [f"rtn_int{c}" for c in p])), name=p) for p in plans]
        row = {}
        for name, e in (("R's eigenspace", dataclasses.replace(est, correlation_factor=None)), ("factor", est)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = score_schemes(e, model, schemes, val_dataloader=va, loss_fn=lossf, uncertainty_draws=0)
            row[name] = (rep.baseline_leakage, {k: s.leakage for k, s in rep.schemes.items()})
        print("| form | baseline | " + " | ".join(plans) + " |")
        print("|---|---|" + "---|" * len(plans))
        for name, (base, lk) in row.items():
            print(f"| {name} | {base:.4f} | " + " | ".join(f"{lk[p]:.4f}" for p in plans) + " |")


if __name__ == "__main__":
    main()
