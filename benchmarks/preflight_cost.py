"""CPU cost of the quantized-forward preflight (nf50a, nux50): ``assess.check_validation_batch``
on the first validation batch with and without each scheme's quantized copy (``schemes=``), on a
model saved by ``first_call.py train``, in seconds and in Adam epochs of that model (one thread):

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/preflight_cost.py M --rounds 3    # M: python benchmarks/first_call.py train 1e5 M

The validation batch is the saved data's first 256 records (the training batch size); schemes:
scale.py's eight (``COMMON_SCHEMES``). Rounds alternate which of the two goes first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import check_validation_batch, resolve_schemes

    saved, model, loader, loss_fn, _, _ = load_saved(args.path)
    val = torch.utils.data.DataLoader(loader.dataset, batch_size=256)
    schemes = [s for s in resolve_schemes(COMMON_SCHEMES) if _available(s)]
    epoch = float(saved["epoch"])

    def run(with_schemes: bool) -> float:
        c0 = time.process_time()
        check_validation_batch(model, val, loss_fn, None, None, None, schemes=schemes if with_schemes else (),
                               strict=True)
        return time.process_time() - c0

    run(True)  # warm-up (imports, torchao's first calls)
    for r in range(args.rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        t = {w: run(w) for w in order}
        print(f"round {r}: float batch {t[False]:.3f} s; with {len(schemes)} quantized copies {t[True]:.3f} s; "
              f"added {t[True] - t[False]:.3f} s = {(t[True] - t[False]) / epoch:.3f} epochs (epoch {epoch:.3f} s); "
              f"load {os.getloadavg()[0]:.1f}")


def _available(scheme) -> bool:
    try:
        scheme.check_available()
        return True
    except Exception:  # noqa: BLE001 - a scheme this machine cannot run (CUDA-only kernels)
        return False


if __name__ == "__main__":
    main()
