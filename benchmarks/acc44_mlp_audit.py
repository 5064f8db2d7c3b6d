"""Adversarial accuracy audit (acc44), small MLP classifier: ``Linear(p, h) -> tanh -> Linear(h, K)``
trained to a minimum of ``mean CE + lam / 2 |theta|^2``, against the best attack with the data
distribution known (the protocol of ``benchmarks/acc44_softmax_audit.py``, whose attacks, control
variate and report this reuses; docs/benchmarks.md, "acc44").

Labels come from a teacher of the same architecture (weights ``N(0, w_sd^2)``); every fit is
(damped) Newton in float64 from the penalised population minimum (fitted once on 30,000 records),
so all datasets land in the same basin; a dataset whose fit does not end at a minimum (gradient
above 1e-8 or a non-positive-definite Hessian) is dropped and counted. The release quantizes both
weight matrices per row (``release`` of the softmax audit, per layer; biases float).

    PYTHONPATH=. python benchmarks/acc44_mlp_audit.py --n 300 --hidden 3   # docs/benchmarks.md, "acc44"
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

from benchmarks.acc44_softmax_audit import (  # noqa: E402
    DT,
    attack_advantage,
    cv_mean,
    gaussian_tv_1d,
    release,
    steps,
)
from mis_lightning.assess import assess  # noqa: E402
from mis_lightning.quantization import get_scheme  # noqa: E402


class Arch:
    def __init__(self, p: int, h: int, K: int) -> None:
        self.p, self.h, self.K = p, h, K
        self.shapes = [(h, p + 1), (K, h + 1)]  # [W | b] per layer
        self.d = h * (p + 1) + K * (h + 1)

    def layers(self, th: torch.Tensor) -> list[torch.Tensor]:
        a = self.h * (self.p + 1)
        return [th[..., :a].reshape(*th.shape[:-1], *self.shapes[0]), th[..., a:].reshape(*th.shape[:-1], *self.shapes[1])]

    def logits(self, th: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``th [M, d]``, ``x [M, N, p]`` -> ``[M, N, K]``."""
        L1, L2 = self.layers(th)
        hid = torch.tanh(x @ L1[..., :-1].transpose(-1, -2) + L1[..., -1].unsqueeze(-2))
        return hid @ L2[..., :-1].transpose(-1, -2) + L2[..., -1].unsqueeze(-2)

    def loss_sum(self, th: torch.Tensor, x: torch.Tensor, y: torch.Tensor, pen: float) -> torch.Tensor:
        lp = torch.log_softmax(self.logits(th, x), -1)
        return -lp.gather(-1, y.unsqueeze(-1)).sum((-1, -2)) + 0.5 * pen * (th * th).sum(-1)

    def grad(self, th: torch.Tensor, x: torch.Tensor, y: torch.Tensor, pen: float) -> torch.Tensor:
        t = th.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss_sum(t, x, y, pen).sum(), t)
        return g

    def hess(self, th: torch.Tensor, x: torch.Tensor, y: torch.Tensor, pen: float, chunk: int = 64) -> torch.Tensor:
        def f(t, xx, yy):
            return self.loss_sum(t[None], xx[None], yy[None], pen)[0]
        hf = torch.func.vmap(torch.func.hessian(f))
        return torch.cat([hf(th[i:i + chunk], x[i:i + chunk], y[i:i + chunk]) for i in range(0, len(th), chunk)])

    def module(self, th: torch.Tensor) -> nn.Module:
        m = nn.Sequential(nn.Linear(self.p, self.h), nn.Tanh(), nn.Linear(self.h, self.K))
        L1, L2 = self.layers(th)
        with torch.no_grad():
            for lin, L in ((m[0], L1), (m[2], L2)):
                lin.weight.copy_(L[:, :-1].float())
                lin.bias.copy_(L[:, -1].float())
        return m


