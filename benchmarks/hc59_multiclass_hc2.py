"""The HC2 term's per-direction leverage with K = rank(L_i) > 1 loss directions against a simulation
reference (docs/benchmarks.md, "hc59").

    OMP_NUM_THREADS=1 python benchmarks/hc59_multiclass_hc2.py ref [--model mlr|head|mlp] [--ks 2,3,4,5]
        [--ratios 0.1,0.3,0.5,0.7,0.9] [--n 100] [--reps 20] [--boot 3000]
    OMP_NUM_THREADS=1 python benchmarks/hc59_multiclass_hc2.py package [--model mlr|mlp] [--k 3] [--ratio 0.5]
    OMP_NUM_THREADS=1 python benchmarks/hc59_multiclass_hc2.py gmean [--n 64]

A softmax classifier with ``C = K + 1`` classes and L2 ``wd`` (``mlr``: multinomial logistic regression
``Linear(f, C)``; ``head``: the same on a fixed random ``tanh`` layer of 4 inputs (an MLP's softmax head);
``mlp``: ``Linear(f, 2) -> tanh -> Linear(2, C)``, every weight fitted: slow, and its Newton refits leave the
basin), a fixed design
(``x ~ N(0, I_f)``, one record in 8 scaled 4x: high-leverage records) and labels drawn from the fitted
model ``theta_0`` (the truth of this reference). Everything is float64 and fitted by Newton to convergence
(batched over records and draws).

``ref``: per (K, d / n):

* the truth: ``Sigma = n Cov(theta_hat)`` over ``--boot`` label draws (refits from ``theta_0``);
* ``--reps`` datasets of the same design, each fitted, and on each: every record's exact leave-one-out refit of
  method.md's "Shift" objective (record ``i``'s loss replaced by ``g_bar' theta / n``, Newton from
  ``theta_hat``), the estimator's Woodbury shift ``-H^-1 c~_i / n`` and its covariance under the HC2 forms:
  ``none`` (``V = mean c c'``), ``h/K`` (the library's form: ``c c' / (1 - h_i / K)``), ``h`` (the total),
  ``top`` (``A_i``'s largest eigenvalue) and ``matrix`` (``c^ = (I - P_i H^-1 / n)^-1/2 c``, ``P_i`` the
  record's factor: the HC2 form whose expectation is right in every output direction to first order,
  ``E[e^ e^'] = (I - A_i) L_i``);
* the headline ``mean_i (2 Phi(delta_i / 2) - 1)`` (the mean-shift Gaussian TV, no spread term: the same in
  every column) with ``delta_i^2 = n s_i' Sigma^-1 s_i`` (``Sigma / n = Cov(theta_hat)``): the reference from the exact refit shifts ``s_i``
  and the true ``Sigma`` (its inverse debiased for the draws, ``(B - d - 2) / (B - 1)``), each form from
  the Woodbury shift and the form's ``Sigma``; and ``cov only``: the exact shifts with the form's ``Sigma``
  (the HC2 term's own error).

Prints the relative error of each headline against the reference (mean over the datasets, with its
standard error), and the mean ``Sigma_jj`` of each form over the truth's.

``package``: one dataset through ``mis_lightning.estimation.estimate`` (mode ``exact``) with the library's
``estimate.HC2_FORM`` switch either way, its ``sigma`` against this script's own forms (``h/K``, ``matrix``),
and ``assess``'s headline (exact and diagonal estimators; the diagonal one has no per-record factor and reads
the same either way).

``gmean``: iv58b's Gaussian mean (the leverage correction's ~1% overshoot near d = n): the HC2 forms coincide
there (isotropic ``A_i``), and the overshoot is the shift's (see the mode's docstring).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

torch.set_default_dtype(torch.float64)


# ----------------------------------------------------------------------------- models
class Problem:
    """A softmax classifier ``logits(theta, X)`` over a fixed design, with L2 ``wd``."""

    def __init__(self, model: str, n: int, K: int, ratio: float, wd: float, seed: int = 0) -> None:
        self.model, self.n, self.C, self.wd = model, n, K + 1, wd
        C = self.C
        target = ratio * n
        if model in ("mlr", "head"):  # d = C (f + 1)
            self.f, self.m = max(1, round(target / C) - 1), 0
        else:  # d = 2 (f + 1) + C (2 + 1)
            self.m = 2
            self.f = max(1, round((target - 3 * C) / 2) - 1)
        self.net = self._net()
        self.names = [k for k, _ in self.net.named_parameters()]
        self.shapes = [p.shape for _, p in self.net.named_parameters()]
        self.d = sum(p.numel() for p in self.net.parameters())
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.f, generator=g)
        x[: max(1, n // 8)] *= 4.0
        if model == "head":  # a softmax head on a fixed random tanh layer (4 inputs -> f features)
            raw = torch.randn(n, 4, generator=g)
            raw[: max(1, n // 8)] *= 4.0
            x = torch.tanh(raw @ torch.randn(4, self.f, generator=g) + 0.5 * torch.randn(self.f, generator=g))
        self.x = x
        theta = 0.5 * torch.randn(self.d, generator=g) / math.sqrt(self.f + 1)
        self.y0 = torch.multinomial(torch.softmax(self.logits(theta, x), -1), 1, generator=g).squeeze(-1)
        self.theta0 = self.fit(theta[None], self.y0[None], iters=300)[0]
        if not bool(torch.isfinite(self.theta0).all()):
            raise RuntimeError(f"{model} K={K} d/n={ratio}: the truth's fit did not converge (raise --wd)")
        self.p0 = torch.softmax(self.logits(self.theta0, x), -1)  # the truth's label law

    def _net(self) -> nn.Module:
        if self.model in ("mlr", "head"):
            return nn.Linear(self.f, self.C)
        return nn.Sequential(nn.Linear(self.f, self.m), nn.Tanh(), nn.Linear(self.m, self.C))

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, s in zip(self.names, self.shapes):
            out[k] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, self.params(theta), (x,))

    def record_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(theta, x[None]), y[None])

    def objective(self, theta, w, lin, y):
        """``sum_j w_j l_j / n + lin' theta / n + wd |theta|^2 / 2``."""
        out = self.logits(theta, self.x)
        loss = nn.functional.cross_entropy(out, y, reduction="none")
        return (w * loss).sum() / self.n + (lin * theta).sum() / self.n + 0.5 * self.wd * (theta * theta).sum()

    def _mlr_parts(self, theta, y):
        W, b = theta[:, :self.C * self.f].view(-1, self.C, self.f), theta[:, self.C * self.f:]
        p = torch.softmax(torch.einsum("bcf,nf->bnc", W, self.x) + b[:, None, :], -1)
        return p, p - nn.functional.one_hot(y, self.C).to(p.dtype)

    def _mlr_grad(self, theta, w, lin, y):
        """The objective's gradient for ``Linear(f, C)`` (weight ``[C, f]`` then bias), batched."""
        _, r = self._mlr_parts(theta, y)
        wr = w[:, :, None] * r
        gw = torch.einsum("bnc,nf->bcf", wr, self.x).reshape(theta.shape[0], -1)
        return torch.cat([gw, wr.sum(1)], -1) / self.n + lin / self.n + self.wd * theta

    def _mlr_hess(self, theta, w, lin, y):
        p, _ = self._mlr_parts(theta, y)
        S = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # [B, n, C, C]
        X1 = torch.cat([self.x, torch.ones(self.n, 1)], -1)
        Hs = torch.einsum("bn,bnkl,na,nc->bkalc", w, S, X1, X1) / self.n  # [B, C, f+1, C, f+1]
        # reorder (class, feature | bias) to the parameter layout: weight [C, f] then bias [C]
        perm = [k * (self.f + 1) + j for k in range(self.C) for j in range(self.f)] + [
            k * (self.f + 1) + self.f for k in range(self.C)]
        B = theta.shape[0]
        Hs = Hs.reshape(B, self.d, self.d)[:, perm][:, :, perm]
        return Hs + self.wd * torch.eye(self.d)

    def fit(self, theta, y, w=None, lin=None, iters: int = 60, chunk: int = 256):
        """Newton, batched: ``theta [B, d]`` starts, ``y [B, n]``, ``w [B, n]``, ``lin [B, d]``; returns
        the minimisers (``nan`` rows where Newton did not converge)."""
        B = theta.shape[0]
        w = torch.ones(B, self.n) if w is None else w
        lin = torch.zeros(B, self.d) if lin is None else lin
        out = []
        gfun, hfun = (self._mlr_grad, self._mlr_hess) if self.model in ("mlr", "head") else (
            vmap(grad(self.objective)), vmap(hessian(self.objective)))
        ffun = vmap(self.objective)
        for s in range(0, B, chunk):
            th, yy, ww, ll = theta[s:s + chunk].clone(), y[s:s + chunk], w[s:s + chunk], lin[s:s + chunk]
            done = torch.zeros(th.shape[0], dtype=torch.bool)
            for _ in range(iters):
                a = ~done  # only the rows still moving
                x, ya, wa, la = th[a], yy[a], ww[a], ll[a]
                gr = gfun(x, wa, la, ya)
                Hs = hfun(x, wa, la, ya)
                step = torch.linalg.solve(Hs, gr.unsqueeze(-1)).squeeze(-1)
                # backtracking (Armijo) on the objective: plain Newton diverges from far on a softmax
                f0 = ffun(x, wa, la, ya)
                t = torch.ones(x.shape[0], 1)
                for _ in range(20):
                    f1 = ffun(x - t * step, wa, la, ya)
                    # (within the objective's rounding: near the minimum the decrease is below it)
                    ok = f1 <= f0 - 1e-4 * t.squeeze(-1) * (gr * step).sum(-1) + 1e-13 * f0.abs().clamp_min(1.0)
                    bad = ~ok & (t.squeeze(-1) > 1e-6)
                    if not bool(bad.any()):
                        break
                    t[bad] *= 0.5
                step = t * step
                th[a] = x - step
                done[a] = (gr.abs().amax(-1) < 1e-12) & (step.abs().amax(-1) < 1e-13)
                if bool(done.all()):
                    break
            th[~done] = float("nan")
            out.append(th)
        return torch.cat(out)


