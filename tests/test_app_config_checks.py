"""The app's checks before training (fresh-user sweep fu19): a config the job would ignore, or
could only refuse after training, is refused at once with one line and exit status 2; a failed
job records what it was to assess."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

FAST = [
    "data=synthetic_linear", "data.n_train=400", "data.n_val=200", "data.batch_size=400",
    "model=linear", "trainer.max_epochs=2", "mis.estimation.num_records=128", "mis.scoring.uncertainty_draws=2",
    "logger=none", "progress=false", "mis.scoring.covariance=independent",
]


def _console(monkeypatch, capsys, args: list[str]) -> tuple[object, str]:
    """The console script in this process: ``(exit code, stderr)``."""
    from mis_lightning import cli

    monkeypatch.setattr(sys, "argv", ["mis-lightning", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


def _compose(overrides: list[str], out: Path):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    with initialize_config_module("mis_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def _nothing_trained(run: Path) -> dict:
    """Nothing was trained or assessed in ``run``: the failed job's record (returned) and
    Hydra's own files only."""
    assert {p.name for p in run.iterdir()} <= {"result.json", ".hydra", "cli.log"}
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "failed" and res["stage"] == "configuration"
    return res


@pytest.mark.parametrize("override, given", [
    ("quantizer=rtn_int2", "quantizer=rtn_int2"),
    ("schemes=[rtn_int8,rtn_int2]", "schemes=[rtn_int8,rtn_int2]"),
])
def test_plan_mode_refuses_a_scheme_selection_it_would_ignore(tmp_path, monkeypatch, capsys, override, given):
    """W5: `mode=plan quantizer=...` (or `schemes=...`) planned over the default plan.candidates
    and said nothing; a sweep over quantizer= ran the same plan in every job."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "mode=plan", override, f"hydra.run.dir={run}"])
    assert code == 2, err
    assert (f"configuration error (ValueError): mode=plan plans over plan.candidates and does not use {given}: "
            "list the schemes to plan with as 'plan.candidates=[<name>,...]' instead") in err
    assert "Traceback" not in err
    _nothing_trained(run)


def test_plan_mode_says_it_does_not_use_a_config_files_schemes(tmp_path, capsys):
    """vf19: an experiment file with `mode: plan` and its own `schemes:` planned over the
    default candidates without a word (only command-line overrides were checked); the packaged
    default list passes silently."""
    from mis_lightning.app.job import check_plan_selection

    check_plan_selection(_compose([*FAST, "mode=plan"], tmp_path / "a"))
    assert "not used" not in capsys.readouterr().err
    check_plan_selection(_compose([*FAST, "mode=plan", "schemes=[rtn_int8]"], tmp_path / "b"))
    assert "mode=plan plans over plan.candidates" in capsys.readouterr().err


def test_failed_plan_job_records_the_plan_candidates(tmp_path):
    """W8: a failed mode=plan job recorded the default `schemes` list in result.json (and the
    aggregate's failure row), not the candidates it was planning over."""
    from mis_lightning.app.job import run_job
    from mis_lightning.planning import PlanConfig

    run = tmp_path / "r"
    with pytest.raises(ValueError, match="max_bits"):
        run_job(_compose([*FAST, "mode=plan", "plan.max_bits=-1"], run))
    assert _nothing_trained(run)["schemes"] == PlanConfig().candidates
    with pytest.raises(ValueError, match="max_bits"):
        run_job(_compose([*FAST, "mode=plan", "plan.max_bits=-1", "plan.candidates=[rtn_int8,rtn_int2]"], run))
    assert _nothing_trained(run)["schemes"] == ["rtn_int8", "rtn_int2"]
    # mode=plan does not read `schemes`: without them it is judged on its own options (vf19:
    # `~schemes` failed with "no scheme selected: set schemes")
    with pytest.raises(ValueError, match="max_bits"):
        run_job(_compose([*FAST, "mode=plan", "~schemes", "plan.max_bits=-1"], run))


class TinyDM(pl.LightningDataModule):
    """A minimal datamodule of the user's own (``data._target_``): 64 records, 3 features.
    ``train_dataset=False`` keeps the training set under another name (``train_set``) and
    draws it through a shuffled ``drop_last`` loader, as in fu19's p36."""

    def __init__(self, task: str = "regression", train_dataset: bool = True, seed: int = 0, missing: bool | str = False,
                 **_: object) -> None:
        super().__init__()
        self.task, self.keep, self.seed, self.missing = task, train_dataset, seed, missing
        self.n_train, self.num_features, self.batch_size = 64, 3, 16

    def setup(self, stage: str | None = None) -> None:
        import torch
        from torch.utils.data import TensorDataset

        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(96, 3, generator=g)
        y = x[:, 0].clone()
        if self.missing:  # missing labels as NaN (nu44b), masked by UserRidge(masked=True); "val": there only
            y[64 if self.missing == "val" else 0:][::5] = float("nan")
        ds = TensorDataset(x[:64], y[:64])
        self.val_dataset = TensorDataset(x[64:], y[64:])
        if self.keep:
            self.train_dataset = ds
        else:
            self.train_set = ds

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        ds = self.train_dataset if self.keep else self.train_set
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader(self.val_dataset, batch_size=32)


TINY = ["data=synthetic_linear", f"data._target_={__name__}.TinyDM", *(o for o in FAST if not o.startswith("data"))]


@pytest.mark.parametrize("override, message", [
    # E4: an unsupported task failed after training (stage "assessment", exit 1)
    # nux51 #5: the advice was data.task=regression (a classifier read as a regression)
    ("data.task=multiclass", "data TinyDM has task 'multiclass', but the app assesses 'regression' and "
                              "'binary' tasks only (its utility metrics, plan budgets and models' [B] outputs depend "
                              "on the task). For another task (multiclass classification, ...) use the Python API "
                              "with your own utility metrics: MISCallback("),
    # W9: a datamodule without train_dataset was assessed on one shuffled drop_last pass
    # (n = 48 of 64 here), silently
    ("+data.train_dataset=false", "data TinyDM has no train_dataset after setup(): the assessment reads every "
                                  "training record once, in order"),
])
def test_datamodule_needs_a_supported_task_and_a_train_dataset(tmp_path, monkeypatch, capsys, override, message):
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*TINY, override, f"hydra.run.dir={run}"])
    assert code == 2, err
    assert f"configuration error (ValueError): {message}" in err and "Traceback" not in err
    _nothing_trained(run)


