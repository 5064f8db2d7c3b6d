"""The backends' exact shortcuts (p47c) against the masks they replace: the float8 codes' NaN test
on their bit patterns (``torchao_backend._float8_has_nan``) and the casts' overflow test from the
weight's extremes (``casts._overflows``), each with its switch on and off; and the torchao copies
that share the float weights ``quantize_`` replaces (``base.SHARE_REPLACED_WEIGHTS``)."""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.quantization import casts
from mis_lightning.quantization import torchao_backend as tb


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("dt", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
def test_float8_nan_from_bits_is_isnan_on_every_pattern(monkeypatch, dt, on):
    monkeypatch.setattr(tb, "FLOAT8_NAN_FROM_BITS", on)
    base = torch.tensor([0x38, 0x00, 0x80, 0x01], dtype=torch.uint8)  # finite patterns of every format
    for i in range(256):
        t = torch.cat([base, torch.tensor([i], dtype=torch.uint8)]).view(dt)
        assert tb._float8_has_nan(t) == bool(torch.isnan(t.to(torch.float32)).any()), (dt, i)
    assert not tb._float8_has_nan(torch.empty(0, dtype=dt))


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("src", [torch.float32, torch.float64])
def test_cast_overflow_from_extremes_is_the_mask(monkeypatch, dt, src, on):
    monkeypatch.setattr(casts, "OVERFLOW_FROM_EXTREMES", on)
    top = torch.finfo(dt).max
    mid = (top + 2.0 ** math.ceil(math.log2(top))) / 2  # the overflow midpoint: ties go to inf
    inf, nan = float("inf"), float("nan")
    ulp = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}[src] * mid
    for v in (1.0, top, -top, mid - ulp, -(mid - ulp), mid, -mid, 2 * mid, inf, -inf, nan):
        w = torch.tensor([0.5, -0.25, v], dtype=src)
        cast = w.to(dt)
        truth = bool((torch.isinf(cast) & torch.isfinite(w)).any())
        assert casts._overflows(w, cast) == truth, (dt, src, v)
    assert not casts._overflows(torch.empty(0, dtype=src), torch.empty(0, dtype=dt))


def _storages(model: torch.nn.Module) -> set[int]:
    out = set()
    for t in list(model.parameters()) + list(model.buffers()):
        try:
            out.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # torchao's wrapper tensors hold no storage
            pass
    return out


@pytest.mark.parametrize("share", [True, False])
def test_torchao_copy_shares_only_what_quantize_replaces(monkeypatch, share):
    """The copy's replaced float weights were the model's storage; what the copy still holds of
    them (a list attribute, a layer ``params=`` leaves out) gets its own values; the model is
    untouched; the grids are those of a deep copy."""
    from mis_lightning import _modelcopy
    from mis_lightning.quantization import base, get_scheme

    made = []

    class Recorded(_modelcopy.SharedWeights):
        def __init__(self, params=()):
            super().__init__(params)
            made.append(self)

    monkeypatch.setattr(base, "SharedWeights", Recorded)
    monkeypatch.setattr(base, "SHARE_REPLACED_WEIGHTS", share)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.keep = [model[0].weight]  # deepcopy maps it to the copy's Parameter: alive after quantize_
    before = {k: v.clone() for k, v in model.state_dict().items()}
    theirs = _storages(model)
    for name, params, copied in (("int8_weight_only", None, 1), ("float8_weight_only", None, 1),
                                 ("intx_weight_only_int4_g32", ["2.weight"], 1)):
        res = get_scheme(name).apply(model, params=params)
        assert len(made[-1].memo) == 0 and made[-1].copied == (copied if share else 0), name
        assert not (_storages(res.model) & theirs), name
        assert torch.equal(res.model.keep[0], model[0].weight)
        assert res.model.keep[0].untyped_storage().data_ptr() not in theirs
        if params is not None:  # layer 0 left in float by params=: the copy's own tensor
            assert type(res.model[0].weight.data) is torch.Tensor
        ref = get_scheme(name)
        monkeypatch.setattr(base, "SHARE_REPLACED_WEIGHTS", False)
        plain = ref.apply(model, params=params)
        monkeypatch.setattr(base, "SHARE_REPLACED_WEIGHTS", share)
        for k, g in res.grids.items():
            assert torch.equal(g.codes if g.codes is not None else g.scale, plain.grids[k].codes
                               if plain.grids[k].codes is not None else plain.grids[k].scale), (name, k)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_shared_weight_written_in_place_is_reported():
    """A backend that writes a shared weight in place would change the user's: release() raises."""
    import copy

    from mis_lightning._modelcopy import SharedWeights

    lin = torch.nn.Linear(3, 2)
    shared = SharedWeights([lin.weight, lin.bias])
    dup = copy.deepcopy(lin, dict(shared.memo))
    assert dup.weight.data_ptr() == lin.weight.data_ptr() and dup.weight is not lin.weight
    with torch.no_grad():
        dup.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="wrote in place"):
        shared.release()
    assert dup.weight.data_ptr() != lin.weight.data_ptr()  # still held: its own values now
    assert torch.equal(dup.weight, lin.weight)


