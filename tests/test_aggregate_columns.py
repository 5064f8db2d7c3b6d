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
    # nux55: the jobs had no warnings (their float weights were biases): the legend points where the names are
    assert "biases" in md and "report.json lists them all (float_params" in md and "warnings name the layers" not in md


def test_model_size_column_reaches_the_aggregate_where_weights_are_not_assessed(tmp_path):
    """A head on a frozen backbone (fz44): each job's table shows ``model b/w`` (the whole
    quantized model's bits per weight); aggregate.md too, with its legend line; a job whose
    every weight is assessed (model_d = d) or saved before fz44 (no model_d) shows no column."""
    whole = [{**_row("int8_weight_only", "bootstrap", 0.0), "model_bits_per_weight": 9.29, "model_d": 5699},
             _row("bf16", "bootstrap", 0.0)]
    _write_jobs(tmp_path, whole)
    agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    assert any(ln.startswith("| job | scheme | swept overrides | bits/w | float | model b/w |") for ln in md.splitlines())
    assert "| 0.0% | 9.29 |" in md and agg.MODEL_BITS_ENTRY in md
    (tmp_path / "b").mkdir()
    _write_jobs(tmp_path / "b", [{**_row("bf16", "bootstrap", 0.0), "model_bits_per_weight": 16.0, "model_d": 57}])
    agg.aggregate(tmp_path / "b", verbose=False)
    assert "model b/w" not in (tmp_path / "b" / "aggregate.md").read_text()


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


def test_a_seed_s_ties_line_names_its_job_once(tmp_path):
    """The README's seed sweep: one job per seed, each assessing several schemes. Each seed's ties line
    prefixed every name with its job after a prefix that already set the seed apart: "(seed=0) not
    ranked beyond their intervals: 0: float8_weight_only (0.0986), 0: native_int8_dynamic (0.1001), ..."
    (nux57). A setup of one job names it once, in the prefix."""
    for num in range(2):
        job = tmp_path / f"{num}"
        job.mkdir()
        rows = [{**_row(s, "bootstrap", 0.0), "leakage": 0.1001 + 1e-3 * k} for k, s in enumerate(["int8", "bf16"])]
        (job / "result.json").write_text(json.dumps({
            "job": {"num": num, "overrides": [f"seed={num}"]}, "status": "ok", "rows": rows, "warnings": []}))
    agg.aggregate(tmp_path, verbose=False)
    ties = [ln for ln in (tmp_path / "aggregate.md").read_text().splitlines() if "not ranked beyond their" in ln]
    assert [t.split(" not ranked")[0] for t in ties] == ["(job 0, seed=0)", "(job 1, seed=1)"], ties
    assert all("intervals: int8 (0.1001), bf16 (0.1011)" in t for t in ties), ties


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
    # a percentage, as the float column (ux49: the job's table showed exponents where one share was tiny)
    assert lines["intx_weight_only_int2"].rstrip().endswith("| 57.0 | 41.2% |")
    assert lines["bf16"].rstrip().endswith("| 0.0% |")
    assert ZEROS_ENTRY in md and ZEROS_ENTRY in " ".join(legend([]).split())

def _seed_sweep(tmp_path, figures: dict[tuple[str, int], tuple[float, float]]) -> str:
    """A sweep over schemes and seeds, ``{(scheme, seed): (leakage, rmse)}``, one job each (the
    seed's jobs share their baseline: one trained model per seed); returns aggregate.md."""
    for num, ((scheme, seed), (leak, rmse)) in enumerate(figures.items()):
        job = tmp_path / f"{num}_{scheme}"
        job.mkdir()
        row = {**_row(scheme, "bootstrap", 0.0), "leakage": leak, "leakage_p10": leak - 0.002,
               "leakage_p90": leak + 0.002, "utility_rmse": rmse, "baseline_leakage": 0.2 + seed / 100}
        (job / "result.json").write_text(json.dumps({
            "job": {"num": num, "overrides": ["data=mine", f"quantizer={scheme}", f"seed={seed}"]},
            "status": "ok", "rows": [row], "warnings": []}))
    agg.aggregate(tmp_path, verbose=False)
    return (tmp_path / "aggregate.md").read_text()


