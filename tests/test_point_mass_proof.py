"""The sd-0 point-mass test proven per chunk (``quantization.base.POINT_MASS_PROOF``, p47b):
``ParamGrid._proven_point_mask`` (affine grids and float8's table with per-row / per-group scales,
whole rows) and ``ParamGrid._unit_format_inside`` (the bf16 / fp16 casts) must give exactly the
mask of the per-element test ``ParamGrid._inside`` (booleans, no tolerance) on weights placed
where a careless proof breaks: on their own cell's edges, the margin (1e-9 of a cell) and the
proof's slack on either side of it, an ulp and a float32 rounding from the edges (torch casts to
these formats through float32), the next cells, far outside the code range, on and just inside
the bounds the release gives, NaN, +-inf, the formats' overflow; sd-0 and live weights mixed, on
the whole tensor and on a range of rows. ``point_masses_at`` gives the same answer with the
proof on and off (where it says ``None`` too). Mutations that fail here: the slack at 0, the
float32 step in ``format_cell_bits`` left out, the unproven weights' test read from the proof's
mask instead of the sd-0 one."""

import math

import pytest
import torch

import mis_lightning.quantization.base as B
from mis_lightning.functional import point_proof as P
from mis_lightning.quantization import get_scheme

F64 = torch.float64


def _grid(scheme: str, scale: float = 1.0):
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 64, generator=gen) * torch.logspace(-3, 0, 16).unsqueeze(1) * scale)
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    return g, lin.weight.detach().reshape(-1).to(F64)


def _edges(g, th: torch.Tensor):
    """``(scale, lo, hi, bounds)`` of the weights ``th`` (the whole tensor): the float64 scale, their
    code's cell's edges, the release's bounds (``None``: none)."""
    scale, zp, code, _, bounds = g._chunk_grid(0, th.numel())
    s = scale.to(F64)
    return (s, *g._own_edges(th, s, zp, code), bounds)


def _counted_inside(g, monkeypatch):
    """``(the grid's own _inside, a list of the element counts it is then called with)``."""
    tested: list[int] = []
    inside = g._inside
    monkeypatch.setattr(g, "_inside", lambda *a: tested.append(a[0].numel()) or inside(*a))
    return inside, tested


def _variants(g, th: torch.Tensor) -> list[torch.Tensor]:
    """Weights at the positions listed in the module docstring, each replacing every other weight."""
    c = th.numel()
    s, lo, hi, bounds = _edges(g, th)
    m, sl = B._POINT_MASS_MARGIN, P.PROOF_SLACK
    out = []
    for e, sign in ((lo, 1.0), (hi, -1.0)):
        fin = torch.isfinite(e)
        for f in (0.0, 0.5 * m, m, 1.5 * m, m + 0.5 * sl, m + sl, m + 2 * sl, 4 * m, 1e-7, 1e-5, -m, -1e-5):
            out.append(torch.where(fin, e + sign * f * s, th))
        out.append(torch.where(fin, e.float().to(F64), th))  # the edge rounded to float32 (a float32 weight on it)
        out.append(torch.where(fin, torch.nextafter(e, e + sign), th))
        out.append(torch.where(fin, torch.nextafter(e, e - sign), th))
        out.append(torch.where(fin, torch.nextafter(e.float(), (e + sign).float()).to(F64), th))
    out += [th + 300 * s, th - 300 * s, torch.full_like(th, 1e20), torch.full_like(th, math.nan),
            torch.full_like(th, math.inf), torch.full_like(th, -math.inf)]
    if bounds is not None:
        for b, inward in ((bounds[0], 1.0), (bounds[1], -1.0)):
            out += [b.clone(), torch.nextafter(b, b + inward), b + inward * m * s, b + inward * 2 * m * s,
                    b + inward * (m + 2 * sl) * s, b - inward * m * s]
    keep = torch.arange(c) % 2 == 0
    return [th] + [torch.where(keep, th, v) for v in out]


def _zero(c: int) -> torch.Tensor:
    return torch.arange(c) % 5 != 3  # sd 0 but on every fifth weight (live)


@pytest.mark.parametrize("scheme", ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32",
                                    "intx_weight_only_int4_g32_asym", "float8_weight_only",
                                    "float8_weight_only+asym_bounds", "rtn_int4"])
