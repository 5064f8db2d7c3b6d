"""Would a correction of the diagonal estimator along the scale direction fix the d = 1,548 case
(ln41 (d); benchmarks/scale_symmetry.py, ``--cases ln --classes 4 --length 32 --n 3000``)? On that
Conv1d -> LayerNorm([8, 30]) -> Linear(240, 4) model: the exact and diagonal estimates, then the
diagonal one scored with the exact sigma on the conv layer only (the scale-symmetric weights: the
most a correction along their scale direction could give) and on every tensor, and the per-tensor
median sigma ratio. Runtime: ~6 min CPU (the exact pass ~290 s).

    python benchmarks/scale_symmetry_components.py
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale_symmetry import SCHEMES, fitted  # noqa: E402

from mis_lightning.assess import score_schemes  # noqa: E402
from mis_lightning.estimation.estimate import estimate  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")
m, x, y, loss, grad = fitted("ln", 3000, 32, 4, 0)
dl = DataLoader(TensorDataset(x, y), batch_size=500)
t = time.process_time()
ex = estimate(m, dl, loss, mode="exact", num_records=256)
print("exact", time.process_time() - t, "s", flush=True)
dg = estimate(m, dl, loss, mode="diagonal", num_records=256)
print("flat", ex.diagnostics.get("flat_directions"), "offset", ex.diagnostics.get("minimum_offset_sd"), ex.diagnostics.get("not_at_minimum"), flush=True)


def score(e):
    r = score_schemes(e, m, SCHEMES, uncertainty_draws=0)
    return {s: round(r.schemes[s].leakage, 4) for s in SCHEMES}


ref = score(ex)
print("exact", ref, "diagonal", score(dg))
for label, keys in (("conv only", [k for k in dg.names if k.startswith("0.")]), ("all", dg.names)):
    sig = {k: (ex.sigma[k].to(dg.sigma[k]) if k in keys else dg.sigma[k]) for k in dg.names}
    print("diagonal with exact sigma on", label, score(dataclasses.replace(dg, sigma=sig)))
print("sigma diagonal / exact (median):", {k: round(float((dg.sigma[k] / ex.sigma[k]).median()), 3) for k in dg.names})
