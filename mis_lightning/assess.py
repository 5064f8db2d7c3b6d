"""``assess``: estimation -> quantization -> functional -> report, in one call.

``score`` is the second half on its own: given an :class:`~mis_lightning.estimation.Estimate`
(from :func:`~mis_lightning.estimation.estimate`, or rebuilt from synced Metric states) it
quantizes, computes cell moments chunk by chunk and returns the :class:`Report`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import functional as F
from .functional._checks import check_finite
from .estimation import Estimate, estimate
from .estimation.per_sample import BatchFn, LossFn
from .quantization import NoQuantization, QuantizationScheme, SchemeError, get_scheme
from .quantization.base import ParamGrid
from .report import LayerResult, Report, SchemeResult
from .utility import OutputTransform, evaluate_utility

log = logging.getLogger(__name__)

SchemeSpec = str | QuantizationScheme
FROZEN_KAPPA = 1e-6
# kappa of a uniform grid of step 0.5 sd: coordinates above it are scored as Gaussian in MC.
_FINE_KAPPA = 1.0 - 0.25 / 12.0 + 0.0625 / 144.0
MC_MAX_COORDS = 200_000
DEFAULT_CHUNK = 1 << 18


def _dtype_bits(t: Tensor) -> int:
    return torch.finfo(t.dtype).bits if t.is_floating_point() else 8 * t.element_size()


def _check_model_finite(model: nn.Module, names: Sequence[str]) -> None:
    params = dict(model.named_parameters())
    for n in names:
        p = params[n]
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter {n!r} of the model holds NaN or inf")


def assess(
    model: nn.Module,
    schemes: SchemeSpec | Sequence[SchemeSpec],
    train_dataloader: Iterable,
    loss_fn: LossFn,
    *,
    params: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
    estimation: str = "auto",
    hessian: str = "auto",
    weight_decay: float = 0.0,
    num_records: int = 512,
    method: str = "auto",
    batch_fn: BatchFn | None = None,
    val_dataloader: Iterable | None = None,
    metrics: Mapping[str, Any] | None = None,
    output_transform: OutputTransform | None = None,
    uncertainty_draws: int = 16,
    num_samples: int = 4096,
    seed: int = 0,
    strict: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Callable[[str, int], None] | None = None,
) -> Report:
    """Membership-inference security of ``model`` under each quantization scheme.

    Args:
        model: the trained model; never modified (parameters stay bit-identical).
        schemes: registry names (see ``mis_lightning.quantization.available_schemes()``) or
            scheme objects.
        train_dataloader: the training records (each once), batches ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (the data term of the
            training objective).
        params: names of the parameters to assess, or ``predicate(name, param)``; default
            every trainable parameter.
        estimation: ``"exact"`` sandwich, ``"diagonal"``, or ``"auto"``.
        hessian: diagonal mode's Hessian (``"exact"``, ``"ggn"``, ``"hutchinson"``, ``"auto"``).
        weight_decay: L2 coefficient of the training objective ``mean loss + wd/2 |theta|^2``.
        num_records: records ``z`` over which the leakage is averaged.
        method: ``"auto"``, ``"mc"``, ``"clt"`` or ``"exact1d"`` (see ``functional.leakage``).
        batch_fn: ``batch -> (inputs, targets)`` for other batch layouts.
        val_dataloader, metrics, output_transform: utility of each quantized copy
            (``evaluate_utility``); the mean loss is always reported.
        uncertainty_draws: parametric-bootstrap draws for the (p10, p90) interval (0: none).
        strict: raise on a failing scheme; otherwise record the error in the report.
        chunk_size: weights per chunk of the cell computations (memory bound).

    Returns:
        :class:`~mis_lightning.report.Report`.
    """
    if isinstance(schemes, (str, QuantizationScheme)):
        schemes = [schemes]
    scheme_objs = _resolve_schemes(schemes)
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif callable(params):
        names = [n for n, p in named.items() if params(n, p)]
    else:
        names = list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise KeyError(f"params not in the model: {unknown}; the model has {list(named)}")
    if not names:
        raise ValueError("no parameter selected for assessment")
    _check_model_finite(model, names)
    gen = torch.Generator().manual_seed(seed)
    est = estimate(
        model, train_dataloader, loss_fn, param_names=names, mode=estimation, hessian=hessian,  # type: ignore[arg-type]
        weight_decay=weight_decay, num_records=num_records, batch_fn=batch_fn, generator=gen,
        progress=(lambda k: progress("estimation", k)) if progress else None,
    )
    return score(
        est, model, scheme_objs, method=method, uncertainty_draws=uncertainty_draws,
        num_samples=num_samples, seed=seed, strict=strict, chunk_size=chunk_size,
        val_dataloader=val_dataloader, loss_fn=loss_fn, metrics=metrics,
        output_transform=output_transform, batch_fn=batch_fn,
    )


def _resolve_schemes(schemes: Sequence[SchemeSpec]) -> list[QuantizationScheme]:
    out = [get_scheme(s) for s in schemes]
    seen: set[str] = set()
    for s in out:
        if s.name in seen:
            raise ValueError(f"scheme {s.name!r} is listed twice")
        seen.add(s.name)
    return out


def score(
    est: Estimate,
    model: nn.Module,
    schemes: Sequence[SchemeSpec],
    *,
    method: str = "auto",
    uncertainty_draws: int = 16,
    num_samples: int = 4096,
    seed: int = 0,
    strict: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    val_dataloader: Iterable | None = None,
    loss_fn: LossFn | None = None,
    metrics: Mapping[str, Any] | None = None,
    output_transform: OutputTransform | None = None,
    batch_fn: BatchFn | None = None,
) -> Report:
    """Score each scheme from an estimate (see :func:`assess` for the arguments)."""
    if method not in ("auto", "mc", "clt", "exact1d"):
        raise ValueError(f"method must be 'auto', 'mc', 'clt' or 'exact1d', got {method!r}")
    scheme_objs = _resolve_schemes(list(schemes))
    n = est.n
    if n < 2:
        raise ValueError(f"n (number of training records) must be >= 2, got {n}")
    for k in est.names:
        check_finite(f"sigma of {k!r}", est.sigma[k])
    base_s2 = _layer_sums(est, {k: None for k in est.names}, chunk_size)
    R = est.num_records
    base_total = sum(base_s2.values(), F.CltSums.zeros(R))
    base_leak = base_total.leakage(n)
    baseline = float(base_leak.mean())
    estimation_info = {"mode": est.mode, "hessian": est.hessian, "num_records": R}
    diagnostics = dict(est.diagnostics)
    if est.mahalanobis is not None:
        corr = F.saturate(F.cells.SQRT_2_OVER_PI * est.mahalanobis / (2 * math.sqrt(n)))
        diagnostics["baseline_leakage_correlated"] = float(corr.mean())
    report = Report(
        n=n, d=est.d, estimation=estimation_info, diagnostics=diagnostics, schemes={},
        baseline_leakage=baseline, baseline_mis=1.0 - baseline,
    )
    for i, scheme in enumerate(scheme_objs):
        gen = torch.Generator().manual_seed(seed + 1000 * (i + 1))
        try:
            res = _score_scheme(est, model, scheme, method, uncertainty_draws, num_samples, gen,
                                chunk_size, base_s2)
        except Exception as exc:  # noqa: BLE001 - reported per scheme, re-raised if strict
            if strict:
                raise
            log.warning("scheme %s failed: %s", scheme.name, exc)
            res = SchemeResult(
                name=scheme.name, leakage=math.nan, mis=math.nan, baseline_leakage=baseline,
                d_eff=math.nan, d=est.d, sparsity=math.nan, frozen_fraction=math.nan,
                bits_per_weight=math.nan, method="-", error=f"{type(exc).__name__}: {exc}",
                description=scheme.describe(),
            )
            report.schemes[scheme.name] = res
            continue
        result, qmodel = res
        if val_dataloader is not None and loss_fn is not None:
            result.utility = evaluate_utility(qmodel, val_dataloader, loss_fn, metrics,
                                              batch_fn=batch_fn, output_transform=output_transform)
        del qmodel
        report.schemes[scheme.name] = result
        d_eff_over_n = result.d_eff / n
        if d_eff_over_n > 0.1:
            report.warnings.append(
                f"{scheme.name}: d_eff / n = {d_eff_over_n:.3g} is not small; the asymptotic "
                "regime needs d_eff << n, treat the figure as indicative"
            )
    if diagnostics.get("not_at_minimum"):
        report.warnings.append(
            f"the model is not at a minimum of the training loss (gradient norm ratio "
            f"{diagnostics['gradient_norm_ratio']:.3g}): the M-estimator analysis may not apply"
        )
    if diagnostics.get("negative_curvature"):
        report.warnings.append("the Hessian has negative curvature; damping was applied")
    return report


def _layer_sums(est: Estimate, kappas: dict[str, tuple[Tensor, Tensor] | None], chunk: int) -> dict[str, F.CltSums]:
    """Per-parameter Gaussian-form sums; ``None`` means unquantized (kappa = 1, m4 = 3)."""
    out = {}
    for r0, r1, wd in est.iter_w(list(kappas)):
        for name, w in wd.items():
            if name not in out:
                out[name] = F.CltSums.zeros(est.num_records)
            km = kappas[name]
            k = torch.ones(w.shape[1], dtype=torch.float64) if km is None else km[0]
            m4 = torch.full_like(k, 3.0) if km is None else km[1]
            part = F.clt_sums(w, k, m4)
            out[name].s2[r0:r1] += part.s2
            out[name].s4[r0:r1] += part.s4
    return out


def _grid_moments(grid: ParamGrid, theta: Tensor, sigma: Tensor, chunk: int, use_codes: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``kappa, m4, lam`` of a whole parameter, computed chunk by chunk (float64 ``[numel]``)."""
    numel = theta.numel()
    kappa = torch.empty(numel, dtype=torch.float64)
    m4 = torch.empty_like(kappa)
    lam = torch.empty_like(kappa)
    for a in range(0, numel, chunk):
        b = min(a + chunk, numel)
        mm = grid.moments(theta[a:b], sigma[a:b], a, b, use_codes=use_codes)
        kappa[a:b], m4[a:b], lam[a:b] = mm.kappa, mm.m4, mm.lam
    return kappa, m4, lam


