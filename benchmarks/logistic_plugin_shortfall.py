"""Why the coverage trainings' plug-ins read below the truth: records, position, estimation.

    python benchmarks/logistic_plugin_shortfall.py [--trainings 300] [--settings 3]

For a coverage setting (``validate.COVERAGE_PLAN[N]``, ``--settings N``: 3 ``logistic d=2 n=1000``,
the default; 0 ``linear d=1 n=1000``, whose misses cov45b found) and the grids where the interval
missed, the first-order value (``ground_truth.oracle_first_order``: true ``Sigma`` and influence
``psi``) averaged over one training set's own records, at ``theta*`` (what the records' draw
alone gives) and at the fitted ``theta_hat`` (plus the grid's position about the fitted weights,
the plug-in's centre), relative to the cached 128-target truth; and the stored library plug-ins.
Two samples of training sets: the 12 of the coverage study (generator ``[7, d, n]``, as
``validate.coverage_study`` draws them; ``docs/figures/coverage_rows.json``) and ``--trainings``
fresh ones (their expectation). Also the unquantized value with the fitted model's own ``psi`` and
sandwich ``Sigma`` (the plug-in's estimation of ``w``) against the true parameters on 4 million
records. ~1 CPU min at 300 trainings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.special import expit, ndtr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import validate as V  # noqa: E402

from mis_lightning.groundtruth import compare as C  # noqa: E402
from mis_lightning.groundtruth import ground_truth as GT  # noqa: E402

GRIDS = ("step0.5sd/centre", "step0.5sd/quarter", "step0.5sd/boundary", "step1sd/boundary", "fixed0.05",
         "rtn_int8", "rtn_int4")
#: each model's cached coverage truths (validate.py --truth-cache)
TRUTH_CACHE = {"logistic": "truth_logistic_coupled.json", "linear": "truth_linear_exact.json"}


def unquantized(s: GT.Setting, w: np.ndarray) -> float:
    """Mean first-order unquantized leakage ``2 Phi(|w| / (2 sqrt n)) - 1`` of standardized influences ``w [k, d]``."""
    return float(np.mean(2 * ndtr(np.linalg.norm(w, axis=1) / (2 * np.sqrt(s.n))) - 1))


def fitted_w(s: GT.Setting, x: np.ndarray, y: np.ndarray, th: np.ndarray) -> np.ndarray:
    """Standardized influences of the fitted model: ``psi_i = H^-1 x_i (y_i - p_i)``, sandwich ``Sigma``
    (``p`` the fitted mean: ``expit(x theta)`` for the logistic model, ``x theta`` for least squares)."""
    eta = x @ th
    p, curv = (expit(eta), None) if s.model == "logistic" else (eta, np.ones_like(eta))
    curv = p * (1 - p) if curv is None else curv
    H = (x * curv[:, None]).T @ x / s.n
    psi = (x * (y - p)[:, None]) @ np.linalg.inv(H)
    return psi / np.sqrt(np.diag(psi.T @ psi / s.n))


def sample(s: GT.Setting, grids: list, rng: np.random.Generator, k: int) -> dict[str, np.ndarray]:
    out = {"at theta*": [], "at theta_hat": [], "unquantized, true": [], "unquantized, fitted": []}
    for _ in range(k):
        x, y = GT.draw_records(s, s.n, rng)
        th = C.fit(s, x, y)
        out["at theta*"].append([GT.oracle_first_order(s, g, x, y).mean() for g in grids])
        out["at theta_hat"].append([GT.oracle_first_order(s, g, x, y, center=th).mean() for g in grids])
        out["unquantized, true"].append(unquantized(s, GT.influence(s, x, y) / np.sqrt(np.diag(s.Sigma))))
        out["unquantized, fitted"].append(unquantized(s, fitted_w(s, x, y, th)))
    return {key: np.asarray(v) for key, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainings", type=int, default=300)
    ap.add_argument("--settings", type=int, default=3, help="index into validate.COVERAGE_PLAN")
    a = ap.parse_args(argv)
    model, d, n, rho, Z, M = V.COVERAGE_PLAN[a.settings]
    s = GT.make_setting(model, d, n, rho=rho)
    grids = [g for g in V.coverage_grids(s) if g.name in GRIDS]
    cache = json.loads((ROOT / "docs" / "figures" / TRUTH_CACHE[model]).read_text())
    key = V.coverage_key(s, Z, M)
    names = [g.name for g in V.coverage_grids(s)]
    truth = np.array([cache[key][names.index(g.name)] for g in grids])
    rows = {r["grid"]: r for r in json.loads((ROOT / "docs" / "figures" / "coverage_rows.json").read_text())["rows"]
            if r["setting"] == s.label()}
    lib = np.array([rows[g.name]["values"] for g in grids]).T  # [12, G]
    cov12 = sample(s, grids, np.random.default_rng([7, d, n]), lib.shape[0])
    fresh = sample(s, grids, np.random.default_rng([45, d, n]), a.trainings)
    xb, yb = GT.draw_records(s, 4_000_000, np.random.default_rng(12345))
    ref = unquantized(s, GT.influence(s, xb, yb) / np.sqrt(np.diag(s.Sigma)))

    def rel(v: np.ndarray, t) -> str:
        m, se = v.mean(0) / t - 1, v.std(0, ddof=1) / np.sqrt(v.shape[0]) / t
        return f"{m:+.2%} +- {se:.2%}"

    print(f"{s.label()}: mean over training sets, relative to the {Z}-target truth (+- se of the mean)")
    print(f"| grid | truth | 12 coverage sets: at theta* | at theta_hat | library plug-in | "
          f"{a.trainings} fresh sets: at theta* | at theta_hat |")
    print("|---|---|---|---|---|---|---|")
    for j, g in enumerate(grids):
        print(f"| {g.name} | {truth[j]:.5f} | {rel(cov12['at theta*'][:, j], truth[j])} | "
              f"{rel(cov12['at theta_hat'][:, j], truth[j])} | {rel(lib[:, j], truth[j])} | "
              f"{rel(fresh['at theta*'][:, j], truth[j])} | {rel(fresh['at theta_hat'][:, j], truth[j])} |")
    print(f"unquantized first-order value, true parameters, 4 million records: {ref:.6f}")
    for nm, smp in (("12 coverage sets", cov12), (f"{a.trainings} fresh sets", fresh)):
        print(f"  {nm}: true parameters on their records {rel(smp['unquantized, true'], ref)}, "
              f"fitted psi and sandwich Sigma {rel(smp['unquantized, fitted'], ref)}; "
              f"sd over sets {smp['unquantized, fitted'].std(ddof=1) / ref:.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
