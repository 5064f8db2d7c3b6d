"""Exact ground truth for logistic regression on step grids (small ``d``), by coupled arms.

The leakage of a release ``T = Q(theta_hat)`` is ``Delta = E_z[TV(law(T | z), law(T))]``
(method.md section 1). For logistic regression the law of ``theta_hat`` has no closed form,
so it is simulated; what makes the simulation tight enough to decide a 5% question on nearly
unquantized grids (docs/validation.md, "Coverage of the report's interval"):

* **One fit per dataset, shared by every record added to it.** ``M`` datasets of ``n - 1``
  other records are drawn and fitted once (:func:`logistic_base`: batched Newton). At their
  MLE ``theta_o`` the sum-loss score and its next three derivatives are kept (gradient ``g``,
  Hessian ``H``, third and fourth derivative tensors ``T``, ``Q``: ``d + d^2 + d^3 + d^4``
  floats per dataset). The MLE of the dataset plus one record ``(x, y)`` solves
  ``g + H D + T[D, D] / 2 + Q[D, D, D] / 6 + (sigmoid(x . (theta_o + D)) - y) x = 0``
  (:func:`add_record`, Newton in ``D``). Adding a record moves the MLE by ``|D| ~ 1 / n``; the
  first neglected term is ``O(n |D|^5)`` against ``O(n |D|)``, i.e. a relative error of
  ``~|D|^4``: about ``1e-8`` of ``D`` at ``n = 1000`` (:func:`taylor_error` measures it
  against full Newton fits).
* **Coupled arms.** The in arm adds the target ``z`` to dataset ``m``; the out arm (the marginal
  law of the release) adds fresh records to the same dataset ``m``. The two releases differ
  only where one record moves the MLE across a cell edge, so the per-cell difference of the
  two laws, ``mu_c = P_in(c) - P_out(c)``, is estimated with a variance ~10x below that of
  independent arms.
* **A bracket, not a bound.** ``TV_z = sum_c (mu_c)_+`` is estimated two ways:
  the plug-in ``sum_c |mu_hat_c| / 2``, biased upward by the cells where ``mu_c`` is within
  its noise of 0, and the split-sample ``sum_c 1[mu_hat_A_c > 0] mu_hat_B_c`` (signs from one
  half of the datasets, values from the other, both ways), whose expectation is
  ``sum_c P(mu_hat_A_c > 0) mu_c <= TV_z``: biased downward. The truth lies between their
  expectations; both converge to it as ``M`` grows. The averages over targets use the
  control variate of :func:`~mis_lightning.groundtruth.ground_truth.cv_estimate`.

Absmax releases give their largest weight away exactly (a continuous component): their keys
bin it (:func:`cell_keys`), a coarsening whose TV reaches the release's as the bins shrink.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtr

from .ground_truth import (
    AbsmaxGrid,
    Setting,
    StepGrid,
    _llr_full,
    cv_estimate,
    draw_records,
    newton_logistic,
    oracle_first_order,
    oracle_mean,
)

__all__ = ["LogisticBase", "logistic_base", "add_record", "taylor_error", "cell_keys", "OutCells", "tv_bracket",
           "tv_debiased", "exact_truth_logistic"]


@dataclass
class LogisticBase:
    """``M`` fitted datasets of ``n - 1`` records (sum-loss derivatives at their MLE, float64):
    ``theta [M, d]``, ``g [M, d]`` (the score's rounding residual), ``H [M, d, d]``,
    ``T [M, d, d, d]``, ``Q [M, d, d, d, d]``."""

    theta: torch.Tensor
    g: torch.Tensor
    H: torch.Tensor
    T: torch.Tensor
    Q: torch.Tensor

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    def rows(self, sl: slice) -> LogisticBase:
        return LogisticBase(self.theta[sl], self.g[sl], self.H[sl], self.T[sl], self.Q[sl])


def _datasets(s: Setting, m: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` datasets of ``k`` records from the data model: ``X [m, k, d]``, ``Y [m, k]``."""
    C = torch.from_numpy(s.chol)
    X = torch.randn(m, k, s.d, dtype=torch.float64, generator=gen) @ C.T
    P = torch.sigmoid(X @ torch.from_numpy(s.theta_star))
    Y = (torch.rand(m, k, dtype=torch.float64, generator=gen) < P).to(torch.float64)
    return X, Y


def _derivatives(X: torch.Tensor, Y: torch.Tensor, theta: torch.Tensor) -> LogisticBase:
    """Sum-loss derivatives of the logistic log-loss at ``theta [m, d]``: weighted sums of the
    records' monomials of degree 1-4, as batched products of ``X`` and ``X (x) X``."""
    m, n, d = X.shape
    p = torch.sigmoid((X * theta.unsqueeze(1)).sum(-1))
    w1 = p * (1 - p)  # d sigmoid / d eta
    w2 = w1 * (1 - 2 * p)  # its derivative
    w3 = w1 * (1 - 6 * p + 6 * p * p)  # and the next
    Xt = X.transpose(1, 2)
    X2 = (X.unsqueeze(-1) * X.unsqueeze(-2)).reshape(m, n, d * d)
    g = torch.bmm(Xt, (p - Y).unsqueeze(-1)).squeeze(-1)
    H = torch.bmm(Xt * w1.unsqueeze(1), X)
    T = torch.bmm(X2.transpose(1, 2) * w2.unsqueeze(1), X).reshape(m, d, d, d)
    Q = torch.bmm(X2.transpose(1, 2) * w3.unsqueeze(1), X2).reshape(m, d, d, d, d)
    return LogisticBase(theta, g, H, T, Q)


def _newton(X: torch.Tensor, Y: torch.Tensor, theta0: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """``steps`` plain Newton steps of ``m`` logistic regressions from ``theta0 [d]`` (batched
    products). From ``theta*`` (about one sd from each MLE) the error after ``k`` steps is
    ~``sd^(2^k)``: 4 steps reach rounding; the Taylor model carries any residual score."""
    m, n, d = X.shape
    Xt = X.transpose(1, 2)
    th = theta0.to(X.dtype).expand(m, d).unsqueeze(-1).clone()
    for _ in range(steps):
        p = torch.sigmoid(torch.bmm(X, th)).squeeze(-1)
        g = torch.bmm(Xt, (Y - p).unsqueeze(-1))
        H = torch.bmm(Xt * (p * (1 - p)).unsqueeze(1), X)
        th = th + torch.linalg.solve(H, g)
    return th.squeeze(-1)


def logistic_base(s: Setting, M: int, seed: int = 0, chunk: int | None = None) -> LogisticBase:
    """``M`` datasets of ``s.n - 1`` records, each fitted once (batched Newton from
    ``theta*``, float64) with its sum-loss derivatives at the MLE. Memory ``O(chunk n d)``
    while fitting, ``O(M d^4)`` kept. Raises ValueError for a linear setting."""
    if s.model != "logistic":
        raise ValueError(f"logistic_base needs a logistic setting, got {s.model!r}")
    chunk = chunk or max(1, int(3e6 // (s.n * s.d)))
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 31]).integers(2**62)))
    d = s.d
    # filled in place: small per-chunk results kept between the chunks' large freed blocks
    # fragmented the heap (glibc), ~15 KB of resident memory per dataset (15 GB at M = 10^6)
    out = LogisticBase(*(torch.empty((M,) + (d,) * k, dtype=torch.float64) for k in (1, 1, 2, 3, 4)))
    for a in range(0, M, chunk):
        X, Y = _datasets(s, min(chunk, M - a), s.n - 1, gen)
        th = _newton(X, Y, torch.from_numpy(s.theta_star))
        part = _derivatives(X, Y, th)
        for f in ("theta", "g", "H", "T", "Q"):
            getattr(out, f)[a:a + X.shape[0]] = getattr(part, f)
    return out