# ----------------------------------------------------------------------------- per-dataset forms
def factors(pb: Problem, theta: torch.Tensor, y: torch.Tensor):
    """At a fit: centred gradients ``c [n, d]``, ``H [d, d]``, the records' factors ``P_i = Q_i' S_i Q_i``
    ``[n, d, d]`` (``Q_i`` the rows of the logits' Jacobian, ``S_i`` the record's Hessian on them) and
    ``K_i = rank(S_i)``."""
    n = pb.n
    g = vmap(grad(pb.record_loss), (None, 0, 0))(theta, pb.x, y)  # [n, d]
    Hi = vmap(hessian(pb.record_loss), (None, 0, 0))(theta, pb.x, y)  # [n, d, d]
    H = Hi.mean(0) + pb.wd * torch.eye(pb.d)
    J = vmap(torch.func.jacrev(lambda th, x: pb.logits(th, x[None])[0]), (None, 0))(theta, pb.x)  # [n, C, d]
    U, s, Vh = torch.linalg.svd(J, full_matrices=False)
    keep = s > s[:, :1] * 1.5e-8
    P, K = [], []
    for i in range(n):
        Q = Vh[i][keep[i]]
        S = Q @ Hi[i] @ Q.T
        P.append(Q.T @ S @ Q)
        K.append(int(torch.linalg.matrix_rank(S, rtol=1e-6, hermitian=True).clamp_min(1)))
    gbar = g.mean(0)
    return g - gbar, H, torch.stack(P), torch.tensor(K, dtype=torch.float64), gbar


