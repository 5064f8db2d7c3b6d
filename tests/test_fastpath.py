"""Optimised cell-moment paths against their references, and the self-check that guards them.

The agreement matrix (threads 1 and 2, float32 and float64 inputs, compilation on and off,
fine / table / two-edge / clamped regimes, int8 and int4 code ranges interleaved in one
process) runs in the test process: first at 1 thread, then at 2 with the compiled kernels
built again (inductor bakes the thread count into
its C++ kernels, ``#pragma omp parallel num_threads(N)``; torch 2.13's dynamo also recompiles
at a new thread count, measured by mm32, but the test does not rely on it); the caller's thread count is restored after (tc38: it
was a subprocess, whose start, imports and inductor set-up were ~5 of the test's ~16 CPU s, paid
again by the in-process compile tests below). Tolerances: compiled against eager 1e-6 (the same arithmetic: only rounding may
differ; measured 0) and codes exactly; eager fused kernel against exact cell sums within
``fastpath.APPROXIMATION`` (the (h, t) table's interpolation error, measured 4.5e-5 in kappa).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from test_affine_fine_mean_abs import GRIDS as FINE_GRIDS
from torch import nn

import mis_lightning.functional.affine as A
import mis_lightning.functional.bounds as B
import mis_lightning.functional.grids as G
import mis_lightning.functional.kernel as K
import mis_lightning.functional.table as T
from mis_lightning.functional import fastpath

F64 = torch.float64
ALWAYS, NEVER = G.CompilePolicy("always"), G.CompilePolicy("never")
ROOT = Path(__file__).resolve().parents[1]

def log_uniform(n, lo, hi, gen):
    return torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(lo), math.log(hi), generator=gen))


def case(regime, bits, seed, c=40000):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if regime == "issue":  # the report's example: int8, scale 0.01, sd 0.005 (step 2 sd)
        theta = torch.randn(65536, generator=gen, dtype=F64) * 0.3
        scale = torch.full_like(theta, 0.01)
        return theta, scale / 2.0, scale, torch.zeros_like(theta), -128, 127
    lo, hi = {"fine": (0.05, 0.5), "table": (0.5, 19.0), "two_edge": (19.0, 200.0), "clamped": (0.05, 60.0)}[regime]
    scale = log_uniform(c, 1e-3, 1.0, gen)
    sigma = scale / log_uniform(c, lo, hi, gen)
    zp = torch.randint(-1, 2, (c,), generator=gen).to(F64)
    spread = 1.6 * qmax if regime == "clamped" else 0.8 * qmax
    theta = torch.empty(c, dtype=F64).uniform_(-spread, spread, generator=gen) * scale
    return theta, sigma, scale, zp, qmin, qmax


def run(args, mode):
    return G.affine_cell_moments(*args, compile_policy=G.CompilePolicy.parse(mode))


def kernel_codes(args, compiled):
    th, sg, s, zp, qmin, qmax = (a.to(F64) if torch.is_tensor(a) else a for a in args)
    lo, dlog, du, table = G._uniform_table()
    b = tuple(torch.tensor(float(v), dtype=F64) for v in (qmin, qmax, lo, dlog, du)) + (table,)
    k = G._FUSED_STATE["compiled_codes"] if compiled else G._fused_affine_codes
    return k(th, sg, s, zp, *b)


def agreement_matrix(thread_counts):
    """``{"threads{n}/{regime}/int{bits}/{dtype}": figures}`` for every case at each thread count."""
    out, refs = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a self-check failure fails the matrix
        for threads in thread_counts:
            torch.set_num_threads(threads)
            # the compiled kernels are built again at this thread count (see the module docstring)
            torch._dynamo.reset()
            G._FUSED_STATE.update(compiled=None, compiled_codes=None)
            seed = 0
            for regime in ("issue", "fine", "table", "two_edge", "clamped"):
                for bits in ((8,) if regime == "issue" else (8, 4)):
                    for dtype in (torch.float32, torch.float64):
                        seed += 1
                        args = tuple(a.to(dtype) if torch.is_tensor(a) else a for a in case(regime, bits, seed))
                        eager, comp = run(args, "0"), run(args, "1")
                        # the exact cell sums of the same inputs at any thread count: computed once,
                        # on every 4th element (10,000 per case, 16,384 for the issue example: the
                        # log-uniform h and the positions stay as dense as the interpolation table's
                        # error varies: per case, the largest kappa error on them is 0.80-1.00 of
                        # the largest on all; the full 40,000 were 8.7 of the matrix's 17.6 CPU s)
                        if seed not in refs:
                            refs[seed] = G.affine_reference_moments(*(a[::4] if torch.is_tensor(a) else a
                                                                      for a in args))
                        ref = refs[seed]
                        ke, kc = kernel_codes(args, False), kernel_codes(args, True)
                        th, sg, s = (a.to(F64) for a in args[:3])
                        h = s / sg
                        out[f"threads{threads}/{regime}/int{bits}/{str(dtype)[6:]}"] = {
                            "threads": torch.get_num_threads(),
                            "compiled_vs_eager": max(float((getattr(comp, n) - getattr(eager, n)).abs().max())
                                                     for n in ("kappa", "mean_abs", "m4")),
                            "codes_off": int((ke[4] != kc[4]).sum()),
                            "ok_off": int((ke[3] != kc[3]).sum()),
                            "kernel_vs_eager": max(float((a - b).abs().max()) for a, b in zip(kc[:3], ke[:3])),
                            "vs_reference": fastpath.compare(
                                (eager.kappa[::4], eager.mean_abs[::4], eager.m4[::4]),
                                (ref.kappa, ref.mean_abs, ref.m4), h[::4], fastpath.APPROXIMATION),
                            "compiled": G._FUSED_STATE["compiled_codes"] is not None and not G._FUSED_STATE["failed"],
                        }
    return out


@pytest.fixture(autouse=True)
def fresh_guard(monkeypatch):
    """Each test sees first-use checks, and its compiled-kernel state is undone afterwards."""
    fastpath.GUARD.reset()
    for key in ("compiled", "compiled_codes"):
        monkeypatch.setitem(G._FUSED_STATE, key, None)
    monkeypatch.setitem(G._FUSED_STATE, "failed", False)
    monkeypatch.setitem(B._SPLIT_STATE, "compiled", None)
    monkeypatch.setitem(B._SPLIT_STATE, "failed", False)
    yield
    fastpath.GUARD.reset()


def test_agreement_matrix_compiled_eager_reference(monkeypatch):
    """Both thread counts in this process, one after the other (the reference sums once per
    case); each thread count compiles its own kernels (dynamo's caches are reset first). The
    process's state is restored afterwards: the thread count, the kernels' element count (the
    "auto" policy reads it) and, by the fixture, the compiled kernels and the self-check."""
    monkeypatch.setitem(G._FUSED_STATE, "elements", G._FUSED_STATE["elements"])
    before = torch.get_num_threads()
    try:
        results = agreement_matrix((1, 2))
    finally:
        torch._dynamo.reset()  # no kernel compiled at 2 threads is left to this process's other tests
        torch.set_num_threads(before)
    # per thread count: issue example x 2 dtypes + 4 regimes x 2 ranges x 2 dtypes
    assert len(results) == 36
    for key, r in results.items():
        assert r["threads"] == int(key.split("/")[0][len("threads"):]), key
        assert r["compiled"], key  # the compiled kernel ran and was never disabled
        assert r["compiled_vs_eager"] <= 1e-6, (key, r)
        assert r["kernel_vs_eager"] <= 1e-6, (key, r)
        assert r["codes_off"] == 0 and r["ok_off"] == 0, (key, r)
        assert r["vs_reference"] is None, (key, r)


def test_compiled_kernel_on_a_large_clamped_chunk_equals_eager(monkeypatch):
    """torch.compile of the fused kernel gives the eager numbers on tests/test_grids.py's large
    int4 chunk (zero points -3..3, h up to 60, positions past both clamped ends: the elements
    recomputed exactly after the kernel). Moved here from test_grids.py by t54: this process
    compiles anyway (the fixture above resets the kernels, so it compiles its own)."""
    from test_grids import large_clamped_chunk

    monkeypatch.setitem(G._FUSED_STATE, "elements", G._FUSED_STATE["elements"])  # the "auto" policy reads it
    theta, sigma, scale, zp, _ = large_clamped_chunk()
    eager = G.affine_cell_moments(theta, sigma, scale, zp, -8, 7, compile_policy=NEVER)
    compiled = G.affine_cell_moments(theta, sigma, scale, zp, -8, 7, compile_policy=ALWAYS)
    assert G._FUSED_STATE["compiled_codes"] is not None and not G._FUSED_STATE["failed"]
    for name in ("kappa", "mean_abs", "m4"):
        assert torch.allclose(getattr(compiled, name), getattr(eager, name), rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("h", [0.01, 0.1, 0.3, 0.45, 0.5])
@pytest.mark.parametrize("grid", sorted(FINE_GRIDS))
def test_compiled_fine_mean_abs_against_every_cell(grid, h, monkeypatch):
    """tests/test_affine_fine_mean_abs.py's check on the compiled fused kernel (moved here by t54:
    this process compiles anyway): ``mean_abs`` within 1e-14 of 40-digit sums over every cell."""
    from test_affine_fine_mean_abs import check_fine_mean_abs

    monkeypatch.setitem(G._FUSED_STATE, "elements", G._FUSED_STATE["elements"])  # the "auto" policy reads it
    check_fine_mean_abs(grid, h, monkeypatch, modes=("always",), small=False)


@pytest.mark.parametrize("h", [0.01, 0.3, 0.5])
def test_compiled_fine_mean_abs_was_off_with_the_expansion(h, monkeypatch):
    """The same file's switch-off check (``kernel.EXACT_AFFINE_MEAN_ABS``) on the compiled kernel."""
    from test_affine_fine_mean_abs import check_expansion_was_off

    monkeypatch.setitem(G._FUSED_STATE, "elements", G._FUSED_STATE["elements"])  # the "auto" policy reads it
    check_expansion_was_off(h, monkeypatch, modes=("always",), small=False)


