"""The bf16 / fp16 casts' settling pass at scale 1 (p49c): the own cells from the cast's bit
pattern (``table.OWN_CELLS_BY_BITS``), the settle in fewer passes (``table.SETTLE_UNIT_FEWER_PASSES``)
and sigma's floor by its least value (``table.SD_FLOOR_BY_MIN``). Each is exact: the same numbers
bit for bit as the path before (the switch off), and as the independent paths checked here:

* own cells: ``numpy.searchsorted`` over the table's midpoints, computed here from
  ``cast_cell_values`` (not the layout's guide), on every 16-bit pattern's value, every midpoint
  (ties), their float64 and float32 neighbours (a cast through float32 rounds those to the other
  side), NaN, infinities and values beyond the top;
* the settle: the windowed path (``table._table_window_moments``, its own prelude and regimes) on
  every element the settle marks done, and the mask the same as the path before, on calls mixing
  fine, frozen (sd 0), spilling (reach past +-65520), windowed, NaN and infinite elements, over
  several blocks, full and kappa-only; a call every element of which is settled (the reductions'
  shortcut) too.

Each test also checks that the new route is taken (it fails with its switch off)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.functional.kernel import EAGER_BLOCK, _float64_inputs
from mis_lightning.functional.masks import all_set, count_set
from mis_lightning.quantization.casts import cast_cell_values

F64 = torch.float64
FIELDS = ("kappa", "mean_abs", "m4", "coverage")
CASTS = [torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


def _edge_cases(dtype: torch.dtype) -> torch.Tensor:
    """Every pattern's value (finite, infinite, NaN), every midpoint, their float64 neighbours,
    float32 neighbours of the midpoints, and far values."""
    values = cast_cell_values(dtype)
    mids = 0.5 * (values[1:] + values[:-1])
    pats = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).to(F64)
    up, down = torch.nextafter(mids, torch.full_like(mids, math.inf)), torch.nextafter(mids, torch.full_like(mids, -math.inf))
    m32 = mids.to(torch.float32)
    f32 = torch.cat([torch.nextafter(m32, torch.full_like(m32, math.inf)),
                     torch.nextafter(m32, torch.full_like(m32, -math.inf))]).to(F64)
    far = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e6, -1e6, 1e300, -1e300, 5e-324],
                       dtype=F64)
    return torch.cat([pats, mids, up, down, f32, far])


def _reference_cells(th: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Own cell edges by numpy's binary search over the midpoints (NaN: past the top, as
    ``searchsorted``)."""
    v = cast_cell_values(dtype).numpy()
    mids = 0.5 * (v[1:] + v[:-1])
    padded = np.concatenate([[-np.inf], mids, [np.inf]])
    x = th.numpy()
    k = np.searchsorted(mids, x, side="right")
    k = np.where(np.isnan(x), mids.size, k)
    return torch.from_numpy(padded[k]), torch.from_numpy(padded[k + 1])


