"""torchao schemes: ``quantize_`` with real torchao configs, grids read from its tensors.

Every scheme here deep-copies the model (done by :meth:`QuantizationScheme.apply`), calls
``torchao.quantization.quantize_(copy, config, filter_fn=...)`` and reads each quantized
weight's grid back from the tensor subclass torchao put in its place:

* ``Int8Tensor`` (``Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig``) and
  ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``): kind ``"affine"``, codes
  ``qdata``, ``scale``, ``zero_point`` (integer domain: value ``(q - zp) * scale``) and
  ``block_size``; code range ``[-2^(b-1), 2^(b-1) - 1]``.
* ``Float8Tensor`` (``Float8WeightOnlyConfig``): kind ``"table"``, values = every finite
  float8 value, ``scale`` per block (value ``qdata.float() * scale``). torchao gives an
  all-zero row (or group) scale 0 and NaN codes, so its ``dequantize()`` -- and the
  quantized layer's output -- are NaN there; the copy's NaN codes are set to 0 (a note
  says so), which makes those weights release exactly 0, and the grid keeps scale 0,
  which :class:`ParamGrid` treats as the one-cell grid ``{0}`` (frozen, kappa 0).
* ``Int4TilePackedTo4dTensor`` (``Int4WeightOnlyConfig``, tinygemm layout, CUDA only):
  see :class:`Int4TinyGemm`.

Which layers: torchao's own default filter (``nn.Linear``, not
``NonDynamicallyQuantizableLinear``), narrowed by the scheme's ``filter_fn(module, fqn)``.
Every other parameter (convolutions, embeddings, attention in-projections, ...) stays in
float, with the reason in ``result.unquantized``. A weight tied across several Linear layers
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

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .base import FilterFn, ParamGrid, QuantizationScheme, SchemeError, SchemeUnavailableError
from .casts import representable_values
from .registry import register_scheme

_GRANULARITIES = ("per_row", "per_tensor", "per_group", "per_channel")


def _torchao_default_filter() -> Callable[[nn.Module], bool]:
    """torchao's own default layer filter (``quant_api._is_linear``), or its equivalent."""
    try:
        from torchao.quantization.quant_api import _is_linear

        return lambda m: bool(_is_linear(m))
    except ImportError:  # pragma: no cover - private name moved in another torchao version
        return lambda m: isinstance(m, nn.Linear) and not isinstance(
            m, nn.modules.linear.NonDynamicallyQuantizableLinear)


