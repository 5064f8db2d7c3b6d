"""Ground truth of the best-attack advantage by simulation (not in the library's hot path).

The quantity (method.md section 1) is ``Delta = E_{Z1}[TV(law(T | Z1), law(T))]`` with
``T = Q(theta_hat)``. For a target record ``z`` we simulate ``M`` datasets of ``n - 1`` other
records once and train three times on the SAME other records (coupling):

* ``in``   -- the other records plus ``z``          (law of ``T`` given ``Z1 = z``);
* ``out``  -- the other records plus a fresh record (the marginal law of ``T``);
* ``null`` -- the other records plus another fresh record (same law as ``out``: the
  null arm measures the noise floor of an estimator).

Three estimators of ``TV_z = TV(law(T_in), law(T_out))`` are provided; the validation uses
the first as the ground truth and the other two to measure its bias:

1. :func:`tv_lr_test` (any ``d``, any scheme) -- an **unbiased estimate of a lower bound**:
   ``TV >= P_in(S) - P_out(S)`` for any fixed set ``S`` of codes. ``S = {LLR > 0}`` with the
   log-likelihood ratio of the released code under a Gaussian approximation of the law of
   ``theta_hat`` (mean and FULL covariance measured on the ``out`` arm, in-vs-out mean shift
   measured on the coupled pairs of the *other* fold: 2-fold cross-fitting, so ``S`` never
   sees the samples it is evaluated on): the Neyman-Pearson test between the two Gaussians
   of the first-order theory, its box probabilities by the GHK simulator. The
   probabilities of ``S`` are then estimated by plain counting on the simulated releases,
   which is unbiased: no assumption enters the value, only the choice of ``S``. When the
   Gaussian LR is the true LR the bound is the TV; an error ``eps`` in the LR only costs
   ``O(eps^2)`` (``S`` maximises ``P_in(S) - P_out(S)``). The earlier test used each
   coordinate's own law (diagonal covariance): with correlated weights it ignores what the
   attacker learns from the correlation and sits below the truth (``covariance=
   "independent"`` keeps it for comparison).
2. :func:`tv_histogram` (``d <= 2``) -- plug-in TV of the code histograms; biased upward
   by ~``sqrt(#codes / M)``, reported with its null-arm value (same-law arms).
3. :func:`exact_tv_ols_1d` (OLS, ``d = 1``, Gaussian design and noise) -- exact, no
   Monte Carlo over datasets: given ``S = sum x_i^2`` of the other records the estimator is
   exactly Gaussian, so the cell probabilities are 1-D integrals over ``S ~ chi^2``.

Logistic regression has an exact-up-to-Monte-Carlo truth by coupled arms in
:mod:`mis_lightning.groundtruth.logistic` (one fit per dataset, each added record by a Taylor
solve), which replaced the LR-test bound as the validation's logistic reference.

Data models: linear regression ``y = x . theta* + s eps`` (OLS, no intercept) and
logistic regression (MLE by batched Newton, no intercept), with Gaussian AR(1) design
``x ~ N(0, R)``, ``R_ij = rho^|i-j|``. OLS datasets are drawn through their sufficient
statistics (``X'X ~ Wishart(n-1, R)`` by Bartlett's decomposition, ``X'eps | X ~
N(0, X'X)``), so a dataset costs ``O(d^3)`` whatever ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import special, stats

# ---------------------------------------------------------------------------------------
# grids (the released code of a weight vector)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepGrid:
    """Round-to-nearest on the grid ``origin_j + (k - offset) * step_j`` (parameter units).

    Code ``k = round((theta_j - origin_j) / step_j + offset)``; cell of ``k``:
    ``origin_j + [(k - 1/2 - offset) step_j, (k + 1/2 - offset) step_j)``. With
    ``origin = theta*`` the offset places the true weight in its cell: 0 at the centre,
    0.25 a quarter of the way, 0.5 on a boundary.
    """

    name: str
    step: np.ndarray
    offset: float = 0.0
    origin: np.ndarray | float = 0.0
    family: str = "step"

    def codes(self, theta: np.ndarray) -> np.ndarray:
        return np.floor((theta - self.origin) / self.step + self.offset + 0.5)

    def cell_edges(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (self.origin + (codes - 0.5 - self.offset) * self.step,
                self.origin + (codes + 0.5 - self.offset) * self.step)


@dataclass(frozen=True)
class AbsmaxGrid:
    """Symmetric absmax round-to-nearest over the whole weight vector (one output channel):
    the formula of the built-in ``rtn_int{bits}`` schemes. The release is ``(q, scale)``: the
    scale is a float computed from the weights, so the largest-magnitude weight is
    released exactly (``qmax * scale``)."""

    name: str
    bits: int
    family: str = "absmax"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def release(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.maximum(np.abs(theta).max(-1, keepdims=True) / self.qmax, 1e-12)
        q = np.clip(np.round(theta / scale), -self.qmax - 1, self.qmax)
        return q, scale


@dataclass(frozen=True)
class TorchaoSymmetricGrid(AbsmaxGrid):
    """torchao's symmetric per-row absmax (``choose_qparams_affine`` with
    ``MappingType.SYMMETRIC``, the ``intx_weight_only_int{bits}`` schemes): ``scale = m /
    ((qmax - qmin) / 2) = m / (qmax + 1/2)``, codes clamped to ``[-qmax - 1, qmax]``. Against
    :class:`AbsmaxGrid` (``rtn_int*``, ``scale = m / qmax``) the released absmax sits on the
    edge of the top code's cell rather than at its centre (a whole top cell, the bottom bound
    on the lowest edge): the other geometry of a bounded outer cell (method.md section 5)."""

    def release(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.maximum(np.abs(theta).max(-1, keepdims=True) / (self.qmax + 0.5), 1e-12)
        q = np.clip(np.round(theta / scale), -self.qmax - 1, self.qmax)
        return q, scale


Grid = StepGrid | AbsmaxGrid


# ---------------------------------------------------------------------------------------
# data models and their population quantities
# ---------------------------------------------------------------------------------------


def ar1(d: int, rho: float) -> np.ndarray:
    i = np.arange(d)
    return rho ** np.abs(i[:, None] - i[None, :])


@dataclass
class Setting:
    """One simulated learning problem."""

    model: str  # "linear" or "logistic"
    d: int
    n: int
    theta_star: np.ndarray
    noise: float = 1.0
    rho: float = 0.0
    # population quantities (filled by population())
    Sigma: np.ndarray | None = None  # asymptotic covariance of sqrt(n)(theta_hat - theta*)
    H: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def chol(self) -> np.ndarray:
        return np.linalg.cholesky(ar1(self.d, self.rho))

    @property
    def sd(self) -> np.ndarray:
        """Std of each ``theta_hat_j`` (parameter units): ``sqrt(Sigma_jj / n)``."""
        assert self.Sigma is not None
        return np.sqrt(np.diag(self.Sigma) / self.n)

    def label(self) -> str:
        r = f", rho={self.rho:g}" if self.rho else ""
        return f"{self.model} d={self.d} n={self.n}{r}"


def make_setting(model: str, d: int, n: int, rho: float = 0.0, seed: int = 0,
                 noise: float = 1.0, scale: float | None = None) -> Setting:
    rng = np.random.default_rng([seed, d, 7])
    if scale is None:
        scale = 1.0 if model == "linear" else 1.0 / math.sqrt(d)
    theta = scale * rng.standard_normal(d)
    s = Setting(model=model, d=d, n=n, theta_star=theta, noise=noise, rho=rho)
    population(s)
    return s


def population(s: Setting, mc: int = 400_000, seed: int = 123) -> Setting:
    R = ar1(s.d, s.rho)
    if s.model == "linear":
        s.H = R
        s.Sigma = s.noise**2 * np.linalg.inv(R)
    else:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((mc, s.d)) @ s.chol.T
        p = special.expit(x @ s.theta_star)
        H = (x * (p * (1 - p))[:, None]).T @ x / mc
        s.H = H
        s.Sigma = np.linalg.inv(H)  # well-specified: V = H
    return s


def draw_records(s: Setting, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``k`` records ``(x [k, d], y [k])`` from the data model."""
    x = rng.standard_normal((k, s.d)) @ s.chol.T
    eta = x @ s.theta_star
    if s.model == "linear":
        y = eta + s.noise * rng.standard_normal(k)
    else:
        y = (rng.random(k) < special.expit(eta)).astype(np.float64)
    return x, y


