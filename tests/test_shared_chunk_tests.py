"""One computation per chunk where the grids of a chunk read the same inputs (ws37, issue 13):

* ``INSIDE_FUSED``: the sd-0 inside test as ``min(th - max(lo, lower), min(hi, upper) - th) >
  margin`` and the affine own-cell edges with one ``q0 - z`` on integer zero points;
* ``SD_ZERO_SHARED``: the sd-0 mask of a chunk's sd tensor (its count, the others' indices) kept
  for every grid's call on that tensor; a chunk whose point masses are its sd-0 elements takes
  those indices as its live ones;
* ``assess``: the pool protocol's ``sd / sqrt(2)`` one tensor per chunk for every grid (so the
  sd-0 facts serve its pool calls too).

Tolerance: none (``torch.equal``, NaN equal to NaN): the same operations on the same values, or
(the inside test) comparisons whose equivalence holds in floating point (rounding is monotone).
"""

import dataclasses
import importlib
import math

import pytest
import torch

import mis_lightning.quantization.base as qb
from tests.test_point_mass import FIELDS, _grid, _sigma

F64 = torch.float64
A = importlib.import_module("mis_lightning.assess")


def _equal(a, b, fields=FIELDS):
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        assert x.shape == y.shape and bool(((x == y) | (x.isnan() & y.isnan())).all()), f


def _edge_cases(g, theta):
    """``theta`` with weights on their own cell's edges, on the bounds, one ulp inside both, and
    NaN: the inside test's ties."""
    c = theta.numel()
    scale, zp, code = g.element_grid(0, c)
    dead = scale <= 0
    scale = torch.where(dead, torch.ones_like(scale), scale).to(F64)
    lo, hi = g._own_edges(theta, scale, zp, code)
    th = theta.clone()
    for sl, e in ((slice(0, None, 37), lo), (slice(5, None, 41), hi)):
        ok = torch.isfinite(e[sl])
        th[sl] = torch.where(ok, e[sl], th[sl])
    th[11::53] = torch.nextafter(th[11::53], torch.full_like(th[11::53], math.inf))
    bounds = g.element_bounds(0, c)
    if bounds is not None:
        th[3::59] = bounds[0][3::59]
        th[7::61] = torch.nextafter(bounds[1][7::61], torch.zeros_like(bounds[1][7::61]))
    th[13::97] = math.nan
    return th, scale, zp, code, bounds


SCHEMES = ["rtn_int4", "rtn_int8", "float8_weight_only", "intx_weight_only_int4_g32_asym", "bf16"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("use_codes", [True, False])
def test_the_fused_inside_test_is_the_old_mask(scheme, use_codes, monkeypatch):
    """``_inside`` and ``_own_edges`` with ``INSIDE_FUSED`` on equal them off bitwise (ties on
    the edges and bounds, ulps inside, NaN weights; with and without bounds; the backend's codes
    and the nearest ones); a float zero point takes the old edges' arithmetic (fails on the old
    code: no switch)."""
    if scheme not in ("rtn_int4", "rtn_int8", "bf16"):
        pytest.importorskip("torchao")
    g, theta = _grid(scheme, 96, 64)
    th, scale, zp, code, bounds = _edge_cases(g, theta)
    if not use_codes:
        code = None
    grids = [g]
    if g.kind == "affine":  # a float zero point (torchao's tinygemm layout): the old order
        zf = (torch.zeros_like(g.scale) if g.zero_point is None else g.zero_point.to(torch.float32)) + 0.25
        grids.append(dataclasses.replace(g, zero_point=zf))
    for gg in grids:
        z = gg.element_grid(0, th.numel())[1]
        for bd in (bounds, None):
            got = {}
            for on in (True, False):
                monkeypatch.setattr(qb, "INSIDE_FUSED", on)
                got[on] = (gg._inside(th, scale, z, code, bd), *gg._own_edges(th, scale, z, code))
            for x, y in zip(got[True], got[False]):
                assert torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all())
            assert bool(got[True][0].any()) and not bool(got[True][0].all())


