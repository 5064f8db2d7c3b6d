"""A factored weight's chunk setup of the power sums (the live mask, ``gb^2 / V``, the silent rows, the
layer's scales, the GEMMs' rows: ``linear_factors.PowerCache.chunk_setup``) computed by the first
scoring call on an estimate and read back by the later ones (``assess.HOLD_CHUNK_SETUP``, p51b): the
same sums as recomputing it, never read where its inputs or the power sums' settings changed; and the
live variances read unclamped (``linear_factors.UNCLAMPED_LIVE_VARIANCES``)."""

from __future__ import annotations

import copy
import importlib
import math
import pickle

import pytest
import torch
from test_scoring_pass import SCHEMES, _estimate
from test_shared_deficits import NAME, _case
from test_unit_sums_once import _EstWithEntries

import mis_lightning.estimation.linear_factors as lf
from mis_lightning.config import stage_configs

A = importlib.import_module("mis_lightning.assess")  # (the package exports the function assess)


class _EstHolding(_EstWithEntries):
    """The mock estimate with what an ``Estimate`` holds for the held setups too."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._chunk_setups: dict = {}


def _counting(monkeypatch) -> list[str]:
    """Spies on the setup's own computations (the silent rows, ``gb^2 / V``): their names, per call."""
    seen: list[str] = []
    real_silent, real_raw = lf._silent_rows, lf._zeroth_raw

    def silent(d):
        seen.append("silent rows")
        return real_silent(d)

    def raw(g_mean, vp, power, memo):
        if memo is None or (power == 2 and "c0 raw 2" not in memo):
            seen.append("gb^2 / V")
        return real_raw(g_mean, vp, power, memo)

    monkeypatch.setattr(lf, "_silent_rows", silent)
    monkeypatch.setattr(lf, "_zeroth_raw", raw)
    return seen


def _call(est, cols: torch.Tensor) -> dict[int, torch.Tensor]:
    """One scoring call's sums of chunk 0:numel (a new reader, as each call makes): powers 2 and 4."""
    reader = A._InfluenceReader(est, NAME)
    n = est._g_mean[NAME].numel()
    return reader.sums(0, n, {2: cols, 4: cols[:, :1].contiguous()})


