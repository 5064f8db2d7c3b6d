"""Does the callback's loss reproduce the loss ``training_step`` trained on?

The callback assesses ``loss_fn(model(inputs), targets)`` (or the module's
``mis_per_sample_loss(batch)``) on the training records. It cannot see what ``training_step``
does: inputs standardised there (not in ``forward``), or a loss other than the one passed,
make it assess another model on another objective, with figures and a utility that can be off
by orders of magnitude and no assumption of the analysis visibly broken.

The check is cheap and passive: :class:`TrainingLosses` keeps the loss ``training_step``
returned on the last two training batches (a detached scalar, no device sync) and a reference
to each batch; at the assessment :func:`loss_mismatch_note` computes the assessment's own mean
per-sample loss on those batches (eval mode, no grad, the assessment's weights, inside the
assessment's isolated RNG) and warns when it is several-fold *above* training's on every kept
batch. One-sided on purpose: everything legitimate pushes training's figure up, not down
(train-mode dropout, penalties added in ``training_step``, augmentation, a sum instead of a
mean, the weights before the batch's last optimizer step), so only a gross excess of the
assessed loss signals that the assessed model or loss is not the trained one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._modelcopy import SharedWeights, private_copy
from .assess import _running_statistics_layers, _shown
from .evaluation import evaluate_utility
from .functional.versions import tensor_version
from .streaming import HOOK_NAME

# assessed / trained above this on every kept batch: not noise (dropout, BatchNorm batch
# statistics and the last optimizer step move a loss by tens of percent, and move training's
# figure up); standardising inputs of scale 50 moved it 100-fold (nux52 s5)
RATIO_LIMIT = 4.0
KEPT = 2  # batches compared (more than one: a single odd batch does not decide)
# the two batches' ratios within this of each other: the note says a constant factor may be all (a
# per-record loss summing over T tokens where training_step averages them reads T-fold on every batch)
SAME_RATIO = 0.05
_tree = torch.utils._pytree


def _versions(batch: Any) -> list[int | None]:
    """The version counters of a batch's tensors (an in-place write moves them; free to read)."""
    return [tensor_version(t) for t in _tree.tree_leaves(batch) if isinstance(t, Tensor)]


class TrainingLosses:
    """The last :data:`KEPT` training batches and the loss ``training_step`` returned on each.

    A ``training_step`` that transforms its batch in place (``x.sub_(mu)``) leaves the batch it was
    given transformed: kept by reference it would show the check the inputs training saw, while the
    assessment reads the loader's, and the mismatch went unseen. :meth:`start` reads the
    batch's version counters before the step; where :meth:`see` finds them moved, that batch is not
    kept and every later batch is kept as a copy taken before its step (the cost falls on such
    modules only: one copy of each batch)."""

    def __init__(self) -> None:
        self.kept: deque[tuple[Tensor, Any]] = deque(maxlen=KEPT)
        self.copies = False  # a training_step has written into its batch: keep copies from now on
        self._before: tuple[list[int | None], Any] | None = None

    def start(self, batch: Any) -> None:
        """``on_train_batch_start``: note ``batch``'s versions (and copy it once copies are kept)."""
        self._before = (_versions(batch), _tree.tree_map(
            lambda t: t.detach().clone() if isinstance(t, Tensor) else t, batch) if self.copies else None)

    def see(self, trainer: Any, outputs: Any, batch: Any) -> None:
        """Keep ``batch`` with its loss from ``on_train_batch_end``'s ``outputs`` (a tensor, or a
        mapping's ``"loss"``; Lightning divides it by ``accumulate_grad_batches``, undone here).
        Nothing is kept without a scalar loss (manual optimization returning None), nor a batch the
        step wrote into without a copy of it from before (:meth:`start`)."""
        before, self._before = self._before, None
        if before is not None and before[0] != _versions(batch):  # written in place by the step
            self.copies = True
            if before[1] is None:
                return
            batch = before[1]
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.dtype.is_floating_point:
            return
        self.kept.append((loss.detach() * int(getattr(trainer, "accumulate_grad_batches", 1) or 1), batch))

    def clear(self) -> None:
        self.kept.clear()
        self._before = None