def _score_scheme(est: Estimate, model: nn.Module, scheme: QuantizationScheme, method: str,
                  uncertainty_draws: int, num_samples: int, gen: torch.Generator, chunk: int,
                  base_s2: dict[str, F.CltSums]) -> tuple[SchemeResult, nn.Module]:
    qres = scheme.apply(model)
    grids = {k: g for k, g in qres.grids.items() if k in est.theta}
    if not grids and not isinstance(scheme, NoQuantization):
        raise SchemeError(
            f"scheme {scheme.name!r} applies to no assessed parameter of this model "
            f"(assessed: {est.names}); it would be scored as no protection at all"
        )
    params = dict(model.named_parameters())
    kappas: dict[str, tuple[Tensor, Tensor] | None] = {}
    lams: dict[str, Tensor] = {}
    layers: dict[str, LayerResult] = {}
    tot_bits = tot_zero = tot_quant = 0.0
    d_eff = frozen = 0.0
    for name in est.names:
        th, sg = est.theta[name], est.sigma[name]
        numel = th.numel()
        g = grids.get(name)
        if g is None:
            kappas[name] = None
            bits = _dtype_bits(params[name])
            layer_kappa_sum, layer_frozen, zero = float(numel), int((sg <= 0).sum()), 0.0
        else:
            k, m4, lam = _grid_moments(g, th, sg, chunk)
            kappas[name] = (k, m4)
            lams[name] = lam
            bits = g.bits_per_weight
            layer_kappa_sum, layer_frozen = float(k.sum()), int((k < FROZEN_KAPPA).sum())
            zero = float((g.dequantized.reshape(-1) == 0).sum())
            tot_zero += zero
            tot_quant += numel
        tot_bits += bits * numel
        d_eff += layer_kappa_sum
        frozen += layer_frozen
        layers[name] = LayerResult(
            name=name, d=numel, quantized=g is not None, leakage=math.nan, mis=math.nan,
            baseline_leakage=float(base_s2[name].leakage(est.n).mean()), d_eff=layer_kappa_sum,
            frozen_fraction=layer_frozen / max(numel, 1), sparsity=zero / numel if g is not None else 0.0,
            bits_per_weight=bits,
        )
    sums = _layer_sums(est, kappas, chunk)
    total = sum(sums.values(), F.CltSums.zeros(est.num_records))
    clt_err = float(total.excess_kurtosis().abs().max()) / 24.0 if est.num_records else 0.0
    for name, s in sums.items():
        lk = float(s.leakage(est.n).mean())
        layers[name].leakage, layers[name].mis = lk, 1.0 - lk

    chosen = method
    d = est.d
    if method == "auto":
        if d == 1 and grids:
            chosen = "exact1d"
        elif clt_err <= F.CLT_TOLERANCE:
            chosen = "clt"
        elif est.w is not None and _coarse_count(kappas) <= MC_MAX_COORDS:
            chosen = "mc"
        else:
            chosen = "clt"
    notes = list(qres.notes)
    if chosen == "clt" and clt_err > F.CLT_TOLERANCE:
        notes.append(f"Gaussian form used beyond its tolerance (Edgeworth error estimate {clt_err:.3g})")
    if chosen == "exact1d":
        if d != 1:
            raise ValueError(f"method='exact1d' needs d = 1 assessed weight, got d = {d}")
        leak = _exact1d(est, lams)
    elif chosen == "mc":
        if est.w is None:
            raise ValueError("method='mc' needs the stored influences (a model small enough to keep w)")
        leak = _mc_leakage(est, grids, kappas, num_samples, gen, chunk, names=est.names)
        for name in est.names:
            if grids.get(name) is not None:
                lk = float(_mc_leakage(est, grids, kappas, num_samples, gen, chunk, names=[name]).mean())
                layers[name].leakage, layers[name].mis = lk, 1.0 - lk
    else:
        leak = total.leakage(est.n)
    leakage = float(leak.mean())
    interval = None
    if uncertainty_draws > 0 and grids:
        interval = _bootstrap_interval(est, grids, kappas, uncertainty_draws, gen, chunk,
                                       leakage, float(total.leakage(est.n).mean()), chosen, lams)
    result = SchemeResult(
        name=scheme.name, leakage=leakage, mis=1.0 - leakage,
        baseline_leakage=float(sum(base_s2.values(), F.CltSums.zeros(est.num_records)).leakage(est.n).mean()),
        d_eff=d_eff, d=d, sparsity=tot_zero / tot_quant if tot_quant else 0.0,
        frozen_fraction=frozen / max(d, 1), bits_per_weight=tot_bits / max(d, 1), method=chosen,
        interval=interval, quantized_fraction=tot_quant / max(d, 1), clt_error_estimate=clt_err,
        layers=layers, description=scheme.describe(), notes=notes,
    )
    return result, qres.model


