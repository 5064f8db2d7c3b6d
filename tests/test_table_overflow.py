"""The kappa-only closed form of a float table's elements whose sd dwarfs every finite cell
(``table.OVERFLOW_CLOSED_FORM``: ``_open_overflow_kappa``, ``functional.cell_variance``): fp16
bootstrap draws beyond +-65520 (their own cell the unbounded overflow cell), which took the
windowed path's runs before (p47f: 80k elements a call of the 1e7 MLP, ~1.5 us each).

References: the windowed path (switch off), which agrees with 40-digit sums over every cell to
~1.5e-15 on such elements (docs/benchmarks.md, p48a); the closed form agrees with it to 5e-15
(measured 9.7e-16 on the 1e7 MLP's 77k draws; dropping the w^4 term of the cells' variances
moves it by up to 4.6e-14 at sd 16,000, dropping the runs outside the Taylor core by ~1e-8);
and the test's own float64 sums over every cell (``_every_cell``), within 5e-13 (that sum's own
rounding over 63k cells: the windowed path sits as far from it)."""

from __future__ import annotations

import pytest
import torch
from _every_cell import _every_cell

from mis_lightning.functional import cell_variance as CV
from mis_lightning.functional import table as T
from mis_lightning.quantization.casts import cast_cell_values

F64 = torch.float64


def _moments(th, sg, values, on: bool, monkeypatch, kappa_only: bool = True):
    monkeypatch.setattr(T, "OVERFLOW_CLOSED_FORM", on)
    return T._table_sum_moments(th, sg, values, torch.ones_like(th), kappa_only)


def _fp16_cases() -> tuple[torch.Tensor, torch.Tensor]:
    # beyond +-65520 (the overflow cells), sds from the closed form's limit (32 / 2e-3 = 16,000)
    # to 1e9, both signs, near the edge and far beyond it
    th = torch.tensor([65520.5, 65600.0, 7e4, 1e5, 3e5, 2e6, 5e8], dtype=F64)
    sg = torch.tensor([16001.0, 18700.0, 25000.0, 32759.0, 32761.0, 1e5, 1e6, 3e7, 1e9], dtype=F64)
    t, s = torch.meshgrid(th, sg, indexing="ij")
    t = torch.cat([t.reshape(-1), -t.reshape(-1)])
    return t, torch.cat([s.reshape(-1), s.reshape(-1)])


def test_overflow_closed_form_against_windowed_path(monkeypatch):
    values = cast_cell_values(torch.float16)
    th, sg = _fp16_cases()
    new, closed = _moments(th, sg, values, True, monkeypatch)
    old, _ = _moments(th, sg, values, False, monkeypatch)
    # every element taken by the closed form but those settled as frozen (their own cell's edge
    # beyond 8.5 sd: kappa 0 before either path)
    frozen = (th.abs() - 65520.0) / sg > 8.5
    assert 0 < int(frozen.sum()) < th.numel() // 2
    assert torch.equal(closed, ~frozen)
    assert bool((new.kappa[frozen] == 0.0).all())
    d = (new.kappa - old.kappa).abs()
    assert float(d.max()) <= 5e-15, (th[d > 5e-15], sg[d > 5e-15], d[d > 5e-15])
    assert not torch.equal(new.kappa, old.kappa)  # (the switch takes another path)
    assert bool((new.coverage - 1.0).abs().max() <= 1e-12)


