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
``size``: per ratio and seed, the finite-sample correction's size on the figure, the default figure less the
one with ``leverage_correction=False`` (a second estimation), against the size the interval's remainder
term reads from the default run alone (``functional.correction_allowance`` over the mean leverage), and
the remainder term itself; ``--model ols``: on ``ols``'s design (below) instead.

    OMP_NUM_THREADS=1 python benchmarks/iv58b_coverage_map.py size --records 64 --ratios 0.05,0.1,0.33,0.5,0.9 --seeds 2
    OMP_NUM_THREADS=1 python benchmarks/iv58b_coverage_map.py size --model ols --records 128 --ratios 0.1,0.25,0.5 --seeds 1

``ols``: the same count on fixed-design least squares against its closed-form reference
(``groundtruth.averaged.ols_truth``, population game: exact for the unquantized release; AR(1) 0.5 inputs,
a grid of 0.02 sd, which reads the unquantized value), ``--seeds`` trainings (fresh noise) per ratio,
every record stored.

    OMP_NUM_THREADS=1 python benchmarks/iv58b_coverage_map.py ols --records 128 --ratios 0.1,0.25,0.5,0.75,0.9 --seeds 40

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


def correction_size(records: int, ratios: list[float], seeds: int, model: str = "gmean") -> None:
    from iv58_saturated_interval import gmean_report

    import mis_lightning.functional as F
    seen: list[tuple[float, float]] = []
    allowance = F.correction_allowance

    def spy(first, corrected, h, mean_leverage):
        a = allowance(first, corrected, h, mean_leverage)
        seen.append((a, min(max(mean_leverage, 0.0), 1.0)))
        return a

    F.correction_allowance = spy
    print("| d / N | seed | figure | less the uncorrected figure | the size read from the default run | mean leverage "
          "| remainder term |")
    print("|---|---|---|---|---|---|---|")
    for ratio in ratios:
        dim = max(1, round(ratio * records)) if model == "gmean" else _ols_dim(records, ratio)

        def figure(s: int, dim: int = dim, **options) -> float:
            if model == "gmean":
                return gmean_report(records, dim, s, **options).schemes["rtn_int8"].leakage
            return _ols_result(records, dim, s, **options).leakage

        for s in range(seeds):
            seen.clear()
            with_c = figure(s)
            a, rho = seen[-1]
            without = figure(s, leverage_correction=False)
            print(f"| {dim / records:.3f} | {s} | {with_c:.4f} | {with_c - without:.5f} | {a / rho:.5f} | {rho:.3f} "
                  f"| {a:.5f} |", flush=True)
    F.correction_allowance = allowance


def _ols_dim(records: int, ratio: float) -> int:
    return max(2, min(round(ratio * records), records - 2))


def _ols_result(records: int, dim: int, seed: int, **options):
    """``ols``'s design (AR(1) 0.5 inputs, design seed 0), training ``seed`` assessed on its 0.02-sd grid, every
    record stored, 8 uncertainty draws, warnings muted: the scheme's result; ``options``: more of ``assess``'s."""
    import warnings

    from mis_lightning import assess
    from mis_lightning.groundtruth import averaged as AV
    des = AV.make_ols_design(dim, records, 0.5, seed=0)
    model, loader, _ = AV.ols_training(des, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return assess(model, [AV.ols_scheme(des, 0.02)], loader, AV.squared_loss, seed=seed, num_records=records,
                      uncertainty_draws=8, **options).schemes["step0.02"]


def ols_map(records: int, ratios: list[float], seeds: int) -> None:
    from mis_lightning.groundtruth import averaged as AV
    print("| d / N | d | reference | held | figure / reference | mean half-width | mean abs(figure - reference) |")
    print("|---|---|---|---|---|---|---|")
    for ratio in ratios:
        dim = _ols_dim(records, ratio)
        truth = AV.ols_truth(AV.make_ols_design(dim, records, 0.5, seed=0), 0.02)
        held, ratio_x, half, err = 0, [], [], []
        for s in range(seeds):
            r = _ols_result(records, dim, s)
            ratio_x.append(r.leakage / truth)
            err.append(abs(r.leakage - truth))
            if r.interval is not None:
                held += r.interval[0] <= truth <= r.interval[1]
                half.append((r.interval[1] - r.interval[0]) / 2)
        hw = f"{statistics.mean(half):.5f}" if half else "-"
        print(f"| {dim / records:.3f} | {dim} | {truth:.4f} | {held} of {seeds} | {min(ratio_x):.3f}-{max(ratio_x):.3f}"
              f" | {hw} | {statistics.mean(err):.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["map", "size", "ols"])
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--ratios", default="0.05,0.1,0.2,0.33,0.5,0.7,0.9")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--truth-draws", type=int, default=1 << 22)
    ap.add_argument("--model", choices=["gmean", "ols"], default="gmean", help="size: the Gaussian mean or ols's design")
    a = ap.parse_args()
    ratios = [float(x) for x in a.ratios.split(",")]
    if a.mode == "map":
        coverage_map(a.records, ratios, a.seeds, a.truth_draws)
    elif a.mode == "size":
        correction_size(a.records, ratios, a.seeds, a.model)
    else:
        ols_map(a.records, ratios, a.seeds)


if __name__ == "__main__":
    main()
