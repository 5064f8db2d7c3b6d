"""What :class:`~mis_lightning.callback.MISCallback` needs from a Trainer, kept out of the
callback: the Trainer's loaders re-read unpadded and unshuffled, the loss resolved from the
module, the first-batch check, the pickling check
and :func:`assess_on_trainer` (the pipeline's two halves on the Trainer's data). Depends on
Lightning utilities and the core, never on the other front ends.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from ._augmentation import random_records_note
from ._fields import close_names
from ._lightning_compat import trainer_package
from ._modelcopy import ModelCopyError, private_copy
from ._rng import isolated_rng, private_stream
from ._user_warnings import rank_zero_warn
from .assess import score_schemes
from .config import EstimationConfig, ScoringConfig, check_user_functions
from .estimation.batching import items_are_batches, merge_batches
from .estimation.estimate import (
    N_ASSUMED,
    UNKNOWN_RECORDS_SOURCE,
    check_curvature,
    note_unknown_records,
    top_curvature,
)
from .estimation.per_sample import (
    check_record_dimension,
    check_record_losses,
    check_record_outputs,
    loss_shape_hint,
)
from .estimation.world_choice import agree as agree_on_choice
from .estimation.world_choice import force as force_choice
from .estimation.world_choice import gather_objects
from .evaluation import evaluate_utility, metric_side_fix, named_error, to_device
from .progress import ProgressDisplay
from .quantization import QuantizationScheme
from .quantization.release_forward import (
    ReleaseForwardError,
    joined,
    quantized_forward_errors,
    uses_outside_layers,
)
from .record_count import check_enough_records, records_read, records_read_note
from .report import STREAM_RECORDS_DIFFER, Report, name_list
from .streaming import HOOK_NAME, EstimationMetric


def unpicklable(obj: Any) -> str | None:
    """Why ``obj`` cannot be pickled (None if it can). A bound method is judged by its function,
    so that checking ``model.per_sample_loss`` does not pickle the model."""
    try:
        pickle.dumps(getattr(obj, "__func__", obj))
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


def callable_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def single_loader(loaders: Any, what: str) -> Any:
    """The one loader of a Trainer's ``train_dataloader`` / ``val_dataloaders`` (or ``None``).

    Raises:
        ValueError: several loaders (a list or dict given to ``fit``, a ``CombinedLoader``), or
            none: names them, why, and what to do instead.
    """
    if loaders is None:
        return None
    names = ""
    if isinstance(loaders, Mapping):
        names = f" ({', '.join(repr(k) for k in loaders)})"  # a dict's keys
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        if len(loaders) != 1:
            raise ValueError(
                f"MISCallback needs one {what} dataloader, got {len(loaders)}{names} (a list or dict of loaders, or a "
                "CombinedLoader over them): the assessment reads each record the model trained on through one "
                "loader of (inputs, targets) batches, and the training step's combination of several loaders' "
                "batches is its own; train on one loader (e.g. over a torch.utils.data.ConcatDataset of the "
                "datasets), or assess after fit with mis_lightning.assess(model, schemes, <one loader over every "
                "training record>, loss_fn)")
        loaders = loaders[0]
    return loaders


def validation_loaders(loaders: Any) -> tuple[Any, int]:
    """``(the first validation loader or None, how many there are)``: the quantized copies'
    utility is measured on the first (``dataloader_idx`` 0), as Lightning numbers them."""
    if loaders is None:
        return None, 0
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return (loaders[0] if loaders else None), len(loaders)
    return loaders, 1


def trainer_loaders(trainer: Any) -> list[Any]:
    """The Trainer's training and validation loaders (those it has; none where reading the
    property fails): what an assessment reads, whose own generators it must restore."""
    out = []
    for attr in ("train_dataloader", "val_dataloaders"):
        try:
            loaders = getattr(trainer, attr, None)
        except Exception:  # noqa: BLE001 - a loader Lightning could not build: nothing to save
            continue
        if loaders is not None:
            out.append(loaders)
    return out


def map_items(dl: Any) -> Any:
    """``dl.dataset`` when ``dl`` is a DataLoader over a sized map-style dataset (its items
    records, or whole batches: :func:`~mis_lightning.estimation.batching.items_are_batches`),
    else None."""
    ds = getattr(dl, "dataset", None)
    if not isinstance(dl, DataLoader) or ds is None or isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        return None
    return ds


def sized_dataset(dl: Any) -> Any:
    """``dl.dataset`` when ``dl`` is a DataLoader over a sized map-style dataset of records, else
    None: a stream, or items that are whole batches (``DataLoader(batch_size=None)``: its length
    counts batches, the records are counted as they are read)."""
    return None if items_are_batches(dl) else map_items(dl)


def first_batch(dl: Any, size: int) -> tuple[bool, Any]:
    """``(read, batch)``: a batch of the first ``size`` records of ``dl``'s sized map-style dataset
    (unshuffled, in-process, ``dl``'s generators restored), or its first item through its
    ``collate_fn`` when items are whole batches; ``batch`` None for an empty dataset. ``(False,
    None)`` for a stream, which is not read (that could consume it)."""
    ds = getattr(dl, "dataset", None)
    if items_are_batches(dl) and not isinstance(ds, IterableDataset) and _finite_len(ds) is not None:
        if not len(ds):
            return True, None
        with isolated_rng(dl):
            return True, dl.collate_fn(ds[0])
    ds = sized_dataset(dl)
    if ds is None:
        return False, None
    if len(ds) == 0:
        return True, None
    bs = min(len(ds), dl.batch_size or size)
    with isolated_rng(dl):  # a DataLoader iterator draws its base seed from the global RNG
        return True, next(iter(reloader(dl, list(range(bs)), bs)))


class _FirstBatches:
    """The first ``limit`` batches of a loader (``limit_train_batches`` on an iterable dataset)."""

    def __init__(self, loader: Any, limit: int) -> None:
        self.loader, self.limit = loader, limit
        self.batch_size = getattr(loader, "batch_size", None)

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.loader), self.limit)


def reloader(dl: Any, indices: list[int] | None, batch_size: int | None, limit: Any = None) -> Any:
    """An unpadded, unshuffled, single-process loader over ``dl``'s dataset (``indices``: of its
    items, whole batches where ``dl`` has no automatic batching); for an iterable
    dataset, a loader over a private copy of it (:func:`~mis_lightning._rng.private_stream`), cut to its first
    ``limit`` batches when ``limit`` is an int (the Trainer's ``num_training_batches``)."""
    ds = map_items(dl)
    if ds is None:
        # an iterable dataset: read from a copy, its own pass state stays as training left it
        out = private_stream(dl, warn=lambda m: rank_zero_warn(f"MISCallback: {m}"))
        return _FirstBatches(out, limit) if cuts_stream(dl, limit) else out
    idx = list(range(len(ds))) if indices is None else indices
    if items_are_batches(dl):  # indices of whole batches, read as they are
        return DataLoader(ds, batch_size=None, sampler=idx, collate_fn=dl.collate_fn, num_workers=0)
    bs = batch_size or dl.batch_size or 64
    return DataLoader(ds, batch_size=bs, sampler=idx, collate_fn=dl.collate_fn, num_workers=0)


def cuts_stream(dl: Any, limit: Any) -> bool:
    """Whether :func:`reloader` cuts ``dl``, a loader that is not over a sized map-style dataset,
    to its first ``limit`` batches (an integer ``limit`` below its length, where it has one)."""
    n = _finite_len(dl)
    return map_items(dl) is None and isinstance(limit, int) and (n is None or limit < n)


def _finite_len(obj: Any) -> int | None:
    """``len(obj)`` when it is a finite integer, else None (no length, or an endless sampler)."""
    try:
        n = len(obj)
    except TypeError:
        return None
    return int(n) if isinstance(n, int) else None


_UNKNOWN = object()  # a custom batch sampler without a ``sampler`` attribute: its order is unknown


def _shuffled_draws(sampler: Any) -> list[int] | None:
    """The records a shuffling sampler draws from over the epochs (``RandomSampler`` without
    replacement: its whole data source; ``SubsetRandomSampler``: its indices), else None."""
    if isinstance(sampler, RandomSampler) and not sampler.replacement:
        return list(range(len(sampler.data_source)))
    if isinstance(sampler, SubsetRandomSampler):
        return [int(i) for i in sampler.indices]
    return None


def training_records(trainer: Any, dl: Any, full_pass: bool = False, read: int | None = None,
                     cut: dict[str, Any] | None = None) -> tuple[list[int] | None, str | None]:
    """The dataset indices the training draws from, and a note for the report when that set
    is uncertain: ``(None, None)`` for datasets that are not sized map-style (streamed as is).

    The loader's batch sampler is read once (RNG isolated), so a ``SubsetRandomSampler`` or a
    custom (batch) sampler over part of the dataset gives that part, not the whole dataset;
    under DDP, Lightning's ``DistributedSamplerWrapper`` is unwrapped to the user's sampler and
    a plain ``DistributedSampler`` means every record. ``limit_train_batches`` keeps the first
    batches of an unshuffled loader; with a shuffled one (different records each epoch) or a
    sampler with replacement (a weighted objective) every record it can draw counts, with a note;
    there ``cut``, where given, receives ``{"limit": batches per epoch read, "batches": the loader's, "what": what
    limited them}``
    (:func:`unread_note`: records never read can be assessed).
    """
    ds = map_items(dl)
    if ds is None:
        return None, None
    total = len(ds)
    # items that are whole batches (DataLoader(batch_size=None)): the indices are of batches
    what_n = (lambda k: f"the records of the {k} pre-batched items") if items_are_batches(dl) else str
    sampler, batch_sampler = getattr(dl, "sampler", None), getattr(dl, "batch_sampler", None)
    if batch_sampler is not None and getattr(dl, "batch_size", None) is None:
        # DataLoader(batch_sampler=...): dl.sampler is a placeholder; the batch sampler's own decides
        sampler = getattr(batch_sampler, "sampler", _UNKNOWN)
    notes = []
    batches_read: list[list[int]] | None = None
    limit, what = trained_batches(trainer, full_pass, read)
    fixed = False  # a sampler of the user's own whose passes read the same batches first (a fixed order)
    with isolated_rng(dl):  # the loader's own generator too: reading the sampler draws from it
        distributed_shuffle, replicas = False, 1
        if isinstance(sampler, DistributedSampler):  # DDP: the user's sampler, if Lightning wrapped one
            inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
            order = list(range(total)) if inner is None else [  # Lightning requires its length
                int(i) for i in itertools.islice(iter(inner), _finite_len(inner) or total)]
            distributed_shuffle = inner is None and bool(getattr(sampler, "shuffle", False))
            replicas = int(getattr(sampler, "num_replicas", 1))  # each rank trains on every replicas-th record
            sampler = inner
        elif _finite_len(batch_sampler) is not None:  # one pass, at most its length (never an endless one)
            batches_read = [[int(i) for i in b] for b in itertools.islice(iter(batch_sampler), _finite_len(batch_sampler))]
            order = [i for b in batches_read for i in b]
            drawable = _shuffled_draws(sampler)
            if drawable is None and getattr(batch_sampler, "drop_last", False) and sampler is not _UNKNOWN \
                    and not isinstance(sampler, (SequentialSampler, type(None))) and _finite_len(sampler):
                # a sampler of the user's own with drop_last: two passes tell a shuffling one
                # (other records dropped each epoch) from a fixed order (the same tail dropped)
                size = _finite_len(sampler)
                passes = [[int(i) for i in itertools.islice(iter(sampler), size)] for _ in range(2)]
                if passes[0] != passes[1]:
                    drawable = sorted(set(passes[0]) | set(passes[1]))
            if drawable is not None and set(order) != set(drawable):
                # a shuffled loader whose pass leaves records out (drop_last, num_samples < the
                # dataset): other records each epoch, and this pass (read with the RNG isolated)
                # is not one that trained; every record it can draw counts
                why = ("drop_last=True" if getattr(batch_sampler, "drop_last", False) else
                       f"{type(sampler).__name__}(num_samples={_finite_len(sampler)})")
                notes.append(f"the training loader is shuffled with {why}: each epoch leaves other records out; "
                             f"n counts every record it can draw ({what_n(len(set(drawable)))})")
                order, batches_read = drawable, None
            elif drawable is None and isinstance(limit, int) and limit < len(batches_read) \
                    and not isinstance(sampler, (SequentialSampler, WeightedRandomSampler, type(None))) \
                    and not getattr(sampler, "replacement", False) \
                    and not any(hasattr(x, "set_epoch") for x in (sampler, batch_sampler)):
                # limit_train_batches on a sampler of the user's own (a list of indices, a fixed bucketing):
                # a second pass (the global streams advanced by the first) tells a fixed order, whose first
                # batches are the records trained on every epoch, from a shuffling one (docs/benchmarks.md
                # "rv59b": a fixed order counted as shuffled assessed every record, unmarked after 12 epochs)
                fixed = [[int(i) for i in b] for b in itertools.islice(iter(batch_sampler), limit)] \
                    == batches_read[:limit]
        elif sampler is not _UNKNOWN and _finite_len(sampler) is not None:
            order = [int(i) for i in itertools.islice(iter(sampler), _finite_len(sampler))]
        else:
            order = list(range(total))
            if sampler is not None and not isinstance(sampler, (SequentialSampler, RandomSampler)):
                name = type(batch_sampler if sampler is _UNKNOWN else sampler).__name__
                notes.append(f"the training loader's {name} has no length: n counts every record of the dataset")
    replacement = isinstance(sampler, WeightedRandomSampler) or bool(getattr(sampler, "replacement", False))
    if replacement:
        notes.append(f"the training loader's {type(sampler).__name__} draws records with replacement (a "
                     "weighted objective, other records each epoch), which the assessment does not model; "
                     "n counts every record of the dataset")
        order = list(range(total))
    batches = _finite_len(dl)
    if isinstance(limit, int) and batches is not None and limit < batches:
        # the same records every epoch only when the order is fixed (a batch sampler of unknown
        # make counts as shuffled)
        shuffled = distributed_shuffle or not (fixed or isinstance(sampler, (SequentialSampler, type(None))))
        if shuffled or replacement:
            if cut is not None:
                cut.update(limit=limit, batches=batches, what=what)
            notes.append(f"{what}: trained on {limit} of {batches} batches of a shuffled loader (which records, "
                         f"this pass cannot tell); n counts every record it can draw ({what_n(len(set(order)))})")
        elif batches_read is not None:
            order = [i for b in batches_read[:limit] for i in b]
        else:
            order = order[: limit * (getattr(dl, "batch_size", None) or 1) * replicas]
    keep = sorted(set(order))
    return keep, ("; ".join(notes) or None)


def check_training_size(trainer: Any, d: int | None = None) -> None:
    """Before training: refuse a training set of fewer than
    :data:`~mis_lightning.record_count.MIN_RECORDS` records (the records a full pass of the
    training loader draws, :func:`training_records`: never fewer than the end's count), where
    it is sized; a stream and items that are whole batches are counted only as they are read.
    ``d``: the number of assessed weights, named in the message.

    Raises:
        ValueError: too few records (:func:`~mis_lightning.record_count.check_enough_records`).
    """
    train = single_loader(trainer.train_dataloader, "training")
    if train is None or sized_dataset(train) is None:
        return
    records, _ = training_records(trainer, train, full_pass=True)
    check_enough_records(len(records), "MISCallback", d)


# the expected share of the records assessed that a shuffled loader cut by limit_train_batches never read,
# above which the figures are marked: records never trained on read as members (docs/benchmarks.md "dd59": one
# epoch of 3 of 8 batches, 62% never read, read 0.26-0.59 against 0.55-0.94 on the 192 trained on)
UNREAD_MAX = 0.01


def unread_note(trainer: Any, limit: int, batches: int, what: str) -> str | None:
    """The report's warning where a shuffled loader read ``limit`` of its ``batches`` batches per epoch
    (``what`` limited them: ``limit_train_batches``, ``fast_dev_run``, or a stop within the first epoch) and
    every record it can draw is assessed:
    over the ``E`` epochs begun, each a fresh draw, a share ``(1 - limit / batches) ** E`` of them is expected
    never to have been read (the trained records are not known: the sampler's draws are not replayed), and
    above :data:`UNREAD_MAX` every figure is marked (``diagnostics["stream_records_differ"]``, the stream
    check's mark). ``None`` below it."""
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None), "current", None)
    epochs = max(1, int(getattr(progress, "started", 1) or 1))
    unread = (1.0 - min(limit, batches) / batches) ** epochs
    if unread <= UNREAD_MAX:
        return None
    return (f"{STREAM_RECORDS_DIFFER} ({what.split(' (')[0]}: a shuffled loader cut to {limit} of {batches} batches per "
            "epoch): every record "
            f"it can draw is assessed, but over the {epochs} epoch(s) trained, each reshuffled, about {unread:.0%} of "
            "them were never read in this fit (the callback sees this fit's batches alone; which ones is not known), and records never trained on are "
            "read as trained on (one epoch of 3 of 8 batches read 0.26-0.59 against 0.55-0.94 on the 192 trained on, "
            "docs/benchmarks.md \"dd59\"); every figure is marked '*'. To assess the records trained on, train on a "
            "fixed subset (an unshuffled loader cut to its first batches, or a Subset) or collect them and call "
            "mis_lightning.assess")