def sym_pow(M: torch.Tensor, p: float) -> torch.Tensor:
    e, U = torch.linalg.eigh(0.5 * (M + M.T))
    return (U * e.clamp_min(0.0).pow(p)) @ U.T


RCOND = 1e-9  # relative eigenvalue below which a direction is null (float64 rounding ~1e-16)
FORMS = ("none", "h/K", "h", "top", "matrix")


def estimator(c, H, P, K, n: int, cap: float = 0.95):
    """Woodbury-corrected gradients ``c~ [n, d]`` and the HC2 forms' ``V`` ``{form: [d, d]}``."""
    Hinv = torch.linalg.inv(H)
    Hh, Hmh = sym_pow(H, 0.5), sym_pow(H, -0.5)
    V0 = c.T @ c / n
    ct, ch, h, top = [], [], [], []
    for i in range(n):
        B = Hmh @ P[i] @ Hmh / n  # symmetric, eigenvalues those of A_i
        e, U = torch.linalg.eigh(0.5 * (B + B.T))
        t = float(e.max())
        sc = min(1.0, cap / t) if t > 0 else 1.0
        e = e * sc
        h.append(float(e.sum()))
        top.append(float(e.max()))
        # (I - P H^-1 / n)^p = H^1/2 (I - B)^p H^-1/2
        ct.append(Hh @ ((U / (1 - e)) @ (U.T @ (Hmh @ c[i]))))
        ch.append(Hh @ ((U / (1 - e).sqrt()) @ (U.T @ (Hmh @ c[i]))))
    ct, ch = torch.stack(ct), torch.stack(ch)
    h, top = torch.tensor(h), torch.tensor(top)

    def scalar(hh):
        return V0 + (c * (hh / (1 - hh)).unsqueeze(-1)).T @ c / n

    V = {"none": V0, "h/K": scalar(h / K), "h": scalar(h.clamp(max=0.95)), "top": scalar(top),
         "matrix": ch.T @ ch / n}
    return ct, V, Hinv, h, K


