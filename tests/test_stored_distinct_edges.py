"""The stored-cell sums over the distinct edges of each window (functional/distinct.py, bf41)
against the plain kernel that evaluates every edge (``DISTINCT_EDGES`` off), both ways: windows
built then deduplicated (``distinct_edge_moments``) and table windows summed from the table's
distinct edges (``table_window_moments``).

Exact equality (``torch.equal``), no tolerance: the dedup evaluates the same element-wise IEEE
operations on the same edge pairs (torch's ``exp`` / ``erfc`` on CPU run one vectorised code for
every element of a tensor, its tail included, so an edge's value does not depend on its place),
puts ``+0`` where the plain kernel's empty cells give ``+0``, and sums the same ``[c, K]`` layout.
A wrong place, a dropped or a doubled cell changes kappa far above one ulp.

The grid-level case: the ``fp16`` scheme on a bf16-stored layer (8 fp16 codes per bf16 storage cell
near most values: runs of ~8 equal stored edges), sds from a tenth of a storage ulp to
thousands of them (windows up to thousands of edges), and bounds; with the fast paths'
sampled self-checks switched off (a fast path must be right on its own).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mis_lightning.functional.fastpath as fastpath
import mis_lightning.quantization.base as base
from mis_lightning.functional import distinct
from mis_lightning.functional.cells import moments_from_alpha_erfc
from mis_lightning.quantization import get_scheme

F64 = torch.float64
FIELDS = ("kappa", "mean_abs", "m4", "coverage")


@pytest.fixture(autouse=True)
def _no_self_checks(monkeypatch):
    monkeypatch.setattr(fastpath.GUARD, "sample_size", lambda *a, **k: 0)


def _equal(a, b) -> bool:
    """Every field bit for bit (NaN for NaN, the sign of 0 included)."""
    return all(torch.equal(getattr(a, f).contiguous().view(torch.int64), getattr(b, f).contiguous().view(torch.int64))
               for f in FIELDS)


def _counted(monkeypatch) -> list[int]:
    """Counts the dedup's own evaluations (calls that did not fall back to the plain kernel)."""
    seen = [0]
    terms = distinct.erfc_cell_terms

    def counting(alpha):
        seen[0] += 1
        return terms(alpha)

    monkeypatch.setattr(distinct, "erfc_cell_terms", counting)
    return seen