def trained_batches(trainer: Any, full_pass: bool = False, read: int | None = None) -> tuple[int | float, str]:
    """``(batches per epoch the training read, what limited them)``: the Trainer's
    ``num_training_batches`` (``limit_train_batches``, ``fast_dev_run``), or fewer when the
    training has not completed one pass (``max_steps``, an early stop, a validation run
    within the first epoch). ``full_pass``: a pass is known to have ended (a stream's length is
    known only then); ``read``: the most batches one pass has read from its start (the
    callback counts them: a resume within a pass starts a plain loader's pass again, so the
    Trainer's batch counter counts the first batches twice); None: that counter."""
    limit = getattr(trainer, "num_training_batches", math.inf)
    what = "fast_dev_run" if getattr(trainer, "fast_dev_run", False) else "limit_train_batches"
    done = read
    if done is None:
        try:
            done = int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)
        except Exception:  # noqa: BLE001 - a Trainer without that loop state: the configured limit
            done = 0
    if not full_pass and 0 < done < limit:
        return done, f"training read {done} batches in all (max_steps, a stop or a validation within the first epoch)"
    return limit, what


def _transfer(trainer: Any, batch: Any, device: torch.device, dataloader_idx: int, stage: str = "validate") -> Any:
    """``batch`` through the batch-transfer hooks of the module and its datamodule
    (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``),
    as the Trainer's loops apply them, the Trainer in ``stage`` (Lightning's ``RunningStage``
    value: ``"validate"``, the assessment's, or ``"train"``); a plain device move where the module
    has no such hooks (another Lightning layout) or is not attached to ``trainer``."""
    module = getattr(trainer, "lightning_module", None)
    before = getattr(module, "_on_before_batch_transfer", None)
    handler = getattr(module, "_apply_batch_transfer_handler", None)
    if not (callable(before) and callable(handler)):
        return to_device(batch, device)
    # the hooks see the validation stage, as in the mid-training runs (on_validation_epoch_end):
    # at the end of fit the Trainer is still in its training stage, and a hook that augments
    # `if self.trainer.training` (Lightning's own example) would augment the assessed records
    # and the validation batches of the utility
    state = getattr(trainer, "state", None)
    current = getattr(state, "stage", None)
    try:
        wanted = type(current)(stage) if current is not None else None
    except ValueError:  # another enum layout: the stage as it is
        wanted = None
    if wanted is not None:
        state.stage = wanted
    try:
        return handler(before(batch, dataloader_idx=dataloader_idx), device=device, dataloader_idx=dataloader_idx)
    finally:
        if wanted is not None:
            state.stage = current


def trainer_batch(trainer: Any, batch: Any, device: torch.device, dataloader_idx: int = 0) -> Any:
    """``batch`` as the Trainer's loops hand it to the module: through the batch-transfer hooks
    of the module and its datamodule (a module that standardises its inputs in
    ``on_after_batch_transfer`` trains on the standardised ones: raw ones were assessed),
    on ``device``, and through the precision plugin's ``convert_input`` (``precision="bf16-true"``
    / ``"64-true"`` cast the floating inputs to the weights' dtype; the mixed precisions leave
    them as they are)."""
    batch = _transfer(trainer, batch, device, dataloader_idx)
    plugin = getattr(trainer, "precision_plugin", None)
    convert = getattr(plugin, "convert_input", None)
    return convert(batch) if callable(convert) else batch


