"""The assessment ignores an autocast region it is called in (nu43), and a reduced float32 matmul
precision the caller set (lead50, rv50's finding): mis_lightning/_precision.py.

``precision="bf16-mixed"`` runs ``validation_step`` under ``torch.autocast`` (a ``MISIndicator``
updated there, the documented idiom), and a user may call ``assess`` inside one: the float32
per-sample passes of the diagonal estimator and the quantized copies' utilities then ran in
bfloat16 (an 11,619-weight MLP: int8 leakage 0.872 instead of 0.636). Each check compares
figures computed inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` with the same call
outside it: they must be equal to float32 summation order (1e-6 relative: the same ops on the
same inputs in one process are bitwise equal; bfloat16 has 8 mantissa bits, ~4e-3 relative per
product, which the old tree showed here as 1e-3 .. 1e-1 differences).

``torch.set_float32_matmul_precision("medium")`` (Lightning's hint on tensor-core GPUs) runs
float32 matmuls in bfloat16 on CPUs with AMX / AVX512-BF16 (this project's machine) and TF32 on
CUDA: the float32 power sums' run-time bound (1e-4 relative at p = 2) read 7.6e-4 off before.
The checks read the backends' precision inside the power sums' GEMMs, so they fail without the
fix on any CPU, not only on one with bfloat16 GEMMs.
"""

from __future__ import annotations

import torch
from _nets import mse_per_record, trained_relu_mlp
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning._precision import autocast_off, ieee_float32
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


def _spy_matmul_precision(monkeypatch) -> list[tuple[str, str]]:
    """The matmul backends' float32 precision (mkldnn, CUDA) each float32 power-sum GEMM pass
    runs under: on any machine, whether or not its "medium" reaches bfloat16 / TF32 hardware."""
    import mis_lightning.estimation.linear_factors as lf

    seen: list[tuple[str, str]] = []
    inner = lf._even_power_sums_f32

    def spy(*args, **kwargs):
        seen.append((torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return inner(*args, **kwargs)

    monkeypatch.setattr(lf, "_even_power_sums_f32", spy)
    return seen


def test_ieee_float32_restores_the_callers_precision():
    torch.set_float32_matmul_precision("medium")
    try:
        before = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
        with ieee_float32():
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            a = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
            err = float((a @ a.T - a.double() @ a.double().T).abs().max())
            assert err < 1e-3, err  # IEEE float32: ~1e-5 here; bfloat16 ~0.2
        assert (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_power_sums_keep_their_bound_under_a_reduced_matmul_precision(monkeypatch):
    """The float32 path's sums against the float64 path's within the stated run-time bound
    (POWER_SUMS_F32_RTOL at p = 2, _FOURTH at p = 4) with the caller at "medium", their GEMMs run
    in IEEE float32 (the bound's premise; on a CPU without bfloat16 GEMMs the sums alone could
    not tell)."""
    import mis_lightning.estimation.linear_factors as lf

    seen = _spy_matmul_precision(monkeypatch)
    g = torch.Generator().manual_seed(5)
    R, out_f, in_f = 64, 64, 128
    x = torch.randn(R, in_f, generator=g, dtype=torch.float64) + 0.3
    d = torch.randn(R, out_f, generator=g, dtype=torch.float64)
    fac = lf.LinearFactors(module="lin", weight="w", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    gm, v = gr.mean(0), gr.var(0, unbiased=False) + 0.1
    A = torch.ones(gm.numel(), 1, dtype=torch.float64)
    saved = lf.POWER_SUMS_F32
    lf.POWER_SUMS_F32 = frozenset()
    try:
        ref = {p: lf.factored_power_sums(fac, gm, v, A, p) for p in (2, 4)}
    finally:
        lf.POWER_SUMS_F32 = saved
    torch.set_float32_matmul_precision("medium")
    try:
        for p, tol in ((2, lf.POWER_SUMS_F32_RTOL), (4, lf.POWER_SUMS_F32_RTOL_FOURTH)):
            before = dict(lf.POWER_SUMS_F32_COUNTS)
            got = lf.factored_power_sums(fac, gm, v, A, p)
            assert lf.POWER_SUMS_F32_COUNTS != before  # the float32 path ran
            rel = float(((got - ref[p]).abs() / ref[p].abs()).max())
            assert rel <= tol, (p, rel)  # main: 7.6e-4 at p = 2 on an AMX CPU
    finally:
        torch.set_float32_matmul_precision("highest")
    assert seen and set(seen) == {("ieee", "ieee")}, seen  # main: ("bf16", "tf32")


def test_a_report_under_medium_precision_equals_the_highest_one(monkeypatch):
    """score_schemes on one estimate with the caller at "medium" and at "highest": the same
    figures bit for bit (the entry point runs IEEE float32 either way; main moved leakage by
    up to 3.2e-5 and clt_error_estimate 4.6e-3 relative on this model)."""
    import importlib

    from test_scoring_pass import SCHEMES, _estimate

    from mis_lightning.config import stage_configs

    A = importlib.import_module("mis_lightning.assess")
    seen = _spy_matmul_precision(monkeypatch)
    model, est = _estimate("factored")
    _, sc, _ = stage_configs("assess", None, None, {})
    out = []
    for prec in ("highest", "medium"):
        torch.set_float32_matmul_precision(prec)
        try:
            r = A.score_schemes(est, model, SCHEMES, scoring_config=sc)
        finally:
            torch.set_float32_matmul_precision("highest")
        out.append({(n, f): getattr(s, f) for n, s in r.schemes.items()
                     for f in ("leakage", "d_eff", "clt_error_estimate")})
    assert out[0] == out[1]
    assert seen and set(seen) == {("ieee", "ieee")}, seen  # every call, "medium" included
