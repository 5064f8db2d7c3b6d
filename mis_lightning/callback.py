"""``MISCallback``: assess membership-inference security of quantized releases during ``fit``.

Add it to a Trainer::

    trainer = pl.Trainer(callbacks=[MISCallback(["int8_weight_only", "int4_weight_only"])])

At the end of ``fit`` (``on_fit_end``: the model is unwrapped, the DDP process group is still
alive) and, with ``every_n_val_epochs=k``, after every k-th validation epoch, the callback

1. streams the training records through :class:`~mis_lightning.metric.MISIndicator` (each
   process its own **unpadded** shard of ``trainer.train_dataloader.dataset``: indices
   ``rank, rank + world, ...`` in order, the train loader's batch size and ``collate_fn``; the
   ``DistributedSampler``'s padding duplicates and its shuffling are not used, so
   ``n = len(dataset)`` exactly; the Metric's sync sums the statistics over processes);
2. quantizes a copy of the model with each scheme and evaluates the copy over
   ``trainer.val_dataloaders`` (its dataset, whole and unpadded, on rank 0) with the mean
   loss and ``utility_metrics`` -- never through ``trainer.validate``;
3. on rank 0: logs ``<prefix>/<scheme>/...`` (see :mod:`mis_lightning.tracking`) to every
   logger in ``trainer.loggers`` at ``trainer.global_step``, saves the privacy-utility figure
   ``<dirpath>/mis_privacy_utility.png`` (also sent to loggers that take figures:
   TensorBoard, MLflow) and the full report ``<dirpath>/mis_report.json`` (mid-training runs
   also ``mis_report_epoch=<E>.json``).

Safety: the work runs in eval mode on detached copies of the weights (``torch.func``), writes
no ``.grad``, leaves the optimizer alone and restores the training flag and the RNG streams
(Lightning's ``isolate_rng``), so training with and without the callback gives bit-identical
weights. A failure is reported (``rank_zero_warn``, the report JSON with an ``error`` entry,
``<prefix>/failed = 1``) and training's results and checkpoints are kept; ``strict=True``
raises instead.

Configuration errors raise before training: unknown scheme names at construction (with the
close registered names); no usable loss at ``setup``; losses that are not ``[B]`` and batches
that are not ``(inputs, targets)`` without ``batch_fn`` in ``on_train_start`` (one batch
through the model and the loss); a ``loss_fn``/``batch_fn`` that cannot be pickled when a
spawning strategy (``ddp_spawn``) pickles the callback. Each ``fit`` starts with a fresh state
(one callback may serve several Trainers) unless the state comes from a checkpoint.

Loss and batch layout: ``loss_fn(outputs, targets) -> [B]`` with ``(inputs, targets)``
batches (or ``batch_fn``), default ``pl_module.per_sample_loss``. A LightningModule may
instead define ``mis_per_sample_loss(self, batch) -> Tensor[B]`` (per-sample data losses of
a whole batch, any layout): it overrides both ``loss_fn`` and the batch layout. It is called
through ``torch.func.functional_call`` on a shallow copy of the module that shares its
parameters, so it must be a pure function of the parameters and the batch (no in-place
updates of module state, no ``self.log``). Lightning's batch-transfer hooks are not applied;
batches are moved to the model's device as they are.

Both Lightning distributions: :class:`MISCallback` subclasses ``pytorch_lightning.Callback``;
for ``lightning.pytorch.Trainer`` use :func:`lightning_callback` (or
``MISCallback.for_lightning``), which binds the same implementation to
``lightning.pytorch.Callback`` (the class ``mis_lightning.callback.LightningMISCallback``).
A callback given to the other distribution's Trainer fails at ``setup`` saying so.
"""

from __future__ import annotations

import copy
import json
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ._lightning_compat import lightning_callback_base, trainer_package
from .assess import SchemeSpec, resolve_schemes
from .estimation.per_sample import BatchFn, LossFn, default_batch_fn
from .metric import HOOK_NAME, MISIndicator, default_schemes
from .quantization import check_float_model
from .quantization.registry import scheme_list
from .report import Report
from .tracking import log_report
from .utility import OutputTransform, evaluate_utility

