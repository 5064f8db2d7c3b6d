"""Fixed costs of the scoring that do not scale with the model (issue 13: 8 schemes at 1e5-1e6
weights cost more in fixed costs than in work): work that depends on a value table or on the
library's constants alone is done once per process, not once per call, with bitwise the same
numbers."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from mis_lightning.functional import cells as C
from mis_lightning.functional import kernel as K
from mis_lightning.functional import table as T
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64


def _inline_layout(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mids and changes as _table_sum_moments computed them on every call before."""
    v = values.to(F64)
    mids = 0.5 * (v[1:] + v[:-1])
    widths = mids[1:] - mids[:-1]
    change = ~torch.isclose(widths[1:], widths[:-1], rtol=1e-9, atol=0.0)
    return mids, torch.cat([change.new_zeros(1, dtype=torch.long), change.long().cumsum(0)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_table_layout_is_built_once_per_table_and_equal(dtype, monkeypatch):
    values = representable_values(dtype)
    mids, changes = _inline_layout(values)
    lay = T.table_layout(values, values.device)
    assert torch.equal(lay.mids, mids) and torch.equal(lay.changes, changes)
    assert T.table_layout(values, values.device) is lay  # cached
    gen = torch.Generator().manual_seed(0)
    th = torch.randn(64, dtype=F64, generator=gen) * 0.05
    sg = torch.rand(64, dtype=F64, generator=gen) * 0.01 + 1e-4
    sc = torch.ones(64, dtype=F64)
    before = T._table_sum_moments(th, sg, values, sc)[0]
    # after the first call, no O(V) work per call: the layout's isclose over the table is not redone
    calls = []
    real = torch.isclose
    monkeypatch.setattr(torch, "isclose", lambda *a, **k: calls.append(a[0].numel()) or real(*a, **k))
    after = T._table_sum_moments(th, sg, values, sc)[0]
    assert not [n for n in calls if n >= values.numel() - 3], "the table's step changes were recomputed per call"
    for f in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(before, f), getattr(after, f))


def test_table_layout_follows_a_changed_table():
    values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=F64)
    lay = T.table_layout(values, values.device)
    values[0] = -4.0  # same storage, new content: rebuilt, not reused
    lay2 = T.table_layout(values, values.device)
    assert torch.equal(lay2.mids, _inline_layout(values)[0])
    assert not torch.equal(lay2.mids, lay.mids)


def test_uniform_table_is_the_row_by_row_build_in_few_calls(monkeypatch):
    # the reference: one moments_from_alpha call per row of log h (the build before)
    lo, hi = math.log(K.FINE_STEP), math.log(K.TABLE_H_MAX)
    logh = torch.linspace(lo, hi, K._TABLE_NH, dtype=F64)
    u = torch.linspace(0.0, 0.5, K._TABLE_NU, dtype=F64)
    ref = torch.empty(K._TABLE_NH, K._TABLE_NU, 3, dtype=F64)
    for k in range(K._TABLE_NH):
        hk = math.exp(float(logh[k]))
        M = math.ceil((K.CUTOFF_SIGMAS + 1.0) / hk) + 2
        i = torch.arange(-M, M, dtype=F64)
        alpha = (i + 0.5) * hk - (u * hk).unsqueeze(-1)
        inf = torch.full((K._TABLE_NU, 1), math.inf, dtype=F64)
        mm = C.moments_from_alpha(torch.cat([-inf, alpha, inf], -1))
        ref[k] = torch.stack([mm.kappa, mm.mean_abs, mm.m4], -1)
    calls = []
    real = K.moments_from_alpha
    monkeypatch.setattr(K, "moments_from_alpha", lambda a: calls.append(a.shape) or real(a))
    monkeypatch.setattr(K, "_TABLE", None)  # rebuild (monkeypatch restores the cached one)
    _, _, _, table = K._uniform_table()
    assert len(calls) <= 32, f"{len(calls)} calls: one per row of the table"
    corners = table.reshape(K._TABLE_NH, K._TABLE_NU, 12)
    assert torch.equal(corners[:, :, 0:3], ref)  # each entry's own corner, bitwise


