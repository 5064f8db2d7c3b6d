"""Which parts of a model's output the per-sample loss reads, and the outputs flattened per record.

A ``forward`` may return more than the logits: ``{"logits": ..., "features": h}`` (Hugging Face
style), ``(logits, embedding)``. Every quantity the estimation takes of "the model's outputs" --
the output Jacobians ``J_i`` whose row span projects the leverages' curvature (method.md
section 4, "Per-record factors"), the Gauss-Newton factors ``J' L J``, the residual term, the
factored / per-layer programs' one-output-per-record layout -- must see only the outputs the loss
reads: an output the loss never reads has ``dl/do = 0`` and ``d2l/do2 = 0``, so it contributes
nothing to the loss as a function of the parameters, but its Jacobian rows widened the span the
leverage projects onto (a user's finding: +18-20% leakage for a 5-10-3 classifier returning its
hidden features beside the logits, max leverage 0.65 -> 2.27).

Each floating, batched leaf of the output is sorted once per program, on the first records of the
first batch, into

* *read*: the loss differentiates it (autograd reaches it from the summed losses);
* *dropped*: the loss neither differentiates it nor reads its value (the losses are bitwise the
  same with zeros in its place, that leaf alone zeroed): left out of the flattened vector, zeros in its place where a
  flattened record is handed back to the loss;
* *value-read*: not differentiated, but the losses change with its value (a weight or mask taken
  from it under ``detach``): kept in the flattened vector (its values reach the loss) but
  detached, so its Jacobian rows are zero.

Any other leaf (an integer, a tensor without the batch dimension, a non-tensor) is kept as it
was; :meth:`LossProgram.output_shape` refuses such outputs for the Gauss-Newton factors as before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_tree = torch.utils._pytree

# records of the first batch the sorting reads: None, all of them (rv52b: on the first 8 only, a loss
# reading a leaf for some records -- a multi-task head whose labels those 8 lacked, a value-read weight
# below its threshold there -- had the leaf dropped for the whole run, later records' losses read with
# zeros in its place); an int: the first that many (A/B)
PROBE_RECORDS: int | None = None
UNREAD_SEED = 53_2026  # the random values unread_entries puts in place of the entries it tests


@dataclass(frozen=True)
class OutputTree:
    """Per-record layout of a model output that is a pytree (a tuple, dict or namedtuple of
    tensors): its structure, each leaf's shape without the batch dim, and which leaves the
    flattened vector holds. The Gauss-Newton factors see the kept leaves flattened per record,
    in leaf order, into one vector of ``C`` entries.

    Attributes:
        spec: the ``torch.utils._pytree`` TreeSpec of the output.
        shapes: every leaf's per-record shape (``()`` for a leaf that is not a batched tensor).
        kept: per leaf, whether it is in the flattened vector (read, value-read or unsorted).
        live: per leaf, whether the loss differentiates it (a kept leaf that is not live is
            detached where the output is flattened).
        fills: per dropped leaf its dtype (the zeros in its place), ``None`` for kept leaves.
        names: every leaf's path in the output (``"['aux']"``, ``"[1]"``), for messages.
        late: the paths of leaves the first batch dropped and a later batch read (:func:`read_later`):
            kept from that batch on.
    """

    spec: Any
    shapes: tuple[tuple[int, ...], ...]
    kept: tuple[bool, ...] = ()
    live: tuple[bool, ...] = ()
    fills: tuple[torch.dtype | None, ...] = ()
    names: tuple[str, ...] = ()
    late: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.shapes)
        if not self.kept:  # every leaf kept and differentiated (the layout before the sorting)
            object.__setattr__(self, "kept", (True,) * n)
            object.__setattr__(self, "live", (True,) * n)
            object.__setattr__(self, "fills", (None,) * n)

    @property
    def dropped(self) -> int:
        """Leaves left out of the flattened vector."""
        return sum(not k for k in self.kept)


OutputShape = tuple[int, ...] | OutputTree


def tensor_record_shape(one: Tensor, two: Callable[[], Tensor | None], what: str) -> tuple[int, ...]:
    """The per-record shape of a model's tensor output, read on a forward of one record (``one``):
    its shape without dim 0 where dim 0 is that record's (size 1). Where it is not, the forward
    dropped the record's dim (a ``.squeeze()``: ``[B, C]`` for ``B > 1``, ``[C]`` for one record;
    formerly read as ``()``, one output per record, a 3-class head counted 1 loss direction) or the
    records are not in dim 0 (a sequence-first ``[T, B, C]`` output, ``nn.RNN``'s default layout):
    told apart on a forward of two records (``two()``; ``None`` where there is one): dim 0 of 2
    and each record ``one``'s shape is a squeeze, whose per-record shape is ``one``'s own. Where
    ``one``'s dim 0 is 2 that shape test cannot tell a squeeze from two heads stacked ``[2, B]``
    (or a sequence-first ``[2, B]``) and squeezed: ``one`` must then be the pair's row 0 (its value,
    to the rounding of a batch of one against two), refused where it is the pair's column 0 instead
    (where both or neither hold -- equal outputs, a forward depending on the batch -- the
    squeeze is taken, the per-record loss checks standing behind it). A sequence-first output whose
    dim 0 is 1 (``[1, B, C]``) is told by :func:`check_records_first` on a batch's output.

    Raises:
        ValueError: naming ``what`` and the shapes, where the records are not in dim 0 (or one
            record cannot tell), since every per-record read takes dim 0 as the records.
    """
    if one.dim() and one.shape[0] == 1:
        return tuple(one.shape[1:])
    pair = two()
    if pair is None and one.dim() == 0:
        return ()  # a squeezed [B, 1] or [B]: one output per record, whatever the batch shows
    if pair is not None and pair.dim() and pair.shape[0] == 2 and tuple(pair.shape[1:]) == tuple(one.shape):
        if one.shape[0] == 2 and _records_in_dim1(one, pair):  # (rv56: [2, B] squeezed reads as a squeeze too)
            raise ValueError(
                f"{what} is {tuple(one.shape)} for one record, {tuple(pair.shape)} for two, and the one record's "
                "output is column 0 of the two records', not row 0: the records are in dim 1 (two heads stacked "
                "[2, B, ...] and .squeeze()d, or a sequence-first [T, B] output of T = 2 steps?), and every "
                "per-record read takes dim 0 as the records; return the output batch-first (torch.stack(heads, 1), "
                "out.transpose(0, 1), batch_first=True) and keep the batch dim (.squeeze(-1) rather than .squeeze())")
        return tuple(one.shape)  # a .squeeze(): the records in dim 0, each of one's shape
    if pair is None:  # (rv55r: a squeezed output on a batch of one record read as sequence-first alone)
        raise ValueError(f"{what} is {tuple(one.shape)} for a batch of one record: its dim 0 is not that record's, "
                         "and one record cannot tell a .squeeze() that dropped it from a sequence-first [T, B, ...] "
                         "output; every per-record read takes dim 0 as the records: keep the batch dim (.squeeze(-1) "
                         "rather than .squeeze(); out.transpose(0, 1) or batch_first=True for a sequence-first output), "
                         "or batches of more than one record")
    raise ValueError(f"{what} is {tuple(one.shape)} for one record, {tuple(pair.shape)} for two: its dim 0 does not "
                     "hold the records (a sequence-first [T, B, ...] output, e.g. nn.RNN / nn.Transformer without "
                     "batch_first=True?), and every per-record read takes dim 0 as the records; return the output "
                     "batch-first (out.transpose(0, 1), batch_first=True)")


def _records_in_dim1(one: Tensor, pair: Tensor) -> bool:
    """Whether ``one`` (a record's output, ``[2, ...]``) is ``pair``'s column 0 (``pair [2, 2, ...]``,
    two records' output) and not its row 0: the records are in dim 1. Compared to the first-batch
    checks' tolerance of a record computed alone against its row in the batch."""
    from .per_sample import _record_tolerances  # (per_sample imports this module)

    if not (one.is_floating_point() and pair.is_floating_point()):
        return bool(torch.equal(one, pair[:, 0])) and not bool(torch.equal(one, pair[0]))
    a, rows, cols = one.detach().double(), pair[0].detach().double(), pair[:, 0].detach().double()
    rtol, atol = _record_tolerances(one.dtype, float(a.abs().max()) if a.numel() else 0.0)
    return bool(torch.allclose(a, cols, rtol=rtol, atol=atol)) and not bool(torch.allclose(a, rows, rtol=rtol, atol=atol))


def check_records_first(out: Any, b: int, what: str, one: Any = None) -> None:
    """Check that a batch's tensor output ``out`` holds its ``b`` records in dim 0 (where ``b >= 2``;
    one record cannot tell), at no cost: the output is the first batch's own forward. A
    sequence-first ``[T, B, C]`` output of ``T = 1`` step has a one-record output ``[1, 1, C]`` that
    :func:`tensor_record_shape` reads as records-first, and heads stacked ``[K, B]``
    likewise ``[K]`` per record where ``K = 2``; the batch's dim 0 (``T``, ``K``) tells them. An output
    whose dim 0 holds several rows per record (``[B*T, C]``: a per-token model called on the tokens
    flattened) is refused too, saying so (the plain loss's checks refused it before, blaming the
    loss or failing in it).

    ``one``: the output of the first record alone, where known (a ``mis_per_sample_loss`` hook's
    checks). Only an output :func:`tensor_record_shape` would read as records-first by its shapes is
    refused then: ``one``'s dim 0 is 1 (``[1, B, C]``), or 2 where the batch's is too and ``one`` is
    its dim 1 squeezed (``[2, B]`` heads). A hook's other layouts are accepted: a sequence-first
    ``[T, B, C]`` of ``T > 1``, the batch concatenated
    ``self(torch.cat([x, x_aug]))`` (``[2B, C]``), the tokens flattened (``[B*T, C]``); the hook's
    per-record reads call it on one record alone, whose whole output is the record's
    (``streaming._HookProgram.output_shape``), so their figures are those of the same model laid out
    batch-first (before, the leverage correction and the loss directions were skipped there).

    Raises:
        ValueError: naming ``what`` and the shapes, and the cure (the output batch-first).
    """
    if not isinstance(out, Tensor) or b < 2 or (out.dim() and out.shape[0] == b):
        return
    if isinstance(one, Tensor) and out.dim() and not (
            (one.dim() and one.shape[0] == 1)
            or (one.dim() and one.shape[0] == 2 == out.shape[0] and tuple(one.shape[1:]) == tuple(out.shape[2:]))):
        return  # (rv56r: not read as records-first: tensor_record_shape refuses it, a hook's loss directions then 1)
    if out.dim() and out.shape[0] > b and out.shape[0] % b == 0:  # (rv56r: B*T rows, the records' entries flattened)
        raise ValueError(f"{what} is {tuple(out.shape)} for {b} records: its dim 0 holds {out.shape[0] // b} rows per "
                         "record, not the records (the records flattened with another dim, [B*T, ...]: a per-token model "
                         "called on x.reshape(-1, ...), or the batch concatenated with itself?), and every per-record "
                         "read takes dim 0 as the records; call the model on the batch as it is and keep the records "
                         "in dim 0 of its output ([B, T, ...]: reshape inside forward, reduce each record's entries in "
                         "the loss)")
    # (rv56r: a forward on some of the records, self(x[mask]), shows fewer rows: vmap cannot batch the mask's nonzero)
    some = out.dim() and 1 < out.shape[0] < b
    raise ValueError(f"{what} is {tuple(out.shape)} for {b} records: its dim 0 does not hold the records "
                     "(a sequence-first [T, B, ...] output, e.g. nn.RNN / nn.Transformer without batch_first=True, or "
                     "heads stacked [K, B, ...]?" + (", or the model called on some of the records only, "
                                                     "self(x[mask])?" if some else "")
                     + "), and every per-record read takes dim 0 as the records; return the "
                     "output batch-first (out.transpose(0, 1), batch_first=True, torch.stack(heads, 1))"
                     + ("; call the model on every record and mask the losses (losses * mask)" if some else ""))


def union_layout(layouts: list[OutputShape | None]) -> OutputShape | None:
    """One layout for the records of several processes' layouts (``None``: a process that sorted
    none): a pytree output's leaves kept (and differentiated) where any process keeps them, as
    the one process reading all of their records keeps every leaf a record's loss read
    (:func:`read_later`); the first known layout where they are not trees of one structure."""
    known = [lay for lay in layouts if lay is not None]
    if not known:
        return None
    trees = [lay for lay in known if isinstance(lay, OutputTree)]
    first = known[0]
    if not isinstance(first, OutputTree) or len(trees) != len(known) \
            or any(t.spec != first.spec or len(t.kept) != len(first.kept) for t in trees):
        return first
    kept = tuple(any(t.kept[i] for t in trees) for i in range(len(first.kept)))
    return dataclasses.replace(
        first, kept=kept, live=tuple(any(t.live[i] for t in trees) for i in range(len(kept))),
        fills=tuple(None if k else first.fills[i] for i, k in enumerate(kept)),
        late=tuple(dict.fromkeys(name for t in trees for name in t.late)))


def output_numel(shape: OutputShape | None) -> int:
    """Outputs per record (``C``) of an :meth:`LossProgram.output_shape`: the kept leaves' entries."""
    if isinstance(shape, OutputTree):
        return sum(math.prod(s) for s, k in zip(shape.shapes, shape.kept) if k)
    return int(math.prod(shape)) if shape else 1


def record_shape(shape: OutputShape | None) -> tuple[int, ...] | None:
    """The per-record shape of the one tensor the loss reads: a tensor output's, or the one kept
    (and differentiated) leaf's of an :class:`OutputTree`; ``None`` otherwise."""
    if not isinstance(shape, OutputTree):
        return shape
    kept = [(s, live) for s, k, live in zip(shape.shapes, shape.kept, shape.live) if k]
    return kept[0][0] if len(kept) == 1 and kept[0][1] else None


def _batched_float(t: Any, b: int) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 1 and t.shape[0] == b


def sort_outputs(forward: Callable[[Any], Any] | None, loss_fn: Callable[[Any, Any], Tensor], inputs: Any,
                 targets: Any, b: int, outputs: Any = None) -> OutputShape:
    """The output layout of ``forward`` under ``loss_fn``, from its records (:data:`PROBE_RECORDS`): a
    tensor output's per-record shape, or an :class:`OutputTree` with its leaves sorted (module docstring). One forward without grad, one backward of the losses in the outputs, and
    one more loss evaluation per leaf the loss does not differentiate (zeros in its place).

    Args:
        forward: ``inputs -> outputs`` (the model or its functional call).
        loss_fn: ``(outputs, targets) -> [B]`` per-sample losses.
        b: the records in ``inputs`` and ``targets`` (dim 0).
        outputs: the forward's output on ``inputs`` when already computed (its first records
            are read, detached; ``forward`` is then not called).

    Returns:
        ``tuple`` (a tensor output's shape without the batch dim) or :class:`OutputTree`.
    """
    r = b if PROBE_RECORDS is None else min(b, PROBE_RECORDS)

    def head(tree: Any) -> Any:
        return _tree.tree_map(lambda t: t[:r] if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t, tree)

    x, y = head(inputs), head(targets)
    if outputs is not None:
        out = _tree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, head(outputs))
    else:
        assert forward is not None
        with torch.no_grad():
            out = forward(x)
    if isinstance(out, Tensor):
        return tuple(out.shape[1:])
    paths, spec = _tree.tree_flatten_with_path(out)
    leaves = [t for _, t in paths]
    shapes = tuple(tuple(t.shape[1:]) if isinstance(t, Tensor) and t.dim() else () for t in leaves)
    cand = [i for i, t in enumerate(leaves) if _batched_float(t, r)]
    with torch.inference_mode(False), torch.enable_grad():
        # clones: a validation loop's inference tensors cannot enter a graph
        probe = [t.detach().clone().requires_grad_(True) if i in cand else t for i, t in enumerate(leaves)]
        losses = loss_fn(_tree.tree_unflatten(probe, spec), y)
        grads: tuple[Tensor | None, ...] = (None,) * len(cand)
        if isinstance(losses, Tensor) and losses.requires_grad and cand:
            grads = torch.autograd.grad(losses.sum(), [probe[i] for i in cand], allow_unused=True)
    live = {i for i, g in zip(cand, grads) if g is not None}
    silent = [i for i in cand if i not in live]
    drop: set[int] = set()
    if silent and live:  # (a loss that differentiates no output: every leaf kept, as before)
        with torch.no_grad():
            base = loss_fn(out, y)
            for j in silent:  # one leaf at a time: a value-read leaf does not keep the others
                zeroed = [torch.zeros_like(t) if i == j else t for i, t in enumerate(leaves)]
                moved = loss_fn(_tree.tree_unflatten(zeroed, spec), y)
                if isinstance(base, Tensor) and isinstance(moved, Tensor) and torch.equal(base, moved):
                    drop.add(j)
    n = len(leaves)
    return OutputTree(spec, shapes, kept=tuple(i not in drop for i in range(n)),
                      live=tuple(i in live or i not in cand for i in range(n)),
                      fills=tuple(leaves[i].dtype if i in drop else None for i in range(n)),
                      names=tuple(_tree.keystr(k) for k, _ in paths))


def read_later(layout: OutputShape, out: Any, loss_fn: Callable[[Any, Any], Tensor], targets: Any,
               b: int) -> OutputShape:
    """``layout`` with every leaf it dropped that this batch's losses read put back (kept, and
    differentiated where they differentiate it; its path added to ``late``); ``layout`` itself
    where it drops nothing or this batch reads none of its dropped leaves.

    The first batch's sorting is a sample: a loss that reads a leaf only for some batches (a
    multi-task head whose labels the first batch lacks, ``if mask.any(): ...``) had it dropped for
    the whole run, later records' losses read with zeros in its place, silently. Checked here on
    every later batch by the first batch's own tests (:func:`sort_outputs` on ``out``, this
    batch's output: one backward of the losses in the outputs, one loss call per leaf not
    differentiated), so every record's factors are taken in a layout holding every leaf its loss
    reads: the records before the leaf was put back did not read it (their layout is theirs,
    exactly), those after it get its rows (where their own loss does not read it, the over-read
    rows of a leaf kept from the first batch: the safe side). No cost where nothing is dropped.
    """
    if not isinstance(layout, OutputTree) or not layout.dropped or isinstance(out, Tensor):
        return layout
    now = sort_outputs(None, loss_fn, None, targets, b, outputs=out)
    if not isinstance(now, OutputTree) or len(now.kept) != len(layout.kept):
        return layout
    back = [i for i, (was, k) in enumerate(zip(layout.kept, now.kept)) if not was and k]
    if not back:
        return layout
    return dataclasses.replace(
        layout, kept=tuple(k or i in back for i, k in enumerate(layout.kept)),
        live=tuple(now.live[i] if i in back else v for i, v in enumerate(layout.live)),
        fills=tuple(None if i in back else f for i, f in enumerate(layout.fills)),
        late=layout.late + tuple(layout.names[i] if layout.names else str(i) for i in back))


def unread_entries(out: Any, loss_fn: Callable[[Any, Any], Tensor], targets: Any, b: int) -> Tensor | None:
    """The entries per record of a tensor output ``out [b, ...]`` that no record's loss reads, as a
    bool ``[C]`` over the flattened entries (``None`` where there is none): every record's loss has
    a derivative of exactly 0 in them (autograd, one backward of the summed losses in the outputs),
    and the losses are bitwise unchanged with them replaced by random values (a fixed generator;
    the global RNG untouched), which a loss reading one at a flat spot (``(o - t)^2`` at ``o = t``)
    fails: then none is taken (one test for all candidates). ``None`` for a pytree output (sorted
    per leaf, :func:`sort_outputs`) or an output the loss does not differentiate.

    A loss that reads 3 of 13 columns (``out[:, :3]``) left the other 10 in every record's output
    Jacobian ``J_i``, whose row span the exact estimator's leverages project onto (method.md
    section 4, "Per-record factors"): the over-read of this module, within one tensor (2-9%
    high). The estimator leaves these rows out of its per-record factors (``LossProgram.read_rows``).
    """
    if not (isinstance(out, Tensor) and out.is_floating_point() and out.dim() >= 1 and out.shape[0] == b):
        return None
    with torch.inference_mode(False), torch.enable_grad():
        probe = out.detach().clone().requires_grad_(True)
        losses = loss_fn(probe, targets)
        if not (isinstance(losses, Tensor) and losses.requires_grad):
            return None
        (g,) = torch.autograd.grad(losses.sum(), [probe], allow_unused=True)
    if g is None:
        return None
    cand = (g.reshape(b, -1) == 0).all(0)
    if not bool(cand.any()):
        return None
    with torch.no_grad():
        # (a seed of its own: seed 0 draws the very values a test's torch.randn(..., seed 0) output holds)
        noise = torch.randn(out.reshape(b, -1).shape, generator=torch.Generator().manual_seed(UNREAD_SEED),
                            dtype=out.dtype).to(out.device)
        moved = torch.where(cand, noise, out.detach().reshape(b, -1)).reshape(out.shape)
        base, other = loss_fn(out.detach(), targets), loss_fn(moved, targets)
    same = isinstance(base, Tensor) and isinstance(other, Tensor) and torch.equal(base, other)
    return cand.cpu() if same else None


def layout_of(out: Any, known: OutputShape | None, loss_fn: Callable[[Any, Any], Tensor], inputs: Any,
              targets: Any, b: int) -> OutputShape:
    """``known``, else the layout of ``out`` (the forward's output on ``inputs``): a tensor's
    per-record shape at no cost, a pytree's :func:`sort_outputs` (no forward of its own)."""
    if isinstance(out, Tensor):  # this batch's own shape (a sequence padded per batch: its own T)
        return tuple(out.shape[1:])
    if known is not None:  # (a leaf the first batch dropped and these losses read: put back)
        return read_later(with_shapes(known, out), out, loss_fn, targets, b)
    return sort_outputs(None, loss_fn, inputs, targets, b, outputs=out)


def with_shapes(layout: OutputShape, out: Any) -> OutputShape:
    """``layout`` with the per-record leaf shapes of ``out`` (a batch's output): the sorting (which
    leaves are kept, differentiated) is the first batch's, the shapes each batch's own (a sequence
    output padded per batch has another length in each). ``layout`` unchanged where ``out`` is not
    a pytree of as many leaves."""
    if not isinstance(layout, OutputTree) or isinstance(out, Tensor):
        return layout
    leaves = _tree.tree_leaves(out)
    if len(leaves) != len(layout.shapes):
        return layout
    shapes = tuple(tuple(t.shape[1:]) if isinstance(t, Tensor) and t.dim() else () for t in leaves)
    return layout if shapes == layout.shapes else dataclasses.replace(layout, shapes=shapes)


def flat_outputs(out: Any, shape: OutputShape | None) -> Tensor:
    """A batched model output as ``[B, C]``: a tensor reshaped, a pytree's kept leaves joined in
    leaf order (value-read leaves detached, dropped ones left out; :class:`OutputTree`).

    Raises:
        RuntimeError: a pytree output without its :class:`OutputTree` (the layout is sorted on
            the first batch, before any flattening).
    """
    if isinstance(out, Tensor):
        return out.reshape(out.shape[0], -1)
    if not isinstance(shape, OutputTree):
        raise RuntimeError(f"the model's output is a {type(out).__name__}: its layout must be sorted "
                           "(output_reads.sort_outputs) before it is flattened")
    leaves = _tree.tree_leaves(out)
    if len(leaves) != len(shape.kept):
        raise RuntimeError(f"the model's output has {len(leaves)} leaves here, {len(shape.kept)} on the first batch")
    return torch.cat([(t if live else t.detach()).reshape(t.shape[0], -1)
                      for t, k, live in zip(leaves, shape.kept, shape.live) if k], 1)


def flat_record(out: Any, shape: OutputShape | None) -> Tensor:
    """One record's output (batch dim 1) as ``[C]`` (:func:`flat_outputs`)."""
    return flat_outputs(out, shape).reshape(-1)


def unflat_record(o: Tensor, shape: OutputShape) -> Any:
    """``[C]`` back to one record's output with batch dim 1 (the inverse of :func:`flat_record`;
    zeros in place of the dropped leaves, which the loss does not read)."""
    if not isinstance(shape, OutputTree):
        return o.reshape((1, *shape))
    o = o.reshape(-1)
    parts, a = [], 0
    for sh, k, fill in zip(shape.shapes, shape.kept, shape.fills):
        if k:
            m = math.prod(sh)
            parts.append(o[a: a + m].reshape((1, *sh)))
            a += m
        else:
            parts.append(torch.zeros((1, *sh), dtype=fill, device=o.device))
    return _tree.tree_unflatten(parts, shape.spec)


def shift_outputs(out: Any, shift: Tensor, shape: OutputTree) -> Any:
    """A pytree output (batch dim 1) with ``shift [C]`` added to its kept leaves, in
    :func:`flat_record`'s order (the loss's derivatives in the flattened outputs, taken where the
    output cannot be rebuilt from them: inside a loss hook)."""
    leaves = _tree.tree_leaves(out)
    shift, parts, a = shift.reshape(-1), [], 0
    for t, sh, k in zip(leaves, shape.shapes, shape.kept):
        if k:
            m = math.prod(sh)
            t = t + shift[a: a + m].reshape(t.shape).to(t.dtype)
            a += m
        parts.append(t)
    return _tree.tree_unflatten(parts, shape.spec)
