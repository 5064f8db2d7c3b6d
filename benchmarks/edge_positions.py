"""Populations whose weights crowd at one place in their cells, against the closed-form truth (cg30).

    python benchmarks/edge_positions.py --shape 8x64 --step 12 --band 0.25 0.5 --trainings 4
    python benchmarks/edge_positions.py --shape 16x64 --step 8 --band 0.3 0.5 --trainings 4
    python benchmarks/edge_positions.py --shape 8x64 --step 8 --band 0 0.2 --trainings 4

``groundtruth.averaged`` population (independent coordinates, Rademacher records: no record
error) with every weight's position ``|u|`` uniform on ``--band`` (0.5: a cell edge, 0: mid-cell)
on a ``--step``-sd grid. Per training: the plug-in, the draws' median, the interval before cg30
(around the draws' median only; recomputed here from the same draws) and the report's interval,
each over the truth (:func:`AV.truth`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AS = importlib.import_module("mis_lightning.assess")
from mis_lightning.functional import interval as FI  # noqa: E402
from mis_lightning.groundtruth import averaged as AV  # noqa: E402


def population(out_f: int, in_f: int, step: float, lo: float, hi: float, seed: int) -> AV.Population:
    rng = np.random.default_rng(seed)
    d = out_f * in_f
    n = 16 * d
    row_sd = np.exp(rng.uniform(math.log(0.5), math.log(2.0), out_f))
    u = rng.uniform(lo, hi, d) * rng.choice([-1.0, 1.0], d)
    sigma = np.repeat(row_sd, in_f) / math.sqrt(n)
    theta = (rng.integers(-3, 4, d) + u) * step * sigma
    return AV.Population(out_f, in_f, n, row_sd, np.full(d, step), u, theta, "rademacher")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8x64")
    ap.add_argument("--step", type=float, default=12.0)
    ap.add_argument("--band", nargs=2, type=float, default=[0.25, 0.5])
    ap.add_argument("--trainings", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    out_f, in_f = (int(v) for v in a.shape.split("x"))
    pop = population(out_f, in_f, a.step, a.band[0], a.band[1], a.seed)
    truth, _ = AV.truth(pop)
    seen: dict = {}
    original = FI.leakage_interval

    def recording(value, record_se, n, **kw):
        seen.update(value=value, draws=kw.get("draws"), record_se=record_se, noise=kw.get("draw_noise", 0.0))
        return original(value, record_se, n, **kw)

    FI.leakage_interval = recording
    try:
        for t in range(a.trainings):
            tr = AV.training(pop, t)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = AS.score_schemes(tr.estimate, tr.model, [AV.StepGridScheme(pop.step)], uncertainty_draws=16,
                                     seed=t, covariance="independent").schemes["step"]
            q_lo, med, q_hi = (float(x) for x in torch.quantile(seen["draws"], torch.tensor([0.1, 0.5, 0.9],
                                                                                           dtype=torch.float64)))
            pad = FI.normal_quantile(0.9) * math.hypot(seen["record_se"], seen["noise"])
            old = (max(min(med - math.sqrt(2) * (med - q_lo), seen["value"]) - pad, 0.0),
                   max(med + math.sqrt(2) * (q_hi - med), seen["value"]) + pad)
            new = r.interval

            def show(iv):
                return f"[{iv[0] / truth:.3f}, {iv[1] / truth:.3f}] {'covers' if iv[0] <= truth <= iv[1] else 'MISS'}"

            print(f"training {t}: plug-in {r.leakage / truth:.3f} draws' median {med / truth:.3f} | "
                  f"before cg30 {show(old)} | now {show(new)} (over the truth {truth:.5f})", flush=True)
    finally:
        FI.leakage_interval = original


if __name__ == "__main__":
    main()
