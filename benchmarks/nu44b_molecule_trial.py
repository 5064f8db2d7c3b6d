"""A drug-discovery user's trial of mis-lightning on molecules shipped with RDKit (nu44b).

Three user models, each written as a user would from README.md and docs/ only, trained by
Lightning with ``MISCallback`` and CSV + TensorBoard (+ MLflow file store) loggers:

1. ``multitask``: a multi-task binary classifier on ChEMBL2321810 (12 RDKit physico-chemical
   descriptors; 3 assay-like labels ``pIC50 >= 6 / 7 / 8``, 30% of the labels missing (NaN),
   masked out of ``BCEWithLogitsLoss(pos_weight=neg/pos, reduction="none")``; per-record term
   the masked mean over that record's observed labels);
2. ``regression``: pIC50 regression with a Huber loss;
3. ``graph``: a message-passing network in plain torch (``index_add_`` over edge lists), batches
   as dicts of tensors padded per batch (their size varies from batch to batch), the records on
   the first dimension; and the concatenated (PyG-style) layout, which the library cannot split
   into records, to check that it is refused before training.

For each: the per-record losses the library uses equal the user's loss (the unquantized
model's utility ``loss`` on the validation set against the user's own computation), the logged
metrics (CSV, TensorBoard, MLflow) equal the report's, warnings are in the table and the
report, the user's objects (weights, pos_weight, datasets) are unchanged, and misconfigured
losses are refused before training with a message naming the culprit.

Run:  OMP_NUM_THREADS=1 python benchmarks/nu44b_molecule_trial.py [--part multitask|regression|graph|all]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MultilabelAUROC

from mis_lightning import MISCallback
from mis_lightning.data.molecules import ChEMBLDataModule, featurize_smiles
from mis_lightning.tracking import report_metrics

SCHEMES = ["none", "int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2"]
THRESHOLDS = (6.0, 7.0, 8.0)


# ---------------------------------------------------------------------------------------------
# data: the ChEMBL series shipped with RDKit, featurised by the user
# ---------------------------------------------------------------------------------------------
def chembl_records(seed: int = 0) -> dict[str, np.ndarray]:
    """SMILES, 12 standardised descriptors and pIC50 of ChEMBL2321810, split 70/15/15."""
    dm = ChEMBLDataModule(featurizer="physchem", seed=seed)
    dm.setup()  # the project's reader (joins, skipped rows); the features again by the user
    smiles = dm.smiles
    feats, valid, _ = featurize_smiles(smiles, kind="physchem")
    assert len(valid) == len(smiles)
    y = dm.target_mean + dm.target_std * np.concatenate(
        [dm.train_dataset.tensors[1].numpy(), dm.val_dataset.tensors[1].numpy(), dm.test_dataset.tensors[1].numpy()])
    order = np.concatenate([dm.train_idx, dm.val_idx, dm.test_idx])
    pic50 = np.empty(len(smiles))
    pic50[order] = y
    x = feats.astype(np.float64)
    mu, sd = x[dm.train_idx].mean(0), x[dm.train_idx].std(0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    return {"x": x.astype(np.float32), "pic50": pic50.astype(np.float32), "smiles": np.asarray(smiles),
            "train": dm.train_idx, "val": dm.val_idx}


class MultiTaskSet(Dataset):
    """Records ``(x [F], y [T])`` with NaN where a label is missing."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def multitask_labels(pic50: np.ndarray, missing: float = 0.3, seed: int = 0) -> np.ndarray:
    y = np.stack([(pic50 >= t).astype(np.float32) for t in THRESHOLDS], 1)
    drop = np.random.default_rng(seed).random(y.shape) < missing
    y[drop] = np.nan
    return y


# ---------------------------------------------------------------------------------------------
# 1. multi-task classifier
# ---------------------------------------------------------------------------------------------
class MaskedBCE(nn.Module):
    """Per-record masked mean of ``BCEWithLogitsLoss(pos_weight)`` over the observed labels."""

    def __init__(self, pos_weight: torch.Tensor) -> None:
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        observed = ~torch.isnan(y)
        per_label = self.bce(logits, torch.where(observed, y, torch.zeros_like(y)))  # [B, T]
        per_label = torch.where(observed, per_label, torch.zeros_like(per_label))
        return per_label.sum(-1) / observed.sum(-1).clamp_min(1)  # [B]


def auroc_inputs(outputs: torch.Tensor, targets: torch.Tensor):
    """``output_transform`` for ``MultilabelAUROC(ignore_index=-1)``: probabilities, labels with -1
    where missing (module level: picklable)."""
    return torch.sigmoid(outputs), torch.where(targets.isnan(), -1, targets).long()


