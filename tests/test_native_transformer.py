"""``native_int8_dynamic`` on transformer layers: torch's fused encoder fast path cannot read
dynamically quantized weights ("'function' object has no attribute 'device'"); the quantized
copy runs the standard path instead, with the same numbers as torch's own fallback."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.quantization import get_scheme

V, L, C, D = 20, 6, 3, 16


class _Tiny(nn.Module):
    def __init__(self, stacked: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        layer = nn.TransformerEncoderLayer(D, 2, 32, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True) if stacked else layer
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


def test_quantized_copy_runs_with_torchs_fallback_numbers():
    x = torch.randint(0, V, (8, L), generator=torch.Generator().manual_seed(1))
    for stacked in (False, True):
        m = _Tiny(stacked).eval()
        res = get_scheme("native_int8_dynamic").apply(m)
        prefix = "enc.layers.0." if stacked else "enc."
        assert {prefix + "linear1.weight", prefix + "linear2.weight", "head.weight"} <= set(res.grids)
        assert res.unquantized[prefix + "self_attn.in_proj_weight"] == (
            "MultiheadAttention.in_proj_weight: layer type MultiheadAttention not supported "
            "(scheme 'native_int8_dynamic' quantizes the weights of nn.Linear (exact type) only)")
        with torch.no_grad():
            got = res.model(x)  # the old code raised AttributeError here (fused fast path)
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                want = res.model(x)  # torch's own global fallback to the standard path
            finally:
                torch.backends.mha.set_fastpath_enabled(True)
            ref = m(x)
        # The global switch also moves nn.MultiheadAttention to its unfused kernel; float
        # rounding differences (~1e-7) can flip one step of the dynamic int8 activation
        # quantization (scale ~ max|x| / 127), hence the tolerance of 1e-3 on O(0.5) logits.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
        # int8 weights and activations: within a few percent of the float model's logits
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
        # the user's model keeps its fast path
        layer = m.enc.layers[0] if stacked else m.enc
        assert layer.activation_relu_or_gelu == 1
        assert any("fused fast path off" in n for n in res.notes)


def test_assess_native_int8_dynamic_on_a_transformer():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, V, (120, L), generator=g)
    Y = X[:, 0] % C
    dl = DataLoader(TensorDataset(X, Y), batch_size=40)
    rep = ml.assess(_Tiny(False).eval(), ["native_int8_dynamic"], dl, _ce, strict=True,
                    estimation="diagonal", hessian="ggn", num_records=32, uncertainty_draws=0,
                    val_dataloader=dl)
    s = rep.schemes["native_int8_dynamic"]
    assert s.error is None and 0.0 <= s.leakage <= 1.0 and "loss" in s.utility


def test_native_int8_dynamic_keeps_recurrent_layers_float_and_says_so():
    """torch's ``quantize_dynamic(model)`` (default mapping) converts an ``nn.LSTM`` to its int8
    dynamic module; the scheme converts the ``nn.Linear`` layers alone (nu42a), so its copy's
    LSTM is the float one, bit for bit: its docs claimed "exactly nn.Linear" without saying the
    release then differs from torch's default, and its notes said nothing (rn43)."""
    class RNNHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.rnn, self.head = nn.Embedding(V, 4), nn.LSTM(4, 4, batch_first=True), nn.Linear(4, C)

        def forward(self, x):
            return self.head(self.rnn(self.emb(x))[0][:, -1])

    m = RNNHead()
    res = get_scheme("native_int8_dynamic").apply(m)
    assert type(res.model.rnn) is nn.LSTM and list(res.grids) == ["head.weight"]
    assert all(torch.equal(a, b) for a, b in zip(res.model.rnn.parameters(), m.rnn.parameters()))
    assert any("LSTM 'rnn' stay in float" in n and "default mapping would make them int8" in n for n in res.notes)
    with ml.quantization.native.quiet_deprecated_quantization():
        torch_default = torch.ao.quantization.quantize_dynamic(RNNHead(), dtype=torch.qint8)
    assert type(torch_default.rnn) is not nn.LSTM  # what the notes contrast it with


