"""Which records are stored: the headline's spread over random selections of the R stored
records against the interval's record term, and how often the 80% interval holds the
all-records figure (method.md section 3, "The uncertainty interval", *What the record term
covers*; docs/validation.md, "Which records are stored; sigma's sample").

    python benchmarks/record_selection.py MODEL [SALTS] [R] [N]      # MODEL: ols100 ols200 logit50 mlp_diag
    COV=independent python benchmarks/record_selection.py mlp_diag 20 512

The stored records are the bottom-k of a content hash (``estimation.records.record_keys``) with
fixed byte weights; a salt on those weights (``SALT``, a benchmark-only patch of the private
``records._hash_weights``) draws another subset, a simple random sample of R of the N records.
Each selection is scored end to end by ``assess`` (default options; ``COV`` sets ``covariance``);
the all-records figure is ``num_records=N``. Printed per scheme: the all-records figure, the
selections' mean and sd, the mean record term ``record_se`` (captured from
``functional.record_standard_error``), ``sd/se`` (``sqrt(1 - R/N)`` expected for a mean over the
records), the same against the finite-population se, and coverage of the all-records figure by the
reported 80% interval (``cov80``), by ``value +- 1.28 record_se`` (``cov_rec``) and by the
finite-population band (``cov_fpc``). Writes ``record_selection_MODEL_R{R}_n{N}{COV}.json`` to
``$OUT_DIR`` (default: the working directory).
"""
import json
import math
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
import mis_lightning.functional as F
from mis_lightning.estimation import records as REC

torch.set_num_threads(1)
SALT = [0]
_orig = REC._hash_weights


def salted(leaf, length):
    w = _orig(leaf + 7919 * SALT[0], length) if SALT[0] else _orig(leaf, length)
    return w


REC._hash_weights = salted
SE = []
COVK = [None]
_orig_se = F.record_standard_error


def cap_se(leak):
    s = _orig_se(leak)
    SE.append((int(leak.numel()), s, float(leak.mean())))
    return s


F.record_standard_error = cap_se


def fit(model, X, y, loss, wd):
    model = model.double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        lo = loss(model(X.double()), y.double()).mean() + 0.5 * wd * sum((p ** 2).sum() for p in model.parameters())
        lo.backward()
        return lo
    for _ in range(5):
        opt.step(closure)
    return model


def mse(o, y):
    return 0.5 * (o.squeeze(-1) - y) ** 2


def bce(o, y):
    return nn.functional.binary_cross_entropy_with_logits(o.squeeze(-1), y, reduction="none")


def make(name, n):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # the Student-t noise and the MLP's initialisation draw from the global generator
    if name == "ols100":
        d = 100
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        b = torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d)
        e = torch.distributions.StudentT(5.0).sample((n,)).double() * 0.5
        y = X @ b + e
        m = fit(nn.Linear(d, 1), X, y, mse, 0.0)
        return m, X, y, mse, {}, ["none", "rtn_int8", "rtn_int4", "rtn_int3"], 0.0
    if name == "ols200":
        d = 200
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        b = torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d)
        y = X @ b + torch.randn(n, generator=g, dtype=torch.float64)
        m = fit(nn.Linear(d, 1), X, y, mse, 0.0)
        return m, X, y, mse, {}, ["none", "rtn_int8", "rtn_int4", "rtn_int3"], 0.0
    if name == "logit50":
        d = 50
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        b = torch.randn(d, generator=g, dtype=torch.float64) * 1.5 / math.sqrt(d)
        y = torch.bernoulli(torch.sigmoid(X @ b), generator=g)
        m = fit(nn.Linear(d, 1), X, y, bce, 0.0)
        return m, X, y, bce, {}, ["none", "rtn_int8", "rtn_int4", "rtn_int3"], 0.0
    if name == "mlp_diag":
        X = torch.randn(n, 10, generator=g, dtype=torch.float64)
        y = torch.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        torch.manual_seed(0)
        wd = 1e-3
        m = fit(nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1)), X, y, mse, wd)
        return m, X, y, mse, {"estimation": "diagonal", "weight_decay": wd}, ["none", "rtn_int8", "rtn_int4", "rtn_int3"], wd
    raise ValueError(name)