class MultiTaskMLP(pl.LightningModule):
    def __init__(self, num_features: int, tasks: int, pos_weight: torch.Tensor, hidden: int = 4,
                 weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, tasks))
        self.loss = MaskedBCE(pos_weight)
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, T] logits

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs, targets)

    def training_step(self, batch, batch_idx):
        x, y = batch
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        loss = self.per_sample_loss(self(x), y).mean() + 0.5 * self.weight_decay * penalty
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.per_sample_loss(self(x), y).mean())

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), max_iter=100, line_search_fn="strong_wolfe",
                                 tolerance_grad=1e-9, tolerance_change=1e-12)


def loggers_for(root: Path, name: str) -> list:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    out = [CSVLogger(root, name=f"{name}_csv"), TensorBoardLogger(root, name=f"{name}_tb")]
    try:
        from pytorch_lightning.loggers import MLFlowLogger

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        out.append(MLFlowLogger(experiment_name=name, tracking_uri=f"file://{root / 'mlruns'}"))
    except Exception as exc:  # noqa: BLE001 - mlflow optional
        print(f"  (no MLflow: {type(exc).__name__}: {exc})")
    return out


def logged_values(loggers: list) -> dict[str, dict[str, float]]:
    """``{logger: {key: last value}}`` of the ``mis/`` keys each logger wrote."""
    out: dict[str, dict[str, float]] = {}
    for lg in loggers:
        kind = type(lg).__name__
        vals: dict[str, float] = {}
        if kind == "CSVLogger":
            with open(Path(lg.log_dir) / "metrics.csv") as fh:
                for row in csv.DictReader(fh):
                    vals.update({k: float(v) for k, v in row.items() if k.startswith("mis/") and v != ""})
        elif kind == "TensorBoardLogger":
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            acc = EventAccumulator(lg.log_dir)
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                if tag.startswith("mis/"):
                    vals[tag] = float(acc.Scalars(tag)[-1].value)
        elif kind == "MLFlowLogger":
            from mlflow.tracking import MlflowClient

            run = MlflowClient(lg._tracking_uri).get_run(lg.run_id)
            vals = {k: float(v) for k, v in run.data.metrics.items() if k.startswith("mis/")}
        out[kind] = vals
    return out


def compare_logged(report, loggers: list) -> list[str]:
    """Differences between the report's figures and each logger's (float32 for TensorBoard)."""
    want = report_metrics(report)
    problems = []
    for kind, got in logged_values(loggers).items():
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing or extra:
            problems.append(f"{kind}: missing {missing[:4]} extra {extra[:4]}")
        rel = 1e-6 if kind == "TensorBoardLogger" else 1e-12
        bad = [k for k in set(want) & set(got) if abs(want[k] - got[k]) > rel * max(1.0, abs(want[k]))]
        if bad:
            problems.append(f"{kind}: values differ for {bad[:4]}")
    return problems


def snapshot(*objs) -> list[torch.Tensor]:
    out = []
    for o in objs:
        if isinstance(o, nn.Module):
            out += [t.detach().clone() for t in o.state_dict().values()]
        else:
            out.append(o.detach().clone())
    return out


def unchanged(before: list[torch.Tensor], objs) -> bool:
    return all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip(before, snapshot(*objs)))


def expect_refusal(build_and_fit, culprit: str) -> str:
    """Run a misconfigured fit; the error must come before training and name ``culprit``."""
    try:
        build_and_fit()
    except Exception as exc:  # noqa: BLE001 - what the user sees
        msg = f"{type(exc).__name__}: {exc}"
        ok = culprit in msg
        return f"{'OK ' if ok else 'BAD'} refused: {msg[:220]}"
    return "BAD not refused"


def fit(model, train, val, root: Path, name: str, loss_fn=None, max_epochs: int = 30, batch_fn=None, **cb):
    loggers = loggers_for(root, name)
    callback = MISCallback(schemes=SCHEMES, loss_fn=loss_fn, batch_fn=batch_fn, dirpath=str(root / name),
                           uncertainty_draws=2, **cb)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[callback], logger=loggers, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(model, train, val)
    return callback, loggers, time.perf_counter() - t0


