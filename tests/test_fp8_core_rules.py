"""The closed-form core of the float-format fast path with the w^9 term and node counts chosen
by span (issue 13: fp8_weight_only at most 2x an integer scheme).

``table._table_fast_moments`` sums the fine core of a float8 table around 0 in closed form: a
per-cell series in the cell width ``w`` (sd units), now to ``w^9`` so that cells up to
``_CORE_MAX_STEP = 0.3`` sd qualify (was 0.1 with the series to ``w^7``), and Gaussian
quadratures of the table's ``W^3 .. W^9`` measures with the fewest nodes (4 to 16,
``_CORE_RULES``) whose span covers the core's extent in sd units (was 12 nodes always).

Reference: the exact sum over every cell of the whole table (``_full_sum``), built from all 256
bit patterns of the format (NaNs dropped, +-0 merged). Tolerances (absolute, float64): kappa and
mean_abs 1e-12, m4 2e-11; measured <= 6.1e-14 / 6.1e-15 / 4.0e-12 on these draws. They are
tight enough to catch a missing ``w^9`` term (kappa 6.0e-12, m4 2.6e-10 off on the same draws:
``test_dropping_the_w9_term_is_caught``). Leakage and MIS are sums of per-weight kappa (and
mean_abs / m4 in the one-coordinate and spread forms), so per-weight errors of this size move
them by far less than 1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.functional.cells import moments_from_alpha
from mis_lightning.quantization.casts import representable_values

F64 = torch.float64
TOL = {"kappa": 1e-12, "mean_abs": 1e-12, "m4": 2e-11}
FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]

pytestmark = pytest.mark.usefixtures("one_thread_fresh_guard")


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a float8 format, from its 256 bit patterns."""
    v = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).to(F64)
    return torch.unique(v[torch.isfinite(v)])  # sorted; -0 and +0 merge


def _full_sum(theta, sigma, values, scale):
    """Exact moments over every cell of the table (all edges at once)."""
    mids = 0.5 * (values[1:] + values[:-1])
    inf = torch.tensor([math.inf], dtype=F64)
    out = {k: [] for k in TOL}
    for a in range(0, theta.numel(), 2048):
        e = torch.cat([-inf, mids, inf]).unsqueeze(0) * scale[a : a + 2048, None]
        mm = moments_from_alpha((e - theta[a : a + 2048, None]) / sigma[a : a + 2048, None])
        for k in out:
            out[k].append(getattr(mm, k))
    return {k: torch.cat(v) for k, v in out.items()}


def _cases(dtype: torch.dtype, c: int, seed: int, lo: float = 1e-2, hi: float = 4.0):
    """Weights over and beyond the table with sds from ``lo`` to ``hi`` tables (default ~1/100
    of the table to ~4 tables: every core size and every node count, cells up to 0.2 sd in the
    core)."""
    gen = torch.Generator().manual_seed(seed)
    values = _all_values(dtype)
    vmax = float(values.max())
    scale = torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(1e-3), 0.0, generator=gen))
    theta = (torch.rand(c, generator=gen, dtype=F64) * 2.2 - 1.1) * vmax * scale
    sigma = scale * vmax * torch.exp(torch.empty(c, dtype=F64).uniform_(math.log(lo), math.log(hi),
                                                                        generator=gen))
    return theta, sigma, values, scale


def _errors(theta, sigma, values, scale, ref):
    # the exact path, which holds the closed-form core (the float8 interpolation table in front
    # of it, table._table_fast_moments, has its own tolerance: tests/test_fp8_interp.py)
    got, core = T._table_sum_moments(theta, sigma, values, scale)
    return {k: float((getattr(got, k) - ref[k]).abs().max()) for k in TOL}, core


def test_all_bit_patterns_are_the_table():
    for dtype in FORMATS:
        assert torch.equal(_all_values(dtype), representable_values(dtype).to(F64))


