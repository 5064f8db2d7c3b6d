"""The factored per-record power sums of a Linear layer against the materialised influences,
where some weights have no gradient variance (dead units: mo26 found the fourth-power sums NaN
at 1e7 weights, every scheme's Edgeworth estimate NaN with a "beyond its tolerance" note and an
exact second pass that came out NaN again)."""

from __future__ import annotations

import pytest
import torch

from mis_lightning.estimation.linear_factors import LinearFactors, factored_power_sums


def _reference(fac: LinearFactors, g_mean: torch.Tensor, v: torch.Tensor, A: torch.Tensor, power: int) -> torch.Tensor:
    g = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(fac.d.shape[0], -1)
    # no gradient variance: no influence (the estimate's convention, w_j = 0)
    w = torch.where(v > 0, -(g - g_mean) / v.clamp_min(1e-300).sqrt(), torch.zeros_like(g))
    return w.pow(power) @ A


@pytest.mark.parametrize("power,f32", [(2, False), (2, True), (4, False), (4, True)])
def test_weights_without_gradient_variance_add_nothing(power, f32, monkeypatch):
    """Two dead output units (their loss gradient 0 on every record, V_jj = 0): the sums equal
    the materialised influences' with w = 0 there, finite, to float64 rounding (1e-10 relative:
    the binomial expansion cancels terms of the centred gradient); with their float32 GEMMs
    (pf28) to the 1e-4 their run-time bound admits."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({power} if f32 else ()))
    g = torch.Generator().manual_seed(0)
    R, out_f, in_f = 40, 5, 7
    x = torch.randn(R, in_f, generator=g, dtype=torch.float64)
    d = torch.randn(R, out_f, generator=g, dtype=torch.float64)
    d[:, [1, 3]] = 0.0
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False)
    assert int((v == 0).sum()) == 2 * in_f
    A = torch.rand(out_f * in_f, 3, generator=g, dtype=torch.float64)
    got = factored_power_sums(fac, g_mean, v, A, power)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(fac, g_mean, v, A, power), rtol=lf.POWER_SUMS_F32_RTOL if f32 else 1e-10,
                               atol=0.0)


def _square_case(shift: float, R: int = 60, out_f: int = 48, in_f: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = shift + torch.randn(R, in_f, generator=g, dtype=torch.float64)
    d = shift + torch.randn(R, out_f, generator=g, dtype=torch.float64)
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    A = torch.rand(out_f * in_f, 3, generator=g, dtype=torch.float64)
    return fac, gr.mean(0), gr.var(0, unbiased=False), A


@pytest.mark.parametrize("power", [2, 4])
def test_power_sums_in_float32_stay_within_the_stated_tolerance(monkeypatch, power):
    """Centred gradients (mean ~0 against a spread of 1): the power sums take the float32 GEMMs
    (counted) and every entry is within POWER_SUMS_F32_RTOL (1e-4, the bound the run-time check
    admits) of the materialised float64 sums; measured ~1e-7 here."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(power, k): 0 for k in ("float32", "float64")})
    fac, g_mean, v, A = _square_case(shift=0.0)
    got = factored_power_sums(fac, g_mean, v, A, power)
    assert lf.POWER_SUMS_F32_COUNTS == {(power, "float32"): 60, (power, "float64"): 0}  # records
    torch.testing.assert_close(got, _reference(fac, g_mean, v, A, power), rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)


