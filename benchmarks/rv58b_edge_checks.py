"""Edge checks of the session's numeric changes (docs/benchmarks.md, "rv58b").

    OMP_NUM_THREADS=1 python benchmarks/rv58b_edge_checks.py fine
    OMP_NUM_THREADS=1 python benchmarks/rv58b_edge_checks.py box

``fine``: affine grids bounded by the release (int4 symmetric, int4 with zero point 7.3, int8), a bound
an ulp either side of every inner grid edge (lower or upper), seven weights around the edge on a step
of 1/3 sd: each cell form's ``kappa`` (``ParamGrid.element_moments``, ``bounds.FUSED_FINE_MOMENTS``
off: the two-step form; on: the one-pass form where it applies) against exact cell sums
(``tests/test_fine_moments.py::_exact``): the largest error and how many exceed 1e-3 (the fine
expansion's own error is at most ``5e-4 h^2`` = 5.6e-5 here).

``box``: in-sample factor models (``RecordCorrelation.in_sample``, 64 / 50 / 40 records, d 10-39,
rank 3-8 plus noise, some with one column 1e4 times the rest or a few records 30 times the rest):
over 4 kappa boxes each, the largest excursion of 60 sampled points' Gaussian forms beyond
``gaussian_ends`` (relative), a one-point box against the form there (bitwise), and the ends'
relative width on a box one ulp wide (the relaxation's slack: the form barely moves).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

F64 = torch.float64


def fine() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_fine_moments import _exact, _moments  # noqa: PLC0415

    from mis_lightning.quantization.base import ParamGrid
    for qmin, qmax, zp, s in [(-8, 7, 0.0, 0.1), (0, 15, 7.3, 0.1), (-128, 127, 0.0, 0.0123)]:
        edges = [(k + 0.5 - zp) * s for k in range(qmin, qmax)]
        sd, n = 3.0 * s, 7
        g = ParamGrid(name="w", shape=(1, n), kind="affine", dequantized=torch.zeros(1, n), bits_per_weight=4.0,
                      scale=torch.tensor([[s]], dtype=F64), block_size=(1, n),
                      zero_point=torch.tensor([[zp]], dtype=F64), qmin=qmin, qmax=qmax)
        for fused in (False, True):
            worst, bad, total = 0.0, 0, 0
            for i in range(1, len(edges) - 1):
                for lower in (True, False):
                    for toward in (-math.inf, math.inf):
                        v = math.nextafter(edges[i], toward)
                        lo, hi = ((v, min(edges[-1] + 0.3 * s, v + 8.0 * sd)) if lower
                                  else (max(edges[0] - 0.3 * s, v - 8.0 * sd), v))
                        g.support = (torch.tensor([[lo]], dtype=F64), torch.tensor([[hi]], dtype=F64))
                        th = torch.tensor([edges[i] + (j - 3) * 0.7 * sd for j in range(n)], dtype=F64)
                        got = _moments(g, th, torch.full((n,), sd, dtype=F64), False, fused=fused).kappa
                        for j in range(n):
                            err = abs(float(got[j]) - _exact(float(th[j]), sd, s, zp, qmin, qmax, lo, hi)[0])
                            worst, bad, total = max(worst, err), bad + (err > 1e-3), total + 1
            print(f"grid [{qmin}, {qmax}] zp {zp}: {'one-pass' if fused else 'two-step'} form: largest |kappa - exact| "
                  f"{worst:.3g}, {bad} of {total} above 1e-3")


def box() -> None:
    from mis_lightning.functional.correlated import RecordCorrelation
    worst, viol, widths, points = 0.0, 0, [], 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        R, d, r = [(64, 20, 4), (50, 10, 8), (40, 39, 5)][seed % 3]
        W = torch.randn(R, r, dtype=F64, generator=g) @ torch.randn(r, d, dtype=F64, generator=g)
        W = W + 0.3 * torch.randn(R, d, dtype=F64, generator=g)
        if seed % 4 == 0:
            W[:, 0] *= 1e4
        if seed % 4 == 1:
            W[:3] *= 30
        rc = RecordCorrelation.in_sample(W)
        if rc is None:
            continue
        for b in range(4):
            k_lo = torch.rand(d, dtype=F64, generator=g) * 0.6
            k_hi = (k_lo + torch.rand(d, dtype=F64, generator=g) * 0.6).clamp(max=1.0)
            if b == 1:
                k_hi[:5], k_lo[:3] = 1.0, 0.0
            lo, hi = rc.gaussian_ends(W, k_lo, k_hi)
            for i in range(60):
                kk = (torch.where(torch.rand(d, generator=g) < 0.5, k_hi, k_lo) if i % 2 else
                      k_lo + (k_hi - k_lo) * torch.rand(d, dtype=F64, generator=g))
                f = rc.gaussian_mean_abs(W, kk)
                m = float(torch.maximum(lo - f, f - hi).max() / f.abs().max())
                worst, viol = max(worst, m), viol + (m > 1e-12)
            f = rc.gaussian_mean_abs(W, k_lo)
            a, z = rc.gaussian_ends(W, k_lo, k_lo)
            points += int(torch.equal(a, f) and torch.equal(z, f))
            a, z = rc.gaussian_ends(W, k_lo, torch.nextafter(k_lo, torch.ones_like(k_lo)))
            widths.append(float(((z - a) / f).max()))
    print(f"{len(widths)} boxes: largest excursion beyond the ends {worst:.3g} ({viol} sampled points above 1e-12); "
          f"one-point boxes equal to the form {points} of {len(widths)}; ends' relative width on a box one ulp wide: "
          f"median {sorted(widths)[len(widths) // 2]:.3g}, largest {max(widths):.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["fine", "box"])
    {"fine": fine, "box": box}[ap.parse_args().mode]()


if __name__ == "__main__":
    main()
