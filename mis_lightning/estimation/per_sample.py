"""Per-sample losses, gradients and output Jacobians of a model with ``torch.func``.

A *loss program* binds a model, a per-sample loss and a batch layout. It never modifies
the model: parameters are read once (detached copies) and every call goes through
``torch.func.functional_call``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.overrides import TorchFunctionMode

from .._modelcopy import SWAP_CHECK_RECORDS, ModelCopyError, SwapCheck, private_copy
from .._user_warnings import warn
from .._warning_filters import ignoring
from .data_buffers import probe_data_buffers
from .norm_derivatives import WrittenOutLayerNorm
from .output_reads import (
    OutputShape,
    OutputTree,
    check_records_first,
    flat_record,
    layout_of,
    read_later,
    tensor_record_shape,
    unflat_record,
    unread_entries,
    with_shapes,
)

LossFn = Callable[[Any, Any], Tensor]
BatchFn = Callable[[Any], tuple[Any, Any]]


def default_batch_fn(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch that is a 2-tuple/list ``(inputs, targets)``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    layout = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    if isinstance(batch, Mapping):  # a dict batch: name its keys, the batch_fn picks from them (fu32)
        layout += f" with keys {list(batch)}"
    # a module-level function, not the lambda this advised before: a Metric or callback that
    # holds it is pickled by spawning strategies and torch.save
    raise TypeError(
        f"batches must be (inputs, targets) pairs by default; got {layout}: pass batch_fn=<a module-level "
        "function batch -> (inputs, targets)>, or define mis_per_sample_loss(self, batch) -> per-sample "
        "losses [B] on the model"
    )


@contextmanager
def eval_mode(*roots: nn.Module) -> Iterator[None]:
    """Every submodule of ``roots`` in eval mode for the block; each ``training`` flag restored after.

    The estimation evaluates the trained model as released (Dropout off, BatchNorm on its
    running statistics): a model left in train mode would make per-sample gradients random
    (vmap refuses random ops) or couple the records of a batch (BatchNorm batch statistics,
    which also update the running statistics in place). The flags are set directly (not via
    ``train()``, which a subclass may override) and restored exactly, even on error.
    """
    with _mode(False, *roots):
        yield


@contextmanager
def _mode(training: bool, *roots: nn.Module) -> Iterator[None]:
    """Every submodule of ``roots`` with ``training`` for the block, each flag restored after (:func:`eval_mode`)."""
    flags = [(m, m.training) for r in roots for m in r.modules()]
    try:
        for m, _ in flags:
            m.training = training
        yield
    finally:
        for m, t in reversed(flags):  # reversed: a module reached twice gets its first flag
            m.training = t


def _describe(tree: Any) -> str:
    """Shapes of the tensors of a pytree, e.g. ``[200, 1]`` or ``(x: [4, 3], y: [4])``."""
    if isinstance(tree, Tensor):
        return str(list(tree.shape))
    leaves = [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, Tensor)]
    return "(" + ", ".join(str(list(t.shape)) for t in leaves) + ")" if leaves else type(tree).__name__


def _loss_name(loss_fn: Any) -> str:
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__


_DTYPE_ERRORS = ("scalar type", "dtype")

# a loss function failing on the estimation's float64 outputs through a float32 tensor it holds runs
# with its torch calls' arguments cast up (ComputeDtypeLoss, _Upcast; nu49); False: its inputs cast
# down to the model's dtype, as before (A/B)
LOSS_UPCAST = True


def _floats_to(tree: Any, dtype: torch.dtype) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, tree)


class _Upcast(TorchFunctionMode):
    """Every floating tensor argument of a torch call of lower precision than ``dtype`` cast up
    to it (exactly) before the call: a loss function holding float32 class weights then runs
    its arithmetic in the estimation's float64 (:class:`ComputeDtypeLoss`)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype, self.bits = dtype, torch.finfo(dtype).bits

    def _up(self, t: Any) -> Any:
        if isinstance(t, Tensor) and t.is_floating_point() and torch.finfo(t.dtype).bits < self.bits:
            return t.to(self.dtype)
        return t

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        # a tensor the call writes (an in-place method's self, __setitem__'s, out=) is the loss's own:
        # cast up it would be a copy, written and dropped, the loss's tensor never filled (rv49: a
        # float32 buffer filled by l[:] = ... read all zeros); it keeps its dtype (the write rounds to it)
        name = getattr(func, "__name__", "")
        writes = name == "__setitem__" or (name.startswith("__i") and name.endswith("__")) or (
            name.endswith("_") and not name.endswith("__"))
        kept, rest = (args[:1], args[1:]) if writes and args else ((), args)
        out = kwargs.pop("out", None)
        rest, kwargs = torch.utils._pytree.tree_map(self._up, (rest, kwargs))
        if out is not None:
            kwargs["out"] = out
        return func(*kept, *rest, **kwargs)


def _cast_down_agrees(fn: Any, outputs: Any, targets: Any, up: Any, ref: torch.dtype) -> Any:
    """``None`` when the loss run under :class:`_Upcast` (``up``) agrees with the same loss on
    inputs cast down to ``ref`` (its own arithmetic) within ``ref``'s rounding, else the cast-down
    losses. The cast-up run sees every torch call but not a write through a view of a tensor the
    loss holds (``buf.view(-1)[:] = ...``: the view is taken of the cast copy), whose losses then
    read the buffer unfilled; one comparison on the deciding call catches it. Where the two cannot
    be compared (a transform's batched tensors, other shapes) the cast-up run is kept."""
    try:
        down = fn(_floats_to(outputs, ref), _floats_to(targets, ref))
        a, b = torch.as_tensor(up).detach().to(torch.float64), torch.as_tensor(down).detach().to(torch.float64)
        if a.shape != b.shape:
            return None
        eps = torch.finfo(ref).eps
        scale = float(torch.maximum(a.abs(), b.abs()).max()) if a.numel() else 0.0
        ok = bool(((a - b).abs() <= 64 * eps * (a.abs() + b.abs()) + 64 * eps * scale).all())
    except Exception:  # noqa: BLE001 - not comparable here: the cast-up run stands
        return None
    return None if ok else down


class ComputeDtypeLoss:
    """``loss_fn`` made to run on outputs in the estimation's compute dtype.

    The estimation evaluates a float64 copy of a small model (exact-sandwich accuracy); a loss
    that holds float tensors of the model's own dtype (class weights of ``cross_entropy``, a
    ``pos_weight``) then fails inside a kernel that wants one dtype ("expected scalar type
    Double but found Float"). An ``nn.Module`` loss is evaluated through a copy whose float
    parameters and buffers are cast to the outputs' dtype (no precision lost); any other loss
    that fails with a dtype error runs again with every lower-precision floating argument of its
    torch calls cast up to the outputs' dtype (:class:`_Upcast`: a closure's class weights; no
    precision lost either: the float32 arithmetic measured 0.55-1.8% off on rtn_int4's
    correlated figure); one that still fails gets its floating inputs cast to
    ``reference_dtype`` (the model's own) and its losses cast back, with a warning that its
    arithmetic then runs in ``reference_dtype``. The choice is made on the first call per outputs dtype.

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> [B]``.
        reference_dtype: the trained model's floating dtype.

    Raises:
        RuntimeError: the loss's own error, when it also fails in ``reference_dtype``.
    """

    def __init__(self, loss_fn: LossFn, reference_dtype: torch.dtype) -> None:
        self.loss_fn, self.reference_dtype = loss_fn, reference_dtype
        self.__qualname__ = _loss_name(loss_fn)  # error messages name the user's loss
        self._modules: dict[torch.dtype, Any] = {}
        self._cast_down: dict[torch.dtype, bool] = {}
        self._cast_up: dict[torch.dtype, bool] = {}

    def _for(self, dtype: torch.dtype) -> Any:
        fn = self.loss_fn
        if not isinstance(fn, nn.Module) or dtype is None:
            return fn
        if dtype not in self._modules:
            floats = [t for t in (*fn.parameters(), *fn.buffers()) if t.is_floating_point()]
            if any(t.dtype != dtype for t in floats):
                try:
                    fn = private_copy(fn, "copying loss_fn to cast its tensors").to(dtype)
                except ModelCopyError:
                    pass  # read as is; a dtype error then takes the cast-down path
            self._modules[dtype] = fn
        return self._modules[dtype]

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, Tensor) and t.is_floating_point()]
        dtype = leaves[0].dtype if leaves else None
        fn = self._for(dtype)
        down = self._cast_down.get(dtype)
        if dtype is None or dtype == self.reference_dtype or down is False:
            return fn(outputs, targets)
        ref = self.reference_dtype
        if down:
            return _floats_to(fn(_floats_to(outputs, ref), _floats_to(targets, ref)), dtype)
        if self._cast_up.get(dtype):
            with _Upcast(dtype):
                return fn(outputs, targets)
        try:  # the first call at this dtype decides
            out = fn(outputs, targets)
        except RuntimeError as exc:
            if not any(k in str(exc) for k in _DTYPE_ERRORS):
                raise
            first = exc
        else:
            self._cast_down[dtype] = False
            return out
        if LOSS_UPCAST and torch.finfo(dtype).bits > torch.finfo(ref).bits:
            try:
                with _Upcast(dtype):
                    out = fn(outputs, targets)
            except Exception:  # noqa: BLE001 - the cast-down path below, and its warning
                pass
            else:
                down_out = _cast_down_agrees(fn, outputs, targets, out, ref)
                if down_out is None:
                    self._cast_up[dtype] = True
                    return out
                # the cast-up run disagrees with the loss's own arithmetic: a write it cannot see (a
                # view of a buffer the loss fills, rv49) left its losses unfilled; the cast-down path
        try:
            out = fn(_floats_to(outputs, ref), _floats_to(targets, ref))
        except Exception:  # noqa: BLE001 - the loss's own error is the one to show
            raise first from None
        self._cast_down[dtype] = True
        name = (str(dtype).removeprefix("torch."), str(ref).removeprefix("torch."))
        warn(
            f"loss_fn {_loss_name(self.loss_fn)!r} fails on {name[0]} outputs ({first}), typically through "
            f"a {name[1]} tensor it holds (class weights, a pos_weight): the estimation evaluates the model "
            f"in {name[0]}, so the loss's own arithmetic runs in {name[1]} (inputs cast down, losses cast "
            "back). For full precision pass the loss as an nn.Module holding its tensors as buffers (e.g. "
            "nn.CrossEntropyLoss(weight=w, reduction='none')): its copy is cast")
        return _floats_to(out, dtype)


