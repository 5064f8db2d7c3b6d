"""Beyond nn.Linear: quantization of convolutions, embeddings and attention projections, and
the per-layer fast estimation path (equal to torch.func's per-sample gradients)."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from _nets import CNN  # tests/_nets.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning._warning_lines import warning_line
from mis_lightning.app.aggregate import markdown_table
from mis_lightning.estimation.estimate import MomentAccumulator
from mis_lightning.estimation.linear_factors import LayerProgram
from mis_lightning.quantization import get_scheme


def _ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


class _TinyTF(nn.Module):
    def __init__(self, V: int = 12, D: int = 8, padding_idx: int | None = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, batch_first=True, dropout=0.1)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


# ------------------------------------------------------------------------- quantization
def test_cnn_int8_quantizes_the_convolutions_per_channel_over_flattened_kernels():
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    m = CNN().eval()
    res = get_scheme("int8_weight_only").apply(m)
    # conv kernels 72 + 1152 and the head 160; BatchNorm weights and biases stay float
    assert set(res.grids) == {"f.0.weight", "f.4.weight", "head.weight"}
    g = res.grids["f.4.weight"]
    assert g.shape == (16, 8, 3, 3) and g.block_size == (1, 8, 3, 3)
    assert g.method == "Conv2d: per-channel int8 over flattened kernels (library RTN)"
    w = m.f[4].weight.detach()
    # torchao's own rule: scale = max|w| / 127.5 per output channel
    scale, _ = choose_qparams_affine(w.reshape(16, -1), MappingType.SYMMETRIC, (1, 72), torch.int8, -128, 127,
                                     eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32)
    torch.testing.assert_close(g.scale.reshape(-1), scale.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(g.scale.reshape(-1), w.abs().amax((1, 2, 3)) / 127.5, rtol=1e-6, atol=0)
    # the copy releases the grid's values, and they are the grid's cells (ties: block extremes)
    assert torch.equal(res.model.f[4].weight.detach(), g.dequantized)
    cv = g.cell_value(w.reshape(-1).double(), 0, g.numel).float()
    assert int((cv != g.dequantized.reshape(-1)).sum()) <= 16  # at most one tie per channel
    assert g.revealed is not None and int(g.revealed.sum()) == 16  # one absmax per channel
    assert any(n.startswith("int8_weight_only: Conv2d: per-channel int8 over flattened kernels "
                            "(library RTN): 2 weight tensor(s), 1,224 weights") for n in res.notes)
    assert m.f[4].weight.dtype == torch.float32 and not torch.equal(m.f[4].weight, res.model.f[4].weight)


def test_transformer_embedding_by_torchao_and_attention_projections_quantized():
    m = _TinyTF().eval()
    for name in ("int8_weight_only", "intx_weight_only_int4"):
        res = get_scheme(name).apply(m)
        assert {"emb.weight", "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight",
                "enc.linear1.weight", "enc.linear2.weight", "head.weight"} == set(res.grids)
        bits = 8 if name.startswith("int8") else 4
        assert type(res.model.emb.weight).__name__ == "IntxUnpackedToInt8Tensor"  # torchao's own
        assert res.grids["emb.weight"].method == f"Embedding: torchao IntxWeightOnlyConfig (per-channel int{bits})"
        assert res.grids["enc.self_attn.in_proj_weight"].method == (
            f"MultiheadAttention.in_proj_weight: per-channel int{bits} over rows (library RTN)")
        assert res.grids["enc.self_attn.out_proj.weight"].method == (
            f"MultiheadAttention.out_proj: per-channel int{bits} over rows (library RTN)")
        assert res.unquantized["enc.norm1.weight"].startswith("LayerNorm.weight:")
        x = torch.randint(0, 12, (4, 5))
        with torch.no_grad():
            torch.testing.assert_close(res.model(x), m(x), rtol=0, atol=0.3)
            # the released attention weights are the grid's values
            assert torch.equal(res.model.enc.self_attn.in_proj_weight,
                               res.grids["enc.self_attn.in_proj_weight"].dequantized)


@pytest.mark.parametrize("name", ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2",
                                  "intx_weight_only_int4_g32_asym"])
def test_one_wide_embeddings_and_kernels_are_quantized_not_crashed(name):
    """``nn.Embedding(V, 1)`` and a 1x1 convolution from one channel: rows one weight wide.
    torchao 0.18's IntxWeightOnlyConfig and its ``choose_qparams_affine`` fail on them ("shape
    [12, 1] is invalid for input of size 1", ex17: the whole ``assess`` call raised). Each row's
    scale gives its one weight away: released exactly up to float32 rounding, every weight
    revealed, leakage = the unquantized baseline."""
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 1)
            self.conv = nn.Conv1d(1, 3, 1, bias=False)

        def forward(self, tok):
            return self.conv(self.emb(tok).transpose(1, 2)).sum((1, 2))

    torch.manual_seed(0)
    model = Tok()
    s = get_scheme(name)
    res = s.apply(model)
    if name.endswith("_g32_asym"):  # a group of 32 does not tile one-wide rows: float, with the reason
        assert set(res.unquantized) == {"emb.weight", "conv.weight"}
        return
    assert set(res.grids) == {"emb.weight", "conv.weight"} and not res.unquantized
    for pname, g in res.grids.items():
        w = dict(model.named_parameters())[pname].detach().reshape(g.dequantized.shape).to(torch.float64)
        # torchao's symmetric scale is max|w| / (qmax + 1/2): it gives each one-wide row's weight away
        assert torch.allclose(g.scale.reshape(w.shape).to(torch.float64) * (g.qmax + 0.5), w.abs(), rtol=1e-6), pname
        assert g.revealed is not None and bool(g.revealed.all()), pname
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 12, (400, 4), generator=g)
    with torch.no_grad():
        y = model(tok) + torch.randn(400, generator=g)
    rep = ml.assess(model, [name], DataLoader(TensorDataset(tok, y), batch_size=100),
                    lambda o, t: (o - t) ** 2, uncertainty_draws=0, hessian="exact")
    r = rep.schemes[name]
    assert r.error is None and r.quantized_fraction == 1.0
    assert r.leakage == pytest.approx(rep.baseline_leakage, rel=1e-9)


def test_group_sizes_that_do_not_tile_a_flattened_kernel_are_left_in_float_with_the_reason():
    m = CNN().eval()
    res = get_scheme("intx_weight_only_int4_g32").apply(m)
    assert res.unquantized["f.0.weight"] == (
        "Conv2d.weight: flattened row length 9 is not a multiple of the group size 32: left in float "
        "(the groups would not tile the rows)")
    # 72 = 8 x 3 x 3 is not a multiple of 32 either; a 2x2 kernel with 16 input channels is:
    conv = nn.Sequential(nn.Conv2d(16, 4, 2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    g = get_scheme("intx_weight_only_int4_g32").apply(conv).grids["0.weight"]
    assert g.block_size == (1, 8, 2, 2) and g.method.startswith("Conv2d: per-group (g=32) int4")


def test_filter_fn_keeps_the_old_linear_only_release():
    m = CNN().eval()
    res = get_scheme("int8_weight_only", filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear)).apply(m)
    assert set(res.grids) == {"head.weight"}
    assert res.unquantized["f.0.weight"] == "excluded by the filter_fn of scheme 'int8_weight_only'"


class _AllKinds(nn.Module):
    """A convolution, an embedding, a MultiheadAttention (packed in_proj, out_proj) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.emb = nn.Conv2d(1, 2, 3), nn.Embedding(10, 8)
        self.mha, self.head = nn.MultiheadAttention(8, 2), nn.Linear(8, 4)


