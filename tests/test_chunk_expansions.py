"""Per-chunk work done once for every grid of a parameter, and the revealed elements written in
place (cm35, issue 13):

* ``SHARE_EXPANSIONS``: grids whose per-block bounds / zero points are bitwise equal (every absmax
  grid of one block size: int8, int4 and float8 per row) read one per-element expansion of a chunk
  (``ParamGrid._chunk_grid``) instead of one each; a grid tensor changed in place, another block
  size or other values get their own.
* ``REVEALED_IN_PLACE``: ``ParamGrid.moments`` writes the revealed elements' moments into fields
  that the call allocated (``_FreshMoments``), never into moments that may share a tensor with
  anything else.
* The wide-sd closed form's C3 of a whole chunk: the main call's serves the pool call
  (``REUSE_CHUNK_FACTS``).
* ``KAPPA_ONLY_STANDINS``: a kappa_only call on a chunk mostly of point masses returns its unread
  fields as one expanded NaN; ``kappa`` bit for bit that of the full call.

Tolerance: none (``torch.equal``): the same operations on the same values either way.
"""

import pytest
import torch

import mis_lightning.quantization.base as qb
from mis_lightning.functional.cells import CellMoments
from mis_lightning.quantization import get_scheme
from tests.test_point_mass import FIELDS, _sigma

F64 = torch.float64


def _equal(a, b, fields=FIELDS):
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        assert bool(((x == y) | (x.isnan() & y.isnan())).all()), f


