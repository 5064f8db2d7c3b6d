"""``functional.gather`` (p49d): the scoring pass's gathers and scatters by ``index_select`` /
``index_copy_`` / ``index_fill_`` instead of advanced indexing (``INDEX_SELECT_GATHERS``).

References: plain advanced indexing (``t[idx]``, ``out[idx] = v``) on the same tensors, compared
bit for bit (both copy the same values: no tolerance); the cell moments of affine grids whose
sd spans their window (the closed form's rest on the grid paths, the fused kernel's per-form
scatters: the sites the switch changes) with the switch off, bit for bit. That the switch is
taken: the cell-moment call runs fewer ``aten::index`` / ``aten::index_put_`` operators with it
on (fails where the sites index as before).
"""

import pytest
import torch

import mis_lightning.functional.fastpath as fastpath
import mis_lightning.functional.gather as G
import mis_lightning.quantization.base as qb
from tests._op_counts import op_counts
from tests.test_wide_sd import _grid  # a torch.nn.Linear's weights (x3) and the scheme's grid

F64 = torch.float64


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit patterns (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def _source(n: int, dtype: torch.dtype, seed: int = 0, cols: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if cols is None else (n, cols)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)
    t = torch.randn(shape, generator=g, dtype=dtype)
    flat = t.view(-1)
    flat[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    return t


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("cols", [None, 3])
def test_take_is_the_indexing_bit_for_bit(dtype, cols):
    t = _source(1000, dtype, cols=cols)
    for idx in (torch.nonzero(torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.6).squeeze(-1),
                torch.arange(1000), torch.empty(0, dtype=torch.long), torch.tensor([0, 999, 3])):
        assert _bits_equal(G.take(t, idx), t[idx])
        assert _bits_equal(G.take(t, idx.to(torch.int32)), t[idx])
    if cols is not None:  # along dimension 1
        idx = torch.tensor([2, 0, 2, 1])
        assert _bits_equal(G.take(t, idx, 1), t[:, idx])
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(2)) < 0.3  # a mask: indexed as before
    assert _bits_equal(G.take(t, mask), t[mask])


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bool])
def test_put_is_the_assignment_bit_for_bit(dtype):
    out0 = _source(500, dtype, seed=3)
    idx = torch.nonzero(torch.rand(500, generator=torch.Generator().manual_seed(4)) < 0.4).squeeze(-1)
    values = [_source(idx.numel(), dtype, seed=5), True if dtype == torch.bool else 2.5,
              torch.tensor(False if dtype == torch.bool else -0.0, dtype=dtype)]
    for v in values:
        a, b = out0.clone(), out0.clone()
        G.put(a, idx, v)
        b[idx] = v
        assert _bits_equal(a, b)
    # another dtype: the indexing's own answer (it refuses a tensor of another dtype)
    other = _source(idx.numel(), torch.float16 if dtype != torch.float16 else F64, seed=6)
    for v in (other, other[0]):
        a, b = out0.clone(), out0.clone()
        try:
            b[idx] = v
        except RuntimeError:
            with pytest.raises(RuntimeError):
                G.put(a, idx, v)
        else:
            G.put(a, idx, v)
            assert _bits_equal(a, b)
    a, b = out0.clone(), out0.clone()
    G.put(a, torch.empty(0, dtype=torch.long), values[0][:0])
    assert _bits_equal(a, b)


def test_bad_indices_raise_as_indexing_does():
    t = torch.arange(5.0, dtype=F64)
    with pytest.raises((IndexError, RuntimeError)):
        G.take(t, torch.tensor([5]))
    with pytest.raises((IndexError, RuntimeError)):
        G.put(t, torch.tensor([7]), torch.tensor([1.0], dtype=F64))


INDEX_OPS = ("aten::index", "aten::index_put_", "aten::index_select", "aten::index_copy_")


