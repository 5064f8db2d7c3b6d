"""Memory of the estimation's and scoring's stages per weight (issue 13: "memory bounded by a
chunk size plus O(d) float32 state"; docs/benchmarks.md, mm32).

The figures are the peak bytes of the tensors the library allocates during a stage
(``tests/_live_bytes.py``), per assessed weight, on small models whose layers are many and
narrow, so that per-layer temporaries (bounded by the widest layer, not by the model) weigh
little and a whole-model copy shows as 4 (float32) or 8 (float64) bytes per weight.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from _live_bytes import LiveBytes  # tests/_live_bytes.py
from _nets import mse_per_record
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.config import stage_configs

A = importlib.import_module("mis_lightning.assess")
E = importlib.import_module("mis_lightning.estimation.estimate")


def _deep_mlp(width: int = 32, layers: int = 40, n: int = 256):
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(16, width), nn.ReLU()]
    for _ in range(layers - 2):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods.append(nn.Linear(width, 1))
    model = nn.Sequential(*mods)
    x = torch.randn(n, 16)
    y = x[:, 0] + 0.3 * torch.randn(n)
    return model, DataLoader(TensorDataset(x, y), batch_size=64)


def test_kfac_sigma_correction_keeps_no_float64_copy_of_the_corrected_weights(monkeypatch):
    """The large-model path (float32 state) of the K-FAC sigma correction: each layer's factor is
    applied as the layer is done, and the VIFs the diagnostics read are kept in float32. Before
    (mm32), ``_kfac_factors`` returned every corrected weight's sqrt(VIF) in float64 and kept two
    more float64 copies for the diagnostics (~24-32 bytes per corrected weight at its peak).
    Bound: the float32 VIF buffer (4 bytes per weight) plus one layer's float64 temporaries
    (a few arrays of the widest layer: 2,352 of 21,937 weights here, ~1 byte per model weight
    each), 8 bytes per weight in all."""
    model, loader = _deep_mlp()
    monkeypatch.setattr(E, "FLOAT32_STATE_MIN_PARAMS", 0)
    est_cfg, _, _ = stage_configs("assess", None, None, {"estimation": "diagonal", "num_records": 32,
                                                        "hessian": "ggn", "budget": 1000})
    peaks: list[int] = []
    original = E.MomentAccumulator._kfac_factors

    def measured(self, *a, **k):
        with LiveBytes() as lb:
            out = original(self, *a, **k)
        peaks.append(lb.peak)
        return out

    monkeypatch.setattr(E.MomentAccumulator, "_kfac_factors", measured)
    est = A.run_estimation(model, loader, mse_per_record, est_cfg)
    assert est.diagnostics["state_dtype"] == "float32"
    corrected = est.diagnostics["kfac_corrected_weights"]
    assert est.diagnostics["kfac_correction"] and corrected == est.d
    assert peaks and max(peaks) / corrected <= 8.0, max(peaks) / corrected


def test_model_check_before_scoring_holds_no_float64_copy_of_a_weight(monkeypatch):
    """``score_schemes`` first checks that the model's weights are the estimate's (1e-6 of the
    largest): before (mm32) each parameter and its estimate's copy went to float64 whole, with
    their difference and its absolute value (32 bytes per weight of the largest tensor: 2 GiB at
    the 1e8 benchmark's 8192 x 8192 layer). Now block by block: bound 1 byte per weight with
    blocks of 2^14 elements (a few float64 blocks: 0.4 bytes per weight here). The check still
    tells a changed weight from an unchanged one, in float32 and in float64 state."""
    monkeypatch.setattr(A, "_CHECK_BLOCK", 1 << 14, raising=False)
    torch.manual_seed(0)
    model = nn.Linear(1000, 1000)
    for dtype in (torch.float32, torch.float64):
        est = SimpleNamespace(names=["weight", "bias"],
                              theta={k: p.detach().reshape(-1).to(dtype).clone() for k, p in model.named_parameters()})
        with LiveBytes() as lb:
            A._check_model_matches_estimate(est, model)
        assert lb.peak / model.weight.numel() <= 1.0, lb.peak / model.weight.numel()
        est.theta["weight"][777_777] += 1e-3
        with pytest.raises(ValueError, match="parameter 'weight'"):
            A._check_model_matches_estimate(est, model)


def test_order_statistics_in_place_are_torchs_median_and_quantile():
    """The large-model K-FAC diagnostics' median and 90th percentile, taken by an in-place
    partition (no copy), equal ``Tensor.median`` (the lower middle value) and ``Tensor.quantile``
    (linear interpolation) up to float64 rounding of the interpolation (1e-12 relative)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 10, 11, 1000, 1001):
        v = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 1
        want = (float(v.median()), float(v.quantile(0.9)))
        got = E._order_statistics_in_place(v.clone())
        assert got[0] == want[0], n
        assert got[1] == pytest.approx(want[1], rel=1e-12, abs=0), n


def test_curvature_floor_reference_is_the_kth_value_without_a_second_copy():
    """The sigma floor's reference quantile (``_curvature_ratio_reference``) by an in-place
    partition of its one filtered copy: the same order statistic as ``Tensor.kthvalue`` (which
    copied the 1e8 estimate's ratios again with int64 indices, 12 bytes per weight), exactly,
    with NaN ignored and the negative ratios' magnitudes where none is positive."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000, 4097):
        for sign in (1.0, -1.0):
            r = sign * torch.rand(n, generator=g) * 10 ** torch.randint(-20, 20, (n,), generator=g).float()
            r[:: 5] = float("nan")
            pos = r[r > 0]
            ref = pos if pos.numel() else r[r < 0].abs()
            want = float(ref.kthvalue(1 + int(E.CURVATURE_RATIO_QUANTILE * (ref.numel() - 1))).values) \
                if ref.numel() else 0.0
            before = r.clone()
            assert E._curvature_ratio_reference(r) == want, (n, sign)
            assert torch.equal(r.nan_to_num(-7.0), before.nan_to_num(-7.0))  # the input is not reordered
