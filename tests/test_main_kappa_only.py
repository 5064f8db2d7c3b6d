"""pf40: the joint pass's main cell-moment calls ask for kappa alone where nothing reads their
``m4`` or ``mean_abs`` (``assess.MAIN_KAPPA_ONLY``), and a kappa-only whole-chunk call of the
wide-sd closed form keeps its ``C3`` for the pool call (``base.CUBE_KEPT_KAPPA_ONLY``). Pure
speed: the reports are bitwise those with the switches off (no tolerance: the same kappa, the
same operations after it), and the tests check that the switches took effect (kappa-only main
calls made, the kept ``C3`` read), so that they fail if either stopped working or changed a number."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

from mis_lightning.config import stage_configs
from mis_lightning.quantization import base as qb
from mis_lightning.quantization.base import ParamGrid

sys.path.insert(0, str(Path(__file__).parent))
from test_scoring_pass import SCHEMES, _estimate  # noqa: E402  (its cached small estimates)

A = importlib.import_module("mis_lightning.assess")
F64 = torch.float64


def _score(monkeypatch, main: bool, cube: bool, fourth_keep: int) -> tuple[str, list[bool]]:
    """The report (JSON) of the factored small MLP's scoring and the kappa_only flag of each
    main call (the joint pass's calls at the chunk's own sd on a scheme's grid)."""
    monkeypatch.setattr(A, "MAIN_KAPPA_ONLY", main)
    monkeypatch.setattr(qb, "CUBE_KEPT_KAPPA_ONLY", cube)
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", fourth_keep)
    flags: list[bool] = []
    real = ParamGrid.moments

    def spy(self, theta, sigma, start, end, use_codes=True, compile_policy=None, kappa_only=False):
        f = sys._getframe(1)
        if f.f_code.co_name == "_joint_sums" and sigma is f.f_locals.get("sg_c") and self is not f.f_locals.get("sgrid"):
            flags.append(kappa_only)
        return real(self, theta, sigma, start, end, use_codes, compile_policy, kappa_only)

    monkeypatch.setattr(ParamGrid, "moments", spy)
    model, est = _estimate("factored")
    _, sc, _ = stage_configs("assess", None, None, {})
    return A.score_schemes(est, model, SCHEMES, scoring_config=sc).to_json(), flags


@pytest.mark.parametrize("fourth_keep", [0, 1 << 25])
def test_reports_are_bitwise_those_with_the_switches_off(monkeypatch, fourth_keep):
    """Streamed (factored) influences. ``FOURTH_KEEP_BYTES = 0``: no scheme's fourth-power columns
    are kept, every main call is kappa-only (the bounds that fail on this MLP: rtn_int4, rtn_int2,
    g32, are summed exactly in the second pass, which computes m4 itself). Default: the columns
    are kept (small model), so the main calls compute every field, as before."""
    new, flags_new = _score(monkeypatch, True, True, fourth_keep)
    old, flags_old = _score(monkeypatch, False, False, fourth_keep)
    assert new == old
    assert flags_new and not any(flags_old)
    assert all(flags_new) if fourth_keep == 0 else not any(flags_new)


def test_stored_influences_keep_every_field(monkeypatch):
    """Stored influences (the moments kept whole for the Monte Carlo form): every main call
    computes the four fields, whatever the switch."""
    monkeypatch.setattr(A, "MAIN_KAPPA_ONLY", True)
    model, est = _estimate("stored")
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", 0)
    seen: list[bool] = []
    real = ParamGrid.moments

    def spy(self, theta, sigma, start, end, use_codes=True, compile_policy=None, kappa_only=False):
        f = sys._getframe(1)
        if f.f_code.co_name == "_joint_sums" and sigma is f.f_locals.get("sg_c"):
            seen.append(kappa_only)
        return real(self, theta, sigma, start, end, use_codes, compile_policy, kappa_only)

    monkeypatch.setattr(ParamGrid, "moments", spy)
    _, sc, _ = stage_configs("assess", None, None, {})
    A.score_schemes(est, model, SCHEMES[:2], scoring_config=sc)
    assert seen and not any(seen)


def _wide_grid(rows: int = 8, cols: int = 512) -> tuple[ParamGrid, torch.Tensor, torch.Tensor]:
    """A per-row symmetric int4 absmax grid with its bounds and weights whose sd is 20-60 times
    their row's bounded window: every element in the wide-sd closed form's regime."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    absmax = w.abs().amax(1, keepdim=True)
    g = ParamGrid(name="w", shape=(rows, cols), kind="affine", dequantized=torch.zeros(rows, cols),
                  bits_per_weight=4.0, scale=absmax / 7, block_size=(1, cols),
                  zero_point=torch.zeros(rows, 1, dtype=F64), qmin=-8, qmax=7)
    g.support = (-absmax, absmax)
    sd = (2 * absmax * torch.empty(rows, cols, dtype=F64).uniform_(20, 60, generator=gen)).reshape(-1)
    return g, w.reshape(-1), sd


@pytest.mark.parametrize("cube", [True, False])
def test_the_pool_call_reads_a_kappa_only_main_calls_cube(monkeypatch, cube):
    """A kappa-only main call on a whole chunk keeps its C3 (switch on), and the pool call on the
    same chunk reads it: both calls' kappa bitwise those of full calls with nothing kept."""
    monkeypatch.setattr(qb, "CUBE_KEPT_KAPPA_ONLY", cube)
    g, th, sd = _wide_grid()
    c = th.numel()
    hits: list[bool] = []
    real_get = qb._fact_get

    def get(kind, *a):
        out = real_get(kind, *a)
        if kind == "cube":
            hits.append(out is not None)
        return out

    qb.release_chunk_facts()
    monkeypatch.setattr(qb, "_fact_get", get)
    main = g.moments(th, sd, 0, c, kappa_only=True).kappa.clone()
    pool = g.moments(th, sd / math.sqrt(2), 0, c, kappa_only=True).kappa.clone()
    qb.release_chunk_facts()
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)  # the reference: every C3 computed in its call
    ref_main = g.moments(th, sd, 0, c).kappa
    ref_pool = g.moments(th, sd / math.sqrt(2), 0, c).kappa
    assert hits == [False, cube]
    assert (ref_main < 1).all() and (ref_main > 0.5).all()  # (the closed form's regime: kappa near 1)
    assert torch.equal(main, ref_main) and torch.equal(pool, ref_pool)
    qb.release_chunk_facts()


