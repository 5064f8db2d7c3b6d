"""The exact sandwich with the Gauss-Newton Hessian (``estimation="exact", hessian="ggn"``)
and what ``"auto"`` runs (gn28: the exact sandwich with the Hessian as Gauss-Newton + residual,
``hessian="ggn_residual"``; before: the diagonal sandwich) against the exact-Hessian sandwich
(``estimation="exact"``, the reference) and the diagonal sandwich (``estimation="diagonal"``) on
``examples/cnn_callback.py``'s CNN (396 assessed weights, 4 classes) or, with ``--model cnn10``,
a second CNN (two Conv2d + ReLU + MaxPool2d blocks on 12x12 inputs and a Linear head to 10
classes, 1,066 weights): each scheme's leakage and the estimation pass's CPU time
(``time.process_time``, one process, run with one thread).

Training: ``adam`` is the example's (12 epochs of Adam, batches of 128, no weight decay);
``lbfgs`` is full-batch L-BFGS (5 steps of 200 iterations, eval mode) on
``mean CE + 5e-4 |theta|^2``, passed as ``weight_decay=1e-3`` (near the minimum the analysis
assumes). docs/validation.md "The exact sandwich with the Gauss-Newton Hessian on a CNN", "CNNs get the exact sandwich by default" hold the figures.

    OMP_NUM_THREADS=1 python benchmarks/ggn_exact_sandwich.py --n 4096 --train adam
    OMP_NUM_THREADS=1 python benchmarks/ggn_exact_sandwich.py --n 4096 --train lbfgs
    OMP_NUM_THREADS=1 python benchmarks/ggn_exact_sandwich.py --model cnn10 --n 1024 --train adam
    OMP_NUM_THREADS=1 python benchmarks/ggn_exact_sandwich.py --model cnn10 --n 1024 --train lbfgs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "rtn_int4"]
VARIANTS = {"diagonal": dict(estimation="diagonal"), "ggn": dict(estimation="exact", hessian="ggn"),
            "auto": dict(estimation="auto"), "exact": dict(estimation="exact")}
WD = 1e-3


def cnn10():
    """The second CNN: 1x12x12 -> Conv2d(1, 4, 3) ReLU MaxPool -> Conv2d(4, 8, 3) ReLU MaxPool
    -> Linear(72, 10) (1,066 weights)."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(72, 10))


def data10(n: int, seed: int = 0):
    """``n`` records ``1x12x12`` (smoothed noise), 10 classes: the argmax of 10 fixed random
    linear read-outs of the image plus noise (learnable only in part: residuals at the minimum)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 1, 14, 14, generator=g), 3, stride=1)
    w = torch.randn(10, 144, generator=g)
    y = (x.reshape(n, -1) @ w.T + 2.0 * torch.randn(n, 10, generator=g)).argmax(1)
    return TensorDataset(x, y)


def trained(n: int, train: str, model_name: str = "example"):
    """``(model in eval mode, dataset, weight_decay to assess with)``."""
    import torch
    import torch.nn.functional as F
    from cnn_callback import SmallCNN, data
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model, ds = (SmallCNN(), data(n)) if model_name == "example" else (cnn10(), data10(n))
    if train == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(12):
            for x, y in DataLoader(ds, batch_size=128, shuffle=True, generator=g):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return model.eval(), ds, 0.0
    model.eval()  # the objective the released model is assessed on (BatchNorm's running statistics)
    X, Y = ds.tensors
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=200, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y) + 0.5 * WD * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model, ds, WD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--train", choices=["adam", "lbfgs"], default="adam")
    ap.add_argument("--model", choices=["example", "cnn10"], default="example")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = ap.parse_args()
    from cnn_callback import per_sample_loss
    from torch.utils.data import DataLoader

    from mis_lightning import score_schemes
    from mis_lightning.estimation import estimate

    model, ds, wd = trained(args.n, args.train, args.model)
    out = {}
    for v in args.variants:
        kw = VARIANTS[v]
        opts = {("mode" if k == "estimation" else k): val for k, val in kw.items()}
        t0 = time.process_time()
        est = estimate(model, DataLoader(ds, batch_size=128), per_sample_loss, weight_decay=wd, **opts)
        cpu = time.process_time() - t0
        with warnings.catch_warnings():  # assess = this estimate + score_schemes (same figures)
            warnings.simplefilter("ignore")
            rep = score_schemes(est, model, SCHEMES, uncertainty_draws=0)
        row = {s: round(rep.schemes[s].leakage, 5) for s in SCHEMES}
        row.update(baseline=round(rep.baseline_leakage, 5), estimation_cpu_s=round(cpu, 2),
                   estimator=rep.estimation["estimator"],
                   vif_warning=any("variance inflation" in w for w in rep.warnings))
        out[v] = row
        print(v, json.dumps(row), flush=True)
    if "exact" in out:
        for v, row in out.items():
            rel = {s: f"{(row[s] / out['exact'][s] - 1) * 100:+.1f}%" for s in SCHEMES + ["baseline"]}
            print(f"{v:>9} vs exact: {rel}  estimation {row['estimation_cpu_s']} s CPU")


if __name__ == "__main__":
    main()
