"""The wide-sd closed form's gate against the correlated headline (docs/benchmarks.md, "rv55r").

    OMP_NUM_THREADS=1 python benchmarks/rv55r_wide_gate_correlated.py gate --records 512
    OMP_NUM_THREADS=1 python benchmarks/rv55r_wide_gate_correlated.py gate --records 16384
    OMP_NUM_THREADS=1 python benchmarks/rv55r_wide_gate_correlated.py deficits --records 16384
    OMP_NUM_THREADS=1 python benchmarks/rv55r_wide_gate_correlated.py nan --records 4096

One model: a 16-64-64-2 ReLU MLP (5,378 weights) trained 100 full-batch Adam steps (lr 1e-2) on
``--records`` Gaussian records labelled by the sign of their first three features' sum; ``assess``
with the diagonal estimator (Gauss-Newton Hessian), loader batches of 128, no uncertainty draws.

``gate``: the leakage of rtn_int8, int8_weight_only, float8_weight_only with p55b's gate
(``functional.wide.WIDE_TOL`` 1e-8, ``WIDE_MAX_WINDOW`` 0.5), the old one (1e-9, 0.1) and the grid
paths (``quantization.base.WIDE_SD_CLOSED_FORM`` False), each relative to the paths; the default
covariance (the correlated headline) and ``covariance="independent"``.

``deficits``: on the grid paths' kappa, the deficits ``1 - kappa`` below a threshold scaled by a
factor before the correlated form reads them (``assess._kappa_vector`` wrapped): the headline's
relative move per (factor, threshold). A form monotone in every kappa moves up for factors < 1.

``nan``: the report's table and headline figures (a NaN baseline at d / n = 1.31), with the
default covariance and ``covariance="independent"``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning.functional.wide as W
import mis_lightning.quantization.base as qb
from mis_lightning import assess

A = sys.modules["mis_lightning.assess"]  # (the package's ``assess`` name is the function)
SCHEMES = ["rtn_int8", "int8_weight_only", "float8_weight_only"]


def _model(records: int) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    x = torch.randn(records, 16)
    y = (x[:, :3].sum(1) > 0).long()
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m, TensorDataset(x, y)


def _ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(o, t, reduction="none")


def _assess(m: nn.Module, data: TensorDataset, schemes: list[str], **kw: Any):
    return assess(m, schemes, DataLoader(data, batch_size=128), _ce, estimation="diagonal", hessian="ggn",
                  uncertainty_draws=0, **kw)


def row_floats(a: Any, b: Any) -> list[tuple[str, str, float, float]]:
    """``(scheme, field, a's, b's)`` for every float field of the rows of ``SCHEMES`` in two reports."""
    out = []
    for name in SCHEMES:
        ra, rb = a.schemes[name], b.schemes[name]
        out += [(name, key, v, getattr(rb, key)) for key, v in vars(ra).items() if isinstance(v, float)]
    return out


def _gate(tol: float, window: float) -> None:
    W.WIDE_TOL = tol
    W.WIDE_MAX_WINDOW = qb.WIDE_MAX_WINDOW = A.WIDE_MAX_WINDOW = window


def gate(records: int) -> None:
    m, data = _model(records)
    for cov in ({}, {"covariance": "independent"}):
        def run(cov: dict = cov) -> dict[str, tuple[float, str]]:
            return {r["scheme"]: (r["leakage"], r["method"]) for r in _assess(m, data, SCHEMES, **cov).rows()}
        _gate(1e-8, 0.5)
        new = run()
        _gate(1e-9, 0.1)
        old = run()
        qb.WIDE_SD_CLOSED_FORM = False
        paths = run()
        qb.WIDE_SD_CLOSED_FORM = True
        _gate(1e-8, 0.5)
        for k in SCHEMES:
            p = paths[k][0]
            print(f"N={records} {cov.get('covariance', 'default')} {k:20s} method {new[k][1]}: paths {p:.12f}  "
                  f"(1e-8,0.5) - paths {(new[k][0] - p) / p:+.3g} rel   (1e-9,0.1) - paths {(old[k][0] - p) / p:+.3g} rel")


def deficits(records: int) -> None:
    m, data = _model(records)
    qb.WIDE_SD_CLOSED_FORM = False  # the grid paths' kappa
    inner = A._kappa_vector
    scaling: list[tuple[float, float] | None] = [None]

    def scaled(est: Any, kappa: Any) -> torch.Tensor:
        k = inner(est, kappa)
        if scaling[0] is not None:
            f, thr = scaling[0]
            k = torch.where(1 - k < thr, 1 - (1 - k) * f, k)
        return k

    A._kappa_vector = scaled
    try:
        base = _assess(m, data, ["rtn_int8"]).rows()[0]["leakage"]
        for f, thr in ((0.9, 1e-6), (0.5, 1e-6), (1.1, 1e-6), (0.9, 1e-3), (0.0, 1e-9)):
            scaling[0] = (f, thr)
            v = _assess(m, data, ["rtn_int8"]).rows()[0]["leakage"]
            print(f"N={records}: deficits 1 - kappa < {thr:.0e} times {f}: the correlated headline moves "
                  f"{(v - base) / base:+.3g} relative")
    finally:
        A._kappa_vector = inner
        qb.WIDE_SD_CLOSED_FORM = True


def nan(records: int) -> None:
    m, data = _model(records)
    for cov in ({}, {"covariance": "independent"}):
        r = _assess(m, data, ["rtn_int8"], **cov)
        row = r.rows()[0]
        print(cov.get("covariance", "default"), "baseline_leakage", r.baseline_leakage, "row",
              {k: row.get(k) for k in ("leakage", "mis", "method")})
        print(r.table())


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["gate", "deficits", "nan"])
    ap.add_argument("--records", type=int, default=512)
    a = ap.parse_args()
    {"gate": gate, "deficits": deficits, "nan": nan}[a.mode](a.records)


if __name__ == "__main__":
    main()
