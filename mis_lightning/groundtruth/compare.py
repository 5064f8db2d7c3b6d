"""The indicator against the simulated ground truth (see ``ground_truth.py``).

Per setting: one dataset is drawn, the model trained (closed-form OLS or Newton MLE), and
``sigma``, ``w`` estimated by :func:`mis_lightning.estimation.estimate` (``mode="exact"``);
the indicator of each grid is then computed by the library as shipped,
:func:`mis_lightning.assess.score_schemes`: with the real ``rtn_int*`` scheme for the absmax grids
(so the weights the released scale gives away are scored as unquantized, ``revealed`` of
:class:`~mis_lightning.quantization.base.ParamGrid`), and with :class:`StepScheme` -- the
step grid written as an affine ``ParamGrid`` (``scale = step``, float zero point
``offset - origin / step``) -- for the step and fixed grids. The interval is the report's
``SchemeResult.interval``: parametric-bootstrap p10-p90 widened to contain the plug-in and
by 1.28 standard errors of the mean over records (``assess._interval``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats as sstats
from torch import nn

from ..assess import score_schemes
from ..estimation import estimate
from ..functional import saturate
from ..functional.cells import SQRT_2_OVER_PI
from ..quantization import get_scheme
from ..quantization.base import ParamGrid, QuantizationScheme
from .ground_truth import (
    Grid,
    Setting,
    StepGrid,
    TorchaoSymmetricGrid,
    TruthResult,
    draw_records,
)

score = score_schemes  # the name this module exported before issue 10


class _Linear(nn.Module):
    def __init__(self, theta: np.ndarray) -> None:
        super().__init__()
        self.linear = nn.Linear(theta.shape[0], 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(theta).reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def loss_fn_for(model: str):
    if model == "linear":
        return lambda out, y: 0.5 * (out - y) ** 2
    return lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none")


def fit(s: Setting, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Train on one dataset: OLS (closed form) or logistic MLE (Newton)."""
    if s.model == "linear":
        return np.linalg.solve(x.T @ x, x.T @ y)
    from .ground_truth import newton_logistic

    th = newton_logistic(torch.from_numpy(x)[None], torch.from_numpy(y)[None], torch.from_numpy(s.theta_star))
    return th[0].numpy()


def train_and_estimate(s: Setting, rng: np.random.Generator, num_records: int | None = None,
                       leverage_correction: bool | str = False):
    """One dataset -> (theta_hat, library Estimate, torch model, data).

    ``num_records`` (default: all ``n``, at most 10,000) records carry the average over
    ``z``; a 512-record subsample alone moves the value by ~5% (sd of ``|w|`` / sqrt(512)).
    ``leverage_correction``: the estimator's option (method.md section 4).
    """
    num_records = num_records or min(s.n, 10_000)
    x, y = draw_records(s, s.n, rng)
    th = fit(s, x, y)
    model = _Linear(th).to(torch.float64)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(ds, batch_size=min(s.n, 4096))
    est = estimate(model, loader, loss_fn_for(s.model), mode="exact", num_records=num_records,
                   leverage_correction=leverage_correction)
    return th, est, model, (x, y)


# Code range of a step grid as an affine grid: wide enough never to be reached.
_STEP_QRANGE = 2**40


class StepScheme(QuantizationScheme):
    """A :class:`StepGrid` as a quantization scheme, so that ``score`` can rate it.

    Round-to-nearest on ``origin_j + (k - offset) step_j`` is the affine grid
    ``(q - zp_j) * scale_j`` with ``scale_j = step_j``, float zero point
    ``zp_j = offset - origin_j / step_j`` and ``q = k``. The grid is fixed (does not depend
    on the weights): ``scale_rule = "none"``, nothing is revealed.
    """

    backend = "builtin"
    scale_rule = "none"

    def __init__(self, grid: StepGrid) -> None:
        super().__init__()
        self.grid = grid
        self.name = f"step:{grid.name}"

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module) -> tuple[dict[str, ParamGrid], list[str]]:
        lin = model.linear
        w = lin.weight
        th = w.detach().reshape(-1).to(torch.float64).numpy()
        d = th.shape[0]
        step = np.broadcast_to(np.asarray(self.grid.step, dtype=np.float64), (d,))
        origin = np.broadcast_to(np.asarray(self.grid.origin, dtype=np.float64), (d,))
        zp = self.grid.offset - origin / step
        codes = self.grid.codes(th)
        deq = origin + (codes - self.grid.offset) * step
        w.copy_(torch.from_numpy(deq).reshape(w.shape).to(w.dtype))
        grid = ParamGrid(
            name="linear.weight", shape=tuple(w.shape), kind="affine",
            dequantized=torch.from_numpy(deq).reshape(w.shape).to(torch.float32), bits_per_weight=64.0,
            scale=torch.from_numpy(step.copy()).reshape(w.shape), block_size=(1, 1),
            zero_point=torch.from_numpy(zp.copy()).reshape(w.shape), qmin=-_STEP_QRANGE, qmax=_STEP_QRANGE,
            codes=torch.from_numpy(codes).reshape(w.shape),
        )
        return {"linear.weight": grid}, []


def scheme_for(grid: Grid) -> QuantizationScheme:
    """The library scheme that releases ``grid``."""
    if isinstance(grid, StepGrid):
        return StepScheme(grid)
    if isinstance(grid, TorchaoSymmetricGrid):
        return get_scheme(f"intx_weight_only_int{grid.bits}")
    return get_scheme(f"rtn_int{grid.bits}")