@pytest.mark.parametrize("name,config", [("int8_weight_only", "Int8WeightOnlyConfig()"),
                                         ("intx_weight_only_int4", "IntxWeightOnlyConfig(weight_dtype=torch.int4)")])
def test_linear_only_is_the_release_torchaos_quantize_makes(name, config):
    # nux54 #1: the torchao-named schemes quantize layers torchao's quantize_ leaves in float;
    # beyond_linear=False is torchao's own release, value for value
    import copy

    import torchao.quantization as tq

    torch.manual_seed(0)
    m = _AllKinds().eval()
    ao = copy.deepcopy(m)
    tq.quantize_(ao, eval(config, {"torch": torch, **vars(tq)}))
    ao_quantized = {n for n, p in ao.named_parameters() if type(p.data) is not torch.Tensor}
    assert ao_quantized == {"head.weight"}  # torchao's default filter: nn.Linear only (not out_proj)
    wide = get_scheme(name)
    assert {"conv.weight", "emb.weight", "mha.in_proj_weight", "mha.out_proj.weight"} <= set(wide.apply(m).grids)
    s = get_scheme(name, beyond_linear=False)
    assert s.name == name + "_linear_only" and s != wide and s.describe()["beyond_linear"] is False
    res = s.apply(m)
    assert set(res.grids) == ao_quantized
    released, theirs = dict(res.model.named_parameters()), dict(ao.named_parameters())
    for n, p in m.named_parameters():
        got, want = released[n], theirs[n]
        got = got.dequantize() if n in ao_quantized else got
        want = want.dequantize() if n in ao_quantized else want
        assert torch.equal(got, want), n
        if n not in ao_quantized:
            assert torch.equal(got, p), n
    assert res.unquantized["conv.weight"] == (f"Conv2d.weight: left in float as torchao's quantize_ leaves it (scheme "
                                              f"'{name}_linear_only', beyond_linear=False: torchao's own release)")
    # where nothing lies beyond torchao's layers the option changes nothing, not even the name
    assert get_scheme("float8_weight_only", beyond_linear=False).name == "float8_weight_only"


