"""Scale of ``assess`` against the cost of training (issue 13): MLPs of 1e5 to 1e8 weights.

Per model size, in a fresh subprocess (so that its peak RSS is its own):

* one Adam epoch over the same records and batches (n = 4096, batch 256; best of epochs 2-3),
  the unit every other figure is given in;
* the estimation pass (``run_estimation`` with the default options) and the scoring of the
  schemes (``score_schemes`` with the default options: 16 bootstrap draws, auto method),
  in seconds and in Adam epochs, measured in the SAME process, back to back;
* the peak RSS of the process (``ru_maxrss``, MiB) and bytes per weight.

    python benchmarks/scale.py --sizes 1e5 1e6 1e7                # 8 common schemes
    python benchmarks/scale.py --sizes 1e7 3e7 --memory-only --schemes int8_weight_only \\
        int8_dynamic_activation_int8_weight intx_weight_only_int4 int4_weight_only_tinygemm
    python benchmarks/scale.py --json out.json

``--memory-only`` skips the Adam epochs (the 1e8 model's epoch alone takes minutes on one
core) and reports times in seconds only. ``--threads`` sets ``torch.set_num_threads`` in the
child; the OpenMP wait policy is whatever the environment says (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.assess_speed import ARCH, mlp  # noqa: E402

COMMON_SCHEMES = [
    "int8_weight_only", "int8_dynamic_activation_int8_weight", "intx_weight_only_int4",
    "int4_weight_only_tinygemm", "intx_weight_only_int4_g32", "float8_weight_only", "bf16", "fp16",
]


def run_one(size: str, n: int, batch: int, schemes: list[str], threads: int, memory_only: bool) -> dict:
    import torch

    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.config import stage_configs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, F = mlp(size)
    d = sum(p.numel() for p in model.parameters())
    x = torch.randn(n, F)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)

    def loss_fn(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs = []
    for _ in range(1 if memory_only else 3):
        t0 = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
        epochs.append(time.perf_counter() - t0)
    del opt
    epoch = min(epochs[1:]) if len(epochs) > 1 else epochs[0]
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    est = run_estimation(model, loader, loss_fn, est_cfg)
    est_s = time.perf_counter() - t0
    rss_est = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    rep = score_schemes(est, model, schemes, scoring_config=sc_cfg)
    score_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB (Linux: KiB)
    return {
        "size": size, "params": d, "n": n, "batch": batch, "threads": threads, "schemes": schemes,
        "epoch_adam_s": epoch, "estimation_s": est_s, "scoring_s": score_s,
        "estimation_epochs": est_s / epoch, "scoring_epochs": score_s / epoch,
        "total_epochs": (est_s + score_s) / epoch,
        "peak_rss_mib": peak, "rss_before_estimation_mib": rss0, "rss_after_estimation_mib": rss_est,
        "bytes_per_weight": peak * 2**20 / d, "estimator": est.estimator,
        "influence_stored": est.influence_stored, "factored": est.factors is not None,
        "load_avg": os.getloadavg(),
        "results": {k: {"leakage": v.leakage, "interval": v.interval, "method": v.method, "error": v.error}
                    for k, v in rep.schemes.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1e5", "1e6", "1e7"], choices=list(ARCH))
    ap.add_argument("--n", type=int, default=4096, help="training records")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schemes", nargs="+", default=COMMON_SCHEMES)
    ap.add_argument("--memory-only", action="store_true", help="one warm-up epoch only (large sizes)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        r = run_one(args.one, args.n, args.batch, args.schemes, args.threads, args.memory_only)
        print(json.dumps(r))
        return 0
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", size, "--n", str(args.n), "--batch", str(args.batch),
               "--threads", str(args.threads), "--schemes", *args.schemes]
        if args.memory_only:
            cmd.append("--memory-only")
        t0 = time.perf_counter()
        p = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{size}: failed ({p.returncode})\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["wall_s"] = time.perf_counter() - t0
        rows.append(r)
        print(f"{size}: d={r['params']:,} epoch {r['epoch_adam_s']:.3f}s | estimation {r['estimation_s']:.1f}s "
              f"= {r['estimation_epochs']:.1f} ep | scoring {len(r['schemes'])} schemes {r['scoring_s']:.1f}s "
              f"= {r['scoring_epochs']:.1f} ep | total {r['total_epochs']:.1f} ep | peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB ({r['bytes_per_weight']:.0f} B/weight) | load {r['load_avg'][0]:.1f}",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
