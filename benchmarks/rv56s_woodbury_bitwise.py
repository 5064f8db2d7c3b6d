"""rv56s: FACTOR_FORM_WOODBURY_CHECK on / off on in-sample correlations (columns scaled 1-1e12): bitwise."""
import sys

sys.path.insert(0, ".")
import torch

import mis_lightning.functional.correlated as C
from mis_lightning.functional.correlated import RecordCorrelation

F64 = torch.float64
g = torch.Generator().manual_seed(0)
same = diff = nan_new = 0
for P in (0, 3, 6, 9, 12):
    for t in range(6):
        R, d, r = [(64, 40, 4), (32, 64, 4), (128, 60, 8)][t % 3]
        W = torch.randn(R, r, generator=g, dtype=F64) @ torch.randn(r, d, generator=g, dtype=F64) + 1e-2 * torch.randn(
            R, d, generator=g, dtype=F64
        )
        W = W * 10 ** (P * torch.rand(1, d, generator=g, dtype=F64))
        kap = torch.ones(d, dtype=F64) if t % 2 == 0 else 1 - 10 ** (-9 + 8.9 * torch.rand(d, generator=g, dtype=F64))
        for loo in (True, False):
            out = []
            for flag in (True, False):
                C.FACTOR_FORM_WOODBURY_CHECK = flag
                rc = RecordCorrelation.in_sample(W, loo=loo)
                if rc is None:
                    break
                out.append(
                    torch.cat(
                        [
                            rc.gaussian_mean_abs(W, kap),
                            rc.parts[0][1].restrict(slice(0, d // 2))._factor_quadratic(W[:, : d // 2], kap[: d // 2]),
                        ]
                    )
                )
            if len(out) == 2:
                eq = (out[0] == out[1]) | (out[0].isnan() & out[1].isnan())
                same += int(eq.sum())
                diff += int((~eq).sum())
                nan_new += int((out[0].isnan() & ~out[1].isnan()).sum())
                if bool((~eq).any()):
                    print(
                        "P",
                        P,
                        "t",
                        t,
                        "loo",
                        loo,
                        "differ",
                        int((~eq).sum()),
                        "new NaN",
                        int((out[0].isnan() & ~out[1].isnan()).sum()),
                        "max rel",
                        float(((out[0] - out[1]) / out[1]).abs()[~eq & out[0].isfinite()].max())
                        if bool((~eq & out[0].isfinite()).any())
                        else 0,
                    )
print(dict(same=same, differ=diff, new_nan=nan_new))