@pytest.mark.parametrize("on", [True, False])
def test_check_finite_from_extremes_is_the_mask(monkeypatch, on):
    from mis_lightning.functional import _checks

    monkeypatch.setattr(_checks, "FINITE_FROM_EXTREMES", on)
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        big = torch.finfo(dt).max
        for v in (1.0, big, -big, -0.0, float("nan"), float("inf"), -float("inf")):
            for where in (0, 37, 99):
                t = torch.rand(100, dtype=torch.float64).to(dt)
                t[where] = v
                finite = bool(torch.isfinite(t).all())
                if finite:
                    _checks.check_finite("x", t)
                else:
                    with pytest.raises(ValueError, match=rf"x contains 1 non-finite value.*index \({where},\)"):
                        _checks.check_finite("x", t)
    _checks.check_finite("x", torch.empty(0))
    _checks.check_finite("x", torch.arange(5))


@pytest.mark.parametrize("on", [True, False])
def test_model_matches_estimate_equal_first(monkeypatch, on):
    """The bitwise-equal shortcut decides as the differences do: equal passes, a change above
    1e-6 of the largest weight raises, NaN (never equal) takes the full test (which passes it)."""
    import importlib
    from types import SimpleNamespace

    assess_mod = importlib.import_module("mis_lightning.assess")
    monkeypatch.setattr(assess_mod, "MATCH_EQUAL_FIRST", on)
    lin = torch.nn.Linear(4, 3)
    est = SimpleNamespace(names=["weight", "bias"],
                          theta={k: v.detach().clone() for k, v in lin.named_parameters()})
    assess_mod._check_model_matches_estimate(est, lin)
    with torch.no_grad():
        lin.weight[1, 2] += 1e-3
    with pytest.raises(ValueError, match="parameter 'weight'"):
        assess_mod._check_model_matches_estimate(est, lin)
    with torch.no_grad():
        lin.weight.copy_(est.theta["weight"])
        lin.bias[0] = float("nan")
    est.theta["bias"][0] = float("nan")
    assess_mod._check_model_matches_estimate(est, lin)


