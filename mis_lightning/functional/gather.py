"""Gathers and scatters along one dimension by ``index_select`` / ``index_copy_`` instead of
advanced indexing (issue 13; docs/benchmarks.md, "p49d").

``t[idx]`` and ``out[idx] = v`` with an integer index tensor run ``aten::index`` /
``aten::index_put_``, whose generic TensorIterator kernels cost 2-4x what ``index_select`` /
``index_copy_`` cost for the same copy on CPU (one thread, a 40k-of-65k float64 gather: 84 vs 24
us; the scatter 84 vs 46 us). The scoring pass of a small model runs ~1,000 such gathers and
scatters on chunk-sized tensors per call (the paths' rest after a closed form, the per-form
scatters of the affine kernel, the grid's per-element facts). Both forms copy the same values to
the same places, so every result is bitwise the same; only the index's form is restricted: a 1-D
integer tensor without negative or repeated entries (``nonzero``'s output, ``arange``'s), which
is what every caller passes. Anything else (a boolean mask, a Python slice, a scalar index)
takes the indexing it always took.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# False: plain advanced indexing everywhere, as before p49d (A/B benchmarks; bitwise the same)
INDEX_SELECT_GATHERS = True


def _plain_index(idx: Any) -> bool:
    """Whether ``idx`` is a 1-D int64 / int32 index tensor (the form index_select takes)."""
    return isinstance(idx, Tensor) and idx.dim() == 1 and idx.dtype in (torch.int64, torch.int32)


def take(t: Tensor, idx: Tensor, dim: int = 0) -> Tensor:
    """``t`` at positions ``idx`` along ``dim`` (``t[idx]`` for ``dim = 0``, ``t[:, idx]`` for
    ``dim = 1``): a new tensor with the same values as the indexing gives, in the same order.
    ``idx``: 1-D integer positions in ``[0, t.shape[dim])`` (``index_select`` raises on others,
    naming the index; a boolean mask is indexed as before)."""
    if INDEX_SELECT_GATHERS and _plain_index(idx):
        return t.index_select(dim, idx)
    if dim == 0:
        return t[idx]
    return t[(slice(None),) * dim + (idx,)]


def positions(mask: Tensor) -> Tensor:
    """The positions of a 1-D boolean ``mask``'s True entries (``nonzero``), for :func:`take` and
    :func:`put` to read several tensors at them with one ``nonzero`` (each ``t[mask]`` runs its
    own); the mask itself with the switch off (the indexing as before)."""
    return torch.nonzero(mask).squeeze(-1) if INDEX_SELECT_GATHERS else mask


def put(out: Tensor, idx: Tensor, value: Tensor | float | bool) -> None:
    """``out[idx] = value`` in place along dimension 0: ``value`` a tensor of ``out``'s dtype
    with ``len(idx)`` rows, or a scalar (a Python number, or a 0-dim tensor of ``out``'s dtype,
    written to every position); any other value is assigned by indexing (which converts or
    raises as it always did). ``idx``: 1-D integer positions in ``[0, len(out))``, each at most
    once (the assignment's result is unspecified for repeated ones either way)."""
    if INDEX_SELECT_GATHERS and _plain_index(idx):
        if not isinstance(value, Tensor):
            out.index_fill_(0, idx, value)
            return
        if value.dtype == out.dtype:
            if value.dim() == 0:
                out.index_fill_(0, idx, value)
                return
            if value.shape[0] == idx.shape[0] and value.shape[1:] == out.shape[1:]:
                out.index_copy_(0, idx, value)
                return
    out[idx] = value


__all__ = ["INDEX_SELECT_GATHERS", "positions", "put", "take"]
