"""Cell edges of real quantization grids and their fast cell moments (method.md section 5).

Two grid families cover every scheme the library ships:

* **affine integer grids** -- value ``(q - zero_point) * scale`` for integer codes
  ``q in [qmin, qmax]``; round-to-nearest cells are bounded by the midpoints
  ``(q + 1/2 - zero_point) * scale`` and the two outer cells are unbounded;
* **value tables** -- any sorted set of representable values (float8, bfloat16, float16)
  times a per-element scale; cells are bounded by midpoints of adjacent values.

All tensors are per element (``[c]``, one chunk of a flattened parameter): the callers in
``mis_lightning.quantization`` expand per-block scales chunk by chunk, so nothing here
is ever of the size of a whole model times the number of cells.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cells import SQRT_2_OVER_PI, CellMoments, _pdf
from .fastpath import APPROXIMATION, GUARD, SAME_ARITHMETIC, compare, sample_indices

# Edges further than this many standard deviations from theta carry < 1e-15 of kappa.
CUTOFF_SIGMAS = 8.5
# At or below this grid step (in standard deviations) the fine-grid expansion is used:
# kappa = 1 - h^2/12 + h^4/144 with error < 6e-4 h^6 (< 1e-5 at h = 0.5), measured
# against the full cell sum in tests/test_grids.py.
FINE_STEP = 0.5
# Window half-widths (number of edges each side) used for the remaining elements.
_WINDOW_BUCKETS = (2, 3, 4, 6, 10, 18)
_MAX_WINDOW = 512
# Floats per [rows, edges] working tensor of the windowed sums: small enough that a dozen
# temporaries stay in cache (eager torch is memory-bound here; measured in
# benchmarks/cell_statistics_speed.py).
_ROWS_BUDGET = 1 << 16
# Window half-widths for value tables beyond their ``half_window`` (float grids get finer
# towards zero, so a window may need many edges).
_TABLE_BUCKETS = (32, 64, 128, 256)


def _float64_inputs(theta: Tensor, sigma: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
    """``theta``, ``sigma`` (floored at the smallest positive float: ``sigma = 0`` means a frozen
    code, not a division by zero) and the grid tensors, all in float64."""
    sg = sigma.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    return (theta.to(torch.float64), sg, *(t.to(torch.float64) for t in rest))


def affine_codes(theta: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest (halves to even) codes of ``theta`` on an affine grid, as float64.

    The nearest value ``(q - zero_point) * scale`` has ``q = round(theta / scale + zero_point)``;
    with an integer zero point this is the backends' ``round(theta / scale) + zero_point``, and
    it stays right for float zero points (torchao's tinygemm layout).
    """
    zp = zero_point.to(torch.float64)
    frac = zp - torch.round(zp)
    q = torch.round(theta.to(torch.float64) / scale.to(torch.float64) + frac) + (zp - frac)
    return q.clamp(qmin, qmax)


def affine_boundaries(
    theta: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    half_window: int,
    code: Tensor | None = None,
) -> Tensor:
    """Cell edges ``[c, 2*half_window + 2]`` around each element's code (parameter units).

    The edges are those of the codes ``code - half_window + 1 .. code + half_window - 1``
    plus ``-inf`` and ``+inf`` at the ends (the two outer cells lump the remaining codes,
    which lie beyond the window). Edges beyond ``[qmin, qmax]`` collapse to ``-inf`` or
    ``+inf`` (empty cells), so the layout is the same for every element.

    Args:
        theta: ``[c]`` weights; scale, zero_point: ``[c]`` per-element grid parameters.
        code: ``[c]`` the backend's own integer codes; computed by round-to-nearest if None.
    """
    s = scale.to(torch.float64)
    zp = zero_point.to(torch.float64)
    q0 = affine_codes(theta, scale, zero_point, qmin, qmax) if code is None else code.to(torch.float64)
    i = torch.arange(-half_window + 1, half_window + 1, dtype=torch.float64, device=theta.device)
    upper_code = q0.unsqueeze(-1) + i  # edge i separates codes upper_code - 1 and upper_code
    edges = (upper_code - 0.5 - zp.unsqueeze(-1)) * s.unsqueeze(-1)
    edges = torch.where(upper_code <= qmin, torch.full_like(edges, -math.inf), edges)
    edges = torch.where(upper_code > qmax, torch.full_like(edges, math.inf), edges)
    inf = torch.full_like(edges[:, :1], math.inf)
    return torch.cat([-inf, edges, inf], dim=-1)


def moments_from_alpha_fast(alpha: Tensor) -> CellMoments:
    """Cell moments from standardised edges ``[c, E]`` with one ``ndtr`` per edge.

    Uses ``Phi`` directly (no tail mirroring): in the far upper tail a cell's probability
    then has absolute error ~1e-16, which moves ``kappa`` by < 1e-14 since such a cell
    contributes ``~ p * alpha^2``. Returns float64 :class:`CellMoments`.
    """
    pdf = _pdf(alpha)
    cdf = torch.special.ndtr(alpha)
    diff = pdf[:, :-1] - pdf[:, 1:]
    prob = (cdf[:, 1:] - cdf[:, :-1]).clamp_min_(0.0)
    live = prob > 1e-280
    ratio = diff / torch.where(live, prob, torch.ones_like(prob))
    # Keep each conditional mean inside its cell; empty cells (possibly at +-inf) get 0.
    ratio = torch.maximum(torch.minimum(ratio, alpha[:, 1:]), alpha[:, :-1])
    ratio = torch.where(live, ratio, torch.zeros_like(ratio))
    sq = diff * ratio
    kappa = sq.sum(-1).clamp_(0.0, 1.0)
    lam = diff.abs().sum(-1).clamp_(0.0, SQRT_2_OVER_PI)
    m4 = (sq * ratio * ratio).sum(-1)
    return CellMoments(kappa=kappa, lam=lam, m4=m4, coverage=prob.sum(-1))


