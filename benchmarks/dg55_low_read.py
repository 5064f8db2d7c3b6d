"""dg55: where the diagonal estimator's figures read below the exact estimator's, why, and its flag
(``estimate.DIAGONAL_LOW_READ_FLAG``; docs/benchmarks.md, "dg55").

For each of dg52's models (``benchmarks/dg52_sandwich_factor.py``'s fits, called from there): the exact estimator's figures
(``none`` / ``rtn_int8`` / ``rtn_int4``), the diagonal estimator's over them with the leverage correction on
(the default) and off in both, each estimator's own gain from the correction (on over off), the exact
estimator's mean / max leverage and capped records, the diagonal estimator's mean leverage per loss
direction (its diagonal count) and under the Kronecker count (``estimate._kron_leverage_trace``; what the
flag reads), and the flag: set or not, the table's mark (``Report.rows()[i]["indicative"]``) and the
warning's sentence; then that the figures are bitwise those with the flag off (``DIAGONAL_LOW_READ_FLAG =
False``, the path before dg55).

    python benchmarks/dg55_low_read.py conv      # kc32's ReLU CNN (d = 372, n = 1,000) at decay 1e-2 / 1e-3, pooled and dense Conv1d
    python benchmarks/dg55_low_read.py small     # nu48's MLP calling a layer twice and its untied twin (n = 400)
    python benchmarks/dg55_low_read.py wide      # nu49's wide MLP and its twin (n = 2,000)
    python benchmarks/dg55_low_read.py kf33      # kf33's ReLU / tanh 20-80-5 classifiers (d / n = 2.1) at decay 1e-2 / 1e-3
    python benchmarks/dg55_low_read.py tail      # the CNN's per-record leverages under three curvatures; the trace forced
    python benchmarks/dg55_low_read.py cost      # the flag's Kronecker count's CPU time on a 536k-weight classifier
"""

from __future__ import annotations

import importlib
import sys
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.config import EstimationConfig

sys.path.insert(0, "benchmarks")
import dg52_sandwich_factor as dg52  # noqa: E402 - dg52's models (kc32's, nu48's, nu49's) and their fits

torch.set_num_threads(1)
E = importlib.import_module("mis_lightning.estimation.estimate")
SCHEMES = ["none", "rtn_int8", "rtn_int4"]


