"""A NaN or inf on the way to the full correlation is an error naming the parameters, raised before
any eigendecomposition (rc46): before, ``torch.linalg.eigh`` failed inside LAPACK ("failed to
converge ... error code") without saying which weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.assess import run_estimation, score_schemes
from mis_lightning.config import EstimationConfig
from mis_lightning.functional.correlated import Correlation
from mis_lightning.quantization import get_scheme


def _mse(o, t):
    return 0.5 * (o[:, 0] - t) ** 2


def _fitted():
    torch.manual_seed(0)
    X = torch.randn(120, 4)
    y = X @ torch.randn(4) + 0.1 * torch.randn(120)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = torch.optim.LBFGS(m.parameters(), max_iter=100)

    def closure():
        opt.zero_grad()
        loss = _mse(m(X), y).mean() + 5e-4 * sum((p ** 2).sum() for p in m.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return m, DataLoader(TensorDataset(X, y), batch_size=40)


def test_a_corrupted_correlation_is_named_before_scoring():
    m, dl = _fitted()
    est = run_estimation(m, dl, _mse, EstimationConfig(weight_decay=1e-3, mode="exact"))
    est.correlation[3, 5] = est.correlation[5, 3] = float("nan")
    # coordinates 3 and 5 are entries of the first layer's 12 weights
    with pytest.raises(ValueError, match=r"not finite .* '0\.weight' \(entries 3, 5 of 12\)"):
        score_schemes(est, m, [get_scheme("rtn_int4")], loss_fn=_mse)


def test_a_hessian_that_is_not_finite_is_named_by_the_estimator():
    m, dl = _fitted()

    # finite loss and gradient, infinite second derivative: d2/do2 of relu(o - o0)^1.5 at o0
    def loss(o, t):
        return _mse(o, t) + (o[:, 0] - o[:, 0].detach()).clamp_min(0) ** 1.5

    with pytest.raises(ValueError, match=r"Hessian is not finite .*'0\.weight'.*'2\.bias' \(entry 0 of 1\)"):
        run_estimation(m, dl, loss, EstimationConfig(weight_decay=1e-3, mode="exact"))


def test_the_correlation_itself_names_its_coordinates():
    R = torch.eye(5, dtype=torch.float64)
    R[2, 4] = R[4, 2] = float("inf")
    with pytest.raises(ValueError, match=r"not finite at coordinate\(s\) \[2, 4\] of 5"):
        Correlation(full=R).quadratic(torch.ones(1, 5, dtype=torch.float64))
