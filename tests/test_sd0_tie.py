"""An sd-0 weight outside the cell of its backend code (the backend rounded a float32 tie the
other way: ``theta / scale`` within float32 rounding of ``k + 1/2``) is a point mass in the next
cell: ``(kappa, mean_abs, m4) = (0, 0, 0)``, what the per-element exact sums give. The fused
affine kernel's two-edge form (steps above 19 sd: every sd-0 weight) read its own, empty cell's
fourth-moment term as ``0 / 0``: ``m4`` NaN, or, where its first-use self-check sampled
such a weight, the fused path disabled for the process (sc33; the NaN ``m4`` pf32 saw disable the compiled
split's self-check). Tolerance: exact (0 is what both forms compute for every term).
"""

import torch

import mis_lightning.functional as F
from mis_lightning.functional.affine import FUSED_PATH, TABLE_MIN_ELEMENTS
from mis_lightning.functional.fastpath import GUARD

F64 = torch.float64


def test_sd0_weight_outside_its_codes_cell_has_finite_moments_on_the_fused_path():
    c = TABLE_MIN_ELEMENTS  # the fused kernel's call size
    gen = torch.Generator().manual_seed(0)
    s = torch.full((c,), 5.874742055311799e-4, dtype=F64)
    zp = torch.zeros(c, dtype=F64)
    code = torch.randint(-100, 100, (c,), generator=gen).to(F64)
    # just above the upper edge of the code's cell (1.7e-10 of a step), or well inside it
    outside = torch.arange(c) % 7 == 0
    theta = torch.where(outside, (code + 0.5) * s + 1e-13, code * s + 0.1 * s)
    sigma = torch.zeros(c, dtype=F64)
    sigma[1::7] = 0.3 * s[1::7]  # live weights: their moments are the kernel's as before
    fused = F.affine_cell_moments(theta, sigma, s, zp, -128, 127, code=code)
    # the kernel's own answer: its first-use self-check (a sample against the exact sums) found
    # nothing to disable it for (on the old kernel it saw NaN against 0 and fell back)
    assert FUSED_PATH not in GUARD.disabled
    for f in ("kappa", "mean_abs", "m4"):
        assert bool(torch.isfinite(getattr(fused, f)).all()), f
        assert bool((getattr(fused, f)[outside] == 0).all()), f
    # the per-element exact sums (calls below the fused size) agree on the outside weights
    idx = torch.nonzero(outside).squeeze(-1)[:64]
    exact = F.affine_cell_moments(theta[idx], sigma[idx], s[idx], zp[idx], -128, 127, code=code[idx])
    for f in ("kappa", "mean_abs", "m4"):
        assert torch.equal(getattr(exact, f), getattr(fused, f)[idx]), f
