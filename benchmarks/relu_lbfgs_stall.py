"""Does full-batch L-BFGS reach the minimum the report checks? ReLU against GELU hidden layers.

A 6-16-3 MLP classifier (cross-entropy, L2 weight decay 1e-3, n = 2,000 synthetic records in three
Gaussian blobs) is trained by ``torch.optim.LBFGS`` (strong-Wolfe line search, ``--max-iter``
iterations, full batch, the objective the report assesses), then by a second call with the
stopping tolerances set to 0. Printed per activation: iterations each call ran and the gradient
norm of the objective after it. A ReLU network's objective has kinks (records whose hidden unit
sits at 0), where the line search stalls short of the minimum; a smooth activation does not.

    OMP_NUM_THREADS=1 python benchmarks/relu_lbfgs_stall.py [--max-iter 2000] [--seed 0]   # seconds, CPU
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

WD = 1e-3


def run(activation: str, max_iter: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (2000,), generator=g)
    x = 2.0 * F.one_hot(y, 6).float() + torch.randn(2000, 6, generator=g)
    torch.manual_seed(seed)
    act = nn.ReLU() if activation == "relu" else nn.GELU()
    model = nn.Sequential(nn.Linear(6, 16), act, nn.Linear(16, 3))

    def objective() -> torch.Tensor:
        return F.cross_entropy(model(x), y) + 0.5 * WD * sum(p.pow(2).sum() for p in model.parameters())

    for label, tol in (("default tolerances", {}), ("tolerances 0", {"tolerance_grad": 0.0, "tolerance_change": 0.0})):
        opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe", **tol)

        def closure(opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
        closure()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        iters = opt.state[opt.param_groups[0]["params"][0]]["n_iter"]
        print(f"{activation:5s} {label:18s} iterations {iters:5d}  gradient norm {grad.item():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iter", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for activation in ("relu", "gelu"):
        run(activation, args.max_iter, args.seed)


if __name__ == "__main__":
    main()