def test_fewer_than_four_training_records_are_refused_before_training(tmp_path, monkeypatch, capsys):
    """nux51 #3: a training set of 3 records trained, then the assessment failed ("n must be >= 4
    ... pool protocol"); refused before training, with the minimum and the headline's need."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*(o for o in FAST if not o.startswith("data.n_train")),
                                               "data.n_train=3", f"hydra.run.dir={run}"])
    assert code == 2, err
    assert ("configuration error (ValueError): the assessment of data SyntheticRegressionDataModule needs at "
            "least 4 training records, got 3: the leakage (the headline)") in err and "Traceback" not in err
    _nothing_trained(run)


def test_utility_tolerance_is_one_scoring_option_of_the_app(tmp_path, monkeypatch, capsys):
    """nux51 #6: the verdict's 1% band could not be set in the app (``mis.scoring.utility_tolerence``
    was refused with no such key to suggest); ``mis.scoring.utility_tolerance`` (ScoringConfig) sets
    the printed table's, report.md's and report.json's band and is recorded in result.json for the
    aggregate; a negative one is refused before training."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "mis.scoring.utility_tolerence=0.05", f"hydra.run.dir={run}"])
    assert code == 2 and "did you mean utility_tolerance" in err, err
    code, err = _console(monkeypatch, capsys, [*FAST, "mis.scoring.utility_tolerance=-1", f"hydra.run.dir={run}"])
    assert code == 2 and "utility_tolerance must be a finite number >= 0" in err, err
    ok = tmp_path / "ok"
    from mis_lightning import cli

    monkeypatch.setattr(sys, "argv", ["mis-lightning", *FAST, "mis.scoring.utility_tolerance=0.05",
                                      "schemes=[rtn_int8,rtn_int2]", f"hydra.run.dir={ok}"])
    cli.main()
    out = capsys.readouterr().out
    md = (ok / "report.md").read_text()
    assert "within 5% of the best" in md and "within 5% of the best" in out and "within 1%" not in md
    assert json.loads((ok / "result.json").read_text())["utility_tolerance"] == 0.05
    from mis_lightning import Report

    assert Report.from_json(ok / "report.json").utility_tolerance == 0.05


