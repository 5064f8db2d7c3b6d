"""dg52: nf51's second-order lead measured on a real network (docs/benchmarks.md, "dg52"; not wired).

For a record set (the training records, or held-out ones) of a fitted classifier: each record's leverage
``h_i = tr(L_i J_i H^-1 J_i') / m`` (``J_i`` the logits' Jacobian, ``L_i = diag p - p p'``, ``H`` the set's
Gauss-Newton matrix plus the decay, ``m`` the set's size: what an estimator given only that set can form) and
its standardised squared residual ``r_i = g_i' H^-1 g_i / (m h_i)`` (``g_i = J_i' (p_i - y_i)``; ``E r_i = 1``
for a record independent of the fit at the population minimum). Members' residuals shrink with their leverage
(``E r_i ~ 1 - h_i``), a fresh sample's grow (``1 + h_i m / n_train``): the statistic is the slope of ``r`` on
``h`` over the mean ``r`` (members ~ -1, held-out ~ +m / n_train). ``full``: ``H^-1`` exact (the Gauss-Newton
matrix, float64); ``diag``: ``diag(H)^-1`` (what the diagonal estimator holds). nf51's ``small`` MLP
(20-16-16-10, d = 778, 4,000 training records, 1,000 held out, WD 1e-3); ``python benchmarks/dg52_leverage_slope.py``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, "benchmarks")
import unseen_records_diagonal as u  # noqa: E402 - nf51's data, model and fits

torch.set_num_threads(1)


def slope_stat(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    md = model.double().eval()
    params = {k: v.detach() for k, v in md.named_parameters()}
    names = list(params)
    J = vmap(jacrev(lambda p, x: functional_call(md, p, (x.unsqueeze(0),))[0]), in_dims=(None, 0))(params, X.double())
    J = torch.cat([J[k].reshape(len(X), J[k].shape[1], -1) for k in names], 2)  # [m, C, d]
    with torch.no_grad():
        p = F.softmax(md(X.double()), 1)
    L = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    m, d = len(X), J.shape[2]
    H = torch.einsum("icd,ice,ief->df", J, L, J) / m + u.WD * torch.eye(d, dtype=torch.float64)
    g = torch.einsum("icd,ic->id", J, p - F.one_hot(y, p.shape[1]).double())
    out = {}
    for label, Hi in (("full", torch.linalg.inv(H)), ("diag", torch.diag(1.0 / H.diagonal()))):
        h = torch.einsum("icd,de,ibe,icb->i", J, Hi, J, L) / m
        r = torch.einsum("id,de,ie->i", g, Hi, g) / (m * h)
        hc = h - h.mean()
        out[label] = float((hc * r).sum() / hc.square().sum() / r.mean())
        out[label + "_hbar"] = float(h.mean())
    md.float()
    return out


def main() -> None:
    n, nh = 4000, 1000
    X, y = u.teacher_data(n + nh, 20, 10, 0)
    for how, ep, lr in (("lbfgs", 3000, None), ("adamcos", 60, None), ("adam", 60, 3e-4), ("adam", 60, None)):
        torch.manual_seed(0)
        m = u.train(u.mlp(20, 16, 10), X[:n], y[:n], how, ep, lr, 64)
        own, held = slope_stat(m, X[:n], y[:n]), slope_stat(m, X[n:], y[n:])
        print(f"{how} {ep} lr {lr}: members slope full {own['full']:+.2f} diag {own['diag']:+.2f} "
              f"(mean h {own['full_hbar']:.3f} / {own['diag_hbar']:.3f}); held-out full {held['full']:+.2f} "
              f"diag {held['diag']:+.2f} (mean h {held['full_hbar']:.3f} / {held['diag_hbar']:.3f})", flush=True)


if __name__ == "__main__":
    main()
