"""Linear and logistic regression M-estimators, and an MLP probe, as LightningModules.

All map inputs ``[B, F]`` to outputs ``[B]`` and minimise
``mean(per_sample_loss) + weight_decay / 2 * ||theta||^2`` (weights and biases; see
:mod:`mis_lightning.models.base`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mis_lightning.models.base import PenalizedModule


def _check_features(num_features: int) -> int:
    if isinstance(num_features, bool) or int(num_features) != num_features or num_features < 1:
        raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
    return int(num_features)


class LinearRegression(PenalizedModule):
    """Ridge regression ``f(x) = x @ w + b`` with per-sample loss ``0.5 (f(x) - y)^2``.

    The minimiser of ``mean_i 0.5 (x_i w + b - y_i)^2 + weight_decay/2 (||w||^2 + b^2)`` solves
    ``(Xt'Xt / n + weight_decay I) theta = Xt'y / n`` with ``Xt = [X, 1]``; with
    ``optimizer="lbfgs"`` and full-batch loaders training reaches it to float32 precision.

    Args:
        num_features: ``F``.
        weight_decay: ridge coefficient (``>= 0``), applied to weight and bias.
        lr: learning rate (``None``: 1.0 for L-BFGS, 1e-2 for Adam).
        optimizer: ``"lbfgs"`` (default; full batch recommended), ``"adam"`` or ``"sgd"``.
        max_iter: L-BFGS iterations per step.

    Metrics: ``rmse``, ``mae``, ``r2``.
    """

    task = "regression"

    def __init__(
        self,
        num_features: int,
        weight_decay: float = 1e-3,
        lr: float | None = None,
        optimizer: str = "lbfgs",
        max_iter: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = nn.Linear(_check_features(num_features), 1)
        self._setup_common(self.task, weight_decay, lr, optimizer, max_iter=max_iter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions (logits for :class:`LogisticRegression`) ``[B]`` for inputs ``[B, F]``."""
        return self.linear(x).squeeze(-1)


class LogisticRegression(LinearRegression):
    """L2-penalised logistic regression; outputs are logits ``[B]``.

    Per-sample loss ``binary_cross_entropy_with_logits(f(x), y)`` with ``y in {0., 1.}``.
    Metrics: ``accuracy``, ``auroc``. Arguments as in :class:`LinearRegression`.
    """

    task = "binary"

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``P(y = 1 | x)``, shape ``[B]``."""
        return torch.sigmoid(self(x))


class MLPProbe(PenalizedModule):
    """MLP ``Linear -> ReLU (-> Dropout) -> ... -> Linear(., 1)`` with outputs ``[B]``.

    Args:
        num_features: ``F``.
        hidden: widths of the hidden layers (a list from YAML is fine; empty = linear model).
        task: ``"regression"`` (squared loss) or ``"binary"`` (logits, BCE).
        dropout: dropout probability after each hidden ReLU.
        weight_decay: L2 coefficient on all weights and biases (explicit penalty).
        lr: learning rate.
        optimizer: ``"adam"`` (default), ``"lbfgs"`` or ``"sgd"``.
    """

    def __init__(
        self,
        num_features: int,
        hidden: Sequence[int] = (256, 64),
        task: str = "regression",
        dropout: float = 0.0,
        weight_decay: float = 1e-4,
        lr: float = 1e-3,
        optimizer: str = "adam",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        widths = [int(h) for h in hidden]
        if any(h < 1 for h in widths):
            raise ValueError(f"hidden widths must be >= 1, got {list(hidden)!r}")
        dropout = float(dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        prev = _check_features(num_features)
        for h in widths:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)
        self._setup_common(task, weight_decay, lr, optimizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[B]`` (predictions, or logits for ``task="binary"``)."""
        return self.net(x).squeeze(-1)