def test_plan_utility_metric_not_measured_for_the_task_fails_before_training(tmp_path, monkeypatch, capsys):
    """E1: `mode=plan plan.utility_metric=auroc` on regression data trained, then failed with
    the Python API's hint ("pass it in metrics="); it is refused before training with the
    metrics the task measures."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "mode=plan", "plan.utility_metric=auroc",
                                               "plan.candidates=[rtn_int8,rtn_int2]", f"hydra.run.dir={run}"])
    assert code == 2, err
    assert ("configuration error (ValueError): plan.utility_metric=auroc is not measured for the regression "
            "task of this data: the app measures loss, rmse, mae, r2 there") in err
    _nothing_trained(run)


@pytest.mark.parametrize("overrides, message", [
    (["schemes=[rtn_int8,intx_weight_only_int4,{name: intx_weight_only_int4, group_size: 32}]"],
     "schemes entries 2 (intx_weight_only_int4) and 3 ({name: intx_weight_only_int4, group_size: 32}) build "
     "the same scheme 'intx_weight_only_int4' (IntxWeightOnly(bits=4, granularity='per_row', group_size=None, "
     "mapping='symmetric')): each scheme is scored once, so list it once"),
    (["schemes=[{name: rtn_int4, bits: 8},rtn_int8]"],
     "schemes entries 1 ({name: rtn_int4, bits: 8}) and 2 (rtn_int8) build the same scheme 'rtn_int8'"),
    (["mode=plan", "plan.candidates=[rtn_int8,rtn_int8]"],
     "plan.candidates entries 1 (rtn_int8) and 2 (rtn_int8) build the same scheme 'rtn_int8'"),
])
def test_two_entries_of_one_scheme_name_fail_before_training(tmp_path, monkeypatch, capsys, overrides, message):
    """E3: two entries building schemes of one name trained first, then failed with "scheme
    'intx_weight_only_int4' is listed twice" (stage assessment, a traceback, no fix)."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, *overrides, f"hydra.run.dir={run}"])
    assert code == 2, err
    assert f"configuration error (ValueError): {message}" in err and "Traceback" not in err
    _nothing_trained(run)


def test_a_job_that_fails_after_training_ends_its_tracker_runs(tmp_path, monkeypatch):
    """W7: a job failing after training finalized its loggers but left its W&B run open (and
    a fluent MLflow run), so the next job of a multirun logged into it. Fake tracker modules
    stand in for wandb and mlflow: the job must end both runs, as failed."""
    import types

    from mis_lightning.app import job

    calls: list[tuple[str, dict]] = []
    wandb = types.SimpleNamespace(run=object(), finish=lambda **kw: calls.append(("wandb.finish", kw)))
    mlflow = types.SimpleNamespace(active_run=lambda: object(), end_run=lambda **kw: calls.append(("mlflow.end_run", kw)))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)

    def broken_assess(*args, **kwargs):
        raise RuntimeError("assessment broke")

    monkeypatch.setattr(job, "assess", broken_assess)
    run = tmp_path / "r"
    with pytest.raises(RuntimeError, match="assessment broke"):
        job.run_job(_compose([*FAST, "schemes=[rtn_int8]", f"trainer.default_root_dir={run}"], run))
    assert json.loads((run / "result.json").read_text())["stage"] == "assessment"
    assert calls == [("mlflow.end_run", {"status": "FAILED"}), ("wandb.finish", {"exit_code": 1})]


