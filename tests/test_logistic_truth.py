"""The coupled-arm ground truth of logistic regression (groundtruth/logistic.py): its Taylor
solve against full Newton fits, and its three TV estimates against known truths."""

from __future__ import annotations

import numpy as np
import pytest

from mis_lightning.groundtruth import ground_truth as GT
from mis_lightning.groundtruth import logistic as LG

pytestmark = pytest.mark.usefixtures("one_thread")


def test_taylor_solve_equals_full_newton_fits():
    """Adding one record through the quartic Taylor model of the other records' score equals a
    full Newton fit of all records to 1e-6 sd (measured 2e-8 at n = 1000; n = 300 moves the MLE
    ~3x further per record, the error grows like |D|^4)."""
    s = GT.make_setting("logistic", 2, 300)
    assert LG.taylor_error(s, M=64) < 1e-6


def test_estimates_bracket_a_known_tv():
    """Two known laws on 6 cells, arms drawn independently (no coupling): the split-sample
    estimate sits below the TV, the plug-in above, the test with the true likelihood-ratio
    sign on it, each within 4 standard errors (sd of one estimate ~ sqrt(2 / M))."""
    rng = np.random.default_rng(0)
    p = np.array([0.30, 0.25, 0.20, 0.10, 0.10, 0.05])
    q = np.array([0.20, 0.25, 0.25, 0.15, 0.05, 0.10])
    tv = 0.5 * np.abs(p - q).sum()
    M = 200_000
    keys_in = rng.choice(6, M, p=p).astype(np.int64)
    keys_out = rng.choice(6, (M, 2), p=q).astype(np.int64)
    uniq = np.unique(np.concatenate([keys_in, keys_out.reshape(-1)]))
    assert uniq.tolist() == list(range(6))

    def llr_of(first: np.ndarray, half: int) -> np.ndarray:
        cells = np.concatenate([keys_in, keys_out.reshape(-1)])[first]
        return np.log(p[cells] / q[cells])

    r = LG.tv_bracket(keys_in, keys_out, llr_of)
    se = np.sqrt(2.0 / M)
    assert abs(r["test"] - tv) < 4 * se
    assert r["split"] < tv + 4 * se
    assert r["plug"] > tv - 4 * se
    assert r["split"] <= r["plug"]


