"""Reference-model attacks in the pool protocol vs the indicator, per quantization scheme.

    python benchmarks/pool_attacks.py --setting A --models 129
    python benchmarks/pool_attacks.py --setting B --models 129

Pool = all 1,017 ChEMBL2321810 records of ``mis_lightning.data.ChEMBLDataModule`` (regression,
z-scored activity; every split pooled). ``--models`` models, each trained to a minimum on a
random half (n = 508; ``pool_splits``, seed ``--seed``) of the per-sample loss
``0.5 (f(x) - y)^2`` plus ``weight_decay / 2 |theta|^2`` (1e-3, on weights and biases):

* setting A: the default job's network, ``MLPProbe(12 physchem descriptors, hidden=[4])``
  (d = 57), full-batch L-BFGS in float64 from one fixed initialisation (seed ``--seed``: all
  models start from the same point, so they land in the same basin and the same hidden-unit
  order), then cast to float32 like a trained job;
* setting B: ridge regression ``LinearRegression`` on 128-bit Morgan fingerprints (d = 129),
  closed form in float64.

Every model is released under each scheme (``released_parameters``: the dequantized weights and
the float biases); the black-box signals are the released model's outputs computed in float64.
Each model in turn is the target and the others its references. Attacks
(``mis_lightning.groundtruth.attacks``): loss threshold; LiRA online/offline on the negative
loss; LiRA online on the signed residual ``f(x) - y`` (the regression analogue of LiRA's
logit scaling: Gaussian across models, keeps the sign the loss folds away); RMIA
online/offline with the Gaussian likelihood ``exp(-(f(x) - y)^2 / (2 s^2))``, ``s^2`` = mean
squared residual over all models and records; a white-box LiRA-style test on the released
parameter vector along each record's influence direction (influences at the fit on the whole
pool). Advantage per target at one threshold for all targets, mean +- s.e. over targets
(``pool_advantage``).

Indicator: ``assess(target, schemes, its training half, estimation="exact")`` for the first
``--indicator-targets`` models: ``leakage`` (population game) and, when the report has it,
``pool_leakage`` (the pool protocol); without it a placeholder ``sqrt(2) * leakage`` is
printed, labelled as such.

Writes ``docs/figures/pool_<setting>.json`` (``--json`` to change) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning import assess  # noqa: E402
from mis_lightning.groundtruth.attacks import (  # noqa: E402
    lira_scores,
    pool_advantage,
    pool_splits,
    released_parameters,
    rmia_scores,
    whitebox_scores,
)
from mis_lightning.models import LinearRegression, MLPProbe  # noqa: E402

WEIGHT_DECAY = 1e-3
SCHEMES = {
    "A": ["none", "bf16", "float8_weight_only", "int8_weight_only", "intx_weight_only_int4",
          "intx_weight_only_int3", "intx_weight_only_int2", "rtn_int2"],
    # B adds int4 per group of 32 (A's layers have 12 and 4 inputs: torchao leaves them in float)
    "B": ["none", "bf16", "float8_weight_only", "int8_weight_only", "intx_weight_only_int4",
          "intx_weight_only_int4_g32", "intx_weight_only_int3", "intx_weight_only_int2", "rtn_int2"],
}
ATTACKS = ["loss", "lira_on", "lira_off", "lira_on_resid", "rmia_on", "rmia_off", "wb_on", "wb_off"]
BLACK_BOX = ATTACKS[:6]


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``0.5 (f(x) - y)^2``, ``[B]`` (the models' regression loss)."""
    return 0.5 * (out - y) ** 2


def pool_records(setting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All ChEMBL2321810 records (every split), float64 ``x [N, F]``, ``y [N]``."""
    from mis_lightning.data import ChEMBLDataModule

    feat = {"A": dict(featurizer="physchem"), "B": dict(featurizer="morgan", n_bits=128)}[setting]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = ChEMBLDataModule(task="regression", **feat)
        dm.setup()
    xs, ys = zip(*(ds[:] for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)))
    x = torch.cat([torch.as_tensor(v, dtype=torch.float64) for v in xs])
    y = torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in ys])
    return x, y


def make_model(setting: str, num_features: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if setting == "A":
        return MLPProbe(num_features, hidden=[4], task="regression", weight_decay=WEIGHT_DECAY)
    return LinearRegression(num_features, weight_decay=WEIGHT_DECAY)


class Flat:
    """Flat float64 parameter vectors <-> the model's named parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.model64 = make_like(model).double()
        self.names = [k for k, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]

    def unflat(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t.reshape(s) for k, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}

    def flat(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[k].reshape(-1).double() for k in self.names])

    def predict(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model64, self.unflat(theta), (x,))