_DRAW_PARTS = {fn: getattr(A, fn) for fn in ("_draw_parts", "_sampled_draw_parts")}


def _joint(monkeypatch, unit: bool, scale: float, zero_sd: int = 0, exact: bool = False):
    """The factored small MLP's joint-pass sums with every sd times ``scale`` (``zero_sd``: the
    first parameter's first that many weights at sd 0), and the number of cell-moment calls of
    the schemes' grids at the chunks' own sd (the main calls) and of the draws' evaluations.
    ``exact``: ``UNIT_KAPPA_EXACT`` (off: p45a's unit columns at ``UNIT_KAPPA_TOL``)."""
    from test_scoring_pass import _prepared

    monkeypatch.setattr(A, "UNIT_KAPPA", unit)
    monkeypatch.setattr(A, "UNIT_KAPPA_EXACT", exact)
    monkeypatch.setattr(A, "FOURTH_KEEP_BYTES", 0)  # (kept fourth-power columns: every field computed)
    model, est = _estimate("factored")
    for name in est.names:
        est.sigma[name] = est.sigma[name] * scale
    if zero_sd:
        est.sigma[est.names[0]].view(-1)[:zero_sd] = 0.0
    calls = [0, 0]
    real = ParamGrid.moments

    def spy(self, theta, sigma, start, end, use_codes=True, compile_policy=None, kappa_only=False):
        f = sys._getframe(1)
        if f.f_code.co_name == "_joint_sums" and sigma is f.f_locals.get("sg_c"):
            calls[0] += 1
        return real(self, theta, sigma, start, end, use_codes, compile_policy, kappa_only)

    monkeypatch.setattr(ParamGrid, "moments", spy)
    for fn in _DRAW_PARTS:  # the draws' evaluations (the real functions: no chain of earlier spies)

        def counted(*a, _real=_DRAW_PARTS[fn], **k):
            calls[1] += 1
            return _real(*a, **k)

        monkeypatch.setattr(A, fn, counted)
    return A._joint_sums(est, _prepared(est, model), 1 << 18, 0, keep_moments=False), est.names, calls


