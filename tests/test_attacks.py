"""Empirical attacks (mis_lightning.groundtruth.attacks): the torchmetrics ROC path, the pool
protocol's splits and the attacks' scores against hand computations on tiny pools."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mis_lightning.groundtruth.attacks import (
    lira_scores,
    pool_advantage,
    pool_splits,
    released_parameters,
    rmia_scores,
    roc_metrics,
    whitebox_scores,
)


def test_roc_metrics_known_values():
    sep = roc_metrics(np.array([2.0, 3.0, 4.0]), np.array([-1.0, 0.0, 1.0]))
    assert (sep.auc, sep.tpr_at_1fpr, sep.advantage) == (1.0, 1.0, 1.0)
    same = roc_metrics(np.zeros(5), np.zeros(7))
    assert same.advantage == 0.0 and same.auc == 0.5 and same.tpr_at_1fpr == 0.0
    # members {3, 1}, non-members {2, 0}: thresholds give (FPR, TPR) = (0, .5), (.5, .5), (.5, 1), (1, 1)
    mixed = roc_metrics(np.array([3.0, 1.0]), np.array([2.0, 0.0]))
    assert mixed.advantage == 0.5 and mixed.auc == 0.75 and mixed.tpr_at_1fpr == 0.5
    # reversed scores: no threshold beats chance, the advantage is 0 (TPR = FPR = 0), AUC 0
    rev = roc_metrics(np.array([-3.0, -2.0]), np.array([1.0, 2.0]))
    assert rev.advantage == 0.0 and rev.auc == 0.0


def test_roc_metrics_large_scores_not_saturated():
    # log-likelihood ratios of 40 vs 39: a sigmoid (torchmetrics' treatment of preds outside
    # [0, 1]) maps both to 1.0 in float64 and would report advantage 0; the rank transform keeps them apart
    m = roc_metrics(np.full(10, 40.0), np.full(10, 39.0))
    assert m.advantage == 1.0 and m.auc == 1.0


def test_roc_metrics_gaussian_advantage():
    # N(1, 1) vs N(0, 1): best threshold at 0.5, advantage 2 Phi(0.5) - 1 = 0.3829, AUC Phi(1/sqrt 2) = 0.7602;
    # with 20,000 per side the empirical max has s.e. ~0.005 (+ an upward bias ~0.005): tolerance 0.02
    g = np.random.default_rng(0)
    m = roc_metrics(g.normal(1, 1, 20000), g.normal(0, 1, 20000))
    assert m.advantage == pytest.approx(2 * stats.norm.cdf(0.5) - 1, abs=0.02)
    assert m.auc == pytest.approx(stats.norm.cdf(1 / math.sqrt(2)), abs=0.01)


def test_roc_metrics_errors():
    with pytest.raises(ValueError, match="needs members and non-members"):
        roc_metrics(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="must be finite"):
        roc_metrics(np.array([np.nan]), np.array([1.0]))


def test_pool_splits_halves():
    member = pool_splits(101, 64, seed=3)
    assert member.shape == (64, 101) and member.dtype == bool
    assert (member.sum(1) == 50).all()  # every model trains on exactly N // 2 records
    frac = member.mean(0)  # each record IN in about half the models: binomial(64, 50/101), sd 0.0625
    assert abs(frac.mean() - 50 / 101) < 1e-12
    assert frac.min() > 0.2 and frac.max() < 0.8
    assert (pool_splits(101, 64, seed=3) == member).all()
    assert not (pool_splits(101, 64, seed=4) == member).all()
    with pytest.raises(ValueError, match="num_members must be in"):
        pool_splits(10, 4, num_members=10)


def _mean_pool(num_models: int = 8, num_records: int = 40, seed: int = 0):
    """Tiny pool: records y_i ~ N(0, 1), each model = the mean of its half (a linear model, d = 1)."""
    g = np.random.default_rng(seed)
    y = g.normal(size=num_records)
    member = pool_splits(num_records, num_models, seed=seed)
    theta = (member * y).sum(1) / member.sum(1)  # [M]
    return y, member, theta


def test_lira_scores_match_hand_computation():
    y, member, theta = _mean_pool()
    sig = -(theta[:, None] - y[None]) ** 2  # negative squared error, [M, N]
    on, off = lira_scores(sig, member, online=True), lira_scores(sig, member, online=False)
    m, i = 2, 5
    refs = np.arange(len(theta)) != m
    s_in, s_out = sig[refs & member[:, i], i], sig[refs & ~member[:, i], i]
    lp = lambda s, v: stats.norm.logpdf(s, v.mean(), v.std(ddof=1))  # noqa: E731
    assert on[m, i] == pytest.approx(lp(sig[m, i], s_in) - lp(sig[m, i], s_out), rel=1e-9)
    assert off[m, i] == pytest.approx((sig[m, i] - s_out.mean()) / s_out.std(ddof=1), rel=1e-9)


def test_rmia_scores_match_hand_computation():
    y, member, theta = _mean_pool()
    p = np.exp(-0.5 * (theta[:, None] - y[None]) ** 2)
    M, N = p.shape
    m, i, a = 1, 7, 0.3
    refs = np.arange(M) != m
    for online, px in ((True, p[refs].mean(0)),
                       (False, ((1 + a) * np.array([p[refs & ~member[:, j], j].mean() for j in range(N)]) + 1 - a) / 2)):
        ratio = p[m] / px
        for gamma in (1.0, 2.0):
            want = np.mean([ratio[i] / ratio[j] >= gamma for j in range(N) if j != i])
            got = rmia_scores(p, member, online=online, offline_a=a, gamma=gamma)[m, i]
            assert got == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match=r"likelihoods in \(0, 1\]"):
        rmia_scores(p * 2, member)


def test_whitebox_one_coordinate_is_lira_on_the_weight():
    # d = 1: the statistic is theta * psi_i / C, a per-record rescaling (sign included) of the
    # released weight; LiRA online is invariant to it, so the scores equal LiRA on theta itself
    y, member, theta = _mean_pool()
    psi = (y - y.mean())[:, None]
    lira = lira_scores(np.repeat(theta[:, None], len(y), 1), member, online=True)
    for cov in (None, np.array([[0.02]])):  # sample covariance, or the estimator's plus the release's extra
        wb = whitebox_scores(theta[:, None], member, psi, online=True, estimator_cov=cov)
        np.testing.assert_allclose(wb, lira, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match=r"estimator_cov must be \[1, 1\]"):
        whitebox_scores(theta[:, None], member, psi, estimator_cov=np.eye(2))


def test_pool_advantage_separable_and_null():
    member = pool_splits(60, 6, seed=1)
    sep = pool_advantage(member.astype(float), member)
    assert sep.advantage == 1.0 and sep.max_advantage == 1.0 and sep.advantage_se == 0.0 and sep.auc == 1.0
    flat = pool_advantage(np.zeros(member.shape), member)
    assert flat.advantage == 0.0 and flat.max_advantage == 0.0 and flat.auc == 0.5


def test_pool_advantage_null_is_not_the_splits():
    # scores that separate the first N/2 records from the rest, unrelated to membership. With the
    # null's label permutations drawn from the splits' own seed, the permuted labels were exactly
    # "index < N/2" and the null advantage was 1.0; a random relabelling gives ~0.87 sqrt(2 / 500) = 0.055
    N, M = 1000, 4
    member = pool_splits(N, M, seed=0)
    scores = np.repeat((np.arange(N) < N // 2).astype(float)[None], M, 0)
    res = pool_advantage(scores, member, seed=0)
    assert res.null_max_advantage < 0.15
    assert res.advantage < 0.15  # membership is random with respect to the index


def test_pool_protocol_mean_estimator_white_box_advantage():
    """Pool of N = 40 records, 120 models each the mean of a random half (n = 20). Given the pool,
    the mean of a half has sd ~ sd(y) sqrt((N - n) / (n (N - 1))) and membership of y_i shifts it
    by (y_i - ybar) / n: the optimal test's advantage is E_i[2 Phi(delta_i / 2) - 1] with
    delta_i = |y_i - ybar| / (n sd) (0.101 here). The white-box LiRA (online, 119 references)
    reaches it: measured 0.112 +- 0.013 (s.e. over targets); tolerance 0.04 (3 s.e.)."""
    g = np.random.default_rng(5)
    N, M = 40, 120
    y = g.normal(size=N)
    member = pool_splits(N, M, seed=5)
    theta = (member * y).sum(1) / member.sum(1)
    n = N // 2
    sd = y.std() * math.sqrt((N - n) / (n * (N - 1)))
    delta = np.abs(y - y.mean()) / (n * sd)
    optimal = float(np.mean(2 * stats.norm.cdf(delta / 2) - 1))
    assert optimal == pytest.approx(0.101, abs=0.001)
    res = pool_advantage(whitebox_scores(theta[:, None], member, (y - y.mean())[:, None]), member)
    assert res.advantage == pytest.approx(optimal, abs=0.04)
    assert res.advantage_se < 0.02


def test_released_parameters_dequantized():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 2)
    rel = released_parameters(lin, "rtn_int2")
    assert rel["weight"].dtype == torch.float64 and rel["weight"].shape == (2, 8)
    assert torch.equal(rel["bias"], lin.bias.detach().double())  # biases are released in float
    # symmetric 2-bit absmax per row: at most 4 distinct values per row, the row's max |w| kept
    for r in range(2):
        assert len(torch.unique(rel["weight"][r])) <= 4
    none = released_parameters(lin, "none")
    assert torch.equal(none["weight"], lin.weight.detach().double())
