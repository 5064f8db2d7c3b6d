"""bf16 / fp16 models: the schemes quantize the *stored* weights, and release values in the model's dtype.

A model stored in ``D`` (bfloat16 / float16) holds ``rnd_D(theta-hat)``; the release is a function
of it, so in the Gaussian model of ``theta-hat`` the cells are unions of storage cells, with edges
at the storage midpoints next to the grid's own (up to 0.25 int8 step away near a bf16 block's
absmax: the grid's own edges read kappa up to 29% off at sd = step/2, 3.6% at sd = step; method.md
section 5). And the released value is what the backend computes and holds (e.g. torchao's
``Int8Tensor.dequantize()`` on bf16 weights: ``rnd_bf16(rnd_f32(q * scale))``), not ``q * scale``.

References, independent of the library's cell code:
(1) the quantized model's own weights as it serves them (``dequantize()`` of torchao's tensors and
    torch's quantized tensors, the written-back parameter of the in-place backends), on models that
    hold every ``D`` value of a block's range, with power-of-two scales (exact ties);
(2) a scipy ``ndtr`` Gaussian cell sum over the partition the real backend gives: the codes of
    every ``D`` value of the block (the quantized model's), edges at the midpoints between adjacent
    ``D`` values whose code differs, the bounds at the midpoints inside the block's stored extremes
    (the weights the scale gives away), revealed tails beyond (method.md section 5). Tolerance 1e-9
    relative: both sides are float64 sums over the same edges (measured: 1.5e-14).
"""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from _lowp import dtype_values, stored_partition, sweep_linear
from scipy.special import ndtr
from torch import nn

from mis_lightning.quantization import available_schemes, base, get_scheme
from mis_lightning.quantization.base import SchemeError, SchemeUnavailableError

pytest.importorskip("torchao")

DTYPES = [torch.bfloat16, torch.float16]




def _sweep(dtype: torch.dtype, m: float, lo: float, width: int) -> nn.Sequential:
    """A Linear whose rows (blocks of ``width``) hold ``m`` and ``lo`` (every block's scale and zero
    point alike) and then every ``dtype`` value in ``[lo, m]``."""
    return sweep_linear(dtype_values(lo, m, dtype), m, lo, width, dtype)


def _served(model: nn.Module, name: str) -> torch.Tensor:
    """The weight as the quantized model serves it."""
    mod_name, attr = name.rsplit(".", 1)
    w = getattr(model.get_submodule(mod_name), attr)
    if callable(w):  # torch's dynamically quantized Linear: weight() is the packed quantized tensor
        w = w()
    if w.is_quantized or type(w).__module__.startswith("torchao"):
        w = w.dequantize()
    return w.detach()


def _apply(name: str, model: nn.Module):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_scheme(name).apply(model)
    except SchemeUnavailableError as exc:
        pytest.skip(f"{name}: {exc}")
    except SchemeError as exc:
        if "calibration" in str(exc):
            pytest.skip(f"{name}: needs calibration batches (scored by Monte Carlo re-quantization)")
        raise


# 127/128: int8 symmetric scales are powers of two (m / 127 = 2^-7), so many weights sit exactly
# between two codes; 0.61 of it below 0: asymmetric blocks with a zero point
_M = 127 / 128


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("scheme", available_schemes())
def test_cell_value_is_the_release_bit_for_bit(scheme, dtype):
    model = nn.Sequential(_sweep(dtype, _M, -_M, 128)[0], nn.ReLU())
    torch.manual_seed(0)
    second = nn.Linear(128, 64, bias=True).to(dtype)
    with torch.no_grad():
        second.weight.mul_(3.0)
    model.append(second)
    res = _apply(scheme, model)
    params = dict(model.named_parameters())
    checked = 0
    for n, g in res.grids.items():
        if g.rounding != "nearest":  # Monte Carlo re-quantization re-runs the backend itself
            continue
        released = _served(res.model, n).double().reshape(-1)
        assert g.storage_dtype == dtype
        assert torch.equal(g.cell_value(params[n].detach().double().reshape(-1), 0, g.numel), released), n
        checked += 1
    if not checked:
        pytest.skip(f"{scheme}: no round-to-nearest grid")


# schemes with one grid kind each: affine (torchao Int8Tensor, torch's quantize, library RTN),
# quotient (torchao intx on bf16 / fp16), table (float8)
TRUTH = [("int8_weight_only", 128, False), ("intx_weight_only_int8_g32", 32, False),
         ("intx_weight_only_int8_g32_asym", 32, True), ("intx_weight_only_int4_g32", 32, False),
         ("rtn_int8", 128, False), ("native_int8_per_row", 128, False), ("float8_weight_only", 128, False)]


