"""fx50: the affine grids' fine elements, ``kernel.EXACT_AFFINE_MEAN_ABS`` (``E|m|`` exact from the
nearest edge) and ``kernel.FINE_M4_H4`` (the ``m4`` expansion's ``+7 h^4/80``), on against off.

    python benchmarks/affine_fine_moments.py accuracy   # worst errors against mpmath sums
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/affine_fine_moments.py speed

``accuracy``: per grid and step ``h`` (sd units), the worst ``|mean_abs - exact|`` over the cases of
``tests/test_affine_fine_mean_abs.py`` (positions in the cell, clamped ends, weights outside their
code's cell; 40-digit sums over every cell within 12 sd) on the public path and the eager fused
kernel, switch off / on; and the ``m4`` expansion's error at positions 0 / 0.3 / 0.5 of the cell
(30-digit sums), without / with the term. ``speed``: CPU seconds of ``affine_cell_moments`` on
2^18-element chunks through the eager fused kernel (int8 with sd 4-8 steps: fine, far from the
ends; int4 with sd 20-40 steps: fine, the clamped ends in reach), both switches on vs off,
alternating over 12 rounds, medians.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_affine_fine_mean_abs as T  # noqa: E402 - the test's cases and mpmath sums

from mis_lightning.functional import affine as A  # noqa: E402
from mis_lightning.functional import fastpath as fp  # noqa: E402
from mis_lightning.functional import kernel as K  # noqa: E402

F64 = torch.float64


def _mean_abs(grid: str, h: float, fused: bool) -> float:
    qmin, qmax, s, zp = T.GRIDS[grid]
    cases = T._cases(grid, h)
    th, sd, code = T._tensors(cases)
    want = torch.tensor([T._exact_mean_abs(t, d, s, zp, qmin, qmax) for t, d, _ in cases], dtype=F64)
    args = [th, sd, torch.full_like(th, s), torch.full_like(th, zp)]
    n = th.numel()
    if fused:
        reps = -(-A.TABLE_MIN_ELEMENTS // n)
        args, code = [t.repeat(reps) for t in args], code.repeat(reps)
    got = A.affine_cell_moments(*args, qmin, qmax, code, compile_policy=K.CompilePolicy("never")).mean_abs[:n]
    return float((got - want).abs().max())


def accuracy() -> None:
    fp.GUARD.sample_size = lambda *a, **k: 0  # each path's own numbers
    print("| grid | h | public off | public on | fused eager off | fused eager on |")
    print("|---|---|---|---|---|---|")
    for grid in sorted(T.GRIDS):
        for h in (0.01, 0.1, 0.3, 0.45, 0.5):
            row = []
            for fused in (False, True):
                for flag in (False, True):
                    K.EXACT_AFFINE_MEAN_ABS = flag
                    row.append(f"{_mean_abs(grid, h, fused):.2e}")
            print(f"| {grid} | {h} | " + " | ".join(row) + " |")
    K.EXACT_AFFINE_MEAN_ABS = True
    print()
    print("| h | m4 error without the term | / h^4 | with it | / h^6 |")
    print("|---|---|---|---|---|")
    for h in (0.5, 0.4, 0.3, 0.2, 0.1, 0.05):
        ex = max((T._exact_m4(h, f) for f in (0.0, 0.3, 0.5)), key=lambda v: abs(v - 3.0))
        old = 3.0 - h * h / 2
        new = old + 7 * h**4 / 80
        print(f"| {h} | {old - ex:+.3e} | {(old - ex) / h**4:+.4f} | {new - ex:+.3e} | {(new - ex) / h**6:+.4f} |")


def speed(rounds: int = 12) -> None:
    fp.GUARD.sample_size = lambda *a, **k: 0
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    c = 1 << 18
    for name, (qmin, qmax, sdmul) in {"int8, sd 4-8 steps": (-128, 127, 4.0),
                                      "int4, sd 20-40 steps (ends in reach)": (-8, 7, 20.0)}.items():
        s = torch.full((c,), 0.01, dtype=F64)
        th = torch.randn(c, generator=g, dtype=F64) * 0.3 * (qmax * 0.01)
        sg = s * sdmul * (1 + torch.rand(c, generator=g, dtype=F64))
        zp = torch.zeros(c, dtype=F64)
        pol = K.CompilePolicy("never")

        def run(a=(th, sg, s, zp, qmin, qmax), pol=pol) -> float:
            t = time.process_time()
            A.affine_cell_moments(*a, compile_policy=pol)
            return time.process_time() - t

        run(), run()
        res: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            for flag in ((True, False) if r % 2 == 0 else (False, True)):
                K.EXACT_AFFINE_MEAN_ABS = K.FINE_M4_H4 = flag
                res[flag].append(run())
        K.EXACT_AFFINE_MEAN_ABS = K.FINE_M4_H4 = True
        med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
        print(f"{name}: off {med[False] * 1e3:.1f} ms, on {med[True] * 1e3:.1f} ms a chunk, "
              f"on/off {med[True] / med[False]:.3f} ({(med[True] - med[False]) * 1e9 / c:+.1f} ns an element)")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "accuracy"
    {"accuracy": accuracy, "speed": speed}[what]()
