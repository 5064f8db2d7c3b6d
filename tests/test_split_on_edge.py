"""The outer-cell split with the bound on the cell's own edge (``functional.bounds.SPLIT_ON_EDGE``,
p49d): torchao's symmetric scales put ``-absmax`` on the bottom cell's edge, so the cut cell
``[e, b)`` is empty and the whole cell is revealed.

References: the general split :func:`_split_delta` / :func:`_split_delta_kappa` at ``b = e``
(the arithmetic before the switch), bit for bit, over standardised edges from -40 to 40, both
zeros, the infinities and the extremes of float64 (no tolerance: the edge form only leaves out
terms that are exact ``+0.0``); the bounded moments of real grids whose sd spans them, switch on
against off, bit for bit; and that the switch is taken: fewer ``ndtr`` evaluations (fails where
the split runs the general form).
"""

import math

import pytest
import torch

import mis_lightning.functional.bounds as B
import mis_lightning.functional.fastpath as fp
import mis_lightning.quantization.base as qb
from tests._op_counts import op_counts
from tests.test_wide_sd import _grid  # a torch.nn.Linear's weights (x3) and the scheme's grid

F64 = torch.float64


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


def _edges() -> torch.Tensor:
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-300, -1e-300, 5e-324, -5e-324, 1e300, -1e300,
                            37.5, -37.5, 8.0, -8.0], dtype=F64)
    return torch.cat([torch.linspace(-40.0, 40.0, 8001, dtype=F64), special,
                      3.0 * torch.randn(20000, dtype=F64, generator=torch.Generator().manual_seed(0))])


def test_edge_delta_is_the_general_split_at_b_equal_e_bit_for_bit():
    e = _edges()
    for got, ref in zip(B._edge_delta(e), B._split_delta(e, e.clone())):
        assert torch.equal(_bits(got), _bits(ref))
    assert torch.equal(_bits(B._edge_delta_kappa(e)), _bits(B._split_delta_kappa(e, e.clone())))



def _ndtr_count(fn) -> int:
    return op_counts(fn, ["aten::special_ndtr"])["aten::special_ndtr"]


@pytest.mark.parametrize("scheme", ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32"])
@pytest.mark.parametrize("kappa_only", [False, True])
@pytest.mark.parametrize("spread", ["wide", "few"])
def test_bounded_moments_bitwise_the_same_with_fewer_ndtr(scheme, kappa_only, spread, monkeypatch):
    """sd spanning the grid (every element cut: the chunk-wide split) or a few weights near the
    ends (the gathered split): the cell moments with the switch on equal those with it off bit
    for bit, and the call evaluates ``ndtr`` fewer times with it on."""
    pytest.importorskip("torchao")
    g, theta = _grid(scheme, 16, 128)
    c = theta.numel()
    scale = g._chunk_grid(0, c)[0].to(F64)
    gen = torch.Generator().manual_seed(1)
    if spread == "wide":
        sigma = scale * torch.exp(torch.empty(c, dtype=F64).uniform_(2.0, 6.0, generator=gen))
    else:
        sigma = scale * torch.exp(torch.empty(c, dtype=F64).uniform_(-3.0, -1.0, generator=gen))
    # the wide-sd closed form off: every element on the grid paths and their bounds
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", False)
    # the one-pass bounded fine form off too: it takes the fine-step elements past the split this
    # test counts (docs/benchmarks.md "p58b"; tests/test_fine_moments.py checks that form)
    monkeypatch.setattr(B, "FUSED_FINE_MOMENTS", False)
    # no self-check sample: the guard's periodic recheck (a process-wide call count) evaluates the
    # reference path's ndtr in whichever call it falls on (the full suite read 11 against 8)
    monkeypatch.setattr(fp.GUARD, "sample_size", lambda *a, **k: 0)
    got, count = {}, {}
    for flag in (True, False):
        monkeypatch.setattr(B, "SPLIT_ON_EDGE", flag)
        qb.release_chunk_facts()
        got[flag] = g.moments(theta, sigma, 0, c, kappa_only=kappa_only)
        qb.release_chunk_facts()
        count[flag] = _ndtr_count(lambda: g.moments(theta, sigma, 0, c, kappa_only=kappa_only))
        qb.release_chunk_facts()
    for f in ("kappa",) if kappa_only else ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(_bits(getattr(got[True], f).to(F64)), _bits(getattr(got[False], f).to(F64))), f
    assert count[True] < count[False], count
