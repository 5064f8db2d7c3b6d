"""torchao's intx weight-only schemes on bf16 / fp16 weights are scored on their real cells.

torchao rounds ``w * (1 / scale)`` to the weights' dtype before rounding it to a code (qx27
audit, F1): int8 codes in bf16 get cells of 0.5 and 1.5 steps. The grid must (1) give the
release torchao gives on every weight and (2) score the real cells.

References, independent of the library's cell code:
(1) torchao ``quantize_`` + ``dequantize()`` on a model holding every value of the dtype in a
    block's range (so every weight next to every real edge, on both sides);
(2) a closed-form Gaussian cell-probability sum (scipy ``ndtr``) over a partition built from
    torchao's own codes: torchao's ``quantize_affine`` on every dtype value of the quotient
    (scale 1) gives the integer of each quotient; the edges are the midpoints between adjacent
    dtype values whose integer differs (the quotient is rounded to nearest), divided by
    ``1 / scale`` as torchao computes it. The partition is checked against the real release of
    (1) before it is used. Tolerance 1e-6 relative: both sides are float64 sums over the same
    edges, whose rounding is ~1e-15; the midpoint grid of the old code reads 8-30% off at these
    positions (int8 in bf16).
"""
import dataclasses

import numpy as np
import pytest
import torch
from _lowp import dtype_values, sweep_linear
from scipy.special import ndtr
from torch import nn

from mis_lightning.quantization.torchao_backend import IntxWeightOnly

pytest.importorskip("torchao")

def _scheme(bits: int, per_row: bool, asym: bool) -> IntxWeightOnly:
    return IntxWeightOnly(bits=bits, granularity="per_row" if per_row else "per_group",
                          group_size=None if per_row else 32, mapping="asymmetric" if asym else "symmetric")


def _sweep_model(dtype: torch.dtype, m: float, lo: float, width: int, bits: int) -> tuple[nn.Module, int]:
    """A Linear whose rows (blocks of ``width``) hold ``m`` and ``lo`` (fixing every block's scale
    and zero point) and then every ``dtype`` value in ``[lo, m]`` but those within a quarter step
    of 0 (deep inside one cell: the dtype's values pile up there); the number of sweep weights."""
    vals = dtype_values(lo, m, dtype)
    vals = vals[vals.abs() >= 0.25 * (m - lo) / 2 ** bits]
    return sweep_linear(vals, m, lo, width, dtype), vals.numel()


CASES = [(dt, bits, per_row, asym) for dt in (torch.bfloat16, torch.float16) for bits in (8, 4)
         for per_row in (False, True) for asym in (False, True)]


def _id(case):
    dt, bits, per_row, asym = case
    return f"{str(dt)[6:]}-int{bits}-{'row' if per_row else 'g32'}-{'asym' if asym else 'sym'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_grid_gives_torchaos_release_on_every_weight(case):
    dtype, bits, per_row, asym = case
    m = 0.0371
    lo = -0.61 * m if asym else -m
    model, _ = _sweep_model(dtype, m, lo, 128 if per_row else 32, bits)
    theta = model[0].weight.detach().double().reshape(-1)
    res = _scheme(bits, per_row, asym).apply(model)
    g = res.grids["0.weight"]
    # torchao's release: the quantized copy's dequantize(), as the model serves it
    released = res.model[0].weight.dequantize().float().reshape(-1)
    assert torch.equal(g.cell_value(theta, 0, g.numel).float(), released)
    # the grid's cell of each weight, located from the weight alone, is torchao's code: the
    # moments read from the located cells equal those read from torchao's codes, bit for bit
    sg = torch.full_like(theta, 0.4 * float(g.scale.double().reshape(-1)[0]))
    a = g.moments(theta, sg, 0, g.numel, use_codes=True)
    b = g.moments(theta, sg, 0, g.numel, use_codes=False)
    assert torch.equal(a.kappa, b.kappa) and torch.equal(a.m4, b.m4)
    # and each weight lies within the edges the grid scores for its code (every dtype value
    # next to every real edge is in the sweep, on both sides); the block's extremes, which the
    # scale gives away, lie beyond the bounds the release puts on the other (stored) weights
    e = g.boundaries(theta, 0, g.numel, 1)
    inside = (e[:, 1] <= theta) & (theta <= e[:, 2])
    assert bool((inside | g.revealed.reshape(-1)).all())
    assert not [n for n in res.notes if "w / scale" in n]


