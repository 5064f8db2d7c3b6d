"""Per-coordinate cell statistics of a Gaussian weight under a quantizer (method.md section 3).

Notation: ``theta_j`` is the trained weight, ``sigma_j`` the standard deviation of the
estimator ``theta-hat_j`` (parameter units; lower-case: one number per weight, not the
sandwich covariance matrix ``Sigma``), and ``b_{j,k}`` the cell edges of the scheme
around ``theta_j``.  In standard units ``alpha_{j,k} = (b_{j,k} - theta_j) / sigma_j`` the
quantizer partitions ``N(0, 1)`` into cells of probability ``p_k`` and conditional mean
``mu_k``; ``kappa_j = E m_j^2`` and ``mean_abs_j = E |m_j|`` (formerly ``lam``) for
``m_j = mu_{cell}``.

One kernel computes the per-cell terms of every path (:func:`cell_terms`); the grid paths of
:mod:`~mis_lightning.functional.affine` and :mod:`~mis_lightning.functional.table` feed it
windows of edges.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ._checks import check_finite, check_shape

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# A cell whose probability is below this carries no usable information: its
# contribution diff^2/p -> p * alpha^2 vanishes with p, so it is dropped to avoid 0/0.
_TINY_PROB = 1e-300


class _MeanAbsAlias:
    """``lam`` as a deprecated alias of ``mean_abs`` (constructor keyword and attribute)."""

    mean_abs: Tensor

    @property
    def lam(self) -> Tensor:
        """Deprecated alias of :attr:`mean_abs`."""
        warnings.warn("`lam` is deprecated; use `mean_abs` (E|m_j|)", DeprecationWarning, stacklevel=2)
        return self.mean_abs

    @staticmethod
    def _mean_abs_arg(mean_abs: Tensor | None, lam: Tensor | None) -> Tensor:
        if lam is not None:
            if mean_abs is not None:
                raise TypeError("give mean_abs or its deprecated alias lam, not both")
            warnings.warn("the `lam=` argument is deprecated; use `mean_abs=`", DeprecationWarning,
                          stacklevel=3)
            return lam
        if mean_abs is None:
            raise TypeError("missing required argument: mean_abs")
        return mean_abs


@dataclass(frozen=True, init=False)
class CellStatistics(_MeanAbsAlias):
    """Cell statistics of ``d`` coordinates with ``K`` cells each.

    Attributes:
        prob: ``[d, K]`` probability of each cell under ``N(theta_j, sigma_j^2)``.
        mean: ``[d, K]`` conditional mean ``E[U | cell]`` in standard units (finite even
            for cells of zero probability, where it is the finite edge nearest to 0).
        kappa: ``[d]`` surviving Fisher information ``E m_j^2`` in ``[0, 1]``.
        mean_abs: ``[d]`` ``E |m_j|`` in ``[0, sqrt(2/pi)]`` (deprecated alias ``lam``).
        m4: ``[d]`` fourth moment ``E m_j^4`` (used to decide when the Gaussian form holds).
        coverage: ``[d]`` total probability of the given cells (1 when the outer edges are
            infinite; below 1 when the window leaves mass out).
    """

    prob: Tensor
    mean: Tensor
    kappa: Tensor
    mean_abs: Tensor
    m4: Tensor
    coverage: Tensor

    def __init__(self, prob: Tensor, mean: Tensor, kappa: Tensor, mean_abs: Tensor | None = None,
                 m4: Tensor | None = None, coverage: Tensor | None = None, *,
                 lam: Tensor | None = None) -> None:
        values = (prob, mean, kappa, self._mean_abs_arg(mean_abs, lam), m4, coverage)
        for f, v in zip(fields(self), values):
            object.__setattr__(self, f.name, v)

    @property
    def d(self) -> int:
        return int(self.kappa.shape[0])

    def to(self, *args, **kwargs) -> CellStatistics:
        return CellStatistics(*(getattr(self, f.name).to(*args, **kwargs) for f in fields(self)))

    def select(self, a: int, b: int) -> CellStatistics:
        """Coordinates ``a:b`` (a view)."""
        return CellStatistics(*(getattr(self, f.name)[a:b] for f in fields(self)))


@dataclass(frozen=True, init=False)
class CellMoments(_MeanAbsAlias):
    """The ``[d]``-shaped part of :class:`CellStatistics` (no per-cell tensors): ``kappa``,
    ``mean_abs`` (deprecated alias ``lam``), ``m4`` and ``coverage``, each ``[d]``."""

    kappa: Tensor
    mean_abs: Tensor
    m4: Tensor
    coverage: Tensor

    def __init__(self, kappa: Tensor, mean_abs: Tensor | None = None, m4: Tensor | None = None,
                 coverage: Tensor | None = None, *, lam: Tensor | None = None) -> None:
        values = (kappa, self._mean_abs_arg(mean_abs, lam), m4, coverage)
        for f, v in zip(fields(self), values):
            object.__setattr__(self, f.name, v)


def standardize_boundaries(theta: Tensor, sigma: Tensor, boundaries: Tensor) -> Tensor:
    """``alpha = (boundaries - theta) / sigma`` in float64, shape ``[d, K+1]``.

    ``sigma_j = 0`` (a weight the data cannot move) gives ``alpha = +-inf`` for every edge
    not exactly at ``theta_j``: the code is frozen and ``kappa_j = 0``.
    """
    theta64 = theta.to(torch.float64).unsqueeze(-1)
    sigma64 = sigma.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1)
    return (boundaries.to(torch.float64) - theta64) / sigma64


# The windowed paths' sums over an element's cells or runs (a [rows, c] tensor's columns) add
# each column's rows in order, first to last: one column's sum does not depend on the other
# columns (torch's sum(0) groups a column's rows by the column's position and the tensor's width:
# ~1 ulp apart for the same element alone and beside others, p48a / fx49), and trailing rows of
# zeros (the runs' and the variance blocks' padding) add exactly 0. False: torch's sum(0) (A/B)
FIXED_ORDER_SUMS = True


def column_sums(x: Tensor) -> Tensor:
    """``x.sum(0)`` of a ``[rows, c]`` tensor with each column's rows added first to last
    (:data:`FIXED_ORDER_SUMS`): column ``j``'s sum depends on column ``j`` alone."""
    if not FIXED_ORDER_SUMS or x.shape[0] <= 2:  # (two rows: one addition either way)
        return x.sum(0)
    acc = x[0] + x[1]
    for i in range(2, x.shape[0]):
        acc.add_(x[i])
    return acc