__all__ = ["MISCallback", "lightning_callback"]  # LightningMISCallback: lazy, needs `lightning`

REPORT_NAME = "mis_report.json"
FIGURE_NAME = "mis_privacy_utility.png"


def _rng_isolated() -> Any:
    """Lightning's ``isolate_rng`` (torch CPU, ``random``, ``numpy``, and CUDA only where CUDA is
    already initialised: reading its states would otherwise initialise it)."""
    return isolate_rng(include_cuda=torch.cuda.is_available() and torch.cuda.is_initialized())


def _unpicklable(obj: Any) -> str | None:
    """Why ``obj`` cannot be pickled (None if it can). A bound method is judged by its function,
    so that checking ``model.per_sample_loss`` does not pickle the model."""
    try:
        pickle.dumps(getattr(obj, "__func__", obj))
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


def _callable_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _single_loader(loaders: Any, what: str) -> Any:
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        if len(loaders) != 1:
            raise ValueError(f"MISCallback needs one {what} dataloader, got {len(loaders)}")
        loaders = loaders[0]
    return loaders


def _reloader(dl: Any, indices: list[int] | None, batch_size: int | None) -> Any:
    """An unpadded, unshuffled, single-process loader over ``dl``'s dataset (or ``dl`` itself
    for iterable datasets / objects that are not DataLoaders)."""
    ds = getattr(dl, "dataset", None)
    if not isinstance(dl, DataLoader) or ds is None or isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        return dl
    idx = list(range(len(ds))) if indices is None else indices
    bs = batch_size or dl.batch_size or 64
    return DataLoader(ds, batch_size=bs, sampler=idx, collate_fn=dl.collate_fn, num_workers=0)


def _safe_len(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


class _NoBar:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(trainer: Any, total: int | None, desc: str) -> Any:
    """A bar in the style of the Trainer's own progress bar callback (TQDM or Rich), on rank 0
    only, and only if the Trainer shows one (``enable_progress_bar``)."""
    pb = getattr(trainer, "progress_bar_callback", None)
    if pb is None or not trainer.is_global_zero or getattr(pb, "is_disabled", False):
        return _NoBar()
    if "Rich" in type(pb).__name__:
        from rich.console import Console
        from rich.progress import Progress

        console = Console(file=sys.stderr)
        prog = Progress(console=console, transient=console.is_terminal)
        prog.start()
        task = prog.add_task(desc, total=total)

        class _RichBar:
            def update(self, k: int = 1) -> None:
                prog.advance(task, k)

            def close(self) -> None:
                prog.stop()

        return _RichBar()
    try:  # Lightning's own tqdm subclass (number formatting of its bars)
        from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm as _Tqdm
    except ImportError:  # pragma: no cover
        from tqdm import tqdm as _Tqdm
    return _Tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _to_device(tree: Any, device: torch.device) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)


