"""The estimation pass as a torchmetrics ``Metric``: :class:`EstimationMetric`.

Its states are the sufficient statistics of the estimation pass (method.md section 4),
filled by :class:`~mis_lightning.estimation.estimate.MomentAccumulator` (the code that
:func:`~mis_lightning.estimation.estimate` runs) and summed / concatenated over processes by
torchmetrics' sync; :meth:`EstimationMetric.estimate` finalizes the synced states into an
:class:`~mis_lightning.estimation.Estimate`. Both front ends that stream records build on it:
:class:`~mis_lightning.metric.MISIndicator` (a subclass that scores on ``compute``) and
:class:`~mis_lightning.callback.MISCallback` (which scores with
:func:`~mis_lightning.assess.score_schemes`); neither imports the other. See
:mod:`mis_lightning.metric` for the distributed semantics (bottom-k record selection).

Also here, shared by the front ends: :data:`HOOK_NAME` (the LightningModule's per-batch loss
hook) and :func:`default_schemes`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ._precision import full_float32
from ._user_warnings import warn
from .assess import _check_model_matches_estimate, select_params
from .config import EstimationConfig, check_user_functions, unexpected_options
from .estimation import Estimate, loss_directions
from .estimation.data_buffers import probe_data_buffers
from .estimation.estimate import LOSS_RANK_RECORDS, MomentAccumulator
from .estimation.linear_factors import LayerProgram
from .estimation.loss_directions import filled_sample, wanted_rows, world_sample
from .estimation.output_reads import (
    PROBE_RECORDS,
    OutputShape,
    OutputTree,
    check_records_first,
    flat_record,
    output_numel,
    read_later,
    shift_outputs,
    sort_outputs,
    tensor_record_shape,
    union_layout,
    with_shapes,
)
from .estimation.per_sample import (
    GRADIENT_CHECK_RECORDS,
    HOOK_CALLS_REFUSED,
    WEIGHTS_OUTSIDE_OUTPUT,
    BatchFn,
    LossFn,
    LossProgram,
    _batch_size,
    _unsqueeze,
    check_record_gradients,
    check_record_outputs,
    check_record_values,
    default_batch_fn,
    default_dtype,
    each_record,
    eval_mode,
)
from .estimation.world_choice import (
    choice_facts,
    gather_objects,
    take_programs,
    world_choice,
    world_estimator,
    world_residual,
)
from .estimation.world_choice import force as force_choice
from .functional.versions import tensor_version
from .quantization import available_schemes

HOOK_NAME = "mis_per_sample_loss"

__all__ = ["HOOK_NAME", "EstimationMetric", "default_schemes", "hook_program"]


def default_schemes() -> list[str]:
    """Three CPU schemes: torchao int8/int4/int2 weight-only where registered, else the
    built-in round-to-nearest ``rtn_int8``/``rtn_int4``/``rtn_int2``.

    Raises:
        Nothing.
    """
    names = set(available_schemes())
    out = []
    for preferred, fallback in (("int8_weight_only", "rtn_int8"), ("intx_weight_only_int4_g32", "rtn_int4"),
                                ("intx_weight_only_int2_g32", "rtn_int2")):
        out.append(preferred if preferred in names else fallback)
    return out


class _Ref:
    """Holds an object without registering or moving it with the Metric; copies (``clone()``)
    share it. Pickling is handled by :meth:`MISIndicator.__getstate__`."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.pending: tuple[Any, Any] | None = None  # (model, how to rebuild the accumulator)

    def __deepcopy__(self, memo: dict) -> _Ref:
        return self

    def __getstate__(self) -> dict:
        return {"obj": None, "pending": None}


class _ByValue:
    """Pickled by value, shared by deep copies (a ``clone()`` must not copy the model), except
    in a deep copy that copies the model too (``copy.deepcopy`` of a module owning the Metric):
    there the copy's model."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __deepcopy__(self, memo: dict) -> _ByValue:
        copied = memo.get(id(self.obj))
        return self if copied is None else _ByValue(copied)


class _NotRecords(Exception):
    """The hook failed on one record's cut of the batch (:meth:`_HookProgram.check_records`)."""