def _fp8_grid(rows: int, cols: int, support: bool) -> tuple:
    from mis_lightning.quantization.base import ParamGrid

    values = representable_values(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, dtype=F64, generator=gen) * 0.1
    m = w.abs().amax(1, keepdim=True)
    scale = m / 448.0
    scale[1] = 0.0  # a dead row (all-zero block): kappa 0
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=8.0, scale=scale, block_size=(1, cols), values=values)
    g.revealed = torch.zeros(rows, cols, dtype=torch.bool)
    g.revealed[0, 3] = True  # an element the scale gives away: kappa 1
    if support:
        g.support = (-m, m)
    sigma = torch.rand(rows * cols, dtype=F64, generator=gen) * 0.03 + 1e-3
    return g, w.reshape(-1), sigma


@pytest.mark.parametrize("support", [False, True])
def test_small_table_chunk_draws_in_one_call_equal_row_by_row(support, monkeypatch):
    """The bootstrap positions of a small value-table chunk are scored in one cell-moment call
    (the per-call cost dominated small chunks: a 128-weight float8 row cost as much as 32k
    weights), with what the per-position calls gave (dead blocks 0, revealed elements 1) to
    rounding: the closed-form core groups its elements by window and takes each group's largest
    quadrature rule, so an element grouped with other positions may sum with more nodes
    (measured: at most 3.9e-15 here; the quadratures' own error is below 1e-12)."""
    A = importlib.import_module("mis_lightning.assess")  # the module (the package exports the function)

    g, th, sg = _fp8_grid(4, 32, support)
    c = th.numel()
    gen = torch.Generator().manual_seed(5)
    xi = torch.randn(8, c, dtype=F64, generator=gen) * 1.5
    k_main = g.moments(th, sg, 0, c).kappa
    want = torch.stack([g.moments(th + sg * xi[b], sg, 0, c, use_codes=False).kappa for b in range(8)])
    calls = []
    real = type(g).element_moments
    monkeypatch.setattr(type(g), "element_moments", lambda self, *a, **k: calls.append(a[0].numel()) or real(self, *a, **k))
    got, _ = A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None)
    assert calls == [8 * c], f"one call for the 8 positions, got calls of {calls}"
    assert (got - want).abs().max() <= 1e-12
    assert bool((got[:, 32:64] == 0).all()) and bool((got[:, 3] == 1).all())


def test_large_table_chunks_keep_one_call_per_position(monkeypatch):
    """At or above the float8 interpolation's call size the positions stay apart (batching
    would switch elements to the interpolated path: not the same numbers)."""
    A = importlib.import_module("mis_lightning.assess")  # the module (the package exports the function)
    import mis_lightning.functional as Fn

    g, th, sg = _fp8_grid(4, 32, False)
    c = th.numel()
    monkeypatch.setattr(Fn.table, "INTERP_MIN_ELEMENTS", 4 * c)  # 8 positions * c above it
    xi = torch.randn(8, c, dtype=F64, generator=torch.Generator().manual_seed(6))
    k_main = g.moments(th, sg, 0, c).kappa
    calls = []
    real = type(g).element_moments
    monkeypatch.setattr(type(g), "element_moments", lambda self, *a, **k: calls.append(a[0].numel()) or real(self, *a, **k))
    A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None)
    assert calls == [c] * 8


def _affine_chunk(c: int, step_sd: float, seed: int = 5) -> tuple:
    """An int8-like chunk of ``c`` elements whose grid step is ``step_sd`` sd for every element."""
    gen = torch.Generator().manual_seed(seed)
    th = torch.randn(c, dtype=F64, generator=gen) * 0.05
    sc = torch.full((c,), 0.4 / 127, dtype=F64)
    sg = sc / step_sd * (1.0 + 0.1 * torch.rand(c, dtype=F64, generator=gen))
    return th, sg, sc, torch.zeros(c, dtype=F64)


