"""One ``mis-lightning`` job: train, assess every selected scheme, write and log the results.

``run_job(cfg)`` is what the Hydra entry point (:mod:`mis_lightning.cli`) calls. It

1. builds the datamodule (``cfg.data``), sets it up, and builds the model (``cfg.model``) with
   ``num_features`` (and ``task`` where the model takes one) from the datamodule;
2. builds the loggers (``cfg.logger``) and the trainer (``cfg.trainer``), and trains;
3. assesses the trained model under each scheme (``cfg.quantizer`` when one is selected,
   else ``cfg.schemes``) with :func:`mis_lightning.assess` and the stage configs that Hydra
   builds from ``cfg.mis`` (:func:`stage_configs_of`; conf/mis/*.yaml); Trainer callbacks of
   the ``callbacks`` group (e.g. ``MISCallback`` for mid-training assessments) join the fit;
4. writes ``report.json``, ``report.csv``, ``privacy_utility.png`` and ``result.json`` (the
   scheme rows plus the job's overrides, read by :mod:`mis_lightning.app.aggregate`) into the
   job's output dir, logs the report to the loggers and closes their runs;
5. prints the table and the figure's path.

With ``mode=assess`` it trains nothing: it assesses the model saved in ``ckpt_path`` (a
checkpoint written by a training run as ``<run dir>/model.ckpt``, or any Lightning checkpoint
of the app's model) on the data of the config, the datamodule's and the model's options taken
from the checkpoint where it has them (:func:`load_checkpoint_of`), and writes the same files.

Before training it checks the scheme names and each scheme's availability on this machine
(:func:`check_schemes_available`). A failing job writes ``result.json`` with ``status:
"failed"`` and the error (see :func:`run_job`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from mis_lightning._warning_filters import ignoring
from mis_lightning.app.batches import (
    assessment_loader,
    batch_fn_of,
    check_first_batches,
    check_model_api,
)
from mis_lightning.app.checkpoint_fit import (
    ORIGIN_KEY,
    check_checkpoint_fits,
    checkpoint_untrained,
    misfit_error,
    origin_of,
    same_weights,
)
from mis_lightning.app.factories import resolve_schemes
from mis_lightning.app.launchers import check_main_module_paths
from mis_lightning.assess import (
    assess,
    check_schemes,
    check_utility_metric,
    refusals_shown,
    select_params,
    training_records,
)
from mis_lightning.config import EstimationConfig, ScoringConfig
from mis_lightning.planning import PlanConfig, PlanResult, check_size_budget, plan
from mis_lightning.progress import ProgressDisplay, ProgressFn
from mis_lightning.quantization import QuantizationScheme, SchemeUnavailableError
from mis_lightning.record_count import check_enough_records
from mis_lightning.report import (
    CONSOLE_WIDTH,
    UTILITY_TOLERANCE,
    WRITTEN_WITH_FIGURE,
    Report,
    not_trained_warning,
    to_plain,
    undetermined_headline,
)

__all__ = ["assess_schemes", "check_schemes_available", "job_info", "output_dir", "run_job",
           "stage_configs_of"]


# -- small helpers -------------------------------------------------------------------------------


def plan_config_of(cfg: DictConfig) -> PlanConfig | None:
    """``mode=plan``: the :class:`~mis_lightning.planning.PlanConfig` of ``cfg.plan`` (the
    structured config ``plan/default`` stored from the dataclass: each option declared once),
    its candidates checked; other modes: ``None``.

    Raises:
        ValueError: an invalid plan option (named); KeyError: an unknown candidate name.
    """
    if str(cfg.get("mode", "train")) != "plan":
        return None
    check_plan_selection(cfg)
    node = cfg.get("plan")
    pc = PlanConfig(**(OmegaConf.to_container(node, resolve=True) if node is not None else {}))  # type: ignore[arg-type]
    specs = list(pc.candidates)
    pc.candidates = resolve_schemes(specs)
    check_unique_names(pc.candidates, specs, "plan.candidates")
    return pc


def _spec_text(spec: Any) -> str:
    """A config entry as the user wrote it: ``int8_weight_only`` or ``{name: ..., group_size: 32}``."""
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in spec.items()) + "}"
    return str(getattr(spec, "name", spec))


def check_unique_names(schemes: Sequence[QuantizationScheme], specs: Sequence[Any], option: str) -> None:
    """Each scheme of a job is scored once under its name: refuse two entries of ``option``
    (``schemes`` or ``plan.candidates``) that build schemes of one name, before training.

    Raises:
        ValueError: naming both entries (position and text), the scheme and the fix.
    """
    first: dict[str, int] = {}
    for i, sch in enumerate(schemes):
        j = first.setdefault(sch.name, i)
        if j == i:
            continue
        both = f"{option} entries {j + 1} ({_spec_text(specs[j])}) and {i + 1} ({_spec_text(specs[i])})"
        if repr(schemes[j]) == repr(sch):
            raise ValueError(f"{both} build the same scheme {sch.name!r} ({sch!r}): each scheme is "
                             "scored once, so list it once")
        raise ValueError(f"{both} build two schemes named {sch.name!r} ({schemes[j]!r} and {sch!r}): each "
                         "scheme is scored once under its name; drop one, or change the options of one so "
                         "that it builds a scheme of another name (a scheme's name follows its options: "
                         "mis_lightning.get_scheme(<name>, **options).name)")


def _overridden(keys: Sequence[str]) -> list[str]:
    """The command-line overrides of the running Hydra job that set one of ``keys``
    (``schemes=...``, ``+schemes=...``, ``quantizer=...``)."""
    out = []
    for ov in job_info()["overrides"]:
        key = str(ov).split("=", 1)[0].lstrip("+~")
        if key in keys:
            out.append(str(ov))
    return out


def check_plan_selection(cfg: DictConfig) -> None:
    """``mode=plan`` plans over ``plan.candidates`` alone: refuse a ``quantizer`` selection or a
    ``schemes=`` given on the command line, which it would otherwise ignore (a sweep over
    ``quantizer=`` would run the same plan in every job). The config's default ``schemes`` list
    is not a choice of the user's and passes.

    Raises:
        ValueError: naming the ignored option and the one to use instead.
    """
    q = cfg.get("quantizer")
    given = [f"quantizer={q.get('name', '?')}"] if q else []
    given += [ov for ov in _overridden(("schemes",)) if not ov.startswith("~")]
    if given:
        raise ValueError(
            f"mode=plan plans over plan.candidates and does not use {' '.join(given)}: list the schemes "
            "to plan with as 'plan.candidates=[<name>,...]' instead (mode=train / mode=assess score "
            "`schemes` or `quantizer`)")
    mine = cfg.get("schemes")
    if mine is not None and OmegaConf.to_container(mine, resolve=True) != _packaged_schemes():
        # set in a config file (an experiment's `schemes:`): said, not refused (the same file may
        # serve mode=assess runs)
        print("warning: mode=plan plans over plan.candidates "
              f"{list(OmegaConf.to_container(cfg.plan.candidates, resolve=True)) if cfg.get('plan') else '(default)'}; "
              "the config's `schemes` list is not used (set plan.candidates to plan over other schemes)",
              file=sys.stderr)


def _packaged_schemes() -> list[Any]:
    """The ``schemes`` list of the packaged primary config (conf/config.yaml)."""
    from importlib.resources import files

    return list(OmegaConf.load(str(files("mis_lightning.conf") / "config.yaml")).get("schemes") or [])


def write_plan(planned: PlanResult, out: Path, names: Any) -> None:
    """``plan.json`` (:meth:`PlanResult.to_dict`), ``plan.md`` (the table) and the frontier figure."""
    import matplotlib.pyplot as plt

    (out / names.get("plan", "plan.json")).write_text(json.dumps(to_plain(planned.to_dict()), indent=2))
    (out / "plan.md").write_text(planned.table() + "\n")
    plt.close(planned.figure(str(out / names.get("plan_figure", "plan_frontier.png"))))


def _hydra_config() -> Any | None:
    """The running Hydra job's config, ``None`` outside one. A config Hydra left set in the process
    without a job (``runtime.output_dir`` still ``???``: an app run here that stopped before its job,
    Hydra's ``--cfg``/``--info`` paths) is no job's: ``run_job(cfg)`` called after it read
    ``MissingMandatoryValue: hydra.runtime.output_dir`` (under xdist)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if OmegaConf.select(hc, "runtime.output_dir", default=None) else None


def output_dir(cfg: DictConfig | None = None) -> Path:
    """The job's output dir: Hydra's ``runtime.output_dir``, else ``cfg.output_dir``, else cwd."""
    hc = _hydra_config()
    if hc is not None:
        return Path(hc.runtime.output_dir)
    if cfg is not None and cfg.get("output_dir"):
        return Path(cfg.output_dir)
    return Path.cwd()


def job_info() -> dict[str, Any]:
    """Job number, name, overrides and config-group choices of the running Hydra job."""
    hc = _hydra_config()
    if hc is None:
        return {"num": None, "name": None, "overrides": [], "override_dirname": "", "choices": {}}
    from hydra.types import RunMode

    from mis_lightning.app.aggregate import SWEEP_ID_ENV

    multirun = hc.mode == RunMode.MULTIRUN
    choices = {k: v for k, v in OmegaConf.to_container(hc.runtime.choices).items()
               if not k.startswith("hydra")}
    return {
        "num": int(hc.job.num) if multirun and hc.job.get("num") is not None else None,
        "id": hc.job.get("id"),
        "name": hc.job.name,
        "overrides": list(hc.overrides.task),
        "override_dirname": hc.job.override_dirname,
        "choices": choices,
        "output_dir": str(hc.runtime.output_dir),
        "multirun": multirun,
        # the sweep's id (AggregateSweep.on_multirun_start): its aggregate leaves out stale jobs
        "sweep_id": os.environ.get(SWEEP_ID_ENV) if multirun else None,
    }


def _integer_option(key: str, value: Any, expected: str) -> int:
    """``value`` of the top-level option ``key`` as an int.

    Raises:
        ValueError: naming the option and what it takes (``int('abc')``'s own message names
            neither).
    """
    if isinstance(value, bool):
        raise ValueError(f"{key} must be {expected}, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {expected}, got {value!r}") from None


def set_threads(setting: Any) -> int:
    """Apply ``num_threads``: ``None`` (torch default), an int, or ``"auto"`` (in a multirun
    under a launcher with ``n_jobs``: cores / n_jobs). Returns the thread count in effect."""
    if setting is None:
        return torch.get_num_threads()
    if setting == "auto":
        hc = _hydra_config()
        n_jobs = None
        if hc is not None:
            from hydra.types import RunMode

            if hc.mode == RunMode.MULTIRUN:
                n_jobs = hc.launcher.get("n_jobs") if "launcher" in hc else None
        if n_jobs:
            cores = os.cpu_count() or 1
            n_jobs = cores if int(n_jobs) < 0 else int(n_jobs)
            torch.set_num_threads(max(1, cores // max(n_jobs, 1)))
        return torch.get_num_threads()
    n = _integer_option("num_threads", setting, "null, 'auto' or an integer >= 1")
    if n < 1:
        raise ValueError(f"num_threads must be null, 'auto' or an integer >= 1, got {setting!r}")
    torch.set_num_threads(n)
    return n


# -- progress ------------------------------------------------------------------------------------
class EpochProgress(pl.Callback):
    """Reports ``progress("train", epochs done)`` once per epoch (rank 0; a no-op in spawned
    ddp processes: the hook is not pickled). The display is :class:`~mis_lightning.progress.ProgressDisplay`.

    Raises:
        Nothing.
    """

    def __init__(self, progress: ProgressFn | None) -> None:
        self._progress = progress

    def __getstate__(self) -> dict[str, Any]:
        return {"_progress": None}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._progress is not None and trainer.is_global_zero:
            self._progress("train", trainer.current_epoch + 1)
        trainer.callback_metrics[_EPOCH_KEY] = torch.tensor(trainer.current_epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Under ddp_spawn the main process's trainer keeps global_step 0 (Lightning sends back
        # the weights, the state and callback_metrics only): the final step travels in
        # callback_metrics, so that the report is logged at the step it follows (trained_step)
        trainer.callback_metrics[_STEP_KEY] = torch.tensor(trainer.global_step)


_STEP_KEY = "_mis_lightning_global_step"
_EPOCH_KEY = "_mis_lightning_epoch"


def trained_step(trainer: pl.Trainer) -> int:
    """The optimizer steps the fit took: ``trainer.global_step``, or under ``ddp_spawn`` (where
    the main process's trainer did not train) rank 0's, sent back by :class:`EpochProgress`
    through ``callback_metrics`` (the entry is removed)."""
    sent = trainer.callback_metrics.pop(_STEP_KEY, None)
    return max(int(trainer.global_step), int(sent) if sent is not None else 0)


def trained_epoch(trainer: pl.Trainer) -> int | None:
    """The last epoch trained (0-based, as Lightning's logged ``epoch``), sent by
    :class:`EpochProgress` through ``callback_metrics`` (rank 0's under ``ddp_spawn``; the entry
    is removed); ``None`` when no epoch ended."""
    sent = trainer.callback_metrics.pop(_EPOCH_KEY, None)
    return int(sent) if sent is not None else None


@contextmanager
def _timed(times: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[key] = round(time.perf_counter() - t0, 3)


# -- assessment ----------------------------------------------------------------------------------
def assess_schemes(model: torch.nn.Module, schemes: Sequence[QuantizationScheme | str],
                   train_dataloader: Any, loss_fn: Callable, **kwargs: Any) -> Report:
    """Deprecated: :func:`mis_lightning.assess` (same arguments; the app now calls it).

    Raises:
        As :func:`mis_lightning.assess`.
    """

    from mis_lightning.assess import assess

    warnings.warn("mis_lightning.app.job.assess_schemes is deprecated, use mis_lightning.assess",
                  DeprecationWarning, stacklevel=2)
    return assess(model, schemes, train_dataloader, loss_fn, **kwargs)


def stage_configs_of(cfg: DictConfig) -> tuple[EstimationConfig, ScoringConfig]:
    """``(EstimationConfig, ScoringConfig)`` built by Hydra from ``cfg.mis.estimation`` and
    ``cfg.mis.scoring`` (``_target_`` nodes, see conf/mis/).

    Raises:
        TypeError: a node does not build the expected config (names it).
        ValueError: an invalid option (from the config's checks, naming the option).
    """
    import dataclasses

    from hydra.utils import instantiate

    from mis_lightning.config import unexpected_options

    for key, cls in (("estimation", EstimationConfig), ("scoring", ScoringConfig)):
        node = cfg.mis.get(key)
        fields = {f.name for f in dataclasses.fields(cls)}
        # a `+mis.estimation.<typo>=...` override reaches the dataclass as a keyword: name the
        # close fields (Hydra's own "not in struct" error covers overrides without the +)
        unknown = [k for k in (node or {}) if not str(k).startswith("_") and k not in fields]
        if unknown and node.get("_target_", "").endswith(cls.__name__):
            err = unexpected_options(cls.__name__, unknown, what=f"the fields of {cls.__name__}", known=fields)
            raise TypeError(f"mis.{key}: {err}")
    est, sc = instantiate(cfg.mis.estimation), instantiate(cfg.mis.scoring)
    for key, obj, cls in (("estimation", est, EstimationConfig), ("scoring", sc, ScoringConfig)):
        if not isinstance(obj, cls):
            raise TypeError(f"mis.{key} must build a {cls.__name__} (_target_: "
                            f"mis_lightning.config.{cls.__name__}), got {type(obj).__name__}")
    return est, sc


def selected_schemes(cfg: DictConfig) -> list[QuantizationScheme]:
    """``cfg.quantizer`` (one scheme) when the group is selected, else the ``cfg.schemes`` list."""
    q = cfg.get("quantizer")
    if q:
        if "name" not in q and "_target_" not in q:  # rv54c: '+quantizer.<key>=' alone: no scheme to pass it to
            keys = ", ".join(f"+quantizer.{k}" for k in q)
            raise ValueError(
                f"{keys} given without a scheme: pick one with quantizer=<name> (e.g. quantizer=int8_weight_only "
                f"{keys}=...), or give the option to each entry of the list: schemes=[{{name: <name>, <key>: ...}}]")
        return resolve_schemes([q])
    specs = cfg.get("schemes")
    if not specs:
        raise ValueError("no scheme selected: set `schemes: [...]` or pick `quantizer=<name>`")
    schemes = resolve_schemes(list(specs))
    check_unique_names(schemes, list(specs), "schemes")
    return schemes


# -- the job -------------------------------------------------------------------------------------
def _build_model(cfg: DictConfig, num_features: int, task: str,
                 saved: dict[str, Any] | None = None) -> Any:
    from hydra.utils import instantiate

    kwargs: dict[str, Any] = {**(saved or {}), "num_features": int(num_features)}
    if "task" in cfg.model or OmegaConf.is_missing(cfg.model, "task"):  # `in` is False for ???
        kwargs["task"] = task
    model = instantiate(cfg.model, **kwargs)
    model_task = getattr(model, "task", task)
    if model_task != task:
        raise ValueError(
            f"model {type(model).__name__} is a {model_task!r} model but data {cfg.data._target_} "
            f"is a {task!r} task: pick a matching model (e.g. model=logistic for binary data, "
            "model=linear for regression, or model=mlp_probe for either)"
        )
    return model


def _load_weights(model: torch.nn.Module, ckpt: dict[str, Any], cfg: DictConfig) -> None:
    """Load the checkpoint's weights into the model built from the config (strict).

    Raises:
        ValueError: the weights do not fit (names the model and the checkpoint, and what to do).
    """
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise misfit_error(cfg, type(model).__name__, " ".join(str(exc).split())) from exc


def _build_callbacks(cfg: DictConfig, batch_fn: Callable | None = None) -> list[Any]:
    """The Trainer callbacks of the ``callbacks`` group (``{name: {_target_: ...}}``, as the
    Lightning+Hydra templates compose them; e.g. ``callbacks=mis_every_epoch``). A ``MISCallback``
    node without a ``batch_fn`` of its own gets the job's (the config's ``batch_fn``): it reads the
    same batches."""
    from hydra.utils import instantiate

    nodes = cfg.get("callbacks") or {}
    out = []
    for node in nodes.values():
        if node is None or "_target_" not in node:
            continue
        mine = str(node.get("_target_")).rsplit(".", 1)[-1] == "MISCallback" and node.get("batch_fn") is None
        out.append(instantiate(node, **({"batch_fn": batch_fn} if mine and batch_fn is not None else {})))
    return out


def _build_loggers(cfg: DictConfig) -> list[Any]:
    from hydra.utils import instantiate

    lg_cfg = cfg.get("logger")
    if not lg_cfg:
        return []
    out = []
    for node in lg_cfg.values():
        if node is not None and "_target_" in node:
            out.append(instantiate(node))
    return out


def job_params(cfg: DictConfig, scheme_names: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """What a tracker run records of the job besides the model's and the datamodule's
    hyperparameters (which Lightning logs itself): the seed, the assessed schemes, the job's
    command-line overrides and its number in a multirun, under ``job/`` keys (no clash with the
    modules' own names; MLflow refuses a parameter logged twice with another value). Without them
    a sweep's runs could be told apart only by their names."""
    out: dict[str, Any] = {"job/seed": cfg.get("seed"), "job/schemes": ",".join(scheme_names),
                           "job/overrides": " ".join(info.get("overrides") or []) or "-"}
    if info.get("num") is not None:
        out["job/num"] = info["num"]
    return out


def _assessment_loader(dm: Any) -> Any:
    """A non-shuffled loader over the training set: :func:`mis_lightning.app.batches.assessment_loader`."""
    return assessment_loader(dm)


def weight_decay_note(model: Any, est_cfg: EstimationConfig) -> str | None:
    """The line said (and kept in the report's warnings) when the assessment takes the model's
    training objective to have no L2 term because nothing tells it one: ``mis.estimation.weight_decay``
    is null and the model has no numeric ``weight_decay`` attribute (a model of the user's whose
    optimizer decays the weights, or whose loss adds a penalty, would be assessed as unpenalised,
    and its report would only say "not at a minimum"); ``None`` otherwise."""
    if est_cfg.weight_decay is not None:
        return None
    attr = getattr(model, "weight_decay", None)
    if isinstance(attr, (int, float)) and not isinstance(attr, bool):
        return None
    return (f"model {type(model).__name__} has no numeric weight_decay attribute and mis.estimation.weight_decay "
            "is null, so its training objective is taken to have no L2 term (weight_decay 0); if training "
            "penalised the weights (a weight_decay= of the optimizer, a penalty in the loss), set "
            "mis.estimation.weight_decay=<its coefficient lambda of lambda/2 |theta|^2> or a weight_decay "
            "attribute on the model")


def check_datamodule(dm: Any) -> str:
    """The task of the set-up datamodule, checked with what the assessment needs of it, before
    training: a task the app measures, and ``train_dataset`` (every training record once, in a
    fixed order: a train loader may shuffle and drop the last batch, which would assess a random
    part of the training set).

    Raises:
        ValueError: another task than ``"regression"`` / ``"binary"``, no ``train_dataset``
            (names the datamodule and the fix), or one of fewer than 4 records
            (:func:`~mis_lightning.record_count.check_enough_records`).
    """
    from mis_lightning.models.metrics import TASKS

    name, task = type(dm).__name__, str(dm.task)
    if task not in TASKS:
        raise ValueError(f"data {name} has task {task!r}, but the app assesses {' and '.join(map(repr, TASKS))} "
                         "tasks only (its utility metrics, plan budgets and models' [B] outputs depend on the "
                         "task). For another task (multiclass classification, ...) use the Python API with "
                         "your own utility metrics: MISCallback(schemes, loss_fn=..., utility_metrics={'acc': "
                         "torchmetrics.Accuracy(task='multiclass', num_classes=...)}) in your Trainer, or "
                         "mis_lightning.assess(model, schemes, train_loader, loss_fn, val_dataloader=..., "
                         "metrics=...); a datamodule with a regression or binary variant: data.task=<that task>")
    if getattr(dm, "train_dataset", None) is None:
        raise ValueError(f"data {name} has no train_dataset after setup(): the assessment reads every "
                         "training record once, in order (its train_dataloader() may shuffle or drop "
                         "records); set self.train_dataset (a torch Dataset of the training records) "
                         "in its setup()")
    try:
        n_train = len(dm.train_dataset)
    except TypeError:  # a dataset without a length: the assessment counts what it reads
        n_train = None
    if n_train is not None:  # too few records: refused now, not after the training
        check_enough_records(n_train, f"the assessment of data {name}")
    return task


def check_params(model: torch.nn.Module, params: Any) -> None:
    """``mis.estimation.params`` names parameters of the model built from the config (and the
    selection passes the assessment's other checks), before training: the assessment would
    otherwise refuse it only after the whole training.

    Raises:
        KeyError: a name the model does not have (with the close names and the model's names).
        ValueError: as :func:`mis_lightning.assess.select_params` (an empty selection, a
            recurrent layer among the selected parameters, ...).
    """

    from mis_lightning.assess import select_params

    with ignoring(("", Warning)):  # its warnings are the assessment's to give, once
        select_params(model, params)


def check_validation_set(dm: Any) -> None:
    """The validation set holds at least 2 records, before training: the utility of every
    quantized copy is measured on it (r2 and auroc need two), so with fewer every scheme would
    be an error row after the whole training. A datamodule whose validation set has no length is
    not checked.

    Raises:
        ValueError: naming the datamodule, the count and the fix.
    """
    try:
        n_val = len(dm.val_dataloader().dataset)
    except Exception:  # noqa: BLE001 - no sized validation set: the assessment will say
        return
    if n_val < 2:
        raise ValueError(f"data {type(dm).__name__} has {n_val} validation record(s) after setup(): the "
                         "utility of each quantized copy is measured on the validation set and needs at "
                         "least 2 records (e.g. data.n_val=200 where the datamodule takes it)")


#: ``output.*`` files every job writes (``report_table`` and ``checkpoint`` may be null: not written)
REQUIRED_OUTPUTS = ("report_json", "report_csv", "figure", "result")


def check_output_names(cfg: DictConfig) -> None:
    """Each file of :data:`REQUIRED_OUTPUTS` has a name, before training (a null one failed
    with ``TypeError: unsupported operand type(s) for /`` once the assessment was done).

    Raises:
        ValueError: naming the option and the ones that may be null.
    """
    names = cfg.get("output") or {}
    for key in REQUIRED_OUTPUTS:
        value = names.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"output.{key} must be a file name (the job writes it), got {value!r}; only "
                             "output.report_table and output.checkpoint may be null (not written)")


def check_plan_metric(plan_cfg: PlanConfig | None, task: str) -> None:
    """``mode=plan``: ``plan.utility_metric`` is one the job measures for ``task`` (``loss`` or
    a metric of :func:`~mis_lightning.models.utility_metrics`), checked before training.

    Raises:
        ValueError: naming the metric, the task and the metrics measured for it.
    """
    from mis_lightning.models import utility_metrics

    if plan_cfg is None:
        return
    measured = ["loss", *utility_metrics(task)]
    if plan_cfg.utility_metric not in measured:
        raise ValueError(f"plan.utility_metric={plan_cfg.utility_metric} is not measured for the {task} "
                         f"task of this data: the app measures {', '.join(measured)} there; pick one "
                         f"of them (e.g. plan.utility_metric={measured[1]})")


def check_schemes_available(schemes: Sequence[QuantizationScheme], strict: bool) -> list[str]:
    """Run each scheme's ``check_available()`` before anything is trained.

    Returns warnings for the unavailable schemes that the job will report as error rows
    (``strict=False`` and at least one scheme available).

    Raises:
        SchemeUnavailableError: with ``strict=True``, any scheme unavailable on this machine;
            otherwise, every scheme unavailable (the job could assess nothing). The message
            names each scheme and why.
    """
    missing: dict[str, str] = {}
    for s in schemes:
        try:
            s.check_available()
        except SchemeUnavailableError as exc:
            missing[s.name] = str(exc)
    if not missing:
        return []
    why = "; ".join(missing.values())
    if strict or len(missing) == len(schemes):
        which = "every selected scheme is" if len(missing) == len(schemes) else (
            f"{len(missing)} of {len(schemes)} schemes are")
        raise SchemeUnavailableError(
            f"{which} unavailable on this machine, so nothing was trained: {why}"
            + ("" if len(missing) == len(schemes) else
               " (mis.scoring.strict=false reports them as error rows and assesses the others)"))
    return [f"scheme {k!r} is unavailable on this machine and will be an error row: {v}"
            for k, v in missing.items()]


def requested_scheme_names(cfg: DictConfig) -> list[str]:
    """The scheme names a config asks for (for a failed job's record; never raises):
    ``mode=plan``: ``plan.candidates``; else ``quantizer`` when selected, else ``schemes``."""
    try:
        q = cfg.get("quantizer")
        if str(cfg.get("mode", "train")) == "plan":
            specs = list((cfg.get("plan") or {}).get("candidates") or [])
        else:
            specs = [q] if q else list(cfg.get("schemes") or [])
        out = []
        for spec in specs:
            if isinstance(spec, str):
                out.append(spec)
            elif hasattr(spec, "get"):
                out.append(str(spec.get("name") or spec.get("_target_", "?")))
            else:
                out.append(str(spec))
        return out
    except Exception:  # noqa: BLE001 - a broken config must not hide the job's own error
        return []


#: Lightning's notices about its own internals that the app's own Trainer sets off (the README's
#: default job printed both): the LeafSpec check (Lightning 2.6 under torch 2.13) and the "Tip"
#: adverts for litlogger / litmodels (Lightning's rank-zero logger)
LIGHTNING_NOTICE_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
LIGHTNING_TIP_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"
LIGHTNING_RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_TIP_PREFIX)


@contextmanager
def lightning_notices_quieted() -> Iterator[None]:
    """Around the app's own Trainer (its construction and ``fit``): Lightning's notices about its
    own code (:data:`LIGHTNING_NOTICE_WARNINGS`, the "Tip" adverts) are dropped, by their exact
    text; every other warning and log line, the user's included, passes, and nothing is
    dropped outside the block. Not used by :class:`~mis_lightning.MISCallback`: there the Trainer
    is the user's."""
    tips, loggers = _DropTips(), [logging.getLogger(n) for n in LIGHTNING_RANK_ZERO_LOGGERS]
    # filters the user's modules add during fit stay; shown-once registries are not reset (ln43)
    with ignoring(*((msg, FutureWarning) for msg in LIGHTNING_NOTICE_WARNINGS)):
        for lg in loggers:
            lg.addFilter(tips)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(tips)


def sweep_verdict_note(report: Report, info: Mapping[str, Any]) -> str | None:
    """In a multirun, the line a job that assessed one scheme prints in place of the verdict (a
    verdict chooses among schemes; each job of ``-m quantizer=a,b,...`` has one, and printed
    "verdict: safest ...: a"), pointing to the sweep's aggregate; ``None`` otherwise (a
    single run, or a job with several schemes, keeps its verdict). ``info``: :func:`job_info`."""
    if not info.get("multirun") or len(report.schemes) != 1:
        return None
    (name,) = report.schemes
    return (f"verdict: none in this job, which assessed one scheme ({name}); the sweep's jobs are compared in "
            "aggregate.md and frontier.png in the sweep dir (written when the sweep ends)")


def warnings_in_full(out: Path, names: Any) -> str:
    """Where the job's printed table says its one-line warnings are in full
    (``Report.table``'s ``warnings_in_full``): the job's ``report.md`` (``output.report_table``),
    else its ``report.json``."""
    return str(out / (names.get("report_table") or names.report_json))


def sweep_table(report: Report, table: str, info: Mapping[str, Any], *, with_verdict: bool = True,
                table_file: str | None = None, warnings_in_full: str | None = None) -> str:
    """The table a job prints: ``table`` (``report.table(with_verdict=...)``) in a single run and
    in a sweep's first job; in its other jobs the legend's entries for the columns every table has
    are one line pointing to job 0's (a sweep printed them once per job: six legends before the
    aggregate). ``info``: :func:`job_info`. ``warnings_in_full``: where the one-line
    warnings are in full (``Report.table``'s; ``None``: its default)."""
    if not info.get("multirun") or info.get("num") in (None, 0):
        return table
    where = f"; in full in each job's {table_file}" if table_file else ""
    full = {} if warnings_in_full is None else {"warnings_in_full": warnings_in_full}
    return report.table(with_verdict=with_verdict, verdict_note=sweep_verdict_note(report, info),
                        legend_columns=f"legend: the columns as under job 0's table{where}.", width=CONSOLE_WIDTH,
                        **full)


def check_launched_paths(cfg: DictConfig) -> None:
    """In a multirun, :func:`~mis_lightning.app.launchers.check_main_module_paths` with Hydra's
    launcher (a single run is never launched elsewhere, whatever ``hydra/launcher`` says).

    Raises:
        ValueError: a dotted path into ``__main__`` under a launcher with processes of its own.
    """
    hc = _hydra_config()
    if hc is None:
        return
    from hydra.types import RunMode

    if hc.get("mode") == RunMode.MULTIRUN:
        check_main_module_paths(cfg, hc.get("launcher"))


def _aggregated_multirun() -> bool:
    """A multirun whose sweep is aggregated by :class:`AggregateSweep` (a failed job then
    records its error and returns, so that the sweep goes on and is aggregated)."""
    hc = _hydra_config()
    if hc is None:
        return False
    from hydra.types import RunMode

    if hc.mode != RunMode.MULTIRUN:
        return False
    cbs = hc.get("callbacks") or {}
    return any(str((node or {}).get("_target_", "")).endswith("AggregateSweep") for node in cbs.values())


MODES = ("train", "assess", "plan")


def load_checkpoint_of(cfg: DictConfig) -> dict[str, Any] | None:
    """The checkpoint to assess in ``mode=assess`` (``None`` in ``mode=train``; in ``mode=plan``
    the checkpoint when ``ckpt_path`` is set, else ``None``: train, then plan), checked before
    any data is read.

    Raises:
        ValueError: ``mode`` is not ``train``, ``assess`` or ``plan``; ``mode=assess`` without
            ``ckpt_path``; ``ckpt_path`` with ``mode=train`` (it would be ignored); a file that
            is not a Lightning checkpoint (no ``state_dict``).
        FileNotFoundError: ``ckpt_path`` does not exist.
    """
    mode, path = cfg.get("mode", "train"), cfg.get("ckpt_path")
    if mode not in MODES:
        raise ValueError(f"mode must be 'train', 'assess' or 'plan', got {mode!r}")
    if mode == "train":
        if path:
            raise ValueError(f"ckpt_path={path} is set but mode=train would train a new model and "
                             "ignore it: add mode=assess to assess the checkpoint")
        return None
    if mode == "plan" and not path:  # plan a freshly trained model
        return None
    if not path:
        raise ValueError("mode=assess needs ckpt_path=<checkpoint of the app's model> (a training "
                         "run writes <run dir>/model.ckpt, see output.checkpoint)")
    if not Path(str(path)).is_file():
        raise FileNotFoundError(f"ckpt_path {path} does not exist")
    # weights_only=False: a Lightning checkpoint holds hyperparameters (plain Python objects),
    # and it is the user's own file
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path {path} is not a Lightning checkpoint (no 'state_dict' in it)")
    return ckpt


def _from_checkpoint(node: DictConfig, saved: Any, what: str) -> dict[str, Any]:
    """The saved hyperparameters of ``node``'s keys that differ from the config: the checkpoint
    wins (its model was trained on those records with those options); each one is announced."""
    out = {}
    for k, v in dict(saved or {}).items():
        if k in node and not OmegaConf.is_missing(node, k):
            cur = OmegaConf.to_container(node[k]) if OmegaConf.is_config(node[k]) else node[k]
            v = list(v) if isinstance(v, tuple) else v
            if cur != v:
                out[k] = v
                print(f"note: {what}.{k} = {v!r} from the checkpoint (the config says {cur!r})",
                      file=sys.stderr)
    return out


def save_checkpoint(path: Path, model: pl.LightningModule, dm: Any, global_step: int,
                    epoch: int | None = None, origin: dict[str, Any] | None = None) -> None:
    """A Lightning-format checkpoint of the trained model (``state_dict``, ``hyper_parameters``,
    ``datamodule_hyper_parameters``, ``global_step``, and ``epoch``: the last epoch trained,
    0-based, when known) and ``origin`` (:func:`~mis_lightning.app.checkpoint_fit.origin_of`:
    the model class and data= / model= choices, named by ``mode=assess`` when another model or
    data is configured): what ``mode=assess`` reads, and what
    ``type(model).load_from_checkpoint`` loads. Written from the main process (also after
    ``ddp_spawn``, whose trained weights are back in ``model``)."""
    torch.save({
        "state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
        "datamodule_hyper_parameters": dict(getattr(dm, "hparams", {}) or {}),
        "global_step": int(global_step), "pytorch-lightning_version": pl.__version__,
        **({"epoch": int(epoch)} if epoch is not None else {}),
        # the model class, data target and group choices: mode=assess names them on a mismatch
        **({ORIGIN_KEY: origin} if origin is not None else {}),
    }, path)


def checkpoint_epoch(ckpt: dict[str, Any]) -> int | None:
    """The last epoch a checkpoint's weights were trained in (0-based, as the training run's
    logged ``epoch``), or ``None``. Lightning's own checkpoints store ``current_epoch``, which
    after ``fit`` counts the epochs run (``trainer.save_checkpoint`` after a 2-epoch fit:
    ``epoch`` 2, the weights of epoch 1); their fit loop's started-epoch count tells (``epoch``
    1 at the end of epoch 1 and after the fit alike). The app's checkpoints store the epoch."""
    try:
        started = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["started"]
    except (KeyError, TypeError):
        started = None
    if isinstance(started, int) and started > 0:
        return started - 1
    epoch = ckpt.get("epoch")
    return int(epoch) if isinstance(epoch, int) else None


def user_error(exc: BaseException) -> BaseException:
    """The error a user should read: Hydra's ``InstantiationException`` unwrapped to the
    configured class's own error (``EstimationConfig``'s ValueError naming the option)."""
    from hydra.errors import InstantiationException

    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Train, assess, write and log one job (see the module docstring). Returns a summary.

    A failing job writes ``result.json`` with ``status: "failed"``, the stage (configuration,
    data, training, assessment, output), the error and its traceback. In a single run the
    error is then raised (the command exits 1). In a multirun aggregated by
    :class:`~mis_lightning.app.aggregate.AggregateSweep` (the default) the job prints the error
    and returns, so that the other jobs run and the sweep is aggregated; the aggregate lists
    the failure and the command exits 1 at the end. A job whose every scheme is an error row
    returns ``scored: False`` (the command exits 1 in a single run; the aggregate counts it).
    """
    stage = ["configuration"]
    try:
        return _run_job(cfg, stage)
    except Exception as raised:
        from mis_lightning.app.aggregate import write_failure

        exc = user_error(raised)

        out = output_dir(cfg)
        names = cfg.get("output") or {}
        path = write_failure(
            out / str(names.get("result", "result.json")), exc, stage=stage[0], job=job_info(),
            schemes=requested_scheme_names(cfg),
            data=str((cfg.get("data") or {}).get("_target_", "")),
            model=str((cfg.get("model") or {}).get("_target_", "")).rsplit(".", 1)[-1],
        )
        if not _aggregated_multirun():
            raised.mis_lightning_stage = stage[0]  # type: ignore[attr-defined]  # the CLI's short message
            raise
        import traceback

        if stage[0] != "configuration":  # a user's configuration mistake needs its message only
            traceback.print_exc(file=sys.stderr)
        print(f"mis-lightning: job failed during {stage[0]}: {type(exc).__name__}: {exc}\n"
              f"  recorded in {path}; the sweep goes on, its aggregate lists this failure and "
              "the command exits with status 1", file=sys.stderr)
        return {"output_dir": str(out), "error": f"{type(exc).__name__}: {exc}", "stage": stage[0]}


def _run_job(cfg: DictConfig, stage: list[str]) -> dict[str, Any]:
    from hydra.utils import instantiate

    from mis_lightning.models import metric_inputs, utility_metrics
    from mis_lightning.tracking import draw_figure, log_files, log_report

    times: dict[str, float] = {}
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    threads = set_threads(cfg.get("num_threads"))
    pl.seed_everything(_integer_option("seed", cfg.seed, "an integer"), workers=True, verbose=False)
    check_output_names(cfg)  # a file the job could only fail to write after the assessment
    check_launched_paths(cfg)  # `__main__.X` under a launcher with processes of its own (nu42c)
    plan_cfg = plan_config_of(cfg)  # mode=plan: its options and candidates, checked before training
    batch_fn = batch_fn_of(cfg)  # a batch_fn path that does not import: before the data is read
    # fail fast on a bad scheme name, before training (mode=plan scores its candidates only: a
    # `~schemes` there said "no scheme selected")
    schemes = resolve_schemes(plan_cfg.candidates) if plan_cfg is not None else selected_schemes(cfg)
    est_cfg, sc_cfg = stage_configs_of(cfg)  # invalid options fail here, before training
    # ... and on a scheme this machine cannot run (e.g. int4_weight_only_tinygemm without CUDA)
    unavailable = check_schemes_available(schemes, strict=sc_cfg.strict)
    for w in unavailable:
        print(f"warning: {w}", file=sys.stderr)
    ckpt = load_checkpoint_of(cfg)  # mode=assess: a bad ckpt_path fails before the data is read
    if ckpt is not None:  # ... and one of another model or data than the config builds (nux53 #13)
        check_checkpoint_fits(cfg, ckpt)
    show = bool(cfg.get("progress", True))

    # mode=plan re-assesses the candidates and at most `reassess` + `reassess_near_budget` plans
    n_scored = len(schemes) + (int(plan_cfg.reassess) + int(plan_cfg.reassess_near_budget)
                               if plan_cfg is not None else 0)
    with ProgressDisplay({"data": 1, "schemes": n_scored}, enabled=show) as progress:
        progress("data", 0)
        with _timed(times, "data"):
            # the datamodule's own checks of its options (data.n_train=0, ...) are configuration
            # errors (one line, exit 2); reading the data (setup) is the data stage
            dm = instantiate(cfg.data, **({} if ckpt is None else _from_checkpoint(
                cfg.data, ckpt.get("datamodule_hyper_parameters"), "data")))
            stage[0] = "data"
            dm.setup("fit")
        progress("data", 1, description=f"data: {dm.n_train} training records, "
                 f"{dm.num_features} features ({dm.task})")
        task = str(dm.task)
        hp = getattr(dm, "hparams", None)
        if hp is not None and "task" in hp and hp["task"] != task:
            # record the effective task (an alias or an inferred one) so that Lightning can
            # merge the model's and the datamodule's hyperparameters for the loggers: it merges
            # hparams_initial, which save_hyperparameters sets (assigning hparams did not)
            dm.save_hyperparameters({"task": task})
        stage[0] = "configuration"
        check_datamodule(dm)
        check_validation_set(dm)
        check_plan_metric(plan_cfg, task)
        saved = None if ckpt is None else _from_checkpoint(cfg.model, ckpt.get("hyper_parameters"), "model")
        try:
            model = _build_model(cfg, dm.num_features, task, saved)
        except Exception as exc:
            # Hydra wraps the constructor's error (InstantiationException, the cause chained)
            cause = exc.__cause__ if type(exc).__name__ == "InstantiationException" and exc.__cause__ else exc
            if not saved or not isinstance(cause, TypeError):
                raise
            # the checkpoint's options poured into another model's config (its origin unknown:
            # check_checkpoint_fits said nothing): the model= / data= of its run are missing
            raise misfit_error(cfg, str(cfg.model._target_).rsplit(".", 1)[-1],
                               f"its options {', '.join(sorted(saved))} from the checkpoint do not build it: "
                               f"{type(cause).__name__}: {cause}") from exc
        initial = False
        if ckpt is not None:
            # the checkpoint holding the model's initialisation (a step count of 0 says no more
            # than that no Lightning fit stepped: ux54c), compared before the weights are loaded
            initial = ckpt.get("global_step") == 0 and same_weights(model, ckpt["state_dict"])
            _load_weights(model, ckpt, cfg)
        check_model_api(model)  # per_sample_loss, which the assessment calls
        # the batches as the assessment will read them (batch_fn, the forward, per-sample losses,
        # the utility metrics): a dict batch without batch_fn failed after the whole training
        check_first_batches(model, dm, batch_fn, task, schemes=schemes, strict=sc_cfg.strict)
        wd_note = weight_decay_note(model, est_cfg)
        if wd_note:
            print(f"note: {wd_note}", file=sys.stderr)
        check_params(model, est_cfg.params)  # a misspelled mis.estimation.params name: before training
        # the library's checks of every front end, before training: schemes that cannot take this
        # model or quantize none of its assessed weights (all of them: refused), and the verdict's
        # utility metric (mis.scoring.utility_key: measured here, its direction known)
        refused: list[str] = []  # said here once: the assessment does not log them again
        for w in check_schemes(model, schemes, strict=sc_cfg.strict, params=select_params(model, est_cfg.params),
                               refused=refused):
            print(f"warning: {w}", file=sys.stderr)
        check_utility_metric(sc_cfg, utility_metrics(task), where="mis.scoring.utility_key", metrics_option=None)
        if plan_cfg is not None:  # a size budget no plan can meet: before training
            check_size_budget(model, plan_cfg, est_cfg.params)
        loggers = _build_loggers(cfg)
        for lg in loggers:  # the job's seed, schemes and overrides, filterable in the tracker
            lg.log_hyperparams(job_params(cfg, [getattr(sc, "name", str(sc)) for sc in schemes], job_info()))
        trainer = None
        if ckpt is None:
            progress("train", 0, description=f"train {type(model).__name__}",
                     total=cfg.trainer.get("max_epochs"))
            with lightning_notices_quieted():  # Lightning's notices about its own code (the app's Trainer)
                trainer = instantiate(cfg.trainer, logger=loggers if loggers else False,
                                      callbacks=[EpochProgress(progress), *_build_callbacks(cfg, batch_fn)])
        if trainer is not None and trainer.num_devices * trainer.num_nodes > 1 and \
                getattr(model, "optimizer_name", "") == "lbfgs":
            raise ValueError(
                "full-batch L-BFGS (model.optimizer=lbfgs) cannot train data-parallel: each rank's "
                "line search takes a data-dependent number of steps and the gradient all-reduce "
                "deadlocks. Use trainer.devices=1, or model.optimizer=adam with a minibatch data.batch_size "
                "(e.g. data.batch_size=64)"
            )
        try:
            if trainer is not None:
                stage[0] = "training"
                with _timed(times, "train"), lightning_notices_quieted():
                    trainer.fit(model, datamodule=dm)
                step, epoch, job_loggers = trained_step(trainer), trained_epoch(trainer), trainer.loggers
                if cfg.output.get("checkpoint"):
                    save_checkpoint(out / cfg.output.checkpoint, model, dm, step, epoch,
                                    origin_of(model, cfg.data.get("_target_"), job_info()["choices"]))
            else:  # mode=assess: the checkpoint's weights, logged at its step
                step, job_loggers = int(ckpt.get("global_step", 0)), loggers
                epoch = checkpoint_epoch(ckpt)
            stage[0] = "assessment"
            model.eval()
            progress("estimation", 0, total=dm.n_train)
            t0 = time.perf_counter()
            # the pipeline itself (estimate -> score), as every front end runs it; mode=plan:
            # the planner (one estimation, the candidates per layer, the plans re-assessed)
            run = functools.partial(assess, schemes=schemes) if plan_cfg is None else functools.partial(
                plan, candidates=schemes, config=plan_cfg)
            with refusals_shown(refused), training_records():  # its own training split: never "unseen"
                planned = run(
                    model, train_dataloader=_assessment_loader(dm), loss_fn=model.per_sample_loss,
                    estimation_config=dataclasses.replace(
                        est_cfg, num_records=min(est_cfg.num_records, dm.n_train)),
                    scoring_config=sc_cfg, val_dataloader=dm.val_dataloader(), batch_fn=batch_fn,
                    metrics=utility_metrics(task),
                    output_transform=functools.partial(metric_inputs, task=task), progress=progress,
                )
            report = planned if plan_cfg is None else planned.report
            if est_cfg.num_records > dm.n_train:  # capped above (as every front end states it, fu31)
                report.estimation["num_records_requested"] = int(est_cfg.num_records)
            times["assess" if plan_cfg is None else "plan"] = round(time.perf_counter() - t0, 3)
            if wd_note:  # kept with the figures it concerns
                report.warnings.append(wd_note)
            # a fit (or the checkpoint's) without an optimizer step: first, no verdict (nux53 #3);
            # a checkpoint: only where it is known untrained, else both readings said (ux54c)
            untrained = ((True, "the training took no optimizer step") if trainer is not None and step == 0
                         else checkpoint_untrained(cfg.ckpt_path, ckpt, initial) if trainer is None else None)
            if untrained is not None and untrained[0]:
                report.warnings.insert(0, not_trained_warning(untrained[1]))
                report.diagnostics["not_trained"] = True
            elif untrained is not None:
                report.warnings.insert(0, untrained[1])
            skipped = list(getattr(dm, "skipped", None) or [])
            if skipped:  # the data behind n: the rows the data module could not use (stderr alone lost them)
                first = skipped[0]
                report.warnings.append(
                    f"data: {len(skipped)} input row(s) skipped by {type(dm).__name__} (first: "
                    f"{first[2] if len(first) > 2 else first}); n counts the {dm.n_train} training records kept")

            stage[0] = "output"
            names = cfg.output
            # a sweep's one-scheme job: no verdict over one scheme, a pointer to the aggregate, kept
            # in report.json (Report.from_json, the trackers' table and report.md print the same)
            report.verdict_note = sweep_verdict_note(report, job_info())
            report.to_json(out / names.report_json)
            report.to_csv(out / names.report_csv)
            # the table as printed below (mode=plan: the plan's budgeted choice replaces the verdict)
            if names.get("report_table"):  # the file keeps the warnings in full, the console one line each
                (out / names.report_table).write_text(report.table(with_verdict=plan_cfg is None, verbose=True) + "\n")
            # the console's: 100 columns, the legend short (report.md has both in full: cv53)
            table = report.table(with_verdict=plan_cfg is None, warnings_in_full=warnings_in_full(out, names),
                                 width=CONSOLE_WIDTH)
            # the warnings a line each, as printed; in full in the report file written beside it
            fig = report.plot(warnings_in_full=WRITTEN_WITH_FIGURE.format(name=names.get("report_table") or names.report_json))
            # drawn once, for the file and the loggers (TensorBoard logs its pixels: fx33)
            pixels = draw_figure(fig, out / names.figure)
            log_report(job_loggers, report, step=step, figure=fig, epoch=epoch, pixels=pixels)
            for lg in job_loggers:  # the JSON next to the figure in trackers that keep files
                log_files(lg, [out / names.report_json], table=report.table(verbose=True), step=step)
            import matplotlib.pyplot as plt

            plt.close(fig)
            if plan_cfg is not None:
                write_plan(planned, out, names)
        except BaseException:
            for lg in loggers:
                lg.finalize("failed")
            # ... and end the tracker runs, or the next job of a multirun logs into this one
            _end_mlflow_run(failed=True)
            _end_wandb_run(failed=True)
            raise
    for lg in loggers:  # one tracker run per job: close it so that multirun jobs don't merge
        lg.finalize("success")
    _end_mlflow_run()
    _end_wandb_run()

    info = job_info()
    result = {
        "job": info,
        "status": "ok",
        "mode": str(cfg.get("mode", "train")),
        "ckpt_path": None if ckpt is None else str(cfg.ckpt_path),
        "data": cfg.data.get("_target_"),
        "model": type(model).__name__,
        "task": task,
        "n": report.n,
        "d": report.d,
        "num_threads": threads,
        "baseline_leakage": report.baseline_leakage,
        "baseline_mis": report.baseline_mis,
        "rows": report.rows(),
        "not_ranked": report.not_ranked(),  # the table's "not ranked beyond their intervals" groups
        "warnings": report.warnings,
        # the verdict's band where not the default (the aggregate's verdicts use it)
        **({"utility_tolerance": report.utility_tolerance}
           if report.utility_tolerance != UTILITY_TOLERANCE else {}),
        # the utility the job's table ranks by where declared (mis.scoring.utility_key): the aggregate's too
        **({"utility_key": report.utility_key} if report.utility_key is not None else {}),
        **({"notes": report.notes} if report.notes else {}),  # information, not problems (Report.notes)
        # the validation set's sampling noise: the aggregate's verdicts say it as the job's table does (ux54c)
        **({"utility_records": report.utility_records} if report.utility_records is not None else {}),
        **({"utility_classes": report.utility_classes} if report.utility_classes else {}),
        **({"utility_errors": report.utility_errors} if report.utility_errors else {}),
        "times_s": times,
        **({} if plan_cfg is None else {"plan": planned.to_dict()}),
        "files": {k: str(out / v) for k, v in OmegaConf.to_container(cfg.output).items()
                  if v and (k != "checkpoint" or ckpt is None)},
    }
    (out / cfg.output.result).write_text(json.dumps(to_plain(result), indent=2))

    print(f"\nMIS of {type(model).__name__} on {cfg.data._target_.rsplit('.', 1)[-1]} "
          f"(n = {report.n}, d = {report.d}; baseline leakage {report.baseline_leakage:.4g}"
          # hd51's undet. (cor52): the first line a user reads says it too
          + (" undet.: the headline is undetermined, no figure ranks a scheme" if undetermined_headline(report.rows()) else "")
          + ")")
    print(sweep_table(report, table, info, with_verdict=plan_cfg is None,  # the warnings one line each
                      table_file=names.get("report_table"), warnings_in_full=warnings_in_full(out, names)))
    if plan_cfg is not None:
        print(f"\nplan (candidates {[s.name for s in schemes]}):")
        print(planned.table(report_warnings=False))  # the report's warnings are printed above
        print(f"plan: {out / names.get('plan', 'plan.json')}  figure: {out / names.get('plan_figure', 'plan_frontier.png')}")
    print(f"figure: {out / cfg.output.figure}")
    print(f"report: {out / cfg.output.report_json}  {out / cfg.output.report_csv}"
          + (f"  {out / cfg.output.report_table}" if cfg.output.get("report_table") else ""))
    if ckpt is None and cfg.output.get("checkpoint") and (out / cfg.output.checkpoint).exists():
        print(f"model: {out / cfg.output.checkpoint}  (assess it again: mis-lightning mode=assess "
              f"ckpt_path={out / cfg.output.checkpoint})")
    rows = report.rows()
    scored = not rows or not all(r.get("error") for r in rows)
    if not scored:
        print(f"mis-lightning: no scheme was scored (every row is an error: see the table and "
              f"{out / cfg.output.result})", file=sys.stderr)
    return {"output_dir": str(out), "leakage": {r["scheme"]: r["leakage"] for r in rows}, "scored": scored}


def _end_mlflow_run(failed: bool = False) -> None:
    """End a fluent-API MLflow run if one is active (the Lightning logger uses the client);
    ``failed``: with status ``FAILED``."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and getattr(mlflow, "active_run", lambda: None)() is not None:
        mlflow.end_run(**({"status": "FAILED"} if failed else {}))


def _end_wandb_run(failed: bool = False) -> None:
    """Finish the W&B run if one is active: Lightning's WandbLogger leaves it open, and the next
    job of a multirun in this process would otherwise log into it (a failed job too, whose run
    ends with exit code 1)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(**({"exit_code": 1} if failed else {}))
