"""MISCallback and the batches the Trainer hands the module: Lightning's batch-transfer hooks
(``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``, on the
module or its datamodule) and validation batches the assessment cannot take (fu24)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import MISCallback
from mis_lightning.evaluation import evaluate_utility

SCHEMES = ["rtn_int8", "rtn_int2"]
# the independent form at the fewest Monte Carlo draws (1,024; the budget gave 32,768): these
# tests compare two runs of the same options (the same draws) or the training itself
FAST = {"covariance": "independent", "uncertainty_draws": 0, "mc_draws": 1024}


def mse(o, t):
    return 0.5 * (o - t) ** 2


def _data(scale=10.0, shift=5.0):
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(160, 4, generator=g)
    y = Z[:, 0] - 0.5 * Z[:, 1] + 0.2 * torch.randn(160, generator=g)
    return Z * scale + shift, y


X, Y = _data()
MU, SD = X[:120].mean(0), X[:120].std(0)


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_loss", ((self(x) - y) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class NormalisingModule(Regressor):
    """Inputs standardised on the device, as a LightningModule commonly does."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x - MU) / SD, y


class NormalisingData(pl.LightningDataModule):
    """The same, in the datamodule's ``on_before_batch_transfer``."""

    def train_dataloader(self):
        return DataLoader(TensorDataset(X[:120], Y[:120]), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(X[120:], Y[120:]), batch_size=64)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x - MU) / SD, y


