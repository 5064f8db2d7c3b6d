"""The session's torch thread count is set in one place (tests/conftest.py's session fixture
``one_torch_thread``), so a test sees one thread whether the run is an xdist worker or ``-n 0``,
and whichever modules were collected with it (fx49: a dozen modules set it at import, so a
``-n 0`` run of a module that did not saw the machine's default count unless one that did was
collected too)."""

from __future__ import annotations

import torch


def test_a_test_runs_on_one_torch_thread() -> None:
    assert torch.get_num_threads() == 1
