"""Reference-model attacks in the pool protocol against the indicator on kf33's ReLU MLP
classifiers at d > n (docs/validation.md "The correlated headline of ReLU MLP classifiers at d > n"; "Reference-model attacks in the pool protocol
(issue 11)" for the protocol).

Pool = ``2 n`` records of ``benchmarks/kfac_classifier.py``'s data (AR(1) ``--rho`` Gaussian inputs,
labels from a random tanh teacher's softmax; seed ``--seed``). ``--models`` MLPs (``--act``,
``--hidden``, ``--classes``), each fitted by kfac_classifier's full-batch L-BFGS in float64 on the
mean cross-entropy + ``decay / 2 |theta|^2`` over a random half (``pool_splits``), all from one
fixed initialisation (the same basin and hidden-unit order). Every model is released under each
scheme (the library's ``rtn_*``: rounded weights, float biases), and in turn is the target with
the others as its references. Black-box attacks (``mis_lightning.groundtruth.attacks``) on the
released model's outputs: loss threshold; LiRA online / offline on LiRA's logit-scaled confidence
``log p_y - log(1 - p_y)``; RMIA online / offline on ``p_y``. Advantage = ``TPR - FPR`` at one
threshold for all targets (``pool_advantage``), mean +- s.e. over the targets; ``null`` is the
per-target maximum with the labels permuted (the bias of a per-target maximum, printed for
reference; the pooled advantage has none to speak of).

Indicator: ``assess``'s estimation and scoring (``run_estimation`` + ``score_schemes``,
``uncertainty_draws=0``) of the first ``--targets`` models on their own training halves, under
``estimation="exact"`` and ``"diagonal"`` (defaults), ``pool_leakage`` per scheme (the pool
protocol's indicator: method.md section 3, "Pool protocol"). ``--modes exact-eigen``: the exact estimator
with the full correlated form in ``R``'s own eigenspace (``estimate.SANDWICH_FACTOR = False``, cf45's form)
instead of the sandwich's own factor (rc46), on the same models (acc46); ``--data pl44``: pl44's clf
records instead of kfac_classifier's.

    PYTHONPATH=. python benchmarks/classifier_pool_attacks.py --models 16 --targets 5   # docs/validation.md, "The correlated headline of ReLU MLP classifiers at d > n"
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kfac_classifier import ce, data, fit, mlp  # noqa: E402
from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.groundtruth.attacks import (  # noqa: E402
    lira_scores,
    pool_advantage,
    pool_splits,
    quantized,
    rmia_scores,
)

E = importlib.import_module("mis_lightning.estimation.estimate")  # the module (the package exports a function of that name)
ATTACKS = ["loss", "lira_on", "lira_off", "rmia_on", "rmia_off"]


@torch.no_grad()
def signals(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[N]`` negative loss, LiRA's logit-scaled confidence and ``p_y`` of ``model`` on the pool
    (float inputs in the model's dtype; token ids as they are)."""
    logits = model(x.to(next(model.parameters()).dtype) if x.is_floating_point() else x).double()
    lp = torch.log_softmax(logits, 1)
    lpy = lp.gather(1, y.unsqueeze(1)).squeeze(1)
    others = lp.scatter(1, y.unsqueeze(1), float("-inf")).logsumexp(1)  # log(1 - p_y), stable
    return lpy.numpy(), (lpy - others).numpy(), lpy.exp().clamp(1e-300, 1.0).numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--act", default="relu", choices=["relu", "tanh"])
    ap.add_argument("--hidden", nargs="*", type=int, default=[80])
    ap.add_argument("--fan", type=int, default=20)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000, help="records per model (the pool holds 2 n)")
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--data", choices=["kfac", "pl44"], default="kfac",
                    help="pl44: pl44's clf records (benchmarks/pl44_planner_bruteforce.py: 8 N(0, 1) inputs, 3 classes "
                         "by a fixed rule; the pool is its 2 n records at n = 300); needs --fan 8 --classes 3")
    ap.add_argument("--decay", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--targets", type=int, default=5, help="models whose indicator is computed")
    ap.add_argument("--fit-rounds", type=int, default=3)
    ap.add_argument("--schemes", nargs="+", default=["rtn_int8", "rtn_int4"])
    ap.add_argument("--modes", nargs="+", default=["exact", "diagonal"],
                    help="exact, diagonal, or exact-eigen (exact, scored in R's own eigenspace: cf45's form)")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.process_time()
    N = 2 * a.n
    if a.data == "pl44":
        if (a.fan, a.classes) != (8, 3):
            raise SystemExit("--data pl44 needs --fan 8 --classes 3")
        g = torch.Generator().manual_seed(0)  # pl44_planner_bruteforce.build("clf")'s records
        x = torch.randn(N, 8, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] * x[:, 3] > 0.3).long()
        x = x.double()
    else:
        x, y = data(N, a.fan, a.classes, a.rho, a.seed)
    member = pool_splits(N, a.models, a.n, seed=a.seed)
    models = []
    grads = []
    for m in range(a.models):
        torch.manual_seed(a.seed)  # one initialisation for all
        model = mlp(a.fan, a.hidden, a.classes, a.act).double()
        idx = torch.from_numpy(np.flatnonzero(member[m]))
        grads.append(fit(model, x[idx], y[idx], a.decay, a.fit_rounds))
        models.append(model.eval())
    t_fit = time.process_time() - t0
    d = sum(p.numel() for p in models[0].parameters())
    acc = np.mean([float((mm(x[member[i]]).argmax(1) == y[member[i]]).double().mean()) for i, mm in enumerate(models)])
    print(f"{a.act} {a.fan}-{'-'.join(map(str, a.hidden))}-{a.classes}, decay {a.decay:g}, seed {a.seed}: d = {d}, "
          f"n = {a.n}, pool {N}, {a.models} models (train acc {acc:.3f}, max |grad| {max(grads):.1e}; fit "
          f"{t_fit:.0f} s CPU)", flush=True)
    out: dict = {"config": vars(a), "d": d, "train_acc": acc, "max_grad": max(grads), "attacks": {}, "indicator": {}}
    for sch in ["none"] + a.schemes:
        sig = [signals(quantized(mm, sch), x, y) for mm in models]
        neg_loss, conf, py = (np.stack([s[k] for s in sig]) for k in range(3))
        scores = {"loss": neg_loss, "lira_on": lira_scores(conf, member, True), "lira_off": lira_scores(conf, member, False),
                  "rmia_on": rmia_scores(py, member, True), "rmia_off": rmia_scores(py, member, False)}
        res = {k: pool_advantage(v, member, seed=a.seed) for k, v in scores.items()}
        out["attacks"][sch] = {k: vars(r) for k, r in res.items()}
        best = max(res, key=lambda k: res[k].advantage)
        print(f"  {sch:9s} " + " ".join(f"{k} {r.advantage:.4f}+-{r.advantage_se:.4f}" for k, r in res.items())
              + f" | best {best}; per-target max {res[best].max_advantage:.4f} (null {res[best].null_max_advantage:.4f})",
              flush=True)
    t_att = time.process_time() - t0 - t_fit
    for mode in a.modes:
        rows = []
        for m in range(min(a.targets, a.models)):
            idx = torch.from_numpy(np.flatnonzero(member[m]))
            loader = DataLoader(TensorDataset(x[idx], y[idx]), batch_size=250)
            old = E.SANDWICH_FACTOR
            E.SANDWICH_FACTOR = mode != "exact-eigen"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    est = run_estimation(models[m], loader, ce, EstimationConfig(mode=mode.split("-")[0],
                                                                                 weight_decay=a.decay))
                    rep = score_schemes(est, models[m], a.schemes, uncertainty_draws=0)
            finally:
                E.SANDWICH_FACTOR = old
            rows.append({"none": {"pool_leakage": rep.baseline_pool_leakage, "leakage": rep.baseline_leakage}}
                        | {s: {"pool_leakage": rep.schemes[s].pool_leakage, "leakage": rep.schemes[s].leakage}
                           for s in a.schemes} | {"covariance": rep.estimation.get("covariance")})
        out["indicator"][mode] = rows
        print(f"  indicator {mode} ({rows[0]['covariance']}), pool_leakage mean over {len(rows)} targets: " + " ".join(
            f"{s} {np.mean([r[s]['pool_leakage'] for r in rows]):.4f} (sd {np.std([r[s]['pool_leakage'] for r in rows]):.4f})"
            for s in ["none"] + a.schemes) + "; leakage: " + " ".join(
            f"{s} {np.mean([r[s]['leakage'] for r in rows]):.4f}" for s in ["none"] + a.schemes), flush=True)
    print(f"  CPU: fit {t_fit:.0f} s, attacks {t_att:.0f} s, indicator {time.process_time() - t0 - t_fit - t_att:.0f} s",
          flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
