"""Eager element-wise kernels run on cache-sized blocks (``kernel.in_blocks``,
``kernel.EAGER_BLOCK``): the fused affine kernel of ``affine_cell_moments`` gives the numbers of
one call over the chunk. Equal but for the last bit of a few elements (torch's vectorised
``exp`` / ``ndtr`` and its scalar loop for a tensor's last elements differ by an ulp; which
elements are last depends on the blocks and on the subsets the kernel gathers). On the 1e6
benchmark MLP's chunks: bitwise equal, 1.5x faster (docs/benchmarks.md)."""

from __future__ import annotations

import math

import pytest
import torch

import mis_lightning.functional.affine as A
import mis_lightning.functional.kernel as K
from mis_lightning.functional import CompilePolicy

F64 = torch.float64


@pytest.mark.parametrize("codes", [False, True])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_blocked_affine_kernel_equals_one_call(codes, kappa_only, monkeypatch):
    """Steps from 0.01 to 40 sd (fine, near the clamped ends, the (h, t) table, the two-edge
    form, frozen), int4 codes, a chunk of 40,000 elements in blocks of 4,096 against one call."""
    gen = torch.Generator().manual_seed(5)
    c, qmin, qmax = 40_000, -8, 7
    s = torch.full((c,), 0.1, dtype=F64)
    th = (torch.rand(c, generator=gen, dtype=F64) * 2 - 1) * 0.85
    sg = 0.1 / torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(0.01), math.log(40.0), generator=gen))
    zp = torch.zeros(c, dtype=F64)
    code = torch.clamp(torch.round(th / s), qmin, qmax) if codes else None
    never = CompilePolicy("never")
    monkeypatch.setattr(K, "EAGER_BLOCK", 1 << 40)
    want = A.affine_cell_moments(th, sg, s, zp, qmin, qmax, code=code, compile_policy=never, kappa_only=kappa_only)
    sizes = []
    name = "_fused_affine" if codes else "_fused_affine_codes"
    inner = getattr(K, name)
    monkeypatch.setattr(K, name, lambda *a, **kw: sizes.append(a[0].numel()) or inner(*a, **kw))
    monkeypatch.setattr(K, "EAGER_BLOCK", 4096)
    got = A.affine_cell_moments(th, sg, s, zp, qmin, qmax, code=code, compile_policy=never, kappa_only=kappa_only)
    assert sizes[:10] == [4096] * 9 + [c - 9 * 4096]  # then the self-check's sample, if any
    for a, b in zip((want.kappa, want.mean_abs, want.m4, want.coverage), (got.kappa, got.mean_abs, got.m4, got.coverage)):
        assert torch.equal(a.isnan(), b.isnan())
        a, b = a.nan_to_num(7.0), b.nan_to_num(7.0)
        assert bool(((a - b).abs() <= 1e-15 * a.abs().clamp_min(1.0)).all())
        assert int((a != b).sum()) <= c // 100
