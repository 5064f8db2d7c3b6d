"""Reference-model attacks in the pool protocol against the indicator on kc32's ReLU CNN
classifier (docs/validation.md "The ReLU CNN's quantized figures"; ac36's ``classifier_pool_attacks.py`` for MLPs).

Pool = ``2 n`` records of ``benchmarks/kfac_conv.py``'s ``cnn`` case (8 x 8 one-channel images,
AR(1) ``--rho`` along both axes; 4 classes from the signs of two half-image means, 20% of the
labels redrawn at random). ``--models`` copies of the case's
``Conv2d(1, 4, 3) -> ReLU -> MaxPool -> Conv2d(4, 8, 3) -> ReLU -> global average pool ->
Linear(8, 4)`` (d = 372), all from the case's one initialisation, each fitted by kfac_conv's
full-batch L-BFGS in float64 on the mean cross-entropy + ``decay / 2 |theta|^2`` over a random half
(``pool_splits``). Every model is released under each scheme (``rtn_*``: rounded weights, float
biases) and in turn is the target with the others as its references. Attacks, advantage and
indicator as in ``classifier_pool_attacks.py`` (loss, LiRA online / offline, RMIA online /
offline; pooled-ROC ``TPR - FPR``, mean +- s.e. over the targets; ``pool_leakage`` of
``run_estimation`` + ``score_schemes`` with ``uncertainty_draws=0`` for the first ``--targets``
models under each of ``--modes``: ``diagonal`` is the default estimator's path on large models,
``exact`` the sandwich that ``estimation="auto"`` picks at this d).

Per target the script also prints the exact estimator's ingredients (``gradient_ranks``): the rank
of the centred per-record gradients, the objective Hessian's spectrum, the share of the sandwich's
trace along its largest single eigen-direction and the twelve ReLU scale symmetries' share.

    PYTHONPATH=. python benchmarks/cnn_pool_attacks.py --models 16 --targets 5   # docs/validation.md, "The ReLU CNN's quantized figures"

``--anatomy``: kc32's one model (``kfac_conv.py``'s fit on ``--n`` records), the same ingredients and
both estimators' figures after the fit and after each of ``--refit`` further fit calls:

    PYTHONPATH=. python benchmarks/cnn_pool_attacks.py --anatomy --refit 2 --modes exact diagonal
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.classifier_pool_attacks import signals  # noqa: E402
from benchmarks.kfac_conv import case, ce, fit  # noqa: E402
from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.groundtruth.attacks import (  # noqa: E402
    lira_scores,
    pool_advantage,
    pool_splits,
    quantized,
    rmia_scores,
)


def symmetry_directions(model: nn.Sequential) -> torch.Tensor:
    """``[12, d]`` the ReLU scale symmetries of kc32's CNN at its parameters: scaling output channel
    ``c`` of a convolution (weights and bias) by ``a`` and the next layer's input channel ``c`` by
    ``1 / a`` leaves the function unchanged (ReLU, max- and average pooling are positively
    homogeneous), so ``d theta / d log a`` is a flat direction of the data loss."""
    params = [p.detach() for p in model.parameters()]  # 0.w, 0.b, 3.w, 3.b, 7.w, 7.b
    sizes = [p.numel() for p in params]
    offs = np.cumsum([0] + sizes)
    rows = []
    for (wi, bi, nxt), ch in (((0, 1, 2), params[0].shape[0]), ((2, 3, 4), params[2].shape[0])):
        for c in range(ch):
            v = [torch.zeros_like(p) for p in params]
            v[wi][c] = params[wi][c]
            v[bi][c] = params[bi][c]
            v[nxt][:, c] = -params[nxt][:, c]
            rows.append(torch.cat([t.reshape(-1) for t in v]))
    assert offs[-1] == rows[0].numel()
    return torch.stack(rows)


def gradient_ranks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, decay: float) -> dict:
    """The exact estimator's ingredients at ``model``: rank of the centred per-record gradients
    (``rtol`` 1e-10), the spectrum of ``H_lam = H_data + decay I`` (the objective's Hessian; eigenvalues
    below ``decay`` are directions where the data curvature is negative or far below the decay's),
    how much of ``tr(Sigma)``, ``Sigma = H_lam^-1 V H_lam^-1`` (``V`` the centred gradients'
    covariance), lies along the single eigen-direction that carries most of it (its curvature in
    units of ``decay``, its overlap with the ReLU scale symmetries), the symmetries' share of
    ``tr(Sigma)`` and their largest relative gradient (~1e-16: they are symmetries)."""
    names = [k for k, _ in model.named_parameters()]
    theta = {k: p.detach() for k, p in model.named_parameters()}

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return ce(out, yi.unsqueeze(0))[0]

    g = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(theta, x, y)
    G = torch.cat([g[k].reshape(len(x), -1) for k in names], 1)
    Gc = G - G.mean(0)
    s = torch.linalg.svdvals(Gc)
    rank_g = int((s > 1e-10 * s[0]).sum())

    def obj(flat: torch.Tensor) -> torch.Tensor:
        p, o = {}, 0
        for k in names:
            p[k] = flat[o:o + theta[k].numel()].reshape(theta[k].shape)
            o += theta[k].numel()
        return ce(torch.func.functional_call(model, p, (x,)), y).mean()

    flat = torch.cat([theta[k].reshape(-1) for k in names])
    H = torch.func.hessian(obj)(flat) + decay * torch.eye(len(flat), dtype=flat.dtype)
    h, U = torch.linalg.eigh(H)
    V = Gc.T @ Gc / len(x)
    Vt = U.T @ V @ U
    Sig = U @ (Vt / h[:, None] / h[None, :]) @ U.T
    contrib = torch.diag(Vt) / h.square()  # each eigen-direction's part of tr(Sigma)
    top = int(contrib.argmax())
    S = symmetry_directions(model)
    Q = torch.linalg.qr(S.T).Q  # [d, 12]
    return {"d": int(len(flat)), "n": len(x), "rank_centred_gradients": rank_g,
            "H_eig_min_over_decay": float(h[0] / decay), "H_eig_max": float(h[-1]),
            "H_eigs_below_decay": int((h < decay).sum()), "H_eigs_negative": int((h < 0).sum()),
            "top_direction_share_of_trace": float(contrib[top] / contrib.sum()),
            "top_direction_curvature_over_decay": float(h[top] / decay),
            "top_direction_symmetry_overlap": float((Q.T @ U[:, top]).square().sum()),
            "symmetry_share_of_trace": float(torch.trace(Q.T @ Sig @ Q) / torch.trace(Sig)),
            "symmetry_grad_rel": float((G @ S.T).abs().max() / G.abs().max())}


def anatomy(a: argparse.Namespace) -> None:
    """kc32's single model (``kfac_conv.py --cases cnn``: the same data, initialisation and fit on
    ``--n`` records), then ``--refit`` more calls of the same L-BFGS fit: after each, the largest
    gradient, :func:`gradient_ranks` and the exact / diagonal estimators' ``leakage`` per scheme."""
    import mis_lightning as ml

    model, _, x, y = case("cnn", a.n, a.rho, a.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=250)
    for r in range(1 + a.refit):
        grad = fit(model, ce, x, y, a.decay)
        model.eval()
        info = gradient_ranks(model, x, y, a.decay)
        print(f"fit calls {r + 1}: max |grad| {grad:.1e}; " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()), flush=True)
        for mode in a.modes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = ml.assess(model, a.schemes, loader, ce, estimation=mode, uncertainty_draws=0,
                                weight_decay=a.decay)
            print(f"  {mode}: leakage none {rep.baseline_leakage:.4f} " + " ".join(
                f"{s} {rep.schemes[s].leakage:.4f}" for s in a.schemes) + f"; pool_leakage none "
                f"{rep.baseline_pool_leakage:.4f} " + " ".join(f"{s} {rep.schemes[s].pool_leakage:.4f}"
                                                              for s in a.schemes), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="records per model (the pool holds 2 n)")
    ap.add_argument("--rho", type=float, default=0.9)
    ap.add_argument("--decay", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--targets", type=int, default=5, help="models whose indicator is computed")
    ap.add_argument("--schemes", nargs="+", default=["rtn_int8", "rtn_int6", "rtn_int4"])
    ap.add_argument("--modes", nargs="+", default=["exact", "diagonal"])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--only", nargs="+", type=int, default=None,
                    help="fit only these models and compute their indicator, no attacks (the same figures as a "
                         "full run's for those targets: one process per target on a loaded machine)")
    ap.add_argument("--save", default=None, help="write each fitted model's state to DIR/model_M.pt")
    ap.add_argument("--load", default=None, help="read the models from DIR/model_M.pt (written by --save) "
                                                 "instead of fitting them")
    ap.add_argument("--fit-only", action="store_true", help="with --only and --save: no indicator")
    ap.add_argument("--anatomy", action="store_true", help="kc32's one model instead of the pool (anatomy())")
    ap.add_argument("--refit", type=int, default=0, help="--anatomy: further fit calls")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.anatomy:
        anatomy(a)
        return
    t0 = time.process_time()
    N = 2 * a.n
    init, _, x, y = case("cnn", N, a.rho, a.seed)
    member = pool_splits(N, a.models, a.n, seed=a.seed)
    models, grads = [], []
    fitted = list(range(a.models)) if a.only is None else a.only
    for m in fitted:
        model = copy.deepcopy(init)  # one initialisation for all
        idx = torch.from_numpy(np.flatnonzero(member[m]))
        if a.load:
            saved = torch.load(Path(a.load) / f"model_{m}.pt")
            model.load_state_dict(saved["state"])
            grads.append(saved["max_grad"])
        else:
            grads.append(fit(model, ce, x[idx], y[idx], a.decay))
        if a.save:
            Path(a.save).mkdir(parents=True, exist_ok=True)
            torch.save({"state": model.state_dict(), "max_grad": grads[-1]}, Path(a.save) / f"model_{m}.pt")
        models.append(model.eval())
    t_fit = time.process_time() - t0
    d = sum(p.numel() for p in models[0].parameters())
    with torch.no_grad():
        acc = [float((mm(x[member[i]]).argmax(1) == y[member[i]]).double().mean()) for i, mm in zip(fitted, models)]
        acc_out = [float((mm(x[~member[i]]).argmax(1) == y[~member[i]]).double().mean()) for i, mm in zip(fitted, models)]
    print(f"ReLU CNN (kc32), decay {a.decay:g}, rho {a.rho:g}, seed {a.seed}: d = {d}, n = {a.n}, pool {N}, "
          f"{len(fitted)} of {a.models} models (train acc {np.mean(acc):.3f}, held-out {np.mean(acc_out):.3f}, max |grad| "
          f"{max(grads):.1e}; fit {t_fit:.0f} s CPU)", flush=True)
    out: dict = {"config": vars(a), "d": d, "train_acc": float(np.mean(acc)), "test_acc": float(np.mean(acc_out)),
                 "max_grad": max(grads), "attacks": {}, "indicator": {}, "ranks": []}
    for sch in ["none"] + a.schemes if a.only is None else []:
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
    targets = list(range(min(a.targets, a.models))) if a.only is None else [] if a.fit_only else a.only
    for m in targets:
        idx = torch.from_numpy(np.flatnonzero(member[m]))
        r = gradient_ranks(models[fitted.index(m)], x[idx], y[idx], a.decay)
        out["ranks"].append(r)
        print(f"  target {m}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in r.items()), flush=True)
    for mode in a.modes if targets else []:
        rows = []
        for m in targets:
            idx = torch.from_numpy(np.flatnonzero(member[m]))
            loader = DataLoader(TensorDataset(x[idx], y[idx]), batch_size=250)
            model = models[fitted.index(m)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = run_estimation(model, loader, ce, EstimationConfig(mode=mode, weight_decay=a.decay))
                rep = score_schemes(est, model, a.schemes, uncertainty_draws=0)
            rows.append({"none": {"pool_leakage": rep.baseline_pool_leakage, "leakage": rep.baseline_leakage}}
                        | {s: {"pool_leakage": rep.schemes[s].pool_leakage, "leakage": rep.schemes[s].leakage}
                           for s in a.schemes} | {"estimator": est.estimator, "warnings": list(rep.warnings)})
            print(f"    target {m} {mode}: pool_leakage " + " ".join(
                f"{s} {rows[-1][s]['pool_leakage']:.4f}" for s in ["none"] + a.schemes), flush=True)
        out["indicator"][mode] = rows
        for key in ("pool_leakage", "leakage"):
            print(f"  indicator {mode} ({rows[0]['estimator']}), {key} mean over {len(rows)} targets: " + " ".join(
                f"{s} {np.mean([r[s][key] for r in rows]):.4f} (sd {np.std([r[s][key] for r in rows]):.4f})"
                for s in ["none"] + a.schemes), flush=True)
    print(f"  CPU: fit {t_fit:.0f} s, attacks {t_att:.0f} s, ranks + indicator "
          f"{time.process_time() - t0 - t_fit - t_att:.0f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
