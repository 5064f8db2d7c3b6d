"""sd-0 weights exactly on an interior edge of an fp16 / bf16 table (``table.SD_FLOOR_TIES``): where
they are all that is left of a call after the settled elements, they take the windowed path's
numbers of the first such weight instead of a windowed call. Every field and the closed-form
mask must be bit for bit the windowed path's (``_table_window_moments``) on every element, with
the flag on and off, full and kappa-only calls; a remainder that is not all ties (or ties at the
table's ends, or sds that differ) takes the windowed call."""

from __future__ import annotations

import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.quantization.torchao_backend import representable_values

F64 = torch.float64
FIELDS = ("kappa", "mean_abs", "m4", "coverage")
FLOOR = torch.finfo(F64).tiny  # the sd-0 floor of every path


def _call(n_live: int, ties: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Live weights whose sd spans 0 (settled by the fine expansion) and ``ties`` at sd ``FLOOR``,
    shuffled together."""
    g = torch.Generator().manual_seed(seed)
    th = torch.cat([torch.randn(n_live, generator=g, dtype=F64) * 0.05, ties])
    sg = torch.cat([torch.full((n_live,), 0.7, dtype=F64), torch.full_like(ties, FLOOR)])
    perm = torch.randperm(th.numel(), generator=g)
    return th[perm], sg[perm]


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit, NaN at the same places."""
    return torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())


def _counting(calls: list[int], window):
    return lambda t, *a: calls.append(t.numel()) or window(t, *a)


def _ties(layout: T.TableLayout, n: int, seed: int) -> torch.Tensor:
    """``n`` interior edges (midpoints: float32 values), across the table, subnormals and top included."""
    g = torch.Generator().manual_seed(seed)
    m = layout.mids.numel()
    idx = torch.cat([torch.randint(1, m - 1, (n - 4,), generator=g), torch.tensor([1, m - 2, m // 2, m // 2 - 1])])
    return layout.mids[idx]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_ties_take_the_windowed_paths_numbers(dtype, kappa_only, monkeypatch):
    values = representable_values(dtype).to(F64)
    layout = T.table_layout(values, torch.device("cpu"))
    ties = _ties(layout, 300, 1)
    assert torch.equal(ties, ties.float().double())  # float32 weights
    th, sg = _call(5000, ties, 2)
    sc = torch.ones_like(th)
    before, closed_before = T._table_window_moments(th, sg, values, sc, kappa_only)
    T._TIE_MOMENTS.clear()
    calls = []
    window = T._table_window_moments
    monkeypatch.setattr(T, "_table_window_moments", _counting(calls, window))
    after, closed_after = T._table_sum_moments(th, sg, values, sc, kappa_only)
    assert calls and max(calls) == 1  # one tie's call per geometry alone: the shortcut was taken
    fields = ("kappa", "coverage") if kappa_only else FIELDS  # (kappa-only: the settled ones' others NaN)
    for f in fields:
        assert torch.equal(getattr(before, f), getattr(after, f)), (dtype, f)
    assert torch.equal(closed_before, closed_after)
    tie = sg == FLOOR
    for f in FIELDS:  # the ties' every field, kappa-only too
        assert torch.equal(getattr(before, f)[tie], getattr(after, f)[tie]), (dtype, f)
    monkeypatch.setattr(T, "SD_FLOOR_TIES", False)
    off, closed_off = T._table_sum_moments(th, sg, values, sc, kappa_only)
    for f in FIELDS:  # (NaN where kappa-only leaves them)
        assert _same(getattr(off, f), getattr(after, f)), (dtype, f)
    assert torch.equal(closed_off, closed_after)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_not_all_ties_take_the_windowed_call(dtype, monkeypatch):
    values = representable_values(dtype).to(F64)
    layout = T.table_layout(values, torch.device("cpu"))
    sc = torch.ones(3, dtype=F64)
    m = layout.mids
    cases = {
        "a windowed weight": (m[[100, 200, 300]].clone(), torch.tensor([FLOOR, FLOOR, float(m[301] - m[300]) * 3])),
        "the lowest edge": (torch.tensor([m[0], m[200], m[300]]), torch.full((3,), FLOOR)),
        "the highest edge": (torch.tensor([m[100], m[200], m[-1]]), torch.full((3,), FLOOR)),
        "sds that differ": (m[[100, 200, 300]].clone(), torch.tensor([FLOOR, FLOOR, 2 * FLOOR], dtype=F64)),  # (FLOOR / 2: floored to FLOOR, a tie; float32: 0)
    }
    window = T._table_window_moments
    for name, (th, sg) in cases.items():
        before, _ = T._table_window_moments(th, sg, values, sc)
        calls: list[int] = []
        monkeypatch.setattr(T, "_table_window_moments", _counting(calls, window))
        after, _ = T._table_sum_moments(th, sg, values, sc)
        assert calls == [3], (name, calls)
        for f in FIELDS:  # (the windowed path gives a tie at the top edge NaN: the same here)
            assert _same(getattr(before, f), getattr(after, f)), (name, f)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_ties_kinds_by_dict_are_the_unique_rows(dtype, kappa_only, monkeypatch):
    """``table.TIES_KINDS_BY_DICT`` (p49c), on the casts' own tables (``cast_cell_values``: the
    own cells by the bit route too): every field bit for bit the windowed path's and the
    ``torch.unique`` kinds', the cache filled from scratch either way; no ``torch.unique`` call
    (fails with the switch off)."""
    from mis_lightning.quantization.casts import cast_cell_values

    values = cast_cell_values(dtype)
    layout = T.table_layout(values, torch.device("cpu"))
    th, sg = _call(3000, _ties(layout, 200, 5), 6)
    sc = torch.ones_like(th)
    before, closed_before = T._table_window_moments(th, sg, values, sc, kappa_only)
    got = {}
    real_unique = torch.unique
    uniques: list[int] = []
    monkeypatch.setattr(torch, "unique", lambda *a, **k: uniques.append(1) or real_unique(*a, **k))
    for on in (False, True):
        T._TIE_MOMENTS.clear()
        monkeypatch.setattr(T, "TIES_KINDS_BY_DICT", on)
        uniques.clear()
        got[on] = T._table_sum_moments(th, sg, values, sc, kappa_only)
        assert bool(uniques) != on
    tie = sg == FLOOR
    for f in FIELDS:
        assert _same(getattr(got[True][0], f), getattr(got[False][0], f)), f
        assert torch.equal(getattr(got[True][0], f)[tie], getattr(before, f)[tie]), f
    assert torch.equal(got[True][1], got[False][1]) and torch.equal(got[True][1], closed_before)