class _OptionalKernelNoise(logging.Filter):
    """Drops torchao's import-time notices about optional GPU kernel libraries it cannot load
    on this machine (``Failed to load .../_C_mxfp8...so``, ``Detected no triton``): they are
    not about the CPU schemes used here. Everything else torchao logs passes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to load") or "Detected no triton" in msg)


def _import_torchao_quantization() -> Any:
    """``import torchao.quantization``, filtering only the optional-kernel notices of the
    first import (the filters are removed again afterwards)."""
    names = ("torchao", "torchao.kernel.intmm")
    filt = _OptionalKernelNoise()
    for n in names:
        logging.getLogger(n).addFilter(filt)
    try:
        import torchao.quantization as aoq
    finally:
        for n in names:
            logging.getLogger(n).removeFilter(filt)
    return aoq


def _torchao_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


class TorchAOScheme(QuantizationScheme):
    """Base of the torchao schemes: layer selection, ``quantize_``, grid reading.

    Subclasses set ``config_class`` (the name in ``torchao.quantization``) and implement
    :meth:`_config` and :meth:`_read_grid`; per-group schemes set :attr:`group_size`.
    """

    backend = "torchao"
    layers = "nn.Linear (torchao's default filter)"
    config_class: str = ""
    #: in_features must be a multiple of this (per-group schemes), else the layer is skipped
    group_size: int | None = None

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

    def _read_grid(self, name: str, weight: Tensor, notes: list[str]) -> ParamGrid:
        raise NotImplementedError

    def _skip_reason(self, module: nn.Module) -> str | None:
        g = self.group_size
        k = module.weight.shape[-1]
        if g is not None and k % g != 0:
            return (f"in_features {k} is not a multiple of the group size {g}: scheme "
                    f"{self.name!r} leaves this layer in float (torchao cannot quantize it)")
        return None

    def _prepare(self, modules: dict[str, nn.Module], notes: list[str]) -> None:
        """Hook run on the chosen layers just before ``quantize_`` (e.g. dtype casts)."""

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend, "config": self.config_class,
                "layers": "nn.Linear weights (torchao default filter)"}

    def supports(self, module: nn.Module) -> bool:
        return _torchao_default_filter()(module)

    def _quantize_copy(self, model: nn.Module):
        from torchao.quantization import quantize_

        chosen, reasons, notes = self._plan_weights(model, skip_reason=self._skip_reason)
        if not chosen:
            return {}, notes, reasons
        # tied holders too: their other state (bias) must match the layout (tinygemm: bf16)
        self._prepare({f: m for fqn, (mod, _, others) in chosen.items()
                       for f, m in [(fqn, mod), *others]}, notes)
        quantize_(model, self._config(),
                  filter_fn=lambda m, fqn: fqn in chosen and chosen[fqn][0] is m)
        grids: dict[str, ParamGrid] = {}
        for module, name, others in chosen.values():
            w = module.weight
            if not hasattr(w, "qdata") and not hasattr(w, "scale_and_zero"):
                reasons[name] = (f"torchao left this weight in float under {self.config_class} "
                                 f"(its weight is a {type(w).__name__})")
                continue
            # quantize_ replaced the weight of the first holder only: hand the same quantized
            # Parameter to every other holder, so that the tie (and the release) stays whole.
            for _, other in others:
                other.weight = w
            grids[name] = self._read_grid(name, w, notes)
        return grids, notes, reasons


def _make_config(cls: Any, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` with ``set_inductor_config=False`` where the config has that field:
    torchao's default (True) rewrites global ``torch._inductor`` settings as a side effect,
    which a copy made for analysis must not do (it does not change the quantized values)."""
    fields = getattr(cls, "__dataclass_fields__", {})
    if "set_inductor_config" in fields:
        kwargs.setdefault("set_inductor_config", False)
    return cls(**kwargs)


def _granularity(granularity: str, group_size: int | None) -> Any:
    from torchao.quantization import PerAxis, PerGroup, PerRow, PerTensor

    if granularity == "per_row":
        return PerRow()
    if granularity == "per_tensor":
        return PerTensor()
    if granularity == "per_channel":
        return PerAxis(0)
    if granularity == "per_group":
        return PerGroup(int(group_size))  # type: ignore[arg-type]
    raise ValueError(f"unknown granularity {granularity!r}; choose from {_GRANULARITIES}")


def _check_granularity(granularity: str, group_size: int | None, allowed: tuple[str, ...]) -> None:
    if granularity not in allowed:
        raise ValueError(f"granularity must be one of {allowed}, got {granularity!r}")
    if granularity == "per_group" and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"per_group needs a positive integer group_size, got {group_size!r}")


def _affine_grid(name: str, w: Tensor, qmin: int, qmax: int, code_bits: int,
                 asymmetric: bool) -> ParamGrid:
    """An affine grid from an ``Int8Tensor`` / ``IntxUnpackedToInt8Tensor``."""
    shape = tuple(w.shape)
    scale = w.scale.detach().clone()
    zp = w.zero_point.detach().clone()
    block = tuple(int(b) for b in w.block_size)
    per_block = math.prod(block)
    side_bits = scale.element_size() * 8 + (zp.element_size() * 8 if asymmetric else 0)
    return ParamGrid(
        name=name, shape=shape, kind="affine",
        dequantized=w.dequantize().detach().to(torch.float32).reshape(shape),
        bits_per_weight=code_bits + side_bits / per_block,
        scale=scale, block_size=block, zero_point=zp, qmin=qmin, qmax=qmax,
        codes=w.qdata.detach().clone().reshape(shape),
    )


