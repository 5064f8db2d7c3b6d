"""A factored chunk's near-unit power-2 columns summed through shared deficit directions
(``assess.SHARED_DEFICITS``, p47a): the unit column less ``alpha`` times one deficit column, against
the columns summed as they are; and the fourth powers' Cauchy-Schwarz bound
(``linear_factors.FOURTH_POWER_CS_BOUND``)."""

from __future__ import annotations

import importlib

import torch

import mis_lightning.estimation.linear_factors as lf
from mis_lightning.estimation.linear_factors import LinearFactors, factored_power_sums

A = importlib.import_module("mis_lightning.assess")  # (the package exports the function assess)
NAME = "lin.weight"


class _Est:
    """What ``assess._InfluenceReader`` reads of an estimate: one factored weight."""

    def __init__(self, fac: LinearFactors, g_mean: torch.Tensor, v: torch.Tensor) -> None:
        self.influence = None
        self.offsets = {NAME: (0, g_mean.numel())}
        self._g_mean, self._v_diag = {NAME: g_mean}, {NAME: v}
        self.num_records = fac.d.shape[0]
        self._fac = fac

    def _factor_of(self, name: str):
        return self._fac, False

    def _centring(self, name: str, sel):
        return self._g_mean[name][sel], self._v_diag[name][sel]


def _case(R: int = 40, out_f: int = 24, in_f: int = 32, shift: float = 0.0, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, in_f, generator=g, dtype=torch.float64) + shift
    d = torch.randn(R, out_f, generator=g, dtype=torch.float64) + shift
    d[:, 1] = 0.0  # a silent row
    fac = LinearFactors(module="lin", weight=NAME, bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    return fac, gr.mean(0), gr.var(0, unbiased=False) + 0.1, g


def _columns(n: int, g: torch.Generator) -> tuple[list[torch.Tensor], list[int]]:
    """kappas near 1 on one deficit direction (alpha 1, 0.5, 3, and one off it by 1e-14), one off
    it by 1e-10 (beyond SHARED_DEFICIT_TOL), one on another direction, an exact unit column, one
    with point masses and a random one; the indices of the near-unit ones."""
    q = torch.rand(n, generator=g, dtype=torch.float64)
    other = torch.rand(n, generator=g, dtype=torch.float64)
    delta = 1e-9 * q
    near = [1.0 - delta, 1.0 - 0.5 * delta, 1.0 - 3.0 * delta,
            1.0 - (0.5 * delta + 1e-14 * other), 1.0 - (0.5 * delta + 1e-10 * other), 1.0 - 2e-9 * other]
    point = (torch.rand(n, generator=g) > 0.3).to(torch.float64)
    cols = [torch.ones(n, dtype=torch.float64), *near, point, torch.rand(n, generator=g, dtype=torch.float64)]
    return cols, list(range(1, 1 + len(near)))


def _sums(monkeypatch, on: bool, fac, g_mean, v, cols):
    monkeypatch.setattr(A, "SHARED_DEFICITS", on)
    reader = A._InfluenceReader(_Est(fac, g_mean, v), NAME)
    widths: list[int] = []
    real = reader.sums

    def spy(a, b, columns, rows=None, row_weights=None):
        widths.append(columns[2].shape[1])
        return real(a, b, columns, rows=rows, row_weights=row_weights)

    reader.sums = spy
    out = A._distinct_list_sums(reader, 0, g_mean.numel(), {2: cols}, {2: [id(t) for t in cols]})
    return out[2], widths[0]


def test_near_unit_columns_share_one_deficit_column(monkeypatch):
    """Float64 sums (the row weights materialized): each near-unit column's sums within 1e-13
    relative of its own (measured ~1e-16; the projected columns' residuals are 0 or 1e-14 of the
    kappas, 1e-5 of the 1e-9 deficits): an alpha off by 1e-4, a deficit not subtracted, or the column
    off the direction by 1e-10 projected anyway would be off by 1e-13 to 1e-9. Four of the six
    near-unit columns read off one deficit column (the stack 9 -> 6 columns with the other direction's
    and the 1e-10 one's own). The default float32 sums stay within POWER_SUMS_F32_RTOL."""
    fac, g_mean, v, g = _case()
    cols, near = _columns(g_mean.numel(), g)
    plan = A._shared_deficit_plan(cols)
    assert plan is not None
    unit, assigned, bases = plan
    assert unit == 0 and sorted(assigned) == near
    assert len({b for b, _ in assigned.values()}) == 3  # delta's direction, the 1e-10 one, the other one
    f32 = lf.POWER_SUMS_F32
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    want = factored_power_sums(fac, g_mean, v, torch.stack(cols, 1), 2)
    got, width = _sums(monkeypatch, True, fac, g_mean, v, cols)
    off, width_off = _sums(monkeypatch, False, fac, g_mean, v, cols)
    assert width_off == len(cols) and width == len(cols) - 3
    torch.testing.assert_close(off, want, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0.0)
    monkeypatch.setattr(lf, "POWER_SUMS_F32", f32)
    got32, _ = _sums(monkeypatch, True, fac, g_mean, v, cols)
    torch.testing.assert_close(got32, want, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)


def test_no_shared_deficits_without_a_gain():
    """One near-unit column and no unit column (or columns outside [1 - NEAR_UNIT_MAX, 1], NaN
    included): the plan sums them as they are (None)."""
    n = 600
    g = torch.Generator().manual_seed(1)
    q = torch.rand(n, generator=g, dtype=torch.float64)
    assert A._shared_deficit_plan([1.0 - 1e-9 * q, torch.rand(n, generator=g, dtype=torch.float64)]) is None
    assert A._shared_deficit_plan([torch.ones(n, dtype=torch.float64), 1.0 - 1e-9 * q]) is None
    wide = 1.0 - 1e-3 * q
    nan = 1.0 - 1e-9 * q
    nan[7] = float("nan")
    assert A._shared_deficit_plan([torch.ones(n, dtype=torch.float64), wide, 0.5 + 0.5 * wide, nan]) is None


def test_fourth_power_cauchy_schwarz_bound(monkeypatch):
    """FOURTH_POWER_CS_BOUND: the fourth powers' float32 records whose bound fails are a subset of
    those Hoelder's bound fails (it is never larger), fewer on a moderately centred case, and every
    entry stays within POWER_SUMS_F32_RTOL of the float64 sums, also where the expanded terms cancel
    (a mean gradient far from 0: those records still fall back; a bound that left out a term would
    admit their float32 entries, off by far more)."""
    for shift, fewer in ((1.5, True), (40.0, False)):
        fac, g_mean, v, g = _case(R=64, out_f=24, in_f=48, shift=shift, seed=11)
        A_ = torch.rand(g_mean.numel(), 2, generator=g, dtype=torch.float64)
        bad = {}
        for on in (False, True):
            monkeypatch.setattr(lf, "FOURTH_POWER_CS_BOUND", on)
            counts = {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")}
            monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", counts)
            got = factored_power_sums(fac, g_mean, v, A_, 4)
            bad[on] = counts[(4, "float64")]
            monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
            want = factored_power_sums(fac, g_mean, v, A_, 4)
            monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4}))
            torch.testing.assert_close(got, want, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
        assert bad[True] <= bad[False]
        assert (bad[True] < bad[False]) if fewer else bad[True] > 0
