"""The interval's draws and sampled groups read as rows of one tensor (py37): bitwise the per-draw
``_total(...).leakage(n).mean()`` they replace, and the cached draw mix a fresh copy each time."""

from __future__ import annotations

import pytest
import torch

from mis_lightning import functional as F
from mis_lightning.assess import _built_mix, _row_leakage_means, _summed_s2, _total


def _per_row_reference(layers: list[torch.Tensor], rows: int, R: int, n: float) -> list[float]:
    """The old arithmetic: per row, the layers' CltSums summed by ``_total``, then the leakage's mean."""
    out = []
    for i in range(rows):
        per = {f"l{j}": F.CltSums(t if t.dim() == 1 else t[i], torch.zeros(R, dtype=torch.float64))
               for j, t in enumerate(layers)}
        out.append(float(_total(per, R).leakage(n).mean()))
    return out


@pytest.mark.parametrize("R", [1, 7, 512, 3001])
def test_rows_equal_the_per_draw_totals_bit_for_bit(R):
    g = torch.Generator().manual_seed(R)
    rows = 16
    # s2 over many magnitudes (small sums round differently in every order), one layer the same
    # in every row ([R], as a layer without sampled groups), one with a negative rounding residue
    scales = torch.logspace(-12, 2, R, dtype=torch.float64)
    layers = [torch.rand(rows, R, generator=g, dtype=torch.float64) * scales,
              torch.rand(R, generator=g, dtype=torch.float64) * 1e-3,
              torch.randn(rows, R, generator=g, dtype=torch.float64) * 1e-9 + 1e-9]
    for n in (2.0, 4096.0, 1e6):
        got = _row_leakage_means(_summed_s2(layers, rows, R), n)
        assert got == _per_row_reference(layers, rows, R, n)


def test_rows_of_a_transposed_sum_are_read_contiguously():
    # the draws' s2 built as (dd.T + main) is laid out column-major; the means must not depend on it
    g = torch.Generator().manual_seed(3)
    R, D = 1000, 16
    main, dd = torch.rand(R, generator=g, dtype=torch.float64), torch.randn(R, D, generator=g, dtype=torch.float64) * 1e-3
    drawn = torch.add(dd.T, main)
    ref = [float(F.CltSums(main + dd[:, b], torch.zeros(R, dtype=torch.float64)).leakage(512.0).mean())
           for b in range(D)]
    assert _row_leakage_means(_summed_s2([drawn], D, R), 512.0) == ref


@pytest.mark.parametrize("draws", [1, 2, 3, 15, 16, 17])
def test_built_mix_is_the_antithetic_matrix_and_a_fresh_copy(draws):
    half = (draws + 1) // 2
    ref = torch.zeros(draws, 1 + half, dtype=torch.float64)
    ref[:, 0] = 1.0
    for bi in range(draws):
        ref[bi, 1 + bi % half] = 1.0 if bi < half else -1.0
    first = _built_mix(draws)
    assert torch.equal(first, ref)
    first.mul_(7.0)  # a caller owns its copy: the next call is unchanged
    assert torch.equal(_built_mix(draws), ref)
