"""dg57: reference-model attacks (LiRA, RMIA) on dg56's kf33 classifiers just above ``estimate.EXACT_MAX_PARAMS``
(ReLU / tanh 20-80-5, d = 2,085, n = 4,000), against the exact and the diagonal estimator's figures; and the
exact estimator's cost there (docs/benchmarks.md, "dg57").

    python benchmarks/dg57_lira_auto.py attack relu 1e-2 --models 16 --save /tmp/dg57   # the pool protocol
    python benchmarks/dg57_lira_auto.py attack relu 1e-2 --models 16 --load /tmp/dg57   # attacks / indicator again
    python benchmarks/dg57_lira_auto.py profile relu 1e-2                              # where the exact one's time goes
    python benchmarks/dg57_lira_auto.py cost relu 1e-2                                 # exact: auto's choice, CPU s

``attack``: the pool is dg56's training records (``kfac_classifier.data(n, 20, 5, 0.5, 0)``, what
``dg56_diagonal_auto.py kf33 N`` fits) followed by ``n`` fresh records of the same population
(``classifier_rank_forms.teacher_sample(n, ..., n=n)``: the attack records of dg56). Model 0 is dg56's model
(trained on the first half, its initialisation ``torch.manual_seed(0)``); models ``1 .. M-1`` are trained the same
way (kf33's full-batch L-BFGS in float64, the decay in the objective, the same initialisation) on random halves
(``groundtruth.attacks.pool_splits``). Each model in turn is the target and the others its references (ac36's
pool protocol: "Reference-model attacks in the pool protocol", docs/validation.md). Attacks on each release (none /
``rtn_int8`` / ``rtn_int4``: rounded weights, float biases): loss threshold; LiRA online / offline on the
logit-scaled confidence; RMIA online / offline on ``p_y`` (``benchmarks/classifier_pool_attacks.signals``);
advantage = ``TPR - FPR`` at one threshold for all targets (``pool_advantage``), mean +- s.e. over targets, and
model 0's own advantage at that threshold (its binomial noise ``~sqrt(2 / n) / 2`` per side). Indicator of
targets ``0 .. --targets - 1`` (``assess``, ``uncertainty_draws=0``): ``estimation="exact"`` and ``"auto"`` (the
diagonal estimator at d = 2,085), ``pool_leakage`` (the pool protocol's figure, method.md "Pool protocol") and
``leakage`` (the population game's). The indicator bounds the best attack's advantage asymptotically: a figure
below an attack's advantage, beyond the attack's noise, is a wrong number.

``profile``: ``cProfile`` of ``assess(model, ..., estimation="exact")`` on dg56's model (the 25 heaviest calls by
cumulative time). ``cost``: ``assess`` with ``"exact"`` and ``"auto"`` alternated ``--repeats`` times, CPU seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mis_lightning as ml  # noqa: E402
from benchmarks.classifier_pool_attacks import signals  # noqa: E402
from benchmarks.classifier_rank_forms import teacher_sample  # noqa: E402
from benchmarks.kfac_classifier import ce, data, fit, mlp  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.groundtruth.attacks import (  # noqa: E402
    lira_scores,
    pool_advantage,
    pool_splits,
    quantized,
    rmia_scores,
    roc_metrics,
)

E = importlib.import_module("mis_lightning.estimation.estimate")
SCHEMES = ["none", "rtn_int8", "rtn_int4"]


def pool(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dg56's ``n`` training records, then ``n`` fresh records of their population (``[2 n, 20]``, ``[2 n]``)."""
    x, y = data(n, 20, 5, 0.5, 0)
    fx, fy = teacher_sample(n, 20, 5, 0.5, 0, n=n)
    return torch.cat([x, fx]), torch.cat([y, fy])


def fitted(act: str, decay: float, x: torch.Tensor, y: torch.Tensor, hidden: int = 80) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(0)  # dg56's (and ac36's) one initialisation
    model = mlp(20, [hidden], 5, act).double()
    g = fit(model, x, y, decay)
    return model.eval(), g


def indicator(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, decay: float, mode: str):
    """``assess`` of one target on its training records; returns the report and its CPU seconds."""
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(model, SCHEMES, DataLoader(TensorDataset(x, y), batch_size=250), ce, strict=False,
                        uncertainty_draws=0, estimation_config=EstimationConfig(mode=mode, weight_decay=decay))
    return rep, time.process_time() - t0


