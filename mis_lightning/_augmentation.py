"""Whether a map-style training dataset returns the same record each time it is read.

The assessment reads each training record once. A dataset that draws random augmentation in
``__getitem__`` (``torchvision`` transforms, noise, a random crop) returns another draw at each
read: training saw one draw per epoch, the assessment scores one more draw per record, not the
records trained on (leakage 0.182 on the augmented draws against 0.158 on the clean
records, with nothing in the report). :func:`random_records_note` reads a few records twice and
says so when they differ. It reads in this process, with every random state the reads can move
restored afterwards: the global streams (torch, ``random``, ``numpy``) and the generators the
dataset holds (``torch.Generator``, ``numpy`` ``Generator`` / ``RandomState``,
``random.Random``, found among its attributes, its transforms' and the datasets it wraps).
Streams (iterable datasets) are not read: a record cannot be read twice from a stream.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate
from torch.utils.data._utils.collate import default_convert

from ._rng import isolated_rng

__all__ = ["AUGMENTATION_RECORDS", "random_records_note"]

# records read twice (a transform that changes a record with probability 1/2, a flip, goes
# unseen with probability 2^-8); the reads stop early past AUGMENTATION_SECONDS (one at least)
AUGMENTATION_RECORDS = 8
AUGMENTATION_SECONDS = 0.5


def _held_generators(obj: Any, depth: int = 0, seen: set[int] | None = None,
                     found: list[Any] | None = None) -> list[Any]:
    """The random generators ``obj`` holds in its attributes, lists, tuples and dicts (four
    levels down: a dataset, its transform pipeline, each transform; a ``Subset`` or
    ``ConcatDataset`` and the datasets it wraps), each once. Tensors and arrays are not walked."""
    seen = set() if seen is None else seen
    found = [] if found is None else found
    if depth > 4 or id(obj) in seen or len(seen) > 2000:
        return found
    seen.add(id(obj))
    if isinstance(obj, (torch.Generator, random.Random)) or (
            type(obj).__name__ in ("Generator", "RandomState") and type(obj).__module__.startswith("numpy")):
        found.append(obj)
        return found
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, type)) or type(obj).__module__.startswith("numpy"):
        return found
    if isinstance(obj, Mapping):
        items: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return found
    for v in list(items)[:200]:
        _held_generators(v, depth + 1, seen, found)
    return found


def _state(g: Any) -> Any:
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, random.Random):
        return g.getstate()
    if type(g).__name__ == "RandomState":
        return g.get_state()
    return g.bit_generator.state  # numpy.random.Generator


def _restore(g: Any, state: Any) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(state)
    elif isinstance(g, random.Random):
        g.setstate(state)
    elif type(g).__name__ == "RandomState":
        g.set_state(state)
    else:
        g.bit_generator.state = state


def _same(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether two reads of a record are equal: tensors and arrays bit for bit (NaN equal to
    NaN), containers element-wise, objects by their own ``==`` where their class defines one
    that answers a bool, else attribute by attribute (a plain class or a dataclass holding
    tensors); a value that cannot be compared counts as equal (nothing is claimed about it)."""
    if depth > 8:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if torch.equal(a, b):
            return True
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return False
    if type(a).__module__.startswith("numpy") and hasattr(a, "shape"):
        import numpy as np

        try:
            return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        except Exception:  # noqa: BLE001 - object arrays and the like
            return True
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, depth + 1) for x, y in zip(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, (float, complex)) and a != a and b != b:  # NaN
        return True
    if type(a).__eq__ is not object.__eq__:
        try:
            eq = a == b
            if isinstance(eq, bool):
                return eq
        except Exception:  # noqa: BLE001 - e.g. a dataclass comparing tensor fields: by attribute below
            pass
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return _same(vars(a), vars(b), depth + 1)
    return True  # an object compared by identity only, without attributes to compare: no claim


def random_records_note(dataset: Any, indices: Sequence[int], records: int = AUGMENTATION_RECORDS,
                        seconds: float = AUGMENTATION_SECONDS,
                        collate_fn: Callable[[list[Any]], Any] | None = None) -> str | None:
    """A note for the report when reading a record of ``dataset`` twice gives two different
    values (random augmentation in ``__getitem__``), else None.

    Reads ``dataset[i]`` twice for the first ``records`` of ``indices`` (fewer when the reads
    pass ``seconds`` of wall time; one record at least), in this process; when they agree and
    ``collate_fn`` is given (not torch's deterministic default), collates the records read
    twice and compares the batches. Every random state the reads can move is restored
    afterwards (module docstring); a read or collation that raises ends the check with no note
    (the assessment's own read reports it).

    Args:
        dataset: a map-style dataset (``dataset[i]``).
        indices: the records assessed, in the order to try them.
        records, seconds: the bound on the check's cost.
        collate_fn: the training loader's ``collate_fn`` (``None``: not checked).

    Returns:
        The note (names the first record that differed, or the collator, and what to do), or None.
    """
    if collate_fn is default_collate or collate_fn is default_convert:
        collate_fn = None  # torch's own: deterministic
    gens = _held_generators(dataset) + ([] if collate_fn is None else _held_generators(collate_fn))
    states = [(g, _state(g)) for g in gens]
    t0, differs = time.perf_counter(), None
    read: list[Any] = []
    try:
        with isolated_rng():
            for k, i in enumerate(indices[:records]):
                if k and time.perf_counter() - t0 > seconds:
                    break
                try:
                    first, second = dataset[i], dataset[i]
                except Exception:  # noqa: BLE001 - not this check's concern
                    return None
                if not _same(first, second):
                    differs = int(i)
                    break
                read.append(first)
            if differs is None and collate_fn is not None and read:
                try:
                    collated = collate_fn(list(read)), collate_fn(list(read))
                except Exception:  # noqa: BLE001 - not this check's concern
                    return None
                if not _same(*collated):
                    return _collate_note(collate_fn)
    finally:
        for g, s in states:
            try:
                _restore(g, s)
            except Exception:  # noqa: BLE001 - a generator that will not take its state back
                pass
    if differs is None:
        return None
    return (f"the training dataset {type(dataset).__name__} returns another value each time a record is read "
            f"(record {differs} read twice differs: random augmentation or other randomness in __getitem__): "
            "each record is assessed at one random draw, not as the records trained on (measured: leakage "
            "0.182 on augmented draws, 0.158 on the clean records); to assess the records themselves, assess over "
            "the dataset without its random transforms (mis_lightning.assess, or a MISIndicator updated on them)")


def _collate_note(collate_fn: Callable[..., Any]) -> str:
    name = getattr(collate_fn, "__name__", None) or type(collate_fn).__name__
    return (f"the training loader's collate_fn {name} returns another batch each time the same records are "
            "collated (randomness in the collator: random masking, MixUp, noise): each record is assessed at "
            "one random draw of it, not as trained on; to assess the records themselves, assess over a loader "
            "whose collate_fn is deterministic (mis_lightning.assess, or a MISIndicator updated on its batches)")