def fine_grid_moments(h: Tensor, lower: Tensor | None = None, upper: Tensor | None = None) -> CellMoments:
    """Cell moments of a fine uniform grid of step ``h`` (standard units).

    Far from the ends of the code range: ``kappa = 1 - h^2/12 + h^4/144`` (error < 6e-4 h^6);
    ``m4 = 3 - h^2/2``; ``lam = sqrt(2/pi) - 0.05 h^2`` (the exact value moves with the
    position of theta in its cell by up to +-0.05 h^2, +-0.1 h^2 near the range ends; the
    one-coordinate formula, which
    needs ``lam`` exactly, uses the full cell sum instead).

    ``lower``/``upper`` (standardised edges of the two unbounded end cells, ``-inf``/``+inf``
    when far): the interior ``(lower, upper)`` is a fine grid (``m ~ U`` with the same
    corrections, integrated over the interior) and the end cells are exact:
    ``kappa = I2 - (h^2/12 - h^4/144) P + phi(a)^2/Phi(a) + phi(b)^2/(1 - Phi(b))`` with
    ``P = Phi(b) - Phi(a)`` and ``Ik = int_a^b u^k phi(u) du``. This is what a weight whose
    standard deviation spans the whole code range needs (its window would be thousands of
    cells wide).
    """
    h2 = h.to(torch.float64) ** 2
    if lower is None and upper is None:
        kappa = 1.0 - h2 / 12.0 + h2 * h2 / 144.0
        lam = SQRT_2_OVER_PI - 0.05 * h2
        m4 = 3.0 - 0.5 * h2
        return CellMoments(kappa=kappa, lam=lam, m4=m4, coverage=torch.ones_like(h2))
    a = (torch.full_like(h2, -math.inf) if lower is None else lower.to(torch.float64))
    b = (torch.full_like(h2, math.inf) if upper is None else upper.to(torch.float64))
    pa, pb = _pdf(a), _pdf(b)
    ca, cb = torch.special.ndtr(a), torch.special.ndtr(b)
    qb = torch.special.ndtr(-b)  # 1 - Phi(b) without cancellation
    P = (cb - ca).clamp_min(0.0)
    # u^k phi(u) vanishes at +-inf; write the finite-edge terms so inf * 0 never appears.
    ua = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    ub = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
    I2 = P - (ub * pb - ua * pa)
    I4 = 3.0 * P - ((ub**3 + 3 * ub) * pb - (ua**3 + 3 * ua) * pa)
    # int_a^b |u| phi = F(b) - F(a), F(u) = sign(u) (phi(0) - phi(u))
    phi0 = _pdf(torch.zeros_like(a))
    I1 = torch.sign(b) * (phi0 - pb) - torch.sign(a) * (phi0 - pa)  # F(+-inf) = +-phi(0)
    end_k = torch.where(ca > 1e-300, pa * pa / ca.clamp_min(1e-300), torch.zeros_like(a)) + torch.where(
        qb > 1e-300, pb * pb / qb.clamp_min(1e-300), torch.zeros_like(b))
    mu_a = torch.where(ca > 1e-300, pa / ca.clamp_min(1e-300), torch.zeros_like(a))
    mu_b = torch.where(qb > 1e-300, pb / qb.clamp_min(1e-300), torch.zeros_like(b))
    kappa = (I2 - (h2 / 12.0 - h2 * h2 / 144.0) * P + end_k).clamp(0.0, 1.0)
    lam = (I1 - 0.05 * h2 * P + pa + pb).clamp(0.0, SQRT_2_OVER_PI)
    m4 = I4 - 0.5 * h2 * I2 + ca * mu_a**4 + qb * mu_b**4
    return CellMoments(kappa=kappa, lam=lam, m4=m4, coverage=torch.ones_like(h2))


# ----------------------------------------------------------------- uniform-grid table
# On an infinite uniform grid the moments of an element depend only on the step h and the
# position t of theta in its cell (both in sd units): a 2-D table, computed once with the
# exact cell sums and read with bilinear interpolation, replaces ~2 h^-1 * 8.5 erfc/exp
# evaluations per element by four table reads.
TABLE_MIN_ELEMENTS = 1 << 15
TABLE_H_MAX = 19.0  # above: only the two own edges are within 8.5 sd
_TABLE_NH, _TABLE_NU = 256, 513
_TABLE: tuple[float, float, float, Tensor] | None = None