def attack(a: argparse.Namespace) -> None:
    n, decay = a.n, a.decay
    x, y = pool(n)
    member = pool_splits(2 * n, a.models, n, seed=a.seed)
    member[0] = np.arange(2 * n) < n  # model 0: dg56's model, on dg56's records
    t0 = time.process_time()
    models, grads = [], []
    for m in range(a.models):
        path = Path(a.load or a.save or "") / f"{a.act}_{decay:g}_{n}_{m}.pt"
        model = mlp(20, [80], 5, a.act).double().eval()
        if a.load and path.exists():
            model.load_state_dict(torch.load(path))
            grads.append(float("nan"))
        else:
            idx = torch.from_numpy(np.flatnonzero(member[m]))
            model, g = fitted(a.act, decay, x[idx], y[idx])
            grads.append(g)
            if a.save:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), path)
        models.append(model)
    t_fit = time.process_time() - t0
    acc = np.mean([float((mm(x[member[i]]).argmax(1) == y[member[i]]).double().mean()) for i, mm in enumerate(models)])
    print(f"== {a.act} 20-80-5, decay {decay:g}: n = {n}, pool {2 * n}, {a.models} models (train acc {acc:.3f}, "
          f"max |grad| {np.nanmax(grads) if not np.all(np.isnan(grads)) else float('nan'):.1e}; fits {t_fit:.0f} "
          "s CPU)", flush=True)
    best_attack = {}
    for sch in SCHEMES:
        sig = [signals(quantized(mm, sch), x, y) for mm in models]
        neg_loss, conf, py = (np.stack([s[k] for s in sig]) for k in range(3))
        scores = {"loss": neg_loss, "lira_on": lira_scores(conf, member, True),
                  "lira_off": lira_scores(conf, member, False),
                  "rmia_on": rmia_scores(py, member, True), "rmia_off": rmia_scores(py, member, False)}
        res = {k: pool_advantage(v, member, seed=a.seed) for k, v in scores.items()}
        own = {k: roc_metrics(v[0, member[0]], v[0, ~member[0]]).advantage for k, v in scores.items()}
        best = max(res, key=lambda k: res[k].advantage)
        best_attack[sch] = (res[best].advantage, res[best].advantage_se, best)
        print(f"  {sch:9s} " + " ".join(f"{k} {r.advantage:.4f}+-{r.advantage_se:.4f}" for k, r in res.items())
              + f" | best {best}; model 0's own max (TPR - FPR): "
              + " ".join(f"{k} {v:.3f}" for k, v in own.items())
              + f" (null of a per-target max {res[best].null_max_advantage:.3f})", flush=True)
    for mode in ("exact", "auto") if a.targets else ():
        rows = []
        for m in range(min(a.targets, a.models)):
            idx = torch.from_numpy(np.flatnonzero(member[m]))
            rep, t = indicator(models[m], x[idx], y[idx], decay, mode)
            pool_l = {s: rep.schemes[s].pool_leakage for s in SCHEMES}
            rows.append((pool_l, {s: rep.schemes[s].leakage for s in SCHEMES}))
            low = rep.diagnostics.get("diagonal_low_read")
            print(f"  indicator {mode} ({rep.estimation['mode']} / {rep.estimation['hessian']}), target {m}: pool_leakage "
                  + " / ".join(f"{pool_l[s]:.4f}" for s in SCHEMES) + "; leakage "
                  + " / ".join(f"{rows[-1][1][s]:.4f}" for s in SCHEMES)
                  + f"; flag {low and round(low['leverage_per_direction'], 4)}; {t:.1f} CPU s", flush=True)
        print(f"  {mode}: mean pool_leakage over the best attack "
              + " / ".join(f"{np.mean([r[0][s] for r in rows]):.4f}/{best_attack[s][0]:.4f} = "
                           f"{np.mean([r[0][s] for r in rows]) / best_attack[s][0]:.2f}" for s in SCHEMES), flush=True)


def _dg56_model(act: str, decay: float, n: int, hidden: int = 80) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    x, y = data(n, 20, 5, 0.5, 0)
    return fitted(act, decay, x, y, hidden)[0], x, y


def profile(a: argparse.Namespace) -> None:
    model, x, y = _dg56_model(a.act, a.decay, a.n, a.hidden)
    pr = cProfile.Profile()
    pr.enable()
    rep, t = indicator(model, x, y, a.decay, "exact")
    pr.disable()
    print(f"assess(estimation='exact'): {t:.1f} CPU s; {rep.estimation}", flush=True)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(a.top)
    pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)


def cost(a: argparse.Namespace) -> None:
    model, x, y = _dg56_model(a.act, a.decay, a.n, a.hidden)
    for r in range(a.repeats):
        for mode in ("exact", "auto"):
            rep, t = indicator(model, x, y, a.decay, mode)
            print(f"  round {r}: {mode} ({rep.estimation}) {t:.1f} CPU s; leakage "
                  + " / ".join(f"{rep.schemes[s].leakage:.6g}" for s in SCHEMES), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["attack", "profile", "cost"])
    ap.add_argument("act", choices=["relu", "tanh"])
    ap.add_argument("decay", type=float)
    ap.add_argument("--n", type=int, default=4000, help="records per model (the pool holds 2 n)")
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--targets", type=int, default=1, help="models whose indicator is computed (model 0: dg56's; 0: none)")
    ap.add_argument("--seed", type=int, default=0, help="pool_splits' seed (models 1 ..)")
    ap.add_argument("--save", default=None, help="folder: save each fitted model's state")
    ap.add_argument("--load", default=None, help="folder: load the models saved there (fit the missing ones)")
    ap.add_argument("--hidden", type=int, default=80, help="profile / cost: the hidden width (76: d = 1,981)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"uptime: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    {"attack": attack, "profile": profile, "cost": cost}[a.mode](a)


if __name__ == "__main__":
    main()
