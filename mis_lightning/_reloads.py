"""The training sets a fit drew from when the Trainer rebuilds its train loader
(``reload_dataloaders_every_n_epochs``), for :class:`~mis_lightning.callback.MISCallback`.

The callback assesses the records of ``trainer.train_dataloader`` as it stands when it runs: with
reloads, the last loader's. Lightning rebuilds the loader before ``on_train_epoch_start``
(measured, Lightning 2.6, with a probe script not kept), so :class:`TrainingSets`, fed
there, sees each epoch's dataset: one object throughout (a hook returning
``DataLoader(self.ds, ...)``: the records trained on are those assessed, unless the dataset
changes them in place), or several (a curriculum: a user trained on 384 records in three datasets
of 128 and the report counted the last 128, saying nothing). Either way the report says which.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["TrainingSets"]


class _Held:
    """A strong reference for objects that take no weak one (a list as a dataset); dropped on
    pickling and copying (what a spawning strategy or a deep copy of the callback would hold)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any = None) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return _Held, ()


def _ref(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return _Held(obj)


def _size(ds: Any) -> int | None:
    try:
        n = len(ds)
    except Exception:  # noqa: BLE001 - a stream without a length
        return None
    return int(n) if isinstance(n, int) else None


def _draws(loader: Any, ds: Any) -> tuple[Any, int | None]:
    """``(signature, size)`` of the records ``loader`` draws from: a sampler over part of the
    dataset (``SubsetRandomSampler``, any sampler with ``indices``) by those indices, else the
    sampler's kind and length with the dataset's size."""
    batches = getattr(loader, "batch_sampler", None)
    sampler = getattr(batches, "sampler", None) or getattr(loader, "sampler", None)
    idx = getattr(sampler, "indices", None)
    if idx is not None:
        try:
            chosen = sorted(int(i) for i in idx)
            return ("indices", len(chosen), hash(tuple(chosen))), len(chosen)
        except Exception:  # noqa: BLE001 - indices of another kind: by the sampler's kind below
            pass
    return (type(sampler).__name__, _size(sampler)), _size(ds)


class TrainingSets:
    """The train loaders and datasets seen at each epoch start while the Trainer reloads its
    train loader; :meth:`note` words them for the report.

    Identity is by reference (weak where the object allows it): a dataset object that has died
    is not the current one, so an address reused by a new object is never taken for the old.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the previous fit's loaders (called as a fit starts)."""
        self._loader: Any = None
        self._dataset: Any = None
        self._draws: Any = None
        self.first_epoch: int | None = None
        self.rebuilt = 0  # loaders built after the first one seen
        # (dataset type, records drawn from) at each change of dataset or of the records its
        # sampler draws from (a curriculum by SubsetRandomSampler over one dataset)
        self.datasets: list[tuple[str, int | None]] = []

    def __getstate__(self) -> dict[str, Any]:
        # references to the user's loader and dataset are not pickled (a weak one cannot be):
        # a pickled callback keeps what it counted
        return {**self.__dict__, "_loader": None, "_dataset": None}

    def see(self, trainer: Any, loader: Any) -> None:
        """Record the train loader of the epoch starting (``on_train_epoch_start``); nothing
        unless ``trainer.reload_dataloaders_every_n_epochs`` > 0."""
        if not int(getattr(trainer, "reload_dataloaders_every_n_epochs", 0) or 0) or loader is None:
            return
        ds = getattr(loader, "dataset", loader)
        if self.first_epoch is None:
            self.first_epoch = int(getattr(trainer, "current_epoch", 0))
        if self._loader is not None and self._loader() is not loader:
            self.rebuilt += 1
        draws, size = _draws(loader, ds)
        if self._dataset is None or self._dataset() is not ds or draws != self._draws:
            self.datasets.append((type(ds).__name__, size))
        self._loader, self._dataset, self._draws = _ref(loader), _ref(ds), draws

    def note(self, trainer: Any, n: int) -> str | None:
        """The report's note (``n``: the records assessed), or None when no reload was seen."""
        k = int(getattr(trainer, "reload_dataloaders_every_n_epochs", 0) or 0)
        if not k or not self.datasets or (self.rebuilt == 0 and len(self.datasets) == 1 and not self.first_epoch):
            return None
        since = f" (epochs before {self.first_epoch}, before the resume, are not seen)" if self.first_epoch else ""
        if self.rebuilt == 0 and len(self.datasets) == 1:
            return (f"reload_dataloaders_every_n_epochs={k}: the fit resumed at epoch {self.first_epoch}, and the "
                    f"training sets of the epochs before are not seen: the records assessed (n={n}) are those of "
                    "the current training loader; if earlier epochs trained on other records (a curriculum), "
                    "they are not in the figures")
        if len(self.datasets) == 1:
            name, size = self.datasets[0]
            return (f"reload_dataloaders_every_n_epochs={k}: the training loader was rebuilt {self.rebuilt} time(s), "
                    f"each time over the same dataset object and records ({name}"
                    + (f", {size} records" if size is not None else "")
                    + f"){since}: the records assessed (n={n}) are the ones it drew from, as the dataset holds them "
                    "now (a dataset that changes its records in place between epochs is not seen)")
        sizes = [s for _, s in self.datasets]
        shown = ", ".join("?" if s is None else str(s) for s in sizes[:8]) + (", ..." if len(sizes) > 8 else "")
        return (f"reload_dataloaders_every_n_epochs={k}: the training loader was rebuilt over {len(self.datasets)} "
                f"different training sets (datasets, or samplers drawing other records; of {shown} records){since}: "
                f"only the last one's records are assessed "
                f"(n={n}); the records of the earlier datasets trained the model too and are not in the figures "
                "(a curriculum: assess all the records trained on with mis_lightning.assess)")
