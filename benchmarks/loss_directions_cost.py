"""CPU seconds of the diagonal estimation pass on a 10-class MLP classifier (784-256-10, 8,192
records in batches of 256, one thread): the cost of the loss directions' content-keyed sample
(ux54a: every batch's record keys hashed, 64 records' rows held and measured once) against the
first batch's 16 records before it. Run it with ``PYTHONPATH`` at each checkout, alternating
(``PYTHONPATH=/path/to/checkout python benchmarks/loss_directions_cost.py``); a model with one
output per record hashes nothing (its count is 1), so the issue-13 lines do not move.
Prints the median of ``--calls`` estimations after one untimed call, the count and the load."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import mis_lightning
    from mis_lightning.estimation import estimate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 784, generator=g)
    y = (x[:, :10] + 0.5 * torch.randn(8192, 10, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)

    def ce(o, t):
        return nn.functional.cross_entropy(o, t, reduction="none")

    times, est = [], None
    for i in range(args.calls + 1):
        c0 = time.process_time()
        est = estimate(model, loader, ce, mode="diagonal", weight_decay=1e-3)
        if i:
            times.append(time.process_time() - c0)
    assert est is not None
    print(f"{os.path.dirname(os.path.dirname(mis_lightning.__file__))}: median {statistics.median(times):.3f} s "
          f"({' '.join(f'{t:.3f}' for t in times)}); directions {est.diagnostics['leverage_directions']} over "
          f"{est.diagnostics.get('leverage_directions_records', 16)} records; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
