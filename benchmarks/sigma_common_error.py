"""The common relative error of the real estimator's ``sigma-hat`` over repeated trainings.

    python benchmarks/sigma_common_error.py --model mlin:32x64 --n 4096 16384 65536 --trainings 20
    python benchmarks/sigma_common_error.py --model lin1:2048 --n 8192 32768 --trainings 20
    python benchmarks/sigma_common_error.py --model logit:512 --n 8192 --trainings 20 [--mode diagonal]
    python benchmarks/sigma_common_error.py --sensitivity
    (--leverage-correction false: the estimators' first-order figures, as before hc27)

The averaged regime of the interval (method.md section 3) reads every coarse weight's cells at
the plug-in ``sigma``: a relative error COMMON to the weights moves every ``kappa`` the same way
(docs/validation.md, "sigma-hat's common error on the real estimators"). This measures it on
``mis_lightning.assess.run_estimation`` (the library's own estimation pass) against a closed-form
population ``sigma``.

Models whose population Sigma is known in closed form:

* ``mlin:OUTxIN``: multi-output linear regression ``y = Theta* x + e``, ``x ~ N(0, I)`` (or
  ``rad``: Rademacher), ``e_o = s_o eps_o`` (``s_o`` log-uniform 0.5-2, Gaussian eps), squared
  loss ``|Theta x - y|^2 / 2``, no bias. ``H = I`` per row, ``Sigma_jj = s_o^2``: ``sigma_j =
  s_o / sqrt(n)``. Fitted exactly (least squares).
* ``lin1:D``: one output (``mlin:1xD``).
* ``logit:D``: logistic regression, ``x ~ N(0, I)``, ``theta*`` uniform direction with norm
  ``beta = 1.5``, BCE. Correctly specified: ``Sigma = H^-1``, ``H = a (I - u u') + b u u'`` with
  ``a = E s'(beta z)``, ``b = E s'(beta z) z^2`` (``z ~ N(0, 1)``, Gauss-Hermite): ``Sigma_jj =
  (1 - u_j^2) / a + u_j^2 / b``. Fitted by Newton to ``|grad| < 1e-12``.

Per training: ``r_j = sigma-hat_j / sigma_j``; the common error ``mean_j (r_j - 1)`` (the
leakage-relevant part in the averaged regime: every coarse kappa moves with it), and the
per-coordinate spread. Over trainings: mean (bias) and sd of the common error.
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


def row_sds(out_f: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, out_f, 5])
    return np.exp(rng.uniform(math.log(0.5), math.log(2.0), out_f))


def logistic_population_sd(theta: np.ndarray) -> np.ndarray:
    beta = float(np.linalg.norm(theta))
    u = theta / beta
    x, w = np.polynomial.hermite_e.hermegauss(200)
    w = w / w.sum()
    p = 1.0 / (1.0 + np.exp(-beta * x))
    s1 = p * (1 - p)
    a, b = float((w * s1).sum()), float((w * s1 * x * x).sum())
    return np.sqrt((1 - u * u) / a + u * u / b)


def make_training(kind: str, shape: tuple[int, int], n: int, seed: int, design: str = "gauss"):
    """Returns (model, loader, loss_fn, population sd per coordinate * sqrt(n) [d], data)."""
    out_f, in_f = shape
    g = np.random.default_rng([seed, out_f, in_f, n, 11])
    if design == "gauss":
        X = g.standard_normal((n, in_f))
    else:
        X = g.choice([-1.0, 1.0], (n, in_f))
    if kind in ("mlin", "lin1"):
        s = row_sds(out_f, 0)
        th = g.standard_normal((out_f, in_f)) * 0.1
        E = g.standard_normal((n, out_f)) * s[None]
        Y = X @ th.T + E
        fit = np.linalg.lstsq(X, Y, rcond=None)[0].T  # [out, in]
        model = nn.Linear(in_f, out_f, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(fit))

        def loss_fn(o, t):
            return 0.5 * (o - t).square().sum(-1)
        pop_sd = np.repeat(s, in_f)
        data = TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
    elif kind == "logit":
        beta = 1.5
        v = np.random.default_rng([in_f, 3]).standard_normal(in_f)
        th = beta * v / np.linalg.norm(v)
        p = 1 / (1 + np.exp(-X @ th))
        Y = (g.uniform(size=n) < p).astype(np.float64)
        w = th.copy()
        for _ in range(50):
            q = 1 / (1 + np.exp(-X @ w))
            grad = X.T @ (q - Y) / n
            H = (X * (q * (1 - q))[:, None]).T @ X / n
            step = np.linalg.solve(H, grad)
            w -= step
            if np.abs(grad).max() < 1e-13:
                break
        model = nn.Linear(in_f, 1, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(w)[None])

        def loss_fn(o, t):
            return nn.functional.binary_cross_entropy_with_logits(o[:, 0], t, reduction="none")
        pop_sd = logistic_population_sd(th)
        data = TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
    else:
        raise ValueError(kind)
    return model, DataLoader(data, batch_size=4096), loss_fn, pop_sd, th.reshape(-1)


def one(kind, shape, n, seed, mode, design, records=64, leverage_correction="auto"):
    model, loader, loss_fn, pop_sd, th_star = make_training(kind, shape, n, seed, design)
    cfg = EstimationConfig(mode=mode, num_records=records, weight_decay=0.0, leverage_correction=leverage_correction)
    t0 = time.process_time()
    est = AS.run_estimation(model, loader, loss_fn, cfg, seed=seed)
    cpu = time.process_time() - t0
    sh = est.sigma["weight"].reshape(-1).double().numpy()
    r = sh / (pop_sd / math.sqrt(n))
    dev = (model.weight.detach().reshape(-1).double().numpy() - th_star) / (pop_sd / math.sqrt(n))
    return {"dev2": float(np.mean(dev ** 2)), "common": float(r.mean() - 1), "median": float(np.median(r) - 1), "sd_coord": float(r.std()),
            "cpu": cpu, "estimator": est.estimator, "mode": est.mode,
            "leverage": bool(est.diagnostics.get("leverage_correction"))}


def sensitivity() -> None:
    """Per step (sd units), over uniform positions in the cell: mean ``kappa``, mean ``dkappa /
    dlog sigma`` (central difference, 1%) and their ratio, which bounds a common sigma error's
    share of the record error (docs/validation.md)."""
    from mis_lightning.groundtruth import averaged as AV
    u = (np.arange(4000) + 0.5) / 4000 - 0.5
    for r in (1, 2, 3, 4, 6, 8, 12):
        rr, e = np.full(u.size, float(r)), 0.01
        k = AV.kappa_step(u, rr)
        dk = (AV.kappa_step(u, rr / math.exp(e)) - AV.kappa_step(u, rr / math.exp(-e))) / (2 * e)
        print(f"step {r:>2} sd: mean kappa {k.mean():.4f}, mean dkappa/dlog sigma {dk.mean():.4f}, "
              f"ratio {dk.mean() / k.mean():.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if "--sensitivity" in sys.argv:
        sensitivity()
        return
    ap.add_argument("--model", required=True, help="mlin:OUTxIN, lin1:D or logit:D")
    ap.add_argument("--n", type=int, nargs="+", required=True)
    ap.add_argument("--trainings", type=int, default=20)
    ap.add_argument("--mode", default="auto", help="EstimationConfig.mode (auto: exact up to 2,000 weights)")
    ap.add_argument("--design", default="gauss", help="gauss or rad (Rademacher inputs)")
    ap.add_argument("--leverage-correction", default="auto", choices=["auto", "false"],
                    help="EstimationConfig.leverage_correction (false: the first-order figures)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    lc = "auto" if a.leverage_correction == "auto" else False
    kind, sz = a.model.split(":")
    shape = tuple(int(v) for v in sz.split("x")) if "x" in sz else (1, int(sz))
    res = []
    for n in a.n:
        rows = [one(kind, shape, n, s, a.mode, a.design, leverage_correction=lc) for s in range(a.trainings)]
        c = np.array([x["common"] for x in rows])
        d = shape[0] * shape[1]
        line = {"model": a.model, "design": a.design, "n": n, "d": d, "mode": rows[0]["mode"],
                "estimator": rows[0]["estimator"], "leverage": rows[0]["leverage"],
                "common_mean": float(c.mean()), "common_sd": float(c.std(ddof=1)),
                "common_se_of_mean": float(c.std(ddof=1) / math.sqrt(c.size)),
                "coord_sd": float(np.mean([x["sd_coord"] for x in rows])),
                "cpu_per_training": float(np.mean([x["cpu"] for x in rows])), "rows": rows,
                # the trained weights' actual spread around theta* over these trainings, relative to
                # the population sigma (what a finite-sample estimator should track): sqrt(mean dev^2) - 1
                "empirical_spread": math.sqrt(float(np.mean([x["dev2"] for x in rows]))) - 1.0}
        p = shape[1]  # regressors per output row: its leverage sum
        if kind == "logit":
            line["predicted"] = None
        elif line["mode"] == "diagonal" and line["leverage"]:
            # V-hat / (1 - h_bar), h_bar = p / n per output row (the diagonal trace is exact here): unbiased
            line["predicted"] = 0.0
        elif line["mode"] == "diagonal":  # E e-hat^2 = s^2 (1 - p / n): V-hat low by the mean leverage
            line["predicted"] = math.sqrt(1.0 - p / n) - 1.0
        else:  # HC2-corrected V with the exact H^-1: E (X'X / n)^-1 = n / (n - p - 1) (Gaussian design)
            line["predicted"] = math.sqrt(n / (n - p - 1.0)) - 1.0
        pred = "" if line["predicted"] is None else f" (leverage prediction {100 * line['predicted']:+.2f}%)"
        print(f"{a.model:<12} {a.design:<5} n={n:>6} d={d:>5} d/n={d / n:.3f} {line['mode']:<9} lev={line['leverage']!s:<5} "
              f"common error: mean {100 * c.mean():+.3f}% +- {100 * line['common_se_of_mean']:.3f}{pred}, sd over trainings "
              f"{100 * line['common_sd']:.3f}% | theta-hat's actual spread {100 * line['empirical_spread']:+.2f}% | per-coordinate sd {100 * line['coord_sd']:.2f}% | "
              f"{line['cpu_per_training']:.2f} s", flush=True)
        res.append(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
