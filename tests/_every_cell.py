"""Float64 sums over every cell of a value table (the reference of tests/test_table_open_cells.py
and tests/test_cast_cells.py): edges the midpoints of consecutive values, the two end cells
unbounded."""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _finite_values(dtype: torch.dtype) -> torch.Tensor:
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(F64)
    return torch.unique(bits[torch.isfinite(bits)])


def _every_cell(th: torch.Tensor, sg: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kappa = sum_k p_k mu_k^2 and m4 = sum_k p_k mu_k^4 over every cell (float64, [c])."""
    mids = 0.5 * (values[1:] + values[:-1])
    inf = torch.tensor([math.inf], dtype=F64)
    edges = torch.cat([-inf, mids, inf])
    kappa, m4 = torch.empty_like(th), torch.empty_like(th)
    for i in range(th.numel()):
        a = (edges - th[i]) / sg[i]
        # P(a_k < U < a_k+1) from the smaller tails (no cancellation on either side of 0)
        up = torch.special.ndtr(-a)  # P(U > a)
        lo = torch.special.ndtr(a)  # P(U < a)
        p = torch.where(a[:-1] >= 0, up[:-1] - up[1:], lo[1:] - lo[:-1]).clamp_min(0.0)
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        live = p > 1e-300
        mu = torch.where(live, (pdf[:-1] - pdf[1:]) / torch.where(live, p, 1.0), 0.0)
        kappa[i] = (p * mu**2).sum()
        m4[i] = (p * mu**4).sum()
    return kappa, m4
