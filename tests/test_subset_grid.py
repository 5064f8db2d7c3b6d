"""The sampled draws' view of a grid (``assess._subset_grid``, tb36): the sampled elements'
per-block values read by block index (``SUBSET_BY_BLOCK``), not the chunk's expansion then a
gather; the same values bitwise, for every block layout, with codes, zero points, bounds, the
stored weights' bounds and the revealed mask."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from mis_lightning.quantization.base import ParamGrid

A = importlib.import_module("mis_lightning.assess")
F64 = torch.float64


def _grid(shape: tuple[int, ...], block: tuple[int, ...], storage: torch.dtype | None, seed: int) -> ParamGrid:
    g = torch.Generator().manual_seed(seed)
    nb = tuple(math.ceil(s / b) for s, b in zip(shape, block))
    scale = torch.rand(nb, generator=g, dtype=torch.float32) + 0.1
    zp = torch.randint(-3, 4, nb, generator=g).to(torch.float32)
    lo = -torch.rand(nb, generator=g, dtype=F64) * 5
    hi = torch.rand(nb, generator=g, dtype=F64) * 5
    codes = torch.randint(-8, 8, shape, generator=g).to(torch.int8)
    grid = ParamGrid(name="w", shape=shape, kind="affine", dequantized=torch.zeros(shape), bits_per_weight=4.0,
                     scale=scale, block_size=block, zero_point=zp, qmin=-8, qmax=7, codes=codes,
                     support=(lo, hi), storage_dtype=storage)
    grid.revealed = torch.rand(shape, generator=g) < 0.1
    return grid


@pytest.mark.parametrize("shape,block", [((40, 96), (1, 96)), ((40, 96), (1, 32)), ((40, 96), (8, 96)),
                                         ((37, 50), (4, 16)), ((6, 5, 3, 3), (1, 5, 3, 3)),
                                         ((6, 5, 3, 3), (2, 2, 3, 1)), ((500,), (64,))])
@pytest.mark.parametrize("storage", [None, torch.bfloat16])
def test_subset_by_block_is_the_expansion_gathered(shape, block, storage, monkeypatch):
    grid = _grid(shape, block, storage, 7)
    n, last = math.prod(shape), shape[-1]
    g = torch.Generator().manual_seed(1)
    rows_taken = 0
    for a, b in ((0, n), (last * (n // last // 3), n), (n // 5, n // 5 + max(1, n // 2))):
        c = b - a
        whole = A._draw_sample(c, last, g)[0] if len(shape) > 1 and a % last == 0 and c >= 8 * last else None
        for sel in (torch.sort(torch.randperm(c, generator=g)[: max(1, c // 7)]).values, whole):
            if sel is None:
                continue
            rows = A._whole_rows(grid, a, sel)
            rows_taken += rows is not None
            monkeypatch.setattr(A, "SUBSET_BY_BLOCK", False)
            old = A._subset_grid(grid, a, b, sel)
            monkeypatch.setattr(A, "SUBSET_BY_BLOCK", True)
            new = A._subset_grid(grid, a, b, sel)
            m = sel.numel()
            for u, v in zip(old.element_grid(0, m) + old.element_bounds(0, m),
                            new.element_grid(0, m) + new.element_bounds(0, m)):
                assert u.dtype == v.dtype and torch.equal(u, v)
            assert torch.equal(old.revealed, new.revealed)
            assert new._chunk_elements == b - a
    # the sampled whole rows take the row-wise form (a random subset does not)
    assert (rows_taken >= 2) if len(shape) > 1 else rows_taken == 0
