"""The message-passing network on RDKit molecular graphs: featurisation, collate, the model,
graph batches in the estimation pass (per-sample gradients, record hashes), assess /
MISIndicator end to end, the frozen-encoder audit and ``mis-lightning model=mpnn``."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.func import functional_call, grad
from torch.utils.data import DataLoader

pytest.importorskip("rdkit")  # the molecular extra (pip install "mis-lightning[chem]")

from mis_lightning import MISCallback, MISIndicator, assess  # noqa: E402
from mis_lightning._warning_lines import warning_line
from mis_lightning.data import (  # noqa: E402
    ChEMBLDataModule,
    ChEMBLGraphDataModule,
    GraphDataset,
    collate_graphs,
    featurize_graphs,
)
from mis_lightning.data.graphs import ATOM_FEATURES, atom_feature_names  # noqa: E402
from mis_lightning.estimation.per_sample import LossProgram  # noqa: E402
from mis_lightning.estimation.records import record_keys  # noqa: E402
from mis_lightning.models import MPNN  # noqa: E402
from mis_lightning.report import STAR_LINE  # noqa: E402

SMALL = {"hidden": 8, "steps": 2}  # d = 232 + 64 + 72 (encoder) + head


def _graphs(smiles, max_atoms=None):
    g, valid, failures = featurize_graphs(smiles, max_atoms)
    return {k: torch.as_tensor(v) for k, v in g.items()}, valid, failures


def _fit(model: MPNN, dm, epochs: int, callbacks=(), root=None) -> MPNN:
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
               default_root_dir=root).fit(model, datamodule=dm)
    return model.eval()


@pytest.fixture(scope="module")
def chembl() -> ChEMBLGraphDataModule:
    dm = ChEMBLGraphDataModule(seed=0, batch_size=128)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def trained(chembl) -> MPNN:
    torch.manual_seed(0)
    return _fit(MPNN(ATOM_FEATURES, head_hidden=[4], **SMALL), chembl, epochs=3)


# -- featurisation and collate -------------------------------------------------------------------
def test_featurize_graphs_shapes_bonds_padding_and_failures():
    g, valid, failures = _graphs(["CCO", "not a smiles", "c1ccccc1O", "CCCCCCCC"], max_atoms=7)
    assert valid == [0, 2]  # octane (8 atoms) does not fit in 7: reported, never truncated
    assert [(i, why) for i, _, why in failures] == [
        (1, "SMILES syntax error"), (3, "8 heavy atoms > max_atoms = 7")]
    assert g["atoms"].shape == (2, 7, ATOM_FEATURES) == (2, 7, len(atom_feature_names()))
    assert g["adj"].shape == (2, 7, 7) and g["mask"].shape == (2, 7)
    assert g["mask"].sum(1).tolist() == [3.0, 7.0]
    ethanol = torch.zeros(7, 7)
    ethanol[0, 1] = ethanol[1, 0] = ethanol[1, 2] = ethanol[2, 1] = 1.0  # C-C, C-O
    assert torch.equal(g["adj"][0], ethanol)
    assert torch.equal(g["adj"], g["adj"].transpose(1, 2))
    assert g["adj"][1].sum().item() == 2 * 7  # phenol: 6 ring bonds + C-O
    assert g["atoms"][0, 3:].abs().sum().item() == 0.0  # padding rows are zero
    names = atom_feature_names()
    assert g["atoms"][0, 2, names.index("element=O")] == 1.0
    assert g["atoms"][1, 0, names.index("aromatic")] == 1.0


def test_collate_stacks_records_and_refuses_mixed_padding():
    g, _, _ = _graphs(["CCO", "CCN", "CO"], max_atoms=5)
    ds = GraphDataset(g["atoms"], g["adj"], g["mask"], [0.5, 1.0, 2.0])
    x, y = collate_graphs([ds[0], ds[2]])
    assert {k: tuple(v.shape) for k, v in x.items()} == {
        "atoms": (2, 5, ATOM_FEATURES), "adj": (2, 5, 5), "mask": (2, 5)}
    assert y.tolist() == [0.5, 2.0]
    # what the default collate builds for these records (the app's assessment loader uses it)
    x2, y2 = next(iter(DataLoader(ds, batch_size=2)))
    assert all(torch.equal(x[k][0], x2[k][0]) for k in x) and torch.equal(y2, torch.tensor([0.5, 1.0]))
    g6, _, _ = _graphs(["CCO"], max_atoms=6)
    other = GraphDataset(g6["atoms"], g6["adj"], g6["mask"], [0.0])
    with pytest.raises(ValueError, match=r"graph records padded to different sizes \[5, 6\] cannot share a "
                                         "batch: build every dataset with the same max_atoms"):
        collate_graphs([ds[0], other[0]])


def test_chembl_graphs_have_the_fingerprint_datamodules_members(chembl):
    # same records, same split: model=mpnn and model=mlp_probe audit the same members
    fp = ChEMBLDataModule(featurizer="physchem", seed=0)
    fp.setup("fit")
    assert chembl.n_train == fp.n_train == 711 and chembl.num_features == ATOM_FEATURES == 28
    assert np.array_equal(chembl.rows[chembl.train_idx], fp.rows[fp.train_idx])
    assert torch.allclose(chembl.train_dataset.targets, fp.train_dataset.tensors[1], atol=1e-6)
    assert chembl.train_dataset.max_atoms == 41  # the largest molecule of the series
    x, y = next(iter(chembl.train_dataloader()))
    assert x["atoms"].shape == (128, 41, 28) and y.shape == (128,)


def test_nci_graphs_skip_and_report_molecules_larger_than_max_atoms():
    from mis_lightning.data import NCITPSAGraphDataModule, SkippedRowsWarning

    dm = NCITPSAGraphDataModule(max_molecules=80, max_atoms=20, seed=0)
    with pytest.warns(SkippedRowsWarning, match=r"NCITPSAGraphDataModule: skipped \d+ of 80 rows"):
        dm.setup("fit")
    big = [why for _, _, why in dm.skipped if "max_atoms" in why]
    assert big and all(why.endswith("heavy atoms > max_atoms = 20") for why in big)
    assert dm.train_dataset.max_atoms == 20 and len(dm.skipped) + len(dm.rows) == 80
    assert int(dm.train_dataset.mask.sum(1).max()) <= 20


# -- the model -----------------------------------------------------------------------------------
def test_mpnn_output_shape_padding_and_atom_order_invariance():
    torch.manual_seed(0)
    model = MPNN(ATOM_FEATURES, **SMALL).eval()
    smiles = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1"]
    g10, _, _ = _graphs(smiles, max_atoms=12)
    g20, _, _ = _graphs(smiles, max_atoms=20)
    with torch.no_grad():
        out = model(g10)
        assert out.shape == (3,)
        # padding atoms never reach the output (masked readout, zero adjacency); float32
        # sums of the same terms: 1e-6 relative
        torch.testing.assert_close(model(g20), out, rtol=1e-6, atol=1e-6)
        # a graph function: renumbering the atoms does not change the output
        perm = torch.tensor([5, 2, 0, 9, 1, 3, 4, 7, 6, 8, 10, 11])
        gp = {"atoms": g10["atoms"][:, perm], "adj": g10["adj"][:, perm][:, :, perm], "mask": g10["mask"][:, perm]}
        torch.testing.assert_close(model(gp), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"the MPNN takes graph batches \{'atoms': \[B, N, F\].*got Tensor"):
        model(torch.zeros(3, 28))
    with pytest.raises(ValueError, match="readout must be one of"):
        MPNN(ATOM_FEATURES, readout="max")


def test_graph_batches_in_the_estimation_pass(trained, chembl):
    """Per-sample gradients of a graph batch (vmap over records of a dict batch) equal autograd
    on each record alone; a record's content hash does not depend on its batch."""
    ds = chembl.train_dataset
    x, y = collate_graphs([ds[i] for i in range(6)])
    names = [n for n, _ in trained.named_parameters()]
    prog = LossProgram(trained, trained.per_sample_loss, names, dtype=torch.float64)
    xi, yi, b = prog.prepare((x, y))
    got = prog.per_sample_grads(xi, yi)
    for i in range(b):
        def loss(p, i=i):
            one = {k: v[i : i + 1] for k, v in xi.items()}
            return trained.per_sample_loss(functional_call(trained, p, (one,)), yi[i : i + 1]).sum()

        want = grad(loss)(prog.params)
        for n in names:  # float64, same operations: agreement to rounding (1e-10 relative)
            torch.testing.assert_close(got[n][i], want[n], rtol=1e-10, atol=1e-12)
    keys_a = record_keys((x, y), None, 6)
    x2, y2 = collate_graphs([ds[9], ds[3], ds[7]])
    assert record_keys((x2, y2), None, 3)[1] == keys_a[3]