def add_record(base: LogisticBase, x: torch.Tensor, y: torch.Tensor, iters: int = 8,
               chunk: int = 1 << 15) -> torch.Tensor:
    """MLE ``[M, d]`` of each base dataset plus one record (``x [d]`` or ``[M, d]``, ``y``
    scalar or ``[M]``): Newton on the quartic Taylor model of the base datasets' score plus
    the new record's exact score (module docstring). At most ``iters`` Newton steps per block of
    ``chunk`` datasets (blocks small enough to stay in cache), stopping once a step moves no
    dataset by more than ``1e-13`` of the largest solution: Newton converges quadratically, so
    the steps left would move it by less than rounding."""
    M, d = base.theta.shape
    x = x.to(torch.float64).expand(M, d)
    y = torch.as_tensor(y, dtype=torch.float64).expand(M)
    out = torch.empty(M, d, dtype=torch.float64)
    for a in range(0, M, chunk):
        b = min(M, a + chunk)
        out[a:b] = base.theta[a:b] + _taylor_newton(base.rows(slice(a, b)), x[a:b], y[a:b], iters)
    return out


def _taylor_newton(base: LogisticBase, x: torch.Tensor, y: torch.Tensor, iters: int) -> torch.Tensor:
    """The shift ``D [m, d]`` of :func:`add_record` for one block of datasets."""
    m, d = base.theta.shape
    T = base.T.reshape(m, d * d, d)
    Q = base.Q.reshape(m, d * d * d, d)
    xx = x.unsqueeze(-1) * x.unsqueeze(-2)
    D = torch.zeros(m, d, dtype=torch.float64)
    for _ in range(iters):
        Dc = D.unsqueeze(-1)
        TD = torch.bmm(T, Dc).reshape(m, d, d)
        QDD = torch.bmm(torch.bmm(Q, Dc).reshape(m, d * d, d), Dc).reshape(m, d, d)
        p = torch.sigmoid((x * (base.theta + D)).sum(-1))
        F = base.g + torch.bmm(base.H + TD / 2 + QDD / 6, Dc).squeeze(-1) + (p - y).unsqueeze(-1) * x
        J = base.H + TD + QDD / 2 + (p * (1 - p)).reshape(m, 1, 1) * xx
        step = torch.linalg.solve(J, F)
        D = D - step
        if float(step.abs().max()) <= 1e-13 * float(D.abs().max()):
            break
    return D


