"""The factor forms' digits (docs/benchmarks.md, "cf56").

    OMP_NUM_THREADS=1 python benchmarks/cf56_factor_digits.py reference
    OMP_NUM_THREADS=1 python benchmarks/cf56_factor_digits.py ab --records 512|4096|16384
    OMP_NUM_THREADS=1 python benchmarks/cf56_factor_digits.py ends --records 512|16384

``reference``: the plain in-sample factor form ``u'M^-1u`` of cf55's rows (rank 4 plus 1e-3 noise,
column 0 scaled by 1..1e9) at d / R = 40 / 64 and 64 / 32, unquantized and at a quantized kappa,
against an 80-digit mpmath solve: the largest relative error of the old forms (Woodbury's difference,
the stationary form; ``FACTOR_FORM_VARIATIONAL`` and ``FACTOR_FORM_CHECK`` off) and of the default
(the variational form, certified), with how many rows the certificate kept.

``ab``: rv55r's MLP (``benchmarks/rv55r_wide_gate_correlated.py``; rtn_int8, int8_weight_only,
float8_weight_only; default covariance) with the two switches off and on: every float field of the
rows and the baseline, the largest relative difference.

``ends``: the same with ``functional.interval.CORRELATED_ENDS_OVER_BOX`` off and on (the interval's
correlated ends of the in-sample leave-one-out form): the fields that moved.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "tests")
import rv55r_wide_gate_correlated as B  # noqa: E402
import test_correlated as T  # noqa: E402

import mis_lightning.functional.correlated as C  # noqa: E402
import mis_lightning.functional.interval as I  # noqa: E402
from mis_lightning.functional.correlated import RecordCorrelation  # noqa: E402


def _switch(on: bool) -> None:
    C.FACTOR_FORM_VARIATIONAL = C.FACTOR_FORM_CHECK = on


def reference() -> None:
    for R, d in ((64, 40), (32, 64)):
        kq = 1.0 - 0.5 * torch.rand(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for big in (1.0, 1e2, 1e3, 1e4, 1e6, 1e9):
            W = T._scaled_column_rows(R, d, big)
            rc = RecordCorrelation.in_sample(W, loo=False)
            if rc is None:
                print(f"R={R} d={d} x{big:g}: in-sample form declined (full rank)")
                continue
            c = rc.parts[0][1]
            for name, k in (("kappa 1", torch.ones(d, dtype=torch.float64)), ("quantized", kq)):
                ref = torch.tensor(T._factor_form_reference(c, k, W[:6]), dtype=torch.float64)
                _switch(False)
                old = float(((c._factor_quadratic(W[:6], k) - ref) / ref).abs().max())
                _switch(True)
                q = c._factor_quadratic(W[:6], k)
                fin = torch.isfinite(q)
                new = float(((q[fin] - ref[fin]) / ref[fin]).abs().max()) if bool(fin.any()) else math.nan
                print(f"R={R} d={d} x{big:g} rank {c.factor.shape[1]} {name}: old max rel err {old:.2g}; "
                      f"new {new:.2g}, certified {int(fin.sum())} of 6")


def ab(records: int, ends: bool = False) -> None:
    m, data = B._model(records)
    reports = {}
    for on in (False, True):
        if ends:
            I.CORRELATED_ENDS_OVER_BOX = on
        else:
            _switch(on)
        reports[on] = B._assess(m, data, B.SCHEMES)
    rows = B.row_floats(reports[True], reports[False])
    fields, differ, worst = len(rows), 0, 0.0
    for name, key, v, w in rows:
        if not (v == w or (math.isnan(v) and math.isnan(w))):
            differ += 1
            if math.isfinite(v) and math.isfinite(w):
                worst = max(worst, abs(v - w) / max(abs(w), 1e-300))
            if ends:
                print(f"  {name}.{key}: new {v!r} old {w!r}")
    print(f"N={records}: covariance {reports[True].estimation.get('covariance')}; {fields} float fields of the "
          f"rows, {differ} differ, largest relative difference {worst:.2g}; baseline new "
          f"{reports[True].baseline_leakage!r} old {reports[False].baseline_leakage!r}")
    for name in B.SCHEMES:
        print(f"  {name}: leakage new {reports[True].schemes[name].leakage!r} old {reports[False].schemes[name].leakage!r}"
              f"{'; error: ' + str(reports[True].schemes[name].error) if reports[True].schemes[name].error else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["reference", "ab", "ends"])
    p.add_argument("--records", type=int, default=512)
    a = p.parse_args()
    reference() if a.what == "reference" else ab(a.records, ends=a.what == "ends")


if __name__ == "__main__":
    main()
