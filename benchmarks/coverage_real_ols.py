"""Coverage of the report's 80% interval on REAL trainings in the averaged regime.

    python benchmarks/coverage_real_ols.py --shape 32x64 --n 16384 --populations 40
    python benchmarks/coverage_real_ols.py --shape 1x1024 --n 16384 --populations 30 --records 512

``benchmarks/coverage_averaged.py`` scores synthetic ``Estimate``s (``theta-hat`` drawn from its
law, ``sigma-hat`` given); here every training is real: least squares on ``n`` drawn records,
then the library's own estimation pass and scoring, so ``theta-hat``, ``sigma-hat`` (with its
common error: docs/validation.md, "sigma-hat's common error on the real estimators") and the
stored records' influences are the estimator's.

Population: ``groundtruth.averaged.make_population(out, in, n=n, steps=STEP, records="gaussian")``
(``theta*`` spread over a coarse per-weight grid, row noise sds ``s_o``); truth ``AV.truth(pop)``
(the first-order leakage at ``theta*`` with the TRUE sigma and records, Gaussian form).
A training: ``n`` records ``x ~ N(0, I)``, ``y = Theta* x + s eps``, ``Theta-hat`` by least
squares, then the library's own ``run_estimation`` (``num_records`` stored records) and
``score_schemes(..., covariance="independent", uncertainty_draws=16)`` with the population's
grid (``AV.StepGridScheme``; the estimator's finite-sample (leverage) correction as
``--leverage-correction`` says: with it the plug-in also carries the leave-one-out influences and
the spread term, which the first-order truth does not; ``--first-order-influences`` keeps the
corrected sigma and scores the first-order influences without the spread term, so that only
sigma-hat's error is compared with the first-order truth). Each training is scored twice: as estimated, and with the
estimate's ``sigma`` replaced by the population's (the same ``theta-hat``, records and draws'
seed): the difference is ``sigma-hat``'s share of the interval's error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AS = importlib.import_module("mis_lightning.assess")
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.groundtruth import averaged as AV  # noqa: E402


def training(pop: AV.Population, seed: int):
    out_f, in_f, n = pop.out_features, pop.in_features, pop.n
    g = np.random.default_rng([seed, out_f, in_f, n, 23])
    X = g.standard_normal((n, in_f))
    th = pop.theta_star.reshape(out_f, in_f)
    Y = X @ th.T + g.standard_normal((n, out_f)) * pop.row_sd[None]
    fit = np.linalg.lstsq(X, Y, rcond=None)[0].T
    model = nn.Linear(in_f, out_f, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(fit))
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=8192)
    return model, loader


def loss_fn(o, t):
    return 0.5 * (o - t).square().sum(-1)


def score(est, model, scheme, seed, draws):
    rep = AS.score_schemes(est, model, [scheme], uncertainty_draws=draws, seed=seed, covariance="independent")
    return rep.schemes[scheme.name]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="32x64")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--steps", default="4")
    ap.add_argument("--populations", type=int, default=40)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--mode", default="diagonal", help="EstimationConfig.mode (the large-model estimator)")
    ap.add_argument("--leverage-correction", default="auto", choices=["auto", "false"],
                    help="EstimationConfig.leverage_correction (false: the first-order figures, as before hc27)")
    ap.add_argument("--first-order-influences", action="store_true",
                    help="score with the estimate's (corrected) sigma but the first-order influences and no spread "
                         "term: what the first-order truth reads, so only sigma-hat's error is compared")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    lc = "auto" if a.leverage_correction == "auto" else False
    out_f, in_f = (int(v) for v in a.shape.split("x"))
    steps = a.steps if a.steps == "mixed" else float(a.steps)
    rows = []
    t0 = time.process_time()
    for p in range(a.populations):
        pop = AV.make_population(out_f, in_f, n=a.n, steps=steps, records="gaussian", seed=500 + p)
        truth, tse = AV.truth(pop)
        model, loader = training(pop, p)
        est = AS.run_estimation(model, loader, loss_fn, EstimationConfig(mode=a.mode, num_records=a.records,
                                                                          weight_decay=0.0, leverage_correction=lc),
                                seed=p)
        if a.first_order_influences and est.influence_scale != 1.0:
            est.influence, est.influence_scale, est.leverage = est.unit_influence(), 1.0, None
        r = est.sigma["weight"].reshape(-1).double().numpy() / pop.sigma
        scheme = AV.StepGridScheme(pop.step)
        got = score(est, model, scheme, p, a.draws)
        sw = est.sigma["weight"]
        est.sigma = {"weight": torch.from_numpy(pop.sigma).reshape(sw.shape).to(sw.dtype)}
        tru = score(est, model, scheme, p, a.draws)
        row = {"pop": p, "truth": truth, "truth_se": tse, "common": float(r.mean() - 1), "plug_in": got.leakage,
               "regime": got.interval_regime, "interval": list(got.interval), "true_sigma_plug_in": tru.leakage,
               "true_sigma": list(tru.interval)}
        rows.append(row)
        cov = {k: np.mean([x[k][0] <= x["truth"] <= x[k][1] for x in rows]) for k in ("interval", "true_sigma")}
        print(f"pop {p:3d} truth {truth:.5f} plug-in {got.leakage:.5f} sigma common {100 * row['common']:+.2f}% "
              f"interval [{got.interval[0]:.5f}, {got.interval[1]:.5f}] with the true sigma "
              f"[{tru.interval[0]:.5f}, {tru.interval[1]:.5f}] | running coverage {cov['interval']:.2f}, "
              f"true sigma {cov['true_sigma']:.2f} | {got.interval_regime}", flush=True)
    k = len(rows)
    summ = {}
    for key in ("interval", "true_sigma"):
        c = np.array([x[key][0] <= x["truth"] <= x[key][1] for x in rows])
        below = np.mean([x[key][1] < x["truth"] for x in rows])
        above = np.mean([x[key][0] > x["truth"] for x in rows])
        half = np.mean([(x[key][1] - x[key][0]) / 2 for x in rows])
        summ[key] = {"coverage": float(c.mean()), "se": math.sqrt(c.mean() * (1 - c.mean()) / k),
                     "below": float(below), "above": float(above), "half_width_mean": float(half)}
    common = np.array([x["common"] for x in rows])
    print(f"{a.shape} n={a.n} steps={a.steps} populations={k} | sigma common error mean {100 * common.mean():+.3f}% "
          f"sd {100 * common.std(ddof=1):.3f}% | " + " | ".join(
              f"{key}: {v['coverage']:.3f} +- {v['se']:.3f} (below {v['below']:.2f} above {v['above']:.2f}, "
              f"half-width {v['half_width_mean']:.2e})" for key, v in summ.items())
          + f" | {time.process_time() - t0:.0f} s CPU", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "summary": summ, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