class Int8WeightOnly(TorchAOScheme):
    """``Int8WeightOnlyConfig``: symmetric int8 weights (``Int8Tensor``).

    Args:
        granularity: ``"per_row"`` (default), ``"per_tensor"`` or ``"per_group"``.
        group_size: elements per group for ``"per_group"``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` narrows torchao's default filter.
    """

    scale_rule = "absmax"

    config_class = "Int8WeightOnlyConfig"
    _base_name = "int8_weight_only"

    def __init__(self, granularity: str = "per_row", group_size: int | None = None,
                 filter_fn: FilterFn | None = None) -> None:
        super().__init__(filter_fn)
        if granularity == "per_group" and group_size is None:
            group_size = 128
        _check_granularity(granularity, group_size, ("per_row", "per_tensor", "per_group"))
        self.granularity = granularity
        self.group_size = group_size if granularity == "per_group" else None
        suffix = {"per_row": "", "per_tensor": "_per_tensor"}.get(granularity, f"_g{group_size}")
        self.name = self._base_name + suffix

    def describe(self) -> dict:
        return {**super().describe(), "granularity": self.granularity,
                "group_size": self.group_size, "mapping": "symmetric", "bits": 8}

    def _config(self) -> Any:
        import torchao.quantization as aoq

        cls = getattr(aoq, self.config_class)
        return _make_config(cls, granularity=_granularity(self.granularity, self.group_size))

    def _read_grid(self, name: str, weight: Tensor, notes: list[str]) -> ParamGrid:
        return _affine_grid(name, weight, -128, 127, 8, asymmetric=False)


class Int8Dynamic(Int8WeightOnly):
    """``Int8DynamicActivationInt8WeightConfig``: the weight grid (activations are quantized
    at run time, per token, and are not part of the release)."""

    config_class = "Int8DynamicActivationInt8WeightConfig"
    _base_name = "int8_dynamic"

    def __init__(self, granularity: str = "per_row", filter_fn: FilterFn | None = None) -> None:
        if granularity not in ("per_row", "per_tensor"):
            raise ValueError(f"granularity must be 'per_row' or 'per_tensor', got {granularity!r}")
        super().__init__(granularity=granularity, filter_fn=filter_fn)


def _intx_name(bits: int, granularity: str, group_size: int | None, mapping: str) -> str:
    base = f"int{bits}_weight_only" + ("_intx" if bits == 8 else "")
    if granularity == "per_channel":
        base += "_per_channel"
    elif group_size != 32:
        base += f"_g{group_size}"
    if mapping == "asymmetric" and bits != 1:
        base += "_asym"
    return base


class IntxWeightOnly(TorchAOScheme):
    """``IntxWeightOnlyConfig(weight_dtype=torch.int<bits>)``: 1..8-bit integer weights.

    Args:
        bits: 1..8.
        granularity: ``"per_group"`` (default, ``group_size`` 32) or ``"per_channel"``
            (``PerAxis(0)``: one scale per output row). torchao refuses per-tensor.
        group_size: elements per group.
        mapping: ``"symmetric"`` (default for 2..8 bits) or ``"asymmetric"`` (the default
            and the only sensible choice for 1 bit: symmetric int1 rounds every weight to 0).
        filter_fn: ``filter_fn(module, fqn) -> bool`` narrows torchao's default filter.
    """

    config_class = "IntxWeightOnlyConfig"

    def __init__(self, bits: int = 4, granularity: str = "per_group", group_size: int = 32,
                 mapping: str | None = None, filter_fn: FilterFn | None = None) -> None:
        super().__init__(filter_fn)
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
        _check_granularity(granularity, group_size, ("per_group", "per_channel"))
        if mapping is None:
            mapping = "asymmetric" if bits == 1 else "symmetric"
        if mapping not in ("symmetric", "asymmetric"):
            raise ValueError(f"mapping must be 'symmetric' or 'asymmetric', got {mapping!r}")
        self.bits = bits
        self.granularity = granularity
        self.group_size = group_size if granularity == "per_group" else None
        self.mapping = mapping
        self.scale_rule = "minmax" if mapping == "asymmetric" else "absmax"
        self.name = _intx_name(bits, granularity, self.group_size, mapping)

    def describe(self) -> dict:
        return {**super().describe(), "bits": self.bits, "granularity": self.granularity,
                "group_size": self.group_size, "mapping": self.mapping}

    def _config(self) -> Any:
        import torchao.quantization as aoq

        mt = aoq.MappingType.ASYMMETRIC if self.mapping == "asymmetric" else aoq.MappingType.SYMMETRIC
        return _make_config(
            aoq.IntxWeightOnlyConfig,
            weight_dtype=getattr(torch, f"int{self.bits}"),
            granularity=_granularity(self.granularity, self.group_size),
            mapping_type=mt)

    def _read_grid(self, name: str, weight: Tensor, notes: list[str]) -> ParamGrid:
        qmin, qmax = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return _affine_grid(name, weight, qmin, qmax, self.bits,
                            asymmetric=self.mapping == "asymmetric")


