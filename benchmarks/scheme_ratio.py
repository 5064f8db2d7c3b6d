"""One scheme's scoring cost against another's on a saved model (issue 13: "fp8_weight_only costs
at most 2x an integer scheme"; docs/benchmarks.md, "pf32").

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt
    python benchmarks/scheme_ratio.py /tmp/m1e7.pt --rounds 2 --schemes int8_weight_only float8_weight_only rtn_int8

Loads the model and data ``first_call.py train`` saved, runs the default "assess" estimation
once, then ``score_schemes(est, model, [scheme])`` for each scheme in turn, ``--rounds`` times
(the order reversed every other round), after one untimed call of the first scheme (torchao's
import, the kernels' first-use self-checks, the float8 interpolation octaves are then not
charged to whichever scheme comes first). CPU time (``time.process_time``, one thread); prints
each call, the median per scheme and each scheme's median over the first's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first (PYTHONPATH=$PWD does the same)
sys.path.append(str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--schemes", nargs="+", default=["int8_weight_only", "float8_weight_only", "rtn_int8"])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    from benchmarks.first_call import load_saved
    from mis_lightning.assess import run_estimation, score_schemes

    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(args.path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    c0 = time.process_time()
    score_schemes(est, model, args.schemes[:1], scoring_config=sc_cfg)
    print(f"size {saved['size']}; untimed first call ({args.schemes[0]}) {time.process_time() - c0:.2f} s", flush=True)
    times: dict[str, list[float]] = {s: [] for s in args.schemes}
    for r in range(args.rounds):
        for s in (args.schemes if r % 2 == 0 else args.schemes[::-1]):
            c0 = time.process_time()
            score_schemes(est, model, [s], scoring_config=sc_cfg)
            times[s].append(time.process_time() - c0)
            print(f"round {r} {s}: {times[s][-1]:.2f} s CPU (load {os.getloadavg()[0]:.1f})", flush=True)
    med = {s: sorted(v)[len(v) // 2] for s, v in times.items()}
    first = args.schemes[0]
    print("median CPU s: " + ", ".join(f"{s} {v:.2f}" for s, v in med.items()))
    print("over " + first + ": " + ", ".join(f"{s} {med[s] / med[first]:.2f}" for s in args.schemes[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
