"""torchao schemes: ``quantize_`` with real torchao configs, grids read from its tensors.

Every scheme here deep-copies the model (done by :meth:`QuantizationScheme.apply`; the float
weights ``quantize_`` only reads and replaces are held on the model's storage until replaced,
:class:`~mis_lightning._modelcopy.SharedWeights`), calls
``torchao.quantization.quantize_(copy, config, filter_fn=...)`` and reads each quantized
weight's grid back from the tensor subclass torchao put in its place:

* ``Int8Tensor`` (``Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig``) and
  ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``): kind ``"affine"``, codes
  ``qdata``, ``scale``, ``zero_point`` (integer domain: value ``(q - zp) * scale``) and
  ``block_size``; code range ``[-2^(b-1), 2^(b-1) - 1]``. On bf16 / fp16 weights
  ``IntxUnpackedToInt8Tensor`` rounds the quotient in that dtype: kind ``"quotient"``
  (:func:`_read_affine`).
* ``Float8Tensor`` (``Float8WeightOnlyConfig``): kind ``"table"``, values = every finite
  float8 value, ``scale`` per block (value ``qdata.float() * scale``). torchao gives an
  all-zero row (or group) scale 0 and NaN codes, so its ``dequantize()`` -- and the
  quantized layer's output -- are NaN there; the copy's NaN codes are set to 0 (a note
  says so), which makes those weights release exactly 0, and the grid keeps scale 0,
  which :class:`ParamGrid` treats as the one-cell grid ``{0}`` (frozen, kappa 0).
* ``Int4TilePackedTo4dTensor`` (``Int4WeightOnlyConfig``, tinygemm layout, CUDA only):
  see :class:`Int4WeightOnly`.

Per-row and per-group schemes of the library's own classes give ``quantize_`` each large layer
with its first rows only and quantize the other row blocks on stand-in Linears, then join torchao's
tensors along their rows (:data:`QUANTIZE_ROW_BLOCKS`): each row's codes and scales depend on that
row alone, so the layer holds the tensor ``quantize_`` on the whole weight gives, bit for bit
(tests/test_torchao_row_blocks.py), with torchao's float temporaries the size of a block.

Each reader is registered for its tensor type in a dispatch table
(:func:`register_grid_reader`): a torchao tensor type of a new config needs one reader, not
a new branch; a quantized weight of a type without a reader is an error naming the type.

Names follow torchao (the config's name in snake case, then what differs from the
config's defaults): ``int8_weight_only``, ``int8_dynamic_activation_int8_weight``,
``intx_weight_only_int4`` (``IntxWeightOnlyConfig(weight_dtype=torch.int4)``: per row, as
torchao's default ``PerAxis(0)``), ``intx_weight_only_int4_g32`` (``PerGroup(32)``),
``..._asym`` (``MappingType.ASYMMETRIC``), ``float8_weight_only``,
``int4_weight_only_tinygemm`` (``Int4WeightOnlyConfig``, groups of 128, tinygemm layout).
The names of earlier releases (``int4_weight_only`` for int4 groups of 32, ``int8_dynamic``,
``fp8_weight_only``, ``int4_tinygemm``, ``*_per_channel``) are deprecated aliases.

Which layers: torchao's own default filter (``nn.Linear``, not
``NonDynamicallyQuantizableLinear``), narrowed by the scheme's ``filter_fn(module, fqn)``.
The integer weight-only schemes (``int8_weight_only``, ``intx_weight_only_*``) then quantize
convolutions, embeddings and attention projections with the same grid rule
(:mod:`.beyond_linear`, :meth:`flat_spec`), which torchao's ``quantize_(model, config)`` leaves
in float: a release wider than torchao's, which the report warns of (``^``);
``beyond_linear=False`` (``<name>_linear_only``) is torchao's own release. Every other parameter (norm scales, biases, the
other schemes' non-Linear weights) stays in float, with the reason in ``result.unquantized``. A weight tied across several Linear layers
is quantized once and the quantized Parameter is given to every holder; tied to a layer
torchao does not quantize (e.g. an ``nn.Embedding``), it stays in float everywhere.
Biases are never quantized. A layer whose ``in_features`` is not a multiple of a per-group
scheme's group size is left in float with the reason in ``result.unquantized`` (torchao
itself raises ``AssertionError`` for it in the int8/intx configs, which would abort the
whole model, and silently skips it in ``Int4WeightOnlyConfig``).

``bits_per_weight`` = bits of a code + (bits of a scale + bits of a zero point) / elements
per block; the zero point is counted only for asymmetric mappings (symmetric schemes store
an all-zero zero point that carries nothing). The code bits are nominal: torchao's
``IntxUnpackedToInt8Tensor`` holds 1..7-bit codes unpacked in int8 memory.

torchao is imported lazily (inside methods): importing this module never needs it, and
``check_available()`` raises :class:`SchemeUnavailableError` naming the scheme and the
reason if torchao or the config class is missing.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._user_warnings import warn
from .base import (
    ParamGrid,
    SchemeConfig,
    SchemeError,
    SchemeUnavailableError,
    _quantized_kind,
    affine_grid,
    dequantized_kept,
    surgery_reasons,
)
from .beyond_linear import FlatSpec, beyond_linear_weights, quantize_beyond_linear, supports_beyond
from .casts import representable_values
from .registry import register_alias, register_scheme

_GRANULARITIES = ("per_row", "per_tensor", "per_group")

#: ``reader(scheme, parameter name, quantized weight, notes) -> ParamGrid``
GridReader = Callable[["TorchAOScheme", str, Tensor, list], ParamGrid]
#: torchao tensor type name -> the reader of its grid
GRID_READERS: dict[str, GridReader] = {}


def register_grid_reader(*type_names: str) -> Callable[[GridReader], GridReader]:
    """Decorator: register a grid reader for torchao tensor types (by class name, which is
    stable across torchao's module moves; subclasses are found through their MRO)."""
    def deco(fn: GridReader) -> GridReader:
        for t in type_names:
            GRID_READERS[t] = fn
        return fn
    return deco


def grid_reader(weight: Tensor) -> GridReader | None:
    """The reader registered for ``type(weight)`` or its nearest base class, else ``None``."""
    for k in type(weight).__mro__:
        if k.__name__ in GRID_READERS:
            return GRID_READERS[k.__name__]
    return None


def _torchao_default_filter() -> Callable[[nn.Module], bool]:
    """torchao's own default layer filter (``quant_api._is_linear``), or its equivalent."""
    try:
        _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
        from torchao.quantization.quant_api import _is_linear

        return lambda m: bool(_is_linear(m))
    except ImportError:  # pragma: no cover - private name moved in another torchao version
        return lambda m: isinstance(m, nn.Linear) and not isinstance(
            m, nn.modules.linear.NonDynamicallyQuantizableLinear)


class _OptionalKernelNoise(logging.Filter):
    """Drops torchao's import-time notices about optional GPU kernel libraries it cannot load
    on this machine (``Failed to load .../_C_mxfp8...so``, ``Detected no triton``): they are
    not about the CPU schemes used here; and torch's deprecation notice for torchao's own
    ``register_constant`` of an Enum (``<enum 'KernelPreference'> is an Enum subclass ...``),
    torchao's to fix, not the user's. Everything else torchao and torch log passes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to load") or "Detected no triton" in msg
                    or ("is an Enum subclass" in msg and "register_constant()" in msg))


def _import_torchao_quantization() -> Any:
    """``import torchao.quantization``, filtering only the notices of :class:`_OptionalKernelNoise`
    during the first import (the filters are removed again afterwards)."""
    aoq = sys.modules.get("torchao.quantization")
    if aoq is not None:  # imported: the import statement would run nothing (no notices to filter)
        return aoq
    with _torchao_import_notices_filtered():
        import torchao.quantization as aoq
    return aoq


@contextmanager
def _torchao_import_notices_filtered() -> Iterator[None]:
    """:class:`_OptionalKernelNoise` on the loggers of torchao's first import (torchao's, and
    torch's pytree, which logs torchao's Enum registration) for the block only."""
    names = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")
    filt = _OptionalKernelNoise()
    for n in names:
        logging.getLogger(n).addFilter(filt)
    try:
        yield
    finally:
        for n in names:
            logging.getLogger(n).removeFilter(filt)


def _torchao_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


@dataclass(frozen=True)
class TorchAOScheme(SchemeConfig):
    """Base of the torchao schemes: layer selection, ``quantize_``, grid reading.

    Subclasses are frozen dataclasses that set ``config_class`` (the name in
    ``torchao.quantization``) and ``base_name``, and implement :meth:`_config`; the grid of
    each quantized weight is read by the reader registered for its tensor type
    (:data:`GRID_READERS`). Per-group schemes have a ``group_size`` field.
    """

    backend: ClassVar[str] = "torchao"
    layers: ClassVar[str] = "nn.Linear (torchao's default filter)"
    #: the integer weight-only schemes quantize, besides torchao's own layers, convolutions,
    #: embeddings and attention projections (:meth:`_flat_spec`), which ``quantize_(model, config)``
    #: leaves in float; ``False``: only torchao's own layers, the release ``quantize_`` makes with
    #: the config (named ``<name>_linear_only``). Keyword only; a no-op where nothing lies beyond.
    beyond_linear: bool = field(default=True, kw_only=True, repr=False)

    @property  # type: ignore[override]
    def name(self) -> str:
        """The registry name (:meth:`name_parts`), ``_linear_only`` appended where
        ``beyond_linear=False`` leaves out layers the scheme would otherwise quantize."""
        stem = SchemeConfig.name.fget(self)  # type: ignore[attr-defined]
        return f"{stem}_linear_only" if not self.beyond_linear and self._flat_spec() is not None else stem

    def describe(self) -> dict:
        out = super().describe()
        if not self.beyond_linear and self._flat_spec() is not None:
            out["beyond_linear"] = False
        return out

    def flat_spec(self) -> FlatSpec | None:
        """The grid rule beyond ``nn.Linear`` (:meth:`_flat_spec`), ``None`` under
        ``beyond_linear=False`` (torchao's own release: its default filter's layers only)."""
        return self._flat_spec() if self.beyond_linear else None

    def _flat_spec(self) -> FlatSpec | None:
        """The grid rule with which the scheme quantizes the weights beyond torchao's default
        filter (:mod:`.beyond_linear`), or ``None``: torchao's layers only."""
        return None

    def _float_reason(self, name: str, p: Tensor, holders: list[tuple[str, str, nn.Module]],
                      selected: bool = True) -> str:
        # a weight beyond torchao's layers that beyond_linear=False leaves out: said as the choice it is
        if selected and not self.beyond_linear and self._flat_spec() is not None:
            for _, attr, m in holders:
                if supports_beyond(m) and not self.supports(m) and not attr.endswith("bias"):
                    return (f"{type(m).__name__}.{attr}: left in float as torchao's quantize_ leaves it (scheme "
                            f"{self.name!r}, beyond_linear=False: torchao's own release)")
        return super()._float_reason(name, p, holders, selected)

    def check_available(self) -> None:
        try:
            aoq = _import_torchao_quantization()
        except Exception as exc:
            raise SchemeUnavailableError(
                f"scheme {self.name!r} needs torchao, which cannot be imported here: "
                f"{type(exc).__name__}: {exc}") from exc
        if not hasattr(aoq, self.config_class):
            raise SchemeUnavailableError(
                f"scheme {self.name!r} needs torchao.quantization.{self.config_class}, which "
                f"torchao {_torchao_version()} does not have")

    def _config(self) -> Any:
        raise NotImplementedError

    def _skip_reason(self, module: nn.Module) -> str | None:
        g = getattr(self, "group_size", None)
        k = module.weight.shape[-1]
        if k == 1:  # quantize_ raised "shape '[out, 1]' is invalid for input of size 1" (torchao 0.18)
            return (f"in_features 1: scheme {self.name!r} leaves this layer in float (torchao's kernels "
                    "cannot quantize a one-column weight)")
        if g is not None and k % g != 0:
            return (f"in_features {k} is not a multiple of the group size {g}: scheme "
                    f"{self.name!r} leaves this layer in float (torchao cannot quantize it)")
        return None

    def _prepare(self, modules: dict[str, nn.Module], notes: list[str]) -> None:
        """Hook run on the chosen layers just before ``quantize_`` (e.g. dtype casts)."""

    def supports(self, module: nn.Module) -> bool:
        return _torchao_default_filter()(module)

    def _replaced_weights(self, model: nn.Module) -> list[Tensor]:
        # quantize_ reads each chosen layer's float weight and puts a new Parameter (its tensor
        # subclass) in the layer. Only this class's own pass: a subclass with its own
        # _quantize_copy (calibration, HQQ) may transform the weights first; the
        # beyond-Linear pass writes its weights in place (not chosen here).
        # Only the library's own classes, whose configs and _prepare hooks are known not to write
        # into the weights (rv47: a subclass's _prepare doing m.weight.data.mul_(2) would have
        # written the user's model unseen, .data having its own version counter), and not under
        # inference mode (its aliases keep no version counter to check the writes by).
        if type(self) not in _SHARES_REPLACED or torch.is_inference_mode_enabled():
            return []
        chosen, _, _ = self.select_weights(model, skip_reason=self._skip_reason)
        return [module.weight for module, _, _ in chosen.values()]

    def _row_blocks(self) -> bool:
        """Whether ``quantize_`` may run on row blocks of the chosen weights (:data:`QUANTIZE_ROW_BLOCKS`):
        the library's own classes (their configs and hooks are known) with blocks inside a row
        (per row, per group), where each row's codes and scales depend on that row alone."""
        return (QUANTIZE_ROW_BLOCKS and type(self) in _SHARES_REPLACED
                and getattr(self, "granularity", None) in ("per_row", "per_group"))

    def _quantize_copy(self, model: nn.Module):
        grids, notes, reasons = self._quantize_linear(model)
        spec = self.flat_spec()
        if spec is not None:
            quantize_beyond_linear(self, model, spec, grids, reasons, notes)
        return grids, notes, reasons

    def check_model(self, model: nn.Module) -> None:
        """Before any copy: torchao quantizes float32, bfloat16 or float16 weights only (a
        float64 weight among the layers this scheme would quantize raises :class:`SchemeError`
        naming it), and a scheme that would quantize no weight of ``model`` at all (e.g. a
        group size that divides no layer's row) raises :class:`SchemeError` with the reasons:
        it would be scored as no protection."""
        chosen, reasons, _ = self.select_weights(model, skip_reason=self._skip_reason)
        self._check_dtypes(chosen)
        if chosen:
            return
        spec = self.flat_spec()
        beyond, more = beyond_linear_weights(self, model, spec) if spec is not None else ([], {})
        if beyond:
            return
        # the Linear pass's reason first: for a tie between a Linear and an Embedding it names both
        # holders and why (the beyond-Linear pass sees only the Embedding's side of it)
        why = {**more, **reasons} or surgery_reasons(model)
        shown = "; ".join(f"{k}: {v}" for k, v in list(why.items())[:3]) + (
            f"; and {len(why) - 3} more" if len(why) > 3 else "")
        text = " ".join(why.values())
        # what would apply instead: torchao leaves tied weights in float (it would quantize the
        # shared tensor twice); this library's round-to-nearest schemes quantize them once
        hint = ("a scheme that quantizes tied weights (rtn_int8, rtn_int4, native_int8_per_row)" if "tied" in text
                else "a per-row one, e.g. intx_weight_only_int4" if "group" in text else "another scheme")
        fix = (f"choose {hint}, or a model it applies to" if "torch.nn.utils" not in text
               else "remove the pruning or parametrization first")
        raise SchemeError(f"scheme {self.name!r} would quantize no weight of this model"
                          + (f" ({shown})" if shown else " (no layer it supports)")
                          + f": it would be scored as no protection at all; {fix}")

    def _check_dtypes(self, chosen: dict[str, tuple[nn.Module, str, list[tuple[str, nn.Module]]]]) -> None:
        # torchao's quantize primitives assert on other dtypes deep in quantize_affine
        for module, name, _ in chosen.values():
            if module.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise SchemeError(
                    f"scheme {self.name!r}: torchao quantizes float32, bfloat16 or float16 weights; "
                    f"{name!r} is {module.weight.dtype}. Assess a float32 copy (model.float()), or "
                    "use a built-in scheme (rtn_int*), which takes any float dtype")

    def _quantize_linear(self, model: nn.Module):
        _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
        from torchao.quantization import quantize_

        chosen, reasons, notes = self.select_weights(model, skip_reason=self._skip_reason)
        if not chosen:
            return {}, notes, reasons
        self._check_dtypes(chosen)
        # tied holders too: their other state (bias) must match the layout (tinygemm: bf16)
        self._prepare({f: m for fqn, (mod, _, others) in chosen.items()
                       for f, m in [(fqn, mod), *others]}, notes)
        config = self._config()
        blocked = _first_row_blocks(chosen.values()) if self._row_blocks() else []
        quantize_(model, config, filter_fn=lambda m, fqn: fqn in chosen and chosen[fqn][0] is m)
        if blocked:
            _rest_row_blocks(model, config, blocked, quantize_)
        grids: dict[str, ParamGrid] = {}
        for module, name, others in chosen.values():
            w = module.weight
            reader = grid_reader(w)
            if reader is None:
                if _quantized_kind(w) is not None:
                    raise SchemeError(
                        f"scheme {self.name!r}: torchao released {name!r} as a "
                        f"{type(w).__name__}, for which no grid reader is registered "
                        f"(registered: {', '.join(sorted(GRID_READERS))})")
                reasons[name] = (f"torchao left this weight in float under {self.config_class} "
                                 f"(its weight is a {type(w).__name__})")
                continue
            # quantize_ replaced the weight of the first holder only: hand the same quantized
            # Parameter to every other holder, so that the tie (and the release) stays whole.
            for _, other in others:
                other.weight = w
            grids[name] = reader(self, name, w, notes)
        return grids, notes, reasons


