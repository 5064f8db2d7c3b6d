"""sd-0 weights in closed form (``ParamGrid._point_masses``, pf32): a weight no record moves (a
dead unit's) is a point mass; strictly inside its own cell and bounds it has no cell information,
moments ``(kappa, mean_abs, m4, coverage) = (0, 0, 0, 1)``. Chunks mostly of such weights score
the others alone on the grid paths (padded to the whole chunk's path); the moments must be the
grid paths' own, element by element, for every grid kind (affine with codes and absmax bounds,
min/max asymmetric, value tables with and without a scale, quotient grids), at theta-hat, in the
pool protocol, at draws (no codes) and ``kappa_only``.

Tolerance: 1e-12 relative (the brief's; the same operations run on the same elements, so the
values are expected bitwise) and exact ``(0, 0, 0, 1)`` where the closed form answers.
"""

import dataclasses

import pytest
import torch

import mis_lightning.quantization.base as qb
from mis_lightning.quantization import get_scheme

F64 = torch.float64
FIELDS = ("kappa", "mean_abs", "m4", "coverage")


def _grid(scheme: str, rows: int, cols: int, dtype: torch.dtype = torch.float32, mult: float = 3.0):
    """The grid of ``scheme`` on a seeded ``Linear(cols, rows)`` whose weights are multiplied by
    ``mult`` (a quotient grid on its own cells), and the weights, float64 ``[rows * cols]``."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, rows).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(mult)
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    if g.storage_dtype is not None:  # the quotient grid on its own cells (no storage rounding)
        g = dataclasses.replace(g, storage_dtype=None)
    theta = lin.weight.detach().reshape(-1).to(F64)
    return g, theta


def _sigma(g, theta: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """sd 0 on 7 of 8 rows (dead units), live rows' sd from a tenth of a step to several;
    a few sd-0 weights moved onto an edge of their own cell (ties: the paths' business)."""
    gen = torch.Generator().manual_seed(1)
    scale, zp, code = g.element_grid(0, theta.numel())
    live = (torch.arange(rows) % 8 == 3).repeat_interleave(cols)
    sigma = torch.where(live, scale.to(F64) * torch.exp(torch.randn(theta.numel(), generator=gen, dtype=F64)),
                        torch.zeros_like(theta))
    lo, hi = g._own_edges(theta, scale.to(F64), zp, code)
    dead = torch.nonzero(~live).squeeze(-1)
    on_lo, on_hi = dead[::97], dead[50::89]
    theta = theta.clone()
    theta[on_lo] = torch.where(torch.isfinite(lo[on_lo]), lo[on_lo], theta[on_lo])
    theta[on_hi] = torch.where(torch.isfinite(hi[on_hi]), hi[on_hi], theta[on_hi])
    return theta, sigma


CASES = [("rtn_int4", torch.float32), ("float8_weight_only", torch.float32), ("bf16", torch.float32),
         ("intx_weight_only_int4_g32_asym", torch.float32), ("intx_weight_only_int8_g32", torch.bfloat16)]


@pytest.mark.parametrize("rows, cols", [(64, 64), (512, 128)], ids=["small", "fused"])
@pytest.mark.parametrize("scheme, dtype", CASES, ids=[c[0] + ("-bf16" if c[1] != torch.float32 else "") for c in CASES])
def test_point_masses_in_closed_form_equal_the_grid_paths(scheme, dtype, rows, cols, monkeypatch):
    """Closed form on and off give the same moments (all four fields; theta-hat with codes, the
    pool's sd, a draw's positions without codes, kappa_only); the closed-form elements are the
    paths' (0, 0, 0, 1) exactly; and the paths then see fewer elements (fails on the old code)."""
    if scheme != "rtn_int4" and scheme != "bf16":
        pytest.importorskip("torchao")
    g, theta = _grid(scheme, rows, cols, dtype)
    c = theta.numel()  # small: the sparse / exact paths; fused: >= 2^15, the kernels' large-call paths
    theta, sigma = _sigma(g, theta, rows, cols)
    seen: list[int] = []
    path = qb.ParamGrid._path_moments

    def spy(self, th, *a, **k):
        seen.append(th.shape[0])
        sizes.append(a[7] if len(a) > 7 else k.get("path_elements"))
        return path(self, th, *a, **k)

    sizes: list[int | None] = []

    monkeypatch.setattr(qb.ParamGrid, "_path_moments", spy)
    xi = torch.randn(c, generator=torch.Generator().manual_seed(2), dtype=F64)
    calls = [dict(theta=theta, sigma=sigma), dict(theta=theta, sigma=sigma / 2 ** 0.5, kappa_only=True),
             dict(theta=theta + sigma * xi, sigma=sigma, use_codes=False)]
    for kw in calls:
        monkeypatch.setattr(qb, "POINT_MASS_CLOSED_FORM", False)
        seen.clear()
        ref = g.moments(start=0, end=c, **kw)
        assert seen[0] == c  # the first call is the chunk's (quotient grids then split their own)
        monkeypatch.setattr(qb, "POINT_MASS_CLOSED_FORM", True)
        seen.clear()
        sizes.clear()
        got = g.moments(start=0, end=c, **kw)
        assert seen[0] < c  # the point masses never reached the paths
        if c >= qb._POINT_MASS_PATH_MIN:
            if g.kind in ("affine", "table"):  # the live elements alone, on the whole chunk's path
                assert seen[0] < qb._POINT_MASS_PATH_MIN and sizes[0] == qb._POINT_MASS_PATH_MIN
            else:  # padded: the whole chunk's path
                assert seen[0] == qb._POINT_MASS_PATH_MIN
        fields = ("kappa",) if kw.get("kappa_only") else FIELDS
        for f in fields:
            torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=1e-12, atol=0.0, equal_nan=True)
        scale, zp, code = g.element_grid(0, c)
        point = g._point_masses(kw["theta"], kw["sigma"], scale, zp, code if kw.get("use_codes", True) else None,
                                g.element_bounds(0, c))
        assert point is not None and int(point.sum()) > c // 2
        for f, v in zip(FIELDS, (0.0, 0.0, 0.0, 1.0)):
            if f in fields:
                assert bool((getattr(ref, f)[point] == v).all()), f  # what the paths give them
        # sd-0 weights put on an edge of their own cell are left to the paths
        on_edge = (sigma == 0) & ~point
        if kw.get("use_codes", True):
            assert int(on_edge.sum()) > 0


