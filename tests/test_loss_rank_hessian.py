"""The loss Hessian in the outputs that counts the diagonal estimator's loss directions
(method.md section 4, "Finite-sample (leverage) correction") is formed reverse-over-reverse: the
matrix of torch.func.hessian (forward-over-reverse), without torch's first forward-AD use, which
compiles its jvp decompositions with TorchScript (~0.4 s CPU once per process: ~9 Adam epochs
of the 1e5-weight benchmark MLP; docs/benchmarks.md, pf28)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mis_lightning.estimation.per_sample import LossProgram


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).square().sum(-1)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_loss_output_hessians_are_the_forward_over_reverse_hessians(loss):
    """Against torch.func.hessian of the same per-record loss (loss_output_derivatives' second
    output), float64: equal to 1e-12 (the same derivatives in another order of products)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64) if loss == "mse" else torch.randint(0, 4, (6,), generator=g)
    prog = LossProgram(model, _mse if loss == "mse" else _ce, [n for n, _ in model.named_parameters()],
                       dtype=torch.float64)
    shape = prog.output_shape(x)
    got = prog.loss_output_hessians(x, y, shape)
    with torch.no_grad():
        out = model(x)
    ref = _reference_hessians(_LOSSES[loss], out, y)
    assert got.shape == (6, 4, 4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def _logcosh(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.cosh(out - y)).sum(-1)


_LOSSES = {"mse": _mse, "ce": _ce, "logcosh": _logcosh}


def _reference_hessians(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch.func.hessian (forward-over-reverse) of each record's loss in its outputs [B, C, C]."""
    def one(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0)).reshape(())
    return torch.func.vmap(torch.func.hessian(one))(out, y)


def _model_and_data(loss: str):
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g) if loss == "ce" else torch.randn(6, 4, generator=g, dtype=torch.float64)
    return model, x, y


