"""Fast cell moments of real grids against the full cell sum (method.md section 5).

``affine_cell_moments`` and ``table_cell_moments`` skip frozen elements, use the fine-grid
expansion where the grid is fine and uniform, and otherwise sum over the edges within 8.5
sigma. The reference is :func:`cell_statistics` on a window wide enough to hold every edge
within ~12 sigma (``affine_boundaries`` / ``table_boundaries``).

Tolerances:

* exact-sum elements: ``1e-10`` (float64 sums of <= ~1000 terms; edges beyond 8.5 sigma
  carry < 1e-15 of kappa) -- measured <= 2e-13 for kappa, 8e-12 for m4;
* fine-grid expansion (step ``h <= 0.5`` sd): ``kappa = 1 - h^2/12 + h^4/144`` is the
  series of ``1 / (1 + h^2/12)``, so its error is ``h^6/1728 = 5.79e-4 h^6`` to leading
  order: the documented bound ``6e-4 h^6`` is checked (measured 5.79e-4 h^6 at worst);
  ``lam`` within ``0.05 h^2`` (it moves with theta's position in its cell: measured
  0.04999998 h^2) and ``m4`` within ``0.1 h^4`` (measured 0.084 h^4); each plus the
  rounding of the reference sum (1e-10 for kappa, 1e-6 for m4 at the smallest steps).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mis_lightning.functional import (
    affine_boundaries,
    affine_cell_moments,
    affine_codes,
    cell_statistics,
    fine_grid_moments,
    table_boundaries,
    table_cell_moments,
)
from mis_lightning.functional.grids import CUTOFF_SIGMAS, FINE_STEP

F64 = torch.float64
EXACT = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is as fast and avoids OpenMP barriers on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _log_uniform(c, lo, hi, gen):
    return torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(lo), math.log(hi), generator=gen))


def _reference_affine(theta, sigma, scale, zp, qmin, qmax, code=None, half_window=None):
    """Full cell sum on ``affine_boundaries``; by default each element gets a window of
    ``ceil(12 / h) + 2`` edges each side (12 sd; grouped by size to save memory)."""
    if half_window is not None:
        b = affine_boundaries(theta, scale, zp, qmin, qmax, half_window, code=code)
        return cell_statistics(theta, sigma, b)
    need = torch.ceil(12.0 / (scale / sigma.clamp_min(1e-300))).clamp(max=700) + 2
    out = {f: torch.empty(theta.shape[0], dtype=F64) for f in ("kappa", "mean_abs", "m4", "coverage")}
    lo = 0
    for hw in (16, 32, 64, 128, 256, 702):
        sel = (need > lo) & (need <= hw)
        lo = hw
        if bool(sel.any()):
            s = _reference_affine(theta[sel], sigma[sel], scale[sel], zp[sel], qmin, qmax,
                                  None if code is None else code[sel], half_window=hw)
            for f, t in out.items():
                t[sel] = getattr(s, f)
    return type("Ref", (), out)


# =========================================================================== affine grids


AFFINE_CASES = {
    # name: (qmin, qmax, weight range in units of scale, zero-point range)
    "int4-clamped": (-8, 7, 14.0, 3),  # many weights beyond the code range
    "int8": (-128, 127, 140.0, 10),
    "uint8-zp": (0, 255, 140.0, 128),
    "int2": (-2, 1, 4.0, 1),
}


@pytest.mark.parametrize("case", list(AFFINE_CASES))
def test_affine_matches_full_cell_sum(case):
    qmin, qmax, reach, zp_range = AFFINE_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    c = 10_000
    scale = _log_uniform(c, 1e-3, 1.0, gen)
    h = _log_uniform(c, 0.02, 100.0, gen)  # grid step in standard deviations
    h[: c // 10] = torch.empty(c // 10, dtype=F64).uniform_(0.02, 0.5, generator=gen)  # fine
    sigma = scale / h
    if case == "uint8-zp":
        zp = torch.randint(100, 157, (c,), generator=gen).to(F64)
    else:
        zp = torch.randint(-zp_range, zp_range + 1, (c,), generator=gen).to(F64)
    theta = (torch.empty(c, dtype=F64).uniform_(-reach, reach, generator=gen) + 0.0) * scale
    if case == "uint8-zp":
        theta = (torch.empty(c, dtype=F64).uniform_(-140, 140, generator=gen)) * scale
    fast = affine_cell_moments(theta, sigma, scale, zp, qmin, qmax)
    ref = _reference_affine(theta, sigma, scale, zp, qmin, qmax)
    # Elements that may use the fine expansion: step <= 0.5 sd and the code range ends
    # beyond 8.5 sd; every other element must match the full sum.
    to_min = (theta - (qmin + 0.5 - zp) * scale) / sigma
    to_max = ((qmax - 0.5 - zp) * scale - theta) / sigma
    fine = (h <= FINE_STEP) & (to_min > CUTOFF_SIGMAS) & (to_max > CUTOFF_SIGMAS)
    exact = h > FINE_STEP
    assert exact.sum() > c // 2
    for name in ("kappa", "mean_abs", "m4", "coverage"):
        err = (getattr(fast, name) - getattr(ref, name)).abs()
        assert err[exact].max() <= EXACT, (name, err[exact].max())
    if bool(fine.any()):
        hf = h[fine]
        assert ((fast.kappa - ref.kappa).abs()[fine] <= 6e-4 * hf**6 + EXACT).all()
        assert ((fast.mean_abs - ref.mean_abs).abs()[fine] <= 0.05 * hf**2 + 1e-12).all()
        assert ((fast.m4 - ref.m4).abs()[fine] <= 0.1 * hf**4 + 1e-6).all()
    # Fine steps next to the end of the code range (clamping): fine interior + exact end
    # cells. Measured worst errors over h in (0.02, 0.5] (four code ranges): kappa
    # 3.7e-4 h^2, lam 0.098 h^2, m4 0.021 h^2; the bounds leave ~25% headroom.
    near_end = (h <= FINE_STEP) & ~fine
    if case in ("int4-clamped", "int2"):
        assert near_end.sum() > 100
    if bool(near_end.any()):
        hn = h[near_end]
        assert ((fast.kappa - ref.kappa).abs()[near_end] <= 5e-4 * hn**2 + EXACT).all()
        assert ((fast.mean_abs - ref.mean_abs).abs()[near_end] <= 0.125 * hn**2 + 1e-12).all()
        assert ((fast.m4 - ref.m4).abs()[near_end] <= 0.03 * hn**2 + 1e-6).all()


def test_fine_expansion_error_bound():
    """Worst error of the fine-grid expansion over steps in (0, 0.5] and positions in the cell."""
    hs = torch.linspace(0.02, 0.5, 97, dtype=F64)
    pos = torch.linspace(0.0, 1.0, 41, dtype=F64)[:-1]
    h = hs.repeat_interleave(pos.numel())
    theta = pos.repeat(hs.numel()) * h  # sigma = 1, scale = h: theta anywhere in cell 0
    sigma = torch.ones_like(h)
    zp = torch.zeros_like(h)
    big = 10**6  # code range far away: an infinite uniform grid
    fast = affine_cell_moments(theta, sigma, h, zp, -big, big)
    ref = _reference_affine(theta, sigma, h, zp, -big, big, half_window=int(12 / 0.02) + 2)
    assert torch.allclose(ref.coverage, torch.ones_like(ref.coverage), atol=1e-14)
    expansion = fine_grid_moments(h)
    assert torch.equal(fast.kappa, expansion.kappa)  # the fast path took the expansion
    kerr = (fast.kappa - ref.kappa).abs()
    # Leading error term h^6/1728 = 5.787e-4 h^6 (kappa ~ 1/(1 + h^2/12)); reference
    # rounding ~5e-11 at the smallest steps (~1000 cells summed).
    assert (kerr <= 6e-4 * h**6 + 1e-10).all(), (kerr / h**6).max()
    large = h >= 0.2  # where h^6 dominates the rounding: the constant is 1/1728
    assert (kerr[large] / h[large] ** 6).max().item() == pytest.approx(1 / 1728, rel=0.03)
    assert kerr.max() <= 1e-5  # the figure quoted in grids.py (8.8e-6 at h = 0.5)
    # E|m|: the fast path's is exact (the distance to the nearest edge, kernel.affine_fine_mean_abs;
    # the reference's rounding ~3e-13); the expansion's own is an average over the position in the
    # cell, off by up to 0.05 h^2 (the bound is tight: E|m| does move with position)
    assert (fast.mean_abs - ref.mean_abs).abs().max() <= 1e-12
    lerr = (expansion.mean_abs - ref.mean_abs).abs()
    assert (lerr <= 0.05 * h**2 + 1e-12).all()
    assert (lerr / h**2).max() > 0.045
    assert ((fast.m4 - ref.m4).abs() <= 0.1 * h**4 + 1e-6).all()


def test_affine_boundary_ties_and_backend_codes():
    """Weights exactly on an edge: round-half-even by default, or the backend's own code."""
    gen = torch.Generator().manual_seed(11)
    c = 4000
    qmin, qmax = -128, 127
    scale = _log_uniform(c, 1e-3, 1.0, gen)
    sigma = scale / _log_uniform(c, 0.6, 50.0, gen)
    zp = torch.randint(-5, 6, (c,), generator=gen).to(F64)
    q = torch.randint(-100, 100, (c,), generator=gen).to(F64)
    theta = (q + 0.5 - zp) * scale  # on the edge between codes q and q + 1
    rtn = affine_codes(theta, scale, zp, qmin, qmax)
    assert ((rtn == q) | (rtn == q + 1)).all()
    a = affine_cell_moments(theta, sigma, scale, zp, qmin, qmax)
    b = affine_cell_moments(theta, sigma, scale, zp, qmin, qmax, code=rtn)
    for name in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    # A backend that rounds ties the other way, and one that is off by one code near edges.
    for code in (torch.where(rtn == q, q + 1, q), rtn + torch.randint(-1, 2, (c,), generator=gen)):
        code = code.clamp(qmin, qmax)
        fast = affine_cell_moments(theta, sigma, scale, zp, qmin, qmax, code=code)
        ref = _reference_affine(theta, sigma, scale, zp, qmin, qmax, code=code)
        for name in ("kappa", "mean_abs", "m4", "coverage"):
            assert (getattr(fast, name) - getattr(ref, name)).abs().max() <= EXACT, name
    # On an edge the moments do not depend on which side the code is: same partition.
    other = affine_cell_moments(theta, sigma, scale, zp, qmin, qmax, code=torch.where(rtn == q, q + 1, q))
    assert torch.allclose(a.kappa, other.kappa, atol=1e-12)