class _HookProgram(LossProgram):
    """A :class:`LossProgram` whose per-sample losses are ``model.mis_per_sample_loss(batch)``.

    The batch is the "input" and a dummy ``[B]`` tensor the "target"; the loss function passes
    the hook's output through. ``functional_call`` runs on a shallow copy of the model (it
    shares the parameter, buffer and submodule dicts, so the functional parameters are seen by
    the hook) whose ``forward`` calls the original model's hook.
    """

    calls_forward = False  # the hook calls the model (or its layers) itself
    LAYOUT_ATTR = "_hook_layout"  # the model's output inside the hook (LossProgram.record_layout)

    def __post_init__(self) -> None:
        super().__post_init__()
        shell = copy.copy(self.model)
        model = self.model

        def forward(batch: Any) -> Tensor:
            return getattr(model, HOOK_NAME)(batch)

        object.__setattr__(shell, "forward", forward)
        self._shell = shell
        self._factors_checked = False
        self._hook_layout: OutputShape | None = None  # a tuple / dict output's sorted leaves (output_shape)
        self._joined = False  # the hook calls the model several times: its reads join the calls' outputs

    @property
    def callee(self) -> nn.Module:
        """The shell whose forward is the hook (:meth:`LossProgram.random_in_train_mode` runs it)."""
        return self._shell

    def loss_what(self, outputs: Any, targets: Any) -> str:
        return f"{type(self.model).__name__}.{HOOK_NAME}(batch)"

    def check_records(self, inputs: Any, targets: Any, outputs: Any, losses: Tensor, what: str,
                      records: int = 8) -> None:
        """As :meth:`LossProgram.check_records`, for the hook, whose loss and model call are one
        function of the batch (formerly unchecked): the hook on each of the first
        ``records`` records alone must give its entry (:func:`check_record_values`; where it does
        not, a model output that itself mixes the records is named as such first,
        :func:`check_record_outputs` on the model's output inside the hook), and each record's
        loss must have no gradient in another record's model output
        (:func:`check_record_gradients` on the hook's losses as a function of a shift of that
        output, :meth:`_through_output`: a backward through the loss only, the model run once on
        the first :data:`GRADIENT_CHECK_RECORDS` records). Skipped: the value check where a tensor
        of the batch does not hold the records in dim 0 or the hook fails on a record's cut of it
        (it cannot be cut into records); the gradient check where the hook does not call the model
        exactly once returning one floating tensor whose dim 0 follows the records (one record's
        output has 1 row there).

        Raises:
            ValueError: naming the hook, the record and the cure.
        """
        leaves = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
        b = int(losses.shape[0])

        def alone(x: Any, _y: Any) -> Tensor:  # the hook on one record's cut of the batch
            try:
                return self.outputs(self.params, x).reshape(-1)
            except Exception as exc:  # noqa: BLE001 - the batch is not cut into records this way
                raise _NotRecords from exc

        if leaves and all(t.dim() and t.shape[0] == b for t in leaves):
            try:
                check_record_values(alone, inputs, targets, losses, what, records)
            except _NotRecords:  # (rv54b: a batch tensor of B entries that are not records, e.g. class weights)
                pass
            except ValueError:
                self._check_model_records(inputs)  # the model's own output mixing the records: named so
                raise
        cut = lambda n: torch.utils._pytree.tree_map(  # noqa: E731
            lambda t: t[:n] if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t, inputs)
        head = cut(GRADIENT_CHECK_RECORDS)
        try:
            with torch.no_grad():
                out = self._through_output(self.params, head)[1]
                one = self._through_output(self.params, cut(1))[1]
        except Exception:  # noqa: BLE001 - not one call returning one tensor: the output cannot be shifted
            return
        k = min(b, GRADIENT_CHECK_RECORDS)
        check_records_first(out, k, f"the model's output inside {HOOK_NAME}", one)  # (rv56: [1, B, C] read as records)
        # the output's dim 0 must follow the records (rv54b: a sequence-first [T, B, C] output of
        # T = k steps would be read as k records, its steps' shared gradient as mixing)
        if isinstance(out, Tensor) and out.is_floating_point() and out.dim() and out.shape[0] == k \
                and isinstance(one, Tensor) and one.dim() and one.shape[0] == 1 and one.shape[1:] == out.shape[1:]:
            check_record_gradients(lambda shift, _y: self._through_output(self.params, head, shift)[0].reshape(-1),
                                   torch.zeros_like(out), targets[:k], what, min(records, 2))

    def _check_model_records(self, inputs: Any) -> None:
        """:func:`check_record_outputs` on the model's own output inside the hook (nothing where
        the hook does not call the model exactly once).

        Raises:
            ValueError: the model's output for a record alone differs from its row in the batch.
        """
        try:
            with torch.no_grad():
                out = self._through_output(self.params, inputs, any_output=True)[1]
        except ValueError:
            return
        check_record_outputs(lambda x: self._through_output(self.params, x, any_output=True)[1], inputs, out,
                             f"model {type(self.model).__name__}")

    def data_dependent_buffers(self, inputs: Any, b: int) -> tuple[list[str], dict[str, Any] | None]:
        """As :meth:`LossProgram.data_dependent_buffers`, each copy run through its hook (the
        batch is the hook's, not the forward's, argument)."""
        return probe_data_buffers(self.model, inputs, b, call=lambda m, x: getattr(m, HOOK_NAME)(x),
                                      dtype=self.dtype)

    def void_rows(self, inputs: Any, targets: Any, b: int) -> Tensor | None:
        """As :meth:`LossProgram.void_rows`, read from the hook's batch (``inputs``; ``targets``
        is a placeholder): records in which some tensor of the batch is all NaN (float) or all
        negative (integer, e.g. ``ignore_index=-100``) are tested; the far
        outputs are set on the model's one output inside the hook (:meth:`_through_output`),
        and the zero gradient is taken in the weights (the hook may read them other than through
        that output); each record decides on its own loss, the weight gradient on the records
        left (all or none). A batch's labels and inputs are not told apart here, so an all-zero sample
        weight or a label code at or above the class count is not a mark (an input of zeros, a
        token id, would make every record a candidate): such records stay counted. Where the
        hook does not call the model exactly once, or raises at the far outputs (a loss on
        probabilities), the candidates stay counted and a warning says so once per program.

        Raises:
            Nothing beyond the hook's own errors on those records.
        """
        leaves = [t for t in torch.utils._pytree.tree_leaves(inputs)
                  if isinstance(t, Tensor) and t.dim() and t.shape[0] == b and t[0].numel()
                  and (t.is_floating_point() or (t.dtype != torch.bool and not t.is_complex()))]
        if not leaves:
            return None
        void = torch.zeros(b, dtype=torch.bool, device=leaves[0].device)
        for t in leaves:
            flat = t.reshape(b, -1)
            void |= (torch.isnan(flat) if t.is_floating_point() else flat < 0).all(1)
        if not bool(void.any()):
            return None
        idx = void.nonzero().squeeze(1)
        with torch.inference_mode(False):
            # clones: a validation loop's inference tensors cannot enter the weights' graph below
            x = torch.utils._pytree.tree_map(
                lambda t: t[idx].clone() if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t, inputs)
        k = int(idx.numel())
        try:
            with torch.no_grad():
                losses, out = self._through_output(self.params, x)
            if losses.shape[0] != k or out.shape[0] != k:
                return None
            # per record (the hook's loss is per record): 0 at the output, flat in it ...
            ok = (losses.reshape(k, -1) == 0).all(1)
            if bool(ok.any()):
                with torch.inference_mode(False), torch.enable_grad():
                    shift = torch.zeros_like(out).requires_grad_(True)
                    moved = self._through_output(self.params, x, shift)[0]
                    if moved.requires_grad:
                        ok &= ~(torch.autograd.grad(moved.sum(), shift)[0].reshape(k, -1) != 0).any(1)
            with torch.no_grad():
                for sign in (-10.0, 10.0):  # ... and 0 at the far outputs of LossProgram.void_rows
                    if not bool(ok.any()):
                        break
                    far = -3.0 * out + sign * (1.0 + out.abs())
                    mv = self._through_output(self.params, x, far - out)[0].reshape(k, -1)
                    if bool((ok & ~torch.isfinite(mv).all(1)).any()):  # (0 x log of an out-of-range output; rv46)
                        raise ValueError("the hook's loss is not finite (NaN or inf) at far outputs")
                    ok &= (mv == 0).all(1)
        except Exception as err:  # noqa: BLE001 - not one call returning one tensor (ValueError): the far
            # outputs cannot be set; or a hook's loss defined on a bounded range of outputs
            # (binary_cross_entropy on a sigmoid's probabilities raises at the far ones; rv46: the estimation
            # stopped). Its errors at the records' own outputs come back in the pass itself
            if not getattr(self, "_void_untested_said", False):
                self._void_untested_said = True
                warn(
                    f"{k} record(s) of a batch have every label marked missing (NaN, a negative code) but could "
                    f"not be tested for a loss that does not depend on the weights ({err}): they are counted as "
                    "members; if the hook's loss never reads them, every figure is lowered by about their share "
                    "of the records (pass loss_fn(outputs, targets) to have them left out)")
            return None
        if not bool(ok.any()):
            return None
        # the survivors' weight gradient (the hook may read the weights other than through the
        # output, e.g. a penalty): all of them or none
        rows = ok.nonzero().squeeze(1)
        xs = torch.utils._pytree.tree_map(lambda t: t[rows] if isinstance(t, Tensor) and t.dim() and t.shape[0] == k
                                          else t, x)
        with torch.inference_mode(False), torch.enable_grad():
            leaves = {n: t.detach().clone().requires_grad_(True) for n, t in self.params.items()}
            total = self.outputs(leaves, xs)
            if total.requires_grad:
                got = torch.autograd.grad(total.sum(), list(leaves.values()), allow_unused=True)
                if any(g is not None and bool(g.any()) for g in got):
                    return None
        void[idx[~ok]] = False
        return void

    def outputs(self, params: dict[str, Tensor], inputs: Any) -> Any:
        with eval_mode(self.model, self._shell), default_dtype(self.dtype), self._norms():  # the hook runs on the original model
            return functional_call(self._shell, ({**self.fixed, **params}, self.buffers), (inputs,))

    # -- the model's own output inside the hook (Gauss-Newton factors for the leverages) -----
    def _through_output(self, params: dict[str, Tensor], batch: Any, shift: Tensor | None = None,
                        replace: Any = None, any_output: bool = False, joined: bool = False) -> tuple[Tensor, Any]:
        """``(losses, output)``: the hook's losses and the one output of the model's own
        ``__call__`` inside it (captured by a forward hook), the output moved by ``shift``
        first when given (so that the loss is a function of the output alone; a tuple / dict
        output's kept leaves moved, :func:`~.estimation.output_reads.shift_outputs`), or
        ``replace`` in its place (the sorting of a tuple / dict output's leaves). With
        ``joined`` (:attr:`_joined`: the hook calls the model several times, each returning a
        tensor) the output is every call's, flattened and joined in call order (``[N]``), and
        ``shift [N]`` moves each call's part: the record's outputs for the per-record reads.

        Raises:
            ValueError: the hook calls the model other than exactly once (``joined``: not at
                all), or its output is neither one tensor nor a pytree whose leaves were sorted
                (``any_output``: any output; the factors are then unavailable; method.md section 4).
        """
        seen: list[Any] = []
        layout = self._hook_layout
        at = [0]  # (joined: where this call's part of the shift starts)

        def capture(module: nn.Module, args: Any, out: Any) -> Any:
            if module is self._shell:  # the shallow copy shares the model's hook dict
                return None
            seen.append(out)
            if replace is not None:
                return replace
            if shift is not None and joined and isinstance(out, Tensor):
                part = shift.reshape(-1)[at[0]: at[0] + out.numel()]
                at[0] += out.numel()
                return out + part.reshape(out.shape).to(out.dtype)
            if shift is not None and isinstance(out, Tensor):
                return out + shift.reshape(out.shape).to(out.dtype)
            if shift is not None and isinstance(layout, OutputTree):
                return shift_outputs(out, shift, layout)
            return None

        handle = self.model.register_forward_hook(capture)
        try:
            losses = self.outputs(params, batch)
        finally:
            handle.remove()
        if joined and seen and all(isinstance(o, Tensor) for o in seen):
            return losses, torch.cat([o.reshape(-1) for o in seen])
        if len(seen) != 1 or not (any_output or isinstance(seen[0], Tensor) or isinstance(layout, OutputTree)):
            what = f"{len(seen)} time(s)" if len(seen) != 1 else f"with a {type(seen[0]).__name__} output"
            raise ValueError(f"{HOOK_NAME} calls the model {what}; {HOOK_CALLS_REFUSED}")
        return losses, seen[0]

    def _calls(self, batch: Any) -> list[Any]:
        """The outputs of every call of the model inside the hook on ``batch`` (one forward, no grad)."""
        seen: list[Any] = []

        def capture(module: nn.Module, args: Any, out: Any) -> None:
            if module is not self._shell:  # the shallow copy shares the model's hook dict
                seen.append(out)

        handle = self.model.register_forward_hook(capture)
        try:
            with torch.no_grad():
                self.outputs(self.params, batch)
        finally:
            handle.remove()
        return seen

    def output_shape(self, inputs: Any) -> OutputShape:
        """The per-record shape of the model's output inside the hook: a tensor's, or the
        :class:`~.estimation.output_reads.OutputTree` of a tuple / dict output, its leaves
        sorted by what the hook's loss reads (once, on these inputs' first records); where the
        hook calls the model several times, each returning a floating tensor, ``(N,)``: their
        ``N`` floats on one record, joined (:attr:`_joined`, :meth:`_through_output`).

        Raises:
            ValueError: the hook calls the model not at all, or several times with an output
                other than a floating tensor; a kept leaf that is not a floating tensor.
        """
        first = torch.utils._pytree.tree_map(lambda t: t[:1] if isinstance(t, Tensor) else t, inputs)
        calls = self._calls(first)
        # the model called several times (self(x), self(x_aug)), each a floating tensor: the record's
        # outputs are every call's on it alone, joined (est57: the leverage correction was skipped there)
        self._joined = len(calls) > 1 and all(isinstance(o, Tensor) and o.is_floating_point() for o in calls)
        if self._joined:
            return (sum(o.numel() for o in calls),)
        if len(calls) != 1:
            raise ValueError(f"{HOOK_NAME} calls the model {len(calls)} time(s); {HOOK_CALLS_REFUSED}")
        out = calls[0]
        if isinstance(out, Tensor):
            def two() -> Tensor | None:  # (rv55: a sequence-first output read its steps as records)
                if _batch_size(inputs) < 2:
                    return None
                with torch.no_grad():
                    pair = self._through_output(self.params, torch.utils._pytree.tree_map(
                        lambda t: t[:2] if isinstance(t, Tensor) else t, inputs), any_output=True)[1]
                return pair if isinstance(pair, Tensor) else None

            try:
                return tensor_record_shape(out, two, f"the model's output inside {HOOK_NAME}")
            except ValueError:
                # its records not in dim 0 (a sequence-first [T, B, C], the tokens flattened [B*T, C],
                # the batch concatenated with a copy [2B, C]): the hook's per-record reads
                # (gauss_newton_factors, loss_output_hessians) call it on one record alone, whose
                # whole output is that record's (the first-batch checks: its loss the batch's
                # entry, its gradient J' dl/do), so they need its size only (est57: the leverage
                # correction and the loss directions were skipped there, the figures 3% low)
                return tuple(out.shape)
        if self._hook_layout is None:
            b = _batch_size(inputs)
            head = torch.utils._pytree.tree_map(
                lambda t: t[:PROBE_RECORDS] if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t, inputs)
            layout = sort_outputs(lambda x: self._through_output(self.params, x, any_output=True)[1],
                                  lambda o, _y: self._through_output(self.params, head, replace=o, any_output=True)[0],
                                  inputs, torch.zeros(b, dtype=self.dtype, device=self.device), b)
            leaves = torch.utils._pytree.tree_leaves(out)
            if not isinstance(layout, OutputTree) or any(
                    k and not (isinstance(t, Tensor) and t.is_floating_point()) for t, k in zip(leaves, layout.kept)):
                raise ValueError(f"{HOOK_NAME} calls the model with a {type(out).__name__} output holding more "
                                 f"than floating tensors; {HOOK_CALLS_REFUSED}")
            self._hook_layout = layout
        elif isinstance(self._hook_layout, OutputTree) and self._hook_layout.dropped:
            # a leaf the first batch dropped and these records' losses read: put back (output_reads.read_later)
            b = _batch_size(inputs)
            with torch.no_grad():
                _, whole = self._through_output(self.params, inputs, any_output=True)
            self._hook_layout = read_later(
                self._hook_layout, whole,
                lambda o, _y: self._through_output(self.params, inputs, replace=o, any_output=True)[0],
                torch.zeros(b, dtype=self.dtype, device=self.device), b)
        return with_shapes(self._hook_layout, out)  # these inputs' shapes (padded per batch)

    def loss_output_hessians(self, inputs: Any, targets: Any, out_shape: OutputShape) -> Tensor:
        """As :meth:`LossProgram.loss_output_hessians`, the model's output taken inside the hook
        (the hook's loss differentiated in a shift of that output).

        Raises:
            ValueError: as :meth:`_through_output`.
        """
        c = output_numel(out_shape)

        def loss(delta: Tensor, x: Any) -> Tensor:
            return self._through_output(self.params, _unsqueeze(x), delta, joined=self._joined)[0].reshape(())

        zero = torch.zeros(_batch_size(inputs), c, dtype=self.dtype, device=self.device)
        # reverse-over-reverse (torch.func.hessian's matrix without torch's first forward-AD use, ~0.4 s once per process; pf28, pf29)
        return each_record(jacrev(grad(loss)), (0, 0), self.looped, zero, inputs)

    def gauss_newton_factors(self, inputs: Any, targets: Any, out_shape: OutputShape) -> tuple[dict[str, Tensor], Tensor]:
        """As :meth:`LossProgram.gauss_newton_factors`, the model's output taken inside the hook.

        Raises:
            ValueError: as :meth:`_through_output`; or, on the first batch, the per-record
                gradients are not ``J' dl/do`` (the hook's loss depends on the parameters other
                than through the model's output, e.g. a penalty): the factors would be wrong.
        """
        c = output_numel(out_shape)

        def output(p: dict[str, Tensor], x: Any) -> Tensor:
            return flat_record(self._through_output(p, _unsqueeze(x), joined=self._joined)[1], out_shape)

        def loss(delta: Tensor, x: Any) -> Tensor:
            return self._through_output(self.params, _unsqueeze(x), delta, joined=self._joined)[0].reshape(())

        # (records one at a time where the model holds a recurrent layer, LossProgram.looped)
        jac = each_record(jacrev(output), (None, 0), self.looped, self.params, inputs)
        b = _batch_size(inputs)
        zero = torch.zeros(b, c, dtype=self.dtype, device=self.device)
        L = each_record(jacrev(grad(loss)), (0, 0), self.looped, zero, inputs)  # reverse-over-reverse, as loss_output_hessians
        if not self._factors_checked:
            e = each_record(grad(loss), (0, 0), self.looped, zero, inputs)  # [B, C]
            grads = self.per_sample_grads(inputs, targets)
            for k, J in jac.items():
                via = torch.einsum("bc,bc...->b...", e, J.reshape(b, c, *J.shape[2:]))
                tol = 1e-6 if self.dtype == torch.float64 else 1e-3
                if not torch.allclose(via, grads[k], rtol=tol, atol=tol * float(grads[k].abs().max())):
                    raise ValueError(f"{HOOK_NAME}'s per-record gradient of {k!r} is not the model "
                                     f"output's Jacobian times dloss/doutput: {WEIGHTS_OUTSIDE_OUTPUT}")
            self._factors_checked = True
        return jac, L


