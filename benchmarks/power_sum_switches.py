"""pw34's switches A/B in one process: ``score_schemes`` alternately with
``assess.JOINT_EXACT_FOURTH`` and ``linear_factors.F32_ON_LIVE_ROWS`` off (the power sums'
arithmetic before pw34) and on, on the benchmark MLP of scale.py (``SIZE``: 1e5, 1e6, ...;
trained 3 Adam epochs, as scale.py) or a model saved by ``first_call.py train`` (``PATH.pt``).
One warm-up call (one-time costs), then ``PAIRS`` pairs; per call the CPU time (one thread) and
the CPU time inside the outermost ``factored_power_sums`` calls (every power sum of the call,
the exact fourth-power sums included). The first pair's reports go to ``PREFIX_old.json`` and
``PREFIX_new.json`` (``benchmarks/compare_reports.py``: which fields moved, by how much).

    python benchmarks/power_sum_switches.py 1e5 /tmp/sw [PAIRS]
    python benchmarks/power_sum_switches.py /tmp/m1e7.pt /tmp/sw [PAIRS]
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())  # the checkout under test first


def main(argv: list[str]) -> int:
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.config import stage_configs
    from mis_lightning.estimation import linear_factors as LF

    AS = importlib.import_module("mis_lightning.assess")
    src, out = argv[0], argv[1]
    pairs = int(argv[2]) if len(argv) > 2 else 3
    torch.set_num_threads(1)
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    if src.endswith(".pt"):
        from benchmarks.first_call import load_saved

        _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(src)
    else:
        from benchmarks.assess_speed import trained_mlp

        model, loader, loss_fn = trained_mlp(src, 4096)  # scale.py's model, data and 3 Adam epochs
    est = AS.run_estimation(model, loader, loss_fn, est_cfg)
    real = LF.factored_power_sums
    depth, acc = [0], [0.0]

    def timed(*a, **k):  # outermost calls only (the function recurses over column groups)
        depth[0] += 1
        c0 = time.process_time()
        try:
            return real(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                acc[0] += time.process_time() - c0

    LF.factored_power_sums = timed

    def call(on: bool):
        AS.JOINT_EXACT_FOURTH = LF.F32_ON_LIVE_ROWS = on
        acc[0] = 0.0
        c0 = time.process_time()
        rep = AS.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
        return time.process_time() - c0, acc[0], rep

    call(True)
    res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(pairs):
        for on in (False, True):
            t, ps, rep = call(on)
            res[on].append((t, ps))
            if i == 0:
                with open(f"{out}_{'new' if on else 'old'}.json", "w") as f:
                    f.write(rep.to_json())
            print(f"pair {i} {'new' if on else 'old'}: call {t:.3f} s CPU, power sums {ps:.3f} s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    for on in (False, True):
        ts, ps = sorted(r[0] for r in res[on]), sorted(r[1] for r in res[on])
        print(f"{'new' if on else 'old'}: call min {ts[0]:.3f} median {ts[len(ts) // 2]:.3f} s; "
              f"power sums min {ps[0]:.3f} median {ps[len(ps) // 2]:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
