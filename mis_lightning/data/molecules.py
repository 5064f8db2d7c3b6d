"""Molecular property datasets (RDKit featurisation) as LightningDataModules.

Three data sources, all featurised with :func:`featurize_smiles` (Morgan fingerprints or RDKit
2D descriptors) and cached on disk as ``.npz`` files:

* :class:`ChEMBLDataModule` -- the ChEMBL series ``CHEMBL2321810`` shipped with RDKit in
  ``RDContribDir/FreeWilson/data`` (1,017 compounds; ``.smi`` file ``"<SMILES> <id>"`` without
  header, ``_act.csv`` file ``Name,Act`` with ``Act`` a pIC50-like activity between ~4.3 and 9.2);
* :class:`NCITPSADataModule` -- the first 5,000 NCI molecules with their topological polar
  surface area (``RDDataDir/NCI/first_5k.tpsa.csv``: one ``#`` comment line, then
  ``SMILES,TPSA`` rows without header; 8 SMILES there do not parse in RDKit);
* :class:`TDCADMETDataModule` -- a Therapeutics Data Commons ADMET dataset, downloaded through
  PyTDC, or read from a local CSV in TDC's format (columns ``Drug_ID``, ``Drug``, ``Y``).

Rows that cannot be used (unparsable SMILES, missing or non-numeric targets, ids without
activity) are never dropped silently: each datamodule emits a :class:`SkippedRowsWarning`
(and a ``logging`` warning) with the count and the first rows, and exposes them as
``dm.skipped``: a list of ``(row, smiles, reason)`` where ``row`` is the 0-based index of the
record in the molecule file (data records only: no header / comment lines) and ``reason``
also names the file and its 1-based line number.

Requires RDKit (``pip install "mis-lightning[chem]"``); it is imported lazily.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mis_lightning._user_warnings import warn
from mis_lightning._warning_filters import ignoring
from mis_lightning.data.base import TASKS, TensorDataModule, as_dataset, split_indices

log = logging.getLogger(__name__)

#: bump when the layout of the cached ``.npz`` changes
_CACHE_FORMAT = 1
#: maximum number of skipped rows listed in warnings
_MAX_LISTED = 5


def usable_rows(records: Any, failures: Sequence[tuple[int, str, str]], name: str
                ) -> tuple[list[int], list[tuple[Any, str, str]]]:
    """The positions of the usable records and the skipped ones ``(row, smiles, reason)``.

    ``failures`` (``(position, smiles, why)`` from a featurizer) are merged into the records'
    own reasons; skipped rows are announced in one :class:`SkippedRowsWarning` naming the
    first few.

    Raises:
        ValueError: fewer than 3 usable molecules (names the datamodule ``name``).
    """
    reasons = list(records.reasons)
    for pos, _smi, why in failures:
        reasons[pos] = f"{reasons[pos]}; {why}" if reasons[pos] else why
    keep = [i for i in range(len(records)) if not reasons[i]]
    skipped = [(records.rows[i], records.smiles[i], reasons[i]) for i in range(len(records)) if reasons[i]]
    if skipped:
        listed = ", ".join(f"row {r} ({why})" for r, _, why in skipped[:_MAX_LISTED])
        more = "" if len(skipped) <= _MAX_LISTED else ", ..."
        warn(f"{name}: skipped {len(skipped)} of {len(records)} rows: {listed}{more} "
             "(full list in .skipped)", SkippedRowsWarning)
    if len(keep) < 3:
        raise ValueError(f"{name}: only {len(keep)} usable molecules out of {len(records)}")
    return keep, skipped
#: TDC names that live in ``tdc.single_pred.Tox`` rather than ``ADME``
_TDC_TOX_NAMES = {"herg", "herg_karim", "ames", "dili", "ld50_zhu", "clintox", "carcinogens_lagunin",
                  "skin_reaction"}

Failure = tuple[int, str, str]


class SkippedRowsWarning(UserWarning):
    """Some input rows could not be used and were skipped (see ``dm.skipped``)."""


class DuplicateRecordsWarning(UserWarning):
    """The same SMILES appears in several kept rows (each copy is a record), or kept SMILES
    hold several fragments (salts, mixtures)."""


def warn_duplicates(smiles: list[str], targets: np.ndarray, name: str) -> None:
    """Warn (:class:`DuplicateRecordsWarning`) when kept SMILES hold several fragments (salts,
    mixtures: featurised as given), and when a SMILES string appears in several kept rows: each copy is a training record (``n`` counts them, and a molecule seen twice is a
    member twice), and copies with different activities are a labelling question the data
    module does not settle."""
    mixtures = [smi for smi in smiles if "." in smi]
    if mixtures:  # salts and mixtures: every fragment is featurised (no salt stripping here)
        warn(f"{name}: {len(mixtures)} kept SMILES hold several fragments (salts or mixtures, e.g. "
             f"{mixtures[0]!r}): featurised as given, counter-ions included; strip them first (e.g. "
             "RDKit's rdMolStandardize.LargestFragmentChooser) if the activity belongs to the parent",
             DuplicateRecordsWarning)
    seen: dict[str, list[float]] = {}
    for smi, t in zip(smiles, targets.tolist()):
        seen.setdefault(smi, []).append(t)
    dup = {k: v for k, v in seen.items() if len(v) > 1}
    if not dup:
        return
    differ = sum(1 for v in dup.values() if max(v) - min(v) > 1e-12 * max(1.0, max(abs(x) for x in v)))
    first = next(iter(dup))
    warn(f"{name}: {len(dup)} SMILES appear in more than one row ({sum(len(v) for v in dup.values())} "
         f"rows; {differ} with different activities; e.g. {first!r}): each copy is kept as its own "
         "record (n counts copies, and a duplicated molecule is a member twice); deduplicate the file "
         "if that is not intended", DuplicateRecordsWarning)


def _require_rdkit() -> Any:
    """Import and return the ``rdkit`` module, with an actionable error when it is missing."""
    try:
        import rdkit
        import rdkit.Chem
    except ImportError as exc:  # pragma: no cover - exercised only without rdkit
        raise ImportError(
            'RDKit is required for the molecular datasets: pip install "mis-lightning[chem]"'
        ) from exc
    return rdkit


# ---------------------------------------------------------------------------------------
# featurisation
# ---------------------------------------------------------------------------------------
def _parse_smiles(smiles: str) -> tuple[Any, str]:
    """Parse one SMILES with RDKit logging blocked; return ``(mol or None, failure reason)``."""
    from rdkit import Chem, rdBase

    if not isinstance(smiles, str) or not smiles.strip():
        return None, "empty SMILES"
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is not None:
            if mol.GetNumAtoms() == 0:
                return None, "SMILES has no atoms"
            return mol, ""
        raw = Chem.MolFromSmiles(smiles, sanitize=False)
        if raw is None:
            return None, "SMILES syntax error"
        try:
            Chem.SanitizeMol(raw)
        except Chem.MolSanitizeException as exc:
            return None, f"sanitization failed: {type(exc).__name__}: {exc}".strip()
        return None, "RDKit could not parse the SMILES"  # pragma: no cover


# A small physico-chemical profile (cheap to compute; ~12 features keeps small probes in
# the regime d << n that the indicator's asymptotics need on ~1,000-molecule sets).
PHYSCHEM_DESCRIPTORS = (
    "MolWt", "MolLogP", "MolMR", "TPSA", "NumHDonors", "NumHAcceptors", "NumRotatableBonds",
    "RingCount", "NumAromaticRings", "FractionCSP3", "HeavyAtomCount", "NumHeteroatoms",
)


def descriptor_names() -> list[str]:
    """Names of the RDKit 2D descriptors used by ``kind="descriptors"`` (``Descriptors.descList``)."""
    _require_rdkit()
    from rdkit.Chem import Descriptors

    return [name for name, _ in Descriptors.descList]


def featurize_smiles(
    smiles: Sequence[str],
    kind: str = "morgan",
    radius: int = 2,
    n_bits: int = 2048,
    fill_value: float = 0.0,
) -> tuple[np.ndarray, list[int], list[Failure]]:
    """Featurise SMILES strings with RDKit.

    Args:
        smiles: ``n`` SMILES strings.
        kind: ``"morgan"`` -- Morgan (ECFP-like) bit fingerprints from
            ``rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)``, values
            in ``{0, 1}``, ``F = n_bits``; or ``"descriptors"`` -- the RDKit 2D descriptors of
            ``rdkit.Chem.Descriptors.descList`` (``F = len(descList)``, 217 in RDKit 2026.09, raw
            units, NOT standardised here; the datamodules standardise them with train
            statistics). Descriptors cost ~5 ms per drug-like molecule (fingerprints ~0.2 ms),
            hence the disk cache of :func:`featurize_smiles_cached`.
        radius: Morgan radius (``kind="morgan"``).
        n_bits: fingerprint length (``kind="morgan"``).
        fill_value: replacement for non-finite descriptor values (NaN, +-inf, or values that
            overflow float32, e.g. Gasteiger-charge descriptors of organometallics). Pass
            ``float("nan")`` to keep them identifiable.

        ``kind="physchem"``: the 12 RDKit descriptors of ``PHYSCHEM_DESCRIPTORS`` (molecular
        weight, logP, molar refractivity, TPSA, H-bond donors/acceptors, rotatable bonds,
        rings, aromatic rings, sp3 fraction, heavy atoms, heteroatoms), same handling as
        ``"descriptors"``.

    Returns:
        ``(features, valid_index, failures)``: ``features`` float32 ``[m, F]`` for the ``m``
        parsable molecules, in input order; ``valid_index`` their positions in ``smiles``;
        ``failures`` one ``(position, smiles, reason)`` per unparsable entry
        (``m + len(failures) == n``).
    """
    _require_rdkit()
    kind = _check_featurizer(kind)
    smiles = list(smiles)
    mols, valid_index, failures = [], [], []
    for i, smi in enumerate(smiles):
        mol, reason = _parse_smiles(smi)
        if mol is None:
            failures.append((i, str(smi), reason))
        else:
            mols.append(mol)
            valid_index.append(i)

    if kind == "morgan":
        from rdkit.Chem import rdFingerprintGenerator

        radius, n_bits = int(radius), int(n_bits)
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        if n_bits < 1:
            raise ValueError(f"n_bits must be >= 1, got {n_bits}")
        gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
        feats = np.zeros((len(mols), n_bits), dtype=np.float32)
        for k, mol in enumerate(mols):
            feats[k] = gen.GetFingerprintAsNumPy(mol)
    else:
        from rdkit.Chem import Descriptors

        if kind == "physchem":
            table = dict(Descriptors.descList)
            funcs = [table[name] for name in PHYSCHEM_DESCRIPTORS]
        else:
            funcs = [fn for _, fn in Descriptors.descList]
        raw = np.full((len(mols), len(funcs)), np.nan, dtype=np.float64)
        with ignoring(("", Warning)):  # a few descriptors warn on exotic molecules
            for k, mol in enumerate(mols):
                for j, fn in enumerate(funcs):
                    try:
                        raw[k, j] = float(fn(mol))
                    except Exception:  # noqa: BLE001 - undefined for this molecule -> NaN
                        raw[k, j] = np.nan
        limit = float(np.finfo(np.float32).max)
        raw[~np.isfinite(raw) | (np.abs(raw) > limit)] = fill_value
        feats = raw.astype(np.float32)
    return feats, valid_index, failures


def _check_featurizer(kind: str) -> str:
    if kind not in ("morgan", "descriptors", "physchem"):
        raise ValueError(f"featurizer must be 'morgan', 'descriptors' or 'physchem', got {kind!r}")
    return kind


# ---------------------------------------------------------------------------------------
# disk cache
# ---------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Feature cache folder: ``$MIS_LIGHTNING_CACHE`` if set, else ``~/.cache/mis_lightning/features``."""
    env = os.environ.get("MIS_LIGHTNING_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/mis_lightning/features").expanduser()