@pytest.mark.parametrize("kappa_only", [False, True])
def test_fused_kernel_builds_the_uniform_table_only_when_a_step_needs_it(kappa_only, monkeypatch):
    from mis_lightning.functional import affine as AF
    from mis_lightning.functional.fastpath import GUARD

    c = AF.TABLE_MIN_ELEMENTS
    fine = _affine_chunk(c, 0.3)  # every step below FINE_STEP: the fused kernel never reads the table
    monkeypatch.setattr(K, "_TABLE", None)
    GUARD.reset()
    got = AF.affine_cell_moments(*fine, -128, 127, kappa_only=kappa_only)
    assert K._TABLE is None, "the uniform table was built for a chunk whose steps are all fine"
    # the same numbers as with the table built (the kernel before the change built it first)
    K._uniform_table()
    GUARD.reset()
    ref = AF.affine_cell_moments(*fine, -128, 127, kappa_only=kappa_only)
    for f in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(got, f), getattr(ref, f)) or (
            kappa_only and f != "kappa" and bool(getattr(got, f).isnan().all()))
    # a chunk with one step in the table's range builds it, and reads it
    monkeypatch.setattr(K, "_TABLE", None)
    th, sg, sc, zp = _affine_chunk(c, 0.3)
    sg[7] = sc[7] / 3.0  # 3 sd: the table's range
    GUARD.reset()
    mixed = AF.affine_cell_moments(th, sg, sc, zp, -128, 127, kappa_only=kappa_only)
    assert K._TABLE is not None
    GUARD.reset()
    again = AF.affine_cell_moments(th, sg, sc, zp, -128, 127, kappa_only=kappa_only)
    assert torch.equal(mixed.kappa, again.kappa)
    assert not bool(torch.isnan(mixed.kappa).any())
    GUARD.reset()