@pytest.mark.parametrize("dtype", CASTS)
def test_own_cells_by_bits_equal_the_binary_search(dtype, monkeypatch):
    values = cast_cell_values(dtype)
    layout = T.table_layout(values, torch.device("cpu"))
    th = _edge_cases(dtype)
    one = torch.ones_like(th)
    ref_lo, ref_hi = _reference_cells(th, dtype)
    layout.pattern_cells()  # the layout's one-time table (through cells, p53b): not a call's locating
    located = []
    real = T.TableLayout.cells
    monkeypatch.setattr(T.TableLayout, "cells", lambda self, x: located.append(x.numel()) or real(self, x))
    for on in (True, False):
        monkeypatch.setattr(T, "OWN_CELLS_BY_BITS", on)
        located.clear()
        lo, hi = T._own_facts(th, one, layout, True)
        assert torch.equal(_bits(lo), _bits(ref_lo)) and torch.equal(_bits(hi), _bits(ref_hi)), on
        if on:  # (ties' other side, float32 neighbours, NaN located by the guide: ~25% of this set)
            assert sum(located) < 0.3 * th.numel(), sum(located)
            # every finite pattern's value and its float64 neighbours: none located
            pats = th[: 1 << 16]
            x = pats[torch.isfinite(pats) & (pats.abs() < float(torch.finfo(dtype).max) / 2)]
            x = torch.cat([x, torch.nextafter(x, torch.full_like(x, math.inf)), torch.nextafter(x, -torch.full_like(x, math.inf))])
            located.clear()
            lo, hi = T._own_facts(x, torch.ones_like(x), layout, True)
            r_lo, r_hi = _reference_cells(x, dtype)
            assert sum(located) == 0 and torch.equal(_bits(lo), _bits(r_lo)) and torch.equal(_bits(hi), _bits(r_hi))
        else:
            assert sum(located) == th.numel()
    # a scale other than 1: never the bit route (the caller's unit test), the same cells
    monkeypatch.setattr(T, "OWN_CELLS_BY_BITS", True)
    located.clear()
    lo, hi = T._own_facts(th * 2.0, one * 2.0, layout, False)
    assert sum(located) == th.numel()
    assert torch.equal(_bits(lo), _bits(ref_lo * 2.0)) and torch.equal(_bits(hi), _bits(ref_hi * 2.0))


def _mixed(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of a float32 model and sds across the settle's regimes."""
    g = torch.Generator().manual_seed(seed)
    top = 60000.0 if dtype == torch.float16 else 1e37
    th = (torch.randn(n, generator=g, dtype=F64) * 0.05).float().to(F64)
    kind = torch.randint(0, 8, (n,), generator=g)
    rel = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(1e-6), math.log(1e3), generator=g))
    sg = (th.abs() * rel).clamp_min(1e-9)
    sg = torch.where(kind == 0, torch.zeros_like(sg), sg)  # sd 0: frozen, or a tie on a midpoint
    sg = torch.where(kind == 1, torch.full_like(sg, 0.3), sg)  # spans 0: fine
    sg = torch.where(kind == 2, torch.full_like(sg, 0.2 * top), sg)  # reach past the finite cells: spill
    th = torch.where(kind == 3, th * 1e4, th)  # far from 0, small relative sd: windowed
    sg = torch.where(kind == 4, torch.full_like(sg, 3.0 * top), sg)  # sd dwarfing the table
    mids = 0.5 * (cast_cell_values(dtype)[1:] + cast_cell_values(dtype)[:-1])
    tie = mids[torch.randint(0, mids.numel(), (n,), generator=g)]
    th = torch.where(kind == 5, tie, th)  # on a midpoint
    if n > 100:
        th[:4] = torch.tensor([math.nan, math.inf, -math.inf, 2.0 * top], dtype=F64)
        sg[4:7] = torch.tensor([math.inf, math.nan, 1e-300], dtype=F64)
        b_th, b_sg = _on_the_bounds(dtype)
        th[7:7 + b_th.numel()], sg[7:7 + b_th.numel()] = b_th, b_sg
    return th, sg


