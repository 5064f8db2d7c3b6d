"""``MISIndicator``: membership-inference security of quantized releases as a torchmetrics Metric.

The Metric's states are the sufficient statistics of the estimation pass (method.md
section 4): per-sample gradient sums and sums of squares, Hessian-diagonal sums (exact,
Gauss-Newton or Hutchinson), the record count and the squared gradient norm (all
``dist_reduce_fx="sum"``), the ``d x d`` sums of ``g g^T`` and of the Hessian in exact mode
(``"sum"``), and the stored records of the per-record term (``"cat"``). They are filled by
:class:`~mis_lightning.estimation.estimate.MomentAccumulator`, the same code that
:func:`~mis_lightning.estimation.estimate` runs, and ``compute()`` finalizes them into an
:class:`~mis_lightning.estimation.Estimate` and scores every scheme with
:func:`mis_lightning.assess.score`.

Distributed use (DDP): each process calls ``update`` on its shard; ``compute()`` (after
torchmetrics' sync) gives every process the same result, equal to one process over all the
data up to floating-point summation order (about 1e-12 relative in float64):

* the sums are partition-invariant;
* the records of the per-record term are chosen by a **bottom-k content hash**: each
  process keeps the ``num_records`` records with the smallest hash of their bytes
  (:func:`~mis_lightning.estimation.estimate.record_keys`), the kept sets are concatenated
  on sync and reduced to the global ``num_records`` smallest, sorted by hash. That is the
  same set, in the same order, however the data was split over processes and batches (a
  pseudo-random subsample of the training records, not "the first ones"). For models with
  ``num_records * d <= budget`` the per-sample gradients of those records are stored;
  otherwise the records themselves (tensor inputs and targets only) and their influences are
  recomputed at ``compute()``;
* a Hutchinson Hessian (large models without a cheap diagonal) draws random probes per
  batch, so its value depends on the batching: that mode is reproducible for a fixed
  split, not across splits.

Duplicated records (a ``DistributedSampler`` pads the last shard with repeats) are counted
twice: pass each record once (the Lightning callback streams an unpadded shard per process).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics import Metric

from .assess import SchemeSpec, score, select_params
from .estimation.estimate import (
    DEFAULT_BUDGET,
    MomentAccumulator,
)
from .estimation.per_sample import BatchFn, LossFn, LossProgram, default_batch_fn, eval_mode
from .quantization import available_schemes
from .report import Report

HOOK_NAME = "mis_per_sample_loss"

__all__ = ["HOOK_NAME", "MISIndicator", "default_schemes", "hook_program", "report_summary"]


def default_schemes() -> list[str]:
    """Three CPU schemes: torchao int8/int4/int2 weight-only where registered, else the
    built-in round-to-nearest ``rtn_int8``/``rtn_int4``/``rtn_int2``."""
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

    def __deepcopy__(self, memo: dict) -> _Ref:
        return self

    def __getstate__(self) -> dict:
        return {"obj": None}


class _ByValue:
    """Pickled by value, shared by deep copies (a ``clone()`` must not copy the model)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __deepcopy__(self, memo: dict) -> _ByValue:
        return self