def test_affine_frozen_and_sigma_zero():
    scale = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    zp = torch.zeros(5, dtype=F64)
    # mid-cell, off-centre, far beyond the int4 range, on an edge, and one more mid-cell
    theta = torch.tensor([0.3, 0.02, 5.0, 0.25, -0.8], dtype=F64)
    sigma = torch.zeros(5, dtype=F64)
    m = affine_cell_moments(theta, sigma, scale, zp, -8, 7)
    ref = _reference_affine(theta, sigma, scale, zp, -8, 7, half_window=20)
    off_edge = torch.tensor([True, True, True, False, True])
    assert (m.kappa[off_edge] == 0).all() and (m.mean_abs[off_edge] == 0).all() and (m.m4[off_edge] == 0).all()
    assert (m.coverage == 1).all()
    # sigma = 0 exactly on an edge is the sigma -> 0+ limit (two half-normals), as in
    # cell_statistics (standardize_boundaries maps 0/0 to 0).
    assert m.kappa[3].item() == pytest.approx(2 / math.pi, abs=1e-14)
    for name in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.allclose(getattr(m, name), getattr(ref, name), atol=1e-14), name
    # Deep inside a coarse cell (edges 20 sd away): frozen, and the full sum agrees.
    s2 = torch.full((5,), 0.1 / 40, dtype=F64)
    theta2 = torch.tensor([0.0, 0.1, -0.2, 0.5, 100.0], dtype=F64)
    m2 = affine_cell_moments(theta2, s2, scale, zp, -8, 7)
    assert (m2.kappa == 0).all()
    assert _reference_affine(theta2, s2, scale, zp, -8, 7, half_window=20).kappa.max() < 1e-15