def test_assess_reports_the_quantized_share_and_the_method_per_layer_type():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(120, 1, 8, 8, generator=g), torch.randint(0, 10, (120,), generator=g)
    torch.manual_seed(0)
    m = CNN().eval()
    dl = DataLoader(TensorDataset(X, Y), batch_size=60)
    # what is checked is the schemes' layers, not the numbers: the diagonal estimator and
    # independent coordinates (the exact estimator's and the correlated form's eigh of the
    # 1,466 x 1,466 matrices took 18 of this test's 18 CPU seconds)
    rep = ml.assess(m, ["int8_weight_only", "intx_weight_only_int4", "rtn_int4"], dl, _ce,
                    num_records=32, uncertainty_draws=0, estimation="diagonal", covariance="independent")
    for name in rep.schemes:
        # every weight but the 24 BatchNorm scales and the 58 biases (1,384 of 1,466); was 160
        assert rep.schemes[name].quantized_fraction == pytest.approx(1384 / 1466)
        assert rep.schemes[name].layers["f.0.weight"].quantized_by.startswith("Conv2d: per-channel int")
        assert rep.schemes[name].layers["head.weight"].quantized_by == ""
    table = rep.table()
    assert "5.6%" in next(r for r in table.splitlines() if r.startswith("int8_weight_only"))
    # nux54 #1: the schemes named after a torchao config release more than torchao's quantize_ with
    # it (the convolutions): a warning (was a note), "^" after their names in the tables; rtn_int4,
    # the library's own scheme, has no torchao release to differ from: its line stays a note (ux49)
    beyond = [w for w in rep.warnings if "beyond torchao's quantize_" in w]
    assert beyond == ["schemes 'int8_weight_only' and 'intx_weight_only_int4' quantize Conv2d (f.0.weight, "
                      "f.4.weight) beyond torchao's quantize_, which leaves them in float. The figures (leakage, "
                      "bits/w, utility) are of this wider release (Conv2d by the library's round-to-nearest), not "
                      "of the model quantize_ ships with the same config (its default filter takes nn.Linear "
                      "only). Ship the release scored: mis_lightning.get_scheme(name).apply(model).model; score "
                      "torchao's own release: get_scheme(name, beyond_linear=False) (named name_linear_only; "
                      "the app: quantizer=<name> +quantizer.beyond_linear=false; a schemes list entry "
                      "{name: <name>, beyond_linear: false})"]
    # the console line (the callback's, the Metric's, the table's) names the layers and the mismatch
    assert warning_line(beyond[0]) == ("schemes 'int8_weight_only' and 'intx_weight_only_int4' quantize Conv2d "
                                       "(f.0.weight, f.4.weight) beyond torchao's quantize_, which leaves them in float [...]")
    assert not [w for w in rep.warnings if "besides" in w]
    assert [w for w in rep.notes if "besides" in w] == [
        "scheme 'rtn_int4' quantizes, besides its backend's own layers, Conv2d by the library's round-to-nearest "
        "(f.0.weight, f.4.weight) at the same bit width (information: these weights are quantized and scored "
        "like the others; each layer's method is in the report's per-layer rows)"]
    for out in (table, markdown_table(rep.rows())):  # the job's table and a sweep's aggregate
        assert "int8_weight_only ^" in out and "intx_weight_only_int4 ^" in out and "rtn_int4 ^" not in out
    legend = " ".join(table.split())
    assert "^ after a scheme: not the release torchao's quantize_ makes with that config: it also quantizes Conv2d," in legend
    assert "get_scheme(name).apply(model).model" in legend
    assert ml.Report.from_dict(rep.to_dict()).rows() == rep.rows()  # the mark survives the JSON


