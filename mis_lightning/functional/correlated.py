"""The leakage with correlated weights (method.md section 3, "Correlated coordinates").

The first-order total variation of a quantized release for a record with influence ``psi`` is
``E_U |psi' Sigma^-1 m(U)| / (2 sqrt n)``, ``U ~ N(0, Sigma)``, ``m(U) = E[U | cells of U]``.
In standardised units (``R`` the ``[d, d]`` correlation matrix of ``Sigma``, ``w = psi /
sqrt(diag Sigma)`` the influences) it is ``E |w' R^-1 m(U)|`` with ``U ~ N(0, R)``.

Approximation (information-matched noise channel). Each coordinate's quantizer keeps the
fraction ``kappa_j`` of the Fisher information about the location of its weight (cells.py).
A Gaussian channel ``Y_j = U_j + e_j`` keeps exactly that fraction when
``Var e_j = (1 - kappa_j) / kappa_j``; with independent ``e`` the observation's information is
``(R + diag((1 - kappa) / kappa))^-1``, so

    s2(w) = u' M^+ u,   u = K^1/2 w,   M = I - K + K^1/2 R K^1/2,   K = diag(kappa)

and the Gaussian form is ``E|S| = sqrt(2/pi) sqrt(s2)``. The full ``R`` is evaluated without
forming ``M``: in ``R``'s kept eigenspace ``U = B z`` (``B = Q Lambda^1/2 [d, r]``,
``z ~ N(0, I_r)``, ``g = Lambda^-1/2 Q' w`` so that ``|g|^2 = w'R^+w``); the coordinates with
``kappa = 1`` fix ``z`` along the row space of ``B_E`` (``g_E`` its part of ``g``, ``h`` the
rest), the others add the information ``F = C' diag(kappa / (1 - kappa)) C`` there
(``C = B_N V_perp``), and ``s2 = |g|^2 - h'(I + F)^-1 h = |g_E|^2 + h'(I + F)^-1 F h`` with
``I + F >= I``: no cutoff on ``M``, and monotone in every ``kappa`` whatever R's spectrum
(:meth:`Correlation._channel`; method.md section 3; the in-sample factor form's own-row-out
divisor is not, :meth:`RecordCorrelation.in_sample`). Properties: ``kappa = 1`` gives the unquantized
``w' R^+ w`` (Mahalanobis); ``kappa -> 0`` gives 0; ``M >= R`` in the Loewner order once rescaled,
so the value never exceeds the unquantized one; a diagonal ``R`` gives the independent-coordinate form
``sum_j w_j^2 kappa_j`` exactly.

For few coarse weights (the Monte Carlo regime of the independent form) the statistic
``S = sum_j c_j m_j`` with the channel's optimal weights ``c = K^-1/2 M^+ u`` is averaged over
*jointly* drawn cells: ``U ~ N(0, R)`` (Gaussian copula), each coarse coordinate's cell read
from its ``U_j``, fine or unquantized coordinates entering through ``kappa_j U_j`` plus the
channel's independent noise. With a diagonal ``R`` it is the independent Monte Carlo form.
With the full ``R`` and at most ``EXACT_MAX_COARSE`` coarse weights, their joint boxes are
treated exactly instead (:func:`exact_box_mean_abs`, GHK). Measured errors against exact
box-conditional means: docs/method.md.

Rank-deficient ``R`` (collinear features, duplicated columns): one rank rule, on ``R`` itself,
for every full form (Gaussian, the Monte Carlo and box forms' coefficients, the self term, the
variance inflation factors): eigenvalues above ``max(RCOND, d eps) lambda_max`` kept, the rule of
the estimator's unquantized Mahalanobis norm (never ``lstsq``'s default driver, whose answer on a
singular system depends on the run). Why not ``d eps`` alone: ``R`` comes through
``H^-1 V H^-1``, whose round-off reaches far above float64's ``d eps``; on an MLP
(d = 197, n = 300; docs/benchmarks.md, "pl44") R's most negative computed eigenvalue is -4.9e-13 of the largest, and the
mean ``w'R^+w`` reads 48.2 / 52.6 / 77.9 / 108 with the rule at 1e-8 / 1e-9 / 1e-12 / 1e-14
against 48.2 from the gradient covariance (which the Hessian cancels out of; its own rule at
1e-9; docs/benchmarks.md, "cf45"). The exactly observed block's rank is by float64 round-off only
(:data:`EXACT_BLOCK_RTOL`). The exact box-mean form's regressions go through the same channel
(:meth:`Correlation._regression`).

The exact estimator's own factor (:class:`SandwichFactor`, ``Estimate.correlation_factor``):
``R = B B'`` with ``B = D^-1 H^+ L``, ``L L' = V`` within the gradient covariance's rule, replaces
``R``'s eigendecomposition where the estimator gives it. A rule on ``R`` and the rule on ``V`` keep
different directions where both spectra are continuous (that MLP: mean ``w'R^+w`` 52.6 against
``g'V^+g`` 48.2), so quantized figures sat above the unquantized one and were capped record by
record; through the factor every kappa = 1 gives ``g'V^+g`` (2.3e-10 there) and no quantized value
exceeds it. Per-layer blocks (:meth:`Correlation.restrict`) keep ``R``'s own eigenspace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cells import SQRT_2_OVER_PI, CellStatistics
from .leakage import MC_DTYPE

# Relative cutoff of the eigenvalues kept by the pseudo-inverses: the rank rule of the full
# correlation R (module docstring; floored at d eps). float64 round-off of a singular correlation
# matrix sits near 1e-15, but R built through H^-1 carries round-off up to ~1e-12 of its largest
# eigenvalue (pl44's MLP: -4.9e-13), so finer rules count rounding as directions.
RCOND = 1e-9
# Margin over float64 round-off (max(|E|, r) eps sqrt(lambda_max)) of the singular values of the
# exactly observed weights' block of R's factor B that count (Correlation._channel): a softmax's
# bias sum, identically 0, read 2.2x the bare rule through H^-1 (cf45)
EXACT_BLOCK_RTOL = 100.0
# Largest kappa / (1 - kappa) of the channel's noisy weights for which I + F is factored by Cholesky of
# the formed I + C'WC (Correlation._channel): its round-off is ~eps W relative in F's small directions
# (2e-10 here); above it, QR of [W^1/2 C; I] (~eps W^1/2; about 4x the flops). rv45
CHANNEL_CHOLESKY_MAX_W = 1e6
# Weight of the identity in the factor model's correlation (shrinkage towards independent
# coordinates; keeps the remainder >= this and the solve well conditioned).
FACTOR_SHRINKAGE = 0.001
# Reweightings of Tyler's shape estimator in Correlation.from_influences (converged to ~1e-3
# relative in the mean quadratic form by 10 on the benchmark's settings)
TYLER_ITERATIONS = 10
# Shrinkage of the in-sample correlation towards the identity (RecordCorrelation.in_sample):
# small, since it weights the directions the records do not span (1e-3 read the quantized
# forms 0.49-0.86x the truth with half the weights left unquantized; 1e-6: 0.98-1.07x)
IN_SAMPLE_SHRINKAGE = 1e-6
# The in-sample form's leave-one-out term (RecordCorrelation.in_sample, dx32): a record's own share
# of the sample correlation along its channel direction (its in-sample leverage) is capped here
# before the record is taken out, so that a record alone along a direction (leverage 1) counts at
# most 1 / (1 - cap) = 4 times its in-sample score in the mean that the common rescaling keeps
IN_SAMPLE_LOO_LEVERAGE_CAP = 0.75
# False restores the plain in-sample form (each record scored with its own row in; A/B)
IN_SAMPLE_LOO = True
# ... applied only where the rows' rank is at most this share of the stored records: checked
# against closed-form truths at rank / R = 0.125 (OLS d = 64, R = 512: 0.998 against 1.05 before;
# Sigma = I synthetic rows: 0.992-1.006), where the expansion in rank / R it removes (~d / 2R)
# is small. Above it the plain form is kept, which reads high by about rank / 2R (the
# conservative side): dx32 saw the own-row-out form move a 10-8-1 tanh MLP's baseline 12% down
# at rank / R = 0.19 (heavy-tailed rows, no weight decay) with no truth to check it against
IN_SAMPLE_LOO_MAX_RANK_SHARE = 0.15
# The in-sample form's digits (cf55): unquantized, the stored records' mean own form x'M^-1x is
# trace(M^-1 W'W / R), known from the Gram's kept eigenvalues and the rows' mean square; a mean
# further than this from it (relative) means the Woodbury forms lost their digits (a column of the
# unit influences 1e6-1e20 times the rest: rank 1, every form negative and clamped to 0), and every
# form of that correlation reads NaN (loud; the report then names the correlation) instead of a
# silent 0 or a value off by orders. Healthy forms agree to ~1e-6 at most (float64, s / q <= 1e8)
IN_SAMPLE_TRACE_RTOL = 1e-3
# False: no check (the forms as computed, whatever their digits; A/B)
IN_SAMPLE_TRACE_CHECK = True
# With more weights than stored records, the in-sample form only where the rows show a clear null
# space (rank at most this share of the records): a Gram spectrum with a smooth tail past RCOND
# (rank 251 of 256 on the ChEMBL MPNN, 255-508 of 256-512 on a 1,004-weight MLP) is not a low
# rank, and in-sample forms, capped at that rank, read 0.72-0.94x the exact baseline on that MLP
IN_SAMPLE_MAX_RANK_SHARE = 0.9
# Draws per block of the Monte Carlo form: at least MC_BLOCK, and [S, max(R, d)] buffers of
# about MC_BLOCK_ELEMENTS (16 MiB in float32).
MC_BLOCK = 512
MC_BLOCK_ELEMENTS = 1 << 22
# Relative round-off the factor model's quadratic form accepts from the direct Woodbury difference
# (Correlation._factor_quadratic); rows whose bound exceeds it get the corrected form
QUADRATIC_TOLERANCE = 1e-12
# The factor forms' certificate (cf56; Correlation._certified): each form that left the plain Woodbury
# difference (the cancelling rows, the narrow blocks, the leave-one-out solves) is bracketed, rounding
# included (Correlation._variational, _narrow_quadratic); a row whose bracket is wider than this
# (relative) reads NaN, not a value off by orders. 1e-4 on a form is at most 5e-5 on its record's
# figure (a square root), half the last of the 4 decimals printed; the variational form's own
# rounding bound (worst case: coherent rounding) reaches it near s / q ~ 1e20 (rv55r's d / n = 1.31
# MLP: 3e-5 at s / q = 3.4e19, its mean form equal to the trace target to 1e-16)
FACTOR_FORM_RTOL = 1e-4
# False: no certificate (the forms as computed, whatever their digits; A/B)
FACTOR_FORM_CHECK = True
# The factor forms that cancel (Woodbury's difference past QUADRATIC_TOLERANCE, the leave-one-out
# solves' v'y) read as the variational form's minimum (Correlation._variational; cf56): False restores
# the stationary form and v'y (A/B; both still certified where FACTOR_FORM_CHECK)
FACTOR_FORM_VARIATIONAL = True
# The factor forms whose Woodbury difference passes QUADRATIC_TOLERANCE's test are certified too
# (Correlation._factor_quadratic; rv56s): that test's rounding bound s eps sqrt(d) assumes an exact
# core solve; an ill-conditioned core left a row 0.9% off. Kept where the bracket holds it (bitwise),
# else the variational value, else NaN. False: trusted as before (A/B); only with FACTOR_FORM_CHECK
FACTOR_FORM_WOODBURY_CHECK = True
# Correlation.quadratic_ends bounds the in-sample leave-one-out form's beta over the whole kappa box
# (_inverse_bias_range; rv56s: beta is not monotone in the kappas, its largest value can sit at a
# mixed corner, and the corners' betas alone left records 0.9% below the low end); False: the
# corners' betas (cf56; A/B)
CORRELATED_BETA_BOUNDS = True
# ... with each record's leverage h = min(b vv, cap) capped in the upper bound too (iv58: without it
# the bound's a_K grew with b vv, past the cap every a_K obeys, and a saturated headline's low end read
# 2e-11 around 1.0); False: the uncapped bound (A/B)
CORRELATED_BETA_CAP = True
# A narrow block's bracket (Correlation._narrow_quadratic) takes above also the stationary form plus
# the residual's r'M^-1r <= |r|^2 / lambda_min(M) (Correlation._residual_gap, cf57): the variational
# bound at t = A'x cancels |u| against |At| where the loadings dwarf the remainder, and read NaN for
# blocks whose M is well conditioned (condition 7e3). False: the variational bound alone (A/B)
FACTOR_FORM_RESIDUAL_BOUND = True
# The variational form's rows that its own rounding leaves uncertified (u - At cancels: s / q past
# ~1e20, the absolute in-sample shrinkage under columns 1e10 apart) are read again with u - At
# compensated (Correlation._compensated_residual, Dot2; cf57). False: NaN there (A/B)
FACTOR_FORM_COMPENSATED = True


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dekker's split of float64 ``x`` into ``hi + lo`` of 26 bits each (their products exact)."""
    c = 134217729.0 * x                                             # 2^27 + 1
    hi = c - (c - x)
    return hi, x - hi