def residual_check(pb: Problem, tb: torch.Tensor, yb: torch.Tensor) -> dict[str, float]:
    """What HC2 corrects, per record, against the draws: the in-sample output residual ``r^ = p(theta_hat) - y``
    has covariance ``L_i^1/2 (I - B_i - W_i) L_i^1/2`` to first order (``L_i`` the truth's label covariance,
    ``B_i = L_i^1/2 J_i H^-1 J_i' L_i^1/2 / n``, eigenvalues those of ``A_i``; ``W_i = wd L_i^1/2 J_i H^-2 J_i'
    L_i^1/2 / n`` the penalty's, in both forms alike); the library's HC2 reads the deficit ``B_i`` as ``h_i / K``
    in every direction. Whitened by ``L_i^+1/2``, the observed deficit ``D_i`` over the draws less ``W_i``,
    against ``B_i`` (matrix) and ``(h_i / K) I`` (per direction): on the records whose ``B_i`` is anisotropic
    (top eigenvalue above 1.5 ``h_i / K``) the mean deficit along its top eigenvector (observed, matrix, per
    direction; the draws' sd per record ~``sqrt(2 / B)``)."""
    n, C = pb.n, pb.C
    th0 = pb.theta0
    J = vmap(torch.func.jacrev(lambda th, x: pb.logits(th, x[None])[0]), (None, 0))(th0, pb.x)  # [n, C, d]
    p0 = pb.p0
    L = torch.diag_embed(p0) - p0[:, :, None] * p0[:, None, :]
    H = torch.einsum("ikd,ikl,ile->de", J, L, J) / n + pb.wd * torch.eye(pb.d)
    M = J @ torch.linalg.solve(H, J.transpose(1, 2)) / n  # [n, C, C]
    HJ = torch.linalg.solve(H, J.transpose(1, 2))  # [n, d, C]
    Mw = pb.wd * HJ.transpose(1, 2) @ HJ / n  # the penalty's part of the deficit (J H^-2 J' wd / n)
    p = torch.softmax(vmap(lambda th: pb.logits(th, pb.x))(tb), -1)  # [B, n, C]
    r = p - nn.functional.one_hot(yb, C).to(p.dtype)
    r = r - r.mean(0)
    m2 = torch.einsum("bik,bil->ikl", r, r) / (r.shape[0] - 1)
    top = []
    for i in range(n):
        e, U = torch.linalg.eigh(L[i])
        keep = e > 1e-9 * e.max()
        Lh = (U[:, keep] * e[keep].sqrt()) @ U[:, keep].T
        Lmh = (U[:, keep] / e[keep].sqrt()) @ U[:, keep].T
        Pr = U[:, keep] @ U[:, keep].T
        D = Pr - Lmh @ m2[i] @ Lmh - Lh @ Mw[i] @ Lh
        B = Lh @ M[i] @ Lh
        K = int(keep.sum())
        hk = float(B.trace()) / K
        b, V = torch.linalg.eigh(B)
        if K > 1 and float(b[-1]) > 1.5 * hk:
            u = V[:, -1]
            top.append((float(u @ D @ u), float(b[-1]), hk))
    out = {"aniso": len(top)}
    if top:
        for k, j in (("top_obs", 0), ("top_matrix", 1), ("per_direction", 2)):
            out[k] = statistics.mean(t[j] for t in top)
    return out


