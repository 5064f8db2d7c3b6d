"""nux50: a quantized weight used outside its module (the tied output head ``h @ self.emb.weight.T``).

torchao releases the Embedding's weight as an ``IntxUnpackedToInt8Tensor`` that runs
``F.embedding`` / ``F.linear`` but not ``.T`` (``aten.permute``): the quantized copy cannot run
the user's forward. Before: every torchao row an error after the whole training (callback) or
the estimation (assess), naming neither the parameter nor the cause, the leakage (already
computed) dropped. Now: named (parameter, op, fixes) before the estimation / the training; a
non-strict row keeps its leakage, its utility reads "failed".
"""

from __future__ import annotations

import importlib
import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import MISCallback, assess
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.release_forward import ReleaseForwardError
from mis_lightning.report import Report

pytest.importorskip("torchao")
assess_module = importlib.import_module("mis_lightning.assess")  # the package's `assess` is the function

V = 8


class Tied(nn.Module):
    """A tied output head: ``form`` "T" (``h @ emb.weight.T``) or "linear" (``F.linear(h, emb.weight)``)."""

    def __init__(self, form: str = "T") -> None:
        super().__init__()
        self.form = form
        self.emb = nn.Embedding(V, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.proj(torch.tanh(self.emb(tok).mean(1)))
        return h @ self.emb.weight.T if self.form == "T" else F.linear(h, self.emb.weight)


def loss(o, t):
    return F.cross_entropy(o, t, reduction="none")


def _data(n: int = 200):
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, V, (n, 6), generator=g)
    return tok, tok[:, 0].clone()


