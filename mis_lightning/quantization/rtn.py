"""Built-in round-to-nearest schemes ``rtn_int2`` ... ``rtn_int8`` (no backend needed).

Symmetric absmax per output channel on the weights of ``nn.Linear`` layers: for row ``r``,
``scale_r = max|W_r| / qmax`` with ``qmax = 2^(b-1) - 1``, codes
``q = clamp(round(W / scale), -2^(b-1), qmax)`` (halves to even), value ``q * scale``.
Biases stay in float. The copy's weights are replaced by their fake-quantized values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import ParamGrid, SchemeConfig, affine_grid
from .beyond_linear import FlatSpec, quantize_beyond_linear
from .registry import register_scheme

# Scales below this are clamped (an all-zero row would otherwise divide by zero).
_MIN_SCALE = 1e-12


@dataclass(frozen=True)
class RoundToNearestInt(SchemeConfig):
    """Symmetric absmax per-row round-to-nearest integer quantization of Linear weights.

    Args:
        bits: 2..8 bits per weight.
        filter_fn: ``filter_fn(module, fqn) -> bool`` to restrict the layers (default: every
            ``nn.Linear``).

    Raises:
        ValueError: ``bits`` outside 2..8.
    """

    bits: int = 8

    scale_rule: ClassVar[str] = "absmax"
    backend: ClassVar[str] = "builtin"
    base_name: ClassVar[str] = "rtn"
    weights_in_place: ClassVar[bool] = True
    granularity: ClassVar[str] = "per_row"
    mapping: ClassVar[str] = "symmetric"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")

    def name_parts(self) -> list[str]:
        return [f"int{self.bits}"]

    def flat_spec(self) -> FlatSpec:
        """Convolutions, embeddings, attention projections: the same absmax/qmax rule per
        output channel over flattened rows, in place (see :mod:`.beyond_linear`)."""
        return FlatSpec(bits=self.bits, granularity="per_row", group_size=None, mapping="symmetric",
                        rule="absmax_qmax", torchao_embedding=False, in_place=True)

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module) -> tuple[dict[str, ParamGrid], list[str]]:
        qmax = 2 ** (self.bits - 1) - 1
        qmin = -(2 ** (self.bits - 1))
        grids: dict[str, ParamGrid] = {}
        # in place: a tied weight is quantized once, and every holder sees the quantized values
        chosen, reasons, notes = self.select_weights(model, in_place=True)
        for module, name, _ in chosen.values():
            w = module.weight
            w64 = w.detach().to(torch.float64)
            scale = (w64.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(_MIN_SCALE)
            codes = torch.round(w64 / scale).clamp(qmin, qmax)
            deq = codes * scale
            w.copy_(deq.to(w.dtype))
            grids[name] = affine_grid(
                name, codes=codes.to(torch.int8), scale=scale, zero_point=torch.zeros_like(scale),
                block_size=(1, w.shape[1]), qmin=qmin, qmax=qmax, dequantized=deq,
                code_bits=self.bits, side_bits=32.0)  # a float32 scale per row (nominal)
            grids[name].release_dtype = w.dtype  # codes * scale in float64, written back in the weight's dtype
        # convolutions, embeddings, attention projections: the same rule over flattened rows
        quantize_beyond_linear(self, model, self.flat_spec(), grids, reasons, notes)
        return grids, notes, reasons


for _b in range(2, 9):
    register_scheme(RoundToNearestInt(bits=_b))
