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


def main(what: list[str]) -> None:
    """dg52's fits (``dg52_sandwich_factor.small`` / ``conv`` / ``wide``: the same models and seeds) and
    kf33's classifiers, each compared here."""
    dg52.compare = compare  # its loops call the module's compare: this one in its place
    for w in what or ["small", "conv", "wide"]:
        {"conv": dg52.conv, "small": dg52.small, "wide": dg52.wide, "kf33": kf33}[w]()


if __name__ == "__main__":
    main(sys.argv[1:])
