"""rv57c's reproducer (docs/benchmarks.md "rv57c"): the diagonal estimator's loss-directions sample measures
through a weak reference to its accumulator (``estimate.LOSS_RANKS_WEAK``); this reads the sample's count
``MomentAccumulator.loss_directions()`` through each front end's copy with the original dropped and the cyclic
collector off (a weak reference dead where still needed would raise RuntimeError here): a ``MISIndicator``'s
``clone()`` and ``copy.deepcopy``, its pickle, a deep copy of a module owning it, the accumulator held alone
(the Metric dropped), and ``copy.copy`` of the accumulator. A 8-16-3 ReLU classifier, 256 records in batches
of 64, ``estimation="diagonal", hessian="ggn"``. Prints ``(mean rank(L_i), how, records sampled)`` for each
(``None``: no record in the copy's sample). Seconds.

    python benchmarks/rv57c_weak_measure.py
    python benchmarks/rv57c_weak_measure.py --strong   # the bound method (LOSS_RANKS_WEAK = False), A/B
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import pickle

import torch
import torch.nn.functional as F
from torch import nn


def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="none")


def trained_classifier(steps: int = 200) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, x, y)``: an 8-16-3 ReLU classifier trained ``steps`` full-batch Adam steps (lr 1e-2) on 256
    seeded records (also benchmarks/dd58_pickled_metric.py's and tests/test_metric.py's)."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strong", action="store_true", help="LOSS_RANKS_WEAK = False (the bound method)")
    args = ap.parse_args()
    import mis_lightning as ml
    E = importlib.import_module("mis_lightning.estimation.estimate")
    E.LOSS_RANKS_WEAK = not args.strong
    model, x, y = trained_classifier()

    def make():
        m = ml.MISIndicator(model, loss, ["rtn_int8"], estimation="diagonal", hessian="ggn")
        for i in range(0, 256, 64):
            m.update(x[i:i + 64], y[i:i + 64])
        return m

    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

    print("plain", make().accumulator.loss_directions())
    gc.disable()
    m = make()
    c = m.clone()
    del m
    print("clone(), original dropped", c.accumulator.loss_directions())
    m = make()
    d = copy.deepcopy(m)
    del m
    print("copy.deepcopy, original dropped", d.accumulator.loss_directions())
    m = make()
    p = pickle.loads(pickle.dumps(m))
    del m
    print("pickle, original dropped", p.accumulator.loss_directions())
    o = Owner()
    o.metric = make()
    o2 = copy.deepcopy(o)
    del o
    print("deepcopy of a module owning the Metric", o2.metric.accumulator.loss_directions())
    acc = make().accumulator
    print("the accumulator held alone (Metric dropped)", acc.loss_directions())
    gc.enable()
    acc = make().accumulator
    twin = copy.copy(acc)  # shares every sum and the sample with the original: not a copy to use apart
    del acc
    gc.collect()  # (the Metric that held the original sits in a cycle of its own)
    try:
        print("copy.copy of the accumulator, unmeasured, original dropped", twin.loss_directions())
    except RuntimeError as exc:
        print("copy.copy of the accumulator, unmeasured, original dropped: RuntimeError:", exc)


if __name__ == "__main__":
    main()
