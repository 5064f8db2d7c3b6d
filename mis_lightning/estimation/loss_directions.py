"""The diagonal estimator's loss directions per record, ``r = mean_i rank(L_i)``, on a sample of
records that depends on their contents only.

The diagonal estimator's mean leverage per loss direction is ``h_bar = T / (n r)`` (method.md
section 4, "Finite-sample (leverage) correction", the diagonal estimator): ``n r = sum_i rank(L_i)``
is the training set's count of loss directions, so ``r`` is a mean over *every* training record.
Where ``rank(L_i)`` is the same for every record (a softmax over ``C`` classes: ``C - 1``; least
squares on ``C`` outputs: ``C``) any record gives it; where it differs between records (a second
head read only for records that carry its label, masked or ``ignore_index`` targets) a fixed set of
*first* records made the figures depend on the loader's order (4-6% on a two-head model whose
labelled records came last or first). Every record's ``rank(L_i)`` would cost a forward and a
``C x C`` eigendecomposition per record (seconds per record at ``C`` ~ 1,000), so ``r`` is the mean
over a *bottom-k* sample by content key (:func:`~mis_lightning.estimation.records.record_keys`:
the records with the ``k`` smallest keys of the whole pass): a simple random sample without
replacement of the records (an unbiased estimate of the mean, standard error
``sd(rank) / sqrt(k)``; exact where the pass holds at most ``k`` records). A record read twice (a
dataset's duplicates, a DDP sampler's padding) counts twice, as in the sums: its copies share a key
and a rank, and are taken together (counted once, 20 copies of one record among 30 read 2.91
directions against the records' mean 2.33). The sample is the same whatever the
loader's order, batch sizes and the split over processes (the bottom-k of a union is the bottom-k of
the parts' bottom-k: :func:`world_sample`, :func:`merge_counts`). The sampled records' rows are held (``k`` records)
and measured once, when the count is read (:meth:`LossDirectionSample.value`): a record evicted by
a smaller key later costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .records import slice_rows

_tree = torch.utils._pytree

# rv56: a DDP sync gathers each process's sample as keys only (:meth:`LossDirectionSample.keyed`), then
# only the rows of the world's sample (:func:`wanted_rows`, :meth:`LossDirectionSample.rows`,
# :func:`filled_sample`): <= ``records`` records' rows in all, not ``records`` per process (an image
# model: 64 x 600 KB = 38 MB from each process to each); the same sample, groups and order. False:
# every process's held rows in the first gather (rv55's :func:`world_sample` on the full parts)
GATHER_KEYS_FIRST = True

# ``measure(inputs, targets, rows) -> (ranks [rows] float64, note)``: the records' rank(L_i), and
# ``""`` where measured, else why not (then ``ranks`` holds the count used instead)
Measure = Callable[[Any, Any, int], tuple[Tensor, str]]
# :meth:`LossDirectionSample.held`: ``(fixed, [(keys, inputs, targets, ranks, note), ...])``
Held = tuple[tuple[float, str] | None, list[tuple[Tensor, Any, Any, Tensor | None, str]]]


def _layout(x: Any) -> tuple[Any, ...]:
    """The trailing shapes and dtypes of a pytree's tensor leaves and its structure: rows of one
    layout concatenate."""
    leaves, spec = _tree.tree_flatten(x)
    return (str(spec), *((tuple(t.shape[1:]), t.dtype) if isinstance(t, Tensor) else repr(t) for t in leaves))


def _cpu(tree: Any) -> Any:
    """A pytree's tensors on the CPU."""
    return _tree.tree_map(lambda t: t.cpu() if isinstance(t, Tensor) else t, tree)


def _cat(a: Any, b: Any) -> Any:
    """Two pytrees of one layout, row-concatenated (non-tensor leaves taken from ``a``)."""
    return _tree.tree_map(lambda s, t: torch.cat([s, t]) if isinstance(s, Tensor) else s, a, b)


@dataclass
class _Group:
    """Held records of one row layout: their keys ``[m]``, rows, and ranks once measured."""

    keys: Tensor
    inputs: Any
    targets: Any
    layout: tuple[Any, ...]
    ranks: Tensor | None = None
    note: str = ""


