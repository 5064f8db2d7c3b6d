"""The tools people use (issue 17): MISCallback under ``pytorch_lightning`` and the unified
``lightning`` package, logging to CSV, TensorBoard, MLflow (local file store) and Weights &
Biases (offline), every one read back: metrics, the figure and the JSON report.

Each optional package is skipped only when it is not installed; CI (.ci/run) installs them all
(the ``loggers`` extra and ``lightning``), so there they all run. One short fit per Lightning
package feeds all four loggers at once (the test time is the loggers' imports and start-up).
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SCHEMES = ["rtn_int8", "rtn_int2"]


def _module_class(pl):
    class Regressor(pl.LightningModule):
        weight_decay = 1e-3

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))

        def forward(self, x):
            return self.net(x).squeeze(-1)

        def per_sample_loss(self, outputs, targets):
            return 0.5 * (outputs - targets) ** 2

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = ((self(x) - y) ** 2).mean()
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", ((self(x) - y) ** 2).mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Regressor


def _loaders():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(160, 4, generator=g)
    y = X[:, 0] - 0.5 * X[:, 1] + 0.2 * torch.randn(160, generator=g)
    return (DataLoader(TensorDataset(X[:120], y[:120]), batch_size=40),
            DataLoader(TensorDataset(X[120:], y[120:]), batch_size=40))


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning"])
def test_callback_logs_to_csv_tensorboard_mlflow_wandb_and_reads_back(package, tmp_path, monkeypatch):
    pl = pytest.importorskip("lightning.pytorch" if package == "lightning" else "pytorch_lightning")
    loggers_mod = importlib.import_module(f"{pl.__name__}.loggers")
    from mis_lightning import MISCallback
    from mis_lightning.callback import lightning_callback

    torch.set_num_threads(1)
    make_cb = lightning_callback if package == "lightning" else MISCallback
    # a folder name with glob characters, as Hydra's job dirs have (`schemes=[a,b]`)
    cb = make_cb(SCHEMES, uncertainty_draws=2, num_records=64, dirpath=str(tmp_path / "mis=[a,b]"))
    assert isinstance(cb, pl.Callback)
    loggers = {"csv": loggers_mod.CSVLogger(str(tmp_path), name="csv")}
    have = {m: importlib.util.find_spec(m) is not None for m in ("tensorboard", "mlflow", "wandb")}
    if have["tensorboard"]:
        loggers["tb"] = loggers_mod.TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    if have["mlflow"]:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store (no server)
        loggers["mlflow"] = loggers_mod.MLFlowLogger(
            experiment_name="mis", tracking_uri=(tmp_path / "mlruns").as_uri())
    if have["wandb"]:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        loggers["wandb"] = loggers_mod.WandbLogger(project="mis", save_dir=str(tmp_path), offline=True)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=1, logger=list(loggers.values()), callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    train, val = _loaders()
    trainer.fit(_module_class(pl)(), train, val)

    report_path = tmp_path / "mis=[a,b]" / "mis_report.json"
    rep = json.loads(report_path.read_text())
    assert list(rep["schemes"]) == SCHEMES and rep["lightning"]["global_step"] == trainer.global_step
    leak = rep["schemes"]["rtn_int8"]["leakage"]

    # CSV: every scheme's metrics, the value as in the report
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {k: float(v) for r in rows for k, v in r.items() if k.startswith("mis/") and v}
    assert logged["mis/rtn_int8/leakage"] == pytest.approx(leak, rel=1e-6)  # CSV keeps ~7 digits
    # the report's row carries the epoch its weights were trained in, as Lightning's rows do
    mis_rows = [r for r in rows if r.get("mis/rtn_int8/leakage")]
    assert [r["epoch"] for r in mis_rows] == ["0"] and rep["lightning"]["epoch"] == 0
    assert {f"mis/{s}/utility/loss" for s in SCHEMES} <= set(logged)

    if have["tensorboard"]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ev = EventAccumulator(loggers["tb"].log_dir, size_guidance={"tensors": 0}).Reload()
        assert ev.Scalars("mis/rtn_int8/leakage")[-1].value == pytest.approx(leak, rel=1e-6)  # float32
        assert "mis_privacy_utility" in ev.Tags()["images"]
        text = ev.Tensors("mis_report/text_summary")[-1].tensor_proto.string_val[0].decode()
        assert "rtn_int8" in text and "verdict: " in text  # the table with its verdict, as text (this 1-epoch fit: "none", ux54e)

    if have["mlflow"]:
        client, run_id = loggers["mlflow"].experiment, loggers["mlflow"].run_id
        run = client.get_run(run_id)
        assert run.data.metrics["mis/rtn_int8/leakage"] == pytest.approx(leak, rel=1e-12)
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"mis_report.json", "mis_privacy_utility.png"} <= names
        local = client.download_artifacts(run_id, "mis_report.json", str(tmp_path / "dl"))
        assert json.loads(open(local).read()) == rep
        # ux56b: without checkpointing nor dirpath= the callback's folder is this run's in the file: store
        # (ModelCheckpoint's save_dir/name/version), read from the real logger's attributes
        from types import SimpleNamespace

        from mis_lightning._lightning_support import report_dir
        alone = SimpleNamespace(loggers=[loggers["mlflow"]], strategy=trainer.strategy, checkpoint_callback=None,
                                log_dir=loggers["mlflow"].save_dir, default_root_dir=str(tmp_path))
        run_dir = report_dir(alone, None)
        assert run_dir.resolve() == (tmp_path / "mlruns" / run.info.experiment_id / run_id).resolve()
        assert (run_dir / "meta.yaml").is_file()  # the run's own folder in the store

    if have["wandb"]:
        wb = loggers["wandb"].experiment
        run_files = tmp_path / "wandb"
        files_dir = next(run_files.glob("offline-run-*/files"))
        # the run's summary (offline runs keep their records in a binary file that is
        # uploaded by `wandb sync`; the summary is the run's own read-back of the last values)
        assert wb.summary["mis/rtn_int8/leakage"] == pytest.approx(leak, rel=1e-12)
        assert json.loads((files_dir / "mis_report.json").read_text()) == rep
        assert list((files_dir / "media" / "images").glob("mis_privacy_utility_*.png"))
        wb.finish()


def test_report_logged_from_another_process_keeps_the_csv_training_rows(tmp_path):
    """fu21: `mis-lightning trainer=ddp_spawn logger=csv` trained in spawned processes (rank 0
    wrote train_loss / val_* to metrics.csv), then logged the report from the main process
    through a CSVLogger that had not written there yet: Lightning's CSV writer deleted the
    existing metrics.csv, so the file held the report's row alone. The training rows stay."""
    from pytorch_lightning.loggers import CSVLogger

    from mis_lightning import assess
    from mis_lightning.tracking import log_report

    rank0 = CSVLogger(tmp_path, name="csv", version="")  # the spawned rank 0's logger
    for step in range(3):
        rank0.log_metrics({"train_loss": 1.0 / (step + 1), "epoch": step}, step=step)
    rank0.save()
    model = nn.Linear(4, 1)
    train, _ = _loaders()
    report = assess(model, ["rtn_int8"], train, lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2,
                    num_records=32, uncertainty_draws=0)
    main = CSVLogger(tmp_path, name="csv", version="")  # the main process's copy of it
    log_report([main], report, step=3)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [r["train_loss"] for r in rows[:3]] == ["1.0", "0.5", "0.3333333333333333"]
    assert float(rows[-1]["mis/rtn_int8/leakage"]) == pytest.approx(report.schemes["rtn_int8"].leakage)


