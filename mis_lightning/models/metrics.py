"""Task utility metrics (torchmetrics) shared by the models and by the evaluation of quantized
copies of a model.

Conventions: models output ``[B]`` tensors -- predictions for regression, *logits* for binary
classification. :func:`metric_inputs` converts ``(outputs, targets)`` to what the metrics of
:func:`utility_metrics` expect (probabilities and integer labels for the binary task).
"""

from __future__ import annotations

import torch
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, R2Score
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

TASKS = ("regression", "binary")


def check_task(task: str) -> str:
    """Return ``task`` if it is ``"regression"`` or ``"binary"``, else raise ``ValueError``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def utility_metrics(task: str) -> dict[str, Metric]:
    """Fresh (un-updated) utility metrics for ``task``.

    * ``"regression"``: ``rmse`` (``MeanSquaredError(squared=False)``, target units), ``mae``
      (target units), ``r2`` (dimensionless);
    * ``"binary"``: ``accuracy`` (threshold 0.5 on probabilities) and ``auroc``.

    Feed them with ``metric.update(*metric_inputs(outputs, targets, task))``.
    """
    check_task(task)
    if task == "regression":
        return {
            "rmse": MeanSquaredError(squared=False),
            "mae": MeanAbsoluteError(),
            "r2": R2Score(),
        }
    return {"accuracy": BinaryAccuracy(), "auroc": BinaryAUROC()}


def metric_inputs(
    outputs: torch.Tensor, targets: torch.Tensor, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert model outputs ``[B]`` and float targets ``[B]`` into metric inputs.

    Regression: ``(outputs, targets)`` unchanged (flattened). Binary: ``(sigmoid(logits),
    targets.long())`` so that no metric has to guess whether it received logits.

    Raises:
        ValueError: outputs that are not one value per record (``[B]`` or ``[B, 1]``: a multi-task
            ``[B, k]`` was flattened and scored as ``B k`` records), targets of another size,
            or non-finite targets (missing labels as NaN: the regression metrics read NaN, the
            binary ones an integer cast of it); the message gives the shapes.
    """
    check_task(task)
    b = int(outputs.shape[0]) if outputs.dim() else 1
    if outputs.numel() != b or targets.numel() != b:
        raise ValueError(
            f"the {task} utility metrics ({', '.join(utility_metrics(task))}) read one output per record, outputs "
            f"[B] ({'a logit' if task == 'binary' else 'a prediction'}) against targets [B]; got outputs "
            f"{list(outputs.shape)} and targets {list(targets.shape)} (several outputs per record, e.g. a multi-task "
            "model: assess it with mis_lightning.assess or MISCallback and utility_metrics= of your own)")
    if not bool(torch.isfinite(targets).all()):
        raise ValueError(
            f"the {task} utility metrics ({', '.join(utility_metrics(task))}) cannot skip missing targets: "
            f"{int((~torch.isfinite(targets)).sum())} of the {b} targets are NaN or infinite (they would score as "
            "NaN, or as a class cast from NaN); drop those records from the validation data, or assess with "
            "mis_lightning.assess or MISCallback and utility_metrics= that mask them")
    outputs = outputs.detach().reshape(-1)
    targets = targets.detach().reshape(-1)
    if task == "binary":
        return torch.sigmoid(outputs.float()), targets.round().long()
    return outputs.float(), targets.float()
