"""The two Lightning distributions: ``pytorch_lightning`` (our dependency) and ``lightning``.

``lightning.pytorch.Trainer`` calls hooks of ``lightning.pytorch.Callback`` subclasses and
``pytorch_lightning.Trainer`` of ``pytorch_lightning.Callback`` subclasses; the two base
classes are different objects. The callback's logic lives in one mixin and is bound to
either base class (see :mod:`mis_lightning.callback`).
"""

from __future__ import annotations

import importlib.util
from typing import Any


def lightning_available() -> bool:
    """Whether the unified ``lightning`` package is importable."""
    try:
        return importlib.util.find_spec("lightning") is not None and \
            importlib.util.find_spec("lightning.pytorch") is not None
    except (ImportError, ValueError):
        return False


def lightning_callback_base() -> type:
    """``lightning.pytorch.Callback``, or an ImportError that says what to do."""
    try:
        import lightning.pytorch as L
    except ImportError as exc:
        raise ImportError(
            "the unified `lightning` package is not installed: with pytorch_lightning.Trainer use "
            "mis_lightning.MISCallback; for lightning.pytorch.Trainer install `lightning` "
            "(pip install lightning) and use mis_lightning.callback.lightning_callback(...)"
        ) from exc
    return L.Callback


def trainer_package(trainer: Any) -> str:
    """``"pytorch_lightning"`` or ``"lightning"``: the distribution a Trainer comes from."""
    return type(trainer).__module__.split(".")[0]
