"""The sd-0 point-mass test per chunk of a saved model's parameter with its proof
(``quantization.base.POINT_MASS_PROOF``, p47b) on and off, in one process, alternating: CPU ms per
2^18-weight chunk and whether every answer is the same (issue 13; docs/benchmarks.md, "p47b").
Per-row / per-group grids through ``ParamGrid.point_masses_at`` (the joint pass's unit-kappa
chunks), the bf16 / fp16 casts through ``ParamGrid._point_split`` (their main moments call).

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt
    OMP_NUM_THREADS=1 python benchmarks/point_mass_proof_speed.py /tmp/m1e7.pt --param 2.weight

The sd is the model's estimate (one estimation pass first). ``--flag MODULE.FLAG`` (under
``mis_lightning``) toggles another switch instead of ``POINT_MASS_PROOF`` (the "proof" column: on),
e.g. the casts' proof on blocks (p49c):

    OMP_NUM_THREADS=1 python benchmarks/point_mass_proof_speed.py /tmp/m1e7.pt --schemes fp16 bf16 \
        --flag functional.point_proof.PROOF_BLOCKS
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))

_AT = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32", "float8_weight_only"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model saved by `first_call.py train`")
    ap.add_argument("--param", default="2.weight")
    ap.add_argument("--schemes", nargs="+", default=_AT + ["fp16", "bf16"])
    ap.add_argument("--rounds", type=int, default=2, help="on/off pairs per chunk")
    ap.add_argument("--flag", default="quantization.base.POINT_MASS_PROOF", help="the switch toggled")
    args = ap.parse_args(argv)

    import importlib

    import torch

    torch.set_num_threads(1)
    from benchmarks.first_call import load_saved
    from mis_lightning._heap import raise_mmap_threshold
    from mis_lightning.assess import resolve_schemes, run_estimation
    from mis_lightning.quantization import base as qb

    raise_mmap_threshold()  # as score_schemes does
    _, model, loader, loss_fn, est_cfg, _ = load_saved(args.model)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    th, sg = est.theta[args.param], est.sigma[args.param]
    chunk = 1 << 18
    mod, flag = args.flag.rsplit(".", 1)
    switch = importlib.import_module(f"mis_lightning.{mod}")
    for scheme in resolve_schemes(args.schemes):
        with qb.zero_counts_only(), qb.scale_facts_shared([]):
            g = scheme.apply(model).grids.get(args.param)
        if g is None:
            continue
        at = scheme.name in _AT
        spent = {True: 0.0, False: 0.0}
        same, n, nones = True, 0, 0
        for a in range(0, th.numel(), chunk):
            b = min(a + chunk, th.numel())
            t, s = th[a:b].to(torch.float64), sg[a:b].to(torch.float64)
            got = {}
            for on in (True, False) * args.rounds:
                setattr(switch, flag, on)
                qb.release_chunk_facts()
                qb._sd_zero(s)  # (the joint pass's grids share it: computed before the clock)
                if not at:  # (the moments call's grid, before the clock; point_masses_at's own on it)
                    scale, zp, code, _, bounds = g._chunk_grid(a, b)
                c0 = time.process_time()
                r = g.point_masses_at(t, s, a, b) if at else g._point_split(t, s, scale, zp, code, bounds)
                spent[on] += time.process_time() - c0
                got[on] = r if at or r is None else r[0]
            same &= (got[True] is None) == (got[False] is None) and (
                got[True] is None or torch.equal(got[True], got[False]))
            nones += got[True] is None
            n += args.rounds
        setattr(switch, flag, True)
        qb.release_chunk_facts()
        print(f"{scheme.name:26s} {args.param:9s} {'point_masses_at' if at else '_point_split':15s} same {same}; "
              f"per chunk: proof {spent[True] / n * 1e3:.2f} ms, test {spent[False] / n * 1e3:.2f} ms; "
              f"None {nones}; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