def _trainer(tmp_path, cb, **kw):
    return pl.Trainer(max_epochs=4, logger=False, callbacks=[cb], enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("where", ["module", "datamodule"])
def test_batch_transfer_hooks_are_applied_to_the_assessed_batches(tmp_path, where):
    """A module that standardises its inputs in a batch-transfer hook was assessed on the raw
    inputs, which it never trains on: leakage 0.264 against 0.180 on the inputs it trained on,
    utility loss 18x, and only a "not at a minimum" warning that pointed at training (fu24 a01).
    The estimation pass, the first-batch check and the utility now see the batches as the
    Trainer's loops hand them to the module."""
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    pl.seed_everything(0)
    if where == "module":
        module = NormalisingModule()
        _trainer(tmp_path, cb).fit(module, DataLoader(TensorDataset(X[:120], Y[:120]), batch_size=32, shuffle=True),
                                   DataLoader(TensorDataset(X[120:], Y[120:]), batch_size=64))
    else:
        module = Regressor()
        _trainer(tmp_path, cb).fit(module, datamodule=NormalisingData())
    Xn = (X - MU) / SD
    train, val = (DataLoader(TensorDataset(Xn[:120], Y[:120]), batch_size=32),
                  DataLoader(TensorDataset(Xn[120:], Y[120:]), batch_size=64))
    ref = ml.assess(module, SCHEMES, train, mse, val_dataloader=val, **FAST)
    assert cb.report is not None and cb.report.n == 120
    assert cb.report.baseline_leakage == pytest.approx(ref.baseline_leakage, rel=1e-8)
    for s in SCHEMES:
        assert cb.report.schemes[s].leakage == pytest.approx(ref.schemes[s].leakage, rel=1e-8)
        assert cb.report.schemes[s].utility["loss"] == pytest.approx(ref.schemes[s].utility["loss"], rel=1e-6)
    # the float model on the standardised validation inputs it was trained for: int8 is close to it
    assert cb.report.schemes["rtn_int8"].utility["loss"] == pytest.approx(
        evaluate_utility(module, val, mse)["loss"], rel=0.05)


class AugmentingModule(NormalisingModule):
    """Lightning's documented pattern: augmentation on the device in training only."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.trainer.training:
            x = x + 0.5 * torch.randn_like(x)
        return x, y


@pytest.mark.parametrize("every", [None, 1])
def test_training_only_augmentation_in_a_hook_is_not_applied_to_the_assessment(tmp_path, every):
    """At the end of fit the Trainer is still in its training stage: the hooks would augment the
    assessed records and the validation batches there, and not in the mid-training runs. They
    see the validation stage in both."""
    cb = MISCallback(SCHEMES, loss_fn=mse, every_n_val_epochs=every, **FAST)
    pl.seed_everything(0)
    module = AugmentingModule()
    _trainer(tmp_path, cb).fit(module, DataLoader(TensorDataset(X[:120], Y[:120]), batch_size=32, shuffle=True),
                               DataLoader(TensorDataset(X[120:], Y[120:]), batch_size=64))
    Xn = (X - MU) / SD
    ref = ml.assess(module, SCHEMES, DataLoader(TensorDataset(Xn[:120], Y[:120]), batch_size=32), mse,
                    val_dataloader=DataLoader(TensorDataset(Xn[120:], Y[120:]), batch_size=64), **FAST)
    for s in SCHEMES:
        assert cb.report.schemes[s].leakage == pytest.approx(ref.schemes[s].leakage, rel=1e-8)
        assert cb.report.schemes[s].utility["loss"] == pytest.approx(ref.schemes[s].utility["loss"], rel=1e-6)


@pytest.mark.parametrize("sanity", [2, 0])
def test_training_with_batch_transfer_hooks_is_bit_identical_with_and_without_the_callback(tmp_path, sanity):
    """Also without a sanity check: the validation-batch check then sets the validation loader up
    before the first validation would."""
    def run(cbs):
        pl.seed_everything(0)
        module = NormalisingModule()
        trainer = pl.Trainer(max_epochs=3, logger=False, callbacks=cbs, enable_progress_bar=False,
                             num_sanity_val_steps=sanity,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
        trainer.fit(module, DataLoader(TensorDataset(X[:120], Y[:120]), batch_size=32, shuffle=True),
                    DataLoader(TensorDataset(X[120:], Y[120:]), batch_size=64))
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.rand(3)

    a = run([MISCallback(SCHEMES, loss_fn=mse, every_n_val_epochs=1, **FAST)])
    b = run([])
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and torch.equal(a[1], b[1])


class WeightedValidation(Regressor):
    """Validation batches ``(x, y, w)`` (a weighted validation metric); training batches are pairs."""

    def validation_step(self, batch, batch_idx):
        x, y, w = batch
        self.log("val_wloss", (w * (self(x) - y) ** 2).sum() / w.sum())


def _weighted_val():
    w = torch.rand(40, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(X[120:], Y[120:], w), batch_size=64)


@pytest.mark.parametrize("sanity", [1, 0])
def test_validation_batches_the_assessment_cannot_take_raise_before_training(tmp_path, sanity):
    """Training batches ``(x, y)``, validation batches ``(x, y, w)``: the whole training ran,
    then every scheme (the float baseline too) was an error row ``batches must be (inputs,
    targets) pairs`` (fu24 a02). The first validation batch is now checked with the first
    training batch, before any optimizer step, and the message says it is the validation data."""
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, cb, num_sanity_val_steps=sanity)
    with pytest.raises(TypeError, match=r"MISCallback: the first validation batch"):
        trainer.fit(WeightedValidation(), DataLoader(TensorDataset(X[:120], Y[:120]), batch_size=32, shuffle=True),
                    _weighted_val())
    assert trainer.global_step == 0
    # a batch_fn that takes both layouts works
    ok = MISCallback(SCHEMES, loss_fn=mse, batch_fn=first_two, **FAST)
    pl.seed_everything(0)
    _trainer(tmp_path / "ok", ok, num_sanity_val_steps=sanity).fit(
        WeightedValidation(), DataLoader(TensorDataset(X[:120], Y[:120]), batch_size=32, shuffle=True),
        _weighted_val())
    assert ok.report is not None and not any(r.error for r in ok.report.schemes.values())


def first_two(batch):
    return batch[0], batch[1]


def _preds_only(out):  # a one-argument output_transform: the documented form is (outputs, targets)
    return out


def _squared(out, t):
    return out, t


def test_an_output_transform_or_metric_failing_on_the_validation_batch_is_named_without_the_layout_advice(tmp_path):
    """nu57: ``output_transform`` taking one argument failed before training with "dict_logits() takes 1
    positional argument but 2 were given", then "give the validation batches the training batches'
    layout, or pass batch_fn=...": advice for another fault (the batches had the training layout);
    ``assess`` said "give them in the layout, dtype and device the model takes". The function or
    metric that failed is named now, with its signature."""
    import torchmetrics

    data = DataLoader(TensorDataset(X[:120], Y[:120]), batch_size=32), DataLoader(TensorDataset(X[120:], Y[120:]),
                                                                                 batch_size=64)
    cases = [({"output_transform": _preds_only, "utility_metrics": {"mae": torchmetrics.MeanAbsoluteError()}},
              r"output_transform '_preds_only', which .* takes \(outputs, targets\) and returns \(preds, targets\)"),
             ({"output_transform": _squared, "utility_metrics": {"acc": torchmetrics.classification.BinaryAccuracy()}},
              r"utility metric 'acc', which")]
    for i, (kw, match) in enumerate(cases):
        cb = MISCallback(SCHEMES, loss_fn=mse, **kw, **FAST)
        pl.seed_everything(0)
        trainer = _trainer(tmp_path / str(i), cb)
        with pytest.raises(Exception, match=match) as info:
            trainer.fit(Regressor(), *data)
        assert "batch_fn=" not in str(info.value) and trainer.global_step == 0
    # assess's own check of the validation batch: the same naming instead of "give them in the layout"
    with pytest.raises(RuntimeError, match=r"output_transform '_preds_only', which") as info:
        ml.assess(Regressor(), SCHEMES, data[0], mse, val_dataloader=data[1], output_transform=_preds_only,
                  metrics={"mae": torchmetrics.MeanAbsoluteError()}, **FAST)
    assert "layout" not in str(info.value)


def test_a_best_checkpoint_other_than_the_assessed_weights_is_said(tmp_path):
    """EarlyStopping(patience) with ModelCheckpoint(monitor="val_loss"): the report is of the last
    weights, the best checkpoint (what test(ckpt_path="best") evaluates) is another model; the
    report said nothing (fu24 a06: 0.158 reported, 0.183 for the best checkpoint)."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    class Noisy(Regressor):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)  # oscillates: the best is not the last

    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val_loss", save_top_k=1)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=12, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=[cb, ck, EarlyStopping("val_loss", patience=2)])
    Xn = (X - MU) / SD
    trainer.fit(Noisy(), DataLoader(TensorDataset(Xn[:120], Y[:120]), batch_size=32, shuffle=True),
                DataLoader(TensorDataset(Xn[120:], Y[120:]), batch_size=64))
    last = float(trainer.callback_metrics["val_loss"])
    notes = [w for w in cb.report.warnings if "ModelCheckpoint(monitor='val_loss')" in w]
    assert float(ck.best_model_score) != last
    assert len(notes) == 1 and ck.best_model_path.split("/")[-1] in notes[0]
    # the best is the last: no note
    ck2 = ModelCheckpoint(dirpath=str(tmp_path / "ck2"), monitor="val_loss", save_top_k=1)
    cb2 = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=[cb2, ck2])
    trainer.fit(Regressor(), DataLoader(TensorDataset(Xn[:120], Y[:120]), batch_size=32, shuffle=True),
                DataLoader(TensorDataset(Xn[120:], Y[120:]), batch_size=64))
    assert float(ck2.best_model_score) == float(trainer.callback_metrics["val_loss"])
    assert not [w for w in cb2.report.warnings if "ModelCheckpoint" in w]