def test_the_raw_operator_counts_are_the_parsed_profilers(monkeypatch):
    """``tests/_op_counts.op_counts`` (the profiler's raw events, t53) counts what the parsed
    ``prof.events()`` counts for the operators these tests read, on indexing calls of both settings
    and a small grid's cell moments (the parsed list is the reference: ~50 us an event)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    g, theta = _grid("rtn_int4", 4, 64)
    c = theta.numel()
    sigma = g._chunk_grid(0, c)[0].to(F64) * torch.exp(
        torch.empty(c, dtype=F64).uniform_(-2.3, 9.2, generator=torch.Generator().manual_seed(1)))
    t, idx = torch.randn(600, dtype=F64), torch.arange(0, 600, 7)
    monkeypatch.setattr(fastpath, "RECHECK_EVERY", 1 << 40)
    for flag in (True, False):
        monkeypatch.setattr(G, "INDEX_SELECT_GATHERS", flag)
        for fn in (lambda: (G.take(t, idx), G.put(t.clone(), idx, t[: idx.numel()].clone())),
                   lambda: g.moments(theta, sigma, 0, c)):
            qb.release_chunk_facts()
            fn()  # first-use self-checks of the fast paths (their own indexing) out of the counted calls
            qb.release_chunk_facts()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            parsed = Counter(e.name for e in prof.events() if e.name in INDEX_OPS)
            qb.release_chunk_facts()
            got = op_counts(fn, INDEX_OPS)
            assert got == parsed and sum(got.values()) > 0, (flag, got, parsed)
    qb.release_chunk_facts()


def test_the_switch_runs_index_select_not_index(monkeypatch):
    t = torch.randn(4096, dtype=F64)
    idx = torch.arange(0, 4096, 3)
    out = torch.zeros(4096, dtype=F64)
    monkeypatch.setattr(G, "INDEX_SELECT_GATHERS", True)
    on = op_counts(lambda: (G.take(t, idx), G.put(out, idx, t[: idx.numel()].clone())), INDEX_OPS)
    assert on.get("aten::index", 0) == 0 and on.get("aten::index_put_", 0) == 0
    assert on.get("aten::index_select", 0) >= 1 and on.get("aten::index_copy_", 0) >= 1
    monkeypatch.setattr(G, "INDEX_SELECT_GATHERS", False)
    off = op_counts(lambda: (G.take(t, idx), G.put(out, idx, t[: idx.numel()].clone())), INDEX_OPS)
    assert off.get("aten::index", 0) >= 1 and off.get("aten::index_put_", 0) >= 1



@pytest.mark.parametrize("scheme", ["rtn_int4", "int8_weight_only", "intx_weight_only_int4_g32",
                                    "float8_weight_only"])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_cell_moments_bitwise_the_same_and_fewer_index_ops(scheme, kappa_only, monkeypatch):
    """sd from a tenth of a step to ~1e4 steps (log-uniform): some weights take the wide-sd closed
    form, the rest the grid paths (gathered, computed, scattered back), the fused kernel's forms
    (fine with ends, table, two edges) on their own elements: every moment bit for bit with the
    switch off, and the call with it on runs fewer advanced-indexing operators."""
    if scheme != "rtn_int4":
        pytest.importorskip("torchao")
    g, theta = _grid(scheme, 16, 128)
    c = theta.numel()
    scale = g._chunk_grid(0, c)[0].to(F64)
    gen = torch.Generator().manual_seed(1)
    sigma = scale * torch.exp(torch.empty(c, dtype=F64).uniform_(-2.3, 9.2, generator=gen))
    got = {}
    counts = {}
    # (no periodic self-check of a fast path inside the counted calls: GUARD rechecks every
    # RECHECK_EVERY calls of the process, with indexing of its own, so the counts depended on the
    # tests run before in the same process: tests/test_wide_sd.py first failed it; rv49)
    monkeypatch.setattr(fastpath, "RECHECK_EVERY", 1 << 40)
    for flag in (True, False):
        monkeypatch.setattr(G, "INDEX_SELECT_GATHERS", flag)
        qb.release_chunk_facts()
        got[flag] = g.moments(theta, sigma, 0, c, kappa_only=kappa_only)
        qb.release_chunk_facts()
        n = op_counts(lambda: g.moments(theta, sigma, 0, c, kappa_only=kappa_only), INDEX_OPS)
        counts[flag] = n.get("aten::index", 0) + n.get("aten::index_put_", 0)
        qb.release_chunk_facts()
    fields = ("kappa",) if kappa_only else ("kappa", "mean_abs", "m4", "coverage")
    for f in fields:
        assert _bits_equal(getattr(got[True], f).to(F64), getattr(got[False], f).to(F64)), f
    assert counts[True] < counts[False], counts


@pytest.mark.parametrize("flag", [True, False])
def test_positions_read_and_write_as_the_mask_does(flag, monkeypatch):
    """``take(t, positions(mask))`` is ``t[mask]`` and a scatter through them is the masked
    assignment, bit for bit, with the switch on (positions) and off (the mask itself)."""
    monkeypatch.setattr(G, "INDEX_SELECT_GATHERS", flag)
    gen = torch.Generator().manual_seed(7)
    mask = torch.rand(777, generator=gen) < 0.35
    ii = torch.randperm(2000, generator=gen)[:777]
    kappa = _source(777, F64, seed=8)
    at = G.positions(mask)
    assert at.dtype == (torch.int64 if flag else torch.bool)
    assert _bits_equal(G.take(kappa, at), kappa[mask])
    a, b = torch.zeros(2000, dtype=F64), torch.zeros(2000, dtype=F64)
    G.put(a, G.take(ii, at), G.take(kappa, at))
    b[ii[mask]] = kappa[mask]
    assert _bits_equal(a, b)
