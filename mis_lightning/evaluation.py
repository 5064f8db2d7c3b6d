"""Task utility of a (quantized) model on held-out data: the other axis of the trade-off.

(Formerly ``mis_lightning.utility``; that name still imports, with a DeprecationWarning.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._accuracy_error import accuracy_error
from ._precision import full_float32
from ._rng import restores_rng
from .estimation.per_sample import BatchFn, LossFn, default_batch_fn

OutputTransform = Callable[[Any, Any], tuple[Any, Any]]
BatchLoss = Callable[[nn.Module, Any], Tensor]

__all__ = ["BatchLoss", "OutputTransform", "UtilityValues", "evaluate_utility", "metric_side_fix", "named_error",
           "to_device"]


class UtilityValues(dict):
    """:func:`evaluate_utility`'s ``{name: value}`` (a plain ``dict`` to every reader) that also
    carries ``records``: the number of held-out records the values were measured on (per-sample
    losses counted), so the verdict can set an accuracy's gaps against its sampling error."""

    records: int | None = None
    #: ``{metric name: accuracy_error(metric)}`` for the torchmetrics accuracies among the metrics
    #: (:func:`~mis_lightning._accuracy_error.accuracy_error`: the error of its average, ux54c)
    errors: dict[str, dict[str, Any]] | None = None


def to_device(tree: Any, device: torch.device | str) -> Any:
    """Every tensor of a (nested) batch moved to ``device``; other leaves as they are.

    Raises:
        RuntimeError: a tensor cannot be moved (torch's error).
    """
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)


@torch.inference_mode()
def named_error(exc: BaseException, msg: str) -> BaseException:
    """``exc``'s type with ``msg`` (which names the culprit and the fix), so that callers catching
    that type still do; a ``RuntimeError`` when the type takes other constructor arguments."""
    try:
        return type(exc)(msg)
    except Exception:  # noqa: BLE001 - an exception type with its own constructor
        return RuntimeError(msg)


