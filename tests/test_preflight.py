"""fu31: misconfiguration fails before training, every culprit named, the utility's direction declared.

The checks live in one place (``assess.check_schemes``, ``assess.check_utility_metric``,
``quantization.registry.check_scheme_names``, ``report.higher_is_better``); each test drives them
through the front ends a researcher uses (the callback, the Metric, ``assess``, the app's scheme
list), on models of a few weights so that each test takes well under a second or two of CPU.
"""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import MISCallback, assess
from mis_lightning.config import ScoringConfig
from mis_lightning.quantization import SchemeError


def mse(o, t):
    return 0.5 * (o - t) ** 2


def _data(n: int = 120, width: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, width, generator=g)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.2 * torch.randn(n, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=40)


class Scale(pl.LightningModule):
    """No layer at all: one bare weight vector (the user's own parameterisation)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.steps = 0

    def forward(self, x):
        return x @ self.w

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ConvOnly(nn.Module):
    """A convolution and no ``nn.Linear``: the round-to-nearest schemes quantize it, the native
    (``nn.Linear``-only) one has nothing to quantize."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 4, bias=False)

    def forward(self, x):
        return self.conv(x.unsqueeze(1)).reshape(-1)


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.steps = 0

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module, cb, tmp_path):
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(module, _data(), _data(40))
    return trainer


# -- 1. no applicable scheme: refused before training; some: warned by name --------------------------

@pytest.mark.parametrize("schemes", [["rtn_int8", "rtn_int4"], ["int8_weight_only", "native_int8_dynamic"]])
def test_no_scheme_that_quantizes_anything_is_refused_before_training(tmp_path, schemes):
    """Before fu31 the fit ran to its end and every row of the report was an error ("applies to no
    assessed parameter"); now ``setup`` refuses, naming every scheme and why, before any step, and
    ``assess`` and the Metric refuse the same way (one check, ``assess.check_schemes``)."""
    from mis_lightning.metric import MISIndicator

    module = Scale()
    cb = MISCallback(schemes, loss_fn=mse, uncertainty_draws=0)
    with pytest.raises(SchemeError, match="no requested scheme can quantize") as info:
        _fit(module, cb, tmp_path)
    assert module.steps == 0  # nothing trained
    for name in schemes:
        assert repr(name) in str(info.value)
    with pytest.raises(SchemeError, match="no requested scheme can quantize"):
        assess(Scale(), schemes, _data(), mse, num_records=16, uncertainty_draws=0, strict=False)
    with pytest.raises(SchemeError, match="no requested scheme can quantize"):
        MISIndicator(Scale(), mse, schemes, uncertainty_draws=0)


def test_a_scheme_that_quantizes_nothing_among_others_is_named_before_the_estimation(caplog):
    """``native_int8_dynamic`` quantizes ``nn.Linear`` only; on a convolution-only model it would be an
    error row at the end, and before fu31 nothing said so first (its ``check_model`` has nothing to
    check). Now the shared check names it; ``rtn_int8`` (which quantizes convolutions) is not named."""
    from mis_lightning.assess import check_schemes, resolve_schemes

    model = ConvOnly()
    msgs = check_schemes(model, resolve_schemes(["rtn_int8", "native_int8_dynamic"]), strict=False)
    assert len(msgs) == 1 and msgs[0].startswith("scheme 'native_int8_dynamic' applies to no assessed parameter")
    assert "nn.Linear" in msgs[0] and "failed scheme" in msgs[0]
    # params= narrows what counts: the bias-free conv is the only parameter, so params=[] is not
    # asked; a selection without the conv's weight leaves rtn_int8 nothing either (refused)
    with pytest.raises(SchemeError, match="'rtn_int8'"):
        check_schemes(nn.Sequential(ConvOnly(), nn.LayerNorm(1)), resolve_schemes(["rtn_int8"]), strict=False,
                      params=["1.weight", "1.bias"])
    with caplog.at_level(logging.WARNING, logger="mis_lightning.assess"):
        with pytest.raises(ValueError):  # the warning comes before the estimation pass (a loss it refuses)
            assess(model, ["rtn_int8", "native_int8_dynamic"], _data(), lambda o, t: (o - t).abs().sum(),
                   num_records=16, uncertainty_draws=0, strict=False)
    assert any("'native_int8_dynamic' applies to no assessed parameter" in r.getMessage() for r in caplog.records)


