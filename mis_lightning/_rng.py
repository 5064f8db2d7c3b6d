"""The caller's random states kept out of the library's own draws, on errors too.

The global streams Lightning's ``isolate_rng`` keeps (torch CPU, ``random``, ``numpy``; CUDA only
where CUDA is already initialised: reading its states would otherwise initialise it), saved and
restored by :func:`_isolate` without importing Lightning (the import cost ~1 s, and
``lightning_fabric.utilities.seed`` of lightning 2.6 has no ``isolate_rng``, so the fallback
``torch.random.fork_rng`` had kept the torch stream only). Lightning's restores the states on a
normal exit only: a block that raised (a failed scheme or assessment, caught and reported) left
the caller's streams advanced. :func:`isolated_rng` restores them either way, and with them the
generators of the caller's data loaders that the block iterates: a ``DataLoader(shuffle=True,
generator=g)`` draws its order (and its workers' base seed) from ``g``, not from the global
stream, so reading it would otherwise move the caller's next epoch. An iterable dataset keeps
such state in itself (a pass counter, a reshuffle, a generator it holds): it is read from a deep
copy (:func:`private_stream`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from ._user_warnings import warn as warn_user

__all__ = ["isolated_rng", "loader_generators", "private_stream", "restores_rng"]

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _isolate() -> Iterator[None]:
    """The global streams Lightning's ``isolate_rng`` keeps (torch CPU, CUDA where already
    initialised, ``numpy``, ``random``), saved and restored here: importing it loads
    lightning_fabric with torchmetrics, ~1 s CPU once per process that has not imported
    Lightning (a plain ``assess`` caller's: ~25 Adam epochs of the 1e5-weight benchmark MLP;
    docs/benchmarks.md, "pf29"). Restored on errors too (:func:`isolated_rng` re-raises after)."""
    include_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if include_cuda else None
    python_state = random.getstate()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        np = None
    numpy_state = np.random.get_state() if np is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if np is not None:
            np.random.set_state(numpy_state)
        random.setstate(python_state)


# False: isolated_rng(seed=) seeds through torch.manual_seed on every device (A/B benchmarks; the
# queued accelerator seeds below)
SEED_ISOLATED_ONLY = True


def _seed_global(seed: int) -> None:
    """Seed the global streams :func:`_isolate` restores: the CPU stream as ``torch.manual_seed``
    seeds it (``torch.default_generator``), and every CUDA device's where CUDA is initialised.

    ``torch.manual_seed`` would also *queue* the seed for each accelerator not initialised yet
    (CUDA, XPU, MTIA: a lazy call that holds ``traceback.format_stack()``, which reads the source
    file of every frame on the stack the first time: ~4 ms of a fresh process's first estimation,
    docs/benchmarks.md "p58a"). Such a queued seed is applied when the caller first initialises
    that device, after the block, where :func:`_isolate` cannot take it back: the caller's
    CUDA streams then started from the library's seed, and a ``torch.manual_seed`` of the
    caller's own queued before the call was replaced by it. The block draws from neither.
    Where MPS is built, XPU or MTIA is initialised, or a PrivateUse1 backend is registered (the
    library does not restore their streams either), or with :data:`SEED_ISOLATED_ONLY` False:
    ``torch.manual_seed(seed)`` as before. Raises as ``torch.manual_seed`` does (a seed out of range).
    """
    other = (torch.backends.mps.is_available() or any(_initialized(name) for name in ("xpu", "mtia"))
             or torch._C._get_privateuse1_backend_name() != "privateuseone")
    if not SEED_ISOLATED_ONLY or other:
        torch.manual_seed(seed)
        return
    seed = int(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    torch.default_generator.manual_seed(seed)


def _initialized(name: str) -> bool:
    """Whether the accelerator module ``torch.<name>`` is initialised (``False`` where this torch
    has no such module; ``True`` where it has no ``is_initialized``: :func:`_seed_global` then
    seeds through ``torch.manual_seed`` as before)."""
    mod = getattr(torch, name, None)
    check = getattr(mod, "is_initialized", None)
    return mod is not None and (check is None or bool(check()))


def loader_generators(*holders: Any) -> list[torch.Generator]:
    """Every ``torch.Generator`` that iterating ``holders`` can draw from, each once: a data
    loader's own (``generator=``), its sampler's, its batch sampler's and that one's sampler's;
    loaders in lists, tuples, dicts or a Lightning ``CombinedLoader`` (``.flattened``); a
    generator given directly. Anything else contributes nothing."""
    found: list[torch.Generator] = []
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if obj is None or depth > 4 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found.append(obj)
        elif isinstance(obj, Mapping):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth + 1)
        else:
            flat = getattr(obj, "flattened", None)  # Lightning's CombinedLoader
            if isinstance(flat, (list, tuple)):
                visit(flat, depth + 1)
            for attr in ("generator", "sampler", "batch_sampler"):
                try:
                    visit(getattr(obj, attr, None), depth + 1)
                except Exception:  # noqa: BLE001 - a property of the user's object that fails: nothing to save
                    continue

    for h in holders:
        visit(h, 0)
    return found


def _is_stream(loader: Any) -> bool:
    from torch.utils.data import DataLoader, IterableDataset

    return isinstance(loader, DataLoader) and isinstance(getattr(loader, "dataset", None), IterableDataset) \
        and not getattr(loader, "_mis_private", False)


@contextmanager
def isolated_rng(*loaders: Any, seed: int | None = None) -> Iterator[None]:
    """Run the block with the random states restored afterwards, whether it returns or raises
    (the exception is re-raised once the states are back): the global streams and the
    generators of ``loaders`` (:func:`loader_generators`).

    Args:
        loaders: data loaders (or generators) the block iterates.
        seed: seed the global torch stream and those generators with it for the block, so
            that the block draws the same batches every time (calibration).
    """
    gens = loader_generators(*loaders)
    states = [(g, g.get_state()) for g in gens]
    error: BaseException | None = None
    with _isolate():
        try:
            if seed is not None:
                _seed_global(seed)
                for g in gens:
                    g.manual_seed(seed)
            yield
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error = exc
        finally:
            for g, state in states:
                g.set_state(state)
    if error is not None:
        raise error


def _shareable(obj: Any) -> bool:
    """A ``numpy.memmap`` (file-backed data: a deep copy would read the whole file into memory)
    or a read-only numpy array: iterating a dataset cannot change either in place, so its
    private copy may share them. Everything else (tensors, writeable arrays: an index order
    shuffled in place) is copied."""
    if not type(obj).__module__.startswith("numpy") or not hasattr(obj, "flags"):
        return False
    return type(obj).__name__ == "memmap" or not bool(obj.flags.writeable)


def _shared_arrays(obj: Any, memo: dict[int, Any], depth: int = 0) -> None:
    """Put the shareable arrays (:func:`_shareable`) reachable from ``obj``'s attributes,
    lists, tuples and dicts into ``memo``: ``deepcopy`` then keeps them shared."""
    if depth > 4 or id(obj) in memo or isinstance(obj, torch.Tensor):
        return
    if _shareable(obj):
        memo[id(obj)] = obj
        return
    if type(obj).__module__.startswith("numpy"):
        return
    if isinstance(obj, Mapping):
        items: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = vars(obj).values()
    else:
        return
    for v in items:
        _shared_arrays(v, memo, depth + 1)


def private_stream(loader: Any, warn: Callable[[str], None] | None = None) -> Any:
    """A single-process ``DataLoader`` over a deep copy of ``loader``'s iterable dataset (same
    batch size, ``drop_last`` and ``collate_fn``): iterating it leaves the caller's dataset as
    it was (its next pass, or the next ``fit``, sees the batches it would have). Memory maps
    and read-only arrays are shared rather than copied; everything else is copied, in-memory
    data included (an ``__iter__`` may shuffle an index array in place). ``loader`` itself for
    anything else (map-style datasets: their order lives in the loader's generators,
    :func:`isolated_rng`), and, with a warning (``warn``, default ``warnings.warn``), for a
    dataset that cannot be copied (an open file or stream)."""
    from torch.utils.data import DataLoader

    ds = getattr(loader, "dataset", None)
    if not _is_stream(loader):
        return loader
    memo: dict[int, Any] = {}
    _shared_arrays(ds, memo)
    try:
        private = copy.deepcopy(ds, memo)
    except Exception as exc:  # noqa: BLE001 - e.g. an open file handle: read the caller's own
        msg = (f"the iterable dataset {type(ds).__name__} cannot be copied ({type(exc).__name__}: {exc}): it is "
               "read itself, which advances whatever state its iterator keeps (a pass counter, a shuffle) "
               "as one more pass would")
        (warn or warn_user)(msg)
        return loader
    out = DataLoader(private, batch_size=loader.batch_size, drop_last=loader.drop_last,
                     collate_fn=loader.collate_fn, num_workers=0)
    out._mis_private = True  # type: ignore[attr-defined]  # a nested entry point does not copy it again
    return out


def restores_rng(*loader_args: str) -> Callable[[F], F]:
    """Decorate a public entry point that reads the caller's data: the call runs inside
    :func:`isolated_rng` of the loaders passed as ``loader_args`` (argument names), so the
    caller's streams and loaders come back as they were (iterating a ``DataLoader`` draws
    its workers' base seed, and a shuffled one its order, from them); a loader over an
    iterable dataset is replaced by one over a copy of it (:func:`private_stream`)."""
    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                ba = sig.bind_partial(*args, **kwargs)
            except TypeError:  # the call itself raises its own clear TypeError below
                ba = None
            bound = {} if ba is None else ba.arguments
            with isolated_rng(*(bound.get(a) for a in loader_args)):
                copies: dict[int, Any] = {}  # the same loader passed twice is copied once
                for a in loader_args:
                    v = bound.get(a)
                    if _is_stream(v):
                        if id(v) not in copies:
                            copies[id(v)] = private_stream(v)
                        bound[a] = copies[id(v)]
                if copies:
                    return fn(*ba.args, **ba.kwargs)  # type: ignore[union-attr]
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