# =========================================================================== value tables


def _all_finite_values(dtype: torch.dtype) -> torch.Tensor:
    bits = torch.arange(2 ** (8 * dtype.itemsize), dtype=torch.int64)
    if dtype.itemsize == 1:
        raw = bits.to(torch.uint8).view(dtype)
    else:
        raw = bits.to(torch.int32).to(torch.int16).view(dtype)
    v = raw.to(F64)
    return torch.unique(v[torch.isfinite(v)]).sort().values


@pytest.fixture(scope="module")
def fp8_values():
    v = _all_finite_values(torch.float8_e4m3fn)
    assert v.numel() == 253 and v[-1] == 448 and v[0] == -448  # +-0 merge into one 0
    return v


def _local_step(theta, values, scale):
    own = table_boundaries(theta, values, scale, 1)[:, 1:3]
    return own[:, 1] - own[:, 0]


def _windowed_full_sum(theta, sigma, values, scale, half_window, reach=40.0, halves=(4, 16, 64)):
    """``cell_statistics`` on ``table_boundaries(theta, values, scale, half_window)``, each element
    summed over the smallest of ``halves`` (else ``half_window``) edges each side that still holds
    every edge within ``reach`` sd of it: a cell beyond ~38.5 sd has probability and pdf terms 0
    in float64, so the fewer cells give the same sums (the float8 test's inputs: 2.1-2.6 -> 0.3-0.7
    CPU s; on it and the float16 / bfloat16 tests' inputs every field within 1.4e-15 of the
    whole-window sums, far below the 1e-10 the fast paths are held to)."""
    mids = 0.5 * (values[1:] + values[:-1])
    cell = torch.searchsorted(mids, theta / scale, right=True)
    lo = torch.searchsorted(mids, (theta - reach * sigma) / scale, right=True)
    hi = torch.searchsorted(mids, (theta + reach * sigma) / scale, right=True)
    need = torch.maximum(cell - lo, hi - cell) + 1
    names = ("kappa", "mean_abs", "m4", "coverage")
    out = {n: torch.empty(theta.numel(), dtype=F64) for n in names}
    done = torch.zeros(theta.numel(), dtype=torch.bool)
    for hw in (*(h for h in halves if h < half_window), half_window):
        sel = ~done & ((need <= hw) | (hw == half_window))
        idx = torch.nonzero(sel).squeeze(-1)
        if idx.numel():
            st = cell_statistics(theta[idx], sigma[idx], table_boundaries(theta[idx], values, scale[idx], hw))
            for n in names:
                out[n][idx] = getattr(st, n)
        done |= sel
    return SimpleNamespace(**out)