def _coupled_keys(seed: int, M: int, nulls: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Coupled arms on ``8 + nulls`` cells: each of 2 out draws equals the in key with
    probability 0.7 (a record that moves nothing), else a fresh draw from the same law; then out
    draws in cells 0-3 move to cells 4-7 with probability 0.3. Cells 0-7 hold mass 0.025 each
    (TV 0.03), the ``nulls`` others share 0.8 (``mu_c = 0``: the plug-in's floor)."""
    rng = np.random.default_rng(seed)
    K = 8 + nulls
    p = np.full(K, 0.8 / max(nulls, 1))
    p[:8] = 0.025 if nulls else 0.125
    keys_in = rng.choice(K, M, p=p).astype(np.int64)
    keys_out = np.where(rng.random((M, 2)) < 0.7, keys_in[:, None], rng.choice(K, (M, 2), p=p))
    moved = (rng.random((M, 2)) < 0.3) & (keys_out < 4)
    keys_out = np.where(moved, keys_out + 4, keys_out).astype(np.int64)
    p_out = p.copy()
    p_out[:4] *= 0.7
    p_out[4:8] += 0.3 * p[:4]
    return keys_in, keys_out, 0.5 * float(np.abs(p - p_out).sum())


def test_debiased_plug_in_removes_part_of_the_noise_floor():
    """``tv_debiased`` on known laws. No null cell (every ``mu_c`` resolved): equal to the
    plug-in (no floor to remove). 32 null cells at M = 200,000: measured over seeds 0-3 the
    plug-in +6.6 to +10%, the debiased estimate +3.5 to +6% -- it removes 35-45% of the excess
    (a null cell's moment root is >= 0, so it keeps part of its noise: an upper-side estimate
    where cells are noise-dominated, docs/benchmarks.md cov46). Asserted: it removes 20-70% of
    the excess and stays above the TV (seed 1: plug +6.6%, debiased +3.5%), and its plug-in is
    tv_bracket's. Dropping the in-out cross terms from the noise (uncoupled arms' noise) removes
    more than the excess and fails the bound."""
    keys_in, keys_out, tv = _coupled_keys(1, 20_000, 0)
    r = LG.tv_debiased(keys_in, keys_out)
    assert r["debiased"] == pytest.approx(r["plug"], rel=1e-9)
    keys_in, keys_out, tv = _coupled_keys(1, 200_000, 32)
    r = LG.tv_debiased(keys_in, keys_out)
    excess = r["plug"] - tv
    assert excess > 0.04 * tv, (r, tv)
    assert 0.2 * excess < r["plug"] - r["debiased"] < 0.7 * excess, (r, tv)
    assert r["plug"] == pytest.approx(LG.tv_bracket(keys_in, keys_out)["plug"], rel=1e-12)


def test_coupled_test_estimate_matches_the_exact_ols_truth():
    """The coupled estimates on OLS releases (``simulate_ols``: the in and out arms on the same
    designs) against the exact ``d = 2`` truth (quadrature given the design): the Gaussian
    test's value within 5% (a target with a large TV, 0.03-0.13: the estimates' Monte Carlo sd
    at M = 10^5 is ~1% there, ~10-20% for a target with TV 0.005; the Gaussian LR is the true
    one for OLS, so no slack), split <= exact <= plug up to the same tolerance."""
    s = GT.make_setting("linear", 2, 400, rho=0.5)
    zx, zy = GT.draw_records(s, 3, np.random.default_rng(3))
    rng = np.random.default_rng(5)
    M = 100_000
    sims = GT.simulate_ols(s, zx[0], zy[0], M, rng)
    th_in, th_out = sims["in"], sims["out"]
    mean, cov = th_out.mean(0), np.cov(th_out, rowvar=False)
    half = np.arange(M) % 2 == 0
    shifts = [th_in[h].mean(0) - th_out[h].mean(0) for h in (half, ~half)]
    reps = np.concatenate([th_in, th_out])
    for step, offset in [(0.5, 0.0), (2.0, 0.5), (4.0, 0.0)]:
        g = GT.StepGrid("g", s.sd * step, offset=offset, origin=s.theta_star)
        exact = GT.exact_tv_ols_2d(s, g, zx[0], zy[0], K=300, seed=0)
        r = LG.tv_bracket(LG.cell_keys(g, th_in), LG.cell_keys(g, th_out[:, None]),
                          lambda first, h, g=g: GT._llr_full(g, reps[first], mean, shifts[h], cov, seed=h))
        tol = 0.05 * exact
        assert abs(r["test"] - exact) < tol, (step, offset, r, exact)
        assert r["split"] < exact + tol and r["plug"] > exact - tol, (step, offset, r, exact)


def test_exact_truth_logistic_refuses_linear_settings_and_unbinned_absmax_keys():
    with pytest.raises(ValueError, match="logistic setting"):
        LG.logistic_base(GT.make_setting("linear", 2, 200), 10)
    with pytest.raises(ValueError, match="bin_width"):
        LG.cell_keys(GT.AbsmaxGrid("rtn_int4", 4), np.zeros((3, 2)))


def test_absmax_keys_are_a_function_of_the_release():
    """Two weight vectors with the same release (index, sign and value of the largest weight,
    codes of the others) share a key; another largest value's bin, sign or index does not."""
    g = GT.AbsmaxGrid("rtn_int4", 4)
    th = np.array([[0.50, 0.101], [0.50, 0.102], [0.50, -0.30], [-0.50, 0.101], [0.101, 0.50], [0.61, 0.101]])
    k = LG.cell_keys(g, th, 0.05)
    assert k[0] == k[1]  # same codes (scale 0.5 / 7: 0.101 and 0.102 both code 1)
    assert len(set(k[[0, 2, 3, 4, 5]].tolist())) == 5


def test_exact_truth_logistic_small_run_orders_its_estimates():
    """A small end-to-end run (M = 4,000 coupled datasets, 4 targets, a 4-sd grid): the three
    estimates are finite, ordered split <= plug, and the test's value lies within the
    bracket's noise (null arm)."""
    s = GT.make_setting("logistic", 2, 200)
    g = GT.StepGrid("g", s.sd * 4, offset=0.5, origin=s.theta_star)
    r = LG.exact_truth_logistic(s, [g], Z=4, M=4000, oracle_records=500)
    assert np.isfinite([r["split"][0], r["test"][0], r["plug"][0]]).all()
    assert (r["split_z"] <= r["plug_z"] + 1e-12).all()
    assert r["test"][0] <= r["plug"][0] + r["null"][0]


def _tv_bracket_reference(keys_in, keys_out, llr_of):
    """tv_bracket as first written (one np.unique over both arms per call), the reference of
    the counted-once out arm (OutCells)."""
    M, R = keys_out.shape
    uniq, first, inv = np.unique(np.concatenate([keys_in, keys_out.reshape(-1)]), return_index=True,
                                 return_inverse=True)
    i_in, i_out = inv[:M], inv[M:].reshape(M, R)
    half = np.arange(M) % 2 == 0

    def mu(sel):
        return (np.bincount(i_in[sel], minlength=uniq.size) - np.bincount(i_out[sel].reshape(-1), minlength=uniq.size) / R
                ) / int(sel.sum())

    mu_all, mu_a, mu_b = mu(np.ones(M, dtype=bool)), mu(half), mu(~half)
    return {"plug": 0.5 * float(np.abs(mu_all).sum()),
            "split": 0.5 * float((mu_b * (mu_a > 0)).sum() + (mu_a * (mu_b > 0)).sum()),
            "test": 0.5 * float((mu_b * (llr_of(first, 0) > 0)).sum() + (mu_a * (llr_of(first, 1) > 0)).sum())}


@pytest.mark.parametrize("M", [999, 1000])
def test_out_cells_counted_once_give_the_reference_bracket_exactly(M):
    """The out arm's cells counted once (OutCells) and each target's keys placed among them give
    the reference's three estimates to the last bit (same cells in the same order, same sums),
    with cells only the in arm reaches (3k + 1, and below / above every out key), cells only the
    out arm reaches, and a test that depends on which release is each cell's first (as the absmax
    keys' llr does). Fails if an out-only cell's first index misses the in arm's offset M."""
    rng = np.random.default_rng(1)
    keys_out = rng.integers(0, 40, (M, 2)) * 3
    # in-only cells (3k + 1), out-only cells (k >= 30)
    keys_in = rng.integers(0, 30, M) * 3 + (rng.random(M) < 0.05)
    keys_in[:3] = [-7, 500, 500]
    vals = rng.standard_normal(M * 3)

    def llr_of(first, half):
        return vals[first] + 0.1 * half

    out = LG.OutCells(keys_out)
    for k_in in (keys_in, np.minimum(keys_out[:, 0], 87)):  # with and without in-only cells
        want = _tv_bracket_reference(k_in, keys_out, llr_of)
        assert LG.tv_bracket(k_in, out, llr_of) == want
        assert LG.tv_bracket(k_in, keys_out, llr_of) == want
    with pytest.raises(ValueError, match="keys_in"):
        LG.tv_bracket(keys_in[:-1], out)
