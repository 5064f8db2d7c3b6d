"""Ground truth for an optimised (non-nearest) PTQ scheme: torchao's HQQ scale-only.

:class:`HQQGrid` releases, for each simulated weight vector (one output row), the codes and
the scale of torchao's own HQQ solver (``quant_primitives._choose_qparams_and_quantize_scale_only_hqq``,
the function ``IntxWeightOnlyConfig(intx_choose_qparams_algorithm="hqq_scale_only")`` runs):
the ground truth (:func:`~mis_lightning.groundtruth.ground_truth.ground_truth`, the
cross-fitted LR-test lower bound on TV) is computed on the real scheme's releases. It
subclasses :class:`AbsmaxGrid` so that the LR test and the control variate treat it as an
absmax-like release (codes on the released scale's grid; the largest weight given the most
weight in the test statistic); any such choice of test set gives a valid lower bound.

:func:`indicator` scores the registered scheme ``intx_weight_only_int{bits}_hqq`` (per row)
with :func:`mis_lightning.assess.score_schemes` on one trained model: Monte Carlo
re-quantization, each element at the larger of its codes-only and released-grid kappa.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..assess import score_schemes
from ..quantization import get_scheme
from .ground_truth import AbsmaxGrid


@dataclass(frozen=True)
class HQQGrid(AbsmaxGrid):
    """torchao's HQQ scale-only quantization of each weight vector (symmetric, per row)."""

    family: str = "hqq"

    def release(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from torchao.quantization.quant_primitives import (
            _choose_qparams_and_quantize_scale_only_hqq,
        )

        t = torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32))
        q, scale = _choose_qparams_and_quantize_scale_only_hqq(
            t, [1, t.shape[-1]], -(self.qmax + 1), self.qmax)
        return q.numpy().astype(np.float64), scale.numpy().astype(np.float64).reshape(-1, 1)


def scheme_name(grid: HQQGrid) -> str:
    return get_scheme("intx_weight_only_int4_hqq", bits=grid.bits).name


def indicator(grids: list[HQQGrid], est, model: nn.Module, seed: int = 0) -> np.ndarray:
    """Leakage ``[G]`` of each HQQ grid's registered scheme for one trained model (float32
    copy: torchao's intx configs take float32 weights)."""
    m32 = copy.deepcopy(model).float()
    schemes = [get_scheme("intx_weight_only_int4_hqq", bits=g.bits) for g in grids]
    rep = score_schemes(est, m32, schemes, uncertainty_draws=0, seed=seed)
    return np.array([rep.schemes[s.name].leakage for s in schemes])
