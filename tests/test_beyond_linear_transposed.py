"""Transposed convolutions in the quantization beyond nn.Linear (cq41): ``ConvTranspose*d`` weights
``[C_in, C_out/groups, *kernel]`` scaled per OUTPUT channel (before: left in float, scored as
unprotected), and a transposed convolution called with ``output_size`` in the per-layer estimation."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
import mis_lightning.estimation.linear_factors as lf
from mis_lightning.estimation.estimate import estimate
from mis_lightning.estimation.linear_factors import LayerProgram
from mis_lightning.quantization import get_scheme
from mis_lightning.report import regime_failures


def _decoder() -> nn.Module:
    torch.manual_seed(0)
    # ConvTranspose2d(4 -> 6, groups 2): weight [4, 3, 3, 3], output channel j of group g is weight[2g:2g+2, j]
    return nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(6 * 9 * 9, 3)).eval()


def _independent_scale(w: torch.Tensor, groups: int, denom: float) -> torch.Tensor:
    """Per element of ``w`` [C_in, C_out/G, *k]: max |w| over its output channel's weights / denom,
    formed channel by channel (no shared code with the library)."""
    per_in = w.shape[0] // groups
    out = torch.empty_like(w, dtype=torch.float64)
    for g in range(groups):
        for j in range(w.shape[1]):
            rows = slice(g * per_in, (g + 1) * per_in)
            out[rows, j] = float(w[rows, j].abs().max()) / denom
    return out


@pytest.mark.parametrize("scheme,denom,rtol", [("rtn_int8", 127.0, 1e-12), ("int8_weight_only", 127.5, 1e-6),
                                               ("rtn_int4", 7.0, 1e-12)])
def test_grid_scale_is_the_output_channels_absmax_over_qmax(scheme, denom, rtol):
    """The grid's per-element scale (what the cell moments read, ``element_grid``) equals each output
    channel's max|w| / qmax (torchao's symmetric rule: / 127.5) computed independently; rtol 1e-12 for
    the float64 rtn_* rule, 1e-6 for torchao's float32 scale. A scale along dim 0 (per input channel,
    the layout error) differs by -4% to +6% on this weight: fails. The copy's forward is the
    dequantized weights' forward, bit for bit (it holds them)."""
    m = _decoder()
    res = get_scheme(scheme).apply(m)
    g = res.grids["0.weight"]
    w = m[0].weight.detach()
    scale, _, code = g.element_grid(0, g.numel)
    torch.testing.assert_close(scale.reshape(w.shape), _independent_scale(w, 2, denom), rtol=rtol, atol=0)
    deq = g.dequantized.reshape(w.shape)
    torch.testing.assert_close(deq.double(), (code * scale).reshape(w.shape), rtol=1e-6, atol=0)
    assert float((deq - w).abs().max()) <= float(scale.max()) / 2 * (1 + 1e-6)  # round to nearest
    x = torch.randn(5, 4, 4, 4)
    ref = res.model[2](F.conv_transpose2d(x, deq, m[0].bias, stride=2, groups=2).flatten(1))
    assert torch.equal(res.model(x), ref)
    assert g.method.startswith("ConvTranspose2d: per-channel int")
    assert "0.weight" not in res.unquantized and torch.equal(m[0].weight, w)  # the user's model untouched


def test_group_sizes_take_boxes_of_the_transposed_layout_or_say_why_not():
    """``per_group``: whole kernels of ``g / prod(k)`` input channels (a box), a part of one kernel
    (the ``[C_in, C_out/G, prod(k)]`` view), or left in float with the reason (a group across two
    input channels' kernels is not contiguous in the transposed weight)."""
    sc = get_scheme("intx_weight_only_int4_g32")
    whole = nn.Sequential(nn.ConvTranspose2d(16, 2, 2), nn.Flatten(), nn.Linear(2 * 5 * 5, 2))  # 8 kernels of 4
    g = sc.apply(whole).grids["0.weight"]
    assert g.block_size == (8, 1, 2, 2)
    w = whole[0].weight.detach()
    s, _, _ = g.element_grid(0, g.numel)
    want = w.reshape(2, 8, 2, 4).abs().amax((1, 3)) / 7.5  # [group of 8 input channels, output channel]
    torch.testing.assert_close(s.reshape(w.shape)[::8, :, 0, 0], want.double(), rtol=1e-6, atol=0)
    part = nn.Sequential(nn.ConvTranspose1d(1, 2, 64), nn.Flatten(), nn.Linear(2 * 67, 2))  # kernel 64 = 2 groups
    g = sc.apply(part).grids["0.weight"]
    assert g.shape == (1, 2, 64) and g.block_size == (1, 1, 32)
    straddle = nn.Sequential(nn.ConvTranspose2d(32, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))  # 288 = 9 x 32
    why = sc.apply(straddle).unquantized["0.weight"]
    assert "span the kernels (9 weights) of two input channels" in why


