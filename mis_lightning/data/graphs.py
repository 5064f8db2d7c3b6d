"""Molecular graphs (RDKit) as padded tensors, and the graph datamodules.

A molecule of ``a`` heavy atoms becomes one *record* of three tensors padded to a fixed
``max_atoms`` (``N``) shared by the whole dataset:

* ``atoms [N, F]`` float32: per-atom features (:data:`ATOM_FEATURES`, ``F = 28``), zero rows
  for the padding;
* ``adj [N, N]`` float32: the symmetric bond adjacency (1 per bond, zero for the padding);
* ``mask [N]`` float32: 1 for the ``a`` real atoms, 0 for the padding.

A batch is ``({"atoms": [B, N, F], "adj": [B, N, N], "mask": [B, N]}, targets [B])``
(:func:`collate_graphs`, which is what ``torch.utils.data.default_collate`` produces for
these records, plus a check that every record has the same padding).

Why padded to one size, and not concatenated with a batch index: every tensor of a batch
then has the records on its first dimension, so the estimation pass (``torch.func.vmap``
over records, per-record slicing of pytree inputs, the content hashes that select the
stored records) handles graph batches exactly as it handles ``[B, F]`` tensors, with no
graph-specific code; and because the padding does not depend on which molecules share a
batch, a record's bytes (hence its hash, hence the stored-record sample) are the same
however the data is batched, shuffled or split over processes. The cost is ``N^2`` per
record for the dense adjacency: small for drug-like molecules (``N = 41`` on ChEMBL2321810).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mis_lightning.data.base import check_positive_int, split_indices
from mis_lightning.data.molecules import (
    ChEMBLDataModule,
    Failure,
    NCITPSADataModule,
    _parse_smiles,
    _require_rdkit,
    usable_rows,
    warn_duplicates,
)

__all__ = ["ATOM_FEATURES", "ChEMBLGraphDataModule", "GraphDataset", "NCITPSAGraphDataModule",
           "atom_feature_names", "collate_graphs", "featurize_graphs"]

#: elements with their own one-hot slot; every other element shares the last ("other") slot
ELEMENTS = ("C", "N", "O", "S", "F", "Cl", "Br", "I", "P")
_DEGREES = (0, 1, 2, 3, 4, 5)
_CHARGES = (-1, 0, 1)
_NUM_HS = (0, 1, 2, 3)
_HYBRID = ("SP", "SP2", "SP3")


def atom_feature_names() -> list[str]:
    """Names of the ``F = 28`` per-atom features, in column order."""
    return ([f"element={e}" for e in ELEMENTS] + ["element=other"]
            + [f"degree={d}" for d in _DEGREES] + [f"charge={c:+d}" for c in _CHARGES]
            + [f"num_hs={h}" for h in _NUM_HS] + ["aromatic", "in_ring"]
            + [f"hybridization={h}" for h in _HYBRID])


#: number of per-atom features (one-hots of element, degree, formal charge, attached H,
#: hybridization; aromaticity and ring flags); values outside a one-hot's list set no slot
#: except for the element, which falls into "other"
ATOM_FEATURES = len(atom_feature_names())


def _atom_row(atom: Any) -> np.ndarray:
    row = np.zeros(ATOM_FEATURES, dtype=np.float32)
    sym = atom.GetSymbol()
    row[ELEMENTS.index(sym) if sym in ELEMENTS else len(ELEMENTS)] = 1.0
    off = len(ELEMENTS) + 1
    for values, v in ((_DEGREES, atom.GetDegree()), (_CHARGES, atom.GetFormalCharge()),
                      (_NUM_HS, atom.GetTotalNumHs())):
        if v in values:
            row[off + values.index(v)] = 1.0
        off += len(values)
    row[off], row[off + 1] = float(atom.GetIsAromatic()), float(atom.IsInRing())
    off += 2
    hyb = str(atom.GetHybridization())
    if hyb in _HYBRID:
        row[off + _HYBRID.index(hyb)] = 1.0
    return row


def featurize_graphs(
    smiles: Sequence[str], max_atoms: int | None = None,
) -> tuple[dict[str, np.ndarray], list[int], list[Failure]]:
    """Padded molecular graphs of SMILES strings (RDKit, heavy atoms only).

    Args:
        smiles: ``n`` SMILES strings.
        max_atoms: padding size ``N``; ``None``: the largest parsed molecule. Molecules with
            more heavy atoms are reported as failures (never truncated: a cut molecule would
            be a different molecule).

    Returns:
        ``(graphs, valid_index, failures)``: ``graphs`` holds ``atoms [m, N, F]``,
        ``adj [m, N, N]`` and ``mask [m, N]`` (float32) for the ``m`` usable molecules in input
        order; ``valid_index`` their positions in ``smiles``; ``failures`` one
        ``(position, smiles, reason)`` per unusable entry.

    Raises:
        ValueError: ``max_atoms`` is not an integer >= 1.
    """
    _require_rdkit()
    if max_atoms is not None:
        max_atoms = check_positive_int("max_atoms", max_atoms)
    mols, valid, failures = [], [], []
    for i, smi in enumerate(smiles):
        mol, reason = _parse_smiles(smi)
        if mol is None:
            failures.append((i, str(smi), reason))
        elif max_atoms is not None and mol.GetNumAtoms() > max_atoms:
            failures.append((i, str(smi), f"{mol.GetNumAtoms()} heavy atoms > max_atoms = {max_atoms}"))
        else:
            mols.append(mol)
            valid.append(i)
    n_pad = max_atoms if max_atoms is not None else max((m.GetNumAtoms() for m in mols), default=1)
    m = len(mols)
    atoms = np.zeros((m, n_pad, ATOM_FEATURES), dtype=np.float32)
    adj = np.zeros((m, n_pad, n_pad), dtype=np.float32)
    mask = np.zeros((m, n_pad), dtype=np.float32)
    for k, mol in enumerate(mols):
        a = mol.GetNumAtoms()
        atoms[k, :a] = np.stack([_atom_row(at) for at in mol.GetAtoms()])
        mask[k, :a] = 1.0
        for bond in mol.GetBonds():
            u, v = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            adj[k, u, v] = adj[k, v, u] = 1.0
    return {"atoms": atoms, "adj": adj, "mask": mask}, valid, failures


class GraphDataset(Dataset):
    """Padded molecular graphs with targets; item ``i`` is ``({"atoms", "adj", "mask"}, y)``.

    Args:
        atoms: ``[n, N, F]``; adj: ``[n, N, N]``; mask: ``[n, N]`` (any array-likes, stored
            as float32 tensors); targets: ``[n]``.

    Raises:
        ValueError: inconsistent shapes (the message gives them).
    """

    def __init__(self, atoms: Any, adj: Any, mask: Any, targets: Any) -> None:
        self.atoms = torch.as_tensor(np.asarray(atoms), dtype=torch.float32).contiguous()
        self.adj = torch.as_tensor(np.asarray(adj), dtype=torch.float32).contiguous()
        self.mask = torch.as_tensor(np.asarray(mask), dtype=torch.float32).contiguous()
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32).reshape(-1).contiguous()
        n, npad = self.atoms.shape[:2] if self.atoms.ndim == 3 else (-1, -1)
        if (self.atoms.ndim != 3 or tuple(self.adj.shape) != (n, npad, npad)
                or tuple(self.mask.shape) != (n, npad) or self.targets.shape[0] != n):
            raise ValueError(
                "GraphDataset needs atoms [n, N, F], adj [n, N, N], mask [n, N], targets [n]; got "
                f"{list(self.atoms.shape)}, {list(self.adj.shape)}, {list(self.mask.shape)}, "
                f"{list(self.targets.shape)}")

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"atoms": self.atoms[i], "adj": self.adj[i], "mask": self.mask[i]}, self.targets[i]

    @property
    def max_atoms(self) -> int:
        """The padding size ``N``."""
        return int(self.atoms.shape[1])


def collate_graphs(samples: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]]
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stack graph records into a batch ``({"atoms": [B, N, F], "adj": [B, N, N],
    "mask": [B, N]}, targets [B])``.

    Raises:
        ValueError: records padded to different sizes (e.g. from datasets built with different
            ``max_atoms``); the message gives the sizes found.
    """
    sizes = sorted({int(g["mask"].shape[0]) for g, _ in samples})
    if len(sizes) > 1:
        raise ValueError(f"graph records padded to different sizes {sizes} cannot share a batch: "
                         "build every dataset with the same max_atoms")
    keys = samples[0][0].keys()
    graphs = {k: torch.stack([g[k] for g, _ in samples]) for k in keys}
    return graphs, torch.stack([torch.as_tensor(y) for _, y in samples]).reshape(-1)


