"""Weights put beyond their release's bounds on an affine grid (rtn_int8 / rtn_int4: absmax bounds,
so not a real release's weights, but a draw's position or a user's theta can lie there), against
exact sums: 40-digit mpmath sums over every cell inside the bounds (each cut at the bound) plus the
closed-form moments of the regions beyond them, which the release gives away (``m(U) = U``,
method.md section 4's revealed region).

fx49 (tie48's finding): an sd-0 weight beyond a bound got ``m4`` NaN (the revealed tail's
``(b^2 + 3) b phi(b)`` with ``b`` ~1e305 from the floored sd: ``inf * 0``); its exact moments are
those of the unquantized weight, ``(1, sqrt(2/pi), 3)``. Tolerances: kappa and mean_abs 1e-14,
m4 1e-12 (float64 sums of ~256 cells' terms of size up to 3; measured 2e-13)."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

from mis_lightning.functional import fastpath as fp
from mis_lightning.quantization import get_scheme

F64 = torch.float64


def _exact(th: float, sd: float, scale: float, zp: float, qmin: int, qmax: int, lo: float, hi: float
           ) -> tuple[float, float, float]:
    """``(kappa, mean_abs, m4)``: cells ``[(k - 1/2 - zp) scale, (k + 1/2 - zp) scale]`` cut at the
    bounds, every one summed (``p mu^k``, ``p |mu|``), plus ``int u^k phi`` beyond the bounds."""
    with mp.workdps(40):
        th_, sd_, s_, z_ = (mp.mpf(x) for x in (th, sd, scale, zp))
        pts = [mp.mpf(lo)] + [e for e in ((mp.mpf(k) - mp.mpf(0.5) - z_) * s_ for k in range(qmin + 1, qmax + 1))
                              if mp.mpf(lo) < e < mp.mpf(hi)] + [mp.mpf(hi)]
        us = [(x - th_) / sd_ for x in pts]
        k2 = k4 = ma = mp.mpf(0)
        for a, b in zip(us[:-1], us[1:]):
            p = mp.ncdf(b) - mp.ncdf(a)
            if p > 0:
                mu = (mp.npdf(a) - mp.npdf(b)) / p
                k2, k4, ma = k2 + p * mu**2, k4 + p * mu**4, ma + p * abs(mu)

        def below(x, k):  # int_-inf^x u^k phi (k = 2, 4); |u| phi for k = 1
            if k == 1:
                return mp.npdf(x) if x <= 0 else 2 * mp.npdf(0) - mp.npdf(x)
            return mp.ncdf(x) - x * mp.npdf(x) if k == 2 else 3 * mp.ncdf(x) - (x**3 + 3 * x) * mp.npdf(x)

        a, b = us[0], us[-1]
        total = {1: 2 * mp.npdf(0), 2: mp.mpf(1), 4: mp.mpf(3)}
        for k in (1, 2, 4):  # below a, and above b (by symmetry: the total less below b)
            part = below(a, k) + total[k] - below(b, k)
            if k == 1:
                ma += part
            elif k == 2:
                k2 += part
            else:
                k4 += part
        return float(k2), float(ma), float(k4)


@pytest.fixture
def unchecked(monkeypatch):
    monkeypatch.setattr(fp.GUARD, "sample_size", lambda *a, **k: 0)  # the fast paths' own numbers


@pytest.mark.parametrize("scheme", ["rtn_int8", "rtn_int4"])
def test_weights_beyond_their_bounds_against_exact_sums(scheme, unchecked):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    theta = lin.weight.detach().reshape(-1).to(F64)
    c = theta.numel()
    scale, zp, _ = g.element_grid(0, c)
    s = scale.to(F64).reshape(-1).expand(c)  # (per element: [c], or one value)
    z = torch.zeros_like(s) if zp is None else zp.to(F64).reshape(-1).expand(c)
    blo, bhi = (t.to(F64) for t in g.element_bounds(0, c))
    th, sg = theta.clone(), (0.01 * s).clone()  # the others: ordinary weights
    rev, _ = g._revealed_at(0, c, theta.device)  # (each row's absmax weight: given away by the scale)
    free = iter(torch.nonzero(~rev if rev is not None else torch.ones(c, dtype=torch.bool)).squeeze(-1)[::3].tolist())
    picks = []
    for off in (0.25, 0.5, 3.0):  # cells beyond the bound
        for sd in (0.0, 1e-200, 0.05, 0.33, 1.0):  # cells (0 and 1e-200: absolute)
            for side in (-1, 1):
                j = next(free)
                th[j] = (blo[j] - off * s[j]) if side < 0 else (bhi[j] + off * s[j])
                sg[j] = sd if sd in (0.0, 1e-200) else sd * s[j]
                picks.append(j)
    idx = torch.tensor(picks)
    for kw in ({}, {"use_codes": False}):
        got = g.moments(th, sg, 0, c, **kw)
        for f in ("kappa", "mean_abs", "m4"):
            assert not bool(getattr(got, f)[idx].isnan().any()), (kw, f)
        for i in picks:
            sd = float(sg[i])
            want = (1.0, math.sqrt(2 / math.pi), 3.0) if sd < 1e-100 else _exact(
                float(th[i]), sd, float(s[i]), float(z[i]), g.qmin, g.qmax, float(blo[i]), float(bhi[i]))
            if kw == {} and sd >= 1e-100:
                continue  # (the codes path reads the release's code of the unmoved weight: not this weight's)
            for f, w, tol in zip(("kappa", "mean_abs", "m4"), want, (1e-14, 1e-14, 1e-12)):
                assert abs(float(getattr(got, f)[i]) - w) <= tol, (kw, f, i, float(th[i]), sd, float(getattr(got, f)[i]), w)
    kappa_only = g.moments(th, sg, 0, c, kappa_only=True)
    assert not bool(kappa_only.kappa[idx].isnan().any())
