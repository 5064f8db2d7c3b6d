"""Monte Carlo re-quantization: cell moments of the real scheme (method.md section 5).

The analytic mode (:meth:`ParamGrid.moments`) scores each weight on the grid the scheme
produced for the trained weights ``theta``, held fixed. Schemes whose grid depends on the
weights (absmax scales, asymmetric zero points, GPTQ/HQQ-style rounding) move their grid
when the weights move. This mode runs the real scheme on perturbed weights instead:

    for s = 1..S:  theta_s = theta + sigma * xi_s,  xi_s ~ N(0, I);
                   code_s = the code the scheme releases for each element at theta_s

and estimates, per element ``j``, the conditional means ``m_j = E[xi_j | code_j]`` and from
them ``kappa_j = E m_j^2`` (also ``lam_j = E |m_j|`` and ``m4_j = E m_j^4``).

Estimator (vectorised over elements: each element's ``[S]`` codes are sorted along the draw
axis and cut into groups of equal code). For a group ``g`` with ``n_g`` draws, sample mean
``xbar_g`` and unbiased sample variance ``v_g``, ``E[xbar_g^2] = mu_g^2 + var_g / n_g``: the
plug-in ``sum_g (n_g/S) xbar_g^2`` over-counts by ``sum_g var_g / S``, which is subtracted:

    kappa_j = (1/S) sum_g (n_g xbar_g^2 - v_g)

(for ``n_g >= 2`` the term equals ``(T_g^2 - Q_g) / (n_g - 1)`` with ``T, Q`` the sum and
sum of squares: a U-statistic, unbiased for ``n_g mu_g^2``). A singleton group has no
variance of its own; it uses the element's pooled within-group variance (0 if every group
is a singleton: the grid is then finer than the draws resolve and the estimate is the
plug-in, biased up -- ``singleton_share`` reports how much of the estimate rests on
singletons). An element with one code in all draws is frozen: ``kappa = lam = m4 = 0``
exactly. ``kappa`` is clamped to ``[0, 1]``; ``kappa_raw`` is not (average that one). ``lam`` and ``m4`` are plug-in values
(biased up by the same within-group noise, not corrected).

What is grouped: the element's **code** (``by="code"``, default): the integer code of an
affine grid, the index of the representable value (``dequantized / scale``) of a table
grid. The scales themselves are released too and are not conditioned on: an absmax scale
reveals its block's largest weight exactly, while that weight's code never moves (it
always maps to the end of the code range), so both modes score it as frozen-or-nearly --
neither counts what the scale leaks. ``by="value"`` groups by the released value instead
(identical to ``by="code"`` for fixed-scale grids; for weight-dependent scales almost every
draw then has its own value).

Cost and memory: ``S`` runs of the scheme (each deep-copies the model) and ``S * d`` codes
and noises (12 bytes each) for the ``d`` quantized elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._modelcopy import private_copy
from ..functional.runs import per_table
from .base import FilterFn, ParamGrid, QuantizationScheme
from .registry import get_scheme

#: draws of the re-quantization when scoring a grid whose rounding is not nearest
REQUANT_DRAWS = 64


@dataclass(frozen=True)
class RequantMoments:
    """Monte Carlo cell moments of one parameter (flat, ``[numel]`` float64).

    Attributes:
        kappa, lam, m4: as :class:`~mis_lightning.functional.CellMoments` (kappa clamped
            to ``[0, 1]``).
        kappa_raw: the unclamped, bias-corrected estimate (may leave ``[0, 1]`` by Monte
            Carlo noise; average this one: clamping biases means near 0 and 1).
        coverage: all ones (every draw lands in some cell).
        frozen: ``[numel]`` bool, the code did not move in any draw.
        singleton_share: ``[numel]`` share of draws whose code occurred only once.
        num_draws: ``S``.
    """

    kappa: Tensor
    lam: Tensor
    m4: Tensor
    coverage: Tensor
    frozen: Tensor
    singleton_share: Tensor
    num_draws: int
    kappa_raw: Tensor


def conditional_mean_moments(codes: Tensor, xi: Tensor) -> RequantMoments:
    """Estimate ``kappa, lam, m4`` of every column from ``[S, c]`` codes and noises.

    See the module docstring for the estimator and its bias correction.
    """
    if codes.shape != xi.shape or codes.dim() != 2:
        raise ValueError(f"codes and xi must both be [S, c], got {tuple(codes.shape)} and {tuple(xi.shape)}")
    s_draws = codes.shape[0]
    x = xi.to(torch.float64)
    order = torch.argsort(codes, dim=0, stable=True)
    cs = torch.gather(codes, 0, order)
    xs = torch.gather(x, 0, order)
    new = torch.ones_like(cs, dtype=torch.bool)
    new[1:] = cs[1:] != cs[:-1]
    gid = torch.cumsum(new.to(torch.int64), dim=0) - 1  # [S, c] group index per column
    zeros = torch.zeros_like(xs)
    n = zeros.scatter_add(0, gid, torch.ones_like(xs))
    t = zeros.scatter_add(0, gid, xs)
    q = zeros.scatter_add(0, gid, xs * xs)
    live = n > 0
    multi = n >= 2
    n_safe = torch.where(live, n, torch.ones_like(n))
    mean = torch.where(live, t / n_safe, zeros)
    var = torch.where(multi, (q - t * t / n_safe) / torch.where(multi, n - 1, torch.ones_like(n)), zeros)
    dof = torch.where(multi, n - 1, zeros).sum(0)
    pooled = torch.where(dof > 0, (var * torch.where(multi, n - 1, zeros)).sum(0) / dof.clamp_min(1),
                         torch.zeros_like(dof))
    single = live & ~multi
    var_used = torch.where(single, pooled.expand_as(var), var)
    kappa = (torch.where(live, n * mean * mean - var_used, zeros)).sum(0) / s_draws
    w = n / s_draws
    lam = (w * mean.abs()).sum(0)
    m4 = (w * mean.pow(4)).sum(0)
    frozen = ~new[1:].any(0) if s_draws > 1 else torch.ones(codes.shape[1], dtype=torch.bool)
    kappa_raw = torch.where(frozen, torch.zeros_like(kappa), kappa)
    kappa = kappa_raw.clamp(0.0, 1.0)
    lam = torch.where(frozen, torch.zeros_like(lam), lam)
    m4 = torch.where(frozen, torch.zeros_like(m4), m4)
    singleton_share = torch.where(single, n, zeros).sum(0) / s_draws
    return RequantMoments(kappa=kappa, lam=lam, m4=m4, coverage=torch.ones_like(kappa),
                          frozen=frozen, singleton_share=singleton_share, num_draws=s_draws,
                          kappa_raw=kappa_raw)


def release_codes(grid: ParamGrid, by: str = "code") -> Tensor:
    """The released code of every element of a grid, flat float64 (see module docstring)."""
    if by == "value":
        return grid.dequantized.reshape(-1).to(torch.float64)
    if by != "code":
        raise ValueError(f"by must be 'code' or 'value', got {by!r}")
    if grid.kind == "affine" and grid.codes is not None:
        return grid.codes.reshape(-1).to(torch.float64)
    scale, _, _ = grid.element_grid(0, grid.numel)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = torch.where(scale > 0, grid.dequantized.reshape(-1).to(torch.float64) / safe,
                    torch.zeros_like(scale))
    if grid.kind == "affine":  # affine without codes: value in units of the scale, rounded
        _, zp, _ = grid.element_grid(0, grid.numel)
        return torch.round(x + zp)
    assert grid.values is not None
    return torch.searchsorted(_midpoints(grid.values), x).to(torch.float64)


class _Midpoints:
    """A value table's float64 copy (``values``, compared before reuse) and its midpoints ``mids``."""

    def __init__(self, values: Tensor, device: torch.device) -> None:
        self.values = values.detach().to(device=device, dtype=torch.float64).clone()
        self.mids = 0.5 * (self.values[1:] + self.values[:-1])