def test_the_float_release_alone_is_not_refused():
    """``none`` (the unquantized release) asked for on its own is a reference, not a failure."""
    from mis_lightning.assess import check_schemes, resolve_schemes

    assert check_schemes(Scale(), resolve_schemes(["none"]), strict=False) == []
    assert check_schemes(Scale(), resolve_schemes(["bf16"]), strict=False) == []  # casts any parameter


# -- 2. every unknown scheme name at once -------------------------------------------------------------

def test_every_unknown_scheme_name_is_reported_at_once_with_close_names():
    """Before fu31 only the first unknown name was reported (``int2`` failed on the next try)."""
    from mis_lightning.app.factories import resolve_schemes as app_resolve

    for make in (lambda s: MISCallback(s, loss_fn=mse), lambda s: app_resolve(s)):
        with pytest.raises(KeyError) as info:
            make(["int8_weight_onyl", "rtn_int8", "int2"])
        text = str(info.value)
        assert "2 unknown quantization schemes" in text
        assert "'int8_weight_onyl' (did you mean int8_weight_only" in text
        assert "'int2' (did you mean rtn_int2" in text
    with pytest.raises(KeyError, match="unknown quantization scheme 'rtn_int9'"):
        MISCallback(["rtn_int9"], loss_fn=mse)


# -- 3. num_records above n: stated -------------------------------------------------------------------

def test_num_records_above_the_training_records_is_stated_in_the_report():
    """``num_records=10_000`` on 120 records stores all 120 (nothing approximated); before fu31 the
    report did not say the request was cut. Now ``estimation["num_records_requested"]`` and the
    table's "estimated by" line say so (and a saved report keeps it)."""
    from mis_lightning.report import Report

    model = nn.Linear(4, 1)
    rep = assess(model, ["rtn_int8"], _data(), lambda o, t: mse(o[:, 0], t), num_records=10_000,
                 uncertainty_draws=0, estimation="exact", weight_decay=1e-2)
    assert rep.estimation["num_records"] == 120
    assert rep.estimation["num_records_requested"] == 10_000
    line = next(ln for ln in rep.table().splitlines() if ln.startswith("estimated by"))
    assert "all 120 training records" in line and "(num_records=10000 is more than there are)" in line
    assert Report.from_dict(rep.to_dict()).estimation["num_records_requested"] == 10_000
    small = assess(model, ["rtn_int8"], _data(), lambda o, t: mse(o[:, 0], t), num_records=64,
                   uncertainty_draws=0, estimation="exact", weight_decay=1e-2)
    assert "num_records_requested" not in small.estimation  # asked for fewer than n: nothing to say


def test_the_default_num_records_above_n_is_not_called_a_request():
    """A newcomer's 500-record fit never passed ``num_records``, yet the table said "num_records=512
    asked for more than there are" (nux57): the line says what happened (every record averaged) and,
    for the default, that it is the default, not the user's request."""
    model = nn.Linear(4, 1)
    rep = assess(model, ["rtn_int8"], _data(), lambda o, t: mse(o[:, 0], t),
                 uncertainty_draws=0, estimation="exact", weight_decay=1e-2)
    assert rep.estimation["num_records_requested"] == 512
    line = " ".join(ln.strip() for ln in rep.table(width=100).splitlines()).split("estimated by")[1]
    assert "asked for" not in line
    assert "leakage averaged over all 120 training records (num_records=512, its default, is more" in line


# -- 4. the utility's direction -----------------------------------------------------------------------

ROWS = [  # a classifier's top-1 accuracy: int4 at chance, int8 near the float model
    {"scheme": "int8", "leakage": 0.0529, "leakage_p10": 0.0484, "leakage_p90": 0.0577, "utility_top1": 0.6215},
    {"scheme": "int4", "leakage": 0.0469, "leakage_p10": 0.0421, "leakage_p90": 0.0511, "utility_top1": 0.3333},
]