class _HookProgram(LossProgram):
    """A :class:`LossProgram` whose per-sample losses are ``model.mis_per_sample_loss(batch)``.

    The batch is the "input" and a dummy ``[B]`` tensor the "target"; the loss function passes
    the hook's output through. ``functional_call`` runs on a shallow copy of the model (it
    shares the parameter, buffer and submodule dicts, so the functional parameters are seen by
    the hook) whose ``forward`` calls the original model's hook.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        shell = copy.copy(self.model)
        model = self.model

        def forward(batch: Any) -> Tensor:
            return getattr(model, HOOK_NAME)(batch)

        object.__setattr__(shell, "forward", forward)
        self._shell = shell

    def outputs(self, params: dict[str, Tensor], inputs: Any) -> Any:
        with eval_mode(self.model, self._shell):  # the hook runs on the original model
            return functional_call(self._shell, ({**self.fixed, **params}, self.buffers), (inputs,))


def _hook_batch_fn(batch: Any) -> tuple[Any, Tensor]:
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("the batch holds no tensor")
    return batch, torch.zeros(leaves[0].shape[0], device=leaves[0].device)


def _passthrough_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs.reshape(-1)


def hook_program(model: nn.Module) -> tuple[LossFn, BatchFn, type[LossProgram]]:
    """``(loss_fn, batch_fn, program_cls)`` that route the estimation through ``mis_per_sample_loss``."""
    if not callable(getattr(model, HOOK_NAME, None)):
        raise TypeError(f"{type(model).__name__} has no {HOOK_NAME}(batch) method")
    return _passthrough_loss, _hook_batch_fn, _HookProgram


def _t(x: float) -> Tensor:
    return torch.tensor(float(x), dtype=torch.float64)


def report_summary(report: Report) -> dict[str, dict[str, Any]]:
    """``{scheme: {leakage, mis, baseline_leakage, d_eff, d, [leakage_p10, leakage_p90], layers,
    [error]}}`` with 0-d float64 tensors (NaN for a failed scheme)."""
    out: dict[str, dict[str, Any]] = {}
    for name, s in report.schemes.items():
        entry: dict[str, Any] = {
            "leakage": _t(s.leakage), "mis": _t(s.mis), "baseline_leakage": _t(s.baseline_leakage),
            "d_eff": _t(s.d_eff), "d": _t(s.d),
            "layers": {ln: {"leakage": _t(lr.leakage), "mis": _t(lr.mis), "d_eff": _t(lr.d_eff),
                            "baseline_leakage": _t(lr.baseline_leakage)} for ln, lr in s.layers.items()},
        }
        if s.interval is not None:
            entry["leakage_p10"], entry["leakage_p90"] = _t(s.interval[0]), _t(s.interval[1])
        if s.error:
            entry["error"] = s.error
        out[name] = entry
    return out


class MISIndicator(Metric):
    """Membership-inference security (MIS = 1 - best attack advantage) of quantized releases.

    ``update`` streams the training records (each once) through the estimation pass;
    ``compute`` returns, per scheme::

        {"int8_weight_only": {"leakage": tensor, "mis": tensor, "baseline_leakage": tensor,
                              "d_eff": tensor, "d": tensor, "leakage_p10": ..., "leakage_p90": ...,
                              "layers": {param_name: {"leakage", "mis", "d_eff", "baseline_leakage"}}},
         ...}

    and keeps the full :class:`~mis_lightning.report.Report` as ``metric.report``.

    Args:
        model: the trained model. Held by reference (not a submodule: the Metric never moves,
            copies or serialises it, and its parameters are not in the Metric's
            ``state_dict``). Its weights are read at the first ``update`` after construction
            or ``reset()``; do not train it while accumulating.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (the data term of the
            training objective). Default: ``model.mis_per_sample_loss(batch)`` if the model
            defines it (batches are then passed whole to the hook), else
            ``model.per_sample_loss``.
        schemes: registry names or scheme objects (default :func:`default_schemes`).
        params: parameter names, or ``predicate(name, param)``; default all trainable ones.
        estimation: ``"exact"`` sandwich (``d x d`` states), ``"diagonal"`` or ``"auto"``
            (exact up to 2,000 weights).
        hessian: diagonal mode's Hessian: ``"exact"``, ``"ggn"``, ``"hutchinson"``, ``"auto"``.
        weight_decay: L2 coefficient of the objective ``mean loss + wd / 2 |theta|^2``.
        num_records: records over which the per-record leakage is averaged (bottom-k by
            content hash, see the module docstring).
        batch_fn: ``batch -> (inputs, targets)`` for ``update(batch)`` with other layouts.
        method, uncertainty_draws, num_samples, seed: as in :func:`mis_lightning.assess`.
        strict: raise when a scheme fails (default: record the error, NaN figures).
        budget: floats held at once in per-sample buffers.
        utility_fn: ``utility_fn(quantized_copy) -> {name: value}``, recorded per scheme.
        kwargs: torchmetrics ``Metric`` options (``process_group``, ``sync_on_compute``, ...).

    ``forward(...)`` only updates (returns ``None``): a value per batch would rerun the whole
    scoring each step.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        schemes: SchemeSpec | Sequence[SchemeSpec] | None = None,
        *,
        params: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        estimation: str = "auto",
        hessian: str = "auto",
        weight_decay: float = 0.0,
        num_records: int = 512,
        batch_fn: BatchFn | None = None,
        method: str = "auto",
        uncertainty_draws: int = 16,
        num_samples: int | None = None,
        seed: int = 0,
        strict: bool = False,
        budget: int = DEFAULT_BUDGET,
        hutchinson_probes: int = 8,
        utility_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if schemes is None:
            schemes = default_schemes()
        from .assess import resolve_schemes

        self.schemes = resolve_schemes(schemes)  # fails early on [] and unknown names
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
        names = select_params(model, params)
        if self.uses_hook and hessian == "ggn":
            raise ValueError(f"hessian='ggn' needs model outputs; with {HOOK_NAME} use 'exact' or 'hutchinson'")
        # what rebuilds the accumulator of an unpickled Metric (see __setstate__)
        self._acc_kwargs = dict(
            loss_fn=loss_fn, param_names=names, mode=estimation, hessian=hessian,
            weight_decay=weight_decay, num_records=num_records, batch_fn=batch_fn,
            hutchinson_probes=hutchinson_probes, budget=budget, selection="hash", program_cls=program_cls,
            ggn_available=not self.uses_hook,
        )
        acc = MomentAccumulator(model, generator=torch.Generator().manual_seed(seed), **self._acc_kwargs)
        self._ref = _Ref((model, acc))
        self.loss_fn, self.batch_fn = loss_fn, batch_fn or default_batch_fn
        self.method, self.uncertainty_draws, self.num_samples = method, uncertainty_draws, num_samples
        self.seed, self.strict, self.utility_fn = seed, strict, utility_fn
        self.report: Report | None = None
        self._fresh = True
        self._state_names = {}
        for k, (default, red) in acc.state_spec().items():
            attr = f"s_{k}"
            self.add_state(attr, default=default, dist_reduce_fx=red)
            self._state_names[k] = attr

    # -- accessors ------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._ref.obj[0]

    @property
    def accumulator(self) -> MomentAccumulator:
        return self._ref.obj[1]

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
        model, acc = self._ref.obj
        state["_pickled_model"] = _ByValue(model)
        state["_pickled_acc"] = {"factored": acc.factored is not None, "out_shape": acc._out_shape,
                                 "generator": acc.generator.get_state() if acc.generator is not None else None}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        held = state.pop("_pickled_model", None)
        extra = state.pop("_pickled_acc", None)
        super().__setstate__(state)
        model = held.obj if held is not None else None
        if model is None or self._ref.obj is not None:
            return  # a deep copy (clone()): the reference and the accumulator are shared
        gen = torch.Generator().manual_seed(self.seed)
        acc = MomentAccumulator(model, generator=gen, **self._acc_kwargs)
        if extra is not None:
            if extra["generator"] is not None:
                gen.set_state(extra["generator"])
            acc._out_shape = extra["out_shape"]
            if not extra["factored"] and acc.factored is not None:
                acc.factored.close()  # the original fell back to the generic path
                acc.factored = None
        self._ref = _Ref((model, acc))

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
        if should_sync and not self._is_synced and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            self._shape_empty_cat_states(process_group or self.process_group)
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)

    def _shape_empty_cat_states(self, group: Any) -> None:
        dist = torch.distributed
        names = [a for a in self._state_names.values() if isinstance(getattr(self, a), list)]
        if not names:
            return
        local: dict[str, tuple[tuple[int, ...], torch.dtype] | None] = {}
        for a in names:
            v = [t for t in getattr(self, a) if isinstance(t, Tensor)]
            local[a] = (tuple(v[0].shape[1:]), v[0].dtype) if v else None
        metas: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(metas, local, group=group)
        for a in names:
            if getattr(self, a):
                continue
            known = [m[a] for m in metas if m is not None and m.get(a) is not None]
            if known:
                tail, dtype = known[0]
                setattr(self, a, [torch.empty((0, *tail), dtype=dtype, device=self.device)])

    # -- torchmetrics API -----------------------------------------------------------------
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
            acc.update(batch, self._states())

    def compute(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        with torch.inference_mode(False):
            est = self.accumulator.finalize(self._states())
            self.report = score(
                est, self.model, self.schemes, method=self.method,
                uncertainty_draws=self.uncertainty_draws, num_samples=self.num_samples,
                seed=self.seed, strict=self.strict, utility_fn=self.utility_fn,
            )
        return report_summary(self.report)

    def reset(self) -> None:
        super().reset()
        self._fresh = True

    def forward(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.update(*args, **kwargs)

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """MIS per scheme (a point each, higher is better); ``val`` = a ``compute()`` result."""
        val = self.compute() if val is None else val
        if isinstance(val, Sequence):
            flat: Any = [{k: v["mis"] for k, v in x.items()} for x in val]
        else:
            flat = {k: v["mis"] for k, v in val.items() if not math.isnan(float(v["mis"]))}
        return self._plot(flat, ax)