_MIDS: dict[tuple[int, int, str], _Midpoints] = {}


def _midpoints(values: Tensor) -> Tensor:
    """Midpoints of a value table, cached per table (by address, its values compared before reuse:
    a freed table's address reused by another, or a table changed in place, is not served the
    old midpoints; formerly keyed by address alone)."""
    return per_table(_MIDS, values, values.device, _Midpoints).mids


def requantize_moments(
    scheme: str | QuantizationScheme,
    model: nn.Module,
    sigma: dict[str, Tensor],
    num_draws: int = 64,
    generator: torch.Generator | None = None,
    by: str = "code",
) -> dict[str, RequantMoments]:
    """Monte Carlo cell moments of every quantized parameter that has a ``sigma``.

    Args:
        scheme: registry name or scheme object (run for real on every draw).
        model: the trained model (never modified).
        sigma: parameter name -> std of the trained weights (``[shape]`` or flat), for the
            parameters the scheme quantizes; parameters the scheme leaves in float are
            skipped (their kappa is 1).
        num_draws: ``S`` (the estimate's noise falls like ``1/sqrt(S)``).
        generator: for the noises ``xi`` (CPU).
        by: group draws by ``"code"`` (default) or by released ``"value"``.

    Returns:
        parameter name -> :class:`RequantMoments` (flat, ``[numel]``).
    """
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2, got {num_draws}")
    sch = get_scheme(scheme)
    base = sch.apply(model)
    names = [n for n in base.grids if n in sigma]
    work = private_copy(model, f"copying the model for the requantization draws of {sch.name!r}")
    params = dict(work.named_parameters())
    theta = {n: params[n].detach().clone() for n in names}
    sig = {n: sigma[n].detach().to(theta[n].dtype).reshape(theta[n].shape).to(theta[n].device)
           for n in names}
    codes = {n: torch.empty(num_draws, theta[n].numel(), dtype=torch.float64) for n in names}
    noise = {n: torch.empty(num_draws, theta[n].numel(), dtype=torch.float32) for n in names}
    for s in range(num_draws):
        with torch.no_grad():
            for n in names:
                xi = torch.randn(theta[n].numel(), generator=generator, dtype=torch.float32)
                noise[n][s] = xi
                params[n].copy_(theta[n] + sig[n] * xi.to(theta[n]).reshape(theta[n].shape))
        res = sch.apply(work)
        for n in names:
            if n not in res.grids:
                raise RuntimeError(f"scheme {sch.name!r} did not quantize {n!r} on draw {s}")
            codes[n][s] = release_codes(res.grids[n], by=by).cpu()
    return {n: conditional_mean_moments(codes[n], noise[n]) for n in names}