def test_known_names_after_prefixes_and_unknown_names_refused():
    from mis_lightning.planning import lower_is_better
    from mis_lightning.report import higher_is_better, known_mode

    for key in ("top1", "val_top1", "test_f1", "utility_val_r2", "precision", "train/acc", "balanced_accuracy"):
        assert known_mode(key) == "max", key
        assert higher_is_better(key) and not lower_is_better(key.removeprefix("utility_")), key
    for key in ("val_loss", "nll_loss", "test_rmse", "top1_error", "perplexity", "utility_loss"):
        assert known_mode(key) == "min", key
        assert not higher_is_better(key) and lower_is_better(key.removeprefix("utility_")), key
    assert known_mode("my_score") is None
    with pytest.raises(ValueError, match="'my_score'.*utility_mode='max' or 'min'"):
        higher_is_better("utility_my_score")  # was: read as lower-is-better, silently
    assert higher_is_better("my_score", {"my_score": "max"})
    assert not higher_is_better("top1", {"top1": "min"})  # a declaration overrides the name


def test_the_verdict_never_ranks_by_a_direction_it_guessed():
    """``top1`` was outside the report's list and read as lower-is-better: the verdict called the
    chance-accuracy scheme the best. The name is known now; a name that is not (``score``) is
    refused, not guessed, and a declared direction (``Report.utility_modes``) decides."""
    from mis_lightning.report import legend, verdict

    line = verdict(ROWS, utility_key="top1")
    assert line.startswith("verdict: safest with top1 within 1% of the best (0.6215, int8): int8"), line
    renamed = [{**{k: v for k, v in r.items() if k != "utility_top1"}, "utility_score": r["utility_top1"]}
               for r in ROWS]
    with pytest.raises(ValueError, match="'score'"):
        verdict(renamed, utility_key="score")
    # not asked for: the default pick skips a metric whose direction it would have to guess
    assert verdict(renamed).startswith("verdict: safest: int4 (leakage 0.0469)")
    line = verdict(renamed, utility_key="score", modes={"score": "max"})
    assert "(0.6215, int8): int8" in line
    assert "(higher is better)" in " ".join(legend(renamed, "score", modes={"score": "max"}).split())


def test_the_direction_is_declared_once_and_recorded_in_the_report():
    """``ScoringConfig(utility_key=, utility_mode=)`` (the callback's, the Metric's and ``assess``'s
    keywords, ``mis.scoring.*`` in the app); the report records each metric's direction (declared,
    the torchmetrics object's ``higher_is_better``, the name) and ranks by the declared key."""
    from torchmetrics import MeanAbsoluteError, R2Score

    from mis_lightning.report import Report

    with pytest.raises(ValueError, match="utility_mode must be"):
        ScoringConfig(utility_key="score", utility_mode="up")
    with pytest.raises(ValueError, match="needs utility_key"):
        ScoringConfig(utility_mode="max")
    model = nn.Linear(4, 1)
    out = lambda o, t: (o[:, 0], t)  # noqa: E731
    kw = dict(val_dataloader=_data(40), num_records=32, uncertainty_draws=0, estimation="exact",
              weight_decay=1e-2, output_transform=out)
    # "fit" is no known name: R2Score's own higher_is_better decides; "dev" is declared lower-is-better
    rep = assess(model, ["rtn_int8", "rtn_int2"], _data(), lambda o, t: mse(o[:, 0], t),
                 metrics={"fit": R2Score(), "dev": MeanAbsoluteError()}, utility_key="fit", **kw)
    assert rep.utility_modes == {"loss": "min", "fit": "max", "dev": "min"}
    assert rep.utility_key == "fit"
    table = rep.table()  # the declared key is the table's and the verdict's by default
    assert "fit: utility of the quantized copy on the validation data (higher is better)" in " ".join(table.split())
    # cr49: where the best-fit scheme reads the baseline's leakage the verdict names no scheme safer
    assert "verdict: safest with fit within" in table or "verdict: no scheme with fit within" in table
    again = Report.from_dict(rep.to_dict())
    assert again.utility_modes == rep.utility_modes and again.utility_key == "fit"
    # a declared mode overrides the object's and is what the verdict reads
    rep = assess(model, ["rtn_int8"], _data(), lambda o, t: mse(o[:, 0], t), metrics={"fit": R2Score()},
                 utility_key="fit", utility_mode="min", **kw)
    assert rep.utility_modes["fit"] == "min"


