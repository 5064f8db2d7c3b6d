"""The wide-sd closed form of a block with its gate first (``functional.wide.wide_sd_block``,
switch ``FUSED_WIDE_SD``), against the form it replaces (the switch off: ``wide_sd_parts`` and
``own_cell_mean_abs`` per block, the operations of ``wide_sd_error_bound``).

Tolerances (and why): ``ok`` and ``mean_abs`` bitwise (the gate's operations in their order;
``th - max(own_lo, lower) = min(th - own_lo, th - lower)`` exactly, rounding being monotone);
``kappa`` within 1e-15 absolute (= relative: ``kappa`` is in ``[0.99, 1]`` where the gate holds):
the one-pass form reads ``exp(-M^2 / 2)`` as ``1 / exp(M^2 / 2)`` and sums ``1 - S / E + (6 M^2 S)
W^2 E / 72`` in another order, a few ulp of ``S <= phi(0) W^3 / 12 <= 4.2e-3`` and of 1.

On int4, int8 and zero-point grids (an integer one, 7, and a float one, 7.3), through
``ParamGrid.element_moments`` (the pipeline's call) and ``ParamGrid._wide_closed`` (the form's
raw outputs), main and kappa-only calls, codes given and not, several blocks (a patched
``EAGER_BLOCK``), the gathered and whole-block evaluation after the gate, and edge cases: weights
on cell edges, on a bound and an ulp inside, in the grid's outer cells with bounds beyond the
grid's end (the own cell clipped at the bound), sd at the window's edge and an ulp either side,
sd tiny and huge, and ``6 M^2 S`` an ulp either side of ``WIDE_TOL``.
"""

from __future__ import annotations

import math

import pytest
import torch

import mis_lightning.functional.wide as W
import mis_lightning.quantization.base as qb
from mis_lightning.functional.affine import affine_codes
from mis_lightning.functional.kernel import CompilePolicy
from mis_lightning.quantization.base import ParamGrid

F64 = torch.float64
PHI0 = 1.0 / math.sqrt(2.0 * math.pi)
KAPPA_TOL = 1e-15

# zero point None (symmetric), an integer one and a float one (torchao's tinygemm layout)
GRIDS = [(-8, 7, 0), (-128, 127, 0), (0, 15, 7), (0, 15, 7.3)]