def _on_the_bounds(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Elements whose reach ends exactly on the settle's bounds: ``+-wide`` (``T``, the span's
    ``<=`` / ``>=``) and the finite cells' ends (fp16 ``+-65520``: ``lo_r >= lo_edge`` inside,
    ``hi_r >= hi_edge`` out)."""
    layout = T.table_layout(cast_cell_values(dtype), torch.device("cpu"))
    wide = torch.tensor(layout.wide, dtype=F64)
    s = wide / 8.5
    for _ in range(64):  # an sd whose reach is exactly T
        if float(8.5 * s) == layout.wide:
            break
        s = torch.nextafter(s, wide if float(8.5 * s) < layout.wide else -wide)
    assert float(8.5 * s) == layout.wide
    th, sg = [0.0, -0.0], [float(s)] * 2
    if dtype == torch.float16:  # reach 65416: 104 + 65416 = 65520 (out), -104 - 65416 = -65520 (inside)
        assert 8.5 * 7696.0 == 65416.0 and layout.hi_edge == 65520.0
        th += [104.0, -104.0]
        sg += [7696.0, 7696.0]
    return torch.tensor(th, dtype=F64), torch.tensor(sg, dtype=F64)


def _settle(th, sg, layout, kappa_only, on, monkeypatch):
    monkeypatch.setattr(T, "SETTLE_UNIT_FEWER_PASSES", on)
    monkeypatch.setattr(T, "OWN_CELLS_BY_BITS", on)
    T.release_own_cells()
    th, sg, sc = _float64_inputs(th, sg, torch.ones_like(th))
    return T._settled_blocks(th, sg, sc, layout, kappa_only)


@pytest.mark.parametrize("dtype", CASTS)
@pytest.mark.parametrize("kappa_only", [False, True])
def test_unit_settle_equals_the_settle_before_and_the_windowed_path(dtype, kappa_only, monkeypatch):
    values = cast_cell_values(dtype)
    layout = T.table_layout(values, torch.device("cpu"))
    used = []
    real_unit, real_from = T._settled_unit, T._settled_from
    monkeypatch.setattr(T, "_settled_unit", lambda *a, **k: used.append("unit") or real_unit(*a, **k))
    monkeypatch.setattr(T, "_settled_from", lambda *a, **k: used.append("from") or real_from(*a, **k))
    for n, seed in ((2 * EAGER_BLOCK + 123, 0), (5000, 1), (3, 2)):
        th, sg = _mixed(dtype, n, seed)
        used.clear()
        new = _settle(th, sg, layout, kappa_only, True, monkeypatch)
        assert used and set(used) == {"unit"}
        used.clear()
        old = _settle(th, sg, layout, kappa_only, False, monkeypatch)
        assert used and set(used) == {"from"}
        done = new[-1]
        assert torch.equal(done, old[-1])
        for a, b in zip(new[:-1], old[:-1]):
            assert torch.equal(_bits(a[done]), _bits(b[done]))
        if n > 100:  # every regime present
            assert 0.3 * n < int(done.sum()) < 0.95 * n
        # against the windowed path on the settled elements (its own prelude and regimes)
        sc = torch.ones_like(th)
        win, _ = T._table_window_moments(th, sg, values, sc, kappa_only)
        fields = ("kappa",) if kappa_only else ("kappa", "mean_abs", "m4")
        for f, a in zip(fields, new[:-1]):
            assert torch.equal(_bits(a[done]), _bits(getattr(win, f)[done])), (f, n)
        # the whole call (settled, ties, overflow, windowed) bit for bit as before
        monkeypatch.setattr(T, "SD_FLOOR_BY_MIN", True)
        out_new, m_new = T._table_sum_moments(th, sg, values, sc, kappa_only)
        monkeypatch.setattr(T, "SD_FLOOR_BY_MIN", False)
        out_old, m_old = T._table_sum_moments(th, sg, values, sc, kappa_only)
        assert torch.equal(m_new, m_old)
        for f in FIELDS:
            assert torch.equal(_bits(getattr(out_new, f)), _bits(getattr(out_old, f))), f


@pytest.mark.parametrize("dtype", CASTS)
def test_a_call_settled_whole_takes_the_reductions(dtype, monkeypatch):
    """Sds spanning 0, reaches inside the finite cells: every element fine, the mask from the
    reductions (no element-wise mask), the same numbers as before and as the windowed path."""
    values = cast_cell_values(dtype)
    layout = T.table_layout(values, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    th = (torch.randn(3 * EAGER_BLOCK, generator=g, dtype=F64) * 0.02).float().to(F64)
    sg = torch.empty_like(th).uniform_(0.05, 0.5, generator=g)
    compared = []
    real_ge = torch.Tensor.__ge__  # (the element-wise masks' test of hi_r; the own cells use <= and <)
    monkeypatch.setattr(torch.Tensor, "__ge__", lambda a, b: compared.append(1) or real_ge(a, b))
    for kappa_only in (False, True):
        compared.clear()
        new = _settle(th, sg, layout, kappa_only, True, monkeypatch)
        assert not compared and all_set(new[-1])
        old = _settle(th, sg, layout, kappa_only, False, monkeypatch)
        assert all_set(old[-1])
        win, _ = T._table_window_moments(th, sg, values, torch.ones_like(th), kappa_only)
        for a, b, f in zip(new[:-1], old[:-1], ("kappa", "mean_abs", "m4")):
            assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(a), _bits(getattr(win, f)))
    if dtype == torch.float16:
        # every element fine and spanning, some reaching past +65520 on one side only (theta >= 104 at
        # reach 65416): not the reductions' shortcut; those take the end cells (_open_fine_into)
        t2 = torch.linspace(0.0, 200.0, 2 * EAGER_BLOCK, dtype=F64).float().to(F64)
        s2 = torch.full_like(t2, 7696.0)
        spilled = []
        real_open = T._open_fine_into
        monkeypatch.setattr(T, "_open_fine_into", lambda k, m, sel, *a: spilled.append(int(sel.sum())) or
                            real_open(k, m, sel, *a))
        for kappa_only in (False, True):
            spilled.clear()
            new = _settle(t2, s2, layout, kappa_only, True, monkeypatch)
            assert sum(spilled) == int((t2 + 8.5 * s2 >= 65520.0).sum()) > 0
            old = _settle(t2, s2, layout, kappa_only, False, monkeypatch)
            assert torch.equal(new[-1], old[-1]) and all_set(new[-1])
            for a, b in zip(new[:-1], old[:-1]):
                assert torch.equal(_bits(a), _bits(b))


def test_sigma_kept_where_already_at_the_floor(monkeypatch):
    """``_table_inputs`` returns sigma itself (no copy) where it is float64 at or above the floor,
    floors as ``_float64_inputs`` otherwise; the caller's sigma is never written."""
    th = torch.randn(1000, dtype=F64)
    sg = torch.rand(1000, dtype=F64) + 1e-3
    monkeypatch.setattr(T, "SD_FLOOR_BY_MIN", True)
    assert T._table_inputs(th, sg)[1] is sg
    monkeypatch.setattr(T, "SD_FLOOR_BY_MIN", False)
    assert T._table_inputs(th, sg)[1] is not sg
    monkeypatch.setattr(T, "SD_FLOOR_BY_MIN", True)
    for bad in (0.0, -1.0, math.nan, 1e-320):
        s = sg.clone()
        s[7] = bad
        got = T._table_inputs(th, s)[1]
        ref = _float64_inputs(th, s)[1]
        assert got is not s and torch.equal(_bits(got), _bits(ref))
    assert T._table_inputs(th, sg.float())[1].dtype == F64
    values = cast_cell_values(torch.float16)
    keep = sg.clone()
    T.table_cell_moments(th, sg, values, torch.ones_like(th), kappa_only=True)
    assert torch.equal(_bits(sg), _bits(keep))