def taylor_error(s: Setting, M: int = 256, seed: int = 0) -> float:
    """Largest ``|add_record - full Newton fit|`` over ``M`` datasets plus a record drawn from
    the data model, in units of the weights' sd (``s.sd``): the Taylor solve's error."""
    gen = torch.Generator().manual_seed(seed + 17)
    X, Y = _datasets(s, M, s.n, gen)
    th_o = newton_logistic(X[:, :-1], Y[:, :-1], torch.from_numpy(s.theta_star), tol=1e-13)
    base = _derivatives(X[:, :-1], Y[:, :-1], th_o)
    got = add_record(base, X[:, -1], Y[:, -1])
    want = newton_logistic(X, Y, got, tol=1e-14)
    return float(((got - want).abs() / torch.from_numpy(s.sd)).max())


def cell_keys(grid: StepGrid | AbsmaxGrid, theta: np.ndarray, bin_width: float | None = None) -> np.ndarray:
    """One int64 key per release ``theta [..., d]`` of ``grid`` (``d <= 3``).

    Step grids: the codes (within ``+-2^20``). Absmax grids: the release ``(q, scale)`` gives
    the largest-magnitude weight ``v`` away exactly (a continuous value), so the key is its index,
    its sign, ``|v|`` in bins of ``bin_width`` (required) and the other weights' codes: a
    function of the release, so its TV is at most the release's (data processing) and reaches
    it as ``bin_width -> 0``.

    Raises:
        ValueError: ``d > 3``, codes out of range, or an absmax grid without ``bin_width``.
    """
    d = theta.shape[-1]
    if d > 3:
        raise ValueError("cell_keys handles d <= 3")
    if isinstance(grid, StepGrid):
        c = grid.codes(theta).astype(np.int64)
        if np.abs(c).max(initial=0) >= 2**20:
            raise ValueError("cell_keys handles step-grid codes within +-2^20")
        key = np.zeros(c.shape[:-1], dtype=np.int64)
        for j in range(d):
            key = key * (2**21) + (c[..., j] + 2**20)
        return key
    if bin_width is None or not bin_width > 0:
        raise ValueError("an absmax grid's keys need bin_width > 0 (the released absmax is continuous)")
    flat = theta.reshape(-1, d)
    q, _ = grid.release(flat)
    i = np.abs(flat).argmax(-1)
    v = np.take_along_axis(flat, i[:, None], 1)[:, 0]
    vbin = np.floor(np.abs(v) / bin_width).astype(np.int64)
    if vbin.max(initial=0) >= 2**31:
        raise ValueError("bin_width too small for the released absmax values")
    key = (i.astype(np.int64) * 2 + (v < 0)) * 2**31 + vbin
    for j in range(d - 1):  # the other weights' codes, in index order (|q| <= 2^(bits-1) <= 128)
        col = j + (j >= i).astype(np.int64)  # the j-th index other than i
        other = np.take_along_axis(q.astype(np.int64), col[:, None], 1)[:, 0]
        key = key * 2**9 + (other + 256)
    return key.reshape(theta.shape[:-1])


