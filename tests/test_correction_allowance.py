"""The correction's remainder in the 80% interval (functional.correction_allowance; method.md section 3,
"The correction's remainder"): what it does with records it cannot read (docs/benchmarks.md "rv59c")."""
import math

import torch

import mis_lightning.functional as F


def _records(h):
    first = torch.tensor([0.2, 0.3, 0.25], dtype=torch.float64)
    return first, F.with_spread(first, F.unsaturate(first), h)


def test_a_record_without_a_finite_leverage_adds_nothing_and_leaves_the_others_term():
    # with_spread gives a record with a NaN leverage no term (h > 0 is False); the allowance read NaN for every
    # record then, and widen_interval left the interval unwidened without a word
    h = torch.tensor([0.3, math.nan, 0.3], dtype=torch.float64)
    first, corrected = _records(h)
    a = F.correction_allowance(first, corrected, h, 0.3)
    keep = torch.tensor([0, 2])
    # the two finite records' own allowance, their size averaged over the three records (the third adds 0)
    alone = F.correction_allowance(first[keep], corrected[keep], h[keep], 0.3) * 2 / 3
    assert math.isfinite(a) and alone > 1e-4
    assert abs(a - alone) <= 1e-12 * alone
    lo, hi = F.widen_interval(0.2, 0.3, 0.25, a)
    assert lo < 0.2 and hi > 0.3


def test_a_mean_leverage_read_nan_takes_the_cap_not_no_allowance():
    h = torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64)
    first, corrected = _records(h)
    capped = F.correction_allowance(first, corrected, h, 1.0)
    assert capped > 1e-3
    assert F.correction_allowance(first, corrected, h, math.nan) == capped
