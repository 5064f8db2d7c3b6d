"""The float-format fast path of ``table_cell_moments`` (issue 13: fp8 scored at 2-3e4 weights/s).

The fast path (``table._table_fast_moments``) sums the fine core of a value table around 0 in
closed form (per-cell series in the width to w^9, Gaussian quadratures of 4-16 nodes of the
table's W^3/W^5/W^7/W^9 measures; tests/test_fp8_core_rules.py) and sizes exact windows by the edges within 8.5 sd. Its reference is
the previous path (``table._table_cell_moments`` with the fine-grid step, windowed exact sums
over at least 18 edges each side; every edge of the table where more than 512 lie within 8.5
sd each side and the own cell is coarse: it used to stop at 512, which
``test_sigma_beyond_the_float16_range_sums_every_cell`` catches), and the exact sum over every
edge of the table.

Tolerance: 1e-10 absolute for kappa, mean_abs and m4 (float64; measured <= 2.2e-13 for kappa,
<= 1.2e-11 for m4, 3e-16 for mean_abs). The series remainder is O(w^11) with w <= 0.2 sd (below
1e-12) and the quadrature's remainder is below 1e-12 for cores within 2 sd of 0; edges beyond
8.5 sd carry < 1e-15 of kappa, which is all the two window sizings differ by.
"""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import fastpath, table_cell_moments
from mis_lightning.functional import table as T
from mis_lightning.functional.cells import moments_from_alpha
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread_fresh_guard")


def _log_uniform(c, lo, hi, gen):
    return torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(lo), math.log(hi), generator=gen))


def _full_sum(theta, sigma, values, scale):
    """Exact moments over every edge of the table (rows one at a time: small tests only)."""
    mids = 0.5 * (values[1:] + values[:-1])
    inf = torch.tensor([math.inf], dtype=F64)
    rows = [moments_from_alpha(((torch.cat([-inf, mids * s, inf]) - t) / g).unsqueeze(0))
            for t, g, s in zip(theta.tolist(), sigma.tolist(), scale.tolist())]
    return {k: torch.cat([getattr(r, k) for r in rows]) for k in ("kappa", "mean_abs", "m4")}