def _pdf(a: Tensor) -> Tensor:
    # exp(-inf) = 0 gives phi(+-inf) = 0 without special cases.
    return torch.exp(-0.5 * a * a) * _INV_SQRT_2PI


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
    """Cell probabilities, conditional means, ``kappa`` and ``mean_abs`` (method.md section 3).

    Args:
        theta: ``[d]`` trained weights (parameter units).
        sigma: ``[d]`` standard deviation of each trained weight ``theta-hat_j`` (parameter
            units, >= 0; lower-case sigma, not the ``[d, d]`` sandwich covariance ``Sigma``).
        boundaries: ``[d, K+1]`` cell edges around each ``theta_j`` (parameter units),
            sorted along the last axis; the first may be ``-inf`` and the last ``+inf``.
            Mass outside ``[b_0, b_K]`` is ignored (see ``coverage``): give the cells within
            about 8 sigma of ``theta_j``.
        validate: check shapes, finiteness and sorting (disable in trusted inner loops).

    Returns:
        :class:`CellStatistics` in float64 on the input's device.

    Raises:
        ValueError: (``validate=True``) shapes disagree, a value is NaN/inf, ``sigma < 0`` or
            a row of ``boundaries`` is not sorted; the message names the tensor and index.
    """
    if validate:
        _validate(theta, sigma, boundaries)
    alpha = standardize_boundaries(theta, sigma, boundaries)
    terms = cell_terms(alpha)
    lo, hi = alpha[:, :-1], alpha[:, 1:]
    # Fallback mean for empty cells: the finite edge nearest to 0 (the tail limit).
    fallback = torch.clamp(torch.zeros_like(lo), lo, hi)
    fallback = torch.where(torch.isfinite(fallback), fallback, torch.zeros_like(fallback))
    mean = torch.where(terms.live, terms.ratio, fallback)
    mm = moments_from_terms(terms)
    return CellStatistics(prob=terms.prob, mean=mean, kappa=mm.kappa, mean_abs=mm.mean_abs,
                          m4=mm.m4, coverage=mm.coverage)


