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
    kept, mark = label.rsplit("_+", 1)
    # whole overrides only, each <key>-<value> (ux54c: no "=" or ",", as the scheme jobs' folders)
    assert kept == "data-synthetic_linear_model-mlp_probe_mode-plan_plan.candidates-rtn_int8-rtn_int4-rtn_int2"
    assert mark.startswith("2more_") and len(mark.split("_")[1]) == 8
    assert job_subdir(0, None, overrides.replace("=20", "=2")) != name  # the hash tells them apart
    assert job_subdir(3, None, "seed=1,data.d=16") == "3_seed-1_data.d-16"  # short: every override, no sweep known
    assert job_subdir(5, "int8_weight_only", overrides) == "5_int8_weight_only"


def test_job_folders_of_a_scheme_carry_the_other_swept_overrides(monkeypatch):
    """nux53 #13: `-m quantizer=int8_weight_only seed=0,1 data=tokbin` named its jobs
    `0_int8_weight_only` and `1_int8_weight_only`: the seed that tells them apart was in neither.
    The scheme is followed by the job's swept overrides (read from the command line by Hydra's
    parser) as `<key>-<value>`, not by the fixed ones; a sweep over schemes alone keeps `<num>_<scheme>`."""
    import sys

    from mis_lightning.app.resolvers import job_subdir, swept_keys

    argv = ["-m", "quantizer=int8_weight_only", "seed=0,1", "data=tokbin", "model.hidden=range(2,4)",
            "hydra.searchpath=[file:///x]"]
    assert swept_keys(argv) == {"seed", "model.hidden"}
    assert swept_keys(["quantizer=a,b", "data=x"]) == {"quantizer"}
    assert swept_keys(["x=[unclosed"]) is None  # not a Hydra command line: nothing known
    job = "batch_fn=pkg.xy,data=tokbin,model.hidden=3,quantizer=int8_weight_only,seed=1"
    monkeypatch.setattr(sys, "argv", ["mis-lightning", *argv])  # the resolver's own reading
    assert job_subdir(1, "int8_weight_only", job) == "1_int8_weight_only_model.hidden-3_seed-1"
    # no "=" or ",": the printed `mode=assess ckpt_path=<folder>/model.ckpt` parses (a "," would read as a sweep)
    assert swept_keys([f"ckpt_path=/m/{job_subdir(1, 'int8_weight_only', job)}/model.ckpt"]) == set()
    assert job_subdir(0, "bf16", "quantizer=bf16,x=[a,b]", swept={"x"}) == "0_bf16_x-a-b"
    assert job_subdir(1, "int8_weight_only", job, swept={"quantizer"}) == "1_int8_weight_only"
    # no scheme (ux54c): the swept overrides alike; a folder the printed hint parses unquoted
    assert job_subdir(2, None, "seed=1,data.d=16", swept={"seed"}) == "2_seed-1"
    assert job_subdir(2, None, "seed=1,data.d=16", swept={"seed", "data.d"}) == "2_seed-1_data.d-16"
    assert swept_keys([f"ckpt_path=/m/{job_subdir(2, None, 'seed=1,data.d=16', swept=set())}/model.ckpt"]) == set()


