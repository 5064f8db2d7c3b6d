"""The factored per-record power sums of a Linear layer against the materialised influences,
where some weights have no gradient variance (dead units: mo26 found the fourth-power sums NaN
at 1e7 weights, every scheme's Edgeworth estimate NaN with a "beyond its tolerance" note and an
exact second pass that came out NaN again)."""

from __future__ import annotations

import pytest
import torch

from mis_lightning.estimation.linear_factors import LinearFactors, factored_power_sums


def _reference(fac: LinearFactors, g_mean: torch.Tensor, v: torch.Tensor, A: torch.Tensor, power: int) -> torch.Tensor:
    g = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(fac.d.shape[0], -1)
    # no gradient variance: no influence (the estimate's convention, w_j = 0)
    w = torch.where(v > 0, -(g - g_mean) / v.clamp_min(1e-300).sqrt(), torch.zeros_like(g))
    return w.pow(power) @ A


@pytest.mark.parametrize("power", [2, 4])
def test_weights_without_gradient_variance_add_nothing(power):
    """Two dead output units (their loss gradient 0 on every record, V_jj = 0): the sums equal
    the materialised influences' with w = 0 there, finite, to float64 rounding (1e-10 relative:
    the binomial expansion cancels terms of the centred gradient)."""
    g = torch.Generator().manual_seed(0)
    R, out_f, in_f = 40, 5, 7
    x = torch.randn(R, in_f, generator=g, dtype=torch.float64)
    d = torch.randn(R, out_f, generator=g, dtype=torch.float64)
    d[:, [1, 3]] = 0.0
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False)
    assert int((v == 0).sum()) == 2 * in_f
    A = torch.rand(out_f * in_f, 3, generator=g, dtype=torch.float64)
    got = factored_power_sums(fac, g_mean, v, A, power)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(fac, g_mean, v, A, power), rtol=1e-10, atol=0.0)
