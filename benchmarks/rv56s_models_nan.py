"""M5/M6 scored with covariance factor / full: NaN count with FACTOR_FORM_CHECK on vs off."""

import dataclasses
import os
import sys

sys.path.insert(0, os.getcwd())
import warnings

import mis_lightning.functional.correlated as C
from benchmarks.first_call import load_saved
from benchmarks.scale import COMMON_SCHEMES
from mis_lightning.assess import run_estimation, score_schemes

path = sys.argv[1]
saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path, None)
nrec = int(os.environ.get("NREC", "512"))
est_cfg = dataclasses.replace(est_cfg, num_records=nrec, budget=1 << 30)
est = run_estimation(model, loader, loss_fn, est_cfg)
for cov in sys.argv[2:]:
    cfg = dataclasses.replace(sc_cfg, covariance=cov)
    out = {}
    for check in (True, False):
        C.FACTOR_FORM_CHECK = check
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            rep = score_schemes(est, model, COMMON_SCHEMES, scoring_config=cfg)
        out[check] = rep
        rows = rep.schemes
        vals = [
            (k, r.leakage, getattr(r, "leakage_low", None), getattr(r, "leakage_high", None), getattr(r, "error", None))
            for k, r in rows.items()
        ]
        print(
            cov,
            "check",
            check,
            "covariance used",
            [getattr(r, "covariance", None) for r in rows.values()][:1],
            "baseline",
            rep.baseline_leakage,
        )
        for v in vals:
            print("   ", v)
        print("   warnings:", [str(x.message)[:150] for x in w][:5])
    print(rep.table() if hasattr(rep, "table") else "")