class _GraphMixin:
    """Builds :class:`GraphDataset` splits from a molecular datamodule's records: same records,
    same skipped-row reporting and same split (``split_indices`` with ``seed``) as the
    fingerprint datamodules, so ``model=mpnn`` and ``model=mlp_probe`` see the same members
    whenever every SMILES parses and fits in ``max_atoms``."""

    max_atoms: int | None

    def _build(self) -> None:
        _require_rdkit()
        records, _sources = self._load_records()  # type: ignore[attr-defined]
        name = type(self).__name__
        graphs, valid, failures = featurize_graphs(records.smiles, self.max_atoms)
        row_of = {pos: k for k, pos in enumerate(valid)}
        keep, self.skipped = usable_rows(records, failures, name)
        sel = np.asarray([row_of[i] for i in keep], dtype=np.int64)
        g = {k: v[sel] for k, v in graphs.items()}
        y = np.asarray([records.targets[i] for i in keep], dtype=np.float64)
        warn_duplicates([records.smiles[i] for i in keep], y, name)
        self.rows = np.asarray([records.rows[i] for i in keep], dtype=np.int64)
        self.smiles = [records.smiles[i] for i in keep]
        if self.task == "binary":  # type: ignore[has-type]
            y = self._binarize(y)  # type: ignore[attr-defined]
        tr, va, te = split_indices(len(keep), self.val_fraction, self.test_fraction, self.seed)  # type: ignore[attr-defined]
        self.train_idx, self.val_idx, self.test_idx = tr, va, te
        if self.task == "regression" and self.standardize_target:  # type: ignore[attr-defined]
            self.target_mean = float(y[tr].mean())
            sd = float(y[tr].std())
            self.target_std = sd if sd > 1e-12 else 1.0
            y = (y - self.target_mean) / self.target_std
        else:
            self.target_mean, self.target_std = 0.0, 1.0
        self.num_features = ATOM_FEATURES
        self.max_atoms_used = int(g["mask"].shape[1])

        def part(idx: np.ndarray) -> GraphDataset:
            return GraphDataset(g["atoms"][idx], g["adj"][idx], g["mask"][idx], y[idx])

        self.train_dataset, self.val_dataset, self.test_dataset = part(tr), part(va), part(te)

    def _loader(self, ds: Any, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None  # type: ignore[attr-defined]
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, generator=gen,  # type: ignore[attr-defined]
                          num_workers=self.num_workers, collate_fn=collate_graphs)  # type: ignore[attr-defined]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader of graph batches (order reproducible from ``seed``)."""
        return self._loader(self._require(self.train_dataset, "train_dataset"), True)  # type: ignore[attr-defined]

    def val_dataloader(self) -> DataLoader:
        """Validation loader of graph batches (not shuffled)."""
        return self._loader(self._require(self.val_dataset, "val_dataset"), False)  # type: ignore[attr-defined]

    def test_dataloader(self) -> DataLoader:
        """Test loader of graph batches (not shuffled)."""
        return self._loader(self._require(self.test_dataset, "test_dataset"), False)  # type: ignore[attr-defined]


