"""The d / n and d_eff / n regime warnings said once (ux29: a 161-weight MLP on 1,000 records
fired both; for the baseline d_eff = d, so the second said nearly what the first did).

The d / n warning now names the schemes whose own d_eff / n is still above the bound; the
separate d_eff / n warning is gone where the d / n one fires. The aggregate of a sweep lists
that warning once, with each job's schemes under it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from _nets import ridge_linear  # tests/_nets.py

from mis_lightning import assess
from mis_lightning._warning_lines import MORE, warning_line
from mis_lightning.app import aggregate as agg
from mis_lightning.assess import D_EFF_OVER_N_MAX
from mis_lightning.report import STAR_LINE

N, F = 150, 19  # d = 20: d / n = 0.133, just above D_EFF_OVER_N_MAX = 0.1


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y) ** 2


@pytest.fixture(scope="module")
def report():
    """Ridge regression solved exactly; rtn_int8 keeps d_eff ~ d (d_eff / n 0.133), rtn_int2
    brings it to ~3.4 (0.023): one scheme above the bound, one below."""
    model, loader = ridge_linear(N, F)
    return assess(model, ["rtn_int8", "rtn_int2"], loader, _mse, weight_decay=1e-2, uncertainty_draws=0,
                  covariance="independent")  # the warnings, not the correlated headline


def test_one_regime_warning_names_the_schemes_whose_d_eff_over_n_is_still_large(report):
    ratio = {k: s.d_eff / N for k, s in report.schemes.items()}
    large = sorted(k for k, v in ratio.items() if v > D_EFF_OVER_N_MAX)
    assert large == ["rtn_int8"] and ratio["rtn_int2"] < D_EFF_OVER_N_MAX  # the fixture's premise
    regime = [w for w in report.warnings if "d_eff / n" in w or w.startswith("d / n")]
    assert len(regime) == 1, regime  # was two: "d / n = 0.133 ..." and "d_eff / n is not small ..."
    (w,) = regime
    assert w.startswith(f"d / n = {20 / N:.3g} is not small (20 assessed weights, {N} records)")
    # the facts of the old d_eff / n warning: which schemes, their value, the regime it needs
    m = re.search(r"d_eff / n \(.*?\) above ([\d.]+) for (.*?) \(([\d.]+)\)\. ", w)
    assert m, w
    assert float(m.group(1)) == D_EFF_OVER_N_MAX and m.group(2) == "rtn_int8"
    assert float(m.group(3)) == pytest.approx(ratio["rtn_int8"], rel=5e-3)  # printed to 3 digits
    assert "rtn_int2" not in w and "needs it small" in w
    # ... and the d / n warning's own: every figure indicative, the action last
    assert "Every figure, low d_eff included, is therefore indicative only" in w
    assert w.endswith("To act: assess fewer weights (e.g. a head over a frozen encoder) or use more records")
    assert f"  - {w}" in report.table(verbose=True)  # the verbose table prints it in full
    assert warning_line(w).startswith("d / n = ") and "is not small" in warning_line(w)
    # the console's line (nux51 #9): the * it stands for, with the others, in one line naming it and what to do (nux55)
    (star,) = [x for x in report.table().splitlines() if x.startswith(f"  - {STAR_LINE}")]
    assert f"d / n = {20 / N:.2g} (assess fewer weights or use more records)" in star and star.endswith(MORE)


def test_the_sweep_aggregate_says_the_regime_warning_once_with_each_jobs_schemes(report, tmp_path):
    (w,) = [x for x in report.warnings if x.startswith("d / n")]
    other = w.replace("for rtn_int8 (0.133)", "for every scheme (0.131)")
    assert other != w
    for num, (scheme, warning) in enumerate((("rtn_int8", w), ("rtn_int4", other))):
        job = tmp_path / f"{num}_{scheme}"
        job.mkdir()
        row = {"scheme": scheme, "bits_per_weight": 8.0, "leakage": 0.1, "mis": 0.9, "leakage_p10": None,
               "leakage_p90": None, "baseline_leakage": 0.2, "d_eff": 20.0, "method": "clt", "error": "",
               "utility_loss": 1.0}
        (job / "result.json").write_text(json.dumps({"job": {"num": num, "overrides": [f"quantizer={scheme}"]},
                                                     "status": "ok", "rows": [row], "warnings": [warning]}))
    agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    section = md[md.index("## Warnings"):]
    assert section.count("d / n = 0.133 is not small") == 1 and "- jobs 0, 1: d / n = 0.133" in section
    assert "job 0: rtn_int8 (0.133); job 1: every scheme (0.131)" in section
    assert section.count("To act:") == 1
