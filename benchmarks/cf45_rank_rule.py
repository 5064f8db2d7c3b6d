"""The full correlated form's one rank rule on pl44's MLP, and its cost against the cutoff on M
(cf45; docs/benchmarks.md, "cf45"; method.md section 3, "Correlated coordinates").

Prints: R's spectrum (its most negative computed eigenvalue: R's round-off), the mean ``w'R^+w``
with the rule at 1e-8 ... 1e-14 against the gradient covariance's (the estimator's Mahalanobis
norm, which the Hessian cancels out of); the int2 scheme's form against the 50-digit channel
reference (``groundtruth.correlated_reference.channel_quadratic``) on the same model for one
record, and its monotonicity as each kappa is raised to 1; and the per-scheme CPU of the form, the cutoff on ``M`` (``u'M^+u``, one ``[d, d]`` eigh per
scheme, the form before cf45, inlined) against the kept eigenspace, alternated, 1 thread, at
d = 197 (pl44) and d = 1,289 (a synthetic spectrum down to 1e-12, R = 512 records).

    python benchmarks/cf45_rank_rule.py

Runtime (1 thread): about 90 CPU s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pl44_planner_bruteforce as B  # noqa: E402

from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.functional import correlated as C  # noqa: E402
from mis_lightning.groundtruth.correlated_reference import channel_quadratic  # noqa: E402
from mis_lightning.quantization.mixed import MixedPrecisionScheme  # noqa: E402


def _pinv_cut(M: torch.Tensor, rhs: torch.Tensor, rcond: float) -> torch.Tensor:
    """``M^+ rhs`` with eigenvalues of ``M`` below ``rcond`` of the largest dropped (the library's
    pseudo-inverse before cf45)."""
    ev, Q = torch.linalg.eigh(0.5 * (M + M.T))
    inv = torch.where(ev > rcond * ev[-1], 1.0 / ev.clamp_min(1e-300), torch.zeros_like(ev))
    return Q @ (inv.unsqueeze(-1) * (Q.T @ rhs))


def old_form(Rm: torch.Tensor, w: torch.Tensor, x: torch.Tensor, b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[R]`` the form before cf45: ``u'M^+u`` with the cutoff RCOND on M, Sherman-Morrison self term."""
    kh = k.sqrt()
    M = torch.diag(1 - k) + kh[:, None] * Rm * kh[None]
    u, v = w * kh, x * kh
    sol = _pinv_cut(M, torch.cat([u, v]).T, C.RCOND).T
    n = w.shape[0]
    q0 = (u * sol[:n]).sum(-1)
    uv, vv = (u * sol[n:]).sum(-1), (v * sol[n:]).sum(-1)
    return q0 + b * uv.square() / (1 - b * vv).clamp_min(1e-12)


def cost(name: str, Rm: torch.Tensor, w: torch.Tensor, x: torch.Tensor, b: torch.Tensor, schemes: int, reps: int) -> None:
    d = Rm.shape[0]
    g = torch.Generator().manual_seed(0)
    ks = []
    for _ in range(schemes):
        k = torch.rand(d, generator=g, dtype=torch.float64) * 0.95
        k[torch.rand(d, generator=g) < 0.2] = 1.0  # a share left unquantized (biases, norms)
        ks.append(k)
    t_old, t_new = [], []
    for _ in range(reps):
        t = time.process_time()
        for k in ks:
            old_form(Rm, w, x, b, k)
        t_old.append(time.process_time() - t)
        t = time.process_time()
        c = C.Correlation(full=Rm, self_term=x, self_weight=b)  # fresh: R's eigh counted every time
        for k in ks:
            c.quadratic(w, k)
        t_new.append(time.process_time() - t)
    print(f"{name}: d = {d}, R = {w.shape[0]}, {schemes} schemes: cutoff on M {min(t_old):.3f} s, "
          f"kept eigenspace {min(t_new):.3f} s (x{min(t_old) / min(t_new):.2f})")


def main() -> None:
    torch.set_num_threads(1)
    model, tr, va, lossf, cands = B.build("mlp")
    est = run_estimation(model, tr, lossf, EstimationConfig(weight_decay=B.WD))
    Rm, w = est.correlation.to(torch.float64), est.influence.to(torch.float64)
    ev, Q = torch.linalg.eigh(Rm)
    print(f"d = {est.d}, n = {est.n}; R's eigenvalues / largest: min {float(ev[0] / ev[-1]):.2g}; "
          f"mean |Sigma^-1/2 psi|^2 from the gradient covariance {float(est.mahalanobis.double().square().mean()):.4g}")
    proj = (w @ Q).square() / ev.clamp_min(1e-300)
    for tau in (1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13, 1e-14):
        keep = ev > tau * ev[-1]
        print(f"  rule {tau:.0e}: {int(keep.sum())} directions, mean w'R^+w {float(proj[:, keep].sum(-1).mean()):.4g}")
    # the int2 scheme's kappa (42 weights exact): the form against the 50-digit channel reference on
    # the same model R ~ B B' for one record, and no record lower after raising any kappa to 1
    seen: list[torch.Tensor] = []
    channel = C.Correlation._channel
    C.Correlation._channel = lambda self, k: (seen.append(k.clone()), channel(self, k))[1]
    score_schemes(est, model, [MixedPrecisionScheme(dict.fromkeys(("0.weight", "2.weight", "4.weight"), "rtn_int2"),
                                                    name="222")], val_dataloader=va, loss_fn=lossf, uncertainty_draws=0)
    C.Correlation._channel = channel
    k = next(t for t in seen if t.numel() == est.d and bool((t < 1).any()))
    corr = C.Correlation(full=Rm)
    q = corr.quadratic(w, k)
    Bm, Winv, _ = corr._basis()
    ref = channel_quadratic(Bm, w[:1] @ Winv, k, digits=50)
    print(f"int2 ({int((k == 1).sum())} weights exact): record 0 s2 {float(q[0]):.12g}, 50-digit reference {float(ref[0]):.12g}")
    worst = 0.0
    for j in torch.nonzero(k < 1).squeeze(-1).tolist():
        k2 = k.clone()
        k2[j] = 1.0
        worst = max(worst, float(((q - corr.quadratic(w, k2)) / q).max()))
    print(f"  largest fall of a record's s2 when one kappa is raised to 1: {worst:.2g}")
    x = est.self_term.double() if est.self_term is not None else w
    b = est.self_weight.double() if est.self_weight is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    cost("pl44 mlp", Rm, w, x, b, schemes=4, reps=3)
    d, n = 1289, 512
    g = torch.Generator().manual_seed(1)
    Qs, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Rs = C.correlation_from_covariance(Qs @ torch.diag(torch.logspace(0, -12, d, dtype=torch.float64)) @ Qs.T)
    evs, Qr = torch.linalg.eigh(Rs)
    ws = torch.randn(n, d, generator=g, dtype=torch.float64) @ (Qr * evs.clamp_min(0).sqrt()).T
    cost("synthetic", Rs, ws, ws, torch.full((n,), 1.0 / (10 * n), dtype=torch.float64), schemes=3, reps=2)


if __name__ == "__main__":
    main()
