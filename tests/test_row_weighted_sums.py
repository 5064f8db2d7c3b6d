"""The power sums' row-weighted columns (``factored_power_sums(..., row_weights=...)``, p46a): one
GEMM over the inputs per source column, the per-row weights applied in the contraction over the
outputs (the unit-kappa chunks' exact deficits, ``assess.UNIT_KAPPA_EXACT``), against the same
columns materialized."""

from __future__ import annotations

import pytest
import torch

import mis_lightning.estimation.linear_factors as lf
from mis_lightning.estimation.linear_factors import LinearFactors, factored_power_sums


def _case(R: int, out_f: int, in_f: int, silent: list[int], dead: list[int], seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, in_f, generator=g, dtype=torch.float64)
    d = torch.randn(R, out_f, generator=g, dtype=torch.float64)
    d[:, silent] = 0.0
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False)
    # a dead row (no gradient variance anywhere) with a non-zero mean gradient: the a = 0 term
    for o in dead:
        v.view(out_f, in_f)[o] = 0.0
    A = torch.rand(out_f * in_f, 3, generator=g, dtype=torch.float64)
    src = torch.tensor([1, 2, 1, 1])
    W = torch.rand(out_f, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 1e6, 0.0])
    return fac, g_mean, v, A, (src, W)


@pytest.mark.parametrize("power", [2, 4])
@pytest.mark.parametrize("shape", [(50, 48, 40), (50, 3, 40)])  # wide, and skinny (transposed GEMM)
def test_row_weighted_columns_equal_the_materialized_ones(power, shape, monkeypatch):
    """Float64 sums of the materialized columns against the float32 path's row-weighted columns:
    within POWER_SUMS_F32_RTOL (the run-time bound's admission; measured ~1e-7), the plain columns
    bitwise those of a call without row weights (the shared GEMM does not move them), a column of
    weights 0 exactly 0. Fails on a wrong source column, a weight applied to the wrong rows or a
    missing a = 0 term (each off by far more than 1e-4 here)."""
    R, out_f, in_f = shape
    fac, g_mean, v, A, rw = _case(R, out_f, in_f, silent=[0] if out_f > 3 else [], dead=[2])
    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
    got = factored_power_sums(fac, g_mean, v, A, power, cache=lf.PowerCache(), row_weights=rw)
    assert lf.POWER_SUMS_F32_COUNTS[(power, "float32")] > 0  # the float32 path ran
    plain = factored_power_sums(fac, g_mean, v, A, power, cache=lf.PowerCache())
    assert torch.equal(got[:, :3], plain)
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    want = factored_power_sums(fac, g_mean, v, lf._with_row_weights(A, rw, in_f), power)
    torch.testing.assert_close(got, want, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
    assert bool((got[:, 6] == 0).all())
    # float64 calls take the materialized columns: the same sums
    torch.testing.assert_close(factored_power_sums(fac, g_mean, v, A, power, row_weights=rw), want, rtol=1e-13, atol=0.0)


def test_row_weighted_records_that_fall_back_sum_in_float64(monkeypatch):
    """Gradients far from centred (a large mean: the expanded terms cancel) send records to the
    float64 fallback: their row-weighted entries are the materialized columns' float64 sums."""
    R, out_f, in_f = 30, 20, 16
    fac, g_mean, v, A, rw = _case(R, out_f, in_f, silent=[], dead=[])
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=fac.x + 300.0, d=fac.d + 300.0)
    gr = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(R, -1)
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False)
    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
    got = factored_power_sums(fac, g_mean, v, A, 2, row_weights=rw)
    assert lf.POWER_SUMS_F32_COUNTS[(2, "float64")] > 0
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    want = factored_power_sums(fac, g_mean, v, lf._with_row_weights(A, rw, in_f), 2)
    torch.testing.assert_close(got, want, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
