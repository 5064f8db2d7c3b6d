"""The user's forward on a quantized copy: a quantized weight used outside its own module, named.

A backend such as torchao releases a weight as a tensor subclass (``IntxUnpackedToInt8Tensor``)
that implements its module's own function (``F.linear`` for a Linear, ``F.embedding`` for an
Embedding) and little else. A forward that uses that weight in another op (the tied output head
``h @ self.emb.weight.T``: ``aten.permute``; indexing; ``torch.matmul``) then fails in the
quantized copy with the backend's own error, which names neither the parameter nor the cause.
:func:`release_forward` runs a forward under a ``TorchFunctionMode`` that, only when
an op fails on such a weight, raises :class:`ReleaseForwardError` naming the parameter(s), the op
and the fixes. Ops that succeed pass through unchanged (the mode only calls them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .base import QuantizationScheme, SchemeError, _quantized_kind

__all__ = ["LAYER_FUNCTIONS", "ReleaseForwardError", "joined", "quantized_forward_errors", "release_forward",
           "uses_outside_layers"]


class ReleaseForwardError(SchemeError):
    """The quantized copy of a scheme cannot run the model's forward: an op the backend's
    quantized tensor does not implement was applied to a quantized weight outside its module.
    ``params``: the parameter names; ``op``: the op; ``scheme``: the scheme's name."""

    def __init__(self, message: str, params: tuple[str, ...] = (), op: str = "", scheme: str = "") -> None:
        super().__init__(message)
        self.params, self.op, self.scheme = params, op, scheme


def _op_name(func: Any, exc: BaseException) -> str:
    """The failing op: the aten overload the backend's error names, else the torch function."""
    m = re.search(r"op='([\w.]+)'", str(exc)) or re.search(r"(aten\.\w+)", str(exc))
    try:  # "torch.Tensor.T.__get__" for a property (its __qualname__ reads "getset_descriptor.__get__")
        name = torch.overrides.resolve_name(func) or repr(func)
    except Exception:  # noqa: BLE001 - a function torch does not list
        name = getattr(func, "__qualname__", None) or repr(func)
    return f"{name} ({m.group(1)})" if m else str(name)


def _message(scheme: str, names: list[str], kinds: list[str], op: str, exc: BaseException) -> str:
    shown = ", ".join(repr(n) for n in names)
    layers = sorted({n.rpartition(".")[0] for n in names})
    keep = " and ".join(f"fqn != {m!r}" for m in layers)
    return (f"the quantized copy of scheme {scheme!r} cannot run the model's forward: {op} is not implemented "
            f"for the quantized weight {shown} ({', '.join(sorted(set(kinds)))}), which the forward uses outside its "
            f"module (the backend raised {type(exc).__name__}, the cause of this error). The backend's quantized tensor "
            "runs only its layer's own function (F.linear for a Linear, F.embedding for an Embedding): write the "
            "use as that function (a tied output head `h @ emb.weight.T` as `F.linear(h, emb.weight)`), or leave "
            f"that layer in float with the scheme's filter_fn (get_scheme({scheme!r}, filter_fn=lambda m, fqn: "
            f"{keep})), or use a library round-to-nearest scheme (rtn_*), whose weights are plain tensors")


class _Watch(TorchFunctionMode):
    """Calls every torch function as it is; one that raises on a quantized weight of ``model``
    is re-raised as :class:`ReleaseForwardError` (the original error as its cause)."""

    def __init__(self, model: nn.Module, scheme: str) -> None:
        super().__init__()
        self.scheme = scheme
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)
                      if _quantized_kind(p) is not None}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except ReleaseForwardError:
            raise
        except Exception as exc:  # noqa: BLE001 - named when a quantized weight is the culprit
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            hit = [(self.names[id(t)], t) for t in leaves if id(t) in self.names]
            if not hit:
                raise
            names = list(dict.fromkeys(n for n, _ in hit))
            kinds = [str(_quantized_kind(t)) for _, t in hit]
            op = _op_name(func, exc)
            raise ReleaseForwardError(_message(self.scheme, names, kinds, op, exc), tuple(names), op,
                                      self.scheme) from exc


