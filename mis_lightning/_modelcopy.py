"""Private copies of the user's model, with an error that names the culprit when one fails.

The library quantizes and evaluates *copies* (``copy.deepcopy``) so that the user's model is
never changed. ``deepcopy`` fails on attributes that cannot be copied -- a non-leaf tensor kept
from ``training_step`` (``self.last_out = out``: "Only Tensors created explicitly by the user
(graph leaves) support the deepcopy protocol"), a lock, an open file, a thread pool -- with a
message that names neither the attribute nor the step. :func:`private_copy`

* copies non-leaf tensors held as plain module attributes detached (same values; autograd
  history is of no use to a quantized copy), and
* otherwise raises :class:`ModelCopyError` naming the step, the attribute, its module and
  the cause.

``deepcopy`` keeps functions as they are, closures included: a ``forward`` compiled as an
instance attribute (``m.forward = torch.compile(m.forward)``; Lightning does it for
``trainer.fit(torch.compile(module))``) or a lambda / hook closing over the module would make
the copy run the *original* module, so that every quantized copy evaluated the float weights
and every per-sample gradient with respect to the copy's parameters was 0 (leakage 0 for every
scheme). :func:`private_copy` points such closures at the copy's own modules -- through
closure cells, default arguments, plain lists / tuples / dicts in them, and parameters or
buffers closed over -- and replaces a ``torch.compile`` wrapper by the callable it wraps
(the same computation, eager: the copies run under ``torch.func`` transforms; the user's own
``functools.wraps`` decorators are kept). A trainable *parameter* closed over directly (not
through its module) is refused with :class:`ModelCopyError`: the estimation substitutes
parameters through ``torch.func.functional_call`` and a scheme replaces a quantized module's
weight, neither of which a closure over the tensor itself sees (its gradients read 0 and its
quantized copy ran the float weight, silently). A hook closing over one is not refused here
(it may only read it); :class:`SwapCheck` settles every path -- hooks, containers, views,
globals -- on the first batch, by autograd.
"""

from __future__ import annotations

import copy
import functools
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["SWAP_CHECK_RECORDS", "ModelCopyError", "SharedWeights", "SwapCheck", "private_copy"]

# records of the first batch that :class:`SwapCheck` runs (bounds the check's forward and backward)
SWAP_CHECK_RECORDS = 64


class ModelCopyError(RuntimeError):
    """The model could not be deep-copied; the message names the step and the attribute."""


def _state(mod: nn.Module) -> dict[str, Any]:
    """What ``deepcopy`` copies of ``mod`` (its ``__getstate__``, e.g. without Lightning's trainer)."""
    try:
        state = mod.__getstate__()
    except Exception:  # noqa: BLE001 - fall back to the instance dict
        state = None
    return state if isinstance(state, dict) else dict(vars(mod))


def _non_leaf_memo(model: nn.Module) -> dict[int, Any]:
    """``deepcopy`` memo mapping each non-leaf tensor attribute to a detached clone."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for key, val in _state(mod).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(val, Tensor) and not val.is_leaf:
                memo[id(val)] = val.detach().clone()
    return memo


def _derived_attributes(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """``(module path, attribute, parameter names)`` of each non-leaf tensor attribute whose
    autograd history reaches trainable parameters of ``model`` (``self.wt = self.head.weight.T``):
    the copy holds it detached, a constant that neither the substitution nor a scheme moves."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    found = []
    for path, mod in model.named_modules():
        for key, val in _state(mod).items():
            if key in ("_parameters", "_buffers", "_modules") or not isinstance(val, Tensor) \
                    or val.is_leaf or val.grad_fn is None:
                continue
            reached, seen, todo = set(), set(), [val.grad_fn]
            while todo:
                fn = todo.pop()
                if fn is None or id(fn) in seen:
                    continue
                seen.add(id(fn))
                var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
                if isinstance(var, Tensor) and id(var) in names:
                    reached.add(names[id(var)])
                todo.extend(f for f, _ in fn.next_functions)
            if reached:
                found.append((path, key, sorted(reached)))
    return found


