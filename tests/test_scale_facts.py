"""The scale facts of a weight-derived scale (``quantization.base.scale_facts``, pad34): the
revealed elements and the per-block bounds, computed on slabs of whole blocks along dim 0
instead of one pass over the tensor (whose tensor-sized temporaries were 182k of the 1e7
scoring pass's 0.69M minor page faults). Per block they are the same comparisons and maxima,
so the results must equal the one-pass form (written out below, the code before pad34) bit for
bit: exact equality, sign of zero included, on NaN-padded partial blocks, NaN and all-zero
blocks, float32 / bfloat16 / float64 weights, both rules, slabs down to a few elements.
"""

from __future__ import annotations

import math
import resource

import pytest
import torch

import mis_lightning.quantization.base as qb


def _one_pass(theta: torch.Tensor, block_size: tuple[int, ...], rule: str):
    """``(revealed, lower, upper)`` in one pass over the whole tensor (the code before pad34)."""
    t = theta.detach() if theta.is_floating_point() else theta.detach().to(torch.float64)
    view, padded = qb._block_view(t, block_size)
    red = tuple(range(1, 2 * t.dim(), 2))
    if rule == "absmax":
        a = view.abs()
        mask = a == torch.nan_to_num(a, nan=-1.0).amax(dim=red, keepdim=True)
        m = torch.nan_to_num(view.abs(), nan=0.0).amax(dim=red).to(torch.float64)
        lo, hi = -m, m
    else:
        top = torch.nan_to_num(view, nan=-float("inf")).amax(dim=red, keepdim=True)
        bottom = torch.nan_to_num(view, nan=float("inf")).amin(dim=red, keepdim=True)
        mask = (view == top) | (view == bottom)
        hi = torch.nan_to_num(view, nan=-float("inf")).amax(dim=red).to(torch.float64).clamp_min(0.0)
        lo = torch.nan_to_num(view, nan=float("inf")).amin(dim=red).to(torch.float64).clamp_max(0.0)
    mask = mask.reshape(padded)[tuple(slice(0, s) for s in t.shape)].clone()
    return mask, lo, hi


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())
            and (not a.is_floating_point() or torch.equal(torch.signbit(a), torch.signbit(b))))


CASES = [((37, 64), (1, 32)), ((300, 250), (1, 250)), ((301, 250), (4, 7)), ((1000, 99), (3, 10)),
         ((513,), (32,)), ((5, 3, 400), (1, 1, 64)), ((70, 80), (70, 80)), ((9, 16), (16, 16))]


@pytest.mark.parametrize("shape,block", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rule", ["absmax", "minmax"])
@pytest.mark.parametrize("one_max", [True, False])
def test_slabs_equal_the_one_pass_form(monkeypatch, shape, block, dtype, rule, one_max):
    """Also with ``FINITE_FACTS_ONE_MAX`` (p50d): a slab whose block maxima are all finite reads
    one ``amax`` for the mask and the bounds; NaN and +-inf weights (the NaN-filled maxima map inf
    to the dtype's largest value, so an infinite weight is not revealed) keep the two maxima."""
    monkeypatch.setattr(qb, "FINITE_FACTS_ONE_MAX", one_max)
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[0])
    w = torch.randn(shape, generator=gen).to(dtype)
    flat = w.view(-1)
    flat[::97] = math.nan
    flat[5:9] = 0.0
    flat[11] = -0.0
    flat[-3], flat[-40] = math.inf, -math.inf
    if w.dim() >= 2 and w.shape[0] > 4:
        w[2] = 0.0  # all-zero blocks: every element ties at the maximum
        w[3] = math.nan  # all-NaN blocks: bounds 0
    want = _one_pass(w, block, rule)
    for slab in (1 << 16, 1 << 10, 7):
        monkeypatch.setattr(qb, "_SCALE_FACT_SLAB", slab)
        got = qb.scale_facts(w, block, rule)
        assert all(_same(g, e) for g, e in zip(got, want)), (slab, [_same(g, e) for g, e in zip(got, want)])
        assert _same(qb.revealed_by_scale(w, block, rule), want[0])
        lo, hi = qb.support_by_scale(w, block, rule)
        assert _same(lo, want[1]) and _same(hi, want[2])


def test_reveal_sets_both_facts():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    g = qb.affine_grid("w", codes=torch.zeros(64, 96), scale=torch.ones(64, 1), zero_point=torch.zeros(64, 1),
                       qmin=-128, qmax=127, block_size=(1, 96), dequantized=torch.zeros(64, 96),
                       code_bits=8.0)
    g.reveal(w, "absmax")
    mask, lo, hi = _one_pass(w, (1, 96), "absmax")
    assert g.scale_rule == "absmax" and _same(g.revealed, mask)
    assert g.support is not None and _same(g.support[0], lo) and _same(g.support[1], hi)


def test_unknown_rule_raises():
    with pytest.raises(ValueError, match="rule"):
        qb.scale_facts(torch.ones(4, 4), (1, 4), "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule"):
        qb.scale_facts(torch.ones(400, 400), (1, 4), "median")  # type: ignore[arg-type]


def test_no_tensor_sized_temporaries():
    """A 2^23-weight layer (the 1e7 MLP's second): the one-pass form maps its ~6 tensor-sized
    temporaries afresh (tens of thousands of minor page faults); the slabs reuse the heap's
    memory. The bound (a tenth of the 32 MiB weight's 8,192 pages) leaves room for the outputs
    (8 MiB mask: 2,048 pages) without allowing a tensor-sized float temporary."""
    torch.set_num_threads(1)
    w = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(0))
    qb.scale_facts(w, (1, 2048), "absmax")  # the allocator's first use of these sizes
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    qb.scale_facts(w, (1, 32), "absmax")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    assert faults < 8192 // 2 + 2048, faults
