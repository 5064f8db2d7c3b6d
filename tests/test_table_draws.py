"""The bootstrap draws of value-table grids (tb35; docs/method.md section 5, "The bootstrap
draws"): the elements whose kappa cannot move between theta-hat and a draw keep the main kappa
without a cell-moment evaluation.

References and tolerances:
* sd 0: a draw's position ``theta + 0 * xi`` is theta-hat itself, so the kappa changes are
  exactly 0 (what the evaluations returned: compared bitwise against them);
* float8 weights whose sd dwarfs their bounded window: the exact partition sums of
  ``tests/_wide_reference.py`` at positions from -3 to 2.5 sd put the deficit ``1 - kappa`` in
  ``[0, S]`` (``S = phi(0) C3 / (12 sigma^3)`` on the table's own cells, ~1e-12 relative: the
  reference's rounding), so keeping the main kappa errs by at most ``S <= 2e-9``; the kept draws
  against the evaluated ones (the shortcut off) within ``S``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mis_lightning.functional.wide import WIDE_MAX_WINDOW, table_cube_sum, wide_deficit_bound
from mis_lightning.quantization.base import ParamGrid
from mis_lightning.quantization.casts import representable_values
from tests._wide_reference import exact_deficits, partition_edges

A = importlib.import_module("mis_lightning.assess")
F64 = torch.float64
D = 16


def _fp8(rows: int, cols: int, sd_steps: float, seed: int = 3) -> tuple:
    """A float8 e4m3 grid with per-row absmax scales (bounds, revealed absmax) and weights whose sd
    is about ``sd_steps`` times the row's largest cell."""
    values = representable_values(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, dtype=F64, generator=gen) * 0.1
    m = w.abs().amax(1, keepdim=True)
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=8.0, scale=m / 448.0, block_size=(1, cols), values=values)
    g.reveal(w.float(), "absmax")
    top = (m / 448.0 * 32.0).expand(rows, cols).reshape(-1)  # the widest cell (256 .. 448 step 32)
    sigma = top * sd_steps * torch.exp(0.3 * torch.randn(rows * cols, dtype=F64, generator=gen))
    return g, w.reshape(-1), sigma


def _moments(g, th, sg, c):
    mm = g.moments(th, sg, 0, c)
    return mm.kappa


def test_float8_wide_sd_draws_keep_kappa_within_S():
    """sd 1e4-1e5 of float8's top cell: every element is position-free (window at most
    ``WIDE_MAX_WINDOW`` sd, ``S`` at most ``POSITION_FREE_WIDE_TOL``, or revealed); at draw
    positions from -3 to 2.5 sd the exact deficit lies in ``[0, S]``; the draws keep ``k_main``
    exactly (fails without the table shortcut: the evaluated draws move by up to ~S)."""
    rows, cols = 8, 64
    c = rows * cols
    g, th, sg = _fp8(rows, cols, 3e4)
    scale, zp, _ = g.element_grid(0, c)
    lo, hi = (t.to(F64) for t in g.element_bounds(0, c))
    S = wide_deficit_bound(sg, table_cube_sum(lo, hi, scale.to(F64), g.values))
    rev = g.revealed.reshape(-1).to(torch.bool)
    assert bool(((hi - lo <= WIDE_MAX_WINDOW * sg) & (S <= A.POSITION_FREE_WIDE_TOL) | rev).all())
    free = A._position_free(g, th, sg, 0, c, torch.zeros(8, c, dtype=F64))
    assert free is not None and free.shape == (8, c) and bool(free.all())
    for i in torch.nonzero(~rev).squeeze(-1)[::37].tolist():
        edges = partition_edges(g, i, float(lo[i]), float(hi[i]), float(scale[i]), 0.0)
        for xi in (-3.0, -0.7, 0.0, 0.4, 2.5):
            dk, _, _ = exact_deficits(float(th[i]) + xi * float(sg[i]), float(sg[i]), edges)
            assert 0.0 <= dk <= float(S[i]) * (1 + 1e-12), (i, xi, dk, float(S[i]))
    k_main = _moments(g, th, sg, c)
    xi = torch.randn(A._draw_noise_rows(D), c, dtype=F64, generator=torch.Generator().manual_seed(7))
    basis, _, _ = A._draw_parts(g, th, sg, 0, c, k_main, xi, D, None, table_at_once=True)
    assert bool((basis == 0).all())
    # the evaluated draws (shortcut off) move by at most S from the main kappa
    A.TABLE_WIDE_POSITION_FREE = False
    try:
        ev, _ = A._evaluated_draws(g, th, sg, 0, c, k_main, xi[:8], None, table_at_once=True)
    finally:
        A.TABLE_WIDE_POSITION_FREE = True
    assert float((ev - k_main).abs().max()) <= float(S.max()) + 1e-15