class _NoDirection(__import__("torchmetrics").MeanAbsoluteError):
    higher_is_better = None  # a user's own Metric that does not say


def test_an_unknown_direction_is_refused_before_training_naming_the_key(tmp_path):
    """The callback refuses at construction (before any training) a ``utility_key`` whose direction neither
    the metric object, the name nor a ``utility_mode`` gives, and a ``utility_key`` that is not
    measured (with the close names); ``assess`` refuses before its estimation pass."""
    with pytest.raises(ValueError, match="utility metric 'score'.*utility_mode='max' or 'min'"):
        MISCallback(["rtn_int8"], loss_fn=mse, utility_metrics={"score": _NoDirection()},
                    output_transform=lambda o, t: (o, t), utility_key="score", uncertainty_draws=0)
    with pytest.raises(ValueError, match="utility_key='scor' is not a measured utility metric.*'score'"):
        MISCallback(["rtn_int8"], loss_fn=mse, utility_metrics={"score": _NoDirection()}, utility_key="scor")
    # declared: accepted, and the fit's report ranks by it in the declared direction
    module = Regressor()
    cb = MISCallback(["rtn_int8", "rtn_int2"], loss_fn=mse, utility_metrics={"score": _NoDirection()},
                     output_transform=lambda o, t: (o, t), utility_key="score", utility_mode="max",
                     uncertainty_draws=0, covariance="independent", weight_decay=1e-2)
    _fit(module, cb, tmp_path)
    assert module.steps > 0
    assert cb.report.utility_modes["score"] == "max" and cb.report.utility_key == "score"
    assert "score: utility of the quantized copy on the validation data (higher is better)" in " ".join(
        cb.report.table().split())
    with pytest.raises(ValueError, match="utility metric 'score'"):
        assess(nn.Linear(4, 1), ["rtn_int8"], _data(), lambda o, t: mse(o[:, 0], t), val_dataloader=_data(40),
               metrics={"score": _NoDirection()}, utility_key="score", num_records=16, uncertainty_draws=0)
    # a ranking metric and no validation data to measure it on: refused too (nothing would rank by it)
    with pytest.raises(ValueError, match="utility_key='loss' names a utility metric, but no utility is measured"):
        assess(nn.Linear(4, 1), ["rtn_int8"], _data(), lambda o, t: mse(o[:, 0], t), utility_key="loss",
               num_records=16, uncertainty_draws=0)
    module = Regressor()
    cb = MISCallback(["rtn_int8"], loss_fn=mse, utility_key="loss")
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="no utility is measured without validation data"):
        trainer.fit(module, _data())  # no val_dataloaders
    assert module.steps == 0


def test_the_apps_conf_declares_the_direction_options():
    """``conf/mis/default.yaml`` carries ``utility_key`` / ``utility_mode`` to ``ScoringConfig``."""
    from pathlib import Path

    import yaml

    conf = yaml.safe_load((Path(__file__).parents[1] / "conf" / "mis" / "default.yaml").read_text())
    assert conf["scoring"]["utility_key"] is None and conf["scoring"]["utility_mode"] is None


def test_the_planner_reads_the_same_declaration():
    """``ScoringConfig(utility_key="score", utility_mode="max")`` also gives the planner the direction of a
    ``PlanConfig(utility_metric="score")`` budget (one declaration); ``PlanConfig.higher_is_better`` still
    wins where given, and an undeclared unknown name is still refused."""
    from mis_lightning.planning import PlanConfig, lower_is_better, plan_direction

    sc = ScoringConfig(utility_key="val_score", utility_mode="max")
    assert plan_direction(PlanConfig(utility_metric="score"), sc) is True
    assert not lower_is_better("score", None, plan_direction(PlanConfig(utility_metric="score"), sc))
    assert plan_direction(PlanConfig(utility_metric="score", higher_is_better=False), sc) is False
    assert plan_direction(PlanConfig(utility_metric="other"), sc) is None
    with pytest.raises(ValueError, match="'other'.*direction is unknown"):
        lower_is_better("other", None, plan_direction(PlanConfig(utility_metric="other"), sc))