def test_float8_reference_sums_a_window_wider_than_the_table_over_the_table(monkeypatch):
    # sds spanning most of the float8 table: the reference's windows of 256 edges each side
    # (514) were wider than the table (254 edges); every edge of the table is the same cells
    values = representable_values(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(11)
    c = 300
    th = torch.randn(c, dtype=F64, generator=gen) * 0.05
    sc = torch.full((c,), 0.2 / 448.0, dtype=F64)
    sg = torch.rand(c, dtype=F64, generator=gen) * 0.1 + 0.01
    widths = []
    real = T.table_boundaries
    monkeypatch.setattr(T, "table_boundaries", lambda t, v, s, m: widths.append(m) or real(t, v, s, m))
    got = T.table_reference_moments(th, sg, values, sc)
    edges_in_table = values.numel() + 1  # -inf, the V - 1 midpoints, +inf
    assert all(2 * m + 2 <= edges_in_table for m in widths if m > 1), widths
    # against the exact sum over every edge of the table, element by element
    v = values.to(F64)
    mids = 0.5 * (v[1:] + v[:-1])
    inf = torch.tensor([math.inf], dtype=F64)
    edges = torch.cat([-inf, mids, inf]).unsqueeze(0) * sc.unsqueeze(-1)
    ref = C.moments_from_alpha((edges - th.unsqueeze(-1)) / sg.unsqueeze(-1))
    torch.testing.assert_close(got.kappa, ref.kappa, rtol=0, atol=1e-14)
    torch.testing.assert_close(got.mean_abs, ref.mean_abs, rtol=0, atol=1e-14)
    torch.testing.assert_close(got.m4, ref.m4, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(got.coverage, ref.coverage, rtol=0, atol=1e-14)


def _small_affine_grid(rows: int, cols: int, qmax: int, bounded: bool, seed: int) -> tuple:
    """A per-row absmax grid (codes ``[-qmax - 1, qmax]``) on ``rows x cols`` weights whose sd
    ranges from 1e-3 to 3e2 steps (every cell-moment regime), a dead row and a revealed element."""
    from mis_lightning.quantization.base import ParamGrid

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, dtype=F64, generator=gen)
    absmax = w.abs().amax(1, keepdim=True)
    scale = absmax / qmax
    if rows > 1:
        scale[1] = 0.0  # a dead block: kappa 0
    g = ParamGrid(name="w", shape=(rows, cols), kind="affine", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=float(math.log2(2 * qmax + 2)), scale=scale, block_size=(1, cols),
                  zero_point=torch.zeros(rows, 1, dtype=F64), qmin=-qmax - 1, qmax=qmax)
    g.revealed = torch.zeros(rows, cols, dtype=torch.bool)
    g.revealed[0, 3] = True  # the scale gives it away: kappa 1
    if bounded:
        g.support = (-absmax, absmax)
    step = absmax.expand(rows, cols).reshape(-1) / qmax
    sg = step * torch.exp(torch.empty(rows * cols, dtype=F64).uniform_(math.log(1e-3), math.log(3e2), generator=gen))
    return g, w.reshape(-1), sg, gen


@pytest.mark.parametrize("rows, cols, qmax, bounded", [(1, 128, 127, True), (4, 32, 7, True), (3, 100, 7, False)])
def test_small_affine_chunk_draws_in_one_call_equal_per_position(rows, cols, qmax, bounded, monkeypatch):
    """The draws of a small affine chunk (all its positions' pairs below the fused kernel's
    TABLE_MIN_ELEMENTS, as the 1e5 MLP's 128-weight last layer) take one cell-moment call, not one
    per position (sm38), with bitwise the kappa of the per-position calls: every pair takes the
    per-regime path either way, and that path is element-wise."""
    A = importlib.import_module("mis_lightning.assess")  # the module (the package exports the function)

    g, th, sg, gen = _small_affine_grid(rows, cols, qmax, bounded, seed=rows * cols + qmax)
    c = th.numel()
    xi = torch.randn(8, c, dtype=F64, generator=gen) * 1.5
    k_main = g.moments(th, sg, 0, c).kappa
    calls = []
    real = type(g).element_moments
    monkeypatch.setattr(type(g), "element_moments", lambda self, *a, **k: calls.append(a[0].numel()) or real(self, *a, **k))
    monkeypatch.setattr(A, "AFFINE_DRAWS_AT_ONCE_SMALL", False)
    want, _ = A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None)
    assert len(calls) > 1, calls  # the reference: one call per position that moves
    calls.clear()
    monkeypatch.setattr(A, "AFFINE_DRAWS_AT_ONCE_SMALL", True)
    got, _ = A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None)
    assert len(calls) == 1, calls
    assert torch.equal(got, want)
    assert float((got != k_main).double().mean()) > 0.1  # the draws move kappa
    if rows > 1:
        assert bool((got[:, cols:2 * cols] == 0).all())
    assert bool((got[:, 3] == 1).all())
    # and the built draws' parts through _draw_parts, bitwise
    xi9 = torch.randn(A._draw_noise_rows(16), c, dtype=F64, generator=gen)
    monkeypatch.setattr(A, "AFFINE_DRAWS_AT_ONCE_SMALL", False)
    old = A._draw_parts(g, th, sg, 0, c, k_main, xi9, 16, None)
    monkeypatch.setattr(A, "AFFINE_DRAWS_AT_ONCE_SMALL", True)
    new = A._draw_parts(g, th, sg, 0, c, k_main, xi9, 16, None)
    assert all(torch.equal(x, y) for x, y in zip(old, new))


