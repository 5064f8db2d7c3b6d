"""A researcher adds MISCallback / assess to their own training (session 40, ua40): pre-batched
data (``DataLoader(batch_size=None)``), a module without ``validation_step``, per-output losses,
several training loaders. Each used to fail late, miscount or drop a figure silently."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as tF
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import mis_lightning as ml
from mis_lightning import MISCallback
from mis_lightning.estimation.batching import items_are_batches
from mis_lightning.estimation.estimate import N_ASSUMED

# the callback's mechanics are under test, not the headline's Monte Carlo (tests/test_callback.py's FAST)
FAST = {"covariance": "independent", "mc_draws": 1024, "uncertainty_draws": 0}

_g = torch.Generator().manual_seed(0)
X = torch.randn(96, 3, generator=_g)
Y = X @ torch.tensor([1.0, -1.0, 0.5]) + 0.1 * torch.randn(96, generator=_g)


def mse(o, t):
    return (o.squeeze(-1) - t) ** 2


def mse_per_output(o, t):
    return (o - t[:, None]) ** 2  # [B, k]: one loss per output


class PreBatched(Dataset):
    """Each item is already a batch of ``size`` records (the last one shorter)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return -(-len(X) // self.size)

    def __getitem__(self, i):
        return X[i * self.size:(i + 1) * self.size], Y[i * self.size:(i + 1) * self.size]


class NoValidationStep(pl.LightningModule):
    def __init__(self, outputs: int = 1):
        super().__init__()
        self.net = nn.Linear(3, outputs)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            batch = next(iter(batch.values()))
        return mse_per_output(self(batch[0]), batch[1]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    # the callback writes mis_report.json / mis_privacy_utility.png to the Trainer's default_root_dir,
    # the working directory here: not the checkout's
    monkeypatch.chdir(tmp_path)


def _trainer(cb, **kw):
    return pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_items_are_batches_only_without_automatic_batching():
    ds = TensorDataset(X, Y)
    assert items_are_batches(DataLoader(ds, batch_size=None))
    assert not items_are_batches(DataLoader(ds, batch_size=8))
    assert not items_are_batches(DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]))  # batches of records
    assert not items_are_batches([(X, Y)])


def test_assess_on_pre_batched_data_counts_records_and_states_the_assumed_count(caplog):
    """len(dataset) of DataLoader(batch_size=None) counts batches (4 here): "auto" took it as the
    record count. Now the count is unknown before the pass, N_ASSUMED is assumed and said; the
    figures are those of the same records in ordinary batches (the sums are over records:
    equal up to float64 rounding, 1e-12 relative)."""
    model = nn.Linear(3, 1)
    kw = dict(weight_decay=1e-3, **FAST)
    ref = ml.assess(model, ["rtn_int4"], DataLoader(TensorDataset(X, Y), batch_size=32), mse,
                    val_dataloader=DataLoader(TensorDataset(X, Y), batch_size=32), **kw)
    with caplog.at_level(logging.WARNING, logger="mis_lightning"):
        rep = ml.assess(model, ["rtn_int4"], DataLoader(PreBatched(25), batch_size=None), mse,
                        val_dataloader=DataLoader(PreBatched(40), batch_size=None), **kw)
    assert rep.n == ref.n == len(X)
    assert rep.schemes["rtn_int4"].leakage == pytest.approx(ref.schemes["rtn_int4"].leakage, rel=1e-12)
    assert rep.schemes["rtn_int4"].utility["loss"] == pytest.approx(ref.schemes["rtn_int4"].utility["loss"], rel=1e-12)
    said = [w for w in rep.warnings if "whole batches" in w]
    assert len(said) == 1 and f"assuming {N_ASSUMED:,} records" in said[0] and "same choice" in said[0]
    assert any("whole batches" in r.getMessage() for r in caplog.records)  # before the pass, too
    assert not any("whole batches" in w for w in ref.warnings)