def _chunk(bits: int, seed: int, c: int = G.TABLE_MIN_ELEMENTS + 4000):
    gen = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    scale = torch.full((c,), 0.01, dtype=F64)
    theta = torch.empty(c, dtype=F64).uniform_(-1.3 * (qmax + 1), 1.3 * (qmax + 1), generator=gen) * scale
    sigma = scale / torch.empty(c, dtype=F64).uniform_(0.3, 30.0, generator=gen)
    return theta, sigma, scale, torch.zeros(c, dtype=F64), -qmax - 1, qmax


def test_compiled_kernel_follows_the_code_range_of_each_call(monkeypatch):
    """The trigger of the wrong numbers: one compiled kernel called for int8, then int4.
    Inductor folded the clamp bounds of the first call into constants (no guard), so the int4
    codes came out clamped to -128..127. Scalars now enter as tensors."""
    lo, dlog, du, table = G._uniform_table()
    kernel, compiled = G._fused_kernel(1, with_codes=False, policy=ALWAYS)
    assert compiled
    for bits in (8, 4, 8, 2):
        th, sg, s, zp, qmin, qmax = _chunk(bits, seed=bits)
        b = tuple(torch.tensor(float(v), dtype=F64) for v in (qmin, qmax, lo, dlog, du)) + (table,)
        got, want = kernel(th, sg, s, zp, *b), G._fused_affine_codes(th, sg, s, zp, *b)
        assert torch.equal(got[4], want[4]), f"int{bits}: codes off by {float((got[4] - want[4]).abs().max())}"
        assert float(got[4].max()) == qmax and float(got[4].min()) == qmin
        for a, e in zip(got[:4], want[:4]):  # raw kernel: m4 is NaN where ok is False (recomputed later)
            torch.testing.assert_close(a, e, rtol=0.0, atol=1e-9, equal_nan=True)  # rounding only


