"""Where the logistic coverage truth of the absmax grids sits in its bracket: the coupled
estimates of one grid at several bin widths of the released absmax (docs/benchmarks.md, cov46).

    python benchmarks/logistic_absmax_bins.py [--stride 4] [--start 0] [--datasets 1000000] [--out FILE]

The truth of ``validate.py --coverage --settings 3`` (``exact_truth_logistic``, ``M = 10^6``,
128 targets) bins the released absmax at ``validate.LOGISTIC_ABSMAX_BIN_SD`` = 0.1 sd; where its
bracket ``[max(split, test), plug]`` is wider than 3% (``rtn_int*``) the lower end is the truth.
This reruns the same base fits, targets (every ``--stride``-th from ``--start``), out arms and
Gaussian test, and per target and grid records the split, test and plug-in estimates and
:func:`~mis_lightning.groundtruth.logistic.tv_debiased` at bins of 0.4, 0.2 and 0.1 sd (step grids:
their codes), and the debiased estimate on the first quarter of the datasets (its dependence on
``M``). Printed: each estimate's sum over targets relative to the sum of the truth's own
estimate (the test at 0.1 sd; step grids: the test), with an 80% bootstrap interval over
targets. Binning is a function of the release, so a binned TV is at most the release's; the
binned TVs grow as the bins shrink. Cost: the base fits (~260 CPU s at ``M = 10^6``) and ~14
CPU s a target (6 grids). Checkpointed per target to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import validate as V  # noqa: E402

from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402
from mis_lightning.groundtruth import logistic as LG  # noqa: E402

GRIDS = ("rtn_int4", "rtn_int2", "rtn_int8", "step0.5sd/quarter", "fixed0.05", "step1sd/centre")
BINS = (0.4, 0.2, 0.1)
ESTIMATES = ("test", "split", "debiased", "plug", "debiased_quarter")


def run(stride: int, start: int, M: int, out: Path, targets: int = 128) -> dict:
    """Per-target estimates (the loop of ``exact_truth_logistic`` with ``seed = 0``)."""
    s = GT.make_setting("logistic", 2, 1000, rho=0.0)
    grids = [g for name in GRIDS for g in V.coverage_grids(s) if g.name == name]
    base = LG.logistic_base(s, M, seed=0)
    zx, zy = GT.draw_records(s, targets, np.random.default_rng([0, 77]))
    orng = np.random.default_rng([0, 78])
    outs = []
    for _ in range(4):  # as exact_truth_logistic with out_draws = 2 (the last two: its null arm)
        xo, yo = GT.draw_records(s, M, orng)
        outs.append(LG.add_record(base, torch.from_numpy(xo), torch.from_numpy(yo)).numpy())
    th_out = np.stack(outs[:2], 1)
    flat = th_out.reshape(-1, s.d)
    mean, cov = flat.mean(0), np.atleast_2d(np.cov(flat, rowvar=False))
    half = np.arange(M) % 2 == 0
    out_means = [th_out[sel].reshape(-1, s.d).mean(0) for sel in (half, ~half)]
    sdmax = float(np.max(s.sd))
    res = json.loads(out.read_text()) if out.exists() else {"grids": list(GRIDS), "bins": list(BINS), "targets": []}
    done = {t["i"] for t in res["targets"]}
    for i in range(start, targets, stride):
        if i in done:
            continue
        t0 = time.process_time()
        th_in = LG.add_record(base, torch.from_numpy(zx[i]), torch.tensor(float(zy[i]))).numpy()
        shifts = [th_in[sel].mean(0) - om for sel, om in zip((half, ~half), out_means)]
        rec: dict = {"i": i}
        for g in grids:
            for b in (BINS if isinstance(g, GT.AbsmaxGrid) else (None,)):
                bw = None if b is None else b * sdmax
                ki = LG.cell_keys(g, th_in, bw)
                ko = np.stack([LG.cell_keys(g, o, bw) for o in outs[:2]], 1)
                r = LG.tv_bracket(ki, ko, LG._gaussian_test(g, th_in, flat, mean, shifts, cov, 7 * i))
                d = LG.tv_debiased(ki, ko)
                rec[f"{g.name}|{b}"] = dict(r, debiased=d["debiased"], floor=d["floor"],
                                            debiased_quarter=LG.tv_debiased(ki[:M // 4], ko[:M // 4])["debiased"])
        res["targets"].append(rec)
        out.write_text(json.dumps(res))
        print(f"target {i}: {time.process_time() - t0:.1f} CPU s", flush=True)
    return res


def table(res: dict) -> None:
    T = res["targets"]
    rng = np.random.default_rng(0)
    boot = rng.integers(0, len(T), (2000, len(T)))
    print(f"{len(T)} targets: each estimate's sum over targets / the truth's estimate's - 1 [80% over targets]")
    print("| grid | bin (sd) | " + " | ".join(ESTIMATES) + " |")
    print("|---|---|" + "---|" * len(ESTIMATES))
    for name in res["grids"]:
        absmax = name.startswith("rtn")
        ref = np.array([t[f"{name}|{0.1 if absmax else None}"]["test"] for t in T])
        for b in (res["bins"] if absmax else [None]):
            cells = []
            for e in ESTIMATES:
                v = np.array([t[f"{name}|{b}"][e] for t in T])
                rb = v[boot].sum(1) / ref[boot].sum(1) - 1
                cells.append(f"{v.sum() / ref.sum() - 1:+.2%} [{np.quantile(rb, 0.1):+.2%}, {np.quantile(rb, 0.9):+.2%}]")
            print(f"| {name} | {'-' if b is None else b} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--datasets", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=Path("logistic_absmax_bins.json"))
    ap.add_argument("--report", action="store_true", help="compute nothing: the table of --out")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = json.loads(a.out.read_text()) if a.report else run(a.stride, a.start, a.datasets, a.out)
    table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