def _rows_of(tree: Any, i: int) -> Any:
    """Record ``i`` of every tensor leaf (the batch dimension dropped, as ``vmap`` sees it)."""
    return torch.utils._pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, tree)


def each_record(fn: Callable[..., Any], in_dims: tuple[int | None, ...], looped: bool, *args: Any) -> Any:
    """``vmap(fn, in_dims)(*args)``, or with ``looped`` ``fn`` on each record in turn (record ``i``
    of every argument whose ``in_dims`` entry is 0, the others whole), the results stacked: the
    same values for a forward vmap cannot batch over the records (a recurrent layer,
    :attr:`LossProgram.looped`)."""
    if not looped:
        return vmap(fn, in_dims=in_dims)(*args)
    b = next(_batch_size(a) for a, d in zip(args, in_dims) if d == 0)
    rows = [fn(*(a if d is None else _rows_of(a, i) for a, d in zip(args, in_dims))) for i in range(b)]
    return torch.utils._pytree.tree_map(lambda *r: torch.stack(r), *rows)


# record_loss_derivatives: output sizes up to which the loss Hessian's rows take one scalar
# backward each instead of one batched backward with a gradient tensor (below: the import it avoids)
LOSS_HESSIAN_LOOP_MAX = 16

# The phrases of the refusals that leave the exact estimator without its per-record leverage factors,
# each written into its message and matched by assess.LEVERAGE_OFF_CURES for what lets the correction
# run: a phrase only that message holds (dd58: a key "holding" matched any message with the word, and
# "calls the model" the missing-forward refusal's "the assessment calls the model as it is released").
#: streaming._HookProgram: the hook calls the model other than once with a tensor, or with non-floating outputs
HOOK_CALLS_REFUSED = "the leverages need one call returning one tensor, or several returning floating tensors"
#: streaming._HookProgram: the hook's loss reads the weights other than through the model's output
WEIGHTS_OUTSIDE_OUTPUT = "the loss depends on the parameters other than through the model's output"
#: LossProgram.output_shape: an output holding more than floating tensors with the records in dim 0
OUTPUT_NOT_FLOATING = "the Gauss-Newton factors need floating tensors with the batch in dim 0"
#: MomentAccumulator._leverage_factors: the stored records' factors over ``budget=``
FACTORS_OVER_BUDGET = "the records' leverage factors exceed budget="


def record_loss_derivatives(one: Callable[[Tensor, Any], Tensor], outputs: Tensor, targets: Any,
                            second: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per record ``dl/do [B, *o]`` and (``second``) ``d2l/do2 [B, C, C]`` (``C = numel(o)``) of
    ``one(o_r, y_r)`` (a scalar per record) at ``outputs [B, *o]``, ``targets`` batched as
    ``vmap`` reads them; float as ``outputs``. The matrix of ``vmap(jacrev(grad(one)))``
    (reverse-over-reverse; method.md section 4, "Finite-sample (leverage) correction", and the
    Gauss-Newton factors) without torch.func's ``grad``, whose first call in a process imports
    ``torch._dynamo`` (~1 s CPU where no optimizer ran before): the per-record losses by a
    plain ``vmap(one)`` (each call sees its own record alone, as before: a loss that would couple
    the records of a batch gets no cross-record term), differentiated by ``torch.autograd``; the
    second derivatives one backward per output direction (up to :data:`LOSS_HESSIAN_LOOP_MAX`
    outputs; then in one batched backward, ``is_grads_batched``, whose gradient tensor makes torch
    import sympy once per process).
    A record whose gradient does not depend on its outputs has Hessian 0.

    Raises:
        RuntimeError: autograd cannot differentiate the vmapped loss (an operation without a
            batching rule for its backward); callers fall back to torch.func.
    """
    b = outputs.shape[0]
    c = outputs[0].numel() if b else int(math.prod(outputs.shape[1:]))
    with torch.enable_grad():
        leaf = outputs.detach().clone().requires_grad_(True)
        losses = vmap(one)(leaf, targets)
        g = torch.autograd.grad(losses.sum(), leaf, create_graph=second, allow_unused=True)[0]
        if g is None:
            g = torch.zeros_like(leaf)
        if not second:
            return g.detach(), None
        H = torch.zeros(b, c, c, dtype=outputs.dtype, device=outputs.device)
        if not g.requires_grad or b == 0 or c == 0:  # the gradient does not depend on the outputs
            return g.detach(), H
        g2 = g.reshape(b, c)
        # rows[j, r, l] = sum_r' d g_r'j / d o_rl = d g_rj / d o_rl (each loss reads its own record)
        if c <= LOSS_HESSIAN_LOOP_MAX:
            # one backward of the scalar sum_r g_rj per output direction: no gradient tensor is
            # handed to autograd, whose first such call in a process imports
            # torch.fx.experimental.symbolic_shapes and sympy (~0.4 s CPU, most of a 1e5-weight
            # MLP's estimation pass; es32); the same backward graph, seeded with the same one-hot
            got = [torch.autograd.grad(g2[:, j].sum(), leaf, retain_graph=j < c - 1, allow_unused=True)[0]
                   for j in range(c)]
            rows = torch.stack([torch.zeros_like(leaf) if t is None else t for t in got])
        else:
            eye = torch.eye(c, dtype=g2.dtype, device=g2.device).unsqueeze(1).expand(c, b, c)
            rows = torch.autograd.grad(g2, leaf, grad_outputs=eye, is_grads_batched=True, allow_unused=True)[0]
    if rows is not None:
        H = rows.reshape(c, b, c).transpose(0, 1).contiguous()
    return g.detach(), H


def _batch_size(tree: Any) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("inputs hold no tensor")
    return int(leaves[0].shape[0])


def _broadcast_pair(b: int, outputs: Any, targets: Any) -> tuple[tuple[int, ...] | None, tuple[int, ...]] | None:
    """``(outputs' shape, targets' shape)`` when each is ``[B]`` or ``[B, 1]`` (a pair that
    broadcasts to ``[B, B]``, by itself or by an unsqueeze inside the loss); ``None`` otherwise or
    when the targets are not a tensor. ``outputs`` not a tensor (unknown): ``None`` in its place."""
    pair = {(b,), (b, 1)}
    if not isinstance(targets, Tensor) or tuple(targets.shape) not in pair:
        return None
    if not isinstance(outputs, Tensor):
        return None if outputs is not None else (None, tuple(targets.shape))
    return (tuple(outputs.shape), tuple(targets.shape)) if tuple(outputs.shape) in pair else None


def loss_shape_hint(shape: tuple[int, ...] | None, b: int | None, targets: Any = None, outputs: Any = None) -> str:
    """What to return instead of per-sample losses of ``shape`` for a batch of ``b`` records (a
    parenthesised clause, ``""`` when there is none to give). Each record's loss must be its own
    term of the training objective ``mean_i loss_i + weight_decay / 2 |theta|^2`` (method.md
    section 2): a loss per output averaged over every entry of ``[B, k]`` is ``.mean(dim=-1)``
    per record; ``.sum`` changes the balance with the weight decay, hence sigma. Integer
    ``targets`` of the losses' shape holding a negative value (an ``ignore_index``, -100 by
    default: padded tokens, whose losses are 0) get the masked mean instead: ``.mean(dim=-1)``
    would count the padding, so a record's loss would depend on its batch's longest record.
    ``[B, B]`` losses from ``outputs [B, 1]`` against ``targets [B]`` (or the reverse; ``outputs``
    ``None``: the targets alone are read) are a broadcast, each record's output against every
    record's target: the advice is to give both the same shape, not to reduce (the
    per-output clause's ``.mean(dim=-1)`` came first and led to the "not per-sample" error)."""
    if shape is None or b is None:
        return ""
    if shape == ():
        return " (a scalar: a loss reduced over the batch; use reduction='none')"
    if len(shape) == 2 and shape == (b, 1):
        return " (a trailing dimension of 1: compare outputs.squeeze(-1) with the targets)"
    if b > 1 and shape == (b, b) and (pair := _broadcast_pair(b, outputs, targets)) is not None:
        o, t = ("?" if x is None else "[B, 1]" if len(x) == 2 else "[B]" for x in pair)
        how = (f"outputs {o} against targets {t}" if o != t else
               f"outputs and targets both {t}, one unsqueezed inside the loss (o.unsqueeze(-1) or [:, None])")
        return (f" (a broadcast, not a loss per output: {how} give [B, B] = [{b}, {b}], every record's output "
                "against every record's target; give the two the same shape inside the loss, e.g. "
                "outputs.squeeze(-1) or targets.reshape(-1) -- reducing the [B, B] losses would mix the records)")
    if (len(shape) == 2 and shape[0] == b and isinstance(targets, Tensor) and tuple(targets.shape) == shape
            and not targets.is_floating_point() and bool((targets < 0).any())):
        ignore = int(targets[targets < 0][0])
        return (f" (a loss per record and per token, {shape[1]} of them; the targets hold {ignore}, an ignore_index "
                f"(padding), whose entries are 0: .mean(dim=-1) would count them, so a record's loss would change "
                f"with its batch's longest record. Reduce each record to its own term of the training loss: "
                f"losses.sum(-1) / (targets != {ignore}).sum(-1) when training averages each record's tokens; "
                f"when it averages every kept token of the batch (cross_entropy over the flattened batch), "
                f"losses.sum(-1) divided by the mean count of kept tokens per record over the training set)")
    if len(shape) >= 2 and shape[0] == b:
        dims = -1 if len(shape) == 2 else tuple(range(1, len(shape)))
        return (f" (a loss per record and per output, {' x '.join(str(k) for k in shape[1:])} of them: reduce "
                f"each record's entries to its own term of the training loss, e.g. .mean(dim={dims}) when "
                "training averages over every entry, .sum(dim=...) when it sums over the outputs)")
    return ""