def _culprits(model: nn.Module, memo: dict[int, Any], limit: int = 3) -> list[tuple[str, str, str, Exception]]:
    """``(attribute, module path, module type, error)`` of attributes that cannot be copied."""
    found = []
    for path, mod in model.named_modules():
        for key, val in _state(mod).items():
            if key == "_modules":  # submodules are visited on their own
                continue
            items = val.items() if key in ("_parameters", "_buffers") and isinstance(val, dict) else [(key, val)]
            for name, v in items:
                try:
                    copy.deepcopy(v, dict(memo))
                except Exception as exc:  # noqa: BLE001 - any failure names this attribute
                    found.append((name, path, type(mod).__name__, exc))
                    if len(found) >= limit:
                        return found
    return found


# how deep to look through nested closures and wrappers for references to the original model
_CLOSURE_DEPTH = 6


class _Pairs(dict):
    """id of an original module / parameter / buffer -> the copy's; ``trainable`` maps the ids of
    the trainable parameters to their names, and ``hits`` collects those found in a closure."""

    def __init__(self) -> None:
        super().__init__()
        self.trainable: dict[int, str] = {}
        self.hits: list[str] = []


# what the copy-time scan found, per copy, for the first-batch check's message: parameter name ->
# the callables (attributes, hook entries) that hold it; and the non-leaf attributes copied detached
_HELD_BY: weakref.WeakKeyDictionary[nn.Module, dict[str, list[str]]] = weakref.WeakKeyDictionary()
_DERIVED: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, str, list[str]]]] = weakref.WeakKeyDictionary()


def _rebound(val: Any, pairs: _Pairs, depth: int = 0) -> Any:
    """``val`` with every reference to a module of the original model (a key of ``pairs``) in
    its closures replaced by the copy's module; a ``torch.compile`` wrapper is replaced by the
    callable it wraps (rebound). ``val`` itself when nothing refers to the original."""
    if depth > _CLOSURE_DEPTH:
        return val
    if isinstance(val, (nn.Module, Tensor)):  # a module, or a parameter / buffer of the original
        if id(val) in pairs.trainable:
            pairs.hits.append(pairs.trainable[id(val)])
        return pairs.get(id(val), val)
    if type(val) in (list, tuple, dict):  # e.g. a closure over [self.a, self.b] or {"w": self.fc.weight}
        items = list(val.items()) if isinstance(val, dict) else list(enumerate(val))
        new_items = [(k, _rebound(v, pairs, depth + 1)) for k, v in items]
        if all(a[1] is b[1] for a, b in zip(items, new_items)):
            return val
        if isinstance(val, dict):
            return dict(new_items)
        return type(val)(v for _, v in new_items)
    if isinstance(val, types.MethodType):
        owner = pairs.get(id(val.__self__))
        func = _rebound(val.__func__, pairs, depth + 1)
        if owner is None and func is val.__func__:
            return val
        return types.MethodType(func, owner if owner is not None else val.__self__)
    if isinstance(val, functools.partial):
        func = _rebound(val.func, pairs, depth + 1)
        args = tuple(_rebound(a, pairs, depth + 1) for a in val.args)
        kw = {k: _rebound(v, pairs, depth + 1) for k, v in val.keywords.items()}
        if func is val.func and all(a is b for a, b in zip(args, val.args)) and \
                all(kw[k] is v for k, v in val.keywords.items()):
            return val
        return functools.partial(func, *args, **kw)
    if not isinstance(val, types.FunctionType):
        return val
    if getattr(val, "_torchdynamo_orig_callable", None) is not None:
        # a torch.compile wrapper: the bound callable it compiled sits in its closures
        return _rebound(_compiled_target(val), pairs, depth + 1)
    # default arguments too (``lambda x, m=self.head: m(x)``)
    defaults = val.__defaults__
    if defaults:
        new_def = tuple(_rebound(v, pairs, depth + 1) for v in defaults)
        defaults = defaults if all(a is b for a, b in zip(new_def, defaults)) else new_def
    kwdefaults = val.__kwdefaults__
    if kwdefaults:
        new_kw = {k: _rebound(v, pairs, depth + 1) for k, v in kwdefaults.items()}
        kwdefaults = kwdefaults if all(new_kw[k] is v for k, v in kwdefaults.items()) else new_kw
    changed = defaults is not val.__defaults__ or kwdefaults is not val.__kwdefaults__
    if not val.__closure__ and not changed:
        return val
    cells = []
    for cell in val.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell (a name not yet bound)
            cells.append(cell)
            continue
        new = _rebound(content, pairs, depth + 1)
        changed |= new is not content
        cells.append(types.CellType(new) if new is not content else cell)
    if not changed:
        return val
    fn = types.FunctionType(val.__code__, val.__globals__, val.__name__, defaults,
                            tuple(cells) if val.__closure__ else None)
    fn.__kwdefaults__ = kwdefaults
    fn.__dict__.update(val.__dict__)
    fn.__qualname__ = val.__qualname__
    return fn


