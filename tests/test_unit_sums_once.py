"""A chunk's unit-column power sums (kappa = 1: the baseline's ``sum_j w_rj^p``, the estimate's own)
computed by the first scoring call on an estimate and read back by the later ones
(``assess.UNIT_SUMS_ONCE``, p50b): the same sums as recomputing them, never read where their inputs
or the power sums' settings changed."""

from __future__ import annotations

import copy
import importlib
import math
import pickle

import torch
from test_scoring_pass import SCHEMES, _estimate
from test_shared_deficits import NAME, _case, _Est

import mis_lightning.estimation.linear_factors as lf
from mis_lightning.config import stage_configs

A = importlib.import_module("mis_lightning.assess")  # (the package exports the function assess)


class _EstWithEntries(_Est):
    """The mock estimate with what an ``Estimate`` holds for the entries."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.influence_scale = 1.0
        self._unit_sums: dict = {}


def _call(est, powers: list[set[int]], mix: torch.Tensor) -> dict[int, torch.Tensor]:
    """One scoring call's ``_distinct_list_sums`` of chunk 0:numel (a new reader and unit column,
    as each call makes): power 2 the unit column and ``mix``, power 4 the unit column alone (the
    1e7 MLP's weight chunks); the powers that reached the power sums appended to ``powers``."""
    reader = A._InfluenceReader(est, NAME)
    real = reader.sums

    def spy(a, b, columns, rows=None, row_weights=None):
        powers.append(set(columns))
        return real(a, b, columns, rows=rows, row_weights=row_weights)

    reader.sums = spy
    n = est._g_mean[NAME].numel()
    ones = torch.ones(n, dtype=torch.float64)
    cols = {2: [ones, mix], 4: [ones]}
    keys = {2: [id(ones), id(mix)], 4: [id(ones)]}
    return A._distinct_list_sums(reader, 0, n, cols, keys, unit=ones)


def _exact(fac, g_mean, v, power: int) -> torch.Tensor:
    """``sum_j w_rj^p`` of the influences materialised in float64, each record's sum by ``math.fsum``."""
    w = lf.standardised_influence((fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(fac.d.shape[0], -1), g_mean, v)
    return torch.tensor([math.fsum(r.tolist()) for r in w.pow(power)], dtype=torch.float64)


def test_a_unit_columns_sums_are_summed_once_per_estimate(monkeypatch):
    """Three calls on one estimate: the power-4 unit column reaches the power sums in the first
    only; every call's sums bitwise the first's and the switch-off call's, the unit columns' within
    the float32 path's 1e-4 of the exact sums (fails without the entries: power 4 summed every call)."""
    monkeypatch.setattr(A, "UNIT_FOURTH_BATCHED", False)  # (the chunk calls: test_unit_fourth.py has the batched sums)
    fac, g_mean, v, g = _case()
    mix = torch.rand(g_mean.numel(), generator=g, dtype=torch.float64)
    est = _EstWithEntries(fac, g_mean, v)
    powers: list[set[int]] = []
    got = [_call(est, powers, mix) for _ in range(3)]
    assert powers == [{2, 4}, {2}, {2}]
    assert list(est._unit_sums) == [(NAME, 0, g_mean.numel(), 4)]
    monkeypatch.setattr(A, "UNIT_SUMS_ONCE", False)
    off_powers: list[set[int]] = []
    off = _call(est, off_powers, mix)
    assert off_powers == [{2, 4}]
    for out in got:
        assert list(out) == [2, 4]
        for p in (2, 4):
            assert torch.equal(out[p], off[p]), p
    for p, col in ((2, 0), (4, 0)):
        ref = _exact(fac, g_mean, v, p)
        rel = float(((got[1][p][:, col] - ref).abs() / ref).max())
        assert rel <= 1e-4, (p, rel)


def test_an_entry_is_not_read_after_its_inputs_or_settings_change(monkeypatch):
    """The entry is keyed by the tensors' identity and version and the power sums' settings: a mean
    gradient changed in place, another variances tensor with the same values, and the float64 path
    (``POWER_SUMS_F32`` empty) each sum the unit column again, and the sums are those of a fresh
    estimate (fails with the versions or the settings left out of the key: the stale float32 sums,
    ~1e-8 and more off, would be read)."""
    monkeypatch.setattr(A, "UNIT_FOURTH_BATCHED", False)  # (the chunk calls: test_unit_fourth.py has the batched sums)
    fac, g_mean, v, g = _case()
    mix = torch.rand(g_mean.numel(), generator=g, dtype=torch.float64)
    est = _EstWithEntries(fac, g_mean, v)
    powers: list[set[int]] = []
    _call(est, powers, mix)
    g_mean.mul_(1.5)  # in place: the same object, a new version
    changed = _call(est, powers, mix)
    est._v_diag[NAME] = v.clone()  # the same values, another tensor
    again = _call(est, powers, mix)
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    f64 = _call(est, powers, mix)
    assert powers == [{2, 4}] * 4
    fresh = _call(_EstWithEntries(fac, g_mean, v), [], mix)
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4}))
    fresh32 = _call(_EstWithEntries(fac, g_mean, v), [], mix)
    assert torch.equal(changed[4], fresh32[4]) and torch.equal(again[4], fresh32[4])
    assert torch.equal(f64[4], fresh[4])
    assert not torch.equal(f64[4], fresh32[4])  # (the float32 sums differ: the settings matter)
    ref = _exact(fac, g_mean, v, 4)
    assert float(((changed[4][:, 0] - ref).abs() / ref).max()) <= 1e-4


