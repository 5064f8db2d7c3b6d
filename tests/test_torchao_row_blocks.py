"""torchao's ``quantize_`` on row blocks of each chosen Linear (p50d, ``QUANTIZE_ROW_BLOCKS``): the
layer itself is given its first rows, stand-in Linears the others, and torchao's tensors of the
blocks are joined along their rows (``_cat_rows``). The reference is ``quantize_`` on the whole
weight (the switch off, the code before): every grid field, the copy's quantized tensors (their type,
``__tensor_flatten__`` attributes and inner tensors), the layer's ``repr`` (torchao's ``extra_repr``)
and the copy's output must be the same bit for bit, on float32 / bf16 / fp16 weights, an uneven last
block, an all-zero row (float8: NaN codes repaired to 0), rows that round to code 0 and a tied weight;
the user's model and torch's generator are left as they were."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from mis_lightning.quantization import get_scheme  # noqa: E402
from mis_lightning.quantization.base import zero_counts_only  # noqa: E402

TB = importlib.import_module("mis_lightning.quantization.torchao_backend")
ROW_BLOCK_SCHEMES = ["int8_weight_only", "int8_dynamic_activation_int8_weight", "intx_weight_only_int4",
                     "intx_weight_only_int4_g32", "float8_weight_only", "intx_weight_only_int2_g32_asym",
                     "int8_weight_only_g32"]


def _net(dtype: torch.dtype, tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if tied:
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    else:
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    with torch.no_grad():
        w = net[0].weight
        w[3] = 0.0  # a whole row (float8: scale 0, NaN codes set to 0)
        w[5, ::3] = 0.0
        w[7] *= 1e-3
        w[7, 0] = 1.0  # the rest of this row rounds to code 0
        w[63, 1] = 50.0  # one large weight in the last (partial) block
    if tied:
        net[2].weight = net[0].weight
    return net.to(dtype)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns (NaN payloads and the sign of zero included)."""
    t = t.detach()
    return t if t.dtype == torch.bool else t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if type(a) is not type(b) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if hasattr(a, "qdata"):  # a torchao tensor: its attributes and inner tensors
        na, ca = a.__tensor_flatten__()
        nb, cb = b.__tensor_flatten__()
        return na == nb and repr(ca) == repr(cb) and all(_same_tensor(getattr(a, n), getattr(b, n)) for n in na)
    return torch.equal(_bits(a), _bits(b))


def _apply(monkeypatch, name: str, net: nn.Module, blocks: bool, counts: bool):
    monkeypatch.setattr(TB, "QUANTIZE_ROW_BLOCKS", blocks)
    scheme = get_scheme(name)
    if counts:
        with zero_counts_only():
            return scheme.apply(net)
    return scheme.apply(net)


def _assert_same_release(a, b) -> None:
    assert set(a.grids) == set(b.grids) and a.grids
    for k, ga in a.grids.items():
        gb = b.grids[k]
        for f in ("codes", "scale", "zero_point", "dequantized", "values", "revealed"):
            assert _same_tensor(getattr(ga, f), getattr(gb, f)), (k, f)
        assert ga.support is not None and gb.support is not None
        assert all(_same_tensor(x, y) for x, y in zip(ga.support, gb.support))
        for f in ("kind", "zero_count", "bits_per_weight", "block_size", "product_dtype", "release_dtype",
                  "quotient_dtype", "quantize_arith"):
            assert getattr(ga, f) == getattr(gb, f), (k, f)
    assert a.notes == b.notes and a.unquantized == b.unquantized
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert _same_tensor(pa[k], pb[k]), k
        assert pa[k].requires_grad == pb[k].requires_grad
    assert repr(a.model) == repr(b.model)  # torchao's extra_repr on each quantized layer, once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ROW_BLOCK_SCHEMES)
