"""``table_cell_moments`` under ``torch.inference_mode`` and on inference tensors (rv49): its caches
read tensors' version counters, which inference tensors do not keep ("Inference tensors do not
track version counter"); it now runs outside inference mode on copies, with the same numbers bit
for bit as outside it."""

import pytest
import torch

from mis_lightning.functional import table as T
from mis_lightning.quantization.casts import cast_cell_values

F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kappa_only", [False, True])
def test_table_moments_under_inference_mode_equal_those_outside(dtype, kappa_only):
    values = cast_cell_values(dtype)
    g = torch.Generator().manual_seed(0)
    th = torch.randn(5000, generator=g, dtype=F64) * 0.05
    sg = torch.rand(5000, generator=g, dtype=F64) * 1e-3
    sg[::7] = 0.0  # sd-0 weights: the settled and tie paths too
    sc = torch.ones(5000, dtype=F64)
    ref = T.table_cell_moments(th, sg, values, sc, kappa_only=kappa_only)
    with torch.inference_mode():
        on_normal = T.table_cell_moments(th, sg, values, sc, kappa_only=kappa_only)
        th_i, sg_i, sc_i, v_i = th.clone(), sg.clone(), sc.clone(), values.clone()  # inference tensors
        on_inference = T.table_cell_moments(th_i, sg_i, v_i, sc_i, kappa_only=kappa_only)
    for got in (on_normal, on_inference):
        for f in ("kappa",) if kappa_only else ("kappa", "mean_abs", "m4"):
            a, b = getattr(got, f), getattr(ref, f)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()]), f
