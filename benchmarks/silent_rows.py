"""The factored power sums of one chunk of the 1e7 benchmark MLP's second layer with its silent
output rows skipped or not (pf31; docs/benchmarks.md, "pf31"): CPU time per chunk (powers 2 and
4, one thread, interleaved repetitions in one process) and how far the two sums are apart.

    python benchmarks/silent_rows.py [--silent 0.907] [--records 512] [--columns 13] [--reps 4]

Shapes as the scoring pass sees them at 1e7 weights with the default options: 512 stored
records, 2,048 inputs (ReLU outputs, x >= 0), a chunk of 128 output rows (2^18 weights), 13
power-2 columns (baseline, 6 distinct main and 6 pool columns of the 8 schemes) and 1 power-4
column (the baseline's). A fraction ``--silent`` of the output rows has d = 0 on every record
(the trained 1e7 MLP: 3,716 of its 4,096 second-layer units are off for every record, 0.907);
their mean gradient is not 0 (the mean over all records). ``SKIP_SILENT_ROWS`` False sums every
row (before pf31), True leaves them out of the GEMMs. ``--flag SKIP_DEAD_ROWS --dead F`` (pf32)
times that switch instead, with a fraction ``F`` of the rows (a subset of the silent ones) dead:
no gradient variance on any weight of the row and mean gradient 0 (the 1e7 MLP: 3,716 of 4,096
units dead on every record, 0.907, of the 3,907 silent on the stored records, 0.954):

    python benchmarks/silent_rows.py --flag SKIP_DEAD_ROWS --silent 0.954 --dead 0.907

``--flag HOLD_TEMPORARIES`` (ps33) times the chunk-sized temporaries held by the layer's
PowerCache from call to call against new ones per call (bitwise the same sums):

    python benchmarks/silent_rows.py --flag HOLD_TEMPORARIES --silent 0.954 --reps 8

The sums are not bitwise the same: MKL's
float32 GEMMs can round otherwise with fewer columns (the power-4 call's single column: 11
instead of 128), within the run-time bound each is held to (``POWER_SUMS_F32_RTOL``).
"""

from __future__ import annotations

import argparse
import time

import torch

from mis_lightning.estimation import linear_factors as LF


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--silent", type=float, default=0.907)
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--columns", type=int, default=13)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--flag", choices=["SKIP_SILENT_ROWS", "SKIP_DEAD_ROWS", "HOLD_TEMPORARIES"],
                    default="SKIP_SILENT_ROWS")
    ap.add_argument("--dead", type=float, default=0.0, help="fraction of rows without gradient variance")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    R, n_in, out = args.records, 2048, 128
    x = torch.randn(R, n_in, generator=g, dtype=torch.float64).relu_()
    d = torch.randn(R, out, generator=g, dtype=torch.float64) * 1e-3
    u = torch.rand(out, generator=g)
    d[:, u < args.silent] = 0.0
    fac = LF.LinearFactors(module="m", weight="m.weight", bias=None, x=x, d=d)
    gr_mean = torch.randn(out * n_in, generator=g, dtype=torch.float64) * 1e-5
    v = torch.rand(out * n_in, generator=g, dtype=torch.float64) * 1e-6 + 1e-8
    if args.dead:
        dead = (u < min(args.dead, args.silent)).repeat_interleave(n_in)
        v[dead], gr_mean[dead] = 0.0, 0.0
    A2 = torch.rand(out * n_in, args.columns, generator=g, dtype=torch.float64)
    A4 = torch.rand(out * n_in, 1, generator=g, dtype=torch.float64)
    cache = LF.PowerCache()
    LF.factored_power_sums(fac, gr_mean, v, A2, 2, cache=cache)  # the layer's cache filled once
    LF.factored_power_sums(fac, gr_mean, v, A4, 4, cache=cache)
    times: dict[bool, list[float]] = {False: [], True: []}
    sums: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    old = getattr(LF, args.flag)
    try:
        for _ in range(args.reps):
            for skip in (False, True):
                setattr(LF, args.flag, skip)
                c0 = time.process_time()
                s2 = LF.factored_power_sums(fac, gr_mean, v, A2, 2, cache=cache)
                s4 = LF.factored_power_sums(fac, gr_mean, v, A4, 4, cache=cache)
                times[skip].append(time.process_time() - c0)
                sums[skip] = (s2, s4)
    finally:
        setattr(LF, args.flag, old)
    rel = max(float(((a - b).abs() / b.abs()).max()) for a, b in zip(sums[True], sums[False]))
    equal = all(torch.equal(a, b) for a, b in zip(sums[True], sums[False]))
    print(f"silent rows {int((d == 0).all(0).sum())} of {out}, dead {int((v.reshape(out, -1) == 0).all(1).sum())}; "
          f"{args.flag} False / True")
    for skip, t in times.items():
        label = ("held" if skip else "new") if args.flag == "HOLD_TEMPORARIES" else ("skipped" if skip else "summed")
        print(f"{label:8s} powers 2 + 4, one chunk: min {min(t):.4f} s, "
              f"median {sorted(t)[len(t) // 2]:.4f} s CPU")
    print(f"{args.flag} True / False (min): {min(times[True]) / min(times[False]):.2f}; bitwise equal: {equal}; "
          f"largest relative difference {rel:.1e}")
    # float32 GEMMs of another shape may round otherwise: each sum is within the run-time bound's
    # POWER_SUMS_F32_RTOL of the exact one, so the two within twice that
    return 0 if rel <= 2 * LF.POWER_SUMS_F32_RTOL else 1


if __name__ == "__main__":
    raise SystemExit(main())
