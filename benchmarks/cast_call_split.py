"""Where the bf16 / fp16 casts' value-table calls of one 1e7 scoring go, call by call (issue 13;
docs/benchmarks.md, "p51d").

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cast_call_split.py M --rounds 5

Captures every ``table_cell_moments`` call of one ``score_schemes(["fp16", "bf16"])``
(``cast_table_calls._capture``) and times, per cast and role (CPU seconds summed over the calls,
the median of ``--rounds`` replays, one thread):

* the small calls (fewer than 2^18 elements: the live weights of the 1e7 MLP's second layer, whose
  chunks are ~94% sd-0 point masses, and the draws' positions) as the pass makes them (``fast``:
  ``table._table_fast_moments``, no self-check); their elements of sd > 0 alone (``live``) and
  those of sd 0 alone (``sd-0``: the ties and the weights within the point-mass margin of an edge
  that ``ParamGrid._point_split`` hands over); the settle alone on the live ones (``settle``,
  ``table._settled_blocks``): what the sd-0 elements' masks and ties cost a call, and what the call
  costs beyond the element-wise settle;
* the large calls (2^18 elements: the first layer's chunks, every element settled): the call, the
  own cells by the bits (``own``), the settle given them (``settle``), of which the element-wise
  arithmetic of ``h`` and kappa (``arith``) and the reach with its four reductions (``reach``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _median(fn, rounds: int) -> float:
    fn()
    ts = []
    for _ in range(rounds):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts)


def _small_row(whole: list[tuple], rounds: int, tiny: float) -> tuple[float, ...]:
    """``fast``, ``live``, ``sd-0``, ``settle`` (CPU s) of the small calls ``whole``."""
    parts = {}
    for name, keep in (("live", lambda s: s > tiny), ("sd-0", lambda s: s <= tiny)):
        sub = []
        for th, sg, v, sc, ko in whole:
            m = keep(sg)
            if bool(m.any()):
                sub.append((th[m].clone(), sg[m].clone(), v, sc[m].clone(), ko))
        parts[name] = sub
    return (_median(partial(_fast, whole), rounds), _median(partial(_fast, parts["live"]), rounds),
            _median(partial(_fast, parts["sd-0"]), rounds), _median(partial(_settle, parts["live"]), rounds))


def _fast(sel: list[tuple]) -> None:
    import mis_lightning.functional.table as T

    for th, sg, v, sc, ko in sel:
        T._table_fast_moments(th, sg, v, sc, interpolate=False, kappa_only=ko)
    T.release_own_cells()


def _settle(sel: list[tuple]) -> None:
    import torch

    import mis_lightning.functional.table as T

    for th, sg, v, sc, ko in sel:
        t, g, s = T._table_inputs(th, sg, sc)
        T._settled_blocks(t, g, s, T.table_layout(v, torch.device("cpu")), ko, ko)
    T.release_own_cells()


def _own(whole: list[tuple], layout) -> None:
    import mis_lightning.functional.kernel as K
    import mis_lightning.functional.table as T

    B = K.EAGER_BLOCK
    for th, _, _, sc, _ in whole:
        for s in range(0, th.numel(), B):
            T._own_facts(th[s:s + B], sc[s:s + B], layout, True)


def _settle_given(whole: list[tuple], facts: list, layout) -> None:
    import torch

    import mis_lightning.functional.kernel as K
    import mis_lightning.functional.table as T

    B = K.EAGER_BLOCK
    for (th, sg, _, sc, _), f in zip(whole, facts):
        out = torch.empty_like(th)
        for i, s in enumerate(range(0, th.numel(), B)):  # (the per-block reach test: reach_ok False)
            T._settled_unit(th[s:s + B], sg[s:s + B], sc[s:s + B], *f[i], layout, True, out=out[s:s + B])


def _arith(whole: list[tuple], facts: list) -> None:
    import torch

    import mis_lightning.functional.kernel as K

    B = K.EAGER_BLOCK
    for (_, sg, _, _, _), f in zip(whole, facts):
        for i, s in enumerate(range(0, sg.numel(), B)):
            lo, hi = f[i]
            h2 = torch.sub(hi, lo).div_(sg[s:s + B]) ** 2
            torch.div(h2, 12.0).neg_().add_(1.0).add_(torch.mul(h2, h2).div_(144.0))


def _reach(whole: list[tuple]) -> None:
    import torch

    import mis_lightning.functional.kernel as K

    B = K.EAGER_BLOCK
    for th, sg, _, _, _ in whole:
        for s in range(0, th.numel(), B):
            r = torch.mul(sg[s:s + B], K.CUTOFF_SIGMAS)
            lo_r, hi_r = torch.sub(th[s:s + B], r), r.add_(th[s:s + B])
            float(lo_r.amax()), float(hi_r.amin()), float(lo_r.amin()), float(hi_r.amax())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import torch

    import mis_lightning.functional.kernel as K
    import mis_lightning.functional.table as T
    from benchmarks.cast_table_calls import _capture
    from mis_lightning._heap import raise_mmap_threshold

    torch.set_num_threads(1)
    raise_mmap_threshold()
    calls = _capture(args.path)
    tiny = torch.finfo(torch.float64).tiny
    big_n = 1 << 18
    print(f"{'small calls':22s} {'calls':>6s} {'elements':>10s} {'sd 0':>7s} {'fast':>8s} {'live':>8s} "
          f"{'sd-0':>8s} {'settle':>8s}")
    for dt in ("fp16", "bf16"):
        for role in ("moments", "draws"):
            whole = [(c[2], c[3], c[4], c[5], c[7]) for c in calls
                     if c[0] == dt and c[1] == role and c[2].numel() < big_n]
            if not whole:
                continue
            n = sum(c[0].numel() for c in whole)
            z = sum(int((c[1] <= tiny).sum()) for c in whole)
            row = _small_row(whole, args.rounds, tiny)
            print(f"{dt + ' ' + role:22s} {len(whole):6d} {n:10,d} {z:7,d} " + " ".join(f"{x:8.4f}" for x in row))
    print(f"\n{'large calls':22s} {'calls':>6s} {'fast':>8s} {'own':>8s} {'settle':>8s} {'arith':>8s} {'reach':>8s}")
    for dt in ("fp16", "bf16"):
        mine = [c for c in calls if c[0] == dt and c[2].numel() >= big_n]
        if not mine:
            continue
        whole = [(c[2], c[3], c[4], c[5], c[7]) for c in mine]
        layout = T.table_layout(mine[0][4], torch.device("cpu"))
        B = K.EAGER_BLOCK
        facts = [[T._own_facts(th[s:s + B], sc[s:s + B], layout, True) for s in range(0, th.numel(), B)]
                 for th, _, _, sc, _ in whole]
        row = (_median(partial(_fast, whole), args.rounds), _median(partial(_own, whole, layout), args.rounds),
               _median(partial(_settle_given, whole, facts, layout), args.rounds),
               _median(partial(_arith, whole, facts), args.rounds), _median(partial(_reach, whole), args.rounds))
        print(f"{dt:22s} {len(mine):6d} " + " ".join(f"{x:8.4f}" for x in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
