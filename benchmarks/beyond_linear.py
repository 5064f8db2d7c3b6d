"""``assess`` beyond nn.Linear: cost in training epochs and quantized share on a ~1e5-parameter
CNN and a ~1e5-parameter Transformer (one encoder layer + embedding + head).

In one process, per model:

* the mean wall time of one epoch of Adam training on the training set (after one warm-up
  epoch, which also brings the model near a minimum);
* the wall time of ``assess(model, SCHEMES, train_loader, loss_fn, val_dataloader=val)``
  with every option at its default (estimator chosen by ``"auto"``), after one warm-up call
  on a small subset (imports, first-call set-up);
* the estimation pass alone (``run_estimation``, the first half of ``assess``);
* wall and process CPU time of each (CPU time does not count other jobs' time on a shared
  machine; with 1 thread it is the compute);
* the scoring half alone (``assess`` CPU time minus the estimation pass's; it includes a
  one-time ``torch.compile`` of the cell-moment kernel where the compile policy takes it,
  ``MIS_LIGHTNING_COMPILE``);
* the ratio assess / epoch, and per scheme ``quantized_fraction`` (share of assessed weights
  quantized) and the methods line of the report.

The epochs, the estimation pass and ``assess`` are timed in ``--repeats`` interleaved rounds (default
3) and each figure is the median over the rounds: on a shared machine one pair of timings moved by
1.5x between identical runs.

    python benchmarks/beyond_linear.py                  # both models, 2 threads
    python benchmarks/beyond_linear.py --models cnn --threads 2 --json out.json
    python benchmarks/beyond_linear.py --n 1024 --threads 1 --uncertainty-draws 0  # no (p10, p90) interval
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMES = ["int8_weight_only", "intx_weight_only_int4"]  # int8 and int4, per channel


def build(kind: str, n: int, seed: int = 0):
    """``(model, train dataset, val dataset, loss_fn)`` for ``"cnn"`` or ``"transformer"``."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "cnn":
        # 3x16x16 images, 10 classes: 3 conv blocks (Conv2d + BatchNorm2d) and a Linear head
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
        x = torch.randn(n + 256, 3, 16, 16, generator=g)
        y = (x[:, 0, :8].mean((1, 2)) > 0).long() * 5 + (x[:, 1].mean((1, 2)) * 20).long().clamp(-2, 2) + 2
    else:
        V, T, D = 1000, 16, 64

        class Tiny(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(V, D)
                self.enc = nn.TransformerEncoderLayer(D, 4, 128, dropout=0.0, batch_first=True)
                self.head = nn.Linear(D, 4)

            def forward(self, tok):
                return self.head(self.enc(self.emb(tok)).mean(1))

        model = Tiny()
        x = torch.randint(0, V, (n + 256, T), generator=g)
        y = (x[:, 0] % 4)
    ds = TensorDataset(x[:n], y[:n])
    val = TensorDataset(x[n:], y[n:])

    def ce(out, t):
        return F.cross_entropy(out, t, reduction="none")

    return model, ds, val, ce


def epoch(model, loader, loss_fn, opt, cpu: bool = False) -> float:
    """One training epoch; its wall time in seconds (``cpu``: the process's CPU time)."""
    clock = time.process_time if cpu else time.perf_counter
    t = clock()
    model.train()
    for xb, yb in loader:
        opt.zero_grad()
        loss_fn(model(xb), yb).mean().backward()
        opt.step()
    model.eval()
    return clock() - t


def timed(fn, *args, **kwargs):
    """``(result, wall seconds, process CPU seconds)`` of one call."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t, time.process_time() - c


def run(kind: str, n: int, batch: int, epochs: int, options: dict | None = None, repeats: int = 3) -> dict:
    import statistics

    import torch
    from torch.utils.data import DataLoader, Subset

    import mis_lightning as ml
    from mis_lightning.assess import run_estimation
    from mis_lightning.config import EstimationConfig

    model, ds, val, ce = build(kind, n)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    epoch(model, loader, ce, opt)  # warm-up (and training)
    d = sum(p.numel() for p in model.parameters())
    plain = DataLoader(ds, batch_size=batch)
    vl = DataLoader(val, batch_size=batch)
    ml.assess(model, SCHEMES, DataLoader(Subset(ds, range(2 * batch)), batch_size=batch), ce,
              val_dataloader=vl, num_records=8)  # warm-up: imports, first calls
    # Rounds of (epochs, estimation pass, assess), interleaved so that the machine's load weighs
    # on both sides of each round's ratio alike; the figures are the medians over the rounds (on a
    # shared machine one pair moved 3.95-6.05 for the same code)
    rounds = []
    for _ in range(repeats):
        times = [timed(epoch, model, loader, ce, opt)[1:] for _ in range(epochs)]
        t_epoch = sum(t for t, _ in times) / len(times)
        c_epoch = sum(c for _, c in times) / len(times)
        _, t_est, c_est = timed(run_estimation, model, plain, ce, EstimationConfig())
        rep, t_assess, c_assess = timed(ml.assess, model, SCHEMES, plain, ce, val_dataloader=vl, **(options or {}))
        rounds.append({"epoch_s": t_epoch, "epoch_cpu_s": c_epoch, "estimation_s": t_est, "estimation_cpu_s": c_est,
                       "assess_s": t_assess, "assess_cpu_s": c_assess, "ratio": t_assess / t_epoch,
                       "cpu_ratio": c_assess / c_epoch, "estimation_cpu_ratio": c_est / c_epoch,
                       "scoring_cpu_ratio": (c_assess - c_est) / c_epoch})
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {
        "model": kind, "params": d, "n": n, "batch": batch, "threads": torch.get_num_threads(),
        # medians over the rounds; process CPU time is robust to other jobs on a shared machine
        **med, "rounds": rounds, "options": options or {},
        "estimator": rep.estimation.get("estimator") if isinstance(rep.estimation, dict) else str(rep.estimation),
        "ggn_mc_median_relative_error": rep.diagnostics.get("ggn_mc_median_relative_error"),
        "quantized_fraction": {k: s.quantized_fraction for k, s in rep.schemes.items()},
        "leakage": {k: s.leakage for k, s in rep.schemes.items()},
        "warnings": rep.warnings,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "transformer"])
    ap.add_argument("--n", type=int, default=4096, help="training records")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="timed training epochs (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of (epochs, estimation, assess), interleaved; the figures are their medians")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--uncertainty-draws", type=int, default=None,
                    help="assess's uncertainty_draws (default: the library's)")
    ap.add_argument("--hessian", type=str, default=None, help="assess's hessian (default: 'auto')")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = []
    for kind in args.models:
        opts = {k: v for k, v in (("uncertainty_draws", args.uncertainty_draws), ("hessian", args.hessian))
                if v is not None}
        r = run(kind, args.n, args.batch, args.epochs, opts, repeats=args.repeats)
        out.append(r)
        qf = ", ".join(f"{k} {v:.3f}" for k, v in r["quantized_fraction"].items())
        print(f"{kind}: {r['params']:,} parameters, n = {r['n']}, batch {r['batch']}, {r['threads']} threads, "
              f"medians of {len(r['rounds'])} rounds (CPU ratios "
              f"{' / '.join(format(x['cpu_ratio'], '.2f') for x in r['rounds'])}): "
              f"epoch {r['epoch_s']:.2f} s, assess {r['assess_s']:.2f} s, ratio {r['ratio']:.2f} epochs; "
              f"CPU time: epoch {r['epoch_cpu_s']:.2f} s, assess {r['assess_cpu_s']:.2f} s, ratio "
              f"{r['cpu_ratio']:.2f} epochs (estimation pass alone {r['estimation_cpu_ratio']:.2f}, scoring "
              f"{r['scoring_cpu_ratio']:.2f}); "
              f"quantized_fraction: {qf}", flush=True)
        print(f"  estimator: {r['estimator']}" + (f" (Monte Carlo median relative error "
              f"{r['ggn_mc_median_relative_error']:.3g})" if r["ggn_mc_median_relative_error"] is not None else ""))
        for w in r["warnings"]:
            print(f"  warning: {w}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