def _hook_batch_fn(batch: Any) -> tuple[Any, Tensor]:
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("the batch holds no tensor")
    return batch, torch.zeros(leaves[0].shape[0], device=leaves[0].device)


def _passthrough_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs.reshape(-1)


def hook_program(model: nn.Module) -> tuple[LossFn, BatchFn, type[LossProgram]]:
    """``(loss_fn, batch_fn, program_cls)`` that route the estimation through ``mis_per_sample_loss``.

    Raises:
        TypeError: the model has no ``mis_per_sample_loss(batch)`` method.
    """
    if not callable(getattr(model, HOOK_NAME, None)):
        raise TypeError(f"{type(model).__name__} has no {HOOK_NAME}(batch) method")
    return _passthrough_loss, _hook_batch_fn, _HookProgram


# torchmetrics.Metric's own keyword arguments (torchmetrics 1.x), used only to suggest a name
# for a misspelled option: torchmetrics itself decides what it accepts.
TORCHMETRICS_OPTIONS = ("compute_on_cpu", "compute_with_cache", "dist_sync_fn", "dist_sync_on_step",
                        "distributed_available_fn", "process_group", "sync_on_compute")


def first_batch_facts(acc: MomentAccumulator, who: int | None = None) -> dict[str, Any]:
    """What a process's first batches decided ("auto"'s choice and the facts it measured), gathered
    at the sync for :func:`_align_first_batches` and for a process that saw no record. ``who``: this
    process's index in the gather, its loss directions' sample then sent as keys only
    (:data:`~.estimation.loss_directions.GATHER_KEYS_FIRST`; the rows the world's sample takes follow
    in :func:`_align_first_batches`' exchange); ``None``: with its rows."""
    return {
        "resolved": not acc._probe_pending and (bool(acc._reused) or acc._forward_floats is not None),
        "choice": (list(acc._reused), acc._forward_floats, acc._choice_outputs),
        "residual": (acc._residual_skip, acc._residual_info, acc._residual_rows), "loss_directions": acc.loss_direction_part(who),
        "loss_directions_keyed": who is not None,
        "output_layout": acc.program.record_layout(),
        "normalised": None if acc._normalised_probe else acc._normalised,
        "data_buffers": acc._data_buffers, "data_buffers_unchecked": acc._data_buffers_unchecked,
        "late": acc.late_leaves(), "estimator": (acc.mode, acc.hessian, acc.estimator),
        "train_random": bool(acc._train_random), "input_stats": acc._input_stats.on_cpu() if acc._input_stats else None,
        "world_choice": choice_facts(acc)}


