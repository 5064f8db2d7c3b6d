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
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

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


def scale_free_reparametrizations(model: nn.Module, param_names: Iterable[str] | None = None) -> dict[str, str]:
    """``{module name: "weight_norm" or "spectral_norm"}`` for the modules of ``model`` whose
    weight is computed, by one of those reparametrizations, from an assessed tensor
    (``param_names``; ``None``: every one) whose scale it does not see: ``weight_norm``'s ``v``
    (``parametrizations.weight.original1``, or the hook-based ``weight_v``) and
    ``spectral_norm``'s ``original`` (or ``weight_orig``: ``W = W_orig / (u' W_orig v)`` with
    the power iteration's ``u``, ``v`` fixed in eval mode, so any ``c W_orig`` gives the same
    ``W``; formerly not named, and the diagonal estimator read across it unmarked). Found by
    the parametrization or hook object, not by name (``torch.nn.utils.prune`` names its tensor
    ``weight_orig`` too, without a symmetry). A parametrization chained with another is not
    named (the chain may see the scale). In ``named_modules`` order."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    wanted = None if param_names is None else set(param_names)
    kinds = {"_WeightNorm": ("weight_norm", "original1"), "_SpectralNorm": ("spectral_norm", "original")}
    out: dict[str, str] = {}
    for fqn, m in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        found: list[tuple[str, str]] = []
        plists = getattr(m, "parametrizations", None)
        if isinstance(plists, nn.ModuleDict):
            for attr, plist in plists.items():
                kind = kinds.get(type(plist[0]).__name__) if len(plist) == 1 else None
                if kind is not None:
                    found.append((kind[0], f"{prefix}parametrizations.{attr}.{kind[1]}"))
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                found.append(("weight_norm", f"{prefix}{hook.name}_v"))
            elif isinstance(hook, SpectralNorm):
                found.append(("spectral_norm", f"{prefix}{hook.name}_orig"))
        for kind, pname in found:
            if wanted is None or pname in wanted:
                out.setdefault(fqn, kind)
    return out


def weight_normed(model: nn.Module, param_names: Iterable[str] | None = None) -> list[str]:
    """Modules of ``model`` holding an assessed tensor whose scale the model does not see, under
    ``weight_norm`` or ``spectral_norm`` (:func:`scale_free_reparametrizations`): their names, in
    ``named_modules`` order."""
    return list(scale_free_reparametrizations(model, param_names))


def _named(*names: str, on: Any = F) -> frozenset:
    """The callables ``on.<name>`` that exist in this torch (``F.rms_norm`` came in 2.4)."""
    return frozenset(getattr(on, k) for k in names if hasattr(on, k))


#: functions normalising each record by its input's own statistics: ``{function: its name}``;
#: instance_norm only on its input's statistics (``use_input_stats``: not in eval mode with
#: running statistics, which are constants)
NORM_FUNCTIONS: dict[Any, str] = {f: f.__name__ for f in (
    _named("layer_norm", "group_norm", "rms_norm", "instance_norm")
    | _named("layer_norm", "group_norm", "rms_norm", "instance_norm", on=torch))}

#: functions ``f`` with ``f(c x) = c f(x)`` for ``c > 0`` in their first argument (the functional
#: forms of :data:`HOMOGENEOUS_LAYERS`, and reshapes that may copy)
HOMOGENEOUS_FUNCTIONS: frozenset = (
    _named("relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "dropout", "dropout1d", "dropout2d",
           "dropout3d", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
           "adaptive_max_pool2d", "adaptive_max_pool3d")
    | _named("relu", "relu_", "flatten", "reshape", "clone", on=torch)
    | _named("relu", "relu_", "flatten", "reshape", "view", "contiguous", "clone", on=Tensor))


def _uses_input_stats(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether an instance_norm call normalises by its input's statistics (``F.instance_norm``'s
    ``use_input_stats``, 6th; ``torch.instance_norm``'s, 6th too); other norms always do."""
    if NORM_FUNCTIONS.get(func) != "instance_norm":
        return True
    return bool(kwargs.get("use_input_stats", args[5] if len(args) > 5 else True))


