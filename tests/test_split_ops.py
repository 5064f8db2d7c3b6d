"""The outer-cell split of bounded grids (functional/bounds.py) in fewer element-wise operations
(sm34) is the earlier arithmetic bit for bit: the earlier forms are kept here as the reference,
on inputs that reach every branch (both signs, 0, -0.0, infinities, NaN, empty cells)."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import bounds as B
from mis_lightning.functional.cells import _pdf

F64 = torch.float64


def _revealed_tail_before(b, tail_b, pb):
    fin = torch.isfinite(b)
    bphi = torch.where(fin, b * pb, torch.zeros_like(b))
    b3phi = torch.where(fin, (b * b + 3.0) * bphi, torch.zeros_like(b))
    absm = torch.where(b >= 0, pb, 2.0 * _pdf(torch.zeros_like(b)) - pb)
    return tail_b + bphi, absm, 3.0 * tail_b + b3phi


def _cell_term_before(diff, prob, lo, hi):
    tiny = 1e-300
    live = prob > tiny
    r = torch.maximum(torch.minimum(diff / prob.clamp_min(tiny), hi), lo)
    r = torch.where(live, r, torch.zeros_like(r))
    sq = diff * r
    return sq, diff.abs(), sq * r * r


def _split_delta_before(e, b):
    qe, qb = torch.special.ndtr(-e.abs()), torch.special.ndtr(-b.abs())
    tail_e = torch.where(e >= 0, qe, 1.0 - qe)
    tail_b = torch.where(b >= 0, qb, 1.0 - qb)
    mid = torch.where(e >= 0, qe - qb, torch.where(b <= 0, qb - qe, 1.0 - qe - qb)).clamp_min(0.0)
    pe, pb = _pdf(e), _pdf(b)
    inf = torch.full_like(e, math.inf)
    kw, lw, mw = _cell_term_before(pe, tail_e, e, inf)
    ku, lu, mu = _revealed_tail_before(b, tail_b, pb)
    km, lm, m4m = _cell_term_before(pe - pb, mid, e, b)
    return km + ku - kw, lm + lu - lw, m4m + mu - mw


def _pairs(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges e <= bounds b (standardised), every sign and scale, with special values."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(n, dtype=F64, generator=gen) * torch.tensor([0.01, 1.0, 6.0, 40.0], dtype=F64).repeat(n // 4)
    b = e + torch.rand(n, dtype=F64, generator=gen) * torch.tensor([0.0, 0.3, 3.0, 50.0], dtype=F64).repeat(n // 4)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-300, -1e-300, 38.0, -38.0], dtype=F64)
    e = torch.cat([e, special.repeat_interleave(special.numel()), torch.full((3,), -math.inf, dtype=F64)])
    b = torch.cat([b, special.repeat(special.numel()), torch.tensor([-5.0, 0.0, math.inf], dtype=F64)])
    return e, b


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bitwise: equal values and NaNs in the same places (torch.equal treats NaN != NaN)
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all()) and \
        bool((torch.signbit(a) == torch.signbit(b))[~torch.isnan(a)].all())


def test_split_delta_is_the_earlier_arithmetic_bit_for_bit():
    e, b = _pairs()
    for got, ref in zip(B._split_delta(e, b), _split_delta_before(e, b)):
        assert _same(got, ref)
    # the kappa-only form stays the full form's kappa
    assert _same(B._split_delta_kappa(e, b), B._split_delta(e, b)[0])


@pytest.mark.parametrize("top", [True, False])
def test_split_every_is_the_masked_split_with_every_element_cut(top):
    gen = torch.Generator().manual_seed(1)
    n = 5000
    th = torch.randn(n, dtype=F64, generator=gen) * 0.05
    sg = torch.rand(n, dtype=F64, generator=gen) * 0.1
    sg[:5] = 0.0  # sd 0 (floored to the smallest normal)
    s = torch.full((n,), 0.4 / 127, dtype=F64)
    edge, bound = (126.5 * s, 0.3 + 0.0 * s) if top else (-126.5 * s, -0.3 + 0.0 * s)
    k, lam = torch.rand(n, dtype=F64, generator=gen), torch.rand(n, dtype=F64, generator=gen) * 0.7
    m4 = torch.rand(n, dtype=F64, generator=gen) * 3
    sign = torch.tensor(1.0 if top else -1.0, dtype=F64)
    every = torch.ones(n, dtype=torch.bool)
    ref = B._split_chunk(k, lam, m4, every, th, sg, edge, bound, sign)
    got = B._split_every(k, lam, m4, th, sg, edge, bound, sign)
    for g, r in zip(got, ref):
        assert _same(g, r)
    # and through _apply_split (eager, every element cut: the unmasked form)
    mm = B.CellMoments(kappa=k.clone(), mean_abs=lam.clone(), m4=m4.clone(), coverage=torch.ones_like(k))
    out = B._apply_split(mm, every, th, sg, edge, bound, top, None)
    for f, r in zip(("kappa", "mean_abs", "m4"), ref):
        assert _same(getattr(out, f), r)
