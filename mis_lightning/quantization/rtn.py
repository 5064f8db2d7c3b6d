"""Built-in round-to-nearest schemes ``rtn_int2`` ... ``rtn_int8`` (no backend needed).

Symmetric absmax per output channel on the weights of ``nn.Linear`` layers: for row ``r``,
``scale_r = max|W_r| / qmax`` with ``qmax = 2^(b-1) - 1``, codes
``q = clamp(round(W / scale), -2^(b-1), qmax)`` (halves to even), value ``q * scale``.
Biases stay in float. The copy's weights are replaced by their fake-quantized values.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FilterFn, ParamGrid, QuantizationScheme
from .registry import register_scheme

# Scales below this are clamped (an all-zero row would otherwise divide by zero).
_MIN_SCALE = 1e-12


class RoundToNearestInt(QuantizationScheme):
    """Symmetric absmax per-channel round-to-nearest integer quantization of Linear weights.

    Args:
        bits: 2..8 bits per weight.
        filter_fn: ``filter_fn(module, fqn) -> bool`` to restrict the layers (default: every
            ``nn.Linear``).
    """

    scale_rule = "absmax"

    backend = "builtin"

    def __init__(self, bits: int = 8, filter_fn: FilterFn | None = None) -> None:
        super().__init__(filter_fn)
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
        self.bits = bits
        self.name = f"rtn_int{bits}"

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend, "bits": self.bits,
                "granularity": "per_channel", "mapping": "symmetric"}

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module) -> tuple[dict[str, ParamGrid], list[str]]:
        qmax = 2 ** (self.bits - 1) - 1
        qmin = -(2 ** (self.bits - 1))
        grids: dict[str, ParamGrid] = {}
        # in place: a tied weight is quantized once, and every holder sees the quantized values
        chosen, reasons, notes = self._plan_weights(model, in_place=True)
        for module, name, _ in chosen.values():
            w = module.weight
            w64 = w.detach().to(torch.float64)
            scale = (w64.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(_MIN_SCALE)
            codes = torch.round(w64 / scale).clamp(qmin, qmax)
            deq = codes * scale
            w.copy_(deq.to(w.dtype))
            grids[name] = ParamGrid(
                name=name, shape=tuple(w.shape), kind="affine",
                dequantized=deq.to(torch.float32), bits_per_weight=self.bits + 32.0 / w.shape[1],
                scale=scale, block_size=(1, w.shape[1]), zero_point=torch.zeros_like(scale),
                qmin=qmin, qmax=qmax, codes=codes.to(torch.int8),
            )
        return grids, notes, reasons


for _b in range(2, 9):
    register_scheme(f"rtn_int{_b}", lambda _b=_b, **kw: RoundToNearestInt(bits=_b, **kw))
