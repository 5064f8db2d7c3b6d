"""The diagonal estimator's finite-sample (leverage) correction (method.md section 4,
"Finite-sample (leverage) correction", the diagonal estimator): one mean leverage per loss
direction from the Hessian diagonal, ``V_jj / (1 - h_bar)``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import assess
from mis_lightning.estimation import estimate
from mis_lightning.estimation.estimate import LEVERAGE_CAP, LOSS_RANK_RECORDS, leverage_trace


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.reshape(len(y), -1) - y.reshape(len(y), -1)).square().sum(-1)


def _hadamard(n: int) -> torch.Tensor:
    H = torch.tensor([[1.0]], dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _ols(x: torch.Tensor, y: torch.Tensor, bias: bool = True) -> nn.Linear:
    """Least squares solved exactly (float64)."""
    X = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias else x
    th = torch.linalg.solve(X.T @ X, X.T @ y.reshape(len(x), -1))
    m = nn.Linear(x.shape[1], th.shape[1], bias=bias).double()
    with torch.no_grad():
        m.weight.copy_(th[: x.shape[1]].T)
        if bias:
            m.bias.copy_(th[-1])
    return m


def _flat(est, attr: str = "sigma") -> torch.Tensor:
    return torch.cat([getattr(est, attr)[k] for k in est.names])


def test_constant_leverage_design_matches_the_exact_estimators_correction():
    """Hadamard columns (X'X = n I, every record's leverage exactly d / n = 12 / 64): the exact
    estimator's HC2 covariance is HC1 there and its Hessian is diagonal, so the diagonal
    estimator's corrected sigma, influences and spread leverages must equal the exact
    estimator's leave-one-out / HC2 figures (float64 solves: 1e-8). The first-order diagonal
    figures (the code before hc27) read sigma low by sqrt(1 - 12/64) = 0.90."""
    n, d = 64, 12
    X = _hadamard(n)[:, 1 : d + 1].clone()
    g = torch.Generator().manual_seed(3)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    m = _ols(X, y, bias=False)
    dl = DataLoader(TensorDataset(X, y), batch_size=16)
    ex = estimate(m, dl, _mse, mode="exact", num_records=n)
    for hess in ("exact", "ggn"):
        dg = estimate(m, dl, _mse, mode="diagonal", hessian=hess, num_records=n)
        assert dg.diagnostics["leverage_per_direction"] == pytest.approx(d / n, rel=1e-12)
        assert dg.diagnostics["mean_leverage"] == pytest.approx(ex.diagnostics["mean_leverage"], rel=1e-10)
        torch.testing.assert_close(_flat(dg), _flat(ex), rtol=1e-8, atol=0)
        torch.testing.assert_close(dg.influence, ex.influence, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(dg.leverage, ex.leverage, rtol=1e-10, atol=0)
    fo = estimate(m, dl, _mse, mode="diagonal", num_records=n, leverage_correction=False)
    ratio = _flat(fo) / _flat(ex)
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.sqrt(1 - d / n)), rtol=1e-8, atol=0)


def test_ols_sigma_is_hc1_and_the_ratio_is_one_over_sqrt_one_minus_d_over_n():
    """Random Gaussian design, d / n = 40 / 256 = 0.16, least squares solved exactly: the
    corrected sigma is the HC1 form computed here from the residuals, ``sqrt(mean_i x_ij^2
    e_i^2 / (1 - d/n) / n) / mean_i x_ij^2`` (the diagonal trace is d exactly without weight
    decay), to 1e-9; the ratio to the first-order estimate is ``1 / sqrt(1 - d/n)`` for sigma and
    the influences, and the unit-variance influences (what correlation models are fitted to) are
    the first-order ones."""
    n, p = 256, 39
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, generator=g, dtype=torch.float64) / p**0.5 + torch.randn(n, generator=g, dtype=torch.float64)
    m = _ols(x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=64)
    on = estimate(m, dl, _mse, mode="diagonal", num_records=64)
    off = estimate(m, dl, _mse, mode="diagonal", num_records=64, leverage_correction=False)
    X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    e = (m(x.to(torch.float64)).squeeze(-1) - y).detach()
    Hjj = X.square().mean(0)
    hc1 = ((X * e[:, None]).square().mean(0) / (1 - (p + 1) / n) / n).sqrt() / Hjj
    # dg30: times the K-FAC sqrt(VIF) of the layer, exact for least squares (the sample's
    # correlation of the columns: H_jj (H^-1)_jj with H = X'X / n)
    hc1 = hc1 * (Hjj * torch.linalg.inv(X.T @ X / n).diagonal()).clamp_min(1.0).sqrt()
    torch.testing.assert_close(_flat(on), hc1, rtol=1e-9, atol=0)
    grow = 1 / math.sqrt(1 - (p + 1) / n)
    torch.testing.assert_close(_flat(on) / _flat(off), torch.full((p + 1,), grow, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(on.influence, off.influence * grow, rtol=1e-12, atol=0)
    torch.testing.assert_close(on.unit_influence(), off.influence, rtol=1e-12, atol=0)
    assert on.influence_scale == pytest.approx(grow, rel=1e-12) and off.influence_scale == 1.0
    assert off.leverage is None and off.diagnostics["leverage_correction"] is False
    assert off.diagnostics["leverage_per_direction"] == on.diagnostics["leverage_per_direction"]


def test_several_outputs_spread_the_leverage_over_their_directions():
    """Linear(29, 3) least squares: three loss directions per record (L = I), the leverage per
    record is 3 x 30 / n and per direction 30 / n (each output row's own hat value); sigma of
    every row grows by 1 / sqrt(1 - 30/n)."""
    n, p, c = 200, 29, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, c, generator=g, dtype=torch.float64) / p**0.5 + torch.randn(n, c, generator=g, dtype=torch.float64)
    m = _ols(x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=50)
    on = estimate(m, dl, _mse, mode="diagonal")
    off = estimate(m, dl, _mse, mode="diagonal", leverage_correction=False)
    dg = on.diagnostics
    assert dg["leverage_directions"] == 3.0 and "leverage_directions_note" not in dg
    assert dg["leverage_per_direction"] == pytest.approx((p + 1) / n, rel=1e-12)
    assert dg["mean_leverage"] == pytest.approx(c * (p + 1) / n, rel=1e-12)
    torch.testing.assert_close(_flat(on) / _flat(off), torch.full((c * (p + 1),), 1 / math.sqrt(1 - (p + 1) / n),
                               dtype=torch.float64), rtol=1e-12, atol=0)


def test_the_diagonal_trace_bounds_the_exact_one_and_weight_decay_lowers_it():
    """``leverage_trace`` against ``tr((H_data + lambda)^-1 H_data)`` on a correlated
    positive semi-definite ``H_data``: equal to the count without decay (rank = d here), at or
    above the exact trace with it (Schur-Horn; the property the report states), and each
    weight counts at most 1 (a negative or zero curvature counts 0)."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(30, 10, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(-2, 1, 10, dtype=torch.float64))
    Hd = A.T @ A / 30 + 0.5 * torch.ones(10, 10, dtype=torch.float64)  # correlated
    assert leverage_trace(torch.diagonal(Hd), torch.diagonal(Hd)) == pytest.approx(10.0)
    for lam in (1e-3, 1e-1, 1.0, 10.0):
        exact = float(torch.trace(torch.linalg.solve(Hd + lam * torch.eye(10, dtype=torch.float64), Hd)))
        diag = leverage_trace(torch.diagonal(Hd), torch.diagonal(Hd) + lam)
        assert exact <= diag + 1e-12 and diag < 10.0, (lam, exact, diag)
    h = torch.tensor([2.0, 0.0, -1.0, 1.0], dtype=torch.float64)
    assert leverage_trace(h, h + torch.tensor([0.0, 1.0, 1.0, -0.5], dtype=torch.float64)) == pytest.approx(2.0)


def test_more_weights_than_records_is_capped_and_said():
    """Ridge with 60 weights on 30 records (wd = 1e-6): the diagonal trace (~60) exceeds what
    30 records can fit, the mean leverage per direction (~2) is capped at LEVERAGE_CAP (sigma
    times 1 / sqrt(0.05)) and counted; the report says it was capped and why; 1 - h_bar never
    reaches 0."""
    n, p, wd = 30, 59, 1e-6
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    th = torch.linalg.solve(X.T @ X / n + wd * torch.eye(p + 1, dtype=x.dtype), X.T @ y / n)
    m = nn.Linear(p, 1).double()
    with torch.no_grad():
        m.weight.copy_(th[:p][None])
        m.bias.copy_(th[p:])
    dl = DataLoader(TensorDataset(x, y), batch_size=n)
    on = estimate(m, dl, _mse, mode="diagonal", weight_decay=wd)
    off = estimate(m, dl, _mse, mode="diagonal", weight_decay=wd, leverage_correction=False)
    assert on.diagnostics["leverage_per_direction"] > 1.5 and on.diagnostics["leverage_capped"] == 1
    torch.testing.assert_close(_flat(on) / _flat(off), torch.full((p + 1,), 1 / math.sqrt(1 - LEVERAGE_CAP),
                               dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(on.leverage.max()) == LEVERAGE_CAP
    rep = assess(m, ["rtn_int8"], dl, _mse, estimation="diagonal", weight_decay=wd, uncertainty_draws=0)
    line = [w for w in rep.warnings if "from the Hessian diagonal" in w]
    assert len(line) == 1 and f"capped at {LEVERAGE_CAP}" in line[0], rep.warnings


def test_the_report_says_what_the_diagonal_correction_did():
    """d / n = 0.16 on the diagonal estimator: the warnings say the correction ran (the factor
    on sigma, that it is the Hessian diagonal's approximation), never that it "could not run";
    with leverage_correction=False they say it was not corrected; the exact estimator's line
    is its own."""
    n, p = 250, 39
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, generator=g, dtype=torch.float64) / p**0.5 + torch.randn(n, generator=g, dtype=torch.float64)
    m = _ols(x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=n)
    kw = dict(uncertainty_draws=0, estimation="diagonal")
    on = assess(m, ["rtn_int8"], dl, _mse, **kw)
    off = assess(m, ["rtn_int8"], dl, _mse, leverage_correction=False, **kw)
    grow = 1 / math.sqrt(1 - 40 / n)
    for rep, text in ((on, f"raised by 1 / sqrt(1 - 0.16) = {grow:.4g}"), (off, "not corrected (leverage_correction=False)")):
        assert not any("could not run" in w for w in rep.warnings), rep.warnings
        line = [w for w in rep.warnings if "from the Hessian diagonal" in w]
        assert len(line) == 1 and text in line[0] and "an approximation" in line[0], rep.warnings
        # fu28 (ux29): the note is its own warning, not appended to the d / n one (1,379 characters
        # that buried the d / n warning's action), and it points to the measurements instead of
        # quoting them
        assert line[0].startswith("finite-sample (leverage) correction: mean leverage 0.16 per loss direction (one per "
                                  "record"), line[0]
        assert 'docs/validation.md, "the diagonal estimator\'s leverage correction"' in line[0] and "-16%" not in line[0]
        (dn,) = [w for w in rep.warnings if w.startswith("d / n = 0.16 is not small")]
        # the leverage note is not in it (the interval's lines name the option leverage_correction=False)
        assert "mean leverage" not in dn and "finite-sample (leverage) correction:" not in dn and dn.endswith(
            "To act: assess fewer weights (e.g. a head over a frozen encoder) or use more records"), dn
    assert on.estimation["leverage_correction"] and not off.estimation["leverage_correction"]
    assert on.baseline_leakage > off.baseline_leakage * 1.05


def test_the_metric_front_end_applies_the_same_correction():
    """MISIndicator (the streaming front end, one accumulator with assess): the same mean
    leverage, directions and corrected leakage as assess on the same records (3-output least
    squares, d / n = 0.3 per record)."""
    from mis_lightning import MISIndicator

    n, p, c = 200, 19, 3
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, c, generator=g, dtype=torch.float64) / p**0.5 + torch.randn(n, c, generator=g, dtype=torch.float64)
    m = _ols(x, y)
    kw = dict(estimation="diagonal", uncertainty_draws=0, num_records=n)
    rep = assess(m, ["rtn_int4"], DataLoader(TensorDataset(x, y), batch_size=50), _mse, **kw)
    met = MISIndicator(m, _mse, ["rtn_int4"], **kw)
    for a in range(0, n, 50):
        met.update(x[a : a + 50], y[a : a + 50])
    out = met.compute()
    for k in ("mean_leverage", "leverage_per_direction", "leverage_directions", "leverage_correction"):
        assert met.report.diagnostics[k] == rep.diagnostics[k], k
    assert rep.diagnostics["leverage_per_direction"] == pytest.approx((p + 1) / n, rel=1e-12)
    assert float(out["rtn_int4"]["leakage"]) == pytest.approx(rep.schemes["rtn_int4"].leakage, rel=1e-9)


class _TwoHeads(nn.Module):
    """A 3-class head beside a regression head (rv53's ``MT``): the loss reads the second head
    only for records whose target carries its label, so ``rank(L_i)`` is 3 for those, 2 else."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"a": self.a(h), "b": self.b(h)}


def _two_heads_loss(o: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    y, v, m = t[:, 0].long(), t[:, 1:2], t[:, 2:3]
    return nn.functional.cross_entropy(o["a"], y, reduction="none") + (m * (o["b"] - v) ** 2).squeeze(-1)


def test_the_loss_directions_do_not_depend_on_the_records_order():
    """``rank(L_i)`` differs between records (3 for the 10 of 60 that carry a second label, all at
    the end; 2 else): the diagonal estimator's count of loss directions -- the mean over a
    content-keyed sample of ``LOSS_RANK_RECORDS`` records, here all of them, not the first batch's
    first records -- is their exact mean, 2 + 10 / 60, and every sigma is the same for the records
    in order and shuffled (1e-9 relative: float64 sums in another order). Before, the first 16
    records' mean: 2 in order, 2.19 shuffled (rv53: 4-6% on every figure)."""
    n = 60
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    t = torch.stack([(x[:, :3] + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1).double(),
                     0.7 * x[:, 3] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64),
                     (torch.arange(n) >= 50).double()], 1)
    m = _TwoHeads()
    runs = {}
    for name, order in (("order", torch.arange(n)), ("shuffled", torch.randperm(n, generator=g))):
        dl = DataLoader(TensorDataset(x[order], t[order]), batch_size=20)
        runs[name] = estimate(m, dl, _two_heads_loss, mode="diagonal", hessian="ggn", weight_decay=1e-3)
        assert runs[name].diagnostics["leverage_directions"] == pytest.approx(2 + 10 / n, rel=1e-12), name
    torch.testing.assert_close(_flat(runs["shuffled"]), _flat(runs["order"]), rtol=1e-9, atol=0)
    assert LOSS_RANK_RECORDS >= n  # (the sample holds every record here)


