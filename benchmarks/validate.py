"""Validate the MIS indicator against a simulated ground truth; regenerate docs/validation.md.

    python benchmarks/validate.py            # full run (< 30 min on 2 cores): docs + figures
    python benchmarks/validate.py --quick    # reduced run (~4 min: 213 s, 169 CPU s, one thread, s42; the
                                             # 64,000-record control variate since adds ~0.4 CPU s a grid) with the headline check
    python benchmarks/validate.py --coverage # coverage of the report's interval (~10 min)

The quick mode writes nothing under docs/ unless ``--out`` is given; it exits non-zero if the
headline agreement fails (see QUICK_* below, justified from the full run in
docs/validation.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning.groundtruth import compare as C
from mis_lightning.groundtruth import ground_truth as GT

# Headline check of the quick mode (step grids of <= 4 sd and the fixed grid; absmax
# schemes and truths below 5% of the unquantized baseline excluded -- see docs).
QUICK_MEDIAN_REL_ERR = 0.10
QUICK_MIN_SPEARMAN = 0.6

# The truths' sample sizes, declared once.
# Records behind the control variate's mean E_z c of the quick and full runs' truths and the
# correlated designs' (the coverage truths': ORACLE_RECORDS_COVERAGE below): at the library's 4,000 its Monte Carlo error (sd 1.6%, shared
# by every grid of a setting, then unreported) put setting 1's truths 2.1-2.8% low (seed 0's
# records read E c 2.1% low; docs/benchmarks.md, section cov43); 64,000 leave 0.4% for ~0.4-2 s
# per grid
ORACLE_RECORDS = 64_000
# Targets of the exact truths in d = 2. Absmax releases: estimates on blocks of 32 targets spread
# by 4.5% (sd; more than their bootstrap intervals say), of the order of the intervals' half width
# (~6%; cov43); exact whatever the draws (the other weight's box is 1-d): 256 targets, ~0.25 s
# each. Step grids (quadrature, K = 150, ~0.3 s per target and grid): 40; 640 fresh targets moved
# the 1-, 4- and 8-sd boundary truths by < 0.3% and the 4-sd centre / quarter by +4% / -0.5%
# (acc43); 256 would take ~1,150 CPU s (docs/benchmarks.md, cov44)
TRUTH_TARGETS_2D_STEP = 40
TRUTH_TARGETS_2D_ABSMAX = 256
# Targets and releases per target of the exact truths in d > 2 (exact_tv_ols, K = 40 designs, 64 GHK
# draws): 32 targets of 1,500 releases left +-5%, as wide as the fine grids' intervals (cv5). The
# release noise per target (~3% at 1,500, ~8% at 300) is small beside the spread over targets
# (~22% per target after the control variate), so 4x the targets at a fifth of the releases
# halve the error for 0.8x the cost: ~0.6 CPU s per target and grid (docs/benchmarks.md, cov44)
TRUTH_TARGETS_EXACT = 128
TRUTH_RELEASES_EXACT = 300
# Targets of the logistic coupled truth (M = 10^6 datasets fitted once): 32 left +-0.7-1.2% (80%
# bootstrap over targets) on the fine grids, where the interval's coverage was decided (cov44);
# the out arm's cells counted once per grid put a target at ~4.5 CPU s for 19 grids (was ~30 s)
TRUTH_TARGETS_LOGISTIC = 128
# Records behind the control variate's mean E c of every coverage truth (COVERAGE_PLAN; in
# coverage_key). 64,000 of seed 0 read the unquantized first-order value 0.65% low in the logistic
# setting (2.7 of their se) and 1.33% low in linear d = 1 (2.8 se); that error passes whole into
# the truth (beta ~ 1: the d = 1 truths were 1.40% low). 1,024,000 leave 0.06-0.12% for ~2 CPU min
# a setting (19 grids; docs/benchmarks.md, cov45 and cov45b)
ORACLE_RECORDS_COVERAGE = 1_024_000


def grids_for(s: GT.Setting, positions: bool) -> list:
    sd = s.sd
    out = []
    if positions:
        for c in (0.5, 1, 2, 4, 8):
            for o, lab in ((0.0, "centre"), (0.25, "quarter"), (0.5, "boundary")):
                out.append(GT.StepGrid(f"step{c:g}sd/{lab}", sd * c, offset=o, origin=s.theta_star))
    else:
        for c in (0.5, 1, 2, 4):
            out.append(GT.StepGrid(f"step{c:g}sd", sd * c))
    out.append(GT.StepGrid("fixed0.05", np.full(s.d, 0.05)))
    out += [GT.AbsmaxGrid(f"rtn_int{b}", b) for b in (8, 4, 2)]
    return out


def headline_mask(names: list[str], truth: np.ndarray, base: float) -> np.ndarray:
    keep = np.array([not n.startswith("rtn_int") and not n.startswith("step8") for n in names])
    return keep & (truth >= 0.05 * base)


def run_setting(s, positions, Z, M, n_models, draws, seed=0, log=print):
    t0 = time.time()
    grids = grids_for(s, positions)
    truth = GT.ground_truth(s, grids, Z=Z, M=M, seed=seed, boot=300, oracle_records=ORACLE_RECORDS)
    t1 = time.time()
    cmp = C.compare(s, grids, truth, seed=seed, draws=draws, n_models=n_models)
    # unquantized baseline (oracle, large sample): relative-error floor
    rng = np.random.default_rng(7)
    x, y = GT.draw_records(s, 20000, rng)
    w = GT.influence(s, x, y) / np.sqrt(np.diag(s.Sigma))
    base = float(np.mean(2 * _ndtr(np.sqrt(np.pi / 2) * np.sqrt(2 / np.pi) * np.linalg.norm(w, axis=1) / (2 * math.sqrt(s.n))) - 1))
    log(f"  {s.label()}: truth {t1 - t0:.1f}s, indicator {time.time() - t1:.1f}s")
    return {"setting": s, "grids": grids, "truth": truth, "cmp": cmp, "baseline": base}


def _ndtr(x):
    from scipy.special import ndtr

    return ndtr(x)


def correlated_block(n, Z, M, rhos, ds, log=print):
    rows = []
    for d in ds:
        for rho in rhos:
            s = GT.make_setting("linear", d, n, rho=rho, seed=3)
            grids = [GT.StepGrid(f"step{c:g}sd", s.sd * c) for c in (1, 2, 4)]
            truth = GT.ground_truth(s, grids, Z=Z, M=M, seed=1, boot=200, oracle_records=ORACLE_RECORDS)
            rng = np.random.default_rng([9, d, int(10 * rho)])
            x, y = GT.draw_records(s, n, rng)
            th = C.fit(s, x, y)
            r = y - x @ th
            Hn = x.T @ x / n
            psi = np.linalg.solve(Hn, (x * r[:, None]).T).T
            Sig = psi.T @ psi / n
            sd = np.sqrt(np.diag(Sig) / n)
            w = psi / np.sqrt(np.diag(Sig))
            for g, grid in enumerate(grids):
                from mis_lightning.functional import cell_statistics, record_leakage

                edges = GT._edges_around(grid, th, sd, 20)
                st = cell_statistics(torch.from_numpy(th), torch.from_numpy(sd), torch.from_numpy(edges))
                ind = float(record_leakage(torch.from_numpy(w[:512]), st, n, method="mc", mc_draws=4096,
                                           generator=torch.Generator().manual_seed(0)).mean())
                corr = C.correlated_first_order(psi[:512], Sig, th, grid, n)
                hist = truth.hist_z[:, g] - truth.hist_null_z[:, g] if d <= 2 else None
                rows.append({
                    "d": d, "rho": rho, "grid": grid.name, "independent": ind, "correlated": corr,
                    "truth": float(truth.estimate[g]), "truth_ci": truth.ci[g].tolist(),
                    "hist_minus_null": float(np.mean(hist)) if hist is not None else None,
                    "lr_raw": float(truth.tv_z[:, g].mean()),
                })
            log(f"  correlated d={d} rho={rho}: done")
    return rows


def curves(ns, seed=0):
    """Indicator (one trained model per n) for the fixed and the size-adaptive grid."""
    out = {"n": list(ns), "fixed0.05": [], "step2sd": [], "none": []}
    for n in ns:
        s = GT.make_setting("linear", 5, n)
        grids = [GT.StepGrid("fixed0.05", np.full(5, 0.05)), GT.StepGrid("step2sd", s.sd * 2)]
        _, est, model, _ = C.train_and_estimate(s, np.random.default_rng([seed, n]))
        v, _, base = C.indicator(s, grids, est, model, draws=0)
        out["fixed0.05"].append(float(v[0]))
        out["step2sd"].append(float(v[1]))
        out["none"].append(float(base[0]))
    return out


COVERAGE_PLAN = [
    # model, d, n, rho, targets Z, releases M: the exact OLS truths (ground_truth.exact_tv_ols_1d /
    # _2d in d = 1, 2: no Monte Carlo over releases, M unused; exact_tv_ols / _absmax in d > 2:
    # M releases per target) and, logistic, M datasets; Z and M of d >= 2: TRUTH_TARGETS_* above
    ("linear", 1, 1000, 0.0, 30, 0),
    ("linear", 2, 400, 0.5, TRUTH_TARGETS_2D_STEP, 0),
    ("linear", 5, 1000, 0.5, TRUTH_TARGETS_EXACT, TRUTH_RELEASES_EXACT),
    # logistic: the coupled-arm truth (groundtruth/logistic.py: M = 10^6 datasets fitted once,
    # each target added by a Taylor solve); it replaced the LR-test lower bound of M = 12,000
    # independent datasets per target, whose noise (+-0.001) decided the fine grids' coverage
    ("logistic", 2, 1000, 0.0, TRUTH_TARGETS_LOGISTIC, 1_000_000),
]
# Bins of the released absmax in the logistic truth's keys, in units of the largest weight sd:
# 0.1 and 0.05 gave the same Gaussian-test values (to 0.2%), 0.05 twice the plug-in's noise
LOGISTIC_ABSMAX_BIN_SD = 0.1


def coverage_grids(s: GT.Setting) -> list:
    """Step grids of 0.5-8 sd with every population weight at a cell centre, a quarter of
    the way, or on a boundary, plus the fixed grid and the absmax schemes."""
    out = [GT.StepGrid(f"step{c:g}sd/{lab}", s.sd * c, offset=o, origin=s.theta_star)
           for c in (0.5, 1, 2, 4, 8) for o, lab in ((0.0, "centre"), (0.25, "quarter"), (0.5, "boundary"))]
    out.append(GT.StepGrid("fixed0.05", np.full(s.d, 0.05)))
    return out + [GT.AbsmaxGrid(f"rtn_int{b}", b) for b in (8, 4, 2)]


def _exact_truth(s: GT.Setting, g: GT.Grid, Z: int, M: int) -> tuple[float, tuple[float, float]]:
    """Exact OLS truth of a step grid or an absmax release on ``Z`` targets (absmax releases in
    d = 2: ``TRUTH_TARGETS_2D_ABSMAX``), and its 80% interval
    over targets: step grids in d = 2 by quadrature (K = 150 designs); otherwise
    ``exact_truth_ols`` (Gaussian laws given the design, Monte Carlo over ``M`` releases per
    target, K = 40, 64 GHK draws; 4 in d = 2, where the absmax release's other box is 1-d and GHK
    exact; for absmax releases the scale's given-away weight enters as a density). Until the
    seventh session's fix of the GHK simulator's tail mirroring it converged only on fine grids,
    and coarse grids used the LR test; absmax releases used it until the eighth session
    (docs/validation.md). The control variate's mean over ``ORACLE_RECORDS_COVERAGE`` records."""
    orc = ORACLE_RECORDS_COVERAGE
    if s.d == 2 and isinstance(g, GT.StepGrid):
        return GT.exact_truth_ols_2d(s, g, Z=Z, K=150, oracle_records=orc)
    if s.d == 2:
        return GT.exact_truth_ols(s, g, Z=TRUTH_TARGETS_2D_ABSMAX, K=40, M=1500, draws=4, oracle_records=orc)
    return GT.exact_truth_ols(s, g, Z=Z, K=40, M=M, draws=64, oracle_records=orc)


def _grid_truth(s: GT.Setting, g: GT.Grid, Z: int, M: int, key: str, truth_cache: Path | None
                ) -> tuple[float, tuple[float, float]]:
    """``_exact_truth`` of one grid, read from / written to ``truth_cache`` under
    ``"<key> | <grid>"`` (``[truth, lo, hi]``): a run that stops keeps the grids it finished, and
    processes given the same cache can share a setting's grids (re-read before each grid)."""
    gkey = f"{key} | {g.name}"
    cache = json.loads(truth_cache.read_text()) if truth_cache is not None and truth_cache.exists() else {}
    if gkey in cache:
        v = cache[gkey]
        return v[0], (v[1], v[2])
    est, ci = _exact_truth(s, g, Z, M)
    if truth_cache is not None:
        cache = json.loads(truth_cache.read_text()) if truth_cache.exists() else {}
        cache[gkey] = [est, ci[0], ci[1]]
        truth_cache.write_text(json.dumps(cache, indent=1))
    return est, ci


def coverage_key(s: GT.Setting, Z: int, M: int) -> str:
    """The truth cache's key of a coverage setting: what the truth depends on (its method,
    targets, releases and the control variate's records), so that no other truth is reused."""
    exact = " exact" if s.model == "linear" and s.d > 2 else ""
    kind = " absmax-exact" if s.model == "linear" and s.d >= 2 else (" coupled" if s.model == "logistic" else "")
    absmax = f" absmaxZ={TRUTH_TARGETS_2D_ABSMAX}" if s.model == "linear" and s.d == 2 else ""
    return f"{s.label()} Z={Z} M={M}{exact}{kind} oracle={ORACLE_RECORDS_COVERAGE}{absmax}"


def _logistic_truth(s: GT.Setting, grids: list, Z: int, M: int) -> tuple[np.ndarray, np.ndarray]:
    """Truth of every grid of a logistic setting and its bracket ``[G, 2]``: the coupled-arm
    estimates of ``groundtruth.logistic.exact_truth_logistic`` (the larger of the split-sample
    and Gaussian-test values below, the plug-in above, both in expectation); the truth is the
    bracket's midpoint. About 260 CPU s for the base fits at M = 10^6, 4.5 CPU s per target."""
    from mis_lightning.groundtruth import logistic as LG

    r = LG.exact_truth_logistic(s, grids, Z=Z, M=M, bin_sd=LOGISTIC_ABSMAX_BIN_SD,
                                oracle_records=ORACLE_RECORDS_COVERAGE)
    for g, grid in enumerate(grids):  # the truth's own 80% intervals over targets, for the record
        print(f"    {grid.name}: " + ", ".join(f"{e} {r[e][g]:.5f} [{r[e + '_ci'][g, 0]:.5f}, {r[e + '_ci'][g, 1]:.5f}]"
                                         for e in ("split", "test", "plug")), flush=True)
    return logistic_truth_from(r["split"], r["test"], r["plug"])


# Relative width of the coupled truth's bracket up to which its midpoint is the truth; wider (the
# plug-in noise-dominated: rtn_int8's 256 codes x absmax bins) the lower end is the reference
LOGISTIC_BRACKET_TOL = 0.03


def logistic_truth_from(split, test, plug) -> tuple[np.ndarray, np.ndarray]:
    """``(truth [G], bracket [G, 2])`` from the coupled estimates: the bracket's midpoint where it
    is within ``LOGISTIC_BRACKET_TOL``, else its lower end (a lower bound in expectation)."""
    lo = np.maximum(np.asarray(split), np.asarray(test))
    hi = np.maximum(lo, np.asarray(plug))
    tight = hi - lo <= LOGISTIC_BRACKET_TOL * lo
    return np.where(tight, 0.5 * (lo + hi), lo), np.stack([lo, hi], 1)


def coverage_study(trainings: int, dump: Path | None = None, log=print, pick: list[int] | None = None,
                   truth_cache: Path | None = None) -> int:
    """Coverage of ``SchemeResult.interval`` (80%) of the ground truth, per grid: the
    fraction of ``trainings`` independently trained models whose interval holds it.
    ``truth_cache``: a JSON file of truths by setting, read if present and extended (the
    truths do not depend on the interval, so reruns of the interval skip them)."""
    t0 = time.time()
    rows = []
    for model, d, n, rho, Z, M in [p for i, p in enumerate(COVERAGE_PLAN) if pick is None or i in pick]:
        # re-read per setting: another run may have added truths meanwhile
        cache = json.loads(truth_cache.read_text()) if truth_cache is not None and truth_cache.exists() else {}
        s = GT.make_setting(model, d, n, rho=rho)
        grids = coverage_grids(s)
        ts = time.time()
        key = coverage_key(s, Z, M)
        bracket = ci = None
        if key in cache:
            truth = np.array(cache[key], dtype=np.float64)
            if key + " bracket" in cache:
                bracket = np.array(cache[key + " bracket"], dtype=np.float64)
            if key + " ci" in cache:
                ci = np.array(cache[key + " ci"], dtype=np.float64)
        elif model == "logistic":
            truth, bracket = _logistic_truth(s, grids, Z, M)
        elif model == "linear" and d >= 2:  # exact given the design (step grids and absmax releases)
            res = [_grid_truth(s, g, Z, M, key, truth_cache) for g in grids]
            truth, ci = np.array([r[0] for r in res]), np.array([r[1] for r in res])
            lr = [i for i, g in enumerate(grids) if not np.isfinite(truth[i])]
            if lr:
                tr = GT.ground_truth(s, [grids[i] for i in lr], Z=16, M=3000, boot=50,
                                     oracle_records=ORACLE_RECORDS_COVERAGE)
                truth[lr], ci[lr] = tr.estimate, tr.ci
        else:
            tr = GT.ground_truth(s, grids, Z=Z, M=M or 2000, boot=50, histogram=False,
                                 oracle_records=ORACLE_RECORDS_COVERAGE)
            truth, ci = tr.estimate, tr.ci
        if truth_cache is not None and key not in cache:
            cache = json.loads(truth_cache.read_text()) if truth_cache.exists() else {}
            cache[key] = truth.tolist()
            if bracket is not None:
                cache[key + " bracket"] = bracket.tolist()
            if ci is not None:
                cache[key + " ci"] = ci.tolist()
            truth_cache.write_text(json.dumps(cache, indent=1))
        tt = time.time() - ts
        rng = np.random.default_rng([7, d, n])
        cover, regimes, ivs, vals = [], [], [], []
        for k in range(trainings):
            _, est, mdl, _ = C.train_and_estimate(s, rng, num_records=min(n, 1000))
            rep = C.score(est, mdl, [C.scheme_for(g) for g in grids], uncertainty_draws=16, seed=k,
                          mc_draws=4096)
            iv = np.array([rep.schemes[C.scheme_for(g).name].interval for g in grids])
            cover.append((iv[:, 0] <= truth) & (truth <= iv[:, 1]))
            regimes.append([rep.schemes[C.scheme_for(g).name].interval_regime for g in grids])
            ivs.append(iv)
            vals.append([rep.schemes[C.scheme_for(g).name].leakage for g in grids])
        cov = np.mean(cover, 0)
        for g, grid in enumerate(grids):
            if bracket is not None:  # coverage of each end of the truth's bracket too
                ends = [float(np.mean([(iv[g, 0] <= e) & (e <= iv[g, 1]) for iv in ivs])) for e in bracket[g]]
                rows_extra = {"truth_bracket": bracket[g].tolist(), "coverage_of_bracket_ends": ends}
            else:
                rows_extra = {}
            if ci is not None:  # the truth's own 80% interval over its targets
                rows_extra["truth_ci"] = ci[g].tolist()
            rows.append({**rows_extra, "setting": s.label(), "grid": grid.name, "truth": float(truth[g]),
                         "coverage": float(cov[g]),
                         "regime": max(set(r[g] for r in regimes), key=[r[g] for r in regimes].count),
                         "width": float(np.median([iv[g, 1] - iv[g, 0] for iv in ivs])),
                         "intervals": [iv[g].tolist() for iv in ivs], "values": [float(v[g]) for v in vals]})
        log(f"  {s.label()}: truth {tt:.0f}s, {trainings} trainings {time.time() - ts - tt:.0f}s; "
            f"coverage min {cov.min():.2f} mean {cov.mean():.2f}")
        if dump is not None:  # after each setting: a long run that stops keeps what it did
            dump.write_text(json.dumps({"rows": rows, "seconds": time.time() - t0, "trainings": trainings}, indent=1))
    secs = time.time() - t0
    print(coverage_table(rows, trainings, secs))
    if dump is not None:
        dump.write_text(json.dumps({"rows": rows, "seconds": secs, "trainings": trainings}, indent=1))
    return 0


def coverage_table(rows: list[dict], trainings: int, secs: float) -> str:
    """Markdown: coverage by setting and grid family / position."""
    fams = [("0.5-1 sd", ("step0.5sd", "step1sd")), ("2 sd", ("step2sd",)), ("4 sd", ("step4sd",)),
            ("8 sd", ("step8sd",))]
    head = "| setting | " + " | ".join(f"{f} {p}" for f, _ in fams for p in ("centre", "quarter", "boundary"))
    head += " | fixed0.05 | rtn_int8/4/2 | min | regime (step grids) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for st in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == st]
        cells = []
        for _, pre in fams:
            for p in ("centre", "quarter", "boundary"):
                v = [r["coverage"] for r in rs if r["grid"].split("/")[0] in pre and r["grid"].endswith(p)]
                cells.append(f"{min(v):.0%}")
        cells.append(f"{[r['coverage'] for r in rs if r['grid'] == 'fixed0.05'][0]:.0%}")
        cells.append("/".join(f"{r['coverage']:.0%}" for r in rs if r["grid"].startswith("rtn_int")))
        cells.append(f"{min(r['coverage'] for r in rs):.0%}")
        reg = sorted(set(r["regime"] for r in rs if r["grid"].startswith("step")))
        cells.append(", ".join(reg))
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"({trainings} trainings per setting; each cell is the lowest coverage over the grids it "
                 f"groups; {secs:.0f}s)")
    return "\n".join(lines)


