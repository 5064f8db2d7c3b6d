"""The diagonal estimator against the exact one on small MLP classifiers (cross-entropy, several
outputs per record: the per-layer program), with the K-FAC correction off and on (kf33; method.md
section 4, "The diagonal sandwich and correlated weights").

Each case: ``--fan`` Gaussian inputs (AR(1) of correlation ``--rho`` along the features), labels
drawn from a random teacher MLP's softmax (noisy: no separable fit), an MLP of ``--hidden`` widths
(``relu`` or ``tanh``) with ``--classes`` outputs fitted to its stationary point (full-batch
L-BFGS in float64 on the mean cross-entropy + ``decay / 2 |theta|^2``, the decay given to the
estimators). Then ``estimation="exact"`` (its default Hessian: the autograd one) and
``estimation="diagonal"`` (its default: the Gauss-Newton diagonal at d > 2,000) with the
correction ``off`` (``estimate.KFAC_CORRECTION = False``: every classifier's path before kf33) and on;

``sigma`` runs the correction with the gradients' influences (``estimate.KFAC_INFLUENCES = False``),
``on`` with the psi influences too (the library's default). Printed:

* ``sigma``: the diagonal estimator's over the exact sandwich's, per parameter tensor (median,
  min, max of the ratio);
* the headline: the unquantized baseline and every scheme's leakage, diagonal over exact
  (``uncertainty_draws=0``), with each scheme's median grid step over the exact sigma (the 5%
  target holds where the step is at most the weight's sd).

    PYTHONPATH=. python benchmarks/kfac_classifier.py                    # docs/validation.md, "The K-FAC correction for MLP classifiers (2026-12-03)"
    PYTHONPATH=. python benchmarks/kfac_classifier.py --hidden 36 36 --fan 16 --classes 10 --decay 1e-3 0

``--cost``: the estimation pass (``estimate(mode="diagonal")``, its defaults) on a ReLU MLP
classifier of ~1e6 weights (784-1024-256-10, ``--n`` records in batches of 256), correction off
and on, interleaved ``--repeats`` times in one process; CPU seconds (``time.process_time``):

    PYTHONPATH=. python benchmarks/kfac_classifier.py --cost --n 4096   # docs/benchmarks.md, "kf33"
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mis_lightning as ml  # noqa: E402
from benchmarks.kfac_conv import kfac_on_off_cost  # noqa: E402
from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402

E = importlib.import_module("mis_lightning.estimation.estimate")
SCHEMES = ["rtn_int8", "rtn_int6", "rtn_int4"]
QMAX = {"rtn_int8": 127, "rtn_int6": 31, "rtn_int4": 7}


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def mlp(fan: int, hidden: list[int], classes: int, act: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(fan, h), nn.ReLU() if act == "relu" else nn.Tanh()]
        fan = h
    return nn.Sequential(*layers, nn.Linear(fan, classes))


def data(n: int, fan: int, classes: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AR(1) Gaussian inputs ``[n, fan]`` and labels sampled from a random tanh teacher's softmax."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, fan, generator=g, dtype=torch.float64)
    for t in range(1, fan):
        x[:, t] = rho * x[:, t - 1] + (1 - rho * rho) ** 0.5 * x[:, t]
    w1 = torch.randn(fan, 16, generator=g, dtype=torch.float64) / fan ** 0.5
    w2 = torch.randn(16, classes, generator=g, dtype=torch.float64) * 2.0
    logits = torch.tanh(x @ w1 * 2) @ w2
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).reshape(-1)
    return x, y


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, decay: float, rounds: int = 3) -> float:
    """Full-batch L-BFGS (``rounds`` calls of up to 1,000 iterations) on the mean loss + decay / 2
    |theta|^2; returns the largest |gradient|."""
    opt = torch.optim.LBFGS(list(model.parameters()), lr=1.0, max_iter=1000, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        obj = ce(model(x), y).mean() + decay / 2 * sum(p.square().sum() for p in model.parameters())
        obj.backward()
        return obj

    for _ in range(rounds):
        opt.step(closure)
    closure()
    return max(float(p.grad.abs().max()) for p in model.parameters())


def run(model: nn.Module, loader: DataLoader, mode: str, decay: float, hessian: str = "auto"):
    cfg = EstimationConfig(mode=mode, hessian=hessian, weight_decay=decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = run_estimation(model, loader, ce, cfg)
        rep = score_schemes(est, model, SCHEMES, uncertainty_draws=0)
    return est, rep


def compare(a: argparse.Namespace, act: str, decay: float, seed: int) -> list[float]:
    """One case; returns the corrected headline ratios (baseline, then SCHEMES)."""
    t0 = time.process_time()
    x, y = data(a.n, a.fan, a.classes, a.rho, seed)
    torch.manual_seed(seed)
    model = mlp(a.fan, a.hidden, a.classes, act).double()
    grad = fit(model, x, y, decay, a.fit_rounds)
    t_fit = time.process_time() - t0
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=250)
    d = sum(p.numel() for p in model.parameters())
    acc = float((model(x).argmax(1) == y).double().mean())
    exact, ref = run(model, loader, "exact", decay)
    print(f"{act} {a.fan}-{'-'.join(map(str, a.hidden))}-{a.classes}, decay {decay:g}, seed {seed}: d = {d}, "
          f"n = {a.n}, rho {a.rho:g}, train acc {acc:.2f}, max |grad| {grad:.1e} (fit {t_fit:.0f} s, exact "
          f"{time.process_time() - t0 - t_fit:.0f} s CPU); exact ({exact.estimator}) "
          f"baseline {ref.baseline_leakage:.4f} " + " ".join(f"{s} {ref.schemes[s].leakage:.4f}" for s in SCHEMES),
          flush=True)
    params = dict(model.named_parameters())
    steps = []
    for s in SCHEMES:  # rtn: symmetric absmax per row, step = max|W_r| / qmax
        r = torch.cat([(params[k].detach().abs().amax(1, keepdim=True) / QMAX[s] / exact.sigma[k].reshape(params[k].shape))
                       .reshape(-1) for k in exact.names if params[k].dim() == 2])
        steps.append(f"{s} {float(r.median()):.2f}")
    print(f"  median grid step / exact sigma: {' '.join(steps)}", flush=True)
    out: list[float] = []
    # off: no correction (the code before kf33 on classifiers); sigma: the sigma factor with the
    # gradients' influences (estimate.KFAC_INFLUENCES = False); on: sigma and the psi influences
    for on in ["off"] + (["sigma", "on"] if a.factors else []):
        E.KFAC_CORRECTION, E.KFAC_INFLUENCES = on != "off", on == "on"
        try:
            diag, rep = run(model, loader, "diagonal", decay, a.hessian)
        finally:
            E.KFAC_CORRECTION, E.KFAC_INFLUENCES = True, True
        dg = diag.diagnostics
        print(f"  K-FAC {on:5s} ({diag.estimator}): correction {dg.get('kfac_correction', 'n/a')}, "
              f"median VIF {dg.get('kfac_variance_inflation_median', float('nan')):.3g}, p90 "
              f"{dg.get('kfac_variance_inflation_p90', float('nan')):.3g}, psi influences "
              f"{dg.get('kfac_influences', 0)}, uncorrected {dg.get('kfac_uncorrected_layers', 'all')}", flush=True)
        for k in diag.names:
            r = diag.sigma[k].reshape(-1) / exact.sigma[k].reshape(-1)
            print(f"    sigma diagonal / exact {k:10s} median {float(r.median()):.3f} min {float(r.min()):.3f} "
                  f"max {float(r.max()):.3f}", flush=True)
        ratios = [rep.baseline_leakage / ref.baseline_leakage] + [
            rep.schemes[s].leakage / ref.schemes[s].leakage for s in SCHEMES]
        print("    headline diagonal / exact: " + " ".join(
            f"{s} {r:.3f}" for s, r in zip(["baseline"] + SCHEMES, ratios)), flush=True)
        out = ratios
    print(f"  ({time.process_time() - t0:.0f} s CPU)", flush=True)
    return out


def cost(n: int, repeats: int) -> None:
    """The estimation pass on a ~1e6-weight ReLU MLP classifier, K-FAC off / on (interleaved)."""
    torch.manual_seed(0)
    model = mlp(784, [1024, 256], 10, "relu").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    kfac_on_off_cost(model, x, y, repeats, "MLP classifier")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--act", nargs="+", default=["relu", "tanh"], choices=["relu", "tanh"])
    ap.add_argument("--hidden", nargs="*", type=int, default=[80], help="hidden widths (one per layer; none: softmax regression)")
    ap.add_argument("--fan", type=int, default=20, help="input features")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--decay", nargs="+", type=float, default=[1e-2, 1e-3, 0.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--fit-rounds", type=int, default=3,
                    help="L-BFGS calls of up to 1,000 iterations each (more: a tighter stationary point)")
    ap.add_argument("--hessian", default="auto", help="the diagonal estimator's Hessian")
    ap.add_argument("--factors", action=argparse.BooleanOptionalAction, default=True,
                    help="also run with the K-FAC correction on (--no-factors: off only)")
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"mis_lightning from {Path(ml.__file__).parent}", flush=True)
    if a.cost:
        cost(a.n, a.repeats)
        return
    rows = []
    for act in a.act:
        for decay in a.decay:
            for seed in a.seeds:
                rows.append(compare(a, act, decay, seed))
    if rows:
        t = torch.tensor(rows)
        print("range of the last run's headline ratios over the cases: " + " ".join(
            f"{s} {float(t[:, i].min()):.3f}-{float(t[:, i].max()):.3f}"
            for i, s in enumerate(["baseline"] + SCHEMES)), flush=True)


if __name__ == "__main__":
    main()
