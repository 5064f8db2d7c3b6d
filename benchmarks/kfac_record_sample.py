"""Does the K-FAC correction's sigma (so the leakage) depend on the records' order, batching or
split over processes, once there are more records than a layer's factors sum? And what does
choosing them by content cost?

A 10-class Conv1d + Linear classifier (1,346 weights, briefly trained, seeded) on 6,000
synthetic records: both layers' factors sum ~2,048 (``KFAC_MIN_RECORDS``) of them. Printed:

* ``order``: ``assess``'s leakage (``rtn_int4``, ``int8_weight_only``; ``hessian="ggn"``: no
  Monte Carlo draws), ``kfac_records_min`` and the median VIF with the records in order in
  batches of 32 and shuffled in batches of 50, for ``first-read`` (a list of batches: the number
  of records is not known before the pass, so the factors sum the first records read, the rule
  every input had before kf43) and ``by-content`` (a DataLoader: ``len(dataset)`` known, the
  threshold sample of ``mis_lightning/estimation/kron_sample.py``);
* ``shards``: the factors (``kfac_A``, ``kfac_G``) of one ``MomentAccumulator`` over all records
  against the sum of two over uneven shards (2,500 in batches of 32, 3,500 in batches of 50:
  what a DDP sync of two processes sums), max relative difference, for both rules;
* ``cost``: CPU seconds (``time.process_time``: robust to a shared machine's load) of the
  estimation pass over the 6,000 records (batches of 64, 1 thread; median of 5, the two rules
  alternated), and per batch of 64 the sample's own work (the record keys, their hash, the sort
  and the batch's permutation) with the whole ``update``'s (median of 20).

    python benchmarks/kfac_record_sample.py

On a tree before kf43 (no ``kron_sample``) both rules are the first records read; the script
still runs there (the sample's own work is skipped).
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mis_lightning as ml  # noqa: E402
from benchmarks.ggn_mc_record_draws import ce  # noqa: E402
from benchmarks.ggn_mc_record_draws import setup as _setup

E = importlib.import_module("mis_lightning.estimation.estimate")
C, N = 10, 6000


def data(X, Y, bs, known):
    return DataLoader(TensorDataset(X, Y), batch_size=bs) if known else \
        [(X[a:a + bs], Y[a:a + bs]) for a in range(0, X.shape[0], bs)]


def leakage(model, X, Y, bs, known):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(model, ["rtn_int4", "int8_weight_only"], data(X, Y, bs, known), ce, num_records=64,
                        uncertainty_draws=0, estimation="diagonal", hessian="ggn")
    d = rep.diagnostics
    return ({k: round(v.leakage, 6) for k, v in rep.schemes.items()}
            | {"kfac_records_min": d.get("kfac_records_min"),
               "vif_median": round(d.get("kfac_variance_inflation_median", float("nan")), 4),
               "order_warning": any("depends on the records' order" in w for w in rep.warnings)})


def factors(model, parts, hint):
    total = None
    for X, Y, bs in parts:
        acc = E.MomentAccumulator(model, ce, mode="diagonal", hessian="ggn", num_records=16, selection="hash",
                                  n_hint=hint, generator=torch.Generator().manual_seed(0))
        for a in range(0, X.shape[0], bs):
            acc.update((X[a:a + bs], Y[a:a + bs]))
        st = {k: v.clone() for k, v in acc.state.items() if k.startswith(("kfac_A", "kfac_G"))}
        total = st if total is None else {k: total[k] + v for k, v in st.items()}
    return total


def median_s(fn, reps=20):
    ts = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return sorted(ts)[reps // 2]


def main() -> None:
    torch.set_num_threads(1)
    model, X, Y = _setup(N)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    for known, rule in ((False, "first-read"), (True, "by-content")):
        a = leakage(model, X, Y, 32, known)
        b = leakage(model, X[perm], Y[perm], 50, known)
        print(f"order [{rule}]: in order, batches of 32 {a}")
        print(f"order [{rule}]: shuffled, batches of 50 {b}")
    for hint, rule in ((None, "first-read"), (N, "by-content")):
        one = factors(model, [(X, Y, 64)], hint)
        two = factors(model, [(X[perm[:2500]], Y[perm[:2500]], 32), (X[perm[2500:]], Y[perm[2500:]], 50)], hint)
        rel = max(float((two[k] - v).abs().max() / v.abs().max()) for k, v in one.items())
        print(f"shards [{rule}]: factors, max rel difference {rel:.3g}")
    times: dict[str, list[float]] = {"first-read": [], "by-content": []}
    for _ in range(5):
        for hint, rule in ((None, "first-read"), (N, "by-content")):
            acc = E.MomentAccumulator(model, ce, mode="diagonal", hessian="ggn", num_records=64, selection="hash",
                                      n_hint=hint)
            t = time.process_time()
            for a in range(0, N, 64):
                acc.update((X[a:a + 64], Y[a:a + 64]))
            times[rule].append(time.process_time() - t)
    print("cost: the pass over 6,000 records (CPU s, median of 5): "
          + ", ".join(f"{k} {sorted(v)[2]:.3f}" for k, v in times.items()))
    try:
        from mis_lightning.estimation.kron_sample import (
            record_hashes,
            sample_order,
            sample_thresholds,
        )
    except ImportError:  # a tree before kf43
        return
    from mis_lightning.estimation.records import record_keys, slice_rows

    xb, yb = X[:64], Y[:64]
    thresholds = sample_thresholds({"conv": 2048, "head": 2048}, N)

    def own_work():
        keys = record_keys((xb, yb), None, 64)
        order, _ = sample_order(record_hashes(keys, 0), thresholds)
        rest = torch.ones(64, dtype=torch.bool)
        rest[order] = False
        full = torch.cat([order, torch.nonzero(rest).squeeze(-1)])
        slice_rows(xb, full), slice_rows(yb, full), keys[full]

    acc = E.MomentAccumulator(model, ce, mode="diagonal", hessian="ggn", num_records=16, selection="hash", n_hint=N)
    acc.update((xb, yb))
    t_own = median_s(own_work)
    t_upd = median_s(lambda: acc.update((xb, yb)))
    print(f"cost per batch of 64 (CPU ms): the sample's keys, hash, sort and permutation {1e3 * t_own:.3f}, "
          f"whole update {1e3 * t_upd:.2f}")


if __name__ == "__main__":
    main()
