"""End-to-end ``assess`` of a small trained MLP held in float32, bfloat16 or float16: the
report's figure per scheme, to compare a change's effect on low-precision models (qx28's quotient
grids, bf29's stored-weight cells; docs/validation.md) between two checkouts.

The model: MLP 32-64-1 (tanh), n = 512 records (y = sum of the first 3 features + 0.3 noise),
200 full-batch Adam steps at lr 1e-2 in float32, then cast to ``--dtype``; batches of 64; squared
error computed in float32; ``assess`` with the default options. Prints each scheme's leakage,
MIS and interval and the call's CPU time; ``--report`` writes the report JSON (compare two
checkouts' with ``benchmarks/compare_reports.py``). Runtime: 5-30 s CPU per dtype.

    python benchmarks/lowp_endtoend.py --dtype bfloat16 --report bf16_new.json
    python benchmarks/lowp_endtoend.py --dtype bfloat16 --root /path/to/old-checkout --report bf16_old.json
    python benchmarks/compare_reports.py bf16_old.json bf16_new.json

(bf29 ran the first list below, qx28 the five intx / int8 schemes of ``--schemes QX28``.)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

BF29_SCHEMES = [
    "intx_weight_only_int8_g32", "intx_weight_only_int4_g32", "rtn_int8", "rtn_int4", "float8_weight_only",
    "native_int8_per_row", "intx_weight_only_int4", "intx_weight_only_int8_g32_asym", "int8_weight_only",
]
QX28_SCHEMES = ["intx_weight_only_int8_g32", "intx_weight_only_int4_g32", "intx_weight_only_int4",
                "intx_weight_only_int8_g32_asym", "int8_weight_only"]


def trained_model(dtype: torch.dtype, n: int = 512, width: int = 64):
    """The MLP, its batches (in ``dtype``) and the loss (float32), as the sessions built them."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    y = x[:, :3].sum(1, keepdim=True) + 0.3 * torch.randn(n, 1, generator=g)
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    model = model.to(dtype)
    loader = [(x[i:i + 64].to(dtype), y[i:i + 64].to(dtype)) for i in range(0, n, 64)]

    def loss(out, t):
        return ((out.float() - t.float()) ** 2).sum(-1)

    return model, loader, loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--schemes", nargs="+", default=BF29_SCHEMES, help="scheme names, or QX28 for qx28's five")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout whose mis_lightning is measured (default: this file's)")
    ap.add_argument("--report", type=Path, default=None, help="write the report JSON here")
    args = ap.parse_args(argv)
    schemes = QX28_SCHEMES if args.schemes == ["QX28"] else args.schemes
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(args.root.resolve()))
    import mis_lightning
    from mis_lightning import assess

    model, loader, loss = trained_model(getattr(torch, args.dtype), args.n, args.width)
    c0 = time.process_time()
    rep = assess(model, schemes, loader, loss)
    cpu = time.process_time() - c0
    print(f"{mis_lightning.__file__}: {args.dtype}, {len(schemes)} schemes, assess {cpu:.1f} s CPU")
    for k, v in rep.schemes.items():
        print(f"  {k:<34} leakage {v.leakage!r:<22} mis {v.mis!r:<22} interval {v.interval} error {v.error}")
    if args.report:
        args.report.write_text(rep.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
