"""Consecutive loader batches merged into larger ones for the estimation pass.

The estimation's sums are over records, so how records are grouped into batches does not
change them (up to float64 rounding; the record sample is by content hash,
:func:`~mis_lightning.estimation.records.record_keys`). Training loaders use small batches
(64 on the benchmark Transformer); the per-layer pass costs a fixed amount of Python and
kernel-launch work per batch and per layer, so larger batches are cheaper per record: on
that Transformer's 4,096 records, loader batches of 64 / 256 / 512 took 3.6 / 2.9 / 2.7 s
(2 threads; docs/benchmarks.md, "Batches merged for the estimation pass"). The merged size
is bounded by the memory the pass holds per record (:attr:`MomentAccumulator.records_per_update`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

_tree = torch.utils._pytree


def batch_rows(batch: Any) -> int | None:
    """Records of ``batch`` when it can be concatenated with others: every leaf a tensor of at
    least one dimension and all of them with the same first dimension; else ``None`` (a list
    of strings, a per-batch constant, ragged leaves)."""
    leaves = _tree.tree_leaves(batch)
    if not leaves or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in leaves):
        return None
    rows = {int(t.shape[0]) for t in leaves}
    return rows.pop() if len(rows) == 1 else None


def items_are_batches(loader: Any) -> bool:
    """Whether each item ``loader`` yields from its dataset is already a whole batch: a torch
    ``DataLoader`` with automatic batching off (``batch_size=None`` and no ``batch_sampler``:
    pre-batched data, an ``IterableDataset`` yielding batches). Its ``len(dataset)`` then counts
    batches, not records, so the number of training records is not known before the data is read.
    """
    return isinstance(loader, torch.utils.data.DataLoader) and loader.batch_sampler is None


def _layout(batch: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    leaves, spec = _tree.tree_flatten(batch)
    return spec, [(t.dtype, t.device, tuple(t.shape[1:]), t.layout) for t in leaves]


def _concatenate(batches: list[Any]) -> Any:
    if len(batches) == 1:
        return batches[0]
    flat = [_tree.tree_flatten(b) for b in batches]
    spec = flat[0][1]
    return _tree.tree_unflatten([torch.cat(parts) for parts in zip(*(leaves for leaves, _ in flat))], spec)


def merge_batches(batches: Iterable[Any], records: Callable[[], int]) -> Iterator[tuple[Any, int | None]]:
    """``(batch, rows)`` with consecutive ``batches`` concatenated (``torch.cat`` of each
    leaf) while their records add up to at most ``records()``; ``rows`` is the merged batch's
    record count (``None`` for a batch passed as it came because it cannot be concatenated).

    ``records()`` is read before each batch (it is ``0``, no merging, until the consumer has
    seen a first batch and sized the merge); a batch that is larger by itself, or whose
    structure, dtypes, devices or per-record shapes differ from the pending ones (padding to
    each batch's longest sequence), ends the merge and passes as it came. The records, their
    order and their values are unchanged; the batches' tensors are copied once by the
    concatenation."""
    pending: list[Any] = []
    rows, layout = 0, None
    for batch in batches:
        r = batch_rows(batch)
        cap = records()
        lay = _layout(batch) if r is not None and cap > 0 else None
        if pending and (lay is None or lay != layout or rows + r > cap):  # type: ignore[operator]
            yield _concatenate(pending), rows
            pending, rows = [], 0
        if lay is None or r >= cap:  # type: ignore[operator]
            yield batch, r
            continue
        pending.append(batch)
        rows += r  # type: ignore[operator]
        layout = lay
    if pending:
        yield _concatenate(pending), rows


# A plain torch DataLoader over a TensorDataset (one process, the default collate, no pinning) is
# read by one index per tensor and batch instead of a dataset item and a stack per record: the same
# tensors (p54b: ~12 -> ~2 ms a pass over 4,096 records of 256 features, the 1e5 line's loader).
# False: every loader iterated as it is (A/B).
TENSOR_DATASET_BATCHES = True


def _plain_tensor_loader(loader: Any) -> bool:
    """Whether ``loader`` is a ``torch.utils.data.DataLoader`` itself (no subclass) over a
    ``TensorDataset`` itself, reading in the main process (``num_workers == 0``) with torch's
    ``BatchSampler`` and ``default_collate`` and no memory pinning, every tensor strided and
    contiguous: a loader whose batch is ``default_collate([dataset[i] for i in indices])``, that is
    ``[torch.stack([t[i] for i in indices]) for t in dataset.tensors]``, contiguous as ``t[indices]``
    is (of a permuted tensor, the index keeps its strides where the stack does not)."""
    data = torch.utils.data
    return (type(loader) is data.DataLoader and type(loader.dataset) is data.TensorDataset
            and loader.num_workers == 0 and not loader.pin_memory
            and type(loader.batch_sampler) is data.BatchSampler
            and loader.collate_fn is data._utils.collate.default_collate
            and all(t.layout == torch.strided and t.is_contiguous() for t in loader.dataset.tensors))


def loader_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``loader``, as ``for batch in loader`` yields them.

    For a plain ``DataLoader`` over a ``TensorDataset`` (:func:`_plain_tensor_loader`,
    :data:`TENSOR_DATASET_BATCHES`) each batch is ``[t[indices] for t in dataset.tensors]``, the
    indices from the loader's own iterator (made as a ``for`` loop makes it: its sampler, its seed
    draws from ``loader.generator`` or torch's global stream, in the same order): the same list of
    tensors, values, dtypes and shapes as ``default_collate``'s stack of the records, without a
    Python item and a stack per record. Any other loader (a custom dataset, collate function or
    sampler, worker processes, pinning) is iterated as it is."""
    if not (TENSOR_DATASET_BATCHES and _plain_tensor_loader(loader)):
        yield from loader
        return
    it = iter(loader)
    next_index = getattr(it, "_next_index", None)  # (torch's single-process iterator's own step)
    if next_index is None:
        yield from it
        return
    tensors = loader.dataset.tensors  # type: ignore[attr-defined]
    while True:
        try:
            index = next_index()
        except StopIteration:
            return
        rows = torch.as_tensor(index, dtype=torch.long)
        yield [t[rows.to(t.device)] for t in tensors]


__all__ = ["batch_rows", "items_are_batches", "loader_batches", "merge_batches"]