def check_record_dimension(inputs: Any, targets: Any, what: str) -> int | None:
    """The number of records ``B`` of a batch, checked: every tensor leaf of ``inputs`` and
    ``targets`` with a dimension must have ``B`` rows, since record ``i`` is row ``i`` of each
    (per-sample gradients by ``vmap`` over the first dimension, per-record slicing and hashes).
    A concatenated layout -- graphs batched as PyG does, every molecule's atoms stacked with a
    ``batch`` index and edges ``[2, E]`` -- has no such dimension: its per-record gradients
    would be taken over atoms (the loss was then blamed for "shape [32], not [B] =
    [1024]", or the forward failed on an edge list cut to one row).

    Returns:
        ``B``, the rows of the first tensor leaf of ``inputs`` (``targets`` when it has none);
        ``None`` when no leaf has a dimension (left to the callers' own checks).

    Raises:
        ValueError: tensors of different first dimensions; names ``what``, each tensor's path
            and shape, and the padded layout to use instead.
    """
    pytree = torch.utils._pytree
    sized = [(f"{side}{pytree.keystr(path)}", t) for side, tree in (("inputs", inputs), ("targets", targets))
             for path, t in pytree.tree_flatten_with_path(tree)[0] if isinstance(t, Tensor) and t.dim() > 0]
    if not sized:
        return None
    b = int(sized[0][1].shape[0])
    if any(int(t.shape[0]) != b for _, t in sized):
        shapes = ", ".join(f"{p} {list(t.shape)}" for p, t in sized)
        raise ValueError(
            f"{what}: the batch's tensors do not share a first (record) dimension: {shapes}. Record i must be "
            "row i of every tensor of the batch (the per-sample gradients map over the first dimension); a "
            "concatenated layout (graphs batched as PyG does: the atoms of every molecule stacked, with a "
            "batch index, and edges [2, E]) cannot be split into records. Collate each record padded to the "
            "batch's largest instead (atoms [B, N, F] with a node mask, edges [B, 2, E] with an edge mask, "
            "padding with 0 at the end), or use mis_lightning.data.graphs' padded graphs")
    return b


def _record_tolerances(dtype: torch.dtype, scale: float) -> tuple[float, float]:
    """``(rtol, atol)`` for a record computed alone against its row in the batch: the two round
    differently (bf16/fp16, e.g. a "bf16-true" training, by up to a few eps), which a mixing of
    records exceeds by far. ``1e-6`` relative in float64, ``max(1e-4, 8 eps)`` otherwise, and
    an absolute ``rtol * scale + 16 eps * max(scale, 1)``."""
    tol = 1e-6 if dtype == torch.float64 else max(1e-4, 8 * torch.finfo(dtype).eps)
    return tol, tol * scale + 16 * torch.finfo(dtype).eps * max(scale, 1.0)


def check_record_losses(loss_fn: Any, outputs: Any, targets: Any, losses: Tensor, what: str,
                        records: int = 8) -> None:
    """Check that ``losses [B]`` (``loss_fn(outputs, targets)``) are per-sample, in value
    (:func:`check_record_values`) and in gradient (:func:`check_record_gradients`, its first 2
    records).

    Raises:
        ValueError: as those two.
    """
    check_record_values(loss_fn, outputs, targets, losses, what, records)
    check_record_gradients(loss_fn, outputs, targets, what, min(records, 2))


def check_record_values(loss_fn: Any, outputs: Any, targets: Any, losses: Tensor, what: str,
                        records: int = 8) -> None:
    """Check that the VALUES ``losses [B]`` (``loss_fn(outputs, targets)``) are per-sample:
    ``loss_fn`` on the outputs and targets of each of the first ``records`` records alone must
    give that record's entry, to ``1e-6`` relative in float64, ``1e-4`` in float32 and ``8 eps``
    in bfloat16 / float16, plus ``16 eps`` absolute (see :meth:`PerSampleProgram.check_per_sample`).
    A ``mis_per_sample_loss(batch)`` hook is checked with ``outputs`` the batch and ``loss_fn``
    the hook on it (``streaming._HookProgram``).

    Raises:
        ValueError: naming ``what``: losses that are not floating point or not finite, or (with
            the outputs' and targets' shapes) the first record whose loss differs.
    """
    k = min(int(losses.shape[0]), records)
    if not losses.is_floating_point():
        raise ValueError(f"{what} returned {str(losses.dtype).removeprefix('torch.')} losses: per-sample losses "
                         "must be floating point (a loss computed on class indices or rounded?)")
    bad = (~torch.isfinite(losses)).nonzero().reshape(-1)
    if bad.numel():  # a NaN would also fail the comparison below, with a misleading message
        raise ValueError(f"{what} returned non-finite losses (NaN or inf) for {bad.numel()} of {losses.shape[0]} "
                         f"records (first: record {int(bad[0])}, {float(losses[bad[0]])}); the loss must be "
                         "finite at the model's weights")
    scale = float(losses[:k].abs().max()) if k else 0.0
    tol, atol = _record_tolerances(losses.dtype, scale)
    for i in range(k):
        one = loss_fn(_rows(outputs, i), _rows(targets, i))
        ok = isinstance(one, Tensor) and one.numel() == 1
        v = float(one.reshape(())) if ok else math.nan
        if not ok or not math.isclose(v, float(losses[i]), rel_tol=tol, abs_tol=atol):
            alone = f"{v:.6g}" if ok else (list(one.shape) if isinstance(one, Tensor) else type(one).__name__)
            raise ValueError(
                f"{what} is not per-sample: the loss of record {i} computed alone is {alone} "
                f"but entry {i} of the batch's losses is {float(losses[i]):.6g}. The losses "
                "mix records, typically by broadcasting outputs [B, 1] against targets [B] "
                "(or [B] against [B, 1]) to [B, B] and reducing back to [B]; give outputs "
                "and targets the same shape (e.g. outputs.squeeze(-1) or targets.reshape(-1)). "
                "Or by a normalisation over the batch (dividing by the batch's count of observed "
                "labels or kept tokens, mask.sum() over the batch, a batch mean): divide each record's "
                "sum by its own count (mask.sum(-1)), or by a constant of the training set (the mean "
                "count per record) if that is the objective trained"
            )


# check_record_gradients: a record's gradient in another record's outputs, relative to its largest
# entry, above which the loss mixes records. A per-record loss gives exactly 0 there where no path
# in the graph joins the records; a path whose gradient cancels analytically (a shift by the batch's
# max, o - o.max(), under a softmax) leaves rounding there: 0.4 eps in bfloat16 (rv53b), hence
# CROSS_GRADIENT_EPS of the dtype's eps where that is larger, 4 eps: bf16's 0.031, 8x under the 1/4
# of a batch mean over the 4 records checked (16 eps, 0.125, would pass it)
CROSS_GRADIENT_TOL = 1e-6
CROSS_GRADIENT_EPS = 4
# the batch's first records the loss is taken on for check_record_gradients: 4, each record's loss
# differentiated in the outputs of 3 others (a batch mean's cross term is then 1/4). The check's cost
# is the loss's forward and 2 backward passes on these records, which on a language model's logits
# ([B, 256, 32000] float32) is seconds and a GB (rv53b: 4.8 s, 2.1 GB peak with 8 records)
GRADIENT_CHECK_RECORDS = 4
# switch (ux54b, A/B): True, the leaves the loss is differentiated in are the outputs themselves
# (detached, a copy only for an inference tensor) and each gradient's largest entries are read by
# one max-norm reduction per record row; False: the s53 path (8 records, a copy of the outputs, two
# |g| copies per backward). The check raises on the same losses either way (tests/test_estimation_conditions.py)
GRADIENT_CHECK_LEAN = True


def _off_row_gradient(loss_fn: Any, outputs: Any, targets: Any, records: int,
                      rows: int | None = None) -> tuple[int, int, float] | None:
    """``(i, j, ratio)``: the first record ``i < records`` whose loss has a gradient in the
    outputs of another record ``j`` of the batch's first ``rows`` records (default
    :data:`GRADIENT_CHECK_RECORDS`; the loss on those alone: its graph, e.g. a language model's
    softmax over the vocabulary, is kept for the ``records`` backward passes), ``ratio`` its
    largest entry there over the largest of that loss's gradient anywhere; ``None`` where there
    is none, or nothing to check (one record, no floating output holding the records in dim 0,
    a loss autograd cannot differentiate in its outputs)."""
    lean = GRADIENT_CHECK_LEAN
    rows = rows if rows is not None else (GRADIENT_CHECK_RECORDS if lean else 8)
    b = _batch_size(outputs)
    first = lambda t: t[:rows] if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t  # noqa: E731
    outputs, targets = torch.utils._pytree.tree_map(first, (outputs, targets))
    leaves, spec = torch.utils._pytree.tree_flatten(outputs)
    b = min(b, rows)
    idx = [n for n, t in enumerate(leaves) if isinstance(t, Tensor) and t.is_floating_point() and t.dim()
           and t.shape[0] == b]
    if not idx or b < 2:
        return None

    def leaf(t: Tensor) -> Tensor:  # a tensor autograd can differentiate in, the caller's left untouched
        t = t.detach()
        return (t.clone() if t.is_inference() or not lean else t).requires_grad_(True)

    def row_max(g: Tensor) -> Tensor:  # [b]: each record row's largest |entry|
        flat = g.reshape(b, -1)
        return torch.linalg.vector_norm(flat, math.inf, dim=1) if lean else flat.abs().amax(1)

    with torch.enable_grad():
        free = {n: leaf(leaves[n]) for n in idx}
        losses = loss_fn(torch.utils._pytree.tree_unflatten([free.get(n, t) for n, t in enumerate(leaves)], spec),
                         targets)
        if not (isinstance(losses, Tensor) and losses.requires_grad and tuple(losses.shape) == (b,)):
            return None
        for i in range(min(records, b)):
            got = torch.autograd.grad(losses[i], list(free.values()), retain_graph=True, allow_unused=True)
            grads = [g for g in got if g is not None]
            if not grads:
                continue
            tol = max(CROSS_GRADIENT_TOL, CROSS_GRADIENT_EPS * max(torch.finfo(g.dtype).eps for g in grads))
            off = torch.stack([row_max(g).double() for g in grads]).amax(0)
            scale = float(off.max()) if lean else max(float(g.abs().max()) for g in grads)
            del got, grads  # the gradients' memory (a language model's logits) before the next backward
            off[i] = 0
            j = int(off.argmax())
            if float(off[j]) > tol * scale:
                return i, j, float(off[j]) / scale
    return None


