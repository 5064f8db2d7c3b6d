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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._modelcopy import private_copy
from .per_sample import LossFn


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
        self.loss_fn = loss_fn
        self.model = private_copy(model, "copying the model for the factored nn.Linear estimation").to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.capture = _Capture(self.model, list(layout))
        self._verified = False

    def batch(self, inputs: Any, targets: Any, b: int) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        self.capture.reset()
        with torch.enable_grad():
            out = self.model(inputs)
            if out.numel() != b:
                raise NotImplementedError("the factored path needs one output per record")
            for m in self.layout:
                if self.capture.calls.get(m, 0) != 1 or self.capture.inputs[m].dim() != 2:
                    raise NotImplementedError(f"layer {m!r} is not called once on [B, in] inputs")
            f = out.reshape(b)
            outs = [self.capture.outputs[m] for m in self.layout]
            if self._verified:
                deltas = torch.autograd.grad(f.sum(), outs)
            else:
                mp = dict(self.model.named_parameters())
                pnames = [n for n in self.names if n in mp]
                got = torch.autograd.grad(f.sum(), outs + [mp[n] for n in pnames])
                deltas = got[: len(outs)]
                self._verify(deltas, dict(zip(pnames, got[len(outs):])))
        fd = f.detach()
        shape = tuple(out.shape[1:])

        def one(o: Tensor, y: Any) -> Tensor:
            y1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, y)
            return self.loss_fn(o.reshape((1, *shape)), y1).reshape(())

        e = torch.func.vmap(torch.func.grad(one))(fd, targets)  # dl/df [B]
        L = torch.func.vmap(torch.func.grad(torch.func.grad(one)))(fd, targets)  # d2l/df2 [B]
        res = {}
        for m, delta in zip(self.layout, deltas):
            x = self.capture.inputs[m].detach()
            dl = delta.detach()
            res[m] = (x, e.unsqueeze(-1) * dl, L.unsqueeze(-1) * dl.square())
        self.capture.reset()
        return res

    def _verify(self, deltas: tuple[Tensor, ...], grads: dict[str, Tensor]) -> None:
        """The factored gradient of ``sum_i f_i`` (``delta^T x`` per layer) must equal autograd's.

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
                g, h = grads[name], (delta.T @ x if name == wn else delta.sum(0))
                if float((g - h).abs().max()) > 1e-5 * max(float(g.abs().max()), 1e-30):
                    raise NotImplementedError(f"parameter {name!r} is also used outside layer {m!r}")
        self._verified = True

    def batch_sums(self, fac: dict[str, tuple[Tensor, Tensor, Tensor]], acc: torch.dtype
                   ) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor]], Tensor]:
        """Per assessed parameter ``(sum g, sum g^2, GGN diagonal sum)`` (flat) and ``|g_i|^2 [B]``."""
        out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        norm = None
        for m, (wn, bn) in self.layout.items():
            # Products in the model's dtype (one batch: float32 is accurate to ~1e-6 relative),
            # accumulated across batches in ``acc``.
            x, d, c = fac[m]
            x2, d2 = x.square(), d.square()
            if norm is None:
                norm = torch.zeros(x.shape[0], dtype=acc)
            if wn is not None:
                out[wn] = tuple(t.reshape(-1).to(acc) for t in (d.T @ x, d2.T @ x2, c.T @ x2))
                norm += (d2.sum(-1) * x2.sum(-1)).to(acc)
            if bn is not None:
                out[bn] = (d.sum(0).to(acc), d2.sum(0).to(acc), c.sum(0).to(acc))
                norm += d2.sum(-1).to(acc)
        assert norm is not None
        return out, norm

    def record_gradients(self, fac: dict[str, tuple[Tensor, Tensor, Tensor]], take: int) -> Tensor:
        """Flat per-sample gradients ``[take, d]`` in ``names`` order (small models only)."""
        parts = {}
        for m, (wn, bn) in self.layout.items():
            x, d, _ = fac[m]
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


COLUMN_BUDGET = 1 << 24  # floats per temporary in factored_power_sums


def factored_power_sums(
    fac: LinearFactors, g_mean: Tensor, v_diag: Tensor, A: Tensor, power: int, bias: bool = False,
) -> Tensor:
    """``[R, M]`` sums ``sum_j w_rj^power A_jm`` for one parameter of a Linear layer.

    ``w_rj = -(g_rj - gbar_j) / sqrt(V_jj)`` with ``g_r = d_r x_r^T`` (weight) or ``d_r`` (bias);
    ``A [numel, M]`` holds M coefficient columns (kappa, bootstrap kappas, ...). The power of
    the centred gradient is expanded binomially so that only products of ``[R, out]``,
    ``[R, in]`` and ``[out, in, M]`` tensors appear.
    """
    out_f, in_f = fac.d.shape[1], fac.x.shape[1]
    M = A.shape[1]
    # Columns in groups: the [out, in, cols] and [R, out, cols] temporaries stay near
    # COLUMN_BUDGET floats whatever the number of columns (schemes x bootstrap draws).
    cols = max(1, COLUMN_BUDGET // max(A.shape[0], fac.d.shape[0] * out_f, 1))
    if M > cols:
        return torch.cat([factored_power_sums(fac, g_mean, v_diag, A[:, c : c + cols], power, bias)
                          for c in range(0, M, cols)], dim=1)
    scaled = A / v_diag.clamp_min(1e-300).pow(power / 2).unsqueeze(-1)  # [numel, M]
    if bias:
        c = (fac.d - g_mean).pow(power)  # [R, out]
        return c @ scaled
    S = scaled.reshape(out_f, in_f, M)
    gb = g_mean.reshape(out_f, in_f)
    total = torch.zeros(fac.d.shape[0], M, dtype=torch.float64)
    for a in range(power + 1):
        coef = math.comb(power, a) * (-1) ** (power - a)
        if a == 0:
            total += coef * (S * gb.pow(power).unsqueeze(-1)).sum((0, 1))
            continue
        B = S * gb.pow(power - a).unsqueeze(-1) if power - a else S  # [out, in, M]
        xa = fac.x.pow(a)  # [R, in]
        da = fac.d.pow(a)  # [R, out]
        # sum_{o,i} d_ro^a x_ri^a B_oim = sum_o d_ro^a (x^a @ B_o^T)
        t = torch.einsum("ri,oim->rom", xa, B)
        total += coef * torch.einsum("ro,rom->rm", da, t)
    return total


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
                w = -(g - g_mean[name]) / v_diag[name].clamp_min(1e-300).sqrt()
                yield a, a + d.shape[0], {name: w}


__all__ = ["FactoredProgram", "LinearFactors", "factored_power_sums", "iterate_factor_blocks", "linear_layout"]