def nonfinite_coordinates(x: Tensor) -> Tensor:
    """``[k]`` long: the rows of ``x [d, ...]`` holding a NaN or inf (the flat coordinates)."""
    return (~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero().flatten()


def _check_finite(R: Tensor, what: str) -> None:
    """Raise where ``R`` has a non-finite entry, naming the first coordinates (eigh would fail
    inside LAPACK, or return NaN, without saying where)."""
    bad = nonfinite_coordinates(R)
    if bad.numel():
        raise ValueError(f"{what} is not finite at coordinate(s) {bad[:8].tolist()}"
                         f"{' ...' if bad.numel() > 8 else ''} of {R.shape[0]}")


def correlation_from_covariance(Sigma: Tensor) -> Tensor:
    """``[d, d]`` correlation matrix of a covariance ``Sigma [d, d]`` (zero-variance coordinates:
    a zero row and column, so that they drop out of every pseudo-inverse)."""
    s = torch.diagonal(Sigma).clamp_min(0.0).sqrt()
    inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    R = inv.unsqueeze(-1) * Sigma * inv.unsqueeze(0)
    return 0.5 * (R + R.T)


@dataclass
class SandwichFactor:
    """An exact factor of the exact estimator's correlation, ``R ~ B B'`` with ``B = D^-1 H^+ L``
    (``L L' = V``, the gradient covariance within its rank rule; ``D`` the sd of ``Sigma``), so that
    the full form's one rank rule is the rule of the unquantized figure (the gradient covariance's,
    :data:`RCOND` on its correlation) and every kappa = 1 gives that figure (method.md section 3,
    "Correlated coordinates").

    ``evals [m]``: the eigenvalues of ``V``'s correlation above ``d eps`` of the largest, ascending;
    ``root [d, m]``: ``D^-1 H^+ D_V Q sqrt(evals)`` (``B``'s columns, one per eigenvalue);
    ``left [d, m]``: ``D H D_V^-1 Q / sqrt(evals)``, a left inverse of ``root`` (``left' root = I``)
    that maps a record's standardised influence ``w = -D^-1 H^+ c`` to exactly the coordinates
    ``Lambda^-1/2 Q' D_V^-1 c`` of its gradient that the estimator's Mahalanobis norm reads
    (``D_V`` the gradients' sd). Rows of weights the data never moves are 0 in ``root``.
    """

    evals: Tensor
    root: Tensor
    left: Tensor

    def keep(self, rcond: float) -> Tensor:
        """``[m]`` bool: the directions kept by the rank rule ``max(rcond, d eps) lambda_max``."""
        top = float(self.evals[-1]) if self.evals.numel() else 0.0
        tol = max(rcond, self.root.shape[0] * torch.finfo(torch.float64).eps) * top
        return self.evals > tol if top > 0 else torch.zeros_like(self.evals, dtype=torch.bool)


# ExactSpan: the exact block's smallest counting singular value within this factor of R's rank
# rule (sqrt(RCOND) relative to sqrt(lambda_max)) makes the determination "near" the rule: its
# variance is then within 100x of what R's own rule drops (cr49)
EXACT_SPAN_NEAR_RULE = 10.0


@dataclass(frozen=True)
class ExactSpan:
    """How the weights left exact (``kappa = 1``, set ``E``) observe ``z`` in the full form's
    channel (:meth:`Correlation.exact_span`): ``d`` weights, ``rank`` ``r`` of ``R``'s kept
    eigenspace, ``exact`` = ``|E|``, ``exact_rank`` ``k`` the numerical rank of ``B_E [|E|, r]``
    (:data:`EXACT_BLOCK_RTOL`), ``smallest`` its smallest counting singular value relative to
    ``sqrt(lambda_max)`` (NaN when ``k = 0``), ``rule`` = ``sqrt(max(rcond, d eps))``, R's rank
    rule in the same units."""

    d: int
    rank: int
    exact: int
    exact_rank: int
    smallest: float
    rule: float

    @property
    def determined(self) -> bool:
        """``k == r``: the exact weights determine ``z``, hence every quantized weight, so the
        full form equals the unquantized value whatever the quantization."""
        return self.rank > 0 and self.exact_rank == self.rank

    @property
    def near_rule(self) -> bool:
        """Whether the determination runs through a direction of the exact block at or below
        :data:`EXACT_SPAN_NEAR_RULE` x R's rank rule (``smallest`` against ``rule``): a
        variance that R's own rule would nearly drop, so the figure rests on it (an upper bound)."""
        return math.isfinite(self.smallest) and self.smallest < EXACT_SPAN_NEAR_RULE * self.rule

    def as_dict(self) -> dict[str, float | int | bool]:
        """The JSON record (``SchemeResult.exact_determination``)."""
        return {"d": self.d, "rank": self.rank, "float_weights": self.exact, "float_rank": self.exact_rank,
                "smallest_singular_value": self.smallest, "rank_rule": self.rule,
                "determined": self.determined, "near_rule": self.near_rule}


@dataclass
class Correlation:
    """Correlation of the standardised influences: ``full [d, d]``, or a factor model
    ``factor [d, k]`` (``R ~ L L' + diag(residual)``, unit diagonal) built from the stored
    records' influences.

    ``kind`` is ``"full"`` or ``"factor"`` (reported as the covariance form used).

    ``self_term [R, d]`` and ``self_weight [R]`` (full only; the exact estimator with fewer
    records stored than trained on, ``Estimate.self_term``): stored record ``r`` is scored
    through its own ``full - self_weight_r x_r x_r'`` (``x_r`` the row), the leave-one-out
    HC2 term (method.md section 4, *Gradient covariance*). :meth:`quadratic` applies it
    exactly by Sherman-Morrison, ``s2 = u'M^+u + b (u'M^+v)^2 / (1 - b v'M^+v)`` with
    ``v = K^1/2 x_r``, ``b = self_weight_r`` (``M`` changes by ``-b v v'``); the Monte Carlo and
    box-mean forms, which draw from one ``full``, are scaled per record by the Gaussian
    channel's ratio (:meth:`self_term_ratio`). The rows must be the stored records, in order.

    ``self_mean`` (the in-sample factor model, :meth:`RecordCorrelation.in_sample`): the
    self term is the record's own row of the sample correlation, taken out (``b = (1 - s) / R``,
    a downdate), with its in-sample leverage ``b v'M^+v`` capped at
    ``IN_SAMPLE_LOO_LEVERAGE_CAP``, and every record's form of a scheme is then divided by one
    ``1 + beta``, the inverse's bias (:meth:`_in_sample_loo_quadratic`; unquantized it gives the
    records' forms the shared form's mean, the rank, as the target's).
    """

    full: Tensor | None = None
    factor: Tensor | None = None
    residual: Tensor | None = None
    self_term: Tensor | None = None
    self_weight: Tensor | None = None
    self_mean: bool = False
    # the full R's rank rule (relative eigenvalue cutoff, :meth:`_basis`); the scoring re-reads
    # quantized figures at a finer one to flag figures the rule sets (rc44, cf45)
    rcond: float = RCOND
    # the exact estimator's factor of ``full`` (``R ~ B B'`` through the gradient covariance; rc46):
    # when given, the full form's kept eigenspace is this factor's, at ``rcond`` on the gradient
    # covariance's correlation, instead of ``full``'s own eigendecomposition (:meth:`_basis`)
    sandwich: SandwichFactor | None = None
    _root: Tensor | None = field(default=None, repr=False)
    # R's eigendecomposition, its kept eigenspace per rule and the last kappa's channel (full form;
    # keyed by ``full``), shared by :meth:`RecordCorrelation.with_rcond`'s copies: the check
    # re-reads a scheme's form at a finer rule without a second ``[d, d]`` eigh
    _eigh: dict = field(default_factory=dict, repr=False)
    # the in-sample form's trace(M^-1 W'W / R), the stored records' mean own form unquantized
    # (RecordCorrelation.in_sample; checked in _inverse_bias against IN_SAMPLE_TRACE_RTOL)
    trace_target: float | None = None
    _loo_cache: dict = field(default_factory=dict, repr=False)
    # :meth:`restrict`'s full blocks by slice: {slice.indices(d): (the block's view, the ``full`` it
    # was cut from, the block's ``_eigh``)}, shared by :meth:`RecordCorrelation.with_rcond`'s copies
    _blocks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.self_term is None) != (self.self_weight is None):
            raise ValueError("self_term and self_weight go together")
        if self.self_term is not None and self.full is None and not self.self_mean:
            raise ValueError("a per-record self term needs the full correlation")

    @property
    def kind(self) -> str:
        return "full" if self.full is not None else "factor"

    @property
    def d(self) -> int:
        return int((self.full if self.full is not None else self.factor).shape[0])  # type: ignore[union-attr]

    @classmethod
    def from_influences(cls, influence: Tensor, rank: int) -> Correlation:
        """Factor model from ``influence [m, d]`` of ``m`` records (standardised, so
        ``E w_j^2 = 1``): principal directions of their shape matrix, the directions left out
        at their mean eigenvalue, shrunk by ``FACTOR_SHRINKAGE`` towards the identity. Built
        for quadratic forms ``w' A^-1 w`` of OTHER records (cross-fitting), which an inverted
        sample correlation inflates.

        Which directions: all of them (up to ``rank``) when ``d <= m / 4`` (the correlation is
        then well estimated); otherwise only those whose eigenvalue clears the Marchenko-Pastur
        edge ``(1 + sqrt(d / m))^2`` (below it an eigenvalue of ``m`` records in ``d``
        dimensions is indistinguishable from noise); none clearing it gives independent
        coordinates.

        Three finite-sample corrections, without which a fresh user measured the unquantized
        headline 15-80% above the exact estimator's on uncorrelated OLS weights (d = 64-101,
        512-3,000 records) and ``benchmarks/factor_correlation_bias.py`` reads the mean
        ``sqrt(w' A^-1 w)`` of new records up to 1.5x (Gaussian influences) and 1.6x
        (influences with a per-record scale) its true value:

        * a record's influence is a per-record scale times a direction (the residual of a
          regression, ``p - y`` of a classifier multiply every coordinate), which spreads the
          sample eigenvalues beyond the Marchenko-Pastur law: the shape is estimated with the
          scale removed, by Tyler's M-estimator (``TYLER_ITERATIONS`` reweightings by
          ``d / w' A^-1 w``; Tyler 1987) when ``d <= m / 2``, else from the records scaled to a
          common norm (spatial signs: Tyler's estimator needs ``d < m``);
        * the ``d - k`` directions left out get their mean eigenvalue ``sigma^2``
          (probabilistic PCA, Tipping and Bishop 1999; a residual ``1 - diag(L L')`` left them
          ``~sigma^2 / d``, weighting a new record's component along them ``d`` times too much);
          the kept loadings are ``V (Lambda - sigma^2)^1/2``;
        * the kept directions' variances are scaled by ``m / (m - k - 1)``, the mean
          inflation of an inverted ``k``-dimensional sample covariance (inverse Wishart).

        Raises:
            ValueError: ``rank < 1`` or no records.
        """
        if rank < 1 or influence.shape[0] < 1:
            raise ValueError(f"a factor model needs rank >= 1 and records, got rank={rank}, "
                             f"{influence.shape[0]} records")
        W = influence.to(torch.float64)
        m, d = W.shape
        Ws = W * W.square().mean(0).clamp_min(1e-300).rsqrt()  # the records' own unit diagonal
        norms = Ws.square().sum(-1).clamp_min(1e-300)
        if 2 * d <= m:
            for _ in range(TYLER_ITERATIONS):  # Tyler: weights d / (w' A^-1 w) at the fixed point
                L, resid = _factor_fit(Ws * (d / norms).sqrt().unsqueeze(-1), rank, inflate=False)
                # shrunk as the final model (a remainder near 0 made the Woodbury solve cancel
                # ~1/remainder digits: 1e-7 differences between runs of the same records)
                norms = cls._shrunk(L, resid).quadratic(Ws).clamp_min(1e-300)
        X = Ws * (d / norms).sqrt().unsqueeze(-1)
        X = X * X.square().mean(0).clamp_min(1e-300).rsqrt()  # unit diagonal again
        return cls._shrunk(*_factor_fit(X, rank, inflate=True))

    @classmethod
    def _shrunk(cls, factor: Tensor, residual: Tensor) -> Correlation:
        """The factor model ``L L' + diag(residual)`` shrunk by ``FACTOR_SHRINKAGE`` towards the
        identity: an estimated correlation whose directions explain a coordinate fully would make
        the remainder 0 and the Woodbury solve unstable."""
        return cls(factor=factor * math.sqrt(1.0 - FACTOR_SHRINKAGE),
                   residual=(1.0 - FACTOR_SHRINKAGE) * residual + FACTOR_SHRINKAGE)

    def restrict(self, index: Tensor | slice) -> Correlation:
        """The correlation of a subset of coordinates (a layer's block). A full block by a slice
        is the same ``full`` view, with one shared eigendecomposition cache, on every call (and on
        :meth:`RecordCorrelation.with_rcond`'s copies, which share ``_blocks``): each scheme's
        per-layer form used to rebuild the view and redo its ``[d_l, d_l]`` eigh (:meth:`_basis`),
        three times per weight layer for three schemes (docs/benchmarks.md, "ex58"); the forms
        are the same bit for bit."""
        if self.full is not None:
            x = None if self.self_term is None else self.self_term[:, index]
            if isinstance(index, slice):
                key = index.indices(self.d)
                hit = self._blocks.get(key)
                if hit is None or hit[1] is not self.full:
                    self._blocks[key] = (self.full[index, index], self.full, {})
                block, _, eigh = self._blocks[key]
                return Correlation(full=block, self_term=x, self_weight=self.self_weight, rcond=self.rcond,
                                   _eigh=eigh)
            return Correlation(full=self.full[index][:, index], self_term=x, self_weight=self.self_weight,
                               rcond=self.rcond)
        assert self.factor is not None and self.residual is not None
        x = None if self.self_term is None else self.self_term[:, index]
        return Correlation(factor=self.factor[index], residual=self.residual[index], self_term=x,
                           self_weight=self.self_weight, self_mean=self.self_mean)

    # -- the information-matched channel --------------------------------------------------
    def _basis(self) -> tuple[Tensor, Tensor, float]:
        """The full ``R``'s kept eigenspace (module docstring, "Rank-deficient R"): ``B [d, r] =
        Q Lambda^1/2`` (``R ~ B B'``), ``Q Lambda^-1/2 [d, r]`` (``w -> g = Lambda^-1/2 Q' w``, so
        ``|g|^2 = w' R^+ w``) and ``lambda_max``. The one rank rule for ``R``: eigenvalues above
        ``max(rcond, d eps) * lambda_max`` kept (:data:`RCOND`). ``R``'s eigendecomposition is
        computed once and shared by :meth:`RecordCorrelation.with_rcond`'s copies."""
        assert self.full is not None
        if self._eigh.get("full") is not self.full:
            self._eigh.clear()
            self._root = None
            R = self.full.to(torch.float64)
            _check_finite(R, "the full correlation")
            self._eigh.update(full=self.full, eigh=None if self.sandwich is not None else
                              torch.linalg.eigh(0.5 * (R + R.T)))
        key = ("basis", self.rcond, self.sandwich is not None)
        if key not in self._eigh and self.sandwich is not None:
            # the estimator's factor (SandwichFactor): the gradient covariance's rank rule, no
            # eigendecomposition of R (whose round-off through H^-1 reaches 5e-13 lambda_max)
            keep = self.sandwich.keep(self.rcond)
            Bk = self.sandwich.root[:, keep].to(torch.float64)
            top = float(torch.linalg.eigvalsh(Bk.T @ Bk)[-1]) if Bk.shape[1] else 0.0
            self._eigh[key] = (Bk, self.sandwich.left[:, keep].to(torch.float64), top)
        if key not in self._eigh:
            evals, evecs = self._eigh["eigh"]
            top = max(float(evals[-1]), 0.0) if evals.numel() else 0.0
            tol = max(self.rcond, evals.numel() * torch.finfo(torch.float64).eps) * top
            keep = evals > tol if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
            lam, Q = evals[keep], evecs[:, keep]
            self._eigh[key] = (Q * lam.sqrt(), Q * lam.rsqrt(), top)
        return self._eigh[key]

    def _channel(self, kappa: Tensor) -> dict:
        """The full form's channel at ``kappa [d]`` in ``R``'s kept eigenspace (method.md section
        3, "Correlated coordinates"; module docstring): ``U = B z``, ``z ~ N(0, I_r)``; coordinates
        with ``kappa = 1`` (set ``E``) observe ``B_E z`` exactly, so ``z`` is known along the row
        space of ``B_E`` (orthonormal ``VE [r, k]``, from the SVD of ``B_E``; its numerical rank by
        float64 round-off, singular values above ``EXACT_BLOCK_RTOL max(|E|, r) eps sqrt(lambda_max)``); the rest
        (``0 < kappa < 1``, set ``N``) add the information ``F = C' W C`` on the complement
        ``Vp [r, r - k]`` (``C = B_N Vp``, ``W = kappa / (1 - kappa)``). Kept for one ``kappa``
        at a time (the scoring runs one scheme's forms together)."""
        key = (self.rcond, kappa.detach().cpu().numpy().tobytes())
        if self._eigh.get("channel_key") == key:
            return self._eigh["channel"]
        bad = (~torch.isfinite(kappa)).nonzero().flatten()
        if bad.numel():  # a NaN is neither exact nor noisy: it would read as kappa = 0, silently low (rv45)
            raise ValueError(f"kappa is not finite at coordinate(s) {bad[:8].tolist()}"
                             f"{' ...' if bad.numel() > 8 else ''} of {kappa.numel()}: the full correlated form "
                             "needs every weight's surviving information in [0, 1]")
        B, _, top = self._basis()
        r = B.shape[1]
        exact = kappa >= 1.0
        noisy = (kappa > 0) & ~exact
        BE = B[exact]
        if bool(exact.all()) and r:
            # every weight exact (the unquantized form): B's SVD is Q Lambda^1/2 itself, every
            # singular value sqrt(lambda) far above round-off (R's rule)
            VE, Vp = torch.eye(r, dtype=B.dtype), B.new_zeros(r, 0)
            from_exact = self._basis()[1]                            # Q Lambda^-1/2
            exact_sv = None
        elif BE.shape[0] and r:
            Us, S, Vh = torch.linalg.svd(BE, full_matrices=True)
            # The exactly observed block's numerical rank, by float64 round-off of B: singular
            # values above EXACT_BLOCK_RTOL x max(|E|, r) eps sqrt(lambda_max). Every combination
            # above it counts, however small its variance, as the model R ~ B B' says (the
            # channel reference in 50 digits agreed on pl44's MLP; a rule at R's own rank rule
            # or round-off dropped exact information, read 16-34% below it and fell when a
            # weight's kappa reached 1; cf45). Below it: a softmax's bias sum, identically 0,
            # read s = 6.8e-15 sqrt(lambda_max) through H^-1 (2.2x the bare rule); counted, it
            # moved one model's figure 7e-6 between two parametrizations of its output.
            tol = EXACT_BLOCK_RTOL * max(BE.shape[0], r) * torch.finfo(torch.float64).eps * math.sqrt(max(top, 0.0))
            k = int((S > tol).sum())
            VE, Vp = Vh[:k].T, Vh[k:].T
            # V_E' z from Y_E = B_E z: S^-1 U' Y_E over the kept singular directions
            from_exact = Us[:, :k] / S[:k]
            exact_sv = S[:k]  # the counting singular values (exact_span)
        else:
            VE, Vp = B.new_zeros(r, 0), torch.eye(r, dtype=B.dtype)
            from_exact = B.new_zeros(BE.shape[0], 0)
            exact_sv = B.new_zeros(0)
        kn = kappa[noisy]
        C = B[noisy] @ Vp                                            # [|N|, r - k]
        W = kn / (1.0 - kn)
        n = Vp.shape[1]
        if W.numel() and float(W.max()) > CHANNEL_CHOLESKY_MAX_W:
            # I + F = A'A, A = [A1; I] = [Q1; Q2] R (QR, A1 = W^1/2 C): Q2 = R^-1, (I + F)^-1 = Q2 Q2',
            # Q1 = A1 R^-1; the form's F part (Q2'h)'(Q1'A1 h) and beta_N = W^1/2 Q1 Q2'h, each to
            # ~eps W^1/2 (_terms, _full_coefficients).
            # Forming C'WC rounds the unit part of F's small directions by eps W: with a kappa
            # within 1e-12 of 1 (bf16 / fp16 casts of weights near 0 reach 1 - 4e-16) s2 read
            # 1e-4 to 10% off either way against an 80-digit reference (rv45)
            Q = torch.linalg.qr(torch.cat([W.sqrt().unsqueeze(-1) * C, torch.eye(n, dtype=B.dtype)]))[0]
            solver = dict(Q1=Q[: C.shape[0]], Q2=Q[C.shape[0]:])
        else:
            P = torch.eye(n, dtype=B.dtype) + C.T @ (W.unsqueeze(-1) * C)  # I + F >= I
            solver = dict(chol=torch.linalg.cholesky(0.5 * (P + P.T)))
        ch = dict(exact=exact, noisy=noisy, VE=VE, Vp=Vp, C=C, W=W, from_exact=from_exact,
                  B_N=B[noisy], exact_sv=exact_sv, **solver)
        self._eigh.update(channel_key=key, channel=ch)
        return ch

    def exact_span(self, kappa: Tensor) -> ExactSpan | None:
        """How far the weights left exact (``kappa = 1``) fix the full form's ``z`` at ``kappa [d]``
        (:meth:`_channel`; method.md section 3, "Correlated coordinates"): ``None`` for the factor
        model, or when no weight is quantized (every ``kappa = 1``) or none is exact. Where the
        exact block ``B_E`` spans ``R``'s whole kept eigenspace (:attr:`ExactSpan.determined`),
        the float weights determine the quantized ones through ``R`` and the form equals the
        unquantized ``w'R^+w`` whatever the quantized weights' ``kappa``.

        Raises:
            ValueError: ``kappa`` not finite (:meth:`_channel`).
        """
        if self.full is None:
            return None
        k = kappa.to(torch.float64).clamp(0.0, 1.0)
        exact = k >= 1.0
        if bool(exact.all()) or not bool(exact.any()):
            return None
        B, _, top = self._basis()
        ch = self._channel(k)
        sv = ch["exact_sv"]
        rule = math.sqrt(max(self.rcond, B.shape[0] * torch.finfo(torch.float64).eps))
        smallest = float(sv[-1]) / math.sqrt(top) if sv is not None and sv.numel() and top > 0 else math.nan
        return ExactSpan(d=B.shape[0], rank=B.shape[1], exact=int(exact.sum()), exact_rank=ch["VE"].shape[1],
                         smallest=smallest, rule=rule)

    def _terms(self, w: Tensor, kappa: Tensor) -> tuple[Tensor, Tensor]:
        """``(left, right)``, both ``[R, r]``, with the full form's bilinear form of two rows
        ``q(w_i, x_j) = left_i . right_j`` (symmetric; ``q(w, w) = s2``): ``left = [V_E'g, Vp'g]``,
        ``right = [V_E'g, (I + F)^-1 F Vp'g]`` for ``g = Lambda^-1/2 Q' w`` (:meth:`_channel`):
        ``s2 = |g_E|^2 + h'(I + F)^-1 F h``, no cutoff on the channel matrix."""
        _, Winv, _ = self._basis()
        ch = self._channel(kappa)
        g = w @ Winv
        gE, h = g @ ch["VE"], g @ ch["Vp"]
        if "Q1" in ch:    # h'(I + F)^-1 F h = (R^-T h)'(R^-T A1'A1 h) = (Q2'h)'(Q1'A1 h), A1 = W^1/2 C
            a1h = (h @ ch["C"].T) * ch["W"].sqrt()
            return torch.cat([gE, h @ ch["Q2"]], -1), torch.cat([gE, a1h @ ch["Q1"]], -1)
        Fh = ((h @ ch["C"].T) * ch["W"]) @ ch["C"]                     # [R, r - k] = F h
        y = torch.cholesky_solve(Fh.T, ch["chol"]).T                  # (I + F)^-1 F h: no cancellation
        return torch.cat([gE, h], -1), torch.cat([gE, y], -1)

    def _solve(self, u: Tensor, kappa: Tensor) -> Tensor:
        """``M^-1 u'`` as ``[R, d]`` for ``u [R, d]`` of the factor model, ``M = I - K + K^1/2 R K^1/2``
        (the full form goes through :meth:`_terms`)."""
        return self._solve_parts(u, kappa)[0]

    def _solve_parts(self, u: Tensor, kappa: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """:meth:`_solve`'s ``x = M^-1 u'`` ``[R, d]``, ``t = C^-1 A'D^-1 u`` ``[R, k]`` (the first
        pass's core solution, ``A'x`` at the exact solution; the refinement's sum with the second
        pass's carries ``A'x``'s cancellation: 2e7 times the form on a column scaled by 1e6) and
        ``M``'s ``D [d]``, ``A [d, k]`` and the core's solve: what :meth:`_variational` reads."""
        assert self.factor is not None
        D, A, Dinv_A, solve_core = self._woodbury(kappa)

        def woodbury(r: Tensor) -> tuple[Tensor, Tensor]:
            Dinv_r = r / D
            z = solve_core(Dinv_r @ A)
            return Dinv_r - z @ Dinv_A.T, z

        x, z = woodbury(u)
        # One step of iterative refinement: with a small remainder D (the in-sample form's
        # shrinkage 1e-6) the Woodbury difference cancels ~1/D of its digits; the residual's
        # correction restores them (the same records in two DDP worlds read 2e-8 apart before).
        dx, _ = woodbury(u - (x * D + (x @ A) @ A.T))
        return x + dx, z, D, A, solve_core

    def _certified_solve(self, v: Tensor, kappa: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, vv)``: ``y = M^-1 v'`` ``[R, d]`` (:meth:`_solve`) and ``v'M^-1v`` ``[R]``, NaN
        where it cannot be had to :data:`FACTOR_FORM_RTOL` (the leave-one-out solves of the
        in-sample form's own rows), from :meth:`_variational` (``FACTOR_FORM_VARIATIONAL``; else
        ``v'y``, checked against its bracket)."""
        y, t, D, A, solve_core = self._solve_parts(v, kappa)
        q, lower, upper = self._variational(v, t, D, A, solve_core)
        q = self._certified(q if FACTOR_FORM_VARIATIONAL else (v * y).sum(-1), lower, upper)
        bad = q.isnan()
        if FACTOR_FORM_RESIDUAL_BOUND and A.shape[0] <= A.shape[1] and bool(bad.any()):
            # a narrow block (d <= k, a layer's block of the in-sample model): the rows the
            # Woodbury path cannot certify (an ill-conditioned core over a well-conditioned M) from
            # the d x d matrix itself, its solution with them (cf57)
            assert self.factor is not None
            kh = kappa.sqrt()
            w = torch.where(kh > 0, v[bad] / kh.clamp_min(1e-300), torch.zeros_like(v[bad]))
            narrow = self._narrow_quadratic(w, kappa, D, self.factor.to(torch.float64), solution=True)
            if narrow is not None:
                x, qn = narrow
                q[bad] = qn
                y[bad] = torch.where(qn.isnan().unsqueeze(-1), y[bad], x)
        return y, q

    @staticmethod
    def _certified(value: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        """``[R]`` ``value`` (a computed ``u'M^-1u``) where ``[lower, upper]``, which holds the exact
        form (rounding included), holds ``value`` and is narrower than :data:`FACTOR_FORM_RTOL` of
        it; NaN elsewhere (method.md section 3, *Each form's digits*): a form that cannot be
        had in float64 reads NaN, which the report names, not a value off by orders. A ``u = 0``
        row (``upper`` 0) is exact at 0."""
        if not FACTOR_FORM_CHECK:
            return value
        ok = (value > 0) & (lower <= value) & (value <= upper) & (upper - lower <= FACTOR_FORM_RTOL * value)
        return torch.where(ok | ((upper == 0) & (value == 0)), value, torch.full_like(value, math.nan))

    @staticmethod
    def _variational(u: Tensor, t: Tensor, D: Tensor, A: Tensor,
                     solve_core: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``([R], [R], [R])``: ``u'M^-1u`` of the factor model ``M = diag(D) + AA'`` (``u [R, d]``,
        ``D [d]``, ``A [d, k]``) as the minimum of its variational form, ``|D^-1/2 (u - A t)|^2 +
        |t|^2``, at the core's solution ``t [R, k]`` (``C^-1 A'D^-1u``, ``C = I + A'D^-1A``,
        ``solve_core`` its solve), and a bracket ``[lower, upper]`` of the exact form.

        Why: a sum of non-negative terms, no difference of large ones; its error is second order in
        ``t``'s, ``(t - t*)'C(t - t*) = rho'C^-1 rho`` with the core's residual ``rho = A'D^-1(u -
        At) - t`` (``[R, k]``), bounded above by its own variational form (three more products),
        which gives the bracket's lower end, less the rounding
        of ``rho`` (``eps^2 (d + k)`` times the terms' scale ``|D^-1/2 (|u| + |At|)|^2``); the upper
        end is the value plus its own rounding (``eps sqrt(k + 1)`` times ``sqrt(value x scale)``:
        ``eps sqrt(s / q)`` relative, the form's conditioning given ``u`` in float64). Against an
        80-digit reference (64 records, rank 4 plus noise in 40 coordinates, a column scaled by
        1e2-1e9: ``s / q`` up to 5e17) it read within 1e-14 where Woodbury's difference read 0 or
        -1e10 times the form and the stationary form up to 0.8 off (docs/benchmarks.md, "cf56")."""
        At = t @ A.T
        x = (u - At) / D
        q = (x.square() * D).sum(-1) + t.square().sum(-1)
        rho = x @ A - t
        # rho'C^-1 rho = min_b |rho - B'b|^2 + |b|^2 (C = I + B'B, B = D^-1/2 A): any b bounds it from
        # above, b = B C^-1 rho attains it. Not rho'(solve of rho) itself: a solve of a C whose
        # condition passed float64's (1e22, 8 columns 1e8 times the rest) read ~0 and certified a
        # form 6e4 times the truth; a bad solve here only widens the bracket (to |rho|^2 at worst)
        eps = torch.finfo(torch.float64).eps
        d, k = A.shape

        def gap_of(rho: Tensor) -> Tensor:
            As = solve_core(rho) @ A.T                                     # [R, d] A C^-1 rho
            BtBs = (As / D) @ A                                            # [R, k] B'B C^-1 rho
            off = (rho - BtBs).norm(dim=-1) + eps * math.sqrt(d + k) * (rho.abs() + BtBs.abs()).norm(dim=-1)
            return off.square() + (As.square() / D).sum(-1) * (1.0 + 4.0 * eps * math.sqrt(d))

        gap = gap_of(rho)
        scale = ((u.abs() + At.abs()).square() / D).sum(-1) + t.square().sum(-1)
        up = 4.0 * eps * math.sqrt(k + 1) * (q.clamp_min(0.0) * scale).sqrt()
        lower, upper = q - gap - 4.0 * eps * eps * (d + k) * scale - up, q + up
        redo = ~(upper - lower <= FACTOR_FORM_RTOL * q) & (4.0 * up > FACTOR_FORM_RTOL * q) & (q > 0)
        if not (FACTOR_FORM_COMPENSATED and FACTOR_FORM_CHECK and bool(redo.any())):
            return q, lower, upper
        # the rows whose bracket the value's rounding widens past FACTOR_FORM_RTOL (s / q past ~1e20:
        # u - At cancels): u - At again, compensated (_compensated_residual), to ~eps of itself plus
        # ((k + 1) eps)^2 of its terms, so that the value's rounding is ~eps (d + k) of it (cf57)
        ur, tr = u[redo], t[redo]
        xr = Correlation._compensated_residual(ur, tr, A) / D
        qr = (xr.square() * D).sum(-1) + tr.square().sum(-1)
        sr = ((ur.abs() + tr.abs() @ A.abs().T).square() / D).sum(-1) + tr.square().sum(-1)
        g2 = ((k + 1) * eps) ** 2
        upr = 4.0 * eps * math.sqrt(d + k + 1) * qr + 2.0 * g2 * (qr * sr).sqrt() + g2 * g2 * sr
        q, lower, upper = q.clone(), lower.clone(), upper.clone()
        q[redo] = qr
        lower[redo] = qr - gap_of(xr @ A - tr) - 4.0 * eps * eps * (d + k) * sr - upr
        upper[redo] = qr + upr
        return q, lower, upper

    @staticmethod
    def _compensated_residual(u: Tensor, t: Tensor, A: Tensor, low: Tensor | None = None,
                              pair: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``[R, d]`` ``u - t A'`` (``u [R, d]``, ``t [R, k]``, ``A [d, k]``) by Ogita, Rump and Oishi's
        ``Dot2`` (SIAM J. Sci. Comput. 26, 2005: error-free products by Dekker's split, sums by
        Knuth's TwoSum): within ``eps |result| + ((k + 1) eps)^2 (|u| + |t| |A|')`` of the exact
        value, as if computed in twice float64's precision (barring under- and overflow). ``k``
        passes of ``[R, d]`` element-wise work: read for the few rows whose form cancels past
        float64 (:meth:`_variational`, :meth:`_certified_coefficients`). ``low``: ``u``'s own low
        part (``u + low`` the value); ``pair``: the unrounded ``(high, low)`` instead of their sum."""
        Ah, Al = _split(A)
        th, tl = _split(-t)
        p, s = u.clone(), (torch.zeros_like(u) if low is None else low.clone())
        for a in range(A.shape[1]):
            b, bh, bl = -t[:, a:a + 1], th[:, a:a + 1], tl[:, a:a + 1]
            ah, al = Ah[:, a], Al[:, a]
            h = b * A[:, a]
            err = ((bh * ah - h) + bh * al + bl * ah) + bl * al     # TwoProduct: h + err = b a exactly
            pn = p + h
            z = pn - p
            s = s + (((p - (pn - z)) + (h - z)) + err)              # TwoSum: pn + . = p + h exactly
            p = pn
        return (p, s) if pair else p + s

    @staticmethod
    def _compensated_matrix_residual(u: Tensor, x: Tensor, D: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """``([R, d], [R, d])``: ``r = u - Mx`` for ``M = diag(D) + AA'`` (``x [R, d]``) in twice float64's
        precision (:meth:`_compensated_residual` for ``A'x``, kept as a (high, low) pair, then for
        ``u - Dx - A(A'x)``) and a bound of its error, ``eps |r| + ((2k + 2) eps)^2 (|u| + D|x| +
        |A||A'x|) + (d eps)^2 |A||A|'|x|`` (Dot2's, twice). ``d + k`` passes of element-wise work."""
        eps = torch.finfo(torch.float64).eps
        d, k = A.shape
        yh, yl = Correlation._compensated_residual(torch.zeros(x.shape[0], k, dtype=x.dtype), x, A.T, pair=True)
        h = -D * x                                                   # -(A'x) = yh + yl above
        Dh, Dl = _split(-D)
        xh, xl = _split(x)
        err = ((Dh * xh - h) + Dh * xl + Dl * xh) + Dl * xl
        p = u + h
        z = p - u
        low = ((u - (p - z)) + (h - z)) + err
        r = Correlation._compensated_residual(p, -torch.cat([yh, yl], -1), torch.cat([A, A], -1), low=low)
        assert isinstance(r, Tensor)
        Aabs = A.abs()
        bound = (eps * r.abs() + ((2 * k + 2) * eps) ** 2 * (u.abs() + D * x.abs() + (yh.abs() + yl.abs()) @ Aabs.T)
                 + ((d + 1) * eps) ** 2 * (x.abs() @ Aabs) @ Aabs.T)
        return r, bound

    def _woodbury(self, kappa: Tensor) -> tuple[Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """The factor model's channel matrix ``M = diag(D) + A A'`` at ``kappa [d]`` for Woodbury
        solves: ``D [d]`` (floored at ``RCOND``), ``A = K^1/2 L [d, k]``, ``D^-1 A [d, k]`` and
        ``y [R, k] -> (C^-1 y')'`` with the core ``C = I + A' D^-1 A`` factored once
        (``M^-1 r = D^-1 r - D^-1 A C^-1 A' D^-1 r``)."""
        assert self.factor is not None and self.residual is not None
        kh = kappa.sqrt()
        D = (1.0 - kappa + kappa * self.residual).clamp_min(RCOND)
        A = kh.unsqueeze(-1) * self.factor.to(torch.float64)
        Dinv_A = A / D.unsqueeze(-1)
        core = torch.eye(A.shape[1], dtype=A.dtype) + A.T @ Dinv_A
        chol, info = torch.linalg.cholesky_ex(core)

        def solve_core(y: Tensor) -> Tensor:
            if int(info) == 0:
                return torch.cholesky_solve(y.T, chol).T
            # C >= I, singular only by its rounding (loadings 1e13 over remainders 1e-9): an LU
            # solve raised LinAlgError there; a least-squares solution is some t, which the
            # variational forms' brackets certify or read NaN (cf57)
            sol, bad = torch.linalg.solve_ex(core, y.T)
            return (sol if int(bad) == 0 else torch.linalg.lstsq(core, y.T).solution).T

        return D, A, Dinv_A, solve_core

    def quadratic(self, influence: Tensor, kappa: Tensor | None = None) -> Tensor:
        """``[R]`` ``s2 = u' M^+ u`` (``kappa [d]``; ``None``: unquantized, ``w' R^+ w``).

        The Gaussian form of the first-order leakage is ``sqrt(2/pi) sqrt(s2) / (2 sqrt n)``.
        """
        w = influence.to(torch.float64)
        k = torch.ones(w.shape[1], dtype=torch.float64) if kappa is None else kappa.to(torch.float64).clamp(0.0, 1.0)
        if self.self_term is not None:
            return self._self_quadratic(w, k)[1]
        if self.factor is not None:
            return self._factor_quadratic(w, k).clamp_min(0.0)
        left, right = self._terms(w, k)
        return (left * right).sum(-1).clamp_min(0.0)

    def _self_quadratic(self, w: Tensor, kappa: Tensor) -> tuple[Tensor, Tensor]:
        """``([R], [R])``: ``u' M^+ u`` with the shared ``full`` and with each record's own
        ``full - b x x'`` (Sherman-Morrison; class docstring). One solve of the stacked
        ``[u; v]``. Raises ValueError where ``w``'s rows are not the self term's."""
        assert self.self_term is not None and self.self_weight is not None
        x = self.self_term.to(torch.float64)
        if x.shape != w.shape:
            raise ValueError(f"the per-record self term has shape {tuple(x.shape)}, the influences "
                             f"{tuple(w.shape)}: its rows must be the stored records")
        b = self.self_weight.to(torch.float64)
        if self.self_mean:
            return self._in_sample_loo_quadratic(w, x, b, kappa)
        R = w.shape[0]
        left, right = self._terms(torch.cat([w, x]), kappa)
        q0 = (left[:R] * right[:R]).sum(-1).clamp_min(0.0)
        uv, vv = (left[:R] * right[R:]).sum(-1), (left[R:] * right[R:]).sum(-1)
        # 1 - b v'M^+v > 0 while the record's own matrix stays positive definite along v (a
        # downdate b > 0 of a record whose term is in the shared one); floored against rounding
        q = q0 + b * uv.square() / (1.0 - b * vv).clamp_min(1e-12)
        return q0, q.clamp_min(0.0)

    def _in_sample_loo_quadratic(self, w: Tensor, x: Tensor, b: Tensor, kappa: Tensor) -> tuple[Tensor, Tensor]:
        """``([R], [R])``: the shared in-sample form ``q0 = u'M^+u`` and each record's form with
        its own row taken out and the inverse's bias removed (class docstring, ``self_mean``;
        :meth:`RecordCorrelation.in_sample` gives the derivation). One ``[R, d]`` solve
        ``y = M^+v`` of the records' own rows ``v = K^1/2 x``.

        * own row out (Sherman-Morrison, exact): ``q_loo = q0 + b (u'y)^2 / (1 - b v'y)``, the
          leverage ``b v'y`` capped at ``IN_SAMPLE_LOO_LEVERAGE_CAP``;
        * the others' matrix inverted reads high by ``E[dM M^-1 dM]`` (``dM = K^1/2 (S - E S)
          K^1/2``, second order), whose mean over the records relative to the mean form is
          ``beta = b mean_j[(v_j'y_j) (v_j'y_j - y_j'(I - K)y_j)] / mean_j v_j'y_j`` (the
          records' own fourth moments; ``E[q^2] / (R E[q])`` unquantized, ``~3 d / R`` for rows
          with a normal per-record scale, ``kappa^2`` times that on a uniform ``kappa``): every
          ``q_loo`` is divided by ``1 + beta``."""
        q0, q_loo, beta, _ = self._in_sample_loo_parts(w, x, b, kappa)
        return q0, q_loo / (1.0 + beta)

    def _in_sample_loo_parts(self, w: Tensor, x: Tensor, b: Tensor, kappa: Tensor) -> tuple[Tensor, Tensor, float, Tensor]:
        """:meth:`_in_sample_loo_quadratic`'s ``q0 [R]``, ``q_loo [R]`` (own row out, before the
        common divisor; monotone in every ``kappa_j`` where the scored rows are the stored ones
        times a scalar: ``q0 / (1 - h)``, both channel forms), ``beta`` and the own rows' forms
        ``vv = v'M^-1v [R]`` (certified, monotone in every ``kappa_j``)."""
        kh = kappa.sqrt()
        u, v = w * kh, x * kh
        q0 = (self._factor_quadratic(w, kappa) if self.factor is not None else
              (u * self._solve(u, kappa)).sum(-1)).clamp_min(0.0)
        y, vv = self._certified_solve(v, kappa)
        vv = vv.clamp_min(0.0)  # (NaN where not certified: every form of the scheme then NaN)
        uv = (u * y).sum(-1)
        # alignment of the scored row with the record's own row (1 where they are proportional,
        # as the library's influences are: the scored ones are the fitted ones times a scalar)
        g = torch.where((q0 > 0) & (vv > 0), uv.square() / (q0 * vv).clamp_min(1e-300), torch.zeros_like(q0)).clamp(0.0, 1.0)
        h = (b * vv).clamp(0.0, IN_SAMPLE_LOO_LEVERAGE_CAP)
        q_loo = q0 * (1.0 + g * h / (1.0 - h))
        return q0, q_loo, self._inverse_bias(vv, y, h, kappa), vv

    def quadratic_ends(self, influence: Tensor, k_lo: Tensor, k_hi: Tensor) -> tuple[Tensor, Tensor]:
        """``([R], [R])`` bounds of :meth:`quadratic` over every ``kappa`` with ``k_lo <= kappa <=
        k_hi`` (``[d]`` each, coordinate-wise; the interval's box, method.md section 3, "Correlated
        headline"). A form monotone in every ``kappa_j`` (the channel forms, full or factor, and the
        exact self term of proportional rows) gives its values at the two corners. The in-sample
        leave-one-out form is not: ``q_loo / (1 + beta)`` with ``q_loo`` monotone and the common
        divisor ``1 + beta`` not monotone (it rises with most ``kappa``s, falls with those of
        low-leverage records), so each end pairs ``q_loo`` at its own corner with the
        extreme divisor over the whole box (the largest ``beta`` for the low end;
        :meth:`_inverse_bias_range`, ``CORRELATED_BETA_BOUNDS``; the corners' betas alone, taken formerly,
        a mixed corner can pass beyond), wider than the corners' values by ``beta``'s range. A box of one
        point (``k_lo == k_hi``) gives the form there at both ends (``CORRELATED_BETA_CAP``)."""
        w = influence.to(torch.float64)
        lo, hi = (k.to(torch.float64).clamp(0.0, 1.0) for k in (k_lo, k_hi))
        if CORRELATED_BETA_CAP and torch.equal(lo, hi):
            # a box of one point (no coarse weight's kappa moves in it: cells far wider than the sd):
            # the form there, whose divisor is known; the relaxation below is not tight on it (iv58)
            q = self.quadratic(w, lo)
            return q, q
        if not (self.self_mean and self.self_term is not None and self.self_weight is not None):
            return self.quadratic(w, lo), self.quadratic(w, hi)
        x = self.self_term.to(torch.float64)
        if x.shape != w.shape:
            raise ValueError(f"the per-record self term has shape {tuple(x.shape)}, the influences "
                             f"{tuple(w.shape)}: its rows must be the stored records")
        b = self.self_weight.to(torch.float64)
        _, q_lo, beta_lo, vv_lo = self._in_sample_loo_parts(w, x, b, lo)
        _, q_hi, beta_hi, vv_hi = self._in_sample_loo_parts(w, x, b, hi)
        if not CORRELATED_BETA_BOUNDS:
            return q_lo / (1.0 + max(beta_lo, beta_hi)), q_hi / (1.0 + min(beta_lo, beta_hi))
        beta_min, beta_max = self._inverse_bias_range(vv_lo, vv_hi, b)
        beta_min, beta_max = min(beta_min, beta_lo, beta_hi), max(beta_max, beta_lo, beta_hi)
        if math.isnan(beta_lo) or math.isnan(beta_hi):  # (min / max would drop a NaN by its place)
            beta_min = beta_max = math.nan
        return q_lo / (1.0 + beta_max), q_hi / (1.0 + beta_min)

    def _inverse_bias_range(self, vv_lo: Tensor, vv_hi: Tensor, b: Tensor) -> tuple[float, float]:
        """``(beta_min, beta_max)``: bounds of :meth:`_inverse_bias` over the ``kappa`` box whose
        corners give the own rows' forms ``vv_lo``, ``vv_hi`` (``[R]``; ``b [R]`` the self weights).
        ``beta`` is increasing in ``a_K = sum(h inside) / sum(vv)``, which is not monotone in the
        ``kappa``s (raising those of records with ``vv`` below ``a_K / 2b`` lowers it). With
        ``T = K^-1 - I`` and ``z = (T + R)^-1 x``: each record's ``vv = x'z`` is monotone (in
        ``[vv_lo, vv_hi]``) and ``inside = z'Rz`` lies in ``[vv^2 / vv_1, vv]`` (``vv_1 = x'R^-1x``,
        ``kappa = 1``; Cauchy-Schwarz on ``|G xi|^2``, ``G = R^1/2 (T + R)^-1 R^1/2 <= I``, ``xi =
        R^-1/2 x``), ``h = min(b vv, cap)``: ``a_K``'s extremes over every record's ``vv`` in its own
        range independently (a relaxation: the records' forms move together) by Dinkelbach's
        bisection on the ratio, ``lambda`` where ``sum_j extreme_v (phi_j(v) - lambda v) = 0``
        (each ``phi_j - lambda v`` piecewise convex: its extremes among the ends, the kink and the
        pieces' stationary points)."""
        exact, approx1 = self._loo_cache["unquantized"]
        if not approx1 > 0:  # (beta is exact at every kappa; NaN stays NaN)
            return exact, exact
        vv1 = self._loo_cache["vv1"]
        cap = IN_SAMPLE_LOO_LEVERAGE_CAP
        lo, hi = torch.minimum(vv_lo, vv_hi), torch.maximum(vv_lo, vv_hi)
        if not (bool(hi.sum() > 0) and bool(torch.isfinite(hi).all())):
            return (0.0, math.inf) if bool(torch.isfinite(hi).all()) else (math.nan, math.nan)
        c1 = torch.where(vv1 > 0, 1.0 / vv1.clamp_min(1e-300), torch.zeros_like(vv1))

        kink = torch.where(b > 0, cap / b.clamp_min(1e-300), hi)  # where h = b vv meets the cap

        def top(lam: float) -> float:
            # sum_j max_v (min(b v, cap) v - lam v) (h inside <= h vv): convex below the kink, linear
            # above it, so at an end or the kink. Without the cap (b v^2) the bound grew with b vv: on a
            # model whose every record sits at the cap (d / N = 1.31, b vv ~ 1e8) beta read 2e30 against
            # 3 at the corners, the low end 1e-11 of a saturated headline (iv58)
            if not CORRELATED_BETA_CAP:
                return float(torch.maximum(b * lo.square() - lam * lo, b * hi.square() - lam * hi).sum())
            vals = [(torch.minimum(b * v, torch.full_like(v, cap)) - lam) * v
                    for v in (lo, hi, torch.minimum(torch.maximum(kink, lo), hi))]
            return float(torch.stack(vals).max(0).values.sum())

        def low(lam: float) -> float:  # sum_j min_v (min(b v, cap) v^2 / vv_1 - lam v)
            cands = [lo, hi, kink, (lam / (3.0 * b.clamp_min(1e-300) * c1.clamp_min(1e-300))).sqrt(),
                     lam / (2.0 * cap * c1.clamp_min(1e-300))]
            vals = [(torch.minimum(b * v, torch.full_like(v, cap)) * v.square() * c1 - lam * v)
                    for v in (torch.minimum(torch.maximum(c, lo), hi) for c in cands)]
            return float(torch.stack(vals).min(0).values.sum())

        def root(f: Callable[[float], float], upper: float, upward: bool) -> float:
            a, z = 0.0, upper  # f decreasing, f(a) >= 0 >= f(z): the bracket's end on the safe side
            for _ in range(80):
                mid = 0.5 * (a + z)
                a, z = (mid, z) if f(mid) >= 0 else (a, mid)
            return z if upward else a
        peak = (torch.minimum(b * hi, torch.full_like(hi, cap)) if CORRELATED_BETA_CAP else b * hi) * hi
        crude = float(peak.sum() / lo.sum()) if bool(lo.sum() > 0) else math.inf
        a_max = root(top, crude, True) if math.isfinite(crude) else math.inf
        a_min = root(low, a_max if math.isfinite(a_max) else float(peak.sum() / hi.sum()), False)

        def beta(a: float) -> float:
            r = a / approx1
            return math.inf if math.isinf(r) else approx1 * r + (exact - approx1) * r * r
        return beta(a_min), beta(a_max)

    @staticmethod
    def _sorted_mean(t: Tensor) -> float:
        # summed in sorted order: the same records give the same figure to the last bit
        # whatever order they arrive in (processes, batch sizes), as the matrix itself
        return float(torch.sort(t).values.sum()) / max(t.numel(), 1)

    def _inverse_bias(self, vv: Tensor, y: Tensor, h: Tensor, kappa: Tensor) -> float:
        """``beta`` of :meth:`_in_sample_loo_quadratic` at ``kappa``. Unquantized: exactly the
        one that gives the own-row-out forms the in-sample forms' mean (the trace identity: the
        mean of ``w'S^+w`` is the rank, as the target's), ``beta_1``. At ``kappa``: the
        second-order estimate ``a_K = mean_j[h_j (v_j'y_j - y_j'(I - K)y_j)] / mean_j v_j'y_j``
        plus the higher orders ``beta_1 - a_1`` times ``(a_K / a_1)^2`` (on a uniform ``kappa``
        the second order scales as ``kappa^2``, the next even one as ``kappa^4``)."""
        mean = self._sorted_mean

        def second_order(vv_: Tensor, y_: Tensor, h_: Tensor, k_: Tensor) -> float:
            inside = (vv_ - ((1.0 - k_) * y_.square()).sum(-1)).clamp_min(0.0)
            m = mean(vv_)
            return mean(h_ * inside) / m if m > 0 else 0.0

        if "unquantized" not in self._loo_cache:
            assert self.self_term is not None and self.self_weight is not None
            x = self.self_term.to(torch.float64)
            ones = torch.ones(x.shape[1], dtype=torch.float64)
            if bool((kappa == 1).all()):
                y1, vv1 = y, vv
            else:
                y1, vv1 = self._certified_solve(x, ones)
            vv1 = vv1.clamp_min(0.0)
            h1 = (self.self_weight.to(torch.float64) * vv1).clamp(0.0, IN_SAMPLE_LOO_LEVERAGE_CAP)
            q_loo = vv1 / (1.0 - h1)
            exact = mean(q_loo) / max(mean(vv1), 1e-300) - 1.0
            approx = second_order(vv1, y1, h1, ones)
            target = self.trace_target
            if IN_SAMPLE_TRACE_CHECK and target is not None and not abs(mean(vv1) - target) <= IN_SAMPLE_TRACE_RTOL * target:
                exact = approx = math.nan  # the forms lost their digits: NaN, not a silent value
            self._loo_cache["unquantized"] = (exact, approx)
            self._loo_cache["vv1"] = vv1  # (quadratic_ends' bound on beta over a box)
        exact, approx1 = self._loo_cache["unquantized"]
        if bool((kappa == 1).all()) or approx1 <= 0:
            return exact
        # the second-order term at kappa, and the higher orders (exact - approx1 unquantized),
        # which scale as kappa^4 and more where the second order scales as kappa^2
        r = second_order(vv, y, h, kappa) / approx1
        return approx1 * r + (exact - approx1) * r * r

    def self_term_ratio(self, influence: Tensor, kappa: Tensor) -> Tensor:
        """``[R]`` ``sqrt(s2_own / s2_shared)`` of the Gaussian channel form at ``kappa``: the
        factor by which each record's own leave-one-out term (``self_term``) moves its score;
        all ones without a self term (or where ``s2_shared = 0``)."""
        if self.self_term is None:
            return torch.ones(influence.shape[0], dtype=torch.float64)
        q0, q = self._self_quadratic(influence.to(torch.float64), kappa.to(torch.float64).clamp(0.0, 1.0))
        return torch.where(q0 > 0, (q / q0.clamp_min(1e-300)).sqrt(), torch.ones_like(q0))

    def _factor_quadratic(self, w: Tensor, kappa: Tensor) -> Tensor:
        """``[R]`` ``u' M^-1 u`` (``u = K^1/2 w``) of the factor model without the refined ``[R, d]``
        solve: Woodbury's ``s - y' C^-1 y`` (``s = u' D^-1 u``, ``y = A' D^-1 u``,
        ``C = I + A' D^-1 A``), one ``[R, d] x [d, k]`` product where :meth:`_solve` with its
        refinement step makes six.

        The difference cancels ``s / q`` (>= 1) of its digits: measured against the refined solve
        its relative error stayed below ``eps sqrt(d) s / q`` (``eps`` float64's; d = 64-9,377,
        ``s / q`` 1-3e8), so rows where that bound exceeds ``QUADRATIC_TOLERANCE`` (records in
        the span of the factors with a small remainder: the in-sample form's 1e-6 gives
        ``s / q`` up to ~1e8; on a 2,610-weight Transformer every row) take
        :meth:`_corrected_quadratic`, which continues from the difference's own ``C^-1 y`` (the
        variational form, certified: four products where the stationary form took two; NaN where it
        cannot be had). The
        cross-fitted models' records read ``s / q`` ~2 (up to ~100).

        A block no wider than the rank (``d <= k``: a layer's block of the in-sample model, whose
        rank is up to the records') takes :meth:`_narrow_quadratic`, the ``d x d`` matrix itself;
        its rows that its bracket does not certify (a column 1e10 times the rest) are read here."""
        assert self.factor is not None and self.residual is not None
        D = (1.0 - kappa + kappa * self.residual).clamp_min(RCOND)
        L = self.factor.to(torch.float64)
        narrow = self._narrow_quadratic(w, kappa, D, L) if L.shape[0] <= L.shape[1] else None
        if narrow is not None and not bool(narrow.isnan().any()):
            return narrow
        D, A, Dinv_A, solve_core = self._woodbury(kappa)
        u = w * kappa.sqrt()
        Dinv_u = u / D
        y = Dinv_u @ A                                      # [R, k] = A' D^-1 u
        z = solve_core(y)
        s = torch.linalg.vecdot(u, Dinv_u)                  # [R] u' D^-1 u
        q = s - torch.linalg.vecdot(y, z)
        bound = torch.finfo(torch.float64).eps * math.sqrt(w.shape[1])
        bad = ~(q * QUADRATIC_TOLERANCE >= s * bound)       # NaN included
        if FACTOR_FORM_CHECK and FACTOR_FORM_WOODBURY_CHECK and not bool(bad.all()):
            # the difference's rows certified too (rv56s): s * eps sqrt(d) bounds its rounding only
            # where the core's solve is exact; an ill-conditioned core (two loadings 6.8e6 and 1e-9
            # remainders: C's condition ~1e22) passed that test 0.9% off. The Woodbury value kept
            # where the variational bracket (widened by that rounding) holds it, else the
            # variational value, else NaN
            good = ~bad
            every = bool(good.all())
            qg, ug, zg, sg = (q, u, z, s) if every else (q[good], u[good], z[good], s[good])
            qv, lower, upper = self._variational(ug, zg, D, A, solve_core)
            kept = self._certified(qg, lower - sg * bound, upper + sg * bound)
            kept = torch.where(kept.isnan(), self._certified(qv, lower, upper), kept)
            if every:
                q = kept
            else:
                q[good] = kept
        if bool(bad.all()):
            q = self._corrected_quadratic(u, Dinv_u, z, D, A, Dinv_A, solve_core)
        elif bool(bad.any()):
            q[bad] = self._corrected_quadratic(u[bad], Dinv_u[bad], z[bad], D, A, Dinv_A, solve_core)
        if narrow is not None:  # the narrow block's certified rows kept; the others from here (cf56)
            q = torch.where(narrow.isnan(), q, narrow)
        return q

    @classmethod
    def _corrected_quadratic(cls, u: Tensor, Dinv_u: Tensor, z: Tensor, D: Tensor, A: Tensor,
                             Dinv_A: Tensor, solve_core: Callable[[Tensor], Tensor]) -> Tensor:
        """``[R]`` the rows of :meth:`_factor_quadratic` whose Woodbury difference cancels: the
        variational form at the core's ``z`` (:meth:`_variational`; ``FACTOR_FORM_VARIATIONAL``), else the stationary form (:meth:`_stationary_quadratic`), either NaN where its
        bracket cannot certify it (:meth:`_certified`)."""
        q, lower, upper = cls._variational(u, z, D, A, solve_core)
        if not FACTOR_FORM_VARIATIONAL:
            q = cls._stationary_quadratic(u, Dinv_u, z, D, A, Dinv_A)
        return cls._certified(q, lower, upper)

    @staticmethod
    def _stationary_quadratic(u: Tensor, Dinv_u: Tensor, z: Tensor, D: Tensor, A: Tensor,
                              Dinv_A: Tensor) -> Tensor:
        """``[R]`` ``u' M^-1 u`` for rows whose Woodbury difference cancels (:meth:`_factor_quadratic`),
        from that difference's own first pass (``Dinv_u = D^-1 u``, ``z = C^-1 A' D^-1 u``, both
        ``[R, .]``): the solution ``x = D^-1 u - D^-1 A z`` (``[R, d]``, wrong in ``~eps s / q``
        of its size) and the stationary form ``2 u'x - x'M x = u'M^-1 u - e'M e`` (``e`` the
        error of ``x``), whose error is second order in ``e``: what one step of iterative
        refinement of ``x`` then ``u'x`` gives (the old path, :meth:`_solve`), without the
        refinement's second Woodbury pass. On a 2,610-weight Transformer's 26 in-sample forms both
        read within 1.7e-12 relative of two refinement steps (docs/benchmarks.md, "wf42"). Its
        error is second order in ``x``'s, which carries the core's error times ``D^-1 A``: past
        ``s / q ~ 1e11`` it lost digits where :meth:`_variational` kept them (the default
        since, ``FACTOR_FORM_VARIATIONAL``)."""
        x = Dinv_u - z @ Dinv_A.T
        return 2.0 * torch.linalg.vecdot(u, x) - torch.linalg.vecdot(x, x * D) - (x @ A).square().sum(-1)

    @staticmethod
    def _narrow_quadratic(w: Tensor, kappa: Tensor, D: Tensor, L: Tensor,
                          solution: bool = False) -> Tensor | tuple[Tensor, Tensor] | None:
        """``[R]`` ``u' M^-1 u`` through ``M = diag(D) + A A' [d, d]`` (``A = K^1/2 L``, ``L [d, k]``,
        ``d <= k``) by Cholesky with one refinement step; ``None`` where ``M`` is not numerically
        positive definite (the caller's Woodbury path then). Woodbury would factor the ``k x k``
        core and then, its difference cancelling ``s / q`` digits (``s / q`` ~1e5 on the in-sample
        form's 1e-6 remainder), redo every row by the refined ``[R, d]`` solve (formerly; now
        :meth:`_corrected_quadratic`): on a 2,610-weight Transformer (rank 387, 20 blocks of 2-768
        weights, 5 schemes) the forms took 6.4 s that way, 4.5 s with this one, the report's fields
        within 1.3e-12 relative (docs/benchmarks.md, "wf41"); a small block costs far less than the
        core's factorization, and at ``d = k`` the two cost about the same. ``solution``: ``(x [R, d],
        q [R])``, ``x = M^-1 u'`` with the form (:meth:`_certified_solve`)."""
        kh = kappa.sqrt()
        u = w * kh
        A = kh.unsqueeze(-1) * L
        M = torch.diag(D) + A @ A.T
        chol, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            return None
        # the explicit inverse, applied to the records as rows: each row's figure the same to the
        # last bit whatever the other rows (a triangular solve of the records as columns was not)
        Minv = torch.cholesky_inverse(chol)
        x = u @ Minv
        x = x + (u - x @ M) @ Minv  # refinement: M's condition reaches 1/D
        q = torch.linalg.vecdot(u, x)
        if not FACTOR_FORM_CHECK:
            return (x, q) if solution else q
        # bracketed (cf56): a Cholesky of an M whose condition is past float64 (a column 1e9 times
        # the rest) can succeed and return digits of nothing. Any x gives the lower bound 2u'x -
        # x'Mx and any t the upper |D^-1/2 (u - At)|^2 + |t|^2 (t = A'x here: no k x k core),
        # each with its rounding (eps sqrt(d + k) times its terms' absolute sum)
        t = x @ A
        At = t @ A.T
        xMx = (x * (x @ M)).sum(-1)
        upper = ((u - At).square() / D).sum(-1) + t.square().sum(-1)
        lower = 2.0 * q - xMx
        eps = 4.0 * torch.finfo(torch.float64).eps * math.sqrt(u.shape[1] + A.shape[1])
        scale = ((u.abs() + At.abs()).square() / D).sum(-1) + t.square().sum(-1)
        lo_round = eps * (2.0 * (u * x).abs().sum(-1) + (x.abs() * (x.abs() @ M.abs())).sum(-1))
        up_round = eps * (scale * upper.clamp_min(0.0)).sqrt()
        upper = upper + up_round
        if FACTOR_FORM_RESIDUAL_BOUND:
            upper = torch.minimum(upper, lower + lo_round + Correlation._residual_gap(u, x, M, D, A))
        q = Correlation._certified(q, lower - lo_round, upper)
        return (x, q) if solution else q

    @staticmethod
    def _residual_gap(u: Tensor, x: Tensor, M: Tensor, D: Tensor, A: Tensor) -> Tensor:
        """``[R]`` an upper bound of ``e'Me = r'M^-1 r`` (``r = u - Mx`` the residual of ``x [R, d]``,
        ``e`` its error), the gap between ``u'M^-1u`` and the stationary form ``2u'x - x'Mx``, for
        ``M = diag(D) + AA' [d, d]`` formed (a narrow block): ``(|r| + delta)^2 / lambda``, ``delta``
        the residual's rounding (``M``'s own included: ``(d + k) eps (|u| + (D + |A||A|')|x|)``),
        ``lambda`` a lower bound of ``M``'s smallest eigenvalue (its computed one less ``M``'s
        rounding and the eigensolver's, ``(d + k) eps`` times ``|M|_F``; never below ``min D``,
        ``M >= diag(D)`` exactly). Where ``M`` is well conditioned this is ``~eps^2`` of the form,
        while the variational bound at ``t = A'x`` cancels ``|u|`` against ``|At|`` (loadings 1e13
        over remainders 1e-2: ``M``'s condition 7e3, that bound 100 times the form)."""
        eps = torch.finfo(torch.float64).eps
        d, k = A.shape
        Aabs = A.abs()
        delta = 4.0 * (d + k + 2) * eps * (u.abs() + x.abs() * D + (x.abs() @ Aabs) @ Aabs.T)
        r = (u - x @ M).norm(dim=-1) + delta.norm(dim=-1)
        AA = Aabs @ Aabs.T
        floor = float(D.min())
        lam = float(torch.linalg.eigvalsh(M)[0]) - 4.0 * (d + k + 2) * eps * float(M.norm() + AA.norm())
        return r.square() / max(lam, floor)

    def inverse_diagonal(self) -> Tensor:
        """``[d]`` the diagonal of ``R^+`` (full, within its rank rule) or of the factor model's inverse (Woodbury):
        the variance inflation factors ``1 / (1 - R^2_j)`` of the coordinates, i.e. how far the
        variance of coordinate ``j`` given the others sits below its marginal variance."""
        if self.full is not None and self.sandwich is not None:
            # diag((B B')^+) of the factor: its left singular vectors over its singular values
            Us, S, _ = torch.linalg.svd(self._basis()[0], full_matrices=False)
            keep = S > EXACT_BLOCK_RTOL * max(Us.shape) * torch.finfo(torch.float64).eps * float(S.max() if S.numel() else 0.0)
            return (Us[:, keep] / S[keep]).square().sum(-1)
        if self.full is not None:
            return self._basis()[1].square().sum(-1)  # R's kept eigenspace, its one rank rule
        assert self.factor is not None and self.residual is not None
        L = self.factor.to(torch.float64)
        D = self.residual.to(torch.float64).clamp_min(RCOND)
        DL = L / D.unsqueeze(-1)
        core = torch.eye(L.shape[1], dtype=torch.float64) + L.T @ DL
        return 1.0 / D - (DL @ torch.linalg.inv(core) * DL).sum(-1)

    def coefficients(self, influence: Tensor, kappa: Tensor) -> Tensor:
        """``[R, d]`` weights ``c = K^-1/2 M^+ u`` of the cell means in the Monte Carlo form
        (0 for coordinates with ``kappa = 0``). The factor model's rows are certified like its forms
        (:meth:`_certified_coefficients`): a row whose solve cannot be had to
        :data:`FACTOR_FORM_RTOL` reads NaN (the Monte Carlo form then gives way to the certified
        Gaussian one), not weights off by orders."""
        w = influence.to(torch.float64)
        k = kappa.to(torch.float64).clamp(0.0, 1.0)
        if self.full is not None:
            return self._full_coefficients(w, k)
        kh = k.sqrt()
        sol = self._solve(w * kh, k)
        if FACTOR_FORM_CHECK:
            sol = self._certified_coefficients(w, sol, k)
        return torch.where(kh > 0, sol / kh.clamp_min(1e-300), torch.zeros_like(sol))

    def _certified_coefficients(self, w: Tensor, x: Tensor, kappa: Tensor) -> Tensor:
        """``x [R, d]`` (a computed ``M^-1 u``, ``u = K^1/2 w``, of the factor model) where its error
        in ``M``'s norm, ``e'Me = r'M^-1r`` (``r = u - Mx``), is within half :data:`FACTOR_FORM_RTOL` of
        ``sqrt(u'M^-1u)`` (the certified form, :meth:`_factor_quadratic`; the Monte Carlo form's
        statistic ``x'Y`` has the channel's covariance ``M``, so its scale moves by at most that
        share, as a form's bracket moves its figure by at most half its width); NaN rows elsewhere (the in-sample form of rows whose column 0 is 1e6 times
        the rest read its weights 7e-4 off in that norm, 1e9 times: 1.8e5, against an 80-digit
        reference). ``r'M^-1r`` is bounded by its variational form at the core's solution
        (:meth:`_variational`'s upper end) plus the residual's rounding ``delta``, ``2 r'M^-1r +
        2 delta'D^-1 delta``."""
        D, A, _, solve_core = self._woodbury(kappa)
        u = w * kappa.sqrt()
        r = u - (x * D + (x @ A) @ A.T)
        eps = torch.finfo(torch.float64).eps
        d, k = A.shape
        # (eps sqrt(n) per sum of n terms, as _variational's rounding terms: the worst case n eps
        # read NaN for a solve within 7e-7 of the reference at s / q ~ 1e12)
        delta = 4.0 * math.sqrt(d + k + 2) * eps * (u.abs() + x.abs() * D + (x.abs() @ A.abs()) @ A.abs().T)
        upper = self._variational(r, solve_core((r / D) @ A), D, A, solve_core)[2]
        err = 2.0 * upper + 2.0 * (delta.square() / D).sum(-1)
        q = self._factor_quadratic(w, kappa)
        tol = (0.5 * FACTOR_FORM_RTOL) ** 2 * q
        ok = (err <= tol) | ((q == 0) & (err == 0))
        redo = ~ok & (q > 0)
        if FACTOR_FORM_COMPENSATED and bool(redo.any()):
            # the residual's rounding bound (|A||A|'|x|: A'x cancels) failed them: r again in twice
            # float64's precision, its error bound ~eps^2 of those terms (cf57)
            rr, bound = self._compensated_matrix_residual(u[redo], x[redo], D, A)
            up_r = self._variational(rr, solve_core((rr / D) @ A), D, A, solve_core)[2]
            ok[redo] = 2.0 * up_r + 2.0 * (bound.square() / D).sum(-1) <= tol[redo]
        return torch.where(ok.unsqueeze(-1), x, torch.full_like(x, math.nan))

    def _regression(self, w: Tensor, kappa: Tensor) -> Tensor:
        """``[R, d]`` ``beta`` with ``E[w'R^+U | Y] = beta'Y`` for the channel at ``kappa [d]`` (full
        form; ``kappa = 1``: ``Y_j = U_j``; 0: not observed): the regression of the statistic on the
        observation, in ``R``'s kept eigenspace without a cutoff (:meth:`_full_coefficients`)."""
        k = kappa.to(torch.float64).clamp(0.0, 1.0)
        return self._full_coefficients(w.to(torch.float64), k) * k

    def _full_coefficients(self, w: Tensor, k: Tensor) -> Tensor:
        """:meth:`coefficients` of the full form in ``R``'s kept eigenspace (:meth:`_channel`):
        ``E[g'z | Y] = beta'Y`` with ``beta_N = W (C (I + F)^-1 h)`` on the noisy coordinates and,
        on the exact ones, ``V_E'z = S^-1 U'Y_E`` weighted by ``g_E - V_E' B_N' beta_N``;
        ``c = beta / kappa`` (the cell mean of a fine coordinate is ``~kappa Y``)."""
        _, Winv, _ = self._basis()
        ch = self._channel(k)
        g = w @ Winv
        gE, h = g @ ch["VE"], g @ ch["Vp"]
        if "Q1" in ch:                                                 # (I + F)^-1 = Q2 Q2'
            t2 = h @ ch["Q2"]
            beta_N = (t2 @ ch["Q1"].T) * ch["W"].sqrt()               # [R, |N|] W^1/2 Q1 Q2'h
        else:
            t = torch.cholesky_solve(h.T, ch["chol"]).T               # [R, r - k] (I + F)^-1 h
            beta_N = (t @ ch["C"].T) * ch["W"]                        # [R, |N|]
        gamma = gE - (beta_N @ ch["B_N"]) @ ch["VE"]                  # [R, k]
        c = torch.zeros_like(w)
        c[:, ch["noisy"]] = beta_N / k[ch["noisy"]]
        c[:, ch["exact"]] = gamma @ ch["from_exact"].T
        self._eigh["exact_part"] = gamma @ ch["VE"].T                 # [R, r] B_E' beta_E = V_E gamma
        return c

    def exact_part(self, influence: Tensor, kappa: Tensor) -> Tensor:
        """``[R, r]`` the exactly observed coordinates' share of the full form's statistic in ``R``'s
        kept eigenspace: ``sum_{j in E} beta_j U_j = a' z`` with ``a = B_E' beta_E = V_E gamma``
        (:meth:`_full_coefficients`). Their coefficients ``beta_E`` reach ``1 / s`` for exact
        weights whose combination has a small variance ``s^2``; ``a`` stays of the size of ``g``,
        so the Monte Carlo form adds this share through ``z`` (in float32 draws of ``U``,
        ``beta_E' U_E`` of two exact weights correlated 1 - 1e-14 loses its digits; summed so, the
        form read 1.001-1.004 of the Gaussian form where this reads within 0.1%)."""
        self._full_coefficients(influence.to(torch.float64), kappa.to(torch.float64).clamp(0.0, 1.0))
        return self._eigh.pop("exact_part")

    def _sample_full(self, num: int, generator: torch.Generator | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``([num, d], [num, r])``: draws of ``U ~ N(0, R)`` and their coordinates ``z`` in ``R``'s
        kept eigenspace (``U = B z`` plus the dropped directions' part; :meth:`_basis`), one root
        for both: the Monte Carlo form adds the exact coordinates' part through ``z``."""
        B = self._basis()[0]
        if self.sandwich is not None:  # U = B z exactly (the factor has no dropped part)
            z = torch.randn(num, B.shape[1], dtype=dtype, generator=generator)
            return z @ B.to(dtype).T, z
        evals, evecs = self._eigh["eigh"]
        if self._root is None:  # R's square root from the shared eigendecomposition, computed once
            self._root = evecs * evals.clamp_min(0.0).sqrt()
        # the kept columns of the root are B's (the same rule as :meth:`_basis`, per rule: the
        # eigendecomposition is shared with other rules' copies)
        key = ("root_keep", self.rcond)
        if key not in self._eigh:
            top = max(float(evals[-1]), 0.0) if evals.numel() else 0.0
            tol = max(self.rcond, evals.numel() * torch.finfo(torch.float64).eps) * top
            self._eigh[key] = evals > tol if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
        n = torch.randn(num, self._root.shape[1], dtype=dtype, generator=generator)
        return n @ self._root.to(dtype).T, n[:, self._eigh[key]]

    def sample(self, num: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> Tensor:
        """``[num, d]`` draws of ``U ~ N(0, R)`` (a singular ``R`` is fine), in ``dtype``."""
        if self.full is not None:
            return self._sample_full(num, generator, dtype)[0]
        assert self.factor is not None and self.residual is not None
        L = self.factor.to(dtype)
        z = torch.randn(num, L.shape[1], dtype=dtype, generator=generator)
        e = torch.randn(num, L.shape[0], dtype=dtype, generator=generator)
        return z @ L.T + e * self.residual.to(dtype).sqrt()


def gaussian_mean_abs(corr: Correlation, influence: Tensor, kappa: Tensor | None = None) -> Tensor:
    """``[R]`` Gaussian form ``E|S| = sqrt(2/pi) sqrt(u' M^+ u)`` (module docstring)."""
    return SQRT_2_OVER_PI * corr.quadratic(influence, kappa).sqrt()


def correlated_mc_mean_abs(
    corr: Correlation,
    influence: Tensor,
    kappa: Tensor,
    coarse_index: Tensor,
    coarse_stats: CellStatistics,
    mc_draws: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo ``E|sum_j c_j m_j|`` with jointly drawn cells (module docstring), and its
    standard error, both ``[R]``.

    Args:
        corr: correlation of the ``d`` coordinates; ``influence [R, d]``; ``kappa [d]`` (1 for
            unquantized coordinates).
        coarse_index: ``[c]`` long, the coordinates whose cells are sampled; the others enter
            through ``kappa_j U_j`` plus independent noise of variance ``kappa_j (1 - kappa_j)``.
        coarse_stats: their cell statistics (``prob``, ``mean`` ``[c, K]``, standardised).
        mc_draws: draws (standard error ~ 1/sqrt(mc_draws) relative).
    """
    mean, se = _correlated_mc_shared(corr, influence, kappa, coarse_index, coarse_stats, mc_draws, generator)
    ratio = corr.self_term_ratio(influence, kappa)  # each record's own leave-one-out term (class Correlation)
    return mean * ratio, se * ratio


def _correlated_mc_shared(corr: Correlation, influence: Tensor, kappa: Tensor, coarse_index: Tensor,
                          coarse_stats: CellStatistics, mc_draws: int,
                          generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """:func:`correlated_mc_mean_abs` with the shared ``corr.full`` (no per-record self term)."""
    R, d = influence.shape
    k = kappa.to(torch.float64).clamp(0.0, 1.0)
    c = corr.coefficients(influence, k)                               # [R, d]
    fine = torch.ones(d, dtype=torch.bool)
    fine[coarse_index] = False
    full = corr.full is not None
    exact = fine & (k >= 1.0) if full else torch.zeros(d, dtype=torch.bool)
    # full form: the exact coordinates' share through R's kept eigenspace (Correlation.exact_part)
    a_exact = corr.exact_part(influence, k) if full and bool(exact.any()) else None
    c_fine = c * (fine & ~exact)
    noise_sd = ((c_fine.square() * (k * (1.0 - k))).sum(-1)).sqrt()  # [R]
    c_coarse = c[:, coarse_index]
    cdf = coarse_stats.prob.to(torch.float64).cumsum(-1)
    cdf = (cdf / cdf[:, -1:].clamp_min(1e-300)).contiguous()
    means = coarse_stats.mean.to(torch.float64)
    # Control variate: the same draws with the coarse cells replaced by their Gaussian channel
    # (m_j ~ kappa_j U_j + noise of variance kappa_j (1 - kappa_j), the fine coordinates' model),
    # a Gaussian whose E|.| is known: sqrt(2/pi) times its sd. It shares U with the cells, so
    # its error cancels most of the Monte Carlo noise (common to all records: the mean over
    # records otherwise keeps a ~1/sqrt(mc_draws) relative error).
    kc = k[coarse_index]
    chan_sd = (kc * (1.0 - kc)).clamp_min(0.0).sqrt()
    if full:
        # the surrogate is the channel's own statistic beta'Y: its variance is the shared s2
        left, right = corr._terms(influence.to(torch.float64), k)
        surr_sd = (left * right).sum(-1).clamp_min(0.0).sqrt()
    else:
        ck = c * k
        surr_sd = (_quadratic_form(corr, ck) + (c.square() * (k * (1.0 - k))).sum(-1)).clamp_min(0.0).sqrt()
    # The draws in MC_DTYPE: [S, R] projections by one matmul each (the coarse cells' term and
    # the surrogate's Gaussian channel share c_coarse), moments accumulated in float64.
    dt = MC_DTYPE
    k_dt, c_fine_t = k.to(dt), c_fine.T.to(dt).contiguous()          # [d, R]
    a_exact_t = None if a_exact is None else a_exact.T.to(dt).contiguous()  # [r, R]
    c_coarse_t = c_coarse.T.to(dt).contiguous()                     # [c, R]
    kc_dt, chan_dt, noise_dt = kc.to(dt), chan_sd.to(dt), noise_sd.to(dt)
    means_dt = means.to(dt)
    sums = torch.zeros(5, R, dtype=torch.float64)  # a, s, a^2, s^2, a s
    block = max(MC_BLOCK, MC_BLOCK_ELEMENTS // max(R, d, 1))
    noisy = bool((noise_sd > 0).any())
    for a in range(0, mc_draws, block):
        S = min(block, mc_draws - a)
        if a_exact is not None:
            U, z = corr._sample_full(S, generator, dt)                  # [S, d], [S, r]
            proj = (U * k_dt) @ c_fine_t + z @ a_exact_t                # [S, R]
        else:
            U = corr.sample(S, generator, dtype=dt)                     # [S, d]
            proj = (U * k_dt) @ c_fine_t                               # [S, R]
        if noisy:
            proj += noise_dt * torch.randn(S, R, dtype=dt, generator=generator)
        surr = proj.clone()
        if coarse_index.numel():
            # Gaussian copula: the cell of U_j by the inverse CDF of Phi(U_j) (in float64: the
            # cumulative probabilities resolve cells of probability below float32's 6e-8)
            Uc = U[:, coarse_index]
            v = torch.special.ndtr(Uc.to(torch.float64)).T.contiguous()  # [c, S]
            idx = torch.searchsorted(cdf, v).clamp_(max=cdf.shape[1] - 1)
            m = torch.gather(means_dt, 1, idx).T                       # [S, c]
            proj += m @ c_coarse_t
            e = torch.randn(S, Uc.shape[1], dtype=dt, generator=generator)
            surr += torch.addcmul(Uc * kc_dt, e, chan_dt) @ c_coarse_t
        absval, sabs = proj.abs_(), surr.abs_()
        # per-block sums in MC_DTYPE (torch's cascade summation: relative error ~1e-7 over a
        # block; a float64-accumulating sum is ~25x slower on CPU), across blocks in float64
        sums += torch.stack([absval.sum(0), sabs.sum(0), absval.square().sum(0), sabs.square().sum(0),
                             (absval * sabs).sum(0)]).to(torch.float64)
    ma, ms = sums[0] / mc_draws, sums[1] / mc_draws
    va = (sums[2] / mc_draws - ma.square()).clamp_min(0.0)
    vs = (sums[3] / mc_draws - ms.square()).clamp_min(0.0)
    cov = sums[4] / mc_draws - ma * ms
    beta = torch.where(vs > 0, cov / vs.clamp_min(1e-300), torch.zeros_like(vs))
    mean = ma - beta * (ms - math.sqrt(2.0 / math.pi) * surr_sd)
    var = (va - 2 * beta * cov + beta.square() * vs).clamp_min(0.0)
    return mean, (var / mc_draws).sqrt()


def _quadratic_form(corr: Correlation, x: Tensor) -> Tensor:
    """``[R]`` ``x' R x`` for ``x [R, d]`` and the correlation ``R`` (full, or factor plus residual)."""
    if corr.full is not None:
        return ((x @ corr.full.to(torch.float64)) * x).sum(-1)
    assert corr.factor is not None and corr.residual is not None
    L = corr.factor.to(torch.float64)
    return (x @ L).square().sum(-1) + (x.square() * corr.residual.to(torch.float64)).sum(-1)


@dataclass
class RecordCorrelation:
    """Which correlation scores which records.

    The full correlation (exact estimator) scores every record. Without it, the stored
    records' own sample correlation scores them where their rows show its rank
    (:meth:`in_sample`); where they do not (linearly independent rows, ``d >= R``), a factor
    model cross-fitted on two folds (:meth:`cross_fitted`), each fold scored with the other's.

    ``parts``: ``(record index or None for all, Correlation)``; ``kind``: ``"full"`` or
    ``"factor"``.
    """

    parts: list[tuple[Tensor | None, Correlation]]
    kind: str
    cache: dict = field(default_factory=dict, repr=False)  # per-layer values reused across schemes
    # how a factor model was fitted: "cross_fitted" (two folds) or "in_sample" (:meth:`in_sample`)
    fit: str = "cross_fitted"

    @classmethod
    def full(cls, correlation: Tensor, self_term: Tensor | None = None,
             self_weight: Tensor | None = None, sandwich: SandwichFactor | None = None) -> RecordCorrelation:
        """Every record scored with the ``[d, d]`` correlation matrix; with ``self_term [R, d]``
        and ``self_weight [R]`` each stored record with its own rank-one change of it
        (:class:`Correlation`; ``Estimate.self_term``); with ``sandwich``, in that factor's kept
        eigenspace (:class:`SandwichFactor`; ``Estimate.correlation_factor``)."""
        return cls([(None, Correlation(full=correlation.to(torch.float64), self_term=self_term,
                                       self_weight=self_weight, sandwich=sandwich))], "full")

    @classmethod
    def cross_fitted(cls, influence: Tensor, rank: int) -> RecordCorrelation:
        """Two-fold cross-fitted factor models of at most ``rank`` directions
        (:meth:`Correlation.from_influences`) from ``influence [R, d]``.

        Raises:
            ValueError: fewer than 8 records (no stable factor model).
        """
        Rr = influence.shape[0]
        if Rr < 8:
            raise ValueError(f"a factor model of the correlation needs >= 8 stored records, got {Rr}")
        # Folds by the records' values, not their order: the same records give the same folds
        # whatever order they arrive in (processes, batch sizes).
        order = _value_order(influence.to(torch.float64))
        folds = [order[0::2], order[1::2]]
        parts = []
        for a, b in ((0, 1), (1, 0)):
            parts.append((folds[a], Correlation.from_influences(influence[folds[b]], rank)))
        return cls(parts, "factor")

    @classmethod
    def in_sample(cls, influence: Tensor, shrinkage: float = IN_SAMPLE_SHRINKAGE,
                  loo: bool | None = None) -> RecordCorrelation | None:
        """Every stored record scored with the sample correlation of all ``R`` stored rows,
        itself included, ``(1 - s) W'W / R + s I`` (``s = shrinkage``; ``W = influence [R, d]``
        as stored, already in units of ``sqrt(V_jj)``), as a factor model of the Gram's
        eigen-directions above ``RCOND`` (Woodbury solves of ``r x r``); ``None`` when the
        rows do not show the correlation's rank: numerical rank ``r = R`` (every in-sample form
        would equal ``R``), or ``d >= R`` with ``r > IN_SAMPLE_MAX_RANK_SHARE * R`` (a smooth
        tail of the spectrum, not a null space); the caller then takes :meth:`cross_fitted`.

        Why in-sample: the quantity estimated, the exact estimator's ``g' V^+ g`` with ``V``
        from all ``n`` records, is itself in-sample, and the mean over the stored records of
        ``w' S^+ w`` is exactly ``rank(S)`` as that of ``g' V^+ g`` is ``rank(V)`` (trace
        identity). The cross-fitted Tyler-shape factor model, built for new records, read the
        unquantized headline 1.5-5.4x the exact estimator's on 32-64-weight LoRA adapters and
        a 49-weight ReLU MLP (exact null directions, influences far from elliptical); this form
        read 0.98-1.06 on those, 1.01-1.07 on independent and AR(1) OLS / logistic weights and
        0.97-1.07 for quantized forms (method.md section 3, "Large models"; R = 512; up to
        1.13-1.14 at R = 256 with d / R >= 0.25 and a per-record scale, where in-sample forms,
        capped at ``R``, spread less than the truth's). Cost ``O(R^2 d + R^3)``, a ``[d, r]``
        factor (``r <= min(R, d)``).

        Each record without its own row (``loo``; default ``IN_SAMPLE_LOO``, True, where the rows'
        rank is at most ``IN_SAMPLE_LOO_MAX_RANK_SHARE`` = 0.15 of the records, else the plain
        form, which reads high; method.md section 3, "Large models"). The right mean is not the right spread: scored with the
        matrix it helped build, a record's form is ``q = q_ / (1 + q_ / R)`` (Sherman-Morrison,
        ``q_`` through the other rows' matrix), and ``q_``, through an inverted sample matrix,
        reads high by ``~E[q^2] / (R E[q])`` (``E[S^-1] ~ Sigma^-1 + Sigma^-1 E[(ww' - Sigma)
        Sigma^-1 (ww' - Sigma)] Sigma^-1 / R``). The two cancel in the mean but the headline reads
        the mean of ``sqrt(q)``, which the compression of the large forms raises by about
        ``d / 2R`` for rows with a per-record normal scale (a residual times the inputs): the
        diagonal estimator's unquantized headline read 1.05x the closed-form OLS reference at
        ``d / R = 64 / 512``. Quantized, the inverse's bias scales as ``kappa^2`` and the pull as
        ``kappa``, so the form read low at middle ``kappa``. With ``loo`` each stored record is
        scored through ``S - b w_i w_i'`` (``b = (1 - s) / R``, exact by Sherman-Morrison on the
        channel, its in-sample leverage capped at ``IN_SAMPLE_LOO_LEVERAGE_CAP``) and every
        form divided by one ``1 + beta`` (:meth:`Correlation._in_sample_loo_quadratic`).
        Against the truth (``Sigma = I``, d = 64, R = 512, uniform kappa 1-0.1): 0.992-1.006 with
        a per-record scale (the plain form 0.983-1.047), 0.9995-1.0005 for Gaussian rows. The
        scored rows must then be the stored ones (the callers pass ``Estimate.influence``,
        ``influence`` times a scalar); one more ``[R, d]`` solve per form (1.8x the form's time
        at R = 512, d = 8,000, rank 300). With ``loo`` the forms are not monotone in ``kappa``
        (unlike the shared channel form ``u'M^-1u``): ``beta`` grows with every ``kappa_j`` and can
        lower most records' scores when one ``kappa`` nears 1 (deficits < 1e-6 halved on a
        5,378-weight MLP, 505 of 512 records down, the headline -4.1e-5 relative). With ``loo`` the
        stored records' mean own form is checked against ``trace(M^-1 W'W / R)`` (``trace_target``;
        :data:`IN_SAMPLE_TRACE_RTOL`): forms that lost their digits read NaN, not a silent value.

        Raises:
            ValueError: fewer than 8 records.
        """
        if loo is None:
            loo = IN_SAMPLE_LOO
        W = influence.to(torch.float64)
        m, d = W.shape
        if m < 8:
            raise ValueError(f"a correlation model needs >= 8 stored records, got {m}")
        # rows in an order set by their values: the same records give the same matrix to the
        # last bit whatever order they arrive in (processes, batch sizes); the solve's
        # conditioning (shrinkage 1e-6) amplified a permutation's rounding to 3e-8
        W = W[_value_order(W)]
        evals, evecs = torch.linalg.eigh(W @ W.T / m)  # [m, m]: the nonzero spectrum of W'W / m
        keep = evals > RCOND * max(float(evals[-1]), 1e-300)
        r = int(keep.sum())
        if r >= m or (d >= m and r > IN_SAMPLE_MAX_RANK_SHARE * m):
            return None
        L = W.T @ (evecs[:, keep] / math.sqrt(m))  # [d, r], L L' = W'W / m
        loo = loo and r <= IN_SAMPLE_LOO_MAX_RANK_SHARE * m  # where it was checked (the constant's comment)
        # each record scored with its own row taken out, the inverse's bias removed (docstring;
        # Correlation.self_mean); the rows in the callers' order, as the scored influences
        # trace(M^-1 W'W / m), M = (1 - s) L L' + s I: the kept directions' lam / ((1 - s) lam + s), the
        # rest (the rows' mean square off L's span) over s. The rest directly, as the projection's
        # residual (cf56): as W's mean square minus the kept eigenvalues it cancelled their digits
        # (a column 1e9 times the rest: the target 1.02e9 against the forms' exact mean 1.18e8)
        lam = evals[keep]
        target = math.nan
        if loo:
            Q = torch.linalg.qr(L)[0]
            rest = float((W - (W @ Q) @ Q.T).square().sum(-1).mean())
            target = float((lam / ((1.0 - shrinkage) * lam + shrinkage)).sum()) + rest / shrinkage
        own = {} if not loo else {
            "self_term": influence.to(torch.float64), "self_mean": True, "trace_target": target,
            "self_weight": torch.full((m,), (1.0 - shrinkage) / m, dtype=torch.float64)}
        corr = Correlation(factor=L * math.sqrt(1.0 - shrinkage),
                           residual=torch.full((d,), shrinkage, dtype=torch.float64), **own)
        return cls([(None, corr)], "factor", fit="in_sample")

    def restrict(self, index: Tensor | slice) -> RecordCorrelation:
        """The same records, a subset of coordinates (a layer's block)."""
        return RecordCorrelation([(r, c.restrict(index)) for r, c in self.parts], self.kind, fit=self.fit)

    def _apply(self, influence: Tensor, fn: Callable[[Correlation, Tensor], Tensor]) -> Tensor:
        out = torch.empty(influence.shape[0], dtype=torch.float64)
        for rows, corr in self.parts:
            if rows is None:
                return fn(corr, influence)
            out[rows] = fn(corr, influence[rows])
        return out

    def variance_inflation(self) -> Tensor:
        """``[d]`` variance inflation factors (:meth:`Correlation.inverse_diagonal`), averaged
        over the cross-fitted parts."""
        return torch.stack([c.inverse_diagonal() for _, c in self.parts]).mean(0)

    def with_rcond(self, rcond: float) -> RecordCorrelation:
        """The same correlations with the full ``R``'s rank rule ``rcond`` (relative eigenvalue
        cutoff; :data:`RCOND` by default), sharing ``R``'s eigendecomposition: the scoring's
        cutoff check (the only cutoff of the full form is this rule on ``R``)."""
        parts = [(i, Correlation(full=c.full, factor=c.factor, residual=c.residual, self_term=c.self_term,
                                 self_weight=c.self_weight, self_mean=c.self_mean, rcond=rcond,
                                 sandwich=c.sandwich, _eigh=c._eigh, _blocks=c._blocks))
                 for i, c in self.parts]
        return RecordCorrelation(parts, self.kind, fit=self.fit)

    def gaussian_mean_abs(self, influence: Tensor, kappa: Tensor | None = None) -> Tensor:
        """``[R]`` Gaussian form ``sqrt(2/pi) sqrt(u' M^+ u)`` (``kappa None``: unquantized)."""
        return self._apply(influence, lambda c, w: gaussian_mean_abs(c, w, kappa))

    def gaussian_ends(self, influence: Tensor, k_lo: Tensor, k_hi: Tensor) -> tuple[Tensor, Tensor]:
        """``([R], [R])`` bounds of :meth:`gaussian_mean_abs` over the ``kappa`` box ``[k_lo, k_hi]``
        (:meth:`Correlation.quadratic_ends`; the non-monotone in-sample leave-one-out form
        included)."""
        ends = [torch.empty(influence.shape[0], dtype=torch.float64) for _ in range(2)]
        for rows, corr in self.parts:
            w = influence if rows is None else influence[rows]
            for out, q in zip(ends, corr.quadratic_ends(w, k_lo, k_hi)):
                v = SQRT_2_OVER_PI * q.clamp_min(0.0).sqrt()
                if rows is None:
                    out.copy_(v)
                else:
                    out[rows] = v
        return ends[0], ends[1]

    def mc_mean_abs(self, influence: Tensor, kappa: Tensor, coarse_index: Tensor, coarse_stats: CellStatistics,
                    mc_draws: int, generator: torch.Generator | None = None) -> Tensor:
        """``[R]`` Monte Carlo form (:func:`correlated_mc_mean_abs`)."""
        return self._apply(influence, lambda c, w: correlated_mc_mean_abs(
            c, w, kappa, coarse_index, coarse_stats, mc_draws, generator)[0])


def _value_order(W: Tensor) -> Tensor:
    """``[R]`` the rows of ``W [R, d]`` sorted by a fixed random projection of their values."""
    gen = torch.Generator().manual_seed(20250212)
    probe = torch.randn(W.shape[1], dtype=torch.float64, generator=gen)
    return torch.argsort(W @ probe)


def _factor_fit(Ws: Tensor, rank: int, inflate: bool) -> tuple[Tensor, Tensor]:
    """Loadings ``L [d, k]`` and residual variances ``[d]`` of the factor model of the records
    ``Ws [m, d]`` (second moments; see :meth:`Correlation.from_influences`): the top ``rank``
    principal directions (above the Marchenko-Pastur edge when ``4 d > m``) at their excess
    over the left-out directions' mean eigenvalue, times ``m / (m - k - 1)`` with ``inflate``."""
    m, d = Ws.shape
    gram = Ws @ Ws.T / m                                      # [m, m], same nonzero spectrum
    evals, evecs = torch.linalg.eigh(gram)
    k = min(rank, m)
    lam, U = evals[-k:].clamp_min(0.0), evecs[:, -k:]
    floor = RCOND * max(float(evals[-1]), 1e-300)
    if 4 * d > m:
        floor = max(floor, (1.0 + math.sqrt(d / m)) ** 2)
    keep = lam > floor
    lam, U = lam[keep], U[:, keep]
    kept = int(lam.numel())
    V = Ws.T @ U / (math.sqrt(m) * lam.sqrt().clamp_min(1e-300))  # unit eigenvectors of Ws'Ws/m
    diag = Ws.square().mean(0)
    sig2 = max((float(diag.sum()) - float(lam.sum())) / (d - kept), 0.0) if kept < d else 0.0
    excess = (lam - sig2).clamp_min(0.0)
    resid = (diag - (V.square() * excess).sum(-1)).clamp_min(0.0)
    scale = m / (m - kept - 1) if inflate and m > kept + 1 else 1.0
    return V * (excess * scale).sqrt(), resid


def _ndtr_precise(x: Tensor) -> Tensor:
    # erfc keeps relative precision in the lower tail (torch.special.ndtr rounds to 0 below ~-8.3)
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def _truncated_normal(a: Tensor, b: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Draws of N(0, 1) truncated to ``[a, b]`` by inversion of the uniforms ``u`` (same shape),
    and ``P(a <= Z <= b)`` (computed in the lower tail). ``u -> 1 - u`` on the box ``[-b, -a]``
    gives exactly ``-x`` (the antithetic partner of :func:`truncated_gaussian_means`)."""
    flip = a > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    pa, pb = _ndtr_precise(lo), _ndtr_precise(hi)
    u = torch.where(flip, 1.0 - u, u)  # the flipped side inverts the same quantile
    width = pb - pa
    # pa + u (pb - pa), clamped, inverted and cut to [lo, hi], in place where the shapes allow
    x = torch.special.ndtri(torch.addcmul(pa, u, width).clamp_(1e-300, 1 - 1e-16))
    x = torch.minimum(torch.maximum(x, lo), hi)
    return torch.where(flip, -x, x), width


def truncated_gaussian_means(mean: Tensor, chol: Tensor, lo: Tensor, hi: Tensor, draws: int,
                             generator: torch.Generator | None = None, qmc: bool = False) -> Tensor:
    """``E[X | lo <= X <= hi]`` ``[N, c]`` for ``X ~ N(mean [N, c], L L')`` and boxes ``lo, hi
    [N, c]`` (``+-inf`` allowed), by the GHK simulator (Geweke-Hajivassiliou-Keane: sequential
    truncated draws along the Cholesky factor ``chol [c, c]``, weighted by the conditional box
    probabilities; consistent in ``draws``) with antithetic pairs (``u`` and ``1 - u``).

    Why antithetic: callers take ``|b' E[X | box]|``, so the simulator's noise enters as an
    upward bias of order ``noise^2 / |value|`` wherever the value is small against it (a box
    nearly symmetric about the mean: a weight mid-cell on a coarse grid). With plain draws,
    1,024 per box, an all-coarse ``d = 4`` grid of 8 sd steps mid-cell read 55-80x its value;
    the antithetic partner of a draw in a box symmetric about the mean is its mirror image, so
    such a box's mean is exact, and elsewhere the pairs cancel the linear part of the noise
    (docs/method.md section 3, "Few coarse weights, exactly").

    ``qmc``: the uniforms of every box from one scrambled Sobol point set, shifted modulo 1 by
    an independent uniform per box (randomised quasi-Monte Carlo, Cranley-Patterson: each box's
    simulator stays consistent, boxes independent), antithetic pairs as above."""
    N, c = lo.shape
    half = max(1, (draws + 1) // 2)
    # One contiguous [N, D] plane per coordinate ([c, N, D]; was [N, D, c], whose strided
    # column reads and writes were ~40% of the time, sm25); the same uniforms in the same order.
    D = 2 * half
    u = torch.empty(c, N, D, dtype=torch.float64)
    if qmc:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        base = torch.quasirandom.SobolEngine(c, scramble=True, seed=seed).draw(half, dtype=torch.float64)
        shift = torch.rand(N, 1, c, generator=generator, dtype=torch.float64)
        torch.remainder(base.T.unsqueeze(1) + shift.permute(2, 0, 1), 1.0, out=u[:, :, :half])
    else:
        u[:, :, :half] = torch.rand(N, half, c, generator=generator, dtype=torch.float64).permute(2, 0, 1)
    torch.sub(1.0, u[:, :, :half], out=u[:, :, half:])              # the antithetic partners
    eps = torch.empty(c, N, D, dtype=torch.float64)
    logw = torch.zeros(N, D, dtype=torch.float64)
    lo_c, hi_c = lo - mean, hi - mean
    for k in range(c):
        a = lo_c[:, k : k + 1] / chol[k, k]
        b = hi_c[:, k : k + 1] / chol[k, k]
        if k:  # s = sum_{l < k} chol[k, l] eps_l, one contiguous matrix-vector product
            s = (chol[k, :k] / chol[k, k]) @ eps[:k].reshape(k, N * D)
            s = s.reshape(N, D)
            a, b = a - s, b - s
        x, p = _truncated_normal(a, b, u[k])
        eps[k] = x
        logw += torch.log(p.clamp_min(1e-300))
    # the weighted mean of the draws, then the factor (linear: E[L eps] = L E[eps])
    wts = torch.softmax(logw, dim=1)                               # [N, D]
    return mean + torch.einsum("nd,knd->nk", wts, eps) @ chol.T


# Largest number of coarse coordinates given to the exact box-mean form (GHK is sequential in
# them), its draws per box, and the outer draws.
EXACT_MAX_COARSE = 32
EXACT_BOX_DRAWS = 1024
# Draws per box where fine weights are seen through the channel (one box per outer draw), in
# randomised quasi-Monte Carlo (truncated_gaussian_means(qmc=True)); before, up to
# EXACT_BOX_DRAWS plain draws (732 at c = 8). On the 12-weight logistic model of a small
# assess (c = 7-8 coarse): per-box RMSE of b' E[U_C | box] 0.54-1.38x the former draws', the
# mean over records (8 seeds) within 0.0022 of the former's at reported standard errors of
# 0.016-0.020 (unchanged), 2.8-3.8x less CPU per call.
EXACT_QMC_BOX_DRAWS = 256
# ... where at most this many coordinates are coarse: a Sobol set's advantage fades with the
# dimension (the README main job's 28 coarse weights: the spread of the mean over 8 seeds was
# 1.8x the former plain draws' at the same 256 draws, sc24), so wider boxes keep plain draws
EXACT_QMC_MAX_COARSE = 16
EXACT_OUTER_DRAWS = 1024
# truncated draws one evaluation may cost (outer x box draws x coarse coordinates)
EXACT_BUDGET = 6_000_000


# Every weight coarse: the boxes repeat, so the outer draws are this many coordinates' worth
# (draws x coarse weights; each distinct box simulated once) as long as the distinct boxes
# stay within the usual outer draws.
ALL_COARSE_BUDGET = 1 << 22
# Box keys counted by bincount up to this range (memory: 8 bytes per possible key).
BINCOUNT_MAX_KEYS = 1 << 24


def _all_coarse_mean_abs(root: Tensor, alpha: Tensor, pad: Tensor, b: Tensor, outer_draws: int,
                         box_draws: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor] | None:
    """:func:`exact_box_mean_abs` when no coordinate is seen through the channel: ``E_U |b'
    E[U_C | box(U_C)]|`` as a sum over the distinct boxes of the outer draws (the reference's
    construction, ``groundtruth.correlated_reference.exact_mean_abs``), or ``None`` when the
    draws fall in more distinct boxes than ``outer_draws`` (cells too fine for the sum to pay:
    the general path with its control variate is then the better estimate). On coarse grids few boxes
    carry the mass and the rare outer ones carry much of a small value: ``outer_draws`` plain
    draws read the 8-sd all-coarse example of the tests at 0.5-0.9 of its exact value with a
    standard error that missed it (the rare boxes absent from both)."""
    c = root.shape[0]
    draws = max(outer_draws, ALL_COARSE_BUDGET // c)
    # The draws only pick boxes: normals, their correlation and the edge comparisons in float32
    # (a value's rounding at 1e-7 changes its box with probability ~1e-7 per edge), laid out
    # [c, draws] so that one batched searchsorted reads contiguous rows (no strided column
    # copies; the d = 2 study of tests/test_interval.py 57 -> 51 s).
    f32 = torch.float32
    a32 = alpha.to(f32).contiguous()
    Ut = root.to(f32) @ torch.randn(c, draws, dtype=f32, generator=generator)  # [c, draws]
    cell = torch.searchsorted(a32, Ut)                                          # [c, draws]
    # the lowest and highest cells reached, from the extreme draws (searchsorted is monotone:
    # equal to cell.amin / amax, one float32 pass instead of two int64 ones; sm25)
    low = torch.searchsorted(a32, Ut.amin(1, keepdim=True)).squeeze(1)
    high = torch.searchsorted(a32, Ut.amax(1, keepdim=True)).squeeze(1)
    del Ut
    # one integer key per box, mixed radix over the range of cells each coordinate reached
    # (the last coordinate most significant: the boxes come out in the same lexicographic
    # order as torch.unique(dim=0) would give); counted with bincount when the key range is
    # small (a coarse grid: a few cells per coordinate), else sorted (torch.unique, ~20x slower)
    span = (high - low + 1).tolist()
    offset = cell.sub_(low.unsqueeze(1))  # in place: the cells are not needed again
    del cell
    values: list[Tensor] | None = None  # per coordinate, the cells an offset stands for
    if math.prod(span) >= 1 << 62:  # cells reached sparsely over a wide range: their ranks
        ranked = [torch.unique(offset[j], return_inverse=True) for j in range(c)]
        values = [v + low[j] for j, (v, _) in enumerate(ranked)]
        offset = torch.stack([r for _, r in ranked], 0)
        span = [v.numel() for v in values]
        if math.prod(span) >= 1 << 62:
            return None
    radix = [math.prod(span[:j]) for j in range(c)]
    key = offset[0].clone()  # radix[0] = 1
    for j in range(1, c):
        key.add_(offset[j], alpha=radix[j])
    if math.prod(span) <= BINCOUNT_MAX_KEYS:
        every = torch.bincount(key, minlength=math.prod(span))
        keys = torch.nonzero(every).squeeze(-1)
        counts = every[keys]
    else:
        keys, counts = torch.unique(key, return_counts=True)
    if keys.numel() > outer_draws:  # many distinct boxes (fine cells): the general path
        return None
    # one row of cells per box, decoded from its key
    offs = [(keys // radix[j]) % span[j] for j in range(c)]
    uniq = torch.stack(offs, 1) + low if values is None else torch.stack([values[j][o] for j, o in enumerate(offs)], 1)
    per_box = int(min(16 * EXACT_BOX_DRAWS, max(box_draws, EXACT_BUDGET // max(uniq.shape[0] * c, 1))))
    lo = torch.gather(pad, 1, uniq.T).T
    hi = torch.gather(pad, 1, (uniq + 1).T).T
    per = max(1, (1 << 22) // max(per_box * c, 1))
    m = torch.cat([truncated_gaussian_means(torch.zeros_like(lo[i : i + per]), root, lo[i : i + per],
                                            hi[i : i + per], per_box, generator)
                   for i in range(0, uniq.shape[0], per)])          # [boxes, c]
    score = (m @ b.T).abs()                                          # [boxes, R]
    p = counts.to(torch.float64) / draws
    mean = p @ score
    var = (p @ score.square() - mean.square()).clamp_min(0.0)
    return mean, (var / draws).sqrt()


def exact_box_mean_abs(
    corr: Correlation,
    influence: Tensor,
    kappa: Tensor,
    coarse_index: Tensor,
    coarse_alpha: Tensor,
    outer_draws: int = EXACT_OUTER_DRAWS,
    box_draws: int = EXACT_BOX_DRAWS,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``E|w' R^-1 E[U | observation]|`` per record, with the coarse coordinates' boxes treated
    exactly, and its standard error, both ``[R]``.

    The observation is the coarse coordinates' cells and, for the others, the channel
    ``Y_j = U_j + e_j`` (``Var e_j = (1 - kappa_j) / kappa_j``; 0 for unquantized ones, exact).
    With ``(b, h)`` the regression of ``a' U`` (``a = R^-1 w``) on ``(U_C, Y_F)``, the score is
    ``b' E[U_C | box, Y_F] + h' Y_F`` (the residual is independent of the observation), and
    ``U_C | Y_F`` is Gaussian, so ``E[U_C | box, Y_F]`` is a truncated-Gaussian mean (GHK).

    Args:
        corr: full correlation (``corr.full [d, d]``, positive definite on the coarse block).
        influence: ``[R, d]``; kappa: ``[d]``.
        coarse_index: ``[c]`` long (``c <= EXACT_MAX_COARSE``); coarse_alpha: ``[c, K+1]``
            their standardised cell edges (sorted, around 0 = theta-hat).

    Raises:
        ValueError: without a full correlation, or more than ``EXACT_MAX_COARSE`` coarse
            coordinates.
        torch.linalg.LinAlgError: the covariance of the observation is singular (collinear
            inputs); :func:`correlated_mc_mean_abs` handles that case.
    """
    if corr.full is None:
        raise ValueError("the exact box-mean form needs the full correlation")
    mean, se = _exact_box_shared(corr, influence, kappa, coarse_index, coarse_alpha, outer_draws, box_draws, generator)
    ratio = corr.self_term_ratio(influence, kappa)  # each record's own leave-one-out term (class Correlation)
    return mean * ratio, se * ratio


def _exact_box_shared(corr: Correlation, influence: Tensor, kappa: Tensor, coarse_index: Tensor,
                      coarse_alpha: Tensor, outer_draws: int, box_draws: int,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """:func:`exact_box_mean_abs` with the shared ``corr.full`` (no per-record self term)."""
    assert corr.full is not None
    c = coarse_index.numel()
    all_coarse_draws = int(max(256, min(box_draws, EXACT_BUDGET // max(outer_draws * c, 1))))
    if c > EXACT_MAX_COARSE:
        raise ValueError(f"the exact box-mean form takes at most {EXACT_MAX_COARSE} coarse coordinates, got {c}")
    # R's kept eigenspace (its one rank rule, :meth:`Correlation._basis`) for every covariance below,
    # and the regressions by the cut-free channel (:meth:`Correlation._regression`): no cutoff on
    # the observation's covariance (cf45)
    Bk = corr._basis()[0]
    R_ = Bk @ Bk.T
    d = R_.shape[0]
    w = influence.to(torch.float64)
    k = kappa.to(torch.float64).clamp(0.0, 1.0)
    is_c = torch.zeros(d, dtype=torch.bool)
    is_c[coarse_index] = True
    # fine coordinates seen through the channel; pinned ones (kappa ~ 0) carry nothing
    fine_index = torch.nonzero(~is_c & (k > 1e-12)).squeeze(-1)
    v = (1.0 - k[fine_index]) / k[fine_index]
    k_fine = torch.zeros(d, dtype=torch.float64)
    k_fine[fine_index] = k[fine_index]
    # the regression of a'U (a = R^+ w) on Z = (U_C, Y_F): the channel with the coarse ones exact
    coef = corr._regression(w, k_fine.index_fill(0, coarse_index, 1.0))   # [R, d]
    b, h = coef[:, coarse_index], coef[:, fine_index]
    # joint covariance of Z = (U_C, Y_F) (the outer draws)
    Rcc = R_[coarse_index][:, coarse_index]
    Rcf = R_[coarse_index][:, fine_index]
    Rff = R_[fine_index][:, fine_index] + torch.diag(v)
    cov_z = torch.cat([torch.cat([Rcc, Rcf], 1), torch.cat([Rcf.T, Rff], 1)], 0)
    # U_C | Y_F ~ N(G Y_F, S): the regression of each U_j (j coarse; U_j = (R e_j)'R^+U) on Y_F
    if fine_index.numel():
        G = corr._regression(R_[coarse_index], k_fine)[:, fine_index]  # [c, f]
        S = Rcc - G @ Rcf.T
    else:
        G = torch.zeros(c, 0, dtype=torch.float64)
        S = Rcc
    # A coarse weight that the others determine (collinear inputs, unquantized neighbours) has a
    # conditional variance of 0 up to round-off: floor the spectrum so that GHK gets a factor.
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.T))
    floor = 1e-9 * max(float(evals.abs().max()), 1e-12)
    chol = torch.linalg.cholesky((evecs * evals.clamp_min(floor)) @ evecs.T)
    # outer draws of (U_C, Y_F). A singular covariance (a weight the data never moves: a dead
    # unit's row of the correlation is 0; collinear inputs) is floored like S above: a plain
    # Cholesky then failed or not by rounding, and the form switched to the copula Monte Carlo
    # with the loader's batch size (8e-3 of an int2 figure on an MLP with a dead ReLU unit)
    ev_z, evec_z = torch.linalg.eigh(0.5 * (cov_z + cov_z.T))
    floor_z = 1e-12 * max(float(ev_z.abs().max()), 1e-12)
    root = torch.linalg.cholesky((evec_z * ev_z.clamp_min(floor_z)) @ evec_z.T)
    alpha = coarse_alpha.to(torch.float64)
    pad = torch.cat([torch.full((c, 1), -math.inf, dtype=torch.float64), alpha,
                     torch.full((c, 1), math.inf, dtype=torch.float64)], 1)
    if fine_index.numel() == 0:
        summed = _all_coarse_mean_abs(root, alpha, pad, b, outer_draws, all_coarse_draws, generator)
        if summed is not None:
            return summed
    if float(ev_z[0]) > floor_z:  # the floor not in play: Z's own factor (the draws as before cf45)
        Z = torch.randn(outer_draws, root.shape[1], dtype=torch.float64, generator=generator) @ root.T
        Uc, Yf = Z[:, :c], Z[:, c:]
    else:
        # a floored (near-)singular observation: draws through R's kept eigenspace (U = B z),
        # exact, so that the large regression coefficients of nearly dependent exact fine weights
        # see their combinations as the model has them, not as the floor moved them
        zz = torch.randn(outer_draws, Bk.shape[1], dtype=torch.float64, generator=generator)
        Uc = zz @ Bk[coarse_index].T
        Yf = zz @ Bk[fine_index].T + torch.randn(outer_draws, fine_index.numel(), dtype=torch.float64,
                                                 generator=generator) * v.sqrt()
    cell = torch.stack([torch.searchsorted(alpha[j].contiguous(), Uc[:, j].contiguous()) for j in range(c)], 1)
    lo = torch.gather(pad, 1, cell.T).T                            # [S, c]
    hi = torch.gather(pad, 1, (cell + 1).T).T
    mean = Yf @ G.T
    qmc = c <= EXACT_QMC_MAX_COARSE
    box_draws = min(all_coarse_draws, EXACT_QMC_BOX_DRAWS) if qmc else all_coarse_draws
    per = max(1, (1 << 22) // max(box_draws * c, 1))
    m = torch.cat([truncated_gaussian_means(mean[i : i + per], chol, lo[i : i + per], hi[i : i + per],
                                            box_draws, generator, qmc=qmc)
                   for i in range(0, outer_draws, per)])           # [S, c]
    score = (m @ b.T + Yf @ h.T).abs()                             # [S, R]
    # Control variate: the same draws scored with the coarse weights also seen through the
    # Gaussian channel (Y_C = U_C + e_C, Var e = (1 - kappa) / kappa), whose E|.| is known in
    # closed form. It shares U_C and Y_F with the exact score, so subtracting its error removes
    # most of the Monte Carlo noise (the outer draws are common to all records: without it the
    # mean over records keeps a ~1/sqrt(outer_draws) relative error; 2-3% measured).
    # Every coarse weight pinned (kappa ~ 0: its box is wide against its sd, e.g. a 2-bit zero
    # cell): the surrogate sees the fine weights only (the channel's kappa -> 0 limit), which
    # the exact score then nearly equals; without it the raw mean kept the outer draws' common
    # error (4% spread over seeds on a 4-weight OLS model).
    kc = k[coarse_index]
    on = kc > 1e-9  # a pinned coarse weight (kappa ~ 0) tells the channel nothing
    if bool(on.any()) or fine_index.numel():
        vc = (1.0 - kc[on]) / kc[on]
        Yc = (Uc[:, on] + torch.randn(outer_draws, int(on.sum()), dtype=torch.float64, generator=generator) * vc.sqrt()
              if bool(on.any()) else Uc[:, on])
        obs = torch.cat([Yc, Yf], 1)
        # the regression of a'U on the observation (the channel with the coarse ones through it)
        k_obs = k_fine.clone()
        k_obs[coarse_index[on]] = kc[on]
        coef_cv = corr._regression(w, k_obs)                       # [R, d]
        coef_cv = torch.cat([coef_cv[:, coarse_index[on]], coef_cv[:, fine_index]], 1).T  # [o, R]
        left, right = corr._terms(w, k_obs)
        sd = (left * right).sum(-1).clamp_min(0.0).sqrt()          # [R] sd of E[a'U | obs]
        surr = (obs @ coef_cv).abs()                               # [S, R]
        sc, su = score - score.mean(0), surr - surr.mean(0)
        beta = (sc * su).sum(0) / su.square().sum(0).clamp_min(1e-300)
        adj = score - beta * (surr - math.sqrt(2.0 / math.pi) * sd)
        return adj.mean(0), adj.std(0) / math.sqrt(outer_draws)
    return score.mean(0), score.std(0) / math.sqrt(outer_draws)
