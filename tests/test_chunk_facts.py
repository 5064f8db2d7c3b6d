"""The per-chunk facts one cell-moment call leaves for the next (``REUSE_CHUNK_FACTS``, sc33):
the scoring pass reads each chunk at sd and at sd / sqrt(2) (the pool protocol) with the same
weights, grid and bounds, so the grid's expansion of the range (``ParamGrid._chunk_grid``) and
the sd-0 weights' "strictly inside the cell and bounds" test (``ParamGrid._point_masses``) of the
first call serve the second. The moments must be those of a call without them, bit for bit, and
any change to what a fact was computed from (a weight or a grid tensor changed in place, another
weight tensor) must recompute it.

Tolerance: none (``torch.equal``): the same operations on the same values either way.
"""

import pytest
import torch

import mis_lightning.functional.kernel as K
import mis_lightning.quantization.base as qb
from tests.test_point_mass import FIELDS, _grid, _sigma

F64 = torch.float64


@pytest.fixture(autouse=True)
def _eager_kernel(monkeypatch):
    """The fused kernel eager, whatever ran earlier in this process: compilation starts once a
    process has scored COMPILE_AFTER elements in all (kernel._FUSED_STATE), so in a long xdist
    worker these small calls could take the compiled kernel, whose arithmetic differs from the
    eager one's by an ulp; these tests compare kept and fresh facts bitwise, which needs one
    arithmetic. (The CI failures of this file in sessions 40-41 were another fault: after
    ``g.scale.mul_(1.5)`` the weights lie outside their codes' cells, which the fused kernel's
    table read wrongly; only the periodic self-check, due every RECHECK_EVERY calls of a
    process, caught it. Fixed in the kernel: tests/test_off_cell_codes.py.)"""
    monkeypatch.setitem(K._FUSED_STATE, "elements", 0)


def _equal(a, b, fields=FIELDS):
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        assert torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all()), f


@pytest.fixture
def counted(monkeypatch):
    """Counts of ``_own_edges`` (the inside test) and ``element_grid`` (the range's expansion)."""
    n = {"edges": 0, "grid": 0}
    edges, grid = qb.ParamGrid._own_edges, qb.ParamGrid.element_grid

    def spy_edges(self, *a, **k):
        n["edges"] += 1
        return edges(self, *a, **k)

    def spy_grid(self, *a, **k):
        n["grid"] += 1
        return grid(self, *a, **k)

    monkeypatch.setattr(qb.ParamGrid, "_own_edges", spy_edges)
    monkeypatch.setattr(qb.ParamGrid, "element_grid", spy_grid)
    qb.release_chunk_facts()
    yield n
    qb.release_chunk_facts()


@pytest.mark.parametrize("scheme", ["rtn_int4", "bf16"])
def test_the_pool_call_reads_the_facts_of_the_main_call(scheme, counted, monkeypatch):
    """Main then pool call on one chunk: one expansion and one inside test for both, moments
    bitwise those of calls that recompute them; each fact serves one later call."""
    g, theta = _grid(scheme, 512, 128)
    c = theta.numel()
    theta, sigma = _sigma(g, theta, 512, 128)
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
    ref_main = g.moments(theta, sigma, 0, c)
    ref_pool = g.moments(theta, sigma / 2 ** 0.5, 0, c, kappa_only=True)
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", True)
    counted.update(edges=0, grid=0)
    main = g.moments(theta, sigma, 0, c)
    first = dict(counted)  # the inside test runs in blocks: one _own_edges call per block
    assert first["grid"] == 1 and first["edges"] >= 1
    pool = g.moments(theta, sigma / 2 ** 0.5, 0, c, kappa_only=True)
    assert counted == first
    _equal(main, ref_main)
    _equal(pool, ref_pool, ("kappa",))
    g.moments(theta, sigma, 0, c)  # taken by the pool call: computed again
    assert counted == {"edges": 2 * first["edges"], "grid": 2}


