"""MISCallback on a fit that took no optimizer step (nux53 #3).

``Trainer(max_epochs=0)`` assessed a freshly initialised model: it read a leakage of 0.70 and a
verdict naming a "safest" scheme, while weights that never saw the records leak nothing. The
callback knows no step was taken: the report's first warning says the figures are not membership
leakage, every figure is indicative and the verdict chooses none (the same machinery as an
undetermined headline: ``report.undetermined_headline``), in the table, the JSON reloaded, and the
tracker's flag. A fit that took steps, and a finished checkpoint resumed (its steps restored, none
taken now), are not flagged.
"""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _table_lines import entry  # tests/_table_lines.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import MISCallback
from mis_lightning.report import NOT_TRAINED, Report, undetermined_headline, verdict
from mis_lightning.tracking import report_metrics

pytestmark = pytest.mark.usefixtures("layout_only_figures")
FAST = {"covariance": "independent", "mc_draws": 1024}


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.drop = nn.Dropout(0.0)  # the identity; run in eval mode in training (ux54c: the callback sees it)

    def forward(self, x):
        return self.net(self.drop(x))

    def on_train_epoch_start(self):
        self.drop.eval()  # after Lightning's model.train(): the user's choice of mode for this layer

    def training_step(self, batch, i):
        x, y = batch
        return ce(self(x), y).mean()

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", ce(self(x), y).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-2)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _fit(tmp_path, epochs):
    pl.seed_everything(0)
    cb = MISCallback(schemes=["rtn_int8", "rtn_int2"], loss_fn=ce, weight_decay=1e-3, **FAST)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                         logger=False, default_root_dir=str(tmp_path))
    trainer.fit(Net(), DataLoader(_data(240, 1), batch_size=80), DataLoader(_data(100, 2), batch_size=100))
    assert cb.report is not None, cb.last_error
    return cb, trainer


def test_a_fit_without_a_step_names_it_first_and_ranks_nothing(tmp_path):
    cb, trainer = _fit(tmp_path, 0)
    assert trainer.global_step == 0
    report = cb.report
    assert report.warnings[0].startswith(NOT_TRAINED)
    assert "max_epochs=0" in report.warnings[0] and "mis_lightning.assess" in report.warnings[0]
    assert report.diagnostics["not_trained"] is True
    rows = report.rows()
    assert all(r["not_trained"] and "not trained in this fit" in r["indicative"] for r in rows)
    line = verdict(rows)
    assert line == f"verdict: none: {NOT_TRAINED}; no scheme is ranked (see warnings)"
    assert "safest" not in report.table()
    assert entry(report.table(), "verdict:") == line  # (the table wraps it at 100 columns)
    # the JSON keeps it: a reloaded report prints the same, and the tracker's flag reads 1
    again = Report.from_dict(json.loads(report.to_json()))
    assert undetermined_headline(again.rows()) == NOT_TRAINED
    assert report_metrics(again)["mis/baseline/undetermined"] == 1.0


def test_a_fit_with_steps_and_a_resumed_finished_checkpoint_are_not_flagged(tmp_path):
    cb, trainer = _fit(tmp_path, 2)
    assert trainer.global_step > 0
    assert "not_trained" not in cb.report.diagnostics
    assert not any(w.startswith(NOT_TRAINED) for w in cb.report.warnings)
    assert all("not_trained" not in r for r in cb.report.rows())
    assert verdict(cb.report.rows()) != f"verdict: none: {NOT_TRAINED}; no scheme is ranked (see warnings)"
    # ux54c: the layers the last training batch ran in eval mode (the model itself trained in train mode)
    assert cb.report.diagnostics["eval_mode_in_training"] == ["drop"]
    # the finished checkpoint resumed: no step now, but the weights were trained (global_step restored)
    ckpt = tmp_path / "done.ckpt"
    trainer.save_checkpoint(ckpt)
    pl.seed_everything(0)
    cb2 = MISCallback(schemes=["rtn_int8", "rtn_int2"], loss_fn=ce, weight_decay=1e-3, **FAST)
    t2 = pl.Trainer(max_epochs=2, callbacks=[cb2], enable_progress_bar=False, enable_model_summary=False,
                    logger=False, default_root_dir=str(tmp_path))
    t2.fit(Net(), DataLoader(_data(240, 1), batch_size=80), DataLoader(_data(100, 2), batch_size=100), ckpt_path=str(ckpt))
    assert t2.global_step == trainer.global_step
    assert cb2.report is not None, cb2.last_error
    assert "not_trained" not in cb2.report.diagnostics
    assert "eval_mode_in_training" not in cb2.report.diagnostics  # no batch seen in this fit: not known


