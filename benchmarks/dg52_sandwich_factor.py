"""dg52: the diagonal estimator's K-FAC sandwich factor with weight decay, below 1 or floored at 1
(docs/benchmarks.md, "dg52"; method.md section 4, "The diagonal sandwich and correlated weights").

With decay ``lambda`` the per-layer program's correction multiplies the diagonal sandwich's variance
``V_jj / H_jj^2`` by ``[(K + lambda)^-1 K (K + lambda)^-1]_jj (K_jj + lambda_j)^2 / K_jj`` (``K`` the
layer's Kronecker Gauss-Newton block). That factor is no variance inflation factor: it reads below 1
where a weight's data curvature ``K_jj`` is a small share of a few stiff directions spread over many
weights, so ``H_jj ~ lambda`` and the diagonal sandwich reads the stiff share over the decay's curvature.
Before dg52 it was floored at 1 (``linear_factors.KFAC_SANDWICH_SHRINKS = False``); now it reads as it is.
And the leverage correction's trace counts such a layer under its Kronecker model, ``tr((K + lambda)^-1 K)``,
in place of the diagonal ``sum_j K_jj / (K_jj + lambda)`` (``estimate.KFAC_LEVERAGE_TRACE``).

For each fitted model: the exact estimator's report (``assess(estimation="exact")``), the diagonal one's
now, with the sandwich factor alone (``KFAC_LEVERAGE_TRACE = False``) and before dg52 (both off) (leakage over the exact one's per scheme), and the diagonal sigma over the
exact estimator's per parameter tensor (median; ``run_estimation``, the same configuration).

    python benchmarks/dg52_sandwich_factor.py wide      # nu49's 794-weight tanh MLP (n = 2,000) and its untied twin
    python benchmarks/dg52_sandwich_factor.py small     # nu48's twice-called MLP and its twin (tw51's ``twice``), n = 400
    python benchmarks/dg52_sandwich_factor.py conv      # kc32's cases (benchmarks/kfac_conv.py): cnn, pooled, conv1d at wd 1e-2 / 1e-3
    python benchmarks/dg52_sandwich_factor.py widths    # the wide model at widths 8 / 16 / 24, n = 2,000
    python benchmarks/dg52_sandwich_factor.py kf33 now      # benchmarks/kfac_classifier.py --decay 1e-2 1e-3, both switches on
    python benchmarks/dg52_sandwich_factor.py kf33 before   # the same with both off (main's path)
"""

from __future__ import annotations

import importlib
import sys
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.assess import run_estimation
from mis_lightning.config import EstimationConfig

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "tests")
import kfac_conv as kc  # noqa: E402 - kc32's cases and fit
import nu48_trial as t  # noqa: E402 - session 48's data, fit and loss
from _nets import Repeated  # noqa: E402 - tests/_nets.py

torch.set_num_threads(1)
LF = importlib.import_module("mis_lightning.estimation.linear_factors")
E = importlib.import_module("mis_lightning.estimation.estimate")
SCHEMES = ["none", "rtn_int8", "rtn_int4"]


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def compare(label: str, model, loader, loss, wd: float) -> None:
    """Exact vs diagonal (now; the sandwich factor alone; before dg52): leakage ratios, per-tensor sigma
    medians, the leverage trace (the exact estimator's: its stored records' mean leverage times n)."""
    n = sum(len(b[1]) for b in loader)
    exact = _quiet(ml.assess, model, SCHEMES, loader, loss, weight_decay=wd, estimation="exact", strict=False,
                   uncertainty_draws=0)
    est_x = _quiet(run_estimation, model, loader, loss, EstimationConfig(mode="exact", weight_decay=wd))
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    warn = [k for k in ("records_unlike_training", "not_at_minimum") if exact.diagnostics.get(k)]
    print(f"== {label}: d = {d}, wd {wd:g}; exact " + ", ".join(f"{s} {r.leakage:.6f}" for s, r in exact.schemes.items())
          + f" (flags {warn})", flush=True)
    for label, shrink, kron in (("now", True, True), ("factor only", True, False), ("before dg52", False, False)):
        LF.KFAC_SANDWICH_SHRINKS, E.KFAC_LEVERAGE_TRACE = shrink, kron
        try:
            rep = _quiet(ml.assess, model, SCHEMES, loader, loss, weight_decay=wd, estimation="diagonal",
                         strict=False, uncertainty_draws=0)
            est = _quiet(run_estimation, model, loader, loss, EstimationConfig(mode="diagonal", weight_decay=wd))
        finally:
            LF.KFAC_SANDWICH_SHRINKS, E.KFAC_LEVERAGE_TRACE = True, True
        dg = est.diagnostics
        ratios = ", ".join(f"{s} {r.leakage / exact.schemes[s].leakage:.3f}x" for s, r in rep.schemes.items()
                           if exact.schemes[s].leakage > 0)
        sig = "; ".join(f"{k} {float((est.sigma[k].double() / est_x.sigma[k].double()).median()):.3g}"
                        for k in est.names)
        print(f"   diagonal, {label}: {ratios}; factor median "
              f"{dg.get('kfac_variance_inflation_median', float('nan')):.3g} max "
              f"{dg.get('kfac_variance_inflation_max', float('nan')):.3g}; leverage trace "
              f"{dg.get('leverage_trace', float('nan')):.3g} (exact {exact.diagnostics.get('mean_leverage', 0) * n:.3g})"
              f"\n      sigma / exact median: {sig}", flush=True)


def wide(widths: tuple[int, ...] = (24,), n: int = 2000) -> None:
    for width in widths:
        for untied in (False, True):
            torch.manual_seed(0)
            x, y = t.data("flat", n, 0)
            model = t.fit(Repeated(2, untied, width=width), x, y, t.ce)
            compare(f"{'untied twin' if untied else 'twice'}, width {width}, n = {n}", model,
                    t.loader_of(x, y, 250)[0], t.ce, t.WD)


def small() -> None:
    for untied in (False, True):
        torch.manual_seed(0)
        x, y = t.data("flat", t.N, 0)
        model = t.fit(Repeated(2, untied), x, y, t.ce)
        compare(f"nu48 {'untied twin' if untied else 'twice'}, n = {t.N}", model, t.loader_of(x, y)[0], t.ce, t.WD)


def conv() -> None:
    for name in ("cnn", "pooled", "conv1d"):
        for wd in (1e-2, 1e-3):
            model, loss, x, y = kc.case(name, 1000, 0.9, 0)
            kc.fit(model, loss, x, y, wd)
            compare(f"kc32 {name}, n = 1000, rho 0.9", model.eval(), DataLoader(TensorDataset(x, y), batch_size=250),
                    loss, wd)


def kf33(state: str) -> None:
    """kf33's MLP classifiers (``benchmarks/kfac_classifier.py --decay 1e-2 1e-3``) with both switches on
    (``now``) or off (``before``)."""
    import kfac_classifier
    LF.KFAC_SANDWICH_SHRINKS = E.KFAC_LEVERAGE_TRACE = state == "now"
    print(f"== kf33, {state}: KFAC_SANDWICH_SHRINKS = KFAC_LEVERAGE_TRACE = {state == 'now'}", flush=True)
    kfac_classifier.main(["--decay", "1e-2", "1e-3"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["kf33"]:
        kf33(sys.argv[2] if len(sys.argv) > 2 else "now")
        sys.exit()
    for what in sys.argv[1:] or ["small", "wide", "conv"]:
        {"wide": wide, "small": small, "conv": conv, "widths": lambda: wide((8, 16, 24))}[what]()
