"""In-sample leave-one-out correlation, columns scaled 10^U(0, P): NaN forms with the check, and
whether the unchecked forms agree with the variational ones there (a proxy for 'the digits were there')."""

import sys

sys.path.insert(0, ".")
import torch

import mis_lightning.functional.correlated as C
from mis_lightning.functional.correlated import RecordCorrelation

F64 = torch.float64
g = torch.Generator().manual_seed(int(sys.argv[1]))
P = float(sys.argv[2])
tot = nan = agree_nan = 0
for t in range(int(sys.argv[3])):
    R, d, r = [(64, 40, 4), (32, 64, 4), (128, 60, 8)][t % 3]
    W = torch.randn(R, r, generator=g, dtype=F64) @ torch.randn(r, d, generator=g, dtype=F64) + 1e-2 * torch.randn(
        R, d, generator=g, dtype=F64
    )
    W = W * 10 ** (P * torch.rand(1, d, generator=g, dtype=F64))
    kap = torch.ones(d, dtype=F64) if t % 2 == 0 else 1 - 10 ** (-9 + 8 * torch.rand(d, generator=g, dtype=F64))
    if RecordCorrelation.in_sample(W) is None:
        continue
    C.FACTOR_FORM_CHECK = True
    on = RecordCorrelation.in_sample(W).gaussian_mean_abs(W, kap)
    C.FACTOR_FORM_CHECK = False
    off = RecordCorrelation.in_sample(W).gaussian_mean_abs(W, kap)
    C.FACTOR_FORM_CHECK = True
    tot += on.numel()
    n = on.isnan()
    nan += int(n.sum())
    if bool(n.any()):
        print(f"t {t} R {R} d {d} NaN {int(n.sum())} off finite {bool(off[n].isfinite().all())}")
print(dict(P=P, forms=tot, nan=nan))
