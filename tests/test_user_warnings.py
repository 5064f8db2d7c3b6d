"""Warnings shown at the user's call site, information logged (ux49, from nux48's findings).

nux48: the callback's warnings were attributed to ``mis_lightning/callback.py:481`` and the
Metric's to torchmetrics' ``prints.py:43``, not to the user's ``trainer.fit`` / ``compute()``
line; and a line for information (which layers a scheme quantized by another method than its
backend) was raised as a ``UserWarning``, reading as a problem. Each front end here (``assess``,
``MISIndicator``, ``MISCallback``, ``plan``) must show its warnings at this file's line that
called it, and log its notes instead of warning them; a real problem (not at a minimum) stays a
warning and stays in the table.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import MISCallback, MISIndicator
from mis_lightning._user_warnings import user_stacklevel, warn
from mis_lightning._warning_lines import MORE, WARNING_LINE_WIDTH
from mis_lightning.planning import plan
from mis_lightning.report import STAR_LINE

torch.set_num_threads(1)
FAST = {"uncertainty_draws": 0, "covariance": "independent", "estimation": "diagonal"}


def mse(out, t):
    return 0.5 * (out.squeeze(-1) - t) ** 2


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g)
    return X, X[:, 0] - 0.5 * X[:, 1] + 0.2 * torch.randn(n, generator=g)


def _frozen_model() -> nn.Module:
    """An MLP whose first bias does not require grad: ``params=`` naming it warns that a frozen
    parameter is assessed as trained (``assess.select_params``, deep in every front end)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    m[0].bias.requires_grad_(False)
    return m


PARAMS = ["0.weight", "0.bias", "2.weight"]


def _here() -> int:
    """The caller's line number."""
    return inspect.currentframe().f_back.f_lineno


def _ours(record: list[warnings.WarningMessage], first: int, last: int, text: str) -> list[warnings.WarningMessage]:
    """The warnings of ``record`` whose message holds ``text``; each must be shown at this file,
    at a line of the call between ``first`` and ``last`` (a call spanning lines)."""
    ours = [w for w in record if text in str(w.message)]
    assert ours, f"no warning with {text!r}: {[str(w.message)[:80] for w in record]}"
    for w in ours:
        assert (w.filename, first <= w.lineno <= last) == (__file__, True), (w.filename, w.lineno, str(w.message)[:80])
    return ours


def test_user_stacklevel_finds_the_first_frame_outside_the_packages():
    """The helper itself: called from this file, the warning is this line's; called through a
    frame of the library (a lambda compiled as if in mis_lightning), still this line's."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = _here() + 1
        warn("direct")
        inner = eval(compile("lambda: warn('through the library')", ml.__file__, "eval"), {"warn": warn})
        line2 = _here() + 1
        inner()
    assert [(w.filename, w.lineno) for w in rec] == [(__file__, line), (__file__, line2)]
    assert user_stacklevel() == 1  # this test's own frame is outside the packages


@pytest.mark.parametrize("front", ["assess", "plan"])
def test_assess_and_plan_warn_at_the_users_call(front):
    X, y = _data()
    dl = DataLoader(TensorDataset(X, y), batch_size=32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = _here() + 2
        if front == "assess":
            ml.assess(_frozen_model(), ["rtn_int8"], dl, mse, params=PARAMS, num_records=32, **FAST)
        else:
            line += 2
            plan(_frozen_model(), ["rtn_int8", "rtn_int4"], dl, mse, val_dataloader=dl, max_utility_loss=0.5,
                 params=PARAMS, num_records=32, **FAST)
    _ours(rec, line, line + 1, "do not require grad")


def test_metric_warns_at_the_users_construction_and_compute():
    """The construction's warning (params) and ``compute()``'s (the report's: the records
    counted against ``num_training_records``), both through torchmetrics' wrappers."""
    X, y = _data()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = _here() + 1
        metric = MISIndicator(_frozen_model(), mse, schemes=["rtn_int8"], params=PARAMS,
                              num_training_records=200, **FAST)
        _ours(rec, first, first + 1, "do not require grad")
        rec.clear()
        metric.update(X, y)
        line = _here() + 1
        metric.compute()
    _ours(rec, line, line, "MISIndicator: ")


