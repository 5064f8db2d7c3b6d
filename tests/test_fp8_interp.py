"""The interpolated float8 cell moments (``functional/interp.py``, issue 13: ``fp8_weight_only`` at
most 2x an integer scheme) against the exact sum over every cell of the table built from all 256
bit patterns.

Where a float8 weight's sd spans many cells 0.2-4 sd wide, ``table._table_fast_moments`` reads
``kappa`` and ``m4`` from a table of exact sums (per value cell of ``|x|``, ``SPLIT`` pieces each
with a degree-``DEGREE`` polynomial in the position; 6-point Lagrange interpolation along
``log2 sd`` at 32 slices per octave) instead of summing the cells; ``mean_abs`` stays exact
(telescoped over the own cell). Tolerances (absolute, float64; kappa <= 1, m4 <= 3):
``TOL`` below (``interp.TOLERANCE``), measured <= 4.7e-9 in kappa and <= 1.04e-7 in m4 over
60,000 positions per format across the whole table (values and cell edges exactly, 0, +-max,
negatives, subnormals) with sds from 2^-12.5 to 2^10.5 table units, and <= 1.2e-7 (largest of the three) in the
speed benchmark's settings (docs/benchmarks.md, "Twenty-second session: fp8"). Leakage and MIS are sums over weights of per-weight kappa (and
mean_abs / m4 in the one-coordinate and spread forms), so errors of this size per weight, of
either sign, move them by at most ~1e-7 relative where kappa is of order 1e-2 or more; the
end-to-end runs there (the 1e5 MLP, sigma 0.03-3 x the weight sd) moved by <= 1.6e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import interp as I
from mis_lightning.functional import table as T

F64 = torch.float64
TOL = {"kappa": I.TOLERANCE["kappa"], "mean_abs": 1e-12, "m4": I.TOLERANCE["m4"]}
FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]
# every finite float8 value from its 256 bit patterns; the exact moments over every cell
from test_fp8_core_rules import _all_values, _full_sum  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_fresh_guard")


def _cases(dtype: torch.dtype, c: int, seed: int, log2_s: tuple[float, float] = (-3.0, 2.0)):
    """Weights over the whole table (log-uniform |x|, the values and cell edges exactly, 0, +-max,
    both signs) with sds log-uniform over ``log2_s`` octaves (table units; the default spans
    float8's subnormals to its top binades' cells 0.1-4 sd wide) and per-element scales."""
    gen = torch.Generator().manual_seed(seed)
    values = _all_values(dtype)
    vmax = float(values.max())
    mids = 0.5 * (values[1:] + values[:-1])
    ax = torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(2.0**-12), math.log(vmax), generator=gen))
    exact = torch.cat([values[values >= 0], mids[mids > 0]])
    m = c // 5
    ax[:m] = exact[torch.randint(0, exact.numel(), (m,), generator=gen)]  # binade edges, cell edges
    ax[m : m + 20] = 0.0
    ax[m + 20 : m + 40] = vmax
    sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    scale = torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1e-3), 0.0, generator=gen))
    s = 2.0 ** torch.empty(c, dtype=F64).uniform_(*log2_s, generator=gen)
    return sign * ax * scale, s * scale, values, scale


def _errors(theta, sigma, values, scale, ref, fn=T._table_fast_moments):
    got, mask = fn(theta, sigma, values, scale)
    return {k: float((getattr(got, k) - ref[k]).abs().max()) for k in TOL}, mask


@pytest.mark.parametrize("dtype", FORMATS)
def test_interpolated_moments_equal_the_exact_sum_over_every_value(dtype):
    """Most elements on the interpolation table, every element within ``TOL`` of the exact sum
    (the rest on the exact path, within its own 1e-11)."""
    theta, sigma, values, scale = _cases(dtype, 6000, 22)
    ref = _full_sum(theta, sigma, values, scale)
    it = I.interp_table(values)
    done, *_ = it.moments(theta / scale, sigma / scale)
    assert float(done.double().mean()) > 0.5
    err, mask = _errors(theta, sigma, values, scale, ref)
    assert bool(mask[done].all())
    for k, tol in TOL.items():
        assert err[k] <= tol, (k, err[k])


def test_interpolation_covers_every_sd_octave():
    """sds at both ends of the table's range (2^-12 .. 2^10 table units) and the edges of its
    octaves: float8 e4m3 within ``TOL`` everywhere, the uncovered ones (beyond the range, own
    cells wider than ``MAX_OWN_STEP`` sd, the unbounded top cell with sds below a quarter of its
    span up to 448) exactly summed."""
    values = _all_values(torch.float8_e4m3fn)
    lo, hi = I.LOG2_S_RANGE
    lam = torch.cat([torch.tensor([lo - 0.5, lo, lo + 1e-9, hi - 1e-9, hi, hi + 0.5], dtype=F64),
                     torch.arange(int(lo), int(hi) + 1, dtype=F64)])
    gen = torch.Generator().manual_seed(5)
    c = 40
    x = torch.linspace(-448.0, 448.0, c, dtype=F64)[:, None] * torch.rand(1, lam.numel(), generator=gen, dtype=F64)
    s = (2.0**lam).expand(c, -1)
    theta, sigma = x.reshape(-1), s.reshape(-1)
    scale = torch.ones_like(theta)
    ref = _full_sum(theta, sigma, values, scale)
    err, _ = _errors(theta, sigma, values, scale, ref)
    for k, tol in TOL.items():
        assert err[k] <= tol, (k, err[k])


@pytest.mark.parametrize("dtype", FORMATS)
def test_piece_lookup_equals_searchsorted(dtype):
    """The bucketed lookup of ``|x|``'s piece is ``searchsorted`` exactly, at the bounds
    themselves and one ulp below them too."""
    it = I.interp_table(_all_values(dtype))
    b = it.bounds
    gen = torch.Generator().manual_seed(1)
    ax = torch.cat([torch.rand(50_000, generator=gen, dtype=F64) * it.vmax,
                    torch.exp(torch.empty(50_000, dtype=F64).uniform_(-30.0, math.log(it.vmax), generator=gen)),
                    b, torch.nextafter(b, torch.zeros_like(b)), torch.tensor([0.0, it.vmax], dtype=F64)])
    ax = ax[ax <= it.vmax]
    ref = (torch.searchsorted(b, ax, right=True) - 1).clamp(0, it.ncell - 1)
    assert torch.equal(it._piece(ax), ref)


def test_a_broken_interpolation_is_caught(monkeypatch):
    """The tolerances see an interpolation table with one polynomial per cell (``SPLIT = 1``:
    cells up to 4 sd wide under one degree-7 polynomial) and one with the sd's nearest slice
    instead of the 6-point stencil. One sd octave (2^-1 .. 2^0 table units): each broken table
    builds only the octaves its sds reach (the build is the test's cost: 2.5 CPU s for the default
    five), and reads the same errors there as over five (kappa / m4: SPLIT = 1 6.9e-4 / 6.1e-3,
    nearest slice 1.8e-2 / 5.4e-2, against 6.7e-4 / 6.7e-3 and 1.8e-2 / 5.8e-2 over -3 .. 2;
    tolerances 1e-7 / 1e-6; the unbroken table 4.4e-9 / 5.5e-8)."""
    theta, sigma, values, scale = _cases(torch.float8_e4m3fn, 4000, 23, (-1.0, 0.0))
    ref = _full_sum(theta, sigma, values, scale)
    key = values.numpy().tobytes()
    monkeypatch.setattr(I, "SPLIT", 1)
    monkeypatch.setitem(I._TABLES, key, I.InterpTable(values))
    err, _ = _errors(theta, sigma, values, scale, ref)
    assert err["kappa"] > TOL["kappa"] and err["m4"] > TOL["m4"], err
    monkeypatch.setattr(I, "SPLIT", 4)
    nearest = torch.zeros_like(I._LAGRANGE)
    nearest[0, I.STENCIL // 2 - 1] = 1.0  # weight 1 on the slice at or below the sd
    monkeypatch.setattr(I, "_LAGRANGE", nearest)
    monkeypatch.setitem(I._TABLES, key, I.InterpTable(values))
    err, _ = _errors(theta, sigma, values, scale, ref)
    assert err["kappa"] > TOL["kappa"] and err["m4"] > TOL["m4"], err


def test_tables_not_float8_keep_the_exact_path():
    """bfloat16 (65,280 values) and an asymmetric table have no interpolation table: their
    moments are the exact path's."""
    from mis_lightning.quantization.casts import representable_values

    assert I.interp_table(representable_values(torch.bfloat16)) is None
    asym = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 7.0], dtype=F64)
    assert I.interp_table(asym) is None
    theta = torch.linspace(-3, 8, 200, dtype=F64)
    sigma = torch.full_like(theta, 0.7)
    scale = torch.ones_like(theta)
    a, _ = T._table_fast_moments(theta, sigma, asym, scale)
    b, _ = T._table_sum_moments(theta, sigma, asym, scale)
    for k in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(a, k), getattr(b, k))