def test_single_run_dirs_have_sub_second_resolution(monkeypatch):
    """E7: two single runs started in the same second shared one run dir (Hydra's
    `%H-%M-%S`), and both failed writing the same csv/metrics.csv."""
    import re

    import mis_lightning.conf  # noqa: F401 - stores the generated groups (quantizer, plan)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.delenv("MIS_LIGHTNING_OUTPUT_DIR", raising=False)
    # this checkout's configs (an editable install may map mis_lightning.conf to another)
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", run_dir), run_dir


def test_unknown_params_name_fails_before_training(tmp_path, monkeypatch, capsys):
    """fu21: `mis.estimation.params=[nope.weight]` trained the model, then failed in the
    assessment with Hydra's traceback (stage assessment, exit 1); it is refused before training
    with the close names."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "mis.estimation.params=[linear.wieght]",
                                               f"hydra.run.dir={run}"])
    assert code == 2, err
    assert ("configuration error (KeyError): params not in the model: ['linear.wieght'] ('linear.wieght': "
            "did you mean 'linear.weight'") in err and "Traceback" not in err
    _nothing_trained(run)


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed must be an integer, got 'abc'"),
    ("num_threads=abc", "num_threads must be null, 'auto' or an integer >= 1, got 'abc'"),
])
def test_non_integer_seed_or_threads_names_the_option(tmp_path, monkeypatch, capsys, override, message):
    """fu21: `seed=abc` / `num_threads=abc` said only "invalid literal for int() with base 10:
    'abc'", naming neither option."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, override, f"hydra.run.dir={run}"])
    assert code == 2, err
    assert f"configuration error (ValueError): {message}" in err
    _nothing_trained(run)


def test_a_null_output_file_name_fails_before_training(tmp_path, monkeypatch, capsys):
    """fu21: `output.report_json=null` trained and assessed, then failed writing the report
    (`TypeError: unsupported operand type(s) for /: 'PosixPath' and 'NoneType'`, exit 1)."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "output.report_json=null", f"hydra.run.dir={run}"])
    assert code == 2, err
    assert "configuration error (ValueError): output.report_json must be a file name (the job writes it), got None" in err
    _nothing_trained(run)


@pytest.mark.parametrize("n_val", [0, 1])
def test_a_validation_set_under_two_records_fails_before_training(tmp_path, monkeypatch, capsys, n_val):
    """fu21: `data.n_val=0` trained and estimated, then every scheme was an error row
    ("Needs at least two samples to calculate r2 score"), exit 1."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, f"data.n_val={n_val}", f"hydra.run.dir={run}"])
    assert code == 2, err
    assert (f"configuration error (ValueError): data SyntheticRegressionDataModule has {n_val} validation "
            "record(s) after setup()") in err
    _nothing_trained(run)


@pytest.mark.parametrize("override, message", [
    ("data.n_train=0", "n_train must be an integer >= 2, got 0"),
    ("data.batch_size=0", "batch_size must be an integer >= 1, got 0"),
])
def test_an_invalid_data_option_is_a_configuration_error(tmp_path, monkeypatch, capsys, override, message):
    """fu21: an invalid `data.*` value failed before training, but as Hydra's "Error in call to
    target ...SyntheticRegressionDataModule" with exit 1 (stage data), where an invalid `model.*`
    or `mis.*` value gets the one-line configuration error and exit 2."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, override, f"hydra.run.dir={run}"])
    assert code == 2, err
    assert f"configuration error (ValueError): {message}" in err and "Traceback" not in err
    _nothing_trained(run)


def test_an_invalid_trainer_option_is_a_configuration_error(tmp_path, monkeypatch, capsys):
    """fu21 F9: `trainer.devices=0` (Lightning's MisconfigurationException, raised when the Trainer
    is built, before training) exited 1 with Hydra's traceback; it is a configuration error like
    an invalid `model.*`, `mis.*` or `data.*` value (one line, exit 2)."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "trainer.devices=0", f"hydra.run.dir={run}"])
    assert code == 2, err
    assert "configuration error (MisconfigurationException): `Trainer(devices=0)`" in err and "Traceback" not in err
    _nothing_trained(run)


