"""The interval's two terms read on the stored records (method.md section 3, "The uncertainty
interval"): the record term (the mean over the R stored records against the truth's mean over the
population) and the relative error of sigma that the position search reads (sigma^2 is a mean over
all n training records, not over the R stored ones). Both pinned against independent computations:
an enumeration of every selection of a tiny population, and a simulation of sigma-hat."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mis_lightning import functional as F
from mis_lightning.functional import interval as FI


def test_record_term_is_the_selection_variance_plus_the_training_records_own():
    """Every R-subset of n records (the bottom-k of a random hash is a simple random sample):
    the stored mean's variance about the n-record mean is the finite-population one,
    (1 - R/n) S^2 / R, and the record term's square, s^2 / R, is on average S^2 / R = that +
    S^2 / n -- the selection's variance plus the n records' own sampling variance about the
    population mean, which is the truth's (method.md section 1). Exact identities (sums over all
    56 subsets), to float64 rounding."""
    g = torch.Generator().manual_seed(3)
    leak = torch.rand(8, generator=g, dtype=torch.float64) ** 3  # skewed, like per-record TVs
    n, R = leak.numel(), 3
    S2 = float(leak.var())  # (n - 1) denominator
    means, se2 = [], []
    for idx in itertools.combinations(range(n), R):
        sub = leak[list(idx)]
        means.append(float(sub.mean()))
        se2.append(F.record_standard_error(sub) ** 2)
    m = torch.tensor(means, dtype=torch.float64)
    var_sel = float(((m - leak.mean()) ** 2).mean())
    assert var_sel == pytest.approx((1 - R / n) * S2 / R, rel=1e-12)
    assert sum(se2) / len(se2) == pytest.approx(var_sel + S2 / n, rel=1e-12)


def _spy_sigma_rel(monkeypatch) -> list:
    seen: list = []
    real = FI.position_range

    def spy(*a, **kw):
        seen.append(kw.get("sigma_rel"))
        return real(*a, **kw)

    monkeypatch.setattr(FI, "position_range", spy)
    return seen


def test_sigma_search_reads_sigmas_error_over_all_n_records(monkeypatch):
    """The search reads the cells at sigma (1 +- z1 se) with se sigma-hat's relative standard
    error. sigma-hat^2 is the mean of psi_j^2 over the n training records, so se is
    sd(w^2) / (2 sqrt(n)) whatever R: checked against a simulation of sigma-hat (1,000 means of
    n = 20,000 fresh squares), with R = 400 stored records reading sd(w^2). Influences uniform
    (w^2 light-tailed: the sample sd of 400 squares is within ~3% of its value). Tolerance 15%:
    the simulation's own error (~2.2%) plus the stored sample's; dividing by sqrt(R) instead read
    sqrt(n / R) = 7x too wide."""
    n, R = 20_000, 400
    g = torch.Generator().manual_seed(0)
    a = math.sqrt(3.0)  # unit variance
    influence = (torch.rand(R, 1, generator=g, dtype=torch.float64) * 2 - 1) * a
    sims = (torch.rand(1000, n, generator=g, dtype=torch.float64) * 2 - 1) * a
    sigma_hat = sims.square().mean(1).sqrt()  # relative to sigma = 1
    se = float(sigma_hat.std())
    seen = _spy_sigma_rel(monkeypatch)
    theta = torch.tensor([0.0], dtype=torch.float64)
    sigma = torch.tensor([1.0], dtype=torch.float64)
    boundaries = torch.arange(-14.0, 16.0, 4.0, dtype=torch.float64).unsqueeze(0) - 2.0  # 4-sd step, mid-cell
    iv = FI.leakage_interval(0.01, 0.0, n, theta=theta, sigma=sigma, boundaries=boundaries, influence=influence,
                             method="clt", level=0.8)
    assert iv.regime == "position-dominated"
    z1 = FI.normal_quantile(0.9)
    assert seen and seen[0] is not None
    assert float(seen[0][0]) == pytest.approx(z1 * se, rel=0.15), (float(seen[0][0]), z1 * se)


def test_sigma_search_with_every_record_stored_is_unchanged(monkeypatch):
    """R = n (every record stored): the half-range is the stored records' own sd(w^2) / (2 sqrt(n)),
    as before (the exact OLS coverage study of tests/test_interval.py stores every record)."""
    n = 300
    g = torch.Generator().manual_seed(1)
    influence = torch.randn(n, 1, generator=g, dtype=torch.float64)
    seen = _spy_sigma_rel(monkeypatch)
    boundaries = torch.arange(-14.0, 16.0, 4.0, dtype=torch.float64).unsqueeze(0) - 2.0
    FI.leakage_interval(0.01, 0.0, n, theta=torch.zeros(1, dtype=torch.float64),
                        sigma=torch.ones(1, dtype=torch.float64), boundaries=boundaries, influence=influence,
                        method="clt", level=0.8)
    expect = FI.normal_quantile(0.9) * 0.5 * float(influence.square().std()) / math.sqrt(n)
    assert float(seen[0][0]) == pytest.approx(expect, rel=1e-12)