def _align_first_batches(acc: MomentAccumulator, facts: list[dict[str, Any]],
                         exchange: Callable[[dict[int, Tensor]], dict[int, Any]] | None = None) -> None:
    """Every process's report from every process's first-batch decisions (``facts``: those of the
    processes that saw records, in rank order, as gathered by
    :meth:`EstimationMetric._shape_empty_cat_states`): each process took them on its own first batch,
    and those that differ between shards are reduced over all of them, as one process reading every
    shard decides them.

    * the loss directions per record: the bottom-k records by content key over every process's sample
      (:func:`~.estimation.loss_directions.world_sample`; formerly each process's own first batch read
      1.81 vs 1.94 directions, rank 1's ``rtn_int4`` leakage 1% off rank 0's), measured here by every
      process alike (the same records and forwards on each: a forward holding a collective meets its
      peers);
    * an output leaf any process put back (``output_reads.read_later``) is named by all;
    * a forward random in train mode on any process's probe is said by all (``random_in_train_mode``);
    * the buffers a forward sets from the records: those any process's probe found (a process whose
      batches held one record each could not split one: "unchecked" only where none could);
    * the input statistics that tell a standardiser fitted on the training inputs, over every
      process's records (each shard's alone matches no buffer fitted on all of them);
    * the ``"ggn_residual"`` block checks' diagnostics (:func:`~.estimation.world_choice.world_residual`),
      reported by every process alike, one without records too;
    * the normalised layers (a structural probe): the first process's.

    ``exchange`` (facts whose loss directions came as keys only, :func:`first_batch_facts` with
    ``who``): ``{who: positions}`` -> ``{who: that process's rows there}``, one collective every
    process runs alike (a process without records, or with no row wanted, sends none).

    Raises:
        ValueError: the processes chose different estimators (``"auto"``'s cost, or the per-layer
            program's Gauss-Newton directions, measured on each one's first batch; sequences of
            other lengths on each): their sums are not of one estimator, and no figure can be formed.
    """
    if not facts:
        return
    chosen = [f["estimator"] for f in facts]
    if len({c[:2] for c in chosen}) > 1:
        # what "auto" chooses from every process's first batch (world_choice), the estimator to name
        mode, hessian = world_estimator(acc, world_choice([f["world_choice"] for f in facts]))
        raise ValueError(
            "the DDP processes chose different estimators at their first batches ("
            + "; ".join(f"process {f.get('rank', i)}: {f['estimator'][2]}" for i, f in enumerate(facts))
            + "): their sums cannot be combined into one estimate. estimation='auto' / hessian='auto' decide on "
            "each process's own first batch (the forward's measured cost, e.g. sequences padded to other lengths "
            "on each; the loss directions of a masked or multi-label loss), and a Metric used directly cannot "
            f"re-read its records. Pass the estimator explicitly, the same on every process: estimation={mode!r}, "
            f"hessian={hessian!r} (what 'auto' chooses from every process's first batch); or assess through "
            "MISCallback, which makes that choice for every process and re-reads a process's records where it "
            "chose apart")
    # measured here, after the gather, on the world's sample: every process (one without records too)
    # runs the same forwards (rv55: each measured its own before the gather, a different number)
    # in the union of the processes' output layouts (a leaf one process put back read by all; a process
    # without records has none of its own)
    parts = [f["loss_directions"] for f in facts]
    if any(f.get("loss_directions_keyed") for f in facts):  # (rv56: the rows the world's sample takes only)
        if exchange is None:
            raise RuntimeError("the processes' loss directions came as keys only: their rows need the exchange")
        keyed = world_sample(parts, acc._loss_ranks, LOSS_RANK_RECORDS)
        want = wanted_rows(keyed)
        # (every process computed the same `want` from the same gather: all exchange, or none does)
        sample = filled_sample(keyed, exchange(want) if want else {}, acc._loss_ranks, acc.program.device)
    else:
        sample = world_sample(parts, acc._loss_ranks, LOSS_RANK_RECORDS, acc.program.device)
    with acc.program.layout_as(union_layout([f["output_layout"] for f in facts])):
        acc.directions_synced = sample.value()
    acc.late_elsewhere = tuple(sorted({leaf for f in facts for leaf in f.get("late", ())}))
    if any(f["train_random"] for f in facts):
        acc._train_random = True
    checked = [f["data_buffers"] for f in facts if f["data_buffers"] is not None]
    if checked:
        acc._data_buffers = list(dict.fromkeys(name for names in checked for name in names))
        acc._data_buffers_unchecked = None
    elif acc._data_buffers is None:
        acc._data_buffers_unchecked = facts[0]["data_buffers_unchecked"]
    if facts[0]["normalised"] is not None:
        acc._normalised, acc._normalised_probe = facts[0]["normalised"], False
    stats = [f["input_stats"] for f in facts if f["input_stats"] is not None]
    acc.input_stats_synced = stats[0].merged([(t.sums, t.eps) for t in stats[1:]]) if stats else None
    acc.residual_synced = world_residual([f["residual"][1] for f in facts], [f["residual"][2] for f in facts],
                                         [f.get("rank", i) for i, f in enumerate(facts)])