class _ConvRegressor(pl.LightningModule):
    """A Conv1d beside a Linear head: ``int8_weight_only`` (torchao) quantizes the Linear and the
    library's round-to-nearest the Conv1d, which the report says for information."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x[:, None, :])).flatten(1)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", ((self(x) - y) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _sq(o, t):
    return 0.5 * (o - t) ** 2


def test_callback_warns_at_fit_and_logs_its_notes(tmp_path, caplog):
    """Two Adam epochs: not at a minimum (a real problem: a ``UserWarning`` shown at this file's
    ``trainer.fit`` line, and in the table's warnings); the Conv1d quantized by the library's
    round-to-nearest: a note, logged (INFO) and under the table's ``notes:``, not a warning."""
    X, y = _data(120)
    train = DataLoader(TensorDataset(X[:80], y[:80]), batch_size=40)
    val = DataLoader(TensorDataset(X[80:], y[80:]), batch_size=40)
    cb = MISCallback(["int8_weight_only", "rtn_int8"], loss_fn=_sq, num_records=32, **FAST)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        line = _here() + 1
        trainer.fit(_ConvRegressor(), train, val)
    ours = _ours(rec, line, line, "MISCallback: ")
    assert any("not at a minimum" in str(w.message) for w in ours)
    assert not any("besides" in str(w.message) for w in ours)  # the note is not a warning
    # int8_weight_only, named after torchao's config, releases more than quantize_ does: a warning (nux54 #1)
    assert [str(w.message) for w in ours if "beyond torchao's quantize_" in str(w.message)] == [
        "MISCallback: scheme 'int8_weight_only' quantizes Conv1d (conv.weight) beyond torchao's quantize_, which "
        "leaves them in float [...]"]
    (note,) = [r.getMessage() for r in caplog.records if "besides" in r.getMessage()]
    assert note.startswith("MISCallback: ") and "Conv1d by the library's round-to-nearest" in note
    assert cb.report.notes == [note.removeprefix("MISCallback: ")]
    assert not any("besides" in w for w in cb.report.warnings)
    # nux51 #9: each of the report's warnings once on the console, one line (its first sentence),
    # and the line that names the report says where their full text is
    # (those the table's * stands for in one line naming each: nux55)
    lines = cb.report.console_warnings()
    assert sorted(str(w.message) for w in ours) == sorted(f"MISCallback: {w}" for w in lines)
    assert any(w.endswith(MORE) for w in lines)
    assert all(len(w) <= WARNING_LINE_WIDTH + len(MORE) for w in lines if not w.startswith(STAR_LINE))
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MISCallback: assessed ")]
    # every file it wrote, named (nux56: the figure was not)
    assert said.endswith(f"report: {cb.report_path}, beside it mis_privacy_utility.png; the warnings above in full: "
                         "print(callback.report.warnings_text())")
    assert (cb.report_path.parent / "mis_privacy_utility.png").is_file()
    table = cb.report.table()
    assert "\nnotes:\n  - " + cb.report.notes[0] in table and "not at a minimum" in table.split("warnings:")[1]
    # the notes are in the JSON and back
    assert ml.Report.from_json(cb.report_path).notes == cb.report.notes


@pytest.mark.parametrize("stacked", [False, True])
def test_metric_logs_its_notes(caplog, stacked):
    """MISIndicator: a note is logged (INFO), not warned; once per Metric, as the warnings."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(8, 1))
    X, y = _data()
    # rtn_int8: the library's own scheme (int8_weight_only, named after a torchao config, warns
    # instead: its release is not quantize_'s, nux54 #1; the callback test below checks both)
    metric = MISIndicator(model, lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, schemes=["rtn_int8"],
                          num_records=32, **FAST)
    metric.update(X[:, None, :], y)
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.INFO, logger="mis_lightning.metric"):
        warnings.simplefilter("always")
        metric.compute()
        if stacked:
            metric.compute()
    assert not any("besides" in str(w.message) for w in rec)
    assert [r.levelno for r in caplog.records if "besides" in r.getMessage()] == [logging.INFO]
