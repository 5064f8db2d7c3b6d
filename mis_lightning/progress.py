"""The ``progress`` hook of the pipeline and its one renderer.

:func:`~mis_lightning.assess.assess` (and its halves) report progress through one hook,
``progress(stage, completed)``: ``("estimation", records so far)`` during the estimation pass,
``("schemes", schemes quantized and evaluated so far)`` during scoring, and ``("compile", 0)``
then ``("compile", 1)`` around the one-off ``torch.compile`` of the cell-moment kernel when the
compile policy will use it in this call (warmed up before the scoring pass, not mid-call). Front ends render it
with :class:`ProgressDisplay` (Rich bars on stderr, the style of Lightning's ``RichProgressBar``);
the Hydra app also reports its own stages (data, training) through the same display.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["STAGE_LABELS", "ProgressDisplay", "ProgressFn"]

ProgressFn = Callable[[str, int], None]
STAGE_LABELS = {"estimation": "MIS estimation pass", "schemes": "MIS schemes",
                "compile": "compiling the cell-moment kernel (once per process)"}


class ProgressDisplay:
    """Renders ``progress(stage, completed)`` as one Rich bar per stage on stderr.

    Use as a context manager and pass the object itself as the ``progress`` hook::

        with ProgressDisplay({"estimation": n, "schemes": 3}) as show:
            assess(..., progress=show)

    Args:
        totals: ``{stage: total}`` (``None``: an open-ended bar); unknown stages get one too.
        labels: ``{stage: description}`` (default :data:`STAGE_LABELS`, else the stage name).
        enabled: ``False`` renders nothing (the hook is then a no-op).

    Raises:
        Nothing on use; building an enabled display needs ``rich`` (a dependency).
    """

    def __init__(self, totals: Mapping[str, int | None] | None = None,
                 labels: Mapping[str, str] | None = None, enabled: bool = True) -> None:
        self.totals = dict(totals or {})
        self.labels = {**STAGE_LABELS, **(labels or {})}
        self.enabled = enabled
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            console = Console(stderr=True)
            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                transient=console.is_terminal)

    def __enter__(self) -> ProgressDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, stage: str, completed: int, description: str | None = None,
                 total: int | None = None) -> None:
        """Set ``stage``'s bar to ``completed`` (optionally a new description / total)."""
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(
                self.labels.get(stage, stage), total=total if total is not None else self.totals.get(stage))
        kw: dict[str, Any] = {"completed": completed}
        if description is not None:
            kw["description"] = description
        if total is not None:
            kw["total"] = total
        self._progress.update(self._tasks[stage], **kw)

    def __getstate__(self) -> dict[str, Any]:  # spawned processes get a silent copy
        return {"totals": self.totals, "labels": self.labels, "enabled": False,
                "_progress": None, "_tasks": {}}
