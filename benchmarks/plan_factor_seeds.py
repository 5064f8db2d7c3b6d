"""The body of ``tests/test_ptq.py::test_plan_with_a_calibrated_candidate_warns_once_about_its_factor``
from several global torch RNG states (what an xdist worker's earlier files leave in it): per seed,
``ok`` / ``FAIL``, the count of per-input-channel factor warnings (distinct), of the plan's warnings
(distinct), the chosen plan and the CPU seconds (docs/benchmarks.md, "hy50").

    PYTHONPATH=$PWD python -W ignore benchmarks/plan_factor_seeds.py 0 1 2 3 4 5 6 7

On main at 68e4e70 seeds 3, 6 and 7 gave 3 factor warnings: a re-assessed plan of AWQ and
SmoothQuant layers added both candidates' sentences again, joined.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first (PYTHONPATH=$PWD does the same)
sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

import test_ptq as T
import torch

from mis_lightning import plan
from mis_lightning.quantization import requantize

requantize.REQUANT_DRAWS = 16  # as the test
torch.set_num_threads(1)
for seed in [int(s) for s in sys.argv[1:]] or [0, 1, 2, 3]:
    t = time.process_time()
    torch.manual_seed(seed)
    m, loader = T._regression()
    res = plan(m, ["int8_weight_only", "awq_int8_weight_only", "smooth_quant_int8_weight_only",
                   "intx_weight_only_int4"], loader, T._mse, val_dataloader=loader, max_utility_loss=10.0,
               num_records=32, uncertainty_draws=0, weight_decay=2e-2)
    factor = [w for w in res.report.warnings if "per-input-channel factor" in w]
    ok = len(factor) == len(set(factor)) == 2 and len(set(res.warnings)) == len(res.warnings)
    print(seed, "ok" if ok else "FAIL", len(factor), len(set(factor)), len(res.warnings), len(set(res.warnings)),
          res.chosen.name, round(time.process_time() - t, 1), flush=True)
