"""Is the sampled-label Gauss-Newton diagonal (``hessian="ggn_mc"``) a function of the records,
whatever their order, batching or split over processes? And what do the per-record draws cost?

A 10-class Conv1d + Linear classifier (1,346 weights, briefly trained, seeded) on 600 synthetic
records. Printed:

* ``order``: ``assess``'s leakage (``rtn_int4``, ``int8_weight_only``) and Monte Carlo error bound with the records in
  their order in batches of 32 and shuffled in batches of 50 (``hessian="ggn_mc"``);
* ``shards``: the diagonal ``h_sum`` of one ``MomentAccumulator`` over all records (batches of
  64) against the sum of two accumulators over uneven shards (250 in batches of 32, 350 in
  batches of 50: what a DDP sync of two processes sums), max and median relative difference;
* ``cost``: per batch of 64, the record keys (``record_keys`` of the raw batch) and the keyed
  labels (``record_labels``) against ``torch.multinomial`` from a generator and the whole
  ``update`` (1 thread; median of 20).

    python benchmarks/ggn_mc_record_draws.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mis_lightning as ml  # noqa: E402
from mis_lightning.estimation.estimate import MomentAccumulator  # noqa: E402
from mis_lightning.estimation.records import record_keys  # noqa: E402

C, N = 10, 600


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, C)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


def setup(n: int = N):
    """The 10-class Conv1d + Linear model trained (30 full-batch SGD steps) on ``n`` records:
    ``(model, X [n, 2, 16], Y [n])`` (seeded; also benchmarks/kfac_record_sample.py's)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 2, 16, generator=g)
    Y = (X[:, 0, :C].argmax(1) + torch.randint(0, 2, (n,), generator=g)) % C
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        ce(model(X), Y).mean().backward()
        opt.step()
    return model.eval(), X, Y


def leakage(model, X, Y, bs):
    rep = ml.assess(model, ["rtn_int4", "int8_weight_only"], DataLoader(TensorDataset(X, Y), batch_size=bs), ce,
                    num_records=64, uncertainty_draws=0, estimation="diagonal", hessian="ggn_mc")
    out = {k: round(v.leakage, 6) for k, v in rep.schemes.items()}
    return out | {"mc_median_rel_err": round(rep.diagnostics["ggn_mc_median_relative_error"], 3)}


def h_sum(model, parts):
    total = None
    for X, Y, bs in parts:
        acc = MomentAccumulator(model, ce, mode="diagonal", hessian="ggn_mc", num_records=16,
                                generator=torch.Generator().manual_seed(0))
        for a in range(0, X.shape[0], bs):
            acc.update((X[a:a + bs], Y[a:a + bs]))
        h = acc.state["h_sum"].to(torch.float64)
        total = h if total is None else total + h
    return total


def median_s(fn, reps=20):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[reps // 2]


def main() -> None:
    torch.set_num_threads(1)
    model, X, Y = setup()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    print("order: in order, batches of 32", leakage(model, X, Y, 32))
    print("order: shuffled, batches of 50", leakage(model, X[perm], Y[perm], 50))
    one = h_sum(model, [(X, Y, 64)])
    two = h_sum(model, [(X[:250], Y[:250], 32), (X[250:], Y[250:], 50)])
    rel = (two - one).abs() / one.abs().clamp_min(1e-300)
    print(f"shards: max rel {float(rel.max()):.3g}, median rel {float(rel.median()):.3g} over {rel.numel()} weights")
    xb, yb = X[:64], Y[:64]
    p = torch.softmax(model(xb).detach().double(), -1)
    gen = torch.Generator().manual_seed(0)
    t_mult = median_s(lambda: torch.multinomial(p, 1, generator=gen))
    try:
        from mis_lightning.estimation.record_draws import record_labels
    except ImportError:  # the code before the keyed draws
        record_labels = None
    t_keys = median_s(lambda: record_keys((xb, yb), None, 64))
    keys = record_keys((xb, yb), None, 64)
    t_lab = median_s(lambda: record_labels(p, keys, 0, 1)) if record_labels else float("nan")
    acc = MomentAccumulator(model, ce, mode="diagonal", hessian="ggn_mc", num_records=16)
    acc.update((xb, yb))
    t_upd = median_s(lambda: acc.update((xb, yb)))
    print(f"cost per batch of 64 (ms): record_keys {1e3 * t_keys:.3f}, record_labels {1e3 * t_lab:.3f}, "
          f"multinomial {1e3 * t_mult:.3f}, whole update {1e3 * t_upd:.2f}")


if __name__ == "__main__":
    main()