def _model(form: str = "T") -> Tied:
    torch.manual_seed(1)
    m = Tied(form)
    tok, y = _data()
    opt = torch.optim.LBFGS(m.parameters(), max_iter=40, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        val = loss(m(tok), y).mean() + 1e-2 / 2 * sum((p ** 2).sum() for p in m.parameters())
        val.backward()
        return val

    opt.step(closure)
    return m


def _loaders():
    tok, y = _data()
    return DataLoader(TensorDataset(tok, y), batch_size=100), DataLoader(TensorDataset(tok[:50], y[:50]), batch_size=50)


def test_strict_assess_names_the_parameter_the_op_and_the_fix_before_the_estimation(monkeypatch):
    train, val = _loaders()

    def no_estimation(*a, **k):
        raise AssertionError("the estimation pass ran before the refusal")

    monkeypatch.setattr(assess_module, "run_estimation", no_estimation)
    with pytest.raises(ReleaseForwardError) as info:
        assess(_model("T"), ["int8_weight_only", "bf16"], train, loss, weight_decay=1e-2, val_dataloader=val)
    msg = str(info.value)
    assert "'emb.weight'" in msg and "aten.permute" in msg and "'int8_weight_only'" in msg
    assert "F.linear(h, emb.weight)" in msg and "filter_fn" in msg
    assert info.value.params == ("emb.weight",)
    assert isinstance(info.value.__cause__, NotImplementedError)  # the backend's own error kept


def test_non_strict_row_keeps_its_leakage_and_reads_its_utility_failed():
    train, val = _loaders()
    m = _model("T")
    kw = dict(weight_decay=1e-2, strict=False, uncertainty_draws=0)
    with_val = assess(m, ["int8_weight_only", "bf16"], train, loss, val_dataloader=val, **kw)
    without = assess(m, ["int8_weight_only", "bf16"], train, loss, **kw)  # no utility evaluated at all
    row = with_val.schemes["int8_weight_only"]
    assert row.error is None and "'emb.weight'" in row.utility_error and row.utility == {}
    # the leakage is the quantized weights': bitwise the figure of the call that measures no utility
    assert row.leakage == without.schemes["int8_weight_only"].leakage
    assert with_val.schemes["bf16"].utility_error is None and "loss" in with_val.schemes["bf16"].utility
    table = with_val.table()
    line = next(t for t in table.splitlines() if t.startswith("int8_weight_only"))
    assert " failed " in line and "error" not in line
    flat = " ".join(table.split())  # (the verdict and the legend are wrapped at 100 columns)
    assert "not ranked (utility failed" in flat and "utility not measured (its leakage stands)" in flat
    # a saved report keeps the mark
    back = Report.from_dict(json.loads(with_val.to_json()))
    assert back.schemes["int8_weight_only"].utility_error == row.utility_error and back.table() == table


@pytest.mark.parametrize("form, scheme", [
    ("linear", "int8_weight_only"),  # the tie written as the layer's own function
    ("T", "filtered"),  # the Embedding left in float by the scheme's filter_fn (the message's second fix)
])
def test_the_fixes_the_message_gives_run(form, scheme):
    train, val = _loaders()
    s = (get_scheme("int8_weight_only", filter_fn=lambda mod, fqn: fqn != "emb") if scheme == "filtered"
         else get_scheme(scheme))
    r = assess(_model(form), [s], train, loss, weight_decay=1e-2, val_dataloader=val, uncertainty_draws=0)
    row = r.schemes[s.name]
    assert row.error is None and row.utility_error is None and "loss" in row.utility


class TiedModule(pl.LightningModule):
    """The tied head in a LightningModule, with a BatchNorm whose running statistics must not move."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4)
        self.bn = nn.BatchNorm1d(4)
        self.proj = nn.Linear(4, 4)
        self.batches = 0

    def forward(self, tok):
        h = self.proj(self.bn(torch.tanh(self.emb(tok).mean(1))))
        return h @ self.emb.weight.T

    def training_step(self, batch, i):
        self.batches += 1
        return loss(self(batch[0]), batch[1]).mean()

    def validation_step(self, batch, i):
        self.log("val_loss", loss(self(batch[0]), batch[1]).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_refuses_before_the_first_training_batch_and_leaves_the_model_as_it_was(tmp_path):
    train, val = _loaders()
    torch.manual_seed(0)
    m = TiedModule()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cb = MISCallback(schemes=["int8_weight_only", "intx_weight_only_int4", "bf16"], loss_fn=loss)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ReleaseForwardError) as info:
        trainer.fit(m, train, val)
    msg = str(info.value)
    assert "'emb.weight'" in msg and "aten.permute" in msg and "'intx_weight_only_int4'" in msg
    assert m.batches == 0  # no training batch ran
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, BN running stats, counter


def test_the_quantized_copies_run_before_the_estimation_only_where_a_weight_is_used_past_its_layer(monkeypatch):
    """The gate (``uses_outside_layers`` on the float check's forward): a forward whose weights reach
    only their layers' functions (``F.linear`` for the tie too) builds no quantized copy up front."""
    train, val = _loaders()
    calls = []
    real = assess_module.quantized_forward_errors
    monkeypatch.setattr(assess_module, "quantized_forward_errors", lambda *a, **k: calls.append(1) or real(*a, **k))
    assess_module.check_validation_batch(_model("linear"), val, loss, None, None, None,
                                         schemes=assess_module.resolve_schemes(["int8_weight_only"]))
    assert calls == []
    with pytest.raises(ReleaseForwardError):
        assess_module.check_validation_batch(_model("T"), val, loss, None, None, None,
                                             schemes=assess_module.resolve_schemes(["int8_weight_only"]))
    assert calls == [1]


class _TiedRegression(nn.Module):
    """A regression model whose head is tied to its Embedding by ``h @ emb.weight.T`` (the app's
    model API: ``per_sample_loss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return (self.proj(torch.tanh(self.emb(tok).mean(1))) @ self.emb.weight.T)[:, 0]

    def per_sample_loss(self, o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (o - t) ** 2


class _Data:
    """The datamodule surface check_first_batches reads."""

    batch_size = 100

    def __init__(self) -> None:
        tok, y = _data()
        self.train_dataset = TensorDataset(tok, y.float())
        self._val = TensorDataset(tok[:50], y[:50].float())

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self._val, batch_size=50)


def test_the_app_refuses_a_tied_head_before_training():
    """The Hydra app's pre-training check (app.batches.check_first_batches) runs the schemes'
    quantized copies on the validation batch too: before, its check_validation_batch had no
    schemes, and a user's own model tied by `.T` trained fully before the scoring failed."""
    from mis_lightning.app.batches import check_first_batches

    torch.manual_seed(0)
    model, dm = _TiedRegression(), _Data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    schemes = [get_scheme("int8_weight_only"), get_scheme("rtn_int4")]
    with pytest.raises(ReleaseForwardError, match="emb.weight"):
        check_first_batches(model, dm, None, "regression", schemes=schemes, strict=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    check_first_batches(model, dm, None, "regression", schemes=[get_scheme("rtn_int4")])  # plain tensors: runs
    check_first_batches(model, dm, None, "regression")  # no schemes: the float checks alone, as before
