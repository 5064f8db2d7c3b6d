"""An exact reference for the cell moments' deficits of a weight whose release bounds it
(docs/validation.md, "The wide-sd closed form against an exact partition sum"; tests/test_wide_sd.py, benchmarks/wide_sd_check.py): every cell of
the partition clipped to the bounds (the regions beyond are revealed: no deficit) integrated by
16-point Gauss-Legendre quadrature in each cell's own coordinates, each moment computed as a
deficit (``1 - kappa = sum p_k Var_k``, ``3 - m4 = sum E[u^4; k] - p_k mu_k^4``, the own cell's
``E|u| - |E u|`` split at 0), so no ``1 - (1 - x)`` cancellation: good to ~1e-15 relative of each
deficit on cells up to ~1 sd wide (the integrands are smooth polynomials times a Gaussian)."""

from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64
_T, _W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(16))
_INV = 1.0 / np.sqrt(2.0 * np.pi)


def _gl(a: torch.Tensor, b: torch.Tensor, f) -> torch.Tensor:
    """sum over cells of int_a^b f(c, d, phi) du, d = u - c, by Gauss-Legendre (per cell)."""
    c, hw = 0.5 * (a + b), 0.5 * (b - a)
    d = hw.unsqueeze(-1) * _T
    u = c.unsqueeze(-1) + d
    phi = torch.exp(-0.5 * u * u) * _INV
    return (f(c.unsqueeze(-1), d, u, phi) * _W).sum(-1) * hw


def exact_deficits(theta: float, sigma: float, edges: torch.Tensor) -> tuple[float, float, float]:
    """``(1 - kappa, sqrt(2/pi) - mean_abs, 3 - m4)`` of one weight whose partition between its
    bounds has the cell edges ``edges`` (parameter units, sorted, the bounds first and last)."""
    u = (edges.to(F64) - theta) / sigma
    a, b = u[:-1], u[1:]
    p = _gl(a, b, lambda c, d, uu, ph: ph)
    m1 = _gl(a, b, lambda c, d, uu, ph: ph * d)  # about each cell's centre
    m2 = _gl(a, b, lambda c, d, uu, ph: ph * d * d)
    live = p > 0
    dk = torch.where(live, m2 - m1 * m1 / torch.where(live, p, 1.0), 0.0)
    sh = torch.where(live, m1 / torch.where(live, p, 1.0), 0.0)  # mu - c
    mu = 0.5 * (a + b) + sh
    d4 = _gl(a, b, lambda c, d, uu, ph: ph * (d - sh.unsqueeze(-1)) * (uu + mu.unsqueeze(-1))
             * (uu * uu + mu.unsqueeze(-1) ** 2))
    own = (a < 0) & (b > 0)
    dm = 0.0
    if bool(own.any()):
        lo, hi = a[own], b[own]
        z = torch.zeros_like(lo)
        neg = _gl(lo, z, lambda c, d, uu, ph: -uu * ph)
        pos = _gl(z, hi, lambda c, d, uu, ph: uu * ph)
        dm = float((neg + pos - (pos - neg).abs()).sum())
    return float(dk.sum()), dm, float(d4.sum())


def partition_edges(g, i: int, lower: float, upper: float, scale: float, zp: float) -> torch.Tensor:
    """The cell edges of element ``i``'s grid strictly inside ``(lower, upper)``, with the bounds."""
    if g.kind == "affine":
        k = torch.arange(g.qmin, g.qmax, dtype=F64)
        e = (k + 0.5 - zp) * scale
    else:
        v = g.values.to(F64)
        e = 0.5 * (v[1:] + v[:-1]) * scale
    e = e[(e > lower) & (e < upper)]
    return torch.cat([torch.tensor([lower], dtype=F64), e, torch.tensor([upper], dtype=F64)])
