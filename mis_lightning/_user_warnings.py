"""Warnings attributed to the user's call site: :func:`warn` shows a warning at the first frame of
the call stack outside the library and the frameworks that call it (``assess(...)``,
``metric.compute()``, ``trainer.fit(...)`` in the user's script), not at the library line that
raised it (``callback.py:481``, torchmetrics' ``prints.py:43``).

Python 3.12's ``warnings.warn(..., skip_file_prefixes=...)`` does this; on 3.11 the
``stacklevel`` is computed (:func:`user_stacklevel`), counting frames as ``warnings.warn`` does
(importlib's bootstrap frames are not counted).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from types import FrameType
from typing import Any

__all__ = ["CALLING_PACKAGES", "rank_zero_warn", "user_stacklevel", "warn"]

#: packages whose frames lie between the user's call and a warning of the library: the library,
#: and the frameworks that call into it (Lightning's Trainer runs the callback's hooks,
#: torchmetrics' ``Metric.compute`` wrapper the Metric's, Hydra the app's job, torch the modules)
CALLING_PACKAGES = ("mis_lightning", "pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities",
                    "torchmetrics", "torch", "hydra", "omegaconf")


@functools.cache
def _prefixes() -> tuple[str, ...]:
    """The folders of :data:`CALLING_PACKAGES` that are installed, each ending in a separator
    (``lightning/`` does not take in ``lightning_fabric/``). Cached: found once per process."""
    out = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "")]  # this package, as imported
    for name in CALLING_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        out += [os.path.join(p, "") for p in (spec.submodule_search_locations or [])] if spec else []
    return tuple(dict.fromkeys(out))


def _internal(frame: FrameType) -> bool:
    """A frame ``warnings.warn`` skips when it counts ``stacklevel`` (importlib's bootstrap)."""
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


def user_stacklevel(depth: int = 1) -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` called from the frame ``depth`` levels
    above this function (1: the caller of ``user_stacklevel``) show the first frame outside
    :data:`CALLING_PACKAGES`; the outermost frame when every frame is theirs (a console script
    is not: it is the user's command)."""
    frame: FrameType | None = sys._getframe(depth)
    assert frame is not None
    prefixes, level = _prefixes(), 1
    while frame.f_code.co_filename.startswith(prefixes):
        nxt = frame.f_back
        while nxt is not None and _internal(nxt):
            nxt = nxt.f_back
        if nxt is None:
            break
        frame, level = nxt, level + 1
    return level


def warn(message: str, category: type[Warning] = UserWarning, *, rank_zero: Any = None) -> None:
    """``warnings.warn(message, category)`` shown at the user's call site (:func:`user_stacklevel`).

    Args:
        message: the warning's text; category: its class.
        rank_zero: a ``rank_zero_only`` function object (Lightning's, torchmetrics') whose
            ``rank`` attribute is the process's rank: the warning is given on rank 0 only, as
            ``rank_zero_warn`` does; ``None``: on every process.
    """
    if rank_zero is not None and getattr(rank_zero, "rank", 0) != 0:
        return
    warnings.warn(message, category, stacklevel=user_stacklevel())


def rank_zero_warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Lightning's ``rank_zero_warn`` (rank 0 of the Trainer's processes: ``lightning_utilities``'
    ``rank_zero_only.rank``, which ``pytorch_lightning`` and ``lightning`` set), shown at the
    user's call site (``trainer.fit(...)``) by :func:`warn`."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    warn(message, category, rank_zero=rank_zero_only)
