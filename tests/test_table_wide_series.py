"""float8 weights whose sd spans their bounded window past the wide-sd closed form's reach: the
series of ``functional/wide_table.py`` on the table's own cells (``base.TABLE_WIDE_SERIES``,
``ParamGrid._table_series``; docs/method.md section 5, "The bounded window on value tables").

Reference: the exact partition sums of ``tests/_wide_reference.py`` (16-point Gauss-Legendre per
cell, each moment as a deficit, ~1e-15 relative of each deficit), on the table's cells clipped to
the bounds, independent of the series and of the prefix sums. Tolerances: ``kappa - kappa_ref``
in ``[-8 eps, SERIES_TOL + 8 eps]`` (the series reads at least the exact kappa, by at most its bound
``err <= SERIES_TOL``; ``eps = 2^-53``, each side rounds), ``|m4 - m4_ref| <= SERIES_TOL + 1e-14``
(``m4 ~ 3``: the reference's own rounding), ``|mean_abs - ref| <= 1e-15`` (an exact formula).
Cases: windows 0.15 / 0.3 / 0.45 sd (``_table_series`` called directly: the closed form's gate leaves
the weights whose bound exceeds WIDE_TOL to it at any window; wider ones mostly fail the
cell-mean bound, which grows as the fifth powers of float8's coarse cells, and keep the exact sums), the
release's own per-row bounds and bounds cut inside the table off-centre (cut end cells, no cell
of the table's 0 at the window's centre), weights at theta-hat and draws beyond a bound. Each
case also asserts that the series takes most elements (the test fails if it stops applying).
"""

import math

import pytest
import torch

import mis_lightning.functional.fastpath as fastpath
import mis_lightning.quantization.base as qb
from mis_lightning.functional.wide_series import SERIES_TOL
from mis_lightning.quantization import get_scheme
from tests._wide_reference import exact_deficits, partition_edges

pytest.importorskip("torchao")

F64 = torch.float64
EPS = 2.0**-53
SQ = math.sqrt(2.0 / math.pi)


@pytest.fixture(scope="module")
def grid():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    g = get_scheme("float8_weight_only").apply(torch.nn.Sequential(lin)).grids["0.weight"]
    theta = lin.weight.detach().reshape(-1).to(F64)
    scale, zp, _, _, bounds = g._chunk_grid(0, theta.numel())
    return g, theta, scale, zp, bounds


def _case(grid, cut: bool, width: float, draws: bool):
    g, theta, scale, zp, (lo, hi) = grid
    lo, hi = lo.to(F64).clone(), hi.to(F64).clone()
    gen = torch.Generator().manual_seed(int(width * 100) + 7 * cut + 3 * draws)
    if cut:  # off-centre bounds inside the table: cut end cells, the window about 0 wider than them
        lo, hi = -0.3 * hi, 0.8 * hi
        theta = lo + (hi - lo) * torch.rand(theta.shape, generator=gen, dtype=F64)
    H = torch.maximum(lo.abs(), hi.abs())
    sigma = 2.0 * H / width * torch.exp(0.1 * torch.randn(theta.shape, generator=gen, dtype=F64))
    if draws:  # bootstrap draws: theta-hat + sigma xi, some beyond a bound
        theta = theta + sigma * 1.5 * torch.randn(theta.shape, generator=gen, dtype=F64)
    return g, theta, sigma, scale, zp, (lo, hi)


@pytest.mark.parametrize("draws", [False, True])
@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("width", [0.15, 0.3, 0.45])
def test_series_within_its_bound_of_the_exact_partition(grid, cut, width, draws):
    g, theta, sigma, scale, zp, bounds = _case(grid, cut, width, draws)
    got = g._table_series(theta, sigma, scale, zp, None, bounds, kappa_only=draws)
    assert got is not None
    idx, kappa, mean_abs, m4 = got
    # the windows past the simple closed form are the series' (measured: all at 0.15 sd, 87-100% at
    # 0.3, 18-94% at 0.45: the cell-mean bound grows as C5 and the draws' weights reach further)
    assert idx.numel() >= {0.15: 0.95, 0.3: 0.8, 0.45: 0.1}[width] * theta.numel(), idx.numel()
    if not draws:  # a kappa_only call: the same terms, so the same kappa bit for bit
        ko = g._table_series(theta, sigma, scale, zp, None, bounds, kappa_only=True)
        assert ko is not None and bool(torch.isin(idx, ko[0]).all())  # (m4's bound may drop some of a full call)
        assert torch.equal(ko[1][torch.isin(ko[0], idx)], kappa)
    lo, hi = bounds
    for j in range(0, idx.numel(), max(1, idx.numel() // 25)):
        i = int(idx[j])
        dk, dm, d4 = exact_deficits(float(theta[i]), float(sigma[i]),
                                    partition_edges(g, i, float(lo[i]), float(hi[i]), float(scale[i]), float(zp[i])))
        err_k = float(kappa[j]) - (1.0 - dk)
        assert -8 * EPS <= err_k <= SERIES_TOL + 8 * EPS, (i, err_k)
        if not draws:
            assert m4 is not None and mean_abs is not None
            assert abs(float(m4[j]) - (3.0 - d4)) <= SERIES_TOL + 1e-14, (i, float(m4[j]), 3.0 - d4)
            assert abs(float(mean_abs[j]) - (SQ - dm)) <= 1e-15, (i, float(mean_abs[j]), SQ - dm)


@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("draws", [False, True])
def test_moments_with_and_without_the_series(grid, draws, checks, monkeypatch):
    """``element_moments`` end to end (the closed form first, the series, then the paths), self-checks
    on and off: every field within the series' bound of the paths' (kappa on the conservative side)."""
    if not checks:
        monkeypatch.setattr(fastpath.GUARD, "sample_size", lambda *a, **k: 0)
    g, theta, sigma, scale, zp, bounds = _case(grid, False, 0.2, draws)
    # half the elements with windows under 0.1 sd (the closed form's), half past it
    sigma = sigma * torch.where(torch.arange(theta.numel()) % 2 == 0, 3.0, 1.0).to(F64)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(qb, "TABLE_WIDE_SERIES", on)
        out[on] = g.element_moments(theta, sigma, scale, zp, None, bounds, kappa_only=draws)
    dk = out[True].kappa - out[False].kappa
    assert bool((dk >= -1e-15).all()) and bool((dk <= SERIES_TOL + 1e-15).all()), (float(dk.min()), float(dk.max()))
    assert bool((dk != 0).any())  # the series answered some
    if not draws:
        assert float((out[True].m4 - out[False].m4).abs().max()) <= SERIES_TOL + 1e-14
        assert float((out[True].mean_abs - out[False].mean_abs).abs().max()) <= 1e-15
        assert torch.equal(out[True].coverage, out[False].coverage)
