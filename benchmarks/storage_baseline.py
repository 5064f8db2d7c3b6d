"""The unquantized release of bf16 / fp16 weights on their storage grid (st31): ``assess`` on a small
MLP (32-64-1, n = 512, 200 Adam steps, then cast to ``--dtype``), CPU seconds of the call (median of
``--repeats``, one thread) and each row's headline, independent-form and pool leakage with the
report's baseline. On a bf16 model ``none``, ``bf16`` and ``fp16`` read one figure; on a float32
model the report is that of the parent commit. ``--tree`` runs another checkout of the library
(e.g. the parent commit's, for the cost before).

    python benchmarks/storage_baseline.py --dtype bfloat16
    python benchmarks/storage_baseline.py --dtype bfloat16 --schemes intx_weight_only_int8_g32 rtn_int8 \
        float8_weight_only int8_weight_only --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--schemes", nargs="+", default=["none", "bf16", "fp16", "int8_weight_only"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tree", default=str(ROOT), help="checkout whose mis_lightning is run")
    ap.add_argument("--json", help="write the last report's JSON here")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.tree)
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn

    import mis_lightning
    from mis_lightning import assess

    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 32, generator=g)
    y = X[:, :3].sum(1, keepdim=True) + 0.3 * torch.randn(512, 1, generator=g)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    dt = getattr(torch, args.dtype)
    model = model.to(dt)
    loader = [(X[i:i + 64].to(dt), y[i:i + 64].to(dt)) for i in range(0, 512, 64)]

    def loss(out, t):
        return ((out.float() - t.float()) ** 2).sum(-1)

    cpu, rep = [], None
    for _ in range(args.repeats):
        t0 = time.process_time()
        rep = assess(model, args.schemes, loader, loss)
        cpu.append(time.process_time() - t0)
    assert rep is not None
    print(f"library {Path(mis_lightning.__file__).parent}  dtype {args.dtype}  assess CPU "
          f"{statistics.median(cpu):.2f} s (median of {args.repeats}: {', '.join(f'{c:.2f}' for c in cpu)})")
    print(f"baseline {rep.baseline_leakage:.12f}  pool {rep.baseline_pool_leakage:.12f}")
    for name, r in rep.schemes.items():
        print(f"{name:28s} leakage {r.leakage:.12f}  independent {r.leakage_independent}  pool {r.pool_leakage:.12f}"
              f"  d_eff {r.d_eff:.6f} / {r.d}")
    if args.json:
        Path(args.json).write_text(json.dumps(json.loads(rep.to_json()), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