def _uniform_table() -> tuple[float, float, float, Tensor]:
    global _TABLE
    if _TABLE is None:
        lo, hi = math.log(FINE_STEP), math.log(TABLE_H_MAX)
        logh = torch.linspace(lo, hi, _TABLE_NH, dtype=torch.float64)
        u = torch.linspace(0.0, 0.5, _TABLE_NU, dtype=torch.float64)
        vals = torch.empty(_TABLE_NH, _TABLE_NU, 3, dtype=torch.float64)
        for k in range(_TABLE_NH):
            hk = math.exp(float(logh[k]))
            M = math.ceil((CUTOFF_SIGMAS + 1.0) / hk) + 2
            i = torch.arange(-M, M, dtype=torch.float64)
            alpha = (i + 0.5) * hk - (u * hk).unsqueeze(-1)  # [NU, 2M] edges around t = u h
            inf = torch.full((_TABLE_NU, 1), math.inf, dtype=torch.float64)
            mm = moments_from_alpha_fast(torch.cat([-inf, alpha, inf], -1))
            vals[k] = torch.stack([mm.kappa, mm.lam, mm.m4], -1)
        # Each entry holds its cell's four corners, so that a lookup is one gather of 12.
        pad = torch.cat([vals, vals[-1:]], 0)
        pad = torch.cat([pad, pad[:, -1:]], 1)
        corners = torch.cat([pad[:-1, :-1], pad[:-1, 1:], pad[1:, :-1], pad[1:, 1:]], -1)
        _TABLE = (lo, (hi - lo) / (_TABLE_NH - 1), 0.5 / (_TABLE_NU - 1), corners.reshape(-1, 12))
    return _TABLE


def uniform_table_moments(h: Tensor, t: Tensor) -> CellMoments:
    """Moments on an infinite uniform grid of step ``h`` (``0.5 < h < 19``, sd units) for a
    weight at ``t`` from its cell's centre (``|t| <= h/2``), by bilinear interpolation in
    ``(log h, |t|/h)`` of a 256 x 513 table of exact cell sums (moments are even in ``t``)."""
    lo, dlog, du, table = _uniform_table()
    table = table.to(h.device)
    x = ((torch.log(h) - lo) / dlog).clamp(0.0, _TABLE_NH - 1 - 1e-9)
    y = ((t.abs() / h) / du).clamp(0.0, _TABLE_NU - 1 - 1e-9)
    i, j = x.floor(), y.floor()
    wx, wy = (x - i).unsqueeze(-1), (y - j).unsqueeze(-1)
    corners = table.index_select(0, (i * _TABLE_NU + j).long())  # [c, 12]
    v0 = torch.lerp(corners[:, 0:3], corners[:, 3:6], wy)
    v1 = torch.lerp(corners[:, 6:9], corners[:, 9:12], wy)
    v = torch.lerp(v0, v1, wx)
    return CellMoments(kappa=v[:, 0], lam=v[:, 1], m4=v[:, 2], coverage=torch.ones_like(h))


