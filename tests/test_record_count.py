"""The records an estimation pass read against the training set's size a front end knows (ux48,
after nux47: a ``drop_last`` loader read 960 of 1,000 records and ``n = 960`` was used silently;
``MISIndicator`` warned only when its updates held more records than ``num_training_records``).
One implementation (:mod:`mis_lightning.record_count`) for ``assess``, the Metric and the callback;
each message names both counts and the culprit."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SubsetRandomSampler, TensorDataset
from torch.utils.data.dataloader import default_collate

import mis_lightning as ml
from mis_lightning._warning_lines import warning_line
from mis_lightning.record_count import records_read_note

N = 200
FAST = dict(estimation="exact", method="clt", uncertainty_draws=0)


def mse(o, t):
    return (o.squeeze(-1) - t) ** 2


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 3, generator=g)
    return X, X @ torch.tensor([1.0, -0.5, 0.25]) + 0.3 * torch.randn(N, generator=g)


def _model(X, Y):
    m = nn.Linear(3, 1)
    with torch.no_grad():
        sol = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1)], 1), Y[:, None]).solution
        m.weight.copy_(sol[:3].T)
        m.bias.copy_(sol[3])
    return m


def _counted(warnings_: list[str]) -> list[str]:
    return [w for w in warnings_ if w.startswith("the estimation pass read")]


def _assess(model, loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ml.assess(model, ["rtn_int8"], loader, mse, **FAST)


def _drop_one(batch):  # a collate_fn that leaves the first record of every batch out
    return default_collate(batch[1:])


def test_assess_names_records_left_out_with_both_counts_and_the_culprit():
    X, Y = _data()
    model, ds = _model(X, Y), TensorDataset(X, Y)
    assert not _counted(_assess(model, DataLoader(ds, batch_size=64)).warnings)  # each record once: no note
    cases = [  # (loader, records read, culprit named)
        (DataLoader(ds, batch_size=64, drop_last=True), 192, "drop_last=True drops the last partial batch (8 records)"),
        (DataLoader(ds, batch_size=50, sampler=SubsetRandomSampler(range(150))), 150,
         "its SubsetRandomSampler draws 150 of them"),
        (DataLoader(ds, batch_size=50, collate_fn=_drop_one), 196, "the collate_fn, batch_fn or loss"),
    ]
    for loader, read, culprit in cases:
        rep = _assess(model, loader)
        assert rep.n == read  # what the figures took
        said = _counted(rep.warnings)
        assert len(said) == 1 and said[0] == rep.warnings[0], rep.warnings  # first: every figure depends on it
        assert f"read {read:,} training records where len(train_dataloader.dataset) is {N}" in said[0]
        assert culprit in said[0] and f"n = {read}" in said[0], said


def test_assess_refuses_one_ddp_process_shard_before_the_pass():
    X, Y = _data()
    loader = DataLoader(TensorDataset(X, Y), batch_size=50,
                        sampler=DistributedSampler(TensorDataset(X, Y), num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(ValueError, match=r"DistributedSampler\(num_replicas=2, rank=0\) reads one process's shard "
                                         r"\(100 of the dataset's 200 records"):
        _assess(_model(X, Y), loader)
    one = DataLoader(TensorDataset(X, Y), batch_size=50,  # a world of one: every record, accepted
                     sampler=DistributedSampler(TensorDataset(X, Y), num_replicas=1, rank=0, shuffle=False))
    assert _assess(_model(X, Y), one).n == N


@pytest.mark.parametrize("fed,cause", [(N - 40, "left records out"), (2 * N, "reset()")])
def test_the_metric_names_fewer_and_more_records_than_stated(fed, cause):
    X, Y = _data()
    model = _model(X, Y)
    met = ml.MISIndicator(model, mse, ["rtn_int8"], num_training_records=N, **FAST)
    idx = torch.arange(fed) % N
    for a in range(0, fed, 40):
        met.update(X[idx[a:a + 40]], Y[idx[a:a + 40]])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        met.compute()
    said = _counted(met.report.warnings)
    assert len(said) == 1 and f"read {fed:,} training records where num_training_records is {N}" in said[0]
    # the cause on the console's one line (nux51 #9), the full text in the report
    assert any(str(w.message) == f"MISIndicator: {warning_line(said[0])}" and cause in str(w.message) for w in rec)
    exact = ml.MISIndicator(model, mse, ["rtn_int8"], num_training_records=fed, **FAST)  # stated right: no note
    for a in range(0, fed, 40):
        exact.update(X[idx[a:a + 40]], Y[idx[a:a + 40]])
    exact.compute()
    assert not _counted(exact.report.warnings)


def test_the_note_is_one_function_of_the_two_counts():
    assert records_read_note(5, 5, "x") is None and records_read_note(5, None, "x") is None
    text = records_read_note(3, 4, "the stated n", causes="a cause")
    assert text.startswith("the estimation pass read 3 training records where the stated n is 4 (0.75x): a cause.")


def test_the_callback_names_a_collate_fn_that_changes_the_count(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    X, Y = _data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 1)

        def forward(self, x):
            return self.net(x)

        def per_sample_loss(self, out, y):
            return mse(out, y)

        def training_step(self, batch, i):
            return self.per_sample_loss(self(batch[0]), batch[1]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    cb = ml.MISCallback(["rtn_int8"], **FAST)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), DataLoader(TensorDataset(X, Y), batch_size=50, collate_fn=_drop_one))
    said = _counted(cb.report.warnings)
    assert cb.report.n == N - 4 and len(said) == 1, cb.report.warnings
    assert f"read {N - 4} training records where the records the training draws from is {N}" in said[0]
    assert "collate_fn" in said[0]


def test_assess_refuses_fewer_than_four_records_naming_the_headlines_need():
    """nux51 #3: the refusal named only the pool column ("the pool protocol's figures are computed
    for n / 2 records"); it names the minimum and what the headline needs of n."""
    X, Y = _data()
    with pytest.raises(ValueError, match=r"^the assessment needs at least 4 training records, got 3: the leakage "
                                         r"\(the headline\) is read from the spread of the records' gradients.*"
                                         r"well above the number of assessed weights \(d = 4 here\)"):
        _assess(_model(X, Y), DataLoader(TensorDataset(X[:3], Y[:3]), batch_size=3))
