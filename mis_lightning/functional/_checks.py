"""Input checks shared by the functional core: clear errors that name the culprit."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


# check_finite decides a real floating tensor from its extremes (one reduction, which propagates
# NaN; ~2 ms against ~25-45 ms for the isfinite mask of 2^23 float32 weights, p47c) and builds the
# mask only to name a non-finite value; False: the mask always (A/B)
FINITE_FROM_EXTREMES = True
_EXTREMES_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_finite(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or +-inf, naming ``name`` and the first bad index."""
    # (float8 has no CPU aminmax kernel: the mask there, rv47)
    if FINITE_FROM_EXTREMES and t.dtype in _EXTREMES_DTYPES and t.numel():
        lo, hi = torch.aminmax(t.detach())
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):  # (NaN: the extremes are NaN)
            return
    if t.is_floating_point() and t.element_size() == 1:  # float8: isfinite has no kernel for e4m3fn
        t = t.float()
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


def renamed_kwargs(**old_to_new: str) -> Callable[[F], F]:
    """Accept the old keyword names of a function's arguments, with a ``DeprecationWarning``.

    Raises (from the wrapped function):
        TypeError: both the old and the new name were given.
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {new}= and its deprecated alias {old}=")
                    warnings.warn(f"{fn.__name__}({old}=...) is deprecated; use {new}=",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
