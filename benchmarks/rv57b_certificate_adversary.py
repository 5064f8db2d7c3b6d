"""Adversarial fuzz of the factor forms' certificates and the Monte Carlo weights (docs/benchmarks.md, "rv57b").

    OMP_NUM_THREADS=1 python benchmarks/rv57b_certificate_adversary.py KIND SEED TRIALS

``KIND``: ``wild`` (cf57's / rv56s's wild factor models, ``benchmarks/cf57_certificate_reach.py``),
``narrow`` (the same scales with ``k >= d``: every block narrow, the residual bound's path),
``cancel`` (rows exactly in the loadings' span, loadings 1e6..1e14 over remainders 1e-14..1e-2: ``u - At``
cancels past float64, the compensated paths; ``wide``: ``d`` 60-99 and loadings 1e1..1e9, where the residual's rounding estimate
``eps sqrt(n)`` per sum, not the worst case ``n eps``, is read), ``zeros`` (wild models with some ``kappa`` exactly 0 and
some 1), ``perp`` (rows ``u = D z`` with ``z`` orthogonal to the loadings, two or more of them
nearly parallel and 1e4..1e14 over remainders 1e-14..1: ``M z = D z``, ``A'x`` cancels to 0 and the
core's residual ``rho`` is all rounding, in ``C``'s weak directions). Each trial's forms (``Correlation._factor_quadratic``, ``_certified_solve``'s ``v'M^-1v``)
against an 80-digit LU solve of ``M = diag(D) + AA'``, and the Monte Carlo weights
(``Correlation.coefficients``) by their error in ``M``'s norm relative to ``sqrt(u'M^-1u)`` (the claim:
within ``FACTOR_FORM_RTOL / 2`` or NaN). Prints, per kind: forms, NaN, certified but off by more than
``FACTOR_FORM_RTOL`` (a defect), worst certified error; weights' rows, NaN rows, rows off by more than
``FACTOR_FORM_RTOL / 2`` (the claim's breach), worst; exceptions raised.
"""

from __future__ import annotations

import argparse
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import mpmath as mp  # noqa: E402
import torch  # noqa: E402
from cf57_certificate_reach import _mp_inverse, wild_model  # noqa: E402

import mis_lightning.functional.correlated as C  # noqa: E402
from mis_lightning.functional.correlated import Correlation  # noqa: E402

F64 = torch.float64
mp.mp.dps = 80


