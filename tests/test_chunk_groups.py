"""Per-layer estimation (LayerProgram): small layers' chunks grouped into one call (issue 14, pf24).

The sums of ``batch_sums`` / ``_add_squares`` are formed a chunk of records at a time
(``chunk_rows``, set by the largest parameter). A layer whose parameters are small now takes
several chunks (up to the whole batch) per ``_layer_grads`` call and reduces them as
``[k, step, numel]`` views; convolution patches are read transposed by the batched GEMM
instead of being copied. The float32 per-chunk sums and GEMVs are the same bit for bit; only
the float64 additions over chunks may be reassociated (~1e-16 relative)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mis_lightning.estimation.linear_factors as LF
from mis_lightning.estimation.linear_factors import LayerProgram, _layer_grads, _patches, _prepare


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def _program(model, monkeypatch, floats):
    monkeypatch.setattr(LF, "CHUNK_FLOATS", floats)
    names = [n for n, _ in model.named_parameters()]
    return LayerProgram(model, _ce, names, torch.float32), names


def _reference(prog, taps, go, sgn, bw):
    """The chunk-by-chunk sums (main before pf24): one chunk of ``chunk_rows`` records per call."""
    f64 = torch.float64
    s1 = {n: torch.zeros(prog._numels[n], dtype=f64) for n in prog.names}
    s2 = {n: torch.zeros_like(v) for n, v in s1.items()}
    h = {n: torch.zeros_like(v) for n, v in s1.items()}
    hd = {n: torch.zeros_like(v) for n, v in s1.items()}
    h2 = {n: torch.zeros_like(v) for n, v in s1.items()}
    for a, c, grads in prog.iter_grads(taps, per_layer=True):
        for n, v in grads.items():
            s1[n] += v.sum(0).to(f64)
            sq = v.reshape(c - a, -1).square_()
            s2[n] += sq.sum(0).to(f64)
            h[n] += (sq.T @ bw[a:c]).to(f64)
    for a, c, grads in prog.iter_grads(taps, go=go, per_layer=True):
        for n, v in grads.items():
            sq = v.reshape(c - a, -1).square_()
            hd[n] += (sq.T @ sgn[a:c]).to(f64)
            h2[n] += sq.square_().sum(0).to(f64)
    return s1, s2, h, hd, h2


@pytest.mark.parametrize("floats,b", [(1 << 12, 37), (1 << 13, 64), (1 << 14, 50)])
def test_grouped_chunks_give_the_chunk_by_chunk_sums(monkeypatch, floats, b):
    model = _cnn()
    prog, names = _program(model, monkeypatch, floats)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g)
    taps = prog.record_taps(x, y, b)
    step = prog.chunk_rows(None, taps)
    assert 1 < step < b  # several chunks, the last one partial where b % step
    go = {m: 0.5 * t + 0.01 for m, t in taps.go.items()}  # another direction
    sgn = torch.randn(b, generator=g).sign()
    bw = torch.rand(b, generator=g)
    want = _reference(prog, taps, go, sgn, bw)
    f64 = torch.float64
    h_all = {n: torch.zeros(prog._numels[n], dtype=f64) for n in names}
    h2_all = {n: torch.zeros_like(v) for n, v in h_all.items()}
    prog._add_squares(taps, go, sgn, h_all, h2_all, 1)
    hd_got, h2_got = {n: v.clone() for n, v in h_all.items()}, h2_all
    h_all = {n: torch.zeros_like(v) for n, v in h_all.items()}
    taps.base_weight = bw
    sums, norm = prog.batch_sums((taps, h_all, None), f64)
    for n in names:
        got = (sums[n][0], sums[n][1], sums[n][2], hd_got[n], h2_got[n])
        for gv, wv in zip(got, (w[n] for w in want)):
            # float32 per-chunk sums identical; float64 additions over chunks reassociated at most
            assert torch.allclose(gv, wv, rtol=1e-14, atol=1e-14 * float(wv.abs().max())), n
    assert torch.allclose(norm, sum(w.sum() for w in want[1].values()).reshape(1), rtol=1e-14)


def test_small_layers_take_several_chunks_per_call(monkeypatch):
    """The CNN's BatchNorm, bias and head parameters: one ``_layer_grads`` call per batch
    for their layers, not one per chunk (main: every layer once per chunk)."""
    model = _cnn()
    prog, names = _program(model, monkeypatch, 1 << 12)
    b = 48
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g)
    taps = prog.record_taps(x, y, b)
    step = prog.chunk_rows(None, taps)
    chunks = -(-b // step)
    assert chunks >= 4
    calls = []
    real = LF._layer_grads
    monkeypatch.setattr(LF, "_layer_grads", lambda mod, *a: calls.append(type(mod).__name__) or real(mod, *a))
    prog.batch_sums((taps, {n: torch.zeros(prog._numels[n], dtype=torch.float64) for n in names}, None),
                    torch.float64)
    # the largest layer (the second conv) still one chunk per call; every other layer in one call
    assert calls.count("BatchNorm2d") == 2 and calls.count("Linear") == 1, calls
    assert len(calls) < 6 * chunks


def test_conv_products_read_the_patches_in_place():
    """The patches are cached as ``[B, G, K, P]`` (no transposed ``[B, G, P, K]`` copy) and the
    per-sample weight gradients equal the ``go x patches'`` products of a contiguous copy (bit
    for bit on the benchmark CNN's shapes; in general the GEMM kernel may differ with the
    operand's layout: float32 rounding) and torch.func's."""
    torch.manual_seed(3)
    for mod, shape in ((nn.Conv2d(4, 6, 3, padding=1, groups=2), (5, 4, 7, 7)),
                       (nn.Conv1d(3, 4, 5, stride=2, dilation=2), (6, 3, 20))):
        x = torch.randn(*shape)
        go = torch.randn_like(mod(x))
        cache = _prepare(mod, x, {"weight": "w"})
        u = _patches(mod, x)
        assert list(cache) == ["u"] and torch.equal(cache["u"], u) and cache["u"].shape == u.shape
        b = shape[0]
        gg = go.reshape(b, mod.groups, -1, u.shape[-1])
        want = (gg @ u.transpose(-1, -2).contiguous()).reshape(b, -1)
        got = _layer_grads(mod, x, go, {"weight": "w"}, cache)["w"]
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        def loss(w, xi, gi, mod=mod):
            return (torch.func.functional_call(mod, {"weight": w, "bias": mod.bias}, (xi[None],))[0] * gi).sum()

        ref = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(mod.weight.detach(), x, go)
        assert torch.allclose(got, ref.reshape(b, -1), rtol=1e-5, atol=1e-5)


def test_a_bias_alone_builds_no_patches(monkeypatch):
    """The scoring forms one parameter's per-sample gradients at a time from the stored
    records' taps: a convolution's bias needs no patches (main built them for the whole block)."""
    model = _cnn()
    prog, names = _program(model, monkeypatch, 1 << 20)
    b = 16
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g)
    taps = prog.record_taps(x, y, b)
    calls = []
    real = LF._patches
    monkeypatch.setattr(LF, "_patches", lambda *a: calls.append(1) or real(*a))
    bias = prog.grads_from_taps(taps, ["0.bias"])["0.bias"]
    assert calls == [] and bias.shape == (b, 8)
    assert torch.equal(bias, prog.grads_from_taps(taps, ["0.weight", "0.bias"])["0.bias"])
    assert len(calls) == 1