def run(model, X, y, loss, opts, schemes, R, salt):
    SALT[0] = salt
    REC._HASH_WEIGHTS.clear()
    SE.clear()
    extra = {"covariance": os.environ["COV"]} if os.environ.get("COV") else {}
    res = ml.assess(model.float(), schemes, DataLoader(TensorDataset(X.float(), y.float()), batch_size=500), loss,
                    num_records=R, seed=0, **opts, **extra)
    COVK[0] = res.schemes[schemes[-1]].covariance
    out = {}
    ses = list(SE)
    for s in schemes:
        r = res.schemes[s]
        iv = r.interval if r.interval is not None else (math.nan, math.nan)
        out[s] = {"value": r.leakage, "lo": iv[0], "hi": iv[1], "regime": r.interval_regime}
    out["_se"] = ses
    out["_cov"] = COVK[0]
    return out


def main():
    name = sys.argv[1]
    salts = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    R = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 3000
    model, X, y, loss, opts, schemes, _ = make(name, n)
    t0 = time.process_time()
    truth = run(model, X, y, loss, opts, schemes, n, 0)
    print(f"{name}: all-records run {time.process_time() - t0:.1f}s cpu; se entries {len(truth['_se'])}", flush=True)
    rows = []
    for s in range(1, salts + 1):
        rows.append(run(model, X, y, loss, opts, schemes, R, s))
    print("covariance: all-records", truth["_cov"], "stored", sorted({r["_cov"] for r in rows}))
    print(f"{name} n={n} R={R} salts={salts}  (cpu {time.process_time() - t0:.0f}s)")
    print(f"{'scheme':10s} {'truth(all)':>10s} {'mean':>9s} {'sd(sel)':>9s} {'se_rec':>9s} {'sd/se':>6s} "
          f"{'fpc-se':>8s} {'sd/fpc':>6s} {'cov80':>6s} {'cov_rec':>7s} {'cov_fpc':>7s} regime")
    summary = {}
    z1 = 1.2815515655446004
    for i, sc in enumerate(schemes):
        T = truth[sc]["value"]
        v = torch.tensor([r[sc]["value"] for r in rows], dtype=torch.float64)
        # the record se of this scheme: entries per call are in scheme order when counts match
        ses = [r["_se"] for r in rows]
        # the record se of this scheme: the captured entry whose mean is closest to its value
        se = torch.tensor([min(e, key=lambda t: abs(t[2] - r[sc]["value"]))[1] for e, r in zip(ses, rows)])
        if i == 0:
            print("se entries", [(round(t[2], 5), round(t[1], 6)) for t in ses[0]], [round(rows[0][q]["value"], 5) for q in schemes])
        fpc = se * math.sqrt(1 - R / n)
        cov = sum(r[sc]["lo"] <= T <= r[sc]["hi"] for r in rows) / len(rows)
        cov_rec = float(((v - T).abs() <= z1 * se).double().mean())
        cov_fpc = float(((v - T).abs() <= z1 * fpc).double().mean())
        sd = float(v.std())
        sem = float(se.mean())
        regimes = sorted({r[sc]["regime"] for r in rows})
        print(f"{sc:10s} {T:10.5f} {float(v.mean()):9.5f} {sd:9.5f} {sem:9.5f} {sd / sem:6.2f} {float(fpc.mean()):8.5f} "
              f"{sd / float(fpc.mean()):6.2f} {cov:6.2f} {cov_rec:7.2f} {cov_fpc:7.2f} {','.join(map(str, regimes))}")
        summary[sc] = dict(truth=T, mean=float(v.mean()), sd=sd, se=sem, fpc_se=float(fpc.mean()), cov80=cov,
                           cov_rec=cov_rec, cov_fpc=cov_fpc, regimes=regimes,
                           width=float(torch.tensor([r[sc]["hi"] - r[sc]["lo"] for r in rows]).median()))
    json.dump({"name": name, "n": n, "R": R, "salts": salts, "summary": summary, "truth": truth, "rows": rows},
              open(os.path.join(os.environ.get("OUT_DIR", "."), f"record_selection_{name}_R{R}_n{n}{os.environ.get('COV', '')}.json"), "w"), default=str)


if __name__ == "__main__":
    main()