def _affine_cell_moments_sparse(
    theta: Tensor,
    sigma: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    code: Tensor | None = None,
    fine_step: float = FINE_STEP,
) -> CellMoments:
    """The per-regime path of :func:`affine_cell_moments` (frozen skipped, fine expansion,
    exact window sums grouped by window size): used for small chunks and for the elements of
    large chunks whose cells reach a clamped end of the code range.

    ``fine_step``: steps (sd units) at or below which the fine-grid expansion replaces the
    cell sum. The reference path (:func:`affine_reference_moments`) lowers it to the step
    below which the window would exceed ``_MAX_WINDOW`` edges."""
    th, sg, s, zp = _float64_inputs(theta, sigma, scale, zero_point)
    q0 = affine_codes(th, s, zp, qmin, qmax) if code is None else code.to(torch.float64)
    h = s / sg
    # Standardised distances to the lower and upper edge of the element's own cell.
    lower = torch.where(q0 > qmin, (th - (q0 - 0.5 - zp) * s) / sg, torch.full_like(th, math.inf))
    upper = torch.where(q0 < qmax, ((q0 + 0.5 - zp) * s - th) / sg, torch.full_like(th, math.inf))
    to_min = (th - (qmin + 0.5 - zp) * s) / sg
    to_max = ((qmax - 0.5 - zp) * s - th) / sg

    c = th.shape[0]
    kappa = torch.zeros(c, dtype=torch.float64, device=th.device)
    lam = torch.zeros_like(kappa)
    m4 = torch.zeros_like(kappa)
    coverage = torch.ones_like(kappa)

    frozen = (lower > CUTOFF_SIGMAS) & (upper > CUTOFF_SIGMAS)
    fine_all = ~frozen & (h <= fine_step)
    far_ends = (to_min > CUTOFF_SIGMAS) & (to_max > CUTOFF_SIGMAS)
    fine = fine_all & far_ends
    if bool(fine.any()):
        fm = fine_grid_moments(h[fine])
        kappa[fine], lam[fine], m4[fine] = fm.kappa, fm.lam, fm.m4
    near = fine_all & ~far_ends
    if bool(near.any()):
        # A fine grid whose end cell is within reach (the weight's sd spans to the end of the
        # code range): fine interior + exact end cells; far ends drop out (phi(8.5) ~ 0).
        lo_edge = torch.where(to_min[near] > CUTOFF_SIGMAS, torch.full_like(to_min[near], -math.inf), -to_min[near])
        hi_edge = torch.where(to_max[near] > CUTOFF_SIGMAS, torch.full_like(to_max[near], math.inf), to_max[near])
        fm = fine_grid_moments(h[near], lo_edge, hi_edge)
        kappa[near], lam[near], m4[near] = fm.kappa, fm.lam, fm.m4
    fine = fine_all
    rest = ~(frozen | fine)
    if bool(rest.any()):
        need = (torch.ceil(CUTOFF_SIGMAS / h[rest]) + 1).clamp(max=_MAX_WINDOW)
        idx_rest = torch.nonzero(rest).squeeze(-1)
        lo_bound = 0
        for m in (*_WINDOW_BUCKETS, _MAX_WINDOW):
            sel = (need > lo_bound) & (need <= m)
            lo_bound = m
            if not bool(sel.any()):
                continue
            idx = idx_rest[sel]
            # Bound the [rows, 2m + 2] working set for wide windows.
            step = max(1, _ROWS_BUDGET // (2 * m + 2))
            for a in range(0, idx.numel(), step):
                ii = idx[a : a + step]
                edges = affine_boundaries(th[ii], s[ii], zp[ii], qmin, qmax, m, code=q0[ii])
                alpha = (edges - th[ii].unsqueeze(-1)) / sg[ii].unsqueeze(-1)
                mm = moments_from_alpha_fast(alpha)
                kappa[ii], lam[ii], m4[ii], coverage[ii] = mm.kappa, mm.lam, mm.m4, mm.coverage
    return CellMoments(kappa=kappa, lam=lam, m4=m4, coverage=coverage)


def _fused_affine(th: Tensor, sg: Tensor, s: Tensor, zp: Tensor, q0: Tensor, qmin: Tensor, qmax: Tensor,
                  lo: Tensor, dlog: Tensor, du: Tensor, table: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Branch-free moments of every element of an affine chunk (one pass of elementwise work).

    Frozen elements get 0, fine steps the expansion, steps in (0.5, 19) the table, larger
    steps the two-edge closed form, all selected with ``torch.where`` so that the whole
    function fuses into one loop under ``torch.compile``. Returns ``kappa, lam, m4, ok`` where
    ``ok`` is False for the elements whose cells reach a clamped end of the code range: the
    caller recomputes those exactly.
    """
    h = s / sg
    lower = (th - (q0 - 0.5 - zp) * s) / sg  # sd units to the element's own lower edge
    upper = ((q0 + 0.5 - zp) * s - th) / sg
    to_min = (th - (qmin + 0.5 - zp) * s) / sg
    to_max = ((qmax - 0.5 - zp) * s - th) / sg
    frozen = (lower > CUTOFF_SIGMAS) & (upper > CUTOFF_SIGMAS)
    interior = (to_min > CUTOFF_SIGMAS) & (to_max > CUTOFF_SIGMAS) & (q0 > qmin) & (q0 < qmax)
    # uniform-grid table in (log h, |t| / h), t = position from the cell centre
    hc = h.clamp(FINE_STEP, TABLE_H_MAX)
    x = ((torch.log(hc) - lo) / dlog).clamp(0.0, _TABLE_NH - 1 - 1e-9)
    y = ((0.5 * (lower - upper).abs() / hc) / du).clamp(0.0, _TABLE_NU - 1 - 1e-9)
    i, j = x.floor(), y.floor()
    wx, wy = (x - i).unsqueeze(-1), (y - j).unsqueeze(-1)
    c = table[(i * _TABLE_NU + j).long()]
    v0 = c[:, 0:3] + wy * (c[:, 3:6] - c[:, 0:3])
    v1 = c[:, 6:9] + wy * (c[:, 9:12] - c[:, 6:9])
    v = v0 + wx * (v1 - v0)
    # two edges only (h >= 19): cells (-inf, -lower], [-lower, upper], [upper, inf)
    pa, pb = _pdf(upper), _pdf(lower)
    qa, qb = torch.special.ndtr(-upper), torch.special.ndtr(-lower)
    pm = (1.0 - qa - qb).clamp_min(1e-300)
    dm = pb - pa
    zero = torch.zeros_like(h)
    k_a = torch.where(qa > 1e-300, pa * pa / qa.clamp_min(1e-300), zero)
    k_b = torch.where(qb > 1e-300, pb * pb / qb.clamp_min(1e-300), zero)
    m_a = torch.where(qa > 1e-300, pa**4 / qa.clamp_min(1e-300) ** 3, zero)
    m_b = torch.where(qb > 1e-300, pb**4 / qb.clamp_min(1e-300) ** 3, zero)
    k2 = (k_a + k_b + dm * dm / pm).clamp(0.0, 1.0)
    l2 = pa + pb + dm.abs()
    m2 = m_a + m_b + dm**4 / pm**3
    # fine steps, far from the ends
    h2 = h * h
    fine, big = h <= FINE_STEP, h >= TABLE_H_MAX
    kappa = torch.where(fine, 1.0 - h2 / 12.0 + h2 * h2 / 144.0, torch.where(big, k2, v[:, 0]))
    lam = torch.where(fine, SQRT_2_OVER_PI - 0.05 * h2, torch.where(big, l2, v[:, 1]))
    m4 = torch.where(fine, 3.0 - 0.5 * h2, torch.where(big, m2, v[:, 2]))
    kappa, lam, m4 = (torch.where(frozen, zero, t) for t in (kappa, lam, m4))
    return kappa, lam, m4, frozen | interior


def _fused_affine_codes(th: Tensor, sg: Tensor, s: Tensor, zp: Tensor, qmin: Tensor, qmax: Tensor,
                        lo: Tensor, dlog: Tensor, du: Tensor, table: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_fused_affine` with the round-to-nearest codes computed inside the same kernel."""
    frac = zp - torch.round(zp)
    q0 = torch.clamp(torch.round(th / s + frac) + (zp - frac), min=qmin, max=qmax)
    return (*_fused_affine(th, sg, s, zp, q0, qmin, qmax, lo, dlog, du, table), q0)


# torch.compile of the fused kernel: used once a process has pushed COMPILE_AFTER elements
# through it ("auto"; compiling costs a few seconds once), always ("1") or never ("0"):
# environment variable MIS_LIGHTNING_COMPILE. Measured (benchmarks/cell_statistics_speed.py,
# 1 core, float64, K ~ 8): eager 8.5e6 weights/s, compiled 4.9e7. Whatever the policy, the
# compiled kernel's output is checked against the eager kernel (fastpath.GUARD).
COMPILE_AFTER = 20_000_000
_FUSED_STATE: dict[str, object] = {"elements": 0, "compiled": None, "compiled_codes": None, "failed": False}
# Names of the optimised paths, as the self-check warnings print them.
COMPILED_PATH = "the torch.compile'd cell-moment kernel"
FUSED_PATH = "the fused cell-moment kernel ((h, t) table, two-edge and fine forms)"
SPARSE_PATH = "the per-regime cell sums (fine-grid expansion)"
TABLE_PATH = "the float-format cell sums (fine-grid expansion)"
# Below this step (sd units) an exact sum would need more than _MAX_WINDOW edges each side:
# the reference paths use the fine-grid expansion there (error < 6e-4 h^6 < 1e-14).
REFERENCE_FINE_STEP = CUTOFF_SIGMAS / (_MAX_WINDOW - 1)


def _fused_kernel(c: int, with_codes: bool):
    """The fused kernel to run on a chunk of ``c`` elements, and whether it is compiled."""
    import os

    mode = os.environ.get("MIS_LIGHTNING_COMPILE", "auto").strip().lower()
    _FUSED_STATE["elements"] = int(_FUSED_STATE["elements"]) + c  # type: ignore[arg-type]
    want = mode in ("1", "true", "yes") or (
        mode == "auto" and int(_FUSED_STATE["elements"]) > COMPILE_AFTER)  # type: ignore[arg-type]
    eager = _fused_affine if with_codes else _fused_affine_codes
    if not want or _FUSED_STATE["failed"] or COMPILED_PATH in GUARD.disabled:
        return eager, False
    key = "compiled" if with_codes else "compiled_codes"
    if _FUSED_STATE[key] is None:
        _FUSED_STATE[key] = torch.compile(eager, dynamic=True)
    return _FUSED_STATE[key], True


def affine_reference_moments(
    theta: Tensor,
    sigma: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    code: Tensor | None = None,
) -> CellMoments:
    """Reference cell moments on an affine grid: the exact sum over every cell edge within
    8.5 sd of each element (``moments_from_alpha_fast``); only steps below
    ``REFERENCE_FINE_STEP`` (~0.0166 sd, windows of more than 512 edges) use the fine-grid
    expansion, whose error is below 1e-14 there. Slow: the optimised paths of
    :func:`affine_cell_moments` are checked against it on samples (``fastpath``).

    Args and returns as :func:`affine_cell_moments`.
    """
    return _affine_cell_moments_sparse(theta, sigma, scale, zero_point, qmin, qmax, code,
                                       fine_step=REFERENCE_FINE_STEP)


def _sparse_checked(th: Tensor, sg: Tensor, s: Tensor, zp: Tensor, qmin: int, qmax: int,
                    code: Tensor | None) -> CellMoments:
    """The per-regime path, checked against the reference on a sample (see ``fastpath``)."""
    if SPARSE_PATH in GUARD.disabled:
        return affine_reference_moments(th, sg, s, zp, qmin, qmax, code)
    out = _affine_cell_moments_sparse(th, sg, s, zp, qmin, qmax, code)
    c = th.shape[0]
    k = GUARD.sample_size(SPARSE_PATH, c)
    if k:
        th64, sg64, s64 = _float64_inputs(th, sg, s)
        h = s64 / sg64
        idx = sample_indices(c, k, [h <= FINE_STEP, h > FINE_STEP])
        cd = None if code is None else code[idx]
        ref = affine_reference_moments(th[idx], sg[idx], s[idx], zp[idx], qmin, qmax, cd)
        problem = compare((out.kappa[idx], out.lam[idx], out.m4[idx]), (ref.kappa, ref.lam, ref.m4),
                          h[idx], APPROXIMATION)
        if problem:
            GUARD.fail(SPARSE_PATH, problem, "exact cell sums")
            return affine_reference_moments(th, sg, s, zp, qmin, qmax, code)
        GUARD.passed(SPARSE_PATH, c)
    return out


def affine_cell_moments(
    theta: Tensor,
    sigma: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    code: Tensor | None = None,
) -> CellMoments:
    """``kappa``, ``lam``, ``m4`` of every element of an affine-grid chunk, fast.

    Regimes, chosen per element from the step ``h = scale / sigma``:

    * frozen -- both edges of the element's cell lie beyond 8.5 sigma: all moments are 0
      (< 1e-15 of kappa is lost);
    * fine -- ``h <= 0.5``: the fine-grid expansion of :func:`fine_grid_moments`, with the
      end cells of the code range treated exactly when they are within 8.5 sigma (kappa
      error < 5e-4 h^2 there, measured in tests/test_grids.py);
    * otherwise the exact cell sum over the edges within 8.5 sigma.

    Chunks of at least ``TABLE_MIN_ELEMENTS`` elements go through one branch-free kernel
    (:func:`_fused_affine`; compiled with ``torch.compile`` for large workloads) in which
    steps between 0.5 and 19 sd read a precomputed table of exact sums
    (:func:`uniform_table_moments`, kappa error < 1e-4, measured in tests/test_grids.py) and
    larger steps a two-edge closed form; elements near a clamped end of the code range are
    then recomputed exactly.

    Every optimised path is checked against its reference on a sample of its output (at first
    use per thread count, per new chunk size for compiled code, then every few calls;
    :mod:`~mis_lightning.functional.fastpath`): a path that disagrees is disabled for the
    process with a ``RuntimeWarning`` and the call is recomputed by the next path down.

    Args:
        theta, sigma, scale, zero_point: ``[c]`` (parameter units; ``sigma >= 0``).
        qmin, qmax: the integer code range.
        code: ``[c]`` the backend's codes, if known (ties follow the backend).

    Returns:
        float64 :class:`CellMoments` of shape ``[c]``.
    """
    c = theta.shape[0]
    if c < TABLE_MIN_ELEMENTS or FUSED_PATH in GUARD.disabled:
        return _sparse_checked(theta, sigma, scale, zero_point, qmin, qmax, code)
    th, sg, s, zp = _float64_inputs(theta, sigma, scale, zero_point)
    lo, dlog, du, table = _uniform_table()
    table = table.to(th.device)
    # Every scalar goes in as a 0-d tensor. Python floats given to a dynamic-shape compiled
    # function are traced as symbols, and inductor (torch 2.13) folded the bounds of `clamp`
    # into constants from the first call without guarding them: a kernel compiled for int8
    # (-128..127) then clamped int4 codes to -128..127 (codes off by up to 120, kappa off by
    # 8.6e-3; tests/test_fastpath.py reproduces it with floats).
    bounds = tuple(torch.tensor(float(v), dtype=torch.float64, device=th.device)
                   for v in (qmin, qmax, lo, dlog, du)) + (table,)
    eager = _fused_affine if code is not None else _fused_affine_codes
    q_given = None if code is None else code.to(torch.float64)

    def run(kernel, idx: Tensor | None = None):
        a = (th, sg, s, zp) if idx is None else (th[idx], sg[idx], s[idx], zp[idx])
        if q_given is not None:
            q = q_given if idx is None else q_given[idx]
            return (*kernel(*a, q, *bounds), q)
        return kernel(*a, *bounds)

    kernel, compiled = _fused_kernel(c, with_codes=code is not None)
    try:
        kappa, lam, m4, ok, q0 = run(kernel)
    except Exception as exc:  # noqa: BLE001 - a failed compilation falls back to eager, once
        if not compiled:
            raise
        import warnings

        warnings.warn(f"torch.compile of the cell-moment kernel failed ({type(exc).__name__}: {exc}); "
                      "using the eager kernel", RuntimeWarning, stacklevel=2)
        _FUSED_STATE["failed"] = True
        compiled = False
        kappa, lam, m4, ok, q0 = run(eager)
    h = s / sg
    strata = [h <= FINE_STEP, (h > FINE_STEP) & (h < TABLE_H_MAX), h >= TABLE_H_MAX]
    if compiled:
        k = GUARD.sample_size(COMPILED_PATH, c, per_size=True)
        if k:
            idx = sample_indices(c, k, [*strata, ~ok])
            ek, el, em, eok, eq = run(eager, idx)
            problem = compare((kappa[idx], lam[idx], m4[idx]), (ek, el, em), h[idx], SAME_ARITHMETIC,
                              codes=(torch.cat([q0[idx], ok[idx].double()]), torch.cat([eq, eok.double()])),
                              equal_nan=True)
            if problem:
                GUARD.fail(COMPILED_PATH, problem, "the eager kernel")
                kappa, lam, m4, ok, q0 = run(eager)
            else:
                GUARD.passed(COMPILED_PATH, c)
    coverage = torch.ones_like(kappa)
    bad = ~ok
    if bool(bad.any()):
        idx = torch.nonzero(bad).squeeze(-1)
        mm = _sparse_checked(th[idx], sg[idx], s[idx], zp[idx], qmin, qmax, q0[idx])
        kappa, lam, m4 = kappa.clone(), lam.clone(), m4.clone()
        kappa[idx], lam[idx], m4[idx], coverage[idx] = mm.kappa, mm.lam, mm.m4, mm.coverage
    k = GUARD.sample_size(FUSED_PATH, c)
    if k:
        idx = sample_indices(c, k, [*strata, bad])
        ref = affine_reference_moments(th[idx], sg[idx], s[idx], zp[idx], qmin, qmax,
                                       None if q_given is None else q_given[idx])
        codes = None if q_given is not None else (q0[idx], affine_codes(th[idx], s[idx], zp[idx], qmin, qmax))
        problem = compare((kappa[idx], lam[idx], m4[idx]), (ref.kappa, ref.lam, ref.m4), h[idx],
                          APPROXIMATION, codes=codes)
        if problem:
            GUARD.fail(FUSED_PATH, problem, SPARSE_PATH)
            return _sparse_checked(th, sg, s, zp, qmin, qmax, code)
        GUARD.passed(FUSED_PATH, c)
    return CellMoments(kappa=kappa, lam=lam, m4=m4, coverage=coverage)


def table_boundaries(theta: Tensor, values: Tensor, scale: Tensor, half_window: int) -> Tensor:
    """Cell edges ``[c, 2*half_window + 2]`` on a non-uniform grid ``values * scale``.

    Args:
        theta: ``[c]`` weights (parameter units).
        values: ``[V]`` sorted, unique, finite representable values of the format (e.g.
            every finite float8_e4m3fn value), in units of ``scale``.
        scale: ``[c]`` per-element positive scale (1 for plain dtype casts).
        half_window: edges each side of the element's cell.

    The element's cell is found by nearest value (ties to the upper value; the backend's
    own code, where known, is checked against it by the callers).
    """
    v = values.to(torch.float64)
    mids = 0.5 * (v[1:] + v[:-1])  # [V-1] edges between consecutive values
    x = theta.to(torch.float64) / scale.to(torch.float64)
    cell = torch.searchsorted(mids, x, right=True)  # index of the value whose cell holds x
    i = torch.arange(-half_window + 1, half_window + 1, device=theta.device)
    e = cell.unsqueeze(-1) + i  # edge e separates values e-1 and e, i.e. mids[e-1]
    valid_low = e >= 1
    valid_high = e <= mids.numel()
    edges = mids[(e - 1).clamp(0, mids.numel() - 1)]
    edges = torch.where(valid_low, edges, torch.full_like(edges, -math.inf))
    edges = torch.where(valid_high, edges, torch.full_like(edges, math.inf))
    edges = edges * scale.to(torch.float64).unsqueeze(-1)
    inf = torch.full_like(edges[:, :1], math.inf)
    return torch.cat([-inf, edges, inf], dim=-1)


def table_cell_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int = 18
) -> CellMoments:
    """Cell moments on a non-uniform grid (float formats), skipping frozen elements.

    Args:
        theta, sigma: ``[c]`` weights and their standard deviations (parameter units).
        values: ``[V]`` sorted representable values (units of ``scale``).
        scale: ``[c]`` per-element positive scale.
        half_window: the least number of edges summed each side.

    Returns:
        float64 :class:`CellMoments` ``[c]``. The fine-grid shortcut described below is checked
        against exact sums on a sample (at first use per thread count, then every few calls;
        :mod:`~mis_lightning.functional.fastpath`); on disagreement it is disabled for the
        process with a ``RuntimeWarning`` and exact sums are used.
    """
    if TABLE_PATH in GUARD.disabled:
        return table_reference_moments(theta, sigma, values, scale, half_window)
    out = _table_cell_moments(theta, sigma, values, scale, half_window, FINE_STEP)
    c = theta.shape[0]
    k = GUARD.sample_size(TABLE_PATH, c)
    if k:
        th, sg, sc = _float64_inputs(theta, sigma, scale)
        own = table_boundaries(th, values, sc, 1)[:, 1:3]
        h = (own[:, 1] - own[:, 0]) / sg
        idx = sample_indices(c, k, [h <= FINE_STEP, h > FINE_STEP])
        ref = table_reference_moments(theta[idx], sigma[idx], values, scale[idx], half_window)
        problem = compare((out.kappa[idx], out.lam[idx], out.m4[idx]), (ref.kappa, ref.lam, ref.m4),
                          h[idx], APPROXIMATION)
        if problem:
            GUARD.fail(TABLE_PATH, problem, "exact cell sums")
            return table_reference_moments(theta, sigma, values, scale, half_window)
        GUARD.passed(TABLE_PATH, c)
    return out


def table_reference_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int = 18
) -> CellMoments:
    """Reference cell moments on a float-format grid: exact sums over every edge within 8.5 sd
    (the fine-grid expansion only where a window would exceed 512 edges, or below
    ``REFERENCE_FINE_STEP``). Arguments and returns as :func:`table_cell_moments`."""
    return _table_cell_moments(theta, sigma, values, scale, half_window, REFERENCE_FINE_STEP)