def test_float8_table_matches_full_cell_sum(fp8_values):
    """float8_e4m3fn with per-element scales: every element matches the full sum to 1e-10,
    except those on the float8 interpolation table (kappa and m4 within its tolerance).

    The grid is far from uniform (8 values per binade, subnormals near 0), so the fast path
    sums the cells exactly except where the grid is uniform within 8.5 sd.
    """
    gen = torch.Generator().manual_seed(5)
    c = 20_000
    scale = _log_uniform(c, 1e-3, 1.0, gen)
    # Weights from the subnormal range to beyond the largest value (448), both signs.
    mag = _log_uniform(c, 1e-4, 600.0, gen)
    theta = torch.where(torch.rand(c, generator=gen) < 0.5, -mag, mag) * scale
    theta[:200] = 0.0
    step = _local_step(theta, fp8_values, scale)
    h = _log_uniform(c, 0.05, 50.0, gen)
    sigma = torch.where(torch.isfinite(step), step / h, _log_uniform(c, 1.0, 100.0, gen) * scale)
    sigma[:1000] = _log_uniform(1000, 1.0, 1000.0, gen) * scale[:1000]  # windows over the whole table
    # Elements exactly on an edge (ties go to the upper value).
    mids = 0.5 * (fp8_values[1:] + fp8_values[:-1])
    k = torch.randint(0, mids.numel(), (500,), generator=gen)
    theta[-500:] = mids[k] * scale[-500:]
    fast = table_cell_moments(theta, sigma, fp8_values, scale)
    ref = _windowed_full_sum(theta, sigma, fp8_values, scale, 260)
    fine = (step / sigma <= FINE_STEP)
    assert fine.sum() > 1000
    # Elements the float8 interpolation table covers (kappa, m4 interpolated; issue 13): within
    # its stated tolerance (tests/test_fp8_interp.py); every other one as before.
    from mis_lightning.functional.interp import TOLERANCE as INTERP_TOL
    from mis_lightning.functional.interp import InterpTable

    # The elements the table covers: its mask is decided before any octave is built, and the
    # values are not read here, so a fresh table whose octaves are never built (building them
    # all took 7.7 of this test's 9.6 CPU s; the fast path above, at c < INTERP_MIN_ELEMENTS,
    # builds none).
    table = InterpTable(fp8_values)
    table._build = lambda octaves: None
    interp, *_ = table.moments(theta / scale, sigma / scale)
    assert 1000 < int(interp.sum()) < c - 1000
    for name in ("kappa", "mean_abs", "m4", "coverage"):
        err = (getattr(fast, name) - getattr(ref, name)).abs()
        tol = INTERP_TOL[name] if name in ("kappa", "m4") else EXACT
        assert err[interp].max() <= tol, (name, err[interp].max())
        exact = ~fine & ~interp
        # Fine elements use the expansion only where the grid is uniform within 8.5 sd.
        assert err[exact].max() <= EXACT, (name, err[exact].max())
        if name == "kappa":
            fine_exp = fine & ~interp
            assert (err[fine_exp] <= 6e-4 * (step / sigma)[fine_exp] ** 6 + EXACT).all(), err[fine_exp].max()