@contextmanager
def release_forward(model: nn.Module, scheme: str) -> Iterator[None]:
    """Run ``model``'s forward (a scheme's quantized copy) inside; an op that fails on one of its
    quantized weights (a tensor subclass: :func:`~.base._quantized_kind`) raises
    :class:`ReleaseForwardError` naming them, the op and the fixes. A copy without such weights
    (float, ``rtn_*``, casts) runs without the mode.

    Raises:
        ReleaseForwardError: as above (a :class:`~.base.SchemeError`; the backend's error is its
            cause).
    """
    watch = _Watch(model, scheme)
    if not watch.names:
        yield
        return
    with watch:
        yield


def quantized_forward_errors(model: nn.Module, schemes: Iterable[QuantizationScheme],
                             run: Callable[[nn.Module], Any]) -> list[ReleaseForwardError]:
    """Each scheme's quantized copy of ``model`` (``scheme.apply``: a deep copy, ``model`` is not
    modified) through ``run(copy)`` (one batch of the utility evaluation) under
    :func:`release_forward`: the :class:`ReleaseForwardError` of each scheme whose copy cannot
    run the forward, so that a front end can say it before the estimation or the training. A
    scheme that cannot be applied, or whose copy fails otherwise, is left to the checks and the
    error row that say it already. The caller isolates the random streams.

    Returns:
        the errors, in the schemes' order (empty: every copy runs the batch, or none could be built).
    """
    errors: list[ReleaseForwardError] = []
    for scheme in schemes:
        try:
            qmodel = scheme.apply(model).model
        except Exception:  # noqa: BLE001 - check_schemes and the scheme's error row say why
            continue
        try:
            with release_forward(qmodel, scheme.name):
                run(qmodel)
        except ReleaseForwardError as exc:
            errors.append(exc)
        except Exception:  # noqa: BLE001 - not this check's kind: the assessment's own checks and rows
            continue
    return errors


def joined(errors: list[ReleaseForwardError]) -> ReleaseForwardError:
    """One error for several schemes' :class:`ReleaseForwardError` (the first's message, the
    others named where their parameters and op are the same, else their messages too)."""
    first = errors[0]
    same = [e.scheme for e in errors[1:] if (e.params, e.op) == (first.params, first.op)]
    other = [str(e) for e in errors[1:] if (e.params, e.op) != (first.params, first.op)]
    msg = str(first) + (f" (the same for scheme(s) {', '.join(repr(s) for s in same)})" if same else "")
    msg += "".join(f"; and {m}" for m in other)
    out = ReleaseForwardError(msg, first.params, first.op, first.scheme)
    out.__cause__ = first.__cause__
    return out


#: the functions layers apply to their own weights (``torch.nn.functional`` and the ``torch._C``
#: ops they dispatch to, by ``__name__``): a weight that reaches only these in the float forward is
#: used as its layer uses it, so the quantized copies need not be run before the assessment
LAYER_FUNCTIONS = frozenset({
    "linear", "bilinear", "embedding", "embedding_bag", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
    "prelu", "multi_head_attention_forward", "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell",
})


class _Uses(TorchFunctionMode):
    """Records the parameters of ``model`` that an op other than a layer function
    (:data:`LAYER_FUNCTIONS`) turns into a tensor (``.T``, indexing, ``torch.matmul``); metadata
    reads (``.device``, ``.requires_grad``: no tensor out) do not count."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.ids = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.names: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", None) not in LAYER_FUNCTIONS and any(
                isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(out)):
            self.names.update(self.ids[id(t)] for t in torch.utils._pytree.tree_leaves((args, kwargs))
                              if id(t) in self.ids)
        return out


@contextmanager
def uses_outside_layers(model: nn.Module) -> Iterator[set[str]]:
    """Inside, ``model``'s forward is watched; the set yielded fills with the names of its
    parameters that an op other than their layer's function used (:class:`_Uses`). Empty after
    a forward: no quantized copy can fail the way :class:`ReleaseForwardError` says, so the front
    ends skip running them before the assessment (the assessment's own copies still say it)."""
    mode = _Uses(model)
    with mode:
        yield mode.names