class _Tracer(TorchFunctionMode):
    """Follows the assessed layers' outputs through :data:`HOMOGENEOUS_FUNCTIONS` into
    :data:`NORM_FUNCTIONS` calls (``__torch_function__`` sees both a norm module's own call and
    one in user code; torch runs it with the mode off, so only the outermost call is seen)."""

    def __init__(self, source: dict[int, tuple[str, int, Tensor]], found: dict[str, str],
                 running: list[str], norm_modules: set[str]) -> None:
        super().__init__()
        self.source, self.found, self.running, self.norm_modules = source, found, running, norm_modules

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        norm = func in NORM_FUNCTIONS
        if not (norm or func in HOMOGENEOUS_FUNCTIONS) or not args:
            return out
        key = _storage(args[0])
        src = self.source.get(key) if key is not None else None
        if src is None or args[0].numel() != src[1]:
            return out
        if norm:
            if _uses_input_stats(func, args, kwargs):
                owner = self.running[-1] if self.running else ""
                # a norm module is named as before; a call in user code by the module and function
                self.found.setdefault(src[0], owner if owner in self.norm_modules
                                      else f"{owner + '.' if owner else ''}{NORM_FUNCTIONS[func]}()")
        elif _storage(out) is not None:  # homogeneous: the scale passes through
            self.source[_storage(out)] = (src[0], out.numel(), out)
        return out


def normalised_layers(model: nn.Module, inputs: Any, param_names: Iterable[str] | None = None, *,
                      owned: bool = False) -> dict[str, str] | None:
    """``{layer: norm}``: the modules holding an assessed parameter (``param_names``; ``None``:
    every parameter) whose whole output goes into a scale-invariant normalisation directly or
    through :data:`HOMOGENEOUS_LAYERS` / :data:`HOMOGENEOUS_FUNCTIONS`, seen in one forward pass
    of ``inputs`` (a batch) on a private copy in eval mode without gradients. The norm is any
    call of :data:`NORM_FUNCTIONS` (a ``torch.overrides.TorchFunctionMode`` sees it), named by
    its module (``"1"``: an ``nn.LayerNorm``) or, called in a ``forward`` of the user's, by that
    module and the function (``"block.layer_norm()"``, ``"layer_norm()"`` in the model's own).
    Views (flatten, transpose) count as the same output (shared storage and size); any other op
    in between (a residual sum, a nonlinearity such as tanh) breaks the chain, so the result may
    miss a symmetry (e.g. a scale by a constant), never name one that is absent. A forward that
    fails under the mode (a compiled model, say) is run again with module hooks alone (norm
    modules only, as formerly).

    ``owned``: ``model`` is already the caller's private copy in eval mode (the estimation's
    program holds one: no second copy of a large model), run as it is with hooks removed
    afterwards. A model that cannot be copied, or whose forward fails here, gives ``{}`` (the
    estimation reports the failure itself); ``owned``: ``None`` where the forward failed.
    """
    if owned:
        copy = model
    else:
        try:
            copy = private_copy(model, "copying the model to find layers whose output is normalised")
        except ModelCopyError as err:
            log.info("estimation: normalisation probe skipped (%s)", err)
            return {}
    wanted = None if param_names is None else set(param_names)
    for traced in (True, False):
        try:
            return _probe(copy, inputs, wanted, traced)
        except Exception as err:  # noqa: BLE001 - the estimation's own forward reports it
            log.info("estimation: normalisation probe%s failed (%s)", " under the function mode" if traced else "", err)
    return None if owned else {}


