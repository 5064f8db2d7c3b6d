"""nf51: can the diagonal estimator tell records the model was not trained on from its training records?
(docs/benchmarks.md "nf51"; the exact estimator's test is ``estimate._stiff_offset``, nf50b.)

For each fit it prints, on the training records ("own") and on held-out records ("held"), the diagonal
estimator's per-weight t-statistics of the penalised mean gradient, ``t_j = g_j sqrt(n / V_jj)`` (the terms of
``minimum_offset_sd``, over the weights with ``V_jj`` above ``V_RELATIVE_FLOOR`` of the largest): their root mean
square over all weights (``all`` = ``minimum_offset_sd``), over the stiffer half by the Hessian diagonal ``H_jj``
(penalty included; ``top50``, the diagonal analogue of ``stiff_offset_sd``) and over each tenth of the weights by
``H_jj`` (``dec``, stiffest first). ``small`` also runs the exact estimator: ``stiff_offset_sd`` and the same tenths
along H's eigenvectors (``edec``, largest |eigenvalue| first). The numbers are the estimator's own (its functions
wrapped, not re-derived). ``examples``: the Lightning examples' models (their own training; the diagonal
estimator forced where ``auto`` picks the exact one), members only. ``hydra``: the default Hydra job with
``mis.estimation.mode=diagonal`` (L-BFGS, and ``model.optimizer=adam data.batch_size=64``).

``exact_members``: two member fits of ``small`` through ``assess`` (the exact estimator), with its warnings.
``leverage_slope``: a second-order lead in closed form (its docstring).
Usage: python benchmarks/unseen_records_diagonal.py mlp | mlp2 | small | cnn | examples | hydra | exact_members |
leverage_slope"""
import importlib
import math
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.estimation import estimate

E = importlib.import_module("mis_lightning.estimation.estimate")  # the module (the package exports the function)
CAP: dict = {}
_stationarity, _diagonal_compute, _stiff_offset = E._stationarity, E.diagonal_compute, E._stiff_offset
WD = 1e-3


def stationarity_spy(g_mean, v, theta, names, offsets, decay, *a, **k):
    # the penalised mean gradient and V_jj exactly as _stationarity's offset terms read them
    CAP["g"] = torch.cat([g_mean[slice(*offsets[n])] + decay[n] * theta[n] for n in names]).clone()
    CAP["v"] = v.clone()
    return _stationarity(g_mean, v, theta, names, offsets, decay, *a, **k)


def diagonal_spy(h, v, g, G, n, *a, **k):
    CAP["h"], CAP["n"] = h.clone(), n  # the diagonal sandwich's H_jj, penalty included
    return _diagonal_compute(h, v, g, G, n, *a, **k)


def stiff_spy(evals, evecs, V, g, n):
    # the exact estimator's t_k along H's eigenvectors, largest |eigenvalue| first (as _stiff_offset's)
    U = evecs[:, evals.abs().argsort(descending=True)]
    along = ((U.T @ V) * U.T).sum(-1)
    live = along > 100 * evals.numel() * torch.finfo(torch.float64).eps * float(V.diagonal().abs().max())
    CAP["edec"] = tenths((U.T @ g)[live].square() * n / along[live])
    return _stiff_offset(evals, evecs, V, g, n)


E._stationarity, E.diagonal_compute, E._stiff_offset = stationarity_spy, diagonal_spy, stiff_spy


