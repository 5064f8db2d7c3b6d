"""``MISCallback``: assess membership-inference security of quantized releases during ``fit``.

One concern: *when* to assess (end of ``fit``; every ``every_n_val_epochs`` validation epochs)
and *where* to publish (loggers, ``<dirpath>/mis_report.json`` and the figure:
:mod:`mis_lightning.tracking`). The work (:func:`_lightning_support.assess_on_trainer`) runs in
Lightning's ``isolate_rng`` and eval mode: training is bit-identical with or without the
callback. Behaviour in full (shards, utility, safety, errors, DDP): docs/lightning.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from . import _lightning_support as lt
from ._augmentation import random_records_note
from ._callback_errors import callback_error, names_callback
from ._lightning_compat import lightning_callback_base
from ._loss_match import TrainingLosses, loss_mismatch_note
from ._reloads import TrainingSets
from ._rng import isolated_rng
from ._user_warnings import rank_zero_warn
from .assess import (
    SchemeSpec,
    check_schemes,
    check_trainable_tensors,
    check_utility_metric,
    mode_dependent_modules,
    resolve_schemes,
    select_params,
)
from .config import EstimationConfig, ScoringConfig, stage_configs, unexpected_options
from .estimation.estimate import check_decay_names
from .estimation.per_sample import BatchFn, LossFn, check_forward
from .evaluation import OutputTransform
from .planning import PlanConfig, PlanResult, check_size_budget, lower_is_better, plan_direction
from .planning import plan as run_plan
from .quantization import check_float_model
from .quantization.registry import scheme_list
from .report import not_trained_warning, ties_line
from .streaming import default_schemes
from .tracking import (  # noqa: F401
    FIGURE_NAME,
    PLAN_NAMES,
    REPORT_NAME,
    free_version,
    history_summary,
    metric_keys,
    publish_failure,
    publish_report,
    report_metrics,
    taken_names,
    versioned,
)

__all__ = ["MISCallback", "lightning_callback"]  # LightningMISCallback: lazy, needs `lightning`

# a run's stage as the strict mode's error says it ("MISCallback: the assessment at the end of fit ...")
_WHEN = {"fit_end": "at the end of fit", "validation": "after a validation epoch"}


def _plan_config(plan: PlanConfig | Mapping[str, Any] | None, metrics: Mapping[str, Any],
                 scoring_config: ScoringConfig | None = None) -> PlanConfig | None:
    """``plan=`` as a checked :class:`PlanConfig`: candidate names resolved now (typos raise),
    its ``utility_metric`` one the callback measures (``"loss"`` or a key of ``metrics``, the
    callback's ``utility_metrics``) with a known direction.

    Raises:
        TypeError: ``plan`` is neither a PlanConfig nor a mapping; ValueError / KeyError: as
            :class:`PlanConfig` and ``resolve_schemes``, a ``utility_metric`` not measured or
            whose direction is unknown (:func:`~mis_lightning.planning.lower_is_better`).
    """
    if plan is None:
        return None
    if isinstance(plan, Mapping):
        plan = PlanConfig(**plan)
    if not isinstance(plan, PlanConfig):
        raise TypeError(f"MISCallback: plan must be a PlanConfig or a mapping of its fields, got {type(plan).__name__}")
    resolve_schemes(plan.candidates)
    if plan.utility_metric != "loss" and plan.utility_metric not in metrics:
        raise ValueError(f"MISCallback: PlanConfig.utility_metric {plan.utility_metric!r} is not measured: the "
                         f"callback measures {sorted(['loss', *metrics])}; add it to utility_metrics= or use 'loss'")
    lower_is_better(plan.utility_metric, metrics, plan_direction(plan, scoring_config))
    return plan


def lt_write_plan_failure(out: Path, exc: BaseException, version: str = "") -> Path:
    """``<out>/mis_plan.json`` holding the planner's error (``error``, ``traceback``), and the error
    in ``mis_plan.md`` (names with ``version``: :func:`~mis_lightning.tracking.free_version`)."""
    import json
    import traceback

    out.mkdir(parents=True, exist_ok=True)
    (out / versioned("mis_plan.png", version)).unlink(missing_ok=True)  # an earlier fit's frontier is not this one's
    # an earlier fit's table is not this one's: the error instead (it names the budget no plan meets)
    (out / versioned("mis_plan.md", version)).write_text(f"planning failed: {type(exc).__name__}: {exc}\n")
    path = out / versioned("mis_plan.json", version)
    path.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}",
                                "traceback": "".join(traceback.format_exception(exc))}, indent=2))
    return path


def lt_write_plan(out: Path, result: PlanResult, version: str = "") -> Path:
    """``<out>/mis_plan.json`` (:meth:`PlanResult.to_dict`), ``mis_plan.md`` (:meth:`PlanResult.table`:
    the rows' roles, a plan over its budget marked and warned under it, as the app's ``plan.md``) and
    ``mis_plan.png`` (the frontier); names with ``version`` (:func:`~mis_lightning.tracking.free_version`)."""
    import json

    import matplotlib.pyplot as plt

    from .report import to_plain

    out.mkdir(parents=True, exist_ok=True)
    (out / versioned("mis_plan.png", version)).unlink(missing_ok=True)  # an earlier fit's frontier is not this one's
    path = out / versioned("mis_plan.json", version)
    path.write_text(json.dumps(to_plain(result.to_dict()), indent=2))
    (out / versioned("mis_plan.md", version)).write_text(result.table() + "\n")  # pl44: not only JSON
    plt.close(result.figure(str(out / versioned("mis_plan.png", version))))
    return path


def files_overwritten(out: Path, plan: bool, copies: bool) -> tuple[list[str], list[str]]:
    """The files in ``out`` that a fit writing there under fixed names (an explicit ``dirpath``)
    overwrites: ``(fixed, copies)``, the existing ones of ``mis_report.json``, the figure and, with
    ``plan``, :data:`PLAN_NAMES` (each rewritten by the fit), and, with ``copies`` (mid-training
    runs), the existing ``mis_report_epoch=<E>-step=<S>.json`` copies, of which the fit rewrites those
    whose epoch and step it assesses at. The callback writes no other name in ``out``."""
    names = (REPORT_NAME, FIGURE_NAME) + (PLAN_NAMES if plan else ())
    found = [n for n in names if (out / n).is_file()]
    # the unversioned mid-training copies (taken_names' pattern), in epoch and step order
    earlier = sorted(taken_names(out, names=()), key=lambda n: [int(v) for v in re.findall(r"\d+", n)]) \
        if copies else []
    return found, earlier


def overwrite_warning(dirpath: str, fixed: Sequence[str], copies: Sequence[str]) -> str:
    """The warning of a fit whose explicit ``dirpath`` holds files under the names it writes
    (:func:`files_overwritten`), naming every one."""
    shown = ", ".join(copies[:3]) + (f" and {len(copies) - 3} more" if len(copies) > 3 else "")
    held = ", ".join(fixed) + (" and " if fixed and copies else "") + (
        f"the mid-training cop{'y' if len(copies) == 1 else 'ies'} {shown} (each rewritten where this fit "
        "assesses at the same epoch and step, the others left beside this fit's)" if copies else "")
    return (f"MISCallback: dirpath={dirpath!r} holds {held} under the names this fit writes: this fit overwrites "
            "them (an explicit dirpath keeps the file names fixed; the folder's other files are left as they are; "
            "leave dirpath unset, or pass a fresh one, to keep both)")


class _MISCallbackImpl(lt.RunHistory, lt.PicklingChecked):
    """The callback's logic, bound to a Lightning ``Callback`` base class by the subclasses.

    Args:
        schemes: registry names or scheme objects (default: ``default_schemes()``).
        estimation_config, scoring_config: the stages' options; here ``strict=False`` (failures
            are reported, training's results kept) and ``weight_decay=None`` (the module's).
        loss_fn: ``(outputs, targets) -> [B]``; default ``pl_module.per_sample_loss``
            (``mis_per_sample_loss(batch)`` on the module takes precedence over both).
        batch_fn: ``batch -> (inputs, targets)`` for other layouts (default: pairs).
        utility_metrics, output_transform: torchmetrics for the quantized copies and
            ``(outputs, targets) -> (preds, target)`` before them (the mean loss is always reported).
        every_n_val_epochs: also run after every n-th validation epoch (``None``: end of fit).
        dirpath: report and figure folder (default: the checkpoint dir, else the log dir; there an
            earlier run's report is kept and this fit's names get ``-v1``, ...; an explicit
            ``dirpath`` keeps the names fixed and overwrites the files there under those names, with
            a warning naming each: :func:`files_overwritten`).
        estimation_batch_size: batch size of the estimation pass (default: the train loader's).
        log_figure: send the figure to loggers that take images; prefix: logged key prefix.
        plan: a :class:`~mis_lightning.planning.PlanConfig` (or its fields as a mapping): at the
            end of fit, after the assessment, plan the per-layer quantization with the same
            estimate (:func:`mis_lightning.plan`; rank 0, needs a validation loader) and write
            ``mis_plan.json`` and ``mis_plan.png`` next to the report (``self.plan_result``).
        options: fields of either config by name (``estimation="exact"``, ``num_records=64``).

    Raises:
        ValueError: an invalid option (named), no scheme, ``every_n_val_epochs`` or
            ``estimation_batch_size`` not an int >= 1, ``dirpath`` an existing file.
        KeyError: an unknown scheme name (with the close registered names).
        TypeError: an unknown keyword argument, a ``loss_fn``, ``batch_fn`` or ``output_transform``
            that is not callable, a
            ``utility_metrics`` value that is not a torchmetrics Metric, a ``prefix`` not a string.
    """

    def __init__(self, schemes: SchemeSpec | Sequence[SchemeSpec] | None = None, *,
                 estimation_config: EstimationConfig | None = None,
                 scoring_config: ScoringConfig | None = None, loss_fn: LossFn | None = None,
                 batch_fn: BatchFn | None = None, utility_metrics: Mapping[str, Any] | None = None,
                 output_transform: OutputTransform | None = None, every_n_val_epochs: int | None = None,
                 dirpath: str | Path | None = None, estimation_batch_size: int | None = None,
                 log_figure: bool = True, prefix: str = "mis", plan: PlanConfig | Mapping[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__()
        self.schemes = scheme_list(default_schemes() if schemes is None else schemes)  # [] raises
        self.estimation_config, self.scoring_config, rest = stage_configs(
            "MISCallback", estimation_config, scoring_config, options,
            defaults={"strict": False, "weight_decay": None})
        if rest:
            raise unexpected_options("MISCallback", rest, known=inspect.signature(type(self).__init__).parameters)
        lt.check_callback_args(every_n_val_epochs, loss_fn, estimation_batch_size=estimation_batch_size,
                               utility_metrics=utility_metrics, dirpath=dirpath, prefix=prefix,
                               batch_fn=batch_fn, output_transform=output_transform)
        resolve_schemes(self.schemes)  # typos raise now; an unavailable scheme is an error row later
        self.loss_fn, self.batch_fn, self.output_transform = loss_fn, batch_fn, output_transform
        self.utility_metrics, self.every_n_val_epochs = dict(utility_metrics or {}), every_n_val_epochs
        self.dirpath, self.estimation_batch_size = dirpath, estimation_batch_size
        self.log_figure, self.prefix, self._state_loaded = log_figure, prefix, False
        # the utility metric the verdict ranks by (utility_key=): measured, its direction known
        check_utility_metric(self.scoring_config, self.utility_metrics, where="utility_key",
                             metrics_option="utility_metrics")
        self.plan_config = _plan_config(plan, self.utility_metrics, self.scoring_config)
        self.plan_error: str | None = None
        self.plan_result: PlanResult | None = None
        self.plan_path: Path | None = None
        self._kept: dict[str, Any] = {}  # the assessment's estimate, loader, utility (for the plan)
        self._sets = TrainingSets()  # the datasets each epoch's train loader held (reloads)
        self._reset_run_state()

    def _user_objects(self) -> dict[str, Any]:
        p = self.estimation_config.params  # what a spawning strategy must pickle
        return {"loss_fn": self.loss_fn, "batch_fn": self.batch_fn, "output_transform": self.output_transform,
                "params": p if callable(p) else None, **{f"utility_metrics[{k!r}]": m for k, m in self.utility_metrics.items()}}

    @classmethod
    def for_lightning(cls, *args: Any, **kwargs: Any) -> Any:
        """The same callback for ``lightning.pytorch.Trainer`` (see :func:`lightning_callback`)."""
        return lightning_callback(*args, **kwargs)

    # -- when ---------------------------------------------------------------------------------
    @names_callback
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        lt.check_trainer_package(type(self)._lightning_package, trainer)
        self._stage = stage  # a checkpoint restored for validate/test/predict does not rewind the runs
        if stage != "fit":
            return
        self._version: str | None = None  # this fit's file names, chosen at its first write (_out_version)
        self._overwrites = False  # this fit overwrites an earlier run's report in an explicit dirpath
        # read on every process (trainer.log_dir broadcasts: rank 0 alone would hang a DDP fit; rv55z), said by
        # rank 0 once, before training: the folder is nobody's explicit choice
        if where := lt.root_dir_note(trainer, self.dirpath):
            rank_zero_info(where)
        # A module that builds its layers in ``configure_model`` (Lightning's pattern for large
        # models; Lightning calls it after this hook) has no parameter yet: its checks wait for
        # on_train_start, still before the first step (nu43: refused here, "no parameter selected")
        self._model_checks_due = next(iter(pl_module.parameters()), None) is None
        self._scheme_problems = []
        if not self._model_checks_due:
            self._check_model(pl_module)
        if self.plan_config is not None:
            if lt.has_validation_source(trainer) is False:
                raise ValueError("MISCallback(plan=...) needs validation data (a val_dataloaders= loader, a "
                                 "val_dataloader hook, and limit_val_batches > 0): the planner measures each "
                                 "candidate's utility cost per layer on it")
        if self.every_n_val_epochs is not None and lt.runs_validation(trainer, pl_module) is False:
            # on_validation_epoch_end never comes: said now, not found missing after training
            rank_zero_warn(f"MISCallback: every_n_val_epochs={self.every_n_val_epochs} runs after validation epochs, but "
                           f"this fit has none (no validation data, limit_val_batches=0, or no validation_step on "
                           f"{type(pl_module).__name__}: Lightning then skips its validation loop): the callback "
                           "runs at the end of fit only")
        if self.scoring_config.utility_key is not None and lt.has_validation_source(trainer) is False:
            check_utility_metric(self.scoring_config, self.utility_metrics, validation=False)  # raises
        # an EarlyStopping / ModelCheckpoint on a mis/ key it cannot read when it looks
        keys = metric_keys([s.name for s in resolve_schemes(self.schemes)], self.utility_metrics, self.prefix,
                           interval=self.scoring_config.uncertainty_draws > 0)
        lt.check_monitors(trainer, keys, self.prefix, self.every_n_val_epochs)
        if not self._state_loaded:  # a new fit starts clean (a checkpoint's state comes later)
            self._reset_run_state()
        self._state_loaded, self._resolved, self._decay, self._batch_unchecked = False, None, None, False
        self._untrained_note: str | None = None
        self._decoupled_note: str | None = None
        self._decay_note: str | None = None  # optimizer decay the assessed objective lacks
        self._decay_info: str | None = None  # the optimizer's coupled decay, taken as the objective's
        self._full_pass, self._pass_read, self._most_read, self._resumed = False, 0, 0, False
        self._train_losses = TrainingLosses()  # training_step's loss on the last batches (nux52 #2)
        if not self._loss(trainer, pl_module)["hook"]:
            check_forward(pl_module, "MISCallback: ")  # no forward: said now, with the cures (nux52 #6)

    def _check_model(self, pl_module: Any) -> None:
        """The checks on the module's parameters, before training: a quantized model, a misspelled
        ``params=`` or ``weight_decay={name: ...}`` name, trainable inference tensors, a size budget
        no plan can meet, schemes that cannot run on it (warned; every scheme such: ``SchemeError``)."""
        check_float_model(pl_module)  # a torchao-quantized model: refuse before training
        check_trainable_tensors(pl_module)  # trainable inference tensors: torch cannot train them (inf50)
        select_params(pl_module, self.estimation_config.params)  # a misspelled params= name, too
        if isinstance(self.estimation_config.weight_decay, Mapping):  # and a weight_decay={name: ...} one
            check_decay_names(self.estimation_config.weight_decay, pl_module)
        if self.plan_config is not None:  # a size budget no plan can meet: before training
            check_size_budget(pl_module, self.plan_config, self.estimation_config.params)
        # a scheme that cannot run here or on this model is an error row at the end (the
        # others are still scored): say so now, before the training it would follow
        # (every scheme such: refused now, SchemeError)
        self._scheme_problems = check_schemes(pl_module, resolve_schemes(self.schemes), strict=False,
                                              availability=True,
                                              params=select_params(pl_module, self.estimation_config.params))
        for msg in self._scheme_problems:
            rank_zero_warn(f"MISCallback: {msg}")

    @names_callback
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # the train loader exists now, before the first step: configuration errors surface here
        self._state_loaded = False
        if getattr(self, "_model_checks_due", False):  # layers built in configure_model
            self._model_checks_due = False
            self._check_model(pl_module)
        # Batches read per pass, counted here: the Trainer's counter counts the first batches
        # twice after a resume within a pass (a loader without state_dict starts its pass
        # again). A checkpoint taken after an epoch's end: a pass has ended. ("ready": a
        # checkpoint written in on_train_batch_end has that batch read, not completed.)
        # the layers whose mode changes the function: which ran in eval mode is read per batch (ux54c)
        self._mode_modules, self._eval_in_training = mode_dependent_modules(pl_module), None
        self._train_in_validation: list[str] | None = None  # those the validation ran in train mode (MC dropout)
        progress = trainer.fit_loop.epoch_loop.batch_progress
        self._full_pass = int(trainer.fit_loop.epoch_progress.current.completed) >= 1
        self._most_read = 0 if self._full_pass else int(progress.total.ready)
        stateful = hasattr(lt.single_loader(trainer.train_dataloader, "training"), "state_dict")
        self._pass_read = self._most_read if stateful else 0
        self._resumed = stateful and self._most_read > 0  # the first epoch start continues its pass
        # the precision plugin has converted the module now ("64-true", "bf16-true"): a scheme
        # that cannot take the new dtype is said before the first step, not at the end
        for msg in check_schemes(pl_module, resolve_schemes(self.schemes), strict=False, availability=True,
                                 params=select_params(pl_module, self.estimation_config.params)):
            if msg not in getattr(self, "_scheme_problems", ()):
                rank_zero_warn(f"MISCallback: {msg}")
        names = select_params(pl_module, self.estimation_config.params)
        trained, note = self._optimized(trainer, pl_module, names)
        if note:
            rank_zero_warn(f"MISCallback: {note}")
        names = trained or names
        # fewer records than the assessment takes: refused now, not after the training it would follow
        lt.check_training_size(trainer, sum(p.numel() for k, p in pl_module.named_parameters() if k in set(names)))
        self._decay, self._decay_note, self._decay_info = lt.check_optimizer_decay(
            trainer, pl_module, self.estimation_config.weight_decay, names)
        self._decoupled_note = lt.decoupled_decay_note(trainer, pl_module, names)
        res = self._loss(trainer, pl_module)
        # an iterable dataset is not read here (that could consume its stream): its first
        # training batch is checked as it arrives, before the first optimizer step
        # a loss without curvature (L1 on a linear model) is refused now, not after training;
        # an L2 term (weight decay) gives the objective curvature the loss's sums do not hold
        self._curvature_check = not lt.decay_possible(trainer, pl_module, self.estimation_config.weight_decay)
        self._batch_unchecked = not lt.check_first_batch(trainer, pl_module, res["hook"], res["loss_fn"],
                                                         self.batch_fn, self.loss_fn is not None,
                                                         estimation_config=self._dry_config(names),
                                                         curvature=self._curvature_check)
        # the validation batches the quantized copies' utility will be measured on: their
        # layout, the loss and the utility metrics on them, before training too
        lt.check_validation_batch(trainer, pl_module, res["hook"], res["loss_fn"], self.batch_fn,
                                  self.utility_metrics, self.output_transform, resolve_schemes(self.schemes))
        # random augmentation in the dataset or its collate_fn: said now, and in the report (a few
        # records read and collated twice, every random state restored)
        train = lt.single_loader(trainer.train_dataloader, "training")
        ds = lt.sized_dataset(train)
        if ds is not None and (aug := random_records_note(ds, range(len(ds)),
                                                          collate_fn=getattr(train, "collate_fn", None))):
            rank_zero_warn(f"MISCallback: {aug}")
        self._sets = TrainingSets()  # this fit's loaders only
        # a stream: the batches each pass reads, to tell one that yields other records each pass
        # (limit_train_batches then trains on other records than a later pass's, or the copy's, first
        # batches: nu57, nu58), leaf by leaf (a hook that augments the inputs leaves the targets): under an
        # integer limit_train_batches every batch of a pass (its passes may begin alike and differ later: dd59),
        # else the first (a stop within the first pass assesses the batches read)
        limit = getattr(trainer, "num_training_batches", math.inf)
        self._stream_passes = lt.StreamPasses(limit if lt.cuts_stream(train, limit) else 1) \
            if train is not None and lt.map_items(train) is None else None

    @names_callback
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._resumed:  # a resumable loader goes on with the pass it was in
            self._resumed = False
        else:
            self._pass_read = 0
        # the loader of this epoch (Lightning has reloaded it by now, if it does)
        if (sets := getattr(self, "_sets", None)) is not None:
            sets.see(trainer, lt.single_loader(trainer.train_dataloader, "training"))

    @names_callback
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._pass_read += 1
        self._most_read = max(self._most_read, self._pass_read)
        if (losses := getattr(self, "_train_losses", None)) is not None:
            losses.see(trainer, outputs, batch)  # a reference and a detached scalar: no sync, no copy
        # a pass over the training data ended (a stream's length is known only then): the
        # records trained on are all of them. After a resume within a pass, Lightning ends the
        # epoch at its remaining count while a restarted loader is not at its end: only a pass
        # read from its start to the Trainer's count (or a stream read to its end) is whole.
        if not self._full_pass and bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False)) \
                and (self._pass_read >= (total := getattr(trainer, "num_training_batches", math.inf))
                     or not math.isfinite(total)):
            self._full_pass = True

    @names_callback
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if (losses := getattr(self, "_train_losses", None)) is not None:
            losses.start(batch)  # its version counters (a training_step writing into its batch: ux53)
        # dropout / running statistics the user runs in eval mode (e.g. a polish in eval mode, as
        # the not-at-a-minimum warning advises) are no cause of an objective mismatch (ux54c)
        self._eval_in_training = [n for n, m in getattr(self, "_mode_modules", ()) if not m.training]
        if (passes := getattr(self, "_stream_passes", None)) is not None:
            passes.see(self._pass_read, batch)
        if self._batch_unchecked:
            self._batch_unchecked = False
            res = self._loss(trainer, pl_module)
            names = select_params(pl_module, self.estimation_config.params)
            lt.check_first_batch(trainer, pl_module, res["hook"], res["loss_fn"], self.batch_fn,
                                 self.loss_fn is not None, batch=batch,
                                 estimation_config=self._dry_config(self._optimized(trainer, pl_module, names)[0]
                                                                    or names),
                                 curvature=getattr(self, "_curvature_check", False))

    @names_callback
    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        # the layers this validation ran in train mode (Monte Carlo dropout kept on by on_validation_model_eval
        # or the step): the report says the utility is the eval-mode model's, not the validation's (nu58)
        if batch_idx == 0 and dataloader_idx == 0 and getattr(self, "_mode_modules", None) is not None:
            self._train_in_validation = [n for n, m in self._mode_modules if m.training and m is not pl_module]

    @names_callback
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_val_epochs is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs == 0:
            self._run(trainer, pl_module, stage="validation")

    @names_callback
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # a state restored from a checkpoint belongs to that run: the next fit (a finished
        # checkpoint resumed skips on_train_start) starts clean
        self._stage, self._state_loaded = None, False
        if (losses := getattr(self, "_train_losses", None)) is not None:
            losses.clear()  # the batches are not held past the fit

    @names_callback
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # (the planner needs the estimate, which a validation run does not keep: it runs again)
        if self.plan_config is None and self._last_step is not None and self._last_step == trainer.global_step \
                and self.report is not None and self._last_weights is not None \
                and self._last_weights == lt.weights_fingerprint(pl_module):
            return  # already assessed these weights at the last validation epoch
        # (same step, other weights: StochasticWeightAveraging, EMA or ModelPruning changed them
        # in on_train_end; the report must be about the model the user ships)
        self._run(trainer, pl_module, stage="fit_end")

    # -- run and publish ----------------------------------------------------------------------
    def _dry_config(self, names: list[str]) -> EstimationConfig:
        """The estimation options the assessment will use, on ``names``: what the first-batch
        check runs through the estimation pass before training."""
        return dataclasses.replace(self.estimation_config, params=list(names))

    def _loss(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        self._resolved = self._resolved or lt.resolve_loss(trainer, pl_module, self.loss_fn)
        return self._resolved

    def _optimized(self, trainer: Any, pl_module: Any, names: list[str]) -> tuple[list[str] | None, str | None]:
        """``(assessed names, note)`` with the parameters no optimizer holds left out (they require
        grad, but training does not update them: a body left out of ``configure_optimizers``;
        assessed, they would be scored as trained on the records, too high a figure), or
        ``(None, note or None)`` to keep the selection. Read at each run: an unfreezing callback
        (``BackboneFinetuning``) adds its parameters to the optimizer during training."""
        untrained = lt.untrained_params(trainer, pl_module, names)
        if not untrained or len(untrained) == len(names):  # none held: a strategy's own (flattened) copies
            return None, None
        shown = f"{', '.join(untrained[:6])}{', ...' if len(untrained) > 6 else ''}"
        if self.estimation_config.params is None:
            return [n for n in names if n not in untrained], (
                f"{len(untrained)} parameter(s) require grad but no optimizer holds them ({shown}): training does "
                "not update them, so they are not assessed (as with requires_grad=False); pass params= to choose "
                "the assessed parameters yourself")
        return None, (f"assessed parameter(s) {shown} are in no optimizer's param groups: training does not "
                      "update them, yet they are scored as trained on the records")

    def _assess(self, trainer: Any, pl_module: Any) -> Any:
        # the optimizer groups' per-parameter decay where they refine the module's coefficient
        names = select_params(pl_module, self.estimation_config.params)
        trained, self._untrained_note = self._optimized(trainer, pl_module, names)
        decay = getattr(self, "_decay", None)
        if decay is not None and getattr(self, "_decay_info", None):  # read from the optimizer: still its value?
            changed = lt.recheck_coupled_decay(trainer, pl_module, names, next(iter(decay.values())))
            if changed:
                self._decay, self._decay_info, self._decay_note, decay = None, None, changed, None
        if decay is not None:
            # parameters an unfreezing callback added to the optimizer since on_train_start: their
            # groups' decay, as the mapping was built
            late = [n for n in (trained or names) if n not in decay]
            decay = {**decay, **lt.optimizer_decays(trainer, pl_module, late)} if late else decay
        est_cfg = self.estimation_config if decay is None else \
            dataclasses.replace(self.estimation_config, weight_decay=decay)
        if trained:  # parameters no optimizer holds are left out
            est_cfg = dataclasses.replace(est_cfg, params=trained)
        return lt.assess_on_trainer(
            trainer, pl_module, self.schemes, est_cfg, self.scoring_config,
            self._loss(trainer, pl_module), batch_fn=self.batch_fn, batch_size=self.estimation_batch_size,
            metrics=self.utility_metrics, output_transform=self.output_transform, keep=self._kept,
            full_pass=getattr(self, "_full_pass", False), read=getattr(self, "_most_read", None) or None,
            eval_in_training=getattr(self, "_eval_in_training", None),
            train_in_validation=getattr(self, "_train_in_validation", None),
            stream_passes=getattr(self, "_stream_passes", None))

    def _plan(self, trainer: Any, pl_module: Any) -> PlanResult:
        """The planner on the assessment's estimate, loader and utility (rank 0)."""
        kept = self._kept
        if kept.get("utility_fn") is None:
            raise ValueError("MISCallback(plan=...) needs a validation dataloader: the planner measures "
                             "each candidate's utility cost per layer")
        res = self._loss(trainer, pl_module)
        assert self.plan_config is not None
        return run_plan(pl_module, None, kept["loader"], res["loss_fn"], estimate=kept["estimate"],
                        utility_fn=kept["utility_fn"], metrics=self.utility_metrics, config=self.plan_config,
                        scoring_config=self.scoring_config, batch_fn=self.batch_fn)

    def _out_version(self, out: Path, trainer: Any) -> str:
        """This fit's suffix of the file names in ``out`` (:func:`~mis_lightning.tracking.free_version`),
        chosen at the fit's first write: its later runs (mid-training, fit end) rewrite its own
        files, never an earlier run's (``logger=False`` writes to ``default_root_dir``, the
        working directory by default, where a second run overwrote the first's report silently).

        An explicit ``dirpath=`` is the user's choice of where ``mis_report.json`` is read: its
        names stay fixed and files there under those names are overwritten, with a warning naming
        each (:func:`files_overwritten`; formerly ``-v1`` names left code reading
        ``<dirpath>/mis_report.json`` on the earlier run's report, and the warning named the report
        alone). ``fast_dev_run`` writes nothing: no warning."""
        if getattr(self, "_version", None) is None:
            self._version = "" if self.dirpath is not None else free_version(out)
            writes = self.dirpath is not None and not getattr(trainer, "fast_dev_run", False)
            self._kept_names = taken_names(out) if self._version else []  # files kept apart by the -v<k> names
            self._overwrites = writes and (out / REPORT_NAME).exists()
            fixed, copies = files_overwritten(out, self.plan_config is not None, self.every_n_val_epochs is not None
                                              ) if writes else ([], [])
            if fixed or copies:
                rank_zero_warn(overwrite_warning(str(self.dirpath), fixed, copies))
        return self._version or ""

    def _run(self, trainer: Any, pl_module: Any, stage: str) -> None:
        t0, zero = time.perf_counter(), trainer.is_global_zero
        # each module's own flag (a BatchNorm the user keeps in eval mode while training stays so)
        flags = [(m, m.training) for m in pl_module.modules()]
        epoch, step = int(trainer.current_epoch), int(trainer.global_step)
        if stage == "fit_end" and epoch > 0:
            # at fit end Lightning's current_epoch counts the epochs run; the last one trained
            # (0-based, as mid-training runs and ModelCheckpoint's names count) is the one before
            epoch -= 1
        where = {"lightning": {"stage": stage, "epoch": epoch, "global_step": step}}
        out = lt.report_dir(trainer, self.dirpath)
        version = self._out_version(out, trainer) if zero else ""
        self._last_weights = lt.weights_fingerprint(pl_module) if stage != "fit_end" else None
        try:
            # the trainer's loaders' own generators too: the assessment reads them
            with isolated_rng(*lt.trainer_loaders(trainer)), torch.inference_mode(False), torch.enable_grad():
                pl_module.eval()
                self._kept = {}
                report = self._assess(trainer, pl_module)
                losses = getattr(self, "_train_losses", None)
                sets = getattr(self, "_sets", None)
                # each process's observations of its own batches and state, the world's (every process's report
                # says and marks what any one saw: dd59)
                seen = lt.world_union(trainer, {
                    "loss_mismatch": lambda: loss_mismatch_note(
                        pl_module, losses, self._loss(trainer, pl_module), self.batch_fn, self.loss_fn is not None,
                        float(report.diagnostics.get("weight_decay", 0.0) or 0.0)) if losses is not None else None,
                    "not_trained": lambda: not_trained_note(trainer),
                    "best_checkpoint": lambda: lt.best_checkpoint_note(trainer) if stage == "fit_end" else None,
                    "training_sets": lambda: sets.note(trainer, report.n) if sets else None})
                if seen["loss_mismatch"]:
                    report.warnings.insert(0, seen["loss_mismatch"])  # first: it outweighs every other caveat
                    report.diagnostics["loss_mismatch"] = True  # every figure "*", the verdict says so
                if seen["not_trained"]:
                    report.warnings.insert(0, seen["not_trained"])  # first: no other caveat matters where nothing was trained
                    report.diagnostics["not_trained"] = True  # every figure "*", no verdict (undetermined_headline)
                report.warnings.extend(seen[k] for k in ("best_checkpoint", "training_sets") if seen[k])
                if self._untrained_note:
                    if self.estimation_config.params is None:
                        # the parameters left out are the ones no optimizer holds, not trained ones
                        # held fixed: the generic params= note would say the opposite
                        report.warnings[:] = [w for w in report.warnings if not w.startswith("params= leaves out")]
                    report.warnings.append(self._untrained_note)
                if getattr(self, "_decoupled_note", None):
                    report.warnings.append(self._decoupled_note)
                if getattr(self, "_decay_note", None):  # said before training: the report keeps it
                    report.warnings.append(self._decay_note)
                if getattr(self, "_decay_info", None):  # the optimizer's coupled decay, used (nux51)
                    report.notes.append(self._decay_info)
                plan_exc = None
                if self.plan_config is not None and stage == "fit_end" and zero:
                    # a planning failure (a budget no plan meets) keeps the assessment's report
                    self.plan_result, self.plan_error = None, None
                    try:
                        self.plan_result = self._plan(trainer, pl_module)
                    except Exception as exc:
                        if self.scoring_config.strict:
                            raise callback_error(exc, "planning at the end of fit failed: ") from exc
                        plan_exc, self.plan_error = exc, f"{type(exc).__name__}: {exc}"
            self.report, self.last_error = report, None
            self.history.append({"stage": stage, "epoch": epoch, "step": step, "summary": history_summary(report)})
            # the figures as callback metrics (every rank: ModelCheckpoint/EarlyStopping read them
            # in on_validation_end, after this hook); they keep the last assessment's values
            # between assessments (every_n_val_epochs)
            for key, value in report_metrics(report, self.prefix).items():
                trainer.callback_metrics[key] = torch.tensor(value)
            if zero and getattr(trainer, "fast_dev_run", False):
                # Lightning's smoke test writes no checkpoint and no log: the assessment ran (it
                # is part of what the smoke test checks) but nothing is written
                rank_zero_info(f"MISCallback: fast_dev_run: assessed {len(report.schemes)} scheme(s) on "
                               f"n={report.n} records in {time.perf_counter() - t0:.1f} s; no report written")
            elif zero:
                # failed schemes, float layers, d_eff/n, not at a minimum, ...: one line each, the
                # full text in the report (nux51 #9: 7 warnings printed 4,870 characters)
                # the warnings the table's * stands for: one line naming each (nux55: six warnings of a CNN)
                lines = report.console_warnings()
                for w in lines:
                    if w != lt.NO_VALIDATION_WARNING:  # said before training, with its fix; the verdict says it too
                        rank_zero_warn(f"MISCallback: {w}")
                for w in report.notes:  # information (layers quantized by another method): logged, not warned
                    if w != getattr(self, "_decay_info", None):  # said at the start of fit (nux52 #7)
                        rank_zero_info(f"MISCallback: {w}")
                # one copy per mid-training run (several per epoch with val_check_interval)
                copy = None if stage == "fit_end" else versioned(f"mis_report_epoch={epoch}-step={step}.json", version)
                self.report_path, self.figure_path = publish_report(
                    out, report, trainer.loggers, step=step, prefix=self.prefix, log_figure=self.log_figure,
                    extra=where, epoch=epoch, copy_name=copy, version=version)
                failed = sum(1 for r in report.schemes.values() if r.error)
                rank_zero_info(f"MISCallback: assessed {len(report.schemes) - failed} scheme(s)"
                               + (f" ({failed} failed: see the warnings)" if failed else "")
                               + f" on n={report.n} records in {time.perf_counter() - t0:.1f} s; "
                               # every file written, each named (nux56: the figure was not)
                               f"report: {self.report_path}, beside it {self.figure_path.name}"
                               + (f" and {copy}" if copy else "")
                               + (f" ({', '.join(self._kept_names)} already there, kept)" if version
                                  else " (an earlier run's, overwritten: dirpath= given)"
                                  if getattr(self, "_overwrites", False) else "")
                               + ("; the warnings above in full: print(callback.report.warnings_text())"
                                  if lines != report.warnings else ""))
                # the choice the table's verdict makes (nux57: a user of the two-line snippet read the
                # "not ranked" line below without the verdict it qualifies)
                rank_zero_info(f"MISCallback: {report.verdict_text()}")
                ties = ties_line(report.rows())  # the figures' order where the intervals do not resolve it
                if ties:
                    rank_zero_info(f"MISCallback: {ties}")
                if plan_exc is not None:
                    rank_zero_warn(f"MISCallback: planning failed ({self.plan_error}); the assessment's report is "
                                   "kept (strict=True raises instead)")
                    self.plan_path = lt_write_plan_failure(out, plan_exc, version)
                if self.plan_result is not None and stage == "fit_end":
                    for w in self.plan_result.warnings:  # a plan missing its budget, proxy off by > 2%
                        if w not in report.warnings:
                            rank_zero_warn(f"MISCallback: plan: {w}")
                    self.plan_path = lt_write_plan(out, self.plan_result, version)
                    pr = self.plan_result
                    line = (f"MISCallback: plan {pr.scheme.describe()['assignment']} (leakage {pr.leakage:.4g}"
                            + ("" if pr.within_budget else f", OUTSIDE the budget {pr.budget_text()} once "
                               "re-assessed: see the warnings")
                            # hd51's undet.: the leakage that chose it is set by the rank rule (cor52)
                            + (f"; not ranked: {pr.undetermined}" if pr.undetermined else "")
                            + f"); {self.plan_path}, table in {versioned('mis_plan.md', version)}")
                    (rank_zero_info if pr.within_budget and not pr.undetermined
                     else rank_zero_warn)(line)
        except Exception as exc:
            if self.scoring_config.strict:
                # named as the callback's, with the run that failed (the original chained)
                named = callback_error(exc, f"the assessment {_WHEN.get(stage, stage)} (epoch {epoch}, step {step}) "
                                            "failed: ")
                if named is exc:
                    raise
                raise named from exc
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.history.append({"stage": stage, "epoch": epoch, "step": step, "summary": None, "error": self.last_error})
            if zero:
                rank_zero_warn(f"MISCallback: the assessment failed ({self.last_error}); training's "
                               "results and checkpoints are kept (strict=True raises instead)")
                self.report_path = publish_failure(out, exc, trainer.loggers, step=step, prefix=self.prefix, extra=where,
                                                   epoch=epoch, version=version)
        finally:
            for m, t in reversed(flags):
                m.training = t
            self._last_step = step
            self._kept = {}  # the estimate is large: not kept past the run


def not_trained_note(trainer: Any) -> str | None:
    """The report's first warning where the fit assessed took no optimizer step
    (``trainer.global_step == 0``, with no training batch completed either: ``max_epochs=0``,
    ``limit_train_batches=0``, and no checkpoint with steps resumed), else ``None``: this fit
    never trained the weights on its records (an untrained model's true membership advantage is 0),
    while the estimator reads them as at a minimum of its loss (a fresh model read 0.70 and a "safest" scheme).
    Begins with :data:`~mis_lightning.report.NOT_TRAINED`, the verdict's reason for choosing none
    (:func:`~mis_lightning.report.not_trained_warning`)."""
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
    batches = int(progress.total.completed) if progress is not None else 0
    if int(trainer.global_step) != 0 or batches != 0:
        return None
    return not_trained_warning("trainer.global_step is 0 and no training batch ran in this fit")

class MISCallback(_MISCallbackImpl, pl.Callback):
    __doc__ = ("Membership-inference security of quantized releases, assessed during ``fit`` "
               "(``pytorch_lightning``; see docs/lightning.md and :func:`lightning_callback`).\n\n"
               + (_MISCallbackImpl.__doc__ or "").split("\n", 2)[-1])
    _lightning_package = "pytorch_lightning"


def lightning_callback(*args: Any, **kwargs: Any) -> Any:
    """``MISCallback`` bound to ``lightning.pytorch.Callback`` (same arguments).

    Raises:
        ImportError: the unified ``lightning`` package is not installed (says what to do).
    """
    return __getattr__("LightningMISCallback")(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "LightningMISCallback":
        globals()[name] = lt.bind_callback(_MISCallbackImpl, lightning_callback_base(), name, "lightning")
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