def model(kind: str, g: torch.Generator, t: int):
    if kind in ("cancel", "wide"):
        def U(a, b, *s):
            return a + (b - a) * torch.rand(*s, generator=g, dtype=F64)
        d = int(torch.randint(2, 16, (1,), generator=g)) if kind == "cancel" else int(torch.randint(60, 100, (1,), generator=g))
        k = int(torch.randint(1, 6, (1,), generator=g))
        lo, hi = (6, 14) if kind == "cancel" else (1, 9)
        L = torch.randn(d, k, generator=g, dtype=F64) * 10 ** U(lo, hi, d, 1)
        res = 10 ** U(-14, -2, d)
        kap = torch.ones(d, dtype=F64) if t % 2 == 0 else U(0.0, 1.0, d) ** 0.1
        rows = (L @ torch.randn(k, 3, generator=g, dtype=F64)).T
        return L, res, kap, rows
    if kind == "perp":
        def U(a, b, *s):
            return a + (b - a) * torch.rand(*s, generator=g, dtype=F64)
        d = int(torch.randint(3, 16, (1,), generator=g))
        k = int(torch.randint(2, min(d - 1, 5) + 1, (1,), generator=g))
        a = torch.randn(d, 1, generator=g, dtype=F64)
        L = (a + 10 ** float(U(-12, -4, 1)) * torch.randn(d, k, generator=g, dtype=F64)) * 10 ** float(U(4, 14, 1))
        res = 10 ** U(-14, 0, d)
        kap = torch.ones(d, dtype=F64) if t % 2 == 0 else U(0.0, 1.0, d) ** 0.1
        A = kap.sqrt().unsqueeze(-1) * L
        D = (1 - kap + kap * res).clamp_min(C.RCOND)
        z = torch.randn(3, d, generator=g, dtype=F64)
        Q = torch.linalg.qr(A)[0]
        z = z - (z @ Q) @ Q.T  # orthogonal to A's columns: M z = D z, A'z cancels
        rows = torch.where(kap.sqrt() > 0, D * z / kap.sqrt(), torch.zeros_like(z))
        return L, res, kap, rows
    L, res, kap, rows = wild_model(g, t, False)
    if kind == "narrow" and L.shape[1] < L.shape[0]:
        d = L.shape[0]
        extra = torch.randn(d, d - L.shape[1], generator=g, dtype=F64) * L.abs().max(1, keepdim=True).values
        L = torch.cat([L, extra * 10 ** (-6 * torch.rand(1, d - L.shape[1], generator=g, dtype=F64))], 1)
    if kind == "zeros":
        pick = torch.rand(kap.shape, generator=g, dtype=F64)
        kap = torch.where(pick < 0.3, torch.zeros_like(kap), torch.where(pick > 0.7, torch.ones_like(kap), kap))
    return L, res, kap, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["wild", "narrow", "cancel", "wide", "zeros", "perp"])
    p.add_argument("seed", type=int)
    p.add_argument("trials", type=int)
    a = p.parse_args()
    g = torch.Generator().manual_seed(a.seed)
    f = dict(forms=0, nan=0, bad=0, worst=0.0)
    w = dict(rows=0, nan=0, bad=0, worst=0.0)
    crash = 0
    for t in range(a.trials):
        L, res, kap, rows = model(a.kind, g, t)
        c = Correlation(factor=L, residual=res)
        Minv, kh, M = _mp_inverse(c, kap)
        us = [mp.matrix([kh[i] * mp.mpf(x) for i, x in enumerate(r)]) for r in rows.tolist()]
        ys = [Minv * u for u in us]
        ref = torch.tensor([float((u.T * y)[0]) for u, y in zip(us, ys)], dtype=F64)
        for fn in (lambda: c._factor_quadratic(rows, kap), lambda: c._certified_solve(rows * kap.sqrt(), kap)[1]):  # noqa: B023
            f["forms"] += rows.shape[0]
            try:
                q = fn()
            except Exception as e:  # noqa: BLE001 - counted
                crash += 1
                print(f"trial {t} {L.shape}: {type(e).__name__}: {e}")
                continue
            f["nan"] += int(q.isnan().sum())
            fin = q.isfinite() & (ref > 0)
            rel = ((q - ref) / ref).abs()
            nbad = int((fin & (rel > C.FACTOR_FORM_RTOL)).sum())
            if nbad:
                print(f"DEFECT trial {t} d,k {tuple(L.shape)}: form {q.tolist()} reference {ref.tolist()}")
            f["bad"] += nbad
            if bool(fin.any()):
                f["worst"] = max(f["worst"], float(rel[fin].max()))
        try:
            coef = c.coefficients(rows, kap)
        except Exception as e:  # noqa: BLE001 - counted
            crash += 1
            print(f"trial {t} coefficients: {type(e).__name__}: {e}")
            continue
        for i in range(rows.shape[0]):
            w["rows"] += 1
            if bool(coef[i].isnan().any()):
                w["nan"] += 1
                continue
            q = (us[i].T * ys[i])[0]
            if q == 0:
                continue
            e = mp.matrix([kh[j] * mp.mpf(coef[i, j].item()) - ys[i][j] for j in range(len(kh))])
            err = float(mp.sqrt((e.T * M * e)[0] / q))
            if err > C.FACTOR_FORM_RTOL / 2:
                w["bad"] += 1
                print(f"WEIGHTS trial {t} d,k {tuple(L.shape)} row {i}: error {err:.3g}")
            w["worst"] = max(w["worst"], err)
    print(f"{a.kind} seed {a.seed} trials {a.trials}: forms {f['forms']}, NaN {f['nan']}, certified but off > "
          f"{C.FACTOR_FORM_RTOL:g}: {f['bad']}, worst {f['worst']:.2g}; weights rows {w['rows']}, NaN {w['nan']}, "
          f"off > {C.FACTOR_FORM_RTOL / 2:g}: {w['bad']}, worst {w['worst']:.2g}; exceptions {crash}")


if __name__ == "__main__":
    main()