def loss_mismatch_note(pl_module: nn.Module, kept: TrainingLosses, resolved: dict[str, Any],
                       batch_fn: Any, user_loss: bool, decay: float = 0.0) -> str | None:
    """A warning when the assessment's mean per-sample loss on each kept training batch exceeds
    :data:`RATIO_LIMIT` times the loss ``training_step`` returned on it; else ``None``.

    Runs a private copy of ``pl_module`` (its parameters over the module's storage, not copied;
    buffers and attributes copied: the module itself never runs) in eval mode without gradients
    on the kept batches (the caller holds the RNG isolated). Skipped
    (``None``) with fewer than :data:`KEPT` batches, a training loss that is not positive and
    finite, or a loss that fails here (the assessment itself reports such failures).

    Where the ratio is the same on both batches (within :data:`SAME_RATIO`) the note adds that a
    constant factor may be all, harmless to the figures without weight decay (``decay``, the
    coefficient the assessment used: the sandwich ``H^-1 G H^-1`` does not change when the loss is
    scaled, method.md section 2), and not with it. It stays a warning, every figure marked: two
    scalars cannot tell a scale from a transformation (full-batch training keeps one batch twice,
    large batches make any ratio steady), and a false "harmless" would leave a wrong figure
    unmarked, where a false mark is only caution.
    """
    if len(kept.kept) < KEPT:
        return None
    hook = resolved["hook"]
    batch_loss = (lambda m, b: getattr(m, HOOK_NAME)(b)) if hook else None
    try:
        model = private_copy(pl_module, "copying the model for the training-loss check",
                             shared=SharedWeights(pl_module.parameters()))
    except Exception:  # noqa: BLE001 - the assessment's own copies report a model that cannot be copied
        return None
    pairs = []
    for trained, batch in kept.kept:
        t = float(trained)
        if not (t > 0 and math.isfinite(t)):
            return None
        try:
            a = evaluate_utility(model, [batch], None if hook else resolved["loss_fn"],
                                 batch_fn=None if hook else batch_fn, batch_loss=batch_loss)["loss"]
        except Exception:  # noqa: BLE001 - the assessment reports a loss that fails
            return None
        pairs.append((a, t))
    if not all(a > RATIO_LIMIT * t for a, t in pairs):
        return None
    name = type(pl_module).__name__
    how = (f"{name}.{HOOK_NAME}(batch)" if hook else
           ("loss_fn(model(inputs), targets)" if user_loss else f"{name}.per_sample_loss(model(inputs), targets)"))
    shown = ", ".join(f"{a:.4g} vs {t:.4g}" for a, t in pairs)
    ratios = [a / t for a, t in pairs]
    scale = ""
    if max(ratios) <= (1 + SAME_RATIO) * min(ratios):
        with_decay = (f"with the weight decay used here ({decay:.3g}) it is not: the decay's weight against "
                      "the loss is off by that factor, and so is every figure" if decay > 0 else
                      "no weight decay is used here, so then only the utility's scale is off")
        scale = (f" The ratio is the same on both batches ({min(ratios):.3g}-{max(ratios):.3g}): if training_step's "
                 f"loss is the assessed one times a constant (a per-record loss summing over T tokens where "
                 f"training_step averages them reads T times training's), the figures do not depend on that "
                 f"factor without weight decay (the sandwich H^-1 G H^-1 is unchanged by a scale of the loss); "
                 f"{with_decay}. Two batches cannot tell a scale from transformed inputs, so the figures stay "
                 f"marked until the losses match.")
    norms = _running_statistics_layers(pl_module)
    # early in training a BatchNorm's running statistics (eval mode) can be far from the batches' own
    norm_cause = (f"; or, early in training, the running statistics of {_shown(norms, 1)}"
                  " (eval mode) still far from the batches' own (train mode)") if norms else ""
    return (f"the assessed loss does not match the module's training loss: on the last {len(pairs)} training "
            f"batches the loss the assessment computes ({how}, eval mode) is {min(ratios):.3g} "
            f"times or more the loss training_step returned ({shown}): the assessment does not see the model as "
            f"training does, so every figure and utility here is about another model or objective. Likely cause: "
            f"the inputs are transformed inside training_step (standardisation, a reshape or an embedding lookup "
            f"that forward does not do), or training_step's loss is not the one assessed (another loss, "
            f"reduction or scale){norm_cause}. Cure: move the preprocessing into forward, or define {HOOK_NAME}(self, batch) "
            f"-> per-sample losses [B] on {name} computing the loss exactly as training_step does "
            f"(docs/lightning.md).{scale}")