def _fine_every_cell(th: torch.Tensor, sg: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """kappa over every cell of the table to ~1e-16 where every finite cell is at most 0.01 sd
    wide: per finite cell (centre ``c``, width ``w``, sd units) ``p mu^2 = d^2 / p`` with ``d =
    phi(c - w/2) - phi(c + w/2) = 2 phi(c) exp(-w^2/8) sinh(c w / 2)`` (no cancellation) and ``p``
    by 8-point Gauss-Legendre (exact to ~w^16), summed with ``math.fsum``; the two unbounded end
    cells ``phi(e)^2 / P`` from the smaller tail. (_every_cell's differences of ``ndtr`` and of
    ``phi`` lose ~1e-11 of kappa on fp16's 63k cells at sd 2e4: 2.4e-12 at theta 1e5, sd 18,700,
    where 40-digit sums and both paths agree to 2e-16.)"""
    import math

    import numpy as np

    mids = 0.5 * (values[1:] + values[:-1])
    x, wq = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(8))
    out = torch.empty_like(th)
    for i in range(th.numel()):
        lo, hi = (mids[:-1] - th[i]) / sg[i], (mids[1:] - th[i]) / sg[i]
        w, c = hi - lo, 0.5 * (lo + hi)
        assert float(w.max()) <= 0.01
        phi = lambda u: torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)  # noqa: E731
        p = 0.5 * w * (wq.unsqueeze(-1) * phi(c + 0.5 * w * x.unsqueeze(-1))).sum(0)
        d = 2.0 * phi(c) * torch.exp(-w * w / 8.0) * torch.sinh(c * w / 2.0)
        live = p > 1e-300
        terms = torch.where(live, d * d / torch.where(live, p, 1.0), 0.0)
        ends = []
        for e, below in ((float(lo[0]), True), (float(hi[-1]), False)):
            f = -e if below else e  # distance into the end cell's side
            tail = float(torch.special.ndtr(torch.tensor(-f, dtype=F64)))
            ends.append(float(phi(torch.tensor(e, dtype=F64))) ** 2 / tail if tail > 1e-300 else 0.0)
        out[i] = math.fsum(terms.tolist() + ends)
    return out


def test_overflow_closed_form_against_every_cell(monkeypatch):
    values = cast_cell_values(torch.float16)
    th, sg = _fp16_cases()
    pick = torch.arange(0, th.numel(), 5)
    th, sg = th[pick], sg[pick]
    new, _ = _moments(th, sg, values, True, monkeypatch)
    ref = _fine_every_cell(th, sg, values)
    # the closed form's stated error, (32 / sd)^4 / 144 (it carries the w^4 term: its rest is
    # O(w^6)), and rounding
    assert float((new.kappa - ref).abs().max()) <= 1e-15
    # the float64 reference of the other tests (differences of ndtr): within its own ~1e-11
    ref2, _ = _every_cell(th[:6], sg[:6], values)
    assert float((ref2 - ref[:6]).abs().max()) <= 1e-11


def test_bf16_overflow_against_windowed_path(monkeypatch):
    # the same closed form on bf16's table (top cell 2^120 wide; overflow beyond ~3.4e38)
    values = cast_cell_values(torch.bfloat16)
    top = float(torch.finfo(torch.bfloat16).max)
    th = torch.tensor([1.01 * top, 1.5 * top, -3.0 * top], dtype=F64)
    sg = torch.tensor([2.0 * top, 10.0 * top, 1e3 * top], dtype=F64)
    t, s = (x.reshape(-1) for x in torch.meshgrid(th, sg, indexing="ij"))
    new, _ = _moments(t, s, values, True, monkeypatch)
    old, _ = _moments(t, s, values, False, monkeypatch)
    assert float((new.kappa - old.kappa).abs().max()) <= 5e-15