def test_later_scoring_calls_read_the_unit_sums_with_the_same_reports(monkeypatch):
    """``score_schemes`` on a factored estimate (every weight chunk's fourth powers the unit column
    alone: the schemes' are bounded): the first call sums that column, the second and third do not,
    and every report is the switch-off call's (fails without the entries, or with the scoring pass
    not handing ``_distinct_list_sums`` its unit column)."""
    monkeypatch.setattr(A, "UNIT_FOURTH_BATCHED", False)  # (the chunk calls: test_unit_fourth.py has the batched sums)
    model, est = _estimate("factored")
    _, sc, _ = stage_configs("assess", None, None, {})
    real = lf.factored_power_sums
    unit4: list[int] = []

    def spy(fac, g_mean, v_diag, cols, power, bias=False, cache=None, row_weights=None):
        if power == 4 and not bias and cols.shape[1] == 1 and bool((cols == 1).all()):
            unit4.append(1)
        return real(fac, g_mean, v_diag, cols, power, bias, cache, row_weights=row_weights)

    monkeypatch.setattr(lf, "factored_power_sums", spy)
    counts, reports = [], []
    for _ in range(3):
        unit4.clear()
        reports.append(A.score_schemes(est, model, SCHEMES, scoring_config=sc).to_json())
        counts.append(len(unit4))
    monkeypatch.setattr(A, "UNIT_SUMS_ONCE", False)
    unit4.clear()
    off = A.score_schemes(est, model, SCHEMES, scoring_config=sc).to_json()
    assert counts[0] > 0 and counts[1:] == [0, 0] and len(unit4) == counts[0], (counts, len(unit4))
    assert all(r == off for r in reports)
    # a copied estimate starts without the entries (weak references to its tensors), and they pickle as none
    assert est._unit_sums and not copy.deepcopy(est)._unit_sums and not pickle.loads(pickle.dumps(est._unit_sums))


def test_the_unit_sums_are_kept_where_the_shared_deficit_plan_applies():
    """The shared-deficit plan's own column index (``_shared_deficit_plan``) no longer rebinds the
    caller's column of ones (rv50: where the plan applied, the power-4 unit sums were summed
    again by every call, UNIT_SUMS_ONCE silently off)."""
    from test_shared_deficits import _columns

    fac, g_mean, v, g = _case()
    n = g_mean.numel()
    est = _EstWithEntries(fac, g_mean, v)
    reader = A._InfluenceReader(est, NAME)
    ones = torch.ones(n, dtype=torch.float64)
    cols2, _ = _columns(n, g)
    cols2[0] = ones
    assert A._shared_deficit_plan(list(cols2)) is not None
    A._distinct_list_sums(reader, 0, n, {2: cols2, 4: [ones]}, {2: [id(t) for t in cols2], 4: [id(ones)]}, unit=ones)
    assert [k[-1] for k in est._unit_sums] == [4]
