"""The wide runs' merged region (tb37, ``table.WIDE_RUN_MERGE_SD``): where an sd spans a 16-bit
table, the runs of cells at most 1e-6 sd wide are one closed-form region. Against the exact sums
over every edge of the table (float64): within the runs' own tolerance; against the runs summed
apart: at most ``WIDE_RUN_MERGE_SD^2 / 4`` higher in kappa (Popoviciu) plus rounding, and fewer
runs per element; elements with no such runs bitwise unchanged."""

from __future__ import annotations

import math

import torch

from mis_lightning.functional import table as T
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64


def _wide(dtype: torch.dtype, c: int, seed: int, lo: float, hi: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sg = torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(lo), math.log(hi), generator=g))
    th = torch.randn(c, dtype=F64, generator=g) * sg * 2.5
    return representable_values(dtype), th, sg, torch.ones(c, dtype=F64)


def _wide_runs(vals, th, sg, sc, merge_sd, kappa_only=False):
    layout = T.table_layout(vals, th.device)
    _, cell_lo, cell_hi, need, own_lo, own_hi, _, _, _, _ = T._sum_prelude(th, sg, sc, layout)
    out = tuple(torch.full_like(th, math.nan) for _ in range(4))
    done = T._run_path(out, need > T._MAX_WINDOW, cell_lo, cell_hi, (own_lo, own_hi), need, vals, th, sg, sc,
                       T._WIDE_RUN_BUCKETS, kappa_only, merge_sd)
    return out, done


def test_merged_runs_against_exact_whole_table_sums(monkeypatch):
    vals, th, sg, sc = _wide(torch.float16, 3000, 0, 2e3, 1e8)
    rows = []
    real = T.run_moments

    def spy(u, step, kappa_only=False):
        rows.append(u.shape[0])
        return real(u, step, kappa_only)

    monkeypatch.setattr(T, "run_moments", spy)
    apart, done = _wide_runs(vals, th, sg, sc, 0.0)
    rows_apart, rows[:] = sum(rows), []
    merged, done_m = _wide_runs(vals, th, sg, sc, T.WIDE_RUN_MERGE_SD)
    assert torch.equal(done, done_m) and int(done.sum()) > 1000
    assert sum(rows) < 0.6 * rows_apart  # fewer runs summed
    # the whole-table float64 reference costs ~4 ms a weight (63k edges each): every 8th weight
    # (375); its largest kappa error reads 5.1e-12 on 400, 1,000 and all 3,000 weights alike
    sub = done & (torch.arange(th.numel()) % 8 == 0)
    ref = tuple(torch.zeros_like(th) for _ in range(4))
    T._whole_table_sums(ref, sub, T.table_layout(vals, th.device).mids, th, sg, sc)
    k, k_ref = merged[0][sub], ref[0][sub]
    assert float((k - k_ref).abs().max()) < 1e-11  # the runs' tolerance (tests/test_float_runs.py)
    assert float((merged[2][sub] - ref[2][sub]).abs().max()) < 1e-9
    # against the runs apart: from above, by at most eps^2 / 4 (plus rounding of the sums)
    d = merged[0][done] - apart[0][done]
    assert float(d.max()) <= T.WIDE_RUN_MERGE_SD**2 / 4 + 1e-15 and float(d.min()) >= -1e-15
    assert float((merged[3][done] - apart[3][done]).abs().max()) < 1e-15


def test_no_fine_runs_means_bitwise_unchanged():
    """An sd for which no two runs are fine enough (merge threshold far below every step) gives
    bitwise the unmerged sums."""
    vals, th, sg, sc = _wide(torch.float16, 500, 1, 2e3, 1e5)
    apart, done = _wide_runs(vals, th, sg, sc, 0.0)
    merged, _ = _wide_runs(vals, th, sg, sc, 1e-30)
    for a, b in zip(apart, merged):
        assert torch.equal(a[done], b[done])


def test_table_call_uses_the_merge():
    """``table_cell_moments`` on such weights moves by no more than the bound with the merge on."""
    vals, th, sg, sc = _wide(torch.float16, 2000, 2, 5e3, 1e7)
    old = T.WIDE_RUN_MERGE_SD
    try:
        T.WIDE_RUN_MERGE_SD = 0.0
        apart = T.table_cell_moments(th, sg, vals, sc, kappa_only=True).kappa
        T.WIDE_RUN_MERGE_SD = old
        merged = T.table_cell_moments(th, sg, vals, sc, kappa_only=True).kappa
    finally:
        T.WIDE_RUN_MERGE_SD = old
    d = merged - apart
    assert float(d.max()) <= old**2 / 4 + 1e-15 and float(d.min()) >= -1e-15
