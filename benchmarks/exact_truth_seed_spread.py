"""The exact OLS absmax truth of one target over design seeds, next to the coupled split estimate
(docs/benchmarks.md, section gt46).

    python benchmarks/exact_truth_seed_spread.py --target-seed 21 --targets 10 --index 7
    python benchmarks/exact_truth_seed_spread.py --target-seed 11 --targets 6 --index 4

``linear d=2 n=400, rho=0.5``, ``rtn_int{bits}``: target ``index`` of ``--targets`` drawn with
``--target-seed`` (the targets of ``absmax_coupled_ols_check.py``). ``exact_tv_ols_absmax`` at
``--seeds`` design seeds (K designs, M releases each): the values, their spread, and the rms of
the reported se with and without the designs' part; then the coupled split estimate at 0.4-sd
absmax bins (a lower bound in expectation) on ``--replicates`` independent sets of ``--datasets``
coupled fits. ~5 CPU s a seed at K = 150, M = 16,000; ~25 CPU s a replicate at 10^6 datasets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402
from mis_lightning.groundtruth import logistic as LG  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-seed", type=int, default=21)
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--index", type=int, default=7)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--K", type=int, default=150)
    ap.add_argument("--M", type=int, default=16000)
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--datasets", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = GT.make_setting("linear", 2, 400, rho=0.5)
    g = GT.AbsmaxGrid(f"rtn_int{a.bits}", a.bits)
    zx, zy = GT.draw_records(s, a.targets, np.random.default_rng(a.target_seed))
    x, y = zx[a.index], zy[a.index]
    runs = []
    for k in range(a.seeds):
        tv, se = GT.exact_tv_ols_absmax(s, g, x, y, K=a.K, M=a.M, draws=4, seed=k)
        _, se_rel = GT.exact_tv_ols_absmax(s, g, x, y, K=a.K, M=a.M, draws=4, seed=k, design_error=False)
        runs.append((tv, se, se_rel))
        print(f"seed {k}: exact {tv:.5f} se {se:.5f} (releases alone {se_rel:.5f})", flush=True)
    r = np.asarray(runs)
    sd = r[:, 0].std(ddof=1)
    print(f"exact over {a.seeds} seeds: mean {r[:, 0].mean():.5f} +- {sd / np.sqrt(a.seeds):.5f}, sd {sd:.5f}; "
          f"rms se {np.sqrt((r[:, 1] ** 2).mean()):.5f}, releases alone {np.sqrt((r[:, 2] ** 2).mean()):.5f}")
    bw = 0.4 * float(np.max(s.sd))
    split = []
    for rep in range(a.replicates):
        sim = GT.simulate_ols(s, x, y, a.datasets, np.random.default_rng([99, rep]))
        ko = LG.cell_keys(g, np.stack([sim["out"], sim["null"]], 1), bw)
        split.append(LG.tv_bracket(LG.cell_keys(g, sim["in"], bw), ko)["split"])
        print(f"replicate {rep}: split (0.4 sd) {split[-1]:.5f}", flush=True)
    if len(split) > 1:
        print(f"split over {len(split)} replicates: mean {np.mean(split):.5f} +- {np.std(split, ddof=1) / np.sqrt(len(split)):.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
