"""The ``mis-lightning`` command: a single run, a multirun with aggregation, and the
non-editable install (configs shipped inside the package)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mis_lightning.app import aggregate as agg
from mis_lightning.quantization import QuantizationScheme, SchemeUnavailableError, register_scheme
from mis_lightning.report import CONSOLE_WIDTH, Report, to_plain

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "data=synthetic_linear", "data.n_train=400", "data.n_val=200", "data.batch_size=400",
    "model=linear", "trainer.max_epochs=2", "mis.estimation.num_records=128", "mis.scoring.uncertainty_draws=2",
    "logger=csv", "progress=false",
    # the app's plumbing is tested here, not the correlated headline (tests/test_correlated.py):
    # the independent-coordinate form skips the correlated Monte Carlo (half of an assessment)
    "mis.scoring.covariance=independent",
]


def _env(extra_path: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path or str(ROOT), env.get("PYTHONPATH")) if p)
    env["MPLBACKEND"] = "Agg"
    env["HYDRA_FULL_ERROR"] = "1"
    return env


# The app runs that need a fresh process (the ``python -m mis_lightning.cli`` entry point, no state of
# the test process): several independent runs in ONE subprocess, each in its own working directory
# with its own stdout/stderr files (redirected at the file-descriptor level) and exit status, as
# separate processes would give them; one start and import of torch/Lightning/Hydra (~6 s of CPU)
# instead of one per run. An uncaught SystemExit's code is turned into a status as the
# interpreter does (None -> 0, a message -> printed to stderr, status 1).
APP_RUNS = r"""
import json, os, runpy, sys, traceback
runs = json.loads(sys.argv[1])
codes = {}
for name, cwd, args in runs:
    os.chdir(cwd)
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(runs_dir + f"/{name}.out", "w") as o, open(runs_dir + f"/{name}.err", "w") as e:
        os.dup2(o.fileno(), 1); os.dup2(e.fileno(), 2)
        sys.argv = ["mis-lightning", *args]
        try:
            runpy.run_module("mis_lightning.cli", run_name="__main__", alter_sys=False)
            code = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code
            if not isinstance(code, int):
                print(code, file=sys.stderr); code = 1
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    codes[name] = code
with open(runs_dir + "/codes.json", "w") as fh:
    json.dump(codes, fh)
