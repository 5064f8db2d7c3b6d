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