class EstimationMetric(Metric):
    """The estimation pass over streamed batches, with torchmetrics' states and sync.

    Args:
        model: the trained model, held by reference (never moved, copied or modified; not in
            the Metric's ``state_dict``); its weights are read at the first ``update`` after
            construction or ``reset()``.
        loss_fn: ``loss_fn(outputs, targets) -> [B]``; default ``model.mis_per_sample_loss``
            (whole batches) if defined, else ``model.per_sample_loss``.
        estimation_config: the estimation options (``weight_decay=None`` reads the model's).
        seed: seed of the Hutchinson probes.
        batch_fn: ``batch -> (inputs, targets)`` for other layouts.
        num_training_records: the number of training records the stream will hold, when known
            (``assess`` reads it from ``len(dataset)``, ``MISCallback`` from the trainer's data):
            ``estimation="auto"`` weighs the exact sandwich's cost by it; ``None`` assumes
            10,000 (:func:`~mis_lightning.estimation.estimate.choose_estimator`). It also sets
            the rate of the K-FAC factors' sample by record content
            (:mod:`~mis_lightning.estimation.kron_sample`); ``None``: the first records read
            (order-dependent, reported). Under DDP: the records of every process together.
        kwargs: torchmetrics ``Metric`` options (``process_group``, ``sync_on_compute``, ...).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``loss_fn`` or ``batch_fn`` is not
            callable, or an unknown option (named, with the closest known names).
        ValueError: no usable loss, ``hessian="ggn"`` with the loss hook, or a bad selection
            (see :func:`~mis_lightning.assess.select_params`).
        KeyError: an unknown parameter name.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        estimation_config: EstimationConfig,
        seed: int = 0,
        batch_fn: BatchFn | None = None,
        num_training_records: int | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            super().__init__(**kwargs)
        except ValueError as err:  # torchmetrics' own check: name the culprit, suggest a name
            bad = re.findall(r"`(\w+)`", str(err)) if str(err).startswith("Unexpected keyword") else []
            if not bad:
                raise
            raise unexpected_options(type(self).__name__, bad, "the fields of EstimationConfig and ScoringConfig "
                                     "and torchmetrics' Metric options", known=TORCHMETRICS_OPTIONS) from err
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_user_functions(loss_fn=loss_fn, batch_fn=batch_fn)
        cfg = estimation_config
        program_cls: type[LossProgram] = LossProgram
        self.uses_hook = False
        if loss_fn is None:
            if callable(getattr(model, HOOK_NAME, None)):
                loss_fn, batch_fn, program_cls = hook_program(model)
                self.uses_hook = True
            elif callable(getattr(model, "per_sample_loss", None)):
                loss_fn = model.per_sample_loss  # type: ignore[assignment]
            else:
                raise ValueError(
                    f"{type(model).__name__} defines neither {HOOK_NAME}(batch) nor per_sample_loss"
                    "(outputs, targets): pass loss_fn=lambda outputs, targets: <per-sample losses [B]>"
                )
        names = select_params(model, cfg.params)
        if self.uses_hook and cfg.hessian in ("ggn", "ggn_mc", "ggn_residual"):
            raise ValueError(f"hessian={cfg.hessian!r} needs model outputs; with {HOOK_NAME} use 'exact' or 'hutchinson'")
        # what rebuilds the accumulator of an unpickled Metric (see __setstate__)
        self._acc_kwargs = dict(
            loss_fn=loss_fn, param_names=names, weight_decay=cfg.resolved_weight_decay(model),
            batch_fn=batch_fn, selection="hash", program_cls=program_cls,
            ggn_available=not self.uses_hook, n_hint=num_training_records, **cfg.estimator_kwargs(),
        )
        acc = MomentAccumulator(model, generator=torch.Generator().manual_seed(seed), **self._acc_kwargs)
        self._ref = _Ref((model, acc))
        self.estimation_config, self.seed = cfg, seed
        self.loss_fn, self.batch_fn = loss_fn, batch_fn or default_batch_fn
        self._fresh = True
        self._state_names = {}
        for k, (default, red) in acc.state_spec().items():
            attr = f"s_{k}"
            self.add_state(attr, default=default, dist_reduce_fx=red)
            self._state_names[k] = attr

    # -- accessors ------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._resolved()[0]

    @property
    def accumulator(self) -> MomentAccumulator:
        return self._resolved()[1]

    def _resolved(self) -> tuple[nn.Module, MomentAccumulator]:
        """``(model, accumulator)``; an unpickled Metric whose model was not unpickled yet when
        its own state was (the Metric is an attribute of the model it assesses: the pickle's
        cycle) builds its accumulator at first use."""
        ref = self._ref
        if ref.obj is None and ref.pending is not None:  # shared with clones, like the accumulator
            model, extra = ref.pending
            ref.obj, ref.pending = (model, self._rebuild_accumulator(model, extra)), None
        return ref.obj

    @property
    def mode(self) -> str:
        return self.accumulator.mode

    def _states(self) -> dict[str, Any]:
        return {k: getattr(self, a) for k, a in self._state_names.items()}

    # -- pickling -------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickles the model with the Metric (by value; in one pickle with a module that owns
        both, the unpickled Metric holds that module's unpickled model) and the accumulated
        states; the accumulator (closures, hooks) is rebuilt from them on unpickling."""
        state = super().__getstate__()
        model, acc = self._resolved()
        state["_pickled_model"] = _ByValue(model)
        state["_pickled_acc"] = {"factored": acc.factored is not None, "out_shape": acc._out_shape,
                                 "reused": acc._reused, "probe_pending": acc._probe_pending,
                                 "forward_floats": acc._forward_floats,
                                 # the output size "auto" weighed ("ggn_residual") and the residual
                                 # block the first batch found zero (the same columns after unpickling)
                                 "outputs": acc._choice_outputs,
                                 "residual": (acc._residual_skip, acc._residual_info),
                                 "factored_kind": type(acc.factored).__name__,
                                 # bytes, not the state tensor: a tensor made here dies with this
                                 # dict, before a spawned process (ddp_spawn) maps its shared memory
                                 # ("unable to resize file" in the child)
                                 "generator": (acc.generator.get_state().numpy().tobytes()
                                               if acc.generator is not None else None),
                                 # every other decision of the pass, the loss directions' sample, the
                                 # programs' kinds (dd58: lost, the figures moved)
                                 "programs": choice_facts(acc)["programs"], "facts": acc.pass_facts()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        held = state.pop("_pickled_model", None)
        extra = state.pop("_pickled_acc", None)
        super().__setstate__(state)
        # torch.multiprocessing (spawn, ddp_spawn) unpickles tensors into shared memory, one
        # storage for every process given the same pickle: states summed in place would then
        # add every process's records into one tensor (each rank's sum the global one, and the
        # sync doubled it again). Each unpickled Metric owns its states.
        for attr in self._state_names.values():
            val = getattr(self, attr, None)
            if isinstance(val, Tensor) and val.is_shared():
                setattr(self, attr, val.clone())
            elif isinstance(val, list) and any(isinstance(t, Tensor) and t.is_shared() for t in val):
                setattr(self, attr, [t.clone() if isinstance(t, Tensor) and t.is_shared() else t for t in val])
        model = held.obj if held is not None else None
        if model is None or (self._ref.obj is not None and self._ref.obj[0] is model):
            return  # a deep copy (clone()): the reference and the accumulator are shared
        if "_parameters" not in model.__dict__:  # the model's own state comes later in this pickle
            self._ref = _Ref(None)
            self._ref.pending = (model, extra)
            return
        self._ref = _Ref((model, self._rebuild_accumulator(model, extra)))

    def _rebuild_accumulator(self, model: nn.Module, extra: dict[str, Any] | None) -> MomentAccumulator:
        """The accumulator of an unpickled Metric, as :meth:`__getstate__` described it."""
        gen = torch.Generator().manual_seed(self.seed)
        acc = MomentAccumulator(model, generator=gen, **self._acc_kwargs)
        if extra is not None:
            if extra.get("reused") or extra.get("forward_floats") is not None:
                # the first batch showed weight reuse or measured the forward: the same estimator
                acc.resolve(extra.get("reused") or [], extra.get("forward_floats"), extra.get("outputs"))
            acc._residual_skip, acc._residual_info = extra.get("residual") or (None, None)
            acc._probe_pending = extra.get("probe_pending", acc._probe_pending)
            if extra["generator"] is not None:
                rng = extra["generator"]
                gen.set_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8) if isinstance(rng, bytes) else rng)
            acc._out_shape = extra["out_shape"]
            if not extra["factored"] and acc.factored is not None:
                acc.factored.close()  # the original fell back to the generic path
                acc.factored = None
            elif extra.get("factored_kind") == "LayerProgram" and type(acc.factored).__name__ != "LayerProgram":
                acc.factored.close()  # the original fell back from nn.Linear factors to the per-layer path
                acc.factored = acc._fast_program(LayerProgram)
            if "programs" in extra:  # (a Metric pickled before dd58 has neither)
                take_programs(acc, extra["programs"])
                acc.take_pass_facts(extra["facts"])
        return acc

    # -- dtype ----------------------------------------------------------------------------
    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> nn.Module:
        """Device moves reach the states, dtype changes do not (``set_dtype``, ``.to(dtype)``):
        the states are float64 sums and int64 record keys, which a float32 or float16 copy
        would round (float16: a leakage 8% off, and keys that pick other records)."""
        def keep_dtype(t: Any) -> Any:
            out = fn(t)
            if isinstance(t, Tensor) and isinstance(out, Tensor) and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, exclude_state)

    def set_dtype(self, dst_type: str | torch.dtype) -> EstimationMetric:
        """Kept for torchmetrics' interface: the states keep their own dtypes (see ``_apply``);
        warns that the request is not followed. Returns ``self``."""
        warn(f"{type(self).__name__}.set_dtype({dst_type}) is ignored: its states are float64 sums "
             "and int64 record keys, which a lower precision would round (the figures are float64 either way)",
             UserWarning)
        return self

    # -- distributed sync -----------------------------------------------------------------
    def sync(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None,
             should_sync: bool = True, distributed_available: Callable | None = None) -> None:
        """torchmetrics' sync, after giving empty ``"cat"`` states the shape and dtype of the
        other processes' records.

        A process that saw no record (a short last shard) holds empty lists; torchmetrics
        replaces them with a 1-d float tensor, and gathering it with the other processes' 2-d
        float64 / int64 tensors aborts the whole gloo job. Here every process first learns, with
        one ``all_gather_object``, the trailing shape and dtype of each list state, and an empty
        one becomes an empty ``[0, *shape]`` tensor of that dtype, so the result equals the one
        without the empty process.
        """
        ragged: dict[str, tuple[list[Tensor], list[list[tuple[int, tuple[int, ...]]]]]] = {}
        if should_sync and not self._is_synced and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            ragged = self._shape_empty_cat_states(process_group or self.process_group)
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)
        for a, (local, layouts) in ragged.items():
            # each process's chunks back at their own shapes, in process order (the keys' order)
            full, out, r0 = dim_zero_cat(getattr(self, a)), [], 0
            for rows, shape in (c for lay in layouts for c in lay):
                out.append(full[r0: r0 + rows][(slice(None), *(slice(0, w) for w in shape))].clone())
                r0 += rows
            setattr(self, a, out)
            if getattr(self, "_cache", None) is not None and a in self._cache:
                self._cache[a] = local  # unsync restores this process's records as they were

    def _shape_empty_cat_states(self, group: Any) -> dict[str, tuple[list[Tensor], list[list[tuple[int, tuple[int, ...]]]]]]:
        """Align the states over processes with one ``all_gather_object``: a state another process
        registered at its first batch (:meth:`_register_new_states`) and this one lacks (it saw no
        record, so "auto" never chose) is added here, zero, in that process's order, so every
        process syncs the same states in the same order; and each empty ``"cat"`` list gets the
        trailing shape and dtype of the others' records. A process that saw no record takes the
        first-batch decisions of one that did ("auto"'s estimator, the loss directions), so its
        figures are theirs (its callback's metrics, read by a monitor on that rank).

        Records of several row shapes (sequences padded per batch, in the stored-records path:
        ``estimation.records.prune_bottom_k``) cannot be gathered as one tensor: such a state is
        zero-padded to the largest shape for the gather and its layout (rows and shape of every
        process's chunks) returned, ``{state: (this process's chunks, layouts)}``, for
        :meth:`sync` to cut each chunk back to its own shape (``torch.cat`` raised)."""
        dist = torch.distributed
        local: dict[str, tuple[tuple[int, ...], torch.dtype, str] | None] = {}
        layout: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
        for a in self._state_names.values():
            val = getattr(self, a)
            if isinstance(val, list):
                v = [t for t in val if isinstance(t, Tensor)]
                local[a] = (tuple(v[0].shape[1:]), v[0].dtype, "cat") if v else None
                layout[a] = [(int(t.shape[0]), tuple(t.shape[1:])) for t in v if t.shape[0]]
            else:
                local[a] = (tuple(val.shape), val.dtype, "sum")
        acc = self.accumulator
        # what a process's first batch decided ("auto"'s choice and the facts it measured), for a
        # process that saw no record (its figures are then those of the others: the same sums)
        empty = int(self._states()["n"]) == 0
        me = dist.get_rank(group)
        first = None if empty else first_batch_facts(acc, me if loss_directions.GATHER_KEYS_FIRST else None)
        if first is not None:
            first["rank"] = me  # (the refusal names the processes by rank; an empty one sends no facts)
        gathered = gather_objects((local, first, layout), group)
        metas = [g[0] if g is not None else None for g in gathered]
        ragged: dict[str, tuple[list[Tensor], list[list[tuple[int, tuple[int, ...]]]]]] = {}
        for a in layout:
            layouts = [g[2].get(a, []) if g is not None else [] for g in gathered]
            shapes = {sh for lay in layouts for _, sh in lay}
            if len(shapes) < 2 or len({len(sh) for sh in shapes}) > 1:
                continue
            widest = tuple(max(sh[i] for sh in shapes) for i in range(len(next(iter(shapes)))))
            mine = [t for t in getattr(self, a) if isinstance(t, Tensor) and t.shape[0]]
            padded = [F.pad(t, [p for i in reversed(range(len(widest))) for p in (0, widest[i] - t.shape[i + 1])])
                      for t in mine]
            dtype = next(m[a][1] for m in metas if m is not None and m.get(a) is not None)
            setattr(self, a, [torch.cat(padded) if padded else
                              torch.empty((0, *widest), dtype=dtype, device=self.device)])
            ragged[a] = (mine, layouts)
        facts = [g[1] for g in gathered if g is not None and g[1] is not None]  # (processes with records)
        seen = facts[0] if facts else None

        def exchange(want: dict[int, Tensor]) -> dict[int, Any]:
            # the rows of the world's loss-direction sample: each process sends those of its own it takes
            # (rv56: every process's whole sample went in the gather above), every process alike
            mine = acc.loss_direction_rows(want[me]) if me in want and not empty else None
            return {w: r for w, r in enumerate(gather_objects(mine, group)) if r is not None}

        _align_first_batches(acc, facts, exchange)
        if empty and seen is not None:
            # the others' choice, and the programs they settled on (ddp56: the factored program kept
            # here read a multi-output model's K-FAC factors as one output's, leakage 0.62 vs 1.00)
            resolve = acc._probe_pending
            force_choice(acc, world_choice([f["world_choice"] for f in facts]))
            if seen["resolved"] and (resolve or acc._residual_info is None):
                # (rv56d: the callback's world_choice.agree resolved it already, resolve False: the block
                # facts were not taken; its diagnostics are the world's, residual_synced, either way)
                acc._residual_skip, acc._residual_info = seen["residual"][:2]
            acc._probe_pending = False
        held = set(self._state_names.values())
        for m in metas:
            for a, meta in (m or {}).items():
                if a not in held:  # (a state registered after construction: "s_" + its key)
                    held.add(a)
                    shape, dtype, kind = meta if meta is not None else ((), torch.float64, "cat")
                    self._add_aligned_state(a, [] if kind == "cat" else
                                            torch.zeros(shape, dtype=dtype, device=self.device))
                    self._state_names[a[2:]] = a
        for a in held:
            if not isinstance(getattr(self, a), list) or getattr(self, a):
                continue
            known = [m[a] for m in metas if m is not None and m.get(a) is not None]
            if known:
                tail, dtype, _ = known[0]
                setattr(self, a, [torch.empty((0, *tail), dtype=dtype, device=self.device)])
        return ragged

    # -- torchmetrics API -----------------------------------------------------------------
    @full_float32
    def update(self, inputs: Any, targets: Any = None) -> None:  # type: ignore[override]
        """Add a batch: ``update(inputs, targets)``, or ``update(batch)`` (split by ``batch_fn``
        or passed whole to ``mis_per_sample_loss``)."""
        batch = inputs if targets is None else (inputs, targets)
        if targets is not None and self.uses_hook:
            raise TypeError(f"with {HOOK_NAME} pass the whole batch: update(batch)")
        with torch.inference_mode(False):
            batch = torch.utils._pytree.tree_map(
                lambda t: t.clone() if isinstance(t, Tensor) and t.is_inference() else t, batch)
            acc = self.accumulator
            if self._fresh:
                acc.reset_program()
                self._fresh = False
                self._versions = self._weight_versions()
            else:
                self._check_weights_unchanged()
            states = self._states()
            acc.update(batch, states)
            self._register_new_states(states)

    def _weight_versions(self) -> dict[str, int | None]:
        """The assessed parameters' version counters (:func:`~mis_lightning.functional.versions.tensor_version`):
        an in-place write (an optimizer step) moves them, at no cost to read."""
        named = dict(self.model.named_parameters())
        return {k: tensor_version(named[k]) for k in self.accumulator.param_names if k in named}

    def _check_weights_unchanged(self) -> None:
        """Refuse an update whose weights differ from those the first update read (a
        Metric updated in ``training_step`` trained on and failed only at ``compute()``). Only a
        parameter whose version counter moved is compared, with ``compute()``'s own test
        (:func:`~mis_lightning.assess._check_model_matches_estimate`), against the accumulator's
        private copy of the weights.

        Raises:
            ValueError: the first parameter that changed, the cause and the fixes.
        """
        before = getattr(self, "_versions", None)  # a Metric pickled before nux51 has none
        now = self._weight_versions()
        if before is None or now == before:
            return
        self._versions = now  # each write compared once
        program = self.accumulator.program
        for k in (k for k, v in now.items() if v != before.get(k) or v is None):
            read = SimpleNamespace(names=[k], theta={k: program.params[k].detach()})
            try:
                _check_model_matches_estimate(read, self.model)
            except ValueError as err:
                raise ValueError(
                    f"{type(self).__name__}.update: the model's weights changed since this Metric's first update "
                    f"(parameter {k!r}; an optimizer step between two updates: updated in training_step while "
                    "training?): the estimate sums every record's gradient at one set of weights, the trained "
                    "ones. Update after training (e.g. from on_train_end over the training loader), or reset() "
                    "after the weights change") from err

    def _register_new_states(self, states: dict[str, Any]) -> None:
        """Register the states the accumulator added to ``states`` at its first batch ("auto"'s
        choice: the K-FAC factors of the diagonal sandwich's correction) with their sums so far,
        in the accumulator's order (every process adds the same ones in the same order: torchmetrics
        syncs states in registration order). Their reduction is the accumulator's convention:
        ``"sum"`` for tensors, ``"cat"`` for lists (``MomentAccumulator.state_spec``)."""
        for k, v in states.items():
            if k not in self._state_names:
                self._add_aligned_state(f"s_{k}", v)
                self._state_names[k] = f"s_{k}"

    def _add_aligned_state(self, attr: str, value: Any) -> None:
        is_list = isinstance(value, list)
        self.add_state(attr, default=[] if is_list else torch.zeros_like(value), dist_reduce_fx="cat" if is_list else "sum")
        setattr(self, attr, value)

    @full_float32
    def estimate(self) -> Estimate:
        """The :class:`~mis_lightning.estimation.Estimate` of the records seen by every process
        (the states synced over processes first, as ``compute`` does).

        Raises:
            ValueError: fewer records than the estimation needs (from ``finalize``).
        """
        with torch.inference_mode(False):
            if self._is_synced:  # inside compute(): already synced
                return self.accumulator.finalize(self._states())
            with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                                   should_unsync=self._should_unsync):
                return self.accumulator.finalize(self._states())

    @full_float32
    def compute(self) -> Any:  # type: ignore[override]
        """The estimate (see :meth:`estimate`)."""
        return self.estimate()

    def reset(self) -> None:
        """Clear the states; the next ``update`` reads the model's weights again. The sampling
        generator (sampled Gauss-Newton labels, Hutchinson probes) is reseeded with ``seed``, so
        the figures after ``reset()`` are those of a new Metric on the same weights (formerly
        they moved with the epoch: 0.08975 fresh, 0.08849 after a reset, tests/test_kfac_conv.py)."""
        super().reset()
        self._fresh = True
        gen = self.accumulator.generator
        if gen is not None:
            gen.manual_seed(self.seed)

    def forward(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Update only, and return ``None`` (unlike torchmetrics' ``forward``, no value for the
        batch: one would rerun the whole estimation and scoring at every step). Same arguments
        as :meth:`update`."""
        self.update(*args, **kwargs)