def compare_requantization(
    scheme: str | QuantizationScheme,
    model: nn.Module,
    sigma: dict[str, Tensor],
    num_draws: int = 64,
    generator: torch.Generator | None = None,
) -> dict:
    """Analytic (fixed grid) against Monte Carlo (real scheme) kappa, per parameter and in all.

    Returns a plain dict: ``scheme``, ``num_draws``, ``params`` (name -> ``numel``,
    ``kappa_analytic``, ``kappa_mc`` (means over elements of the analytic kappa and of the
    unclamped MC estimate ``kappa_raw``), ``mean_diff`` (MC - analytic),
    ``se_diff`` (its standard error across elements), ``max_abs_diff``,
    ``frozen_analytic`` (share with ``kappa < 1e-6``), ``frozen_mc``, ``singleton_share``)
    and ``total`` (the same, pooled over the parameters).
    """
    sch = get_scheme(scheme)
    base = sch.apply(model)
    mc = requantize_moments(sch, model, sigma, num_draws=num_draws, generator=generator)
    params = dict(model.named_parameters())
    out: dict = {"scheme": sch.name, "num_draws": num_draws, "params": {}}
    diffs, ka, km, ss = [], [], [], []
    for name, mm in mc.items():
        g = base.grids[name]
        th = params[name].detach().reshape(-1)
        sg = sigma[name].detach().reshape(-1).to(th)
        an = g.moments(th, sg, 0, g.numel).kappa
        d = mm.kappa_raw - an
        out["params"][name] = _stats(an, mm.kappa_raw, d, mm.singleton_share)
        diffs.append(d)
        ka.append(an)
        km.append(mm.kappa_raw)
        ss.append(mm.singleton_share)
    if diffs:
        out["total"] = _stats(torch.cat(ka), torch.cat(km), torch.cat(diffs), torch.cat(ss))
    return out