def test_data_parallel_training_refuses_the_probes_full_batch_lbfgs_before_training(tmp_path, monkeypatch, capsys):
    """model=mlp_probe trains by full-batch L-BFGS (the main job reaches a minimum); under
    trainer=ddp_spawn its line search would deadlock the gradient all-reduce: refused before
    anything is trained, naming the way out."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "model=mlp_probe", "trainer=ddp_spawn",
                                               f"hydra.run.dir={run}"])
    assert code == 2, err
    assert "cannot train data-parallel" in err and "model.optimizer=adam" in err and "data.batch_size" in err
    assert not (run / "model.ckpt").exists() and not (run / "report.json").exists()


def test_the_main_job_trains_its_probe_by_full_batch_lbfgs():
    """The main job's probe reaches the minimum the analysis assumes only when each L-BFGS step
    sees the whole training set (the shipped ChEMBL series: 711 training records); the wider
    probes of the experiments keep minibatch Adam."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("mis_lightning.conf", version_base="1.3"):
        main = compose("config")
        binary = compose("config", overrides=["data=chembl_binary"])
        nci = compose("config", overrides=["data=nci_tpsa"])
        wide = [compose("config", overrides=[f"experiment={e}"]) for e in ("chembl_mlp", "nci_tpsa")]
    assert main.model.optimizer == "lbfgs" and main.model.lr is None
    assert main.data.batch_size >= 711 and binary.data.batch_size >= 711
    assert nci.data.batch_size >= nci.data.max_molecules  # every training record in one batch
    assert all(c.model.optimizer == "adam" and c.data.batch_size <= 128 for c in wide)


def test_verdict_utility_key_not_measured_fails_before_training(tmp_path, monkeypatch, capsys):
    """fu31: `mis.scoring.utility_key` (the metric the verdict ranks by) goes through the library's
    check of every front end: one the task does not measure is refused before training, with the
    measured names (`++`: the key exists in the clone's conf/mis/default.yaml, whatever conf the
    installed package maps)."""
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*FAST, "++mis.scoring.utility_key=top1", f"hydra.run.dir={run}"])
    assert code == 2, err
    assert ("configuration error (ValueError): mis.scoring.utility_key='top1' is not a measured utility metric: "
            "the measured ones are ['loss', 'mae', 'r2', 'rmse']") in err and "Traceback" not in err
    _nothing_trained(run)


# -- a researcher's own model and data (nu42c) ------------------------------------------------------


class DictDM(TinyDM):
    """:class:`TinyDM` whose batches are dicts ``{"x": [B, 3], "y": [B]}`` (a user's layout)."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.train_dataset, self.val_dataset = _DictSet(self.train_dataset), _DictSet(self.val_dataset)


class _DictSet:
    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        x, y = self.ds[i]
        return {"x": x, "y": y}


def xy(batch: dict) -> tuple:
    """The ``batch_fn`` of :class:`DictDM`'s batches."""
    return batch["x"], batch["y"]


class UserRidge(pl.LightningModule):
    """A plain LightningModule of the user's (no mis_lightning base class): ``per_sample_loss``
    returns ``[B, 1]`` with ``keepdim=True``, none with ``loss=False``; the other options of
    ``model=linear`` (``lr``, ``optimizer``, ...) are taken and ignored."""

    def __init__(self, num_features: int, keepdim: bool = False, loss: bool = True, weight_decay: float = 1e-3,
                 outputs: int = 1, masked: bool = False, **_: object) -> None:
        super().__init__()
        import torch

        self.lin, self.keepdim, self.weight_decay = torch.nn.Linear(num_features, outputs), keepdim, weight_decay
        self.masked = masked
        if loss:
            self.per_sample_loss = self._loss

    def forward(self, x):
        return self.lin(x).squeeze(-1)

    def _loss(self, out, y):
        import torch

        if out.dim() == 2:  # several outputs per record (outputs=k): each record's mean over them
            return 0.5 * ((out - y.unsqueeze(-1)) ** 2).mean(-1)
        if self.masked:  # missing targets (NaN) count 0
            return torch.where(y.isnan(), 0.0, 0.5 * (out - y.nan_to_num()) ** 2)
        sq = 0.5 * (out - y) ** 2
        return sq.unsqueeze(-1) if self.keepdim else sq

    def training_step(self, batch, i):
        x, y = xy(batch) if isinstance(batch, dict) else batch
        return self._loss(self(x), y).mean()

    def configure_optimizers(self):
        import torch

        return torch.optim.SGD(self.parameters(), lr=0.1)


