"""Leakage the figures did not count, silently (fu27, a fresh user's findings).

* Training records present more than once: each copy was scored as an independent member. A
  record present ``k`` times moves the weights ``k`` times as far (a shift of ``k psi / n``), so
  its leakage is understated: with every record of a logistic regression twice, the trained
  weights and the membership game are exactly those of the unique set, yet the report read
  0.708x the unique set's figure (fu27's ``s10_duplicates.py``, not kept).
* BatchNorm's running statistics: float buffers computed from the training batches, released
  with the weights and not scored.

The report now says so (warnings and diagnostics); the figures are unchanged."""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml


def _bce(out, t):
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), t, reduction="none")


def _logistic(x: torch.Tensor, y: torch.Tensor, wd: float) -> nn.Linear:
    """The penalised logistic MLE by Newton in float64 (the minimum the analysis assumes)."""
    X = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    th = torch.zeros(X.shape[1], dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(X @ th)
        g = X.T @ (p - y.double()) / len(y) + wd * th
        H = (X * (p * (1 - p))[:, None]).T @ X / len(y) + wd * torch.eye(len(th), dtype=torch.float64)
        th = th - torch.linalg.solve(H, g)
    m = nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        m.weight.copy_(th[:-1][None])
        m.bias.copy_(th[-1:])
    return m


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(x[:, 0] - x[:, 1])).float()
    return x, y


def _dup_warnings(report: ml.Report) -> list[str]:
    return [w for w in report.warnings if "more than once" in w]


def test_records_present_twice_are_reported_with_their_count():
    """Every one of 80 records twice (160 rows, 40 of them among the 48 records averaged over):
    the count of repeated records among those averaged over is in the diagnostics and in a
    warning that says the figures understate their leakage. The figure itself is unchanged."""
    x, y = _data(80)
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    model = _logistic(xx, yy, 1e-3)
    loader = DataLoader(TensorDataset(xx, yy), batch_size=32, shuffle=False)
    report = ml.assess(model, ["rtn_int4"], loader, _bce, weight_decay=1e-3, uncertainty_draws=0, num_records=48)
    # bottom-k by content hash: copies share a key, so the 48 smallest keys are 24 records twice
    assert report.diagnostics["duplicate_records"] == 24
    (w,) = _dup_warnings(report)
    assert "24 of the 48 records" in w and "understate" in w


def test_unique_records_and_near_copies_give_no_warning():
    """No repeated record: no diagnostic count, no warning. Records that differ in one input by
    1e-6 are not copies (other content hashes), and are not flagged either."""
    x, y = _data(80)
    x2 = x.clone()
    x2[:, 2] += 1e-6
    for xs, ys in ((x, y), (torch.cat([x, x2]), torch.cat([y, y]))):
        model = _logistic(xs, ys, 1e-3)
        report = ml.assess(model, ["rtn_int4"], DataLoader(TensorDataset(xs, ys), batch_size=32), _bce,
                           weight_decay=1e-3, uncertainty_draws=0)
        assert report.diagnostics.get("duplicate_records", 0) == 0
        assert not _dup_warnings(report)



def test_a_repeated_record_below_one_percent_is_counted_without_a_warning():
    """One record twice among 300 (0.33 % of the records averaged over, under
    DUPLICATE_WARN_SHARE): the headline moves by well under 1 % of itself, so the count is in
    the diagnostics but the report does not warn (the main job's ChEMBL data holds one such pair)."""
    x, y = _data(300)
    xs, ys = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])
    model = _logistic(xs, ys, 1e-3)
    report = ml.assess(model, ["rtn_int4"], DataLoader(TensorDataset(xs, ys), batch_size=64), _bce,
                       weight_decay=1e-3, uncertainty_draws=0, num_records=512)
    assert report.diagnostics["duplicate_records"] == 1
    assert report.diagnostics["duplicate_records_of"] == 301
    assert not _dup_warnings(report)

