"""MISCallback and the records it assesses against those trained on: a train loader the Trainer
rebuilds (``reload_dataloaders_every_n_epochs``) and random augmentation in the dataset's
``__getitem__`` were documented (fu24 F6/F7) but not said in the report (cb25)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    SubsetRandomSampler,
    TensorDataset,
)

from mis_lightning import MISCallback
from mis_lightning._augmentation import random_records_note
from mis_lightning._warning_lines import warning_line

SCHEMES = ["rtn_int8"]
FAST = {"covariance": "independent", "uncertainty_draws": 0}

g = torch.Generator().manual_seed(0)
X = torch.randn(424, 4, generator=g)
Y = X[:, 0] - 0.5 * X[:, 1] + 0.2 * torch.randn(424, generator=g)


def mse(o, t):
    return 0.5 * (o - t) ** 2


class Regressor(pl.LightningModule):
    def __init__(self, sets=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
        # "same": one dataset object; "curriculum": another one each epoch; "sampler": one
        # dataset, a SubsetRandomSampler over other records each epoch
        self.sets = sets

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", ((self(batch[0]) - batch[1]) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        e = self.trainer.current_epoch
        if self.sets == "same":
            if not hasattr(self, "_ds"):
                self._ds = TensorDataset(X[:128], Y[:128])
            ds = self._ds
        elif self.sets == "sampler":
            if not hasattr(self, "_ds"):
                self._ds = TensorDataset(X[:384], Y[:384])
            return DataLoader(self._ds, batch_size=32, sampler=SubsetRandomSampler(range(128 * e, 128 * (e + 1))))
        else:  # a curriculum: 128 other records each epoch
            ds = TensorDataset(X[128 * e:128 * (e + 1)], Y[128 * e:128 * (e + 1)])
        return DataLoader(ds, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(X[384:], Y[384:]), batch_size=40)


def _fit(tmp_path, module, cb=None, train=None, epochs=3, **kw):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, callbacks=[cb] if cb else [], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path), **kw)
    if train is None:
        trainer.fit(module)
    else:
        trainer.fit(module, train, DataLoader(TensorDataset(X[384:], Y[384:]), batch_size=40))
    return trainer


@pytest.mark.parametrize("how", ["curriculum", "sampler"])
def test_a_curriculum_of_reloaded_datasets_is_said_in_the_report(tmp_path, how):
    """fu24 F6: three datasets of 128 records (one per epoch, reload_dataloaders_every_n_epochs=1),
    or one dataset with a SubsetRandomSampler over other records each epoch: the report counted
    the last 128 and said nothing. It names the reloads and what is left out."""
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    _fit(tmp_path, Regressor(how), cb, reload_dataloaders_every_n_epochs=1)
    assert cb.report is not None and cb.report.n == 128
    notes = [w for w in cb.report.warnings if w.startswith("reload_dataloaders_every_n_epochs=1")]
    assert len(notes) == 1, cb.report.warnings
    assert "rebuilt over 3 different training sets (datasets, or samplers drawing other records; of 128, 128, " \
           "128 records)" in notes[0]
    assert "only the last one's records are assessed (n=128)" in notes[0]
    assert notes[0] in cb.report.table(verbose=True)  # printed under the table: in full where verbose,
    assert f"  - {warning_line(notes[0])}" in cb.report.table().splitlines()  # else one line (nux51 #9)
    assert "rebuilt over 3 different training sets" in warning_line(notes[0])
    import pickle

    again = pickle.loads(pickle.dumps(cb))  # the callback pickles after the fit (weak references dropped)
    assert again._sets.datasets == cb._sets.datasets


def test_a_reloaded_loader_over_one_dataset_object_is_said_as_such(tmp_path):
    """Reloads over the same dataset object: the records assessed are those trained on; the
    report says so (and what it cannot see: a dataset changing its records in place)."""
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    _fit(tmp_path, Regressor("same"), cb, reload_dataloaders_every_n_epochs=1)
    assert cb.report is not None and cb.report.n == 128
    notes = [w for w in cb.report.warnings if w.startswith("reload_dataloaders_every_n_epochs=1")]
    assert len(notes) == 1 and "rebuilt 2 time(s), each time over the same dataset object and records " \
                               "(TensorDataset, 128 records)" in notes[0], cb.report.warnings
    # no reload: no note
    cb2 = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    _fit(tmp_path, Regressor("same"), cb2)
    assert not [w for w in cb2.report.warnings if "reload_dataloaders" in w]


class Noisy(Dataset):
    """Random augmentation in ``__getitem__``, from the global stream, numpy's, ``random``'s
    and generators the dataset holds (its own and its transform's)."""

    def __init__(self, x, y, source="torch"):
        self.x, self.y, self.source = x, y, source
        self.gen = torch.Generator().manual_seed(3)
        self.transform = {"rng": np.random.default_rng(4), "state": np.random.RandomState(5),
                          "py": random.Random(6)}

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.source == "torch":
            x = x + 0.1 * torch.randn(4)
        elif self.source == "own":
            x = x + 0.1 * torch.randn(4, generator=self.gen)
        elif self.source == "numpy_generator":
            x = x + torch.from_numpy(0.1 * self.transform["rng"].standard_normal(4)).float()
        elif self.source == "flip":  # changes a record with probability 1/2
            x = -x if self.transform["py"].random() < 0.5 else x
        return x, self.y[i]


def _states(ds):
    t = ds.transform
    return (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), ds.gen.get_state(),
            t["rng"].bit_generator.state, t["state"].get_state()[1].copy(), t["py"].getstate())