def test_affine_chunk_draws_reaching_the_fused_kernel_stay_per_position(monkeypatch):
    """Where the positions together would reach TABLE_MIN_ELEMENTS (the fused kernel's path,
    other arithmetic) the chunk keeps one call per position."""
    A = importlib.import_module("mis_lightning.assess")  # the module (the package exports the function)
    import mis_lightning.functional as Fn

    g, th, sg, gen = _small_affine_grid(4, 32, 7, True, seed=11)
    c = th.numel()
    monkeypatch.setattr(Fn.affine, "TABLE_MIN_ELEMENTS", 4 * c)  # 8 positions * c reach it
    xi = torch.randn(8, c, dtype=F64, generator=gen) * 1.5
    k_main = g.moments(th, sg, 0, c).kappa
    calls = []
    real = type(g).element_moments
    monkeypatch.setattr(type(g), "element_moments", lambda self, *a, **k: calls.append(a[0].numel()) or real(self, *a, **k))
    A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None)
    assert len(calls) > 1 and max(calls) <= c


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float16])
def test_whole_table_sums_in_cache_sized_blocks_equal_one_block(dtype, monkeypatch):
    """``_whole_table_sums`` sums float8's 254 edges for 258 rows a block (sm38: the first-use
    self-check's 2,014 rows were one block of 4 MB temporaries), the 16-bit tables 16 rows, as
    before; each row's sums are its own: bitwise what one block gives."""
    values = representable_values(dtype)
    v = values.to(F64)
    mids = 0.5 * (v[1:] + v[:-1])
    c = 600 if dtype == torch.float8_e4m3fn else 40
    gen = torch.Generator().manual_seed(13)
    th = torch.randn(c, dtype=F64, generator=gen) * 0.05
    sc = torch.full((c,), 0.2 / 448.0 if dtype == torch.float8_e4m3fn else 1.0, dtype=F64)
    sg = torch.rand(c, dtype=F64, generator=gen) * 0.1 + 0.01
    sel = torch.rand(c, generator=gen) < 0.9
    rows = []
    real = T.moments_from_alpha
    monkeypatch.setattr(T, "moments_from_alpha", lambda a: rows.append(a.shape[0]) or real(a))

    def run() -> tuple:
        out = tuple(torch.full((c,), -1.0, dtype=F64) for _ in range(4))
        T._whole_table_sums(out, sel, mids, th, sg, sc)
        return out

    got = run()
    per_block = (1 << 16) // (mids.numel() + 2) if dtype == torch.float8_e4m3fn else 16  # 258 rows of 254 edges
    assert max(rows) == min(per_block, int(sel.sum())) and len(rows) > 1, rows
    rows.clear()
    monkeypatch.setattr(T, "_WHOLE_BLOCK", 1 << 30)  # one block
    want = run()
    assert rows == [int(sel.sum())]
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert bool((got[0][~sel] == -1).all()) and bool((got[0][sel] > 0).all())