"""


class _Proc:
    """What ``subprocess.run`` returns, for one run of the shared process."""

    def __init__(self, logs: Path, name: str, codes: dict[str, int]):
        self.returncode = codes[name]
        self.stdout = (logs / f"{name}.out").read_text()
        self.stderr = (logs / f"{name}.err").read_text()


@pytest.fixture(scope="module")
def app_runs(tmp_path_factory):
    """The single run, the TDC CSV run and the multirun of this module, run one after the other
    in one subprocess: ``{name: (working directory, _Proc)}``."""
    base = tmp_path_factory.mktemp("app_runs")
    logs = base / "logs"
    logs.mkdir()
    runs = {
        # mlp_probe + csv logger: the model's and datamodule's hparams (task) must merge
        "single": ([*FAST, "model=mlp_probe", "schemes=[int8_weight_only,intx_weight_only_int4_g32,bf16]",
                    f"hydra.run.dir={base / 'single' / 'run'}"]),
        "multirun": ["-m", f"quantizer={','.join(MULTIRUN_SCHEMES)}", "model=linear,logistic",
                     *[a for a in FAST if a != "model=linear"], f"hydra.sweep.dir={base / 'multirun' / 'sweep'}"],
    }
    if importlib.util.find_spec("rdkit") is not None:
        sample = ROOT / "tests" / "data" / "tdc_format_sample.csv"  # rows 7 and 19 unusable
        cwd = base / "tdc"
        runs["tdc"] = ["data=tdc_admet", f"data.path={sample}", "data.featurizer=physchem",
                       f"data.cache_dir={cwd / 'cache'}", "model=linear", "trainer.max_epochs=2",
                       "mis.estimation.num_records=16", "mis.scoring.uncertainty_draws=0",
                       "mis.scoring.covariance=independent", "logger=csv", "progress=false",
                       "schemes=[int8_weight_only]", f"hydra.run.dir={cwd / 'run'}"]
    order = [n for n in ("single", "tdc", "multirun") if n in runs]  # the multirun last: its sweep id
    for n in order:
        (base / n).mkdir()
    script = f"runs_dir = {str(logs)!r}\n" + APP_RUNS
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([[n, str(base / n), runs[n]] for n in order])],
                          cwd=base, env=_env(), check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    codes = json.loads((logs / "codes.json").read_text())
    return {n: (base / n, _Proc(logs, n, codes)) for n in order}


def _ok(proc: _Proc) -> _Proc:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def test_single_run_writes_reports_and_prints_table(app_runs):
    tmp_path, proc = app_runs["single"]
    out = tmp_path / "run"
    _ok(proc)
    for f in ("report.json", "report.csv", "privacy_utility.png", "result.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    lines = proc.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("scheme"))
    # the console's table (cv53): 100 columns, without the derived MIS (report.md has every column)
    assert all(k in lines[head] for k in ("bits/w", "rmse", "leakage")) and "MIS" not in lines[head].split()
    assert all(len(ln) <= 100 for ln in lines[head:head + 5]), lines[head:head + 5]
    for name in ("int8_weight_only", "intx_weight_only_int4_g32", "bf16"):
        assert any(ln.startswith(name) for ln in lines[head:]), name
    assert f"figure: {out / 'privacy_utility.png'}" in proc.stdout
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["schemes"]) == ["int8_weight_only", "intx_weight_only_int4_g32", "bf16"]
    assert rep["estimation"]["num_records"] == 128
    res = json.loads((out / "result.json").read_text())
    assert [r["scheme"] for r in res["rows"]] == ["int8_weight_only", "intx_weight_only_int4_g32", "bf16"]
    assert "data=synthetic_linear" in res["job"]["overrides"]
    assert res["job"]["num"] is None and res["task"] == "regression"
    assert 0.0 <= res["rows"][0]["leakage"] <= 1.0 and "utility_rmse" in res["rows"][0]
    # ux31: the saved report loads back (Report.from_json): the table as printed and written, the rows
    # the sweep aggregate reads from result.json
    back = Report.from_json(out / "report.json")
    assert back.to_json() == (out / "report.json").read_text()
    # report.md keeps the warnings in full, the console one line each pointing to it (nux51 #9)
    assert back.table(verbose=True) + "\n" == (out / "report.md").read_text()
    assert back.table(warnings_in_full=str(out / "report.md"), width=CONSOLE_WIDTH) in proc.stdout
    assert "MIS" in back.table(verbose=True).splitlines()[0].split()
    assert json.loads(json.dumps(to_plain(back.rows()))) == res["rows"]
    # the csv logger got the report's metrics
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "mis/int8_weight_only/leakage" in metrics
    rows = list(csv.DictReader(io.StringIO(metrics)))
    trained = max(int(r["epoch"]) for r in rows if r.get("epoch") and not r.get("mis/int8_weight_only/leakage"))
    assert [r["epoch"] for r in rows if r.get("mis/int8_weight_only/leakage")] == [str(trained)]
    # the tracker's hyperparameters carry the job's seed, schemes and overrides beside the
    # modules' own (a sweep's runs could be told apart by their names only before session 42)
    hp = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    assert hp["job/schemes"] == "int8_weight_only,intx_weight_only_int4_g32,bf16" and hp["job/seed"] == 0
    assert "model=mlp_probe" in hp["job/overrides"] and "task" in hp  # the datamodule's, merged as before
    # no Hydra/Lightning files outside the run dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bad_scheme_fails_before_training(tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from mis_lightning.app.job import run_job

    with initialize_config_module("mis_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, "logger=none", "schemes=[int9_weight_only]"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "r")
    with pytest.raises(KeyError, match="unknown quantization scheme 'int9_weight_only'"):
        run_job(cfg)
    # nothing trained: the only file is the failed job's record
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["result.json"]
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["status"] == "failed" and res["stage"] == "configuration" and res["rows"] == []
    assert res["error"].startswith("UnknownSchemeError: unknown quantization scheme 'int9_weight_only'")
    assert res["schemes"] == ["int9_weight_only"]


def _console(monkeypatch, capsys, args: list[str]) -> tuple[object, str]:
    """The console script in this process: ``(exit code, stderr)``."""
    from mis_lightning import cli

    monkeypatch.setattr(sys, "argv", ["mis-lightning", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


def test_cli_prints_a_configuration_error_without_a_traceback(tmp_path, monkeypatch, capsys):
    """The console script: a misspelled scheme ends with its message alone (the "did you mean"
    list) and exit status 2, before training; Hydra's traceback is kept for later failures."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "logger=none", "schemes=[int8_wieght_only]", f"hydra.run.dir={run}"])
    assert code == 2
    assert "configuration error (UnknownSchemeError): unknown quantization scheme 'int8_wieght_only'" in err
    assert "did you mean int8_weight_only" in err
    assert "Traceback" not in err
    assert json.loads((run / "result.json").read_text())["stage"] == "configuration"


