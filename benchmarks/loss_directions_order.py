"""rv53's two-head reproducer (docs/benchmarks.md "rv53", "ux54a"): a 3-class head beside a regression
head whose labels only the last 40 of 240 records carry (``rank(L_i)`` 3 for those, 2 else), trained
by L-BFGS; ``assess`` with the exact estimator, the diagonal one and the diagonal with the
Gauss-Newton Hessian, the records in one batch ("whole"), in batches of 40 ("split") and reversed in
batches of 40 ("rev40"). Prints each scheme's leakage and its relative difference to "whole", and
the diagonal estimators' count of loss directions. Run from the repository root with ``PYTHONPATH`` at
the checkout to measure: ``PYTHONPATH=$PWD python benchmarks/loss_directions_order.py``; ``--records 240``
sets ``estimate.LOSS_RANK_RECORDS`` so that the count is the mean over every record."""

from __future__ import annotations

import argparse
import importlib
import os

import torch
import torch.nn.functional as F
from torch import nn

import mis_lightning as ml

S = ["none", "rtn_int4", "rtn_int2"]
KW = {"exact": dict(estimation="exact"), "diagonal": dict(estimation="diagonal"),
      "ggn": dict(estimation="diagonal", hessian="ggn")}


class MT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"a": self.a(h), "b": self.b(h)}


def mt_loss(o: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    yy, tt, m = t[:, 0].long(), t[:, 1:2].to(o["a"].dtype), t[:, 2:3].to(o["a"].dtype)
    return F.cross_entropy(o["a"], yy, reduction="none") + (m * (o["b"] - tt) ** 2).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=None, help="estimate.LOSS_RANK_RECORDS (default: the package's)")
    args = ap.parse_args()
    if args.records is not None:
        importlib.import_module("mis_lightning.estimation.estimate").LOSS_RANK_RECORDS = args.records
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(240, 5, generator=g)
    Y = (X[:, :3] + 0.5 * torch.randn(240, 3, generator=g)).argmax(1)
    T = X[:, 3:4] * 0.7 + 0.1 * torch.randn(240, 1, generator=g)
    has = torch.zeros(240, 1)
    has[200:] = 1.0
    mt = MT()
    tgt = torch.cat([Y[:, None].float(), T, has], 1)
    opt = torch.optim.LBFGS(mt.parameters(), max_iter=400, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        o = mt_loss(mt(X), tgt).mean() + 0.5e-3 * sum((p ** 2).sum() for p in mt.parameters())
        o.backward()
        return o

    opt.step(closure)
    for name, kw in KW.items():
        res = {}
        for label, order, bs in (("whole", torch.arange(240), 240), ("split", torch.arange(240), 40),
                                 ("rev40", torch.arange(239, -1, -1), 40)):
            bb = [(X[order][a:a + bs], tgt[order][a:a + bs]) for a in range(0, 240, bs)]
            res[label] = ml.assess(mt, S, bb, mt_loss, weight_decay=1e-3, uncertainty_draws=0, **kw)
        for s in S:
            v = {k: r.schemes[s].leakage for k, r in res.items()}
            print("MT", name, s, {k: f"{a:.10g} ({(a - v['whole']) / v['whole']:+.1e})" for k, a in v.items()})
        if name != "exact":
            print("MT", name, "directions", {k: r.diagnostics.get("leverage_directions") for k, r in res.items()})
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
