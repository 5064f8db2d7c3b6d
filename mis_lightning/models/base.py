"""Base LightningModule for penalised M-estimators.

Training objective (the estimator is its minimiser)::

    L(theta) = mean_i per_sample_loss(f_theta(x_i), y_i) + weight_decay / 2 * ||theta||_2^2

where ``theta`` are ALL trainable parameters (weights and biases). The penalty is added
explicitly in :meth:`PenalizedModule.training_step`; the optimisers are built with
``weight_decay=0`` (decoupled/optimizer-side decay, as in AdamW, would minimise a different
function, and Adam's coupled decay is rescaled by its preconditioner). With
``optimizer="lbfgs"`` and batches covering the whole training set (``batch_size >= n_train``),
each Lightning step runs full-batch L-BFGS with a strong-Wolfe line search, which drives
convex models (linear / logistic) to the exact optimum up to float32 precision (the objective
is then evaluated in float64 during training, see ``PenalizedModule._training_terms``; the
parameters stay float32).

Logged: ``train_loss`` (the objective above on each training batch, at the last evaluation
of the step -- for L-BFGS the accepted iterate -- averaged over the epoch), ``train_data_loss``
(the same without the penalty), ``val_loss`` / ``test_loss`` (mean per-sample loss, no penalty) and the task metrics
of :func:`mis_lightning.models.metrics.utility_metrics` as ``val_<name>`` / ``test_<name>``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torchmetrics import MetricCollection

from mis_lightning._user_warnings import rank_zero_warn
from mis_lightning.models.metrics import check_task, metric_inputs, utility_metrics

OPTIMIZERS = ("lbfgs", "adam", "sgd")


# Inputs may be a tensor [B, ...] or a pytree of tensors with B rows each (e.g. the graph
# batches of mis_lightning.data.graphs): these helpers read and cast either.
def _leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _rows(x: Any) -> int:
    """Records in a batch of inputs (rows of its first tensor)."""
    return int(_leaves(x)[0].shape[0])


def _float_dtype(x: Any) -> torch.dtype | None:
    """dtype of the first floating-point tensor of the inputs (``None``: none)."""
    return next((t.dtype for t in _leaves(x) if t.is_floating_point()), None)


def _double(x: Any) -> Any:
    """The inputs with every floating-point tensor in float64."""
    return torch.utils._pytree.tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


class PenalizedModule(pl.LightningModule):
    """Shared training logic; subclasses build the network and call ``_setup_common``.

    Args:
        task: ``"regression"`` (per-sample loss ``0.5 (f(x) - y)^2``) or ``"binary"``
            (``binary_cross_entropy_with_logits``; outputs are logits).
        weight_decay: ridge coefficient ``lambda >= 0`` of ``lambda/2 ||theta||^2``.
        lr: learning rate (``None``: 1.0 for L-BFGS, 1e-2 for Adam, 0.1 for SGD).
        optimizer: ``"lbfgs"``, ``"adam"`` or ``"sgd"``.
        max_iter: L-BFGS iterations per optimizer step (i.e. per batch).
        history_size: L-BFGS memory.
        tolerance_grad: L-BFGS stops when the max-abs gradient falls below this.
    """

    weight_decay: float
    task: str

    def _setup_common(
        self,
        task: str,
        weight_decay: float,
        lr: float | None,
        optimizer: str,
        max_iter: int = 100,
        history_size: int = 20,
        tolerance_grad: float = 1e-9,
    ) -> None:
        self.task = check_task(task)
        weight_decay = float(weight_decay)
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.weight_decay = weight_decay
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer_name = optimizer
        default_lr = {"lbfgs": 1.0, "adam": 1e-2, "sgd": 0.1}[optimizer]
        self.lr = default_lr if lr is None else float(lr)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.max_iter = int(max_iter)
        self.history_size = int(history_size)
        self.tolerance_grad = float(tolerance_grad)
        # L-BFGS line searches need objective values more precise than float32 (see
        # _training_terms); first-order optimisers do not.
        self.float64_objective = optimizer == "lbfgs"
        self.val_metrics = MetricCollection(utility_metrics(self.task), prefix="val_")
        self.test_metrics = MetricCollection(utility_metrics(self.task), prefix="test_")

    # -- loss -------------------------------------------------------------------------------
    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]`` (no penalty) of outputs ``[B]`` against targets ``[B]``.

        Regression: ``0.5 * (outputs - targets)^2`` (squared target units / 2); binary:
        ``BCE-with-logits(outputs, targets)`` (nats).
        """
        outputs = outputs.reshape(-1)
        targets = targets.reshape(-1).to(outputs.dtype)
        if self.task == "regression":
            return 0.5 * (outputs - targets) ** 2
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")

    def penalty(self) -> torch.Tensor:
        """``||theta||_2^2`` over all trainable parameters (weights and biases), a scalar."""
        return sum((p.pow(2).sum() for p in self.parameters() if p.requires_grad),
                   torch.zeros((), device=self.device))

    def objective(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``mean(per_sample_loss) + weight_decay / 2 * penalty()`` (scalar)."""
        return self.per_sample_loss(outputs, targets).mean() + 0.5 * self.weight_decay * (
            self.penalty()
        )

    # -- steps ------------------------------------------------------------------------------
    def _training_terms(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean per-sample loss, ||theta||^2)`` on a batch, differentiable w.r.t. theta.

        With ``float64_objective`` the forward pass runs on float64 copies of the (float32)
        parameters and inputs; the gradients still flow to, and are stored in, the float32
        parameters. L-BFGS's line search compares objective values that differ by ~1e-10 near
        the optimum, below float32 resolution: in float32 it stalls ~1e-4 away from the
        minimiser, in float64 it reaches it to float32 parameter precision (~1e-7).
        """
        if not (self.float64_objective and _float_dtype(x) != torch.float64):
            return self.per_sample_loss(self(x), y).mean(), self.penalty()
        params = {k: v.double() for k, v in self.named_parameters() if v.requires_grad}
        out = functional_call(self, params, (_double(x),))
        data_loss = self.per_sample_loss(out, y.double()).mean()
        penalty = sum((v.pow(2).sum() for v in params.values()),
                      torch.zeros((), dtype=torch.float64, device=x.device))
        return data_loss, penalty

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        data_loss, penalty = self._training_terms(x, y)
        loss = data_loss + 0.5 * self.weight_decay * penalty
        # logged once per batch in on_train_batch_end: L-BFGS calls training_step (its
        # closure) many times per step, and the last evaluation is the accepted iterate
        self._last_train = (loss.detach().float(), data_loss.detach().float(), _rows(x))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = getattr(self, "_last_train", None)
        if last is not None:
            loss, data_loss, bs = last
            # sync_dist: the epoch means over every process's records under DDP, not rank 0's
            self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
            self.log("train_data_loss", data_loss, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
            self._last_train = None

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.per_sample_loss(out, y).mean()
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(*metric_inputs(out, y, self.task))
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=_rows(x), sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Outputs ``[B]`` (predictions, or logits for the binary task)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # -- optimisation -----------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.optimizer_name == "lbfgs":
            n_batches = self.trainer.num_training_batches
            if isinstance(n_batches, (int, float)) and n_batches > 1:
                rank_zero_warn(
                    f"{type(self).__name__}: L-BFGS runs on each of {n_batches} mini-batches; "
                    "it minimises the full-data objective only with one batch per epoch "
                    "(batch_size >= n_train)."
                )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer, always with ``weight_decay=0`` (the penalty is in the loss)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(
                params,
                lr=self.lr,
                max_iter=self.max_iter,
                history_size=self.history_size,
                tolerance_grad=self.tolerance_grad,
                tolerance_change=1e-12,
                line_search_fn="strong_wolfe",
            )
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=0.0)
        return torch.optim.SGD(params, lr=self.lr, weight_decay=0.0)