def _window_steps(theta, sigma, edges):
    """Largest and smallest cell widths (sd) among the cells that meet the 8.5-sd window."""
    alpha = (edges - theta.unsqueeze(-1)) / sigma.unsqueeze(-1)
    lo, hi = alpha[:, :-1], alpha[:, 1:]
    meets = (hi > -CUTOFF_SIGMAS) & (lo < CUTOFF_SIGMAS) & torch.isfinite(lo) & torch.isfinite(hi)
    width = hi - lo
    h_max = torch.where(meets, width, torch.zeros_like(width)).amax(dim=1)
    h_min = torch.where(meets, width, torch.full_like(width, math.inf)).amin(dim=1)
    return h_max, h_min


@pytest.mark.parametrize(
    "dtype, h_range, ref_window",
    [
        # float16: 1024 values per binade; steps >= 0.04 sd keep every window within one
        # binade edge and <= 512 edges each side (below: next test); the reference (700
        # edges each side) covers 12 sd of the finer side's cells.
        (torch.float16, (0.04, 50.0), 700),
        # bfloat16: 128 values per binade; steps >= 0.2 sd: likewise with 200 edges.
        (torch.bfloat16, (0.2, 50.0), 200),
    ],
)
def test_float16_tables_match_full_cell_sum(dtype, h_range, ref_window):
    values = _all_finite_values(dtype)
    gen = torch.Generator().manual_seed(int(h_range[0] * 100))
    c = 3000
    mag = _log_uniform(c, 1e-6, 7e4, gen)
    theta = torch.where(torch.rand(c, generator=gen) < 0.5, -mag, mag)
    theta[:50] = 0.0
    scale = torch.ones(c, dtype=F64)
    step = _local_step(theta, values, scale)
    h = _log_uniform(c, *h_range, gen)
    # Beyond the largest value (65504 / 3.4e38) the outer cell is unbounded: give those
    # weights sigma <= 1% of their size (a window reaching back to 0 from beyond 65504 would
    # need ~10^4 edges; the fast path caps windows at 512 edges, as does the reference).
    sigma = torch.where(torch.isfinite(step), step / h, mag * _log_uniform(c, 1e-4, 1e-2, gen))
    # Weights next to a binade edge (power of two): the grid changes step within 8.5 sd.
    e = torch.randint(-10, 10, (500,), generator=gen).to(F64)
    edge = torch.exp2(e)
    theta[-500:] = edge * (1 + torch.empty(500, dtype=F64).uniform_(-1, 1, generator=gen) * 2.0**-7)
    step_e = _local_step(theta[-500:], values, scale[-500:])
    sigma[-500:] = step_e / _log_uniform(500, *h_range, gen)
    fast = table_cell_moments(theta, sigma, values, scale)
    ref = _windowed_full_sum(theta, sigma, values, scale, ref_window)
    hl = step / sigma
    hl[-500:] = step_e / sigma[-500:]
    fine = hl <= FINE_STEP
    assert fine.sum() > 300 and (~fine).sum() > 300
    for name in ("kappa", "mean_abs", "m4", "coverage"):
        err = (getattr(fast, name) - getattr(ref, name)).abs()
        assert err[~fine].max() <= EXACT, (name, err[~fine].max())
    kerr = (fast.kappa - ref.kappa).abs()[fine]
    assert (kerr <= 6e-4 * hl[fine] ** 6 + EXACT).all(), kerr.max()


