"""Weights no record moves (sd 0) count 0 in every release's d_eff, float or grid (de49).

nux49's 16,449-weight fingerprint MLP (12 dead ReLU units, inputs never co-active): the table's
``none`` row read d_eff 8789 (d less the 7,660 sd-0 weights), ``int8_weight_only`` 8804 (above the
float model's: a release cannot keep more information than the float one) and the d / n warning
"the unquantized baseline (d_eff = d)", 16,449. The 15 extra were sd-0 weights that are their
row's absmax: the release's scale reveals them (kappa 1 by design, scored as unquantized), and the
pass summed kappa over every weight while the float layers leave the sd-0 ones out. An sd-0
weight exactly on a cell edge has kappa 2/pi (two half-normal cells, tie48): counted too.

Model: a linear map whose last inputs are always 0 (their weights get no gradient on any record:
sd 0), with sd-0 weights placed as row absmax (revealed) and exactly on a cell edge of both the
int8 and int4 grids (``scale`` a power-of-two fraction, so the edge is a float32 number).
References: the exact count of sd-0 weights (d_eff of the float model = d less them, pinned share
= their share; the float path's rule), and the bound d_eff(scheme) <= d_eff(float) (kappa <= 1).
The kappa the grid gives those weights (1, 2/pi) is checked first, so the test exercises them.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import assess
from mis_lightning.assess import resolve_schemes

N, LIVE, DEAD, OUT = 120, 16, 8, 2
ABSMAX = 255.0 / 256.0  # int8 scale ABSMAX / 127.5 = 2^-7, int4 ABSMAX / 7.5 = 17 / 128: exact
EDGE = 0.33203125  # 42.5 * 2^-7 = 2.5 * 17 / 128: a cell edge of both grids, a float32 number
SCHEMES = ["none", "int8_weight_only", "intx_weight_only_int4"]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y, reduction="none").sum(1)


def _model_and_data() -> tuple[nn.Linear, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(N, LIVE + DEAD)
    x[:, :LIVE] = torch.randn(N, LIVE, generator=g)  # the last DEAD inputs are 0 on every record
    w_true = 0.1 * torch.randn(OUT, LIVE, generator=g)
    y = x[:, :LIVE] @ w_true.T + 0.5 * torch.randn(N, OUT, generator=g)
    lin = nn.Linear(LIVE + DEAD, OUT)
    xb = torch.cat([x[:, :LIVE], torch.ones(N, 1)], 1)
    sol = torch.linalg.lstsq(xb, y).solution  # [LIVE + 1, OUT]: least squares on the live inputs
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, :LIVE] = sol[:LIVE].T
        lin.bias.copy_(sol[LIVE])
        lin.weight[:, LIVE:] = 0.01 * torch.randn(OUT, DEAD, generator=g)  # mid-cell: point masses
        lin.weight[0, LIVE], lin.weight[1, LIVE + 1] = ABSMAX, -ABSMAX  # each row's absmax: revealed
        lin.weight[0, LIVE + 2], lin.weight[1, LIVE + 3] = EDGE, -EDGE  # exactly on a cell edge
    assert float(lin.weight[:, :LIVE].abs().max()) < ABSMAX  # the sd-0 weights set the scales
    return lin, DataLoader(TensorDataset(x, y), batch_size=40)


@pytest.fixture(scope="module", params=["exact", "diagonal"])
def case(request):
    """The model and its report, by the exact estimator (the default at d = 50) and the diagonal
    one (nux49's: sd 0 from the per-sample gradient variances)."""
    lin, loader = _model_and_data()
    rep = assess(lin, SCHEMES, loader, _loss, weight_decay=1e-3, estimation=request.param)
    assert rep.estimation["mode"] == request.param
    return lin, rep


def test_the_grids_give_the_sd0_weights_kappa_above_zero(case):
    """Precondition: on both grids the revealed sd-0 weights have kappa 1, the ones on an edge
    2/pi (what the pass used to add to d_eff), the other sd-0 weights 0."""
    lin, _ = case
    th = lin.weight.detach().reshape(-1).double()
    sd0 = torch.zeros_like(th)
    for scheme in resolve_schemes(SCHEMES[1:]):
        g = scheme.apply(lin).grids["weight"]
        k = g.moments(th, sd0, 0, th.numel()).kappa.reshape(OUT, -1)
        assert k[0, LIVE] == 1.0 and k[1, LIVE + 1] == 1.0, scheme.name
        torch.testing.assert_close(k[0, LIVE + 2], torch.tensor(2.0 / math.pi, dtype=k.dtype), rtol=0, atol=1e-12)
        torch.testing.assert_close(k[1, LIVE + 3], torch.tensor(2.0 / math.pi, dtype=k.dtype), rtol=0, atol=1e-12)
        assert float(k[:, LIVE + 4:].abs().max()) == 0.0, scheme.name


def test_never_moved_weights_count_zero_in_every_d_eff(case):
    """Float: d_eff = d less the sd-0 weights, pinned share = theirs. Every grid: the same pinned
    count and d_eff at most the float model's (before: +2 revealed +2 x 2/pi above it, pinned 4 short).
    Tolerance of the bound 1e-9: the sums of float64 kappa over 50 weights."""
    _, rep = case
    still = OUT * DEAD  # the dead inputs' weights (the float path's pinned count below says the estimate agrees)
    base = rep.schemes["none"]
    assert base.d_eff == rep.d - still
    assert round(base.pinned_fraction * rep.d) == still
    for name in SCHEMES[1:]:
        s = rep.schemes[name]
        assert not s.error, s.error
        assert round(s.pinned_fraction * rep.d) == still, (name, s.pinned_fraction * rep.d)
        assert s.d_eff <= base.d_eff + 1e-9, (name, s.d_eff, base.d_eff)
        lw = s.layers["weight"]
        assert lw.d_eff <= OUT * LIVE + 1e-9, (name, lw.d_eff)
        assert round(lw.pinned_fraction * lw.d) == still, name


def test_d_over_n_warning_names_the_tables_unquantized_d_eff(case):
    """d / n = 50 / 120 > 0.1: the warning's baseline d_eff is the table's ``none`` figure (d less
    the weights no record moves), not d."""
    _, rep = case
    still = OUT * DEAD
    w = [w for w in rep.warnings if w.startswith("d / n = ")]
    assert len(w) == 1, rep.warnings
    words = f"the unquantized baseline (d_eff = {rep.d - still:,}: d less the {still:,} weights no record moves)"
    assert words in w[0], w[0]
    assert rep.schemes["none"].d_eff == rep.d - still
    assert "(d_eff = d)" not in w[0]


@pytest.mark.parametrize("slabs", [True, False])
def test_never_moved_count_is_the_masks_count(monkeypatch, slabs):
    """``never_moved_count`` (p50d: on slabs, ``NEVER_MOVED_SLABS``) counts what ``never_moved``
    marks: zeros (either sign) and negative sds, not NaN, over any shape and uneven slabs."""
    A = importlib.import_module("mis_lightning.assess")

    monkeypatch.setattr(A, "NEVER_MOVED_SLABS", slabs)
    monkeypatch.setattr(A, "_NEVER_MOVED_SLAB", 7)
    sd = torch.rand(5, 9, 4, generator=torch.Generator().manual_seed(0))
    sd.view(-1)[::5] = 0.0
    sd.view(-1)[3], sd.view(-1)[11], sd.view(-1)[12] = -0.0, -1e-30, float("nan")
    want = sum(1 for v in sd.view(-1).tolist() if v <= 0)
    assert want == 38  # 36 zeros, -0.0, -1e-30 (NaN is not counted)
    assert A.never_moved_count(sd) == want == int(A.never_moved(sd).sum())
    assert A.never_moved_count(sd[:, :, 0]) == int(A.never_moved(sd[:, :, 0]).sum())  # a non-contiguous view
    assert A.never_moved_count(torch.zeros(0)) == 0