def test_a_frozen_layer_quantized_beyond_torchaos_filter_is_named_and_marked():
    """ux55b (ux54d's leftover): a frozen Conv2d (requires_grad=False, not assessed) is quantized in the
    release int8_weight_only scores (its utility, model b/w), which torchao's quantize_ leaves in float;
    the assessed weights are all torchao's (a Linear head). The warning names the frozen layer as outside
    the assessment, says which figures it changes (not the leakage) and the row is marked '^'; before,
    nothing was said (the rows existed for assessed weights only)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3)).eval()
    m[0].requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    dl = DataLoader(TensorDataset(torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g)),
                    batch_size=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(m, ["int8_weight_only"], dl, _ce, num_records=8, uncertainty_draws=0, estimation="diagonal",
                        covariance="independent")
    s = rep.schemes["int8_weight_only"]
    assert set(s.layers) == {"2.weight", "2.bias"} and all(not lr.quantized_by for lr in s.layers.values())
    assert s.quantized_by_unassessed == {"0.weight": "Conv2d: per-channel int8 over flattened kernels (library RTN)"}
    beyond = [w for w in rep.warnings if "beyond torchao's quantize_" in w]
    assert len(beyond) == 1 and beyond[0].startswith(
        "scheme 'int8_weight_only' quantizes Conv2d (0.weight) beyond torchao's quantize_, which leaves them in "
        "float. Of these, 0.weight lie outside the assessment (frozen, or left out by params=): not scored, they "
        "count in the utility and model b/w. The figures (utility, model b/w) are of this wider release (Conv2d by "
        "the library's round-to-nearest), not of"), beyond
    assert rep.rows()[0]["beyond_torchao"] == "Conv2d" and "int8_weight_only ^" in rep.table()
    back = ml.Report.from_dict(rep.to_dict())
    assert back.schemes["int8_weight_only"].quantized_by_unassessed == s.quantized_by_unassessed
    assert back.rows() == rep.rows()


# --------------------------------------------------------------------------- estimation
class _Convs(nn.Module):
    """Grouped, dilated, strided, 'same'-padded, reflect-, replicate- and circular-padded
    convolutions, BatchNorm (eval: running statistics), Conv3d, Conv1d, LayerNorm, a 3-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2), nn.Tanh(),
            nn.Conv2d(6, 6, 2, padding="same", padding_mode="reflect", bias=False),
            nn.Conv2d(6, 6, (3, 1), stride=(1, 2), padding=(1, 0), groups=3, padding_mode="replicate"))
        self.c3 = nn.Conv3d(1, 1, (3, 3, 1), stride=(1, 1, 2), dilation=(1, 2, 1), padding=(1, 2, 0))
        self.c1 = nn.Conv1d(6, 4, 3, padding=1, padding_mode="circular")
        self.bn1 = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.f(x)
        h = self.c3(h.unsqueeze(1)).squeeze(1).flatten(2)
        return self.head(self.ln(self.bn1(self.c1(h)).mean(-1)))


def _both(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, **kw):
    dl = DataLoader(TensorDataset(X, Y), batch_size=16)
    out = []
    for fast in (True, False):
        acc = MomentAccumulator(model, _ce, mode="diagonal", hessian="ggn", use_factors=fast, num_records=8,
                                dtype=torch.float64, **kw)
        for b in dl:
            acc.update(b)
        out.append((acc, acc.finalize()))
    return out


