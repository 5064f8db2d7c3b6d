"""CPU time of a callback example's assessment: runs ``examples/<EXAMPLE>.py``'s ``main()`` (its
training and its ``MISCallback``) with the callback's method ``--method`` (default ``_run``, the
assessment at the end of training) wrapped in ``time.process_time``, and prints the script's CPU,
the wrapped method's, the estimator and each scheme's leakage (cn29; docs/benchmarks.md, "cn29").

    python benchmarks/callback_example_cost.py                           # examples/cnn_callback.py
    python benchmarks/callback_example_cost.py --example callback_example --method on_fit_end
    python benchmarks/callback_example_cost.py --root /path/to/checkout-before   # the same on older code

Runtime: the example's own (cnn_callback: ~10-20 s CPU, 12 epochs and the assessment).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="cnn_callback", help="a module of examples/ with a main() returning the callback")
    ap.add_argument("--method", default="_run", help="the MISCallback method timed (CPU seconds over its calls)")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout whose mis_lightning is measured (default: this file's); the example is this file's")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(args.root.resolve()))
    import mis_lightning
    import mis_lightning.callback as cb

    spent: dict[str, float] = {}
    orig = getattr(cb.MISCallback, args.method)

    @functools.wraps(orig)
    def timed(self, *a, **k):
        c0 = time.process_time()
        try:
            return orig(self, *a, **k)
        finally:
            spent[args.method] = spent.get(args.method, 0.0) + time.process_time() - c0

    setattr(cb.MISCallback, args.method, timed)
    example = importlib.import_module(args.example)
    c0 = time.process_time()
    mis = example.main()
    total = time.process_time() - c0
    print(f"{mis_lightning.__file__}: examples/{args.example}.py script {total:.2f} s CPU, "
          f"{args.method} {spent.get(args.method, 0.0):.2f} s CPU")
    print("estimator", mis.report.estimation.get("estimator"),
          {s: round(v.leakage, 5) for s, v in mis.report.schemes.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