def test_a_changed_input_recomputes_the_facts(counted, monkeypatch):
    """An sd-0 weight moved onto its cell's edge in place (the same tensor: its version counter
    moves), a grid tensor changed in place, another weight tensor of equal shape, another range:
    each recomputes, and the moments are those of a call without kept facts (a stale inside test
    would score the moved weight as a point mass, kappa 0)."""
    g, theta = _grid("rtn_int4", 512, 128)
    c = theta.numel()
    theta, sigma = _sigma(g, theta, 512, 128)
    scale, zp, code = g.element_grid(0, c)
    lo, hi = g._own_edges(theta, scale.to(F64), zp, code)
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", True)

    def fresh(th, sg, a=0, b=c, grid=g):
        monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
        try:
            return grid.moments(th, sg, a, b)
        finally:
            monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", True)

    # a weight changed in place between the two calls
    point = g._point_masses(theta, sigma, scale, zp, code, g.element_bounds(0, c))
    j = int(torch.nonzero(point & torch.isfinite(hi)).squeeze(-1)[0])
    qb.release_chunk_facts()
    g.moments(theta, sigma, 0, c)
    theta[j] = hi[j]
    counted.update(edges=0, grid=0)
    got = g.moments(theta, sigma, 0, c)
    assert counted["edges"] >= 1
    want = fresh(theta, sigma)
    _equal(got, want)
    assert float(want.kappa[j]) > 0.1  # the paths' answer on the edge, not the point mass's 0

    # another weight tensor with the same shape (and values): no match
    g.moments(theta, sigma, 0, c)
    counted.update(edges=0, grid=0)
    got = g.moments(theta.clone(), sigma, 0, c)
    assert counted["edges"] >= 1
    _equal(got, fresh(theta, sigma))

    # a grid tensor changed in place: the range's expansion and the inside test again
    g.moments(theta, sigma, 0, c)
    with torch.no_grad():
        g.scale.mul_(1.5)
    counted.update(edges=0, grid=0)
    got = g.moments(theta, sigma, 0, c)
    assert counted["edges"] >= 1 and counted["grid"] == 1
    qb.release_chunk_facts()
    _equal(got, fresh(theta, sigma))

    # another range of the same grid
    half = c // 2
    g.moments(theta[:half], sigma[:half], 0, half)
    counted.update(edges=0, grid=0)
    got = g.moments(theta[half:], sigma[half:], half, c)
    assert counted["grid"] == 1
    _equal(got, fresh(theta[half:], sigma[half:], half, c))


@pytest.mark.parametrize("scheme", ["rtn_int4", "bf16"])
def test_the_inside_test_in_blocks_is_the_whole_chunks(scheme, monkeypatch):
    """``POINT_MASS_BLOCKS``: the sd-0 mask computed on cache-sized blocks equals the one pass
    over the chunk (weights on their cell's edges included: comparisons of exactly rounded
    arithmetic), on a chunk of several blocks with a partial last one."""
    from mis_lightning.functional.kernel import EAGER_BLOCK

    rows, cols = 600, 128  # 76,800 elements: 2 whole blocks of 2^15 and a partial one
    assert rows * cols > 2 * EAGER_BLOCK and rows * cols % EAGER_BLOCK
    g, theta = _grid(scheme, rows, cols)
    c = theta.numel()
    theta, sigma = _sigma(g, theta, rows, cols)
    scale, zp, code = g.element_grid(0, c)
    bounds = g.element_bounds(0, c)
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
    masks = []
    for blocks in (True, False):
        monkeypatch.setattr(qb, "POINT_MASS_BLOCKS", blocks)
        masks.append(g._point_masses(theta, sigma, scale, zp, code, bounds))
    assert masks[0] is not None and torch.equal(masks[0], masks[1])
    assert bool(((sigma == 0) & ~masks[0]).any())  # the on-edge weights stay with the paths