def fmt(x, p=4):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{p}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def table_for(res) -> list[str]:
    cmp, tr = res["cmp"], res["truth"]
    lines = [(f"**{cmp.setting}** (baseline, unquantized: {fmt(res['baseline'])}; "
              f"Spearman {cmp.spearman:.2f}, Kendall {cmp.kendall:.2f} across the {len(cmp.grids)} grids)"), "",
             "| grid | truth | truth 80% CI | LR-test raw | exact | null | indicator | its p10-p90 | rel. err |"
             + (" trainings p10-p90 | coverage |" if cmp.spread is not None else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cmp.spread is not None else "")]
    for g, name in enumerate(cmp.grids):
        ex = tr.exact_z[:, g]
        row = (f"| {name} | {fmt(cmp.truth[g])} | {fmt(cmp.truth_ci[g][0])}-{fmt(cmp.truth_ci[g][1])} | "
               f"{fmt(tr.tv_z[:, g].mean())} | {fmt(float(np.nanmean(ex))) if np.isfinite(ex).any() else '-'} | "
               f"{fmt(tr.null[g])} | {fmt(cmp.value[g])} | {fmt(cmp.interval[g][0])}-{fmt(cmp.interval[g][1])} | "
               f"{cmp.rel_err[g]:+.1%} |")
        if cmp.spread is not None:
            row += f" {fmt(cmp.spread[g][0])}-{fmt(cmp.spread[g][1])} | {cmp.coverage[g]:.0%} |"
        lines.append(row)
    lines.append("")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run (< 2 min) with the headline check")
    ap.add_argument("--out", type=Path, default=None, help="docs directory (default docs/ in full mode)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small ops)")
    ap.add_argument("--dump", type=Path, default=None, help="pickle every result here (for --docs-from)")
    ap.add_argument("--docs-from", type=Path, default=None,
                    help="rewrite the docs from a --dump pickle without recomputing (prose changes)")
    ap.add_argument("--coverage", action="store_true",
                    help="coverage of the report's 80%% interval by grid family and position (~10 min)")
    ap.add_argument("--trainings", type=int, default=20, help="trainings per setting in --coverage")
    ap.add_argument("--settings", type=str, default=None,
                    help="--coverage: comma-separated indices into COVERAGE_PLAN (default all)")
    ap.add_argument("--truth-cache", type=Path, default=None,
                    help="--coverage: JSON file of the truths, reused when present (reruns of the interval)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.coverage:
        pick = None if args.settings is None else [int(i) for i in args.settings.split(",")]
        return coverage_study(args.trainings, args.dump, pick=pick, truth_cache=args.truth_cache)
    if args.docs_from is not None:
        import pickle

        saved = pickle.loads(args.docs_from.read_bytes())
        write_docs(args.out or ROOT / "docs", **saved)
        return 0
    t_start = time.time()
    out = args.out if args.out is not None else (None if args.quick else ROOT / "docs")
    log = lambda m: print(m, flush=True)

    results = []
    if args.quick:
        plan = [("linear", 1, 1000, True, 16, 8000, 6), ("linear", 2, 1000, False, 16, 6000, 0),
                ("linear", 5, 1000, False, 16, 6000, 0)]
    else:
        plan = []
        for n in (100, 1000, 10000):
            plan.append(("linear", 1, n, True, 40, 20000, 40 if n == 1000 else 0))
        for d in (2, 5, 20):
            for n in (100, 1000, 10000):
                plan.append(("linear", d, n, False, 30, 20000 if d <= 5 else 10000, 30 if (d == 5 and n == 1000) else 0))
        for d in (1, 2, 5):
            for n in (200, 1000):
                plan.append(("logistic", d, n, False, 16, 2000 if n == 1000 else 4000,
                             20 if (d == 2 and n == 1000) else 0))
    log(f"validate: {len(plan)} settings ({'quick' if args.quick else 'full'})")
    for model, d, n, pos, Z, M, nm in plan:
        s = GT.make_setting(model, d, n)
        results.append(run_setting(s, pos, Z, M, nm, draws=16 if args.quick else 32, log=log))

    # headline numbers
    rel, rel_all, sp, kd, sp_step, kd_step = [], [], [], [], [], []
    for r in results:
        c = r["cmp"]
        mask = headline_mask(c.grids, c.truth, r["baseline"])
        rel += list(np.abs(c.rel_err[mask]))
        rel_all += list(np.abs(c.rel_err[c.truth >= 0.05 * r["baseline"]]))
        if math.isfinite(c.spearman):
            sp.append(c.spearman)
            kd.append(c.kendall)
            sp_step.append(c.extra["spearman_step"])
            kd_step.append(c.extra["kendall_step"])
    med = float(np.median(rel))
    med_all = float(np.median(rel_all))
    cov_vals = [float(x) for r in results if r["cmp"].coverage is not None for x in r["cmp"].coverage]
    log(f"median |rel. err| (step/fixed grids): {med:.3f}; all grids incl. absmax: {med_all:.3f}")
    log(f"Spearman median {np.median(sp):.2f} (min {np.min(sp):.2f}); Kendall median {np.median(kd):.2f}; "
        f"step grids only: Spearman median {np.median(sp_step):.2f}, Kendall {np.median(kd_step):.2f}")
    if cov_vals:
        log(f"coverage of the bootstrap interval (mean over grids): {np.mean(cov_vals):.2f}")

    ok = med <= QUICK_MEDIAN_REL_ERR and float(np.median(sp_step)) >= QUICK_MIN_SPEARMAN
    summary = {"median_rel_err_headline": med, "median_rel_err_all": med_all,
               "spearman": sp, "kendall": kd, "spearman_step": sp_step, "kendall_step": kd_step, "coverage_mean": float(np.mean(cov_vals)) if cov_vals else None,
               "seconds": time.time() - t_start, "ok": ok}

    corr_rows, curve = [], None
    if not args.quick:
        log("correlated designs ...")
        corr_rows = correlated_block(1000, 20, 20000, (0.0, 0.5, 0.9), (2, 3), log=log)
        log("curves ...")
        curve = curves([100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000])
    if args.dump is not None:
        import pickle

        args.dump.write_bytes(pickle.dumps({"results": results, "summary": summary, "corr_rows": corr_rows,
                                            "curve": curve, "quick": args.quick}))
    if out is not None:
        write_docs(out, results, summary, corr_rows, curve, quick=args.quick)
    log(f"done in {time.time() - t_start:.0f}s; check {'PASSED' if ok else 'FAILED'} "
        f"(median rel. err {med:.3f} <= {QUICK_MEDIAN_REL_ERR}, step-grid Spearman {np.median(sp_step):.2f} >= {QUICK_MIN_SPEARMAN})")
    return 0 if ok else 1


def write_docs(out: Path, results, summary, corr_rows, curve, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    # Figure 1: indicator vs truth scatter
    fig, ax = plt.subplots(figsize=(5.5, 5))
    markers = {"step": "o", "fixe": "s", "rtn_": "x"}
    for r in results:
        c = r["cmp"]
        for g, name in enumerate(c.grids):
            col = "C0" if c.setting.startswith("linear") else "C1"
            ax.errorbar(c.truth[g], max(c.value[g], 1e-6),
                        xerr=[[c.truth[g] - c.truth_ci[g][0]], [c.truth_ci[g][1] - c.truth[g]]],
                        fmt=markers[name[:4]], color=col if not name.startswith("rtn_int") or name == "rtn_int8" else "C3",
                        ms=4, alpha=0.7, lw=0.6)
    lim = [1e-5, 0.3]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlim(lim), ax.set_ylim(1e-6, 0.3)
    ax.set_xlabel("ground truth Delta (simulation)"), ax.set_ylabel("indicator Delta-hat (one trained model)")
    ax.set_title("indicator vs ground truth (blue linear, orange logistic,\nred: rtn_int4/int2 absmax; o step, s fixed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(fig_dir / "validation_scatter.png", dpi=120)
    plt.close(fig)

    if curve is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = np.array(curve["n"])
        ax.plot(ns, 1 - np.array(curve["none"]), "k-", label="unquantized")
        ax.plot(ns, 1 - np.array(curve["step2sd"]), "C0-o", ms=3, label="size-adaptive: step 2 sd (~1/sqrt n)")
        ax.plot(ns, 1 - np.array(curve["fixed0.05"]), "C1-s", ms=3, label="fixed step 0.05")
        for r in results:
            c = r["cmp"]
            if c.setting.startswith("linear d=5 "):
                for g, name in enumerate(c.grids):
                    if name in ("step2sd", "fixed0.05"):
                        ax.errorbar(r["setting"].n, 1 - c.truth[g], yerr=[[c.truth_ci[g][1] - c.truth[g]], [c.truth[g] - c.truth_ci[g][0]]],
                                    fmt="*", color="C0" if name == "step2sd" else "C1", ms=9)
        ax.set_xscale("log"), ax.set_xlabel("n"), ax.set_ylabel("MIS = 1 - Delta")
        ax.set_title("linear regression d=5: indicator (lines), ground truth (stars)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / "validation_mis_vs_n.png", dpi=120)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ns, np.array(curve["step2sd"]) * np.sqrt(ns), "C0-o", label="step 2 sd: Delta sqrt(n)")
        ax.plot(ns, np.array(curve["none"]) * np.sqrt(ns), "k-", label="unquantized: Delta sqrt(n)")
        ax.plot(ns, np.array(curve["fixed0.05"]) * np.sqrt(ns), "C1-s", label="fixed 0.05: Delta sqrt(n)")
        ax.set_xscale("log"), ax.set_xlabel("n"), ax.set_ylabel("Delta * sqrt(n)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / "validation_rate.png", dpi=120)
        plt.close(fig)

    # positions figure (d=1): indicator/truth ratio vs position
    pos = [r for r in results if r["setting"].d == 1 and r["setting"].model == "linear"]
    if pos:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in pos:
            c = r["cmp"]
            for lab, mk in (("centre", "o"), ("quarter", "^"), ("boundary", "v")):
                xs, ys = [], []
                for g, name in enumerate(c.grids):
                    if name.endswith("/" + lab):
                        xs.append(float(name[4:].split("sd")[0]))
                        ys.append(c.value[g] / max(c.truth[g], 1e-12))
                if xs:
                    ax.plot(xs, ys, mk + "-", label=f"n={r['setting'].n} {lab}", alpha=0.8)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("grid step (sd of theta-hat)"), ax.set_ylabel("indicator / truth")
        ax.set_title("OLS d=1: plug-in ratio by position of theta* in its cell", fontsize=9)
        ax.legend(fontsize=6, ncol=3)
        fig.tight_layout()
        fig.savefig(fig_dir / "validation_positions.png", dpi=120)
        plt.close(fig)

    md = [HEADER.format(**{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in summary.items() if not k.startswith(("spearman", "kendall"))},
                        sp_med=f"{np.median(summary['spearman']):.2f}", sp_min=f"{np.min(summary['spearman']):.2f}",
                        kd_med=f"{np.median(summary['kendall']):.2f}", kd_min=f"{np.min(summary['kendall']):.2f}",
                        sps_med=f"{np.median(summary['spearman_step']):.2f}", sps_min=f"{np.min(summary['spearman_step']):.2f}",
                        kds_med=f"{np.median(summary['kendall_step']):.2f}",
                        nset=len(results), mode="quick" if quick else "full", oracle_records=ORACLE_RECORDS)]
    md += coverage_section(results)
    md.append("## Per-setting tables\n")
    for r in results:
        md += table_for(r)
    if corr_rows:
        md.append(CORR_HEADER)
        md.append("| d | rho | grid | independent (indicator) | exact correlated first order | truth (LR test, CV) | histogram - null (d=2) |")
        md.append("|---|---|---|---|---|---|---|")
        for row in corr_rows:
            md.append(f"| {row['d']} | {row['rho']} | {row['grid']} | {fmt(row['independent'])} | {fmt(row['correlated'])} | "
                      f"{fmt(row['truth'])} ({fmt(row['truth_ci'][0])}-{fmt(row['truth_ci'][1])}) | {fmt(row['hist_minus_null'])} |")
        md.append("")
    if curve is not None:
        md.append(CURVE_TEXT)
        md.append("| n | " + " | ".join(str(n) for n in curve["n"]) + " |")
        md.append("|---|" + "---|" * len(curve["n"]))
        for k in ("none", "step2sd", "fixed0.05"):
            md.append(f"| {k} Delta | " + " | ".join(fmt(v) for v in curve[k]) + " |")
        md.append("| step2sd Delta sqrt(n) | " + " | ".join(f"{v * math.sqrt(n):.3f}" for v, n in zip(curve['step2sd'], curve['n'])) + " |")
        md.append("")
    md += attacks_section(fig_dir)
    md.append(OFF_TEXT)
    (out / "validation.md").write_text("\n".join(md))
    (fig_dir / "validation_summary.json").write_text(json.dumps(
        {**{k: v for k, v in summary.items()}, "corr": corr_rows, "curve": curve,
         "settings": [{"setting": r["cmp"].setting, "grids": r["cmp"].grids, "truth": r["cmp"].truth.tolist(),
                       "truth_ci": r["cmp"].truth_ci.tolist(), "indicator": r["cmp"].value.tolist(),
                       "interval": r["cmp"].interval.tolist(), "baseline": r["baseline"],
                       "coverage": None if r["cmp"].coverage is None else r["cmp"].coverage.tolist(),
                       "spread": None if r["cmp"].spread is None else r["cmp"].spread.tolist()} for r in results]},
        indent=1))


# trainings per setting of the full plan (for pickles written before Comparison.extra held it)
_PLAN_MODELS = {"linear d=1 n=1000": 40, "linear d=5 n=1000": 30, "logistic d=2 n=1000": 20}


def coverage_section(results) -> list[str]:
    """Coverage of the report's interval, per setting with many trainings, by grid family."""
    rows = [r for r in results if r["cmp"].coverage is not None]
    if not rows:
        return []
    md = [COVERAGE_TEXT, "| setting | trainings | all grids | step/fixed <= 1 sd | step/fixed 2-8 sd | rtn_int8/4/2 |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cmp"]
        cov = np.asarray(c.coverage)
        names = c.grids

        def fam(k, names=names):
            if k == "rtn":
                return np.array([n.startswith("rtn_int") for n in names])
            fine = np.array([n.startswith(("step0.5", "step1sd", "fixed")) for n in names])
            step = np.array([not n.startswith("rtn_int") for n in names])
            return fine if k == "fine" else step & ~fine

        cells = [f"{cov[m].mean():.0%} ({int(m.sum())})" if m.any() else "-" for m in (fam("fine"), fam("coarse"), fam("rtn"))]
        md.append(f"| {c.setting} | {c.extra.get('n_models', _PLAN_MODELS.get(c.setting, '-'))} | {cov.mean():.0%} | " + " | ".join(cells) + " |")
    md.append("")
    return md


def attacks_section(fig_dir: Path) -> list[str]:
    """Tables of the empirical attacks (from ``benchmarks/attacks.py --json``), if present."""
    md = []
    files = sorted(fig_dir.glob("attacks_d*_n*.json")) + sorted(fig_dir.glob("attacks_chembl*.json"))
    for f in files:
        r = json.loads(f.read_text())
        if not md:
            md.append(ATTACKS_TEXT)
        cfg = r.get("config")
        if cfg and cfg.get("data") == "chembl":
            if not any(line.startswith("### ChEMBL") for line in md):
                md.append(CHEMBL_TEXT)
            title = (f"ChEMBL2321810 ({cfg['featurizer']} features + intercept, d={cfg['d']}), "
                     f"n={cfg['n']}, {cfg['targets']} targets, ridge {cfg['ridge']:g}")
        else:
            tag = f.stem.replace("attacks_", "")
            title = "logistic regression " + tag.replace("_", ", ").replace("d", "d=", 1).replace("n", "n=", 1)
        cmd = cfg["command"] if cfg else "python benchmarks/attacks.py --targets 10 --d ... --n ..."
        md.append(f"**{title}** (`{cmd}`, JSON `{f.relative_to(fig_dir.parent)}`)")
        md.append("")
        md.append("| scheme | indicator Delta (p10-p90) | loss AUC / TPR@1% / adv. | LiRA AUC / TPR@1% / adv. | null adv. loss / LiRA |")
        md.append("|---|---|---|---|---|")
        for k, v in r.items():
            if not isinstance(v, dict) or "indicator" not in v:
                continue
            md.append(f"| {k} | {v['indicator']:.4f} ({v['interval'][0]:.4f}-{v['interval'][1]:.4f}) | "
                      f"{v['loss'][0]:.3f} / {v['loss'][1]:.3f} / {v['loss'][2]:.3f}+-{v['loss_adv_se']:.3f} | "
                      f"{v['lira'][0]:.3f} / {v['lira'][1]:.3f} / {v['lira'][2]:.3f}+-{v['lira_adv_se']:.3f} | "
                      f"{v['loss_null'][2]:.3f} / {v['lira_null'][2]:.3f} |")
        md.append("")
        extra = ""
        if "tau_loss_auc" in r:
            extra = (f" On AUC: loss {r['tau_loss_auc']:.2f}, LiRA {r['tau_lira_auc']:.2f}; on TPR@1%FPR: "
                     f"loss {r['tau_loss_tpr']:.2f}, LiRA {r['tau_lira_tpr']:.2f}.")
        md.append(f"Kendall tau (indicator vs attack advantage across schemes): loss {r['tau_loss']:.2f}, "
                  f"LiRA {r['tau_lira']:.2f}.{extra} Time per target: indicator {r['t_indicator']:.2f}s, "
                  f"reference-model attack {r['t_attack']:.2f}s.")
        md.append("")
    return md


ATTACKS_TEXT = """## Empirical attacks (loss threshold, LiRA-offline with 8 reference models)

`mis_lightning/groundtruth/attacks.py`, `benchmarks/attacks.py`. Synthetic logistic regression,
a linear layer released under each `rtn_int*` scheme, 10 target models (fresh members,
non-members and shadow pool each), means +- standard errors over targets. The attack
advantage `max_threshold (TPR - FPR)` on n members vs n non-members is biased upward by the
maximum over thresholds: the "null adv." column is the same attack scoring a second set of
fresh non-members against the non-members (no membership signal at all), i.e. the noise
floor (~`0.87 sqrt(2/n)`). The indicator's Delta should be compared with the attack
advantage **minus** that floor, not with the raw value.
"""


COVERAGE_TEXT = """## Coverage of the report's interval

The interval is the report's own `SchemeResult.interval` (`assess._interval`): p10-p90 of the
parametric bootstrap (cell statistics re-evaluated around `theta_hat + sigma * xi`), widened
to contain the plug-in value and by 1.28 standard errors of the mean over the records on
each side. Coverage = fraction of independently trained models (fresh data each) whose
interval contains the ground-truth value (nominal 80%); in parentheses the number of grids.
"""


CHEMBL_TEXT = """### ChEMBL (real features)

The same two attacks on a small linear model trained on real data: logistic regression on
`mis_lightning.data.ChEMBLDataModule(task="binary")` features (CHEMBL2321810, 1,017 compounds,
active iff activity >= 6.5, 48% active), the records of all three splits pooled and, for each
target model, re-shuffled into n members, n non-members, n null non-members and the rest
(417 at n = 200) as the reference models' shadow pool (reference models draw n of them, so
they overlap each other: LiRA-offline with a small population).

Reading of the run below (20 targets, n = 200): both attacks rank the schemes like the
indicator (none ~ int8 > int4 > int3 > int2; Kendall tau 0.8-1.0 on the advantage, the
ties among none/int8/int4 are within the attacks' standard errors). Above the noise floor
(advantage minus null advantage) LiRA reaches 0.053 unquantized and 0.015 at `rtn_int2`,
below the indicator's 0.076 and 0.047, as it should be for an upper-bound-type quantity
(the indicator is the best test's advantage averaged over records; a concrete attack with 8
overlapping reference models is weaker). TPR at 1% FPR is 1.5-2.5% everywhere: with 200
non-members, 1% FPR is 2 records, so that column cannot separate the schemes here.
"""


HEADER = """# Validation of the MIS indicator against a simulated ground truth

Regenerate (tables, figures, this file): `python benchmarks/validate.py` ({mode} run here:
{nset} settings in {seconds}s, plus the correlated designs and the n-curves, on 2 shared CPU
cores, 1 torch thread; `--dump FILE` keeps the results and `--docs-from FILE` rewrites this
page from them). CI: `python benchmarks/validate.py --quick`
(< 2 min, checks the headline agreement) and `pytest tests/test_validation.py`.

## Headline

* **Median |relative error| of the indicator vs the ground truth: {median_rel_err_headline}** over the
  step grids (0.5-4 sd of theta-hat, any position) and the fixed grid, every setting, where the
  truth is at least 5% of the unquantized leakage; **{median_rel_err_all}** over all grids including
  the absmax `rtn_int*` schemes and 8-sd steps.
* Rank correlation between indicator and truth across the grids of a setting: Spearman median
  {sp_med} (min {sp_min}), Kendall median {kd_med} (min {kd_min}) over all grids; over the
  step/fixed grids only (absmax excluded, see below): Spearman median {sps_med} (min {sps_min}),
  Kendall median {kds_med}. Many grids tie in truth (fine grids and boundary positions all
  sit at the unquantized value), which caps the attainable rank correlation.
* Coverage of the report's interval (`SchemeResult.interval`: bootstrap p10-p90 widened to
  the plug-in and by 1.28 record standard errors) of the truth, averaged over the grids of
  the settings with many trainings: {coverage_mean} for a nominal 0.80 (0.414 with the
  previous p10-p90-only interval, commit 13fc225); by setting and grid family in "Coverage" below.
* Every indicator value here comes from `assess.score` as shipped: the `rtn_int*` schemes
  themselves, and the step/fixed grids as an affine `ParamGrid` with a float zero point
  (`compare.StepScheme`), so the library's rules (weights revealed by the scale scored as
  unquantized, the interval) are what is measured.

## How the ground truth is computed

`mis_lightning/groundtruth/ground_truth.py`. The quantity is
`Delta = E_z[TV(law(T | Z1 = z), law(T))]`, `T = Q(theta_hat)`. For each target record `z`
(16-40 drawn from the data model) `M` datasets of `n - 1` other records are simulated once and
the model is trained three times on the same other records: with `z` (**in**), with a fresh
record (**out**: the marginal law of the release), with another fresh record (**null**: same law
as out). Training: OLS through its sufficient statistics (`X'X ~ Wishart(n-1, R)` by Bartlett's
decomposition, `X'eps | X ~ N(0, s^2 X'X)`; exact, `O(d^3)` per dataset) and logistic MLE by
batched Newton on the full data. The truth never uses the indicator's Gaussian model for its
value:

* **exact** (OLS, `d = 1`): given `S = sum x_i^2` the estimator is exactly Gaussian, so the cell
  probabilities of both arms are 1-D integrals over `S ~ chi^2`; no Monte Carlo over datasets.
* **LR-test lower bound** (every other setting): `TV >= P_in(S) - P_out(S)` for any set of codes
  `S`; `S = {{LLR > 0}}` with the code's log-likelihood ratio under a Gaussian approximation with
  the FULL covariance (mean and covariance of theta-hat from the out arm, in-out shift from the
  coupled pairs of the other fold: 2-fold cross-fitting; box probabilities by the GHK simulator,
  48 draws): the Neyman-Pearson test between the two Gaussians of the first-order theory.
  `P_in(S) - P_out(S)` is then estimated by counting, which is unbiased. What it assumes:
  nothing for validity (it is a lower bound whatever `S`); for tightness, that the Gaussian LR
  is close to the true one (an error `eps` in the LR costs `O(eps^2)`). Until issue 12 the test
  used each coordinate's own law (diagonal covariance), which ignores the correlation an
  attacker can use and sat below the truth for correlated weights (the tables below that
  predate it say so). For absmax grids the test also uses
  the exactly released largest weight (`qmax * scale`).
* **histogram** (`d <= 2`, step grids): plug-in TV of code counts, biased upward by
  ~`sqrt(#codes/M)`; its bias is measured by the null arm and shown in the correlated table.
* Averaging over `z`: the per-target values are combined with a control variate (the
  indicator's formula evaluated with the TRUE `theta*`, `Sigma`, `psi(z)`, whose mean over
  `z ~ P` is computed on {oracle_records:,} fresh records), which removes most of the spread due to the
  few targets; the interval is a bootstrap over targets (each target's value already averages
  its own `M` datasets, so both levels of noise are carried), 10%-90%.
* Bias of the LR-test estimator, measured where the exact value exists (OLS `d = 1`, columns
  "LR-test raw" vs "exact" on the same targets): see the d=1 tables; the null column is the
  same test applied to the null arm (expectation 0).

![indicator vs truth](figures/validation_scatter.png)
![plug-in by position](figures/validation_positions.png)
"""

CORR_HEADER = """## Correlated design (linear regression, AR(1) feature correlation rho, n = 1000)

"independent" is the library's independent-coordinate indicator (`record_leakage`, Monte
Carlo); "exact correlated first order" is `(1/(2 sqrt n)) E|psi' Sigma^-1 m(U)|` with
`m(U) = E[U | box]` under `N(0, Sigma)` (box means by Monte Carlo over 400,000 draws of `U`,
`compare.correlated_first_order`), both from the same trained model (plug-in `Sigma`, `psi`).
The truth column is the LR-test lower bound; its test ignores the correlation, so for large
rho it can be loose (the histogram estimate, d = 2, needs no such assumption).
"""

CURVE_TEXT = """## MIS against n (linear regression, d = 5, indicator of one trained model per n)

A fixed step (0.05 in parameter units) protects more and more as n grows (the step becomes
many sd wide: MIS -> 1 exponentially fast); a size-adaptive step (2 sd, i.e. proportional to
1/sqrt(n)) keeps `Delta sqrt(n)` constant (a 1/sqrt(n) law). Stars: the ground truth.

![MIS vs n](figures/validation_mis_vs_n.png)
![Delta sqrt n](figures/validation_rate.png)
"""

OFF_TEXT = """## Where the indicator is off, and why

1. **absmax schemes (`rtn_int*`): the scale is a released float -- now handled.** Symmetric
   absmax per channel computes `scale = max|W_r| / qmax` from the weights, so the largest
   weight of each row is released exactly (`qmax * scale`). The library now scores those
   weights as unquantized (`revealed_by_scale`, `ParamGrid.revealed`; kappa = 1), and the
   ground truth's control variate uses the same rule. Effect here: with `d = 1` every
   `rtn_int*` release is theta-hat itself and the indicator now equals the unquantized value
   (relative error +2% to +10%, the plug-in's error on the unquantized leakage, instead of
   -28% to -100% before); over all settings the `rtn_int*` errors are within +-15% except
   `rtn_int2` at `linear d=20 n=100` (-27%), `linear d=20 n=10000` (+27%) and
   `logistic d=5 n=1000` (-22%) -- 2-bit grids, whose step is many sd, where item 2
   applies. Not modelled: the grid itself moves with the largest weight (the other weights'
   cells depend on theta-hat through the scale).
2. **Coarse grids and the position of the true weight (method.md section 7).** With steps of 2-8 sd
   the plug-in evaluates `kappa` around theta-hat, not theta*: a true weight at the centre of a
   cell is read as leakier than it is, one on a boundary as safer (figure "plug-in by
   position"). With 8 sd and theta* at the centre the truth is exponentially small while the
   plug-in is not (relative errors of +38% to +120% at 4-8 sd / centre, d = 1). Averaged
   over positions (many weights) the bias cancels; the interval is what to read there.
3. **The interval.** The report's interval is the bootstrap p10-p90 over where theta-hat
   falls in its cells, widened to contain the plug-in and by 1.28 standard errors of the
   record average. Measured coverage (exact truths, `E c` over 1,024,000 records, 12 trainings
   per OLS setting, 100 logistic; section "Coverage of the report's interval", cov44-cov46): 83-100% per
   grid for OLS `d = 1, 2, 5` (nominal 80%), 84-100% (+-4%) for `logistic d=2 n=1000` (128-target truth). Where it is tight:
   (a) fine grids of the logistic model, where the bootstrap spread is nearly zero: 0.5-sd
   quarter 85%, `rtn_int4` 84% (76% at the upper end of its truth's 0.5% bracket), every miss
   below: the plug-ins read 0.3-1.5% below the truth (the first-order value's finite-`n`
   shortfall), and `rtn_int4`'s upper end does not carry where its weight sits in the grid that
   moves with the largest weight (item 1; docs/benchmarks.md, cov46); (b) coarse
   grids (4-8 sd) with theta* at a cell boundary (read ~0.7x, the report warns) or centre
   (item 2): the interval is centred on the plug-in, which is biased for that one position. It
   is still not a full
   confidence interval: it does not carry the sampling error of `sigma` and `w`.
4. **Small n / large d / logistic.** `d/n = 0.2` (d = 20, n = 100) is outside the asymptotic regime
   (the report flags `d_eff/n`); logistic MLE has an `O(1/n)` bias and non-Gaussian tails at
   n = 200 (`logistic d=1 n=200`: median |rel. err| 0.12, the worst setting). See the
   per-setting tables for the size of the effect.
5. **Few coarse coordinates.** The Gaussian (CLT) form is off by up to 2.5x for `d <= 5` with
   coarse grids (method.md section 7); `score` (`method="auto"`) then uses Monte Carlo
   (or the exact 1-D form for `d = 1`), which is what these tables exercise.
6. **Strong feature correlation (rho = 0.9).** The independent-coordinate indicator exceeds the
   exact correlated first-order term at rho = 0.9 (they agree closely at rho <= 0.5; see the
   correlated table). The ground truth there is less certain: its LR test ignores the
   correlation (a looser lower bound), and "histogram - null" over-corrects (subtracting the
   null value removes more than the bias). Read the rho = 0.9 rows as "indicator
   conservative", not as a measured error.
7. **Float zero points -- fixed in the library.** `functional.grids.affine_codes` used to compute
   `round(theta / scale) + zero_point`, wrong for non-integer zero points (torchao's
   `int4_tinygemm`); it now rounds `theta / scale + zero_point` as a whole. The step grids of
   this page go through exactly that path (`StepScheme`: float zero point
   `offset - origin / step`), and `tests/test_validation.py::test_step_scheme_matches_functional_core`
   checks them against the functional core on the same cells.
"""


if __name__ == "__main__":
    raise SystemExit(main())
