"""Input checks shared by the functional core: clear errors that name the culprit."""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or +-inf, naming ``name`` and the first bad index."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); "
            f"first at index {idx}: {t[idx].item()!r}"
        )


def check_shape(name: str, t: Tensor, ndim: int, what: str) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")


def check_n(n: float) -> None:
    if not (n >= 2):
        raise ValueError(f"n (number of training records) must be >= 2, got {n!r}")
