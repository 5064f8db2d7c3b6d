"""The app's view of the user's batches: ``batch_fn`` from the config, the assessment loader, and
the check of the first batches through the untrained model, before training.

The app assesses the model on every training record once, in order (:func:`assessment_loader`),
and measures each quantized copy's utility on the validation loader, both as
``model.per_sample_loss(model(inputs), targets)`` with ``(inputs, targets) = batch_fn(batch)``
(``batch_fn: null``: batches are ``(inputs, targets)`` pairs). A datamodule of another layout
(a dict batch, ``(x, y, w)``), a forward that does not take the inputs, or a loss that is not
per-sample would otherwise fail after the whole training: :func:`check_first_batches`
runs them on the first records of each loader, through a private copy of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

__all__ = ["BATCH_FN_HELP", "assessment_loader", "batch_fn_of", "check_first_batches", "check_model_api"]

#: what the config's ``batch_fn`` takes (said by each error about it)
BATCH_FN_HELP = ("batch_fn=<dotted path of a module-level function batch -> (inputs, targets)>, "
                 "e.g. batch_fn=my_pkg.batches.xy (or a {_target_: ..., _partial_: true} node)")

#: records of each loader run through the model by :func:`check_first_batches`
CHECK_RECORDS = 8


def batch_fn_of(cfg: DictConfig) -> Callable[[Any], tuple[Any, Any]] | None:
    """The config's ``batch_fn``: ``None`` (``null``: batches are ``(inputs, targets)`` pairs),
    the function a dotted path names (as ``hydra.utils.get_method`` locates it), or what a ``_target_`` node
    builds (``_partial_: true`` for a function with bound options).

    Raises:
        ValueError: the path does not import or names no callable, or the node builds no
            callable (names ``batch_fn`` and the cause).
    """
    spec = cfg.get("batch_fn")
    if spec is None:
        return None
    # _locate: what get_method runs, without the ERROR log line it adds to our own message
    from hydra.utils import _locate, instantiate

    try:
        fn = instantiate(spec) if OmegaConf.is_config(spec) else _locate(str(spec))
    except Exception as exc:  # noqa: BLE001 - Hydra's own message names the cause: kept
        shown = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
        raise ValueError(f"batch_fn={shown} does not import ({' '.join(str(exc).split())}); {BATCH_FN_HELP}, "
                         "importable from where mis-lightning runs (PYTHONPATH)") from exc
    if not callable(fn):
        raise ValueError(f"batch_fn={spec} is a {type(fn).__name__}, not a function; {BATCH_FN_HELP}")
    return fn


def assessment_loader(dm: Any) -> Any:
    """A non-shuffled loader over ``dm.train_dataset`` (every training record once, in order),
    batched as the datamodule's own training loader batches: its ``batch_size`` and its
    ``collate_fn`` (a datamodule that pads or builds dict batches in its collate_fn was formerly assessed
    on ``default_collate``'s batches)."""
    from torch.utils.data import DataLoader

    collate = None
    try:
        train = dm.train_dataloader()
    except Exception:  # noqa: BLE001 - no loader to copy the batching from: the default one
        train = None
    if isinstance(train, DataLoader) and train.batch_size is not None:
        collate = train.collate_fn
    return DataLoader(dm.train_dataset, batch_size=getattr(dm, "batch_size", 256), shuffle=False,
                      **({"collate_fn": collate} if collate is not None else {}))


def check_model_api(model: Any) -> None:
    """The model built from ``model=`` has what the app calls: ``per_sample_loss(outputs,
    targets) -> [B]`` (the data term of its training objective).

    Raises:
        TypeError: naming the model class and what to define.
    """
    if not callable(getattr(model, "per_sample_loss", None)):
        raise TypeError(
            f"model {type(model).__name__} has no per_sample_loss method: the app assesses "
            "per_sample_loss(self(inputs), targets) -> per-sample losses [B], the data term of the training "
            "objective (mean over records, plus weight_decay / 2 * |theta|^2 when the model has a "
            "weight_decay attribute); define it on the model (docs/hydra.md, 'Your own model and data')")


def _layout(batch: Any) -> str:
    out = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    return out + (f" with keys {list(batch)}" if isinstance(batch, Mapping) else "")


def _shapes(tree: Any) -> str:
    leaves = [list(t.shape) for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, Tensor)]
    return str(leaves[0]) if len(leaves) == 1 else str(leaves)