@pytest.mark.parametrize("override, culprit", [
    ("mis.estimation.mode=exakt", "configuration error (ValueError): estimation (mode) must be 'auto', 'exact' "
                                  "or 'diagonal', got 'exakt'"),
    # a misspelled field added with `+` reaches the dataclass: the close name is given
    ("+mis.estimation.num_record=64", "configuration error (TypeError): mis.estimation: EstimationConfig() got "
                                      "unexpected keyword argument(s) ['num_record'] ('num_record': did you mean "
                                      "'num_records'?)"),
])
def test_cli_instantiation_and_availability_errors_are_one_line(tmp_path, monkeypatch, capsys, override, culprit):
    """An invalid option of a config class (Hydra's InstantiationException, unwrapped to the
    class's own error) and a scheme this machine cannot run: one message, exit status 2, no
    traceback; result.json records the unwrapped error (the aggregate's error cell shows it)."""
    from mis_lightning import cli

    run = tmp_path / "r"
    monkeypatch.setattr(sys, "argv", ["mis-lightning", *FAST, "logger=none", override, f"hydra.run.dir={run}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err and "InstantiationException" not in err
    res = json.loads((run / "result.json").read_text())
    assert res["stage"] == "configuration" and "InstantiationException" not in res["error"]


class _Unavailable(QuantizationScheme):
    """Never available here (stands for int4_tinygemm on a machine without CUDA)."""

    name = "test_unavailable"

    def check_available(self) -> None:
        raise SchemeUnavailableError("scheme 'test_unavailable' is unavailable: it needs a TPU")

    def _quantize_copy(self, model):  # pragma: no cover - never reached
        raise AssertionError


@pytest.fixture
def unavailable_scheme():
    from mis_lightning.quantization import registry

    register_scheme("test_unavailable", lambda **kw: _Unavailable(**kw), overwrite=True)
    yield "test_unavailable"
    registry._FACTORIES.pop("test_unavailable", None)


def test_unavailable_scheme_fails_before_training(tmp_path, unavailable_scheme):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from mis_lightning.app.job import run_job

    cases = [
        ([unavailable_scheme], "false",
         "every selected scheme is unavailable on this machine, so nothing was trained: "
         "scheme 'test_unavailable' is unavailable: it needs a TPU"),
        ([unavailable_scheme, "rtn_int8"], "true",
         "1 of 2 schemes are unavailable on this machine, so nothing was trained: scheme "
         "'test_unavailable' is unavailable: it needs a TPU (mis.scoring.strict=false reports them as "
         "error rows and assesses the others)"),
    ]
    for i, (names, strict, msg) in enumerate(cases):
        with initialize_config_module("mis_lightning.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*FAST, "logger=csv", f"schemes=[{','.join(names)}]",
                                               f"mis.scoring.strict={strict}"])
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / str(i))
        with pytest.raises(SchemeUnavailableError) as info:
            run_job(cfg)
        assert str(info.value) == msg
        # refused before the data or the trainer were built: no logger folder, no checkpoint
        assert [p.name for p in (tmp_path / str(i)).iterdir()] == ["result.json"]
        res = json.loads((tmp_path / str(i) / "result.json").read_text())
        assert (res["status"], res["stage"], res["error"]) == (
            "failed", "configuration", f"SchemeUnavailableError: {msg}")