def test_a_wandb_run_gets_the_report_in_its_own_files_folder(tmp_path, monkeypatch):
    """ux56b's leftover: without checkpointing nor ``dirpath=``, Lightning's ``trainer.log_dir`` is a W&B
    logger's ``save_dir``, the root beside W&B's ``wandb/`` folder of every run: the report and figure
    went there. They now go to the run's files folder (``run.dir``), uploaded with the run; the
    logger's copy of them is that same file (no second copy, no error); no note of the working
    directory at the start of fit. A real offline run."""
    pytest.importorskip("wandb")
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

    from mis_lightning import MISCallback

    torch.set_num_threads(1)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save_dir = tmp_path / "runs"
    save_dir.mkdir()
    logger = WandbLogger(project="mis", save_dir=str(save_dir), offline=True)
    cb = MISCallback(SCHEMES, uncertainty_draws=0, num_records=64)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    train, val = _loaders()
    trainer.fit(_module_class(pl)(), train, val)
    run_dir = Path(logger.experiment.dir)
    assert run_dir.parent.parent == save_dir / "wandb" and run_dir.name == "files", run_dir
    assert sorted(p.name for p in run_dir.glob("mis_*")) == ["mis_privacy_utility.png", "mis_report.json"]
    assert not list(save_dir.glob("mis_*")) and not list(tmp_path.glob("mis_*"))  # base: in save_dir
    assert list(json.loads((run_dir / "mis_report.json").read_text())["schemes"]) == SCHEMES
    logger.experiment.finish()
