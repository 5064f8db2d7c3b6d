"""Memory held per weight (issue 13: "memory bounded by a chunk size plus O(d) float32 state").

Above ``FLOAT32_STATE_MIN_PARAMS`` weights (without stored influences) the estimate holds
theta, sigma, the gradient means and variances in float32 and computes them chunk by chunk;
the threshold is lowered here so that a small model takes that path.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from _nets import trained_relu_mlp  # tests/_nets.py
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.config import stage_configs
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.base import revealed_by_scale

A = importlib.import_module("mis_lightning.assess")
E = importlib.import_module("mis_lightning.estimation.estimate")

SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32", "rtn_int2"]


def _model_and_loader():
    model, x, y = trained_relu_mlp()
    return model, DataLoader(TensorDataset(x, y), batch_size=128)


def _estimate(model, loader, recomputed: bool = False):
    # budget 1000: the [R, d] influences are not stored (the large-model path)
    est_cfg, _, _ = stage_configs("assess", None, None, {"estimation": "diagonal", "num_records": 64,
                                                        "hessian": "ggn", "budget": 1000})
    est = A.run_estimation(model, loader, lambda o, t: (o[:, 0] - t) ** 2, est_cfg)
    if recomputed:
        est.factors = None  # influences recomputed per record block (no layer factors)
    return est


def _per_weight_bytes(est, prepared) -> float:
    """Bytes per assessed weight of the tensors of size ``numel`` that the estimate and the
    prepared schemes hold (everything that grows with the model)."""
    total = 0
    stores = [est.theta, est.sigma, est._g_mean or {}, est._v_diag or {}]
    for prep in prepared:
        stores += [prep.kappa, prep.m4, prep.kappa_pool, prep.lam, prep.lam_pool]
        stores += [{k: t for k, v in prep.draws.items() for t in v}]
        for g in prep.grids.values():
            stores.append({k: t for k in ("dequantized", "codes", "revealed")
                           if isinstance(t := getattr(g, k), torch.Tensor)})
    for st in stores:
        for t in st.values():
            if t.numel() >= 24:  # per weight, not per row or block
                total += t.numel() * t.element_size()
    return total / est.d


@pytest.mark.parametrize("recomputed", [False, True], ids=["factored", "recomputed"])
def test_float32_state_changes_leakage_below_1e_6(monkeypatch, recomputed):
    """Every figure of 4 schemes (16 bootstrap draws) from the float32 estimate agrees with the
    float64 one to 1e-6 relative: sigma, g_bar and V_jj are rounded by at most 2^-24 relative
    (6e-8; theta is exact) and all sums stay float64, so the leakage moves by ~1e-7 at most."""
    model, loader = _model_and_loader()
    ref = _estimate(model, loader, recomputed)
    monkeypatch.setattr(E, "FLOAT32_STATE_MIN_PARAMS", 0)
    monkeypatch.setattr(E, "FINALIZE_CHUNK", 500)  # several chunks: the cross-chunk reductions
    lean = _estimate(model, loader, recomputed)
    assert lean.diagnostics.get("state_dtype") == "float32"
    for k in ref.names:
        assert lean.sigma[k].dtype == lean._g_mean[k].dtype == lean._v_diag[k].dtype == torch.float32
        # theta: the estimator's own weights, exactly (float32 for large models, float64 here)
        assert torch.equal(lean.theta[k].double(), ref.theta[k])
        torch.testing.assert_close(lean.sigma[k].double(), ref.sigma[k], rtol=1e-7, atol=0)
        torch.testing.assert_close(lean._v_diag[k].double(), ref._v_diag[k], rtol=1e-7, atol=0)
    for key in ("gradient_norm", "minimum_offset_sd", "hessian_min_diagonal", "hessian_max_diagonal"):
        assert lean.diagnostics[key] == pytest.approx(ref.diagnostics[key], rel=1e-9)
    for key in ("zero_gradient_variance", "nonpositive_hessian_diagonal", "not_at_minimum"):
        assert lean.diagnostics[key] == ref.diagnostics[key]
    r0 = A.score_schemes(ref, model, SCHEMES, uncertainty_draws=16)
    r1 = A.score_schemes(lean, model, SCHEMES, uncertainty_draws=16)
    assert r1.baseline_leakage == pytest.approx(r0.baseline_leakage, rel=1e-6)
    for s in SCHEMES:
        a, b = r0.schemes[s], r1.schemes[s]
        assert a.error is None and b.error is None
        assert b.leakage == pytest.approx(a.leakage, rel=1e-6), s
        assert b.pool_leakage == pytest.approx(a.pool_leakage, rel=1e-6), s
        assert b.d_eff == pytest.approx(a.d_eff, rel=1e-6), s
        assert b.interval is not None and a.interval is not None
        assert b.interval == pytest.approx(a.interval, rel=1e-6), s


def test_per_weight_state_bounded_after_joint_sums(monkeypatch):
    """After the joint pass of 4 schemes, what grows with the model is the float32 estimate
    (sigma, g_bar, V_jj: 12 bytes per weight, and theta in the estimator's dtype) and each scheme's int8 codes and revealed
    mask (2 bytes per weight): no float64 copy of size numel, per scheme or otherwise (the
    estimate alone held 32 bytes per weight in float64 before)."""
    model, loader = _model_and_loader()
    monkeypatch.setattr(E, "FLOAT32_STATE_MIN_PARAMS", 0)
    est = _estimate(model, loader)
    prepared = [A._prepare_scheme(est, model, get_scheme(s), 16) for s in SCHEMES]
    col = 1
    for p in prepared:
        p.column = col
        col += 2 + p.num_draws
    A._joint_sums(est, prepared, 256, 0, keep_moments=False)
    for prep in prepared:
        assert prep.qmodel is not None  # _prepare_scheme's copy: score_schemes drops it after the utility
        prep.qmodel = None
        assert not (prep.kappa or prep.m4 or prep.kappa_pool or prep.draws), prep.scheme.name
        for g in prep.grids.values():
            assert g.dequantized.numel() == 0
            assert g.codes is None or g.codes.element_size() == 1, (prep.scheme.name, g.codes.dtype)
    # theta is the estimator's weights (float64 for this small model, float32 for large ones)
    theta_bytes = est.theta[est.names[0]].element_size()
    assert _per_weight_bytes(est, prepared) <= theta_bytes + 12 + 2 * len(SCHEMES)


def test_revealed_by_scale_in_the_weights_dtype_is_exact():
    """The revealed mask is computed in the weights' own dtype (no float64 copy of the tensor):
    |w|, max and == are exact there, so it equals the float64 computation."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 70, generator=g)
    w[3, :32] = 0.0  # an all-zero block reveals nothing
    w[5, 7] = -w[5, :32].abs().max()  # a tie in magnitude
    for block, rule in (((1, 70), "absmax"), ((1, 32), "absmax"), ((1, 32), "minmax"), ((37, 70), "minmax")):
        ref = revealed_by_scale(w.double(), block, rule)
        assert torch.equal(revealed_by_scale(w, block, rule), ref), (block, rule)
        assert torch.equal(revealed_by_scale(w.to(torch.bfloat16), block, rule),
                           revealed_by_scale(w.to(torch.bfloat16).double(), block, rule))
    assert math.isfinite(float(w.sum()))
