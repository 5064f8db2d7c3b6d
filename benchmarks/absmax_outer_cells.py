"""Absmax releases: how much the released absmax bounds the outer cells (validation lead).

A symmetric absmax release ``(q, scale)`` gives the largest-magnitude weight of its block away
(``qmax * scale``), so every other weight of the block is known to lie within ``+-qmax * scale``:
the two outer cells of the grid are ``[(qmax - 1/2) scale, qmax * scale]`` (and its mirror),
with the rest of the line a separate event (the release would differ). The product cuts them
there since the ninth session (``functional/bounds.py``, ``ParamGrid.support``); the control
variate of the ground truth (``ground_truth.oracle_first_order``) still treats them as
unbounded (it only reduces variance). This script evaluates the first-order indicator with the POPULATION values
(true theta, sd and influences of 4,000 fresh records; independent coordinates, Monte Carlo
form) on the linear ``d = 5`` validation setting, with the outer cells unbounded and bounded,
for ``rtn_int2/4/8``, next to the exact truth of ``ground_truth.exact_tv_ols_absmax`` (pooled
values of docs/validation.md, "Exact truths for the absmax releases"):

    python benchmarks/absmax_outer_cells.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning.functional import cell_statistics, record_leakage  # noqa: E402
from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402

# exact truths, pooled over independent target samples (docs/figures/truth_absmax_seed*.json)
EXACT = {2: 0.00892, 4: 0.01267, 8: 0.02132}


def first_order(s: GT.Setting, bits: int, bounded: bool, records: int = 4000) -> float:
    """The indicator's Monte Carlo form with the true parameters, outer cells (un)bounded."""
    g = GT.AbsmaxGrid(f"rtn_int{bits}", bits)
    xb, yb = GT.draw_records(s, records, np.random.default_rng([1, 99]))
    w = GT.influence(s, xb, yb) / np.sqrt(np.diag(s.Sigma))
    th, sd = s.theta_star, s.sd
    _, scale = g.release(th[None])
    m = float(np.abs(th).max())  # the released absmax
    edges = GT._edges_around(GT.StepGrid("tmp", np.full(s.d, float(scale[0, 0]))), th, sd, 30, qmax=g.qmax)
    if bounded:  # cells cut to [-m, m]; beyond: the outermost (empty or "other release") cells
        edges = np.clip(edges, -m, m)
        edges[:, 0], edges[:, -1] = -np.inf, np.inf
    j = int(np.argmax(np.abs(th)))  # the given-away weight: scored as unquantized
    edges[j, 1:-1] = th[j] + np.linspace(-8.5, 8.5, edges.shape[1] - 2) * sd[j]
    st = cell_statistics(torch.from_numpy(th), torch.from_numpy(sd), torch.from_numpy(edges))
    gen = torch.Generator().manual_seed(0)
    return float(record_leakage(torch.from_numpy(w), st, s.n, method="mc", mc_draws=2048, generator=gen).mean())


def main() -> None:
    torch.set_num_threads(1)
    s = GT.make_setting("linear", 5, 1000, rho=0.5)
    print("| grid | unbounded outer cells | bounded by the released absmax | exact truth |")
    print("|---|---|---|---|")
    for bits in (2, 4, 8):
        print(f"| rtn_int{bits} | {first_order(s, bits, False):.5f} | {first_order(s, bits, True):.5f} | {EXACT[bits]:.5f} |")


if __name__ == "__main__":
    main()
