"""Per-record power sums of the benchmark Transformer's parameters from per-sample gradients
(``Estimate.power_sums``: the scoring's sums for layers without factors), CPU ms per group.

The model of ``benchmarks/beyond_linear.py`` after 2 Adam epochs, its default estimate, one
call per parameter with 37 columns for ``p = 2`` and 6 for ``p = 4`` (two schemes, 16 bootstrap
draws), the stored records' taps cached (one warm-up pass), 1 thread, min of 3. Run it for two
checkouts to compare (docs/benchmarks.md, "Power sums from per-sample gradients"):

    python benchmarks/power_sums.py                     # this checkout
    python benchmarks/power_sums.py /path/to/other/checkout
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(root: str) -> None:
    sys.path.insert(0, str(Path(root) / "benchmarks"))
    sys.path.insert(0, root)
    import beyond_linear as bl
    import torch
    from torch.utils.data import DataLoader

    import mis_lightning
    from mis_lightning.estimation import estimate

    assert Path(mis_lightning.__file__).resolve().is_relative_to(Path(root).resolve()), mis_lightning.__file__
    torch.set_num_threads(1)
    model, train, _, loss_fn = bl.build("transformer", 4096)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        bl.epoch(model, DataLoader(train, batch_size=64, shuffle=True), loss_fn, opt)
    est = estimate(model, DataLoader(train, batch_size=64), loss_fn)
    g = torch.Generator().manual_seed(0)
    cols = {n: {2: torch.rand(est.theta[n].numel(), 37, dtype=torch.float64, generator=g),
                4: torch.rand(est.theta[n].numel(), 6, dtype=torch.float64, generator=g)} for n in est.names}
    for n in est.names:  # the stored records' taps: computed once, then cached
        est.power_sums(n, cols[n])
    best: dict[str, float] = {}
    for _ in range(3):
        for n in est.names:
            t = time.process_time()
            est.power_sums(n, cols[n])
            best[n] = min(best.get(n, float("inf")), time.process_time() - t)
    emb = best.pop("emb.weight")
    rest = sum(best.values())
    print(f"{root}: embedding {emb * 1e3:.0f} ms, other {len(best)} tensors {rest * 1e3:.0f} ms, "
          f"all {(emb + rest) * 1e3:.0f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1]))
