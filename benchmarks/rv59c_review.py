"""Review of the 80% interval's correction remainder (docs/benchmarks.md, "iv59" and "rv59c").

    OMP_NUM_THREADS=1 python benchmarks/rv59c_review.py heads
    OMP_NUM_THREADS=1 python benchmarks/rv59c_review.py mlr [--k 3] [--ratios 0.1,0.5] [--n 40] [--wd 0.1]

``heads``: a least-squares regression, a softmax classifier (K = 3 loss directions) and a small CNN through
``assess``, each once with the remainder (``functional.widen_interval`` as shipped) and once with it switched
off (the ends as before iv59): the headline figures must be equal; prints the intervals and the allowance.

``mlr``: hc59's multinomial logistic reference (``benchmarks/hc59_multiclass_hc2.py``: ``Problem``, exact
leave-one-out refits of the "Shift" objective, the true ``Sigma`` from label draws): the reference headline
(mean-shift TV, no spread term) of one dataset against the library's figures and 80% intervals (fp16 cast, whose
quantization is far below the weights' spread, and rtn_int8), with and without the remainder.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import mis_lightning as ml  # noqa: E402
import mis_lightning.functional as F  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402

SHIPPED = F.widen_interval
ALLOWANCE = F.correction_allowance
SEEN: list[float] = []


def _recording(*args):
    a = ALLOWANCE(*args)
    SEEN.append(a)
    return a


F.correction_allowance = _recording


def _both(run):
    """``run()`` with the remainder and without it (``widen_interval`` the identity), alternating."""
    out = {}
    for on in (True, False):
        F.widen_interval = SHIPPED if on else (lambda lo, hi, value, allowance: (lo, hi))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[on] = run()
        finally:
            F.widen_interval = SHIPPED
    return out


def _rows(rep, schemes):
    return {k: (rep.schemes[k].leakage, rep.schemes[k].interval, rep.schemes[k].interval_regime) for k in schemes}


def _print(name, out, schemes, diag=None):
    for k in schemes:
        (l1, i1, g1), (l0, i0, _) = out[True][k], out[False][k]
        fmt = (lambda i: "-" if i is None else f"[{i[0]:.5f}, {i[1]:.5f}]")
        print(f"| {name} | {k} | {l1:.6f} | {l0:.6f} | {'equal' if l1 == l0 else 'DIFFERENT'} | {fmt(i0)} | {fmt(i1)} "
              f"| {g1} |" + ("" if diag is None else f" {diag} |"))


def heads_mode(a) -> None:
    print(f"# uptime: {os.popen('uptime').read().strip()}")
    print("| model | scheme | headline with | without | | interval without | with | regime | mean h |")
    g = torch.Generator().manual_seed(0)
    schemes = ["rtn_int8", "rtn_int4"]

    def go(name, model, ds, loss, steps=200):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = ds.tensors
        for _ in range(steps):
            opt.zero_grad()
            loss(model(x), y).mean().backward()
            opt.step()
        loader = torch.utils.data.DataLoader(ds, batch_size=32)
        cfg = EstimationConfig(mode="exact")

        def run():
            rep = ml.assess(model, schemes, loader, loss, strict=False, estimation_config=cfg)
            return _rows(rep, schemes), rep
        out = _both(run)
        h = out[True][1].diagnostics.get("mean_leverage") if hasattr(out[True][1], "diagnostics") else None
        _print(name, {k: v[0] for k, v in out.items()}, schemes, None if h is None else f"{h:.3f}")

    n = 120
    x = torch.randn(n, 20, generator=g)
    y = x @ torch.randn(20, 1, generator=g) + 0.5 * torch.randn(n, 1, generator=g)
    go("regression d 21, n 120", nn.Linear(20, 1), torch.utils.data.TensorDataset(x, y),
       lambda o, t: ((o - t) ** 2).sum(-1))
    ce = (lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"))
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :4] @ torch.randn(4, 4, generator=g)).argmax(-1)
    go("softmax 4 classes d 28, n 120", nn.Linear(6, 4), torch.utils.data.TensorDataset(x, y), ce)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    go("CNN d 239, n 120", cnn, torch.utils.data.TensorDataset(x, y), ce)


def mlr_mode(a) -> None:
    import hc59_multiclass_hc2 as H

    print(f"# mlr K = {a.k}, n = {a.n}, wd = {a.wd}, {a.boot} label draws; uptime: {os.popen('uptime').read().strip()}")
    print("| d/n | mean h_i | reference | scheme | headline | no spread term | uncorrected | allowance a (a / h_bar) | interval without "
          "| with | covers ref |")
    for ratio in [float(r) for r in a.ratios.split(",")]:
        pb = H.Problem("mlr", a.n, a.k, ratio, a.wd)
        n, y = pb.n, pb.y0
        th = pb.fit(pb.theta0[None], y[None], iters=300)[0]
        g = torch.Generator().manual_seed(1000)
        yb = torch.multinomial(pb.p0.repeat(a.boot, 1, 1).view(-1, pb.C), 1, generator=g).view(a.boot, n)
        tb = pb.fit(pb.theta0.repeat(a.boot, 1), yb)
        tb = tb[torch.isfinite(tb).all(-1)]
        B = tb.shape[0]
        e, U = torch.linalg.eigh(torch.cov(tb.T))
        keep = e > H.RCOND * e.max()
        prec = (U[:, keep] / e[keep]) @ U[:, keep].T * (B - int(keep.sum()) - 2) / (B - 1)
        c, Hs, P, Kr, gbar = H.factors(pb, th, y)
        loo = pb.fit(th.repeat(n, 1), y.repeat(n, 1), torch.ones(n, n) - torch.eye(n), gbar.repeat(n, 1))
        s = th - loo
        ref = H.tv_mean(torch.einsum("id,de,ie->i", s, prec, s))
        model = pb._net()
        torch.nn.utils.vector_to_parameters(th, model.parameters())
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pb.x, y), batch_size=16)
        schemes = ["fp16", "rtn_int8"]
        cfg = EstimationConfig(mode="exact", weight_decay=a.wd, num_records=n)

        def run(model=model, loader=loader, cfg=cfg, schemes=schemes):
            rep = ml.assess(model, schemes, loader, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
                            strict=False, estimation_config=cfg)
            return _rows(rep, schemes), rep
        SEEN.clear()
        out = _both(run)
        allow = dict(zip(schemes, SEEN[:len(schemes)]))
        rep = out[True][1]
        h = rep.diagnostics.get("mean_leverage", float("nan"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unc = ml.assess(model, schemes, loader, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
                            strict=False, estimation_config=EstimationConfig(
                                mode="exact", weight_decay=a.wd, num_records=n, leverage_correction=False))
        spread = F.with_spread
        F.with_spread = (lambda leak, t, h: leak)  # the headline without the spread term: the reference's form
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nospread = run()[0]
        finally:
            F.with_spread = spread
        for k in schemes:
            (l1, i1, _), (l0, i0, _) = out[True][0][k], out[False][0][k]
            fmt = (lambda i: "-" if i is None else f"[{i[0]:.4f}, {i[1]:.4f}]")
            cov = "-" if i1 is None else ("yes" if i1[0] <= ref <= i1[1] else "no")
            print(f"| {pb.d / n:.2f} | {h:.3f} | {ref:.4f} | {k} | {l1:.4f}{'' if l1 == l0 else ' (MOVED)'} | "
                  f"{nospread[k][0]:.4f} | "
                  f"{unc.schemes[k].leakage:.4f} | {allow[k]:.5f} ({allow[k] / min(h, 1.0):.4f}) | {fmt(i0)} | "
                  f"{fmt(i1)} | {cov} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["heads", "mlr"])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--ratios", default="0.1,0.5")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--boot", type=int, default=1500)
    a = ap.parse_args()
    {"heads": heads_mode, "mlr": mlr_mode}[a.mode](a)


if __name__ == "__main__":
    main()