def test_a_single_run_that_could_score_no_scheme_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """A job whose every scheme would be an error row (here a group size of 128 that divides no layer
    of the 10-input linear model) exited 0 with "verdict: no scheme succeeded": a script or CI
    reading the status took a run that released no figure for a success. It then trained and exited 1
    after writing its outputs; since fu31 it is refused before training (exit 2, the library's check
    of every front end, naming the scheme and why)."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "logger=none", "schemes=[intx_weight_only_int4_g128]",
                                               f"hydra.run.dir={run}"])
    assert code == 2, err
    assert "no requested scheme can quantize this model's assessed weights" in err
    assert "'intx_weight_only_int4_g128' would quantize no weight" in err
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "failed" and res["stage"] == "configuration"
    assert not list(run.glob("*.ckpt")) and not (run / "model.ckpt").exists()


def test_frontier_says_no_scheme_succeeded():
    rows = [{"job": 0, "scheme": "int4_tinygemm", "error": "job failed (configuration): "
             "SchemeUnavailableError: needs CUDA", "job_status": "failed"}]
    fig = agg.frontier_figure(rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == [
        "no scheme succeeded\njob 0: int4_tinygemm: job failed (configuration): "
        "SchemeUnavailableError: needs CUDA"]
    assert ax.get_xlabel() == "bits per weight" and not ax.lines


MULTIRUN_SCHEMES = ["int8_weight_only", "intx_weight_only_int4_g32", "intx_weight_only_int2_g32"]


def test_multirun_one_job_per_scheme_and_a_failing_job_aggregates_the_others_and_exits_1(app_runs):
    """One sweep (one process start) for both: one job per scheme, aggregated, and failing jobs
    aggregated with the others and an exit status of 1. quantizer x model: every model=logistic
    job is refused at configuration (a binary model on regression data), the linear ones run."""
    tmp_path, proc = app_runs["multirun"]
    sweep = tmp_path / "sweep"
    names = MULTIRUN_SCHEMES
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 job(s) of the sweep failed (job 1, 3, 5)" in proc.stderr
    ok, bad = [2 * i for i in range(3)], [2 * i + 1 for i in range(3)]  # the model varies fastest
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())

    def folder(j, n):  # the scheme, then the other swept option (nux53 #13: the number alone told them apart)
        return f"{j}_{n}_model-{'linear' if j in ok else 'logistic'}"

    assert jobs == sorted(folder(j, n) for n, a, b in zip(names, ok, bad) for j in (a, b))
    errors = []
    for n, i, j in zip(names, ok, bad):
        res = json.loads((sweep / folder(i, n) / "result.json").read_text())
        assert res["job"]["num"] == i and [r["scheme"] for r in res["rows"]] == [n]
        failed = json.loads((sweep / folder(j, n) / "result.json").read_text())
        assert failed["status"] == "failed" and failed["stage"] == "configuration"
        assert failed["error"].startswith("ValueError: model LogisticRegression is a 'binary' model")
        assert "Traceback" in failed["traceback"] and failed["job"]["num"] == j
        errors.append(failed["error"])
    with open(sweep / "aggregate.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["job"], r["scheme"], r["job_status"]) for r in rows] == [
        (str(j), n, status) for n, i, j in zip(names, ok, bad) for j, status in ((i, "ok"), (j, "failed"))]
    good, failed_rows = rows[0::2], rows[1::2]
    assert good[0]["swept"] == "quantizer=int8_weight_only model=linear"
    assert all(0.0 < float(r["leakage"]) < 1.0 for r in good)
    assert float(good[2]["bits_per_weight"]) < float(good[0]["bits_per_weight"])
    assert all(r["leakage"] == "" for r in failed_rows)
    assert [r["error"] for r in failed_rows] == ["job failed (configuration): " + e for e in errors]
    md = (sweep / "aggregate.md").read_text()
    assert "6 jobs (3 failed), 6 rows." in md
    assert md.count("\n| ") == 7 and "| leakage |" in md  # header + 6 rows
    assert md.split("## Failures\n\n")[1].split("\n## ")[0].strip() == "\n".join(
        f"- job {j} (quantizer={n} model=logistic), {n}: job failed (configuration): {e}"
        for n, j, e in zip(names, bad, errors))
    assert (sweep / "frontier.png").stat().st_size > 0
    assert "Aggregated 6 jobs (3 failed)" in proc.stdout
    # the legend of the columns once, under job 0's table; the other jobs point to it (ux29: one
    # legend a job before the aggregate), their tables and warnings printed (one line each: nux51 #9)
    assert proc.stdout.count("legend: leakage = advantage of the best membership-inference attack") == 1
    assert proc.stdout.count("legend: the columns as under job 0's table") == 2  # jobs 2 and 4
    assert proc.stdout.index("legend: leakage = ") < proc.stdout.index("legend: the columns as under job 0")
    for i, n in zip(ok, names):
        assert (sweep / folder(i, n) / "report.md").read_text().count("legend: leakage = advantage") == 1
        # ux31 (fu30): no verdict over one scheme in a job: a pointer to the aggregate
        assert f"verdict: none in this job, which assessed one scheme ({n})" in (
            sweep / folder(i, n) / "report.md").read_text()
        # fu32: the job's report.json loads back to the same table, not a "verdict: safest" over one scheme
        assert Report.from_json(sweep / folder(i, n) / "report.json").table(verbose=True) + "\n" == (
            sweep / folder(i, n) / "report.md").read_text()
    assert "verdict: safest" not in proc.stdout
    # the aggregate command says so too
    assert agg.main([str(sweep), "--quiet"]) == 1

    # re-run the aggregation on the sweep dir without the failed jobs (the mis-lightning-aggregate
    # command): status 0
    for n, j in zip(names, bad):
        shutil.rmtree(sweep / folder(j, n))
    for f in ("aggregate.csv", "aggregate.md", "frontier.png"):
        (sweep / f).unlink()
    assert agg.main([str(sweep), "--quiet"]) == 0
    assert (sweep / "aggregate.csv").read_text().count("\n") == 4
    assert (sweep / "frontier.png").is_file()
    assert agg.main([str(tmp_path / "nowhere")]) == 2


def _fake_result(job_dir: Path, num: int, scheme: str, leakage: float, rmse: float) -> None:
    job_dir.mkdir(parents=True)
    row = {"scheme": scheme, "bits_per_weight": 4.0, "leakage": leakage, "mis": 1 - leakage,
           "leakage_p10": None, "leakage_p90": None, "baseline_leakage": 0.5, "d_eff": 3.0,
           "d": 10, "sparsity": 0.0, "frozen_fraction": 0.0, "method": "clt", "error": "",
           "utility_rmse": rmse}
    (job_dir / "result.json").write_text(json.dumps(
        {"job": {"num": num, "overrides": [f"quantizer={scheme}", "seed=1"]}, "rows": [row]}))


def test_aggregate_sorts_jobs_as_integers_and_finds_the_frontier(tmp_path):
    for num, (s, lk, u) in enumerate([("a", 0.3, 1.0), ("b", 0.2, 1.2), ("c", 0.25, 1.5)] * 4):
        _fake_result(tmp_path / f"{num}_{s}", num, s, lk + num * 1e-3, u)
    rows = agg.aggregate(tmp_path, verbose=False)
    assert [r["job"] for r in rows] == list(range(12))  # 10 after 9, not after 1
    assert rows[0]["swept"] == "quantizer=a"
    pts = [(r["utility_rmse"], r["leakage"], i) for i, r in enumerate(rows)]
    front = agg._pareto(pts, higher_better=False)
    assert front == [0, 1]  # c is dominated by b (worse rmse, more leakage)
    assert agg._pareto(pts, higher_better=True)  # some frontier either way


def test_assess_schemes_matches_assess():
    """The app's old copy of the pipeline is now a deprecated alias of `assess` (the app calls
    `assess` itself): same figures, and a DeprecationWarning."""
    from torch.utils.data import DataLoader, TensorDataset

    from mis_lightning import assess
    from mis_lightning.app.job import assess_schemes
    from mis_lightning.models import LinearRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=g)
    y = x @ torch.randn(32, generator=g) + 0.5 * torch.randn(300, generator=g)
    model = LinearRegression(32, weight_decay=1e-2)
    with torch.no_grad():
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(300, 1)], 1), y[:, None]).solution[:, 0]
        model.linear.weight.copy_(sol[:32][None])
        model.linear.bias.copy_(sol[32:])
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    kw = {"num_records": 32, "uncertainty_draws": 1, "seed": 3, "weight_decay": 1e-2,
          "covariance": "independent"}  # the alias is the subject (see FAST)
    schemes = ["int8_weight_only", "intx_weight_only_int4_g32"]
    a = assess(model, schemes, loader, model.per_sample_loss, **kw)
    with pytest.warns(DeprecationWarning, match="assess_schemes is deprecated"):
        b = assess_schemes(model, schemes, loader, model.per_sample_loss, **kw)
    assert list(a.schemes) == list(b.schemes)
    for name in schemes:
        assert a.schemes[name].leakage == pytest.approx(b.schemes[name].leakage, rel=1e-9, abs=1e-12)
        assert a.schemes[name].interval == pytest.approx(b.schemes[name].interval, rel=1e-9)
    assert a.baseline_leakage == b.baseline_leakage


def test_installed_package_ships_configs(tmp_path):
    """Non-editable install: conf/ is inside the package and found from any directory."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / item).exists():
            shutil.copy(ROOT / item, src / item)
    shutil.copytree(ROOT / "mis_lightning", src / "mis_lightning", ignore=ignore)
    shutil.copytree(ROOT / "conf", src / "conf", ignore=ignore)
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile",
         "-q", "--target", str(site), str(src)],
        check=False, capture_output=True, text=True, timeout=240)
    if pip.returncode != 0 and "No module named pip" in pip.stderr:
        pytest.skip("pip is not available")
    assert pip.returncode == 0, pip.stderr[-3000:]
    conf = site / "mis_lightning" / "conf"
    assert (conf / "config.yaml").is_file() and (conf / "__init__.py").is_file()
    for group in ("data", "model", "trainer", "mis", "logger", "experiment", "hydra/launcher"):
        shipped = sorted(p.name for p in (conf / group).glob("*.yaml"))
        expected = sorted(p.name for p in (ROOT / "conf" / group).glob("*.yaml"))
        assert shipped == expected and shipped, group
    assert not (site / "conf").exists()  # not a top-level `conf` package

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # one process (one start and torch import) for both checks: the package's files and a compose,
    # then the installed console script run as `python <script> --cfg job data=nci_tpsa` would run
    # it (its own code as __main__, its SystemExit caught and printed as the exit status)
    script = site / "bin" / "mis-lightning"
    code = (
        "import mis_lightning, mis_lightning.conf as c\n"
        "from hydra import compose, initialize_config_module\n"
        "with initialize_config_module('mis_lightning.conf', version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['quantizer=intx_weight_only_int4_g32'])\n"
        "print(mis_lightning.__file__); print(c.__file__)\n"
        "print(cfg.data._target_, cfg.quantizer.name)\n"
        "import os, runpy, sys\n"
        "script = sys.argv[1]\n"
        "if os.path.exists(script):\n"
        "    print('== console script', flush=True)\n"
        "    sys.argv = [script, '--cfg', 'job', 'data=nci_tpsa']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "        status = 0\n"
        "    except SystemExit as exc:\n"
        "        status = 0 if exc.code is None else exc.code\n"
        "    print(f'== console script exit status {status}')\n"
    )
    env = _env(str(site))
    proc = subprocess.run([sys.executable, "-c", code, str(script)], cwd=elsewhere, env=env,
                          check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    own, _, console = proc.stdout.partition("== console script\n")
    lines = own.split("\n")
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site))
    # the quantizer group is generated from the registry in the installed package too
    assert "mis_lightning.data.ChEMBLDataModule intx_weight_only_int4_g32" in own
    # the installed console script composes from the package too (--cfg job: no run)
    if script.exists():
        assert console.rstrip().endswith("== console script exit status 0"), proc.stderr[-3000:]
        assert "NCITPSADataModule" in console
    assert not any(elsewhere.iterdir())


