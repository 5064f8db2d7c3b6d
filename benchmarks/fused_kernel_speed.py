"""Steady-state throughput of ``affine_cell_moments`` on large chunks, eager vs compiled.

``affine_cell_moments`` sends chunks of >= TABLE_MIN_ELEMENTS weights through one
branch-free kernel; with ``compile_policy=CompilePolicy("always")`` (or automatically once a
process has pushed COMPILE_AFTER weights through it) that kernel runs under ``torch.compile``. This script
warms each mode up on one chunk (the compile time is printed separately), then times int8
grids (scale 0.01, weights N(0, 0.3^2)) in four regimes of the step h = scale / sigma, in
chunks of 2^18 weights, float64.

    python benchmarks/fused_kernel_speed.py                # d = 4e6, 1 thread
    python benchmarks/fused_kernel_speed.py --d 1e7 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import mis_lightning.functional.grids as G


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=float, default=4e6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, chunk = int(args.d), 1 << 18
    g = torch.Generator().manual_seed(0)
    sc = torch.full((d,), 0.01, dtype=torch.float64)
    zp = torch.zeros(d, dtype=torch.float64)
    th = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    G._uniform_table()
    print(f"d = {d:.3g}, chunk = {chunk}, threads = {args.threads}, load = {os.getloadavg()[0]:.2f}")
    print("| mode | step (sd) | weights/s |")
    print("|---|---|---|")
    for mode in ("0", "1"):
        policy = G.CompilePolicy.parse(mode)
        t0 = time.perf_counter()
        G.affine_cell_moments(th[:chunk], (sc / 2)[:chunk], sc[:chunk], zp[:chunk], -128, 127,
                              compile_policy=policy)
        if mode == "1":
            print(f"(compile + first chunk: {time.perf_counter() - t0:.1f} s)")
        for hsd in (2.0, 20.0, 100.0, 0.2):
            sg = sc / hsd
            t = time.perf_counter()
            for a in range(0, d, chunk):
                G.affine_cell_moments(th[a : a + chunk], sg[a : a + chunk], sc[a : a + chunk],
                                      zp[a : a + chunk], -128, 127, compile_policy=policy)
            el = time.perf_counter() - t
            print(f"| {'compiled' if mode == '1' else 'eager'} | {hsd:g} | {d / el:.3g} |")


if __name__ == "__main__":
    main()