def test_point_masses_need_sd_zero_inside_the_bounds():
    """The mask: sd 0 (or below the smallest normal float), inside the own cell and the release's
    bounds by the margin; a chunk with fewer such elements than POINT_MASS_MIN_FRACTION: None."""
    g, theta = _grid("rtn_int4", 8, 16)
    c = theta.numel()
    scale, zp, code = g.element_grid(0, c)
    bounds = g.element_bounds(0, c)
    sigma = torch.zeros(c, dtype=F64)
    sigma[:8] = 1e-320  # subnormal: floored to the smallest normal by every path, so a point mass too
    sigma[8:16] = 1e-3
    point = g._point_masses(theta, sigma, scale, zp, code, bounds)
    assert point is not None
    assert bool(point[:8].all()) and not bool(point[8:16].any())
    # the row's absmax weights sit on their bound (the release gives them away): not point masses
    absmax = (theta.abs() == bounds[1]) | (theta.abs() == -bounds[0])
    assert bool(absmax.any()) and not bool(point[absmax].any())
    sigma_live = torch.full((c,), 1e-3, dtype=F64)
    sigma_live[: int(qb.POINT_MASS_MIN_FRACTION * c) - 1] = 0.0
    assert g._point_masses(theta, sigma_live, scale, zp, code, bounds) is None


