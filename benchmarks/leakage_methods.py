"""Error of the Gaussian (CLT) form of E|sum_j w_j m_j| against Monte Carlo.

``record_leakage(method="auto")`` uses the Gaussian form ``sqrt(2/pi) sqrt(sum w^2 kappa)``
when the Edgeworth estimate of its relative error, ``|gamma| / 24`` (``gamma`` the excess
kurtosis of the sum), is at most ``CLT_TOLERANCE`` and at least ``CLT_MIN_TERMS``
coordinates contribute (``n_eff``), for every record; Monte Carlo otherwise. This script
draws many random configurations -- d from 2 to 500 (log-uniform),
grid steps from 0.5 to 8 sd (one step for all coordinates, or one per coordinate), random
positions of the weights in their cells, and three kinds of influence vectors (Gaussian,
log-normal scaled, one dominant coordinate) -- and measures the relative error of the
Gaussian form against a long Monte Carlo run, binned by the predicted error.

    python benchmarks/leakage_methods.py                  # ~400 configurations, 40k draws
    python benchmarks/leakage_methods.py --configs 100 --samples 20000   # quick

Prints a markdown table (docs/functional-accuracy.md).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np
import torch

from mis_lightning.functional import (
    CLT_MIN_TERMS,
    CLT_TOLERANCE,
    cell_statistics,
    choose_method,
    clt_sums,
    effective_terms,
    mc_first_order,
)

F64 = torch.float64
BINS = (0.0, 0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.3, math.inf)
NEFF_BINS = (1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, math.inf)


def random_configuration(gen: torch.Generator):
    d = round(math.exp(torch.empty(1, dtype=F64).uniform_(math.log(2), math.log(500), generator=gen).item()))
    if torch.rand(1, generator=gen).item() < 0.5:
        h = torch.full((d,), math.exp(torch.empty(1, dtype=F64).uniform_(math.log(0.5), math.log(8.0), generator=gen).item()), dtype=F64)
        grid = f"{h[0].item():.2g}"
    else:
        h = torch.exp(torch.empty(d, dtype=F64).uniform_(math.log(0.5), math.log(8.0), generator=gen))
        grid = "mixed"
    offset = torch.rand(d, dtype=F64, generator=gen) * h
    k = 2 * math.ceil(10.0 / h.min().item()) + 2
    u = offset[:, None] + (torch.arange(k, dtype=F64) - k // 2)[None, :] * h[:, None]
    u = torch.where(u.abs() > 10, torch.where(u > 0, math.inf, -math.inf), u)
    inf = torch.full((d, 1), math.inf, dtype=F64)
    stats = cell_statistics(torch.zeros(d, dtype=F64), torch.ones(d, dtype=F64), torch.cat([-inf, u, inf], 1))
    kind = ["gauss", "lognormal", "dominant"][int(torch.randint(0, 3, (1,), generator=gen))]
    w = torch.randn(4, d, dtype=F64, generator=gen)
    if kind == "lognormal":
        w = w * torch.exp(torch.randn(4, d, dtype=F64, generator=gen))
    elif kind == "dominant":
        w[:, 0] *= 3.0 * math.sqrt(d) ** 0.5
    return d, grid, kind, stats, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=400)
    ap.add_argument("--samples", type=int, default=40_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    t0 = time.perf_counter()
    for _ in range(args.configs):
        d, grid, kind, stats, w = random_configuration(gen)
        sums = clt_sums(w, stats.kappa, stats.m4)
        keep = sums.s2 > 0
        if not bool(keep.any()):
            continue
        pred = (sums.excess_kurtosis().abs() / 24.0)[keep]
        signed = (-sums.excess_kurtosis() / 24.0)[keep]
        clt = math.sqrt(2 / math.pi) * sums.s2.sqrt()[keep]
        mc, se = mc_first_order(w[keep], stats, args.samples, gen)
        err = clt / mc - 1.0
        neff = effective_terms(w[keep], stats.kappa)
        wk = w[keep]
        for i in range(int(keep.sum())):
            auto = choose_method(wk[i : i + 1], stats)
            rows.append((d, grid, kind, pred[i].item(), signed[i].item(), err[i].item(),
                         (se[i] / mc[i]).item(), neff[i].item(), auto))
    elapsed = time.perf_counter() - t0
    pred = np.array([r[3] for r in rows])
    signed = np.array([r[4] for r in rows])
    err = np.array([r[5] for r in rows])
    rse = np.array([r[6] for r in rows])
    neff = np.array([r[7] for r in rows])
    auto = np.array([r[8] for r in rows])
    print(f"{len(rows)} records in {args.configs} configurations, {args.samples} Monte Carlo draws each "
          f"({elapsed:.0f} s); CLT_TOLERANCE = {CLT_TOLERANCE}, CLT_MIN_TERMS = {CLT_MIN_TERMS:g}\n")
    print("err = Gaussian form / Monte Carlo - 1 (relative error of the Gaussian form); se = relative "
          "Monte Carlo standard error.\n")
    print("By the Edgeworth estimate (all records):\n")
    _table("predicted error \\|gamma\\|/24", BINS, pred, err, rse, signed)
    low = pred <= CLT_TOLERANCE
    print(f"\nBy the effective number of terms n_eff, records with \\|gamma\\|/24 <= {CLT_TOLERANCE}:\n")
    _table("n_eff", NEFF_BINS, neff[low], err[low], rse[low], signed[low])
    print()
    for label, used in (
        (f"Edgeworth only (\\|gamma\\|/24 <= {CLT_TOLERANCE})", low),
        (f"Edgeworth and n_eff >= {CLT_MIN_TERMS:g} (choose_method)", auto == "clt"),
    ):
        e = np.abs(err[used])
        print(f"* {label}: Gaussian form used for {used.sum()} of {len(rows)} records; |err| median "
              f"{np.median(e):.4f}, p99 {np.quantile(e, 0.99):.4f}, max {e.max():.4f}; max beyond 2 se "
              f"{max(np.max(e - 2 * rse[used]), 0.0):.4f}, beyond 3 se {max(np.max(e - 3 * rse[used]), 0.0):.4f}")
    # Does the first Edgeworth term predict the error where many terms contribute?
    sel = (pred < 0.1) & (neff >= CLT_MIN_TERMS)
    pe = -signed[sel] / (1.0 + signed[sel])  # clt/mc - 1 predicted from E|S| = sqrt(2/pi) sd (1 - gamma/24)
    slope = float(np.sum(err[sel] * pe) / np.sum(pe**2))
    resid = np.abs(err[sel] - pe)
    print(f"* n_eff >= {CLT_MIN_TERMS:g} and \\|gamma\\|/24 < 0.1: least-squares slope of the observed error on "
          f"the Edgeworth prediction {slope:.2f} (1 = exact); |err - prediction| median {np.median(resid):.4f}, "
          f"max {resid.max():.4f}")


def _table(name, bins, key, err, rse, signed) -> None:
    print(f"| {name} | records | median \\|err\\| | p90 \\|err\\| | max \\|err\\| | max (\\|err\\| - 2 se) | "
          "median MC se |")
    print("|---|---|---|---|---|---|---|")
    for lo, hi in itertools.pairwise(bins):
        sel = (key >= lo) & (key < hi)
        if not sel.any():
            continue
        e = np.abs(err[sel])
        excess = max(float(np.max(e - 2 * rse[sel])), 0.0)
        print(f"| [{lo:g}, {hi:g}) | {sel.sum()} | {np.median(e):.4f} | {np.quantile(e, 0.9):.4f} | "
              f"{e.max():.4f} | {excess:.4f} | {np.median(rse[sel]):.4f} |")


if __name__ == "__main__":
    main()