def _compiled_target(wrapper: types.FunctionType) -> Any:
    """The callable a ``torch.compile`` wrapper compiled: its ``_torchdynamo_orig_callable``,
    followed through ``__wrapped__`` (for a bound method that is a ``functools.wraps`` shim
    whose ``__wrapped__`` is the bound method itself)."""
    target = wrapper._torchdynamo_orig_callable  # type: ignore[attr-defined]
    for _ in range(_CLOSURE_DEPTH):
        inner = getattr(target, "__wrapped__", None)
        # only torch's own shims are skipped: a user's functools.wraps decorator (a scaling, a
        # torch.no_grad) is part of the computation, and its __wrapped__ is the undecorated function
        if inner is None or isinstance(target, types.MethodType) or not _is_dynamo_shim(target):
            break
        target = inner
    return target


def _is_dynamo_shim(fn: Any) -> bool:
    """Whether ``fn`` is a function defined inside ``torch._dynamo`` (the ``functools.wraps`` shim
    ``torch.compile`` puts around a bound method)."""
    code = getattr(fn, "__code__", None)
    return code is not None and "_dynamo" in code.co_filename.replace("\\", "/").split("/")


def _rebind_closures(original: nn.Module, copied: nn.Module) -> list[tuple[str, str]]:
    """Point the copy's instance-attribute callables (``forward``, ``training_step``, hooks...)
    that refer to the original model at the copy's own modules (module docstring).

    Returns:
        ``(attribute, parameter name)`` of each callable attribute that closes over a trainable
        parameter of the original directly (not through its module). Hooks that do are not
        returned (a hook that only reads the tensor -- logs its norm, a state-dict or backward
        hook -- is harmless; one whose output depends on it is refused by :class:`SwapCheck`
        on the first batch); every finding is kept for that check's message.
    """
    pairs = _Pairs()
    pairs.update({id(o): c for o, c in zip(original.modules(), copied.modules())})
    for o, c in zip(original.modules(), copied.modules()):  # closures over a parameter or buffer
        for key, t in list(o._parameters.items()) + list(o._buffers.items()):
            ct = c._parameters.get(key) if key in o._parameters else c._buffers.get(key)
            if t is not None and ct is not None:
                pairs.setdefault(id(t), ct)
    # the copy's own parameters too: what deepcopy copies (a functools.partial attribute over
    # ``weight=self.head.weight``) holds the copy's tensor, which functional_call does not see either
    for model in (original, copied):
        for name, p in model.named_parameters():
            if p.requires_grad:
                pairs.trainable.setdefault(id(p), name)
    direct: list[tuple[str, str]] = []
    held: dict[str, list[str]] = {}
    for path, mod in copied.named_modules():
        d = vars(mod)
        for key, val in list(d.items()):
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            where = f"{path}.{key}" if path else key
            if isinstance(val, dict) and key.endswith("hooks"):  # the hook dicts of nn.Module
                for hk, hv in list(val.items()):
                    pairs.hits.clear()
                    new = _rebound(hv, pairs)
                    for n in pairs.hits:
                        held.setdefault(n, []).append(f"{where}[{hk}]")
                    if new is not hv:
                        val[hk] = new
                continue
            if isinstance(val, nn.Module) or not callable(val):
                continue
            pairs.hits.clear()
            new = _rebound(val, pairs)
            direct += [(where, n) for n in pairs.hits]
            for n in pairs.hits:
                held.setdefault(n, []).append(where)
            if new is not val:
                d[key] = new
    if held:
        _HELD_BY[copied] = held
    return direct