# -- assessment end to end -----------------------------------------------------------------------
def test_assess_and_mis_indicator_on_graph_batches(trained, chembl):
    loader = DataLoader(chembl.train_dataset, batch_size=128, collate_fn=collate_graphs)
    # the Gauss-Newton diagonal: "auto" would pick the exact Hessian for d <= 2,000, which costs
    # d forward-over-reverse passes of a forward that reuses every weight over atoms and steps
    opts = {"num_records": 64, "mode": "diagonal", "hessian": "ggn", "uncertainty_draws": 0, "seed": 0,
            "mc_draws": 1024}  # few Monte Carlo draws: the test compares two front ends, same draws
    rep = assess(trained, ["int8_weight_only", "intx_weight_only_int2"], loader, trained.per_sample_loss,
                 val_dataloader=chembl.val_dataloader(), **opts)
    d = 232 + 64 + 72 + (8 * 4 + 4) + (4 + 1)
    assert (rep.n, rep.d) == (711, d)
    for s in rep.schemes.values():
        assert not s.error and 0 < s.leakage < 1 and math.isfinite(s.utility["loss"])
    # d / n = 0.57: the report says that the figures are indicative, whatever d_eff
    msg = (f"d / n = {d / 711:.3g} is not small ({d:,} assessed weights, 711 records): sigma, the "
           "influences and the unquantized baseline (d_eff = ")
    regime = [w for w in rep.warnings if w.startswith(msg)]
    assert len(regime) == 1, rep.warnings
    assert regime[0] in rep.table(verbose=True)  # in full where verbose, else its first sentence (nux51 #9)
    assert warning_line(regime[0]).startswith(msg[:30])
    # else on the * line, which names each failed assumption with what to do (nux51 #9, nux55)
    table = rep.table()  # the * line's items, one a line under its lead where several (ux57)
    assert f"  - {STAR_LINE}" in table and f"d / n = {d / 711:.2g} (assess fewer weights or use more records)" in table
    # the baseline's d_eff: d, or d less the weights no record moves (de49: the table's figure)
    m = re.match(r"\(d_eff = (d|([\d,]+): d less the ([\d,]+) weights no record moves)\) come from a normal "
                 "approximation", regime[0][len(msg) - len("(d_eff = "):])
    assert m, regime[0]
    if m.group(2):
        assert int(m.group(2).replace(",", "")) + int(m.group(3).replace(",", "")) == d
    # the streamed front end on the same graph batches: the same estimate and figures
    met = MISIndicator(trained, trained.per_sample_loss, ["int8_weight_only", "intx_weight_only_int2"], **opts)
    for batch in loader:
        met.update(batch)
    met.compute()
    for k, s in rep.schemes.items():  # the same sums in another order: 1e-9 relative
        assert met.report.schemes[k].leakage == pytest.approx(s.leakage, rel=1e-9)


