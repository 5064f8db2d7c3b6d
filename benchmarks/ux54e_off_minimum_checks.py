"""ux54e (nux54 #2 and #5): why int8_weight_only reads below the baseline off a minimum, and the
leverage of nux54's seed-0 outlier. docs/benchmarks.md, "ux54e".

``python benchmarks/ux54e_off_minimum_checks.py bias``: nux54's 8-16-1 tanh MLP (d = 161, n = 2,000),
Adam (weight decay 1e-3, 10 epochs), then the same weights polished by L-BFGS to the minimum. For each:
the exact Hessian's spectrum, the standardised covariance R = corr(H^-1 V H^-1), the share of the
records' Mahalanobis norm w'R^-1 w carried by R's directions below 1e-4 / 1e-3 / 1e-2, and the assess
figures (int8_weight_only, intx_weight_only_int2; with and without the leverage correction).

``python benchmarks/ux54e_off_minimum_checks.py seeds 0 1 ... 11``: nux54's 8-8-1 MLP (d = 81, n = 1,000,
L-BFGS to the minimum, weight decay 1e-3) per seed: baseline, int8, mean / max leverage, capped records
and the row's '*' phrase.
"""
from __future__ import annotations

import sys
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml

WD = 1e-3


def loss_fn(o, t):
    return 0.5 * (o - t) ** 2


def _polish(model: nn.Module, X: torch.Tensor, y: torch.Tensor, rounds: int = 1, **kw) -> None:
    """Full-batch L-BFGS on mean loss + WD / 2 |theta|^2 (``kw``: the optimizer's options)."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1, line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-14, **kw)

    def closure():
        opt.zero_grad()
        obj = loss_fn(model(X), y).mean() + 0.5 * WD * sum(p.pow(2).sum() for p in model.parameters())
        obj.backward()
        return obj
    for _ in range(rounds):
        opt.step(closure)


def _assess(model, loader, schemes, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ml.assess(model, schemes, loader, loss_fn, weight_decay=WD, **kw)


def _spectrum(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    """The exact sandwich in float64: H's spectrum, R's, and where the Mahalanobis norm lies."""
    m = nn.Sequential(*[type(mod)(*(() if not isinstance(mod, nn.Linear) else (mod.in_features, mod.out_features)))
                        if not isinstance(mod, nn.Flatten) else nn.Flatten(0) for mod in model]).double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    names = [k for k, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in m.parameters()])
    Xd, yd = X.double(), y.double()

    def unflat(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = t[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def one(t, x, yy):
        return loss_fn(functional_call(m, unflat(t), (x[None],))[0], yy)

    H = torch.autograd.functional.hessian(lambda t: vmap(one, (None, 0, 0))(t, Xd, yd).mean()
                                          + 0.5 * WD * t.square().sum(), theta)
    G = vmap(grad(one), (None, 0, 0))(theta, Xd, yd) + WD * theta
    C = G - G.mean(0)
    V = C.T @ C / len(Xd)
    ev = torch.linalg.eigvalsh(H)
    Hi = torch.linalg.inv(H)
    S = Hi @ V @ Hi
    D = S.diag().sqrt()
    R = S / D[:, None] / D[None]
    lam, Q = torch.linalg.eigh(R)
    P = ((-(C @ Hi)) / D @ Q).square() / lam
    share = {c: float((P[:, lam < c].sum(1) / P.sum(1)).mean()) for c in (1e-4, 1e-3, 1e-2)}
    print(f"  H: {int((ev < 0).sum())} negative eigenvalues, smallest |eig| {float(ev.abs().min()):.3g}, "
          f"largest {float(ev.max()):.3g}; R: largest eigenvalue {float(lam[-1]):.1f} of d = {len(lam)} "
          f"({100 * float(lam[-1]) / len(lam):.0f}% of the trace)")
    print("  share of w'R^-1 w along R's eigenvalues below " + ", ".join(f"{c:g}: {v:.3f}" for c, v in share.items()))


def bias() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2500, 8, generator=g)
    y = torch.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] + 0.3 * torch.randn(2500, generator=g)
    X, y = X[:2000], y[:2000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1), nn.Flatten(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=WD)
    for _ in range(10):
        for xb, yb in DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True):
            opt.zero_grad()
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    for stage in ("Adam, 10 epochs", "L-BFGS polish"):
        if stage.startswith("L-BFGS"):
            _polish(model, X, y, max_iter=1000)
        print(f"== {stage}")
        _spectrum(model, X, y)
        for lev in ("auto", False):
            rep = _assess(model, loader, ["int8_weight_only", "intx_weight_only_int2"], leverage_correction=lev)
            dg = rep.diagnostics
            rows = {r["scheme"]: r for r in rep.rows()}
            print(f"  leverage_correction={lev!s:5}: baseline {rep.baseline_leakage:.4f} (correlated form before "
                  f"the spread term {dg.get('baseline_leakage_without_spread', rep.baseline_leakage):.4f}, "
                  f"independent {dg.get('baseline_leakage_independent', float('nan')):.4f}); int8 "
                  f"{rows['int8_weight_only']['leakage']:.4f} (d_eff {rows['int8_weight_only']['d_eff']:.1f}), int2 "
                  f"{rows['intx_weight_only_int2']['leakage']:.4f}; mean leverage {dg.get('mean_leverage', 0):.3f}; "
                  f"marks {rows['int8_weight_only'].get('indicative', '')!r}")
            if lev == "auto":
                print("  " + " ".join(rep.table().split("verdict:")[1].split("\n\n")[0].split()))


def seeds(which: list[int]) -> None:
    torch.set_num_threads(1)
    n = 1000
    for seed in which:
        g = torch.Generator().manual_seed(90000 + 31 * seed + n)
        X = torch.randn(n, 8, generator=g, dtype=torch.float64)
        y = (torch.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] - 0.3 * X[:, 3]
             + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
        X, y = X.float(), y.float()
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0))
        _polish(model, X, y, rounds=3, max_iter=3000, history_size=50)
        rep = _assess(model, DataLoader(TensorDataset(X, y), batch_size=512), ["int8_weight_only"], num_records=n)
        dg, row = rep.diagnostics, rep.rows()[0]
        print(f"seed {seed}: baseline {rep.baseline_leakage:.4f} (before the spread term "
              f"{dg.get('baseline_leakage_without_spread', float('nan')):.4f}) int8 {row['leakage']:.4f} mean leverage "
              f"{dg.get('mean_leverage', float('nan')):.3f} max {dg.get('max_leverage', float('nan')):.3g} capped "
              f"{dg.get('leverage_capped')} mark {row.get('indicative', '')!r}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["bias"]:
        bias()
    elif sys.argv[1:2] == ["seeds"]:
        seeds([int(a) for a in sys.argv[2:]] or list(range(12)))
    else:
        raise SystemExit(__doc__)
