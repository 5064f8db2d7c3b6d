"""What the fine-sd switch of bf16 / fp16 grids saves: ``ParamGrid.moments`` over one weight matrix
with ``STORAGE_EXACT_MAX_ULPS`` / ``STORAGE_FINE_CELLS`` as shipped (the grid's own edges above 16
storage ulps and 2 cells of sd, no bound within reach) against every weight on the stored cells
(both infinite), interleaved in one process: CPU ns per weight (median of ``--repeats``) and the
largest relative difference of kappa.

    python benchmarks/storage_exact_switch.py --dtype bfloat16
    python benchmarks/storage_exact_switch.py --dtype float16 --ratios 2.5 4 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--schemes", nargs="+", default=["int8_weight_only", "intx_weight_only_int8_g32", "rtn_int4"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[2.5, 4.0, 8.0], help="sd / step")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn

    from mis_lightning.quantization import base, get_scheme

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=g) * 0.05
    shipped = (base.STORAGE_EXACT_MAX_ULPS, base.STORAGE_FINE_CELLS)
    print(f"{args.rows * args.cols} {args.dtype} weights, 1 thread; CPU ns per weight (median of {args.repeats})")
    print("| scheme | sd / step | switch as shipped | all on the stored cells | max kappa rel. diff |")
    print("|---|---|---|---|---|")
    for name in args.schemes:
        lin = nn.Linear(args.cols, args.rows, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        model = nn.Sequential(lin.to(getattr(torch, args.dtype)))
        grid = get_scheme(name).apply(model).grids["0.weight"]
        th = model[0].weight.detach().double().reshape(-1)
        step = grid.element_grid(0, grid.numel)[0]
        for r in args.ratios:
            cpu: list[list[float]] = [[], []]
            kappa = []
            for _ in range(args.repeats):
                for k, consts in enumerate((shipped, (float("inf"), float("inf")))):
                    base.STORAGE_EXACT_MAX_ULPS, base.STORAGE_FINE_CELLS = consts
                    c0 = time.process_time()
                    mm = grid.moments(th, step * r, 0, grid.numel)
                    cpu[k].append(time.process_time() - c0)
                    if len(kappa) < 2:
                        kappa.append(mm.kappa)
            base.STORAGE_EXACT_MAX_ULPS, base.STORAGE_FINE_CELLS = shipped
            a, b = (statistics.median(c) * 1e9 / th.numel() for c in cpu)
            rel = float((kappa[0] / kappa[1] - 1).abs().max())
            print(f"| {name} | {r} | {a:.0f} | {b:.0f} | {rel:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
