"""The planner's choice against a brute force over every per-layer plan (pl44; docs/benchmarks.md, "pl44").

Three small models, each fitted to a minimum of its ridge objective by L-BFGS:

* ``mlp``: a tanh MLP regressor ``6 -> 12 -> 8 -> 1`` (3 weight matrices; candidates rtn int8 / int4 /
  int3 / int2: 64 plans);
* ``mlp_nobias``: the same without biases (tests/test_planner.py's fixture, pl46: through the exact
  estimator's own factor the biased ``mlp``'s float biases and row absmaxes observe every direction
  the gradient covariance keeps, so all its plans read the unquantized value; not run by default);
* ``clf``: a ReLU classifier ``8 -> 16 -> 12 -> 8 -> 3`` (4 Linear layers; rtn int8 / int4 / int2:
  81 plans), utility the validation cross-entropy;
* ``frozen``: a frozen random ``6 -> 16`` tanh backbone under a trained ``16 -> 8 -> 1`` head (the
  backbone's weight is quantized in the shipped model but not assessed; 4 candidates: 64 whole-model
  plans, 16 of them per assessed layer).

Every plan (a ``MixedPrecisionScheme`` naming every weight matrix, the frozen ones too) is scored by the
pipeline (``score_schemes`` on one estimate: the re-assessed leakage, the measured utility, the whole
model's bits per weight); for each budget the brute-force optimum is the planner's own objective
(``planning._best``: least leakage, leakages within ``LEAKAGE_TIE`` tied, then utility loss, then bits)
over the re-assessed plans that meet the budget. ``plan()`` runs on the same estimate; the table gives
both choices, the planner's re-assessed leakage gap to the optimum, whether its choice meets the budget
once re-assessed, and per model how far the search's proxy (leakage, additive utility) is from the
pipeline's figures over all plans and how it ranks them (Kendall's tau; rank of the true best plan).

    python benchmarks/pl44_planner_bruteforce.py                 # all three models
    python benchmarks/pl44_planner_bruteforce.py --models frozen
    python benchmarks/pl44_planner_bruteforce.py --models mlp_nobias
    python benchmarks/pl44_planner_bruteforce.py --models mlp_nobias clf --ab   # pl47
    python benchmarks/pl44_planner_bruteforce.py --models mlp_nobias --show 3,2,4   # one plan's figures

``--ab`` runs ``plan()`` twice per budget, without and with the interaction search
(``planning.INTERACTION_SEARCH``, pl47), alternated, and gives for each the choice, the gap, the
planner's own validation passes (per-layer and plan measurements; the re-assessment's are not
counted) and its CPU seconds (``time.process_time``, 1 thread).

Runtime (1 thread): about 1-2 CPU min per model.
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import planning
from mis_lightning.assess import _grid_moments, run_estimation, score_schemes
from mis_lightning.config import DEFAULT_CHUNK, EstimationConfig, ScoringConfig
from mis_lightning.evaluation import evaluate_utility
from mis_lightning.planning import PlanConfig, PlanInfeasibleError, plan
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.mixed import MixedPrecisionScheme

WD = 1e-3
SHORT = {"rtn_int8": "8", "rtn_int4": "4", "rtn_int3": "3", "rtn_int2": "2"}


def mse(o, t):
    return 0.5 * (o[:, 0] - t) ** 2


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def fit(model, X, Y, lossf):
    opt = torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad], max_iter=400,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = lossf(model(X), Y).mean() + 0.5 * WD * sum((p ** 2).sum() for p in model.parameters() if p.requires_grad)
        obj.backward()
        return obj

    for _ in range(3):
        opt.step(closure)


def build(kind):
    g = torch.Generator().manual_seed(0)
    n = 300
    torch.manual_seed(0)
    if kind == "clf":
        X = torch.randn(2 * n, 8, generator=g)
        Y = ((X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] * X[:, 3] > 0.3).long())
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                              nn.Linear(8, 3))
        lossf, cands = ce, ["rtn_int8", "rtn_int4", "rtn_int2"]
    else:
        X = torch.randn(2 * n, 6, generator=g)
        Y = torch.tanh(X @ torch.randn(6, generator=g) / 2) + 0.1 * torch.randn(2 * n, generator=g)
        if kind in ("mlp", "mlp_nobias"):  # mlp_nobias: tests/test_planner.py's fixture (pl46)
            bias = kind == "mlp"
            model = nn.Sequential(nn.Linear(6, 12, bias=bias), nn.Tanh(), nn.Linear(12, 8, bias=bias), nn.Tanh(),
                                  nn.Linear(8, 1, bias=bias))
        else:  # a frozen random backbone (as pretrained elsewhere) under a trained head
            model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
            model[0].requires_grad_(False)
        lossf, cands = mse, ["rtn_int8", "rtn_int4", "rtn_int3", "rtn_int2"]
    fit(model, X[:n], Y[:n], lossf)
    tr = DataLoader(TensorDataset(X[:n], Y[:n]), batch_size=100)
    va = DataLoader(TensorDataset(X[n:], Y[n:]), batch_size=300)
    return model, tr, va, lossf, cands


def budgets(truth):
    """Budgets that bind on this model: quantiles of the plans' re-assessed utility losses and
    whole-model bits per weight (3 significant digits)."""
    ul = sorted(v[1] for v in truth.values())
    bits = sorted(v[2] for v in truth.values())

    def q(xs, f):
        return float(f"{xs[min(len(xs) - 1, int(f * len(xs)))]:.3g}")

    return [dict(max_utility_loss=q(ul, 0.15)), dict(max_utility_loss=q(ul, 0.4)), dict(max_utility_loss=q(ul, 0.7)),
            dict(max_utility_loss=q(ul, 0.4), max_bits=q(bits, 0.5)), dict(max_bits=q(bits, 0.3))]


def short(choices, layers):
    """``8,4,f``: the candidate of each weight matrix (``f``: left in float)."""
    return ",".join(SHORT.get(choices.get(w, "float"), "f") for w in layers)


def kendall(a, b):
    n, s, t = len(a), 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            x = (a[i] - a[j]) * (b[i] - b[j])
            s += (x > 0) - (x < 0)
            t += 1
    return s / max(t, 1)


def plan_once(model, tr, va, lossf, est, cands, b, weights, float_u, cfg, bt, search):
    """One ``plan()`` with ``planning.INTERACTION_SEARCH = search``: the table's cells (choice,
    gap, within) and the planner's validation passes and CPU seconds."""
    passes = []
    real = planning.evaluate_utility

    def counted(*a, **k):
        passes.append(1)
        return real(*a, **k)

    flag = planning.INTERACTION_SEARCH
    planning.INTERACTION_SEARCH, planning.evaluate_utility = search, counted
    t0 = time.process_time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = plan(model, None, tr, lossf, val_dataloader=va, estimate=est, config=PlanConfig(candidates=cands, **b))
    except PlanInfeasibleError as e:
        return f"PlanInfeasibleError ({str(e).split(': ', 1)[-1][:60]}...)", "-", "-", len(passes), 0.0
    finally:
        planning.INTERACTION_SEARCH, planning.evaluate_utility = flag, real
    cpu = time.process_time() - t0
    r = res.chosen.result
    mb = r.model_bits_per_weight
    ch = {w: s.name for w in weights for s in [res.scheme.scheme_for(w)] if s is not None}
    pt = f"{short(ch, weights)} ({r.leakage:.4f}, {(r.utility['loss'] - float_u) / float_u:+.2%}, {mb:.3g})"
    gap = "-" if bt is None else f"{r.leakage / bt[0] - 1:+.2%}"
    within = "yes" if res.within_budget and planning._meets(
        (r.leakage, (r.utility["loss"] - float_u) / float_u, mb), cfg) else "NO"
    return pt, gap, within, len(passes), cpu