def test_a_sweep_over_seeds_summarises_each_scheme_across_them(tmp_path):
    """nu42c: `-m quantizer=a,b seed=0,1` gave one verdict per seed, each labelled with every
    override the jobs share, and nothing over the seeds; aggregate.md now has an "Across seeds"
    table (mean and range of each scheme's leakage and utility, in how many seeds the verdict chose
    it) and says whether one scheme is chosen in every seed. Means to 4 decimals, as printed."""
    md = _seed_sweep(tmp_path, {("int8_weight_only", 0): (0.10, 0.500), ("intx_weight_only_int2", 0): (0.06, 0.700),
                                ("int8_weight_only", 1): (0.12, 0.520), ("intx_weight_only_int2", 1): (0.07, 0.650)})
    verdicts = [ln for ln in md.splitlines() if ln.startswith("verdict across")]
    assert [v.split(" (the same")[0] for v in verdicts] == ["verdict across jobs 0, 1 (seed=0)",
                                                              "verdict across jobs 2, 3 (seed=1)"]
    rows = {ln.split(" | ")[0].lstrip("| "): ln.split(" | ") for ln in md.split("## Across seeds")[1].splitlines()
            if ln.startswith("| int")}
    assert rows["intx_weight_only_int2"][1:6] == ["2", "0.0650", "0.0600 to 0.0700", "0.6750", "0.6500 to 0.7000"]
    assert rows["int8_weight_only"][2] == "0.1100" and rows["int8_weight_only"][-1] == "2 of 2 |"
    assert "chosen in every seed: int8_weight_only" in md


def test_seeds_whose_verdicts_disagree_are_named(tmp_path):
    md = _seed_sweep(tmp_path, {("int8_weight_only", 0): (0.10, 0.500), ("bf16", 0): (0.11, 0.501),
                                ("int8_weight_only", 1): (0.12, 0.500), ("bf16", 1): (0.09, 0.501)})
    assert "no scheme is chosen in every seed: seed=0: int8_weight_only; seed=1: bf16" in md
    (tmp_path / "one").mkdir()  # one seed alone: no section
    assert "## Across seeds" not in _seed_sweep(tmp_path / "one", {("int8_weight_only", 0): (0.10, 0.5),
                                                                   ("bf16", 0): (0.11, 0.5)})


def test_tracker_runs_of_a_sweep_over_seeds_have_their_own_names(monkeypatch):
    """nu42c: MLflow / W&B runs were named ``<job>-<scheme>``: the runs of one scheme in a sweep over
    seeds shared a name, and a single run without ``quantizer=`` was named ``cli-None``."""
    import types

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mis_lightning.app.resolvers import run_name

    assert run_name("cli", "int8_weight_only", "") == "cli-int8_weight_only" and run_name("cli", None, "") == "cli"
    hc = types.SimpleNamespace(mode=RunMode.MULTIRUN, job=OmegaConf.create({"num": 3}))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hc))
    assert run_name("cli", "int8_weight_only", "quantizer=int8_weight_only,seed=1") == "cli-3_int8_weight_only"
    assert run_name("cli", None, "seed=1") == "cli-3_seed-1"


def test_the_jobs_utility_tolerance_sets_the_aggregates_verdict_band(tmp_path):
    """nux51 #6: the aggregate's verdict band was fixed at 1%; a sweep run with
    ``mis.scoring.utility_tolerance=0.5`` (its jobs' result.json ``utility_tolerance``) judges
    with 50%. int2 (rmse 0.7 against 0.5: 40% worse) is outside the 1% band, inside the 50% one."""
    figures = {"int8_weight_only": (0.10, 0.500), "intx_weight_only_int2": (0.06, 0.700)}
    for tol, where in ((None, tmp_path / "default"), (0.5, tmp_path / "wide")):
        for num, (scheme, (leak, rmse)) in enumerate(figures.items()):
            job = where / f"{num}_{scheme}"
            job.mkdir(parents=True)
            row = {**_row(scheme, "bootstrap", 0.0), "leakage": leak, "leakage_p10": leak - 0.002,
                   "leakage_p90": leak + 0.002, "utility_rmse": rmse, "baseline_leakage": 0.2}
            res = {"job": {"num": num, "overrides": ["data=mine", f"quantizer={scheme}"]}, "status": "ok",
                   "rows": [row], "warnings": []}
            if tol is not None:
                res["utility_tolerance"] = tol
            (job / "result.json").write_text(json.dumps(res))
        agg.aggregate(where, verbose=False)
    default, wide = ([ln for ln in (d / "aggregate.md").read_text().splitlines() if ln.startswith("verdict across")]
                     for d in (tmp_path / "default", tmp_path / "wide"))
    assert "within 1% of the best (0.5000, 0: int8_weight_only): 0: int8_weight_only (leakage 0.1000)" in default[0]
    assert "within 50% of the best (0.5000, 0: int8_weight_only): 1: intx_weight_only_int2 (leakage 0.0600)" in wide[0]


