"""Reports and sweep results saved before the scoring pass dropped an interval whose end read NaN
(rv56s, lead56) can hold ``(lo, NaN)``: every reader of such a file (the report's table, rows, figure,
trackers, the planner's rows; a sweep's aggregate.md, frontier and ties) sees no interval, and the
loaded report says why, as a fresh one would."""
from __future__ import annotations

import json
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import tracking
from mis_lightning.app import aggregate as AG
from mis_lightning.report import Report, merge_identical


def _mse(o, t):
    return 0.5 * (o.squeeze(-1) - t) ** 2


def _saved_with_a_nan_end(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 4, generator=g)
    y = X[:, 0] + 0.1 * torch.randn(200, generator=g)
    torch.manual_seed(0)
    dl = DataLoader(TensorDataset(X, y), batch_size=50)
    rep = ml.assess(nn.Linear(4, 1), ["rtn_int8", "rtn_int4"], dl, _mse, num_records=64, uncertainty_draws=4,
                    val_dataloader=dl)
    assert all(s.interval is not None for s in rep.schemes.values())
    data = json.loads(rep.to_json())
    data["schemes"]["rtn_int4"]["interval"][1] = "nan"  # as to_plain writes a NaN end
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    return rep, path


def test_a_saved_interval_with_a_nan_end_loads_as_no_interval_and_says_so(tmp_path):
    rep, path = _saved_with_a_nan_end(tmp_path)
    back = Report.from_json(path)
    assert back.schemes["rtn_int4"].interval is None  # base: (lo, nan)
    assert back.schemes["rtn_int8"].interval == rep.schemes["rtn_int8"].interval
    lost = [w for w in back.warnings if w.startswith("no 80% interval for rtn_int4:")]
    assert len(lost) == 1 and "saved report" in lost[0], back.warnings
    row = {r["scheme"]: r for r in back.rows()}["rtn_int4"]
    assert row["leakage_p10"] is None and row["leakage_p90"] is None
    line = next(ln for ln in back.table().splitlines() if ln.startswith("rtn_int4"))
    assert "nan" not in line.lower(), line
    keys = tracking.report_metrics(back)
    assert "mis/rtn_int4/leakage_p10" not in keys and "mis/rtn_int8/leakage_p10" in keys  # never a lone end
    # the same file saved again and read back: one warning, no interval
    again = Report.from_dict(json.loads(back.to_json()))
    assert again.schemes["rtn_int4"].interval is None
    assert sum(w.startswith("no 80% interval for rtn_int4:") for w in again.warnings) == 1


def test_a_sweep_result_with_a_nan_end_is_no_interval_in_every_aggregate_reader(tmp_path):
    rows = [{"scheme": "a", "bits_per_weight": 4.0, "leakage": 0.2, "leakage_p10": 0.1, "leakage_p90": "nan",
             "baseline_leakage": 0.3, "d_eff": 3.0, "d": 5, "error": ""},
            {"scheme": "b", "bits_per_weight": 8.0, "leakage": 0.25, "leakage_p10": 0.22, "leakage_p90": 0.28,
             "baseline_leakage": 0.3, "d_eff": 3.0, "d": 5, "error": ""}]
    res = {"status": "ok", "job": {"num": 0, "overrides": ["seed=0"]}, "rows": rows, "warnings": []}
    out = AG.rows_of([res])
    a = next(r for r in out if r["scheme"] == "a")
    assert a["leakage_p10"] is None and a["leakage_p90"] is None  # base: 0.1 and nan
    assert a["warnings"].startswith("no 80% interval for a:")
    md = AG.markdown_table(out)
    assert "nan" not in md.lower(), md
    # two rows alike but for a NaN end are one point (their key was (.., nan) apart)
    twin = [{"scheme": s, "bits_per_weight": 4.0, "leakage": 0.2, "leakage_p10": 0.1, "leakage_p90": math.nan}
            for s in ("x", "y")]
    assert [label for _, label in merge_identical(twin, None)] == ["x = y"]
