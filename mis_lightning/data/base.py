"""Shared pieces of the datamodules: deterministic splits and a tensor-backed base class.

Every datamodule of :mod:`mis_lightning.data` yields batches ``(inputs, targets)`` with
``inputs`` a ``float32`` tensor of shape ``[B, F]`` and ``targets`` a ``float32`` tensor of
shape ``[B]`` (a regression value, or ``0.``/``1.`` for a binary label).
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

TASKS = ("regression", "binary")


def check_fraction(name: str, value: float) -> float:
    """Return ``value`` as a float if ``0 <= value < 1``, else raise ``ValueError`` naming it."""
    value = float(value)
    if not (0.0 <= value < 1.0) or not np.isfinite(value):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic random train/val/test split of ``range(n)``.

    Args:
        n: number of samples.
        val_fraction: fraction of samples in the validation split (rounded to nearest).
        test_fraction: fraction of samples in the test split (rounded to nearest).
        seed: seed of the permutation (``numpy.random.default_rng``).

    Returns:
        ``(train_idx, val_idx, test_idx)``, sorted ``int64`` arrays that partition ``range(n)``.

    Raises:
        ValueError: if the fractions are out of range or leave fewer than 2 training samples.
    """
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    n_val = round(val_fraction * n)
    n_test = round(test_fraction * n)
    n_train = n - n_val - n_test
    if n_train < 2:
        raise ValueError(
            f"only {n_train} training samples left out of {n} "
            f"(val_fraction={val_fraction}, test_fraction={test_fraction})"
        )
    perm = np.random.default_rng(seed).permutation(n)
    train = np.sort(perm[:n_train])
    val = np.sort(perm[n_train : n_train + n_val])
    test = np.sort(perm[n_train + n_val :])
    return train, val, test


def as_dataset(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> TensorDataset:
    """Wrap features ``[n, F]`` and targets ``[n]`` into a ``float32`` ``TensorDataset``."""
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    xt = xt.to(torch.float32).contiguous()
    yt = yt.to(torch.float32).reshape(-1).contiguous()
    if xt.ndim != 2 or xt.shape[0] != yt.shape[0]:
        raise ValueError(f"inputs must be [n, F] and targets [n]; got {tuple(xt.shape)}, "
                         f"{tuple(yt.shape)}")
    return TensorDataset(xt, yt)


class TensorDataModule(pl.LightningDataModule):
    """Base class: holds ``train_dataset``/``val_dataset``/``test_dataset`` ``TensorDataset`` s.

    Subclasses implement :meth:`_build` which sets the three datasets, ``num_features`` and
    ``task``. :meth:`setup` is idempotent (the data are built once per instance).

    Args:
        batch_size: mini-batch size of all three dataloaders.
        seed: seed of the data split and of the training-set shuffling.
        num_workers: ``DataLoader`` worker processes.
    """

    def __init__(self, batch_size: int = 128, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = int(seed)
        self.num_workers = check_positive_int("num_workers", num_workers, minimum=0)
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self.num_features: int | None = None
        self.task: str | None = None
        self._built = False

    # -- to be implemented by subclasses -------------------------------------------------
    def _build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build (or load from cache) the datasets; calling it again is a no-op."""
        if not self._built:
            self._build()
            self._built = True

    def _require(self, ds: TensorDataset | None, name: str) -> TensorDataset:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}.{name} is not available: call setup() first")
        return ds

    @property
    def n_train(self) -> int:
        """Number of training samples (after ``setup()``)."""
        return len(self._require(self.train_dataset, "train_dataset"))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader; the shuffling order is reproducible from ``seed``."""
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self._require(self.train_dataset, "train_dataset"),
            batch_size=self.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation loader (not shuffled)."""
        return DataLoader(
            self._require(self.val_dataset, "val_dataset"),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        """Test loader (not shuffled)."""
        return DataLoader(
            self._require(self.test_dataset, "test_dataset"),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
