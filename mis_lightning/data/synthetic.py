"""Synthetic linear / logistic regression data with a known true parameter ``theta_star``.

Features are Gaussian with an AR(1) Toeplitz covariance ``C_ij = correlation ** |i - j|``
(unit variances), drawn as ``x = L z`` with ``L`` the Cholesky factor of ``C`` and
``z ~ N(0, I_d)``. Responses:

* ``task="linear"``:   ``y = x @ theta_star + intercept + noise * eps``, ``eps ~ N(0, 1)``;
* ``task="logistic"``: ``y ~ Bernoulli(sigmoid(x @ theta_star + intercept))`` (``noise`` unused).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mis_lightning.data.base import TensorDataModule, as_dataset, check_positive_int

#: accepted spellings of the generative model -> datamodule ``task``
_TASK_ALIASES = {
    "linear": "linear",
    "regression": "linear",
    "logistic": "logistic",
    "binary": "logistic",
}


def _check_task(task: str) -> str:
    if task not in _TASK_ALIASES:
        raise ValueError(f"task must be one of 'linear' or 'logistic', got {task!r}")
    return _TASK_ALIASES[task]


def _check_correlation(correlation: float) -> float:
    correlation = float(correlation)
    if not math.isfinite(correlation) or abs(correlation) >= 1.0:
        raise ValueError(
            f"correlation must satisfy |correlation| < 1 for the AR(1) covariance to be "
            f"positive definite, got {correlation!r}"
        )
    return correlation


def ar1_covariance(d: int, correlation: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """AR(1) Toeplitz covariance ``C_ij = correlation ** |i - j|``, shape ``[d, d]``."""
    d = check_positive_int("d", d)
    correlation = _check_correlation(correlation)
    idx = torch.arange(d, dtype=dtype)
    lag = (idx[:, None] - idx[None, :]).abs()
    if correlation == 0.0:
        return torch.eye(d, dtype=dtype)
    return torch.as_tensor(correlation, dtype=dtype) ** lag


def ar1_cholesky(d: int, correlation: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of :func:`ar1_covariance` (``L @ L.T == C``), ``[d, d]``.

    Uses the closed form ``L_i0 = rho^i``, ``L_ij = sqrt(1 - rho^2) rho^(i-j)`` for
    ``1 <= j <= i``, identical to ``torch.linalg.cholesky(C)`` but numerically stable for
    ``|rho|`` close to 1 and large ``d``.
    """
    d = check_positive_int("d", d)
    rho = _check_correlation(correlation)
    idx = torch.arange(d, dtype=dtype)
    lag = idx[:, None] - idx[None, :]
    lower = lag >= 0
    if rho == 0.0:
        return torch.eye(d, dtype=dtype)
    powers = torch.where(lower, torch.as_tensor(rho, dtype=dtype) ** lag.clamp(min=0), 0.0)
    scale = torch.full((d,), math.sqrt(1.0 - rho * rho), dtype=dtype)
    scale[0] = 1.0
    return powers * scale[None, :]


