"""The library's RNG isolation (:mod:`mis_lightning._rng`) keeps the caller's global streams
(torch, numpy, random) without importing lightning_fabric: that import (with torchmetrics) was
~1 s CPU of a first call in a process that had not imported Lightning (pf29)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mis_lightning._rng import isolated_rng


@pytest.mark.parametrize("raises", [False, True])
def test_isolated_rng_restores_torch_numpy_and_random(raises):
    """After the block (returned or raised) the next draws of torch, numpy and random are the
    ones they would have been without it."""
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    try:
        with isolated_rng():
            torch.rand(100), np.random.rand(100), random.random()
            if raises:
                raise KeyError("inside")
    except KeyError:
        assert raises
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# that an assessment in a fresh process leaves lightning_fabric and torchmetrics unimported:
# tests/test_fresh_process.py


def _queued_cuda_seeds():
    """The seed calls torch has queued for CUDA (not initialised): its lazy seed tracker's
    ``(seed_all, seed)`` entries (``None`` where none is queued)."""
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    if tracker is None or torch.cuda.is_initialized():
        pytest.skip("CUDA initialised, or a torch without the lazy seed tracker: nothing is queued")
    return [None if c is None else c[0] for c in tracker.get_calls()]


@pytest.mark.parametrize("isolated_only", [True, False])
def test_a_seeded_block_leaves_the_callers_queued_cuda_seed(monkeypatch, isolated_only):
    """``isolated_rng(seed=s)`` draws the CPU stream ``torch.manual_seed(s)`` gives, and leaves the
    CUDA seed the caller queued (CUDA not initialised: applied when the caller initialises it) as it
    was. Through ``torch.manual_seed`` (the switch off, as before) the block queued its own seed in
    its place, which the restore after the block cannot take back: the caller's CUDA streams would
    start from the library's seed."""
    import mis_lightning._rng as rng

    monkeypatch.setattr(rng, "SEED_ISOLATED_ONLY", isolated_only, raising=False)
    torch.manual_seed(1234)  # the caller's seed, queued for CUDA too
    before = _queued_cuda_seeds()
    with isolated_rng(seed=3):
        inside = torch.rand(5)
    after = _queued_cuda_seeds()
    after_draw = torch.rand(5)
    torch.manual_seed(1234)
    assert torch.equal(after_draw, torch.rand(5))  # the caller's CPU stream restored either way
    torch.manual_seed(3)
    assert torch.equal(inside, torch.rand(5))  # the same draws as under torch.manual_seed(3)
    assert (after == before) is isolated_only