def _bn_model(track: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 4, generator=g)
    y = x @ torch.tensor([1.0, -0.5, 0.3, 0.0]) + torch.randn(120, generator=g)
    torch.manual_seed(0)
    m = nn.Sequential(nn.BatchNorm1d(4, affine=False, track_running_stats=track), nn.Linear(4, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for idx in torch.randperm(120).split(16):  # train mode: BN updates its running statistics
        loss = (0.5 * (m(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m, x, y


def test_batchnorm_running_statistics_are_said_to_be_released_and_not_scored():
    """BatchNorm's running mean is a float buffer computed from the training batches, released with
    every weight-only scheme and not scored: on BatchNorm1d(16) over N(0, I) inputs, n = 1000, batch 32,
    5 epochs, it alone has a membership advantage of 0.0295 (exact; a real attack on it alone: 0.028),
    while the report read 0.0194 [0.0132, 0.0255] for intx_weight_only_int2
    (fu27's s12_bn_buffers.py, s13_bn_model.py, not kept). The report now names the buffers.
    Without running statistics (track_running_stats=False: batch statistics at evaluation too) the
    model mixes records and is refused; here it is the tracked model and a model without BatchNorm."""
    m, x, y = _bn_model(True)
    mse = lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2  # noqa: E731
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    report = ml.assess(m, ["rtn_int4"], loader, mse, uncertainty_draws=0)
    # (the not-at-a-minimum warning may name the running statistics too, as its likely cause: nf50b)
    (w,) = [w for w in report.warnings if "running statistics" in w and "not scored" in w]
    assert "0.weight" not in w and "'0'" in w and "not scored" in w
    # and a line of the table, next to the figures (nu42b: only in the warnings before), kept by the JSON
    line = "not scored: the running statistics of 1 normalisation layer(s) ('0')"
    assert line in report.table() and report.diagnostics["running_statistics_layers"] == ["0"]
    assert line in ml.Report.from_dict(json.loads(report.to_json())).table()
    plain = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        plain[0].weight.copy_(m[1].weight)
        plain[0].bias.copy_(m[1].bias)
    report = ml.assess(plain, ["rtn_int4"], loader, mse, uncertainty_draws=0)
    assert not [w for w in report.warnings if "running statistics" in w] and "not scored:" not in report.table()


def test_running_statistics_loaded_without_their_counter_are_named_too():
    """A state dict without ``num_batches_tracked`` (dropped by a converter or by the idiom that filters
    those keys out, loaded with ``strict=False``; a state dict without its version metadata gets 0 too)
    leaves the counter at 0 while the running statistics are the training batches'. Read by the counter
    alone they were not named, and the figures silently claimed the whole release: on BatchNorm1d(8) over
    400 N(2, I) inputs (momentum=None: the running mean is the training mean) before a Linear(8, 2) fitted
    in eval mode, rtn_int2 read 0.0182 [0.0168, 0.0197] with no mark and no warning, while the running mean
    alone leaks 0.0547 (exact; a real attack on it 0.0557 +- 0.0020): docs/benchmarks.md "rv59",
    ``python benchmarks/rv59_model_kinds.py bn-counter``. A layer never run (statistics at their reset
    values, counter 0) is not named."""
    m, x, y = _bn_model(True)
    state = {k: v for k, v in m.state_dict().items() if "num_batches_tracked" not in k}
    loaded, _, _ = _bn_model(True)
    with torch.no_grad():
        loaded[0].reset_running_stats()
    loaded.load_state_dict(state, strict=False)
    assert int(loaded[0].num_batches_tracked) == 0 and bool(loaded[0].running_mean.ne(0).any())
    mse = lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2  # noqa: E731
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    report = ml.assess(loaded, ["rtn_int4"], loader, mse, uncertainty_draws=0)
    (w,) = [w for w in report.warnings if "running statistics" in w and "not scored" in w]
    assert "'0'" in w and "num_batches_tracked 0" in w
    assert report.diagnostics["running_statistics_layers"] == ["0"] and "not scored: the running statistics" \
        in report.table()
    fresh = nn.Sequential(nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1))  # never run: reset values, counter 0
    with torch.no_grad():
        fresh[1].weight.copy_(m[1].weight)
        fresh[1].bias.copy_(m[1].bias)
    report = ml.assess(fresh.eval(), ["rtn_int4"], loader, mse, uncertainty_draws=0)
    assert "running_statistics_layers" not in report.diagnostics and "not scored:" not in report.table()