def _tables() -> list[torch.Tensor]:
    """The 8- / 16-bit value tables, the casts' cell tables and synthetic sorted edge sets: one whose
    span never reaches 2 * _MAX_WINDOW edges, one reaching it on its last positive edge, duplicates,
    one all negative (no positive edge)."""
    from mis_lightning.quantization.casts import cast_cell_values

    gen = torch.Generator().manual_seed(3)
    out = [representable_values(d) for d in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)]
    out += [cast_cell_values(d) for d in (torch.bfloat16, torch.float16)]
    n = 2 * K._MAX_WINDOW
    out.append(torch.sort(torch.randn(n + 40, dtype=F64, generator=gen)).values)
    out.append(torch.cat([-torch.rand(n // 2 + 7, dtype=F64, generator=gen) - 1.0,
                          torch.linspace(1e-3, 1.0, n // 2 - 7, dtype=F64)]).sort().values)
    out.append(torch.sort(torch.randn(3 * n, dtype=F64, generator=gen).round(decimals=2)).values)
    out.append(-torch.rand(3 * n, dtype=F64, generator=gen).sort().values.flip(0) - 0.5)
    out.append(torch.linspace(-5.0, 5.0, 4 * n + 1, dtype=F64))
    return out


def test_layout_searches_equal_the_full_scans(monkeypatch):
    """sm42: ``_wide_span`` by bisection and ``_bit_guide`` past the shifts with fewer rows than
    edges return exactly what the full scans return (the span never falls as ``T`` grows; two
    edges in one row fail the guide's test), on every float table and edge sets chosen to hit
    each branch (no answer, the answer on the last edge, duplicates, no positive edge)."""
    wides = []
    for vals in _tables():
        mids = 0.5 * (vals[1:] + vals[:-1])
        got = {}
        for flag in (False, True):
            monkeypatch.setattr(T, "WIDE_SPAN_BISECT", flag)
            monkeypatch.setattr(T, "GUIDE_SKIP_FEW_ROWS", flag)
            got[flag] = (T._wide_span(mids), T._bit_guide(mids.numpy()))
        (w0, g0), (w1, g1) = got[False], got[True]
        assert w0 == w1
        wides.append(w0)
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert all(bool((a == b).all()) if hasattr(a, "shape") else a == b for a, b in zip(g0, g1))
    # the cases are not vacuous: some tables have a wide span, some none, some a guide
    assert any(w is None for w in wides) and sum(w is not None for w in wides) >= 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pattern_cells_through_the_guide_equal_the_binary_search(dtype, monkeypatch):
    """p53b: ``TableLayout.pattern_cells`` finds the cells of the 65,536 bit patterns of a 16-bit
    cast's table through the layout's bucket guide (``PATTERN_CELLS_BY_GUIDE``) and gives bit for
    bit the edges of the binary search (switch off) and of an independent reference (Python's
    ``bisect_right`` over the edges, then the padded edges; NaN patterns NaN), on every pattern:
    both zeros, subnormals, the largest finite values, the infinities and every NaN payload; no
    ``torch.searchsorted`` runs with the switch on."""
    import bisect

    from mis_lightning.quantization.casts import cast_cell_values

    values = cast_cell_values(dtype)
    got = {}
    real = torch.searchsorted
    searches: list[int] = []
    monkeypatch.setattr(torch, "searchsorted", lambda *a, **k: searches.append(1) or real(*a, **k))
    for flag in (False, True):
        monkeypatch.setattr(T, "PATTERN_CELLS_BY_GUIDE", flag)
        lay = T.TableLayout(values, torch.device("cpu"))  # a fresh layout: nothing cached
        assert lay._guide is not None
        searches.clear()
        got[flag] = lay.pattern_cells()
        assert bool(searches) is not flag  # the guide replaces the search
    monkeypatch.setattr(torch, "searchsorted", real)
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a.view(torch.int64), b.view(torch.int64))  # bits: NaN and -0.0 too
    # the reference: the cell k = bisect_right(mids, v) of each pattern's value, edges padded[k], padded[k + 1]
    v = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).to(F64).tolist()
    mids = lay.mids.tolist()
    padded = [-math.inf, *mids, math.inf]
    lo, hi = got[True][0].tolist(), got[True][1].tolist()
    special = 0
    for p, x in enumerate(v):
        if math.isnan(x):
            assert math.isnan(lo[p]) and math.isnan(hi[p])
            continue
        k = bisect.bisect_right(mids, x)
        assert (lo[p], hi[p]) == (padded[k], padded[k + 1]), (p, x)
        special += math.isinf(x) or x == 0.0
    assert special == 4  # +-0 and +-inf were among them



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_table_layout_builds_its_step_changes_on_first_read(dtype):
    """``TableLayout.changes`` (an isclose and a cumsum over the table: the 16-bit casts' ~65k
    cells) is built when first read, not with the layout (the scoring of the 16-bit casts never
    reads it), and is then the inline computation's, bitwise, and kept."""
    from mis_lightning.quantization.casts import cast_cell_values

    values = cast_cell_values(dtype) if torch.finfo(dtype).bits == 16 else representable_values(dtype)
    lay = T.TableLayout(values, torch.device("cpu"))
    assert "changes" not in vars(lay)
    assert torch.equal(lay.changes, _inline_layout(values)[1])
    assert lay.changes is lay.changes
