"""The assessment's arithmetic outside any ``torch.autocast`` region the caller is in.

Under autocast (Lightning's ``precision="bf16-mixed"`` / ``"16-mixed"`` wraps each
``training_step`` / ``validation_step`` in it; a user may call ``assess`` inside one) matmuls and
convolutions on float32 tensors run in bfloat16 / float16. The estimation pass of a model above
``estimate.FAST_FLOAT64_MAX_PARAMS`` weights computes its per-sample gradients and Gauss-Newton
diagonals in float32, so autocast would silently compute them in bfloat16 (nu43: a 11,619-weight
MLP assessed inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` read leakage 0.872 instead of
0.636 for ``int8_weight_only``; the utilities moved too). The method (docs/method.md section 4)
needs the gradients' second moments to float32 precision at least: every public entry point
runs with autocast switched off, on every device type where it is on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import torch

__all__ = ["autocast_off", "without_autocast"]

# device types torch.autocast knows; those torch was not built for report "off"
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone")

F = TypeVar("F", bound=Callable[..., Any])


def _enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError, ValueError):  # a device type this torch does not know
        return False


@contextmanager
def autocast_off() -> Iterator[None]:
    """Switch autocast off, inside the block, on every device type where it is on (a no-op
    elsewhere: no context is entered for a device type whose autocast is off)."""
    with ExitStack() as stack:
        for dt in AUTOCAST_DEVICE_TYPES:
            if _enabled(dt):
                stack.enter_context(torch.autocast(dt, enabled=False))
        yield


def without_autocast(fn: F) -> F:
    """``fn`` run inside :func:`autocast_off` (a decorator for the public entry points)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_off():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
