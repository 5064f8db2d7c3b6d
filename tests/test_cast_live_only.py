"""A 16-bit cast's main and pool calls on a chunk whose sd-0 weights are inert evaluate its live
weights alone (``assess.CAST_LIVE_ONLY``, p53a).

Tolerances. The live weights' kappa: none (bit for bit the whole chunk's call, the path before: a
cast's cell moments of an element never read its call's other elements). The joint pass, switch on
against off: frozen (pinned) counts exact (an inert weight is never moved: pinned whatever its kappa); d_eff within
1e-12 relative (its float64 sum over another set of kappa values: ~c ulps at most); every power sum
within ``2 rtol / (1 - rtol)`` relative, ``rtol = POWER_SUMS_F32_RTOL`` (an inert weight's terms are
exact zeros whatever its kappa, so both sides are float32-path sums of the same exact sums, each
within rtol of them or summed in float64); where the sd-0 weights keep an influence (finite ``V``),
the switch must not apply and every sum is bitwise.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math

import pytest
import torch
from _joint_switch import joint_pass_on_off  # tests/_joint_switch.py
from _nets import trained_relu_mlp  # tests/_nets.py
from test_sd_zero_apart import _cast_chunk  # p52c's chunk: ties, near-edge weights
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.config import stage_configs
from mis_lightning.quantization import get_scheme

A = importlib.import_module("mis_lightning.assess")
LF = importlib.import_module("mis_lightning.estimation.linear_factors")
qb = importlib.import_module("mis_lightning.quantization.base")
F64 = torch.float64


@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
def test_live_kappa_is_the_whole_chunks_call(scheme):
    """``_cast_live_kappa`` at theta-hat's and the pool protocol's sd: the live weights' kappa bit
    for bit what ``ParamGrid.moments`` gives them on the whole chunk (kappa-only and full), 0 on
    every sd-0 weight; the grid qualifies (and a float8 grid, an
    interpolation table, does not)."""
    g, theta, sigma = _cast_chunk(scheme)
    assert A._cast_live_applies(g)
    assert not A._cast_live_applies(get_scheme("float8_weight_only").apply(
        torch.nn.Sequential(torch.nn.Linear(128, 512))).grids["0.weight"])
    c = theta.numel()
    still = sigma <= 0
    live = torch.nonzero(~still).squeeze(-1)
    for sd in (sigma, sigma / A.POOL_SIGMA_RATIO):
        qb.release_chunk_facts()
        got = A._cast_live_kappa(g, theta[live], sd[live], torch.ones(live.numel(), dtype=F64), live, c, None)
        qb.release_chunk_facts()
        whole = g.moments(theta, sd, 0, c, kappa_only=True).kappa
        full = g.moments(theta, sd, 0, c).kappa
        assert torch.equal(got[live], whole[live]) and torch.equal(got[live], full[live])
        assert bool((got[still] == 0.0).all())
        assert bool((whole[still] != 0.0).any())  # (some old sd-0 kappa is not 0, a point mass's: ties, near-edges)
    qb.release_chunk_facts()


@functools.cache
def _factored():
    model, x, y = trained_relu_mlp()
    opts = {"estimation": "diagonal", "num_records": 64, "hessian": "ggn", "budget": 1000}
    est_cfg, _, _ = stage_configs("assess", None, None, opts)
    est = A.run_estimation(model, DataLoader(TensorDataset(x, y), batch_size=128),
                           lambda o, t: (o[:, 0] - t) ** 2, est_cfg)
    assert est.factors is not None and not est.influence_stored
    return model, est


@pytest.mark.parametrize("mark", ["inf", "zero", "finite"])
def test_joint_pass_casts_on_live_weights(monkeypatch, mark):
    """The factored estimate with every parameter's weights at sd 0 on one row in three (never
    moved), those weights' ``V`` infinite (the rounding gradients' mark), 0 (no variance) or left
    finite (an influence: the switch must not apply); fp16, bf16 and an integer scheme, 16 draws.
    On against off: frozen counts exact, d_eff within 1e-12, every sum within the derived bound
    (inert) or bitwise (finite); the live-only call used (inert) or not (finite)."""
    model, est = copy.deepcopy(_factored())
    for name in est.names:
        sg = est.sigma[name].clone()
        rows = sg.reshape(sg.shape[0], -1)
        rows[::3] = 0.0
        est.sigma[name] = sg
        if mark != "finite":
            v = est._v_diag[name].clone()
            v.reshape(v.shape[0], -1)[::3] = math.inf if mark == "inf" else 0.0
            est._v_diag[name] = v
    schemes = ["fp16", "bf16", "int8_weight_only"]
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", 0)  # (the large-model regime: main calls kappa-only)
    out, live_calls = joint_pass_on_off(monkeypatch, est, model, schemes, "CAST_LIVE_ONLY", "_cast_live_kappa")
    assert live_calls[False] == 0
    if mark == "finite":
        assert live_calls[True] == 0
    else:
        assert live_calls[True] == 4 * len(est.names)  # (main and pool, two casts, one chunk a parameter)
    f32 = LF.POWER_SUMS_F32_RTOL
    rtol = 2.0 * f32 / (1.0 - f32)
    for (de1, fr1, lay1), (de0, fr0, lay0) in zip(out[True][1], out[False][1]):
        assert fr1 == fr0 and fr1 > 0
        assert math.isclose(de1, de0, rel_tol=1e-12, abs_tol=0.0)
        for k in lay0:
            assert lay1[k][1] == lay0[k][1]
            assert math.isclose(lay1[k][0], lay0[k][0], rel_tol=1e-12, abs_tol=0.0)
    for name in est.names:
        for x, y in zip(out[True][0][name], out[False][0][name]):
            for u, w in ((x.s2, y.s2), (x.s4, y.s4)):
                if mark == "finite":
                    assert torch.equal(u, w)
                else:
                    assert torch.allclose(u, w, rtol=rtol, atol=0.0), float(((u - w).abs() / w.abs()).max())
    qb.release_chunk_facts()


def test_inertness_checked_once_a_chunk(monkeypatch):
    """``assess.INERT_CHECK_ONCE`` (p54c): on the factored estimate with one row in three of every
    parameter at sd 0 and ``V`` infinite, an integer scheme's unit chunks and the casts' live facts
    both ask whether a chunk's sd-0 weights are inert: on, ``_zero_sd_inert`` runs once a chunk (one
    chunk a parameter here), off once per asker; every sum, d_eff and frozen count bitwise."""
    model, est = copy.deepcopy(_factored())
    for name in est.names:
        sg = est.sigma[name].clone()
        sg.reshape(sg.shape[0], -1)[::3] = 0.0
        est.sigma[name] = sg
        v = est._v_diag[name].clone()
        v.reshape(v.shape[0], -1)[::3] = math.inf
        est._v_diag[name] = v
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", 0)  # (the large-model regime: main calls kappa-only)
    out, calls = joint_pass_on_off(monkeypatch, est, model, ["int8_weight_only", "fp16", "bf16"],
                                   "INERT_CHECK_ONCE", "_zero_sd_inert")
    assert calls[True] == len(est.names) and calls[False] == 2 * len(est.names)
    assert out[True][1] == out[False][1]
    for name in est.names:
        for x, y in zip(out[True][0][name], out[False][0][name]):
            assert torch.equal(x.s2, y.s2) and torch.equal(x.s4, y.s4)
    qb.release_chunk_facts()