class _MISCallbackImpl:
    """The callback's logic, bound to a Lightning ``Callback`` base class by the subclasses.

    Args:
        schemes: registry names or scheme objects (default
            :func:`~mis_lightning.metric.default_schemes`: int8/int4/int2 weight-only).
        params: names of the parameters to assess, or ``predicate(name, param)``; default all
            trainable ones.
        estimation: ``"auto"``, ``"exact"`` or ``"diagonal"``; hessian: diagonal mode's Hessian.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses; default
            ``pl_module.per_sample_loss`` (``mis_per_sample_loss(batch)`` on the module takes
            precedence over both).
        batch_fn: ``batch -> (inputs, targets)`` for other layouts (default: pairs).
        num_records: records over which the leakage is averaged.
        weight_decay: L2 coefficient of the objective; default ``pl_module.weight_decay`` if
            present, else 0.
        utility_metrics: ``{name: torchmetrics.Metric}`` for the quantized copies (the mean
            loss is always reported).
        output_transform: ``(outputs, targets) -> (preds, target)`` before the metrics.
        every_n_val_epochs: also run after every n-th validation epoch (``None``: only at the
            end of ``fit``).
        strict: raise on failures instead of warning.
        dirpath: where the report JSON and figure go (default: the checkpoint callback's
            ``dirpath``, else ``trainer.log_dir``, else ``trainer.default_root_dir``).
        method, uncertainty_draws, seed: as in :func:`mis_lightning.assess`.
        estimation_batch_size: batch size of the estimation pass (default: the train loader's).
        log_figure: send the figure to loggers that take images.
        prefix: logged key prefix.
    """

    def __init__(
        self,
        schemes: SchemeSpec | Sequence[SchemeSpec] | None = None,
        *,
        params: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        estimation: str = "auto",
        hessian: str = "auto",
        loss_fn: LossFn | None = None,
        batch_fn: BatchFn | None = None,
        num_records: int = 512,
        weight_decay: float | None = None,
        utility_metrics: Mapping[str, Any] | None = None,
        output_transform: OutputTransform | None = None,
        every_n_val_epochs: int | None = None,
        strict: bool = False,
        dirpath: str | Path | None = None,
        method: str = "auto",
        uncertainty_draws: int = 16,
        seed: int = 0,
        estimation_batch_size: int | None = None,
        log_figure: bool = True,
        prefix: str = "mis",
    ) -> None:
        super().__init__()
        if schemes is None:
            schemes = default_schemes()
        schemes = scheme_list(schemes)  # raises on an empty list
        if estimation not in ("auto", "exact", "diagonal"):
            raise ValueError(f"estimation must be 'auto', 'exact' or 'diagonal', got {estimation!r}")
        if hessian not in ("auto", "exact", "ggn", "hutchinson"):
            raise ValueError(f"hessian must be 'auto', 'exact', 'ggn' or 'hutchinson', got {hessian!r}")
        if every_n_val_epochs is not None and (isinstance(every_n_val_epochs, bool) or int(every_n_val_epochs) != every_n_val_epochs or every_n_val_epochs < 1):
            raise ValueError(f"every_n_val_epochs must be None or an integer >= 1, got {every_n_val_epochs!r}")
        if int(num_records) < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records!r}")
        if weight_decay is not None and not float(weight_decay) >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(outputs, targets) -> per-sample losses [B]")
        # Unknown names (typos) raise here, before any training, with the close names; a
        # registered scheme this machine cannot run (e.g. int4_tinygemm without CUDA) is not
        # checked here: it becomes an error row of the report and the other schemes go on.
        resolve_schemes(schemes)
        self.schemes = schemes
        self.params, self.estimation, self.hessian = params, estimation, hessian
        self.loss_fn, self.batch_fn, self.num_records = loss_fn, batch_fn, int(num_records)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.utility_metrics, self.output_transform = dict(utility_metrics or {}), output_transform
        self.every_n_val_epochs = every_n_val_epochs
        self.strict, self.dirpath = bool(strict), dirpath
        self.method, self.uncertainty_draws, self.seed = method, uncertainty_draws, seed
        self.estimation_batch_size, self.log_figure, self.prefix = estimation_batch_size, log_figure, prefix
        self._state_loaded = False
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """Forget the previous fit's results (one callback object may serve several Trainers)."""
        self.report: Report | None = None
        self.report_path: Path | None = None
        self.figure_path: Path | None = None
        self.last_error: str | None = None
        self.history: list[dict[str, Any]] = []
        self._val_epochs = 0
        self._last_step: int | None = None
        self._resolved: dict[str, Any] | None = None

    # -- identity / state -------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        names = [s if isinstance(s, str) else s.name for s in self.schemes]
        return self._generate_state_key(schemes=names, prefix=self.prefix)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs": self._val_epochs, "last_step": self._last_step,
                "history": list(self.history), "last_error": self.last_error}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores a checkpoint's callback state after ``setup``; a state loaded by hand
        # before ``fit`` is kept by the next ``setup`` (see :meth:`setup`).
        self._state_loaded = True
        self._val_epochs = int(state_dict.get("val_epochs", 0))
        self._last_step = state_dict.get("last_step")
        self.history = list(state_dict.get("history", []))
        self.last_error = state_dict.get("last_error")

    @property
    def last_summary(self) -> dict[str, Any] | None:
        """The most recent run's ``{scheme: {leakage, mis, d_eff}}`` (also after a resume)."""
        return self.history[-1]["summary"] if self.history else None

    # -- pickling (strategies that spawn processes pickle the Trainer and its callbacks) ----
    def __getstate__(self) -> dict[str, Any]:
        """The state to pickle; fails naming the argument that cannot be pickled.

        ``strategy="ddp_spawn"`` (and any launcher that starts processes with ``spawn``) pickles
        the callback before any hook runs; a lambda or a local function as ``loss_fn`` would fail
        there with a bare ``Can't pickle local object``.

        Raises:
            pickle.PicklingError: ``loss_fn``, ``batch_fn``, ``output_transform``, ``params``
                or a utility metric cannot be pickled.
        """
        user = {"loss_fn": self.loss_fn, "batch_fn": self.batch_fn, "output_transform": self.output_transform,
                "params": self.params if callable(self.params) else None,
                **{f"utility_metrics[{k!r}]": m for k, m in self.utility_metrics.items()}}
        for arg, obj in user.items():
            if obj is None:
                continue
            why = _unpicklable(obj)
            if why is not None:
                raise pickle.PicklingError(
                    f"MISCallback: {arg}={_callable_name(obj)} cannot be pickled ({why}), which a "
                    f"strategy that spawns processes (e.g. strategy='ddp_spawn') needs: define it as "
                    f"a module-level function (def {arg.split('[')[0]}(...): ... at the top level "
                    f"of an importable module), not a lambda or a local function")
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __copy__(self) -> Any:  # copies need no pickling check (lambdas copy fine)
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @classmethod
    def for_lightning(cls, *args: Any, **kwargs: Any) -> Any:
        """The same callback for ``lightning.pytorch.Trainer`` (see :func:`lightning_callback`)."""
        return lightning_callback(*args, **kwargs)

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        ours = type(self)._lightning_package
        theirs = trainer_package(trainer)
        if theirs in ("pytorch_lightning", "lightning") and theirs != ours:
            fix = ("mis_lightning.callback.lightning_callback(...)" if theirs == "lightning"
                   else "mis_lightning.MISCallback(...)")
            raise TypeError(f"this MISCallback is a {ours} callback but the Trainer comes from "
                            f"{theirs}: use {fix}")
        if stage != "fit":
            return
        check_float_model(pl_module)  # a torchao-quantized model: refuse before training
        # A new fit starts from a clean slate (else a second Trainer or model would inherit the
        # first one's report and step counter and never be assessed), unless the state was
        # loaded by hand just before; a checkpoint's state (ckpt_path) is restored after this.
        if not self._state_loaded:
            self._reset_run_state()
        self._state_loaded = False
        self._resolved = self._resolve(trainer, pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # The first hook where Lightning has built the train loader (not yet at ``setup``), and
        # still before the first optimizer step: configuration errors surface before training.
        self._state_loaded = False
        if self._resolved is None:
            self._resolved = self._resolve(trainer, pl_module)
        self._check_first_batch(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_val_epochs is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs == 0:
            self._run(trainer, pl_module, stage="validation")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._last_step is not None and self._last_step == trainer.global_step and self.report is not None:
            return  # already assessed these weights at the last validation epoch
        self._run(trainer, pl_module, stage="fit_end")

    # -- work -------------------------------------------------------------------------------
    def _resolve(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        hook = callable(getattr(pl_module, HOOK_NAME, None))
        loss_fn = self.loss_fn
        if not hook and loss_fn is None:
            loss_fn = getattr(pl_module, "per_sample_loss", None)
            if not callable(loss_fn):
                raise ValueError(
                    f"MISCallback needs per-sample losses: pass loss_fn=<a module-level function "
                    f"(outputs, targets) -> losses [B]> (e.g. returning F.mse_loss(outputs, targets, "
                    f"reduction='none')), or define "
                    f"per_sample_loss(outputs, targets) or {HOOK_NAME}(batch) on "
                    f"{type(pl_module).__name__}"
                )
        wd = self.weight_decay
        if wd is None:
            attr = getattr(pl_module, "weight_decay", None)
            wd = float(attr) if isinstance(attr, (int, float)) and not isinstance(attr, bool) else 0.0
            if attr is None and trainer.is_global_zero:
                opt_wd = [g.get("weight_decay", 0) for o in (trainer.optimizers or []) for g in o.param_groups]
                if any(w and w > 0 for w in opt_wd):
                    rank_zero_warn(
                        "MISCallback: the optimizer applies weight decay but the module has no "
                        "`weight_decay` attribute; the assessment assumes an unpenalised objective "
                        "(pass weight_decay= for an explicit L2 term)"
                    )
        return {"hook": hook, "loss_fn": loss_fn, "weight_decay": float(wd)}

    def _dir(self, trainer: Any) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        cb = getattr(trainer, "checkpoint_callback", None)
        if cb is not None and getattr(cb, "dirpath", None):
            return Path(cb.dirpath)
        if getattr(trainer, "log_dir", None):
            return Path(trainer.log_dir)
        return Path(trainer.default_root_dir)

    def _check_first_batch(self, trainer: Any, pl_module: Any) -> None:
        """One training batch through the model and the loss: a batch that is not
        ``(inputs, targets)`` (without ``batch_fn``) or losses that are not ``[B]`` (a scalar
        mean, ``[B, 1]``) raise here instead of after the whole training.

        Runs in eval mode without gradients on the first records of the dataset (unshuffled,
        in-process), with the RNG isolated, so training is unaffected. Skipped for iterable
        datasets (reading them may consume the stream).

        Raises:
            TypeError: the batch layout does not fit (names ``batch_fn``).
            ValueError: the per-sample losses do not have shape ``[B]`` (names the loss).
        """
        res = self._resolved
        assert res is not None
        train = _single_loader(trainer.train_dataloader, "training")
        ds = getattr(train, "dataset", None)
        if not isinstance(train, DataLoader) or ds is None or isinstance(ds, IterableDataset) \
                or not hasattr(ds, "__len__") or len(ds) == 0:
            return
        bs = min(len(ds), train.batch_size or 8)
        loader = _reloader(train, list(range(bs)), bs)
        p = next(pl_module.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        was_training = pl_module.training
        with _rng_isolated(), torch.inference_mode(False), torch.no_grad():
            try:
                pl_module.eval()
                batch = _to_device(next(iter(loader)), device)
                if res["hook"]:
                    name = f"{type(pl_module).__name__}.{HOOK_NAME}"
                    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor)]
                    b = int(leaves[0].shape[0]) if leaves and leaves[0].dim() > 0 else None
                    losses = getattr(pl_module, HOOK_NAME)(batch)
                else:
                    loss_fn = res["loss_fn"]
                    name = ("loss_fn " + _callable_name(loss_fn)) if self.loss_fn is not None \
                        else f"{type(pl_module).__name__}.per_sample_loss"
                    if self.batch_fn is None:
                        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                            layout = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                            if isinstance(batch, Mapping):
                                layout += f" with keys {list(batch)}"
                            raise TypeError(
                                f"MISCallback: the training batches are {layout}, not (inputs, targets) "
                                f"pairs: pass batch_fn=<a module-level function batch -> (inputs, targets)>, "
                                f"or define {HOOK_NAME}(self, batch) -> per-sample losses [B] on "
                                f"{type(pl_module).__name__}")
                        inputs, targets = batch
                    else:
                        inputs, targets = self.batch_fn(batch)
                    tl = [t for t in torch.utils._pytree.tree_leaves(targets) if isinstance(t, Tensor)]
                    b = int(tl[0].shape[0]) if tl and tl[0].dim() > 0 else None
                    losses = loss_fn(pl_module(inputs), targets)
            finally:
                pl_module.train(was_training)
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else None
        if shape is None or b is None or shape != (b,):
            got = f"shape {list(shape)}" if shape is not None else type(losses).__name__
            hint = ""
            if shape == ():
                hint = " (a mean over the batch: use reduction='none')"
            elif shape is not None and b is not None and len(shape) == 2 and shape[0] == b and shape[1] == 1:
                hint = " (a trailing dimension of 1: compare outputs.squeeze(-1) with the targets)"
            raise ValueError(
                f"MISCallback: {name} returned {got} for a batch of {b} records; it must return "
                f"per-sample losses of shape [{b}]{hint}")

    def _run(self, trainer: Any, pl_module: Any, stage: str) -> None:
        with _rng_isolated():  # the user's RNG streams are untouched by the assessment
            self._run_isolated(trainer, pl_module, stage)

    def _run_isolated(self, trainer: Any, pl_module: Any, stage: str) -> None:
        was_training = pl_module.training
        t0 = time.perf_counter()
        epoch, step = int(trainer.current_epoch), int(trainer.global_step)
        try:
            if self._resolved is None:
                self._resolved = self._resolve(trainer, pl_module)
            with torch.inference_mode(False), torch.enable_grad():
                pl_module.eval()
                report = self._assess(trainer, pl_module)
            self.report, self.last_error = report, None
            failed = {k: s.error for k, s in report.schemes.items() if s.error}
            for k, err in failed.items():
                if trainer.is_global_zero:
                    rank_zero_warn(f"MISCallback: scheme {k!r} failed: {err}")
            summary = {k: {"leakage": s.leakage, "mis": s.mis, "d_eff": s.d_eff}
                       for k, s in report.schemes.items()}
            summary["baseline"] = {"leakage": report.baseline_leakage, "mis": report.baseline_mis}
            self.history.append({"stage": stage, "epoch": epoch, "step": step, "summary": summary})
            if trainer.is_global_zero:
                self._publish(trainer, report, stage, epoch, step)
                rank_zero_info(f"MISCallback: assessed {len(report.schemes)} scheme(s) on "
                               f"n={report.n} records in {time.perf_counter() - t0:.1f} s; "
                               f"report: {self.report_path}")
        except Exception as exc:
            if self.strict:
                raise
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.history.append({"stage": stage, "epoch": epoch, "step": step, "summary": None,
                                 "error": self.last_error})
            if trainer.is_global_zero:
                rank_zero_warn(f"MISCallback: the assessment failed ({self.last_error}); training's "
                               "results and checkpoints are kept (strict=True raises instead)")
                self._publish_failure(trainer, exc, stage, epoch, step)
        finally:
            pl_module.train(was_training)
            self._last_step = step

    def _assess(self, trainer: Any, pl_module: Any) -> Report:
        res = self._resolved
        assert res is not None
        train = _single_loader(trainer.train_dataloader, "training")
        if train is None:
            raise RuntimeError("the trainer has no training dataloader")
        world, rank = int(trainer.world_size), int(trainer.global_rank)
        ds = getattr(train, "dataset", None)
        shard = list(range(rank, len(ds), world)) if ds is not None and hasattr(ds, "__len__") and not isinstance(ds, IterableDataset) else None
        if shard is None and world > 1:
            rank_zero_warn("MISCallback: the training data is not a sized map-style dataset; under DDP "
                           "each process streams its own loader and duplicated records count twice")
        loader = _reloader(train, shard, self.estimation_batch_size)
        val = _single_loader(trainer.val_dataloaders, "validation")
        val_loader = _reloader(val, None, None) if val is not None else None
        metric = MISIndicator(
            pl_module, None if res["hook"] else res["loss_fn"], self.schemes, params=self.params,
            estimation=self.estimation, hessian=self.hessian, weight_decay=res["weight_decay"],
            num_records=self.num_records, batch_fn=None if res["hook"] else self.batch_fn,
            method=self.method, uncertainty_draws=self.uncertainty_draws, seed=self.seed,
            strict=self.strict, utility_fn=self._utility_fn(trainer, pl_module, val_loader),
        )
        if trainer.is_global_zero:
            rank_zero_info(f"MISCallback: estimation pass ({metric.mode}, d={metric.accumulator.d}) "
                           f"over the training records ({world} process(es))")
        device = next(pl_module.parameters()).device
        bar = _progress_bar(trainer, _safe_len(loader), "MIS estimation pass")
        try:
            for batch in loader:
                metric.update(_to_device(batch, device))
                bar.update(1)
        finally:
            bar.close()
        metric.compute()  # syncs the sums over processes (torchmetrics), then scores
        report = metric.report
        assert report is not None
        if val_loader is None:
            report.warnings.append("no validation dataloader: the quantized copies' utility was not measured")
        return report

    def _utility_fn(self, trainer: Any, pl_module: Any, val_loader: Any) -> Callable[[nn.Module], dict[str, float]]:
        res = self._resolved
        assert res is not None
        metrics, transform = self.utility_metrics, self.output_transform

        def fn(qmodel: nn.Module) -> dict[str, float]:
            if val_loader is None or not trainer.is_global_zero:
                return {}
            if not res["hook"]:
                return evaluate_utility(qmodel, val_loader, res["loss_fn"], metrics,
                                        batch_fn=self.batch_fn, output_transform=transform)
            return _hook_utility(qmodel, val_loader, metrics, transform)

        return fn

    def _publish(self, trainer: Any, report: Report, stage: str, epoch: int, step: int) -> None:
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        data = json.loads(report.to_json())
        data["lightning"] = {"stage": stage, "epoch": epoch, "global_step": step}
        text = json.dumps(data, indent=2)
        self.report_path = out / REPORT_NAME
        self.report_path.write_text(text)
        if stage != "fit_end":
            (out / f"mis_report_epoch={epoch}.json").write_text(text)
        import matplotlib.pyplot as plt

        self.figure_path = out / FIGURE_NAME
        fig = report.plot(self.figure_path)
        try:
            log_report(trainer.loggers, report, step=step, prefix=self.prefix,
                       figure=fig if self.log_figure else None)
        finally:
            plt.close(fig)

    def _publish_failure(self, trainer: Any, exc: BaseException, stage: str, epoch: int, step: int) -> None:
        try:
            out = self._dir(trainer)
            out.mkdir(parents=True, exist_ok=True)
            self.report_path = out / REPORT_NAME
            self.report_path.write_text(json.dumps({
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                "lightning": {"stage": stage, "epoch": epoch, "global_step": step},
            }, indent=2))
            for lg in trainer.loggers:
                lg.log_metrics({f"{self.prefix}/failed": 1.0}, step=step)
                if hasattr(lg, "save"):
                    lg.save()
        except Exception as exc2:  # noqa: BLE001 - never let reporting break training
            rank_zero_warn(f"MISCallback: could not record the failure: {exc2}")


@torch.inference_mode()
def _hook_utility(model: nn.Module, loader: Any, metrics: Mapping[str, Any], transform: Any) -> dict[str, float]:
    """Mean ``mis_per_sample_loss`` (and metrics on ``(model(inputs), targets)`` pairs)."""
    was = model.training
    model.eval()
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    ms = {k: m.clone().to(device) for k, m in metrics.items()}
    for m in ms.values():
        m.reset()
    total, count = 0.0, 0
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            losses = getattr(model, HOOK_NAME)(batch)
            total += float(losses.double().sum())
            count += int(losses.numel())
            if ms:
                x, y = default_batch_fn(batch)
                out = model(x)
                preds, tgt = transform(out, y) if transform else (out, y)
                for m in ms.values():
                    m.update(preds, tgt)
    finally:
        model.train(was)
    res = {"loss": total / max(count, 1)}
    res.update({k: float(m.compute()) for k, m in ms.items()})
    return res


class MISCallback(_MISCallbackImpl, pl.Callback):
    __doc__ = (
        "Membership-inference security of quantized releases, assessed during ``fit`` "
        "(``pytorch_lightning``; see the module docstring and :func:`lightning_callback`).\n\n"
        + (_MISCallbackImpl.__doc__ or "").split("\n", 2)[-1]
    )
    _lightning_package = "pytorch_lightning"


def _build_lightning_class() -> type:
    base = lightning_callback_base()
    return type("LightningMISCallback", (_MISCallbackImpl, base), {
        "__module__": __name__, "__qualname__": "LightningMISCallback",
        "__doc__": "MISCallback for ``lightning.pytorch.Trainer`` (same arguments).",
        "_lightning_package": "lightning",
    })


def lightning_callback(*args: Any, **kwargs: Any) -> Any:
    """``MISCallback`` bound to ``lightning.pytorch.Callback`` (for ``lightning.pytorch.Trainer``).

    Same arguments as :class:`MISCallback`. Raises ImportError, saying what to do, when the
    unified ``lightning`` package is not installed.
    """
    return __getattr__("LightningMISCallback")(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "LightningMISCallback":
        cls = _build_lightning_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
