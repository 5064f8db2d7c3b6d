"""kappa of fp16 weights whose sd reaches past the table's top (fh38; docs/benchmarks.md "fh38"):
the scoring path (``table_cell_moments``) against float64 sums over every cell, on the cast's
cells (``casts.cast_cell_values``: the 65504 cell ends at 65520, where torch's cast overflows to
inf) and on the finite values' cells (the 65504 cell running on to infinity, the table before).

    python benchmarks/open_cells.py

Prints one line per (theta, sd): the path's kappa on the cast's cells, the every-cell sums on
the cast's cells and on the finite values' cells, and the path's error.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _every_cell(th: float, sg: float, values):
    import torch

    mids = 0.5 * (values[1:] + values[:-1])
    inf = torch.tensor([math.inf], dtype=torch.float64)
    a = (torch.cat([-inf, mids, inf]) - th) / sg
    up, lo = torch.special.ndtr(-a), torch.special.ndtr(a)
    p = torch.where(a[:-1] >= 0, up[:-1] - up[1:], lo[1:] - lo[:-1]).clamp_min(0.0)
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    live = p > 1e-300
    mu = torch.where(live, (pdf[:-1] - pdf[1:]) / torch.where(live, p, 1.0), 0.0)
    return float((p * mu**2).sum())


def main() -> None:
    import torch

    from mis_lightning.functional.table import table_cell_moments
    from mis_lightning.quantization.casts import cast_cell_values, representable_values

    torch.set_num_threads(1)
    cast, finite = cast_cell_values(torch.float16), representable_values(torch.float16).to(torch.float64)
    print("theta sd | path (cast cells) | every cell: cast / finite values | path - every cell (cast)")
    for th, sg in ((0.01, 3e3), (0.01, 1e4), (0.01, 2e4), (0.01, 3e4), (0.01, 1e5), (0.01, 1e6), (0.01, 1e8),
                   (60000.0, 3e3), (65504.0, 10.0), (65504.0, 100.0), (65504.0, 1e3)):
        t, s = torch.tensor([th], dtype=torch.float64), torch.tensor([sg], dtype=torch.float64)
        got = float(table_cell_moments(t, s, cast, torch.ones_like(t)).kappa[0])
        ref, old = _every_cell(th, sg, cast), _every_cell(th, sg, finite)
        print(f"{th:g} {sg:g} | {got:.12f} | {ref:.12f} / {old:.12f} | {got - ref:+.2e}")


if __name__ == "__main__":
    main()