@dataclass
class LossDirectionSample:
    """The bottom-``records`` records by content key of everything :meth:`add` saw, and their
    ``rank(L_i)`` measured by ``measure`` when :meth:`value` or :meth:`counts` is read.

    Args:
        measure: ``(inputs, targets, rows) -> (ranks [rows] float64, note)`` (``note`` ``""`` where
            measured; else why not, ``ranks`` then the count used instead).
        records: ``k``, the sample's size.
    """

    measure: Measure
    records: int
    groups: list[_Group] = field(default_factory=list)
    fixed: tuple[float, str] | None = None  # a count taken without measuring (an error: no L_i)

    def add(self, keys: Tensor, inputs: Any, targets: Any) -> None:
        """Offer a batch's records (``keys [b]`` int64 of :func:`record_keys`, their rows in dim 0 of
        every tensor leaf of ``inputs`` / ``targets``): those among the ``records`` smallest keys so
        far are held (copied rows), the others dropped; nothing is measured here."""
        if self.fixed is not None or keys.numel() == 0:
            return
        keys = keys.to("cpu", torch.int64)
        held = self._held_keys()
        # every record read counts, a repeated one as often as it is read (a dataset's duplicate
        # records are records of the mean, as in the sums; equal keys are equal contents, so equal
        # ranks: which copies are held cannot move the mean). A batch must be offered once: the
        # caller skips a rerun (rv54: keys taken once made the mean one over distinct contents)
        fresh = torch.ones(keys.numel(), dtype=torch.bool)
        if held.numel() >= self.records:
            fresh &= keys < held.max()
        cand = fresh.nonzero().squeeze(1)
        if cand.numel() == 0:
            return
        if cand.numel() > self.records:  # at most k of one batch can enter
            cand = cand[torch.sort(keys[cand], stable=True).indices[: self.records]]
        try:
            self._hold(keys[cand], slice_rows(inputs, cand), slice_rows(targets, cand))
        except Exception as exc:  # records that are not rows of tensors (a graph batch's edge list)
            self.fixed, self.groups = (1.0, f"the records cannot be taken as rows ({type(exc).__name__}: {exc}); "
                                            "one loss direction per record assumed (the largest correction)"), []
            return
        self._prune()

    def _hold(self, keys: Tensor, x: Any, y: Any, ranks: Tensor | None = None, note: str = "") -> None:
        """Hold records (their keys and rows; ``ranks`` where already measured, rows then ``None``),
        rows of one layout not yet measured in one group (measured together)."""
        lay = _layout((x, y))
        same = None if ranks is not None else next(
            (g for g in self.groups if g.layout == lay and g.ranks is None), None)
        if same is not None:
            same.inputs, same.targets = _cat(same.inputs, x), _cat(same.targets, y)
            same.keys = torch.cat([same.keys, keys])
        else:
            self.groups.append(_Group(keys.clone(), x, y, lay, ranks, note))

    def held(self) -> Held:
        """The sample as plain data, rows on the CPU, nothing measured here (a DDP process's part for
        :func:`world_sample`, gathered at the sync: ``(fixed, [(keys, inputs, targets, ranks,
        note)])``, a measured group's rows ``None``)."""
        return self.fixed, [(g.keys, _cpu(g.inputs), _cpu(g.targets), g.ranks, g.note) for g in self.groups]

    def keyed(self, who: int) -> Held:
        """:meth:`held` with each unmeasured group's rows replaced by their places: ``inputs`` an int64
        ``[m, 2]`` of ``(who, position)`` (the position among this sample's unmeasured rows, in group
        order; ``who`` the process's index), ``targets`` the rows' layout as a string (rows of one
        layout group together in :func:`world_sample` as the rows themselves do). A few bytes a record:
        a DDP process's part of the first gather (:data:`GATHER_KEYS_FIRST`), its rows sent later only
        where the world's sample takes them (:meth:`rows`)."""
        out, a = [], 0
        for g in self.groups:
            if g.ranks is not None:
                out.append((g.keys, None, None, g.ranks, g.note))
                continue
            m = int(g.keys.numel())
            ids = torch.stack([torch.full((m,), who, dtype=torch.int64), torch.arange(a, a + m)], 1)
            out.append((g.keys, ids, repr(g.layout), None, g.note))
            a += m
        return self.fixed, out

    def rows(self, positions: Tensor) -> list[tuple[Tensor, Any, Any]]:
        """The unmeasured rows at ``positions`` (:meth:`keyed`'s numbering), on the CPU, by group:
        ``[(positions within it, inputs, targets)]``, the groups holding none left out."""
        out, a = [], 0
        for g in self.groups:
            if g.ranks is not None:
                continue
            m = int(g.keys.numel())
            mine = positions[(positions >= a) & (positions < a + m)]
            if mine.numel():  # (sliced before the move: only these rows leave the device)
                out.append((mine, _cpu(slice_rows(g.inputs, mine - a)), _cpu(slice_rows(g.targets, mine - a))))
            a += m
        return out

    def _held_keys(self) -> Tensor:
        return torch.cat([g.keys for g in self.groups]) if self.groups else torch.empty(0, dtype=torch.int64)

    def _prune(self) -> None:
        """Keep the ``records`` smallest keys over the groups (of equal keys, the first held)."""
        held = self._held_keys()
        if held.numel() <= self.records:
            return
        keep = torch.zeros(held.numel(), dtype=torch.bool)
        keep[torch.sort(held, stable=True).indices[: self.records]] = True
        out, a = [], 0
        for g in self.groups:
            m = keep[a: a + g.keys.numel()]
            a += g.keys.numel()
            if bool(m.all()):
                out.append(g)
            elif bool(m.any()):
                rows = m.nonzero().squeeze(1)
                out.append(_Group(g.keys[rows], slice_rows(g.inputs, rows), slice_rows(g.targets, rows), g.layout,
                                  None if g.ranks is None else g.ranks[rows], g.note))
        self.groups = out

    def _measure(self) -> None:
        """Measure every held group not yet measured; an error (no ``L_i``) fixes the count."""
        for g in self.groups:
            if g.ranks is not None:
                continue
            ranks, note = self.measure(g.inputs, g.targets, int(g.keys.numel()))
            if note and ranks.numel() == 0:  # not measurable for this model: one count for all
                self.fixed, self.groups = (1.0, note), []
                return
            g.ranks, g.note = ranks.to(torch.float64).reshape(-1), note
            g.inputs = g.targets = None  # measured: the rows are no longer needed

    def counts(self) -> tuple[list[int], list[float], list[str], tuple[float, str] | None]:
        """``(keys, ranks, notes, fixed)`` of the sample, measured (for :func:`merge_counts`)."""
        self._measure()
        if self.fixed is not None:
            return [], [], [], self.fixed
        keys = self._held_keys()
        ranks = torch.cat([g.ranks for g in self.groups if g.ranks is not None]) if self.groups else keys.double()
        return keys.tolist(), ranks.tolist(), sorted({g.note for g in self.groups if g.note}), None

    def value(self) -> tuple[float, str, int] | None:
        """``(r, how, records)``: the sample's mean ``rank(L_i)``, ``"measured"`` or why not, and the
        records it is the mean of; ``None`` where no record was added."""
        return merge_counts([self.counts()], self.records)


