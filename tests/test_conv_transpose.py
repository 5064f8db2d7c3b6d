"""Transposed convolutions in the per-layer program and the K-FAC correction (ct41).

Before, ``nn.ConvTranspose*d`` sent the estimation to torch.func's per-sample gradients and got no
Kronecker factors: its weights' diagonal sigma read 0.42x (ConvTranspose1d) / 0.62x (2d) the exact
sandwich's at the median (benchmarks/kfac_conv.py ``convtranspose1d`` / ``convtranspose2d``, n =
400), the unsafe side. The per-layer program now takes the layer as the Linear over the patches of
its equivalent convolution (zero-stuffed input, flipped kernel), whose KFC factors correct it."""

from __future__ import annotations

import pytest
import torch
from _nets import fit_lbfgs  # tests/_nets.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.estimation.estimate import MomentAccumulator, estimate
from mis_lightning.estimation.linear_factors import KronBlock, LayerProgram, per_layer_parameters
from mis_lightning.estimation.per_sample import LossProgram


def _sq(out, y):
    return (out - y).square().reshape(out.shape[0], -1).sum(1)


_LAYERS = {
    "1d": lambda: nn.ConvTranspose1d(2, 3, 3),
    "1d_stride_groups": lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                   dilation=2),
    "1d_cropped": lambda: nn.ConvTranspose1d(2, 3, 2, stride=2, padding=2, output_padding=1),
    "2d": lambda: nn.ConvTranspose2d(2, 4, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2),
                                     dilation=(1, 2)),
    "3d_groups": lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, groups=2),
}


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_per_sample_gradients_match_torch_func(kind):
    """Every stride / padding (a negative crop in ``1d_cropped``) / output padding / dilation / groups
    case: the per-layer program's per-sample gradients equal torch.func's to 1e-12 (float64; measured
    <= 1.5e-14). Before ct41 the program refused the layer (NotImplementedError)."""
    torch.manual_seed(0)
    layer = _LAYERS[kind]().double()
    nd = layer.weight.dim() - 2
    m = nn.Sequential(layer, nn.Flatten()).eval()
    x = torch.randn(5, layer.in_channels, *[4 if nd < 3 else 2] * nd, dtype=torch.float64)
    y = torch.randn_like(m(x))
    names = [n for n, _ in m.named_parameters()]
    assert per_layer_parameters(m, names) == names
    ref = LossProgram(m, _sq, names, dtype=torch.float64)
    prog = LayerProgram(m, _sq, names, torch.float64, reference=ref)
    prog.batch(x, y, 5)  # the first-batch check against torch.func passes
    got = prog.per_sample_grads(x, y)
    want = ref.per_sample_grads(x, y) if hasattr(ref, "per_sample_grads") else None
    if want is None:  # autograd, record by record
        want = {n: [] for n in names}
        for i in range(5):
            m.zero_grad()
            _sq(m(x[i:i + 1]), y[i:i + 1]).sum().backward()
            for n, p in m.named_parameters():
                want[n].append(p.grad.reshape(-1).clone())
        want = {n: torch.stack(v) for n, v in want.items()}
    for n in names:
        assert torch.allclose(got[n], want[n].reshape(5, -1), rtol=0, atol=1e-12), n


def test_the_block_layout_round_trips_swaps_the_channel_axes_and_flips_the_kernel():
    """``KronBlock.to_block``: a transposed convolution's weight ``[C_in, C_out/G, k]`` as
    ``[G, C_out/G, C_in/G * k]``, entry ``[g, o, c k + j]`` being ``W[g C_in/G + c, o, k - 1 - j]``
    (the patches' window offsets, :func:`_transposed_patches`); ``to_param`` its inverse."""
    w = torch.arange(4 * 3 * 2, dtype=torch.float64).reshape(4, 3, 2)  # C_in 4, groups 2, C_out/G 3, k 2
    blk = KronBlock("m", "m.weight", None, groups=2, fan=2 * 2, out=3, transposed=(2,))
    b = blk.to_block(w.reshape(1, -1))[0]
    assert b.shape == (2, 3, 4)
    assert float(b[1, 2, 1 * 2 + 0]) == float(w[2 + 1, 2, 1])
    assert torch.equal(blk.to_param(b.unsqueeze(0))[0], w.reshape(-1))
    w2 = torch.randn(2, 3, 2, 3, dtype=torch.float64)  # 2-d kernel, one group
    blk2 = KronBlock("m", "m.weight", None, groups=1, fan=2 * 6, out=3, transposed=(2, 3))
    b2 = blk2.to_block(w2.reshape(1, -1))[0, 0]
    assert float(b2[1, 1 * 6 + 0 * 3 + 2]) == float(w2[1, 1, 1, 0])
    assert torch.equal(blk2.to_param(blk2.to_block(w2.reshape(1, -1))), w2.reshape(1, -1))