def _assert_same(fast, ref) -> None:
    """The fast path's sums and influences equal torch.func's, to 1e-6 relative (float64: the
    two differ by summation order only, ~1e-15)."""
    (a, ea), (b, eb) = fast, ref
    assert isinstance(a.factored, LayerProgram) and b.factored is None
    for k in ("g_sum", "g2_sum", "h_sum"):
        torch.testing.assert_close(a.state[k], b.state[k], rtol=1e-6, atol=1e-6 * float(b.state[k].abs().max()))
    torch.testing.assert_close(a.state["grad_norm_sq"], b.state["grad_norm_sq"], rtol=1e-6, atol=0)
    for n in eb.names:
        # V = 0 (e.g. the attention key bias, which softmax ignores): sigma and w are 0/0 noise
        live = eb._v_diag[n] > 1e-20 * float(eb._v_diag[n].max())
        torch.testing.assert_close(ea.sigma[n][live], eb.sigma[n][live], rtol=1e-6, atol=0)
        wa = torch.cat([w[n] for _, _, w in ea.iter_influence([n])])
        wb = torch.cat([w[n] for _, _, w in eb.iter_influence([n])])
        torch.testing.assert_close(wa[:, live], wb[:, live], rtol=1e-6, atol=1e-6)


def test_fast_path_equals_torch_func_on_convolutions_and_norms(monkeypatch):
    """The per-layer path equals torch.func's (its K-FAC correction of convolutions off: the
    torch.func path has none; kc32, tests/test_kfac_conv.py)."""
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_CORRECTION", False)
    torch.manual_seed(0)
    m = _Convs().eval()
    with torch.no_grad():
        for bn in (m.f[1], m.bn1):  # running statistics other than 0 / 1
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(40, 2, 9, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    _assert_same(*_both(m, X, Y))
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())  # nothing touched
    assert not m.training


def test_fast_path_equals_torch_func_on_a_transformer_layer_and_embedding():
    m = _TinyTF().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 12, (40, 5), generator=g)
    X[:5, 0] = 0  # the padding row gets no gradient
    Y = torch.randint(0, 3, (40,), generator=g)
    _assert_same(*_both(m, X, Y))


def test_fast_path_with_stored_records_streamed_and_one_output(monkeypatch):
    """Large models keep the records, not the gradients (num_records * d > budget): the
    influences are recomputed by the per-layer program; a single output per record (MSE). The
    K-FAC correction of convolutions off (the torch.func path has none; kc32)."""
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_CORRECTION", False)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 6, 1)).eval()
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(40, 2, 6, generator=g), torch.randn(40, generator=g)
    dl = DataLoader(TensorDataset(X, Y), batch_size=16)
    out = []
    for fast in (True, False):
        acc = MomentAccumulator(m, lambda o, t: (o[:, 0] - t) ** 2, mode="diagonal", hessian="ggn",
                                use_factors=fast, num_records=8, dtype=torch.float64, budget=64)
        for b in dl:
            acc.update(b)
        out.append((acc, acc.finalize()))
    assert out[0][1].influence is None and out[0][1]._records
    _assert_same(*out)


@pytest.mark.parametrize("case", ["groupnorm", "tied"])
def test_unsupported_layouts_fall_back_to_torch_func_explicitly(case):
    # (a ConvTranspose1d is taken since ct41, one called with output_size since cq41:
    # tests/test_beyond_linear_transposed.py)
    torch.manual_seed(0)
    if case == "groupnorm":
        m, X = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 3)), torch.randn(8, 4)
    else:
        lin = nn.Linear(4, 4)
        m, X = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(4, 3)), torch.randn(8, 4)
    acc = MomentAccumulator(m.eval(), _ce, mode="diagonal", hessian="ggn", num_records=4)
    acc.update((X, torch.randint(0, 3, (8,))))
    assert acc.factored is None


def test_a_weight_also_used_outside_its_layer_is_caught_by_the_first_batch_check():
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3)
            self.head = nn.Linear(2, 3)

        def forward(self, x):  # the conv weight also enters through a functional call
            return self.head(self.conv(x).mean(-1) + self.conv.weight.sum())

    m = Leaky().eval()
    acc = MomentAccumulator(m, _ce, mode="diagonal", hessian="ggn", num_records=4)
    assert isinstance(acc.factored, LayerProgram)
    acc.update((torch.randn(8, 1, 5), torch.randint(0, 3, (8,))))
    assert acc.factored is None  # fell back: the per-sample check against torch.func failed