@pytest.mark.parametrize("power", [2, 4])
def test_power_sums_fall_back_to_float64_where_the_binomial_terms_cancel(monkeypatch, power):
    """Gradients of mean ~1600 against a spread of ~57 (d, x = 40 + N(0, 1)): the expanded terms
    are ~800x (power 4: ~10^5 x) the centred sum, float32 GEMMs would miss it by more than the 1e-4
    tolerance (checked: the unguarded float32 sums are off by more), the run-time bound sees it and
    the records are summed in float64: the same figures as with float32 switched off, to float64
    rounding of the reference."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(power, k): 0 for k in ("float32", "float64")})
    fac, g_mean, v, A = _square_case(shift=40.0)
    ref = _reference(fac, g_mean, v, A, power)
    S = (A / v.pow(power / 2).unsqueeze(-1)).reshape(48, 64, 3)
    gb = g_mean.reshape(48, 64)
    g0 = (S * gb.pow(power).unsqueeze(-1)).sum((0, 1))
    unguarded = lf._even_power_sums_f32(fac, gb, S, g0, power, rtol=float("inf"))[0]
    assert ((unguarded - ref).abs() / ref).max() > lf.POWER_SUMS_F32_RTOL
    got = factored_power_sums(fac, g_mean, v, A, power)
    assert lf.POWER_SUMS_F32_COUNTS == {(power, "float32"): 0, (power, "float64"): 60}  # records
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    assert torch.equal(got, factored_power_sums(fac, g_mean, v, A, power))
    torch.testing.assert_close(got, ref, rtol=1e-9 if power == 2 else 1e-6, atol=0.0)


def test_only_the_records_whose_bound_fails_are_summed_again_in_float64(monkeypatch):
    """The mean gradient ~1600 (that of records with d, x = 40 + N(0, 1)): on those records the
    expanded terms cancel to their spread (~57), on the others (d, x = N(0, 1)) they do not (the
    sum is ~gb^2). The bound fails on the shifted records alone, they are summed in float64 (equal to the float64
    path's rows to float64 rounding), the others keep their float32 sums (within the 1e-4)."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(2, k): 0 for k in ("float32", "float64")})
    fac, g_mean, v, A = _square_case(shift=0.0)
    far = torch.arange(60) % 10 == 3
    fac.x[far] += 40.0
    fac.d[far] += 40.0
    gr = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(60, -1)
    g_mean, v = gr[far].mean(0), gr.var(0, unbiased=False)
    got = factored_power_sums(fac, g_mean, v, A, 2)
    assert lf.POWER_SUMS_F32_COUNTS[(2, "float64")] == int(far.sum())
    assert lf.POWER_SUMS_F32_COUNTS[(2, "float32")] == 60 - int(far.sum())
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    f64 = factored_power_sums(fac, g_mean, v, A, 2)
    torch.testing.assert_close(got[far], f64[far], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(got[~far], f64[~far], rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)


@pytest.mark.parametrize("f32", [True, False])
def test_a_layers_power_cache_gives_bitwise_the_same_sums(monkeypatch, f32):
    """pf30: one PowerCache per layer (the input powers reused by every chunk, scheme and draw of
    a scoring pass) gives bitwise the sums without it, for powers 2 and 4, non-negative columns
    (float32 GEMMs, some records falling back to float64) and signed ones (float64), row subsets
    of d (chunks) and dead units; an in-place change of x empties it (the version counter), and a
    budget of 0 bytes caches nothing."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4} if f32 else ()))
    fac, g_mean, v, A = _square_case(shift=0.0)
    far = torch.arange(60) % 10 == 3
    fac.x[far] += 40.0  # some records' float32 bound fails: their float64 sums on a subset
    fac.d[far] += 40.0
    fac.d[:, 5] = 0.0  # a dead unit
    gr = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(60, -1)
    g_mean, v = gr[far].mean(0), gr.var(0, unbiased=False)
    signed = A - 0.5
    cache = lf.PowerCache()
    for rows in (slice(0, 48), slice(0, 16), slice(16, 48)):
        part = LinearFactors(module="lin", weight="lin.weight", bias=None, x=fac.x, d=fac.d[:, rows])
        el = slice(rows.start * 64, rows.stop * 64)
        for power in (2, 4):
            for cols in (A[el], signed[el]):
                want = factored_power_sums(part, g_mean[el], v[el], cols, power)
                got = factored_power_sums(part, g_mean[el], v[el], cols, power, cache=cache)
                assert torch.equal(got, want)
    assert cache._bytes > 0
    fac.x.mul_(2.0)  # in place: the cached powers are stale
    part = LinearFactors(module="lin", weight="lin.weight", bias=None, x=fac.x, d=fac.d)
    assert torch.equal(factored_power_sums(part, g_mean, v, A, 2, cache=cache), factored_power_sums(part, g_mean, v, A, 2))
    none = lf.PowerCache(budget=0)
    factored_power_sums(part, g_mean, v, A, 4, cache=none)
    assert [k for k in none._entries if k != "sx"] == []


def _partly_silent_case():
    """:func:`_square_case` with a tenth of the records far off (they fall back to float64) and 16
    silent output rows (0 on every record); also the ``[R, out * in]`` materialised gradients."""
    fac, g_mean, v, A = _square_case(shift=0.0)
    far = torch.arange(60) % 10 == 3
    fac.x[far] += 40.0  # some records fall back to float64
    fac.d[far] += 40.0
    silent = torch.zeros(48, dtype=torch.bool)
    silent[[0, 5, 6, 7, 20, 31, 32, 47]] = True
    silent[16:24] = True
    fac.d[:, silent] = 0.0
    gr = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(60, -1)
    return fac, g_mean, v, A, silent, gr


@pytest.mark.parametrize("f32", [True, False])
def test_silent_output_rows_skipped_give_the_same_sums(monkeypatch, f32):
    """pf31: output units whose loss gradient is 0 on every stored record (ReLU units off for all of
    them) are left out of the GEMMs (SKIP_SILENT_ROWS). Their mean gradient need not be 0 (it is
    the mean over every record, not the stored ones): here it is not, so their a = 0 term
    ``gb^p S`` must stay. Against the materialised influences (float64 1e-10, float32 the 1e-4 its
    bound admits) and against every row summed (SKIP_SILENT_ROWS False): the same records fall
    back to float64 (the bound is computed on the whole S, so the same entries fail it); float64
    sums agree to 1e-12 relative (the skipped terms are exact zeros, only the GEMMs' shapes
    differ), float32 ones to twice the 1e-4 each is within (MKL's float32 GEMMs can round
    otherwise with fewer columns: 1.5e-6 measured by benchmarks/silent_rows.py). Chunks of rows,
    all rows silent, powers 2 and 4, a cache."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4} if f32 else ()))
    fac, _, _, A, silent, gr = _partly_silent_case()
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False)
    g_mean = g_mean + 0.25 * (torch.arange(48 * 64) % 7 == 0)  # silent rows' gb non-zero too
    v = v + 0.5  # every weight live (the silent rows' terms are gb alone)
    cache = lf.PowerCache()
    for rows in (slice(0, 48), slice(16, 24), slice(8, 40)):
        part = LinearFactors(module="lin", weight="lin.weight", bias=None, x=fac.x, d=fac.d[:, rows])
        el = slice(rows.start * 64, rows.stop * 64)
        for power in (2, 4):
            counts = {}
            got = {}
            for skip in (False, True):
                monkeypatch.setattr(lf, "SKIP_SILENT_ROWS", skip)
                monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
                got[skip] = factored_power_sums(part, g_mean[el], v[el], A[el], power, cache=cache)
                counts[skip] = dict(lf.POWER_SUMS_F32_COUNTS)
            assert counts[True] == counts[False]
            torch.testing.assert_close(got[True], got[False], rtol=2 * lf.POWER_SUMS_F32_RTOL if f32 else 1e-12,
                                       atol=0.0)
            ref = _reference(part, g_mean[el], v[el], A[el], power)
            torch.testing.assert_close(got[True], ref, rtol=lf.POWER_SUMS_F32_RTOL if f32 else 1e-10, atol=0.0)
    if f32:  # the skipped rows' a = 0 term kept: all-silent chunk equals sum_j gb_j^p A_j / v_j^(p/2)
        part = LinearFactors(module="lin", weight="lin.weight", bias=None, x=fac.x, d=fac.d[:, 16:24])
        el = slice(16 * 64, 24 * 64)
        want = ((g_mean[el].pow(2) / v[el]).unsqueeze(-1) * A[el]).sum(0)
        torch.testing.assert_close(factored_power_sums(part, g_mean[el], v[el], A[el], 2)[0], want, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("f32", [True, False])
def test_dead_rows_left_out_of_the_elementwise_work_give_the_same_sums(monkeypatch, f32):
    """pf32: output rows none of whose weights has gradient variance (V_jj = 0 on the whole row: a
    unit dead on every record) have scaled = 0, so factored_power_sums runs on the other rows only
    (SKIP_DEAD_ROWS). Against every row (SKIP_DEAD_ROWS False): the same records fall back to
    float64 (the bound's out and the power-of-two scales of d and gb stay the layer's: here a dead
    row holds the largest |d| and |gb|), float64 sums within 1e-12 relative (the a = 0 term's sum
    runs over fewer zeros), float32 ones within twice the 1e-4 each is held to (the GEMMs' shapes
    differ); both equal the materialised influences' sums (1e-10 / 1e-4). Partly dead rows stay;
    an all-dead chunk sums to 0; powers 2 and 4; a cache."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4} if f32 else ()))
    fac, _, _, A = _square_case(shift=0.0)
    far = torch.arange(60) % 10 == 3
    fac.x[far] += 40.0  # some records fall back to float64
    fac.d[far] += 40.0
    gr = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(60, -1)
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False) + 0.5
    dead = torch.zeros(48, dtype=torch.bool)
    dead[[0, 5, 6, 7, 20, 31, 32, 47]] = True
    dead[16:24] = True
    fac.d[:, dead] = 0.0
    fac.d[:, 31] = 1e3  # a dead row (V = 0: no influence whatever its d) holding the largest |d| ...
    g_mean = g_mean.reshape(48, 64)
    g_mean[dead] = 0.0
    g_mean[32] = 1e3  # ... and the largest |gb|
    g_mean = g_mean.reshape(-1)
    v = v.reshape(48, 64)
    v[dead] = 0.0
    v[9, ::3] = 0.0  # a partly dead row stays
    v = v.reshape(-1)
    cache = lf.PowerCache()
    seen = []
    f32_sums = lf._even_power_sums_f32

    def spy(*a, **kw):
        seen.append(a[8] if len(a) > 8 else kw.get("layer"))  # layer: (out, d's scale, gb's scale) of the whole chunk
        return f32_sums(*a, **kw)

    monkeypatch.setattr(lf, "_even_power_sums_f32", spy)
    for rows in (slice(0, 48), slice(16, 24), slice(8, 40)):
        part = LinearFactors(module="lin", weight="lin.weight", bias=None, x=fac.x, d=fac.d[:, rows])
        el = slice(rows.start * 64, rows.stop * 64)
        for power in (2, 4):
            seen.clear()
            counts, got = {}, {}
            for skip in (False, True):
                monkeypatch.setattr(lf, "SKIP_DEAD_ROWS", skip)
                monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
                got[skip] = factored_power_sums(part, g_mean[el], v[el], A[el], power, cache=cache)
                counts[skip] = dict(lf.POWER_SUMS_F32_COUNTS)
            if rows == slice(16, 24):  # every row dead: no influence at all (no GEMM, no float64 fallback)
                assert bool((got[True] == 0).all()) and bool((got[False] == 0).all())
                assert counts[True][(power, "float64")] == 0
                continue
            assert counts[True] == counts[False]
            if f32:  # the bound and the scales are the whole chunk's (its largest |d| and |gb| in dead rows)
                n_out = rows.stop - rows.start
                # (every row: the layer's scales passed where silent rows are left out, pw34 F32_ON_LIVE_ROWS)
                assert seen[-1] is not None and (seen[0] is None) == (not lf.F32_ON_LIVE_ROWS)
                for layer in seen[-1:] if seen[0] is None else seen:
                    assert layer[0] == n_out
                    assert torch.equal(layer[1], lf._pow2_scale(part.d, (0, 1)))
                    assert torch.equal(layer[2], lf._pow2_scale(g_mean[el].reshape(n_out, 64), (0, 1)))
                    assert float(layer[1]) == 1024.0 and float(layer[2]) == 1024.0  # from rows 31 and 32
            torch.testing.assert_close(got[True], got[False], rtol=2 * lf.POWER_SUMS_F32_RTOL if f32 else 1e-12,
                                       atol=0.0)
            ref = _reference(part, g_mean[el], v[el], A[el], power)
            torch.testing.assert_close(got[True], ref, rtol=lf.POWER_SUMS_F32_RTOL if f32 else 1e-10, atol=0.0)


def test_held_scratch_buffers_give_bitwise_the_same_sums_and_keep_no_result(monkeypatch):
    """ps33: a layer's PowerCache holds the chunk-sized temporaries of factored_power_sums
    (``A / V^(p/2)``, the ``a = 0`` product, the float32 operands) from call to call. The sums are
    bitwise those of a call without a cache, for non-negative columns (float32 GEMMs, some records
    falling back to float64, which now reuse the call's ``a = 0`` term) and signed ones (float64),
    powers 2 and 4; a result is not overwritten by the next call (no buffer is returned), the same
    buffer memory serves every call of a slot, and a cache without budget holds none."""
    import mis_lightning.estimation.linear_factors as lf

    fac, _, _, A = _square_case(shift=0.0)
    far = torch.arange(60) % 10 == 3
    fac.x[far] += 40.0  # some records' float32 bound fails: the float64 fallback
    fac.d[far] += 40.0
    fac.d[:, 7] = 0.0  # a silent unit
    gr = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(60, -1)
    g_mean, v = gr[far].mean(0), gr.var(0, unbiased=False)
    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
    cache = lf.PowerCache()
    kept, ptrs = [], {}
    for power in (2, 4):
        for cols in (A, A - 0.5, A[:, :2].contiguous()):
            want = factored_power_sums(fac, g_mean, v, cols, power)
            got = factored_power_sums(fac, g_mean, v, cols, power, cache=cache)
            assert torch.equal(got, want)
            kept.append((got, got.clone()))
            for slot, buf in cache._scratch.items():
                assert got.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
                ptrs.setdefault(slot, set()).add(buf.data_ptr())
    assert lf.POWER_SUMS_F32_COUNTS[(2, "float64")] > 0 and lf.POWER_SUMS_F32_COUNTS[(2, "float32")] > 0
    assert all(torch.equal(g, c) for g, c in kept)  # later calls left earlier results alone
    # ("prod": the float64 quotient before the float32 operand, where lf.FUSED_S32 is off)
    assert {"scaled", "S32"} <= set(ptrs) and ("prod" in ptrs) == (not lf.FUSED_S32)
    assert all(len(p) == 1 for p in ptrs.values())  # one buffer per slot (the first call's largest)
    none = lf.PowerCache(budget=0)
    assert torch.equal(factored_power_sums(fac, g_mean, v, A, 2, cache=none), factored_power_sums(fac, g_mean, v, A, 2))
    assert none._scratch == {}


@pytest.mark.parametrize("shape", [(48, 64, 13), (3, 7, 5), (1, 1, 1), (5, 64, 1)])
def test_the_blocked_column_maximum_is_amax(shape):
    """ps33: the power-of-two scale of ``S`` takes each column's maximum over ``[rows / k, k M]``
    blocks (``_leading_max``): exactly ``amax`` over the leading dimensions, whatever the number of
    rows (not a multiple of 64 too), with a NaN propagated and a non-contiguous ``S`` handled."""
    from mis_lightning.estimation.linear_factors import _leading_max

    S = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_leading_max(S, (0, 1)), S.amax((0, 1), keepdim=True))
    T = S.permute(1, 0, 2)  # not contiguous
    assert torch.equal(_leading_max(T, (0, 1)), T.amax((0, 1), keepdim=True))
    S.view(-1)[S.numel() // 2] = float("nan")
    assert bool(_leading_max(S, (0, 1)).isnan().any())


@pytest.mark.parametrize("power", [2, 4])
def test_float32_sums_form_S_on_the_gemm_rows_only(monkeypatch, power):
    """pw34 (F32_ON_LIVE_ROWS): a float32 call forms ``S = A / V^(p/2)`` on the output rows that
    reach its GEMMs only (the held ``scaled`` buffer has the non-silent rows, not the chunk's) and
    takes the a = 0 term by one GEMV over ``A``. Against the materialised float64 sums: within the
    1e-4 the bound admits; against the path before (switch off): the same records fall back and
    the sums agree to 1e-12 relative (the GEMMs' operands are the same up to powers of two; the
    a = 0 term rounds in another order, ~1e-16 of it); dead weights in live rows, an infinite
    column entry on a dead weight (the product form's exact zero kept: finite sums), an all-silent
    chunk (the a = 0 term alone: sum_j gb_j^p A_j / v_j^(p/2))."""
    import mis_lightning.estimation.linear_factors as lf

    fac, g_mean, v, A, silent, gr = _partly_silent_case()
    g_mean, v = gr.mean(0) + 0.25 * (torch.arange(48 * 64) % 7 == 0), gr.var(0, unbiased=False) + 0.5
    v[64 * 9: 64 * 10: 3] = 0.0  # dead weights in a live row
    A[64 * 9] = float("inf")  # ... one of them with an infinite entry: no influence, no NaN
    shapes = []
    real_scratch = lf.PowerCache.scratch

    def spy(self, slot, shape, dtype, device="cpu"):
        if slot == "scaled":
            shapes.append(tuple(shape))
        return real_scratch(self, slot, shape, dtype, device)

    monkeypatch.setattr(lf.PowerCache, "scratch", spy)
    got, counts = {}, {}
    for on in (False, True):
        monkeypatch.setattr(lf, "F32_ON_LIVE_ROWS", on)
        monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
        shapes.clear()
        got[on] = factored_power_sums(fac, g_mean, v, A, power, cache=lf.PowerCache())
        counts[on] = dict(lf.POWER_SUMS_F32_COUNTS)
        assert shapes == [(48 * 64, 3) if not on else (int((~silent).sum()), 64, 3)]
    assert counts[True] == counts[False]
    assert bool(torch.isfinite(got[True]).all())
    torch.testing.assert_close(got[True], got[False], rtol=1e-12, atol=0.0)
    Af = torch.where(torch.isfinite(A), A, torch.zeros(()))  # the dead weight's entry counts 0
    ref = _reference(fac, g_mean, v, Af, power)
    torch.testing.assert_close(got[True], ref, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
    # every record falls back (terms that cancel): its float64 sums, the same a = 0 term as a float64 call
    fac40, g40, v40, A40 = _square_case(shift=40.0)
    fac40.d[:, silent] = 0.0
    gr = (fac40.d.unsqueeze(-1) * fac40.x.unsqueeze(1)).reshape(60, -1)
    g40, v40 = gr.mean(0) + 0.25 * (torch.arange(48 * 64) % 7 == 0), gr.var(0, unbiased=False) + 0.5
    for on in (False, True):
        monkeypatch.setattr(lf, "F32_ON_LIVE_ROWS", on)
        monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
        got[on] = factored_power_sums(fac40, g40, v40, A40, power)
        assert lf.POWER_SUMS_F32_COUNTS[(power, "float64")] == 60
        monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
        assert torch.equal(got[on], factored_power_sums(fac40, g40, v40, A40, power))
        monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset({2, 4}))
    # (the terms cancel ~1e6-fold here: the a = 0 term's ~1e-16 reads ~1e-9 of the sums)
    torch.testing.assert_close(got[True], got[False], rtol=1e-8, atol=0.0)
    torch.testing.assert_close(got[True], _reference(fac40, g40, v40, A40, power), rtol=1e-8, atol=0.0)
    quiet = LinearFactors(module="lin", weight="lin.weight", bias=None, x=fac.x, d=fac.d[:, 16:24])
    el = slice(16 * 64, 24 * 64)
    want = ((g_mean[el].pow(power) / v[el].pow(power / 2)).unsqueeze(-1) * A[el]).sum(0)
    torch.testing.assert_close(factored_power_sums(quiet, g_mean[el], v[el], A[el], power)[0], want, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("power", [2, 4])
def test_signed_columns_sum_their_nonzero_blocks_only(monkeypatch, power):
    """ps35: signed columns (the draws' parts, float64) whose ``S[o, :, m]`` blocks are mostly zero
    (a column on a few output rows, one all-zero) take the non-zero ``(o, m)`` pairs alone as GEMM
    columns (PACK_ZERO_BLOCKS): against the materialised influences to 1e-10 relative (the binomial
    expansion's float64 cancellation, as test_weights_without_gradient_variance_add_nothing), and
    against every pair (the switch off) to 1e-13 relative (each column's sum over its rows in another
    order); the zero column's sums exactly 0. Fewer GEMM columns reach the products (counted)."""
    import mis_lightning.estimation.linear_factors as lf

    g = torch.Generator().manual_seed(3)
    R, out_f, in_f, M = 30, 8, 16, 6
    x = torch.randn(R, in_f, generator=g, dtype=torch.float64)
    d = torch.randn(R, out_f, generator=g, dtype=torch.float64)
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False)
    A = torch.randn(out_f, in_f, M, generator=g, dtype=torch.float64)
    A[:, :, 0] = 0.0  # a part that moved nothing
    A[2:, :, 1] = 0.0  # a sample group's column: two rows
    A[:5, :, 2] = 0.0
    A[[0, 3, 4, 7], :, 3] = 0.0
    A = A.reshape(-1, M)
    widths: list[int] = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, b):
        if a.dim() == 2 and b.dim() == 2 and a.shape[1] == in_f:
            widths.append(b.shape[1])
        return real_mm(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    real_torch_mm = torch.mm

    def spy_mm(a, b, *args, **kw):  # the skinny GEMMs' transposed form (ps36): [N, in] @ [in, R]
        if a.dim() == 2 and b.dim() == 2 and a.shape[1] == in_f:
            widths.append(a.shape[0])
        return real_torch_mm(a, b, *args, **kw)

    monkeypatch.setattr(lf.torch, "mm", spy_mm)
    got = {}
    for pack in (False, True):
        monkeypatch.setattr(lf, "PACK_ZERO_BLOCKS", pack)
        widths.clear()
        got[pack] = factored_power_sums(fac, g_mean, v, A, power)
        if pack:
            assert widths and max(widths) == 8 * M - 8 - 6 - 5 - 4
    torch.testing.assert_close(got[True], _reference(fac, g_mean, v, A, power), rtol=1e-10, atol=0.0)
    torch.testing.assert_close(got[True], got[False], rtol=1e-13, atol=0.0)
    assert torch.equal(got[True][:, 0], torch.zeros(R, dtype=torch.float64))


def test_dense_signed_columns_are_not_packed():
    """A block pattern with more than PACK_FRACTION of its pairs non-zero keeps the dense layout
    (the gather would cost more than the pairs it leaves out)."""
    from mis_lightning.estimation.linear_factors import PACK_FRACTION, _nonzero_pairs

    S = torch.ones(4, 3, 2, dtype=torch.float64)
    assert _nonzero_pairs(S) is None
    S[:, :, 1] = 0.0
    S[1, 2, 1] = float("nan")  # NaN counts as non-zero
    o, m = _nonzero_pairs(S)
    assert 5 <= PACK_FRACTION * 8
    assert o.tolist() == [0, 1, 2, 3, 1] and m.tolist() == [0, 0, 0, 0, 1]


def _gemm_spy(monkeypatch):
    """Record the shapes of the ``torch.mm`` calls (the skinny float32 GEMMs' transposed form)."""
    import mis_lightning.estimation.linear_factors as lf

    seen: list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, bool]] = []
    real = torch.mm

    def mm(a, b, *args, **kw):
        seen.append((tuple(a.shape), tuple(b.shape), a.dtype, a.is_contiguous()))
        return real(a, b, *args, **kw)

    monkeypatch.setattr(lf.torch, "mm", mm)
    return seen


def _rectangular_case(R: int = 37, out_f: int = 5, in_f: int = 23, M: int = 3, shift: float = 0.0, seed: int = 3):
    """Every dimension different (a transposition or a reshape over the wrong axis shows), ``x``
    and ``d`` non-contiguous views (``[R, in]`` as the transpose of ``[in, R]``, every other
    column of a wider ``d``)."""
    g = torch.Generator().manual_seed(seed)
    x = (shift + torch.randn(in_f, R, generator=g, dtype=torch.float64)).T
    d = (shift + torch.randn(R, 2 * out_f, generator=g, dtype=torch.float64))[:, ::2]
    assert not x.is_contiguous() and not d.is_contiguous()
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    A = torch.rand(out_f * in_f, M, generator=g, dtype=torch.float64)
    return fac, gr.mean(0), gr.var(0, unbiased=False), A


@pytest.mark.parametrize("power", [2, 4])
def test_skinny_float32_gemms_are_transposed_and_within_the_bound(monkeypatch, power):
    """ps36: a float32 GEMM of at most SKINNY_GEMM_COLUMNS columns (``out * M``) is taken as
    ``B^T (x^a)^T`` (``[out * M, in] @ [in, R]``, B^T contiguous) with the contraction over the
    outputs on ``[out, M, R]``. With R, out, in, M all different and non-contiguous ``x``, ``d``:
    the transposed GEMMs are the ones run (one per term ``a >= 1``), every entry is within the
    1e-4 its bound admits of the materialised float64 sums (measured ~1e-7), and so are the plain
    GEMMs' (SKINNY_GEMM_TRANSPOSED False, or one column over the threshold: no transposed GEMM);
    both ways sum the same records in float32. A wrong axis order (``[M, out, R]``, the outputs'
    sum over ``M``) misses the reference by O(1)."""
    import mis_lightning.estimation.linear_factors as lf

    fac, g_mean, v, A = _rectangular_case()
    ref = _reference(fac, g_mean, v, A, power)
    R, out_f, in_f, M = 37, 5, 23, 3
    got, counts = {}, {}
    for label, on, cols in (("skinny", True, out_f * M), ("off", False, 128), ("wide", True, out_f * M - 1)):
        monkeypatch.setattr(lf, "SKINNY_GEMM_TRANSPOSED", on)
        monkeypatch.setattr(lf, "SKINNY_GEMM_COLUMNS", cols)
        monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(power, k): 0 for k in ("float32", "float64")})
        seen = _gemm_spy(monkeypatch)
        got[label] = factored_power_sums(fac, g_mean, v, A, power)
        counts[label] = dict(lf.POWER_SUMS_F32_COUNTS)
        transposed = [s for s in seen if s[:3] == ((out_f * M, in_f), (in_f, R), torch.float32) and s[3]]
        assert len(transposed) == (power if label == "skinny" else 0)
        torch.testing.assert_close(got[label], ref, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
    assert counts["skinny"] == counts["off"] == counts["wide"] == {(power, "float32"): R, (power, "float64"): 0}
    assert ((got["skinny"] - ref).abs() / ref).max() < 1e-5


@pytest.mark.parametrize("power", [2, 4])
def test_skinny_float32_gemms_on_silent_rows_and_cancelling_records(monkeypatch, power):
    """The transposed GEMMs over the non-silent output rows only (``keep``: 2 of 5 rows reach the
    GEMMs), with a tenth of the records far off (``d, x`` shifted by 40: the expanded terms cancel
    ~800x, power 4 ~10^5 x). The unguarded float32 sums of those records miss by more than 1e-4;
    the bound sends them to float64; every entry within 1e-4 of the materialised float64 sums,
    the far records' to 1e-9 (float64)."""
    import mis_lightning.estimation.linear_factors as lf

    fac, _, _, A = _rectangular_case()
    R = 37
    far = torch.arange(R) % 10 == 3
    x, d = fac.x.clone(), fac.d.clone()
    x[far] += 40.0
    d[far] += 40.0
    d[:, [0, 2, 3]] = 0.0  # silent rows
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    g_mean, v = gr[far].mean(0), gr.var(0, unbiased=False) + 0.5
    ref = _reference(fac, g_mean, v, A, power)
    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(power, k): 0 for k in ("float32", "float64")})
    seen = _gemm_spy(monkeypatch)
    got = factored_power_sums(fac, g_mean, v, A, power)
    assert [s[:2] for s in seen if s[2] == torch.float32] == [((2 * 3, 23), (23, R))] * power
    assert lf.POWER_SUMS_F32_COUNTS[(power, "float64")] >= int(far.sum())
    torch.testing.assert_close(got, ref, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
    torch.testing.assert_close(got[far], ref[far], rtol=1e-9 if power == 2 else 1e-6, atol=0.0)
    keep = torch.tensor([1, 4])
    S = (A / v.pow(power / 2).unsqueeze(-1)).reshape(5, 23, 3)
    gb = g_mean.reshape(5, 23)
    g0 = (S * gb.pow(power).unsqueeze(-1)).sum((0, 1))
    unguarded = lf._even_power_sums_f32(fac, gb, S, g0, power, rtol=float("inf"), keep=keep)[0]
    assert ((unguarded[far] - ref[far]).abs() / ref[far]).max() > lf.POWER_SUMS_F32_RTOL


@pytest.mark.parametrize("power", [2, 4])
def test_skinny_float32_gemms_over_a_wide_dynamic_range(monkeypatch, power):
    """Columns of ``A`` spanning 1e-30..1e30 by rows (the scales are per column: most of a column's
    entries are subnormal or zero in float32 against its largest), records' ``d`` and inputs'
    ``x`` scaled by 2^-40..2^40: every entry of the transposed GEMMs' sums within the 1e-4 its
    bound admits of the materialised float64 sums, or summed again in float64 where the bound
    says it is not."""
    import mis_lightning.estimation.linear_factors as lf

    fac, g_mean, v, A = _rectangular_case(seed=5)
    g = torch.Generator().manual_seed(7)
    R, out_f, in_f = 37, 5, 23
    A = A * torch.logspace(-30, 30, out_f * in_f, dtype=torch.float64)[torch.randperm(out_f * in_f, generator=g)].unsqueeze(-1)
    x = fac.x * torch.pow(2.0, torch.randint(-40, 41, (1, in_f), generator=g)).to(torch.float64)
    d = fac.d * torch.pow(2.0, torch.randint(-40, 41, (R, 1), generator=g)).to(torch.float64)
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False)
    seen = _gemm_spy(monkeypatch)
    got = factored_power_sums(fac, g_mean, v, A, power)
    assert any(s[:2] == ((out_f * 3, in_f), (in_f, R)) and s[2] == torch.float32 for s in seen)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(fac, g_mean, v, A, power), rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)


