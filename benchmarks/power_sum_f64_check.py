"""The float32 power sums of one scoring call against float64 sums of the same calls, with a
float32 layout switch on and off (ps36: ``SKINNY_GEMM_TRANSPOSED``, the skinny GEMMs taken
transposed; method.md section 3, "Power sums in float32"). Every outermost ``factored_power_sums``
call that takes the float32 path (a weight, power 2 or 4, columns ``A >= 0``) of one
``score_schemes`` call on the benchmark MLP (``SIZE``: 1e5, 1e6, ...; scale.py's model) or a model
saved by ``first_call.py train`` (``PATH.pt``) is summed three times: the switch on, off, and in
float64 (``POWER_SUMS_F32`` empty). Per parameter and power: the calls, the largest relative
error of each float32 way against float64 (the bound admits ``POWER_SUMS_F32_RTOL`` = 1e-4), the
largest difference between the two ways, and the records summed again in float64 by each.

    python benchmarks/power_sum_f64_check.py /tmp/m1e7.pt
    python benchmarks/power_sum_f64_check.py 1e5 --switch estimation.linear_factors.SKINNY_GEMM_TRANSPOSED
"""

from __future__ import annotations

import collections
import importlib
import os
import sys

import torch

sys.path.insert(0, os.getcwd())  # the checkout under test first


def main(argv: list[str]) -> int:
    import argparse

    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.config import stage_configs
    from mis_lightning.estimation import linear_factors as LF

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="SIZE (1e5, 1e6, ...) or a model saved by first_call.py train (PATH.pt)")
    ap.add_argument("--switch", default="estimation.linear_factors.SKINNY_GEMM_TRANSPOSED", metavar="MODULE.FLAG",
                    help="the boolean switch compared on and off (default ps36's)")
    args = ap.parse_args(argv)
    AS = importlib.import_module("mis_lightning.assess")
    mod, _, attr = args.switch.rpartition(".")
    sw = importlib.import_module("mis_lightning." + mod)
    if not isinstance(getattr(sw, attr), bool):
        raise SystemExit(f"--switch {args.switch}: not a boolean switch")
    torch.set_num_threads(1)
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    if args.src.endswith(".pt"):
        from benchmarks.first_call import load_saved

        _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(args.src)
    else:
        from benchmarks.assess_speed import trained_mlp

        model, loader, loss_fn = trained_mlp(args.src, 4096)
    est = AS.run_estimation(model, loader, loss_fn, est_cfg)
    real = LF.factored_power_sums
    depth = [0]
    # (param, power) -> [calls, err on, err off, |on - off|, float64 records on, off]
    res: dict[tuple[str, int], list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0, 0])

    def counted(on: bool, fac, gm, vd, A, power, cache):
        setattr(sw, attr, on)
        before = LF.POWER_SUMS_F32_COUNTS[(power, "float64")]
        got = real(fac, gm, vd, A, power, False, cache)
        return got, LF.POWER_SUMS_F32_COUNTS[(power, "float64")] - before

    def checked(fac, g_mean, v_diag, A, power, bias=False, cache=None):
        depth[0] += 1
        try:
            if depth[0] > 1 or bias or power not in LF.POWER_SUMS_F32 or not bool(A.amin() >= 0):
                return real(fac, g_mean, v_diag, A, power, bias, cache)
            was = getattr(sw, attr)
            on, n_on = counted(True, fac, g_mean, v_diag, A, power, cache)
            off, n_off = counted(False, fac, g_mean, v_diag, A, power, cache)
            setattr(sw, attr, was)
            keep, LF.POWER_SUMS_F32 = LF.POWER_SUMS_F32, frozenset()
            try:
                f64 = real(fac, g_mean, v_diag, A, power, False, cache)
            finally:
                LF.POWER_SUMS_F32 = keep
            den = f64.abs().clamp_min(1e-300)
            r = res[(fac.weight, power)]
            r[0] += 1
            r[1] = max(r[1], float(((on - f64).abs() / den).max()))
            r[2] = max(r[2], float(((off - f64).abs() / den).max()))
            r[3] = max(r[3], float(((on - off).abs() / den).max()))
            r[4] += n_on
            r[5] += n_off
            return on if was else off
        finally:
            depth[0] -= 1

    LF.factored_power_sums = checked
    AS.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
    print(f"switch {args.switch}; max relative error against float64 (bound admits {LF.POWER_SUMS_F32_RTOL:g})")
    print("param power | calls | on | off | on - off | float64 records on / off")
    for (name, p), (n, e_on, e_off, d, b_on, b_off) in sorted(res.items()):
        print(f"{name} {p} | {n} | {e_on:.2e} | {e_off:.2e} | {d:.2e} | {b_on} / {b_off}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