def check_record_gradients(loss_fn: Any, outputs: Any, targets: Any, what: str, records: int = 2) -> None:
    """Check that each of the first ``records`` records' losses has no gradient in the other
    records' outputs among the batch's first :data:`GRADIENT_CHECK_RECORDS` (one backward through
    the loss on those each, not through the model).

    A loss whose VALUE is per-record but whose gradient is not, e.g. ``l - l.mean() +
    l.mean().detach()``, passes :func:`check_record_losses` (a record alone gives its entry)
    but each record's gradient alone is another function's (here 0: its value is a constant):
    the assessment then found that no record's gradient differs from the others' after the
    whole training. A per-record loss reads record ``j``'s outputs only for record ``j``,
    so autograd's cross terms are exactly 0 (label smoothing, masks and reductions over a
    record's tokens, ``ignore_index`` included); the threshold, ``CROSS_GRADIENT_TOL = 1e-6`` of the
    largest entry of that record's gradient (``CROSS_GRADIENT_EPS = 4`` of the dtype's eps where
    larger: 16-bit outputs), only keeps clear of rounding-level noise (a gradient-neutral shift by
    the batch's max, ``o - o.max()``, leaves 0.4 eps in bfloat16). Skipped where the loss cannot be
    differentiated in the outputs (:func:`_off_row_gradient`).

    Raises:
        ValueError: naming ``what``, the two records and the cure.
    """
    try:
        found = _off_row_gradient(loss_fn, outputs, targets, records)
    except Exception:  # noqa: BLE001 - inference tensors, a loss on integers: the estimation reports its own errors
        return
    if found is None:
        return
    i, j, ratio = found
    raise ValueError(
        f"{what} mixes the records through its gradient: the loss of record {i} has a gradient in the outputs "
        f"of record {j} ({ratio:.3g} of its largest entry), though each record's loss value is its own. The "
        "assessment takes each record's gradient from that record alone, where such a loss is another "
        "function (l - l.mean() + l.mean().detach() is a constant there, with gradient 0: the assessment "
        "then fails at the end of training with 'no record's gradient differs from the others''). "
        "Compute each record's loss from its own outputs and targets only, without batch statistics "
        "(a mean, a normalisation, a detached correction over the batch)")


def check_loss_batches(loss_fn: Any, outputs: Any, targets: Any, what: str) -> None:
    """Check that ``loss_fn`` runs under ``torch.func.vmap`` as the per-sample gradients call it
    (one record's outputs and targets with a batch dimension of 1), on the first two records.

    A loss with data-dependent Python control flow or ``.item()`` cannot: torch's own
    ``F.gaussian_nll_loss`` tests ``torch.any(var < 0)``. The estimation would then fail
    with torch's bare vmap error, which names neither the loss nor the model; probing the loss
    alone on outputs already computed tells the two apart.

    Raises:
        ValueError: naming ``loss_fn`` (``what``) and torch's message.
    """
    k = min(2, _batch_size(outputs))
    first = lambda t: t[:k] if isinstance(t, Tensor) else t  # noqa: E731
    o, y = torch.utils._pytree.tree_map(first, outputs), torch.utils._pytree.tree_map(first, targets)
    try:
        vmap(lambda oi, yi: loss_fn(_unsqueeze(oi), _unsqueeze(yi)).reshape(()))(o, y)
    except RuntimeError as exc:
        if "vmap" not in str(exc):
            raise
        raise ValueError(
            f"{what} cannot run under torch.func.vmap, which the per-record gradients need ({exc}): the "
            "loss must be written with tensor operations only, without Python control flow on tensor "
            "values or .item() (torch.nn.functional.gaussian_nll_loss checks torch.any(var < 0): write the "
            "Gaussian negative log-likelihood as 0.5 * (var.log() + (out - target) ** 2 / var))") from exc


def check_forward(model: nn.Module, what: str) -> None:
    """Refuse a model whose class defines no ``forward`` (nn.Module's default raises a bare
    ``NotImplementedError``; a LightningModule whose ``training_step`` calls ``self.net(x)`` has
    none), before the assessment calls ``model(inputs)``.

    Raises:
        NotImplementedError: naming ``what``, the class and the two cures.
    """
    if "forward" in vars(model):  # set on the instance
        return
    # the class that defines it: nn.Module's, or LightningModule's, which only calls nn.Module's
    owner = next((c for c in type(model).__mro__ if "forward" in vars(c)), nn.Module)
    if owner is not nn.Module and not (owner.__name__ == "LightningModule"
                                       and owner.__module__.endswith("core.module")):
        return
    name = type(model).__name__
    raise NotImplementedError(
        f"{what}{name} defines no forward method: the assessment calls the model as it is released, "
        f"model(inputs), on each (inputs, targets) batch, and nn.Module's default forward raises. Define "
        f"forward(self, x) on {name} (e.g. return self.net(x)), or, on a LightningModule, "
        f"mis_per_sample_loss(self, batch) -> per-sample losses [B] computed as training_step does "
        f"(docs/lightning.md)")


def check_record_outputs(forward: Callable[[Any], Any], inputs: Any, outputs: Any, what: str,
                         records: int = 2) -> None:
    """Check that the model's outputs are per-record: ``forward`` on each of the first
    ``records`` records of ``inputs`` alone must give that record's row of ``outputs`` (the
    batch's), to the tolerances of :func:`check_record_losses` relative to the batch's largest
    output. Per-sample gradients are taken on one record at a time; a forward that mixes the
    records of a batch (centring by the batch mean, attention or pooling across the batch,
    BatchNorm on batch statistics) makes them describe another function, and every figure
    silently wrong. Skipped when a tensor of ``inputs`` or ``outputs`` does not hold the
    records in dim 0 (its leading size is not the batch's): such layouts are not split by
    record anywhere.

    Raises:
        ValueError: naming ``what``, the record and how far its output alone is from its row.
    """
    in_leaves = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
    out_leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, Tensor)]
    if not in_leaves or not out_leaves or in_leaves[0].dim() == 0:
        return
    b = int(in_leaves[0].shape[0])
    if b < 2 or any(t.dim() == 0 or t.shape[0] != b for t in in_leaves + out_leaves):
        return
    floats = [t for t in out_leaves if t.is_floating_point()]
    if not floats:
        return
    scale = max(float(t.abs().max()) for t in floats)
    _, atol = _record_tolerances(floats[0].dtype, scale)
    for i in range(min(records, b)):
        try:
            one = forward(_rows(inputs, i))
        except Exception:  # a model that needs more than one record (x.squeeze()): not this check's business
            return
        alone = [t for t in torch.utils._pytree.tree_leaves(one) if isinstance(t, Tensor)]
        if len(alone) != len(out_leaves):
            return
        for a, o in zip(alone, out_leaves):
            if not o.is_floating_point() or a.shape != o[i: i + 1].shape:
                continue
            gap = float((a.to(o.dtype) - o[i: i + 1]).abs().max())
            if not gap <= atol:
                _check_deterministic(forward, inputs, i, alone, atol, scale, what)  # random, not mixing?
                raise ValueError(
                    f"{what}: the model's output for record {i} computed alone differs from its row in the "
                    f"batch of {b} (largest difference {gap:.3g}, outputs up to {scale:.3g}): the forward pass "
                    "mixes the records of a batch (e.g. x - x.mean(0), normalisation or attention across the "
                    "batch dimension). The indicator needs each record's output to depend on that record "
                    "only (per-sample gradients are taken one record at a time); compute batch statistics "
                    "in training only, or fix them as buffers for evaluation")


def _check_deterministic(forward: Callable[[Any], Any], inputs: Any, i: int, first: list[Tensor], atol: float,
                         scale: float, what: str) -> None:
    """Record ``i`` alone through ``forward`` a second time: outputs that differ from ``first``
    (its first run) beyond ``atol`` come from a random forward (MC dropout, noise), not from one
    that mixes records, which :func:`check_record_outputs` would otherwise name. The
    caller's RNG is isolated (both front ends), so the second draw changes no user state.

    Raises:
        ValueError: naming ``what``, how far the two runs are apart and what to do.
    """
    gap = 0.0
    for _ in range(5):  # a random forward can repeat a draw (one record, few dropout units): up to 5 tries
        try:
            again = [t for t in torch.utils._pytree.tree_leaves(forward(_rows(inputs, i))) if isinstance(t, Tensor)]
        except Exception:  # noqa: BLE001 - it ran once: the caller's error stands
            return
        gap = max([float((b.to(a.dtype) - a).abs().max()) for a, b in zip(first, again)
                   if a.is_floating_point() and a.shape == b.shape] or [0.0])
        if not gap <= atol:
            break
    if not gap <= atol:
        raise ValueError(
            f"{what}: the forward pass is random even in eval mode: record {i} computed alone twice gives outputs "
            f"{gap:.3g} apart (outputs up to {scale:.3g}), e.g. dropout applied with training=True "
            "(F.dropout(x, p, training=True), Monte Carlo dropout), noise or sampling in forward. The indicator "
            "scores a deterministic function of the weights (per-sample gradients and curvature of one output "
            "per record): assess the model with that randomness off in eval mode (nn.Dropout, or "
            "F.dropout(x, p, self.training)); the figures then describe the mean-field model, not each random draw")


def _rows(tree: Any, i: int) -> Any:
    """Record ``i`` of every tensor in a pytree, keeping a batch dimension of 1."""
    return torch.utils._pytree.tree_map(lambda t: t[i : i + 1] if isinstance(t, Tensor) else t, tree)


def _unsqueeze(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, tree)


