"""The app's sweep side (``mis_lightning.app.aggregate``, ``mis_lightning.app.resolvers``): a
single run's dir, stale jobs of an earlier sweep in the same dir, job folder names, and a sweep
that mixes utility metrics (fresh-user sweep fu19: E5, W6, W11, D3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mis_lightning.app import aggregate as agg


def _result(job_dir: Path, num: int | None, scheme: str, leakage: float, utility: dict[str, float],
            **extra: Any) -> Path:
    """A minimal ``result.json`` of one job with one scheme row."""
    job_dir.mkdir(parents=True, exist_ok=True)
    row = {"scheme": scheme, "bits_per_weight": 4.0, "leakage": leakage, "mis": 1 - leakage,
           "leakage_p10": None, "leakage_p90": None, "baseline_leakage": 0.5, "d_eff": 3.0,
           "method": "clt", "error": "", **{f"utility_{k}": v for k, v in utility.items()}}
    path = job_dir / "result.json"
    path.write_text(json.dumps({"job": {"num": num, "overrides": [f"quantizer={scheme}"]}, "status": "ok",
                                "rows": [row], **extra}))
    return path


def test_aggregate_of_a_single_run_dir_is_one_job(tmp_path):
    """E5: `mis-lightning-aggregate <single-run dir>` (its result.json directly in the dir,
    job.num = None) crashed with IndexError; it aggregates the run as one job."""
    _result(tmp_path, None, "int8_weight_only", 0.1, {"rmse": 0.7})
    assert agg.main([str(tmp_path), "--quiet"]) == 0
    md = (tmp_path / "aggregate.md").read_text()
    assert "1 jobs, 1 rows." in md and "| int8_weight_only |" in md


def test_long_job_folder_names_are_cut_at_an_override_and_marked():
    """W11: job folder names were cut at 120 characters mid-value (`...,trainer.max_epochs=2`
    for `trainer.max_epochs=20`); they are cut after a whole override, marked with the number
    left out and a hash of the full list (so two cut names never collide)."""
    from mis_lightning.app.resolvers import job_subdir

    head = "data=synthetic_linear,model=mlp_probe,mode=plan,plan.candidates=[rtn_int8,rtn_int4,rtn_int2],"
    overrides = head + "plan.max_utility_loss=0.05,trainer.max_epochs=20"
    name = job_subdir(0, None, overrides)
    label = name.removeprefix("0_")
    assert len(label) <= 120
    kept, mark = label.rsplit(",+", 1)
    assert overrides.startswith(kept + ",") and kept.endswith("rtn_int2]")  # whole overrides only
    assert mark.startswith("2more_") and len(mark.split("_")[1]) == 8
    assert job_subdir(0, None, overrides.replace("=20", "=2")) != name  # the hash tells them apart
    assert job_subdir(3, None, "seed=1,data.d=16") == "3_seed=1,data.d=16"  # short: unchanged
    assert job_subdir(5, "int8_weight_only", overrides) == "5_int8_weight_only"
