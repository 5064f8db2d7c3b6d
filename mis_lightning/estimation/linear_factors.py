"""Factored per-sample statistics of ``nn.Linear`` layers: the fast diagonal path.

For a Linear layer with input ``x_i [in]`` and loss gradient at its output ``d_i [out]`` the
per-sample weight gradient is the outer product ``g_i = d_i x_i^T``. Everything the diagonal
estimation and the Gaussian form need is then a product of small matrices, never a
``[B, d]`` tensor of per-sample gradients:

* ``sum_i g_i = D^T X``, ``sum_i g_i^2 = (D^2)^T (X^2)`` (squares elementwise);
* Gauss-Newton diagonal for one output per record: with ``f_i`` the record's output,
  ``delta_i = d f_i / d o_i`` at the layer and ``L_i = d^2 l / d f_i^2``,
  ``GGN_jj = sum_i L_i (delta_i x_i^T)_j^2 = ((L delta^2)^T (X^2))_j`` — and
  ``d_i = (d l / d f_i) delta_i``, so ONE backward pass of ``sum_i f_i`` gives both;
* per-record sums ``sum_j (g_rj - gbar_j)^p A_j`` for ``p = 2, 4`` expand binomially into
  bilinear forms ``d_r^a (A o gbar^b) x_r^a`` (cost of a forward pass per column).

This is the classical trick behind per-sample-gradient libraries (BackPACK's
``SumGradSquared``, "ghost" norms). It applies when every assessed parameter belongs to an
``nn.Linear`` called once per forward on 2-D inputs, used by no other module (no tied
weights: a shared weight's per-sample gradient is a *sum* of outer products, whose squares
have cross terms), and the model has one output per record; ``estimate`` falls back to
``torch.func`` per-sample gradients otherwise. The first batch is also checked against
autograd (the summed factored gradient must equal the parameter gradient), which catches a
weight also used outside its layer (e.g. ``F.linear(x, self.a.weight)`` in ``forward``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._modelcopy import private_copy
from .._precision import full_float32
from .._warning_filters import ignoring
from ..functional import gather as _gather
from ..functional.versions import tensor_version
from .output_reads import OutputShape, flat_outputs, layout_of, record_shape, unflat_record
from .per_sample import LossFn, cast_tensor_attributes, default_dtype, record_loss_derivatives
from .record_draws import record_labels, record_signs
from .records import record_keys


@dataclass
class LinearFactors:
    """The stored records' factors of one Linear layer.

    Attributes:
        module: the layer's name in the model.
        weight, bias: the assessed parameter names of the layer (``None`` if not assessed).
        x: ``[R, in]`` the records' inputs to the layer.
        d: ``[R, out]`` the records' loss gradients at the layer's output.
    """

    module: str
    weight: str | None
    bias: str | None
    x: Tensor
    d: Tensor


def shared_parameters(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """``{name: [every module slot holding it]}`` for the assessed parameters held by more than
    one module slot (tied weights, or one module registered under two names)."""
    named = dict(model.named_parameters())
    wanted = {id(named[n]): n for n in names if n in named}
    slots: dict[str, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for leaf, p in mod._parameters.items():
            if p is not None and id(p) in wanted:
                slots.setdefault(wanted[id(p)], []).append(f"{mod_name}.{leaf}" if mod_name else leaf)
    return {n: v for n, v in slots.items() if len(v) > 1}


def linear_layout(model: nn.Module, names: list[str]) -> dict[str, tuple[str | None, str | None]] | None:
    """``{module_name: (weight_name, bias_name)}`` if every assessed name is a Linear's weight or
    bias, held by that Linear only, else ``None``."""
    if shared_parameters(model, names):
        return None
    layout: dict[str, list[str | None]] = {}
    mods = dict(model.named_modules())
    for n in names:
        mod_name, _, leaf = n.rpartition(".")
        mod = mods.get(mod_name)
        if type(mod) is not nn.Linear or leaf not in ("weight", "bias"):
            return None
        entry = layout.setdefault(mod_name, [None, None])
        entry[0 if leaf == "weight" else 1] = n
    return {k: (v[0], v[1]) for k, v in layout.items()}


class _Capture:
    """Forward hooks that keep each target layer's input and output for one forward."""

    def __init__(self, model: nn.Module, modules: list[str]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        mods = dict(model.named_modules())
        self.handles = [mods[m].register_forward_hook(self._hook(m)) for m in modules]

    def _hook(self, name: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple, out: Tensor) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.inputs[name] = args[0]
            self.outputs[name] = out

        return hook

    def reset(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.calls.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class FactoredProgram:
    """Per-batch factors of every assessed Linear layer, computed on a private copy.

    ``batch(inputs, targets)`` runs one forward and one backward pass of ``sum_i f_i`` and
    returns, per layer, ``x [B, in]`` (layer inputs), ``d [B, out]`` (loss gradients at the
    layer output) and ``c [B, out]`` (``L_i delta_i^2``: the Gauss-Newton weights), from which
    :meth:`batch_sums` forms the estimation's sums. Raises ``NotImplementedError`` when the
    layout does not allow it (several outputs per record, a layer called twice, inputs not 2-D).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, names: list[str], dtype: torch.dtype) -> None:
        layout = linear_layout(model, names)
        if layout is None:
            raise NotImplementedError("not every assessed parameter is the weight or bias of one nn.Linear")
        self.layout = layout
        self.names = names
        self.loss_fn, self.dtype = loss_fn, dtype
        self.model = private_copy(model, "copying the model for the factored nn.Linear estimation").to(dtype).eval()
        cast_tensor_attributes(self.model, dtype)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.capture = _Capture(self.model, list(layout))
        self._verified = False
        self.scratch = Scratch()
        self._shape: OutputShape | None = None  # the output's layout, sorted on the first batch
        # bytes per record the first batch's forward saved for its backward (every module's, frozen
        # layers' included: the copy's parameters all require grad), for the merges' memory bound
        self.saved_bytes: float | None = None

    def _forward(self, inputs: Any, targets: Any, b: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(out [b, C], f [b], the layers' outputs)`` of one forward with the layout's checks;
        ``out`` holds the outputs the loss reads (:func:`~.output_reads.flat_outputs`; a pytree
        output's leaves sorted at the first forward)."""
        raw = self.model(inputs)
        self._shape = layout_of(raw, self._shape, self.loss_fn, inputs, targets, b)
        out = flat_outputs(raw, self._shape)
        if out.numel() != b:
            raise NotImplementedError("the factored path needs one output per record")
        for m in self.layout:
            if self.capture.calls.get(m, 0) != 1 or self.capture.inputs[m].dim() != 2:
                raise NotImplementedError(f"layer {m!r} is not called once on [B, in] inputs")
        return out, out.reshape(b), [self.capture.outputs[m] for m in self.layout]

    def _verify_first(self, inputs: Any, targets: Any, b: int) -> None:
        """:meth:`_verify` on the first :data:`VERIFY_RECORDS` records of the first batch, in a
        forward and backward of their own (the whole merged batch's weight gradients and
        factored products were ~0.25 s of the 1e7 MLP's first call; a weight used outside its
        layer adds its terms on any record)."""
        r = min(b, VERIFY_RECORDS)
        first, first_y = torch.utils._pytree.tree_map(
            lambda t: t[:r] if isinstance(t, Tensor) and t.dim() and t.shape[0] == b else t, (inputs, targets))
        self.capture.reset()
        with torch.enable_grad(), default_dtype(self.dtype):
            _, f, outs = self._forward(first, first_y, r)
            mp = dict(self.model.named_parameters())
            pnames = [n for n in self.names if n in mp]
            got = torch.autograd.grad(f.sum(), outs + [mp[n] for n in pnames])
            self._verify(got[: len(outs)], dict(zip(pnames, got[len(outs):])))
        self.capture.reset()

    def batch(self, inputs: Any, targets: Any, b: int) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        inputs, targets = _cast(inputs, self.dtype), _cast(targets, self.dtype)
        if not self._verified:
            self._verify_first(inputs, targets, b)
        self.capture.reset()
        with torch.enable_grad(), default_dtype(self.dtype), _saved_bytes(b, self.saved_bytes is None) as saved:
            out, f, outs = self._forward(inputs, targets, b)
            deltas = torch.autograd.grad(f.sum(), outs)
        if self.saved_bytes is None:
            self.saved_bytes = saved[0] / max(b, 1)
        fd = f.detach()
        shape = self._shape
        assert shape is not None

        def one(o: Tensor, y: Any) -> Tensor:
            y1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, y)
            return self.loss_fn(unflat_record(o, shape), y1).reshape(())

        # dl/df [B], d2l/df2 [B] by autograd through vmap(one) (torch.func's grad imports
        # torch._dynamo at its first call, ~1 s in a process that never ran an optimizer; pf30)
        try:
            e, L2 = record_loss_derivatives(one, fd, targets)
            assert L2 is not None
            L = L2.reshape(b)
        except Exception:  # a loss autograd cannot differentiate through vmap: torch.func
            e = torch.func.vmap(torch.func.grad(one))(fd, targets)
            L = torch.func.vmap(torch.func.grad(torch.func.grad(one)))(fd, targets)
        res = {}
        Ld = L.detach()
        for m, delta in zip(self.layout, deltas):
            x = self.capture.inputs[m].detach()
            dl = delta.detach()
            # (x, d, c) as documented, then delta and L for the Kronecker factor G (kron_sums)
            res[m] = (x, e.unsqueeze(-1) * dl, dl.square().mul_(Ld.unsqueeze(-1)), dl, Ld)
        self.capture.reset()
        return res

    def select_rows(self, fac: dict[str, tuple[Tensor, Tensor, Tensor]], rows: Tensor) -> dict:
        """The factors of the records ``rows`` of a batch."""
        return {m: tuple(t[rows] for t in v) for m, v in fac.items()}

    def _verify(self, deltas: tuple[Tensor, ...], grads: dict[str, Tensor]) -> None:
        """The factored gradient of ``sum_i f_i`` (``delta^T x`` per layer) must equal autograd's
        (on the records of the last forward: :meth:`_verify_first`).

        A weight used anywhere else (tied to another module, a functional call in
        ``forward``) gets extra gradient terms the factors do not see: fall back to torch.func.
        Tolerance 1e-5 relative to the gradient's size (float32 matmul rounding; the two
        differ by O(1) where a use is missed).
        """
        for (m, (wn, bn)), delta in zip(self.layout.items(), deltas):
            x = self.capture.inputs[m].detach()
            for name in (wn, bn):
                if name is None:
                    continue
                g = grads[name]
                if name == wn:  # by blocks of output rows: no [out, in] products and differences
                    rows = max(1, WIDEN_BLOCK // max(1, x.shape[1]))
                    diff = float(torch.stack([(g[r: r + rows] - delta[:, r: r + rows].T @ x).abs().max()
                                              for r in range(0, g.shape[0], rows)]).max())
                else:
                    diff = float((g - delta.sum(0)).abs().max())
                if diff > 1e-5 * max(float(g.abs().max()), 1e-30):
                    raise NotImplementedError(f"parameter {name!r} is also used outside layer {m!r}")
        self._verified = True

    def batch_sums(self, fac: dict[str, tuple[Tensor, Tensor, Tensor]], acc: torch.dtype,
                   into: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None
                   ) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor]], Tensor]:
        """Per assessed parameter ``(sum g, sum g^2, GGN diagonal sum)`` (flat) and ``|g_i|^2 [B]``.

        ``into``: per weight name three flat ``[out * in]`` tensors (the running sums, dtype
        ``acc``) to which the weight's sums are added in place instead of being returned; the
        GEMMs then run over the output rows live in the batch only (:func:`_live_rows`)."""
        out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        norm = None
        for m, (wn, bn) in self.layout.items():
            # Products in the model's dtype (one batch: float32 is accurate to ~1e-6 relative),
            # accumulated across batches in ``acc``.
            x, d, c = fac[m][:3]
            x2, d2 = x.square(), d.square()
            if norm is None:
                norm = torch.zeros(x.shape[0], dtype=acc, device=x.device)
            if wn is not None and into is not None and wn in into:
                _add_live_rows(into[wn], x, x2, d, d2, c, self.scratch)
                norm += (d2.sum(-1) * x2.sum(-1)).to(acc)
            elif wn is not None:
                out[wn] = tuple(t.reshape(-1).to(acc) for t in (d.T @ x, d2.T @ x2, c.T @ x2))
                norm += (d2.sum(-1) * x2.sum(-1)).to(acc)
            if bn is not None:
                out[bn] = (d.sum(0).to(acc), d2.sum(0).to(acc), c.sum(0).to(acc))
                norm += d2.sum(-1).to(acc)
        assert norm is not None
        return out, norm

    def kron_layers(self) -> dict[str, tuple[int, int]]:
        """``{module: (p, out)}``: the layers whose Kronecker factors :meth:`kron_sums` forms, with
        ``p`` the rows of ``A`` (the assessed weight's fan-in, plus 1 for an assessed bias; 1 for
        a bias alone) and ``out`` those of ``G``; layers with ``p`` or ``out`` above
        :data:`KFAC_MAX_WIDTH` are left out (their ``p^2 + out^2`` floats and eigendecompositions)."""
        mods = dict(self.model.named_modules())
        out: dict[str, tuple[int, int]] = {}
        for m, (wn, bn) in self.layout.items():
            lin = mods[m]
            p = (lin.in_features if wn is not None else 0) + (1 if bn is not None else 0)
            if max(p, lin.out_features) <= KFAC_MAX_WIDTH:
                out[m] = (p, lin.out_features)
        return out

    def kron_sums(self, fac: dict[str, tuple[Tensor, ...]], acc: torch.dtype,
                  rows: dict[str, int] | None = None,
                  into: dict[str, tuple[Tensor, Tensor]] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer of :meth:`kron_layers` the batch's Kronecker factors of the Gauss-Newton
        Hessian (K-FAC; method.md section 4, "The diagonal sandwich and correlated weights"):
        ``A = sum_i a_i a_i^T`` ``[p, p]`` with ``a_i`` the layer input (and a trailing 1 for the
        bias) and ``G = sum_i L_i delta_i delta_i^T`` ``[out, out]`` (the GN diagonal's weighting).
        GEMMs in the batch's dtype, returned in ``acc``. ``rows``: per layer, the batch's first
        records summed (default all; a layer at 0 is left out). ``into``: per layer the running
        ``(A, G)`` sums (dtype ``acc``) to which the batch's are added in place (the same sums,
        without the ``[p, p]`` / ``[out, out]`` zero-filled and widened copies per batch); the
        layers added are returned with empty tensors."""
        res: dict[str, tuple[Tensor, Tensor]] = {}
        for m in self.kron_layers():
            wn, bn = self.layout[m]
            r = None if rows is None else rows.get(m, 0)
            if r is not None and r <= 0:
                continue
            x, _, _, delta, L = (t[:r] for t in fac[m])
            if wn is None:
                a = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
            elif bn is not None:
                a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
            else:
                a = x
            if into is not None and m in into:
                _live_gram(a, a, into=into[m][0], scratch=self.scratch)
                # L = 1 on every record (a squared error's second derivative): L delta is delta
                # itself (1 x is exact), whose Gram is symmetric: its upper blocks only (_gram)
                Ld = delta if bool((L == 1).all()) else L.unsqueeze(-1) * delta
                _live_gram(Ld, delta, into=into[m][1], scratch=self.scratch)
                res[m] = (torch.empty(0, dtype=acc), torch.empty(0, dtype=acc))
                continue
            res[m] = (_live_gram(a, a).to(acc), _live_gram(L.unsqueeze(-1) * delta, delta).to(acc))
        return res

    def record_gradients(self, fac: dict[str, tuple[Tensor, Tensor, Tensor]], take: int) -> Tensor:
        """Flat per-sample gradients ``[take, d]`` in ``names`` order (small models only)."""
        parts = {}
        for m, (wn, bn) in self.layout.items():
            x, d = fac[m][:2]
            if wn is not None:
                parts[wn] = (d[:take].unsqueeze(-1) * x[:take].unsqueeze(1)).reshape(take, -1)
            if bn is not None:
                parts[bn] = d[:take]
        return torch.cat([parts[n] for n in self.names], dim=1)

    def factors(self, fac: dict[str, tuple[Tensor, Tensor, Tensor]]) -> list[LinearFactors]:
        return [LinearFactors(m, wn, bn, fac[m][0].to(torch.float64), fac[m][1].to(torch.float64))
                for m, (wn, bn) in self.layout.items()]

    def close(self) -> None:
        self.capture.remove()
        self.scratch.clear()


@contextmanager
def _saved_bytes(b: int, on: bool = True) -> Iterator[list[float]]:
    """``[bytes]``: the tensors of ``b`` records (dim 0) autograd saves for the backward inside the
    block, each storage once (what a forward holds per batch until its backward: the activations of
    every layer, those not assessed included); nothing counted (no hook) where ``on`` is False."""
    total = [0.0]
    if not on:
        yield total
        return
    seen: set[tuple[int, int]] = set()

    def pack(t: Tensor) -> Tensor:
        if t.dim() and t.shape[0] == b:
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            except Exception:  # noqa: BLE001 - a tensor without a plain storage: its own bytes
                key = (id(t), t.numel() * t.element_size())
            if key not in seen:
                seen.add(key)
                total[0] += float(key[1])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


class Scratch:
    """Reused output buffers of the per-batch sums' GEMMs: ``get(key, shape, dtype)`` a
    contiguous ``shape`` view of a flat buffer kept per ``key`` (grown when too small). A fresh
    multi-MB result per GEMM and batch was memory the kernel mapped and zeroed each time (~0.3 s of
    page faults over the 1e7 MLP's pass); a GEMM writing into a contiguous buffer gives the same
    floats (measured bitwise with MKL at the pass's shapes). At most one buffer per key is held,
    the size of the largest product so far (two K-FAC factor blocks and one layer's gradient-sum
    product: ~3 x 17 MB at the 1e7 MLP); :meth:`clear` drops them (the estimate's finalisation)."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> Tensor:
        """A ``shape`` view of the buffer kept under ``key`` on ``device`` (the GEMM operands'
        device: an ``out=`` on another device fails)."""
        numel = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < numel or buf.device != torch.device(device):
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def clear(self) -> None:
        self._bufs.clear()


def _live_rows(d: Tensor, c: Tensor) -> Tensor | None:
    """The output rows ``[k]`` (indices) of a batch with a non-zero ``d`` or ``c`` on some record
    (NaN counts as live), or ``None`` where more than 3/4 are live (the whole GEMM is then as
    cheap). A ReLU layer's dead units have ``d = c = 0`` on every record: their rows of
    ``d^T x``, ``(d^2)^T x^2`` and ``c^T x^2`` are exact zeros (finite ``x``)."""
    live = ((d != 0) | (c != 0)).any(0)
    nl = int(live.sum())
    return None if nl > 0.75 * d.shape[1] else live.nonzero().reshape(-1)


def _add_live_rows(into: tuple[Tensor, Tensor, Tensor], x: Tensor, x2: Tensor, d: Tensor, d2: Tensor,
                   c: Tensor, scratch: Scratch | None = None) -> None:
    """Add a batch's ``d^T x``, ``(d^2)^T x^2`` and ``c^T x^2`` (``[out, in]``, flattened) to the
    three running sums ``into`` in place, the GEMMs over the live output rows only
    (:func:`_live_rows`; the others add exact zeros). The float32 products are added to the
    ``acc`` sums as the former ``.to(acc)`` copies were (exact widening, then one rounding), with
    no whole-layer temporary; the live rows' GEMMs are the same dot products over the batch, in
    MKL's blocking for the smaller shape (such shapes measured equal or ~1e-7 relative
    apart). Non-finite inputs take the whole GEMM (``0 * inf`` is NaN in a dead row). ``scratch``:
    the products are written to one reused buffer, one at a time (:class:`Scratch`)."""
    rows = _live_rows(d, c)
    k = d.shape[1]

    def product(u: Tensor, w: Tensor) -> Tensor:
        if scratch is None:
            return u.T @ w
        return torch.mm(u.T, w, out=scratch.get("rows", (u.shape[1], w.shape[1]), torch.promote_types(u.dtype, w.dtype),
                                                  u.device))

    if rows is None or not bool(torch.isfinite(x).all()):
        for tgt, u, w in zip(into, (d, d2, c), (x, x2, x2)):
            tgt.add_(product(u, w).reshape(-1))
        return
    if rows.numel() == 0:
        return
    for tgt, u, w in zip(into, (d, d2, c), (x, x2, x2)):
        # view[rows] += the product: the same float additions as view[rows] + t, no gathered copy
        view = tgt.view(k, -1)
        view.index_add_(0, rows, product(u[:, rows], w).to(view.dtype))


def _live_gram(u: Tensor, v: Tensor, into: Tensor | None = None, scratch: Scratch | None = None) -> Tensor:
    """``u^T v`` ``[k, k]`` for ``u``, ``v`` ``[B, k]`` with the same zero columns (``u`` is ``v``
    or ``v`` scaled by record): the GEMM over the columns non-zero in the batch only, the rest
    exact zeros. A ReLU layer's dead units (``delta = 0``) and the next layer's inputs from them
    are most of a wide trained MLP's columns (91% of the 1e7 benchmark MLP's second layer),
    and the factors' GEMMs were most of the K-FAC correction's cost. The live block's entries are
    the same dot products, summed by the GEMM in another blocking: equal to float rounding.
    ``into``: a ``[k, k]`` running sum to which ``u^T v`` is added in place (its live block only:
    the rest would add exact zeros), returned. ``scratch``: the product's buffers (with ``into``;
    :class:`Scratch`)."""
    live = (v != 0).any(0)  # NaN counts as live: a non-finite factor stays visible
    k, nl = v.shape[1], int(live.sum())
    if nl > 0.75 * k:
        return _gram(u, v) if into is None else _add_widened(into, _gram(u, v, scratch), scratch)
    if into is not None:
        if nl:
            idx = live.nonzero().reshape(-1)
            ix, iy = idx.unsqueeze(1), idx.unsqueeze(0)
            into[ix, iy] = into[ix, iy] + _gram(u[:, idx], v[:, idx] if v is not u else None, scratch)
        return into
    out = torch.zeros(k, k, dtype=torch.promote_types(u.dtype, v.dtype), device=u.device)
    if nl:
        idx = live.nonzero().reshape(-1)
        out[idx.unsqueeze(1), idx.unsqueeze(0)] = _gram(u[:, idx], v[:, idx] if v is not u else None)
    return out


def _add_widened(into: Tensor, t: Tensor, scratch: Scratch | None = None) -> Tensor:
    """``into.add_(t)`` for a 2-D ``t`` of a narrower dtype (float32 products into a float64 sum):
    the same additions, with ``t`` widened by blocks of rows into a reused buffer (the
    in-place add widened all of ``t`` to a fresh ``[k, k]`` float64 copy, 34 MB per 2,049-wide
    factor and batch, each page mapped and zeroed by the kernel). Returns ``into``."""
    if scratch is None or t.dtype == into.dtype or t.dim() != 2:
        return into.add_(t)
    rows = max(1, WIDEN_BLOCK // max(1, t.shape[1]))
    for r0 in range(0, t.shape[0], rows):
        blk = scratch.get("widen", (min(rows, t.shape[0] - r0), t.shape[1]), into.dtype, into.device)
        into[r0: r0 + rows].add_(blk.copy_(t[r0: r0 + rows]))
    return into


# elements widened at once by _add_widened (512 KiB of float64)
WIDEN_BLOCK = 1 << 16


def _gram(u: Tensor, v: Tensor | None, scratch: Scratch | None = None) -> Tensor:
    """``u^T v`` ``[k, k]``; with ``v`` ``None`` or ``u`` itself, ``u^T u`` from the GEMMs of its
    block rows from the diagonal block rightwards (:data:`GRAM_BLOCKS` row blocks, ``(b + 1) / (2 b)``
    of the flops), the blocks below the diagonal mirrored: each entry the same dot product over
    the records as the whole GEMM's, equal to float rounding (measured bitwise equal with MKL at
    the 1e7 MLP's float32 shapes). ``scratch``: the result and the blocks are written to its
    reused buffers (:class:`Scratch`; valid until the next call with it), each GEMM into a
    contiguous buffer of its own shape: the same floats (MKL's result can depend on the output's
    row stride, so a block is not written straight into the result's rows)."""
    dt = torch.promote_types(u.dtype, u.dtype if v is None else v.dtype)

    def mm(a: Tensor, b: Tensor, key: str) -> Tensor:
        return a @ b if scratch is None else torch.mm(a, b, out=scratch.get(key, (a.shape[0], b.shape[1]), dt, a.device))

    if v is not None and v is not u:
        return mm(u.T, v, "gram")
    k = u.shape[1]
    if k < GRAM_BLOCK_MIN:
        return mm(u.T, u, "gram")
    out = (torch.empty(k, k, dtype=u.dtype, device=u.device) if scratch is None
           else scratch.get("gram", (k, k), u.dtype, u.device))
    e = [k * i // GRAM_BLOCKS for i in range(GRAM_BLOCKS + 1)]
    for r0, r1 in zip(e[:-1], e[1:]):
        blk = mm(u[:, r0:r1].T, u[:, r0:], "gram_block")
        out[r0:r1, r0:] = blk
        out[r1:, r0:r1] = blk[:, r1 - r0:].T
    return out


# records of the first batch on which FactoredProgram checks its factored gradient (_verify_first)
VERIFY_RECORDS = 64
# _gram's row blocks of a symmetric u^T u, and the width from which it splits (below: one GEMM)
GRAM_BLOCKS = 4
GRAM_BLOCK_MIN = 512


# the widest layer (fan-in + bias, or fan-out) whose Kronecker factors the diagonal estimator
# keeps for its sigma correction (kfac_variance_inflation): p^2 + out^2 floats of state and two
# eigendecompositions per layer; wider layers keep the uncorrected sigma (reported)
KFAC_MAX_WIDTH = 4096
# eigenvalues of A or G below this fraction of the largest are null directions of the factor
# (collinear inputs, dead units): the pseudo-inverse's 0 there, as the exact estimator's
KFAC_RCOND = 1e-10
# records per layer whose Kronecker factors are summed: the first max(KFAC_MIN_RECORDS,
# KFAC_RECORDS_PER_WIDTH x max(p, out)) seen (p = fan-in + bias). Their GEMMs cost p^2 + out^2 per
# record against the pass's ~6 p out flops, so over all records they would add a third or more to
# a square layer and ~p / 6 times a one-output layer's cost; capped, the cost stops growing with
# n. A subsample of m records reads the inverse's diagonal high by about m / (m - p - 1) against
# the population (Wishart), the full sample by n / (n - p - 1): kfac_subsample_scale rescales
KFAC_RECORDS_PER_WIDTH = 2
KFAC_MIN_RECORDS = 2048
# the Kronecker factors of the per-layer program's convolutions and Linear layers (kc32):
# "trace", the Gauss-Newton block's partial traces from the per-sample gradients of every direction
# (exact wherever the block is a Kronecker product, whatever the output gradients' spatial
# correlation); "kfc", Grosse & Martens' KFC (patches' and output gradients' second moments over
# positions: exact only where the output gradients are spatially uncorrelated; A/B benchmarks)
KFAC_CONV_FACTORS = "trace"
# the "trace" factors cost out p (p + out) multiply-adds per record and group (the per-sample
# gradient's outer products), up to ~8x a wide convolution's share of the pass: a layer's factors sum
# its first max(KFAC_TRACE_MIN_RECORDS, KFAC_TRACE_MAX_FLOPS / that) records (within dg30's cap), a
# fixed cost. Each record adds out rows to A and p to G (correlated within the record), so the
# records' Wishart rescaling (kfac_subsample_scale, which lowers the VIF) is not applied: a
# subsample's inverse reads high, the conservative side (a wider sigma)
KFAC_TRACE_MIN_RECORDS = 512
KFAC_TRACE_MAX_FLOPS = 2e10
# with decay, the sandwich's factor (kfac_variance_inflation(sandwich=True)) as it reads, below 1
# too: a weight whose data curvature is a small share of a few stiff directions spread over many
# weights has H_jj ~ lambda, and the diagonal sandwich V_jj / H_jj^2 then reads its stiff share
# over the decay's curvature, up to (lambda_k / lambda)^2 times the marginal variance (dg52: nu49's
# wide tanh MLP, 18-60x in sd). False: floored at 1 as the plain VIF (the path before dg52; A/B)
KFAC_SANDWICH_SHRINKS = True


def kfac_subsample_scale(m: int, n: int, p: int, q: int) -> float:
    """The factor on a VIF whose factors summed ``m`` of ``n`` records, to read the full sample's:
    ``[(m - p - 1) / m * n / (n - p - 1)] * [the same with q]`` (the Wishart mean of an inverse
    sample second moment, ``E[S^-1] = Sigma^-1 m / (m - p - 1)``, for each factor; exact for
    Gaussian rows, the leading order of the Marchenko-Pastur law otherwise); 1 where ``m >= n``."""
    if m >= n:
        return 1.0
    out = 1.0
    for k in (p, q):
        if k > 1 and m > k + 1 and n > k + 1:
            out *= (m - k - 1) / m * n / (n - k - 1)
    return out


def kfac_influence_subsample_scale(m: int, n: int, p: int, q: int) -> float:
    """The factor on ``psi = -H^-1 g`` whose factors summed ``m`` of ``n`` records, to read the full
    sample's: :func:`kfac_subsample_scale` (the first-order bias of each inverse, ``E[S^-1]``) times
    ``sqrt((1 + k / n) / (1 + k / m))`` per factor of size ``k > 1``: with ``S = Sigma^1/2 (I + E)
    Sigma^1/2`` the inverse's fluctuation adds ``E[(E^2)_jj] ~ k / m`` to the mean square of the
    vector it multiplies beyond the squared mean's (leading order, Gaussian rows; the full sample's
    own ``k / n`` is the in-sample value). Measured: OLS on independent inputs (``d = 64``, factors
    from 2,048 of 4,000 records) read the independent form +2.7% with no rescaling, +1.1% with the
    first-order one, +0.4% with this (all-record factors read the gradients' figures to the third
    digit; docs/validation.md, "The diagonal estimator's influences under K-FAC");
    1 where ``m >= n``."""
    if m >= n:
        return 1.0
    out = kfac_subsample_scale(m, n, p, q)
    for k in (p, q):
        if k > 1:
            out *= math.sqrt((1.0 + k / n) / (1.0 + k / m))
    return out


def kfac_variance_inflation(A: Tensor, G: Tensor, n: int, decay: Tensor | float = 0.0,
                            sandwich: bool = False) -> Tensor:
    """Per-weight variance inflation factors ``VIF_j = H_jj (H^-1)_jj`` ``[out, p]`` of a Linear
    layer's Kronecker-factored Hessian ``H = (A / n) (x) (G / n) + diag(lambda)`` (method.md
    section 4, "The diagonal sandwich and correlated weights").

    Args:
        A: ``[p, p]`` sum of the records' layer inputs' outer products (bias column last).
        G: ``[out, out]`` sum of ``L_i delta_i delta_i^T``.
        n: records summed.
        decay: the L2 coefficient, a float or ``[p]`` per input column (weight / bias).
        sandwich: with decay, the factor of the sandwich instead: ``[(K + lambda)^-1 K (K +
            lambda)^-1]_jj (K_jj + lambda_j)^2 / K_jj`` (``K`` the Kronecker product), the ratio of
            the marginal variance to the diagonal sandwich's ``V_jj / (K_jj + lambda_j)^2`` where the
            gradients' covariance ``V`` is proportional to ``K`` (not to ``K + lambda``: the decay is
            no data); without it ``VIF_j`` over-reads along directions of ``K`` whose eigenvalues are
            near ``lambda`` (1.4-2.0x the exact sigma on a pooled linear Conv1d at
            ``lambda = 1e-3``). The same as ``VIF_j`` without decay.

    Returns:
        ``[out, p]`` float64, entry ``[o, i]`` the factor of the weight ``(o, i)`` (bias: ``i = p - 1``),
        at least 1 (the correction only widens sigma; a pseudo-inverse along exact null
        directions can read below 1, which is not used), 1 where ``A_ii`` or ``G_oo`` is 0.

    The inverse's diagonal is exact for the factored model: with ``A / n = U S U^T`` and
    ``G / n = W T W^T``, ``(H^-1)_(o,i) = sum_ab U_ia^2 W_ob^2 / (s_a t_b + lambda)`` (uniform
    ``lambda``); a per-column ``lambda_i > 0`` is factored out as ``D (D^-1 A D^-1 (x) G + I) D``
    with ``D = diag(sqrt(lambda_i))`` (columns of 0 among positive ones take 1e-6 of the largest).
    Eigenvalues below :data:`KFAC_RCOND` of the largest are null directions (pseudo-inverse) when
    ``lambda = 0``.
    """
    f64 = torch.float64
    p, q = A.shape[0], G.shape[0]
    # a zero diagonal entry of a PSD factor is a zero row and column (a dead unit, an input never
    # active): the factor is block-diagonal with it, so everything below runs on the live blocks
    # (exact; a ReLU layer's dead units are ~90% of the 1e7 MLP's second layer: pf31), the
    # normalisation and symmetrisation too (es32: over the whole 4,096-wide G they were ~0.3 s),
    # and the dead entries take the factor 1
    ia = (A.diagonal().to(f64) / n > 0).nonzero().reshape(-1)
    ig = (G.diagonal().to(f64) / n > 0).nonzero().reshape(-1)
    vif = torch.ones(q, p, dtype=f64)
    if not (ia.numel() and ig.numel()):
        return vif
    lam = torch.as_tensor(decay, dtype=f64).expand(p).clone()
    uniform = bool((lam == lam[0]).all())
    if uniform:
        lam0, scale = float(lam[0]), torch.ones(p, dtype=f64)
    else:
        lam = torch.where(lam > 0, lam, 1e-6 * float(lam.max()))
        lam0, scale = 1.0, lam.rsqrt()
    lam_l, scale_l = lam[ia], scale[ia]
    if uniform and lam0 == 0.0:
        # no decay: the (pseudo-)inverse of a Kronecker product is the product of the factors'
        # (pseudo-)inverses, so VIF = VIF_G (x) VIF_A, one factor at a time: diag(R^-1) of its
        # correlation matrix by a Cholesky (p^3 / 3) where the factor is well conditioned, ~10x
        # less than an eigendecomposition; the factor's own pseudo-inverse by one where not (the
        # two eigendecompositions below reduce to these products at lambda = 0). Before es32 one
        # singular factor sent both to eigh: the 1e7 MLP's 2,049-wide A with its 380-live G.
        # one factor at a time, its Cholesky in place of its live block (es33: no [k, k] copies;
        # the rare pseudo-inverse forms the block again)
        va = _factor_vif(_live_block(A, ia, n), overwrite=True)
        va = _factor_pinv_vif(_live_block(A, ia, n)) if va is None else va
        vg = _factor_vif(_live_block(G, ig, n), overwrite=True)
        vg = _factor_pinv_vif(_live_block(G, ig, n)) if vg is None else vg
        v = vg.unsqueeze(1) * va.unsqueeze(0)  # [out_live, p_live]
    else:
        Gn, An = _live_block(G, ig, n), _live_block(A, ia, n)
        At = An if uniform else An * scale_l.unsqueeze(0) * scale_l.unsqueeze(1)
        s, U = torch.linalg.eigh(At)
        del At
        t, W = torch.linalg.eigh(Gn)
        s, t = s.clamp_min(0.0), t.clamp_min(0.0)
        # the [p_live, out_live] float64 arrays are formed in place, at most three alive at once
        # (a 4096-wide layer's are 134 MB each: the sigma correction's peak, mm32), with the same
        # operations and values as out of place
        M = s.unsqueeze(1) * t.unsqueeze(0)  # s_a t_b + lambda, inverted in place
        if sandwich and lam0 > 0:  # (den - lambda) / den^2: the sandwich (K + lambda)^-1 K (K + lambda)^-1
            den = M.add_(lam0)
            M = (den - lam0).div_(den.square())
            del den
        else:
            M.add_(lam0).reciprocal_()
        if lam0 == 0.0:  # pseudo-inverse: exact null directions of either factor carry no variance
            M[~(s > KFAC_RCOND * float(s.max().clamp_min(1e-300)))] = 0.0
            M[:, ~(t > KFAC_RCOND * float(t.max().clamp_min(1e-300)))] = 0.0
        v = U.square() @ M
        del M, U
        v = v @ W.square().T
        del W
        v.mul_(scale_l.square().unsqueeze(1))  # (H^-1)_jj  [p_live, out_live]
        h_diag = An.diagonal().unsqueeze(1) * Gn.diagonal().unsqueeze(0)
        if sandwich and lam0 > 0:  # (K_jj + lambda_j)^2 / K_jj [(K + lambda)^-1 K (K + lambda)^-1]_jj
            k_diag = h_diag.clone()
            h_diag.add_(lam_l.unsqueeze(1) if not uniform else lam0)
            v.mul_(h_diag.square_().div_(k_diag))
            del k_diag
        else:
            h_diag.add_(lam_l.unsqueeze(1) if not uniform else lam0)
            v.mul_(h_diag)  # VIF_j = H_jj (H^-1)_jj
        del h_diag
        v = v.T
    # a pseudo-inverse along exact null directions can read below 1 (not used): at least 1; the
    # sandwich's factor with decay is no VIF and reads below 1 where the decay dominates H_jj
    if not (sandwich and lam0 > 0 and KFAC_SANDWICH_SHRINKS):
        v.clamp_min_(1.0)
    v.masked_fill_(~torch.isfinite(v), 1.0)
    if ia.numel() == p and ig.numel() == q:
        return v.contiguous()
    vif[ig.unsqueeze(1), ia.unsqueeze(0)] = v
    return vif


def kfac_leverage_trace(A: Tensor, G: Tensor, n: int, decay: Tensor | float) -> float | None:
    """``tr((K + diag(lambda))^-1 K)`` of a layer's Kronecker-factored Gauss-Newton block
    ``K = (A / n) (x) (G / n)``: the layer's effective dimension under that model (method.md section 4,
    "Finite-sample (leverage) correction").

    Args:
        A: ``[p, p]`` the inputs' factor (bias column last); ``G``: ``[out, out]``; ``n``: records summed.
        decay: the L2 coefficient, a float or ``[p]`` per input column (a column of 0 among positive
            ones takes 1e-6 of the largest, as :func:`kfac_variance_inflation`).

    Returns:
        The trace (float, in ``[0, p out]``): ``sum_ab s_a t_b / (s_a t_b + 1)`` over the eigenvalues
        ``s`` of ``D^-1 (A / n) D^-1`` (``D = diag(sqrt(lambda))``) and ``t`` of ``G / n``; ``None``
        without decay (every live weight counts 1 there: the diagonal's own count).
    """
    f64 = torch.float64
    p = A.shape[0]
    lam = torch.as_tensor(decay, dtype=f64).expand(p).clone()
    if not bool((lam > 0).any()):
        return None
    lam = torch.where(lam > 0, lam, 1e-6 * float(lam.max()))
    ia = (A.diagonal().to(f64) / n > 0).nonzero().reshape(-1)
    ig = (G.diagonal().to(f64) / n > 0).nonzero().reshape(-1)
    if not (ia.numel() and ig.numel()):
        return 0.0
    sc = lam[ia].rsqrt()
    s = torch.linalg.eigvalsh(_live_block(A, ia, n) * sc.unsqueeze(0) * sc.unsqueeze(1)).clamp_min(0.0)
    t = torch.linalg.eigvalsh(_live_block(G, ig, n)).clamp_min(0.0)
    M = s.unsqueeze(1) * t.unsqueeze(0)
    return float((M / (M + 1.0)).sum())


def kfac_inverse_apply(A: Tensor, G: Tensor, n: int, Y: Tensor, decay: Tensor | float = 0.0) -> Tensor:
    """``H^-1 Y_r`` for each record's ``[out, p]`` matrix ``Y_r`` of a Linear layer's
    Kronecker-factored Hessian ``H = (A / n) (x) (G / n) + diag(lambda)``, i.e.
    ``X_r`` solving ``(G / n) X_r (A / n) + X_r diag(lambda) = Y_r`` (method.md section 4, "The
    diagonal sandwich and correlated weights": the influences ``psi = -H^-1 g``).

    Args:
        A: ``[p, p]`` sum of the records' layer inputs' outer products (bias column last).
        G: ``[out, out]`` sum of ``L_i delta_i delta_i^T``.
        n: records summed.
        Y: ``[R, out, p]`` float64, e.g. the records' centred gradients (bias gradient last column).
        decay: the L2 coefficient, a float or ``[p]`` per input column (weight / bias).

    Returns:
        ``[R, out, p]`` float64. With ``lambda = 0`` the pseudo-inverse of each factor on its
        correlation matrix (``D^-1 R^+ D^-1``, unit-free): eigenvalues below :data:`KFAC_RCOND` of
        the largest are null directions and get 0, as in :func:`kfac_variance_inflation` (whose
        ``(H^-1)_jj`` this applies). Cost ``2 R out p (out + p)`` flops (``4 R out p (out + p)`` with decay:
        the eigenbases) plus the two eigendecompositions.
    """
    f64 = torch.float64
    An, Gn = A.to(f64) / n, G.to(f64) / n
    An, Gn = (An + An.T) / 2, (Gn + Gn.T) / 2
    p = An.shape[0]
    lam = torch.as_tensor(decay, dtype=f64).expand(p).clone()
    if bool((lam == lam[0]).all()):
        lam0, scale = float(lam[0]), torch.ones(p, dtype=f64)
    else:  # per-column decay: H = (I (x) D)(G (x) D^-1 A D^-1 + I)(I (x) D), D = diag(sqrt(lambda))
        lam = torch.where(lam > 0, lam, 1e-6 * float(lam.max()))
        lam0, scale = 1.0, lam.rsqrt()
        An = An * scale.unsqueeze(0) * scale.unsqueeze(1)
    if lam0 == 0.0:
        # no decay: H^+ = (G/n)^+ (x) (A/n)^+, two GEMMs per record instead of four; each factor's
        # pseudo-inverse taken on its correlation matrix (Jacobi-scaled, as _factor_vif), so that
        # the cutoff does not depend on the units of the inputs (inputs on a 1e-5 scale beside a
        # bias: eigenvalues 1e-10 apart in parameter units, cut as null directions)
        def pinv(S: Tensor) -> Tensor:
            dg = S.diagonal()
            inv_sd = torch.where(dg > 0, dg.clamp_min(1e-300).rsqrt(), torch.zeros((), dtype=f64))
            e, V = torch.linalg.eigh(S * inv_sd.unsqueeze(0) * inv_sd.unsqueeze(1))
            keep = e > KFAC_RCOND * float(e.max().clamp_min(1e-300))
            Rp = (V * torch.where(keep, 1.0 / e.clamp_min(1e-300), torch.zeros((), dtype=f64))) @ V.T
            return Rp * inv_sd.unsqueeze(0) * inv_sd.unsqueeze(1)
        return pinv(Gn) @ Y.to(f64) @ pinv(An)
    s, U = torch.linalg.eigh(An)
    t, W = torch.linalg.eigh(Gn)
    s, t = s.clamp_min(0.0), t.clamp_min(0.0)
    Z = W.T @ (Y.to(f64) * scale) @ U
    return (W @ (Z / (t.unsqueeze(1) * s.unsqueeze(0) + lam0)) @ U.T) * scale


def _live_block(S: Tensor, idx: Tensor, n: int) -> Tensor:
    """``(S_l / n + (S_l / n)^T) / 2`` in float64, ``S_l = S[idx][:, idx]`` (the live block of a
    factor, symmetrised): the same operations with one ``[k, k]`` result and block temporaries
    instead of five ``[k, k]`` ones (each freshly mapped memory, ~0.1 s of page faults per
    2,048-wide factor), and no ``[k, p]`` row gather where a few rows of a wide factor are live."""
    blk = S if idx.numel() == S.shape[0] else S[idx.unsqueeze(1), idx.unsqueeze(0)]
    k = blk.shape[0]
    out = torch.empty(k, k, dtype=torch.float64)
    # by pairs of row blocks (I, J >= I): (S_IJ / n + (S_JI / n)^T) / 2, mirrored to J, I (the sum
    # is commutative: the same float both sides)
    e = list(range(0, k, SYMMETRISE_BLOCK)) + [k]
    for i0, i1 in zip(e[:-1], e[1:]):
        for j0, j1 in zip(e[:-1], e[1:]):
            if j0 < i0:
                continue
            t = blk[i0:i1, j0:j1].to(torch.float64) / n
            t.add_((blk[j0:j1, i0:i1].to(torch.float64) / n).T).div_(2)
            out[i0:i1, j0:j1] = t
            if j0 != i0:
                out[j0:j1, i0:i1] = t.T
    return out


# rows per block of _live_block's symmetrisation
SYMMETRISE_BLOCK = 256


def _factor_pinv_vif(S: Tensor) -> Tensor:
    """``S_ii (S^+)_ii`` ``[k]`` of a PSD factor by the eigendecomposition of its live block (1 on
    a zero diagonal): eigenvalues at or below :data:`KFAC_RCOND` of the largest are null
    directions, 0 in the pseudo-inverse (the factor of :func:`kfac_variance_inflation` at
    ``lambda = 0``, where the Cholesky route :func:`_factor_vif` does not hold)."""
    f64 = S.dtype
    d = S.diagonal()
    out = torch.ones_like(d)
    live = d > 0
    if not bool(live.any()):
        return out
    idx = live.nonzero().reshape(-1)
    e, U = torch.linalg.eigh(S[idx][:, idx])
    e = e.clamp_min(0.0)
    keep = e > KFAC_RCOND * float(e.max().clamp_min(1e-300))
    inv = torch.where(keep, 1.0 / torch.where(keep, e, torch.ones((), dtype=f64)), torch.zeros((), dtype=f64))
    out[idx] = d[idx] * (U.square() @ inv)
    return out


def _factor_vif(S: Tensor, overwrite: bool = False) -> Tensor | None:
    """``diag(R^-1)`` ``[k]`` of the correlation matrix of ``S`` by a Cholesky factorisation (1 on
    a zero diagonal: a dead unit, no curvature), or ``None`` where ``R`` is singular or within
    :data:`KFAC_RCOND` of it (its pivots), for the eigendecomposition's pseudo-inverse.
    ``overwrite``: ``S`` (float64, contiguous) may be overwritten (by ``R`` and its Cholesky
    factor: no ``[k, k]`` copies where every unit is live)."""
    d = S.diagonal().clone()
    live = d > 0
    out = torch.ones_like(d)
    if not bool(live.any()):
        return out
    idx = live.nonzero().reshape(-1)
    sd = d[idx].sqrt()
    # S / sd_i / sd_j (the same operations), in place where allowed; the Cholesky overwrites R
    if idx.numel() == d.numel() and overwrite:
        R = S.div_(sd.unsqueeze(0))
    else:
        R = (S if idx.numel() == d.numel() else S[idx.unsqueeze(1), idx.unsqueeze(0)]) / sd.unsqueeze(0)
    R.div_(sd.unsqueeze(1))
    r_max = float(R.diagonal().max())
    L, info = torch.linalg.cholesky_ex(R, out=(R, torch.empty((), dtype=torch.int32)))
    if int(info) != 0 or not float(L.diagonal().square().min()) > KFAC_RCOND * r_max * 1e3:
        return None
    out[idx] = _cholesky_inverse_diagonal(L)
    return out


def _cholesky_inverse_diagonal(L: Tensor) -> Tensor:
    """``diag((L L^T)^-1)`` ``[k]`` of a lower-triangular ``L`` ``[k, k]``: the squared column norms
    of ``L^-1``, whose columns ``j0:j1`` are zero above row ``j0``, so each block of
    :data:`INVERSE_DIAGONAL_BLOCK` columns is one triangular solve of ``L[j0:, j0:]``: ``k^3 / 3``
    flops (``torch.cholesky_inverse`` forms the whole inverse, ``2 k^3 / 3``; 0.41 -> 0.20 s
    over the 1e7 MLP's 1,025-, 2,048- and 2,049-wide factors, within 2.3e-15 relative of it)."""
    k = L.shape[0]
    out = torch.empty(k, dtype=L.dtype)
    w = min(INVERSE_DIAGONAL_BLOCK, k)
    # the identity's columns j0:j1 from row j0 on: the top rows of one [k, w] block
    E = torch.zeros(k, w, dtype=L.dtype)
    E.diagonal().fill_(1.0)
    X = torch.empty(k * w, dtype=L.dtype)
    for j0 in range(0, k, w):
        j1 = min(j0 + w, k)
        x = torch.linalg.solve_triangular(L[j0:, j0:], E[: k - j0, : j1 - j0], upper=False,
                                          out=X[: (k - j0) * (j1 - j0)].view(k - j0, j1 - j0))
        out[j0:j1] = x.square().sum(0)
    return out


# columns of L^-1 per triangular solve in _cholesky_inverse_diagonal
INVERSE_DIAGONAL_BLOCK = 256


COLUMN_BUDGET = 1 << 24  # floats per temporary in factored_power_sums
# factored_power_sums' GEMMs skip the output rows whose d is 0 on every record (their terms are
# exact zeros; pf31). False: every row, as before (tests and benchmarks compare the two).
SKIP_SILENT_ROWS = True
# ... and factored_power_sums' element-wise work (A / V_jj^(p/2), the a = 0 term, the scales) runs
# over the output rows with some weight of gradient variance only: a row without any (a unit dead
# on every record: 3,716 of the 1e7 MLP's 4,096 second-layer units) has scaled = 0, every term an
# exact zero (pf32). Not bitwise: the a = 0 term's float64 sum runs over fewer zeros (~1e-16).
SKIP_DEAD_ROWS = True
# ... and a weight's float32 power sums form S = A / V^(p/2) on the GEMMs' rows only, the a = 0
# term sum_j gb_j^p A_jm / V_j^(p/2) by one GEMV over A (_even_sums_on_rows; pw34: the [numel, M]
# temporaries of a 1e7 second-layer chunk, 3 of whose 128 rows reach the GEMMs, were ~60% of its
# call); the float64 calls take that term the same way. Not bitwise: that term's float64 sum in
# another order (~1e-16 of it). False: as before (A/B).
F32_ON_LIVE_ROWS = True
# gradient variance at or below which a weight has no influence in the factored sums (its square,
# the fourth power's divisor, is then still a normal float64)
V_NONE = 1e-150


def standardised_influence(g: Tensor, g_mean: Tensor, v: Tensor) -> Tensor:
    """``w = -(g - g_bar) / sqrt(V_jj)`` ``[b, numel]`` from per-sample gradients ``g``, 0 where
    ``V_jj <= V_NONE`` (no gradient variance, no influence: a constant gradient's rounding over a
    clamped variance read as a huge influence)."""
    w = -(g - g_mean) / v.clamp_min(V_NONE).sqrt()
    return torch.where(v > V_NONE, w, torch.zeros((), dtype=w.dtype))


# The powers whose sums take their GEMMs in float32 where the run-time bound of
# _even_power_sums_f32 allows it (empty: always float64; A/B benchmarks). POWER_SUMS_F32_RTOL:
# the largest relative error of any entry ``[r, m]`` the bound may admit before the call is
# recomputed in float64; POWER_SUMS_F32_LAMBDA: the probabilistic rounding bound's lambda
# (method.md section 3, "Power sums in float32").
POWER_SUMS_F32: frozenset[int] = frozenset({2, 4})
# The fourth powers' bound with the a = 2 term it computes (p47a): |T|_1 <= sqrt(T_2 G), |T|_2 = T_2,
# |T|_3 <= sqrt(T_4 T_2) (Cauchy-Schwarz, S >= 0) instead of Hoelder's T_4^(a/4) G^(1 - a/4) for every
# a, never larger (T_2 <= sqrt(T_4 G)); the 1e7 MLP's first layer: ~18 records a chunk whose bound
# failed (float64 again) now hold, the second layer's 130-190 -> 65-120. False: Hoelder's (A/B).
FOURTH_POWER_CS_BOUND = True
POWER_SUMS_F32_RTOL = 1e-4
POWER_SUMS_F32_LAMBDA = 8.0
# A method decision left to the lead (p49a; docs/benchmarks.md "p49a"), off = as before. The fourth-power
# sums feed the Gaussian form's diagnostics only (the Edgeworth clt_error_estimate and the effective
# number of coordinates, method.md section 3, "Gaussian form's diagnostics"), not a leakage, MIS or
# interval directly; the diagnostics choose the method (functional.resolve_method: the Gaussian form
# within its tolerance) and the "beyond its tolerance" note, so a figure within the tolerance of its
# threshold can decide otherwise. With the switch on their float32 entries are admitted within
# POWER_SUMS_F32_RTOL_FOURTH relative (the same run-time bound) instead of POWER_SUMS_F32_RTOL, so
# fewer records are summed again in float64 (the 1e7 MLP: its second layer's power-4 calls, ~1,040
# records a call).
WIDE_FOURTH_POWER_RTOL = False
POWER_SUMS_F32_RTOL_FOURTH = 1e-3
# Also a method decision (p49a), off = as before: the bound's eps counts, for the contraction over the
# outputs, the rows that contraction sums in float32 (the GEMMs' rows, SKIP_SILENT_ROWS / SKIP_DEAD_ROWS
# leave out exact-zero rows) instead of the whole layer's out: Higham and Mary's bound for the sum of
# the terms it actually adds, so still a bound of the same (probabilistic) kind, and tighter (the 1e7
# MLP's second layer: 3-11 of 128 rows, eps ~14% smaller); off: the whole layer's out, so that the
# same entries fall back with the silent rows skipped or not.
F32_BOUND_GEMM_ROWS = False


def _f32_rtol(power: int) -> float:
    """The relative tolerance of a power-``power`` float32 sum's run-time bound
    (:data:`WIDE_FOURTH_POWER_RTOL`)."""
    return POWER_SUMS_F32_RTOL_FOURTH if power == 4 and WIDE_FOURTH_POWER_RTOL else POWER_SUMS_F32_RTOL
# calls of factored_power_sums by (power, how they were summed) (tests, benchmarks)
POWER_SUMS_F32_COUNTS = {(p, k): 0 for p in (2, 4) for k in ("float32", "float64")}
_U32 = 2.0 ** -24  # float32 unit roundoff
_TINY32 = 2.0 ** -126  # smallest normal float32
# Bytes of one layer's input powers (x / 2^k)^a in float32 and x^a in float64 that a
# PowerCache holds; beyond it a power is recomputed per call, as before (pf30).
POWER_CACHE_BYTES = 1 << 28
# factored_power_sums' chunk-sized temporaries in buffers a layer's PowerCache holds from call to
# call (PowerCache.scratch; ps33); False: a new tensor per call, as before (A/B benchmarks).
HOLD_TEMPORARIES = True
# The float64 sums of signed columns (the draws' parts) take as GEMM columns the (row, column)
# pairs whose block of S has a non-zero element only, where at most PACK_FRACTION of them do
# (_nonzero_pairs; ps35). Not bitwise: each column's sum over the rows in another order (~1e-16
# relative). False: every pair, as before (A/B).
PACK_ZERO_BLOCKS = True
PACK_FRACTION = 0.75
# The float32 terms' GEMM over the inputs, where it has at most SKINNY_GEMM_COLUMNS columns
# (out * M: the second layer's few non-silent rows), is taken transposed, (x^a B)^T = B^T (x^a)^T
# with B^T contiguous, and the contraction over the outputs then reads [out, M, R] (ps36: MKL's
# SGEMM on this CPU ran [512, 2048] x [2048, 6] in 1.35 ms, its transpose in 0.40 ms; from ~200
# columns on the two are alike and the plain form keeps the first layer's wide GEMMs). The same
# float32 products summed in another order: within the same bound (method.md section 3), not
# bitwise (the 1e7 / 1e6 reports: clt_error_estimate 2.9e-7 / 7.2e-7 relative). The float64 sums (_binomial_sums_f64: the records
# that fall back, the draws' signed columns) likewise (DGEMM [512, 2048] x [2048, 20] 3.0 -> 1.4
# ms; ~1e-16). False: the plain GEMM everywhere, as before (A/B).
SKINNY_GEMM_TRANSPOSED = True
SKINNY_GEMM_COLUMNS = 128
# A chunk's power-2 and power-4 calls (the same factors, mean gradient and variances: one
# _InfluenceReader.sums call) share their setup through the layer's PowerCache (PowerCache.chunk_setup,
# p48b): the live and dead-row masks, the clamped variances and V^(p/2), gb^2, the silent rows, the
# layer's power-of-two scales, the gathered rows and the scaled d^a, gb^k in float32 are computed once
# per chunk instead of once per call (the 1e7 MLP's second layer: ~12 passes over its 2^18-weight
# chunks a call, half of them the same in both calls). The same operations on the same tensors:
# bitwise the same sums. False: every call computes its own, as before (A/B).
SHARED_CHUNK_SETUP = True
# Where every weight of a call has gradient variance above V_NONE, the clamped variances
# v.clamp_min(V_NONE) are v itself (the maximum of v and a smaller bound is v: the same floats), so
# the call reads v instead of a clamped copy (one pass over the chunk less; p51b). The caller's v is
# never written (the sums only divide by it). False: the clamped copy, as before (A/B).
UNCLAMPED_LIVE_VARIANCES = True
# _even_power_sums_f32's float32 operand S / 2^k written by one division into the GEMM's layout
# (torch.div of the float64 operands with a float32 out: the float64 quotient, rounded once as it
# is stored) instead of a float64 quotient in a chunk-sized held buffer, then a permuted cast copy:
# bitwise the same floats, one [numel, M] float64 buffer fewer per layer (p54b: 5.5 MiB of the
# 1e5 line's first call's fresh pages) and one pass less. False: the two steps, as before (A/B).
FUSED_S32 = True


class PowerCache:
    """The input side of one Linear layer's power sums, reused by every call on the same ``x``
    (the chunks, schemes and draws of a scoring pass read the same ``[R, in]`` inputs;
    their powers were ~40% of a call's GEMM time at the 1e7 MLP's widths): the exact scale
    ``2^k >= max |x|`` and ``(x / 2^k)^a`` in float32 (:func:`_even_power_sums_f32`), ``x^a`` in
    float64 (:func:`_binomial_sums_f64`). Entries are the same operations on the same tensor,
    so sums are bitwise those without the cache. Keyed by the tensor object and its version
    counter (an in-place change of ``x`` empties the cache); holds at most
    :data:`POWER_CACHE_BYTES` of powers. Hold one per layer for a pass, then drop it."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = POWER_CACHE_BYTES if budget is None else budget
        self._x: Tensor | None = None
        self._version = -1
        self._entries: dict[Any, Tensor] = {}
        self._bytes = 0
        self._scratch: dict[Any, Tensor] = {}
        self._setup_keys: tuple[Any, ...] = ()
        self._setup_stamp: tuple[Any, ...] = ()
        self._setup: dict[Any, Any] = {}
        self._held: dict[Any, Any] | None = None

    def _check(self, x: Tensor) -> None:
        version = tensor_version(x)  # None (an inference tensor): nothing kept across calls
        if self._x is not x or version is None or self._version != version:
            self._x, self._version, self._entries, self._bytes = x, version, {}, 0

    def _get(self, x: Tensor, key: Any, make: Callable[[], Tensor]) -> Tensor:
        self._check(x)
        got = self._entries.get(key)
        if got is None:
            got = make()
            size = got.numel() * got.element_size()
            if self._bytes + size <= self.budget or key == "sx":
                self._entries[key] = got
                self._bytes += size
        return got

    def scale(self, x: Tensor) -> Tensor:
        """``_pow2_scale(x, (0, 1))``."""
        return self._get(x, "sx", lambda: _pow2_scale(x, (0, 1)))

    def scaled_power32(self, x: Tensor, a: int) -> Tensor:
        """``(x / scale(x)).pow(a).to(float32)`` ``[R, in]``."""
        return self._get(x, ("f32", a), lambda: (x / self.scale(x)).pow(a).to(torch.float32))

    def power64(self, x: Tensor, a: int) -> Tensor:
        """``x.pow(a)`` ``[R, in]`` (``x`` itself at ``a = 1``: the same values)."""
        return x if a == 1 else self._get(x, ("f64", a), lambda: x.pow(a))

    def scratch(self, slot: Any, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised contiguous tensor of ``shape`` for one temporary of a call, the same
        memory on every call that asks for ``slot`` (grown when too small), where the cache has a
        budget (else a new tensor). Why: the chunk-sized ``[numel, M]`` temporaries of
        :func:`factored_power_sums` (tens of MB) came back from the allocator as fresh pages on
        most calls, and the page faults cost more than the arithmetic (``A / V^(p/2)``
        6.8 ms against 1.9 ms in a held buffer, a 2^18-weight chunk of 13 columns). The caller
        must not keep the tensor beyond the call (the next call overwrites it). At most one
        buffer per slot: a few chunk-sized tensors per layer, dropped with the cache."""
        n = math.prod(shape)
        if self.budget <= 0 or not HOLD_TEMPORARIES:
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self._scratch.get(slot)
        if buf is None or buf.dtype != dtype or buf.device != torch.device(device) or buf.numel() < n:
            buf = self._scratch[slot] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


    def chunk_setup(self, *keys: Any) -> dict[Any, Any]:
        """The dictionary in which :func:`factored_power_sums` keeps what one chunk's calls share
        (:data:`SHARED_CHUNK_SETUP`): the same dictionary while every tensor of ``keys`` is the same
        object at the same version and every other key equal, else a new empty one (the previous
        chunk's entries dropped: at most one chunk's setup is held). Empty and not held where the
        cache has no budget or the switch is off. The entries are values derived from ``keys`` alone,
        so a call that finds one computes nothing differently."""
        if self.budget <= 0 or not SHARED_CHUNK_SETUP:
            return {}
        if self._held is not None:  # (the caller vouches that it belongs to these keys: hold_setup)
            return self._held
        stamp = tuple(tensor_version(k) if isinstance(k, Tensor) else None for k in keys)
        old = self._setup_keys
        fresh = any(isinstance(k, Tensor) and v is None for k, v in zip(keys, stamp))  # an inference tensor
        if (not fresh and len(old) == len(keys) and self._setup_stamp == stamp
                and all(a is b if isinstance(b, Tensor) else (not isinstance(a, Tensor) and a == b)
                        for a, b in zip(old, keys))):
            return self._setup
        self._setup_keys, self._setup_stamp, self._setup = keys, stamp, {}
        return self._setup

    def hold_setup(self, memo: dict[Any, Any] | None) -> None:
        """Make :meth:`chunk_setup` return ``memo`` (``None``: its own, as before) until the next
        call of this method: a chunk's setup held by the caller beyond this cache's life (the
        scoring's :data:`assess.HOLD_CHUNK_SETUP`, one per chunk and estimate). The caller must
        pass only the memo of the calls' ``d``, mean gradient and variances (the same values, not
        necessarily the same tensors) under the same settings: the entries are read as they are."""
        self._held = memo


def _no_cache() -> PowerCache:
    return PowerCache(budget=0)


def _memo(memo: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``memo[key]``, made by ``make()`` on first use (:meth:`PowerCache.chunk_setup`)."""
    if key in memo:
        return memo[key]
    got = memo[key] = make()
    return got



def _pow2_scale(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Powers of two ``>= max |t|`` over ``dims`` (1 where that is 0): exact float scalings that
    bring ``t`` into ``[-1, 1]`` without changing its entries' relative rounding. A 3-d ``t``
    (the power sums' ``S``) is non-negative: its maximum without ``abs``."""
    m = t.abs().amax(dim=dims, keepdim=True) if t.dim() < 3 else _leading_max(t, dims)  # S >= 0
    e = torch.frexp(torch.where(m > 0, m, torch.ones((), dtype=m.dtype)))[1]
    return torch.ldexp(torch.ones((), dtype=t.dtype), e.to(t.dtype))


def _leading_max(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t.amax(dim=dims, keepdim=True)`` for a contiguous 3-d ``t`` and ``dims = (0, 1)``: the
    maximum over the leading ``out * in`` rows of each of the ``M`` columns, taken over
    ``[rows / k, k * M]`` blocks then the ``k`` partial maxima (the maximum is exact in any order,
    so the same values; a reduction over the leading dimension of ``[out * in, M]`` with few
    columns ran ~6x slower: 10.4 -> 1.8 ms a 2^18-weight chunk of 13 columns)."""
    if dims != (0, 1) or t.dim() != 3 or not t.is_contiguous() or t.numel() == 0:
        return t.amax(dim=dims, keepdim=True)
    rows, M = t.shape[0] * t.shape[1], t.shape[2]
    k = 64
    while rows % k:
        k //= 2
    return t.view(rows // k, k * M).amax(0).view(k, M).amax(0).view(1, 1, M)


def _even_power_sums_f32(fac: LinearFactors, gb: Tensor, S: Tensor, g0: Tensor, power: int,
                         rtol: float, cache: PowerCache | None = None,
                         keep: Tensor | None = None, layer: tuple[int, Tensor, Tensor] | None = None,
                         row_weights: tuple[Tensor, Tensor] | None = None,
                         memo: dict[Any, Any] | None = None,
                         ) -> tuple[Tensor, Tensor]:
    """``sum_oi (d_ro x_ri - gb_oi)^p S_oim`` ``[R, M]`` (``p`` even) with the binomial terms' GEMMs
    in float32, and ``[R, M]`` the entries where the run-time error bound exceeds ``rtol`` relative,
    or that are not finite (the caller sums those in float64).
    ``S [out, in, M] >= 0``; ``g0 [M]`` is the float64 term ``sum_oi gb_oi^p S_oim``.

    The bound (method.md section 3, "Power sums in float32"): the sum is
    ``sum_a C(p, a) (-1)^(p-a) T_a`` with ``T_a = sum_oi (d x)^a gb^(p-a) S`` (``T_0 = G`` in float64).
    Each T_a in float32 (inputs rounded, a GEMM over ``in``, a contraction over ``out``) is within
    ``eps |T|_a``, ``|T|_a`` the same sum of absolute values, ``eps = (lambda (sqrt(in) + sqrt(out))
    + 6) u`` (Higham and Mary's probabilistic bound for the two sums, failing with probability at
    most ``2 (in + out) exp(-lambda^2 / 2)`` per entry, ~1e-10 at lambda 8; the worst case
    ``(in + out + 6) u`` is 3-7x looser at the 1e6-1e7 MLPs' widths), plus ``8 in out 2^-126`` per term for
    underflow in the scaled inputs. With ``S >= 0``, Hoelder's inequality gives
    ``|T|_a <= T_p^(a/p) G^((p-a)/p)``, so the entry's error is at most
    ``eps ((T_p^(1/p) + G^(1/p))^p - G) + U`` and its relative error that over the (non-negative)
    sum. Cancellation (``|gb|`` large against the spread of ``d x``) shows as that bound large
    against the sum.

    ``keep``: the output rows whose ``d`` is non-zero on some record (:data:`SKIP_SILENT_ROWS`);
    the terms ``a >= 1`` are summed over those rows only (the others' are exact zeros), the scales
    and the bound (its ``out``) are those of the whole ``S`` (the same ``eps``, so the same entries
    fall back to float64; :data:`F32_BOUND_GEMM_ROWS`: the bound's ``out`` the rows summed).

    ``layer``: ``(out, d's scale, gb's scale)`` of the whole layer where ``fac.d``, ``gb`` and ``S``
    hold some of its output rows only (:data:`SKIP_DEAD_ROWS`: the others' ``S`` is 0): the bound's
    ``out`` and the power-of-two scales are the layer's, as without the restriction (the bound's
    ``out`` the rows summed with :data:`F32_BOUND_GEMM_ROWS`).

    ``row_weights``: ``(src [K] int64, W [out, K] float64 >= 0)`` (rows as ``S``'s before ``keep``):
    ``K`` more sums, column ``M + k`` that of the column ``S[:, :, src_k] * W[:, k, None]``, from
    the GEMM over ``in`` of column ``src_k`` (:func:`factored_power_sums`); ``g0 [M + K]``. Their
    contraction over the outputs is a float32 GEMM ``(d^a t_m) W`` (``W`` rounded to float32 and
    one more product: two roundings more in ``eps``, underflow ``10 in out 2^-126`` per term).

    ``memo``: the chunk's shared setup (:meth:`PowerCache.chunk_setup`, from :func:`_even_sums_on_rows`
    only, whose ``d``, ``gb`` and ``keep`` are the same for every call of the chunk): the scaled
    ``d^a`` and ``gb^k`` in float32 computed once for the chunk's calls."""
    out_f, in_f = S.shape[0], S.shape[1]
    x, d = fac.x, fac.d
    # powers of two (exact rescalings): x, d and gb into [-1, 1], S per column into [0, 1]
    cache = cache or _no_cache()
    memo = {} if memo is None or keep is not None else memo
    if layer is not None and SHARED_CHUNK_SETUP:  # (the layer's scales: the rows' own are not read)
        sx, (out_f, sd, sg) = cache.scale(x), layer
    else:
        sx, sd, sg = cache.scale(x), _pow2_scale(d, (0, 1)), _pow2_scale(gb, (0, 1))
        if layer is not None:
            out_f, sd, sg = layer
    sS = _pow2_scale(S, (0, 1))  # [1, 1, M]; S >= 0
    Wr = None if row_weights is None or row_weights[0].numel() == 0 else row_weights[1]
    if keep is not None:  # after the scales: a silent row's gb and S still set them
        d, S, gb = d[:, keep], S[keep], gb[keep]
        Wr = None if Wr is None else Wr[keep]
    rows, M, R = S.shape[0], S.shape[-1], d.shape[0]
    src: list[int] = [] if Wr is None or row_weights is None else [int(m) for m in row_weights[0].tolist()]
    K = len(src)
    if Wr is not None:  # W into [0, 1] per column by powers of two (exact); float32 for its GEMM
        sW = _pow2_scale(Wr, (0,)) if Wr.numel() else torch.ones(1, K, dtype=torch.float64)
        W32 = (Wr / sW).to(torch.float32)
        by_src: dict[int, list[int]] = {}
        for k, m in enumerate(src):
            by_src.setdefault(m, []).append(k)
    skinny = SKINNY_GEMM_TRANSPOSED and rows * M <= SKINNY_GEMM_COLUMNS
    # the GEMM's operand without a copy per term: [in, out, M] (x^a @ [in, out * M]), or skinny
    # [out, M, in] ([out * M, in] @ (x^a)^T: the transposed product, SKINNY_GEMM_TRANSPOSED)
    layout = (rows, M, in_f) if skinny else (in_f, rows, M)
    perm = (0, 2, 1) if skinny else (1, 0, 2)
    if FUSED_S32:  # the float64 quotient rounded to float32 as it is written (no float64 temporary)
        S32 = torch.div(S.permute(*perm), sS.permute(*perm), out=cache.scratch("S32", layout, torch.float32, S.device))
    else:
        S32 = cache.scratch("S32", layout, torch.float32, S.device).copy_(
            torch.div(S, sS, out=cache.scratch("prod", S.shape, torch.result_type(S, sS), S.device)).permute(*perm))
    # [R, out], [out, in] (at first use: a held setup has their float32 powers, assess.HOLD_CHUNK_SETUP)
    def ds() -> Tensor:
        return _memo(memo, "ds", lambda: d / sd)

    def gs() -> Tensor:
        return _memo(memo, "gs", lambda: gb / sg)

    # (F32_BOUND_GEMM_ROWS: the contraction over the outputs adds the GEMMs' rows alone)
    eps = (POWER_SUMS_F32_LAMBDA * (math.sqrt(in_f) + math.sqrt(rows if F32_BOUND_GEMM_ROWS else out_f)) + 6.0) * _U32
    under = 8.0 * in_f * out_f * _TINY32 * sS.reshape(1, -1)
    col_scale = sS.reshape(1, -1)
    if K:  # the row-weighted columns: S's scale times W's, two roundings more
        col_scale = torch.cat([col_scale, sS.reshape(-1)[src].reshape(1, -1) * sW], 1)
        under = torch.cat([under, 10.0 * in_f * out_f * _TINY32 * col_scale[:, M:]], 1)
        eps = torch.tensor([eps] * M + [eps + 2.0 * _U32] * K, dtype=torch.float64).reshape(1, -1)
    total = g0.unsqueeze(0).expand(R, -1).clone()
    u_sum = torch.zeros_like(total)
    tp = t2 = total
    for a in range(1, power + 1):
        coef = math.comb(power, a) * (-1) ** (power - a)
        # one more rounding where a power of gb multiplies S (counted in eps's six)
        B = S32
        if power - a:  # (gb^1 is read by both powers' calls: held; the others are one call's)
            g = (_memo(memo, "gs32", lambda: gs().to(torch.float32)) if power - a == 1
                 else gs().pow(power - a).to(torch.float32))
            B = torch.mul(S32, g.unsqueeze(1) if skinny else g.T.unsqueeze(-1),
                          out=cache.scratch("B32", S32.shape, torch.float32, S.device))
        if skinny:  # sum_o d_ro^a (B^T (x^a)^T)_(o, m), r: [out, M, R] summed over out
            t = torch.mm(B.view(rows * M, in_f), cache.scaled_power32(x, a).T,
                         out=cache.scratch("t32", (rows * M, R), torch.float32, S.device)).view(rows, M, R)
            t = torch.mul(t, (_memo(memo, ("dsT32", a), lambda a=a: ds().T.pow(a).to(torch.float32)) if a <= 2
                                else ds().T.pow(a).to(torch.float32)).unsqueeze(1),
                          out=cache.scratch("dt32", (rows, M, R), torch.float32, S.device))
            ta = t.sum(0).T.to(torch.float64, memory_format=torch.contiguous_format)
            if K:  # sum_o (d^a t)_(o, m, r) W_ok: [K_m, out] @ [out, R] per source column
                tw = torch.empty(R, K, dtype=torch.float64)
                for m, ks in by_src.items():
                    tw[:, ks] = torch.mm(W32[:, ks].T, t[:, m, :]).T.to(torch.float64)
                ta = torch.cat([ta, tw], 1)
        else:
            t = torch.einsum("ri,iom->rom", cache.scaled_power32(x, a), B)
            da = (_memo(memo, ("ds32", a), lambda a=a: ds().pow(a).to(torch.float32)) if a <= 2
                  else ds().pow(a).to(torch.float32))
            ta = torch.einsum("ro,rom->rm", da, t).to(torch.float64)
            if K:  # sum_o d_ro^a t_rom W_ok: [R, out] @ [out, K_m] per source column
                tw = torch.empty(R, K, dtype=torch.float64)
                for m, ks in by_src.items():
                    tw[:, ks] = torch.mm(t[:, :, m] * da, W32[:, ks]).to(torch.float64)
                ta = torch.cat([ta, tw], 1)
        scale = sg.pow(power - a) * (sx * sd).pow(a)
        ta = ta * (col_scale * scale)
        total = total + coef * ta
        u_sum = u_sum + math.comb(power, a) * under * scale
        tp = ta
        if a == 2:
            t2 = ta
    tpp = tp.clamp_min(0.0) * (1.0 + eps)  # the float32 T_p is itself within eps of T_p
    gp = g0.clamp_min(0.0).unsqueeze(0)
    if power == 4 and FOURTH_POWER_CS_BOUND:
        # |T|_2 = T_2 and |T|_4 = T_4 (non-negative terms); |T|_1 <= sqrt(T_2 G), |T|_3 <= sqrt(T_4 T_2)
        # (Cauchy-Schwarz over the weights S >= 0), each at most Hoelder's term (T_2 <= sqrt(T_4 G))
        t2p = t2.clamp_min(0.0) * (1.0 + eps)
        err = eps * (tpp + 4.0 * (tpp * t2p).sqrt() + 6.0 * t2p + 4.0 * (t2p * gp).sqrt()) + u_sum
    else:
        err = eps * ((tpp.pow(1.0 / power) + gp.pow(1.0 / power)).pow(power) - gp).clamp_min(0.0) + u_sum
    ok = torch.isfinite(total) & (err * (1.0 + rtol) <= rtol * total.clamp_min(0.0))
    if K and Wr is not None:  # a row-weighted column of zero weights: exact zeros (each product 0)
        ok[:, M:] |= (Wr == 0).all(0)
    return total, ~ok


def _with_row_weights(A: Tensor, row_weights: tuple[Tensor, Tensor], in_f: int) -> Tensor:
    """``[numel, M + K]``: ``A`` and its row-weighted columns ``A[:, src_k] * W[o(j), k]`` (the
    rows ``o`` of ``in_f`` elements), materialized (what :func:`factored_power_sums`' ``row_weights``
    stand for)."""
    src, W = row_weights
    return torch.cat([A, A[:, src] * W.repeat_interleave(in_f, 0)], 1)


@full_float32  # (its float32 GEMMs' run-time bound is IEEE float32's, not bf16's / TF32's)
def factored_power_sums(
    fac: LinearFactors, g_mean: Tensor, v_diag: Tensor, A: Tensor, power: int, bias: bool = False,
    cache: PowerCache | None = None, row_weights: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``[R, M]`` sums ``sum_j w_rj^power A_jm`` for one parameter of a Linear layer.

    ``w_rj = -(g_rj - gbar_j) / sqrt(V_jj)`` with ``g_r = d_r x_r^T`` (weight) or ``d_r`` (bias);
    ``A [numel, M]`` holds M coefficient columns (kappa, bootstrap kappas, ...). The power of
    the centred gradient is expanded binomially so that only products of ``[R, out]``,
    ``[R, in]`` and ``[out, in, M]`` tensors appear.

    A weight's power-2 and power-4 sums with ``A >= 0`` take their GEMMs in float32 (the powers
    in :data:`POWER_SUMS_F32`) where a bound computed at run time holds every entry within
    :data:`POWER_SUMS_F32_RTOL` relative, else float64 (method.md section 3, "Power sums in
    float32"; :func:`_even_power_sums_f32`); a bias's sums are float64. ``cache``: the layer's
    :class:`PowerCache` where the caller makes several calls on the same factors (bitwise the
    same sums).

    ``row_weights``: ``(src [K] int64, W [out, K] float64)``, ``W >= 0`` finite (a weight's sums
    only): ``K`` more columns, ``[R, M + K]`` in all, column ``M + k`` the sums of
    ``A[:, src_k] * W[o, k]`` (``o`` the element's output row; :func:`_with_row_weights`). On the
    float32 path they share the GEMM over the inputs with column ``src_k`` and differ only in the
    contraction over the outputs (the unit-kappa chunks' deficits, ``assess.UNIT_KAPPA_EXACT``:
    one column ``sigma^-3`` for every per-row scheme, its ``C3`` per row in ``W``), each entry
    within the same run-time bound (two roundings more) or summed in float64; elsewhere the
    columns are materialized.
    """
    out_f, in_f = fac.d.shape[1], fac.x.shape[1]
    M = A.shape[1]
    # Columns in groups: the [out, in, cols] and [R, out, cols] temporaries stay near
    # COLUMN_BUDGET floats whatever the number of columns (schemes x bootstrap draws).
    cols = max(1, COLUMN_BUDGET // max(A.shape[0], fac.d.shape[0] * out_f, 1))
    if row_weights is not None and row_weights[0].numel() == 0:
        row_weights = None
    nonneg: tuple[Tensor, bool] | None = None  # (A, A >= 0 everywhere): read once per A
    if row_weights is not None and (bias or not F32_ON_LIVE_ROWS or power not in POWER_SUMS_F32
                                    or fac.x.dtype != torch.float64 or M + row_weights[0].numel() > cols
                                    or not (A.numel() and (nonneg := (A, bool(A.amin() >= 0)))[1])
                                    or not bool((row_weights[1] >= 0).all())):
        # (the float32 path's shared GEMM only: elsewhere the same sums of materialized columns)
        A, row_weights = _with_row_weights(A, row_weights, in_f), None
        M = A.shape[1]
    if M > cols:
        return torch.cat([factored_power_sums(fac, g_mean, v_diag, A[:, c : c + cols], power, bias, cache)
                          for c in range(0, M, cols)], dim=1)
    # A weight without gradient variance has no influence (w_j = 0, the estimate's convention):
    # dividing by a clamped V_jj gave 0 * 1e300 at power 2 but 0 / 0 = NaN at power 4, where
    # (1e-300)^2 underflows (mo26: every scheme's Edgeworth estimate NaN at 1e7 weights, with
    # dead ReLU units). V_jj up to 1e-150 counts as none: its power stays finite above it.
    # what this chunk's other calls (the other power, other column groups) share (SHARED_CHUNK_SETUP)
    memo = {} if cache is None else cache.chunk_setup(fac.d, g_mean, v_diag, in_f, bias, SKIP_DEAD_ROWS, SKIP_SILENT_ROWS,
                                                      F32_ON_LIVE_ROWS)
    live = _memo(memo, "live", lambda: v_diag > V_NONE)
    layer = None
    if SKIP_DEAD_ROWS and not bias and not _memo(memo, "every", lambda: bool(live.all())):
        dead = _memo(memo, "dead", lambda: _dead_rows(fac, g_mean, v_diag, live, out_f, in_f))
        if dead is not None:
            # only the rows with a live weight (a dead row's scaled is 0: exact-zero terms); the
            # bound's out and the power-of-two scales of d and gb stay the layer's
            ri, layer, d_r, g_mean, v_diag, live = dead
            if ri.numel() == 0:  # every weight without influence
                return torch.zeros(fac.d.shape[0], M, dtype=torch.float64, device=A.device)
            fac = LinearFactors(module=fac.module, weight=fac.weight, bias=fac.bias, x=fac.x, d=d_r)
            A = A.reshape(out_f, in_f, M)[ri].reshape(-1, M)
            if row_weights is not None:
                row_weights = (row_weights[0], row_weights[1][ri])
            out_f = ri.numel()
    cache = cache or _no_cache()
    vp = _variance_power(_memo(memo, "vclamp", lambda: _clamped_variances(v_diag, live, memo)), power).unsqueeze(-1)
    if (F32_ON_LIVE_ROWS and not bias and power in POWER_SUMS_F32 and fac.x.dtype == torch.float64
            and A.numel() and (nonneg[1] if nonneg is not None and nonneg[0] is A else bool(A.amin() >= 0))):
        return _even_sums_on_rows(fac, g_mean, A, vp, live, power, out_f, in_f, layer, cache, row_weights, memo)
    assert row_weights is None  # (materialized above where the path below would take them)
    scaled = torch.div(A, vp, out=cache.scratch("scaled", tuple(A.shape), torch.result_type(A, vp), A.device))  # [numel, M]
    if not bool(live.all()):  # torch.where(live, scaled, 0) on the dead rows alone (bitwise)
        scaled[~live] = 0.0
    if bias:
        c = (fac.d - g_mean).pow(power)  # [R, out]
        return c @ scaled
    S = scaled.reshape(out_f, in_f, M)
    gb = g_mean.reshape(out_f, in_f)
    keep = None
    if SKIP_SILENT_ROWS:
        # Output units whose loss gradient is 0 on every record (ReLU units off for all of them:
        # 91% of the 1e7 benchmark MLP's second layer, pf31): their terms d^a x^a gb^(p-a) S,
        # a >= 1, are exact zeros, so the GEMMs skip those rows; the a = 0 term keeps the whole S
        # (their gb, the mean over every record, need not be 0).
        on = fac.d.ne(0).any(0)
        if not bool(on.all()):
            keep = on.nonzero().reshape(-1)
    # (A >= 0 over the live rows: a dead row's S is 0, which is all the bound needs of it; the
    # least entry, NaN if any is, is what (A >= 0).all() decides without a [numel, M] mask)
    if power in POWER_SUMS_F32 and fac.x.dtype == torch.float64 and (A.numel() == 0 or bool(A.amin() >= 0)):
        gp = gb.pow(power).unsqueeze(-1)
        g0 = torch.mul(S, gp, out=cache.scratch("prod", tuple(S.shape), torch.result_type(S, gp), S.device)).sum((0, 1))
        got, bad = _even_power_sums_f32(fac, gb, S, g0, power, _f32_rtol(power), cache, keep, layer)
        bad_rows = bad.any(1)
        nbad = int(bad_rows.sum())
        POWER_SUMS_F32_COUNTS[(power, "float32")] += got.shape[0] - nbad
        POWER_SUMS_F32_COUNTS[(power, "float64")] += nbad
        if nbad:  # the records whose bound failed, in float64; only the failing entries replaced,
            # so that an entry's value depends on its own column alone (equal columns summed once
            # or apart give the same figures)
            rows = bad_rows.nonzero().reshape(-1)
            part = LinearFactors(module=fac.module, weight=fac.weight, bias=fac.bias, x=fac.x[rows], d=fac.d[rows])
            got[rows] = torch.where(bad[rows], _binomial_sums_f64(part, gb, S, power, keep=keep, g0=g0), got[rows])
        return got
    # (the a = 0 term as the float32 calls sum it, so that their records that fall back are these sums)
    g0 = _zeroth_term(g_mean, A, vp, live, power, bool(live.all())) if F32_ON_LIVE_ROWS else None
    return _binomial_sums_f64(fac, gb, S, power, cache, keep, g0=g0, pack=PACK_ZERO_BLOCKS)


def _clamped_variances(v_diag: Tensor, live: Tensor, memo: dict[Any, Any]) -> Tensor:
    """``v_diag.clamp_min(V_NONE)``: ``v_diag`` itself where every weight is live (``live = v_diag >
    V_NONE`` everywhere: the same floats, no copy; :data:`UNCLAMPED_LIVE_VARIANCES`)."""
    if UNCLAMPED_LIVE_VARIANCES and _memo(memo, "every", lambda: bool(live.all())):
        return v_diag
    return v_diag.clamp_min(V_NONE)


def _variance_power(vc: Tensor, power: int) -> Tensor:
    """``vc^(p/2)`` (``vc`` the clamped variances): ``vc`` itself at ``p = 2`` where
    :data:`SHARED_CHUNK_SETUP` (``pow(1.0)`` is a copy of the same values)."""
    return vc if power == 2 and SHARED_CHUNK_SETUP else vc.pow(power / 2)


def _dead_rows(fac: LinearFactors, g_mean: Tensor, v_diag: Tensor, live: Tensor, out_f: int, in_f: int,
               ) -> tuple[Tensor, tuple[int, Tensor, Tensor], Tensor, Tensor, Tensor, Tensor] | None:
    """:data:`SKIP_DEAD_ROWS`: ``None`` where every output row has a live weight, else ``(ri, layer,
    d, g_mean, v_diag, live)`` on the rows ``ri`` that have one (``layer``: the whole layer's ``out``
    and power-of-two scales of ``d`` and ``gb``)."""
    rows = live.reshape(out_f, in_f).any(1)
    if bool(rows.all()):
        return None
    ri = rows.nonzero().reshape(-1)
    layer = (out_f, _pow2_scale(fac.d, (0, 1)), _pow2_scale(g_mean.reshape(out_f, in_f), (0, 1)))
    v_r = v_diag.reshape(out_f, in_f)[ri].reshape(-1)
    return ri, layer, fac.d[:, ri], g_mean.reshape(out_f, in_f)[ri].reshape(-1), v_r, v_r > V_NONE


# The a = 0 term of columns stored one after another (assess.COLUMN_MAJOR_STACK) as one GEMV over
# their contiguous [M, numel] transpose (p47a: a [1, numel] x [numel, 1] product per column ran at ~1 ms
# for 2^18 elements, 9 columns 9.1 against 1.8 ms, ~0.2 s of a 1e7 call in the second layer's 32
# chunks). Not bitwise the row-major GEMV's sums: each column's non-negative float64 sum in another
# order (within (numel + 2) u relative either way; ~1e-14 measured on 2^18 random terms). False: one
# GEMV per column, bitwise the row-major layout's (ps37; A/B).
ZEROTH_TERM_GEMV = True


def _zeroth_term(g_mean: Tensor, A: Tensor, vp: Tensor, live: Tensor, power: int, every: bool,
                 memo: dict[Any, Any] | None = None) -> Tensor:
    """``[M]`` the binomial expansion's ``a = 0`` term ``sum_j gb_j^p A_jm / V_j^(p/2)`` over the live
    weights (``vp [numel, 1] = V^(p/2)``), one GEMV over ``A`` (:data:`F32_ON_LIVE_ROWS`); where that
    is not finite (an infinite ``A`` where a dead weight's 0 multiplied it), the product form of
    before, whose dead weights are exact zeros. ``memo``: the chunk's shared setup
    (:meth:`PowerCache.chunk_setup`; the coefficients ``gb^p / V^(p/2)`` are the same for every call
    of the chunk with this power)."""
    c = _zeroth_coefficients(g_mean, vp, live, power, every, memo)
    if ZEROTH_TERM_GEMV and A.shape[1] > 1 and A.stride(0) == 1 and A.stride(1) == A.shape[0]:
        # columns stored one after another (assess.COLUMN_MAJOR_STACK): one GEMV over the contiguous
        # [M, numel] transpose (ZEROTH_TERM_GEMV)
        g0 = torch.mv(A.T, c)
    elif A.shape[1] and A.stride(0) == 1 and A.stride(1) != 1:
        # columns stored one after another (assess.COLUMN_MAJOR_STACK): a GEMV per column, each
        # [numel, 1] with unit strides, which sums a column as the GEMV over a row-major
        # [numel, M] does (bitwise, tests/test_factored_sums.py; one GEMV over the transposed
        # [M, numel], a dot product per column or a [numel, 1] view with strides (1, numel), even
        # for M = 1, round otherwise)
        g0 = torch.cat([c @ A[:, m].unsqueeze(1) for m in range(A.shape[1])])
    else:
        g0 = c @ A
    if not bool(torch.isfinite(g0).all()):
        A = A.contiguous()  # (the reduction over the rows in the row-major order, whatever the layout)
        S = torch.where(live.unsqueeze(-1), A / vp, torch.zeros((), dtype=A.dtype))
        g0 = (S * g_mean.pow(power).unsqueeze(-1)).sum(0)
    return g0


def _zeroth_coefficients(g_mean: Tensor, vp: Tensor, live: Tensor, power: int, every: bool,
                         memo: dict[Any, Any] | None) -> Tensor:
    """``[numel]`` ``gb^p / V^(p/2)`` on the live weights, 0 on the others (:func:`_zeroth_term`)."""
    c = _zeroth_raw(g_mean, vp, power, memo)
    return c if every else torch.where(live, c, torch.zeros((), dtype=c.dtype))


def _zeroth_raw(g_mean: Tensor, vp: Tensor, power: int, memo: dict[Any, Any] | None) -> Tensor:
    """``[numel]`` ``gb^p / V^(p/2)`` (``gb^p`` by squarings: pow(4) runs std::pow per element, ~6x
    slower; ``gb^2``, and at ``p = 2`` the quotient, which :func:`_zeroth_rows` reads too, shared by
    the chunk's calls through ``memo``)."""
    memo = {} if memo is None else memo

    def make() -> Tensor:
        g2 = _memo(memo, "g2", g_mean.square)
        return (g2 if power == 2 else g2.square() if power == 4 else g_mean.pow(power)) / vp.reshape(-1)
    return _memo(memo, "c0 raw 2", make) if power == 2 else make()


def _even_sums_on_rows(fac: LinearFactors, g_mean: Tensor, A: Tensor, vp: Tensor, live: Tensor, power: int,
                       out_f: int, in_f: int, layer: tuple[int, Tensor, Tensor] | None, cache: PowerCache,
                       row_weights: tuple[Tensor, Tensor] | None = None, memo: dict[Any, Any] | None = None,
                       ) -> Tensor:
    """:func:`factored_power_sums` of a weight's columns ``A >= 0`` ``[out * in, M]`` in float32
    (:func:`_even_power_sums_f32`, its float64 fallback per record) with the element-wise work
    over the output rows whose ``d`` is not 0 on every record only (:data:`F32_ON_LIVE_ROWS`):
    the ``a = 0`` term ``G_m = sum_j gb_j^p A_jm / V_j^(p/2)`` is one GEMV over ``A`` (no
    ``[numel, M]`` temporaries ``S = A / V^(p/2)`` and ``S gb^p``), and ``S`` is formed on the
    GEMMs' rows alone. ``vp [numel, 1]``: ``V^(p/2)``; ``live [numel]``: ``V > V_NONE``.

    Against the sums before: the GEMMs' operands are the same up to a power of two (``S``'s
    scale is the maximum over the GEMMs' rows, not the whole chunk's: exact rescalings, the
    same float32 significands unless an entry is subnormal), so the terms ``a >= 1`` are
    bitwise the same; ``G`` is summed in another order and rounds the product ``gb^p / V^(p/2)``
    (``gb^p`` by squarings) before ``A`` instead of ``A / V^(p/2)`` first: a non-negative float64
    sum of ``numel`` terms, within ``(numel + 3) u`` relative either way (~1e-16 measured; the
    sums, ``G`` minus the other terms, moved by at most ~1e-14 relative at 1e7 weights).
    ``row_weights``: as :func:`factored_power_sums` (``W [out, K]``), the ``K`` sums after the ``M``.
    ``memo``: the chunk's shared setup (:meth:`PowerCache.chunk_setup`; ``{}``: none)."""
    memo = {} if memo is None else memo
    M = A.shape[1]
    gb = g_mean.reshape(out_f, in_f)
    every = _memo(memo, "every live", lambda: bool(live.all()))
    g0 = _zeroth_term(g_mean, A, vp, live, power, every, memo)
    W = None
    if row_weights is not None:  # their a = 0 terms: sum_o W_ok sum_i (gb^p / V^(p/2) A)_(oi, src_k)
        src, W = row_weights
        g0 = torch.cat([g0, _zeroth_rows(g_mean, A, vp, live, power, out_f, in_f, src, W, memo, every)])
    keep = None
    if SKIP_SILENT_ROWS:  # the rows whose d is 0 on every record: their terms a >= 1 are exact zeros (pf31)
        keep = _memo(memo, "keep", lambda: _silent_rows(fac.d))
    if keep is not None and keep.numel() == 0:  # every row silent: the a = 0 term alone, exact
        POWER_SUMS_F32_COUNTS[(power, "float32")] += fac.d.shape[0]
        return g0.unsqueeze(0).expand(fac.d.shape[0], -1).clone()
    if keep is not None:
        # the bound's out and the power-of-two scales of d and gb stay the layer's (as with keep)
        d_all, gb_all = fac.d, gb
        layer = layer or _memo(memo, "layer", lambda: (out_f, _pow2_scale(d_all, (0, 1)), _pow2_scale(gb_all, (0, 1))))
        A = A.reshape(out_f, in_f, M)[keep]
        vp = _memo(memo, ("vp kept", power), lambda: vp.reshape(out_f, in_f, 1)[keep])
        live = _memo(memo, "live kept", lambda: live.reshape(out_f, in_f)[keep])
        gb = _memo(memo, "gb kept", lambda: gb_all[keep])
        W = None if W is None else W[keep]
        fac = LinearFactors(module=fac.module, weight=fac.weight, bias=fac.bias, x=fac.x,
                            d=_memo(memo, "d kept", lambda: d_all[:, keep]))
        rows = keep.numel()
    else:
        A, vp, live, rows = A.reshape(out_f, in_f, M), vp.reshape(out_f, in_f, 1), live.reshape(out_f, in_f), out_f
    S = torch.div(A, vp, out=cache.scratch("scaled", (rows, in_f, M), torch.result_type(A, vp), A.device))
    if not every:
        S[~live] = 0.0
    rw = None if W is None or row_weights is None else (row_weights[0], W)
    got, bad = _even_power_sums_f32(fac, gb, S, g0, power, _f32_rtol(power), cache, None, layer, row_weights=rw,
                                    memo=memo)
    bad_rows = bad.any(1)
    nbad = int(bad_rows.sum())
    POWER_SUMS_F32_COUNTS[(power, "float32")] += got.shape[0] - nbad
    POWER_SUMS_F32_COUNTS[(power, "float64")] += nbad
    if nbad:  # as in factored_power_sums: the failing entries of these records in float64
        r = bad_rows.nonzero().reshape(-1)
        part = LinearFactors(module=fac.module, weight=fac.weight, bias=fac.bias, x=fac.x[r], d=fac.d[r])
        S_all = S if rw is None else torch.cat([S, S[:, :, rw[0]] * rw[1].unsqueeze(1)], 2)
        got[r] = torch.where(bad[r], _binomial_sums_f64(part, gb, S_all, power, g0=g0), got[r])
    return got


def _silent_rows(d: Tensor) -> Tensor | None:
    """:data:`SKIP_SILENT_ROWS`: the output rows ``[k]`` whose ``d`` is non-zero on some record, ``None``
    where every row is."""
    on = d.ne(0).any(0)
    return None if bool(on.all()) else on.nonzero().reshape(-1)


def _zeroth_rows(g_mean: Tensor, A: Tensor, vp: Tensor, live: Tensor, power: int, out_f: int, in_f: int,
                 src: Tensor, W: Tensor, memo: dict[Any, Any] | None = None, every: bool = False) -> Tensor:
    """``[K]`` the ``a = 0`` terms of :func:`factored_power_sums`' row-weighted columns:
    ``sum_o W_ok sum_i gb_oi^p A_(oi, src_k) / V_oi^(p/2)`` over the live weights (float64; a
    dead weight's term an exact 0, as :func:`_zeroth_term`'s product form). ``memo``: the chunk's
    shared setup (``gb^2 / V`` is :func:`_zeroth_term`'s at ``p = 2``: ``pow(2)`` squares);
    ``every``: every weight is live (no mask to apply)."""
    if memo is not None and power == 2 and SHARED_CHUNK_SETUP:
        c = _zeroth_raw(g_mean, vp, power, memo)  # bitwise g_mean.pow(2) / vp
    else:
        c = g_mean.pow(power) / vp.reshape(-1)
    out = torch.empty(src.numel(), dtype=torch.float64, device=A.device)
    for m in sorted({int(v) for v in src.tolist()}):
        prod = c * A[:, m]
        per_row = (prod if every and SHARED_CHUNK_SETUP
                   else torch.where(live, prod, torch.zeros((), dtype=torch.float64))).reshape(out_f, in_f).sum(1)
        ks = (src == m).nonzero().reshape(-1)
        out[ks] = per_row @ W[:, ks]
    return out


def _binomial_sums_f64(fac: LinearFactors, gb: Tensor, S: Tensor, power: int,
                       cache: PowerCache | None = None, keep: Tensor | None = None,
                       g0: Tensor | None = None, pack: bool = False) -> Tensor:
    """``[R, M]`` ``sum_oi (d_ro x_ri - gb_oi)^p S_oim`` by the binomial expansion in float64
    (``keep``: the terms ``a >= 1`` over these output rows only, as in :func:`_even_power_sums_f32`;
    ``g0 [M]``: the ``a = 0`` term ``sum_oi gb_oi^p S_oim`` where the caller has it, computed
    the same way: a float32 call's records that fall back do not sum the whole ``S`` again).
    ``pack``: the GEMMs' columns are the ``(o, m)`` pairs whose ``S_o:m`` is not all zero only
    (:func:`_nonzero_pairs`, :data:`PACK_ZERO_BLOCKS`), where that leaves out enough of them."""
    M, R, in_f = S.shape[-1], fac.d.shape[0], S.shape[1]
    total = torch.zeros(R, M, dtype=torch.float64)
    d = fac.d
    St = gt = S
    pairs = None
    skinny = False
    for a in range(power + 1):
        coef = math.comb(power, a) * (-1) ** (power - a)
        if a == 0:
            total += coef * ((S * gb.pow(power).unsqueeze(-1)).sum((0, 1)) if g0 is None else g0)
            if keep is not None:
                d, S, gb = d[:, keep], S[keep], gb[keep]
            pairs = _nonzero_pairs(S) if pack else None
            # at most SKINNY_GEMM_COLUMNS GEMM columns: the transposed product, B^T (x^a)^T, as in
            # _even_power_sums_f32 (the fallback's records, the second layer's draws)
            skinny = SKINNY_GEMM_TRANSPOSED and (S.shape[0] * M if pairs is None else pairs[0].numel()) <= SKINNY_GEMM_COLUMNS
            if pairs is not None:  # [in, N] ([N, in] skinny): the non-zero blocks' columns alone
                St, gt = S[pairs[0], :, pairs[1]], gb[pairs[0]]
                if not skinny:
                    St, gt = St.T.contiguous(), gt.T
                continue
            # [in, out, M] ([out, M, in] skinny): the GEMM's operand, copied once instead of by
            # einsum in every term (the same operands reach the GEMM: bitwise the same sums; pw34)
            St, gt = (S.permute(0, 2, 1).contiguous(), gb) if skinny else (S.permute(1, 0, 2).contiguous(), gb.T)
            continue
        B = St  # [in, out, M], or [in, N] packed; skinny [out, M, in], or [N, in] packed
        if power - a:
            g = gt.pow(power - a)
            B = St * (g if pairs is not None else g.unsqueeze(1) if skinny else g.unsqueeze(-1))
        xa = fac.x.pow(a) if cache is None else cache.power64(fac.x, a)  # [R, in]
        da = d.pow(a)  # [R, out]
        if pairs is not None:
            # sum_o d_ro^a (x^a @ B)_r(o, m), each column's pairs added in their order of o
            t = (torch.mm(B, xa.T).T if skinny else xa @ B).mul_(_gather.take(da, pairs[0], 1))  # [R, N]
            total += coef * torch.zeros_like(total).index_add_(1, pairs[1], t)
            continue
        if skinny:  # sum_o d_ro^a (B^T (x^a)^T)_(o, m), r: [out, M, R] summed over out
            t = torch.mm(B.view(S.shape[0] * M, in_f), xa.T).view(S.shape[0], M, R).mul_(da.T.unsqueeze(1))
            total += coef * t.sum(0).T
            continue
        # sum_{o,i} d_ro^a x_ri^a B_iom = sum_o d_ro^a (x^a @ B)_ro
        t = torch.einsum("ri,iom->rom", xa, B)
        total += coef * torch.einsum("ro,rom->rm", da, t)
    return total


def _nonzero_pairs(S: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(o [N], m [N])`` the pairs whose block ``S[o, :, m]`` has a non-zero element, ordered by
    ``m`` then ``o``, where they are at most :data:`PACK_FRACTION` of the ``out * M`` pairs; else
    ``None``. Why: a block of zeros adds exact zeros to every term (finite inputs), and the draws'
    signed columns are mostly such blocks (a 1e7 first-layer chunk's draws read 16 sampled
    rows, but a scheme's 8 sample-group columns 2 rows each; the schemes whose draws moved no row
    of the chunk are left out by the caller)."""
    if S.dim() != 3 or S.numel() == 0:
        return None
    blk = S.ne(0).any(1)  # [out, M]; NaN counts as non-zero
    n = int(blk.sum())
    if n > PACK_FRACTION * blk.numel():
        return None
    m, o = blk.T.nonzero(as_tuple=True)
    return o, m


def iterate_factor_blocks(factors: Iterable[LinearFactors], g_mean: dict[str, Tensor],
                          v_diag: dict[str, Tensor], names: list[str], budget: int):
    """Materialise ``w`` blocks ``[b, numel]`` from factors (generic consumers, e.g. tests)."""
    for fac in factors:
        for name, is_bias in ((fac.weight, False), (fac.bias, True)):
            if name is None or name not in names:
                continue
            numel = fac.d.shape[1] if is_bias else fac.d.shape[1] * fac.x.shape[1]
            step = max(1, budget // max(numel, 1))
            R = fac.d.shape[0]
            for a in range(0, R, step):
                d = fac.d[a : a + step]
                g = d if is_bias else (d.unsqueeze(-1) * fac.x[a : a + step].unsqueeze(1)).reshape(d.shape[0], -1)
                yield a, a + d.shape[0], {name: standardised_influence(g, g_mean[name], v_diag[name])}




# ------------------------------------------------------------------ beyond nn.Linear
# Per-sample statistics of the layers a model is built of, from each layer's input and the
# loss gradient at its output: Linear on any number of positions, Conv1d/2d/3d (unfolded
# to a Linear over patches), Embedding (the rows each record touches), LayerNorm and
# BatchNorm affine parameters (closed forms from the normalised input), and the projections
# of nn.MultiheadAttention. The model's outputs may be several per record: the Gauss-Newton
# diagonal is sum_k s_k (J^T a_k)^2 with L_i = sum_k s_k a_k a_k^T (eigen-decomposition of
# the loss Hessian in the outputs), one backward pass per non-zero eigen-direction.

_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
_MHA = nn.MultiheadAttention


@dataclass
class _Sparse:
    """Per-sample gradient of an embedding table restricted to the rows each record touches:
    record ``sample[u]`` has gradient ``g[u] [D]`` on row ``row[u]`` (pairs are unique)."""

    sample: Tensor
    row: Tensor
    g: Tensor
    shape: tuple[int, int]

    def sum(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.g.dtype).index_add_(0, self.row, self.g).reshape(-1)

    def sum_sq(self, sq: Tensor | None = None) -> Tensor:
        """Per-coordinate sum of squares ``[numel]`` (``sq``: ``g.square()`` when already formed)."""
        sq = self.g.square() if sq is None else sq
        return torch.zeros(self.shape, dtype=sq.dtype).index_add_(0, self.row, sq).reshape(-1)

    def norm_sq(self, b: int) -> Tensor:
        return torch.zeros(b, dtype=self.g.dtype).index_add_(0, self.sample, self.g.square().sum(-1))

    def rows(self, rows: Tensor) -> _Sparse:
        pos = torch.full((int(self.sample.max()) + 1 if self.sample.numel() else 1,), -1, dtype=torch.long)
        pos[rows[rows < pos.numel()]] = torch.nonzero(rows < pos.numel()).reshape(-1)
        keep = pos[self.sample] >= 0
        return _Sparse(pos[self.sample[keep]], self.row[keep], self.g[keep], self.shape)

    def dense(self, take: int) -> Tensor:
        out = torch.zeros(take, *self.shape, dtype=self.g.dtype)
        keep = self.sample < take
        out[self.sample[keep], self.row[keep]] = self.g[keep]
        return out.reshape(take, -1)


def _embedding_grad(idx: Tensor, go: Tensor, num: int, padding_idx: int | None) -> _Sparse:
    """Per-sample gradient of an embedding table: idx ``[B, ...]``, go ``[B, ..., D]``."""
    b = idx.shape[0]
    sample = torch.arange(b).reshape(b, *([1] * (idx.dim() - 1))).expand_as(idx).reshape(-1)
    row = idx.reshape(-1)
    g = go.reshape(-1, go.shape[-1])
    if padding_idx is not None:  # F.embedding gives the padding row no gradient
        keep = row != padding_idx
        sample, row, g = sample[keep], row[keep], g[keep]
    uniq, inv = torch.unique(sample * num + row, return_inverse=True)
    summed = torch.zeros(uniq.numel(), g.shape[-1], dtype=g.dtype).index_add_(0, inv, g)
    return _Sparse(torch.div(uniq, num, rounding_mode="floor"), uniq % num, summed, (num, go.shape[-1]))


def _patches(mod: nn.Module, x: Tensor) -> Tensor:
    """A convolution's input as patches ``[B, groups, C_in/groups * prod(kernel), positions]``:
    the layer is then a Linear over patches. Strided windows (``Tensor.unfold``, a view: far
    faster than ``F.unfold``'s im2col on CPU), any number of spatial dims, stride, dilation,
    padding (``'same'``/``'valid'`` and non-zero modes padded first, as the layer's forward).
    A tuple ``x``: the inputs of a convolution's repeated calls (:data:`REPEATED_CONV_CALLS`),
    their patches concatenated along the positions in call order."""
    if isinstance(x, tuple):
        return torch.cat([_patches(mod, xi) for xi in x], -1)
    nd = x.dim() - 2
    if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = torch.nn.functional.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
    elif any(mod.padding):
        x = torch.nn.functional.pad(x, [q for p in reversed(mod.padding) for q in (p, p)])
    for i, (k, s, d) in enumerate(zip(mod.kernel_size, mod.stride, mod.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # window dims appended last
    b, c = x.shape[:2]
    out = x.shape[2: 2 + nd]
    # [B, C, O..., k...] -> [B, C, k..., O...] -> [B, G, C/G * prod(k), prod(O)]
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(b, mod.groups, -1, math.prod(out))


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _transposed_patches(mod: nn.Module, x: Tensor, output_padding: tuple[int, ...] | None = None) -> Tensor:
    """A transposed convolution's input as the patches of its equivalent convolution
    ``[B, groups, C_in/groups * prod(kernel), output positions]``: the transposed convolution is
    a stride-1 convolution (dilation kept) of its input with ``stride - 1`` zeros between entries,
    padded by ``dilation (kernel - 1) - padding`` (plus ``output_padding`` at the end), with the
    kernel flipped. Entry ``(c, j)`` of output position ``o`` (window offset ``j``, per spatial dim)
    is the input that weight ``W[c, :, kernel - 1 - j]`` multiplies there,
    ``x[c, (o + padding - dilation (kernel - 1 - j)) / stride]`` (zero where not an integer in
    range), so the layer is a Linear over these patches whose weight is ``W``'s
    ``[groups, C_out/groups, C_in/groups * prod(kernel)]`` transpose with the kernel flipped
    (:meth:`KronBlock.to_param`: flipping the weight-sized tensors, not the patches, ~25% of the
    estimation's time on a small decoder; the K-FAC input factor of Grosse & Martens 2016 for the
    equivalent convolution). ``output_padding``: the call's (:func:`_transposed_output_padding`,
    another than the layer's where it was called with ``output_size``); ``None``: the layer's."""
    nd = x.dim() - 2
    b, c = x.shape[:2]
    ops = mod.output_padding if output_padding is None else output_padding
    if any(s > 1 for s in mod.stride):
        xs = x.new_zeros(b, c, *[(n - 1) * s + 1 for n, s in zip(x.shape[2:], mod.stride)])
        xs[(slice(None), slice(None), *[slice(None, None, s) for s in mod.stride])] = x
        x = xs
    pads = [(d * (k - 1) - p, d * (k - 1) - p + op)  # negative: cropped (padding beyond the kernel's reach)
            for k, d, p, op in zip(mod.kernel_size, mod.dilation, mod.padding, ops)]
    x = torch.nn.functional.pad(x, [q for lr in reversed(pads) for q in lr])
    for i, (k, d) in enumerate(zip(mod.kernel_size, mod.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, 1)[..., ::d]
    out = x.shape[2: 2 + nd]
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(b, mod.groups, -1, math.prod(out))


def _transposed_grad_patches(mod: nn.Module, go: Tensor, output_padding: tuple[int, ...] | None = None) -> Tensor:
    """The loss gradient at a transposed convolution's output as patches ``[B, groups,
    C_out/groups * prod(kernel), input positions]``: entry ``(o, k)`` at input position ``t`` is
    ``go[o, t stride + k dilation - padding]`` (zero outside), what weight ``W[:, o, k]`` meets there,
    so ``dW[c, o, k] = sum_t x[c, t] patches[o k, t]`` (the transposed convolution's weight gradient
    is a convolution's, input and output exchanged): ``stride^dims`` fewer positions than
    :func:`_transposed_patches`' and no zeros. ``output_padding`` as :func:`_transposed_patches`."""
    nd = go.dim() - 2
    ops = mod.output_padding if output_padding is None else output_padding
    pads = [(p, p - op) for p, op in zip(mod.padding, ops)]  # the uncropped output
    go = torch.nn.functional.pad(go, [q for lr in reversed(pads) for q in lr])
    for i, (k, s, d) in enumerate(zip(mod.kernel_size, mod.stride, mod.dilation)):
        go = go.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    b, c = go.shape[:2]
    pos = go.shape[2: 2 + nd]
    go = go.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return go.reshape(b, mod.groups, -1, math.prod(pos))


def _conv_patches(mod: nn.Module, x: Tensor, output_padding: tuple[int, ...] | None = None) -> Tensor:
    """:func:`_patches` of a convolution, :func:`_transposed_patches` of a transposed one."""
    return _transposed_patches(mod, x, output_padding) if isinstance(mod, _TRANSPOSED) else _patches(mod, x)


def _transposed_output_padding(mod: nn.Module, x: Tensor, out: Tensor) -> tuple[int, ...]:
    """The output padding of one call of a transposed convolution, from its input ``x`` and output
    (or output gradient) ``out``, both ``[B, C, *spatial]``: the layer's ``output_padding``, or the
    one torch derives from ``output_size`` (``_ConvTransposeNd._output_padding``: the requested size
    less the smallest, ``(n - 1) stride - 2 padding + dilation (kernel - 1) + 1``; a U-Net decoder's
    ``up(x, output_size=skip.shape)``)."""
    return tuple(o - ((n - 1) * s - 2 * p + d * (k - 1) + 1) for n, o, s, p, d, k in
                 zip(x.shape[2:], out.shape[2:], mod.stride, mod.padding, mod.dilation, mod.kernel_size))


def _same_tensor(xs: Any) -> bool:
    """Whether the tensors of ``xs`` are one tensor (the same storage, offset, shape and
    strides: views of it, e.g. self-attention's query, key and value)."""
    t0 = xs[0]
    return all(isinstance(t, Tensor) and t.data_ptr() == t0.data_ptr() and t.shape == t0.shape
               and t.stride() == t0.stride() and t.dtype == t0.dtype for t in xs[1:])


def _layer_grads(mod: nn.Module, x: Any, go: Tensor, names: dict[str, str], cache: dict[str, Tensor]) -> dict[str, Any]:
    """Per-sample gradients ``{parameter: [B, numel] or _Sparse}`` of one layer from its input
    ``x`` and the gradient ``go`` at its output (both with the batch in dim 0); ``cache``
    keeps what depends on the input only (patches, normalised inputs) across the backward
    passes of one batch."""
    out: dict[str, Any] = {}
    b = (go[0] if isinstance(go, (list, tuple)) else go).shape[0]
    wn, bn = names.get("weight"), names.get("bias")
    if isinstance(mod, nn.Linear):
        xf, gf = x.reshape(b, -1, x.shape[-1]), go.reshape(b, -1, go.shape[-1])
        if wn:  # [B, O, T] x [B, T, I] (einsum's own bmm, without its dispatch)
            out[wn] = torch.bmm(gf.transpose(1, 2), xf).reshape(b, -1)
        if bn:
            out[bn] = gf.sum(1)
    elif isinstance(mod, _TRANSPOSED):
        if wn:
            # the weight gradient from the output gradient's patches over the input positions (4x
            # fewer than the output's at stride 2 in 2-d, no zero-stuffing): [B, G, C_in/G, C_out/G * K],
            # the weight's own layout [C_in, C_out/G, k...]
            pg = _transposed_grad_patches(mod, go, _transposed_output_padding(mod, x, go))
            out[wn] = (x.reshape(b, mod.groups, -1, pg.shape[-1]) @ pg.transpose(-1, -2)).reshape(b, -1)
        if bn:
            out[bn] = go.reshape(b, go.shape[1], -1).sum(-1)
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if wn:
            if "u" not in cache:
                cache["u"] = _patches(mod, x)
            u = cache["u"]  # [B, G, K, P]
            gg = go.reshape(b, mod.groups, -1, u.shape[-1])  # [B, G, O/G, P]
            # the batched GEMM reads the patches transposed in place (BLAS's transpose flag): no
            # [B, G, P, K] copy (a strided transpose of the whole patches). The products were bit
            # for bit those of the copy on the benchmark CNN's layers (its report unchanged); BLAS
            # may pick another kernel for another layout and shape (float32 rounding: ~2e-7
            # relative on a small grouped convolution; tests/test_chunk_groups.py)
            out[wn] = (gg @ u.transpose(-1, -2)).reshape(b, -1)  # [B, G, O/G, K]
        if bn:
            out[bn] = go.reshape(b, go.shape[1], -1).sum(-1)
    elif isinstance(mod, nn.Embedding):
        if wn:
            out[wn] = _embedding_grad(x, go, mod.num_embeddings, mod.padding_idx)
    elif isinstance(mod, nn.LayerNorm):
        nd = len(mod.normalized_shape)
        if wn:
            if "xhat" not in cache:
                cache["xhat"] = torch.nn.functional.layer_norm(x, mod.normalized_shape, eps=mod.eps)
            xhat = cache["xhat"]
            out[wn] = (go * xhat).reshape(b, -1, *x.shape[-nd:]).sum(1).reshape(b, -1)
        if bn:
            out[bn] = go.reshape(b, -1, *go.shape[-nd:]).sum(1).reshape(b, -1)
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        # eval mode (the estimation's semantics): normalised by the running statistics
        if wn:
            shape = (1, -1, *([1] * (x.dim() - 2)))
            if "xhat" not in cache:
                cache["xhat"] = (x - mod.running_mean.reshape(shape)) / (mod.running_var.reshape(shape) + mod.eps).sqrt()
            xhat = cache["xhat"]
            out[wn] = (go * xhat).reshape(b, x.shape[1], -1).sum(-1)
        if bn:
            out[bn] = go.reshape(b, go.shape[1], -1).sum(-1)
    elif isinstance(mod, _MHA):
        # slot "in": x = (x_q, x_k, x_v) [B, T, E], go = (d_q, d_k, d_v) [B, T, E]
        wn, bn = names.get("in_proj_weight"), names.get("in_proj_bias")
        if wn:
            if _same_tensor(x):
                # self-attention (query, key and value one tensor [B, T, E]): the q/k/v output
                # gradients side by side [B, T, 3E] times the input, one plain batched GEMM into
                # [B, 3E, E] (2.4x faster than the stacked 4-d einsum; the same products)
                out[wn] = torch.bmm(torch.cat(list(go), -1).transpose(1, 2), x[0]).reshape(b, -1)
            elif len({tuple(t.shape) for t in (*x, *go)}) == 1:
                # one batched product into [B, 3, E, E] (the q/k/v rows of in_proj_weight, in order)
                xs = cache["xs"] if "xs" in cache else torch.stack(list(x), 2)
                out[wn] = torch.einsum("btko,btki->bkoi", torch.stack(list(go), 2), xs).reshape(b, -1)
            else:  # cross-attention: keys/values of another length than the queries
                out[wn] = torch.cat([torch.einsum("bto,bti->boi", gi, xi) for xi, gi in zip(x, go)], 1).reshape(b, -1)
        if bn:
            out[bn] = torch.cat([gi.sum(1) for gi in go], 1)
    return out


def _supported(mod: nn.Module) -> str | None:
    """Why the fast path cannot take this layer, or ``None``."""
    if isinstance(mod, (nn.Linear, *_CONVS, *_TRANSPOSED)):
        return None
    if isinstance(mod, nn.Embedding):
        # sparse=True lays out the weight's gradient only, scale_grad_by_freq rescales it for
        # the optimizer (per_sample.plain_embedding_gradients): the per-sample rows of the
        # loss's gradient are formed here either way
        if mod.max_norm is not None:
            return "Embedding with max_norm"
        return None
    if isinstance(mod, nn.LayerNorm):
        return None
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if mod.running_mean is None:
            return "BatchNorm without running statistics (batch statistics couple the records)"
        return None
    if isinstance(mod, _MHA):
        if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
            return "MultiheadAttention with separate q/k/v weights, bias_k/bias_v or add_zero_attn"
        return None
    return f"layer type {type(mod).__name__}"


def per_layer_parameters(model: nn.Module, names: list[str]) -> list[str]:
    """The assessed parameters ``names`` that :class:`LayerProgram` can take, in their order: the
    weight or bias of a supported layer (:func:`_supported`) held by no other module slot. The
    rest (a GroupNorm's, an affine InstanceNorm's, a tied weight's) keep the generic path; the
    per-layer program built over this subset still forms the K-FAC factors of the convolutions
    beside them (the refused layers are only part of its forward and backward)."""
    shared = shared_parameters(model, names)
    mods = dict(model.named_modules(remove_duplicate=False))
    out = []
    for n in names:
        if n in shared:
            continue
        mod_name, _, leaf = n.rpartition(".")
        mod = mods.get(mod_name)
        if mod is None or _supported(mod) is not None:
            continue
        if leaf in (("in_proj_weight", "in_proj_bias") if isinstance(mod, _MHA) else ("weight", "bias")):
            out.append(n)
    return out


def _mha_forward(self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                 key_padding_mask: Tensor | None = None, need_weights: bool = True,
                 attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                 is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention's forward (eval mode) written out so that the projections are
    visible: the in-projection inputs and outputs go to ``self._fast_taps``, ``out_proj`` is
    called as a module (its hooks fire). Checked against the module's own forward once."""
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, tq, e = query.shape
    tk, h = key.shape[1], self.num_heads
    hd = e // h
    wq, wk, wv = self.in_proj_weight.chunk(3)
    bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
    q = torch.nn.functional.linear(query, wq, bq)
    k = torch.nn.functional.linear(key, wk, bk)
    v = torch.nn.functional.linear(value, wv, bv)
    self._fast_taps.append(((query, key, value), (q, k, v)))
    qh, kh, vh = (t.reshape(b, -1, h, hd).transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(hd)  # [B, H, Tq, Tk]
    mask = torch.zeros(b, h, tq, tk, dtype=scores.dtype)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tq, tk, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        am = attn_mask.reshape(-1, h, tq, tk) if attn_mask.dim() == 3 else attn_mask
        mask = mask + (torch.zeros_like(am, dtype=scores.dtype).masked_fill(am, -math.inf)
                       if am.dtype == torch.bool else am.to(scores.dtype))
    if key_padding_mask is not None:
        kp = key_padding_mask.reshape(b, 1, 1, tk)
        mask = mask + (torch.zeros_like(kp, dtype=scores.dtype).masked_fill(kp, -math.inf)
                       if kp.dtype == torch.bool else kp.to(scores.dtype))
    attn = torch.softmax(scores + mask, dim=-1)
    o = (attn @ vh).transpose(1, 2).reshape(b, tq, e)
    o = self.out_proj(o)
    if not self.batch_first:
        o = o.transpose(0, 1)
    weights = None
    if need_weights:
        weights = attn.mean(1) if average_attn_weights else attn
    if not self._fast_checked:  # the written-out forward must be the module's own
        with torch.no_grad():
            args = (query, key, value) if self.batch_first else tuple(t.transpose(0, 1) for t in (query, key, value))
            want = type(self).forward(self, *args, key_padding_mask=key_padding_mask, need_weights=False,
                                      attn_mask=attn_mask, average_attn_weights=average_attn_weights)[0]
        tol = 1e-10 if o.dtype == torch.float64 else 1e-4
        if not torch.allclose(o, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1.0))):
            raise NotImplementedError("the written-out MultiheadAttention forward differs from the module's")
        self._fast_checked = True
    return o, weights


# "auto" Gauss-Newton diagonal: exact up to this many directions per record (rank of the loss
# Hessian in the outputs), the sampled-label Monte Carlo estimate above. Each direction costs a
# backward pass and a per-sample product of every layer. Measured (docs/benchmarks.md, n = 1024):
# 10-class CNN (9 directions) 3.5x cheaper, sigma off by 4 % (median over weights); 4-class
# Transformer (3) 2x cheaper but 9 % (embedding rows seen by few records): exact up to 3.
GGN_EXACT_MAX_DIRECTIONS = 3


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a pytree in ``dtype`` (integer tensors, e.g. token ids, kept)."""
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, tree)


# LayerProgram's first-batch check against torch.func: a parameter's per-sample gradients may differ
# by this fraction of the largest gradient of any parameter (besides the relative tolerance, 1e-8
# float64 / 1e-4 float32, to its own largest): a cancelled bias's gradients are rounding of a sum of
# output gradients that is zero (float32: ~1e-7 of its terms), which no relative tolerance to
# themselves can compare; a wrong formula's error is of the size of the gradients it misses
VERIFY_ROUNDING_FLOOR = 1e-6

# Softmax cross-entropy recognised when the loss's dl/do and d2l/do2 equal p - onehot(y) and
# diag(p) - p p' to this (absolute; their entries are at most 1, float32 rounding ~1e-7)
CE_TOLERANCE = 1e-4

# The loss gradient carries the exact Gauss-Newton's direction e with weight w = p_y / (1 - p_y)
# (LayerProgram._ce_directions) while w stays below this: 1 - p_y >= ~1e-6, where the float32
# gradient's rounding (~6e-8 absolute) is a few % of e at most, as in diag(p) - p p' itself
CE_BASE_WEIGHT_MAX = 1e6

CHUNK_FLOATS = 1 << 20  # floats per [records, numel] temporary of per-sample gradients (8 MiB in float64)

# LayerProgram takes an nn.Linear called k > 1 times per forward (weights shared across depth,
# ``fc(fc(x))``, an unrolled loop over one layer) as one call over its calls' positions: the inputs
# and output gradients of the calls concatenated along a positions axis, ``[B, P_1 + ... + P_k, in]``,
# so the per-sample gradient is the exact sum of the calls' outer products, each Gauss-Newton
# direction's too (the diagonal's squares are taken of the sum), and the K-FAC partial traces those
# sums' (tw51). False: the program refuses such a model at its first batch (the generic torch.func
# path, without a K-FAC correction, the report's "kfac_lost" line and * rows; before tw51)
REPEATED_LINEAR_CALLS = True
# The same for a convolution (not a transposed one) called k > 1 times on batched inputs (a siamese
# encoder, a block applied twice): its taps hold the calls' inputs as a tuple, whose patches
# (_patches) and output gradients ([B, C_out, P_i] flattened) are concatenated along the positions.
# False: refused as before tw51
REPEATED_CONV_CALLS = True


def _outputs_grad(f: Tensor, outs: list[Tensor], **kw: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(f, outs, allow_unused=True, **kw)`` where a layer output outside the
    graph (a call under ``torch.no_grad()``) gets ``None`` (no gradient reaches the weight through it)."""
    live = [i for i, o in enumerate(outs) if o.requires_grad]
    got = torch.autograd.grad(f, [outs[i] for i in live], allow_unused=True, **kw) if live else ()
    res: list[Tensor | None] = [None] * len(outs)
    for i, g in zip(live, got):
        res[i] = g
    return tuple(res)


def _slice(tree: Any, a: Any, c: Any = None) -> Any:
    """Rows ``a:c`` (or the index tensor / slice ``a``) of every tensor of a pytree."""
    key = slice(a, c) if isinstance(a, int) else a
    if isinstance(tree, Tensor):  # the common leaves first: no pytree walk per layer and chunk
        return tree[key]
    if type(tree) is dict:
        return {k: _slice(v, key) for k, v in tree.items()}
    if type(tree) is tuple and tree and all(isinstance(t, Tensor) for t in tree):
        if _same_tensor(tree):  # self-attention's (query, key, value): one tensor stays one
            part = tree[0][key]
            return (part,) * len(tree)
        return tuple(t[key] for t in tree)
    return torch.utils._pytree.tree_map(lambda t: t[key] if isinstance(t, Tensor) else t, tree)


def _dense(v: Any, rows: int) -> Tensor:
    """A per-sample gradient ``[rows, numel]`` (sparse embedding gradients made dense)."""
    return v.dense(rows) if isinstance(v, _Sparse) else v.reshape(rows, -1)


def _prepare(mod: nn.Module, x: Any, names: dict[str, str]) -> dict[str, Tensor]:
    """What a layer's per-sample gradients need from its input alone, for the whole batch
    (patches, normalised inputs; every entry has the batch in dim 0)."""
    cache: dict[str, Tensor] = {}
    # (a transposed convolution's gradients read its output gradient's patches: nothing here; its
    # K-FAC factors form the input's patches for their records, LayerProgram._kron_in)
    if "weight" in names and isinstance(mod, (*_CONVS, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
        if isinstance(mod, _CONVS):
            cache["u"] = _patches(mod, x)  # [B, G, K, P], read transposed by _layer_grads
        elif isinstance(mod, nn.LayerNorm):
            cache["xhat"] = torch.nn.functional.layer_norm(x, mod.normalized_shape, eps=mod.eps)
        else:
            shape = (1, -1, *([1] * (x.dim() - 2)))
            cache["xhat"] = (x - mod.running_mean.reshape(shape)) / (mod.running_var.reshape(shape) + mod.eps).sqrt()
    elif ("in_proj_weight" in names and isinstance(mod, _MHA) and not _same_tensor(x)
          and len({tuple(t.shape) for t in x}) == 1):
        cache["xs"] = torch.stack(list(x), 2)  # [B, T, 3, E]: the q/k/v inputs, stacked once per batch
    return cache


@dataclass(frozen=True)
class KronBlock:
    """A layer of :class:`LayerProgram` whose Kronecker factors (K-FAC; KFC for convolutions)
    the diagonal estimator's sigma correction and influences use: ``groups`` independent blocks,
    each with ``fan`` inputs per output (``C_in / groups * prod(kernel)``; a Linear's
    ``in_features``) and ``out`` outputs (``C_out / groups``)."""

    module: str
    weight: str | None
    bias: str | None
    groups: int
    fan: int
    out: int
    # a transposed convolution's kernel size (empty: not one): its weight [C_in, C_out/groups, k...]
    # is the block's [groups, out, fan] with the channel axes swapped and the kernel flipped
    # (:func:`_transposed_patches`)
    transposed: tuple[int, ...] = ()

    def _swap(self, t: Tensor, first: int, second: int) -> Tensor:
        """``[..., groups, first, second, k...]`` (flat in the last dim) -> ``[..., groups, second,
        first, k...]`` with the kernel flipped, flat again in its last dim."""
        lead, nd = t.shape[:-1], len(self.transposed)
        t = t.reshape(*lead, self.groups, first, second, *self.transposed)
        t = t.flip(tuple(range(t.dim() - nd, t.dim()))).transpose(len(lead) + 1, len(lead) + 2)
        return t.reshape(*lead, -1)

    def to_block(self, t: Tensor) -> Tensor:
        """The weight's values in its own flat order ``[..., numel]`` as ``[..., groups, out, fan]``."""
        lead = t.shape[:-1]
        if self.transposed:
            t = self._swap(t, self.fan // math.prod(self.transposed), self.out)
        return t.reshape(*lead, self.groups, self.out, self.fan)

    def to_param(self, t: Tensor) -> Tensor:
        """``[..., groups, out, fan]`` in the weight's own flat order ``[..., numel]``."""
        t = t.reshape(*t.shape[:-3], -1)
        return self._swap(t, self.out, self.fan // math.prod(self.transposed)) if self.transposed else t

    @property
    def p(self) -> int:
        """Rows of ``A``: the fan-in where the weight is assessed, plus 1 for an assessed bias."""
        return (self.fan if self.weight is not None else 0) + (1 if self.bias is not None else 0)


@dataclass
class _BatchTaps:
    """A batch's layer taps: per layer its input ``x`` and the loss gradient(s) at its
    output(s) ``go`` (batch in dim 0), and :func:`_prepare`'s cache."""

    b: int
    x: dict[str, Any]
    go: dict[str, Any]
    cache: dict[str, dict[str, Tensor]]
    # per record ``[b]``: the weight of the squared loss gradient ``(J' dl/do)^2`` in the exact
    # Gauss-Newton diagonal (softmax cross-entropy, :meth:`LayerProgram._ce_directions`), else None
    base_weight: Tensor | None = None
    # the Kronecker factors of the batch's first records (:meth:`LayerProgram.kron_sums`):
    # {layer: (A [groups, p, p] or None, G [groups, out, out], records, rows summed)}, formed by
    # LayerProgram.batch from every Gauss-Newton direction's output gradients (transient there)
    kron: dict[str, tuple[Tensor | None, Tensor, int, int]] | None = None

    def rows(self, rows: Any) -> _BatchTaps:
        """The taps of records ``rows`` (an index tensor or a slice)."""
        n = len(range(self.b)[rows]) if isinstance(rows, slice) else int(rows.numel())
        return _BatchTaps(n, _slice(self.x, rows), _slice(self.go, rows),
                          {m: _slice(c, rows) for m, c in self.cache.items()},
                          None if self.base_weight is None else self.base_weight[rows])

    def numel(self) -> int:
        leaves = torch.utils._pytree.tree_leaves((self.x, self.go, self.cache))
        return sum(t.numel() for t in leaves if isinstance(t, Tensor))


class LayerProgram:
    """Per-batch per-sample statistics of models beyond nn.Linear (see the section comment).

    The interface of :class:`FactoredProgram` (``batch``, ``batch_sums``,
    ``record_gradients``, ``select_rows``, ``close``); ``factors`` is not available (the
    stored records' influences come from their layer taps, :meth:`record_taps` and
    :meth:`grads_from_taps`: one forward and one backward pass for all parameters). Raises
    ``NotImplementedError`` naming the layer when an assessed parameter is not the weight or
    bias of a supported layer (then torch.func per-sample gradients are used). A parameter
    tied to several supported layers (an embedding shared with the output head) gets the sum
    of its uses' per-sample gradients. An nn.Linear or a convolution (not a transposed one) called
    ``k > 1`` times per forward is one call over its calls' positions (:data:`REPEATED_LINEAR_CALLS`,
    :data:`REPEATED_CONV_CALLS`; every call on batched input): its per-sample gradients, Gauss-Newton
    directions' gradients and K-FAC partial traces are the exact sums over the calls. The first batch is checked against torch.func's per-sample
    gradients of two records.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, names: list[str], dtype: torch.dtype,
                 reference: Any = None) -> None:
        shared = shared_parameters(model, names)
        self.model = private_copy(model, "copying the model for the per-layer estimation").to(dtype).eval()
        cast_tensor_attributes(self.model, dtype)
        mods = dict(self.model.named_modules(remove_duplicate=False))
        self.slots: dict[str, dict[str, str]] = {}  # module -> {attribute: parameter name}
        owners: dict[int, str] = {}
        for n in names:
            for slot in shared.get(n, [n]):  # every module slot holding the parameter (tied weights)
                mod_name, _, leaf = slot.rpartition(".")
                mod = mods.get(mod_name)
                if mod is None:
                    raise NotImplementedError(f"parameter {n!r} is not held by a submodule")
                if owners.setdefault(id(mod), mod_name) != mod_name:  # one module under two names
                    raise NotImplementedError(f"layer {mod_name!r} is also registered as {owners[id(mod)]!r}")
                why = _supported(mod)
                if why is not None:
                    raise NotImplementedError(f"parameter {n!r}: {why}")
                ok = ("in_proj_weight", "in_proj_bias") if isinstance(mod, _MHA) else ("weight", "bias")
                if leaf not in ok:
                    raise NotImplementedError(f"parameter {n!r} of {type(mod).__name__}")
                self.slots.setdefault(mod_name, {})[leaf] = n
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.names, self.loss_fn, self.dtype = names, loss_fn, dtype
        self.reference = reference  # a LossProgram: the first batch's check
        # the Gauss-Newton diagonal (set by the accumulator): "ggn" (exact, rank(L) directions),
        # "ggn_mc" (mc_samples Monte Carlo directions per record, a function of the record's
        # content key and mc_seed: record_draws) or "auto"; ggn_choice: what the first batch
        # chose. draw_keys: the next batch() call's record keys, set by the accumulator (those of
        # its raw batch, as the record sample's) and used once; None: the keys of the batch given
        self.ggn_mode, self.mc_samples, self.mc_seed = "ggn", 1, 0
        self.draw_keys: Tensor | None = None
        self.ggn_choice: str | None = None
        self.ggn_directions = 0
        self._ce_hessian_checked = False  # the loss's Hessian in the outputs matched diag(p) - p p' once
        self._shape: OutputShape = ()
        self._layout: OutputShape | None = None  # the output's layout, sorted on the first batch
        self.num_records, self.group_budget = 1, 1 << 25  # set by the accumulator
        self._inputs: dict[str, Any] = {}
        self._outputs: dict[str, Any] = {}
        self._calls: dict[str, int] = {}
        # per layer called more than once in this forward: every call's (input, output), in order
        self._repeated: dict[str, list[tuple[Any, Any]]] = {}
        self._numels = {n: p.numel() for n, p in self.model.named_parameters()}
        self.handles = []
        for m in self.slots:
            mod = mods[m]
            if isinstance(mod, _MHA):
                mod._fast_taps = []
                mod._fast_checked = False
                mod.forward = _mha_forward.__get__(mod)  # this private copy only
            else:
                self.handles.append(mod.register_forward_hook(self._hook(m)))
        self._mods = {m: mods[m] for m in self.slots}
        # parameters held only by embeddings: {name: [module]} (sparse per-sample gradients)
        holders: dict[str, list[str]] = {}
        for m, slot in self.slots.items():
            for n in slot.values():
                holders.setdefault(n, []).append(m)
        self._sparse_slots = {n: ms for n, ms in holders.items()
                              if all(isinstance(self._mods[m], nn.Embedding) for m in ms)}
        self._tied = any(len(ms) > 1 for ms in holders.values())  # a parameter held by several layers
        self._verified = False
        # the K-FAC (KFC) blocks (:meth:`kron_blocks`) and, per block, the batch's first records whose
        # factors :meth:`batch` forms (set by the accumulator before each batch; None: none)
        self._kron_blocks = self._make_kron_blocks(holders)
        self.kron_rows: dict[str, int] | None = None
        # an all-Linear model's blocks seen on inputs with positions ([B, ..., in]): the general
        # partial traces, whose cost takes the convolutions' record cap (MomentAccumulator._kron_rows)
        self.kron_positions: set[str] = set()
        # per layer the records to sum instead where an all-Linear model's layer turns out, at this
        # batch (its first), to run over positions: the partial traces' cap's share of the same
        # sample order (a prefix of kron_rows[m]; kf43: the sample's rate fixed from the first batch on)
        self.kron_rows_positions: dict[str, int] | None = None
        # per layer the batch's Gauss-Newton directions whose partial traces are not yet added (_kron_flush)
        self._kron_pending: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def _hook(self, name: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple, out: Tensor) -> None:
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            if k:  # a repeated call: every call's input and output kept (_repeated_taps)
                self._repeated.setdefault(name, [(self._inputs[name], self._outputs[name])]).append((args[0], out))
            self._inputs[name] = args[0]
            self._outputs[name] = out

        return hook

    def _repeated_taps(self, m: str, mod: nn.Module, b: int) -> tuple[Any, list[Tensor]]:
        """A layer's taps over its ``k > 1`` calls of this forward, in call order, and the ``k`` outputs
        (in the graph), whose gradients :meth:`_unpack` concatenates in the same order. An nn.Linear
        (:data:`REPEATED_LINEAR_CALLS`): the inputs as one ``[B, P_1 + ... + P_k, in]`` (detached; each
        call's ``[B, ..., in]`` flattened to ``[B, P_i, in]``). A convolution (:data:`REPEATED_CONV_CALLS`):
        the tuple of the calls' inputs ``[B, C_in, *spatial_i]`` (detached), whose patches
        :func:`_patches` concatenates. Raises ``NotImplementedError`` naming the layer where a call's
        input or output does not have this batch's ``B`` records first (a Linear's ``[B, ..., features]``,
        a convolution's batched ``[B, C, *spatial]``)."""
        calls = self._repeated[m]
        linear = isinstance(mod, nn.Linear)
        for x, o in calls:
            if not (isinstance(x, Tensor) and isinstance(o, Tensor) and x.dim() >= 2 and o.dim() == x.dim()
                    and x.shape[0] == b and o.shape[0] == b
                    and (o.shape[:-1] == x.shape[:-1] if linear else x.dim() == mod.weight.dim())):
                raise NotImplementedError(f"layer {m!r} is called {len(calls)}x per forward, not every call on "
                                          f"{'[B, ..., in]' if linear else '[B, C, *spatial]'} inputs of the "
                                          f"batch's {b} records")
        if linear:
            return torch.cat([x.detach().reshape(b, -1, x.shape[-1]) for x, _ in calls], 1), [o for _, o in calls]
        return tuple(x.detach() for x, _ in calls), [o for _, o in calls]

    def _forward(self, inputs: Any, targets: Any, b: int) -> tuple[dict[str, tuple[Any, list[Tensor]]], Tensor, OutputShape]:
        """One forward pass (grad enabled by the caller): per layer its input (detached) and
        output(s) (in the graph), the outputs ``[B, C]`` the loss reads and their per-record
        layout (:mod:`~.output_reads`; a pytree output's leaves sorted at the first forward)."""
        self._inputs.clear(), self._outputs.clear(), self._calls.clear(), self._repeated.clear()
        for mod in self._mods.values():
            if isinstance(mod, _MHA):
                mod._fast_taps.clear()
        with default_dtype(self.dtype):
            out = self.model(inputs)
        taps: dict[str, tuple[Any, list[Tensor]]] = {}
        for m, mod in self._mods.items():
            if isinstance(mod, _MHA):
                if len(mod._fast_taps) != 1:
                    raise NotImplementedError(f"layer {m!r} is not called once per forward")
                xs, outs = mod._fast_taps[0]
                taps[m] = (tuple(t.detach() for t in xs), list(outs))
            else:
                if self._calls.get(m, 0) != 1:
                    if self._calls.get(m, 0) > 1 and ((REPEATED_LINEAR_CALLS and isinstance(mod, nn.Linear))
                                                      or (REPEATED_CONV_CALLS and isinstance(mod, _CONVS))):
                        taps[m] = self._repeated_taps(m, mod, b)  # its calls as positions of one call
                        continue
                    k = self._calls.get(m, 0)
                    raise NotImplementedError(  # (k > 1: a layer kind whose repeated calls are not taken)
                        f"layer {m!r} is called {k}x in this batch's forward, not once" if k else
                        f"layer {m!r} is not called in this batch's forward (a data-dependent branch?)")
                x = self._inputs[m]
                if isinstance(mod, _TRANSPOSED):
                    # called with output_size: another output padding than the layer's, read from the
                    # shapes wherever the patches are formed (_transposed_output_padding)
                    if x.dim() != mod.weight.dim():
                        raise NotImplementedError(f"layer {m!r}: a transposed convolution on unbatched input")
                    op = _transposed_output_padding(mod, x, self._outputs[m])
                    if any(not 0 <= o < max(s, d) for o, s, d in zip(op, mod.stride, mod.dilation)):
                        raise NotImplementedError(f"layer {m!r}: a transposed convolution's output shape "
                                                  f"{tuple(self._outputs[m].shape[2:])} is no output padding's")
                taps[m] = (x.detach() if isinstance(x, Tensor) else x, [self._outputs[m]])
        self._inputs.clear(), self._outputs.clear(), self._repeated.clear()
        if isinstance(out, Tensor) and (out.dim() == 0 or out.shape[0] != b):
            raise NotImplementedError("the model's output has no batch dimension first")
        self._layout = layout_of(out, self._layout, self.loss_fn, inputs, targets, b)
        flat = flat_outputs(out, self._layout)  # the outputs the loss reads (output_reads)
        if flat.shape[0] != b:
            raise NotImplementedError("the model's output has no batch dimension first")
        return taps, flat, self._layout

    def _loss_derivatives(self, fd: Tensor, targets: Any, shape: OutputShape, second: bool
                          ) -> tuple[Tensor, Tensor | None]:
        """Per record ``dl/do [B, C]`` and (``second``) ``d2l/do2 [B, C, C]``."""
        def one(o: Tensor, y: Any) -> Tensor:
            y1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, y)
            return self.loss_fn(unflat_record(o, shape), y1).reshape(())

        def derivatives(hessian: bool) -> tuple[Tensor, Tensor | None]:
            # autograd through vmap(one), not torch.func's grad: its first call imports
            # torch._dynamo (~1 s in a process that never ran an optimizer; pf30)
            try:
                return record_loss_derivatives(one, fd, targets, second=hessian)
            except Exception:  # a loss autograd cannot differentiate through vmap: torch.func
                e = torch.func.vmap(torch.func.grad(one))(fd, targets)
                # reverse-over-reverse (torch.func.hessian's matrix without torch's first forward-AD use, ~0.4 s once per process; pf28, pf29)
                return e, torch.func.vmap(torch.func.jacrev(torch.func.grad(one)))(fd, targets) if hessian else None

        if not second:
            return derivatives(False)
        # Softmax cross-entropy (this batch's dl/do is p - onehot(y)): its Hessian in the
        # outputs is diag(p) - p p' in closed form, once the first such batch has shown the
        # loss's own Hessian equal to it (the per-record Hessian by torch.func costs ~4x the
        # gradient: half an epoch on a small Transformer)
        e, L = derivatives(not self._ce_hessian_checked)
        p = self._ce_probs(fd, targets, e)
        if p is not None and self._ce_hessian_checked:
            return e, torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        if L is None:
            L = derivatives(True)[1]
        assert L is not None
        if p is not None:
            L_ce = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            self._ce_hessian_checked = bool((L - L_ce).abs().max() <= CE_TOLERANCE)
        return e, L

    def _unpack(self, taps: dict, gos: tuple) -> dict[str, Any]:
        """Per layer the gradient(s) at its output(s) from ``autograd.grad``'s flat tuple."""
        res, pos = {}, 0
        for m in self.slots:
            outs = taps[m][1]
            go = [torch.zeros_like(o) if gi is None else gi for gi, o in zip(gos[pos: pos + len(outs)], outs)]
            pos += len(outs)
            if isinstance(self._mods[m], _MHA):
                res[m] = tuple(go)
            elif len(go) == 1:
                res[m] = go[0]
            elif isinstance(self._mods[m], nn.Linear):  # repeated calls: their positions in _repeated_taps' order
                res[m] = torch.cat([g.reshape(g.shape[0], -1, g.shape[-1]) for g in go], 1)
            else:  # a convolution's: [B, C_out, P_1 + ... + P_k], as _patches orders the positions
                res[m] = torch.cat([g.reshape(g.shape[0], g.shape[1], -1) for g in go], -1)
        return res

    def _taps(self, inputs: Any, targets: Any, b: int, second: bool
              ) -> tuple[_BatchTaps, Tensor, list[Tensor], Tensor | None]:
        """Forward and one backward pass (``dl/do``): the batch's taps, plus the outputs
        ``[B, C]`` (in the graph), the layer outputs and ``d2l/do2`` for more directions
        (``second``: then the prepared inputs are kept for the batch, reused by every
        direction; kept taps hold the layer inputs and output gradients only)."""
        # the program's dtype (float32 for large models; the records are stored in the
        # accumulator's dtype): floating inputs and targets cast, indices kept
        inputs, targets = _cast(inputs, self.dtype), _cast(targets, self.dtype)
        taps, f, shape = self._forward(inputs, targets, b)
        self._shape = shape
        self._forward_taps = taps  # the layer outputs, for the backward passes of more directions
        e, L = self._loss_derivatives(f.detach(), targets, shape, second)
        self._e = e  # dl/do of the batch (the sampled-label directions' check)
        outs = [t for m in self.slots for t in taps[m][1]]
        gos = _outputs_grad(f, outs, grad_outputs=e, retain_graph=second)
        x = {m: taps[m][0] for m in self.slots}
        cache = {m: _prepare(self._mods[m], x[m], self.slots[m]) for m in self.slots} if second else {}
        return _BatchTaps(b, x, self._unpack(taps, gos), cache), f, outs, L

    def chunk_rows(self, names: Iterable[str] | None = None, taps: _BatchTaps | None = None) -> int:
        """Records per chunk of per-sample gradients: ``[chunk, numel]`` temporaries of about
        ``CHUNK_FLOATS`` floats (below the allocator's mmap threshold and in cache: float64
        products of a whole batch at once ran 4x slower on page faults alone). An embedding
        table used only as an embedding counts the rows one record can touch (its sparse
        per-sample gradient, ``positions x dim`` with ``taps``), not the table: a 1,000-row
        table no longer cuts a batch into 16-record chunks (Python overhead per chunk)."""
        def size(n: str) -> int:
            emb = self._sparse_slots.get(n)
            if emb is None or taps is None:
                return self._numels[n]
            return min(self._numels[n], sum(_first_row_numel(taps.x[m]) * self._mods[m].embedding_dim for m in emb))

        big = max((size(n) for n in (names if names is not None else self.names)), default=1)
        return max(1, CHUNK_FLOATS // max(big, 1))

    def iter_grads(self, taps: _BatchTaps, names: Iterable[str] | None = None, go: dict[str, Any] | None = None,
                   per_layer: bool = False) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """``(a, c, {name: [c - a, numel] or _Sparse})`` per-sample gradients of records
        ``a:c`` of the batch from its taps (``go``: the output gradients of another direction
        than ``dl/do``); a tied parameter's uses are added up before any square is taken.
        ``per_layer``: one dict per layer and chunk, yielded as soon as it is formed (the
        consumer squares and sums it while it is in cache, and the chunk's gradients of all
        layers are never held at once), when no parameter is tied (else one dict per chunk)."""
        want = set(self.names if names is None else names)
        per_layer = per_layer and not self._tied
        step = self.chunk_rows(want, taps)
        gos = taps.go if go is None else go
        for a in range(0, taps.b, step):
            c = min(taps.b, a + step)
            out: dict[str, Any] = {}
            for m, slot in self.slots.items():
                sub = {k: v for k, v in slot.items() if v in want}
                if not sub:
                    continue
                xs = _slice(taps.x[m], a, c)
                # the batch's prepared inputs (estimation: reused over directions), else per chunk
                cache = ({k: v[a:c] for k, v in taps.cache[m].items()} if m in taps.cache
                         else _prepare(self._mods[m], xs, sub))  # only what sub needs
                grads = _layer_grads(self._mods[m], xs, _slice(gos[m], a, c), sub, cache)
                if per_layer:
                    yield a, c, grads
                    continue
                for k, v in grads.items():
                    out[k] = v if k not in out else _add(out[k], v, c - a)
            if not per_layer:
                yield a, c, out

    def iter_grad_groups(self, taps: _BatchTaps, go: dict[str, Any] | None = None, group: bool = True
                         ) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        """``(a, c, step, {name: [c - a, numel] or _Sparse})`` per layer: the per-sample
        gradients of records ``a:c`` of the batch, to be summed in chunks of ``step`` records
        (:meth:`chunk_rows`, the largest parameter's; a last partial chunk as it comes), as
        :meth:`iter_grads` with ``per_layer`` yields them chunk by chunk. A layer whose dense
        parameters are small takes several chunks (up to the whole batch) in one call, within
        ``CHUNK_FLOATS`` floats per temporary as before: per chunk its products, sums and squares
        are the same operations on the same records (the consumers reduce ``[k, step, numel]``
        views), without a dozen small calls per chunk (each mostly dispatch, and a wake-up of the
        second thread: on a 1e5-weight CNN 12 of 14 parameters are below 2,000 weights).
        ``group=False``, a tied parameter or an embedding's sparse gradients: one chunk per call."""
        step = self.chunk_rows(None, taps)
        if self._tied:  # tied uses are added up per chunk (iter_grads)
            for a, c, g in self.iter_grads(taps, go=go, per_layer=True):
                yield a, c, c - a, g
            return
        gos = taps.go if go is None else go
        for m, slot in self.slots.items():
            rows = step
            if group and not any(n in self._sparse_slots for n in slot.values()):
                fit = CHUNK_FLOATS // max(sum(self._numels[n] for n in slot.values()), 1)
                rows = taps.b if fit >= taps.b else max(step, fit // step * step)
            for a in range(0, taps.b, rows):
                c = min(taps.b, a + rows)
                xs = _slice(taps.x[m], a, c)
                cache = ({k: v[a:c] for k, v in taps.cache[m].items()} if m in taps.cache
                         else _prepare(self._mods[m], xs, slot))
                yield a, c, step, _layer_grads(self._mods[m], xs, _slice(gos[m], a, c), slot, cache)

    def batch(self, inputs: Any, targets: Any, b: int, ggn: bool = True, squares: bool = True
              ) -> tuple[_BatchTaps, dict[str, Tensor], dict[str, Tensor] | None]:
        """One forward and ``1 + k`` backward passes: the batch's taps (layer inputs and loss
        gradients at the outputs, from which every per-sample gradient follows), its
        Gauss-Newton diagonal sums ``{name: [numel]}`` float64 (zeros with ``ggn=False``) and,
        for the sampled-label estimate, a bound on their Monte Carlo variance (else ``None``).

        ``k`` is ``rank(L)`` for the exact diagonal (:attr:`ggn_mode` ``"ggn"``; ``rank(L) - 1``
        for softmax cross-entropy, whose loss gradient is one direction, :meth:`_ce_directions`:
        its share, :attr:`_BatchTaps.base_weight`, is added by :meth:`batch_sums`) and
        :attr:`mc_samples` for the Monte Carlo one (``"ggn_mc"``: per record, a direction
        ``a`` with ``E[a a'] = L``, see :meth:`_mc_directions`); ``"auto"`` takes the Monte
        Carlo one when ``rank(L) > GGN_EXACT_MAX_DIRECTIONS`` on the first batch and keeps
        that choice (:attr:`ggn_choice`). Per-sample products are formed a chunk of records at a
        time (:meth:`chunk_rows`) in the program's dtype; the sums are float64. ``squares=False``:
        the directions' Kronecker factors only (:attr:`kron_rows`), the diagonal sums left zero
        (the side program of an estimator whose Hessian diagonal comes from elsewhere)."""
        f64 = torch.float64
        draw_keys, self.draw_keys = self.draw_keys, None  # this batch's only
        h_all = {k: torch.zeros(self._numels[k], dtype=f64) for k in self.names}
        h2_all = None
        with torch.enable_grad():
            taps, f, outs, L = self._taps(inputs, targets, b, second=ggn)
            if ggn:
                assert L is not None
                c = f.shape[1]
                lam, vec = torch.linalg.eigh(0.5 * (L + L.transpose(1, 2)))
                # directions within rounding of 0 (a softmax's constant direction: ~1e-8 of the
                # largest in float32) are dropped: a backward pass for nothing, and one too many
                # for "auto"'s count
                rel = max(1e-12, 100 * torch.finfo(lam.dtype).eps)
                keep = [k for k in range(c) if lam[:, k].abs().max() > rel * max(float(lam.abs().max()), 1e-300)]
                if self.ggn_choice is None:  # decided once, on the first batch
                    mc = self.ggn_mode == "ggn_mc" or (self.ggn_mode == "auto" and len(keep) > GGN_EXACT_MAX_DIRECTIONS)
                    self.ggn_choice, self.ggn_directions = ("ggn_mc" if mc else "ggn"), len(keep)
                if self.ggn_choice == "ggn_mc":
                    keys = draw_keys if draw_keys is not None else record_keys(inputs, targets, b)
                    if keys.shape != (b,):
                        raise ValueError(f"draw_keys: {tuple(keys.shape)} keys for a batch of {b} records")
                    dirs = self._mc_directions(f.detach(), _cast(targets, self.dtype), L, lam, vec, keys)
                    h2_all = {k: torch.zeros(self._numels[k], dtype=f64) for k in self.names}
                else:
                    split = self._ce_directions(f.detach(), _cast(targets, self.dtype), L, rel * float(lam.abs().max()))
                    if split is not None:  # dl/do is one direction: its squares come with batch_sums
                        taps.base_weight, dirs = split
                    else:
                        dirs = [(vec[:, :, k] * lam[:, k].abs().sqrt().unsqueeze(-1), lam[:, k].sign()) for k in keep]
                # the K-FAC output factors: G = sum over the Gauss-Newton directions (and records, and
                # positions) of their weighted output-gradient outer products, as the diagonal's squares
                kron = self._kron_start()
                if kron and taps.base_weight is not None:
                    self._kron_add(kron, taps, taps.go, taps.base_weight)
                for i, (vdir, sgn) in enumerate(dirs):
                    gos = _outputs_grad(f, outs, grad_outputs=vdir.to(f.dtype), retain_graph=i < len(dirs) - 1)
                    go = self._unpack(self._forward_taps, gos)
                    if squares:
                        self._add_squares(taps, go, sgn, h_all, h2_all, self.mc_samples)
                    if kron:
                        # every direction's own outer products (a random-sign mix of the directions,
                        # 1 / directions of the cost, read sigma 1-16% apart between two mixes on a
                        # 3-class CNN at 256 records: tests/test_ggn_mc.py's float32 / float64 check)
                        self._kron_add(kron, taps, go, sgn if h2_all is None else sgn / self.mc_samples)
                if kron:
                    for m in list(self._kron_pending):
                        self._kron_flush(kron, taps, m)
                    rows = self.kron_rows or {}
                    taps.kron = {m: (A, G, rows[m], pos) for m, (A, G, pos) in kron.items()}
        self._forward_taps = {}
        if not self._verified:
            self._verify(inputs, targets, taps)
        return taps, h_all, h2_all

    def _add_squares(self, taps: _BatchTaps, go: dict[str, Any], sgn: Tensor, h_all: dict[str, Tensor],
                     h2_all: dict[str, Tensor] | None, num: int) -> None:
        """Add one direction's per-sample squares ``sum_r sgn_r (J_r' a_r)_j^2`` to ``h_all``
        (float64). With ``h2_all`` (a Monte Carlo direction, drawn ``num`` times per record)
        they enter with weight ``1 / num`` and ``h2_all`` gets ``sum_r (J_r' a_r)_j^4 / num^2``:
        per record ``E[X^2] / num`` bounds ``Var(mean of num draws of X)`` from above."""
        f64 = torch.float64
        w = sgn if h2_all is None else sgn / num
        for a0, c0, step, grads in self.iter_grad_groups(taps, go=go):
            for name, v in grads.items():
                if isinstance(v, _Sparse):  # per-record squares, weighted by the sign
                    sq = v.g.square()
                    h_all[name].view(v.shape).index_add_(0, v.row, (sq * w[a0:c0][v.sample].unsqueeze(-1)).to(f64))
                    if h2_all is not None:
                        h2_all[name].view(v.shape).index_add_(0, v.row, sq.square().to(f64) / num ** 2)
                    continue
                v = v.reshape(c0 - a0, -1)
                for a, cc, k in _chunk_groups(a0, c0, step):
                    if k:  # k whole chunks at once: per chunk the same GEMV and sums
                        sq = v[a - a0: cc - a0].reshape(k, step, -1).square_()
                        h_all[name] += _gemvs(sq, w[a:cc].to(sq.dtype).reshape(k, step)).to(f64).sum(0)
                        if h2_all is not None:
                            h2_all[name] += (sq.square_().sum(1).to(f64) / num ** 2).sum(0)
                        continue
                    # v is this chunk's own tensor: squared in place, summed by a GEMV
                    sq = v[a - a0: cc - a0].square_()
                    h_all[name] += (sq.T @ w[a:cc].to(sq.dtype)).to(f64)
                    if h2_all is not None:
                        h2_all[name] += sq.square_().sum(0).to(f64) / num ** 2

    def _ce_directions(self, fd: Tensor, targets: Any, L: Tensor, floor: float
                       ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]] | None:
        """Softmax cross-entropy's exact Gauss-Newton factors with the loss gradient as one of
        them: ``(w [B], [(a [B, C], sign [B]), ...])`` such that per record
        ``L = w e e' + sum_k a_k a_k'`` (``e = dl/do = p - onehot(y)``), or ``None`` when the
        batch's loss is not softmax cross-entropy on class labels (:meth:`_softmax_ce`).

        ``L = diag(p) - p p'`` solves ``L x = e`` at ``x = -onehot(y) / p_y``, so
        ``e' L^+ e = (1 - p_y) / p_y`` and ``L - e e' p_y / (1 - p_y)`` is positive
        semi-definite of rank ``C - 2`` (the Schur complement of the ``e`` direction). The
        squares of ``J' e`` are the per-sample gradients' own (formed anyway for the gradient
        moments), so the exact diagonal costs ``C - 2`` backward passes and per-sample
        products instead of ``C - 1``: one fewer for every class count (none at ``C = 2``).
        Computed in float64 (``1 - p_y`` as ``sum_{c != y} p_c``: no cancellation); rest
        directions with no eigenvalue above ``floor`` in the batch are dropped. ``None`` too
        when a record is near-certain (``w > CE_BASE_WEIGHT_MAX``): its ``e``, the loss's own
        gradient in the program's dtype, is then mostly rounding (``e = 0`` against an infinite
        ``w`` in float32 past a logit gap of ~100), and the eigen-directions of ``L`` serve."""
        if self._softmax_ce(fd, targets, L) is None:
            return None
        f64 = torch.float64
        b, c = fd.shape
        p = torch.softmax(fd.to(f64), -1)
        hot = torch.nn.functional.one_hot(targets.long(), c).to(f64)
        q = (p * (1 - hot)).sum(-1)  # 1 - p_y
        w = (p * hot).sum(-1) / q.clamp_min(1e-300)
        if not bool((w <= CE_BASE_WEIGHT_MAX).all()):
            return None
        e = p * (1 - hot) - hot * q.unsqueeze(-1)
        rest = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2) - w.reshape(b, 1, 1) * e.unsqueeze(-1) * e.unsqueeze(-2)
        lam, vec = torch.linalg.eigh(0.5 * (rest + rest.transpose(1, 2)))
        lam = lam.clamp_min(0.0)
        ones = torch.ones(b, dtype=fd.dtype)
        dirs = [(vec[:, :, k] * lam[:, k].sqrt().unsqueeze(-1), ones) for k in range(2, c)
                if float(lam[:, k].max()) > floor]
        return w.to(fd.dtype), dirs

    def _mc_directions(self, fd: Tensor, targets: Any, L: Tensor, lam: Tensor, vec: Tensor, keys: Tensor
                       ) -> list[tuple[Tensor, Tensor]]:
        """:attr:`mc_samples` directions ``(a [B, C], sign [B])`` per record with
        ``E[a a'] = L`` (the loss Hessian in the outputs), each record's a function of its
        content key (``keys [B]``), :attr:`mc_seed` and the draw index only
        (:mod:`~mis_lightning.estimation.record_draws`): the same whatever the batch size,
        order or process split.

        Softmax cross-entropy on class labels (checked on the batch: ``dl/do = p - onehot(y)``
        and ``L = diag(p) - p p'`` with ``p = softmax(o)``): ``a = dl/do`` at a label drawn
        from the model's predictive distribution ``p`` (the sampled-label Gauss-Newton,
        BackPACK's ``DiagGGNMC``; ``p - onehot(y~)``, as the check allows). Any other loss: ``a = V |Lambda|^{1/2} xi`` with Rademacher
        ``xi`` over the eigen-directions of ``L`` (the same covariance), one direction for the
        positive and (where ``L`` is indefinite) one with sign ``-1`` for the negative part."""
        S = self.mc_samples
        b, c = fd.shape
        keys = keys.to(fd.device)
        p = self._softmax_ce(fd, targets, L)
        if p is not None:
            ys = record_labels(p, keys, self.mc_seed, S)  # [S, B]
            return [(p - torch.nn.functional.one_hot(y, c).to(p.dtype), torch.ones(b, dtype=fd.dtype)) for y in ys]
        scale = lam.abs().sqrt()
        # eigenvalues within rounding of 0 (e.g. a softmax's constant direction) are 0: no
        # backward pass for a negative part that is only rounding
        tol = 100 * torch.finfo(lam.dtype).eps * max(float(lam.abs().max()), 1e-300)
        out = []
        for xi in record_signs(keys, self.mc_seed, S, c, stream=1).to(lam.dtype):  # [B, C] each
            for part, sign in ((lam > tol, 1.0), (lam < -tol, -1.0)):
                if part.any():
                    a = torch.einsum("bck,bk->bc", vec, scale * xi * part)
                    out.append((a, torch.full((b,), sign, dtype=fd.dtype)))
        return out

    def _ce_probs(self, fd: Tensor, targets: Any, e: Tensor) -> Tensor | None:
        """``p = softmax(o)`` ``[B, C]`` when the batch's per-record gradients ``e = dl/do``
        equal ``p - onehot(y)`` to :data:`CE_TOLERANCE` on class labels ``[B]`` (softmax
        cross-entropy; its entries are at most 1), else ``None``."""
        if not (isinstance(targets, Tensor) and targets.dim() == 1 and not targets.is_floating_point()
                and len(record_shape(self._shape) or ()) == 1 and fd.shape[1] > 1 and targets.shape[0] == fd.shape[0]):
            return None
        if int(targets.min()) < 0 or int(targets.max()) >= fd.shape[1]:
            return None
        p = torch.softmax(fd, -1)
        e_ce = p - torch.nn.functional.one_hot(targets.long(), fd.shape[1]).to(p.dtype)
        return p if bool((e - e_ce).abs().max() <= CE_TOLERANCE) else None

    def _softmax_ce(self, fd: Tensor, targets: Any, L: Tensor) -> Tensor | None:
        """``p = softmax(o)`` ``[B, C]`` when the batch's loss is softmax cross-entropy on class
        labels ``[B]`` (its gradient ``dl/do`` (:meth:`_taps`) and Hessian ``L`` in the outputs
        equal ``p - onehot(y)`` and ``diag(p) - p p'`` to :data:`CE_TOLERANCE`), else ``None``."""
        p = self._ce_probs(fd, targets, self._e)
        if p is None:
            return None
        L_ce = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return p if bool((L - L_ce).abs().max() <= CE_TOLERANCE) else None

    def _make_kron_blocks(self, holders: dict[str, list[str]]) -> dict[str, KronBlock]:
        """The layers of :meth:`kron_blocks`: every convolution and nn.Linear holding no parameter
        of another layer (tied weights: a sum of uses, no Kronecker factor), where the model has
        at least one convolution, or where every assessed layer is an nn.Linear (the
        layouts :class:`FactoredProgram` takes, on this path only where its batch could not: several
        outputs per record, e.g. an MLP classifier; a single-output MLP keeps the FactoredProgram's
        factors, which the accumulator prefers). Other models without convolutions (norms,
        embeddings, attention) get none, as before. :attr:`kron_conv` says which case."""
        conv = (*_CONVS, *_TRANSPOSED)
        self.kron_conv = any(isinstance(mod, conv) for mod in self._mods.values())
        if not self.kron_conv and (self._tied or KFAC_CONV_FACTORS != "trace"
                                   or not all(type(mod) is nn.Linear for mod in self._mods.values())):
            return {}
        out: dict[str, KronBlock] = {}
        for m, slot in self.slots.items():
            mod = self._mods[m]
            if not isinstance(mod, (*conv, nn.Linear)) or any(len(holders[n]) > 1 for n in slot.values()):
                continue
            if isinstance(mod, nn.Linear):
                groups, fan, q = 1, mod.in_features, mod.out_features
            else:
                groups = mod.groups
                fan, q = mod.in_channels // groups * math.prod(mod.kernel_size), mod.out_channels // groups
            tr = tuple(mod.kernel_size) if isinstance(mod, _TRANSPOSED) else ()
            out[m] = KronBlock(m, slot.get("weight"), slot.get("bias"), groups, fan, q, tr)
        return out

    def kron_blocks(self) -> dict[str, KronBlock]:
        """``{module: KronBlock}``: the convolutions and nn.Linear layers (any number of positions)
        whose K-FAC / KFC factors :meth:`kron_sums` forms (Grosse & Martens 2016; method.md
        section 4, "The diagonal sandwich and correlated weights"), without the width cap of
        :meth:`kron_layers`; empty for a model without a convolution."""
        return self._kron_blocks

    def kron_layers(self) -> dict[str, tuple[int, int]]:
        """``{module: (p, out)}`` per group (:class:`KronBlock`), the blocks of :meth:`kron_blocks`
        with ``p`` and ``out`` at most :data:`KFAC_MAX_WIDTH` (as :meth:`FactoredProgram.kron_layers`)."""
        return {m: (blk.p, blk.out) for m, blk in self._kron_blocks.items() if max(blk.p, blk.out) <= KFAC_MAX_WIDTH}

    def _kron_start(self) -> dict[str, list]:
        """Zero float64 factors ``[A [groups, p, p] or None, G [groups, out, out], rows]`` of the
        layers with records to sum (:attr:`kron_rows`; ``A`` None for :data:`KFAC_CONV_FACTORS`
        ``"kfc"``, whose ``A`` :meth:`kron_sums` forms from the inputs alone)."""
        rows = self.kron_rows or {}
        f64 = torch.float64
        self._kron_pending = {}
        return {m: [torch.zeros(self._kron_blocks[m].groups, p, p, dtype=f64) if KFAC_CONV_FACTORS == "trace" else None,
                    torch.zeros(self._kron_blocks[m].groups, q, q, dtype=f64), 0]
                for m, (p, q) in self.kron_layers().items() if rows.get(m, 0) > 0}

    def _kron_out(self, m: str, go: Tensor, a: int, c: int) -> Tensor:
        """A layer's output gradients of records ``a:c`` as ``[c - a, groups, out, positions]``."""
        blk, mod = self._kron_blocks[m], self._mods[m]
        go = go[a:c]
        if isinstance(mod, nn.Linear):
            return go.reshape(c - a, -1, blk.out).transpose(1, 2).unsqueeze(1)
        return go.reshape(c - a, blk.groups, blk.out, -1)

    def _kron_add(self, kron: dict[str, list], taps: _BatchTaps, go: dict[str, Any], w: Tensor) -> None:
        """Add one Gauss-Newton direction's share (``w [B]``: each record's weight, the direction's
        sign; ``go``: its output gradients per layer) of each layer's factors over its first
        :attr:`kron_rows` records. ``"kfc"``: ``G += sum_r w_r sum_t delta_rt delta_rt^T`` (positions
        ``t``). ``"trace"``: with ``g_r [out, p]`` the record's gradient in the direction (bias
        column last) per group, ``A += sum_r w_r g_r^T g_r`` and ``G += sum_r w_r g_r g_r^T``: the
        Gauss-Newton block's two partial traces, whose product is the block itself wherever it is a
        Kronecker product (any spatial correlation of the output gradients: global pooling too)."""
        for m, acc in kron.items():
            r = (self.kron_rows or {})[m]
            blk = self._kron_blocks[m]
            if KFAC_CONV_FACTORS != "trace":
                Z = self._kron_out(m, go[m], 0, r).to(torch.float64)  # float64 outer products (below)
                Zw = Z * w[:r].to(Z.dtype).reshape(r, 1, 1, 1)
                acc[1] += torch.einsum("rgot,rgqt->goq", Zw, Z).to(torch.float64)
                continue
            x = taps.x[m]
            if not self.kron_conv and isinstance(x, Tensor) and x.dim() == 2:
                # an all-Linear model's layer on [B, in] inputs (kf33): the gradient is rank one,
                # g_r = delta_r a_r^T, so A = sum_r w_r |delta_r|^2 a_r a_r^T and G = sum_r w_r |a_r|^2
                # delta_r delta_r^T: p^2 + out^2 multiply-adds per record, not out p (p + out)
                d = go[m][:r].reshape(r, blk.out).to(torch.float64)
                u = x[:r].to(torch.float64) if blk.weight is not None else torch.zeros(r, 0, dtype=torch.float64)
                if blk.bias is not None:
                    u = torch.cat([u, torch.ones(r, 1, dtype=torch.float64)], 1)
                wr = w[:r].to(torch.float64)
                acc[0][0] += (u * (wr * d.square().sum(1)).unsqueeze(1)).T @ u
                acc[1][0] += (d * (wr * u.square().sum(1)).unsqueeze(1)).T @ d
                acc[2] = r
                continue
            if not self.kron_conv:
                if m not in self.kron_positions and m in (self.kron_rows_positions or {}):
                    assert self.kron_rows is not None and self.kron_rows_positions is not None
                    r = self.kron_rows[m] = min(r, self.kron_rows_positions[m])
                self.kron_positions.add(m)
            if not blk.transposed:
                # the directions' outer products in one product per layer and batch (the patches formed
                # once: kf43's sample brings K-FAC rows into every batch, the per-call cost counts)
                pend = self._kron_pending.setdefault(m, [])
                pend.append((go[m], w))
                if sum(t.numel() for t, _ in pend) >= CHUNK_FLOATS * 4:
                    self._kron_flush(kron, taps, m)
                continue
            a, step = 0, 1
            while a < r:
                c = min(r, a + step)
                if blk.transposed:  # from the output gradient's patches (no zero-stuffed input patches)
                    g, positions = self._transposed_kron_grads(m, taps, go[m], a, c), 1
                else:
                    U = self._kron_in(m, taps, a, c)  # [c - a, groups, p, positions]
                    Z = self._kron_out(m, go[m], a, c)
                    # the per-sample gradients [c - a, groups, out, p]; their outer products in float64:
                    # a float32 GEMM's rounding (~1e-7 of the entries) lifts a factor's exact null
                    # directions above KFAC_RCOND, and their pseudo-inverse then read sigma up to ~900x
                    # the float64 pass's (tests/test_ggn_mc.py's float32 / float64 check)
                    g, positions = torch.einsum("rgot,rgkt->rgok", Z, U), U.shape[-1]
                g = g.to(torch.float64)
                gw = g * w[a:c].to(g.dtype).reshape(-1, 1, 1, 1)
                acc[0] += torch.einsum("rgok,rgol->gkl", gw, g).to(torch.float64)
                acc[1] += torch.einsum("rgok,rgqk->goq", gw, g).to(torch.float64)
                a = c
                step = max(1, CHUNK_FLOATS * 4 // max(blk.groups * max(blk.p * positions, blk.out * blk.p), 1))
            acc[2] = r

    def _kron_flush(self, kron: dict[str, list], taps: _BatchTaps, m: str) -> None:
        """Add layer ``m``'s pending directions (:meth:`_kron_add`: ``D`` output gradients and
        weights) to its partial traces over its first :attr:`kron_rows` records: per chunk of
        records the patches ``U`` once and ``g = Z U^T`` of every direction at once, ``A +=
        sum_dr w_dr g_dr^T g_dr``, ``G += sum_dr w_dr g_dr g_dr^T`` (float64, as per direction)."""
        pend = self._kron_pending.pop(m, None)
        if not pend:
            return
        acc, r, blk = kron[m], (self.kron_rows or {})[m], self._kron_blocks[m]
        positions = pend[0][0][:1].numel() // max(blk.groups * blk.out, 1)
        a, step = 0, max(1, CHUNK_FLOATS * 4 // max(len(pend) * blk.groups * max(blk.p * positions, blk.out * blk.p), 1))
        while a < r:
            c = min(r, a + step)
            U = self._kron_in(m, taps, a, c)  # [c - a, groups, p, positions]
            Z = torch.stack([self._kron_out(m, go, a, c) for go, _ in pend])  # [D, c - a, groups, out, positions]
            # float64 outer products: see the transposed path below (float32 lifts null directions)
            g = torch.einsum("drgot,rgkt->drgok", Z, U).to(torch.float64)
            W = torch.stack([w[a:c].to(torch.float64) for _, w in pend])
            gw = g * W.reshape(*W.shape, 1, 1, 1)
            acc[0] += torch.einsum("drgok,drgol->gkl", gw, g)
            acc[1] += torch.einsum("drgok,drgqk->goq", gw, g)
            a = c
            step = max(1, CHUNK_FLOATS * 4 // max(len(pend) * blk.groups * max(blk.p * U.shape[-1], blk.out * blk.p), 1))
        acc[2] = r

    def _transposed_kron_grads(self, m: str, taps: _BatchTaps, go: Tensor, a: int, c: int) -> Tensor:
        """A transposed convolution's per-sample gradients of records ``a:c`` in its block's layout
        ``[c - a, groups, out, p]`` (bias column last), as :meth:`_kron_add`'s product of
        :meth:`_kron_in` and :meth:`_kron_out` would give them, from :func:`_transposed_grad_patches`
        (the input's patches have ``stride^dims`` times the positions, mostly zeros: the factors took
        ~70% of a small decoder's estimation through them)."""
        blk, mod = self._kron_blocks[m], self._mods[m]
        r, gor = c - a, go[a:c]
        parts = []
        if blk.weight is not None:
            pg = _transposed_grad_patches(mod, gor, _transposed_output_padding(mod, taps.x[m], gor))
            gw = taps.x[m][a:c].reshape(r, blk.groups, -1, pg.shape[-1]) @ pg.transpose(-1, -2)
            parts.append(blk.to_block(gw.reshape(r, -1)))
        if blk.bias is not None:
            parts.append(gor.reshape(r, blk.groups, blk.out, -1).sum(-1, keepdim=True))
        return torch.cat(parts, -1)

    def _kron_in(self, m: str, taps: _BatchTaps, a: int, c: int) -> Tensor:
        """A layer's inputs of records ``a:c`` as ``[c - a, groups, p, positions]`` (the patches
        of a convolution, a Linear's inputs over its positions; a trailing 1 for an assessed bias)."""
        blk, mod = self._kron_blocks[m], self._mods[m]
        r = c - a
        go = taps.go.get(m)  # a transposed convolution's call's output padding (output_size) from its shape
        op = (_transposed_output_padding(mod, taps.x[m], go)
              if isinstance(mod, _TRANSPOSED) and isinstance(go, Tensor) else None)
        if blk.weight is None:
            x = taps.x[m]
            pos = (math.prod(x.shape[1:-1]) if isinstance(mod, nn.Linear)
                   else math.prod(_conv_patches(mod, _slice(x, a, a + 1), op).shape[3:]))
            return torch.ones(r, 1, 1, pos, dtype=self.dtype)
        if isinstance(mod, nn.Linear):
            x = taps.x[m][a:c]
            u = x.reshape(r, -1, blk.fan).transpose(1, 2).unsqueeze(1)
        else:
            cache = taps.cache.get(m) or {}
            u = cache["u"][a:c] if "u" in cache else _conv_patches(mod, _slice(taps.x[m], a, c), op)
        if blk.bias is not None:
            u = torch.cat([u, torch.ones(r, blk.groups, 1, u.shape[-1], dtype=u.dtype)], 2)
        return u

    def kron_sums(self, fac: tuple[_BatchTaps, Any, Any], acc: torch.dtype, rows: dict[str, int] | None = None
                  ) -> dict[str, tuple[Tensor, Tensor, int]]:
        """Per layer of :meth:`kron_layers` with rows the batch's Kronecker factors ``A``
        ``[groups, p, p]`` and ``G`` ``[groups, out, out]`` over its first ``rows[m]`` records (formed
        by :meth:`batch` with the same :attr:`kron_rows`) and the rows they summed, by
        :data:`KFAC_CONV_FACTORS`: ``"trace"`` the Gauss-Newton block's partial traces (rows: 0,
        no subsample rescaling), ``"kfc"`` KFC's (Grosse & Martens 2016: ``A = sum_r sum_t u_rt u_rt^T`` over the
        patches ``u``, rows: records x positions). Their product's overall scale is not the
        Hessian's: the accumulator matches it to the Gauss-Newton diagonal's trace
        (``MomentAccumulator._kfac_blocks``). Returned in ``acc``."""
        taps = fac[0]
        res: dict[str, tuple[Tensor, Tensor, int]] = {}
        for m, (p, _) in self.kron_layers().items():
            r = 0 if rows is None else rows.get(m, 0)
            if r <= 0 or taps.kron is None or m not in taps.kron:
                continue
            A, G, rg, done = taps.kron[m]
            if rg != r:
                raise RuntimeError(f"K-FAC factors of layer {m!r}: G summed {rg} records, A would sum {r}")
            if A is not None:  # the partial traces: 0 rows, no Wishart rescaling (see KFAC_TRACE_MIN_RECORDS)
                res[m] = (A.to(acc), G.to(acc), 0)
                continue
            blk = self._kron_blocks[m]
            A = torch.zeros(blk.groups, p, p, dtype=torch.float64)
            step, pos, a = 1, 0, 0
            while a < r:
                u = self._kron_in(m, taps, a, min(r, a + step)).to(torch.float64)
                A += torch.einsum("rgkt,rglt->gkl", u, u)
                pos += u.shape[0] * u.shape[-1]
                a += u.shape[0]
                step = max(1, CHUNK_FLOATS * 4 // max(blk.groups * p * u.shape[-1], 1))
            res[m] = (A.to(acc), G.to(acc), pos)
        return res

    def record_taps(self, inputs: Any, targets: Any, b: int) -> _BatchTaps:
        """One forward and one backward pass of the loss over a block of records: per layer
        its input and the loss gradient at its output(s), detached; every assessed
        parameter's per-sample gradient follows from these (:meth:`iter_grads`)."""
        with torch.enable_grad():
            taps, *_ = self._taps(inputs, targets, b, second=False)
        self._forward_taps = {}
        return taps

    def grads_from_taps(self, taps: _BatchTaps, names: list[str]) -> dict[str, Tensor]:
        """Dense per-sample gradients ``{name: [B, numel]}`` of ``names`` from the taps."""
        parts = [(c - a, g) for a, c, g in self.iter_grads(taps, names)]
        return {n: torch.cat([_dense(g[n], r) for r, g in parts]) for n in names}

    def _numel(self, name: str) -> int:
        return self._numels[name]

    def _verify(self, inputs: Any, targets: Any, taps: _BatchTaps) -> None:
        """Per-sample gradients of (up to) two records against torch.func's (``reference``):
        a parameter also used outside its layer, a batch dimension not first, or any layer
        semantics the formulas miss shows up here. Tolerance 1e-8 (float64) / 1e-4 (float32)
        relative to the largest gradient."""
        if self.reference is None:
            self._verified = True
            return
        take = min(2, _first_dim(targets))
        x2 = torch.utils._pytree.tree_map(lambda t: t[:take] if isinstance(t, Tensor) else t, inputs)
        y2 = torch.utils._pytree.tree_map(lambda t: t[:take] if isinstance(t, Tensor) else t, targets)
        with ignoring(("There is a performance drop", Warning)):  # torch.func on attention's notices
            try:
                ref = self.reference.per_sample_grads(x2, y2)
            except RuntimeError:  # a forward vmap cannot batch (a frozen LSTM encoder): per record
                ref = self.reference.per_sample_grads(x2, y2, looped=True)
        tol = 1e-8 if self.dtype == torch.float64 else 1e-4
        got_all = self.grads_from_taps(taps.rows(slice(0, take)), self.names)
        # a parameter whose gradients cancel (a convolution's bias before a GroupNorm or InstanceNorm:
        # its output gradients sum to zero over the positions) holds rounding in both forms: it is
        # compared to VERIFY_ROUNDING_FLOOR of the largest gradient, not to its own
        top = max((float(ref[n].abs().max()) for n in got_all), default=0.0)
        for n, got in got_all.items():
            want = ref[n].reshape(take, -1).to(got.dtype)
            bound = max(tol * float(want.abs().max()), VERIFY_ROUNDING_FLOOR * top, tol * 1e-30)
            if float((got - want).abs().max()) > bound:
                raise NotImplementedError(f"per-sample gradients of {n!r} differ from torch.func's")
        self._verified = True

    def select_rows(self, fac: tuple[_BatchTaps, dict[str, Tensor], Any], rows: Tensor
                    ) -> tuple[_BatchTaps, dict[str, Tensor], Any]:
        """The taps of the records ``rows`` of a batch."""
        return fac[0].rows(rows), fac[1], fac[2]

    def batch_sums(self, fac: tuple[_BatchTaps, dict[str, Tensor], dict[str, Tensor] | None], acc: torch.dtype
                   ) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor, Tensor | None]], Tensor]:
        """Per assessed parameter ``(sum g, sum g^2, GGN diagonal sum, its Monte Carlo
        variance bound or None)`` (flat, in ``acc``) and the sum over records of ``|g_i|^2``
        ``[1]``. Products are formed a chunk of records at a time in the program's dtype
        (float32 for large models) and summed over chunks in ``acc`` (float64)."""
        taps, h_all, h2_all = fac
        s1 = {n: torch.zeros(self._numels[n], dtype=acc) for n in self.names}
        s2 = {n: torch.zeros(self._numels[n], dtype=acc) for n in self.names}
        bw = taps.base_weight  # the loss gradient's own share of the exact Gauss-Newton diagonal
        f64 = torch.float64
        # chunks grouped only where their float64 sums are added up in float64 (reassociated)
        for a0, c0, step, grads in self.iter_grad_groups(taps, group=acc == f64):
            for n, v in grads.items():
                if isinstance(v, _Sparse):
                    s1[n] += v.sum().to(acc)
                    sq = v.g.square()
                    s2[n] += v.sum_sq(sq).to(acc)
                    if bw is not None:
                        h_all[n].view(v.shape).index_add_(0, v.row, (sq * bw[a0:c0][v.sample].unsqueeze(-1)).to(f64))
                    continue
                v = v.reshape(c0 - a0, -1)
                for a, c, k in _chunk_groups(a0, c0, step):
                    if k:  # k whole chunks at once: per chunk the same sums and GEMV
                        vk = v[a - a0: c - a0].reshape(k, step, -1)
                        s1[n] += vk.sum(1).to(acc).sum(0)
                        sq = vk.square_()
                        s2[n] += sq.sum(1).to(acc).sum(0)
                        if bw is not None:
                            h_all[n] += _gemvs(sq, bw[a:c].to(sq.dtype).reshape(k, step)).to(f64).sum(0)
                        continue
                    vc = v[a - a0: c - a0]
                    s1[n] += vc.sum(0).to(acc)
                    sq = vc.square_()  # the chunk's own tensor, squared in place
                    s2[n] += sq.sum(0).to(acc)
                    if bw is not None:
                        h_all[n] += (sq.T @ bw[a:c].to(sq.dtype)).to(f64)
        out = {n: (s1[n], s2[n], h_all[n].to(acc), None if h2_all is None else h2_all[n].to(acc))
               for n in self.names}
        norm = sum((s2[n].sum() for n in self.names), torch.zeros((), dtype=acc))
        return out, norm.reshape(1)

    def record_gradients(self, fac: tuple[_BatchTaps, dict[str, Tensor]], take: int) -> Tensor:
        """Flat per-sample gradients ``[take, d]`` in ``names`` order."""
        g = self.grads_from_taps(fac[0].rows(slice(0, take)), self.names)
        return torch.cat([g[n] for n in self.names], dim=1)

    def per_sample_grads(self, inputs: Any, targets: Any, names: list[str] | None = None) -> dict[str, Tensor]:
        """``{name: [B, numel]}`` per-sample loss gradients: one forward and one backward pass
        (:meth:`record_taps`) for all of ``names`` (default: every assessed parameter)."""
        return self.grads_from_taps(self.record_taps(inputs, targets, _first_dim(targets)), list(names or self.names))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _chunk_groups(a0: int, c0: int, step: int) -> list[tuple[int, int, int]]:
    """Records ``a0:c0`` (a block of :meth:`LayerProgram.iter_grad_groups`) as ``(a, c, k)``:
    ``k > 1`` whole chunks of ``step`` records summed as ``[k, step, numel]`` views (the same
    float32 sums per chunk as one at a time, bit for bit: tested), then the rest one chunk at
    a time (``k = 0``)."""
    k = (c0 - a0) // step
    out = [(a0, a0 + k * step, k)] if k > 1 else []
    out += [(a, min(c0, a + step), 0) for a in range(a0 + (k * step if k > 1 else 0), c0, step)]
    return out


def _gemvs(sq: Tensor, w: Tensor) -> Tensor:
    """``[k, numel]``: per chunk ``i`` the GEMV ``sq[i]' w[i]`` of ``sq [k, step, numel]`` and
    ``w [k, step]``, one GEMV per chunk as for a lone chunk (a batched ``[k, numel, step] x
    [k, step, 1]`` product was 60x slower: no BLAS kernel for it)."""
    return torch.stack([sq[i].T @ w[i] for i in range(sq.shape[0])])


def _add(a: Any, b: Any, rows: int) -> Any:
    """The sum of two per-sample gradients of one tied parameter (dense ``[B, numel]`` or
    :class:`_Sparse`); two sparse ones stay sparse."""
    if isinstance(a, _Sparse) and isinstance(b, _Sparse):
        num = a.shape[0]
        key = torch.cat([a.sample * num + a.row, b.sample * num + b.row])
        uniq, inv = torch.unique(key, return_inverse=True)
        g = torch.zeros(uniq.numel(), a.shape[1], dtype=a.g.dtype).index_add_(0, inv, torch.cat([a.g, b.g]))
        return _Sparse(torch.div(uniq, num, rounding_mode="floor"), uniq % num, g, a.shape)
    da = a.dense(rows) if isinstance(a, _Sparse) else a
    db = b.dense(rows) if isinstance(b, _Sparse) else b
    return da + db



def _first_row_numel(x: Any) -> int:
    """Elements of one record of a layer input (an embedding's indices: its positions)."""
    return int(x[0].numel()) if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] else 1


def _first_dim(tree: Any) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, Tensor)]
    return int(leaves[0].shape[0]) if leaves else len(tree)


__all__ = ["GGN_EXACT_MAX_DIRECTIONS", "FactoredProgram", "LayerProgram", "LinearFactors", "factored_power_sums", "iterate_factor_blocks", "linear_layout"]