def _to(tree: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return torch.utils._pytree.tree_map(move, tree)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default floating dtype set to the compute dtype for the block (restored after,
    even on error): a float tensor a ``forward`` creates without a dtype (``torch.zeros(B, H)``,
    the initial state of an ``nn.LSTMCell`` loop) then meets the float64 activations of the
    estimation's copy in its own dtype instead of failing a one-dtype kernel."""
    old = torch.get_default_dtype()
    if dtype == old or dtype not in (torch.float32, torch.float64):
        yield
        return
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def plain_embedding_gradients(model: nn.Module) -> None:
    """``sparse=False`` and ``scale_grad_by_freq=False`` on the embeddings of a (private) model
    copy: the loss's own gradient, densely laid out.

    ``sparse=True`` only lays out the weight's gradient as a sparse tensor (for ``SparseAdam``):
    the same values, but torch.func's vmap cannot batch it ("Could not run 'aten::view' with
    arguments from the 'SparseCPU' backend"). ``scale_grad_by_freq=True`` divides each row's
    gradient by its index's count in the *mini-batch* -- a training device, not the loss's
    gradient, and per record under vmap a different one again (its count within the record):
    the sandwich needs ``grad l(z, theta)`` (method.md section 4). With the flag the figures read
    4.6% lower than those of the same weights without it; now equal."""
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            m.sparse = False
            m.scale_grad_by_freq = False


@contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """torch's fused attention fast path off for the block (the flag restored after, even on
    error). In eval mode ``nn.TransformerEncoder`` (``enable_nested_tensor=True``, the default)
    given a ``src_key_padding_mask`` checks the mask with
    ``torch._nested_tensor_from_mask_left_aligned`` before it looks at gradients, and vmap has no
    batching rule for it: every torch.func per-sample gradient failed. The fast path is an
    inference kernel of the same function (nested tensors, fused layers); the estimation
    differentiates the plain modules."""
    old = torch.backends.mha.get_fastpath_enabled()
    if not old:
        yield
        return
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def attention_twice_differentiable() -> Any:
    """Within it, ``F.scaled_dot_product_attention`` (which ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` call) runs torch's math backend, for passes that differentiate
    the forward twice: the fused CPU kernel's backward has no derivative ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented": every
    Hutchinson pass and every ``mis_per_sample_loss`` hook's Hessian diagonal through attention
    failed). The math backend is the same function written in differentiable operations."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


#: torch's notice that vmap falls back to a loop over an operator without a batching rule
#: ("There is a performance drop because we have not yet implemented the batching rule for
#: aten::_scaled_dot_product_flash_attention_for_cpu. Please file us an issue ...", and its
#: ``_backward``: every CPU ``nn.MultiheadAttention`` / ``F.scaled_dot_product_attention`` model,
#: nu41b). A regex matched at the message's start (``warnings.filterwarnings``).
VMAP_FALLBACK_WARNING = r"There is a performance drop because we have not yet implemented the batching rule for"


def vmap_fallback_quiet() -> ignoring:
    """Within it, torch's :data:`VMAP_FALLBACK_WARNING` (a ``UserWarning``) is not shown: the
    estimation's own ``vmap`` passes raise it, not the user's code, and the user can do nothing
    about it (the result is right, only slower). Every other warning passes as the user's filters
    say, and the user's warnings state is left as it was (:func:`~mis_lightning._warning_filters.
    ignoring`: filters added inside stay, shown-once registries are not reset)."""
    return ignoring((VMAP_FALLBACK_WARNING, UserWarning))


@contextmanager
def packed_sequence_watch(model: nn.Module) -> Iterator[list[str]]:
    """Within it, the recurrent layers (``nn.RNNBase``: RNN, LSTM, GRU) that any forward
    (``model``'s or a private copy's) runs on a ``PackedSequence`` are listed by type, so that an
    estimation failure there can be named: torch's packed recurrent kernels read the data pointers
    of their inputs, which tensors under ``torch.func`` transforms do not have ("Cannot access
    data pointer of Tensor that doesn't have storage"), whether or not the layer's weights are
    assessed. A module-level forward pre-hook, only while ``model`` holds such a layer."""
    seen: list[str] = []
    if not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        yield seen
        return

    def hook(module: nn.Module, args: tuple) -> None:
        if isinstance(module, nn.RNNBase) and args and isinstance(args[0], nn.utils.rnn.PackedSequence):
            seen.append(type(module).__name__)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def packed_sequence_error(model: nn.Module, seen: list[str], exc: BaseException) -> ValueError:
    """The error for an estimation pass that failed where recurrent layers ran on a
    ``PackedSequence`` (:func:`packed_sequence_watch`), naming the layers and the cure."""
    names = [f"{type(m).__name__} {n!r}" for n, m in model.named_modules()
             if isinstance(m, nn.RNNBase) and type(m).__name__ in seen]
    return ValueError(
        f"{type(model).__name__}'s forward runs {', '.join(names) or ', '.join(dict.fromkeys(seen))} on a "
        f"PackedSequence (nn.utils.rnn.pack_padded_sequence), which the per-sample gradients (torch.func) "
        f"cannot run: torch's packed recurrent kernel reads its inputs' storage ({exc}), also where the "
        "layer's own weights are not assessed. Run the layer on the padded batch instead and take each "
        "record's last valid step, out[torch.arange(len(lengths)), lengths - 1] (the same outputs for a "
        "unidirectional layer), at least when not self.training")


#: torch's DeprecationWarning from ``torch.jit.script``, which torch's own
#: ``torch._decomp.decompositions_for_jvp`` calls at its import, on the process's first forward-AD
#: dual tensor (``torch.func.jvp`` / ``jacfwd`` inside the exact Hessian and the leverage factors):
#: raised inside torch's call, about torch's code, and it escaped ``MISIndicator.compute()`` and
#: the callback's assessment (ux48; attributed to torch/jit/_script.py, shown under pytest or -W)
JIT_SCRIPT_DEPRECATION = r"`torch\.jit\.script` is deprecated"
_FORWARD_AD_LOADED = False


def load_forward_ad_decompositions() -> None:
    """Load torch's forward-AD decompositions once per process, before the first ``jvp`` /
    ``jacfwd``, with their import's :data:`JIT_SCRIPT_DEPRECATION` filtered (torch loads them
    at the first dual tensor anyway, under the same conditions: ``PYTORCH_JIT`` and ``__debug__``);
    a later call returns at once. A torch without the loader: nothing to do."""
    global _FORWARD_AD_LOADED
    if _FORWARD_AD_LOADED:
        return
    _FORWARD_AD_LOADED = True
    load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if load is not None:
        with ignoring((JIT_SCRIPT_DEPRECATION, DeprecationWarning)):
            load()


def cast_tensor_attributes(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating tensors a (private) model copy holds as plain attributes to ``dtype``.

    Parameters and buffers are passed to ``functional_call`` in the compute dtype; a tensor
    kept as a plain attribute (class weights a ``mis_per_sample_loss`` hook or ``forward``
    uses) would otherwise stay in the model's dtype and fail a one-dtype kernel.
    """
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
                object.__setattr__(module, key, value.detach().to(dtype))


#: layers whose torch kernels do not batch under a vmap over the records (the recurrent ones)
RECURRENT_LAYERS: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)


def has_recurrent_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds a recurrent layer (:data:`RECURRENT_LAYERS`)."""
    return any(isinstance(m, RECURRENT_LAYERS) for m in model.modules())


@dataclass
class LossProgram:
    """A model, its per-sample loss and the batch layout, as pure functions of the parameters.

    Args:
        model: the trained model (read only: a private copy is evaluated, in eval mode whatever
            its ``training`` flag, through ``functional_call``, so the model, its buffers, its
            flags and its attributes stay bit-identical).
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (no reduction).
        param_names: the parameters to differentiate (the assessed ones); the others are
            held fixed.
        batch_fn: ``batch -> (inputs, targets)``.
        dtype: compute dtype for parameters and float inputs (float64 for small models
            gives exact-sandwich accuracy; float32 otherwise).
    """

    model: nn.Module
    loss_fn: LossFn
    param_names: list[str]
    batch_fn: BatchFn = default_batch_fn
    dtype: torch.dtype = torch.float32

    #: the per-sample losses call ``model(inputs)`` (not a hook of the model's own)
    calls_forward = True

    def __post_init__(self) -> None:
        if self.calls_forward:
            check_forward(self.model, "")
        named = dict(self.model.named_parameters())
        missing = [n for n in self.param_names if n not in named]
        if missing:
            raise KeyError(f"parameters not in the model: {missing}; the model has {list(named)}")
        # A private copy: whatever the forward does (attributes it sets, buffers it updates,
        # counters) lands on the copy, never on the caller's model; its parameters and buffers
        # are the functional ones. A model that cannot be deep-copied (a lock, an open file)
        # is read in place with clones of its tensors: its quantized copies fail later, each
        # with that error, while the unquantized baseline is still assessed.
        original = self.model
        try:
            self.model = private_copy(self.model, "copying the model for the per-sample loss program")
            own = False
        except ModelCopyError:
            own = True
        else:
            cast_tensor_attributes(self.model, self.dtype)
            plain_embedding_gradients(self.model)
        named = dict(self.model.named_parameters())
        self.device = next(iter(named.values())).device if named else torch.device("cpu")
        self._second_order = 0  # depth of second_derivatives() (norms written out)

        def private(t: Tensor) -> Tensor:
            t = t.detach().to(self.dtype) if t.is_floating_point() else t.detach()
            return t.clone() if own else t

        self.params = {n: private(named[n]) for n in self.param_names}
        self.fixed = {n: p.detach().to(self.dtype) if p.is_floating_point() else p.detach()
                      for n, p in named.items() if n not in self.params}
        self.buffers = {n: private(b) for n, b in self.model.named_buffers()}
        self._checked = False
        self.output_layout: OutputShape | None = None  # set on the first batch (prepare)
        # entries of a tensor output no record's loss has read so far (output_reads.unread_entries), None: all read
        self.unread_mask: Tensor | None = None
        # whether prepare looks for them: only the exact estimator's kept factors read the mask (the
        # MomentAccumulator sets it); the search costs ~4 copies of the first batch's output and a
        # backward (a [16, 256, 8000] float32 output: +0.5 GB peak, 1.1 s; rv53)
        self.count_unread = True
        # records one at a time where the forward holds a recurrent layer (frozen or not): torch's
        # RNN kernels do not batch under a vmap over the records ("output with shape [1, H] doesn't
        # match the broadcast shape [B, 1, H]"); vmaps over tangents or directions of one record do
        self.looped = has_recurrent_layers(self.model)
        # the first batch checks that the forward reads every trainable parameter through the
        # substitution (a closure, container or view holding the tensor would not: SwapCheck)
        self._swap_check: SwapCheck | None = SwapCheck(original, self.model, self.param_names)

    @contextmanager
    def second_derivatives(self) -> Iterator[None]:
        """Within it, the forward (:meth:`outputs`) evaluates every ``F.layer_norm`` /
        ``torch.layer_norm`` call with a weight written out in mean / variance
        (:class:`~.norm_derivatives.WrittenOutLayerNorm`; a module's and a functional call's
        alike), for passes that differentiate the forward twice: torch.func's second derivatives
        through torch's kernel can be wrong (norm_derivatives' docstring). First-order passes run
        outside it, on torch's kernel (its first derivatives are right, and cheaper)."""
        self._second_order += 1
        try:
            yield
        finally:
            self._second_order -= 1

    @contextmanager
    def _norms(self) -> Iterator[None]:
        """Within :meth:`second_derivatives`: layer norms written out, attention on the math backend."""
        if not self._second_order:
            yield
            return
        with WrittenOutLayerNorm(), attention_twice_differentiable():
            yield

    @property
    def callee(self) -> nn.Module:
        """The module :meth:`outputs` calls on the inputs: the private model (a hook's program: a
        shell whose forward is the hook)."""
        return self.model

    # -- pure functions ---------------------------------------------------------------
    def outputs(self, params: dict[str, Tensor], inputs: Any) -> Any:
        with eval_mode(self.model), default_dtype(self.dtype), mha_fastpath_off(), self._norms():
            return functional_call(self.model, ({**self.fixed, **params}, self.buffers), (inputs,))

    def _one_loss(self, params: dict[str, Tensor], x: Any, y: Any) -> Tensor:
        out = self.outputs(params, _unsqueeze(x))
        return self.loss_fn(out, _unsqueeze(y)).reshape(())

    def _one_output(self, params: dict[str, Tensor], x: Any) -> Tensor:
        return flat_record(self.outputs(params, _unsqueeze(x)), self.output_layout)

    def prepare(self, batch: Any) -> tuple[Any, Any, int]:
        """Split and move a batch; check once that ``loss_fn`` is per-sample."""
        inputs, targets = self.batch_fn(batch)
        inputs = _to(inputs, self.device, self.dtype)
        targets = _to(targets, self.device, self.dtype)
        b = _batch_size(inputs)
        if not self._checked:
            check_record_dimension(inputs, targets, f"{type(self.model).__name__}'s training batches")
            self.check_swap(inputs)
            self.check_per_sample(inputs, targets, b)  # sets output_layout
            self._checked = True
        elif self.unread_mask is not None:
            # an entry no earlier record read and these losses read is read from now on (as read_later)
            with torch.no_grad():
                now = unread_entries(self.outputs(self.params, inputs), self.loss_fn, targets, b)
            self.unread_mask = self.unread_mask & now if now is not None and now.shape == self.unread_mask.shape \
                else None
        elif isinstance(self.output_layout, OutputTree) and self.output_layout.dropped:
            # a leaf the first batch dropped and these losses read is put back (output_reads.read_later):
            # one forward of the batch without grad, for outputs that drop a leaf only
            with torch.no_grad():
                out = self.outputs(self.params, inputs)
            self.output_layout = read_later(self.output_layout, out, self.loss_fn, targets, b)
        return inputs, targets, b

    def read_rows(self, c: int) -> Tensor | None:
        """The rows of a ``C = c`` output Jacobian the loss reads (bool ``[c]``), ``None`` for all:
        the complement of :attr:`unread_mask` where it has ``c`` entries (a per-batch length that
        differs: all)."""
        mask = self.unread_mask
        return None if mask is None or mask.numel() != c else ~mask

    def random_in_train_mode(self, inputs: Any, b: int, records: int = 4) -> bool:
        """Whether a train-mode forward of the first ``records`` records is random: two forwards
        from two random states give different outputs. The module tree's dropout layers are
        named by :func:`~mis_lightning.assess._stochastic_layers`; this finds the randomness a
        forward writes itself (``F.dropout(x, p, self.training)``, ``torch.dropout``, noise under
        ``if self.training``), which no layer shows. Runs the program's private model on
        copies of its buffers (a BatchNorm's running statistics are not moved), without grad, each
        forward inside an isolated random state (the caller's streams untouched); ``False`` where a
        train-mode forward fails (nothing is told then). A ``mis_per_sample_loss`` hook's program
        runs the hook (:attr:`callee`): its losses in train mode."""
        from .._rng import isolated_rng

        x = torch.utils._pytree.tree_map(
            lambda t: t[:records] if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t, inputs)
        outs = []
        callee = self.callee
        for seed in (1, 2):
            with isolated_rng(seed=seed), torch.no_grad(), _mode(True, self.model, callee), \
                    default_dtype(self.dtype), mha_fastpath_off():
                try:
                    outs.append(functional_call(callee, ({**self.fixed, **self.params},
                                                             {n: t.clone() for n, t in self.buffers.items()}), (x,)))
                except Exception:  # noqa: BLE001 - a forward that fails in train mode: not told
                    return False
        pairs = zip(torch.utils._pytree.tree_leaves(outs[0]), torch.utils._pytree.tree_leaves(outs[1]))
        return any(isinstance(a, Tensor) and isinstance(c, Tensor) and a.shape == c.shape and not torch.equal(a, c)
                   for a, c in pairs)

    def data_dependent_buffers(self, inputs: Any, b: int) -> tuple[list[str], dict[str, Any] | None]:
        """The persistent floating buffers one train-mode forward sets from the records, and the
        candidates that could not be checked with why
        (:func:`~mis_lightning.estimation.data_buffers.probe_data_buffers`, on copies of the
        program's private model; ``inputs`` as :meth:`prepare` returns them)."""
        return probe_data_buffers(self.model, inputs, b, dtype=self.dtype)

    def check_swap(self, inputs: Any) -> None:
        """Once: the outputs of the first batch (its first ``SWAP_CHECK_RECORDS`` records) must not
        depend on a trainable or assessed parameter reached other than through the substitution
        (:class:`~mis_lightning._modelcopy.SwapCheck`).

        Raises:
            ModelCopyError: naming the parameters (and what holds them, where known).
        """
        check, self._swap_check = self._swap_check, None  # drops the references to the user's tensors
        if check is None:
            return
        first = torch.utils._pytree.tree_map(
            lambda t: t[:SWAP_CHECK_RECORDS] if isinstance(t, Tensor) and t.dim() else t, inputs)
        with torch.no_grad():
            check.run(lambda: self.outputs(self.params, first),
                      [*self.params.values(), *self.fixed.values(), *self.buffers.values()],
                      f"checking that {type(self.model).__name__}'s forward reads its parameters through "
                      "the library's substitution")

    def check_per_sample(self, inputs: Any, targets: Any, b: int, records: int = 8) -> None:
        """Check that ``loss_fn`` returns one loss per record, each depending on that record only;
        set :attr:`output_layout` (the output leaves the loss reads, :mod:`~.output_reads`).

        The batch's losses must have shape ``[B]``, and ``loss_fn`` applied to the outputs and
        targets of each of the first ``records`` records alone (rows of the batch's outputs, so
        the model's own batched rounding does not enter) must equal that record's entry in the
        batch's losses, to ``1e-6`` relative in float64 and ``1e-4`` in lower precision, plus
        ``16 eps`` absolute (the loss's own reductions may round differently on one row). A
        loss that broadcasts outputs ``[B, 1]`` against targets ``[B]`` to ``[B, B]`` and
        reduces back to ``[B]`` passes the shape check but mixes the records' losses (an
        ``O(1)`` relative difference); the estimation would then be silently wrong.

        Raises:
            ValueError: naming ``loss_fn``, the shapes of the outputs and targets, and the
                first record whose loss differs.
        """
        with torch.no_grad():
            try:
                out = self.outputs(self.params, inputs)
            except RuntimeError as exc:
                if "dtype" not in str(exc) and "scalar type" not in str(exc):
                    raise
                raise RuntimeError(
                    f"model {type(self.model).__name__}'s forward failed on the library's private copy, whose "
                    f"parameters and buffers are {self.dtype} ({exc}): the forward uses a tensor or module the "
                    "copy does not hold in that dtype -- a tensor created in another dtype inside forward, or a "
                    "forward, hook or lambda set as an instance attribute that reaches the model through a "
                    "global name instead of self (it then runs your model, not the copy)") from exc
            losses = self.loss_fn(out, targets)
            what = self.loss_what(out, targets)
            if not isinstance(losses, Tensor) or tuple(losses.shape) != (b,):
                shape = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                hint = loss_shape_hint(tuple(losses.shape) if isinstance(losses, Tensor) else None, b, targets, out)
                raise ValueError(
                    f"{what} must return per-sample losses of shape [B] = [{b}], got {shape}"
                    + (hint or "; use reduction='none' and reduce each record's entries to one loss")
                )
            # (rv56: before the loss checks, which would blame the loss for an output whose dim 0 is not the records)
            check_records_first(out, b, "the model's output")
            self.check_records(inputs, targets, out, losses, what, records)
            # which output leaves the loss reads (output_reads), from this forward's output: the
            # Jacobians and flattened outputs see those only
            self.output_layout = layout_of(out, None, self.loss_fn, inputs, targets, b)
            # entries of a tensor output no record's loss reads (out[:, :3] of 13): out of the leverages' factors
            self.unread_mask = unread_entries(out, self.loss_fn, targets, b) if self.count_unread else None
        self.check_finite_gradients(inputs, targets, b, what, records)

    def loss_what(self, outputs: Any, targets: Any) -> str:
        """The loss as the first-batch checks' messages name it."""
        return f"loss_fn {_loss_name(self.loss_fn)!r} (model outputs {_describe(outputs)}, targets {_describe(targets)})"

    def check_records(self, inputs: Any, targets: Any, outputs: Any, losses: Tensor, what: str,
                      records: int = 8) -> None:
        """The first batch's per-record checks (:meth:`check_per_sample`, the losses' shape
        checked): the loss per record in value and gradient (:func:`check_record_losses`), under
        vmap (:func:`check_loss_batches`), the model's outputs per record (:func:`check_record_outputs`).

        Raises:
            ValueError: as those checks.
        """
        check_record_losses(self.loss_fn, outputs, targets, losses, what, records)
        check_loss_batches(self.loss_fn, outputs, targets, what)
        check_record_outputs(lambda x: self.outputs(self.params, x), inputs, outputs,
                             f"model {type(self.model).__name__}")

    def check_finite_gradients(self, inputs: Any, targets: Any, b: int, what: str, records: int = 8) -> None:
        """Check that the first ``records`` records' losses have finite gradients in the assessed
        parameters (their losses are finite: :func:`check_record_losses`). A loss that masks
        missing targets after computing on them, ``torch.where(mask, bce(outputs, targets), 0)``
        with NaN targets, has finite values but gradients ``0 x NaN = NaN``; the exact sandwich
        then failed in ``linalg.eigh`` and the diagonal one said that no record's gradient
        differs from the others', after the whole training.

        Raises:
            ValueError: naming ``what``, the parameters and the first record concerned, and the cure.
        """
        k = min(int(b), records)

        def total(p: dict[str, Tensor], x: Any, y: Any) -> Tensor:
            return self.loss_fn(self.outputs(p, x), y).sum()

        def finite(x: Any, y: Any) -> list[str]:
            # plain autograd first: torch.func's grad imports torch._dynamo on its first call in a
            # process (~1 s CPU where no optimizer ran; pf30, tests/test_fresh_process.py)
            try:
                with torch.enable_grad():
                    leaves = {n: t.detach().requires_grad_(True) for n, t in self.params.items()}
                    got = torch.autograd.grad(total(leaves, x, y), list(leaves.values()), allow_unused=True)
                grads = {n: g for n, g in zip(leaves, got) if g is not None}
            except RuntimeError:  # e.g. inference tensors under a validation loop's inference mode
                grads = grad(total)(self.params, x, y)
            return [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]

        first = torch.utils._pytree.tree_map(lambda t: t[:k] if isinstance(t, Tensor) and t.dim() else t,
                                             (inputs, targets))
        try:
            bad = finite(*first)
        except Exception:  # noqa: BLE001 - not this check's concern: the estimation reports its own errors
            return
        if not bad:
            return
        record = next((i for i in range(k) if finite(_rows(inputs, i), _rows(targets, i))), 0)
        raise ValueError(
            f"{what} gives finite losses but non-finite gradients (NaN or inf) in {', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''} (first: record {record}), so every per-record gradient the "
            "assessment needs would be NaN. Typically a loss masking missing targets after computing on them: "
            "torch.where(mask, loss(outputs, targets), 0) with NaN targets drops their values but not their "
            "gradients (0 x NaN = NaN); replace the missing targets before the loss (targets.nan_to_num(), or "
            "torch.where(mask, targets, 0)) and mask the losses after")

    def void_rows(self, inputs: Any, targets: Any, b: int) -> Tensor | None:
        """``[b]`` bool: the records whose targets are all marked missing (NaN floats, integer
        class codes outside ``[0, C)`` such as ``cross_entropy``'s ``ignore_index=-100``, or, in a
        tuple of targets, a float entry that is all 0, e.g. a sample weight) and whose loss is
        exactly 0 at the model's outputs and at two outputs far from them on either side, with an
        exactly zero gradient in the outputs (so in the weights: the loss reads them through the
        outputs); ``None`` when there is no such record.
        Their loss does not depend on the weights: the fit does not see them, so they carry no
        information about the weights and are not members in the sense of the loss (e.g. a
        padded molecule's void atoms). The marks only choose which records to test (so that ordinary batches cost
        nothing); the loss test decides: a record a loss trains on (a hinge past its margin, an
        imputed label) has a nonzero loss at one of the far outputs. A
        ``mis_per_sample_loss`` hook's batches: ``streaming._HookProgram.void_rows``.
        Each candidate is decided on its own loss (before, one trained candidate, e.g. a
        float label 0 beside a sample weight, kept every other one of its batch counted).

        A loss that raises at the far outputs (defined on a bounded range, e.g.
        ``binary_cross_entropy`` on probabilities) leaves the batch's candidates counted, with a
        warning once per program.

        Raises:
            Nothing beyond the loss's and the forward's own errors on those records at their outputs.
        """
        void = self._marked_missing(inputs, targets, b)
        if void is None or not bool(void.any()):
            return None
        idx = void.nonzero().squeeze(1)

        def take(tree: Any) -> Any:
            return torch.utils._pytree.tree_map(
                lambda t: t[idx] if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t, tree)

        k = int(idx.numel())
        y = take(targets)
        float_leaf = lambda t: isinstance(t, Tensor) and t.is_floating_point()  # noqa: E731
        # candidates the loss reads at constant outputs far on either side are trained on: dropped
        # before the forward (vb46: float 0/1 labels beside sample weights mark half the records;
        # their forward was 2x the test's cost)
        template = self._output_template(inputs, b)
        if template is not None:
            keep = torch.ones(k, dtype=torch.bool, device=idx.device)
            try:
                with torch.no_grad():
                    for level in (-10.0, 10.0):
                        probe = torch.utils._pytree.tree_map(
                            lambda t, v=level: t.new_full((k, *t.shape[1:]), v) if float_leaf(t) and t.dim()
                            else t.expand(k, *t.shape[1:]) if isinstance(t, Tensor) and t.dim() else t, template)
                        moved = self.loss_fn(probe, y)
                        if isinstance(moved, Tensor) and moved.dim() and moved.shape[0] == k:
                            # (NaN / inf: 0 x log of an out-of-range output tells nothing; the far
                            # outputs below decide and say so)
                            mv = moved.reshape(k, -1)
                            keep &= ((mv == 0) | ~torch.isfinite(mv)).all(1).to(keep.device)
            except Exception:  # noqa: BLE001 - only narrows which records are tested
                keep[:] = True
            if not bool(keep.all()):
                void[idx[~keep]] = False
                if not bool(keep.any()):
                    return None
                idx, k = idx[keep], int(keep.sum())
                y = take(targets)
        x = take(inputs)
        with torch.no_grad():
            out = self.outputs(self.params, x)
        # every check reads the loss at the outputs only (the loss is a function of them, so a zero
        # gradient in the outputs is a zero gradient in the weights, J' dl/do): one forward of the
        # candidates and no backward through the model (vb46: a quarter of the test's cost on a
        # small multi-task MLP); each record decides for itself (the loss is per record), so a
        # candidate the loss trains on (a label 0 beside a sample weight) does not keep the others
        with torch.inference_mode(False), torch.enable_grad():
            # clones: a validation loop's inference tensors cannot enter a graph
            o = torch.utils._pytree.tree_map(
                lambda t: t.clone().requires_grad_(True) if float_leaf(t) else t.clone() if isinstance(t, Tensor) else t, out)
            yy = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, y)
            losses = self.loss_fn(o, yy)
            if not isinstance(losses, Tensor) or not losses.dim() or losses.shape[0] != k:
                return None
            ok = (losses.detach().reshape(k, -1) == 0).all(1)
            leaves = [t for t in torch.utils._pytree.tree_leaves(o) if float_leaf(t)]
            if losses.requires_grad and leaves and bool(ok.any()):
                for g in torch.autograd.grad(losses.sum(), leaves, allow_unused=True):
                    if g is None:
                        continue
                    if not g.dim() or g.shape[0] != k:  # not one row per record: all or none
                        if bool(g.any()):
                            return None
                        continue
                    ok &= ~(g.reshape(k, -1) != 0).any(1)  # NaN counts as nonzero
        with torch.no_grad():
            # ... and 0 at other outputs: a loss that imputes the missing labels can be exactly 0 and
            # flat at theta-hat (a hinge past its margin); its records are trained on, members (rv45).
            # Every output goes far positive in one probe and far negative in the other, and the two
            # probes sum to -6 o: a margin w'o > m >= 0 that holds at o fails in one of them
            # (binary hinge with either label, per-output hinges, multi-class margins o_y - o_j)
            for shift in (-10.0, 10.0):
                if not bool(ok.any()):
                    break
                try:
                    moved = self.loss_fn(torch.utils._pytree.tree_map(
                        lambda t, s=shift: -3.0 * t + s * (1.0 + t.abs()) if float_leaf(t) else t, out), y)
                except Exception as err:  # noqa: BLE001 - a loss defined on a bounded range of outputs
                    # (binary_cross_entropy on a sigmoid's probabilities raises outside [0, 1]): the
                    # far outputs cannot tell a hinge from a void record, so the candidates stay
                    # counted, said once (rv46: vb46's per-record test reached this and crashed)
                    self._warn_void_untested(int(ok.sum()), f"the loss raised {type(err).__name__}: {str(err)[:120]}")
                    return None
                if not isinstance(moved, Tensor) or not moved.dim() or moved.shape[0] != k:
                    return None
                mv = moved.reshape(k, -1)
                untold = ok & ~torch.isfinite(mv).all(1)
                if bool(untold.any()):  # (0 x log of an out-of-range output: NaN, neither 0 nor proof)
                    self._warn_void_untested(int(untold.sum()), "the loss is not finite there (NaN or inf)")
                ok &= (mv == 0).all(1)
        void[idx[~ok]] = False
        return void if bool(void.any()) else None

    def _warn_void_untested(self, k: int, why: str) -> None:
        """The warning, once per program, for marked records the far outputs could not test (:meth:`void_rows`)."""
        if getattr(self, "_void_untested_said", False):
            return
        self._void_untested_said = True
        warn(
            f"{k} record(s) of a batch have a loss of 0 and no gradient at the model's outputs but could not be "
            f"tested at far outputs for a loss that does not depend on the weights ({why}): they are counted as "
            "members; if the loss never reads them (a sample weight of 0), every figure is lowered by about their "
            "share of the records (a loss on logits, e.g. binary_cross_entropy_with_logits, can be tested)")

    def _marked_missing(self, inputs: Any, targets: Any, b: int) -> Tensor | None:
        """``[b]`` bool: records some target entry of which marks as carrying no label (see
        :meth:`void_rows`): a tensor whose every value in the record is NaN (float) or outside
        ``[0, C)`` (integer; ``C`` the outputs' size along dim 1, read once from one record), or,
        among several target tensors, a float one that is all 0; ``None`` when no tensor target
        has ``b`` rows."""
        leaves = [t for t in torch.utils._pytree.tree_leaves(targets)
                  if isinstance(t, Tensor) and t.dim() and t.shape[0] == b and t[0].numel()]
        if not leaves:
            return None
        marked = torch.zeros(b, dtype=torch.bool, device=leaves[0].device)
        for t in leaves:
            flat = t.reshape(b, -1)
            if t.is_floating_point():
                marked |= torch.isnan(flat).all(1)
                if len(leaves) > 1:
                    marked |= (flat == 0).all(1)
            elif t.dtype != torch.bool and not t.is_complex():
                out_of_range = flat < 0
                if bool((flat >= 0).any()):
                    classes = self._class_count(inputs, b)
                    if classes is not None:
                        out_of_range = out_of_range | (flat >= classes)
                marked |= out_of_range.all(1)
        return marked

    def _class_count(self, inputs: Any, b: int) -> int | None:
        """The outputs' size along dim 1 (the class dimension of ``cross_entropy`` / ``nll_loss``),
        from :meth:`_output_template`; ``None`` where the outputs have no such dimension or the
        forward fails."""
        out = self._output_template(inputs, b)
        return int(out.shape[1]) if isinstance(out, Tensor) and out.dim() >= 2 else None

    def _output_template(self, inputs: Any, b: int) -> Any:
        """One record's outputs (detached), from one forward once per program; ``None`` where
        that forward fails. Only narrows which records :meth:`void_rows` tests."""
        if not hasattr(self, "_void_template"):
            try:
                with torch.no_grad():
                    self._void_template = self.outputs(self.params, torch.utils._pytree.tree_map(
                        lambda t: t[:1] if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t, inputs))
            except Exception:  # noqa: BLE001 - only narrows which records are tested
                self._void_template = None
        return self._void_template

    def per_sample_losses(self, inputs: Any, targets: Any) -> Tensor:
        with torch.no_grad():
            return self.loss_fn(self.outputs(self.params, inputs), targets)

    def per_sample_grads(self, inputs: Any, targets: Any, names: list[str] | None = None,
                         looped: bool = False) -> dict[str, Tensor]:
        """``{name: [B, *shape]}`` per-sample gradients of the loss (vmap of grad; with
        ``looped``, one ``grad`` per record, for a forward that vmap cannot batch, e.g. a
        frozen recurrent encoder)."""
        params = self.params if names is None else {n: self.params[n] for n in names}
        fixed_extra = {} if names is None else {n: p for n, p in self.params.items() if n not in params}

        def one(p: dict[str, Tensor], x: Any, y: Any) -> Tensor:
            return self._one_loss({**fixed_extra, **p}, x, y)

        if not (looped or self.looped):
            return vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)
        rows = [grad(one)(params, _rows_of(inputs, i), _rows_of(targets, i)) for i in range(_batch_size(inputs))]
        return {n: torch.stack([r[n] for r in rows]) for n in params}

    def output_jacobians(self, inputs: Any, looped: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs ``[B, C]`` and per-sample Jacobians ``{name: [B, C, *shape]}`` (with
        ``looped``, one ``jacrev`` per record, for a forward that vmap cannot batch, e.g. a
        frozen recurrent encoder)."""
        def f(p: dict[str, Tensor], x: Any) -> tuple[Tensor, Tensor]:
            o = self._one_output(p, x)
            return o, o.detach()

        if looped or self.looped:
            rows = [jacrev(f, has_aux=True)(self.params, _rows_of(inputs, i)) for i in range(_batch_size(inputs))]
            return torch.stack([o for _, o in rows]), {n: torch.stack([j[n] for j, _ in rows]) for n in self.params}
        # One forward serves both (has_aux), instead of a second vmapped forward for the outputs.
        jac, out = vmap(jacrev(f, has_aux=True), in_dims=(None, 0))(self.params, inputs)
        return out, jac

    def loss_output_derivatives(self, outputs: Tensor, targets: Any, out_shape: OutputShape) -> tuple[Tensor, Tensor]:
        """Per-sample ``dl/do [B, C]`` and ``d2l/do2 [B, C, C]`` of the loss in the (flattened)
        outputs ``[B, C]``; ``out_shape`` from :meth:`output_shape`."""

        def one(o: Tensor, y: Any) -> Tensor:
            return self.loss_fn(unflat_record(o, out_shape), _unsqueeze(y)).reshape(())

        # reverse-over-reverse by autograd (torch.func.hessian's matrix without torch's first
        # forward-AD use, ~0.4 s once per process, pf28, pf29; nor torch.func's grad, whose
        # first call imports torch._dynamo, ~1 s, pf30)
        try:
            g, h = record_loss_derivatives(one, outputs, targets)
            assert h is not None
            return g, h
        except Exception:  # a loss autograd cannot differentiate through vmap: torch.func
            return vmap(grad(one))(outputs, targets), vmap(jacrev(grad(one)))(outputs, targets)

    def loss_output_hessians(self, inputs: Any, targets: Any, out_shape: OutputShape) -> Tensor:
        """Per-sample ``d2l/do2 [B, C, C]`` of the loss in the (flattened) model outputs, without
        the output Jacobians (the diagonal estimator's count of loss directions, ``rank(L_i)``;
        method.md section 4, "Finite-sample (leverage) correction")."""
        with torch.no_grad():
            if self.looped:
                out = torch.stack([self._one_output(self.params, _rows_of(inputs, i))
                                   for i in range(_batch_size(inputs))])
            else:
                out = vmap(self._one_output, in_dims=(None, 0))(self.params, inputs)

        def one(o: Tensor, y: Any) -> Tensor:
            return self.loss_fn(unflat_record(o, out_shape), _unsqueeze(y)).reshape(())

        # Reverse-over-reverse by plain autograd (record_loss_derivatives), not torch.func: the
        # same matrix for this count, without torch's first forward-AD use (jvp decompositions
        # compiled with TorchScript, ~0.4 s once per process; pf28) nor torch.func's grad, whose
        # first call imports torch._dynamo (~1 s in a process that never ran an optimizer; pf30).
        try:
            H = record_loss_derivatives(one, out, targets)[1]
            assert H is not None
            return H
        except Exception:  # a loss autograd cannot differentiate through vmap: torch.func
            return vmap(jacrev(grad(one)))(out, targets)

    def gauss_newton_factors(self, inputs: Any, targets: Any, out_shape: OutputShape) -> tuple[dict[str, Tensor], Tensor]:
        """Each record's Gauss-Newton factors: output Jacobians ``{name: [B, C, *shape]}`` and
        the loss Hessian in the outputs ``[B, C, C]`` (the record's factor is ``J' L J``)."""
        out, jac = self.output_jacobians(inputs)
        _, L = self.loss_output_derivatives(out, targets, out_shape)
        return jac, L

    def record_hessian_products(self, inputs: Any, targets: Any, directions: dict[str, Tensor],
                                reverse: bool = False) -> dict[str, Tensor]:
        """Each record's own loss Hessian ``∇²ℓ_i`` (exact: second derivatives of the model
        included) applied to that record's directions: ``{name: [B, K, *shape]}`` for
        ``directions`` ``{name: [B, K, *shape]}`` (the assessed parameters). Forward-over-reverse
        (``jvp`` of the per-record gradient), or with ``reverse`` reverse-over-reverse (``vjp``
        of it; ``∇²ℓ_i`` is symmetric) for layers whose forward AD is missing or wrong.

        Raises:
            RuntimeError / NotImplementedError: from torch.func, where the model's forward
                cannot be differentiated twice per record (the caller decides what to do)."""
        params = self.params

        def per_record_grad(p: dict[str, Tensor], x: Any, y: Any) -> dict[str, Tensor]:
            return grad(self._one_loss)(p, x, y)

        def hvp(x: Any, y: Any, v: dict[str, Tensor]) -> dict[str, Tensor]:
            if reverse:
                _, fn = torch.func.vjp(lambda p: per_record_grad(p, x, y), params)
                return fn(v)[0]
            return torch.func.jvp(lambda p: per_record_grad(p, x, y), (params,), (v,))[1]

        if not reverse:
            load_forward_ad_decompositions()  # torch's import notice filtered (ux48)
        with self.second_derivatives():
            if not self.looped:
                return vmap(vmap(hvp, in_dims=(None, None, 0)), in_dims=(0, 0, 0))(inputs, targets, directions)
            rows = [vmap(hvp, in_dims=(None, None, 0))(_rows_of(inputs, i), _rows_of(targets, i),
                                                       {n: v[i] for n, v in directions.items()})
                    for i in range(_batch_size(inputs))]
            return {n: torch.stack([r[n] for r in rows]) for n in directions}

    def output_shape(self, inputs: Any) -> OutputShape:
        """Per-record shape of the model's output: a tensor's shape without the batch dim, or the
        :class:`~.output_reads.OutputTree` of a tuple / dict / namedtuple of floating tensors
        sorted on the first batch (:meth:`prepare`): the leaves the loss reads only.

        Raises:
            ValueError: a kept output leaf that is not a floating tensor with the batch in dim 0
                (the Gauss-Newton factors differentiate the loss in every kept output entry).
        """
        with torch.no_grad():
            out = self.outputs(self.params, _unsqueeze(torch.utils._pytree.tree_map(
                lambda t: t[0] if isinstance(t, Tensor) else t, inputs)))
        if isinstance(out, Tensor):
            return tensor_record_shape(out, lambda: self._two_records_output(inputs), "the model's output")
        leaves = torch.utils._pytree.tree_leaves(out)
        layout = self.output_layout
        if not isinstance(layout, OutputTree) or len(layout.kept) != len(leaves):
            raise RuntimeError(f"the model's output is a {type(out).__name__}: its layout is sorted on the first "
                               "batch (prepare) before its shape is read")
        bad = [type(t).__name__ if not isinstance(t, Tensor) else str(t.dtype) for t, k in zip(leaves, layout.kept)
               if k and not (isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 1 and t.shape[0] == 1)]
        if not leaves or bad:
            raise ValueError(f"the model's output is a {type(out).__name__} holding {bad or 'no tensor'}; "
                             f"{OUTPUT_NOT_FLOATING}")
        return with_shapes(layout, out)  # these inputs' shapes (a sequence padded per batch)

    LAYOUT_ATTR = "output_layout"  # the attribute holding the output's layout the per-record reads use

    def record_layout(self) -> OutputShape | None:
        """The output's per-record layout the reads use (:attr:`output_layout`; ``None`` before a batch)."""
        return getattr(self, self.LAYOUT_ATTR)

    @contextmanager
    def layout_as(self, layout: OutputShape | None) -> Iterator[None]:
        """:meth:`record_layout` set to ``layout`` inside the block (a DDP world's measurement on the
        union of the processes' layouts, :func:`~.output_reads.union_layout`), restored after;
        ``None``: unchanged."""
        held = self.record_layout()
        if layout is not None:
            setattr(self, self.LAYOUT_ATTR, layout)
        try:
            yield
        finally:
            setattr(self, self.LAYOUT_ATTR, held)

    def _two_records_output(self, inputs: Any) -> Tensor | None:
        """The model's output on the first two records of ``inputs`` (``None`` where it holds one,
        or the output is not a tensor): :func:`~.output_reads.tensor_record_shape` reads it."""
        if _batch_size(inputs) < 2:
            return None
        with torch.no_grad():
            out = self.outputs(self.params, torch.utils._pytree.tree_map(
                lambda t: t[:2] if isinstance(t, Tensor) else t, inputs))
        return out if isinstance(out, Tensor) else None

    def mean_loss(self, params: dict[str, Tensor], inputs: Any, targets: Any) -> Tensor:
        return self.loss_fn(self.outputs(params, inputs), targets).mean()
