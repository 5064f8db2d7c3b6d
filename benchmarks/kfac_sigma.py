"""The diagonal estimator's sigma and quantized leakages against the exact estimator on small
tanh MLPs (dg30; method.md section 4, "The diagonal sandwich and correlated weights").

A ``IN-H-1`` tanh MLP (default 16-16-1, 289 weights) fitted by full-batch L-BFGS (float64, to
the stationary point) to a teacher MLP plus Gaussian noise on AR(1) inputs of correlation
``rho``; then per ``rho``:

* ``sigma``: the diagonal estimator's (``estimation="diagonal"``, Gauss-Newton diagonal, with
  the K-FAC correction where the code has it) over the exact sandwich's (``mode="exact"``), per
  parameter (median, min, max of the ratio);
* every scheme's leakage under ``assess(estimation="diagonal")`` and ``"exact"`` (uncertainty
  draws off), the baseline, and the report's variance-inflation / K-FAC lines.

Run it on two checkouts to compare code (the script puts its own checkout first on the path):

    PYTHONPATH=. python benchmarks/kfac_sigma.py --rho 0.9 0       # docs/validation.md, "The diagonal estimator's sigma on correlated weights, K-FAC-corrected"

``--cost SIZE``: the estimation pass (``estimate`` with its defaults, the diagonal estimator's
factored Linear path above 2,000 weights) on ``benchmarks/assess_speed.py``'s MLP of that size,
``--n`` records in batches of 256, with the K-FAC correction off and on
(``estimate.KFAC_CORRECTION``), interleaved ``--repeats`` times in one process; CPU seconds
(``time.process_time``) and the ratio on / off:

    PYTHONPATH=. python benchmarks/kfac_sigma.py --cost 1e6 --n 4096   # docs/validation.md, "The diagonal estimator's sigma on correlated weights, K-FAC-corrected"

``--cost SIZE --influences``: the same A/B for the stored influences of ``psi = -H^-1 g`` under K-FAC
(``estimate.KFAC_INFLUENCES``; the sigma correction on in both), on a model whose influences are
stored (``num_records * d <= budget``: up to 65,536 weights at the 512 default records); ``SIZE``
an assess_speed.py size or ``IN-H1-H2...`` (a ReLU MLP with those widths and one output):

    PYTHONPATH=. python benchmarks/kfac_sigma.py --cost 1e4 --n 4096 --influences      # docs/validation.md, "The diagonal estimator's influences under K-FAC"
    PYTHONPATH=. python benchmarks/kfac_sigma.py --cost 200-256-1 --n 4096 --influences
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mis_lightning as ml  # noqa: E402
from mis_lightning.estimation.estimate import estimate  # noqa: E402

SCHEMES = ["rtn_int8", "rtn_int6", "rtn_int4", "rtn_int3"]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.reshape(-1) - y.reshape(-1)).square()


def ar1(n: int, d: int, rho: float, g: torch.Generator) -> torch.Tensor:
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.empty_like(e)
    x[:, 0] = e[:, 0]
    for j in range(1, d):
        x[:, j] = rho * x[:, j - 1] + (1 - rho * rho) ** 0.5 * e[:, j]
    return x


def mlp(d_in: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()


def fitted(rho: float, n: int, d_in: int, hidden: int, seed: int, decay: float) -> tuple[nn.Module, DataLoader, float]:
    g = torch.Generator().manual_seed(seed)
    x = ar1(n, d_in, rho, g)
    torch.manual_seed(seed)
    teacher = mlp(d_in, 2 * hidden)
    with torch.no_grad():
        for lin in (teacher[0], teacher[2]):  # a signal every hidden unit of the student can fit
            lin.weight.normal_(0.0, 1.5 / lin.in_features ** 0.5, generator=g)
        y = teacher(x).reshape(-1) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    model = mlp(d_in, hidden)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=400, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = mse(model(x), y).mean() + decay / 2 * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    grad = max(float(p.grad.abs().max()) for p in model.parameters())
    return model.eval(), DataLoader(TensorDataset(x, y), batch_size=500), grad


def cost(size: str, n: int, repeats: int, influences: bool = False) -> None:
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from assess_speed import mlp as build_mlp

    E = importlib.import_module("mis_lightning.estimation.estimate")
    torch.manual_seed(0)
    if "-" in size:  # IN-H1-...-1: a ReLU MLP of these widths
        widths = [int(v) for v in size.split("-")]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model, f = nn.Sequential(*layers[:-1]), widths[0]
    else:
        model, f = build_mlp(size)
    model = model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, f, generator=g)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    d = sum(p.numel() for p in model.parameters())
    estimate(model, DataLoader(TensorDataset(x[:512], y[:512]), batch_size=256), mse, num_records=8)  # warm-up
    cpu: dict[bool, list[float]] = {False: [], True: []}
    # --influences: the K-FAC psi influences (estimate.KFAC_INFLUENCES) off / on, the sigma
    # correction on in both; they exist where the influences are stored (num_records * d <= budget)
    flag = "KFAC_INFLUENCES" if influences else "KFAC_CORRECTION"
    for _ in range(repeats):
        for on in (False, True):
            setattr(E, flag, on)
            t0 = time.process_time()
            est = estimate(model, loader, mse, mode="diagonal")
            cpu[on].append(time.process_time() - t0)
    setattr(E, flag, True)
    off, on = min(cpu[False]), min(cpu[True])
    print(f"{size} MLP, d = {d:,}, n = {n}, {torch.get_num_threads()} thread(s), {est.estimator}, {flag}, "
          f"influences stored: {est.influence_stored} (K-FAC psi for {est.diagnostics.get('kfac_influences', 0):,} "
          f"weights): estimation CPU s off {cpu[False]} on {cpu[True]}; best on / off {on / off:.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rho", nargs="+", type=float, default=[0.9, 0.0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--d-in", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=1e-3,
                    help="the training's L2 coefficient (objective mean loss + wd / 2 |theta|^2), given to the estimators")
    ap.add_argument("--cost", default=None, help="an assess_speed.py MLP size: the estimation pass's cost A/B")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--influences", action="store_true",
                    help="with --cost: A/B the K-FAC psi influences (stored-influence models) instead of the sigma factor")
    a = ap.parse_args(argv)
    print(f"mis_lightning from {Path(ml.__file__).parent}", flush=True)
    if a.cost is not None:
        cost(a.cost, a.n, a.repeats, a.influences)
        return
    for rho in a.rho:
        t0 = time.process_time()
        model, loader, grad = fitted(rho, a.n, a.d_in, a.hidden, a.seed, a.weight_decay)
        d = sum(p.numel() for p in model.parameters())
        diag = estimate(model, loader, mse, mode="diagonal", hessian="ggn", weight_decay=a.weight_decay)
        exact = estimate(model, loader, mse, mode="exact", weight_decay=a.weight_decay)
        print(f"rho {rho:g}: {a.d_in}-{a.hidden}-1 tanh MLP, d = {d}, n = {a.n}, max |grad| {grad:.1e}; "
              f"K-FAC median VIF {diag.diagnostics.get('kfac_variance_inflation_median', 'n/a')}", flush=True)
        for k in diag.names:
            r = diag.sigma[k].reshape(-1) / exact.sigma[k].reshape(-1)
            print(f"  sigma diagonal / exact {k:10s} median {float(r.median()):.3f} min {float(r.min()):.3f} "
                  f"max {float(r.max()):.3f}", flush=True)
        rows = {}
        for est in ("diagonal", "exact"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = ml.assess(model, SCHEMES, loader, mse, estimation=est, uncertainty_draws=0,
                                weight_decay=a.weight_decay)
            rows[est] = rep
            lines = [w for w in rep.warnings if "variance inflation" in w or "K-FAC" in w]
            print(f"  {est:8s} baseline {rep.baseline_leakage:.4f} " + " ".join(
                f"{s} {rep.schemes[s].leakage:.4f}" for s in SCHEMES if s in rep.schemes), flush=True)
            for w in lines:
                print(f"    warning: {w[:400]}", flush=True)
        print("  diagonal / exact: " + " ".join(
            f"{s} {rows['diagonal'].schemes[s].leakage / rows['exact'].schemes[s].leakage:.3f}"
            for s in SCHEMES if s in rows["exact"].schemes and rows["exact"].schemes[s].leakage > 0)
            + f" | {time.process_time() - t0:.0f} s CPU", flush=True)


if __name__ == "__main__":
    main()
