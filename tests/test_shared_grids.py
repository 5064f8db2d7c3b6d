"""Schemes that quantize a parameter identically share its scoring work (issue 13): equal grids
(``ParamGrid.same_cells``) are detected per parameter, their cell moments, bootstrap draws and
draws' sums computed once, and every report row is bitwise what each scheme gives alone."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from collections import Counter

import pytest
import torch
from _nets import trained_relu_mlp  # tests/_nets.py
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.config import stage_configs
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.base import ParamGrid

A = importlib.import_module("mis_lightning.assess")


@functools.cache
def _fitted(kind: str):
    """``(model, est)``: the 64-24-1 MLP with stored influences (``"stored"``: the moments kept
    for the Monte Carlo form) or factored ones (``"factored"``), or a 256-128-1 MLP whose
    first weight (32,768 weights, 128 rows) takes the subsampled draws (``"sampled"``)."""
    model, x, y = trained_relu_mlp(256, 128, 30) if kind == "sampled" else trained_relu_mlp()
    opts = {"estimation": "diagonal", "num_records": 64, "hessian": "ggn"}
    if kind != "stored":
        opts["budget"] = 1000  # too small to store the [R, d] influences
    est_cfg, _, _ = stage_configs("assess", None, None, opts)
    est = A.run_estimation(model, DataLoader(TensorDataset(x, y), batch_size=128),
                           lambda o, t: (o[:, 0] - t) ** 2, est_cfg)
    assert est.influence_stored == (kind == "stored")
    return model, est


def _schemes():
    """int8 weight-only and dynamic-activation (the same weight grid), int4, and int8 weight-only
    on the first layer only (equal to int8's grid there, absent elsewhere)."""
    first = get_scheme("int8_weight_only", filter_fn=lambda m, fqn: fqn == "0")
    named = type("Int8FirstLayer", (type(first),), {"name": property(lambda self: "int8_first_layer")})
    object.__setattr__(first, "__class__", named)  # its own name in the report (a frozen dataclass)
    return [get_scheme("int8_weight_only"), get_scheme("int8_dynamic_activation_int8_weight"),
            get_scheme("intx_weight_only_int4"), first]


def test_same_cells_is_exact():
    model, est = _fitted("factored")
    w8, dyn, w4 = (s.apply(model, params=est.names).grids for s in _schemes()[:3])
    assert set(w8) == set(dyn) and w8
    for k, g in w8.items():
        assert g.same_cells(dyn[k]) and dyn[k].same_cells(g)
        assert not g.same_cells(w4[k])
        codes = g.codes.clone()
        codes.reshape(-1)[3] += 1
        assert not g.same_cells(dataclasses.replace(g, codes=codes))  # one code
        rev = g.revealed.clone()
        rev.reshape(-1)[5] = ~rev.reshape(-1)[5]
        assert not g.same_cells(dataclasses.replace(g, revealed=rev))  # one revealed weight
        assert not g.same_cells(dataclasses.replace(g, scale=g.scale.to(torch.float64)))  # dtype
        assert not g.same_cells(dataclasses.replace(g, support=(g.support[0], g.support[1] * (1 + 1e-15))))
        assert g.same_cells(dataclasses.replace(g, name="x", method="other", bits_per_weight=1.0))  # labels
    z = ParamGrid(name="w", shape=(2,), kind="affine", dequantized=torch.zeros(2), bits_per_weight=8.0,
                  scale=torch.tensor([0.1, 0.0]), block_size=(1,), zero_point=torch.zeros(2), qmin=-8, qmax=7)
    assert z.same_cells(dataclasses.replace(z))
    assert not z.same_cells(dataclasses.replace(z, scale=torch.tensor([0.1, -0.0])))  # -0.0 is not 0.0, bitwise
    assert not z.same_cells(dataclasses.replace(z, qmax=127))


@pytest.mark.parametrize("kind", ["stored", "factored", "sampled"])
def test_equal_grids_are_scored_once_and_rows_are_bitwise_unchanged(kind, monkeypatch):
    """Every figure of every row (to_dict, bitwise) equals a run where each scheme computes its
    own moments (``SHARE_EQUAL_GRIDS = False``), the two int8 rows are equal, and the grids of
    ``int8_dynamic_activation_int8_weight`` and of the first-layer int8 are never evaluated."""
    import mis_lightning.estimation.linear_factors as lf

    # float64 power sums: the factored sums' float32 GEMMs (pf28) round by the column set they
    # are given (within their stated 1e-4; tests/test_factored_sums.py), not bitwise
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    model, est = _fitted(kind)
    calls: Counter = Counter()  # cell-moment calls per grid (subset views of the draws count for their grid)
    for meth in ("moments", "element_moments"):
        real = getattr(ParamGrid, meth)

        def spy(self, *a, _real=real, **k):
            calls[getattr(self, "_origin", id(self))] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(ParamGrid, meth, spy)
    real_sub = A._subset_grid

    def sub_spy(grid, *a):
        sub = real_sub(grid, *a)
        sub._origin = getattr(grid, "_origin", id(grid))
        return sub

    monkeypatch.setattr(A, "_subset_grid", sub_spy)
    sampled = []
    real_sampled = A._sampled_draw_parts
    monkeypatch.setattr(A, "_sampled_draw_parts", lambda *a, **k: sampled.append(1) or real_sampled(*a, **k))
    reports, evaluated = {}, {}
    monkeypatch.setattr(A, "SHARE_EQUAL_COLUMNS", False, raising=False)  # bitwise: every column summed in both
    for share in (False, True):
        monkeypatch.setattr(A, "SHARE_EQUAL_GRIDS", share, raising=False)
        seen: dict[str, list[int]] = {}
        real_prep = A._prepare_scheme

        def prep_spy(est_, model_, scheme, draws, _real=real_prep, _seen=seen, **kw):
            p = _real(est_, model_, scheme, draws, **kw)
            _seen[scheme.name] = [id(g) for g in p.grids.values()]
            return p

        monkeypatch.setattr(A, "_prepare_scheme", prep_spy)
        calls.clear()
        rep = A.score_schemes(est, model, _schemes(), strict=True)
        reports[share] = json.dumps(rep.to_dict(), sort_keys=True)
        evaluated[share] = {s: sum(calls[i] for i in ids) for s, ids in seen.items()}
    assert bool(sampled) == (kind == "sampled")  # the subsampled draws' path is covered
    assert reports[True] == reports[False]
    rows = json.loads(reports[True])["schemes"]
    a, b = rows["int8_weight_only"], rows["int8_dynamic_activation_int8_weight"]
    assert {k for k in a if a[k] != b[k]} <= {"name", "description", "float_params"}
    assert all(evaluated[False].values())  # each scheme evaluates its own without sharing
    assert evaluated[True]["int8_dynamic_activation_int8_weight"] == 0
    assert evaluated[True]["int8_first_layer"] == 0
    assert evaluated[True]["intx_weight_only_int4"] == evaluated[False]["intx_weight_only_int4"]


def _numbers(tree, path=""):
    """``{path: float}`` of every number in a report's ``to_dict`` tree."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{path}.{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{path}[{i}]").items()}
    return {path: float(tree)} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


@pytest.mark.parametrize("kind", ["factored", "sampled"])
def test_equal_and_zero_columns_are_summed_once(kind, monkeypatch):
    """The power sums skip repeated main and pool columns (equal grids) and zero ones (the
    baseline's m4 - 3 kappa^2): less work reaches the power sums (columns x weights), and every
    figure of the report moves by at most 1e-12 relative (the matrix products round differently
    with another number of columns: ~2e-16 measured at 1e5 weights)."""
    import mis_lightning.estimation.linear_factors as lf

    # float64 power sums: the factored sums' float32 GEMMs (pf28) round by the column set they
    # are given (within their stated 1e-4; tests/test_factored_sums.py), not bitwise
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    model, est = _fitted(kind)
    work: list[int] = []
    real = A._InfluenceReader.sums

    def spy(self, a, b, columns, rows=None):
        work.append(sum(c.numel() for c in columns.values()))
        return real(self, a, b, columns, rows)

    monkeypatch.setattr(A._InfluenceReader, "sums", spy)
    out, summed = {}, {}
    for share in (False, True):
        monkeypatch.setattr(A, "SHARE_EQUAL_COLUMNS", share, raising=False)
        work.clear()
        out[share] = _numbers(A.score_schemes(est, model, _schemes(), strict=True).to_dict())
        summed[share] = sum(work)
    assert summed[True] < summed[False]
    assert out[True].keys() == out[False].keys()
    for k, v in out[False].items():
        w = out[True][k]
        assert w == v or abs(w - v) <= 1e-12 * max(abs(v), abs(w)), (k, v, w)


@pytest.mark.parametrize("kind", ["factored", "sampled"])
def test_every_schemes_draws_are_summed_in_one_call_per_chunk(kind, monkeypatch):
    """ps33: a chunk's draws' parts of every scheme (distinct parts: int8 and its dynamic twin
    share theirs) are summed in one power-sum call over the union of the rows they moved
    (JOINT_DRAW_SUMS), not one call per scheme: fewer calls with rows, the same number of
    chunks reached, and every figure of the report within 1e-12 relative of the per-scheme calls
    (the products round otherwise with more columns and rows; the draws' sums are differences
    from the main sums, ~1e-16 of them measured)."""
    model, est = _fitted(kind)
    calls: list[tuple[int, int]] = []
    real = A._InfluenceReader.sums

    def spy(self, a, b, columns, rows=None):
        if rows is not None:
            calls.append((a, b))
        return real(self, a, b, columns, rows)

    monkeypatch.setattr(A._InfluenceReader, "sums", spy)
    out, n, chunks = {}, {}, {}
    for joint in (False, True):
        monkeypatch.setattr(A, "JOINT_DRAW_SUMS", joint)
        calls.clear()
        out[joint] = _numbers(A.score_schemes(est, model, _schemes(), strict=True).to_dict())
        n[joint], chunks[joint] = len(calls), set(calls)
    assert chunks[True] == chunks[False] and chunks[True]
    assert n[True] == len(chunks[True]) < n[False]  # one call per chunk instead of one per scheme
    assert out[True].keys() == out[False].keys()
    for k, v in out[False].items():
        w = out[True][k]
        assert w == v or abs(w - v) <= 1e-12 * max(abs(v), abs(w)), (k, v, w)


@pytest.mark.parametrize("kind", ["factored", "sampled"])
def test_the_joint_draws_call_sums_no_zero_column(kind, monkeypatch):
    """ps35: the joint draws' call (JOINT_DRAW_SUMS) leaves out the parts that moved no row of the
    chunk and every all-zero column of the others (JOINT_DRAW_NONZERO_COLUMNS): no column that
    reaches the power sums is zero, the switch off sums exactly those columns more (the sampled
    draws' group columns are zero on the rows the union moved outside their group), and every figure of the report
    is within 1e-12 relative of the switch off (a zero column sums to exactly 0; the others' GEMMs
    round otherwise with fewer columns, ~1e-16 measured)."""
    model, est = _fitted(kind)
    widths: list[int] = []
    zero: list[int] = []
    real = A._InfluenceReader.sums

    def spy(self, a, b, columns, rows=None):
        if rows is not None:
            c = columns[2]
            widths.append(c.shape[1])
            zero.append(int((~c.ne(0).any(0)).sum()))
        return real(self, a, b, columns, rows)

    monkeypatch.setattr(A._InfluenceReader, "sums", spy)
    out, n, z = {}, {}, {}
    for nonzero in (False, True):
        monkeypatch.setattr(A, "JOINT_DRAW_NONZERO_COLUMNS", nonzero)
        widths.clear()
        zero.clear()
        out[nonzero] = _numbers(A.score_schemes(est, model, _schemes(), strict=True).to_dict())
        n[nonzero], z[nonzero] = sum(widths), sum(zero)
    assert z[True] == 0 and n[True] == n[False] - z[False]
    if kind == "sampled":  # the groups' columns are zero off their rows
        assert z[False] > 0
    assert out[True].keys() == out[False].keys()
    for k, v in out[False].items():
        w = out[True][k]
        assert w == v or abs(w - v) <= 1e-12 * max(abs(v), abs(w)), (k, v, w)


@pytest.mark.parametrize("kind", ["factored", "sampled"])
def test_column_major_stack_gives_bitwise_the_same_report(kind, monkeypatch):
    """ps37: a factored weight's distinct main and pool columns are written column after column
    into the reader's held buffer and passed as its transpose (``COLUMN_MAJOR_STACK``; here every
    chunk's, ``COLUMN_MAJOR_ROWS = 1``: these small MLPs' rows mostly reach the GEMMs): every
    figure of the report bitwise as with the row-major stack (the a = 0 term's GEMV per column
    sums each column as the row-major GEMV does), and the power sums do receive the column-major
    view (strides ``(1, c)``) with the switch on and a row-major matrix with it off."""
    model, est = _fitted(kind)
    monkeypatch.setattr(A, "COLUMN_MAJOR_ROWS", 1.0)
    # (the a = 0 term's GEMV per column; linear_factors.ZEROTH_TERM_GEMV's one GEMV rounds otherwise)
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.linear_factors"), "ZEROTH_TERM_GEMV", False)
    layouts: list[tuple[int, ...]] = []
    real = A._InfluenceReader.sums

    def spy(self, a, b, columns, rows=None):
        if rows is None:
            layouts.extend(c.stride() for c in columns.values() if c.shape[1] > 1)
        return real(self, a, b, columns, rows)

    monkeypatch.setattr(A._InfluenceReader, "sums", spy)
    reports, seen = {}, {}
    for on in (False, True):
        monkeypatch.setattr(A, "COLUMN_MAJOR_STACK", on)
        layouts.clear()
        reports[on] = json.dumps(A.score_schemes(est, model, _schemes(), strict=True).to_dict(), sort_keys=True)
        seen[on] = set(layouts)
    assert reports[True] == reports[False]
    assert seen[False] and all(s[1] == 1 for s in seen[False])
    assert seen[True] and all(s[0] == 1 and s[1] > 1 for s in seen[True])


def test_column_major_stack_only_where_few_rows_reach_the_gemms():
    """ps37: the column-major stack is taken where at most COLUMN_MAJOR_ROWS of a chunk's output
    rows have a non-zero ``d`` on some record (the 1e7 second layer: 3-9 of 128); a chunk whose
    rows mostly reach the GEMMs (the first layer) and stored influences stay row-major."""
    model, est = _fitted("factored")
    reader = A._InfluenceReader(est, est.names[0])
    fac = reader.factor[0]
    u, out = reader.unit, fac.d.shape[1]
    cols = [torch.rand(out * u, dtype=torch.float64) for _ in range(3)]
    on = fac.d.ne(0).any(0)
    assert reader.gemm_row_fraction(0, out * u) == float(on.float().mean()) > A.COLUMN_MAJOR_ROWS
    assert A._stacked(reader, 2, cols, 0, out * u).stride() == (3, 1)
    saved = fac.d.clone()
    try:
        fac.d[:, : out - out // 4] = 0.0  # a quarter of the rows left
        assert reader.gemm_row_fraction(0, out * u) <= 0.25
        got = A._stacked(reader, 2, cols, 0, out * u)
        assert got.stride() == (1, out * u) and torch.equal(got, torch.stack(cols, 1))
    finally:
        fac.d.copy_(saved)
    stored, est_s = _fitted("stored")
    assert A._InfluenceReader(est_s, est_s.names[0]).gemm_row_fraction(0, 10) == 1.0