class Float8WeightOnly(TorchAOScheme):
    """``Float8WeightOnlyConfig``: float8 weights with an absmax scale per row (or tensor).

    Args:
        dtype: ``"e4m3fn"`` (default) or ``"e5m2"``.
        granularity: ``"per_row"`` (default; runs on CPU) or ``"per_tensor"``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` narrows torchao's default filter.
    """

    scale_rule = "absmax"

    config_class = "Float8WeightOnlyConfig"

    def __init__(self, dtype: str = "e4m3fn", granularity: str = "per_row",
                 filter_fn: FilterFn | None = None) -> None:
        super().__init__(filter_fn)
        if dtype not in ("e4m3fn", "e5m2"):
            raise ValueError(f"dtype must be 'e4m3fn' or 'e5m2', got {dtype!r}")
        _check_granularity(granularity, None, ("per_row", "per_tensor"))
        self.dtype = dtype
        self.granularity = granularity
        self.name = ("fp8_weight_only" if dtype == "e4m3fn" else "fp8_e5m2_weight_only") + (
            "_per_tensor" if granularity == "per_tensor" else "")

    def describe(self) -> dict:
        return {**super().describe(), "dtype": f"float8_{self.dtype}",
                "granularity": self.granularity}

    def _config(self) -> Any:
        import torchao.quantization as aoq

        return _make_config(aoq.Float8WeightOnlyConfig,
                            weight_dtype=getattr(torch, f"float8_{self.dtype}"),
                            granularity=_granularity(self.granularity, None))

    @torch.no_grad()
    def _read_grid(self, name: str, weight: Tensor, notes: list[str]) -> ParamGrid:
        shape = tuple(weight.shape)
        q = weight.qdata
        bad = torch.isnan(q.to(torch.float32))
        if bool(bad.any()):
            # torchao: an all-zero row/group has scale 0 and codes 0/0 = NaN, so its
            # dequantize() and the layer's output are NaN. Repair the copy: codes 0.
            q.copy_(torch.where(bad, torch.zeros_like(bad, dtype=torch.float32),
                                q.to(torch.float32)).to(q.dtype))
            notes.append(f"{self.name}: {int(bad.sum())} weight(s) of {name!r} lie in all-zero "
                         "rows that torchao gave scale 0 and NaN codes (its dequantize() and the "
                         "layer output would be NaN); their codes were set to 0, so they "
                         "release exactly 0")
        scale = weight.scale.detach().clone()
        block = tuple(int(b) for b in weight.block_size)
        fdtype = q.dtype
        return ParamGrid(
            name=name, shape=shape, kind="table",
            dequantized=weight.dequantize().detach().to(torch.float32).reshape(shape),
            bits_per_weight=8 + scale.element_size() * 8 / math.prod(block),
            scale=scale, block_size=block, values=representable_values(fdtype),
        )


