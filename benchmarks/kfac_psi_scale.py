"""Why ``covariance="independent"`` reads ~2x the exact estimator on Conv1d -> affine InstanceNorm1d ->
tanh -> Linear (cv40's side effect (3); ct41). The model and data of
tests/test_user_conditions.py's cancelled-bias test (n = 300, float32, L-BFGS 100 iterations),
``none / rtn_int2 / rtn_int4``, every record stored, uncertainty draws off. Printed:

* the exact estimator's and the diagonal one's leakage under ``covariance="independent"`` and the
  default (``"auto"``), as ``assess`` gives them;
* per assessed tensor, each weight's mean square of the stored influences over the records (1 by
  construction for the exact estimator without its leverage correction, and for the gradients'
  ``g / sqrt(V_jj)``; the K-FAC ``psi`` influences are standardised by the corrected sigma instead);
* the diagonal estimate scored (``score_schemes``) with the conv weights' influences: as stored
  (``psi / (sqrt(n) sigma)``), the gradients' (``KFAC_INFLUENCE_MAX_WIDTH = 10``), ``psi`` rescaled by
  one factor for the layer to the gradients' total mean square, and ``psi`` rescaled per weight to
  the gradients' mean square (kfd34's "rms" form, docs/validation.md).

    PYTHONPATH=. python benchmarks/kfac_psi_scale.py [--no-norm]

``--no-norm``: the same without the InstanceNorm1d (Conv1d -> tanh -> Linear).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mis_lightning as ml  # noqa: E402
from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig, ScoringConfig  # noqa: E402

E = importlib.import_module("mis_lightning.estimation.estimate")
SCHEMES = ["none", "rtn_int2", "rtn_int4"]


def mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(-1) - t) ** 2


class Net(nn.Module):
    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3)
        self.norm = nn.InstanceNorm1d(4, affine=True) if norm else nn.Identity()
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.c(x))).flatten(1))


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 2, 5, generator=g)
    Y = torch.tanh(X.flatten(1)[:, :3].sum(1)) + 0.3 * torch.randn(300, generator=g)
    torch.manual_seed(0)
    m = Net("--no-norm" not in sys.argv)
    opt = torch.optim.LBFGS(m.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = mse(m(X), Y).mean()
        loss.backward()
        return loss

    opt.step(closure)
    dl = DataLoader(TensorDataset(X, Y), batch_size=100)

    def figures(rep) -> list[float]:
        return [round(rep.schemes[s].leakage, 3) for s in SCHEMES]

    exact = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cov in ("independent", "auto"):
            kw = dict(uncertainty_draws=0, num_records=300, covariance=cov)
            exact[cov] = figures(ml.assess(m, SCHEMES, dl, mse, estimation="exact", **kw))
            diag = figures(ml.assess(m, SCHEMES, dl, mse, estimation="diagonal", **kw))
            print(f"{cov}: exact {exact[cov]}, diagonal {diag} ({[round(a / b, 2) for a, b in zip(diag, exact[cov])]})")
        for mode in ("exact", "diagonal"):
            est = run_estimation(m, dl, mse, EstimationConfig(mode=mode, num_records=300, leverage_correction=False))
            for k in est.names:
                a, b = est.offsets[k]
                ms = est.influence[:, a:b].square().mean(0)
                print(f"  {mode:8s} {k:12s} mean square of the influences per weight: median {float(ms.median()):.3f} "
                      f"({float(ms.min()):.3f}-{float(ms.max()):.3f})")
        psi = run_estimation(m, dl, mse, EstimationConfig(mode="diagonal", num_records=300))
        E.KFAC_INFLUENCE_MAX_WIDTH = 10
        try:
            grad = run_estimation(m, dl, mse, EstimationConfig(mode="diagonal", num_records=300))
        finally:
            E.KFAC_INFLUENCE_MAX_WIDTH = 1024
    a, b = psi.offsets["c.weight"]
    Wp, Wg = psi.influence, grad.influence
    msp, msg = Wp[:, a:b].square().mean(0), Wg[:, a:b].square().mean(0)
    layer, rms = Wp.clone(), Wp.clone()
    layer[:, a:b] *= (msg.sum() / msp.sum()).sqrt()
    rms[:, a:b] *= torch.where(msp > 0, (msg / msp.clamp_min(1e-300)).sqrt(), torch.zeros_like(msp))
    print(f"conv weights: psi's total mean square {float(msp.sum() / msg.sum()):.1f}x the gradients'")
    for cov in ("independent", "auto"):
        for name, W in (("psi / (sqrt(n) sigma) (the code)", Wp), ("gradients", Wg),
                        ("psi, one factor for the layer", layer), ("psi, per weight", rms)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = score_schemes(dataclasses.replace(psi, influence=W), m, SCHEMES, uncertainty_draws=0,
                                    scoring_config=ScoringConfig(covariance=cov))
            f = figures(rep)
            print(f"  {cov:11s} {name:34s} {f} / exact {[round(x / e, 2) for x, e in zip(f, exact[cov])]}", flush=True)


if __name__ == "__main__":
    main()
