"""A factor correlation whose form is certified at the point kappa but not at the interval's high
corner: the correlated ends NaN while the headline's form is finite."""

import sys

sys.path.insert(0, ".")
import torch

from mis_lightning.functional.correlated import Correlation

F64 = torch.float64
g = torch.Generator().manual_seed(5)
found = 0
for t in range(400):
    d, k = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    L = torch.randn(d, k, generator=g, dtype=F64) * 10 ** (8 * torch.rand(d, 1, generator=g, dtype=F64))
    res = 10 ** (-12 * torch.rand(d, generator=g, dtype=F64))
    c = Correlation(factor=L, residual=res)
    rows = (L @ torch.randn(k, 4, generator=g, dtype=F64)).T
    k_pt = torch.full((d,), 0.5, dtype=F64)
    k_hi = torch.ones(d, dtype=F64)
    q_pt, q_hi = c.quadratic(rows, k_pt), c.quadratic(rows, k_hi)
    m = q_pt.isfinite() & q_hi.isnan()
    if bool(m.any()):
        found += 1
        if found == 1:
            print("trial", t, "d", d, "k", k, "point", q_pt.tolist(), "high corner", q_hi.tolist())
print("cases with a finite point form and a NaN high-corner form:", found, "of 400")
