"""A known truth for the report's interval in the averaged regime (many weights).

The coverage studies of :mod:`.ground_truth` have ``d <= 5``: position-dominated intervals.
This module builds a model with thousands to ~10^5 weights whose first-order leakage at the
population weights is known in closed form, and one "training" of it as the library's own
:class:`~mis_lightning.estimation.Estimate`, so that :func:`mis_lightning.assess.score_schemes`
scores it exactly as the front ends do (method.md section 3, "The uncertainty interval",
averaged regime: built and subsampled bootstrap draws).

Model. Multi-output linear regression ``y = Theta* x + e`` (``Theta* [out, in]``), squared
loss ``l = |Theta x - y|^2 / 2``, inputs ``x`` with ``E x x' = I`` and independent noise
``e_o = s_o eps_o`` (``E eps^2 = 1``). Then ``H = I`` per output row, the influence of weight
``j = (o, i)`` is ``psi_j(z) = e_o x_i``, ``Sigma = diag(s_o^2)`` (independent coordinates:
the indicator's independent-coordinate form is the truth's own form) and the standardised
influence is ``w_j(z) = eps_o x_i``.

* ``records="rademacher"``: ``x_i, eps_o = +-1``, so ``w_j(z)^2 = 1`` for every record and the
  records carry no error: the interval's width is the draws' alone.
* ``records="gaussian"``: ``x, eps ~ N(0, 1)``: per-record values vary (a common factor
  ``eps_o^2`` per output), as in real models.

Grid: round-to-nearest on ``k h_j`` (origin 0, per-weight step ``h_j = r_j sigma_j``, ``r_j``
the step in sd units of ``theta-hat_j``); ``theta*_j = h_j (k_j + u_j)``, ``u_j`` the position
in the cell (0 mid-cell, +-1/2 on a boundary).

Truth (the quantity the interval is for, method.md section 3: ``L(theta*)``, the first-order
leakage read at the population weights with the true ``sigma`` and the population of records;
the same quantity as the control variate of :func:`.ground_truth.oracle_first_order`, in the
Gaussian (CLT) form, which is exact to ``O(1/d)`` for ``d`` independent bounded terms):
``Delta* = E_z G(sqrt(2/pi) sqrt(sum_j w_j(z)^2 kappa_j(theta*_j)) / (2 sqrt n))``,
``G(t) = 2 Phi(sqrt(pi/2) t) - 1``. ``kappa_j`` by an independent closed form
(:func:`kappa_step`, scipy), not the library's kernels. Rademacher records: no expectation left.

One training (:func:`training`): ``theta-hat ~ N(theta*, diag sigma^2)`` exactly (the law of
method.md section 2), ``sigma-hat`` with the diagonal estimator's sampling error
(``sigma-hat_j^2 = sigma_j^2 mean_i w_ij^2`` over ``n`` records: exact for Rademacher records,
relative sd ``1/sqrt(2n)`` for Gaussian ones; an optional common relative bias), and ``R``
stored records whose influences are the true ones (the records are drawn independently of
``theta-hat``: their dependence is ``O(R/n)``). The estimate holds them as the factored
``nn.Linear`` path does (``factors``: the records' inputs and output gradients, influences never
materialised; chunks of ``>= 2^15`` weights then get subsampled draws) or as stored
influences (``[R, d]``; every chunk evaluates every weight, and the interval computes the
regime's ``k``).

Pure torch/numpy/scipy; not in the library's hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from torch import nn

from ..estimation.estimate import Estimate
from ..estimation.linear_factors import LinearFactors
from ..quantization.base import ParamGrid, QuantizationScheme

RECORDS = ("rademacher", "gaussian")
POSITIONS = ("uniform", "mid", "edge")
# steps in sd units of theta-hat for steps="mixed": log-uniform over this range (brief: 0.25-4 sd)
MIXED_STEPS = (0.25, 4.0)
# codes k_j of theta*_j (any range: the grid is unbounded)
CODE_RANGE = 3
# steps (sd units) below which smoothed_kappa keeps kappa (its position dependence is negligible)
SMOOTH_MIN_STEP = 1.5
# cells each side of theta in the closed form (beyond 10 sd: below 1e-22 of kappa)
_KAPPA_REACH_SD = 10.0


@dataclass(frozen=True)
class Population:
    """A population model (see the module docstring).

    Attributes:
        out_features, in_features: the weight matrix's shape; ``d = out * in`` weights.
        n: training records (sets ``sigma = s / sqrt(n)``).
        row_sd: ``[out]`` noise sd ``s_o`` of each output (``sqrt(Sigma_jj)`` of its row).
        step_sd: ``[d]`` grid step of each weight in sd units of ``theta-hat_j``.
        position: ``[d]`` ``u_j`` in ``[-1/2, 1/2)``: where ``theta*_j`` sits in its cell.
        theta_star: ``[d]`` population weights (parameter units; row-major ``(o, i)``).
        records: ``"rademacher"`` or ``"gaussian"``.
    """

    out_features: int
    in_features: int
    n: int
    row_sd: np.ndarray
    step_sd: np.ndarray
    position: np.ndarray
    theta_star: np.ndarray
    records: str = "rademacher"

    @property
    def d(self) -> int:
        return self.out_features * self.in_features

    @property
    def sigma(self) -> np.ndarray:
        """``[d]`` sd of ``theta-hat_j`` (parameter units): ``s_o / sqrt(n)``."""
        return np.repeat(self.row_sd, self.in_features) / math.sqrt(self.n)

    @property
    def step(self) -> np.ndarray:
        """``[d]`` grid step (parameter units)."""
        return self.step_sd * self.sigma


def make_population(out_features: int, in_features: int, *, n: int | None = None,
                    steps: str | float = "mixed", positions: str = "uniform", records: str = "rademacher",
                    seed: int = 0) -> Population:
    """A population of ``d = out_features * in_features`` weights.

    Args:
        n: training records; default ``16 d`` (unquantized leakage ~0.1).
        steps: ``"mixed"`` (per weight, log-uniform over :data:`MIXED_STEPS` sd) or a step in sd.
        positions: ``"uniform"`` (``u_j ~ U[-1/2, 1/2)``, the averaged regime's assumption:
            population weights spread over their cells), ``"mid"`` (``u = 0``) or ``"edge"``
            (``u = -1/2``).
        records: ``"rademacher"`` or ``"gaussian"`` (module docstring).
        seed: the population's generator.

    Raises:
        ValueError: an unknown option or a non-positive size or step.
    """
    if out_features < 1 or in_features < 1:
        raise ValueError(f"the weight matrix needs at least one row and column, got {out_features} x {in_features}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if records not in RECORDS:
        raise ValueError(f"records must be one of {RECORDS}, got {records!r}")
    d = out_features * in_features
    rng = np.random.default_rng([seed, out_features, in_features, 31])
    row_sd = np.exp(rng.uniform(math.log(0.5), math.log(2.0), out_features))
    if steps == "mixed":
        lo, hi = MIXED_STEPS
        step_sd = np.exp(rng.uniform(math.log(lo), math.log(hi), d))
    else:
        r = float(steps)
        if not r > 0:
            raise ValueError(f"steps must be 'mixed' or a positive step in sd units, got {steps!r}")
        step_sd = np.full(d, r)
    if positions == "uniform":
        u = rng.uniform(-0.5, 0.5, d)
    else:
        u = np.full(d, 0.0 if positions == "mid" else -0.5)
    n = int(n if n is not None else 16 * d)
    sigma = np.repeat(row_sd, in_features) / math.sqrt(n)
    k = rng.integers(-CODE_RANGE, CODE_RANGE + 1, d)
    theta = (k + u) * step_sd * sigma
    return Population(out_features, in_features, n, row_sd, step_sd, u, theta, records)


def kappa_step(position: np.ndarray, step_sd: np.ndarray) -> np.ndarray:
    """``kappa`` of round-to-nearest on an unbounded uniform grid (method.md section 3), by its
    closed form with scipy: ``sum_k (phi(a_k) - phi(a_{k+1}))^2 / (Phi(a_{k+1}) - Phi(a_k))``,
    ``a_k = (k - 1/2 - u) r`` the standardised edges around the weight.

    Args:
        position: ``[d]`` ``u`` (the weight's place in its cell, in steps; any real).
        step_sd: ``[d]`` ``r`` (the step in sd units), > 0.

    Returns:
        ``[d]`` float64 in ``[0, 1]``.
    """
    u = np.asarray(position, dtype=np.float64) - np.round(position)
    r = np.asarray(step_sd, dtype=np.float64)
    half = int(math.ceil(_KAPPA_REACH_SD / float(r.min()))) + 1
    k = np.arange(-half, half + 1, dtype=np.float64)
    out = np.zeros(u.shape[0])
    for a in range(0, u.shape[0], 1 << 14):
        uu, rr = u[a: a + (1 << 14), None], r[a: a + (1 << 14), None]
        edges = (k[None] - 0.5 - uu) * rr
        edges = np.concatenate([np.full((edges.shape[0], 1), -np.inf), edges[:, 1:-1], np.full((edges.shape[0], 1), np.inf)], 1)
        pdf = np.exp(-0.5 * np.square(np.where(np.isfinite(edges), edges, 0.0))) / math.sqrt(2 * math.pi)
        pdf = np.where(np.isfinite(edges), pdf, 0.0)
        # cell probabilities by differences of the cdf from the nearer tail (accurate far out)
        lo, hi = edges[:, :-1], edges[:, 1:]
        p = np.where(lo > 0, special.ndtr(-lo) - special.ndtr(-hi), special.ndtr(hi) - special.ndtr(lo))
        num = np.square(pdf[:, :-1] - pdf[:, 1:])
        out[a: a + uu.shape[0]] = np.where(p > 1e-300, num / np.maximum(p, 1e-300), 0.0).sum(1)
    return np.clip(out, 0.0, 1.0)


def smoothed_kappa(position: np.ndarray, step_sd: np.ndarray, var: float, nodes: int = 32) -> np.ndarray:
    """``E kappa(u + t / r)``, ``t ~ N(0, var)``: :func:`kappa_step` averaged over a Gaussian
    move of ``var`` (sd units squared) of the weight, by ``nodes``-point Gauss-Hermite
    quadrature. ``var = 1``: the plug-in's mean over trainings at ``theta*``; ``var = 2``: that
    of the bootstrap draws' centre (a diagnostic of the centre's bias, method.md section 3).
    Steps below :data:`SMOOTH_MIN_STEP` sd keep ``kappa`` itself: a move changes their
    ``kappa`` by a factor ``exp(-2 pi^2 / r^2)`` (< 2e-4) of its in-cell range, which is itself
    below 1e-3 there."""
    x, wt = np.polynomial.hermite_e.hermegauss(nodes)
    wt = wt / wt.sum()
    u = np.asarray(position, dtype=np.float64)
    r = np.asarray(step_sd, dtype=np.float64)
    out = kappa_step(u, r)
    move = r >= SMOOTH_MIN_STEP
    if bool(move.any()):
        um, rm = u[move], r[move]
        out[move] = sum(wk * kappa_step(um + math.sqrt(var) * xk / rm, rm) for xk, wk in zip(x, wt))
    return out


def centre_error_decomposition(step_sd: float, points: int = 2000) -> dict[str, float]:
    """Per weight on a uniform grid of ``step_sd`` sd, averaged over a uniform position of
    ``theta*`` in its cell (the averaged regime's assumption) and over trainings: the
    bootstrap draws' sd ``sqrt(E Var_t kappa(u-hat + t / r))`` and the error of their centre
    ``kappa-bar(u-hat) - kappa(u*)`` split into the population's fixed part (``kappa`` smoothed
    over ``sqrt 2`` sd minus ``kappa``, at ``u*``: the same in every training) and the
    training's random part. Per harmonic of ``kappa(u)`` the centre's mean square error equals
    the draws' variance (``1 - rho^2`` times its power each, ``rho = exp(-2 pi^2 / r^2)``); the
    fixed part's share is ``1 - rho^2``.

    Returns:
        ``{"draws_sd", "fixed_rms", "random_sd", "total_rms"}`` (``kappa`` units per weight).
    """
    u = (np.arange(points) + 0.5) / points - 0.5
    r = np.full(points, float(step_sd))
    k = kappa_step(u, r)
    k1 = smoothed_kappa(u, r, 1.0, nodes=60)
    k2 = smoothed_kappa(u, r, 2.0, nodes=60)
    draws_var = max(float(np.mean(k ** 2) - np.mean(k1 ** 2)), 0.0)  # E_u Var_t = E k^2 - E kbar^2
    fixed = float(np.mean((k2 - k) ** 2))
    random = max(float(np.mean(k1 ** 2) - np.mean(k2 ** 2)), 0.0)  # E_u Var_eps kbar(u + eps / r)
    return {"draws_sd": math.sqrt(draws_var), "fixed_rms": math.sqrt(fixed), "random_sd": math.sqrt(random),
            "total_rms": math.sqrt(fixed + random)}


def saturate(t: np.ndarray | float) -> np.ndarray:
    """``G(t) = 2 Phi(sqrt(pi/2) t) - 1`` (scipy; method.md section 3)."""
    return 2.0 * special.ndtr(math.sqrt(math.pi / 2.0) * np.asarray(t, dtype=np.float64)) - 1.0


def first_order(kappa: np.ndarray, n: int, w2_rows: np.ndarray | None = None, w2_cols: np.ndarray | None = None,
                out_features: int | None = None) -> np.ndarray:
    """Per record ``G(sqrt(2/pi) sqrt(sum_j w_j^2 kappa_j) / (2 sqrt n))`` with
    ``w_j^2 = eps_o^2 x_i^2`` given as ``w2_rows [R, out]`` and ``w2_cols [R, in]`` (``None``:
    ``w^2 = 1``, one value). ``kappa [d]`` row-major ``(o, i)``."""
    c = math.sqrt(2.0 / math.pi) / (2.0 * math.sqrt(n))
    if w2_rows is None:
        return saturate(c * math.sqrt(float(kappa.sum())))[None]
    assert w2_cols is not None and out_features is not None
    K = kappa.reshape(out_features, -1)
    s2 = np.einsum("ro,oi,ri->r", w2_rows, K, w2_cols)
    return saturate(c * np.sqrt(s2))


def truth(pop: Population, records: int = 20_000, seed: int = 12345) -> tuple[float, float]:
    """``(Delta*, its Monte Carlo standard error)`` at the population weights (module docstring).

    Rademacher records: exact (``w^2 = 1``; standard error 0). Gaussian records: the mean over
    ``records`` fresh records (blocks of 1,000)."""
    kappa = kappa_step(pop.position, pop.step_sd)
    if pop.records == "rademacher":
        return float(first_order(kappa, pop.n)[0]), 0.0
    rng = np.random.default_rng([seed, pop.d])
    vals = []
    for a in range(0, records, 1000):
        b = min(records, a + 1000)
        eo = np.square(rng.standard_normal((b - a, pop.out_features)))
        xi = np.square(rng.standard_normal((b - a, pop.in_features)))
        vals.append(first_order(kappa, pop.n, eo, xi, pop.out_features))
    v = np.concatenate(vals)
    return float(v.mean()), float(v.std() / math.sqrt(v.size))


class StepGridScheme(QuantizationScheme):
    """Round-to-nearest on ``k h_j`` with a per-weight step ``h_j`` (origin 0, unbounded) as
    an affine :class:`ParamGrid` (``scale = h``, zero point 0, block ``(1, 1)``), for the one
    ``nn.Linear`` weight of :func:`training`'s model. The grid is fixed (``scale_rule="none"``)."""

    backend = "builtin"
    scale_rule = "none"

    def __init__(self, step: np.ndarray, name: str = "step") -> None:
        super().__init__()
        self.step = np.asarray(step, dtype=np.float64)
        self.name = name

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module) -> tuple[dict[str, ParamGrid], list[str]]:
        w = model.weight
        shape = tuple(w.shape)
        step = torch.from_numpy(self.step.copy()).reshape(shape)
        codes = torch.round(w.detach().to(torch.float64) / step)
        deq = codes * step
        w.copy_(deq.to(w.dtype))
        qr = 2 ** 40  # never reached
        grid = ParamGrid(name="weight", shape=shape, kind="affine", dequantized=deq.to(torch.float32),
                         bits_per_weight=64.0, scale=step, block_size=(1, 1), zero_point=torch.zeros(shape, dtype=torch.float64),
                         qmin=-qr, qmax=qr, codes=codes)
        return {"weight": grid}, []