def tv_mean(delta2: torch.Tensor) -> float:
    return float(torch.erf(delta2.clamp_min(0).sqrt() / 2 / math.sqrt(2)).mean())  # 2 Phi(d/2) - 1


def reference(model: str, K: int, ratio: float, n: int, reps: int, boot: int, wd: float, seed: int = 0):
    pb = Problem(model, n, K, ratio, wd, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    yb = torch.multinomial(pb.p0.repeat(boot, 1, 1).view(-1, pb.C), 1, generator=g).view(boot, n)
    tb = pb.fit(pb.theta0.repeat(boot, 1), yb)
    ok = torch.isfinite(tb).all(-1)
    tb = tb[ok]
    Bn = tb.shape[0]
    cov = torch.cov(tb.T)
    # the softmax's class shift is no direction of any fit (the penalty sets it to 0): a
    # pseudo-inverse on the rest, debiased for the draws (Wishart: E[S^-1] = Cov^-1 (B - 1) / (B - r - 2))
    e, U = torch.linalg.eigh(cov)
    keep = e > RCOND * e.max()
    r = int(keep.sum())
    prec = (U[:, keep] / e[keep]) @ U[:, keep].T * (Bn - r - 2) / (Bn - 1)
    Sigma_true = n * cov
    resid = residual_check(pb, tb, yb[ok])
    errs = {f: [] for f in FORMS}
    cov_only = {f: [] for f in FORMS}
    shift_err, refs, diag = [], [], {f: [] for f in FORMS}
    lev = []
    yr = torch.multinomial(pb.p0.repeat(reps, 1, 1).view(-1, pb.C), 1, generator=g).view(reps, n)
    fits = pb.fit(pb.theta0.repeat(reps, 1), yr)
    skipped = unconverged = 0
    for r in range(reps):
        th, y = fits[r], yr[r]
        if not bool(torch.isfinite(th).all()):
            skipped += 1
            continue
        c, H, P, Kr, gbar = factors(pb, th, y)
        w = torch.ones(n, n) - torch.eye(n)
        lin = gbar.repeat(n, 1)  # record i's loss replaced by g_bar' theta / n
        loo = pb.fit(th.repeat(n, 1), y.repeat(n, 1), w, lin)
        good = torch.isfinite(loo).all(-1)  # refits that converged (the MLP's can leave the basin)
        if int(good.sum()) < n // 2:
            skipped += 1
            continue
        unconverged += n - int(good.sum())
        s = (th - loo)[good]  # exact theta_hat - theta_hat_-i
        ct, V, Hinv, h, Kr = estimator(c, H, P, Kr, n)
        west = -(ct @ Hinv)[good] / n  # theta_hat - theta_hat_-i = -H^-1 c~ / n (method.md "Shift")
        shift_err.append(float(((west - s).norm(dim=-1) / s.norm(dim=-1)).median()))
        ref = tv_mean(torch.einsum("id,de,ie->i", s, prec, s))
        refs.append(ref)
        lev.append((float(h.mean()), float(h.max())))
        for f in FORMS:
            Sig = Hinv @ V[f] @ Hinv
            Pf = torch.linalg.pinv(Sig / n, hermitian=True, rtol=RCOND)
            errs[f].append(tv_mean(torch.einsum("id,de,ie->i", west, Pf, west)) / ref - 1)
            cov_only[f].append(tv_mean(torch.einsum("id,de,ie->i", s, Pf, s)) / ref - 1)
            diag[f].append(float((Sig.diagonal() / Sigma_true.diagonal()).mean()))
    return pb, Bn, refs, errs, cov_only, shift_err, diag, lev, (skipped, unconverged), resid


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{100 * m:+.2f} ({100 * se:.2f})"


def ref_mode(a) -> None:
    print(f"# {a.model}, n = {a.n}, wd = {a.wd}, {a.reps} datasets, {a.boot} draws for the truth; "
          f"headline error vs the reference, % (se); uptime: {os.popen('uptime').read().strip()}")
    print("| K | d | d/n | mean h_i (max) | reference | shift err (median) | "
          + " | ".join(f"{f}" for f in FORMS) + " | cov only: " + " | ".join(FORMS) + " | Sigma_jj / true: "
          + " | ".join(FORMS) + " |")
    resid_rows = []
    for K in [int(k) for k in a.ks.split(",")]:
        for ratio in [float(x) for x in a.ratios.split(",")]:
            t0 = time.time()
            pb, Bn, refs, errs, cov_only, shift_err, diag, lev, skipped, rc = reference(
                a.model, K, ratio, a.n, a.reps, a.boot, a.wd)
            top = (f"{rc['aniso']} | {rc['top_obs']:.3f} / {rc['top_matrix']:.3f} / {rc['per_direction']:.3f}"
                   if rc["aniso"] else "0 | -")
            resid_rows.append(f"| {K} | {pb.d} | {pb.d / pb.n:.2f} | {top} |")
            if not refs:
                print(f"| {K} | {pb.d} | {pb.d / pb.n:.2f} | no dataset converged |")
                continue
            print(f"| {K} | {pb.d} | {pb.d / pb.n:.2f} | {statistics.mean(x[0] for x in lev):.3f} "
                  f"({max(x[1] for x in lev):.2f}) | {statistics.mean(refs):.4f} | "
                  f"{statistics.median(shift_err):.3f} | " + " | ".join(fmt(errs[f]) for f in FORMS) + " | "
                  + " | ".join(fmt(cov_only[f]) for f in FORMS) + " | "
                  + " | ".join(f"{statistics.mean(diag[f]):.3f}" for f in FORMS)
                  + f" | ({len(refs)} datasets, {skipped[0]} skipped, {skipped[1]} refits unconverged and left out, {Bn} "
                  f"draws, {time.time() - t0:.0f} s)", flush=True)
    print("\nThe in-sample residual's deficit (HC2's target), whitened, over the draws, on the records whose B_i's top "
          "eigenvalue exceeds 1.5 h_i / K: along that eigenvector, observed / matrix / per direction")
    print("| K | d | d/n | records | observed / matrix / per direction |")
    print("\n".join(resid_rows))


def package_mode(a) -> None:
    """One dataset (the truth's own labels) through the library, ``HC2_FORM`` either way, alternating."""
    import sys
    import warnings

    import mis_lightning as ml
    from mis_lightning.config import EstimationConfig
    from mis_lightning.estimation import estimate
    E = sys.modules["mis_lightning.estimation.estimate"]

    pb = Problem(a.model, a.n, a.k, a.ratio, a.wd)
    n, y = pb.n, pb.y0
    th = pb.fit(pb.theta0[None], y[None], iters=300)[0]
    c, H, P, Kr, _ = factors(pb, th, y)
    _, V, Hinv, h, _ = estimator(c, H, P, Kr, n)
    own = {f: (Hinv @ V[f] @ Hinv).diagonal().sqrt() / n**0.5 for f in ("h/K", "matrix")}
    model = pb._net()
    torch.nn.utils.vector_to_parameters(th, model.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pb.x, y), batch_size=16)

    def ce(o, t):
        return nn.functional.cross_entropy(o, t, reduction="none")

    print(f"# {a.model}, K = {a.k}, d = {pb.d}, n = {n} (d/n {pb.d / n:.2f}), wd = {a.wd}; "
          f"uptime: {os.popen('uptime').read().strip()}")
    print(f"mean h_i {float(h.mean()):.3f}, max {float(h.max()):.3f}")
    schemes = ["none", "rtn_int8", "rtn_int4"]
    for form, mine in (("per_direction", "h/K"), ("matrix", "matrix")):
        E.HC2_FORM = form
        est = estimate(model, loader, ce, mode="exact", weight_decay=a.wd, num_records=n)
        sig = torch.cat([est.sigma[k].reshape(-1) for k in est.names])
        rel = float(((sig - own[mine]) / own[mine]).abs().max())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            figs = {}
            for mode in ("exact", "diagonal"):
                rep = ml.assess(model, schemes, loader, ce, strict=False, uncertainty_draws=0,
                                estimation_config=EstimationConfig(mode=mode, weight_decay=a.wd, num_records=n))
                figs[mode] = " / ".join(f"{rep.schemes[k].leakage:.4f}" for k in schemes)
        print(f"HC2_FORM {form}: library sigma against this script's {mine!r} form: max rel {rel:.1e}; sigma "
              f"{float(sig.min()):.4f}-{float(sig.max()):.4f}; assess {' / '.join(schemes)}: exact {figs['exact']}, "
              f"diagonal {figs['diagonal']}")


