"""The 80% uncertainty interval of a scheme's leakage from parametric-bootstrap draws
(method.md section 7).

The caller re-evaluates the cell statistics around ``theta_hat + sigma * xi`` (``xi ~ N(0, 1)``
per weight; ``sigma`` the ``[d]`` standard deviations of the trained weights), scores each
draw, and hands the per-draw leakages here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Quantile of N(0, 1) at 0.9: half-width of an 80% interval in standard errors.
Z80 = 1.2816
# Fewer draws than this: a normal approximation instead of empirical quantiles.
MIN_QUANTILE_DRAWS = 5


def record_standard_error(leakage: Tensor) -> float:
    """Standard error of the mean of ``leakage [R]`` over the R records (0 for one record):
    the truth averages over every record, the estimate over R of them."""
    return float(leakage.std() / math.sqrt(leakage.numel())) if leakage.numel() > 1 else 0.0


def bootstrap_interval(
    draws: Sequence[float] | Tensor,
    plug_in: float,
    record_se: float = 0.0,
    *,
    gaussian_plug_in: float | None = None,
) -> tuple[float, float]:
    """An 80% interval ``(lo, hi)`` for the leakage.

    (p10, p90) of the per-draw leakages (a normal approximation ``mean +- 1.2816 sd`` below
    ``MIN_QUANTILE_DRAWS`` draws), widened to contain the plug-in value and by
    ``1.2816 * record_se`` on each side. The draws smooth kappa over sigma around theta-hat;
    where that shifts the whole distribution away from the plug-in (weights whose sd spans many
    cells or the end of the code range), the interval still contains the plug-in value.

    Args:
        draws: ``[B]`` leakage of each bootstrap draw (``B >= 1``).
        plug_in: the reported leakage at theta-hat.
        record_se: standard error of the mean over the records (:func:`record_standard_error`).
        gaussian_plug_in: when the draws were scored with the Gaussian form but the plug-in
            with another (Monte Carlo), the Gaussian form's value at theta-hat: each draw is
            rescaled by ``plug_in / gaussian_plug_in`` (if positive).

    Returns:
        ``(lo, hi)`` with ``0 <= lo <= plug_in <= hi <= 1`` (both ends cut to ``[0, 1]``, the
        range of a leakage).

    Raises:
        ValueError: no draws.
    """
    t = torch.as_tensor(draws, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("bootstrap_interval needs at least one draw")
    if gaussian_plug_in is not None and gaussian_plug_in > 0:
        t = torch.tensor([float(v) * (plug_in / gaussian_plug_in) for v in t.tolist()], dtype=torch.float64)
    if t.numel() < MIN_QUANTILE_DRAWS:
        m, s = float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0
        lo, hi = max(m - Z80 * s, 0.0), m + Z80 * s
    else:
        lo, hi = float(torch.quantile(t, 0.1)), float(torch.quantile(t, 0.9))
    # a leakage is a TV, in [0, 1]: the record pad (and draws rescaled to a Monte Carlo plug-in)
    # near saturation would carry the upper end past 1 (cv31)
    return max(min(lo, plug_in) - Z80 * record_se, 0.0), min(max(hi, plug_in) + Z80 * record_se, 1.0)