def tenths(t2):
    K = t2.numel()
    return [float(t2[i * K // 10:(i + 1) * K // 10].mean().sqrt()) for i in range(10)]


def stats():
    """The diagonal statistics of the last estimation (see the module docstring)."""
    g, v, h, n = CAP["g"], CAP["v"], CAP["h"], CAP["n"]
    keep = v > E.V_RELATIVE_FLOOR * float(v.max())
    t2 = (n * g[keep].square() / v[keep])[h[keep].argsort(descending=True)]
    K = t2.numel()
    return {"all": float(t2.mean().sqrt()), "top50": float(t2[:K // 2].mean().sqrt()), "dec": tenths(t2)}


def fmt(xs):
    return "[" + " ".join(f"{x:.2f}" for x in xs) + "]"


def teacher_data(n, d_in, classes, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g)
    W1 = torch.randn(d_in, 32, generator=g) / math.sqrt(d_in)
    W2 = torch.randn(32, classes, generator=g) * 2
    return X, sample_labels(torch.tanh(X @ W1 * 2) @ W2, g)


def sample_labels(logits, g):
    """Labels drawn from softmax(logits) by the data's own generator (reproducible whatever ran before)."""
    return torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)


def image_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 12, 12, generator=g)
    s = torch.stack([X[:, 0, :6, :6].mean((1, 2)), X[:, 0, 6:, 6:].mean((1, 2)), X[:, 0, :6, 6:].mean((1, 2))], 1)
    return X, sample_labels(6 * torch.cat([s, -s.sum(1, keepdim=True)], 1), g)


def mlp(d_in, h, c):
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


def train(m, X, y, how, epochs, lr=None, bs=64):
    """Cross-entropy + WD/2 |theta|^2: ``lbfgs`` full batch in float64 (5 rounds of ``epochs`` iterations);
    ``sgd`` (momentum 0.9) / ``adam`` on shuffled minibatches of ``bs``, constant lr, or with a cosine (``...cos``)
    or a x0.1 step at 2/3 and 5/6 of the steps (``...step``)."""
    torch.manual_seed(0)
    obj = lambda a, b: F.cross_entropy(m(a), b) + WD / 2 * sum((p ** 2).sum() for p in m.parameters())  # noqa: E731
    if how == "lbfgs":
        m.double()
        opt = torch.optim.LBFGS(m.parameters(), max_iter=epochs, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            out = obj(X.double(), y)
            out.backward()
            return out
        for _ in range(5):
            opt.step(closure)
        return m.float()
    opt = (torch.optim.SGD(m.parameters(), lr=lr or 0.05, momentum=0.9) if how.startswith("sgd")
           else torch.optim.Adam(m.parameters(), lr=lr or 1e-3))
    steps = epochs * math.ceil(len(X) / bs)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if how.endswith("cos") else
             torch.optim.lr_scheduler.MultiStepLR(opt, [steps * 2 // 3, steps * 5 // 6], 0.1) if how.endswith("step")
             else None)
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), bs):
            opt.zero_grad()
            obj(X[perm[i:i + bs]], y[perm[i:i + bs]]).backward()
            opt.step()
            if sched:
                sched.step()
    return m


def loss(o, t):
    return F.cross_entropy(o, t, reduction="none")


def both(m, X, y, n, label, exact=False):
    for name, (A, B) in (("own", (X[:n], y[:n])), ("held", (X[n:], y[n:]))):
        dl = DataLoader(TensorDataset(A, B), batch_size=500)
        head = f"{label:30s} {name:4s}"
        if exact:
            dx = estimate(m, dl, loss, mode="exact", weight_decay=WD).diagnostics
            head += (f" EXACT offset={dx['minimum_offset_sd']:.3f} nam={int(dx['not_at_minimum'])} "
                     f"stiff={dx['stiff_offset_sd']:.3f} unseen={int(dx['records_unlike_training'])} "
                     f"edec={fmt(CAP['edec'])} | DIAG")
        t0 = time.process_time()
        d = estimate(m, dl, loss, mode="diagonal", weight_decay=WD).diagnostics
        s = stats()
        print(f"{head} d={sum(p.numel() for p in m.parameters())} n={len(A)} offset={d['minimum_offset_sd']:.3f} "
              f"nam={int(d['not_at_minimum'])} top50={s['top50']:.3f} dec={fmt(s['dec'])} "
              f"({time.process_time() - t0:.1f} s)", flush=True)


def fits(which):
    n, nh = 4000, 1000
    if which in ("mlp", "mlp2", "small"):
        X, y = teacher_data(n + nh, 20, 10, 0)
        runs = {"mlp": [("lbfgs", 3000, None, 64), ("sgd", 5, None, 64), ("sgd", 40, None, 64), ("sgdcos", 40, None, 64),
                        ("adam", 5, None, 64), ("adam", 60, None, 64), ("adamcos", 60, None, 64)],
                "mlp2": [("adam", 60, 3e-4, 64), ("adam", 60, 1e-4, 64), ("adam", 30, 1e-3, 256),
                         ("adamstep", 60, 1e-3, 64), ("sgd", 40, 0.01, 64), ("sgd", 40, 0.005, 256),
                         ("adamcos", 15, 1e-3, 64), ("sgdcos", 10, 0.05, 64)],
                "small": [("lbfgs", 3000, None, 64), ("adam", 60, 1e-3, 64), ("adam", 60, 3e-4, 64),
                          ("adam", 60, 1e-4, 64), ("adam", 30, 1e-3, 256), ("adamcos", 60, 1e-3, 64),
                          ("adamcos", 15, 1e-3, 64), ("sgd", 40, 0.05, 64), ("sgd", 40, 0.01, 64),
                          ("sgdcos", 40, 0.05, 64)]}[which]
        width = 16 if which == "small" else 64
        for how, ep, lr, bs in runs:
            torch.manual_seed(0)
            m = train(mlp(20, width, 10), X[:n], y[:n], how, ep, lr, bs)
            both(m, X, y, n, f"mlp{width} {how} {ep} lr{lr} b{bs}", exact=which == "small")
    elif which == "cnn":
        X, y = image_data(n + nh, 1)
        for how, ep in (("adamcos", 30), ("adam", 30), ("sgd", 20), ("lbfgs", 100)):
            torch.manual_seed(0)
            both(train(CNN(), X[:n], y[:n], how, ep), X, y, n, f"cnn {how} {ep}")


def exact_members():
    """Two of ``small``'s member fits under the exact estimator's not-at-a-minimum limits: the report (``assess``,
    ``auto``: the exact estimator at d = 778) and the opening of each warning."""
    import mis_lightning as ml
    X, y = teacher_data(5000, 20, 10, 0)
    for how, ep, lr in (("adamcos", 60, 1e-3), ("sgd", 40, 0.01)):
        torch.manual_seed(0)  # the same fits as fits("small")
        m = train(mlp(20, 16, 10), X[:4000], y[:4000], how, ep, lr, 64)
        r = ml.assess(m, ["int8_weight_only"], DataLoader(TensorDataset(X[:4000], y[:4000]), batch_size=500), loss,
                      weight_decay=WD)
        d = r.diagnostics
        print(f"mlp16 {how} {ep} lr{lr} members: "
              f"minimum_offset_sd={d['minimum_offset_sd']:.3f} stiff_offset_sd={d['stiff_offset_sd']:.3f} "
              f"records_unlike_training={d['records_unlike_training']}", flush=True)
        for w in r.warnings:
            print("   warning:", w[:100], flush=True)


def leverage_slope():
    """A second-order lead, least squares in closed form: the slope of the records' squared residuals on their
    leverages ``h_i = x_i' (X'X)^-1 x_i``, over the mean squared residual. At the minimiser ``E r_i^2 = s2 (1 - h_i)``
    on the training records (slope -1), ``s2 (1 + h_i)`` on held-out ones (+1), and ``s2 (1 - h_i + c^2 h_i)`` on the
    training records of a fit moved ``c`` of its own sd in every direction (``c^2 - 1``), wherever the residue lies.
    Rows: d, n, m (held-out), c; mean and sd over 200 draws (row scales lognormal, so the leverages vary)."""
    g = torch.Generator().manual_seed(0)

    def slope(Xs, ys, b, A):
        h = ((Xs @ A) * Xs).sum(1)
        r2 = (ys - Xs @ b) ** 2
        hc = h - h.mean()
        return float((hc * r2).sum() / (hc * hc).sum() / r2.mean())
    for d, n, m, c in ((20, 2000, 500, 0.7), (100, 2000, 500, 0.7), (100, 2000, 500, 0.9), (400, 4000, 1000, 0.9)):
        out: dict = {"members": [], "held-out": [], "members, moved c sd": []}
        for _ in range(200):
            X = torch.exp(0.5 * torch.randn(n + m, 1, generator=g, dtype=torch.float64)) * \
                torch.randn(n + m, d, generator=g, dtype=torch.float64)
            y = X @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n + m, generator=g, dtype=torch.float64)
            A = torch.linalg.inv(X[:n].T @ X[:n])
            b = A @ X[:n].T @ y[:n]
            moved = b + c * torch.linalg.cholesky(A) @ torch.randn(d, generator=g, dtype=torch.float64)
            out["members"].append(slope(X[:n], y[:n], b, A))
            out["held-out"].append(slope(X[n:], y[n:], b, A))
            out["members, moved c sd"].append(slope(X[:n], y[:n], moved, A))
        print(f"d={d} n={n} m={m} c={c}:", ", ".join(f"{k} {torch.tensor(v).mean():+.2f} (sd {torch.tensor(v).std():.2f})"
                                                     for k, v in out.items()), flush=True)


def examples():
    """The examples' own training and callback, the estimator forced to the diagonal one; members only."""
    import functools
    import warnings

    import mis_lightning
    sys.path.insert(0, "examples")
    for name in ("callback_example", "cnn_callback", "transformer_callback"):
        mod = importlib.import_module(name)
        mod.MISCallback = functools.partial(mis_lightning.MISCallback, mode="diagonal")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod.main(tempfile.mkdtemp()) if name == "callback_example" else mod.main()
        s = stats()
        print(f"example {name}: own n={CAP['n']} top50={s['top50']:.3f} all={s['all']:.3f} dec={fmt(s['dec'])}",
              flush=True)


def hydra():
    from mis_lightning import cli
    for extra in ([], ["model.optimizer=adam", "data.batch_size=64"]):
        sys.argv = ["mis-lightning", "mis.estimation.mode=diagonal", f"hydra.run.dir={tempfile.mkdtemp()}", *extra]
        try:
            cli.main()
        except SystemExit:
            pass
        s = stats()
        print(f"hydra default {' '.join(extra) or '(L-BFGS)'}: own n={CAP['n']} top50={s['top50']:.3f} "
              f"all={s['all']:.3f} dec={fmt(s['dec'])}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"examples": examples, "hydra": hydra, "exact_members": exact_members,
     "leverage_slope": leverage_slope}.get(sys.argv[1], lambda: fits(sys.argv[1]))()
