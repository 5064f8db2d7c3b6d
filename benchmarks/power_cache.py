"""The factored power sums of one chunk of the 1e7 benchmark MLP's second layer with and without
a layer's :class:`~mis_lightning.estimation.linear_factors.PowerCache` (pf30; docs/benchmarks.md,
"pf30"): CPU time per call (powers 2 and 4, one thread, interleaved repetitions in one process)
and whether the sums are bitwise equal.

    python benchmarks/power_cache.py [--columns 10] [--reps 4]

Shapes as the scoring pass sees them at 1e7 weights: 4,096 records, 2,048 inputs, a chunk of
128 output rows (2^18 weights); ``--columns`` power-2 columns (the distinct main and pool
columns of a chunk), 2 power-4 columns; x >= 0 (ReLU inputs), one dead unit. The uncached call
recomputes the inputs' powers ``(x / 2^k)^a`` in float32 (and ``x^a`` in float64) on every
chunk; the cached one computes them once per layer.
"""

from __future__ import annotations

import argparse
import time

import torch

from mis_lightning.estimation import linear_factors as LF


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--columns", type=int, default=10)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    R, n_in, out = 4096, 2048, 128
    x = torch.randn(R, n_in, generator=g, dtype=torch.float64).relu_()
    d = torch.randn(R, out, generator=g, dtype=torch.float64) * 1e-3
    d[:, 0] = 0.0  # a dead unit: no gradient variance
    fac = LF.LinearFactors(module="m", weight="m.weight", bias=None, x=x, d=d)
    gr_mean = torch.randn(out * n_in, generator=g, dtype=torch.float64) * 1e-5
    v = torch.rand(out * n_in, generator=g, dtype=torch.float64) * 1e-6 + 1e-8
    v[:n_in] = 0.0
    A2 = torch.rand(out * n_in, args.columns, generator=g, dtype=torch.float64)
    A4 = torch.rand(out * n_in, 2, generator=g, dtype=torch.float64)
    cache = LF.PowerCache()
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    LF.factored_power_sums(fac, gr_mean, v, A2, 2, cache=cache)  # the cache filled once (the layer's first chunk)
    LF.factored_power_sums(fac, gr_mean, v, A4, 4, cache=cache)
    for _ in range(args.reps):
        for kind in ("uncached", "cached"):
            c = cache if kind == "cached" else None
            c0 = time.process_time()
            s2 = LF.factored_power_sums(fac, gr_mean, v, A2, 2, cache=c)
            s4 = LF.factored_power_sums(fac, gr_mean, v, A4, 4, cache=c)
            times[kind].append(time.process_time() - c0)
            sums[kind] = (s2, s4)
    equal = all(torch.equal(a, b) for a, b in zip(sums["uncached"], sums["cached"]))
    for kind, t in times.items():
        print(f"{kind:9s} powers 2 + 4, one chunk: min {min(t):.3f} s, median {sorted(t)[len(t) // 2]:.3f} s CPU")
    print(f"cached / uncached (min): {min(times['cached']) / min(times['uncached']):.2f}; bitwise equal: {equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