def _table_cell_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int, fine_step: float
) -> CellMoments:
    """Cell moments on a non-uniform grid (float formats), skipping frozen elements.

    Elements whose own cell's edges lie beyond 8.5 sigma are frozen (moments 0); elements
    whose own cell is narrower than 0.5 sigma *and* whose grid is uniform within 8.5 sigma
    use the fine-grid expansion with their local step; the rest sum over every edge within
    8.5 sigma (at least ``half_window`` each side), grouped by the window they need.

    A float grid is not uniform everywhere: its step halves at each binade edge towards
    zero. The fine-grid expansion with the local step is therefore used only where no step
    change lies within 8.5 sigma (it was off by up to 1.5e-2 in kappa for float8 e4m3 next
    to a binade edge), and the window is sized by counting the edges within 8.5 sigma
    (a fixed 18 edges of >= 0.5 sigma misses part of 8.5 sigma when the cells shrink
    towards zero; kappa was off by up to 3e-5). Both are checked against the full cell sum
    in tests/test_grids.py. Where more than ``_MAX_WINDOW`` edges lie within 8.5 sigma on
    one side and the own cell is fine (float16 steps below ~0.033 sigma next to a binade
    edge, or windows reaching into the tiny cells near zero) the fine expansion with the
    local step is used: it is then off by at most ``(h_max^2 - h_min^2) / 12`` with
    ``h_max``, ``h_min`` the largest and smallest steps within 8.5 sigma (kappa ~
    ``1 - E[h(U)^2] / 12``), i.e. <= h^2/4 at a single binade edge. Weights beyond the
    largest value with sigma so large that more than ``_MAX_WINDOW`` edges lie within 8.5
    sigma (from beyond 65504 back towards 0 in float16) are summed over ``_MAX_WINDOW``
    edges each side only.
    """
    th, sg, sc = _float64_inputs(theta, sigma, scale)
    c = th.shape[0]
    kappa = torch.zeros(c, dtype=torch.float64, device=th.device)
    lam, m4 = torch.zeros_like(kappa), torch.zeros_like(kappa)
    coverage = torch.ones_like(kappa)
    own = table_boundaries(th, values, sc, 1)[:, 1:3]  # the element's own cell edges
    frozen = ((th - own[:, 0]) / sg > CUTOFF_SIGMAS) & ((own[:, 1] - th) / sg > CUTOFF_SIGMAS)
    h_local = (own[:, 1] - own[:, 0]) / sg  # inf for the outermost cells

    # Value cells (index k: between mids[k-1] and mids[k]) holding theta and the two ends
    # of its 8.5-sigma reach, in units of the scale.
    v = values.to(device=th.device, dtype=torch.float64)
    mids = 0.5 * (v[1:] + v[:-1])
    reach = CUTOFF_SIGMAS * sg / sc
    x = th / sc
    cell = torch.searchsorted(mids, x, right=True)
    cell_lo = torch.searchsorted(mids, x - reach, right=True)
    cell_hi = torch.searchsorted(mids, x + reach, right=True)
    # Edges needed each side: those within the reach plus the first one beyond it.
    need = torch.maximum(cell - cell_lo, cell_hi - cell) + 1
    # Uniform within the reach: the cells cell_lo..cell_hi are all finite and no step
    # change lies between them (counted with a cumulative sum over the table).
    widths = mids[1:] - mids[:-1]  # width of finite value cell k is widths[k - 1]
    change = ~torch.isclose(widths[1:], widths[:-1], rtol=1e-9, atol=0.0)
    changes = torch.cat([change.new_zeros(1, dtype=torch.long), change.long().cumsum(0)])
    inner = (cell_lo >= 1) & (cell_hi <= mids.numel() - 1)
    a = (cell_lo - 1).clamp(0, max(changes.numel() - 1, 0))
    b = (cell_hi - 1).clamp(0, max(changes.numel() - 1, 0))
    uniform = inner & (changes[b] == changes[a])

    # Windows wider than _MAX_WINDOW edges cannot be summed: the expansion is used there even
    # by the reference (fine_step < FINE_STEP).
    fine = ~frozen & (((h_local <= fine_step) & uniform) | ((h_local <= FINE_STEP) & (need > _MAX_WINDOW)))
    if bool(fine.any()):
        fm = fine_grid_moments(h_local[fine])
        kappa[fine], lam[fine], m4[fine] = fm.kappa, fm.lam, fm.m4
    rest = ~(frozen | fine)
    if bool(rest.any()):
        idx_rest = torch.nonzero(rest).squeeze(-1)
        need_rest = need[rest].clamp(min=half_window, max=_MAX_WINDOW)
        lo_bound = 0
        for m in sorted({half_window, *(w for w in _TABLE_BUCKETS if w > half_window), _MAX_WINDOW}):
            sel = (need_rest > lo_bound) & (need_rest <= m)
            lo_bound = m
            if not bool(sel.any()):
                continue
            idx = idx_rest[sel]
            step = max(1, (1 << 20) // (2 * m + 2))  # bound the [rows, 2m + 2] working set
            for a0 in range(0, idx.numel(), step):
                ii = idx[a0 : a0 + step]
                edges = table_boundaries(th[ii], values, sc[ii], m)
                alpha = (edges - th[ii].unsqueeze(-1)) / sg[ii].unsqueeze(-1)
                mm = moments_from_alpha_fast(alpha)
                kappa[ii], lam[ii], m4[ii], coverage[ii] = mm.kappa, mm.lam, mm.m4, mm.coverage
    return CellMoments(kappa=kappa, lam=lam, m4=m4, coverage=coverage)
