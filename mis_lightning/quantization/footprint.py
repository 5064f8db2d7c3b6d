"""Sparsity and storage footprint of a quantized release (method.md section 6).

Per grid: ``zero_fraction`` (the share of elements released as exactly 0) and
``bits_per_weight`` (code bits plus the scales, and zero points of asymmetric schemes,
spread over their blocks; see each backend's module docstring).
"""

from __future__ import annotations

from .base import ParamGrid, QuantizationResult


def zero_fraction(grid: ParamGrid) -> float:
    """Share of the grid's elements whose released (dequantized) value is exactly 0."""
    if grid.numel == 0:
        return 0.0
    return float((grid.dequantized == 0).sum()) / grid.numel


def grid_summary(grid: ParamGrid) -> dict:
    """Plain-type summary of one grid: name, kind, shape, numel, bits, zero fraction, block."""
    return {
        "name": grid.name,
        "kind": grid.kind,
        "shape": list(grid.shape),
        "numel": grid.numel,
        "block_size": list(grid.block_size),
        "bits_per_weight": float(grid.bits_per_weight),
        "zero_fraction": zero_fraction(grid),
    }


def result_summary(result: QuantizationResult) -> dict:
    """Totals over a whole release: quantized / float elements, mean bits, zero fraction.

    Parameters left in float count with the bits of their dtype in the quantized copy
    (32 for float32). ``mean_bits_per_weight`` is over all parameters of the model.
    """
    params = dict(result.model.named_parameters())
    q_numel = sum(g.numel for g in result.grids.values())
    q_bits = sum(g.numel * g.bits_per_weight for g in result.grids.values())
    q_zero = sum(zero_fraction(g) * g.numel for g in result.grids.values())
    f_numel = 0
    f_bits = 0.0
    for name in result.unquantized:
        p = params.get(name)
        if p is None:
            continue
        f_numel += p.numel()
        f_bits += p.numel() * p.element_size() * 8
    total = q_numel + f_numel
    return {
        "scheme": result.scheme,
        "quantized_numel": q_numel,
        "float_numel": f_numel,
        "quantized_bits_per_weight": q_bits / q_numel if q_numel else None,
        "mean_bits_per_weight": (q_bits + f_bits) / total if total else None,
        "zero_fraction": q_zero / q_numel if q_numel else None,
        "grids": [grid_summary(g) for g in result.grids.values()],
    }
