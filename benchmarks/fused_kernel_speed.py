"""Steady-state throughput of ``affine_cell_moments`` on large chunks, eager vs compiled.

``affine_cell_moments`` sends chunks of >= TABLE_MIN_ELEMENTS weights through one
branch-free kernel; with ``compile_policy=CompilePolicy("always")`` (or automatically once a
process has pushed COMPILE_AFTER weights through it) that kernel runs under ``torch.compile``. This script
warms each mode up on one chunk (the compile time is printed separately), then times int8
grids (scale 0.01, weights N(0, 0.3^2)) in four regimes of the step h = scale / sigma, in
chunks of 2^18 weights, float64, then an int4 grid after the int8 ones (the code range that the
compiled kernel once got wrong). Every row also prints the largest |compiled - eager|
difference of kappa, lam and m4 over one chunk (the two must agree to 1e-6: the script exits
with status 1 and says which row when they do not), and the script ends by listing any
optimised path the self-check (functional/fastpath.py) disabled. The self-check runs in both
modes, as in production. ``--threads 1 2`` runs the whole table once per thread count in one
process (dynamo guards on the thread count, ``GLOBAL_STATE changed: num_threads``, so the kernel is
compiled again at each, as in production; the self-check runs per thread count).

    python benchmarks/fused_kernel_speed.py                # d = 4e6, 1 thread
    python benchmarks/fused_kernel_speed.py --d 1e7 --threads 2
    python benchmarks/fused_kernel_speed.py --d 2e6 --threads 1 2   # both, agreement asserted
    python benchmarks/fused_kernel_speed.py --self-check-overhead   # checks on / off, compiled
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mis_lightning.functional.grids as G
from mis_lightning.functional import fastpath


def self_check_overhead(chunk: int = 1 << 18, calls: int = 64, reps: int = 6) -> None:
    """Steady-state throughput of the compiled kernel with the sampled self-check on and off
    (alternating repetitions in one process: the ratio is what counts on a shared machine)."""
    g = torch.Generator().manual_seed(0)
    sc = torch.full((chunk,), 0.01, dtype=torch.float64)
    zp = torch.zeros(chunk, dtype=torch.float64)
    th = torch.randn(chunk, generator=g, dtype=torch.float64) * 0.3
    sg, policy = sc / 2, G.CompilePolicy.parse("always")
    for _ in range(3):
        G.affine_cell_moments(th, sg, sc, zp, -128, 127, compile_policy=policy)
    original = fastpath.GUARD.sample_size
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(reps):
        for mode in ("on", "off"):
            fastpath.GUARD.sample_size = original if mode == "on" else (lambda *a, **k: 0)  # type: ignore[method-assign]
            t = time.perf_counter()
            for _ in range(calls):
                G.affine_cell_moments(th, sg, sc, zp, -128, 127, compile_policy=policy)
            rates[mode].append(calls * chunk / (time.perf_counter() - t))
    fastpath.GUARD.sample_size = original  # type: ignore[method-assign]
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    print(f"self-check on {on:.3g} weights/s, off {off:.3g}; on / off = {on / off:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=float, default=4e6)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--self-check-overhead", action="store_true")
    args = ap.parse_args()
    if args.self_check_overhead:
        torch.set_num_threads(args.threads[0])
        self_check_overhead()
        return
    worst = 0.0
    for threads in args.threads:
        torch.set_num_threads(threads)
        w = table(args, threads)
        worst = w if not w <= worst else worst  # NaN propagates
    print(f"largest |compiled - eager| over every row and thread count: {worst:.1e}")
    if not worst <= 1e-6:
        raise SystemExit(f"compiled and eager kernels disagree by {worst:.1e} > 1e-6")


def table(args, threads: int) -> float:
    """One table of rates at ``threads`` threads; returns the largest |compiled - eager|."""
    worst = 0.0
    d, chunk = int(args.d), 1 << 18
    g = torch.Generator().manual_seed(0)
    sc = torch.full((d,), 0.01, dtype=torch.float64)
    zp = torch.zeros(d, dtype=torch.float64)
    th = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    G._uniform_table()
    print(f"d = {d:.3g}, chunk = {chunk}, threads = {threads}, load = {os.getloadavg()[0]:.2f}, "
          f"OMP_WAIT_POLICY = {os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print("| mode | grid | step (sd) | weights/s | max abs diff vs eager (one chunk) |")
    print("|---|---|---|---|---|")
    regimes = [(-128, 127, h) for h in (2.0, 20.0, 100.0, 0.2)] + [(-8, 7, 2.0)]
    eager_ref = {}
    for mode in ("0", "1"):
        policy = G.CompilePolicy.parse(mode)
        t0 = time.perf_counter()
        G.affine_cell_moments(th[:chunk], (sc / 2)[:chunk], sc[:chunk], zp[:chunk], -128, 127,
                              compile_policy=policy)
        if mode == "1":
            print(f"(compile + first chunk: {time.perf_counter() - t0:.1f} s)")
        for qmin, qmax, hsd in regimes:
            sct = sc * (16.0 if qmax == 7 else 1.0)  # int4: wider cells, same step in sd
            sgt = sct / hsd
            t = time.perf_counter()
            for a in range(0, d, chunk):
                G.affine_cell_moments(th[a : a + chunk], sgt[a : a + chunk], sct[a : a + chunk],
                                      zp[a : a + chunk], qmin, qmax, compile_policy=policy)
            el = time.perf_counter() - t
            one = G.affine_cell_moments(th[:chunk], sgt[:chunk], sct[:chunk], zp[:chunk], qmin, qmax,
                                        compile_policy=policy)
            key = (qmin, hsd)
            if mode == "0":
                eager_ref[key] = one
                diff = "-"
            else:
                e = eager_ref[key]
                dv = max(float((getattr(one, n) - getattr(e, n)).abs().max()) for n in ('kappa', 'mean_abs', 'm4'))
                worst = dv if not dv <= worst else worst  # NaN propagates
                diff = f"{dv:.1e}"
            grid = "int8" if qmax == 127 else "int4"
            print(f"| {'compiled' if mode == '1' else 'eager'} | {grid} | {hsd:g} | {d / el:.3g} | {diff} |")
    print("paths disabled by the self-check:", fastpath.GUARD.disabled or "none")
    return worst


if __name__ == "__main__":
    main()
