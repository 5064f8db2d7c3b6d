"""Closed-form sums over runs of equal cells (``functional/runs.py``) and the float-format path
that uses them (issue 13: bf16 / fp16 / fp8 weights whose sd is small against the weight but
spans hundreds of cells were summed cell by cell, 10-100x an integer scheme).

References: the exact cell sums (``cells.moments_from_alpha``) over the same cells, and the
previous windowed path (``table._table_cell_moments``). Tolerance 1e-10 absolute for kappa and
m4, as the rest of the float-format path (tests/test_float_grid_fast.py); measured: <= 9e-13
(kappa) and <= 6.7e-11 (m4, ~3) at steps up to ``RUN_MAX_STEP`` = 0.2 sd.
"""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.functional.cells import moments_from_alpha
from mis_lightning.functional.runs import RUN_MAX_STEP, run_moments, run_table
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread_fresh_guard")


@pytest.mark.parametrize("h", [0.02, 0.1, RUN_MAX_STEP])
def test_run_sums_equal_exact_cell_sums(h):
    """Three adjacent runs of 1-60 cells (steps h/2..h) anywhere in [-10, 12] sd: the closed
    form equals the sum over every cell. Dropping the h^8 Euler-Maclaurin term or the w^9
    series term moves m4 by ~1e-8 at h = 0.2 (fails)."""
    gen = torch.Generator().manual_seed(int(h * 1000))
    c = 64
    steps = h * (0.5 + 0.5 * torch.rand(3, c, generator=gen, dtype=F64))
    counts = torch.randint(1, 61, (3, c), generator=gen)
    start = torch.rand(c, generator=gen, dtype=F64) * 12 - 10
    ends = start + torch.cumsum(steps * counts, 0)
    u = torch.cat([start.unsqueeze(0), ends])  # [4, c]
    k2, k4, p = run_moments(u, steps)
    for j in range(c):
        cells = [start[j]]
        for r in range(3):
            cells += [u[r, j] + steps[r, j] * (i + 1) for i in range(int(counts[r, j]))]
        edges = torch.stack([torch.as_tensor(x, dtype=F64) for x in cells]).unsqueeze(0)
        edges[0, -1] = u[3, j]
        ref = moments_from_alpha(edges)
        assert abs(float(k2[j] - ref.kappa[0])) <= TOL
        assert abs(float(k4[j] - ref.m4[0])) <= TOL
        assert abs(float(p[j] - ref.coverage[0])) <= 1e-13


def test_zero_width_runs_add_nothing():
    """Runs past an element's last are padded as zero-width runs (its top edge repeated):
    exactly no contribution."""
    u = torch.tensor([[-1.0], [0.5], [0.5], [0.5]], dtype=F64)
    h = torch.tensor([[0.1], [0.2], [0.05]], dtype=F64)
    k2, k4, p = run_moments(u, h)
    k2b, k4b, pb = run_moments(u[:2], h[:1])
    assert float(k2[0]) == float(k2b[0]) and float(k4[0]) == float(k4b[0]) and float(p[0]) == float(pb[0])


def test_run_table_of_bfloat16():
    """bfloat16: one run per binade interior plus the cell straddling each binade edge; every
    finite cell in exactly one run, unbounded cells in none."""
    values = representable_values(torch.bfloat16)
    rt = run_table(values, torch.device("cpu"))
    assert int(rt.run_of[0]) == -1 and int(rt.run_of[-1]) == -1
    assert bool((rt.run_of[1:-1] >= 0).all())
    assert bool((torch.diff(rt.run_of[1:-1]) >= 0).all())
    mids = 0.5 * (values[1:] + values[:-1]).to(F64)
    widths = mids[1:] - mids[:-1]
    assert torch.allclose(rt.steps[rt.run_of[1:-1]], widths, rtol=1e-9, atol=0.0)
    assert float(rt.edges[0]) == float(mids[0]) and float(rt.edges[-1]) == float(mids[-1])


def _full_sum(theta, sigma, values):
    """Exact moments over every cell of the table (scale 1; a few elements only)."""
    mids = 0.5 * (values[1:] + values[:-1]).to(F64)
    inf = torch.tensor([math.inf], dtype=F64)
    edges = torch.cat([-inf, mids, inf])
    rows = [moments_from_alpha(((edges - t) / g).unsqueeze(0)) for t, g in zip(theta.tolist(), sigma.tolist())]
    return {k: torch.cat([getattr(r, k) for r in rows]) for k in ("kappa", "mean_abs", "m4")}


