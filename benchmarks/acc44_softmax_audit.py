"""Adversarial accuracy audit (acc44): the headline on softmax regression with weight decay, class
imbalance and n/d from 5 to 200, against the best attack with the data distribution known.

Setting: ``nn.Linear(p, K)`` (weight and bias, ``d = K (p + 1)``) trained to the minimum of
``mean CE + lam / 2 |theta|^2`` (Newton, float64); inputs ``x ~ N(0, I_p)``; labels from a softmax
teacher ``W*`` (entries ``N(0, w_sd^2)``) with class priors set by the teacher's bias ``b* = log(prior)``
(``--prior``: imbalance). The releases are real schemes of the library (weights quantized, bias
float), replicated here in closed form for the Monte Carlo (checked bitwise against the scheme on
one model at start: ``check_release``).

**Truth side (an attack, so a lower bound of the truth).** Per target record ``z ~ P`` (``--targets``):
``M`` datasets of ``n - 1`` other records, each fitted once (the base), then with ``z`` added (in)
and with a fresh record added (out: the marginal law of the release), by Newton from the base with
the base's Hessian (gradient norm at the end below 1e-9 of the record's score). The attacker knows
the data distribution and the training procedure and sees the release (codes, scales, float bias):
on one half of the ``M`` pairs it fits a Gaussian likelihood-ratio test on the dequantized release
vector (in-out mean shift from the coupled pairs, pooled covariance; linear discriminant), picks its
threshold, and its advantage ``P_in(S) - P_out(S)`` is counted on the other half (two folds,
averaged): an unbiased estimate of a lower bound of ``TV(law(T | z in), law(T))``. Coarse releases
also get a code-counting test (``logistic.tv_bracket``'s split-sample lower bound on the weights'
codes alone, cross-fitted); the better of the two on the fitting fold is evaluated. The mean over
targets, with its standard error, is the attack's advantage ``adv`` (the quantity the headline
``leakage`` bounds: method.md section 1).

**Indicator.** ``--trainings`` datasets of ``n`` records, each fitted the same way and assessed by
``assess`` as shipped (``estimation="exact"``, ``weight_decay=lam`` unless ``--no-wd-told``), all
records kept; mean headline, its spread, the share of its 80% intervals holding ``adv`` from below
(``p90 >= adv``: the interval cannot be said to cover a truth it lies below) and warnings.

    PYTHONPATH=. python benchmarks/acc44_softmax_audit.py --p 4 --K 3 --n 75 --lam 1e-2   # docs/benchmarks.md, "acc44"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mis_lightning.assess import assess  # noqa: E402
from mis_lightning.quantization import get_scheme  # noqa: E402

DT = torch.float64


# ----------------------------------------------------------------------------- data and fits
class Pop:
    def __init__(self, p: int, K: int, prior: list[float] | None, w_sd: float, seed: int, row_scale: float = 1.0
                 ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.p, self.K = p, K
        self.W = torch.randn(K, p, generator=g, dtype=DT) * w_sd
        self.W[0] *= row_scale  # one class's weights larger: a per-tensor scale is coarse for the others
        pr = torch.tensor(prior if prior else [1.0 / K] * K, dtype=DT)
        self.b = torch.log(pr / pr.sum())

    def draw(self, shape: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(*shape, self.p, generator=g, dtype=DT)
        logits = x @ self.W.T + self.b
        y = torch.multinomial(torch.softmax(logits.reshape(-1, self.K), -1), 1, generator=g).reshape(shape)
        return x, y


def _aug(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


def grad_sum(th: torch.Tensor, xa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over records of the CE gradient, ``th [M, K, p+1]``, ``xa [M, N, p+1]``, ``y [M, N]``."""
    pr = torch.softmax(xa @ th.transpose(1, 2), -1)
    pr.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(y, dtype=DT).unsqueeze(-1))
    return pr.transpose(1, 2) @ xa