@pytest.mark.parametrize("any_cell", [True, False], ids=["any-cell", "code-cell"])
@pytest.mark.parametrize("f32", [True, False], ids=["f32", "f64"])
def test_proven_mask_equals_the_test(scheme, any_cell, f32, monkeypatch):
    """With ``POINT_MASS_ANY_CELL`` the per-element test is on the nearest cell (no codes).
    ``+asym_bounds``: float8's lower bounds moved out by a quarter (its absmax bounds are
    symmetric), so that a table takes ``bounds_gap``'s two-sided terms too. ``f32``: the proof's
    ``G`` in float32 (``point_proof.PROOF_FLOAT32``; with the error bound at 0 this fails)."""
    monkeypatch.setattr(B, "POINT_MASS_ANY_CELL", any_cell)
    monkeypatch.setattr(P, "PROOF_FLOAT32", f32)
    scheme, _, asym = scheme.partition("+")
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    g, th = _grid(scheme)
    if asym:
        g.support = (g.support[0] * 1.25, g.support[1])
        assert not g._point_proof_layout()[5]  # (not symmetric)
    c = th.numel()
    assert g._point_proof_layout() is not None  # (the proof applies to each of these releases)
    zero = _zero(c)
    scale, zp, code, _, bounds = g._chunk_grid(0, c)
    inside, tested = _counted_inside(g, monkeypatch)
    for i, t in enumerate(_variants(g, th)):
        want = zero & inside(t, scale, zp, None if any_cell else code, bounds)
        tested.clear()
        point, whole, count = g._proven_point_mask(t.contiguous(), zero, 0, c, int(zero.sum()))
        assert torch.equal(point, want), (i, t[point != want][:4])
        assert count is None or count == int(point.sum())
        if i == 0:  # the weights themselves: proven but the revealed ones, in one reduction
            assert whole and sum(tested) <= max(1, int(g.revealed.sum())) and 0 < count < int(zero.sum())
        # a range of rows (offsets into the per-block tensors and codes)
        a, b = 4 * 64, 12 * 64
        sub = g._proven_point_mask(t[a:b].contiguous(), zero[a:b], a, b)
        assert sub is not None and torch.equal(sub[0], want[a:b]), i
    # not whole rows, or another dtype: not applicable (the caller's own test)
    assert g._proven_point_mask(th[3:67].contiguous(), zero[3:67], 3, 67) is None
    assert g._proven_point_mask(th.float(), zero, 0, c) is None


@pytest.mark.parametrize("into", [False, True])
def test_bounds_gap_is_the_two_bounds_terms(into):
    """``point_proof.bounds_gap`` against its formula written out, bitwise: two-sided bounds and
    symmetric ones (``|th|``, computed in the caller's temporary where given), maxed into a tensor
    or new; NaN and infinite weights propagate."""
    gen = torch.Generator().manual_seed(3)
    th = torch.randn(6, 5, 8, generator=gen, dtype=F64) * 3
    th[0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    inv = torch.rand(6, 5, 1, generator=gen, dtype=F64) + 0.5
    lower, upper = -torch.rand(6, 5, 1, generator=gen, dtype=F64) * 4, torch.rand(6, 5, 1, generator=gen, dtype=F64) * 4
    base = torch.randn(6, 5, 8, generator=gen, dtype=F64).abs()
    for lo, sym in ((lower, False), (-upper, True)):
        want = torch.maximum((th - upper) * inv, (lo - th) * inv)
        if into:
            want = torch.maximum(base, want)
        for abs_th in ((None, th.abs()) if sym else (None,)):
            got = P.bounds_gap(th, inv, lo, upper, sym, into=base.clone() if into else None, abs_th=abs_th)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), (sym, into)
    assert bool(want.isnan().any())


@pytest.mark.parametrize("scheme", ["int8_weight_only", "float8_weight_only", "intx_weight_only_int4_g32_asym"])
def test_point_masses_at_is_the_same_with_the_proof(scheme, monkeypatch):
    """Whole answers (``None`` where some sd-0 weight is neither a point mass nor revealed)."""
    pytest.importorskip("torchao")
    g, th = _grid(scheme)
    c = th.numel()
    sd = (~_zero(c)).to(F64) * 0.01
    for t in _variants(g, th)[:: 3]:
        got = {}
        for on in (True, False):
            monkeypatch.setattr(B, "POINT_MASS_PROOF", on)
            B.release_chunk_facts()
            got[on] = g.point_masses_at(t.contiguous(), sd, 0, c)
        assert (got[True] is None) == (got[False] is None)
        assert got[True] is None or torch.equal(got[True], got[False])


