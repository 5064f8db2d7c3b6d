"""Which objective an optimizer's ``weight_decay`` trains to (ux51, nux51 #4).

torch's coupled ``weight_decay=wd`` (SGD, Adam, RMSprop, Adagrad, ...) adds ``wd * theta`` to the
gradient, so its stationary point is the minimum of ``mean(loss) + wd / 2 |theta|^2``: the objective
the estimation assumes with ``weight_decay = wd`` (``EstimationConfig.weight_decay``), which
``MISCallback`` therefore reads from such an optimizer (``_lightning_support.coupled_decay``). AdamW's
decoupled decay is a stationary point of neither form.

A tanh MLP (4-6-1, 37 weights), MSE, 200 records, float64, full batch, weight_decay 0.05; each
optimizer run to convergence (Adam-type ones finish with a 30x smaller step). Printed: the gradient
norm of each candidate objective at the end, relative to the mean per-record gradient norm.

    OMP_NUM_THREADS=1 python benchmarks/coupled_decay_check.py      # ~1-2 min CPU
"""

import torch
from torch import nn

WD = 0.05


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    X = torch.randn(200, 4, dtype=torch.float64)
    y = X[:, 0] - 0.5 * X[:, 1] + 0.3 * torch.randn(200, dtype=torch.float64)

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()

    def mean_loss(m: nn.Module, a: int = 0, b: int = 200) -> torch.Tensor:
        return ((m(X[a:b]).squeeze(-1) - y[a:b]) ** 2).mean()

    def grad_norm(m: nn.Module, scale: float) -> float:
        ps = list(m.parameters())
        loss = mean_loss(m) + scale * WD * sum((p ** 2).sum() for p in ps)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, ps)]).norm().item()

    def per_record(m: nn.Module) -> float:  # 10 records' gradient norms, averaged
        ps = list(m.parameters())
        return sum(torch.cat([t.reshape(-1) for t in torch.autograd.grad(mean_loss(m, i, i + 1), ps)]).norm().item()
                   for i in range(0, 200, 20)) / 10

    runs = (("SGD", torch.optim.SGD, 0.05, 60000), ("Adam", torch.optim.Adam, 3e-3, 40000),
            ("RMSprop", torch.optim.RMSprop, 1e-3, 40000), ("Adagrad", torch.optim.Adagrad, 0.05, 40000),
            ("AdamW", torch.optim.AdamW, 3e-3, 40000))
    for name, cls, lr, steps in runs:
        m = make()
        opt = cls(m.parameters(), lr=lr, weight_decay=WD)
        for _ in range(steps):
            opt.zero_grad()
            mean_loss(m).backward()
            opt.step()
        if name in ("Adam", "RMSprop", "AdamW"):  # an adaptive step's noise floor: finish with small steps
            for g in opt.param_groups:
                g["lr"] = lr / 30
            for _ in range(20000):
                opt.zero_grad()
                mean_loss(m).backward()
                opt.step()
        s = per_record(m)
        print(f"{name:8s} mean + wd/2 |theta|^2: {grad_norm(m, 0.5) / s:.2e}   mean + wd |theta|^2: "
              f"{grad_norm(m, 1.0) / s:.2e}   (relative gradient norms; per-record norm {s:.3f})")


if __name__ == "__main__":
    main()