def test_callback_on_pre_batched_data_without_validation_step_measures_the_utility():
    """Pre-batched training and validation loaders on a module without validation_step: the
    callback read the list of a few collated batches as one batch and refused it before training
    ("list of length 4, not (inputs, targets)"); Lightning skips the validation loop of such a
    module, and the callback said "no validation dataloader", dropping the utility figures. Now
    the quantized copies' loss is measured on the data given, and a shuffled loader trained on
    2 of its 4 items per epoch counts every record it can draw, with a note (read as a stream,
    the first 2 items of another shuffle were assessed: n = 50, said to be those trained on)."""
    cb = MISCallback(["rtn_int4"], loss_fn=mse, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(cb, limit_train_batches=2).fit(NoValidationStep(), DataLoader(PreBatched(25), batch_size=None,
                                                                               shuffle=True),
                                                DataLoader(PreBatched(40), batch_size=None))
    assert cb.last_error is None and cb.report.n == len(X)
    assert "loss" in cb.report.schemes["rtn_int4"].utility
    assert not any("no validation dataloader" in w for w in cb.report.warnings)
    assert any(f"assuming {N_ASSUMED:,} records" in w for w in cb.report.warnings)
    assert any("trained on 2 of 4 batches of a shuffled loader" in w and "4 pre-batched items" in w
               for w in cb.report.warnings)


def test_pre_batched_first_item_is_checked_before_training():
    """The first pre-batched item goes through the loss before the first step (a scalar loss);
    every_n_val_epochs on a module without validation_step (no validation epoch ever ends: the
    callback silently ran at the end of fit only) is said at setup."""
    cb = MISCallback(["rtn_int4"], loss_fn=lambda o, t: mse(o, t).mean(), every_n_val_epochs=1, **FAST)
    trainer = _trainer(cb)
    with pytest.warns(UserWarning, match=r"every_n_val_epochs=1 .* no validation_step on NoValidationStep"), \
            pytest.raises(ValueError, match=r"returned shape \[\] for a batch of 25 records"):
        trainer.fit(NoValidationStep(), DataLoader(PreBatched(25), batch_size=None),
                    DataLoader(PreBatched(40), batch_size=None))
    assert trainer.global_step == 0


def _token_losses(logits, labels):
    """Cross-entropy per token [B, T] (reduction='none'): not yet one loss per record."""
    return tF.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")


class _TokenLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(6, 4, padding_idx=0), nn.Linear(4, 6)

    def forward(self, ids):
        return self.head(self.emb(ids))

    def training_step(self, batch, batch_idx):
        return tF.cross_entropy(self(batch[0]).flatten(0, 1), batch[1].flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_per_token_loss_with_ignored_padding_is_told_the_masked_mean():
    """[B, T] per-token losses of padded sequences (labels -100 where padded): the advice was
    ``.mean(dim=-1)``, which counts the padded tokens' zero losses, so a record's loss moved with
    its batch's longest record (nu42a). The hint now names the ignore index and the masked mean,
    in assess and before the callback's first training step."""
    from mis_lightning.estimation.per_sample import loss_shape_hint

    labels = torch.tensor([[1, 2, -100], [3, 4, 5]])
    hint = loss_shape_hint((2, 3), 2, labels)
    assert "the targets hold -100, an ignore_index" in hint and "losses.sum(-1) / (targets != -100).sum(-1)" in hint
    assert ".mean(dim=-1) when training" not in hint
    assert ".mean(dim=-1) when training" in loss_shape_hint((2, 3), 2, labels.clamp(min=0))  # no padding: as before
    ids = torch.tensor([[1, 2, 0], [3, 4, 5]] * 8)
    loader = DataLoader(TensorDataset(ids, torch.where(ids == 0, -100, ids)), batch_size=16)
    with pytest.raises(ValueError, match=r"got \[16, 3\] \(a loss per record and per token.*-100, an ignore_index"):
        ml.assess(_TokenLM(), ["rtn_int4"], loader, _token_losses)
    cb = MISCallback(["rtn_int4"], loss_fn=_token_losses, **FAST)
    trainer = _trainer(cb)
    with pytest.raises(ValueError, match=r"returned shape \[16, 3\] .*-100, an ignore_index.*\(targets != -100\)"):
        trainer.fit(_TokenLM(), loader)
    assert trainer.global_step == 0


def test_a_loss_per_output_is_refused_before_training_saying_how_to_reduce_it():
    """[B, k] losses: named with the reduction matching a training loss averaged over every entry
    (assess advised summing, which changes the balance with weight decay)."""
    cb = MISCallback(["rtn_int4"], loss_fn=mse_per_output, **FAST)
    trainer = _trainer(cb)
    with pytest.raises(ValueError, match=r"returned shape \[16, 3\] .*\(a loss per record and per output, 3 of "
                                         r"them.*\.mean\(dim=-1\) when training averages over every entry"):
        trainer.fit(NoValidationStep(3), DataLoader(TensorDataset(X, Y), batch_size=16))
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match=r"got \[16, 3\] \(a loss per record and per output.*\.mean\(dim=-1\)"):
        ml.assess(nn.Linear(3, 3), ["rtn_int4"], DataLoader(TensorDataset(X, Y), batch_size=16), mse_per_output)


def test_a_broadcast_loss_is_told_so_not_to_reduce_it():
    """[B, B] losses from outputs [B, 1] against targets [B] (nux54 #4): the first error named a loss
    per output and advised .mean(dim=-1), which led to the "not per-sample" error; it names the
    broadcast now, in assess and before the callback's first training step (the shapes either way
    round, or both [B] with an unsqueeze inside the loss)."""
    from mis_lightning.estimation.per_sample import loss_shape_hint

    b = torch.zeros(4)
    for o, t, how in ((b[:, None], b, "outputs [B, 1] against targets [B]"),
                      (b, b[:, None], "outputs [B] against targets [B, 1]"),
                      (b, b, "outputs and targets both [B], one unsqueezed inside the loss (o.unsqueeze(-1) or [:, None])")):
        hint = loss_shape_hint((4, 4), 4, t, o)
        assert hint.startswith(f" (a broadcast, not a loss per output: {how} give [B, B] = [4, 4]"), hint
        assert ".mean(dim" not in hint and "outputs.squeeze(-1) or targets.reshape(-1)" in hint
    assert "a loss per record and per output" in loss_shape_hint((4, 4), 4, b, torch.zeros(4, 4))  # outputs [B, B]

    def broadcast(o, t):
        return (o - t) ** 2  # outputs [16, 1] - targets [16] -> [16, 16]
    loader = DataLoader(TensorDataset(X, Y), batch_size=16)
    with pytest.raises(ValueError, match=r"got \[16, 16\] \(a broadcast, not a loss per output: outputs \[B, 1\] "):
        ml.assess(nn.Linear(3, 1), ["rtn_int4"], loader, broadcast)
    trainer = _trainer(MISCallback(["rtn_int4"], loss_fn=broadcast, **FAST))
    with pytest.raises(ValueError, match=r"returned shape \[16, 16\] .*\(a broadcast, not a loss per output"):
        trainer.fit(NoValidationStep(1), loader)
    assert trainer.global_step == 0


def test_several_training_loaders_are_refused_before_training_naming_them():
    cb = MISCallback(["rtn_int4"], loss_fn=mse, **FAST)
    trainer = _trainer(cb)
    loaders = {"labelled": DataLoader(TensorDataset(X, Y), batch_size=16),
               "extra": DataLoader(TensorDataset(X, Y), batch_size=16)}
    with pytest.raises(ValueError, match=r"one training dataloader, got 2 \('labelled', 'extra'\).*ConcatDataset"):
        trainer.fit(NoValidationStep(), loaders)
    assert trainer.global_step == 0


class LayersInConfigureModel(NoValidationStep):
    """Builds its layer in ``configure_model`` (Lightning's pattern for large models), which
    Lightning calls after the callbacks' ``setup``; counts its optimizer steps."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        self.net, self.steps = None, 0

    def configure_model(self):
        if self.net is None:
            self.net = nn.Linear(3, 1)

    def on_before_optimizer_step(self, optimizer):
        self.steps += 1


def test_layers_built_in_configure_model_are_assessed_and_checked_before_training():
    """nu43: the callback's setup checks found no parameter (``configure_model`` had not run) and
    refused the fit ("no parameter selected for assessment"). Now they run in on_train_start,
    still before the first optimizer step: the fit is assessed, and a misspelled ``params=`` still
    raises before any step."""
    cb = MISCallback(["rtn_int4"], loss_fn=mse, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(cb).fit(LayersInConfigureModel(), DataLoader(TensorDataset(X, Y), batch_size=32))
    assert cb.last_error is None and cb.report.n == len(X) and cb.report.d == 4
    model = LayersInConfigureModel()
    with pytest.raises(KeyError, match=r"params not in the model: \['net.weigth'\]"):
        _trainer(MISCallback(["rtn_int4"], loss_fn=mse, params=["net.weigth"], **FAST)).fit(
            model, DataLoader(TensorDataset(X, Y), batch_size=32))
    assert model.steps == 0


def test_names_of_a_compiled_submodule_are_taken_with_or_without_orig_mod():
    """A submodule compiled in configure_model names its parameters with '_orig_mod.' (as its
    state_dict does). nu43 refused a params= or weight_decay= name without it, suggesting the right
    one; nu45 takes it as an alias of that parameter (the name before ``torch.compile``), for
    params= and weight_decay= alike; a misspelled name still raises with the suggestion. The names
    of ``torch.compile(nn.Linear(3, 2))`` held as ``backbone``, without importing dynamo (seconds)."""
    from mis_lightning._fields import canonical_decay
    from mis_lightning.assess import select_params
    from mis_lightning.estimation.estimate import check_decay_names

    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone._orig_mod = nn.Linear(3, 2)  # what OptimizedModule holds
    model.head = nn.Linear(2, 1)
    assert select_params(model, ["backbone.weight", "backbone._orig_mod.weight", "head.bias"]) == [
        "backbone._orig_mod.weight", "head.bias"]
    check_decay_names({"backbone.weight": 1e-2, "head.bias": 0.0}, model)
    assert canonical_decay({"backbone.weight": 1e-2, "head.bias": 0.0}, model) == {
        "backbone._orig_mod.weight": 1e-2, "head.bias": 0.0}
    with pytest.raises(ValueError, match="two coefficients"):
        canonical_decay({"backbone.weight": 1e-2, "backbone._orig_mod.weight": 0.0}, model)
    with pytest.raises(KeyError, match=r"'backbone.wieght': did you mean 'backbone._orig_mod.weight'"):
        select_params(model, ["backbone.wieght"])
    with pytest.raises(KeyError, match=r"'backbone.wieght': did you mean 'backbone._orig_mod.weight'"):
        check_decay_names({"backbone.wieght": 1e-2}, model)


class WithValidationStep(NoValidationStep):
    def validation_step(self, batch, batch_idx):
        return mse(self(batch[0]), batch[1]).mean()


def test_an_explicit_dirpath_names_every_file_it_overwrites(tmp_path):
    """rv54c: the warning named mis_report.json only, while the figure, the planner's files and the
    mid-training copies at the same epoch and step are overwritten too (no fit: the names in a folder);
    ux55b: a figure left without its report keeps a folder the library picks versioned."""
    from mis_lightning.callback import files_overwritten, overwrite_warning
    from mis_lightning.tracking import free_version

    assert free_version(tmp_path) == "" and files_overwritten(tmp_path, True, True) == ([], [])
    (tmp_path / "mis_privacy_utility.png").write_bytes(b"")
    assert free_version(tmp_path) == "-v1"  # was "": the figure overwritten silently
    for name in ("mis_report.json", "mis_plan.md", "mis_report_epoch=10-step=40.json", "mis_report_epoch=2-step=8.json",
                 "mis_report_epoch=2-step=8-v1.json", "notes.json"):
        (tmp_path / name).write_text("{}")
    fixed, copies = files_overwritten(tmp_path, plan=True, copies=True)
    assert fixed == ["mis_report.json", "mis_privacy_utility.png", "mis_plan.md"]
    assert copies == ["mis_report_epoch=2-step=8.json", "mis_report_epoch=10-step=40.json"]
    assert files_overwritten(tmp_path, plan=False, copies=False) == (fixed[:2], [])
    assert overwrite_warning("d", fixed, copies) == (
        "MISCallback: dirpath='d' holds mis_report.json, mis_privacy_utility.png, mis_plan.md and the mid-training "
        "copies mis_report_epoch=2-step=8.json, mis_report_epoch=10-step=40.json (each rewritten where this fit "
        "assesses at the same epoch and step, the others left beside this fit's) under the names this fit writes: "
        "this fit overwrites them (an explicit dirpath keeps the file names fixed; the folder's other files are left "
        "as they are; leave dirpath unset, or pass a fresh one, to keep both)")
    # rv55u: the callback asks for the plan's files with plan= and the copies with mid-training runs (no fit:
    # its first write's choice, as on rank 0; a fit's run is test_a_second_run_in_the_same_folder_...)
    from types import SimpleNamespace

    for kw, want in (({}, (fixed[:2], [])),
                     ({"plan": {"candidates": ["rtn_int8"]}, "every_n_val_epochs": 1}, (fixed, copies))):
        cb = MISCallback(["rtn_int8"], loss_fn=mse, dirpath=tmp_path, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cb._out_version(tmp_path, SimpleNamespace(fast_dev_run=False))
        assert [str(w.message) for w in caught] == [overwrite_warning(str(tmp_path), *want)]


def test_the_folder_is_said_where_it_is_the_default_root_dir_nobody_named():
    """ux55a: the report's folder is said at the start of fit where it is the Trainer's
    ``default_root_dir`` by default: no logger (Lightning's ``log_dir`` is then that folder), or a
    logger whose ``save_dir`` is it or that has none (an MLflow database store); not where ``dirpath=``,
    a checkpoint callback or a logger's own folder names another (a W&B logger: its run's files folder,
    whatever its ``save_dir``; ux57)."""
    from types import SimpleNamespace

    from mis_lightning._lightning_support import root_dir_note

    def trainer(**kw):
        return SimpleNamespace(**{"checkpoint_callback": None, "fast_dev_run": False, "default_root_dir": ".",
                                  "log_dir": None, **kw})

    said = [root_dir_note(trainer(), None), root_dir_note(trainer(log_dir="."), None),
            root_dir_note(trainer(log_dir=str(Path.cwd())), None)]
    assert all(f"the Trainer's default_root_dir, {Path.cwd().resolve()} (" in n for n in said)
    assert [root_dir_note(trainer(log_dir="lightning_logs/version_0"), None), root_dir_note(trainer(), "."),
            root_dir_note(trainer(checkpoint_callback=object()), None),
            root_dir_note(trainer(fast_dev_run=1), None)] == [None] * 4

    class WandbLogger:  # the name is what marks a W&B logger (either Lightning package)
        save_dir = "."

    assert root_dir_note(trainer(log_dir=".", loggers=[WandbLogger()]), None) is None


def test_an_mlflow_file_store_gets_the_report_in_the_runs_folder(tmp_path):
    """ux55a's leftover: Lightning's ``trainer.log_dir`` is an MLflow logger's ``save_dir``, the root of a
    ``file:`` store that holds every experiment's runs; without checkpointing the report went there,
    unannounced. It now goes to the run's folder, ``<store>/<experiment id>/<run id>`` (where
    ``ModelCheckpoint`` puts ``checkpoints/``), on every rank (rank 0 alone has the run: broadcast);
    a database store (no ``save_dir``) keeps ``default_root_dir``, said at the start of fit. The real
    MLFlowLogger's attributes are checked in tests/test_loggers.py."""
    from types import SimpleNamespace

    from mis_lightning._lightning_support import report_dir, root_dir_note

    class StandIn:  # the attributes of Lightning's MLFlowLogger the folder is read from
        def __init__(self, save_dir, name, version):
            self.save_dir, self.name, self.version = save_dir, name, version

        @property
        def run_id(self):
            raise AssertionError("read on the class: reading it starts the run")

    sent = []

    def trainer(logger, **kw):
        def broadcast(obj, src=0):  # rank 0's names, as Lightning's strategy sends them
            sent.append(obj)
            return ("7", "abc")
        return SimpleNamespace(**{"loggers": [logger], "log_dir": logger.save_dir, "checkpoint_callback": None,
                                  "fast_dev_run": False, "default_root_dir": str(tmp_path),
                                  "strategy": SimpleNamespace(broadcast=broadcast), **kw})

    store = str(tmp_path / "mlruns")
    for rank_names in (("7", "abc"), (None, None)):  # rank 0; another rank (no run there)
        t = trainer(StandIn(store, *rank_names))
        assert report_dir(t, None) == tmp_path / "mlruns" / "7" / "abc" and root_dir_note(t, None) is None
    assert sent == [("7", "abc"), (None, None)]
    database = trainer(StandIn(None, "7", "abc"))
    assert report_dir(database, None) == tmp_path and "default_root_dir" in root_dir_note(database, None)
    checkpoints = trainer(StandIn(store, "7", "abc"), checkpoint_callback=SimpleNamespace(dirpath="ck"))
    assert report_dir(checkpoints, None) == Path("ck") and report_dir(checkpoints, "mine") == Path("mine")
    assert report_dir(trainer(SimpleNamespace(save_dir=store, name="n", version=0)), None) == Path(store)
    assert len(sent) == 2  # neither a database store, a checkpoint folder, nor another logger broadcasts