def indicator(s: Setting, grids: list[Grid], est, model: nn.Module, draws: int = 32,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(value [G], interval [G, 2], baseline [G])`` of each grid from one trained model,
    all from :func:`mis_lightning.assess.score_schemes` (point value and ``SchemeResult.interval``)."""
    w = est.influence
    val = np.zeros(len(grids))
    iv = np.full((len(grids), 2), np.nan)
    schemes = [scheme_for(g) for g in grids]
    rep = score_schemes(est, model, schemes, uncertainty_draws=draws, seed=seed)
    for g, sch in enumerate(schemes):
        r = rep.schemes[sch.name]
        val[g] = r.leakage
        if r.interval is not None:
            iv[g] = r.interval
    base = float(saturate(SQRT_2_OVER_PI * w.norm(dim=-1) / (2 * math.sqrt(est.n))).mean())
    return val, iv, np.full(len(grids), base)


@dataclass
class Comparison:
    setting: str
    grids: list[str]
    truth: np.ndarray
    truth_ci: np.ndarray
    value: np.ndarray  # indicator of one trained model
    interval: np.ndarray  # its bootstrap p10-p90
    spread: np.ndarray | None = None  # [G, 2] p10-p90 of the indicator over many trainings
    spread_median: np.ndarray | None = None
    coverage: np.ndarray | None = None  # [G] fraction of trainings whose interval holds the truth
    spearman: float = math.nan
    kendall: float = math.nan
    extra: dict = field(default_factory=dict)

    @property
    def rel_err(self) -> np.ndarray:
        return self.value / np.maximum(self.truth, 1e-12) - 1.0


def truth_values(t: TruthResult) -> tuple[np.ndarray, np.ndarray]:
    return t.estimate, t.ci


def compare(s: Setting, grids: list[Grid], truth: TruthResult, seed: int = 0, draws: int = 32,
            n_models: int = 0) -> Comparison:
    rng = np.random.default_rng([seed, 555, s.d, s.n])
    _, est, model, _ = train_and_estimate(s, rng)
    val, iv, _ = indicator(s, grids, est, model, draws=draws, seed=seed)
    tv, ci = truth_values(truth)
    c = Comparison(setting=s.label(), grids=[g.name for g in grids], truth=tv, truth_ci=ci, value=val, interval=iv)
    if len(grids) >= 3:
        c.spearman = float(sstats.spearmanr(val, tv).statistic)
        c.kendall = float(sstats.kendalltau(val, tv).statistic)
        step = np.array([isinstance(g, StepGrid) for g in grids])
        c.extra["spearman_step"] = float(sstats.spearmanr(val[step], tv[step]).statistic)
        c.extra["kendall_step"] = float(sstats.kendalltau(val[step], tv[step]).statistic)
    if n_models:
        vals, cover = [], []
        for k in range(n_models):
            _, e, m, _ = train_and_estimate(s, rng)
            v, i, _ = indicator(s, grids, e, m, draws=16, seed=seed + k + 1)
            vals.append(v)
            cover.append((i[:, 0] <= tv) & (tv <= i[:, 1]))
        vals = np.array(vals)
        c.spread = np.quantile(vals, [0.1, 0.9], axis=0).T
        c.spread_median = np.median(vals, axis=0)
        c.coverage = np.mean(cover, axis=0)
        c.extra["n_models"] = n_models
    return c


# ---------------------------------------------------------------------------------------
# correlated coordinates: exact first-order term with m(U) = E[U | boxes] under N(0, Sigma)
# ---------------------------------------------------------------------------------------


def correlated_first_order(psi: np.ndarray, Sigma: np.ndarray, theta: np.ndarray, grid: StepGrid, n: int,
                           num: int = 400_000, seed: int = 0) -> float:
    """``mean_z G((1/(2 sqrt n)) E_U |psi(z)' Sigma^-1 m(U)|)`` (method.md section 3,
    correlated coordinates), ``U ~ N(0, Sigma)`` and the cells those of ``theta + U/sqrt(n)``.

    ``m(U)``, the conditional mean of ``U`` given the box (one cell per coordinate), is
    estimated by Monte Carlo: ``num`` draws of ``U`` grouped by box, each box's mean is the
    average of its draws (boxes visited by few draws get a noisy mean, which biases
    ``E|.|`` upward by at most ~``1/sqrt(draws per box)``; with ``d <= 3`` and cells of at
    least ``sd/2`` there are a few hundred boxes and thousands of draws in each that matters).
    """
    rng = np.random.default_rng(seed)
    L = np.linalg.cholesky(Sigma)
    U = rng.standard_normal((num, Sigma.shape[0])) @ L.T
    codes = grid.codes(theta[None] + U / math.sqrt(n)).astype(np.int64)
    _, inv = np.unique(codes, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    cnt = np.bincount(inv)
    m = np.stack([np.bincount(inv, weights=U[:, j]) / cnt for j in range(U.shape[1])], 1)[inv]
    a = np.linalg.solve(Sigma, psi.T).T  # [R, d] Sigma^-1 psi
    t = np.abs(m @ a.T).mean(0) / (2 * math.sqrt(n))  # [R]
    return float(saturate(torch.from_numpy(t)).mean())