def _refuse_direct(step: str, direct: list[tuple[str, str]]) -> None:
    """Raise :class:`ModelCopyError` when a callable closes over a trainable parameter directly."""
    if not direct:
        return
    by_attr: dict[str, list[str]] = {}
    for attr, pname in direct:
        if pname not in by_attr.setdefault(attr, []):
            by_attr[attr].append(pname)
    named = "; ".join(f"{attr!r} closes over parameter{'s' if len(ps) > 1 else ''} "
                      + ", ".join(repr(p) for p in sorted(ps)) for attr, ps in list(by_attr.items())[:3])
    name = sorted(next(iter(by_attr.values())))[0]
    mod = name.rpartition(".")[0]
    raise ModelCopyError(
        f"{step}: {named} -- the tensor itself, not through its module. The assessment "
        "substitutes parameters (torch.func.functional_call, for the per-sample gradients) and "
        "each scheme replaces the weights of the modules it quantizes; a closure over the tensor "
        "sees neither, so its gradients would read 0 and its quantized copy would run the float "
        f"weight. Read the parameter through its module inside the function (self.{name}, or close "
        f"over the module{f' self.{mod}' if mod else ''} instead of its tensor)")


class SharedWeights:
    """Parameters of the user's model that a private copy holds on the user's own storage until a
    backend replaces them in the copy, instead of copying them (:func:`private_copy`'s ``shared``).

    torchao's ``quantize_`` reads a layer's float weight and puts a new Parameter (its quantized
    tensor) in the layer: a deep copy of that weight is written once and dropped unread. Here the
    copy gets a Parameter of its own (same dtype, shape, strides and ``requires_grad``) over the
    user's storage, with a version counter of its own; :meth:`release`, once the backend has run,
    gives every such Parameter that is still alive (the backend left it in float, or another
    attribute of the copy refers to it) a copy of its values, so that the copy returned never
    shares a tensor with the user's model, and raises where one was written in place.

    Only plain ``nn.Parameter`` objects over a strided tensor are shared; anything else is
    deep-copied as before (not listed in :attr:`memo`).
    """

    def __init__(self, params: Iterable[Tensor] = ()) -> None:
        #: ``id(user parameter) -> the copy's Parameter``, for ``copy.deepcopy``'s memo
        self.memo: dict[int, nn.Parameter] = {}
        self._held: list[tuple[weakref.ref, Tensor, int]] = []
        self.copied = 0  # parameters given their own values by release() (tests)
        for p in params:
            if (type(p) is not nn.Parameter or type(p.data) is not Tensor or id(p) in self.memo
                    or p.layout != torch.strided or p.device.type == "meta" or p.is_conj() or p.is_neg()
                    or p.is_inference()):
                continue
            try:
                with torch.no_grad():
                    alias = torch.empty(0, dtype=p.dtype, device=p.device).set_(
                        p.untyped_storage(), p.storage_offset(), p.size(), p.stride())
                shared = nn.Parameter(alias, requires_grad=p.requires_grad)  # shares alias's version counter
            except RuntimeError:  # a tensor kind that cannot be aliased this way: deep-copied instead
                continue
            self.memo[id(p)] = shared
            self._held.append((weakref.ref(shared), alias, alias._version))

    def release(self) -> None:
        """After the backend: each shared Parameter still alive gets its own copy of the values.

        Raises:
            RuntimeError: a shared Parameter was written in place (the user's weight with it): a
                backend that writes the copy's weights must not be given shared ones.
        """
        self.memo = {}
        held, self._held = self._held, []
        written = [tuple(a.shape) for _, a, v in held if a._version != v]
        for ref, alias, _ in held:
            p = ref()
            if p is not None and p.data_ptr() == alias.data_ptr() and p.device == alias.device:
                with torch.no_grad():
                    p.data = alias.clone(memory_format=torch.preserve_format)
                self.copied += 1
        if written:
            raise RuntimeError(f"a backend wrote in place into {len(written)} weight(s) of shape(s) "
                               f"{written[:3]} that its copy shared with the model (a bug of this library: "
                               "such a backend must copy them)")