def _truth_edges(dtype: torch.dtype, scale: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Real edges (parameter units), the quotient integer of the cell above each, ``inv`` and
    whether a quotient exactly at the edge's midpoint goes up (the dtype's ties to even), from
    torchao's own rounding of every dtype value of the quotient."""
    from torchao.quantization.quant_primitives import _quantize_affine_no_dtype_cast

    x = dtype_values(-300.0, 300.0, dtype).to(dtype)
    j = _quantize_affine_no_dtype_cast(x.reshape(1, -1), [1, x.numel()], torch.ones(1, 1, dtype=dtype),
                                       torch.zeros(1, 1, dtype=torch.int32), -1000, 1000).double().reshape(-1).numpy()
    xv = x.double().numpy()
    ch = np.nonzero(np.diff(j))[0]
    inv = float((1.0 / scale.to(dtype)).double())  # torchao's input * (1.0 / scale)
    mid = 0.5 * (xv[ch] + xv[ch + 1])
    up = torch.from_numpy(mid).float().to(dtype).double().numpy() == xv[ch + 1]
    return mid / inv, j[ch + 1], inv, up


def _truth_kappa(theta: float, sigma: float, edges: np.ndarray, lower: float, upper: float) -> float:
    """sum over cells of (phi(a) - phi(b))^2 / (Phi(b) - Phi(a)), the cells cut at the release's
    bounds ``[lower, upper]``, and beyond them the weight revealed (E[U^2] over each tail,
    method.md section 5): ``Phi(a) - a phi(a)`` below ``a`` and ``1 - Phi(b) + b phi(b)`` above ``b``."""
    inner = edges[(edges > lower) & (edges < upper)]
    e = np.concatenate([[lower], inner, [upper]])
    a = (e - theta) / sigma
    pdf = np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
    cdf = ndtr(a)
    p = np.diff(cdf)
    d = pdf[:-1] - pdf[1:]
    live = p > 1e-300
    lo_a, hi_b = a[0], a[-1]
    tails = (ndtr(lo_a) - lo_a * pdf[0]) + (ndtr(-hi_b) + hi_b * pdf[-1])
    return float((d[live] ** 2 / p[live]).sum() + tails)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_leakage_equals_gaussian_cell_truth_on_torchaos_cells(case):
    dtype, bits, per_row, asym = case
    m = 1.0
    lo = -0.61 * m if asym else -m
    model, _ = _sweep_model(dtype, m, lo, 128 if per_row else 32, bits)
    theta_w = model[0].weight.detach().double().reshape(-1)
    res = _scheme(bits, per_row, asym).apply(model)
    # the quotient table in the continuous model (the grid's own edges; the storage rounding of
    # the weights, which moves them to the storage midpoints, is tests/test_storage_rounding.py's)
    g = dataclasses.replace(res.grids["0.weight"], storage_dtype=None)
    scale, zp, code = g.element_grid(0, g.numel)
    s0, z0 = scale[2], zp[2]
    edges, upper_j, inv, up = _truth_edges(dtype, torch.tensor(float(s0)))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    jlo, jhi = qmin - float(z0), qmax - float(z0)
    # the truth partition holds every real weight in the cell of torchao's code
    keep = (upper_j > jlo) & (upper_j <= jhi)
    x, mids = theta_w.numpy() * inv, edges[keep] * inv  # quotients (exact), edges in quotient units
    cell_of = np.searchsorted(mids, x, side="right")
    tie = (cell_of > 0) & (x == mids[np.maximum(cell_of - 1, 0)]) & ~up[keep][np.maximum(cell_of - 1, 0)]
    cell_of = cell_of - tie
    j_of = np.concatenate([[jlo], upper_j[keep]])[cell_of]
    assert np.array_equal(j_of, (code - zp).numpy())
    step = float(s0)
    # sd = step/2 and step, positions over the block's range (the edges outside the clamped code
    # range are dropped: the two end cells run to the bounds)
    inside = edges[keep]
    pos = torch.linspace(0.97 * lo, 0.97 * m, 121, dtype=torch.float64)
    s_el, z_el = s0.expand(pos.numel()).clone(), z0.expand(pos.numel()).clone()
    for ratio in (0.5, 1.0):
        sd = ratio * step
        mm = g.element_moments(pos, torch.full_like(pos, sd), s_el, z_el, None,
                               (torch.full_like(pos, lo), torch.full_like(pos, m)))
        truth = torch.tensor([_truth_kappa(float(p), sd, inside, lo, m) for p in pos], dtype=torch.float64)
        rel = (mm.kappa / truth - 1).abs().max()
        assert float(rel) < 1e-6, (ratio, float(rel))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float8_cell_value_breaks_ties_to_even_as_torchao(dtype):
    """float8 on bf16 / fp16 weights: with the block's absmax at the format's largest value the
    scale is 1, so many weights sit exactly between two float8 values; torchao rounds them to
    the even one (the old ``cell_value`` took the upper one: 1/16 step off at most)."""
    from mis_lightning.quantization.torchao_backend import Float8WeightOnly

    top = float(torch.finfo(torch.float8_e4m3fn).max)
    model, _ = _sweep_model(dtype, top, -top, 128, 8)
    theta = model[0].weight.detach().double().reshape(-1)
    res = Float8WeightOnly().apply(model)
    g = res.grids["0.weight"]
    assert bool((g.scale.double() == 1.0).all())
    released = res.model[0].weight.dequantize().double().reshape(-1)
    mids = 0.5 * (g.values.double()[1:] + g.values.double()[:-1])
    assert int(torch.isin(theta, mids).sum()) > 100  # the premise: exact ties in the sweep
    assert torch.equal(g.cell_value(theta, 0, g.numel), released)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_wide_sd_reads_the_midpoints_within_the_stated_bound(asym, monkeypatch):
    """Above ``QUOTIENT_EXACT_MAX_SD`` steps a quotient grid is scored on its midpoints (the real
    cells' sums cost 5-17x and their difference fades as 1 / (sd / step)^2): at 8.5 steps, int8 in
    bf16 (the widest cells: 0.5 / 1.5 steps), kappa within 1.2e-3, mean_abs 4e-3 and m4 2.4e-3
    of the real cells' moments (measured at 8 steps: 9.7e-4, 3.3e-3, 1.9e-3); at 7.5 steps the
    real cells' moments exactly. A switch that moved the wrong way (midpoints at small sd, where
    they are 5-17% off) fails the first assertion."""
    from mis_lightning.quantization import base

    m = 1.0
    lo = -0.61 * m if asym else -m
    model, _ = _sweep_model(torch.bfloat16, m, lo, 32, 8)
    g = dataclasses.replace(_scheme(8, False, asym).apply(model).grids["0.weight"], storage_dtype=None)
    scale, zp, _ = g.element_grid(0, g.numel)
    s0, z0 = scale[2], zp[2]
    pos = torch.linspace(0.9 * lo, 0.9 * m, 301, dtype=torch.float64)
    n = pos.numel()
    rep = lambda t: t.reshape(1).expand(n).clone()  # noqa: E731
    bounds = (torch.full_like(pos, lo), torch.full_like(pos, m))
    step = float(s0)

    def moments(ratio: float, exact: bool):
        monkeypatch.setattr(base, "QUOTIENT_EXACT_MAX_SD", float("inf") if exact else 8.0)
        return g.element_moments(pos, torch.full_like(pos, ratio * step), rep(s0), rep(z0), None, bounds)

    wide, wide_exact = moments(8.5, False), moments(8.5, True)
    # the switch took the midpoints, the bounds' outer cells included
    mid = dataclasses.replace(g, kind="affine", quotient_dtype=None)
    sd = torch.full_like(pos, 8.5 * step)
    assert torch.equal(wide.kappa, mid.element_moments(pos, sd, rep(s0), rep(z0), None, bounds).kappa)
    for f, tol in (("kappa", 1.2e-3), ("mean_abs", 4e-3), ("m4", 2.4e-3)):
        r = getattr(wide, f) / getattr(wide_exact, f)
        assert float((r - 1).abs().max()) < tol, f
    narrow, narrow_exact = moments(7.5, False), moments(7.5, True)
    for f in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(narrow, f), getattr(narrow_exact, f))
