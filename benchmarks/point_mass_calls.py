"""The cell moments of one chunk of mostly sd-0 weights (the 1e7 benchmark MLP's second layer:
94% of its weights have sigma 0, dead units) as the scoring pass reads it: the call at sd, then
the pool protocol's at sd / sqrt(2) (``kappa_only``), per scheme, with the per-chunk facts of the
first call kept for the second and the sd-0 test in cache-sized blocks, or not (sc33;
docs/benchmarks.md, "sc33"). CPU time per (main, pool) pair, one thread, interleaved
repetitions in one process; the moments of both settings must be equal bit for bit (NaN where
both are NaN).

    python benchmarks/point_mass_calls.py [--rows 128] [--cols 2048] [--dead 0.94] [--reps 7]
    python benchmarks/point_mass_calls.py --switch POINT_MASS_LIVE_ONLY     # pad34: the live elements alone

Shapes as at 1e7 weights with the default options: a chunk of 128 output rows of 2,048 inputs
(2^18 weights), a fraction ``--dead`` of the rows with sd 0 on every weight, the other rows' sd
from a tenth of a step to 10 steps (log-normal). ``REUSE_CHUNK_FACTS`` and
``POINT_MASS_BLOCKS`` (quantization/base.py) both False is the code before sc33 in those two
respects; the padding without a sort and the other sc33 changes have no switch. ``--switch NAME``
(repeatable) compares other module switches of ``quantization/base.py`` instead, e.g.
``POINT_MASS_LIVE_ONLY`` (pad34: the chunk's live elements given to the paths alone, not padded).
"""

from __future__ import annotations

import argparse
import time

import torch

import mis_lightning.quantization.base as qb
from mis_lightning.quantization import get_scheme

SCHEMES = ["int8_weight_only", "intx_weight_only_int4_g32", "float8_weight_only", "bf16"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--dead", type=float, default=0.94)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--schemes", nargs="+", default=SCHEMES)
    ap.add_argument("--switch", action="append", default=None, metavar="NAME",
                    help="a boolean switch of quantization/base.py to compare off / on (repeatable; default: "
                         "REUSE_CHUNK_FACTS and POINT_MASS_BLOCKS)")
    args = ap.parse_args(argv)
    switches = args.switch or ["REUSE_CHUNK_FACTS", "POINT_MASS_BLOCKS"]
    for s in switches:
        if not isinstance(getattr(qb, s, None), bool):
            raise SystemExit(f"--switch {s}: not a boolean switch of quantization/base.py")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(args.cols, args.rows)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(args.rows, args.cols, generator=gen) * 0.02)
    theta = lin.weight.detach().reshape(-1).to(torch.float64)
    c = theta.numel()
    dead_rows = torch.rand(args.rows, generator=gen) < args.dead
    print(f"chunk {c} weights, {int(dead_rows.sum())} of {args.rows} rows sd 0; min of {args.reps} (main + pool) pairs;"
          f" switches {', '.join(switches)}")
    for name in args.schemes:
        try:
            g = get_scheme(name).apply(torch.nn.Sequential(lin)).grids["0.weight"]
        except Exception as exc:  # noqa: BLE001 - a scheme this machine cannot build (torchao missing)
            print(f"{name}: skipped ({type(exc).__name__}: {exc})")
            continue
        scale = g.element_grid(0, c)[0].to(torch.float64)
        step = scale if g.kind == "affine" else scale * 2.0 ** -3  # float8: ~the cells near the top
        sd = step * torch.exp(torch.randn(c, generator=gen, dtype=torch.float64) * 1.15)
        sigma = torch.where(dead_rows.repeat_interleave(args.cols), torch.zeros_like(sd), sd)
        times: dict[bool, list[float]] = {True: [], False: []}
        outs: dict[bool, tuple] = {}
        for _ in range(args.reps):
            for on in (False, True):
                for s in switches:
                    setattr(qb, s, on)
                qb.release_chunk_facts()
                c0 = time.process_time()
                main_mm = g.moments(theta, sigma, 0, c)
                pool = g.moments(theta, sigma / 2 ** 0.5, 0, c, kappa_only=True)
                times[on].append(time.process_time() - c0)
                outs[on] = (main_mm.kappa, main_mm.mean_abs, main_mm.m4, main_mm.coverage, pool.kappa)
        same = all(bool(((a == b) | (a.isnan() & b.isnan())).all()) for a, b in zip(outs[True], outs[False]))
        off, on = min(times[False]), min(times[True])
        print(f"{name}: off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms ({on / off:.2f}x); moments bitwise equal: {same}")
        if not same:
            return 1
    for s in switches:
        setattr(qb, s, True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