def test_sweep_end_aggregate_counts_this_sweeps_jobs_only(tmp_path, monkeypatch):
    """W6: a sweep re-run into the same sweep dir counted the earlier sweep's jobs: its
    aggregate said "3 jobs (1 failed)" and it exited 1 for a stale failed job. The jobs record
    the sweep's id; the sweep-end aggregate leaves the stale ones out (and says so), and
    mis-lightning-aggregate over the dir flags the mix."""
    import os
    import time

    from omegaconf import OmegaConf

    monkeypatch.delenv("MIS_LIGHTNING_SWEEP_ID", raising=False)
    old = tmp_path / "1_int4_weight_only_tinygemm"
    old.mkdir()
    agg.write_failure(old / "result.json", RuntimeError("needs CUDA"), stage="configuration",
                      job={"num": 1, "overrides": ["quantizer=int4_weight_only_tinygemm"], "sweep_id": "earlier"})
    legacy = _result(tmp_path / "2_bf16", 2, "bf16", 0.3, {"rmse": 0.8})  # no sweep id (older version)
    past = time.time() - 3600
    os.utime(legacy, (past, past))

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    cb = agg.AggregateSweep(verbose=False)
    cb.on_multirun_start(cfg)
    sid = os.environ.get("MIS_LIGHTNING_SWEEP_ID", "none")
    for num, scheme in enumerate(["int8_weight_only", "intx_weight_only_int4"]):
        _result(tmp_path / f"{num}_{scheme}", num, scheme, 0.2, {"rmse": 0.7})
        res = json.loads((tmp_path / f"{num}_{scheme}" / "result.json").read_text())
        res["job"]["sweep_id"] = sid  # what run_job records (job_info)
        (tmp_path / f"{num}_{scheme}" / "result.json").write_text(json.dumps(res))
    cb.on_multirun_end(cfg)  # no SystemExit: the failed job is not this sweep's
    assert "MIS_LIGHTNING_SWEEP_ID" not in os.environ
    md = (tmp_path / "aggregate.md").read_text()
    assert "2 jobs, 2 rows." in md and "note: 2 result(s) of earlier sweeps into this dir left out" in md
    assert "tinygemm" not in md and "bf16" not in md


    assert agg.main([str(tmp_path), "--quiet"]) == 1  # the whole dir: the stale failure counts ...
    md = (tmp_path / "aggregate.md").read_text()
    assert "4 jobs (1 failed)" in md
    assert f"note: this dir holds the results of 2 sweeps (sweep ids {', '.join(sorted([sid, 'earlier']))})" in md


def test_sweep_end_exit_message_says_when_every_job_failed(tmp_path, monkeypatch):
    """nux56: a sweep whose every job failed (a typo in schemes=[...]) exited with "the others are
    aggregated in ...": there were no others. Some failed: "the others"; all failed: "no job scored"."""
    import os

    import pytest
    from omegaconf import OmegaConf

    monkeypatch.delenv("MIS_LIGHTNING_SWEEP_ID", raising=False)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    for all_failed in (True, False):
        for old in tmp_path.glob("*/result.json"):
            old.unlink()
        cb = agg.AggregateSweep(verbose=False)
        cb.on_multirun_start(cfg)
        sid = os.environ.get("MIS_LIGHTNING_SWEEP_ID", "none")
        for num in range(2):
            if all_failed or num == 0:
                agg.write_failure(tmp_path / f"{num}_seed-{num}" / "result.json", ValueError("unknown scheme"),
                                  stage="configuration", job={"num": num, "overrides": [f"seed={num}"], "sweep_id": sid})
            else:
                path = _result(tmp_path / f"{num}_seed-{num}", num, "rtn_int8", 0.2, {"rmse": 0.7})
                res = json.loads(path.read_text())
                res["job"]["sweep_id"] = sid
                path.write_text(json.dumps(res))
        with pytest.raises(SystemExit) as info:
            cb.on_multirun_end(cfg)
        msg = str(info.value.code)
        assert ("no job scored a scheme" in msg) is all_failed and ("the others" in msg) is not all_failed, msg


