"""Scoring calls of one saved model under named variants of module-level settings, in one process
after one estimation (p49a): per variant a warm-up call whose report is written as JSON (compare two
with ``benchmarks/compare_reports.py``) and whose power-sum fallbacks are counted, then ``ROUNDS``
rounds of one call per variant, the order reversed every other round; CPU seconds, one thread.

    python benchmarks/scoring_variants.py M ROUNDS OUTDIR NAME:SETTINGS [NAME:SETTINGS ...]

``SETTINGS``: ``MODULE.ATTR=VALUE`` pairs of ``mis_lightning`` modules separated by ``;`` (``VALUE`` a
Python literal; an empty list: the defaults), or ``chunk_size=N`` (the scoring configuration's), e.g.

    python benchmarks/scoring_variants.py M 3 out base: \\
        wide4:estimation.linear_factors.WIDE_FOURTH_POWER_RTOL=True chunk20:chunk_size=1048576

Unlike ``first_call.py ab`` it takes settings that are not boolean and writes every variant's report.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first


def parse(spec: str) -> tuple[str, dict[tuple[str, str], Any]]:
    """``(name, {(module, attr): value})`` of one ``NAME:SETTINGS`` argument (module ``""``: the
    scoring configuration's field)."""
    name, _, sets = spec.partition(":")
    out: dict[tuple[str, str], Any] = {}
    for kv in filter(None, sets.split(";")):
        key, _, val = kv.partition("=")
        mod, _, attr = key.rpartition(".")
        if mod and not hasattr(importlib.import_module("mis_lightning." + mod), attr):
            raise SystemExit(f"{spec}: mis_lightning.{mod} has no {attr}")
        out[(mod, attr)] = ast.literal_eval(val)
    return name, out


def main(argv: list[str]) -> int:
    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.estimation import linear_factors as LF

    path, rounds, outdir = argv[0], int(argv[1]), argv[2]
    variants = dict(parse(s) for s in argv[3:])
    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    defaults = {k: getattr(importlib.import_module("mis_lightning." + k[0]), k[1])
                for v in variants.values() for k in v if k[0]}

    def apply(name: str) -> Any:
        for (mod, attr), val in defaults.items():
            setattr(importlib.import_module("mis_lightning." + mod), attr, val)
        cfg = sc_cfg
        for (mod, attr), val in variants[name].items():
            if mod:
                setattr(importlib.import_module("mis_lightning." + mod), attr, val)
            else:
                cfg = dataclasses.replace(cfg, **{attr: val})
        return cfg

    est = run_estimation(model, loader, loss_fn, est_cfg)
    os.makedirs(outdir, exist_ok=True)
    for name in variants:
        cfg = apply(name)
        for k in LF.POWER_SUMS_F32_COUNTS:
            LF.POWER_SUMS_F32_COUNTS[k] = 0
        rep = score_schemes(est, model, COMMON_SCHEMES, scoring_config=cfg)
        with open(f"{outdir}/{name}.json", "w") as f:
            f.write(rep.to_json())
        print(f"{name}: records summed in float32 / float64, power 2: {LF.POWER_SUMS_F32_COUNTS[(2, 'float32')]} / "
              f"{LF.POWER_SUMS_F32_COUNTS[(2, 'float64')]}, power 4: {LF.POWER_SUMS_F32_COUNTS[(4, 'float32')]} / "
              f"{LF.POWER_SUMS_F32_COUNTS[(4, 'float64')]}; report {outdir}/{name}.json", flush=True)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cfg = apply(name)
            c0 = time.process_time()
            score_schemes(est, model, COMMON_SCHEMES, scoring_config=cfg)
            times[name].append(time.process_time() - c0)
    apply(names[0])
    epoch = float(saved["epoch"])
    for name in names:
        ts = times[name]
        print(f"{name}: {' '.join(f'{t:.2f}' for t in ts)} s (median {sorted(ts)[len(ts) // 2] / epoch:.2f} ep); "
              f"per round / {names[0]}: {' '.join(f'{a / b:.3f}' for a, b in zip(ts, times[names[0]]))}")
    print(f"epoch {epoch:.3f} s; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