def feature_cache_key(
    source_paths: Sequence[str | os.PathLike], smiles: Sequence[str], params: dict[str, Any]
) -> str:
    """SHA-256 key of (source files' absolute path, mtime, size; featuriser params; SMILES).

    The SMILES list is part of the key so that subsamples (e.g. ``max_molecules``) of the
    same file get their own entry; the RDKit version too, since descriptor sets change.
    """
    from rdkit import __version__ as rdkit_version

    h = hashlib.sha256()
    for p in source_paths:
        p = os.path.abspath(os.fspath(p))
        st = os.stat(p)
        h.update(f"{p}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
    meta = dict(params, rdkit=rdkit_version, format=_CACHE_FORMAT)
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    h.update(hashlib.sha256("\n".join(smiles).encode()).digest())
    return h.hexdigest()[:32]


def featurize_smiles_cached(
    smiles: Sequence[str],
    source_paths: Sequence[str | os.PathLike],
    kind: str = "morgan",
    radius: int = 2,
    n_bits: int = 2048,
    fill_value: float = 0.0,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, list[int], list[Failure], Path, bool]:
    """:func:`featurize_smiles` with an ``.npz`` disk cache.

    Returns ``(features, valid_index, failures, cache_path, from_cache)``. The cache file is
    ``<cache_dir>/<kind>-<key>.npz`` with ``key = feature_cache_key(...)``; it is written
    atomically. ``cache_dir=None`` uses :func:`default_cache_dir`. An unreadable cache file
    is ignored and rewritten.
    """
    _require_rdkit()
    kind = _check_featurizer(kind)
    params: dict[str, Any] = {"kind": kind, "fill_value": repr(float(fill_value))}
    if kind == "morgan":
        params.update(radius=int(radius), n_bits=int(n_bits))
    if kind == "physchem":
        params.update(descriptors=list(PHYSCHEM_DESCRIPTORS))
    smiles = [str(s) for s in smiles]
    key = feature_cache_key(source_paths, smiles, params)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{kind}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = z["features"]
                valid = [int(i) for i in z["valid_index"]]
                failures = [
                    (int(r), str(s), str(m))
                    for r, s, m in zip(z["fail_rows"], z["fail_smiles"], z["fail_reasons"])
                ]
            return feats, valid, failures, path, True
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # corrupt: recompute
            log.warning("ignoring unreadable feature cache %s (%s)", path, exc)
    feats, valid, failures = featurize_smiles(
        smiles, kind=kind, radius=radius, n_bits=n_bits, fill_value=fill_value
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                features=feats,
                valid_index=np.asarray(valid, dtype=np.int64),
                fail_rows=np.asarray([f[0] for f in failures], dtype=np.int64),
                fail_smiles=np.asarray([f[1] for f in failures], dtype=str),
                fail_reasons=np.asarray([f[2] for f in failures], dtype=str),
            )
        os.replace(tmp, path)
    except OSError as exc:  # read-only home etc.: caching is an optimisation only
        log.warning("could not write feature cache %s (%s)", path, exc)
    return feats, valid, failures, path, False


# ---------------------------------------------------------------------------------------
# file readers
# ---------------------------------------------------------------------------------------
def _check_file(path: str | os.PathLike, what: str, option: str | None = None) -> str:
    """``path`` as a string; ``FileNotFoundError`` naming ``what`` (and the datamodule's argument
    ``option`` that gave it) when it is not a file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}" + (f" (the {option} argument)" if option else ""))
    return path


def _parse_float(text: str | None) -> tuple[float | None, str]:
    """``(value, "")`` or ``(None, reason)`` for a target cell."""
    if text is None or str(text).strip() == "":
        return None, "missing value"
    try:
        value = float(str(text).strip())
    except ValueError:
        return None, f"non-numeric value {str(text).strip()!r}"
    if not math.isfinite(value):
        return None, f"non-finite value {str(text).strip()!r}"
    return value, ""


class _Records:
    """Molecule records read from files: SMILES, targets (None when unusable), reasons."""

    def __init__(self) -> None:
        self.smiles: list[str] = []
        self.targets: list[float | None] = []
        self.reasons: list[str] = []  # "" when the row is usable so far
        self.rows: list[int] = []  # 0-based record index in the source file

    def add(self, row: int, smiles: str, target: float | None, reason: str) -> None:
        self.rows.append(row)
        self.smiles.append(smiles)
        self.targets.append(target)
        self.reasons.append(reason)

    def __len__(self) -> int:
        return len(self.smiles)


# ---------------------------------------------------------------------------------------
# datamodules
# ---------------------------------------------------------------------------------------
class MoleculeDataModule(TensorDataModule):
    """Base class of the molecular datamodules (featurise, join, split, standardise).

    Subclasses implement :meth:`_load_records`. After ``setup()``:

    * ``num_features``: ``n_bits`` (Morgan) or the number of RDKit descriptors;
    * ``task``: ``"regression"`` or ``"binary"``;
    * ``skipped``: list of ``(row, smiles, reason)`` of the unusable rows;
    * ``rows``: ``int64 [n]`` source-file row of each usable molecule, and ``train_idx``,
      ``val_idx``, ``test_idx``: positions into ``rows`` of each split (so
      ``rows[train_idx]`` are the training molecules' file rows -- the "members");
    * ``smiles``: SMILES of the usable molecules (aligned with ``rows``);
    * ``target_mean``, ``target_std``: train statistics used to standardise regression targets
      (``0.``/``1.`` when not standardised); ``feature_mean``/``feature_std`` (``[F]``, only for
      descriptors; ``None`` for fingerprints);
    * ``cache_path``, ``loaded_from_cache``: the feature cache file and whether it was reused.
    """

    def __init__(
        self,
        task: str = "regression",
        threshold: float | None = None,
        featurizer: str = "morgan",
        radius: int = 2,
        n_bits: int = 1024,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        cache_dir: str | None = None,
        standardize_target: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        self.threshold = None if threshold is None else float(threshold)
        self.featurizer = _check_featurizer(featurizer)
        self.radius = int(radius)
        self.n_bits = int(n_bits)
        if self.radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius!r}")
        if self.n_bits < 1:
            raise ValueError(f"n_bits must be >= 1, got {n_bits!r}")
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        split_indices(1000, self.val_fraction, self.test_fraction, 0)  # validate early
        self.cache_dir = cache_dir
        self.standardize_target = bool(standardize_target)
        self.skipped: list[Failure] = []
        self.rows: np.ndarray | None = None
        self.smiles: list[str] = []
        self.train_idx = self.val_idx = self.test_idx = None
        self.target_mean = 0.0
        self.target_std = 1.0
        self.feature_mean: np.ndarray | None = None
        self.feature_std: np.ndarray | None = None
        self.cache_path: Path | None = None
        self.loaded_from_cache = False

    # subclasses -------------------------------------------------------------------------
    def _load_records(self) -> tuple[_Records, list[str]]:  # pragma: no cover - abstract
        """Return the records and the source file paths (for the cache key)."""
        raise NotImplementedError

    def _binarize(self, y: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            values = np.unique(y)
            if not np.all(np.isin(values, (0.0, 1.0))):
                raise ValueError(
                    f"{type(self).__name__}: task='binary' needs a threshold (targets are not "
                    f"0/1 labels; found {values[:5]}...)"
                )
            return y.astype(np.float64)
        return (y >= self.threshold).astype(np.float64)

    # build ------------------------------------------------------------------------------
    def _build(self) -> None:
        _require_rdkit()
        records, sources = self._load_records()
        name = type(self).__name__
        fill = float("nan") if self.featurizer in ("descriptors", "physchem") else 0.0
        feats, valid, failures, self.cache_path, self.loaded_from_cache = (
            featurize_smiles_cached(
                records.smiles,
                sources,
                kind=self.featurizer,
                radius=self.radius,
                n_bits=self.n_bits,
                fill_value=fill,
                cache_dir=self.cache_dir,
            )
        )
        feat_row = {pos: k for k, pos in enumerate(valid)}
        keep, self.skipped = usable_rows(records, failures, name)

        x = feats[[feat_row[i] for i in keep]].astype(np.float64)
        y = np.asarray([records.targets[i] for i in keep], dtype=np.float64)
        warn_duplicates([records.smiles[i] for i in keep], y, name)
        self.rows = np.asarray([records.rows[i] for i in keep], dtype=np.int64)
        self.smiles = [records.smiles[i] for i in keep]
        if self.task == "binary":
            y = self._binarize(y)

        tr, va, te = split_indices(len(keep), self.val_fraction, self.test_fraction, self.seed)
        self.train_idx, self.val_idx, self.test_idx = tr, va, te

        if self.featurizer in ("descriptors", "physchem"):
            # impute non-finite descriptors with the train median, then z-score with train stats
            train_x = x[tr]
            med = np.nanmedian(np.where(np.isfinite(train_x), train_x, np.nan), axis=0)
            med = np.where(np.isfinite(med), med, 0.0)
            bad = ~np.isfinite(x)
            x[bad] = np.broadcast_to(med, x.shape)[bad]
            mean = x[tr].mean(axis=0)
            std = x[tr].std(axis=0)
            std = np.where(std > 1e-12, std, 1.0)
            x = (x - mean) / std
            self.feature_mean, self.feature_std = mean, std

        if self.task == "regression" and self.standardize_target:
            self.target_mean = float(y[tr].mean())
            sd = float(y[tr].std())
            self.target_std = sd if sd > 1e-12 else 1.0
            y = (y - self.target_mean) / self.target_std
        else:
            self.target_mean, self.target_std = 0.0, 1.0

        self.num_features = int(x.shape[1])
        self.train_dataset = as_dataset(x[tr], y[tr])
        self.val_dataset = as_dataset(x[va], y[va])
        self.test_dataset = as_dataset(x[te], y[te])


def _rdkit_file(*parts: str, base: str) -> str:
    _require_rdkit()
    from rdkit import RDConfig

    root = RDConfig.RDContribDir if base == "contrib" else RDConfig.RDDataDir
    return os.path.join(root, *parts)


def default_chembl_paths() -> tuple[str, str]:
    """``(smiles_path, activity_path)`` of the ChEMBL2321810 files shipped with RDKit."""
    smi = _rdkit_file("FreeWilson", "data", "CHEMBL2321810.smi", base="contrib")
    return smi, os.path.join(os.path.dirname(smi), "CHEMBL2321810_act.csv")


def default_nci_tpsa_path() -> str:
    """Path of ``NCI/first_5k.tpsa.csv`` shipped with RDKit."""
    return _rdkit_file("NCI", "first_5k.tpsa.csv", base="data")


class ChEMBLDataModule(MoleculeDataModule):
    """ChEMBL series CHEMBL2321810 (1,017 compounds shipped with RDKit) -> activity.

    Files: ``smiles_path`` holds ``"<SMILES> <compound id>"`` per line (whitespace separated,
    no header); ``activity_path`` is a CSV with a header whose first column is the compound id
    and second the activity (``Name,Act`` in the shipped file; pIC50-like values ~4.3-9.2).
    The two are joined on the id. ``task="binary"``: label ``1.`` iff activity ``>= threshold``
    (492 of 1,017 compounds at the default 6.5).

    Skipped rows (``dm.skipped``): SMILES that do not parse, ids without an activity row,
    missing or non-numeric activities. Activity rows whose id is not in the SMILES file are
    listed in ``dm.unmatched_activity`` as ``(line, id)``; duplicated ids keep the first row.

    Args:
        task: ``"regression"`` (activity) or ``"binary"`` (activity ``>= threshold``).
        threshold: activity cut-off of the binary task.
        featurizer: ``"morgan"``, ``"descriptors"`` or ``"physchem"`` (see :func:`featurize_smiles`).
        radius, n_bits: Morgan parameters.
        batch_size, val_fraction, test_fraction, seed, num_workers: loader / split settings.
        smiles_path, activity_path: files to read (default: the RDKit-shipped ones).
        cache_dir: feature cache folder (default ``$MIS_LIGHTNING_CACHE`` or
            ``~/.cache/mis_lightning/features``).
        standardize_target: z-score regression targets with the train split's mean/std.

    Raises:
        FileNotFoundError: a ``smiles_path`` / ``activity_path`` given that is not a file (when
            built), or a default file missing (at ``setup()``); the message names it.
    """

    def __init__(
        self,
        task: str = "regression",
        threshold: float = 6.5,
        smiles_path: str | None = None,
        activity_path: str | None = None,
        **options: Any,
    ) -> None:
        # options: featurizer, radius, n_bits, batch_size, val/test_fraction, seed, cache_dir,
        # standardize_target, num_workers -- declared once, in MoleculeDataModule
        super().__init__(task=task, threshold=threshold, **options)
        self.save_hyperparameters()
        # a path given is checked here, before any data is read or model trained (the app's
        # configuration stage: one line naming the option; nux49 saw a traceback 23 s in)
        self.smiles_path = None if smiles_path is None else _check_file(smiles_path, "ChEMBL SMILES", "smiles_path")
        self.activity_path = None if activity_path is None else _check_file(
            activity_path, "ChEMBL activity", "activity_path")
        self.unmatched_activity: list[tuple[int, str]] = []

    def _load_records(self) -> tuple[_Records, list[str]]:
        default_smi, default_act = (None, None)
        if self.smiles_path is None or self.activity_path is None:
            default_smi, default_act = default_chembl_paths()
        smi_path = _check_file(self.smiles_path or default_smi, "ChEMBL SMILES")
        act_path = _check_file(self.activity_path or default_act, "ChEMBL activity")
        act_name = os.path.basename(act_path)

        activity: dict[str, tuple[int, str]] = {}  # id -> (line, raw cell)
        duplicates = []
        with open(act_path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or len(header) < 2:
                raise ValueError(f"{act_path}: expected a header 'id,activity', got {header!r}")
            for line, cells in enumerate(reader, start=2):
                if not cells or not "".join(cells).strip():
                    continue
                cid = cells[0].strip()
                cell = cells[1] if len(cells) > 1 else ""
                if cid in activity:
                    duplicates.append((line, cid))
                    continue
                activity[cid] = (line, cell)
        if duplicates:
            warn(f"{act_path}: {len(duplicates)} duplicated ids, first kept: "
                 f"{duplicates[:_MAX_LISTED]}", SkippedRowsWarning)

        records = _Records()
        seen = set()
        smi_name = os.path.basename(smi_path)
        with open(smi_path) as fh:
            row = 0
            for line, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                parts = text.split()
                smi = parts[0]
                if len(parts) < 2:
                    records.add(row, smi, None, f"no compound id ({smi_name} line {line})")
                    row += 1
                    continue
                cid = parts[1]
                seen.add(cid)
                if cid not in activity:
                    records.add(row, smi, None, f"no activity for id {cid!r} in {act_name}")
                else:
                    aline, cell = activity[cid]
                    value, why = _parse_float(cell)
                    reason = "" if value is not None else f"activity {why} ({act_name} line {aline})"
                    records.add(row, smi, value, reason)
                row += 1
        self.unmatched_activity = sorted(
            (line, cid) for cid, (line, _) in activity.items() if cid not in seen
        )
        if self.unmatched_activity:
            msg = (f"ChEMBLDataModule: {len(self.unmatched_activity)} activity rows have no "
                   f"SMILES: {self.unmatched_activity[:_MAX_LISTED]} (see .unmatched_activity)")
            warn(msg, SkippedRowsWarning)
        return records, [smi_path, act_path]


class NCITPSADataModule(MoleculeDataModule):
    """First 5,000 NCI molecules -> topological polar surface area (TPSA, in Angstrom^2).

    File ``RDDataDir/NCI/first_5k.tpsa.csv``: ``#`` comment lines, then ``SMILES,TPSA`` rows
    without header (TPSA from Daylight/Ertl's program, 0-778 A^2). 8 of the 4,999 SMILES do not
    parse in RDKit (hypervalent Al/Si/Hg...) and are reported in ``dm.skipped``.

    Args:
        max_molecules: if set, a random subset (from ``seed``) of that many file rows is used
            (reported rows keep their original index).
        task: ``"regression"`` (TPSA) or ``"binary"`` (TPSA ``>= threshold``; needs a threshold,
            e.g. 90 A^2, a common blood-brain-barrier cut-off).
        path: file to read (default: the RDKit-shipped one).
        Other arguments as in :class:`ChEMBLDataModule`.
    """

    def __init__(
        self,
        task: str = "regression",
        threshold: float | None = None,
        max_molecules: int | None = None,
        path: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(task=task, threshold=threshold, **options)  # options: as MoleculeDataModule
        self.save_hyperparameters()
        if max_molecules is not None and int(max_molecules) < 3:
            raise ValueError(f"max_molecules must be >= 3 or None, got {max_molecules!r}")
        self.max_molecules = None if max_molecules is None else int(max_molecules)
        self.path = None if path is None else _check_file(path, "NCI TPSA", "path")

    def _load_records(self) -> tuple[_Records, list[str]]:
        path = _check_file(self.path or default_nci_tpsa_path(), "NCI TPSA")
        name = os.path.basename(path)
        rows: list[tuple[int, int, list[str]]] = []  # (row, line, cells)
        with open(path, newline="") as fh:
            for line, cells in enumerate(csv.reader(fh), start=1):
                if not cells or cells[0].lstrip().startswith("#") or not "".join(cells).strip():
                    continue
                rows.append((len(rows), line, cells))
        if self.max_molecules is not None and self.max_molecules < len(rows):
            pick = np.random.default_rng(self.seed).choice(len(rows), self.max_molecules,
                                                           replace=False)
            rows = [rows[i] for i in np.sort(pick)]
        records = _Records()
        for row, line, cells in rows:
            smi = cells[0].strip()
            value, why = _parse_float(cells[1] if len(cells) > 1 else None)
            records.add(row, smi, value, "" if value is not None else f"TPSA {why} ({name} line {line})")
        return records, [path]


def _tdc_fetch_error(name: str, why: str) -> RuntimeError:
    return RuntimeError(
        f"the TDC dataset {name!r} could not be fetched: {why}. PyTDC downloads from "
        f"tdcommons.ai and needs network access (and pip install \"mis-lightning[tdc]\"). "
        f"Offline, pass path=<local CSV in TDC format with columns Drug_ID, Drug, Y> instead."
    )


def fetch_tdc_admet(name: str, download_dir: str | os.PathLike) -> list[tuple[str, str, Any]]:
    """Download a TDC ADMET dataset through PyTDC; return ``[(Drug_ID, Drug, Y), ...]``.

    Uses ``tdc.single_pred.ADME`` (or ``Tox`` for the toxicity sets such as ``herg``,
    ``ames``, ``dili``, ``ld50_zhu``) and ``get_data(format="df")``: the whole dataset; the
    split is then done by the datamodule from its seed.

    Raises:
        RuntimeError: PyTDC missing or the download failed; the message says why and that a
            local ``path=`` works offline.
    """
    try:
        from tdc.single_pred import ADME, Tox
    except Exception as exc:
        raise _tdc_fetch_error(name, f"PyTDC is not importable ({type(exc).__name__}: {exc})"
                               ) from exc
    loader = Tox if name.lower() in _TDC_TOX_NAMES else ADME
    try:
        os.makedirs(download_dir, exist_ok=True)
        df = loader(name=name, path=os.fspath(download_dir)).get_data(format="df")
        out = list(zip(df["Drug_ID"].tolist(), df["Drug"].tolist(), df["Y"].tolist()))
    except Exception as exc:
        raise _tdc_fetch_error(name, f"download/loading failed ({type(exc).__name__}: {exc})"
                               ) from exc
    return out


class TDCADMETDataModule(MoleculeDataModule):
    """A Therapeutics Data Commons ADMET dataset (e.g. ``caco2_wang``) as a datamodule.

    With ``path=None`` the dataset is downloaded through PyTDC (network needed; stored under
    ``download_dir``, default ``<cache dir>/../tdc``). With ``path`` a local CSV in TDC's format
    is read (columns ``Drug_ID``, ``Drug`` (SMILES), ``Y``; extra columns ignored): works
    offline. Rows with a missing/non-numeric ``Y`` or an unparsable SMILES are skipped and
    reported (``dm.skipped``, rows are 0-based data-row indices).

    Args:
        name: TDC dataset name (only used to download; also recorded in the hyperparameters).
        path: local TDC-format CSV, or ``None`` to download.
        task: ``"regression"``, ``"binary"`` or ``None`` to infer (``binary`` if all ``Y`` are
            0/1 or a ``threshold`` is given; the inferred task is saved in the hyperparameters).
            For ``binary`` with real-valued ``Y`` a ``threshold`` is required.
        download_dir: where PyTDC stores the download.
        Other arguments as in :class:`ChEMBLDataModule`.

    Raises:
        RuntimeError: (at ``setup()``) the download is impossible (no PyTDC, no network).
        FileNotFoundError: ``path`` does not exist.
    """

    def __init__(
        self,
        name: str = "caco2_wang",
        path: str | None = None,
        task: str | None = None,
        threshold: float | None = None,
        download_dir: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(task=task or "regression", threshold=threshold, **options)  # as MoleculeDataModule
        self.save_hyperparameters()
        self.name = str(name)
        self.path = None if path is None else _check_file(path, "TDC CSV", "path")
        self.requested_task = task
        self.download_dir = download_dir

    def _load_records(self) -> tuple[_Records, list[str]]:
        if self.path is not None:
            path = _check_file(self.path, "TDC CSV")
            label = os.path.basename(path)
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                missing = {"Drug", "Y"} - set(reader.fieldnames or [])
                if missing:
                    raise ValueError(f"{path}: missing column(s) {sorted(missing)}; a TDC CSV "
                                     f"has columns Drug_ID, Drug, Y (found {reader.fieldnames})")
                raw = [(f"{label} line {i + 2}", r.get("Drug_ID"), r.get("Drug"), r.get("Y"))
                       for i, r in enumerate(reader)]
            sources = [path]
        else:
            folder = self.download_dir or os.path.join(
                os.fspath(Path(self.cache_dir).expanduser()) if self.cache_dir
                else os.fspath(default_cache_dir()), os.pardir, "tdc")
            fetched = fetch_tdc_admet(self.name, folder)
            raw = [(f"TDC {self.name} row {i}", d, s, y) for i, (d, s, y) in enumerate(fetched)]
            sources = []
        records = _Records()
        for row, (where, _drug_id, smi, y) in enumerate(raw):
            y_text = None if y is None or (isinstance(y, float) and math.isnan(y)) else str(y)
            value, why = _parse_float(y_text)
            reason = "" if value is not None else f"Y {why} ({where})"
            records.add(row, "" if smi is None else str(smi).strip(), value, reason)
        if self.requested_task is None:
            ys = {t for t in records.targets if t is not None}
            # a threshold only means something for a binary task: given, it decides
            self.task = "binary" if self.threshold is not None or (ys and ys <= {0.0, 1.0}) else "regression"
            # the saved hyperparameters hold the task the model is built for: Lightning refuses a
            # module and a datamodule whose shared hyperparameters differ (task None vs "regression")
            self.save_hyperparameters({"task": self.task})  # hparams and hparams_initial (logged, merged)
        return records, sources