def _two_grids():
    """int4 and int8 per-row grids of the same weights (the same absmax bounds), sd 0 on 7 rows
    of 8 and a few sd-0 weights on their cell's edges (``_sigma``)."""
    g4, theta = _grid("rtn_int4", 512, 128)
    g8, theta8 = _grid("rtn_int8", 512, 128)
    assert torch.equal(theta, theta8)
    theta, sigma = _sigma(g4, theta, 512, 128)
    return g4, g8, theta, sigma


@pytest.mark.parametrize("on_edges", [True, False])
def test_the_sd_zero_facts_serve_every_grid_of_the_chunk(on_edges, monkeypatch):
    """Main and pool calls of two grids on one chunk (one sd tensor each, as assess passes them):
    the sd-0 mask computed once per sd tensor, and where the point masses are exactly the sd-0
    elements the live indices are those of the sd; every field bitwise as with the switch off
    (the revealed elements left off the paths included; fails on the old code)."""
    g4, g8, theta, sigma = _two_grids()
    if not on_edges:  # no sd-0 weight on an edge: the point masses are the sd-0 elements
        theta = _grid("rtn_int4", 512, 128)[1]
    c = theta.numel()
    pool = sigma / 2 ** 0.5
    calls = [(g, s, k) for g in (g4, g8) for s, k in ((sigma, False), (pool, True))]

    def run():
        qb.release_chunk_facts()
        return [g.moments(theta, s, 0, c, kappa_only=k) for g, s, k in calls]

    monkeypatch.setattr(qb, "SD_ZERO_SHARED", False)
    ref = run()
    made, lived = [], []
    real_init, real_live = qb._SdZero.__init__, qb._SdZero.live

    def init(self, mask):
        made.append(1)
        real_init(self, mask)

    def live(self):
        lived.append(1)
        return real_live(self)

    monkeypatch.setattr(qb._SdZero, "__init__", init)
    monkeypatch.setattr(qb._SdZero, "live", live)
    monkeypatch.setattr(qb, "SD_ZERO_SHARED", True)
    got = run()
    assert len(made) == 2  # the main sd and the pool sd, for both grids
    assert bool(lived) != on_edges  # on-edge sd-0 weights: not point masses, the old indices
    for (_, _, k), a, b in zip(calls, got, ref):
        _equal(a, b, ("kappa",) if k else FIELDS)
    assert g4.revealed is not None and bool(g4.revealed.any())


def test_a_changed_sd_recomputes_its_sd_zero_facts(monkeypatch):
    """An sd tensor changed in place (a live weight's sd set to 0) is a new key: its moments are
    those of a call without kept facts."""
    g4, _, theta, sigma = _two_grids()
    c = theta.numel()
    qb.release_chunk_facts()
    g4.moments(theta, sigma, 0, c)
    j = int(torch.nonzero(sigma > 0)[0])
    sigma[j] = 0.0
    got = g4.moments(theta, sigma, 0, c)
    monkeypatch.setattr(qb, "SD_ZERO_SHARED", False)
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
    _equal(got, g4.moments(theta, sigma, 0, c))


def test_the_pool_calls_of_a_chunk_read_one_sd_tensor(monkeypatch):
    """``assess``: every grid's pool-protocol call on a chunk gets the same ``sd / sqrt(2)``
    tensor (so the sd-0 facts serve them all), with the values of ``sd / sqrt(2)``
    (fails on the old code: one tensor per grid)."""
    from tests.test_sampled_draws import _diagonal_relu_mlp

    model, est, sc_cfg = _diagonal_relu_mlp()
    seen: dict[tuple, list] = {}
    real = qb.ParamGrid.moments

    def spy(self, theta, sigma, start, end, use_codes=True, compile_policy=None, kappa_only=False):
        if kappa_only:
            seen.setdefault((self.name, start, end), []).append((sigma, theta))
        return real(self, theta, sigma, start, end, use_codes, compile_policy, kappa_only)

    monkeypatch.setattr(qb.ParamGrid, "moments", spy)
    A.score_schemes(est, model, ["rtn_int4", "rtn_int8"], scoring_config=sc_cfg)
    pairs = [v for v in seen.values() if len(v) >= 2]
    assert pairs
    for v in pairs:
        assert all(s is v[0][0] for s, _ in v)
    for (name, a, b), v in seen.items():
        want = est.sigma[name].reshape(-1)[a:b].to(F64) / A.POOL_SIGMA_RATIO
        assert torch.equal(v[0][0], want)