def part_multitask(root: Path) -> None:
    data = chembl_records()
    y = torch.as_tensor(multitask_labels(data["pic50"]))
    x = torch.as_tensor(data["x"])
    tr, va = torch.as_tensor(data["train"]), torch.as_tensor(data["val"])
    ytr = y[tr]
    pos = torch.nansum(ytr, 0)
    neg = (~ytr.isnan()).sum(0) - pos
    pos_weight = (neg / pos).float()
    print(f"multitask: n_train={len(tr)}, positives per task {pos.tolist()}, pos_weight {pos_weight.tolist()}")
    train_set, val_set = MultiTaskSet(x[tr], ytr), MultiTaskSet(x[va], y[va])
    train = DataLoader(train_set, batch_size=len(tr), shuffle=True)
    val = DataLoader(val_set, batch_size=64)
    pl.seed_everything(0, verbose=False)
    model = MultiTaskMLP(x.shape[1], len(THRESHOLDS), pos_weight)
    before = snapshot(pos_weight, train_set.y, val_set.y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, loggers, seconds = fit(model, train, val, root, "multitask",
                                         utility_metrics={"auroc": MultilabelAUROC(len(THRESHOLDS), ignore_index=-1)},
                                         output_transform=auroc_inputs, utility_key="auroc")
    report = callback.report
    print(report.table())
    # the user's own validation loss of the float model
    with torch.no_grad():
        mine = torch.cat([model.per_sample_loss(model(xb), yb) for xb, yb in val]).double().mean().item()
    lib = report.schemes["none"].utility["loss"]
    print(f"  utility loss (none): library {lib:.6f}  user {mine:.6f}  rel diff {abs(lib - mine) / mine:.2e}")
    metric = MultilabelAUROC(len(THRESHOLDS), ignore_index=-1)
    with torch.no_grad():
        for xb, yb in val:
            metric.update(*auroc_inputs(model(xb), yb))
    print(f"  utility auroc (none): library {report.schemes['none'].utility['auroc']:.6f}  user "
          f"{float(metric.compute()):.6f}")
    print(f"  logged vs report: {compare_logged(report, loggers) or 'identical'}")
    print(f"  user objects unchanged: {unchanged(before, [pos_weight, train_set.y, val_set.y])}")
    print(f"  fit with assessment: {seconds:.1f} s; warnings: {len(caught)} "
          f"({sorted({type(w.message).__name__ for w in caught})})")
    ours = [str(w.message) for w in caught if "mis_lightning" in (w.filename or "") or "MIS" in str(w.message)[:40]]
    for text in report.warnings:
        print(f"  report warning {text[:90]!r}: also a Python warning: {any(text[:60] in m for m in ours)}")
    print(f"  report timings: { {k: v for k, v in report.estimation.items() if 'second' in k or 'time' in k} }")

    # misconfigurations, each refused before training naming the culprit
    def bad(loss_fn, name):
        return lambda: fit(MultiTaskMLP(x.shape[1], len(THRESHOLDS), pos_weight), train, val, root, name,
                           loss_fn=loss_fn, max_epochs=1)

    def per_label(o, t):  # [B, T]: forgot to reduce each record
        return F.binary_cross_entropy_with_logits(o, t.nan_to_num(), pos_weight=pos_weight, reduction="none")

    def batch_normalised(o, t):  # divides by the batch's count of observed labels: mixes records
        m = ~t.isnan()
        loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), pos_weight=pos_weight, reduction="none")
        return (loss * m).sum(-1) * len(t) / m.sum()

    def unmasked(o, t):  # NaN labels straight into the loss
        return F.binary_cross_entropy_with_logits(o, t, pos_weight=pos_weight, reduction="none").mean(-1)

    # the same trained weights through assess with the loss written three ways: the figures must agree
    # (pos_weight in effect: a loss without it must differ)
    import mis_lightning as ml

    pw64 = pos_weight.double()

    def by_function(o, t):
        m = ~t.isnan()
        loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), pos_weight=pw64.to(o.dtype), reduction="none")
        return torch.where(m, loss, 0.0).sum(-1) / m.sum(-1).clamp_min(1)

    def no_pos_weight(o, t):
        m = ~t.isnan()
        loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), reduction="none")
        return torch.where(m, loss, 0.0).sum(-1) / m.sum(-1).clamp_min(1)

    ordered = DataLoader(train_set, batch_size=256)
    forms = {"bound method": model.per_sample_loss, "module": MaskedBCE(pos_weight), "function": by_function,
             "without pos_weight": no_pos_weight}
    for label, fn in forms.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = ml.assess(model, ["intx_weight_only_int2"], ordered, fn, weight_decay=model.weight_decay,
                            uncertainty_draws=0)
        print(f"  assess, loss as {label}: baseline {rep.baseline_leakage:.6f}, int2 "
              f"{rep.schemes['intx_weight_only_int2'].leakage:.6f}")
    print(f"  pos_weight still float32 on the user's loss: {model.loss.bce.pos_weight.dtype}")
    def masked_after(o, t):  # NaN labels into the loss, masked after: finite values, NaN gradients
        m = ~t.isnan()
        loss = F.binary_cross_entropy_with_logits(o, t, pos_weight=pos_weight, reduction="none")
        return torch.where(m, loss, 0.0).sum(-1) / m.sum(-1).clamp_min(1)

    print(" ", expect_refusal(bad(masked_after, "bad_masked_after"), "masked_after"))
    print(" ", expect_refusal(bad(per_label, "bad_per_label"), "per_label"))
    print(" ", expect_refusal(bad(batch_normalised, "bad_batchnorm"), "batch_normalised"))
    print(" ", expect_refusal(bad(unmasked, "bad_unmasked"), "unmasked"))


