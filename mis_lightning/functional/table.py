"""Value-table grids (float8, bfloat16, float16 and other formats): any sorted set of
representable values times a per-element scale, cells bounded by the midpoints of adjacent
values; their cell edges and cell moments (method.md section 5).

All tensors are per element (``[c]``, one chunk of a flattened parameter).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cells import CellMoments
from .fastpath import GUARD, verify_sample
from .kernel import (
    _MAX_WINDOW,
    CUTOFF_SIGMAS,
    FINE_STEP,
    REFERENCE_FINE_STEP,
    _float64_inputs,
    fine_grid_moments,
    windowed_moments,
)

# Window half-widths for value tables beyond their ``half_window`` (float grids get finer
# towards zero, so a window may need many edges).
_TABLE_BUCKETS = (32, 64, 128, 256)
# Floats per [rows, edges] working tensor of the windowed sums.
_ROWS_BUDGET = 1 << 20
# Name of the path, as the self-check warnings print it.
TABLE_PATH = "the float-format cell sums (fine-grid expansion)"


def table_boundaries(theta: Tensor, values: Tensor, scale: Tensor, half_window: int) -> Tensor:
    """Cell edges ``[c, 2*half_window + 2]`` on a non-uniform grid ``values * scale``.

    Args:
        theta: ``[c]`` weights (parameter units).
        values: ``[V]`` sorted, unique, finite representable values of the format (e.g.
            every finite float8_e4m3fn value), in units of ``scale``.
        scale: ``[c]`` per-element positive scale (1 for plain dtype casts).
        half_window: edges each side of the element's cell.

    The element's cell is found by nearest value (ties to the upper value; the backend's
    own code, where known, is checked against it by the callers).
    """
    v = values.to(torch.float64)
    mids = 0.5 * (v[1:] + v[:-1])  # [V-1] edges between consecutive values
    x = theta.to(torch.float64) / scale.to(torch.float64)
    cell = torch.searchsorted(mids, x, right=True)  # index of the value whose cell holds x
    i = torch.arange(-half_window + 1, half_window + 1, device=theta.device)
    e = cell.unsqueeze(-1) + i  # edge e separates values e-1 and e, i.e. mids[e-1]
    valid_low = e >= 1
    valid_high = e <= mids.numel()
    edges = mids[(e - 1).clamp(0, mids.numel() - 1)]
    edges = torch.where(valid_low, edges, torch.full_like(edges, -math.inf))
    edges = torch.where(valid_high, edges, torch.full_like(edges, math.inf))
    edges = edges * scale.to(torch.float64).unsqueeze(-1)
    inf = torch.full_like(edges[:, :1], math.inf)
    return torch.cat([-inf, edges, inf], dim=-1)


def table_cell_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int = 18
) -> CellMoments:
    """Cell moments on a non-uniform grid (float formats), skipping frozen elements.

    Args:
        theta, sigma: ``[c]`` weights and their standard deviations (parameter units).
        values: ``[V]`` sorted representable values (units of ``scale``).
        scale: ``[c]`` per-element positive scale.
        half_window: the least number of edges summed each side.

    Returns:
        float64 :class:`CellMoments` ``[c]``. The fine-grid shortcut described below is checked
        against exact sums on a sample (at first use per thread count, then every few calls;
        :mod:`~mis_lightning.functional.fastpath`); on disagreement it is disabled for the
        process with a ``RuntimeWarning`` and exact sums are used.
    """
    if TABLE_PATH in GUARD.disabled:
        return table_reference_moments(theta, sigma, values, scale, half_window)
    out = _table_cell_moments(theta, sigma, values, scale, half_window, FINE_STEP)

    def steps() -> tuple[Tensor, list[Tensor]]:
        th, sg, sc = _float64_inputs(theta, sigma, scale)
        own = table_boundaries(th, values, sc, 1)[:, 1:3]
        h = (own[:, 1] - own[:, 0]) / sg
        return h, [h <= FINE_STEP, h > FINE_STEP]

    ok = verify_sample(
        TABLE_PATH, theta.shape[0], out, steps,
        lambda idx: table_reference_moments(theta[idx], sigma[idx], values, scale[idx], half_window),
        "exact cell sums")
    return out if ok else table_reference_moments(theta, sigma, values, scale, half_window)


def table_reference_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int = 18
) -> CellMoments:
    """Reference cell moments on a float-format grid: exact sums over every edge within 8.5 sd
    (the fine-grid expansion only where a window would exceed 512 edges, or below
    ``REFERENCE_FINE_STEP``). Arguments and returns as :func:`table_cell_moments`."""
    return _table_cell_moments(theta, sigma, values, scale, half_window, REFERENCE_FINE_STEP)


def _table_cell_moments(
    theta: Tensor, sigma: Tensor, values: Tensor, scale: Tensor, half_window: int, fine_step: float
) -> CellMoments:
    """Cell moments on a non-uniform grid (float formats), skipping frozen elements.

    Elements whose own cell's edges lie beyond 8.5 sigma are frozen (moments 0); elements
    whose own cell is narrower than 0.5 sigma *and* whose grid is uniform within 8.5 sigma
    use the fine-grid expansion with their local step; the rest sum over every edge within
    8.5 sigma (at least ``half_window`` each side), grouped by the window they need.

    A float grid is not uniform everywhere: its step halves at each binade edge towards
    zero. The fine-grid expansion with the local step is therefore used only where no step
    change lies within 8.5 sigma (it was off by up to 1.5e-2 in kappa for float8 e4m3 next
    to a binade edge), and the window is sized by counting the edges within 8.5 sigma
    (a fixed 18 edges of >= 0.5 sigma misses part of 8.5 sigma when the cells shrink
    towards zero; kappa was off by up to 3e-5). Both are checked against the full cell sum
    in tests/test_grids.py. Where more than ``_MAX_WINDOW`` edges lie within 8.5 sigma on
    one side and the own cell is fine (float16 steps below ~0.033 sigma next to a binade
    edge, or windows reaching into the tiny cells near zero) the fine expansion with the
    local step is used: it is then off by at most ``(h_max^2 - h_min^2) / 12`` with
    ``h_max``, ``h_min`` the largest and smallest steps within 8.5 sigma (kappa ~
    ``1 - E[h(U)^2] / 12``), i.e. <= h^2/4 at a single binade edge. Weights beyond the
    largest value with sigma so large that more than ``_MAX_WINDOW`` edges lie within 8.5
    sigma (from beyond 65504 back towards 0 in float16) are summed over ``_MAX_WINDOW``
    edges each side only.
    """
    th, sg, sc = _float64_inputs(theta, sigma, scale)
    c = th.shape[0]
    kappa = torch.zeros(c, dtype=torch.float64, device=th.device)
    mean_abs, m4 = torch.zeros_like(kappa), torch.zeros_like(kappa)
    coverage = torch.ones_like(kappa)
    own = table_boundaries(th, values, sc, 1)[:, 1:3]  # the element's own cell edges
    frozen = ((th - own[:, 0]) / sg > CUTOFF_SIGMAS) & ((own[:, 1] - th) / sg > CUTOFF_SIGMAS)
    h_local = (own[:, 1] - own[:, 0]) / sg  # inf for the outermost cells

    # Value cells (index k: between mids[k-1] and mids[k]) holding theta and the two ends
    # of its 8.5-sigma reach, in units of the scale.
    v = values.to(device=th.device, dtype=torch.float64)
    mids = 0.5 * (v[1:] + v[:-1])
    reach = CUTOFF_SIGMAS * sg / sc
    x = th / sc
    cell = torch.searchsorted(mids, x, right=True)
    cell_lo = torch.searchsorted(mids, x - reach, right=True)
    cell_hi = torch.searchsorted(mids, x + reach, right=True)
    # Edges needed each side: those within the reach plus the first one beyond it.
    need = torch.maximum(cell - cell_lo, cell_hi - cell) + 1
    # Uniform within the reach: the cells cell_lo..cell_hi are all finite and no step
    # change lies between them (counted with a cumulative sum over the table).
    widths = mids[1:] - mids[:-1]  # width of finite value cell k is widths[k - 1]
    change = ~torch.isclose(widths[1:], widths[:-1], rtol=1e-9, atol=0.0)
    changes = torch.cat([change.new_zeros(1, dtype=torch.long), change.long().cumsum(0)])
    inner = (cell_lo >= 1) & (cell_hi <= mids.numel() - 1)
    a = (cell_lo - 1).clamp(0, max(changes.numel() - 1, 0))
    b = (cell_hi - 1).clamp(0, max(changes.numel() - 1, 0))
    uniform = inner & (changes[b] == changes[a])

    # Windows wider than _MAX_WINDOW edges cannot be summed: the expansion is used there even
    # by the reference (fine_step < FINE_STEP).
    fine = ~frozen & (((h_local <= fine_step) & uniform) | ((h_local <= FINE_STEP) & (need > _MAX_WINDOW)))
    if bool(fine.any()):
        fm = fine_grid_moments(h_local[fine])
        kappa[fine], mean_abs[fine], m4[fine] = fm.kappa, fm.mean_abs, fm.m4
    rest = ~(frozen | fine)
    if bool(rest.any()):
        windowed_moments(
            (kappa, mean_abs, m4, coverage), torch.nonzero(rest).squeeze(-1),
            need[rest].clamp(min=half_window, max=_MAX_WINDOW),
            sorted({half_window, *(w for w in _TABLE_BUCKETS if w > half_window), _MAX_WINDOW}),
            _ROWS_BUDGET, lambda ii, m: table_boundaries(th[ii], values, sc[ii], m), th, sg)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=coverage)