def world_sample(parts: Sequence[Held | None], measure: Measure, records: int,
                 device: torch.device | str | None = None) -> LossDirectionSample:
    """The sample of the union of several processes' records (their :meth:`LossDirectionSample.held`
    parts, in rank order; ``None`` for a process without records), not yet measured: the
    ``records`` smallest keys over all parts, their rows moved to ``device`` (where ``measure``
    runs the model). Every process of a DDP world forms it from the same gathered parts, so each
    measures the same records in the same groups: the same forwards on every process, a process
    without records included (each measured its own sample inside the sync, 4 forwards on
    one process and 3 on the other, a model whose eval forward holds a collective would hang),
    and the same count as the one process reading every part's records."""
    out = LossDirectionSample(measure, records)
    fixed = [p[0] for p in parts if p is not None and p[0] is not None]
    if fixed:
        out.fixed = min(fixed)
        return out
    move = lambda tree: _tree.tree_map(  # noqa: E731
        lambda t: t.to(device) if isinstance(t, Tensor) and device is not None else t, tree)
    for part in parts:
        for keys, x, y, ranks, note in (part[1] if part is not None else []):
            out._hold(keys, move(x), move(y), ranks, note)
        out._prune()
    return out


def wanted_rows(keyed: LossDirectionSample) -> dict[int, Tensor]:
    """The rows a :func:`world_sample` of :meth:`LossDirectionSample.keyed` parts holds, by process:
    ``{who: positions (sorted int64)}`` (empty where its count is fixed or every group measured)."""
    ids = [g.inputs for g in keyed.groups if g.ranks is None and isinstance(g.inputs, Tensor)]
    if keyed.fixed is not None or not ids:
        return {}
    every = torch.cat(ids)
    return {int(w): torch.sort(every[every[:, 0] == w, 1]).values for w in torch.unique(every[:, 0])}


