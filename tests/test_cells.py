"""Properties of the per-coordinate cell statistics (method.md section 3) and input checks.

Property tests (hypothesis) draw random weights, standard deviations and sorted cell edges,
including infinite outer edges and repeated edges (zero-width cells), and check what the
mathematics guarantees for every input:

* every field is finite (no NaN, no inf), ``0 <= kappa <= 1``, ``0 <= lam <= sqrt(2/pi)``;
* cell probabilities are >= 0 and add up to the covered mass ``Phi(b_K) - Phi(b_0)``
  (exactly 1 with infinite outer edges);
* each conditional mean lies inside its cell;
* refining a grid never lowers ``kappa`` (data processing for the Fisher information of a
  location parameter: a finer partition is a richer statistic) -- exact per coordinate;
* the quantized leakage never exceeds the unquantized baseline, for every method.

Tolerances: sums of up to ~40 float64 cell probabilities, each computed to a few ulp,
are compared to an independent ``Phi`` difference at ``1e-12``; the refinement
inequality is allowed the same ``1e-12`` slack for rounding in the ``diff^2 / p`` sums.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from mis_lightning.functional import (
    CellStatistics,
    baseline_leakage,
    cell_moments,
    cell_statistics,
    mis_from_leakage,
    record_leakage,
    standardize_boundaries,
)

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
F64 = torch.float64

# Random examples locally (they find new edge cases; the empty-cell test at the end of this file
# came from one), the same examples on CI (CI=true): a run of main must not fail on an example
# that no change made.
PROPERTY_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- strategies


@st.composite
def grids(draw, max_d: int = 4, max_edges: int = 12):
    """``(theta [d], sigma [d], boundaries [d, K+1])`` with sorted rows.

    Edges are drawn in standard units within +-12 (plus some 40 sd away, giving cells of
    zero probability in float64), with repeats (zero-width cells) and optionally
    ``-inf`` / ``+inf`` outer edges. With ``sigma`` 0 or tiny, edges are drawn in
    parameter units within +-2 of theta instead.
    """
    d = draw(st.integers(1, max_d))
    k1 = draw(st.integers(2, max_edges))  # number of edges per row
    finite = st.floats(-10.0, 10.0, allow_nan=False)
    theta = torch.tensor(draw(st.lists(finite, min_size=d, max_size=d)), dtype=F64)
    # Include sigma = 0 (a weight the data cannot move) and sigmas so small that the
    # standardised edges reach ~1e300 (fourth powers overflow).
    sig = st.one_of(
        st.floats(1e-4, 1e2, allow_nan=False),
        st.just(0.0),
        st.floats(1e-300, 1e-200, allow_nan=False),
    )
    sigma = torch.tensor(draw(st.lists(sig, min_size=d, max_size=d)), dtype=F64)
    std_edge = st.one_of(
        st.floats(-12.0, 12.0, allow_nan=False),
        st.sampled_from([-40.0, -39.0, 39.0, 40.0, 0.0]),
    )
    rows = []
    for j in range(d):
        u = draw(st.lists(std_edge, min_size=k1, max_size=k1))
        # Repeat some edges to create zero-width cells.
        if draw(st.booleans()) and k1 >= 3:
            i = draw(st.integers(0, k1 - 2))
            u[i + 1] = u[i]
        u = sorted(u)
        spread = sigma[j].item() if sigma[j].item() >= 1e-4 else 1.0 / 6.0
        row = [theta[j].item() + spread * x for x in u]
        row = sorted(row)  # rounding in theta + sigma * u cannot unsort, but be safe
        if draw(st.booleans()):
            row[0] = -math.inf
        if draw(st.booleans()):
            row[-1] = math.inf
        rows.append(row)
    boundaries = torch.tensor(rows, dtype=F64)
    return theta, sigma, boundaries


def _refine(boundaries: torch.Tensor) -> torch.Tensor:
    """Add the midpoint of every finite cell (infinite cells are kept as they are)."""
    lo, hi = boundaries[:, :-1], boundaries[:, 1:]
    mid = 0.5 * (lo + hi)
    # Infinite cells: repeat an edge instead (a zero-width cell changes nothing).
    mid = torch.where(torch.isfinite(mid), mid, lo)
    mid = torch.where(torch.isnan(mid) | torch.isinf(mid), hi, mid)
    out = torch.cat([boundaries, mid], dim=1)
    return out.sort(dim=1).values


# --------------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(grids())
def test_cell_statistics_invariants(g):
    theta, sigma, boundaries = g
    s = cell_statistics(theta, sigma, boundaries)
    for name in ("prob", "mean", "kappa", "mean_abs", "m4", "coverage"):
        t = getattr(s, name)
        assert torch.isfinite(t).all(), f"{name} has non-finite values: {t}"
    assert (s.kappa >= 0).all() and (s.kappa <= 1).all()
    assert (s.mean_abs >= 0).all() and (s.mean_abs <= SQRT_2_OVER_PI).all()
    assert (s.m4 >= 0).all()
    assert (s.prob >= 0).all()
    # Probabilities add up to the covered mass, checked against an independent Phi.
    alpha = standardize_boundaries(theta, sigma, boundaries).numpy()
    covered = norm.cdf(alpha[:, -1]) - norm.cdf(alpha[:, 0])
    upper = alpha[:, 0] > 0  # mirror in the upper tail to avoid cancellation
    covered[upper] = (norm.sf(alpha[:, 0]) - norm.sf(alpha[:, -1]))[upper]
    assert torch.allclose(s.prob.sum(-1), s.coverage, rtol=0, atol=1e-12)
    assert torch.allclose(s.coverage, torch.tensor(covered, dtype=F64), rtol=0, atol=1e-12)
    both_inf = torch.isneginf(boundaries[:, 0]) & torch.isposinf(boundaries[:, -1])
    assert torch.allclose(s.coverage[both_inf], torch.ones_like(s.coverage[both_inf]), rtol=0, atol=1e-12)
    # Conditional means lie inside their cells (standard units). A cell with both edges
    # at the same infinity has no inside; skip those.
    a = torch.tensor(alpha)
    lo, hi = a[:, :-1], a[:, 1:]
    real = ~(torch.isinf(lo) & torch.isinf(hi) & (lo == hi))
    assert ((s.mean >= lo) | ~real).all() and ((s.mean <= hi) | ~real).all()
    # cell_moments is the same computation without per-cell tensors.
    m = cell_moments(theta, sigma, boundaries)
    for name in ("kappa", "mean_abs", "m4", "coverage"):
        assert torch.allclose(getattr(m, name), getattr(s, name), rtol=1e-12, atol=1e-12), name


@PROPERTY_SETTINGS
@given(grids())
def test_refining_never_lowers_kappa(g):
    """Data processing: the partition with every cell split in two keeps more information."""
    theta, sigma, boundaries = g
    coarse = cell_statistics(theta, sigma, boundaries).kappa
    fine = cell_statistics(theta, sigma, _refine(boundaries)).kappa
    assert (fine >= coarse - 1e-12).all(), (coarse, fine)


@PROPERTY_SETTINGS
@given(
    grids(max_d=5),
    st.integers(1, 4),
    st.sampled_from([2, 10, 200, 10_000]),
    st.integers(0, 2**31 - 1),
)
def test_leakage_never_exceeds_baseline(g, num_records, n, seed):
    """Quantization cannot add leakage (data processing), for every evaluation method."""
    theta, sigma, boundaries = g
    s = cell_statistics(theta, sigma, boundaries)
    gen = torch.Generator().manual_seed(seed)
    d = theta.shape[0]
    w = torch.randn(num_records, d, dtype=F64, generator=gen) * 3.0
    base = baseline_leakage(w, n)
    assert ((base >= 0) & (base < 1)).all()
    methods = ["clt", "mc", "auto"] + (["exact1d"] if d == 1 else [])
    for method in methods:
        leak = record_leakage(w, s, n, method=method, mc_draws=256, generator=gen)
        assert torch.isfinite(leak).all()
        assert (leak >= 0).all()
        assert (leak <= base + 1e-15).all(), (method, leak, base)


def test_baseline_matches_unquantized_gaussian_tv():
    """``baseline = 2 Phi(|w| / (2 sqrt n)) - 1``: the TV of two unit Gaussians |w|/sqrt(n) apart."""
    w = torch.tensor([[0.0, 0.0], [3.0, 4.0], [30.0, 40.0]], dtype=F64)
    n = 100
    expected = 2 * norm.cdf(torch.linalg.norm(w, dim=1).numpy() / (2 * math.sqrt(n))) - 1
    assert torch.allclose(baseline_leakage(w, n), torch.tensor(expected, dtype=F64), atol=1e-14)


# --------------------------------------------------------------------------- special inputs


def test_far_cells_have_zero_probability_and_finite_means():
    """Cells 40 sd away have probability < 1e-300 (dropped) yet finite, in-cell means."""
    theta = torch.zeros(2, dtype=F64)
    sigma = torch.ones(2, dtype=F64)
    boundaries = torch.tensor(
        [[-math.inf, -41.0, -40.0, -1.0, 1.0, 40.0, 41.0, math.inf],
         [-math.inf, -40.0, -40.0, 0.0, 0.0, 40.0, 40.0, math.inf]],
        dtype=F64,
    )
    s = cell_statistics(theta, sigma, boundaries)
    assert torch.isfinite(s.mean).all()
    assert s.prob[0, 0] == 0 and s.prob[0, -1] == 0
    # Tail cells: the mean is the finite edge nearest to the centre (their limit).
    assert s.mean[0, 0] == -41.0 and s.mean[0, -1] == 41.0
    # [-41, -40] has probability ~1e-350, below float64: empty, mean at its edge nearest 0.
    assert s.mean[0, 1] == -40.0 and s.mean[0, -2] == 40.0
    # Zero-width cells have probability 0 and a mean equal to their edge.
    assert s.prob[1, 3] == 0 and s.mean[1, 3] == 0.0
    assert s.prob[1, 1] == 0 and s.mean[1, 1] == -40.0
    assert s.kappa[1].item() == pytest.approx(2 / math.pi, abs=1e-14)  # two half-normals
    assert s.coverage[1].item() == pytest.approx(1.0, abs=1e-15)


def test_known_values():
    """Sign quantizer: kappa = 2/pi, lam = sqrt(2/pi); no quantizer: kappa = 1, m4 = 3 (approx)."""
    theta = torch.zeros(2, dtype=F64)
    sigma = torch.ones(2, dtype=F64)
    sign = torch.tensor([[-math.inf, 0.0, math.inf]], dtype=F64)
    s = cell_statistics(theta[:1], sigma[:1], sign)
    assert s.kappa.item() == pytest.approx(2 / math.pi, abs=1e-15)
    assert s.mean_abs.item() == pytest.approx(SQRT_2_OVER_PI, abs=1e-15)
    assert s.m4.item() == pytest.approx(4 / math.pi**2, abs=1e-15)
    # One cell: the code says nothing.
    one = cell_statistics(theta[:1], sigma[:1], torch.tensor([[-math.inf, math.inf]], dtype=F64))
    assert one.kappa.item() == 0 and one.mean_abs.item() == 0 and one.prob.item() == 1
    # Very fine grid (step 0.01 sd over +-9 sd): kappa = 1/(1 + h^2/12) to ~1e-9.
    h = 0.01
    edges = torch.arange(-900, 901, dtype=F64) * h + 0.5 * h
    fine = torch.cat([torch.tensor([-math.inf], dtype=F64), edges, torch.tensor([math.inf], dtype=F64)])
    f = cell_statistics(theta[:1], sigma[:1], fine.unsqueeze(0))
    assert f.kappa.item() == pytest.approx(1 / (1 + h * h / 12), abs=1e-9)
    assert f.m4.item() == pytest.approx(3.0, abs=1e-3)


def test_sigma_zero_freezes_the_code():
    """``sigma = 0``: every edge away from theta is at ~+-1e307 standard units; kappa = 0.

    Regression: m4 was NaN here (0 * mean**4 with the empty cells' mean ~1e307).
    """
    theta = torch.tensor([0.3, 0.3], dtype=F64)
    b = torch.tensor([[-math.inf, -1.0, 0.0, 1.0, math.inf]] * 2, dtype=F64)
    s = cell_statistics(theta, torch.tensor([0.0, 1e-300], dtype=F64), b)
    assert (s.kappa == 0).all() and (s.mean_abs == 0).all() and (s.coverage == 1).all()
    assert (s.m4 == 0).all()
    assert torch.isfinite(s.mean).all()


# --------------------------------------------------------------------------- bad input


def _ok():
    theta = torch.zeros(3, dtype=F64)
    sigma = torch.ones(3, dtype=F64)
    b = torch.tensor([[-math.inf, -1.0, 1.0, math.inf]] * 3, dtype=F64)
    return theta, sigma, b


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("arg", ["theta", "sigma"])
def test_non_finite_theta_sigma_rejected(arg, bad):
    theta, sigma, b = _ok()
    {"theta": theta, "sigma": sigma}[arg][1] = bad
    with pytest.raises(ValueError, match=rf"^{arg} contains 1 non-finite.*index \(1,\)"):
        cell_statistics(theta, sigma, b)


def test_nan_boundary_rejected():
    theta, sigma, b = _ok()
    b[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"boundaries contains NaN.*\(2, 1\)"):
        cell_statistics(theta, sigma, b)


def test_unsorted_boundaries_name_row_and_index():
    theta, sigma, b = _ok()
    b[1, 2] = -2.0  # row 1: -inf, -1, -2, inf
    with pytest.raises(ValueError, match=r"row 1 has boundaries\[1, 1\] = -1\.0 > boundaries\[1, 2\] = -2\.0"):
        cell_statistics(theta, sigma, b)


def test_negative_sigma_rejected():
    theta, sigma, b = _ok()
    sigma[2] = -1e-3
    with pytest.raises(ValueError, match=r"sigma must be >= 0; sigma\[2\]"):
        cell_statistics(theta, sigma, b)


@pytest.mark.parametrize(
    "theta_shape, sigma_shape, b_shape, match",
    [
        ((3, 1), (3,), (3, 4), r"theta must have shape \[d\]"),
        ((3,), (3, 1), (3, 4), r"sigma must have shape \[d\]"),
        ((3,), (3,), (4,), r"boundaries must have shape \[d, K\+1\]"),
        ((3,), (2,), (3, 4), r"disagree on d"),
        ((3,), (3,), (2, 4), r"disagree on d"),
        ((3,), (3,), (3, 1), r"at least 2 edges"),
    ],
)
def test_shape_mismatch_rejected(theta_shape, sigma_shape, b_shape, match):
    theta = torch.zeros(theta_shape, dtype=F64)
    sigma = torch.ones(sigma_shape, dtype=F64)
    b = torch.linspace(-1, 1, math.prod(b_shape), dtype=F64).reshape(b_shape).sort(-1).values
    with pytest.raises(ValueError, match=match):
        cell_statistics(theta, sigma, b)


def test_leakage_bad_input():
    theta, sigma, b = _ok()
    s = cell_statistics(theta, sigma, b)
    w = torch.ones(2, 3, dtype=F64)
    for bad in (math.nan, math.inf):
        w_bad = w.clone()
        w_bad[1, 2] = bad
        with pytest.raises(ValueError, match=r"^influence contains 1 non-finite.*\(1, 2\)"):
            record_leakage(w_bad, s, 100)
        with pytest.raises(ValueError, match=r"^influence contains"):
            baseline_leakage(w_bad, 100)
    for n in (1, 0, -5, math.nan):
        with pytest.raises(ValueError, match=r"n \(number of training records\) must be >= 2"):
            record_leakage(w, s, n)
        with pytest.raises(ValueError, match=r"n \(number"):
            baseline_leakage(w, n)
    with pytest.raises(ValueError, match=r"influence must have shape \[R, d\]"):
        record_leakage(torch.ones(3, dtype=F64), s, 100)
    with pytest.raises(ValueError, match=r"influence has d = 2 coordinates but stats has 3"):
        record_leakage(torch.ones(2, 2, dtype=F64), s, 100)
    with pytest.raises(ValueError, match=r"exact1d.*d = 1.*got d = 3"):
        record_leakage(w, s, 100, method="exact1d")
    with pytest.raises(ValueError, match=r"unknown method 'exact'"):
        record_leakage(w, s, 100, method="exact")  # type: ignore[arg-type]
    moments = cell_moments(theta, sigma, b)
    with pytest.raises(TypeError, match=r"method='mc' needs CellStatistics"):
        record_leakage(w, moments, 100, method="mc")
    # CellMoments are enough for the Gaussian form, and "auto" resolves to it.
    assert torch.allclose(record_leakage(w, moments, 100), record_leakage(w, s, 100, method="clt"))
    with pytest.raises(ValueError, match=r"at least one record"):
        mis_from_leakage(torch.zeros(0, dtype=F64))
    with pytest.raises(ValueError, match=r"leakage must have shape \[R\]"):
        mis_from_leakage(torch.zeros(2, 2, dtype=F64))


def test_validate_false_skips_checks_only():
    theta, sigma, b = _ok()
    a = cell_statistics(theta, sigma, b)
    c = cell_statistics(theta, sigma, b, validate=False)
    assert isinstance(c, CellStatistics)
    assert torch.equal(a.kappa, c.kappa) and torch.equal(a.prob, c.prob)


def test_monte_carlo_form_is_finite_when_coordinates_have_no_cell_mass():
    """Hypothesis found it: sigma = 0 with zero-width cells gives coordinates whose cells carry
    no probability; their sampled cell means were the undefined mean of an empty cell (7e306)
    and the Monte Carlo leakage NaN. They carry nothing: every method reads 0 here."""
    theta = torch.zeros(5, dtype=F64)
    sigma = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=F64)
    edges = torch.tensor([[1 / 6, 1 / 6], [0, 0], [0, 0], [-1 / 6, -1 / 6], [0, 0]], dtype=F64)
    s = cell_statistics(theta, sigma, edges)
    w = torch.randn(1, 5, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3.0
    for method in ("clt", "mc", "auto"):
        leak = record_leakage(w, s, 2, method=method, mc_draws=256, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(leak).all() and float(leak.max()) <= float(baseline_leakage(w, 2).max())
