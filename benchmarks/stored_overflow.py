"""The overflow cells of bf16 / fp16-stored weights (fs40; method.md section 5, "Weights stored in
bf16 / fp16"): kappa next to the stored format's largest value against the brute-force reference
of tests/test_stored_overflow.py, and the cost of the exact stored-cell sums where a weight's reach
passes the overflow threshold (fp16 +-65520) under a ``bf16`` cast.

Part 1, per case (stored dtype, what releases it, weight, sd): the library's kappa (the checkout of
``--root``) and the reference's (torch's float32 casts of a fine grid, each change bisected; always
this file's checkout's test). Releases: ``storage`` (the storage grid: a weight left unquantized),
``bf16`` / ``fp16`` (the cast schemes on the stored weights).

Part 2: ``--n`` fp16-stored weights drawn uniformly in ``[-65504, 65504]`` under the ``bf16`` scheme,
one ``moments`` call per sd (CPU s, best of ``--repeats``, one thread): on fs40's code the weights
whose 8.5-sd reach passes +-65520 take the exact stored-cell sums at any sd, where the grid's own
cells stood in before (kappa up to 0.18 high); the fraction of such weights is printed.

    python benchmarks/stored_overflow.py                         # this checkout
    python benchmarks/stored_overflow.py --root /path/to/old     # the same cases on older code
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _linear(vals: list[float], dtype: torch.dtype) -> nn.Sequential:
    lin = nn.Linear(len(vals), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(vals, dtype=F64).reshape(1, -1))
    return nn.Sequential(lin.to(dtype))


def _grid(dtype: torch.dtype, release: str, vals: list[float]):
    from mis_lightning.quantization import get_scheme
    from mis_lightning.quantization.storage_grid import storage_grid

    model = _linear(vals, dtype)
    th = model[0].weight.detach().double().reshape(-1)
    if release == "storage":
        return storage_grid("w", tuple(model[0].weight.shape), dtype), th
    return get_scheme(release).apply(model).grids["0.weight"], th


def part1(reference, rel) -> None:
    cases = []
    for dt, top in ((torch.float16, 65504.0), (torch.bfloat16, float(torch.finfo(torch.bfloat16).max))):
        gap = 32.0 if dt == torch.float16 else 2.0**120
        for sd_gaps in (0.3, 0.3125, 1.0, 3.0):
            cases.append((dt, "storage", top, sd_gaps * gap))
    cases.append((torch.float16, "storage", 0.01, 1e5))
    for sd in (9.6, 32.0, 96.0, 3e3, 3e4):
        cases.append((torch.float16, "bf16", 65504.0, sd))
    for sd in (3e3, 3e4):
        cases.append((torch.float16, "bf16", 60000.0, sd))
        cases.append((torch.float16, "bf16", 1.0, sd))
    for dt, release, th0, sd in cases:
        g, th = _grid(dt, release, [th0])
        mm = g.moments(th, torch.full_like(th, sd), 0, 1)
        big = abs(th0) < 8.5 * sd
        k = reference(float(th[0]), sd, rel(dt, release), (1 << 20) if big else (1 << 13))[0]
        print(f"{str(dt)[6:]:9s} {release:8s} theta={float(th[0]):<12.6g} sd={sd:<10.4g} "
              f"kappa lib={float(mm.kappa[0]):.10f} ref={k:.10f} lib-ref={float(mm.kappa[0]) - k:+.3e}", flush=True)


def part2(n: int, repeats: int) -> None:
    g, _ = _grid(torch.float16, "bf16", [65504.0, -65504.0])
    gen = torch.Generator().manual_seed(0)
    th = (torch.rand(n, generator=gen, dtype=F64) * 2 - 1) * 65504.0
    th = th.to(torch.float16).double()
    s0, z0, _ = g.element_grid(0, 1)
    scale, zp = s0[:1].expand(n).clone(), z0[:1].expand(n).clone()
    for sd in (10.0, 300.0, 3e3, 3e4):
        sg = torch.full_like(th, sd)
        cross = float(((th.abs() + 8.5 * sd) >= 65520).double().mean())
        best = float("inf")
        for _ in range(repeats):
            c0 = time.process_time()
            mm = g.element_moments(th, sg, scale, zp, None, None)
            best = min(best, time.process_time() - c0)
        print(f"bf16 on fp16, n={n}, sd={sd:<8g} reach past 65520: {cross:6.1%}  moments {best:.3f} s CPU "
              f"mean kappa {float(mm.kappa.mean()):.6f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout whose mis_lightning is measured (default: this file's); "
                         "the reference is always this file's checkout's test")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(args.root.resolve()))  # its mis_lightning first
    from test_stored_overflow import reference  # the tests' reference: one truth (torch casts only)

    def rel(dt: torch.dtype, release: str):
        if release == "storage":
            return lambda x: x.to(dt).to(F64)
        cast = {"bf16": torch.bfloat16, "fp16": torch.float16}[release]
        return lambda x: x.to(dt).to(cast).to(F64)

    part1(reference, rel)
    part2(args.n, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