def _same_states(a, b):
    return all(torch.equal(u, v) if isinstance(u, torch.Tensor) else
               bool(np.array_equal(u, v)) if isinstance(u, np.ndarray) else u == v for u, v in zip(a, b))


def test_random_augmentation_in_the_dataset_is_said_in_the_report_and_training_is_untouched(tmp_path):
    """fu24 F7: a dataset that adds noise in ``__getitem__`` was assessed at one noisy draw per
    record (0.182 against 0.158 on the clean records), silently. The callback reads a few
    records twice, says so before training and in the report; the weights trained are those of
    the same fit without the callback (every random state the reads move is restored)."""
    train = DataLoader(Noisy(X[:120], Y[:120]), batch_size=32, shuffle=True)
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    pl.seed_everything(0)
    with_cb, without = Regressor(), Regressor()
    without.load_state_dict(with_cb.state_dict())
    with pytest.warns(UserWarning, match=r"Noisy returns another value each time a record is read"):
        _fit(tmp_path, with_cb, cb, train=train, epochs=2)
    _fit(tmp_path, without, None, train=train, epochs=2)
    for a, b in zip(with_cb.state_dict().values(), without.state_dict().values()):
        assert torch.equal(a, b)
    notes = [w for w in cb.report.warnings if "returns another value each time a record is read" in w]
    assert len(notes) == 1 and "record 0 read twice differs" in notes[0] and "one random draw" in notes[0]


def test_a_deterministic_dataset_gets_no_augmentation_note(tmp_path):
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    _fit(tmp_path, Regressor(), cb, train=DataLoader(Noisy(X[:120], Y[:120], "none"), batch_size=32), epochs=1)
    assert cb.report is not None and not [w for w in cb.report.warnings if "another value" in w]


@pytest.mark.parametrize("source", ["torch", "own", "numpy_generator", "flip"])
def test_the_augmentation_check_restores_every_random_state(source):
    """Each source of randomness is seen (the flip, changing a record with probability 1/2, on 8
    records read twice: missed with probability 2^-8, not with these seeds), and every state is
    as it was: the global streams, the dataset's own generator and its transform's."""
    ds = Noisy(X[:20], Y[:20], source)
    before = _states(ds)
    assert random_records_note(ds, range(20)) is not None
    assert _same_states(before, _states(ds))
    assert random_records_note(Noisy(X[:20], Y[:20], "none"), range(20)) is None


class Counting(Dataset):
    def __init__(self):
        self.reads = 0

    def __len__(self):
        return 100

    def __getitem__(self, i):
        self.reads += 1
        return torch.full((3,), float("nan")), torch.tensor(i)  # NaN equal to NaN


def test_the_augmentation_check_is_bounded():
    """At most 8 records read twice; past the time bound, one record only; NaN reads as itself."""
    ds = Counting()
    assert random_records_note(ds, range(100)) is None and ds.reads == 16
    ds.reads = 0
    assert random_records_note(ds, range(100), seconds=0.0) is None and ds.reads == 2


class Stream(IterableDataset):
    def __iter__(self):
        for i in range(120):
            yield X[i] + 0.1 * torch.randn(4), Y[i]


def test_a_stream_is_not_read_for_the_check(tmp_path):
    """A stream cannot be read twice: no check and no note (docs/lightning.md says so)."""
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    _fit(tmp_path, Regressor(), cb, train=DataLoader(Stream(), batch_size=32), epochs=1)
    assert cb.report is not None and not [w for w in cb.report.warnings if "another value" in w]


def test_assess_says_random_augmentation_too():
    """The same note from ``mis_lightning.assess`` over a loader whose dataset augments."""
    import mis_lightning as ml

    rep = ml.assess(nn.Linear(4, 1), SCHEMES, DataLoader(Noisy(X[:120], Y[:120]), batch_size=32),
                    lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, **FAST)
    assert [w for w in rep.warnings if "Noisy returns another value each time a record is read" in w]
    rep = ml.assess(nn.Linear(4, 1), SCHEMES, DataLoader(Noisy(X[:120], Y[:120], "none"), batch_size=32),
                    lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, **FAST)
    assert not [w for w in rep.warnings if "another value" in w]