def test_all_set_is_all():
    """``all_set`` is ``Tensor.all`` and ``count_set`` (p50a) the bool sum, on empty, strided and
    2-D masks (and ``count_set`` of a non-bool tensor its sum)."""
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 1000, 40000):
        for p in (0.0, 0.5, 0.9999, 1.0):
            m = torch.rand(n, generator=g) < p
            assert all_set(m) == bool(m.all()) and count_set(m) == int(m.sum())
            if n > 2:
                assert all_set(m[::2]) == bool(m[::2].all()) and count_set(m[::2]) == int(m[::2].sum())
                assert count_set(m[: n - n % 2].view(2, -1)) == int(m[: n - n % 2].sum())
    assert count_set(torch.tensor([0.0, 2.0, 3.0])) == 5


@pytest.mark.parametrize("dtype", CASTS)
@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_a_block_reaching_past_one_end_only_takes_the_masks(dtype, side, monkeypatch):
    """rv49: weights at one end of the format with sds of 0.12-0.22 of its largest value: every
    element fine, reaches past that end's finite cells only; the whole-block shortcut must not take
    them (its test of both ends is load-bearing: dropping the lower one changed every kappa here).
    The scale-1 settle equals the general one and the windowed path bit for bit."""
    values = cast_cell_values(dtype)
    layout = T.table_layout(values, torch.device("cpu"))
    fmax = float(torch.finfo(dtype).max)
    g = torch.Generator().manual_seed(5)
    n = 4096
    th = side * fmax * (1 + torch.rand(n, generator=g, dtype=F64) * 0.001)
    sg = fmax * (0.12 + 0.1 * torch.rand(n, generator=g, dtype=F64))
    for kappa_only in (False, True):
        new = _settle(th, sg, layout, kappa_only, True, monkeypatch)
        old = _settle(th, sg, layout, kappa_only, False, monkeypatch)
        assert torch.equal(new[-1], old[-1])
        done = new[-1]
        for a, b in zip(new[:-1], old[:-1]):
            assert torch.equal(_bits(a[done]), _bits(b[done]))
        win, _ = T._table_window_moments(th, sg, values, torch.ones_like(th), kappa_only)
        assert torch.equal(_bits(new[0][done]), _bits(win.kappa[done]))


