"""Seconds of the eager fused cell-moment kernel (``kernel._fused_affine`` in cache-sized blocks)
over 1e6 int8-range elements with steps log-uniform in 0.05-33 sd (fine, table and two-edge
forms), given codes; median of 7 calls, 1 thread. Compare trees by running it under each:

    PYTHONPATH=OLD_TREE python benchmarks/fused_kernel_speed.py old
    PYTHONPATH=. python benchmarks/fused_kernel_speed.py new

(session 41: the own-cell test ``kernel._ok`` added; docs/benchmarks.md, "s41").
"""

import sys
import time

import torch

import mis_lightning.functional.kernel as K


def main(label: str, c: int = 1_000_000, rounds: int = 7) -> float:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    th = torch.randn(c, dtype=torch.float64, generator=g)
    s = torch.full((c,), 0.01, dtype=torch.float64)
    zp = torch.zeros(c, dtype=torch.float64)
    h = torch.exp(torch.empty(c, dtype=torch.float64).uniform_(-3, 3.5, generator=g))
    q = torch.clamp(torch.round(th / s), -128, 127)
    lo, dlog, du, table = K._uniform_table()
    bounds = tuple(torch.tensor(float(v), dtype=torch.float64) for v in (-128, 127, lo, dlog, du)) + (table,)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        K.in_blocks(K._fused_affine, (th, s / h, s, zp, q), bounds)
        times.append(time.perf_counter() - t)
    med = sorted(times)[rounds // 2]
    print(f"{label}: median {med:.4f} s over {rounds} calls of {c:,} elements")
    return med


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this tree")