@pytest.mark.parametrize("dtype", FORMATS)
def test_core_equals_the_exact_sum_over_every_value(dtype, monkeypatch):
    """One call over sds of ~1/100 to 20 tables, then one call per quadrature rule with every
    element's whole-table span (``zmax * scale / sigma``) inside that rule's band (a group of
    elements takes its largest node count, so mixed spans would hide the small rules): every
    node count the format reaches is used and every element is within the tolerances of the
    exact sum."""
    used: set[int] = set()
    real = T._core_side_kernel

    def spy(u0, r, e_lo, e_hi, nodes, *rest):
        used.add(nodes.numel())
        return real(u0, r, e_lo, e_hi, nodes, *rest)

    monkeypatch.setattr(T, "_core_side_kernel", spy)
    T._RULES.clear()
    theta, sigma, values, scale = _cases(dtype, 3000, 21, 1e-2, 20.0)
    calls = [(theta, sigma, values, scale)]
    zmax = float(T._core_rules(values, theta.device).zmax[0])  # the whole table's core
    lo = 0.05
    for i, (_, hi) in enumerate(T._CORE_RULES):
        th, _, v, sc = _cases(dtype, 250, 40 + i)
        span = torch.linspace(lo * 1.02, hi * 0.98, 250, dtype=F64)
        calls.append((th, sc * zmax / span, v, sc))
        lo = hi
    on_core = 0
    for theta, sigma, values, scale in calls:
        ref = _full_sum(theta, sigma, values, scale)
        err, core = _errors(theta, sigma, values, scale, ref)
        on_core += int(core.sum())
        for k, tol in TOL.items():
            assert err[k] <= tol, (k, err[k])
    assert on_core > 0.5 * (3000 + 250 * len(T._CORE_RULES))  # most elements on the closed form
    # every node count exercised (e5m2's cells, a quarter binade, reach 0.2 sd before its
    # whole-table core spans more than 1.2 sd: its step limit binds first)
    assert used == ({q for q, _ in T._CORE_RULES} if dtype == torch.float8_e4m3fn else {4, 6, 8, 10}), used


def test_dropping_the_w9_term_is_caught(monkeypatch):
    """The tolerances above see a core without its w^9 term (cells up to 0.3 sd need it)."""
    theta, sigma, values, scale = _cases(torch.float8_e4m3fn, 6000, 21)
    ref = _full_sum(theta, sigma, values, scale)
    coef = T._CORE_COEF.copy()
    coef[:, T._CORE_ORDERS.index(9), :] = 0.0
    monkeypatch.setattr(T, "_CORE_COEF", coef)
    T._RULES.clear()
    try:
        err, _ = _errors(theta, sigma, values, scale, ref)
    finally:
        T._RULES.clear()
    assert err["kappa"] > TOL["kappa"] and err["m4"] > TOL["m4"], err


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_core_rules_bitwise_the_per_rule_sums(dtype):
    """fc26: the cores' discrete moments ``sum_k W_k^p t_k^n`` are formed once per core and
    read by every rule (a first-call cost of bf16 / fp16: 168 -> 48 sums per core); each rule's
    nodes and contracted weights are bitwise those of the per-rule expression they replace."""
    import numpy as np

    values = representable_values(dtype).to(F64)
    rules = T._CoreRules(values, torch.device("cpu"))
    j = rules.lo.numel() - 1  # the smallest core (fewest cells: cheap)
    rules.prepare(torch.tensor([j]))
    coef = T._CORE_COEF * ((-2.0) ** np.arange(T._CORE_POWERS) * T._INV_SQRT_2PI)[:, None, None]
    a, b, zmax = int(rules.lo[j]), int(rules.hi[j]), float(rules.zmax[j])
    Wc, t = rules._W[a:b] / zmax, rules._C[a:b] / zmax
    for i, (q, _) in enumerate(T._CORE_RULES):
        x, w3 = T._gauss_rule(t, Wc**3, q)
        vand = np.vander(x, q, increasing=True).T
        ws = [w3] + [np.linalg.solve(vand, np.array([np.sum(Wc**p * t**n) for n in range(q)]))
                     for p in T._CORE_ORDERS[1:]]
        want = np.einsum("klc,lq->kqc", coef, np.stack(ws)).reshape(T._CORE_POWERS * q, -1)
        k = j * len(T._CORE_RULES) + i
        assert torch.equal(rules.nodes[k], torch.as_tensor(x * zmax, dtype=F64))
        assert torch.equal(rules.combined[k], torch.as_tensor(want, dtype=F64))
