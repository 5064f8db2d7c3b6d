# ruff: noqa: B023 - the lambdas are called within their iteration
"""Where the factor forms' certificate reads NaN, by the condition of ``M`` (docs/benchmarks.md, "cf57").

    OMP_NUM_THREADS=1 python benchmarks/cf57_certificate_reach.py fuzz SEED TRIALS [--mild]
    OMP_NUM_THREADS=1 python benchmarks/cf57_certificate_reach.py narrow
    OMP_NUM_THREADS=1 python benchmarks/cf57_certificate_reach.py cancel
    OMP_NUM_THREADS=1 python benchmarks/cf57_certificate_reach.py layer --records 4096
    OMP_NUM_THREADS=1 python benchmarks/cf57_certificate_reach.py coefficients
    OMP_NUM_THREADS=1 python benchmarks/cf57_certificate_reach.py models --records 512|4096 --json PATH

``fuzz``: rv56s's wild factor models (``benchmarks/rv56s_certificate_fuzz.py``: ``d`` 2-15, ``k``
1-5, loadings 1e-3..1e18, remainders 1e-14..1, ``kappa`` 1 or random; ``--mild``: a healthy model's
scales), both ``Correlation._factor_quadratic`` and ``_certified_solve``'s ``v'M^-1v``, each form
against an 80-digit mpmath solve of ``M = diag(D) + AA'``. Counts by ``M``'s condition (float64
``cond``; past ~1e16 it reads only "ill"): forms, NaN, certified but off by more than
``FACTOR_FORM_RTOL`` ("bad"), the worst certified error, and crashes (an exception instead of a value).
Run it from each checkout (``PYTHONPATH`` at the checkout) to compare.

``models --records N --json PATH``: rv55r's 16-64-64-2 MLP (``benchmarks/rv55r_wide_gate_correlated.py``,
d = 5,378; N 512 / 4,096 / 16,384: d / N 10.5 / 1.31 / 0.33) assessed (``--draws`` uncertainty draws, 8) with its schemes plus two int4
ones (coarse cells: the correlated Monte Carlo form) under the default covariance (the in-sample factor
model): the report as JSON (compare two checkouts' with ``benchmarks/compare_reports.py``), and per
scheme the headline, the interval's ends and how many read NaN.

``coefficients``: the factor model's Monte Carlo weights (``Correlation.coefficients``) and inverse
diagonal (the variance inflation factors) of cf55's rows (64 x 40, column 0 scaled 1..1e9; in-sample,
and the cross-fitted parts, which fit unit columns) against an 80-digit mpmath inverse of ``M``: the
weights' error in ``M``'s norm relative to ``sqrt(u'M^-1u)`` (what moves the Monte Carlo form's scale),
the largest entry's relative error, NaN rows.

``cancel``: cf55's rows (64 x 40 and 32 x 64, column 0 scaled 1e9..1e15; plain in-sample model, 8 rows)
with ``FACTOR_FORM_COMPENSATED`` off and on: how many forms (``_factor_quadratic``) and leave-one-out
solves (``_certified_solve``) are certified and their largest error against a 60-digit reference.

``layer --records 4096``: rv55r's MLP at d / N = 1.31, the in-sample correlation captured from its
rtn_int8 scoring (``benchmarks/cf55_kappa_monotone.py``'s capture), restricted to the ``2.bias`` block (64
coordinates, rank 72: a narrow block, whose per-layer figure read NaN): its forms and leave-one-out
solves unquantized and at rtn_int8's kappa with the cf57 switches (``FACTOR_FORM_RESIDUAL_BOUND``,
``FACTOR_FORM_COMPENSATED``) off and on, how many are certified, and the records certified only with
them (up to 4) and records 0-1 against an 80-digit LU solve of ``M``.

``narrow``: layer blocks no wider than the rank (``d <= k``) of an in-sample model whose columns are
1e6 apart (cf55's rows, column 0 scaled) with remainders 1e-2..1e-6: NaN forms of ``quadratic`` and of
the leave-one-out form, against the 80-digit reference.
"""

from __future__ import annotations

import argparse
import math
import sys

sys.path.insert(0, ".")
import mpmath as mp  # noqa: E402
import torch  # noqa: E402

import mis_lightning.functional.correlated as C  # noqa: E402
from mis_lightning.functional.correlated import RCOND, Correlation  # noqa: E402

F64 = torch.float64
mp.mp.dps = 80
BUCKETS = ((1e8, "cond <= 1e8"), (1e16, "1e8-1e16"), (float("inf"), "> 1e16"))