@pytest.mark.parametrize("loss", ["mse", "ce", "logcosh"])
def test_gauss_newton_loss_hessians_are_the_forward_over_reverse_hessians(loss):
    """The Gauss-Newton factors' loss Hessians in the outputs, reverse-over-reverse (pf29), against
    torch.func.hessian, float64, to 1e-12: LossProgram.loss_output_derivatives (per-sample
    factors) and the per-layer program's ``_loss_derivatives`` (a loss that is not the
    softmax cross-entropy's closed form: log-cosh, MSE; and CE's first batch, which checks the form)."""
    from mis_lightning.estimation.linear_factors import LayerProgram

    model, x, y = _model_and_data(loss)
    names = [n for n, _ in model.named_parameters()]
    prog = LossProgram(model, _LOSSES[loss], names, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    ref = _reference_hessians(_LOSSES[loss], out, y)
    e, L = prog.loss_output_derivatives(out, y, prog.output_shape(x))
    torch.testing.assert_close(L, ref, rtol=1e-12, atol=1e-12)
    fprog = LayerProgram(model, _LOSSES[loss], names, dtype=torch.float64)
    e_f, L_f = fprog._loss_derivatives(out, y, (4,), True)
    torch.testing.assert_close(L_f, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e_f, e, rtol=1e-12, atol=1e-12)


class _LogcoshHooked(nn.Module):
    """Per-sample losses from ``mis_per_sample_loss(batch)`` (the hook front end), log-cosh: a
    loss Hessian in the output that depends on the output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def mis_per_sample_loss(self, batch):
        x, y = batch
        return _logcosh(self(x), y)


def test_hook_loss_hessians_are_the_forward_over_reverse_hessians():
    """The hook front end's loss Hessians in the model's output (loss_output_hessians and the
    Gauss-Newton factors' ``L``), reverse-over-reverse (pf29), against torch.func.hessian of the
    same loss, float64, to 1e-12."""
    from mis_lightning.streaming import hook_program

    model = _LogcoshHooked()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    loss_fn, batch_fn, program_cls = hook_program(model)
    prog = program_cls(model, loss_fn, [n for n, _ in model.named_parameters()], dtype=torch.float64)
    batch, dummy = batch_fn((x, y))
    shape = prog.output_shape(batch)
    with torch.no_grad():
        out = model(x)
    ref = _reference_hessians(_logcosh, out, y)
    torch.testing.assert_close(prog.loss_output_hessians(batch, dummy, shape), ref, rtol=1e-12, atol=1e-12)
    _, L = prog.gauss_newton_factors(batch, dummy, shape)
    torch.testing.assert_close(L, ref, rtol=1e-12, atol=1e-12)


# the fresh-process check that the Gauss-Newton estimations load no forward AD, dynamo or sympy:
# tests/test_fresh_process.py


def test_exact_hessian_and_record_curvature_reverse_over_reverse_equal_forward_over_reverse():
    """The exact Hessian of a batch (``_batch_hessian``) and the records' exact curvature on their
    output-gradient span (``_record_curvature``), reverse-over-reverse (``HESSIAN_FORWARD_AD =
    False``) against forward-over-reverse (the default), float64: equal to 1e-10 relative to the
    largest entry (the same second derivatives, products in another order; measured ~1e-15)."""
    import importlib

    E = importlib.import_module("mis_lightning.estimation.estimate")
    model, x, y = _model_and_data("logcosh")
    names = [n for n, _ in model.named_parameters()]
    prog = LossProgram(model, _logcosh, names, dtype=torch.float64)
    offsets, o = {}, 0
    for n in names:
        offsets[n] = (o, o + prog.params[n].numel())
        o += prog.params[n].numel()
    J = torch.cat([j.reshape(6, 4, -1) for j in prog.output_jacobians(x)[1].values()], 2)
    got = {}
    for fwd in (False, True):
        E.HESSIAN_FORWARD_AD = fwd
        try:
            got[fwd] = (E._batch_hessian(prog, x, y, names, offsets, o), *E._record_curvature(prog, x, y, J, names, offsets))
        finally:
            E.HESSIAN_FORWARD_AD = True
    for a, b in zip(got[False], got[True]):
        scale = float(b.abs().max())
        assert scale > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


def _coupled(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Couples the records of a call through a batch sum: per record (batch of one, as the
    loss-rank count calls it) a smooth non-quadratic loss; on a batch, cross-record terms."""
    return 0.5 * (out - y).square().sum(-1) + 0.3 * torch.tanh(out).sum(-1) * torch.sin(out).sum()


def _linear(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out * y).sum(-1)  # gradient independent of the outputs: Hessian 0


@pytest.mark.parametrize("loss", ["coupled", "linear", "mse_f32"])
def test_loss_output_hessians_by_autograd_are_per_record(loss):
    """pf30: the count's Hessians by plain autograd (one loss call per record, one batched
    backward) equal torch.func.hessian of each record's own loss call: a loss that would couple
    the records of a batch gets no cross-record term (the batched call's Hessian differs here by
    O(0.3), checked), a loss linear in the outputs has Hessian 0, and a float32 program is held
    to float32 rounding (rtol 1e-5: the two orders of products round differently)."""
    g = torch.Generator().manual_seed(2)
    dt = torch.float32 if loss == "mse_f32" else torch.float64
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(dt)
    x = torch.randn(6, 5, generator=g, dtype=dt)
    y = torch.randn(6, 4, generator=g, dtype=dt)
    fn = {"coupled": _coupled, "linear": _linear, "mse_f32": _mse}[loss]
    prog = LossProgram(model, fn, [n for n, _ in model.named_parameters()], dtype=dt)
    got = prog.loss_output_hessians(x, y, prog.output_shape(x))
    with torch.no_grad():
        out = model(x)
    ref = _reference_hessians(fn, out, y)
    tol = 1e-5 if dt == torch.float32 else 1e-12
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    if loss == "coupled":  # the batched call would differ: the test can tell
        whole = torch.func.hessian(lambda o: fn(o, y).sum())(out)  # [B, C, B, C]
        diag = torch.stack([whole[i, :, i] for i in range(6)])
        assert (diag - ref).abs().max() > 1e-3
    if loss == "linear":
        assert bool((got == 0).all())
