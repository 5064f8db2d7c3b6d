"""bf16 / fp16 models: the storage grid itself (method.md section 5, "Weights stored in bf16 / fp16").

A model stored in ``D`` holds ``rnd_D(theta-hat)``: a weight it releases unquantized (``none``, the
parameters a scheme leaves in float, the block extremes a scale gives away) is released on the
storage grid, whose cells are the storage cells (midpoints of adjacent ``D`` values). So ``none``,
the identity cast (``bf16`` on a bf16 model) and a lossless cast (``fp16`` on a bf16 model: every
bf16 value in fp16's range is an fp16 value) release the same thing and must read one figure.

Reference, independent of the library's cell code: a Gaussian cell sum over the partition the real
cast gives (every ``D`` value of the range cast with torch, edges at the midpoints between adjacent
values whose cast differs), in a form stable for cells far narrower than the sd (``erf`` / ``erfc``
differences on the side away from the mean, ``phi(a) - phi(b)`` as ``-phi(a) expm1(...)``): float64
sums over the same edges, tolerance 1e-9 relative as tests/test_storage_rounding.py's truth test.
"""
import warnings

import numpy as np
import pytest
import torch
from _lowp import dtype_values
from scipy.special import erf, erfc
from torch import nn

from mis_lightning import assess
from mis_lightning.quantization import get_scheme

SQ2 = np.sqrt(2.0)


