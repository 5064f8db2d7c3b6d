"""How far the grid's kappa is from the Gaussian truth on the cells a bf16 / fp16 model's stored
weights really have (bf29; docs/validation.md "bf16 / fp16 models, the cells of the stored weights and the released values", method.md section 5 "Weights stored in
bf16 / fp16").

A bf16 / fp16 model holds ``w = rnd_D(theta-hat)`` and the scheme quantizes ``w``: in the Gaussian
model of the continuous ``theta`` the cell of a code is the set of real weights whose stored value
has it. The truth (``tests/test_storage_rounding.py``'s ``_truth_kappa``, a scipy ``ndtr`` cell
sum) is taken over the partition the real backend gives: one block per row, the block's absmax
``m`` in it and every ``D`` value of ``[-m, m]``, the codes of the quantized model (float8: the
released values), edges at the midpoints between adjacent stored values whose code differs,
bounds at the midpoints inside ``-m`` and ``m``, revealed tails beyond. Positions: every ``D``
value in ``[0.05 m, 0.97 m]``, at sd = ratio x step (float8: x 32 scales, its widest cells). Per
(dtype, m, scheme, sd / step) the line gives ``max |kappa_grid / truth - 1|``, its mean and the
mean kappas. Runtime: ~1-3 min CPU for the whole table, seconds for one scheme.

    python benchmarks/storage_cells.py                                        # the bf29 table (after)
    python benchmarks/storage_cells.py --root /path/to/checkout-before        # the same on older code
    python benchmarks/storage_cells.py --dtypes bfloat16 --schemes rtn_int8 --ratios 0.5 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

# scheme -> block width (elements per row; the rows are the blocks of a per-row scale, and of a
# group-32 scheme's groups with width 32)
CASES = {"int8_weight_only": 128, "intx_weight_only_int8_g32": 32, "intx_weight_only_int4_g32": 32,
         "rtn_int8": 128, "rtn_int4": 128, "float8_weight_only": 128}
# block maxima per dtype: a power of two and (bf16) one just below the next, whose top binade is full
BLOCK_MAX = {"bfloat16": (1.0, 1.9375), "float16": (1.0, 1.999)}


def run(scheme_name: str, dtype: torch.dtype, m: float, width: int, ratios, truth_kappa, values) -> list[tuple]:
    """``(ratio, max |rel|, mean rel, mean kappa grid, mean kappa truth)`` per sd / step ratio."""
    from mis_lightning.quantization import get_scheme

    v = values(-m, m, dtype)
    per = width - 1
    rows = -(-v.numel() // per)
    fill = torch.zeros(rows * per, dtype=torch.float64)
    fill[: v.numel()] = v
    w = torch.empty(rows, width, dtype=torch.float64)
    w[:, 0], w[:, 1:] = m, fill.reshape(rows, per)  # every block's absmax is m: one scale for all
    lin = nn.Linear(width, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = nn.Sequential(lin.to(dtype))
    res = get_scheme(scheme_name).apply(model)
    g = res.grids["0.weight"]
    scale, zp, code = g.element_grid(0, g.numel)
    if code is None:  # table grid (float8): the code is the released value
        wq = res.model[0].weight
        code = wq.dequantize().double().reshape(-1) if hasattr(wq, "dequantize") else g.dequantized.double().reshape(-1)
    th = model[0].weight.detach().double().reshape(-1)
    assert bool((scale == scale[0]).all()), "the blocks should share one scale"
    s0, z0 = scale[0:1], zp[0:1]
    order = torch.argsort(th, stable=True)
    u, inv = torch.unique(th[order], return_inverse=True)
    cu = torch.empty_like(u)
    cu[inv] = code[order]
    change = torch.nonzero(cu[1:] != cu[:-1]).squeeze(-1)
    edges = (0.5 * (u[change] + u[change + 1])).numpy()
    lo_b, hi_b = float(0.5 * (u[0] + u[1])), float(0.5 * (u[-2] + u[-1]))  # stored values inside (-m, m)
    pos = u[(u >= 0.05 * m) & (u <= 0.97 * m)]
    n = pos.numel()
    out = []
    for r in ratios:
        sd = r * float(s0) * (32.0 if g.kind == "table" else 1.0)  # float8 e4m3: top binade ulp 32 scales
        b0 = g.element_bounds(0, 1)  # the release's bounds as the grid gives them
        mm = g.element_moments(pos, torch.full((n,), sd, dtype=torch.float64), s0.expand(n).clone(),
                               z0.expand(n).clone(), None, (b0[0].expand(n).clone(), b0[1].expand(n).clone()))
        tr = np.array([truth_kappa(float(p), sd, edges, lo_b, hi_b) for p in pos])
        rel = mm.kappa.numpy() / tr - 1
        out.append((r, float(np.abs(rel).max()), float(rel.mean()), float(mm.kappa.mean()), float(tr.mean())))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=list(BLOCK_MAX), choices=list(BLOCK_MAX))
    ap.add_argument("--schemes", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0, 8.0], help="sd / step")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout whose mis_lightning is measured (default: this file's); "
                         "the truth is always this file's checkout's test reference")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    sys.path.insert(0, str(ROOT / "tests"))
    from _lowp import dtype_values as _values  # the tests' value sweep (moved to tests/_lowp.py)
    from test_storage_rounding import _truth_kappa  # the tests' reference: one truth

    sys.path.insert(0, str(args.root.resolve()))
    for name in args.dtypes:
        dt = getattr(torch, name)
        for m in BLOCK_MAX[name]:
            for scheme in args.schemes:
                try:
                    out = run(scheme, dt, m, CASES[scheme], args.ratios, _truth_kappa, _values)
                except Exception as e:  # an older checkout may lack a scheme or a grid method
                    print(f"{name} m={m} {scheme}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                for r, mx, mean, kl, kt in out:
                    print(f"{name:9s} m={m:<7} {scheme:28s} sd/step={r:<4} max|lib/truth-1|={mx:.3e} "
                          f"mean(lib/truth-1)={mean:+.3e} mean kappa lib={kl:.4f} truth={kt:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