def test_frontier_merges_identical_results_and_names_points_in_a_legend():
    """Issue 17: labels in frontier.png no longer overlap (names are in a legend beside the
    axes, safest first), identical results are one point, the baseline is marked."""
    rows = []
    for num, (s, lk, u) in enumerate([("int8_weight_only", 0.0601, 0.81),
                                      ("int8_dynamic_activation_int8_weight", 0.0601, 0.81),
                                      ("intx_weight_only_int2", 0.015, 1.2), ("bf16", 0.0605, 0.81)]):
        rows.append({"job": num, "scheme": s, "leakage": lk, "leakage_p10": lk - 0.003,
                     "leakage_p90": lk + 0.003, "baseline_leakage": 0.0606, "utility_rmse": u,
                     "bits_per_weight": 8.0, "error": ""})
    fig = agg.frontier_figure(rows)
    ax = fig.axes[0]
    assert not ax.texts  # no annotations on the axes that could overlap
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    # (ux29) bf16 (0.0605 [0.0575, 0.0635]) and the int8 pair (0.0601 [0.0571, 0.0631]) are not
    # ranked beyond their intervals (tie A), and at the same rmse 0.81 bf16's marker would sit
    # on theirs: drawn beside it and said so
    assert names == ["frontier (non-dominated)", "unquantized baseline", "2: intx_weight_only_int2",
                     "0: int8_weight_only = 1: int8_dynamic_activation_int8_weight (tie A)",
                     "3: bf16 (tie A) (same point as 0: int8_weight_only = 1: int8_dynamic_activation_int8_weight, "
                     "drawn offset)"]
    assert ax.get_title() == ("Privacy-utility frontier (4 results at 2 distinct points;\n1 drawn offset: "
                              "the same point as another)")
    assert ax.get_ylabel() == "leakage = 1 - MIS (lower is safer)"
    assert ax.get_xlabel() == "rmse (validation; lower is better)"