def test_row_blocks_give_the_whole_weights_release(monkeypatch, name, dtype):
    monkeypatch.setattr(TB, "_ROW_BLOCK_ELEMENTS", 3 * 64 + 5)  # 3 rows of 64 a block
    joined = []
    cat0 = TB._cat_rows
    monkeypatch.setattr(TB, "_cat_rows", lambda parts, *a: joined.append(len(parts)) or cat0(parts, *a))
    net = _net(dtype)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for counts in (False, True):
        whole = _apply(monkeypatch, name, net, False, counts)
        assert not joined
        rng = torch.get_rng_state()
        blocked = _apply(monkeypatch, name, net, True, counts)
        assert torch.equal(rng, torch.get_rng_state())  # the stand-ins drew nothing
        # every layer in blocks: 64 and 96 rows of 64 (3 a block: 22 blocks, the last of 1 row; 32),
        # 32 rows of 96 (2 a block: 16)
        assert sorted(joined) == [16, 22, 32], joined
        joined.clear()
        _assert_same_release(whole, blocked)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
        with torch.no_grad():
            assert _same_tensor(whole.model(x), blocked.model(x))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the user's model


@pytest.mark.parametrize("name", ["int8_weight_only", "float8_weight_only", "intx_weight_only_int4_g32"])
def test_tied_weight_is_one_quantized_parameter(monkeypatch, name):
    monkeypatch.setattr(TB, "_ROW_BLOCK_ELEMENTS", 4 * 64)
    net = _net(torch.float32, tied=True)
    whole = _apply(monkeypatch, name, net, False, True)
    blocked = _apply(monkeypatch, name, net, True, True)
    _assert_same_release(whole, blocked)
    assert blocked.model[0].weight is blocked.model[2].weight
    assert type(blocked.model[0].weight).__name__ != "Parameter"


def test_blocks_that_cannot_be_joined_are_quantized_whole(monkeypatch):
    """``_cat_rows`` refusing (``None``): the layer gets its whole weight and torchao's own module state
    back (its ``extra_repr`` once, not wrapped twice) and is quantized whole."""
    monkeypatch.setattr(TB, "_ROW_BLOCK_ELEMENTS", 4 * 64)
    monkeypatch.setattr(TB, "_cat_rows", lambda *a: None)
    net = _net(torch.float32)
    whole = _apply(monkeypatch, "intx_weight_only_int4", net, False, False)
    blocked = _apply(monkeypatch, "intx_weight_only_int4", net, True, False)
    _assert_same_release(whole, blocked)
    assert repr(blocked.model).count("weight=") == 3  # torchao's extra_repr on each of the 3 layers, once


def test_cat_rows_refuses_what_is_not_row_indexed():
    """A part whose inner tensor is not indexed by its rows (a per-tensor scale), another type or
    other attributes: ``None`` (the layer is then quantized whole)."""
    from torchao.quantization import Int8WeightOnlyConfig, PerRow, PerTensor, quantize_

    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    parts = {}
    for g in (PerRow(), PerTensor()):
        lins = nn.ModuleList(nn.Linear(16, 4, bias=False) for _ in range(2))
        with torch.no_grad():
            lins[0].weight.copy_(w[:4])
            lins[1].weight.copy_(w[4:])
        quantize_(lins, Int8WeightOnlyConfig(granularity=g), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        parts[type(g).__name__] = [m.weight for m in lins]
    whole = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        whole.weight.copy_(w)
    quantize_(whole, Int8WeightOnlyConfig(granularity=PerRow()))
    assert _same_tensor(TB._cat_rows(parts["PerRow"], (8, 16), (16, 1)), whole.weight.data)
    assert TB._cat_rows(parts["PerTensor"], (8, 16), (16, 1)) is None  # its scale is not one per row
    assert TB._cat_rows([parts["PerRow"][0], parts["PerTensor"][1]], (8, 16), (16, 1)) is None
    assert TB._cat_rows([parts["PerRow"][0], w[4:]], (8, 16), (16, 1)) is None


@pytest.mark.parametrize("name", ["int8_weight_only_per_tensor", "float8_weight_only_per_tensor"])
def test_per_tensor_schemes_are_not_blocked(monkeypatch, name):
    monkeypatch.setattr(TB, "_ROW_BLOCK_ELEMENTS", 4 * 64)
    monkeypatch.setattr(TB, "_first_row_blocks", lambda *a: pytest.fail("a per-tensor scheme in blocks"))
    assert not get_scheme(name)._row_blocks()
    get_scheme(name).apply(_net(torch.float32))