def test_the_app_says_a_run_without_a_step_first_and_ranks_nothing(tmp_path):
    """The app's own fit (``trainer.max_epochs=0``): the first warning says so and no verdict, in
    report.json and report.md. ux54c: ``mode=assess`` of a checkpoint with ``global_step`` 0 whose
    weights are not the model's initialisation and not written by the app (a model trained outside
    Lightning, saved with ``trainer.save_checkpoint``: here the app's checkpoint with its weights
    moved and its origin dropped) gets a first warning saying both readings, and keeps its verdict."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from mis_lightning.app.checkpoint_fit import ORIGIN_KEY
    from mis_lightning.app.job import run_job

    def run(overrides, out):
        with initialize_config_module("mis_lightning.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        with open_dict(cfg):
            cfg.output_dir = str(out)
        run_job(cfg)
        return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()

    base = ["data=synthetic_linear", "data.n_train=300", "data.n_val=100", "data.batch_size=300", "model=linear",
            "mis.estimation.num_records=128", "mis.scoring.uncertainty_draws=2", "logger=none", "progress=false",
            "mis.scoring.covariance=independent", "schemes=[rtn_int8,rtn_int2]"]
    report, md = run([*base, "trainer.max_epochs=0", f"trainer.default_root_dir={tmp_path / 'train'}"],
                     tmp_path / "train")
    assert report["warnings"][0].startswith(NOT_TRAINED), report["warnings"][0]
    assert "the training took no optimizer step" in report["warnings"][0]
    assert report["diagnostics"]["not_trained"] is True
    assert entry(md, "verdict:") == f"verdict: none: {NOT_TRAINED}; no scheme is ranked (see warnings)"
    assert "safest" not in md
    ckpt = torch.load(tmp_path / "train" / "model.ckpt", weights_only=False)
    assert ckpt["global_step"] == 0
    del ckpt[ORIGIN_KEY]
    ckpt["state_dict"] = {k: v + 0.25 for k, v in ckpt["state_dict"].items()}  # "trained elsewhere"
    (tmp_path / "elsewhere").mkdir()
    torch.save(ckpt, tmp_path / "elsewhere" / "model.ckpt")
    report, md = run([*base, "mode=assess", f"ckpt_path={tmp_path / 'elsewhere' / 'model.ckpt'}"], tmp_path / "assess")
    assert report["warnings"][0].startswith("the checkpoint's global_step is 0 and it records no optimizer state")
    assert "trained elsewhere" in report["warnings"][0] and "never trained" in report["warnings"][0]
    assert "not_trained" not in report["diagnostics"]
    assert entry(md, "verdict:").startswith("verdict: ") and NOT_TRAINED not in md


def test_a_checkpoint_is_judged_untrained_only_where_known():
    """``checkpoint_untrained`` (mode=assess, ux54c): a step count of 0 alone says no Lightning fit
    stepped; not trained is known from the config's initialisation or the app's own training
    run; an optimizer's state or a completed training batch is training."""
    from mis_lightning.app.checkpoint_fit import ORIGIN_KEY, checkpoint_untrained, same_weights

    net = Net()
    state = net.state_dict()
    assert same_weights(net, state) and not same_weights(net, {**state, "net.0.bias": state["net.0.bias"] + 1e-6})
    assert not same_weights(net, {k: v for k, v in state.items() if k != "net.0.bias"})
    lightning = {"global_step": 0, "state_dict": state, "optimizer_states": [{"state": {}, "param_groups": []}],
                 "loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": {"completed": 0}}}}}
    assert checkpoint_untrained("x.ckpt", lightning, initial=True)[0] is True
    known, text = checkpoint_untrained("x.ckpt", lightning, initial=False)
    assert known is False and "trained elsewhere" in text
    origin = {ORIGIN_KEY: {"model": "m.Net", "data": "d.D", "choices": {}}}
    assert checkpoint_untrained("x.ckpt", {**lightning, **origin}, initial=False)[0] is True
    stepped = {**lightning, "optimizer_states": [{"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": []}]}
    batches = {**lightning, "loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": {"completed": 2}}}}}
    for ckpt in (stepped, batches, {**lightning, "global_step": 3}, {"state_dict": state}):
        assert checkpoint_untrained("x.ckpt", ckpt, initial=True) is None
