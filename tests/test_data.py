"""Tests of mis_lightning.data: synthetic and molecular LightningDataModules."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mis_lightning.data import (
    ChEMBLDataModule,
    NCITPSADataModule,
    SkippedRowsWarning,
    SyntheticRegressionDataModule,
    TDCADMETDataModule,
    ar1_cholesky,
    ar1_covariance,
    featurize_smiles,
    make_synthetic,
    split_indices,
)

DATA_DIR = Path(__file__).parent / "data"
TDC_SAMPLE = DATA_DIR / "tdc_format_sample.csv"


# =======================================================================================
# synthetic
# =======================================================================================
def test_synthetic_shapes_and_loaders():
    dm = SyntheticRegressionDataModule(n_train=100, n_val=30, n_test=20, d=7, batch_size=16)
    dm.setup()
    assert dm.num_features == 7 and dm.task == "regression" and dm.n_train == 100
    assert len(dm.train_dataset) == 100
    assert len(dm.val_dataset) == 30
    assert len(dm.test_dataset) == 20
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 7) and y.shape == (16,)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert dm.theta_star.shape == (7,)
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 30
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 20


def test_synthetic_deterministic_by_seed():
    def data(seed, **kw):
        dm = SyntheticRegressionDataModule(n_train=50, n_val=10, n_test=10, d=4, seed=seed, **kw)
        dm.setup()
        return dm

    a, b, c = data(3), data(3), data(4)
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors):
            assert torch.equal(ta, tb)
    assert torch.equal(a.theta_star, b.theta_star)
    assert not torch.equal(a.theta_star, c.theta_star)
    assert not torch.equal(a.train_dataset.tensors[0], c.train_dataset.tensors[0])
    # independent streams: more training data leaves theta_star and the test set unchanged
    d = SyntheticRegressionDataModule(n_train=80, n_val=10, n_test=10, d=4, seed=3)
    d.setup()
    assert torch.equal(d.theta_star, a.theta_star)
    assert torch.equal(d.test_dataset.tensors[0], a.test_dataset.tensors[0])
    # the shuffling of the training loader is reproducible too
    xa = next(iter(a.train_dataloader()))[0]
    xb = next(iter(b.train_dataloader()))[0]
    assert torch.equal(xa, xb)


def test_ar1_cholesky_is_the_cholesky_factor():
    for rho in (0.0, 0.3, -0.8, 0.95):
        cov = ar1_covariance(12, rho)
        chol = ar1_cholesky(12, rho)
        torch.testing.assert_close(chol @ chol.T, cov, atol=1e-12, rtol=0)
        torch.testing.assert_close(chol, torch.linalg.cholesky(cov), atol=1e-10, rtol=0)


@pytest.mark.parametrize("rho", [0.6, -0.4])
def test_synthetic_empirical_correlation(rho):
    # Sample correlation of n=20000 bivariate normals has SE ~ (1 - rho^2)/sqrt(n) <= 0.0071;
    # averaging the d-1 lag-1 pairs shrinks it further. Tolerance 0.03 is > 4 SE.
    n = 20000
    dm = SyntheticRegressionDataModule(n_train=n, n_val=0, n_test=0, d=6, correlation=rho)
    dm.setup()
    x = dm.train_dataset.tensors[0].double()
    corr = torch.corrcoef(x.T)
    lag1 = torch.diagonal(corr, offset=1).mean().item()
    lag2 = torch.diagonal(corr, offset=2).mean().item()
    assert abs(lag1 - rho) < 0.03
    assert abs(lag2 - rho**2) < 0.03
    assert abs(x.var(dim=0).mean().item() - 1.0) < 0.03  # unit variances


def test_synthetic_ols_recovers_theta_star():
    # OLS: Var(theta_hat_j) = noise^2 (C^-1)_jj / n, and for AR(1) (C^-1)_jj <= (1+rho^2)/(1-rho^2)
    # = 1.667 at rho=0.5, so SE <= sqrt(1.667/20000) = 0.0091; 0.05 is > 5 SE for each of the
    # 11 coefficients (the chance of any exceeding it is < 1e-6; the data are seeded anyway).
    n, d = 20000, 10
    dm = SyntheticRegressionDataModule(
        n_train=n, n_val=0, n_test=0, d=d, correlation=0.5, noise=1.0, intercept=0.7, seed=1
    )
    dm.setup()
    x, y = (t.double() for t in dm.train_dataset.tensors)
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    assert (coef[:d] - dm.theta_star.double()).abs().max().item() < 0.05
    assert abs(coef[d].item() - 0.7) < 0.05
    resid = y - design @ coef
    assert abs(resid.var().item() - 1.0) < 0.05  # noise^2, SE ~ sqrt(2/n) = 0.01


def test_synthetic_logistic_labels():
    dm = SyntheticRegressionDataModule(n_train=5000, n_val=10, n_test=10, d=5, task="logistic",
                                       intercept=0.5, seed=2)
    dm.setup()
    assert dm.task == "binary"
    x, y = dm.train_dataset.tensors
    assert set(y.unique().tolist()) == {0.0, 1.0}
    p = torch.sigmoid(x.double() @ dm.theta_star.double() + 0.5)
    # mean label vs mean probability: SE <= 0.5/sqrt(5000) = 0.007
    assert abs(y.double().mean().item() - p.mean().item()) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"d": 0}, "d"),
        ({"n_train": 1}, "n_train"),
        ({"noise": -0.1}, "noise"),
        ({"correlation": 1.0}, "correlation"),
        ({"correlation": -1.5}, "correlation"),
        ({"task": "poisson"}, "task"),
        ({"true_scale": -1.0}, "true_scale"),
        ({"n_val": -1}, "n_val"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_synthetic_bad_args_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SyntheticRegressionDataModule(**kwargs)


def test_make_synthetic_checks_theta_shape():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="theta_star"):
        make_synthetic(10, 3, 1.0, 0.0, "linear", torch.zeros(4), gen)
    x, y = make_synthetic(10, 3, 0.0, 0.0, "linear", torch.ones(3), gen)
    torch.testing.assert_close(y, x.sum(dim=1))  # noise=0: exact linear model


def test_split_indices_partition():
    tr, va, te = split_indices(101, 0.2, 0.1, seed=5)
    assert len(va) == 20 and len(te) == 10 and len(tr) == 71
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(101))
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.2, 0.1, 0)


# =======================================================================================
# molecules
# =======================================================================================
needs_rdkit = pytest.mark.skipif(
    importlib.util.find_spec("rdkit") is None, reason='needs pip install "mis-lightning[chem]"'
)


def chembl_files() -> tuple[str, str]:
    from rdkit import RDConfig

    folder = os.path.join(RDConfig.RDContribDir, "FreeWilson", "data")
    return (os.path.join(folder, "CHEMBL2321810.smi"),
            os.path.join(folder, "CHEMBL2321810_act.csv"))


def count_data_lines(path: str) -> int:
    with open(path) as fh:
        return sum(1 for line in fh if line.strip() and not line.startswith("#"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("feature_cache"))


@pytest.fixture(scope="module")
def chembl(cache_dir) -> ChEMBLDataModule:
    dm = ChEMBLDataModule(cache_dir=cache_dir, n_bits=1024, seed=0)
    dm.setup()
    return dm


def _all(dm, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return getattr(dm, split).tensors


@needs_rdkit
def test_chembl_loads_all_rows(chembl):
    n_rows = count_data_lines(chembl_files()[0])
    assert n_rows == 1017  # the shipped file
    n_valid = sum(len(getattr(chembl, s)) for s in ("train_dataset", "val_dataset", "test_dataset"))
    assert n_valid + len(chembl.skipped) == n_rows
    assert n_valid > 1000
    assert chembl.num_features == 1024 and chembl.task == "regression"
    x, y = _all(chembl, "train_dataset")
    assert x.shape == (chembl.n_train, 1024) and x.dtype == torch.float32
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        assert torch.isfinite(_all(chembl, split)[1]).all()
    # regression targets are z-scored with the train statistics; pIC50 scale restored by them
    assert abs(y.mean().item()) < 1e-4 and abs(y.std(unbiased=False).item() - 1) < 1e-3
    assert 5.0 < chembl.target_mean < 8.0 and 0.3 < chembl.target_std < 2.0
    assert len(chembl.val_dataset) == round(0.15 * n_valid)
    # the splits partition the usable rows
    idx = np.concatenate([chembl.train_idx, chembl.val_idx, chembl.test_idx])
    assert sorted(idx.tolist()) == list(range(n_valid))


@needs_rdkit
def test_chembl_cache_reused(chembl, cache_dir):
    assert chembl.cache_path is not None and chembl.cache_path.is_file()
    assert chembl.cache_path.parent == Path(cache_dir) and chembl.cache_path.suffix == ".npz"
    again = ChEMBLDataModule(cache_dir=cache_dir, n_bits=1024, seed=0)
    again.setup()
    assert again.loaded_from_cache and again.cache_path == chembl.cache_path
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        for a, b in zip(_all(chembl, split), _all(again, split)):
            assert torch.equal(a, b)
    # another featuriser parameter -> another cache entry
    other = ChEMBLDataModule(cache_dir=cache_dir, n_bits=512)
    other.setup()
    assert not other.loaded_from_cache and other.cache_path != chembl.cache_path
    assert other.num_features == 512


@needs_rdkit
def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("MIS_LIGHTNING_CACHE", str(tmp_path / "envcache"))
    dm = NCITPSADataModule(max_molecules=50, seed=3)
    dm.setup()
    assert dm.cache_path.parent == tmp_path / "envcache" and dm.cache_path.is_file()


@needs_rdkit
def test_chembl_binary_is_balanced(cache_dir):
    dm = ChEMBLDataModule(task="binary", threshold=6.5, cache_dir=cache_dir, seed=1)
    dm.setup()
    assert dm.task == "binary" and dm.target_mean == 0.0 and dm.target_std == 1.0
    y = torch.cat([_all(dm, s)[1] for s in ("train_dataset", "val_dataset", "test_dataset")])
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert 0.35 < y.mean().item() < 0.65  # 492 of 1017 are >= 6.5


def _malformed_copy(tmp_path: Path) -> tuple[str, str, int, int, str]:
    smi_src, act_src = chembl_files()
    lines = Path(smi_src).read_text().splitlines()
    bad_smiles_row, bad_act_row = 3, 10
    smiles, cid = lines[bad_smiles_row].split()
    lines[bad_smiles_row] = f"{smiles}((C {cid}"  # unbalanced branch
    act_id = lines[bad_act_row].split()[1]
    smi_path = tmp_path / "bad.smi"
    smi_path.write_text("\n".join(lines) + "\n")
    with open(act_src, newline="") as fh:
        rows = list(csv.reader(fh))
    for r in rows[1:]:
        if r[0] == act_id:
            r[1] = "n/a"
    rows.append(["999999999", "7.1"])  # an activity without a SMILES
    act_path = tmp_path / "bad_act.csv"
    with open(act_path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return str(smi_path), str(act_path), bad_smiles_row, bad_act_row, act_id


@needs_rdkit
def test_chembl_malformed_rows_reported(tmp_path):
    smi_path, act_path, bad_smi, bad_act, _ = _malformed_copy(tmp_path)
    dm = ChEMBLDataModule(smiles_path=smi_path, activity_path=act_path,
                          cache_dir=str(tmp_path / "cache"))
    with (
        pytest.warns(SkippedRowsWarning, match=r"skipped 2 of 1017 rows: row 3 .*row 10"),
        pytest.warns(SkippedRowsWarning, match=r"1 activity rows have no SMILES"),
    ):
        dm.setup()
    assert [r for r, _, _ in dm.skipped] == [bad_smi, bad_act]
    assert "SMILES" in dm.skipped[0][2]
    assert "non-numeric" in dm.skipped[1][2] and "'n/a'" in dm.skipped[1][2]
    assert dm.unmatched_activity == [(1019, "999999999")]
    n_valid = sum(len(getattr(dm, s)) for s in ("train_dataset", "val_dataset", "test_dataset"))
    assert n_valid == 1015
    assert bad_smi not in dm.rows and bad_act not in dm.rows


@needs_rdkit
def test_chembl_missing_file(tmp_path):
    # a path given is checked when the datamodule is built (the app's configuration stage:
    # one line before any data is read, nux49), naming the argument
    missing = str(tmp_path / "nope" / "missing.smi")
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + r" \(the smiles_path argument\)"):
        ChEMBLDataModule(smiles_path=missing, cache_dir=str(tmp_path))
    missing_act = str(tmp_path / "missing_act.csv")
    with pytest.raises(FileNotFoundError, match=re.escape(missing_act) + r" \(the activity_path argument\)"):
        ChEMBLDataModule(activity_path=missing_act, cache_dir=str(tmp_path))
    for cls in (NCITPSADataModule, TDCADMETDataModule):
        with pytest.raises(FileNotFoundError, match=re.escape(missing_act) + r" \(the path argument\)"):
            cls(path=missing_act, cache_dir=str(tmp_path))


@needs_rdkit
def test_featurize_smiles_failures_and_descriptors():
    from rdkit.Chem import Descriptors

    smiles = ["CCO", "C1CC", "", "c1ccccc1O", "CO(C)(C)C"]
    feats, valid, failures = featurize_smiles(smiles, kind="morgan", n_bits=64)
    assert feats.shape == (2, 64) and feats.dtype == np.float32 and valid == [0, 3]
    assert [f[0] for f in failures] == [1, 2, 4]
    assert "syntax" in failures[0][2] and "empty" in failures[1][2]
    assert "valence" in failures[2][2]
    desc, valid, _ = featurize_smiles(smiles, kind="descriptors")
    assert desc.shape == (2, len(Descriptors.descList)) and np.isfinite(desc).all()
    with pytest.raises(ValueError, match="featurizer"):
        featurize_smiles(smiles, kind="maccs")


def test_missing_rdkit_error_message(monkeypatch):
    from mis_lightning.data import molecules

    monkeypatch.setitem(sys.modules, "rdkit", None)
    with pytest.raises(ImportError, match=re.escape('pip install "mis-lightning[chem]"')):
        molecules.featurize_smiles(["CCO"])


@needs_rdkit
def test_nci_subsample(cache_dir):
    dm = NCITPSADataModule(max_molecules=500, cache_dir=cache_dir, seed=0)
    with pytest.warns(SkippedRowsWarning, match="of 500 rows"):  # this subsample has 1 bad row
        dm.setup()
    n_valid = sum(len(getattr(dm, s)) for s in ("train_dataset", "val_dataset", "test_dataset"))
    assert n_valid + len(dm.skipped) == 500
    assert dm.num_features == 1024 and dm.task == "regression"
    assert 20.0 < dm.target_mean < 150.0  # TPSA in A^2
    assert all(torch.isfinite(_all(dm, s)[1]).all() for s in ("train_dataset", "test_dataset"))


@needs_rdkit
def test_nci_full_file_skips_are_reported(cache_dir):
    from rdkit import Chem

    dm = NCITPSADataModule(cache_dir=cache_dir)
    with pytest.warns(SkippedRowsWarning):
        dm.setup()
    n_valid = sum(len(getattr(dm, s)) for s in ("train_dataset", "val_dataset", "test_dataset"))
    assert n_valid + len(dm.skipped) == 4999
    assert 0 < len(dm.skipped) < 50
    for _, smi, _ in dm.skipped:
        assert Chem.MolFromSmiles(smi) is None


@needs_rdkit
def test_nci_descriptors_standardised(cache_dir):
    dm = NCITPSADataModule(featurizer="descriptors", max_molecules=80, cache_dir=cache_dir)
    dm.setup()
    x = dm.train_dataset.tensors[0].double()
    assert torch.isfinite(x).all()
    assert x.mean(dim=0).abs().max().item() < 1e-4
    sd = x.std(dim=0, unbiased=False)
    assert ((sd - 1).abs() < 1e-3).logical_or(sd < 1e-6).all()  # constant columns stay 0


# ----------------------------------------------------------------------- TDC
@needs_rdkit
def test_tdc_local_file(tmp_path):
    # tests/data/tdc_format_sample.csv: 40 compounds of the RDKit-shipped ChEMBL2321810 set in
    # TDC format (Y = ChEMBL activity); data row 7 has a broken SMILES, row 19 an empty Y.
    dm = TDCADMETDataModule(path=str(TDC_SAMPLE), cache_dir=str(tmp_path), val_fraction=0.2,
                            test_fraction=0.2)
    with pytest.warns(SkippedRowsWarning, match="skipped 2 of 40 rows"):
        dm.setup()
    assert [r for r, _, _ in dm.skipped] == [7, 19]
    assert "SMILES" in dm.skipped[0][2]
    assert "missing value" in dm.skipped[1][2] and "line 21" in dm.skipped[1][2]
    assert dm.task == "regression"
    # the inferred task is the saved one: Lightning merges the module's and the datamodule's
    # hyperparameters and refused task None against the model's "regression" (the CLI crashed
    # with data=tdc_admet data.path=...)
    assert dm.hparams_initial["task"] == dm.hparams["task"] == "regression"
    n_valid = sum(len(getattr(dm, s)) for s in ("train_dataset", "val_dataset", "test_dataset"))
    assert n_valid == 38 and dm.n_train == 38 - 8 - 8
    assert 5.0 < dm.target_mean < 8.0
    # a threshold without a task means binary (it was silently ignored)
    thr = TDCADMETDataModule(path=str(TDC_SAMPLE), cache_dir=str(tmp_path), threshold=6.5)
    with pytest.warns(SkippedRowsWarning):
        thr.setup()
    assert thr.task == "binary" and thr.hparams_initial["task"] == "binary"
    assert set(thr.train_dataset.tensors[1].unique().tolist()) == {0.0, 1.0}


@needs_rdkit
def test_tdc_binary_inferred(tmp_path):
    with open(TDC_SAMPLE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    path = tmp_path / "bin.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Drug_ID", "Drug", "Y"])
        for r in rows:
            if r["Y"]:
                w.writerow([r["Drug_ID"], r["Drug"], int(float(r["Y"]) >= 6.0)])
    dm = TDCADMETDataModule(path=str(path), cache_dir=str(tmp_path))
    with pytest.warns(SkippedRowsWarning):
        dm.setup()
    assert dm.task == "binary"
    assert set(dm.train_dataset.tensors[1].unique().tolist()) <= {0.0, 1.0}


@needs_rdkit
def test_tdc_missing_columns(tmp_path):
    path = tmp_path / "wrong.csv"
    path.write_text("id,smiles,value\na,CCO,1.0\n")
    with pytest.raises(ValueError, match="Drug"):
        TDCADMETDataModule(path=str(path), cache_dir=str(tmp_path)).setup()


@needs_rdkit
def test_tdc_without_pytdc_is_a_clear_runtime_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tdc", None)  # "import tdc..." raises ImportError
    monkeypatch.setitem(sys.modules, "tdc.single_pred", None)
    dm = TDCADMETDataModule(name="caco2_wang", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="could not be fetched") as info:
        dm.setup()
    msg = str(info.value)
    assert "caco2_wang" in msg and "PyTDC" in msg and "path=" in msg and "offline" in msg.lower()


@needs_rdkit
def test_tdc_download_failure_is_a_clear_runtime_error(monkeypatch, tmp_path):
    calls = []

    class FailingLoader:
        def __init__(self, name, path):
            calls.append((name, path))
            raise ConnectionError("Name or service not known")

    fake = types.ModuleType("tdc.single_pred")
    fake.ADME = fake.Tox = FailingLoader
    monkeypatch.setitem(sys.modules, "tdc", types.ModuleType("tdc"))
    monkeypatch.setitem(sys.modules, "tdc.single_pred", fake)
    dm = TDCADMETDataModule(name="caco2_wang", cache_dir=str(tmp_path / "c"),
                            download_dir=str(tmp_path / "dl"))
    with pytest.raises(RuntimeError, match="ConnectionError") as info:
        dm.setup()
    assert "path=" in str(info.value)
    assert calls == [("caco2_wang", str(tmp_path / "dl"))]


@needs_rdkit
def test_tdc_fetch_success_path(monkeypatch, tmp_path):
    """The PyTDC code path itself, with a fake in-memory ``get_data`` (no network)."""
    with open(TDC_SAMPLE, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Y"]]

    class FakeFrame(dict):
        pass

    class FakeSeries(list):
        def tolist(self):
            return list(self)

    class Loader:
        def __init__(self, name, path):
            self.name = name

        def get_data(self, format="df"):
            return FakeFrame(
                Drug_ID=FakeSeries(r["Drug_ID"] for r in rows),
                Drug=FakeSeries(r["Drug"] for r in rows),
                Y=FakeSeries(math.nan if i == 0 else float(r["Y"]) for i, r in enumerate(rows)),
            )

    fake = types.ModuleType("tdc.single_pred")
    fake.ADME = fake.Tox = Loader
    monkeypatch.setitem(sys.modules, "tdc", types.ModuleType("tdc"))
    monkeypatch.setitem(sys.modules, "tdc.single_pred", fake)
    dm = TDCADMETDataModule(name="caco2_wang", cache_dir=str(tmp_path / "c"),
                            download_dir=str(tmp_path / "dl"))
    with pytest.warns(SkippedRowsWarning):
        dm.setup()
    assert [r for r, _, _ in dm.skipped] == [0, 7]  # NaN Y, then the broken SMILES
    assert dm.task == "regression"


@needs_rdkit
def test_duplicated_smiles_are_warned(tmp_path):
    """A molecule in two rows (here with different activities) is two records: n counts both
    and the molecule is a member twice; it was kept without a word."""
    from mis_lightning.data.molecules import DuplicateRecordsWarning

    with open(TDC_SAMPLE, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Y"]][:20]
    path = tmp_path / "dup.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Drug_ID", "Drug", "Y"])
        for r in rows + [dict(rows[0], Y=str(float(rows[0]["Y"]) + 1.0))]:
            w.writerow([r["Drug_ID"], r["Drug"], r["Y"]])
    dm = TDCADMETDataModule(path=str(path), cache_dir=str(tmp_path))
    with pytest.warns(DuplicateRecordsWarning, match=r"1 SMILES appear in more than one row \(2 rows; 1 with different"):
        dm.setup()
    # a salt is featurised with its counter-ion: said
    with open(path, "a", newline="") as fh:
        csv.writer(fh).writerow(["salt", rows[1]["Drug"] + ".[Na+].[Cl-]", rows[1]["Y"]])
    with pytest.warns(DuplicateRecordsWarning, match=r"1 kept SMILES hold several fragments"):
        TDCADMETDataModule(path=str(path), cache_dir=str(tmp_path / "c2")).setup()
