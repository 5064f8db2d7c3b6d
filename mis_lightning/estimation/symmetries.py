"""Scale symmetries that normalisation makes (method.md section 6, "When the approximation holds").

A layer whose whole output goes, directly or through positively homogeneous layers (ReLU,
pooling, flattening), into a per-record normalisation (``nn.LayerNorm``, ``nn.GroupNorm``,
``nn.InstanceNorm*``, ``nn.RMSNorm``) computes the same function when its weights and bias are
multiplied by any ``c > 0`` (up to the norm's ``eps``); so does a weight under ``weight_norm``
along its ``v``. The loss is flat along that direction, every record's gradient is orthogonal
to it, and the layer's weights are strongly correlated near it: the exact sandwich projects the
direction out (:func:`~mis_lightning.estimation.estimate.flat_directions`), the diagonal
estimator's per-weight sigma (the sd given the other weights, times a Kronecker model's
variance inflation) cannot represent it. This module finds such layers on one forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._modelcopy import ModelCopyError, private_copy
from .per_sample import eval_mode

log = logging.getLogger(__name__)

#: per-record normalisations whose output does not change when their whole input is scaled
SCALE_INVARIANT_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

#: layers ``f`` with ``f(c x) = c f(x)`` for ``c > 0``: a scale passes through them unchanged
HOMOGENEOUS_LAYERS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)


def _storage(t: Any) -> int | None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return None


def weight_normed(model: nn.Module, param_names: Iterable[str] | None = None) -> list[str]:
    """Modules of ``model`` holding an assessed parameter (``param_names``; ``None``: every one)
    under ``weight_norm`` (``torch.nn.utils.parametrizations.weight_norm``'s ``original1`` or the
    older ``weight_v``): their ``v``'s scale is flat. Names in ``named_modules`` order."""
    wanted = None if param_names is None else set(param_names)
    out = []
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        hit = name.endswith("weight_v") or name.endswith("parametrizations.weight.original1")
        if hit and (wanted is None or name in wanted):
            layer = owner.removesuffix(".parametrizations.weight").removesuffix("parametrizations.weight")
            if layer not in out:
                out.append(layer)
    return out


def normalised_layers(model: nn.Module, inputs: Any, param_names: Iterable[str] | None = None, *,
                      owned: bool = False) -> dict[str, str] | None:
    """``{layer: norm}``: the modules holding an assessed parameter (``param_names``; ``None``:
    every parameter) whose whole output goes into a scale-invariant normalisation
    (:data:`SCALE_INVARIANT_NORMS`) directly or through :data:`HOMOGENEOUS_LAYERS`, seen in one
    forward pass of ``inputs`` (a batch) on a private copy in eval mode without gradients. Views
    (flatten, transpose) count as the same output (shared storage and size); any other op in
    between (a residual sum, a nonlinearity such as tanh) breaks the chain, so the result may
    miss a symmetry made by functional code, never name one that is absent.

    Models without such a norm are not run (``{}``). ``owned``: ``model`` is already the caller's
    private copy in eval mode (the estimation's program holds one: no second copy of a large
    model), run as it is with hooks removed afterwards. A model that cannot be copied, or whose
    forward fails here, gives ``{}`` (the estimation reports the failure itself).
    """
    if not any(isinstance(m, SCALE_INVARIANT_NORMS) for m in model.modules()):
        return {}
    if owned:
        copy = model
    else:
        try:
            copy = private_copy(model, "copying the model to find layers whose output is normalised")
        except ModelCopyError as err:
            log.info("estimation: normalisation probe skipped (%s)", err)
            return {}
    wanted = None if param_names is None else set(param_names)
    # output storage -> (assessed layer, its numel, the output itself: held so that its memory is not
    # reused by a later tensor, which would then read as the same output)
    source: dict[int, tuple[str, int, Tensor]] = {}
    found: dict[str, str] = {}
    handles = []

    def hook(name: str, kind: str) -> Callable:
        def post(mod: nn.Module, args: tuple, out: Any) -> None:
            key = _storage(out)
            if key is None:
                return
            if kind == "assessed":
                source[key] = (name, out.numel(), out)
                return
            arg = args[0] if args else None
            src = source.get(_storage(arg)) if _storage(arg) is not None else None
            if src is None or arg.numel() != src[1]:
                return
            if kind == "norm":
                found.setdefault(src[0], name)
            else:  # homogeneous: the scale passes through
                source[key] = (src[0], out.numel(), out)
        return post

    for name, mod in copy.named_modules():
        own = [f"{name}.{k}" if name else k for k, p in mod._parameters.items() if p is not None]
        if isinstance(mod, SCALE_INVARIANT_NORMS):
            handles.append(mod.register_forward_hook(hook(name, "norm")))
        elif isinstance(mod, HOMOGENEOUS_LAYERS):
            handles.append(mod.register_forward_hook(hook(name, "homogeneous")))
        elif own and (wanted is None or wanted & set(own)) and not list(mod.children()):
            handles.append(mod.register_forward_hook(hook(name, "assessed")))
    try:
        with torch.no_grad(), eval_mode(copy):
            copy(inputs)
    except Exception:  # noqa: BLE001 - the estimation's own forward reports it
        return None if owned else {}
    finally:
        for h in handles:
            h.remove()
    return found