@pytest.mark.parametrize("scheme, dtype", CASES + [("int8_weight_only", torch.float32)],
                         ids=[c[0] + ("-bf16" if c[1] != torch.float32 else "") for c in CASES] + ["int8_weight_only"])
def test_live_elements_alone_equal_the_padded_call(scheme, dtype, monkeypatch):
    """pad34: the live elements of a mostly point-mass chunk given to the paths alone (standing
    for the padded call: ``path_elements``) give the padded call's moments bit for bit (every
    field; ``kappa`` alone where ``kappa_only``, whose other fields the padded call left NaN on
    its padding), at theta-hat, the pool's sd and a draw's positions; and the paths saw fewer
    elements. Fails on the code before pad34 (no ``POINT_MASS_LIVE_ONLY``)."""
    if scheme not in ("rtn_int4", "bf16"):
        pytest.importorskip("torchao")
    rows, cols = 512, 128  # 2^16 elements, 1 row in 8 live: 8,192 live, padded to 2^15
    g, theta = _grid(scheme, rows, cols, dtype)
    c = theta.numel()
    theta, sigma = _sigma(g, theta, rows, cols)
    seen: list[int] = []
    path = qb.ParamGrid._path_moments

    def spy(self, th, *a, **k):
        seen.append(th.shape[0])
        return path(self, th, *a, **k)

    monkeypatch.setattr(qb.ParamGrid, "_path_moments", spy)
    xi = torch.randn(c, generator=torch.Generator().manual_seed(2), dtype=F64)
    calls = [dict(theta=theta, sigma=sigma), dict(theta=theta, sigma=sigma / 2 ** 0.5, kappa_only=True),
             dict(theta=theta + sigma * xi, sigma=sigma, use_codes=False)]
    for kw in calls:
        out = {}
        for live_only in (False, True):
            monkeypatch.setattr(qb, "POINT_MASS_LIVE_ONLY", live_only)
            seen.clear()
            out[live_only] = g.moments(start=0, end=c, **kw)
            if g.kind in ("affine", "table"):  # padded, or the live elements alone
                assert (seen[0] < qb._POINT_MASS_PATH_MIN) if live_only else (seen[0] == qb._POINT_MASS_PATH_MIN)
        for f in ("kappa",) if kw.get("kappa_only") else FIELDS:
            a, b = getattr(out[True], f), getattr(out[False], f)
            assert bool(((a == b) | (a.isnan() & b.isnan())).all()), f


@pytest.mark.parametrize("scheme", ["bf16", "rtn_int4"])
def test_point_split_counts_by_count_nonzero(scheme, monkeypatch):
    """``quantization.base.COUNT_SET`` (p50a): the sd-0 and point-mass counts of
    ``ParamGrid._point_split`` by ``torch.count_nonzero``: the same counts, mask and moments as the
    bool sums (the switch off); fails with the switch off (no ``count_nonzero`` call)."""
    rows, cols = 64, 64
    g, theta = _grid(scheme, rows, cols)
    theta, sigma = _sigma(g, theta, rows, cols)
    scale, zp, code = g.element_grid(0, theta.numel())
    calls = []
    real = torch.count_nonzero
    monkeypatch.setattr(torch, "count_nonzero", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = {}
    for on in (True, False):
        monkeypatch.setattr(qb, "COUNT_SET", on)
        qb._SD_ZERO.clear()
        calls.clear()
        point, n_point, zf = g._point_split(theta, sigma.clone(), scale, zp, code, g.element_bounds(0, theta.numel()))
        assert bool(calls) == on
        assert n_point == int(point.sum()) and zf.count == int((sigma <= torch.finfo(F64).tiny).sum())
        got[on] = (point, n_point, zf.count, g.moments(theta, sigma, 0, theta.numel()).kappa)
    assert torch.equal(got[True][0], got[False][0]) and got[True][1:3] == got[False][1:3]
    assert torch.equal(got[True][3].view(torch.int64), got[False][3].view(torch.int64))
