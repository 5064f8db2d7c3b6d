"""Second derivatives through ``F.layer_norm`` (method.md section 4, the exact Hessian).

torch.func's second derivatives of ``F.layer_norm`` (and ``F.instance_norm``) with a weight are
wrong in torch 2.13 (CPU) when the inner derivative is a vmapped vjp -- ``jacrev``, so
``torch.func.hessian`` (``jacfwd(jacrev)``) and ``jacrev(jacrev)``: ``d grad_gamma / d (the weights
before the norm)`` reads 0.25-0.47 off (layer_norm, five shapes) and 0.94 (instance_norm) on small
examples; with ``grad`` inside (``jacfwd(grad)``, ``jvp`` / ``vjp`` of ``grad``, as the records'
curvature and the residual passes take them) they agree with autograd's double backward to 1e-15,
as do group_norm, rms_norm and batch_norm (eval) either way (``python benchmarks/layer_norm_hessian.py``;
docs/benchmarks.md, "lf41"). The exact Hessian of a Conv1d -> LayerNorm([8, 6]) -> Linear fit was off
by 2.2e-4 (relative, Frobenius) and read 36 negative eigenvalues. Two guards, each right alone:
the estimation's Hessian passes take the inner derivative with ``grad``, and every pass that
differentiates the forward twice (``LossProgram.second_derivatives()``) evaluates ``layer_norm``
with a weight written out (:class:`WrittenOutLayerNorm`, whatever calls it: a module or the
user's forward), the same function (forward within 4.4e-16 in float64) with autograd-built
derivatives. First-order passes keep torch's kernel (its first derivatives are right).

A ``bias`` without a ``weight`` (``F.layer_norm(x, shape, None, b)``) is written out too:
torch's kernel then has no double backward at all -- autograd's second derivative (``jacrev(grad)``,
the reverse fallbacks) raises "Expected a proper Tensor but got None ... for argument #1 'other'"
(torch 2.13; its forward-over-reverse is right, 2.9e-10 off finite differences).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

#: dtypes written out; half precision keeps torch's kernel (it accumulates in float32)
WRITTEN_OUT_DTYPES = (torch.float32, torch.float64)


def layer_norm_written_out(x: Tensor, normalized_shape: Any, weight: Tensor | None = None,
                           bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` as mean and biased variance over the last ``len(normalized_shape)`` dims
    of ``x``: ``(x - mu) / sqrt(var + eps) * weight + bias`` (torch's definition), same shape."""
    k = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-k, 0))
    centred = x - x.mean(dims, keepdim=True)
    y = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


class WrittenOutLayerNorm(TorchFunctionMode):
    """Within it, ``F.layer_norm`` / ``torch.layer_norm`` calls with an affine weight or bias (either
    alone, or both) on float32 / float64 inputs run as :func:`layer_norm_written_out` (a module's
    and user code's alike); any other call (no affine, half precision) runs unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.layer_norm or func is torch.layer_norm:
            bound = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args)) | kwargs
            x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
            if isinstance(x, Tensor) and (w is not None or b is not None) and x.dtype in WRITTEN_OUT_DTYPES:
                return layer_norm_written_out(x, bound["normalized_shape"], w, b,
                                              bound.get("eps", 1e-5))
        return func(*args, **kwargs)