def _probe(copy: nn.Module, inputs: Any, wanted: set[str] | None, traced: bool) -> dict[str, str]:
    """One forward of :func:`normalised_layers`; ``traced``: under :class:`_Tracer` (else norm
    modules' forward hooks alone). Raises what the forward raises."""
    # output storage -> (assessed layer, its numel, the output itself: held so that its memory is not
    # reused by a later tensor, which would then read as the same output)
    source: dict[int, tuple[str, int, Tensor]] = {}
    found: dict[str, str] = {}
    running: list[str] = []
    norm_modules = {name for name, mod in copy.named_modules() if isinstance(mod, SCALE_INVARIANT_NORMS)}
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
                if not (isinstance(mod, nn.modules.instancenorm._InstanceNorm)
                        and mod.track_running_stats and not mod.training):  # constants, not the input's
                    found.setdefault(src[0], name)
            else:  # homogeneous: the scale passes through
                source[key] = (src[0], out.numel(), out)
        return post

    def enter(name: str) -> Callable:
        return lambda mod, args: running.append(name)

    def leave(mod: nn.Module, args: tuple, out: Any) -> None:
        running.pop()

    for name, mod in copy.named_modules():
        own = [f"{name}.{k}" if name else k for k, p in mod._parameters.items() if p is not None]
        if traced:  # the innermost module running names a norm function's call
            handles.append(mod.register_forward_pre_hook(enter(name)))
        if isinstance(mod, SCALE_INVARIANT_NORMS):
            if not traced:
                handles.append(mod.register_forward_hook(hook(name, "norm")))
        elif isinstance(mod, HOMOGENEOUS_LAYERS):
            handles.append(mod.register_forward_hook(hook(name, "homogeneous")))
        elif own and (wanted is None or wanted & set(own)) and not list(mod.children()):
            handles.append(mod.register_forward_hook(hook(name, "assessed")))
        if traced:  # after the others: they run before it pops
            handles.append(mod.register_forward_hook(leave))
    try:
        with torch.no_grad(), eval_mode(copy):
            if traced:
                with _Tracer(source, found, running, norm_modules):
                    copy(inputs)
            else:
                copy(inputs)
    finally:
        for h in handles:
            h.remove()
    return found


#: an attention head's two bilinear pairs: the query/key projections meet only in ``q . k``
#: (``q -> A q, k -> A^-T k`` keeps it), the value/output ones only in ``W_o[:, head] v``
#: (``v -> A v, W_o[:, head] -> W_o[:, head] A^-1`` keeps it); per pair, the tensors' head blocks and
#: how a generator ``X`` (``A = I + t X``) moves each: ``"left"`` ``X B``, ``"left_t"`` ``-X' B``
#: (rows of the head), ``"right"`` ``-B X`` (columns of the head)
_HEAD_PAIRS: dict[str, tuple[tuple[str, int, str], ...]] = {
    # (tensor, which third of the packed projection (0 q, 1 k, 2 v; -1: not packed), action)
    "qk": (("in_proj_weight", 0, "left"), ("in_proj_weight", 1, "left_t"), ("q_proj_weight", -1, "left"),
           ("k_proj_weight", -1, "left_t"), ("in_proj_bias", 0, "left"), ("in_proj_bias", 1, "left_t"),
           ("bias_k", -1, "left_t")),
    "vo": (("in_proj_weight", 2, "left"), ("v_proj_weight", -1, "left"), ("in_proj_bias", 2, "left"),
           ("bias_v", -1, "left"), ("out_proj.weight", -1, "right")),
}


