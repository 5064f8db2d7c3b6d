"""Why the correlated headline moved against kappa near 1, and where rv55r's NaN came from (docs/benchmarks.md, "cf55").

    OMP_NUM_THREADS=1 python benchmarks/cf55_kappa_monotone.py split --records 16384
    OMP_NUM_THREADS=1 python benchmarks/cf55_kappa_monotone.py nan --records 4096
    OMP_NUM_THREADS=1 python benchmarks/cf55_kappa_monotone.py scale
    OMP_NUM_THREADS=1 python benchmarks/cf55_kappa_monotone.py ab --records 512|16384
    OMP_NUM_THREADS=1 python benchmarks/cf55_kappa_monotone.py reference --records 16384

``split``: rv55r's model (``benchmarks/rv55r_wide_gate_correlated.py``; grid paths' kappa), the
default covariance (the in-sample factor correlation with each record's own row out), rtn_int8. The
deficits ``1 - kappa < 1e-6`` scaled by 0.9 / 0.5 / 1.1 before the forms read them; per stage, the
mean's relative move and how many of the stored records' values fell: the shared channel form
``u'M^-1u`` (``q0``), the own-row-out form before the common divisor, after it (``/ (1 + beta)``,
``beta`` re-estimated at each kappa), the first-order headline (saturated, capped) and the headline
with the spread term (the report's figure); and the last two with ``beta`` held at the unscaled
kappa's value.

``nan``: the stored unit influences behind the NaN at d / n = 1.31: their columns' mean squares, the
sample Gram's spectrum against the rank rule (``RCOND`` of the largest), the shared forms' signs, the
leave-one-out bias ``beta``.

``scale``: a synthetic in-sample form (64 records of rank 4 in 40 coordinates plus 1e-3 noise) with
one column scaled by 1e3..1e11: the numerical rank and the mean Gaussian form of the stored records.

``ab``: rv55r's model's report (rtn_int8, int8_weight_only, float8_weight_only; default covariance) with
``functional.correlated.IN_SAMPLE_TRACE_CHECK`` on and off: every float field of the rows and the
baseline compared bitwise, and the in-sample form's mean own form against its trace target.

``reference``: the records whose float64 shared form ``u'M^-1u`` fell when the deficits < 1e-6 were
halved (and records 0, 1), against the same Woodbury solve in x87 extended precision (numpy
``longdouble``, eps 5e-20) with three refinement steps and the stationary form ``2u'x - x'Mx``.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import Any

import torch

sys.path.insert(0, "benchmarks")
import rv55r_wide_gate_correlated as B  # noqa: E402

import mis_lightning.functional as F  # noqa: E402
import mis_lightning.quantization.base as qb  # noqa: E402
from mis_lightning.functional.correlated import RCOND, RecordCorrelation  # noqa: E402

A = B.A


def _capture(records: int) -> dict[str, Any]:
    """The scoring's correlation, influences, kappa, n and the spread term's inputs of rtn_int8."""
    m, data = B._model(records)
    cap: dict[str, Any] = {}
    inner, spread = A._correlated_leakage, F.with_spread

    def corr(est, prep, rc, kvec, chosen, *a):
        cap.update(rc=rc, W=est.influence, kvec=kvec.clone(), n=a[-1])
        return inner(est, prep, rc, kvec, chosen, *a)

    def ws(leak, unq, h):
        cap["spread"] = (unq, h)
        return spread(leak, unq, h)

    A._correlated_leakage, F.with_spread = corr, ws
    try:
        cap["report"] = B._assess(m, data, ["rtn_int8"])
    finally:
        A._correlated_leakage, F.with_spread = inner, spread
    return cap


def _stages(c: Any, W: torch.Tensor, k: torch.Tensor, beta: float | None) -> tuple[torch.Tensor, ...]:
    """(q0, own-row-out before the divisor, after it, beta) of the in-sample form at ``k``
    (``Correlation._in_sample_loo_quadratic``'s steps; ``beta`` given: held)."""
    kh = k.sqrt()
    x, b = c.self_term.double(), c.self_weight.double()
    u, v = W * kh, x * kh
    q0 = c._factor_quadratic(W, k).clamp_min(0.0)
    y = c._solve(v, k)
    vv, uv = (v * y).sum(-1).clamp_min(0.0), (u * y).sum(-1)
    g = torch.where((q0 > 0) & (vv > 0), uv.square() / (q0 * vv).clamp_min(1e-300), torch.zeros_like(q0)).clamp(0, 1)
    h = (b * vv).clamp(0.0, 0.75)
    loo = q0 * (1.0 + g * h / (1.0 - h))
    bt = c._inverse_bias(vv, y, h, k) if beta is None else beta
    return q0, loo, loo / (1.0 + bt), torch.tensor(bt)


def split(records: int) -> None:
    qb.WIDE_SD_CLOSED_FORM = False  # the grid paths' kappa, as rv55r's "deficits"
    cap = _capture(records)
    rc, W, k0, n = cap["rc"], cap["W"].double(), cap["kvec"].clamp(0, 1), cap["n"]
    unq, h = cap["spread"]
    c = rc.parts[0][1]
    assert rc.fit == "in_sample" and c.self_mean, "the default covariance here is the in-sample form"
    capv = rc.gaussian_mean_abs(W)
    print(f"N={records}: {W.shape[0]} stored records, d = {W.shape[1]}, factor rank {c.factor.shape[1]}, "
          f"deficits < 1e-6: {int(((1 - k0) < 1e-6).sum())} (of them 0: {int((k0 == 1).sum())})")

    def heads(mean_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = F.saturate(torch.minimum(mean_abs, capv) / (2 * math.sqrt(n)))
        return first, F.with_spread(first, unq, h)

    def from_q(q: torch.Tensor) -> torch.Tensor:  # the Gaussian form E|S| of a quadratic form
        return F.cells.SQRT_2_OVER_PI * q.clamp_min(0.0).sqrt()

    base = _stages(c, W, k0, None)
    check = float((from_q(base[2]) - rc.gaussian_mean_abs(W, k0)).abs().max())
    print(f"  stages reproduce the scored form: max |diff| {check:.2g}; beta {float(base[3]):.10g}")
    b_heads, b_held = heads(from_q(base[2])), heads(from_q(base[2]))
    for f in (0.9, 0.5, 1.1):
        k = torch.where(1 - k0 < 1e-6, 1 - (1 - k0) * f, k0)
        st = _stages(c, W, k, None)
        held = _stages(c, W, k, float(base[3]))
        rows = [("shared form q0", st[0], base[0]), ("own row out, before / (1 + beta)", st[1], base[1]),
                ("own row out / (1 + beta(kappa))", st[2], base[2])]
        hd, hh = heads(from_q(st[2])), heads(from_q(held[2]))
        rows += [("first-order headline", hd[0], b_heads[0]), ("headline with spread (report)", hd[1], b_heads[1]),
                 ("first-order, beta held", hh[0], b_held[0]), ("with spread, beta held", hh[1], b_held[1])]
        print(f"  deficits x{f}: beta {float(st[3]):.10g}")
        for name, new, old in rows:
            print(f"    {name:34s} mean {(float(new.mean()) - float(old.mean())) / float(old.mean()):+.3g} rel; "
                  f"records down {int((new < old).sum())}, up {int((new > old).sum())}; largest fall "
                  f"{float(((new - old) / old.clamp_min(1e-300)).min()):+.2g} rel")


def nan(records: int) -> None:
    cap = _capture(records)
    rc, W = cap["rc"], cap["W"].double()
    c = rc.parts[0][1]
    ms = W.square().mean(0)
    qs = torch.quantile(ms, torch.tensor([0.0, 0.5, 0.99, 1.0], dtype=torch.float64))
    print(f"N={records}: baseline {cap['report'].baseline_leakage}; covariance fit {rc.fit}, factor rank "
          f"{c.factor.shape[1]}, {W.shape[0]} stored records, d = {W.shape[1]}")
    print("  stored unit influences' column mean squares (min / median / 99% / max):",
          " / ".join(f"{float(v):.3g}" for v in qs), f"; |w| max {float(W.abs().max()):.3g}")
    ev = torch.linalg.eigvalsh(W @ W.T / W.shape[0])
    print(f"  sample Gram's top eigenvalues {[f'{float(v):.3g}' for v in ev[-4:]]}; above RCOND = {RCOND:g} of "
          f"the largest: {int((ev > RCOND * ev[-1]).sum())}")
    ones = torch.ones(W.shape[1], dtype=torch.float64)
    q0 = c._factor_quadratic(W, ones)
    y = c._solve(c.self_term.double(), ones)
    vv = (c.self_term.double() * y).sum(-1)
    print(f"  shared forms u'M^-1u: {int((q0 < 0).sum())} of {q0.numel()} negative (min {float(q0.min()):.3g}, "
          f"max {float(q0.max()):.3g}); own-row forms v'M^-1v: {int((vv <= 0).sum())} <= 0")
    c._inverse_bias(vv.clamp_min(0.0), y, vv.clamp(0.0, 0.75), ones)
    print(f"  leave-one-out bias (exact, second order) at kappa = 1: {c._loo_cache['unquantized']} "
          "(-1: every form divided by 0; NaN: set by the trace check, IN_SAMPLE_TRACE_CHECK)")
    row = cap["report"].schemes["rtn_int8"]
    print(f"  rtn_int8 error: {row.error}")
    print(f"  first warning: {cap['report'].warnings[0]}")


def scale() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 40, generator=g, dtype=torch.float64)
    W = W + 1e-3 * torch.randn(64, 40, generator=g, dtype=torch.float64)
    for big in (1.0, 1e3, 1e6, 1e9, 1e11):
        X = W.clone()
        X[:, 0] *= big
        rc = RecordCorrelation.in_sample(X)
        if rc is None:
            print(f"column 0 x{big:g}: in-sample form declined")
            continue
        v = rc.gaussian_mean_abs(X)
        print(f"column 0 x{big:g}: numerical rank {rc.parts[0][1].factor.shape[1]}, mean Gaussian form "
              f"{float(v.mean()):.6g}, finite {int(torch.isfinite(v).sum())} of {v.numel()}")


def ab(records: int) -> None:
    import mis_lightning.functional.correlated as C

    m, data = B._model(records)
    reports = {}
    for on in (True, False):
        C.IN_SAMPLE_TRACE_CHECK = on
        reports[on] = B._assess(m, data, B.SCHEMES)
    C.IN_SAMPLE_TRACE_CHECK = True
    rows = B.row_floats(reports[True], reports[False])
    fields = len(rows)
    differ = sum(not (v == w or (math.isnan(v) and math.isnan(w))) for _, _, v, w in rows)
    same_base = reports[True].baseline_leakage == reports[False].baseline_leakage
    print(f"N={records}: covariance {reports[True].estimation.get('covariance')}; {fields} float fields of the rows, "
          f"{differ} differ; baseline equal: {same_base} ({reports[True].baseline_leakage!r})")
    cap = _capture(records)
    c = cap["rc"].parts[0][1]
    if c.trace_target is not None:
        x = c.self_term.double()
        ones = torch.ones(x.shape[1], dtype=torch.float64)
        own = float((x * c._solve(x, ones)).sum(-1).mean())
        print(f"  mean own form {own:.10g} against trace target {c.trace_target:.10g}: {own / c.trace_target - 1:+.2g} rel")


def _extended_forms(c: Any, W: torch.Tensor, k: torch.Tensor, rows: list[int]) -> list[tuple[float, float]]:
    """``(u'M^-1u, s / q)`` of ``rows`` in numpy longdouble (module docstring, ``reference``)."""
    import numpy as np

    kk = k.numpy().astype(np.longdouble)
    D = (1 - kk) + kk * c.residual.double().numpy().astype(np.longdouble)
    A = np.sqrt(kk)[:, None] * c.factor.double().numpy().astype(np.longdouble)
    core = np.eye(A.shape[1], dtype=np.longdouble) + (A / D[:, None]).T @ A
    n = core.shape[0]
    Lc = np.zeros_like(core)  # Cholesky in longdouble (LAPACK has none)
    for j in range(n):
        Lc[j, j] = np.sqrt(core[j, j] - np.dot(Lc[j, :j], Lc[j, :j]))
        for i in range(j + 1, n):
            Lc[i, j] = (core[i, j] - np.dot(Lc[i, :j], Lc[j, :j])) / Lc[j, j]

    def core_solve(y: Any) -> Any:
        z = np.zeros_like(y)
        for i in range(n):
            z[i] = (y[i] - np.dot(Lc[i, :i], z[:i])) / Lc[i, i]
        x = np.zeros_like(y)
        for i in reversed(range(n)):
            x[i] = (z[i] - np.dot(Lc[i + 1:, i], x[i + 1:])) / Lc[i, i]
        return x

    def solve(r: Any) -> Any:
        return r / D - (A @ core_solve((r / D) @ A)) / D

    out = []
    for i in rows:
        u = np.sqrt(kk) * W[i].numpy().astype(np.longdouble)
        x = solve(u)
        for _ in range(3):
            x = x + solve(u - (D * x + A @ (A.T @ x)))
        q = 2 * np.dot(u, x) - np.dot(x, D * x) - np.sum((A.T @ x) ** 2)
        out.append((q, float(np.sum(u * u / D) / q)))
    return out


def reference(records: int) -> None:
    qb.WIDE_SD_CLOSED_FORM = False
    cap = _capture(records)
    c, W, k0 = cap["rc"].parts[0][1], cap["W"].double(), cap["kvec"].clamp(0, 1)
    k5 = torch.where(1 - k0 < 1e-6, 1 - (1 - k0) * 0.5, k0)
    a, b = c._factor_quadratic(W, k0), c._factor_quadratic(W, k5)
    rows = ((b - a) < 0).nonzero().flatten().tolist() + [0, 1]
    ra, rb = _extended_forms(c, W, k0, rows), _extended_forms(c, W, k5, rows)
    for j, i in enumerate(rows):
        print(f"record {i}: s / q {ra[j][1]:.2g}; float64 move {float((b[i] - a[i]) / a[i]):+.3g}, extended "
              f"{float((rb[j][0] - ra[j][0]) / ra[j][0]):+.3g}; float64 error {float(a[i]) / float(ra[j][0]) - 1:+.2g} "
              f"(deficits as they are) / {float(b[i]) / float(rb[j][0]) - 1:+.2g} (halved)")


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["split", "nan", "scale", "ab", "reference"])
    ap.add_argument("--records", type=int, default=16384)
    a = ap.parse_args()
    if a.mode == "scale":
        scale()
    else:
        {"split": split, "nan": nan, "ab": ab, "reference": reference}[a.mode](a.records)


if __name__ == "__main__":
    main()