USER = [f"data._target_={__name__}.DictDM", f"model._target_={__name__}.UserRidge"]


@pytest.mark.parametrize("overrides, message", [
    # a dict batch without batch_fn trained, then failed in the assessment ("pass batch_fn=", which
    # the app had no option for)
    ([], "configuration error (TypeError): data DictDM yields dict with keys ['x', 'y'] batches (validation), "
         "not (inputs, targets) pairs: set batch_fn=<dotted path"),
    ([f"batch_fn={__name__}.nope"], f"configuration error (ValueError): batch_fn={__name__}.nope does not import"),
    # a loss of [B, 1] failed after training too
    ([f"batch_fn={__name__}.xy", "+model.keepdim=true"],
     "configuration error (ValueError): UserRidge.per_sample_loss returned shape [16, 1] for a batch of 16 "
     "records (outputs [16], targets [16]); it must return per-sample losses of shape [16] (a trailing"),
    # nu44b: outputs [B, k] (a multi-task model) were flattened into the utility metrics as B k
    # records; missing targets (NaN, masked by the loss) read rmse = NaN (binary: a failure after training)
    ([f"batch_fn={__name__}.xy", "+model.outputs=2"],
     "configuration error (ValueError): UserRidge's outputs on the first training batch of data DictDM: the "
     "regression utility metrics (rmse, mae, r2) read one output per record, outputs [B] (a prediction) against "
     "targets [B]; got outputs [16, 2] and targets [16]"),
    ([f"batch_fn={__name__}.xy", "+data.missing=true", "+model.masked=true"],
     "configuration error (ValueError): UserRidge's outputs on the first training batch of data DictDM: the "
     "regression utility metrics (rmse, mae, r2) cannot skip missing targets: 4 of the 16 targets are NaN"),
    ([f"batch_fn={__name__}.xy", "+data.missing=val", "+model.masked=true"],
     "configuration error (ValueError): UserRidge's outputs on the first validation batch of data DictDM: the "
     "regression utility metrics (rmse, mae, r2) cannot skip missing targets:"),
    # no per_sample_loss: AttributeError after training
    ([f"batch_fn={__name__}.xy", "+model.loss=false"],
     "configuration error (TypeError): model UserRidge has no per_sample_loss method"),
    # a _target_ that does not import: Hydra's one line without the cause, exit 1
    (["model._target_=nosuchpkg.Model"], "configuration error (ImportError): Error locating target "
     "'nosuchpkg.Model'. full_key: model: Error loading 'nosuchpkg.Model': ModuleNotFoundError(\"No module named "
     "'nosuchpkg'\")"),
])
def test_a_users_model_and_data_are_checked_before_training(tmp_path, monkeypatch, capsys, overrides, message):
    run = tmp_path / "r"
    code, err = _console(monkeypatch, capsys, [*TINY, *USER, *overrides, f"hydra.run.dir={run}"])
    assert code == 2, err
    assert message in " ".join(err.split()) and "Traceback" not in err, err
    _nothing_trained(run)


def test_dict_batches_with_batch_fn_are_assessed(tmp_path, capsys):
    """The config's ``batch_fn`` reaches the assessment (estimation and utility): the job on dict
    batches gives the same figures as on the same records in pairs (the float64 estimation of one
    model on identical records: equal to 1e-12 relative, as both read the same tensors)."""
    from mis_lightning.app.job import run_job

    figures = []
    for extra in ([USER[1]], [*USER, f"batch_fn={__name__}.xy"]):
        out = tmp_path / str(len(figures))
        run_job(_compose([*TINY, *extra, "schemes=[rtn_int8,rtn_int2]", f"trainer.default_root_dir={out}"], out))
        res = json.loads((out / "result.json").read_text())
        figures.append([v for r in res["rows"] for v in (r["leakage"], r["utility_rmse"])])
    assert figures[0] == pytest.approx(figures[1], rel=1e-12)
    assert "no numeric weight_decay" not in capsys.readouterr().err  # UserRidge has one


