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

``--leverage-correction off|on|auto`` sets the estimator's finite-sample correction (default: the
library's, ``"auto"``: on for this exact estimator); ``--attacks-from JSON`` reuses the attack
results of an earlier run of the same setting/models/seed and recomputes only the indicator;
``--r-eigenspace`` scores the full correlated form in ``R``'s own eigenspace (cf45's form; acc46).

Writes ``docs/figures/pool_<setting>.json`` (``--json`` to change) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib
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


def diagnostics(thetas: np.ndarray, member: np.ndarray, psi: np.ndarray, est_cov: np.ndarray, n: int) -> dict:
    """Checks of the first-order model on the unquantized estimators, per record along its
    test direction ``u_i = est_cov^-1 psi_i`` (the white-box statistic ``t_i = u_i . theta``).

    * ``first_order_pool_advantage``: ``mean_i 2 Phi(delta_i / 2) - 1`` with
      ``delta_i = |est_cov^-1/2 psi_i| / n`` -- the pool-protocol leakage of the first-order
      Gaussian model, computed from the whole-pool fit (no indicator involved);
    * ``cov_trace_ratio``: trace of the models' sample covariance / trace of ``est_cov``;
    * ``shift_ratio_median``, ``sd_ratio_median``: measured IN - OUT mean shift of ``t_i`` over its
      prediction ``u_i . psi_i / n``, and measured sd of ``t_i`` over the OUT models over its
      prediction ``sqrt(u_i . est_cov u_i)``;
    * ``gaussian_tv_advantage``: ``mean_i 2 Phi(delta'_i / 2) - 1`` with the measured
      ``delta'_i`` (shift over pooled sd, its squared noise ``1/n_in + 1/n_out`` subtracted):
      the per-record optimal test if ``t_i`` is Gaussian with equal variances -- what the best
      attack can reach along these directions.
    """
    u = np.linalg.solve(est_cov, psi.T)  # [d, N]
    t = thetas @ u  # [M, N]
    pred_shift = np.einsum("dn,nd->n", u, psi) / n
    delta = np.sqrt(np.maximum(pred_shift * n, 0.0)) / n  # |est_cov^-1/2 psi| / n
    ni, no = member.sum(0), (~member).sum(0)
    mu_in = (t * member).sum(0) / ni
    mu_out = (t * ~member).sum(0) / no
    var_in = ((t - mu_in) ** 2 * member).sum(0) / (ni - 1)
    var_out = ((t - mu_out) ** 2 * ~member).sum(0) / (no - 1)
    sd_pool = np.sqrt(((ni - 1) * var_in + (no - 1) * var_out) / (ni + no - 2))
    d2 = np.maximum(((mu_in - mu_out) / sd_pool) ** 2 - (1 / ni + 1 / no), 0.0)
    from scipy import stats

    return {"first_order_pool_advantage": float(np.mean(2 * stats.norm.cdf(delta / 2) - 1)),
            "cov_trace_ratio": float(np.trace(np.cov(thetas, rowvar=False)) / np.trace(est_cov)),
            "shift_ratio_median": float(np.median((mu_in - mu_out) / pred_shift)),
            "sd_ratio_median": float(np.median(np.sqrt(var_out) / np.sqrt(pred_shift * n))),
            "gaussian_tv_advantage": float(np.mean(2 * stats.norm.cdf(np.sqrt(d2) / 2) - 1))}


