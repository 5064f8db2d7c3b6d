"""Per-record leakage, its saturation, and MIS (method.md section 3).

For a record ``z`` with standardised influences ``w_j(z)`` (argument ``influence``,
``[R, d]``; ``w_j = psi_j / sqrt(Sigma_jj)`` with ``Sigma`` the ``[d, d]`` sandwich covariance of
the per-record influence ``psi``, so that ``sigma_j = sqrt(Sigma_jj / n)`` is the standard
deviation of ``theta-hat_j``) the first-order total variation between the release's law given
``z`` and its marginal law is

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

Scoring a whole model (:func:`resolve_method`, :class:`HybridMC`, :func:`exact1d_leakage`)
adds two things: the Monte Carlo form is used only when its cost (records x coarse
coordinates x draws) fits ``MC_FLOP_BUDGET``, and it samples cells only for *coarse*
coordinates (``kappa < FINE_KAPPA``); fine and unquantized coordinates enter as one Gaussian
term per record (exact in the unquantized limit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._checks import check_finite, check_n, check_shape, renamed_kwargs
from .cells import SQRT_2_OVER_PI, CellMoments, CellStatistics, cell_statistics

Method = Literal["auto", "exact1d", "mc", "clt"]
# Relative error of the Gaussian form below which "auto" uses it (Edgeworth estimate).
CLT_TOLERANCE = 0.01
# Fewest effective terms ``n_eff = (sum_j w_j^2 kappa_j)^2 / sum_j (w_j^2 kappa_j)^2`` for
# which "auto" trusts the Edgeworth estimate (see the module docstring).
CLT_MIN_TERMS = 10.0
DEFAULT_MC_DRAWS = 4096
DEFAULT_NUM_SAMPLES = DEFAULT_MC_DRAWS  # former name
# Coordinates per chunk in the Monte Carlo path: bounds the [S, chunk] sample buffer.
MC_CHUNK = 4096
# A coordinate whose kappa is below this counts as frozen (its code cannot move).
FROZEN_KAPPA = 1e-6
# kappa of a uniform grid of step 0.5 sd: coordinates at or above it are scored as Gaussian
# in the hybrid Monte Carlo form (their cells are fine).
FINE_KAPPA = 1.0 - 0.25 / 12.0 + 0.0625 / 144.0
# Monte Carlo form: records x coarse coordinates x draws it may cost (~a few seconds), and
# the range of draws; "auto" falls back to the Gaussian form (with a note) beyond it.
MC_FLOP_BUDGET = 500_000_000
MIN_MC_DRAWS, MAX_MC_DRAWS = 1024, 32768
MC_BUFFER = 1 << 24  # elements of one [records, draws] buffer (64 MiB in MC_DTYPE float32)
# dtype of the Monte Carlo forms' draws and per-draw projections (here and in correlated.py).
# Its rounding (relative 6e-8 per value, sums of at most d terms) is far below the draws' own
# error (1/sqrt(draws) >= 5e-3 relative per record); every mean and moment is accumulated in
# float64. float32 halves the memory traffic and makes the normal draws 4x cheaper
# (docs/benchmarks.md, "Monte Carlo forms in float32").
MC_DTYPE = torch.float32
# Edges each side of a coarse coordinate's cell given to the hybrid Monte Carlo form.
MC_HALF_WINDOW = 18
# Standard deviations each side of theta-hat the window must span before its two outer cells
# may lump the remaining codes: a fine grid whose kappa is lowered by clipping alone (a
# per-row absmax range within a few sd; 36 cells of int8 span ~0.3 sd of such a weight)
# would otherwise be read as two huge outer cells, losing the information the fine cells keep.
MC_WINDOW_REACH = 6.0


def saturate(t: Tensor) -> Tensor:
    """``G(t) = 2 Phi(sqrt(pi/2) t) - 1``: exact for an unquantized Gaussian release, ~t for small t."""
    return torch.special.erf(math.sqrt(math.pi) * t / 2.0)


def spread_tv(delta: Tensor, h: Tensor) -> Tensor:
    """Total variation between ``N(delta, 1 - h)`` (a member) and ``N(0, 1)`` (a non-member):
    the whitened release along a record's own direction when the member both shifts the mean
    and narrows the spread (method.md section 4, "Spread term").

    The log density ratio is ``-(h x^2 - 2 delta x + c) / (2 (1 - h))`` with
    ``c = delta^2 + (1 - h) log(1 - h)``: the member's density is the larger between the two
    roots ``x_s = c / q`` and ``x_b = q / h``, ``q = delta + sqrt(1 - h) sqrt(delta^2 - h log(1 - h))``
    (the stable quadratic formula: no cancellation as ``h -> 0``, where ``x_s -> delta / 2`` and
    ``x_b -> inf``), so ``TV = P_1(x_s, x_b) - P_0(x_s, x_b)``, written with lower and upper
    tails so that neither difference is of two numbers near 1.

    Args:
        delta: ``[...]`` shift in sd units (``>= 0``; the sign does not matter by symmetry).
        h: ``[...]`` (broadcast) fraction of the variance the member removes along the shift,
            in ``[0, 1)``; ``h = 0`` gives ``2 Phi(delta / 2) - 1`` (the pure mean shift).

    Returns:
        ``[...]`` float64 total variation in ``[0, 1]``.
    """
    d = delta.to(torch.float64).abs()
    h = torch.as_tensor(h, dtype=torch.float64).clamp(0.0, 1.0 - 1e-12)
    d, h = torch.broadcast_tensors(d, h)
    pos = h > 0
    hh = torch.where(pos, h, torch.ones_like(h))  # placeholder where h = 0 (no division by 0)
    s2 = 1.0 - hh
    s = s2.sqrt()
    lg = -torch.log1p(-hh)  # -log(1 - h) > 0
    q = d + s * (d * d + hh * lg).sqrt()
    x_s = (d * d - s2 * lg) / q
    x_b = q / hh
    lower = _phi_cdf(x_s) - _phi_cdf((x_s - d) / s)  # P_0 - P_1 below x_s (>= 0)
    upper = _phi_sf(x_b) - _phi_sf((x_b - d) / s)  # P_0 - P_1 above x_b (>= 0)
    spread = (lower + upper).clamp(0.0, 1.0)
    shift = torch.special.erf(d / (2.0 * math.sqrt(2.0)))  # 2 Phi(delta / 2) - 1
    return torch.where(pos, spread, shift)


def _phi_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def _phi_sf(x: Tensor) -> Tensor:
    return 0.5 * torch.special.erfc(x / math.sqrt(2.0))


def saturate_spread(t: Tensor, h: Tensor | None) -> Tensor:
    """:func:`saturate` with the spread term (method.md section 4, "Spread term"): ``[R]``
    first-order values ``t`` (``t = E|S| / (2 sqrt n)``, the Gaussian-equivalent shift
    ``delta = sqrt(2 pi) t``) and ``h [R]`` the variance fraction the member removes along its
    direction (the per-direction leverage, times ``rho`` for a quantized release) ->
    ``TV(N(delta, 1 - h), N(0, 1))`` (:func:`spread_tv`). ``h = None`` or ``h = 0`` for a record
    gives :func:`saturate` exactly (the first-order form is the ``h = 0`` limit).
    """
    g = saturate(t)
    if h is None:
        return g
    h = h.to(torch.float64)
    t = t.to(torch.float64)
    use = (h > 0) & torch.isfinite(t)  # t = inf (leakage 1): nothing to add, and no inf - inf
    tt = torch.where(use, t, torch.zeros_like(t))
    return torch.where(use, spread_tv(math.sqrt(2.0 * math.pi) * tt, h), g)


def with_spread(leakage: Tensor, unquantized: Tensor, h: Tensor | None) -> Tensor:
    """Per-record leakage ``[R]`` of a release given by a first-order form (saturated by
    :func:`saturate`), with the spread term of the Gaussian-equivalent channel (method.md
    section 4, "Spread term").

    Along a record's whitened direction an independent Gaussian channel keeps the fraction
    ``rho = s2_q / s2_u`` of the shift's information and of the member's narrowing ``h``, so
    the member law of the channel's output is ``N(delta_q, 1 - h rho)`` against ``N(0, 1)``
    (exact for the Gaussian forms). A cell form is read as the Gaussian channel with the same
    first-order value ``t_q`` (``rho = (t_q / t_u)^2``): an approximation of how much of the
    narrowing the cells keep (measured in docs/method.md).

    Args:
        leakage: ``[R]`` the release's saturated first-order leakage ``G(t_q)``.
        unquantized: ``[R]`` the unquantized first-order values ``t_u`` (before saturation).
        h: ``[R]`` per-direction leverages of the records, or ``None`` (no term: ``leakage``).

    Returns:
        ``[R]`` float64 leakage; ``leakage`` itself where ``h`` is ``None`` or 0.
    """
    if h is None:
        return leakage
    t_q = unsaturate(leakage.to(torch.float64))
    t_u = unquantized.to(torch.float64)
    rho = torch.where(t_u > 0, (t_q / t_u.clamp_min(1e-300)).square(), torch.zeros_like(t_u)).clamp(0.0, 1.0)
    return torch.where(h > 0, saturate_spread(t_q, h.to(torch.float64) * rho), leakage.to(torch.float64))


def unsaturate(leakage: Tensor) -> Tensor:
    """``G^-1``, the inverse of :func:`saturate`: ``[...]`` leakage in ``[0, 1)`` -> ``t >= 0``
    (``inf`` at 1)."""
    return torch.special.erfinv(leakage.clamp(0.0, 1.0)) * (2.0 / math.sqrt(math.pi))


def carry_interval(lo: float, hi: float, reference: float, target: float) -> tuple[float, float]:
    """An interval ``[lo, hi]`` around the leakage ``reference`` carried over to ``target`` (the
    same release's value under another form, e.g. the correlated headline against the
    independent-coordinate form): each end is scaled by ``target / reference`` in the
    unsaturated domain ``t = G^-1(leakage)`` (:func:`saturate`), so the result stays in
    ``[0, 1)`` and is the plain ratio ``lo * target / reference`` for small leakages; it
    always contains ``target``. Dimensionless; docs/method.md section 3 ("Correlated
    coordinates")."""
    if not (reference > 0.0):
        return min(lo, target), max(hi, target)
    t = unsaturate(torch.tensor([lo, hi, reference, target], dtype=torch.float64))
    ratio = float(t[3] / t[2]) if torch.isfinite(t[2]) else 1.0
    ends = saturate(t[:2] * ratio)
    return min(float(ends[0]), target), max(float(ends[1]), target)


def correction_allowance(first: Tensor, corrected: Tensor, h: Tensor, mean_leverage: float) -> float:
    """What the finite-sample (leverage) correction leaves unknown in a figure: the correction's
    own size times the mean leverage (method.md section 3, "The uncertainty interval",
    *The correction's remainder*).

    The correction is exact to first order in the leverage (method.md section 4, "Finite-sample
    (leverage) correction"); what it leaves is of the next order, its own size times the
    expansion's parameter, the mean leverage ``h_bar = d_eff / n``. Its size per record is read
    as the corrected figure against the first-order one with the shift's standardised length
    ``t`` taken back by ``sqrt(1 - h_i)`` (``h_i`` the narrowing along the record's own
    direction: one output, ``c~ = c / (1 - h)`` over ``V_HC2 ~ V / (1 - h)``; the diagonal
    estimator's ``1 / sqrt(1 - h_bar)`` exactly) and without the spread term.

    Args:
        first: ``[R]`` the corrected first-order leakage (saturated, :func:`saturate`).
        corrected: ``[R]`` the same with the spread term (:func:`with_spread`).
        h: ``[R]`` the per-direction leverages the spread term took.
        mean_leverage: ``h_bar``, the records' mean leverage (capped at 1 here; NaN: 1).

    Returns:
        The allowance in leakage units (``>= 0``; 0 where ``h_bar <= 0``).

    Raises:
        ValueError: ``first`` is not one-dimensional.
    """
    check_shape("first", first, 1, "[R]")
    # a mean leverage that could not be read (NaN) takes the cap: the widest allowance, not none
    rho = 1.0 if math.isnan(float(mean_leverage)) else min(max(float(mean_leverage), 0.0), 1.0)
    if rho == 0.0 or first.numel() == 0:
        return 0.0
    t = unsaturate(first.to(torch.float64))
    h = h.to(torch.float64)
    uncorrected = saturate(t * (1.0 - h.clamp(max=1.0)).sqrt())
    # a saturated record (t infinite) or one without a finite leverage (no spread term there either: with_spread)
    # adds nothing; a NaN leverage made the mean, so the allowance, NaN, and widen_interval then left the interval
    # as it was (docs/benchmarks.md "rv59c")
    read = torch.isfinite(t) & torch.isfinite(h)
    size = (corrected.to(torch.float64) - torch.where(read, uncorrected, corrected.to(torch.float64))).mean()
    return rho * abs(float(size))


def widen_interval(lo: float, hi: float, value: float, allowance: float) -> tuple[float, float]:
    """``[lo, hi]`` around ``value`` with ``allowance`` added to each end's distance in
    quadrature (an independent error: ``value -+ sqrt(distance^2 + allowance^2)``), clamped to
    ``[0, 1]``; ``allowance <= 0`` returns the ends as given. Leakage units."""
    if not (allowance > 0.0):
        return lo, hi
    return (max(value - math.hypot(value - lo, allowance), 0.0),
            min(value + math.hypot(hi - value, allowance), 1.0))


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

    With ``bound=True``, ``s4`` and ``s22`` are per-record upper bounds of ``|s4|`` and
    ``s22`` instead of the sums (``3 sum_j w_rj^4`` and ``sum_j w_rj^4``, from
    ``0 <= kappa_j <= 1`` and ``kappa_j^2 <= m4_j <= 3``: method.md section 3, "Gaussian
    form's diagnostics"); :meth:`excess_kurtosis` and :meth:`effective_terms` are then an
    upper and a lower bound. ``s2`` is always the sum.
    """

    s2: Tensor
    s4: Tensor
    #: ``sum_j (w_rj^2 kappa_j)^2`` (for :meth:`effective_terms`); ``None`` = not tracked.
    s22: Tensor | None = None
    #: whether ``s4`` / ``s22`` are upper bounds of ``|s4|`` / ``s22`` (see above).
    bound: bool = False

    @classmethod
    def zeros(cls, num_records: int, device: torch.device | str | None = None) -> CltSums:
        z = torch.zeros(num_records, dtype=torch.float64, device=device)
        return cls(z, z.clone(), z.clone())

    @renamed_kwargs(w="influence")
    def add_(self, influence: Tensor, kappa: Tensor, m4: Tensor | None = None) -> CltSums:
        """Accumulate a coordinate chunk: ``influence [R, c]`` (standardised, formerly ``w``),
        ``kappa [c]``, ``m4 [c]`` (optional)."""
        w2 = influence.to(torch.float64).square()
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
        if self.bound or other.bound:  # a bound of |s4| plus a signed sum: bound the sum's size
            return CltSums(self.s2 + other.s2, self.s4.abs() + other.s4.abs(), s22, bound=True)
        return CltSums(self.s2 + other.s2, self.s4 + other.s4, s22)

    def effective_terms(self) -> Tensor:
        """``[R]`` effective number of contributing coordinates ``s2^2 / s22`` (``inf`` where a
        record has no leakage or ``s22`` is not tracked; with ``bound``, a lower bound); see
        :func:`effective_terms`."""
        if self.s22 is None:
            return torch.full_like(self.s2, math.inf)
        return torch.where(self.s22 > 0, self.s2.square() / self.s22.clamp_min(1e-300),
                           torch.full_like(self.s2, math.inf))

    def excess_kurtosis(self) -> Tensor:
        """``[R]`` excess kurtosis of ``sum_j w_j m_j`` (0 where the record has no leakage; with
        ``bound``, an upper bound of its absolute value)."""
        den = self.s2.square()
        return torch.where(den > 0, self.s4 / den.clamp_min(1e-300), torch.zeros_like(den))

    def leakage(self, n: float) -> Tensor:
        """``[R]`` saturated leakage ``G(sqrt(2/pi) sqrt(s2) / (2 sqrt(n)))``."""
        check_n(n)
        return saturate(SQRT_2_OVER_PI * self.s2.clamp_min(0.0).sqrt() / (2.0 * math.sqrt(n)))


@renamed_kwargs(w="influence")
def clt_sums(influence: Tensor, kappa: Tensor, m4: Tensor | None = None) -> CltSums:
    """Gaussian-form sums for ``influence [R, d]`` and ``kappa [d]`` (see :class:`CltSums`)."""
    return CltSums.zeros(influence.shape[0], device=influence.device).add_(influence, kappa, m4)


def leakage_from_sums(s2: Tensor, n: float) -> Tensor:
    """``[R]`` saturated leakage from streamed ``s2 = sum_j w_j^2 kappa_j`` (Gaussian form)."""
    return CltSums(s2, torch.zeros_like(s2)).leakage(n)


@renamed_kwargs(w="influence")
def baseline_leakage(influence: Tensor, n: float) -> Tensor:
    """``[R]`` leakage of the unquantized release (``kappa = 1``): ``2 Phi(|w| / (2 sqrt n)) - 1``
    for ``influence [R, d]`` (``w``).

    Raises:
        ValueError: ``influence`` is not ``[R, d]`` or holds NaN/inf; ``n < 2``.
    """
    _check_influence(influence)
    check_n(n)
    return leakage_from_sums(influence.to(torch.float64).square().sum(-1), n)


@renamed_kwargs(num_samples="mc_draws")
def sample_cell_means(
    stats: CellStatistics, mc_draws: int, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``m [S, d]`` (``S = mc_draws``): each coordinate's cell independently by its
    probabilities.

    Inverse-CDF sampling on the cell probabilities (renormalised by ``coverage``).
    """
    prob = stats.prob
    cdf = prob.cumsum(-1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-300)
    u = torch.rand(prob.shape[0], mc_draws, dtype=prob.dtype, device=prob.device, generator=generator)
    k = torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp_(max=prob.shape[1] - 1)
    # a coordinate with no mass in its cells (sigma = 0 on a zero-width cell) carries nothing:
    # its draws are 0, not the undefined mean of an empty cell
    live = prob.sum(-1, keepdim=True) > 0
    return torch.gather(torch.where(live, stats.mean, 0.0), 1, k).T


@renamed_kwargs(w="influence", num_samples="mc_draws")
def mc_first_order(
    influence: Tensor,
    stats: CellStatistics,
    mc_draws: int = DEFAULT_MC_DRAWS,
    generator: torch.Generator | None = None,
    gaussian_s2: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo ``E |sum_j w_j m_j|`` per record and its standard error, both ``[R]``,
    for ``influence [R, d]`` (``w``) and ``mc_draws`` draws (formerly ``num_samples``).

    Unbiased; coordinates are processed in chunks of ``MC_CHUNK`` so the sample buffer is
    ``[S, MC_CHUNK]`` whatever ``d``.

    ``gaussian_s2 [R]`` adds, per record, the sum over further coordinates whose cells are
    fine (or absent: unquantized weights, ``m_j = U_j``): their contribution is Gaussian
    with variance ``sum_j w_j^2 kappa_j`` and independent of the sampled cells, so it is
    drawn directly instead of through cells (exact in the unquantized limit).
    """
    R, d = influence.shape
    # Draws and projections in MC_DTYPE (float32; see functional/correlated.py), mean and
    # spread accumulated in float64.
    dt = MC_DTYPE
    proj = torch.zeros(R, mc_draws, dtype=dt, device=influence.device)
    if gaussian_s2 is not None:
        xi = torch.randn(R, mc_draws, dtype=dt, device=influence.device, generator=generator)
        proj.addcmul_(gaussian_s2.to(torch.float64).clamp_min(0.0).sqrt().to(dt).unsqueeze(-1), xi)
    w_dt = influence.to(dt)
    for a in range(0, d, MC_CHUNK):
        m = sample_cell_means(stats.select(a, a + MC_CHUNK), mc_draws, generator)  # [S, c]
        proj += w_dt[:, a : a + MC_CHUNK] @ m.T.to(dt)
    absval = proj.abs_()
    # sums in MC_DTYPE (cascade summation, relative error ~1e-7), moments in float64
    mean = absval.sum(-1).to(torch.float64) / mc_draws
    var = (absval.square().sum(-1).to(torch.float64) / mc_draws - mean.square()).clamp_min(0.0)
    return mean, (var * mc_draws / max(mc_draws - 1, 1)).sqrt() / math.sqrt(mc_draws)


def _check_influence(influence: Tensor) -> None:
    check_shape("influence", influence, 2, "[R, d] (R records, d coordinates)")
    check_finite("influence", influence)


@renamed_kwargs(w="influence")
def choose_method(influence: Tensor, stats: CellStatistics | CellMoments) -> str:
    """The method ``"auto"`` resolves to for ``influence [R, d]`` and these cell statistics
    (see the module docstring): ``"exact1d"``, ``"clt"`` or ``"mc"``."""
    w = influence
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


@renamed_kwargs(w="influence")
def effective_terms(influence: Tensor, kappa: Tensor) -> Tensor:
    """``[R]`` effective number of coordinates in ``sum_j w_j m_j`` for ``influence [R, d]``
    (``w``) and ``kappa [d]``: ``(sum c_j)^2 / sum c_j^2``
    with ``c_j = w_j^2 kappa_j`` (``d`` when all contribute equally, 1 when one dominates;
    ``inf`` for a record with no leakage)."""
    c = influence.to(torch.float64).square() * kappa.to(torch.float64)
    num, den = c.sum(-1).square(), c.square().sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.inf))


@renamed_kwargs(w="influence", num_samples="mc_draws")
def record_leakage(
    influence: Tensor,
    stats: CellStatistics | CellMoments,
    n: float,
    method: Method = "auto",
    mc_draws: int = DEFAULT_MC_DRAWS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Saturated per-record total variation ``G(TV_z)`` of the quantized release.

    Args:
        influence: ``[R, d]`` standardised influences ``w_j(z) = psi_j(z) / sqrt(Sigma_jj)`` of
            R records (dimensionless; formerly ``w``).
        stats: cell statistics of the ``d`` coordinates (:func:`cell_statistics`); the
            Gaussian form also accepts :class:`CellMoments`.
        n: number of training records (>= 2).
        method: ``"exact1d"`` (d = 1 only), ``"mc"``, ``"clt"`` or ``"auto"``.
        mc_draws: Monte Carlo draws (standard error ~ 1/sqrt(mc_draws) relative; formerly
            ``num_samples``).
        generator: random generator for the Monte Carlo draws.

    Returns:
        ``[R]`` float64 leakage in ``[0, 1)``.

    Raises:
        ValueError: ``influence`` is not ``[R, d]`` or holds NaN/inf, ``n < 2``, ``stats`` has
            another ``d``, ``"exact1d"`` with ``d != 1``, or an unknown ``method``.
        TypeError: ``method="mc"`` with :class:`CellMoments` (no per-cell terms).
    """
    w = influence
    _check_influence(w)
    check_n(n)
    d = w.shape[1]
    if stats.kappa.shape[0] != d:
        raise ValueError(f"influence has d = {d} coordinates but stats has {stats.kappa.shape[0]}")
    if method == "auto":
        method = choose_method(w, stats)  # type: ignore[assignment]
    if method == "exact1d":
        if d != 1:
            raise ValueError(f"method='exact1d' needs d = 1 coordinate, got d = {d}")
        return exact1d_leakage(w[:, 0], stats.mean_abs, n)
    if method == "clt":
        return clt_sums(w, stats.kappa).leakage(n)
    if method == "mc":
        if not isinstance(stats, CellStatistics):
            raise TypeError("method='mc' needs CellStatistics (per-cell prob and mean), got CellMoments")
        mean_abs, _ = mc_first_order(w, stats, mc_draws, generator)
        return _capped_leakage(mean_abs, w.to(torch.float64).square().sum(-1), n)
    raise ValueError(f"unknown method {method!r}; expected 'auto', 'exact1d', 'mc' or 'clt'")


def _capped_leakage(mean_abs: Tensor, s2_unquantized: Tensor, n: float) -> Tensor:
    """``G(min(E|S|, sqrt(2/pi) sqrt(s2)) / (2 sqrt n))``: by conditional Jensen
    ``E|sum w m| <= E|sum w U| = sqrt(2/pi) |w|``, which caps the Monte Carlo noise."""
    cap = SQRT_2_OVER_PI * s2_unquantized.sqrt()
    return saturate(torch.minimum(mean_abs, cap) / (2 * math.sqrt(n)))


def exact1d_leakage(influence: Tensor, mean_abs: Tensor, n: float) -> Tensor:
    """One coordinate: ``G(|w| E|m| / (2 sqrt n))`` (method.md section 3, form 1).

    Args:
        influence: ``[R]`` standardised influences of the one coordinate.
        mean_abs: ``[1]`` (or 0-d) ``E|m|`` of that coordinate (``sqrt(2/pi)`` unquantized).
        n: number of training records (>= 2).

    Returns:
        ``[R]`` float64 leakage.
    """
    m = mean_abs.to(torch.float64).reshape(-1)[0]
    return saturate(influence.to(torch.float64).abs() * m / (2 * math.sqrt(n)))


def coarse_mask(kappa: Tensor) -> Tensor:
    """``[d]`` bool: coordinates whose cells are coarse (``1e-12 < kappa < FINE_KAPPA``), the
    ones the hybrid Monte Carlo form samples."""
    return (kappa > 1e-12) & (kappa < FINE_KAPPA)


def window_too_narrow(edges: Tensor, theta: Tensor, sigma: Tensor) -> Tensor:
    """``[c]`` bool: the coordinates whose cell window (``edges [c, 2 * MC_HALF_WINDOW + 2]``,
    outer cells ``(-inf, edges[:, 1])`` and ``(edges[:, -2], inf)``) lumps real codes within
    :data:`MC_WINDOW_REACH` standard deviations of ``theta`` (an outer edge that is finite
    there). Their cells are fine where the window shows them; the Monte Carlo forms score them
    through the Gaussian channel (their exact ``kappa``) instead of sampling the lumped cells."""
    th, sg = theta.to(torch.float64), sigma.to(torch.float64).clamp_min(1e-300)
    left, right = edges[:, 1].to(torch.float64), edges[:, -2].to(torch.float64)
    return (torch.isfinite(left) & ((th - left) / sg < MC_WINDOW_REACH)) | \
        (torch.isfinite(right) & ((right - th) / sg < MC_WINDOW_REACH))


def coarse_chunks(index: Tensor, theta: Tensor, sigma: Tensor, boundaries: Callable[[int, int], Tensor],
                  chunk: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Per chunk of the coarse coordinates ``index [c]`` of one parameter: ``(kept [k], edges
    [k, 2 * MC_HALF_WINDOW + 2], narrow [c - k])``, the coordinates whose cells the Monte
    Carlo forms sample with their edges (``boundaries(lo, hi)`` of the elements ``lo:hi``),
    and those whose window is too narrow (:func:`window_too_narrow`: the Gaussian channel)."""
    for a in range(0, index.numel(), chunk):
        ii = index[a : a + chunk]
        lo, hi = int(ii.min()), int(ii.max()) + 1
        edges = boundaries(lo, hi)[ii - lo]
        narrow = window_too_narrow(edges, theta[ii], sigma[ii])
        yield ii[~narrow], edges[~narrow], ii[narrow]


def coarse_count(kappas: Iterable[Tensor | None]) -> int:
    """Number of coarse coordinates over several ``[d_i]`` kappa tensors (``None``: unquantized)."""
    return sum(int(coarse_mask(k).sum()) for k in kappas if k is not None)


def clt_out_of_tolerance(clt_error: float, n_eff: float) -> bool:
    """Whether the Gaussian form's conditions fail: Edgeworth error above ``CLT_TOLERANCE`` or
    fewer than ``CLT_MIN_TERMS`` effective coordinates (see the module docstring)."""
    return not (clt_error <= CLT_TOLERANCE and n_eff >= CLT_MIN_TERMS)  # NaN counts as failing


def resolve_method(
    method: str,
    *,
    d: int,
    quantized: bool,
    clt_error: float,
    n_eff: float,
    influence_stored: bool,
    num_records: int,
    coarse: int,
) -> str:
    """The form a whole-model score uses (``"auto"`` resolved; other methods pass through).

    ``"exact1d"`` for one quantized weight; else ``"clt"`` when its conditions hold
    (:func:`clt_out_of_tolerance`); else ``"mc"`` when the influences are stored and
    ``num_records * max(coarse, 1) * MIN_MC_DRAWS <= MC_FLOP_BUDGET``; else ``"clt"`` (the
    caller notes that it is used beyond its tolerance).

    Args:
        method: ``"auto"``, ``"exact1d"``, ``"mc"`` or ``"clt"``.
        d: assessed weights; ``quantized``: whether any of them is quantized.
        clt_error: worst ``|excess kurtosis| / 24`` over records; ``n_eff``: least effective
            number of coordinates over records.
        influence_stored: whether the ``[R, d]`` influences are held (the Monte Carlo form needs them).
        num_records: ``R``; ``coarse``: coarse coordinates (:func:`coarse_count`).
    """
    if method != "auto":
        return method
    if d == 1 and quantized:
        return "exact1d"
    if not clt_out_of_tolerance(clt_error, n_eff):
        return "clt"
    if influence_stored and num_records * max(coarse, 1) * MIN_MC_DRAWS <= MC_FLOP_BUDGET:
        return "mc"
    return "clt"


def mc_draws_for(num_records: int, coarse: int) -> int:
    """As many Monte Carlo draws as ``MC_FLOP_BUDGET`` and ``MC_BUFFER`` allow for ``num_records``
    records and ``coarse`` coarse coordinates, within ``[MIN_MC_DRAWS, MAX_MC_DRAWS]``
    (standard error ~ 1/sqrt(draws))."""
    coarse = max(coarse, 1)
    by_cost = MC_FLOP_BUDGET // (num_records * (coarse + 1))
    by_memory = MC_BUFFER // max(num_records, 1)  # the [R, S] projection buffers
    return int(min(MAX_MC_DRAWS, max(MIN_MC_DRAWS, min(by_cost, by_memory))))


class HybridMC:
    """The hybrid Monte Carlo form of a whole model as an update/compute pair: sampled cells
    for coarse coordinates, one Gaussian term per record for fine and unquantized ones.

    ``update`` takes one parameter at a time; ``compute`` returns the ``[R]`` leakage.
    """

    def __init__(self, num_records: int) -> None:
        self.gaussian_s2 = torch.zeros(num_records, dtype=torch.float64)
        self._influence: list[Tensor] = []
        self._theta: list[Tensor] = []
        self._sigma: list[Tensor] = []
        self._edges: list[Tensor] = []

    def update(
        self,
        influence: Tensor,
        kappa: Tensor | None,
        theta: Tensor | None = None,
        sigma: Tensor | None = None,
        boundaries: Callable[[int, int], Tensor] | None = None,
        chunk: int = 1 << 18,
    ) -> None:
        """Add one parameter.

        Args:
            influence: ``[R, c]`` its standardised influences.
            kappa: ``[c]`` its kappa, or ``None`` when it is not quantized (all Gaussian).
            theta, sigma: ``[c]`` its weights and standard deviations (parameter units).
            boundaries: ``boundaries(lo, hi) -> [hi - lo, 2 * MC_HALF_WINDOW + 2]`` cell edges of
                the coordinates ``lo:hi`` (needed when some coordinate is coarse).
            chunk: coordinates per call of ``boundaries``.
        """
        w = influence
        if kappa is None:
            self.gaussian_s2 += w.square().sum(-1)
            return
        coarse = coarse_mask(kappa)
        fine = kappa >= FINE_KAPPA
        self.gaussian_s2 += w[:, fine].square() @ kappa[fine]
        idx = torch.nonzero(coarse).squeeze(-1)
        if idx.numel() == 0:
            return
        assert theta is not None and sigma is not None and boundaries is not None
        for ii, edges, narrow in coarse_chunks(idx, theta, sigma, boundaries, chunk):
            # fine cells, clipped: the Gaussian channel
            self.gaussian_s2 += w[:, narrow].to(torch.float64).square() @ kappa[narrow].to(torch.float64)
            if ii.numel() == 0:
                continue
            self._edges.append(edges)
            self._theta.append(theta[ii])
            self._sigma.append(sigma[ii])
            self._influence.append(w[:, ii])

    def compute(self, n: float, mc_draws: int, generator: torch.Generator | None = None) -> Tensor:
        """``[R]`` saturated leakage, capped by the unquantized value (see :func:`record_leakage`)."""
        if not self._influence:
            mean_abs = SQRT_2_OVER_PI * self.gaussian_s2.sqrt()
            return saturate(mean_abs / (2 * math.sqrt(n)))
        stats = cell_statistics(torch.cat(self._theta), torch.cat(self._sigma), torch.cat(self._edges),
                                validate=False)
        wc = torch.cat(self._influence, dim=1)
        mean_abs, _ = mc_first_order(wc, stats, mc_draws, generator, gaussian_s2=self.gaussian_s2)
        return _capped_leakage(mean_abs, wc.square().sum(-1) + self.gaussian_s2, n)
