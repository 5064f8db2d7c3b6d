"""Weights of a bf16 / fp16 model whose sd spans their release's bounded window: the series of
``functional/wide_series.py`` on the stored cells (``base.STORED_WIDE_CLOSED_FORM``,
``ParamGrid._stored_wide``; docs/method.md section 5, "The bounded window on stored grids").

References, each on the same elements:
* the exact partition sums of ``tests/_wide_reference.py`` (Gauss-Legendre per cell, each moment
  as a deficit) over the REAL partition: every ``D`` value of the block's range quantized by the
  backend itself, edges at the midpoints between adjacent ``D`` values whose code differs, the
  bounds at the midpoints inside the block's stored extremes (tests/test_storage_rounding.py's
  truth); independent of the library's stored edges and of the series;
* the exact stored-cell sums the series replaces (``ParamGrid._stored_paths``).
Tolerances: ``kappa - kappa_ref`` in ``[-8 eps, err + 8 eps]`` (``err``: the element's derived
bound, at most ``SERIES_TOL``; ``eps = 2^-53``: a float64 near 1 is held to that, and each side
rounds), ``|m4 - m4_ref| <= err + 1e-14`` (``m4 ~ 3``: the reference's own rounding),
``|mean_abs - ref| <= 1e-15`` (an exact formula). The cases are the adversarial ones: windows
just under ``SERIES_MAX_WINDOW`` sd (the bound near the tolerance), weights next to a bound and
draws beyond one, fp16 subnormal blocks (stored cells coarser than the grid: empty cells), bf16
blocks at 2^100 and fp16 ones near its largest values.
"""

import math
import warnings

import pytest
import torch
from _lowp import dtype_values, stored_partition, sweep_linear

import mis_lightning.quantization.base as qb
from mis_lightning.functional.wide_series import SERIES_MAX_WINDOW, SERIES_TOL
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.base import SchemeUnavailableError
from tests._wide_reference import exact_deficits

pytest.importorskip("torchao")

F64 = torch.float64
EPS = 2.0**-53
SQ = math.sqrt(2.0 / math.pi)

# (scheme, block width, asymmetric)
SCHEMES = [("int8_weight_only", 128, False), ("intx_weight_only_int4_g32", 32, False),
           ("intx_weight_only_int8_g32_asym", 32, True), ("float8_weight_only", 128, False)]
# (dtype, block absmax): ordinary, fp16 subnormals (2^-24 spacing: ~2 stored values per int8
# step, many empty stored cells), bf16 at 2^100, fp16 near its largest value
RANGES = [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 2.0**-17), (torch.bfloat16, 2.0**100),
          (torch.float16, 32768.0)]