class _Attn(nn.Module):
    """Token ids -> embedding -> nn.MultiheadAttention with a key padding mask (ids == 0) ->
    masked mean -> head; ``forward(ids, mask)`` takes two arguments, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(9, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, ids, mask=None):
        mask = (ids != 0) if mask is None else mask
        h = self.emb(ids)
        h = h + self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))

    def mis_per_sample_loss(self, batch):
        ids, y = batch
        return _ce(self(ids, ids != 0), y)


def test_second_derivatives_through_attention():
    """Passes that differentiate the forward twice through ``nn.MultiheadAttention`` on CPU
    (Hutchinson's probes; the exact Hessian diagonal of a ``mis_per_sample_loss`` hook, the route
    for a forward of several arguments) raised torch's "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" (nu44a); they
    run on torch's math backend now. The hook's exact diagonal equals the one read through the
    model's outputs (the same Hessian diagonal; 1e-8: float64, other summation orders); Hutchinson's
    probes run (their sampling error is their own: not compared here)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 9, (40, 5), generator=g)
    ids[::3, 3:] = 0  # padded records
    y = torch.randint(0, 2, (40,), generator=g)
    loader = DataLoader(TensorDataset(ids, y), batch_size=20)
    model = _Attn()
    kw = dict(estimation="diagonal", weight_decay=1e-2, uncertainty_draws=0)

    class Plain(_Attn):  # the same network without the hook: the Gauss-Newton-free exact diagonal
        mis_per_sample_loss = None

    plain = Plain()
    plain.load_state_dict(model.state_dict())
    est = {}
    for name, m, h in (("outputs", plain, "exact"), ("hook", model, "exact"), ("hutchinson", plain, "hutchinson")):
        met = ml.MISIndicator(m, None if name == "hook" else _ce, ["rtn_int8"], hessian=h, hutchinson_probes=2, **kw)
        for batch in loader:
            met.update(batch)
        est[name] = met.estimate()
    for k, s in est["outputs"].sigma.items():
        assert torch.allclose(est["hook"].sigma[k], s, rtol=1e-8, atol=1e-12), k
        assert torch.isfinite(est["hutchinson"].sigma[k]).all(), k


def test_hutchinsons_error_is_warned_as_the_sampled_gauss_newtons_is():
    """Hutchinson's Hessian diagonal is a Monte Carlo estimate as the sampled-label Gauss-Newton
    one is, but only the latter's error reached the warnings: a hook's Transformer (its "auto"
    choice) read 9-15% off the Gauss-Newton figures with a median relative error of 1.39 and no
    word (nu44a). Both are now warned above the same bound; the exact diagonal is not."""
    from mis_lightning.estimation.estimate import GGN_MC_WARN_RELATIVE_ERROR, estimator_warnings

    noisy = {"hutchinson_probes": 64, "hutchinson_median_relative_error": 1.39}
    (line,) = estimator_warnings(noisy)
    assert "hessian='hutchinson'" in line and "64 Rademacher probes" in line and "1.4" in line
    assert not estimator_warnings({**noisy, "hutchinson_median_relative_error": GGN_MC_WARN_RELATIVE_ERROR / 2})
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 9, (40, 5), generator=g)
    rep = ml.assess(_Attn(), ["rtn_int8"], DataLoader(TensorDataset(ids, torch.randint(0, 2, (40,), generator=g)),
                                                      batch_size=20), _ce, estimation="diagonal", hessian="hutchinson",
                    hutchinson_probes=2, weight_decay=1e-2, uncertainty_draws=0)
    assert rep.diagnostics["hutchinson_median_relative_error"] > GGN_MC_WARN_RELATIVE_ERROR
    assert any("hessian='hutchinson'" in w for w in rep.warnings)