def test_the_jobs_declared_utility_key_ranks_the_aggregate(tmp_path):
    """ux54c's finding: jobs run with ``mis.scoring.utility_key=accuracy`` ranked their own tables by
    accuracy, while aggregate.md ranked by auroc (the default pick: result.json did not say). By
    auroc int8 is best and int2 outside the 1% band; by accuracy both are equal, so int2 (less
    leakage) is the verdict's pick."""
    figures = {"int8_weight_only": (0.10, 0.90, 0.80), "intx_weight_only_int2": (0.06, 0.80, 0.80)}
    for declared, where in ((None, tmp_path / "default"), ("accuracy", tmp_path / "declared")):
        for num, (scheme, (leak, auroc, acc)) in enumerate(figures.items()):
            job = where / f"{num}_{scheme}"
            job.mkdir(parents=True)
            row = {**_row(scheme, "bootstrap", 0.0), "leakage": leak, "leakage_p10": leak - 0.002,
                   "leakage_p90": leak + 0.002, "utility_auroc": auroc, "utility_accuracy": acc,
                   "baseline_leakage": 0.2}
            row.pop("utility_loss")
            res = {"job": {"num": num, "overrides": ["data=mine", f"quantizer={scheme}"]}, "status": "ok",
                   "rows": [row], "warnings": [], **({"utility_key": declared} if declared else {})}
            (job / "result.json").write_text(json.dumps(res))
        agg.aggregate(where, verbose=False)
    default, declared_md = ((d / "aggregate.md").read_text() for d in (tmp_path / "default", tmp_path / "declared"))
    pick = [ln for ln in default.splitlines() if ln.startswith("verdict across")]
    assert "auroc" in pick[0] and "0: int8_weight_only (leakage 0.1000)" in pick[0], pick
    pick = [ln for ln in declared_md.splitlines() if ln.startswith("verdict across")]
    assert "accuracy" in pick[0] and "1: intx_weight_only_int2 (leakage 0.0600)" in pick[0], pick
    assert "auroc" not in declared_md.split("verdict across")[0].splitlines()[0], declared_md  # the table's header


def test_across_seeds_chooses_nothing_where_the_headline_is_undetermined():
    """rv51: every seed's verdict is "none: the headline is undetermined" (hd51's ``undet.``: the
    baseline moves beyond report.UNDETERMINED_MOVE with the rank rule), yet the Across-seeds section
    said "chosen in every seed: rtn_int4". Now those seeds choose nothing and the section says so."""
    from mis_lightning.app.replicates import across_seeds_section
    from mis_lightning.report import UNDETERMINED_MOVE, verdict

    def rows(move):
        out = []
        for seed in ("seed=0", "seed=1"):
            for job, (scheme, leak) in enumerate((("rtn_int8", 0.80), ("rtn_int4", 0.70))):
                out.append({"job": f"{seed}-{job}", "key": seed, "scheme": scheme, "leakage": leak,
                            "leakage_p10": leak - 0.01, "leakage_p90": leak + 0.01, "baseline_leakage": 0.81,
                            "bits_per_weight": 8.0 if job == 0 else 4.0, "baseline_cutoff_sensitivity": move,
                            "mis": 1 - leak, "d_eff": 10.0})
        return out

    undet = rows(2.3 * UNDETERMINED_MOVE)
    assert verdict([r for r in undet if r["key"] == "seed=0"]).startswith("verdict: none: the headline is undetermined")
    text = across_seeds_section(undet, lambda r: r["key"], lambda g: None, lambda s, keys: s)
    assert "chosen in every seed" not in text and "undetermined in 2 seed(s) (seed=0, seed=1)" in text
    fine = across_seeds_section(rows(0.0), lambda r: r["key"], lambda g: None, lambda s, keys: s)
    assert "chosen in every seed: rtn_int4" in fine and "undetermined in" not in fine
    # ux56b: `-m seed=0,1 'schemes=[rtn_int8,rtn_int4]'`, one job per seed scoring both schemes, chooses as
    # that job's own verdict does (it counted seeds of two jobs or more only: "chosen in" read "-" everywhere)
    one_job = [{**r, "job": r["key"]} for r in rows(0.0)]
    assert verdict([r for r in one_job if r["key"] == "seed=0"]).startswith("verdict: safest: rtn_int4 ")
    assert across_seeds_section(one_job, lambda r: r["key"], lambda g: None, lambda s, keys: s) == fine


