"""Bias of the cross-fitted factor model of the weights' correlation (``Correlation.from_influences``).

Standardised influences of ``m`` records drawn from N(0, R) (R: AR(1) with correlation rho over
the d coordinates), and the same times a per-record N(0, 1) scale (``ell=True``: how regression
residuals and classifier errors multiply a record's whole influence); the factor model is fitted
on them and scores 2,000 NEW records (as the cross-fitting does). Printed per (d / m): mean
sqrt(w' A^-1 w) over the new records divided by the same with the true R (1 = unbiased; the
headline's Gaussian form is sqrt(2/pi) sqrt(s2) / (2 sqrt n) per record). 3 repetitions, seed 0.

    python benchmarks/factor_correlation_bias.py
"""
import torch

from mis_lightning.functional.correlated import Correlation


def run(d, m, rho, ell, rank=64, reps=3):
    idx = torch.arange(d)
    R = rho ** (idx[:, None] - idx[None, :]).abs().double()
    C = torch.linalg.cholesky(R)
    out = []
    for _ in range(reps):
        f = (lambda k: torch.randn(k, 1, dtype=torch.float64)) if ell else (lambda k: 1.0)
        W = (torch.randn(m, d, dtype=torch.float64) @ C.T) * f(m)
        Wt = (torch.randn(2000, d, dtype=torch.float64) @ C.T) * f(2000)
        s2 = Correlation.from_influences(W, rank).quadratic(Wt)
        true = (Wt * torch.linalg.solve(R, Wt.T).T).sum(-1)
        out.append(float(s2.sqrt().mean() / true.sqrt().mean()))
    return sum(out) / len(out)
cases = [(5, 256), (8, 256), (32, 256), (64, 256), (65, 256), (100, 256), (65, 512), (101, 512), (101, 1500), (300, 256), (2000, 256)]
torch.manual_seed(0)
for ell in (False, True):
    for rho in (0.0, 0.5, 0.9):
        print(f"ell={ell} rho {rho}: " + " ".join(f"{d}/{m}:{run(d, m, rho, ell):.3f}" for d, m in cases), flush=True)