def _stats(an: Tensor, mc: Tensor, d: Tensor, single: Tensor) -> dict:
    k = d.numel()
    return {
        "numel": k,
        "kappa_analytic": float(an.mean()),
        "kappa_mc": float(mc.mean()),
        "mean_diff": float(d.mean()),
        "se_diff": float(d.std() / math.sqrt(k)) if k > 1 else float("nan"),
        "max_abs_diff": float(d.abs().max()),
        "frozen_analytic": float((an < 1e-6).double().mean()),
        "frozen_mc": float((mc < 1e-6).double().mean()),
        "singleton_share": float(single.mean()),
    }


class FixedStepQuantizer(QuantizationScheme):
    """A reference scheme whose grid does not depend on the weights (not registered).

    Rounds every ``nn.Linear`` weight to the nearest multiple of a fixed ``step`` (codes in
    ``[qmin, qmax]``, symmetric, zero point 0). Its analytic moments are exact for the real
    scheme, so the Monte Carlo mode must agree with them within Monte Carlo error: the
    validation of :func:`requantize_moments`.
    """

    backend = "builtin"
    name = "fixed_step"

    def __init__(self, step: float, qmin: int = -(2**15), qmax: int = 2**15 - 1,
                 filter_fn: FilterFn | None = None) -> None:
        super().__init__(filter_fn)
        if not step > 0:
            raise ValueError(f"step must be positive, got {step!r}")
        self.step, self.qmin, self.qmax = float(step), int(qmin), int(qmax)

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend, "step": self.step,
                "qmin": self.qmin, "qmax": self.qmax}

    @torch.no_grad()
    def _quantize_copy(self, model: nn.Module):
        names = {id(p): n for n, p in model.named_parameters()}
        grids: dict[str, ParamGrid] = {}
        for fqn, m in model.named_modules():
            if not self._selected(m, fqn, lambda mod: isinstance(mod, nn.Linear)):
                continue
            w = m.weight
            name = names[id(w)]
            scale = torch.full((1, 1), self.step, dtype=torch.float64)
            codes = torch.round(w.detach().to(torch.float64) / self.step).clamp(self.qmin, self.qmax)
            deq = codes * self.step
            w.copy_(deq.to(w.dtype))
            grids[name] = ParamGrid(
                name=name, shape=tuple(w.shape), kind="affine", dequantized=deq.to(torch.float32),
                bits_per_weight=math.log2(self.qmax - self.qmin + 1), scale=scale,
                block_size=tuple(w.shape), zero_point=torch.zeros_like(scale),
                qmin=self.qmin, qmax=self.qmax, codes=codes.to(torch.int64),
            )
        return grids, []


@dataclass(frozen=True)
class JointRequant:
    """Monte Carlo re-quantization of one scheme over all its non-nearest parameters at once.

    Attributes:
        moments: parameter name -> :class:`RequantMoments` (elements the release reveals
            exactly -- ``ParamGrid.revealed`` -- set to the unquantized moments: kappa 1).
        num_draws: ``S``.
        seed: the seed of the draws (the same for every scheme: common random numbers).
        d_eff: ``sum kappa`` over the re-quantized elements that move (``sigma > 0``: one with sd
            0 leaks nothing and counts 0 even where revealed, as in the scoring pass).
        d_eff_se: its Monte Carlo standard error (delete-a-group jackknife over the draws).
        seconds: wall time of the ``S`` scheme runs.
    """

    moments: dict[str, RequantMoments]
    num_draws: int
    seed: int
    d_eff: float
    d_eff_se: float
    seconds: float


def _reveal(mm: RequantMoments, revealed: Tensor | None) -> RequantMoments:
    if revealed is None or not bool(revealed.any()):
        return mm
    rev = revealed.reshape(-1).to(mm.kappa.device)
    one = torch.ones_like(mm.kappa)
    return RequantMoments(kappa=torch.where(rev, one, mm.kappa), lam=torch.where(rev, one * math.sqrt(2 / math.pi), mm.lam),
                          m4=torch.where(rev, one * 3.0, mm.m4), coverage=mm.coverage,
                          frozen=mm.frozen & ~rev, singleton_share=mm.singleton_share,
                          num_draws=mm.num_draws, kappa_raw=torch.where(rev, one, mm.kappa_raw))