def test_float8_draws_evaluate_where_some_element_can_move():
    """sd about 30 top cells (S ~1e-5 on some elements): no shortcut (``None``), the draws are
    the evaluated ones, bitwise (the same call as before the shortcut)."""
    rows, cols = 8, 64
    c = rows * cols
    g, th, sg = _fp8(rows, cols, 30.0)
    assert A._position_free(g, th, sg, 0, c, torch.zeros(8, c, dtype=F64)) is None
    k_main = _moments(g, th, sg, c)
    xi = torch.randn(8, c, dtype=F64, generator=torch.Generator().manual_seed(7))
    ev, _ = A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None, table_at_once=True)
    ref = A._table_draws_at_once(g, th, sg, 0, c, xi, None)
    assert torch.equal(ev, ref) and float((ev - k_main).abs().max()) > 1e-9


@pytest.mark.parametrize("kind", ["table", "bf16"])
def test_sd_zero_sample_keeps_kappa_without_evaluations(kind, monkeypatch):
    """A sample whose weights all have sd 0 (dead units): its kappa changes are exactly 0 (the
    evaluations' own result, checked bitwise here) and no cell moments are evaluated (fails
    before tb35: the 8 positions went through ``element_moments``)."""
    rows, cols = 64, 64
    c = rows * cols
    if kind == "table":
        g, th, _ = _fp8(rows, cols, 1.0)
    else:
        values = representable_values(torch.bfloat16)
        g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                      bits_per_weight=16.0, scale=torch.ones(1, 1, dtype=F64), block_size=(rows, cols),
                      values=values)
        th = torch.randn(c, dtype=F64, generator=torch.Generator().manual_seed(1)) * 0.05
    sg = torch.zeros(c, dtype=F64)
    k_main = _moments(g, th, sg, c)
    sample = A._draw_sample(c, cols, torch.Generator().manual_seed(2))
    xi = torch.randn(A._draw_noise_rows(D), c, dtype=F64, generator=torch.Generator().manual_seed(4))
    # the evaluations' result (what the shortcut replaces): every change exactly 0
    ev, _ = A._table_draws_at_once(g, th, sg, 0, c, xi[:8], None), None
    assert torch.equal(ev, k_main.expand(8, c))
    calls = []
    real = ParamGrid.element_moments
    monkeypatch.setattr(ParamGrid, "element_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    basis, mix, groups = A._sampled_draw_parts(g, th, sg, 0, c, k_main, xi, D, None, sample)
    assert not calls
    assert basis.shape == (1 + D // 2, sample[0].numel()) and bool((basis == 0).all()) and bool((groups == 0).all())
    assert torch.equal(mix, A._built_mix(D))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_draws_evaluate_the_moving_elements_alone(dtype):
    """A 16-bit cast (no bounds, no interpolation table: each element's moments are its own):
    with ``k_main`` the draws evaluate only the elements of sd > 0 and keep ``k_main`` for the
    sd-0 ones: bitwise the full call's kappa (the sd-0 ones there are point masses at theta-hat)."""
    rows, cols = 32, 64
    c = rows * cols
    values = representable_values(dtype)
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=16.0, scale=torch.ones(1, 1, dtype=F64), block_size=(rows, cols), values=values)
    gen = torch.Generator().manual_seed(6)
    th = torch.randn(c, dtype=F64, generator=gen) * 0.05
    sg = torch.rand(c, dtype=F64, generator=gen) * 1e-3
    sg[: c // 2] = 0.0  # dead units' rows
    k_main = _moments(g, th, sg, c)
    xi = torch.randn(8, c, dtype=F64, generator=torch.Generator().manual_seed(8))
    full = A._table_draws_at_once(g, th, sg, 0, c, xi, None)
    alone = A._table_draws_at_once(g, th, sg, 0, c, xi, None, k_main)
    assert A._elementwise_table(g) and torch.equal(full, alone)
    assert float((full[:, c // 2:] - k_main[c // 2:]).abs().max()) > 1e-6  # the live ones do move


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_draws_form_the_moving_positions_alone(dtype, monkeypatch):
    """``assess.DRAWS_LIVE_POSITIONS`` (p49c): the moving elements' positions formed alone and the
    dead blocks zeroed in place give bitwise the kappa of the switch off (every position formed,
    then gathered; a where over [D, c]) and of the call without ``k_main`` (every element evaluated):
    a per-row scale with two dead rows (scale 0), half the rows sd 0."""
    rows, cols = 16, 64
    c = rows * cols
    values = representable_values(dtype)
    scale = torch.ones(rows, 1, dtype=F64)
    scale[3] = scale[11] = 0.0
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=16.0, scale=scale, block_size=(1, cols), values=values)
    gen = torch.Generator().manual_seed(12)
    th = torch.randn(c, dtype=F64, generator=gen) * 0.05
    th.view(rows, cols)[3] = th.view(rows, cols)[11] = 0.0
    sg = torch.rand(c, dtype=F64, generator=gen) * 1e-3
    sg.view(rows, cols)[::2] = 0.0
    k_main = _moments(g, th, sg, c)
    xi = torch.randn(8, c, dtype=F64, generator=torch.Generator().manual_seed(13))
    assert A._elementwise_table(g)
    monkeypatch.setattr(A, "DRAWS_LIVE_POSITIONS", True)
    new = A._table_draws_at_once(g, th, sg, 0, c, xi, None, k_main)
    monkeypatch.setattr(A, "DRAWS_LIVE_POSITIONS", False)
    old = A._table_draws_at_once(g, th, sg, 0, c, xi, None, k_main)
    full = A._table_draws_at_once(g, th, sg, 0, c, xi, None)
    assert torch.equal(new.view(torch.int64), old.view(torch.int64)) and torch.equal(new, full)
    assert bool((new.view(8, rows, cols)[:, [3, 11]] == 0).all())
    assert float((new.view(8, rows, cols)[:, 1::2] - k_main.view(rows, cols)[1::2]).abs().max()) > 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,chunk", [(64, None), (4, None), (4, 1 << 18)])
def test_sixteen_bit_draws_in_order_repeat_the_elements(dtype, rows, chunk, monkeypatch):
    """``assess.DRAWS_PAIRS_IN_ORDER`` (p50a): where every (position, element) pair is evaluated in
    order (no sd-0 element, no padding: 8 x 32,768 pairs, and 8 x 2,048 of a chunk below the
    interpolation's size), the pairs' per-element tensors are repeats and the positions the
    ``[D, c]`` tensor itself: kappa bitwise the gathers' (the switch off), dead rows (scale 0)
    included; a sample of a large chunk (``_chunk_elements`` 2^18: padded pairs) takes the gathers
    either way. ``_evaluated_draws`` / ``_draw_parts``' unread ``lam`` is one zero expanded, the
    same values. Fails with the switch off (the positions a gather, ``lam`` filled)."""
    cols = 512
    c = rows * cols
    values = representable_values(dtype)
    scale = torch.ones(rows, 1, dtype=F64)
    scale[1] = 0.0
    g = ParamGrid(name="w", shape=(rows, cols), kind="table", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=16.0, scale=scale, block_size=(1, cols), values=values)
    if chunk is not None:
        g._chunk_elements = chunk
    gen = torch.Generator().manual_seed(31)
    th = torch.randn(c, dtype=F64, generator=gen) * 0.05
    sg = torch.rand(c, dtype=F64, generator=gen) * 1e-3 + 1e-5
    xi = torch.randn(8, c, dtype=F64, generator=torch.Generator().manual_seed(32))
    k_main = _moments(g, th, sg, c)
    seen = []
    real = g.element_moments

    def spy(pos, *a, **k):
        seen.append(pos._base is not None)  # a view of the [D, c] positions, not a gather
        return real(pos, *a, **k)

    monkeypatch.setattr(g, "element_moments", spy)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(A, "DRAWS_PAIRS_IN_ORDER", on)
        seen.clear()
        got[on] = A._table_draws_at_once(g, th, sg, 0, c, xi, None, k_main)
        assert seen == [on and chunk is None]
        kap, lam = A._evaluated_draws(g, th, sg, 0, c, k_main, xi, None, table_at_once=True)
        assert torch.equal(kap, got[on]) and bool((lam == 0).all()) and (lam.stride() == (0, 0)) == on
        xi_b = torch.randn(2 + D, c, dtype=F64, generator=torch.Generator().manual_seed(33))
        _, _, lam = A._draw_parts(g, th, sg, 0, c, k_main, xi_b, D, None, table_at_once=True)
        assert lam.shape == (D, c) and bool((lam == 0).all()) and (lam.stride() == (0, 0)) == on
    assert torch.equal(got[True].view(torch.int64), got[False].view(torch.int64))
    assert bool((got[True].view(8, rows, cols)[:, 1] == 0).all())
    assert float((got[True] - k_main).abs().max()) > 1e-9  # the positions do move kappa
