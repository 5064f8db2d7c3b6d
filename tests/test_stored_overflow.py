"""The overflow cells of weights *stored* in bf16 / fp16 (method.md section 5, "Weights stored in
bf16 / fp16"; fs40).

A model stored in ``D`` holds ``rnd_D(theta-hat)``, and ``rnd_D`` sends every real value from the
midpoint between ``D``'s largest finite value and the next power of two on (fp16: ``|x| >= 65520``;
bf16: ``>= (2 - 2^-8) 2^127``) to ``+-inf``: the largest value's storage cell ends there and an
unbounded cell of ``inf`` lies beyond. Before fs40 the storage cells (the storage grid, revealed
weights, the grids that hold every stored value) ran the largest value's cell on to infinity and
the stored edges (``stored_edges``) put the edge above it at ``(65504 + inf) / 2 = inf``: kappa read
low (the unsafe side), e.g. 0.229 for 0.428 at 65504 with sd 9.8, and 0 for a ``bf16`` cast of an
fp16-stored weight there.

The reference is independent of the library's cell code: the release ``R(x)`` computed by torch's
own casts of a fine grid of float32 values ``x`` (float32 -> ``D`` is one rounding; float64 -> ``D``
in torch rounds twice, through float32), each change of ``R`` between neighbours bisected over the
float32 values down to two adjacent ones, and the Gaussian integrated over the intervals in closed
form (scipy's ``ndtr``). ``R`` depends on ``x`` through ``rnd_D(x)`` alone, so every edge is a
midpoint between ``D`` values, which float32 holds with trailing zero bits: of the two adjacent
float32 values bracketing a change, the edge is the one with the even significand. Where the
cells within reach are wider than the samples' spacing (8,192 samples; asserted) the partition is
exact: tolerance 1e-9 on kappa and E|m| (float64 sums of a few to ~100 cells; measured within
1e-13), 4e-9 on m4 (its terms carry ``mu^4``). Where they are not (sd 1e5 around 0: fp16's cells
near 0), 2^20 samples (spacing ``h`` = 18 sd / 2^20) merge the cells narrower than ``h``, which moves
kappa by at most ``(2 h / sd)^2 / 4 < 3e-10`` (a cell ``m`` refined gains at most
``p_m (w_m / sd)^2 / 4``; measured within 4e-13 of the sums over every cell).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import ndtr
from torch import nn

from mis_lightning.functional.storage import (
    storage_cell_moments,
    storage_values,
    stored_bounds,
)
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.casts import cast_cell_values
from mis_lightning.quantization.storage_grid import storage_grid

F64 = torch.float64
FP16, BF16 = torch.float16, torch.bfloat16
TOL = 1e-9
_N = 1 << 20
_L = 9.0  # sd each side sampled; beyond: the outer cells (mass 2e-19)


def _ordered32(x: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 values, increasing with the value (-0 and +0 both 0)."""
    b = x.view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b, -(b & 0x7FFFFFFF))


def _from_ordered32(o: torch.Tensor) -> torch.Tensor:
    b = torch.where(o >= 0, o, (-o) | 0x80000000)
    b = torch.where(b >= 1 << 31, b - (1 << 32), b)
    return b.to(torch.int32).view(torch.float32)


def _edges(theta: float, sd: float, release, n: int) -> np.ndarray:
    """The edges of the partition ``R`` puts on ``theta +- 9 sd`` (float64, ascending), from ``n``
    samples. ``R`` is monotone, so a bracket between two samples that holds two changes or more
    ends its bisection on a code other than its upper sample's: with ``n < _N`` that is asserted
    (no cell merged: the partition is exact); with ``_N`` such cells are merged (the bound above)."""
    x = (theta + sd * torch.linspace(-_L, _L, n, dtype=F64)).to(torch.float32)
    x = x[torch.isfinite(x)]
    r = release(x)
    ch = torch.nonzero(r[1:] != r[:-1]).squeeze(-1)
    lo, hi = _ordered32(x[ch]), _ordered32(x[ch + 1])
    r_lo = r[ch]
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        same = release(_from_ordered32(mid)) == r_lo
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    a, b = _from_ordered32(lo), _from_ordered32(hi)
    if n < _N:
        assert torch.equal(release(b), r[ch + 1]), "cells narrower than the samples' spacing"
    even = (a.view(torch.int32) & 1) == 0
    return torch.where(even, a, b).to(F64).numpy()


def _moments(theta: float, sd: float, edges: np.ndarray) -> tuple[float, float, float]:
    """``(kappa, E|m|, m4)`` of the cells between ``edges`` (and beyond them) by direct
    integration: ``p = Phi(b) - Phi(a)``, ``mu = (phi(a) - phi(b)) / p`` in sd units."""
    a = np.concatenate([[-np.inf], (edges - theta) / sd, [np.inf]])
    pdf = np.where(np.isfinite(a), np.exp(-0.5 * np.where(np.isfinite(a), a, 0.0) ** 2) / math.sqrt(2 * math.pi), 0.0)
    # each cell's probability as a difference of tails on its side of 0 (no cancellation)
    p = np.where(a[1:] <= 0, ndtr(a[1:]) - ndtr(a[:-1]), ndtr(-a[:-1]) - ndtr(-a[1:]))
    d = pdf[:-1] - pdf[1:]
    live = p > 1e-300
    mu = np.where(live, d / np.where(live, p, 1.0), 0.0)
    return float((p * mu**2).sum()), float((p * np.abs(mu)).sum()), float((p * mu**4).sum())


