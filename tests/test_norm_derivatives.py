"""The estimation's second derivatives through an affine LayerNorm (ln41; method.md section 4).
torch 2.13's torch.func Hessian of ``F.layer_norm`` is wrong in ``d grad_gamma / d (weights before
the norm)`` (0.35 relative on a small example; benchmarks/layer_norm_hessian.py), which made the
exact estimator's Hessian of a Conv1d -> LayerNorm -> Linear fit asymmetric (3.1e-4) and read 36
negative eigenvalues; the per-sample program now evaluates the norm written out. Reference:
autograd's double backward of the plain model (agrees with finite differences to ~4e-10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mis_lightning.estimation.norm_derivatives import WrittenOutLayerNorm, layer_norm_written_out
from mis_lightning.estimation.per_sample import LossProgram


def _mse(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (o[:, 0] - t) ** 2


@pytest.mark.parametrize("affine", [True, False])
def test_the_programs_hessian_through_a_layer_norm_is_autograds(affine):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=affine), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), 3 * torch.randn(40, dtype=torch.float64)  # large residuals
    names = [k for k, _ in m.named_parameters()]
    prog = LossProgram(m, _mse, names, dtype=torch.float64)
    shapes = {k: p.shape for k, p in m.named_parameters()}
    flat0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def split(t: torch.Tensor) -> dict[str, torch.Tensor]:
        out, o = {}, 0
        for k in names:
            out[k], o = t[o: o + shapes[k].numel()].reshape(shapes[k]), o + shapes[k].numel()
        return out

    got = torch.func.hessian(lambda t: _mse(prog.outputs(split(t), x), y).sum())(flat0)
    want = torch.autograd.functional.hessian(lambda t: _mse(functional_call(m, split(t), (x,)), y).sum(), flat0)
    # rounding: float64 second derivatives of a 33-weight model (the wrong entries were ~1e-1 relative)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_the_written_out_norm_is_torchs_and_other_calls_pass():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for args in (((3, 4), w, b, 1e-3), ((4,), w[0], None, 1e-5)):
        torch.testing.assert_close(layer_norm_written_out(x, *args), F.layer_norm(x, *args), rtol=0, atol=1e-14)
    with WrittenOutLayerNorm():
        torch.testing.assert_close(F.layer_norm(x, (4,), w[0], b[0]), layer_norm_written_out(x, (4,), w[0], b[0]),
                                   rtol=0, atol=0)
        half = F.layer_norm(x.half(), (4,), w[0].half())  # torch's kernel: half precision not written out
    assert half.dtype == torch.float16