def test_assess_no_longer_lists_the_transposed_weights_as_float():
    """The report's quantized share counts the decoder's ConvTranspose1d weight (before cq41: float,
    its 12 weights in the float share and the warning), and no float warning names it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (2, 4)), nn.ConvTranspose1d(2, 2, 3, stride=2),
                      nn.Flatten(), nn.Linear(18, 3)).eval()
    g = torch.Generator().manual_seed(0)
    dl = DataLoader(TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)),
                    batch_size=20)
    rep = ml.assess(m, ["rtn_int8"], dl, lambda o, y: F.cross_entropy(o, y, reduction="none"),
                    num_records=8, uncertainty_draws=0, estimation="diagonal", covariance="independent")
    s = rep.schemes["rtn_int8"]
    weights = 32 + 12 + 54  # the Linear, ConvTranspose1d and head weights; 8 + 2 + 3 biases stay float
    assert s.quantized_fraction == pytest.approx(weights / (weights + 13))
    assert s.layers["2.weight"].quantized_by.startswith("ConvTranspose1d: per-channel int8")
    assert not any("2.weight" in w for w in rep.warnings if "float" in w and "quantizes beyond" not in w)


def test_cell_moments_read_the_output_channels_scale_with_the_self_checks_off(monkeypatch):
    """The grid's cell moments (the fused kernel: 65,536 weights, above ``TABLE_MIN_ELEMENTS``) with the
    sampled self-checks off equal the exact cell sums (every fast path disabled), within the self-check's
    own stated error (``fastpath.APPROXIMATION``), at a per-element scale that is each output channel's
    max|w| / 127 formed independently (rtol 1e-12, float64 rule); the weights the released scale gives
    away (one absmax per output channel) score as float (kappa 1)."""
    import mis_lightning.functional.affine as A
    import mis_lightning.functional.fastpath as fp
    import mis_lightning.quantization.base as qb

    monkeypatch.setattr(fp.GUARD, "sample_size", lambda *a, **k: 0)
    monkeypatch.setattr(qb, "REUSE_CHUNK_FACTS", False)
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(128, 64, 4, groups=2)
    g = get_scheme("rtn_int8").apply(nn.Sequential(ct)).grids["0.weight"]
    w = ct.weight.detach()
    assert g.numel >= A.TABLE_MIN_ELEMENTS
    s, _, _ = g.element_grid(0, g.numel)
    torch.testing.assert_close(s, _independent_scale(w, 2, 127.0).reshape(-1), rtol=1e-12, atol=0)
    theta = w.reshape(-1).double()
    gen = torch.Generator().manual_seed(1)
    h = torch.exp(torch.empty(g.numel, dtype=torch.float64).uniform_(-1.0, 3.0, generator=gen))  # steps 0.4-20 sd
    sigma = s / h
    fast = g.moments(theta, sigma, 0, g.numel)
    monkeypatch.setattr(fp.GUARD, "disabled", {A.FUSED_PATH: "test", A.SPARSE_PATH: "test"})
    ref = g.moments(theta, sigma, 0, g.numel)
    rev = g.revealed.reshape(-1)
    assert int(rev.sum()) == 64 and bool((fast.kappa[rev] == 1).all())
    for name, field in zip(fp.MOMENTS, ("kappa", "mean_abs", "m4")):
        f, r = getattr(fast, field), getattr(ref, field)
        bound = fp.allowed(name, r, h, fp.APPROXIMATION)
        assert bool(((f - r).abs() <= bound).all()), (name, float((f - r).abs().max()))


# --------------------------------------------------------------------------- estimation: output_size
_OUT = {  # (layer, input spatial shape, output_size): the call's output padding another than the layer's (0)
    "1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1), (5,), (10,)),
    "1d_dilated_groups": (lambda: nn.ConvTranspose1d(4, 2, 3, stride=2, dilation=3, groups=2), (4,), (14,)),
    "2d": (lambda: nn.ConvTranspose2d(2, 2, (3, 2), stride=(2, 3), padding=(1, 0)), (3, 2), (6, 7)),
}


class _Sized(nn.Module):
    """A Conv1d/2d, then the transposed convolution called with ``output_size`` (a U-Net decoder's
    ``up(x, output_size=skip.shape)``), then a Linear head."""

    def __init__(self, kind: str, output_size: bool = True) -> None:
        super().__init__()
        make, shape, self.size = _OUT[kind]
        torch.manual_seed(0)
        self.ct = make()
        conv = nn.Conv1d if len(shape) == 1 else nn.Conv2d
        self.c = conv(2, self.ct.in_channels, 3, padding=1)
        self.head = nn.Linear(self.ct.out_channels * int(torch.tensor(self.size).prod()), 3)
        if not output_size:  # the same function with the output padding set on the layer
            mins = [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, s, p, d, k in
                    zip(shape, self.ct.stride, self.ct.padding, self.ct.dilation, self.ct.kernel_size)]
            self.ct.output_padding = tuple(o - m for o, m in zip(self.size, mins))
        self.output_size = output_size

    def forward(self, x):
        h = self.ct(self.c(x), output_size=list(self.size)) if self.output_size else self.ct(self.c(x))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("factors", ["trace", "kfc"])
@pytest.mark.parametrize("kind", list(_OUT))
def test_output_size_is_taken_by_the_per_layer_program_with_the_kfac_correction(kind, factors, monkeypatch):
    """ct41: a transposed convolution called with ``output_size`` sent the estimation to torch.func and
    cost every convolution its K-FAC correction, silently (no kfac diagnostics, no warning). Now the
    call's output padding is read from its shapes: the estimate equals, to 1e-9 relative (float64; the
    same products in another order at most), that of the same function with the output padding set on
    the layer (called without ``output_size``), the per-layer program ran (its first-batch check against
    torch.func's per-sample gradients passed) and both convolutions are K-FAC corrected. Both factor
    forms: the partial traces (from the output gradient's patches) and KFC's (the input's patches)."""
    monkeypatch.setattr(lf, "KFAC_CONV_FACTORS", factors)
    _, shape, size = _OUT[kind]
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 2, *shape, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (24,), generator=g)
    dl = DataLoader(TensorDataset(X, Y), batch_size=12)
    ests = []
    for sized in (True, False):
        m = _Sized(kind, sized).double().eval()
        assert m(X).shape == (24, 3) and m.ct(m.c(X), output_size=list(size)).shape[2:] == size
        ests.append(estimate(m, dl, lambda o, y: F.cross_entropy(o, y, reduction="none"),
                                mode="diagonal", hessian="ggn"))
    a, b = ests
    assert isinstance(a._program, LayerProgram)
    assert a.diagnostics["kfac_correction"] is True and sorted(a.diagnostics["kfac_convolutions"]) == ["c", "ct"]
    assert a.diagnostics["kfac_uncorrected_layers"] == []
    for n in b.sigma:
        torch.testing.assert_close(a.sigma[n], b.sigma[n], rtol=1e-9, atol=0)


class _Twice(nn.Module):
    """A convolution called twice per forward: no per-layer program takes it (nor its neighbours)."""

    def __init__(self, conv: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 2, 3, padding=1) if conv else nn.Linear(5, 5)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.conv(x))).flatten(1))


