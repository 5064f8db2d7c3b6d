"""The sampled-label Monte Carlo Gauss-Newton diagonal (``hessian="ggn_mc"``) and the float32
per-layer passes of the diagonal estimator (method.md section 4, "Precision" and "Monte Carlo
Gauss-Newton")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _nets import Conv1dHead
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.config import EstimationConfig
from mis_lightning.estimation import estimate
from mis_lightning.estimation.estimate import MomentAccumulator
from mis_lightning.estimation.record_draws import record_labels, record_signs


def _ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


def _mse(o, y):
    return ((o - y) ** 2).sum(-1)


def _wavy(o, y):
    """A loss whose Hessian in the outputs, ``diag(-sin(o) y)``, is indefinite."""
    return (torch.sin(o) * y).sum(-1)


def _data(c: int, loss: str, b: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, 6, generator=g, dtype=torch.float64)
    Y = torch.randint(0, c, (b,), generator=g) if loss == "ce" else torch.randn(b, c, generator=g, dtype=torch.float64)
    return X, Y


def _mlp(c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, c)).double().eval()


def _acc(model, loss, X, Y, hessian, seed=0, samples=1):
    acc = MomentAccumulator(model, loss, mode="diagonal", hessian=hessian, num_records=4, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(seed), ggn_mc_samples=samples)
    acc.update((X, Y))
    return acc


@pytest.mark.parametrize("loss", ["ce", "mse", "wavy"])
def test_mean_over_seeds_equals_the_exact_gauss_newton_diagonal(loss):
    """Softmax cross-entropy (sampled labels, 5 classes), MSE on 3 outputs (Rademacher draws
    over the eigen-directions of L) and an indefinite L (a positive and a negative draw per
    record, one sample: each weighted 1 / ggn_mc_samples, not 1 / directions): the mean of 64 seeds' estimates equals the exact
    GGN diagonal within 4.5 of its own standard errors (empirical, over the seeds; plus 1e-10
    relative where a weight's draws do not vary) for every one of the 101 / 86 weights (a
    normal |z| above 4.5 anywhere: ~1e-3 chance), and the
    reported error bound is at least the seeds' spread (median over weights, 10 % slack for
    the spread's own sampling error)."""
    c = 5 if loss == "ce" else 3
    model, fn = _mlp(c), {"ce": _ce, "mse": _mse, "wavy": _wavy}[loss]
    X, Y = _data(c, loss)
    exact = _acc(model, fn, X, Y, "ggn")
    assert exact.hessian == "ggn" and type(exact.factored).__name__ == "LayerProgram"
    want = exact.state["h_sum"]
    K = 64
    mc = _acc(model, fn, X, Y, "ggn_mc")
    assert mc.hessian == "ggn_mc"
    # more draws from the same program, one seed each: a record's draws are a function of its
    # content and the seed (record_draws), so the same batch again at the same seed draws the same
    draws = []
    for k in range(K):
        mc.factored.mc_seed = 1000 + k
        draws.append(mc.factored.batch(X, Y, X.shape[0]))
    H = torch.stack([torch.cat([h[n] for n in mc.names]) for _, h, _ in draws])
    se = H.std(0) / K ** 0.5
    live = want.abs() > 1e-12 * float(want.abs().max())
    gap = (H.mean(0) - want).abs()
    assert bool((gap <= 4.5 * se + 1e-10 * want.abs()).all()), float((gap / se)[live].max())
    spread = (H.std(0)[live] / want[live].abs()).median()
    bound = (mc.state["h2_sum"].sqrt()[live] / want[live].abs()).median()
    assert float(bound) >= 0.9 * float(spread) or loss == "wavy"  # a bound for PSD L only