def leverage_check(x: torch.Tensor, thetas: np.ndarray, member: np.ndarray, psi: np.ndarray,
                   est_cov: np.ndarray, n: int) -> list[dict]:
    """Setting B (ridge): per leverage band, the first-order pool-protocol advantage against the
    measured one of the best black-box statistic, the prediction ``f(x_i)`` (for ridge the
    prediction is linear in theta; two Gaussians fitted over the IN / OUT models, TV by numerical
    integration, mean over the band's records). Leverage ``h_i = x_i^T (X^T X / N + wd)^-1 x_i / n``.
    """
    from scipy import stats

    N = x.shape[0]
    xt = np.concatenate([x.numpy(), np.ones((N, 1))], 1)
    lev = np.einsum("ij,jk,ik->i", xt, np.linalg.inv(xt.T @ xt / N + WEIGHT_DECAY * np.eye(xt.shape[1])), xt) / n
    delta = np.sqrt(np.einsum("ij,jk,ik->i", psi, np.linalg.inv(est_cov), psi)) / n
    first = 2 * stats.norm.cdf(delta / 2) - 1
    pred = thetas @ xt.T  # [M, N]
    tv = np.empty(N)
    for i in range(N):
        a, b = pred[member[:, i], i], pred[~member[:, i], i]
        lo, hi = min(a.min(), b.min()) - 4 * b.std(), max(a.max(), b.max()) + 4 * b.std()
        grid = np.linspace(lo, hi, 4001)
        pa, pb = stats.norm.pdf(grid, a.mean(), a.std(ddof=1)), stats.norm.pdf(grid, b.mean(), b.std(ddof=1))
        tv[i] = 0.5 * np.trapezoid(np.abs(pa - pb), grid)
    out = []
    for lo, hi in ((0.0, 0.15), (0.15, 0.3), (0.3, np.inf)):
        sel = (lev >= lo) & (lev < hi)
        out.append({"leverage": [lo, float(hi)], "records": int(sel.sum()), "first_order": float(first[sel].mean()),
                    "measured_gaussian_tv_of_prediction": float(tv[sel].mean())})
    out.append({"leverage": "all", "records": N, "first_order": float(first.mean()),
                "measured_gaussian_tv_of_prediction": float(tv.mean())})
    return out