@dataclass
class Training:
    """One training: the estimate and the model the schemes quantize."""

    estimate: Estimate
    model: nn.Module
    theta_hat: np.ndarray  # [d]
    sigma_hat: np.ndarray  # [d]


def training(pop: Population, seed: int, *, num_records: int = 64, path: str = "factored",
             sigma_bias: float = 0.0, at_population: bool = False) -> Training:
    """One training of ``pop`` as an :class:`Estimate` (module docstring).

    Args:
        seed: the training's generator (``theta-hat``, ``sigma-hat``, the records).
        num_records: stored records ``R``.
        path: ``"factored"`` (``Estimate.factors``, the large-model path) or ``"stored"``
            (``Estimate.influence [R, d]``).
        sigma_bias: a common relative error of ``sigma-hat`` (``sigma-hat *= 1 + sigma_bias``;
            0: none), for sensitivity studies.
        at_population: ``theta-hat = theta*`` and ``sigma-hat = sigma`` (a check: the plug-in
            is then the truth's own quantity).

    Raises:
        ValueError: an unknown ``path`` or ``num_records < 8``.
    """
    if path not in ("factored", "stored"):
        raise ValueError(f"path must be 'factored' or 'stored', got {path!r}")
    if num_records < 8:
        raise ValueError(f"num_records must be >= 8, got {num_records}")
    rng = np.random.default_rng([seed, pop.d, 97])
    sigma = pop.sigma
    th = pop.theta_star + sigma * rng.standard_normal(pop.d)
    if pop.records == "gaussian":  # sigma-hat^2 = sigma^2 * mean of n draws of w^2 (chi2_n / n)
        sh = sigma * np.sqrt(rng.chisquare(pop.n, pop.d) / pop.n)
    else:
        sh = sigma.copy()
    sh = sh * (1.0 + sigma_bias)
    if at_population:
        th, sh = pop.theta_star.copy(), sigma.copy()
    R, out_f, in_f = num_records, pop.out_features, pop.in_features
    if pop.records == "rademacher":
        x = rng.choice([-1.0, 1.0], (R, in_f))
        eps = rng.choice([-1.0, 1.0], (R, out_f))
    else:
        x = rng.standard_normal((R, in_f))
        eps = rng.standard_normal((R, out_f))
    # output gradient of the squared loss at theta*: -e = -s eps; V_jj = s_o^2 (the true one)
    dgrad = -eps * pop.row_sd[None]
    v = np.repeat(np.square(pop.row_sd), in_f)
    model = nn.Linear(in_f, out_f, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(th).reshape(out_f, in_f))
    names, d = ["weight"], pop.d
    common = dict(n=pop.n, mode="diagonal", hessian="exact", names=names, shapes={"weight": (out_f, in_f)},
                  offsets={"weight": (0, d)}, theta={"weight": torch.from_numpy(th.copy())},
                  sigma={"weight": torch.from_numpy(sh.copy())}, num_records=R,
                  estimator="synthetic (groundtruth.averaged)", reason="requested")
    if path == "factored":
        fac = LinearFactors("", "weight", None, torch.from_numpy(x), torch.from_numpy(dgrad))
        est = Estimate(influence=None, factors=[fac], _g_mean={"weight": torch.zeros(d, dtype=torch.float64)},
                       _v_diag={"weight": torch.from_numpy(v)}, **common)
    else:
        # w_rj = -(g_rj - 0) / sqrt(V_jj) = eps_ro x_ri (the factored path's sign convention)
        w = (eps[:, :, None] * x[:, None, :]).reshape(R, d)
        est = Estimate(influence=torch.from_numpy(w), **common)
    return Training(est, model, th, sh)


