"""The bf16 / fp16 casts' chunk facts shared across the two formats and the main / pool calls (p51d).
Each is exact: the same numbers bit for bit as with its switch off, and against an independent
check:

* ``table.REACH_FROM_EXTREMES``: the settle's reach test from the call's extremes is a proof: where
  it passes, every element's reach, formed element-wise here as the settle forms it, passes the
  four tests (on calls built around each bound, both outcomes seen), and the settle's kappa and
  mask equal the per-block test's on mixed and settled-whole calls (the blocks then form no reach);
* ``quantization.base.SHARE_SMALL_SCALES``: the two casts' grids read one scale expansion per chunk,
  equal to each grid's own, and a grid of few blocks with a zero-scale block still finds it dead;
* ``functional.point_proof.PROOF_FORMATS_SHARED``: the two formats' sd-0 proofs of one chunk, one
  computed with the other, equal each format's own proof, mask or ``None``, and a weight changed
  in place is proven again."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import point_proof as P
from mis_lightning.functional import table as T
from mis_lightning.functional.kernel import CUTOFF_SIGMAS, EAGER_BLOCK, _float64_inputs
from mis_lightning.quantization import base as B
from mis_lightning.quantization.casts import cast_cell_values
from mis_lightning.quantization.registry import get_scheme

F64 = torch.float64
CASTS = [torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


def _elementwise_reach(th: torch.Tensor, sg: torch.Tensor, layout: T.TableLayout) -> bool:
    """The four reach tests of every element, formed as ``_settled_unit`` forms them."""
    reach = sg * CUTOFF_SIGMAS
    lo_r, hi_r = th - reach, reach + th
    return bool(((lo_r <= -layout.wide) & (hi_r >= layout.wide) & (lo_r >= layout.lo_edge)
                 & (hi_r < layout.hi_edge)).all())


def _around_the_bounds(dtype: torch.dtype, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calls whose extremes sit within a few ulps of each bound of the reach test (``+-T``, and the
    finite cells' ends for fp16), theta and sd spread so that the scalar test's pairing of the
    extremes matters (a smallest sd beside a largest theta)."""
    layout = T.table_layout(cast_cell_values(dtype), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    calls = []
    wide = layout.wide
    for _ in range(300):
        u = float(torch.empty(1, dtype=F64).uniform_(0.0, 3.0 * wide, generator=g))
        s_lo = (u + wide) / CUTOFF_SIGMAS * (1.0 + float(torch.empty(1, dtype=F64).uniform_(-1e-15, 1e-15, generator=g)))
        s_hi = s_lo * float(torch.empty(1, dtype=F64).uniform_(1.0, 3.0, generator=g))
        n = 64
        # (the other elements well inside: each bound decided by the element placed on it alone)
        th = torch.empty(n, dtype=F64).uniform_(-0.5 * u, 0.5 * u, generator=g)
        sg = torch.empty(n, dtype=F64).uniform_(s_lo, s_hi, generator=g)
        k = int(torch.randint(0, 4, (1,), generator=g))
        th[0], sg[0] = (-u, s_lo) if k == 1 else (u, s_hi if k == 2 else s_lo)
        if k >= 2:  # the largest theta and the least sd on different elements; both ends on it
            th[1], sg[1] = -u, s_lo
        calls.append((th, sg))
    if dtype == torch.float16:  # reach near 65520 (the finite cells' end) from either side
        for _ in range(300):
            s = float(torch.empty(1, dtype=F64).uniform_(4000.0, 7700.0, generator=g))
            top = 65520.0 - CUTOFF_SIGMAS * s
            t_hi = top * (1.0 + float(torch.empty(1, dtype=F64).uniform_(-1e-12, 1e-12, generator=g)))
            th = torch.empty(32, dtype=F64).uniform_(-abs(t_hi), abs(t_hi), generator=g)
            sg = torch.empty(32, dtype=F64).uniform_(0.9 * s, s, generator=g)
            side = 1.0 if bool(torch.rand(1, generator=g) < 0.5) else -1.0  # (the top or the bottom end)
            th[0], sg[0], sg[1] = side * t_hi, s, 0.9 * s
            th[1] = -side * 0.5 * t_hi
            calls.append((th, sg))
    return calls


@pytest.mark.parametrize("dtype", CASTS)
def test_reach_from_extremes_is_a_proof(dtype):
    layout = T.table_layout(cast_cell_values(dtype), torch.device("cpu"))
    outcomes = {True: 0, False: 0}
    for th, sg in _around_the_bounds(dtype, 0):
        T._EXTREMES.clear()
        proven = T._reach_settles(th, sg, layout)
        each = _elementwise_reach(th, sg, layout)
        assert each or not proven  # proven: every element passes
        outcomes[proven] += 1
    assert outcomes[True] > 20 and outcomes[False] > 20
    # NaN in theta or sd, an infinite sd: not proven
    th, sg = torch.zeros(8, dtype=F64), torch.full((8,), 1.0, dtype=F64)
    T._EXTREMES.clear()
    assert T._reach_settles(th, sg, layout)
    for t, s in ((th.clone().index_fill_(0, torch.tensor([3]), math.nan), sg),
                 (th, sg.clone().index_fill_(0, torch.tensor([5]), math.nan)),
                 (th, sg.clone().index_fill_(0, torch.tensor([5]), math.inf))):
        T._EXTREMES.clear()
        assert not T._reach_settles(t, s, layout)


def test_extremes_kept_per_tensor_while_unchanged():
    t = torch.tensor([3.0, -1.0, 2.0], dtype=F64)
    T._EXTREMES.clear()
    assert T._extremes(t) == (-1.0, 3.0)
    t[0] = 7.0  # (in place: the version counter moves)
    assert T._extremes(t) == (-1.0, 7.0)
    u = t.clone()
    assert T._extremes(u) == (-1.0, 7.0) and len(T._EXTREMES) <= T._EXTREMES_SLOTS


def _settle(th, sg, layout, kappa_only, on, monkeypatch):
    monkeypatch.setattr(T, "REACH_FROM_EXTREMES", on)
    T.release_own_cells()
    T._EXTREMES.clear()
    th, sg, sc = _float64_inputs(th, sg, torch.ones_like(th))
    return T._settled_blocks(th, sg, sc, layout, kappa_only, into=kappa_only)


@pytest.mark.parametrize("dtype", CASTS)
def test_settle_from_extremes_equals_the_block_test(dtype, monkeypatch):
    """Calls settled whole (the blocks form no reach: one ``torch.sub`` a block, the width's, not
    two), settled whole but not proven by the extremes, and mixed calls: kappa and mask bit for bit
    the block test's. (With the reach proven the widths pass too on these tables: an 8.5-sd reach
    past ``|theta|`` puts the own cell below ``8.5 * 2^-8`` sd; their test stays per block.)"""
    values = cast_cell_values(dtype)
    layout = T.table_layout(values, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    n = 3 * EAGER_BLOCK + 17
    th = (torch.randn(n, generator=g, dtype=F64) * 0.02).float().to(F64)
    sg = torch.empty_like(th).uniform_(0.05, 0.5, generator=g)
    # a largest theta beside a smallest sd: every element's reach passes, the extremes do not prove it
    far = th.clone()
    far[EAGER_BLOCK + 5] = 0.45
    mixed_th = th.clone()
    mixed_sg = sg.clone()
    mixed_sg[::97] = 0.0  # sd 0 (frozen; ties where on a midpoint)
    mixed_sg[5::89] = 1e5  # fp16: reach past 65520 (spill); bf16: fine
    calls = [(th, sg, True), (far, sg, False), (mixed_th, mixed_sg, False)]
    subs = []
    real_sub = torch.sub
    for t, s, proven in calls:
        tt, ss, _ = _float64_inputs(t, s, torch.ones_like(t))
        T._EXTREMES.clear()
        assert T._reach_settles(tt, ss, layout) == proven
        for kappa_only in (True, False):
            monkeypatch.setattr(torch, "sub", lambda *a, **k: subs.append(1) or real_sub(*a, **k))
            subs.clear()
            new = _settle(t, s, layout, kappa_only, True, monkeypatch)
            n_new = len(subs)
            subs.clear()
            old = _settle(t, s, layout, kappa_only, False, monkeypatch)
            monkeypatch.setattr(torch, "sub", real_sub)
            if proven and t is th:  # each block's width alone; before, its width and its reach
                assert n_new == -(-n // EAGER_BLOCK) and len(subs) == 2 * n_new
            if kappa_only:
                assert (new[1] is None) == (old[1] is None)
                done = torch.ones(n, dtype=torch.bool) if new[1] is None else new[1]
                if new[1] is not None:
                    assert torch.equal(new[1], old[1])
            else:
                done = new[-1]
                assert torch.equal(done, old[-1])
            if t is far:
                assert bool(done.all())
            for a, b in zip(new[:-1], old[:-1]):
                assert torch.equal(_bits(a[done]), _bits(b[done]))
        # the whole call as before, every field
        out = []
        for on in (True, False):
            monkeypatch.setattr(T, "REACH_FROM_EXTREMES", on)
            T.release_own_cells()
            T._EXTREMES.clear()
            out.append(T.table_cell_moments(t, s, values, torch.ones_like(t), kappa_only=False))
        for f in ("kappa", "mean_abs", "m4", "coverage"):
            assert torch.equal(_bits(getattr(out[0], f)), _bits(getattr(out[1], f))), f


def _cast_grids(shape: tuple[int, ...]) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0]))
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    return model, {s: get_scheme(s).apply(model).grids["0.weight"] for s in ("fp16", "bf16")}