def se(v) -> float:
    v = np.asarray(v, np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def _leverage_line(cfg: dict) -> str:
    """``leverage correction X, mean leverage a, max b`` of the indicator runs (empty for runs
    written before the option existed)."""
    lev = [r for r in cfg.get("indicator_leverage", []) if r.get("mean_leverage") is not None]
    if not lev:
        return ""
    applied = {r["leverage_correction"] for r in lev}
    return (f", leverage correction {'on' if applied == {True} else 'off' if applied == {False} else 'mixed'} "
            f"(mean leverage {np.mean([r['mean_leverage'] for r in lev]):.3f}, max "
            f"{max(r['max_leverage'] for r in lev):.3f})")


def render(out: dict) -> str:
    """Markdown tables of a run (``out`` as written to the JSON): the summary per scheme, with
    the done-when checks, then every attack's advantage."""
    cfg, sch = out["config"], out["schemes"]
    has_pool = cfg["pool_leakage_from_report"]
    pool_label = "pool-protocol leakage (report)" if has_pool else "PLACEHOLDER sqrt(2) x leakage"
    names = cfg["schemes"]

    def adv(s, a):
        r = sch[s]["attacks"][a]
        return r["advantage"], r["advantage_se"]

    def wb(s):
        return max((adv(s, a) for a in ("wb_on", "wb_off")), key=lambda v: v[0])

    lines = [f"setting {cfg['setting']} (N={cfg['N']}, n={cfg['n']}, d={cfg['d']}, M={cfg['models']}): "
             f"`{cfg['command']}`", "",
             f"| scheme | indicator leakage (population game) | {pool_label} | best black-box | white-box "
             "(best of online/offline) | best attack - 2 se <= pool? | pool <= best attack + 2 se? "
             "| kept vs none: white-box / indicator (pool) |", "|---|---|---|---|---|---|---|---|"]
    base = "none" if "none" in names else None
    for s in names:
        lk = sch[s]["indicator_leakage"]
        pool = sch[s]["pool_leakage"] if has_pool else sch[s]["pool_leakage_placeholder_sqrt2"]
        bb = max(BLACK_BOX, key=lambda a: adv(s, a)[0])
        best = max(ATTACKS, key=lambda a: adv(s, a)[0])
        b, bse = adv(s, best)
        w, wse = wb(s)
        kept = ""
        if base:
            p0 = sch[base]["pool_leakage"] if has_pool else sch[base]["pool_leakage_placeholder_sqrt2"]
            kept = f"{w / wb(base)[0]:.0%} / {pool / p0:.0%}"
        lines.append(f"| {s} | {lk:.4f} | {pool:.4f} | {adv(s, bb)[0]:.4f} +- {adv(s, bb)[1]:.4f} ({bb}) | "
                     f"{w:.4f} +- {wse:.4f} | {'yes' if b - 2 * bse <= pool else '**no**'} ({best} {b:.4f}) | "
                     f"{'yes' if pool <= b + 2 * bse else 'no'} | {kept} |")
    lines += ["", "| scheme | " + " | ".join(ATTACKS) + " | best: per-target max (null) |",
              "|---|" + "---|" * (len(ATTACKS) + 1)]
    for s in names:
        best = max(ATTACKS, key=lambda a: adv(s, a)[0])
        r = sch[s]["attacks"][best]
        lines.append(f"| {s} | " + " | ".join(f"{adv(s, a)[0]:.4f}+-{adv(s, a)[1]:.4f}" for a in ATTACKS)
                     + f" | {r['max_advantage']:.4f} ({r['null_max_advantage']:.4f}) |")
    if "diagnostics_unquantized" in out:
        g = out["diagnostics_unquantized"]
        lines.append(f"\nFirst-order model, unquantized (along each record's direction est_cov^-1 psi): pool-protocol "
                     f"advantage {g['first_order_pool_advantage']:.4f}; measured per-record Gaussian optimum "
                     f"{g['gaussian_tv_advantage']:.4f}; measured / predicted: mean shift {g['shift_ratio_median']:.2f}, "
                     f"sd {g['sd_ratio_median']:.2f} (medians over records), covariance trace "
                     f"{g['cov_trace_ratio']:.2f}.")
    for row in out.get("diagnostics_unquantized", {}).get("by_leverage", []):
        lines.append(f"- leverage {row['leverage']} ({row['records']} records): first-order "
                     f"{row['first_order']:.4f}, measured Gaussian TV of the prediction "
                     f"{row['measured_gaussian_tv_of_prediction']:.4f}")
    lines.append(f"\nAdvantage = TPR - FPR at one threshold for all targets (pooled ROC), mean +- s.e. over "
                 f"{cfg['models']} targets; 'per-target max' = each target's own max(TPR - FPR), biased up by "
                 f"about its 'null' (labels permuted). Indicator: mean over {cfg['indicator_targets']} targets"
                 + _leverage_line(cfg) + ". "
                 f"Times: training {cfg['t_train']:.0f}s, attacks {cfg['t_attacks']:.0f}s, indicator "
                 f"{cfg['t_indicator']:.0f}s, total {cfg.get('t_total', 0):.0f}s.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["A", "B"], default="A")
    ap.add_argument("--models", type=int, default=129, help="models in the pool protocol (>= 65 for the issue)")
    ap.add_argument("--indicator-targets", type=int, default=4, help="targets assessed by the indicator")
    ap.add_argument("--schemes", nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lbfgs-iters", type=int, default=200, help="setting A: L-BFGS iterations per model")
    ap.add_argument("--json", type=Path, default=None, help="default docs/figures/pool_<setting>.json")
    ap.add_argument("--cache", type=Path, default=None,
                    help="file of the trained parameters: reused when it matches setting/models/seed/iterations")
    ap.add_argument("--render", type=Path, default=None, help="only print the tables of a JSON written before")
    ap.add_argument("--leverage-correction", choices=["off", "on", "auto"], default=None,
                    help="the indicator's EstimationConfig.leverage_correction (default: the library's)")
    ap.add_argument("--attacks-from", type=Path, default=None,
                    help="reuse the attack results of a JSON written before (same setting, models, seed, "
                         "schemes): only the indicator is recomputed")
    ap.add_argument("--r-eigenspace", action="store_true",
                    help="score the full correlated form in R's own eigenspace (estimate.SANDWICH_FACTOR = False: "
                         "cf45's form) instead of the exact estimator's own factor (rc46)")
    args = ap.parse_args(argv)
    if args.r_eigenspace:
        E = importlib.import_module("mis_lightning.estimation.estimate")  # the module, not the function
        E.SANDWICH_FACTOR = False
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
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
    key = f"{args.setting}-{args.models}-{args.seed}-{args.lbfgs_iters}"
    cached = torch.load(args.cache, weights_only=True) if args.cache and args.cache.exists() else None
    if cached is not None and cached["key"] == key:  # the same trainings, reused
        thetas, gmax, th_pool, g_pool = list(cached["thetas"]), cached["gmax"], cached["pool"], cached["g_pool"]
    else:
        thetas, gmax = [], []
        for m in range(args.models):
            idx = torch.from_numpy(np.flatnonzero(member[m]))
            th, g = train(flat, theta0, x[idx], y[idx], args.setting, args.lbfgs_iters)
            thetas.append(th)
            gmax.append(g)
        th_pool, g_pool = train(flat, theta0, x, y, args.setting, args.lbfgs_iters)
        if args.cache:
            torch.save({"key": key, "thetas": torch.stack(thetas), "gmax": gmax, "pool": th_pool,
                        "g_pool": g_pool}, args.cache)
    psi = influences(flat, th_pool, x, y).numpy()
    # sandwich covariance of the estimator over random halves of the pool (finite population):
    # Sigma (N - n) / (n (N - 1)), Sigma = mean psi psi^T (psi centred: mean gradient 0 at the fit)
    est_cov = psi.T @ psi / N * (N - n) / (n * (N - 1))
    t_train = time.perf_counter() - t0
    diag = diagnostics(torch.stack(thetas).numpy(), member, psi, est_cov, n)
    if args.setting == "B":
        diag["by_leverage"] = leverage_check(x, torch.stack(thetas).numpy(), member, psi, est_cov, n)
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
    reused = None
    if args.attacks_from:
        reused = json.loads(args.attacks_from.read_text())
        rc = reused["config"]
        if (rc["setting"], rc["models"], rc["seed"]) != (args.setting, args.models, args.seed) or \
                not set(schemes) <= set(reused["schemes"]):
            raise SystemExit(f"--attacks-from {args.attacks_from}: another setting/models/seed or schemes")
        t_att = rc["t_attacks"]
        for sch in schemes:
            r = reused["schemes"][sch]
            results[sch] = {k: r[k] for k in ("attacks", "released_coords_that_vary", "release_rel_change")}
    for sch in schemes if reused is None else []:
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
    lev_opt = {} if args.leverage_correction is None else {
        "leverage_correction": {"off": False, "on": True, "auto": "auto"}[args.leverage_correction]}
    lev_diag: list[dict] = []
    ind: dict[str, dict[str, list]] = {s: {"leakage": [], "pool_leakage": [], "interval": []} for s in schemes}
    has_pool = True
    for m in range(min(args.indicator_targets, args.models)):
        idx = torch.from_numpy(np.flatnonzero(member[m]))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[idx].float(), y[idx].float()),
                                             batch_size=n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = assess(modules[m], schemes, loader, per_sample_loss, estimation="exact",
                         weight_decay=WEIGHT_DECAY, num_records=n, seed=m, **lev_opt)
        lev_diag.append({k: rep.diagnostics.get(k) for k in ("mean_leverage", "max_leverage", "leverage_correction")})
        for s in schemes:
            r = rep.schemes[s]
            ind[s]["leakage"].append(r.leakage)
            ind[s]["interval"].append(list(r.interval) if r.interval else [r.leakage, r.leakage])
            pl = getattr(r, "pool_leakage", None)  # the report's pool-protocol leakage (NaN: not computed)
            has_pool = has_pool and pl is not None and math.isfinite(pl)
            ind[s]["pool_leakage"].append(pl)
    t_ind = time.perf_counter() - t0

    summary: dict[str, dict] = {}
    for s in schemes:
        lk = float(np.mean(ind[s]["leakage"]))
        summary[s] = {"indicator_leakage": lk, "indicator_leakage_targets": ind[s]["leakage"],
                      "indicator_interval_targets": ind[s]["interval"],
                      "pool_leakage": float(np.mean(ind[s]["pool_leakage"])) if has_pool else None,
                      "pool_leakage_targets": ind[s]["pool_leakage"] if has_pool else None,
                      "pool_leakage_placeholder_sqrt2": None if has_pool else math.sqrt(2) * lk, **results[s]}
    cmd = "python benchmarks/pool_attacks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"config": {"setting": args.setting, "N": N, "n": n, "d": d, "models": args.models, "seed": args.seed,
                      "weight_decay": WEIGHT_DECAY, "schemes": schemes, "command": cmd,
                      "indicator_targets": min(args.indicator_targets, args.models),
                      "pool_leakage_from_report": has_pool, "max_abs_grad": max(gmax),
                      "leverage_correction": args.leverage_correction or "library default",
                      "indicator_leverage": lev_diag,
                      "t_train": t_train, "t_attacks": t_att, "t_indicator": t_ind,
                      "t_total": time.perf_counter() - t_start}, "schemes": summary,
           "diagnostics_unquantized": diag}
    out["table"] = render(out)
    print(out["table"])
    path = args.json or ROOT / "docs" / "figures" / f"pool_{args.setting}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
