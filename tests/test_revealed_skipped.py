"""Work left out of the integer / affine cell moments when its answer is known (cm36, issue 13):

* ``REVEALED_SKIPPED``: the revealed elements (a block's absmax, min or max) get all four fields
  from ``ParamGrid.moments`` after the paths, so affine and value-table grids leave them off the
  paths (the wide-sd form's and the point masses' leftovers: one weight in 32 of a g32 grid). The
  other elements keep the path of the call they would have shared (``path_elements``), also where
  leaving the revealed ones out takes a call below the kernels' large-call size (2^15).
* ``_wide_sd``'s rest takes the paths without a second closed-form attempt (it holds for none of it).
* ``KAPPA_ONLY_STANDINS`` in the wide-sd closed form: a kappa_only call returns ``mean_abs``,
  ``m4`` and ``coverage`` as one NaN expanded to the chunk (read-only: writing raises).
* The revealed elements' indices, found by the main call, kept for the pool call, the other
  grids with the same revealed tensor and the point-mass proof (``ParamGrid._revealed_at``, one
  cache, ``REUSE_CHUNK_FACTS``) and written by ``index_fill_``.

Tolerance: none (``torch.equal``, NaN equal to NaN): the same operations on the same elements
either way, so every field read is expected bit for bit.
"""

import pytest
import torch

import mis_lightning.quantization.base as qb
from mis_lightning.functional.cells import SQRT_2_OVER_PI
from tests.test_chunk_expansions import _equal, _grids
from tests.test_point_mass import FIELDS, _sigma

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_caches():
    qb.release_chunk_facts()
    yield
    qb.release_chunk_facts()


def _calls(g, theta, sigma, c):
    """The scoring's calls on one chunk: theta-hat with codes, the pool's kappa_only call, a
    draw's positions without codes (and kappa_only there)."""
    xi = torch.randn(c, generator=torch.Generator().manual_seed(3), dtype=F64)
    pos = theta + sigma * xi
    return [(g.moments(theta, sigma, 0, c), FIELDS),
            (g.moments(theta, sigma / 2 ** 0.5, 0, c, kappa_only=True), ("kappa",)),
            (g.moments(pos, sigma, 0, c, use_codes=False), FIELDS),
            (g.moments(pos, sigma, 0, c, use_codes=False, kappa_only=True), ("kappa",))]


def _path_sizes(monkeypatch):
    """Record (elements, path_elements) of every ``_path_moments`` call."""
    seen: list[tuple[int, int | None]] = []
    real = qb.ParamGrid._path_moments

    def spy(self, th, *a, **k):
        seen.append((th.shape[0], a[7] if len(a) > 7 else k.get("path_elements")))
        return real(self, th, *a, **k)

    monkeypatch.setattr(qb.ParamGrid, "_path_moments", spy)
    return seen


SCHEMES = ["int8_weight_only", "intx_weight_only_int4_g32", "intx_weight_only_int4_g32_asym",
           "float8_weight_only", "rtn_int4"]