def newton(arch: Arch, th: torch.Tensor, x: torch.Tensor, y: torch.Tensor, pen: float, iters: int = 30
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped Newton from ``th [M, d]``; returns ``(th, H, ok [M])`` (``ok``: gradient below
    ``1e-8 max(1, N / 1000)`` for ``N`` records and Hessian positive definite)."""
    tol = 1e-8 * max(1.0, x.shape[1] / 1000)
    eye = torch.eye(arch.d, dtype=DT)
    mu = torch.full((len(th),), 1e-3 * max(pen, 1.0), dtype=DT)
    for _ in range(iters):
        g = arch.grad(th, x, y, pen)
        if float(g.norm(dim=1).max()) < 0.1 * tol:
            break
        H = arch.hess(th, x, y, pen)
        step = torch.linalg.solve(H + mu[:, None, None] * eye, g[..., None])[..., 0]
        new = th - step
        better = arch.loss_sum(new, x, y, pen) <= arch.loss_sum(th, x, y, pen) + 1e-12
        th = torch.where(better[:, None], new, th)
        mu = torch.where(better, mu * 0.1, mu * 10).clamp(1e-12, 1e6)
    H = arch.hess(th, x, y, pen)
    g = arch.grad(th, x, y, pen)
    ok = (g.norm(dim=1) < tol) & (torch.linalg.eigvalsh(H)[:, 0] > 0)
    return th, H, ok


class Pop:
    def __init__(self, arch: Arch, w_sd: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.arch = arch
        self.teacher = torch.randn(1, arch.d, generator=g, dtype=DT) * w_sd

    def draw(self, shape: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(*shape, self.arch.p, generator=g, dtype=DT)
        lg = self.arch.logits(self.teacher, x.reshape(1, -1, self.arch.p))[0]
        y = torch.multinomial(torch.softmax(lg, -1), 1, generator=g).reshape(shape)
        return x, y


def release_mlp(arch: Arch, th: torch.Tensor, scheme: str) -> torch.Tensor:
    return torch.cat([release(L, scheme).reshape(len(th), -1) for L in arch.layers(th)], -1)


def check_release(arch: Arch, th: torch.Tensor, scheme: str) -> float:
    if scheme == "none":
        return 0.0
    m = arch.module(th)
    res = get_scheme(scheme).apply(m)
    lib = [torch.cat([res.grids[f"{i}.weight"].dequantized.to(DT), m[i].bias.detach().to(DT)[:, None]], -1)
           for i in (0, 2)]
    mine = arch.layers(release_mlp(arch, torch.cat([torch.cat([m[i].weight.detach().to(DT), m[i].bias.detach().to(DT)[:, None]], -1).reshape(-1) for i in (0, 2)])[None], scheme))
    return max(float((a - b[0]).abs().max()) for a, b in zip(lib, mine))


class PopulationReference:
    """First-order TV at a record with the population's moments (the softmax audit's control
    variate, for the MLP)."""

    def __init__(self, arch: Arch, th: torch.Tensor, pop: Pop, n: int, lam: float, records: int = 30_000) -> None:
        g = torch.Generator().manual_seed(4243)
        x, y = pop.draw((records,), g)
        self.arch, self.th, self.n = arch, th, n
        H = sum(arch.hess(th, x[None, i:i + 5000], y[None, i:i + 5000], 0.0)[0] for i in range(0, records, 5000))
        H = H / records + lam * torch.eye(arch.d, dtype=DT)
        G = self._grads(x, y)
        self.gbar = G.mean(0)
        V = torch.cov((G - self.gbar).T)
        self.Hi = torch.linalg.inv(H)
        Sig = self.Hi @ V @ self.Hi
        ev, U = torch.linalg.eigh(Sig)
        keep = ev > 1e-9 * ev.max()
        self.whiten = U[:, keep] / ev[keep].sqrt()
        self.mean_first_order = float(self._tv(x, y).mean())

    def _grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def f(t, xx, yy):
            return self.arch.loss_sum(t[None], xx[None, None], yy[None, None], 0.0)[0]
        return torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(self.th[0], x, y)

    def _tv(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        psi = (self._grads(x, y) - self.gbar) @ self.Hi.T
        return torch.erf((psi @ self.whiten).norm(dim=-1) / math.sqrt(self.n) / 2 / math.sqrt(2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=3)
    ap.add_argument("--K", type=int, default=3)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--lam", type=float, default=1e-2)
    ap.add_argument("--w-sd", type=float, default=1.5)
    ap.add_argument("--schemes", nargs="+", default=["none", "int8_weight_only", "float8_weight_only", "rtn_int4",
                                                     "rtn_int2"])
    ap.add_argument("--targets", type=int, default=24)
    ap.add_argument("--M", type=int, default=1000)
    ap.add_argument("--trainings", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    arch = Arch(a.p, a.hidden, a.K)
    pop = Pop(arch, a.w_sd, a.seed)
    t0 = time.time()
    g = torch.Generator().manual_seed(10_000 + a.seed)
    xp, yp = pop.draw((1, 30_000), g)
    th_pop, _, ok = newton(arch, pop.teacher.clone(), xp, yp, 30_000 * a.lam, iters=60)
    assert bool(ok.all()), "population fit"
    for s in a.schemes:
        err = check_release(arch, th_pop[0] + 0.01 * torch.randn(arch.d, dtype=DT), s)
        assert err < 1e-6, (s, err)
    ref = PopulationReference(arch, th_pop, pop, a.n, a.lam)
    pen = a.n * a.lam
    x, y = pop.draw((a.M, a.n - 1), g)
    th_b, Hb, ok = newton(arch, th_pop.expand(a.M, -1).clone(), x, y, pen)
    x, y, th_b, Hb = x[ok], y[ok], th_b[ok], Hb[ok]
    M = len(th_b) // 2 * 2
    x, y, th_b, Hb = x[:M], y[:M], th_b[:M], Hb[:M]
    dropped = a.M - int(ok.sum())
    per: dict[str, list[float]] = {s: [] for s in a.schemes}
    gauss, cvs, nonconv = [], [], 0
    for _ in range(a.targets):
        zx, zy = pop.draw((1,), g)
        fx, fy = pop.draw((M,), g)
        arms = []
        for ax, ay in ((zx.expand(M, -1), zy.expand(M)), (fx, fy)):
            xx, yy = torch.cat([x, ax[:, None]], 1), torch.cat([y, ay[:, None]], 1)
            L = torch.linalg.cholesky(Hb)  # the record's own Hessian can be indefinite: not added
            th = th_b.clone()
            for _ in range(12):
                gr = arch.grad(th, xx, yy, pen)
                if float(gr.norm(dim=1).max()) < 1e-9:
                    break
                th = th - torch.cholesky_solve(gr[..., None], L)[..., 0]
            bad = arch.grad(th, xx, yy, pen).norm(dim=1) > 1e-8
            if bool(bad.any()):
                nonconv += int(bad.sum())
                th[bad], _, _ = newton(arch, th[bad], xx[bad], yy[bad], pen)
            arms.append(th)
        th_in, th_out = arms
        C = np.cov(th_out.numpy().T)
        sh = (th_in - th_out).numpy().mean(0)
        ev, U = np.linalg.eigh(C)
        basis = U[:, ev > 1e-9 * ev.max()]
        cvs.append(float(ref._tv(zx, zy).mean()))
        wdir = np.linalg.lstsq(C, sh, rcond=1e-9)[0]
        tin, tout = th_in.numpy() @ wdir, th_out.numpy() @ wdir
        gauss.append(gaussian_tv_1d(tin.mean(), tin.var(), tout.mean(), tout.var()))
        for s in a.schemes:
            ri, ro = release_mlp(arch, th_in, s).numpy(), release_mlp(arch, th_out, s).numpy()
            per[s].append(max(attack_advantage(ri, ro, basis=basis)))
    sd_w = torch.from_numpy(np.sqrt(np.diag(C)))
    c = np.array(cvs)
    adv = {s: cv_mean(np.array(v), c, ref.mean_first_order) for s, v in per.items()}
    gref = cv_mean(np.array(gauss), c, ref.mean_first_order)
    t1 = time.time()

    def ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, t, reduction="none")

    rows, wset = [], set()
    vals = {s: [] for s in a.schemes}
    ivs = {s: [] for s in a.schemes}
    for k in range(a.trainings):
        gk = torch.Generator().manual_seed(20_000 + k)
        xk, yk = pop.draw((1, a.n), gk)
        th, _, okk = newton(arch, th_pop.clone(), xk, yk, pen)
        if not bool(okk.all()):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = assess(arch.module(th[0]), a.schemes, DataLoader(TensorDataset(xk[0].float(), yk[0]), batch_size=a.n),
                         ce, estimation="exact", num_records=a.n, weight_decay=a.lam, uncertainty_draws=32, seed=k)
        for s in a.schemes:
            vals[s].append(rep.schemes[s].leakage)
            ivs[s].append(rep.schemes[s].interval)
        wset |= {w[:150] for w in rep.warnings}
    t2 = time.time()
    print(f"MLP {a.p}-{a.hidden}-{a.K} d={arch.d} n={a.n} n/d={a.n / arch.d:.0f} lam={a.lam} M={M} (dropped {dropped}, "
          f"{nonconv} arm fits by full Newton) attack {t1 - t0:.0f}s indicator {t2 - t1:.0f}s")
    print(f"E c = {ref.mean_first_order:.4f}; Gaussian TV along the discriminant (cv) {gref[0]:.4f} ({gref[1]:.4f})")
    print("| scheme | step / sd | attack adv, cv (s.e.) | headline mean (sd) | / attack | / Gaussian ref | below attack | p90 >= attack |")
    for s in a.schemes:
        v = np.array(vals[s])
        st = float((steps(th_pop[0][:arch.h * (a.p + 1)].reshape(arch.h, -1), s)
                    / sd_w[:arch.h * (a.p + 1)].reshape(arch.h, -1)[:, :-1]).median()) if s != "none" else 0.0
        hi = sum(1 for i in ivs[s] if i is not None and i[1] >= adv[s][0])
        print(f"| {s} | {st:.2g} | {adv[s][0]:.4f} ({adv[s][1]:.4f}) | {v.mean():.4f} ({v.std(ddof=1):.4f}) | "
              f"{v.mean() / adv[s][0]:.3f} | {v.mean() / gref[0]:.3f} | {(v < adv[s][0]).sum()}/{len(v)} | {hi}/{len(v)} |")
        rows.append({"scheme": s, "adv_cv": adv[s], "values": v.tolist(),
                     "intervals": [list(i) if i is not None else None for i in ivs[s]]})
    print("warnings:", *sorted(wset), sep="\n  ")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "gauss_cv": gref, "Ec": ref.mean_first_order,
                                            "warnings": sorted(wset), "dropped": dropped}, indent=1))


if __name__ == "__main__":
    main()
