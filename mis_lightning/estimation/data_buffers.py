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

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._pytree import tree_leaves, tree_map

from .._modelcopy import ModelCopyError, private_copy
from .._rng import isolated_rng

__all__ = ["InputStatistics", "data_dependent_buffers", "persistent_float_buffers", "probe_data_buffers"]


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
        ``{"buffers": candidates, "why": reason}`` for the report to say so. ``([], None)``
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


# the statistics a standardiser or min-max scaler fitted before training stores (sklearn's
# StandardScaler: mean_, var_, scale_ (std, ddof 0); MinMaxScaler: data_min_, data_max_,
# data_range_, scale_ (1 / range); torch.std's default ddof 1), and whether each is a location
# (compared on the feature's spread) or a scale (compared on its own size)
_STATISTICS = ("mean", "std", "std (ddof 1)", "var", "var (ddof 1)", "1 / std", "1 / std (ddof 1)",
               "min", "max", "max - min", "1 / (max - min)")
_LOCATIONS = {"mean", "min", "max"}
# a buffer matches a statistic where every compared entry is within this share of the
# statistic's size (locations: of the statistic's size plus the feature's sd): float32 sums of
# the user's fit in another order are ~1e-6 off, any other table misses it on some entry
FITTED_RTOL = 1e-4
# ... or this many units of the coarser of the buffer's and the inputs' float formats (a model and
# its inputs cast to bfloat16 / float16 after the fit: the buffer rounded by up to eps / 2, each input
# too; rv46: with FITTED_RTOL alone a bf16 / fp16 model's fitted standardiser went unnamed)
FITTED_EPS = 2.0


def _merge_into(acc: list[Any], part: list[Any]) -> None:
    """Add the statistics ``part`` (``[n, mean, M2, min, max]``) to ``acc`` in place (Chan et al.'s
    pairwise update of the mean and the centred sum of squares)."""
    n, k = acc[0], part[0]
    if n == 0:
        acc[:] = list(part)
        return
    delta = part[1] - acc[1]
    acc[1] = acc[1] + delta * (k / (n + k))
    acc[2] = acc[2] + part[2] + delta ** 2 * (n * k / (n + k))
    acc[3], acc[4], acc[0] = torch.minimum(acc[3], part[3]), torch.maximum(acc[4], part[4]), n + k


def _cpu(acc: list[Any]) -> list[Any]:
    """A copy of the statistics ``[n, mean, M2, min, max]`` with its tensors on the CPU."""
    return [a.cpu() if isinstance(a, Tensor) else a for a in acc]


