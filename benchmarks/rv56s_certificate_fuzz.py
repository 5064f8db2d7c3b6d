# ruff: noqa: B023 - the lambdas are called within their iteration
"""python benchmarks/rv56s_certificate_fuzz.py SEED TRIALS [--mild]. Fuzz cf56's certificate: factor models with wild scales; every certified form against an
80-digit mpmath reference. BAD = certified (finite) but off by more than FACTOR_FORM_RTOL."""

import sys

sys.path.insert(0, ".")
import mpmath as mp
import torch

sys.path.insert(0, "benchmarks")
from cf57_certificate_reach import reference, wild_model  # noqa: E402 - the models and reference cf57 counts too

import mis_lightning.functional.correlated as C
from mis_lightning.functional.correlated import Correlation

F64 = torch.float64
mp.mp.dps = 80


def ref(L, res, k, rows):
    return reference(L, res, k, rows)  # the 80-digit LU solve of M (cf57's script: one copy)


MILD = "--mild" in sys.argv  # scales 1e-2..1e3, remainders >= 1e-6 (a healthy model's)
ARGS = [a for a in sys.argv[1:] if a != "--mild"]
g = torch.Generator().manual_seed(int(ARGS[0]) if ARGS else 0)
stats = dict(forms=0, nan=0, bad=0, bad_off=0, worst=0.0)
trials = int(ARGS[1]) if len(ARGS) > 1 else 150
for t in range(trials):
    L, res, kap, rows = wild_model(g, t, MILD)
    d, k = L.shape
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