def _setup(scheme: str, width: int, asym: bool, dtype: torch.dtype, m: float):
    lo = float(torch.tensor(-0.61 * m if asym else -m).to(dtype))
    model = sweep_linear(dtype_values(lo, m, dtype), m, lo, width, dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = get_scheme(scheme).apply(model)
    except SchemeUnavailableError as exc:
        pytest.skip(f"{scheme}: {exc}")
    g = res.grids["0.weight"]
    assert g.storage_dtype == dtype
    u, ch = stored_partition(model, res)
    lower, upper = float(0.5 * (u[0] + u[1])), float(0.5 * (u[-2] + u[-1]))
    edges = 0.5 * (u[ch] + u[ch + 1])
    edges = edges[(edges > lower) & (edges < upper)]
    return g, u, torch.cat([torch.tensor([lower], dtype=F64), edges, torch.tensor([upper], dtype=F64)])


def _positions(u: torch.Tensor, part: torch.Tensor, sd: float) -> torch.Tensor:
    """Stored weights across the block (every one next to a bound among them) and draws beyond
    each bound (a bootstrap draw's position: any real number)."""
    inner = u[1:-1]
    pick = inner[:: max(1, inner.numel() // 60)]
    near = torch.cat([inner[:3], inner[-3:]])
    lower, upper = float(part[0]), float(part[-1])
    beyond = torch.tensor([upper + k * sd for k in (0.0, 0.2, 1.0, 3.0)]
                          + [lower - k * sd for k in (0.0, 0.2, 1.0, 3.0)], dtype=F64)
    return torch.cat([pick, near, beyond])


def _reference(pos: torch.Tensor, sd: float, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = [exact_deficits(float(p), sd, part) for p in pos]
    d2, dm, d4 = (torch.tensor(x, dtype=F64) for x in zip(*out))
    return 1.0 - d2, SQ - dm, 3.0 - d4


@pytest.mark.parametrize("ratio", [0.999 * SERIES_MAX_WINDOW, 0.5, 0.1])
@pytest.mark.parametrize(("case", "rng"), [
    pytest.param(c, r, id=f"{c[0]}-{rid}") for c in SCHEMES
    for r, rid in zip(RANGES, ["bf16", "fp16", "fp16-subnormal", "bf16-2^100", "fp16-32768"])
    # float8's absmax / 448 underflows fp16 in the subnormal block: its scale is 0, a dead block
    # (ParamGrid.moments), with no cells for the series
    if not (c[0] == "float8_weight_only" and rid == "fp16-subnormal")])
def test_the_series_holds_its_bound_against_the_real_partition(case, rng, ratio):
    scheme, width, asym = case
    dtype, m = rng
    g, u, part = _setup(scheme, width, asym, dtype, m)
    sd = float(part[-1] - part[0]) / ratio
    pos = _positions(u, part, sd)
    n = pos.numel()
    scale, zp, _ = g.element_grid(0, 1)
    assert float(scale[0]) > 0
    bounds = g.element_bounds(0, 1)
    assert (float(bounds[0]), float(bounds[1])) == (float(part[0]), float(part[-1]))
    rep = lambda t: t[:1].expand(n).clone()  # noqa: E731
    sg = torch.full_like(pos, sd)
    args = (pos, sg, rep(scale), rep(zp), None, (rep(bounds[0]), rep(bounds[1])))
    got = g._stored_wide(*args, kappa_only=False)
    # the dispatch: the series where it holds, the exact stored-cell sums for the others (wide
    # windows on coarse grids: int4's 16 cells, float8's widest; a draw far beyond a bound)
    mm = g.element_moments(*args)
    rest = torch.ones(n, dtype=torch.bool)
    if got is not None:
        rest[got[0]] = False
    if bool(rest.any()):
        jj = torch.nonzero(rest).squeeze(-1)
        sub = g._stored_paths(pos[jj], sg[jj], rep(scale)[jj], rep(zp)[jj], None,
                              (rep(bounds[0])[jj], rep(bounds[1])[jj]), None, False)
        assert torch.equal(mm.kappa[jj], sub.kappa) and torch.equal(mm.m4[jj], sub.m4)
    if ratio <= 0.1 and part.numel() > 8:  # every position qualifies (fp16 subnormal blocks: 1-3 cells)
        assert got is not None and got[0].numel() == n
    if got is None:
        return
    ii, kappa, mean_abs, m4, err, err4 = got
    assert bool((err <= SERIES_TOL).all())
    m4_ok = err4 <= SERIES_TOL  # (elsewhere m4 comes from the exact sums: _stored_grid_moments)
    assert torch.equal(mm.kappa[ii], kappa) and torch.equal(mm.m4[ii][m4_ok], m4[m4_ok])
    k_ref, ma_ref, m4_ref = _reference(pos[ii], sd, part)
    dk = kappa - k_ref
    assert float(dk.min()) >= -8 * EPS, float(dk.min())
    assert bool((dk <= err + 8 * EPS).all()), float((dk - err).max())
    d4 = ((m4 - m4_ref).abs() - err4)[m4_ok]
    assert float(d4.max()) <= 1e-14, float(d4.max())
    assert float((mean_abs - ma_ref).abs().max()) <= 1e-15
    # against the exact stored-cell sums it replaces (the library's stored edges), and kappa_only
    ex = g._stored_paths(pos[ii], sg[ii], rep(scale)[ii], rep(zp)[ii], None,
                         (rep(bounds[0])[ii], rep(bounds[1])[ii]), None, False)
    dk = kappa - ex.kappa
    assert float(dk.min()) >= -8 * EPS and bool((dk <= err + 8 * EPS).all())
    assert float(((m4 - ex.m4).abs() - err4)[m4_ok].max()) <= 1e-14
    assert float((mean_abs - ex.mean_abs).abs().max()) <= 1e-15
    ko = g._stored_wide(*args, kappa_only=True)
    assert ko is not None
    jj, k2, _, _, err2, none = ko
    assert none is None and torch.equal(jj, ii)  # kappa bitwise the same, on the same elements
    assert torch.equal(k2, kappa) and torch.equal(err2, err)


def _bf16_grid(scheme: str):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    model = torch.nn.Sequential(lin.to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = get_scheme(scheme).apply(model).grids["0.weight"]
    return g, lin.weight.detach().double().reshape(-1)


@pytest.mark.parametrize("scheme", ["int8_weight_only", "float8_weight_only", "intx_weight_only_int4_g32"])
def test_wide_weights_skip_the_stored_cell_sums(scheme, monkeypatch):
    """The dispatch: weights whose window is at most 0.1 sd wide never reach the exact stored-cell
    sums (before wc37 every one of them did: a bound within reach), and get the series' moments;
    with the switch off, the exact sums for all (the values before wc37)."""
    g, th = _bf16_grid(scheme)
    n = th.numel()
    scale, zp, code, _, bounds = g._chunk_grid(0, n)
    sg = (bounds[1] - bounds[0]) * 20.0
    seen = []
    orig = qb.ParamGrid._storage_moments

    def counting(self, theta, *a, **k):
        seen.append(theta.numel())
        return orig(self, theta, *a, **k)

    monkeypatch.setattr(qb.ParamGrid, "_storage_moments", counting)
    mm = g.element_moments(th, sg, scale, zp, code, bounds)
    assert sum(seen) == 0, seen
    ii, kappa, mean_abs, m4, _, err4 = g._stored_wide(th, sg, scale, zp, code, bounds, False)
    assert bool((err4 <= SERIES_TOL).all())
    assert ii.numel() == n
    assert torch.equal(mm.kappa, kappa) and torch.equal(mm.m4, m4) and torch.equal(mm.mean_abs, mean_abs)
    assert torch.equal(mm.coverage, torch.ones_like(kappa))
    monkeypatch.setattr(qb, "STORED_WIDE_CLOSED_FORM", False)
    off = g.element_moments(th, sg, scale, zp, code, bounds)
    assert sum(seen) == n
    ref = g._stored_paths(th, sg, scale, zp, code, bounds, None, False)
    assert torch.equal(off.kappa, ref.kappa) and torch.equal(off.m4, ref.m4)
    dk = mm.kappa - off.kappa
    assert float(dk.min()) >= -8 * EPS and float(dk.max()) <= SERIES_TOL + 8 * EPS
