"""End-to-end ``assess``: report contract, model untouched, bad input, agreement with the core."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
import mis_lightning.functional as F
from mis_lightning.estimation import estimate
from mis_lightning.quantization import SchemeError, available_schemes, get_scheme
from mis_lightning.report import Report


def mse(o, t):
    return 0.5 * (o.squeeze(-1) - t) ** 2


def _ridge_linear(n=1500, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    Xa = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    b = torch.linalg.solve(Xa.T @ Xa, Xa.T @ y)
    m = nn.Linear(d, 1).double()
    m.weight.data = b[:d][None].clone()
    m.bias.data = b[d:].clone()
    return m, DataLoader(TensorDataset(X, y), batch_size=256)


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_report_contract_and_model_untouched():
    m, dl = _ridge_linear()
    before = _snapshot(m)
    rep = ml.assess(m, ["none", "rtn_int8", "rtn_int4", "rtn_int2"], dl, mse, num_records=300,
                    val_dataloader=dl, uncertainty_draws=8)
    after = _snapshot(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    d = rep.to_dict()
    for key in ("n", "d", "estimation", "diagnostics", "schemes"):
        assert key in d
    assert d["n"] == 1500 and d["d"] == 13
    for name, s in d["schemes"].items():
        for key in ("leakage", "mis", "baseline_leakage", "d_eff", "d", "zero_fraction", "pinned_fraction", "layers"):
            assert key in s, (name, key)
        assert set(s["layers"]) == {"weight", "bias"}
        assert math.isclose(s["mis"], 1 - s["leakage"])
        assert "loss" in s["utility"]
    # JSON round trip.
    rep2 = Report.from_dict(json.loads(rep.to_json()))
    assert rep2.schemes["rtn_int4"].leakage == rep.schemes["rtn_int4"].leakage


def test_leakage_ordering_none_int8_int4_int2():
    m, dl = _ridge_linear()
    rep = ml.assess(m, ["none", "rtn_int8", "rtn_int4", "rtn_int2"], dl, mse, num_records=300,
                    uncertainty_draws=0)
    s = rep.schemes
    assert math.isclose(s["none"].leakage, rep.baseline_leakage, rel_tol=1e-12)
    # Data processing: no scheme leaks more than the full-precision release; coarser grids
    # of the same family leak less (MC noise is far below these gaps, measured ~1e-4 rel).
    assert s["rtn_int8"].leakage <= rep.baseline_leakage * (1 + 1e-9)
    assert s["rtn_int8"].leakage > s["rtn_int4"].leakage > s["rtn_int2"].leakage
    assert s["none"].d_eff == pytest.approx(13.0)
    assert s["rtn_int2"].d_eff < s["rtn_int4"].d_eff < s["rtn_int8"].d_eff <= 13.0


def test_assess_matches_functional_core():
    # The orchestration must give what the core gives on the same inputs (Gaussian form,
    # independent coordinates; the correlated form is checked in test_correlated.py).
    m, dl = _ridge_linear()
    rep = ml.assess(m, ["rtn_int4"], dl, mse, num_records=300, method="clt", uncertainty_draws=0,
                    covariance="independent")
    est = estimate(m, dl, mse, num_records=300)
    assert m.weight.shape[0] == 1  # one row: one revealed weight
    res = get_scheme("rtn_int4").apply(m)
    g = res.grids["weight"]
    th, sg = est.theta["weight"], est.sigma["weight"]
    edges = g.boundaries(th, 0, th.numel(), 300)
    stats = F.cell_statistics(th, sg, edges)
    # The absmax of each row is given away by its released scale: scored as unquantized.
    revealed = (th.abs() == th.abs().max()).to(torch.float64)
    assert g.revealed is not None and torch.equal(g.revealed.reshape(-1), revealed.bool())
    k_w = revealed + (1 - revealed) * stats.kappa
    kappa = torch.cat([k_w, torch.ones(1, dtype=torch.float64)])  # the bias is left in float
    ref = F.record_leakage(est.influence, F.CellMoments(kappa, kappa, kappa, kappa), est.n, method="clt")
    # the spread term (method.md section 4): the records' leverages, the unquantized first-order
    # values as its reference
    assert est.leverage is not None
    t_u = F.cells.SQRT_2_OVER_PI * est.influence.square().sum(-1).sqrt() / (2 * est.n ** 0.5)
    ref = F.with_spread(ref, t_u, est.leverage)
    # the edges keep one cell beyond the row's bound, which the moments read as revealed
    # (functional/bounds.py): the two differ by the mass ~6 sd away here (3e-10 relative)
    assert rep.schemes["rtn_int4"].leakage == pytest.approx(float(ref.mean()), rel=1e-8)
    assert rep.schemes["rtn_int4"].d_eff == pytest.approx(float(kappa.sum()), rel=1e-8)


def test_monte_carlo_and_gaussian_forms_agree_when_many_weights_leak():
    g = torch.Generator().manual_seed(5)
    n, d = 4000, 60
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    m = nn.Linear(d, 1, bias=False).double()
    m.weight.data = torch.linalg.solve(X.T @ X, X.T @ y)[None]
    dl = DataLoader(TensorDataset(X, y), batch_size=500)
    a = ml.assess(m, ["rtn_int4"], dl, mse, num_records=200, method="clt", uncertainty_draws=0)
    b = ml.assess(m, ["rtn_int4"], dl, mse, num_records=200, method="mc", mc_draws=8192, uncertainty_draws=0)
    # 60 coordinates of comparable weight: the Gaussian form is within a few % (Edgeworth).
    assert a.schemes["rtn_int4"].leakage == pytest.approx(b.schemes["rtn_int4"].leakage, rel=0.05)


def test_unknown_scheme_names_close_ones_and_points_to_the_list():
    """The close names, then where the list is, not the list (nux51 #9: all 56 names, 1,658
    characters)."""
    m, dl = _ridge_linear()
    with pytest.raises(KeyError) as err:
        ml.assess(m, ["int9_weight_only", "rtn_int9"], dl, mse)
    text = str(err.value)
    n = len(available_schemes())
    assert text.startswith("2 unknown quantization schemes: 'int9_weight_only' (did you mean int8_weight_only")
    assert "'rtn_int9' (did you mean rtn_int" in text
    assert text.endswith(f"; all {n} scheme names: mis_lightning.quantization.available_schemes() "
                         "(table: docs/quantization.md, \"The schemes\")")
    # the list itself is not in the message: schemes that are neither asked nor close
    assert "smooth_quant_int8_dynamic_activation_int8_weight" not in text and len(text) < 400, len(text)


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


def test_scheme_touching_no_parameter_is_reported_not_scored_secure():
    X = torch.randn(50, 3, dtype=torch.float64)
    y = X.sum(-1)
    dl = DataLoader(TensorDataset(X, y), batch_size=25)
    m = _NoLinear()
    with pytest.raises(SchemeError, match="rtn_int4.*applies to no assessed parameter"):
        ml.assess(m, ["rtn_int4"], dl, mse)
    # fu31: with no other scheme that quantizes anything ("none" is the float release) it is refused
    # before the estimation pass, whatever strict; next to one that applies (bf16 casts any
    # parameter) it is an error row, not scored as secure
    with pytest.raises(SchemeError, match="no requested scheme can quantize"):
        ml.assess(m, ["none", "rtn_int4"], dl, mse, strict=False)
    rep = ml.assess(m, ["none", "bf16", "rtn_int4"], dl, mse, strict=False)
    assert rep.schemes["rtn_int4"].error and "applies to no assessed parameter" in rep.schemes["rtn_int4"].error
    assert math.isnan(rep.schemes["rtn_int4"].mis)
    assert not math.isnan(rep.schemes["none"].mis) and not math.isnan(rep.schemes["bf16"].mis)


def test_nan_weights_and_bad_params_are_named():
    m, dl = _ridge_linear()
    m.weight.data[0, 3] = float("nan")
    with pytest.raises(ValueError, match="'weight'.*NaN"):
        ml.assess(m, ["rtn_int8"], dl, mse)
    m2, _ = _ridge_linear()
    with pytest.raises(KeyError, match="not_a_param"):
        ml.assess(m2, ["rtn_int8"], dl, mse, params=["not_a_param"])
    with pytest.raises(ValueError, match="method must be"):
        ml.assess(m2, ["rtn_int8"], dl, mse, method="bogus")


def test_uncertainty_interval_brackets_plug_in_on_average():
    m, dl = _ridge_linear()
    rep = ml.assess(m, ["rtn_int4"], dl, mse, num_records=300, uncertainty_draws=16)
    lo, hi = rep.schemes["rtn_int4"].interval
    assert 0 <= lo <= hi <= rep.baseline_leakage * (1 + 1e-9)


@pytest.mark.real_figure  # the PNG's size
def test_table_and_figure(tmp_path):
    m, dl = _ridge_linear()
    rep = ml.assess(m, ["none", "rtn_int4"], dl, mse, num_records=100, val_dataloader=dl, uncertainty_draws=4)
    text = rep.table()
    assert "rtn_int4" in text and "leakage" in text and "loss" in text
    rep.plot(tmp_path / "fig.png")
    rep.to_csv(tmp_path / "r.csv")
    assert (tmp_path / "fig.png").stat().st_size > 1000
    assert "utility_loss" in (tmp_path / "r.csv").read_text().splitlines()[0]


def test_weights_given_away_by_the_scale_leak_like_float():
    # d = 1 with an absmax scale: the released scale IS the weight (|w| / qmax * qmax), so
    # every rtn scheme leaks exactly like the full-precision release (validation found the
    # fixed-grid reading under-scored this to ~0).
    g = torch.Generator().manual_seed(9)
    X = torch.randn(400, 1, generator=g, dtype=torch.float64)
    y = 0.7 * X[:, 0] + torch.randn(400, generator=g, dtype=torch.float64)
    m = nn.Linear(1, 1, bias=False).double()
    m.weight.data = torch.linalg.solve(X.T @ X, X.T @ y)[None]
    rep = ml.assess(m, ["none", "rtn_int2", "rtn_int8", "bf16"], DataLoader(TensorDataset(X, y), batch_size=100), mse)
    for s in ("rtn_int2", "rtn_int8"):
        assert rep.schemes[s].leakage == pytest.approx(rep.baseline_leakage, rel=1e-12)
    # A cast has no weight-derived scale: its grid is fixed and can protect.
    assert rep.schemes["bf16"].leakage <= rep.baseline_leakage


def test_a_scheme_failing_in_its_cell_moments_is_an_error_row():
    from mis_lightning.quantization import ParamGrid, QuantizationScheme

    class BadGrid(QuantizationScheme):
        name = "bad_grid"

        def _quantize_copy(self, model):
            w = model.weight
            # A table grid without its table: the backend "succeeded", the moments cannot.
            return {"weight": ParamGrid(name="weight", shape=tuple(w.shape), kind="table",
                                        dequantized=w.detach().float(), bits_per_weight=8.0,
                                        scale=torch.ones(1, 1), block_size=tuple(w.shape))}, []

    m, dl = _ridge_linear()
    rep = ml.assess(m, ["rtn_int4", BadGrid()], dl, mse, num_records=100, uncertainty_draws=2, strict=False)
    assert rep.schemes["bad_grid"].error and "cell moments" in rep.schemes["bad_grid"].error
    assert not rep.schemes["rtn_int4"].error and rep.schemes["rtn_int4"].leakage > 0
    with pytest.raises(AssertionError):
        ml.assess(m, ["rtn_int4", BadGrid()], dl, mse, num_records=100, uncertainty_draws=2)


def test_score_schemes_leaves_the_callers_calibration_stream_as_it_was():
    """``score_schemes`` restores the state of the streams it reads (``restores_rng``): a
    stateful IterableDataset passed as ``calibration_data`` (AWQ) must not have moved on a pass. (The
    decorator once slipped onto a helper inserted above ``score_schemes``: one pass consumed.)"""
    from torch.utils.data import IterableDataset

    from mis_lightning.assess import run_estimation
    from mis_lightning.config import EstimationConfig

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 4, generator=g), torch.randn(120, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    mse = lambda o, t: (o[:, 0] - t) ** 2  # noqa: E731
    est = run_estimation(model, DataLoader(TensorDataset(x, y), batch_size=40), mse, EstimationConfig(num_records=64))

    class Stream(IterableDataset):
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            for a in range(0, 120, 40):
                yield x[a:a + 40], y[a:a + 40]

    ds = Stream()
    ml.score_schemes(est, model, ["awq_int8_weight_only"], uncertainty_draws=0,
                     calibration_data=DataLoader(ds, batch_size=None))
    assert ds.passes == 0


def test_weights_the_data_never_moves_count_zero_in_d_eff_in_float_too():
    """A weight no record's influence reaches (sigma 0: here the weight of an input that is 0 on
    every record) leaks nothing: it counts 0 in ``d_eff`` left in float as on a grid, where the
    pass pins it (nux47: dead ReLU units counted 1 each in float, 0 once quantized). Exact counts:
    fails if float weights count ``numel``."""
    n, d = 1500, 12
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, 0] = 0.0
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    # least squares on the moving inputs; the dead input's weight stays 0 (its minimum-norm value)
    Xa = torch.cat([X[:, 1:], torch.ones(n, 1, dtype=torch.float64)], 1)
    b = torch.linalg.solve(Xa.T @ Xa, Xa.T @ y)
    m = nn.Linear(d, 1).double()
    m.weight.data = torch.cat([torch.zeros(1, dtype=torch.float64), b[:d - 1]])[None].clone()
    m.bias.data = b[d - 1:].clone()
    dl = DataLoader(TensorDataset(X, y), batch_size=256)
    rep = ml.assess(m, ["none", "rtn_int8"], dl, mse, num_records=300, uncertainty_draws=0)
    none, q = rep.schemes["none"], rep.schemes["rtn_int8"]
    assert none.d_eff == pytest.approx(12.0) and none.layers["weight"].d_eff == pytest.approx(11.0)
    assert none.pinned_fraction == pytest.approx(1 / 13)
    assert q.layers["weight"].d_eff <= 11.0 and q.layers["weight"].pinned_fraction == pytest.approx(1 / 12)


def test_assess_and_score_schemes_inside_inference_mode():
    """rv47: called inside ``torch.inference_mode`` (a Lightning validation loop, a user's block)
    ``assess`` and ``score_schemes`` run outside it and give the figures of a plain call (before:
    every scheme failed late, "Inference tensors do not track version counter")."""
    m, dl = _ridge_linear()
    plain = ml.assess(m, ["rtn_int8", "rtn_int4"], dl, mse, num_records=300, uncertainty_draws=0)
    with torch.inference_mode():
        inside = ml.assess(m, ["rtn_int8", "rtn_int4"], dl, mse, num_records=300, uncertainty_draws=0)
    for k in plain.schemes:
        assert inside.schemes[k].error is None and inside.schemes[k].leakage == plain.schemes[k].leakage, k
