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
        from ..quantization.torchao_backend import _import_torchao_quantization

        _import_torchao_quantization()  # torchao's first import: without its optional-kernel notices
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


def _llr_cells(grid: HQQGrid, theta: np.ndarray, m_out: np.ndarray, shift: np.ndarray, sd: np.ndarray,
               scale_in: tuple[float, float] | None) -> np.ndarray:
    """A log-likelihood ratio of the HQQ release (codes on the released scale's grid, every
    coordinate through its cell, no weight taken as revealed exactly), plus, when
    ``scale_in = (shift, sd)`` of the released scale is given, a Gaussian term for the scale."""
    from .ground_truth import _log_cell_prob

    q, scale = grid.release(theta)
    lo = np.where(q <= -grid.qmax - 1, -np.inf, (q - 0.5) * scale)
    hi = np.where(q >= grid.qmax, np.inf, (q + 0.5) * scale)
    m_in = m_out + shift
    lp = (_log_cell_prob((lo - m_in) / sd, (hi - m_in) / sd)
          - _log_cell_prob((lo - m_out) / sd, (hi - m_out) / sd)).sum(-1)
    if scale_in is not None:
        mu, sh, s_ = scale_in
        v = scale[:, 0]
        lp = lp + (-(v - mu - sh) ** 2 + (v - mu) ** 2) / (2 * s_ ** 2)
    return lp


def tv_lr_test_hqq(grid: HQQGrid, sims: dict[str, np.ndarray], mean: np.ndarray, sd: np.ndarray,
                   folds: int = 2) -> float:
    """Cross-fitted LR-test lower bound on ``TV_z`` of the HQQ release: three candidate test
    statistics (the absmax-style LLR of :func:`ground_truth._llr`, the all-cells LLR, and the
    all-cells LLR plus a Gaussian scale term); on each fold the candidate with the largest
    value on the *fitting* half is evaluated on the other half (no selection bias)."""
    from .ground_truth import _llr

    M = sims["in"].shape[0]
    idx = np.arange(M) % folds
    vals = []
    for f in range(folds):
        fit, ev = idx != f, idx == f
        shift = (sims["in"][fit] - sims["out"][fit]).mean(0)
        s_in = grid.release(sims["in"][fit])[1][:, 0]
        s_out = grid.release(sims["out"][fit])[1][:, 0]
        sc = (float(s_out.mean()), float(s_in.mean() - s_out.mean()), float(s_out.std()) or 1e-12)
        cands = [lambda t, sh=shift: _llr(grid, t, mean, sh, sd),
                 lambda t, sh=shift: _llr_cells(grid, t, mean, sh, sd, None),
                 lambda t, sh=shift, sc=sc: _llr_cells(grid, t, mean, sh, sd, sc)]
        on_fit = [(c(sims["in"][fit]) > 0).mean() - (c(sims["out"][fit]) > 0).mean() for c in cands]
        best = cands[int(np.argmax(on_fit))]
        vals.append((best(sims["in"][ev]) > 0).mean() - (best(sims["out"][ev]) > 0).mean())
    return float(np.mean(vals))


def ground_truth_hqq(s, grids: list[HQQGrid], Z: int = 40, M: int = 4000, seed: int = 0,
                     boot: int = 300, level: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """``(truth [G], interval [G, 2])``: the mean over ``Z`` targets of
    :func:`tv_lr_test_hqq`, with a bootstrap interval over targets."""
    from .ground_truth import draw_records, simulate

    rng = np.random.default_rng([seed, s.d, s.n, 17])
    zx, zy = draw_records(s, Z, rng)
    sims = [simulate(s, zx[i], zy[i], M, rng) for i in range(Z)]
    pooled = np.concatenate([sm["out"] for sm in sims])
    mean, sd = pooled.mean(0), pooled.std(0)
    tv = np.array([[tv_lr_test_hqq(g, sm, mean, sd) for g in grids] for sm in sims])
    b = np.random.default_rng(seed).integers(0, Z, size=(boot, Z))
    reps = tv[b].mean(1)
    a = (1 - level) / 2
    return tv.mean(0), np.quantile(reps, [a, 1 - a], axis=0).T