def _coarse_count(kappas: dict[str, tuple[Tensor, Tensor] | None]) -> int:
    return sum(int(((km[0] > 1e-12) & (km[0] < _FINE_KAPPA)).sum()) for km in kappas.values() if km is not None)


def _exact1d(est: Estimate, lams: dict[str, Tensor]) -> Tensor:
    """One coordinate: ``G(|w| lam / (2 sqrt n))`` (method.md section 3, form 1)."""
    assert est.w is not None
    name = est.names[0]
    lam = lams[name] if name in lams else torch.tensor([F.cells.SQRT_2_OVER_PI], dtype=torch.float64)
    return F.saturate(est.w[:, 0].abs() * lam[0] / (2 * math.sqrt(est.n)))


def _mc_leakage(est: Estimate, grids: dict[str, ParamGrid], kappas: dict, num_samples: int,
                gen: torch.Generator, chunk: int, names: list[str]) -> Tensor:
    """Hybrid Monte Carlo: sampled cells for coarse coordinates, Gaussian for fine/unquantized."""
    assert est.w is not None
    R = est.num_records
    gauss = torch.zeros(R, dtype=torch.float64)
    w_parts, b_parts, th_parts, sg_parts = [], [], [], []
    for name in names:
        s, e = est.offsets[name]
        w = est.w[:, s:e]
        km = kappas[name]
        if km is None:
            gauss += w.square().sum(-1)
            continue
        k = km[0]
        coarse = (k > 1e-12) & (k < _FINE_KAPPA)
        fine = k >= _FINE_KAPPA
        gauss += w[:, fine].square() @ k[fine]
        idx = torch.nonzero(coarse).squeeze(-1)
        if idx.numel() == 0:
            continue
        g = grids[name]
        th, sg = est.theta[name], est.sigma[name]
        for a in range(0, idx.numel(), chunk):
            ii = idx[a : a + chunk]
            lo, hi = int(ii.min()), int(ii.max()) + 1
            edges = g.boundaries(th[lo:hi], lo, hi, 18)[ii - lo]
            b_parts.append(edges)
            th_parts.append(th[ii])
            sg_parts.append(sg[ii])
            w_parts.append(w[:, ii])
    if not w_parts:
        mean_abs = F.cells.SQRT_2_OVER_PI * gauss.sqrt()
        return F.saturate(mean_abs / (2 * math.sqrt(est.n)))
    stats = F.cell_statistics(torch.cat(th_parts), torch.cat(sg_parts), torch.cat(b_parts), validate=False)
    wc = torch.cat(w_parts, dim=1)
    mean_abs, _ = F.mc_first_order(wc, stats, num_samples, gen, gaussian_s2=gauss)
    cap = F.cells.SQRT_2_OVER_PI * (wc.square().sum(-1) + gauss).sqrt()
    return F.saturate(torch.minimum(mean_abs, cap) / (2 * math.sqrt(est.n)))