def test_float16_very_fine_nonuniform_documented_bound():
    """float16 steps of 0.005-0.02 sd next to a binade edge: > 512 edges on one side.

    There the local fine expansion is used (summing ~2000 edges per element would be the
    alternative): its error is at most ``(h_max^2 - h_min^2) / 12`` with ``h_max``/``h_min``
    the widest/narrowest cell within 8.5 sd (grids.py).
    """
    values = _all_finite_values(torch.float16)
    gen = torch.Generator().manual_seed(9)
    c = 300
    e = torch.randint(-8, 8, (c,), generator=gen).to(F64)
    theta = -torch.exp2(e) * (1 + torch.empty(c, dtype=F64).uniform_(-1, 1, generator=gen) * 2.0**-8)
    scale = torch.ones(c, dtype=F64)
    step = _local_step(theta, values, scale)
    h = _log_uniform(c, 0.005, 0.02, gen)
    sigma = step / h
    fast = table_cell_moments(theta, sigma, values, scale)
    edges = table_boundaries(theta, values, scale, 5200)  # 12 sd of the finest cells (h/2)
    ref = cell_statistics(theta, sigma, edges)
    h_max, h_min = _window_steps(theta, sigma, edges)
    nonuniform = h_max > 1.5 * h_min
    assert nonuniform.sum() > c // 2  # the case is really non-uniform
    err = (fast.kappa - ref.kappa).abs()
    bound = (h_max**2 - h_min**2) / 12 + 6e-4 * h**6 + EXACT
    assert (err <= bound).all(), (err / bound).max()
    # And the bound is what it costs: the error is a sizeable fraction of it.
    assert (err / bound)[nonuniform].max() > 0.3


