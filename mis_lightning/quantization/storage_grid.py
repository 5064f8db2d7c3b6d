"""The storage grid: the release of a bf16 / fp16 weight left unquantized (method.md section 5,
"Weights stored in bf16 / fp16").

A model stored in a 16-bit float format ``D`` holds ``rnd_D(theta-hat)``. What it releases of a
weight that no scheme quantizes (the ``none`` row and the report's baseline, the parameters a
scheme leaves in float) is that stored value: a quantizer whose cells are the storage cells, the
midpoints of adjacent ``D`` values. Its ``kappa`` is below 1 by about ``(ulp / sd)^2 / 12`` where sd
spans a few storage ulps, and falls towards 0 below one ulp; float32 / float64 weights keep
``kappa = 1`` (continuous).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..functional.storage import STORAGE_DTYPES, storage_values
from .base import ParamGrid

#: :attr:`ParamGrid.method` of a storage grid
STORAGE_METHOD = "stored"


def storage_grid(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> ParamGrid:
    """The storage grid of a parameter ``name`` of ``shape`` stored in ``dtype`` (bfloat16 /
    float16): kind ``"table"`` over every finite ``dtype`` value and the overflow cells beyond
    (:func:`~mis_lightning.functional.storage.storage_values`: ``+-inf`` stood for by the next power
    of two, released as ``inf``: ``release_dtype``), scale 1, one block, no storage rounding of its
    own (``storage_dtype=None``: its cells are the storage cells).

    Raises:
        ValueError: ``dtype`` is not bfloat16 / float16.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"a storage grid needs a bfloat16 / float16 parameter, got {dtype}")
    return ParamGrid(name=name, shape=shape, kind="table", dequantized=torch.empty(0),
                     bits_per_weight=float(torch.finfo(dtype).bits),
                     scale=torch.ones([1] * len(shape), dtype=torch.float32), block_size=shape,
                     values=storage_values(dtype), method=STORAGE_METHOD, release_dtype=dtype)


def storage_grids(model: nn.Module, names: Sequence[str]) -> dict[str, ParamGrid]:
    """``{name: storage grid}`` of the parameters ``names`` of ``model`` stored in bf16 / fp16
    (the others, float32 / float64, are continuous: none)."""
    params = dict(model.named_parameters())
    return {n: storage_grid(n, tuple(params[n].shape), params[n].dtype) for n in names
            if n in params and params[n].dtype in STORAGE_DTYPES}
