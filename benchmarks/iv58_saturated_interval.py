"""The 80% interval where every stored record reads the same figure (docs/benchmarks.md, "iv58").

    OMP_NUM_THREADS=1 python benchmarks/iv58_saturated_interval.py mlp --records 4096
    OMP_NUM_THREADS=1 python benchmarks/iv58_saturated_interval.py gmean --records 128 --dim 168 --seeds 8
    OMP_NUM_THREADS=1 python benchmarks/iv58_saturated_interval.py gmean --records 128 --dim 168 --exact 0.4338
    OMP_NUM_THREADS=1 python benchmarks/iv58_saturated_interval.py box

``box``: ``tests/test_correlated.py``'s rows past the cap (64 records of rank 4 over 20 columns, column
0 times 1e6; in-sample, own row out): ``beta``'s bound over ``kappa`` in [0.8, 0.95] with
``CORRELATED_BETA_CAP`` off and on, against ``beta`` at 200 sampled points of the box (vertices and
interior), and the low end's smallest ratio to a sampled record's form.

``mlp``: rv55r's 16-64-64-2 MLP (``benchmarks/rv55r_wide_gate_correlated.py``, d = 5,378; at 4,096
records d / N = 1.31, every headline saturated at 1.0) assessed with rtn_int8 and
intx_weight_only_int4 (8 uncertainty draws, the default in-sample factor model): per scheme the
headline and its interval, and the bounds of the in-sample leave-one-out divisor's ``beta`` over the
interval's ``kappa`` box (``Correlation._inverse_bias_range``), with ``functional.correlated.
CORRELATED_BETA_CAP`` off (base's bound, no one-point box) and on; and the scale of the standardised
influences (the median record's ``sum_j w_j^2``, against ``d`` for influences in units of their sd).

``gmean``: an independent reference with d >= N: the Gaussian mean, ``z ~ N(mu, I_d)``, ``theta_hat =
mean(z)`` (an ``nn.Linear(1, d)`` fed ones, loss ``|z - theta|^2 / 2``; its Hessian is I). Its exact
advantage (``groundtruth.ground_truth.gaussian_mean_advantage``: the release ``N(mu + (z - mu) / N,
(N - 1) / N^2 I)`` given ``Z_1 = z`` against the marginal ``N(mu, I / N)``, 2^22 seeded draws, Monte
Carlo sd ~2.4e-4). ``assess``
(default estimation: the exact sandwich at this size) with rtn_int8 on ``--seeds`` draws of the
records: figure, interval (``-``: none given), whether it holds the exact advantage. ``--exact X``
takes the advantage as given (to run the script against a checkout without the reference, base).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, "benchmarks")


def gmean_report(records: int, dim: int, seed: int, **options):
    """The Gaussian mean's report: ``records`` draws of ``N(mu, I_dim)`` (torch seed ``100 + seed``: a new
    ``mu`` and ``z``), ``theta_hat`` their mean, assessed with rtn_int8, 8 uncertainty draws, warnings muted;
    ``options``: more of ``assess``'s (e.g. ``leverage_correction=False``)."""
    from mis_lightning import assess
    torch.manual_seed(100 + seed)
    z = torch.randn(dim) + torch.randn(records, dim)
    m = nn.Linear(1, dim, bias=False)
    with torch.no_grad():
        m.weight.copy_(z.mean(0).unsqueeze(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return assess(m, ["rtn_int8"], DataLoader(TensorDataset(torch.ones(records, 1), z), batch_size=64),
                      lambda o, t: 0.5 * (o - t).square().sum(-1), uncertainty_draws=8, **options)


def gmean(records: int, dim: int, seeds: int, truth: float | None) -> None:
    if truth is None:
        from mis_lightning.groundtruth.ground_truth import gaussian_mean_advantage
        truth = gaussian_mean_advantage(records, dim)
    print(f"N={records} d={dim} d/N={dim / records:.2f}: exact advantage {truth:.4f}")
    held = 0
    for s in range(seeds):
        rep = gmean_report(records, dim, s)
        r = rep.schemes["rtn_int8"]
        iv = "-" if r.interval is None else f"[{r.interval[0]:.4f}, {r.interval[1]:.4f}] {r.interval_regime}"
        held += r.interval is not None and r.interval[0] <= truth <= r.interval[1]
        point = any(w.startswith("no 80% interval") for w in rep.warnings)
        print(f"  seed {s}: figure {r.leakage:.4f} ({r.leakage / truth:.3f}x exact) interval {iv}"
              f"{'; no-interval warning' if point else ''}")
    print(f"  held the exact advantage: {held} of {seeds}")


def mlp(records: int) -> None:
    import rv55r_wide_gate_correlated as B

    import mis_lightning.functional.correlated as C
    A = sys.modules["mis_lightning.assess"]
    seen: list[tuple[float, float]] = []
    inner = C.Correlation._inverse_bias_range

    def traced(self, vv_lo, vv_hi, b):
        out = inner(self, vv_lo, vv_hi, b)
        seen.append(out)
        return out

    C.Correlation._inverse_bias_range = traced
    scale: list[float] = []
    interval = A._interval

    def scaled(est, *a, **k):
        scale.append(float(est.influence.double().square().sum(1).median()))
        return interval(est, *a, **k)

    A._interval = scaled
    m, data = B._model(records)
    for cap in (False, True):
        C.CORRELATED_BETA_CAP = cap
        seen.clear()
        rep = B.assess(m, ["rtn_int8", "intx_weight_only_int4"], B.DataLoader(data, batch_size=128), B._ce,
                       estimation="diagonal", hessian="ggn", uncertainty_draws=8)
        print(f"N={records}, CORRELATED_BETA_CAP={cap}: d / N {rep.d / records:.2f}, baseline "
              f"{rep.baseline_leakage!r}; median per record sum_j w_j^2 {scale[0]:.3g} (d = {rep.d})")
        for name, r in rep.schemes.items():
            print(f"  {name}: leakage {r.leakage!r} interval {r.interval} regime {r.interval_regime}")
        print("  beta's bounds over the boxes (_inverse_bias_range; none: every box a point):",
              ", ".join(f"({lo:.6g}, {hi:.6g})" for lo, hi in seen) or "none")
        for w in rep.warnings:
            if w.startswith("no 80% interval"):
                print("  warning:", w)


def box() -> None:
    import mis_lightning.functional.correlated as C
    from mis_lightning.functional.correlated import RecordCorrelation
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 4, dtype=torch.float64, generator=g) @ torch.randn(4, 20, dtype=torch.float64, generator=g)
    W[:, 0] *= 1e6
    rc = RecordCorrelation.in_sample(W)
    corr = rc.parts[0][1]
    x, b = corr.self_term.to(torch.float64), corr.self_weight.to(torch.float64)
    k_lo, k_hi = torch.full((20,), 0.8, dtype=torch.float64), torch.full((20,), 0.95, dtype=torch.float64)
    vv_lo, vv_hi = (corr._in_sample_loo_parts(W, x, b, k)[3] for k in (k_lo, k_hi))
    print(f"b vv {float((b * vv_lo).min()):.3g}..{float((b * vv_hi).max()):.3g}, past the cap "
          f"{float((b * vv_lo >= C.IN_SAMPLE_LOO_LEVERAGE_CAP).double().mean()):.2f}")
    for cap in (False, True):
        C.CORRELATED_BETA_CAP = cap
        lo, _ = rc.gaussian_ends(W, k_lo, k_hi)
        pts = torch.Generator().manual_seed(7)
        betas, worst = [], math.inf
        for i in range(200):
            k = (torch.where(torch.rand(20, generator=pts) < 0.5, k_hi, k_lo) if i % 2 else
                 k_lo + (k_hi - k_lo) * torch.rand(20, dtype=torch.float64, generator=pts))
            betas.append(corr._in_sample_loo_parts(W, x, b, k)[2])
            worst = min(worst, float((lo / rc.gaussian_mean_abs(W, k)).min()))
        bound = corr._inverse_bias_range(vv_lo, vv_hi, b)
        print(f"CORRELATED_BETA_CAP={cap}: beta's bound ({bound[0]:.3g}, {bound[1]:.4g}); sampled beta "
              f"{min(betas):.3g}..{max(betas):.3g}; low end / sampled forms, smallest {worst:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["mlp", "gmean", "box"])
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=168)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--exact", type=float, default=None,
                    help="gmean: the exact advantage, given (a checkout without groundtruth's reference)")
    a = ap.parse_args()
    if a.mode == "mlp":
        mlp(a.records)
    elif a.mode == "box":
        box()
    else:
        gmean(a.records, a.dim, a.seeds, a.exact)


if __name__ == "__main__":
    main()
