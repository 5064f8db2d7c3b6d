"""One validated config per stage (issue 10 item 2): EstimationConfig / ScoringConfig, taken
by every front end; the old keyword arguments build them, with the same numbers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.config import (
    EstimationConfig,
    ScoringConfig,
    compile_policy_from_env,
    stage_configs,
)


def mse(o, t):
    return 0.5 * (o.squeeze(-1) - t) ** 2


def _problem():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 3, generator=g)
    y = X @ torch.tensor([0.5, -1.0, 0.25]) + 0.3 * torch.randn(200, generator=g)
    Xt = torch.cat([X.double(), torch.ones(200, 1, dtype=torch.float64)], 1)
    beta = torch.linalg.solve(Xt.T @ Xt, Xt.T @ y.double())
    m = nn.Linear(3, 1)
    with torch.no_grad():
        m.weight.copy_(beta[:-1][None])
        m.bias.copy_(beta[-1:])
    return m, DataLoader(TensorDataset(X, y), batch_size=50), X, y


@pytest.mark.parametrize("cls,kw,msg", [
    (EstimationConfig, {"mode": "nope"}, "estimation (mode) must be 'auto', 'exact' or 'diagonal', got 'nope'"),
    (EstimationConfig, {"hessian": "x"}, "hessian must be 'auto', 'exact', 'ggn', 'ggn_mc', 'hutchinson' or 'ggn_residual', got 'x'"),
    (EstimationConfig, {"num_records": 0}, "num_records must be an integer >= 1, got 0"),
    (EstimationConfig, {"weight_decay": -1.0}, "weight_decay must be None, a number >= 0 or a mapping {parameter name: number}, got -1.0"),
    (EstimationConfig, {"budget": 0}, "budget must be None or an integer >= 1, got 0"),
    (ScoringConfig, {"method": "bogus"}, "method must be 'auto', 'mc', 'clt' or 'exact1d', got 'bogus'"),
    (ScoringConfig, {"uncertainty_draws": -1}, "uncertainty_draws must be an integer >= 0, got -1"),
    (ScoringConfig, {"mc_draws": 0}, "mc_draws must be None or an integer >= 1, got 0"),
    (ScoringConfig, {"chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
    (ScoringConfig, {"compile": "sometimes"}, "compile must be 'auto', 'always' or 'never', got 'sometimes'"),
    # nu41: bool() coercion read strict="no" as True (a raising run the user had turned off)
    (ScoringConfig, {"strict": "no"}, "strict must be True or False, got 'no'"),
    (ScoringConfig, {"strict": None}, "strict must be True or False, got None"),
    (EstimationConfig, {"use_factors": "false"}, "use_factors must be True or False, got 'false'"),
])
def test_invalid_options_name_the_option(cls, kw, msg):
    with pytest.raises(ValueError) as info:
        cls(**kw)
    assert str(info.value) == msg


def test_configs_are_frozen_and_normalise_hydra_lists():
    cfg = EstimationConfig(params=["weight"], weight_decay=1)
    assert cfg.params == ("weight",) and cfg.weight_decay == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_records = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="params must be a list"):
        EstimationConfig(params="weight")


def test_compile_policy_is_read_once_from_the_environment(monkeypatch):
    for env, want in (("1", "always"), ("auto", "auto"), ("0", "never")):
        monkeypatch.setenv("MIS_LIGHTNING_COMPILE", env)
        assert compile_policy_from_env() == want and ScoringConfig().compile == want


def test_keywords_build_the_configs_and_old_names_are_aliases():
    est, sc, rest = stage_configs("f", None, None, {"estimation": "exact", "num_records": 7,
                                                     "method": "clt", "process_group": None},
                                  defaults={"strict": False})
    assert (est.mode, est.num_records, sc.method, sc.strict) == ("exact", 7, "clt", False)
    assert rest == {"process_group": None}
    with pytest.warns(DeprecationWarning, match="num_samples= is deprecated, use mc_draws="):
        _, sc, _ = stage_configs("f", None, None, {"num_samples": 2048})
    assert sc.mc_draws == 2048
    with pytest.raises(TypeError, match="give mode= or estimation=, not both"):
        stage_configs("f", None, None, {"estimation": "exact", "mode": "diagonal"})
    # keywords override the fields of a given config
    est, _, _ = stage_configs("f", EstimationConfig(num_records=9, hessian="ggn"), None, {"num_records": 5})
    assert (est.num_records, est.hessian) == (5, "ggn")


def test_assess_with_configs_equals_assess_with_keywords():
    """Same numbers, bit for bit, whichever way the options are given (and via the Metric)."""
    m, dl, X, y = _problem()
    kw = {"estimation": "exact", "num_records": 64, "uncertainty_draws": 4, "seed": 5}
    a = ml.assess(m, ["rtn_int4", "rtn_int2"], dl, mse, **kw)
    b = ml.assess(m, ["rtn_int4", "rtn_int2"], dl, mse,
                  estimation_config=EstimationConfig(mode="exact", num_records=64),
                  scoring_config=ScoringConfig(uncertainty_draws=4, seed=5))
    assert a.to_json() == b.to_json()
    metric = ml.MISIndicator(m, mse, ["rtn_int4", "rtn_int2"], strict=True,
                             estimation_config=EstimationConfig(mode="exact", num_records=64),
                             scoring_config=ScoringConfig(uncertainty_draws=4, seed=5))
    metric.update(X, y)
    out = metric.compute()
    for k in ("rtn_int4", "rtn_int2"):
        assert float(out[k]["leakage"]) == pytest.approx(a.schemes[k].leakage, rel=1e-12)


def test_another_front_ends_keyword_is_named_with_this_ones():
    """nux49: ``assess(utility_metrics=...)`` (the callback's keyword) suggested utility_mode /
    utility_key; the hint names assess's own ``metrics=``, and the callback's the other way."""
    m, dl, _, _ = _problem()
    with pytest.raises(TypeError, match=r"\('utility_metrics': assess\(\) takes it as metrics=\)"):
        ml.assess(m, ["rtn_int8"], dl, mse, utility_metrics={})
    with pytest.raises(TypeError, match=r"\('utility_metrics': plan\(\) takes it as metrics=\)"):
        ml.plan(m, ["rtn_int8"], dl, mse, utility_metrics={})
    with pytest.raises(TypeError, match=r"\('metrics': MISCallback\(\) takes it as utility_metrics=\)"):
        ml.MISCallback(["rtn_int8"], metrics={})


def test_unknown_keywords_raise_and_score_is_a_deprecated_alias():
    m, dl, _, _ = _problem()
    with pytest.raises(TypeError, match=r"assess\(\) got unexpected keyword argument\(s\) \['num_record'\] "
                                        r"\('num_record': did you mean 'num_records'\?\)"):
        ml.assess(m, ["rtn_int8"], dl, mse, num_record=3)
    with pytest.raises(TypeError, match=r"MISCallback\(\) got unexpected keyword argument\(s\) \['bogus'\]: "):
        ml.MISCallback(["rtn_int8"], bogus=1)
    with pytest.raises(TypeError, match=r"'every_n_val_epoch': did you mean 'every_n_val_epochs'\?"):
        ml.MISCallback(["rtn_int8"], every_n_val_epoch=1)
    est = ml.estimation.estimate(m, dl, mse)
    with pytest.warns(DeprecationWarning, match="score is deprecated, use score_schemes"):
        old = ml.score(est, m, ["rtn_int8"], uncertainty_draws=0)
    new = ml.score_schemes(est, m, ["rtn_int8"], uncertainty_draws=0)
    assert old.schemes["rtn_int8"].leakage == new.schemes["rtn_int8"].leakage
    with pytest.raises(TypeError, match=r"score_schemes\(\) got unexpected keyword argument\(s\) \['num_records'\]"):
        ml.score_schemes(est, m, ["rtn_int8"], num_records=3)
    # the Metric: a config field and a torchmetrics option, misspelled, before any update
    with pytest.raises(TypeError, match=r"MISIndicator\(\) got unexpected keyword argument\(s\) \['num_record'\] "
                                        r"\('num_record': did you mean 'num_records'\?\)"):
        ml.MISIndicator(m, mse, ["rtn_int8"], num_record=3)
    with pytest.raises(TypeError, match=r"'sync_on_compte': did you mean 'sync_on_compute'"):
        ml.MISIndicator(m, mse, ["rtn_int8"], sync_on_compte=False)
    ml.MISIndicator(m, mse, ["rtn_int8"], sync_on_compute=False)  # a real torchmetrics option passes
    # a module path or a misspelled parameter name: its parameters / the closest names
    with pytest.raises(KeyError, match=r"'weigth': did you mean 'weight'\?"):
        ml.assess(m, ["rtn_int8"], dl, mse, params=["weigth"])
    seq = nn.Sequential(nn.Linear(3, 1))
    with pytest.raises(KeyError, match=r"'0': did you mean '0.weight' or '0.bias'\?"):
        ml.assess(seq, ["rtn_int8"], dl, mse, params=["0"])


@pytest.mark.parametrize("build, match", [
    (lambda: EstimationConfig(estimation="exact"),
     r"EstimationConfig\(\) got unexpected keyword argument\(s\) \['estimation'\] \('estimation': the field is 'mode' "
     r"\(the front ends' keyword estimation= sets it; here EstimationConfig\(mode=\.\.\.\)\)\): its fields are \["),
    (lambda: ScoringConfig(num_samples=64), r"'num_samples': the field is 'mc_draws'"),
    (lambda: ScoringConfig(methd="mc"), r"ScoringConfig\(\) .*\['methd'\] \('methd': did you mean 'method'\?\)"),
    (lambda: ml.PlanConfig(target_mis_=0.1), r"PlanConfig\(\) .*\['target_mis_'\] \('target_mis_': did you mean 'target_mis'\?\)"),
    (lambda: ml.quantization.rtn.RoundToNearestInt(bit=4), r"RoundToNearestInt\(\) .*'bit': did you mean 'bits'\?.*\['bits', 'filter_fn'\]"),
    (lambda: ml.quantization.native.NativeInt8Dynamic(granularty="per_row"), r"NativeInt8Dynamic\(\) .*did you mean 'granularity'"),
])
def test_a_misnamed_config_field_names_it_and_the_field_meant(build, match):
    """Every public option dataclass took a dataclass's bare "__init__() got an unexpected keyword
    argument 'estimation'" (nu42a), naming neither the field meant nor the others. One check
    (mis_lightning._fields.CheckedFields) now names the keyword, the field (the front ends' alias
    estimation= -> mode, num_samples= -> mc_draws) or the closest ones, and every field."""
    with pytest.raises(TypeError, match=match):
        build()


def test_checked_configs_still_copy_pickle_and_replace():
    import copy
    import pickle

    e = EstimationConfig(mode="exact", num_records=8)
    assert copy.deepcopy(e) == e == pickle.loads(pickle.dumps(e))
    assert dataclasses.replace(e, mode="diagonal").mode == "diagonal"
    r = ml.quantization.rtn.RoundToNearestInt(4)  # positional fields pass as before
    assert copy.deepcopy(r) == r == pickle.loads(pickle.dumps(r)) and r.name == "rtn_int4"
    with pytest.raises(TypeError, match=r"'mod': did you mean 'mode'"):
        dataclasses.replace(e, mod="x")


def test_one_progress_hook_reports_estimation_and_schemes():
    m, dl, _, _ = _problem()
    seen: list[tuple[str, int]] = []
    ml.assess(m, ["rtn_int8", "rtn_int4"], dl, mse, uncertainty_draws=0,
              progress=lambda stage, k: seen.append((stage, k)))
    assert [k for s, k in seen if s == "estimation"] == [50, 100, 150, 200]
    assert [k for s, k in seen if s == "schemes"] == [1, 2]


def test_callback_takes_the_configs_and_keeps_its_defaults():
    cb = ml.MISCallback(["rtn_int8"], num_records=32)
    assert cb.estimation_config.weight_decay is None  # the module's, as before
    assert cb.scoring_config.strict is False and cb.estimation_config.num_records == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ml.MISCallback(["rtn_int8"], scoring_config=ScoringConfig(method="clt"))


def test_callback_refuses_uncallable_hooks_when_built_naming_them():
    """nu41: batch_fn=3 was accepted and failed at the first batch as "'int' object is not
    callable", without naming the argument; now the constructor names it (and output_transform)."""
    with pytest.raises(TypeError, match=r"^batch_fn must be callable: batch_fn\(batch\) -> \(inputs, targets\), got int$"):
        ml.MISCallback(["rtn_int8"], loss_fn=mse, batch_fn=3)
    with pytest.raises(TypeError, match=r"^output_transform must be callable: .*, got str$"):
        ml.MISCallback(["rtn_int8"], loss_fn=mse, output_transform="argmax")
    assert ml.MISCallback(["rtn_int8"], strict=True).scoring_config.strict is True


def test_metric_refuses_uncallable_loss_and_batch_fn_when_built():
    """nu41: MISIndicator(..., batch_fn=3) was accepted and failed at the first update."""
    m = nn.Linear(3, 1)
    with pytest.raises(TypeError, match=r"^batch_fn must be callable: .*, got int$"):
        ml.MISIndicator(m, mse, ["rtn_int8"], batch_fn=3)
    with pytest.raises(TypeError, match=r"^loss_fn must be callable: .*, got str$"):
        ml.MISIndicator(m, "mse", ["rtn_int8"])


def test_assess_refuses_uncallable_user_functions_naming_them():
    """nu41: assess(..., batch_fn=3) / a loss given as a string failed in the estimation pass as
    "'int' object is not callable"."""
    m, loader, _, _ = _problem()
    with pytest.raises(TypeError, match=r"^batch_fn must be callable: .*, got int$"):
        ml.assess(m, ["rtn_int8"], loader, mse, batch_fn=3)
    with pytest.raises(TypeError, match=r"^loss_fn must be callable: .*, got str$"):
        ml.assess(m, ["rtn_int8"], loader, "mse")
    with pytest.raises(TypeError, match=r"^output_transform must be callable: .*, got int$"):
        ml.assess(m, ["rtn_int8"], loader, mse, val_dataloader=loader, output_transform=1)


def test_the_documented_default_schemes_are_the_defaults():
    """docs/lightning.md's ``schemes`` row names the defaults (nu41: it said
    ``int*_weight_only``, while the int4 / int2 defaults are the group-32 variants that leave
    narrow layers in float)."""
    from pathlib import Path

    from mis_lightning.streaming import default_schemes

    doc = (Path(__file__).resolve().parents[1] / "docs" / "lightning.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `schemes` |"))
    default_cell = row.split(" | ")[1]
    assert all(f"`{name}`" in default_cell for name in default_schemes()), (default_schemes(), default_cell)