def private_copy(model: nn.Module, step: str, shared: SharedWeights | None = None) -> nn.Module:
    """``copy.deepcopy(model)``, or a :class:`ModelCopyError` that names what failed.

    Args:
        model: the user's model (never modified).
        step: what the copy is for, in words (``"copying the model for scheme 'int8'"``).
        shared: parameters the copy holds on the user's storage until ``shared.release()``
            (:class:`SharedWeights`; ``None``: every tensor copied).

    Returns:
        An independent copy (parameters, buffers and attributes copied; non-leaf tensor
        attributes copied detached).

    Raises:
        ModelCopyError: an attribute cannot be deep-copied; the message names ``step``, the
            attribute, the module that holds it and the original error (kept as the cause).
            Also when a callable attribute (``forward``, a lambda; not a hook) closes over a
            trainable parameter directly (module docstring); the message names both.
    """
    share = {} if shared is None else shared.memo
    try:
        copied = copy.deepcopy(model, dict(share))
    except Exception as exc:  # noqa: BLE001 - diagnosed below
        first = exc
    else:
        _refuse_direct(step, _rebind_closures(model, copied))
        return copied
    memo = _non_leaf_memo(model)
    if memo:
        try:
            copied = copy.deepcopy(model, {**memo, **share})
        except Exception as exc:  # noqa: BLE001 - diagnosed below
            first = exc
        else:
            _refuse_direct(step, _rebind_closures(model, copied))
            derived = _derived_attributes(model)
            if derived:
                _DERIVED[copied] = derived
            return copied
    found = _culprits(model, memo)
    if not found:
        raise ModelCopyError(f"{step}: copy.deepcopy of the model failed: "
                             f"{type(first).__name__}: {first}") from first
    parts = []
    for name, path, cls, exc in found:
        where = "the model" if not path else f"submodule {path!r}"
        parts.append(f"attribute {name!r} of {where} ({cls}) cannot be deep-copied "
                     f"({type(exc).__name__}: {exc})")
    name, path = found[0][0], found[0][1]
    target = f"model.{path}.{name}" if path else f"model.{name}"
    raise ModelCopyError(
        f"{step}: " + "; ".join(parts) + ". The library quantizes and evaluates private copies "
        f"so that your model is never changed: delete the attribute before assessing (del "
        f"{target}), keep a detached tensor / a copyable object there, or give the module a "
        "__deepcopy__ / __getstate__ that leaves it out"
    ) from first


def _storage_ptr(t: Any) -> int | None:
    """The address of a tensor's storage; None for an empty tensor or one without plain storage
    (a tensor subclass such as torchao's quantized weights, a meta tensor)."""
    if not isinstance(t, Tensor) or not t.numel() or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr() or None
    except Exception:  # noqa: BLE001 - "invalid python storage" and the like
        return None


