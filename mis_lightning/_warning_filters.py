"""Warnings filters put in and taken out precisely: :func:`ignoring` hides the library's own
notices (torch's vmap fallback, Lightning's about the app's Trainer) without touching the user's
warnings state. ``warnings.catch_warnings`` restored the whole filter list on exit, dropping the
filters that code run inside added (a module imported there: sympy's ``"once"``), and reset every
module's shown-once registry."""

from __future__ import annotations

import re
import warnings


class ignoring:  # noqa: N801 - a context manager used as a function (a class: no generator per call)
    """Within it, the warnings matching a rule ``(message, category)`` are not shown (``message``:
    a regex matched at the message's start, case-insensitive, as ``warnings.filterwarnings``);
    every other warning passes as the filters say.

    Each rule's ``"ignore"`` entry is put first in the active filter list and that very entry (by
    identity) is taken out on exit: filters added inside stay, and the shown-once registries are
    not reset (no ``warnings._filters_mutated()``). An ignored warning is not recorded in a
    registry, so nothing of the block outlives it. Process-wide, as any warnings filter.
    """

    __slots__ = ("_items", "_filters")

    def __init__(self, *rules: tuple[str, type[Warning]]) -> None:
        self._items = [("ignore", re.compile(message, re.I), category, None, 0) for message, category in rules]

    def __enter__(self) -> None:
        # Python 3.14's context-aware warnings keep the active list per context (_get_filters)
        get = getattr(warnings, "_get_filters", None)
        self._filters = warnings.filters if get is None else get()
        self._filters[:0] = self._items

    def __exit__(self, *exc: object) -> None:
        filters = self._filters
        for item in self._items:
            for i, f in enumerate(filters):
                if f is item:
                    del filters[i]
                    break