def _weights(dtype, c, gen):
    """Weights over the whole format (subnormals, 0, +-max, beyond max for the 8-bit formats
    with a per-element scale) and sigmas from far below a cell to many binades wide."""
    values = representable_values(dtype)
    vmax = float(values.max())
    tiny = float(values[values > 0].min())
    if dtype.itemsize == 1:
        scale = _log_uniform(c, 1e-3, 1.0, gen)
        mag = _log_uniform(c, tiny / 4, vmax * 1.3, gen)
    else:
        scale = torch.ones(c, dtype=F64)
        mag = _log_uniform(c, tiny / 4, min(vmax, 1e4), gen)
    theta = torch.where(torch.rand(c, generator=gen) < 0.5, -mag, mag) * scale
    theta[:50] = 0.0
    theta[50:100] = vmax * scale[50:100]
    theta[100:150] = -vmax * scale[100:150]
    theta[150:200] = tiny * scale[150:200]  # the smallest subnormal
    sigma = theta.abs() * _log_uniform(c, 1e-4, 1e3, gen) + _log_uniform(c, 1e-6, 10.0, gen) * scale * (
        1.0 if dtype.itemsize == 1 else 1e-3)
    sigma[200:300] = 0.0  # frozen codes
    return theta, sigma, values, scale


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_fast_path_equals_previous_path(dtype):
    """float8 e4m3 / e5m2 with per-element scales: every element within 1e-10 of the windowed
    sums, with most wide elements on the closed-form core."""
    gen = torch.Generator().manual_seed(13)
    theta, sigma, values, scale = _weights(dtype, 6000, gen)
    # the exact path with the closed-form core (the float8 interpolation table in front of it,
    # T._table_fast_moments, has its own tolerance: tests/test_fp8_interp.py)
    fast, core = T._table_sum_moments(theta, sigma, values, scale)
    prev = T._table_cell_moments(theta, sigma, values, scale, 18, T.FINE_STEP)
    assert 0.3 < float(core.double().mean()) < 0.9  # the closed form is exercised, not everything
    for k in ("kappa", "mean_abs", "m4", "coverage"):
        err = (getattr(fast, k) - getattr(prev, k)).abs().max()
        assert float(err) <= TOL, (k, float(err))
    # sigma = 0: frozen, all moments 0
    assert bool((fast.kappa[200:300] == 0).all()) and bool((fast.m4[200:300] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_fast_path_equals_previous_path_or_full_sum(dtype, monkeypatch):
    """float16 / bfloat16 (scale 1): within 1e-10 of the previous path, and of the full sum over
    the table for the elements with more than 1022 edges within 8.5 sd (the fine elements whose
    reach passes the table's top on the exact paths: ``OPEN_CELLS_CLOSED_FORM`` off; on, they
    take the fine expansion with the end cells, tests/test_table_open_cells.py)."""
    monkeypatch.setattr(T, "OPEN_CELLS_CLOSED_FORM", False)
    gen = torch.Generator().manual_seed(14)
    theta, sigma, values, scale = _weights(dtype, 3000, gen)
    fast, core = T._table_fast_moments(theta, sigma, values, scale)
    prev = T._table_cell_moments(theta, sigma, values, scale, 18, T.FINE_STEP)
    mids = 0.5 * (values[1:] + values[:-1])
    x, reach = theta / scale, 8.5 * sigma.clamp_min(1e-300) / scale
    lo, hi = torch.searchsorted(mids, x - reach), torch.searchsorted(mids, x + reach)
    wide = core & ((hi - lo) > 2 * T._MAX_WINDOW - 2)
    assert bool(core.any()) and bool(wide.any())
    for k in ("kappa", "mean_abs", "m4"):
        err = (getattr(fast, k) - getattr(prev, k)).abs().max()
        assert float(err) <= TOL, (k, float(err))
    idx = torch.nonzero(wide).squeeze(-1)[:20]
    full = _full_sum(theta[idx], sigma[idx], values, scale[idx])
    for k in ("kappa", "mean_abs", "m4"):
        err = (getattr(fast, k)[idx] - full[k]).abs().max()
        assert float(err) <= TOL, (k, float(err))


def test_sigma_beyond_the_float16_range_sums_every_cell():
    """A weight at 65504 whose sd covers the whole float16 table: the previous path summed 512
    edges each side only (kappa 0.6447); every cell counts (kappa 0.69439, full sum)."""
    values = representable_values(torch.float16)
    theta, sigma, scale = (torch.tensor([v], dtype=F64) for v in (65504.0, 508655.30922389793, 1.0))
    got = table_cell_moments(theta, sigma, values, scale)
    full = _full_sum(theta, sigma, values, scale)
    assert abs(float(full["kappa"][0]) - 0.6943922241777676) < 1e-12
    for k in ("kappa", "mean_abs", "m4"):
        assert abs(float(getattr(got, k)[0] - full[k][0])) <= TOL, k


def test_whole_table_within_a_fraction_of_a_sd():
    """The case issue 13 measured (sd >> the float8 table: every cell within 0.25 sd): closed
    form for every element, equal to the exact full sum."""
    values = representable_values(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(3)
    c = 200
    scale = _log_uniform(c, 1e-4, 1e-2, gen)
    theta = (torch.rand(c, generator=gen, dtype=F64) * 2 - 1) * 448 * scale
    sigma = scale * _log_uniform(c, 448 / 0.25, 448 / 0.01, gen)
    fast, core = T._table_fast_moments(theta, sigma, values, scale)
    assert bool(core.all())
    full = _full_sum(theta, sigma, values, scale)
    for k in ("kappa", "mean_abs", "m4"):
        assert float((getattr(fast, k) - full[k]).abs().max()) <= TOL, k


def test_self_check_disables_a_wrong_closed_form(monkeypatch):
    """A closed form that disagrees with the exact sums is caught by the sampled self-check:
    a RuntimeWarning names the float path and the windowed sums are returned."""
    values = representable_values(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(4)
    c = 4096
    scale = torch.full((c,), 1e-3, dtype=F64)
    theta = (torch.rand(c, generator=gen, dtype=F64) * 2 - 1) * 448e-3
    sigma = torch.full((c,), 5.0, dtype=F64)
    real = T._core_side_kernel
    monkeypatch.setattr(T, "_core_side_kernel", lambda *a: tuple(t + 1e-3 for t in real(*a)))
    with pytest.warns(RuntimeWarning, match="float-format fast path"):
        got = table_cell_moments(theta, sigma, values, scale)
    assert T.FLOAT_PATH in fastpath.GUARD.disabled
    prev = T._table_cell_moments(theta, sigma, values, scale, 18, T.FINE_STEP)
    assert torch.equal(got.kappa, prev.kappa)