def test_table_frozen_and_outer_cells(fp8_values):
    """Frozen weights (edges > 8.5 sd away) give 0; weights beyond the largest value see one edge."""
    scale = torch.ones(4, dtype=F64)
    theta = torch.tensor([1.0, 3.0, 1000.0, -1000.0], dtype=F64)  # values of fp8 / beyond 448
    sigma = torch.tensor([1e-4, 1e-4, 10.0, 10.0], dtype=F64)
    m = table_cell_moments(theta, sigma, fp8_values, scale)
    assert (m.kappa[:2] == 0).all() and (m.mean_abs[:2] == 0).all()
    # 1000 is beyond the edge 432 (between 416 and 448) by 56.8 sd: frozen too.
    assert (m.kappa[2:] == 0).all()
    theta2 = torch.tensor([448.0 + 5.0], dtype=F64)  # 2.1 sd above the last edge (432): live
    m2 = table_cell_moments(theta2, torch.tensor([10.0], dtype=F64), fp8_values, torch.ones(1, dtype=F64))
    ref = cell_statistics(theta2, torch.tensor([10.0], dtype=F64),
                          table_boundaries(theta2, fp8_values, torch.ones(1, dtype=F64), 260))
    assert m2.kappa.item() == pytest.approx(ref.kappa.item(), abs=EXACT)
    assert 0.05 < m2.kappa.item() < 0.2  # ~ phi(2.1)^2 / (Phi(2.1) Phi(-2.1)) = 0.11


def test_uniform_table_path_matches_exact_sums():
    """Large chunks read interior elements from the (h, t) table; compare with exact sums."""
    import mis_lightning.functional.grids as G

    gen = torch.Generator().manual_seed(21)
    c = max(G.TABLE_MIN_ELEMENTS, 60_000)
    scale = _log_uniform(c, 1e-3, 1.0, gen)
    h = _log_uniform(c, 0.3, 60.0, gen)
    sigma = scale / h
    zp = torch.zeros(c, dtype=F64)
    theta = torch.empty(c, dtype=F64).uniform_(-100, 100, generator=gen) * scale
    fast = G.affine_cell_moments(theta, sigma, scale, zp, -128, 127)
    ref = _reference_affine(theta, sigma, scale, zp, -128, 127)
    tab = (h > FINE_STEP) & (h < G.TABLE_H_MAX)
    assert tab.sum() > c // 3
    # Bilinear interpolation on a 256 x 513 grid in (log h, |t|/h): measured worst errors
    # kappa 4.5e-5, lam 3.6e-5, m4 2.0e-4 over h in (0.3, 40); bounds with ~2x headroom.
    for name, bound in (("kappa", 1e-4), ("mean_abs", 1e-4), ("m4", 5e-4)):
        err = (getattr(fast, name) - getattr(ref, name)).abs()
        assert float(err[tab].max()) <= bound, (name, float(err[tab].max()))
    # The two-edge closed form above the table and the exact/fine paths elsewhere.
    two = h >= G.TABLE_H_MAX
    assert float((fast.kappa - ref.kappa).abs()[two].max()) <= 1e-10


def large_clamped_chunk() -> tuple[torch.Tensor, ...]:
    """``(theta, sigma, scale, zp, h)`` [TABLE_MIN_ELEMENTS + 5000] float64 on the int4 grid
    (-8..7): h = scale / sigma log-uniform in [0.05, 60], positions reaching both clamped ends.
    Also tests/test_fastpath.py's compiled-kernel check of the same chunk."""
    import mis_lightning.functional.grids as G

    gen = torch.Generator().manual_seed(5)
    c = G.TABLE_MIN_ELEMENTS + 5000
    scale = _log_uniform(c, 1e-3, 1.0, gen)
    h = _log_uniform(c, 0.05, 60.0, gen)
    sigma = scale / h
    zp = torch.randint(-3, 4, (c,), generator=gen).to(F64)
    theta = torch.empty(c, dtype=F64).uniform_(-14, 14, generator=gen) * scale  # int4: clamps
    return theta, sigma, scale, zp, h


