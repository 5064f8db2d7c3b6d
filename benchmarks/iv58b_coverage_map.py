"""How often the 80% interval holds the exact advantage, against d / N (docs/benchmarks.md, "iv58b").

    OMP_NUM_THREADS=1 python benchmarks/iv58b_coverage_map.py map --records 64 --ratios 0.05,0.1,0.2,0.33,0.5,0.7,0.9 --seeds 20
    OMP_NUM_THREADS=1 python benchmarks/iv58b_coverage_map.py map --records 128 --seeds 40 --truth-draws 16777216

The Gaussian mean (``benchmarks/iv58_saturated_interval.py gmean``): ``z ~ N(mu, I_d)``, ``theta_hat =
mean(z)`` (an ``nn.Linear(1, d)`` fed ones, loss ``|z - theta|^2 / 2``), its exact advantage
``groundtruth.ground_truth.gaussian_mean_advantage`` (2^22 seeded draws, sd ~2.4e-4). For each ``d = round(ratio
N)``, ``--seeds`` draws of the records (a new ``mu`` and ``z`` each) assessed with rtn_int8 (lossless on a
``[d, 1]`` weight: its truth is the unquantized one), default estimation: per ratio the share of intervals
holding the exact advantage, the figure / exact range, the mean half-width against the mean |figure - exact|,
whether the row is marked ``*`` (``Report.rows()``'s ``indicative``) and whether a warning names the interval.
``--truth-draws``: the reference's Monte Carlo draws (sd about ``0.5 / sqrt(draws)``). Run in two checkouts
for two libraries' columns (the same seeds, the same truth); the held count's binomial sd is
``sqrt(seeds p (1 - p))``, 2.5 of 40 at ``p = 0.8``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

sys.path.insert(0, "benchmarks")


def coverage_map(records: int, ratios: list[float], seeds: int, truth_draws: int = 1 << 22) -> None:
    from iv58_saturated_interval import gmean_report

    from mis_lightning.groundtruth.ground_truth import gaussian_mean_advantage
    print("| d / N | d | exact | held | figure / exact | mean half-width | mean abs(figure - exact) | `*` | "
          "warning names the interval |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ratio in ratios:
        dim = max(1, round(ratio * records))
        truth = gaussian_mean_advantage(records, dim, draws=truth_draws)
        held, ratio_x, half, err, marked, said = 0, [], [], [], 0, 0
        for s in range(seeds):
            rep = gmean_report(records, dim, s)
            r = rep.schemes["rtn_int8"]
            ratio_x.append(r.leakage / truth)
            err.append(abs(r.leakage - truth))
            if r.interval is not None:
                held += r.interval[0] <= truth <= r.interval[1]
                half.append((r.interval[1] - r.interval[0]) / 2)
            marked += bool(rep.rows()[0].get("indicative"))
            said += any("interval" in w and ("cover" in w or "narrow" in w) for w in rep.warnings)
        hw = f"{statistics.mean(half):.5f}" if half else "-"
        print(f"| {dim / records:.3f} | {dim} | {truth:.4f} | {held} of {seeds} | {min(ratio_x):.3f}-{max(ratio_x):.3f}"
              f" | {hw} | {statistics.mean(err):.4f} | {marked} of {seeds} | {said} of {seeds} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["map"])
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--ratios", default="0.05,0.1,0.2,0.33,0.5,0.7,0.9")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--truth-draws", type=int, default=1 << 22)
    a = ap.parse_args()
    coverage_map(a.records, [float(x) for x in a.ratios.split(",")], a.seeds, a.truth_draws)


if __name__ == "__main__":
    main()