def _truth_kappa(theta: float, sigma: float, edges: np.ndarray, lower: float, upper: float) -> float:
    inner = edges[(edges > lower) & (edges < upper)]
    e = np.concatenate([[lower], inner, [upper]])
    a = (e - theta) / sigma
    pdf = np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
    p = np.diff(ndtr(a))
    d = pdf[:-1] - pdf[1:]
    live = p > 1e-300
    tails = (ndtr(a[0]) - a[0] * pdf[0]) + (ndtr(-a[-1]) + a[-1] * pdf[-1])
    return float((d[live] ** 2 / p[live]).sum() + tails)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1.0, 1.9375], ids=["m1", "m1.94"])
@pytest.mark.parametrize("case", TRUTH, ids=[c[0] for c in TRUTH])
def test_stored_cells_equal_the_gaussian_truth(case, m, dtype):
    name, width, asym = case
    if dtype == torch.float16 and m != 1.0:
        m = 1.9375  # an fp16 value too; kept for the ids
    lo = -0.61 * m if asym else -m
    lo = float(torch.tensor(lo).to(dtype))
    model = _sweep(dtype, m, lo, width)
    res = _apply(name, model)
    g = res.grids["0.weight"]
    th = model[0].weight.detach().double().reshape(-1)
    # the real partition: midpoints between adjacent stored values whose code differs
    u, ch = stored_partition(model, res)
    edges = (0.5 * (u[ch] + u[ch + 1])).numpy()
    assert float(u[-1]) == m and float(u[0]) == lo
    lower, upper = float(0.5 * (u[0] + u[1])), float(0.5 * (u[-2] + u[-1]))
    # the grid locates every stored weight in the cell of its real code, and holds it between
    # the stored edges it scores (the block's extremes, given away by the scale, beyond the bounds)
    scale, zp, _ = g.element_grid(0, g.numel)
    if g.codes is not None:
        sg = torch.full_like(th, 0.5 * float(scale[0]))
        a = g.moments(th, sg, 0, g.numel, use_codes=True)
        b = g.moments(th, sg, 0, g.numel, use_codes=False)
        assert torch.equal(a.kappa, b.kappa) and torch.equal(a.m4, b.m4)
    else:  # float8 (no codes kept): the value each weight is located at is the release's
        assert torch.equal(g.cell_value(th, 0, g.numel), _served(res.model, "0.weight").double().reshape(-1))
    e = g.boundaries(th, 0, g.numel, 1)
    assert bool((((e[:, 1] <= th) & (th <= e[:, 2])) | g.revealed.reshape(-1)).all())
    # kappa at stored weights over the block against the truth
    step = float(scale[0]) * (32.0 if g.kind == "table" else 1.0)  # float8: its widest cells
    pos = u[1:-1][:: max(1, (u.numel() - 2) // 150)]
    n = pos.numel()
    rep = lambda t: t[:1].expand(n).clone()  # noqa: E731
    bounds = g.element_bounds(0, 1)
    assert (float(bounds[0]), float(bounds[1])) == (lower, upper)
    for ratio in (0.5, 1.0):
        sd = ratio * step
        mm = g.element_moments(pos, torch.full_like(pos, sd), rep(scale), rep(zp), None,
                               (rep(bounds[0]), rep(bounds[1])))
        truth = torch.tensor([_truth_kappa(float(p), sd, edges, lower, upper) for p in pos], dtype=torch.float64)
        rel = float((mm.kappa / truth - 1).abs().max())
        assert rel < 1e-9, (ratio, rel)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1.0, 1.9375], ids=["m1", "m1.94"])
