"""python benchmarks/rv56s_beta_mixed_corner.py [--off]. A kappa box where the in-sample leave-one-out form's beta is not monotone: the mixed corner
(the few high-leverage records' coordinates at kappa_hi, the many low-leverage ones' at kappa_lo)
has the largest beta; the low-leverage records' value there falls below quadratic_ends' low end."""

import sys

import torch

import mis_lightning.functional.correlated as C
from mis_lightning.functional.correlated import RecordCorrelation

C.CORRELATED_BETA_BOUNDS = '--off' not in sys.argv  # --off: cf56's corner betas
g = torch.Generator().manual_seed(0)
F64 = torch.float64
W = torch.zeros(64, 20, dtype=F64)
W[:8, :10] = torch.randn(8, 3, dtype=F64, generator=g) @ torch.randn(3, 10, dtype=F64, generator=g)
W[8:, 10:] = torch.randn(56, 3, dtype=F64, generator=g) @ torch.randn(3, 10, dtype=F64, generator=g)
rc = RecordCorrelation.in_sample(W)
corr = rc.parts[0][1]
assert len(rc.parts) == 1 and corr.self_mean
k_lo = torch.full((20,), 0.3, dtype=F64)
k_hi = torch.full((20,), 0.95, dtype=F64)
mixed = k_lo.clone()
mixed[:10] = k_hi[:10]
x, b = corr.self_term.to(F64), corr.self_weight.to(F64)
for name, k in (("lo", k_lo), ("hi", k_hi), ("mixed (A hi, B lo)", mixed)):
    beta = corr._in_sample_loo_parts(W, x, b, k)[2]
    print(f"beta at {name}: {beta:.6g}")
lo, hi = rc.gaussian_ends(W, k_lo, k_hi)
v = rc.gaussian_mean_abs(W, mixed)
below = v < lo
print(
    "records below the low end at the mixed corner:",
    int(below.sum()),
    "of",
    W.shape[0],
    "worst relative",
    float(((lo - v) / lo).max()),
)
above = v > hi
print("records above the high end:", int(above.sum()))