class ChEMBLGraphDataModule(_GraphMixin, ChEMBLDataModule):
    """ChEMBL series CHEMBL2321810 (shipped with RDKit) as padded molecular graphs -> activity.

    The records, joins, skipped rows, split and target standardisation of
    :class:`~mis_lightning.data.ChEMBLDataModule`; inputs are graphs (module docstring)
    instead of fingerprints, and ``num_features`` is the number of atom features (28).

    Args:
        max_atoms: padding size ``N`` (``None``: the largest molecule, 41 here); larger
            molecules are skipped and reported.
        task, threshold, smiles_path, activity_path, batch_size, val_fraction,
        test_fraction, seed, standardize_target, num_workers: as in ``ChEMBLDataModule``.

    Raises:
        FileNotFoundError: (at ``setup()``) a missing file.
    """

    def __init__(self, task: str = "regression", threshold: float = 6.5, max_atoms: int | None = None,
                 smiles_path: str | None = None, activity_path: str | None = None, **options: Any) -> None:
        super().__init__(task=task, threshold=threshold, smiles_path=smiles_path,
                         activity_path=activity_path, **options)
        self.save_hyperparameters()
        self.max_atoms = None if max_atoms is None else check_positive_int("max_atoms", max_atoms)


class NCITPSAGraphDataModule(_GraphMixin, NCITPSADataModule):
    """The NCI TPSA set (shipped with RDKit) as padded molecular graphs (see
    :class:`~mis_lightning.data.NCITPSADataModule` for the records and options; ``max_atoms`` as
    in :class:`ChEMBLGraphDataModule`). A public set disjoint from the ChEMBL series: where
    an encoder can be pretrained before a head is fitted on ChEMBL.
    """

    def __init__(self, task: str = "regression", threshold: float | None = None,
                 max_atoms: int | None = None, max_molecules: int | None = None, path: str | None = None,
                 **options: Any) -> None:
        super().__init__(task=task, threshold=threshold, max_molecules=max_molecules, path=path, **options)
        self.save_hyperparameters()
        self.max_atoms = None if max_atoms is None else check_positive_int("max_atoms", max_atoms)
