"""The 16-bit casts' draws bound formed once per chunk (``assess.CAST_BOUND_ONCE``) and the
still parts' zeros expanded (``assess.DRAWS_STILL_EXPANDED``), p53c.

Both are speed changes with the same numbers: :func:`~mis_lightning.functional.table.
settled_drift_bound` is element-wise, so bounding each moving element once (not the probe's
elements a second time) gives the same all-or-nothing mask; the still parts are zeros either
way. Reference: the switches off (the path before them), compared bitwise; the count of elements
bounded shows the work is done once (fails without the change: the probe's 512 bounded twice).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.quantization.base import ParamGrid
from mis_lightning.quantization.casts import cast_cell_values

A = importlib.import_module("mis_lightning.assess")
F64 = torch.float64
CASTS = [torch.float16, torch.bfloat16]
D = 16


def _cast_grid(dtype: torch.dtype, rows: int, cols: int) -> ParamGrid:
    return ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                     bits_per_weight=16.0, scale=torch.ones(1, 1), block_size=(rows, cols),
                     values=cast_cell_values(dtype), release_dtype=dtype)


def _chunk(dtype: torch.dtype, c: int, past: int | None, seed: int) -> tuple[torch.Tensor, ...]:
    """``(theta, sd, k_main, positions [8, c])`` of a chunk like the 1e7 MLP's first layer (sd ~30x
    |theta|: every element under the bound), a quarter of it sd 0 (not moving: not bounded), and
    element ``past`` (if any) beyond the bound (fp16: its reach past +-65520; bf16: a coarse cell)."""
    gen = torch.Generator().manual_seed(seed)
    th = torch.randn(c, dtype=F64, generator=gen) * 0.02
    sg = (th.abs() + 0.01) * 30.0
    sg[torch.randperm(c, generator=gen)[: c // 4]] = 0.0
    if past is not None:
        th[past], sg[past] = (3e4, 1e4) if dtype == torch.float16 else (1.5, 1e-3)
    k_main = T.table_cell_moments(th, sg, cast_cell_values(dtype), torch.ones_like(th), kappa_only=True).kappa
    xi = torch.randn(2, c, dtype=F64, generator=gen)
    pos = torch.cat([torch.stack([xi[0], -xi[0], xi[1], -xi[1]]), A._GH_X[A._GH_X != 0].unsqueeze(-1).expand(-1, c)])
    return th, sg, k_main, pos


@pytest.mark.parametrize("dtype", CASTS)
@pytest.mark.parametrize("c", [1024, 8192])  # (moving elements 768: one call; 6,144: probe then the rest)
@pytest.mark.parametrize("where", [None, "probe", "rest"])
def test_bound_formed_once_gives_the_same_mask(dtype, c, where, monkeypatch):
    """``_table_position_free`` with the switch: the mask (or ``None``) bitwise the switch off's,
    every moving element bounded exactly once where the chunk is covered (off: the probe's 512
    twice), in one call where they are at most ``CAST_BOUND_ONCE_MAX``, an element beyond the bound in the probe's slice or past it making the chunk ``None``
    either way. Fails with the probe's elements bounded again or set free without their bound, or
    the probe kept for a few elements."""
    monkeypatch.setattr(A, "CAST_DRAWS_TOL", 1e-4)  # (bf16's bound on such a chunk ~4e-5)
    rows = c // 64
    g = _cast_grid(dtype, rows, 64)
    past = {None: None, "probe": 7, "rest": c - 3}[where]
    th, sg, k_main, pos = _chunk(dtype, c, past, seed=c + (past or 0))
    moving = int((sg != 0).sum())
    counted: list[int] = []
    real = A.settled_drift_bound

    def spy(theta, sigma, reach, k, values):
        counted.append(theta.numel())
        return real(theta, sigma, reach, k, values)

    monkeypatch.setattr(A, "settled_drift_bound", spy)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(A, "CAST_BOUND_ONCE", on)
        counted.clear()
        got[on] = (A._table_position_free(g, sg, 0, c, pos.shape[0], th, pos, k_main), sum(counted), len(counted))
    (m_on, n_on, calls_on), (m_off, n_off, _) = got[True], got[False]
    if moving <= A.CAST_BOUND_ONCE_MAX:  # a sample's few moving elements: one call
        assert calls_on == 1
    assert (m_on is None) == (m_off is None)
    if where is None:
        assert m_on is not None and torch.equal(m_on, m_off) and bool(m_on.all())
        assert n_on == moving and n_off == moving + A._CAST_BOUND_PROBE
    else:
        assert m_on is None
        assert n_on <= moving


@pytest.mark.parametrize("dtype", CASTS)
def test_still_parts_are_expanded_zeros(dtype, monkeypatch):
    """``_draw_parts`` of a chunk under the bound: :class:`StillParts` with the same values as the
    filled zeros (every draw ``k_main + mix @ basis`` bitwise), the zeros one value expanded (stride
    0: no fresh [D, c] pages; fails without the change)."""
    monkeypatch.setattr(A, "CAST_DRAWS_TOL", 1e-4)
    c = 1024
    g = _cast_grid(dtype, 16, 64)
    th, sg, k_main, _ = _chunk(dtype, c, None, seed=3)
    xi = torch.randn(A._draw_noise_rows(D), c, dtype=F64, generator=torch.Generator().manual_seed(4))
    parts = {}
    for on in (True, False):
        monkeypatch.setattr(A, "DRAWS_STILL_EXPANDED", on)
        parts[on] = A._draw_parts(g, th, sg, 0, c, k_main, xi, D, None, table_at_once=True)
        assert isinstance(parts[on], A.StillParts)
    for t_on, t_off in zip(parts[True], parts[False]):
        assert t_on.shape == t_off.shape and torch.equal(t_on, t_off)
    basis_on, mix_on, lam_on = parts[True]
    assert basis_on.stride() == (0, 0) and lam_on.stride() == (0, 0)
    assert parts[False][0].stride() != (0, 0)
    assert torch.equal(k_main + mix_on @ basis_on, k_main + parts[False][1] @ parts[False][0])
