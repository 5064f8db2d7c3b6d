"""vb46: the cost of the test for records without a loss (``LossProgram.void_rows``, sm45 / vb45).

Every batch's targets are read for marks (NaN, integer codes outside ``[0, C)``, an all-zero
weight); integer targets cost one one-record forward per program (``C``); a batch holding
marked records costs their forward, two loss evaluations and a backward. Measured as the
default "assess" estimation (``run_estimation``) with ``estimate.VOID_RECORD_TEST`` on and off,
alternated in one process (CPU seconds, one thread), and as the CPU time spent inside
``void_rows`` itself (its share of the estimation, the precise figure where the A/B difference
is below the noise):

    python benchmarks/first_call.py train 1e5 /tmp/m1e5.pt
    python benchmarks/vb46_void_cost.py mlp /tmp/m1e5.pt [--rounds 3]
    python benchmarks/vb46_void_cost.py multitask     # masked BCE, 3 tasks, 30% of labels NaN
    python benchmarks/vb46_void_cost.py classes       # cross_entropy, ignore_index on 5% of records
    python benchmarks/vb46_void_cost.py multitask --width 512
    python benchmarks/vb46_void_cost.py weighted      # targets (y, w): float 0/1 labels, 5% weights 0
    python benchmarks/vb46_void_cost.py mlp /tmp/m1e5.pt --fitted   # + a standardiser fitted on the inputs

``--fitted`` puts a standardiser fitted on the saved inputs (buffers ``mean``, ``std``) before the
MLP and reports the CPU time of ``data_buffers.InputStatistics`` (the per-feature statistics that
name it: vb46) instead, and whether it was named.

``mlp``: first_call.py's saved regression MLP (float targets, no record marked). ``multitask``:
a 12-64-64-3 MLP, 4,096 records, each label missing with probability 0.3 (2.7% of records with
none), Adam 10 epochs. ``classes``: a 12-64-64-10 MLP, integer labels, 5% of records
``ignore_index=-100``. ``weighted``: a 12-64-64-1 MLP, BCE on float 0/1 labels times a sample weight
(5% of weights 0; every record labelled 0 is marked too, an all-zero float among two targets). Each prints the on / off times per pair, the time inside ``void_rows`` and
its share, and whether the two estimations' ``n`` and sigma agree (they must where no record is
void; where some are, ``n`` drops by their count).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parents[1]))

from mis_lightning.estimation import per_sample  # noqa: E402

# the module (the package's name ``estimate`` is the function)
est_mod = importlib.import_module("mis_lightning.estimation.estimate")

INSIDE = [0.0]


class _Standardised(nn.Module):
    def __init__(self, x: torch.Tensor, body: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0))
        self.body = body

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body((z - self.mean) / self.std)


def _timed_input_statistics() -> None:
    """Wrap ``InputStatistics.update`` and ``.matches`` to add their CPU time to ``INSIDE``."""
    from mis_lightning.estimation import data_buffers

    for attr in ("update", "matches"):
        inner = getattr(data_buffers.InputStatistics, attr)

        def timed(self, *a, _inner=inner):
            c0 = time.process_time()
            try:
                return _inner(self, *a)
            finally:
                INSIDE[0] += time.process_time() - c0

        setattr(data_buffers.InputStatistics, attr, timed)


def _timed_void_rows() -> None:
    """Wrap ``LossProgram.void_rows`` to add its CPU time to ``INSIDE``."""
    inner = per_sample.LossProgram.void_rows

    def void_rows(self, inputs, targets, b):
        c0 = time.process_time()
        try:
            return inner(self, inputs, targets, b)
        finally:
            INSIDE[0] += time.process_time() - c0

    per_sample.LossProgram.void_rows = void_rows


def _masked_bce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    seen = ~t.isnan()
    loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), reduction="none")
    return torch.where(seen, loss, 0.0).sum(-1) / seen.sum(-1).clamp_min(1)


def _ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="none", ignore_index=-100)


def _weighted_bce(o: torch.Tensor, t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return t[1] * F.binary_cross_entropy_with_logits(o.squeeze(-1), t[0], reduction="none")


class _Weighted(torch.utils.data.TensorDataset):
    def __getitem__(self, i):
        x, y, w = super().__getitem__(i)
        return x, (y, w)


def _synthetic(kind: str, width: int = 64) -> tuple:
    """``(model, loader, loss_fn, void count)`` of the ``multitask`` / ``classes`` models (hidden
    layers ``width`` wide)."""
    torch.manual_seed(0)
    n, f = 4096, 12
    x = torch.randn(n, f)
    if kind == "multitask":
        y = (torch.rand(n, 3) < torch.sigmoid(x[:, :3] * 2)).float()
        y[torch.rand(n, 3) < 0.3] = float("nan")
        void, loss_fn, out = int(y.isnan().all(1).sum()), _masked_bce, 3
    elif kind == "classes":
        y = (x[:, :10] + 0.5 * torch.randn(n, 10)).argmax(1)
        y[torch.rand(n) < 0.05] = -100
        void, loss_fn, out = int((y < 0).sum()), _ce, 10
    else:  # float 0/1 labels and sample weights: every negative record is a candidate (y all 0)
        y = (torch.rand(n) < torch.sigmoid(2 * x[:, 0])).float()
        w = 0.5 + torch.rand(n)
        w[torch.rand(n) < 0.05] = 0.0
        void, loss_fn, out = int((w == 0).sum()), _weighted_bce, 1
    model = nn.Sequential(nn.Linear(f, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))
    data = _Weighted(x, y, w) if kind == "weighted" else torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=256)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
    return model, loader, loss_fn, void


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["mlp", "multitask", "classes", "weighted"])
    ap.add_argument("path", nargs="?", default=None, help="first_call.py's saved model (mlp)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=64, help="hidden width (multitask, classes)")
    ap.add_argument("--fitted", action="store_true", help="mlp: a fitted standardiser first; time its statistics")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from mis_lightning.assess import run_estimation
    from mis_lightning.config import stage_configs

    if args.what == "mlp":
        from benchmarks.first_call import load_saved

        saved, model, loader, loss_fn, est_cfg, _ = load_saved(args.path)
        label, void = f"mlp {saved['size']}", 0
        if args.fitted:
            model, label = _Standardised(saved["x"], model), label + " after a fitted standardiser"
    else:
        model, loader, loss_fn, void = _synthetic(args.what, args.width)
        est_cfg = stage_configs("assess", None, None, {"strict": False})[0]
        label = f"{args.what} width {args.width}"
    _timed_input_statistics() if args.fitted else _timed_void_rows()
    run_estimation(model, loader, loss_fn, est_cfg)  # warm-up (one-time costs out of the pairs)
    times: dict[bool, list[float]] = {True: [], False: []}
    inside: list[float] = []
    results: dict[bool, object] = {}
    for r in range(args.rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            est_mod.VOID_RECORD_TEST = on
            INSIDE[0] = 0.0
            c0 = time.process_time()
            results[on] = run_estimation(model, loader, loss_fn, est_cfg)
            times[on].append(time.process_time() - c0)
            if on:
                inside.append(INSIDE[0])
    est_mod.VOID_RECORD_TEST = True
    a, b = results[True], results[False]
    same_sigma = all(torch.equal(a.sigma[k], b.sigma[k]) for k in a.sigma)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    share = sorted(inside)[len(inside) // 2] / med[True]
    print(f"{label}: records without a loss {void}; n on {a.n}, off {b.n}; sigma identical {same_sigma}"
          + (f"; named {a.diagnostics.get('fitted_buffers')}" if args.fitted else ""))
    print(f"  estimation CPU s on {' '.join(f'{t:.3f}' for t in times[True])} | off "
          f"{' '.join(f'{t:.3f}' for t in times[False])}; median on / off {med[True] / med[False]:.3f}")
    print(f"  inside {'InputStatistics' if args.fitted else 'void_rows'} {' '.join(f'{t * 1e3:.2f}' for t in inside)} ms per estimation = "
          f"{100 * share:.2f}% of it; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
