"""Shared set-ups of the bf16 / fp16 storage tests: every value of a 16-bit float format in a
range, and a Linear whose rows sweep given values with every block's scale and zero point fixed."""

from __future__ import annotations

import torch
from torch import nn


def dtype_values(lo: float, hi: float, dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of the 16-bit float ``dtype`` in ``[lo, hi]`` (float64, sorted, 0 once)."""
    allv = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).double()
    return allv[torch.isfinite(allv) & (allv >= lo) & (allv <= hi)].unique()


def sweep_linear(vals: torch.Tensor, m: float, lo: float, width: int, dtype: torch.dtype) -> nn.Sequential:
    """``nn.Sequential(Linear)`` in ``dtype`` whose rows (blocks of ``width``) start with ``m`` and
    ``lo`` (so every block's absmax scale and zero point are alike) and then hold ``vals`` in order,
    padded with their midpoint ``(lo + m) / 2``."""
    per = width - 2
    rows = -(-vals.numel() // per)
    fill = torch.full((rows * per,), 0.5 * (lo + m), dtype=torch.float64)
    fill[: vals.numel()] = vals
    w = torch.empty(rows, width, dtype=torch.float64)
    w[:, 0], w[:, 1], w[:, 2:] = m, lo, fill.reshape(rows, per)
    lin = nn.Linear(width, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return nn.Sequential(lin.to(dtype))


def stored_partition(model: nn.Sequential, res) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, ch)`` of a swept first layer quantized by ``res`` (a ``SchemeResult``): its distinct
    stored values ``u`` (float64, ascending) and the indices ``ch`` where the code changes between
    ``u[ch]`` and ``u[ch + 1]`` (the real partition's edges are their midpoints)."""
    th = model[0].weight.detach().double().reshape(-1)
    code = res.grids["0.weight"].codes
    if code is None:  # float8: the real codes
        code = res.model[0].weight.qdata.float()
    code = code.double().reshape(-1)
    u, inv = torch.unique(th, return_inverse=True)
    cu = torch.empty_like(u)
    cu[inv] = code
    return u, torch.nonzero(cu[1:] != cu[:-1]).squeeze(-1)