@restores_rng("dataloader")
@full_float32
def evaluate_utility(
    model: nn.Module,
    dataloader: Iterable,
    loss_fn: LossFn | None,
    metrics: Mapping[str, Any] | None = None,
    *,
    batch_fn: BatchFn | None = None,
    output_transform: OutputTransform | None = None,
    device: torch.device | str | None = None,
    batch_loss: BatchLoss | None = None,
) -> dict[str, float]:
    """Mean per-sample loss (key ``"loss"``) and the given torchmetrics over ``dataloader``.

    Args:
        model: evaluated in eval mode; its training flag is restored afterwards.
        dataloader: held-out batches, ``(inputs, targets)`` or split by ``batch_fn``.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` (unused with ``batch_loss``).
        metrics: ``{name: torchmetrics.Metric}``; each is cloned, so the caller's objects keep
            their state.
        output_transform: ``(outputs, targets) -> (preds, target)`` applied before the metrics
            (e.g. sigmoid of logits and integer labels for classification metrics).
        device: where batches go (default: the model's first parameter's device).
        batch_loss: ``batch_loss(model, batch) -> [B]`` per-sample losses of a whole batch
            (any layout, e.g. a LightningModule's ``mis_per_sample_loss``); the metrics then
            see ``model(inputs)`` with ``(inputs, targets) = batch_fn(batch)``.

    Returns:
        ``{"loss": mean per-sample loss, **{name: metric value}}`` (floats), a
        :class:`UtilityValues` whose ``records`` is the number of records evaluated and
        ``errors`` each torchmetrics accuracy's standard error (its average's own formula).

    Raises:
        ValueError: neither ``loss_fn`` nor ``batch_loss`` is given.
        Exception: whatever the model, the loss or a metric raises.
    """
    if loss_fn is None and batch_loss is None:
        raise ValueError("evaluate_utility needs loss_fn or batch_loss")
    batch_fn = batch_fn or default_batch_fn
    flags = [(m, m.training) for m in model.modules()]  # each module's own flag, restored exactly
    model.eval()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    ms = {k: m.clone().to(device) for k, m in (metrics or {}).items()}
    for m in ms.values():
        m.reset()
    total, count = 0.0, 0
    try:
        # without autograd, as Lightning's validation loop (a forward that needs it enables it
        # itself): each batch's graph was built for nothing
        with torch.no_grad():
            for batch in dataloader:
                if batch_loss is not None:  # the whole batch goes to the hook
                    batch = to_device(batch, device)
                    losses = batch_loss(model, batch)
                    if ms:
                        inputs, targets = batch_fn(batch)
                        outputs = model(inputs)
                else:
                    inputs, targets = batch_fn(batch)
                    inputs, targets = to_device(inputs, device), to_device(targets, device)
                    outputs = model(inputs)
                    losses = loss_fn(outputs, targets)  # type: ignore[misc]
                total += float(losses.double().sum())
                count += int(losses.numel())
                if ms:
                    preds, tgt = output_transform(outputs, targets) if output_transform else (outputs, targets)
                    for name, m in ms.items():
                        try:
                            m.update(preds, tgt)
                        except Exception as exc:  # name the metric and the fix, keep the cause
                            got = type(preds).__name__ if not isinstance(preds, torch.Tensor) else f"shape {list(preds.shape)}"
                            hint = "" if output_transform else (
                                "; pass output_transform=(outputs, targets) -> (preds, target) to turn the model's "
                                "outputs into what the metric takes")
                            msg = (f"utility metric {name!r} ({type(m).__name__}) failed on the model's outputs "
                                   f"({got}): {exc}{hint}")
                            raise named_error(exc, msg) from exc
    finally:
        for m, t in reversed(flags):  # not model.train(flag): a user's module left in eval stays so
            m.training = t
    out = UtilityValues(loss=total / max(count, 1))
    out.records = count
    out.errors = {}
    for k, m in ms.items():
        out[k] = float(m.compute())
        if (err := accuracy_error(m)) is not None:  # from the counts compute() read (macro: per class)
            out.errors[k] = err
    return out


def _metric_side_culprit(exc: BaseException, metrics: Mapping[str, Any] | None, output_transform: Any) -> str | None:
    """``"output_transform 'f'"`` or ``"utility metric 'k'"`` where ``exc`` was raised in that
    function (a frame of its code, or of a method of the metric; or torch-free call errors that
    name the function, e.g. ``f() takes 1 positional argument but 2 were given``), else None:
    the layout advice does not fit those (a one-argument output_transform was told to give
    the validation batches the training layout)."""
    fn_code = getattr(output_transform, "__code__", None)
    name = getattr(output_transform, "__name__", None)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # the error and its causes (evaluate_utility names a metric's)
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if fn_code is not None and frame.f_code is fn_code:
                return f"output_transform {name!r}"
            for key, m in (metrics or {}).items():
                if type(frame.f_locals.get("self")) is type(m) and not isinstance(m, type):  # (m or a clone)
                    return f"utility metric {key!r}"
            tb = tb.tb_next
        if name and isinstance(e, TypeError) and str(e).startswith(f"{name}()"):
            return f"output_transform {name!r}"
        e = e.__cause__
    return None


def metric_side_fix(exc: BaseException, metrics: Mapping[str, Any] | None, output_transform: Any) -> str | None:
    """The fix to give where a validation batch's utility evaluation failed in ``output_transform``
    or a utility metric (:func:`_metric_side_culprit`), naming it and ``output_transform``'s
    signature; None where the failure is elsewhere (the batches' layout, the loss, the model)."""
    culprit = _metric_side_culprit(exc, metrics, output_transform)
    return (f"{culprit}, which each copy's (outputs, targets) go through after the loss: output_transform takes "
            "(outputs, targets) and returns (preds, targets), the arguments of each metric's update"
            if culprit else None)
