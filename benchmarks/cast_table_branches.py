"""Where the bf16 / fp16 casts' table elements go in one 1e7 scoring, and the element-wise floor
of their settling pass (issue 13; docs/benchmarks.md, "p50a").

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cast_table_branches.py M --rounds 3

Captures every ``table_cell_moments`` call of one ``score_schemes(["fp16", "bf16"])`` call as
``cast_table_calls.py`` does (role ``main`` / ``pool`` by the order of a grid's moments calls,
``draws`` by a caller's name) and counts, per cast and role, the elements by the branch of
``table._table_sum_moments`` each takes: settled by its own cell (``fine``: the fine-grid
expansion; ``spill``: its reach passes the finite cells, the open-cell closed form; ``frozen``),
then of the rest the sd-0 ``ties``, the kappa-only ``overflow`` closed form and the ``windowed``
path; with the own cell's width ``h`` in sd (``h <= 1e-3``). Then replays the calls' fast path
(``table._table_fast_moments``, no self-check) ``--rounds`` times beside the bare element-wise
arithmetic of their settle on the same elements (own cells by the cast's bits, ``h``, the fine
kappa, the reach's reductions, on blocks of ``EAGER_BLOCK``): CPU seconds (one thread) each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _branches(call: tuple) -> dict[str, int]:
    import torch

    import mis_lightning.functional.table as T
    from mis_lightning.functional.kernel import CUTOFF_SIGMAS, FINE_STEP

    dt, role, theta, sigma, values, scale, pe, ko = call[:8]
    th, sg, sc = T._table_inputs(theta, sigma, scale)
    layout = T.table_layout(values, th.device)
    T.release_own_cells()
    done = T._settled_blocks(th, sg, sc, layout, ko)[-1]
    lo, hi = T._own_facts(th, sc, layout)
    h = (hi - lo) / sg
    frozen = ((th - lo) / sg > CUTOFF_SIGMAS) & ((hi - th) / sg > CUTOFF_SIGMAS)
    reach = CUTOFF_SIGMAS * sg / sc
    x = th / sc
    out = (x - reach < layout.lo_edge) | (x + reach >= layout.hi_edge)
    spill = done & ~frozen & (h <= FINE_STEP) & out
    n = {"elements": th.numel(), "h<=1e-3": int((h <= 1e-3).sum()), "frozen": int((done & frozen).sum()),
         "spill": int(spill.sum())}
    n["fine"] = int(done.sum()) - n["frozen"] - n["spill"]
    rest = torch.nonzero(~done).squeeze(-1)
    ties = over = 0
    if rest.numel():
        if T.SD_FLOOR_TIES and rest.numel() <= T._TIES_MAX and \
                T._sd_floor_ties(th, sg, sc, rest, values, layout, ko) is not None:
            ties = rest.numel()
        elif T.OVERFLOW_CLOSED_FORM and ko:
            got = T._overflow_split(th, sg, sc, rest, values, layout)
            over = 0 if got is None else got[0].numel()
    n.update(ties=ties, overflow=over, windowed=rest.numel() - ties - over)
    return n


def _bare(calls: list[tuple]) -> float:
    """The settle's element-wise arithmetic alone on the calls' elements (CPU s)."""
    import torch

    import mis_lightning.functional.table as T
    from mis_lightning.functional.kernel import CUTOFF_SIGMAS, EAGER_BLOCK
    from mis_lightning.functional.masks import all_set

    c0 = time.process_time()
    for _, _, theta, sigma, values, *_ in calls:
        th, sg = theta.to(torch.float64), sigma.to(torch.float64)
        layout = T.table_layout(values, th.device)
        tabs, dt = layout.pattern_cells(), layout.format_dtype
        kappa = torch.empty_like(th)
        for s in range(0, th.numel(), EAGER_BLOCK):
            t, g = th[s:s + EAGER_BLOCK], sg[s:s + EAGER_BLOCK]
            p = t.to(dt).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
            lo, hi = tabs[0].index_select(0, p), tabs[1].index_select(0, p)
            all_set((lo <= t).logical_and_(t < hi))
            h = torch.sub(hi, lo).div_(g)
            h2 = h**2
            torch.div(h2, 12.0, out=kappa[s:s + EAGER_BLOCK]).neg_().add_(1.0).add_(torch.mul(h2, h2).div_(144.0))
            reach = torch.mul(g, CUTOFF_SIGMAS)
            lo_r, hi_r = torch.sub(t, reach), reach.add_(t)
            _ = (float(h.amax()), float(lo_r.amax()), float(hi_r.amin()), float(lo_r.amin()), float(hi_r.amax()))
    return time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from benchmarks.cast_table_calls import _capture, _replay

    torch.set_num_threads(1)
    calls = _capture(args.path)
    seen: dict[str, int] = {}
    for i, c in enumerate(calls):  # main / pool: a grid's moments calls alternate (the pool's after its main's)
        if c[1] == "moments":
            seen[c[0]] = seen.get(c[0], 0) + 1
            calls[i] = (c[0], "main" if seen[c[0]] % 2 else "pool", *c[2:])
    keys = sorted({f"{c[0]} {c[1]}" for c in calls})
    counts: dict[str, dict[str, int]] = {k: {} for k in keys}
    for c in calls:
        row = counts[f"{c[0]} {c[1]}"]
        row["calls"] = row.get("calls", 0) + 1
        for f, v in _branches(c).items():
            row[f] = row.get(f, 0) + v
    fields = ["calls", "elements", "h<=1e-3", "fine", "spill", "frozen", "ties", "overflow", "windowed"]
    print(f"{'':12s}" + "".join(f"{f:>11s}" for f in fields))
    for k in keys:
        print(f"{k:12s}" + "".join(f"{counts[k].get(f, 0):11,d}" for f in fields))
    print(f"{'CPU s':12s}" + "".join(f"{k:>12s}" for k in keys))
    for _ in range(args.rounds):
        spent, _ = _replay(calls)
        bare = {k: _bare([c for c in calls if f"{c[0]} {c[1]}" == k]) for k in keys}
        print(f"{'fast path':12s}" + "".join(f"{spent[k]:12.4f}" for k in keys))
        print(f"{'bare settle':12s}" + "".join(f"{bare[k]:12.4f}" for k in keys))
    print(f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
