"""Monte Carlo re-quantization against the analytic cell moments.

On grids that do not depend on the weights (a fixed-step scheme, the bf16 cast) the two
modes estimate the same quantity: the mean of the per-element differences must be within
4 standard errors (the standard error of a mean over independent elements, each estimated
from independent draws) plus a small allowance for the estimator's residual bias (the
singleton-group correction, < 0.005 at the step sizes used here, measured below). On absmax
schemes the grid moves with the weights; the difference is reported, and its one certain
feature is checked: a row's extreme weight, which sets the scale, always maps to the end of
the code range, so its code never moves (MC kappa exactly 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.requantize import (
    FixedStepQuantizer,
    compare_requantization,
    conditional_mean_moments,
    release_codes,
    requantize_moments,
)


def _uniform_model(k: int = 32, n: int = 16, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, n))
    with torch.no_grad():
        w = torch.empty(n, k).uniform_(0.5, 3.0, generator=g)
        sign = torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0)
        m[0].weight.copy_(w * sign)
        m[0].bias.copy_(torch.empty(n).uniform_(0.5, 3.0, generator=g))
    return m


def test_estimator_by_hand():
    # one column, 6 draws, codes a,a,a,b,b,c
    codes = torch.tensor([[0.0], [0.0], [0.0], [1.0], [1.0], [2.0]])
    xi = torch.tensor([[1.0], [2.0], [3.0], [-1.0], [1.0], [4.0]])
    mm = conditional_mean_moments(codes, xi)
    # groups: a (n=3, mean 2, var 1), b (n=2, mean 0, var 2), c (n=1: pooled var (2*1+1*2)/3)
    pooled = (2 * 1.0 + 1 * 2.0) / 3
    expect = ((3 * 4 - 1) + (2 * 0 - 2) + (1 * 16 - pooled)) / 6
    assert float(mm.kappa_raw[0]) == pytest.approx(expect)
    assert float(mm.kappa[0]) == pytest.approx(min(max(expect, 0), 1))
    assert float(mm.lam[0]) == pytest.approx((3 * 2 + 2 * 0 + 1 * 4) / 6)
    assert float(mm.singleton_share[0]) == pytest.approx(1 / 6)
    # draw order does not matter
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    assert torch.equal(conditional_mean_moments(codes[perm], xi[perm]).kappa_raw, mm.kappa_raw)


def test_frozen_and_no_quantization_limits():
    g = torch.Generator().manual_seed(0)
    xi = torch.randn(400, 3, generator=g)
    codes = torch.stack([torch.zeros(400), xi[:, 1].clone(), (xi[:, 2] > 0).double()], 1).double()
    mm = conditional_mean_moments(codes, xi)
    assert bool(mm.frozen[0]) and float(mm.kappa[0]) == 0.0 and float(mm.lam[0]) == 0.0
    # code = xi itself (every draw its own group): plug-in sum of xi^2 / S ~ 1
    assert float(mm.kappa_raw[1]) == pytest.approx(float((xi[:, 1] ** 2).mean()))
    # sign quantizer: kappa = 2/pi
    assert float(mm.kappa_raw[2]) == pytest.approx(2 / math.pi, abs=0.1)


@pytest.mark.parametrize("step_over_sigma", [1.0, 3.0])
def test_mc_matches_analytic_on_a_fixed_step_grid(step_over_sigma):
    model = _uniform_model()
    step = 0.01
    sigma = {n: torch.full_like(p, step / step_over_sigma) for n, p in model.named_parameters()}
    out = compare_requantization(FixedStepQuantizer(step), model, sigma, num_draws=160,
                                 generator=torch.Generator().manual_seed(1))
    tot = out["total"]
    assert tot["numel"] == 32 * 16
    assert abs(tot["mean_diff"]) < 4 * tot["se_diff"] + 0.005, tot
    assert 0.3 < tot["kappa_analytic"] < 0.95


def test_mc_matches_analytic_on_the_bf16_cast():
    model = _uniform_model()
    # bf16 has 8 significant bits: the local step is |w| * 2^-7 .. 2^-8; sigma of the same order
    sigma = {n: p.detach().abs() * 2.0**-8 for n, p in model.named_parameters()}
    out = compare_requantization("bf16", model, sigma, num_draws=128,
                                 generator=torch.Generator().manual_seed(2))
    tot = out["total"]
    assert set(out["params"]) == {"0.weight", "0.bias"}
    assert abs(tot["mean_diff"]) < 4 * tot["se_diff"] + 0.005, tot
    assert tot["frozen_mc"] == 0.0


def test_by_value_equals_by_code_on_fixed_grids():
    model = _uniform_model(8, 4)
    sigma = {"0.weight": torch.full((4, 8), 0.01)}
    a = requantize_moments(FixedStepQuantizer(0.01), model, sigma, num_draws=32,
                           generator=torch.Generator().manual_seed(3))
    b = requantize_moments(FixedStepQuantizer(0.01), model, sigma, num_draws=32,
                           generator=torch.Generator().manual_seed(3), by="value")
    assert set(a) == {"0.weight"}  # no sigma for the bias: skipped
    assert torch.equal(a["0.weight"].kappa_raw, b["0.weight"].kappa_raw)


@pytest.mark.parametrize("name", ["rtn_int4", "intx_weight_only_int4_g32"])
def test_absmax_difference_is_reported_and_row_extremes_never_move(name, record_property):
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 16))
    with torch.no_grad():
        w = 0.1 * torch.randn(16, 32, generator=g)
        w[:, 0] = 0.6  # each row's extreme: well clear of the other weights (|w| < 0.45)
        model[0].weight.copy_(w)
    sigma = {"0.weight": torch.full((16, 32), 0.01)}
    out = compare_requantization(name, model, sigma, num_draws=96,
                                 generator=torch.Generator().manual_seed(5))
    tot = out["total"]
    record_property("absmax_comparison", tot)
    print(f"{name}: analytic {tot['kappa_analytic']:.4f} MC {tot['kappa_mc']:.4f} "
          f"diff {tot['mean_diff']:+.4f} ± {tot['se_diff']:.4f} max|diff| {tot['max_abs_diff']:.3f}")
    mc = requantize_moments(name, model, sigma, num_draws=48, generator=torch.Generator().manual_seed(6))
    k = mc["0.weight"].kappa.reshape(16, 32)
    # rtn: 0.6/scale = 7 = qmax; torchao: 0.6/scale = 7.5, rounds to 8, clamped to qmax 7
    assert torch.equal(k[:, 0], torch.zeros(16, dtype=torch.float64))
    assert mc["0.weight"].frozen.reshape(16, 32)[:, 0].all()
    an = get_scheme(name).apply(model).grids["0.weight"]
    th = model[0].weight.detach().reshape(-1)
    ka = an.moments(th, sigma["0.weight"].reshape(-1).double(), 0, an.numel).kappa.reshape(16, 32)
    assert (ka[:, 0] >= 0).all()  # analytic: the fixed grid's outer cell (reported, not asserted)
    assert math.isfinite(tot["mean_diff"]) and tot["numel"] == 512


def test_release_codes_of_table_grids_are_value_indices():
    model = _uniform_model(8, 4)
    res = get_scheme("float8_weight_only").apply(model)
    grid = res.grids["0.weight"]
    idx = release_codes(grid).long()
    scale, _, _ = grid.element_grid(0, grid.numel)
    vals = grid.values[idx] * scale
    assert torch.equal(vals.to(torch.float32), grid.dequantized.reshape(-1))


def test_num_draws_must_be_at_least_two():
    with pytest.raises(ValueError):
        requantize_moments("rtn_int8", _uniform_model(4, 2), {}, num_draws=1)


def test_torchao_negative_row_extreme_sits_on_an_edge():
    """torchao symmetric scale = amax / 7.5: a negative extreme maps to exactly -7.5, the edge
    between codes -8 and -7, and which side it lands on is decided by the rounding of
    ``w * (1/s)``: its code moves between draws although the weight stays the extreme."""
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(32, 16))
    with torch.no_grad():
        w = 0.1 * torch.randn(16, 32, generator=g)
        w[:, 0] = -0.6
        model[0].weight.copy_(w)
    seen = set()
    for _ in range(24):
        with torch.no_grad():
            m = nn.Sequential(nn.Linear(32, 16))
            m[0].weight.copy_(w + 0.01 * torch.randn(16, 32, generator=g))
        codes = get_scheme("intx_weight_only_int4_g32").apply(m).grids["0.weight"].codes
        seen |= set(codes[:, 0].tolist())
    assert seen <= {-8, -7} and len(seen) == 2


def test_joint_d_eff_leaves_out_the_weights_no_draw_moves():
    """de49: an element with sd 0 leaks nothing and counts 0 in ``requantize_joint``'s d_eff, even
    a row's absmax, which the release reveals (kappa 1). Reference: the sum of the moments' kappa
    over the elements of sd > 0 (before: over every element, +1 per revealed sd-0 absmax)."""
    from mis_lightning.quantization.requantize import requantize_joint

    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(32, 4))
    with torch.no_grad():
        w = 0.1 * torch.randn(4, 32, generator=g)
        w[:, 0] = 0.6  # each row's absmax: revealed
        model[0].weight.copy_(w)
    sd = torch.full((4, 32), 0.01)
    sd[:, 0] = 0.0  # the revealed absmax of every row: never moved
    sd[0, 5:9] = 0.0  # and a few inside their cells
    jr = requantize_joint("rtn_int4", model, {"0.weight": sd}, num_draws=16, groups=2)
    k = jr.moments["0.weight"].kappa.reshape(4, 32)
    assert torch.equal(k[:, 0], torch.ones(4, dtype=k.dtype))  # revealed: kappa 1 in the moments
    assert jr.d_eff == pytest.approx(float(k[sd > 0].sum()), rel=1e-12)
    assert jr.d_eff <= float(k.sum()) - 4.0 + 1e-9