def attention_heads(model: nn.Module, param_names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """``{module name: (num_heads, head_dim)}`` for the ``nn.MultiheadAttention`` modules of
    ``model`` holding an assessed tensor (``param_names``; ``None``: every parameter), packed
    (``in_proj_weight``) or not (``kdim``/``vdim``: ``q_proj_weight`` ...), with or without biases,
    ``add_bias_kv``, ``batch_first``. Each head's queries and keys meet only in ``q . k`` and its
    values only through ``out_proj``'s columns of that head, so the loss is flat along
    :func:`attention_head_tangents`' directions. A subclass with its own ``forward`` is left out (it
    may compute something else). In ``named_modules`` order."""
    wanted = None if param_names is None else set(param_names)
    out: dict[str, tuple[int, int]] = {}
    for fqn, m in model.named_modules():
        if not isinstance(m, nn.MultiheadAttention) or type(m).forward is not nn.MultiheadAttention.forward:
            continue
        prefix = f"{fqn}." if fqn else ""
        own = {prefix + k for k, _ in m.named_parameters()}
        if wanted is None or own & wanted:
            out[fqn] = (m.num_heads, m.head_dim)
    return out


def _head_start(w: Tensor, third: int, h: int, dh: int) -> int:
    """First row (or feature) of head ``h`` in ``w``: in the ``third``-th third of a packed
    projection (``-1``: not packed)."""
    return (max(third, 0) * w.shape[0] // 3 if third >= 0 else 0) + h * dh


def _frozen_head_block(w: Tensor, name: str, third: int, how: str, h: int, dh: int) -> Tensor:
    """Head ``h``'s block of a frozen projection reduced to a factor with the same Gram matrix
    (:func:`attention_head_tangents`): for ``how == "right"`` (``out_proj``: the moves ``-W_b X``,
    ``W_b [E, dh]``) ``R`` of ``W_b = Q R`` (``[min(E, dh), dh]``, ``W_b'W_b = R'R``); else (the
    moves ``M W_h``, ``W_h [dh, E]``, a bias ``[dh, 1]``) ``R'`` of ``W_h' = Q R``
    (``[dh, min(E, dh)]``, ``W_h W_h' = R'R``)."""
    if how == "right":
        return torch.linalg.qr(w[:, h * dh:(h + 1) * dh], mode="r")[1]
    start = _head_start(w, third, h, dh)
    if name.endswith("bias_k") or name.endswith("bias_v") or w.dim() == 1:  # its head's features: a column
        return w.reshape(-1)[start: start + dh].unsqueeze(-1)
    return torch.linalg.qr(w[start: start + dh].T, mode="r")[1].T


def _pins_every_generator(blocks: list[Tensor]) -> bool:
    """Whether the frozen head blocks (:func:`_frozen_head_block`) leave no generator combination:
    some square block's least singular value is above the SVD's rank cut (``1e-12`` of the
    stacked moves' largest, which is at most the root of the sum of the blocks' largest squared).
    ``X B = 0``, ``X' B = 0`` or ``W X = 0`` with such a block forces ``X = 0``, and the stacked
    moves' least singular value is at least the block's: the SVD would keep none (the same answer,
    without it)."""
    mats = [b for b in blocks if b.shape[0] == b.shape[1] and b.numel()]
    if not mats:
        return False
    top = math.sqrt(sum(float(torch.linalg.matrix_norm(b, 2)) ** 2 for b in blocks))
    return top > 0 and any(float(torch.linalg.svdvals(b).min()) > 1e-12 * top for b in mats)


def attention_head_tangents(heads: dict[str, tuple[int, int]], value: Callable[[str], Tensor | None],
                            names: list[str], decay: dict[str, float]) -> Tensor:
    """``[d, k]`` float64 tangents at the current weights of the attention heads' symmetries
    (:func:`attention_heads`; method.md section 6, "When the approximation holds"), in the flat
    order of the assessed tensors ``names`` (``d`` their total size): for each head and pair
    (query/key, value/output) the generators ``X`` of ``A = I + t X``, ``dW_q = X W_q``,
    ``dW_k = -X' W_k`` (biases and ``bias_k`` alike), ``dW_v = X W_v``, ``dW_o[:, head] = -W_o[:,
    head] X``. Every record's loss is constant along them. Where an L2 penalty (``decay``, per
    tensor) acts on a pair's tensors only the rotations (``X`` antisymmetric, ``head_dim (head_dim
    - 1) / 2`` of them) keep it too; without one all ``head_dim^2``. A tensor that is not assessed
    (frozen) cannot move: only the combinations of generators that leave it unchanged are kept.
    ``value(name)`` gives a tensor's current weights (float64, its shape; ``None``: absent).
    Columns are not normalised and may be 0 or linearly dependent (a head whose weights are 0).
    """
    offsets, o = {}, 0
    for k in names:
        t = value(k)
        n = 0 if t is None else t.numel()
        offsets[k], o = (o, o + n), o + n
    cols: list[Tensor] = []
    for fqn, (num_heads, dh) in heads.items():
        prefix = f"{fqn}." if fqn else ""
        for acts in _HEAD_PAIRS.values():
            present = [(prefix + t, third, how) for t, third, how in acts if value(prefix + t) is not None]
            decayed = any(decay.get(k, 0.0) != 0.0 for k, _, _ in present)
            for h in range(num_heads):
                gens = [(a, c) for a in range(dh) for c in range(dh) if not decayed or a < c]
                assessed = torch.zeros(o, len(gens), dtype=torch.float64)
                frozen: list[tuple[int, Tensor]] = []
                # A frozen tensor's head block enters only through the Gram matrix of its moves over
                # the generators (the SVD below reads singular values and Vh): the block replaced by
                # its QR factor R (head_dim square at most) has the same Gram, so the same combinations
                # (X W = 0 iff X R' = 0 for W = R'Q'), at a cost free of the frozen tensor's size
                # (rv49: in_proj_bias assessed alone, E = 64, 2 heads, > 300 s)
                small = {(k, third): _frozen_head_block(value(k), k, third, how, h, dh)
                         for k, third, how in present if k not in offsets}
                if _pins_every_generator(list(small.values())):
                    continue  # (the stacked moves have full rank: no combination is left; rv49)
                for j, (a, c) in enumerate(gens):
                    X = torch.zeros(dh, dh, dtype=torch.float64)
                    X[a, c] = 1.0
                    if decayed:  # a rotation: keeps every tensor's norm
                        X[c, a] = -1.0
                    moved: dict[str, Tensor] = {}
                    for k, third, how in present:
                        if k not in offsets:
                            R = small[(k, third)]
                            frozen.append((j, (-R @ X if how == "right" else (X if how == "left" else -X.T) @ R).reshape(-1)))
                            continue
                        w = value(k)
                        dw = moved.setdefault(k, torch.zeros_like(w))
                        if how == "right":
                            block = slice(h * dh, (h + 1) * dh)
                            dw[:, block] = -w[:, block] @ X
                            continue
                        start = _head_start(w, third, h, dh)
                        rows = slice(start, start + dh)
                        M = X if how == "left" else -X.T
                        if k.endswith("bias_k") or k.endswith("bias_v"):  # [1, 1, E]: the head's features
                            dw.view(-1)[rows] = M @ w.reshape(-1)[rows]
                        else:
                            dw[rows] = M @ w[rows]
                    for k, dw in moved.items():
                        assessed[offsets[k][0]: offsets[k][1], j] = dw.reshape(-1)
                if frozen:  # the generators' combinations that leave every frozen tensor where it is
                    fixed = torch.stack([torch.cat([v for j2, v in frozen if j2 == j]) for j in range(len(gens))], 1)
                    # (Vh alone is read: the thin SVD where the frozen elements are at least the
                    # generators, not the full [frozen, frozen] U of a large frozen projection; rv49)
                    _, sv, Vh = torch.linalg.svd(fixed, full_matrices=fixed.shape[0] < fixed.shape[1])
                    rank = int((sv > 1e-12 * float(sv.max())).sum()) if sv.numel() and float(sv.max()) > 0 else 0
                    assessed = assessed @ Vh[rank:].T
                cols.append(assessed)
    return torch.cat(cols, 1) if cols else torch.zeros(o, 0, dtype=torch.float64)