# _quantize_linear runs torchao's quantize_ on row blocks of about _ROW_BLOCK_ELEMENTS weights of each
# chosen Linear whose weight has more (TorchAOScheme._row_blocks: per-row / per-group schemes of the
# library's own classes) and concatenates torchao's tensors: the same codes, scales and tensor
# (tests/test_torchao_row_blocks.py), with torchao's weight-sized float temporaries (w / scale,
# round, clamp: 32 MiB each on the 1e7 MLP's 4096 x 2048 layer, fresh mmaps that fault in on
# every call) cache-sized and reused by the heap. False: quantize_ on each whole weight (A/B)
QUANTIZE_ROW_BLOCKS = True
_ROW_BLOCK_ELEMENTS = 1 << 19


@dataclass
class _Blocked:
    """A chosen Linear that ``quantize_`` sees with its first row block only (:func:`_first_row_blocks`)."""

    module: nn.Module
    weight: nn.Parameter  # the whole float weight (the copy's, or shared with the user's model)
    first: nn.Parameter  # the Parameter over its first rows that quantize_ is given
    rows: int  # rows per block
    repr_attr: Any  # the module's own ``extra_repr`` instance attribute before quantize_ (or _NO_ATTR)


_NO_ATTR = object()


def _first_row_blocks(chosen: Any) -> list[_Blocked]:
    """Give each chosen layer (``(module, name, others)``) whose 2-d weight spans more than one
    block of :data:`_ROW_BLOCK_ELEMENTS` a Parameter over its first rows in its place (a view: read,
    never written), so that ``quantize_`` treats the layer itself (its weight, its ``extra_repr``)
    and quantizes one block; :func:`_rest_row_blocks` does the rest."""
    out = []
    for module, _, _ in chosen:
        w = module.weight
        if type(w) is not nn.Parameter or w.dim() != 2 or not w.is_contiguous():
            continue
        rows = max(1, _ROW_BLOCK_ELEMENTS // max(int(w.shape[1]), 1))
        if int(w.shape[0]) <= rows:
            continue
        first = nn.Parameter(w.detach()[:rows], requires_grad=w.requires_grad)
        out.append(_Blocked(module, w, first, rows, module.__dict__.get("extra_repr", _NO_ATTR)))
        module.weight = first
    return out


def _rest_row_blocks(model: nn.Module, config: Any, blocked: list[_Blocked], quantize_: Callable) -> None:
    """After ``quantize_(model, config)`` has quantized each blocked layer's first rows: quantize the
    other row blocks (``quantize_`` on stand-in Linears over views of the rows) and put torchao's
    tensors of all the blocks, concatenated (:func:`_cat_rows`), in the layer as quantize_ does
    (``nn.Parameter(tensor, requires_grad=False)``). A layer quantize_ left in float gets its whole
    weight back; one whose blocks cannot be joined (:func:`_cat_rows` ``None``) is restored and
    quantized whole."""
    whole = []
    for b in blocked:
        first = b.module.weight
        if first is b.first:  # left in float by quantize_
            b.module.weight = b.weight
            continue
        src = b.weight.detach()
        stand_ins = nn.ModuleList()
        for a in range(b.rows, int(src.shape[0]), b.rows):
            part = src[a:a + b.rows]
            # on the meta device: its initialisation draws nothing from torch's generator (skip_init: ~2 ms)
            lin = nn.Linear(int(part.shape[1]), int(part.shape[0]), bias=False, device="meta")
            lin.weight = nn.Parameter(part, requires_grad=b.weight.requires_grad)
            stand_ins.append(lin)
        quantize_(stand_ins, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        joined = _cat_rows([first, *(lin.weight for lin in stand_ins)], tuple(src.shape), src.stride())
        del stand_ins
        if joined is None:
            whole.append(b)
            continue
        b.module.weight = nn.Parameter(joined, requires_grad=False)
    if whole:  # undo quantize_'s work on these layers, then quantize_ them as a whole
        for b in whole:
            b.module.weight = b.weight
            if b.repr_attr is _NO_ATTR:
                b.module.__dict__.pop("extra_repr", None)
            else:
                b.module.extra_repr = b.repr_attr
        ids = {id(b.module) for b in whole}
        quantize_(model, config, filter_fn=lambda m, fqn: id(m) in ids)


def _cat_rows(parts: list[Tensor], shape: tuple[int, ...], stride: tuple[int, ...]) -> Tensor | None:
    """torchao's quantized tensors of consecutive row blocks of one weight joined into the tensor of
    ``shape``: each inner tensor (``__tensor_flatten__``: codes, scales, zero points) concatenated
    along its rows. ``None`` where that is not shown to be the whole weight's tensor: a part of
    another type or other attributes (block size, dtype, activation settings), an inner tensor
    whose first dimension is not its block's rows (a per-tensor scale), a result of another shape."""
    if not all(callable(getattr(p, "__tensor_flatten__", None)) for p in parts):
        return None
    names, attrs = parts[0].__tensor_flatten__()
    for p in parts[1:]:
        n, a = p.__tensor_flatten__()
        if type(p) is not type(parts[0]) or n != names or not _same_attrs(a, attrs):
            return None
    inner = {}
    for n in names:
        ts = [getattr(p, n) for p in parts]
        if any(not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != p.shape[0] for t, p in zip(ts, parts)):
            return None
        inner[n] = torch.cat(ts)
    out = type(parts[0]).__tensor_unflatten__(inner, attrs, torch.Size(shape), stride)
    return out if type(out) is type(parts[0]) and tuple(out.shape) == shape else None


def _same_attrs(a: dict, b: dict) -> bool:
    try:
        return a.keys() == b.keys() and all(bool(a[k] == b[k]) for k in a)
    except Exception:  # an attribute without a plain equality: not shown equal
        return False


def _make_config(cls: Any, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` with ``set_inductor_config=False`` where the config has that field:
    torchao's default (True) rewrites global ``torch._inductor`` settings as a side effect,
    which a copy made for analysis must not do (it does not change the quantized values)."""
    fields = getattr(cls, "__dataclass_fields__", {})
    if "set_inductor_config" in fields:
        kwargs.setdefault("set_inductor_config", False)
    return cls(**kwargs)


def _granularity(granularity: str, group_size: int | None, row: str = "per_row") -> Any:
    """torchao's granularity object; ``row`` picks ``PerRow()`` or ``PerAxis(0)`` (the
    per-row granularity as ``IntxWeightOnlyConfig`` takes it)."""
    _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
    from torchao.quantization import PerAxis, PerGroup, PerRow, PerTensor

    if granularity == "per_row":
        return PerRow() if row == "per_row" else PerAxis(0)
    if granularity == "per_tensor":
        return PerTensor()
    if granularity == "per_group":
        return PerGroup(int(group_size))  # type: ignore[arg-type]
    raise ValueError(f"unknown granularity {granularity!r}; choose from {_GRANULARITIES}")


def _normalize_granularity(scheme: SchemeConfig, allowed: tuple[str, ...], default_group: int) -> None:
    """Check ``scheme.granularity`` / ``group_size`` (in ``__post_init__``): ``per_channel``
    is the deprecated spelling of ``per_row``; ``group_size`` is kept for ``per_group`` only."""
    gran = scheme.granularity  # type: ignore[attr-defined]
    if gran == "per_channel":
        warn("granularity 'per_channel' is deprecated: it is 'per_row' (one scale per "
             "output row, torchao's PerRow / PerAxis(0))", DeprecationWarning)
        gran = "per_row"
    if gran not in allowed:
        raise ValueError(f"granularity must be one of {allowed}, got {gran!r}")
    group = scheme.group_size  # type: ignore[attr-defined]
    if gran == "per_group":
        group = default_group if group is None else group
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise ValueError(f"per_group needs a positive integer group_size, got {group!r}")
    else:
        group = None
    object.__setattr__(scheme, "granularity", gran)
    object.__setattr__(scheme, "group_size", group)


def _granularity_part(granularity: str, group_size: int | None, default: str) -> list[str]:
    """The name suffix of a granularity (none for the config's default)."""
    if granularity == default:
        return []
    return [f"g{group_size}"] if granularity == "per_group" else [granularity]


# Elements per slab of rows when a quantized weight's zeros are counted without keeping its
# dequantized tensor (below glibc's mmap threshold once it has adapted: reused, not faulted in).
_ZERO_COUNT_SLAB = 1 << 18


# _dequantized_or_zeros counts the zeros on the codes (_zeros_from_codes) where every block's
# scale proves a value 0 exactly where its code is the zero point's; False: torchao's dequantize()
# on slabs for every weight (A/B; the same count)
ZEROS_FROM_CODES = True


def _smallest_subnormal(dt: torch.dtype) -> float:
    fi = torch.finfo(dt)
    return fi.tiny * fi.eps


def _zeros_from_codes(w: Tensor, group: int) -> int | None:
    """The zeros of ``w.dequantize()`` (NaN non-zero) counted on the codes, or ``None`` where this
    count is not proven (the caller dequantizes): a 2-d ``Int8Tensor`` /
    ``IntxUnpackedToInt8Tensor`` (8-bit codes) with an integer (or no) zero point, or a ``Float8Tensor``, with
    blocks of ``group`` elements of a row, whose every scale is finite and at least ``T``.

    torchao computes ``((q - zp) * scale).to(dtype)`` (``q - zp`` in the weight's dtype: exact,
    integers of at most 255) and ``(q.float() * scale).to(dtype)``. A code equal to the zero point
    (float8: +-0) gives 0 at a finite scale; any other is at least ``m`` (1; float8: its smallest
    subnormal) in magnitude, so ``|product| >= m |scale| >= T m`` with ``T m`` the larger of the
    smallest subnormals of the product's and the weight's dtypes: non-zero after both roundings
    (monotone; the smallest subnormal of the weight's dtype is a number of the product's, which
    holds it)."""
    q, scale = getattr(w, "qdata", None), getattr(w, "scale", None)
    if q is None or scale is None or q.dim() != 2 or group <= 0 or q.shape[1] % group:
        return None
    rows, nb = int(q.shape[0]), int(q.shape[1]) // group
    if scale.numel() != rows * nb or not scale.is_floating_point():
        return None
    if q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        codes, zp, m = q.view(torch.int8).bitwise_and(0x7F), None, _smallest_subnormal(q.dtype)
        prod = torch.promote_types(torch.float32, scale.dtype)
    elif q.dtype in (torch.int8, torch.uint8):
        # (wider codes: torchao's q - zp in a bf16 / fp16 weight's dtype rounds above 256 / 2048, so
        # two codes apart can dequantize to 0 together; rv46)
        zp = getattr(w, "zero_point", None)
        if zp is not None and (zp.is_floating_point() or zp.numel() != rows * nb):
            return None
        codes, m = q, 1.0
        prod = torch.promote_types(w.dtype, scale.dtype)
    else:
        return None
    t = max(_smallest_subnormal(prod), _smallest_subnormal(w.dtype)) / m
    s = scale.detach().reshape(rows, nb)
    if not bool((torch.isfinite(s) & (s.abs() >= t)).all()):
        return None
    if zp is None or not bool(zp.any()):
        return int(codes.numel() - int(torch.count_nonzero(codes)))
    return int((codes.reshape(rows, nb, group) == zp.reshape(rows, nb, 1)).sum())  # (promoted: no wrap)


def _dequantized_or_zeros(w: Tensor) -> tuple[Tensor, int | None]:
    """``(w.dequantize(), None)``; inside :func:`~.base.zero_counts_only`, for a 2-d weight whose
    blocks lie within a row (``block_size[0] == 1``: per row, per group), ``(empty, zeros)``:
    torchao's own ``dequantize()`` on slabs of whole rows (the same element-wise arithmetic on
    the same blocks, bit for bit: ``tests/test_prepare_zero_counts.py``), counting the values
    exactly 0 (NaN counts as non-zero, as ``count_nonzero`` on the whole tensor does)."""
    block = tuple(int(b) for b in getattr(w, "block_size", ()))
    if dequantized_kept() or w.dim() != 2 or len(block) != 2 or block[0] != 1:
        return w.dequantize(), None
    zeros_on_codes = _zeros_from_codes(w, block[1]) if ZEROS_FROM_CODES else None
    if zeros_on_codes is not None:
        return torch.empty(0, dtype=torch.float32), zeros_on_codes
    rows = max(1, _ZERO_COUNT_SLAB // max(int(w.shape[1]), 1))
    zeros = 0
    for a in range(0, int(w.shape[0]), rows):
        part = w[a:a + rows].dequantize()
        zeros += part.numel() - int(torch.count_nonzero(part))
    return torch.empty(0, dtype=torch.float32), zeros


@register_grid_reader("Int8Tensor", "IntxUnpackedToInt8Tensor")
def _read_affine(scheme: TorchAOScheme, name: str, w: Tensor, notes: list[str]) -> ParamGrid:
    """An affine grid from an ``Int8Tensor`` / ``IntxUnpackedToInt8Tensor``: codes
    ``qdata``, ``scale``, integer-domain ``zero_point``, ``block_size``.

    An ``IntxUnpackedToInt8Tensor`` of a bf16 / fp16 weight holds its scale in that dtype, and
    torchao computes the code as ``round(w * (1 / scale)) + zero_point`` with every operation in
    that dtype: the quotient is rounded to it before the integer rounding, and the real cell
    edges sit up to one ulp of the quotient away from the midpoints (0.5 step for int8 in bf16,
    1 step asymmetric; docs/quantization.md). Its grid is a ``"quotient"`` grid, scored on those real
    edges (:mod:`~mis_lightning.functional.quotient`). A bf16 / fp16 scale on any other tensor
    type (not seen with torchao 0.18) keeps the midpoint grid, and a note says so with the bound;
    schemes scored by Monte Carlo re-quantization (HQQ) re-run torchao and need neither.
    """
    bits = int(getattr(scheme, "bits", 8))
    sdt = w.scale.dtype
    asym = getattr(scheme, "mapping", "symmetric") == "asymmetric"
    deq, zeros = _dequantized_or_zeros(w)
    grid = affine_grid(
        name, codes=w.qdata.detach().clone().reshape(tuple(w.shape)),
        scale=w.scale.detach().clone(), zero_point=w.zero_point.detach().clone(),
        block_size=tuple(int(b) for b in w.block_size),
        qmin=-(2 ** (bits - 1)), qmax=2 ** (bits - 1) - 1, dequantized=deq,
        code_bits=bits, asymmetric=asym, zero_count=zeros)
    # torchao's arithmetic: quantize_affine computes w * (1.0 / scale) in the promoted dtype (float32
    # for a float32 scale); dequantize() computes (q - zp) * scale there and returns the weight's dtype
    if sdt == torch.float32:
        grid.quantize_arith = "mul_inv32"
    grid.product_dtype = torch.promote_types(w.dtype, sdt)
    grid.release_dtype = w.dtype
    # (schemes scored by Monte Carlo re-quantization, e.g. HQQ, re-run torchao: their cells are real)
    if sdt in (torch.bfloat16, torch.float16) and getattr(scheme, "rounding", "nearest") == "nearest":
        intx = any(k.__name__ == "IntxUnpackedToInt8Tensor" for k in type(w).__mro__)
        if intx and w.dtype == sdt:
            grid.kind, grid.quotient_dtype = "quotient", sdt
            return grid
        # ulp of the largest |w / scale|, in steps (the quotient is held in sdt): below 2^(bits-1)
        # for symmetric blocks; asymmetric ones reach 2^bits (a one-signed block, |zp| ~ 2^(bits-1))
        top = bits if asym else bits - 1
        ulp = 2.0 ** (top - 1) * torch.finfo(sdt).eps
        msg = (f"{scheme.name}: torchao holds the scale in {str(sdt)[6:]} (the weights' dtype) and may "
               f"round w / scale in it before rounding to a code, so the release's cell edges may differ "
               f"from the grid's midpoints by up to {ulp:.3g} step; the figure scores the midpoints")
        if msg not in notes:
            notes.append(msg)
    return grid


@dataclass(frozen=True)
class Int8WeightOnly(TorchAOScheme):
    """``Int8WeightOnlyConfig``: symmetric int8 weights (``Int8Tensor``).

    Args:
        granularity: ``"per_row"`` (default), ``"per_tensor"`` or ``"per_group"``.
        group_size: elements per group for ``"per_group"`` (default 128).
        filter_fn: ``filter_fn(module, fqn) -> bool`` narrows torchao's default filter.

    Raises:
        ValueError: another granularity, or a group size that is not a positive integer.
    """

    granularity: str = "per_row"
    group_size: int | None = None

    scale_rule: ClassVar[str] = "absmax"
    config_class: ClassVar[str] = "Int8WeightOnlyConfig"
    base_name: ClassVar[str] = "int8_weight_only"
    mapping: ClassVar[str] = "symmetric"
    bits: ClassVar[int] = 8
    _allowed: ClassVar[tuple[str, ...]] = ("per_row", "per_tensor", "per_group")

    def __post_init__(self) -> None:
        _normalize_granularity(self, self._allowed, 128)

    def name_parts(self) -> list[str]:
        return _granularity_part(self.granularity, self.group_size, "per_row")

    def _flat_spec(self) -> FlatSpec | None:
        # weight-only int8 beyond Linear: the same symmetric int8 grid; the dynamic-activation
        # config quantizes activations too, which a weight-only conv would not reproduce
        if self.config_class != "Int8WeightOnlyConfig":
            return None
        return FlatSpec(bits=8, granularity=self.granularity, group_size=self.group_size,  # type: ignore[arg-type]
                        mapping="symmetric")

    def _config(self) -> Any:
        aoq = _import_torchao_quantization()

        cls = getattr(aoq, self.config_class)
        return _make_config(cls, granularity=_granularity(self.granularity, self.group_size))


@dataclass(frozen=True)
class Int8DynamicActivationInt8Weight(Int8WeightOnly):
    """``Int8DynamicActivationInt8WeightConfig``: the weight grid (activations are quantized
    at run time, per token, and are not part of the release).

    Args:
        granularity: ``"per_row"`` (default) or ``"per_tensor"``.
    """

    config_class: ClassVar[str] = "Int8DynamicActivationInt8WeightConfig"
    base_name: ClassVar[str] = "int8_dynamic_activation_int8_weight"
    _allowed: ClassVar[tuple[str, ...]] = ("per_row", "per_tensor")


Int8Dynamic = Int8DynamicActivationInt8Weight  # the class's earlier name


@dataclass(frozen=True)
class IntxWeightOnly(TorchAOScheme):
    """``IntxWeightOnlyConfig(weight_dtype=torch.int<bits>)``: 1..8-bit integer weights.

    Args:
        bits: 1..8.
        granularity: ``"per_group"`` (default, ``group_size`` 32) or ``"per_row"``
            (``PerAxis(0)``: one scale per output row, torchao's default). torchao refuses
            per-tensor.
        group_size: elements per group.
        mapping: ``"symmetric"`` (default for 2..8 bits) or ``"asymmetric"`` (the default
            and the only sensible choice for 1 bit: symmetric int1 rounds every weight to 0).
        filter_fn: ``filter_fn(module, fqn) -> bool`` narrows torchao's default filter.

    Raises:
        ValueError: bits outside 1..8, another granularity or mapping, a bad group size.
    """

    bits: int = 4
    granularity: str = "per_group"
    group_size: int | None = 32
    mapping: str | None = None

    config_class: ClassVar[str] = "IntxWeightOnlyConfig"
    base_name: ClassVar[str] = "intx_weight_only"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {self.bits!r}")
        _normalize_granularity(self, ("per_group", "per_row"), 32)
        mapping = self.mapping
        if mapping is None:
            mapping = "asymmetric" if self.bits == 1 else "symmetric"
        if mapping not in ("symmetric", "asymmetric"):
            raise ValueError(f"mapping must be 'symmetric' or 'asymmetric', got {mapping!r}")
        object.__setattr__(self, "mapping", mapping)

    @property
    def scale_rule(self) -> str:  # type: ignore[override]
        return "minmax" if self.mapping == "asymmetric" else "absmax"

    def name_parts(self) -> list[str]:
        return [f"int{self.bits}", *_granularity_part(self.granularity, self.group_size, "per_row"),
                *(["asym"] if self.mapping == "asymmetric" else [])]

    def _flat_spec(self) -> FlatSpec | None:
        return FlatSpec(bits=self.bits, granularity=self.granularity, group_size=self.group_size,  # type: ignore[arg-type]
                        mapping=self.mapping)  # type: ignore[arg-type]

    def _config(self) -> Any:
        aoq = _import_torchao_quantization()

        mt = aoq.MappingType.ASYMMETRIC if self.mapping == "asymmetric" else aoq.MappingType.SYMMETRIC
        return _make_config(
            aoq.IntxWeightOnlyConfig,
            weight_dtype=getattr(torch, f"int{self.bits}"),
            granularity=_granularity(self.granularity, self.group_size, row="per_axis"),
            mapping_type=mt)


# _read_float8 tests the codes for NaN on their bit patterns (one reduction over the bytes, no
# float32 copy of the codes: ~57 ms on a 2^23-weight tensor); False: isnan of a float32 copy (A/B)
FLOAT8_NAN_FROM_BITS = True


@functools.cache
def _nan_magnitude_bits(dtype: torch.dtype) -> int | None:
    """The least ``bits & 0x7F`` of a NaN of the 8-bit float ``dtype`` where every pattern from it up is
    NaN whatever the sign (``float8_e4m3fn``: 0x7F; ``float8_e5m2``: 0x7D), else ``None`` (the
    ``fnuz`` formats: their one NaN is the sign bit alone)."""
    mag = torch.arange(128, dtype=torch.uint8)
    nan = torch.isnan(mag.view(dtype).to(torch.float32)) & torch.isnan((mag | 0x80).view(dtype).to(torch.float32))
    if not bool(nan.any()):
        return None
    first = int(nan.nonzero()[0])
    return first if bool(nan[first:].all()) else None


def _float8_has_nan(q: Tensor) -> bool:
    """Whether the float8 codes ``q`` hold a NaN: the largest ``bits & 0x7F`` against the least NaN
    pattern (:func:`_nan_magnitude_bits`; exact where every pattern above it is NaN), else (or with
    :data:`FLOAT8_NAN_FROM_BITS` False) ``isnan`` of a float32 copy."""
    top = _nan_magnitude_bits(q.dtype) if FLOAT8_NAN_FROM_BITS and q.numel() else None
    if top is None:
        return bool(torch.isnan(q.to(torch.float32)).any())
    return int(q.view(torch.uint8).bitwise_and(0x7F).max()) >= top


@register_grid_reader("Float8Tensor")
@torch.no_grad()
def _read_float8(scheme: TorchAOScheme, name: str, weight: Tensor, notes: list[str]) -> ParamGrid:
    """A table grid from a ``Float8Tensor`` (every finite float8 value times the block's
    scale); torchao's NaN codes of all-zero rows are repaired to 0 (see the module doc)."""
    shape = tuple(weight.shape)
    q = weight.qdata
    if _float8_has_nan(q):
        bad = torch.isnan(q.to(torch.float32))
        # torchao: an all-zero row/group has scale 0 and codes 0/0 = NaN, so its
        # dequantize() and the layer's output are NaN. Repair the copy: codes 0.
        q.copy_(torch.where(bad, torch.zeros_like(bad, dtype=torch.float32),
                            q.to(torch.float32)).to(q.dtype))
        notes.append(f"{scheme.name}: {int(bad.sum())} weight(s) of {name!r} lie in all-zero "
                     "rows that torchao gave scale 0 and NaN codes (its dequantize() and the "
                     "layer output would be NaN); their codes were set to 0, so they "
                     "release exactly 0")
    scale = weight.scale.detach().clone()
    block = tuple(int(b) for b in weight.block_size)
    deq, zeros = _dequantized_or_zeros(weight)
    return ParamGrid(
        name=name, shape=shape, kind="table", zero_count=zeros,
        dequantized=deq.detach().to(torch.float32).reshape(shape if zeros is None else (-1,)),
        bits_per_weight=8 + scale.element_size() * 8 / math.prod(block),
        scale=scale, block_size=block, values=representable_values(q.dtype),
        # dequantize(): qdata.float() * scale in float32, returned in the weight's dtype
        product_dtype=torch.float32, release_dtype=weight.dtype,
    )


@dataclass(frozen=True)
class Float8WeightOnly(TorchAOScheme):
    """``Float8WeightOnlyConfig``: float8 weights with an absmax scale per row (or tensor).

    Args:
        dtype: ``"e4m3fn"`` (default) or ``"e5m2"``.
        granularity: ``"per_row"`` (default; runs on CPU) or ``"per_tensor"``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` narrows torchao's default filter.

    Raises:
        ValueError: another dtype or granularity.
    """

    dtype: str = "e4m3fn"
    granularity: str = "per_row"

    scale_rule: ClassVar[str] = "absmax"
    config_class: ClassVar[str] = "Float8WeightOnlyConfig"
    base_name: ClassVar[str] = "float8_weight_only"

    def __post_init__(self) -> None:
        if self.dtype not in ("e4m3fn", "e5m2"):
            raise ValueError(f"dtype must be 'e4m3fn' or 'e5m2', got {self.dtype!r}")
        if self.granularity not in ("per_row", "per_tensor"):
            raise ValueError(f"granularity must be one of ('per_row', 'per_tensor'), got {self.granularity!r}")

    def name_parts(self) -> list[str]:
        return [*(["e5m2"] if self.dtype == "e5m2" else []),
                *(["per_tensor"] if self.granularity == "per_tensor" else [])]

    def _config(self) -> Any:
        aoq = _import_torchao_quantization()

        return _make_config(aoq.Float8WeightOnlyConfig,
                            weight_dtype=getattr(torch, f"float8_{self.dtype}"),
                            granularity=_granularity(self.granularity, None))


@register_grid_reader("Int4TilePackedTo4dTensor")
@torch.no_grad()
def _read_tinygemm(scheme: TorchAOScheme, name: str, weight: Tensor, notes: list[str]) -> ParamGrid:
    """The affine grid of an ``Int4TilePackedTo4dTensor`` (see :class:`Int4WeightOnly`)."""
    _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
    from torchao.quantization.utils import unpack_tinygemm_scales_and_zeros

    n, k = weight.shape
    g = int(weight.block_size[-1])
    scale, zero = (t.squeeze(-1) for t in unpack_tinygemm_scales_and_zeros(weight.scale_and_zero))
    scale, zero = scale[:n, : k // g].float(), zero[:n, : k // g].float()
    k_pad = -(-k // 1024) * 1024  # torchao pads in_features to a multiple of 1024
    eye = torch.eye(k_pad, dtype=torch.bfloat16, device=weight.qdata.device)
    deq = torch.ops.aten._weight_int4pack_mm(eye, weight.qdata, g, weight.scale_and_zero)
    deq = deq[:k, :n].t().float()
    s_el = scale.repeat_interleave(g, dim=1)
    z_el = zero.repeat_interleave(g, dim=1)
    codes = torch.round((deq - z_el) / s_el + 8).clamp(0, 15).to(torch.int8)
    zp = (8.0 - zero.double() / scale.double())
    return affine_grid(name, codes=codes.cpu(), scale=scale.cpu(), zero_point=zp.cpu(),
                       block_size=(1, g), qmin=0, qmax=15, dequantized=deq.cpu(), code_bits=4,
                       side_bits=32.0)


@dataclass(frozen=True)
class Int4WeightOnly(TorchAOScheme):
    """``Int4WeightOnlyConfig`` in the tinygemm layout (``tile_packed_to_4d``): CUDA only.

    torchao packs the int4 codes for its tinygemm CUDA kernel; it needs bfloat16 weights on
    a CUDA device of compute capability >= 8.0 and cannot run on CPU (the CPU path to int4
    is ``intx_weight_only_int4_g32``, ``IntxWeightOnlyConfig(weight_dtype=torch.int4)``).

    Grid (asymmetric, float-domain zero point): per group of ``group_size`` input columns,
    value ``(q - 8) * scale + zero`` for ``q in [0, 15]``, i.e. affine with the float zero
    point ``zp = 8 - zero / scale``. The packed tensor has no ``dequantize()``: the weight is
    dequantized by the kernel itself (``_weight_int4pack_mm`` of an identity matrix) and the
    codes recovered as ``round((w - zero) / scale) + 8``. The chosen layers are cast to
    bfloat16 first (required by the layout; a note says so): the grid is that of the bf16
    weights. Not testable without a GPU.

    Args:
        group_size: 32, 64, 128 (default, torchao's) or 256.

    Raises:
        ValueError: another group size.
    """

    group_size: int = 128

    scale_rule: ClassVar[str] = "minmax"
    config_class: ClassVar[str] = "Int4WeightOnlyConfig"
    base_name: ClassVar[str] = "int4_weight_only"

    def __post_init__(self) -> None:
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128 or 256, got {self.group_size!r}")

    def name_parts(self) -> list[str]:
        return [*([] if self.group_size == 128 else [f"g{self.group_size}"]), "tinygemm"]

    def describe(self) -> dict:
        return {**super().describe(), "bits": 4, "granularity": "per_group",
                "mapping": "asymmetric (float zero point)", "packing": "tile_packed_to_4d"}

    def check_available(self) -> None:
        super().check_available()
        cpu_path = ("on CPU use 'intx_weight_only_int4_g32' "
                    "(IntxWeightOnlyConfig(weight_dtype=torch.int4))")
        if not torch.cuda.is_available():
            raise SchemeUnavailableError(
                f"scheme {self.name!r} is unavailable: torchao's tinygemm int4 layout "
                "(Int4WeightOnlyConfig, tile_packed_to_4d) needs a CUDA GPU (compute "
                "capability >= 8.0) and its kernels; this torch has no CUDA device; "
                f"the plain int4 layout needs the 'mslk' kernel package; {cpu_path}")
        if torch.cuda.get_device_capability()[0] < 8:
            raise SchemeUnavailableError(
                f"scheme {self.name!r} is unavailable: the tinygemm int4 kernel needs compute "
                f"capability >= 8.0, this GPU has {torch.cuda.get_device_capability()}; {cpu_path}")

    def _config(self) -> Any:
        aoq = _import_torchao_quantization()
        from torchao.quantization.quantize_.workflows import (
            Int4ChooseQParamsAlgorithm,
            Int4PackingFormat,
        )

        return _make_config(
            aoq.Int4WeightOnlyConfig,
            group_size=self.group_size,
            int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
            int4_choose_qparams_algorithm=Int4ChooseQParamsAlgorithm.TINYGEMM)

    def _prepare(self, modules: dict[str, nn.Module], notes: list[str]) -> None:
        for fqn, m in modules.items():
            if m.weight.device.type != "cuda":
                raise SchemeError(f"scheme {self.name!r} quantizes on the GPU: layer {fqn!r} "
                                  f"is on {m.weight.device}; move the model to cuda first")
            if m.weight.dtype != torch.bfloat16:
                m.to(torch.bfloat16)
        notes.append(f"{self.name}: the quantized layers were cast to bfloat16 first (the "
                     "tinygemm layout needs it); their inputs are cast too at run time")


Int4TinyGemm = Int4WeightOnly  # the class's earlier name

# the classes whose copies hold the replaced Linear weights on the model's storage
# (_replaced_weights; quantization.base.SHARE_REPLACED_WEIGHTS): built-in configs that quantize_ only reads
_SHARES_REPLACED = (Int8WeightOnly, Int8DynamicActivationInt8Weight, IntxWeightOnly, Float8WeightOnly)


# ---------------------------------------------------------------- registry (public names)
register_scheme(Int8WeightOnly())
register_scheme(Int8WeightOnly(granularity="per_tensor"))
for _g in (32, 128):
    register_scheme(Int8WeightOnly(granularity="per_group", group_size=_g))
register_scheme(Int8DynamicActivationInt8Weight())
register_alias("int8_dynamic", "int8_dynamic_activation_int8_weight",
               "torchao's Int8DynamicActivationInt8WeightConfig")

_INTX_WHY = ("IntxWeightOnlyConfig; in torchao, int4_weight_only is Int4WeightOnlyConfig, "
             "groups of 128, here int4_weight_only_tinygemm")
for _b in range(1, 9):
    _s = IntxWeightOnly(bits=_b)
    register_scheme(_s)
    if _b < 8:
        register_alias(f"int{_b}_weight_only", _s.name, _INTX_WHY)
for _b in (2, 3, 4):
    for _g in (64, 128):
        _s = IntxWeightOnly(bits=_b, group_size=_g)
        register_scheme(_s)
        register_alias(f"int{_b}_weight_only_g{_g}", _s.name, _INTX_WHY)
    _s = IntxWeightOnly(bits=_b, granularity="per_row")
    register_scheme(_s)
    register_alias(f"int{_b}_weight_only_per_channel", _s.name, _INTX_WHY + "; per_channel is per_row")
for _b in (2, 3, 4, 8):
    _s = IntxWeightOnly(bits=_b, mapping="asymmetric")
    register_scheme(_s)
    register_alias(f"int{_b}_weight_only_intx_asym" if _b == 8 else f"int{_b}_weight_only_asym",
                   _s.name, _INTX_WHY)
register_alias("int8_weight_only_intx", IntxWeightOnly(bits=8).name, _INTX_WHY)

register_scheme(Float8WeightOnly())
register_scheme(Float8WeightOnly(granularity="per_tensor"))
register_scheme(Float8WeightOnly(dtype="e5m2"))
for _old, _s in (("fp8_weight_only", Float8WeightOnly()),
                 ("fp8_weight_only_per_tensor", Float8WeightOnly(granularity="per_tensor")),
                 ("fp8_e5m2_weight_only", Float8WeightOnly(dtype="e5m2"))):
    register_alias(_old, _s.name, "torchao's Float8WeightOnlyConfig")
register_scheme(Int4WeightOnly())
register_alias("int4_tinygemm", Int4WeightOnly().name, "torchao's Int4WeightOnlyConfig")
