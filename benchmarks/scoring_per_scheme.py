"""Scoring cost of each scheme on its own (issue 13): ``score_schemes(est, model, [scheme])``
on the benchmark MLPs of ``assess_speed.ARCH`` (n = 4096, batch 256, 3 Adam epochs), one
estimate shared by every scheme, in one process.

The compiled cell-moment kernel is warmed up before the timings (``--compile always``: the
one-time ``torch.compile``, ~8 s on this machine, is reported apart), so that each scheme's
figure is its steady-state cost; ``--compile never`` times the eager kernel. Each scheme is
timed ``--repeats`` times (median of the wall and of the process's CPU time: on a shared
machine the CPU time is the figure to compare), with the default scoring options (16
bootstrap draws).
``--root`` imports ``mis_lightning`` from another checkout (a before/after comparison on the
same machine, in the same conditions):

    python benchmarks/scoring_per_scheme.py --size 1e6
    python benchmarks/scoring_per_scheme.py --size 1e6 --root /path/to/older/checkout
    python benchmarks/scoring_per_scheme.py --size 1e5 --compile never --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCHEMES = ["int8_weight_only", "int8_dynamic_activation_int8_weight", "intx_weight_only_int4",
           "intx_weight_only_int4_g32", "float8_weight_only", "bf16", "fp16"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1e6", help="a key of benchmarks/assess_speed.py's ARCH")
    ap.add_argument("--schemes", nargs="+", default=SCHEMES)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", choices=["always", "never", "auto"], default="always")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose mis_lightning is timed")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.assess_speed import trained_mlp  # the same models as scale.py

    sys.path.insert(0, str(args.root.resolve()))
    for mod in [m for m in sys.modules if m == "mis_lightning" or m.startswith("mis_lightning.")]:
        del sys.modules[mod]
    import torch

    import mis_lightning
    from mis_lightning import functional as F
    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.config import stage_configs

    torch.set_num_threads(args.threads)
    model, loader, loss_fn = trained_mlp(args.size, 4096)
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    sc_cfg = dataclasses.replace(sc_cfg, compile=args.compile)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    t0 = time.perf_counter()
    compiled = args.compile == "always" and F.warm_up_compiled_kernel(F.CompilePolicy("always"), 1 << 30)
    t_compile = time.perf_counter() - t0
    rows = []
    for name in args.schemes:
        times, cpu, err = [], [], None
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                rep = score_schemes(est, model, [name], scoring_config=sc_cfg)
            except Exception as exc:  # noqa: BLE001 - a scheme this machine cannot run is reported
                err = f"{type(exc).__name__}: {exc}"
                break
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            res = rep.schemes.get(name)
            if res is not None and getattr(res, "error", None):
                err = str(res.error)
        rows.append({"scheme": name, "seconds": statistics.median(times) if times else None,
                     "cpu_seconds": statistics.median(cpu) if cpu else None,
                     "us_per_weight": statistics.median(times) / est.d * 1e6 if times else None, "error": err})
    out = {"size": args.size, "d": est.d, "threads": args.threads, "compile": args.compile,
           "compile_s": t_compile if compiled else None, "root": str(args.root.resolve()),
           "version": getattr(mis_lightning, "__version__", "?"), "rows": rows}
    print(f"{args.size}: d = {est.d:,}, {args.threads} thread(s), compile {args.compile}"
          + (f" (warm-up {t_compile:.1f} s)" if compiled else "") + f", root {out['root']}")
    for r in rows:
        fig = "failed: " + r["error"][:80] if r["seconds"] is None else (
            f"{r['seconds']:.2f} s ({r['us_per_weight']:.2f} us/weight), CPU {r['cpu_seconds']:.2f} s")
        print(f"  {r['scheme']:<40} {fig}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
