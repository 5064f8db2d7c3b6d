"""The records' quadratic forms on a ReLU MLP classifier at d > n (docs/validation.md, "The correlated headline of ReLU MLP classifiers at d > n"): the exact
estimator's in-sample ``g' V^+ g`` (every record ``n - 1``: the rank), with and without its leverage
correction, against the first-order quantity with the population's gradient covariance (``V`` from
``--fresh`` records of the same distribution, full rank) and the diagonal path's cross-fitted factor
model of the stored records (on the gradients, and on the diagonal estimate's own K-FAC ``psi``).

One model of ``benchmarks/kfac_classifier.py`` (``--act relu``, 20-80-5, n = 1,000, decay 1e-2,
``--seed``). Per form, over the stored records (the estimators' default selection), ``q / n``: mean,
median, p10 / p90; the unquantized headline ``mean saturate(sqrt(2/pi) sqrt(q) / (2 sqrt n))`` and
its pool-protocol value (``sqrt 2`` times the shift). Also the estimators' own headlines.

    PYTHONPATH=. python benchmarks/classifier_rank_forms.py --seed 0     # docs/validation.md, "The correlated headline of ReLU MLP classifiers at d > n"
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kfac_classifier import SCHEMES, ce, data, fit, mlp  # noqa: E402
from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.estimation.records import record_keys  # noqa: E402
from mis_lightning.functional.correlated import RecordCorrelation  # noqa: E402
from mis_lightning.functional.leakage import saturate  # noqa: E402


def teacher_sample(num: int, fan: int, classes: int, rho: float, seed: int,
                   n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` fresh records of ``data(n, fan, classes, rho, seed)``'s distribution (its teacher, whose
    weights follow its first ``n`` inputs in the generator's stream)."""
    g = torch.Generator().manual_seed(1000 + seed)
    torch.randn(n, fan, generator=g, dtype=torch.float64)
    w1 = torch.randn(fan, 16, generator=g, dtype=torch.float64) / fan ** 0.5
    w2 = torch.randn(16, classes, generator=g, dtype=torch.float64) * 2.0
    g2 = torch.Generator().manual_seed(777 + seed)
    x = torch.randn(num, fan, generator=g2, dtype=torch.float64)
    for t in range(1, fan):
        x[:, t] = rho * x[:, t - 1] + (1 - rho * rho) ** 0.5 * x[:, t]
    y = torch.multinomial(torch.softmax(torch.tanh(x @ w1 * 2) @ w2, 1), 1, generator=g2).reshape(-1)
    return x, y


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", type=int, default=20000, help="records for the population's gradient covariance")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    n, fan, C, rho, decay = 1000, 20, 5, 0.5, 1e-2
    t0 = time.process_time()
    x, y = data(n, fan, C, rho, a.seed)
    torch.manual_seed(a.seed)
    model = mlp(fan, [80], C, "relu").double()
    fit(model, x, y, decay, 3)
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=250)

    def est(mode: str, lc: bool | str = "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = run_estimation(model, loader, ce, EstimationConfig(mode=mode, weight_decay=decay, leverage_correction=lc))
            r = score_schemes(e, model, SCHEMES, uncertainty_draws=0)
        return e, [r.baseline_pool_leakage, r.baseline_leakage] + [r.schemes[s].leakage for s in SCHEMES]

    ex, h_ex = est("exact")
    ex0, h_ex0 = est("exact", False)
    dg, h_dg = est("diagonal")
    for nm, h, e in (("exact", h_ex, ex), ("exact, no leverage correction", h_ex0, ex0), ("diagonal", h_dg, dg)):
        print(f"{nm:30s} pool {h[0]:.4f} headline {h[1]:.4f} " + " ".join(f"{s} {v:.4f}" for s, v in zip(SCHEMES, h[2:]))
              + f" | mean leverage {e.diagnostics.get('mean_leverage', float('nan')):.3g}, capped "
              f"{e.diagnostics.get('leverage_capped', 0)}", flush=True)

    params = {k: p.detach() for k, p in model.named_parameters()}
    names = list(params)

    def loss1(p, xi, yi):
        return ce(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    def grads(xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(xx), 2000):
            gg = vmap(grad(loss1), in_dims=(None, 0, 0))(params, xx[i:i + 2000], yy[i:i + 2000])
            out.append(torch.cat([gg[k].reshape(len(xx[i:i + 2000]), -1) for k in names], 1))
        return torch.cat(out)

    Gt = grads(x, y)
    Gt = Gt - Gt.mean(0)
    xp, yp = teacher_sample(a.fresh, fan, C, rho, a.seed)
    Gp = grads(xp, yp)
    Gp = Gp - Gp.mean(0)
    Vt, Vp = Gt.T @ Gt / n, Gp.T @ Gp / a.fresh
    R = ex.influence.shape[0]
    stored = torch.sort(record_keys([x, y], None, n), stable=True).indices[:R]
    Gs = Gt[stored]
    print(f"d = {Gt.shape[1]}, n = {n}, R = {R}; train acc {float((model(x).argmax(1) == y).double().mean()):.3f}, "
          f"fresh acc {float((model(xp).argmax(1) == yp).double().mean()):.3f}; tr V_fresh / tr V_train "
          f"{float(Vp.trace() / Vt.trace()):.3f}", flush=True)

    def pinv_q(V: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, int]:
        ev, U = torch.linalg.eigh(V)
        keep = ev > 1e-9 * ev.max()
        return ((G @ U[:, keep]).square() / ev[keep]).sum(1), int(keep.sum())

    def cross(W: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        rc = RecordCorrelation.cross_fitted(W, 64)
        q = torch.empty(W.shape[0], dtype=torch.float64)
        for rows, c in rc.parts:
            q[rows] = c.quadratic(W[rows])
        return q, [int(c.factor.shape[1]) for _, c in rc.parts]

    rows: dict[str, torch.Tensor] = {}
    rows["exact estimator (leverage-corrected, its default)"] = ex.mahalanobis.double().square()
    rows["exact estimator, uncorrected: in-sample g'V+g"] = ex0.mahalanobis.double().square()
    q, r = pinv_q(Vp, Gs)
    rows[f"population V ({a.fresh:,} fresh records, rank {r}), training records"] = q
    q, _ = pinv_q(Vp, Gp[:R])
    rows["population V, fresh records"] = q
    q, _ = pinv_q(torch.diag(Vt.diagonal()), Gs)
    rows["independent coordinates (diag V_train)"] = q
    sd = Vt.diagonal().clamp_min(1e-300).sqrt()
    q, k = cross(Gs / sd)
    rows[f"cross-fitted factor model, gradients ({k[0]}/{k[1]} directions)"] = q
    q, k = cross(ex0.influence.double())
    rows[f"cross-fitted factor model, exact uncorrected psi ({k[0]}/{k[1]})"] = q
    q, k = cross(dg.unit_influence().double())
    rows[f"cross-fitted factor model, the diagonal estimate's K-FAC psi ({k[0]}/{k[1]})"] = q
    for nm, q in rows.items():
        qn = q.clamp_min(0.0) / n
        t = math.sqrt(2 / math.pi) * qn.sqrt() / 2
        print(f"| {nm} | {float(qn.mean()):.3g} | {float(qn.median()):.3g} | {float(qn.quantile(0.1)):.3g} / "
              f"{float(qn.quantile(0.9)):.3g} | {float(saturate(t).mean()):.3f} | "
              f"{float(saturate(math.sqrt(2) * t).mean()):.3f} |", flush=True)
    print(f"({time.process_time() - t0:.0f} s CPU)", flush=True)


if __name__ == "__main__":
    main()