def test_fused_kernel_large_chunk_with_clamping():
    """Large chunks: the branch-free kernel plus exact recomputation of the elements whose
    cells reach a clamped end. (torch.compile of the kernel on the same chunk: in
    tests/test_fastpath.py, whose process compiles anyway; t54 moved it there, a first compile
    in this file's process cost ~7 CPU s.)"""
    import mis_lightning.functional.grids as G

    theta, sigma, scale, zp, h = large_clamped_chunk()
    eager = G.affine_cell_moments(theta, sigma, scale, zp, -8, 7, compile_policy=G.CompilePolicy("never"))
    ref = _reference_affine(theta, sigma, scale, zp, -8, 7)
    to_min = (theta - (-8 + 0.5 - zp) * scale) / sigma
    to_max = ((7 - 0.5 - zp) * scale - theta) / sigma
    q = torch.round(theta / scale).add(zp).clamp(-8, 7)
    interior = (to_min > CUTOFF_SIGMAS) & (to_max > CUTOFF_SIGMAS) & (q > -8) & (q < 7)
    tab = interior & (h > FINE_STEP)
    exact = ~interior & (h > FINE_STEP)
    assert exact.sum() > 1000 and tab.sum() > 1000
    err = (eager.kappa - ref.kappa).abs()
    assert float(err[tab].max()) <= 1e-4  # table / two-edge (see the test above)
    assert float(err[exact].max()) <= EXACT  # clamped ends: recomputed exactly
    # fine steps whose sd reaches a clamped end stay in the kernel: the end-cell form of the
    # per-regime path (same arithmetic) and its documented bound against the exact sums
    near = ~interior & (h <= FINE_STEP)
    assert near.sum() > 1000
    idx = torch.nonzero(near).squeeze(-1)
    sparse = G._affine_cell_moments_sparse(theta[idx], sigma[idx], scale[idx], zp[idx], -8, 7)
    for name in ("kappa", "mean_abs", "m4"):
        assert torch.allclose(getattr(eager, name)[idx], getattr(sparse, name), rtol=1e-12, atol=1e-14), name
    assert bool((err[near] <= 5e-4 * h[near] ** 2 + 1e-12).all())
    assert torch.isfinite(eager.m4).all() and torch.isfinite(eager.mean_abs).all()


def test_expand_blocks_matches_a_full_expansion():
    """Per-element scales of a flat element range (rows touched, then one repeat along the last
    dim) equal those of the whole block tensor repeated along every dim, for 1-4-d shapes,
    block sizes that do and do not divide them, and arbitrary ranges."""
    import math
    import random

    from mis_lightning.quantization.base import _expand_blocks

    rnd = random.Random(0)
    for _ in range(300):
        shape = tuple(rnd.randint(1, 7) for _ in range(rnd.randint(1, 4)))
        block = tuple(rnd.choice([1, 2, 3, s]) for s in shape)
        nb = [math.ceil(s / b) for s, b in zip(shape, block)]
        bt = torch.randn(math.prod(nb), dtype=torch.float64)
        full = bt.reshape(nb)
        for dim, b in enumerate(block):
            full = full.repeat_interleave(b, dim=dim)
        full = full[tuple(slice(0, s) for s in shape)].reshape(-1)
        n = math.prod(shape)
        a = rnd.randint(0, n - 1)
        b = rnd.randint(a + 1, n)
        assert torch.equal(_expand_blocks(bt, block, shape, a, b), full[a:b]), (shape, block, a, b)