def cell_moments(theta: Tensor, sigma: Tensor, boundaries: Tensor) -> CellMoments:
    """``kappa``, ``mean_abs``, ``m4`` and ``coverage`` only: the fast path for large ``d``.

    Same arguments and numerics as :func:`cell_statistics`, but returns ``[d]`` tensors
    only; callers stream coordinates through it in chunks (no validation is done here:
    it is the inner loop of the chunked drivers, which validate their own inputs).
    """
    return moments_from_alpha(standardize_boundaries(theta, sigma, boundaries))


@dataclass(frozen=True)
class CellTerms:
    """Per-cell terms of standardised edges ``alpha [c, K+1]``, all ``[c, K]`` float64.

    ``prob`` = ``Phi(hi) - Phi(lo)`` (from tail probabilities: no cancellation in either tail), ``diff`` =
    ``phi(lo) - phi(hi)`` (so that the conditional mean is ``diff / prob``), ``ratio`` the
    conditional mean kept inside its cell (0 for empty cells), ``live`` = ``prob > 1e-300``.
    """

    prob: Tensor
    diff: Tensor
    ratio: Tensor
    live: Tensor


def cell_terms(alpha: Tensor) -> CellTerms:
    """The cell-moment kernel (one implementation for every grid path): per-cell
    probabilities and conditional means of ``N(0, 1)`` between standardised edges
    ``alpha [c, K+1]`` (sorted rows, ``+-inf`` allowed). One ``ndtr`` per edge."""
    pdf = _pdf(alpha)
    lo, hi = alpha[:, :-1], alpha[:, 1:]
    # One ndtr per edge: q = P(N(0,1) beyond |alpha|). A cell on one side of 0 is a difference
    # of two tail probabilities (no cancellation in either tail); a cell holding 0 is 1 - both.
    q = torch.special.ndtr(-alpha.abs())
    ql, qh = q[:, :-1], q[:, 1:]
    prob = torch.where(lo > 0, ql - qh, torch.where(hi <= 0, qh - ql, 1.0 - ql - qh)).clamp_min(0.0)
    diff = pdf[:, :-1] - pdf[:, 1:]
    live = prob > _TINY_PROB
    # Rounding can push a tail mean just outside its cell; the true mean lies inside.
    ratio = torch.maximum(torch.minimum(diff / torch.where(live, prob, torch.ones_like(prob)), hi), lo)
    ratio = torch.where(live, ratio, torch.zeros_like(prob))
    return CellTerms(prob=prob, diff=diff, ratio=ratio, live=live)


def moments_from_terms(terms: CellTerms) -> CellMoments:
    """``kappa = sum p mu^2``, ``mean_abs = sum p |mu|``, ``m4 = sum p mu^4`` and coverage from
    :class:`CellTerms` (``p mu = diff``); ``[c]`` float64."""
    sq = terms.diff * terms.ratio
    kappa = sq.sum(-1).clamp(0.0, 1.0)
    mean_abs = terms.diff.abs().sum(-1).clamp(0.0, SQRT_2_OVER_PI)
    # Empty cells have ratio 0, so they add nothing (no 0 * inf).
    m4 = (sq * terms.ratio * terms.ratio).sum(-1)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=terms.prob.sum(-1))