@pytest.mark.parametrize("case", ["conv", "linear", "conv_taken", "linear_taken", "switched_off"])
def test_a_refused_model_says_its_layers_lost_the_kfac_correction(case, monkeypatch):
    """Where the per-layer program refuses the model at its first batch (here a layer called twice with
    ``REPEATED_CONV_CALLS`` / ``REPEATED_LINEAR_CALLS`` off, the path before tw51), its
    convolutions and Linear layers lose their K-FAC correction: until cq41 silently (no kfac
    diagnostics at all); now ``kfac_lost`` gives the cause naming the layer, ``kfac_uncorrected_layers``
    the layers, :func:`estimator_warnings` a report line and the rows a ``*``
    (``regime_failures``). An all-Linear model loses it too (nu49: its factored or per-layer program,
    or kf33's side program for a classifier, corrects it otherwise; said nothing before). No line with
    the correction switched off (``KFAC_CORRECTION``). ``conv_taken`` / ``linear_taken``: the per-layer
    program takes the twice-called layer's calls as positions (tw51), every layer corrected, no line, no
    mark."""
    E = importlib.import_module("mis_lightning.estimation.estimate")  # (the package exports the function)
    if case == "switched_off":
        monkeypatch.setattr(E, "KFAC_CORRECTION", False)
    if case in ("conv", "linear"):
        LF = importlib.import_module("mis_lightning.estimation.linear_factors")
        monkeypatch.setattr(LF, "REPEATED_CONV_CALLS", False)
        monkeypatch.setattr(LF, "REPEATED_LINEAR_CALLS", False)
    m = _Twice(case not in ("linear", "linear_taken")).double().eval()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 2, 5, generator=g, dtype=torch.float64)
    dl = DataLoader(TensorDataset(X, torch.randint(0, 3, (24,), generator=g)), batch_size=12)
    est = estimate(m, dl, lambda o, y: F.cross_entropy(o, y, reduction="none"), mode="diagonal", hessian="ggn")
    lines = [w for w in E.estimator_warnings(est.diagnostics) if "K-FAC correction" in w]
    marked = "diagonal sigma without its K-FAC correction" in regime_failures(est.diagnostics, 1000, 1, None)
    if case == "switched_off":
        assert "kfac_lost" not in est.diagnostics and lines == [] and not marked
        return
    if case in ("conv_taken", "linear_taken"):
        dg = est.diagnostics
        assert "kfac_lost" not in dg and lines == [] and not marked
        assert dg["kfac_correction"] is True and dg["kfac_uncorrected_layers"] == []
        assert dg["kfac_corrected_weights"] == (14 if case == "conv_taken" else 30) + 33
        return
    dg = est.diagnostics
    assert dg["kfac_correction"] is False and dg["kfac_lost"] == "layer 'conv' is called 2x in this batch's forward, not once"
    assert dg["kfac_uncorrected_layers"] == ["conv", "head"]
    assert dg["kfac_uncorrected_weights"] == (14 if case == "conv" else 30) + 33
    assert marked
    assert len(lines) == 1 and "('conv', 'head'; rows marked *)" in lines[0] and "is called 2x in this batch's forward" in lines[0]