# ---------------------------------------------------------------------------------------------
# 2. regression (Huber)
# ---------------------------------------------------------------------------------------------
def huber(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.huber_loss(o.squeeze(-1), t, reduction="none", delta=1.0)


class Regressor(pl.LightningModule):
    def __init__(self, num_features: int, hidden: int = 4, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.weight_decay = weight_decay

    def forward(self, x):
        return self.net(x)  # [B, 1]

    def training_step(self, batch, batch_idx):
        x, y = batch
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        return huber(self(x), y).mean() + 0.5 * self.weight_decay * penalty

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", huber(self(x), y).mean())

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), max_iter=100, line_search_fn="strong_wolfe",
                                 tolerance_grad=1e-9, tolerance_change=1e-12)


def part_regression(root: Path) -> None:
    data = chembl_records()
    x, y = torch.as_tensor(data["x"]), torch.as_tensor(data["pic50"])
    tr, va = torch.as_tensor(data["train"]), torch.as_tensor(data["val"])
    mu = y[tr].mean()
    train = DataLoader(torch.utils.data.TensorDataset(x[tr], y[tr] - mu), batch_size=len(tr), shuffle=True)
    val = DataLoader(torch.utils.data.TensorDataset(x[va], y[va] - mu), batch_size=64)
    pl.seed_everything(0, verbose=False)
    model = Regressor(x.shape[1])
    callback, loggers, seconds = fit(model, train, val, root, "regression", loss_fn=huber,
                                     utility_metrics=None)
    report = callback.report
    print(report.table())
    with torch.no_grad():
        mine = torch.cat([huber(model(xb), yb) for xb, yb in val]).double().mean().item()
    lib = report.schemes["none"].utility["loss"]
    print(f"  utility loss (none): library {lib:.6f}  user {mine:.6f}  rel diff {abs(lib - mine) / mine:.2e}")
    print(f"  logged vs report: {compare_logged(report, loggers) or 'identical'}")
    print(f"  fit with assessment: {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# 3. message passing in plain torch (index_add_), dict batches padded per batch
# ---------------------------------------------------------------------------------------------
ELEMENTS = ("C", "N", "O", "S", "F", "Cl", "Br")


def mol_graph(smiles: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [a, F], edge_index [2, 2 * bonds])``: element one-hot (+ other), degree, aromatic."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    rows = []
    for at in mol.GetAtoms():
        row = [0.0] * (len(ELEMENTS) + 1 + 5 + 1)
        sym = at.GetSymbol()
        row[ELEMENTS.index(sym) if sym in ELEMENTS else len(ELEMENTS)] = 1.0
        row[len(ELEMENTS) + 1 + min(at.GetDegree(), 4)] = 1.0
        row[-1] = float(at.GetIsAromatic())
        rows.append(row)
    src, dst = [], []
    for b in mol.GetBonds():
        u, v = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        src += [u, v]
        dst += [v, u]
    return torch.tensor(rows), torch.tensor([src, dst], dtype=torch.int64)


class GraphSet(Dataset):
    def __init__(self, graphs: list, y: torch.Tensor) -> None:
        self.graphs, self.y = graphs, y

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int):
        return self.graphs[i], self.y[i]


def collate_padded(items) -> dict[str, torch.Tensor]:
    """Dict batch padded to the batch's largest molecule: ``x [B, N, F]``, ``node_mask [B, N]``,
    ``edge_index [B, 2, E]`` (padding edges 0 -> 0), ``edge_mask [B, E]``, ``y [B]``."""
    n = max(g[0].shape[0] for g, _ in items)
    e = max(g[1].shape[1] for g, _ in items)
    b, f = len(items), items[0][0][0].shape[1]
    out = {"x": torch.zeros(b, n, f), "node_mask": torch.zeros(b, n),
           "edge_index": torch.zeros(b, 2, e, dtype=torch.int64), "edge_mask": torch.zeros(b, e),
           "y": torch.stack([y for _, y in items])}
    for i, ((x, ei), _) in enumerate(items):
        out["x"][i, : x.shape[0]] = x
        out["node_mask"][i, : x.shape[0]] = 1
        out["edge_index"][i, :, : ei.shape[1]] = ei
        out["edge_mask"][i, : ei.shape[1]] = 1
    return out