@pytest.mark.parametrize("model_dtype,theta_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                     (torch.bfloat16, torch.float16), (torch.float32, torch.float32)])
def test_model_matches_estimate_equal_first_across_dtypes(monkeypatch, model_dtype, theta_dtype):
    """dup48: the shortcut decides exactly equal values whatever the two dtypes (models up to 1e7
    weights keep theta in float64: it never fired there when it compared dtypes); values that
    differ (by 2^-40, below the full test's 1e-6) and NaN take the full test, as before."""
    import importlib
    from types import SimpleNamespace

    assess_mod = importlib.import_module("mis_lightning.assess")
    monkeypatch.setattr(assess_mod, "MATCH_EQUAL_FIRST", True)
    monkeypatch.setattr(assess_mod, "_CHECK_BLOCK", 7)  # (several blocks)
    full: list[int] = []  # (_max_abs: once per full test)
    real = assess_mod._max_abs
    monkeypatch.setattr(assess_mod, "_max_abs", lambda t: full.append(t.numel()) or real(t))
    # values every dtype here holds exactly (small integers over a power of two), -0.0 against 0.0
    w = (torch.randint(-64, 64, (5, 6), generator=torch.Generator().manual_seed(0)) / 64).to(model_dtype)
    lin = torch.nn.Linear(6, 5, dtype=model_dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.fill_(-0.0)
    est = SimpleNamespace(names=["weight", "bias"],
                          theta={"weight": w.to(theta_dtype).reshape(-1), "bias": torch.zeros(5, dtype=theta_dtype)})
    assess_mod._check_model_matches_estimate(est, lin)
    assert full == []  # the shortcut decided both
    if theta_dtype == torch.float64:
        est.theta["weight"] = est.theta["weight"] + 2.0 ** -40
        assess_mod._check_model_matches_estimate(est, lin)
        assert full == [30]
        est.theta["weight"] = w.to(theta_dtype).reshape(-1)
    full.clear()
    est.theta["bias"] = torch.tensor([float("nan"), 0, 0, 0, 0], dtype=theta_dtype)
    with pytest.raises(ValueError, match="parameter 'bias' holds a NaN weight"):  # NaN on one side only
        assess_mod._check_model_matches_estimate(est, lin)
    with torch.no_grad():
        lin.bias[0] = float("nan")
    assess_mod._check_model_matches_estimate(est, lin)  # NaN in the same place on both sides
    assert full == []  # (NaN: the full test's NaN branch, which compares the rest)


def test_inference_mode_weights_are_copied_not_shared():
    """Weights made under ``torch.inference_mode`` cannot be aliased by ``set_``: deep-copied."""
    from mis_lightning._modelcopy import SharedWeights
    from mis_lightning.quantization import get_scheme

    with torch.inference_mode():
        lin = torch.nn.Linear(64, 8)
    assert SharedWeights([lin.weight]).memo == {}
    res = get_scheme("int8_weight_only").apply(lin)
    assert set(res.grids) == {"weight"}


@pytest.mark.parametrize("via_data", [False, True])
def test_a_subclass_hook_cannot_write_the_users_weights(via_data):
    """rv47: a user's subclass of a built-in torchao scheme whose ``_prepare`` hook scales the
    copy's weights in place (``.data`` writes keep no version counter to catch them by) must not
    reach the model's storage: only the library's own classes share it. Fails with sharing keyed
    on ``_quantize_copy`` alone (the user's weight doubled)."""
    import dataclasses

    from mis_lightning.quantization import get_scheme

    base_cls = type(get_scheme("int8_weight_only"))

    @dataclasses.dataclass(frozen=True)
    class Scaled(base_cls):
        def _prepare(self, modules, notes):
            for m in modules.values():
                with torch.no_grad():
                    (m.weight.data if via_data else m.weight).mul_(2.0)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    w0 = model[0].weight.detach().clone()
    assert tb.TorchAOScheme._replaced_weights(Scaled(), model) == []
    Scaled().apply(model)
    assert torch.equal(model[0].weight, w0)


def test_apply_under_inference_mode_copies_rather_than_shares():
    """rv47: aliases made under ``torch.inference_mode`` keep no version counter: ``apply`` there
    deep-copies (it raised 'Inference tensors do not track version counter')."""
    from mis_lightning.quantization import get_scheme

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        res = get_scheme("int8_weight_only").apply(model)
    assert set(res.grids) == {"0.weight", "2.weight"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_check_finite_on_float8_names_the_value():
    """rv47: ``torch.aminmax`` has no CPU float8 kernel: float8 tensors take the mask (a
    NotImplementedError before, not the ValueError naming the culprit)."""
    from mis_lightning.functional import _checks

    for dt in (torch.float8_e5m2, torch.float8_e4m3fn):
        t = torch.tensor([1.0, float("nan"), 2.0]).to(dt)
        with pytest.raises(ValueError, match=r"x contains 1 non-finite value.*index \(1,\)"):
            _checks.check_finite("x", t)
        _checks.check_finite("x", torch.tensor([1.0, 2.0]).to(dt))


@pytest.mark.parametrize("on", [True, False])
def test_model_weight_turned_nan_after_the_estimation_is_refused(monkeypatch, on):
    """dup48 found: a weight that turned NaN after the estimation passed the check (its difference
    NaN, and ``nan > tol`` is False): it now raises naming the parameter; NaN in the same places
    in both still passes, and a change elsewhere beside such a NaN still raises."""
    import importlib
    from types import SimpleNamespace

    assess_mod = importlib.import_module("mis_lightning.assess")
    monkeypatch.setattr(assess_mod, "MATCH_EQUAL_FIRST", on)
    lin = torch.nn.Linear(4, 3)
    est = SimpleNamespace(names=["weight", "bias"],
                          theta={k: v.detach().clone().double() for k, v in lin.named_parameters()})
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="parameter 'weight' holds a NaN weight"):
        assess_mod._check_model_matches_estimate(est, lin)
    est.theta["weight"][0, 0] = float("nan")  # the same NaN in both: as before, passes
    assess_mod._check_model_matches_estimate(est, lin)
    with torch.no_grad():
        lin.weight[2, 3] += 1e-2
    with pytest.raises(ValueError, match="weights differ from those the estimate was computed from"):
        assess_mod._check_model_matches_estimate(est, lin)