def _bootstrap_interval(est: Estimate, grids: dict[str, ParamGrid], kappas: dict, draws: int,
                        gen: torch.Generator, chunk: int, leakage: float, clt_value: float,
                        chosen: str, lams: dict[str, Tensor]) -> tuple[float, float]:
    """(p10, p90) of the leakage with the cell statistics re-evaluated around
    ``theta_hat + sigma * xi`` (method.md section 7: the plug-in's spread over where the
    trained weights fall in their cells). The Gaussian form is re-evaluated per draw and
    rescaled by the ratio of the chosen method's value to the Gaussian form at ``theta_hat``."""
    vals = []
    for _ in range(draws):
        kd: dict[str, tuple[Tensor, Tensor] | None] = {}
        lam1 = None
        for name in est.names:
            g = grids.get(name)
            if g is None:
                kd[name] = None
                continue
            th = est.theta[name] + est.sigma[name] * torch.randn(est.theta[name].shape, dtype=torch.float64, generator=gen)
            k, m4, lam = _grid_moments(g, th, est.sigma[name], chunk, use_codes=False)
            kd[name] = (k, m4)
            lam1 = lam
        if chosen == "exact1d" and est.w is not None and lam1 is not None:
            v = float(F.saturate(est.w[:, 0].abs() * lam1[0] / (2 * math.sqrt(est.n))).mean())
        else:
            sums = _layer_sums(est, kd, chunk)
            total = sum(sums.values(), F.CltSums.zeros(est.num_records))
            v = float(total.leakage(est.n).mean())
            if chosen == "mc" and clt_value > 0:
                v *= leakage / clt_value
        vals.append(v)
    t = torch.tensor(vals, dtype=torch.float64)
    return float(torch.quantile(t, 0.1)), float(torch.quantile(t, 0.9))
