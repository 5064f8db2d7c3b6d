"""Cost of scoring torchao's intx schemes on a bf16 / fp16 model (the rounded-quotient grid,
exact window sums over the real cells) against the same scheme on the float32 model (the
affine grid: fused uniform-cell kernel): ``ParamGrid.moments`` over one weight matrix, CPU
time per weight, the two interleaved in one process (``--repeats`` rounds, median).

    python benchmarks/quotient_grid_speed.py                       # 1 thread, 2^18 weights
    python benchmarks/quotient_grid_speed.py --dtype float16 --ratios 0.5 2
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
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--schemes", nargs="+", default=["intx_weight_only_int8_g32", "intx_weight_only_int4_g32"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 1.0, 4.0], help="sd / step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn

    from mis_lightning.quantization import get_scheme

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=g) * 0.05
    low = getattr(torch, args.dtype)
    print(f"{args.rows * args.cols} weights, {args.threads} thread(s); CPU ns per weight (median of {args.repeats})")
    print(f"| scheme | sd / step | float32 (affine) | {args.dtype} (quotient) | ratio |")
    print("|---|---|---|---|---|")
    for name in args.schemes:
        grids = {}
        for dt in (torch.float32, low):
            lin = nn.Linear(args.cols, args.rows, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            model = nn.Sequential(lin.to(dt))
            grids[dt] = (get_scheme(name).apply(model).grids["0.weight"],
                         model[0].weight.detach().double().reshape(-1))
        for r in args.ratios:
            cpu: dict[torch.dtype, list[float]] = {torch.float32: [], low: []}
            for _ in range(args.repeats):
                for dt, (grid, th) in grids.items():  # interleaved
                    step = grid.element_grid(0, grid.numel)[0]
                    sg = step * r
                    c0 = time.process_time()
                    grid.moments(th, sg, 0, grid.numel)
                    cpu[dt].append(time.process_time() - c0)
            a, b = (statistics.median(cpu[d]) * 1e9 / grids[d][1].numel() for d in (torch.float32, low))
            print(f"| {name} | {r} | {a:.0f} | {b:.0f} | {b / a:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