def collate_concatenated(items) -> dict[str, torch.Tensor]:
    """PyG-style batch: atoms of every molecule concatenated, ``batch`` the molecule of each atom."""
    xs, eis, owner, offset = [], [], [], 0
    for i, ((x, ei), _) in enumerate(items):
        xs.append(x)
        eis.append(ei + offset)
        owner.append(torch.full((x.shape[0],), i))
        offset += x.shape[0]
    return {"x": torch.cat(xs), "edge_index": torch.cat(eis, 1), "batch": torch.cat(owner),
            "y": torch.stack([y for _, y in items])}


def xy_graph(batch: dict[str, torch.Tensor]):
    """``batch_fn``: ``(inputs, targets)`` of a dict batch."""
    return {k: v for k, v in batch.items() if k != "y"}, batch["y"]


class IndexAddMPNN(pl.LightningModule):
    """``h <- relu(W_u h + sum_{u->v} W_m h_u)`` by ``index_add_`` over the edges, sum readout."""

    def __init__(self, num_features: int, hidden: int = 8, steps: int = 2, weight_decay: float = 1e-3,
                 concatenated: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(num_features, hidden)
        self.message = nn.Linear(hidden, hidden, bias=False)
        self.update = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)
        self.steps, self.weight_decay, self.concatenated = steps, weight_decay, concatenated

    def forward(self, g: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.concatenated:
            h = torch.relu(self.embed(g["x"]))
            src, dst = g["edge_index"]
            for _ in range(self.steps):
                agg = torch.zeros_like(h).index_add_(0, dst, self.message(h)[src])
                h = torch.relu(self.update(h) + agg)
            size = int(g["batch"].max()) + 1
            return h.new_zeros(size, h.shape[1]).index_add_(0, g["batch"], h) @ self.head.weight.T[:, 0] + self.head.bias
        b, n, _ = g["x"].shape
        h = torch.relu(self.embed(g["x"])).reshape(b * n, -1)  # [B*N, H]
        offset = (torch.arange(b, device=h.device) * n).reshape(b, 1)
        src = (g["edge_index"][:, 0] + offset).reshape(-1)
        dst = (g["edge_index"][:, 1] + offset).reshape(-1)
        w = g["edge_mask"].reshape(-1, 1)
        for _ in range(self.steps):
            agg = torch.zeros_like(h).index_add_(0, dst, self.message(h)[src] * w)
            h = torch.relu(self.update(h) + agg)
        pooled = (h.reshape(b, n, -1) * g["node_mask"].unsqueeze(-1)).sum(1)  # [B, H]
        return self.head(pooled).squeeze(-1)

    def per_sample_loss(self, outputs, targets):
        return 0.5 * (outputs - targets) ** 2

    def training_step(self, batch, batch_idx):
        x, y = xy_graph(batch)
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        return self.per_sample_loss(self(x), y).mean() + 0.5 * self.weight_decay * penalty

    def validation_step(self, batch, batch_idx):
        x, y = xy_graph(batch)
        self.log("val_loss", self.per_sample_loss(self(x), y).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class HookMPNN(IndexAddMPNN):
    """The same network with the loss hook, which takes the dict batch whole."""

    def mis_per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x, y = xy_graph(batch)
        return self.per_sample_loss(self(x), y)


def part_graph(root: Path) -> None:
    import mis_lightning as ml

    data = chembl_records()
    graphs = [mol_graph(s) for s in data["smiles"]]
    y = torch.as_tensor(data["pic50"])
    tr, va = data["train"], data["val"]
    y = (y - y[tr].mean()) / y[tr].std()
    train_set = GraphSet([graphs[i] for i in tr], y[tr])
    val_set = GraphSet([graphs[i] for i in va], y[va])
    train = DataLoader(train_set, batch_size=64, shuffle=True, collate_fn=collate_padded)
    val = DataLoader(val_set, batch_size=64, collate_fn=collate_padded)
    pl.seed_everything(0, verbose=False)
    model = IndexAddMPNN(graphs[0][0].shape[1])
    before = [t.clone() for g in graphs for t in g] + [y.clone()]
    callback, loggers, seconds = fit(model, train, val, root, "graph", batch_fn=xy_graph, max_epochs=15)
    print(f"  user graphs and targets unchanged: "
          f"{all(torch.equal(a, b) for a, b in zip(before, [t for g in graphs for t in g] + [y]))}")
    report = callback.report
    print(report.table())
    with torch.no_grad():
        mine = torch.cat([model.per_sample_loss(*(lambda i, t: (model(i), t))(*xy_graph(b))) for b in val]).double().mean().item()
    lib = report.schemes["none"].utility["loss"]
    print(f"  utility loss (none): library {lib:.6f}  user {mine:.6f}  rel diff {abs(lib - mine) / mine:.2e}")
    print(f"  logged vs report: {compare_logged(report, loggers) or 'identical'}")
    print(f"  fit with assessment: {seconds:.1f} s")
    # the same trained model, the same records, batched by 16 and by 128: the same figures?
    figures = {}
    for bs in (16, 128):
        loader = DataLoader(train_set, batch_size=bs, collate_fn=collate_padded)
        rep = ml.assess(model, ["int8_weight_only"], loader, model.per_sample_loss, batch_fn=xy_graph,
                        weight_decay=model.weight_decay, uncertainty_draws=0, estimation="diagonal", hessian="ggn")
        figures[bs] = (rep.n, rep.baseline_leakage, rep.schemes["int8_weight_only"].leakage)
    print(f"  assess by batch size (n, baseline, int8): {figures}")
    # the loss hook instead of batch_fn (any batch layout): the same figures as batch_fn batched by 16
    pl.seed_everything(0, verbose=False)
    hooked = HookMPNN(graphs[0][0].shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb, _, _ = fit(hooked, train, val, root, "graph_hook", max_epochs=15, estimation="diagonal", hessian="exact")
        rep = ml.assess(hooked, ["int8_weight_only"], DataLoader(train_set, batch_size=16, collate_fn=collate_padded),
                        hooked.per_sample_loss, batch_fn=xy_graph, weight_decay=hooked.weight_decay,
                        uncertainty_draws=0, estimation="diagonal", hessian="exact")
    print(f"  mis_per_sample_loss hook (batch 64) vs batch_fn (batch 16), diagonal with the exact Hessian diagonal: "
          f"baseline {cb.report.baseline_leakage:.6f} / {rep.baseline_leakage:.6f}, int8 "
          f"{cb.report.schemes['int8_weight_only'].leakage:.6f} / {rep.schemes['int8_weight_only'].leakage:.6f}")
    # PyG-style concatenated batches: the records are not on the first dimension of every tensor
    cat_train = DataLoader(train_set, batch_size=64, shuffle=True, collate_fn=collate_concatenated)
    cat_val = DataLoader(val_set, batch_size=64, collate_fn=collate_concatenated)
    print(" ", expect_refusal(lambda: fit(IndexAddMPNN(graphs[0][0].shape[1], concatenated=True), cat_train, cat_val,
                                           root, "graph_cat", batch_fn=xy_graph, max_epochs=1), "record"))


# ---------------------------------------------------------------------------------------------
# 4. the Hydra app on the user's own model and data (ConfigStore, as examples/hydra_own_model.py)
# ---------------------------------------------------------------------------------------------
class MolData(pl.LightningDataModule):
    """ChEMBL2321810 (RDKit) as the user's datamodule: 12 descriptors; ``labels="pic50"`` (regression,
    centred) or ``"multitask"`` (binary, 3 labels with NaN for the missing ones)."""

    def __init__(self, labels: str = "pic50", seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = "regression" if labels == "pic50" else "binary"
        self.num_features, self.batch_size = 12, 1024

    def setup(self, stage: str | None = None) -> None:
        d = chembl_records(self.hparams.seed)
        x = torch.as_tensor(d["x"])
        if self.hparams.labels == "pic50":
            y = torch.as_tensor(d["pic50"])
            y = y - y[d["train"]].mean()
        else:
            y = torch.as_tensor(multitask_labels(d["pic50"], seed=self.hparams.seed))
        tr, va = torch.as_tensor(d["train"]), torch.as_tensor(d["val"])
        self.train_dataset = torch.utils.data.TensorDataset(x[tr], y[tr])
        self.val_dataset = torch.utils.data.TensorDataset(x[va], y[va])
        self.n_train = len(tr)

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=self.batch_size)


class HuberMLP(Regressor):
    def __init__(self, num_features: int, hidden: int = 4, weight_decay: float = 1e-2) -> None:
        super().__init__(num_features, hidden, weight_decay)
        self.save_hyperparameters()

    def forward(self, x):
        return self.net(x).squeeze(-1)  # [B]

    def per_sample_loss(self, outputs, targets):
        return F.huber_loss(outputs, targets, reduction="none", delta=1.0)


class AppMultiTask(MultiTaskMLP):
    def __init__(self, num_features: int, hidden: int = 4, weight_decay: float = 1e-2) -> None:
        super().__init__(num_features, len(THRESHOLDS), torch.tensor([0.54, 1.97, 7.21]), hidden, weight_decay)
        self.save_hyperparameters()


class GraphData(pl.LightningDataModule):
    """ChEMBL2321810 molecules as the user's graph datamodule (batches of :func:`collate_padded`)."""

    def __init__(self, seed: int = 0, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task, self.batch_size = "regression", batch_size

    def setup(self, stage: str | None = None) -> None:
        d = chembl_records(self.hparams.seed)
        graphs = [mol_graph(s) for s in d["smiles"]]
        y = torch.as_tensor(d["pic50"])
        y = (y - y[d["train"]].mean()) / y[d["train"]].std()
        self.num_features = graphs[0][0].shape[1]
        self.train_dataset = GraphSet([graphs[i] for i in d["train"]], y[d["train"]])
        self.val_dataset = GraphSet([graphs[i] for i in d["val"]], y[d["val"]])
        self.n_train = len(self.train_dataset)

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, collate_fn=collate_padded)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=self.batch_size, collate_fn=collate_padded)


class AppMPNN(IndexAddMPNN):
    def __init__(self, num_features: int, hidden: int = 8, steps: int = 2, weight_decay: float = 1e-3) -> None:
        super().__init__(num_features, hidden, steps, weight_decay)
        self.save_hyperparameters()


def app(*overrides: str) -> int:
    import sys

    from mis_lightning.cli import main

    argv, sys.argv = sys.argv, ["mis-lightning", *overrides]
    try:
        main()
        return 0
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv


def part_app(root: Path) -> None:
    import json

    from hydra.core.config_store import ConfigStore

    module = __name__
    cs = ConfigStore.instance()
    cs.store(group="data", name="mol_pic50", node={"_target_": f"{module}.MolData", "labels": "pic50", "seed": "${seed}"})
    cs.store(group="data", name="mol_multitask", node={"_target_": f"{module}.MolData", "labels": "multitask",
                                                        "seed": "${seed}"})
    cs.store(group="model", name="huber_mlp", node={"_target_": f"{module}.HuberMLP", "num_features": "???",
                                                     "hidden": 4, "weight_decay": 1e-2})
    cs.store(group="model", name="multitask_mlp", node={"_target_": f"{module}.AppMultiTask", "num_features": "???",
                                                         "hidden": 4, "weight_decay": 1e-2})
    common = ["trainer.max_epochs=30", "progress=false", "logger=many_loggers", "mis.scoring.uncertainty_draws=2",
              "num_threads=1"]
    t0 = time.perf_counter()
    code = app("-m", "data=mol_pic50", "model=huber_mlp", *common,
               "quantizer=int8_weight_only,intx_weight_only_int4,intx_weight_only_int2",
               f"hydra.sweep.dir={root / 'sweep'}")
    print(f"  sweep exit {code} in {time.perf_counter() - t0:.1f} s")
    with open(root / "sweep" / "aggregate.csv") as fh:
        agg = {r["scheme"]: r for r in csv.DictReader(fh)}
    t0 = time.perf_counter()
    code = app("data=mol_pic50", "model=huber_mlp", *common,
               "schemes=[int8_weight_only,intx_weight_only_int4,intx_weight_only_int2]", f"hydra.run.dir={root / 'single'}")
    print(f"  single run exit {code} in {time.perf_counter() - t0:.1f} s")
    single = json.loads((root / "single" / "report.json").read_text())
    for name, row in agg.items():
        s = single["schemes"][name]
        print(f"  {name}: aggregate leakage {float(row['leakage']):.6f}  single run {s['leakage']:.6f}  "
              f"utility rmse {row.get('utility_rmse', row.get('rmse'))} vs {s['utility'].get('rmse')}")
    result = json.loads((root / "single" / "result.json").read_text())
    print(f"  result.json times_s: {result['times_s']}")
    from mis_lightning.report import Report

    want = report_metrics(Report.from_json(root / "single" / "report.json"))
    got: dict[str, float] = {}
    for path in (root / "single").rglob("metrics.csv"):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                got.update({k: float(v) for k, v in row.items() if k.startswith("mis/") and v != ""})
    bad = [k for k in want if k not in got or abs(want[k] - got[k]) > 1e-12 * max(1.0, abs(want[k]))]
    print(f"  app's CSV log vs its report.json: {len(want)} keys, differing or missing: {bad[:5] or 'none'}")
    from mis_lightning.app.aggregate import main as aggregate

    aggregate([str(root / "sweep"), "--out", str(root / "reaggregated"), "--quiet"])
    again = (root / "reaggregated" / "aggregate.csv").read_text()
    print(f"  mis-lightning-aggregate redone: aggregate.csv identical: {again == (root / 'sweep' / 'aggregate.csv').read_text()}")
    os.environ.update(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_TRACKING_URI=f"file://{root / 'app_mlruns'}")
    code = app("data=mol_pic50", "model=huber_mlp", *common[:-3], "logger=[csv,mlflow]", *common[-2:],
               "schemes=[int8_weight_only]", f"hydra.run.dir={root / 'single_mlflow'}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file://{root / 'app_mlruns'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    logged = {k: v for k, v in runs[0].data.metrics.items() if k.startswith("mis/")}
    want = report_metrics(Report.from_json(root / "single_mlflow" / "report.json"))
    bad = [k for k in want if k not in logged or abs(want[k] - logged[k]) > 1e-12 * max(1.0, abs(want[k]))]
    print(f"  app with logger=[csv,mlflow] (file store): exit {code}, {len(runs)} run(s), status "
          f"{runs[0].info.status}, {len(want)} keys, differing or missing: {bad[:5] or 'none'}; artifacts "
          f"{sorted(a.path for a in client.list_artifacts(runs[0].info.run_id))}")
    # the same from a YAML config dir (hydra.searchpath), two seeds, then mode=assess on seed 1's checkpoint
    conf = root / "my_conf"
    (conf / "data").mkdir(parents=True, exist_ok=True)
    (conf / "model").mkdir(parents=True, exist_ok=True)
    (conf / "data" / "mol.yaml").write_text(f"_target_: {module}.MolData\nlabels: pic50\nseed: ${{seed}}\n")
    (conf / "model" / "huber.yaml").write_text(f"_target_: {module}.HuberMLP\nnum_features: ???\nhidden: 4\n"
                                               "weight_decay: 1.0e-2\n")
    yaml = [f"hydra.searchpath=[file://{conf}]", "data=mol", "model=huber", *common[:2], *common[3:]]
    code = app("-m", *yaml, "logger=csv", "quantizer=int8_weight_only,intx_weight_only_int2", "seed=0,1",
               f"hydra.sweep.dir={root / 'yaml_sweep'}")
    md = (root / "yaml_sweep" / "aggregate.md").read_text()
    chosen = [line for line in md.splitlines() if line.startswith("chosen in")]
    code2 = app(*yaml, "logger=csv", "mode=assess", f"ckpt_path={root / 'yaml_sweep' / '1_int8_weight_only' / 'model.ckpt'}",
                "schemes=[int8_weight_only,intx_weight_only_int4]", f"hydra.run.dir={root / 'yaml_assess'}")
    job = json.loads((root / "yaml_sweep" / "1_int8_weight_only" / "report.json").read_text())["schemes"]["int8_weight_only"]
    again = json.loads((root / "yaml_assess" / "report.json").read_text())["schemes"]["int8_weight_only"]
    print(f"  YAML config dir, seeds 0,1: exit {code}; {chosen}; mode=assess on seed 1's checkpoint: exit {code2}, "
          f"int8 leakage {again['leakage']:.6f} (job {job['leakage']:.6f}), rmse {again['utility']['rmse']:.6f} "
          f"(job {job['utility']['rmse']:.6f})")
    cs.store(group="data", name="mol_graph", node={"_target_": f"{module}.GraphData", "seed": "${seed}"})
    cs.store(group="model", name="index_add_mpnn", node={"_target_": f"{module}.AppMPNN", "num_features": "???"})
    t0 = time.perf_counter()
    code = app("-m", "data=mol_graph", "model=index_add_mpnn", f"batch_fn={module}.xy_graph", "trainer.max_epochs=15",
               "progress=false", "logger=csv", "mis.scoring.uncertainty_draws=2", "num_threads=1",
               "mis.estimation.mode=diagonal", "mis.estimation.hessian=ggn",
               "quantizer=int8_weight_only,intx_weight_only_int2", f"hydra.sweep.dir={root / 'graph_sweep'}")
    with open(root / "graph_sweep" / "aggregate.csv") as fh:
        rows = {r["scheme"]: float(r["leakage"]) for r in csv.DictReader(fh)}
    print(f"  graph sweep through the app: exit {code} in {time.perf_counter() - t0:.1f} s; leakage {rows}")
    t0 = time.perf_counter()
    code = app("data=mol_multitask", "model=multitask_mlp", *common, "schemes=[int8_weight_only]",
               f"hydra.run.dir={root / 'multitask'}")
    print(f"  multitask app run exit {code} in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="all")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.out or tempfile.mkdtemp(prefix="nu44b_"))
    print(f"outputs under {root}")
    parts = {"multitask": part_multitask, "regression": part_regression, "graph": part_graph, "app": part_app}
    for name, fn in parts.items():
        if args.part in (name, "all"):
            t0 = time.perf_counter()
            fn(root)
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]\n")


if __name__ == "__main__":
    main()
