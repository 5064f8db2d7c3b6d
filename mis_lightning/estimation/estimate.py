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

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .linear_factors import FactoredProgram, LinearFactors, iterate_factor_blocks
from .per_sample import BatchFn, LossFn, LossProgram, default_batch_fn

Mode = Literal["auto", "exact", "diagonal"]
HessianMode = Literal["auto", "exact", "ggn", "hutchinson"]

EXACT_MAX_PARAMS = 2000  # "auto" uses the exact sandwich up to this many parameters
# "auto" also skips the exact sandwich above this many records x d^2 (its Hessian and d x d
# sums cost ~n d^2 multiply-adds for a dense model; 1e11 is about a minute on one core).
EXACT_MAX_COST = 1e11
# Layers that reuse their weights over positions (convolutions, recurrences, attention): one
# forward pass costs far more than d multiply-adds per record, and the exact Hessian needs d
# forward-over-reverse passes of it (a 1,466-weight CNN: minutes and ~12 GB against ~1 s for
# the Gauss-Newton diagonal). "auto" does not pick an exact Hessian for models holding them.
WEIGHT_REUSE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention,
)
GGN_MAX_OUTPUTS = 16  # "auto" uses the Gauss-Newton diagonal up to this many outputs per record
log = logging.getLogger(__name__)

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
        factors: per-record factors of Linear layers (the factored diagonal path, see
            ``linear_factors``): ``w`` of those records is a product of small matrices and is
            never materialised for the whole model.
        estimator: which estimator ran (:func:`describe_estimator`); ``reason``: why
            (``"requested"`` or the ``"auto"`` rule that chose it, see :func:`choose_estimator`).
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
    factors: list[LinearFactors] | None = None
    estimator: str = ""
    reason: str = ""

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
        if self.factors is not None:
            assert self._g_mean is not None and self._v_diag is not None
            yield from iterate_factor_blocks(self.factors, self._g_mean, self._v_diag, names, self.budget)
            return
        assert self._program is not None and self._records is not None
        for name in names:
            numel = self.offsets[name][1] - self.offsets[name][0]
            r0 = 0
            for inputs, targets in self._records:
                b = int(targets.shape[0]) if isinstance(targets, Tensor) else len(targets)
                step = max(1, self.budget // max(numel, 1))
                for a, (x, y) in zip(range(0, b, step), _split_batch(inputs, targets, b, step)):
                    g = self._program.per_sample_grads(x, y, [name])[name].reshape(-1, numel).to(torch.float64)
                    assert self._g_mean is not None and self._v_diag is not None
                    # psi_j / sqrt(Sigma_jj) = -(g_j - g_bar_j) / sqrt(V_jj) when H_jj > 0.
                    w = -(g - self._g_mean[name]) / self._v_diag[name].clamp_min(1e-300).sqrt()
                    yield r0 + a, r0 + a + g.shape[0], {name: w}
                r0 += b


def choose_estimator(
    model: nn.Module, d: int, mode: str = "auto", hessian: str = "auto", *,
    n: int | None = None, ggn: bool = True,
) -> tuple[str, str, str]:
    """Resolve ``"auto"`` for ``mode`` and ``hessian`` by estimated cost.

    Args:
        model: the model (its layer types set the cost of a forward pass).
        d: number of assessed weights.
        mode, hessian: the requested ``mode`` and ``hessian`` (``"auto"`` or a fixed choice).
        n: number of training records when known (``len(dataset)``), else ``None``.
        ggn: whether the Gauss-Newton diagonal is available (not with a loss hook, whose
            "outputs" are the losses themselves).

    Returns:
        ``(mode, hessian, reason)``: the resolved choice and a sentence saying why.

    The exact sandwich costs about ``n d^2`` for a dense model, and ``n d F`` where a forward
    pass costs ``F >> d`` (layers in :data:`WEIGHT_REUSE_LAYERS`); it is chosen only for
    dense models with ``d <= EXACT_MAX_PARAMS`` and ``n d^2 <= EXACT_MAX_COST``. The diagonal
    mode's Hessian is then exact for the same small dense models, else Gauss-Newton (or
    Hutchinson without model outputs).
    """
    reuse = sorted({type(m).__name__ for m in model.modules() if isinstance(m, WEIGHT_REUSE_LAYERS)})
    if d > EXACT_MAX_PARAMS:
        why = f"d = {d:,} > {EXACT_MAX_PARAMS:,} weights"
    elif reuse:
        why = f"{', '.join(reuse)} layers make the exact Hessian costly (d = {d:,} passes of their forward)"
    elif n is not None and n * d * d > EXACT_MAX_COST:
        why = f"n d^2 = {n * d * d:.2g} > {EXACT_MAX_COST:.0g}"
    else:
        why = ""
    cheap_exact = not why
    reason = "requested"
    if mode == "auto":
        mode = "exact" if cheap_exact else "diagonal"
        reason = f"auto: d = {d:,} dense weights" if cheap_exact else f"auto: {why}"
    if mode == "exact":
        return mode, "exact", reason
    if hessian == "auto":
        hessian = "exact" if cheap_exact else ("ggn" if ggn else "hutchinson")
        if reason == "requested":
            reason = "auto Hessian: " + (f"d = {d:,} dense weights" if cheap_exact else why)
    return mode, hessian, reason


def describe_estimator(mode: str, hessian: str) -> str:
    """A short name of the estimator, e.g. ``"diagonal sandwich, Gauss-Newton Hessian"``."""
    if mode == "exact":
        return "exact sandwich (full Hessian, per-sample gradients)"
    h = {"exact": "exact Hessian diagonal", "ggn": "Gauss-Newton Hessian diagonal",
         "hutchinson": "Hutchinson Hessian diagonal"}.get(hessian, hessian)
    return f"diagonal sandwich ({h}, per-sample gradient variances)"


def _flat_names(program: LossProgram) -> tuple[dict[str, tuple[int, int]], int]:
    offsets, start = {}, 0
    for n in program.param_names:
        k = program.params[n].numel()
        offsets[n] = (start, start + k)
        start += k
    return offsets, start


def _slice_rows(tree: Any, rows: Tensor) -> Any:
    """The given rows of every tensor in a pytree."""
    return torch.utils._pytree.tree_map(
        lambda t: t[rows.to(t.device)] if isinstance(t, Tensor) else t, tree)


def _slice_tree(tree: Any, a: int, b: int) -> Any:
    """Rows ``a:b`` of every tensor in a pytree."""
    return torch.utils._pytree.tree_map(lambda t: t[a:b] if isinstance(t, Tensor) else t, tree)


def _split_batch(inputs: Any, targets: Any, b: int, step: int) -> Iterator[tuple[Any, Any]]:
    for a in range(0, b, step):
        yield _slice_tree(inputs, a, a + step), _slice_tree(targets, a, a + step)


def _flatten(d: dict[str, Tensor], names: list[str], lead: int) -> Tensor:
    return torch.cat([d[n].reshape(lead, -1) for n in names], dim=1)


_P31 = 2_147_483_647  # 2^31 - 1: modulus of the record hash
_HASH_WEIGHTS: dict[tuple[int, int], Tensor] = {}


def record_keys(inputs: Any, targets: Any, b: int) -> Tensor:
    """``[b]`` int64 content hashes of the records of a batch (a random linear hash of their bytes).

    Every tensor leaf of ``(inputs, targets)`` with ``b`` rows is hashed (pass the raw batch as
    ``inputs`` and ``None`` as ``targets`` to hash a whole batch). Deterministic across
    processes, batch compositions and loader orders: the same record always gets the same key.
    Keeping the records with the smallest keys is a *bottom-k* sample, which does not depend on
    how the records were split over batches or processes, nor on their order.
    """
    h = torch.zeros(b, dtype=torch.int64)
    leaves = [t for t in torch.utils._pytree.tree_leaves((inputs, targets))
              if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == b]
    for i, t in enumerate(leaves):
        raw = t.detach().cpu().contiguous().reshape(b, -1)
        if raw.dtype == torch.bool:
            raw = raw.to(torch.uint8)
        by = raw.view(torch.uint8).to(torch.int64)  # [b, bytes]
        L = by.shape[1]
        w = _HASH_WEIGHTS.get((i, L))
        if w is None:
            w = torch.randint(1, _P31, (L,), generator=torch.Generator().manual_seed(7919 * i + L), dtype=torch.int64)
            _HASH_WEIGHTS[(i, L)] = w
        h = (h * 1_000_003 + (by * w % _P31).sum(1)) % _P31
    return h


def _cat(x: Any) -> Any:
    """A list state (of tensors) as one tensor; tensors pass through; ``None`` for empty."""
    if isinstance(x, Tensor):
        return x
    if not x:
        return None
    if not isinstance(x[0], Tensor):
        return x
    return torch.cat([t.reshape(-1, *t.shape[1:]) if t.dim() else t.reshape(1) for t in x])


class MomentAccumulator:
    """Streaming sums of method.md section 4, shared by :func:`estimate` and ``MISIndicator``.

    ``update(batch)`` adds a batch to ``state``, a dict of plain tensors (every entry is a sum
    over records, except the stored records) and ``finalize()`` turns it into an
    :class:`Estimate`. ``state`` entries (``d`` = assessed weights, flattened in
    ``param_names`` order):

    * ``n`` (int64 scalar): records; ``g_sum``, ``g2_sum`` ``[d]``: per-sample gradient sums
      and sums of squares; ``h_sum``, ``h2_sum`` ``[d]``: Hessian-diagonal sums (exact/GGN:
      summed over records; Hutchinson: over probes, ``h2_sum`` the summed variances of each
      batch's probe mean); ``probes``
      (int64 scalar); ``grad_norm_sq`` (float64 scalar): sum of per-sample ``|g|^2``;
    * exact mode only: ``gg_sum`` ``[d, d]`` (sum of ``g g^T``) and ``H_sum`` ``[d, d]`` (summed
      per-batch Hessians);
    * stored records (lists): ``rec_grad`` (per-sample gradients ``[k, d]`` when
      ``num_records * d <= budget``) or ``rec_x``/``rec_y`` (the records themselves), and with
      ``selection="hash"`` their ``rec_key`` (see :func:`record_keys`).

    ``selection="first"`` keeps the first ``num_records`` records seen;
    ``"hash"`` (``estimate`` and ``MISIndicator``) keeps those with the smallest content hash
    of the raw batch's tensors (:func:`record_keys`), which is the same set however the data is
    ordered (a shuffling loader), batched, split over processes (the union of per-process
    bottom-k sets contains the global bottom-k set), and whether the loss comes from
    ``loss_fn``/``batch_fn`` or a ``mis_per_sample_loss`` hook; so summed/concatenated states
    of several processes finalize to the same estimate as one process over all the data.
    Stored records (not gradients) must then be tensors, unless ``pytree_records`` (a state
    that is never synced across processes, as in ``estimate``).

    The parameters are read (detached copies) when the accumulator is built and again by
    :meth:`reset_program`; the model is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
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
        selection: Literal["first", "hash"] = "first",
        program_cls: type[LossProgram] = LossProgram,
        use_factors: bool = True,
        pytree_records: bool = False,
        n_hint: int | None = None,
        ggn_available: bool = True,
    ) -> None:
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if selection not in ("first", "hash"):
            raise ValueError(f"selection must be 'first' or 'hash', got {selection!r}")
        named = dict(model.named_parameters())
        if param_names is None:
            param_names = [n for n, p in named.items() if p.requires_grad]
        if not param_names:
            raise ValueError("the model has no trainable parameter to assess")
        d = sum(named[n].numel() for n in param_names if n in named)
        if dtype is None:
            dtype = torch.float64 if d <= 100_000 else torch.float32
        self.model, self.loss_fn, self.batch_fn = model, loss_fn, batch_fn or default_batch_fn
        self.dtype, self.program_cls = dtype, program_cls
        self.param_names = list(param_names)
        self.program = program_cls(model, loss_fn, self.param_names, self.batch_fn, dtype)
        self.offsets, d = _flat_names(self.program)
        self.d = d
        if mode not in ("auto", "exact", "diagonal"):
            raise ValueError(f"mode must be 'auto', 'exact' or 'diagonal', got {mode!r}")
        if mode == "exact" and d > 20 * EXACT_MAX_PARAMS:
            raise ValueError(f"mode='exact' builds a d x d Hessian; d = {d} is too large, use mode='diagonal'")
        mode, hessian, self.reason = choose_estimator(model, d, mode, hessian, n=n_hint, ggn=ggn_available)
        self.estimator = describe_estimator(mode, hessian)
        if hessian not in ("exact", "ggn", "hutchinson"):
            raise ValueError(f"hessian must be 'auto', 'exact', 'ggn' or 'hutchinson', got {hessian!r}")
        self.mode, self.hessian = mode, hessian
        self.acc_dtype = torch.float64 if d <= 10_000_000 else torch.float32
        self.names = self.program.param_names
        self.weight_decay, self.num_records = float(weight_decay), int(num_records)
        self.hutchinson_probes, self.damping, self.budget = hutchinson_probes, damping, budget
        self.generator, self.selection, self.pytree_records = generator, selection, pytree_records
        self.keep_w = num_records * d <= budget
        self._out_shape: tuple[int, ...] | None = None
        self.factored: FactoredProgram | None = None
        if use_factors and mode == "diagonal" and hessian == "ggn" and program_cls is LossProgram:
            # nn.Linear layers with one output per record: per-sample statistics as products
            # of layer inputs and output gradients (linear_factors), no [B, d] tensors.
            try:
                self.factored = FactoredProgram(model, loss_fn, self.names, dtype)
            except NotImplementedError:
                self.factored = None
        self.state = self.empty_state()

    def reset_program(self) -> None:
        """Re-read the model's current weights (for a new pass after the model changed)."""
        self.program = self.program_cls(self.model, self.loss_fn, self.param_names, self.batch_fn, self.dtype)
        self._out_shape = None
        if self.factored is not None:
            self.factored.close()
            self.factored = FactoredProgram(self.model, self.loss_fn, self.names, self.dtype)

    def state_spec(self) -> dict[str, tuple[Any, str]]:
        """``{name: (default, reduction)}`` with reduction ``"sum"`` or ``"cat"`` (lists)."""
        d, ad = self.d, self.acc_dtype
        spec: dict[str, tuple[Any, str]] = {
            "n": (torch.zeros((), dtype=torch.int64), "sum"),
            "g_sum": (torch.zeros(d, dtype=ad), "sum"),
            "g2_sum": (torch.zeros(d, dtype=ad), "sum"),
            "h_sum": (torch.zeros(d, dtype=ad), "sum"),
            "h2_sum": (torch.zeros(d, dtype=ad), "sum"),
            "probes": (torch.zeros((), dtype=torch.int64), "sum"),
            "grad_norm_sq": (torch.zeros((), dtype=torch.float64), "sum"),
        }
        if self.mode == "exact":
            spec["gg_sum"] = (torch.zeros(d, d, dtype=torch.float64), "sum")
            spec["H_sum"] = (torch.zeros(d, d, dtype=torch.float64), "sum")
        if self.keep_w:
            spec["rec_grad"] = ([], "cat")
        else:
            spec["rec_x"] = ([], "cat")
            spec["rec_y"] = ([], "cat")
        if self.selection == "hash":
            spec["rec_key"] = ([], "cat")
        return spec

    def empty_state(self) -> dict[str, Any]:
        return {k: (v.clone() if isinstance(v, Tensor) else []) for k, (v, _) in self.state_spec().items()}

    # -- accumulation -------------------------------------------------------------------------
    def update(self, batch: Any, state: dict[str, Any] | None = None) -> int:
        """Add one batch to ``state`` (default ``self.state``, updated in place); returns its size."""
        st = self.state if state is None else state
        program, names, d, hessian = self.program, self.names, self.d, self.hessian
        inputs, targets, b = program.prepare(batch)
        # Keys of the raw batch (before batch_fn and the dtype cast): the same whatever the
        # loader's order and whether batch_fn or a loss hook splits the batch.
        keys = record_keys(batch, None, b) if self.selection == "hash" else None
        if self.factored is not None:
            try:
                fac = self.factored.batch(inputs, targets, b)
            except NotImplementedError:
                if int(st["n"]) > 0:
                    raise
                self.factored.close()
                self.factored = None  # this model's layout needs the generic path
            else:
                self._update_factored(st, fac, inputs, targets, b, keys)
                return b
        if hessian == "ggn" and self._out_shape is None:
            self._out_shape = program.output_shape(inputs)
            c = int(math.prod(self._out_shape)) if self._out_shape else 1
            if c > GGN_MAX_OUTPUTS * 64:
                raise ValueError(f"hessian='ggn' needs few outputs per record; this model has {c}")
        out_shape = self._out_shape
        c_out = int(math.prod(out_shape)) if out_shape else 1
        step = max(1, self.budget // max(d * (c_out if hessian == "ggn" else 1), 1))
        dev = st["g_sum"].device
        a = 0
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
                    st["h_sum"][slice(*self.offsets[k])] += (J * LJ).sum(dim=(0, 1)).to(dev, self.acc_dtype)
            else:
                grads = {k: v.reshape(bb, -1) for k, v in program.per_sample_grads(x, y).items()}
            for k in names:
                gk = grads[k].to(dev, self.acc_dtype)
                sl = slice(*self.offsets[k])
                st["g_sum"][sl] += gk.sum(0)
                st["g2_sum"][sl] += gk.square().sum(0)
            flat = _flatten(grads, names, bb).to(dev, torch.float64)
            st["grad_norm_sq"] += flat.square().sum()
            if "gg_sum" in st:
                st["gg_sum"] += flat.T @ flat
            self._store(st, flat, x, y, None if keys is None else keys[a : a + bb])
            a += bb
        if hessian == "exact":
            H_b = _batch_hessian(program, inputs, targets, names, self.offsets, d).to(dev)
            if "H_sum" in st:
                st["H_sum"] += H_b
            else:
                st["h_sum"] += torch.diagonal(H_b).to(self.acc_dtype)
        elif hessian == "hutchinson":
            # Welford over this batch's probes: h2_sum accumulates the variance of each batch's
            # probe mean, so sum over batches = variance of the estimate (batches independent).
            P = self.hutchinson_probes
            mean = {k: torch.zeros(self.offsets[k][1] - self.offsets[k][0], dtype=self.acc_dtype, device=dev) for k in names}
            m2 = {k: torch.zeros_like(v) for k, v in mean.items()}
            for p in range(P):
                est = _hutchinson_probe(program, inputs, targets, self.generator)
                for k in names:
                    v = est[k].reshape(-1).to(dev, self.acc_dtype)
                    delta = v - mean[k]
                    mean[k] += delta / (p + 1)
                    m2[k] += delta * (v - mean[k])
            for k in names:
                sl = slice(*self.offsets[k])
                st["h_sum"][sl] += mean[k] * P
                if P > 1:
                    st["h2_sum"][sl] += m2[k] / (P - 1) / P
            st["probes"] += P
        st["n"] += b
        return b

    def _update_factored(self, st: dict[str, Any], fac: dict, inputs: Any, targets: Any, b: int,
                         keys: Tensor | None) -> None:
        assert self.factored is not None
        dev = st["g_sum"].device
        sums, norm = self.factored.batch_sums(fac, self.acc_dtype)
        for k in self.names:
            sl = slice(*self.offsets[k])
            g, g2, h = sums[k]
            st["g_sum"][sl] += g.to(dev)
            st["g2_sum"][sl] += g2.to(dev)
            st["h_sum"][sl] += h.to(dev)
        st["grad_norm_sq"] += norm.to(dev, torch.float64).sum()
        # Only the rows that can still be stored are materialised (a [rows, d] tensor).
        if keys is None:
            kept = sum(int(t.shape[0]) for t in st["rec_grad"]) if self.keep_w else sum(
                _batch_size_of(t) for t in st["rec_y"])
            rows = torch.arange(min(max(self.num_records - kept, 0), b))
        else:
            stored = _cat(st["rec_key"])
            if stored is not None and stored.numel() >= self.num_records:
                rows = torch.nonzero(keys < stored.max().cpu()).squeeze(-1)
            else:
                rows = torch.arange(b)
        if rows.numel():
            sub = {m: tuple(t[rows] for t in v) for m, v in fac.items()}
            flat = (self.factored.record_gradients(sub, rows.numel()).to(dev, torch.float64)
                    if self.keep_w else torch.empty(rows.numel(), 0))
            self._store(st, flat, _slice_rows(inputs, rows), _slice_rows(targets, rows),
                        None if keys is None else keys[rows])
        st["n"] += b

    def _store(self, st: dict[str, Any], flat: Tensor, x: Any, y: Any, keys: Tensor | None) -> None:
        k = self.num_records
        if keys is None:  # the first records seen
            kept = sum(int(t.shape[0]) for t in st["rec_grad"]) if self.keep_w else sum(
                _batch_size_of(t) for t in st["rec_y"])
            if kept >= k:
                return
            take = min(k - kept, flat.shape[0])
            if self.keep_w:
                st["rec_grad"].append(flat[:take].clone())
            else:
                st["rec_x"].append(torch.utils._pytree.tree_map(lambda t: t[:take].clone(), x))
                st["rec_y"].append(torch.utils._pytree.tree_map(lambda t: t[:take].clone(), y))
            return
        # bottom-k by content hash
        if self.keep_w:
            st["rec_grad"].append(flat.clone())
        elif self.pytree_records:
            st["rec_x"].append(torch.utils._pytree.tree_map(_detach_clone, x))
            st["rec_y"].append(torch.utils._pytree.tree_map(_detach_clone, y))
        else:
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TypeError(
                    "storing records across processes needs tensor inputs and targets; this model "
                    f"is too large to store {k} records' gradients (num_records * d > budget): "
                    "lower num_records or raise budget"
                )
            st["rec_x"].append(x.detach().clone())
            st["rec_y"].append(y.detach().clone())
        st["rec_key"].append(keys.to(st["g_sum"].device))
        _prune(st, k)

    # -- finalisation -------------------------------------------------------------------------
    def finalize(self, state: dict[str, Any] | None = None) -> Estimate:
        """The :class:`Estimate` of the accumulated (possibly summed over processes) state."""
        st = self.state if state is None else dict(state)
        names, offsets, d = self.names, self.offsets, self.d
        program, weight_decay, damping = self.program, self.weight_decay, self.damping
        hessian, num_records = self.hessian, self.num_records
        n = int(st["n"])
        if n < 2:
            raise ValueError(f"n (number of training records) must be >= 2, got {n}: is the dataloader empty?")
        if self.selection == "hash":
            st = {k: (list(v) if isinstance(v, list) else v) for k, v in st.items()}
            _prune(st, num_records)
        cpu = torch.device("cpu")
        g_sum = st["g_sum"].to(cpu)
        g_mean_flat = (g_sum / n).to(torch.float64)
        v_flat = (st["g2_sum"].to(cpu) / n).to(torch.float64) - g_mean_flat.square()
        g_mean = {k: g_mean_flat[slice(*offsets[k])] for k in names}
        v_diag = {k: v_flat[slice(*offsets[k])] for k in names}
        theta = {k: program.params[k].reshape(-1).to(cpu, torch.float64) for k in names}
        diagnostics: dict[str, Any] = {}
        # Stationarity: the penalised mean gradient relative to the size of a per-sample gradient.
        total_grad = torch.cat([g_mean[k] + weight_decay * theta[k] for k in names])
        rms_g = math.sqrt(float(st["grad_norm_sq"]) / n)
        diagnostics["gradient_norm"] = float(total_grad.norm())
        diagnostics["gradient_norm_ratio"] = float(total_grad.norm()) / max(rms_g, 1e-300)
        diagnostics["not_at_minimum"] = diagnostics["gradient_norm_ratio"] > 0.1
        diagnostics["zero_gradient_variance"] = int((v_flat <= 0).sum())
        shapes = {k: tuple(program.params[k].shape) for k in names}
        stored_g = _cat(st["rec_grad"]) if self.keep_w else None

        if self.mode == "exact":
            gbar = g_mean_flat
            V = st["gg_sum"].to(cpu) / n - torch.outer(gbar, gbar)
            H = st["H_sum"].to(cpu) / n + weight_decay * torch.eye(d, dtype=torch.float64)
            H = 0.5 * (H + H.T)
            evals, evecs = torch.linalg.eigh(H)
            lo, hi = float(evals[0]), float(evals[-1])
            floor = damping * max(abs(hi), 1e-300)
            flipped = int((evals < 0).sum())
            floored = int((evals.abs() < floor).sum())
            # Indefinite or singular H (a model near a saddle, or a flat direction): shifting
            # the whole spectrum up to the floor would leave a near-zero eigenvalue and an
            # unbounded variance along it. Use |eigenvalues| (the curvature's magnitude, as
            # saddle-free Newton does) floored at damping * max instead; reported below.
            fixed = evals.abs().clamp_min(floor)
            if flipped or floored:
                H = (evecs * fixed) @ evecs.T
            diagnostics.update(
                hessian_min_eigenvalue=lo, hessian_max_eigenvalue=hi,
                hessian_condition=(hi / lo) if lo > 0 else math.inf,
                negative_curvature=lo < 0, negative_eigenvalues_flipped=flipped,
                eigenvalues_floored=floored,
            )
            Hinv = (evecs / fixed) @ evecs.T
            Sigma = Hinv @ V @ Hinv
            Sigma = 0.5 * (Sigma + Sigma.T)
            sdiag = torch.diagonal(Sigma).clamp_min(0.0)
            sigma_flat = (sdiag / n).sqrt()
            sigma = {k: sigma_flat[slice(*offsets[k])] for k in names}
            if stored_g is None:
                raise ValueError("exact mode stores per-sample gradients; raise budget or lower num_records")
            G = stored_g.to(cpu, torch.float64)[:num_records]
            psi = -(G - gbar) @ Hinv.T
            w = psi / sdiag.clamp_min(1e-300).sqrt()
            # |Sigma^{-1/2} psi| for the exact (correlated) unquantized baseline.
            sol = torch.linalg.lstsq(Sigma, psi.T).solution
            mahal = (psi * sol.T).sum(-1).clamp_min(0.0).sqrt()
            return Estimate(
                n=n, mode="exact", hessian="exact", names=names, shapes=shapes,
                offsets=offsets, theta=theta, sigma=sigma, w=w, num_records=w.shape[0],
                diagnostics=diagnostics, mahalanobis=mahal, budget=self.budget,
                estimator=self.estimator, reason=self.reason,
            )

        # Diagonal mode.
        h_sum = st["h_sum"].to(cpu, torch.float64)
        probes_used = int(st["probes"])
        if hessian == "hutchinson":
            # Each probe's v*Hv summed the batch Hessians; divide by n to get the mean-loss Hessian.
            total = h_sum / self.hutchinson_probes  # sum over batches of each batch's probe mean
            h_flat = total / n
            # Standard error from the within-batch spread of the probes (h2_sum: summed
            # variances of the batch means); needs >= 2 probes per batch.
            var = st["h2_sum"].to(cpu, torch.float64)
            rel = var.sqrt() / total.abs().clamp_min(1e-300)
            diagnostics["hutchinson_probes"] = probes_used
            diagnostics["hutchinson_median_relative_error"] = float(rel.median())
        else:
            h_flat = h_sum / n
        allh = h_flat + weight_decay
        neg = int((allh <= 0).sum())
        floor = damping * float(allh.abs().max()) if allh.numel() else 0.0
        diagnostics.update(
            hessian_min_diagonal=float(allh.min()), hessian_max_diagonal=float(allh.max()),
            negative_curvature=neg > 0, nonpositive_hessian_diagonal=neg,
        )
        sigma = {}
        for k in names:
            hk = allh[slice(*offsets[k])].clamp_min(max(floor, 1e-300))
            sigma[k] = (v_diag[k].clamp_min(0.0) / (n * hk.square())).sqrt()
        w = None
        records = None
        if stored_g is not None:
            G = stored_g.to(cpu, torch.float64)[:num_records]
            w = -(G - g_mean_flat) / v_flat.clamp_min(1e-300).sqrt()  # the sign of psi = -H^{-1} g
            kept = w.shape[0]
        else:
            xs, ys = st["rec_x"], st["rec_y"]
            if isinstance(xs, Tensor):  # concatenated (hash selection / synced states)
                records = [(xs, ys)] if xs.shape[0] else []
            else:
                records = list(zip(xs, ys))
            kept = sum(_batch_size_of(y) for _, y in records)
        factors = None
        if w is None and self.factored is not None and records:
            # The stored records' layer factors: one forward/backward over R records.
            per_layer = [self.factored.batch(x, y, _batch_size_of(y)) for x, y in records]
            merged = {m: tuple(torch.cat([p[m][i] for p in per_layer]) for i in range(3)) for m in per_layer[0]}
            factors = self.factored.factors(merged)
            factors = [type(f)(f.module, f.weight, f.bias, f.x[:num_records], f.d[:num_records]) for f in factors]
        return Estimate(
            n=n, mode="diagonal", hessian=hessian, names=names, shapes=shapes, offsets=offsets,
            theta=theta, sigma=sigma, w=w, num_records=min(kept, num_records), diagnostics=diagnostics,
            _program=program, _records=records, _g_mean=g_mean, _v_diag=v_diag, budget=self.budget,
            factors=factors, estimator=self.estimator, reason=self.reason,
        )


def _prune(st: dict[str, Any], k: int) -> None:
    """Keep the ``k`` stored records with the smallest keys, sorted by key (in place)."""
    keys = _cat(st["rec_key"])
    if keys is None:
        return
    order = torch.sort(keys.cpu(), stable=True).indices[:k]
    fields = ["rec_grad"] if "rec_grad" in st else ["rec_x", "rec_y"]
    for f in fields:
        items = st[f]
        if isinstance(items, list) and items and not isinstance(items[0], Tensor):
            # pytree records (estimate only): concatenate and select leaf by leaf
            full = torch.utils._pytree.tree_map(
                lambda *ts: torch.cat(ts) if isinstance(ts[0], Tensor) else ts[0], items[0], *items[1:])
            items[:] = [torch.utils._pytree.tree_map(
                lambda t: t[order.to(t.device)] if isinstance(t, Tensor) else t, full)]
            continue
        full = _cat(items)
        sel = full[order.to(full.device)]
        if isinstance(items, list):
            items[:] = [sel]
        else:
            st[f] = sel
    sel_keys = keys[order.to(keys.device)]
    if isinstance(st["rec_key"], list):
        st["rec_key"][:] = [sel_keys]
    else:
        st["rec_key"] = sel_keys


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
    use_factors: bool = True,
) -> Estimate:
    """Stream the training records once and estimate ``sigma`` and ``w`` (method.md section 4).

    A thin loop over :class:`MomentAccumulator` (``update`` per batch, then ``finalize``).

    Args:
        model: the trained model (never modified).
        train_dataloader: iterable of training batches (every record once).
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample data losses.
        param_names: parameters to assess (default: every parameter with ``requires_grad``).
        mode: ``"exact"``, ``"diagonal"`` or ``"auto"`` (by estimated cost: exact for dense
            models up to 2,000 parameters, see :func:`choose_estimator`).
        hessian: diagonal mode's Hessian: ``"exact"``, ``"ggn"``, ``"hutchinson"``, ``"auto"``.
        weight_decay: L2 penalty coefficient of the training objective
            ``mean(loss) + weight_decay / 2 * |theta|^2`` (added to ``H``).
        num_records: records whose influences are kept: the ``num_records`` smallest content
            hashes (:func:`record_keys`), so the same records whatever the loader's order.
        batch_fn: ``batch -> (inputs, targets)``.
        hutchinson_probes: Rademacher probes per batch for ``hessian="hutchinson"``.
        damping: relative damping added to ``H`` when it is not positive definite.
        budget: floats held at once in per-sample buffers (memory bound).
        dtype: compute dtype (default float64 up to 10^5 parameters, float32 above).
        progress: called with the number of records processed after each batch.
        use_factors: use the factored path for ``nn.Linear`` layers (same numbers, much
            faster; see ``linear_factors``) where the model allows it.
    """
    acc = MomentAccumulator(
        model, loss_fn, param_names=param_names, mode=mode, hessian=hessian, weight_decay=weight_decay,
        num_records=num_records, batch_fn=batch_fn, hutchinson_probes=hutchinson_probes,
        damping=damping, budget=budget, dtype=dtype, generator=generator, selection="hash",
        use_factors=use_factors, pytree_records=True, n_hint=_dataset_size(train_dataloader),
    )
    log.info("estimation: %s (%s), d = %d", acc.estimator, acc.reason, acc.d)
    n = 0
    for batch in train_dataloader:
        n += acc.update(batch)
        if progress is not None:
            progress(n)
    return acc.finalize()


def _dataset_size(loader: Any) -> int | None:
    """``len(loader.dataset)`` when the loader has a sized dataset, else ``None``."""
    try:
        return len(loader.dataset)
    except Exception:
        return None


def _detach_clone(t: Any) -> Any:
    return t.detach().clone() if isinstance(t, Tensor) else t


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