def _grid(qmin: int, qmax: int, zp: float, wide_bounds: bool, seed: int, rows: int = 8, cols: int = 500
          ) -> tuple[ParamGrid, torch.Tensor, torch.Tensor]:
    """A per-row affine grid, its weights with the edge cases of the module doc, and sd mostly
    spanning the bounded window (so the closed form's gate decides). ``wide_bounds``: bounds
    reaching 1.6 steps beyond the grid's outer edges (the outer cells clipped at the bounds)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    absmax = w.abs().amax(1, keepdim=True)
    scale = absmax / max(qmax - zp, zp - qmin)
    g = ParamGrid(name="w", shape=(rows, cols), kind="affine", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=float(math.log2(qmax - qmin + 1)), scale=scale, block_size=(1, cols),
                  zero_point=None if zp == 0 else torch.full((rows, 1), zp, dtype=torch.int64 if isinstance(zp, int) else F64),
                  qmin=qmin, qmax=qmax)
    lo_end, hi_end = (qmin - 0.5 - zp) * scale, (qmax + 0.5 - zp) * scale
    if wide_bounds:
        g.support = (lo_end - 1.6 * scale, hi_end + 1.6 * scale)
        # weights in the outer cells, beyond the grid's outer edges
        w[:, :20] = (lo_end - scale * torch.rand(rows, 20, generator=gen, dtype=F64))
        w[:, 20:40] = (hi_end + scale * torch.rand(rows, 20, generator=gen, dtype=F64))
    else:
        g.support = (-absmax, absmax)
    lo, hi = (t.expand(rows, cols).reshape(-1) for t in g.support)
    th = w.reshape(-1).clone()
    step = scale.expand(rows, cols).reshape(-1)
    c = th.numel()
    # weights on cell edges (inner edges of the grid, inside the bounds)
    k = torch.randint(qmin, qmax, (c,), generator=gen).to(F64)
    on_edge = (k + 0.5 - zp) * step
    e = slice(40, 140)
    th[e] = torch.where((on_edge[e] > lo[e]) & (on_edge[e] < hi[e]), on_edge[e], th[e])
    # on a bound, an ulp inside either bound
    th[140:160] = lo[140:160]
    th[160:180] = torch.nextafter(lo[160:180], hi[160:180])
    th[180:200] = torch.nextafter(hi[180:200], lo[180:200])
    width = hi - lo
    # sd from the window's edge (W = 0.5 sd) to 1e5 windows, log-uniform
    ratio = torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1.0 / W.WIDE_MAX_WINDOW), math.log(1e5),
                                                          generator=gen))
    sg = width * ratio
    edge = width / W.WIDE_MAX_WINDOW
    sg[200:220] = edge[200:220]
    sg[220:240] = torch.nextafter(edge[220:240], torch.zeros(20, dtype=F64))
    sg[240:260] = torch.nextafter(edge[240:260], torch.full((20,), math.inf, dtype=F64))
    sg[260:280] = 1e-300  # sd tiny: outside the window
    sg[280:300] = width[280:300] * 1e150  # sd huge: kappa 1 to the last ulp
    # 6 M^2 S an ulp either side of WIDE_TOL: sd solved from C3 (the per-element cube sum)
    low_edge, high_edge = (qmin + 0.5 - zp) * step, (qmax - 0.5 - zp) * step
    cube = W.affine_cube_sum(lo, hi, low_edge, high_edge, step)
    m = torch.maximum(th - lo, hi - th)
    t = slice(300, 1300)
    target = (6.0 * m[t] ** 2 * PHI0 * cube[t] / (12.0 * W.WIDE_TOL)) ** 0.2
    jitter = torch.tensor([1.0 - 2e-16, 1.0, 1.0 + 2e-16, 1.0 - 1e-9, 1.0 + 1e-9], dtype=F64).repeat(200)
    sg[t] = torch.maximum(target * jitter, edge[t] * 1.0001)
    return g, th, sg


def _call(g: ParamGrid, th, sg, kappa_only: bool, fused: bool, with_code: bool, monkeypatch, method: str):
    c = th.numel()
    scale, zp, _ = g.element_grid(0, c)
    code = affine_codes(th, scale, zp, g.qmin, g.qmax) if with_code else None
    bounds = g.element_bounds(0, c)
    monkeypatch.setattr(W, "FUSED_WIDE_SD", fused)
    if method == "closed":
        return g._wide_closed(th, sg, scale, zp, code, bounds, kappa_only)
    return g.element_moments(th, sg, scale, zp, code, bounds, CompilePolicy("never"), kappa_only=kappa_only)


@pytest.fixture
def blocks(monkeypatch):
    """Several blocks in a 4,000-element call (the scratch reused, the last block short)."""
    monkeypatch.setattr(qb, "EAGER_BLOCK", 1536)


@pytest.mark.parametrize("qmin, qmax, zp", GRIDS)
@pytest.mark.parametrize("wide_bounds", [False, True])
@pytest.mark.parametrize("kappa_only", [False, True])
@pytest.mark.parametrize("with_code", [False, True])
@pytest.mark.parametrize("gather", [0.0, None, 1.01])  # never, the default share, always
def test_the_block_form_is_the_per_block_form(monkeypatch, blocks, qmin, qmax, zp, wide_bounds, kappa_only,
                                              with_code, gather):
    g, th, sg = _grid(qmin, qmax, zp, wide_bounds, seed=qmax + int(10 * zp) + int(wide_bounds))
    if gather is not None:
        monkeypatch.setattr(W, "WIDE_GATHER_BELOW", gather)
        monkeypatch.setattr(W, "WIDE_GATHER_BELOW_KAPPA", gather)
        monkeypatch.setattr(W, "WIDE_GATHER_MIN", 0)
    calls = {"block": 0, "parts": 0}
    real_block, real_parts = W.wide_sd_block, qb.wide_sd_parts

    def block(*a, **kw):
        calls["block"] += 1
        return real_block(*a, **kw)

    def parts(*a, **kw):
        calls["parts"] += 1
        return real_parts(*a, **kw)

    monkeypatch.setattr(W, "wide_sd_block", block)
    monkeypatch.setattr(qb, "wide_sd_parts", parts)
    ref = _call(g, th, sg, kappa_only, False, with_code, monkeypatch, "closed")
    assert calls["block"] == 0 and calls["parts"] >= 2
    parts_calls = calls["parts"]
    got = _call(g, th, sg, kappa_only, True, with_code, monkeypatch, "closed")
    assert calls == {"block": parts_calls, "parts": parts_calls}
    assert ref is not None and got is not None
    assert (ref[0] is None) == (got[0] is None)
    if ref[0] is not None:  # (most elements are candidates: the whole chunk)
        pytest.fail("the sweep's candidates are expected to be most of the chunk")
    ok = ref[3]
    assert torch.equal(got[3], ok)
    # the sweep reaches both sides of the gate at its tolerance, and refused candidates
    assert bool(ok[300:1300].any()) and not bool(ok[300:1300].all())
    # the window's edges: on a bound, sd an ulp below the window's edge, sd tiny: no candidate;
    # sd at the edge and an ulp above: candidates
    c = th.numel()
    cand = qb._wide_candidates(th, sg, *g.element_bounds(0, c))
    assert not bool(cand[140:160].any() or cand[220:240].any() or cand[260:280].any())
    assert bool(cand[200:220].all() and cand[240:260].all() and cand[160:200].any())
    assert not bool(ok[~cand].any())
    assert 0.2 * th.numel() < int(ok.sum()) < 0.95 * th.numel()
    assert float((got[1][ok] - ref[1][ok]).abs().max()) <= KAPPA_TOL
    assert float(got[1][280:300].min()) == 1.0
    if kappa_only:
        assert ref[2] is None and got[2] is None
    else:
        assert torch.equal(got[2][ok], ref[2][ok])
    if wide_bounds:  # weights in the outer cells take the form (their own cell clipped at a bound)
        assert bool(ok[:40].any())


@pytest.mark.parametrize("qmin, qmax, zp", GRIDS)
@pytest.mark.parametrize("kappa_only", [False, True])
def test_the_pipeline_reads_the_same_moments(monkeypatch, blocks, qmin, qmax, zp, kappa_only):
    """Through ``element_moments`` (the closed form's elements, the rest on the paths): kappa
    within the tolerance, the other fields bitwise."""
    g, th, sg = _grid(qmin, qmax, zp, True, seed=7 + qmax)
    ref = _call(g, th, sg, kappa_only, False, True, monkeypatch, "moments")
    got = _call(g, th, sg, kappa_only, True, True, monkeypatch, "moments")
    assert float((got.kappa - ref.kappa).abs().max()) <= KAPPA_TOL
    if not kappa_only:
        for f in ("mean_abs", "m4", "coverage"):
            assert torch.equal(getattr(got, f), getattr(ref, f)), f


def test_refused_blocks_skip_the_values(monkeypatch):
    """A block the gate refuses whole never computes its own cells; a block it takes in part
    below ``WIDE_GATHER_BELOW`` computes them for its taken elements alone."""
    g, th, sg = _grid(-8, 7, 0.0, False, seed=3)
    c = th.numel()
    scale, zp, _ = g.element_grid(0, c)
    lo, hi = g.element_bounds(0, c)
    low_edge, high_edge = (g.qmin + 0.5 - zp) * scale, (g.qmax - 0.5 - zp) * scale
    cube = W.affine_cube_sum(lo, hi, low_edge, high_edge, scale)
    asked = []

    def own(idx):
        asked.append(c if idx is None else idx.numel())
        return g._own_edges64(th, scale, zp, None, idx)

    scratch = W.WideScratch(c, th.device)
    kappa, ok, ma = torch.empty(c, dtype=F64), torch.empty(c, dtype=torch.bool), torch.empty(c, dtype=F64)
    refused = hi - lo  # every window 1 sd wide: no candidate
    assert W.wide_sd_block(th, refused, lo, hi, cube, None, kappa, ok, ma, own, scratch) == 0
    assert asked == [] and not bool(ok.any())
    n = W.wide_sd_block(th, sg, lo, hi, cube, None, kappa, ok, ma, own, scratch)
    assert n == int(ok.sum()) and 0 < n
    monkeypatch.setattr(W, "WIDE_GATHER_BELOW", 1.01)
    monkeypatch.setattr(W, "WIDE_GATHER_MIN", 0)
    kappa2, ma2 = torch.empty_like(kappa), torch.empty_like(ma)
    assert W.wide_sd_block(th, sg, lo, hi, cube, None, kappa2, ok, ma2, own, scratch) == n
    assert asked == [c, n]
    assert torch.equal(kappa2[ok], kappa[ok]) and torch.equal(ma2[ok], ma[ok])


def test_scratch_names_an_oversized_block():
    with pytest.raises(ValueError, match="1000 elements exceeds the scratch's 10"):
        W.WideScratch(10, torch.device("cpu")).take(1000)
