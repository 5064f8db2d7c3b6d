"""Leverage cap with K = rank(L_i) > 1 loss directions against exact leave-one-out refits
(docs/benchmarks.md, "lv58"): a multinomial logistic regression with L2 (convex, refits converge
by Newton in float64), some records' leverage h_i = tr A_i above LEVERAGE_CAP = 0.95 while each
eigenvalue of A_i is below 1. Prints, per record above the cap, the relative error of the
estimator's corrected shift and of the uncapped matrix form (I - A_i)^-1 against the refit, and
the next Newton step's size (the one-step form's own error).

    python benchmarks/lv58_multiclass_cap.py refit [--n 40] [--features 12] [--outliers 10]
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import mis_lightning as ml
from mis_lightning.config import EstimationConfig
from mis_lightning.estimation import estimate
from mis_lightning.estimation.records import record_keys

SCHEMES = ["none", "rtn_int8", "rtn_int4"]


def problem(n: int, f: int, outliers: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=torch.float64)
    x[:outliers] *= 4.0  # a few high-leverage records
    beta = torch.randn(f, 3, generator=g, dtype=torch.float64) / f**0.5
    y = torch.multinomial(torch.softmax(x @ beta, -1), 1, generator=g).squeeze(-1)
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["refit"])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--features", type=int, default=12)
    ap.add_argument("--outliers", type=int, default=10)
    ap.add_argument("--wd", type=float, default=1e-2)
    a = ap.parse_args()
    n, f, wd = a.n, a.features, a.wd
    x, y = problem(n, f, a.outliers)
    X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)  # [n, f+1]; theta = [3, f+1] row-major
    Y = torch.nn.functional.one_hot(y, 3).to(x.dtype)
    d = 3 * (f + 1)

    def grad_hess(w: torch.Tensor, lin: torch.Tensor, th: torch.Tensor):
        T = th.view(3, f + 1)
        p = torch.softmax(X @ T.T, -1)
        gr = ((w[:, None] * (p - Y)).T @ X).reshape(-1) / n + lin / n + wd * th
        S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [n, 3, 3]
        Hs = torch.einsum("i,ikl,ia,ib->kalb", w, S, X, X).reshape(d, d) / n
        return gr, Hs + wd * torch.eye(d, dtype=x.dtype), p, S

    def fit(w, lin, th):
        for _ in range(200):
            gr, Hs, _, _ = grad_hess(w, lin, th)
            step = torch.linalg.solve(Hs, gr)
            th = th - step
            if float(gr.abs().max()) < 1e-13 and float(step.abs().max()) < 1e-14:
                break
        return th

    ones = torch.ones(n, dtype=x.dtype)
    theta = fit(ones, torch.zeros(d, dtype=x.dtype), torch.zeros(d, dtype=x.dtype))
    gr, H, p, S = grad_hess(ones, torch.zeros(d, dtype=x.dtype), theta)
    print(f"fit: max |grad| {float(gr.abs().max()):.2e}, min eig H {float(torch.linalg.eigvalsh(H)[0]):.3e}")
    gbar = gr - wd * theta  # mean data gradient
    Hinv = torch.linalg.inv(H)
    # per record: Q_i = I_3 (x) x_i' [3, d], S_i the softmax Hessian
    Q = torch.einsum("kl,ia->ikla", torch.eye(3, dtype=x.dtype), X).reshape(n, 3, d)
    c = torch.einsum("ik,ia->ika", p - Y, X).reshape(n, d) - gbar
    A = S @ (Q @ Hinv @ Q.transpose(1, 2)) / n
    h = torch.diagonal(A, dim1=1, dim2=2).sum(-1)
    ev = torch.linalg.eigvals(A).real.sort(-1, descending=True).values

    model = nn.Linear(f, 3).double()
    with torch.no_grad():
        T = theta.view(3, f + 1)
        model.weight.copy_(T[:, :f])
        model.bias.copy_(T[:, f])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    est = estimate(model, loader, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
                   mode="exact", weight_decay=wd, num_records=n, leverage_correction=True)
    order = torch.sort(record_keys([x, y], None, n), stable=True).indices
    sig = torch.cat([est.sigma[k] for k in est.names])  # names: weight [3, f] then bias [3]
    psi = est.influence * sig * n**0.5 / n
    shift = torch.empty_like(psi)
    shift[order] = psi
    # parameter order of the estimate: weight.flatten() then bias -> map to theta's [3, f+1] layout
    wpart, bpart = shift[:, :3 * f].reshape(n, 3, f), shift[:, 3 * f:].reshape(n, 3, 1)
    shift = torch.cat([wpart, bpart], -1).reshape(n, d)
    print(f"estimator: mean leverage {est.diagnostics['mean_leverage']:.4f} (own {float(h.mean()):.4f}), "
          f"max {est.diagnostics['max_leverage']:.4f}, capped {est.diagnostics['leverage_capped']}")
    print("record  h_i    eig(A_i)        |exact|   err(estimator)  err(matrix)  err(capped)  next-step  err(1st)")
    rows = []
    for i in range(n):
        w = ones.clone()
        w[i] = 0.0
        exact = theta - fit(w, gbar, theta)
        ct_m = c[i] + Q[i].T @ torch.linalg.solve(torch.eye(3, dtype=x.dtype) - A[i], S[i] @ Q[i] @ Hinv @ c[i] / n)
        s = min(1.0, 0.95 / float(h[i]))
        ct_c = c[i] + Q[i].T @ torch.linalg.solve(torch.eye(3, dtype=x.dtype) - s * A[i], s * S[i] @ Q[i] @ Hinv @ c[i] / n)
        sm, sc, s1 = -Hinv @ ct_m / n, -Hinv @ ct_c / n, -Hinv @ c[i] / n  # theta - theta_-i = -H^-1 c~ / n
        nxt = float(torch.linalg.solve(grad_hess(w, gbar, theta - sm)[1], grad_hess(w, gbar, theta - sm)[0]).norm())
        e = float(exact.norm())
        row = (i, float(h[i]), ev[i, :2].tolist(), e, float((shift[i] - exact).norm()) / e,
               float((sm - exact).norm()) / e, float((sc - exact).norm()) / e, nxt / e, float((s1 - exact).norm()) / e)
        rows.append(row)
        if h[i] > 0.95:
            print(f"{i:4d}  {row[1]:.3f}  {row[2][0]:.3f} {row[2][1]:.3f}   {e:.3e}   {row[4]:.4f}          "
                  f"{row[5]:.4f}       {row[6]:.4f}       {row[7]:.4f}     {row[8]:.4f}")
    lo = [r for r in rows if r[1] <= 0.95]
    print(f"records at or below the cap ({len(lo)}): max |err(estimator) - err(matrix)| "
          f"{max(abs(r[4] - r[5]) for r in lo):.2e}, median err(matrix) {sorted(r[5] for r in lo)[len(lo) // 2]:.4f}")
    print(f"max eigenvalue of any A_i: {float(ev[:, 0].max()):.4f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(model, SCHEMES, loader, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
                        strict=False, uncertainty_draws=0,
                        estimation_config=EstimationConfig(mode="exact", weight_decay=wd, num_records=n))
    print(f"assess exact leakage {' / '.join(SCHEMES)}: {' / '.join(f'{rep.schemes[k].leakage:.4g}' for k in SCHEMES)}; "
          f"sigma range {float(sig.min()):.4g}-{float(sig.max()):.4g}")


if __name__ == "__main__":
    main()