def reference(theta: float, sd: float, release, n: int = 1 << 13) -> tuple[float, float, float]:
    """``(kappa, E|m|, m4)`` of the release ``R`` (float32 ``[n]`` -> comparable ``[n]``) of a
    weight ``N(theta, sd^2)``, from ``n`` samples."""
    return _moments(theta, sd, _edges(theta, sd, release, n))


def _stored(dtype: torch.dtype):
    return lambda x: x.to(dtype).to(F64)


def _cast_of_stored(dtype: torch.dtype, cast: torch.dtype):
    return lambda x: x.to(dtype).to(cast).to(F64)


def _linear(vals: list[float], dtype: torch.dtype) -> nn.Sequential:
    lin = nn.Linear(len(vals), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(vals, dtype=F64).reshape(1, -1))
    return nn.Sequential(lin.to(dtype))


def _check(got, theta: float, sd: float, release, fine: float = 0.0) -> None:
    """``got`` (a ``CellMoments`` of one element) against :func:`reference` within ``TOL`` plus
    ``fine`` (the fine-grid expansion's own error, where the path takes it; there the reference
    merges cells narrower than its spacing: ``_N`` samples)."""
    k, ma, m4 = reference(theta, sd, release, _N if fine else 1 << 13)
    assert abs(float(got.kappa) - k) <= TOL + fine, (theta, sd, float(got.kappa), k)
    assert abs(float(got.mean_abs) - ma) <= TOL + fine, (theta, sd, float(got.mean_abs), ma)
    assert abs(float(got.m4) - m4) <= 4 * (TOL + fine), (theta, sd, float(got.m4), m4)


def _max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _ulp_max(dtype: torch.dtype) -> float:
    """The gap below the largest finite value (fp16 32, bf16 2^120)."""
    top = torch.tensor([_max(dtype)], dtype=dtype)
    return float(top.double() - (top.view(torch.int16) - 1).view(dtype).double())


# (theta, sd) in units of the gap below the largest value: at it and one gap below, sds from a
# third of a gap to 10 gaps, both signs
_NEAR = [(0, 0.3), (0, 10 / 32), (-1, 1.0), (0, 3.0), (-2, 10.0)]


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
def test_storage_cells_hold_the_overflow_cells(dtype, sign):
    """The storage grid (a weight left unquantized) and ``storage_cell_moments`` (revealed weights,
    grids that hold every stored value) read the cast's own cells at the largest value, against
    the brute-force release ``rnd_D(x)``; and at sd 1e5 (fp16) around 0, where the overflow cells
    hold 51% of the mass: there the table path takes the fine-grid expansion over the finite cells
    (``table._open_fine_moments``), within its own error ``(32 / sd)^2 / 12`` (8.5e-9; measured
    2.3e-9 high, the conservative side) as tests/test_cast_cells.py allows."""
    top, gap = _max(dtype), _ulp_max(dtype)
    g = storage_grid("w", (1, 1), dtype)
    cases = [(sign * (top + k * gap), s * gap, 0.0) for k, s in _NEAR]
    if dtype == FP16:
        cases.append((sign * 0.01, 1e5, (gap / 1e5) ** 2 / 12))
    for th, sd, fine in cases:
        t, s = torch.tensor([th], dtype=F64), torch.tensor([sd], dtype=F64)
        _check(g.moments(t, s, 0, 1), th, sd, _stored(dtype), fine)
        _check(storage_cell_moments(t, s, dtype), th, sd, _stored(dtype), fine)


def test_the_storage_table_is_the_casts_cell_table():
    """The storage cells' values are the cast's (``casts.cast_cell_values``: every finite value and
    ``+-2^(emax + 1)`` standing for ``+-inf``); the storage grid releases ``inf`` there."""
    for dtype in (FP16, BF16):
        assert torch.equal(storage_values(dtype), cast_cell_values(dtype))
        g = storage_grid("w", (1, 3), dtype)
        top = _max(dtype)
        x = torch.tensor([top, top + 0.5 * _ulp_max(dtype), -2 * top], dtype=F64)
        assert torch.equal(g.cell_value(x, 0, 3), torch.tensor([top, math.inf, -math.inf], dtype=F64))