class _PaddedEncoder(nn.Module):
    """nn.TransformerEncoder as built by default (enable_nested_tensor=True, mask_check=True)
    with a key padding mask: in eval mode its forward checks the mask with
    ``torch._nested_tensor_from_mask_left_aligned``, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        pad = x.eq(0)
        h = self.enc(self.emb(x), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def test_torch_func_path_takes_a_transformer_encoder_with_a_padding_mask():
    """torch.func's per-sample gradients (use_factors=False, and every estimator but the
    per-layer Gauss-Newton one) used to fail in the encoder's sparsity fast-path mask check
    ("Batching rule not implemented for aten::_nested_tensor_from_mask_left_aligned"); the
    figures equal the per-layer path's, and the global fast-path flag is left as it was."""
    m = _PaddedEncoder().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randint(1, 12, (40, 6), generator=g)
    X[::3, 4:] = 0  # right-padded records
    Y = torch.randint(0, 3, (40,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same(*_both(m, X, Y))
        rep = ml.assess(m, ["rtn_int8"], DataLoader(TensorDataset(X, Y), batch_size=16), _ce, estimation="exact",
                        num_records=8, uncertainty_draws=0)
    assert not rep.schemes["rtn_int8"].error and rep.schemes["rtn_int8"].leakage > 0
    assert torch.backends.mha.get_fastpath_enabled()


class _FlaggedEmb(nn.Module):
    def __init__(self, bag: bool = False, **flags: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = bag
        self.emb = nn.EmbeddingBag(12, 4, mode="mean", **flags) if bag else nn.Embedding(12, 4, **flags)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        e = self.emb(x)
        return self.head(e if self.bag else e.mean(1))


@pytest.mark.parametrize("flag", ["sparse", "scale_grad_by_freq"])
@pytest.mark.parametrize("bag", [False, True])
def test_embedding_gradient_flags_are_estimated_as_the_plain_twins(bag, flag):
    """nn.Embedding / nn.EmbeddingBag(sparse=True) (trained with SparseAdam): the flag only lays
    the weight's gradient out as a sparse tensor, which torch.func's vmap could not take ("Could
    not run 'aten::view' with arguments from the 'SparseCPU' backend") on every estimator.
    scale_grad_by_freq=True divides a row's gradient by its count in the mini-batch (an optimizer
    device; under vmap, by its count in the record): the sandwich needs the loss's gradient, and
    the figures read 4.6% lower than the same weights' without the flag (fu23 F7). The figures
    are those of the same model without the flag; the user's module keeps its flag."""
    m = _FlaggedEmb(bag, **{flag: True}).eval()
    twin = _FlaggedEmb(bag).eval()
    g = torch.Generator().manual_seed(1)
    # repeated indices within a record: scale_grad_by_freq changes the per-record gradient
    X, Y = torch.randint(0, 6, (40, 5), generator=g), torch.randint(0, 3, (40,), generator=g)
    dl = DataLoader(TensorDataset(X, Y), batch_size=16)
    for opts in ({"estimation": "exact"}, {"estimation": "diagonal", "hessian": "ggn"},
                 {"estimation": "diagonal", "hessian": "ggn", "use_factors": False}):
        a, b = (ml.assess(x, ["rtn_int4"], dl, _ce, num_records=8, uncertainty_draws=0, **opts) for x in (m, twin))
        assert a.schemes["rtn_int4"].leakage == pytest.approx(b.schemes["rtn_int4"].leakage, rel=1e-9)
    assert getattr(m.emb, flag)


class _FrozenGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_torch_func_gauss_newton_reads_the_head_of_a_recurrent_encoder_record_by_record(monkeypatch):
    """The Gauss-Newton diagonal on the torch.func path (use_factors=False, or a head the
    per-layer path does not take) vmapped the recurrent layer's fused kernel and failed
    ("output with shape [1, H] doesn't match the broadcast shape [B, 1, H]"); its output
    Jacobians are now taken record by record there, with the per-layer path's figures. (The
    per-layer path gives the assessed head, an all-Linear classifier, the K-FAC correction since
    kf33, which the torch.func path has not: compared without it.)"""
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_CORRECTION", False)
    m = _FrozenGRU().eval()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(40, 5, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    dl = DataLoader(TensorDataset(X, Y), batch_size=16)
    a, b = (ml.assess(m, ["rtn_int4"], dl, _ce, params=["head.weight", "head.bias"], estimation="diagonal",
                      hessian="ggn", use_factors=uf, num_records=8, uncertainty_draws=0) for uf in (True, False))
    assert a.schemes["rtn_int4"].leakage == pytest.approx(b.schemes["rtn_int4"].leakage, rel=1e-9)