# --- A correlated design: fixed-design least squares (cv29) ------------------------------------
#
# The populations above have independent coordinates, so they test only the independent form
# (``covariance="independent"``). The headline's default form keeps the weights' correlation
# (method.md section 3, "Correlated coordinates"); in the averaged regime its interval is the
# independent form's, carried by the ratio of the two plug-ins (iv28). This design has a known
# correlation and a closed-form reference for the correlated form.

DESIGNS = ("ar1", "equicorrelated")
# Gauss-Hermite nodes over the noise e / s of a record (the reference's expectation over e)
_NOISE_NODES = 80


@dataclass(frozen=True)
class OLSDesign:
    """Least squares ``y = x' theta* + e``, ``e ~ N(0, s^2)``, on a fixed design ``X [n, d]``
    (rows ``x ~ N(0, C)``, ``C`` AR(1) ``C_ij = rho^|i - j|`` or equicorrelated ``C_ij = rho``,
    drawn once). Over trainings (fresh noise) ``theta-hat ~ N(theta*, s^2 (X'X)^-1)`` exactly,
    so ``sigma_j = s sqrt((X'X)^-1_jj)`` and the weights' correlation ``R`` is that of
    ``(X'X)^-1`` (method.md section 2, no approximation).

    Attributes:
        X: ``[n, d]`` float64 design (the training records' inputs).
        theta_star: ``[d]`` population weights.
        rho: the inputs' correlation parameter; design: ``"ar1"`` or ``"equicorrelated"``.
        noise_sd: ``s``.
    """

    X: np.ndarray
    theta_star: np.ndarray
    rho: float
    design: str = "ar1"
    noise_sd: float = 1.0

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def d(self) -> int:
        return int(self.X.shape[1])

    @property
    def inverse_gram(self) -> np.ndarray:
        """``[d, d]`` ``(X'X)^-1``."""
        return np.linalg.inv(self.X.T @ self.X)

    @property
    def sigma(self) -> np.ndarray:
        """``[d]`` exact sd of ``theta-hat_j`` (parameter units)."""
        return self.noise_sd * np.sqrt(np.diag(self.inverse_gram))


