"""Where the scoring pass's minor page faults and system CPU time go: ``getrusage`` deltas
(``ru_minflt``, ``ru_stime``) and CPU time of a saved model's first ``score_schemes`` call,
attributed exclusively (a function's own, less the wrapped functions it calls) to the scheme
preparation, its parts, the cell moments and the power sums (pad34; docs/benchmarks.md, "pad34").

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt
    PYTHONPATH=$PWD python benchmarks/scoring_faults.py /tmp/m1e7.pt [--schemes ...]

One thread, after the default "assess" estimation (``first_call.load_saved``); a page fault
is a fresh page of memory mapped and zeroed by the kernel (glibc hands chunks above its mmap
threshold, or a trimmed heap top, back to the OS), so faults track fresh temporaries.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _usage() -> tuple[int, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime, time.process_time()


def _wrapper(stats: dict[str, list[float]], stack: list[list[float]], label: str, f: Callable) -> Callable:
    @functools.wraps(f)
    def g(*a: Any, **k: Any) -> Any:
        s = _usage()
        stack.append([0, 0.0, 0.0])
        try:
            return f(*a, **k)
        finally:
            e = _usage()
            child = stack.pop()
            tot = [e[i] - s[i] for i in range(3)]
            st = stats[label]
            st[0] += 1
            for i in range(3):
                st[1 + i] += tot[i] - child[i]
                if stack:
                    stack[-1][i] += tot[i]
    return g


def print_exclusive(stats: dict[str, list[float]], by: int) -> None:
    """The wrapped callees' table (calls, faults, system s, CPU s), largest column ``by`` first."""
    print(f"{'exclusive of the wrapped callees':44s} {'calls':>6s} {'faults':>9s} {'system s':>9s} {'CPU s':>7s}")
    for k, v in sorted(stats.items(), key=lambda kv: -kv[1][by]):
        print(f"{k:44s} {int(v[0]):6d} {int(v[1]):9d} {v[2]:9.2f} {v[3]:7.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--schemes", nargs="+", default=None, help="default: scale.py's COMMON_SCHEMES")
    args = ap.parse_args(argv)
    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.quantization import base as qb

    A = importlib.import_module("mis_lightning.assess")
    lf = importlib.import_module("mis_lightning.estimation.linear_factors")
    stats: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])
    stack: list[list[float]] = []
    targets = [(A, n, n) for n in ("_prepare_scheme", "_draw_parts", "_sampled_draw_parts", "_joint_draw_sums",
                                   "_distinct_list_sums", "_exact_fourth_sums", "_finish_scheme")]
    targets += [(qb.ParamGrid, n, "ParamGrid." + n) for n in ("moments", "_own_moments", "_path_moments",
                                                              "_point_masses", "reveal")]
    targets += [(qb.QuantizationScheme, "apply", "QuantizationScheme.apply (the backend)"),
                (qb, "private_copy", "private_copy (the model copy)"), (lf, "factored_power_sums", "factored_power_sums")]
    for owner, name, label in targets:
        setattr(owner, name, _wrapper(stats, stack, label, getattr(owner, name)))
    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(args.path)
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    s = _usage()
    A.score_schemes(est, model, args.schemes or COMMON_SCHEMES, scoring_config=sc_cfg)
    e = _usage()
    print(f"size {saved['size']}: scoring {e[2] - s[2]:.2f} s CPU, {e[0] - s[0]} minor page faults, "
          f"{e[1] - s[1]:.2f} s system; load {os.getloadavg()[0]:.1f}")
    print_exclusive(stats, by=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
