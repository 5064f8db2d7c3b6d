"""How close the eager fused cell-moment kernel comes to its self-check's tolerance, on every
element of random affine-grid chunks (not the check's sample): is a self-check failure on a
real input, which would disable the fused path for the process (``fastpath.GUARD``), in reach?

Each chunk (seeded): ``TABLE_MIN_ELEMENTS`` plus up to 5,000 elements of a random int2-int8
grid, signed or unsigned with per-element zero points, scales log-uniform in [1e-4, 1], weights
uniform over the code range widened by 3 cells each side (5% at cell centres), steps
``h = scale / sd`` log-uniform in [1e-3, 200]; codes given to the kernel or not, ``kappa_only``
or not. Odd seeds add the edge inputs: point masses (``h`` infinite), ``h`` up to 1e8, ``h``
within 1e-9 of the regime borders 0.5 and 19, weights at cell centres and at the clamped ends.
Printed per chunk and overall: the largest ``|fused - reference| / allowed`` of kappa, lam, m4
(``fastpath.allowed`` with ``fastpath.APPROXIMATION``: 1 would fail the check) and any path
the call's own self-check disabled. Exit status 1 when a margin reaches 1 or a path is disabled.

    python benchmarks/fused_check_margins.py --seeds 0 40
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mis_lightning.functional.affine as A  # noqa: E402
from mis_lightning.functional import CompilePolicy  # noqa: E402
from mis_lightning.functional.fastpath import APPROXIMATION, GUARD, MOMENTS, allowed  # noqa: E402

F64 = torch.float64


def chunk(seed: int) -> tuple[tuple, torch.Tensor | None, bool, str]:
    """``(affine_cell_moments args, code, kappa_only, description)`` of chunk ``seed``."""
    g = torch.Generator().manual_seed(seed)
    c = A.TABLE_MIN_ELEMENTS + int(torch.randint(0, 5000, (1,), generator=g))
    bits = int(torch.randint(2, 9, (1,), generator=g))
    signed = bool(torch.rand(1, generator=g) < 0.5)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    s = torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1e-4), 0.0, generator=g))
    zp = torch.zeros(c, dtype=F64) if signed else torch.randint(qmin, qmax + 1, (c,), generator=g).double()
    lo, hi = (qmin - 3 - zp) * s, (qmax + 3 - zp) * s
    th = lo + (hi - lo) * torch.rand(c, generator=g, dtype=F64)
    th = torch.where(torch.rand(c, generator=g) < 0.05, (torch.round(th / s) + 0.5) * s, th)
    h = torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1e-3), math.log(200.0), generator=g))
    if seed % 2:
        pick = torch.randint(0, 6, (c,), generator=g)
        wobble = 1 + 1e-9 * torch.randn(c, generator=g, dtype=F64)
        h = torch.where(pick == 0, math.inf, h)
        h = torch.where(pick == 1, torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(100), math.log(1e8), generator=g)), h)
        h = torch.where(pick == 2, 0.5 * wobble, h)
        h = torch.where(pick == 3, 19.0 * wobble, h)
        th = torch.where(pick == 4, (torch.round(th / s) + 0.5) * s, th)
        th = torch.where(pick == 5, ((qmin - zp) + torch.randint(-2, 3, (c,), generator=g)) * s, th)
    given = bool(torch.rand(1, generator=g) < 0.5)
    code = torch.clamp(torch.round(th / s + zp), qmin, qmax) if given else None
    kappa_only = bool(torch.rand(1, generator=g) < 0.3)
    what = f"seed {seed}: {c} elements, {'' if signed else 'u'}int{bits}, codes {'given' if given else 'computed'}" \
           f"{', kappa only' if kappa_only else ''}{', edge inputs' if seed % 2 else ''}"
    return (th, s / h, s, zp, qmin, qmax), code, kappa_only, what


def margins(fast: tuple, ref: tuple, h: torch.Tensor) -> dict[str, float]:
    out = {}
    for name, f, r in zip(MOMENTS, fast, ref):
        same = (f == r) | (torch.isnan(f) & torch.isnan(r))
        q = torch.where(same, torch.zeros_like(f), (f - r).abs() / allowed(name, r, h, APPROXIMATION))
        out[name] = float(q.nan_to_num(nan=math.inf).max())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=(0, 40), metavar=("FIRST", "END"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    worst = dict.fromkeys(MOMENTS, 0.0)
    bad = 0
    for seed in range(*args.seeds):
        a, code, kappa_only, what = chunk(seed)
        GUARD.reset()  # each chunk gets the first-use check
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # listed below instead
            out = A.affine_cell_moments(*a, code=code, compile_policy=CompilePolicy("never"), kappa_only=kappa_only)
        ref = A.affine_reference_moments(*a, code=code)
        fast = (out.kappa, ref.mean_abs, ref.m4) if kappa_only else (out.kappa, out.mean_abs, out.m4)
        m = margins(fast, (ref.kappa, ref.mean_abs, ref.m4), a[2] / a[1])
        worst = {k: max(worst[k], v) for k, v in m.items()}
        off = sorted(GUARD.disabled)
        bad += bool(off) or max(m.values()) >= 1
        print(f"{what}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()) + (f"; DISABLED {off}" if off else ""),
              flush=True)
    print("worst margin over all chunks: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items())
          + f"; {bad} chunk(s) failing")
    GUARD.reset()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
