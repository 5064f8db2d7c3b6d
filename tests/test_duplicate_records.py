"""Training records present more than once (fu27, a fresh user's finding).

Each copy was scored as an independent member, silently. A record present ``k`` times moves the
weights ``k`` times as far (a shift of ``k psi / n``), so its leakage is understated: with every
record of a logistic regression twice, the trained weights and the membership game are exactly
those of the unique set, yet the report read 0.708x the unique set's figure
(``/work/scratch/fu27/s10_duplicates.py``). The report now says so."""

from __future__ import annotations

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