def influence(s: Setting, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Population influence ``psi(z) = -H^{-1} grad l(theta*; z)``, ``[k, d]``."""
    eta = x @ s.theta_star
    r = (y - eta) if s.model == "linear" else (y - special.expit(eta))
    return (x * r[:, None]) @ np.linalg.inv(s.H).T


# ---------------------------------------------------------------------------------------
# training on many datasets at once
# ---------------------------------------------------------------------------------------


def _wishart_chol(d: int, df: int, M: int, rng: np.random.Generator) -> np.ndarray:
    """Lower-triangular ``L [M, d, d]`` with ``L L' ~ Wishart(df, I)`` (Bartlett)."""
    L = np.zeros((M, d, d))
    ii = np.arange(d)
    L[:, ii, ii] = np.sqrt(rng.chisquare(df - ii, size=(M, d)))
    tri = np.tril_indices(d, -1)
    L[:, tri[0], tri[1]] = rng.standard_normal((M, len(tri[0])))
    return L


def simulate_ols(s: Setting, zx: np.ndarray, zy: np.ndarray, M: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Coupled OLS fits for one target ``(zx [d], zy)``: ``{"in","out","null"}: [M, d]``."""
    d, n = s.d, s.n
    C = s.chol
    L = C[None] @ _wishart_chol(d, n - 1, M, rng)  # chol of X_o'X_o
    A = L @ np.swapaxes(L, 1, 2)
    b = A @ s.theta_star + s.noise * (L @ rng.standard_normal((M, d, 1)))[..., 0]
    out = {}
    xin = np.broadcast_to(zx, (M, d))
    yin = np.broadcast_to(zy, (M,))
    xo, yo = draw_records(s, M, rng)
    xn, yn = draw_records(s, M, rng)
    for arm, (x, y) in {"in": (xin, yin), "out": (xo, yo), "null": (xn, yn)}.items():
        Aa = A + x[:, :, None] * x[:, None, :]
        ba = b + x * y[:, None]
        out[arm] = np.linalg.solve(Aa, ba[..., None])[..., 0]
    return out


def simulate_logistic(s: Setting, zx: np.ndarray, zy: float, M: int,
                      rng: np.random.Generator, chunk: int | None = None) -> dict[str, np.ndarray]:
    """Coupled logistic-regression MLEs (batched Newton in torch, float64).

    The ``out`` arm is solved from ``theta*``; the ``in`` and ``null`` arms, which differ
    from it by one record, start from the ``out`` solution (a few Newton steps)."""
    d, n = s.d, s.n
    chunk = chunk or max(1, int(3e6 // (n * d)))
    res = {"in": [], "out": [], "null": []}
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    C = torch.from_numpy(s.chol)
    th_star = torch.from_numpy(s.theta_star)
    for a in range(0, M, chunk):
        m = min(chunk, M - a)
        X = torch.randn(m, n, d, dtype=torch.float64, generator=gen) @ C.T
        P = torch.sigmoid(X @ th_star)
        Y = (torch.rand(m, n, dtype=torch.float64, generator=gen) < P).to(torch.float64)
        x_last, y_last = X[:, -1].clone(), Y[:, -1].clone()  # the out arm's fresh record
        th_out = newton_logistic(X, Y, th_star)
        xg, yg = draw_records(s, m, rng)
        for arm, (x1, y1) in {
            "in": (torch.from_numpy(np.broadcast_to(zx, (m, d)).copy()), torch.full((m,), float(zy), dtype=torch.float64)),
            "null": (torch.from_numpy(xg), torch.from_numpy(yg)),
        }.items():
            X[:, -1], Y[:, -1] = x1, y1
            res[arm].append(newton_logistic(X, Y, th_out).numpy())
        X[:, -1], Y[:, -1] = x_last, y_last
        res["out"].append(th_out.numpy())
    return {k: np.concatenate(v) for k, v in res.items()}


def newton_logistic(X: torch.Tensor, Y: torch.Tensor, theta0: torch.Tensor, iters: int = 50,
                    ridge: float = 0.0, tol: float = 1e-10) -> torch.Tensor:
    """MLE of ``B`` logistic regressions ``X [B, n, d]``, ``Y [B, n]`` by damped Newton
    (``theta0``: ``[d]`` or ``[B, d]`` start; steps capped at length 2)."""
    B, n, d = X.shape
    th = theta0.expand(B, d).clone()
    eye = torch.eye(d, dtype=X.dtype)
    for _ in range(iters):
        # elementwise products and einsum: much faster than bmm for thin [n, d] blocks
        p = torch.sigmoid((X * th.unsqueeze(1)).sum(-1))
        g = ((Y - p).unsqueeze(-1) * X).sum(1) / n - ridge * th
        XW = X * (p * (1 - p)).unsqueeze(-1)
        Hm = torch.einsum("bni,bnj->bij", XW, X) / n + ridge * eye
        step = torch.linalg.solve(Hm, g)
        nrm = step.norm(dim=-1, keepdim=True)
        th = th + step * torch.clamp(2.0 / nrm.clamp_min(1e-300), max=1.0)
        if float(nrm.max()) < tol:
            break
    return th


def simulate(s: Setting, zx: np.ndarray, zy: float, M: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if s.model == "linear":
        return simulate_ols(s, zx, zy, M, rng)
    return simulate_logistic(s, zx, zy, M, rng)


# ---------------------------------------------------------------------------------------
# TV estimators
# ---------------------------------------------------------------------------------------


def _log_cell_prob(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``log(Phi(hi) - Phi(lo))`` for standardised edges, stable in both tails."""
    upper = lo > 0
    a = np.where(upper, -hi, lo)
    b = np.where(upper, -lo, hi)
    lb = special.log_ndtr(b)
    la = special.log_ndtr(a)
    return lb + np.log1p(-np.exp(np.minimum(la - lb, -1e-300)))


def _llr(grid: Grid, theta: np.ndarray, m_out: np.ndarray, shift: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Gaussian independent-coordinate log-likelihood ratio ``log P_in(T) / P_out(T)``
    of the releases of ``theta [M, d]``: in-law ``N(m_out + shift, sd^2)``, out-law
    ``N(m_out, sd^2)`` per coordinate."""
    m_in = m_out + shift
    if isinstance(grid, StepGrid):
        lo, hi = grid.cell_edges(grid.codes(theta))
        lp_in = _log_cell_prob((lo - m_in) / sd, (hi - m_in) / sd)
        lp_out = _log_cell_prob((lo - m_out) / sd, (hi - m_out) / sd)
        return (lp_in - lp_out).sum(-1)
    q, scale = grid.release(theta)
    # the largest-magnitude weight is released exactly: Gaussian density ratio
    jmax = np.abs(theta).argmax(-1)
    rows = np.arange(theta.shape[0])
    v = q[rows, jmax] * scale[:, 0]
    mi, mo, s_ = m_in[jmax], m_out[jmax], sd[jmax]
    dens = (-(v - mi) ** 2 + (v - mo) ** 2) / (2 * s_**2)
    lo, hi = (q - 0.5) * scale, (q + 0.5) * scale
    lo = np.where(q <= -grid.qmax - 1, -np.inf, lo)
    hi = np.where(q >= grid.qmax, np.inf, hi)
    lp = _log_cell_prob((lo - m_in) / sd, (hi - m_in) / sd) - _log_cell_prob((lo - m_out) / sd, (hi - m_out) / sd)
    lp[rows, jmax] = 0.0
    return lp.sum(-1) + dens


# Lower limit (conditional sd) above which GHK draws in the mirrored tail. Below it the mass
# 1 - Phi(a) >= 1.3e-3 is a difference of numbers <= 1, exact to ~1e-13 relative.
GHK_FLIP = 3.0


def _ghk_logprob(lo: torch.Tensor, hi: torch.Tensor, chol: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``log P(lo <= X <= hi)`` ``[N]`` for ``X ~ N(0, L L')`` (``lo, hi [N, c]`` already
    centred, ``+-inf`` allowed) by the GHK simulator with the given uniforms ``u [N, D, c]``
    (common random numbers: the same ``u`` for the in and out laws of one release makes their
    log-ratio smooth in the shift)."""
    N, D, c = u.shape
    eps = torch.zeros(N, D, c, dtype=torch.float64)
    logw = torch.zeros(N, D, dtype=torch.float64)
    for k in range(c):
        s = eps[:, :, :k] @ chol[k, :k] if k else torch.zeros(N, D, dtype=torch.float64)
        a = (lo[:, k : k + 1] - s) / chol[k, k]
        b = (hi[:, k : k + 1] - s) / chol[k, k]
        # far in the upper tail, work in the mirrored lower tail (relative precision of erfc);
        # not at 0: a box edge near the mean would flip for one law and not for the other, and
        # the same uniforms would then give unrelated draws (common random numbers lost:
        # coarse boundary boxes in d = 5 read 50% high at 512 draws, 1% at 32,768)
        flip = a > GHK_FLIP
        aa, bb = torch.where(flip, -b, a), torch.where(flip, -a, b)
        pa = 0.5 * torch.special.erfc(-aa / math.sqrt(2.0))
        pb = 0.5 * torch.special.erfc(-bb / math.sqrt(2.0))
        x = torch.special.ndtri((pa + u[..., k] * (pb - pa)).clamp(1e-300, 1 - 1e-16))
        x = torch.minimum(torch.maximum(x, aa), bb)
        eps[:, :, k] = torch.where(flip, -x, x)
        logw += torch.log((pb - pa).clamp_min(1e-300))
    return torch.logsumexp(logw, 1) - math.log(D)


# GHK draws per release in the full-covariance LR test (the test only needs the sign of the
# log-ratio; its noise makes the set S slightly suboptimal, never the bound invalid).
LR_GHK_DRAWS = 48


def _llr_full(grid: Grid, theta: np.ndarray, m_out: np.ndarray, shift: np.ndarray, cov: np.ndarray,
              seed: int = 0, draws: int = LR_GHK_DRAWS) -> np.ndarray:
    """Gaussian log-likelihood ratio ``log P_in(T) / P_out(T)`` of the releases of
    ``theta [M, d]`` with the FULL covariance: in-law ``N(m_out + shift, cov)``, out-law
    ``N(m_out, cov)`` -- the Neyman-Pearson test between the two Gaussians of the first-order
    theory, read on the released codes. Box probabilities by GHK (:func:`_ghk_logprob`); for
    absmax grids the exactly released largest weight enters by its density and the other
    boxes are conditioned on it."""
    M, d = theta.shape
    gen = torch.Generator().manual_seed(seed)
    # antithetic pairs (u, 1 - u): less simulator noise in the log-ratio for the same draws
    u = torch.rand(M, max(1, draws // 2), d, dtype=torch.float64, generator=gen)
    u = torch.cat([u, 1.0 - u], 1)
    m_in = m_out + shift
    if isinstance(grid, StepGrid):
        lo, hi = grid.cell_edges(grid.codes(theta))
        L = torch.linalg.cholesky(torch.from_numpy(cov))
        lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
        lp_in = _ghk_logprob(lo_t - torch.from_numpy(m_in), hi_t - torch.from_numpy(m_in), L, u)
        lp_out = _ghk_logprob(lo_t - torch.from_numpy(m_out), hi_t - torch.from_numpy(m_out), L, u)
        return (lp_in - lp_out).numpy()
    q, scale = grid.release(theta)
    lo, hi = (q - 0.5) * scale, (q + 0.5) * scale
    lo = np.where(q <= -grid.qmax - 1, -np.inf, lo)
    hi = np.where(q >= grid.qmax, np.inf, hi)
    jmax = np.abs(theta).argmax(-1)
    out = np.zeros(M)
    for j in np.unique(jmax):
        rows = np.nonzero(jmax == j)[0]
        rest = np.array([i for i in range(d) if i != j])
        v = q[rows, j] * scale[rows, 0]
        s_jj = cov[j, j]
        dens = (-(v - m_in[j]) ** 2 + (v - m_out[j]) ** 2) / (2 * s_jj)
        if rest.size == 0:
            out[rows] = dens
            continue
        beta = cov[rest, j] / s_jj
        cc = cov[np.ix_(rest, rest)] - np.outer(cov[rest, j], cov[j, rest]) / s_jj
        L = torch.linalg.cholesky(torch.from_numpy(cc))
        lp = []
        for m in (m_in, m_out):
            cm = m[rest][None] + beta[None] * (v - m[j])[:, None]  # conditional mean [r, d-1]
            lp.append(_ghk_logprob(torch.from_numpy(lo[np.ix_(rows, rest)] - cm),
                                   torch.from_numpy(hi[np.ix_(rows, rest)] - cm), L, u[rows][..., : rest.size]))
        out[rows] = dens + (lp[0] - lp[1]).numpy()
    return out


@dataclass
class ArmMoments:
    """Mean, sd and full covariance of the out arm (the marginal law of theta_hat)."""

    mean: np.ndarray
    sd: np.ndarray
    cov: np.ndarray | None = None

    @classmethod
    def of(cls, theta: np.ndarray) -> ArmMoments:
        """From out-arm draws ``[M, d]``."""
        return cls(theta.mean(0), theta.std(0), np.atleast_2d(np.cov(theta, rowvar=False)))


def tv_lr_test(grid: Grid, sims: dict[str, np.ndarray], mom: ArmMoments, folds: int = 2,
               covariance: str = "full", seed: int = 0) -> tuple[float, float]:
    """Cross-fitted LR-test lower bound on ``TV_z``: ``(value, null value)``.

    ``covariance="full"`` (default; needs ``mom.cov``) tests with the full covariance of the
    out arm (:func:`_llr_full`), ``"independent"`` with its diagonal (:func:`_llr`; biased low
    for correlated weights, whose correlation the attacker can use -- issue 11). The null
    value applies the same test to the ``null`` arm in place of ``in`` (its expectation is
    0: it measures nothing but noise).
    """
    if covariance not in ("full", "independent"):
        raise ValueError(f"covariance must be 'full' or 'independent', got {covariance!r}")
    if covariance == "full" and mom.cov is None:
        raise ValueError("covariance='full' needs ArmMoments.cov (ArmMoments.of(out-arm draws))")

    def llr(theta: np.ndarray, shift: np.ndarray, k: int) -> np.ndarray:
        if covariance == "independent":
            return _llr(grid, theta, mom.mean, shift, mom.sd)
        return _llr_full(grid, theta, mom.mean, shift, mom.cov, seed=seed * 1009 + k)

    M = sims["in"].shape[0]
    idx = np.arange(M) % folds
    vals, nulls = [], []
    for f in range(folds):
        fit, ev = idx != f, idx == f
        shift = (sims["in"][fit] - sims["out"][fit]).mean(0)
        shift_null = (sims["null"][fit] - sims["out"][fit]).mean(0)
        # GHK uniforms drawn per evaluation, independently of the releases: a randomised
        # test, whose bound stays valid
        a_in = llr(sims["in"][ev], shift, 4 * f) > 0
        a_out = llr(sims["out"][ev], shift, 4 * f + 1) > 0
        vals.append(a_in.mean() - a_out.mean())
        b_null = llr(sims["null"][ev], shift_null, 4 * f + 2) > 0
        b_out = llr(sims["out"][ev], shift_null, 4 * f + 3) > 0
        nulls.append(b_null.mean() - b_out.mean())
    return float(np.mean(vals)), float(np.mean(nulls))


def tv_histogram(grid: StepGrid, sims: dict[str, np.ndarray]) -> tuple[float, float]:
    """Plug-in TV of the code histograms ``(in vs out, null vs out)`` (``d <= 2``)."""

    def hist(theta: np.ndarray) -> dict:
        c = grid.codes(theta).astype(np.int64)
        keys, counts = np.unique(c, axis=0, return_counts=True)
        return {tuple(k): v for k, v in zip(keys.tolist(), counts.tolist())}

    M = sims["in"].shape[0]
    h_out = hist(sims["out"])

    def tv(h: dict) -> float:
        keys = set(h) | set(h_out)
        return 0.5 * sum(abs(h.get(k, 0) - h_out.get(k, 0)) for k in keys) / M

    return tv(hist(sims["in"])), tv(hist(sims["null"]))


def exact_tv_ols_1d(s: Setting, grid: StepGrid | None, zx: float, zy: float, K: int = 2000) -> float:
    """Exact ``TV_z`` for OLS with ``d = 1`` (Gaussian design and noise, no intercept).

    Given ``S = sum x_i^2`` over the other ``n - 1`` records (``S ~ rho0 chi^2_{n-1}``; here
    ``Var x = 1``): ``theta_in | S ~ N(theta* + zx (zy - zx theta*) / (S + zx^2),
    s^2 S / (S + zx^2)^2)`` and ``theta_out | S_n ~ N(theta*, s^2 / S_n)``, ``S_n ~ chi^2_n``.
    Cell probabilities are integrated over ``S`` on ``K`` quantile nodes (midpoint rule on
    the probability scale). ``grid=None``: the unquantized release (TV of densities on a
    fine ``theta`` grid).
    """
    n, t, sn = s.n, float(s.theta_star[0]), s.noise
    u = (np.arange(K) + 0.5) / K
    S = stats.chi2.ppf(u, n - 1)
    Sn = stats.chi2.ppf(u, n)
    m_in = t + zx * (zy - zx * t) / (S + zx**2)
    v_in = sn * np.sqrt(S) / (S + zx**2)
    v_out = sn / np.sqrt(Sn)
    sd0 = sn / math.sqrt(n)
    if grid is None:
        xs = t + np.linspace(-9, 9, 3601) * sd0
        dx = xs[1] - xs[0]
        sub = slice(None, None, max(1, K // 400))  # 400 nodes suffice for smooth densities
        mi, vi, vo = m_in[sub, None], v_in[sub, None], v_out[sub, None]
        p_in = (np.exp(-0.5 * ((xs[None] - mi) / vi) ** 2) / vi).mean(0)
        p_out = (np.exp(-0.5 * ((xs[None] - t) / vo) ** 2) / vo).mean(0)
        return float(0.5 * np.abs(p_in - p_out).sum() * dx / math.sqrt(2 * math.pi))
    h = float(grid.step[0])
    k0 = grid.codes(np.array([[t - 12 * sd0]]))[0, 0]
    k1 = grid.codes(np.array([[t + 12 * sd0]]))[0, 0]
    ks = np.arange(k0, k1 + 1)
    org = float(np.asarray(grid.origin).reshape(-1)[0])
    edges = np.concatenate([[-np.inf], org + (ks[1:] - 0.5 - grid.offset) * h, [np.inf]])
    P_in = np.diff(special.ndtr((edges[None] - m_in[:, None]) / v_in[:, None]), axis=1).mean(0)
    P_out = np.diff(special.ndtr((edges[None] - t) / v_out[:, None]), axis=1).mean(0)
    return float(0.5 * np.abs(P_in - P_out).sum())


def _box_probs_2d(mu: np.ndarray, cov: np.ndarray, e1: np.ndarray, e2: np.ndarray, nodes: int) -> np.ndarray:
    """``[C1, C2]`` probabilities of the boxes of edges ``e1 x e2`` under ``N(mu_k, cov_k)``,
    averaged over ``k`` (``mu [K, 2]``, ``cov [K, 2, 2]``). Coordinate 1 is integrated in
    probability space cell by cell (Gauss-Legendre, ``nodes`` per cell: the integrand
    ``P(cell of theta_2 | theta_1)`` is smooth inside a cell), coordinate 2 in closed form."""
    x, wq = np.polynomial.legendre.leggauss(nodes)
    s1 = np.sqrt(cov[:, 0, 0])
    ua = special.ndtr((e1[None, :-1] - mu[:, :1]) / s1[:, None])  # [K, C1]
    ub = special.ndtr((e1[None, 1:] - mu[:, :1]) / s1[:, None])
    u = ua[..., None] + (ub - ua)[..., None] * (x + 1) / 2  # [K, C1, Q]
    t = mu[:, 0, None, None] + s1[:, None, None] * special.ndtri(np.clip(u, 1e-300, 1 - 1e-16))
    beta = cov[:, 0, 1] / cov[:, 0, 0]
    s2c = np.sqrt(np.maximum(cov[:, 1, 1] - cov[:, 0, 1] * beta, 1e-300))
    m2 = mu[:, 1, None, None] + beta[:, None, None] * (t - mu[:, 0, None, None])
    cdf = special.ndtr((e2[None, None, None, :] - m2[..., None]) / s2c[:, None, None, None])
    cond = np.diff(cdf, axis=-1)  # [K, C1, Q, C2]
    p = ((ub - ua)[..., None] / 2 * np.einsum("q,kcqm->kcm", wq, cond))
    return p.mean(0)


def _release_laws(s: Setting, zx: np.ndarray, zy: float, K: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The OLS estimator's exact laws given ``K`` coupled designs (the other records'
    ``A = X_o'X_o ~ Wishart(n - 1, R)``, the same ``A`` for both arms): with the target ``z``,
    ``N(mu_in, cov_in)``, ``mu_in = B (A theta* + z y_z)``, ``cov_in = s^2 B A B``,
    ``B = (A + z z')^-1``; without it (a fresh record ``x`` instead), ``N(theta*, cov_out)``,
    ``cov_out = s^2 (A + x x')^-1``. Returns ``mu_in [K, d], cov_in [K, d, d], cov_out [K, d, d]``."""
    L = s.chol[None] @ _wishart_chol(s.d, s.n - 1, K, rng)
    A = L @ np.swapaxes(L, 1, 2)
    xo, _ = draw_records(s, K, rng)
    An = A + xo[:, :, None] * xo[:, None, :]
    z = np.asarray(zx, dtype=np.float64)
    B = np.linalg.inv(A + np.outer(z, z)[None])
    mu_in = (B @ (A @ s.theta_star + z * zy)[..., None])[..., 0]
    return mu_in, s.noise**2 * B @ A @ B, s.noise**2 * np.linalg.inv(An)


def exact_tv_ols_2d(s: Setting, grid: StepGrid, zx: np.ndarray, zy: float, K: int = 1000,
                    nodes: int = 16, seed: int = 0) -> float:
    """``TV_z`` for OLS with ``d = 2`` (Gaussian AR(1) design and noise, no intercept),
    exact given the design: no Monte Carlo over the noise, none over the released codes.

    Given the other records' ``A = X_o'X_o`` (``Wishart(n - 1, R)``) the estimators are
    exactly Gaussian: ``theta_in ~ N(B (A theta* + z y_z), s^2 B A B)``, ``B = (A + z z')^-1``,
    and ``theta_out ~ N(theta*, s^2 (A + x x')^-1)`` with a fresh record ``x``. Box
    probabilities of both laws are exact 1-D integrals (:func:`_box_probs_2d`); only the
    design is averaged over ``K`` coupled draws (the same ``A`` for both arms, so the
    difference carries little Monte Carlo noise).
    """
    if s.d != 2 or s.model != "linear":
        raise ValueError(f"exact_tv_ols_2d needs linear d = 2, got {s.label()}")
    rng = np.random.default_rng([seed, 2024])
    mu_in, cov_in, cov_out = _release_laws(s, zx, zy, K, rng)
    mu_out = np.broadcast_to(s.theta_star, (K, 2))
    sd0 = s.sd
    edges = []
    for j in range(2):
        k0 = grid.codes(np.array([[s.theta_star[0] - 12 * sd0[0], s.theta_star[1] - 12 * sd0[1]]]))[0, j]
        k1 = grid.codes(np.array([[s.theta_star[0] + 12 * sd0[0], s.theta_star[1] + 12 * sd0[1]]]))[0, j]
        ks = np.arange(k0, k1 + 1)
        org = float(np.broadcast_to(np.asarray(grid.origin, dtype=np.float64), (2,))[j])
        inner = org + (ks[1:] - 0.5 - grid.offset) * float(np.broadcast_to(grid.step, (2,))[j])
        edges.append(np.concatenate([[-np.inf], inner, [np.inf]]))
    p_in = _box_probs_2d(mu_in, cov_in, edges[0], edges[1], nodes)
    p_out = _box_probs_2d(mu_out, cov_out, edges[0], edges[1], nodes)
    return float(0.5 * np.abs(p_in - p_out).sum())


def exact_tv_ols(s: Setting, grid: StepGrid, zx: np.ndarray, zy: float, K: int = 150, M: int = 4000,
                 draws: int = 128, seed: int = 0, design_error: bool = True) -> tuple[float, float]:
    """``TV_z`` for OLS in any ``d`` (Gaussian AR(1) design and noise, no intercept) and its
    standard error: exact given the design up to a Monte Carlo over releases, with no
    simulated training and no test statistic.

    As in :func:`exact_tv_ols_2d`, given the other records' ``A`` both estimators are exactly
    Gaussian and the release laws are their mixtures over ``K`` coupled designs. The TV is
    ``E_{T ~ P_in}[(1 - P_out(T) / P_in(T))_+]`` over released boxes ``T``: ``M`` releases drawn
    from the in-mixture, each box's probability under every design and both laws by GHK
    (antithetic draws, the same uniforms for both laws and all designs), ``draws`` in all
    split in two independent halves: one decides the side ``P_out < P_in``, the other gives the
    ratio (the positive part of one noisy ratio is biased upward by about its noise). For
    ``d = 2``, :func:`exact_tv_ols_2d` is exact with no Monte Carlo over releases (the check of
    this function).

    Returns:
        ``(TV, standard error)``: over the ``M`` releases and, with ``design_error`` (default),
        the ``K`` designs (a jackknife, :func:`_split_sample_tv`); without it the release part
        alone (the error against a reference on the same designs).
    """
    if s.model != "linear":
        raise ValueError(f"exact_tv_ols needs a linear setting, got {s.label()}")
    d = s.d
    rng = np.random.default_rng([seed, 2025])
    mu_in, _, ch_in, cov_out, T = _in_mixture_draws(s, zx, zy, K, M, rng)
    ch_out = np.linalg.cholesky(cov_out)  # [K, d, d]
    lo, hi = grid.cell_edges(grid.codes(T))
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
    mu_o = torch.from_numpy(np.broadcast_to(s.theta_star, (d,)).copy())

    def log_probs() -> tuple[torch.Tensor, torch.Tensor]:  # log P_k(T) [K, M] per design, one set of uniforms
        u = torch.rand(M, max(1, draws // 4), d, dtype=torch.float64, generator=gen)
        u = torch.cat([u, 1.0 - u], 1)
        lp_in = torch.stack([_ghk_logprob(lo_t - torch.from_numpy(mu_in[j]), hi_t - torch.from_numpy(mu_in[j]),
                                          torch.from_numpy(ch_in[j]), u) for j in range(K)])
        lp_out = torch.stack([_ghk_logprob(lo_t - mu_o, hi_t - mu_o, torch.from_numpy(ch_out[j]), u)
                              for j in range(K)])
        return lp_out, lp_in

    # Split sample: one set of uniforms decides the side (r < 1), an independent one gives the
    # ratio. (1 - r)_+ of one noisy ratio is biased upward by about the simulator's noise; with
    # the split, a box is only lost when its side is misjudged, where 1 - r is within the noise.
    # (The large noise once measured on coarse 5-d boxes, 2x the value at 32 draws, was the
    # simulator's tail mirroring, GHK_FLIP.)
    return _split_sample_tv(log_probs, design_error)


def _in_mixture_draws(s: Setting, zx: np.ndarray, zy: float, K: int, M: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_release_laws` of ``K`` designs with the in-law's Cholesky factors
    (``mu_in, cov_in, chol_in, cov_out``), and ``M`` estimators ``[M, d]`` drawn from the
    in-mixture (a design at random, then its Gaussian law): the releases' weights."""
    mu_in, cov_in, cov_out = _release_laws(s, zx, zy, K, rng)
    ch_in = np.linalg.cholesky(cov_in)
    k = rng.integers(0, K, M)
    T = mu_in[k] + (ch_in[k] @ rng.standard_normal((M, s.d, 1)))[..., 0]
    return mu_in, cov_in, ch_in, cov_out, T


# Groups of designs the delete-a-group jackknife of :func:`_split_sample_tv` leaves out in turn.
DESIGN_JACKKNIFE_GROUPS = 20


def _split_sample_tv(log_probs: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                     design_error: bool = True) -> tuple[float, float]:
    """``E[(1 - P_out / P_in)_+]`` over releases of the ``K``-design mixtures and its standard
    error, split sample: one call of ``log_probs`` (fresh simulator draws; ``log P_out, log
    P_in [K, M]`` of every release under every design) decides the side ``P_out < P_in``, an
    independent one gives the ratio ((1 - r)_+ of one noisy ratio is biased upward by about
    its noise).

    The standard error over the ``M`` releases alone treats the ``K`` designs as fixed, but the
    value is that of their mixtures, a Monte Carlo over designs too: at ``K = 150`` its spread
    over design seeds is 1.4x (a TV of 0.053) to 4-5x (0.003) the release se (linear d = 2,
    ``rtn_int4``; docs/benchmarks.md, "gt46"). With ``design_error`` the returned se
    adds a delete-a-group jackknife over the designs (:data:`DESIGN_JACKKNIFE_GROUPS` groups;
    each group's value reweights the same releases to the other designs' mixture)."""
    o1, i1 = log_probs()
    o2, i2 = log_probs()
    side = torch.logsumexp(o1, 0) < torch.logsumexp(i1, 0)
    li2 = torch.logsumexp(i2, 0)
    v = torch.where(side, -torch.expm1(torch.logsumexp(o2, 0) - li2), torch.zeros(())).numpy()
    value, var = float(v.mean()), float(v.var() / v.shape[0])
    K = o1.shape[0]
    groups = min(K, DESIGN_JACKKNIFE_GROUPS)
    if design_error and groups >= 2:
        loo = []
        for block in np.array_split(np.arange(K), groups):
            keep = torch.ones(K, dtype=torch.bool)
            keep[torch.from_numpy(block)] = False
            ki2 = torch.logsumexp(i2[keep], 0)
            s_g = torch.logsumexp(o1[keep], 0) < torch.logsumexp(i1[keep], 0)
            w = torch.exp(ki2 - li2) * (K / int(keep.sum()))  # P_in of the kept designs / P_in of all
            loo.append(float((torch.where(s_g, -torch.expm1(torch.logsumexp(o2[keep], 0) - ki2),
                                          torch.zeros(())) * w).mean()))
        loo_a = np.asarray(loo)
        var += (groups - 1) / groups * float(((loo_a - loo_a.mean()) ** 2).sum())
    return value, math.sqrt(var)


def _absmax_release(grid: AbsmaxGrid, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What an absmax release ``(q, scale)`` of ``theta [M, d]`` determines: the index ``i`` of
    the largest-magnitude weight, its value ``v = theta_i`` (``qmax * scale`` with the sign of
    its code: given away exactly), and the boxes ``lo, hi [M, d]`` of the other weights
    (``[(q - 1/2) s, (q + 1/2) s]`` cut to ``(-|v|, |v|)``; column ``i`` unused)."""
    q, scale = grid.release(theta)
    i = np.abs(theta).argmax(-1)
    v = np.take_along_axis(theta, i[:, None], 1)[:, 0]
    m = np.abs(v)[:, None]
    lo = np.maximum((q - 0.5) * scale, -m)
    hi = np.minimum((q + 0.5) * scale, m)
    return i, v, lo, hi


def exact_tv_ols_absmax(s: Setting, grid: AbsmaxGrid, zx: np.ndarray, zy: float, K: int = 150, M: int = 4000,
                        draws: int = 128, seed: int = 0, design_error: bool = True) -> tuple[float, float]:
    """``TV_z`` for OLS in any ``d`` under a symmetric absmax release (the built-in
    ``rtn_int*`` schemes: codes and one float scale): exact given the design up to a Monte
    Carlo over releases, as :func:`exact_tv_ols`.

    The scale gives away the largest-magnitude weight, so a release is ``(i, v, q_-i)``: the
    index ``i`` of that weight, its value ``v`` (continuous) and the other weights' codes on the
    grid of step ``|v| / qmax`` (discrete, each box cut to ``(-|v|, |v|)``). Under one design's
    Gaussian law ``N(mu, S)`` its density is ``phi(v; mu_i, S_ii) P(theta_-i in box | theta_i = v)``
    (the conditional Gaussian; the box probability by GHK, the same uniforms for both laws and
    every design), and the TV is ``E_{T ~ P_in}[(1 - P_out(T) / P_in(T))_+]`` over releases of
    the in-mixture (split sample as :func:`exact_tv_ols`). With ``d = 1`` the release is the
    weight itself (the unquantized TV). Checked for ``d = 2`` against a quadrature over ``v``
    (tests/test_validation.py).

    Returns:
        ``(TV, standard error)``: over the ``M`` releases and, with ``design_error`` (default),
        the ``K`` designs (a jackknife, :func:`_split_sample_tv`); without it the release part
        alone (the error against a reference on the same designs).
    """
    if s.model != "linear":
        raise ValueError(f"exact_tv_ols_absmax needs a linear setting, got {s.label()}")
    d = s.d
    rng = np.random.default_rng([seed, 2026])
    mu_in, cov_in, _, cov_out, T = _in_mixture_draws(s, zx, zy, K, M, rng)
    idx, v, lo, hi = _absmax_release(grid, T)
    mu_out = np.broadcast_to(s.theta_star, (K, d))
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))

    def log_density(mu: np.ndarray, cov: np.ndarray, u: torch.Tensor) -> torch.Tensor:
        """``log p_k(T) [K, M]`` of every release under each design's law ``N(mu_k, cov_k)``."""
        out = torch.empty(K, M, dtype=torch.float64)
        for i in range(d):
            sel = np.nonzero(idx == i)[0]
            if sel.size == 0:
                continue
            rest = [j for j in range(d) if j != i]
            var = cov[:, i, i]  # [K]
            dv = v[sel][None, :] - mu[:, i][:, None]  # [K, m]
            lp = -0.5 * dv**2 / var[:, None] - 0.5 * np.log(2 * np.pi * var)[:, None]
            if rest:
                a = cov[:, rest, i] / var[:, None]  # [K, d-1] regression on theta_i
                cc = cov[:, rest][:, :, rest] - a[:, :, None] * cov[:, i, rest][:, None, :]
                chol = np.linalg.cholesky(cc)
                us = u[torch.from_numpy(sel)][:, :, : d - 1]
                for kk in range(K):
                    mean = mu[kk, rest][None, :] + a[kk][None, :] * dv[kk][:, None]  # [m, d-1]
                    lp[kk] += _ghk_logprob(torch.from_numpy(lo[sel][:, rest] - mean),
                                           torch.from_numpy(hi[sel][:, rest] - mean),
                                           torch.from_numpy(chol[kk]), us).numpy()
            out[:, torch.from_numpy(sel)] = torch.from_numpy(lp)
        return out

    def log_probs() -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(M, max(1, draws // 4), max(d - 1, 1), dtype=torch.float64, generator=gen)
        u = torch.cat([u, 1.0 - u], 1)
        return log_density(mu_out, cov_out, u), log_density(mu_in, cov_in, u)

    return _split_sample_tv(log_probs, design_error)


def exact_tv_ols_unquantized(s: Setting, zx: np.ndarray, zy: float, K: int = 150, M: int = 4000,
                             seed: int = 0) -> tuple[float, float]:
    """``TV_z`` for OLS in any ``d`` with the weights released unquantized, and its standard
    error: ``E_{T ~ P_in}[(1 - p_out(T) / p_in(T))_+]`` with the exact densities of the two
    Gaussian mixtures over ``K`` coupled designs, on the releases ``T [M, d]`` that
    :func:`exact_tv_ols_absmax` draws with the same ``seed`` (the same designs and weights: a
    paired comparison). Every release is a function of the weights, so by data processing this
    bounds each quantized truth from above; a fine absmax grid sits just below it (linear
    ``d = 2``, ``rtn_int8``: -0.04%; docs/benchmarks.md, "cov43")."""
    if s.model != "linear":
        raise ValueError(f"exact_tv_ols_unquantized needs a linear setting, got {s.label()}")
    rng = np.random.default_rng([seed, 2026])  # the stream of exact_tv_ols_absmax
    mu_in, cov_in, _, cov_out, T = _in_mixture_draws(s, zx, zy, K, M, rng)

    def log_mixture(mu: np.ndarray, cov: np.ndarray) -> np.ndarray:  # log p(T) [M]; the 1/K cancels
        ch = np.linalg.cholesky(cov)
        r = np.linalg.solve(ch[:, None], (T[None] - mu[:, None])[..., None])[..., 0]  # [K, M, d]
        lp = -0.5 * (r**2).sum(-1) - np.log(np.diagonal(ch, axis1=1, axis2=2)).sum(-1)[:, None]
        return special.logsumexp(lp, 0)

    v = -np.expm1(np.minimum(log_mixture(np.broadcast_to(s.theta_star, mu_in.shape), cov_out)
                             - log_mixture(mu_in, cov_in), 0.0))
    return float(v.mean()), float(v.std() / math.sqrt(M))


# Boxes a release may fall in, at most, for :func:`exact_tv_ols_boxes` (beyond: NaN).
BOX_SUM_MAX_BOXES = 20_000


def exact_tv_ols_boxes(s: Setting, grid: StepGrid, zx: np.ndarray, zy: float, K: int = 60, draws: int = 512,
                       seed: int = 0, reach: float = 6.0) -> tuple[float, float]:
    """``TV_z`` for OLS in any ``d`` on a coarse step grid, as a sum over the released boxes:
    ``(1/2) sum_T |P_in(T) - P_out(T)|``, with no Monte Carlo over releases and no ratio.

    The release laws are the Gaussian mixtures over ``K`` coupled designs of
    :func:`exact_tv_ols`. Every box within ``reach`` sd (per coordinate, of every component's
    marginal) is enumerated, the outermost cells of each coordinate extended to +-inf (so the
    boxes partition the space: merging the far tails into the end boxes can only lower the TV,
    by at most their mass, ``d * 2 * Phi(-reach)`` = 1e-8 at 6 sd); each box probability by GHK
    with the same antithetic uniforms for every box, design and law (common random numbers:
    the in-out difference of a box is then estimated with noise in proportion to the
    difference, so ``|.|`` adds little noise floor). An independent check of
    :func:`exact_tv_ols` on coarse grids (no sampling of releases); its own check:
    ``exact_tv_ols_2d`` in ``d = 2`` (tests/test_validation.py).

    Returns:
        ``(TV, its spread over two independent halves of the draws / 2)`` (the second: a
        rough standard error of the simulator); ``(nan, nan)`` when more than
        :data:`BOX_SUM_MAX_BOXES` boxes would be needed (fine grids: use :func:`exact_tv_ols`).
    """
    if s.model != "linear":
        raise ValueError(f"exact_tv_ols_boxes needs a linear setting, got {s.label()}")
    d = s.d
    rng = np.random.default_rng([seed, 2024])  # the designs of exact_tv_ols_2d (its check)
    mu_in, cov_in, cov_out = _release_laws(s, zx, zy, K, rng)
    ch_in, ch_out = np.linalg.cholesky(cov_in), np.linalg.cholesky(cov_out)
    mu_out = np.broadcast_to(np.asarray(s.theta_star, dtype=np.float64), (d,))
    sd_in = np.sqrt(np.diagonal(cov_in, axis1=1, axis2=2))
    sd_out = np.sqrt(np.diagonal(cov_out, axis1=1, axis2=2))
    low = np.minimum((mu_in - reach * sd_in).min(0), (mu_out - reach * sd_out).min(0))
    high = np.maximum((mu_in + reach * sd_in).max(0), (mu_out + reach * sd_out).max(0))
    c_lo, c_hi = grid.codes(low), grid.codes(high)
    counts = (c_hi - c_lo + 1).astype(np.int64)
    if float(np.prod(counts.astype(np.float64))) > BOX_SUM_MAX_BOXES:
        return float("nan"), float("nan")
    mesh = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(c_lo, c_hi)], indexing="ij"), -1)
    codes = mesh.reshape(-1, d).astype(np.float64)
    lo, hi = grid.cell_edges(codes)
    lo, hi = np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)
    lo[codes == c_lo[None]] = -np.inf  # the far tails merged into the end cells
    hi[codes == c_hi[None]] = np.inf
    N = codes.shape[0]
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))
    half = max(1, draws // 4)
    u = torch.rand(1, half, d, dtype=torch.float64, generator=gen).expand(N, half, d)
    u = torch.cat([u, 1.0 - u], 1)  # antithetic; the same uniforms for every box, design and law
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)

    def probs(mu: np.ndarray, ch: np.ndarray, uu: torch.Tensor) -> torch.Tensor:
        m = torch.from_numpy(np.array(mu, dtype=np.float64))
        return _ghk_logprob(lo_t - m, hi_t - m, torch.from_numpy(ch), uu).exp()

    def tv(uu: torch.Tensor) -> float:
        p_in = sum(probs(mu_in[j], ch_in[j], uu) for j in range(K)) / K
        p_out = sum(probs(mu_out, ch_out[j], uu) for j in range(K)) / K
        return 0.5 * float((p_in - p_out).abs().sum())

    full = tv(u)
    # two independent halves of the antithetic pairs: a rough error of the simulator
    h1 = tv(torch.cat([u[:, : half // 2], u[:, half: half + half // 2]], 1)) if half >= 2 else full
    h2 = tv(torch.cat([u[:, half // 2: half], u[:, half + half // 2:]], 1)) if half >= 2 else full
    return full, abs(h1 - h2) / 2.0


def exact_truth_ols(s: Setting, grid: Grid, Z: int = 16, K: int = 150, M: int = 4000, seed: int = 0,
                    oracle_records: int = 4000, draws: int = 128) -> tuple[float, tuple[float, float]]:
    """``Delta`` of ``grid`` for OLS in any ``d``: :func:`exact_tv_ols` (step grids) or
    :func:`exact_tv_ols_absmax` (absmax releases) on ``Z`` targets ``z ~ P`` with the control
    variate of :func:`cv_estimate` (as :func:`exact_truth_ols_2d`). Returns the estimate and
    its 80% bootstrap interval over targets."""
    tv = exact_tv_ols if isinstance(grid, StepGrid) else exact_tv_ols_absmax
    return _targets_cv(s, grid, Z, seed, oracle_records,
                       lambda x, y, i: tv(s, grid, x, y, K=K, M=M, draws=draws, seed=seed + i)[0])


def exact_truth_ols_2d(s: Setting, grid: StepGrid, Z: int = 200, K: int = 600, seed: int = 0,
                       oracle_records: int = 4000) -> tuple[float, tuple[float, float]]:
    """``Delta`` of ``grid`` for OLS ``d = 2``: :func:`exact_tv_ols_2d` on ``Z`` targets
    ``z ~ P``, averaged with the control variate of :func:`cv_estimate` (the first-order
    formula with the true parameters). Returns the estimate and its 80% bootstrap interval
    over targets."""
    return _targets_cv(s, grid, Z, seed, oracle_records,
                       lambda x, y, i: exact_tv_ols_2d(s, grid, x, y, K=K, seed=seed + i))


def _targets_cv(s: Setting, grid: StepGrid, Z: int, seed: int, oracle_records: int,
                tv_of: Callable[[np.ndarray, float, int], float]) -> tuple[float, tuple[float, float]]:
    """``tv_of(zx, zy, i)`` on ``Z`` targets ``z ~ P`` averaged with the control variate of
    :func:`cv_estimate` (the first-order formula with the true parameters); the estimate and
    its 80% bootstrap interval over targets."""
    rng = np.random.default_rng([seed, 77])
    zx, zy = draw_records(s, Z, rng)
    tv = np.array([[tv_of(zx[i], zy[i], i)] for i in range(Z)])
    orc = oracle_first_order(s, grid, zx, zy)[:, None]
    m, se = oracle_mean(s, [grid], oracle_records, seed)
    est, ci = cv_estimate(tv, orc, m, boot=300, level=0.8, seed=seed, c_mean_se=se)
    return float(est[0]), (float(ci[0, 0]), float(ci[0, 1]))


# Records per call of :func:`oracle_first_order` in :func:`oracle_mean` (its Monte Carlo form
# holds ``records x num_samples x d`` draws at once)
ORACLE_CHUNK = 4000


def oracle_mean(s: Setting, grids: list[Grid], records: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``E_z`` of the control variate (:func:`oracle_first_order`) per grid, over ``records``
    records ``z ~ P`` (the ``[seed, 99]`` stream), and its standard error ``[G]``. The per-record
    values spread about as much as their mean (linear ``d = 2, 5``: sd / mean 1.06 / 0.9), so
    4,000 records leave a 1.5% error, shared by every target and every grid of one seed; with
    ``beta ~ 1`` it passes whole into the truth (docs/benchmarks.md, "cov43")."""
    xb, yb = draw_records(s, records, np.random.default_rng([seed, 99]))
    vals = np.stack([np.concatenate([oracle_first_order(s, g, xb[a:a + ORACLE_CHUNK], yb[a:a + ORACLE_CHUNK])
                                     for a in range(0, records, ORACLE_CHUNK)]) for g in grids], 1)
    return vals.mean(0), vals.std(0) / math.sqrt(records)


# ---------------------------------------------------------------------------------------
# the whole ground truth of a setting
# ---------------------------------------------------------------------------------------


@dataclass
class TruthResult:
    """Ground truth of one setting for several grids."""

    setting: str
    grids: list[str]
    tv_z: np.ndarray  # [Z, G] LR-test lower bound per target
    null_z: np.ndarray  # [Z, G] null-arm value of the same test
    hist_z: np.ndarray | None  # [Z, G] histogram TV (d <= 2, step grids), NaN elsewhere
    hist_null_z: np.ndarray | None
    exact_z: np.ndarray | None  # [Z, G] exact TV (OLS d = 1), NaN where not available
    oracle_z: np.ndarray  # [Z, G] first-order Gaussian prediction with the true parameters
    oracle_mean: np.ndarray  # [G] its mean over z ~ P (large sample): control-variate mean
    M: int
    estimate: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [G] control-variate estimate
    ci: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [G, 2] 10-90% or 2.5-97.5%
    null: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [G] mean null value


def oracle_first_order(s: Setting, grid: Grid, x: np.ndarray, y: np.ndarray, center: np.ndarray | None = None,
                       num_samples: int = 1024) -> np.ndarray:
    """Indicator formula with the TRUE parameters (theta*, Sigma, psi): per record, Monte
    Carlo over cells (independent coordinates) -- the control variate of the ground truth."""
    from ..functional import cell_statistics, record_leakage

    sd = s.sd
    w = influence(s, x, y) / np.sqrt(np.diag(s.Sigma))
    th = s.theta_star if center is None else center
    if isinstance(grid, StepGrid):
        edges = _edges_around(grid, th, sd, 30)
    else:
        _, scale = grid.release(th[None])
        sg = StepGrid("tmp", np.full(s.d, float(scale[0, 0])))
        edges = _edges_around(sg, th, sd, 30, qmax=grid.qmax)
        # The library's rule (quantization.base.revealed_by_scale): the largest-magnitude
        # weight is given away by the released scale and scored as unquantized; here a
        # grid of step <= 0.3 sd around it (kappa >= 0.99), so the control variate tracks
        # the truth of the absmax release.
        j = int(np.argmax(np.abs(th)))
        inner = edges.shape[1] - 2
        edges[j, 1:-1] = th[j] + np.linspace(-8.5, 8.5, inner) * sd[j]
    st = cell_statistics(torch.from_numpy(th), torch.from_numpy(sd), torch.from_numpy(edges))
    gen = torch.Generator().manual_seed(0)
    method = "exact1d" if s.d == 1 else "mc"
    return record_leakage(torch.from_numpy(w), st, s.n, method=method, mc_draws=num_samples, generator=gen).numpy()


def _edges_around(grid: StepGrid, theta: np.ndarray, sd: np.ndarray, half: int, qmax: int | None = None) -> np.ndarray:
    """Edges ``[d, 2 half + 2]`` of the cells around ``theta`` covering >= 8.5 sd."""
    k = grid.codes(theta[None])[0]
    need = np.ceil(8.5 * sd / grid.step).max() + 2
    half = int(min(max(half, need), 4000))
    i = np.arange(-half + 1, half + 1)
    up = k[:, None] + i[None]
    e = np.asarray(grid.origin, dtype=np.float64).reshape(-1, 1) + (up - 0.5 - grid.offset) * grid.step[:, None]
    if qmax is not None:
        e = np.where(up <= -qmax - 1, -np.inf, e)
        e = np.where(up > qmax, np.inf, e)
    inf = np.full((theta.shape[0], 1), np.inf)
    return np.concatenate([-inf, e, inf], 1)


def ground_truth(s: Setting, grids: list[Grid], Z: int = 30, M: int = 4000, seed: int = 0,
                 exact: bool = True, histogram: bool = True, oracle_records: int = 4000,
                 boot: int = 400, level: float = 0.8, covariance: str = "full") -> TruthResult:
    """Ground truth ``Delta`` of each grid for setting ``s`` (see the module docstring);
    ``covariance``: the LR test's (:func:`tv_lr_test`)."""
    rng = np.random.default_rng([seed, s.d, s.n, int(100 * s.rho), 11 if s.model == "linear" else 13])
    zx, zy = draw_records(s, Z, rng)
    G = len(grids)
    tv = np.zeros((Z, G))
    nl = np.zeros((Z, G))
    hi = np.full((Z, G), np.nan)
    hn = np.full((Z, G), np.nan)
    ex = np.full((Z, G), np.nan)
    sims_all = [simulate(s, zx[i], zy[i], M, rng) for i in range(Z)]
    # out-arm moments pooled over targets (the out arm does not depend on z)
    pooled = np.concatenate([sm["out"] for sm in sims_all])
    mom = ArmMoments.of(pooled)
    for i, sm in enumerate(sims_all):
        for g, grid in enumerate(grids):
            tv[i, g], nl[i, g] = tv_lr_test(grid, sm, mom, covariance=covariance, seed=seed + i)
            if histogram and s.d <= 2 and isinstance(grid, StepGrid):
                hi[i, g], hn[i, g] = tv_histogram(grid, sm)
            if exact and s.model == "linear" and s.d == 1 and s.rho == 0:
                ex[i, g] = exact_tv_ols_1d(s, grid if isinstance(grid, StepGrid) else None, zx[i, 0], zy[i])
    # control variate: the oracle first-order value, with its mean over many z ~ P
    orc = np.stack([oracle_first_order(s, g, zx, zy) for g in grids], 1)
    orc_mean, orc_se = oracle_mean(s, grids, oracle_records, seed)
    res = TruthResult(setting=s.label(), grids=[g.name for g in grids], tv_z=tv, null_z=nl,
                      hist_z=hi, hist_null_z=hn, exact_z=ex, oracle_z=orc, oracle_mean=orc_mean, M=M)
    # the exact value (OLS, d = 1) where available, else the LR-test lower bound
    base = np.where(np.isfinite(ex), ex, tv)
    res.estimate, res.ci = cv_estimate(base, orc, orc_mean, boot=boot, level=level, seed=seed, c_mean_se=orc_se)
    res.null = nl.mean(0)
    return res


def cv_estimate(v: np.ndarray, c: np.ndarray, c_mean: np.ndarray, boot: int = 400,
                level: float = 0.8, seed: int = 0, c_mean_se: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Control-variate mean over targets ``mean(v) - beta (mean(c) - E c)`` per column,
    with a bootstrap interval over targets (each target's value already averages its own
    ``M`` datasets, so resampling targets carries both levels of noise).

    ``v, c [Z, G]``; ``c_mean [G]``: ``E c``, known only up to its standard error
    ``c_mean_se [G]`` (a Monte Carlo over records): each bootstrap replicate then also draws
    ``E c`` from ``N(c_mean, c_mean_se^2)``, so the interval carries that error too (it enters
    the estimate times ``beta``, the same for every target). Returns ``(estimate [G],
    interval [G, 2])``."""
    c_mean = np.asarray(c_mean, dtype=np.float64)

    def est(vv: np.ndarray, cc: np.ndarray, cm: np.ndarray = c_mean) -> np.ndarray:
        out = np.zeros(vv.shape[1])
        for g in range(vv.shape[1]):
            # beta only where the control variate is informative (|corr| >= 0.3)
            sv, sc = vv[:, g].std(), cc[:, g].std()
            beta = 0.0
            if sv > 0 and sc > 1e-12 * max(abs(vv[:, g].mean()), 1e-300):
                r = np.corrcoef(vv[:, g], cc[:, g])[0, 1]
                if np.isfinite(r) and r >= 0.3:
                    beta = r * sv / sc
            out[g] = vv[:, g].mean() - beta * (cc[:, g].mean() - cm[g])
        return out

    point = est(v, c)
    rng = np.random.default_rng(seed + 5)
    Z = v.shape[0]
    # its own stream: with c_mean_se absent the resampled targets are those of before
    cms = np.broadcast_to(c_mean, (boot, c_mean.shape[0])) if c_mean_se is None else (
        c_mean + np.asarray(c_mean_se) * np.random.default_rng([seed, 6]).standard_normal((boot, c_mean.shape[0])))
    bs = np.stack([est(v[ii], c[ii], cms[b]) for b, ii in enumerate(rng.integers(0, Z, Z) for _ in range(boot))])
    a = (1 - level) / 2
    return point, np.quantile(bs, [a, 1 - a], axis=0).T


def gaussian_mean_advantage(n: int, d: int, draws: int = 1 << 22, seed: int = 58, chunk: int = 1 << 20) -> float:
    """The best-attack advantage ``Delta`` of the Gaussian mean: ``theta_hat`` the mean of ``n``
    records drawn from ``N(mu, I_d)`` (loss ``|z - theta|^2 / 2``), released unquantized; exact for
    every ``d / n``, ``d > n`` included (docs/benchmarks.md, "iv58").

    Given ``Z_1 = z`` the release is ``P = N(mu + (z - mu) / n, (n - 1) / n^2 I)``, marginally ``Q =
    N(mu, I / n)``; in units of ``Q``'s sd, a shift ``s = |z - mu| / sqrt(n)`` (``|z - mu|^2 ~
    chi2_d``) and a scale ``c = 1 - 1/n``. ``TV = E_P (1 - q / p)_+``, the log ratio depending on the
    coordinate along the shift and the chi2_{d-1} of the rest: ``draws`` seeded Monte Carlo draws
    (sd about ``0.5 / sqrt(draws)``: 2.4e-4 at the default), in chunks of ``chunk``.

    Args:
        n: training records (``>= 2``). d: coordinates (``>= 2``).
        draws, seed, chunk: the Monte Carlo draws (rounded down to a multiple of ``chunk``, itself at
            most ``draws``).

    Returns:
        ``Delta`` in ``[0, 1]`` (float).

    Raises:
        ValueError: ``n < 2``, ``d < 2`` or ``draws < 1``.
    """
    if n < 2 or d < 2 or draws < 1:
        raise ValueError(f"gaussian_mean_advantage needs n >= 2, d >= 2 and draws >= 1, got n={n}, d={d}, draws={draws}")
    chunk = min(chunk, draws)
    g = torch.Generator().manual_seed(seed)
    c = 1.0 - 1.0 / n
    total, count = 0.0, 0
    for _ in range(draws // chunk):
        chi2_d = 2.0 * torch._standard_gamma(torch.full((chunk,), d / 2.0, dtype=torch.float64), generator=g)
        s = (chi2_d / n).sqrt()
        x1 = s + math.sqrt(c) * torch.randn(chunk, dtype=torch.float64, generator=g)
        rest = c * 2.0 * torch._standard_gamma(torch.full((chunk,), (d - 1) / 2.0, dtype=torch.float64), generator=g)
        llr = -((x1 - s).square() + rest) / (2 * c) - 0.5 * d * math.log(c) + (x1.square() + rest) / 2
        total += float((1.0 - torch.exp(-llr)).clamp_min(0.0).sum())
        count += chunk
    return total / count