def hess_sum(th: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """Sum over records of the CE Hessian ``[M, D, D]`` (``D = K (p+1)``, row-major ``(k, a)``)."""
    M, N, a = xa.shape
    K = th.shape[1]
    pr = torch.softmax(xa @ th.transpose(1, 2), -1)  # [M, N, K]
    A = (pr.unsqueeze(-1) * xa.unsqueeze(-2)).reshape(M, N, K * a)  # P_k x_a
    H = -A.transpose(1, 2) @ A
    diag = torch.einsum("mnk,mna,mnb->mkab", pr, xa, xa)
    for k in range(K):
        H[:, k * a:(k + 1) * a, k * a:(k + 1) * a] += diag[:, k]
    return H


def fit_base(xa: torch.Tensor, y: torch.Tensor, pen: float, th0: torch.Tensor, iters: int = 12
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton on ``sum CE + pen / 2 |th|^2``; returns ``th`` and the objective's Hessian there."""
    M = xa.shape[0]
    th = th0.expand(M, *th0.shape[-2:]).clone()
    D = th[0].numel()
    eye = torch.eye(D, dtype=DT)
    for _ in range(iters):
        g = (grad_sum(th, xa, y) + pen * th).reshape(M, D)
        H = hess_sum(th, xa) + pen * eye
        th = th - torch.linalg.solve(H, g).reshape(th.shape)
    H = hess_sum(th, xa) + pen * eye
    g = (grad_sum(th, xa, y) + pen * th).reshape(M, D)
    assert float(g.norm(dim=1).max()) < 1e-8 * max(1.0, xa.shape[1]), float(g.norm(dim=1).max())
    return th, H


def add_record(th_b: torch.Tensor, Hb: torch.Tensor, xa: torch.Tensor, y: torch.Tensor, pen: float,
               za: torch.Tensor, zy: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """The minimiser with one record ``(za [M, p+1], zy [M])`` added to each base dataset: from
    the base, steps with the base Hessian plus the record's own (contraction ``O(1/n)``), then full
    Newton steps where the gradient is still above 1e-9 (near-separable datasets at small ``n``)."""
    M = th_b.shape[0]
    D = th_b[0].numel()
    eye = torch.eye(D, dtype=DT)
    L = torch.linalg.cholesky(Hb + hess_sum(th_b, za.unsqueeze(1)))

    def grad(t: torch.Tensor, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return (grad_sum(t, xa[idx], y[idx]) + grad_sum(t, za[idx].unsqueeze(1), zy[idx].unsqueeze(1))
                + pen * t)

    th = th_b.clone()
    for _ in range(iters):
        g = grad(th)
        if float(g.norm(dim=(1, 2)).max()) < 1e-9:
            break
        th = th - torch.cholesky_solve(g.reshape(M, D, 1), L).reshape(th.shape)
    g = grad(th)
    bad = torch.nonzero(g.norm(dim=(1, 2)) > 1e-9).flatten()
    for _ in range(20):
        if not len(bad):
            break
        t = th[bad]
        H = hess_sum(t, xa[bad]) + hess_sum(t, za[bad].unsqueeze(1)) + pen * eye
        th[bad] = t - torch.linalg.solve(H, grad(t, bad).reshape(-1, D)).reshape(t.shape)
        bad = bad[grad(th[bad], bad).norm(dim=(1, 2)) > 1e-9]
    assert not len(bad), "Newton did not converge"
    return th


# ----------------------------------------------------------------------------- releases
def _e4m3(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32).to(torch.float8_e4m3fn).to(DT)


def release(th: torch.Tensor, scheme: str) -> torch.Tensor:
    """The dequantized release ``[M, K, p+1]`` of ``th`` under ``scheme`` (weights quantized, bias
    float), the scheme's own rule in closed form (``check_release`` compares with the library)."""
    W, b = th[..., :-1], th[..., -1:]
    if scheme == "none":
        return th.clone()
    if scheme.startswith("rtn_int"):
        qmax = 2 ** (int(scheme[7:]) - 1) - 1
        s = (W.abs().amax(-1, keepdim=True) / qmax)
        q = torch.round(W / s).clamp(-qmax - 1, qmax)
        return torch.cat([q * s, b], -1)
    if scheme == "int8_weight_only_per_tensor" or scheme == "int8_weight_only":
        amax = W.abs().amax(dim=(-1, -2) if scheme.endswith("tensor") else -1, keepdim=True).to(torch.float32)
        s = (amax / 127.5).clamp_min(torch.finfo(torch.float32).eps)
        q = torch.round(W.to(torch.float32) * (1.0 / s)).clamp(-128, 127)  # torchao multiplies by 1 / scale
        return torch.cat([(q * s).to(DT), b], -1)
    if scheme == "float8_weight_only":
        amax = W.abs().amax(-1, keepdim=True).to(torch.float32)
        s = (amax / 448.0).clamp_min(1e-12)
        return torch.cat([(_e4m3(W.to(torch.float32) / s) * s.to(DT)).to(torch.float32).to(DT), b], -1)
    raise KeyError(scheme)


def steps(th: torch.Tensor, scheme: str) -> torch.Tensor:
    """The grid's local step at each weight of ``th [K, p+1]`` (``[K, p]``; float8: the spacing of
    e4m3 values at the weight)."""
    W = th[:, :-1]
    amax_row = W.abs().amax(-1, keepdim=True)
    if scheme.startswith("rtn_int"):
        return (amax_row / (2 ** (int(scheme[7:]) - 1) - 1)).expand_as(W)
    if scheme == "int8_weight_only":
        return (amax_row / 127.5).expand_as(W)
    if scheme == "int8_weight_only_per_tensor":
        return (W.abs().amax() / 127.5).expand_as(W)
    if scheme == "float8_weight_only":
        sc = amax_row / 448.0
        e = torch.floor(torch.log2((W / sc).abs().clamp_min(2.0 ** -6)))
        return 2.0 ** (e - 3) * sc
    return torch.zeros_like(W)


def codes(rel: torch.Tensor, scheme: str | None = None) -> np.ndarray:
    """Hashable keys of the weights' release: ``[M]`` int64 of the dequantized weights (exact
    floats), or with an ``rtn_int*`` ``scheme`` of their integer codes alone (the row scales are
    continuous: every key would differ)."""
    W = rel[..., :-1]
    if scheme is not None:
        W = rtn_codes(rel, scheme)[0]
    W = W.reshape(rel.shape[0], -1).numpy()
    return np.array([hash(r.tobytes()) for r in W], dtype=np.int64)


def rtn_codes(rel: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes ``q [M, K, p]`` and row scales ``[M, K, 1]`` read back from an ``rtn_int*``
    release (the row's largest weight has code +-qmax exactly)."""
    qmax = 2 ** (int(scheme[7:]) - 1) - 1
    W = rel[..., :-1]
    sc = W.abs().amax(-1, keepdim=True) / qmax
    return torch.round(W / sc), sc


class Softmax(nn.Module):
    def __init__(self, th: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(th.shape[1] - 1, th.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(th[:, :-1].float())
            self.fc.bias.copy_(th[:, -1].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def check_release(th: torch.Tensor, scheme: str) -> float:
    """Largest difference between ``release`` and the library's scheme on one model (float32 weights)."""
    if scheme == "none":
        return 0.0
    m = Softmax(th)
    res = get_scheme(scheme).apply(m)
    lib = torch.cat([res.grids["fc.weight"].dequantized.to(DT), m.fc.bias.detach().to(DT)[:, None]], -1)
    mine = release(torch.cat([m.fc.weight.detach().to(DT), m.fc.bias.detach().to(DT)[:, None]], -1)[None], scheme)[0]
    return float((lib - mine).abs().max())


# ----------------------------------------------------------------------------- attacks
def _lda_fit(ri: np.ndarray, ro: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Linear discriminant of the in / out releases (rows already in the attacker's basis)."""
    shift = (ri - ro).mean(0)
    mo = ro.mean(0)
    C = 0.5 * (np.cov(ri.T) + np.cov(ro.T))
    C = C + 1e-12 * np.trace(C) / len(C) * np.eye(len(C))
    w = np.linalg.lstsq(C, shift, rcond=1e-9)[0]
    return w, mo, _best_threshold(ri @ w, ro @ w)[0]


def _count_fit(ki: np.ndarray, ko: np.ndarray) -> set:
    u, inv = np.unique(np.concatenate([ki, ko]), return_inverse=True)
    ci = np.bincount(inv[:len(ki)], minlength=len(u))
    co = np.bincount(inv[len(ki):], minlength=len(u))
    return set(u[ci > co].tolist())


def _qda_1d(ti: np.ndarray, to: np.ndarray):
    """The Gaussian log-likelihood ratio of the discriminant ``t`` with the arms' own means and
    variances (the member's release is narrower along its shift: method.md section 4, the spread
    term), as a function."""
    mi, vi, mo, vo = ti.mean(), ti.var(), to.mean(), to.var()
    return lambda t: -0.5 * ((t - mi) ** 2 / vi + math.log(vi)) + 0.5 * ((t - mo) ** 2 / vo + math.log(vo))


def _best_threshold(si: np.ndarray, so: np.ndarray) -> tuple[float, float]:
    grid = np.quantile(np.concatenate([si, so]), np.linspace(0.005, 0.995, 199))
    adv = (si[None] > grid[:, None]).mean(1) - (so[None] > grid[:, None]).mean(1)
    k = int(np.argmax(adv))
    return float(grid[k]), float(adv[k])


def attack_advantage(ri: np.ndarray, ro: np.ndarray, ki: np.ndarray | None = None, ko: np.ndarray | None = None,
                     basis: np.ndarray | None = None) -> tuple[float, float]:
    """Cross-fitted (2 folds) advantages ``(LDA, LDA + the arms' variances)`` of the Gaussian
    likelihood-ratio tests on the release vector, or with keys ``ki, ko [M]`` of the code-counting
    test (both entries); ``ri, ro [M, D]`` coupled pairs. Each is unbiased for the advantage of a
    test fitted on ``M / 2`` pairs: a lower bound of the TV in expectation."""
    M = ri.shape[0]
    half = M // 2
    if basis is not None:
        ri, ro = ri @ basis, ro @ basis
    lin, quad = [], []
    for a, b in ((slice(0, half), slice(half, 2 * half)), (slice(half, 2 * half), slice(0, half))):
        if ki is not None:
            S = list(_count_fit(ki[a], ko[a]))
            lin.append(float(np.isin(ki[b], S).mean() - np.isin(ko[b], S).mean()))
            continue
        w, mo, c = _lda_fit(ri[a], ro[a])
        lin.append(float(((ri[b] @ w) > c).mean() - ((ro[b] @ w) > c).mean()))
        llr = _qda_1d(ri[a] @ w, ro[a] @ w)
        cq, _ = _best_threshold(llr(ri[a] @ w), llr(ro[a] @ w))
        quad.append(float((llr(ri[b] @ w) > cq).mean() - (llr(ro[b] @ w) > cq).mean()))
    return float(np.mean(lin)), float(np.mean(quad or lin))


def gaussian_tv_1d(mi: float, vi: float, mo: float, vo: float, nodes: int = 4001) -> float:
    """``TV(N(mi, vi), N(mo, vo))`` by quadrature."""
    sd = math.sqrt(max(vi, vo))
    t = np.linspace(min(mi, mo) - 10 * sd, max(mi, mo) + 10 * sd, nodes)
    f = np.exp(-0.5 * (t - mi) ** 2 / vi) / math.sqrt(2 * math.pi * vi)
    g = np.exp(-0.5 * (t - mo) ** 2 / vo) / math.sqrt(2 * math.pi * vo)
    return float(0.5 * np.abs(f - g).sum() * (t[1] - t[0]))


def attack_truth(pop: Pop, n: int, lam: float, schemes: list[str], Z: int, M: int, seed: int,
                 count_schemes: set[str], code_attacks: bool = False, stratify: bool = False
                 ) -> dict[str, tuple[float, float]]:
    g = torch.Generator().manual_seed(10_000 + seed)
    x, y = pop.draw((M, n - 1), g)
    xa = _aug(x)
    th0 = torch.cat([pop.W, pop.b[:, None]], -1)
    pen = n * lam
    th_b, Hb = fit_base(xa, y, pen, th0)
    per = {s: [] for s in schemes}
    gauss, cvs = [], []
    ref = population_reference(pop, n, lam)
    labels = []
    for t in range(Z):
        zx, zy = pop.draw((1,), g)
        if stratify:  # Z / K targets of each class (a rare class's records would be missed otherwise)
            while int(zy) != t % pop.K:
                zx, zy = pop.draw((1,), g)
        labels.append(int(zy))
        fx, fy = pop.draw((M,), g)
        th_in = add_record(th_b, Hb, xa, y, pen, _aug(zx).expand(M, -1), zy.expand(M))
        th_out = add_record(th_b, Hb, xa, y, pen, _aug(fx), fy)
        dlt = (th_in - th_out).reshape(M, -1).numpy()
        C = np.cov(th_out.reshape(M, -1).numpy().T)
        sh = dlt.mean(0)
        # the attacker's basis: the range of the unquantized release's covariance (the L2 minimiser
        # has sum_k theta_k = 0 exactly; along that direction a quantized release carries only
        # rounding noise, which an unprojected discriminant would weight as signal)
        ev, U = np.linalg.eigh(C)
        basis = U[:, ev > 1e-9 * ev.max()]
        sd_w = torch.from_numpy(np.sqrt(np.diag(C))).reshape(th_b.shape[1:])[:, :-1]
        cvs.append(ref.first_order(zx, zy))
        # the Gaussian TV along the discriminant with the arms' own moments (all M pairs; not a bound)
        wdir = np.linalg.lstsq(C, sh, rcond=1e-9)[0]
        tin, tout = th_in.reshape(M, -1).numpy() @ wdir, th_out.reshape(M, -1).numpy() @ wdir
        gauss.append(gaussian_tv_1d(tin.mean(), tin.var(), tout.mean(), tout.var()))
        for s in schemes:
            ri, ro = release(th_in, s), release(th_out, s)
            lin, quad = attack_advantage(ri.reshape(M, -1).numpy(), ro.reshape(M, -1).numpy(), basis=basis)
            per[s].append(quad)
            per.setdefault(s + ":lda", []).append(lin)
            if s in count_schemes:
                cs = s if code_attacks else None
                per.setdefault(s + ":count", []).append(
                    attack_advantage(ri.reshape(M, -1).numpy(), ro.reshape(M, -1).numpy(), codes(ri, cs), codes(ro, cs))[0])
            if code_attacks and s.startswith("rtn_int"):
                # the discriminant on the release with its codes and row scales beside it
                fi = [ri.reshape(M, -1).numpy() @ basis, *(t.reshape(M, -1).numpy() for t in rtn_codes(ri, s))]
                fo = [ro.reshape(M, -1).numpy() @ basis, *(t.reshape(M, -1).numpy() for t in rtn_codes(ro, s))]
                lin, quad = attack_advantage(np.concatenate(fi, 1), np.concatenate(fo, 1))
                per.setdefault(s + ":codes_lda", []).append(lin)
                per.setdefault(s + ":codes_quad", []).append(quad)
    per["gauss"] = gauss
    per["cv"] = cvs
    for s in schemes:  # the better attack's mean (max of unbiased means: biased up by < 1 s.e.)
        for alt in (":lda", ":count", ":codes_lda", ":codes_quad"):
            if s + alt in per and np.mean(per[s + alt]) > np.mean(per[s]):
                per[s + ":quad"], per[s] = per[s], list(per[s + alt])
    out = {s: (float(np.mean(v)), float(np.std(v, ddof=1) / math.sqrt(len(v)))) for s, v in per.items()}
    out["per_target"] = {s: list(map(float, v)) for s, v in per.items()}
    c = np.array(cvs)
    out["Ec"] = ref.mean_first_order
    out["step_sd"] = {s: float((steps(th_b.mean(0), s) / sd_w).median()) for s in schemes}
    lab = np.array(labels)
    for s in [*schemes, "gauss", *[k for k in per if ":" in k]]:
        if stratify:  # per class, with the class's own mean of c, weighted by the class frequencies
            parts = [cv_mean(np.array(per[s])[lab == k], c[lab == k], ref.class_mean[k]) for k in range(pop.K)]
            out[s + ":cv"] = (float(sum(ref.class_freq[k] * m for k, (m, _) in enumerate(parts))),
                              float(math.sqrt(sum((ref.class_freq[k] * e) ** 2 for k, (_, e) in enumerate(parts)))))
        else:
            out[s + ":cv"] = cv_mean(np.array(per[s]), c, ref.mean_first_order)
    return out


def cv_mean(v: np.ndarray, c: np.ndarray, c_mean: float) -> tuple[float, float]:
    """Control-variate mean of ``v`` over targets with ``c`` (known mean ``c_mean``): ``(mean, s.e.)``."""
    cc = c - c.mean()
    beta = float((cc * (v - v.mean())).sum() / max((cc * cc).sum(), 1e-300))
    r = v - beta * (c - c_mean)
    return float(r.mean()), float(r.std(ddof=2) / math.sqrt(len(r)))


class PopulationReference:
    """The first-order TV of the unquantized release at a record with the population's moments
    (``theta_lam`` = the penalised population minimiser; ``psi = -H^{-1}(g - E g)``, ``Sigma =
    H^{-1} V H^{-1}``): ``2 Phi(|Sigma^{-1/2} psi| / (2 sqrt n)) - 1``, the control variate."""

    def __init__(self, pop: Pop, n: int, lam: float, records: int = 200_000, seed: int = 4242) -> None:
        g = torch.Generator().manual_seed(seed)
        x, y = pop.draw((1, records), g)
        xa = _aug(x)
        th0 = torch.cat([pop.W, pop.b[:, None]], -1)[None]
        th, H = fit_base(xa, y, records * lam, th0)
        self.th, self.n = th, n
        H = H[0] / records
        G = self._grads(x[0], y[0])
        self.gbar = G.mean(0)
        V = torch.cov((G - self.gbar).T)
        Hi = torch.linalg.inv(H)
        Sig = Hi @ V @ Hi
        ev, U = torch.linalg.eigh(Sig)
        keep = ev > 1e-9 * ev.max()
        self.whiten = U[:, keep] / ev[keep].sqrt()  # Sigma^{-1/2} on its range
        self.Hi = Hi
        tv = self._tv(x[0, :50_000], y[0, :50_000])
        yy = y[0, :50_000]
        self.mean_first_order = float(tv.mean())
        self.class_freq = [float((yy == k).double().mean()) for k in range(pop.K)]
        self.class_mean = [float(tv[yy == k].mean()) for k in range(pop.K)]

    def _grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pr = torch.softmax(_aug(x) @ self.th[0].T, -1)
        pr[torch.arange(len(y)), y] -= 1
        return (pr.unsqueeze(-1) * _aug(x).unsqueeze(-2)).reshape(len(y), -1)

    def _tv(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        psi = (self._grads(x, y) - self.gbar) @ self.Hi.T
        dist = (psi @ self.whiten).norm(dim=-1) / math.sqrt(self.n)
        return torch.erf(dist / 2 / math.sqrt(2))

    def first_order(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(self._tv(x.reshape(-1, x.shape[-1]), y.reshape(-1)).mean())


def population_reference(pop: Pop, n: int, lam: float) -> PopulationReference:
    return PopulationReference(pop, n, lam)


def _Phi(t: float) -> float:
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


# ----------------------------------------------------------------------------- indicator
def ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, t, reduction="none")


def indicator(pop: Pop, n: int, lam: float, schemes: list[str], seed: int, wd_told: bool, draws: int
              ) -> dict:
    g = torch.Generator().manual_seed(20_000 + seed)
    x, y = pop.draw((1, n), g)
    th0 = torch.cat([pop.W, pop.b[:, None]], -1)
    th, _ = fit_base(_aug(x), y, n * lam, th0)
    model = Softmax(th[0])
    loader = DataLoader(TensorDataset(x[0].float(), y[0]), batch_size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = assess(model, schemes, loader, ce, estimation="exact", num_records=n,
                     weight_decay=lam if wd_told else 0.0, uncertainty_draws=draws, seed=seed)
    res = {s: (rep.schemes[s].leakage, rep.schemes[s].interval) for s in schemes}
    return {"res": res, "warnings": list(rep.warnings), "baseline": rep.baseline_leakage}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--K", type=int, default=3)
    ap.add_argument("--n", type=int, default=75)
    ap.add_argument("--lam", type=float, default=1e-2)
    ap.add_argument("--prior", type=float, nargs="*", default=None)
    ap.add_argument("--w-sd", type=float, default=1.0)
    ap.add_argument("--row-scale", type=float, default=1.0, help="factor on the teacher's first row")
    ap.add_argument("--schemes", nargs="+", default=["none", "int8_weight_only", "int8_weight_only_per_tensor",
                                                     "float8_weight_only", "rtn_int4", "rtn_int2"])
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--M", type=int, default=2000)
    ap.add_argument("--trainings", type=int, default=8)
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--no-wd-told", action="store_true")
    ap.add_argument("--stratify", action="store_true",
                    help="targets drawn class by class, combined with the class frequencies (rare classes)")
    ap.add_argument("--code-attacks", action="store_true",
                    help="rtn_int*: count the integer codes alone, and a discriminant with codes and scales")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    pop = Pop(a.p, a.K, a.prior, a.w_sd, a.seed, a.row_scale)
    d = a.K * (a.p + 1)
    t0 = time.time()
    th0 = torch.cat([pop.W, pop.b[:, None]], -1)
    for s in a.schemes:
        err = check_release(th0 + 0.01 * torch.randn(th0.shape, dtype=DT), s)
        assert err < 1e-6, (s, err)
    count = {s for s in a.schemes if s in ("rtn_int2", "rtn_int3", "rtn_int4")}
    adv = attack_truth(pop, a.n, a.lam, a.schemes, a.targets, a.M, a.seed, count, a.code_attacks, a.stratify)
    t1 = time.time()
    inds = [indicator(pop, a.n, a.lam, a.schemes, k, not a.no_wd_told, a.draws) for k in range(a.trainings)]
    t2 = time.time()
    rows = []
    print(f"p={a.p} K={a.K} d={d} n={a.n} n/d={a.n / d:.0f} lam={a.lam} prior={a.prior} "
          f"attack {t1 - t0:.0f}s indicator {t2 - t1:.0f}s")
    print(f"control variate: E c = {adv['Ec']:.4f}; targets' mean c = {np.mean(adv['per_target']['cv']):.4f}")
    print("| scheme | attack adv (s.e.) | attack adv, control variate (s.e.) | headline mean (sd) | ratio (cv) |"
          " below adv | p90 >= adv | step / sd (median) |")
    for s in a.schemes:
        v = np.array([r["res"][s][0] for r in inds])
        iv = [r["res"][s][1] for r in inds]
        hi_ok = sum(1 for i in iv if i is not None and i[1] >= adv[s + ":cv"][0])
        below = int((v < adv[s + ":cv"][0]).sum())
        rows.append({"scheme": s, "adv": adv[s], "adv_cv": adv[s + ":cv"], "mean": float(v.mean()), "sd": float(v.std(ddof=1)),
                     "values": v.tolist(), "intervals": [list(i) if i is not None else None for i in iv]})
        cvm = adv[s + ":cv"]
        print(f"| {s} | {adv[s][0]:.4f} ({adv[s][1]:.4f}) | {cvm[0]:.4f} ({cvm[1]:.4f}) | {v.mean():.4f} "
              f"({v.std(ddof=1):.4f}) | {v.mean() / max(cvm[0], 1e-12):.3f} | {below}/{len(v)} | {hi_ok}/{len(v)} | {adv['step_sd'][s]:.2g} |")
    print(f"Gaussian TV along the discriminant, the arms' own moments (all M pairs; not a bound): "
          f"{adv['gauss'][0]:.4f} ({adv['gauss'][1]:.4f}), control variate {adv['gauss:cv'][0]:.4f} "
          f"({adv['gauss:cv'][1]:.4f})")
    wset = sorted({w[:160] for r in inds for w in r["warnings"]})
    print("warnings:", *wset, sep="\n  ")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "gauss": adv["gauss"], "gauss_cv": adv["gauss:cv"], "cv": {k: v for k, v in adv.items() if k.endswith(":cv")}, "Ec": adv["Ec"], "step_sd": adv["step_sd"], "per_target": adv["per_target"], "warnings": wset}, indent=1))


if __name__ == "__main__":
    main()
