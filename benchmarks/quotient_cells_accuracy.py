"""The quotient grid of intx schemes on bf16 / fp16 weights against the Gaussian truth on
torchao's cells, in the continuous model of the weights (qx28; docs/validation.md, "Intx schemes on bf16 / fp16 weights, scored on torchao's real cells").

Per case (dtype x int8 / int4 x per-row / group-32 x symmetric / asymmetric, the cases of
``tests/test_lowp_quotient_cells.py``, whose reference ``_truth_kappa`` / ``_truth_edges`` this
uses): per-coordinate kappa of the grid / the closed-form truth at 121 positions over the block's
range (block max 1), sd = step / 2 and step, for the quotient grid and for the former midpoint grid
(the same grid read as kind "affine"). Both grids are read with ``storage_dtype=None``: the
continuous model qx28 measured; the cells of the stored weights (bf29) are
``benchmarks/storage_cells.py``. Runtime: ~1 min CPU.

    python benchmarks/quotient_cells_accuracy.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 1.0], help="sd / step")
    ap.add_argument("--positions", type=int, default=121)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from test_lowp_quotient_cells import (
        CASES,
        _id,
        _scheme,
        _sweep_model,
        _truth_edges,
        _truth_kappa,
    )

    print("| case | sd / step | new: max abs(ratio-1) | old midpoints: mean ratio [min, max] |")
    print("|---|---|---|---|")
    for case in CASES:
        dtype, bits, per_row, asym = case
        m = 1.0
        lo = -0.61 * m if asym else -m
        model, _ = _sweep_model(dtype, m, lo, 128 if per_row else 32, bits)
        g = dataclasses.replace(_scheme(bits, per_row, asym).apply(model).grids["0.weight"], storage_dtype=None)
        old = dataclasses.replace(g, kind="affine", quotient_dtype=None)
        scale, zp, _code = g.element_grid(0, g.numel)
        s0, z0 = scale[2], zp[2]
        edges, uj, _inv, _up = _truth_edges(dtype, torch.tensor(float(s0)))
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        inside = edges[(uj > qmin - float(z0)) & (uj <= qmax - float(z0))]
        pos = torch.linspace(0.97 * lo, 0.97 * m, args.positions, dtype=torch.float64)
        n = pos.numel()

        def rep(t, n=n):
            return t.reshape(1).expand(n).clone()

        b = (torch.full_like(pos, lo), torch.full_like(pos, m))
        for ratio in args.ratios:
            sd = torch.full_like(pos, ratio * float(s0))
            kn = g.element_moments(pos, sd, rep(s0), rep(z0), None, b).kappa
            ko = old.element_moments(pos, sd, rep(s0), rep(z0), None, b).kappa
            tr = torch.tensor([_truth_kappa(float(p), float(sd[0]), inside, lo, m) for p in pos], dtype=torch.float64)
            rn, ro = kn / tr, ko / tr
            print(f"| {_id(case)} | {ratio} | {float((rn - 1).abs().max()):.1e} | "
                  f"{float(ro.mean()):.3f} [{float(ro.min()):.2f}, {float(ro.max()):.2f}] |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