def filled_sample(keyed: LossDirectionSample, rows: dict[int, list[tuple[Tensor, Any, Any]]], measure: Measure,
                  device: torch.device | str | None = None) -> LossDirectionSample:
    """:func:`world_sample` of the full parts, from its keyed twin (``keyed``: the same keys, groups
    and order) and the rows it holds (``rows``: ``{who: that process's LossDirectionSample.rows}``),
    moved to ``device``: the same sample, so the same forwards on every process and the same count.

    Raises:
        KeyError: a row the keyed sample holds that ``rows`` lacks."""
    out = LossDirectionSample(measure, keyed.records, fixed=keyed.fixed)
    if keyed.fixed is not None:
        return out
    one = {(w, int(p)): (x, y, i) for w, got in rows.items() for pos, x, y in got for i, p in enumerate(pos.tolist())}
    move = lambda t: t.to(device) if isinstance(t, Tensor) and device is not None else t  # noqa: E731
    for g in keyed.groups:
        if g.ranks is not None:
            out.groups.append(_Group(g.keys, None, None, g.layout, g.ranks, g.note))
            continue
        picked = [one[(int(w), int(p))] for w, p in g.inputs.tolist()]
        out.groups.append(_Group(g.keys, _stacked(picked, 0, move), _stacked(picked, 1, move), g.layout, None, g.note))
    return out


def _stacked(picked: list[tuple[Any, Any, int]], side: int, move: Callable[[Any], Any]) -> Any:
    """Row ``i`` of each picked ``(inputs, targets, i)``'s ``side`` (0: inputs), concatenated in order
    (rows of one layout: non-tensor leaves taken from the first)."""
    idx = [p[2] for p in picked]
    return _tree.tree_map(lambda *ts: move(torch.cat([t[i: i + 1] for t, i in zip(ts, idx)]))
                          if isinstance(ts[0], Tensor) else ts[0], *[p[side] for p in picked])


def merge_counts(parts: Sequence[tuple[list[int], list[float], list[str], tuple[float, str] | None] | None],
                 records: int) -> tuple[float, str, int] | None:
    """The count of the union of several samples' records (the processes of a DDP world): the
    ``records`` smallest keys over all parts, their mean ``rank(L_i)`` -- the one process reading
    every part's records finds the same. Where a part could not measure ``L_i`` at all, its count
    (one direction per record, the largest correction) with its reason. ``None`` where no part
    saw a record."""
    fixed = [p[3] for p in parts if p is not None and p[3] is not None]
    if fixed:
        return (*min(fixed), 0)
    keys = [k for p in parts if p is not None for k in p[0]]
    if not keys:
        return None
    ranks = torch.tensor([r for p in parts if p is not None for r in p[1]], dtype=torch.float64)
    # a record two processes read (a sampler's padding repeats records) counts twice, as in the
    # sums; equal keys have equal ranks, so the mean of the k smallest does not depend on the parts
    order = torch.sort(torch.tensor(keys, dtype=torch.int64), stable=True).indices[:records]
    notes = sorted({n for p in parts if p is not None for n in p[2]})
    return float(ranks[order].mean()), ("measured" if not notes else "; ".join(notes)), int(order.numel())
