"""The full correlation's cutoff check on pl44's MLP (rc44; docs/benchmarks.md, "rc44", "cf45").

Each scheme's Gaussian-form first-order leakage with the full R's rank rule at ``correlated.RCOND``
and 100x finer (since cf45 the form's only cutoff)
(``SchemeResult.cutoff_sensitivity``), the unquantized baseline's own (pl46:
``Report.diagnostics["baseline_cutoff_sensitivity"]``), and the scoring's CPU time with the check on and off
(alternated, 1 thread).

    python benchmarks/rc44_cutoff_check.py

Runtime (1 thread): about 10 CPU s.
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pl44_planner_bruteforce as B  # noqa: E402

from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig, ScoringConfig  # noqa: E402

A = importlib.import_module("mis_lightning.assess")  # (the package exports the function)


def main(reps: int = 5) -> None:
    torch.set_num_threads(1)
    model, tr, va, lossf, cands = B.build("mlp")
    est = run_estimation(model, tr, lossf, EstimationConfig(weight_decay=B.WD))
    times: dict[bool, list[float]] = {True: [], False: []}
    max_d = A.CUTOFF_CHECK_MAX_D
    for _ in range(reps):
        for on in (True, False):
            A.CUTOFF_CHECK_MAX_D = max_d if on else -1
            t = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = score_schemes(est, model, cands, scoring_config=ScoringConfig(), val_dataloader=va, loss_fn=lossf)
            times[on].append(time.process_time() - t)
    A.CUTOFF_CHECK_MAX_D = max_d
    on, off = (sum(v) / len(v) for v in (times[True], times[False]))
    print(f"d = {est.d}, n = {est.n}; scoring CPU s with the check {on:.3f}, without {off:.3f} ({100 * (on / off - 1):+.1f}%)")
    rep = score_schemes(est, model, cands, scoring_config=ScoringConfig(), val_dataloader=va, loss_fn=lossf)
    print("| scheme | leakage | Gaussian form at RCOND | at RCOND / 100 | move |")
    print("|---|---|---|---|---|")
    for k, s in rep.schemes.items():
        c = s.cutoff_sensitivity or {}
        print(f"| {k} | {s.leakage:.4f} | {c.get('leakage', float('nan')):.4f} | "
              f"{c.get('leakage_fine_cutoff', float('nan')):.4f} | {100 * c.get('move', float('nan')):.1f}% |")
    b = rep.diagnostics.get("baseline_cutoff_sensitivity")  # the unquantized figure's own (pl46)
    if b is not None:
        print(f"| unquantized baseline | {rep.baseline_leakage:.4f} | {b['leakage']:.4f} | "
              f"{b['leakage_fine_cutoff']:.4f} | {100 * b['move']:.1f}% |")
    print(*[w for w in rep.warnings if w.startswith("cutoff-set")], sep="\n")


if __name__ == "__main__":
    main()
