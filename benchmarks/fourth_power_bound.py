"""A/B of the bounded fourth-power sums (issue 13; method.md section 3, "Gaussian form's
diagnostics"): ``assess._joint_sums`` CPU time and its ``factored_power_sums`` share on
scale.py's benchmark MLP, with ``assess.BOUND_FOURTH_POWER_SUMS`` off and on, alternating in
one process (1 thread; 6 CPU schemes, 16 bootstrap draws).

    python benchmarks/fourth_power_bound.py --size 1e6 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32",
           "float8_weight_only", "bf16", "fp16"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1e6")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import lightning_fabric.utilities.seed  # noqa: F401  (first-use import, not timed)
    import torch

    from benchmarks.assess_speed import mlp
    from mis_lightning.config import stage_configs
    from mis_lightning.estimation import linear_factors
    from mis_lightning.quantization import get_scheme

    A = importlib.import_module("mis_lightning.assess")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, inputs = mlp(args.size)
    n = 4096
    x = torch.randn(n, inputs)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)

    def loss_fn(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for xb, yb in loader:  # one epoch: a model off its initialisation
        opt.zero_grad()
        loss_fn(model(xb), yb).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    est_cfg, _, _ = stage_configs("assess", None, None, {"strict": False})
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    preps = [A._prepare_scheme(est, model, get_scheme(s), 16) for s in SCHEMES]
    col = 1
    for p in preps:
        p.column = col
        col += 2 + p.num_draws
    A._joint_sums(est, preps, 1 << 18, 0, keep_moments=False)  # warm-up (compile, tables)

    spent = [0.0]
    real = linear_factors.factored_power_sums

    def timed(*a, **k):
        c = time.process_time()
        try:
            return real(*a, **k)
        finally:
            spent[0] += time.process_time() - c

    init = A._InfluenceReader.__init__

    def timed_init(self, *a, **k):
        init(self, *a, **k)
        self._fps = timed

    A._InfluenceReader.__init__ = timed_init
    try:
        for r in range(args.rounds):
            for flag in (False, True):
                A.BOUND_FOURTH_POWER_SUMS = flag
                spent[0] = 0.0
                c = time.process_time()
                A._joint_sums(est, preps, 1 << 18, 0, keep_moments=False)
                t = time.process_time() - c
                print(f"round {r} bound={flag}: joint sums CPU {t:.2f} s, factored_power_sums {spent[0]:.2f} s",
                      flush=True)
    finally:
        A._InfluenceReader.__init__ = init
        A.BOUND_FOURTH_POWER_SUMS = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
