"""``mean_abs`` (``E|m|``) of an affine grid's fine elements (step at most 0.5 sd: the fine-grid
expansion's regime) against 40-digit mpmath sums over every cell within 12 sd (the cells beyond
are lumped into the two outer cells, which leaves ``E|m|`` exact: every cell on one side of 0
contributes ``|int u phi|``, and these telescope).

fx49 found the affine paths kept the expansion's ``sqrt(2/pi) - 0.05 h^2``, an average over the
weight's position in its cell (-4.5e-3 .. 4.4e-3 off at h = 0.3, -1.25e-2 .. 1.2e-2 at h = 0.5).
Exact instead (fx50; ``kernel.EXACT_AFFINE_MEAN_ABS``): ``2 phi(d)``, ``d`` the distance to the
nearest cell edge, found from the weight's position modulo the step (a weight outside its
backend code's cell too); the clamped end cells have no outer edge. Every path: the public call
(the per-regime path, small chunks), the reference (exact windows above ~0.0166 sd, the
expansion below), the fused kernel eager and compiled (chunks of ``TABLE_MIN_ELEMENTS``; the
compiled kernel's cases run in tests/test_fastpath.py, t54).
Tolerance 1e-14: the form is exact, so only float64 rounding of ``d`` and ``exp`` remains
(measured at most 2e-16 here); the expansion's error is ``>= 2.5e-6`` at the smallest step
tested (h = 0.01), 1e-3 and more at h >= 0.3.
"""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

from mis_lightning.functional import affine as A
from mis_lightning.functional import fastpath as fp
from mis_lightning.functional import kernel as K

F64 = torch.float64
TOL = 1e-14


def _exact_mean_abs(th: float, sd: float, s: float, zp: float, qmin: int, qmax: int) -> float:
    """``E|m|`` over every cell edge ``(k + 1/2 - zp) s`` within 12 sd of ``th`` (40 digits)."""
    with mp.workdps(40):
        t, sg, S, Z = mp.mpf(th), mp.mpf(sd), mp.mpf(s), mp.mpf(zp)
        ks = range(max(qmin, math.floor((th - 12 * sd) / s + zp) - 1), min(qmax - 1, math.ceil((th + 12 * sd) / s + zp) + 1) + 1)
        us = [((k + mp.mpf(0.5) - Z) * S - t) / sg for k in ks]
        us = [u for u in us if abs(u) <= 12]
        edges = [mp.ninf, *us, mp.inf]
        total = mp.mpf(0)
        for a, b in zip(edges[:-1], edges[1:]):
            p = mp.ncdf(b) - mp.ncdf(a)
            if p > 0:
                total += abs(mp.npdf(a) - mp.npdf(b))  # p |mu|
        return float(total)


# (qmin, qmax, step, zero point): int8 (rtn / torchao weight-only), int4 (a sd spanning the grid:
# the clamped ends within reach), an asymmetric uint4 grid with a float zero point (tinygemm)
GRIDS = {"int8": (-128, 127, 0.01, 0.0), "int4": (-8, 7, 1 / 7, 0.0), "uint4-float-zp": (0, 15, 0.1, 6.37)}
POSITIONS = (0.0, 0.1, 0.25, 0.5, 0.77, 0.999)  # in the cell, from its lower edge


def _cases(grid: str, h: float) -> list[tuple[float, float, float]]:
    """``(theta, sd, code)``: the given code the round-to-nearest one, except a few weights
    outside their code's cell (0.6 and 1.4 cells: a code given by another arithmetic)."""
    qmin, qmax, s, zp = GRIDS[grid]
    sd = s / h
    out = []
    mid_codes = (3, -5) if grid != "uint4-float-zp" else (9, 2)
    for q in mid_codes:
        out += [((q - 0.5 + f - zp) * s, sd, float(q)) for f in POSITIONS]
    # the clamped end cells and beyond them (a bootstrap draw may lie there)
    out += [((qmax - 0.3 - zp) * s, sd, float(qmax)), ((qmax + 2.2 - zp) * s, sd, float(qmax)),
            ((qmin - 0.45 - zp) * s, sd, float(qmin)), ((qmin + 0.6 - zp) * s, sd, float(qmin + 1))]
    q = mid_codes[0]
    out += [((q + 1.1 - zp) * s, sd, float(q)), ((q - 1.9 - zp) * s, sd, float(q))]  # outside the code's cell
    return out


def _tensors(cases):
    th, sd, code = (torch.tensor([c[i] for c in cases], dtype=F64) for i in range(3))
    return th, sd, code


