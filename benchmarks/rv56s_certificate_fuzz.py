# ruff: noqa: B023 - the lambdas are called within their iteration
"""python benchmarks/rv56s_certificate_fuzz.py SEED TRIALS [--mild]. Fuzz cf56's certificate: factor models with wild scales; every certified form against an
80-digit mpmath reference. BAD = certified (finite) but off by more than FACTOR_FORM_RTOL."""

import sys

sys.path.insert(0, ".")
import mpmath as mp
import torch

import mis_lightning.functional.correlated as C
from mis_lightning.functional.correlated import RCOND, Correlation

F64 = torch.float64
mp.mp.dps = 80


def ref(L, res, k, rows):
    d, r = L.shape
    kk = [mp.mpf(x) for x in k.tolist()]
    D = [max(1 - kk[i] + kk[i] * mp.mpf(res[i].item()), mp.mpf(RCOND)) for i in range(d)]
    A = [[mp.sqrt(kk[i]) * mp.mpf(L[i, a].item()) for a in range(r)] for i in range(d)]
    M = mp.matrix(d, d)
    for i in range(d):
        for j in range(d):
            M[i, j] = (D[i] if i == j else 0) + mp.fsum(A[i][a] * A[j][a] for a in range(r))
    out = []
    for w in rows.tolist():
        u = mp.matrix([mp.sqrt(kk[i]) * mp.mpf(x) for i, x in enumerate(w)])
        out.append(float((u.T * mp.lu_solve(M, u))[0]))
    return torch.tensor(out, dtype=F64)


MILD = "--mild" in sys.argv  # scales 1e-2..1e3, remainders >= 1e-6 (a healthy model's)
ARGS = [a for a in sys.argv[1:] if a != "--mild"]
g = torch.Generator().manual_seed(int(ARGS[0]) if ARGS else 0)
U = lambda a, b, *s: a + (b - a) * torch.rand(*s, generator=g, dtype=F64)
stats = dict(forms=0, nan=0, bad=0, bad_off=0, worst=0.0)
trials = int(ARGS[1]) if len(ARGS) > 1 else 150
for t in range(trials):
    d = int(torch.randint(2, 16, (1,), generator=g))
    k = int(torch.randint(1, 6, (1,), generator=g))
    if MILD:
        L = torch.randn(d, k, generator=g, dtype=F64) * 10 ** U(-2, 3, d, 1) * 10 ** U(-1, 2, 1, k)
        res = 10 ** U(-6, 0, d)
    else:
        L = torch.randn(d, k, generator=g, dtype=F64) * 10 ** U(-3, 12, d, 1) * 10 ** U(-3, 6, 1, k)
        res = 10 ** U(-14, 0, d)
    kap = torch.ones(d, dtype=F64) if t % 3 == 0 else U(0.0, 1.0, d) ** 0.1
    z = torch.randn(k, 3, generator=g, dtype=F64)
    rows = (L @ z).T + torch.randn(3, d, generator=g, dtype=F64) * 10 ** U(-16, 0, 3, 1)
    if t % 4 == 1:
        rows = rows * 10 ** U(-6, 6, 1, d)
    c = Correlation(factor=L, residual=res)
    r = ref(L, res, kap, rows)
    for name, fn in (
        ("quad", lambda: c._factor_quadratic(rows, kap)),
        ("solve", lambda: c._certified_solve(rows * kap.sqrt(), kap)[1]),
    ):
        C.FACTOR_FORM_CHECK = True
        on = fn()
        C.FACTOR_FORM_CHECK = False
        off = fn()
        C.FACTOR_FORM_CHECK = True
        rel = ((on - r) / r).abs()
        rel_off = ((off - r) / r).abs()
        stats["forms"] += on.numel()
        stats["nan"] += int(on.isnan().sum())
        stats["nan_healthy"] = stats.get("nan_healthy", 0) + int((on.isnan() & (rel_off < 1e-6)).sum())
        b = on.isfinite() & (rel > 1e-4)
        stats["bad"] += int(b.sum())
        stats["bad_off"] += int((rel_off > 1e-4).sum())
        if bool(b.any()):
            print(
                "BAD",
                name,
                "d",
                d,
                "k",
                k,
                "t",
                t,
                "rel",
                rel[b].tolist(),
                "value",
                on[b].tolist(),
                "ref",
                r[b].tolist(),
            )
        fin = on.isfinite()
        if bool(fin.any()):
            stats["worst"] = max(stats["worst"], float(rel[fin].max()))
print(stats)