def test_casts_share_one_scale_expansion(monkeypatch):
    model, grids = _cast_grids((64, 300))
    w = model[0].weight.detach().reshape(-1).to(F64)
    sg = torch.rand(w.numel(), dtype=F64) * 1e-3
    sg[::3] = 0.0
    c = w.numel()
    for on in (True, False):
        monkeypatch.setattr(B, "SHARE_SMALL_SCALES", on)
        B.release_chunk_facts()
        got = {k: g._chunk_grid(0, c) for k, g in grids.items()}
        assert (got["fp16"][0] is got["bf16"][0]) == on
        for k, g in grids.items():
            own = g.element_grid(0, c)[0]  # (not shared: the grid's own expansion)
            assert torch.equal(_bits(got[k][0]), _bits(own)) and got[k][3] is None
    # kappa of both grids on a chunk, bit for bit either way
    res = {}
    for on in (True, False):
        monkeypatch.setattr(B, "SHARE_SMALL_SCALES", on)
        B.release_chunk_facts()
        T.release_own_cells()
        res[on] = [g.moments(w, s, 0, c).kappa for g in grids.values() for s in (sg, sg / math.sqrt(2.0))]
    for a, b in zip(res[True], res[False]):
        assert torch.equal(_bits(a), _bits(b))


def test_a_zero_scale_block_among_few_is_dead(monkeypatch):
    """A grid of 4 row blocks, one of scale 0: its elements dead either way (the few-blocks shortcut
    applies to positive scales only), and a NaN scale is not taken as positive."""
    _, grids = _cast_grids((4, 50))
    g = grids["fp16"]
    for bad, dead_rows in ((0.0, True), (math.nan, False)):
        g2 = B.ParamGrid(name="w", shape=g.shape, kind="table", dequantized=torch.zeros(0), bits_per_weight=16.0,
                         scale=torch.tensor([[1.0], [bad], [1.0], [1.0]], dtype=torch.float32),
                         block_size=(1, g.shape[1]), values=g.values)
        for on in (True, False):
            monkeypatch.setattr(B, "SHARE_SMALL_SCALES", on)
            B.release_chunk_facts()
            scale, _, _, dead, _ = g2._chunk_grid(0, g2.numel)
            if dead_rows:
                assert dead is not None and int(dead.sum()) == g.shape[1] and bool(dead[50:100].all())
            else:
                assert dead is None and bool(torch.isnan(scale[50:100]).all())