def test_other_elements_unchanged_and_full_calls_untouched(monkeypatch):
    values = cast_cell_values(torch.float16)
    th_o, sg_o = _fp16_cases()
    g = torch.Generator().manual_seed(0)
    # ordinary fp16 weights (settled or windowed) and draws just below the closed form's sd
    th_n = torch.cat([torch.randn(200, generator=g, dtype=F64) * 0.05, torch.tensor([7e4, -9e4], dtype=F64)])
    sg_n = torch.cat([torch.rand(200, generator=g, dtype=F64) * 0.01, torch.tensor([15000.0, 15999.0], dtype=F64)])
    th, sg = torch.cat([th_n, th_o]), torch.cat([sg_n, sg_o])
    new, _ = _moments(th, sg, values, True, monkeypatch)
    old, _ = _moments(th, sg, values, False, monkeypatch)
    n = th_n.numel()
    assert torch.equal(new.kappa[: n - 2], old.kappa[: n - 2])  # settled: the same numbers
    # the two windowed ones (sd below the closed form's 16,000): the windowed path's run sums
    # round ~1 ulp apart in a call of other elements (measured: 1.1e-16 and 5.6e-17 here)
    assert float((new.kappa[n - 2: n] - old.kappa[n - 2: n]).abs().max()) <= 1e-15
    assert float((new.kappa[n:] - old.kappa[n:]).abs().max()) <= 5e-15
    # a full call keeps the windowed path (m4 is not in closed form): bitwise the switch off's
    full_on, _ = _moments(th, sg, values, True, monkeypatch, kappa_only=False)
    full_off, _ = _moments(th, sg, values, False, monkeypatch, kappa_only=False)
    for f in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.equal(getattr(full_on, f), getattr(full_off, f))


def test_variance_table_and_its_range():
    values = cast_cell_values(torch.float16)
    vt = CV.variance_table(values, torch.device("cpu"))
    assert vt.ok and vt.w_max == 32.0 and float(vt.edges[-1]) == 65520.0
    # the whole table's core moments against its cells: M_0 = sum_k w_k^3, M_2 = sum_k w_k^2 int_k x^2
    mids = 0.5 * (values[1:] + values[:-1])
    lo, hi = mids[:-1], mids[1:]
    w = hi - lo
    assert float(vt.coef_t[0, -1]) == pytest.approx(float((w**3).sum()), rel=1e-12)
    m2 = float((w**2 * (hi**3 - lo**3) / 3.0).sum()) / (65520.0**2 * 2.0)
    assert float(vt.coef_t[1, -1]) == pytest.approx(m2, rel=1e-9)
    assert float(vt.coef4_t[0, -1]) == pytest.approx(float((w**5).sum()), rel=1e-12)
    with pytest.raises(ValueError, match="central run"):
        CV.finite_cell_variance(torch.zeros(1, dtype=F64), torch.full((1,), 1e6, dtype=F64), vt)
    skew = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0], dtype=F64)  # not symmetric: no closed form
    assert not CV.variance_table(skew, torch.device("cpu")).ok


@pytest.mark.parametrize("kappa_only", [True, False])
def test_an_elements_moments_do_not_depend_on_its_calls_other_elements(kappa_only):
    """fx49 (rv48): a kappa-only call of overflow draws alone (nothing settled) went to the windowed
    path whole, while the same draws beside one settled weight took the closed form: 5e-15 apart.
    Each element alone, then in the call of all, then beside a settled weight and a frozen one: the
    same numbers, bitwise (every field; kappa-only calls' mean_abs / m4 are NaN for these)."""
    values = cast_cell_values(torch.float16)
    th, sg = _fp16_cases()
    keep = (th.abs() - 65520.0) / sg <= 8.5  # (frozen ones are 0 on every path)
    th, sg = th[keep], sg[keep]
    one = torch.ones(1, dtype=F64)

    def fields(m):
        return torch.stack([m.kappa, m.mean_abs, m.m4, m.coverage], 1)

    alone = torch.cat([fields(T._table_sum_moments(th[i:i + 1], sg[i:i + 1], values, one, kappa_only)[0])
                       for i in range(th.numel())])
    together = fields(T._table_sum_moments(th, sg, values, torch.ones_like(th), kappa_only)[0])
    t2 = torch.cat([torch.tensor([0.1, 3.0], dtype=F64), th])  # a settled (sd spans 0) and a frozen one
    s2 = torch.cat([torch.tensor([0.0, 0.0], dtype=F64), sg])
    beside = fields(T._table_sum_moments(t2, s2, values, torch.ones_like(t2), kappa_only)[0])[2:]
    for got in (together, beside):
        assert torch.equal(got.isnan(), alone.isnan())
        assert torch.equal(got.nan_to_num(nan=-7.0), alone.nan_to_num(nan=-7.0))