def test_the_folder_note_reads_log_dir_on_every_process(monkeypatch):
    """rv55z: ``trainer.log_dir`` broadcasts (a collective every process must call); the folder note
    read it on rank 0 alone, so a DDP fit with ``enable_checkpointing=False`` and no ``dirpath`` hung
    in ``setup``. A rank other than 0 must read it too (and print nothing)."""
    cb = MISCallback(["rtn_int8"], loss_fn=mse_per_output)
    trainer = _trainer(cb)
    calls = []
    strategy = type(trainer.strategy)
    monkeypatch.setattr(strategy, "is_global_zero", property(lambda s: False))
    monkeypatch.setattr(strategy, "broadcast", lambda s, obj, src=0: calls.append(obj) or obj)
    cb.setup(trainer, NoValidationStep(), "fit")
    assert calls == [trainer.default_root_dir]


def test_a_second_run_in_the_same_folder_keeps_the_first_runs_report(caplog):
    """nux53: with ``logger=False, enable_checkpointing=False`` and no ``dirpath`` the report goes to
    the Trainer's ``default_root_dir`` (the working directory), where a second run overwrote the
    first's ``mis_report.json`` silently. Each fit now writes its files under a name no earlier run
    holds, as ``ModelCheckpoint`` does (``-v1``), and says so; a fit's own runs (mid-training, then
    the end of fit) rewrite its own files. ux54c: an explicit ``dirpath=`` (run 2, the same folder)
    keeps the fixed names, so ``<dirpath>/mis_report.json`` is this fit's; it overwrites with a warning.
    ux55a: a name is free only where no file of the fit's names has it (a user's figure, or one whose
    report is gone, was overwritten), and the folder is said once per fit where nothing names it."""
    reports, warned = [], []
    mine = Path("mis_privacy_utility-v1.png")
    mine.write_bytes(b"a figure kept from an earlier run whose report was moved")
    for run in range(3):
        cb = MISCallback(["rtn_int4"], loss_fn=mse, every_n_val_epochs=1 if run == 1 else None,
                         dirpath=str(Path.cwd()) if run == 2 else None, **FAST)
        if run == 1:  # rv55u: run 0's figure alone (its report moved away) keeps this fit's names apart, and the
            Path("mis_report.json").rename("moved.json")  # line names the figure, not a report that is not there
        if run == 2:  # rv54c: a file of the user's and a copy this fit (no mid-training run) does not write
            Path("moved.json").rename("mis_report.json")
            Path("notes.txt").write_text("mine")
            Path("mis_report_epoch=0-step=3.json").write_text("{}")
            before = {p.name: p.stat().st_mtime_ns for p in Path.cwd().iterdir() if p.is_file()}
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            caplog.clear()
            pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(
                WithValidationStep(), DataLoader(TensorDataset(X, Y), batch_size=32),
                DataLoader(TensorDataset(X, Y), batch_size=48))
        assert cb.last_error is None
        reports.append(cb.report_path)
        warned.append([str(w.message) for w in caught if "this fit overwrites" in str(w.message)])
        if run == 0:
            first = cb.report_path.read_text()
        roots = [r.getMessage() for r in caplog.records if "go to the Trainer's default_root_dir" in r.getMessage()]
        assert len(roots) == (run < 2) and all(f"default_root_dir, {Path.cwd().resolve()} (" in r for r in roots)
        said = [r.getMessage() for r in caplog.records if "report: " in r.getMessage()]
        assert said and all(str(cb.report_path) in s for s in said)
        assert all(("(mis_privacy_utility.png already there, kept)" in s) == (run == 1) for s in said)
        assert all(("an earlier run's, overwritten: dirpath= given" in s) == (run == 2) for s in said)
    assert [p.name for p in reports] == ["mis_report.json", "mis_report-v2.json", "mis_report.json"]
    assert all(p.parent.resolve() == Path.cwd().resolve() for p in reports)  # Lightning's default_root_dir
    assert warned[:2] == [[], []] and len(warned[2]) == 1  # once per fit, at its first write
    # rv54c: the warning names every file the fit overwrites, and the fit overwrites nothing else
    assert warned[2][0].startswith(f"MISCallback: dirpath={str(Path.cwd())!r} holds mis_report.json, "
                                   "mis_privacy_utility.png under the names this fit writes: this fit overwrites them")
    after = {p.name: p.stat().st_mtime_ns for p in Path.cwd().iterdir() if p.is_file()}  # written (the figure: same bytes)
    assert {k for k in before if after.get(k) != before[k]} == {"mis_report.json", "mis_privacy_utility.png"}
    assert set(after) == set(before)
    Path("notes.txt").unlink()
    Path("mis_report_epoch=0-step=3.json").unlink()
    assert {p.name for p in Path.cwd().glob("mis_privacy_utility*.png")} == {
        "mis_privacy_utility.png", "mis_privacy_utility-v1.png", "mis_privacy_utility-v2.png"}
    assert mine.read_bytes() == b"a figure kept from an earlier run whose report was moved"
    # run 1's mid-training copies carry its suffix; run 2 (end of fit only) wrote none
    assert sorted(p.name for p in Path.cwd().glob("mis_report_epoch=*")) == [
        "mis_report_epoch=0-step=3-v2.json", "mis_report_epoch=1-step=6-v2.json"]
    assert json.loads(reports[2].read_text())["lightning"]["stage"] == "fit_end"
    assert reports[0].read_text() != first  # run 2 rewrote it (timings differ at least)
    assert json.loads(reports[1].read_text())["lightning"]["epoch"] == 1  # run 1's last run, in its own file
