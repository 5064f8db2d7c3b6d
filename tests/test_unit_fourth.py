"""The power-4 unit sums ``B_rk = sum_{j in chunk k} w_rj^4`` of a factored parameter for every chunk at
once (``estimation.unit_fourth.unit_fourth_sums``, ``assess.UNIT_FOURTH_BATCHED``, p52a): within the
float32 path's 1e-4 relative of the exact sums (the run-time bound, its float64 fallback), the same
entries as the chunk-by-chunk calls to that tolerance, and the scoring reports' Gaussian-form
diagnostics within it of the switch-off reports."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from test_scoring_pass import SCHEMES, _estimate
from test_unit_sums_once import _EstWithEntries

import mis_lightning.estimation.linear_factors as lf
import mis_lightning.estimation.unit_fourth as uf
from mis_lightning.config import stage_configs
from mis_lightning.estimation.linear_factors import LinearFactors, factored_power_sums

A = importlib.import_module("mis_lightning.assess")  # (the package exports the function assess)
NAME = "lin.weight"
RTOL = lf.POWER_SUMS_F32_RTOL  # the stated bound of every entry


def _case(R=48, out_f=20, in_f=40, shift=0.0, seed=3, held=torch.float32):
    """A factored weight with silent rows (d = 0 on every record), a dead weight (V = 0), a weight
    of infinite variance (the estimate's no-influence convention) and the mean gradient and
    variances held in ``held`` (float32: the estimates at scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, in_f, generator=g, dtype=torch.float64) + shift
    d = torch.randn(R, out_f, generator=g, dtype=torch.float64) + shift
    d[:, [1, 7, 8]] = 0.0
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    gm = (gr.mean(0) + 0.05 * torch.randn(out_f * in_f, generator=g, dtype=torch.float64)).to(held)
    v = (gr.var(0, unbiased=False) + 0.1).to(held)
    v[5], v[2 * in_f + 3] = 0.0, math.inf
    return d, x, gm, v


def _exact(d, x, gm, v, bias, rows):
    """``[R, K]`` the sums of the influences materialized in float64, each by ``math.fsum``."""
    g = d if bias else (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(d.shape[0], -1)
    w = lf.standardised_influence(g, gm.to(torch.float64), v.to(torch.float64))
    per = rows * (1 if bias else x.shape[1])
    return torch.tensor([[math.fsum(r[c: c + per].pow(4).tolist()) for c in range(0, w.shape[1], per)] for r in w],
                        dtype=torch.float64)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("held", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [4, 20, 7])
def test_the_sums_are_within_the_bound_of_the_exact_sums(bias, held, rows):
    """Every entry within 1e-4 relative of the exact float64 sum (measured <= ~1e-6 on the weights,
    ~1e-15 on the biases' float64 sums), chunks of 4, all 20 and 7 rows (a shorter last chunk), with
    silent rows, a dead weight and one of infinite variance. Fails with a silent row's a = 0 term
    left out (~1e-2 off), a wrong chunk of a row, or a scale not undone."""
    d, x, gm, v = _case(held=held)
    if bias:
        gm, v = gm[: d.shape[1]].clone(), v[: d.shape[1]].clone()
    got = uf.unit_fourth_sums(d, x, gm, v, bias, rows)
    ref = _exact(d, x, gm, v, bias, rows)
    assert got.shape == ref.shape == (d.shape[0], -(-d.shape[1] // rows))
    rel = float(((got - ref).abs() / ref).max())
    assert rel <= RTOL, rel
    assert rel <= (1e-12 if bias else 1e-5), rel  # (what is measured, with margin: the bound is loose)


def test_every_row_moving_takes_the_equal_chunks_reduction(monkeypatch):
    """No silent row (the 1e7 MLP's first layer): chunks of equal rows contracted by one reduction
    instead of the indicator GEMM, within 1e-4 (measured ~1e-7) of the exact sums (fails with the
    reduction over the wrong axis or rows)."""
    d, x, gm, v = _case()
    d[:, [1, 7, 8]] = 0.5
    used = []
    real = uf._indicator
    monkeypatch.setattr(uf, "_indicator", lambda *a: used.append(1) or real(*a))
    got = uf.unit_fourth_sums(d, x, gm, v, False, 5)
    assert not used
    ref = _exact(d, x, gm, v, False, 5)
    assert float(((got - ref).abs() / ref).max()) <= 1e-5


def test_groups_of_chunks_within_a_memory_budget_give_the_same_sums(monkeypatch):
    """With a group budget of 6 rows (``GROUP_FLOATS``) the chunks of 4 rows are summed in several
    groups (each its own scales and bound): every entry within 1e-4 of the exact sums, and within
    the bound of the one-group sums."""
    d, x, gm, v = _case()
    one = uf.unit_fourth_sums(d, x, gm, v, False, 4)
    groups = []
    real = uf._terms
    monkeypatch.setattr(uf, "_terms", lambda total, *a: groups.append(total.shape[1]) or real(total, *a))
    monkeypatch.setattr(uf, "GROUP_FLOATS", 6 * x.shape[1])
    got = uf.unit_fourth_sums(d, x, gm, v, False, 4)
    assert len(groups) > 2 and sum(groups) == got.shape[1]
    ref = _exact(d, x, gm, v, False, 4)
    assert float(((got - ref).abs() / ref).max()) <= RTOL
    assert float(((got - one).abs() / one).max()) <= 2 * RTOL


def test_the_chunk_calls_give_the_same_entries_within_the_bound():
    """Against ``factored_power_sums`` on each chunk's column of ones (the path the switch replaces):
    within 2e-4 relative (each within 1e-4 of the exact sum)."""
    d, x, gm, v = _case()
    rows, in_f = 8, x.shape[1]
    got = uf.unit_fourth_sums(d, x, gm, v, False, rows)
    for k, o0 in enumerate(range(0, d.shape[1], rows)):
        o1 = min(d.shape[1], o0 + rows)
        fac = LinearFactors(module="lin", weight=NAME, bias=None, x=x, d=d[:, o0:o1])
        sl = slice(o0 * in_f, o1 * in_f)
        old = factored_power_sums(fac, gm[sl].double(), v[sl].double(),
                                  torch.ones((o1 - o0) * in_f, 1, dtype=torch.float64), 4)[:, 0]
        assert float(((got[:, k] - old).abs() / old).max()) <= 2 * RTOL


def test_cancelling_records_fall_back_to_float64(monkeypatch):
    """Records whose gradients nearly equal the mean gradient (``d x ~ gbar``: the binomial terms
    cancel) fail the float32 bound and are summed in float64: within 1e-4 of the exact sums, where
    the float32 sums alone (the bound's eps set to 0) are off by far more,
    so the bound and its fallback decide."""
    R, out_f, in_f = 24, 6, 64
    g = torch.Generator().manual_seed(11)
    x = 1.0 + 1e-2 * torch.randn(R, in_f, generator=g, dtype=torch.float64)
    d = 1.0 + 1e-2 * torch.randn(R, out_f, generator=g, dtype=torch.float64)
    gm = torch.ones(out_f * in_f, dtype=torch.float32)
    v = torch.full((out_f * in_f,), 1e-6, dtype=torch.float32)
    ref = _exact(d, x, gm, v, False, 3)
    before = lf.POWER_SUMS_F32_COUNTS[(4, "float64")]
    got = uf.unit_fourth_sums(d, x, gm, v, False, 3)
    assert lf.POWER_SUMS_F32_COUNTS[(4, "float64")] > before
    assert float(((got - ref).abs() / ref).max()) <= RTOL
    monkeypatch.setattr(lf, "POWER_SUMS_F32_LAMBDA", 0.0)  # (the bound's eps 0: no entry falls back)
    monkeypatch.setattr(uf, "ROUNDINGS", 0)
    loose = uf.unit_fourth_sums(d, x, gm, v, False, 3)
    assert float(((loose - ref).abs() / ref).max()) > 10 * RTOL


def test_the_first_chunk_leaves_every_chunks_entry(monkeypatch):
    """``_distinct_list_sums`` on chunk 0 computes the parameter's chunks of the same width at once:
    the later chunks read their entries (no further call), each the batched sums' column; a chunk
    first met elsewhere than at 0 (no entry) is computed alone, the same sums to the bound."""
    d, x, gm, v = _case()
    fac = LinearFactors(module="lin", weight=NAME, bias=None, x=x, d=d)
    in_f, rows = x.shape[1], 8
    width, n = rows * in_f, gm.numel()
    calls = []
    real = uf.unit_fourth_sums

    def spy(*a, **k):
        calls.append(a[5])
        return real(*a, **k)

    monkeypatch.setattr(uf, "unit_fourth_sums", spy)

    def chunk(est, a):
        b = min(n, a + width)
        reader = A._InfluenceReader(est, NAME)
        ones = torch.ones(b - a, dtype=torch.float64)
        return A._distinct_list_sums(reader, a, b, {4: [ones]}, {4: [id(ones)]}, unit=ones)[4][:, 0]

    est = _EstWithEntries(fac, gm, v)
    firsts = [chunk(est, a) for a in range(0, n, width)]
    assert calls == [rows] and len(est._unit_sums) == -(-n // width)
    alone = chunk(_EstWithEntries(fac, gm, v), width)  # (chunk 1 met first: this chunk alone)
    assert calls == [rows, rows]
    ref = _exact(d, x, gm, v, False, rows)
    for k, s in enumerate(firsts):
        assert torch.equal(s, real(d, x, gm, v, False, rows)[:, k])
    assert float(((alone - ref[:, 1]).abs() / ref[:, 1]).max()) <= RTOL


def test_the_reports_diagnostics_are_within_the_bound_of_the_chunk_calls(monkeypatch):
    """``score_schemes`` on a factored estimate: the first call sums B through ``unit_fourth_sums``
    (the later calls read its entries), and every report field is the switch-off report's but the
    Gaussian form's diagnostics, which move within the entries' bound: ``clt_error_estimate``
    (``3 B / (24 s2^2)`` where the bounds settle it) within 2e-4 relative."""
    model, est = _estimate("factored")
    _, sc, _ = stage_configs("assess", None, None, {})
    calls = []
    real = uf.unit_fourth_sums
    monkeypatch.setattr(uf, "unit_fourth_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    on = [json.loads(A.score_schemes(est, model, SCHEMES, scoring_config=sc).to_json()) for _ in range(2)]
    n_first = len(calls)
    monkeypatch.setattr(A, "UNIT_FOURTH_BATCHED", False)
    off = json.loads(A.score_schemes(est, model, SCHEMES, scoring_config=sc).to_json())
    assert n_first > 0 and len(calls) == n_first and on[0] == on[1]
    moved = []

    def walk(a, b, path):
        if isinstance(a, dict):
            assert set(a) == set(b), path
            for k in a:
                walk(a[k], b[k], path + (k,))
        elif isinstance(a, list):
            assert len(a) == len(b), path
            for i, (p, q) in enumerate(zip(a, b)):
                walk(p, q, path + (i,))
        elif a != b:
            assert path[-1] == "clt_error_estimate", (path, a, b)
            assert abs(a - b) <= 2 * RTOL * abs(b), (path, a, b)
            moved.append(path)

    walk(on[0], off, ())
