"""The bounded fine form in one pass (``bounds.bounded_fine_moments``, switch
``bounds.FUSED_FINE_MOMENTS``): on an affine grid bounded by the release, a weight on a fine step
with both bounds within reach takes one formula for what the fused kernel's fine form and the
outer-cell split compute in turn. Checked against that two-step form (the switch off: the same
expansion and cut cells, so the same numbers up to the sums' rounding, 1e-14 absolute) on the
per-regime path and the eager fused kernel's, main and kappa-only calls, weights inside and
beyond their bounds; against exact cell sums (no worse than the two-step form); and its gate,
the compiled policy and the ``"auto"`` element count."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import affine, bounds, kernel
from mis_lightning.functional.cells import moments_from_alpha
from mis_lightning.functional.fastpath import GUARD
from mis_lightning.functional.kernel import CompilePolicy
from mis_lightning.quantization.base import ParamGrid

F64 = torch.float64
# the two forms' difference: kappa and mean_abs sum ~10 terms of at most 1 in float64 (a few ulp
# of 1 each); m4 up to 1.7e-13 (measured, steps near 0.5 sd): the two-step form adds the unbounded
# end cell's p mu^4 (mu up to ~8.5: terms up to ~10) and the split takes it away again (1.2e-12
# measured for a draw beyond its lower bound); the expansion's own m4 error is 0.0153 h^6
TOL = {"kappa": 1e-14, "mean_abs": 1e-14, "m4": 1e-11}


def _grid(rows: int, cols: int, qmin: int, qmax: int, seed: int, zero_point: float = 0.0,
          inner: bool = False) -> tuple[ParamGrid, torch.Tensor, torch.Tensor, torch.Generator]:
    """A per-row affine grid (scale ``absmax / qmax``), bounds ``[-absmax, absmax]`` (``inner``:
    ``[-0.8, 0.7] absmax``, inside inner cells), and weights whose sd spans from 1 step to twice
    the grid's span (log-uniform): most on a fine step with both bounds within reach, the others
    (a coarse step, a bound out of reach) on the two-step form alone."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    absmax = w.abs().amax(1, keepdim=True)
    scale = absmax / qmax
    g = ParamGrid(name="w", shape=(rows, cols), kind="affine", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=float(math.log2(qmax - qmin + 1)), scale=scale, block_size=(1, cols),
                  zero_point=torch.full((rows, 1), zero_point, dtype=F64), qmin=qmin, qmax=qmax)
    g.support = (-0.8 * absmax, 0.7 * absmax) if inner else (-absmax, absmax)
    c = rows * cols
    step = scale.expand(rows, cols).reshape(-1)
    top = math.log(2.0 * (qmax - qmin))
    sigma = step * torch.exp(torch.empty(c, dtype=F64).uniform_(0.0, top, generator=gen))
    return g, w.reshape(-1), sigma, gen


def _moments(g: ParamGrid, th: torch.Tensor, sg: torch.Tensor, kappa_only: bool, fused: bool,
             policy: CompilePolicy | None = None):
    c = th.numel()
    scale, zp, _ = g.element_grid(0, c)
    old = bounds.FUSED_FINE_MOMENTS
    bounds.FUSED_FINE_MOMENTS = fused
    try:
        return g.element_moments(th, sg, scale, zp, None, g.element_bounds(0, c), policy or CompilePolicy("never"),
                                 kappa_only=kappa_only)
    finally:
        bounds.FUSED_FINE_MOMENTS = old


@pytest.mark.parametrize("rows, cols", [(16, 250), (64, 600)])  # per-regime path; eager fused kernel
@pytest.mark.parametrize("qmin, qmax, zp, inner", [(-8, 7, 0.0, False), (-128, 127, 0.0, False),
                                                   (0, 15, 7.3, False), (-8, 7, 0.0, True)])
@pytest.mark.parametrize("kappa_only", [False, True])
@pytest.mark.parametrize("drawn", [False, True])
def test_the_fused_form_is_the_two_step_form(monkeypatch, rows, cols, qmin, qmax, zp, inner, kappa_only, drawn):
    g, w, sigma, gen = _grid(rows, cols, qmin, qmax, seed=qmax + cols + int(inner), zero_point=zp, inner=inner)
    assert (rows * cols >= affine.TABLE_MIN_ELEMENTS) == (cols == 600)
    # the trained weights, or the draws' positions (many beyond a bound)
    th = w + sigma * torch.randn(w.numel(), generator=gen, dtype=F64) if drawn else w
    taken = [0]
    real = bounds.bounded_fine_moments

    def counted(*a, **kw):
        taken[0] += a[0].numel()
        return real(*a, **kw)

    monkeypatch.setattr("mis_lightning.quantization.base.bounded_fine_moments", counted)
    ref = _moments(g, th, sigma, kappa_only, fused=False)
    assert taken[0] == 0
    got = _moments(g, th, sigma, kappa_only, fused=True)
    # most weights take it (some steps coarse, some bounds out of reach)
    assert taken[0] >= 0.3 * th.numel()
    assert float((got.kappa - ref.kappa).abs().max()) <= TOL["kappa"]
    if not kappa_only:
        for f in ("mean_abs", "m4"):
            assert float((getattr(got, f) - getattr(ref, f)).abs().max()) <= TOL[f], f
        assert torch.equal(got.coverage, ref.coverage)
    else:  # kappa alone is bitwise the full call's
        full = _moments(g, th, sigma, False, fused=True)
        assert torch.equal(full.kappa, got.kappa)


