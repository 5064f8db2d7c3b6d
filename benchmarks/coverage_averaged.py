"""Coverage of the report's 80% interval in the averaged regime, against a known truth.

The coverage study of ``benchmarks/validate.py --coverage`` has ``d <= 5`` (position-dominated
intervals). Here the interval is set by the bootstrap draws over many weights (method.md
section 3, "The uncertainty interval", averaged regime: "Built draws", and "Subsampled draws"
for chunks of ``>= 2^15`` weights). Model, truth and trainings: :mod:`mis_lightning.groundtruth.averaged`
(multi-output linear regression with independent coordinates; the truth is the first-order
leakage at the population weights, closed form; each training an ``Estimate`` scored by
:func:`mis_lightning.assess.score_schemes` as the front ends do, ``covariance="independent"``,
the truth's own form, ``uncertainty_draws=16``).

A setting is ``OUTxIN:PATH:STEPS[:POSITIONS[:RECORDS]]``:

* ``PATH``: ``stored`` (``[R, d]`` influences; every weight's draws evaluated; the interval
  computes the regime's ``k``), ``factored`` (the large-model path; a chunk of ``>= 2^15``
  weights gets subsampled draws), ``factored-full`` (the same with ``chunk_size = 2^15 - 1``:
  every chunk below the threshold, so the full built draws);
* ``STEPS``: ``mixed`` (per weight log-uniform over 0.25-4 sd of theta-hat) or a step in sd;
* ``POSITIONS``: ``uniform`` (default: population weights spread over their cells, the
  regime's assumption), ``mid`` or ``edge``;
* ``RECORDS``: ``rademacher`` (default: every record's ``w^2 = 1``, no record error, so the
  width is the draws') or ``gaussian``.

Each setting: ``--populations`` populations (their own ``theta*``, positions and steps) times
``--trainings`` trainings each. Per replication the interval covers the truth or misses it below
(the interval's upper end under the truth) or above. Per population it also reports the
closed-form centre bias: ``E[plug-in] - truth`` (``kappa`` smoothed over one sd at ``theta*``)
and the draws' centre's (smoothed over sqrt(2) sd: the draws move around ``theta-hat``), in units of the mean
half-width, which decides that population's coverage when the draws are narrow.

    PYTHONPATH=. python benchmarks/coverage_averaged.py --settings 32x64:stored:mixed \\
        32x64:stored:4 64x128:stored:4 256x256:factored-full:4 --populations 100 --trainings 1 \\
        --json out.json                                  # docs/validation.md, "2026-12-02 (cv25)"
    PYTHONPATH=. python benchmarks/coverage_averaged.py --settings 32x64:stored:4 \\
        --populations 10 --trainings 30                  # coverage per population
    PYTHONPATH=. python benchmarks/coverage_averaged.py --theory   # the centre's error, closed form
    PYTHONPATH=. python benchmarks/coverage_averaged.py --settings 256x256:factored:4 \\
        256x256:factored:4:uniform:gaussian --populations 40 --trainings 1 \\
        --draw-sample-fraction 0.25                      # the draws' sample size A/B (docs/benchmarks.md, pf27)

About 0.1-0.8 s of CPU per replication (``d`` = 2,048-98,304), plus 1-20 s per population for
the closed forms.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning.groundtruth import averaged as AV  # noqa: E402

AS = importlib.import_module("mis_lightning.assess")
PATHS = ("stored", "factored", "factored-full")
FULL_CHUNK = (1 << 15) - 1  # every chunk below assess.DRAW_SAMPLE_MIN_WEIGHTS: full built draws


def parse_setting(spec: str) -> dict:
    """``OUTxIN:PATH:STEPS[:POSITIONS[:RECORDS]]`` -> options (module docstring)."""
    parts = spec.split(":")
    if len(parts) < 3:
        raise ValueError(f"a setting is OUTxIN:PATH:STEPS[:POSITIONS[:RECORDS]], got {spec!r}")
    out_f, in_f = (int(v) for v in parts[0].lower().split("x"))
    if parts[1] not in PATHS:
        raise ValueError(f"PATH must be one of {PATHS}, got {parts[1]!r}")
    steps: str | float = parts[2] if parts[2] == "mixed" else float(parts[2])
    return {"spec": spec, "out": out_f, "in": in_f, "path": parts[1], "steps": steps,
            "positions": parts[3] if len(parts) > 3 else "uniform",
            "records": parts[4] if len(parts) > 4 else "rademacher"}


@contextlib.contextmanager
def recording_draw_noise() -> Iterator[list[float]]:
    """Collect ``assess._draw_sample_noise``'s values (the subsampled draws' centre error added
    to the interval) while scoring: a diagnostic only, the value is returned unchanged."""
    seen: list[float] = []
    orig = AS._draw_sample_noise

    def wrap(*args, **kwargs):
        v = orig(*args, **kwargs)
        seen.append(v)
        return v

    AS._draw_sample_noise = wrap
    try:
        yield seen
    finally:
        AS._draw_sample_noise = orig


def binomial_se(p: float, k: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(k, 1))


def leak_of_kappa_sum(ks: float, n: int) -> float:
    return float(AV.saturate(math.sqrt(2.0 / math.pi) * math.sqrt(ks) / (2.0 * math.sqrt(n))))


def run_population(st: dict, pop_seed: int, trainings: int, *, num_records: int, draws: int,
                   sigma_bias: float, seed0: int, closed_form_max_d: int = 16384) -> dict:
    pop = AV.make_population(st["out"], st["in"], steps=st["steps"], positions=st["positions"],
                             records=st["records"], seed=pop_seed)
    t0 = time.process_time()
    truth, truth_se = AV.truth(pop)
    # closed-form centre biases (Rademacher records: w^2 = 1, so the leakage is a function of sum kappa)
    exact = pop.records == "rademacher" and pop.d <= closed_form_max_d
    if exact:
        k1 = AV.smoothed_kappa(pop.position, pop.step_sd, 1.0).sum()
        k2 = AV.smoothed_kappa(pop.position, pop.step_sd, 2.0).sum()
    t_truth = time.process_time() - t0
    path = "factored" if st["path"].startswith("factored") else "stored"
    chunk = {"chunk_size": FULL_CHUNK} if st["path"] == "factored-full" else {}
    scheme = AV.StepGridScheme(pop.step)
    rows = []
    t0 = time.process_time()
    with recording_draw_noise() as noise:
        for t in range(trainings):
            seed = seed0 + 1000 * pop_seed + t
            tr = AV.training(pop, seed, num_records=num_records, path=path, sigma_bias=sigma_bias)
            n_before = len(noise)
            rep = AS.score_schemes(tr.estimate, tr.model, [scheme], uncertainty_draws=draws, seed=seed,
                                   covariance="independent", **chunk)
            r = rep.schemes[scheme.name]
            lo, hi = r.interval
            rows.append({"training": seed, "plug_in": r.leakage, "lo": lo, "hi": hi, "regime": r.interval_regime,
                         "method": r.method, "draw_noise": noise[-1] if len(noise) > n_before else 0.0})
    t_score = time.process_time() - t0
    plug = np.array([x["plug_in"] for x in rows])
    lo = np.array([x["lo"] for x in rows])
    hi = np.array([x["hi"] for x in rows])
    half = float(np.mean((hi - lo) / 2))
    return {
        "population": pop_seed, "d": pop.d, "n": pop.n, "truth": truth, "truth_se": truth_se,
        "baseline": leak_of_kappa_sum(pop.d, pop.n),
        "covered": int(np.sum((lo <= truth) & (truth <= hi))), "below": int(np.sum(hi < truth)),
        "above": int(np.sum(lo > truth)), "trainings": trainings,
        "plug_in_mean": float(plug.mean()), "plug_in_sd": float(plug.std(ddof=1)) if plug.size > 1 else 0.0,
        "half_width_mean": half, "centre_mean": float(np.mean((hi + lo) / 2)),
        "draw_noise_mean": float(np.mean([x["draw_noise"] for x in rows])),
        # closed forms (Rademacher records, d <= closed_form_max_d: the leakage is then G(c sqrt(sum kappa)))
        "plug_in_bias_closed_form": leak_of_kappa_sum(k1, pop.n) - truth if exact else None,
        "draws_centre_bias_closed_form": leak_of_kappa_sum(k2, pop.n) - truth if exact else None,
        "regimes": sorted({x["regime"] for x in rows}), "methods": sorted({x["method"] for x in rows}),
        "cpu_s_truth": t_truth, "cpu_s_per_training": t_score / max(trainings, 1), "rows": rows,
    }


def run_setting(st: dict, populations: int, trainings: int, **kw) -> dict:
    pops = [run_population(st, p, trainings, **kw) for p in range(populations)]
    k = sum(p["trainings"] for p in pops)
    cov = sum(p["covered"] for p in pops) / k
    per = np.array([p["covered"] / p["trainings"] for p in pops])
    # between-population se of the pooled coverage (trainings of one population share its theta*)
    cl_se = float(per.std(ddof=1) / math.sqrt(per.size)) if per.size > 1 else math.nan
    return {**st, "populations": pops, "replications": k, "coverage": cov, "binomial_se": binomial_se(cov, k),
            "population_se": cl_se, "below": sum(p["below"] for p in pops) / k,
            "above": sum(p["above"] for p in pops) / k,
            "coverage_per_population": per.tolist()}


def summary_line(res: dict) -> str:
    pops = res["populations"]
    bias = [p["draws_centre_bias_closed_form"] / p["half_width_mean"] for p in pops
            if p["draws_centre_bias_closed_form"] is not None and p["half_width_mean"] > 0]
    bias_s = (f" | centre bias / half-width: rms {math.sqrt(np.mean(np.square(bias))):.2f}, "
              f"{min(bias):+.2f}..{max(bias):+.2f}" if bias else "")
    per = ""
    if pops[0]["trainings"] > 1:
        cov = res["coverage_per_population"]
        per = (f" | per population {' '.join(f'{c:.2f}' for c in cov)} (below 0.8: {np.mean(np.array(cov) < 0.8):.2f}; "
               f"plug-in sd / half-width {np.mean([p['plug_in_sd'] / p['half_width_mean'] for p in pops]):.2f})")
    noise = np.mean([p["draw_noise_mean"] / p["half_width_mean"] for p in pops if p["half_width_mean"] > 0])
    return (f"{res['spec']:<34} d={pops[0]['d']:>6} coverage {res['coverage']:.3f} +- {res['binomial_se']:.3f} "
            f"(between populations {res['population_se']:.3f}) below {res['below']:.3f} above {res['above']:.3f}"
            f"{bias_s}{per} | sample noise / half-width {noise:.2f} | {','.join(pops[0]['regimes'])} "
            f"{','.join(pops[0]['methods'])} | {np.mean([p['cpu_s_per_training'] for p in pops]):.2f} s/training")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["32x64:stored:mixed", "32x64:stored:4",
                                                      "256x256:factored:4", "256x256:factored-full:4"])
    ap.add_argument("--populations", type=int, default=4)
    ap.add_argument("--trainings", type=int, default=25)
    ap.add_argument("--records", type=int, default=64, help="stored records R")
    ap.add_argument("--draws", type=int, default=16, help="uncertainty_draws")
    ap.add_argument("--sigma-bias", type=float, default=0.0, help="common relative error of sigma-hat")
    ap.add_argument("--seed", type=int, default=0, help="first training seed")
    ap.add_argument("--json", type=Path, default=None, help="write every replication here")
    ap.add_argument("--no-rows", action="store_true", help="leave the per-training rows out of the JSON")
    ap.add_argument("--closed-form-max-d", type=int, default=16384,
                    help="the closed-form centre biases only up to this d (they cost ~64 kappa passes)")
    ap.add_argument("--theory", action="store_true",
                    help="print the closed-form split of the centre's error per step (no scoring)")
    ap.add_argument("--draw-sample-fraction", type=float, default=None,
                    help="assess.DRAW_SAMPLE_FRACTION for this run (A/B of the subsampled draws' sample size)")
    a = ap.parse_args(argv)
    if a.draw_sample_fraction is not None:
        AS.DRAW_SAMPLE_FRACTION = a.draw_sample_fraction
    out = {"command": "python benchmarks/coverage_averaged.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "settings": []}
    if a.theory:
        out["theory"] = {}
        for r in (2.0, 3.0, 4.0, 6.0, 8.0):
            t = AV.centre_error_decomposition(r)
            out["theory"][r] = t
            print(f"step {r:g} sd: draws sd {t['draws_sd']:.4f} (kappa per weight); centre error: fixed "
                  f"{t['fixed_rms'] / t['draws_sd']:.3f}, random {t['random_sd'] / t['draws_sd']:.3f}, total "
                  f"{t['total_rms'] / t['draws_sd']:.3f} x the draws' sd", flush=True)
        if a.json is not None:
            a.json.write_text(json.dumps(out, indent=1))
        return out
    for spec in a.settings:
        res = run_setting(parse_setting(spec), a.populations, a.trainings, num_records=a.records, draws=a.draws,
                          sigma_bias=a.sigma_bias, seed0=a.seed, closed_form_max_d=a.closed_form_max_d)
        print(summary_line(res), flush=True)
        if a.no_rows:
            for p in res["populations"]:
                p.pop("rows")
        out["settings"].append(res)
        if a.json is not None:  # after every setting
            a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