def _exact(fac, g_mean, v, power: int, col: torch.Tensor) -> torch.Tensor:
    """``sum_j w_rj^p A_j`` of the influences materialised in float64, each record's sum by ``math.fsum``."""
    w = lf.standardised_influence((fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(fac.d.shape[0], -1), g_mean, v)
    return torch.tensor([math.fsum(r.tolist()) for r in w.pow(power) * col], dtype=torch.float64)


def _columns(n: int, g: torch.Generator) -> torch.Tensor:
    """``[n, 3]``: the unit column and two random non-negative ones (a chunk's kappas)."""
    return torch.stack([torch.ones(n, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64),
                        torch.rand(n, generator=g, dtype=torch.float64)], 1)


@pytest.mark.parametrize("quotient_per_call", [True, False])
def test_a_chunks_setup_is_computed_once_per_estimate(monkeypatch, quotient_per_call):
    """Three calls on one estimate: the setup (silent rows, ``gb^2 / V``) computed in the first only --
    but ``gb^2 / V`` in every call with ``SETUP_QUOTIENT_PER_CALL`` (p55a: not held) --; every call's
    sums bitwise the switch-off call's, and within the float32 path's 1e-4 of the exact sums (fails
    without the held setup: computed in every call; with the quotient held or not as the switch says)."""
    monkeypatch.setattr(A, "SETUP_QUOTIENT_PER_CALL", quotient_per_call)
    fac, g_mean, v, g = _case()
    cols = _columns(g_mean.numel(), g)
    est = _EstHolding(fac, g_mean, v)
    seen = _counting(monkeypatch)
    got, per_call = [], []
    for _ in range(3):
        seen.clear()
        got.append(_call(est, cols))
        per_call.append(sorted(seen))
    later = ["gb^2 / V"] if quotient_per_call else []
    assert per_call == [["gb^2 / V", "silent rows"], later, later], per_call
    assert list(k for k in est._chunk_setups if k != "bytes") == [(NAME, 0, g_mean.numel())]
    assert 0 < est._chunk_setups["bytes"] <= A.HELD_SETUP_BYTES
    held = est._chunk_setups[(NAME, 0, g_mean.numel())][1]
    assert not any(k in held for k in A._UNHELD_SETUP)  # (the chunk-sized intermediates dropped)
    assert ("c0 raw 2" in held) is not quotient_per_call
    monkeypatch.setattr(A, "HOLD_CHUNK_SETUP", False)
    seen.clear()
    off = _call(est, cols)
    assert sorted(seen) == ["gb^2 / V", "silent rows"]
    for out in got:
        for p in (2, 4):
            assert torch.equal(out[p], off[p]), p
    for m in range(cols.shape[1]):
        ref = _exact(fac, g_mean, v, 2, cols[:, m])
        assert float(((got[2][2][:, m] - ref).abs() / ref).max()) <= 1e-4, m
    ref4 = _exact(fac, g_mean, v, 4, cols[:, 0])
    assert float(((got[2][4][:, 0] - ref4).abs() / ref4).max()) <= 1e-4


def test_a_held_setup_is_not_read_after_its_inputs_or_settings_change(monkeypatch):
    """The setup is keyed by the tensors' identity and version and the power sums' settings: a mean
    gradient changed in place, another variances tensor, and the silent rows not skipped each compute
    it again, and the sums are those of a fresh estimate (fails with the versions or the settings left
    out of the key: the stale ``gb^2 / V`` or silent rows would be read)."""
    fac, g_mean, v, g = _case()
    cols = _columns(g_mean.numel(), g)
    est = _EstHolding(fac, g_mean, v)
    seen = _counting(monkeypatch)
    _call(est, cols)
    g_mean.mul_(1.5)  # in place: the same object, a new version
    seen.clear()
    changed = _call(est, cols)
    assert "gb^2 / V" in seen
    assert torch.equal(changed[2], _call(_EstHolding(fac, g_mean, v), cols)[2])
    v2 = v * 2.0
    est._v_diag[NAME] = v2  # another tensor
    seen.clear()
    again = _call(est, cols)
    assert "gb^2 / V" in seen
    assert torch.equal(again[2], _call(_EstHolding(fac, g_mean, v2), cols)[2])
    monkeypatch.setattr(lf, "SKIP_SILENT_ROWS", False)
    seen.clear()
    unskipped = _call(est, cols)
    assert "gb^2 / V" in seen
    assert torch.equal(unskipped[2], _call(_EstHolding(fac, g_mean, v2), cols)[2])


def test_the_held_setups_stay_within_their_budget(monkeypatch):
    """No setup is held beyond ``HELD_SETUP_BYTES`` (each call then computes its own)."""
    fac, g_mean, v, g = _case()
    cols = _columns(g_mean.numel(), g)
    monkeypatch.setattr(A, "HELD_SETUP_BYTES", 16)
    est = _EstHolding(fac, g_mean, v)
    seen = _counting(monkeypatch)
    first = _call(est, cols)
    seen.clear()
    second = _call(est, cols)
    assert sorted(seen) == ["gb^2 / V", "silent rows"]
    assert not [k for k in est._chunk_setups if k != "bytes"] and est._chunk_setups.get("bytes", 0) == 0
    assert torch.equal(first[2], second[2])


def test_the_draws_calls_neither_read_nor_leave_a_setup():
    """A call on some rows of a chunk (the draws' sums) has other factors' rows: it neither reads the
    chunk's held setup (its sums are a fresh estimate's) nor leaves one (fails where it read the
    chunk's: the silent rows and scaled ``d`` of the whole chunk)."""
    fac, g_mean, v, g = _case()
    cols = _columns(g_mean.numel(), g)
    in_f = fac.x.shape[1]
    rows = torch.tensor([0, 1, 3])  # (row 1 silent)
    part = cols[: 3 * in_f].contiguous()
    n = g_mean.numel()
    fresh = _EstHolding(fac, g_mean, v)
    ref = A._InfluenceReader(fresh, NAME).sums(0, n, {2: part, 4: part[:, :1].contiguous()}, rows=rows)
    assert not fresh._chunk_setups
    est = _EstHolding(fac, g_mean, v)
    _call(est, cols)
    held = dict(est._chunk_setups)
    got = A._InfluenceReader(est, NAME).sums(0, n, {2: part, 4: part[:, :1].contiguous()}, rows=rows)
    assert est._chunk_setups == held
    for p in (2, 4):
        assert torch.equal(got[p], ref[p]), p


def test_later_scoring_calls_read_the_setups_with_the_same_reports(monkeypatch):
    """``score_schemes`` three times on a factored estimate: the setups computed in the first call only
    (the silent rows), every report the switch-off call's; a copied or pickled estimate holds none."""
    model, est = _estimate("factored")
    _, sc, _ = stage_configs("assess", None, None, {})
    seen = _counting(monkeypatch)
    counts, reports = [], []
    for _ in range(3):
        seen.clear()
        reports.append(A.score_schemes(est, model, SCHEMES, scoring_config=sc).to_json())
        counts.append(seen.count("silent rows"))
    monkeypatch.setattr(A, "HOLD_CHUNK_SETUP", False)
    seen.clear()
    off = A.score_schemes(est, model, SCHEMES, scoring_config=sc).to_json()
    assert counts[0] > 0 and counts[1:] == [0, 0], counts
    assert seen.count("silent rows") >= counts[0]
    assert all(r == off for r in reports)
    assert est._chunk_setups and not copy.deepcopy(est)._chunk_setups
    assert not pickle.loads(pickle.dumps(est._chunk_setups))
    # released (rv51: a process keeping scored estimates holds their setups): recomputed, the same report
    assert est.release_caches() > 0 and not est._chunk_setups and not est._unit_sums
    monkeypatch.setattr(A, "HOLD_CHUNK_SETUP", True)
    seen.clear()
    assert A.score_schemes(est, model, SCHEMES, scoring_config=sc).to_json() == off
    assert seen.count("silent rows") == counts[0] and est._chunk_setups


@pytest.mark.parametrize("dead", [False, True])
def test_live_variances_are_read_unclamped(monkeypatch, dead):
    """Every weight live: the clamped variances are the variances tensor itself (no copy), the sums
    bitwise the clamped copy's, the tensor unchanged; a weight without variance: clamped as before
    (fails without the switch's effect: a copy where all are live)."""
    fac, g_mean, v, g = _case()
    if dead:
        v = v.clone()
        v[5] = 0.0
    live = v > lf.V_NONE
    got = lf._clamped_variances(v, live, {})
    assert (got is v) == (not dead)
    assert torch.equal(got, v.clamp_min(lf.V_NONE))
    cols = _columns(g_mean.numel(), g)
    before = v.clone()
    on = {p: lf.factored_power_sums(fac, g_mean, v, cols, p) for p in (2, 4)}
    assert torch.equal(v, before)
    monkeypatch.setattr(lf, "UNCLAMPED_LIVE_VARIANCES", False)
    assert lf._clamped_variances(v, live, {}) is not v
    for p in (2, 4):
        assert torch.equal(on[p], lf.factored_power_sums(fac, g_mean, v, cols, p)), p


def test_a_moved_estimates_cpu_copy_starts_its_own_caches(monkeypatch):
    """``Estimate.cpu()`` of an estimate with tensors off the CPU (a CUDA estimation; faked here: the
    device check sees one meta tensor) gives the copy empty caches of its own: shared, the scoring of
    each temporary copy filled the user's estimate with setups keyed on the copy's tensors, which no
    later call could read (rv51)."""
    E = importlib.import_module("mis_lightning.estimation.estimate")
    model, est = _estimate("factored")
    _, sc, _ = stage_configs("assess", None, None, {})
    real = E._tensors

    def with_a_device_tensor(x):
        yield from real(x)
        yield torch.empty(0, device="meta")

    monkeypatch.setattr(E, "_tensors", with_a_device_tensor)
    monkeypatch.setattr(E, "_to_cpu", lambda x: x)  # (every real tensor is on the CPU already)
    copy_ = est.cpu()
    assert copy_ is not est
    assert copy_._chunk_setups is not est._chunk_setups and copy_._unit_sums is not est._unit_sums
    monkeypatch.setattr(E, "_tensors", real)
    A.score_schemes(copy_, model, SCHEMES, scoring_config=sc)
    assert copy_._chunk_setups and not est._chunk_setups and not est._unit_sums


def test_an_estimate_pickled_before_the_caches_existed_scores():
    """An estimate restored from a pickle without the cache fields (made before s50 / s51) gets empty
    ones (``Estimate.__setstate__``): scored, released, the same report as a fresh estimate's (rv51:
    AttributeError at the first scoring)."""
    model, est = _estimate("factored")
    _, sc, _ = stage_configs("assess", None, None, {})
    want = A.score_schemes(copy.deepcopy(est), model, SCHEMES, scoring_config=sc).to_json()
    state = dict(est.__dict__)
    del state["_unit_sums"], state["_chunk_setups"]
    old = type(est).__new__(type(est))
    old.__setstate__(state)  # what unpickling an old estimate does
    assert A.score_schemes(old, model, SCHEMES, scoring_config=sc).to_json() == want
    assert old.release_caches() >= 0 and not old._chunk_setups


@pytest.mark.parametrize("out_f", [24, 64])  # the skinny layout [out, M, in] and the plain [in, out, M]
def test_the_float32_operand_is_one_division_into_the_gemms_layout(monkeypatch, out_f):
    """``linear_factors.FUSED_S32`` (p54b): ``S / 2^k`` written by one ``torch.div`` with a float32
    ``out`` in the GEMM's layout is bitwise the float64 quotient cast after (on quotients that round
    in float32, its subnormals and zeros too), and the sums are bitwise the two-step path's, with no
    float64 ``prod`` buffer held (fails without the switch's effect: the buffer is there)."""
    g = torch.Generator().manual_seed(7)
    S = torch.rand(5, 6, 7, generator=g, dtype=torch.float64) * torch.logspace(-50, 3, 7, dtype=torch.float64)
    S[0, 0, 0], S[1, 1, 1] = 0.0, 2.0 ** -140 * (1 + 2.0 ** -30)  # a zero; a float32 subnormal that rounds
    sS = torch.tensor([0.5, 1.0, 8.0, 2.0 ** -20, 1.0, 4.0, 2.0 ** 10], dtype=torch.float64).reshape(1, 1, 7)
    for perm in ((1, 0, 2), (0, 2, 1)):
        fused = torch.div(S.permute(*perm), sS.permute(*perm),
                          out=torch.empty(tuple(S.shape[i] for i in perm), dtype=torch.float32))
        two = (S / sS).permute(*perm).to(torch.float32)
        assert torch.equal(fused.view(torch.int32), two.view(torch.int32)), perm
    fac, g_mean, v, g = _case(out_f=out_f)
    cols = _columns(g_mean.numel(), g)
    cache = lf.PowerCache()
    on = {p: lf.factored_power_sums(fac, g_mean, v, cols, p, cache=cache) for p in (2, 4)}
    assert "S32" in cache._scratch and "prod" not in cache._scratch
    monkeypatch.setattr(lf, "FUSED_S32", False)
    cache = lf.PowerCache()
    for p in (2, 4):
        assert torch.equal(on[p], lf.factored_power_sums(fac, g_mean, v, cols, p, cache=cache)), p
    assert "prod" in cache._scratch
