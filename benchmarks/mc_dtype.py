"""The Monte Carlo forms in float32 against float64 (``functional.leakage.MC_DTYPE``): time and
agreement of ``correlated_mc_mean_abs`` (jointly drawn cells, control variate) and
``mc_first_order`` (independent cells plus a Gaussian remainder), in one process.

Each form runs on the same inputs with ``MC_DTYPE`` set to float32 (the library's choice) and
to float64 (before), ``--repeats`` times each, alternating. The inputs mimic the default
ChEMBL job's Monte Carlo regime (two factor-model folds of 256 records, d = 57 weights of which
47 on coarse grids, 32,768 draws); ``--records``/``--d``/``--coarse``/``--draws`` change them.
Agreement is reported in units of the float64 run's own standard error: the two dtypes draw
different random streams, so they agree within Monte Carlo error, not bit for bit.

    python benchmarks/mc_dtype.py
    python benchmarks/mc_dtype.py --records 2048 --d 200 --coarse 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--d", type=int, default=57)
    ap.add_argument("--coarse", type=int, default=47)
    ap.add_argument("--draws", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from mis_lightning.functional import cell_statistics, correlated, leakage

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    R, d, c = args.records, args.d, args.coarse
    # influences with a few dominant coordinates per record (the Monte Carlo regime)
    w = torch.randn(R, d, dtype=torch.float64, generator=g) * torch.rand(d, dtype=torch.float64, generator=g) ** 2
    A = torch.randn(2 * d, d, dtype=torch.float64, generator=g)
    cov = A.T @ A / (2 * d) + 0.2 * torch.eye(d, dtype=torch.float64)
    corr = correlated.Correlation(full=correlated.correlation_from_covariance(cov))
    theta = torch.randn(d, dtype=torch.float64, generator=g)
    step = torch.where(torch.arange(d) < c, torch.full((d,), 2.0, dtype=torch.float64),
                       torch.full((d,), 0.1, dtype=torch.float64))
    edges = torch.stack([torch.arange(-40, 41, dtype=torch.float64) * s + 0.5 * s for s in step.tolist()])
    edges[:, 0], edges[:, -1] = -torch.inf, torch.inf  # the outer cells take the tails
    stats = cell_statistics(theta, torch.ones(d, dtype=torch.float64), edges)
    idx = torch.arange(c)
    coarse_stats = stats.select(0, c)
    gauss = (w[:, c:].square() * stats.kappa[c:]).sum(-1)

    def run(form: str) -> tuple[float, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        t = time.perf_counter()
        if form == "correlated":
            m, se = correlated.correlated_mc_mean_abs(corr, w, stats.kappa, idx, coarse_stats, args.draws, gen)
        else:
            m, se = leakage.mc_first_order(w[:, :c], coarse_stats, args.draws, gen, gaussian_s2=gauss)
        return time.perf_counter() - t, m, se

    rows = []
    for form in ("correlated", "independent"):
        times: dict[str, list[float]] = {"float32": [], "float64": []}
        out = {}
        for _ in range(args.repeats):
            for name, dt in (("float32", torch.float32), ("float64", torch.float64)):
                leakage.MC_DTYPE = correlated.MC_DTYPE = dt
                s, m, se = run(form)
                times[name].append(s)
                out[name] = (m, se)
        leakage.MC_DTYPE = correlated.MC_DTYPE = torch.float32
        (m32, se32), (m64, se64) = out["float32"], out["float64"]
        z = ((m32 - m64) / (se32.square() + se64.square()).sqrt().clamp_min(1e-300)).abs()
        row = {"form": form, "records": R, "d": d, "coarse": c, "draws": args.draws,
               "float64_s": statistics.median(times["float64"]), "float32_s": statistics.median(times["float32"]),
               "mean_float64": float(m64.mean()), "mean_float32": float(m32.mean()),
               "relative_difference_of_means": float((m32.mean() - m64.mean()) / m64.mean()),
               "relative_se_float64": float((se64 / m64).mean()),
               "max_abs_z_per_record": float(z.max()), "mean_abs_z_per_record": float(z.mean())}
        row["speedup"] = row["float64_s"] / row["float32_s"]
        rows.append(row)
        print(f"{form:11s} float64 {row['float64_s']:.3f} s  float32 {row['float32_s']:.3f} s  "
              f"speed-up {row['speedup']:.2f}x  means {row['mean_float64']:.6g} / {row['mean_float32']:.6g} "
              f"(rel. diff {row['relative_difference_of_means']:+.2e}, rel. SE {row['relative_se_float64']:.1e}); "
              f"|z| per record mean {row['mean_abs_z_per_record']:.2f} max {row['max_abs_z_per_record']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