def _exact(th: float, sd: float, s: float, zp: float, qmin: int, qmax: int, lo: float, hi: float
           ) -> tuple[float, float]:
    """``(kappa, m4)`` by exact cell sums: the grid's cells between the bounds (the outer ones cut
    there) plus the revealed regions' ``E U^2``, ``E U^4``, in sd units."""
    edges = [(k + 0.5 - zp) * s for k in range(qmin, qmax)]
    inside = [e for e in edges if lo < e < hi]
    alpha = torch.tensor([[(x - th) / sd for x in [lo, *inside, hi]]], dtype=F64)
    mm = moments_from_alpha(alpha)
    l_, u_ = (lo - th) / sd, (hi - th) / sd
    phi = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return (float(mm.kappa) + cdf(l_) - l_ * phi(l_) + cdf(-u_) + u_ * phi(u_),
            float(mm.m4) + 3 * cdf(l_) - (l_ ** 3 + 3 * l_) * phi(l_) + 3 * cdf(-u_) + (u_ ** 3 + 3 * u_) * phi(u_))


@pytest.mark.parametrize("qmin, qmax, zp, cut", [(-8, 7, 0.0, (-1.0, 1.0)), (-8, 7, 0.0, (-0.83, 0.61)),
                                                 (0, 15, 7.3, (-0.9, 0.95)), (-128, 127, 0.0, (-1.0, 1.0))])
def test_the_fused_form_against_exact_cell_sums(qmin, qmax, zp, cut):
    """No worse than the two-step form against the exact sums (the fine expansion's error is
    both forms': ``kappa`` within its ``5e-4 h^2``, docs/method.md section 5), on steps of
    0.02-0.5 sd and weights inside and beyond the bounds (those with both bounds in reach)."""
    s = 1.0 / max(-qmin, qmax)
    lo, hi = cut[0], cut[1]
    gen = torch.Generator().manual_seed(qmax)
    th = torch.empty(40, dtype=F64).uniform_(lo - 0.3, hi + 0.3, generator=gen)
    sd = s / torch.exp(torch.empty(40, dtype=F64).uniform_(math.log(0.02), math.log(0.5), generator=gen))
    sd = sd.clamp(min=(hi - lo + 0.6) / 8.0)  # (most with both bounds in reach)
    le, he, st = ((qmin + 0.5 - zp) * s * torch.ones(40, dtype=F64), (qmax - 0.5 - zp) * s * torch.ones(40, dtype=F64),
                  s * torch.ones(40, dtype=F64))
    gate = bounds.fine_kappa_elements(th, sd, st, torch.full_like(th, lo), torch.full_like(th, hi))
    assert int(gate.sum()) >= 30
    k, _, m4 = bounds.bounded_fine_moments(th, sd, st, le, he, torch.full_like(th, lo), torch.full_like(th, hi))
    assert m4 is not None
    g = ParamGrid(name="w", shape=(1, 40), kind="affine", dequantized=torch.zeros(1, 40), bits_per_weight=4.0,
                  scale=torch.tensor([[s]], dtype=F64), block_size=(1, 40),
                  zero_point=torch.tensor([[zp]], dtype=F64), qmin=qmin, qmax=qmax)
    g.support = (torch.tensor([[lo]], dtype=F64), torch.tensor([[hi]], dtype=F64))
    two = _moments(g, th, sd, False, fused=False)
    for i in torch.nonzero(gate).squeeze(-1).tolist():
        ex, ex4 = _exact(float(th[i]), float(sd[i]), s, zp, qmin, qmax, lo, hi)
        h = s / float(sd[i])
        assert abs(float(k[i]) - ex) <= abs(float(two.kappa[i]) - ex) + TOL["kappa"], (i, h)
        assert abs(float(k[i]) - ex) <= 5e-4 * h ** 2 + 1e-13, (i, h)
        assert abs(float(m4[i]) - ex4) <= abs(float(two.m4[i]) - ex4) + TOL["m4"], (i, h)


