"""Coverage of the report's 80% interval in the averaged regime, against a known truth.

The coverage study of ``benchmarks/validate.py --coverage`` has ``d <= 5`` (position-dominated
intervals). Here the interval is set by the bootstrap draws over many weights (method.md
section 3, "The uncertainty interval", averaged regime: "Built draws", and "Subsampled draws"
for chunks of ``>= 2^15`` weights). Model, truth and trainings: :mod:`mis_lightning.groundtruth.averaged`
(multi-output linear regression with independent coordinates; the truth is the first-order
leakage at the population weights, closed form; each training an ``Estimate`` scored by
:func:`mis_lightning.assess.score_schemes` as the front ends do, ``uncertainty_draws=16``, with
``--covariance``: the library's default, ``"auto"``, unless given; ``independent`` is the
truth's own form and what the figures of docs/validation.md before cv29 used).

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
        --json out.json                                  # docs/validation.md, "2026-12-02: the averaged regime against a known truth"
    PYTHONPATH=. python benchmarks/coverage_averaged.py --settings 32x64:stored:4 \\
        --populations 10 --trainings 30                  # coverage per population
    PYTHONPATH=. python benchmarks/coverage_averaged.py --theory   # the centre's error, closed form
    PYTHONPATH=. python benchmarks/coverage_averaged.py --settings 256x256:factored:4 \\
        256x256:factored:4:uniform:gaussian --populations 40 --trainings 1 \\
        --draw-sample-fraction 0.25                      # the draws' sample size A/B (docs/benchmarks.md, pf27)

Correlated design (``--ols RHO ...``, cv29): fixed-design least squares with AR(1) or
equicorrelated inputs (:class:`mis_lightning.groundtruth.averaged.OLSDesign`), each training
fitted exactly and assessed by :func:`mis_lightning.assess` as a user calls it (the exact
estimator at ``d <= 2000``, ``covariance`` as given: default the library's, ``"auto"``, the
correlated headline), on per-weight grids of ``--ols-steps`` sd of theta-hat; the reference is
:func:`~mis_lightning.groundtruth.averaged.ols_truth` (exact ``sigma``, correlation and
leverages at ``theta*``). Per (rho, step): coverage of the 80% interval, misses below / above,
its se between designs, the headline's error in units of the standard error the interval implies
(``(hi - lo) / (2 z80)``: mean and sd; a mean of 0 and an sd of 1 give 80%), headline / reference
(mean, min). ``--populations`` designs x ``--trainings`` trainings each:

    PYTHONPATH=. python benchmarks/coverage_averaged.py --ols 0 0.5 0.9 --populations 4 \
        --trainings 10 --json ols.json                   # docs/validation.md, "The averaged interval beside a CORRELATED headline, against a closed-form reference"
    PYTHONPATH=. python benchmarks/coverage_averaged.py --ols 0.5 --ols-spread 6 --ols-steps 0.75 1.4 \
        --populations 28 --trainings 10                  # docs/validation.md, "The averaged interval's coverage on fine grids at ρ = 0.5"

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
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mis_lightning as ml  # noqa: E402
from mis_lightning.config import COVARIANCE_FORMS, ScoringConfig  # noqa: E402
from mis_lightning.groundtruth import averaged as AV  # noqa: E402

AS = importlib.import_module("mis_lightning.assess")
PATHS = ("stored", "factored", "factored-full")
DEFAULT_SETTINGS = ["32x64:stored:mixed", "32x64:stored:4", "256x256:factored:4", "256x256:factored-full:4"]
Z80 = 1.2815515655446004  # Phi^-1(0.9): an 80% interval's half-width in standard errors
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
                   sigma_bias: float, seed0: int, closed_form_max_d: int = 16384,
                   covariance: str = "independent") -> dict:
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
                                   covariance=covariance, **chunk)
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


def run_ols(rho: float, design: str, d: int, n: int, steps: list[float], populations: int, trainings: int, *,
            covariance: str, draws: int, seed0: int, spread_sd: float = 84.0, estimation: str = "auto",
            num_records: int | None = None, split_records: int | None = None) -> dict:
    """Coverage of the 80% interval of :func:`mis_lightning.assess` on :class:`AV.OLSDesign`
    (module docstring) against :func:`AV.ols_truth`, per grid step. ``split_records``: each
    training is assessed a second time with that many stored records (all ``n``: the headline
    without the stored records' selection error), splitting the headline's error into the
    selection's part and the rest (sigma, correlation, leverages, the noise's realisation)."""
    pops = []
    extra = {} if num_records is None else {"num_records": num_records}
    for p in range(populations):
        des = AV.make_ols_design(d, n, rho, design=design, seed=p, spread_sd=spread_sd)
        t0 = time.process_time()
        truth = {"none": AV.ols_truth(des, None)}
        fixed = {"none": AV.ols_truth(des, None, game="fixed")}
        schemes = []
        for r in steps:
            sch = AV.ols_scheme(des, r)
            truth[sch.name] = AV.ols_truth(des, r)
            fixed[sch.name] = AV.ols_truth(des, r, game="fixed")
            schemes.append(sch)
        t_truth = time.process_time() - t0
        rows = []
        t0 = time.process_time()
        for t in range(trainings):
            seed = seed0 + 1000 * p + t
            model, loader, _ = AV.ols_training(des, seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the report's warnings (d / n, ...) are not under test
                rep = ml.assess(model, ["none", *schemes], loader, AV.squared_loss, covariance=covariance,
                                uncertainty_draws=draws, seed=seed, estimation=estimation, **extra)
            rep_all = None
            if split_records is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rep_all = ml.assess(model, ["none", *schemes], loader, AV.squared_loss, covariance=covariance,
                                        uncertainty_draws=draws, seed=seed, estimation=estimation,
                                        num_records=split_records)
            for name, r in rep.schemes.items():
                lo, hi = r.interval if r.interval is not None else (math.nan, math.nan)
                rows.append({"training": seed, "scheme": name, "leakage": r.leakage, "lo": lo, "hi": hi,
                             "truth": truth[name], "truth_fixed": fixed[name], "independent": r.leakage_independent,
                             "regime": r.interval_regime, "covariance": r.covariance, "method": r.method,
                             "leakage_split": None if rep_all is None else rep_all.schemes[name].leakage})
        pops.append({"population": p, "truth": truth, "truth_fixed": fixed, "cpu_s_truth": t_truth,
                     "cpu_s_per_training": (time.process_time() - t0) / max(trainings, 1), "rows": rows})
    per_scheme = {}
    for name in ["none"] + [f"step{r:g}" for r in steps]:
        rr = [x for pp in pops for x in pp["rows"] if x["scheme"] == name]
        ratio = np.array([x["leakage"] / x["truth"] for x in rr])
        lo = np.array([x["lo"] for x in rr])
        hi = np.array([x["hi"] for x in rr])
        tr = np.array([x["truth"] for x in rr])
        tf = np.array([x["truth_fixed"] for x in rr])
        has = np.isfinite(lo)
        k = int(has.sum())
        cov = float(np.mean((lo[has] <= tr[has]) & (tr[has] <= hi[has]))) if k else math.nan
        # The headline's error in units of the standard error the interval implies, (hi - lo) /
        # (2 z80): its sd is what decides the coverage of a symmetric interval (1: nominal; the
        # fine grids' interval is the record term alone, whose sd over trainings is
        # sqrt(1 - R/n) of it against this fixed-design reference, cv31); its mean is the bias.
        zerr = ((np.array([x["leakage"] for x in rr]) - tr) / ((hi - lo) / (2.0 * Z80)))[has] if k else np.array([])
        # coverage's se between designs (a design's trainings share its X and theta*: the
        # binomial se understates it when designs differ)
        per_pop = [np.mean([(x["lo"] <= x["truth"] <= x["hi"]) for x in pp["rows"] if x["scheme"] == name])
                   for pp in pops] if k else []
        split = {}
        if rr and rr[0]["leakage_split"] is not None:
            split["split_ratio_mean"] = float(np.mean([x["leakage_split"] / x["truth"] for x in rr]))
        if k and rr[0]["leakage_split"] is not None:
            se = ((hi - lo) / (2.0 * Z80))[has]
            ls = np.array([x["leakage_split"] for x in rr])[has]
            sel, rest = (np.array([x["leakage"] for x in rr])[has] - ls) / se, (ls - tr[has]) / se
            split = {"selection_over_se_mean": float(sel.mean()), "selection_over_se_sd": float(sel.std(ddof=1)),
                     "rest_over_se_mean": float(rest.mean()), "rest_over_se_sd": float(rest.std(ddof=1)),
                     **split}
        per_scheme[name] = {
            "replications": len(rr), "with_interval": k, "coverage": cov,
            "binomial_se": binomial_se(cov, k) if k else math.nan,
            "population_se": float(np.std(per_pop, ddof=1) / math.sqrt(len(per_pop))) if len(per_pop) > 1 else math.nan,
            "error_over_se_mean": float(zerr.mean()) if k else math.nan,
            "error_over_se_sd": float(zerr.std(ddof=1)) if k > 1 else math.nan, **split,
            "below": float(np.mean(hi[has] < tr[has])) if k else math.nan,
            "above": float(np.mean(lo[has] > tr[has])) if k else math.nan,
            "coverage_fixed_game": float(np.mean((lo[has] <= tf[has]) & (tf[has] <= hi[has]))) if k else math.nan,
            "ratio_fixed_game_mean": float(np.mean([x["leakage"] / x["truth_fixed"] for x in rr])),
            "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
            "ratio_sd": float(ratio.std(ddof=1)) if ratio.size > 1 else 0.0,
            "half_width_rel": float(np.mean((hi[has] - lo[has]) / 2 / tr[has])) if k else math.nan,
            "independent_over_truth": float(np.mean([x["independent"] / x["truth"] for x in rr
                                                     if x["independent"] is not None])) if rr else math.nan,
            "regimes": sorted({str(x["regime"]) for x in rr}), "covariance": sorted({str(x["covariance"]) for x in rr}),
            "methods": sorted({str(x["method"]) for x in rr}),
        }
    return {"rho": rho, "design": design, "d": d, "n": n, "covariance": covariance, "steps": steps,
            "split_records": split_records,
            "spread_sd": spread_sd, "estimation": estimation, "num_records": num_records,
            "populations": pops, "schemes": per_scheme}


def ols_summary(res: dict) -> list[str]:
    out = []
    cpu = np.mean([p["cpu_s_per_training"] for p in res["populations"]])
    for name, s in res["schemes"].items():
        cov = (f"coverage {s['coverage']:.3f} +- {s['binomial_se']:.3f} (n={s['with_interval']}; between designs "
               f"{s['population_se']:.3f}) below {s['below']:.3f} above {s['above']:.3f} half-width {s['half_width_rel']:.3f} "
               f"(fixed game: coverage {s['coverage_fixed_game']:.3f}) | error / implied se: mean "
               f"{s['error_over_se_mean']:+.2f} sd {s['error_over_se_sd']:.2f}"
               if s["with_interval"] else "no interval" + (f" (headline with {res['split_records']} records / ref "
                                                           f"{s['split_ratio_mean']:.4f})" if "split_ratio_mean" in s else ""))
        if s["with_interval"] and "rest_over_se_mean" in s:
            cov += (f" (selection of the stored records: mean {s['selection_over_se_mean']:+.2f} sd "
                    f"{s['selection_over_se_sd']:.2f}; the rest: mean {s['rest_over_se_mean']:+.2f} sd "
                    f"{s['rest_over_se_sd']:.2f}; headline with {res['split_records']} records / ref "
                    f"{s['split_ratio_mean']:.4f})")
        out.append(f"{res['design']} rho={res['rho']:<4g} d={res['d']} n={res['n']} {name:<8} {cov} | headline / ref "
                   f"mean {s['ratio_mean']:.3f} min {s['ratio_min']:.3f} max {s['ratio_max']:.3f} sd {s['ratio_sd']:.3f} "
                   f"(fixed game {s['ratio_fixed_game_mean']:.3f}) | indep / ref {s['independent_over_truth']:.3f} | {','.join(s['regimes'])} "
                   f"{','.join(s['covariance'])} {','.join(s['methods'])} | {cpu:.2f} s/training")
    return out


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
    ap.add_argument("--settings", nargs="+", default=None,
                    help="independent populations (default: 32x64:stored:mixed 32x64:stored:4 "
                         "256x256:factored:4 256x256:factored-full:4 unless --ols is given)")
    ap.add_argument("--covariance", default=ScoringConfig().covariance, choices=COVARIANCE_FORMS,
                    help="the headline's form (default: the library's default)")
    ap.add_argument("--ols", nargs="+", type=float, default=None, metavar="RHO",
                    help="correlated least-squares designs with these input correlations (module docstring)")
    ap.add_argument("--ols-design", default="ar1", choices=AV.DESIGNS)
    ap.add_argument("--ols-d", type=int, default=64, help="weights of the least-squares design")
    ap.add_argument("--ols-n", type=int, default=4000, help="training records of the least-squares design")
    ap.add_argument("--ols-spread", type=float, default=84.0,
                    help="theta* spans +- this many sd (84: uniform positions on 0.75/1.4/4/8-sd grids)")
    ap.add_argument("--ols-estimation", default="auto", help="assess(estimation=...)")
    ap.add_argument("--ols-records", type=int, default=None, help="assess(num_records=...) (default: the library's)")
    ap.add_argument("--ols-split-records", type=int, default=None, metavar="R",
                    help="assess each training again with R stored records (the design's n: all) and split the "
                         "headline's error into the stored records' selection and the rest (cv31)")
    ap.add_argument("--ols-steps", nargs="+", type=float, default=[0.75, 1.4, 4.0, 8.0],
                    help="grid steps in sd units of theta-hat")
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
    if a.ols is not None:
        out["ols"] = []
        for rho in a.ols:
            res = run_ols(rho, a.ols_design, a.ols_d, a.ols_n, a.ols_steps, a.populations, a.trainings,
                          covariance=a.covariance, draws=a.draws, seed0=a.seed, spread_sd=a.ols_spread,
                          estimation=a.ols_estimation, num_records=a.ols_records,
                          split_records=a.ols_split_records)
            for line in ols_summary(res):
                print(line, flush=True)
            if a.no_rows:
                for p in res["populations"]:
                    p.pop("rows")
            out["ols"].append(res)
            if a.json is not None:
                a.json.write_text(json.dumps(out, indent=1))
    settings = a.settings if a.settings is not None else ([] if a.ols is not None else DEFAULT_SETTINGS)
    for spec in settings:
        res = run_setting(parse_setting(spec), a.populations, a.trainings, num_records=a.records, draws=a.draws,
                          sigma_bias=a.sigma_bias, seed0=a.seed, closed_form_max_d=a.closed_form_max_d,
                          covariance=a.covariance)
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
