"""Per-coordinate cell statistics of a Gaussian weight under a quantizer (method.md section 3).

Notation: ``theta_j`` is the trained weight, ``sigma_j`` the standard deviation of the
estimator ``theta-hat_j`` (parameter units), and ``b_{j,k}`` the cell edges of the scheme
around ``theta_j``.  In standard units ``alpha_{j,k} = (b_{j,k} - theta_j) / sigma_j`` the
quantizer partitions ``N(0, 1)`` into cells of probability ``p_k`` and conditional mean
``mu_k``; ``kappa_j = E m_j^2`` and ``lam_j = E |m_j|`` for ``m_j = mu_{cell}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_finite, check_shape

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# A cell whose probability is below this carries no usable information: its
# contribution diff^2/p -> p * alpha^2 vanishes with p, so it is dropped to avoid 0/0.
_TINY_PROB = 1e-300


@dataclass(frozen=True)
class CellStatistics:
    """Cell statistics of ``d`` coordinates with ``K`` cells each.

    Attributes:
        prob: ``[d, K]`` probability of each cell under ``N(theta_j, sigma_j^2)``.
        mean: ``[d, K]`` conditional mean ``E[U | cell]`` in standard units (finite even
            for cells of zero probability, where it is the finite edge nearest to 0).
        kappa: ``[d]`` surviving Fisher information ``E m_j^2`` in ``[0, 1]``.
        lam: ``[d]`` ``E |m_j|`` in ``[0, sqrt(2/pi)]``.
        m4: ``[d]`` fourth moment ``E m_j^4`` (used to decide when the Gaussian form holds).
        coverage: ``[d]`` total probability of the given cells (1 when the outer edges are
            infinite; below 1 when the window leaves mass out).
    """

    prob: Tensor
    mean: Tensor
    kappa: Tensor
    lam: Tensor
    m4: Tensor
    coverage: Tensor

    @property
    def d(self) -> int:
        return int(self.kappa.shape[0])

    def to(self, *args, **kwargs) -> CellStatistics:
        return CellStatistics(
            *(getattr(self, f).to(*args, **kwargs) for f in self.__dataclass_fields__)
        )


@dataclass(frozen=True)
class CellMoments:
    """The ``[d]``-shaped part of :class:`CellStatistics` (no per-cell tensors)."""

    kappa: Tensor
    lam: Tensor
    m4: Tensor
    coverage: Tensor


def standardize_boundaries(theta: Tensor, sigma: Tensor, boundaries: Tensor) -> Tensor:
    """``alpha = (boundaries - theta) / sigma`` in float64, shape ``[d, K+1]``.

    ``sigma_j = 0`` (a weight the data cannot move) gives ``alpha = +-inf`` for every edge
    not exactly at ``theta_j``: the code is frozen and ``kappa_j = 0``.
    """
    theta64 = theta.to(torch.float64).unsqueeze(-1)
    sigma64 = sigma.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1)
    return (boundaries.to(torch.float64) - theta64) / sigma64


def _pdf(a: Tensor) -> Tensor:
    # exp(-inf) = 0 gives phi(+-inf) = 0 without special cases.
    return torch.exp(-0.5 * a * a) * _INV_SQRT_2PI


def _interval_prob(lo: Tensor, hi: Tensor) -> Tensor:
    """``Phi(hi) - Phi(lo)`` without cancellation in the upper tail."""
    upper = lo > 0
    direct = torch.special.ndtr(hi) - torch.special.ndtr(lo)
    mirrored = torch.special.ndtr(-lo) - torch.special.ndtr(-hi)
    return torch.where(upper, mirrored, direct).clamp_min(0.0)


def _validate(theta: Tensor, sigma: Tensor, boundaries: Tensor) -> None:
    check_shape("theta", theta, 1, "[d]")
    check_shape("sigma", sigma, 1, "[d]")
    check_shape("boundaries", boundaries, 2, "[d, K+1]")
    d = theta.shape[0]
    if sigma.shape[0] != d or boundaries.shape[0] != d:
        raise ValueError(
            f"theta [d], sigma [d] and boundaries [d, K+1] disagree on d: "
            f"{tuple(theta.shape)}, {tuple(sigma.shape)}, {tuple(boundaries.shape)}"
        )
    if boundaries.shape[1] < 2:
        raise ValueError(f"boundaries needs at least 2 edges per row (K >= 1), got {boundaries.shape[1]}")
    check_finite("theta", theta)
    check_finite("sigma", sigma)
    if bool((sigma < 0).any()):
        j = int(torch.nonzero(sigma < 0)[0])
        raise ValueError(f"sigma must be >= 0; sigma[{j}] = {sigma[j].item()!r}")
    if bool(torch.isnan(boundaries).any()):
        j = tuple(int(i) for i in torch.nonzero(torch.isnan(boundaries))[0])
        raise ValueError(f"boundaries contains NaN, first at index {j}")
    unsorted = boundaries[:, 1:] < boundaries[:, :-1]
    if bool(unsorted.any()):
        j, k = (int(i) for i in torch.nonzero(unsorted)[0])
        raise ValueError(
            f"boundaries must be sorted along the last axis; row {j} has "
            f"boundaries[{j}, {k}] = {boundaries[j, k].item()!r} > "
            f"boundaries[{j}, {k + 1}] = {boundaries[j, k + 1].item()!r}"
        )


def cell_statistics(
    theta: Tensor, sigma: Tensor, boundaries: Tensor, *, validate: bool = True
) -> CellStatistics:
    """Cell probabilities, conditional means, ``kappa`` and ``lam`` (method.md section 3).

    Args:
        theta: ``[d]`` trained weights (parameter units).
        sigma: ``[d]`` standard deviation of each trained weight (parameter units, >= 0).
        boundaries: ``[d, K+1]`` cell edges around each ``theta_j`` (parameter units),
            sorted along the last axis; the first may be ``-inf`` and the last ``+inf``.
            Mass outside ``[b_0, b_K]`` is ignored (see ``coverage``): give the cells within
            about 8 sigma of ``theta_j``.
        validate: check shapes, finiteness and sorting (disable in trusted inner loops).

    Returns:
        :class:`CellStatistics` in float64 on the input's device.
    """
    if validate:
        _validate(theta, sigma, boundaries)
    alpha = standardize_boundaries(theta, sigma, boundaries)
    lo, hi = alpha[:, :-1], alpha[:, 1:]
    pdf = _pdf(alpha)
    diff = pdf[:, :-1] - pdf[:, 1:]
    prob = _interval_prob(lo, hi)
    live = prob > _TINY_PROB
    safe_p = torch.where(live, prob, torch.ones_like(prob))
    # Fallback mean for empty cells: the finite edge nearest to 0 (the tail limit).
    fallback = torch.clamp(torch.zeros_like(lo), lo, hi)
    fallback = torch.where(torch.isfinite(fallback), fallback, torch.zeros_like(fallback))
    # Rounding can push a tail mean just outside its cell; the true mean lies inside.
    mean = torch.where(live, torch.maximum(torch.minimum(diff / safe_p, hi), lo), fallback)
    kappa = torch.where(live, diff * diff / safe_p, torch.zeros_like(prob)).sum(-1).clamp(0.0, 1.0)
    lam = diff.abs().sum(-1).clamp(0.0, SQRT_2_OVER_PI)
    # Empty cells contribute nothing; their fallback mean can be huge (sigma = 0 puts the
    # edges at ~1e307 standard units), and 0 * mean**4 = 0 * inf would give NaN.
    m4 = torch.where(live, prob * mean**4, torch.zeros_like(prob)).sum(-1)
    coverage = prob.sum(-1)
    return CellStatistics(prob=prob, mean=mean, kappa=kappa, lam=lam, m4=m4, coverage=coverage)


def cell_moments(theta: Tensor, sigma: Tensor, boundaries: Tensor) -> CellMoments:
    """``kappa``, ``lam``, ``m4`` and ``coverage`` only: the fast path for large ``d``.

    Same arguments and numerics as :func:`cell_statistics`, but returns ``[d]`` tensors
    only; callers stream coordinates through it in chunks (no validation is done here:
    it is the inner loop of the chunked drivers, which validate their own inputs).
    """
    alpha = standardize_boundaries(theta, sigma, boundaries)
    return _moments_from_alpha(alpha)


def _moments_from_alpha(alpha: Tensor) -> CellMoments:
    lo, hi = alpha[:, :-1], alpha[:, 1:]
    pdf = _pdf(alpha)
    diff = pdf[:, :-1] - pdf[:, 1:]
    prob = _interval_prob(lo, hi)
    live = prob > _TINY_PROB
    safe_p = torch.where(live, prob, torch.ones_like(prob))
    ratio = torch.maximum(torch.minimum(diff / safe_p, hi), lo)
    ratio = torch.where(live, ratio, torch.zeros_like(prob))
    sq = diff * ratio
    kappa = sq.sum(-1).clamp(0.0, 1.0)
    lam = diff.abs().sum(-1).clamp(0.0, SQRT_2_OVER_PI)
    m4 = (sq * ratio * ratio).sum(-1)
    coverage = prob.sum(-1)
    return CellMoments(kappa=kappa, lam=lam, m4=m4, coverage=coverage)