def test_draws_are_reproducible_from_the_generator_and_leave_the_global_rng_alone():
    model = _mlp(5)
    X, Y = _data(5, "ce")
    state = torch.get_rng_state()
    a, b, c = (_acc(model, _ce, X, Y, "ggn_mc", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.state["h_sum"], b.state["h_sum"])
    assert not torch.equal(a.state["h_sum"], c.state["h_sum"])
    assert torch.equal(torch.get_rng_state(), state)
    # more samples per record: the error bound falls as 1 / sqrt(samples) (within 25 %)
    r1 = _acc(model, _ce, X, Y, "ggn_mc", samples=1).finalize().diagnostics["ggn_mc_median_relative_error"]
    r16 = _acc(model, _ce, X, Y, "ggn_mc", samples=16).finalize().diagnostics["ggn_mc_median_relative_error"]
    assert 0.75 / 4 < r16 / r1 < 1.25 / 4


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_draws_follow_the_records_not_their_batching_or_order(loss):
    """The same records and weights give the same sampled-label (5-class cross-entropy) and
    Rademacher (MSE, 3 outputs) Gauss-Newton diagonal and Monte Carlo error bound in one batch
    of 32, in batches of 8 in another order and in batches of 5: each record's draws are a
    function of its content key and the seed (record_draws), not of its place in the stream
    (drawn in batch order, the diagonals differed by the Monte Carlo error, ~30-100 % per
    weight). Two accumulators over uneven shards, summed (what a DDP sync of the Metric's sum
    states forms), too. Tolerance 1e-12 relative: the float64 sums over batches added in another
    order (measured <= 1.5e-15)."""
    c = 5 if loss == "ce" else 3
    model, fn = _mlp(c), {"ce": _ce, "mse": _mse}[loss]
    X, Y = _data(c, loss)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(5))

    def run(order, size):
        acc = MomentAccumulator(model, fn, mode="diagonal", hessian="ggn_mc", num_records=4, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(3))
        for a in range(0, len(order), size):
            acc.update((X[order[a:a + size]], Y[order[a:a + size]]))
        assert acc.factored.ggn_choice == "ggn_mc"
        return acc.state["h_sum"].clone(), acc.state["h2_sum"].clone()

    h, h2 = run(torch.arange(32), 32)
    shards = [run(perm[:13], 4), run(perm[13:], 7)]
    for h_o, h2_o in (run(perm, 8), run(torch.arange(32), 5), tuple(a + b for a, b in zip(*shards))):
        torch.testing.assert_close(h_o, h, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(h2_o, h2, rtol=1e-12, atol=1e-15)


def test_keyed_draws_have_the_law_and_follow_the_keys():
    """record_draws: labels drawn with the probabilities p and Rademacher signs with mean 0 and
    no correlation between draws, over 40,000 random keys (within 4.5 standard errors: a normal
    |z| above that anywhere here, ~1e-4 chance); permuted keys permute the draws; another seed
    draws others."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 2**31 - 1, (40_000,), generator=g)
    p = torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64).expand(40_000, 4)
    y = record_labels(p, keys, seed=7, samples=2)
    assert y.shape == (2, 40_000)
    freq = torch.stack([torch.bincount(r, minlength=4) for r in y]).double() / 40_000
    se = (p[0] * (1 - p[0]) / 40_000).sqrt()
    assert bool(((freq - p[0]).abs() <= 4.5 * se).all()), freq
    xi = record_signs(keys, seed=7, samples=2, width=3)
    assert xi.shape == (2, 40_000, 3) and bool((xi.abs() == 1).all())
    flat = xi.permute(1, 0, 2).reshape(40_000, 6)
    assert float(flat.mean(0).abs().max()) <= 4.5 / 200
    corr = (flat.T @ flat / 40_000 - torch.eye(6, dtype=torch.float64)).abs().max()
    assert float(corr) <= 4.5 / 200
    perm = torch.randperm(40_000, generator=g)
    assert torch.equal(record_labels(p, keys[perm], seed=7, samples=2), y[:, perm])
    assert torch.equal(record_signs(keys[perm], seed=7, samples=2, width=3), xi[:, perm])
    assert float((record_labels(p, keys, seed=8, samples=2) != y).double().mean()) > 0.5


_SmallCNN = Conv1dHead


@pytest.mark.parametrize("c, want", [(4, "ggn"), (5, "ggn_mc")])
def test_auto_takes_the_sampled_labels_above_three_directions_and_the_report_names_it(c, want):
    """Cross-entropy over 4 classes needs 3 Gauss-Newton directions (exact); over 5, 4
    (sampled labels). assess's report names the estimator; with 48 records the Monte Carlo
    error (median ~0.3 here) is above 10 % and gets a warnings line."""
    torch.manual_seed(1)
    model = _SmallCNN(c).eval()
    X, Y = torch.randn(48, 2, 6), torch.randint(0, c, (48,))
    # the diagonal sandwich asked for: "auto" would take the exact one for this cheap model
    rep = ml.assess(model, ["int8_weight_only"], DataLoader(TensorDataset(X, Y), batch_size=16), _ce,
                    num_records=8, uncertainty_draws=0, estimation="diagonal")
    assert rep.estimation["hessian"] == want
    mc = [w for w in rep.warnings if "hessian='ggn_mc'" in w]
    if want == "ggn_mc":
        assert "sampled-label Monte Carlo Gauss-Newton" in rep.estimation["estimator"]
        assert "4 directions > 3" in rep.estimation["reason"]
        err = rep.diagnostics["ggn_mc_median_relative_error"]
        assert err > 0.1 and len(mc) == 1 and f"{err:.2g}" in mc[0]
    else:
        assert "Gauss-Newton Hessian diagonal" in rep.estimation["estimator"] and not mc
        assert "ggn_mc_median_relative_error" not in rep.diagnostics


def test_paths_without_a_saving_form_the_exact_diagonal_and_say_so():
    """One output per record (the factored nn.Linear path) and the torch.func path: one
    direction, or every output Jacobian formed anyway: ``ggn_mc`` gives the exact diagonal,
    named as such, with the reason."""
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    X, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, dtype=torch.float64)

    def sq(o, t):
        return (o[:, 0] - t) ** 2

    for kw in ({}, {"use_factors": False}):
        mc = MomentAccumulator(m1, sq, mode="diagonal", hessian="ggn_mc", num_records=4, **kw)
        ex = MomentAccumulator(m1, sq, mode="diagonal", hessian="ggn", num_records=4, **kw)
        mc.update((X, y)), ex.update((X, y))
        assert mc.hessian == "ggn" and "hessian='ggn_mc': the exact Gauss-Newton diagonal" in mc.reason
        torch.testing.assert_close(mc.state["h_sum"], ex.state["h_sum"], rtol=0, atol=0)


def test_options_are_checked_and_the_loss_hook_has_no_outputs_for_it():
    with pytest.raises(ValueError, match="ggn_mc_samples must be an integer >= 1, got 0"):
        EstimationConfig(ggn_mc_samples=0)
    assert EstimationConfig(hessian="ggn_mc", ggn_mc_samples=3).estimator_kwargs()["ggn_mc_samples"] == 3

    class Hooked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

        def mis_per_sample_loss(self, batch):
            x, y = batch
            return _ce(self(x), y)

    with pytest.raises(ValueError, match="hessian='ggn_mc' needs model outputs"):
        ml.MISIndicator(Hooked(), schemes=["int8_weight_only"], estimation_config=EstimationConfig(hessian="ggn_mc"))


class _Wide(nn.Module):
    """11,011 weights (above FAST_FLOAT64_MAX_PARAMS), 3 classes: the exact GGN."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 32, 5, padding=2)
        self.conv2 = nn.Conv1d(32, 48, 5, padding=2)
        self.norm = nn.LayerNorm(16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(48 * 16, c)

    def forward(self, x):
        h = self.norm(torch.relu(self.conv2(torch.relu(self.conv(x)))))
        return self.head(torch.tanh(self.mid(h)).flatten(1))


def test_float32_passes_match_the_float64_path_on_sigma_and_the_leakage():
    """Above 10^4 weights the per-layer passes compute in float32 (sums in float64); the
    float64 path is the ``dtype=torch.float64`` one. sigma: median relative difference below
    1e-6 and every weight's below 1e-4 (measured: median 1e-7, 99th percentile 3e-6, worst
    1.3e-5, a convolution weight whose per-sample gradients cancel over positions); the
    leakage: 1e-6 relative (measured 8e-10; method.md section 4, "Precision")."""
    torch.manual_seed(0)
    model = _Wide().eval()
    X, Y = torch.randn(256, 4, 16), torch.randint(0, 3, (256,))
    loader = DataLoader(TensorDataset(X, Y), batch_size=64)
    d = sum(p.numel() for p in model.parameters())
    assert d > 10_000
    kw = dict(mode="diagonal", hessian="ggn", num_records=32)
    e32 = estimate(model, loader, _ce, **kw)
    e64 = estimate(model, loader, _ce, dtype=torch.float64, **kw)
    assert e32._program.dtype == torch.float32 and e64._program.dtype == torch.float64
    rel = torch.cat([((e32.sigma[n] - e64.sigma[n]).abs() / e64.sigma[n].abs().clamp_min(1e-30)) for n in e64.names])
    assert float(rel.median()) < 1e-6 and float(rel.max()) < 1e-4  # measured 1e-7 and 1.3e-5
    r32, r64 = (ml.score_schemes(e, model, ["int8_weight_only"], uncertainty_draws=0) for e in (e32, e64))
    l32, l64 = r32.schemes["int8_weight_only"].leakage, r64.schemes["int8_weight_only"].leakage
    assert abs(l32 - l64) <= 1e-6 * abs(l64)  # measured 8e-10


def test_float32_counts_a_softmax_null_direction_as_zero():
    """4 classes in float32 (11,780 weights): the softmax's constant direction (eigenvalue ~1e-8
    of the largest, rounding) is no Gauss-Newton direction: 3 directions, so "auto" keeps the
    exact diagonal and no backward pass is spent on it."""
    torch.manual_seed(0)
    model = _Wide(4).eval()
    acc = MomentAccumulator(model, _ce, num_records=4)
    acc.update((torch.randn(16, 4, 16), torch.randint(0, 4, (16,))))
    assert acc.factored.dtype == torch.float32 and acc.factored.ggn_directions == 3
    assert (acc.mode, acc.hessian) == ("diagonal", "ggn")
