"""CPU cost of the diagonal estimation of a small CNN whose first convolution sits before a
normalisation (docs/benchmarks.md, section cv40): GroupNorm (the per-layer program refuses it;
the convolutions' K-FAC correction then runs in a side per-layer program) or BatchNorm.

Usage: ``python benchmarks/kfac_conv_cost.py {gn,bn} {ggn,hutchinson}``; run it under two
checkouts (``PYTHONPATH=OLD`` / ``PYTHONPATH=NEW``), alternating, and compare the CPU seconds.
Prints the CPU seconds of two calls (after a warm-up call) and the K-FAC diagnostics.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.estimation.estimate import estimate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("norm", choices=("gn", "bn"))
    p.add_argument("hessian", choices=("ggn", "hutchinson"))
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16) if a.norm == "gn" else nn.BatchNorm2d(16)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), norm, nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 3, 12, 12, generator=g)
    y = torch.randint(0, 10, (1024,), generator=g)

    def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(o, t, reduction="none")

    warm = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)
    estimate(model, warm, loss, mode="diagonal", hessian=a.hessian, num_records=8)
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    times = []
    for _ in range(2):
        t0 = time.process_time()
        e = estimate(model, loader, loss, mode="diagonal", hessian=a.hessian)
        times.append(time.process_time() - t0)
    print(ml.__file__, a.norm, a.hessian, "CPU s", [round(t, 2) for t in times],
          "kfac", e.diagnostics.get("kfac_corrected_weights"), e.diagnostics.get("kfac_uncorrected_layers"))


if __name__ == "__main__":
    main()