def _run(model, loader, loss, wd: float, mode: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ml.assess(model, SCHEMES, loader, loss, strict=False, uncertainty_draws=0,
                         estimation_config=EstimationConfig(mode=mode, weight_decay=wd, **kw))


def _ratios(a, b) -> str:
    return " / ".join(f"{a.schemes[s].leakage / b.schemes[s].leakage:.3f}" for s in SCHEMES)


def compare(label: str, model, loader, loss, wd: float) -> None:
    ex, ex_off = _run(model, loader, loss, wd, "exact"), _run(model, loader, loss, wd, "exact", leverage_correction=False)
    dg, dg_off = _run(model, loader, loss, wd, "diagonal"), _run(model, loader, loss, wd, "diagonal", leverage_correction=False)
    E.DIAGONAL_LOW_READ_FLAG = False
    try:
        before = _run(model, loader, loss, wd, "diagonal")
    finally:
        E.DIAGONAL_LOW_READ_FLAG = True
    dd, xd = dg.diagnostics, ex.diagnostics
    low = dd.get("diagonal_low_read")
    marks = [r.get("indicative", "") for r in dg.rows()]
    said = any("may read below the exact estimator's" in w for w in dg.warnings)
    same = all(dg.schemes[s].leakage == before.schemes[s].leakage for s in SCHEMES)
    print(f"== {label}, wd {wd:g}: d = {dg.d}, n = {dg.n}; exact {' / '.join(f'{ex.schemes[s].leakage:.4g}' for s in SCHEMES)}\n"
          f"   diagonal / exact {_ratios(dg, ex)}; leverage correction off in both: {_ratios(dg_off, ex_off)}\n"
          f"   the correction's gain: exact {_ratios(ex, ex_off)}, diagonal {_ratios(dg, dg_off)}; exact mean leverage "
          f"{xd['mean_leverage']:.3g} (max {xd['max_leverage']:.3g}, {xd.get('leverage_capped', 0)} capped)\n"
          f"   diagonal per direction {dd['leverage_per_direction']:.3g} ({dd['leverage_directions']:g} direction(s)); "
          f"flag: {low and round(low['leverage_per_direction'], 4)} ({low and low['count']}); "
          f"rows marked: {sum('may read below' in m for m in marks)}/{len(marks)}; warned: {said}; "
          f"figures bitwise those with the flag off: {same}", flush=True)


def kf33() -> None:
    """kf33's default classifiers (``benchmarks/kfac_classifier.py``: ReLU / tanh 20-80-5, n = 1,000, rho 0.5,
    seed 0, decay 1e-2 / 1e-3; d / n = 2.1, where kf33 calls the exact figures no reference)."""
    import kfac_classifier as kf
    for act in ("relu", "tanh"):
        for wd in (1e-2, 1e-3):
            x, y = kf.data(1000, 20, 5, 0.5, 0)
            torch.manual_seed(0)
            model = kf.mlp(20, [80], 5, act).double()
            kf.fit(model, x, y, wd)
            compare(f"kf33 {act} 20-80-5", model.eval(), DataLoader(TensorDataset(x, y), batch_size=250), kf.ce, wd)


def tail() -> None:
    """Where the exact estimator's leverage tail comes from, on kc32's ReLU CNN (d = 372, n = 1,000) at decay
    1e-2 / 1e-3: each record's ``tr(L_i J_i M^-1 J_i') / n`` over the 1,000 records (torch.func, float64) with
    ``M`` the exact Hessian of the objective (pseudo-inverse), the full Gauss-Newton matrix plus the decay, and the
    diagonal estimator's diagonal (the Gauss-Newton diagonal plus the decay); the exact Hessian's eigenvalues;
    then (1e-3) the diagonal estimator with its leverage trace forced to the exact estimator's."""
    for wd in (1e-2, 1e-3):
        _tail(wd)


def unflat(v: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, torch.Tensor]:
    """The flat parameter vector ``v`` as ``{name: tensor}`` of ``shapes``, in ``names`` order (torch.func's
    ``functional_call``)."""
    out, a = {}, 0
    for k, sh in zip(names, shapes):
        out[k] = v[a: a + sh.numel()].reshape(sh)
        a += sh.numel()
    return out


def _tail(wd: float) -> None:
    """:func:`tail` at one decay."""
    from torch.func import functional_call, hessian, jacrev, vmap
    kc = dg52.kc
    model, loss, x, y = kc.case("cnn", 1000, 0.9, 0)
    kc.fit(model, loss, x, y, wd)
    model.eval()
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    d, n = theta.numel(), len(y)

    def f(v: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat(v, names, shapes), (xb,))

    eye = torch.eye(d, dtype=torch.float64)
    H = hessian(lambda v: loss(f(v, x), y).mean())(theta) + wd * eye
    J = vmap(jacrev(lambda v, xi: f(v, xi[None])[0]), in_dims=(None, 0))(theta, x)  # [n, c, d]
    p = torch.softmax(f(theta, x), -1)
    L = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    GN = torch.einsum("nca,ncb,nbe->ae", J, L, J) / n
    ev = torch.linalg.eigvalsh(H)
    print(f"== kc32 cnn, wd {wd:g}: exact Hessian eigenvalues: {int((ev < 0).sum())} negative, "
          f"{int((ev < wd).sum())} below the decay; traces tr(M^-1 GN): exact "
          f"{float((torch.linalg.pinv(H, hermitian=True) * GN).sum()):.1f}, Gauss-Newton "
          f"{float((torch.linalg.inv(GN + wd * eye) * GN).sum()):.1f}, diagonal "
          f"{float((GN.diagonal() / (GN.diagonal() + wd)).sum()):.1f}", flush=True)
    LJ = torch.einsum("nce,nep->ncp", L, J)
    for label, Minv in (("exact Hessian", torch.linalg.pinv(H, hermitian=True)),
                        ("Gauss-Newton + decay", torch.linalg.inv(GN + wd * eye)),
                        ("diagonal", torch.diag(1 / (GN.diagonal() + wd)))):
        h = torch.einsum("nca,ab,ncb->nc", J, Minv, LJ).sum(-1) / n
        print(f"   per-record leverage, M = {label}: mean {h.mean():.3f}, p90 {h.quantile(0.9):.3f}, "
              f"max {h.max():.3f}, {int((h > 0.95).sum())} above 0.95", flush=True)
    if wd == 1e-3:
        loader = DataLoader(TensorDataset(x, y), batch_size=250)
        ex = _run(model, loader, loss, wd, "exact")
        forced = ex.diagnostics["mean_leverage"] * n
        old = E.leverage_trace
        E.leverage_trace = lambda *a, forced=forced, **k: forced  # the diagonal finalize's count, replaced
        try:
            dg = _run(model, loader, loss, wd, "diagonal")
        finally:
            E.leverage_trace = old
        print(f"   the diagonal estimator with its trace forced to the exact estimator's ({forced:.1f}): "
              f"diagonal / exact {_ratios(dg, ex)}", flush=True)


def cost(calls: int = 3) -> None:
    """The flag's Kronecker count's CPU time (``time.process_time``) within ``run_estimation`` on a flagged
    512-1024-10 tanh classifier (536k weights, n = 2,048, decay 1e-2; random data: a cost probe), ``calls``
    calls in one process, the count timed by a wrapper of ``MomentAccumulator._kron_leverage_trace``."""
    import time

    from torch import nn

    from mis_lightning.assess import run_estimation
    cls = E.MomentAccumulator
    orig, spent = cls._kron_leverage_trace, []

    def timed(self, *a, **k):
        t0 = time.process_time()
        out = orig(self, *a, **k)
        spent.append(time.process_time() - t0)
        return out

    g = torch.Generator().manual_seed(0)
    n = 2048
    x, y = torch.randn(n, 512, generator=g), torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.Tanh(), nn.Linear(1024, 10))
    loader = [(x[i: i + 256], y[i: i + 256]) for i in range(0, n, 256)]
    cfg = EstimationConfig(mode="diagonal", weight_decay=1e-2)
    cls._kron_leverage_trace = timed
    try:
        for _ in range(calls):
            t0 = time.process_time()
            est = run_estimation(model, loader, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), cfg)
            print(f"estimation {time.process_time() - t0:.2f} s CPU, of which the Kronecker count {spent[-1]:.3f} s; "
                  f"flag {est.diagnostics.get('diagonal_low_read')}", flush=True)
    finally:
        cls._kron_leverage_trace = orig


def main(what: list[str]) -> None:
    """dg52's fits (``dg52_sandwich_factor.small`` / ``conv`` / ``wide``: the same models and seeds) and
    kf33's classifiers, each compared here."""
    dg52.compare = compare  # its loops call the module's compare: this one in its place
    for w in what or ["small", "conv", "wide"]:
        {"conv": dg52.conv, "small": dg52.small, "wide": dg52.wide, "kf33": kf33, "tail": tail, "cost": cost}[w]()


if __name__ == "__main__":
    main(sys.argv[1:])
