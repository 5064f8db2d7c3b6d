"""The three invariance tests that run at 1/8 of the Monte Carlo budgets (tests/_small_mc.py, ts38):
each test's figures at the default budgets and at the small ones, the largest relative difference
between the compared figures, and the same with the weights moved by 1e-7 relative in the compared
calls (what the assertion must still catch). CPU seconds of each variant.

    PYTHONPATH=.:tests python benchmarks/suite_invariance_budgets.py scale batch scale3

``scale``: tests/test_ill_posed_fits.py (s * loss, s = 1, 10, 100; tolerance 1e-8);
``batch``: tests/test_estimation.py (estimation batch sizes 7, 64, 400; 1e-9);
``scale3``: tests/test_spread_softmax.py (s = 1, 1/3; 1e-9). Runtime: ~10-15 CPU s each.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.functional import correlated as FC

DEFAULT = (FC.EXACT_BUDGET, FC.ALL_COARSE_BUDGET)


def _moved(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + 1e-7)
    return m


def _compare(label: str, calls, small: bool, moved: bool, tol: float) -> None:
    """``calls``: ``[(model, loader, loss)]``; the first is the reference, the others compared to it."""
    FC.EXACT_BUDGET, FC.ALL_COARSE_BUDGET = (DEFAULT[0] // 8, DEFAULT[1] // 8) if small else DEFAULT
    kw = {"mc_draws": 2048} if small else {}
    t = time.process_time()
    figs = []
    for i, (model, loader, loss, schemes) in enumerate(calls):
        rep = ml.assess(_moved(model) if moved and i else model, schemes, loader, loss, estimation="exact",
                        uncertainty_draws=0, **kw)
        figs.append([rep.baseline_leakage] + [r.leakage for r in rep.schemes.values()])
    cpu = time.process_time() - t
    rel = max(abs(a - b) / abs(a) for f in figs[1:] for a, b in zip(figs[0], f))
    print(f"{label}: small={small} moved={moved}: {cpu:.2f} CPU s, figures {[f'{x:.6f}' for x in figs[0]]}, "
          f"max rel diff {rel:.2e} (tolerance {tol:g})")
    FC.EXACT_BUDGET, FC.ALL_COARSE_BUDGET = DEFAULT


def scale() -> None:
    torch.manual_seed(0)
    n, p = 400, 5
    x = torch.randn(n, p, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] + 1.5 * torch.randn(n, dtype=torch.float64) > 0).long()
    m = nn.Linear(p, 2).double()
    opt = torch.optim.LBFGS(m.parameters(), max_iter=500, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        v = F.cross_entropy(m(x), y)
        v.backward()
        return v

    for _ in range(3):
        opt.step(closure)
    dl = DataLoader(TensorDataset(x, y), batch_size=100)
    calls = [(m, dl, functools.partial(lambda o, t, s: s * F.cross_entropy(o, t, reduction="none"), s=s),
              ["rtn_int4", "rtn_int2"]) for s in (1.0, 10.0, 100.0)]
    for small in (False, True):
        for moved in (False, True):
            _compare("test_ill_posed_fits scale", calls, small, moved, 1e-8)


def batch() -> None:
    g = torch.Generator().manual_seed(2)
    X = torch.randn(400, 5, generator=g, dtype=torch.float64)
    y = (X[:, :3] + 0.8 * torch.randn(400, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    m = nn.Linear(5, 3).double()
    opt = torch.optim.LBFGS(m.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(X), y)
        loss.backward()
        return loss

    opt.step(closure)

    def ce(o, t):
        return F.cross_entropy(o, t, reduction="none")

    calls = [(m, DataLoader(TensorDataset(X, y), batch_size=bs), ce, ["rtn_int4"]) for bs in (7, 64, 400)]
    for small in (False, True):
        for moved in (False, True):
            _compare("test_estimation batch sizes", calls, small, moved, 1e-9)


def scale3() -> None:
    g = torch.Generator().manual_seed(0)
    n, p, k = 400, 5, 3
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = X @ torch.randn(p, k, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, k, generator=g, dtype=torch.float64)
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1), y).solution
    model = nn.Linear(p, k).double()
    with torch.no_grad():
        model.weight.copy_(sol[:p].T)
        model.bias.copy_(sol[p])
    loader = DataLoader(TensorDataset(X, y), batch_size=100)

    def loss(o, t, s=1.0):
        return s * F.mse_loss(o, t, reduction="none").sum(-1)

    calls = [(model, loader, functools.partial(loss, s=s), ["rtn_int4", "rtn_int2"]) for s in (1.0, 1.0 / 3.0)]
    for small in (False, True):
        for moved in (False, True):
            _compare("test_spread_softmax loss scale", calls, small, moved, 1e-9)


if __name__ == "__main__":
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in sys.argv[1:] or ["scale", "batch", "scale3"]:
        {"scale": scale, "batch": batch, "scale3": scale3}[name]()
