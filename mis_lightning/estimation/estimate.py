"""Estimate ``sigma_j`` and the standardised influences ``w(z)`` from a trained model.

method.md section 4. Two modes:

* ``"exact"`` sandwich (up to a few thousand parameters): ``H`` = autograd Hessian of the
  mean training loss (plus ``weight_decay * I``), per-sample gradients ``g_i``,
  ``psi_i = -H^{-1}(g_i - g_bar)``, ``Sigma = H^{-1} V H^{-1}`` with ``V`` the covariance of
  the per-sample gradients; ``sigma_j = sqrt(Sigma_jj / n)``, ``w_j = psi_j / sqrt(Sigma_jj)``.
* ``"diagonal"`` (any size): ``V_jj`` from per-sample gradients, ``H_jj`` exact (small
  models), Gauss-Newton (exact GGN diagonal from per-sample output Jacobians, for models
  with few outputs) or Hutchinson (Hessian-vector products, with its standard error
  reported); ``sigma_j^2 = V_jj / (n H_jj^2)`` and ``w_j = (g_j - g_bar_j) / sqrt(V_jj)``.

Gradients are centred by their mean: at a penalised optimum the mean data gradient is
``-weight_decay * theta``, not 0, and the centred covariance is what the sandwich needs.
Every accumulator is a sum over records, so the pass streams over batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import Tensor, nn

from .per_sample import BatchFn, LossFn, LossProgram, default_batch_fn

Mode = Literal["auto", "exact", "diagonal"]
HessianMode = Literal["auto", "exact", "ggn", "hutchinson"]

EXACT_MAX_PARAMS = 2000  # "auto" uses the exact sandwich up to this many parameters
GGN_MAX_OUTPUTS = 16  # "auto" uses the Gauss-Newton diagonal up to this many outputs per record
DEFAULT_BUDGET = 1 << 25  # floats held at once by per-sample buffers (~128 MiB in float32)


@dataclass
class Estimate:
    """What the estimation pass returns.

    Attributes:
        n: number of training records seen.
        mode: ``"exact"`` or ``"diagonal"``; ``hessian``: how ``H`` (or its diagonal) was had.
        names: assessed parameter names; ``shapes``: their shapes; ``offsets``: flat ranges.
        theta: ``{name: [numel]}`` float64 trained weights.
        sigma: ``{name: [numel]}`` float64 std of each trained weight (parameter units).
        w: ``[R, d]`` standardised influences of the R stored records (dimensionless), or
            ``None`` when they are recomputed per parameter (large models).
        mahalanobis: ``[R]`` ``|Sigma^{-1/2} psi|`` per record (exact mode only).
        diagnostics: method.md section 6 diagnostics.
    """

    n: int
    mode: str
    hessian: str
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    offsets: dict[str, tuple[int, int]]
    theta: dict[str, Tensor]
    sigma: dict[str, Tensor]
    w: Tensor | None
    num_records: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    mahalanobis: Tensor | None = None
    _program: LossProgram | None = None
    _records: list[tuple[Any, Any]] | None = None
    _g_mean: dict[str, Tensor] | None = None
    _v_diag: dict[str, Tensor] | None = None
    budget: int = DEFAULT_BUDGET

    @property
    def d(self) -> int:
        return sum(e - s for s, e in self.offsets.values())

    def iter_w(self, names: Iterable[str] | None = None) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
        """Yield ``(r0, r1, {name: w [r1 - r0, numel]})`` over record blocks.

        Stored influences are sliced; otherwise each parameter's per-sample gradients are
        recomputed for a block of records at a time, so the buffer stays below ``budget``.
        """
        names = list(self.names if names is None else names)
        if self.w is not None:
            yield 0, self.w.shape[0], {n: self.w[:, slice(*self.offsets[n])] for n in names}
            return
        assert self._program is not None and self._records is not None
        for name in names:
            numel = self.offsets[name][1] - self.offsets[name][0]
            r0 = 0
            for inputs, targets in self._records:
                b = int(targets.shape[0]) if isinstance(targets, Tensor) else len(targets)
                step = max(1, self.budget // max(numel, 1))
                for a in range(0, b, step):
                    x = torch.utils._pytree.tree_map(lambda t: t[a : a + step], inputs)
                    y = torch.utils._pytree.tree_map(lambda t: t[a : a + step], targets)
                    g = self._program.per_sample_grads(x, y, [name])[name].reshape(-1, numel).to(torch.float64)
                    assert self._g_mean is not None and self._v_diag is not None
                    # psi_j / sqrt(Sigma_jj) = -(g_j - g_bar_j) / sqrt(V_jj) when H_jj > 0.
                    w = -(g - self._g_mean[name]) / self._v_diag[name].clamp_min(1e-300).sqrt()
                    yield r0 + a, r0 + a + g.shape[0], {name: w}
                r0 += b


def _flat_names(program: LossProgram) -> tuple[dict[str, tuple[int, int]], int]:
    offsets, start = {}, 0
    for n in program.param_names:
        k = program.params[n].numel()
        offsets[n] = (start, start + k)
        start += k
    return offsets, start


def _split_batch(inputs: Any, targets: Any, b: int, step: int) -> Iterator[tuple[Any, Any]]:
    for a in range(0, b, step):
        yield (
            torch.utils._pytree.tree_map(lambda t: t[a : a + step], inputs),
            torch.utils._pytree.tree_map(lambda t: t[a : a + step], targets),
        )


def _flatten(d: dict[str, Tensor], names: list[str], lead: int) -> Tensor:
    return torch.cat([d[n].reshape(lead, -1) for n in names], dim=1)


def estimate(
    model: nn.Module,
    train_dataloader: Iterable,
    loss_fn: LossFn,
    *,
    param_names: list[str] | None = None,
    mode: Mode = "auto",
    hessian: HessianMode = "auto",
    weight_decay: float = 0.0,
    num_records: int = 512,
    batch_fn: BatchFn | None = None,
    hutchinson_probes: int = 8,
    damping: float = 1e-8,
    budget: int = DEFAULT_BUDGET,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> Estimate:
    """Stream the training records once and estimate ``sigma`` and ``w`` (method.md section 4).

    Args:
        model: the trained model (never modified).
        train_dataloader: iterable of training batches (every record once).
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample data losses.
        param_names: parameters to assess (default: every parameter with ``requires_grad``).
        mode: ``"exact"``, ``"diagonal"`` or ``"auto"`` (exact up to 2,000 parameters).
        hessian: diagonal mode's Hessian: ``"exact"``, ``"ggn"``, ``"hutchinson"``, ``"auto"``.
        weight_decay: L2 penalty coefficient of the training objective
            ``mean(loss) + weight_decay / 2 * |theta|^2`` (added to ``H``).
        num_records: records whose influences are kept (the first ones seen).
        batch_fn: ``batch -> (inputs, targets)``.
        hutchinson_probes: Rademacher probes per batch for ``hessian="hutchinson"``.
        damping: relative damping added to ``H`` when it is not positive definite.
        budget: floats held at once in per-sample buffers (memory bound).
        dtype: compute dtype (default float64 up to 10^5 parameters, float32 above).
        progress: called with the number of records processed after each batch.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if num_records < 1:
        raise ValueError(f"num_records must be >= 1, got {num_records}")
    named = dict(model.named_parameters())
    if param_names is None:
        param_names = [n for n, p in named.items() if p.requires_grad]
    if not param_names:
        raise ValueError("the model has no trainable parameter to assess")
    d = sum(named[n].numel() for n in param_names)
    if dtype is None:
        dtype = torch.float64 if d <= 100_000 else torch.float32
    program = LossProgram(model, loss_fn, list(param_names), batch_fn or default_batch_fn, dtype)
    offsets, d = _flat_names(program)
    if mode == "auto":
        mode = "exact" if d <= EXACT_MAX_PARAMS else "diagonal"
    if mode not in ("exact", "diagonal"):
        raise ValueError(f"mode must be 'auto', 'exact' or 'diagonal', got {mode!r}")
    if mode == "exact" and d > 20 * EXACT_MAX_PARAMS:
        raise ValueError(f"mode='exact' builds a d x d Hessian; d = {d} is too large, use mode='diagonal'")
    acc_dtype = torch.float64 if d <= 10_000_000 else torch.float32
    names = program.param_names

    if mode == "exact":
        hessian = "exact"
    elif hessian == "auto":
        hessian = "exact" if d <= EXACT_MAX_PARAMS else "ggn"
    if hessian not in ("exact", "ggn", "hutchinson"):
        raise ValueError(f"hessian must be 'auto', 'exact', 'ggn' or 'hutchinson', got {hessian!r}")

    n = 0
    g_sum = {k: torch.zeros(program.params[k].numel(), dtype=acc_dtype) for k in names}
    g2_sum = {k: torch.zeros_like(v) for k, v in g_sum.items()}
    h_sum = {k: torch.zeros_like(v) for k, v in g_sum.items()}
    h2_sum = {k: torch.zeros_like(v) for k, v in g_sum.items()}  # Hutchinson: sum of squares
    gg_sum = torch.zeros(d, d, dtype=torch.float64) if mode == "exact" else None
    H_full = torch.zeros(d, d, dtype=torch.float64) if mode == "exact" else None
    probes_used = 0
    keep_w = num_records * d <= budget
    stored_g: list[Tensor] = []
    records: list[tuple[Any, Any]] = []
    kept = 0
    grad_norm_sq_sum = 0.0
    out_shape: tuple[int, ...] | None = None

    for batch in train_dataloader:
        inputs, targets, b = program.prepare(batch)
        if hessian == "ggn" and out_shape is None:
            out_shape = program.output_shape(inputs)
            c = int(math.prod(out_shape)) if out_shape else 1
            if c > GGN_MAX_OUTPUTS * 64:
                raise ValueError(f"hessian='ggn' needs few outputs per record; this model has {c}")
        c_out = int(math.prod(out_shape)) if out_shape else 1
        step = max(1, budget // max(d * (c_out if hessian == "ggn" else 1), 1))
        for x, y in _split_batch(inputs, targets, b, step):
            bb = _batch_size_of(y)
            if hessian == "ggn":
                out, jac = program.output_jacobians(x)  # out [b, C], jac {n: [b, C, *shape]}
                e, L = program.loss_output_derivatives(out, y, out_shape or ())
                grads = {}
                for k in names:
                    J = jac[k].reshape(bb, c_out, -1)
                    grads[k] = torch.einsum("bc,bcj->bj", e, J)
                    LJ = torch.einsum("bce,bej->bcj", L, J)
                    h_sum[k] += (J * LJ).sum(dim=(0, 1)).to(acc_dtype)
            else:
                grads = {k: v.reshape(bb, -1) for k, v in program.per_sample_grads(x, y).items()}
            for k in names:
                gk = grads[k].to(acc_dtype)
                g_sum[k] += gk.sum(0)
                g2_sum[k] += gk.square().sum(0)
            flat = _flatten(grads, names, bb).to(torch.float64)
            grad_norm_sq_sum += float(flat.square().sum())
            if gg_sum is not None:
                gg_sum += flat.T @ flat
            if kept < num_records:
                take = min(num_records - kept, bb)
                if keep_w:
                    stored_g.append(flat[:take].clone())
                else:
                    records.append(
                        (
                            torch.utils._pytree.tree_map(lambda t: t[:take].clone(), x),
                            torch.utils._pytree.tree_map(lambda t: t[:take].clone(), y),
                        )
                    )
                kept += take
        if hessian == "exact":
            H_b = _batch_hessian(program, inputs, targets, names, offsets, d)
            if H_full is not None:
                H_full += H_b
            else:
                diag = torch.diagonal(H_b)
                for k in names:
                    h_sum[k] += diag[slice(*offsets[k])].to(acc_dtype)
        elif hessian == "hutchinson":
            for _ in range(hutchinson_probes):
                est = _hutchinson_probe(program, inputs, targets, generator)
                for k in names:
                    h_sum[k] += est[k].reshape(-1).to(acc_dtype)
                    h2_sum[k] += est[k].reshape(-1).to(acc_dtype).square()
            probes_used += hutchinson_probes
        n += b
        if progress is not None:
            progress(n)

    if n < 2:
        raise ValueError(f"n (number of training records) must be >= 2, got {n}: is the dataloader empty?")

    g_mean = {k: (g_sum[k] / n).to(torch.float64) for k in names}
    v_diag = {k: (g2_sum[k] / n).to(torch.float64) - g_mean[k].square() for k in names}
    theta = {k: program.params[k].reshape(-1).to(torch.float64) for k in names}
    diagnostics: dict[str, Any] = {}
    # Stationarity: the penalised mean gradient relative to the size of a per-sample gradient.
    total_grad = torch.cat([g_mean[k] + weight_decay * theta[k] for k in names])
    rms_g = math.sqrt(grad_norm_sq_sum / n)
    diagnostics["gradient_norm"] = float(total_grad.norm())
    diagnostics["gradient_norm_ratio"] = float(total_grad.norm()) / max(rms_g, 1e-300)
    diagnostics["not_at_minimum"] = diagnostics["gradient_norm_ratio"] > 0.1
    zero_var = sum(int((v <= 0).sum()) for v in v_diag.values())
    diagnostics["zero_gradient_variance"] = zero_var

    mahal = None
    if mode == "exact":
        assert gg_sum is not None and H_full is not None
        gbar = torch.cat([g_mean[k] for k in names])
        V = gg_sum / n - torch.outer(gbar, gbar)
        H = H_full / n + weight_decay * torch.eye(d, dtype=torch.float64)
        H = 0.5 * (H + H.T)
        evals = torch.linalg.eigvalsh(H)
        lo, hi = float(evals[0]), float(evals[-1])
        added = 0.0
        if lo <= damping * max(abs(hi), 1e-300):
            added = damping * max(abs(hi), 1e-300) - lo
            H = H + added * torch.eye(d, dtype=torch.float64)
        diagnostics.update(
            hessian_min_eigenvalue=lo, hessian_max_eigenvalue=hi,
            hessian_condition=(hi / lo) if lo > 0 else math.inf,
            negative_curvature=lo < 0, damping_added=added,
        )
        Hinv = torch.linalg.inv(H)
        Sigma = Hinv @ V @ Hinv
        Sigma = 0.5 * (Sigma + Sigma.T)
        sdiag = torch.diagonal(Sigma).clamp_min(0.0)
        sigma_flat = (sdiag / n).sqrt()
        sigma = {k: sigma_flat[slice(*offsets[k])] for k in names}
        G = torch.cat(stored_g)[:num_records]
        psi = -(G - gbar) @ Hinv.T
        w = psi / sdiag.clamp_min(1e-300).sqrt()
        # |Sigma^{-1/2} psi| for the exact (correlated) unquantized baseline.
        sol = torch.linalg.lstsq(Sigma, psi.T).solution
        mahal = (psi * sol.T).sum(-1).clamp_min(0.0).sqrt()
        return Estimate(
            n=n, mode="exact", hessian="exact", names=names, shapes={k: tuple(program.params[k].shape) for k in names},
            offsets=offsets, theta=theta, sigma=sigma, w=w, num_records=w.shape[0],
            diagnostics=diagnostics, mahalanobis=mahal, budget=budget,
        )

    # Diagonal mode.
    h_diag = {k: (h_sum[k] / (n if hessian != "hutchinson" else max(probes_used, 1))).to(torch.float64) for k in names}
    if hessian == "hutchinson":
        # Each probe's v*Hv summed the batch Hessians; divide by n to get the mean-loss Hessian.
        nb = max(probes_used // max(hutchinson_probes, 1), 1)
        for k in names:
            h_diag[k] = h_sum[k].to(torch.float64) / hutchinson_probes / n
        # Standard error of the diagonal estimate from the spread over (batch, probe) pairs.
        rel = []
        for k in names:
            m2 = h2_sum[k].to(torch.float64) / max(probes_used, 1)
            m1 = h_sum[k].to(torch.float64) / max(probes_used, 1)
            var = (m2 - m1.square()).clamp_min(0.0) / max(probes_used, 1)
            # in units of the batch-sum Hessian: scale the mean the same way
            rel.append(var.sqrt() * nb / (m1.abs() * nb).clamp_min(1e-300))
        relcat = torch.cat(rel)
        diagnostics["hutchinson_probes"] = probes_used
        diagnostics["hutchinson_median_relative_error"] = float(relcat.median())
    H_diag = {k: h_diag[k] + weight_decay for k in names}
    allh = torch.cat(list(H_diag.values()))
    neg = int((allh <= 0).sum())
    floor = damping * float(allh.abs().max()) if allh.numel() else 0.0
    diagnostics.update(
        hessian_min_diagonal=float(allh.min()), hessian_max_diagonal=float(allh.max()),
        negative_curvature=neg > 0, nonpositive_hessian_diagonal=neg,
    )
    sigma = {}
    for k in names:
        hk = H_diag[k].clamp_min(max(floor, 1e-300))
        sigma[k] = (v_diag[k].clamp_min(0.0) / (n * hk.square())).sqrt()
    w = None
    if keep_w:
        G = torch.cat(stored_g)[:num_records]
        gbar = torch.cat([g_mean[k] for k in names])
        vd = torch.cat([v_diag[k] for k in names])
        w = -(G - gbar) / vd.clamp_min(1e-300).sqrt()  # the sign of psi = -H^{-1} g
    return Estimate(
        n=n, mode="diagonal", hessian=hessian, names=names,
        shapes={k: tuple(program.params[k].shape) for k in names}, offsets=offsets,
        theta=theta, sigma=sigma, w=w, num_records=min(kept, num_records), diagnostics=diagnostics,
        _program=program, _records=records if not keep_w else None,
        _g_mean=g_mean, _v_diag=v_diag, budget=budget,
    )


def _batch_size_of(y: Any) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(y) if isinstance(t, Tensor)]
    return int(leaves[0].shape[0])


def _batch_hessian(program: LossProgram, inputs: Any, targets: Any, names: list[str],
                   offsets: dict[str, tuple[int, int]], d: int) -> Tensor:
    """Hessian ``[d, d]`` of the batch's summed loss in the flattened parameters."""
    shapes = {k: program.params[k].shape for k in names}
    flat0 = torch.cat([program.params[k].reshape(-1) for k in names])

    def f(flat: Tensor) -> Tensor:
        params = {k: flat[slice(*offsets[k])].reshape(shapes[k]) for k in names}
        return program.loss_fn(program.outputs(params, inputs), targets).sum()

    return torch.func.hessian(f)(flat0).to(torch.float64).reshape(d, d)


def _hutchinson_probe(program: LossProgram, inputs: Any, targets: Any,
                      generator: torch.Generator | None) -> dict[str, Tensor]:
    """One Rademacher probe ``v * (H v)`` of the batch's summed loss, per parameter."""
    params = program.params
    v = {
        k: (torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64).to(p.dtype) * 2 - 1)
        for k, p in params.items()
    }

    def total(p: dict[str, Tensor]) -> Tensor:
        return program.loss_fn(program.outputs(p, inputs), targets).sum()

    _, hv = torch.func.jvp(torch.func.grad(total), (params,), (v,))
    return {k: v[k] * hv[k] for k in params}