def _compose(overrides, out):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    with initialize_config_module("mis_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def test_assess_mode_scores_a_saved_checkpoint_without_training(tmp_path, capsys):
    """Issue 17: `mis-lightning mode=assess ckpt_path=...` assesses a trained model without
    training: the data and model options come from the checkpoint (here the training run's
    data.n_train=400 and model.weight_decay=0.01 are not repeated), and the figures equal those
    of the training run's own assessment."""
    from mis_lightning.app.job import run_job

    fast = [a for a in FAST if a != "logger=csv"] + ["logger=none", "schemes=[rtn_int8,rtn_int2]"]
    run_job(_compose([*fast, "model.weight_decay=0.01", f"trainer.default_root_dir={tmp_path / 'train'}"],
                     tmp_path / "train"))
    ckpt = tmp_path / "train" / "model.ckpt"
    trained = json.loads((tmp_path / "train" / "report.json").read_text())
    assert trained["n"] == 400
    from mis_lightning.app.checkpoint_fit import ORIGIN_KEY

    origin = torch.load(ckpt, weights_only=False)[ORIGIN_KEY]  # nux53 #13: what mode=assess names on a mismatch
    assert origin["model"] == "mis_lightning.models.linear.LinearRegression"
    assert origin["data"] == "mis_lightning.data.SyntheticRegressionDataModule"

    again = ["data=synthetic_linear", "model=linear", "logger=csv", "progress=false",
             "mis.estimation.num_records=128", "mis.scoring.uncertainty_draws=2",
             "mis.scoring.covariance=independent", "schemes=[rtn_int8,rtn_int2]", "mode=assess", f"ckpt_path={ckpt}",
             f"logger.csv.save_dir={tmp_path / 'assess'}"]  # (in process: no Hydra runtime dir)
    run_job(_compose(again, tmp_path / "assess"))
    out = tmp_path / "assess"
    assert not (out / "model.ckpt").exists() and not list(out.rglob("*.ckpt"))  # nothing trained
    rep = json.loads((out / "report.json").read_text())
    assert rep["n"] == 400  # the checkpoint's data options (weight decay: the equal figures below)
    for s in ("rtn_int8", "rtn_int2"):
        # same weights, records and options: same figures (the seeded interval too)
        assert rep["schemes"][s]["leakage"] == pytest.approx(trained["schemes"][s]["leakage"], rel=1e-9)
        assert rep["schemes"][s]["interval"] == pytest.approx(trained["schemes"][s]["interval"], rel=1e-9)
    res = json.loads((out / "result.json").read_text())
    assert res["mode"] == "assess" and res["ckpt_path"] == str(ckpt)
    assert (out / "privacy_utility.png").stat().st_size > 0
    assert "mis/rtn_int8/leakage" in (out / "csv" / "metrics.csv").read_text()
    err = capsys.readouterr().err
    assert "note: data.n_train = 400 from the checkpoint (the config says 1000)" in err
    assert "note: model.weight_decay = 0.01 from the checkpoint (the config says 0.001)" in err


def test_assess_mode_errors_name_the_option(tmp_path):
    from mis_lightning.app.job import run_job

    base = [*FAST, "logger=none", "schemes=[rtn_int8]"]
    cases = [
        (["mode=asess"], ValueError, "mode must be 'train', 'assess' or 'plan', got 'asess'"),
        (["mode=assess"], ValueError, "mode=assess needs ckpt_path=<checkpoint of the app's model> "
         "(a training run writes <run dir>/model.ckpt, see output.checkpoint)"),
        ([f"ckpt_path={tmp_path}/x.ckpt"], ValueError, f"ckpt_path={tmp_path}/x.ckpt is set but "
         "mode=train would train a new model and ignore it: add mode=assess to assess the checkpoint"),
        (["mode=assess", f"ckpt_path={tmp_path}/x.ckpt"], FileNotFoundError,
         f"ckpt_path {tmp_path}/x.ckpt does not exist"),
    ]
    torch.save({"weights": 1}, tmp_path / "bad.ckpt")
    cases.append((["mode=assess", f"ckpt_path={tmp_path}/bad.ckpt"], ValueError,
                  f"ckpt_path {tmp_path}/bad.ckpt is not a Lightning checkpoint (no 'state_dict' in it)"))
    for i, (ov, exc, msg) in enumerate(cases):
        with pytest.raises(exc) as info:
            run_job(_compose([*base, *ov], tmp_path / str(i)))
        assert str(info.value) == msg
        assert [p.name for p in (tmp_path / str(i)).iterdir()] == ["result.json"]  # nothing read
    # a checkpoint of another model: the mismatch names the model and what to pass
    torch.save({"state_dict": {"net.0.weight": torch.zeros(2, 2)}, "hyper_parameters": {}},
               tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"does not fit the model LinearRegression built from "
                       r"model=mis_lightning.models.LinearRegression and data=mis_lightning.data."
                       r"SyntheticRegressionDataModule: pass the model= and data= options"):
        run_job(_compose([*base, "mode=assess", f"ckpt_path={tmp_path}/other.ckpt"], tmp_path / "o"))


def test_assess_mode_names_the_checkpoints_model_and_the_options_to_pass(tmp_path):
    """nux53 #13: a sweep's model.ckpt of the user's own model (config groups data=tokbin
    model=toknet) assessed without repeating data= / model= poured the checkpoint's ``hidden=8``
    into the default mlp_probe and crashed (``TypeError: 'int' object is not iterable``) after
    reading the default data. The checkpoint's origin (its own key, or its run's result.json
    beside it) is refused before any data is read, naming its model class and the options to
    pass; without an origin the build's failure is the same documented message."""
    from mis_lightning.app.checkpoint_fit import ORIGIN_KEY
    from mis_lightning.app.job import run_job

    base = [a for a in FAST if a != "model=linear"] + ["logger=none", "schemes=[rtn_int8]", "mode=assess"]
    saved = {"state_dict": {"emb.weight": torch.zeros(3, 6)}, "hyper_parameters": {"hidden": 8, "emb": 6}}
    head = ("does not fit the model MLPProbe built from model=mis_lightning.models.MLPProbe and "
            "data=mis_lightning.data.SyntheticRegressionDataModule: pass the model= and data= options of the "
            "run that trained it (")
    # the run's result.json beside it (a checkpoint written before the origin key)
    run = tmp_path / "0_int8_weight_only"
    run.mkdir()
    torch.save(saved, run / "model.ckpt")
    (run / "result.json").write_text(json.dumps({
        "mode": "train", "model": "TokenNet", "data": "nux53pkg.TokenBinary",
        "job": {"choices": {"data": "tokbin", "model": "toknet", "mis": "default"}},
        "files": {"checkpoint": str(run / "model.ckpt")}}))
    with pytest.raises(ValueError) as info:
        run_job(_compose([*base, f"ckpt_path={run / 'model.ckpt'}"], tmp_path / "a"))
    assert str(info.value) == (f"ckpt_path {run / 'model.ckpt'} {head}the checkpoint holds a TokenNet trained on "
                               f"data nux53pkg.TokenBinary ({run / 'result.json'}); pass data=tokbin model=toknet)")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["result.json"]  # nothing read
    # the origin in the checkpoint itself (the app writes it)
    torch.save({**saved, ORIGIN_KEY: {"model": "nux53pkg.TokenNet", "data": "nux53pkg.TokenBinary",
                                      "choices": {"data": "tokbin", "model": "toknet"}}}, tmp_path / "own.ckpt")
    with pytest.raises(ValueError) as info:
        run_job(_compose([*base, f"ckpt_path={tmp_path / 'own.ckpt'}"], tmp_path / "b"))
    assert str(info.value) == (f"ckpt_path {tmp_path / 'own.ckpt'} {head}the checkpoint holds a TokenNet trained "
                               "on data nux53pkg.TokenBinary; pass data=tokbin model=toknet)")
    # no origin (a bare checkpoint): its options break the build, said as the same mismatch
    torch.save(saved, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError) as info:
        run_job(_compose([*base, f"ckpt_path={tmp_path / 'bare.ckpt'}"], tmp_path / "c"))
    assert str(info.value).startswith(f"ckpt_path {tmp_path / 'bare.ckpt'} {head}its options hidden from the "
                                      "checkpoint do not build it: TypeError: ")


def test_own_tdc_csv_runs_and_its_skipped_rows_reach_the_report(app_runs):
    """`data=tdc_admet data.path=<own CSV>` crashed (Lightning refused the datamodule's saved
    task None against the model's inferred "regression"); and the rows skipped for a broken
    SMILES or a missing value were said on stderr only, not in result.json / report.md."""
    pytest.importorskip("rdkit")
    tmp_path, proc = app_runs["tdc"]
    _ok(proc)
    out = tmp_path / "run"
    res = json.loads((out / "result.json").read_text())
    assert res["task"] == "regression"
    assert any(w.startswith("data: 2 input row(s) skipped by TDCADMETDataModule") for w in res["warnings"])


def test_aggregate_header_counts_jobs_that_scored_no_scheme(tmp_path):
    """A job that ran but whose every scheme is an error row (e.g. a group size that divides no
    layer) released nothing: the header said "4 jobs (1 failed)" while its Failures section
    listed two; it now counts them apart."""
    _fake_result(tmp_path / "0_a", 0, "a", 0.3, 1.0)
    _fake_result(tmp_path / "1_g32", 1, "g32", 0.3, 1.0)
    res = json.loads((tmp_path / "1_g32" / "result.json").read_text())
    res["rows"][0].update(leakage=None, error="SchemeError: would quantize no weight of this model")
    (tmp_path / "1_g32" / "result.json").write_text(json.dumps(res))
    agg.aggregate(tmp_path, verbose=False)
    assert "2 jobs (1 scored no scheme), 2 rows." in (tmp_path / "aggregate.md").read_text()
    # ... and the sweep's status says so (it was 0): nothing was released for job 1
    assert agg.unscored_jobs(agg.aggregate(tmp_path, verbose=False)) == [1]
    assert agg.main([str(tmp_path), "--quiet"]) == 1


def test_assess_mode_logs_the_epoch_the_checkpoint_was_trained_in(tmp_path):
    """vf23: the report's logger row carries the epoch its weights were trained in. In
    mode=assess the app's own checkpoint had no ``epoch`` (the row had none), and a Lightning
    checkpoint saved after ``fit`` (``trainer.save_checkpoint``) stores ``current_epoch``, the
    count of epochs run: its row read epoch 2 for weights of epoch 1."""
    from mis_lightning.app.job import run_job

    fast = [a for a in FAST if a != "logger=csv"] + ["logger=none", "schemes=[rtn_int8]"]
    run_job(_compose([*fast, f"trainer.default_root_dir={tmp_path / 'train'}"], tmp_path / "train"))
    ckpt = tmp_path / "train" / "model.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    after_fit = {**saved, "epoch": 2,  # what trainer.save_checkpoint writes after a 2-epoch fit
                 "loops": {"fit_loop": {"epoch_progress": {"current": {"ready": 2, "started": 2,
                                                                       "processed": 2, "completed": 2}}}}}
    torch.save(after_fit, tmp_path / "after_fit.ckpt")
    again = ["data=synthetic_linear", "model=linear", "logger=csv", "progress=false",
             "mis.estimation.num_records=128", "mis.scoring.uncertainty_draws=0",
             "mis.scoring.covariance=independent", "schemes=[rtn_int8]", "mode=assess"]
    for name, path in (("own", ckpt), ("after_fit", tmp_path / "after_fit.ckpt")):
        out = tmp_path / name
        run_job(_compose([*again, f"ckpt_path={path}", f"logger.csv.save_dir={out}"], out))
        rows = list(csv.DictReader(io.StringIO((out / "csv" / "metrics.csv").read_text())))
        assert [r.get("epoch") for r in rows if r.get("mis/rtn_int8/leakage")] == ["1"], name  # max_epochs=2


def test_job_params_name_the_job_without_clashing_with_module_hparams():
    from omegaconf import OmegaConf

    from mis_lightning.app.job import job_params

    cfg = OmegaConf.create({"seed": 3})
    got = job_params(cfg, ["int8_weight_only", "bf16"], {"overrides": ["seed=3", "quantizer=bf16"], "num": 5})
    assert got == {"job/seed": 3, "job/schemes": "int8_weight_only,bf16", "job/overrides": "seed=3 quantizer=bf16",
                   "job/num": 5}
    assert job_params(cfg, ["bf16"], {"overrides": [], "num": None})["job/overrides"] == "-"
    assert all(k.startswith("job/") for k in got)  # MLflow refuses a key logged twice with another value
