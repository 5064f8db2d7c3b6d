"""Weights outside the cell of their released code: the fused kernel's table and two-edge forms
read the position clamped to the code's cell, so such elements must go to the exact sums
(``kernel.OWN_CELL_SLACK``). They occur in real releases (HQQ's bf16 arithmetic puts weights up
to ~0.19 cells outside their code's cell), after a grid tensor changed in place (the session-41
CI failure of tests/test_chunk_facts.py, where only a periodic self-check caught it), and with
codes that are not the nearest point. Before the fix the fused kernel returned kappa 1 against
the reference 1.5e-39 for weights a cell away (two-edge form) and 0.48 off at 0.1 cells (table).

Every test here runs with the self-checks switched off (``GUARD.sample_size`` answers 0): the
numbers must be right on the calls no check samples, which is most of them.

Tolerance: the self-check's own (``fastpath.APPROXIMATION``: the table's and the fine
expansion's stated errors) against the exact cell sums.
"""

import pytest
import torch

import mis_lightning.functional.affine as A
import mis_lightning.functional.fastpath as fp
import mis_lightning.quantization.base as qb
from mis_lightning.functional.kernel import OWN_CELL_SLACK
from mis_lightning.quantization.registry import get_scheme

F64 = torch.float64


@pytest.fixture
def unchecked(monkeypatch):
    """No self-check is due on any call: the fast paths' output is what the caller gets."""
    monkeypatch.setattr(fp.GUARD, "sample_size", lambda *a, **k: 0)


def _within(fast, ref, h):
    for name, field in zip(fp.MOMENTS, ("kappa", "mean_abs", "m4")):
        f, r = getattr(fast, field), getattr(ref, field)
        bound = fp.allowed(name, r, h, fp.APPROXIMATION)
        err = (f - r).abs()
        assert bool((err <= bound).all()), (name, float(err.max()), int((err > bound).sum()))


@pytest.mark.parametrize("off", [0.0, 2 * OWN_CELL_SLACK, 0.05, 0.5, 1.0, 3.0])
def test_weights_outside_their_codes_cell_match_the_exact_sums(off, unchecked):
    """Affine chunk (int8 range, steps 0.05-30 sd: fine, table, two-edge), every weight
    ``off`` cells beyond one edge of its code's cell (both sides), given codes."""
    gen = torch.Generator().manual_seed(0)
    c = 40_000  # above TABLE_MIN_ELEMENTS: the fused kernel
    assert c >= A.TABLE_MIN_ELEMENTS
    s = torch.full((c,), 0.3, dtype=F64)
    zp = torch.zeros(c, dtype=F64)
    h = torch.exp(torch.empty(c, dtype=F64).uniform_(-3.0, 3.4, generator=gen))
    q = torch.randint(-100, 100, (c,), generator=gen).to(F64)
    side = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    theta = (q + side * (0.5 + off)) * s
    sigma = s / h
    fast = A.affine_cell_moments(theta, sigma, s, zp, -128, 127, code=q)
    ref = A.affine_reference_moments(theta, sigma, s, zp, -128, 127, q)
    _within(fast, ref, h)


def test_a_bf16_model_under_hqq_is_scored_as_its_exact_sums(unchecked, monkeypatch):
    """bf16 Linear, ``intx_weight_only_int8_hqq``: some weights sit outside their code's cell
    by more than the slack (the release's own arithmetic); the grid's moments at steps spanning
    the table equal those with every fast path disabled."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512).to(torch.bfloat16)
    g = get_scheme("intx_weight_only_int8_hqq").apply(torch.nn.Sequential(lin)).grids["0.weight"]
    theta = lin.weight.detach().reshape(-1).to(F64)
    c = theta.numel()
    s, zp, code = g.element_grid(0, c)
    lo, hi = g._own_edges(theta, s.to(F64), zp, code)
    outside = ((lo - theta).clamp_min(0) + (theta - hi).clamp_min(0)) / s.to(F64)
    assert int((outside > OWN_CELL_SLACK).sum()) >= 10  # the condition is there
    gen = torch.Generator().manual_seed(1)
    h = torch.exp(torch.empty(c, dtype=F64).uniform_(-0.5, 3.0, generator=gen))
    sigma = s.to(F64) / h
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
    fast = g.moments(theta, sigma, 0, c)
    monkeypatch.setattr(fp.GUARD, "disabled", {A.FUSED_PATH: "test", A.SPARSE_PATH: "test"})
    ref = g.moments(theta, sigma, 0, c)
    _within(fast, ref, h)
