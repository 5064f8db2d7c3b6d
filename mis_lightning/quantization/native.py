"""Native torch quantization schemes (no torchao): ``torch.ao.quantization`` and quantized tensors.

* ``native_int8_dynamic`` / ``native_int8_dynamic_per_row`` --
  ``torch.ao.quantization.quantize_dynamic(copy, {fqn: qconfig}, dtype=torch.qint8)`` with
  ``default_dynamic_qconfig`` (per tensor, symmetric, ``scale = amax / 127.5``) or
  ``per_channel_dynamic_qconfig`` (one scale per output row). The Linear modules become
  ``torch.ao.nn.quantized.dynamic.Linear`` under the same names; the packed weight
  ``layer.weight()`` is the released object: codes ``int_repr()``, ``q_scale()`` /
  ``q_zero_point()`` or ``q_per_channel_scales()`` / ``q_per_channel_zero_points()``,
  values ``dequantize()``. ``torch.ao.quantization`` is deprecated, but still ships: the
  scheme's notes say so; torch's ``DeprecationWarning``, raised by the library's call and by
  torch's own calls inside it, is filtered around that call only (it reached the user's
  ``MISIndicator.compute()``, which they cannot act on).
* ``native_int8_per_row`` -- ``torch.quantize_per_channel(w, scales, zero_points, 0,
  torch.qint8)`` with the scales and zero points of torch's own
  ``PerChannelMinMaxObserver(qint8, per_channel_symmetric)``; the copy's Linear weight is
  replaced by ``q.dequantize()`` and the codes are ``q.int_repr()``.
* ``native_int4_per_row`` -- ``torch.fake_quantize_per_channel_affine(w, scale,
  zero_point, 0, -8, 7)`` with the scales of ``PerChannelMinMaxObserver(quant_min=-8,
  quant_max=7, per_channel_symmetric)`` (``scale = amax / 7.5``); fake quantization releases
  only values, so the codes are recovered as ``round(value / scale) + zero_point`` (exact:
  ``value`` is ``(q - zp) * scale`` rounded to float32).

Layers: exactly ``nn.Linear`` (``type(m) is nn.Linear``: ``quantize_dynamic`` converts
no subclass), narrowed by ``filter_fn(module, fqn)``. Biases stay in float. A weight tied
across layers: the in-place schemes overwrite the shared tensor (every holder releases the
quantized values); ``quantize_dynamic`` converts every holder (the same codes, checked), and
a weight also held by a layer it does not convert stays in float everywhere.
``bits_per_weight`` counts the scale (and zero point only for asymmetric mappings) in the
dtype torch stores them in (per-tensor: float64 scale; per-channel observers: float32).

"Per row" is the library's one word for one scale per output row (torch calls it per
channel, axis 0); the ``*_per_channel`` names of earlier releases are deprecated aliases.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._warning_filters import ignoring
from .base import ParamGrid, SchemeConfig, SchemeError, affine_grid
from .registry import register_alias, register_scheme


def _is_plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear


@dataclass(frozen=True)
class _NativeScheme(SchemeConfig):
    backend: ClassVar[str] = "native"
    scale_rule: ClassVar[str] = "absmax"  # torch's symmetric observers: scale = max|w| / c
    layers: ClassVar[str] = "nn.Linear (exact type)"
    mapping: ClassVar[str] = "symmetric"

    def supports(self, module: nn.Module) -> bool:
        return _is_plain_linear(module)


# torch's notice that the library's own calls raise on creating qint8 tensors (a UserWarning, which
# Python shows by default: it came before the table, ux29). Filtered only around those calls.
_DEPRECATED_QUANTIZATION = (
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"),
)
# torch.ao.quantization's DeprecationWarning (typing_extensions.deprecated on quantize_dynamic, and on
# convert, which torch's quantize_dynamic calls itself): addressed to the code that calls the API, which is
# the library's scheme, not the user (ux48: two of them escaped MISIndicator.compute() under pytest or
# -W default, one pointing into torch). Filtered around the quantize_dynamic call only; the scheme's notes
# say the API is deprecated, and a user's own call to it still warns.
_DEPRECATED_AO_QUANTIZATION = ((DeprecationWarning, r"torch\.ao\.quantization is deprecated"),)


@contextmanager
def quiet_deprecated_quantization() -> Iterator[None]:
    """Silence :data:`_DEPRECATED_QUANTIZATION` inside the block only (the native_int8_dynamic
    scheme's notes say that torch.ao.quantization is deprecated). torch raises the quantized tensors' notice once per
    process (``TORCH_WARN_ONCE``), so a user's own later call does not repeat it, as before:
    that once was used up by the library's call then too. (``torch.set_warn_always(True)`` in the
    block, to keep it, sends the calls inside ``quantize_dynamic`` to torch's C++ stderr printer,
    which no Python filter reaches.)"""
    with ignoring(*((message, category) for category, message in _DEPRECATED_QUANTIZATION)):
        yield


def _grid_from_qtensor(name: str, q: Tensor, bits: int, qmin: int, qmax: int) -> ParamGrid:
    """An affine grid from a torch quantized tensor (per tensor or per channel, axis 0)."""
    shape = tuple(q.shape)
    if q.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        scale = torch.tensor([[q.q_scale()]], dtype=torch.float64)
        zp = torch.tensor([[q.q_zero_point()]], dtype=torch.int64)
        block = shape
    else:
        axis = q.q_per_channel_axis()
        if axis != 0:
            raise ValueError(f"{name}: per-channel axis {axis} (expected 0)")
        scale = q.q_per_channel_scales().reshape(-1, 1).clone()
        zp = q.q_per_channel_zero_points().reshape(-1, 1).clone()
        block = (1, *shape[1:])
    grid = affine_grid(name, codes=q.int_repr().clone(), scale=scale, zero_point=zp,
                       block_size=block, qmin=qmin, qmax=qmax, dequantized=q.dequantize(),
                       code_bits=bits, asymmetric=bool((zp != 0).any()))
    # torch's quantize kernels: w * (1 / scale) in float32; dequantize(): float32
    grid.quantize_arith, grid.product_dtype = "mul_inv32", torch.float32
    return grid


@dataclass(frozen=True)
class NativeInt8Dynamic(_NativeScheme):
    """``torch.ao.quantization.quantize_dynamic`` int8 (per tensor, or per row) of the ``nn.Linear``
    layers alone: its ``qconfig_spec`` names them, so recurrent layers (``nn.LSTM``, ``nn.GRU``, the
    RNN cells), which torch's default mapping (``quantize_dynamic(model)``) would convert to
    dynamically quantized int8 modules, stay in float in this scheme's copy; the scheme's notes
    name them (the released model is then not the one ``quantize_dynamic``'s defaults give).

    Args:
        granularity: ``"per_tensor"`` (default: ``default_dynamic_qconfig``) or ``"per_row"``
            (``per_channel_dynamic_qconfig``).
        filter_fn: ``filter_fn(module, fqn) -> bool`` narrows the ``nn.Linear`` layers.

    Raises:
        ValueError: another granularity.
    """

    granularity: str = "per_tensor"

    base_name: ClassVar[str] = "native_int8_dynamic"
    bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if self.granularity not in ("per_tensor", "per_row"):
            raise ValueError(f"granularity must be 'per_tensor' or 'per_row', got {self.granularity!r}")

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_row"

    def name_parts(self) -> list[str]:
        return ["per_row"] if self.per_channel else []

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module):
        with quiet_deprecated_quantization():  # torch's qint8 notice; the notes say it is deprecated
            return self._quantize_dynamic(model)

    def _quantize_dynamic(self, model: nn.Module):
        import torch.ao.quantization as tq

        chosen, reasons, notes = self.select_weights(model)
        if not chosen:
            return {}, notes, reasons
        qconfig = tq.per_channel_dynamic_qconfig if self.per_channel else tq.default_dynamic_qconfig
        # Every holder of a tied weight is converted: each packs the same float weight with the
        # same observer, so every use releases the same codes (checked below).
        fqns = [f for fqn, (_, _, others) in chosen.items() for f in [fqn, *(o for o, _ in others)]]
        with ignoring(*((message, category) for category, message in _DEPRECATED_AO_QUANTIZATION)):
            tq.quantize_dynamic(model, {fqn: qconfig for fqn in fqns}, dtype=torch.qint8, inplace=True)
        grids: dict[str, ParamGrid] = {}
        notes.append("torch.ao.quantization is deprecated (torch says so; its DeprecationWarning, addressed to the library's "
                     "call, is not passed on); quantize_dynamic still ships")
        rnns = [f"{type(m).__name__} {f!r}" for f, m in model.named_modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
        if rnns:  # torch's default mapping would convert them: say the release here differs
            notes.append(f"{', '.join(rnns[:4])}{' ...' if len(rnns) > 4 else ''} stay in float in this copy (the "
                         "scheme converts nn.Linear only; quantize_dynamic's default mapping would make them int8)")
        notes += _slow_path_for_converted_transformers(model)
        for fqn, (_, name, others) in chosen.items():
            qmods = [model.get_submodule(f) if f else model for f in [fqn, *(o for o, _ in others)]]
            if not all(callable(getattr(q, "weight", None)) for q in qmods):
                # A holder left in float releases the float weight: scored as float (conservative).
                reasons[name] = ("quantize_dynamic did not convert every layer holding it ("
                                 + ", ".join(type(q).__name__ for q in qmods) + ")")
                continue
            q0 = qmods[0].weight()
            if any(not torch.equal(q.weight().int_repr(), q0.int_repr()) for q in qmods[1:]):
                raise SchemeError(f"scheme {self.name!r}: the layers sharing {name!r} were packed "
                                  "to different codes")
            grids[name] = _grid_from_qtensor(name, q0, 8, -128, 127)
        return grids, notes, reasons


def _slow_path_for_converted_transformers(model: nn.Module) -> list[str]:
    """Turn off the fused fast path of transformer layers whose Linear layers were converted.

    ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``) in eval mode call a fused
    kernel that reads ``linear1.weight`` / ``linear2.weight`` as tensors; after
    ``quantize_dynamic`` they are methods returning packed weights, and the forward fails with
    "'function' object has no attribute 'device'". On the private copy only, the layer's
    ``activation_relu_or_gelu`` flag (read only by the fast-path checks and the fused call)
    is cleared and the encoder's ``use_nested_tensor`` set to False: the standard path runs
    the same layers (the dynamically quantized Linear modules), as torch's own fallback
    does. Returns the notes naming the layers.
    """
    notes = []
    for fqn, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(
                callable(getattr(getattr(m, lin, None), "weight", None)) for lin in ("linear1", "linear2")):
            m.activation_relu_or_gelu = 0
            notes.append(f"transformer layer {fqn!r}: fused fast path off in the quantized copy "
                         "(it cannot read dynamically quantized weights); the standard path runs")
        elif isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and any(
                callable(getattr(getattr(layer, "linear1", None), "weight", None)) for layer in m.layers):
            m.use_nested_tensor = False
    return notes


def _per_channel_qparams(w: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric absmax scales and zero points per output row, from torch's own observer."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    kwargs = {} if (qmin, qmax) == (-128, 127) else {"quant_min": qmin, "quant_max": qmax}
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, **kwargs)
    obs(w)
    return obs.calculate_qparams()


class _NativePerRow(_NativeScheme):
    """Symmetric absmax scales per output row, applied in place to every selected weight;
    subclasses give the torch call that quantizes one weight (``_quantize_weight``)."""

    qmin: ClassVar[int]
    qmax: ClassVar[int]
    granularity: ClassVar[str] = "per_row"
    weights_in_place: ClassVar[bool] = True

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module):
        with quiet_deprecated_quantization():  # torch.quantize_per_channel: "deprecated" (UserWarning)
            return self._quantize_rows(model)

    def _quantize_rows(self, model: nn.Module):
        grids: dict[str, ParamGrid] = {}
        chosen, reasons, notes = self.select_weights(model, in_place=True)
        for m, name, _ in chosen.values():
            w = m.weight.detach().to(torch.float32)
            scales, zps = _per_channel_qparams(w, self.qmin, self.qmax)
            grid = self._quantize_weight(name, w, scales, zps)
            m.weight.copy_(grid.dequantized.to(m.weight.dtype))
            grid.release_dtype = m.weight.dtype  # the release holds the values in the weight's dtype
            grids[name] = grid
        return grids, notes, reasons

    def _quantize_weight(self, name: str, w: Tensor, scales: Tensor, zps: Tensor) -> ParamGrid:
        raise NotImplementedError


@dataclass(frozen=True)
class NativeInt8PerRow(_NativePerRow):
    """``torch.quantize_per_channel`` int8 with symmetric absmax scales per output row."""

    base_name: ClassVar[str] = "native_int8_per_row"
    bits: ClassVar[int] = 8
    qmin: ClassVar[int] = -128
    qmax: ClassVar[int] = 127

    def _quantize_weight(self, name: str, w: Tensor, scales: Tensor, zps: Tensor) -> ParamGrid:
        q = torch.quantize_per_channel(w, scales.to(torch.float64), zps.to(torch.int64), 0, torch.qint8)
        return _grid_from_qtensor(name, q, 8, -128, 127)


@dataclass(frozen=True)
class NativeInt4PerRow(_NativePerRow):
    """``torch.fake_quantize_per_channel_affine`` int4 ([-8, 7]) with symmetric absmax
    scales per output row."""

    base_name: ClassVar[str] = "native_int4_per_row"
    bits: ClassVar[int] = 4
    qmin: ClassVar[int] = -8
    qmax: ClassVar[int] = 7

    def _quantize_weight(self, name: str, w: Tensor, scales: Tensor, zps: Tensor) -> ParamGrid:
        scales, zps = scales.to(torch.float32), zps.to(torch.int32)
        fq = torch.fake_quantize_per_channel_affine(w, scales, zps, 0, -8, 7)
        s64 = scales.to(torch.float64).reshape(-1, 1)
        zp = zps.to(torch.int64).reshape(-1, 1)
        codes = (torch.round(fq.to(torch.float64) / s64) + zp).to(torch.int8)
        grid = affine_grid(
            name, codes=codes, scale=scales.reshape(-1, 1), zero_point=zp,
            block_size=(1, *w.shape[1:]), qmin=-8, qmax=7, dequantized=fq.clone(),
            code_bits=4, side_bits=32.0)
        # fake_quantize: w * (1 / scale) and (q - zp) * scale in float32
        grid.quantize_arith, grid.product_dtype = "mul_inv32", torch.float32
        return grid


NativeInt8PerChannel, NativeInt4PerChannel = NativeInt8PerRow, NativeInt4PerRow  # earlier names

for _s in (NativeInt8Dynamic(), NativeInt8Dynamic(granularity="per_row"), NativeInt8PerRow(),
           NativeInt4PerRow()):
    register_scheme(_s)
for _old, _new in (("native_int8_dynamic_per_channel", "native_int8_dynamic_per_row"),
                   ("native_int8_per_channel", "native_int8_per_row"),
                   ("native_int4_per_channel", "native_int4_per_row")):
    register_alias(_old, _new, "per_channel is per_row: one scale per output row")
