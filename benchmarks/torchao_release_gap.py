"""The torchao-named schemes' release against torchao's own (``beyond_linear=False``) on a small CNN
(nux54 #1; docs/benchmarks.md "ux54d").

A Conv2d + BatchNorm2d + Linear classifier on synthetic 8x8 images, trained by Lightning (Adam with
weight decay 1e-3, 15 epochs, seed 0), then one ``assess`` call with ``intx_weight_only_int4`` /
``_int2`` (the convolution rounded by the library too) and their ``_linear_only`` variants (the release
``torchao.quantization.quantize_`` makes with the same config: the convolution in float). Prints the
table (rows, ``^`` marks), the ``beyond torchao`` warning and each row's bits/w and leakage.

    python benchmarks/torchao_release_gap.py
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import get_scheme


class CNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(36, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-3)


def main() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 1, 8, 8, generator=g)
    y = (x[:, 0, 2:6, 2:6].mean((1, 2)) + 0.3 * torch.randn(1200, generator=g) > 0).long()
    tr, va = TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:], y[1000:])
    model = CNN()
    pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(model, DataLoader(tr, batch_size=100, shuffle=True))
    model.eval()
    schemes = ["none", "intx_weight_only_int4", "intx_weight_only_int2",
               get_scheme("intx_weight_only_int4", beyond_linear=False),
               get_scheme("intx_weight_only_int2", beyond_linear=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(model, schemes, DataLoader(tr, batch_size=500),
                        lambda o, t: F.cross_entropy(o, t, reduction="none"), weight_decay=1e-3,
                        val_dataloader=DataLoader(va, batch_size=200))
    print(rep.table().split("legend:")[0])
    print("\n".join(w for w in rep.warnings if "beyond torchao" in w))
    for name, s in rep.schemes.items():
        print(f"{name:40s} bits/w {s.bits_per_weight:6.2f}  float {1 - s.quantized_fraction:6.1%}  leakage {s.leakage:.4f}")


if __name__ == "__main__":
    main()
