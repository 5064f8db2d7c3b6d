"""nf50b: the stationarity diagnostics on records the model was not trained on, and on a BatchNorm model trained in
train mode (nux50's reproducers, docs/benchmarks.md "nf50b").

``heldout``: a 6-6-1 tanh MLP fitted by full-batch float64 L-BFGS with weight decay on 1,000 records, assessed on
them and on 400 held-out records (``minimum_offset_sd``, ``stiff_offset_sd``, the flags and the warnings' openings).
``bn ROUNDS MODE``: Conv2d + BatchNorm2d + Linear, full-batch L-BFGS with weight decay for ROUNDS rounds in train
mode (``MODE=eval``: as many more in eval mode), assessed in train mode; prints the not-at-a-minimum warning.
Usage: python benchmarks/unseen_records.py heldout | bn 4 train | bn 20 eval"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml

torch.set_num_threads(1)
WD = 1e-3
KEYS = ("gradient_norm_ratio", "minimum_offset_sd", "stiff_offset_sd", "not_at_minimum", "records_unlike_training")


def lbfgs(m, objective, rounds, max_iter):
    opt = torch.optim.LBFGS(m.parameters(), max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        out = objective() + WD / 2 * sum((p ** 2).sum() for p in m.parameters())
        out.backward()
        return out
    for _ in range(rounds):
        opt.step(closure)


def heldout():
    torch.manual_seed(0)
    X = torch.randn(1400, 6)
    y = torch.sin(X @ torch.randn(6)) + 0.3 * torch.randn(1400)
    m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    lbfgs(m, lambda: F.mse_loss(m(X[:1000].double()).squeeze(-1), y[:1000].double()), 5, 3000)
    m = m.float()
    loss = lambda o, t: F.mse_loss(o.squeeze(-1), t, reduction="none")
    for name, (a, b) in {"members (training set)": (0, 1000), "held-out records": (1000, 1400)}.items():
        r = ml.assess(m, ["int8_weight_only", "intx_weight_only_int2"],
                      DataLoader(TensorDataset(X[a:b], y[a:b]), batch_size=200), loss, weight_decay=WD)
        print(f"== {name}: int8 {r.schemes['int8_weight_only'].leakage:.4f}, "
              f"int2 {r.schemes['intx_weight_only_int2'].leakage:.4f};",
              {k: r.diagnostics.get(k) for k in KEYS})
        for w in r.warnings:
            print("   warning:", w[:110])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def bn(rounds, mode):
    torch.manual_seed(0)
    n = 1500
    X = torch.randn(n + 300, 1, 8, 8)
    y = (X[:, 0, 2:6, 2:6].mean((1, 2)) > 0).long()
    flip = torch.rand(n + 300) < 0.15
    y[flip] = 1 - y[flip]
    m = Net()
    objective = lambda: F.cross_entropy(m(X[:n]), y[:n])
    lbfgs(m, objective, rounds, 500)
    if mode == "eval":
        m.eval()
        lbfgs(m, objective, rounds, 500)
    m.train()
    r = ml.assess(m, ["int8_weight_only", "intx_weight_only_int2"], DataLoader(TensorDataset(X[:n], y[:n]), batch_size=250),
                  lambda o, t: F.cross_entropy(o, t, reduction="none"), weight_decay=WD,
                  val_dataloader=DataLoader(TensorDataset(X[n:], y[n:]), batch_size=300), strict=False)
    print({k: r.diagnostics.get(k) for k in KEYS})
    print([w for w in r.warnings if w.startswith("the model is not at a minimum")])


if __name__ == "__main__":
    if sys.argv[1:2] == ["bn"]:
        bn(int(sys.argv[2]), sys.argv[3])
    else:
        heldout()
