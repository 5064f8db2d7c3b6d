"""Errors raised from ``MISCallback``'s hooks name the callback as their origin.

Lightning runs the callback's hooks inside ``trainer.fit``: an error from the assessment (or from
the checks before training) would otherwise surface as a bare ``KeyError`` / ``SchemeError`` with
nothing saying that the callback, not the user's module or Lightning, raised it. As the
app's ``mis-lightning: job failed during <stage>: ...`` and the Metric's ``MISIndicator: ...``
warnings name themselves, each such error becomes the same type with its message prefixed
``MISCallback: `` (and what failed), raised ``from`` the original, whose traceback is kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

NAME = "MISCallback"

_F = TypeVar("_F", bound=Callable[..., Any])


def _message(exc: BaseException) -> str:
    """The message as written (a ``KeyError``'s own string, not its ``repr``)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def callback_error(exc: Exception, what: str = "") -> Exception:
    """``exc`` as coming from the callback: the same type (so that ``except SchemeError`` and the
    like still catch it) with the message ``"MISCallback: <what><message>"``, to be raised
    ``from exc``; ``exc`` itself when its message already names the callback (it starts with
    ``MISCallback``), or when its type cannot be built from a message alone (then, where Python
    has notes, a note names the callback).

    Raises:
        Nothing.
    """
    msg = _message(exc)
    if msg.startswith(NAME):
        return exc
    text = f"{NAME}: {what}{msg}"
    try:
        new = type(exc)(text)
        if new.args != (text,):  # a type that rewrites its arguments: keep the original
            raise TypeError
        new.__dict__.update(getattr(exc, "__dict__", {}))  # attributes the type carries
    except Exception:  # noqa: BLE001 - an exception type with its own constructor
        if hasattr(exc, "add_note"):
            exc.add_note(f"(raised in {NAME}{': ' + what.rstrip(': ') if what else ''})")
        return exc
    return new


def names_callback(hook: _F) -> _F:
    """Decorate a callback hook: an ``Exception`` it raises is re-raised as :func:`callback_error`
    of it, ``from`` it (``BaseException`` such as ``KeyboardInterrupt`` passes untouched)."""

    @functools.wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except Exception as exc:
            new = callback_error(exc)
            if new is exc:
                raise
            raise new from exc

    return wrapper  # type: ignore[return-value]