def _grids(schemes, rows=256, cols=128, scale_up=3.0):
    """The grids of ``schemes`` on one linear layer's weight (the same weights for all)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        lin.weight.mul_(scale_up)
    grids = [get_scheme(s).apply(torch.nn.Sequential(lin)).grids["0.weight"] for s in schemes]
    return grids, lin.weight.detach().reshape(-1).to(F64)


@pytest.fixture(autouse=True)
def _fresh_caches():
    qb.release_chunk_facts()
    yield
    qb.release_chunk_facts()


PER_ROW = ["int8_weight_only", "intx_weight_only_int4", "float8_weight_only"]


def test_equal_bounds_share_one_expansion(monkeypatch):
    """Three per-row absmax grids of one weight: one lower and one upper bound tensor for all
    (the old code expanded each grid's own: distinct tensors); the g32 grid (other blocks) and a
    grid whose bounds changed in place get their own; every grid's chunk facts equal the unshared
    ones bit for bit."""
    grids, _ = _grids(PER_ROW + ["intx_weight_only_int4_g32"])
    c = grids[0].numel
    a, b = 0, c // 2
    assert all(g.support is not None for g in grids)
    assert qb._same_value(grids[0].support[0], grids[1].support[0])  # the premise: equal absmax bounds
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
    facts = [g._chunk_grid(a, b) for g in grids]
    lo = [f[4][0] for f in facts]
    hi = [f[4][1] for f in facts]
    assert lo[0] is lo[1] is lo[2] and hi[0] is hi[1] is hi[2]
    assert lo[3] is not lo[0] and hi[3] is not hi[0]
    monkeypatch.setattr(qb, "SHARE_EXPANSIONS", False)
    for g, f in zip(grids, facts):
        ref = g._chunk_grid(a, b)
        for x, y in zip(f, ref):
            if x is None or y is None:
                assert x is None and y is None
            elif isinstance(x, tuple):
                assert all(torch.equal(u, v) for u, v in zip(x, y))
            else:
                assert torch.equal(x, y)
    monkeypatch.setattr(qb, "SHARE_EXPANSIONS", True)
    # a grid tensor changed in place: its own expansion, of the new values
    with torch.no_grad():
        grids[1].support[0].mul_(2.0)
    lo1 = grids[1]._chunk_grid(a, b)[4][0]
    assert lo1 is not lo[0]
    assert torch.equal(lo1, grids[1].element_bounds(a, b)[0])
    assert torch.equal(lo1, 2.0 * lo[0])
    # another range: another expansion
    lo_other = grids[0]._chunk_grid(b, c)[4][0]
    assert torch.equal(lo_other, grids[0].element_bounds(b, c)[0])


@pytest.mark.parametrize("kappa_only", [False, True])
def test_shared_expansions_leave_the_moments_bitwise(kappa_only, monkeypatch):
    """Main calls on the grids of one chunk in the scoring pass's order, sd-0 rows and live rows
    (the point-mass and wide-sd forms and the paths): the same moments with the switch on and off."""
    grids, theta = _grids(PER_ROW + ["intx_weight_only_int4_g32", "bf16"])
    th, sg = _sigma(grids[0], theta, 256, 128)
    c = th.numel()
    got = {}
    for share in (True, False):
        monkeypatch.setattr(qb, "SHARE_EXPANSIONS", share)
        qb.release_chunk_facts()
        got[share] = [g.moments(th, sg, 0, c, kappa_only=kappa_only) for g in grids]
    for x, y in zip(got[True], got[False]):
        _equal(x, y, ("kappa",) if kappa_only else FIELDS)


@pytest.mark.parametrize("scheme", PER_ROW + ["bf16"])
def test_revealed_in_place_gives_the_copies_values(scheme, monkeypatch):
    """Each block's absmax element is revealed (kappa 1, mean_abs sqrt(2/pi), m4 3, coverage 1):
    written in place into the call's own fields or into copies, the same moments, on a chunk of
    sd-0 rows (point masses), sd far above the step (the wide-sd form) and the paths."""
    (g,), theta = _grids([scheme])
    c = theta.numel()
    th, sg = _sigma(g, theta, 256, 128)
    wide = sg.clone()
    wide[sg > 0] = 1e4 * sg[sg > 0]
    for sigma in (sg, wide, sg + 1e-3):
        out = {}
        for inplace in (True, False):
            monkeypatch.setattr(qb, "REVEALED_IN_PLACE", inplace)
            qb.release_chunk_facts()
            out[inplace] = g.moments(th, sigma, 0, c)
        _equal(out[True], out[False])
        if g.revealed is not None:
            rev = g.revealed.reshape(-1)[:c]
            assert bool(rev.any()) and bool((out[True].kappa[rev] == 1.0).all())


def test_revealed_written_in_place_only_into_fresh_fields(monkeypatch):
    """Moments that share a tensor with anything else (here: one tensor held outside for all four
    fields) are copied, left as they were; fresh ones (``_FreshMoments``) come back as the same
    tensors, filled (the old code copied all four, 2 MiB each per 2^18-weight chunk)."""
    (g,), theta = _grids(["int8_weight_only"])
    c = theta.numel()
    rev = g.revealed.reshape(-1)[:c]
    assert bool(rev.any())
    held = torch.full((c,), 0.25, dtype=F64)
    monkeypatch.setattr(qb.ParamGrid, "element_moments", lambda self, *a, **k: CellMoments(held, held, held, held))
    mm = g.moments(theta, torch.ones_like(theta), 0, c)
    assert bool((held == 0.25).all())
    assert float(mm.kappa[rev][0]) == 1.0 and float(mm.m4[rev][0]) == 3.0
    own = [torch.full((c,), 0.25, dtype=F64) for _ in range(4)]
    monkeypatch.setattr(qb.ParamGrid, "element_moments", lambda self, *a, **k: qb._FreshMoments(*own))
    mm = g.moments(theta, torch.ones_like(theta), 0, c)
    assert all(getattr(mm, f) is t for f, t in zip(FIELDS, own))
    assert bool((own[0][rev] == 1.0).all()) and bool((own[2][rev] == 3.0).all())
    assert bool((own[0][~rev] == 0.25).all())


@pytest.mark.parametrize("scheme", ["int8_weight_only", "float8_weight_only"])
def test_the_pool_call_reads_the_main_calls_cubes(scheme, monkeypatch):
    """A chunk whose sd spans its bounded window (every weight in the wide-sd closed form): the
    main call's cubed cell widths serve the pool call (no second C3 pass; the old code computed
    it in both), and both calls' moments equal those of calls that recompute it, bit for bit."""
    (g,), theta = _grids([scheme])
    c = theta.numel()
    lo, hi = g.element_bounds(0, c)
    sigma = 100.0 * (hi - lo)  # the window is a hundredth of an sd
    calls = {"n": 0}
    for name in ("affine_cube_sum", "table_cube_sum"):
        real = getattr(qb, name)

        def spy(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(qb, name, spy)
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
    ref = [g.moments(theta, sigma, 0, c), g.moments(theta, sigma / 2 ** 0.5, 0, c, kappa_only=True)]
    assert calls["n"] >= 2
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", True)
    qb.release_chunk_facts()
    main = g.moments(theta, sigma, 0, c)
    after_main = calls["n"]
    pool = g.moments(theta, sigma / 2 ** 0.5, 0, c, kappa_only=True)
    assert calls["n"] == after_main  # the pool call computed no C3
    _equal(main, ref[0])
    _equal(pool, ref[1], ("kappa",))
    assert float((1.0 - main.kappa).max()) < 1e-6  # the wide-sd regime indeed


@pytest.mark.parametrize("scheme", ["int8_weight_only", "intx_weight_only_int4_g32", "float8_weight_only", "bf16"])
def test_kappa_only_point_mass_chunks_return_standins(scheme, monkeypatch):
    """``KAPPA_ONLY_STANDINS``: a kappa_only call on a chunk mostly of sd-0 rows gives the kappa
    of the full call bit for bit (revealed elements at 1), and mean_abs, m4 and coverage as one
    NaN expanded to the chunk (no chunk-sized tensor; the old code built three and filled them)."""
    (g,), theta = _grids([scheme])
    c = theta.numel()
    th, sg = _sigma(g, theta, 256, 128)
    monkeypatch.setattr(qb, "KAPPA_ONLY_STANDINS", False)
    full = g.moments(th, sg / 2 ** 0.5, 0, c)
    ref = g.moments(th, sg / 2 ** 0.5, 0, c, kappa_only=True)
    monkeypatch.setattr(qb, "KAPPA_ONLY_STANDINS", True)
    qb.release_chunk_facts()
    got = g.moments(th, sg / 2 ** 0.5, 0, c, kappa_only=True)
    assert torch.equal(got.kappa, ref.kappa) and torch.equal(got.kappa, full.kappa)
    for f in ("mean_abs", "m4", "coverage"):
        t = getattr(got, f)
        assert t.shape == (c,) and t.stride() == (0,) and bool(t.isnan().all()), f
    if g.revealed is not None:
        rev = g.revealed.reshape(-1)[:c]
        assert bool((got.kappa[rev] == 1.0).all())
    # a full call is untouched by the switch
    _equal(g.moments(th, sg / 2 ** 0.5, 0, c), full)
