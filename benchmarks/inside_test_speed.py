"""The point-mass inside test (``ParamGrid._inside``) per chunk of a saved model's weights, with
the float formats' bits test (``functional.table.FORMAT_INSIDE_BITS``, p46b) on and off, in one
process, alternating: CPU ms per 2^18-weight chunk and whether every mask is the same (issue 13;
docs/benchmarks.md, "p46b").

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt
    OMP_NUM_THREADS=1 python benchmarks/inside_test_speed.py /tmp/m1e7.pt --schemes fp16 bf16 float8_weight_only

The weights are the saved model's (the test reads theta alone: no estimation is run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model saved by `first_call.py train`")
    ap.add_argument("--schemes", nargs="+", default=["fp16", "bf16", "float8_weight_only"])
    ap.add_argument("--params", nargs="+", default=["0.weight", "2.weight"])
    ap.add_argument("--rounds", type=int, default=2, help="on/off pairs per chunk")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from benchmarks.first_call import load_saved
    from mis_lightning._heap import raise_mmap_threshold
    from mis_lightning.assess import resolve_schemes
    from mis_lightning.functional import table
    from mis_lightning.quantization.base import (
        release_chunk_facts,
        scale_facts_shared,
        zero_counts_only,
    )

    raise_mmap_threshold()  # as score_schemes does (fresh 2 MB temporaries otherwise fault)
    _, model, *_ = load_saved(args.model)
    params = dict(model.named_parameters())
    chunk = 1 << 18
    for scheme in resolve_schemes(args.schemes):
        with zero_counts_only(), scale_facts_shared([]):
            grids = scheme.apply(model).grids
        for name in args.params:
            g = grids.get(name)
            if g is None:
                continue
            th = params[name].detach().reshape(-1)
            spent = {True: 0.0, False: 0.0}
            same = True
            n = 0
            for a in range(0, th.numel(), chunk):
                b = min(a + chunk, th.numel())
                t = th[a:b].to(torch.float64)
                scale, zp, code, _, bounds = g._chunk_grid(a, b)
                masks = {}
                for flag in (True, False) * args.rounds:
                    table.FORMAT_INSIDE_BITS = flag
                    c0 = time.process_time()
                    masks[flag] = g._inside(t, scale, zp, code, bounds)
                    spent[flag] += time.process_time() - c0
                same &= torch.equal(masks[True], masks[False])
                release_chunk_facts()
                n += args.rounds
            table.FORMAT_INSIDE_BITS = True
            print(f"{scheme.name:22s} {name:10s} masks equal {same}; per chunk: bits {spent[True] / n * 1e3:.2f} ms, "
                  f"table {spent[False] / n * 1e3:.2f} ms; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