def run(kind, ab=False, show=()):
    model, tr, va, lossf, cands = build(kind)
    est = run_estimation(model, tr, lossf, EstimationConfig(weight_decay=WD))
    sc = ScoringConfig()
    weights = [n for n, p in model.named_parameters() if n.endswith("weight")]
    assessed = [w for w in weights if w in est.theta]
    plans = list(itertools.product(cands, repeat=len(weights)))
    schemes = [MixedPrecisionScheme(dict(zip(weights, p)), name="p" + "".join(SHORT[c] for c in p)) for p in plans]
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = score_schemes(est, model, schemes, scoring_config=sc, val_dataloader=va, loss_fn=lossf)
    t_bf = time.process_time() - t0
    float_u = evaluate_utility(model, va, lossf)["loss"]
    truth = {}
    for p, s in zip(plans, schemes):
        r = rep.schemes[s.name]
        truth[p] = (r.leakage, (r.utility["loss"] - float_u) / float_u, r.model_bits_per_weight)
    # the search's proxy over every plan of the assessed weights (the frozen weights at int8, their
    # leakage is not in it): the planner's own step 2 and _Proxy
    kappas, m4s, grids = [], [], []
    du = {}
    for c in cands:
        q = get_scheme(c).apply(model, params=est.names)
        ks, ms = {}, {}
        for name, gr in q.grids.items():
            if name in est.theta:
                ks[name], ms[name], _ = _grid_moments(gr, est.theta[name], est.sigma[name], DEFAULT_CHUNK)
        kappas.append(ks)
        m4s.append(ms)
        grids.append({k: v for k, v in q.grids.items() if k in est.theta})
        for w in weights:
            qm = MixedPrecisionScheme({w: c}).apply(model).model
            du[w, c] = evaluate_utility(qm, va, lossf)["loss"] - float_u
    proxy = planning._Proxy(est, kappas, assessed, sc, m4s=m4s, grids=grids if est.influence is not None else None)
    pred = {}
    for p in plans:
        ch = dict(zip(weights, p))
        idx = [cands.index(ch[w]) for w in assessed]
        pred[p] = (proxy(idx, planning.SEARCH_DRAW_FRACTION), sum(du[w, ch[w]] for w in weights) / float_u)
    lk_err = max(abs(pred[p][0] / truth[p][0] - 1) for p in plans)
    u_err = max(abs(pred[p][1] - truth[p][1]) for p in plans)
    tau = kendall([pred[p][0] for p in plans], [truth[p][0] for p in plans])
    print(f"\n## {kind}: {sum(p.numel() for p in model.parameters())} weights, assessed {est.d}; layers "
          f"{weights} (assessed: {assessed}); float loss {float_u:.4g}, leakage {rep.baseline_leakage:.4g}; "
          f"brute force {len(plans)} plans in {t_bf:.1f} CPU s")
    print(f"proxy vs pipeline over all {len(plans)} plans: leakage max rel. error {lk_err:.2%}, Kendall tau "
          f"{tau:.3f}; additive utility loss max abs. error {u_err:.4f} (relative to the float loss)")
    for p in plans:
        name = short(dict(zip(weights, p)), weights)
        if name in show:
            print(f"plan {name}: utility loss additive prediction {pred[p][1]:+.2%}, measured {truth[p][1]:+.2%}; "
                  f"leakage proxy {pred[p][0]:.4f}, measured {truth[p][0]:.4f}")
    if ab:
        print("| budget | brute-force best (leak, loss, b/w) | additive search (before pl47) | gap | within | passes "
              "| CPU s | interaction search (pl47) | gap | within | passes | CPU s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        print("| budget | brute-force best (leak, loss, b/w) | planner's choice (re-assessed) | gap | within "
              "| rank by proxy |")
        print("|---|---|---|---|---|---|")
    for b in budgets(truth):
        cfg = PlanConfig(candidates=cands, **b)
        ok = [p for p in plans if planning._meets(truth[p], cfg)]
        btxt = ", ".join(f"{k}={v}" for k, v in b.items())
        if ok:
            best = ok[planning._best([truth[p] for p in ok], cfg)]
            bt = truth[best]
            btext = f"{short(dict(zip(weights, best)), weights)} ({bt[0]:.4f}, {bt[1]:+.2%}, {bt[2]:.3g})"
            # the true best's rank among the plans the proxy puts within the budget, by the proxy
            okp = [p for p in plans if planning._meets((pred[p][0], pred[p][1], truth[p][2]), cfg)]
            order = sorted(okp, key=lambda p: (pred[p][0], pred[p][1]))
            rank = str(order.index(best) + 1) + f"/{len(okp)}" if best in okp else "not within by proxy"
        else:
            btext, rank, bt = "none within", "-", None
        args = (model, tr, va, lossf, est, cands, b, weights, float_u, cfg, bt)
        if not ab:
            pt, gap, within, _, _ = plan_once(*args, planning.INTERACTION_SEARCH)
            print(f"| {btxt} | {btext} | {pt} | {gap} | {within} | {rank} |")
            continue
        # alternated twice (old, new, new, old): the CPU seconds are the means of each pair
        o1, n1, n2, o2 = (plan_once(*args, f) for f in (False, True, True, False))
        print(f"| {btxt} | {btext} | {o1[0]} | {o1[1]} | {o1[2]} | {o1[3]} | {(o1[4] + o2[4]) / 2:.2f} | {n1[0]} | {n1[1]} "
              f"| {n1[2]} | {n1[3]} | {(n1[4] + n2[4]) / 2:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["mlp", "clf", "frozen"])
    ap.add_argument("--ab", action="store_true", help="plan() without and with the interaction search (pl47)")
    ap.add_argument("--show", nargs="*", default=[], metavar="PLAN",
                    help="plans (as in the tables: 3,2,4) whose predicted and measured figures to print")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for k in a.models:
        run(k, a.ab, tuple(a.show))
