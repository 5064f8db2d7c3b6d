"""``score_schemes`` of ``float8_weight_only`` (and ``bf16``) with the float-format fast path of
this checkout against another checkout's (``--old-root``: its ``functional/table.py``'s
``_table_fast_moments`` patched in), in one process on the same estimate: leakage, MIS,
d_eff and the interval must agree within 1e-6 relative (issue 13's fp8 fast path).

    python benchmarks/fp8_core_endtoend.py --old-root /path/to/checkout-before --size 1e5
    python benchmarks/fp8_core_endtoend.py --old-root PATH --size 1e5 --sigma-ratio 0.1

``--sigma-ratio r`` replaces each weight's sigma by ``r`` x its tensor's weight sd (the settings of
``fp8_core_speed.py``): the estimate's own sigmas put the whole float8 table within a fraction of a
sd, the regimes where the float8 interpolation table (``functional/interp.py``) is used are
sigma ~0.03-3 x the weight sd.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _keywords_it_takes(fn):
    """``fn`` called with only the keyword arguments its signature names: an older checkout's
    ``_table_fast_moments`` lacks ``interpolate`` / ``min_build`` (it always ran its own rules)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn
    return lambda *a, **k: fn(*a, **{key: v for key, v in k.items() if key in params})


def main(argv=None) -> int:
    from benchmarks.assess_speed import trained_mlp
    from benchmarks.fp8_core_speed import _old_table
    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.config import stage_configs
    from mis_lightning.functional import fastpath
    from mis_lightning.functional import table as T

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-root", type=Path, required=True)
    ap.add_argument("--size", default="1e5")
    ap.add_argument("--schemes", nargs="+", default=["float8_weight_only", "bf16"])
    ap.add_argument("--sigma-ratio", type=float, default=None, help="sigma = r x each tensor's weight sd")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    old = _old_table(args.old_root)
    model, loader, loss_fn = trained_mlp(args.size, 4096)
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    est = run_estimation(model, loader, loss_fn, est_cfg)
    if args.sigma_ratio is not None:
        for name, th in est.theta.items():
            if th.numel() > 1:  # a single weight keeps its estimated sigma
                est.sigma[name] = torch.full_like(est.sigma[name], args.sigma_ratio * float(th.double().std()))
    new_fn = T._table_fast_moments
    out = {}
    for label, fn in (("old", _keywords_it_takes(old._table_fast_moments)), ("new", new_fn)):
        T._table_fast_moments = fn
        fastpath.GUARD.disabled.clear()
        try:
            rep = score_schemes(est, model, args.schemes, scoring_config=sc_cfg)
        finally:
            T._table_fast_moments = new_fn
        out[label] = {n: rep.schemes[n] for n in args.schemes}
    worst = 0.0
    print("| scheme | quantity | old | new | relative difference |")
    print("|---|---|---|---|---|")
    for n in args.schemes:
        a, b = out["old"][n], out["new"][n]
        pairs = [("leakage", a.leakage, b.leakage), ("mis", a.mis, b.mis), ("d_eff", a.d_eff, b.d_eff)]
        if a.interval and b.interval:
            pairs += [("interval low", a.interval[0], b.interval[0]), ("interval high", a.interval[1], b.interval[1])]
        for q, x, y in pairs:
            rel = abs(x - y) / max(abs(x), 1e-300)
            worst = max(worst, rel if math.isfinite(rel) else math.inf)
            print(f"| {n} | {q} | {x:.12g} | {y:.12g} | {rel:.1e} |")
    print(f"worst relative difference {worst:.1e} (tolerance 1e-6)")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