def test_public_path_with_compilation_after_another_code_range(monkeypatch):
    """End to end: affine_cell_moments for int8 then int4 with compilation on gives the eager
    values (and no self-check warning, since the kernel is now right)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        G.affine_cell_moments(*_chunk(8, seed=1), compile_policy=ALWAYS)
        args = _chunk(4, seed=2)
        compiled = G.affine_cell_moments(*args, compile_policy=ALWAYS)
    eager = G.affine_cell_moments(*args, compile_policy=NEVER)
    for n in ("kappa", "mean_abs", "m4"):
        assert float((getattr(compiled, n) - getattr(eager, n)).abs().max()) <= 1e-10, n


def _broken_codes(*args):
    """The fused kernel with the bug as it was seen: codes clamped to the int8 range."""
    th, sg, s, zp, qmin, qmax, lo, dlog, du, table = args
    wide = tuple(torch.tensor(v, dtype=F64) for v in (-128.0, 127.0))
    return G._fused_affine_codes(th, sg, s, zp, *wide, lo, dlog, du, table)


def test_self_check_catches_a_wrong_compiled_kernel_and_falls_back(monkeypatch):
    monkeypatch.setitem(G._FUSED_STATE, "compiled_codes", _broken_codes)
    args = _chunk(4, seed=3)
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match=r"torch.compile'd cell-moment kernel disagrees with its reference"):
        got = G.affine_cell_moments(*args, compile_policy=ALWAYS)
    assert torch.equal(torch.get_rng_state(), rng)  # the sample never touches the caller's RNG
    assert G.COMPILED_PATH in fastpath.GUARD.disabled
    fastpath.GUARD.reset()
    want = G.affine_cell_moments(*args, compile_policy=NEVER)
    for n in ("kappa", "mean_abs", "m4"):
        assert torch.equal(getattr(got, n), getattr(want, n)), n


def test_compiled_kernel_is_checked_again_for_a_new_code_range_at_the_same_size(monkeypatch):
    """The compiled kernel's bug as it happened: right for the first call's code range (int8),
    whose bounds it then kept for an int4 call of the same chunk size. That call was not checked
    (the compiled path's per-size check had seen the size, the fused path's sampled check comes
    every RECHECK_EVERY calls): codes and kappa silently wrong. Now each new code range (and
    kernel, device) at a size is checked: a warning, and the eager kernel's numbers."""
    first: dict[str, tuple] = {}

    def folding(th, sg, s, zp, qmin, qmax, *rest):  # keeps the bounds of its first call
        return G._fused_affine_codes(th, sg, s, zp, *first.setdefault("range", (qmin, qmax)), *rest)

    monkeypatch.setitem(G._FUSED_STATE, "compiled_codes", folding)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        G.affine_cell_moments(*_chunk(8, seed=3), compile_policy=ALWAYS)  # right: passes its check
    args = _chunk(4, seed=3)
    with pytest.warns(RuntimeWarning, match=r"torch.compile'd cell-moment kernel disagrees"):
        got = G.affine_cell_moments(*args, compile_policy=ALWAYS)
    want = G.affine_cell_moments(*args, compile_policy=NEVER)
    for n in ("kappa", "mean_abs", "m4"):
        assert torch.equal(getattr(got, n), getattr(want, n)), n