def test_fine_sd_reads_the_grids_own_edges_within_the_stated_bound(m, dtype, monkeypatch):
    """Above ``STORAGE_FINE_CELLS`` (2) cells and ``STORAGE_EXACT_MAX_ULPS`` (16) storage ulps, and
    with no bound of the release within reach, a stored grid is scored on its own edges (the
    stored cells' sums cost 5-50x): kappa within 5e-4 relative of the stored cells' (measured,
    int8 per row, the widest storage ulps against the step: 7.4e-5 in bf16, 1.9e-4 in fp16 at 2.5
    steps); mean_abs within 2e-2 and m4 2e-3 (measured 1.2e-2 and 9.5e-4: the affine path's own
    fine-grid form of mean_abs, as large in fp16, whose edges move 8x less). At or below 2 cells the
    stored cells exactly. A switch that moved the wrong way (the grid's own edges at small sd, 29%
    off) fails the first assertion."""
    model = _sweep(dtype, m, -m, 128)
    g = _apply("int8_weight_only", model).grids["0.weight"]
    scale, zp, _ = g.element_grid(0, g.numel)
    pos = torch.linspace(-0.97 * m, 0.97 * m, 301, dtype=torch.float64).to(dtype).double()
    n = pos.numel()
    rep = lambda t: t[:1].expand(n).clone()  # noqa: E731
    b = g.element_bounds(0, 1)
    bounds = (rep(b[0]), rep(b[1]))

    def moments(ratio: float, exact: bool):
        monkeypatch.setattr(base, "STORAGE_EXACT_MAX_ULPS", float("inf") if exact else 16.0)
        monkeypatch.setattr(base, "STORAGE_FINE_CELLS", float("inf") if exact else 2.0)
        return g.element_moments(pos, torch.full_like(pos, ratio * float(scale[0])), rep(scale), rep(zp), None, bounds)

    for ratio in (0.5, 2.0):
        got, exact = moments(ratio, False), moments(ratio, True)
        for f in ("kappa", "mean_abs", "m4", "coverage"):
            assert torch.equal(getattr(got, f), getattr(exact, f)), (ratio, f)
    switched = 0
    for ratio in (2.5, 4.0):
        got, exact = moments(ratio, False), moments(ratio, True)
        own = dataclasses.replace(g, storage_dtype=None).element_moments(
            pos, torch.full_like(pos, ratio * float(scale[0])), rep(scale), rep(zp), None, bounds)
        switched += int((got.kappa != exact.kappa).sum())
        assert bool(((got.kappa == exact.kappa) | (got.kappa == own.kappa)).all())
        for f, tol in (("kappa", 5e-4), ("mean_abs", 2e-2), ("m4", 2e-3)):
            r = float((getattr(got, f) / getattr(exact, f) - 1).abs().max())
            assert r < tol, (ratio, f, r)
    assert switched > 0  # the switch took some elements' own edges


def test_float32_models_keep_continuous_cells():
    """Only bf16 / fp16 weights are stored cells: a float32 model's grids have no storage dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    for name in ("int8_weight_only", "rtn_int8", "float8_weight_only", "intx_weight_only_int4_g32"):
        g = _apply(name, model).grids["0.weight"]
        assert g.storage_dtype is None
        assert _apply(name, model.to(torch.bfloat16)).grids["0.weight"].storage_dtype == torch.bfloat16
        model = model.float()


@pytest.mark.parametrize("name", ["int8_weight_only", "intx_weight_only_int8_g32_asym", "rtn_int4", "float8_weight_only"])
def test_stored_edge_table_equals_each_elements_own_window(name, monkeypatch):
    """The stored edges depend on the grid and the code alone, so the chunk's table of every code's
    stored edge (one row per block) and each element's own window (the fallback where the table
    would hold more edges than the windows) hold the same edges, computed by the same element-wise
    arithmetic: the moments are equal bit for bit, bounds within reach included (the rows' absmax
    / min-max), at sd from step/4 (windows of 2-3 edges) to 4 steps. An off-by-one in the table's
    columns, rows or padding moves every moment by a cell (kappa by >1e-3 at these sd)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=False)
    model = nn.Sequential(lin.to(torch.bfloat16))
    g = _apply(name, model).grids["0.weight"]
    th = model[0].weight.detach().double().reshape(-1)
    step = g.element_grid(0, g.numel)[0] * (32.0 if g.kind == "table" else 1.0)
    real, used = base.ParamGrid._stored_table, []

    def table(self, scale, zp, center, budget):  # the table whatever its size
        used.append(1)
        return real(self, scale, zp, center, 1 << 40)

    monkeypatch.setattr(base.ParamGrid, "_stored_table", table)
    tabled = [g.moments(th, r * step, 0, g.numel) for r in (0.25, 1.0, 4.0)]
    assert used
    monkeypatch.setattr(base.ParamGrid, "_stored_table", lambda *a, **k: None)
    for r, t in zip((0.25, 1.0, 4.0), tabled):
        own = g.moments(th, r * step, 0, g.numel)
        for f in ("kappa", "mean_abs", "m4", "coverage"):
            assert torch.equal(getattr(t, f), getattr(own, f)), (r, f)
        # the bootstrap draws' kappa-only sums: kappa bitwise the same
        assert torch.equal(g.moments(th, r * step, 0, g.numel, kappa_only=True).kappa, own.kappa)
