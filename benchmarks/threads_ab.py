"""One thread against two on this machine, in one process: an Adam epoch, the estimation pass
(``run_estimation``) and the scoring (``score_schemes``, the default options) of the benchmark
Transformer (or CNN) of ``benchmarks/beyond_linear.py``, alternating ``torch.set_num_threads``
(2, then 1) for 3 rounds; wall seconds (docs/benchmarks.md, "Power sums from per-sample
gradients").

    OMP_WAIT_POLICY=PASSIVE python benchmarks/threads_ab.py [transformer|cnn]
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def main(kind: str = "transformer") -> None:
    import beyond_linear as bl
    import torch
    from torch.utils.data import DataLoader

    from mis_lightning.config import stage_configs

    A = importlib.import_module("mis_lightning.assess")
    torch.set_num_threads(2)
    model, train, _, loss_fn = bl.build(kind, 4096)
    shuffled = DataLoader(train, batch_size=64, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    bl.epoch(model, shuffled, loss_fn, opt)
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {})
    loader = DataLoader(train, batch_size=64)
    est = A.run_estimation(model, loader, loss_fn, est_cfg)  # warm-up: imports, first calls
    A.score_schemes(est, model, bl.SCHEMES, scoring_config=sc_cfg)
    for _ in range(3):
        for threads in (2, 1):
            torch.set_num_threads(threads)
            t = time.perf_counter()
            bl.epoch(model, shuffled, loss_fn, opt)
            ep = time.perf_counter() - t
            t = time.perf_counter()
            est = A.run_estimation(model, loader, loss_fn, est_cfg)
            e = time.perf_counter() - t
            t = time.perf_counter()
            A.score_schemes(est, model, bl.SCHEMES, scoring_config=sc_cfg)
            s = time.perf_counter() - t
            print(f"threads {threads}: epoch {ep:.2f}  estimation {e:.2f}  scoring {s:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "transformer")