def test_self_check_records_the_compiled_kernels_agreement_for_benchmarks(monkeypatch):
    """What benchmarks/scale.py prints as the compiled kernels' agreement with eager: the largest
    |compiled - eager| the self-check saw, per path and thread count. A compiled kernel that is
    the eager arithmetic reads 0; the kernel with the int4 clamp bug reads its error (kappa off
    by more than 1e-6), recorded before the path is disabled."""
    monkeypatch.setitem(G._FUSED_STATE, "compiled_codes", G._fused_affine_codes)  # exact stand-in
    args = _chunk(4, seed=3)
    G.affine_cell_moments(*args, compile_policy=ALWAYS)
    key = (G.COMPILED_PATH, torch.get_num_threads())
    assert fastpath.GUARD.observed[key][0] == 0.0 and fastpath.GUARD.observed[key][1] > 0
    fastpath.GUARD.reset()
    monkeypatch.setitem(G._FUSED_STATE, "compiled_codes", _broken_codes)
    with pytest.warns(RuntimeWarning, match="disagrees"):
        G.affine_cell_moments(*args, compile_policy=ALWAYS)
    assert fastpath.GUARD.observed[key][0] > 1e-6


def _split_args(c: int = 4096) -> tuple:
    """``_apply_split``'s arguments (before the policy) for an int4-like bounded grid: every
    element's outer cell cut at 6.5 of 7 steps, sd half a unit."""
    gen = torch.Generator().manual_seed(2)
    th = torch.rand(c, generator=gen, dtype=F64) * 2 - 1
    sg = torch.full((c,), 0.5, dtype=F64)
    s = torch.full((c,), 1 / 7, dtype=F64)
    mm = A._affine_cell_moments_sparse(th, sg, s, torch.zeros(c, dtype=F64), -8, 7)
    return (mm, torch.ones(c, dtype=torch.bool), th, sg, 6.5 * s, 7 * s, True)


def test_self_check_catches_a_wrong_compiled_split_and_falls_back(monkeypatch):
    """The compiled outer-cell split of bounded grids is checked against its eager arithmetic
    like the kernel: a wrong one (kappa 1% high) is disabled with a warning and the chunk
    recomputed eagerly."""
    def broken(*args):
        k, lam, m4 = B._split_chunk(*args)
        return k * 1.01, lam, m4

    monkeypatch.setitem(B._SPLIT_STATE, "compiled", broken)
    args = _split_args()
    mm = args[0]
    with pytest.warns(RuntimeWarning, match=r"outer-cell split of bounded grids disagrees"):
        got = B._apply_split(*args, ALWAYS)
    assert B.SPLIT_COMPILED_PATH in fastpath.GUARD.disabled
    want = B._apply_split(*args, NEVER)
    assert torch.equal(got.kappa, want.kappa) and not torch.equal(want.kappa, mm.kappa)


