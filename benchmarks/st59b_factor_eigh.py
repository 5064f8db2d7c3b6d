"""The factor models' eigen-directions from the smaller second-moment matrix, against the Gram alone.

``Correlation.from_influences`` (Tyler's reweightings, then the final fit: ``TYLER_ITERATIONS + 1``
calls of ``_factor_fit`` per fold; the diagonal estimator's variance-inflation check and the
cross-fitted headline fit two folds) and ``RecordCorrelation.in_sample`` read the eigen-directions of
``W'W / m`` for ``W [m, d]``. They took them from the Gram ``W W' / m [m, m]``, an ``O(m^3)`` eigh
even at ``d = 9``; ``correlated._second_moment_eigh`` takes the ``[d, d]`` matrix where ``d < m``
(same nonzero spectrum). ``compare`` fits each case both ways (the Gram path forced by
monkeypatching the helper, as tests/test_correlated.py's reference does), alternating over
``--rounds``, and prints the process CPU seconds per fit and the largest relative difference of the
models (``L L' + diag(residual)``) and of every record's quadratic form::

    python benchmarks/st59b_factor_eigh.py compare --rounds 3
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from mis_lightning.functional import correlated as C

CASES = ((500, 9, "records of 9 weights, a per-record scale"), (1000, 40, "a 3-factor correlation"),
         (512, 100, "a per-record scale"), (2048, 100, "a per-record scale"))


def _gram_only(X: torch.Tensor):
    n = X.shape[0]
    evals, U = torch.linalg.eigh(X @ X.T / n)
    return evals, lambda keep: X.T @ U[:, keep] / (math.sqrt(n) * evals[keep].clamp_min(0.0).sqrt())


def _influences(m: int, d: int, what: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(m + d)
    W = torch.randn(m, d, dtype=torch.float64, generator=g)
    if "factor" in what:
        return torch.randn(m, 3, dtype=torch.float64, generator=g) @ torch.randn(3, d, dtype=torch.float64, generator=g) + 0.3 * W
    return W * torch.randn(m, 1, dtype=torch.float64, generator=g).abs()


def _fits(W: torch.Tensor) -> list[C.Correlation]:
    return [C.Correlation.from_influences(W, 64), C.RecordCorrelation.in_sample(W).parts[0][1]]


def compare(rounds: int) -> None:
    torch.set_num_threads(1)
    real = C._second_moment_eigh
    print("records m, weights d | CPU s per fit (from_influences + in_sample): Gram / smaller | "
          "largest rel. difference: models / quadratic forms")
    for m, d, what in CASES:
        W = _influences(m, d, what)
        cpu = {"gram": [], "smaller": []}
        for _ in range(rounds):
            for way in ("gram", "smaller"):
                C._second_moment_eigh = _gram_only if way == "gram" else real
                try:
                    t = time.process_time()
                    fits = _fits(W)
                    cpu[way].append(time.process_time() - t)
                finally:
                    C._second_moment_eigh = real
                if way == "gram":
                    ref = fits
        model = form = 0.0
        for a, b in zip(fits, ref):
            Sa = a.factor @ a.factor.T + torch.diag(a.residual)
            Sb = b.factor @ b.factor.T + torch.diag(b.residual)
            model = max(model, float((Sa - Sb).abs().max() / Sb.abs().max()))
            qa, qb = a.quadratic(W), b.quadratic(W)
            form = max(form, float(((qa - qb) / qb).abs().max()))
        print(f"{m:5d}, {d:4d} ({what}) | " + " / ".join(" ".join(f"{s:.3f}" for s in cpu[w]) for w in ("gram", "smaller"))
              + f" | {model:.1e} / {form:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["compare"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    compare(args.rounds)


if __name__ == "__main__":
    main()
