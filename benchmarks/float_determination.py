"""Schemes whose weights left in float determine the quantized ones through the full correlation
(cr49; method.md section 3, "Correlated coordinates"; functional.correlated.ExactSpan).

Assesses a model with ``covariance="full"`` (the exact sandwich) and schemes that quantize one
layer each, and for every quantized scheme reads, besides the report's headline:

* the full form's Gaussian leakage (saturated, mean over records; no per-record cap) and the
  unquantized one at R's rank rule ``RCOND`` = 1e-9, 1e-11, 1e-13
  (``RecordCorrelation.with_rcond``), with the rank ``r`` of R's kept eigenspace, the rank ``k``
  of the exactly observed block ``B_E`` and its smallest counting singular value relative to
  ``sqrt(lambda_max)``;
* the same at the default rule with the float weights seen through float32 rounding noise
  instead of exactly, ``kappa = 1 - ulp^2 / (12 sigma^2)`` (``ulp`` of each weight in float32),
  and with a bf16-sized ulp (``2^16`` float32 ulps), each beside the unquantized model read the
  same way; ``capped``: that value capped record by record at the unquantized one (the headline's
  rule, assess._correlated_leakage).

Models: ``mlp`` (an 8-8-8-1 tanh MLP, d = 153, n = 1500, trained here by L-BFGS) or ``cnn PATH``
(a Conv2d+BatchNorm CNN, d = 387, n = 3000, the state dict at PATH: session 49's came from a
newcomer's SGD training with weight decay 1e-3 and was not kept; any trained state dict of the
architecture here serves):

    PYTHONPATH=. python benchmarks/float_determination.py mlp           # docs/benchmarks.md, "cr49"
    PYTHONPATH=. python benchmarks/float_determination.py cnn PATH
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.functional import saturate
from mis_lightning.quantization.mixed import MixedPrecisionScheme

INT2 = "intx_weight_only_int2"
RULES = (1e-9, 1e-11, 1e-13)


def _mlp() -> tuple[nn.Module, DataLoader, Any, float, list]:
    """The 8-8-8-1 tanh MLP of session 49's newcomer (nux49), fitted to its stationary point."""
    torch.manual_seed(0)
    n, p, wd = 1500, 8, 1e-3
    X = torch.randn(n, p)
    y = torch.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] + 0.3 * torch.randn(n)
    model = nn.Sequential(nn.Linear(p, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (0.5 * nnf.mse_loss(model(X).squeeze(-1), y)
                + 0.5 * wd * sum(q.pow(2).sum() for q in model.parameters()))
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    schemes = ["none"] + [MixedPrecisionScheme({k: INT2}, name=f"L{k}_int2") for k in ("0", "2", "4")] + [INT2]
    return (model, DataLoader(TensorDataset(X, y), batch_size=500),
            lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, wd, schemes)


def _cnn(path: str) -> tuple[nn.Module, DataLoader, Any, float, list]:
    """The small Conv2d+BatchNorm CNN of session 49 (its training data rebuilt from the seeds)."""
    torch.manual_seed(0)
    N, C = 3000, 3
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, C, (N,), generator=g)
    x = torch.randn(N, 1, 12, 12, generator=g)
    for c in range(C):
        x[y == c, 0, 4 * c:4 * c + 4, 3:9] += 1.0

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1))
            self.drop = nn.Dropout(0.2)
            self.fc = nn.Linear(8, C)

        def forward(self, inp: Tensor) -> Tensor:
            return self.fc(self.drop(self.features(inp).flatten(1)))

    model = CNN()
    model.load_state_dict(torch.load(path))
    dl = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(5))
    schemes = ["none", MixedPrecisionScheme({"fc": INT2}, name="fc_int2"),
               MixedPrecisionScheme({"features.0": INT2}, name="conv0_int2"),
               MixedPrecisionScheme({"features.4": INT2}, name="conv4_int2"), INT2, "float8_weight_only"]
    return model, dl, lambda o, t: nnf.cross_entropy(o, t, reduction="none"), 1e-3, schemes


def main(argv: list[str]) -> None:
    model, dl, loss, wd, schemes = _mlp() if argv[0] == "mlp" else _cnn(argv[1])
    A = sys.modules["mis_lightning.assess"]  # the module (``mis_lightning.assess`` is the function)
    orig = A._correlated_leakage
    rows: list[dict[str, Any]] = []

    def wrap(est: Any, prep: Any, rc: Any, kvec: Tensor, chosen: str, draws: int, gen: Any, scale: float,
             n: float) -> Tensor:
        res = orig(est, prep, rc, kvec, chosen, draws, gen, scale, n)
        if scale != 1.0 or bool((kvec == 1).all()):
            return res
        W, k = est.influence, kvec.to(torch.float64)
        cap = A._unquantized_mean_abs(est, rc)

        def lk(mean_abs: Tensor, capped: bool = False) -> float:
            return float(saturate((torch.minimum(mean_abs, cap) if capped else mean_abs) / (2 * math.sqrt(n))).mean())

        row: dict[str, Any] = {}
        for rule in RULES:
            r2 = rc.with_rcond(rule)
            span = r2.parts[0][1].exact_span(k)
            g2 = r2.gaussian_mean_abs(W, k)
            row[rule] = (lk(g2), lk(r2.gaussian_mean_abs(W, torch.ones_like(k))), span.rank, span.exact_rank,
                         span.smallest, lk(g2, capped=True))
        th = torch.cat([est.theta[nm].flatten().double() for nm in est.names]).float().abs()
        sg = torch.cat([est.sigma[nm].flatten().double() for nm in est.names])
        ulp = (torch.nextafter(th, torch.tensor(math.inf)) - th).double()
        exact = k >= 1
        for label, mult in (("float32", 1.0), ("bf16", 2.0 ** 16)):
            noisy = 1 - (ulp * mult) ** 2 / (12 * sg.square())
            kf = torch.where(exact, noisy, k)
            gf = rc.gaussian_mean_abs(W, kf)
            row[label] = (lk(gf), lk(rc.gaussian_mean_abs(W, torch.where(exact, noisy, torch.ones_like(k)))),
                          float((1 - noisy[exact]).max()), lk(gf, capped=True))
        rows.append(row)
        return res

    A._correlated_leakage = wrap
    try:
        rep = ml.assess(model, schemes, dl, loss, weight_decay=wd, covariance="full")
    finally:
        A._correlated_leakage = orig
    print(f"d = {rep.d}, n = {rep.n}, baseline {rep.baseline_leakage:.10f}")
    quantized = [(k, s) for k, s in rep.schemes.items() if s.quantized_fraction > 0]
    for (name, s), row in zip(quantized, rows):
        print(f"{name}: headline {s.leakage:.10f}, independent {s.leakage_independent:.6f}, "
              f"exact_determination {s.exact_determination}")
        for rule in RULES:
            q, b, r, kk, sm, cp = row[rule]
            print(f"   RCOND {rule:g}: Gaussian {q:.6f}, unquantized {b:.6f} ({100 * (q / b - 1):+.1f}%), "
                  f"rank r {r}, float block rank k {kk}, smallest {sm:.2g}, capped {cp:.6f}")
        for label in ("float32", "bf16"):
            q, b, top, cp = row[label]
            print(f"   float weights through {label} rounding noise (1 - kappa up to {top:.2g}): Gaussian {q:.6f}, "
                  f"the float model read the same way {b:.6f} ({100 * (q / b - 1):+.1f}%), capped {cp:.6f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["mlp"])
