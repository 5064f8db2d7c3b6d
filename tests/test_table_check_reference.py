"""The float-format tables' self-check reference (tb36): cells narrower than ``CHECK_MERGE_SD`` sd
summed in closed form where an sd spans more than ``_MAX_WINDOW`` edges (``table._merged_table_sums``),
instead of every edge of the table (fp16 weights beyond 65504 with sds of 2e4-1e5, the 1e7 MLP's
draws: 63k edges per sampled weight, 70-210 ms a check).

Its error against the exact sums over every edge is bounded (Popoviciu: each merged cell's variance
is at most ``w^2 / 4``): kappa in ``[0, CHECK_MERGE_SD^2 / 4]``, m4 in ``[0, 2 CHECK_MERGE_SD^2]``,
mean_abs within ``0.1 CHECK_MERGE_SD^2``, far inside the check's tolerance (kappa 2e-4). It must
still catch the fault the whole-table sums were added for (windows of ``_MAX_WINDOW`` edges that
miss cells: float16 at 65504, sd 5e5, kappa 0.645 against 0.694)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.functional.cells import moments_from_alpha
from mis_lightning.functional.fastpath import GUARD
from mis_lightning.functional.kernel import _MAX_WINDOW
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64
EPS = T.CHECK_MERGE_SD


def _wide(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Positions within and beyond the table with sds from 1/50 of its top to 20 times it."""
    vals = representable_values(dtype)
    top = float(vals.max())
    g = torch.Generator().manual_seed(seed)
    th = (torch.rand(n, generator=g, dtype=F64) * 4 - 2) * top * 1.2
    sg = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(top / 50), math.log(top * 20), generator=g))
    sc = torch.exp(torch.empty(n, dtype=F64).uniform_(-2.0, 2.0, generator=g))
    return vals, th * sc, sg * sc, sc


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_reference_within_its_bound_of_the_exact_sums(dtype, monkeypatch):
    vals, th, sg, sc = _wide(dtype, 96, 1)
    merged_elements = []
    real = T._merged_table_sums

    def spy(out, sel, *a, **kw):
        merged_elements.append(int(sel.sum()))
        return real(out, sel, *a, **kw)

    monkeypatch.setattr(T, "_merged_table_sums", spy)
    exact = T._table_cell_moments(th, sg, vals, sc, 18, T.REFERENCE_FINE_STEP)
    got = T._table_cell_moments(th, sg, vals, sc, 18, T.REFERENCE_FINE_STEP, merge_sd=EPS)
    assert sum(merged_elements) > 32  # those whose sd spans more than _MAX_WINDOW edges
    dk = got.kappa - exact.kappa
    assert float(dk.min()) >= -1e-15 and float(dk.max()) <= EPS**2 / 4
    dm = got.m4 - exact.m4
    assert float(dm.min()) >= -1e-13 and float(dm.max()) <= 2 * EPS**2
    assert float((got.mean_abs - exact.mean_abs).abs().max()) <= 0.1 * EPS**2 + 1e-15
    assert float((got.coverage - exact.coverage).abs().max()) <= 1e-14
    assert float(dk.max()) > 0.0  # the merged cells' variance is left out (from above), not nothing


def test_merged_reference_without_a_valley_sums_every_edge():
    """A table whose widths do not fall then rise: every edge summed (the exact sums)."""
    vals = torch.cumsum(torch.tensor([0.0] + [1.0, 1.0, 1.0, 9.0, 9.0, 9.0] * 150, dtype=F64), 0)
    vals = torch.cat([-vals.flip(0)[:-1], vals])
    sc = torch.ones(8, dtype=F64)
    th = torch.linspace(-3000, 3000, 8, dtype=F64)
    sg = torch.full((8,), 5e4, dtype=F64)
    assert T._valley(T.table_layout(vals, th.device)) is None
    exact = T._table_cell_moments(th, sg, vals, sc, 18, T.REFERENCE_FINE_STEP)
    got = T._table_cell_moments(th, sg, vals, sc, 18, T.REFERENCE_FINE_STEP, merge_sd=EPS)
    for k in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(got, k), getattr(exact, k)), k


def _float16_draws(n: int = 64) -> tuple[torch.Tensor, ...]:
    """pf30's case: float16 positions beyond the table with sds of 2-3e4 (the 1e7 MLP's draws)."""
    g = torch.Generator().manual_seed(5)
    vals = representable_values(torch.float16)
    sg = 2e4 + 1.3e4 * torch.rand(n, generator=g, dtype=F64)
    th = (7e4 + 3e4 * torch.rand(n, generator=g, dtype=F64)) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return vals, th.to(F64), sg, torch.ones(n, dtype=F64)


@pytest.fixture
def fresh_guard():
    GUARD.reset()
    yield
    GUARD.reset()


def test_the_check_merges_instead_of_summing_every_edge(monkeypatch, fresh_guard):
    """The first-use check of these weights sums none of them over the whole table (the old
    reference summed each over the 63k edges)."""
    vals, th, sg, sc = _float16_draws()
    whole = []
    real = T._whole_table_sums

    def spy(out, sel, *a, **kw):
        whole.append(int(sel.sum()))
        return real(out, sel, *a, **kw)

    monkeypatch.setattr(T, "_whole_table_sums", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        T.table_cell_moments(th, sg, vals, sc)
    assert T.FLOAT_PATH not in GUARD.disabled
    assert GUARD.is_checked(T.FLOAT_PATH)
    assert sum(whole) == 0


def test_the_check_still_catches_missing_cells(monkeypatch, fresh_guard):
    """Injected fault: the fast path's wide weights summed over windows of ``_MAX_WINDOW`` edges
    each side (no runs, no whole-table sums: cells beyond the windows missed, as before pf23).
    The check with the merged reference disables the fast path with a warning."""
    vals, th, sg, sc = _float16_draws()

    def windowed(out, sel, mids, th_, sg_, sc_):
        if not bool(sel.any()):
            return
        ii = torch.nonzero(sel).squeeze(-1)
        edges = T.table_boundaries(th_[ii], vals, sc_[ii], _MAX_WINDOW)
        mm = moments_from_alpha((edges - th_[ii].unsqueeze(-1)) / sg_[ii].unsqueeze(-1))
        for t, v in zip(out, (mm.kappa, mm.mean_abs, mm.m4, mm.coverage)):
            t[ii] = v

    no_runs = lambda out, cand, *a, **kw: torch.zeros_like(cand)  # noqa: E731
    monkeypatch.setattr(T, "_run_path", no_runs)
    monkeypatch.setattr(T, "_whole_table_sums", windowed)
    faulty, _ = T._table_fast_moments(th, sg, vals, sc)
    exact = T._table_cell_moments(th, sg, vals, sc, 18, T.REFERENCE_FINE_STEP, merge_sd=EPS)
    assert float((faulty.kappa - exact.kappa).abs().max()) > 1e-2  # the fault is real
    with pytest.warns(RuntimeWarning, match="float-format fast path"):
        T.table_cell_moments(th, sg, vals, sc)
    assert T.FLOAT_PATH in GUARD.disabled
