"""The number of training records an estimation pass read, against the number a front end knows.

Every figure is computed with ``n`` = the records the pass read (``Estimate.n``, plus the records
without a loss). A front end that knows the training set's size checks it here, one
implementation for all of them: :func:`~mis_lightning.assess.assess` the
size of ``train_dataloader``'s dataset, ``MISIndicator`` its ``num_training_records``, the Lightning
callback the records the training draws from. A mismatch (a ``drop_last`` batch, a sampler over
part of the data, one DDP process's shard, records fed twice, a wrong stated number) would make
``n`` silently wrong; the report says it, naming both counts and the likely culprit, and a loader
that cannot give the training set (one DDP process's ``DistributedSampler`` shard in a
one-process call) is refused before the pass.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from .estimation.batching import items_are_batches

__all__ = ["MIN_RECORDS", "check_enough_records", "check_not_a_shard", "loader_dataset_size", "records_read",
           "records_read_note"]

MIN_RECORDS = 4  # the pool protocol's figures score n / 2 records, which needs n / 2 >= 2


def check_enough_records(n: int, who: str = "the assessment", d: int | None = None) -> None:
    """Refuse fewer than :data:`MIN_RECORDS` training records (``n``), in words for the headline.

    ``who``: the front end, named in the message; ``d``: the number of assessed weights, when
    known (the headline's approximation needs ``n`` well above it: method.md section 6).

    Raises:
        ValueError: ``n < MIN_RECORDS``.
    """
    if n >= MIN_RECORDS:
        return
    weights = f" (d = {d:,} here)" if d else ""
    raise ValueError(
        f"{who} needs at least {MIN_RECORDS} training records, got {n}: the leakage (the headline) is read from "
        "the spread of the records' gradients around the trained weights, and the report's pool figures score "
        f"n / 2 records, which takes n >= {MIN_RECORDS}; the headline's approximation holds only for n well "
        f"above the number of assessed weights{weights}. Train and assess on more records")


def records_read(est: Any) -> int:
    """The records the pass read: ``est.n`` and the records it set aside without a loss (NaN
    targets: ``diagnostics["records_without_loss"]``)."""
    void = (est.diagnostics.get("records_without_loss") or {}).get("count", 0)
    return int(est.n) + int(void)


def _samplers(loader: DataLoader) -> tuple[Any, Any]:
    batches = loader.batch_sampler
    return batches, getattr(batches, "sampler", loader.sampler)


def loader_dataset_size(loader: Any) -> int | None:
    """``len(loader.dataset)`` for a DataLoader over a sized map-style dataset whose items are
    records, else ``None`` (a stream; items that are whole batches count batches)."""
    if not isinstance(loader, DataLoader) or items_are_batches(loader):
        return None
    ds = loader.dataset
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        return None
    return len(ds)


def check_not_a_shard(loader: Any, what: str = "train_dataloader") -> None:
    """Refuse a loader whose ``DistributedSampler`` reads one process's shard: a one-process call
    would take that shard (and its padding repeats) for the training set, ``n`` about
    ``1 / num_replicas`` of it.

    Raises:
        ValueError: ``DistributedSampler(num_replicas > 1)``; names it and what to pass instead.
    """
    if not isinstance(loader, DataLoader):
        return
    _, sampler = _samplers(loader)
    if isinstance(sampler, DistributedSampler) and int(sampler.num_replicas) > 1:
        size = loader_dataset_size(loader)
        raise ValueError(
            f"{what}'s DistributedSampler(num_replicas={sampler.num_replicas}, rank={sampler.rank}) reads one "
            f"process's shard ({len(sampler):,} of the dataset's {size if size is not None else '?'} records, "
            "padding included): the figures would take it for the training set. Pass a loader over every "
            "training record once (DataLoader(dataset, batch_size=...)) on one process, or use MISIndicator / "
            "MISCallback, which sum the processes' shards")


def _loader_culprit(loader: Any, read: int, size: int) -> str | None:
    """What in ``loader`` makes a pass read ``read`` of the dataset's ``size`` records."""
    if not isinstance(loader, DataLoader):
        return None
    batches, sampler = _samplers(loader)
    try:
        drawn = len(sampler)
    except TypeError:
        drawn = None
    if drawn is not None and drawn < size:
        return f"its {type(sampler).__name__} draws {drawn:,} of them"
    bs = getattr(batches, "batch_size", None)
    if getattr(batches, "drop_last", False) and bs and drawn and drawn % bs:
        return f"drop_last=True drops the last partial batch ({drawn % bs:,} records)"
    if batches is not None and getattr(batches, "sampler", None) is None and loader.batch_size is None:
        return f"its batch_sampler ({type(batches).__name__}) yields another number of records"
    if read != size:
        return "the collate_fn, batch_fn or loss returned another number of records than the dataset holds"
    return None


def records_read_note(read: int, expected: int | None, expected_from: str, *, loader: Any = None,
                      causes: str | None = None) -> str | None:
    """The report's warning where the pass read ``read`` records and the front end expected
    ``expected`` (``expected_from``: where that number comes from, e.g. ``"len(train_dataloader.dataset)"``),
    else ``None`` (equal, or nothing expected). ``loader``: the training loader, whose sampler,
    ``drop_last`` or batch sampler is named as the culprit; ``causes``: the likely causes where no
    loader tells them (a Metric's updates).

    Every figure takes ``n = read``: right only if the model was trained on exactly the records read.
    """
    if expected is None or expected < 1 or read == expected:
        return None
    culprit = _loader_culprit(loader, read, expected) if loader is not None else None
    why = culprit or causes or ("records fed more than once" if read > expected else "records left out")
    return (f"the estimation pass read {read:,} training records where {expected_from} is {expected:,} "
            f"({read / expected:.3g}x): {why}. Every figure takes n = {read:,} (the weights' sd and the leverage "
            "correction scale with it): right only if the model was trained on exactly the records read")
