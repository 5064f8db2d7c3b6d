"""The assessment's arithmetic in full float32: outside any ``torch.autocast`` region the caller
is in, and with float32 matmuls and convolutions in IEEE float32 whatever precision the caller set.

Under autocast (Lightning's ``precision="bf16-mixed"`` / ``"16-mixed"`` wraps each
``training_step`` / ``validation_step`` in it; a user may call ``assess`` inside one) matmuls and
convolutions on float32 tensors run in bfloat16 / float16. The estimation pass of a model above
``estimate.FAST_FLOAT64_MAX_PARAMS`` weights computes its per-sample gradients and Gauss-Newton
diagonals in float32, so autocast would silently compute them in bfloat16 (a 11,619-weight
MLP assessed inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` read leakage 0.872 instead of
0.636 for ``int8_weight_only``; the utilities moved too). The same holds for a reduced float32
precision: ``torch.set_float32_matmul_precision("medium")`` / ``"high"`` (Lightning's own hint on
GPUs with tensor cores) runs float32 matmuls in bfloat16 on CPUs with AMX / AVX512-BF16 (oneDNN)
and in TF32 on CUDA, and cuDNN convolutions take TF32 by default: the scoring's float32 power sums,
whose stated bound is 1e-4 relative at p = 2, read 7.6e-4 off under "medium" on this project's
CPU (docs/benchmarks.md "lead50"). The method (docs/method.md section 4) needs the
gradients' second moments and the power sums to float32 precision at least: every public entry
point runs with autocast off (:func:`autocast_off`) and IEEE float32 (:func:`ieee_float32`),
restored on exit (:func:`full_float32`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import torch

__all__ = ["autocast_off", "full_float32", "ieee_float32"]

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


# the backends' float32 precision settings (torch >= 2.9's fp32_precision API; the legacy
# set_float32_matmul_precision sets the matmul ones): "ieee" inside the assessment
FP32_PRECISION_SETTINGS = ("mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn", "cuda.matmul", "cudnn.conv", "cudnn.rnn")


def _backend(path: str) -> Any:
    obj: Any = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if hasattr(obj, "fp32_precision") else None


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Float32 matmuls and convolutions in IEEE float32 inside the block (every backend of
    :data:`FP32_PRECISION_SETTINGS` set to ``"ieee"``, each restored to its value on exit; a
    backend this torch lacks is skipped): no bfloat16 / TF32 arithmetic behind float32 tensors."""
    saved = []
    try:
        for path in FP32_PRECISION_SETTINGS:
            b = _backend(path)
            if b is not None and b.fp32_precision != "ieee":
                saved.append((b, b.fp32_precision))
                b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in reversed(saved):
            b.fp32_precision = value


def full_float32(fn: F) -> F:
    """``fn`` run inside :func:`autocast_off` and :func:`ieee_float32` (a decorator for the
    public entry points)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_off(), ieee_float32():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