def test_a_model_without_weight_decay_is_said_to_be_assessed_unpenalised():
    """A user's model without a ``weight_decay`` attribute is assessed as trained without an L2
    term; said (the job prints it and keeps it in the report's warnings) unless
    ``mis.estimation.weight_decay`` is set."""
    import torch

    from mis_lightning.app.job import weight_decay_note
    from mis_lightning.config import EstimationConfig

    m = torch.nn.Linear(2, 1)
    assert "Linear has no numeric weight_decay attribute" in weight_decay_note(m, EstimationConfig(weight_decay=None))
    assert weight_decay_note(m, EstimationConfig(weight_decay=0.0)) is None
    m.weight_decay = 1e-3
    assert weight_decay_note(m, EstimationConfig(weight_decay=None)) is None


def test_the_assessment_loader_batches_as_the_datamodules_own_loader():
    """The assessment read ``train_dataset`` through ``default_collate``: a datamodule whose loader
    pads or builds its batches in a ``collate_fn`` was assessed on other batches than it trains on."""
    from mis_lightning.app.batches import assessment_loader

    dm = TinyDM()
    dm.setup()
    marker = []

    def collate(items):
        marker.append(len(items))
        from torch.utils.data import default_collate

        return default_collate(items)

    dm.train_dataloader = lambda: __import__("torch").utils.data.DataLoader(dm.train_dataset, batch_size=16,
                                                                           collate_fn=collate)
    batches = list(assessment_loader(dm))
    assert marker == [16, 16, 16, 16] and len(batches) == 4
    assert bool((batches[0][0] == dm.train_dataset[:16][0]).all())  # in order, unshuffled


def test_the_mis_every_epoch_callback_reads_the_jobs_batch_fn(tmp_path):
    """``callbacks=mis_every_epoch`` built its ``MISCallback`` without the config's ``batch_fn``: on
    dict batches it refused the fit that the job's own assessment could read."""
    from mis_lightning.app.batches import batch_fn_of
    from mis_lightning.app.job import _build_callbacks

    cfg = _compose([*TINY, *USER, "callbacks=mis_every_epoch", f"batch_fn={__name__}.xy"], tmp_path)
    (cb,) = _build_callbacks(cfg, batch_fn_of(cfg))
    assert cb.batch_fn is xy
    (cb,) = _build_callbacks(_compose([*TINY, "callbacks=mis_every_epoch"], tmp_path), None)
    assert cb.batch_fn is None


def test_a_scheme_that_quantizes_no_assessed_weight_is_said_once(tmp_path, capsys, caplog):
    """nu42c: the job printed a scheme's refusal ("applies to no assessed parameter") before
    training, then assess logged it again and the scoring a third time ("scheme ... failed"); now
    the line before training alone (the report's failed row and warnings keep it)."""
    import logging

    from mis_lightning.app.job import run_job

    out = tmp_path / "r"
    with caplog.at_level(logging.WARNING, logger="mis_lightning"):
        run_job(_compose([*FAST, "schemes=[rtn_int8,bf16]", "mis.estimation.params=[linear.bias]",
                          f"trainer.default_root_dir={out}"], out))
    said = capsys.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)
    assert said.count("'rtn_int8' applies to no assessed parameter") == 1, said
    assert "scheme rtn_int8 failed" not in said
    res = json.loads((out / "result.json").read_text())
    assert [r["scheme"] for r in res["rows"] if r.get("error")] == ["rtn_int8"]  # the row still says it