def make_synthetic(
    n: int,
    d: int,
    noise: float,
    correlation: float,
    task: str,
    theta_star: torch.Tensor,
    generator: torch.Generator,
    intercept: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` samples of the synthetic linear / logistic model.

    Args:
        n: number of samples (``>= 0``).
        d: number of features (``>= 1``).
        noise: standard deviation of the additive Gaussian noise (linear task; ``>= 0``).
        correlation: AR(1) correlation between neighbouring features, ``|correlation| < 1``.
        task: ``"linear"`` (alias ``"regression"``) or ``"logistic"`` (alias ``"binary"``).
        theta_star: true coefficients, shape ``[d]``.
        generator: ``torch.Generator`` that drives all the randomness (consumed in place).
        intercept: true intercept added to the linear predictor.

    Returns:
        ``(x, y)``: ``x`` float32 ``[n, d]``; ``y`` float32 ``[n]`` (real values for the linear
        task, ``0.``/``1.`` labels for the logistic task). Drawn in float64, then cast.
    """
    n = check_positive_int("n", n, minimum=0)
    d = check_positive_int("d", d)
    noise = float(noise)
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    task = _check_task(task)
    theta = torch.as_tensor(theta_star, dtype=torch.float64).reshape(-1)
    if theta.shape[0] != d:
        raise ValueError(f"theta_star must have shape [d]=[{d}], got {tuple(theta.shape)}")
    chol = ar1_cholesky(d, correlation)
    z = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x = z @ chol.T
    eta = x @ theta + float(intercept)
    if task == "linear":
        eps = torch.randn(n, generator=generator, dtype=torch.float64)
        y = eta + noise * eps
    else:
        y = torch.bernoulli(torch.sigmoid(eta), generator=generator)
    return x.to(torch.float32), y.to(torch.float32)


def _child_generator(seed: int, index: int) -> torch.Generator:
    """Independent stream ``index`` derived from ``seed`` (via ``numpy.random.SeedSequence``)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class SyntheticRegressionDataModule(TensorDataModule):
    """Synthetic linear or logistic regression with a known ``theta_star``.

    ``theta_star`` (``[d]``, drawn from ``N(0, true_scale^2)``) and the three splits use
    independent random streams derived from ``seed``, so e.g. changing ``n_train`` leaves
    ``theta_star`` and the validation/test sets unchanged.

    Args:
        n_train: training samples (``>= 2``).
        n_val: validation samples (``>= 0``).
        n_test: test samples (``>= 0``).
        d: number of features (``>= 1``).
        noise: std of the additive Gaussian noise (linear task only, ``>= 0``).
        correlation: AR(1) correlation of neighbouring features, ``|correlation| < 1``.
        task: ``"linear"`` or ``"logistic"`` (``"regression"``/``"binary"`` also accepted).
        intercept: true intercept.
        true_scale: standard deviation of the entries of ``theta_star`` (``>= 0``).
        seed: master seed of the data and of the training-loader shuffling.
        batch_size: mini-batch size.
        num_workers: ``DataLoader`` workers.

    Attributes (after ``setup()``, ``num_features``/``task``/``theta_star`` already after init):
        num_features: ``d``.
        task: ``"regression"`` (linear) or ``"binary"`` (logistic).
        theta_star: float32 tensor ``[d]``.
        train_dataset, val_dataset, test_dataset: ``TensorDataset`` of ``(x [n, d], y [n])``.
    """

    def __init__(
        self,
        n_train: int = 1000,
        n_val: int = 500,
        n_test: int = 500,
        d: int = 10,
        noise: float = 1.0,
        correlation: float = 0.0,
        task: str = "linear",
        intercept: float = 0.0,
        true_scale: float = 1.0,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.save_hyperparameters()
        self.d = check_positive_int("d", d)
        self.n_train_requested = check_positive_int("n_train", n_train, minimum=2)
        self.n_val = check_positive_int("n_val", n_val, minimum=0)
        self.n_test = check_positive_int("n_test", n_test, minimum=0)
        noise = float(noise)
        if not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        self.noise = noise
        self.correlation = _check_correlation(correlation)
        self.generative_model = _check_task(task)
        self.intercept = float(intercept)
        if not math.isfinite(self.intercept):
            raise ValueError(f"intercept must be finite, got {intercept!r}")
        true_scale = float(true_scale)
        if not math.isfinite(true_scale) or true_scale < 0:
            raise ValueError(f"true_scale must be a finite number >= 0, got {true_scale!r}")
        self.true_scale = true_scale
        self.num_features = self.d
        self.task = "regression" if self.generative_model == "linear" else "binary"
        theta = torch.randn(self.d, generator=_child_generator(self.seed, 0), dtype=torch.float64)
        self.theta_star: torch.Tensor = (self.true_scale * theta).to(torch.float32)

    def _draw(self, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        return make_synthetic(
            n,
            self.d,
            self.noise,
            self.correlation,
            self.generative_model,
            self.theta_star,
            _child_generator(self.seed, stream),
            intercept=self.intercept,
        )

    def _build(self) -> None:
        self.train_dataset = as_dataset(*self._draw(self.n_train_requested, 1))
        self.val_dataset = as_dataset(*self._draw(self.n_val, 2))
        self.test_dataset = as_dataset(*self._draw(self.n_test, 3))
