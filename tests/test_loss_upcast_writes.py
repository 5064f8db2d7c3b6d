"""per_sample.LOSS_UPCAST (nu49) with a loss that writes into tensors of its own (rv49): the upcast mode
must not hand an in-place method, ``__setitem__`` or ``out=`` a float64 copy of the loss's float32
tensor (the write went to the copy and the loss read its zeros). Reference: the same loss in float64
with float64 class weights; tolerance 1e-6 relative (the writes round to the buffer's float32)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

P = importlib.import_module("mis_lightning.estimation.per_sample")
CW = torch.tensor([1.0, 3.0])  # float32 class weights the loss holds: it fails on float64 outputs


def _ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, t, reduction="none", weight=CW)


def _setitem(out, t):
    loss = torch.zeros(out.shape[0])
    loss[:] = _ce(out, t)
    return loss


def _add_(out, t):
    return torch.zeros(out.shape[0]).add_(_ce(out, t))


def _out_kw(out, t):
    loss = torch.zeros(out.shape[0])
    torch.add(_ce(out, t), 0.0, out=loss)
    return loss


def _index_add(out, t):
    loss = torch.zeros(out.shape[0])
    loss.index_add_(0, torch.arange(out.shape[0]), _ce(out, t))
    return loss


@pytest.mark.parametrize("loss_fn", [_ce, _setitem, _add_, _out_kw, _index_add])
def test_upcast_loss_keeps_its_own_writes(loss_fn, monkeypatch):
    monkeypatch.setattr(P, "LOSS_UPCAST", True)
    out = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 1, 0, 1, 0])
    ref = F.cross_entropy(out, t, reduction="none", weight=CW.double())
    wrapped = P.ComputeDtypeLoss(loss_fn, torch.float32)
    for _ in range(2):  # the deciding call and a later one
        got = wrapped(out, t).double()
        assert torch.allclose(got, ref, rtol=1e-6, atol=0.0), (loss_fn.__name__, got, ref)


def _view_write(out, t):
    loss = torch.zeros(out.shape[0], 1)
    loss.view(-1)[:] = _ce(out, t)  # the view is taken of the upcast copy: this write is not seen
    return loss.view(-1)


def test_a_write_the_upcast_cannot_see_takes_the_cast_down_path(monkeypatch):
    """A write through a view of the loss's buffer escapes _Upcast (the view op receives the cast
    copy; the loss returned its zeros): the deciding call compares the cast-up losses with the
    loss's own float32 arithmetic and takes the cast-down path, with its warning (lead, s49)."""
    monkeypatch.setattr(P, "LOSS_UPCAST", True)
    out = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 1, 0, 1, 0])
    ref = F.cross_entropy(out, t, reduction="none", weight=CW.double())
    wrapped = P.ComputeDtypeLoss(_view_write, torch.float32)
    with pytest.warns(UserWarning, match="arithmetic runs in float32"):
        got = wrapped(out, t).double()
    assert torch.allclose(got, ref, rtol=1e-6, atol=0.0)
    assert torch.allclose(wrapped(out, t).double(), ref, rtol=1e-6, atol=0.0)  # a later call too
    assert not wrapped._cast_up.get(torch.float64)
