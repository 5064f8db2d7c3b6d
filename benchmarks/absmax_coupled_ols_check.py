"""The coupled-arm estimates of an absmax release against the exact OLS truth (docs/benchmarks.md, cov46).

    python benchmarks/absmax_coupled_ols_check.py [--targets 6] [--target-seed 11] [--datasets 1000000] [--bits 4]

``linear d=2 n=400, rho=0.5``: per target ``z`` (drawn with ``--target-seed``) the exact TV of the
``rtn_int{bits}`` release (``ground_truth.exact_tv_ols_absmax``, K = 150 designs, 16,000 releases;
its se counts both since gt46: over seeds a TV of 0.053 spreads by 1.4%)
and, on ``--datasets`` coupled OLS fits (``simulate_ols``: in arm, two out draws), the Gaussian test,
split and plug-in estimates of ``groundtruth.logistic.tv_bracket`` and ``tv_debiased`` with the
released absmax in bins of 0.4, 0.2 and 0.1 sd (the logistic truth's machinery on a model with an
exact truth). Printed per target, then each estimate's sum over targets relative to the exact sum.
cov46 ran ``--targets 6 --target-seed 11`` and ``--targets 10 --target-seed 21``. ~20 CPU s a target.
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

BINS = (0.4, 0.2, 0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=int, default=6)
    ap.add_argument("--target-seed", type=int, default=11)
    ap.add_argument("--datasets", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, default=4)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = GT.make_setting("linear", 2, 400, rho=0.5)
    g = GT.AbsmaxGrid(f"rtn_int{a.bits}", a.bits)
    M = a.datasets
    zx, zy = GT.draw_records(s, a.targets, np.random.default_rng(a.target_seed))
    rng = np.random.default_rng(12)
    sums: dict[str, float] = {}
    for i in range(a.targets):
        exact, se = GT.exact_tv_ols_absmax(s, g, zx[i], zy[i], K=150, M=16000, draws=4, seed=i)
        sim = GT.simulate_ols(s, zx[i], zy[i], M, rng)
        th_in, th_out = sim["in"], np.stack([sim["out"], sim["null"]], 1)  # two out draws per dataset
        flat = th_out.reshape(-1, 2)
        mean, cov = flat.mean(0), np.cov(flat, rowvar=False)
        half = np.arange(M) % 2 == 0
        shifts = [th_in[h].mean(0) - th_out[h].reshape(-1, 2).mean(0) for h in (half, ~half)]
        line = f"target {i}: exact {exact:.5f} (se {se:.5f})"
        sums["exact"] = sums.get("exact", 0.0) + exact
        for b in BINS:
            bw = b * float(np.max(s.sd))
            ki, ko = LG.cell_keys(g, th_in, bw), LG.cell_keys(g, th_out, bw)
            r = LG.tv_bracket(ki, ko, LG._gaussian_test(g, th_in, flat, mean, shifts, cov, 3 * i))
            r["debiased"] = LG.tv_debiased(ki, ko)["debiased"]
            line += f" | {b} sd: " + " ".join(f"{e} {r[e]:.5f}" for e in ("test", "split", "plug", "debiased"))
            for e in ("test", "split", "plug", "debiased"):
                sums[f"{e} {b}"] = sums.get(f"{e} {b}", 0.0) + r[e]
        print(line, flush=True)
    print("sum over targets / exact sum - 1: " + ", ".join(f"{k} {v / sums['exact'] - 1:+.2%}"
                                                         for k, v in sums.items() if k != "exact"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
