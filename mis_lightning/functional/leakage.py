"""Per-record leakage, its saturation, and MIS (method.md section 3).

For a record ``z`` with standardised influences ``w_j(z)`` the first-order total
variation between the release's law given ``z`` and its marginal law is

    TV_z ~ E | sum_j w_j(z) m_j | / (2 sqrt(n)),   m_j independent, m_j = mu_k w.p. p_k,

saturated through ``G(t) = 2 Phi(sqrt(pi/2) t) - 1 = erf(sqrt(pi) t / 2)``.  Three
evaluations of the expectation: exact for one coordinate, Monte Carlo, and the Gaussian
(CLT) form ``sqrt(2/pi) sqrt(sum_j w_j^2 kappa_j)``.

Choice of method (``method="auto"``): exact for ``d = 1``; otherwise the Gaussian form
when its Edgeworth error ``|gamma_z| / 24`` is below ``CLT_TOLERANCE`` for every record,
where ``gamma_z = sum_j w_j^4 (E m_j^4 - 3 kappa_j^2) / (sum_j w_j^2 kappa_j)^2`` is the
excess kurtosis of ``sum_j w_j m_j`` (the relative error of ``sqrt(2/pi) * std`` as an
estimate of ``E|S|`` is ``-gamma/24 + O(gamma^2)``), *and* at least ``CLT_MIN_TERMS``
coordinates contribute to every record's sum (``n_eff``, below); Monte Carlo otherwise.
The Edgeworth series is asymptotic in the number of comparable terms: when one or a few
coordinates dominate, higher cumulants are as large as the fourth and ``|gamma|/24`` can
read 1e-3 while the Gaussian form is off by 10% (a coarse coordinate whose ``m`` has
``E m^4 ~ 3 kappa^2`` yet is far from Gaussian). Measured over 1600 random records in
``benchmarks/leakage_methods.py`` (docs/functional-accuracy.md): with both conditions the
Gaussian form is within 1.6% of a 40k-draw Monte Carlo run (0.8% beyond 2 Monte Carlo
standard errors of 0.4%); with the Edgeworth condition alone, only within 18%. Also
checked in ``tests/test_leakage.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._checks import check_finite, check_n, check_shape
from .cells import SQRT_2_OVER_PI, CellMoments, CellStatistics

Method = Literal["auto", "exact1d", "mc", "clt"]
# Relative error of the Gaussian form below which "auto" uses it (Edgeworth estimate).
CLT_TOLERANCE = 0.01
# Fewest effective terms ``n_eff = (sum_j w_j^2 kappa_j)^2 / sum_j (w_j^2 kappa_j)^2`` for
# which "auto" trusts the Edgeworth estimate (see the module docstring).
CLT_MIN_TERMS = 10.0
DEFAULT_NUM_SAMPLES = 4096
# Coordinates per chunk in the Monte Carlo path: bounds the [S, chunk] sample buffer.
MC_CHUNK = 4096


def saturate(t: Tensor) -> Tensor:
    """``G(t) = 2 Phi(sqrt(pi/2) t) - 1``: exact for an unquantized Gaussian release, ~t for small t."""
    return torch.special.erf(math.sqrt(math.pi) * t / 2.0)


def mis_from_leakage(leakage: Tensor) -> Tensor:
    """MIS = 1 - mean over records of the saturated per-record leakage ``[R]``."""
    check_shape("leakage", leakage, 1, "[R]")
    if leakage.numel() == 0:
        raise ValueError("leakage is empty: at least one record is needed")
    return 1.0 - leakage.to(torch.float64).mean()


@dataclass
class CltSums:
    """Streaming sums of the Gaussian form for ``R`` records.

    ``s2[r] = sum_j w_rj^2 kappa_j`` and ``s4[r] = sum_j w_rj^4 (m4_j - 3 kappa_j^2)``
    (the fourth cumulant of ``sum_j w_j m_j``). Both are sums over coordinates: add
    coordinate chunks in any order, and add the sums of disjoint coordinate sets (layers,
    processes) with ``+``.
    """

    s2: Tensor
    s4: Tensor
    #: ``sum_j (w_rj^2 kappa_j)^2`` (for :meth:`effective_terms`); ``None`` = not tracked.
    s22: Tensor | None = None

    @classmethod
    def zeros(cls, num_records: int, device: torch.device | str | None = None) -> CltSums:
        z = torch.zeros(num_records, dtype=torch.float64, device=device)
        return cls(z, z.clone(), z.clone())

    def add_(self, w: Tensor, kappa: Tensor, m4: Tensor | None = None) -> CltSums:
        """Accumulate a coordinate chunk: ``w [R, c]``, ``kappa [c]``, ``m4 [c]`` (optional)."""
        w2 = w.to(torch.float64).square()
        k = kappa.to(torch.float64)
        self.s2 += w2 @ k
        if m4 is not None:
            w4 = w2.square()
            self.s4 += w4 @ (m4.to(torch.float64) - 3.0 * k * k)
            if self.s22 is None:
                self.s22 = torch.zeros_like(self.s2)
            self.s22 += w4 @ (k * k)
        return self

    def __add__(self, other: CltSums) -> CltSums:
        if self.s22 is None or other.s22 is None:
            s22 = None
        else:
            s22 = self.s22 + other.s22
        return CltSums(self.s2 + other.s2, self.s4 + other.s4, s22)

    def effective_terms(self) -> Tensor:
        """``[R]`` effective number of contributing coordinates ``s2^2 / s22`` (``inf`` where a
        record has no leakage or ``s22`` is not tracked); see :func:`effective_terms`."""
        if self.s22 is None:
            return torch.full_like(self.s2, math.inf)
        return torch.where(self.s22 > 0, self.s2.square() / self.s22.clamp_min(1e-300),
                           torch.full_like(self.s2, math.inf))

    def excess_kurtosis(self) -> Tensor:
        """``[R]`` excess kurtosis of ``sum_j w_j m_j`` (0 where the record has no leakage)."""
        den = self.s2.square()
        return torch.where(den > 0, self.s4 / den.clamp_min(1e-300), torch.zeros_like(den))

    def leakage(self, n: float) -> Tensor:
        """``[R]`` saturated leakage ``G(sqrt(2/pi) sqrt(s2) / (2 sqrt(n)))``."""
        check_n(n)
        return saturate(SQRT_2_OVER_PI * self.s2.clamp_min(0.0).sqrt() / (2.0 * math.sqrt(n)))


def clt_sums(w: Tensor, kappa: Tensor, m4: Tensor | None = None) -> CltSums:
    """Gaussian-form sums for ``w [R, d]`` and ``kappa [d]`` (see :class:`CltSums`)."""
    return CltSums.zeros(w.shape[0], device=w.device).add_(w, kappa, m4)


def leakage_from_sums(s2: Tensor, n: float) -> Tensor:
    """``[R]`` saturated leakage from streamed ``s2 = sum_j w_j^2 kappa_j`` (Gaussian form)."""
    return CltSums(s2, torch.zeros_like(s2)).leakage(n)


def baseline_leakage(w: Tensor, n: float) -> Tensor:
    """``[R]`` leakage of the unquantized release (``kappa = 1``): ``2 Phi(|w| / (2 sqrt n)) - 1``."""
    _check_w(w)
    check_n(n)
    return leakage_from_sums(w.to(torch.float64).square().sum(-1), n)


def sample_cell_means(
    stats: CellStatistics, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``m [S, d]``: each coordinate's cell independently by its probabilities.

    Inverse-CDF sampling on the cell probabilities (renormalised by ``coverage``).
    """
    prob = stats.prob
    cdf = prob.cumsum(-1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-300)
    u = torch.rand(prob.shape[0], num_samples, dtype=prob.dtype, device=prob.device, generator=generator)
    k = torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp_(max=prob.shape[1] - 1)
    return torch.gather(stats.mean, 1, k).T