def _split(batch: Any, batch_fn: Callable | None, data: str, which: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch of ``which`` loader.

    Raises:
        TypeError: a batch that is not a pair without ``batch_fn``, or a ``batch_fn`` that does
            not return a pair (names the data, the loader, the layout and the fix).
    """
    if batch_fn is None:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(f"data {data} yields {_layout(batch)} batches ({which}), not (inputs, targets) pairs: "
                        f"set {BATCH_FN_HELP}")
    pair = batch_fn(batch)
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(f"batch_fn {getattr(batch_fn, '__qualname__', batch_fn)!r} returned {_layout(pair)} on "
                        f"a {which} batch of data {data}; it must return (inputs, targets)")
    return pair[0], pair[1]


def check_first_batches(model: torch.nn.Module, dm: Any, batch_fn: Callable | None, task: str,
                        schemes: Sequence[Any] = (), strict: bool = True) -> None:
    """Before training: the first :data:`CHECK_RECORDS` records of the assessment loader
    (:func:`assessment_loader`) and the first validation batch go through a private copy of the
    (untrained) model as the assessment will run them: ``batch_fn`` (or the pair layout),
    ``model(inputs)``, ``model.per_sample_loss`` (shape ``[B]``, each record's loss its own) and
    the task's utility metrics; then ``schemes``' quantized copies on the validation batch where
    the forward uses a parameter outside its layer's function (a tied head ``h @ emb.weight.T``:
    :func:`mis_lightning.assess.check_validation_batch`). The model, the loaders and the RNG
    streams are left as they were.

    Raises:
        TypeError: a batch layout without ``batch_fn``, a forward that does not take the inputs,
            a ``batch_fn`` that returns no pair (each names the culprit and the fix).
        ValueError: the losses are not ``[B]``, or mix records (names the loss and the shapes).
        RuntimeError: the validation batch fails on the model (as
            :func:`mis_lightning.assess.check_validation_batch`).
        ReleaseForwardError: (``strict``) a scheme's quantized copy cannot run the forward.
    """
    from mis_lightning._lightning_support import first_batch
    from mis_lightning._modelcopy import private_copy
    from mis_lightning._rng import isolated_rng
    from mis_lightning.assess import check_validation_batch
    from mis_lightning.estimation.per_sample import (
        check_record_dimension,
        check_record_losses,
        loss_shape_hint,
    )
    from mis_lightning.models import metric_inputs, utility_metrics

    data, name = type(dm).__name__, type(model).__name__
    loss = model.per_sample_loss
    what = f"{name}.per_sample_loss"
    val = dm.val_dataloader()
    _, vb = first_batch(val, CHECK_RECORDS)
    if vb is not None:  # the layout first: a dict validation batch names batch_fn, not the forward
        _split(vb, batch_fn, data, "validation")
    _, batch = first_batch(assessment_loader(dm), CHECK_RECORDS)
    if batch is not None:
        copy_ = private_copy(model, "copying the model for the first-batch check").eval()
        with isolated_rng(), torch.no_grad():
            inputs, targets = _split(batch, batch_fn, data, "training")
            check_record_dimension(inputs, targets, f"the first training batch of data {data}")
            try:
                outputs = copy_(inputs)
            except TypeError as exc:  # forward(self, x1, x2): the assessment calls model(inputs)
                raise TypeError(
                    f"{name}(inputs) failed on the first training batch ({exc}); the assessment calls the "
                    f"model with one argument, the inputs of (inputs, targets) = batch_fn(batch): set "
                    f"{BATCH_FN_HELP} returning inputs the forward takes as its one argument") from exc
            losses = loss(outputs, targets)
            leaves = [t for t in torch.utils._pytree.tree_leaves(targets) if isinstance(t, Tensor)]
            b = int(leaves[0].shape[0]) if leaves and leaves[0].dim() else None
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else None
            if shape is None or b is None or shape != (b,):
                got = f"shape {list(shape)}" if shape is not None else type(losses).__name__
                raise ValueError(
                    f"{what} returned {got} for a batch of {b} records (outputs {_shapes(outputs)}, targets "
                    f"{_shapes(targets)}); it must return per-sample losses of shape [{b}]"
                    + (loss_shape_hint(shape, b, targets, outputs) or ""))
            check_record_losses(loss, outputs, targets, losses, what)
            checked = [("training", outputs, targets)]
            if vb is not None:  # validation labels may be missing where the training ones are not
                v_inputs, v_targets = _split(vb, batch_fn, data, "validation")
                try:
                    checked.append(("validation", copy_(v_inputs), v_targets))
                except Exception:  # noqa: BLE001 - check_validation_batch names what fails there
                    pass
            for which, out, tgt in checked:
                try:  # the utility metrics read the outputs: refused here, not in every quantized copy's pass
                    metric_inputs(out, tgt, task)
                except ValueError as exc:
                    raise ValueError(f"{name}'s outputs on the first {which} batch of data {data}: {exc}") from None
    check_validation_batch(model, val, loss, utility_metrics(task), batch_fn,
                           functools.partial(metric_inputs, task=task), schemes=schemes, strict=strict)