@pytest.mark.parametrize("first", CASTS)
def test_two_formats_proven_together(first, monkeypatch):
    second = torch.bfloat16 if first == torch.float16 else torch.float16
    g = torch.Generator().manual_seed(2)
    c = 3 * P.PROOF_BLOCK + 500
    th = (torch.randn(c, generator=g, dtype=F64) * 0.05).float().to(F64)
    for dt in CASTS:  # a weight on a midpoint of each format: not proven (a mask, not None)
        v = cast_cell_values(dt)
        th[P.PROOF_BLOCK + (7 if dt == torch.float16 else 9)] = float(0.5 * (v[40000] + v[40001]))
    ends = []
    real = P._cell_ends
    monkeypatch.setattr(P, "_cell_ends", lambda x, *a: ends.append(x.numel()) or real(x, *a))
    m = B._POINT_MASS_MARGIN

    def own(dt: torch.dtype, x: torch.Tensor):
        monkeypatch.setattr(P, "PROOF_FORMATS_SHARED", False)
        out = P.format_cell_proven_abs(x, dt, m)
        monkeypatch.setattr(P, "PROOF_FORMATS_SHARED", True)
        return out

    # a chunk with unproven weights; one of bf16 values of the normal range, fp16 values too: every
    # weight its cells' centre in both formats, proven whole
    whole = torch.linspace(1e-3, 0.5, c, dtype=F64).to(torch.bfloat16).to(F64)
    for t in (th, whole):
        P.release_shared_proofs()
        want = {dt: own(dt, t) for dt in (first, second)}
        P.release_shared_proofs()
        ends.clear()
        got1 = P.format_cell_proven_abs(t, first, m)  # (nothing asked before: this format alone)
        got2 = P.format_cell_proven_abs(t, second, m)
        t2 = t.clone()
        got1b = P.format_cell_proven_abs(t2, first, m)  # both asked now: proven together ...
        n_ends = len(ends)
        got2b = P.format_cell_proven_abs(t2, second, m)  # ... and kept for the second
        assert len(ends) == n_ends == 3 * 4
        for dt, a in ((first, got1), (second, got2), (first, got1b), (second, got2b)):
            b = want[dt]
            assert (a is None) == (b is None)
            if b is not None:
                assert torch.equal(a, b)
        assert (want[first] is None) == (t is not th)
        t2[5] = 1.0  # changed in place: proven again
        ends.clear()
        assert P.format_cell_proven_abs(t2, second, m) is not None or t is not th
        assert ends
    P.release_shared_proofs()