def make_like(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def train(flat: Flat, theta0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, setting: str,
          max_iter: int) -> tuple[torch.Tensor, float]:
    """Minimiser of ``mean 0.5 r^2 + wd/2 |theta|^2`` and its gradient's max-abs value."""

    def objective(th):
        return per_sample_loss(flat.predict(th, x), y).mean() + 0.5 * WEIGHT_DECAY * (th * th).sum()

    if setting == "B":  # ridge: closed form; parameter order (weight [1, F], bias [1])
        xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        n = len(x)
        th = torch.linalg.solve(xt.T @ xt / n + WEIGHT_DECAY * torch.eye(xt.shape[1], dtype=x.dtype), xt.T @ y / n)
    else:
        th = theta0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([th], lr=1.0, max_iter=max_iter, history_size=50, tolerance_grad=1e-11,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            v = objective(th)
            v.backward()
            return v

        opt.step(closure)
        th = th.detach()
    g = grad(objective)(th)
    return th, float(g.abs().max())


def influences(flat: Flat, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``psi_i = -H^-1 grad l(theta; z_i)`` at ``theta`` (the whole-pool fit), ``[N, d]``; ``l``
    includes the penalty, ``H`` = Hessian of the mean objective."""

    def obj_one(th, xi, yi):
        return per_sample_loss(flat.predict(th, xi[None]), yi[None])[0] + 0.5 * WEIGHT_DECAY * (th * th).sum()

    g = vmap(grad(obj_one), in_dims=(None, 0, 0))(theta, x, y)
    h = hessian(lambda th: vmap(obj_one, in_dims=(None, 0, 0))(th, x, y).mean())(theta)
    return -torch.linalg.solve(h, g.T).T


def se(v) -> float:
    v = np.asarray(v, np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["A", "B"], required=True)
    ap.add_argument("--models", type=int, default=129, help="models in the pool protocol (>= 65 for the issue)")
    ap.add_argument("--indicator-targets", type=int, default=4, help="targets assessed by the indicator")
    ap.add_argument("--schemes", nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lbfgs-iters", type=int, default=200, help="setting A: L-BFGS iterations per model")
    ap.add_argument("--json", type=Path, default=None, help="default docs/figures/pool_<setting>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    schemes = args.schemes or SCHEMES[args.setting]
    x, y = pool_records(args.setting)
    N, F = x.shape
    member = pool_splits(N, args.models, seed=args.seed)
    n = int(member[0].sum())
    model = make_model(args.setting, F, args.seed)
    flat = Flat(model)
    theta0 = flat.flat(dict(model.named_parameters())).detach()
    d = theta0.numel()

    t0 = time.perf_counter()
    thetas, gmax = [], []
    for m in range(args.models):
        idx = torch.from_numpy(np.flatnonzero(member[m]))
        th, g = train(flat, theta0, x[idx], y[idx], args.setting, args.lbfgs_iters)
        thetas.append(th)
        gmax.append(g)
    th_pool, g_pool = train(flat, theta0, x, y, args.setting, args.lbfgs_iters)
    psi = influences(flat, th_pool, x, y).numpy()
    # sandwich covariance of the estimator over random halves of the pool (finite population):
    # Sigma (N - n) / (n (N - 1)), Sigma = mean psi psi^T (psi centred: mean gradient 0 at the fit)
    est_cov = psi.T @ psi / N * (N - n) / (n * (N - 1))
    t_train = time.perf_counter() - t0
    print(f"setting {args.setting}: N={N}, n={n}, d={d}, M={args.models}; trained in {t_train:.1f}s, "
          f"max |grad| over models {max(gmax):.2e} (pool fit {g_pool:.2e})", flush=True)

    def module_of(th: torch.Tensor) -> nn.Module:
        mod = make_like(model).float()
        with torch.no_grad():
            for k, p in mod.named_parameters():
                p.copy_(flat.unflat(th)[k])
        return mod.eval()

    modules = [module_of(th) for th in thetas]
    results: dict[str, dict] = {}
    t_att = 0.0
    for sch in schemes:
        t0 = time.perf_counter()
        released = torch.stack([flat.flat(released_parameters(mod, sch)) for mod in modules])  # [M, d]
        with torch.no_grad():
            pred = torch.stack([flat.predict(th, x) for th in released])  # [M, N], float64
        resid = (pred - y).numpy()
        loss = 0.5 * resid**2
        s2 = float(np.mean(resid**2))
        probs = np.exp(-resid**2 / (2 * s2))
        rel = released.numpy()
        scores = {
            "loss": -loss,
            "lira_on": lira_scores(-loss, member, online=True),
            "lira_off": lira_scores(-loss, member, online=False),
            "lira_on_resid": lira_scores(resid, member, online=True),
            "rmia_on": rmia_scores(np.maximum(probs, 1e-300), member, online=True),
            "rmia_off": rmia_scores(np.maximum(probs, 1e-300), member, online=False),
            "wb_on": whitebox_scores(rel, member, psi, online=True, estimator_cov=est_cov),
            "wb_off": whitebox_scores(rel, member, psi, online=False, estimator_cov=est_cov),
        }
        res = {a: vars(pool_advantage(s, member, seed=args.seed)) for a, s in scores.items()}
        moved = float(np.mean(np.any(rel != rel[:1], axis=0)))
        results[sch] = {"attacks": res, "released_coords_that_vary": moved,
                        "release_rel_change": float(np.linalg.norm(rel - torch.stack(thetas).numpy())
                                                    / np.linalg.norm(torch.stack(thetas).numpy()))}
        t_att += time.perf_counter() - t0
        best = max(ATTACKS, key=lambda a: res[a]["advantage"])
        print(f"  {sch}: best {best} {res[best]['advantage']:.4f}+-{res[best]['advantage_se']:.4f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)

    # indicator on the first targets (float32 models, its own training half)
    t0 = time.perf_counter()
    ind: dict[str, dict[str, list]] = {s: {"leakage": [], "pool_leakage": [], "interval": []} for s in schemes}
    has_pool = True
    for m in range(min(args.indicator_targets, args.models)):
        idx = torch.from_numpy(np.flatnonzero(member[m]))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[idx].float(), y[idx].float()),
                                             batch_size=n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = assess(modules[m], schemes, loader, per_sample_loss, estimation="exact",
                         weight_decay=WEIGHT_DECAY, num_records=n, seed=m)
        for s in schemes:
            r = rep.schemes[s]
            ind[s]["leakage"].append(r.leakage)
            ind[s]["interval"].append(list(r.interval) if r.interval else [r.leakage, r.leakage])
            pl = getattr(r, "pool_leakage", None)
            has_pool = has_pool and pl is not None
            ind[s]["pool_leakage"].append(pl)
    t_ind = time.perf_counter() - t0

    pool_label = "pool_leakage (report)" if has_pool else "PLACEHOLDER sqrt(2) x leakage"
    lines = [f"| scheme | indicator leakage (population game) | {pool_label} | "
             + " | ".join(ATTACKS) + " | best attack | best - 2 se <= pool? | white-box kept / indicator kept |",
             "|" + "---|" * (5 + len(ATTACKS))]
    summary: dict[str, dict] = {}
    wb0 = results[schemes[0]]["attacks"]["wb_on"]["advantage"] if schemes[0] == "none" else None
    lk0 = float(np.mean(ind[schemes[0]]["leakage"])) if schemes[0] == "none" else None
    for s in schemes:
        res = results[s]["attacks"]
        lk = float(np.mean(ind[s]["leakage"]))
        pool = float(np.mean(ind[s]["pool_leakage"])) if has_pool else math.sqrt(2) * lk
        best = max(ATTACKS, key=lambda a: res[a]["advantage"])
        b, bse = res[best]["advantage"], res[best]["advantage_se"]
        ok_low = b - 2 * bse <= pool
        cells = [f"{res[a]['advantage']:.4f}+-{res[a]['advantage_se']:.4f}" for a in ATTACKS]
        kept = ""
        if wb0 and lk0:
            kept = f"{res['wb_on']['advantage'] / wb0:.0%} / {lk / lk0:.0%}"
        lines.append(f"| {s} | {lk:.4f} | {pool:.4f} | " + " | ".join(cells)
                     + f" | {b:.4f}+-{bse:.4f} ({best}) | {'yes' if ok_low else 'NO'} | {kept} |")
        summary[s] = {"indicator_leakage": lk, "indicator_leakage_targets": ind[s]["leakage"],
                      "indicator_interval_targets": ind[s]["interval"],
                      "pool_leakage": pool if has_pool else None,
                      "pool_leakage_placeholder_sqrt2": None if has_pool else pool,
                      "best_attack": best, "best_advantage": b, "best_advantage_se": bse,
                      "best_minus_2se_le_pool": bool(ok_low),
                      "pool_ge_best_minus_2se": bool(pool >= b - 2 * bse),
                      "pool_le_best_plus_2se": bool(pool <= b + 2 * bse), **results[s]}
    cmd = "python benchmarks/pool_attacks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines.append(f"\nadvantage = TPR - FPR at one threshold for all targets (pooled ROC), mean +- s.e. over "
                 f"{args.models} targets; per-target max(TPR - FPR) and its null in the JSON. "
                 f"Indicator: mean over {min(args.indicator_targets, args.models)} targets. "
                 f"Times: training {t_train:.0f}s, attacks {t_att:.0f}s, indicator {t_ind:.0f}s, "
                 f"total {time.perf_counter() - t_start:.0f}s.")
    print(f"\nsetting {args.setting} (N={N}, n={n}, d={d}, M={args.models}): `{cmd}`\n")
    print("\n".join(lines))
    out = {"config": {"setting": args.setting, "N": N, "n": n, "d": d, "models": args.models, "seed": args.seed,
                      "weight_decay": WEIGHT_DECAY, "schemes": schemes, "command": cmd,
                      "indicator_targets": min(args.indicator_targets, args.models),
                      "pool_leakage_from_report": has_pool, "max_abs_grad": max(gmax),
                      "t_train": t_train, "t_attacks": t_att, "t_indicator": t_ind},
           "schemes": summary, "table": "\n".join(lines)}
    path = args.json or ROOT / "docs" / "figures" / f"pool_{args.setting}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