def test_a_multirun_job_records_its_sweep_id(monkeypatch):
    """W6: the id set by AggregateSweep.on_multirun_start reaches the job's record."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mis_lightning.app import job

    hc = OmegaConf.create({"mode": RunMode.MULTIRUN, "job": {"num": 3, "id": "x_3", "name": "cli",
                                                             "override_dirname": "seed=1"},
                           "runtime": {"choices": {}, "output_dir": "/tmp/x"}, "overrides": {"task": ["seed=1"]}})
    monkeypatch.setattr(job, "_hydra_config", lambda: hc)
    monkeypatch.setenv("MIS_LIGHTNING_SWEEP_ID", "abc123")
    assert job.job_info()["sweep_id"] == "abc123"


def test_a_sweep_over_tasks_shows_every_row_with_its_own_utility(tmp_path):
    """D3: a sweep over regression and binary data (the documented
    `data=synthetic_linear,synthetic_logistic`): frontier.png plotted the rmse rows only ("2
    results") and aggregate.md showed rmse alone, "-" for the binary rows. Now one panel per
    utility and one column per utility, each row with its own."""
    _result(tmp_path / "0_a", 0, "int8_weight_only", 0.10, {"rmse": 0.7, "mae": 0.5})
    _result(tmp_path / "1_a", 1, "int8_weight_only", 0.20, {"auroc": 0.9, "accuracy": 0.8})
    _result(tmp_path / "2_b", 2, "intx_weight_only_int2_g32", 0.05, {"rmse": 0.9, "mae": 0.6})
    _result(tmp_path / "3_b", 3, "intx_weight_only_int2_g32", 0.15, {"auroc": 0.8, "accuracy": 0.7})
    rows = agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| job"))
    assert "| rmse | auroc |" in head
    line = next(ln for ln in md.splitlines() if ln.startswith("| 1 |"))
    assert "| - | 0.9000 |" in line  # the binary job's own utility
    fig = agg.frontier_figure(rows)
    assert [ax.get_xlabel() for ax in fig.axes] == ["rmse (validation; lower is better)",
                                                     "auroc (validation; higher is better)"]
    assert fig._suptitle.get_text() == "Privacy-utility frontier (4 results at 4 distinct points)"
    assert [ax.get_title() for ax in fig.axes] == ["rmse (2 results)", "auroc (2 results)"]


def test_the_aggregate_keeps_the_jobs_warnings(tmp_path):
    """fu21: a sweep whose jobs all warned `d / n = 0.825 is not small ...` (figures indicative
    only) had an aggregate.md (and printed table) without any warning; the jobs' warnings
    follow the table, each once with the jobs that gave it."""
    dn = "d / n = 0.825 is not small (33 assessed weights, 40 records): every figure is indicative only"
    _result(tmp_path / "0_int8_weight_only", 0, "int8_weight_only", 0.85, {"rmse": 2.7}, warnings=[dn])
    _result(tmp_path / "1_intx_weight_only_int2", 1, "intx_weight_only_int2", 0.57, {"rmse": 4.2},
            warnings=[dn, "the model is not at a minimum of the training loss"])
    _result(tmp_path / "2_bf16", 2, "bf16", 0.86, {"rmse": 2.7})
    agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    assert "## Warnings" in md
    assert f"- jobs 0, 1: {dn}" in md
    assert "- job 1: the model is not at a minimum of the training loss" in md
    # aggregate.csv carries them too, on each of the job's rows
    import csv

    with open(tmp_path / "aggregate.csv", newline="") as fh:
        by_job = {row["job"]: row["warnings"] for row in csv.DictReader(fh)}
    assert by_job == {"0": dn, "1": f"{dn} | the model is not at a minimum of the training loss", "2": ""}


def test_the_figures_mark_warned_results(tmp_path):
    """The frontier figure showed warned jobs' points like any other (fu21 left it): a figure
    shared without aggregate.md lost the caveat. Warned jobs' points are now hollow and labelled
    "(warned)"; the single-job figure prints the report's warnings under its panels."""
    from mis_lightning.report import privacy_utility_figure

    dn = "d / n = 0.825 is not small (33 assessed weights, 40 records): every figure is indicative only"
    _result(tmp_path / "0_int8_weight_only", 0, "int8_weight_only", 0.85, {"rmse": 2.7}, warnings=[dn])
    _result(tmp_path / "1_bf16", 1, "bf16", 0.86, {"rmse": 2.5})
    rows = agg.aggregate(tmp_path, verbose=False)
    fig = agg.frontier_figure(rows)
    ax = fig.axes[0]
    by_label = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    warned = next(ln for lab, ln in by_label.items() if lab.startswith("0: int8_weight_only"))
    clean = next(ln for lab, ln in by_label.items() if lab.startswith("1: bf16"))
    assert warned.get_label().endswith("(warned)") and not clean.get_label().endswith("(warned)")
    assert warned.get_markerfacecolor() == "none" and clean.get_markerfacecolor() != "none"
    assert "hollow: job warned" in fig.legends[0].get_title().get_text()

    one = [{"scheme": "int8_weight_only", "bits_per_weight": 8.5, "leakage": 0.1, "leakage_p10": 0.09,
            "leakage_p90": 0.11, "baseline_leakage": 0.1}]
    shown = " ".join(t.get_text() for t in privacy_utility_figure(one, warnings=[dn]).texts)
    assert "warning: d / n = 0.825 is not small" in shown
    assert "warning" not in " ".join(t.get_text() for t in privacy_utility_figure(one).texts)


def test_a_sweeps_jobs_after_the_first_print_the_columns_legend_as_a_pointer():
    """ux29: a sweep printed every job's full legend (six before the aggregate). Job 0 of a
    multirun and a single run print the table unchanged; the other jobs print one line in place
    of the columns' entries, and keep the entries their own rows need (here the utility's)."""
    from mis_lightning.app.job import sweep_table
    from mis_lightning.report import CONSOLE_WIDTH, Report, SchemeResult

    res = SchemeResult(name="rtn_int8", leakage=0.1, mis=0.9, baseline_leakage=0.2, d_eff=3.0, d=4,
                       zero_fraction=0.0, pinned_fraction=0.0, bits_per_weight=8.0, method="clt",
                       utility={"rmse": 0.7})
    rep = Report(n=40, d=4, estimation={}, diagnostics={}, schemes={"rtn_int8": res}, baseline_leakage=0.2,
                 baseline_mis=0.8, warnings=["the model is not at a minimum of the training loss"])
    full = rep.table()
    assert "legend: leakage = advantage" in full and "  d_eff: how many weights still leak" in full
    printed = rep.table(width=CONSOLE_WIDTH)  # what a job prints (cv53: fitted to 100 columns)
    for info in ({"multirun": False, "num": None}, {"multirun": True, "num": 0}):
        assert sweep_table(rep, printed, info, table_file="report.md") == printed
    short = sweep_table(rep, printed, {"multirun": True, "num": 3}, table_file="report.md")
    assert "legend: leakage = advantage" not in short and "d_eff: how many weights" not in short
    assert "legend: the columns as under job 0's table; in full in each job's report.md." in short
    assert "  rmse: utility of the quantized copy" in short  # an entry of this job's rows
    # the rest of the table as in the full one: the rows, the warnings
    assert short.split("\n\n")[0] == printed.split("\n\n")[0]
    assert short.endswith("warnings:\n  - the model is not at a minimum of the training loss")


def test_a_sweep_job_that_assessed_one_scheme_points_to_the_aggregate_instead_of_a_verdict():
    """fu30: each job of ``mis-lightning -m quantizer=a,b,...`` assesses one scheme and printed
    "verdict: safest ...: a", a choice among one. In a multirun a one-scheme job's table (printed
    and in report.md) says there is no verdict in the job and points to the sweep's aggregate; a
    single run, or a job with several schemes, keeps its verdict."""
    from mis_lightning.app.job import sweep_table, sweep_verdict_note
    from mis_lightning.report import Report, SchemeResult

    def result(name: str, leakage: float) -> SchemeResult:
        return SchemeResult(name=name, leakage=leakage, mis=1 - leakage, baseline_leakage=0.2, d_eff=3.0, d=4,
                            zero_fraction=0.0, pinned_fraction=0.0, bits_per_weight=8.0, method="clt",
                            utility={"rmse": 0.7})

    def report(*names: str) -> Report:
        return Report(n=40, d=4, estimation={}, diagnostics={}, baseline_leakage=0.2, baseline_mis=0.8,
                      schemes={n: result(n, 0.1 + 0.01 * i) for i, n in enumerate(names)})

    one, two = report("rtn_int8"), report("rtn_int8", "rtn_int4")
    sweep_job, single = {"multirun": True, "num": 2}, {"multirun": False, "num": None}
    assert sweep_verdict_note(one, single) is None and sweep_verdict_note(two, sweep_job) is None
    note = sweep_verdict_note(one, sweep_job)
    assert note is not None and "one scheme (rtn_int8)" in note and "aggregate.md" in note
    for info in (sweep_job, {"multirun": True, "num": 0}):
        text = sweep_table(one, one.table(verdict_note=note), info, table_file="report.md")
        assert "verdict: safest" not in text and note in " ".join(text.split())  # wrapped at 100 columns
    assert "verdict: safest" in one.table() and "verdict: safest" in two.table(verdict_note=None)


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def test_a_main_module_target_under_a_launcher_with_processes_of_its_own_stops_before_launching(
        tmp_path, monkeypatch, capsys):
    """nu42c: under the joblib (or Ray, SLURM) launcher a `_target_` into `__main__` (a class of the
    script that starts the sweep) failed in every job with Hydra's "Error locating target"; the
    sweep now stops before launching, naming the key and the fix. In-process launchers pass. The
    launcher node is written out (as Hydra composes it): no plugin needed."""
    import pytest
    from omegaconf import OmegaConf

    from mis_lightning.app.launchers import check_main_module_paths, separate_process_launcher

    job = {"model": {"_target_": "__main__.TinyMLP", "num_features": "???"}, "batch_fn": "__main__.xy",
           "data": {"_target_": "my_pkg.data.Toy"}, "callbacks": {"a": {"_target_": "pkg.Cb"}}}
    joblib = {"_target_": JOBLIB, "n_jobs": 2, "backend": None, "prefer": "processes", "require": None}
    cfg = OmegaConf.create({**job, "hydra": {"launcher": joblib, "sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as info:
        agg.AggregateSweep(verbose=False).on_multirun_start(cfg)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "model._target_=__main__.TinyMLP, batch_fn=__main__.xy: the joblib launcher runs each job" in err
    assert "set model._target_=my_pkg.models.TinyMLP" in err and "nothing was launched" in err
    # the same check in each job's own configuration checks (a sweep without AggregateSweep)
    with pytest.raises(ValueError, match=r"model._target_=__main__.TinyMLP"):
        check_main_module_paths(OmegaConf.create(job), joblib)
    ray = {"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"}
    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
    assert [separate_process_launcher(x) for x in (ray, slurm)] == ["Ray", "submitit"]
    # in one process: the basic launcher, joblib on threads or with one job; no __main__ path
    for launcher in ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
                     {**joblib, "backend": "threading"}, {**joblib, "prefer": "threads"}, {**joblib, "n_jobs": 1}, None):
        check_main_module_paths(OmegaConf.create(job), launcher)
    check_main_module_paths(OmegaConf.create({**job, "model": {"_target_": "my_pkg.models.TinyMLP"},
                                              "batch_fn": "my_pkg.models.xy"}), joblib)


def test_each_job_checks_its_main_module_paths_in_a_multirun_only(monkeypatch):
    """The job's own check (a sweep without AggregateSweep): a multirun under joblib refuses; a
    single run with the same launcher configured runs in this process and passes."""
    import pytest
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mis_lightning.app import job

    cfg = OmegaConf.create({"model": {"_target_": "__main__.TinyMLP"}})
    for mode, refused in ((RunMode.MULTIRUN, True), (RunMode.RUN, False)):
        hc = OmegaConf.create({"mode": mode, "launcher": {"_target_": JOBLIB, "n_jobs": 2}})
        monkeypatch.setattr(job, "_hydra_config", lambda hc=hc: hc)
        if refused:
            with pytest.raises(ValueError, match="the joblib launcher runs each job"):
                job.check_launched_paths(cfg)
        else:
            job.check_launched_paths(cfg)


def test_a_joblib_sweep_with_a_main_module_target_exits_before_any_job(tmp_path, monkeypatch, capsys):
    """The console script end to end (where hydra-joblib-launcher is installed): exit status 2,
    nothing launched."""
    import sys

    import pytest

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from mis_lightning import cli

    monkeypatch.setattr(sys, "argv", ["mis-lightning", "-m", "hydra/launcher=parallel", "model=linear",
                                      "data=synthetic_linear", "model._target_=__main__.TinyMLP", "seed=0,1",
                                      f"hydra.sweep.dir={tmp_path / 's'}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    assert "model._target_=__main__.TinyMLP: the joblib launcher" in capsys.readouterr().err
    assert not any((tmp_path / "s").glob("*/result.json"))
