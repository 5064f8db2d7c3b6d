"""LightningDataModules yielding ``(inputs [B, F] float32, targets [B] float32)`` batches
(the graph datamodules: ``({"atoms", "adj", "mask"}, targets [B])``, see :mod:`.graphs`).

RDKit is only imported when a molecular datamodule is set up (``pip install
"mis-lightning[chem]"``); PyTDC only when a TDC dataset is downloaded.
"""

from mis_lightning.data.base import TensorDataModule, split_indices
from mis_lightning.data.graphs import (
    ChEMBLGraphDataModule,
    GraphDataset,
    NCITPSAGraphDataModule,
    collate_graphs,
    featurize_graphs,
)
from mis_lightning.data.molecules import (
    ChEMBLDataModule,
    MoleculeDataModule,
    NCITPSADataModule,
    SkippedRowsWarning,
    TDCADMETDataModule,
    default_cache_dir,
    featurize_smiles,
    featurize_smiles_cached,
)
from mis_lightning.data.synthetic import (
    SyntheticRegressionDataModule,
    ar1_cholesky,
    ar1_covariance,
    make_synthetic,
)

__all__ = [
    "ChEMBLDataModule",
    "ChEMBLGraphDataModule",
    "GraphDataset",
    "MoleculeDataModule",
    "NCITPSADataModule",
    "NCITPSAGraphDataModule",
    "SkippedRowsWarning",
    "SyntheticRegressionDataModule",
    "TDCADMETDataModule",
    "TensorDataModule",
    "collate_graphs",
    "ar1_cholesky",
    "ar1_covariance",
    "default_cache_dir",
    "featurize_graphs",
    "featurize_smiles",
    "featurize_smiles_cached",
    "make_synthetic",
    "split_indices",
]
