"""Accuracy of the float8 interpolation table (``functional/interp.py``, issue 13) against the
exact sum over every cell of the table built from all 256 bit patterns: 60,000 positions per
format (log-uniform |x| from 2^-12 to the largest value, a fifth exactly on values and cell
edges, 0, +-max, both signs) with log2 s uniform in [-12.5, 10.5] (table units). Prints the
covered share, the build-and-evaluate time and the largest errors of kappa, mean_abs and m4 on
the covered points, then of the whole fast path on every point.

    python benchmarks/fp8_interp_accuracy.py [seed]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

F64 = torch.float64


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    v = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).to(F64)
    return torch.unique(v[torch.isfinite(v)])


def main(argv: list[str]) -> int:
    from mis_lightning.functional import interp as I
    from mis_lightning.functional import table as T
    from mis_lightning.functional.cells import moments_from_alpha

    torch.manual_seed(int(argv[0]) if argv else 0)
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        v = _all_values(dt)
        vmax = float(v[-1])
        n = 60000
        ax = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(2.0**-12), math.log(vmax)))
        mids = 0.5 * (v[1:] + v[:-1])
        exact = torch.cat([v[v >= 0], mids[mids > 0]])
        ax[:4000] = exact[torch.randint(0, exact.numel(), (4000,))]  # values and edges exactly
        ax[4000:5000] = 0.0
        ax[5000:6000] = vmax
        x = ax * torch.where(torch.rand(n) < 0.5, -1.0, 1.0).to(F64)
        s = 2.0 ** torch.empty(n, dtype=F64).uniform_(-12.5, 10.5)
        it = I.interp_table(v)
        t0 = time.time()
        done, k, ma, m4 = it.moments(x, s)
        tb = time.time() - t0
        e = torch.cat([torch.tensor([-math.inf], dtype=F64), mids, torch.tensor([math.inf], dtype=F64)])
        ref: dict[str, list[torch.Tensor]] = {"kappa": [], "mean_abs": [], "m4": []}
        for a in range(0, n, 2048):
            mm = moments_from_alpha((e.unsqueeze(0) - x[a : a + 2048, None]) / s[a : a + 2048, None])
            for key, lst in ref.items():
                lst.append(getattr(mm, key))
        ek, ea, em = (torch.cat(ref[key]) for key in ("kappa", "mean_abs", "m4"))
        err = [float((got - want)[done].abs().max()) for got, want in ((k, ek), (ma, ea), (m4, em))]
        print(f"{dt} covered {float(done.double().mean()):.3f} build+eval {tb:.1f}s "
              f"kappa {err[0]:.2e} mean_abs {err[1]:.2e} m4 {err[2]:.2e}")
        worst = int(torch.argmax(torch.where(done, (m4 - em).abs(), 0.0)))
        print(f"  worst m4 at x={float(x[worst]):g} s={float(s[worst]):g}")
        out, _ = T._table_fast_moments(x, s, v, torch.ones_like(x))
        errs = [float((got - want).abs().max()) for got, want in ((out.kappa, ek), (out.mean_abs, ea), (out.m4, em))]
        print(f"  fast path all points: kappa {errs[0]:.2e} mean_abs {errs[1]:.2e} m4 {errs[2]:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