def _paths(grid: str, h: float, monkeypatch, modes: tuple[str, ...] = ("never",),
           small: bool = True) -> dict[str, torch.Tensor]:
    """Each path's ``mean_abs`` of :func:`_cases`, with and without the given codes: the public
    call and the reference where ``small``, the fused kernel in each compile policy of ``modes``
    ("never": eager; "always": compiled, checked by tests/test_fastpath.py, whose process compiles
    anyway: t54 moved it there, a first compile in this file's process cost ~7 CPU s)."""
    monkeypatch.setattr(fp.GUARD, "sample_size", lambda *a, **k: 0)  # each path's own numbers
    qmin, qmax, s, zp = GRIDS[grid]
    th, sd, code = _tensors(_cases(grid, h))
    n = th.numel()
    sc, z = torch.full_like(th, s), torch.full_like(th, zp)
    out = {}
    for name, cd in (("codes", code), ("rtn", None)):
        if small:
            out[f"public/{name}"] = A.affine_cell_moments(th, sd, sc, z, qmin, qmax, cd).mean_abs
            out[f"reference/{name}"] = A.affine_reference_moments(th, sd, sc, z, qmin, qmax, cd).mean_abs
        # the fused kernel: the cases tiled to a chunk of TABLE_MIN_ELEMENTS
        reps = -(-A.TABLE_MIN_ELEMENTS // n)
        tile = [t.repeat(reps) for t in (th, sd, sc, z)]
        tc = None if cd is None else cd.repeat(reps)
        for mode in modes:
            if mode == "always":
                for key, val in (("compiled", None), ("compiled_codes", None), ("failed", False)):
                    monkeypatch.setitem(K._FUSED_STATE, key, val)
            mm = A.affine_cell_moments(*tile, qmin, qmax, tc, compile_policy=K.CompilePolicy(mode))
            if mode == "always":
                assert not K._FUSED_STATE["failed"]
                assert K._FUSED_STATE["compiled" if cd is not None else "compiled_codes"] is not None
            for r in range(reps):  # every copy alike
                assert torch.equal(mm.mean_abs[r * n:(r + 1) * n], mm.mean_abs[:n])
            out[f"fused-{'eager' if mode == 'never' else 'compiled'}/{name}"] = mm.mean_abs[:n]
    return out


def check_fine_mean_abs(grid: str, h: float, monkeypatch, **paths) -> None:
    """Every path of :func:`_paths` (``paths``: its options) within ``TOL`` of the exact sums."""
    qmin, qmax, s, zp = GRIDS[grid]
    cases = _cases(grid, h)
    want = torch.tensor([_exact_mean_abs(t, sd, s, zp, qmin, qmax) for t, sd, _ in cases], dtype=F64)
    for path, got in _paths(grid, h, monkeypatch, **paths).items():
        err = (got - want).abs()
        assert float(err.max()) <= TOL, (path, int(err.argmax()), cases[int(err.argmax())], float(err.max()))


@pytest.mark.parametrize("h", [0.01, 0.1, 0.3, 0.45, 0.5])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_fine_mean_abs_against_every_cell(grid, h, monkeypatch):
    check_fine_mean_abs(grid, h, monkeypatch)


def check_expansion_was_off(h: float, monkeypatch, **paths) -> None:
    """With the switch off, every path of :func:`_paths` (``paths``: its options) that takes the
    expansion is off by more than ``0.04 h^2`` somewhere."""
    monkeypatch.setattr(K, "EXACT_AFFINE_MEAN_ABS", False)
    qmin, qmax, s, zp = GRIDS["int8"]
    cases = _cases("int8", h)
    want = torch.tensor([_exact_mean_abs(t, sd, s, zp, qmin, qmax) for t, sd, _ in cases], dtype=F64)
    for path, got in _paths("int8", h, monkeypatch, **paths).items():
        if path.startswith("reference") and h > K.REFERENCE_FINE_STEP:
            assert float((got - want).abs().max()) <= TOL  # exact windows there
            continue
        assert float((got - want).abs().max()) > 0.04 * h * h, path


@pytest.mark.parametrize("h", [0.01, 0.3, 0.5])
def test_the_expansions_mean_abs_was_off(h, monkeypatch):
    """The switch off (the expansion's average, as before): off by more than the tolerance on
    every path that takes it (the reference's exact windows above its fine step excepted), and by
    more than ``0.04 h^2`` somewhere (fx49's 4.4e-3 at h = 0.3)."""
    check_expansion_was_off(h, monkeypatch)


def _exact_m4(h: float, f: float) -> float:
    """``E m^4`` on an infinite uniform grid of step ``h`` (sd units), theta at the fraction ``f``
    of its cell: 30-digit sums over every cell within 12 sd."""
    with mp.workdps(30):
        H, F = mp.mpf(h), mp.mpf(f)
        n = int(12 / h) + 2
        edges = [mp.ninf, *[(k - F) * H for k in range(-n, n + 1) if abs((k - F) * H) <= 12], mp.inf]
        total = mp.mpf(0)
        for a, b in zip(edges[:-1], edges[1:]):
            p = mp.ncdf(b) - mp.ncdf(a)
            if p > 0:
                total += (mp.npdf(a) - mp.npdf(b)) ** 4 / p**3
        return float(total)


@pytest.mark.parametrize("h", [0.5, 0.3, 0.1])
def test_fine_m4_carries_its_h4_term(h, monkeypatch):
    """The expansion's ``m4 = 3 - h^2/2 + 7 h^4/80`` (``kernel.FINE_M4_H4``) against the sums: within
    ``0.016 h^6`` (its next term, measured +0.0146 .. +0.0153 h^6), on the public path and the fused
    kernel; without the term it is ``0.084 h^4`` low (more than 5x further off at h = 0.5)."""
    monkeypatch.setattr(fp.GUARD, "sample_size", lambda *a, **k: 0)
    qmin, qmax, s, zp = GRIDS["int8"]
    fr = (0.0, 0.3, 0.5)
    th = torch.tensor([(3 - 0.5 + f) * s for f in fr], dtype=F64)
    sd, sc, z = torch.full_like(th, s / h), torch.full_like(th, s), torch.full_like(th, zp)
    want = torch.tensor([_exact_m4(h, f) for f in fr], dtype=F64)
    reps = -(-A.TABLE_MIN_ELEMENTS // th.numel())
    for flag in (True, False):
        monkeypatch.setattr(K, "FINE_M4_H4", flag)
        small = A.affine_cell_moments(th, sd, sc, z, qmin, qmax).m4
        fused = A.affine_cell_moments(*(t.repeat(reps) for t in (th, sd, sc, z)), qmin, qmax,
                                      compile_policy=K.CompilePolicy("never")).m4[:th.numel()]
        for got in (small, fused):
            err = float((got - want).abs().max())
            if flag:
                assert err <= 0.016 * h**6, (h, err)
            else:
                assert err >= 0.08 * h**4, (h, err)
