"""Private copies of the user's model, with an error that names the culprit when one fails.

The library quantizes and evaluates *copies* (``copy.deepcopy``) so that the user's model is
never changed. ``deepcopy`` fails on attributes that cannot be copied -- a non-leaf tensor kept
from ``training_step`` (``self.last_out = out``: "Only Tensors created explicitly by the user
(graph leaves) support the deepcopy protocol"), a lock, an open file, a thread pool -- with a
message that names neither the attribute nor the step. :func:`private_copy`

* copies non-leaf tensors held as plain module attributes detached (same values; autograd
  history is of no use to a quantized copy), and
* otherwise raises :class:`ModelCopyError` naming the step, the attribute, its module and
  the cause.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

__all__ = ["ModelCopyError", "private_copy"]


class ModelCopyError(RuntimeError):
    """The model could not be deep-copied; the message names the step and the attribute."""


def _state(mod: nn.Module) -> dict[str, Any]:
    """What ``deepcopy`` copies of ``mod`` (its ``__getstate__``, e.g. without Lightning's trainer)."""
    try:
        state = mod.__getstate__()
    except Exception:  # noqa: BLE001 - fall back to the instance dict
        state = None
    return state if isinstance(state, dict) else dict(vars(mod))


def _non_leaf_memo(model: nn.Module) -> dict[int, Any]:
    """``deepcopy`` memo mapping each non-leaf tensor attribute to a detached clone."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for key, val in _state(mod).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(val, Tensor) and not val.is_leaf:
                memo[id(val)] = val.detach().clone()
    return memo


def _culprits(model: nn.Module, memo: dict[int, Any], limit: int = 3) -> list[tuple[str, str, str, Exception]]:
    """``(attribute, module path, module type, error)`` of attributes that cannot be copied."""
    found = []
    for path, mod in model.named_modules():
        for key, val in _state(mod).items():
            if key == "_modules":  # submodules are visited on their own
                continue
            items = val.items() if key in ("_parameters", "_buffers") and isinstance(val, dict) else [(key, val)]
            for name, v in items:
                try:
                    copy.deepcopy(v, dict(memo))
                except Exception as exc:  # noqa: BLE001 - any failure names this attribute
                    found.append((name, path, type(mod).__name__, exc))
                    if len(found) >= limit:
                        return found
    return found


def private_copy(model: nn.Module, step: str) -> nn.Module:
    """``copy.deepcopy(model)``, or a :class:`ModelCopyError` that names what failed.

    Args:
        model: the user's model (never modified).
        step: what the copy is for, in words (``"copying the model for scheme 'int8'"``).

    Returns:
        An independent copy (parameters, buffers and attributes copied; non-leaf tensor
        attributes copied detached).

    Raises:
        ModelCopyError: an attribute cannot be deep-copied; the message names ``step``, the
            attribute, the module that holds it and the original error (kept as the cause).
    """
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - diagnosed below
        first = exc
    memo = _non_leaf_memo(model)
    if memo:
        try:
            return copy.deepcopy(model, dict(memo))
        except Exception as exc:  # noqa: BLE001 - diagnosed below
            first = exc
    found = _culprits(model, memo)
    if not found:
        raise ModelCopyError(f"{step}: copy.deepcopy of the model failed: "
                             f"{type(first).__name__}: {first}") from first
    parts = []
    for name, path, cls, exc in found:
        where = "the model" if not path else f"submodule {path!r}"
        parts.append(f"attribute {name!r} of {where} ({cls}) cannot be deep-copied "
                     f"({type(exc).__name__}: {exc})")
    name, path = found[0][0], found[0][1]
    target = f"model.{path}.{name}" if path else f"model.{name}"
    raise ModelCopyError(
        f"{step}: " + "; ".join(parts) + ". The library quantizes and evaluates private copies "
        f"so that your model is never changed: delete the attribute before assessing (del "
        f"{target}), keep a detached tensor / a copyable object there, or give the module a "
        "__deepcopy__ / __getstate__ that leaves it out"
    ) from first