def mc_first_order(
    w: Tensor,
    stats: CellStatistics,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    generator: torch.Generator | None = None,
    gaussian_s2: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo ``E |sum_j w_j m_j|`` per record and its standard error, both ``[R]``.

    Unbiased; coordinates are processed in chunks of ``MC_CHUNK`` so the sample buffer is
    ``[S, MC_CHUNK]`` whatever ``d``.

    ``gaussian_s2 [R]`` adds, per record, the sum over further coordinates whose cells are
    fine (or absent: unquantized weights, ``m_j = U_j``): their contribution is Gaussian
    with variance ``sum_j w_j^2 kappa_j`` and independent of the sampled cells, so it is
    drawn directly instead of through cells (exact in the unquantized limit).
    """
    R, d = w.shape
    proj = torch.zeros(R, num_samples, dtype=torch.float64, device=w.device)
    if gaussian_s2 is not None:
        xi = torch.randn(R, num_samples, dtype=torch.float64, device=w.device, generator=generator)
        proj += gaussian_s2.to(torch.float64).clamp_min(0.0).sqrt().unsqueeze(-1) * xi
    w64 = w.to(torch.float64)
    for a in range(0, d, MC_CHUNK):
        sub = CellStatistics(
            prob=stats.prob[a : a + MC_CHUNK],
            mean=stats.mean[a : a + MC_CHUNK],
            kappa=stats.kappa[a : a + MC_CHUNK],
            lam=stats.lam[a : a + MC_CHUNK],
            m4=stats.m4[a : a + MC_CHUNK],
            coverage=stats.coverage[a : a + MC_CHUNK],
        )
        m = sample_cell_means(sub, num_samples, generator)  # [S, c]
        proj += w64[:, a : a + MC_CHUNK] @ m.T
    absval = proj.abs()
    return absval.mean(-1), absval.std(-1) / math.sqrt(num_samples)


def _check_w(w: Tensor) -> None:
    check_shape("w", w, 2, "[R, d] (R records, d coordinates)")
    check_finite("w", w)


def choose_method(w: Tensor, stats: CellStatistics | CellMoments) -> str:
    """The method ``"auto"`` resolves to for these inputs (see the module docstring)."""
    if w.shape[1] == 1 and isinstance(stats, CellStatistics):
        return "exact1d"
    sums = clt_sums(w, stats.kappa, stats.m4)
    if not isinstance(stats, CellStatistics):
        return "clt"
    if not w.shape[0]:
        return "clt"
    err = sums.excess_kurtosis().abs().max().item() / 24.0
    n_eff = effective_terms(w, stats.kappa).min().item()
    return "clt" if err <= CLT_TOLERANCE and n_eff >= CLT_MIN_TERMS else "mc"


def effective_terms(w: Tensor, kappa: Tensor) -> Tensor:
    """``[R]`` effective number of coordinates in ``sum_j w_j m_j``: ``(sum c_j)^2 / sum c_j^2``
    with ``c_j = w_j^2 kappa_j`` (``d`` when all contribute equally, 1 when one dominates;
    ``inf`` for a record with no leakage)."""
    c = w.to(torch.float64).square() * kappa.to(torch.float64)
    num, den = c.sum(-1).square(), c.square().sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.inf))


def record_leakage(
    w: Tensor,
    stats: CellStatistics | CellMoments,
    n: float,
    method: Method = "auto",
    num_samples: int = DEFAULT_NUM_SAMPLES,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Saturated per-record total variation ``G(TV_z)`` of the quantized release.

    Args:
        w: ``[R, d]`` standardised influences ``w_j(z) = psi_j(z) / sqrt(Sigma_jj)`` of R
            records (dimensionless).
        stats: cell statistics of the ``d`` coordinates (:func:`cell_statistics`); the
            Gaussian form also accepts :class:`CellMoments`.
        n: number of training records (>= 2).
        method: ``"exact1d"`` (d = 1 only), ``"mc"``, ``"clt"`` or ``"auto"``.
        num_samples: Monte Carlo draws (standard error ~ 1/sqrt(num_samples) relative).
        generator: random generator for the Monte Carlo draws.

    Returns:
        ``[R]`` float64 leakage in ``[0, 1)``.
    """
    _check_w(w)
    check_n(n)
    d = w.shape[1]
    if stats.kappa.shape[0] != d:
        raise ValueError(f"w has d = {d} coordinates but stats has {stats.kappa.shape[0]}")
    if method == "auto":
        method = choose_method(w, stats)  # type: ignore[assignment]
    scale = 1.0 / (2.0 * math.sqrt(n))
    if method == "exact1d":
        if d != 1:
            raise ValueError(f"method='exact1d' needs d = 1 coordinate, got d = {d}")
        t = w[:, 0].to(torch.float64).abs() * stats.lam.to(torch.float64)[0] * scale
        return saturate(t)
    if method == "clt":
        return clt_sums(w, stats.kappa).leakage(n)
    if method == "mc":
        if not isinstance(stats, CellStatistics):
            raise TypeError("method='mc' needs CellStatistics (per-cell prob and mean), got CellMoments")
        mean_abs, _ = mc_first_order(w, stats, num_samples, generator)
        # E|sum w m| <= E|sum w U| = sqrt(2/pi) |w| (conditional Jensen): cap the noise.
        cap = SQRT_2_OVER_PI * w.to(torch.float64).norm(dim=-1)
        return saturate(torch.minimum(mean_abs, cap) * scale)
    raise ValueError(f"unknown method {method!r}; expected 'auto', 'exact1d', 'mc' or 'clt'")
