"""A training objective without curvature (L1 loss on a model linear in its weights): refused
with a message naming the loss, in every estimator and before training in the callback (fu24)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import MISCallback

SCHEMES = ["rtn_int8", "rtn_int2"]
NO_CURVATURE = r"no positive curvature in the assessed weights.*L1 / mean absolute error"


def _lad_fit():
    """A linear model at the exact least-absolute-deviations fit (iteratively reweighted least
    squares to convergence: the residuals of d + 1 records are ~0, the rest +-)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(400, generator=g, dtype=torch.float64)
    A = torch.cat([X, torch.ones(400, 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    for _ in range(200):
        r = (A @ w - y).abs().clamp_min(1e-8)
        w = torch.linalg.solve(A.T @ (A / r[:, None]), A.T @ (y / r))
    lin = nn.Linear(3, 1).double()
    with torch.no_grad():
        lin.weight.copy_(w[:3].reshape(1, 3))
        lin.bias.fill_(float(w[3]))
    return lin, DataLoader(TensorDataset(X, y), batch_size=100)


def l1(o, t):
    return (o.squeeze(-1) - t).abs()


def huber(o, t):
    return F.huber_loss(o.squeeze(-1), t, reduction="none")


@pytest.mark.parametrize("kw", [{"estimation": "exact"}, {"estimation": "exact", "leverage_correction": False},
                                {"estimation": "diagonal"}])
def test_an_l1_loss_on_a_linear_model_is_refused_with_its_cause(kw):
    """Before: the diagonal estimator read every scheme at the unquantized leakage (int2 = int8 =
    float 0.0272, no warning); the exact one raised linalg.eigh's "failed to converge" or "no
    assessed weight moves the training loss ... a forward set as an instance attribute"."""
    model, loader = _lad_fit()
    with pytest.raises(ValueError, match=NO_CURVATURE):
        ml.assess(model, SCHEMES, loader, l1, uncertainty_draws=0, **kw)


def test_the_streamed_float32_diagonal_path_refuses_it_too(monkeypatch):
    import importlib

    E = importlib.import_module("mis_lightning.estimation.estimate")

    monkeypatch.setattr(E, "FLOAT32_STATE_MIN_PARAMS", 0)
    model, loader = _lad_fit()
    with pytest.raises(ValueError, match=NO_CURVATURE):
        ml.assess(model, SCHEMES, loader, l1, estimation="diagonal", budget=1, uncertainty_draws=0)


def test_an_l1_loss_under_the_gauss_newton_diagonal_is_refused_on_any_model():
    """A tanh MLP (curved in its weights): the exact Hessian diagonal is not 0, the Gauss-Newton one
    (J' d2loss J, what "auto" takes above 2,000 weights) is; before, int2 = int8 = float leakage."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 4, generator=g)
    y = X[:, 0] - X[:, 1] + 0.3 * torch.randn(256, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    loader = DataLoader(TensorDataset(X, y), batch_size=64)
    with pytest.raises(ValueError, match=NO_CURVATURE):
        ml.assess(model, SCHEMES, loader, l1, estimation="diagonal", hessian="ggn", uncertainty_draws=0)


def test_a_smooth_robust_loss_and_declared_weight_decay_are_not_refused():
    model, loader = _lad_fit()
    rep = ml.assess(model, SCHEMES, loader, huber, estimation="exact", uncertainty_draws=0)
    assert rep.schemes["rtn_int2"].leakage < rep.baseline_leakage
    # weight decay gives the objective curvature: assessed (whatever the fit), not refused
    ml.assess(model, SCHEMES, loader, l1, estimation="diagonal", weight_decay=1e-2, uncertainty_draws=0)


class LinearL1(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return l1(self(x), y).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_the_callback_refuses_it_before_training(tmp_path):
    """Before: the whole training ran, then the assessment failed (or, diagonal, every scheme read
    the float leakage). The first batch's sums show it: an L1 loss has no curvature at any weights."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(200, generator=g)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[MISCallback(SCHEMES, loss_fn=l1, uncertainty_draws=0)])
    with pytest.raises(ValueError, match=NO_CURVATURE):
        trainer.fit(LinearL1(), DataLoader(TensorDataset(X, y), batch_size=50))
    assert trainer.global_step == 0


class LinearL1Decayed(LinearL1):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2, weight_decay=1e-2)


def test_the_callback_leaves_an_objective_with_weight_decay_to_the_assessment(tmp_path):
    """Optimizer weight decay (warned as undeclared): its L2 term is curvature the first batch's
    loss sums do not hold, so no refusal before training; the run completes."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(200, generator=g)
    cb = MISCallback(SCHEMES, loss_fn=l1, uncertainty_draws=0, weight_decay=1e-2)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[cb])
    trainer.fit(LinearL1Decayed(), DataLoader(TensorDataset(X, y), batch_size=50))
    assert trainer.global_step == 8 and cb.report is not None
