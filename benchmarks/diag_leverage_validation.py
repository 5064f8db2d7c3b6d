"""The diagonal estimator's leverage correction against the exact estimator's (hc27;
docs/validation.md, "Against the exact estimator" and "More weights than records"; method.md
section 4).

For each model, trained to its optimum in float64: the exact estimator's mean leverage (per
record, over all n stored records) against the diagonal approximation T / n, and the leakage
(baseline, ``rtn_int8``, ``rtn_int4``; ``num_records = n``, ``uncertainty_draws = 0``) of: exact
(leverage correction), diagonal with the correction, diagonal first order
(``leverage_correction=False``), exact first order. Models: ``ols1`` / ``ols3`` (OLS, 1 and 3
outputs, d = 40 / 120, n = 400), ``logit`` (n = 600), ``softmax`` (4 classes, n = 400), ``mlp`` /
``mlp0`` (10-8-1 tanh, wd 1e-2 / 0, n = 500), ``cnn`` (Conv1d + linear head, n = 600).
``--cap-case``: the 20-64-1 tanh MLP (d = 1,409, n = 500), diagonal at wd 1e-2 / 1e-3 / 0 (the
``T/n`` cap) and exact at 1e-3. Runtime: ~1-3 min CPU for the 7 models; the cap case ~1 min.

    python benchmarks/diag_leverage_validation.py                    # the 7 models
    python benchmarks/diag_leverage_validation.py ols1 mlp --json out.json
    python benchmarks/diag_leverage_validation.py --cap-case
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mis_lightning import assess  # noqa: E402

MODELS = ["ols1", "ols3", "logit", "softmax", "mlp", "mlp0", "cnn"]


def mse(o, y):
    return 0.5 * ((o.reshape(len(y), -1) - y.reshape(len(y), -1)) ** 2).sum(-1)


def bce(o, y):
    return nn.functional.binary_cross_entropy_with_logits(o.reshape(-1), y, reduction="none")


def train(model, x, y, loss, wd, iters=400):
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = loss(model(x), y).mean() + 0.5 * wd * sum((p ** 2).sum() for p in model.parameters())
        f.backward()
        return f
    for _ in range(5):
        opt.step(closure)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    return float(g)


def ols_solve(model, x, y):
    X = torch.cat([x, torch.ones(len(x), 1)], 1)
    th = torch.linalg.solve(X.T @ X, X.T @ y.reshape(len(x), -1))
    with torch.no_grad():
        model.weight.copy_(th[:-1].T)
        model.bias.copy_(th[-1])


class CNN(nn.Module):
    def __init__(self, L=16, ch=4):
        super().__init__()
        self.conv = nn.Conv1d(1, ch, 3)
        self.head = nn.Linear(ch * (L - 2), 1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1))


def case(name, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name.startswith("ols1"):
        n, p = 400, 39
        x = torch.randn(n, p, generator=g)
        y = x @ (torch.randn(p, generator=g) / p ** .5) + torch.randn(n, generator=g)
        m = nn.Linear(p, 1)
        ols_solve(m, x, y)
        return m, x, y, mse, 0.0
    if name.startswith("ols3"):
        n, p = 400, 39
        x = torch.randn(n, p, generator=g)
        y = x @ (torch.randn(p, 3, generator=g) / p ** .5) + torch.randn(n, 3, generator=g)
        m = nn.Linear(p, 3)
        ols_solve(m, x, y)
        return m, x, y, mse, 0.0
    if name.startswith("logit"):
        n, p = 600, 39
        x = torch.randn(n, p, generator=g)
        y = (torch.rand(n, generator=g) < torch.sigmoid(x @ (1.5 * torch.randn(p, generator=g) / p ** .5))).double()
        m = nn.Linear(p, 1)
        wd = 1e-3
        train(m, x, y, bce, wd)
        return m, x, y, bce, wd
    if name == "mlp":
        n, p, hdim = 500, 10, 8
        x = torch.randn(n, p, generator=g)
        y = torch.tanh(x[:, :3].sum(1)) + 0.3 * torch.randn(n, generator=g)
        m = nn.Sequential(nn.Linear(p, hdim), nn.Tanh(), nn.Linear(hdim, 1))
        wd = 1e-2
        train(m, x, y, mse, wd)
        return m, x, y, mse, wd
    if name.startswith("softmax"):
        n, p, C = 400, 19, 4
        x = torch.randn(n, p, generator=g)
        W = 1.5 * torch.randn(p, C, generator=g) / p ** .5
        y = torch.multinomial(torch.softmax(x @ W, -1), 1, generator=g).squeeze(-1)
        m = nn.Linear(p, C)
        wd = 1e-3

        def ce(o, t):
            return nn.functional.cross_entropy(o, t, reduction="none")
        train(m, x, y, ce, wd)
        return m, x, y, ce, wd
    if name.startswith("mlp0"):
        n, p, hdim = 500, 10, 8
        x = torch.randn(n, p, generator=g)
        y = torch.tanh(x[:, :3].sum(1)) + 0.3 * torch.randn(n, generator=g)
        m = nn.Sequential(nn.Linear(p, hdim), nn.Tanh(), nn.Linear(hdim, 1))
        wd = 0.0
        train(m, x, y, mse, wd)
        return m, x, y, mse, wd
    if name.startswith("cnn"):
        n, L = 600, 16
        x = torch.randn(n, L, generator=g)
        y = (x[:, 1:] * x[:, :-1]).sum(1) / 4 + 0.5 * torch.randn(n, generator=g)
        m = CNN(L)
        wd = 1e-3
        train(m, x, y, mse, wd)
        return m, x, y, mse, wd
    raise ValueError(name)


def run(name, seed=0):
    m, x, y, loss, wd = case(name, seed)
    n = len(x)
    d = sum(p.numel() for p in m.parameters())
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    row = {"model": name, "n": n, "d": d, "wd": wd}
    for tag, est, lc in (("exact", "exact", "auto"), ("diag", "diagonal", "auto"), ("diag_fo", "diagonal", False),
                         ("exact_fo", "exact", False)):
        t = time.process_time()
        rep = assess(m, ["rtn_int8", "rtn_int4"], dl, loss, estimation=est, weight_decay=wd, num_records=n,
                     leverage_correction=lc, uncertainty_draws=0)
        dg = rep.diagnostics
        row[tag] = {"baseline": rep.baseline_leakage, "int8": rep.schemes["rtn_int8"].leakage,
                    "int4": rep.schemes["rtn_int4"].leakage, "mean_leverage": dg.get("mean_leverage"),
                    "per_direction": dg.get("leverage_per_direction"), "directions": dg.get("leverage_directions"),
                    "baseline_first_order_spread": dg.get("baseline_leakage_first_order"),
                    "warnings": [w for w in rep.warnings if "leverage" in w], "cpu_s": time.process_time() - t}
    return row


def cap_case() -> None:
    """More weights than records: the 20-64-1 tanh MLP, diagonal (T/n, its cap) and exact."""
    g = torch.Generator().manual_seed(0)
    n = 500
    x = torch.randn(n, 20, generator=g)
    y = torch.tanh(x[:, :3].sum(1)) + 0.3 * torch.randn(n, generator=g)
    for wd in (1e-2, 1e-3, 0.0):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 1))
        gn = train(m, x, y, mse, wd, iters=300)
        dl = DataLoader(TensorDataset(x, y), batch_size=100)
        out = []
        for lc in ("auto", False):
            rep = assess(m, ["rtn_int8", "rtn_int4"], dl, mse, estimation="diagonal", weight_decay=wd,
                         leverage_correction=lc, uncertainty_draws=0)
            out.append((rep.baseline_leakage, rep.schemes["rtn_int4"].leakage))
        dg = rep.diagnostics
        print(f"diagonal wd={wd} grad={gn:.1e} T/n={dg['mean_leverage']:.3f} capped={dg['leverage_capped']} | baseline "
              f"corr {out[0][0]:.4f} first-order {out[1][0]:.4f} | int4 corr {out[0][1]:.4f} fo {out[1][1]:.4f}")
        if wd == 1e-3:
            for lc in ("auto", False):
                rep = assess(m, ["rtn_int4"], dl, mse, estimation="exact", weight_decay=wd, leverage_correction=lc,
                             uncertainty_draws=0, num_records=n)
                dg = rep.diagnostics
                print(f"exact lc={lc} mean_leverage={dg['mean_leverage']:.3f} max={dg['max_leverage']:.3f} "
                      f"capped={dg['leverage_capped']} baseline {rep.baseline_leakage:.4f} "
                      f"int4 {rep.schemes['rtn_int4'].leakage:.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=MODELS, help=f"any of {MODELS}")
    ap.add_argument("--cap-case", action="store_true", help="the d > n case instead (see above)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    if args.cap_case:
        cap_case()
        return 0
    rows = []
    for nm in args.models:
        r = run(nm)
        rows.append(r)
        e, dg, fo = r["exact"], r["diag"], r["diag_fo"]
        print(f"{nm}: n={r['n']} d={r['d']} wd={r['wd']} | mean leverage exact {e['mean_leverage']:.4f} "
              f"diag {dg['mean_leverage']:.4f} (per dir {dg['per_direction']:.4f}, dirs {dg['directions']})")
        for k in ("baseline", "int8", "int4"):
            print(f"   {k}: exact {e[k]:.4f} | diag corrected {dg[k]:.4f} ({dg[k] / e[k] - 1:+.1%}) | "
                  f"diag first order {fo[k]:.4f} ({fo[k] / e[k] - 1:+.1%}) | exact first order {r['exact_fo'][k]:.4f}")
        print(f"   spread-free baselines: exact {e['baseline_first_order_spread']}, diag {dg['baseline_first_order_spread']}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
