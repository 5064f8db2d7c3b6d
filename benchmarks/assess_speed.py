"""End-to-end ``assess`` speed on MLPs of 1e5 to 1e7 parameters (diagonal mode, GGN Hessian).

Per model size (each in a fresh subprocess so that peak RSS is its own):

* wall time of ``assess(model, schemes, loader, loss_fn, estimation="diagonal",
  hessian="ggn")`` split into the estimation pass and the scoring of each scheme;
* peak RSS of the process (``resource.getrusage``);
* one epoch of Adam training of the same model on the same data and batch size (the
  reference cost: "the estimation pass costs X epochs").

    python benchmarks/assess_speed.py                       # 1e5, 1e6, 1e7 on CPU
    python benchmarks/assess_speed.py --sizes 1e5 --device cuda
    python benchmarks/assess_speed.py --json out.json

The cell-statistics throughput on its own is measured by ``benchmarks/cell_statistics_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# inputs, hidden widths of the ReLU MLPs with ~1e5 ... 1e8 weights (shared by scale.py and
# float_grid_speed.py through :func:`mlp`).
ARCH = {
    "1e4": (64, (96, 32)),
    "1e5": (256, (256, 128)),
    "1e6": (256, (1024, 768)),
    "1e7": (1024, (2048, 4096)),
    "3e7": (2048, (4096, 4096, 1024)),
    "1e8": (2048, (8192, 8192, 2048)),
}


def mlp(size: str):
    """The benchmark MLP of ``size`` (a key of ARCH) and its number of inputs; torch's current seed."""
    from torch import nn

    F, hidden = ARCH[size]
    layers, prev = [], F
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, 1))
    return nn.Sequential(*layers), F


def trained_mlp(size: str, n: int, epochs: int = 3, batch: int = 256, seed: int = 0):
    """``(model, loader, loss_fn)``: the benchmark MLP of ``size`` trained with Adam (lr 1e-3)
    for ``epochs`` on the synthetic regression ``y = sum(x[:8]) / 3 + noise/2`` of ``n`` records
    (batch ``batch``); the optimizer's ``.grad`` dropped, as a trained model is handed over."""
    import torch

    torch.manual_seed(seed)
    model, n_in = mlp(size)
    x = torch.randn(n, n_in)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)

    def loss_fn(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    train_adam(model, loader, loss_fn, epochs)
    return model, loader, loss_fn


def train_adam(model, loader, loss_fn, epochs: int = 3, lr: float = 1e-3) -> None:
    """``epochs`` of Adam on the mean of ``loss_fn`` (per record) over ``loader``, in place;
    the ``.grad`` tensors dropped at the end."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
    opt.zero_grad(set_to_none=True)


def run_one(size: str, n: int, batch: int, device: str, schemes: list[str], threads: int, draws: int = 0) -> dict:
    import torch

    from mis_lightning import assess
    from mis_lightning.quantization import available_schemes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, F = mlp(size)
    model = model.to(device)
    d = sum(p.numel() for p in model.parameters())
    x = torch.randn(n, F, device=device)
    y = (x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n, device=device))
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)

    def loss_fn(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    # one epoch of Adam (the training reference), then a few more to get near a minimum
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    epoch_times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
        sync()
        epoch_times.append(time.perf_counter() - t0)
    epoch = min(epoch_times[1:])  # first epoch includes allocator warm-up
    avail = set(available_schemes())
    use = [s for s in schemes if s in avail]
    sync()
    t0 = time.perf_counter()
    rep = assess(model, use, loader, loss_fn, estimation="diagonal", hessian="ggn", num_records=256,
                 uncertainty_draws=draws, strict=False)
    sync()
    total = time.perf_counter() - t0
    # the estimation pass alone (same call path, no scheme)
    from mis_lightning.estimation import estimate

    sync()
    t0 = time.perf_counter()
    estimate(model, loader, loss_fn, mode="diagonal", hessian="ggn", num_records=256)
    sync()
    est_t = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB (Linux: KiB)
    out = {
        "size": size, "params": d, "n": n, "batch": batch, "device": device, "threads": threads,
        "assess_s": total, "estimation_s": est_t, "scoring_s": total - est_t,
        "epoch_adam_s": epoch, "estimation_over_epoch": est_t / epoch, "assess_over_epoch": total / epoch, "peak_rss_mib": peak,
        "draws": draws, "schemes": {k: {"leakage": v.leakage, "mis": v.mis, "method": v.method, "error": v.error}
                    for k, v in rep.schemes.items()},
        "baseline_leakage": rep.baseline_leakage,
    }
    if device.startswith("cuda"):
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1e5", "1e6", "1e7"], choices=list(ARCH))
    ap.add_argument("--n", type=int, default=2048, help="training records")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schemes", nargs="+", default=["rtn_int8", "rtn_int4", "int8_weight_only", "int4_weight_only"])
    ap.add_argument("--draws", type=int, default=0, help="uncertainty_draws of assess (each ~ one more scoring pass)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.batch, args.device, args.schemes, args.threads, args.draws)))
        return 0
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", size, "--n", str(args.n), "--batch", str(args.batch),
               "--device", args.device, "--threads", str(args.threads), "--draws", str(args.draws),
               "--schemes", *args.schemes]
        p = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{size}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{size}: d={r['params']:,} assess {r['assess_s']:.1f}s = {r['assess_over_epoch']:.1f} Adam epochs (estimation {r['estimation_s']:.1f}s = "
              f"{r['estimation_over_epoch']:.1f} Adam epochs of {r['epoch_adam_s']:.2f}s; scoring "
              f"{r['scoring_s']:.1f}s for {len(r['schemes'])} schemes) peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        if args.json:  # after each size: a partial run keeps what it measured
            args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
