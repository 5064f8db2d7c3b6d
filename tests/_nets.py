"""Small models shared by several test files."""

import torch
from torch import nn


class CNN(nn.Module):
    """The CNN of repro nc_r01: 1,466 parameters (160 in the Linear head's weight), Conv2d +
    BatchNorm2d layers that torchao's weight-only schemes leave in float."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.f(x).flatten(1))


class Conv1dHead(nn.Module):
    """``Conv1d(2, 4, 3) -> ReLU -> Linear(24, c)`` on ``[B, 2, 6]`` inputs: a convolution beside a
    Linear head (the sampled-label Gauss-Newton and K-FAC sample tests)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6, c)

    def forward(self, x):
        import torch

        return self.head(torch.relu(self.conv(x)).flatten(1))


def trained_relu_mlp(inputs: int = 64, hidden: int = 24, steps: int = 100):
    """An ``inputs -> hidden -> 1`` ReLU MLP (default 64 -> 24 -> 1) trained (Adam, ``steps``
    full-batch steps) on 512 regression records ``y = x_0 + 0.3 noise``; returns
    ``(model, x, y)`` (seeded)."""
    import torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    x = torch.randn(512, inputs)
    y = x[:, 0] + 0.3 * torch.randn(512)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x)[:, 0] - y) ** 2).mean().backward()
        opt.step()
    return model, x, y


def mse_per_record(out, y):
    """Per-record squared error ``[B]`` of a one-output model."""
    return (out.reshape(-1) - y.reshape(-1)).square()


def ols_ar1_linear(rho: float, bias: bool, n: int = 2000, d: int = 16, seed: int = 0):
    """``nn.Linear(d, 1)`` (float64) fitted exactly (least squares) to ``y = x beta + noise`` on
    AR(1) inputs of lag-1 correlation ``rho`` (non-centred by 1 with a bias: the bias column
    correlated with the weights); returns ``(model, batches of 250 (x, y))`` (seeded)."""
    import torch

    from mis_lightning.data.synthetic import ar1_cholesky

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ ar1_cholesky(d, rho).T + (1.0 if bias else 0.0)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1) if bias else x
    beta = torch.linalg.lstsq(xa, y.unsqueeze(1)).solution.reshape(-1)
    model = nn.Linear(d, 1, bias=bias).double()
    with torch.no_grad():
        model.weight.copy_(beta[:d].reshape(1, d))
        if bias:
            model.bias.copy_(beta[d:])
    return model, [(x[i: i + 250], y[i: i + 250]) for i in range(0, n, 250)]


def ce_per_record(out, y):
    """Per-record cross-entropy (``reduction="none"``): the loss of the classifier tests."""
    import torch.nn.functional as F

    return F.cross_entropy(out, y, reduction="none")


def fit_lbfgs_ce(model: nn.Module, x, y, decay: float, rounds: int) -> nn.Module:
    """``model`` fitted in place to the mean cross-entropy plus ``decay / 2 |theta|^2`` by full-batch
    strong-Wolfe L-BFGS (``rounds`` calls of up to 500 iterations: near an exact minimum, as the
    estimators assume); returns it in eval mode."""
    import torch

    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = ce_per_record(model(x), y).mean() + decay / 2 * sum(p.square().sum() for p in model.parameters())
        obj.backward()
        return obj

    for _ in range(rounds):
        opt.step(closure)
    return model.eval()


def fit_lbfgs(model: nn.Module, objective, max_iter: int = 100, rounds: int = 1, **options) -> nn.Module:
    """``model`` fitted in place by full-batch strong-Wolfe L-BFGS on ``objective()`` (a closure
    returning the scalar to minimise; ``rounds`` calls of up to ``max_iter`` iterations; other
    ``torch.optim.LBFGS`` options, e.g. ``tolerance_grad``, passed on); returns it in eval mode."""
    import torch

    opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe", **options)

    def closure():
        opt.zero_grad()
        obj = objective()
        obj.backward()
        return obj

    for _ in range(rounds):
        opt.step(closure)
    return model.eval()


def ridge_linear(n: int, features: int = 19, decay: float = 1e-2, seed: int = 0):
    """``(model, loader)``: ``nn.Linear(features, 1)`` set to the exact minimiser of the mean of
    ``0.5 * (out - y)^2`` plus ``decay / 2 |theta|^2`` (a true minimum: nothing but the condition a
    test sets fails) on ``n`` Gaussian records (one batch)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x @ (torch.randn(features, generator=g) / features**0.5) + torch.randn(n, generator=g)
    X = torch.cat([x, torch.ones(n, 1)], 1)
    theta = torch.linalg.solve(X.T @ X / n + decay * torch.eye(features + 1), X.T @ y / n)
    model = nn.Linear(features, 1)
    with torch.no_grad():
        model.weight.copy_(theta[:features][None])
        model.bias.copy_(theta[features:])
    return model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=n)


class Repeated(nn.Module):
    """``inp -> tanh -> (sq -> tanh) x k -> head``: a square Linear ``sq`` called ``k`` times per forward
    (weights shared across depth; ``k = 2``, ``width = 4``, ``out = 2`` is nu48's ``Twice``, built in the
    same order). ``untied``: the j-th call a layer of its own (``more[j - 1]``); ``seq``: ``[B, T, 5]``
    inputs, a mean over the positions before the head; ``mixed``: ``sq`` once on the positions' mean
    ``[B, width]`` and once on every position ``[B, T, width]`` (calls of different shapes). tw51."""

    def __init__(self, k: int = 2, untied: bool = False, seq: bool = False, mixed: bool = False, width: int = 4,
                 out: int = 2) -> None:
        super().__init__()
        self.k, self.untied, self.seq, self.mixed = k, untied, seq, mixed
        self.inp, self.sq, self.head = nn.Linear(5, width), nn.Linear(width, width), nn.Linear(width, out)
        if untied:
            self.more = nn.ModuleList(nn.Linear(width, width) for _ in range(k - 1))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.mixed:
            return self.head(torch.tanh(self.sq(h.mean(1))) + torch.tanh(self.sq(h)).mean(1))
        for j in range(self.k):
            h = torch.tanh((self.more[j - 1] if self.untied and j else self.sq)(h))
        return self.head(h.mean(1) if self.seq else h)
