"""The still samples' flag (tb36): a draws' sample whose every weight has sd 0 moves no kappa;
``_sampled_draw_parts`` returns it as ``StillParts`` (zeros, flagged) and the draws' sums take it
as moving no row without scanning it, with the other parts' sums bitwise those of the unflagged
zeros."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from mis_lightning.quantization.base import ParamGrid
from mis_lightning.quantization.casts import representable_values

A = importlib.import_module("mis_lightning.assess")
F64 = torch.float64
D = 16


class _Reader:
    """A stand-in of ``_InfluenceReader``: per-record sums ``sum_j w_rj^2 col_j`` over whole rows
    of ``unit`` elements, from a fixed influence matrix; counts its calls."""

    def __init__(self, records: int, n: int, unit: int) -> None:
        self.w = torch.randn(records, n, dtype=F64, generator=torch.Generator().manual_seed(0))
        self.unit, self.calls = unit, 0
        self.est = SimpleNamespace(num_records=records)

    def sums(self, a, b, columns, rows=None):
        self.calls += 1
        elem = (a + rows.unsqueeze(-1) * self.unit + torch.arange(self.unit)).reshape(-1)
        return {p: self.w[:, elem].square() @ c for p, c in columns.items()}


def test_a_sample_of_sd0_weights_is_flagged_still():
    rows, cols = 64, 32
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=16.0, scale=torch.ones(rows, 1, dtype=F64), block_size=(1, cols),
                  values=representable_values(torch.float16))
    c = rows * cols
    th = torch.randn(c, dtype=F64, generator=torch.Generator().manual_seed(1))
    sg = torch.zeros(c, dtype=F64)
    k_main = g.moments(th, sg, 0, c).kappa
    sample = A._draw_sample(c, cols, torch.Generator().manual_seed(2))
    xi = torch.randn(A._draw_noise_rows(D), c, dtype=F64, generator=torch.Generator().manual_seed(3))
    parts = A._sampled_draw_parts(g, th, sg, 0, c, k_main, xi, D, None, sample)
    assert isinstance(parts, A.StillParts)
    basis, mix, groups = parts
    assert not bool(basis.any()) and not bool(groups.any()) and torch.equal(mix, A._built_mix(D))
    sg[sample[0][0]] = 1e-3  # one moving weight: not flagged
    assert not isinstance(A._sampled_draw_parts(g, th, sg, 0, c, k_main, xi, D, None, sample), A.StillParts)


def test_still_parts_sum_to_nothing_and_leave_the_others_bitwise():
    unit, n_rows = 16, 24
    reader = _Reader(40, unit * n_rows * 4, unit)
    sample = A._draw_sample(unit * n_rows * 4, unit, torch.Generator().manual_seed(4))
    m = sample[0].numel()
    gen = torch.Generator().manual_seed(5)
    live = torch.randn(9, m, dtype=F64, generator=gen)
    live[:, : m // 2] = 0.0  # some rows moved, some not
    grp = torch.zeros(A.DRAW_SAMPLE_GROUPS, m, dtype=F64)
    grp[sample[1], torch.arange(m)] = live[0]
    mix = A._built_mix(D)
    moving = (live, mix, grp)
    zero = torch.zeros((), dtype=F64)
    flagged = A.StillParts((zero.expand(9, m), mix, zero.expand(A.DRAW_SAMPLE_GROUPS, m)))
    plain = (torch.zeros(9, m, dtype=F64), mix, torch.zeros(A.DRAW_SAMPLE_GROUPS, m, dtype=F64))
    other = (live * 2.0, mix, grp * 2.0)
    a, b = 0, unit * n_rows * 4
    with_flag = A._joint_draw_sums(reader, a, b, [moving, flagged, other], sample)
    without = A._joint_draw_sums(reader, a, b, [moving, plain, other], sample)
    assert with_flag[id(flagged)] is None and without[id(plain)] is None
    assert torch.equal(with_flag[id(moving)], without[id(moving)])
    assert torch.equal(with_flag[id(other)], without[id(other)])
    calls = reader.calls
    assert A._draw_sums(reader, a, b, flagged, sample) is None and reader.calls == calls


def _cast_sample_chunk(rows: int = 64, cols: int = 32):
    """An fp16 value table at scale 1 (a 16-bit cast's grid) on ``rows x cols`` weights: 7 rows in 8
    at sd 0 (dead units) and one weight in 4 of the live rows too, the others' sd from far below a
    cell to past fp16's top (kappa moves with the position there); the main kappa and the draws' noise."""
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=16.0, scale=torch.ones(rows, 1, dtype=F64), block_size=(1, cols),
                  values=representable_values(torch.float16))
    c = rows * cols
    gen = torch.Generator().manual_seed(7)
    th = torch.randn(c, dtype=F64, generator=gen)
    sg = torch.exp(torch.empty(c, dtype=F64).uniform_(-12.0, 12.0, generator=gen))
    sg.view(rows, cols)[torch.arange(rows) % 8 != 3] = 0.0
    sg[::4] = 0.0
    k_main = g.moments(th, sg, 0, c).kappa
    xi = torch.randn(A._draw_noise_rows(D), c, dtype=F64, generator=torch.Generator().manual_seed(8))
    return g, th, sg, k_main, xi


def test_a_casts_sample_evaluates_its_live_weights_alone(monkeypatch):
    """``assess.DRAWS_SAMPLE_LIVE_ONLY`` (p54c): a 16-bit cast's sampled draws evaluate the sample's
    weights of non-zero sd alone (``_draw_parts`` sees those only) and their parts are bitwise the
    whole sample's (an sd-0 weight's change is exactly 0 either way), still or not; a sample mostly
    live evaluates every weight."""
    g, th, sg, k_main, xi = _cast_sample_chunk()
    c = th.numel()
    seen: list[int] = []
    real = A._draw_parts
    monkeypatch.setattr(A, "_draw_parts", lambda *a, **k: seen.append(a[1].numel()) or real(*a, **k))
    moved = 0
    for seed in range(4):
        sample = A._draw_sample(c, 32, torch.Generator().manual_seed(seed))
        live = int((sg[sample[0]] != 0).sum())
        got = {}
        for on in (True, False):
            monkeypatch.setattr(A, "DRAWS_SAMPLE_LIVE_ONLY", on)
            seen.clear()
            got[on] = A._sampled_draw_parts(g, th, sg, 0, c, k_main, xi, D, None, sample)
            assert seen == ([] if live == 0 else [live if on else sample[0].numel()])
        assert isinstance(got[True], A.StillParts) == isinstance(got[False], A.StillParts)
        assert all(torch.equal(u, v) for u, v in zip(got[True], got[False]))
        moved += not isinstance(got[True], A.StillParts)
    assert moved  # (some sample's kappa moves: the evaluated branch compared, not only the flagged zeros)
    sg_all = sg.clone()
    sg_all[sg_all == 0] = 1e-3  # every weight live: the whole sample evaluated
    sample = A._draw_sample(c, 32, torch.Generator().manual_seed(0))
    seen.clear()
    monkeypatch.setattr(A, "DRAWS_SAMPLE_LIVE_ONLY", True)
    A._sampled_draw_parts(g, th, sg_all, 0, c, g.moments(th, sg_all, 0, c).kappa, xi, D, None, sample)
    assert seen == [sample[0].numel()]


def test_joint_draw_sums_gather_the_moved_rows_first(monkeypatch):
    """``assess.JOINT_DRAW_ROWS_FIRST`` (p54c): subsampled parts' basis and groups gathered on the
    moved rows before they are joined give bitwise the sums of the joined parts, each the
    reference ``w^2 @ column`` over the moved rows."""
    unit, n_rows = 16, 24
    reader = _Reader(40, unit * n_rows * 4, unit)
    sample = A._draw_sample(unit * n_rows * 4, unit, torch.Generator().manual_seed(4))
    m = sample[0].numel()
    gen = torch.Generator().manual_seed(6)
    mix = A._built_mix(D)
    parts = []
    for lo in (0, m // 3):
        basis = torch.randn(9, m, dtype=F64, generator=gen)
        basis[:, lo: lo + m // 2] = 0.0  # (whole rows of unit elements: m // 2 of them not moved)
        grp = torch.zeros(A.DRAW_SAMPLE_GROUPS, m, dtype=F64)
        grp[sample[1], torch.arange(m)] = basis[0]
        parts.append((basis, mix, grp))
    got = {}
    for on in (True, False):
        monkeypatch.setattr(A, "JOINT_DRAW_ROWS_FIRST", on)
        got[on] = A._joint_draw_sums(reader, 0, unit * n_rows * 4, parts, sample)
    for p in parts:
        on, off = got[True][id(p)], got[False][id(p)]
        assert on.shape == (40, 9 + A.DRAW_SAMPLE_GROUPS) and torch.equal(on, off)
        col = torch.cat([p[0], p[2]]).T
        ref = reader.w[:, sample[0]].square() @ col
        assert bool(((on - ref).abs() <= 1e-12 * ref.abs()).all())  # (the reader's own float64 sums, reordered)
