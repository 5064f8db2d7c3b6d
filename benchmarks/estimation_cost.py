"""The estimation pass alone, in training epochs: an MLP of ~1e7 weights (issue 13: at most
2 Adam epochs at n = 4096) and the ~1e5-parameter CNN and Transformer of
``benchmarks/beyond_linear.py``.

In one process per model: the mean wall time of one Adam epoch (after a warm-up epoch), then
``estimate(model, loader, loss_fn)`` with every option at its default (the estimator chosen by
``"auto"``, as ``assess`` runs it), after a warm-up call on two batches; the ratio.

    python benchmarks/estimation_cost.py                        # mlp1e7, 1 thread
    python benchmarks/estimation_cost.py --models cnn transformer --n 2048 --batch 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build(kind: str, n: int):
    """``(model, train dataset, per-sample loss)``."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    if kind == "mlp1e7":  # the 1e7 MLP of benchmarks/assess_speed.py: 1024 -> 2048 -> 4096 -> 1
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 1))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1024, generator=g)
        y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n, generator=g)

        def mse(o, t):
            return (o.squeeze(-1) - t) ** 2

        return model, TensorDataset(x, y), mse
    from beyond_linear import build as build_beyond

    model, ds, _, ce = build_beyond(kind, n)

    def ce_loss(o, t):
        return F.cross_entropy(o, t, reduction="none")

    return model, ds, ce_loss


def run(kind: str, n: int, batch: int, epochs: int) -> dict:
    import torch
    from beyond_linear import epoch, timed
    from torch.utils.data import DataLoader, Subset

    from mis_lightning.estimation import estimate

    model, ds, loss = build(kind, n)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch(model, loader, loss, opt)  # warm-up
    times = [timed(epoch, model, loader, loss, opt)[1:] for _ in range(epochs)]
    t_epoch, c_epoch = (sum(t[i] for t in times) / epochs for i in (0, 1))
    model.eval()
    estimate(model, DataLoader(Subset(ds, range(2 * batch)), batch_size=batch), loss, num_records=8)
    est, t_est, c_est = timed(estimate, model, DataLoader(ds, batch_size=batch), loss)
    return {"model": kind, "params": sum(p.numel() for p in model.parameters()), "n": n, "batch": batch,
            "threads": torch.get_num_threads(), "epoch_s": t_epoch, "estimation_s": t_est,
            "ratio": t_est / t_epoch, "epoch_cpu_s": c_epoch, "estimation_cpu_s": c_est,
            "cpu_ratio": c_est / c_epoch, "estimator": est.estimator, "reason": est.reason}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp1e7"])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1, help="timed training epochs (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = []
    for kind in args.models:
        r = run(kind, args.n, args.batch, args.epochs)
        out.append(r)
        print(f"{kind}: {r['params']:,} parameters, n = {r['n']}, batch {r['batch']}, {r['threads']} thread(s): "
              f"epoch {r['epoch_s']:.2f} s, estimation {r['estimation_s']:.2f} s, ratio {r['ratio']:.2f} epochs; "
              f"CPU time: epoch {r['epoch_cpu_s']:.2f} s, estimation {r['estimation_cpu_s']:.2f} s, "
              f"ratio {r['cpu_ratio']:.2f} epochs "
              f"({r['estimator']}; {r['reason']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
