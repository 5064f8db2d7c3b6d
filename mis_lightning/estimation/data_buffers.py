"""Buffers a forward sets from the records it sees: released with the weights, not scored.

A normalisation layer's running statistics are one such channel (found by type:
``assess._running_statistics_layers``). Others are buffers of the user's own modules: an input
standardiser keeping a running mean and variance (as reinforcement-learning and tabular
normalisers do), an exponential average of activations, a cache of the last batch. They are
computed from the training records, saved in the state dict, and leak membership as the running
statistics do (docs/method.md section 6), but nothing in a module's type says so. This module
tells them by what they do: two private copies of the model run one train-mode forward each, on
two disjoint halves of a training batch, from the same random state; a persistent floating
buffer whose values then differ was set from the records (a constant table, a positional
encoding, a step counter or ``spectral_norm``'s power-iteration vectors, which depend on the
weights only, come out equal and are not named).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._pytree import tree_leaves, tree_map

from .._modelcopy import ModelCopyError, private_copy
from .._rng import isolated_rng

__all__ = ["data_dependent_buffers", "persistent_float_buffers", "probe_data_buffers"]


def persistent_float_buffers(model: nn.Module) -> list[str]:
    """Names of the floating tensors the state dict saves that training does not fit by
    gradient, outside normalisation layers (whose running statistics are reported by type):
    persistent buffers (as ``model.named_buffers()`` names them) and frozen parameters
    (``requires_grad=False``, as ``named_parameters`` names them: running statistics kept as
    ``nn.Parameter(..., requires_grad=False)`` are released the same way)."""
    out: list[str] = []
    seen: set[int] = set()
    for fqn, module in model.named_modules():
        if isinstance(module, _NormBase):
            continue
        frozen = {k: p for k, p in module._parameters.items() if p is not None and not p.requires_grad}
        for name, b in [*module._buffers.items(), *frozen.items()]:
            if b is None or not b.is_floating_point() or name in module._non_persistent_buffers_set \
                    or id(b) in seen:
                continue
            seen.add(id(b))
            out.append(f"{fqn}.{name}" if fqn else name)
    return out


def _rows(inputs: Any, a: int, b: int) -> Any:
    return tree_map(lambda t: t[a:b] if isinstance(t, Tensor) and t.dim() else t, inputs)


def data_dependent_buffers(model: nn.Module, inputs: Any, batch_size: int,
                           call: Callable[[nn.Module, Any], Any] | None = None,
                           dtype: torch.dtype | None = None) -> list[str]:
    """The names :func:`probe_data_buffers` finds (``[]`` also where it could not run)."""
    return probe_data_buffers(model, inputs, batch_size, call, dtype)[0]


def probe_data_buffers(model: nn.Module, inputs: Any, batch_size: int,
                       call: Callable[[nn.Module, Any], Any] | None = None,
                       dtype: torch.dtype | None = None) -> tuple[list[str], dict[str, Any] | None]:
    """The persistent floating buffers and frozen parameters of ``model`` (outside
    normalisation layers, :func:`persistent_float_buffers`) that one train-mode forward sets from
    the records: they differ after a forward on the first half of
    ``inputs`` and one on the second half, each on a private copy from the same random state.

    Args:
        model: the model (never modified: its copies run).
        inputs: one batch of model inputs, records along the first dimension of every tensor.
        batch_size: the number of records in ``inputs`` (at least 2 to split; fewer: ``[]``).
        call: ``call(copy, half_batch)`` runs one forward (default ``copy(half_batch)``; a
            ``mis_per_sample_loss`` hook takes the batch itself).
        dtype: cast the copies' floating parameters and buffers to it first (the dtype of
            ``inputs``: a program's private model keeps the user's, its inputs are cast).

    Returns:
        ``(found, unchecked)``: the names found, in module order, and ``None``; or, where there
        are candidates but the batch cannot be split or the model cannot be copied or run on a
        half batch in train mode (nothing can be told then; the assessment goes on), ``[]`` and
        ``{"buffers": candidates, "why": reason}`` for the report to say so (vb45). ``([], None)``
        where there is no candidate.
    """
    names = persistent_float_buffers(model)
    if not names:
        return [], None

    def unchecked(why: str) -> tuple[list[str], dict[str, Any]]:
        return [], {"buffers": names, "why": why}

    if batch_size < 2:
        return unchecked(f"the batch probed holds {batch_size} record(s), fewer than the 2 needed to split it")
    half = batch_size // 2
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    # Only tensors a forward changed are kept from a copy (a frozen backbone's parameters are
    # candidates too: keeping the first copy whole would hold a second model in memory).
    present: list[set[str]] = []
    changed: list[dict[str, Tensor]] = []
    for a, b in ((0, half), (half, 2 * half)):
        try:
            copy_ = private_copy(model, "checking which buffers the forward sets from the records")
        except ModelCopyError as exc:
            return unchecked(f"the model cannot be copied ({str(exc)[:200]})")
        copy_.train()
        if dtype is not None:
            copy_.to(dtype)
        part = _rows(inputs, a, b)
        if not any(isinstance(t, Tensor) for t in tree_leaves(part)):
            return unchecked("the batch's inputs hold no tensor to split")
        # the same random state for both halves: a buffer that differs is set from the records,
        # not from a dropout draw
        with isolated_rng(seed=0), torch.no_grad():
            try:
                copy_(part) if call is None else call(copy_, part)
            except Exception as exc:  # noqa: BLE001 - a forward that needs the whole batch: not told
                return unchecked(f"a train-mode forward on half a batch ({b - a} of {batch_size} records) failed: "
                                 f"{type(exc).__name__}: {str(exc)[:200]}")
        bufs = {**dict(copy_.named_parameters()), **dict(copy_.named_buffers())}
        present.append({n for n in names if n in bufs})
        changed.append({n: bufs[n] for n in present[-1] if not _same(bufs[n], own.get(n))})
        del copy_, bufs
    return [n for n in names if n in present[0] and n in present[1]
            and (n in changed[0] or n in changed[1])
            and not (n in changed[0] and n in changed[1] and _same(changed[0][n], changed[1][n]))], None


def _same(t: Tensor, ref: Tensor | None) -> bool:
    """Equal shape and values (``ref`` cast to ``t``'s dtype: the copies may be cast)."""
    return ref is not None and t.shape == ref.shape and torch.equal(t, ref.to(t.dtype))
