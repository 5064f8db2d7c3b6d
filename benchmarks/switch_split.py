"""A speed switch's effect on named functions of a steady scoring call (issue 13; docs/benchmarks.md,
"p49d"): where ``first_call.py ab`` times whole calls (noisy on a loaded machine: a 2% change is
below what alternating pairs resolve), this times the functions a switch changes, inside the same
alternating calls.

    python benchmarks/first_call.py train 1e5 /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/switch_split.py /tmp/m1e5.pt \\
        --flag functional.bounds.SPLIT_ON_EDGE --time functional.bounds.bounded_moments --rounds 6

One process (``first_call.load_saved``: one thread, the default "assess" estimation), a warm-up
call of scale.py's eight schemes, then ``--rounds`` pairs of calls with every ``--flag`` (boolean
switches ``MODULE.FLAG`` of ``mis_lightning``) on and off, alternating which goes first. Each
``--time MODULE.FUNCTION`` (a module-level function of ``mis_lightning``, wrapped in the module
and wherever a ``mis_lightning`` module imported it by name; recursive calls count once, the
outermost) is timed in CPU seconds per call. Prints the medians per setting and the load.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _wrap(specs: list[str]) -> dict[str, float]:
    """Wrap each ``MODULE.FUNCTION``; returns the accumulator (CPU seconds by spec)."""
    acc = {s: 0.0 for s in specs}
    depth = {s: 0 for s in specs}
    for spec in specs:
        modname, attr = spec.rsplit(".", 1)
        orig = getattr(importlib.import_module("mis_lightning." + modname), attr)

        def wrapper(*a: Any, _o: Any = orig, _s: str = spec, **k: Any) -> Any:
            depth[_s] += 1
            c0 = time.process_time()
            try:
                return _o(*a, **k)
            finally:
                depth[_s] -= 1
                if depth[_s] == 0:
                    acc[_s] += time.process_time() - c0

        for m in list(sys.modules.values()):
            if getattr(m, "__name__", "").startswith("mis_lightning") and getattr(m, attr, None) is orig:
                setattr(m, attr, wrapper)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--flag", action="append", required=True, help="MODULE.FLAG, a boolean switch (repeatable)")
    ap.add_argument("--time", action="append", default=[], help="MODULE.FUNCTION to time (repeatable)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from benchmarks.first_call import load_saved, switches
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes

    flags = switches(args.flag, "--flag")
    _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(args.path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)  # warm-up: one-time builds
    acc = _wrap(args.time)
    rows: dict[bool, list[list[float]]] = {True: [], False: []}
    for r in range(args.rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            for mod, attr in flags:
                setattr(mod, attr, on)
            for s in acc:
                acc[s] = 0.0
            c0 = time.process_time()
            score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
            rows[on].append([time.process_time() - c0] + [acc[s] for s in args.time])
    for mod, attr in flags:
        setattr(mod, attr, True)
    for on in (True, False):
        cols = list(zip(*rows[on]))
        parts = [f"{s.rsplit('.', 1)[1]} {statistics.median(c) * 1e3:.1f} ms" for s, c in zip(args.time, cols[1:])]
        print(f"{'on ' if on else 'off'}: call {statistics.median(cols[0]):.3f} s; " + "; ".join(parts))
    print(f"switches {' '.join(args.flag)}; {args.rounds} pairs; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