class _Sample:
    """A record as a plain object (compared by identity by Python)."""

    def __init__(self, x) -> None:
        self.x = x


def test_the_augmentation_check_compares_records_by_value():
    """Records returned as fresh objects each read (a plain class, a dataclass of tensors, a
    dict, NaN) are the same record: no note; a changed attribute is seen."""
    import dataclasses

    @dataclasses.dataclass
    class Pair:
        x: torch.Tensor
        y: torch.Tensor

    class Records(Dataset):
        def __init__(self, make, noise=0.0):
            self.make, self.noise = make, noise

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return self.make(X[i] + self.noise * torch.randn(4), Y[i])

    for make in (lambda x, y: _Sample(x), Pair, lambda x, y: {"x": x, "meta": _Sample(float("nan"))}):
        assert random_records_note(Records(make), range(10)) is None
        assert random_records_note(Records(make, 0.1), range(10)) is not None


def test_a_resumed_fit_with_reloads_says_the_earlier_epochs_are_not_seen(tmp_path):
    """Resumed at its last epoch, a reloading fit sees one training set: the earlier epochs'
    (another dataset each, here) are not seen, and the report says so."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    pl.Trainer(max_epochs=2, logger=False, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               reload_dataloaders_every_n_epochs=1, default_root_dir=str(tmp_path)).fit(Regressor("curriculum"))
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    pl.Trainer(max_epochs=3, logger=False, callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1,
               default_root_dir=str(tmp_path)).fit(Regressor("curriculum"), ckpt_path=str(tmp_path / "last.ckpt"))
    notes = [w for w in cb.report.warnings if w.startswith("reload_dataloaders_every_n_epochs=1")]
    assert len(notes) == 1 and "the fit resumed at epoch 2, and the training sets of the epochs before are not " \
                               "seen" in notes[0], cb.report.warnings


class MaskingCollate:
    """A collator that masks random inputs (as a masked-language-model collator does), from
    its own generator, or from the global stream (``own=False``)."""

    def __init__(self, own=True):
        self.gen = torch.Generator().manual_seed(7) if own else None

    def __call__(self, records):
        x = torch.stack([r[0] for r in records])
        y = torch.stack([r[1] for r in records])
        keep = torch.rand(x.shape, generator=self.gen) > 0.15
        return x * keep, y


@pytest.mark.parametrize("own", [True, False])
def test_randomness_in_the_collate_fn_is_said_and_every_state_restored(own):
    """cb25's open case: records read twice are equal, but the loader's ``collate_fn`` draws
    (random masking): the assessed batches are one more draw, not those trained on. The check
    collates the first records twice and says so; the collator's generator and the global
    streams are as they were; a deterministic collate_fn (the default) gets no note."""
    from torch.utils.data import default_collate

    ds = Noisy(X[:20], Y[:20], "none")
    coll = MaskingCollate(own)
    before = _states(ds), torch.get_rng_state(), None if coll.gen is None else coll.gen.get_state()
    note = random_records_note(ds, range(20), collate_fn=coll)
    assert note is not None and "collate_fn" in note and "MaskingCollate" in note
    after = _states(ds), torch.get_rng_state(), None if coll.gen is None else coll.gen.get_state()
    assert _same_states(before[0], after[0]) and torch.equal(before[1], after[1])
    assert own is False or torch.equal(before[2], after[2])
    assert random_records_note(ds, range(20), collate_fn=default_collate) is None
    assert random_records_note(ds, range(20), collate_fn=lambda b: default_collate(b)) is None


def test_assess_and_the_callback_say_a_random_collate_fn(tmp_path):
    """The note reaches the report from both front ends that read a training loader."""
    import mis_lightning as ml

    ds = Noisy(X[:120], Y[:120], "none")
    rep = ml.assess(nn.Linear(4, 1), SCHEMES, DataLoader(ds, batch_size=32, collate_fn=MaskingCollate()),
                    lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, **FAST)
    assert [w for w in rep.warnings if "collate_fn" in w and "MaskingCollate" in w]
    cb = MISCallback(SCHEMES, loss_fn=mse, **FAST)
    with pytest.warns(UserWarning, match="collate_fn"):
        _fit(tmp_path, Regressor(), cb, train=DataLoader(ds, batch_size=32, collate_fn=MaskingCollate()), epochs=1)
    assert [w for w in cb.report.warnings if "collate_fn" in w]