def _runs_alpha(rows: int, edges: int, seed: int) -> torch.Tensor:
    """``[rows, edges]`` non-decreasing standardised edges in runs of 1-12 equal values, each row
    its own number of distinct ones, ``-inf`` first and ``+inf`` last (a window's padding)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, edges, dtype=F64)
    for r in range(rows):
        reps = torch.randint(1, 13, (edges,), generator=g)
        vals = torch.sort(torch.randn(edges, generator=g, dtype=F64) * (1 + 3 * r)).values
        row = torch.repeat_interleave(vals, reps)[:edges]
        row[: 1 + r] = -torch.inf
        row[-(2 + r):] = torch.inf
        out[r] = row
    return out


@pytest.mark.parametrize("kappa_only", [False, True])
def test_runs_of_equal_edges_bitwise(monkeypatch, kappa_only):
    seen = _counted(monkeypatch)
    alpha = _runs_alpha(5, 700, seed=1)
    assert int((alpha[:, 1:] != alpha[:, :-1]).sum()) < 0.3 * alpha.numel()  # the dedup's case
    new = distinct.distinct_edge_moments(alpha, kappa_only)
    assert seen[0] == 1
    assert _equal(new, moments_from_alpha_erfc(alpha, kappa_only))
    # one row alone (the 1-row calls of the widest windows) and a row of one value (all empty)
    assert _equal(distinct.distinct_edge_moments(alpha[2:3], kappa_only), moments_from_alpha_erfc(alpha[2:3], kappa_only))
    flat = torch.full((2, 80), 0.5, dtype=F64)
    assert _equal(distinct.distinct_edge_moments(flat, kappa_only), moments_from_alpha_erfc(flat, kappa_only))


def test_falls_back_where_few_edges_repeat(monkeypatch):
    seen = _counted(monkeypatch)
    alpha = torch.sort(torch.randn(3, 200, dtype=F64, generator=torch.Generator().manual_seed(2))).values
    assert _equal(distinct.distinct_edge_moments(alpha), moments_from_alpha_erfc(alpha))
    assert seen[0] == 0


def _fp16_on_bf16():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 8, bias=False)).to(torch.bfloat16)
    with torch.no_grad():  # magnitudes from 1e-3 to 30: fp16's normal range, 8 codes per bf16 ulp
        w = torch.randn(8, 64) * torch.logspace(-3, 1.5, 8).unsqueeze(-1)
        model[0].weight.copy_(w.to(torch.bfloat16))
    grid = get_scheme("fp16").apply(model).grids["0.weight"]
    assert grid.storage_dtype == torch.bfloat16
    return grid, model[0].weight.detach().reshape(-1).to(F64)


@pytest.mark.parametrize("kappa_only", [False, True])
@pytest.mark.parametrize("use_codes", [True, False])
def test_fp16_scheme_on_bf16_weights_bitwise(monkeypatch, kappa_only, use_codes):
    grid, th = _fp16_on_bf16()
    c = th.numel()
    ulp = th.abs().clamp_min(1e-3) * 2.0**-7  # ~a bf16 storage ulp at each weight
    mult = torch.logspace(-1, 3.5, c, dtype=F64)[torch.randperm(c, generator=torch.Generator().manual_seed(4))]
    sd = ulp * mult
    pos = th + sd * torch.randn(c, dtype=F64, generator=torch.Generator().manual_seed(5))
    theta = th if use_codes else pos
    tables = [0]
    plain_table = base.table_window_moments

    def counting(*a):
        out = plain_table(*a)
        tables[0] += out is not None
        return out

    monkeypatch.setattr(base, "table_window_moments", counting)
    seen = _counted(monkeypatch)
    new = grid.moments(theta, sd, 0, c, use_codes=use_codes, kappa_only=kappa_only)
    assert tables[0] > 0  # windows summed from the table's distinct edges
    monkeypatch.setattr(distinct, "DISTINCT_TABLE_WINDOWS", False)
    built = seen[0]
    windows = grid.moments(theta, sd, 0, c, use_codes=use_codes, kappa_only=kappa_only)
    assert seen[0] > built  # windows built, then deduplicated
    monkeypatch.setattr(distinct, "DISTINCT_EDGES", False)
    old = grid.moments(theta, sd, 0, c, use_codes=use_codes, kappa_only=kappa_only)
    assert _equal(new, old) and _equal(windows, old)
    assert bool((new.kappa > 0).any()) and bool((new.kappa < 1).any())


@pytest.mark.parametrize("kappa_only", [False, True])
def test_table_windows_bitwise(kappa_only):
    """Windows of a two-row table (runs of equal edges, -inf / +inf at columns 0 and ``last``) at
    every column, the clamped ends included, sds spanning the window (every cell, the window's
    ends too, weighs in kappa), against the windows built as ``_storage_moments`` builds them."""
    g = torch.Generator().manual_seed(6)
    last, m = 99, 40
    rows = []
    for _ in range(2):
        inner = torch.repeat_interleave(torch.sort(torch.randn(60, generator=g, dtype=F64)).values,
                                        torch.randint(1, 4, (60,), generator=g))[: last - 1]
        inner = torch.cat([inner, inner[-1:].expand(last - 1 - inner.numel())])
        rows.append(torch.cat([torch.tensor([-torch.inf], dtype=F64), inner, torch.tensor([torch.inf], dtype=F64)]))
    flat = torch.cat(rows)
    rel = torch.arange(1, last).repeat(2)
    row = torch.arange(2).repeat_interleave(last - 1) * (last + 1)
    theta = flat.take(row + rel) + 0.01 * torch.randn(rel.numel(), generator=g, dtype=F64)
    sigma = torch.full_like(theta, 2.0)
    new = distinct.table_window_moments(flat, distinct.run_starts(flat), row, rel, last, m, theta, sigma, kappa_only)
    assert new is not None
    j = (rel - m).unsqueeze(-1) + torch.arange(2 * m + 2)
    e = flat.take(j.clamp(0, last) + row.unsqueeze(-1))
    e[:, 0], e[:, -1] = -torch.inf, torch.inf
    alpha = (e - theta.unsqueeze(-1)) / sigma.unsqueeze(-1)
    assert _equal(new, moments_from_alpha_erfc(alpha, kappa_only))