@pytest.mark.parametrize("scheme", ["int8_weight_only", "float8_weight_only", "rtn_int4"])
@pytest.mark.parametrize("proof", [True, False])
def test_point_masses_at_answers_only_when_the_rest_is_revealed(scheme, proof, monkeypatch):
    """Every weight sd 0: the weights themselves are point masses but the revealed ones (each
    block's absmax on its bound), so the answer is that mask; one unrevealed weight put on its own
    cell's edge (not a point mass, not revealed) leaves it to the paths: ``None``. Proof on and
    off (``ParamGrid._rest_revealed``, read by both: a version that ignores the revealed mask
    answered the second case)."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    monkeypatch.setattr(B, "POINT_MASS_PROOF", proof)
    g, th = _grid(scheme)
    c = th.numel()
    sd = torch.zeros(c, dtype=F64)
    rev = g.revealed.reshape(-1)
    B.release_chunk_facts()
    point = g.point_masses_at(th, sd, 0, c)
    assert point is not None and torch.equal(point, ~rev)
    _, lo, _, bounds = _edges(g, th)
    j = int(torch.nonzero(~rev & torch.isfinite(lo) & (lo > bounds[0]))[0])
    t = th.clone()
    t[j] = lo[j]
    B.release_chunk_facts()
    assert g.point_masses_at(t, sd, 0, c) is None


@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
def test_unit_format_inside_equals_the_test(scheme, monkeypatch):
    g, th = _grid(scheme, scale=3.0)
    c = th.numel()
    scale, zp, code, _, bounds = g._chunk_grid(0, c)
    assert bounds is None and g._unit_format_inside(th, scale, zp, code) is not None
    fmt = torch.bfloat16 if scheme == "bf16" else torch.float16
    fi = torch.finfo(fmt)
    extra = torch.tensor([0.0, -0.0, fi.tiny * fi.eps / 2, fi.tiny * fi.eps / 2 + 2e-9, 1e-9, 2e-9, 1e-40,
                          fi.max, fi.max + 2.0 ** (math.log2(fi.max) - 8), 65519.0, 65520.0, 65521.0, 1e30,
                          2.0 ** 30 + 2.0 ** 22, 2.0 ** 30 + 2.0 ** 22 + 1.0], dtype=F64)
    inside = g._inside
    for t in _variants(g, th) + [torch.cat([extra, -extra, th[2 * extra.numel():]])]:
        want = inside(t, scale, zp, code, None)
        got = g._unit_format_inside(t, scale, zp, code)
        assert torch.equal(got, want), t[got != want][:4]
    # the weights themselves: nearly all proven (not a float32 weight within float32's rounding of
    # a midpoint: ~2^-12 of them for fp16)
    _, tested = _counted_inside(g, monkeypatch)
    g._unit_format_inside(th, scale, zp, code)
    assert sum(tested) <= 0.01 * c


def test_the_proof_needs_its_layout():
    """Codes beyond PROOF_MAX_CELLS, a non-positive scale: no proof (the per-element test)."""
    pytest.importorskip("torchao")
    g, th = _grid("intx_weight_only_int4")
    g.codes = g.codes.clone()
    g.codes.view(-1)[0] = 100
    assert g._point_proof_layout() is not None  # (100 cells: within PROOF_MAX_CELLS)
    g.codes = g.codes.to(torch.int32)
    g.codes.view(-1)[0] = 1 << 20
    assert g._point_proof_layout() is None
    g, th = _grid("int8_weight_only")
    g.scale = -g.scale
    assert g._point_proof_layout() is None


@pytest.mark.parametrize("scheme", ["int8_weight_only", "intx_weight_only_int4_g32_asym", "rtn_int4"])
def test_a_weight_outside_its_codes_cell_is_a_point_mass_on_every_path(scheme, monkeypatch):
    """``POINT_MASS_ANY_CELL`` (p47e): sd-0 weights put outside the cell of their (kept) backend
    code, by torchao's float32 rounding (2e-6, 1e-5 cells), up to ``kernel.OWN_CELL_SLACK`` and
    beyond it (the exact sums' business), a third of a cell, and around the margin of the next
    edge; and beyond the release's bounds. Every weight the mask counts as a point mass must get
    exactly ``(0, 0, 0, 1)`` from the grid paths with the backend's codes (point-mass closed form
    off), in the pool protocol (``kappa_only``) and at draws located without codes; the ones outside
    their code's cell by 2e-6 to 0.3 cells must be counted. No tolerance: a point mass's moments
    are exact zeros on every path. Fails when the bounds' term is dropped (weights beyond a bound:
    kappa 1, revealed) or the cell is read from the code (the weights outside it not counted)."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    monkeypatch.setattr(B, "POINT_MASS_ANY_CELL", True)
    g, th = _grid(scheme)
    c = th.numel()
    s, lo, hi, bounds = _edges(g, th)
    m = B._POINT_MASS_MARGIN
    sd = torch.where(torch.arange(c) // 64 == 3, 0.3 * s, torch.zeros_like(s))  # one live row
    zero = sd == 0
    outside = (2e-6, 1e-5, 1e-4, 5e-4, 0.3)
    pos = [-f for f in outside] + [-0.5 * m, -m, -2 * m, 0.5 * m, 2 * m, 1e-7]
    counted = 0
    for e, sign in ((lo, 1.0), (hi, -1.0)):
        # (not the weights the release gives away, scored unquantized wherever they are put)
        fin = torch.isfinite(e) & zero & (torch.arange(c) % 3 == 0) & ~g.revealed.reshape(-1)
        for f in pos:
            t = torch.where(fin, e + sign * f * s, th)
            t = torch.where(fin & (torch.arange(c) % 2 == 0), bounds[1] + 0.3 * s, t)  # beyond the upper bound
            if scheme.endswith("asym"):
                t = torch.where(fin & (torch.arange(c) % 7 == 0), bounds[0] - 1e-5 * s, t)
            point = g._proven_point_mask(t.contiguous(), zero, 0, c)[0]
            monkeypatch.setattr(B, "POINT_MASS_CLOSED_FORM", False)
            for kw in (dict(theta=t, sigma=sd), dict(theta=t, sigma=sd / 2 ** 0.5, kappa_only=True),
                       dict(theta=t, sigma=sd, use_codes=False)):
                B.release_chunk_facts()
                ref = g.moments(start=0, end=c, **kw)
                fields = ("kappa",) if kw.get("kappa_only") else ("kappa", "mean_abs", "m4", "coverage")
                for name, v in zip(fields, (0.0, 0.0, 0.0, 1.0)):
                    got = getattr(ref, name)[point]
                    assert bool((got == v).all()), (scheme, f, name, got[got != v][:4])
            moved = fin & (t != th)
            if f in [-x for x in outside]:
                within = (t < bounds[1] - 1e-8 * s) & (t > bounds[0] + 1e-8 * s)
                assert bool(point[moved & within].all()), (scheme, f)
                counted += int((point & moved).sum())
            assert not bool(point[t > bounds[1]].any())
    assert counted > 0


@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
def test_the_format_proof_on_blocks_is_the_proof_on_the_chunk(scheme, monkeypatch):
    """``point_proof.PROOF_BLOCKS`` (p49c): the casts' proof on blocks of ``PROOF_BLOCK`` weights
    gives the whole chunk's answer (``None`` where every weight is proven, else the same mask) and
    ``_unit_format_inside`` the per-element test's mask, on chunks of several blocks where the
    unproven weights (the variants above: edges, margins, NaN, overflow) fall in the first, a middle
    or the last block only, or nowhere; the blocks are the proof's own (fails with the switch off:
    the casts see the whole chunk)."""
    g, th = _grid(scheme, scale=3.0)
    scale1, zp1, code1, _, _ = g._chunk_grid(0, th.numel())
    fmt = torch.bfloat16 if scheme == "bf16" else torch.float16
    nb = 4
    c = nb * P.PROOF_BLOCK + 1000
    reps = -(-c // th.numel())
    base = th.repeat(reps)[:c]
    ones, zeros = torch.ones(c, dtype=F64), torch.zeros(c, dtype=F64)
    inside = g._inside
    bad = torch.cat([v[v != th] for v in _variants(g, th)[1:]])
    real = P._cell_ends  # (format_cell_bits' ends: formed per block, once for every format asked)
    seen: list[int] = []
    monkeypatch.setattr(P, "_cell_ends", lambda x, *a: seen.append(x.numel()) or real(x, *a))
    for where in (None, 0, 2, nb):
        t = base.clone()
        if where is not None:
            a = where * P.PROOF_BLOCK
            n = min(bad.numel(), c - a)
            t[a:a + n] = bad[:n]
        seen.clear()
        monkeypatch.setattr(P, "PROOF_BLOCKS", True)
        P.release_shared_proofs()
        got = P.format_cell_proven_abs(t, fmt, B._POINT_MASS_MARGIN)
        assert max(seen) == P.PROOF_BLOCK and len(seen) == nb + 1
        monkeypatch.setattr(P, "PROOF_BLOCKS", False)
        ref = P.format_cell_proven(t.abs(), fmt, B._POINT_MASS_MARGIN)
        assert (got is None) == (ref is None) == (where is None and not _has_tie(t, g, fmt))
        if ref is not None:
            assert torch.equal(got, ref)
        monkeypatch.setattr(P, "PROOF_BLOCKS", True)
        want = inside(t, ones, zeros, None, None)
        assert torch.equal(g._unit_format_inside(t, ones, zeros, None), want)
    assert code1 is None and bool((scale1 == 1).all()) and bool((zp1 == 0).all())


def _has_tie(t: torch.Tensor, g, fmt) -> bool:
    """Whether some weight is not proven by the chunk's proof (a float32 weight within float32's
    rounding of a midpoint)."""
    return P.format_cell_proven(t.abs(), fmt, B._POINT_MASS_MARGIN) is not None


@pytest.mark.parametrize("cells", [8.0, 128.0, 2.0**16])
@pytest.mark.parametrize("zero_point", [False, True])
def test_f32_gap_error_bounds_the_float32_gap(cells, zero_point):
    """``point_proof.gap_cells_f32``'s ``G`` (float32) against ``affine_inside_gap``'s (float64,
    within ~1e-11 cells of the exact: its module docstring) on weights spread over a grid of
    ``cells`` cells each side and packed near the cells' midpoints and the bounds, float32 scales
    from 2^-60 to 2^40, symmetric and two-sided bounds: wherever the float32 ``G`` is below 1/2 it
    is within ``f32_gap_error(cells)`` of the float64 one (the bound the proof subtracts from its
    limit), and the bound is not loose by more than ~50x (the largest error seen is above
    1/50 of it at 2^16 cells)."""
    gen = torch.Generator().manual_seed(7)
    rows, k = 64, 256
    s = torch.exp2(torch.randint(-60, 40, (rows, 1, 1), generator=gen).to(F64)) \
        * (1 + torch.rand(rows, 1, 1, generator=gen, dtype=F64))
    s = s.float().to(F64)  # (a float32 scale, as the backends')
    z = torch.randint(-int(cells) // 4, int(cells) // 4 + 1, (rows, 1, 1), generator=gen).to(F64) if zero_point else None
    zz = torch.zeros_like(s) if z is None else z
    hi, lo = (cells - zz) * s, -(cells + zz) * s
    x = (torch.rand(rows, 1, k, generator=gen, dtype=F64) * 2 - 1) * (cells + 1)
    mid = torch.round(x[..., : k // 2]) + 0.5 - torch.rand(rows, 1, k // 2, generator=gen, dtype=F64) * 1e-4
    x = torch.cat([mid, x[..., k // 2:]], -1)
    x[:, :, :8] = cells - 0.5 - torch.rand(rows, 1, 8, generator=gen, dtype=F64) * 1e-3  # near the upper bound
    th = ((x - zz) * s).float().to(F64)  # (float32 weights, as the estimates')
    worst = 0.0
    for sym in (True, False):
        lo_b = -hi if sym else lo
        lower, upper = lo_b + 0.5 * s, hi - 0.5 * s
        inv = 1.0 / s
        g64 = P.affine_inside_gap(th, inv, None, z, lower, upper, sym)
        g32 = P.gap_cells_f32(th.float(), inv.float(), None if z is None else z.float(), (lower * inv).float(),
                              (upper * inv).float(), sym).to(F64)
        err = P.f32_gap_error(max(float((lower * inv).abs().max()), float((upper * inv).abs().max()),
                                  0.0 if z is None else float(z.abs().max())))
        low = g32 < 0.5
        assert int(low.sum()) > rows * k // 2
        gap = (g32 - g64).abs()[low]
        assert float(gap.max()) <= err, (sym, float(gap.max()), err)
        worst = max(worst, float(gap.max()) / err)
    if cells == 2.0**16:
        assert worst > 1 / 50


def test_unproven_weights_are_the_weights_not_proven():
    """``point_proof.unproven_weights`` against ``nonzero(~(g < limit) | ~own)``: few runs left
    (the per-run search), many (the whole), a length no run of 16 divides, NaN, float32 and
    float64, with and without ``own``."""
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, F64):
        for c, n_bad in ((1 << 14, 3), (1 << 14, 4000), (1000 * 3, 5), (1 << 12, 0)):
            g = torch.rand(c, generator=gen, dtype=dtype) * 0.4
            bad = torch.randperm(c, generator=gen)[:n_bad]
            g[bad] = 0.45 + torch.rand(n_bad, generator=gen, dtype=dtype) * 0.1
            if n_bad:
                g[bad[0]] = math.nan
            limit = 0.5 - 1e-6
            for own in (None, torch.rand(c, generator=gen) > 1e-3):
                want = ~(g < limit) if own is None else ~(g < limit) | ~own
                got = P.unproven_weights(g.clone(), limit, own)
                assert torch.equal(got, torch.nonzero(want).squeeze(-1)), (dtype, c, n_bad, own is None)
