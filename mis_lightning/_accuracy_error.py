"""The sampling error of a torchmetrics accuracy, read from its own counts after ``compute()``
(the verdict's noise clause, :func:`mis_lightning.report.utility_noise_note`).

Every accuracy's gaps were first set against the binomial error sqrt(p (1 - p) / m). That is the error
of a share of the m records (``average="micro"``, and ``"weighted"``, whose class weights
m_c / m make it the same share). ``MulticlassAccuracy``'s default ``average="macro"`` is the mean
of the K classes' recalls r_c = tp_c / m_c (m_c = tp_c + fn_c: the class's records), each a
binomial share of its own class's records, independent given the class counts:

    se = sqrt(sum_c r_c (1 - r_c) / m_c) / K'

over the K' classes torchmetrics averages (those with tp + fp + fn > 0; a class predicted but
absent from the targets counts with recall 0 and no variance). With imbalanced classes this is
larger than the binomial: a rare class's recall moves the mean by 1 / K' on a few records (e.g.
K = 2, m_c = 990 / 10, r_c = 0.9 / 0.5: 0.079 against the binomial's 0.014 at p = 0.7).
Guessing uniformly (chance c = 1 / K) has recall c in every class: se0 = sqrt(sum_c c (1 - c) / m_c)
/ K'' over the K'' classes present in the targets (the binomial's sqrt(c (1 - c) / m) for micro).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SHARE_AVERAGES", "accuracy_error"]

#: the averages whose accuracy is one share of the records: the binomial error holds
SHARE_AVERAGES = frozenset({"micro", "weighted", "binary"})


def _counts(metric: Any, name: str) -> torch.Tensor:
    return torch.as_tensor(getattr(metric, name)).detach().to("cpu", torch.float64).reshape(-1)


def accuracy_error(metric: Any) -> dict[str, Any] | None:
    """The standard error of ``metric``'s value (called after its ``compute()``, state not reset).

    Args:
        metric: a torchmetrics ``BinaryAccuracy`` / ``MulticlassAccuracy`` / ``MultilabelAccuracy``
            (``torchmetrics.Accuracy(task=...)`` builds these); any other object: ``None``.

    Returns:
        ``None`` for a metric that is no torchmetrics accuracy (its error is not known here: a
        share of records by its name, :data:`mis_lightning.report.ACCURACY_NAMES`, is the
        binomial's). Else ``{"average": ..., "se": float | None, "chance_se": float | None}``:
        ``average`` ``"binary"``, ``"micro"``, ``"weighted"`` or ``"macro"`` (the module's
        formulas; ``chance_se`` only for multiclass), or another (``"none"``, a multilabel or
        samplewise or top-k accuracy) with ``se`` ``None``: not a share of the records and not
        the classes' mean of shares, so no error is claimed.
    """
    from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy, MultilabelAccuracy

    if isinstance(metric, MultilabelAccuracy):  # labels of one record are not independent trials
        return {"average": "multilabel", "se": None, "chance_se": None}
    if not isinstance(metric, (BinaryAccuracy, MulticlassAccuracy)):
        return None
    average = "binary" if isinstance(metric, BinaryAccuracy) else str(getattr(metric, "average", None))
    if getattr(metric, "multidim_average", "global") != "global" or getattr(metric, "top_k", 1) not in (None, 1):
        return {"average": f"{average} (samplewise or top-k)", "se": None, "chance_se": None}
    tp, fn = _counts(metric, "tp"), _counts(metric, "fn")
    if average == "binary":
        tn, fp = _counts(metric, "tn"), _counts(metric, "fp")
        m = float((tp + fn + tn + fp).sum())
        p = float((tp + tn).sum()) / m if m else math.nan
        return {"average": average, "se": math.sqrt(p * (1 - p) / m) if m else None, "chance_se": None}
    k = int(getattr(metric, "num_classes", 0) or 0)
    chance = 1.0 / k if k >= 2 else math.nan
    if average in ("micro", "weighted"):  # one share of the records (weights m_c / m)
        m = float((tp + fn).sum())
        p = float(tp.sum()) / m if m else math.nan
        return {"average": average, "se": math.sqrt(p * (1 - p) / m) if m else None,
                "chance_se": math.sqrt(chance * (1 - chance) / m) if m and k >= 2 else None}
    if average != "macro":
        return {"average": average, "se": None, "chance_se": None}
    fp = _counts(metric, "fp")
    m_c = tp + fn
    averaged = (tp + fp + fn) > 0  # torchmetrics' macro: classes never seen nor predicted left out
    present = m_c > 0
    if not bool(averaged.any()):
        return {"average": average, "se": None, "chance_se": None}
    r = torch.where(present, tp / m_c.clamp(min=1), torch.zeros_like(tp))
    var = torch.where(present, r * (1 - r) / m_c.clamp(min=1), torch.zeros_like(tp))
    se = math.sqrt(float(var[averaged].sum())) / int(averaged.sum())
    chance_se = (math.sqrt(float((chance * (1 - chance) / m_c[present]).sum())) / int(present.sum())
                 if k >= 2 and bool(present.any()) else None)
    return {"average": average, "se": se, "chance_se": chance_se}