def test_compiled_split_self_check_reads_nan_in_both_as_agreement(monkeypatch):
    """An input moment left NaN upstream (not computed) goes through the compiled and the eager
    split alike: NaN in both is agreement, not a kernel fault, so the compiled path stays on
    (before: "m4 nan against the reference nan" disabled it for the process, seen at 1e7 by pf32).
    The stand-in compiled kernel is the eager arithmetic itself."""
    monkeypatch.setitem(B._SPLIT_STATE, "compiled", B._split_chunk)
    args = _split_args()
    args[0].m4[::3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = B._apply_split(*args, ALWAYS)
    assert B.SPLIT_COMPILED_PATH not in fastpath.GUARD.disabled
    want = B._apply_split(*args, NEVER)
    assert torch.equal(got.kappa, want.kappa)
    assert torch.equal(torch.isnan(got.m4), torch.isnan(want.m4)) and bool(torch.isnan(got.m4).any())


def test_self_check_catches_a_wrong_eager_kernel_and_uses_the_cell_sums(monkeypatch):
    original = G._fused_affine_codes

    def table_off(*args):  # the fused kernel with a corrupted table read: kappa 1% high
        k, lam, m4, ok, q = original(*args)
        return k * 1.01, lam, m4, ok, q

    monkeypatch.setattr(K, "_fused_affine_codes", table_off)
    args = _chunk(8, seed=4)
    with pytest.warns(RuntimeWarning, match=r"fused cell-moment kernel .* disagrees .*kappa"):
        got = G.affine_cell_moments(*args, compile_policy=NEVER)
    want = G._affine_cell_moments_sparse(*args)
    assert torch.equal(got.kappa, want.kappa)
    assert G.FUSED_PATH in fastpath.GUARD.disabled
    again = G.affine_cell_moments(*args, compile_policy=NEVER)  # disabled for the process: no second warning needed
    assert torch.equal(again.kappa, want.kappa)


def test_self_check_of_the_per_regime_and_float_format_paths(monkeypatch):
    """A wrong fine-grid shortcut (here: kappa of the expansion 1% low) is caught in the
    per-regime path and in the float-format path; exact sums are used instead."""
    real_fine = G.fine_grid_moments

    def fine_off(h, lower=None, upper=None):
        m = real_fine(h, lower, upper)
        off = torch.where(h > G.REFERENCE_FINE_STEP, 0.99, 1.0)  # the reference's tiny steps stay right
        return type(m)(kappa=m.kappa * off, mean_abs=m.mean_abs, m4=m.m4, coverage=m.coverage)

    for module in (A, T):  # the per-regime (affine) and float-format (table) paths
        monkeypatch.setattr(module, "fine_grid_moments", fine_off)
    gen = torch.Generator().manual_seed(6)
    c = 3000
    scale = torch.full((c,), 0.01, dtype=F64)
    theta = torch.empty(c, dtype=F64).uniform_(-1.0, 1.0, generator=gen)
    sigma = scale / torch.empty(c, dtype=F64).uniform_(0.1, 0.5, generator=gen)  # fine steps
    zp = torch.zeros(c, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"per-regime cell sums .* disagrees"):
        got = G.affine_cell_moments(theta, sigma, scale, zp, -128, 127)
    ref = G.affine_reference_moments(theta, sigma, scale, zp, -128, 127)
    assert torch.equal(got.kappa, ref.kappa)

    values = torch.linspace(-4.0, 4.0, 4097, dtype=F64)  # a uniform "float" table of step 1/512
    th = torch.empty(c, dtype=F64).uniform_(-2.0, 2.0, generator=gen)
    sg = torch.full((c,), 0.01, dtype=F64)  # step 0.195 sd: the fine shortcut
    # the fault reaches both float-format shortcuts: the closed-form fast path is caught first and
    # falls back to the cell sums, which are caught next; both warnings are recorded here, so a
    # plain `pytest` does not show a newcomer "disagrees with its reference on this machine" (nux57)
    with pytest.warns(RuntimeWarning) as caught:
        got_t = G.table_cell_moments(th, sg, values, torch.ones(c, dtype=F64))
    said = [str(w.message) for w in caught]
    assert any(re.search(r"float-format cell sums .* disagrees", m) for m in said), said
    assert all(re.search(r"float-format (fast path|cell sums) .* disagrees", m) for m in said), said
    ref_t = G.table_reference_moments(th, sg, values, torch.ones(c, dtype=F64))
    assert torch.equal(got_t.kappa, ref_t.kappa)
    assert abs(float(ref_t.kappa.mean()) - (1 - 0.195 ** 2 / 12)) < 1e-3


def test_checks_are_quiet_and_cheap_on_correct_paths():
    """Correct paths pass their first-use checks silently and are then sampled only every
    RECHECK_EVERY calls."""
    args = _chunk(8, seed=7, c=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(3):
            G.affine_cell_moments(*args)
    key = (G.SPARSE_PATH, torch.get_num_threads())
    assert fastpath.GUARD.sample_size(*key[:1], 5000) == 0  # 4th call: no check
    assert not fastpath.GUARD.disabled


def test_sample_indices_cover_both_ends_and_every_stratum():
    c = 100_000
    rare = torch.zeros(c, dtype=torch.bool)
    rare[[17, 5000, 77_777]] = True
    idx = fastpath.sample_indices(c, 512, [rare, ~rare])
    assert idx.numel() <= 512 and bool((idx[1:] > idx[:-1]).all())
    assert {0, c - 1, 17, 5000, 77_777} <= set(idx.tolist())
    assert torch.equal(idx, fastpath.sample_indices(c, 512, [rare, ~rare]))  # deterministic
    assert math.isclose(float(fastpath.sample_indices(10, 512).numel()), 10)


def _tiny_net_and_data():
    """A Linear(256, 128) layer (32,768 weights: one chunk of the fused kernel's size)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    x = torch.randn(64, 256)
    y = x[:, :4].sum(-1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    return net, loader, lambda out, t: 0.5 * (out.squeeze(-1) - t) ** 2


def test_compile_is_warmed_up_before_the_scoring_pass_and_shown(monkeypatch):
    """compile="always": the kernel is built by torch.compile and checked against the eager
    kernel during a ("compile", 0) -> ("compile", 1) progress stage, before the cell-moment pass
    starts; a second call in the same process does not compile again.

    torch.compile is replaced by a recording pass-through: this tests when the library
    compiles and checks, not inductor (the agreement matrix above runs the real compiler; a
    real compilation takes 4-85 s on the shared 2-core machine)."""
    import importlib

    import mis_lightning as ml
    from mis_lightning.progress import STAGE_LABELS

    assess_mod = importlib.import_module("mis_lightning.assess")  # the package exports assess()
    events: list = []

    def fake_compile(fn, **kw):
        events.append(("torch.compile", fn.__name__))

        def compiled(*a, **k):
            events.append(("compiled kernel ran", fn.__name__))
            return fn(*a, **k)
        return compiled

    real = assess_mod._joint_sums

    def joint_sums(*a, **k):
        events.append("pass")
        return real(*a, **k)

    def progress(stage, completed):
        if stage == "compile":
            events.append((stage, completed, fastpath.GUARD.is_checked(G.COMPILED_PATH)))

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(assess_mod, "_joint_sums", joint_sums)
    net, loader, loss = _tiny_net_and_data()
    ml.assess(net, ["rtn_int8"], loader, loss, estimation="diagonal", num_records=16,
              uncertainty_draws=0, compile="always", progress=progress)
    first = events.index(("compile", 0, False))
    done = events.index(("compile", 1, True))  # checked against eager when the stage ends
    built = {e[1] for e in events[first:done] if e[0] == "torch.compile"}
    ran = {e[1] for e in events[first:done] if e[0] == "compiled kernel ran"}
    # the cell-moment kernel's two variants and the outer-cell split of bounded (absmax) grids
    assert built == ran == {"_fused_affine", "_fused_affine_codes", "_split_chunk"}, events
    assert events.index("pass") > done
    assert STAGE_LABELS["compile"] == "compiling the cell-moment kernel (once per process)"
    events.clear()
    ml.assess(net, ["rtn_int8"], loader, loss, estimation="diagonal", num_records=16,
              uncertainty_draws=0, compile="always", progress=progress)
    assert not [e for e in events if e[0] in ("compile", "torch.compile")], events


def test_the_warm_up_runs_at_the_thread_count_of_the_pass(monkeypatch):
    """On an oversubscribed machine without a passive OpenMP wait the scoring pass runs on one
    thread (threads.scoring_threads). The warm-up compiles and checks the kernel at the thread
    count the pass will use: torch 2.13's dynamo guards on it (a kernel used at another count is
    compiled again, mid-call) and inductor bakes it into the generated loops, so a kernel warmed
    up at the caller's 2 threads was compiled again inside the pass at 1 (mm32). Recording
    pass-through compile, as above; the thread count of every compiled run is recorded."""
    import importlib

    import mis_lightning as ml
    import mis_lightning.threads as TH

    assess_mod = importlib.import_module("mis_lightning.assess")
    events: list = []

    def fake_compile(fn, **kw):
        def compiled(*a, **k):
            events.append(("ran", torch.get_num_threads()))
            return fn(*a, **k)
        return compiled

    real = assess_mod._joint_sums

    def joint_sums(*a, **k):
        events.append(("pass", torch.get_num_threads()))
        return real(*a, **k)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(assess_mod, "_joint_sums", joint_sums)
    monkeypatch.setattr(TH, "_oversubscribed", lambda: True)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    net, loader, loss = _tiny_net_and_data()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ml.assess(net, ["rtn_int8"], loader, loss, estimation="diagonal", num_records=16,
                  uncertainty_draws=0, compile="always",
                  progress=lambda s, c: events.append((s, c, torch.get_num_threads())) if s == "compile" else None)
        assert torch.get_num_threads() == 2  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
    start, end = events.index(("compile", 0, 1)), events.index(("compile", 1, 1))
    assert ("pass", 1) in events[end:], events
    assert {e for e in events[start:end] if e[0] == "ran"} == {("ran", 1)}, events


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_no_compile_stage_when_the_policy_will_not_compile(mode):
    """"never", and "auto" below its threshold (COMPILE_AFTER = 1e8 elements): no compile stage, nothing compiled."""
    import mis_lightning as ml

    events: list = []
    net, loader, loss = _tiny_net_and_data()
    ml.assess(net, ["rtn_int8"], loader, loss, estimation="diagonal", num_records=16,
              uncertainty_draws=0, compile=mode, progress=lambda s, c: events.append(s))
    assert "compile" not in events
    assert G._FUSED_STATE["compiled"] is None and G._FUSED_STATE["compiled_codes"] is None
    assert B._SPLIT_STATE["compiled"] is None


def test_auto_policy_warms_up_when_the_pass_crosses_the_threshold():
    """"auto" with a pass that takes the process past ``after`` compiles up front."""
    assert not A.compile_due(G.CompilePolicy("auto", after=10**6), 10**5)
    assert A.compile_due(G.CompilePolicy("auto", after=10**6), 2 * 10**6)
    assert A.compile_due(ALWAYS, 1) and not A.compile_due(NEVER, 10**9) and not A.compile_due(ALWAYS, 0)


@pytest.mark.parametrize("wide", [False, True])
def test_the_warm_up_counts_the_elements_the_pass_sends_through_the_kernel(monkeypatch, wide):
    """The element count that decides the up-front compile is the fused kernel's own count in
    the pass: equal grids once (int8 weight-only and dynamic-activation int8 share their cells),
    the bootstrap draws on their sample of the rows (a sixteenth of a 65,536-weight chunk). The
    old estimate counted every scheme and all 8 draw evaluations per weight (pf27: ~3.4x), which
    compiled up front where the pass itself never would. This untrained net's sd dwarfs every
    bounded window: with the wide-sd closed form on (``wide``), its main and pool positions take
    the closed form and its draws keep kappa (``POSITION_FREE_WIDE_TOL``), so nothing reaches the
    kernel (counted, the estimate read 1.25x, then ~1e6 against 0).
    Tolerance 10 %: the sample's rows are
    rounded and the last evaluations of a sample may be padded to the kernel's path.
    compile="always" (the exact count is taken only where the bound without the wide shares would
    compile, fx35), torch.compile replaced by a pass-through as above."""
    import importlib

    import mis_lightning as ml

    assess_mod = importlib.import_module("mis_lightning.assess")
    monkeypatch.setattr(importlib.import_module("mis_lightning.quantization.base"), "WIDE_SD_CLOSED_FORM", wide)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    seen: list[int] = []
    monkeypatch.setattr(assess_mod.F, "warm_up_compiled_kernel", lambda policy, n, *a, **k: seen.append(n))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    x = torch.randn(128, 256)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].sum(-1)), batch_size=64)
    before = int(K._FUSED_STATE["elements"])
    ml.assess(net, ["int8_weight_only", "int8_dynamic_activation_int8_weight", "rtn_int4"], loader,
              lambda out, t: 0.5 * (out.squeeze(-1) - t) ** 2, estimation="diagonal", num_records=16,
              compile="always")
    ran = int(K._FUSED_STATE["elements"]) - before
    if wide:
        # the estimate is sampled (8 runs of 512 elements per grid): ~0.1 % of the ~1.3e6 above
        assert ran == 0 and sum(seen) < 5_000, (seen, ran)
        return
    assert len(seen) == 1 and ran > 0
    assert seen[0] == pytest.approx(ran, rel=0.10), (seen[0], ran)


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_the_wide_shares_are_not_sampled_where_nothing_would_compile(monkeypatch, mode):
    """The compile count's wide-sd sample (``ParamGrid.wide_shares``, 8 runs of 512 elements per
    grid: ~0.05 s a call on the 1e5 MLP) only decides whether to compile up front. Leaving it out
    only raises the count, and ``compile_due`` grows with the count: where the raised count
    compiles nothing ("never", or "auto" below its threshold), the sample is not taken and the
    warm-up is told the raised count, which it declines (fx35). Fails where the sample is taken."""
    import importlib

    import mis_lightning as ml

    qbase = importlib.import_module("mis_lightning.quantization.base")
    calls: list[str] = []
    real = qbase.ParamGrid.wide_shares
    monkeypatch.setattr(qbase.ParamGrid, "wide_shares", lambda self, *a, **k: calls.append(self.name) or real(self, *a, **k))
    net, loader, loss = _tiny_net_and_data()
    rep = ml.assess(net, ["int8_weight_only", "rtn_int8"], loader, loss, estimation="diagonal", num_records=16,
                    uncertainty_draws=0, compile=mode)
    assert not calls and all(r.error is None for r in rep.schemes.values())
    assert G._FUSED_STATE["compiled"] is None and G._FUSED_STATE["compiled_codes"] is None


@pytest.mark.parametrize("count_sd_zero", [True, False])
def test_the_compile_count_leaves_out_dead_units(monkeypatch, count_sd_zero):
    """Dead units' weights (sd 0) are point masses in closed form: where every other weight of a
    sampled run takes the wide-sd closed form (and is free in the draws), the compile count's
    shares (``ParamGrid.wide_shares``) take them too (``SHARES_COUNT_SD_ZERO``; the 1e7 MLP's
    second layer, 94% dead: 63M elements counted, 0 reached the kernel, 141k counted with the
    share); where the live weights are off the closed form (their path, padded to a chunk's, and
    the draws may take the sd-0 ones to the kernel) they still count. 7 of 8 rows dead. Fails
    without the sd-0 share (closed ~1/8), or with it counted regardless of the live weights."""
    import importlib

    from mis_lightning.quantization import get_scheme

    qbase = importlib.import_module("mis_lightning.quantization.base")
    monkeypatch.setattr(qbase, "SHARES_COUNT_SD_ZERO", count_sd_zero)
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256)
    g = get_scheme("int8_weight_only").apply(torch.nn.Sequential(lin)).grids["0.weight"]
    theta = lin.weight.detach().reshape(-1)
    dead = (torch.arange(256) % 8 != 0).repeat_interleave(256)
    for live_sd, live_closed in ((1e3, True), (1e-3, False)):  # sd dwarfs the row's window / not
        sigma = torch.where(dead, torch.zeros(()), torch.full((), live_sd))
        closed, free = g.wide_shares(theta, sigma, 2e-9)
        if live_closed and count_sd_zero:  # (the revealed absmax weights: never on a path either)
            assert closed > 0.99 and free > 0.99, (closed, free)
        elif live_closed:
            assert 0.0 < closed < 0.2 and 0.0 < free < 0.2, (closed, free)
        else:
            assert closed == free == 0.0


@pytest.mark.parametrize("scheme", ["rtn_int4", "int8_weight_only", "bf16", "float8_weight_only"])
def test_nan_weights_read_nan_in_both_as_agreement(scheme):
    """A NaN weight (the functional API takes one; assess refuses it) gives NaN moments in the
    fast path and in its reference alike: the reference's NaN is the true value, so the sampled
    self-check agrees and the path stays on (before: "kappa nan against the reference nan"
    disabled the per-regime / float-format path for the process, rv50). Every other element
    reads what it reads without the NaN neighbours, bit for bit."""
    from mis_lightning.quantization import get_scheme

    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight[2] *= 1e-3
    g = get_scheme(scheme).apply(nn.Sequential(lin)).grids["0.weight"]
    w = lin.weight.detach().reshape(-1).to(F64)
    c = w.numel()
    nan = torch.arange(c) % 7 == 0
    th = torch.where(nan, torch.tensor(math.nan, dtype=F64), w)
    sg = torch.full((c,), 1e-3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = g.moments(th.clone(), sg, 0, c)
    assert not fastpath.GUARD.disabled
    assert bool(torch.isnan(got.kappa[nan]).any())  # the case reaches NaN against NaN
    fastpath.GUARD.reset()
    clean = g.moments(w.clone(), sg, 0, c)
    for f in ("kappa", "mean_abs", "m4"):
        assert torch.equal(getattr(got, f)[~nan], getattr(clean, f)[~nan]), f


def test_self_check_still_refuses_nan_against_a_number():
    """equal_nan only pairs NaN with NaN: a fast NaN against a finite reference, and a finite
    fast value against the reference's NaN, are still disagreements."""
    from mis_lightning.functional.fastpath import SAME_ARITHMETIC, compare

    h = torch.ones(3, dtype=F64)
    ref = (torch.tensor([0.5, 0.6, math.nan], dtype=F64),) * 3
    assert compare(ref, ref, h, SAME_ARITHMETIC, equal_nan=True) is None
    assert compare(ref, ref, h, SAME_ARITHMETIC) is not None  # the default: NaN disagrees
    fast_nan = (torch.tensor([math.nan, 0.6, math.nan], dtype=F64),) * 3
    assert "nan against the reference 0.5" in compare(fast_nan, ref, h, SAME_ARITHMETIC, equal_nan=True)
    fast_number = (torch.tensor([0.5, 0.6, 0.7], dtype=F64),) * 3
    assert "0.7 against the reference nan" in compare(fast_number, ref, h, SAME_ARITHMETIC, equal_nan=True)
