"""sd-0 (floored) weights exactly on an fp16 / bf16 midpoint through an unchecked
``table_cell_moments`` against the reference path (tie48; docs/benchmarks.md "tie48"):

    python benchmarks/sd0_cell_edge.py          # as the library runs
    python benchmarks/sd0_cell_edge.py --old    # functional.table.EXACT_EDGE_OFFSETS False

Prints, per table, call kind (full, kappa-only) and float32 weight on a midpoint (|theta| ~0.5, 8,
1000 and the table's top one, both signs), the fast path's ``kappa, mean_abs, m4, coverage`` and
the reference's (the exact answer: two half-normal cells, ``2/pi, sqrt(2/pi), 4/pi^2, 1``).
The self-checks are off (every call unchecked, as after a process's first calls).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.getcwd())  # the checkout under test first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", action="store_true", help="EXACT_EDGE_OFFSETS False (the path before tie48)")
    args = ap.parse_args(argv)
    import torch

    from mis_lightning.functional import fastpath
    from mis_lightning.functional import table as T
    from mis_lightning.quantization.casts import cast_cell_values

    T.EXACT_EDGE_OFFSETS = not args.old
    fastpath.GUARD.sample_size = lambda *a, **k: 0  # unchecked calls
    f64 = torch.float64
    fields = ("kappa", "mean_abs", "m4", "coverage")
    for dtype in (torch.float16, torch.bfloat16):
        values = cast_cell_values(dtype)
        mids = 0.5 * (values[1:] + values[:-1])
        pick = [int(torch.searchsorted(mids, torch.tensor(x, dtype=f64))) for x in (0.5, 8.0, 1000.0)]
        th = mids[torch.tensor(pick + [mids.numel() - 1])]
        th = torch.cat([th, -th])
        sg, sc = torch.full_like(th, torch.finfo(f64).tiny), torch.ones_like(th)
        ref = T.table_reference_moments(th, sg, values, sc)
        for kappa_only in (False, True):
            got = T.table_cell_moments(th, sg, values, sc, kappa_only=kappa_only)
            shown = fields[:1] + fields[3:] if kappa_only else fields
            print(f"{str(dtype)[6:]} {'kappa-only' if kappa_only else 'full'} (fast | reference)")
            for i in range(th.numel()):
                cols = " ".join(f"{f} {float(getattr(got, f)[i]):.6g} | {float(getattr(ref, f)[i]):.6g};"
                                for f in shown)
                print(f"  theta {float(th[i]):>14.8g}: {cols}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