@pytest.mark.parametrize("regime", ["point_masses", "paths", "wide"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_revealed_off_the_paths_same_moments(scheme, regime, monkeypatch):
    """Every field read, skipped or not, bit for bit (revealed elements at (1, sqrt(2/pi), 3, 1));
    skipped, the paths see fewer elements (the old code has no switch: fails there)."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    (g,), theta = _grids([scheme])
    c = theta.numel()
    assert g.revealed is not None and bool(g.revealed.any())
    if regime == "point_masses":  # 7 of 8 rows sd 0 (dead units)
        theta, sigma = _sigma(g, theta, 256, 128)
    else:
        lo, hi = g.element_bounds(0, c)
        # a tenth of the bounded window (the grid paths) or a hundred windows (the closed form)
        sigma = (0.1 if regime == "paths" else 100.0) * (hi - lo)
    seen = _path_sizes(monkeypatch)
    monkeypatch.setattr(qb, "REVEALED_SKIPPED", False)
    ref = _calls(g, theta, sigma, c)
    n_ref = sum(n for n, _ in seen)
    seen.clear()
    monkeypatch.setattr(qb, "REVEALED_SKIPPED", True)
    qb.release_chunk_facts()
    got = _calls(g, theta, sigma, c)
    for (a, fields), (b, _) in zip(got, ref):
        _equal(a, b, fields)
    rev = g.revealed.reshape(-1)[:c]
    assert bool((got[0][0].kappa[rev] == 1.0).all()) and bool((got[0][0].m4[rev] == 3.0).all())
    # (paths: the closed form takes none, every element on the paths, as before; float8's wide
    # regime: the value-table series, qb.TABLE_WIDE_SERIES, takes the closed form's rest, the
    # revealed elements too, in both ways: no path call sees them)
    if regime != "paths" and not (regime == "wide" and g.kind == "table" and qb.TABLE_WIDE_SERIES):
        assert sum(n for n, _ in seen) < n_ref


@pytest.mark.parametrize("scheme", ["intx_weight_only_int4_g32", "float8_weight_only"])
def test_revealed_off_a_large_call_keep_its_path(scheme, monkeypatch):
    """A chunk of 2^17 weights, 3 rows in 4 sd 0: the others and the revealed ones of the dead rows
    are over 2^15 (the kernels' large-call paths), the others alone under it. Skipped, they are
    given the large call's size (path_elements) and their moments are bit for bit those of the
    call that held the revealed ones too."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    rows, cols = 1024, 128
    (g,), theta = _grids([scheme], rows, cols)
    c = theta.numel()
    scale, _, _ = g.element_grid(0, c)
    live = (torch.arange(rows) % 4 == 0).repeat_interleave(cols)
    sigma = torch.where(live, 0.3 * scale.to(F64), torch.zeros_like(theta))
    rev = g.revealed.reshape(-1)[:c]
    n_live = int((live | rev).sum())
    seen = _path_sizes(monkeypatch)
    monkeypatch.setattr(qb, "REVEALED_SKIPPED", False)
    ref = _calls(g, theta, sigma, c)
    assert max(n for n, _ in seen) >= n_live >= 1 << 15
    seen.clear()
    monkeypatch.setattr(qb, "REVEALED_SKIPPED", True)
    qb.release_chunk_facts()
    got = _calls(g, theta, sigma, c)
    if int((live & ~rev).sum()) < 1 << 15:  # the crossing this test is for
        assert any(n < 1 << 15 <= (p or 0) for n, p in seen), seen
    for (a, fields), (b, _) in zip(got, ref):
        _equal(a, b, fields)


def test_the_wide_rest_takes_the_paths_once(monkeypatch):
    """A chunk in the wide-sd regime but for a few rows whose sd is a hundredth of the window
    (the closed form's rest): one closed-form pass per call (the old code ran it again on the
    rest, where it holds for none), the same moments."""
    (g,), theta = _grids(["int8_weight_only"])
    c = theta.numel()
    lo, hi = g.element_bounds(0, c)
    narrow = (torch.arange(256) % 16 == 5).repeat_interleave(128)
    sigma = torch.where(narrow, 0.01 * (hi - lo), 100.0 * (hi - lo))
    calls = {"n": 0}
    real = qb.ParamGrid._wide_closed

    def spy(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(qb.ParamGrid, "_wide_closed", spy)
    mm = g.moments(theta, sigma, 0, c)
    assert calls["n"] == 1
    monkeypatch.setattr(qb, "WIDE_SD_CLOSED_FORM", False)
    paths = g.moments(theta, sigma, 0, c)
    # the narrow rows on the paths either way: bit for bit
    _equal(qb.CellMoments(*(getattr(mm, f)[narrow] for f in FIELDS)),
           qb.CellMoments(*(getattr(paths, f)[narrow] for f in FIELDS)))


@pytest.mark.parametrize("scheme", ["int8_weight_only", "float8_weight_only"])
def test_wide_kappa_only_returns_standins(scheme, monkeypatch):
    """``KAPPA_ONLY_STANDINS`` in the wide-sd form: kappa bit for bit that of the full call (revealed
    at 1), mean_abs, m4 and coverage one NaN expanded to the chunk (no chunk-sized tensor; the old
    code filled m4 with 3 and coverage with 1) that cannot be written; switched off, as before."""
    if scheme != "int8_weight_only":
        pytest.importorskip("torchao")
    (g,), theta = _grids([scheme])
    c = theta.numel()
    lo, hi = g.element_bounds(0, c)
    sigma = 100.0 * (hi - lo)
    full = g.moments(theta, sigma, 0, c)
    got = g.moments(theta, sigma, 0, c, kappa_only=True)
    assert torch.equal(got.kappa, full.kappa)
    for f in ("mean_abs", "m4", "coverage"):
        t = getattr(got, f)
        assert t.shape == (c,) and t.stride() == (0,) and bool(t.isnan().all()), f
    with pytest.raises(RuntimeError):
        got.m4[:4] = 3.0
    monkeypatch.setattr(qb, "KAPPA_ONLY_STANDINS", False)
    qb.release_chunk_facts()
    old = g.moments(theta, sigma, 0, c, kappa_only=True)
    assert torch.equal(old.kappa, full.kappa)
    assert bool((old.m4 == 3.0).all()) and bool((old.coverage == 1.0).all())


def test_revealed_indices_kept_for_the_pool_call(monkeypatch):
    """The revealed elements' indices of a chunk: found by the main call, kept for the pool call
    and the point-mass proof (one entry, read by both: the old code had no such fact and passed
    over the chunk's mask once per field; later, two caches), the same moments as recomputed
    ones, every revealed element at (1, sqrt(2/pi), 3, 1)."""
    (g,), theta = _grids(["rtn_int4"])
    c = theta.numel()
    theta, sigma = _sigma(g, theta, 256, 128)
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
    ref = [g.moments(theta, sigma, 0, c), g.moments(theta, sigma / 2 ** 0.5, 0, c, kappa_only=True)]
    assert not qb._REVEALED
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", True)
    qb.release_chunk_facts()
    main = g.moments(theta, sigma, 0, c)
    assert len(qb._REVEALED) == 1
    (_, (mask, idx)), = qb._REVEALED
    rev = g.revealed.reshape(-1)[:c]
    assert torch.equal(mask, rev) and torch.equal(idx, torch.nonzero(rev).squeeze(-1)) and idx.numel() > 0
    pool = g.moments(theta, sigma / 2 ** 0.5, 0, c, kappa_only=True)
    assert g._proof_applies(theta, 0, c)
    g._proven_point_mask(theta, sigma == 0, 0, c)
    assert len(qb._REVEALED) == 1 and qb._REVEALED[0][1][1] is idx  # (the same entry, kept)
    _equal(main, ref[0])
    _equal(pool, ref[1], ("kappa",))
    for f, v in zip(FIELDS, (1.0, SQRT_2_OVER_PI, 3.0, 1.0)):
        assert bool((getattr(main, f)[rev] == v).all()), f