class Int4TinyGemm(TorchAOScheme):
    """``Int4WeightOnlyConfig`` in the tinygemm layout (``tile_packed_to_4d``): CUDA only.

    torchao packs the int4 codes for its tinygemm CUDA kernel; it needs bfloat16 weights on
    a CUDA device of compute capability >= 8.0 and cannot run on CPU (the CPU path to int4
    is ``int4_weight_only``, ``IntxWeightOnlyConfig(weight_dtype=torch.int4)``).

    Grid (asymmetric, float-domain zero point): per group of ``group_size`` input columns,
    value ``(q - 8) * scale + zero`` for ``q in [0, 15]``, i.e. affine with the float zero
    point ``zp = 8 - zero / scale``. The packed tensor has no ``dequantize()``: the weight is
    dequantized by the kernel itself (``_weight_int4pack_mm`` of an identity matrix) and the
    codes recovered as ``round((w - zero) / scale) + 8``. The chosen layers are cast to
    bfloat16 first (required by the layout; a note says so): the grid is that of the bf16
    weights. Not testable without a GPU.
    """

    scale_rule = "minmax"

    config_class = "Int4WeightOnlyConfig"

    def __init__(self, group_size: int = 128, filter_fn: FilterFn | None = None) -> None:
        super().__init__(filter_fn)
        if group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128 or 256, got {group_size!r}")
        self.group_size = group_size
        self.name = "int4_tinygemm" + ("" if group_size == 128 else f"_g{group_size}")

    def describe(self) -> dict:
        return {**super().describe(), "bits": 4, "granularity": "per_group",
                "group_size": self.group_size, "mapping": "asymmetric (float zero point)",
                "packing": "tile_packed_to_4d"}

    def check_available(self) -> None:
        super().check_available()
        cpu_path = "on CPU use 'int4_weight_only' (IntxWeightOnlyConfig(weight_dtype=torch.int4))"
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
        import torchao.quantization as aoq
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

    @torch.no_grad()
    def _read_grid(self, name: str, weight: Tensor, notes: list[str]) -> ParamGrid:
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
        return ParamGrid(
            name=name, shape=(n, k), kind="affine", dequantized=deq.cpu(),
            bits_per_weight=4 + 32.0 / g, scale=scale.cpu(), block_size=(1, g),
            zero_point=zp.cpu(), qmin=0, qmax=15, codes=codes.cpu(),
        )


# ---------------------------------------------------------------- registry (public names)
def _reg(name: str, factory: Callable[..., QuantizationScheme]) -> None:
    register_scheme(name, factory)


_reg("int8_weight_only", lambda **kw: Int8WeightOnly(**kw))
_reg("int8_weight_only_per_tensor", lambda **kw: Int8WeightOnly(granularity="per_tensor", **kw))
for _g in (32, 128):
    _reg(f"int8_weight_only_g{_g}",
         lambda _g=_g, **kw: Int8WeightOnly(granularity="per_group", group_size=_g, **kw))
_reg("int8_dynamic", lambda **kw: Int8Dynamic(**kw))

for _b in range(1, 8):
    _reg(_intx_name(_b, "per_group", 32, "symmetric"),
         lambda _b=_b, **kw: IntxWeightOnly(bits=_b, **kw))
for _b in (2, 3, 4):
    for _g in (64, 128):
        _reg(_intx_name(_b, "per_group", _g, "symmetric"),
             lambda _b=_b, _g=_g, **kw: IntxWeightOnly(bits=_b, group_size=_g, **kw))
    _reg(_intx_name(_b, "per_channel", None, "symmetric"),
         lambda _b=_b, **kw: IntxWeightOnly(bits=_b, granularity="per_channel", **kw))
for _b in (2, 3, 4, 8):
    _reg(_intx_name(_b, "per_group", 32, "asymmetric"),
         lambda _b=_b, **kw: IntxWeightOnly(bits=_b, mapping="asymmetric", **kw))
_reg(_intx_name(8, "per_group", 32, "symmetric"), lambda **kw: IntxWeightOnly(bits=8, **kw))

_reg("fp8_weight_only", lambda **kw: Float8WeightOnly(**kw))
_reg("fp8_weight_only_per_tensor", lambda **kw: Float8WeightOnly(granularity="per_tensor", **kw))
_reg("fp8_e5m2_weight_only", lambda **kw: Float8WeightOnly(dtype="e5m2", **kw))
_reg("int4_tinygemm", lambda **kw: Int4TinyGemm(**kw))