class InputStatistics:
    """Per-feature and per-channel statistics of the model's input tensors over every record
    read, for the persistent floating buffers whose size is one input's record size (per
    feature) or its channel count (per channel, dimension 1 of ``[B, C, ...]``), to tell a
    standardiser or scaler fitted on the training inputs before training: such a buffer is not
    set by the forward (:func:`probe_data_buffers` does not see it) but holds the inputs' mean,
    sd, min or max. Counts, means, centred sums of squares (merged per batch: Chan et
    al.'s pairwise update), minima and maxima in float64.

    Args:
        model: the model (read only).
        names: the candidate buffers (``persistent_float_buffers`` less those the probe found).
        inputs: the first batch's model inputs, records along dimension 0 of every tensor.
        batch_size: the batch's number of records.

    Raises:
        Nothing.
    """

    def __init__(self, model: nn.Module, names: list[str], inputs: Any, batch_size: int) -> None:
        own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        leaves = self._leaves(inputs, batch_size)
        self.candidates: dict[str, list[tuple[int, str]]] = {}
        self.sums: dict[tuple[int, str], list[Any]] = {}
        self.eps: dict[tuple[int, str], float] = {}  # the inputs' float format's eps (the coarsest read)
        for name in names:
            t = own.get(name)
            if t is None or t.numel() < 2 or bool((t == t.reshape(-1)[0]).all()):  # a constant: any data's
                continue
            for i, x in enumerate(leaves):
                shape = tuple(x.shape[1:])
                kinds = ["feature"] if math.prod(shape) == t.numel() else []
                if len(shape) >= 2 and shape[0] == t.numel():
                    kinds.append("channel")
                for kind in kinds:
                    self.candidates.setdefault(name, []).append((i, kind))
                    self.sums[(i, kind)] = [0, None, None, None, None]  # n, mean, M2, min, max

    @staticmethod
    def _leaves(inputs: Any, b: int) -> list[Tensor]:
        return [t for t in tree_leaves(inputs)
                if isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 2 and t.shape[0] == b]

    def update(self, inputs: Any, batch_size: int) -> None:
        """Add one batch's records (every record read, those left out of ``n`` too)."""
        if not self.sums:
            return
        leaves = self._leaves(inputs, batch_size)
        for (i, kind), acc in self.sums.items():
            if i >= len(leaves):
                continue
            x = leaves[i].detach()
            self.eps[(i, kind)] = max(self.eps.get((i, kind), 0.0), torch.finfo(x.dtype).eps)
            x = (x.reshape(batch_size, -1) if kind == "feature" else x.transpose(0, 1).reshape(x.shape[1], -1).T)
            # one batch's sums in the inputs' own precision (float32: ~1e-7 relative on a few hundred
            # records, far inside FITTED_RTOL; half float64's time), merged in float64
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            k, mean = x.shape[0], x.mean(0)
            m2 = ((x - mean) ** 2).sum(0).to(torch.float64)
            lo, hi = x.amin(0).to(torch.float64), x.amax(0).to(torch.float64)  # (aminmax along 0: 4x slower)
            _merge_into(acc, [k, mean.to(torch.float64), m2, lo, hi])

    def merged(self, others: list[tuple[dict[tuple[int, str], list[Any]], dict[tuple[int, str], float]]]) -> InputStatistics:
        """A copy whose statistics are over this one's records and those of ``others`` (other
        processes' ``(sums, eps)``, of the same candidates: the first batch's input layout), merged as
        the batches are: every DDP process then tells a standardiser fitted on all the training
        inputs, which no process's shard alone matches."""
        out = self.on_cpu()
        for sums, eps in others:
            for key, acc in sums.items():
                if key in out.sums and acc[0]:
                    _merge_into(out.sums[key], _cpu(acc))
                    out.eps[key] = max(out.eps.get(key, 0.0), eps.get(key, 0.0))
        return out

    def on_cpu(self) -> InputStatistics:
        """A copy with its statistics on the CPU (:meth:`matches` reads them there): what a DDP
        process sends the others and merges (each process's statistics on its own GPU, the
        merge of ``cuda:0`` with ``cuda:1`` tensors raised at the sync)."""
        out = copy.copy(self)
        out.sums = {key: _cpu(acc) for key, acc in self.sums.items()}
        out.eps = dict(self.eps)
        return out

    @staticmethod
    def _statistic(acc: list[Any], what: str) -> Tensor:
        n, mean, m2, lo, hi = acc
        if what in ("mean", "min", "max", "max - min", "1 / (max - min)"):
            return {"mean": mean, "min": lo, "max": hi}.get(what, hi - lo if what == "max - min" else 1 / (hi - lo))
        var = m2 / (n - 1 if "ddof 1" in what else n)
        return var if what.startswith("var") else 1 / var.sqrt() if what.startswith("1 /") else var.sqrt()

    def matches(self, model: nn.Module) -> dict[str, str]:
        """``{buffer name: which statistic of which input it equals}`` (within
        :data:`FITTED_RTOL`, or :data:`FITTED_EPS` units of the coarser float format of the buffer and
        the inputs, on the entries whose feature varies: at least 2, not all equal in
        the buffer), in the order of the candidates."""
        own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        out: dict[str, str] = {}
        for name, wants in self.candidates.items():
            buf = own.get(name)
            if buf is None:
                continue
            v = buf.detach().reshape(-1).to(torch.float64).cpu()
            for i, kind in wants:
                acc = self.sums[(i, kind)]
                if acc[0] < 2:
                    continue
                acc = _cpu(acc)
                sd = (acc[2] / acc[0]).sqrt()
                live = sd > 0
                if int(live.sum()) < 2 or bool((v[live] == v[live][0]).all()):
                    continue
                rtol = max(FITTED_RTOL, FITTED_EPS * max(self.eps.get((i, kind), 0.0), torch.finfo(buf.dtype).eps))
                for what in _STATISTICS:
                    s = self._statistic(acc, what)[live]
                    # (a variance's rounding is twice its sd's, relatively)
                    tol = (2.0 if what.startswith("var") else 1.0) * rtol * (
                        s.abs() + (sd[live] if what in _LOCATIONS else 0))
                    if bool(torch.isfinite(s).all()) and bool(((v[live] - s).abs() <= tol).all()):
                        out[name] = f"the {what} of input {i} per {kind}"
                        break
                if name in out:
                    break
        return out
