"""The caller's random states kept out of the library's own draws, on errors too.

Lightning's ``isolate_rng`` (torch CPU, ``random``, ``numpy``; CUDA only where CUDA is already
initialised: reading its states would otherwise initialise it) restores the states on a normal
exit only: a block that raised (a failed scheme or assessment, caught and reported) left the
caller's streams advanced. :func:`isolated_rng` restores them either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["isolated_rng"]


def _isolate() -> object:
    try:
        from lightning_fabric.utilities.seed import isolate_rng
    except ImportError:  # pragma: no cover - lightning_fabric ships with pytorch_lightning
        return torch.random.fork_rng(devices=[])
    return isolate_rng(include_cuda=torch.cuda.is_available() and torch.cuda.is_initialized())


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run the block with the random states restored afterwards, whether it returns or raises
    (the exception is re-raised once the states are back)."""
    error: BaseException | None = None
    with _isolate():  # type: ignore[attr-defined]
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error = exc
    if error is not None:
        raise error