@pytest.mark.parametrize("dtype", CASTS)
def test_still_draws_of_a_bounded_cast_chunk_are_flagged(dtype, monkeypatch):
    """``assess.DRAWS_STILL_FLAGGED``: a sample of a cast chunk under the draws' bound (a chunk like
    the 1e7 MLP's first layer: sd ~30x |theta|) moves no kappa: ``_sampled_draw_parts`` returns it
    flagged (``StillParts``, as a sample of sd-0 weights), its zeros and mix those the switch off
    builds (the Horvitz-Thompson scaling of zeros), and a sample with one element past the bound is
    not flagged (its parts bitwise the switch off's)."""
    import importlib

    A = importlib.import_module("mis_lightning.assess")
    rows, cols = 64, 32
    c = rows * cols
    gen = torch.Generator().manual_seed(12)
    g = B.ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                    bits_per_weight=16.0, scale=torch.ones(1, 1), block_size=(rows, cols),
                    values=cast_cell_values(dtype), release_dtype=dtype)
    th = torch.randn(c, dtype=F64, generator=gen) * 0.02
    sg = (th.abs() + 0.01) * 30.0
    k_main = g.moments(th, sg, 0, c, kappa_only=True).kappa
    D = 16
    xi = torch.randn(A._draw_noise_rows(D), c, dtype=F64, generator=gen)
    sample = A._draw_sample(c, cols, torch.Generator().manual_seed(13))
    monkeypatch.setattr(A, "CAST_DRAWS_BOUNDED", True)
    monkeypatch.setattr(A, "CAST_DRAWS_TOL", 1e-4)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(A, "DRAWS_STILL_FLAGGED", on)
        got[on] = A._sampled_draw_parts(g, th, sg, 0, c, k_main, xi, D, None, sample)
        assert isinstance(got[on], A.StillParts) == on
    for a, b in zip(got[True], got[False]):
        assert a.shape == b.shape and torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))
    assert not bool(got[False][0].any())
    th2, sg2 = th.clone(), sg.clone()
    j = int(sample[0][3])
    th2[j], sg2[j] = (3e4, 1e4) if dtype == torch.float16 else (1.5, 1e-3)  # beyond the bound
    k2 = g.moments(th2, sg2, 0, c, kappa_only=True).kappa
    res = {}
    for on in (True, False):
        monkeypatch.setattr(A, "DRAWS_STILL_FLAGGED", on)
        res[on] = A._sampled_draw_parts(g, th2, sg2, 0, c, k2, xi, D, None, sample)
        assert not isinstance(res[on], A.StillParts)
    for a, b in zip(res[True], res[False]):
        assert torch.equal(_bits(a), _bits(b))
    assert bool(res[True][0].ne(0).any())
