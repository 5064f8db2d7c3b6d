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

and the Gaussian form is ``E|S| = sqrt(2/pi) sqrt(s2)``. Properties: ``kappa = 1`` gives the
unquantized ``w' R^+ w`` (Mahalanobis); ``kappa -> 0`` gives 0; ``M >= R`` in the Loewner order
once rescaled, so the value never exceeds the unquantized one; a diagonal ``R`` gives the
independent-coordinate form ``sum_j w_j^2 kappa_j`` exactly.

For few coarse weights (the Monte Carlo regime of the independent form) the statistic
``S = sum_j c_j m_j`` with the channel's optimal weights ``c = K^-1/2 M^+ u`` is averaged over
*jointly* drawn cells: ``U ~ N(0, R)`` (Gaussian copula), each coarse coordinate's cell read
from its ``U_j``, fine or unquantized coordinates entering through ``kappa_j U_j`` plus the
channel's independent noise. With a diagonal ``R`` it is the independent Monte Carlo form.
Measured error against exact box-conditional means: docs/method.md.

Rank-deficient ``R`` (collinear features, duplicated columns): pseudo-inverses by an
eigendecomposition with the relative cutoff ``RCOND`` (never ``lstsq``'s default driver, whose
answer on a singular system depends on the run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cells import SQRT_2_OVER_PI, CellStatistics

# Relative cutoff of the eigenvalues kept by the pseudo-inverses (float64 round-off of a
# singular correlation matrix sits near 1e-15; genuine directions of the models we serve
# lie far above 1e-9).
RCOND = 1e-9
# Weight of the identity in the factor model's correlation (shrinkage towards independent
# coordinates; keeps the remainder >= this and the solve well conditioned).
FACTOR_SHRINKAGE = 0.001
# Draws per block of the Monte Carlo form: at least MC_BLOCK, and [S, max(R, d)] buffers of
# about MC_BLOCK_ELEMENTS float64 (32 MiB).
MC_BLOCK = 512
MC_BLOCK_ELEMENTS = 1 << 22


def _pinv_apply(M: Tensor, rhs: Tensor, rcond: float = RCOND) -> Tensor:
    """``M^+ rhs`` for a symmetric PSD ``M [d, d]`` and ``rhs [d, R]`` (eigendecomposition,
    eigenvalues below ``rcond * max`` dropped)."""
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    keep = evals > rcond * max(float(evals[-1]), 1e-300) if evals.numel() else evals > 0
    inv = torch.where(keep, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    return evecs @ (inv.unsqueeze(-1) * (evecs.T @ rhs))


def correlation_from_covariance(Sigma: Tensor) -> Tensor:
    """``[d, d]`` correlation matrix of a covariance ``Sigma [d, d]`` (zero-variance coordinates:
    a zero row and column, so that they drop out of every pseudo-inverse)."""
    s = torch.diagonal(Sigma).clamp_min(0.0).sqrt()
    inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    R = inv.unsqueeze(-1) * Sigma * inv.unsqueeze(0)
    return 0.5 * (R + R.T)


@dataclass
class Correlation:
    """Correlation of the standardised influences: ``full [d, d]``, or a factor model
    ``factor [d, k]`` (``R ~ L L' + diag(residual)``, unit diagonal) built from the stored
    records' influences.

    ``kind`` is ``"full"`` or ``"factor"`` (reported as the covariance form used).
    """

    full: Tensor | None = None
    factor: Tensor | None = None
    residual: Tensor | None = None
    _root: Tensor | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "full" if self.full is not None else "factor"

    @property
    def d(self) -> int:
        return int((self.full if self.full is not None else self.factor).shape[0])  # type: ignore[union-attr]

    @classmethod
    def from_influences(cls, influence: Tensor, rank: int) -> Correlation:
        """Factor model from ``influence [R, d]`` (standardised, so ``E w_j^2 = 1``): the top
        ``rank`` principal directions of ``W'W / R`` and a diagonal remainder to unit variance.

        Raises:
            ValueError: ``rank < 1`` or no records.
        """
        if rank < 1 or influence.shape[0] < 1:
            raise ValueError(f"a factor model needs rank >= 1 and records, got rank={rank}, "
                             f"{influence.shape[0]} records")
        W = influence.to(torch.float64)
        Rr = W.shape[0]
        gram = W @ W.T / Rr                                   # [R, R], same nonzero spectrum
        evals, evecs = torch.linalg.eigh(gram)
        k = min(rank, Rr)
        lam, U = evals[-k:].clamp_min(0.0), evecs[:, -k:]
        keep = lam > RCOND * max(float(evals[-1]), 1e-300)
        lam, U = lam[keep], U[:, keep]
        # eigenvectors of W'W/R: v = W'u / sqrt(R lam); loadings L = v sqrt(lam) = W'u / sqrt(R),
        # rescaled to the records' own unit diagonal (a correlation), so that the remainder is >= 0
        scale = (W.square().mean(0)).clamp_min(1e-300).rsqrt()
        L = scale.unsqueeze(-1) * (W.T @ U) / math.sqrt(Rr)
        resid = (1.0 - L.square().sum(-1)).clamp_min(0.0)
        # Shrinkage towards independence: an estimated correlation whose directions explain a
        # coordinate fully would make the remainder 0 and the Woodbury solve unstable.
        return cls(factor=L * math.sqrt(1.0 - FACTOR_SHRINKAGE),
                   residual=(1.0 - FACTOR_SHRINKAGE) * resid + FACTOR_SHRINKAGE)

    def restrict(self, index: Tensor | slice) -> Correlation:
        """The correlation of a subset of coordinates (a layer's block)."""
        if self.full is not None:
            if isinstance(index, slice):
                return Correlation(full=self.full[index, index])
            return Correlation(full=self.full[index][:, index])
        assert self.factor is not None and self.residual is not None
        return Correlation(factor=self.factor[index], residual=self.residual[index])

    # -- the information-matched channel --------------------------------------------------
    def _solve(self, u: Tensor, kappa: Tensor) -> Tensor:
        """``M^+ u'`` as ``[R, d]`` for ``u [R, d]``, ``M = I - K + K^1/2 R K^1/2``."""
        kh = kappa.sqrt()
        if self.full is not None:
            M = torch.diag(1.0 - kappa) + kh.unsqueeze(-1) * self.full * kh.unsqueeze(0)
            return _pinv_apply(M, u.T).T
        assert self.factor is not None and self.residual is not None
        # M = diag(D) + A A', A = K^1/2 L: Woodbury (k x k), with D floored at RCOND.
        D = (1.0 - kappa + kappa * self.residual).clamp_min(RCOND)
        A = kh.unsqueeze(-1) * self.factor
        Dinv_u = u / D
        Dinv_A = A / D.unsqueeze(-1)
        core = torch.eye(A.shape[1], dtype=A.dtype) + A.T @ Dinv_A
        y = Dinv_u @ A                                        # [R, k]
        z = torch.linalg.solve(core, y.T).T
        return Dinv_u - z @ Dinv_A.T

    def quadratic(self, influence: Tensor, kappa: Tensor | None = None) -> Tensor:
        """``[R]`` ``s2 = u' M^+ u`` (``kappa [d]``; ``None``: unquantized, ``w' R^+ w``).

        The Gaussian form of the first-order leakage is ``sqrt(2/pi) sqrt(s2) / (2 sqrt n)``.
        """
        w = influence.to(torch.float64)
        k = torch.ones(w.shape[1], dtype=torch.float64) if kappa is None else kappa.to(torch.float64).clamp(0.0, 1.0)
        u = w * k.sqrt()
        return (u * self._solve(u, k)).sum(-1).clamp_min(0.0)

    def coefficients(self, influence: Tensor, kappa: Tensor) -> Tensor:
        """``[R, d]`` weights ``c = K^-1/2 M^+ u`` of the cell means in the Monte Carlo form
        (0 for coordinates with ``kappa = 0``)."""
        w = influence.to(torch.float64)
        k = kappa.to(torch.float64).clamp(0.0, 1.0)
        kh = k.sqrt()
        sol = self._solve(w * kh, k)
        return torch.where(kh > 0, sol / kh.clamp_min(1e-300), torch.zeros_like(sol))

    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """``[num, d]`` draws of ``U ~ N(0, R)`` (a singular ``R`` is fine)."""
        if self.full is not None:
            if self._root is None:  # symmetric square root, computed once
                evals, evecs = torch.linalg.eigh(self.full)
                self._root = evecs * evals.clamp_min(0.0).sqrt()
            B = self._root
            return torch.randn(num, B.shape[1], dtype=torch.float64, generator=generator) @ B.T
        assert self.factor is not None and self.residual is not None
        L = self.factor
        z = torch.randn(num, L.shape[1], dtype=torch.float64, generator=generator)
        e = torch.randn(num, L.shape[0], dtype=torch.float64, generator=generator)
        return z @ L.T + e * self.residual.sqrt()


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
    R, d = influence.shape
    k = kappa.to(torch.float64).clamp(0.0, 1.0)
    c = corr.coefficients(influence, k)                               # [R, d]
    fine = torch.ones(d, dtype=torch.bool)
    fine[coarse_index] = False
    c_fine = c * fine
    noise_sd = ((c_fine.square() * (k * (1.0 - k))).sum(-1)).sqrt()  # [R]
    c_coarse = c[:, coarse_index]
    cdf = coarse_stats.prob.to(torch.float64).cumsum(-1)
    cdf = (cdf / cdf[:, -1:].clamp_min(1e-300)).contiguous()
    means = coarse_stats.mean.to(torch.float64)
    total = torch.zeros(R, dtype=torch.float64)
    total_sq = torch.zeros(R, dtype=torch.float64)
    block = max(MC_BLOCK, MC_BLOCK_ELEMENTS // max(R, d, 1))
    noisy = bool((noise_sd > 0).any())
    for a in range(0, mc_draws, block):
        S = min(block, mc_draws - a)
        U = corr.sample(S, generator)                                  # [S, d]
        proj = (U * k) @ c_fine.T                                      # [S, R]
        if coarse_index.numel():
            # Gaussian copula: the cell of U_j by the inverse CDF of Phi(U_j)
            v = torch.special.ndtr(U[:, coarse_index]).T.contiguous()  # [c, S]
            idx = torch.searchsorted(cdf, v).clamp_(max=cdf.shape[1] - 1)
            m = torch.gather(means, 1, idx).T                          # [S, c]
            proj += m @ c_coarse.T
        if noisy:
            proj += noise_sd * torch.randn(S, R, dtype=torch.float64, generator=generator)
        absval = proj.abs_()
        total += absval.sum(0)
        total_sq += absval.square().sum(0)
    mean = total / mc_draws
    var = (total_sq / mc_draws - mean.square()).clamp_min(0.0)
    return mean, (var / mc_draws).sqrt()


@dataclass
class RecordCorrelation:
    """Which correlation scores which records.

    The full correlation (exact estimator) scores every record. A factor model is estimated
    from the stored records' own influences, which would bias ``w' A^-1 w`` upward for those
    same records (in-sample leverage); it is therefore cross-fitted: the records are split
    in two folds by position and each fold is scored with the factor model of the other.

    ``parts``: ``(record index or None for all, Correlation)``; ``kind``: ``"full"`` or
    ``"factor"``.
    """

    parts: list[tuple[Tensor | None, Correlation]]
    kind: str
    cache: dict = field(default_factory=dict, repr=False)  # per-layer values reused across schemes

    @classmethod
    def full(cls, correlation: Tensor) -> RecordCorrelation:
        """Every record scored with the ``[d, d]`` correlation matrix."""
        return cls([(None, Correlation(full=correlation.to(torch.float64)))], "full")

    @classmethod
    def cross_fitted(cls, influence: Tensor, rank: int) -> RecordCorrelation:
        """Two-fold cross-fitted factor models of ``rank`` (at most a quarter of a fold's
        records) from ``influence [R, d]``.

        Raises:
            ValueError: fewer than 8 records (no stable factor model).
        """
        Rr = influence.shape[0]
        if Rr < 8:
            raise ValueError(f"a factor model of the correlation needs >= 8 stored records, got {Rr}")
        idx = torch.arange(Rr)
        folds = [idx[idx % 2 == 0], idx[idx % 2 == 1]]
        parts = []
        for a, b in ((0, 1), (1, 0)):
            k = max(1, min(rank, folds[b].numel() // 4))
            parts.append((folds[a], Correlation.from_influences(influence[folds[b]], k)))
        return cls(parts, "factor")

    def restrict(self, index: Tensor | slice) -> RecordCorrelation:
        """The same records, a subset of coordinates (a layer's block)."""
        return RecordCorrelation([(r, c.restrict(index)) for r, c in self.parts], self.kind)

    def _apply(self, influence: Tensor, fn: Callable[[Correlation, Tensor], Tensor]) -> Tensor:
        out = torch.empty(influence.shape[0], dtype=torch.float64)
        for rows, corr in self.parts:
            if rows is None:
                return fn(corr, influence)
            out[rows] = fn(corr, influence[rows])
        return out

    def gaussian_mean_abs(self, influence: Tensor, kappa: Tensor | None = None) -> Tensor:
        """``[R]`` Gaussian form ``sqrt(2/pi) sqrt(u' M^+ u)`` (``kappa None``: unquantized)."""
        return self._apply(influence, lambda c, w: gaussian_mean_abs(c, w, kappa))

    def mc_mean_abs(self, influence: Tensor, kappa: Tensor, coarse_index: Tensor, coarse_stats: CellStatistics,
                    mc_draws: int, generator: torch.Generator | None = None) -> Tensor:
        """``[R]`` Monte Carlo form (:func:`correlated_mc_mean_abs`)."""
        return self._apply(influence, lambda c, w: correlated_mc_mean_abs(
            c, w, kappa, coarse_index, coarse_stats, mc_draws, generator)[0])