@pytest.mark.parametrize("sparse", [False, True])
def test_skinny_float64_sums_of_signed_columns_are_transposed(monkeypatch, sparse):
    """ps36: the float64 sums (signed columns: the draws' parts; the records whose float32 bound
    fails) take a GEMM of at most SKINNY_GEMM_COLUMNS columns transposed too, packed
    (``sparse``: most ``(o, m)`` blocks zero, PACK_ZERO_BLOCKS) or not. With R, out, in, M all
    different and non-contiguous ``x``, ``d``: the transposed float64 GEMMs run (one per term
    ``a >= 1``), and every entry is within 1e-12 of its column's scale (``sum_j w_rj^p |A_jm|``)
    of the materialised float64 sums, as the plain GEMMs' (switch off)."""
    import mis_lightning.estimation.linear_factors as lf

    fac, g_mean, v, A = _rectangular_case(seed=11)
    R, out_f, in_f, M = 37, 5, 23, 3
    A = A - 0.5  # signed: the float64 path
    if sparse:  # column m non-zero on output row m only: 3 of 15 blocks
        A = A.reshape(out_f, in_f, M) * torch.eye(out_f, M, dtype=torch.float64).unsqueeze(1)
        A = A.reshape(-1, M)
    w = ((fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(R, -1) - g_mean) / v.sqrt()
    for power in (2, 4):
        ref, scale = w.pow(power) @ A, w.pow(power) @ A.abs()
        got = {}
        for on in (True, False):
            monkeypatch.setattr(lf, "SKINNY_GEMM_TRANSPOSED", on)
            seen = _gemm_spy(monkeypatch)
            got[on] = factored_power_sums(fac, g_mean, v, A, power)
            n = 3 if sparse else out_f * M
            transposed = [s for s in seen if s[:3] == ((n, in_f), (in_f, R), torch.float64) and s[3]]
            assert len(transposed) == (power if on else 0)
            assert ((got[on] - ref).abs() / scale).max() < 1e-12


@pytest.mark.parametrize("f32", [True, False])
def test_skinny_gemms_with_every_output_row_silent(monkeypatch, f32):
    """No output row reaches the GEMMs (``d`` 0 on every record; the bound's and the signed
    columns' paths): the transposed form handles the empty ``[0, M, in]`` operand, and the sums
    are the ``a = 0`` term alone, bitwise those of the plain form."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "F32_ON_LIVE_ROWS", False)  # factored_power_sums' own keep path
    fac, g_mean, v, A = _rectangular_case(seed=13)
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=fac.x, d=torch.zeros_like(fac.d))
    if not f32:
        A = A - 0.5
    got = {}
    for on in (True, False):
        monkeypatch.setattr(lf, "SKINNY_GEMM_TRANSPOSED", on)
        got[on] = factored_power_sums(fac, g_mean, v + 1.0, A, 4)
    assert torch.isfinite(got[True]).all()
    assert torch.equal(got[True], got[False])


@pytest.mark.parametrize("M", [1, 2, 5, 13])
def test_the_zeroth_term_of_column_major_columns_is_the_row_major_gemv(M, monkeypatch):
    """ps37: a ``[numel, M]`` matrix stored column after column (assess.COLUMN_MAJOR_STACK, the
    transpose of ``[M, numel]``) takes the a = 0 term ``c @ A`` as one GEMV per unit-stride
    column, which sums each column as the GEMV over the row-major matrix does: bitwise the same
    ``[M]``. (One GEMV over the transposed matrix, a dot product per column and a ``[numel, 1]``
    slice with stride numel each round otherwise: the last measured up to 9e-15 relative on the
    1e7 MLP's second layer.) numel past MKL's blocking; entries over ten decades. With
    ``ZEROTH_TERM_GEMV`` (p47a: one GEMV over the transposed matrix) within 1e-13 relative instead
    (non-negative terms; measured ~1e-15)."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "ZEROTH_TERM_GEMV", False)

    g = torch.Generator().manual_seed(7)
    for numel in (4099, 2**18 + 3):
        A = torch.rand(numel, M, generator=g, dtype=torch.float64) * torch.logspace(-5, 5, numel, dtype=torch.float64)[:, None]
        Acm = _as_column_major(A)
        g_mean = torch.randn(numel, generator=g, dtype=torch.float64)
        vp = torch.rand(numel, 1, generator=g, dtype=torch.float64) + 0.1
        live = torch.ones(numel, dtype=torch.bool)
        for power in (2, 4):
            row = lf._zeroth_term(g_mean, A, vp, live, power, True)
            col = lf._zeroth_term(g_mean, Acm, vp, live, power, True)
            assert torch.equal(row, col), (numel, power)
            monkeypatch.setattr(lf, "ZEROTH_TERM_GEMV", True)
            torch.testing.assert_close(lf._zeroth_term(g_mean, Acm, vp, live, power, True), row, rtol=1e-13, atol=0.0)
            monkeypatch.setattr(lf, "ZEROTH_TERM_GEMV", False)


def _as_column_major(A: torch.Tensor) -> torch.Tensor:
    """``A``'s values stored column after column, strides ``(1, numel)`` (also for one column,
    where ``A.T.contiguous().T`` keeps unit strides)."""
    out = A.T.contiguous().as_strided(A.shape, (1, A.shape[0]))
    assert torch.equal(out, A) and out.stride() == (1, A.shape[0])
    return out


@pytest.mark.parametrize("path", ["f32", "f64", "signed", "bias", "silent", "dead"])
def test_column_major_columns_give_bitwise_the_same_sums(monkeypatch, path):
    """ps37: factored_power_sums of the same columns stored column after column (a ``[numel, M]``
    view with strides ``(1, numel)``, as assess._stacked passes them) gives bitwise the sums of
    the row-major matrix: on the float32 path (records falling back to float64 included), the
    float64 path, signed columns (packed blocks), a bias, silent output rows and dead rows (the
    gathered rows), with one held cache for both layouts (its scratch buffers shared)."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "ZEROTH_TERM_GEMV", False)  # (p47a's one GEMV: the a = 0 term within 1e-13)
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset() if path == "f64" else frozenset({2, 4}))
    fac, _, _, A, silent, gr = _partly_silent_case()
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False) + 0.5
    A = torch.cat([A, A[:, :1] * 3.0, torch.rand(A.shape[0], 9, dtype=torch.float64)], 1)  # 13 columns
    bias = path == "bias"
    if path not in ("silent", "dead"):
        fac.d[:, silent] = 1.0 + torch.rand(60, int(silent.sum()), dtype=torch.float64)  # every row live
        gr = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(60, -1)
        g_mean, v = gr.mean(0), gr.var(0, unbiased=False) + 0.5
    if path == "signed":
        A = A - 0.5
    if path == "dead":
        v = v.reshape(48, 64)
        v[silent] = 0.0
        v = v.reshape(-1)
    if bias:
        g_mean, v, A = fac.d.mean(0), fac.d.var(0, unbiased=False), A[:48]
    cache = lf.PowerCache()
    for power in (2, 4):
        for M in (1, 3, 13):
            a = A[:, :M].contiguous()
            row = factored_power_sums(fac, g_mean, v, a, power, bias=bias, cache=cache)
            col = factored_power_sums(fac, g_mean, v, _as_column_major(a), power, bias=bias, cache=cache)
            assert torch.equal(row, col), (path, power, M)


def test_a_chunks_calls_share_their_setup_bitwise(monkeypatch):
    """p48b: the calls of one chunk (the same ``d``, mean gradient and variances: powers 2 and 4, row
    weights, columns in groups) share the chunk's setup through the layer's PowerCache
    (SHARED_CHUNK_SETUP): every sum bitwise that of a call that computes its own (the switch off),
    on a chunk with dead, partly dead and silent rows and records that fall back to float64; the
    setup made once (the dead rows found by one call of the sequence); a mean gradient changed in
    place, or another chunk's tensors, read afresh (a stale setup gives other sums here)."""
    import mis_lightning.estimation.linear_factors as lf

    fac, _, _, A = _square_case(shift=0.0)
    far = torch.arange(60) % 10 == 3
    fac.x[far] += 40.0  # some records fall back to float64
    fac.d[far] += 40.0
    gr = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(60, -1)
    g_mean, v = gr[far].mean(0), gr.var(0, unbiased=False)  # the shifted records' terms cancel
    v = v.reshape(48, 64)
    v[[0, 5, 6]] = 0.0  # dead rows
    v[9, ::3] = 0.0  # a partly dead row
    v = v.reshape(-1)
    fac.d[:, [2, 11, 12]] = 0.0  # silent rows
    g = torch.Generator().manual_seed(5)
    A2 = torch.rand(48 * 64, 5, generator=g, dtype=torch.float64)
    A4 = torch.rand(48 * 64, 2, generator=g, dtype=torch.float64)
    rw = (torch.tensor([0, 0, 3]), torch.rand(48, 3, generator=g, dtype=torch.float64))
    calls = [(A2, 2, None), (A4, 4, None), (A2, 2, rw), (A2[:, 1:3], 2, None), (A4[:, :1], 4, None)]
    assert lf.POWER_SUMS_F32 == frozenset({2, 4})

    def run(shared: bool, cache: lf.PowerCache, g_mean: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        monkeypatch.setattr(lf, "SHARED_CHUNK_SETUP", shared)
        return [factored_power_sums(fac, g_mean, v, a, p, cache=cache, row_weights=w) for a, p, w in calls]

    dead_calls = []
    dead_rows = lf._dead_rows
    monkeypatch.setattr(lf, "_dead_rows", lambda *a: dead_calls.append(1) or dead_rows(*a))
    before = dict(lf.POWER_SUMS_F32_COUNTS)
    want = run(False, lf.PowerCache(), g_mean, v)
    for p in (2, 4):  # some records fell back, some did not
        assert lf.POWER_SUMS_F32_COUNTS[(p, "float64")] > before[(p, "float64")]
        assert lf.POWER_SUMS_F32_COUNTS[(p, "float32")] > before[(p, "float32")]
    assert len(dead_calls) == len(calls)
    dead_calls.clear()
    cache = lf.PowerCache()
    got = run(True, cache, g_mean, v)
    assert len(dead_calls) == 1  # made once, read by the other calls
    for w, o in zip(want, got):
        assert torch.equal(w, o)
    for w, (a, p, _) in zip(want, calls[:2]):
        torch.testing.assert_close(w, _reference(fac, g_mean, v, a, p), rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
    # the mean gradient changed in place (its version moves): the next calls read it afresh
    g_mean.mul_(3.0)
    want = run(False, lf.PowerCache(), g_mean, v)
    got = run(True, cache, g_mean, v)
    for w, o in zip(want, got):
        assert torch.equal(w, o)
    # another chunk's tensors (new objects, other values): afresh too
    v2 = v.clone()
    v2.reshape(48, 64)[[1, 2]] = 0.0
    want = run(False, lf.PowerCache(), g_mean, v2)
    got = run(True, cache, g_mean, v2)
    for w, o in zip(want, got):
        assert torch.equal(w, o)


def _exact_sums(fac: LinearFactors, g_mean: torch.Tensor, v: torch.Tensor, A: torch.Tensor, power: int) -> torch.Tensor:
    """``sum_j w_rj^p A_jm`` of the materialised influences, each entry an exact sum (``math.fsum`` of
    the float64 terms): the reference of the tolerance switches' tests (p49a)."""
    import math

    g = (fac.d.unsqueeze(-1) * fac.x.unsqueeze(1)).reshape(fac.d.shape[0], -1)
    w = torch.where(v > 0, -(g - g_mean) / v.clamp_min(1e-300).sqrt(), torch.zeros_like(g))
    terms = w.pow(power).unsqueeze(-1) * A.unsqueeze(0)  # [R, numel, M]
    return torch.tensor([[math.fsum(terms[r, :, m].tolist()) for m in range(A.shape[1])] for r in range(terms.shape[0])],
                        dtype=torch.float64)


def _fallbacks(fac: LinearFactors, g_mean: torch.Tensor, v: torch.Tensor, A: torch.Tensor, power: int,
               lf) -> tuple[torch.Tensor, int]:
    """The sums and the records summed in float64 of one call."""
    for k in lf.POWER_SUMS_F32_COUNTS:
        lf.POWER_SUMS_F32_COUNTS[k] = 0
    got = factored_power_sums(fac, g_mean, v, A, power)
    return got, lf.POWER_SUMS_F32_COUNTS[(power, "float64")]


def test_the_wide_fourth_power_tolerance_admits_float32_sums_within_it(monkeypatch):
    """``WIDE_FOURTH_POWER_RTOL`` (p49a, off by default): gradients of mean ~25 against a spread of ~5
    (d, x = 2 + N(0, 1)) make every record's fourth-power bound exceed 1e-4 (all 60 summed again in
    float64) but stay within 1e-3: with the switch on none falls back, and every entry is within
    ``POWER_SUMS_F32_RTOL_FOURTH`` of the exact sums (measured ~1e-6); the power-2 sums (which feed
    the leakage) keep their 1e-4 and the same records. Fails if the wider tolerance is not applied
    (the counts: checked, 60 records in float64 with it ignored)."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
    fac, g_mean, v, A = _square_case(shift=2.0)
    ref4, ref2 = _exact_sums(fac, g_mean, v, A, 4), _exact_sums(fac, g_mean, v, A, 2)
    assert not lf.WIDE_FOURTH_POWER_RTOL  # the current behaviour by default
    off4, n_off4 = _fallbacks(fac, g_mean, v, A, 4, lf)
    off2, n_off2 = _fallbacks(fac, g_mean, v, A, 2, lf)
    monkeypatch.setattr(lf, "WIDE_FOURTH_POWER_RTOL", True)
    on4, n_on4 = _fallbacks(fac, g_mean, v, A, 4, lf)
    on2, n_on2 = _fallbacks(fac, g_mean, v, A, 2, lf)
    assert (n_off4, n_on4) == (60, 0)
    assert n_on2 == n_off2 and torch.equal(on2, off2)
    torch.testing.assert_close(off4, ref4, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
    torch.testing.assert_close(on4, ref4, rtol=lf.POWER_SUMS_F32_RTOL_FOURTH, atol=0.0)
    torch.testing.assert_close(on2, ref2, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)


@pytest.mark.parametrize("power", [2, 4])
def test_the_bound_over_the_gemms_rows_holds_with_fewer_fallbacks(monkeypatch, power):
    """``F32_BOUND_GEMM_ROWS`` (p49a, off by default): 3 of 256 output rows non-zero on the scored
    records (the others silent, with gradient variance and a mean gradient of 0), d, x = 2 + N(0, 1):
    the bound's contraction over the outputs counted over those 3 rows (eps 49 u against 166 u with
    the layer's 256) sends fewer records to float64, and every entry is still within
    ``POWER_SUMS_F32_RTOL`` of the exact sums (power 2: 22 -> 0 records in float64, power 4: 59 -> 45).
    Fails if the switch changes nothing (the counts: checked with the layer's out kept)."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32_COUNTS", {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")})
    g = torch.Generator().manual_seed(2)
    R, out_f, in_f = 60, 256, 16
    x = 2.0 + torch.randn(R, in_f, generator=g, dtype=torch.float64)
    d = 2.0 + torch.randn(R, out_f, generator=g, dtype=torch.float64)
    gr = (d.unsqueeze(-1) * x.unsqueeze(1)).reshape(R, -1)
    g_mean, v = gr.mean(0), gr.var(0, unbiased=False)
    d[:, 3:] = 0.0  # silent on the scored records (the estimation's records gave them a variance)
    g_mean.view(out_f, in_f)[3:] = 0.0
    fac = LinearFactors(module="lin", weight="lin.weight", bias=None, x=x, d=d)
    A = torch.rand(out_f * in_f, 3, generator=g, dtype=torch.float64)
    ref = _exact_sums(fac, g_mean, v, A, power)
    assert not lf.F32_BOUND_GEMM_ROWS
    off, n_off = _fallbacks(fac, g_mean, v, A, power, lf)
    monkeypatch.setattr(lf, "F32_BOUND_GEMM_ROWS", True)
    on, n_on = _fallbacks(fac, g_mean, v, A, power, lf)
    assert n_on < n_off
    for got in (off, on):
        torch.testing.assert_close(got, ref, rtol=lf.POWER_SUMS_F32_RTOL, atol=0.0)