def design_inputs(m: int, d: int, rho: float, design: str, rng: np.random.Generator) -> np.ndarray:
    """``[m, d]`` rows ``x ~ N(0, C)`` (:class:`OLSDesign`), unit variances.

    Raises:
        ValueError: an unknown design or ``rho`` outside ``[0, 1)``.
    """
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    z = rng.standard_normal((m, d))
    if rho == 0.0:
        return z
    if design == "equicorrelated":
        return math.sqrt(rho) * rng.standard_normal((m, 1)) + math.sqrt(1.0 - rho) * z
    x = np.empty_like(z)
    x[:, 0] = z[:, 0]
    c = math.sqrt(1.0 - rho * rho)
    for j in range(1, d):
        x[:, j] = rho * x[:, j - 1] + c * z[:, j]
    return x


def make_ols_design(d: int, n: int, rho: float, *, design: str = "ar1", spread_sd: float = 84.0,
                    seed: int = 0) -> OLSDesign:
    """A fixed design and population weights ``theta*_j = sigma_j U(-spread_sd, spread_sd)``.

    The default 84 spans a whole number of cells of every grid of step 0.75, 1.4, 4 or 8 sd
    (``2 * 84 / step`` an integer), so ``theta*``'s positions in its cells are uniform (the
    averaged regime's assumption) on each of them. A smaller spread on a coarse grid puts the
    positions where it cuts the cells: ``spread_sd = 6`` on an 8-sd grid leaves two thirds of the
    weights in the outer half of their cells, where ``kappa`` peaks, and the plug-in (``kappa``
    smoothed over one sd) reads 0.2-5% low (11 of 12 designs at least 2% low; docs/validation.md,
    "The averaged interval beside a CORRELATED headline, against a closed-form reference").

    Raises:
        ValueError: ``d < 2``, ``n <= d + 1``, or what :func:`design_inputs` raises.
    """
    if d < 2 or n <= d + 1:
        raise ValueError(f"need d >= 2 and n > d + 1, got d = {d}, n = {n}")
    rng = np.random.default_rng([seed, d, n, int(round(rho * 1000)), DESIGNS.index(design) if design in DESIGNS else 9])
    X = design_inputs(n, d, rho, design, rng)
    sig = np.sqrt(np.diag(np.linalg.inv(X.T @ X)))
    theta = sig * rng.uniform(-spread_sd, spread_sd, d)
    return OLSDesign(X, theta, float(rho), design)