@pytest.mark.parametrize("stored,cast", [(FP16, BF16), (BF16, FP16), (BF16, BF16)], ids=["bf16-on-fp16", "fp16-on-bf16", "bf16-on-bf16"])
def test_cast_schemes_on_stored_weights_read_the_overflow_cell(stored, cast):
    """A cast scheme on stored weights near the stored format's largest value: ``bf16`` on fp16
    weights (fp16's 65504 and the values below it round to bf16's 65536; fp16's ``inf`` stays
    ``inf``: the stored edge between them is 65520, not ``inf``: kappa 0 before), ``fp16`` on bf16
    weights (bf16's values from 65536 up overflow fp16, so do bf16's ``inf``: one cell), ``bf16`` on
    bf16 weights (every stored value a key of its own: the storage cells). Against ``R(x) =
    cast(rnd_D(x))`` brute-forced, both signs."""
    top = _max(stored) if stored == FP16 else 65280.0
    gap = _ulp_max(stored) if stored == FP16 else 256.0
    if (stored, cast) == (BF16, BF16):
        top, gap = _max(BF16), _ulp_max(BF16)
    vals = [top, -top, top - gap, -(top - gap), 1.0]
    model = _linear(vals, stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = get_scheme({BF16: "bf16", FP16: "fp16"}[cast]).apply(model).grids["0.weight"]
    assert g.storage_dtype == stored
    th = model[0].weight.detach().double().reshape(-1)
    for ratio in (0.3, 10 / 32, 1.0, 3.0):
        sd = ratio * gap
        mm = g.moments(th, torch.full_like(th, sd), 0, g.numel)
        for i in range(4):
            got = type(mm)(kappa=mm.kappa[i], mean_abs=mm.mean_abs[i], m4=mm.m4[i], coverage=mm.coverage[i])
            _check(got, float(th[i]), sd, _cast_of_stored(stored, cast))


def test_reach_past_the_overflow_reads_the_overflow_cells_at_any_sd():
    """``bf16`` on fp16 weights whose reach passes +-65520 at sds where the grid's own edges stood
    in for the stored cells (above 16 storage ulps and 2 cells): the grid's cells run on past 65520
    where the stored ones end (kappa 0.18 high at 65504 with sd 3e3-3e4, 0.14 at 60000 with sd 3e4,
    3e-3 at 1 with sd 3e4, before). Windows of at most ``STORAGE_OVERFLOW_MAX_WINDOW`` keys (sd 3e3
    here) take the stored cells' sums: within ``TOL`` of the reference; the wider ones (sd 1e4, 3e4:
    the reach spans bf16's ~38k keys of fp16's range) the open cells' closed form
    (``ParamGrid._overflow_open_moments``): never below the reference (``-TOL``), above it by at
    most the finite cells' ``(w / sd)^2 / 12``, ``w`` bf16's step at ``|theta| + 8.5 sd`` (<= 8.7e-4;
    measured 2e-6 to 5.2e-5). E|m| and m4 alike (m4 4x). 2^20 samples where fp16's cells near 0 lie
    within reach (the merged-cell bound, 3e-10)."""
    vals = [65504.0, -65504.0, 60000.0, -50000.0, 1.0, -65000.0]
    model = _linear(vals, FP16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = get_scheme("bf16").apply(model).grids["0.weight"]
    th = model[0].weight.detach().double().reshape(-1)
    for sd in (3e3, 1e4, 3e4):
        mm = g.moments(th, torch.full_like(th, sd), 0, g.numel)
        for i in range(th.numel()):
            t = float(th[i])
            if abs(t) + 8.5 * sd < 65520:
                continue
            k, ma, m4 = reference(t, sd, _cast_of_stored(FP16, BF16), _N if abs(t) < 8.5 * sd else 1 << 13)
            hi = TOL
            if sd > 3e3:
                w = 2.0 ** (math.floor(math.log2(abs(t) + 8.5 * sd)) - 7)
                hi += (w / sd) ** 2 / 12
            d = float(mm.kappa[i]) - k
            assert -TOL <= d <= hi, (t, sd, float(mm.kappa[i]), k)
            assert abs(float(mm.mean_abs[i]) - ma) <= hi and abs(float(mm.m4[i]) - m4) <= 4 * hi, (t, sd)
            if sd > 3e3 and abs(t) > 1e3:
                # the open cells' form: E|m| exact on the own stored cell (fx50; the expansion's
                # average was up to 5e-5 off), where the reference holds that cell unmerged (bf16's
                # cells there are >= 256 wide, the samples' spacing <= 0.6)
                assert abs(float(mm.mean_abs[i]) - ma) <= 1e-12, (t, sd, float(mm.mean_abs[i]), ma)


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_stored_bounds_at_the_largest_value_end_at_the_overflow_midpoint(dtype):
    """A block whose stored minimum is the largest value (or maximum the most negative one): the
    continuous weights of its other elements lie beyond the midpoint to the next value, which is
    the overflow threshold (inf before)."""
    top, gap = _max(dtype), _ulp_max(dtype)
    lo, hi = stored_bounds(torch.tensor([top, -top], dtype=F64), torch.tensor([math.inf, -top], dtype=F64), dtype)
    assert lo[0] == top + gap / 2 and hi[1] == -(top + gap / 2)
    assert torch.tensor([top + gap / 2], dtype=F64).to(torch.float32).to(dtype).isinf().all()
    assert torch.tensor([top + gap / 2 - 1e-3 * gap], dtype=F64).to(torch.float32).to(dtype).isfinite().all()