@pytest.mark.parametrize("dtype,ratio", [(torch.bfloat16, 0.1), (torch.bfloat16, 0.03), (torch.float16, 0.01)])
def test_well_determined_16bit_weights_take_the_runs(dtype, ratio, monkeypatch):
    """Weights N(0, 0.05^2) with sigma = ratio x 0.05 (a model trained on much data): many
    elements whose window is not uniform take the closed-form runs, within 1e-10 of the
    previous windowed path (exact sums where at most 512 edges lie each side within 8.5 sd;
    beyond, both paths take the fine expansion with the local step) and, for a sample, of the
    full sum over the table."""
    gen = torch.Generator().manual_seed(5)
    c = 4000
    theta = torch.randn(c, generator=gen, dtype=F64) * 0.05
    sigma = torch.full((c,), ratio * 0.05, dtype=F64)
    scale = torch.ones(c, dtype=F64)
    values = representable_values(dtype)
    taken = {}
    real = T._run_path

    def spy(*args):
        done = real(*args)
        taken["done"] = done
        return done

    monkeypatch.setattr(T, "_run_path", spy)
    fast, _ = T._table_fast_moments(theta, sigma, values, scale)
    prev = T._table_cell_moments(theta, sigma, values, scale, 18, T.FINE_STEP)
    done = taken["done"]
    # the runs see the elements not settled by their own cell (table._settled), in order
    layout = T.table_layout(values.to(F64), theta.device)
    sub = torch.arange(c) if layout.wide is None else torch.nonzero(~T._settled(theta, sigma, scale, layout)[3]).squeeze(-1)
    assert done.numel() == sub.numel()
    assert int(done.sum()) > c // 10
    for k in ("kappa", "mean_abs", "m4", "coverage"):
        err = (getattr(fast, k) - getattr(prev, k)).abs().max()
        assert float(err) <= TOL, (k, float(err))
    idx = sub[torch.nonzero(done).squeeze(-1)[:: max(1, int(done.sum()) // 20)]]
    full = _full_sum(theta[idx], sigma[idx], values)
    for k in ("kappa", "mean_abs", "m4"):
        err = (getattr(fast, k)[idx] - full[k]).abs().max()
        assert float(err) <= TOL, (k, float(err))


def test_runs_next_to_the_table_end_include_the_unbounded_cell():
    """A bfloat16 weight just below the largest value with an sd whose reach covers the top
    (unbounded) cell: the run path adds that cell exactly (the full sum over every cell of
    the table agrees)."""
    values = representable_values(torch.bfloat16)
    vmax = float(values.max())
    theta = torch.tensor([vmax * 0.995, -vmax * 0.99], dtype=F64)
    sigma = torch.tensor([vmax / 40.0, vmax / 45.0], dtype=F64)  # cells of 0.16-0.18 sd
    scale = torch.ones(2, dtype=F64)
    fast, closed = T._table_fast_moments(theta, sigma, values, scale)
    assert bool(closed.all())
    full = _full_sum(theta, sigma, values)
    for k in ("kappa", "mean_abs", "m4"):
        assert float((getattr(fast, k) - full[k]).abs().max()) <= TOL, k


def test_weights_beyond_a_16bit_table_with_a_wide_sd_take_the_runs(monkeypatch):
    """pf30: float16 positions beyond the table (|x| up to 1e5) with sds of 2-3e4 (the 1e7 MLP's
    scoring draws of weights without curvature) reach every run of the table (~80): the run path
    takes them (more than the former 32-run limit; on the old code none was closed-form and each
    was summed over the 63k edges) and equals the exact sums over every edge (the reference)
    to TOL (measured: kappa 2.1e-12, m4 5.4e-11, largest where the table lies > 3.3 sd away).
    The reaches covering 0 take the runs too with ``OPEN_CELLS_CLOSED_FORM`` off (on, the fine
    expansion with the end cells: tests/test_table_open_cells.py)."""
    monkeypatch.setattr(T, "OPEN_CELLS_CLOSED_FORM", False)
    g = torch.Generator().manual_seed(3)
    vals = representable_values(torch.float16)
    n = 300
    sg = 2e4 + 1.3e4 * torch.rand(n, generator=g, dtype=F64)
    th = (torch.rand(n, generator=g, dtype=F64) * 2 - 1) * 1e5
    sc = torch.ones(n, dtype=F64)
    got, closed = T._table_window_moments(th, sg, vals, sc)
    assert int(closed.sum()) > n // 4  # the elements beyond the table's runs' reach
    ref = T.table_reference_moments(th, sg, vals, sc)
    for k in ("kappa", "mean_abs", "m4", "coverage"):
        torch.testing.assert_close(getattr(got, k), getattr(ref, k), rtol=0.0, atol=TOL)