def spread_tv_reference(delta: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``TV(N(delta, var), N(0, 1))`` for ``0 < var <= 1`` (numpy/scipy; an implementation
    independent of :func:`mis_lightning.functional.leakage.spread_tv`): the densities cross
    where ``(1/2 - 1/(2 var)) x^2 + (delta / var) x - delta^2 / (2 var) - log(var) / 2 = 0``;
    between the roots the member's density is the larger one."""
    delta = np.abs(np.asarray(delta, dtype=np.float64))
    var = np.broadcast_to(np.asarray(var, dtype=np.float64), delta.shape)
    out = 2.0 * special.ndtr(delta / 2.0) - 1.0
    ne = var < 1.0 - 1e-12
    if bool(ne.any()):
        dd, vv = delta[ne], var[ne]
        a = 0.5 - 0.5 / vv
        b = dd / vv
        c = -dd * dd / (2.0 * vv) - 0.5 * np.log(vv)
        disc = np.sqrt(b * b - 4.0 * a * c)
        r1, r2 = (-b + disc) / (2.0 * a), (-b - disc) / (2.0 * a)
        lo, hi = np.minimum(r1, r2), np.maximum(r1, r2)
        s = np.sqrt(vv)
        out[ne] = (special.ndtr((hi - dd) / s) - special.ndtr((lo - dd) / s)) - (special.ndtr(hi) - special.ndtr(lo))
    return out


GAMES = ("population", "fixed")


def ols_truth(des: OLSDesign, step_sd: float | None, game: str = "population") -> float:
    """The reference for :class:`OLSDesign` released on round-to-nearest ``k h_j`` with
    ``h_j = step_sd sigma_j`` (``None``: unquantized): the method's population quantity with
    every input exact (method.md sections 3 and 4): ``kappa_j`` at ``theta*_j``
    (:func:`kappa_step`), the exact ``sigma`` and correlation ``R`` of ``(X'X)^-1``, and each
    training record's exact leverage ``h_i = x_i'(X'X)^-1 x_i``.

    Per record ``i`` with noise ``e``: the standardised influence is ``w = (e / s) a_i``,
    ``a_ij = sqrt(n) ((X'X)^-1 x_i)_j / sqrt((X'X)^-1_jj)`` (so ``a_i'R^-1 a_i / n = h_i``); the
    Gaussian channel keeps ``s2 = u'M^+u``, ``u = K^1/2 a_i``, ``M = I - K + K^1/2 R K^1/2``, and
    the member's law along its whitened direction is ``N(delta, 1 - h_i rho)`` against
    ``N(0, 1)``, ``delta = |e / s| sqrt(s2 / n)``, ``rho = s2 / (n h_i)`` (exact for the
    unquantized release of this design: the member shifts ``theta-hat`` by ``(X'X)^-1 x_i e`` and
    removes the fraction ``h_i`` of its variance along it). The TV is averaged over ``e / s ~
    N(0, 1)`` (Gauss-Hermite, :data:`_NOISE_NODES` nodes) and over the ``n`` records.

    Exact for the unquantized release; for a grid, the Gaussian channel is the headline's form
    (method.md section 3: within 5% of the exact first-order value at steps <= 1 sd; coarser
    grids with strong correlation differ, measured in "Correlated coordinates")."""
    B = des.inverse_gram
    n, d = des.n, des.d
    dg = np.sqrt(np.diag(B))
    Rm = B / dg[:, None] / dg[None]
    XB = des.X @ B
    h = np.einsum("ij,ij->i", XB, des.X)
    A = math.sqrt(n) * XB / dg[None]
    if step_sd is None:
        s2 = n * h
    else:
        sig = des.noise_sd * dg
        kappa = kappa_step(des.theta_star / (step_sd * sig), np.full(d, float(step_sd)))
        k_half = np.sqrt(kappa)
        M = np.eye(d) - np.diag(kappa) + k_half[:, None] * Rm * k_half[None]
        U = A * k_half[None]
        evals, evecs = np.linalg.eigh(M)
        keep = evals > 1e-12 * evals.max()
        proj = U @ evecs[:, keep]
        s2 = (proj * proj / evals[keep][None]).sum(1)
    rho = np.clip(s2 / (n * h), 0.0, 1.0)
    var = 1.0 - h * rho
    if game == "population":
        s2 = s2 / (1.0 - h)
    x, wt = np.polynomial.hermite_e.hermegauss(_NOISE_NODES)
    wt = wt / wt.sum()
    val = np.zeros(n)
    for xk, wk in zip(x, wt):
        val += wk * spread_tv_reference(abs(xk) * np.sqrt(s2 / n), var)
    return float(val.mean())


def ols_training(des: OLSDesign, seed: int, batch_size: int = 1000
                 ) -> tuple[nn.Module, torch.utils.data.DataLoader, np.ndarray]:
    """One training of ``des``: fresh noise, the exact least-squares fit in
    ``nn.Linear(d, 1, bias=False)`` (float64), and the loader of its ``n`` records for
    :func:`mis_lightning.assess` (loss ``(f - y)^2 / 2``, :func:`squared_loss`).

    Returns:
        ``(model, loader, theta_hat [d])``.
    """
    rng = np.random.default_rng([seed, des.d, des.n, 71])
    y = des.X @ des.theta_star + des.noise_sd * rng.standard_normal(des.n)
    th = np.linalg.solve(des.X.T @ des.X, des.X.T @ y)
    model = nn.Linear(des.d, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(th)[None])
    ds = torch.utils.data.TensorDataset(torch.from_numpy(des.X.copy()), torch.from_numpy(y))
    return model, torch.utils.data.DataLoader(ds, batch_size=batch_size), th


def squared_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sample ``(f - y)^2 / 2`` (the loss of :func:`ols_training`)."""
    return 0.5 * (out.squeeze(-1) - y) ** 2


def ols_scheme(des: OLSDesign, step_sd: float) -> StepGridScheme:
    """Round-to-nearest on ``k h_j``, ``h_j = step_sd sigma_j`` (the exact ``sigma``), named
    ``"step<step_sd>"``."""
    return StepGridScheme(step_sd * des.sigma, name=f"step{step_sd:g}")