def test_the_loss_directions_sample_is_the_bottom_k_by_key_whatever_the_order_batches_and_processes():
    """:class:`LossDirectionSample` against its definition: the mean ``rank`` of the ``k`` records with
    the smallest content keys (:func:`record_keys` of all records at once, sorted; a record the data
    holds several times counts as often, as in the sums), the same for the records in order in
    batches of 7, reversed in batches of 50, and split over two processes (:func:`merge_counts`); only
    the ``k`` records finally held are measured. rv54: 6 and 4 more copies of the two smallest-keyed
    records (a dataset's duplicates) were taken once each, the mean over distinct contents (here 1.6875
    against the records' 1.1875)."""
    from mis_lightning.estimation.loss_directions import LossDirectionSample, merge_counts
    from mis_lightning.estimation.records import record_keys

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(200, 3, generator=g), torch.randint(0, 4, (200,), generator=g)
    small = torch.sort(record_keys((x[:190], y[:190]), None, 190)).indices
    for rows, src in ((slice(190, 196), small[0]), (slice(196, 200), small[1])):  # duplicates
        x[rows], y[rows] = x[src], y[src]
    rank = 1.0 + (x[:, 0] > 0) + (y == 3)  # a rank per record, from its contents
    k, measured = 16, []

    def measure(xs, ys, m):
        measured.append(m)
        return 1.0 + (xs[:, 0] > 0) + (ys == 3).double(), ""

    keys = record_keys((x, y), None, 200)
    want = float(rank.double()[torch.sort(keys, stable=True).indices[:k]].mean())
    uniq = torch.unique(keys)  # (sorted)
    distinct = float(torch.stack([rank.double()[keys == u][0] for u in uniq[:k]]).mean())
    assert abs(distinct - want) > 0.05  # (the copies weigh in the mean)

    def run(order, bs):
        s = LossDirectionSample(measure, k)
        for a in range(0, len(order), bs):
            rows = order[a: a + bs]
            s.add(record_keys((x[rows], y[rows]), None, len(rows)), x[rows], y[rows])
        return s

    got = run(torch.arange(200), 7).value()
    assert got == (pytest.approx(want, rel=1e-12), "measured", k) and sum(measured) == k
    assert run(torch.arange(199, -1, -1), 50).value()[0] == pytest.approx(want, rel=1e-12)
    perm = torch.randperm(200, generator=g)
    parts = [run(perm[:100], 9).counts(), run(perm[100:], 13).counts()]
    assert merge_counts(parts, k)[:2] == (pytest.approx(want, rel=1e-12), "measured")