def requantize_joint(
    scheme: str | QuantizationScheme,
    model: nn.Module,
    sigma: dict[str, Tensor],
    names: list[str] | None = None,
    num_draws: int = REQUANT_DRAWS,
    seed: int = 0,
    groups: int = 8,
) -> JointRequant:
    """Monte Carlo cell moments of a scheme, every perturbed parameter drawn jointly.

    Unlike :func:`requantize_moments` (one parameter at a time), each draw perturbs *every*
    parameter of ``sigma`` at once, ``theta + sigma * xi_s`` (a calibrated scheme's layer
    inputs move with the earlier layers' weights and biases), and runs the scheme once --
    calibration included, for schemes that hold calibration inputs -- so the cost is ``S``
    scheme runs whatever the number of parameters. The noises come from a generator seeded
    with ``seed`` in the order of ``sigma``: every scheme scored with the same ``seed`` and
    ``sigma`` sees the same perturbed weights (common random numbers), so differences between
    schemes carry much less Monte Carlo noise than each scheme's own estimate.

    Args:
        scheme: registry name or (calibrated) scheme object.
        model: the trained float model (never modified).
        sigma: parameter name -> std (``[shape]`` or flat) of every parameter to perturb.
        names: the parameters whose moments are wanted (default: every quantized one in
            ``sigma``).
        num_draws: ``S`` (>= 2 * groups).
        seed: seed of the draws.
        groups: groups of draws of the jackknife standard error of ``d_eff``.

    Returns:
        :class:`JointRequant`.

    Raises:
        ValueError: ``num_draws < 2 * groups`` or ``groups < 2``.
        RuntimeError: a draw's release lacks a parameter the trained release quantized.
    """
    import time

    if groups < 2 or num_draws < 2 * groups:
        raise ValueError(f"num_draws must be >= 2 * groups (groups >= 2), got num_draws={num_draws}, "
                         f"groups={groups}")
    sch = get_scheme(scheme)
    t0 = time.perf_counter()
    base = sch.apply(model)
    want = [n for n in (names if names is not None else list(base.grids)) if n in base.grids and n in sigma]
    work = private_copy(model, f"copying the model for the requantization draws of {sch.name!r}")
    params = dict(work.named_parameters())
    perturb = [n for n in sigma if n in params]
    theta = {n: params[n].detach().clone() for n in perturb}
    sig = {n: sigma[n].detach().to(theta[n].dtype).reshape(theta[n].shape).to(theta[n].device) for n in perturb}
    codes = {n: torch.empty(num_draws, theta[n].numel(), dtype=torch.float64) for n in want}
    noise = {n: torch.empty(num_draws, theta[n].numel(), dtype=torch.float32) for n in want}
    gen = torch.Generator().manual_seed(seed)
    for s in range(num_draws):
        with torch.no_grad():
            for n in perturb:
                xi = torch.randn(theta[n].numel(), generator=gen, dtype=torch.float32)
                if n in noise:
                    noise[n][s] = xi
                params[n].copy_(theta[n] + sig[n] * xi.to(theta[n]).reshape(theta[n].shape))
        res = sch.apply(work)
        for n in want:
            if n not in res.grids:
                raise RuntimeError(f"scheme {sch.name!r} did not quantize {n!r} on draw {s}")
            codes[n][s] = release_codes(res.grids[n]).cpu()
    seconds = time.perf_counter() - t0
    moments = {n: _reveal(conditional_mean_moments(codes[n], noise[n]), base.grids[n].revealed) for n in want}
    # the elements no draw moves (sd 0) leak nothing: 0 in d_eff whatever their kappa (a revealed one: 1)
    moved = {n: sig[n].reshape(-1).cpu() > 0 for n in want}
    d_eff = float(sum(float(moments[n].kappa[moved[n]].sum()) for n in want))
    # delete-a-group jackknife of d_eff over the draws (the estimator is not a mean of draws)
    cut = torch.arange(num_draws) % groups
    reps = []
    for g in range(groups):
        keep = cut != g
        reps.append(sum(float(_reveal(conditional_mean_moments(codes[n][keep], noise[n][keep]),
                                      base.grids[n].revealed).kappa[moved[n]].sum()) for n in want))
    r = torch.tensor(reps, dtype=torch.float64)
    se = float(((groups - 1) / groups * ((r - r.mean()) ** 2).sum()).sqrt()) if want else 0.0
    return JointRequant(moments=moments, num_draws=num_draws, seed=seed, d_eff=d_eff, d_eff_se=se,
                        seconds=seconds)