def test_the_gate():
    c = 8
    th = torch.zeros(c, dtype=F64)
    st = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.1], dtype=F64)
    lo, hi = torch.full((c,), -1.0, dtype=F64), torch.full((c,), 1.0, dtype=F64)
    sg = torch.tensor([1.0, 0.0, math.nan, 0.19, 0.2, 0.1176, 0.118, 1.0], dtype=F64)
    lo[7] = 2.0  # lower >= upper
    got = bounds.fine_kappa_elements(th, sg, st, lo, hi).tolist()
    # sd 0 and NaN fail; a step above 0.5 sd (0.19) fails, at 0.5 sd (0.2) passes; bounds 1 / 0.1176
    # = 8.503 sd away fail (beyond CUTOFF_SIGMAS), 1 / 0.118 = 8.47 pass; empty bounds fail
    assert got == [True, False, False, False, True, False, True, False]


def test_a_compiling_policy_keeps_every_element_on_the_kernels():
    g, w, sigma, _ = _grid(64, 600, -8, 7, seed=3)
    c = w.numel()
    scale, zp, _ = g.element_grid(0, c)
    args = (w, sigma, scale, zp, None, g.element_bounds(0, c))
    assert g._fine_moments(*args, CompilePolicy("never"), False, None) is not None
    assert g._fine_moments(*args, CompilePolicy("always"), False, None) is None
    before = kernel._FUSED_STATE["elements"], kernel._FUSED_STATE["failed"]
    try:
        kernel._FUSED_STATE["elements"] = 0
        assert g._fine_moments(*args, CompilePolicy("auto", after=c - 1), False, None) is None
        # a compile that failed (or a self-check that disabled the compiled kernel): eager, fused
        kernel._FUSED_STATE["failed"] = True
        assert g._fine_moments(*args, CompilePolicy("always"), False, None) is not None
    finally:
        kernel._FUSED_STATE["elements"], kernel._FUSED_STATE["failed"] = before
    assert kernel.COMPILED_PATH not in GUARD.disabled


def test_the_auto_count_is_the_kernels():
    """A call the fused form takes whole counts its elements towards ``"auto"``'s threshold as
    the fused kernel would (a compile decision unchanged)."""
    g, w, sigma, _ = _grid(64, 600, -8, 7, seed=5)
    sigma = sigma.clamp(max=3.0 * g.scale.amax())  # every bound within reach: all taken
    before = kernel._FUSED_STATE["elements"]
    try:
        counts = []
        for fused in (False, True):
            kernel._FUSED_STATE["elements"] = 0
            _moments(g, w, sigma, True, fused=fused, policy=CompilePolicy("auto"))
            counts.append(kernel._FUSED_STATE["elements"])
        assert counts[0] == counts[1] == w.numel()
    finally:
        kernel._FUSED_STATE["elements"] = before


@pytest.mark.parametrize("qmin, qmax, zp, s", [(-8, 7, 0.0, 0.1), (0, 15, 7.3, 0.1), (-128, 127, 0.0, 0.0123)])
@pytest.mark.parametrize("fused", [False, True])
def test_a_bound_an_ulp_off_a_grid_edge(qmin, qmax, zp, s, fused):
    """A release bound within an ulp of an inner grid edge (either side, either bound): the edge
    index ``ceil((lo - le) / step)`` rounds onto the edge the bound misses, and the two forms read
    the cell below it unrevealed (two-step form: kappa 0.11 against 0.9998 exact) or merged two
    cells (an index's ``le + K step`` an ulp above the end edge ``he``: 1.3e-3 low, both forms).
    Against exact cell sums within the fine expansion's ``5e-4 h^2`` (docs/method.md section 5), the
    weights on a step of 1/3 sd around the edge; the bound's ulp moves the exact value by ~1e-16."""
    edges = [(k + 0.5 - zp) * s for k in range(qmin, qmax)]
    sd, n = 3.0 * s, 7
    g = ParamGrid(name="w", shape=(1, n), kind="affine", dequantized=torch.zeros(1, n), bits_per_weight=4.0,
                  scale=torch.tensor([[s]], dtype=F64), block_size=(1, n),
                  zero_point=torch.tensor([[zp]], dtype=F64), qmin=qmin, qmax=qmax)
    worst = 0.0
    for i in sorted({*range(1, len(edges) - 1, max(1, (len(edges) - 2) // 12)), len(edges) - 2}):
        for lower in (True, False):
            for toward in (-math.inf, math.inf):
                v = math.nextafter(edges[i], toward)
                lo, hi = ((v, min(edges[-1] + 0.3 * s, v + 8.0 * sd)) if lower
                          else (max(edges[0] - 0.3 * s, v - 8.0 * sd), v))
                g.support = (torch.tensor([[lo]], dtype=F64), torch.tensor([[hi]], dtype=F64))
                th = torch.tensor([edges[i] + (j - 3) * 0.7 * sd for j in range(n)], dtype=F64)
                got = _moments(g, th, torch.full((n,), sd, dtype=F64), False, fused=fused).kappa
                for j in range(n):
                    worst = max(worst, abs(float(got[j]) - _exact(float(th[j]), sd, s, zp, qmin, qmax, lo, hi)[0]))
    assert worst <= 5e-4 * (1 / 3) ** 2, worst
