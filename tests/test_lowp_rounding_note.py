"""torchao's IntxWeightOnlyConfig on bf16 / fp16 weights keeps the scale in that dtype and
rounds ``w * (1 / scale)`` in it: the release's cell edges are not the grid's midpoints. The
grid must then be the quotient grid that scores the real cells (tests/test_lowp_quotient_cells.py
checks those cells against torchao and a closed-form truth), and the midpoint note of qx27 must
not be shown (it is kept for a bf16 / fp16 scale the library cannot score exactly).

The reference here is torchao's own release, not the library: we find a weight whose real
code differs from round-to-nearest on the grid's own (float64) scale, i.e. a weight the
fixed-grid cells place in the wrong cell (qx27 audit, its gridcheck.py not kept).
"""
import pytest
import torch
from torch import nn

from mis_lightning.quantization import get_scheme

pytest.importorskip("torchao")


def _model(dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 8, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(8, 64, generator=g) * 0.1)
    return m.to(dtype)


@pytest.mark.parametrize("dtype,scheme", [(torch.bfloat16, "intx_weight_only_int8_g32"),
                                          (torch.float16, "intx_weight_only_int8_g32"),
                                          (torch.bfloat16, "intx_weight_only_int8_g32_asym")])
def test_intx_rounding_in_the_weights_dtype_is_scored(dtype, scheme):
    model = _model(dtype)
    if scheme.endswith("asym"):  # one-signed rows: |w / scale| reaches 255 (zero point -128)
        with torch.no_grad():
            model[0].weight.abs_()
    res = get_scheme(scheme).apply(model)
    g = res.grids["0.weight"]
    theta = model[0].weight.detach().double().reshape(-1)
    s, zp, code = g.element_grid(0, g.numel)
    nearest = (torch.round(theta / s) + zp).clamp(g.qmin, g.qmax)
    off = ~g.revealed.reshape(-1) & (nearest != code)
    # the premise: torchao's real codes are not round-to-nearest on the grid (bf16: 13% of
    # weights at seed 0, fp16: ~2%): a midpoint grid would score other cells
    assert bool(off.any())
    assert g.kind == "quotient" and g.quotient_dtype == dtype
    # the real cells are scored: no midpoint note
    assert not [n for n in res.notes if "w / scale" in n], res.notes


def test_no_such_note_in_float32_nor_where_torchao_is_re_run():
    res = get_scheme("intx_weight_only_int8_g32").apply(_model(torch.float32))
    assert res.grids["0.weight"].kind == "affine"  # float32: exact midpoints, the affine grid
    assert not [n for n in res.notes if "w / scale" in n]
    # HQQ is scored by Monte Carlo re-quantization (torchao re-run): its cells are the real ones
    res = get_scheme("intx_weight_only_int4_hqq").apply(_model(torch.bfloat16))
    assert res.grids["0.weight"].rounding == "hqq" and res.grids["0.weight"].kind == "affine"
    assert not [n for n in res.notes if "w / scale" in n]
