"""Schemes whose weights left in float determine the quantized ones through the full correlation
(cr49): the correlated headline then equals the unquantized one, and the report says so (``=`` in
the table, one warning, ``SchemeResult.exact_determination``), and the verdict calls no such
scheme "safest"."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.functional.correlated import EXACT_SPAN_NEAR_RULE, Correlation
from mis_lightning.report import (
    BASELINE_TIE_RTOL,
    Report,
    SchemeResult,
    float_determined,
    format_table,
    legend,
    verdict,
)


def _rank_deficient(d: int = 6, r: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A ``[d, d]`` correlation of rank ``r`` (unit diagonal) and its factor ``B [d, r]``."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, r, generator=g, dtype=torch.float64)
    B = B / B.norm(dim=1, keepdim=True)
    return B @ B.T, B


def test_exact_block_spanning_the_kept_eigenspace_determines_the_form():
    """Rank-3 R over 6 weights: 3 generic exact weights span z, so the Gaussian form of any kappa
    on the other 3 equals the unquantized w'R^+w (to round-off); 2 exact weights do not, and the
    form drops. The closed form of the determined case: Var(a'U | U_E) = 0 when U_E fixes z."""
    R, _ = _rank_deficient()
    corr = Correlation(full=R)
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = corr.quadratic(w)
    k3 = torch.tensor([1.0, 1.0, 1.0, 0.3, 0.05, 0.0], dtype=torch.float64)
    span = corr.exact_span(k3)
    assert span is not None and span.determined and (span.d, span.rank, span.exact, span.exact_rank) == (6, 3, 3, 3)
    assert not span.near_rule and span.smallest > EXACT_SPAN_NEAR_RULE * span.rule
    # round-off of a [6, 3] factor (1e-12 relative): far below any real credit
    torch.testing.assert_close(corr.quadratic(w, k3), base, rtol=1e-10, atol=0.0)
    k2 = torch.tensor([1.0, 1.0, 0.3, 0.3, 0.05, 0.0], dtype=torch.float64)
    span2 = corr.exact_span(k2)
    assert span2 is not None and not span2.determined and span2.exact_rank == 2
    assert bool((corr.quadratic(w, k2) < base * (1 - 1e-3)).all())
    # nothing quantized, or nothing exact: no record
    assert corr.exact_span(torch.ones(6, dtype=torch.float64)) is None
    assert corr.exact_span(torch.full((6,), 0.5, dtype=torch.float64)) is None
    d = span.as_dict()
    assert d["determined"] is True and d["float_weights"] == 3 and d["rank"] == 3


def test_determination_through_a_tiny_direction_is_near_the_rule():
    """The exact block reaches one of z's directions only through a combination of variance
    1e-14 of lambda_max (beneath R's rule at RCOND = 1e-9): still determined (the model R ~ B B'
    counts it), and flagged ``near_rule`` (the headline then an upper bound)."""
    R, B = _rank_deficient(d=5, r=2, seed=3)
    # weight 0 and 1: nearly the same direction of z, apart by 1e-7 along the other
    e0, e1 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    B[0] = e0
    B[1] = (e0 + 1e-7 * e1) / (1 + 1e-14) ** 0.5
    corr = Correlation(full=B @ B.T)
    span = corr.exact_span(torch.tensor([1.0, 1.0, 0.2, 0.2, 0.2], dtype=torch.float64))
    assert span is not None and span.determined and span.near_rule
    assert span.smallest < span.rule  # ~5e-8 against sqrt(1e-9) = 3.2e-5


def _scheme(name: str, leakage: float, base: float = 0.2, quantized: float = 0.5, d_eff: float = 8.0,
            determination: dict | None = None, interval: tuple[float, float] | None = None) -> SchemeResult:
    return SchemeResult(name=name, leakage=leakage, mis=1 - leakage, baseline_leakage=base, d_eff=d_eff, d=10,
                        zero_fraction=0.0, pinned_fraction=0.0, bits_per_weight=20.0, method="clt",
                        quantized_fraction=quantized, covariance="full", leakage_independent=0.15,
                        exact_determination=determination, interval=interval)


def _report(schemes: list[SchemeResult], base: float = 0.2) -> Report:
    return Report(n=1000, d=10, estimation={}, diagnostics={}, schemes={s.name: s for s in schemes},
                  baseline_leakage=base, baseline_mis=1 - base, baseline_pool_leakage=base)


SPAN = {"d": 10, "rank": 6, "float_weights": 7, "float_rank": 6, "smallest_singular_value": 1e-6,
        "rank_rule": math.sqrt(1e-9), "determined": True, "near_rule": True}


def test_the_report_marks_warns_once_and_round_trips(tmp_path):
    """``=`` in the table with its legend line; one warning per scheme naming the rank, the float
    count, the independent value and the upper bound where near the rule; the stuck case (no
    determination record, independent form dropping) keeps its own warning; JSON keeps the field."""
    from mis_lightning.assess import _consistency_warnings

    none = _scheme("none", 0.2, quantized=0.0, d_eff=10.0)
    det = _scheme("fc_int2", 0.2 * (1 - 1e-13), determination=SPAN)
    tie = _scheme("tied", 0.2 * (1 + BASELINE_TIE_RTOL / 2))           # no record: equal within 1e-9
    stuck = _scheme("stuck", 0.2 * (1 - 5e-4))                         # the singular-Hessian cap (1e-3)
    low = _scheme("int2", 0.1, determination={**SPAN, "determined": False, "float_rank": 4})
    rep = _report([none, det, tie, stuck, low])
    assert [float_determined(s) for s in (none, det, tie, stuck, low)] == [False, True, True, False, False]
    rows = rep.rows()
    text = format_table(rows)
    marked = [ln.split()[0] for ln in text.splitlines() if " = " in ln]
    assert marked == ["fc_int2", "tied"]
    assert "=: the unquantized baseline's figure although the scheme quantizes weights" in legend(rows)
    w = _consistency_warnings(rep, {"baseline_leakage_independent": 0.19}, None)
    assert len(w) == 2
    assert w[0].startswith("the correlated headline of fc_int2 (independent form 0.15; 7 weights exact")
    assert "span rank 6 of 10" in w[0] and "determine the quantized ones" in w[0]
    assert "fc_int2 (1e-06 of sqrt(lambda_max), beneath the rule's 3.2e-05)" in w[0] and "upper bound" in w[0]
    assert "tied" not in w[0] and "stuck" not in w[0]
    assert "stuck (independent form 0.15), tied (independent form 0.15) equals the unquantized value 0.2 " \
        "(marked = in the table: tied)" in w[1]
    # every scheme in one warning only
    for name in ("fc_int2", "tied", "stuck"):
        assert sum(f"{name} (independent form" in x for x in w) == 1
    path = tmp_path / "r.json"
    rep.to_json(path)
    back = Report.from_json(path)
    assert back.schemes["fc_int2"].exact_determination == SPAN
    assert back.rows()[1].get("float_determined") is True


def test_verdict_calls_no_scheme_safest_at_the_baseline():
    """Without the change the verdict named a quantized scheme at the baseline "safest"; now it
    says no scheme is safer than the float model, and picks a scheme below the baseline when one
    reads lower."""
    none = _scheme("none", 0.2, quantized=0.0, d_eff=10.0)
    det = _scheme("fc_int2", 0.2 * (1 - 1e-13), determination=SPAN)
    rows = _report([none, det]).rows()
    text = verdict(rows)
    assert "safest" not in text
    assert text.startswith("verdict: no scheme is safer than the unquantized model by this estimate: ")
    assert "fc_int2" in text and "none" in text
    # tied by the printed digits only (no determination record)
    near = _scheme("fp16", 0.2 * (1 - 1e-6))
    assert "safest" not in verdict(_report([none, near]).rows())
    low = _scheme("int2", 0.1, interval=(0.09, 0.11))
    text = verdict(_report([none, det, low]).rows())
    assert text.startswith("verdict: safest: int2 (leakage 0.1000)")


def test_assess_flags_a_twin_layer_left_in_float():
    """End to end (exact sandwich, d = 8): y = a(x) + b(x), two linear layers on the same
    inputs, so only a + b is identified and R has rank 4 of 8; quantizing b alone leaves a in
    float, which fixes z: the headline equals the baseline to round-off (1e-12 relative) while the
    independent form drops, and the report marks, records and warns."""
    import mis_lightning as ml
    from mis_lightning.quantization.mixed import MixedPrecisionScheme

    torch.manual_seed(0)
    n, p, wd = 400, 3, 1e-2
    X = torch.randn(n, p)
    y = X @ torch.tensor([1.0, -0.5, 0.3]) + 0.5 * torch.randn(n)

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(p, 1), nn.Linear(p, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x) + self.b(x)

    m = Twin()
    opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = 0.5 * F.mse_loss(m(X).squeeze(-1), y) + 0.5 * wd * sum(q.pow(2).sum() for q in m.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    dl = DataLoader(TensorDataset(X, y), batch_size=200)
    b_only = MixedPrecisionScheme({"b": "intx_weight_only_int2"}, name="b_int2")
    rep = ml.assess(m, ["none", b_only, "intx_weight_only_int2"], dl,
                    lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, weight_decay=wd, covariance="full")
    s = rep.schemes["b_int2"]
    assert s.exact_determination is not None and s.exact_determination["determined"]
    assert (s.exact_determination["d"], s.exact_determination["rank"]) == (8, 4)
    assert s.leakage == pytest.approx(rep.baseline_leakage, rel=1e-12)
    assert s.leakage_independent < rep.schemes["none"].leakage_independent * 0.98
    whole = rep.schemes["intx_weight_only_int2"]
    assert whole.exact_determination is not None and not whole.exact_determination["determined"]
    assert whole.leakage < rep.baseline_leakage * 0.9
    assert [ln.split()[0] for ln in format_table(rep.rows()).splitlines() if " = " in ln] == ["b_int2"]
    assert sum("b_int2 (independent form" in w for w in rep.warnings) == 1
    assert "safest" not in verdict([r for r in rep.rows() if r["scheme"] != "intx_weight_only_int2"])


def test_every_scheme_at_the_baseline_is_named_by_the_stuck_warning_and_the_verdict():
    """nux52 #7 (s2_transformer.py 20): none, bf16, int8, int4 and int2 all read 0.3383; the
    stuck-headline warning named int2 only (the others' independent forms stay at the baseline's,
    so they are not stuck, but nothing said so) and the verdict said "none, bf16 and 2 more"."""
    from mis_lightning.assess import _consistency_warnings

    schemes = [_scheme("none", 0.2, quantized=0.0, d_eff=10.0)]
    for name in ("bf16", "int8", "int4"):  # at the baseline by both forms
        s = _scheme(name, 0.2 * (1 - 1e-6))
        s.leakage_independent = 0.1899
        schemes.append(s)
    schemes.append(_scheme("int2", 0.2 * (1 - 1e-4)))  # stuck: its independent form drops (0.15)
    rep = _report(schemes)
    (w,) = _consistency_warnings(rep, {"baseline_leakage_independent": 0.19}, None)
    assert w.startswith("the correlated headline of int2 (independent form 0.15) equals the unquantized value 0.2")
    assert "bf16, int4, int8 also read 0.2, but their independent forms stay at the baseline's too" in w
    text = verdict(rep.rows())
    named = text.split(" read its leakage (")[0].split("by this estimate: ")[1]
    assert sorted(named.split(", ")) == ["bf16", "int2", "int4", "int8", "none"], text
