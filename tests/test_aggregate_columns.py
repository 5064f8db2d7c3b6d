"""A sweep's aggregate.md carries what each job's own table shows beside the leakage marks:
the share of weights left in float (``float`` column) and the ``pos.`` mark of a
position-dominated interval, each with its legend line. Until nu41b both were dropped: the
README sweep's jobs printed ``[0.0934, 0.1069] pos.`` and ``8.8%`` in float, aggregate.md
neither. Rows are written by hand (no estimation: the test checks the rendering only)."""
from __future__ import annotations

import json

from mis_lightning.app import aggregate as agg


def _row(scheme: str, regime: str, float_fraction: float) -> dict:
    return {"scheme": scheme, "bits_per_weight": 12.35, "leakage": 0.1001, "mis": 0.8999,
            "leakage_p10": 0.0934, "leakage_p90": 0.1069, "interval_regime": regime,
            "pool_leakage": 0.1316, "baseline_leakage": 0.1002, "d_eff": 56.99, "d": 57,
            "float_fraction": float_fraction, "error": "", "unscored": False, "utility_loss": 0.2192}


def _write_jobs(tmp_path, rows):
    for num, row in enumerate(rows):
        job = tmp_path / f"{num}_{row['scheme']}"
        job.mkdir()
        (job / "result.json").write_text(json.dumps({
            "job": {"num": num, "overrides": [f"quantizer={row['scheme']}"]}, "status": "ok",
            "rows": [row], "warnings": []}))


def test_pos_mark_and_float_share_reach_the_aggregate(tmp_path):
    _write_jobs(tmp_path, [_row("int8_weight_only", "position-dominated", 0.0877),
                           _row("bf16", "bootstrap", 0.0)])
    agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    lines = {ln.split(" | ")[1]: ln for ln in md.splitlines() if ln.startswith("| 0 ") or ln.startswith("| 1 ")}
    assert any(ln.startswith("| job | scheme | swept overrides | bits/w | float |") for ln in md.splitlines())
    assert "[0.0934, 0.1069] pos. |" in lines["int8_weight_only"]
    assert "| 8.8% |" in lines["int8_weight_only"]
    assert "pos." not in lines["bf16"] and "| 0.0% |" in lines["bf16"]
    assert agg.POSITION_LEGEND in md and agg.FLOAT_LEGEND in md


def test_no_legend_lines_when_nothing_needs_them(tmp_path):
    _write_jobs(tmp_path, [_row("bf16", "bootstrap", 0.0)])
    agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    assert agg.POSITION_LEGEND not in md and agg.FLOAT_LEGEND not in md


def test_ties_pair_only_rows_of_one_training_setup(tmp_path):
    """Jobs that differ in their seed assessed other trained models: the "not ranked beyond their
    intervals" line never pairs their rows (nu41b saw seed 1's int8 beside seed 2's); jobs that
    differ in their scheme alone are paired, each setup on its own line."""
    jobs = [("int8_weight_only", "seed=1"), ("bf16", "seed=1"), ("int8_weight_only", "seed=2")]
    for num, (scheme, seed) in enumerate(jobs):
        job = tmp_path / f"{num}_{scheme}"
        job.mkdir()
        row = {**_row(scheme, "bootstrap", 0.0), "leakage": 0.1001 + 1e-3 * num}  # overlapping intervals
        (job / "result.json").write_text(json.dumps({
            "job": {"num": num, "overrides": [f"quantizer={scheme}", seed]}, "status": "ok",
            "rows": [row], "warnings": []}))
    agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    ties = [ln for ln in md.splitlines() if "not ranked beyond their intervals" in ln]
    assert len(ties) == 1, ties
    assert ties[0].startswith("(seed=1) ") and "0: int8_weight_only" in ties[0] and "1: bf16" in ties[0]
    assert "2: int8_weight_only" not in ties[0]


def test_zeros_column_and_its_legend_reach_the_aggregate(tmp_path):
    """Each job's table has a ``zeros`` column (share of quantized weights released as exactly 0);
    until session 42 aggregate.md dropped it. Its legend entry is the job table's, word for word."""
    from mis_lightning.report import ZEROS_ENTRY, legend

    _write_jobs(tmp_path, [{**_row("intx_weight_only_int2", "bootstrap", 0.0), "zero_fraction": 0.4125},
                           {**_row("bf16", "bootstrap", 0.0), "zero_fraction": 0.0}])
    agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    assert any(ln.startswith("| job |") and ln.rstrip().endswith("| d_eff | zeros |") for ln in md.splitlines())
    lines = {ln.split(" | ")[1]: ln for ln in md.splitlines() if ln.startswith("| 0 ") or ln.startswith("| 1 ")}
    assert lines["intx_weight_only_int2"].rstrip().endswith("| 0.4125 |")
    assert lines["bf16"].rstrip().endswith("| 0.0000 |")
    assert ZEROS_ENTRY in md and ZEROS_ENTRY in " ".join(legend([]).split())
