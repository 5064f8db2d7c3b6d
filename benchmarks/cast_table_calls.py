"""The bf16 / fp16 casts' value-table calls of one 1e7 scoring, captured and replayed with a
table switch on and off (issue 13; docs/benchmarks.md, "p49c").

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cast_table_calls.py M --rounds 4 \
        --flag functional.table.SETTLE_UNIT_BITS

Runs the default "assess" estimation of a model saved by ``first_call.py train`` and one
``score_schemes(["fp16", "bf16"])`` call, recording every ``table_cell_moments`` call (the tensors
themselves, held, so that a main call and the pool call after it share them as in the pass). Then
replays the fast path each call takes (``table._table_fast_moments``, no self-check) ``--rounds``
times, alternating the switches on and off (which goes first alternates too), and prints the CPU
seconds (``time.process_time``, one thread) of each replay by cast and role (``moments``: the
main and pool calls of ``ParamGrid.moments``; ``draws``: the bootstrap draws' calls, told apart
by a caller's name) and whether every output field (``kappa``; ``mean_abs``, ``m4``, ``coverage``
of full calls; the closed-form mask) is bitwise equal between the two settings.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _capture(path: str) -> list[tuple]:
    import torch

    import mis_lightning.functional.table as T
    from benchmarks.first_call import load_saved
    from mis_lightning.assess import run_estimation, score_schemes

    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    calls: list[tuple] = []
    real = T.table_cell_moments

    def spy(theta, sigma, values, scale, half_window=18, path_elements=None, kappa_only=False):
        stack = [f.name for f in traceback.extract_stack(limit=60)]
        role = "draws" if any("draw" in n for n in stack) else "moments"
        dt = "fp16" if values.numel() == T._FORMAT_SIZE[torch.float16] else "bf16"
        calls.append((dt, role, theta, sigma, values, scale, path_elements, kappa_only,
                      theta._version, sigma._version, scale._version))
        return real(theta, sigma, values, scale, half_window, path_elements, kappa_only)

    import mis_lightning.quantization.base as B
    B.table_cell_moments = spy
    try:
        score_schemes(est, model, ["fp16", "bf16"], scoring_config=sc_cfg)
    finally:
        B.table_cell_moments = real
    T.release_own_cells()
    return calls


def _replay(calls: list[tuple]) -> tuple[dict[str, float], list[tuple]]:

    import mis_lightning.functional.table as T

    spent: dict[str, float] = {}
    outs = []
    for dt, role, th, sg, values, sc, pe, ko, *_ in calls:
        size = max(th.numel(), pe or 0)
        c0 = time.process_time()
        out, mask = T._table_fast_moments(th, sg, values, sc, interpolate=size >= T.INTERP_MIN_ELEMENTS,
                                          min_build=T.OCTAVE_MIN_ELEMENTS, call_elements=size, kappa_only=ko)
        spent[f"{dt} {role}"] = spent.get(f"{dt} {role}", 0.0) + time.process_time() - c0
        fields = (out.kappa,) if ko else (out.kappa, out.mean_abs, out.m4, out.coverage)
        outs.append(tuple(f.clone() for f in fields) + (None if mask is None else mask.clone(),))
    T.release_own_cells()
    spent["all"] = sum(spent.values())
    return spent, outs


def _same(a: list[tuple], b: list[tuple]) -> int:
    import torch

    bad = 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if (u is None) != (v is None):
                bad += 1
                break
            if u is not None and not torch.equal(u.view(torch.int64) if u.is_floating_point() else u,
                                                 v.view(torch.int64) if v.is_floating_point() else v):
                bad += 1
                break
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--flag", action="append", default=[], help="MODULE.FLAG under mis_lightning, turned off")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    calls = _capture(args.path)
    for c in calls:
        assert (c[2]._version, c[3]._version, c[5]._version) == c[8:11], "a captured tensor was written"
    n = {}
    for dt, role, th, *_ in calls:
        k = f"{dt} {role}"
        n[k] = (n.get(k, (0, 0))[0] + 1, n.get(k, (0, 0))[1] + th.numel())
    print("captured:", ", ".join(f"{k} {a} calls {b:,} elements" for k, (a, b) in sorted(n.items())))
    flags = []
    for f in args.flag:
        mod, name = f.rsplit(".", 1)
        flags.append((importlib.import_module(f"mis_lightning.{mod}"), name))
    ref = None
    rows: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    bad = 0
    for r in range(args.rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            for m, name in flags:
                setattr(m, name, on)
            spent, outs = _replay(calls)
            rows[on].append(spent)
            if ref is None:
                ref = outs
            else:
                bad += _same(ref, outs)
    for m, name in flags:
        setattr(m, name, True)
    keys = sorted(rows[True][0])
    print(f"{'CPU s per replay':24s} " + " ".join(f"{k:>12s}" for k in keys))
    for on in (False, True):
        for s in rows[on]:
            print(f"{'on' if on else 'off':24s} " + " ".join(f"{s[k]:12.4f}" for k in keys))
    for on in (False, True):
        print(f"{('on' if on else 'off') + ' mean':24s} " + " ".join(
            f"{sum(s[k] for s in rows[on]) / len(rows[on]):12.4f}" for k in keys))
    print(f"calls whose output differs from the first replay's: {bad}; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
