"""Small models shared by several test files."""

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