class _Converted:
    """A validation loader whose batches go through the batch-transfer hooks and the Trainer's
    precision plugin (``convert_input``), as the Trainer's own loops hand them to the module
    (:func:`trainer_batch`, ``dataloader_idx`` 0): the quantized copies of a ``"bf16-true"``
    model read bf16, those of a module that standardises its inputs in a hook read them
    standardised."""

    def __init__(self, loader: Any, trainer: Any, device: torch.device | None = None) -> None:
        self.loader, self.trainer, self.device = loader, trainer, device
        self.batch_size = getattr(loader, "batch_size", None)

    def __iter__(self) -> Any:
        device = self.device
        if device is None:
            p = next(self.trainer.lightning_module.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        return (trainer_batch(self.trainer, b, device) for b in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def resolve_loss(trainer: Any, pl_module: Any, loss_fn: Any) -> dict[str, Any]:
    """``{"hook": uses mis_per_sample_loss, "loss_fn": the per-sample loss}`` for ``pl_module``.

    Raises:
        ValueError: no usable loss (names the options).
    """
    hook = callable(getattr(pl_module, HOOK_NAME, None))
    if not hook and loss_fn is None:
        loss_fn = getattr(pl_module, "per_sample_loss", None)
        if not callable(loss_fn):
            raise ValueError(
                f"MISCallback needs per-sample losses: pass loss_fn=<a module-level function "
                f"(outputs, targets) -> losses [B]> (e.g. returning F.mse_loss(outputs, targets, "
                f"reduction='none')), or define "
                f"per_sample_loss(outputs, targets) or {HOOK_NAME}(batch) on "
                f"{type(pl_module).__name__}"
            )
    return {"hook": hook, "loss_fn": loss_fn}


def optimizer_decays(trainer: Any, pl_module: Any, names: list[str]) -> dict[str, float]:
    """``{assessed parameter: the weight decay of the optimizer group that holds it}`` (0 for a
    parameter no optimizer group holds)."""
    ids = {id(p): n for n, p in pl_module.named_parameters()}
    out = dict.fromkeys(names, 0.0)
    for opt in trainer.optimizers or []:
        for group in opt.param_groups:
            wd = float(group.get("weight_decay", 0) or 0)
            for p in group.get("params", []):
                n = ids.get(id(p))
                if n in out:
                    out[n] = max(out[n], wd)
    return out


def decoupled_decay_note(trainer: Any, pl_module: Any, names: list[str]) -> str | None:
    """A note where an optimizer applies *decoupled* weight decay (AdamW, or a group with
    ``decoupled_weight_decay=True``) to assessed parameters, else ``None``. Its fixed point is
    not a minimum of ``mean(loss) + weight_decay / 2 |theta|^2`` (the decay is not a term of the
    gradient the preconditioner scales), so the objective the figures assume is an approximation
    of the training's; the report's distance-to-minimum check measures how far it is."""
    ids = {id(p): n for n, p in pl_module.named_parameters()}
    chosen, hit = set(names), {}
    for opt in trainer.optimizers or []:
        for group in opt.param_groups:
            wd = float(group.get("weight_decay", 0) or 0)
            if wd and group.get("decoupled_weight_decay", False) and any(ids.get(id(q)) in chosen
                                                                         for q in group.get("params", [])):
                hit.setdefault(type(opt).__name__, set()).add(wd)
    if not hit:
        return None
    what = ", ".join(f"{k} (weight decay {', '.join(f'{w:g}' for w in sorted(v))})" for k, v in hit.items())
    return (f"the optimizer {what} decays the weights decoupled from the loss's gradient: its fixed point is "
            "not a minimum of mean(loss) + weight_decay / 2 * |theta|^2, the objective the figures are computed "
            "for, so that objective approximates the training's (the 'not at a minimum' check measures how far); "
            "an optimizer with the decay in the loss (Adam or SGD with weight_decay, or an L2 term) trains "
            "to the assessed objective itself")


# values of a batch leaf a stream digest reads at most: a larger leaf (an image batch) is read at an even stride
# (2^18 of a [64, 3, 224, 224] batch's 9.6e6: 36 ms on the host against 1.1 s for all its bytes at load 23 on 2
# cores, docs/benchmarks.md "dd59"; dense records that differ differ there; sparse ones, a few non-zeros in a
# large leaf, may not)
DIGEST_VALUES = 1 << 18


def _tensors_digest(named: Iterable[tuple[str, Tensor]], values: int | None = None) -> str | None:
    """A digest of named tensors (names, dtypes, shapes, bytes; with ``values``, of a tensor holding
    more values than that, those at an even stride over its flattened values); None where a tensor
    cannot be read as bytes (a tensor subclass)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    try:
        for name, t in named:
            t = t.detach()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            flat = t.reshape(-1)
            if values is not None and flat.numel() > values:
                flat = flat[:: -(-flat.numel() // values)]
            h.update(flat.contiguous().cpu().view(torch.uint8).numpy())
    except Exception:  # noqa: BLE001 - a tensor subclass without bytes: treat as changed
        return None
    return h.hexdigest()


def weights_fingerprint(module: nn.Module) -> str | None:
    """A digest of ``module``'s parameters and buffers (names, dtypes, shapes, bytes): tells
    whether the weights changed between two hooks at the same step (weight averaging or
    pruning applied in ``on_train_end``); None where a tensor cannot be read as bytes."""
    return _tensors_digest(itertools.chain(module.named_parameters(), module.named_buffers()))


def _tensor_leaves(batch: Any) -> list[tuple[str, Tensor]]:
    """A batch's tensor leaves, each with its place in the batch (``"batch[1]"``, ``"batch['x']"``)."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    return [(f"batch{keystr(path)}", t) for path, t in tree_flatten_with_path(batch)[0] if isinstance(t, Tensor)]


def batch_digests(batch: Any) -> tuple[str | None, ...]:
    """A digest of each tensor leaf of a batch (dtype, shape, bytes), in the batch's order: tells
    whether two passes of a stream began with the same batch, leaf by leaf (inputs a hook augments
    at random apart from the targets it leaves); None for a leaf that cannot be read as bytes. A leaf of more
    than :data:`DIGEST_VALUES` values is read at an even stride (the same positions for every batch of its
    shape)."""
    return tuple(_tensors_digest([("", t)], DIGEST_VALUES) for _, t in _tensor_leaves(batch))


def _training_view(trainer: Any, batch: Any, device: torch.device) -> Any:
    """``batch`` as the training loop hands it to the callbacks' ``on_train_batch_start``: the
    precision plugin's ``convert_input``, then the batch-transfer hooks in the training stage, the
    module in train mode (Lightning 2.6 ``_TrainingEpochLoop.advance``); a private clone of its tensors goes in (a hook
    that writes into its batch leaves ``batch`` as it was)."""
    from torch.utils._pytree import tree_map

    batch = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, batch)
    convert = getattr(getattr(trainer, "precision_plugin", None), "convert_input", None)
    # in train mode, as the training loop runs the hooks (a hook that augments `if self.training`); each
    # layer's mode restored after
    module = getattr(trainer, "lightning_module", None)
    modes = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
    if modes:
        module.train()
    try:
        return _transfer(trainer, convert(batch) if callable(convert) else batch, device, 0, stage="train")
    finally:
        for m, mode in modes:
            m.training = mode


def _leaves_off(ref: tuple[str | None, ...], got: tuple[str | None, ...]) -> set[int] | None:
    """The leaves of two :func:`batch_digests` that differ (a leaf unreadable on either side is not
    compared), or None where the batches have another number of tensor leaves (another layout)."""
    if len(ref) != len(got):
        return None
    return {i for i, (a, b) in enumerate(zip(ref, got)) if a is not None and b is not None and a != b}


class StreamPasses:
    """What the training passes over a stream read, for the stream check (:class:`StreamCheck`): the
    :func:`batch_digests` of the batch at each position of the first pass that read it, for the first
    ``limit`` positions of every pass (under an integer ``limit_train_batches``, every batch a pass reads: the
    records the assessment reads are those batches; else the first batch only), and, where a later pass read
    another batch at a position, the first such position of each leaf that differed. One digest tuple per
    position (a few bytes a leaf) whatever the number of passes; one hashing of each batch recorded (its bytes
    read on the host)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.passes = max(1, int(limit)), 0
        self.first: dict[int, tuple[str | None, ...]] = {}
        self.differ: dict[int, int] = {}  # leaf -> the first position a later pass read it otherwise
        self.layout: int | None = None  # the first position a later pass read a batch of another layout

    def see(self, position: int, batch: Any) -> None:
        """The training batch at ``position`` (0-based) of its pass, as ``on_train_batch_start`` gets it."""
        if position == 0:
            self.passes += 1
        if position >= self.limit:
            return
        got = batch_digests(batch)
        ref = self.first.setdefault(position, got)
        if ref is not got:
            _note_off(self, _leaves_off(ref, got), position)


def _note_off(where: Any, off: set[int] | None, position: int, skip: Iterable[int] = ()) -> None:
    """Record on ``where`` (:class:`StreamPasses` or :class:`StreamCheck`: ``differ``, ``layout``) the leaves
    ``off`` (None: another layout) found differing at ``position``, those in ``skip`` aside."""
    if off is None:
        where.layout = position if where.layout is None else min(where.layout, position)
        return
    for leaf in off.difference(skip):
        where.differ[leaf] = min(where.differ.get(leaf, position), position)


class StreamCheck:
    """The stream check, on the batches the assessment reads (:meth:`batches` wraps its loader; the
    raw batches pass through unchanged): each is put through :func:`_training_view` (the user's hooks see
    that call, in the training stage; global random streams restored) and its :func:`batch_digests`
    compared with those of the training passes' batch at the same position (:class:`StreamPasses`). Every
    batch assessed that a pass read at its position is compared, not only the first (a stream whose passes
    begin alike and differ later: docs/benchmarks.md "dd59"), and the batches compared are the assessed ones
    themselves, read from a private copy or, for a stream that cannot be copied, from the stream itself (its
    next pass: an uncopyable reshuffling stream trained one epoch is told too). A batch whose view differs in
    a leaf not yet known to be drawn at random by the hooks (and the first batch compared, where the passes
    differed among themselves) is put through them a second time: a leaf that differs between the two views
    is drawn at random by the hooks (augmentation on the device; the assessment reads its batches in the
    validation stage) and is not compared. :meth:`note` says what the comparison found."""

    def __init__(self, trainer: Any, passes: StreamPasses, device: torch.device, private: bool) -> None:
        self.trainer, self.passes, self.device, self.private = trainer, passes, device, private
        self.names: list[str] | None = None  # the leaves' places in the batch, from the first batch compared
        self.varies: list[bool] = []  # whether each leaf varies over the batch's records
        self.random: set[int] = set()  # leaves the hooks draw at random
        self.differ: dict[int, int] = {}
        self.layout: int | None = None
        self.compared, self.failed, self._probed = 0, False, False

    def batches(self, loader: Iterable[Any]) -> Iterable[Any]:
        for position, raw in enumerate(loader):
            if not self.failed and position in self.passes.first:
                self._see(position, raw)
            yield raw

    def _see(self, position: int, raw: Any) -> None:
        ref = self.passes.first[position]
        try:
            with isolated_rng():  # a hook's random draws leave the assessment's streams as they were
                view = _training_view(self.trainer, raw, self.device)
                got = batch_digests(view)
                if self.names is None:
                    leaves = _tensor_leaves(view)
                    self.names, self.varies = [n for n, _ in leaves], [not _constant_rows(t) for _, t in leaves]
                off = _leaves_off(ref, got)
                unsure = set(self.passes.differ) if not self._probed else set()
                if off is None or (off | unsure) - self.random:
                    self._probed = True
                    again = batch_digests(_training_view(self.trainer, raw, self.device))
                    self.random |= {i for i, d in enumerate(got) if d is None or i >= len(again) or again[i] != d}
        except Exception:  # noqa: BLE001 - the estimation's own read of the batch reports its errors
            self.failed = True
            return
        self.compared += 1
        _note_off(self, off, position, self.random)

    def note(self, train: Any, limit: int, what: str) -> tuple[str, bool] | None:
        """``(text, other_records)`` for the report, or None where nothing compared differs. A leaf
        that differs (between the passes, or between the batches assessed and the training's) while
        another, not constant over the batch (the targets), agrees: the same records at another random
        draw of the differing values (augmentation in the dataset; ``other_records`` False: each record is
        assessed at one draw, as for a map-style dataset). Every such leaf differing: other records (the
        stream reshuffles or draws anew each pass: 47 of 192 assessed never trained on after 3 epochs, 121
        of 192 after one, docs/benchmarks.md "nu58"), or values augmented in every leaf, which the text
        names too, or the training loader's worker processes each yielding a part of the stream,
        interleaved, while the copy is read in one process (an unshuffled stream sharded over 2 workers, 3
        batches of 64: trained on records 0-127 and the even ones to 254, the copy's 0-191 assessed, 32 of
        them never trained on), named where ``train`` has workers (``other_records`` True: the figures
        are marked ``*``)."""
        if self.names is None:  # no batch assessed compared (its hooks failed): the passes alone, every leaf kept
            if not (self.passes.differ or self.passes.layout is not None):
                return None
            width = len(next(iter(self.passes.first.values())))
            self.names, self.varies, self.random, self.differ, self.layout = (
                [f"batch leaf {i}" for i in range(width)], [True] * width, set(), {}, None)
        kept = [i for i in range(len(self.names)) if i not in self.random]
        trained = {i: p for i, p in self.passes.differ.items() if i in kept}
        assessed = {i: p for i, p in self.differ.items() if i in kept}
        layouts = [p for p in (self.passes.layout, self.layout) if p is not None]
        if layouts:  # another layout than the training's: no leaf to pair
            differ, agree = ["the batch's layout"], []
        elif trained or assessed:
            diff = sorted(set(trained) | set(assessed))
            differ = [self.names[i] for i in diff]
            agree = [self.names[i] for i in kept if i not in diff and self.varies[i]]
        else:
            return None
        if trained or self.passes.layout is not None:
            at = min([*trained.values(), *([self.passes.layout] if self.passes.layout is not None else [])])
            begun = ("the training passes over the iterable training data did not all begin with the same batch"
                     if at == 0 else "the training passes over the iterable training data began with the same "
                     f"batch but did not all read the same batch {at + 1}")
        else:
            at = min([*assessed.values(), *([self.layout] if self.layout is not None else [])])
            source = ("the copy of the iterable training data assessed (its next pass)" if self.private else
                      "the pass of the iterable training data assessed (its next one, read from the stream itself: "
                      "it cannot be copied)")
            begun = (f"{source} begins with another batch than the training's pass did" if at == 0 else
                     f"{source} begins with the training's batches but reads another batch {at + 1} than the "
                     "training's pass did")
        hooks = " (values the batch-transfer hooks draw at random aside)" if self.random else ""
        if agree:
            return (f"the iterable training data yields its records with other values at each pass: {begun}{hooks}, "
                    f"in {', '.join(differ)} while {', '.join(agree)} agree (random augmentation in the dataset "
                    f"or its collate_fn, {what}): each record is assessed at one random draw, not as the records "
                    "trained on; to assess the records themselves, assess over the stream without its random "
                    "transforms (mis_lightning.assess, or a MISIndicator updated on its batches)"), False
        workers = int(getattr(train, "num_workers", 0) or 0)
        # workers each yield their part of the stream (sharded by get_worker_info, interleaved batch by batch),
        # the copy is read in one process: its batches hold other records than the training's
        split = (f", or its {workers} worker processes each yield a part of it, interleaved, while the copy "
                 "assessed is read in one process (the same records only where the batches trained on span whole "
                 "rounds of the workers' parts), or each yields all of it (every record trained on once per worker: "
                 "shard the stream by torch.utils.data.get_worker_info())") if workers else ""
        return (f"{STREAM_RECORDS_DIFFER} ({what}): {begun}{hooks}, in every value that varies over the batch, so "
                f"the stream yields other records at each pass (it reshuffles or draws anew){split}, or it augments "
                f"every value of its records at random: the first {limit} batches of another pass, which are "
                "assessed, are not the records trained on (reshuffled: some were never trained on and others "
                "trained on are missing; augmented: the records at another random draw); every figure is marked "
                "'*'. To assess the records trained on, collect them and call mis_lightning.assess"), True


def _constant_rows(t: Tensor) -> bool:
    """Whether every record of a batch leaf holds the same value (a mask of ones, one class): its
    equality between two batches says nothing of their records."""
    try:
        return t.dim() == 0 or t.shape[0] <= 1 or bool((t == t[:1]).all())
    except Exception:  # noqa: BLE001 - a tensor subclass without elementwise equality: no claim from it
        return True


def _first_read(cb: Any, trainer: Any) -> int | None:
    """The validation run (1-based count) at which a monitoring callback first reads its key,
    or None when it may never need it during training (or its schedule is not one this check
    can count: it is then left to Lightning)."""
    name = type(cb).__name__
    if name == "EarlyStopping":
        return 1 if getattr(cb, "strict", True) else None  # every validation (or train epoch end)
    if not hasattr(cb, "_every_n_epochs"):  # another monitor: its schedule is unknown
        return None
    if getattr(cb, "save_top_k", 1) == 0:
        return None
    vci = getattr(trainer, "val_check_interval", 1.0)
    if (getattr(cb, "_every_n_train_steps", 0) or 0) > 0 or getattr(cb, "_train_time_interval", None) is not None:
        # step- or time-triggered: a save deferred to a validation's end raises there when it
        # runs within the epoch; at the epoch's end Lightning only warns (measured, Lightning 2.6)
        return None if vci == 1.0 else 1
    k = int(getattr(cb, "_every_n_epochs", 1) or 0)
    if k < 1:
        return None
    c = int(getattr(trainer, "check_val_every_n_epoch", 1) or 1)
    if isinstance(vci, float) and 0.0 < vci <= 1.0:
        per_epoch = max(1, int(1.0 / vci + 1e-9))  # validations per validating epoch
        if abs(1.0 / vci - round(1.0 / vci)) > 1e-9 and math.lcm(c, k) > c:
            # Lightning runs N // int(N * vci) per epoch for N batches: at least 1 / vci rounded
            # down, how many more depends on the loader's length (0.15 with 32 batches: 8, not 6)
            return None
    elif k == 1:
        return 1
    else:  # every N batches: how many per epoch is not known before the loader
        return None
    # reads at the first validation of the first validating epoch e with (e + 1) % k == 0
    return (math.lcm(c, k) // c - 1) * per_epoch + 1


def check_monitors(trainer: Any, keys: list[str], prefix: str, every_n_val_epochs: int | None) -> None:
    """Before training: a callback of the Trainer (``EarlyStopping``, ``ModelCheckpoint``, any
    with a ``monitor``) that monitors one of this callback's keys must find it when it reads
    it, else Lightning raises after the first epochs with its generic message. Raises
    ``ValueError`` naming the callback, the key and the fix: a key this callback never logs
    (with the close ones), or one it logs only at the end of ``fit`` (``every_n_val_epochs=None``)
    or from the ``every_n_val_epochs``-th validation on, while the monitor reads it before
    (``EarlyStopping(strict=True)`` at every validation; ``ModelCheckpoint`` at the
    validations of its ``every_n_epochs``)."""
    head = f"{prefix}/" if prefix else ""
    for cb in getattr(trainer, "callbacks", None) or []:
        key = getattr(cb, "monitor", None)
        if not isinstance(key, str) or not key.startswith(head) or (not head and key not in keys):
            continue
        who = f"{type(cb).__name__}(monitor={key!r})"
        if key not in keys:
            close = close_names(key, keys, n=3)
            # a utility the callback does not measure, e.g. the val_acc the module logs itself
            # (fu32): say where a measured one comes from, not only the close spellings
            scheme, _, metric = key[len(head):].partition("/utility/")
            util = (f"; the utility figures of the quantized copies are the mean loss and the metrics of "
                    f"utility_metrics= ({head}<scheme>/utility/<name>): to monitor {metric!r}, pass "
                    f"MISCallback(utility_metrics={{{metric!r}: <a torchmetrics Metric>}})"
                    if metric and any(k.startswith(f"{head}{scheme}/") for k in keys) else "")
            raise ValueError(f"{who}: MISCallback logs no such key" + (
                f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else "")
                + f"; its keys are {head}<scheme>/<figure> for its schemes, e.g. {keys[3]!r}"
                + " (leakage_p10 / leakage_p90 need uncertainty_draws > 0)" * key.endswith(("_p10", "_p90"))
                + util)
        first = _first_read(cb, trainer)
        if every_n_val_epochs == 1 or first is None or (every_n_val_epochs is not None and first >= every_n_val_epochs):
            continue
        when = ("only at the end of fit (every_n_val_epochs=None)" if every_n_val_epochs is None else
                f"from validation {every_n_val_epochs} on (every_n_val_epochs={every_n_val_epochs})")
        raise ValueError(f"{who} reads {key!r} from validation {first} on, but MISCallback logs it {when}: "
                         "Lightning would stop there; pass MISCallback(every_n_val_epochs=1)"
                         + (", or EarlyStopping(strict=False)" if type(cb).__name__ == "EarlyStopping" else ""))


def untrained_params(trainer: Any, pl_module: Any, names: list[str]) -> list[str]:
    """The selected parameters no optimizer of the Trainer holds (they require grad, but
    training never updates them: a body left out of ``configure_optimizers``); ``[]`` when
    the Trainer has no optimizer (nothing to tell)."""
    opts = trainer.optimizers or []
    if not opts:
        return []
    held = {id(p) for opt in opts for group in opt.param_groups for p in group.get("params", [])}
    named = dict(pl_module.named_parameters())
    return [n for n in names if n in named and id(named[n]) not in held]


def best_checkpoint_note(trainer: Any) -> str | None:
    """A note for an end-of-fit report when a ``ModelCheckpoint`` with a ``monitor`` keeps
    another model as its best than the one assessed: its best score differs from the monitored
    value at the last validation (an ``EarlyStopping`` with patience stops epochs after the best;
    the best checkpoint is what ``trainer.test(ckpt_path="best")`` evaluates and what is often
    shipped). The report was silently of the last weights (leakage 0.158 reported, 0.183
    for the best checkpoint). None when no such checkpoint."""
    for ck in getattr(trainer, "checkpoint_callbacks", None) or []:
        monitor, path = getattr(ck, "monitor", None), getattr(ck, "best_model_path", "") or ""
        best = getattr(ck, "best_model_score", None)
        last = trainer.callback_metrics.get(monitor) if monitor else None
        if not monitor or not path or best is None or last is None:
            continue
        try:
            best_v, last_v = float(best), float(last)
        except (TypeError, ValueError):
            continue
        if best_v == last_v:
            continue
        return (f"this report is of the weights at the end of fit (step {int(trainer.global_step)}), but "
                f"ModelCheckpoint(monitor={monitor!r}) keeps another model as its best: {Path(path).name} "
                f"({monitor} {best_v:.6g}; {last_v:.6g} at the last validation); if you ship or test that "
                f"checkpoint, assess it (mis_lightning.assess on the module loaded from it)")
    return None


def decay_possible(trainer: Any, pl_module: Any, weight_decay: Any) -> bool:
    """Whether the assessed objective may have an L2 term (an explicit ``weight_decay``, the
    module's attribute, or an optimizer group's decay): curvature the first-batch sums of the
    loss do not hold."""
    if weight_decay is not None:
        vals = weight_decay.values() if isinstance(weight_decay, Mapping) else [weight_decay]
        return any(float(v) > 0 for v in vals)
    attr = getattr(pl_module, "weight_decay", None)
    if isinstance(attr, (int, float)) and not isinstance(attr, bool) and attr > 0:
        return True
    return any(float(g.get("weight_decay", 0) or 0) > 0 for o in (trainer.optimizers or []) for g in o.param_groups)


#: ``torch.optim`` classes whose ``weight_decay`` adds ``wd * theta`` to the gradient (coupled L2, unless a
#: group sets ``decoupled_weight_decay=True``): their stationary point is the minimum of ``mean(loss) +
#: wd / 2 |theta|^2``, the assessed objective with ``weight_decay = wd`` (checked to a relative gradient of
#: 1e-9..4e-4 on a tanh MLP: docs/benchmarks.md "ux51"). AdamW (decoupled) is not one of them.
COUPLED_DECAY_OPTIMIZERS = ("SGD", "Adam", "Adamax", "RMSprop", "Adagrad", "Adadelta", "NAdam", "RAdam", "ASGD")


def coupled_decay(trainer: Any, pl_module: Any, names: list[str]) -> float | None:
    """The optimizers' weight decay where it is unambiguously the assessed objective's L2
    coefficient: every group holding an assessed parameter (``names``, each held by one) belongs
    to a :data:`COUPLED_DECAY_OPTIMIZERS` optimizer (its exact class), is neither decoupled nor
    ``maximize``, and all of them apply one value ``> 0``; else ``None``."""
    coupled = tuple(c for k in COUPLED_DECAY_OPTIMIZERS if isinstance(c := getattr(torch.optim, k, None), type))
    ids = {id(p): n for n, p in pl_module.named_parameters()}
    chosen, held, values = set(names), set(), set()
    for opt in trainer.optimizers or []:
        for group in opt.param_groups:
            mine = {n for p in group.get("params", []) if (n := ids.get(id(p))) in chosen}
            if not mine:
                continue
            if type(opt) not in coupled or group.get("decoupled_weight_decay", False) or group.get("maximize", False):
                return None
            values.add(float(group.get("weight_decay", 0) or 0))
            held |= mine
    return values.pop() if len(values) == 1 and held == chosen and min(values) > 0 else None


def check_optimizer_decay(trainer: Any, pl_module: Any, weight_decay: Any, names: list[str]
                          ) -> tuple[dict[str, float] | None, str | None, str | None]:
    """The objective's L2 coefficients against the optimizers' weight decay, once the
    optimizers exist (``on_train_start``; they do not at ``setup``), for ``weight_decay=None``
    (an explicit value is the user's word). Returns a per-parameter mapping to assess with, or
    None to keep the resolved value, the warning given (or None) and an information line (or
    None): the caller adds them to the report's warnings and notes, whose figures assume that objective.

    * The module's numeric ``weight_decay`` attribute is the coefficient; where the optimizer
      groups apply it to some assessed parameters and none to others (no decay on biases and
      norms, a common AdamW setup), the groups' per-parameter values are returned (said in an
      info line); other disagreements are warned about.
    * Without the attribute, coupled decay of one value over every assessed parameter
      (:func:`coupled_decay`: SGD, Adam, RMSprop, ... ``weight_decay=wd``) is the objective's
      coefficient: used, with the information line. Other decay in the optimizer
      (decoupled: AdamW; values that differ by group) is warned about: the objective is then
      taken as unpenalised.
    """
    if weight_decay is not None:  # the user said it explicitly
        return None, None, None
    by_param = optimizer_decays(trainer, pl_module, names)
    decays = sorted(set(by_param.values()) - {0.0})
    names_opt = ", ".join(type(o).__name__ for o in trainer.optimizers or [])
    attr = getattr(pl_module, "weight_decay", None)
    if isinstance(attr, (int, float)) and not isinstance(attr, bool):
        attr = float(attr)
        if decays == [attr] and 0.0 in by_param.values():
            zero = [n for n, v in by_param.items() if v == 0.0]
            rank_zero_info(
                f"MISCallback: the optimizer ({names_opt}) decays {len(by_param) - len(zero)} assessed "
                f"parameter(s) with {type(pl_module).__name__}.weight_decay = {attr:g} and not "
                f"{len(zero)} others ({', '.join(zero[:4])}{', ...' if len(zero) > 4 else ''}): the assessed "
                "objective follows its groups (pass MISCallback(weight_decay=...) to override)")
            return by_param, None, None
        note = None
        if decays and any(abs(w - attr) > 1e-12 * max(w, 1.0) for w in decays):
            note = (
                f"{type(pl_module).__name__}.weight_decay = {attr:g} (used as the L2 "
                f"coefficient of the assessed objective) but the optimizer ({names_opt}) applies weight decay "
                f"{', '.join(f'{w:g}' for w in decays)}; pass MISCallback(weight_decay=...) with the "
                "objective's coefficient (a number, or {parameter name: coefficient}) to settle it")
            rank_zero_warn(f"MISCallback: {note}")
        return None, note, None
    if not decays:
        return None, None, None
    if (wd := coupled_decay(trainer, pl_module, names)) is not None:
        info = (f"weight_decay {wd:g} read from the optimizer ({names_opt}, coupled L2 decay on every assessed "
                f"parameter): the assessed objective is mean(loss) + {wd:g} / 2 * |theta|^2, the one it trains to "
                "(pass MISCallback(weight_decay=...) to override)")
        rank_zero_info(f"MISCallback: {info}")
        return dict.fromkeys(names, wd), None, info
    note = (
        f"the optimizer ({names_opt}) applies weight decay "
        f"({', '.join(f'{w:g}' for w in decays)}) but neither MISCallback(weight_decay=...) nor a "
        f"`weight_decay` attribute of {type(pl_module).__name__} says so: the assessment takes the "
        "objective as unpenalised, which changes the figures (either way: the penalty's curvature "
        "narrows sigma, its shift of the minimum moves the weights); pass weight_decay= (the L2 "
        "coefficient of mean(loss) + weight_decay / 2 * |theta|^2, or {parameter name: coefficient} "
        "where the groups differ; for decoupled decay (AdamW) an approximation)"
    )
    rank_zero_warn(f"MISCallback: {note}")
    return None, note, None


def recheck_coupled_decay(trainer: Any, pl_module: Any, names: list[str], first: float) -> str | None:
    """At the assessment, the optimizers' coupled decay against ``first``, the value
    :func:`check_optimizer_decay` read at ``on_train_start`` and took as the objective's: ``None``
    where it is still that value, else the warning that the training ended at another
    objective (a weight-decay schedule), for which the caller assesses unpenalised, as
    before the value was read from the optimizer (the caller adds it to the report's warnings)."""
    now = coupled_decay(trainer, pl_module, names)
    if now is not None and abs(now - first) <= 1e-12 * max(first, 1.0):
        return None
    finals = sorted(set(optimizer_decays(trainer, pl_module, names).values()))
    note = (f"the optimizer's weight decay changed during training ({first:g} at the start, "
            f"{', '.join(f'{w:g}' for w in finals) or 'none'} at the end: a weight-decay schedule?), so the "
            "objective it trained to is not one the start's value states: the assessment takes it as "
            "unpenalised; pass MISCallback(weight_decay=...) with the L2 coefficient of the objective the "
            "weights minimise (mean(loss) + weight_decay / 2 * |theta|^2)")
    return note  # (the report's warnings are raised with the report: said once)


def check_first_batch(trainer: Any, pl_module: Any, hook: bool, loss_fn: Any, batch_fn: Any,
                      user_loss: bool, batch: Any = None,
                      estimation_config: EstimationConfig | None = None, curvature: bool = False) -> bool:
    """One training batch through the model and the loss: a batch that is not
    ``(inputs, targets)`` (without ``batch_fn``), losses that are not ``[B]`` (a scalar
    mean, ``[B, 1]``) or that mix records raise here instead of after the whole training.

    Runs a private copy of the model in eval mode without gradients, with the RNG isolated,
    so training is unaffected, on ``batch`` when given (the first training batch, for iterable
    datasets: ``on_train_batch_start``, still before the first optimizer step), else on the
    first records of a sized dataset (unshuffled, in-process). Returns False, having checked
    nothing, for an iterable dataset without ``batch`` (reading it could consume the stream).

    With ``estimation_config``, the batch then goes through the estimation pass itself (a
    throwaway :class:`~mis_lightning.streaming.EstimationMetric` on a private copy: the
    compute dtype, the per-sample gradient paths, the Gauss-Newton directions), so what would
    fail there after the whole training fails here.

    Raises:
        TypeError: the batch layout does not fit (names ``batch_fn``).
        ValueError: the per-sample losses do not have shape ``[B]``, or mix records (a record's
            loss computed alone differs from its entry); names the loss.
        RuntimeError: the estimation pass fails on the batch (its error as the cause).
    """
    if batch is None:
        read, batch = first_batch(single_loader(trainer.train_dataloader, "training"), 8)
        if batch is None:
            return read
    p = next(pl_module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    # a private copy: what the forward does (attributes it sets, buffers it updates) never
    # reaches the module that trains
    model = private_copy(pl_module, "copying the model for the first-batch check").eval()
    with isolated_rng(), torch.inference_mode(False), torch.no_grad():
        batch = trainer_batch(trainer, batch, device)
        if hook:
            name = f"{type(pl_module).__name__}.{HOOK_NAME}"
            leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor)]
            b = int(leaves[0].shape[0]) if leaves and leaves[0].dim() > 0 else None
            check_record_dimension(batch, None, "MISCallback: the first training batch")
            losses = getattr(model, HOOK_NAME)(batch)
        else:
            name = ("loss_fn " + callable_name(loss_fn)) if user_loss \
                else f"{type(pl_module).__name__}.per_sample_loss"
            if batch_fn is None:
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    layout = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                    if isinstance(batch, Mapping):
                        layout += f" with keys {list(batch)}"
                    raise TypeError(
                        f"MISCallback: the training batches are {layout}, not (inputs, targets) "
                        f"pairs: pass batch_fn=<a module-level function batch -> (inputs, targets)>, "
                        f"or define {HOOK_NAME}(self, batch) -> per-sample losses [B] on "
                        f"{type(pl_module).__name__}")
                inputs, targets = batch
            else:
                inputs, targets = batch_fn(batch)
            check_record_dimension(inputs, targets, "MISCallback: the first training batch")
            tl = [t for t in torch.utils._pytree.tree_leaves(targets) if isinstance(t, Tensor)]
            b = int(tl[0].shape[0]) if tl and tl[0].dim() > 0 else None
            try:
                outputs = model(inputs)
            except TypeError as exc:  # e.g. forward(self, x1, x2): the estimation calls model(inputs)
                raise TypeError(
                    f"MISCallback: {type(pl_module).__name__}(inputs) failed on the first training batch "
                    f"({exc}); the assessment calls the model with one argument, the inputs of each "
                    f"(inputs, targets) batch: for a forward that takes several arguments, define "
                    f"{HOOK_NAME}(self, batch) -> per-sample losses [B] on {type(pl_module).__name__}, "
                    f"or pass batch_fn returning inputs the forward takes as its one argument") from exc
            try:
                losses = loss_fn(outputs, targets)
            except Exception as exc:  # name the loss and what it was given: the raw error does not
                msg = (f"MISCallback: {name}(outputs, targets) failed on the first training batch with outputs "
                       f"{type(outputs).__name__} {_shapes(outputs)} and targets {_shapes(targets)} ({type(exc).__name__}: {exc}); the "
                       f"assessment passes the model's outputs as the forward returns them: make the loss take "
                       f"them (e.g. a dict or tuple), or define {HOOK_NAME}(self, batch) -> per-sample losses [B] "
                       f"on {type(pl_module).__name__}")
                raise named_error(exc, msg) from exc
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else None
            if shape is not None and b is not None and shape == (b,):
                # losses that mix records (outputs [B, 1] broadcast against targets [B]):
                # the estimation would fail on them after the whole training
                check_record_losses(loss_fn, outputs, targets, losses, f"MISCallback: {name}")
                check_record_outputs(model, inputs, outputs, f"MISCallback: {type(pl_module).__name__}")
                _check_differentiable_forward(model, loss_fn, inputs, targets)
    shape = tuple(losses.shape) if isinstance(losses, Tensor) else None
    if shape is None or b is None or shape != (b,):
        got = f"shape {list(shape)}" if shape is not None else type(losses).__name__
        if shape == ():
            hint = (" (a scalar: a loss reduced over the batch, use reduction='none'; or one that read the "
                    "batch as a single record, e.g. cross_entropy on outputs [B] without a class dimension"
                    + (f"; here outputs {_shapes(outputs)}, targets {_shapes(targets)}" if not hook else "") + ")")
        else:  # [B, 1], [B, k]: what to reduce, and how
            hint = loss_shape_hint(shape, b, None if hook else targets, None if hook else outputs)
        raise ValueError(
            f"MISCallback: {name} returned {got} for a batch of {b} records; it must return "
            f"per-sample losses of shape [{b}]{hint}")
    if estimation_config is not None:
        _dry_estimation(pl_module, None if hook else loss_fn, None if hook else batch_fn, estimation_config, batch,
                        curvature=curvature)
    return True


#: the report's caveat where the fit had no validation loader; the callback's console said it before training,
#: with the fix (:func:`check_validation_batch`), and does not say it again at the end (ux57)
NO_VALIDATION_WARNING = "no validation dataloader: the quantized copies' utility was not measured"


def check_validation_batch(trainer: Any, pl_module: Any, hook: bool, loss_fn: Any, batch_fn: Any,
                           metrics: Mapping[str, Any] | None, output_transform: Any,
                           schemes: Sequence[QuantizationScheme] = ()) -> None:
    """Where there is no validation loader: a note that utility will not be measured (it is
    optional; formerly said only after the fit). Else the first validation batch through a private copy of the model, as each quantized copy's
    utility will be measured at the assessment (the loss, ``batch_fn``, the utility metrics,
    ``output_transform``): validation batches of another layout than the training ones
    (``(x, y, w)`` against ``(x, y)`` pairs, a dict) failed every scheme's row, the float
    baseline's too, after the whole training. Only a sized map-style validation set is
    read (a stream is not read twice); the RNG streams and the loaders' generators are kept.
    Then the batch through each of ``schemes``' quantized copies of that private copy (in eval
    mode, without autograd: nothing of the module, its buffers or its running statistics moves).

    Raises:
        the error's own type (``RuntimeError`` if it cannot be rebuilt): names the validation
        data, the layout and the fix, with the original error as the cause.
        ReleaseForwardError: a scheme's quantized copy cannot run the forward (a quantized weight
            used outside its module, ``h @ self.emb.weight.T`` under torchao); names the
            schemes, the parameters, the op and the fixes, before the first training step.
    """
    with isolated_rng(*trainer_loaders(trainer)):  # setting the loader up reads no record
        val, _ = validation_loaders(_validation_dataloaders(trainer))
    if val is None:
        rank_zero_info("MISCallback: no validation dataloader: the quantized copies' utility will not be "
                       "measured and the verdict ranks the schemes by leakage alone (pass val_dataloaders to "
                       "fit to measure it)")
        return
    batch = first_batch(val, 8)[1]
    if batch is None:
        return
    p = next(pl_module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    model = private_copy(pl_module, "copying the model for the validation-batch check")
    batch_loss = (lambda m, b: getattr(m, HOOK_NAME)(b)) if hook else None
    try:
        with isolated_rng(), torch.inference_mode(False):
            batch = trainer_batch(trainer, batch, device)
            with uses_outside_layers(model) as outside:  # a weight used past its layer's function (nux50)
                evaluate_utility(model, [batch], None if hook else loss_fn, metrics, batch_loss=batch_loss,
                                 batch_fn=None if hook else batch_fn, output_transform=output_transform)
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        layout = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        if isinstance(batch, Mapping):
            layout += f" with keys {list(batch)}"
        how = (f"{HOOK_NAME}(batch)" if hook else
               f"loss_fn(model(inputs), targets) with (inputs, targets) = "
               f"{'batch_fn(batch)' if batch_fn is not None else 'the batch as a pair'}")
        fix = (metric_side_fix(exc, metrics, output_transform) or
               f"each copy's utility is the mean of {how} over the validation batches, as for the training "
               f"batches: give the validation batches the training batches' layout, or pass batch_fn=<a "
               f"module-level function that takes both layouts, e.g. returning (batch[0], batch[1])>")
        raise named_error(exc, (
            f"MISCallback: the first validation batch ({layout}) fails in the utility evaluation the "
            f"quantized copies get after training ({type(exc).__name__}: {exc}); {fix}")) from exc
    if not outside:  # every weight used by its layer's function: the quantized copies run it
        return
    with isolated_rng(), torch.inference_mode(False):
        errors = quantized_forward_errors(model, schemes, lambda q: evaluate_utility(
            q, [batch], None if hook else loss_fn, metrics, batch_loss=batch_loss,
            batch_fn=None if hook else batch_fn, output_transform=output_transform))
    if errors:
        err = joined(errors)
        raise ReleaseForwardError(f"MISCallback (checked before training): {err}", err.params, err.op,
                                  err.scheme) from err.__cause__


def _first_batch_curvature(metric: EstimationMetric) -> None:
    """:func:`~mis_lightning.estimation.estimate.check_curvature` on the first batch's sums: a
    loss piecewise linear in the assessed weights (L1 on a linear model; L1 under the
    Gauss-Newton diagonal of any model) has no curvature at any weights, so the refusal the
    assessment would give after training comes now. Not for Hutchinson's noisy probes."""
    acc = metric.accumulator
    if acc.hessian == "hutchinson" or not acc.d:
        return
    st = metric._states()
    n = int(st["n"])
    if n < 2:
        return
    g = st["g_sum"].double() / n
    varies = bool(((st["g2_sum"].double() / n - g.square()) > 0).any())
    if acc.mode == "exact":
        top = top_curvature(st["H_sum"].double() / n)
    else:
        top = float(st["h_sum"].double().max()) / n
    check_curvature(top, varies)


def _dry_estimation(pl_module: Any, loss_fn: Any, batch_fn: Any, estimation_config: EstimationConfig,
                    batch: Any, curvature: bool = False) -> None:
    """The estimation pass's update on one batch, on a throwaway Metric (private copies; the RNG
    isolated), so that its failures (a kernel vmap cannot batch, a dtype the float64 copy
    meets) surface before training. Errors that are already clear (ValueError, TypeError) pass
    through; any other is wrapped, naming the step.

    Raises:
        ValueError, TypeError: as the estimation raises them.
        RuntimeError: any other failure of the estimation pass on this batch (as its cause).
    """
    with isolated_rng(), torch.inference_mode(False):
        try:
            metric = EstimationMetric(pl_module, loss_fn, estimation_config=estimation_config, batch_fn=batch_fn)
            metric.update(batch)
            if curvature:
                _first_batch_curvature(metric)
        except (ValueError, TypeError, ModelCopyError):
            raise
        except Exception as exc:  # noqa: BLE001 - named and re-raised
            raise RuntimeError(
                f"MISCallback: the estimation pass fails on the first training batch ({type(exc).__name__}: "
                f"{exc}); it would fail the same way after the whole training: assess fewer parameters "
                "(params=), another estimation= mode, or a model torch.func can batch") from exc


def _check_differentiable_forward(model: nn.Module, loss_fn: Any, inputs: Any, targets: Any) -> None:
    """One record's per-sample gradient through ``torch.func`` (as the estimation takes them),
    on the private copy: a forward that updates a tensor it holds in place even in eval mode
    fails there, and would otherwise fail after the whole training.

    Raises:
        ValueError: the forward mutates a captured tensor (says what to change).
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        return
    one = torch.utils._pytree.tree_map(lambda t: t[:1] if isinstance(t, Tensor) and t.dim() else t, (inputs, targets))

    def loss(p: dict[str, Tensor]) -> Tensor:
        return loss_fn(torch.func.functional_call(model, p, (one[0],)), one[1]).sum()

    try:
        with torch.enable_grad():
            torch.func.grad(loss)(params)
    except RuntimeError as exc:
        if "mutate a captured Tensor" not in str(exc):
            return  # not this check's concern: the estimation reports its own errors
        raise ValueError(
            f"MISCallback: {type(model).__name__}'s forward updates a tensor it holds in place (a buffer or "
            "an attribute, e.g. a counter) even in eval mode, which the per-sample gradients (torch.func) "
            "cannot differentiate through: update it in training mode only (if self.training: ...) or "
            "outside forward") from exc


def _shapes(tree: Any) -> str:
    leaves = [list(t.shape) for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, Tensor)]
    return str(leaves[0]) if len(leaves) == 1 else str(leaves)


def check_picklable(user: dict[str, Any]) -> None:
    """Raise, naming the argument, if a user object the callback holds cannot be pickled.

    ``strategy="ddp_spawn"`` (and any launcher that starts processes with ``spawn``) pickles
    the callback before any hook runs; a lambda or a local function as ``loss_fn`` would fail
    there with a bare ``Can't pickle local object``.

    Raises:
        pickle.PicklingError: ``user[arg]`` cannot be pickled (the message names ``arg``).
    """
    for arg, obj in user.items():
        if obj is None:
            continue
        why = unpicklable(obj)
        if why is not None:
            raise pickle.PicklingError(
                f"MISCallback: {arg}={callable_name(obj)} cannot be pickled ({why}), which a "
                f"strategy that spawns processes (e.g. strategy='ddp_spawn') needs: define it as "
                f"a module-level function (def {arg.split('[')[0]}(...): ... at the top level "
                f"of an importable module), not a lambda or a local function")


class PicklingChecked:
    """Mixin: ``__getstate__`` checks the objects of ``_user_objects()`` (see
    :func:`check_picklable`); shallow and deep copies need no check (lambdas copy fine).

    Raises:
        pickle.PicklingError: on pickling, naming the argument that cannot be pickled.
    """

    def _user_objects(self) -> dict[str, Any]:
        return {}

    def __getstate__(self) -> dict[str, Any]:
        check_picklable(self._user_objects())
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __copy__(self) -> Any:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


def has_validation_source(trainer: Any) -> bool | None:
    """Whether the fit will have validation data (at ``setup``, before any loader is built):
    a loader passed to ``fit`` or a ``val_dataloader`` hook of the module or datamodule, and
    ``limit_val_batches`` not 0; None where the Trainer's layout is not one this reads."""
    if getattr(trainer, "limit_val_batches", 1) == 0:
        return False
    try:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        return bool(source.is_defined()) and source.instance is not None
    except Exception:  # noqa: BLE001 - another Lightning layout: left to the end of fit
        return None


def runs_validation(trainer: Any, pl_module: Any) -> bool | None:
    """Whether the fit will run validation epochs (at ``setup``): validation data
    (:func:`has_validation_source`) and a ``validation_step`` of the module's own, without which
    Lightning skips the validation loop; None where the Trainer's layout is not one this reads."""
    base = next((c for c in type(pl_module).__mro__ if c.__name__ == "LightningModule"), None)
    if base is not None and getattr(type(pl_module), "validation_step", None) is getattr(base, "validation_step", None):
        return False
    return has_validation_source(trainer)


def _validation_dataloaders(trainer: Any) -> Any:
    """The Trainer's validation loaders, set up by its validation loop when the fit never ran it
    (a checkpoint resumed after its last epoch, with no sanity check: a user was warned "no
    validation dataloader" although one was passed), or read from their source when the loop
    never runs (a module without ``validation_step``); None when there are none."""
    loaders = trainer.val_dataloaders
    if loaders is None and getattr(trainer, "limit_val_batches", 1) != 0:
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        except Exception:  # noqa: BLE001 - no validation source (or another loop layout): none
            loaders = None
        if loaders is None:
            # a module without validation_step: Lightning skips its validation loop and builds no
            # loader from the data it was given, whose utility figures were then silently missing
            try:
                source = trainer.fit_loop.epoch_loop.val_loop._data_source
                if source.is_defined() and source.instance is not None:
                    loaders = source.dataloader()
            except Exception:  # noqa: BLE001 - no validation source (or another loop layout): none
                loaders = None
    return loaders


def estimation_start_line(mode: str, pending: bool, d: int, n: int | None, world: int) -> str:
    """The callback's first line: what the estimation pass runs (``mode``: ``"exact"`` or
    ``"diagonal"``, method.md section 4), for how many assessed weights ``d`` and training
    records ``n`` (``None``: not known before the pass, e.g. an iterable dataset), over ``world``
    processes, in one sentence. ``pending``: ``"auto"`` still waits for the first batch, which
    measures the model's cost and may switch to a cheaper estimator (a model that reuses its
    weights within a record: a convolution, a Linear over atoms or positions)."""
    records = f"{n:,} training records" if n is not None else "the training records"
    procs = "1 process" if world == 1 else f"{world:,} processes"
    line = f"MISCallback: estimation pass over {records} ({procs}) for {d:,} assessed weights with the {mode} sandwich"
    if pending:
        # the layer types alone do not show weight reuse: the first batch does (MomentAccumulator._update)
        line += ("; the first batch measures the model's cost and, if that is high, switches to a cheaper estimator "
                 "(the diagonal sandwich, or for a piecewise-linear CNN a cheaper exact Hessian)")
    return line


def assess_on_trainer(trainer: Any, pl_module: Any, schemes: list[Any], estimation_config: EstimationConfig,
                      scoring_config: ScoringConfig, resolved: dict[str, Any], *, batch_fn: Any = None,
                      batch_size: int | None = None, metrics: Mapping[str, Any] | None = None,
                      output_transform: Any = None, keep: dict[str, Any] | None = None,
                      full_pass: bool = False, read: int | None = None,
                      eval_in_training: list[str] | None = None,
                      stream_passes: StreamPasses | None = None,
                      train_in_validation: Sequence[str] | None = None) -> Report:
    """The pipeline on a Trainer's data: the estimation pass over this process's unpadded shard
    of ``trainer.train_dataloader.dataset`` (indices ``rank, rank + world, ...``; states synced
    over processes by :class:`~mis_lightning.streaming.EstimationMetric`), then
    :func:`~mis_lightning.assess.score_schemes` with each quantized copy's utility over the
    whole validation set on rank 0 (:func:`~mis_lightning.evaluation.evaluate_utility`).
    Progress renders with :class:`~mis_lightning.progress.ProgressDisplay` where the Trainer
    shows a progress bar (rank 0).

    ``keep``, when given, receives the ``estimate``, the estimation ``loader`` and the
    ``utility_fn`` (the planner reuses them: ``MISCallback(plan=...)``). ``full_pass``: the
    training has read its loader to the end at least once; ``read``: the most batches one pass
    has read from its start (:func:`trained_batches`). ``eval_in_training``: the
    :func:`~mis_lightning.assess.mode_dependent_modules` the last training batch ran in eval mode
    (``None``: no batch seen), as ``diagnostics["eval_mode_in_training"]``. ``stream_passes``: the
    batches the training passes over an iterable dataset read (the callback's :class:`StreamPasses`; ``None``
    or empty: not known): under an integer ``limit_train_batches``, where they or the batches assessed differ
    in values no hook draws at random, the batches assessed are not the records trained on, which the report
    says and marks (``diagnostics["stream_records_differ"]``), or the same records at another draw of their
    augmented values, which it says (:class:`StreamCheck`). ``train_in_validation``: the
    mode-dependent layers the last validation ran in train mode (Monte Carlo dropout): the report
    says the utility is the eval-mode model's (:func:`eval_mode_utility_note`). Under DDP each of these
    observations of a process's own batches is the world's (:func:`world_union`): every process's report
    says and marks what any one saw.

    Raises:
        RuntimeError: the trainer has no training dataloader.
        ValueError: several training loaders, or the estimation's own errors.
    """
    hook, world, rank = resolved["hook"], int(trainer.world_size), int(trainer.global_rank)
    train = single_loader(trainer.train_dataloader, "training")
    if train is None:
        # limit_train_batches=0: Lightning builds no loader and trains nothing; say so (nu41: the
        # bare "no training dataloader" read as a missing loader that had been given)
        why = (" (limit_train_batches=0: Lightning built none and ran no training step)"
               if getattr(trainer, "limit_train_batches", None) == 0 else "")
        raise RuntimeError(f"the trainer has no training dataloader{why}: there are no training records "
                           "to assess; to assess a model without training it, call "
                           "mis_lightning.assess(model, schemes, train_loader, loss_fn)")
    ds = sized_dataset(train)
    if map_items(train) is None and world > 1:
        rank_zero_warn("MISCallback: the training data is not a sized map-style dataset; under DDP "
                       "each process streams its own loader and duplicated records count twice")
    cut: dict[str, Any] = {}
    records, note = training_records(trainer, train, full_pass, read, cut)
    # a shuffled loader cut to its first batches: records it never read are assessed (dd59)
    unread = unread_note(trainer, cut["limit"], cut["batches"], cut["what"]) if cut else None
    shard = records[rank::world] if records is not None else None
    # random augmentation in __getitem__ or the collate_fn: each record is assessed at one draw (a few records
    # read twice, every random state restored); a stream cannot be read twice: not checked
    aug = random_records_note(ds, records, collate_fn=getattr(train, "collate_fn", None)) \
        if ds is not None and records else None
    limit, what = trained_batches(trainer, full_pass, read)
    loader = reloader(train, shard, batch_size, limit=limit)
    # a stream cut by limit_train_batches whose passes, or the pass assessed, read other batches (it reshuffles
    # or draws anew each pass): the batches assessed are not the records trained on (nu57: 47 of the 192 records
    # assessed never trained on, said only as "when each pass yields the same records first"; nu58: after one
    # epoch, 121 of 192), unless only values a hook or the dataset draws at random differ; every batch the
    # estimation reads is compared as it is read (dd59: batches after the first, an uncopyable stream)
    check = StreamCheck(trainer, stream_passes, next(pl_module.parameters()).device,
                        bool(getattr(loader.loader, "_mis_private", False))) \
        if isinstance(loader, _FirstBatches) and stream_passes is not None and stream_passes.first else None
    val, num_val = validation_loaders(_validation_dataloaders(trainer))
    val_loader = _Converted(reloader(val, None, None), trainer, next(pl_module.parameters()).device) \
        if val is not None else None
    # the records of every process: "auto" weighs the exact sandwich's cost by it, as assess does
    # (None for items that are whole batches: their records are counted as they are read)
    n_total = None if ds is None else (len(records) if records is not None else len(ds))
    def new_metric() -> EstimationMetric:
        return EstimationMetric(pl_module, None if hook else resolved["loss_fn"], seed=scoring_config.seed,
                                estimation_config=estimation_config, batch_fn=None if hook else batch_fn,
                                num_training_records=n_total)

    metric = new_metric()
    rank_zero_info(estimation_start_line(metric.mode, metric.accumulator.choice_pending, metric.accumulator.d,
                                         n_total, world))
    if items_are_batches(train) and "auto" in (estimation_config.mode, estimation_config.hessian):
        rank_zero_warn(f"MISCallback: the training loader {UNKNOWN_RECORDS_SOURCE}; estimation='auto' assumes "
                       f"{N_ASSUMED:,} training records to choose its estimator (the report says whether the "
                       "records read give the same choice)")
    batch_loss = (lambda m, b: getattr(m, HOOK_NAME)(b)) if hook else None

    def utility_fn(qmodel: nn.Module) -> dict[str, float]:
        if val_loader is None or not trainer.is_global_zero:
            return {}
        return evaluate_utility(qmodel, val_loader, resolved["loss_fn"], metrics, batch_loss=batch_loss,
                                batch_fn=None if hook else batch_fn, output_transform=output_transform)

    pb = getattr(trainer, "progress_bar_callback", None)
    shown = pb is not None and trainer.is_global_zero and not getattr(pb, "is_disabled", False)
    device = next(pl_module.parameters()).device
    total = len(shard) if shard is not None and ds is not None else None
    with ProgressDisplay({"estimation": total, "schemes": len(schemes)}, enabled=shown) as show:
        # consecutive batches merged for the estimation pass (the same sums, fewer per-batch costs)
        def read(met: EstimationMetric, checked: StreamCheck | None = None) -> None:
            done = 0
            batches = (trainer_batch(trainer, batch, device) for batch in (checked.batches(loader) if checked else loader))
            for batch, rows in merge_batches(batches, lambda: met.accumulator.records_per_update):
                met.update(batch)
                done += rows or getattr(loader, "batch_size", None) or 1
                show("estimation", done if total is None else min(done, total))

        read(metric, check)  # the stream check on the first read (a re-read reads the same records)
        if world > 1 and "auto" in (estimation_config.mode, estimation_config.hessian):
            # "auto"'s first-batch choices from every process's first batches, as one process reading
            # them all makes them (uneven or masked shards chose apart: refused at the sync before)
            def reread(choice: dict[str, Any]) -> None:
                nonlocal metric, loader
                # a fresh loader: over an iterable dataset the first one is a private copy whose pass
                # state (an epoch counter reshuffling, a cursor) the first read moved, so reading it again
                # gave other records, cut to the first `limit` batches (rv56d); a fresh copy gives the first's
                loader = reloader(train, shard, batch_size, limit=limit)
                # the first pass's Metric freed before the new one is built: it sits in reference cycles
                # (torchmetrics' wrappers, the programs' hooks) with its private model copies and sums
                # (exact: [d, d]), which only a collection frees (rv56d: both were held through the re-read)
                metric = None  # type: ignore[assignment]
                gc.collect()
                metric = new_metric()
                force_choice(metric.accumulator, choice)
                read(metric)

            agree_on_choice(metric.accumulator, not metric._fresh, gather_objects, reread)
        est = metric.estimate()
        found = check.note(train, limit, what) if check is not None else None
        # what each process saw of its own batches, the world's (dd59: a stream that reshuffles on one process
        # only left process 0's written report unmarked)
        seen = world_union(trainer, {
            "stream_records_differ": found[0] if found and found[1] else None,
            "stream_values_differ": found[0] if found and not found[1] else None,
            "augmented_records": aug, "eval_mode_in_training": None if eval_in_training is None else list(eval_in_training),
            "eval_mode_utility": eval_mode_utility_note(train_in_validation)
            if val_loader is not None and train_in_validation else None})
        reshuffled = seen["stream_records_differ"] is not None or unread is not None
        if isinstance(loader, _FirstBatches) and not reshuffled:
            note = "; ".join(x for x in (note, f"{what}: the first {limit} batches of the iterable training data are "
                                               "assessed (the records trained on when each pass yields the same "
                                               "records first)") if x)
        # the records are the trainer's training records: "records not trained on" cannot be the cause
        # of a stiff offset here (nux51 #2: said of the 600 records a tied LM was trained on)
        est.diagnostics["records_from_training_loader"] = not reshuffled
        if reshuffled:
            est.diagnostics["stream_records_differ"] = True
        if seen["eval_mode_in_training"] is not None:  # how the training ran its mode-dependent layers (ux54c)
            est.diagnostics["eval_mode_in_training"] = seen["eval_mode_in_training"]
        if items_are_batches(train):  # the report states the count "auto" assumed
            note_unknown_records(est, metric.accumulator, f"the training loader {UNKNOWN_RECORDS_SOURCE}")
        # metrics= only for their directions (report.utility_modes); utility_fn measures them
        report = score_schemes(est, pl_module, schemes, scoring_config=scoring_config, metrics=metrics,
                               utility_fn=utility_fn, progress=show, calibration_data=loader)
    if world > 1 and val_loader is not None:
        # the utility is measured on rank 0; every rank logs the same figures (a checkpoint or
        # early-stopping callback monitoring mis/<scheme>/utility/... reads them on each rank)
        utility = trainer.strategy.broadcast({k: dict(r.utility) for k, r in report.schemes.items()}, src=0)
        for k, r in report.schemes.items():
            r.utility = dict(utility.get(k, {}))
    if keep is not None:
        keep.update(estimate=est, loader=loader, utility_fn=utility_fn if val_loader is not None else None)
    # n = the records read over every process, against the records the training draws from (the same
    # indices, so they differ only where a collate_fn or hook changes the count, or a sync failed)
    counted = records_read_note(records_read(est), n_total, "the records the training draws from", causes=(
        "the collate_fn, batch_fn or loss hook returned another number of records than the loader's items"
        + (f", or the {world} processes' records were not summed" if world > 1 else "")))
    if counted:
        report.warnings.insert(0, counted)
    if note:
        report.warnings.append(note)
    if unread:
        report.warnings.append(unread)
    report.warnings.extend(seen[k] for k in ("stream_records_differ", "stream_values_differ", "augmented_records",
                                             "eval_mode_utility") if seen[k])
    if val_loader is None:
        report.warnings.append(NO_VALIDATION_WARNING)
    elif num_val > 1:
        report.warnings.append(f"{num_val} validation dataloaders: the quantized copies' utility is measured "
                               "on the first (dataloader_idx 0)")
    return report


def world_union(trainer: Any, local: Mapping[str, Any]) -> dict[str, Any]:
    """Observations each process makes of its own batches (the callback's stream check, loss match, ...)
    made the world's, so that every process's report says the same and marks what any one saw: under DDP
    (``trainer.world_size`` > 1 and a process group open) every process's ``local`` is gathered (one
    collective: every process calls it at the same point) and, for each key, a note (a string) is the
    first one set in rank order, followed by the processes that made it where not every one did; a list
    is the union of theirs in order (None where none is set). One process: ``local`` as it is. A value
    may be a function of no argument, called here: one that raises on a process raises there after the
    gather (the others are not left waiting in it)."""
    failed: Exception | None = None

    def value(v: Any) -> Any:
        nonlocal failed
        if not callable(v):
            return v
        try:
            return v()
        except Exception as exc:  # noqa: BLE001 - raised after the gather
            failed = failed or exc
            return None

    local = {k: value(v) for k, v in local.items()}
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        if failed is not None:
            raise failed
        return local
    every = gather_objects(local)
    if failed is not None:
        raise failed
    out: dict[str, Any] = {}
    for key, mine in local.items():
        held = [(r, v.get(key)) for r, v in enumerate(every) if isinstance(v, Mapping) and v.get(key) is not None]
        if not held:
            out[key] = None
        elif isinstance(mine, (list, tuple)) or isinstance(held[0][1], (list, tuple)):
            out[key] = list(dict.fromkeys(x for _, v in held for x in v))
        else:
            seen = [r for r, v in held if v]
            text = next((v for _, v in held if v), held[0][1])
            if isinstance(text, str) and 0 < len(seen) < world:
                text += (f" (seen by process{'es' if len(seen) > 1 else ''} {', '.join(map(str, seen))} of {world}: "
                         "each process checks its own batches, and every process's report carries what any saw)")
            out[key] = text
    return out


def eval_mode_utility_note(layers: Sequence[str]) -> str:
    """The report's line where the validation loop ran ``layers`` (dropout, running-statistics
    normalisation) in train mode, as Monte Carlo dropout does: every utility figure is the quantized
    copy's in eval mode (:func:`~mis_lightning.evaluation.evaluate_utility`), deterministic, not the
    figure the validation logs (docs/benchmarks.md "nu58", Dropout(0.3): eval-mode loss 0.501; the validation's, dropout
    on, 0.507-0.561 over 20 draws; the 20-draw averaged prediction's 0.509)."""
    shown = name_list([repr(n) for n in layers], 3)
    return (f"utility measured in eval mode: the validation loop ran {shown} in train mode (Monte Carlo dropout, "
            "e.g. kept on by on_validation_model_eval), while each scheme's utility here is its quantized copy's "
            "in eval mode (dropout off, running statistics used), one deterministic prediction per record: it is "
            "not comparable with the metrics the validation logs; to weigh the schemes by the Monte Carlo "
            "prediction, measure each quantized copy with dropout on (mis_lightning.assess.score_schemes takes a "
            "utility_fn(quantized_copy) -> {name: value})")


def bind_callback(impl: type, base: type, name: str, package: str) -> type:
    """``impl`` bound to a Lightning ``Callback`` base class of another distribution (a class
    named ``name`` in :mod:`mis_lightning.callback`)."""
    return type(name, (impl, base), {
        "__module__": "mis_lightning.callback", "__qualname__": name,
        "__doc__": f"MISCallback for ``{package}.pytorch.Trainer`` (same arguments).",
        "_lightning_package": package})


def check_trainer_package(ours: str, trainer: Any) -> None:
    """Raises TypeError (naming the fix) when the Trainer is of the other Lightning distribution."""
    theirs = trainer_package(trainer)
    if theirs in ("pytorch_lightning", "lightning") and theirs != ours:
        fix = ("mis_lightning.callback.lightning_callback(...)" if theirs == "lightning"
               else "mis_lightning.MISCallback(...)")
        raise TypeError(f"this MISCallback is a {ours} callback but the Trainer comes from {theirs}: use {fix}")


def report_dir(trainer: Any, dirpath: str | Path | None) -> Path:
    """``dirpath``, else the checkpoint callback's ``dirpath``, else the run's folder in an MLflow
    ``file:`` store (:func:`mlflow_run_dir`) or a W&B run's files folder (:func:`wandb_run_dir`),
    else ``trainer.log_dir``, else ``trainer.default_root_dir``. Call it on every process:
    ``trainer.log_dir`` and the runs' names and folders are broadcasts."""
    cb = getattr(trainer, "checkpoint_callback", None)
    return Path(dirpath or getattr(cb, "dirpath", None) or mlflow_run_dir(trainer) or wandb_run_dir(trainer)
                or getattr(trainer, "log_dir", None) or trainer.default_root_dir)


def _first_wandb_logger(trainer: Any) -> Any | None:
    """The Trainer's first logger where it is a W&B logger (Lightning's ``WandbLogger``, either
    package, or a subclass), else ``None``."""
    logger = next(iter(getattr(trainer, "loggers", None) or []), None)
    return logger if any(c.__name__ == "WandbLogger" for c in type(logger).__mro__) else None


def wandb_run_dir(trainer: Any) -> Path | None:
    """The W&B run's files folder (``run.dir``: ``<save_dir>/wandb/<run>/files``, online or offline)
    where the Trainer's first logger is a W&B logger, else ``None``. Lightning's ``trainer.log_dir``
    is then the logger's ``save_dir``, the root that holds every run (the report went there,
    beside W&B's own ``wandb/`` folder); this is the run's own folder, whose files W&B uploads with
    the run (``wandb sync`` offline), where :func:`~mis_lightning.tracking.log_files` puts its copy.
    Only rank 0 has the run (``rank_zero_experiment``): its folder is broadcast."""
    logger = _first_wandb_logger(trainer)
    if logger is None:
        return None
    run_dir = getattr(logger.experiment, "dir", None) if getattr(trainer, "is_global_zero", True) else None
    run_dir = trainer.strategy.broadcast(run_dir if isinstance(run_dir, str) else None)
    return Path(run_dir) if run_dir else None


def mlflow_run_dir(trainer: Any) -> Path | None:
    """``<store>/<experiment id>/<run id>`` where the Trainer's first logger is an MLflow logger with
    a ``file:`` store, else ``None``. Lightning's ``trainer.log_dir`` is then the store's root (the
    ``save_dir`` of a logger other than TensorBoard's or CSV's), which holds every experiment's runs:
    the report went there, unannounced, where nothing was checkpointed. This is the run's own
    folder, where ``ModelCheckpoint`` puts its ``checkpoints/`` (``save_dir/name/version``). A database
    store has no ``save_dir``: ``None``, and the report goes to ``default_root_dir``, said at the
    start of fit (:func:`root_dir_note`). Only rank 0 has the run (``rank_zero_experiment``): its names
    are broadcast, as ``ModelCheckpoint``'s folder is."""
    logger = next(iter(getattr(trainer, "loggers", None) or []), None)
    # the class's attribute: reading the instance's run_id would start the run
    if logger is None or not hasattr(type(logger), "run_id") or getattr(logger, "save_dir", None) is None:
        return None
    name, version = trainer.strategy.broadcast((logger.name, logger.version))
    return Path(logger.save_dir) / str(name) / str(version)


def root_dir_note(trainer: Any, dirpath: str | Path | None) -> str | None:
    """The console line naming the folder of the callback's files where the user named none: no
    ``dirpath`` and no checkpoint callback, and no logger folder other than the Trainer's
    ``default_root_dir`` (the working directory unless set): no logger, where Lightning's own
    ``log_dir`` is then that folder and its profilers write, or a logger whose ``save_dir`` is it
    or that has none (an MLflow logger with a database store), where :func:`report_dir` falls back to
    it (a W&B logger's files go to its run's folder, :func:`wandb_run_dir`) (``logger=False`` wrote ``mis_report.json`` there
    unannounced). ``None`` where another folder applies, or under ``fast_dev_run`` (nothing is written).
    Call it on every process: it reads ``trainer.log_dir``, a broadcast."""
    if (dirpath is not None or getattr(trainer, "checkpoint_callback", None) is not None
            or getattr(trainer, "fast_dev_run", False) or _first_wandb_logger(trainer) is not None):
        return None  # a W&B run's own folder applies (wandb_run_dir)
    root = Path(trainer.default_root_dir).resolve()
    if Path(getattr(trainer, "log_dir", None) or root).resolve() != root:
        return None
    return (f"MISCallback: no dirpath=, checkpointing or logger folder: the report and figure go to the Trainer's "
            f"default_root_dir, {root} (where a file there has their name, this fit's get -v1, ...; "
            "dirpath= or Trainer(default_root_dir=) chooses the folder)")


def check_callback_args(every_n_val_epochs: Any, loss_fn: Any, *, estimation_batch_size: Any = None,
                        utility_metrics: Mapping[str, Any] | None = None, dirpath: Any = None,
                        prefix: Any = "mis", batch_fn: Any = None, output_transform: Any = None) -> None:
    """The callback's own arguments (the stage options are checked by their configs), at
    construction: a mistake here would otherwise surface only after the whole training.

    Raises:
        ValueError: ``every_n_val_epochs`` or ``estimation_batch_size`` is neither None nor an
            integer >= 1; ``dirpath`` is an existing file.
        TypeError: ``loss_fn``, ``batch_fn`` or ``output_transform`` is not callable, a ``utility_metrics`` value is not a
            torchmetrics ``Metric`` / ``MetricCollection`` (names the key), ``prefix`` is not a string.
    """
    from torchmetrics import Metric, MetricCollection

    for name, n in (("every_n_val_epochs", every_n_val_epochs), ("estimation_batch_size", estimation_batch_size)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n or n < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {n!r}")
    check_user_functions(loss_fn=loss_fn, batch_fn=batch_fn, output_transform=output_transform)
    if utility_metrics is not None and not isinstance(utility_metrics, Mapping):
        raise TypeError(f"utility_metrics must be a mapping {{name: torchmetrics Metric}} (e.g. "
                        f"{{'mae': torchmetrics.MeanAbsoluteError()}}), got {type(utility_metrics).__name__}")
    for key, m in (utility_metrics or {}).items():
        if not isinstance(m, (Metric, MetricCollection)):
            raise TypeError(f"utility_metrics[{key!r}] must be a torchmetrics Metric (e.g. "
                            f"torchmetrics.MeanAbsoluteError()), got {type(m).__name__}")
    if dirpath is not None and Path(dirpath).exists() and not Path(dirpath).is_dir():
        raise ValueError(f"dirpath {str(dirpath)!r} is an existing file, not a directory")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string (the loggers' key prefix; '' for none), got {type(prefix).__name__}")


class RunHistory:
    """Mixin: what the callback remembers of its runs, checkpointed by Lightning
    (``state_dict``/``load_state_dict``) and keyed by the schemes and the prefix.

    Raises:
        Nothing.
    """

    schemes: list[Any]
    prefix: str

    def _reset_run_state(self) -> None:
        """Forget the previous fit's results (one callback object may serve several Trainers)."""
        self.report: Report | None = None
        self.report_path = self.figure_path = self.last_error = self._last_step = self._resolved = None
        self._last_weights: str | None = None  # digest of the weights the last run assessed
        self.history: list[dict[str, Any]] = []
        self._val_epochs = 0

    @property
    def state_key(self) -> str:
        names = [s if isinstance(s, str) else s.name for s in self.schemes]
        return self._generate_state_key(schemes=names, prefix=self.prefix)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs": self._val_epochs, "last_step": self._last_step,
                "history": list(self.history), "last_error": self.last_error}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if getattr(self, "_stage", None) not in (None, "fit"):
            # trainer.validate/test/predict(ckpt_path=...) restores callback states too: the
            # checkpoint's runs are older than this callback's (its fit_end run would vanish
            # from the history while the report stayed)
            return
        self._state_loaded = True  # a state loaded by hand before fit survives the next setup
        self._val_epochs = int(state_dict.get("val_epochs", 0))
        self._last_step = state_dict.get("last_step")
        self.history = list(state_dict.get("history", []))
        self.last_error = state_dict.get("last_error")

    @property
    def last_summary(self) -> dict[str, Any] | None:
        """The most recent run's ``{scheme: {leakage, mis, d_eff}}`` (also after a resume)."""
        return self.history[-1]["summary"] if self.history else None