def test_frozen_encoder_assesses_only_the_head_and_says_so(chembl):
    torch.manual_seed(0)
    model = MPNN(ATOM_FEATURES, head_hidden=[], freeze_encoder=True, **SMALL)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    _fit(model, chembl, epochs=2)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    # the training penalty covers the trained head only
    assert model.penalty().item() == pytest.approx(sum(p.square().sum().item() for p in model.head.parameters()))
    loader = DataLoader(chembl.train_dataset, batch_size=128, collate_fn=collate_graphs)
    rep = assess(model, ["int8_weight_only"], loader, model.per_sample_loss, num_records=64,
                 uncertainty_draws=0, weight_decay=model.weight_decay)
    assert rep.d == 9 and rep.estimation["mode"] == "exact"  # head: Linear(8, 1)
    note = ("assessed only the 9 trained weights: 368 frozen weights (requires_grad=False: "
            "encoder.embed.weight, encoder.embed.bias, encoder.message.weight, encoder.update.weight, "
            "encoder.update.bias) were not fitted by this training and are not assessed")
    assert any(w.startswith(note) for w in rep.warnings), rep.warnings
    assert not any(w.startswith("d / n") for w in rep.warnings)  # 9 / 711: inside the regime


def test_mis_callback_on_graph_batches(chembl, tmp_path):
    torch.manual_seed(0)
    model = MPNN(ATOM_FEATURES, head_hidden=[], freeze_encoder=True, **SMALL)
    cb = MISCallback(["int8_weight_only"], num_records=32, uncertainty_draws=0, mc_draws=1024,
                     estimation_batch_size=100)
    _fit(model, chembl, epochs=1, callbacks=[cb], root=tmp_path)
    assert (cb.report.n, cb.report.d) == (711, 9)
    assert any(w.startswith("assessed only the 9 trained weights: 368 frozen weights") for w in cb.report.warnings)
    assert 0 < cb.report.schemes["int8_weight_only"].leakage < 1


