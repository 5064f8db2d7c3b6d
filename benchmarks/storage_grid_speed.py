"""CPU ns per weight of ``ParamGrid.moments`` (best of 3, one thread) for the ``fp16`` and ``bf16``
casts of a bf16 64 x 1024 matrix (randn x 0.05) at sd = k bf16 ulps of each weight (st31: grids
that hold every stored value read the storage grid; no 512-key fallback). ``--tree``: another
checkout of the library (the parent commit's, for "before").

    python benchmarks/storage_grid_speed.py
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
args = ap.parse_args()
sys.path.insert(0, args.tree)
warnings.filterwarnings("ignore")
import torch  # noqa: E402
from torch import nn  # noqa: E402

import mis_lightning  # noqa: E402
from mis_lightning.quantization import get_scheme  # noqa: E402

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
lin = nn.Linear(1024, 64, bias=False)
with torch.no_grad():
    lin.weight.copy_(torch.randn(64, 1024, generator=g) * 0.05)
model = nn.Sequential(lin.to(torch.bfloat16))
for name in ("fp16", "bf16"):
    grid = get_scheme(name).apply(model).grids["0.weight"]
    th = model[0].weight.detach().double().reshape(-1)
    a = th.abs().to(torch.bfloat16)
    ulp = (a.view(torch.int16) + 1).view(torch.bfloat16).double() - a.double()
    for k in (0.5, 4.0, 16.0, 64.0):
        sd = k * ulp
        grid.moments(th, sd, 0, grid.numel)
        best = 1e9
        for _ in range(3):
            t0 = time.process_time()
            grid.moments(th, sd, 0, grid.numel)
            best = min(best, time.process_time() - t0)
        print(f"{mis_lightning.__file__.split('/mis_lightning')[0]} {name} k={k}: {1e9 * best / th.numel():.0f} ns/weight")
