"""Grids bounded by the release (functional/bounds.py, method.md section 5): a weight-derived
scale gives the block's absmax (or min and max) away, so the outer cells end at those bounds.

Reference: the exact cell sum over *every* edge of the grid, clipped to the bounds, with the
bounds added as edges (``cell_statistics`` on the full partition; nothing windowed, no
expansion)."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import affine_codes, cell_statistics
from mis_lightning.functional.bounds import bounded_moments, clip_boundaries
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.base import ParamGrid, affine_grid, support_by_scale

F64 = torch.float64


def _lumped_reference(th, sg, inner_edges, lower, upper):
    """Exact moments on the partition ``inner_edges`` clipped to ``[lower, upper]`` (scalars),
    the regions beyond the bounds one cell each: what the windowed edges show."""
    e = torch.cat([inner_edges.clamp(lower, upper), torch.tensor([lower, upper], dtype=F64)]).sort().values
    e = torch.cat([torch.tensor([-math.inf], dtype=F64), e, torch.tensor([math.inf], dtype=F64)])
    return cell_statistics(th, sg, e.unsqueeze(0).expand(th.numel(), -1).contiguous())


def _tail_integrals(b):
    """``(int_b^inf z^2 phi, int_b^inf |z| phi, int_b^inf z^4 phi)`` by 200-node Gauss-Legendre
    quadrature on ``[b, 0]`` and ``[max(b, 0), 13]`` (split at the kink of ``|z|``; < 1e-37 beyond
    13 sd): independent of the closed forms, ~1e-15 on these smooth pieces."""
    import numpy as np

    x, w = (torch.tensor(a, dtype=F64) for a in np.polynomial.legendre.leggauss(200))
    out = [torch.zeros_like(b) for _ in range(3)]
    for lo, hi in ((b.clamp(max=0.0), torch.zeros_like(b)), (b.clamp(min=0.0), torch.full_like(b, 13.0))):
        half = ((hi - lo) / 2).clamp_min(0.0).unsqueeze(-1)
        z = (lo + hi).unsqueeze(-1) / 2 + half * x  # [c, 200]
        wz = half * w * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        for k, f in enumerate((z * z, z.abs(), z ** 4)):
            out[k] += (wz * f).sum(-1)
    return tuple(out)


def _reference(th, sg, inner_edges, lower, upper):
    """Exact ``(kappa, mean_abs, m4)`` on the partition ``inner_edges`` clipped to
    ``[lower, upper]``, beyond which the release gives the weight away (``m(U) = U``: the
    weight would be the block's new extreme): the lumped cells' terms swapped for the
    integrals of the revealed regions."""
    st = _lumped_reference(th, sg, inner_edges, lower, upper)
    k, a, m4 = st.kappa.clone(), st.mean_abs.clone(), st.m4.clone()
    for bound, sign in ((upper, 1.0), (lower, -1.0)):
        b = sign * (bound - th) / sg  # standardised, the region U > b
        p = torch.special.ndtr(-b)
        phi = torch.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
        mu = torch.where(p > 1e-300, phi / p.clamp_min(1e-300), b)  # the lumped cell's mean
        rk, ra, r4 = _tail_integrals(b)
        k += rk - p * mu ** 2
        a += ra - p * mu
        m4 += r4 - p * mu ** 4
    return k, a, m4


def _affine(bits_range, scale, zp, th):
    """One block of ``th.numel()`` weights on the grid, codes by round-to-nearest."""
    qmin, qmax = bits_range
    s, z = torch.tensor([[scale]], dtype=F64), torch.tensor([[zp]], dtype=F64)
    codes = affine_codes(th, s.reshape(1), z.reshape(1), qmin, qmax).reshape(1, -1)
    return affine_grid("w", codes=codes.to(torch.int16), scale=s, zero_point=z, block_size=(1, th.numel()),
                       qmin=qmin, qmax=qmax, dequantized=(codes - zp) * scale, code_bits=8, side_bits=32.0)


# (qmin, qmax, scale, zero point, lower, upper): rtn_int* (absmax = qmax * s: the lower bound
# inside the cell of code qmin + 1), torchao symmetric (absmax = (qmax + 1/2) s) and an
# asymmetric min/max grid with a zero point (bounds between the end codes' centres).
GRIDS = {
    "rtn_int2": (-2, 1, 1.0, 0.0, -1.0, 1.0),
    "rtn_int4": (-8, 7, 1 / 7, 0.0, -1.0, 1.0),
    "torchao_int4": (-8, 7, 1 / 7.5, 0.0, -1.0, 1.0),
    "asym_uint4": (0, 15, 0.1, 6.0, -0.58, 0.88),
}


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("h", [0.2, 0.45, 0.7, 1.5, 4.0])
def test_bounded_affine_moments_match_the_full_partition(grid, h):
    """Steps above 0.5 sd are exact sums (1e-12); fine steps keep the fine-grid expansion's own
    error, which the unbounded grid has too (kappa within 5e-4 h^2: the documented bound of
    the expansion near a clamped end; measured <= 2.2e-4 h^2), but their E|m| is exact (the
    distance to the nearest edge, then the cut cells' exact change: 1e-12, measured 1.3e-14;
    the expansion's average was 2.9e-3 .. 1.8e-2 off here before fx50). Weights spread over and a
    little beyond the bounds (bootstrap draws can leave them)."""
    qmin, qmax, s, zp, lo, hi = GRIDS[grid]
    c = 3000
    gen = torch.Generator().manual_seed(0)
    th = lo + (hi - lo) * (torch.rand(c, generator=gen, dtype=F64) * 1.1 - 0.05)
    sg = torch.full((c,), s / h, dtype=F64)
    g = _affine((qmin, qmax), s, zp, th)
    g.support = (torch.tensor([[lo]], dtype=F64), torch.tensor([[hi]], dtype=F64))
    got = g.moments(th, sg, 0, c, use_codes=False)
    inner = (torch.arange(qmin, qmax, dtype=F64) + 0.5 - zp) * s
    want_k, want_a, want_m4 = _reference(th, sg, inner, lo, hi)
    tol = 1e-12 if h > 0.5 else 5e-4 * h * h  # exact sums; the reference's quadrature ~1e-15
    assert (got.kappa - want_k).abs().max() <= tol
    assert (got.mean_abs - want_a).abs().max() <= 1e-12  # exact sums; fine steps: the own-cell form
    assert (got.coverage - 1).abs().max() <= 1e-12
    # a test that can fail: the unbounded outer cells read otherwise at these weights
    g.support = None
    unb = g.moments(th, sg, 0, c, use_codes=False)
    assert float((want_k - unb.kappa).abs().sum()) > 20 * tol * c
    # ... and so do lumped cells beyond the bounds (the release gives a weight away there)
    lumped = _lumped_reference(th, sg, inner, lo, hi)
    assert float(want_k.sum() - lumped.kappa.sum()) > 20 * tol * c
    # the windowed edges the Monte Carlo and the interval read: the clipped partition, with
    # one outer cell beyond each bound, exact
    if h > 0.5:
        g.support = (torch.tensor([[lo]], dtype=F64), torch.tensor([[hi]], dtype=F64))
        m = int(math.ceil(8.5 / h)) + 2
        st = cell_statistics(th, sg, g.boundaries(th, 0, c, m))
        assert (st.kappa - lumped.kappa).abs().max() <= 1e-12


def test_bounded_value_table_moments_match_the_full_partition():
    """float8_e4m3fn with an absmax scale (torchao's Float8WeightOnlyConfig: ``s = m / 448``):
    the top cell [432 s, inf) is cut at m = 448 s. Exact split terms on the table path's own
    value: within the table path's error (1e-4 of kappa, tests/test_float_grid_fast.py)."""
    values = torch.tensor(sorted({float(v) for v in torch.arange(256, dtype=torch.uint8)
                                  .view(torch.float8_e4m3fn).float().tolist() if math.isfinite(v)}), dtype=F64)
    c, m = 4000, 1.0
    s = m / 448.0
    gen = torch.Generator().manual_seed(1)
    th = (torch.rand(c, generator=gen, dtype=F64) * 2 - 1) * m
    sg = (torch.rand(c, generator=gen, dtype=F64) * 0.1 + 0.005) * m
    g = ParamGrid(name="w", shape=(1, c), kind="table", dequantized=torch.zeros(1, c), bits_per_weight=8.0,
                  scale=torch.tensor([[s]], dtype=F64), block_size=(1, c), values=values)
    g.support = (torch.tensor([[-m]], dtype=F64), torch.tensor([[m]], dtype=F64))
    got = g.moments(th, sg, 0, c)
    inner = 0.5 * (values[1:] + values[:-1]) * s
    want_k, _, _ = _reference(th, sg, inner, -m, m)
    assert (got.kappa - want_k).abs().max() <= 1e-4
    g.support = None
    unb = g.moments(th, sg, 0, c)
    assert float(want_k.sum() - unb.kappa.sum()) > 1.0  # the cut changes the total


def test_bounded_moments_leave_far_elements_alone():
    """Elements whose bounds lie beyond 8.5 sd keep the grid path's numbers bit for bit."""
    c = 100
    th = torch.linspace(-0.5, 0.5, c, dtype=F64)
    sg = torch.full((c,), 0.01, dtype=F64)
    g = _affine((-8, 7), 1 / 7, 0.0, th)
    base = g.moments(th, sg, 0, c, use_codes=False)
    out = bounded_moments(base, th, sg, torch.full((c,), -1.0, dtype=F64), torch.full((c,), 1.0, dtype=F64),
                          torch.full((c,), -7.5 / 7, dtype=F64), torch.full((c,), 6.5 / 7, dtype=F64),
                          torch.full((c,), 1 / 7, dtype=F64), lambda ii, m: g.boundaries(th[ii], 0, c, m)[ii])
    assert out is base


@pytest.mark.parametrize("rule", ["absmax", "minmax"])
def test_support_by_scale_gives_the_released_range(rule):
    """Per block (here rows of 4 in groups of 2): ``[-max|w|, max|w|]`` or ``[min(w_min, 0),
    max(w_max, 0)]`` (the range torch's and torchao's min/max observers widen to hold 0)."""
    w = torch.tensor([[0.3, -0.7, 0.2, 0.1], [-0.2, -0.4, 0.5, 0.9]])
    lo, hi = support_by_scale(w, (1, 2), rule)
    assert lo.shape == (2, 2) and lo.dtype == F64
    if rule == "absmax":
        assert torch.allclose(hi, torch.tensor([[0.7, 0.2], [0.4, 0.9]], dtype=F64)) and torch.equal(lo, -hi)
    else:
        assert torch.allclose(lo, torch.tensor([[-0.7, 0.0], [-0.4, 0.0]], dtype=F64))
        assert torch.allclose(hi, torch.tensor([[0.3, 0.2], [0.0, 0.9]], dtype=F64))


def test_schemes_record_the_bounds_their_scales_release():
    """rtn_int4 (absmax per row) on a Linear: the grid's support is each row's [-m, m]; a
    dtype cast (no weight-derived scale) has none."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    res = get_scheme("rtn_int4").apply(torch.nn.Sequential(lin))
    g = res.grids["0.weight"]
    m = lin.weight.detach().abs().amax(dim=1, keepdim=True).double()
    assert g.support is not None
    assert torch.allclose(g.support[1].reshape(3, 1), m) and torch.allclose(g.support[0].reshape(3, 1), -m)
    cast = get_scheme("bf16").apply(torch.nn.Sequential(lin))
    assert all(gr.support is None for gr in cast.grids.values())


@pytest.mark.parametrize("rule", ["absmax", "minmax"])
def test_scale_setters_name_the_weights_that_set_each_range(rule):
    """Per element, the weights of its block that set its range ``[lo, hi]`` (blocks of rows,
    groups, 2-D): absmax ``[-|w_m|, |w_m|]`` from the largest magnitude; min/max from the
    smallest and largest, an end at 0 (sign 0) when the block does not straddle 0."""
    torch.manual_seed(3)
    for shape, block in [((3, 8), (1, 8)), ((4, 8), (1, 4)), ((4, 6), (2, 3)), ((2, 4), (1, 2))]:
        w = torch.randn(*shape)
        w[0, :2] = w[0, :2].abs() + 0.1  # a block of one sign (its min/max range ends at 0)
        nb = [s // b for s, b in zip(shape, block)]
        g = affine_grid("w", codes=torch.zeros(shape, dtype=torch.int8), scale=torch.ones(nb),
                        zero_point=torch.zeros(nb), block_size=block, qmin=-8, qmax=7, dequantized=w, code_bits=4)
        g.reveal(w, rule)
        lo_i, lo_s, hi_i, hi_s = g.scale_setters(w)
        flat = w.reshape(-1).double()
        lo_b, hi_b = (_expand(t, block, shape) for t in g.support)
        assert torch.allclose(lo_s * flat[lo_i], lo_b) and torch.allclose(hi_s * flat[hi_i], hi_b)
        if rule == "absmax":
            assert torch.equal(lo_i, hi_i) and bool((lo_s == -hi_s).all())
        elif block == (1, 2):
            assert float(lo_s.reshape(shape)[0, 0]) == 0.0  # the positive block's lower end is 0


def _expand(t, block, shape):
    from mis_lightning.quantization.base import _expand_blocks

    return _expand_blocks(t, block, shape, 0, math.prod(shape))


def test_a_window_that_reaches_a_bound_ends_like_a_clamped_one():
    """Clipped windows: past the bound the edges are +inf (one outer cell, nothing lumped), so
    the Monte Carlo forms sample a weight next to a bound instead of sending it to the Gaussian
    channel; a bound beyond the window leaves its lumped outer cell (still too narrow)."""
    from mis_lightning.functional.leakage import window_too_narrow

    edges = torch.tensor([[-math.inf, -1.5, -0.5, 0.5, 1.5, 2.5, math.inf]], dtype=F64)
    th, sg = torch.tensor([0.9], dtype=F64), torch.tensor([0.05], dtype=F64)
    got = clip_boundaries(edges, torch.tensor([-1.0], dtype=F64), torch.tensor([1.0], dtype=F64))
    assert got.tolist() == [[-math.inf, -1.0, -0.5, 0.5, 1.0, math.inf, math.inf]]
    assert not bool(window_too_narrow(got, th, sg))
    far = clip_boundaries(edges, torch.tensor([-9.0], dtype=F64), torch.tensor([9.0], dtype=F64))
    assert torch.equal(far, edges) and bool(window_too_narrow(far, torch.tensor([2.3], dtype=F64), sg))


@pytest.mark.parametrize("rule", ["absmax", "minmax"])
def test_grid_relative_sd_matches_a_simulation(rule):
    """A weight's place on a grid whose range follows the weights, ``(theta_j - lo) / (hi -
    lo)``, errs by ``e_j - (1 - u_j) e_lo - u_j e_hi`` in parameter units: its sd from
    ``assess._grid_relative_sd`` (correlations from the standardised influences) against
    200,000 simulated estimates with that covariance (within 3%: the influences' sampling
    error with R = 20,000 records). Absmax: the range is ``+-|theta_1|``; min/max:
    ``[theta_1, theta_3]``."""
    import importlib

    A = importlib.import_module("mis_lightning.assess")
    gen = torch.Generator().manual_seed(4)
    th = torch.tensor([[0.30, -1.10, 0.85, 0.70]], dtype=F64)  # absmax -1.10, max 0.85 (5 sd clear)
    sd = torch.tensor([0.05, 0.04, 0.06, 0.05], dtype=F64)
    corr = torch.tensor([[1.0, 0.5, 0.2, -0.3], [0.5, 1.0, 0.6, 0.4], [0.2, 0.6, 1.0, 0.1],
                         [-0.3, 0.4, 0.1, 1.0]], dtype=F64)
    chol = torch.linalg.cholesky(corr)
    w = torch.randn(20000, 4, generator=gen, dtype=F64) @ chol.T
    g = _affine((-8, 7), 1.1 / 7, 0.0, th.reshape(-1))
    g.reveal(th, rule)
    ii = torch.tensor([0, 3]) if rule == "minmax" else torch.tensor([0, 2, 3])
    got = A._grid_relative_sd(g, th.reshape(-1), sd, w, ii)
    est = th + (torch.randn(200000, 4, generator=gen, dtype=F64) @ chol.T) * sd
    if rule == "absmax":
        m = est.abs().amax(-1, keepdim=True)
        lo, hi, lo0, hi0 = -m, m, -1.10, 1.10
    else:
        lo, hi = est.amin(-1, keepdim=True), est.amax(-1, keepdim=True)
        lo0, hi0 = -1.10, 0.85
    rel = ((est - lo) / (hi - lo) - (th - lo0) / (hi0 - lo0)) * (hi0 - lo0)  # parameter units
    want = rel[:, ii].std(0)
    assert torch.allclose(got, torch.maximum(want, sd[ii]), rtol=0.03), (got, want)
    assert bool((want > 1.1 * sd[ii]).any())  # a test that can fail: the grid's motion matters


def _bounds_inputs(grid, c, gen):
    """``bounded_moments``' arguments for ``c`` weights on a bounded grid (``grid``: a key of
    GRIDS, or ``"float8"``): weights over and a little beyond the bounds, sds from 0.02 to 3
    steps (fine and coarse, inner and end-cell bounds), a tenth of them far from both bounds."""
    if grid == "float8":
        values = torch.tensor(sorted({float(v) for v in torch.arange(256, dtype=torch.uint8)
                                      .view(torch.float8_e4m3fn).float().tolist() if math.isfinite(v)}), dtype=F64)
        lo, hi, s = -1.0, 1.0, 1.0 / 448.0
        g = ParamGrid(name="w", shape=(1, c), kind="table", dequantized=torch.zeros(1, c), bits_per_weight=8.0,
                      scale=torch.tensor([[s]], dtype=F64), block_size=(1, c), values=values)
        step = 32 * s  # the top cells' width
    else:
        qmin, qmax, s, zp, lo, hi = GRIDS[grid]
        step = s
    th = lo + (hi - lo) * (torch.rand(c, generator=gen, dtype=F64) * 1.1 - 0.05)
    sg = step * torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(0.02), math.log(3.0), generator=gen))
    sg[::10] = 1e-4 * step  # far from both bounds (or not: those next to one)
    if grid != "float8":
        g = _affine((qmin, qmax), s, zp, th)
    g.support = (torch.tensor([[lo]], dtype=F64), torch.tensor([[hi]], dtype=F64))
    scale, zp_e, code = g.element_grid(0, c)
    bounds = g.element_bounds(0, c)
    mm = g.element_moments(th, sg, scale, zp_e, code, None)
    low_edge, high_edge, st = g._outer_edges(scale, zp_e)
    return (mm, th, sg, *bounds, low_edge, high_edge, st,
            lambda ii, m: g._edges(th[ii], scale[ii], zp_e[ii], None if code is None else code[ii], m))


@pytest.mark.parametrize("grid", [*sorted(GRIDS), "float8"])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_blocked_bounds_equal_one_pass(grid, kappa_only, monkeypatch):
    """Eager, ``bounded_moments`` corrects large chunks in blocks of ``BLOCK`` elements (cache-
    sized temporaries: 2.3x faster on the 1e6 benchmark MLP's chunks): the numbers of one pass
    over the chunk through every path (end-cell splits over the chunk and on gathered elements,
    inner bounds' fine expansion and clipped windows, far elements), and ``mm`` itself back
    when no element is within reach. Equal but for the last bit of a few elements: torch's
    vectorised ``exp`` / ``ndtr`` and its scalar loop for the last elements of a tensor differ
    by an ulp, and a gathered subset's last elements depend on the block (measured: 2 of
    16,000 m4 values, 1.7e-16 relative; bitwise equal on the 1e6 benchmark's chunks, whose
    every element is cut). Blocks of 64 here, so that the test stays small."""
    import mis_lightning.functional.bounds as B

    gen = torch.Generator().manual_seed(3)
    c = 1000
    args = _bounds_inputs(grid, c, gen)
    monkeypatch.setattr(B, "BLOCK", 1 << 40)
    want = B.bounded_moments(*args, kappa_only=kappa_only)
    calls = []
    inner = B._bounded_moments
    monkeypatch.setattr(B, "_bounded_moments", lambda *a: calls.append(a[1].numel()) or inner(*a))
    monkeypatch.setattr(B, "BLOCK", 64)
    got = B.bounded_moments(*args, kappa_only=kappa_only)
    assert calls == [64] * 15 + [40]
    for a, b in zip((want.kappa, want.mean_abs, want.m4, want.coverage), (got.kappa, got.mean_abs, got.m4, got.coverage)):
        assert torch.equal(a.isnan(), b.isnan())
        a, b = a.nan_to_num(7.0), b.nan_to_num(7.0)
        assert bool(((a - b).abs() <= 1e-15 * a.abs().clamp_min(1.0)).all())  # a few ulps at most
        assert int((a != b).sum()) <= c // 100
    assert not torch.equal(want.kappa, args[0].kappa)  # the correction did something
    # nothing within reach: the grid path's own object, as in one pass
    mm, th, sg = args[:3]
    far = B.bounded_moments(mm, th, sg * 1e-9, *(torch.full_like(th, v) for v in (-1e3, 1e3, -9e2, 9e2)),
                            args[7], args[8], kappa_only=kappa_only)
    assert far is mm


@pytest.mark.parametrize("grid", [*sorted(GRIDS), "float8"])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_sparse_reach_corrects_the_subset_bitwise(grid, kappa_only):
    """A block with fewer than half its elements within reach of a bound (sd-0 weights of dead
    units: 97% of a chunk of the 1e7 benchmark MLP's second layer) is corrected on those
    elements alone: bit for bit the correction over the whole block (``_bounded_block`` with
    every element, the path before), on every path (end-cell splits, inner bounds' fine
    expansion and clipped windows), the other elements untouched."""
    import mis_lightning.functional.bounds as B

    gen = torch.Generator().manual_seed(4)
    c = 1500
    mm, th, sg, lo, hi, le, he, st, edges = _bounds_inputs(grid, c, gen)
    sg = sg.clone()
    sg[torch.rand(c, generator=gen) < 0.7] = 0.0  # frozen: no bound within reach
    reach = B.bounds_in_reach(th, sg, lo, hi)
    assert 0.1 * c < int(reach.sum()) < 0.5 * c
    want = B._bounded_block(mm, th, sg, lo, hi, le, he, st, edges, None, kappa_only, reach, c)
    got = B.bounded_moments(mm, th, sg, lo, hi, le, he, st, edges, kappa_only=kappa_only)
    fields = ("kappa",) if kappa_only else ("kappa", "mean_abs", "m4", "coverage")
    for f in fields:
        a, b = getattr(want, f), getattr(got, f)
        assert torch.equal(a.isnan(), b.isnan()), f
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), f
        assert torch.equal(b[~reach].nan_to_num(7.0), getattr(mm, f)[~reach].nan_to_num(7.0)), f
    assert not torch.equal(got.kappa[reach], mm.kappa[reach])  # the correction did something