def test_pretrain_encoder_and_checkpoint(chembl, tmp_path):
    torch.manual_seed(0)
    model = MPNN(ATOM_FEATURES, head_hidden=[], freeze_encoder=True, **SMALL)
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head0 = {k: v.clone() for k, v in model.head.state_dict().items()}
    ds = chembl.val_dataset  # any graph regression set (the app uses NCI TPSA molecules)
    loss = model.pretrain_encoder(DataLoader(ds, batch_size=64, collate_fn=collate_graphs), epochs=2)
    assert math.isfinite(loss) and model.pretrained
    assert not torch.equal(model.encoder.embed.weight, enc0["embed.weight"])
    assert all(torch.equal(head0[k], v) for k, v in model.head.state_dict().items())
    assert not any(p.requires_grad for p in model.encoder.parameters())  # still frozen
    path = tmp_path / "encoder.pt"
    model.save_encoder(path)
    other = MPNN(ATOM_FEATURES, encoder_checkpoint=str(path), **SMALL)
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in other.encoder.state_dict().items())
    with pytest.raises(KeyError, match="does not fit this encoder"):
        MPNN(ATOM_FEATURES, hidden=16, encoder_checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="encoder_checkpoint file not found"):
        MPNN(ATOM_FEATURES, encoder_checkpoint=str(tmp_path / "none.pt"))


# -- the Hydra app -------------------------------------------------------------------------------
def _compose(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("mis_lightning.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_model_mpnn_selects_graph_data_unless_data_is_given():
    assert _compose(["model=mpnn"]).data._target_ == "mis_lightning.data.ChEMBLGraphDataModule"
    cfg = _compose(["model=mpnn", "data=nci_tpsa_graph"])
    assert cfg.data._target_ == "mis_lightning.data.NCITPSAGraphDataModule"
    cfg = _compose(["experiment=chembl_mpnn_frozen_head"])
    assert cfg.model.freeze_encoder and list(cfg.model.head_hidden) == []
    assert cfg.model.pretrain_data._target_ == "mis_lightning.data.NCITPSAGraphDataModule"
    assert _compose(["experiment=chembl_mpnn_sweep"]).model._target_ == "mis_lightning.models.MPNN"


def test_app_model_mpnn_writes_table_and_figure(tmp_path, capsys, layout_only_figures):
    # the figure laid out, not rasterized (tests/conftest.py): its file is checked, never read
    from omegaconf import open_dict

    from mis_lightning.app.job import run_job

    cfg = _compose(["model=mpnn", "model.hidden=8", "model.steps=1", "trainer.max_epochs=1",
                    "schemes=[int8_weight_only,bf16]", "mis=fast", "logger=none", "progress=false",
                    "mis.estimation.mode=diagonal", "mis.estimation.hessian=ggn",  # d <= 2,000: see above
                    f"trainer.default_root_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_job(cfg)
    out = capsys.readouterr().out
    assert "MIS of MPNN on ChEMBLGraphDataModule (n = 711" in out
    assert out.count("int8_weight_only") >= 1 and "d / n = " in out  # d = 529: the regime warning
    for f in ("report.json", "report.csv", "privacy_utility.png", "result.json"):
        assert (tmp_path / "run" / f).stat().st_size > 0, f
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["status"] == "ok" and res["model"] == "MPNN" and res["d"] == 529
