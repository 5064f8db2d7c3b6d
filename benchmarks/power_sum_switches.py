"""Power-sum switches A/B in one process: ``score_schemes`` alternately with the switches off
(by default pw34's ``assess.JOINT_EXACT_FOURTH`` and ``estimation.linear_factors.F32_ON_LIVE_ROWS``:
the power sums' arithmetic before pw34; ``--switch MODULE.FLAG``, repeatable, others) and on, on the
benchmark MLP of scale.py (``SIZE``: 1e5, 1e6, ...; trained 3 Adam epochs, as scale.py) or a model
saved by ``first_call.py train`` (``PATH.pt``).
One warm-up call (one-time costs), then ``PAIRS`` pairs; per call the CPU time (one thread) and
the CPU time inside the outermost ``factored_power_sums`` calls (every power sum of the call,
the exact fourth-power sums included), and inside ``assess._distinct_list_sums`` (the main and pool
columns' sums with their stacking) and ``assess._joint_draw_sums`` (the draws' sums). The first
pair's reports go to ``PREFIX_old.json`` and ``PREFIX_new.json``
(``benchmarks/compare_reports.py``: which fields moved, by how much).

    python benchmarks/power_sum_switches.py 1e5 /tmp/sw [PAIRS]
    python benchmarks/power_sum_switches.py /tmp/m1e7.pt /tmp/sw [PAIRS]
    python benchmarks/power_sum_switches.py /tmp/m1e7.pt /tmp/sw 2 --switch assess.JOINT_DRAW_NONZERO_COLUMNS \
        --switch estimation.linear_factors.PACK_ZERO_BLOCKS     # ps35's switches
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())  # the checkout under test first


def main(argv: list[str]) -> int:
    import argparse

    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.config import stage_configs
    from mis_lightning.estimation import linear_factors as LF

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="SIZE (1e5, 1e6, ...) or a model saved by first_call.py train (PATH.pt)")
    ap.add_argument("out", help="PREFIX of the first pair's reports")
    ap.add_argument("pairs", nargs="?", type=int, default=3)
    ap.add_argument("--switch", action="append", default=None, metavar="MODULE.FLAG",
                    help="mis_lightning.MODULE.FLAG off in the old calls (repeatable; default pw34's two)")
    args = ap.parse_args(argv)
    AS = importlib.import_module("mis_lightning.assess")
    switches = []
    for flag in args.switch or ["assess.JOINT_EXACT_FOURTH", "estimation.linear_factors.F32_ON_LIVE_ROWS"]:
        mod, _, attr = flag.rpartition(".")
        m = importlib.import_module("mis_lightning." + mod)
        if not isinstance(getattr(m, attr), bool):
            raise SystemExit(f"--switch {flag}: not a boolean switch")
        switches.append((m, attr))
    src, out, pairs = args.src, args.out, args.pairs
    torch.set_num_threads(1)
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    if src.endswith(".pt"):
        from benchmarks.first_call import load_saved

        _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(src)
    else:
        from benchmarks.assess_speed import trained_mlp

        model, loader, loss_fn = trained_mlp(src, 4096)  # scale.py's model, data and 3 Adam epochs
    est = AS.run_estimation(model, loader, loss_fn, est_cfg)
    acc = {"power sums": 0.0, "_distinct_list_sums": 0.0, "_joint_draw_sums": 0.0}

    def timer(real, key):
        depth = [0]

        def timed(*a, **k):  # outermost calls only (factored_power_sums recurses over column groups)
            depth[0] += 1
            c0 = time.process_time()
            try:
                return real(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    acc[key] += time.process_time() - c0
        return timed

    LF.factored_power_sums = timer(LF.factored_power_sums, "power sums")
    for name in ("_distinct_list_sums", "_joint_draw_sums"):
        setattr(AS, name, timer(getattr(AS, name), name))

    def call(on: bool):
        for m, attr in switches:
            setattr(m, attr, on)
        for k in acc:
            acc[k] = 0.0
        c0 = time.process_time()
        rep = AS.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
        return time.process_time() - c0, dict(acc), rep

    call(True)
    res: dict[bool, list[tuple[float, dict[str, float]]]] = {False: [], True: []}
    for i in range(pairs):
        for on in (False, True):
            t, parts, rep = call(on)
            res[on].append((t, parts))
            if i == 0:
                with open(f"{out}_{'new' if on else 'old'}.json", "w") as f:
                    f.write(rep.to_json())
            print(f"pair {i} {'new' if on else 'old'}: call {t:.3f} s CPU, "
                  + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()) + f"; load {os.getloadavg()[0]:.1f}",
                  flush=True)
    for on in (False, True):
        ts = sorted(r[0] for r in res[on])
        line = f"{'new' if on else 'old'}: call min {ts[0]:.3f} median {ts[len(ts) // 2]:.3f} s"
        for k in acc:
            v = sorted(r[1][k] for r in res[on])
            line += f"; {k} min {v[0]:.3f} median {v[len(v) // 2]:.3f} s"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