def _seeds_rows(eq_seed: str | None, int4_leak: float = 0.095) -> list[dict]:
    """Two seeds' rows of one job each (rtn_int8, rtn_int4, the seed's baseline 0.10): rtn_int4 reads
    the baseline's figure, marked ``=`` (``float_determined``), in ``eq_seed``."""
    out = []
    for seed in ("seed=0", "seed=1", "seed=2"):
        for scheme, leak in (("rtn_int8", 0.099), ("rtn_int4", int4_leak)):
            eq = scheme == "rtn_int4" and seed == eq_seed
            out.append({"job": seed, "key": seed, "scheme": scheme, "leakage": 0.1 if eq else leak,
                        "leakage_p10": (0.1 if eq else leak) - 0.0005, "leakage_p90": (0.1 if eq else leak) + 0.0005,
                        "baseline_leakage": 0.1, "float_fraction": 0.01, "float_determined": eq,
                        "bits_per_weight": 8.0 if scheme == "rtn_int8" else 4.0, "mis": 0.9, "d_eff": 10.0})
    return out


def test_across_seeds_keeps_a_seed_s_baseline_figure_out_of_the_scheme_s_mean():
    """nux56: in one seed int4's headline was the baseline's (``=``: the float weights fix the
    quantized ones, no credit of its own), and "Across seeds" averaged it with int4's own figures of
    the other seeds (a mean a reader takes for int4's expected leakage). Now the mean and range are
    over the seeds with a figure of the scheme's own, the seeds cell counts the ``=`` ones, a line
    says so; a seed whose safest in the band reads the baseline chooses nothing, as its verdict."""
    from mis_lightning.app.replicates import NO_SAFER, across_seeds_section
    from mis_lightning.report import verdict

    def section(rows):
        return across_seeds_section(rows, lambda r: r["key"], lambda g: None, lambda s, keys: s)

    text = section(_seeds_rows("seed=2"))
    cells = {ln.split(" | ")[0].lstrip("| "): ln.split(" | ") for ln in text.splitlines() if ln.startswith("| rtn")}
    assert cells["rtn_int4"][1:4] == ["3 (1 =)", "0.0950", "0.0950 to 0.0950"], cells  # base: 3, 0.0967
    assert cells["rtn_int4"][4] == "=" and cells["rtn_int8"][1:3] == ["3", "0.0990"]
    assert "(k =) after seeds: in k seeds the scheme's figure is the unquantized baseline's" in text
    assert "(k =)" not in section(_seeds_rows(None))
    # every seed `=`: that figure, marked (nothing else to average); the verdict names no scheme then
    every = [{**r, "leakage": 0.1, "float_determined": r["scheme"] == "rtn_int4"} if r["scheme"] == "rtn_int4" else
             {**r, "leakage": 0.1} for r in _seeds_rows(None)]
    v = verdict([r for r in every if r["key"] == "seed=0"])
    assert v.startswith("verdict: no scheme is safer than the unquantized model"), v
    text = section(every)
    assert f"no scheme is chosen in any seed: in each, {NO_SAFER}" in text and "chosen in every seed" not in text
    cells = {ln.split(" | ")[0].lstrip("| "): ln.split(" | ") for ln in text.splitlines() if ln.startswith("| rtn")}
    assert cells["rtn_int4"][1:3] == ["3 (3 =)", "0.1000"] and cells["rtn_int4"][-1] == "0 of 3 |"


def test_the_frontier_s_tie_letters_pair_points_of_one_trained_model_only(tmp_path):
    """nux56: the seed sweep's frontier.png labelled points of separately trained models "tie A"
    (not ranked beyond their intervals), a ranking statement across models that aggregate.md's
    ties line never makes; now the letters group points of one training setup only, as that line."""
    import matplotlib.pyplot as plt

    for num, (seed, scheme, leak) in enumerate((("seed=0", "int8_weight_only", 0.1001),
                                                ("seed=1", "bf16", 0.1002),
                                                ("seed=1", "int8_weight_only", 0.1003))):
        job = tmp_path / f"{num}_{scheme}"
        job.mkdir()
        row = {**_row(scheme, "bootstrap", 0.0), "leakage": leak, "bits_per_weight": 8.0 + num}
        (job / "result.json").write_text(json.dumps({
            "job": {"num": num, "overrides": [f"quantizer={scheme}", seed]}, "status": "ok",
            "rows": [row], "warnings": []}))
    rows = agg.rows_of(agg.collect(tmp_path), tmp_path)
    fig = agg.frontier_figure(rows)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    assert "0: int8_weight_only" in labels, labels  # base: "0: int8_weight_only (tie A)"
    assert {"1: bf16 (tie A)", "2: int8_weight_only (tie A)"} <= set(labels), labels