class _Seen(TorchFunctionMode):
    """Records the watched tensors (by identity, or by storage for the original's parameters)
    that reach a torch function as an argument; a tensor outside autograd that shares the
    storage of a trainable parameter of the original (``w.data``, ``w.detach()``, a view taken
    under ``torch.no_grad``), and a frozen parameter the estimation differentiates all the same
    (selected by ``params=``; by identity or storage), is replaced by a leaf that requires grad,
    so that autograd shows whether the outputs depend on it."""

    def __init__(self, ids: dict[int, str], storages: dict[int, str], trainable: set[int],
                 frozen: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.ids, self.storages, self.trainable, self.frozen, self.seen = ids, storages, trainable, frozen, {}
        # id -> (name, the tensor, its leaf, how it was reached: "alias" or "frozen")
        self.aliases: dict[int, tuple[str, Tensor, Tensor, str]] = {}

    def _leaf(self, name: str, t: Tensor, how: str) -> Tensor:
        if id(t) not in self.aliases:
            self.aliases[id(t)] = (name, t, t.detach().requires_grad_(), how)
        return self.aliases[id(t)][2]

    def _arg(self, t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        floating = t.is_floating_point() or t.is_complex()
        name = self.ids.get(id(t))
        if name is not None:
            self.seen[name] = None
            if name in self.frozen and not t.requires_grad and floating:
                return self._leaf(name, t, "frozen")
            return t
        ptr = _storage_ptr(t) if self.storages else None
        name = self.storages.get(ptr) if ptr is not None else None
        if name is None:
            return t
        self.seen[name] = None
        if t.is_leaf and floating and (ptr in self.trainable or name in self.frozen):
            return self._leaf(name, t, "frozen" if name in self.frozen else "alias")
        return t

    def __torch_function__(self, func: Any, types_: Any, args: Any = (), kwargs: Any = None) -> Any:
        args, kwargs = torch.utils._pytree.tree_map(self._arg, (args, kwargs or {}))
        return func(*args, **kwargs)


class SwapCheck:
    """Whether a forward that substitutes the parameters still depends on the originals.

    The estimation substitutes every parameter (``torch.func.functional_call``) and each scheme
    replaces the weights of the modules it quantizes. A forward that reaches a trainable
    parameter another way -- a closure, default argument or container holding the tensor, a
    non-module object that holds it, a view or slice of it taken in advance, a global or a
    class attribute, a non-leaf attribute derived from it (copied as a constant) -- reads the
    tensor itself: its gradients read 0 and its quantized copies run the float weight, with no
    error. The copy-time scan (:func:`private_copy`) sees closures only; this check runs one
    forward on the first batch with the substituted tensors and asks autograd whether the
    output depends on the original parameters (the user's and the copy's own, which the
    substitution removed from their modules) or on the derived attributes; a tensor outside
    autograd that shares a trainable parameter's storage (``w.data``, ``w.detach()``, a view
    taken under ``torch.no_grad``) is swapped for a leaf that requires grad as it reaches a torch
    function (a ``TorchFunctionMode``), so that autograd sees it too. Every path is covered, at
    the cost of one forward and one backward on the first batch (its first
    :data:`SWAP_CHECK_RECORDS` records: a forward that branches on the batch, e.g. on its size,
    takes the path the estimation's batches take; leakage 0.695 was measured for every scheme,
    0.103 read through the module, on a forward that left the substitution for batches of more
    than one record, which a one-record check passed). A tensor that is only read (a hook
    logging a norm) does not reach the output and passes. Frozen parameters are watched where
    the estimation differentiates them (``assessed``: selected by ``params=``; quantization
    follows that selection, so their quantized copies would run the float weight), swapped for
    a leaf that requires grad as they reach a torch function; the others are not differentiated
    and a path past the substitution reads their values as they are (the schemes quantize them
    in the copies too, so such a path runs their float values there: a utility-only
    effect, their leakage is not assessed).

    Args:
        original: the user's model.
        copied: the model the forward runs (the private copy, or ``original`` itself).
        assessed: the names of the parameters the estimation differentiates (frozen ones
            among them are watched too).
    """

    def __init__(self, original: nn.Module, copied: nn.Module, assessed: Iterable[str] = ()) -> None:
        self.model = copied
        self.watch: list[tuple[str, Tensor]] = []
        ids: set[int] = set()
        for model in (original, copied):
            for name, p in model.named_parameters():
                if id(p) not in ids:
                    ids.add(id(p))
                    self.watch.append((name, p))
        self.storages = {ptr: n for n, p in original.named_parameters() if (ptr := _storage_ptr(p))}
        self.trainable_names = {n for n, p in original.named_parameters() if p.requires_grad}
        named = dict(original.named_parameters())
        self.frozen_assessed = frozenset(n for n in assessed if n in named and not named[n].requires_grad)
        self.derived = _DERIVED.get(copied, [])
        self.held = _HELD_BY.get(copied, {})

    def run(self, forward: Callable[[], Any], swapped: Iterable[Tensor], step: str) -> None:
        """Run ``forward`` (the substituted forward on the first batch) and refuse a path past the swap.

        Args:
            forward: computes the outputs with the substituted tensors.
            swapped: the tensors substituted (their storage is not a sign of a bypass).
            step: what is checked, in words (starts the message).

        Raises:
            ModelCopyError: the outputs depend on a trainable parameter reached other than
                through its module (names the parameters and, where the copy-time scan found
                them, the callables that hold them); or the forward fails on a parameter it
                reaches that way (a dtype clash with the float64 copy), its error as the cause.
        """
        live = {id(t) for t in swapped}
        shared = {_storage_ptr(t) for t in swapped}
        storages = {k: v for k, v in self.storages.items() if k not in shared}
        mode = _Seen({id(t): n for n, t in self.watch if id(t) not in live}, storages,
                     {k for k, n in storages.items() if n in self.trainable_names}, self.frozen_assessed)
        trainable = [(repr(n), t) for n, t in self.watch if t.requires_grad and id(t) not in live]
        restore = []
        for path, key, pnames in self.derived:
            try:
                mod = self.model.get_submodule(path)
            except AttributeError:
                continue
            val = vars(mod).get(key)
            if isinstance(val, Tensor) and (val.is_floating_point() or val.is_complex()):
                restore.append((mod, key, val))
                vars(mod)[key] = t = val.detach().requires_grad_()
                trainable.append((f"{', '.join(repr(n) for n in pnames)} (through the attribute "
                                  f"{(path + '.' if path else '') + key!r}, a tensor computed from it "
                                  "and held detached by the copy)", t))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    with mode:
                        out = forward()
                except Exception as exc:  # noqa: BLE001 - named below when a bypass explains it
                    if mode.seen:
                        frozen = {n for n, t in self.watch if not t.requires_grad}
                        self._refuse(step, [repr(n) + (" (frozen)" if n in frozen else "") for n in mode.seen],
                                     f"and fails there ({type(exc).__name__}: {exc})", exc)
                    return  # not this check's concern: the estimation reports its own errors
                trainable += [(f"{name!r} (frozen, assessed: params= selects it)" if how == "frozen" else
                               f"{name!r} (through a tensor sharing its storage outside autograd: w.data, "
                               "w.detach(), or a view taken under torch.no_grad)", leaf)
                              for name, _, leaf, how in mode.aliases.values()]
                leaves = [t for t in torch.utils._pytree.tree_leaves(out)
                          if isinstance(t, Tensor) and t.requires_grad]
                if not leaves or not trainable:
                    return
                total = sum((t.real if t.is_complex() else t).float().sum() for t in leaves)
                try:
                    grads = torch.autograd.grad(total, [t for _, t in trainable], allow_unused=True)
                except RuntimeError:
                    return  # a graph autograd cannot walk back: left to the estimation
        finally:
            for mod, key, val in restore:
                vars(mod)[key] = val
        reached = [n for (n, _), g in zip(trainable, grads) if g is not None]
        if reached:
            self._refuse(step, reached, "", None)

    def _refuse(self, step: str, names: list[str], tail: str, cause: BaseException | None) -> None:
        plain = [n.split("'")[1] for n in names if n.startswith("'")]
        held = ["{!r} (held by {})".format(n, ", ".join(repr(w) for w in self.held[n][:3]))
                for n in plain if n in self.held]
        what = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
        mod = plain[0].rpartition(".")[0] if plain else ""
        pron = "them" if len(names) > 1 else "it"
        raise ModelCopyError(
            f"{step}: the forward reaches the parameter{'s' if len(names) > 1 else ''} {what} past the "
            f"substitution{' ' + tail if tail else f' (the outputs depend on {pron})'} -- not read through its module "
            "but through a closure, default argument, container or non-module object holding the tensor, "
            "a tensor computed from it in advance (a view, a slice, an attribute), or the model or the tensor "
            "reached through a global name or a class attribute"
            + (f"; found in: {'; '.join(held)}" if held else "")
            + ". The assessment substitutes parameters (torch.func.functional_call, for the per-sample "
            "gradients) and each scheme replaces the weights of the modules it quantizes; a path that "
            "holds the tensor itself sees neither, so its gradients would read 0 and its quantized copy "
            "would run the float weight. Read the parameter through its module inside the function, and compute "
            "from it there "
            f"(self.{plain[0] if plain else '<module>.weight'}), or hold the module"
            f"{f' (self.{mod})' if mod else ''} instead of its tensor") from cause