def test_the_loss_directions_after_a_reset_are_the_new_passs():
    """``MISIndicator.reset()`` gives the figures of a new Metric: the loss directions' sample and the
    input statistics hold the records read after it only (rv54: the sample kept those read before,
    1.5 directions here, not 2; the statistics counted the inputs read again twice, so the
    standardiser fitted on them (ddof 1) was no longer named). A least-squares loss on 2 outputs
    whose target masks the second output in the first pass (``rank(L_i)`` 1) and not in the second
    (2), on the same inputs."""
    from mis_lightning import MISIndicator

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)

    class Standardised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", x.mean(0))
            self.register_buffer("std", x.std(0))
            torch.manual_seed(1)
            self.lin = nn.Linear(3, 2).double()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.lin((z - self.mean) / self.std)

    def masked(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (t[:, 2:] * (o - t[:, :2]) ** 2).sum(-1)

    model = Standardised()
    met = MISIndicator(model, masked, ["rtn_int4"], estimation="diagonal", hessian="ggn",
                       uncertainty_draws=0, weight_decay=1e-3, num_training_records=6)
    for mask, want in (([1.0, 0.0], 1.0), ([1.0, 1.0], 2.0)):
        met.reset()
        met.update(x, torch.cat([y, torch.tensor(mask, dtype=torch.float64).expand(6, 2)], 1))
        acc = met.accumulator
        assert acc.loss_directions() == (want, "measured", 6)
        assert sorted(acc._input_stats.matches(model)) == ["mean", "std"]


def test_a_squeezed_output_is_read_per_record():
    """A forward ending in ``.squeeze()`` gives ``[B, 3]`` for a batch but ``[3]`` for one record:
    the output's shape read on one record was ``()``, one output per record, so a 3-class softmax
    head counted 1 loss direction, not 2 (rv55: its leakage +12% against the same model with
    ``.squeeze(-1)``). Its per-record shape is now told on two records (a squeeze: each record of
    the one-record shape); an output whose dim 0 is not the records (sequence-first) is refused."""
    from mis_lightning.estimation.estimate import MomentAccumulator

    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = x[:, :3].argmax(1)

    class Squeezed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.lin = nn.Linear(4, 3).double()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.lin(z).unsqueeze(-1).squeeze()

    def ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(o.reshape(-1, 3), t, reduction="none")

    acc = MomentAccumulator(Squeezed().eval(), ce, mode="diagonal", hessian="ggn", weight_decay=1e-3)
    acc.update((x, y))
    assert acc.program.output_shape(x) == (3,)
    assert acc.loss_directions() == (2.0, "measured", 12)
    from mis_lightning.estimation.output_reads import tensor_record_shape

    one, two = torch.zeros(4, 1, 3), torch.zeros(4, 2, 3)  # a [T, B, C] output: refused, whatever T
    with pytest.raises(ValueError, match=r"\(4, 1, 3\) for one record, \(4, 2, 3\) for two: its dim 0 does not"):
        tensor_record_shape(one, lambda: two, "the model's output")
    assert tensor_record_shape(torch.zeros(()), lambda: None, "") == ()  # [B, 1] squeezed, one record
    # rv56: a one-record output of dim 0 2 with a (2, 2) pair: a squeezed [B, 2] head (one = the pair's row 0)
    # is read (2,), two heads stacked [2, B] and squeezed (one = its column 0) refused; a pair that cannot
    # tell (equal outputs) keeps the squeeze (the loss checks stand behind it); float32 rounding between the
    # batch of one and of two passes
    pair = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert tensor_record_shape(torch.tensor([1.0, 2.0 + 1e-7]), lambda: pair, "") == (2,)
    assert tensor_record_shape(torch.ones(2), lambda: torch.ones(2, 2), "") == (2,)
    with pytest.raises(ValueError, match=r"\(2,\) for one record, \(2, 2\) for two, and the one record's output is "
                                         r"column 0 of the two records'.*torch.stack\(heads, 1\)"):
        tensor_record_shape(torch.tensor([1.0, 3.0]), lambda: pair, "the model's output")
    # rv55r: the squeezed head on a batch of one record ((3,), no pair) cannot be told; the refusal says
    # so and names the squeeze (it read "a sequence-first output?" alone)
    with pytest.raises(ValueError, match=r"\(3,\) for a batch of one record.*\.squeeze\(\) that dropped it"):
        tensor_record_shape(torch.zeros(3), lambda: None, "the model's output")


def test_the_diagonal_note_quotes_one_mean_leverage_and_labels_the_per_record_sum():
    """rv55z (ux56a): the note quoted "mean leverage 2.39 per record, 0.265 per loss direction" side by
    side, while the * mark, the correction and the cap read the per-direction one. It leads now, the
    per-record figure labelled as its sum over a record's loss directions (left out at one direction)."""
    from mis_lightning.assess import _diagonal_leverage_note

    diag = {"leverage_per_direction": 0.2653, "mean_leverage": 2.3875, "leverage_directions": 9.0,
            "leverage_correction": True}
    text = _diagonal_leverage_note(diag)
    assert text.startswith("finite-sample (leverage) correction: mean leverage 0.265 per loss direction (2.39 per "
                           "record over its 9 loss directions), from the Hessian diagonal"), text
    assert "1 / sqrt(1 - 0.265)" in text and text.count("per record") == 1, text
    one = _diagonal_leverage_note({**diag, "mean_leverage": 0.2653, "leverage_directions": 1.0})
    assert one.startswith("finite-sample (leverage) correction: mean leverage 0.265 per loss direction (one per "
                          "record), from"), one