def _partition(src: torch.dtype, cast: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """``(values, edges)``: every finite ``src`` value, and the midpoints between adjacent ones whose
    cast to ``cast`` differs (``None``: every midpoint, the storage cells)."""
    v = dtype_values(-3e38, 3e38, src)
    same = torch.zeros(v.numel() - 1, dtype=torch.bool)
    if cast is not None:
        c = v.to(cast).double()
        same = c[1:] == c[:-1]
    mids = 0.5 * (v[1:] + v[:-1])
    return v.numpy(), mids[~same].numpy()


def _kappa(theta: float, sigma: float, edges: np.ndarray) -> float:
    """sum over the cells of ``(phi(a) - phi(b))^2 / (Phi(b) - Phi(a))`` (standardised edges)."""
    lo_i = np.searchsorted(edges, theta - 12 * sigma)
    hi_i = np.searchsorted(edges, theta + 12 * sigma)
    a = np.concatenate([[-np.inf], (edges[lo_i:hi_i] - theta) / sigma, [np.inf]])
    lo, hi = a[:-1], a[1:]
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(lo >= 0, 0.5 * (erfc(lo / SQ2) - erfc(hi / SQ2)),
                     np.where(hi <= 0, 0.5 * (erfc(-hi / SQ2) - erfc(-lo / SQ2)),
                              0.5 * (erf(hi / SQ2) - erf(lo / SQ2))))
        phi_lo = np.where(np.isfinite(lo), np.exp(-0.5 * lo * lo), 0.0) / np.sqrt(2 * np.pi)
        phi_hi = np.where(np.isfinite(hi), np.exp(-0.5 * hi * hi), 0.0) / np.sqrt(2 * np.pi)
        both = np.isfinite(lo) & np.isfinite(hi)
        d = np.where(both, -phi_lo * np.expm1(-0.5 * (hi - lo) * np.where(both, hi + lo, 0.0)), phi_lo - phi_hi)
    live = p > 1e-300
    return float((d[live] ** 2 / p[live]).sum())


def _ulp(th: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a = th.abs().to(dtype)
    return (a.view(torch.int16) + 1).view(dtype).double() - a.double()


def test_a_grid_finer_than_the_storage_grid_reads_the_storage_cells():
    """``fp16`` on a bf16 model: its stored cells are the bf16 storage cells (fp16 holds every bf16
    value from 2^-17 up; below, fp16's own cells with edges at bf16 midpoints). Before st31, a weight
    whose window needed more than 512 of the grid's (fp16) keys was scored on the fp16 cells, 8x
    finer: kappa up to 4.5e-3 too high at sd = 4 bf16 ulps, and the switch to the grid's own edges
    above 16 ulps read 1e-4 too high at 24. Weights of a bf16 Linear and some near 0 (windows
    reaching into the cells below 2^-17)."""
    torch.manual_seed(0)
    w = (torch.rand(200, dtype=torch.float64) - 0.5) * 0.25
    w = torch.cat([w, torch.tensor([3e-5, -2e-6, 4e-7, 0.0, 1.5e-4])])
    lin = nn.Linear(w.numel(), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w.reshape(1, -1))
    model = nn.Sequential(lin.to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = get_scheme("fp16").apply(model).grids["0.weight"]
    assert g.storage_dtype == torch.bfloat16
    th = model[0].weight.detach().double().reshape(-1)
    _, edges = _partition(torch.bfloat16, torch.float16)
    ulp = _ulp(th, torch.bfloat16)
    # the top of each binade too: at 24 ulps their reach stays within 3 binades (< 512 storage cells
    # each side), where the storage cells are summed exactly
    top = (th.abs() / 2.0 ** torch.floor(torch.log2(th.abs().clamp_min(1e-30)))) >= 1.75
    for k in (0.5, 4.0, 8.0, 24.0):
        sd = k * ulp
        mm = g.moments(th, sd, 0, g.numel)
        truth = torch.tensor([_kappa(float(t), float(s), edges) for t, s in zip(th, sd)], dtype=torch.float64)
        # 1e-9 relative; plus, where the storage cells are uniform and at most 0.5 sd within reach
        # (h = 1 / k), the fine-grid expansion's stated error 6e-4 h^6 (functional/kernel.py)
        tol = 1e-9 * truth + (6e-4 / k ** 6 if k >= 2 else 0.0)
        sel = top | (th.abs() < 2.0 ** -17) if k > 8 else torch.ones_like(top)
        err = ((mm.kappa - truth).abs() - tol)[sel]
        assert float(err.max()) <= 0.0, (k, float(err.max()))


def _mlp(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 6, generator=g)
    y = X[:, :2].sum(1, keepdim=True) + 0.3 * torch.randn(128, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    model = model.to(dtype)
    loader = [(X[i:i + 32].to(dtype), y[i:i + 32].to(dtype)) for i in range(0, 128, 32)]
    return model, loader, _loss


def _loss(out, t):
    return ((out.float() - t.float()) ** 2).sum(-1)


def _report(model, loader, loss, schemes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return assess(model, schemes, loader, loss)


def test_none_the_identity_and_a_lossless_cast_read_one_figure():
    """A bf16 MLP: ``none``, ``bf16`` (the identity) and ``fp16`` (lossless in fp16's normal range;
    below it, cells far narrower than sd: kappa within 1e-10) release rnd_bf16(theta-hat) and read one
    figure, in every form the report shows (headline with the weights' correlation, the independent
    form, the pool protocol, the interval's ends, d_eff), and the report's baseline is that figure.
    Before st31 ``none`` and the baseline read kappa = 1, and ``bf16`` 0.8% less than ``none`` on a
    larger MLP (docs/validation.md "The stored cells tabulated once per block")."""
    model, loader, loss = _mlp(torch.bfloat16)
    rep = _report(model, loader, loss, ["none", "bf16", "fp16"])
    none = rep.schemes["none"]
    for other in ("bf16", "fp16"):
        r = rep.schemes[other]
        for f in ("leakage", "pool_leakage", "leakage_independent", "d_eff"):
            assert abs(getattr(r, f) - getattr(none, f)) <= 1e-12, (other, f, getattr(r, f), getattr(none, f))
        assert r.interval is not None and none.interval is not None
        assert max(abs(a - b) for a, b in zip(r.interval, none.interval)) <= 1e-12, (other, r.interval, none.interval)
    assert abs(rep.baseline_leakage - none.leakage) <= 1e-12
    assert abs(rep.baseline_pool_leakage - none.pool_leakage) <= 1e-12
    assert none.d_eff < none.d  # the storage grid, not kappa = 1


def test_the_baseline_reads_the_storage_grid_of_stored_weights():
    """A bf16 linear regression whose weights' sd spans a few bf16 ulps (0.3-20): the unquantized
    release rnd_bf16(theta-hat) has kappa well below 1, and ``none``'s d_eff (the sum of kappa) equals
    the closed form over the bf16 storage cells within 1e-9 relative plus the fine-grid expansion's
    stated 6e-4 h^6 per weight (h: the storage cell over sd, where at most 0.5; functional/kernel.py).
    Before st31: d_eff = d (kappa = 1)."""
    from mis_lightning.assess import run_estimation
    from mis_lightning.config import EstimationConfig
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 6, generator=g)
    beta = torch.tensor([1.5, -0.8, 0.6, 2.0, -1.2, 0.9])
    y = X @ beta.unsqueeze(-1) + 0.5 + 0.3 * torch.randn(256, 1, generator=g)
    lin = nn.Linear(6, 1)
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(256, 1)], 1), y).solution.reshape(-1)
    with torch.no_grad():
        lin.weight.copy_(sol[:6].reshape(1, -1))
        lin.bias.copy_(sol[6:])
    model = nn.Sequential(lin).to(torch.bfloat16)
    loader = [(X[i:i + 64].to(torch.bfloat16), y[i:i + 64].to(torch.bfloat16)) for i in range(0, 256, 64)]
    rep = _report(model, loader, _loss, ["none"])
    est = run_estimation(model, loader, _loss, EstimationConfig())
    _, edges = _partition(torch.bfloat16, None)
    th = torch.cat([est.theta[k].double().reshape(-1) for k in est.names])
    sg = torch.cat([est.sigma[k].double().reshape(-1) for k in est.names])
    h = _ulp(th, torch.bfloat16) / sg
    assert bool((h > 0.05).all() and (h < 3).all()), h  # the premise: sd of 0.3-20 ulps, far from 0
    truth = torch.tensor([_kappa(float(t), float(s), edges) for t, s in zip(th, sg)], dtype=torch.float64)
    tol = float((1e-9 * truth + torch.where(h <= 0.5, 6e-4 * h ** 6, torch.zeros_like(h))).sum())
    assert float(truth.sum()) < th.numel() - 0.01  # the storage grid matters here
    assert abs(rep.schemes["none"].d_eff - float(truth.sum())) <= tol, (rep.schemes["none"].d_eff, float(truth.sum()))


def test_float32_weights_keep_the_continuous_baseline(monkeypatch):
    """Float32 weights are continuous: no storage grid, kappa = 1 for ``none`` and the baseline, the
    storage-grid code never runs (the report is bitwise the one before the storage grid, docs/validation.md
    "The storage grid of bf16 / fp16 weights"); a ``bf16`` cast of them is scored on its own table."""
    import sys

    from mis_lightning.quantization import base
    from mis_lightning.quantization.storage_grid import storage_grids

    def never(*a, **k):
        raise AssertionError("storage grid used for float32 weights")

    monkeypatch.setattr(sys.modules["mis_lightning.assess"], "storage_cell_moments", never)
    monkeypatch.setattr(base, "storage_cell_moments", never)
    model, loader, loss = _mlp(torch.float32)
    assert storage_grids(model, [n for n, _ in model.named_parameters()]) == {}
    rep = _report(model, loader, loss, ["none", "bf16"])
    assert rep.schemes["none"].d_eff == rep.schemes["none"].d
    # (the same figure by two roundings: the correlated form's mean before and after saturation)
    assert abs(rep.baseline_leakage - rep.schemes["none"].leakage) <= 1e-15
    assert rep.schemes["bf16"].d_eff < rep.schemes["none"].d


@pytest.mark.parametrize("scheme", ["intx_weight_only_int4", "int8_weight_only"])
def test_a_subset_view_of_a_stored_grid_reads_its_elements(scheme):
    """bb36: the sampled bootstrap draws' view of a grid on some of its elements (``_subset_grid``)
    gives bitwise the full grid's moments there on bf16-stored weights. Before, its
    ``element_grid`` lacked the ``shared`` keyword ``ParamGrid._chunk_grid`` passes (cm35): a
    TypeError, and every bf16 / fp16 model of 1e5-1e6 weights reported its intx schemes as failed."""
    import importlib

    from test_scoring_pass import _estimate  # tests/

    from mis_lightning.quantization import get_scheme

    A = importlib.import_module("mis_lightning.assess")
    model, est = _estimate("factored")
    model = model.to(torch.bfloat16)
    params = dict(model.named_parameters())
    for n in est.names:
        est.theta[n] = params[n].detach().float().reshape(est.theta[n].shape)
    g = A._prepare_scheme(est, model, get_scheme(scheme), 0).grids["0.weight"]
    assert g.storage_dtype == torch.bfloat16
    n = est.theta["0.weight"].numel()
    sel = torch.arange(3, n, 7)
    th, sg = est.theta["0.weight"].double().reshape(-1), est.sigma["0.weight"].double().reshape(-1)
    full = g.moments(th, sg, 0, n)
    sub = A._subset_grid(g, 0, n, sel).moments(th[sel], sg[sel], 0, sel.numel())
    assert torch.equal(sub.kappa, full.kappa[sel]) and torch.equal(sub.m4, full.m4[sel])
    assert float(full.kappa.max()) > 0  # not all pinned: the comparison reads moving cells