class OutCells:
    """The out arm's cells of one grid (``keys_out [M, R]`` of :func:`tv_bracket`), counted once
    for every target: the sorted distinct keys ``uniq [K]``, each one's first index in
    ``keys_out.reshape(-1)`` and its counts over all datasets and over each half (even, odd)."""

    def __init__(self, keys_out: np.ndarray):
        self.M, self.R = keys_out.shape
        self.uniq, self.first, inv = np.unique(keys_out.reshape(-1), return_index=True, return_inverse=True)
        inv = inv.reshape(self.M, self.R)
        K = self.uniq.size
        self.counts = [np.bincount(inv[sl].reshape(-1), minlength=K) for sl in (slice(None), slice(0, None, 2),
                                                                               slice(1, None, 2))]


def tv_bracket(keys_in: np.ndarray, keys_out: np.ndarray | OutCells,
               llr_of: Callable[[np.ndarray, int], np.ndarray] | None = None) -> dict[str, float]:
    """Estimates of ``TV(law(in), law(out))`` from coupled cell keys: ``keys_in [M]``
    (dataset ``m`` plus the target) and ``keys_out [M, R]`` (dataset ``m`` plus ``R`` fresh
    records, each of weight ``1 / R``), or their :class:`OutCells` (shared by many targets).
    ``{"split", "plug"}`` (biased down and up: module docstring), and with ``llr_of`` also
    ``"test"``: ``P_in(S) - P_out(S)`` counted on one half of the datasets for ``S = {cells:
    llr_of(first index of each cell in the concatenated [in, out] keys, half) > 0}``, a test
    fitted on the other half (an unbiased estimate of that test's advantage, a lower bound of the
    TV whatever the test). The cells are the sorted distinct keys of both arms. Raises
    ValueError when ``keys_in`` and the out arm hold different numbers of datasets."""
    out = keys_out if isinstance(keys_out, OutCells) else OutCells(keys_out)
    M, R = out.M, out.R
    if keys_in.shape != (M,):
        raise ValueError(f"keys_in has shape {keys_in.shape}, the out arm {M} datasets")
    K0 = out.uniq.size
    # each in key's cell among the out arm's; the cells only the in arm reaches (few) merged in
    pos = np.searchsorted(out.uniq, keys_in)
    found = pos < K0
    found[found] = out.uniq[pos[found]] == keys_in[found]
    new = np.unique(keys_in[~found])
    first_out = M + out.first
    counts = out.counts
    if new.size:
        uniq = np.concatenate([out.uniq, new])
        order = np.argsort(uniq, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        i_in = rank[pos]  # pos < K0 where found
        i_in[~found] = rank[K0 + np.searchsorted(new, keys_in[~found])]
        K = order.size
        first_out = np.zeros(K, dtype=np.int64)
        first_out[rank[:K0]] = M + out.first
        spread = []
        for c in counts:
            full = np.zeros(K, dtype=c.dtype)
            full[rank[:K0]] = c
            spread.append(full)
        counts = spread
    else:
        i_in, K = pos, K0
    halves = (slice(None), slice(0, None, 2), slice(1, None, 2))

    def mu(h: int) -> np.ndarray:
        sel = halves[h]
        ii = i_in[sel]
        return (np.bincount(ii, minlength=K) - counts[h] / R) / ii.size

    mu_all, mu_a, mu_b = mu(0), mu(1), mu(2)
    res = {"plug": 0.5 * float(np.abs(mu_all).sum()),
           "split": 0.5 * float((mu_b * (mu_a > 0)).sum() + (mu_a * (mu_b > 0)).sum())}
    if llr_of is not None:
        # first index of each cell: its first in-arm dataset, else its first out-arm draw
        first = np.full(K, np.iinfo(np.int64).max)
        np.minimum.at(first, i_in, np.arange(M))
        first = np.where(first == np.iinfo(np.int64).max, first_out, first)
        res["test"] = 0.5 * float((mu_b * (llr_of(first, 0) > 0)).sum() + (mu_a * (llr_of(first, 1) > 0)).sum())
    return res


def _mean_abs_normal(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``E|m + s Z|``, ``Z ~ N(0, 1)``, for ``m >= 0``, ``s >= 0`` (elementwise)."""
    pos = s > 0
    r = np.where(pos, m / np.where(pos, s, 1.0), 0.0)
    folded = m * (1.0 - 2.0 * ndtr(-r)) + 2.0 * s * np.exp(-0.5 * r * r) / np.sqrt(2.0 * np.pi)
    return np.where(pos, folded, m)


def tv_debiased(keys_in: np.ndarray, keys_out: np.ndarray, iters: int = 60) -> dict[str, float]:
    """The plug-in ``sum_c |mu_hat_c| / 2`` of :func:`tv_bracket` with each cell's noise removed
    by the method of moments: ``mu_hat_c`` is a mean over the ``M`` independent datasets of
    ``X_mc = 1[in_m = c] - n_mc / R`` (``n_mc`` of dataset ``m``'s ``R`` out draws in ``c``), so its
    standard error ``s_c`` is estimated from the same sums, and ``|mu_c|`` is replaced by the
    ``m >= 0`` with ``E|m + s_c Z| = |mu_hat_c|`` (0 where ``|mu_hat_c|`` is below the ``m = 0``
    value ``s_c sqrt(2 / pi)``). Not a bound: a null cell's root is ``>= 0``, so where cells are
    noise-dominated it keeps part of the plug-in's excess (removes ~40% of it,
    tests/test_logistic_truth.py) and reads above the TV; with sparse cells (fine absmax bins)
    the Gaussian model of ``mu_hat_c`` fails (docs/benchmarks.md, "cov46": +0.7 / +1.1% of
    the exact OLS absmax TV at 0.4 / 0.2 sd bins, M = 10^6; +2% at 0.1 sd). ``keys_in [M]``, ``keys_out [M, R]`` as
    :func:`tv_bracket`. Returns ``{"plug", "debiased", "floor"}``: ``floor`` is the plug-in's
    excess were every ``mu_c`` zero, ``sum_c s_c sqrt(2 / pi) / 2``.

    Raises:
        ValueError: ``keys_in`` and ``keys_out`` hold different numbers of datasets, or ``M < 2``.
    """
    if keys_out.ndim != 2 or keys_in.shape != (keys_out.shape[0],):
        raise ValueError(f"keys_in has shape {keys_in.shape}, keys_out {keys_out.shape}: want [M] and [M, R]")
    M, R = keys_out.shape
    if M < 2:
        raise ValueError(f"tv_debiased needs at least 2 datasets, got {M}")
    _, inv = np.unique(np.concatenate([keys_in, keys_out.reshape(-1)]), return_inverse=True)
    K = int(inv.max()) + 1
    ii, io = inv[:M], inv[M:].reshape(M, R)
    c_in = np.bincount(ii, minlength=K).astype(np.float64)
    c_out = np.bincount(io.reshape(-1), minlength=K).astype(np.float64)
    mu = (c_in - c_out / R) / M
    # sum_m X_mc^2 = c_in - 2 sum_m 1[in_m = c] n_mc / R + sum_m n_mc^2 / R^2
    cross = sum(np.bincount(ii[io[:, r] == ii], minlength=K) for r in range(R))
    sq = sum(np.bincount(io[io[:, r] == io[:, t], r], minlength=K) for r in range(R) for t in range(R))
    se = np.sqrt(np.maximum((c_in - 2.0 * cross / R + sq / R**2) / M - mu**2, 0.0) / (M - 1))
    a = np.abs(mu)
    lo, hi = np.zeros_like(a), a.copy()  # E|m + sZ| >= m: the root lies in [0, |mu_hat|]
    for _ in range(iters):  # bisection: E|m + sZ| increases in m
        mid = 0.5 * (lo + hi)
        above = _mean_abs_normal(mid, se) > a
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    return {"plug": 0.5 * float(a.sum()), "debiased": 0.5 * float((0.5 * (lo + hi)).sum()),
            "floor": 0.5 * float(se.sum()) * float(np.sqrt(2.0 / np.pi))}


def _gaussian_test(grid: StepGrid | AbsmaxGrid, th_in: np.ndarray, th_out: np.ndarray, mean: np.ndarray,
                   shifts: list[np.ndarray], cov: np.ndarray, seed: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """``llr_of(first, half)`` of :func:`tv_bracket`: the Gaussian log-likelihood ratio of the
    cells of the releases ``first`` indexes in ``[th_in [M, d], th_out [M R, d]]`` (concatenated;
    read without building it) with the in-out shift fitted on the other half."""
    M = th_in.shape[0]

    def llr_of(first: np.ndarray, half: int) -> np.ndarray:
        is_in = (first < M)[:, None]
        reps = np.where(is_in, th_in[np.minimum(first, M - 1)], th_out[np.maximum(first - M, 0)])
        return _llr_full(grid, reps, mean, shifts[half], cov, seed=seed + half)
    return llr_of


def exact_truth_logistic(s: Setting, grids: list[StepGrid | AbsmaxGrid], Z: int = 64, M: int = 1_000_000,
                         seed: int = 0, out_draws: int = 2, base: LogisticBase | None = None,
                         oracle_records: int = 4000, bin_sd: float = 0.05,
                         log: Callable[[str], None] | None = None,
                         on_target: Callable[[int, dict[str, np.ndarray]], None] | None = None
                         ) -> dict[str, np.ndarray]:
    """``Delta`` of each grid for a logistic setting: per target ``z ~ P`` the estimates
    of :func:`tv_bracket` over the ``M`` coupled datasets, averaged over ``Z`` targets with the
    control variate (the first-order formula with the true parameters, as
    :func:`~mis_lightning.groundtruth.ground_truth.exact_truth_ols`). The test of ``"test"``
    is the Gaussian likelihood-ratio test of the first-order theory (out arm's mean and
    covariance, in-out shift from the other half), read on the released cells (GHK box
    probabilities, :func:`~mis_lightning.groundtruth.ground_truth._llr_full`). Absmax grids are
    read through :func:`cell_keys` with the released absmax in bins of ``bin_sd`` times the
    largest weight sd (a coarsening of the release: its TV is at most the release's).

    Returns, per estimate ``e`` in ``("split", "test", "plug")``: ``e`` ``[G]`` (control-variate
    mean over targets), ``e + "_ci"`` ``[G, 2]`` (80% bootstrap interval over targets) and
    ``e + "_z"`` ``[Z, G]``; plus ``"null"`` ``[G]``: the plug-in of a second out arm against
    the first (same law: the plug-in's noise floor). The truth lies above ``split`` and
    ``test`` (lower bounds in expectation) and below ``plug`` in expectation. ``on_target(i,
    {e: [G]})`` is called after each target (a checkpoint). Cost: the base fits (~0.3 CPU ms
    per dataset of ``n = 1000``; pass ``base`` to reuse them) and per target one Taylor solve
    and one count per grid (the out arm's cells counted once per grid: :class:`OutCells`).

    Raises:
        ValueError: a non-logistic setting (:func:`logistic_base`), ``d > 3``.
    """
    if base is None:
        base = logistic_base(s, M, seed=seed)
    M = len(base)
    rng = np.random.default_rng([seed, 77])
    zx, zy = draw_records(s, Z, rng)
    # the out arms do not depend on the target: R fresh records per dataset, drawn once
    orng = np.random.default_rng([seed, 78])
    outs = []
    for _ in range(2 * out_draws):  # the second half: the null arm
        xo, yo = draw_records(s, M, orng)
        outs.append(add_record(base, torch.from_numpy(xo), torch.from_numpy(yo)).numpy())
    th_out = np.stack(outs[:out_draws], 1)  # [M, R, d]
    mean, cov = th_out.reshape(-1, s.d).mean(0), np.atleast_2d(np.cov(th_out.reshape(-1, s.d), rowvar=False))
    half = np.arange(M) % 2 == 0
    G = len(grids)
    names = ("split", "test", "plug")
    est = {e: np.zeros((Z, G)) for e in names}
    null = np.zeros(G)
    bw = bin_sd * float(np.max(s.sd))
    # the out arm's cells, counted once per grid for every target
    out_cells = [OutCells(np.stack([cell_keys(g, o, bw) for o in outs[:out_draws]], 1)) for g in grids]
    for j, g in enumerate(grids):
        null_keys = cell_keys(g, outs[out_draws], bw)  # one null draw against the out arm: a same-law pair
        null[j] = tv_bracket(null_keys, out_cells[j])["plug"]
    th_out_flat = th_out.reshape(-1, s.d)
    out_half_means = [th_out[sel].reshape(-1, s.d).mean(0) for sel in (half, ~half)]
    for i in range(Z):
        th_in = add_record(base, torch.from_numpy(zx[i]), torch.tensor(float(zy[i]))).numpy()
        # the in-out shift of the Gaussian test, from each half of the datasets
        shifts = [th_in[sel].mean(0) - om for sel, om in zip((half, ~half), out_half_means)]
        for j, g in enumerate(grids):
            llr_of = _gaussian_test(g, th_in, th_out_flat, mean, shifts, cov, seed + 7 * i)
            r = tv_bracket(cell_keys(g, th_in, bw), out_cells[j], llr_of)
            for e in names:
                est[e][i, j] = r[e]
        if log is not None:
            log(f"target {i + 1}/{Z}: test {est['test'][i].round(5).tolist()}")
        if on_target is not None:  # e.g. a checkpoint: a long run that stops keeps its targets
            on_target(i, {e: est[e][i].copy() for e in names})
    orc = np.stack([oracle_first_order(s, g, zx, zy) for g in grids], 1)
    orc_mean, orc_se = oracle_mean(s, grids, oracle_records, seed)
    res: dict[str, np.ndarray] = {"null": null}
    for e in names:
        res[e], res[e + "_ci"] = cv_estimate(est[e], orc, orc_mean, boot=300, level=0.8, seed=seed, c_mean_se=orc_se)
        res[e + "_z"] = est[e]
    return res