def _kappa_only_call(th, sg, values, on, monkeypatch):
    monkeypatch.setattr(T, "UNIT_KAPPA_INTO", on)
    T.release_own_cells()
    return T._table_sum_moments(th, sg, values, torch.ones_like(th), kappa_only=True)


@pytest.mark.parametrize("dtype", CASTS)
def test_kappa_only_blocks_into_one_tensor(dtype, monkeypatch):
    """``table.UNIT_KAPPA_INTO`` (p50a): a kappa-only call at scale 1 writes each block's kappa into
    one tensor; where every element is settled, ``mean_abs`` / ``m4`` (NaN), ``coverage`` (1) and
    the closed-form mask (none) are one value expanded (stride 0). Against the switch off (the
    blocks' outputs joined, the fields filled) bitwise: kappa, the mask, and the fields' values, on
    a call settled whole (3 blocks + 77 fine spanning weights), a call whose first blocks are settled
    whole and whose last is not (one sd-0 weight, frozen: the mask formed from that block on), the
    mixed regimes of ``_mixed`` (ties, spill, windowed, NaN / inf: every path after the settle) over
    2 blocks + 123, and 3 elements. Fails with the switch off (the fields are filled, stride 1)."""
    values = cast_cell_values(dtype)
    n = 3 * EAGER_BLOCK + 77
    g = torch.Generator().manual_seed(21)
    th = (torch.randn(n, generator=g, dtype=F64) * 0.05).float().to(F64)
    sg = torch.full((n,), 0.3, dtype=F64)  # spans [-T, T] within the finite cells: fine, settled whole
    late = sg.clone()
    late[n - 5] = 0.0  # one frozen weight in the last block (sd 0, floored)
    cases = [(th, sg, True), (th, late, False)]
    for m, seed in ((2 * EAGER_BLOCK + 123, 4), (3, 5)):
        cases.append((*_mixed(dtype, m, seed), False))
    for t, s, whole in cases:
        t, s, _ = _float64_inputs(t, s, torch.ones_like(t))
        new, new_mask = _kappa_only_call(t, s, values, True, monkeypatch)
        old, old_mask = _kappa_only_call(t, s, values, False, monkeypatch)
        assert torch.equal(_bits(new.kappa), _bits(old.kappa))
        assert torch.equal(new_mask, old_mask)
        for f in FIELDS[1:]:
            a, b = getattr(new, f), getattr(old, f)
            assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
            assert b.stride() == (1,)
            assert (a.stride() == (0,)) == whole  # the stand-ins exactly where every element is settled
        assert (new_mask.stride() == (0,)) == whole
