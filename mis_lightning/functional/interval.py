"""The uncertainty interval of the leakage (method.md section 3, "The uncertainty interval").

The plug-in reads each weight's cells around the TRAINED value ``theta_hat_j``; the truth
reads them around the unknown population value ``theta*_j``, known only to about
``sigma_j``. On a grid whose step is a few ``sigma`` the cell statistics change a lot within
one ``sigma`` (``kappa`` is smallest with ``theta*`` mid-cell, largest on a boundary), so
the plug-in's error is dominated by where ``theta*`` sits. Two regimes:

* **position-dominated** (few coordinates carry the position uncertainty): the interval is
  the range of the first-order leakage over population values in a confidence box
  ``theta_hat_j +- z sigma_j`` (``z`` such that the box holds ``theta*`` with probability
  ``b = (1 + level) / 2`` over the ``k`` coordinates that matter:
  ``z = Phi^-1((1 + b^(1/k)) / 2)``; the margin above ``level`` is for the plug-in's other
  errors, which at an extreme position add to the box's misses).
  The leakage is increasing in each coordinate's ``kappa`` (Gaussian form; ``lam`` for one
  coordinate), so its range over the box is reached with every coordinate at its own
  extreme: a per-coordinate search. The in-sample leave-one-out correlated form is not
  monotone (its common divisor moves with the ``kappa``s, not monotonically): its ends pair each
  corner's form with the divisor's extreme over the box (:func:`correlated_ends`).
* **averaged** (many coordinates): independent position errors average; the parametric
  bootstrap's spread (cell statistics re-evaluated around ``theta_hat + sigma xi``) has the
  right order, and the plug-in's error -- the difference between the statistics at the
  trained value and at the population value, two positions one ``sigma`` apart -- has at
  most ``sqrt(2)`` times its spread, so the bootstrap half-widths are scaled by ``sqrt(2)``.
  With no coarse coordinate at all (a fine grid) there is no position error: the record
  error alone, labelled averaged.

Both are widened to contain the plug-in and by ``Phi^-1((1 + level)/2)`` standard errors of
the mean over the records. In the position-dominated regime the per-coordinate search also
reads the cells at ``sigma (1 +- z1 se)`` (the step in sd units is known only as well as
``sigma``), and with the weights' correlation (:class:`CorrelatedEnds`) the two ends are
computed with the correlated headline's own form rather than carried over by the plug-in's
ratio, which depends on the positions. Pure torch; shapes and units as in the package
docstring.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_finite, check_shape
from .cells import SQRT_2_OVER_PI, cell_moments, cell_statistics
from .correlated import EXACT_MAX_COARSE, RecordCorrelation, exact_box_mean_abs
from .leakage import CltSums, mc_first_order, saturate

# Effective number of coordinates carrying the position uncertainty up to which the range
# over the confidence box is used ("position-dominated"); beyond it the errors average.
POSITION_MAX_TERMS = 10.0
# Evaluation points of each coordinate's cell statistics across the box (odd: includes 0).
RANGE_POINTS = 25
REGIMES = ("position-dominated", "averaged")
# Draws of the exact box-mean form at the two ends (the headline uses 1,024 outer draws). Outer
# draws only add unbiased noise (~3% at 256, small against the box's range); box draws set
# what is left of the upward bias of a mean |.| of noisy box means (antithetic pairs remove
# most of it, functional.correlated) -- the floor of a near-zero end (8 sd mid-cell) -- so
# they stay at the headline's (the form caps them as there: 256 quasi-random draws per box
# with fine weights, EXACT_QMC_BOX_DRAWS). A quarter of the cost of the headline.
ENDS_OUTER_DRAWS = 256
ENDS_BOX_DRAWS = 1024
# Search the position-dominated extremes by the Monte Carlo form itself, one coarse coordinate at a
# time, besides the kappa search (method.md section 3, "The uncertainty interval", *Extremes by the
# form*). The Monte Carlo and exact box-mean forms read each cell's score distribution, not only its
# variance kappa: their value moves with a weight's place in its cell even where kappa is flat (a
# step of ~1 sd), highest with an edge at the population value (cov47). Only for ``method="mc"``
# (the Gaussian form is a function of kappa, the one-coordinate form of lam: there the per-coordinate
# search is exact) and up to FORM_SEARCH_MAX_COARSE coarse coordinates (its cost is linear in them).
FORM_SEARCH = False
FORM_SEARCH_MAX_COARSE = 8
# The correlated ends over the kappa box by RecordCorrelation.gaussian_ends (cf56): the in-sample
# leave-one-out form, not monotone in kappa, gets ends that hold its range; False restores the form
# at the two corners (correlated_leakage_at), which can leave its larger value outside (A/B)
CORRELATED_ENDS_OVER_BOX = True

log = logging.getLogger(__name__)


def normal_quantile(p: float) -> float:
    """``Phi^-1(p)`` for ``0 < p < 1``."""
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def box_halfwidth(level: float, terms: float) -> float:
    """Half-width ``z`` (in sd) of a per-coordinate box ``theta_hat_j +- z sigma_j`` that
    holds ``theta*`` in all of ``k = ceil(terms)`` independent coordinates with probability
    ``level`` (Sidak): ``z = Phi^-1((1 + level^(1/k)) / 2)``.

    Raises:
        ValueError: ``level`` not in (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    k = max(1, math.ceil(terms)) if math.isfinite(terms) else 1
    return normal_quantile(0.5 * (1.0 + level ** (1.0 / k)))


@dataclass(frozen=True)
class PositionRange:
    """Per-coordinate extremes of a cell statistic over ``theta_hat_j + t sigma_j``,
    ``|t| <= halfwidth``.

    Attributes:
        low, high: ``[d]`` centres (parameter units) where the statistic is smallest /
            largest.
        spread: ``[d]`` its largest minus its smallest value (>= 0).
        halfwidth: the box half-width ``z`` (sd units).
        low_sigma, high_sigma: ``[d]`` the standard deviations at which the cells are read
            there (``sigma`` itself unless a ``sigma_rel`` range was searched).
    """

    low: Tensor
    high: Tensor
    spread: Tensor
    halfwidth: float
    low_sigma: Tensor | None = None
    high_sigma: Tensor | None = None


def position_range(theta: Tensor, sigma: Tensor, boundaries: Tensor, halfwidth: float, *,
                   by: str = "kappa", num_points: int = RANGE_POINTS,
                   sigma_rel: Tensor | None = None, box_sigma: Tensor | None = None) -> PositionRange:
    """Where in ``theta +- halfwidth * sigma`` each coordinate's ``kappa`` (or ``lam``) is
    smallest and largest.

    Args:
        theta: ``[d]`` trained weights (parameter units).
        sigma: ``[d]`` their standard deviations (parameter units, >= 0).
        boundaries: ``[d, K+1]`` cell edges around each ``theta_j`` covering about
            ``halfwidth + 8`` sigma (parameter units, sorted).
        halfwidth: box half-width in sd (>= 0).
        by: ``"kappa"`` (Gaussian and Monte Carlo forms) or ``"lam"`` (one coordinate).
        num_points: evaluation points across the box (a grid of ``2 halfwidth /
            (num_points - 1)`` sd; the extremes are flat, so ~0.2 sd suffices).
        sigma_rel: ``[d]`` relative half-range of ``sigma`` to search as well (the cells
            read at ``sigma (1 + s)``, ``s in {-sigma_rel, 0, +sigma_rel}``): the sampling
            error of the plug-in ``sigma``, which sets the step in sd units. ``None``: 0.
        box_sigma: ``[d]`` the standard deviation of each weight's position *relative to
            its grid* (parameter units): the box is ``theta +- halfwidth * box_sigma``
            (``None``: ``sigma``; larger where the released grid moves with the weights,
            e.g. absmax scales: method.md section 3, "The uncertainty interval").

    Returns:
        :class:`PositionRange` (float64).

    Raises:
        ValueError: bad shapes, ``by`` unknown or ``halfwidth < 0``.
    """
    check_shape("theta", theta, 1, "[d]")
    check_shape("sigma", sigma, 1, "[d]")
    check_shape("boundaries", boundaries, 2, "[d, K+1]")
    if by not in ("kappa", "lam"):
        raise ValueError(f"by must be 'kappa' or 'lam', got {by!r}")
    if not halfwidth >= 0.0:
        raise ValueError(f"halfwidth must be >= 0, got {halfwidth!r}")
    th, sg = theta.to(torch.float64), sigma.to(torch.float64)
    bs = sg if box_sigma is None else box_sigma.to(torch.float64)
    num_points = max(3, num_points | 1)
    t = torch.linspace(-halfwidth, halfwidth, num_points, dtype=torch.float64)
    rel = torch.zeros_like(sg) if sigma_rel is None else sigma_rel.to(torch.float64).clamp(0.0, 0.5)
    scales = [torch.ones_like(sg)] + ([] if sigma_rel is None else [1.0 - rel, 1.0 + rel])
    # [S * P, d]: the box positions use the plug-in sigma; the cells are read at sigma * scale
    vals = torch.cat([torch.stack([getattr(cell_moments(th + ti * bs, sg * sc, boundaries), by) for ti in t])
                      for sc in scales])
    lo_i, hi_i = vals.argmin(0), vals.argmax(0)
    idx = torch.arange(th.shape[0])
    P = t.numel()
    sc_all = torch.stack(scales)  # [S, d]
    return PositionRange(low=th + t[lo_i % P] * bs, high=th + t[hi_i % P] * bs,
                         spread=vals[hi_i, idx] - vals[lo_i, idx], halfwidth=halfwidth,
                         low_sigma=sg * sc_all[lo_i // P, idx], high_sigma=sg * sc_all[hi_i // P, idx])


def range_terms(spread: Tensor, weight: Tensor | None = None) -> float:
    """Effective number of coordinates carrying the position uncertainty,
    ``(sum c)^2 / sum c^2`` with ``c_j = spread_j * weight_j`` (``weight_j``: mean squared
    standardised influence, 1 by construction when omitted); 0 when nothing moves.

    Raises:
        ValueError: ``spread`` and ``weight`` differ in shape.
    """
    c = spread.to(torch.float64).clamp_min(0.0)
    if weight is not None:
        if weight.shape != spread.shape:
            raise ValueError(f"weight {tuple(weight.shape)} and spread {tuple(spread.shape)} differ")
        c = c * weight.to(torch.float64)
    den = float(c.square().sum())
    return float(c.sum()) ** 2 / den if den > 0 else 0.0


@dataclass(frozen=True)
class Interval:
    """An uncertainty interval of the leakage.

    Attributes:
        lo, hi: its ends (leakage units, ``0 <= lo <= value <= hi``).
        regime: ``"position-dominated"`` or ``"averaged"`` (see the module docstring).
        terms: effective number of coordinates carrying the position uncertainty.
        halfwidth: the box half-width in sd (position-dominated), else ``nan``.
    """

    lo: float
    hi: float
    regime: str
    terms: float
    halfwidth: float = math.nan
    correlated: bool = False  # the ends were computed with the weights' correlation

    def __post_init__(self) -> None:
        # a leakage is at most 1: ends padded past it (tiny n, few coarse weights) are cut there
        object.__setattr__(self, "hi", min(self.hi, 1.0))


@dataclass(frozen=True)
class CorrelatedEnds:
    """What the position-dominated ends need to be computed with the correlation of the
    weights (the correlated headline, method.md section 3) instead of being carried over
    from the independent form by the plug-in's ratio -- that ratio depends on where the
    population weights sit (linear d = 2, rho = 0.5, step 2 sd, every weight mid-cell:
    correlated / independent = 0.93 there, 1.00 at a typical trained position).

    Attributes:
        correlation: the record correlation of the headline.
        influence: ``[R, D]`` standardised influences of ALL assessed weights.
        kappa: ``[D]`` each weight's ``kappa`` at the plug-in (1 for float weights).
        index: ``[d]`` global indices of the coarse coordinates, in the order of ``theta``.
        cap: ``[R]`` the unquantized mean ``|S|`` (conditional Jensen cap), or ``None``.
        value: the correlated plug-in (mean over records, leakage units) that these ends
            bracket; ``nan``: not given (:func:`leakage_interval` then uses its ``value``).
        record_se: that mean's standard error over the records (leakage units).

    The independent form's plug-in and record error stay :func:`leakage_interval`'s ``value``
    and ``record_se``: the averaged regime's bootstrap draws are of that form, so an interval
    built there is of it and carried to the headline by the caller.
    """

    correlation: RecordCorrelation
    influence: Tensor
    kappa: Tensor
    index: Tensor
    cap: Tensor | None = None
    value: float = math.nan
    record_se: float = 0.0


def correlated_leakage_at(ctx: CorrelatedEnds, n: float, theta: Tensor, sigma: Tensor, boundaries: Tensor,
                          method: str, *, generator: torch.Generator | None = None) -> float:
    """Mean over records of the correlated first-order leakage with the coarse coordinates'
    cells read around ``theta`` (``[d]``, parameter units): the exact box-mean form
    (:func:`~mis_lightning.functional.correlated.exact_box_mean_abs`) for ``method="mc"``
    with the full correlation and at most ``EXACT_MAX_COARSE`` coarse weights, else the
    Gaussian channel form -- the forms of the headline."""
    th, sg = theta.to(torch.float64), sigma.to(torch.float64)
    k = ctx.kappa.to(torch.float64).clone()
    k[ctx.index] = cell_moments(th, sg, boundaries).kappa
    W = ctx.influence.to(torch.float64)
    rc = ctx.correlation
    mean_abs = None
    if method == "mc" and rc.kind == "full" and ctx.index.numel() <= EXACT_MAX_COARSE:
        alpha = (boundaries.to(torch.float64) - th.unsqueeze(-1)) / sg.clamp_min(1e-300).unsqueeze(-1)
        try:
            mean_abs, _ = exact_box_mean_abs(rc.parts[0][1], W, k, ctx.index, alpha, outer_draws=ENDS_OUTER_DRAWS,
                                             box_draws=ENDS_BOX_DRAWS, generator=generator)
        except torch.linalg.LinAlgError as exc:  # a degenerate block (d > n, flat directions)
            log.warning("exact box-mean form failed at an interval end (%s); using the Gaussian channel form", exc)
    if mean_abs is None:
        mean_abs = rc.gaussian_mean_abs(W, k)
    if ctx.cap is not None:  # as the headline: no release leaks more than the unquantized one
        mean_abs = torch.minimum(mean_abs, ctx.cap.to(torch.float64))
    return float(saturate(mean_abs / (2.0 * math.sqrt(n))).mean())


def correlated_ends(ctx: CorrelatedEnds, n: float, low: tuple[Tensor, Tensor], high: tuple[Tensor, Tensor],
                    boundaries: Tensor, method: str, seed: int) -> tuple[float, float]:
    """The position-dominated ends with the weights' correlation: ``low`` and ``high`` are the
    ``(theta, sigma)`` (``[d]`` each, parameter units) where each coarse coordinate's ``kappa`` is
    smallest / largest in the box. The exact box-mean form (``method="mc"``, full correlation, at
    most ``EXACT_MAX_COARSE`` coarse weights) at each (:func:`correlated_leakage_at`); otherwise the
    Gaussian channel form's bounds over the whole ``kappa`` box
    (:meth:`~mis_lightning.functional.correlated.RecordCorrelation.gaussian_ends`): the corners'
    values for the monotone forms, a pairing that holds the in-sample leave-one-out form, which is
    not monotone in ``kappa`` (method.md section 3, "Correlated headline")."""
    rc = ctx.correlation
    exact_box = method == "mc" and rc.kind == "full" and ctx.index.numel() <= EXACT_MAX_COARSE
    if CORRELATED_ENDS_OVER_BOX and not exact_box:
        ks = []
        for th, sg in (low, high):
            k = ctx.kappa.to(torch.float64).clone()
            k[ctx.index] = cell_moments(th.to(torch.float64), sg.to(torch.float64), boundaries).kappa
            ks.append(k)
        lo_abs, hi_abs = rc.gaussian_ends(ctx.influence.to(torch.float64), ks[0], ks[1])
        out = []
        for mean_abs in (lo_abs, hi_abs):
            if ctx.cap is not None:  # as the headline: no release leaks more than the unquantized one
                mean_abs = torch.minimum(mean_abs, ctx.cap.to(torch.float64))
            out.append(float(saturate(mean_abs / (2.0 * math.sqrt(n))).mean()))
        return out[0], out[1]
    lo_v, hi_v = (correlated_leakage_at(ctx, n, th, sg, boundaries, method, generator=torch.Generator().manual_seed(seed))
                  for th, sg in (low, high))
    return lo_v, hi_v


def leakage_at(influence: Tensor, n: float, theta: Tensor, sigma: Tensor, boundaries: Tensor, method: str, *,
               gaussian_s2: Tensor | None = None, mc_draws: int = 4096,
               generator: torch.Generator | None = None) -> float:
    """Mean over records of the saturated first-order leakage with the cells read around
    ``theta`` (the hypothesised population values) instead of the trained weights.

    Args:
        influence: ``[R, d]`` standardised influences of the coordinates in ``theta``.
        n: training records.
        theta, sigma, boundaries: ``[d]``, ``[d]``, ``[d, K+1]`` (parameter units).
        method: ``"exact1d"`` (``d = 1``, no ``gaussian_s2``), ``"mc"`` or ``"clt"``.
        gaussian_s2: ``[R]`` further coordinates' Gaussian-form sum ``sum influence^2 kappa``
            (fine or float weights, held fixed).
        mc_draws, generator: Monte Carlo draws.

    Raises:
        ValueError: unknown ``method``, or ``exact1d`` with ``d != 1``.
    """
    scale = 1.0 / (2.0 * math.sqrt(n))
    infl64 = influence.to(torch.float64)
    g2 = torch.zeros(influence.shape[0], dtype=torch.float64) if gaussian_s2 is None else gaussian_s2.to(torch.float64)
    if method == "exact1d":
        if influence.shape[1] != 1 or gaussian_s2 is not None:
            raise ValueError(f"method='exact1d' needs exactly one coordinate, got {influence.shape[1]} (+ Gaussian part)")
        lam = cell_moments(theta.to(torch.float64), sigma.to(torch.float64), boundaries).mean_abs
        return float(saturate(infl64[:, 0].abs() * lam[0] * scale).mean())
    if method == "clt":
        kappa = cell_moments(theta.to(torch.float64), sigma.to(torch.float64), boundaries).kappa
        return float(CltSums(g2 + infl64.square() @ kappa, torch.zeros_like(g2)).leakage(n).mean())
    if method == "mc":
        stats = cell_statistics(theta.to(torch.float64), sigma.to(torch.float64), boundaries, validate=False)
        mean_abs, _ = mc_first_order(infl64, stats, mc_draws, generator,
                                     gaussian_s2=g2 if bool((g2 > 0).any()) else None)
        cap = SQRT_2_OVER_PI * (infl64.square().sum(-1) + g2).sqrt()  # conditional Jensen
        return float(saturate(torch.minimum(mean_abs, cap) * scale).mean())
    raise ValueError(f"unknown method {method!r}; expected 'exact1d', 'mc' or 'clt'")


def form_extremes(influence: Tensor, n: float, theta: Tensor, sigma: Tensor, boundaries: Tensor,
                  halfwidth: float, *, box_sigma: Tensor | None = None, gaussian_s2: Tensor | None = None,
                  mc_draws: int = 4096, seed: int = 0, num_points: int = RANGE_POINTS) -> tuple[Tensor, Tensor]:
    """Positions in the box ``theta +- halfwidth * box_sigma`` where the Monte Carlo form
    (:func:`leakage_at`, ``method="mc"``) is smallest and largest, one coordinate at a time: each
    coordinate is moved across its box (``num_points`` points, the others at ``theta``) and put
    where the form was smallest / largest. Every evaluation uses the same random numbers
    (``seed``), so the form's differences between positions carry little of its Monte Carlo noise.

    Args:
        influence: ``[R, d]`` standardised influences of the coarse coordinates.
        n: training records.
        theta, sigma, boundaries: ``[d]``, ``[d]``, ``[d, K+1]`` (parameter units).
        halfwidth: box half-width (sd units, >= 0).
        box_sigma: ``[d]`` position sd relative to the grid (``None``: ``sigma``).
        gaussian_s2: ``[R]`` the other coordinates' Gaussian-form sum (held fixed).
        mc_draws, seed, num_points: Monte Carlo draws, their seed, points across the box.

    Returns:
        ``(low, high)``, ``[d]`` each (parameter units, float64).

    Raises:
        ValueError: ``halfwidth < 0`` or mismatched shapes (``influence``, ``sigma``,
            ``box_sigma``, ``boundaries`` against ``theta``'s ``d``).

    Source: docs/method.md section 3, "Extremes by the form".
    """
    check_shape("theta", theta, 1, "[d]")
    check_shape("influence", influence, 2, "[R, d]")
    if influence.shape[1] != theta.shape[0]:
        raise ValueError(f"influence has {influence.shape[1]} coordinates but theta has {theta.shape[0]}")
    if not halfwidth >= 0.0:
        raise ValueError(f"halfwidth must be >= 0, got {halfwidth!r}")
    d = theta.shape[0]
    for label, v in (("sigma", sigma), ("box_sigma", box_sigma)):
        if v is not None and tuple(v.shape) != (d,):
            raise ValueError(f"{label} must have shape [d] = [{d}], got {tuple(v.shape)}")
    if boundaries.ndim != 2 or boundaries.shape[0] != d:
        raise ValueError(f"boundaries must have shape [d, K+1] with d = {d}, got {tuple(boundaries.shape)}")
    th = theta.to(torch.float64)
    bs = (sigma if box_sigma is None else box_sigma).to(torch.float64)
    t = torch.linspace(-halfwidth, halfwidth, max(3, num_points | 1), dtype=torch.float64)
    low, high = th.clone(), th.clone()
    for j in range(th.shape[0]):
        vals = []
        for ti in t:
            c = th.clone()
            c[j] = th[j] + ti * bs[j]
            vals.append(leakage_at(influence, n, c, sigma, boundaries, "mc", gaussian_s2=gaussian_s2,
                                   mc_draws=mc_draws, generator=torch.Generator().manual_seed(seed)))
        v = torch.tensor(vals, dtype=torch.float64)
        low[j] = th[j] + t[int(v.argmin())] * bs[j]
        high[j] = th[j] + t[int(v.argmax())] * bs[j]
    return low, high


def leakage_interval(value: float, record_se: float, n: float, *, draws: Tensor | None = None,
                     theta: Tensor | None = None, sigma: Tensor | None = None,
                     boundaries: Tensor | None = None, influence: Tensor | None = None,
                     gaussian_s2: Tensor | None = None, method: str = "clt", level: float = 0.8,
                     max_terms: float = POSITION_MAX_TERMS, mc_draws: int = 4096,
                     generator: torch.Generator | None = None,
                     correlated: CorrelatedEnds | None = None, box_sigma: Tensor | None = None,
                     draw_noise: float = 0.0) -> Interval:
    """A ``level`` uncertainty interval of the leakage around the plug-in ``value``.

    Args:
        value: the plug-in leakage (mean over records, leakage units) of the form the
            ``draws`` are of (independent coordinates; with ``correlated`` too: a correlated
            plug-in goes in ``correlated.value``).
        record_se: standard error of that mean over the records (``s / sqrt(R)``: it
            estimates the stored mean's variance about the population mean, which records
            were kept plus which were drawn; method.md section 3, "The uncertainty interval").
        n: training records; also the sample of ``sigma``'s estimate, whose relative
            standard error ``sd(w^2) / (2 sqrt(n))`` the position search reads.
        draws: ``[B]`` leakage under the parametric bootstrap (cells re-evaluated around
            ``theta_hat + sigma xi``), used in the averaged regime: sqrt(2) x their p10 / p90
            distances from their median ``med``, held around ``med`` and around the plug-in
            debiased by them, ``2 value - med`` (method.md section 3, "The centre and the
            plug-in's bias"); ``None``/empty: that regime returns the plug-in widened by the
            record error only.
        theta, sigma, boundaries: ``[d]``, ``[d]``, ``[d, K+1]`` of the coarse quantized
            coordinates (those whose cell statistics depend on the position; parameter
            units). ``None`` (e.g. influences not stored): averaged regime.
        influence: ``[R, d]`` their standardised influences.
        gaussian_s2: ``[R]`` the other coordinates' Gaussian-form sum (held fixed).
        method: how the leakage at the box's extremes is evaluated (``"exact1d"``,
            ``"mc"``, ``"clt"``), the method of the plug-in.
        level: nominal coverage in (0, 1).
        max_terms: position-dominated up to this many effective coordinates.
        mc_draws, generator: Monte Carlo draws for ``method="mc"``.
        correlated: compute the position-dominated ends with the weights' correlation
            (:class:`CorrelatedEnds`, around ``correlated.value`` padded by
            ``correlated.record_se``); ``None``: independent coordinates. It does not change
            the averaged regime, which stays around ``value`` (``Interval.correlated`` False:
            the caller carries it over by the ratio of the two plug-ins).
        box_sigma: ``[d]`` standard deviations of the coarse coordinates' positions relative
            to their grids (:func:`position_range`); ``None``: ``sigma``.
        draw_noise: standard error of the draws' centre from evaluating them on a sample of
            the weights (``assess._draw_sample_noise``); the averaged regime adds it to the
            record error in quadrature (both are errors of the centre, independent).

    Returns:
        :class:`Interval`.

    Raises:
        ValueError: ``level`` outside (0, 1); mismatched shapes.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    z1 = normal_quantile(0.5 * (1.0 + level))
    pad = z1 * max(record_se, 0.0)
    # The correlated ends bracket the correlated plug-in; the averaged regime's draws are of the
    # independent form, so its interval is around ``value`` (a correlated value there, iv28, put
    # the carried headline at an end of its interval and its other end past the baseline).
    c_value, c_pad = value, pad
    if correlated is not None and math.isfinite(correlated.value):
        c_value, c_pad = correlated.value, z1 * max(correlated.record_se, 0.0)
    terms = math.inf
    if theta is not None and influence is not None and theta.numel() > 0:
        assert sigma is not None and boundaries is not None
        check_shape("influence", influence, 2, "[R, d]")
        check_finite("influence", influence)
        if influence.shape[1] != theta.shape[0]:
            raise ValueError(f"influence has {influence.shape[1]} coordinates but theta has {theta.shape[0]}")
        by = "lam" if method == "exact1d" else "kappa"
        # The step in sd units is known only as well as sigma: sigma^2 is the mean of psi_j^2
        # over all n training records (not the R stored ones), so its relative standard error is
        # sd(w_j^2) / sqrt(n) -- the spread read on the R stored records -- and sigma's half of
        # it, searched at +-z1 se (method.md section 3, "The step in sd units").
        R = influence.shape[0]
        rel = z1 * 0.5 * influence.to(torch.float64).square().std(0) / math.sqrt(max(n, R)) if R > 1 else None
        # The box at level (1 + level) / 2: at an extreme position (mid-cell, boundary) the
        # range reaches the truth exactly when the box holds theta*, so the box alone would
        # give the nominal level with nothing left for the plug-in's other errors
        # (sigma, influence, records); measured: 65-75% at level 0.8 (docs/validation.md).
        box = 0.5 * (1.0 + level)
        first = position_range(theta, sigma, boundaries, box_halfwidth(box, 1), by=by, sigma_rel=rel,
                               box_sigma=box_sigma)
        terms = range_terms(first.spread, influence.to(torch.float64).square().mean(0))
        if terms <= max_terms:
            z = box_halfwidth(box, terms)
            rng = first if z == first.halfwidth else position_range(theta, sigma, boundaries, z, by=by,
                                                                    sigma_rel=rel, box_sigma=box_sigma)
            s_lo, s_hi = rng.low_sigma, rng.high_sigma
            seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
            if correlated is not None:
                low, high = correlated_ends(correlated, n, (rng.low, s_lo), (rng.high, s_hi), boundaries, method, seed)
            else:
                kw = {"gaussian_s2": gaussian_s2, "mc_draws": mc_draws}
                low = leakage_at(influence, n, rng.low, s_lo, boundaries, method,
                                 generator=torch.Generator().manual_seed(seed), **kw)
                high = leakage_at(influence, n, rng.high, s_hi, boundaries, method,
                                  generator=torch.Generator().manual_seed(seed), **kw)
            if FORM_SEARCH and method == "mc" and theta.numel() <= FORM_SEARCH_MAX_COARSE:
                # The form's extremes, carried to the headline by the Monte Carlo form's change from
                # the plug-in's position (one seed: the change is the positions', not the draws'),
                # added, not multiplied: a ratio to a near-zero plug-in (8 sd mid-cell) is noise; the
                # kappa-searched ends stay, so the interval holds theirs.
                f_lo, f_hi = form_extremes(influence, n, theta, sigma, boundaries, z, box_sigma=box_sigma,
                                           gaussian_s2=gaussian_s2, mc_draws=mc_draws, seed=seed)
                kw = {"gaussian_s2": gaussian_s2, "mc_draws": mc_draws}
                l0, l_lo, l_hi = (leakage_at(influence, n, c, sc, boundaries, "mc",
                                             generator=torch.Generator().manual_seed(seed), **kw)
                                  for c, sc in ((theta, sigma), (f_lo, s_lo), (f_hi, s_hi)))
                low, high = min(low, c_value + l_lo - l0), max(high, c_value + l_hi - l0)
            if correlated is not None:
                return Interval(max(min(low, c_value) - c_pad, 0.0), max(high, c_value) + c_pad,
                                "position-dominated", terms, z, correlated=True)
            return Interval(max(min(low, value) - pad, 0.0), max(high, value) + pad,
                            "position-dominated", terms, z)
    elif theta is not None and theta.numel() == 0:
        # nothing is coarse (a fine grid: a 16-bit cast, int8 with sd far above its step): no
        # position uncertainty, the record error alone -- the averaged regime without draws, not
        # "position-dominated" (pl48: nux48 read bf16's "pos.", "few coarse weights", as wrong)
        terms = 0.0
        return Interval(max(c_value - c_pad, 0.0), c_value + c_pad, "averaged", terms, 0.0,
                        correlated=correlated is not None)
    if draws is None or draws.numel() == 0:
        return Interval(max(value - pad, 0.0), value + pad, "averaged", terms)
    if draw_noise > 0.0:
        pad = z1 * math.hypot(max(record_se, 0.0), draw_noise)
    t = draws.to(torch.float64)
    if t.numel() < 5:  # too few draws for quantiles: normal approximation
        med, s = float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0
        q_lo, q_hi = med - z1 * s, med + z1 * s
    else:
        a = 0.5 * (1.0 - level)
        q_lo, med, q_hi = (float(x) for x in torch.quantile(t, torch.tensor([a, 0.5, 1.0 - a], dtype=torch.float64)))
    # The plug-in's error is the difference of the statistics at two positions (trained
    # and population value): up to sqrt(2) times the spread of one (the bootstrap's).
    lo = med - math.sqrt(2.0) * (med - q_lo)
    hi = med + math.sqrt(2.0) * (q_hi - med)
    # The plug-in reads the cells smoothed over one sd of the position and the draws' centre over
    # two variances, so `med - value` estimates the plug-in's own smoothing bias (to first order
    # in the smoothing) and `2 value - med` is the plug-in with that bias removed: where the
    # population weights crowd where kappa curves (cell edges: the plug-in reads low), the truth
    # sits there and not at the draws' centre. The interval holds the spread around both centres
    # (cg30; method.md section 3, "averaged": "The centre and the plug-in's bias").
    shift = 2.0 * (value - med)
    lo, hi = min(lo, lo + shift), max(hi, hi + shift)
    return Interval(max(min(lo, value) - pad, 0.0), max(hi, value) + pad, "averaged", terms)
