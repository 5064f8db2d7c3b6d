"""Affine grids whose quotient is rounded in a low-precision float before the integer rounding
(torchao's ``IntxUnpackedToInt8Tensor`` on bfloat16 / float16 weights): the cell edges of the
real release, in closed form (method.md section 5).

torchao computes the code of a weight ``w`` (held in the model's dtype ``D``) as
``clamp(round_half_even(rnd_D(w * inv)) + zero_point, qmin, qmax)`` with ``inv = rnd_D(1 / scale)``
(``quantize_affine``: ``input * (1.0 / scale)``, every operation in ``D``, correctly rounded: the
products of two ``D`` values are exact in float32). Write ``x = w * inv`` (exact). The integer
``j = round_half_even(rnd_D(x))`` changes at fixed thresholds of ``x`` that depend on ``D`` alone:
the midpoints between adjacent ``D`` values whose integer rounding differs (a tie going to the
even mantissa). So the cells in ``x`` form one table per dtype (:func:`quotient_thresholds`), and in
parameter units the edges are those thresholds divided by ``inv`` (per block); the zero point
enters after the rounding and only moves the clamp: cells ``j`` in ``[qmin - zp, qmax - zp]``,
the two end cells unbounded. For bf16 int8 the cells of even ``j >= 64`` are 1.5 steps wide and
of odd ones 0.5 (docs/quantization.md); float32 weights never take this path.

The weight ``w`` is taken as continuous, as everywhere in the library: the rounding of the trained
weights to their storage dtype is not modelled (docs/quantization.md).

All per-element tensors are ``[c]`` (one chunk of a flattened parameter).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from .cells import CellMoments
from .kernel import _MAX_WINDOW, CUTOFF_SIGMAS, _float64_inputs, windowed_moments

# |x| covered by the table (bf16 holds every integer up to 256): a clamped code range
# [qmin - zp, qmax - zp] lies within [-255, 255] for int8 codes and int8 zero points
_REACH = 256
# window half-widths: each element takes the first that holds the edges within its 8.5 sd
_WINDOWS = (2, 3, 4, 6, 10, 18, 32, 64, 128, 256, _MAX_WINDOW)
_ROWS_BUDGET = 1 << 20
#: the dtypes whose quotient rounding is tabulated
QUOTIENT_DTYPES = (torch.bfloat16, torch.float16)


@cache
def _thresholds(dtype: torch.dtype) -> tuple[Tensor, int]:
    if dtype not in QUOTIENT_DTYPES:
        raise ValueError(f"no quotient table for {dtype}: expected one of {QUOTIENT_DTYPES}")
    # every finite value of the dtype in [-_REACH, _REACH], sorted
    allv = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).to(torch.float64)
    v = allv[torch.isfinite(allv) & (allv.abs() <= _REACH)].unique()  # sorted, -0.0 merged with 0.0
    j = torch.round(v)  # half to even (the dtype's own round gives the same: v is exact)
    change = torch.nonzero(j[1:] != j[:-1]).squeeze(-1)
    if not bool((j[change + 1] - j[change] == 1).all()):
        raise AssertionError(f"{dtype}: the quotient's integer skips a value")  # every integer is a dtype value
    lo_v, hi_v = v[change], v[change + 1]
    mid = 0.5 * (lo_v + hi_v)  # exact in float64 (a few more bits than the dtype)
    # a quotient exactly at the midpoint rounds (ties to even mantissa) to one side: the edge
    # belongs to the upper cell when it rounds up (searchsorted right=True); when it rounds down,
    # move the threshold up by one float64 ulp (no product of two dtype values lies in between)
    up = mid.to(torch.float32).to(dtype).to(torch.float64) == hi_v
    t = torch.where(up, mid, torch.nextafter(mid, torch.full_like(mid, math.inf)))
    j0 = int(j[change[0]])  # t[i] separates j0 + i and j0 + i + 1
    return t.contiguous(), j0


def quotient_thresholds(dtype: torch.dtype) -> tuple[Tensor, int]:
    """The fixed table of a dtype's quotient rounding (float64 ``[T]``, ``j0``): ``t[i]`` is the
    least ``x`` with ``round_half_even(rnd_dtype(x)) >= j0 + i + 1`` (ties as the dtype rounds
    them, up to one float64 ulp), for quotients ``|x| <= 256``.

    Raises:
        ValueError: ``dtype`` is not bfloat16 or float16.
    """
    return _thresholds(dtype)


def quotient_inverse(scale: Tensor) -> Tensor:
    """``inv = 1.0 / scale`` computed as torchao computes it (in ``scale``'s dtype), as float64."""
    return (1.0 / scale).to(torch.float64)


def quotient_cells(theta: Tensor, inv: Tensor, lo: Tensor, hi: Tensor, dtype: torch.dtype) -> Tensor:
    """The quotient integer ``j`` (float64 ``[c]``, in ``[lo, hi]``) of the cell holding each
    continuous weight: ``x = theta * inv`` located in the dtype's table, clamped to the code range
    ``[lo, hi] = [qmin - zp, qmax - zp]``."""
    t, j0 = quotient_thresholds(dtype)
    t = t.to(theta.device)
    x = theta.to(torch.float64) * inv
    j = torch.searchsorted(t, x, right=True).to(torch.float64) + j0
    return torch.minimum(torch.maximum(j, lo), hi)


def quotient_boundaries(cell: Tensor, inv: Tensor, lo: Tensor, hi: Tensor, dtype: torch.dtype,
                        half_window: int) -> Tensor:
    """Cell edges ``[c, 2*half_window + 2]`` (parameter units) around each element's cell ``cell``
    (its quotient integer, float64 ``[c]``): the lower edges of cells ``cell - half_window + 1 ..
    cell + half_window``, ``-inf`` / ``inf`` past the clamped ends, between ``-inf`` and ``inf``
    (the layout of :func:`~mis_lightning.functional.table.table_boundaries`)."""
    t, j0 = quotient_thresholds(dtype)
    t = t.to(cell.device)
    k = cell.unsqueeze(-1) + torch.arange(-half_window + 1, half_window + 1, device=cell.device,
                                          dtype=torch.float64)  # lower edge of cell k: t[k - 1 - j0]
    i = (k - 1 - j0).clamp(0, t.numel() - 1).long()
    e = t[i] / inv.unsqueeze(-1)
    e = torch.where(k <= lo.unsqueeze(-1), torch.full_like(e, -math.inf), e)
    e = torch.where(k > hi.unsqueeze(-1), torch.full_like(e, math.inf), e)
    inf = torch.full_like(e[:, :1], math.inf)
    return torch.cat([-inf, e, inf], dim=-1)


def quotient_cell_moments(theta: Tensor, sigma: Tensor, inv: Tensor, lo: Tensor, hi: Tensor,
                          dtype: torch.dtype, cell: Tensor | None = None, half_window: int = 2) -> CellMoments:
    """Exact cell moments (sums over every edge within 8.5 sd) on a rounded-quotient grid.

    Args:
        theta, sigma: ``[c]`` weights and standard deviations (parameter units).
        inv: ``[c]`` float64 ``rnd_dtype(1 / scale)`` (:func:`quotient_inverse`), positive.
        lo, hi: ``[c]`` float64 ``qmin - zero_point``, ``qmax - zero_point``.
        dtype: the dtype the quotient was rounded in (bfloat16 or float16).
        cell: ``[c]`` the element's quotient integer (the backend's ``code - zero_point``), or
            ``None`` (located from ``theta``).
        half_window: the least number of edges each side of a window.

    Returns:
        float64 :class:`CellMoments` ``[c]``; elements whose own cell's edges lie beyond 8.5 sd
        on both sides are frozen (moments 0), as on the other grids.
    """
    th, sg, iv, lo, hi = _float64_inputs(theta, sigma, inv, lo, hi)
    if cell is None:
        cell = quotient_cells(th, iv, lo, hi, dtype)
    cell = cell.to(torch.float64)
    c = th.shape[0]
    kappa = torch.zeros(c, dtype=torch.float64, device=th.device)
    mean_abs, m4 = torch.zeros_like(kappa), torch.zeros_like(kappa)
    coverage = torch.ones_like(kappa)
    own = quotient_boundaries(cell, iv, lo, hi, dtype, 1)[:, 1:3]
    frozen = ((th - own[:, 0]) / sg > CUTOFF_SIGMAS) & ((own[:, 1] - th) / sg > CUTOFF_SIGMAS)
    reach = CUTOFF_SIGMAS * sg
    c_lo = quotient_cells(th - reach, iv, lo, hi, dtype)
    c_hi = quotient_cells(th + reach, iv, lo, hi, dtype)
    # edges needed each side: those within the reach plus the first beyond it (<= 2^bits + 1)
    need = (torch.maximum(cell - c_lo, c_hi - cell) + 1).long()
    rest = ~frozen
    if bool(rest.any()):
        windowed_moments((kappa, mean_abs, m4, coverage), torch.nonzero(rest).squeeze(-1),
                         need[rest].clamp(min=half_window, max=_MAX_WINDOW),
                         sorted({half_window, *(w for w in _WINDOWS if w > half_window)}), _ROWS_BUDGET,
                         lambda ii, m: quotient_boundaries(cell[ii], iv[ii], lo[ii], hi[ii], dtype, m), th, sg)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)