def test_unit_kappa_chunks_take_the_baseline_columns(monkeypatch):
    """``UNIT_KAPPA``: with every sd 1e3 and 1e6 times the estimate's (1e6: the 1e7 MLP's first-layer
    regime, sd 1e3-1e4 steps) every sum is within ``UNIT_KAPPA_TOL`` relative of the evaluated
    kappas' (plus 1e-12: the other columns' rounding; float64 sums here), so no kappa left 1 by more
    (fails with a bound 1e-9 times too small: at 1e3 the deficits exceed the tolerance); at 1e6
    the bounded grids' chunks take kappa = 1 without a main call and their main columns' sums are
    the baseline's bitwise (fails if the chunks or their draws were still evaluated). With one sd-0 weight in the
    chunk (too few for the point-mass test) that chunk is evaluated: its sums bitwise as before;
    with half its weights at sd 0 (point masses) it is not, and its sums are again within the
    tolerance (fails if the point masses read kappa 1)."""
    import mis_lightning.estimation.linear_factors as lf

    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())  # float64: only the kappas move
    # (the power sums' shared deficits, p47a, would sum the evaluated near-unit kappas as the unit column too)
    monkeypatch.setattr(A, "SHARED_DEFICITS", False)
    for scale in (1e3, 1e6):
        new, names, n_new = _joint(monkeypatch, True, scale)
        old, _, n_old = _joint(monkeypatch, False, scale)
        moved = 0
        for name in names:
            for got, ref in zip(new[name], old[name]):
                for f in ("s2", "s22"):
                    if getattr(ref, f) is not None:
                        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=A.UNIT_KAPPA_TOL + 1e-12,
                                                   atol=1e-300)
            # the unit chunks' main columns: bitwise the baseline's
            moved += sum(torch.equal(new[name][m].s2, new[name][0].s2)
                         and not torch.equal(old[name][m].s2, old[name][0].s2) for m in range(1, len(new[name])))
        if scale == 1e6:
            assert n_new[0] < n_old[0] and n_new[1] < n_old[1] and moved > 0
    # one sd-0 weight: too few to test for point masses (POINT_MASS_MIN_FRACTION), so the paths
    # evaluate that chunk; half of them: point masses (kappa 0) in the unit columns
    a, _, n_a = _joint(monkeypatch, True, 1e6, zero_sd=1)
    b, _, n_b = _joint(monkeypatch, False, 1e6, zero_sd=1)
    assert n_a[0] < n_b[0]  # (the other parameters' chunks)
    for x, y in zip(a[names[0]], b[names[0]]):
        assert torch.equal(x.s2, y.s2) and (x.s22 is y.s22 is None or torch.equal(x.s22, y.s22))
    half = 768  # (of the first layer's 1,536 weights)
    a, _, n_a = _joint(monkeypatch, True, 1e6, zero_sd=half)
    b, _, n_b = _joint(monkeypatch, False, 1e6, zero_sd=half)
    assert n_a[0] + len(names) <= n_b[0]  # (every parameter's chunk: one)
    for x, y in zip(a[names[0]], b[names[0]]):
        torch.testing.assert_close(x.s2, y.s2, rtol=A.UNIT_KAPPA_TOL + 1e-12, atol=1e-300)
    assert not torch.equal(a[names[0]][1].s2, a[names[0]][0].s2)  # (point masses: kappa 0, not 1)


def test_exact_unit_chunks_keep_the_deficit(monkeypatch):
    """``UNIT_KAPPA_EXACT`` (p46a), self-checks off, float64 sums (only the kappas move): with every
    sd 3e4 times the estimate's (deficits up to 2e-7 of a sum, far above ``UNIT_KAPPA_TOL``) the
    exact path takes chunks the tolerance cannot (fewer main calls and draw evaluations), and every
    sum is within 1e-12 relative of the evaluated kappas' (measured 8.5e-15: float64 rounding plus
    ``(1 - lam)`` of the deficits, ``M < 1e-3`` sd here) and not below them beyond rounding (the
    conservative side); dropping the deficit (kappa 1), a wrong ``C3`` row or the pool's
    ``sqrt(2)^3`` fail by orders of magnitude. Half the first layer at sd 0 (point masses): the
    same within the same tolerance. The default float32 sums (the row-weighted columns' path)
    stay within their stated ``POWER_SUMS_F32_RTOL``."""
    import mis_lightning.estimation.linear_factors as lf
    from mis_lightning.functional import fastpath

    monkeypatch.setattr(fastpath.GUARD, "sample_size", lambda *a, **k: 0)
    f32 = lf.POWER_SUMS_F32
    monkeypatch.setattr(lf, "POWER_SUMS_F32", frozenset())
    for zero_sd in (0, 768):
        new, names, n_new = _joint(monkeypatch, True, 3e4, zero_sd=zero_sd, exact=True)
        old, _, n_old = _joint(monkeypatch, False, 3e4, zero_sd=zero_sd)
        if zero_sd == 0:
            _, _, n_unit = _joint(monkeypatch, True, 3e4, exact=False)
            assert n_new[0] < n_unit[0] < n_old[0] and n_new[1] < n_unit[1]
        deficit = 0.0
        for name in names:
            for got, ref in zip(new[name], old[name]):
                torch.testing.assert_close(got.s2, ref.s2, rtol=1e-12, atol=1e-300)
                assert bool((got.s2 >= ref.s2 * (1 - 1e-14)).all())
            deficit = max(deficit, max(float(((r.s2 - old[name][0].s2) / old[name][0].s2).abs().max())
                                       for r in old[name][1:]))
        assert deficit > 1e-9
    monkeypatch.setattr(lf, "POWER_SUMS_F32", f32)
    new, names, _ = _joint(monkeypatch, True, 3e4, exact=True)
    old, _, _ = _joint(monkeypatch, False, 3e4)
    for name in names:
        for got, ref in zip(new[name], old[name]):
            torch.testing.assert_close(got.s2, ref.s2, rtol=lf.POWER_SUMS_F32_RTOL, atol=1e-300)