def test_zero_sd_and_beyond_the_table_take_the_exact_path():
    """sd 0 (frozen: all moments 0), weights beyond +-448, and at +-448 (the unbounded top cell)
    with an sd below a quarter of its span up to 448 (16), are not interpolated."""
    values = _all_values(torch.float8_e4m3fn)
    theta = torch.tensor([0.0, 1.0, -3.5, 448.0, -448.0, 500.0, -900.0, 447.0], dtype=F64)
    sigma = torch.tensor([0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)
    scale = torch.ones_like(theta)
    done, *_ = I.interp_table(values).moments(theta, sigma)
    assert not bool(done.any())
    got, _ = T._table_fast_moments(theta, sigma, values, scale)
    assert bool((got.kappa[:3] == 0).all()) and bool((got.m4[:3] == 0).all())
    ref = _full_sum(theta[3:], sigma[3:], values, scale[3:])
    for k in TOL:
        assert float((getattr(got, k)[3:] - ref[k]).abs().max()) <= 1e-11, k


def test_small_calls_sum_exactly_and_large_ones_interpolate(monkeypatch):
    """The table's octaves cost 0.1-1.2 s each at first use: calls below
    ``INTERP_MIN_ELEMENTS`` (a small model's tensors) keep the exact sums, bit for bit; calls at or
    above it read the table where it applies."""
    values = _all_values(torch.float8_e4m3fn)
    theta, sigma, _, scale = _cases(torch.float8_e4m3fn, 4000, 1, log2_s=(-2.0, 2.0))
    small = T.table_cell_moments(theta, sigma, values, scale)
    exact, _ = T._table_sum_moments(theta, sigma, values, scale)
    for k in ("kappa", "mean_abs", "m4"):
        assert torch.equal(getattr(small, k), getattr(exact, k)), k
    monkeypatch.setattr(T, "INTERP_MIN_ELEMENTS", 1000)
    large = T.table_cell_moments(theta, sigma, values, scale)
    assert not torch.equal(large.kappa, exact.kappa)  # the table was read
    assert float((large.kappa - exact.kappa).abs().max()) <= TOL["kappa"]


def test_an_octave_is_built_only_for_enough_elements():
    """vf22: the 2^15 gate counted a call's elements, not those using each octave: a 116k-weight
    model built 33 octaves (9.9 s) for 323 interpolated weights (assess 4.6 -> 13.3 s). With
    ``min_build`` an unbuilt octave that fewer elements would use sends them to the exact path
    (built octaves are always read)."""
    values = _all_values(torch.float8_e4m3fn)
    it = I.InterpTable(values)  # a fresh table: nothing built
    x = torch.linspace(0.5, 40.0, 600, dtype=F64)
    s = torch.full_like(x, 2.0 ** 0.4)  # one octave of s; own cells at most 4 sd wide here
    s[:5] = 2.0 ** 3.4  # five elements in another octave
    done, *_ = it.moments(x, s, min_build=100)
    assert bool(done[5:].all()) and not bool(done[:5].any())
    assert int(it.built.sum()) == 1  # the five did not build theirs
    done0, *_ = it.moments(x, s)  # min_build=0: every covered element reads the table
    assert bool(done0.all()) and int(it.built.sum()) == 2
    again, *_ = it.moments(x[:5], s[:5], min_build=100)  # now built: read whatever the count
    assert bool(again.all())


def test_top_cell_is_interpolated_where_its_span_is_at_most_four_sd():
    """e4m3's unbounded top cell (|x| from 432 to the largest value 448, where each row's absmax
    weight sits): on the table where its span below the largest value (16) is at most
    ``MAX_OWN_STEP`` sd (s >= 4 table units; fp23: these ~0.3% of the weights took the exact
    path, one more call of ~3 ms per 1e5 weights), within ``TOL`` of the exact sum; with
    narrower sds, and beyond the largest value, the exact path."""
    values = _all_values(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(23)
    c = 3000
    ax = torch.empty(c, dtype=F64).uniform_(400.0, 448.0, generator=gen)  # the top cell and the one below
    ax[:100], ax[100:200] = 448.0, 432.0
    sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    s = 2.0 ** torch.empty(c, dtype=F64).uniform_(0.0, 10.0, generator=gen)
    theta, scale = sign * ax, torch.ones(c, dtype=F64)
    it = I.interp_table(values)
    done, *_ = it.moments(theta, s)
    top = ax >= 432.0
    assert torch.equal(done[top], s[top] >= 4.0)
    assert int(done.sum()) > c // 2
    ref = _full_sum(theta, s, values, scale)
    err, _ = _errors(theta, s, values, scale, ref)
    for k, tol in TOL.items():
        assert err[k] <= tol, (k, err[k])
    # a row's absmax over a float32 scale: up to ~6e-8 beyond 448 (relative), on the table too
    near = 448.0 * (1.0 + torch.tensor([1e-9, 6e-8, 5e-7, 1e-6], dtype=F64)) * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    s_near = torch.tensor([4.0, 9.6, 30.0, 500.0], dtype=F64)
    assert bool(it.moments(near, s_near)[0].all())
    err, _ = _errors(near, s_near, values, torch.ones_like(near), _full_sum(near, s_near, values, torch.ones_like(near)))
    for k, tol in TOL.items():
        assert err[k] <= tol, (k, err[k])
    beyond = torch.tensor([448.5, -460.0, 600.0, 448.0 * (1.0 + 1e-5)], dtype=F64)
    assert not bool(it.moments(beyond, torch.full_like(beyond, 64.0))[0].any())
