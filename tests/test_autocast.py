"""The assessment ignores an autocast region it is called in (nu43; mis_lightning/_autocast.py).

``precision="bf16-mixed"`` runs ``validation_step`` under ``torch.autocast`` (a ``MISIndicator``
updated there, the documented idiom), and a user may call ``assess`` inside one: the float32
per-sample passes of the diagonal estimator and the quantized copies' utilities then ran in
bfloat16 (an 11,619-weight MLP: int8 leakage 0.872 instead of 0.636). Each check compares
figures computed inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` with the same call
outside it: they must be equal to float32 summation order (1e-6 relative: the same ops on the
same inputs in one process are bitwise equal; bfloat16 has 8 mantissa bits, ~4e-3 relative per
product, which the old tree showed here as 1e-3 .. 1e-1 differences).
"""

from __future__ import annotations

import torch
from _nets import mse_per_record, trained_relu_mlp
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning._autocast import autocast_off
from mis_lightning.estimation import estimate
from mis_lightning.estimation.estimate import FAST_FLOAT64_MAX_PARAMS
from mis_lightning.evaluation import evaluate_utility

RTOL = 1e-6


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()))


def test_float32_estimation_pass_and_utility_ignore_autocast():
    model, x, y = trained_relu_mlp(steps=20)
    loader = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=64)
    kw = dict(mode="diagonal", dtype=torch.float32, num_records=16)
    ref = estimate(model, loader, mse_per_record, **kw)
    with _bf16():
        got = estimate(model, loader, mse_per_record, **kw)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is left as it was
    for k in ref.sigma:
        _close(got.sigma[k], ref.sigma[k])
    u_ref = evaluate_utility(model, loader, mse_per_record)
    with _bf16():
        u_got = evaluate_utility(model, loader, mse_per_record)
    assert abs(u_got["loss"] - u_ref["loss"]) <= RTOL * u_ref["loss"], (u_got, u_ref)


def test_metric_update_inside_autocast_equals_outside():
    from mis_lightning import MISIndicator

    # above estimate.FAST_FLOAT64_MAX_PARAMS (10,000) weights: the float32 per-layer passes
    model, x, y = trained_relu_mlp(inputs=420, hidden=24, steps=20)
    assert sum(p.numel() for p in model.parameters()) > FAST_FLOAT64_MAX_PARAMS
    out = []
    for region in (autocast_off, _bf16):
        m = MISIndicator(model, mse_per_record, ["rtn_int4"], estimation="diagonal", num_records=16,
                         num_training_records=128, uncertainty_draws=0)
        with region():
            for i in range(0, 128, 64):
                m.update(x[i:i + 64], y[i:i + 64])
        out.append(float(m.compute()["rtn_int4"]["leakage"]))
    assert abs(out[1] - out[0]) <= RTOL * abs(out[0]), out


def test_autocast_off_restores_the_region():
    with _bf16():
        with autocast_off():
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
    with autocast_off():  # nothing on: a no-op
        assert not torch.is_autocast_enabled("cpu")