def moments_from_alpha(alpha: Tensor) -> CellMoments:
    """Cell moments ``[c]`` from standardised edges ``alpha [c, K+1]`` (see :func:`cell_terms`)."""
    return moments_from_terms(cell_terms(alpha))


def moments_from_alpha_erfc(alpha: Tensor, kappa_only: bool = False) -> CellMoments:
    """Cell moments ``[c]`` of standardised edges ``alpha [c, K+1]``: the terms of
    :func:`cell_terms` with each tail probability ``P(N(0,1) > |alpha|)`` computed as
    ``erfc(|alpha| / sqrt 2) / 2`` (torch's vectorised ``erfc``, within 1.5 ulp) instead of
    ``ndtr(-|alpha|)`` (a scalar loop, ~4x the cost on CPU), and cells below ``1e-300``
    :func:`moments_from_alpha` to ~1e-15, not bit for bit, in ~30 element-wise operations per
    edge instead of ~40. The stored cells of bf16 / fp16 models use it
    (:meth:`~mis_lightning.quantization.ParamGrid.element_moments`, ``storage_dtype``); the
    float32 paths keep :func:`moments_from_alpha` (their reports stay bitwise unchanged).
    ``kappa_only``: ``mean_abs`` and ``m4`` are not computed (NaN); ``kappa`` bitwise the same.
    (:func:`~mis_lightning.functional.distinct.distinct_edge_moments`: the same sums with each
    run of equal edges evaluated once.)"""
    prob, diff, ratio, sq = erfc_cell_terms(alpha)
    kappa = sq.sum(-1).clamp(0.0, 1.0)
    if kappa_only:
        nan = torch.full_like(kappa, math.nan)
        return CellMoments(kappa=kappa, mean_abs=nan, m4=nan, coverage=prob.sum(-1))
    mean_abs = diff.abs().sum(-1).clamp(0.0, SQRT_2_OVER_PI)
    m4 = (sq * ratio * ratio).sum(-1)
    return CellMoments(kappa=kappa, mean_abs=mean_abs, m4=m4, coverage=prob.sum(-1))


def erfc_cell_terms(alpha: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-cell terms of :func:`moments_from_alpha_erfc`: ``(prob, diff, ratio, sq)``, each
    ``[c, K]`` float64 for standardised edges ``alpha [c, K+1]`` (non-decreasing along a row):
    the cell's probability, ``phi(lo) - phi(hi)``, its conditional mean (0 for a cell below
    ``1e-300``) and ``diff * ratio`` (the cell's share of kappa). Element-wise in the cell's two
    edges: an empty cell (equal edges) gives exactly ``+0`` in every term."""
    pdf = _pdf(alpha)
    lo, hi = alpha[:, :-1], alpha[:, 1:]
    # Phi(alpha) - [alpha > 0] = -q above 0, q below: a cell's probability is the difference of
    # these plus the count of its edges above 0 (0 or 1), a difference of two tails on either side
    # of 0 (no cancellation) and 1 - both tails for a cell holding 0
    q = torch.special.erfc(alpha.abs() * _SQRT_HALF) * 0.5
    pos = alpha > 0
    f = torch.where(pos, -q, q)
    prob = ((f[:, 1:] - f[:, :-1]) + (pos[:, 1:].to(alpha.dtype) - pos[:, :-1].to(alpha.dtype))).clamp_min(0.0)
    diff = pdf[:, :-1] - pdf[:, 1:]
    # Rounding can push a tail mean just outside its cell; the true mean lies inside.
    ratio = torch.maximum(torch.minimum(diff / prob.clamp_min(_TINY_PROB), hi), lo)
    # an empty cell (a window's +-inf padding, a zero-width cell at a bound) adds nothing: no 0 * inf
    ratio = torch.where(prob > _TINY_PROB, ratio, 0.0)
    return prob, diff, ratio, diff * ratio