def reference(L: torch.Tensor, res: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[R]`` ``u'M^-1u`` (``u = K^1/2 w``) of the factor model in 80 digits (an LU solve of ``M``)."""
    _, kh, M = _mp_inverse(Correlation(factor=L, residual=res), k, invert=False)
    out = []
    for w in rows.tolist():
        u = mp.matrix([kh[i] * mp.mpf(x) for i, x in enumerate(w)])
        out.append(float((u.T * mp.lu_solve(M, u))[0]))
    return torch.tensor(out, dtype=F64)


def condition(L: torch.Tensor, res: torch.Tensor, k: torch.Tensor) -> float:
    D = (1 - k + k * res).clamp_min(RCOND)
    A = k.sqrt().unsqueeze(-1) * L
    return float(torch.linalg.cond(torch.diag(D) + A @ A.T))


def wild_model(g: torch.Generator, t: int, mild: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L [d, k], residual [d], kappa [d], rows [3, d])``: trial ``t`` of rv56s's wild factor models
    (``--mild``: a healthy model's scales), drawn from ``g`` (``benchmarks/rv56s_certificate_fuzz.py`` too)."""
    def U(a, b, *s):
        return a + (b - a) * torch.rand(*s, generator=g, dtype=F64)

    d = int(torch.randint(2, 16, (1,), generator=g))
    k = int(torch.randint(1, 6, (1,), generator=g))
    if mild:
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
    return L, res, kap, rows


def fuzz(seed: int, trials: int, mild: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    stats = {name: dict(forms=0, nan=0, bad=0, worst=0.0, crash=0) for _, name in BUCKETS}
    for t in range(trials):
        L, res, kap, rows = wild_model(g, t, mild)
        d, k = L.shape
        c = Correlation(factor=L, residual=res)
        cond = condition(L, res, kap)
        s = stats[next(name for top, name in BUCKETS if cond <= top)]
        ref = reference(L, res, kap, rows)
        for fn in (lambda: c._factor_quadratic(rows, kap), lambda: c._certified_solve(rows * kap.sqrt(), kap)[1]):
            s["forms"] += rows.shape[0]
            try:
                q = fn()
            except Exception as e:  # noqa: BLE001 - counted: an exception where a value or NaN belongs
                s["crash"] += rows.shape[0]
                print(f"trial {t} d {d} k {k}: {type(e).__name__}")
                continue
            s["nan"] += int(q.isnan().sum())
            fin = q.isfinite()
            rel = ((q - ref) / ref).abs()
            s["bad"] += int((fin & (rel > C.FACTOR_FORM_RTOL)).sum())
            if bool(fin.any()):
                s["worst"] = max(s["worst"], float(rel[fin].max()))
    for name, s in stats.items():
        print(f"{name}: {s['forms']} forms, NaN {s['nan']}, crashed {s['crash']}, certified but off > "
              f"{C.FACTOR_FORM_RTOL:g}: {s['bad']}, worst certified error {s['worst']:.2g}")


def narrow() -> None:
    sys.path.insert(0, "tests")
    from test_correlated import _scaled_column_rows

    from mis_lightning.functional.correlated import RecordCorrelation

    tot = nan = nan_loo = bad = 0
    worst = 0.0
    for big in (1.0, 1e3, 1e6):
        for shrink in (1e-2, 1e-4, 1e-6):
            W = _scaled_column_rows(64, 40, big)
            rc = RecordCorrelation.in_sample(W, shrinkage=shrink)
            c = rc.parts[0][1]
            for lo in range(0, 40, 2):  # 2-wide blocks (rank 4 + noise: d <= k)
                b = c.restrict(slice(lo, lo + 2))
                kap = torch.ones(2, dtype=F64)
                q = b._factor_quadratic(W[:8, lo:lo + 2], kap)
                ref = reference(b.factor, b.residual, kap, W[:8, lo:lo + 2])
                loo = b.quadratic(W[:, lo:lo + 2], kap)
                tot += q.numel()
                nan += int(q.isnan().sum())
                nan_loo += int(loo.isnan().sum())
                fin = q.isfinite()
                rel = ((q - ref) / ref).abs()
                bad += int((fin & (rel > C.FACTOR_FORM_RTOL)).sum())
                if bool(fin.any()):
                    worst = max(worst, float(rel[fin].max()))
    print(f"narrow blocks: {tot} forms, NaN {nan}, leave-one-out forms NaN {nan_loo} of {tot * 8}, certified but off: "
          f"{bad}, worst certified error {worst:.2g}")


def _mp_inverse(c: Correlation, k: torch.Tensor, invert: bool = True):
    """``(M^-1, K^1/2, M)`` of the factor model at ``k`` in 80 digits (mpmath; ``invert`` False: no
    ``M^-1``, None)."""
    L, res = c.factor.to(F64), c.residual.to(F64)
    d, r = L.shape
    kk = [mp.mpf(x) for x in k.tolist()]
    D = [max(1 - kk[i] + kk[i] * mp.mpf(res[i].item()), mp.mpf(RCOND)) for i in range(d)]
    A = [[mp.sqrt(kk[i]) * mp.mpf(L[i, a].item()) for a in range(r)] for i in range(d)]
    M = mp.matrix(d, d)
    for i in range(d):
        for j in range(d):
            M[i, j] = (D[i] if i == j else 0) + mp.fsum(A[i][a] * A[j][a] for a in range(r))
    return (M ** -1 if invert else None), [mp.sqrt(x) for x in kk], M


def coefficients() -> None:
    sys.path.insert(0, "tests")
    from test_correlated import _scaled_column_rows

    from mis_lightning.functional.correlated import RecordCorrelation

    kq = 1.0 - 0.5 * torch.rand(40, dtype=F64, generator=torch.Generator().manual_seed(1))
    for big in (1.0, 1e3, 1e6, 1e9):
        W = _scaled_column_rows(64, 40, big)
        c = RecordCorrelation.in_sample(W, loo=False).parts[0][1]
        for name, k in (("kappa 1", torch.ones(40, dtype=F64)), ("quantized", kq)):
            Minv, kh, M = _mp_inverse(c, k)
            coef = c.coefficients(W[:6], k)
            worst = worst_m = 0.0
            for i in range(6):
                u = mp.matrix([kh[j] * mp.mpf(W[i, j].item()) for j in range(40)])
                y = Minv * u
                q = (u.T * y)[0]
                e = mp.matrix([kh[j] * mp.mpf(coef[i, j].item()) - y[j] for j in range(40)])  # K^1/2 c - M^-1 u
                worst_m = max(worst_m, float(mp.sqrt((e.T * M * e)[0] / q)))
                worst = max(worst, max(float(abs(e[j] / y[j])) for j in range(40) if y[j] != 0))
            nan = int(coef.isnan().any(-1).sum())
            print(f"x{big:g} {name}: coefficients' error in M's norm (relative to sqrt(u'M^-1u)) {worst_m:.2g}, "
                  f"largest entry's relative error {worst:.2g}, NaN rows {nan} of 6")
        vif = c.inverse_diagonal()
        Minv, _, _ = _mp_inverse(c, torch.ones(40, dtype=F64))
        rel = max(float(abs((mp.mpf(vif[j].item()) - Minv[j, j]) / Minv[j, j])) for j in range(40))
        print(f"x{big:g}: in-sample model's inverse diagonal (VIF), largest relative error {rel:.2g}, "
              f"NaN {int(vif.isnan().sum())}")
        cf = RecordCorrelation.cross_fitted(W, 8)
        for _, part in cf.parts:
            vif = part.inverse_diagonal()
            Minv, _, _ = _mp_inverse(part, torch.ones(40, dtype=F64))
            rel = max(float(abs((mp.mpf(vif[j].item()) - Minv[j, j]) / Minv[j, j])) for j in range(40))
            print(f"x{big:g}: a cross-fitted part's VIF, largest relative error {rel:.2g}")


def models(records: int, json_path: str | None, draws: int) -> None:
    import warnings
    from pathlib import Path

    sys.path.insert(0, "benchmarks")
    import rv55r_wide_gate_correlated as B

    schemes = [*B.SCHEMES, "intx_weight_only_int4", "intx_weight_only_int4_g32"]
    m, data = B._model(records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = B.assess(m, schemes, B.DataLoader(data, batch_size=128), B._ce, estimation="diagonal", hessian="ggn",
                       uncertainty_draws=draws)
    if json_path:
        Path(json_path).write_text(rep.to_json())
    print(f"N={records}: covariance {rep.estimation.get('covariance')}, baseline {rep.baseline_leakage!r}")
    nan = 0
    for name in schemes:
        r = rep.schemes[name]
        ends = r.interval if r.interval is not None else (None, None)
        nan += sum(1 for v in (r.leakage, *ends) if v is not None and math.isnan(v))
        print(f"  {name}: leakage {r.leakage!r} interval {ends} form {r.method}{'; error ' + str(r.error) if r.error else ''}")
    print(f"  NaN figures (headlines and interval ends): {nan}; warnings naming a correlation: "
          f"{sum('correlat' in str(w.message) for w in caught)}")


def cancel() -> None:
    sys.path.insert(0, "tests")
    from test_correlated import _factor_form_reference, _scaled_column_rows

    from mis_lightning.functional.correlated import RecordCorrelation

    for R, d in ((64, 40), (32, 64)):
        kq = 1.0 - 0.5 * torch.rand(d, dtype=F64, generator=torch.Generator().manual_seed(1))
        for big in (1e9, 1e10, 1e11, 1e12, 1e13, 1e15):
            W = _scaled_column_rows(R, d, big)
            c = RecordCorrelation.in_sample(W, loo=False).parts[0][1]
            for name, k in (("kappa 1", torch.ones(d, dtype=F64)), ("quantized", kq)):
                ref = torch.tensor(_factor_form_reference(c, k, W[:8]), dtype=F64)
                out = []
                for on in (False, True):
                    C.FACTOR_FORM_COMPENSATED = on
                    for fn in (lambda: c._factor_quadratic(W[:8], k), lambda: c._certified_solve(W[:8] * k.sqrt(), k)[1]):
                        q = fn()
                        fin = q.isfinite()
                        err = float(((q[fin] - ref[fin]) / ref[fin]).abs().max()) if bool(fin.any()) else math.nan
                        out.append(f"{int(fin.sum())}/8 ({err:.2g})")
                print(f"{R} x {d} x{big:g} {name}: certified (largest error) forms / solves, off: {out[0]} / {out[1]}; "
                      f"on: {out[2]} / {out[3]}")


def layer(records: int) -> None:
    sys.path.insert(0, "benchmarks")
    import cf55_kappa_monotone as K
    import rv55r_wide_gate_correlated as B

    cap = K._capture(records)
    m, _ = B._model(records)
    lo = 0
    for name, p in m.named_parameters():
        if name == "2.bias":
            break
        lo += p.numel()
    sl = slice(lo, lo + 64)
    c = cap["rc"].parts[0][1].restrict(sl)
    W = cap["W"].double()[:, sl]
    for label, k in (("unquantized", torch.ones(64, dtype=F64)), ("rtn_int8", cap["kvec"].double().clamp(0, 1)[sl])):
        out = {}
        for on in (False, True):
            C.FACTOR_FORM_RESIDUAL_BOUND = C.FACTOR_FORM_COMPENSATED = on
            out[on] = (c._factor_quadratic(W, k), c._certified_solve(W * k.sqrt(), k)[1])
        Minv, kh, _ = _mp_inverse(c, k)
        new = (out[False][0].isnan() | out[False][1].isnan()) & out[True][0].isfinite() & out[True][1].isfinite()
        rows = new.nonzero().flatten()[:4].tolist() + out[True][0].isfinite().nonzero().flatten()[:2].tolist()
        errs = []
        for i in rows:
            u = mp.matrix([kh[j] * mp.mpf(W[i, j].item()) for j in range(64)])
            ref = (u.T * Minv * u)[0]
            errs.append(max(float(abs((mp.mpf(f[i].item()) - ref) / ref)) for f in out[True]))
        print(f"{label}: block rank {c.factor.shape[1]}; certified forms / solves of {W.shape[0]}: off "
              f"{int(out[False][0].isfinite().sum())} / {int(out[False][1].isfinite().sum())}, on "
              f"{int(out[True][0].isfinite().sum())} / {int(out[True][1].isfinite().sum())}; records {rows} (NaN before: "
              f"{new.nonzero().flatten().tolist()[:4]}) against 80 digits: largest relative error {max(errs) if errs else math.nan:.2g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["fuzz", "narrow", "coefficients", "models", "cancel", "layer"])
    p.add_argument("seed", nargs="?", type=int, default=0)
    p.add_argument("trials", nargs="?", type=int, default=150)
    p.add_argument("--mild", action="store_true")
    p.add_argument("--records", type=int, default=512)
    p.add_argument("--json", default=None)
    p.add_argument("--draws", type=int, default=8, help="uncertainty draws (the interval's ends)")
    a = p.parse_args()
    if a.what == "fuzz":
        fuzz(a.seed, a.trials, a.mild)
    elif a.what == "layer":
        layer(a.records)
    elif a.what == "cancel":
        cancel()
    elif a.what == "models":
        models(a.records, a.json, a.draws)
    else:
        narrow() if a.what == "narrow" else coefficients()


if __name__ == "__main__":
    main()