def _fitted(make, shape, n=200):
    """A linear model at its least-squares minimum on inputs whose even channels are AR(1) (rho 0.9
    along the last axis) and odd ones white (the weights' VIFs then differ by input channel, so a
    layout error shows), targets from a teacher of the same form plus noise (sd 0.5)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    for t in range(1, x.shape[-1]):
        x[:, ::2, t] = 0.9 * x[:, ::2, t - 1] + 0.19 ** 0.5 * x[:, ::2, t]
    teacher, m = make().double(), make().double()
    with torch.no_grad():
        out = teacher(x)
        y = out + 0.5 * torch.randn(out.shape, generator=g, dtype=torch.float64)
    fit_lbfgs(m, lambda: _sq(m(x), y).mean(), max_iter=100, tolerance_grad=1e-10)
    return m, DataLoader(TensorDataset(x, y), batch_size=n)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_transposed_convolution_reads_the_exact_sigma(groups):
    """A linear ``ConvTranspose1d`` (stride 2, KFC's model exact: independent residuals per output
    position): its weights' sigma median within 10% of the exact sandwich's and each weight within
    0.75-1.35x, the tolerances of tests/test_layer_kinds.py (the exact sandwich's residual-weighted V
    equals KFC's model in expectation only). Measured n = 200: groups 1 median 1.00 (0.91-1.05),
    groups 2 1.00 (0.88-1.01); before ct41 the AR(1) channels' weights read 0.38x / 0.35x (min): this
    fails, and so does a weight layout not swapped back (``to_param`` the identity: 0.38-2.38x /
    0.36-2.51x). The estimation runs on the per-layer program, the layer named among the corrected
    convolutions."""
    m, dl = _fitted(lambda: nn.Sequential(nn.ConvTranspose1d(2 * groups, 3 * groups, 3, stride=2, padding=1,
                                                             groups=groups)), (2 * groups, 12))
    diag = estimate(m, dl, _sq, mode="diagonal", hessian="ggn")
    exact = estimate(m, dl, _sq, mode="exact", hessian="ggn")
    r = diag.sigma["0.weight"].reshape(-1) / exact.sigma["0.weight"].reshape(-1)
    assert float(r.min()) > 0.75 and float(r.max()) < 1.35 and abs(float(r.median()) - 1) < 0.1, r
    dg = diag.diagnostics
    assert dg["kfac_convolutions"] == ["0"] and dg["kfac_uncorrected_layers"] == []
    assert isinstance(diag._program, LayerProgram)


def test_an_output_size_call_is_taken_with_its_own_output_padding():
    """``ConvTranspose1d(x, output_size=...)`` pads the output beyond the layer's ``output_padding``:
    until cq41 the per-layer program refused the layer at the first batch (torch.func, no K-FAC
    correction for any layer, silently); now the call's output padding is read from its shapes and the
    per-sample gradients equal autograd's record by record to 1e-12 (float64; measured ~1e-16)."""
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ct = nn.ConvTranspose1d(1, 2, 3, stride=2)

        def forward(self, x):
            return self.ct(x, output_size=[2 * x.shape[-1] + 2]).flatten(1)

    torch.manual_seed(0)
    m = Up().double().eval()
    x = torch.randn(8, 1, 4, dtype=torch.float64)
    y = torch.randn(8, 20, dtype=torch.float64)
    acc = MomentAccumulator(m, _sq, mode="diagonal", hessian="ggn", num_records=4)
    acc.update((x, y))
    assert isinstance(acc.factored, LayerProgram)
    got = acc.factored.per_sample_grads(x, y)
    for i in range(8):
        m.zero_grad()
        _sq(m(x[i:i + 1]), y[i:i + 1]).sum().backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad.reshape(-1), rtol=0, atol=1e-12)


def test_the_kfc_factors_on_the_equivalent_convolutions_patches_agree_with_the_trace_ones(monkeypatch):
    """On a linear transposed convolution (independent residuals) KFC's factors, formed from
    :func:`_transposed_patches` (the zero-stuffed input, the kernel flipped), and the default partial
    traces, formed from the output gradient's patches and ``KronBlock.to_block``, are the same
    Kronecker model: the corrected sigma agrees to 1e-8 relative (measured ~1e-15). Without the
    kernel flip in ``to_block`` / ``to_param`` it moves by up to 2.8e-4 and this fails (the exact
    comparisons above do not see it: AR(1) inputs are time-reversible, so the flipped VIFs nearly
    match). 2-d, stride 2, output padding."""
    import importlib

    LF = importlib.import_module("mis_lightning.estimation.linear_factors")
    m, dl = _fitted(lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, (3, 2), stride=2, padding=(1, 0),
                                                             output_padding=1)), (2, 4, 4), n=150)
    sig = {}
    for kind in ("trace", "kfc"):
        monkeypatch.setattr(LF, "KFAC_CONV_FACTORS", kind)
        est = estimate(m, dl, _sq, mode="diagonal", hessian="ggn")
        assert est.diagnostics["kfac_convolutions"] == ["0"], kind
        sig[kind] = est.sigma["0.weight"].reshape(-1)
    torch.testing.assert_close(sig["kfc"], sig["trace"], rtol=1e-8, atol=0)