def test_the_frontier_line_joins_points_of_one_trained_model_only(tmp_path):
    """A seed sweep's frontier.png drew one "frontier (non-dominated)" line through points of separately
    trained models (seed 0's int8 to seed 1's int4), a trade-off no single training offers: now one line per
    training setup, as the tie letters. Seed 1's points are each dominated by seed 0's here: one line before."""
    import matplotlib.pyplot as plt

    figures = {("seed=0", "int8_weight_only"): (0.10, 0.50), ("seed=0", "intx_weight_only_int2"): (0.05, 0.70),
               ("seed=1", "int8_weight_only"): (0.12, 0.52), ("seed=1", "intx_weight_only_int2"): (0.07, 0.72)}
    for num, ((seed, scheme), (leak, rmse)) in enumerate(figures.items()):
        job = tmp_path / f"{num}_{scheme}"
        job.mkdir()
        row = {**_row(scheme, "bootstrap", 0.0), "leakage": leak, "leakage_p10": leak - 0.002,
               "leakage_p90": leak + 0.002, "utility_rmse": rmse}
        (job / "result.json").write_text(json.dumps({
            "job": {"num": num, "overrides": [f"quantizer={scheme}", seed]}, "status": "ok",
            "rows": [row], "warnings": []}))
    fig = agg.frontier_figure(agg.rows_of(agg.collect(tmp_path), tmp_path))
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "-"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    assert len(lines) == 2, len(lines)  # base: 1, through seed 0's points only
    assert sorted(tuple(ln.get_xdata()) for ln in lines) == [(0.5, 0.7), (0.52, 0.72)]
    assert "frontier (non-dominated), one per trained model" in labels


def test_the_verdict_and_the_seeds_count_choose_the_better_utility_among_equal_leakages():
    """rv57b (a real `-m seed=0,1,2 data=synthetic_linear model=linear` sweep): int8_weight_only,
    int8_dynamic_activation_int8_weight and native_int8_dynamic read the same leakage to the last
    bit (0.05637162343063942, seed 2); the verdict chose int8_weight_only, first in the table, at rmse
    1.0404 over int8_dynamic_activation_int8_weight's 1.0394 (a dominated scheme), and the Across
    seeds section counted it "chosen in". Among equal leakages the better utility is chosen, in
    either direction of the metric, by both (report.safest_in_band)."""
    from mis_lightning.app.replicates import across_seeds_section
    from mis_lightning.report import verdict

    leak = 0.05637162343063942

    def rows(metric, first, second):
        out = []
        for seed in ("seed=0", "seed=1"):
            for job, (scheme, lk, u) in enumerate((("int8_weight_only", leak, first),
                                                   ("int8_dynamic_activation_int8_weight", leak, second),
                                                   ("bf16", 0.0573, first))):
                out.append({"job": f"{seed}-{job}", "key": seed, "scheme": scheme, "leakage": lk,
                            "leakage_p10": lk - 0.003, "leakage_p90": lk + 0.003, "baseline_leakage": 0.0575,
                            "bits_per_weight": 16.0 if scheme == "bf16" else 9.7, f"utility_{metric}": u,
                            "mis": 1 - lk, "d_eff": 30.0})
        return out

    for metric, first, second in (("rmse", 1.0404, 1.0394), ("accuracy", 0.901, 0.905)):
        r = rows(metric, first, second)
        v = verdict([x for x in r if x["key"] == "seed=0"])
        assert "): int8_dynamic_activation_int8_weight (leakage 0.0564)" in v, v
        text = across_seeds_section(r, lambda x: x["key"], lambda g, m=metric: f"utility_{m}", lambda s, keys: s)
        assert "chosen in every seed: int8_dynamic_activation_int8_weight" in text, text
        # the worse utility second: the table's order no longer decides, the utility does
        r = rows(metric, second, first)
        assert "): int8_weight_only (leakage 0.0564)" in verdict([x for x in r if x["key"] == "seed=0"])