def gmean_mode(a) -> None:
    """The Gaussian mean of iv58b's map (``z ~ N(mu, I_d)``, ``theta_hat`` the mean, n records): every record's
    ``A_i = I / n`` (isotropic), so the per-direction, top and matrix HC2 forms coincide; the library's
    figure with ``HC2_FORM`` either way (iv58's ``gmean_report``), and the mean ``delta^2`` of the first-order
    and corrected forms against the game's (``|z - mu|^2 / n``: mean ``d / n``) over seeded draws."""
    import sys
    sys.path.insert(0, "benchmarks")
    from iv58_saturated_interval import gmean_report

    import mis_lightning.estimation.estimate  # noqa: F401
    E = sys.modules["mis_lightning.estimation.estimate"]
    n = a.n
    for dim in (3, n // 2, round(0.9 * n)):
        figs = []
        for form in ("per_direction", "matrix"):
            E.HC2_FORM = form
            figs.append(gmean_report(n, dim, 0).schemes["rtn_int8"].leakage)
        g = torch.Generator().manual_seed(dim)
        r_fo, r_loo = [], []
        for _ in range(200):
            z = torch.randn(n, dim, generator=g)
            c = z - z.mean(0)
            q = torch.einsum("id,de,ie->i", c, torch.linalg.pinv(c.T @ c / n), c) / n  # first order
            truth = (z * z).sum(-1) / n  # mu = 0: the game's shift, |z - mu|^2 / n
            r_fo.append(float(q.mean() / truth.mean()))
            r_loo.append(float((q * n / (n - 1)).mean() / truth.mean()))  # c / (1 - 1/n), V n / (n - 1)
        print(f"n = {n}, d = {dim}: library figure per_direction {figs[0]:.6f}, matrix {figs[1]:.6f}; mean delta^2 "
              f"over the game's: first order {statistics.mean(r_fo):.4f}, corrected {statistics.mean(r_loo):.4f} "
              f"(n / (n - 1) = {n / (n - 1):.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["ref", "package", "gmean"])
    ap.add_argument("--model", choices=["mlr", "head", "mlp"], default="mlr")
    ap.add_argument("--ks", default="2,3,4,5")
    ap.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--boot", type=int, default=3000)
    ap.add_argument("--wd", type=float, default=1e-2)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.5)
    a = ap.parse_args()
    {"ref": ref_mode, "package": package_mode, "gmean": gmean_mode}[a.mode](a)


if __name__ == "__main__":
    main()