def test_assess_logs_a_refused_scheme_once_unless_already_shown(caplog):
    import logging

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from mis_lightning import EstimationConfig, ScoringConfig, assess
    from mis_lightning.assess import refusals_shown

    torch.manual_seed(0)
    x = torch.randn(64, 3)
    model = nn.Sequential(nn.Linear(3, 1))
    dl = DataLoader(TensorDataset(x, x[:, :1]), batch_size=64)

    def loss(o, t):
        return (o - t).square().sum(1)

    kw = dict(estimation_config=EstimationConfig(params=["0.bias"]), scoring_config=ScoringConfig(uncertainty_draws=2, strict=False))
    for shown, times in (((), 1), (("rtn_int8",), 0)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mis_lightning"), refusals_shown(shown):
            rep = assess(model, ["rtn_int8", "bf16"], dl, loss, **kw)
        said = [r.getMessage() for r in caplog.records if "rtn_int8" in r.getMessage()]
        assert len(said) == times, said  # old: the up-front refusal and "scheme rtn_int8 failed"
        assert rep.schemes["rtn_int8"].error
        assert rep.table().count("applies to no assessed parameter") == 1  # the table says it once (ux49)


def test_mlflow_store_and_artifacts_follow_the_run_folder(tmp_path, monkeypatch, capsys):
    """nux48 / ux49: ``logger=mlflow`` wrote ``./mlflow.db`` and ``./mlruns/`` (MLflow's default
    artifact root for a sqlite store) in the directory the app ran from, outside the run's folder
    where every other file of the run is. Now the store and the artifacts are in the run's folder
    (a multirun's: the sweep's), unless MLFLOW_TRACKING_URI says otherwise."""
    pytest.importorskip("mlflow")
    from mis_lightning import cli
    from mis_lightning.app.resolvers import MLFLOW_ARTIFACTS, MLFLOW_DB, mlflow_artifacts

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = tmp_path / "out" / "r"
    monkeypatch.setattr(sys, "argv", ["mis-lightning", *[o for o in FAST if o != "logger=none"], "logger=mlflow",
                                      f"hydra.run.dir={run}"])
    cli.main()
    assert list(cwd.iterdir()) == []  # nothing in the working directory (was mlflow.db and mlruns/)
    assert (run / MLFLOW_DB).is_file()
    reports = list((run / MLFLOW_ARTIFACTS).rglob("report.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["n"] == 400  # the run's report, an artifact
    # the artifact folder follows a local sqlite store given by URI; other stores keep MLflow's default
    assert mlflow_artifacts("sqlite:///a/b/m.db") == str(cwd / "a" / "b" / MLFLOW_ARTIFACTS)
    assert mlflow_artifacts("sqlite:////x/m.db") == f"/x/{MLFLOW_ARTIFACTS}"
    assert mlflow_artifacts("http://server:5000") is None and mlflow_artifacts("file:///x/mlruns") is None


def test_a_hydra_config_left_set_without_a_job_reads_as_no_output_dir(tmp_path, monkeypatch):
    """lead53: a Hydra config left set in the process by an app run that stopped before its job
    (``runtime.output_dir`` still ``???``) made ``run_job(cfg)`` with ``cfg.output_dir`` raise
    ``MissingMandatoryValue: hydra.runtime.output_dir`` (tests/test_not_trained.py's app test, after
    another file's in-process CLI run on the same xdist worker). It reads as unset: ``cfg.output_dir``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mis_lightning.app.job import job_info, output_dir
    from mis_lightning.app.resolvers import mlflow_store

    hc = OmegaConf.create({"mode": "RUN", "runtime": {"output_dir": "???"}, "sweep": {"dir": "???"}})
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hc))
    assert output_dir(OmegaConf.create({"output_dir": str(tmp_path)})) == tmp_path
    assert job_info()["num"] is None and "output_dir" not in job_info()  # no job's: as outside Hydra
    monkeypatch.chdir(tmp_path)
    assert mlflow_store() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    hc.runtime.output_dir = str(tmp_path / "run")  # a job's: read as before
    assert output_dir(OmegaConf.create({"output_dir": "elsewhere"})) == tmp_path / "run"
