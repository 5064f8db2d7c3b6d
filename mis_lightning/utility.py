"""Task utility of a (quantized) model on held-out data: the other axis of the trade-off."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .estimation.per_sample import BatchFn, LossFn, default_batch_fn

OutputTransform = Callable[[Any, Any], tuple[Any, Any]]


@torch.inference_mode()
def evaluate_utility(
    model: nn.Module,
    dataloader: Iterable,
    loss_fn: LossFn,
    metrics: Mapping[str, Any] | None = None,
    *,
    batch_fn: BatchFn | None = None,
    output_transform: OutputTransform | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean per-sample loss (key ``"loss"``) and the given torchmetrics over ``dataloader``.

    Args:
        model: evaluated in eval mode; its training flag is restored afterwards.
        loss_fn: ``loss_fn(outputs, targets) -> [B]``.
        metrics: ``{name: torchmetrics.Metric}``; each is cloned, so the caller's objects keep
            their state.
        output_transform: ``(outputs, targets) -> (preds, target)`` applied before the metrics
            (e.g. sigmoid of logits and integer labels for classification metrics).
    """
    batch_fn = batch_fn or default_batch_fn
    was_training = model.training
    model.eval()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    ms = {k: m.clone().to(device) for k, m in (metrics or {}).items()}
    for m in ms.values():
        m.reset()
    total, count = 0.0, 0
    try:
        for batch in dataloader:
            inputs, targets = batch_fn(batch)
            inputs = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, inputs)
            targets = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, targets)
            outputs = model(inputs)
            losses = loss_fn(outputs, targets)
            total += float(losses.double().sum())
            count += int(losses.numel())
            if ms:
                preds, tgt = output_transform(outputs, targets) if output_transform else (outputs, targets)
                for m in ms.values():
                    m.update(preds, tgt)
    finally:
        model.train(was_training)
    out = {"loss": total / max(count, 1)}
    for k, m in ms.items():
        out[k] = float(m.compute())
    return out
