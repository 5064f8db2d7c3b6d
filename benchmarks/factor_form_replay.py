"""The nu41b Transformer trial's wide factor-model forms (d > rank), replayed: the current
``Correlation._factor_quadratic`` against the path it replaced (wf42; docs/benchmarks.md, "wf42"),
which computed the Woodbury difference for every row, discarded the rows failing the cancellation
bound (on this model: all) and redid them by the refined ``[R, d]`` solve (``Correlation._solve``).

    python benchmarks/factor_form_replay.py               # the trial (~1 min), then 2 alternating replays
    python benchmarks/factor_form_replay.py --repeats 4

Runs ``benchmarks/nu41b_transformer_trial.py`` once (1 thread) recording the inputs of every
``_factor_quadratic`` call wider than its rank, then times both paths on each call, alternating
which runs first, in CPU seconds of the one thread (robust to a loaded machine); prints the largest
relative change of one record's form between the two and each path's distance from two refinement
steps (the float64 floor). Runtime: ~1-2 min.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mis_lightning.functional import correlated as C  # noqa: E402


def replaced_path(corr: C.Correlation, w: Tensor, kappa: Tensor) -> Tensor:
    """The path before wf42: the Woodbury difference on every row, the failing rows redone by the
    refined solve from scratch (its own factorization of the core)."""
    D = (1.0 - kappa + kappa * corr.residual).clamp_min(C.RCOND)
    L = corr.factor.to(torch.float64)
    KDinv = kappa / D
    chol = torch.linalg.cholesky(torch.eye(L.shape[1], dtype=L.dtype) + L.T @ (L * KDinv.unsqueeze(-1)))
    t = w * KDinv
    s = torch.linalg.vecdot(t, w)
    y = t @ L
    q = s - torch.linalg.vecdot(y, torch.cholesky_solve(y.T, chol).T)
    bad = ~(q * C.QUADRATIC_TOLERANCE >= s * torch.finfo(torch.float64).eps * math.sqrt(w.shape[1]))
    if bool(bad.any()):
        ub = w[bad] * kappa.sqrt()
        q[bad] = (ub * corr._solve(ub, kappa)).sum(-1)
    return q


def two_steps(corr: C.Correlation, w: Tensor, kappa: Tensor) -> Tensor:
    """``u'M^-1 u`` after two refinement steps of the solve (the reference)."""
    D, A, Dinv_A, solve_core = corr._woodbury(kappa)
    u = w * kappa.sqrt()

    def apply(r: Tensor) -> Tensor:
        return r / D - solve_core((r / D) @ A) @ Dinv_A.T

    x = apply(u)
    for _ in range(2):
        x = x + apply(u - (x * D + (x @ A) @ A.T))
    return torch.linalg.vecdot(u, x) + torch.linalg.vecdot(x, u - (x * D + (x @ A) @ A.T))


def capture() -> list[tuple[C.Correlation, Tensor, Tensor]]:
    calls: list[tuple[C.Correlation, Tensor, Tensor]] = []
    real = C.Correlation._factor_quadratic

    def recording(self: C.Correlation, w: Tensor, kappa: Tensor) -> Tensor:
        if self.factor.shape[0] > self.factor.shape[1]:
            calls.append((C.Correlation(factor=self.factor, residual=self.residual), w.clone(), kappa.clone()))
        return real(self, w, kappa)

    C.Correlation._factor_quadratic = recording
    try:
        import nu41b_transformer_trial
        nu41b_transformer_trial.main([])
    finally:
        C.Correlation._factor_quadratic = real
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    calls = capture()
    cpu = {"replaced": 0.0, "current": 0.0}
    change = far_replaced = far_current = 0.0
    for i, (corr, w, kappa) in enumerate(calls):
        out = {}
        for rep in range(a.repeats):
            order = ["replaced", "current"] if (i + rep) % 2 == 0 else ["current", "replaced"]
            for lab in order:
                fn = replaced_path if lab == "replaced" else C.Correlation._factor_quadratic
                t0 = time.thread_time()
                out[lab] = fn(corr, w, kappa)
                cpu[lab] += time.thread_time() - t0
        ref = two_steps(corr, w, kappa)
        change = max(change, float(((out["current"] - out["replaced"]) / out["replaced"]).abs().max()))
        far_replaced = max(far_replaced, float(((out["replaced"] - ref) / ref).abs().max()))
        far_current = max(far_current, float(((out["current"] - ref) / ref).abs().max()))
    print(f"{len(calls)} wide forms x {a.repeats}: replaced path {cpu['replaced']:.2f} CPU s, current "
          f"{cpu['current']:.2f} CPU s (ratio {cpu['current'] / cpu['replaced']:.2f})")
    print(f"one record's form, current vs replaced: max {change:.1e} relative; against two refinement "
          f"steps: replaced {far_replaced:.1e}, current {far_current:.1e}")


if __name__ == "__main__":
    main()
