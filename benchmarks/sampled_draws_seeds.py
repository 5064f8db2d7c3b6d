"""The subsampled draws' interval ends against the full evaluation's over scoring seeds, with float64
and float32 normals (``assess.DRAW_NORMALS_FLOAT32``): how far the ends move (share of the width),
and each scheme's ratio to the bound ``tests/test_sampled_draws.py`` reads (``_averaged_ends_bound``:
the draws' centre against ``CENTRE_T sqrt 2`` times the reported sample noise; the ends against what
the centre, the draws' spread and the pad explain). The model and configuration are the test's
(``_diagonal_relu_mlp``: a 64 -> 24 -> 1 MLP, its 1,536-weight first layer sampled, 8 of 24 rows).

    OMP_NUM_THREADS=1 python benchmarks/sampled_draws_seeds.py --seeds 24

Runtime: ~2 s a seed and precision on an idle core (4 scoring calls). docs/benchmarks.md, "p51c".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=24)
    args = ap.parse_args(argv)

    from test_sampled_draws import CENTRE_T, _averaged_ends_bound, _diagonal_relu_mlp

    A = importlib.import_module("mis_lightning.assess")
    model, est, sc_cfg = _diagonal_relu_mlp()
    schemes = ["rtn_int4", "rtn_int2"]
    seen: list[dict] = []
    real_iv = A.F.interval.leakage_interval

    def spy(value: float, record_se: float, n: float, **kw: object) -> object:
        iv = real_iv(value, record_se, n, **kw)
        seen.append({"draws": kw["draws"], "record_se": record_se, "noise": kw.get("draw_noise", 0.0)})
        return iv

    A.F.interval.leakage_interval = spy
    level = 0.8
    print(f"CENTRE_T {CENTRE_T}; per scheme: max over seeds of |end move| / width, of the centre's move / its "
          "allowance, of the end's move / its bound; the bound's share of the width; seeds over 5% of the width")
    for f32 in (False, True):
        A.DRAW_NORMALS_FLOAT32 = f32
        rows: dict[str, list[tuple[float, float, float, float]]] = {s: [] for s in schemes}
        for seed in range(args.seeds):
            cfg = dataclasses.replace(sc_cfg, seed=seed)
            reps, ivs = [], []
            for sample_min in (1 << 40, 1024):
                A.DRAW_SAMPLE_MIN_WEIGHTS, A.DRAW_SAMPLE_MIN_ROWS = sample_min, 16
                seen.clear()
                reps.append(A.score_schemes(est, model, schemes, scoring_config=cfg))
                ivs.append(list(seen))
            for i, s in enumerate(schemes):
                (lo_f, hi_f), (lo_s, hi_s) = reps[0].schemes[s].interval, reps[1].schemes[s].interval
                w = hi_f - lo_f
                dm, allowed, b_lo, b_hi = _averaged_ends_bound(ivs[0][i], ivs[1][i], level)
                move = max(abs(lo_s - lo_f), abs(hi_s - hi_f))
                rows[s].append((move / w, dm / allowed, max(abs(lo_s - lo_f) / b_lo, abs(hi_s - hi_f) / b_hi),
                                max(b_lo, b_hi) / w))
        for s, r in rows.items():
            rms = math.sqrt(sum((x[1] * CENTRE_T) ** 2 for x in r) / len(r))
            print(f"{'float32' if f32 else 'float64'} normals {s:9s} seeds {len(r)}: end move <= {max(x[0] for x in r):.4f} "
                  f"of the width ({sum(x[0] > 0.05 for x in r)} over 5%); centre / allowance <= {max(x[1] for x in r):.3f} "
                  f"(rms of centre / (sqrt 2 noise) {rms:.3f}); end / bound <= {max(x[2] for x in r):.3f}; "
                  f"bound {min(x[3] for x in r):.3f}-{max(x[3] for x in r):.3f} of the width")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
