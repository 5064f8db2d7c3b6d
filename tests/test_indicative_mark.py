"""Figures outside the analysis's assumptions are marked in every table, not only warned about
(nu41: on a user's CNN at d / n = 3.72 every scheme read the baseline and the verdict still
named a "safest" scheme, while only the warnings said "indicative only").

A row is marked ``*`` (its ``indicative`` field names the causes) where d / n or its d_eff / n
exceeds ``D_EFF_OVER_N_MAX``, or the report's diagnostics say the weights are not at a minimum,
the Hessian has negative curvature, or the model interpolates; the legend and the verdict say
so; a sweep's aggregate table carries the same marks and legend. Ridge regressions solved
exactly (a true minimum), so only the condition under test fails.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _nets import ridge_linear  # tests/_nets.py
from _table_lines import entry  # tests/_table_lines.py

from mis_lightning import Report, assess
from mis_lightning.app import aggregate as agg
from mis_lightning.report import D_EFF_OVER_N_MAX, leakage_marks, regime_failures

F = 19  # d = 20 with the bias


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y) ** 2


def _ridge_report(n: int) -> Report:
    model, loader = ridge_linear(n, F)
    return assess(model, ["rtn_int8", "rtn_int2"], loader, _mse, weight_decay=1e-2, uncertainty_draws=2,
                  covariance="independent")


@pytest.fixture(scope="module")
def small_n():
    return _ridge_report(150)  # d / n = 0.133


@pytest.fixture(scope="module")
def large_n():
    return _ridge_report(2000)  # d / n = 0.01


def _row_line(table: str, scheme: str) -> str:
    return next(ln for ln in table.splitlines() if ln.startswith(scheme + " "))


def test_d_over_n_marks_every_row_the_legend_and_the_verdict(small_n, tmp_path):
    assert small_n.d / small_n.n > D_EFF_OVER_N_MAX  # the fixture's premise
    rows = small_n.rows()
    assert all(r["indicative"] == "d / n = 0.13" for r in rows), rows
    table = small_n.table()
    for scheme in ("rtn_int8", "rtn_int2"):
        assert " *" in _row_line(table, scheme)
    assert "*: indicative only: an assumption of the analysis fails for this figure (d / n = 0.13" in table
    verdict = entry(table, "verdict:")  # wrapped at 100 columns
    assert verdict.endswith("indicative only (*): every figure is outside the analysis's assumptions (see warnings)")
    # derived from what the file keeps: the same after a round trip through JSON
    small_n.to_json(tmp_path / "r.json")
    again = Report.from_json(tmp_path / "r.json")
    assert [r.get("indicative") for r in again.rows()] == [r["indicative"] for r in rows]


def test_inside_the_assumptions_nothing_is_marked(large_n):
    assert large_n.d / large_n.n <= D_EFF_OVER_N_MAX
    assert not any(k in large_n.diagnostics and large_n.diagnostics[k]
                   for k in ("not_at_minimum", "records_unlike_training", "negative_curvature", "interpolating"))
    rows = large_n.rows()
    assert not any("indicative" in r for r in rows)
    table = large_n.table()
    assert " *" not in _row_line(table, "rtn_int8") and "indicative only" not in table


@pytest.mark.parametrize("key, phrase", [("not_at_minimum", "not at a minimum"),
                                         ("records_unlike_training", "records not trained on, or not at a minimum"),
                                         ("negative_curvature", "negative curvature"),
                                         ("interpolating", "interpolating")])
def test_each_failed_diagnostic_marks_every_row(large_n, key, phrase):
    rep = copy.deepcopy(large_n)
    rep.diagnostics[key] = True
    rows = rep.rows()
    assert all(r["indicative"] == phrase for r in rows)
    assert all(leakage_marks(r).endswith(" *") for r in rows)
    # the legend wraps at 100 characters: compared with its whitespace collapsed
    assert f"*: indicative only: an assumption of the analysis fails for this figure ({phrase};" in " ".join(
        rep.table().split())


def test_a_scheme_whose_own_d_eff_over_n_is_large():
    assert regime_failures({}, 1000, 50, 150.0) == ["d_eff / n = 0.15"]
    assert regime_failures({}, 1000, 50, 20.0) == []
    assert regime_failures({}, 100, 50, 20.0) == ["d / n = 0.5"]  # d / n said first, d_eff / n implied


def test_the_sweep_aggregate_carries_the_marks(small_n, large_n, tmp_path):
    for num, rep in enumerate((small_n, large_n)):
        job = tmp_path / f"{num}_job"
        job.mkdir()
        (job / "result.json").write_text(json.dumps({"job": {"num": num, "overrides": [f"data.n={rep.n}"]},
                                                     "status": "ok", "rows": rep.rows(), "warnings": []}))
    agg.aggregate(tmp_path, verbose=False)
    md = (tmp_path / "aggregate.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| 0 ") or ln.startswith("| 1 ")]
    assert lines and all((" *" in ln) == ln.startswith("| 0 ") for ln in lines), lines
    assert "*: indicative only: an assumption of the analysis fails for this figure (d / n = 0.13" in md


def test_trackers_get_the_mark_and_the_float_share(small_n, large_n):
    """The loggers' keys carry the ``*`` (``indicative``) and the ``float`` column
    (``float_fraction``): a dashboard's plain leakage no longer hides either (nu41b). rtn_int*
    leave the bias (1 of d = 20) in float: 0.05, exactly."""
    from mis_lightning.tracking import metric_keys, report_metrics

    for rep, flag in ((small_n, 1.0), (large_n, 0.0)):
        m = report_metrics(rep)
        for scheme in ("rtn_int8", "rtn_int2"):
            assert m[f"mis/{scheme}/indicative"] == flag
            assert m[f"mis/{scheme}/float_fraction"] == pytest.approx(1 / 20, abs=1e-12)
        assert set(m) <= set(metric_keys(["rtn_int8", "rtn_int2"], [], "mis")) | {"mis/baseline/pool_leakage"}


def _marked_row(scheme: str, leakage: float, d_eff: float, d: int = 161, baseline: float = 0.1589) -> dict:
    return {"scheme": scheme, "leakage": leakage, "baseline_leakage": baseline, "d_eff": d_eff, "d": d,
            "leakage_p10": leakage * 0.99, "leakage_p90": leakage * 1.01, "indicative": "not at a minimum"}


def test_the_verdict_states_the_bias_a_near_identity_row_shows_when_every_row_is_marked():
    """nux54 #2: off a minimum int8_weight_only (d_eff 160.9 of 161, nothing removed) read 15% below the
    baseline, and the verdict named a "safest" scheme on such differences. Where every row is '*', a
    row with d_eff / d >= NEAR_IDENTITY_DEFF that reads more than NEAR_IDENTITY_GAP below its baseline
    is named with its gap; differences within it give no verdict, larger ones are said not to be a
    ranking under it. Rows at a minimum (0.0976 against 0.0980), or one row unmarked, keep the plain verdict."""
    from mis_lightning.report import NEAR_IDENTITY_GAP, near_identity_bias, verdict

    int8, int4, int2 = (_marked_row("int8_weight_only", 0.1347, 160.9), _marked_row("int4", 0.1151, 159.0),
                        _marked_row("int2", 0.0963, 157.8))
    row, gap = near_identity_bias([int8, int4, int2])
    assert row is int8 and gap == pytest.approx((0.1589 - 0.1347) / 0.1589)
    text = verdict([int8, int4, int2])
    assert text.startswith("verdict: safest: int2 (leakage 0.0963)"), text
    assert text.endswith("int8_weight_only, which removes almost no information (d_eff 160.9 of 161), reads 15% "
                         "below the unquantized baseline (0.1347 against 0.1589): the size of the bias the failed "
                         "assumptions (not at a minimum) put on these figures: differences between schemes under 15% "
                         "are not a ranking")
    # rv54c / ux55b: at a minimum with d / n = 0.90 (every row '*' by d / n alone; an L-BFGS-polished 8-8-1 MLP,
    # n = 90) int8 read 5.6% below and bf16, which removes nothing, 3.1%: the clause holds there too, and
    # says which assumption failed
    high_dn = [dict(_marked_row(s, lk, de, d=81, baseline=0.8521), indicative="d / n = 0.90")
               for s, lk, de in (("int8_weight_only", 0.8048, 80.99), ("bf16", 0.8259, 81.0), ("int4", 0.5922, 79.2))]
    assert near_identity_bias(high_dn)[0]["scheme"] == "int8_weight_only"
    assert verdict(high_dn).endswith("reads 6% below the unquantized baseline (0.8048 against 0.8521): the size of "
                                     "the bias the failed assumptions (d / n = 0.90) put on these figures: "
                                     "differences between schemes under 6% are not a ranking"), verdict(high_dn)
    # the schemes within the bias of each other: no scheme is ranked
    close = [int8, _marked_row("int4", 0.1250, 159.0)]
    assert verdict(close).startswith("verdict: none: every figure is indicative only (*) and they differ by at "
                                     "most 7%, within the bias shown: int8_weight_only"), verdict(close)
    # at a minimum the near-identity row reads the baseline: no bias stated
    at_min = [_marked_row("int8_weight_only", 0.0976, 160.9, baseline=0.0980), _marked_row("int2", 0.0552, 109.4)]
    assert near_identity_bias(at_min) is None and "bias" not in verdict(at_min)
    assert (0.0980 - 0.0976) / 0.0980 < NEAR_IDENTITY_GAP
    # a coarse row reading far below is quantization, not bias (d_eff / d under NEAR_IDENTITY_DEFF)
    assert near_identity_bias([_marked_row("int2", 0.0963, 150.0)]) is None
    # not every row marked: the marked ones are listed, as before
    unmarked = dict(int2, indicative="")
    assert "bias" not in verdict([int8, int4, unmarked])


def test_a_mean_leverage_above_the_d_over_n_bound_marks_the_rows():
    """nux54 #5: d / n = 0.081, mean leverage 0.247 (max 6.72; the other 11 seeds 0.078-0.090): the
    leverage correction lifted the figure 27%, warned but unmarked. The exact estimator's mean leverage
    above D_EFF_OVER_N_MAX marks the rows where d / n does not already; the diagonal estimator's not."""
    dg = {"mean_leverage": 0.247, "max_leverage": 6.72}
    assert regime_failures(dg, 1000, 81, 80.9) == ["mean leverage 0.25"]
    assert regime_failures({**dg, "mean_leverage": 0.09}, 1000, 81, 80.9) == []
    assert regime_failures({**dg, "leverage_estimate": "diagonal"}, 1000, 81, 80.9) == []
    assert regime_failures(dg, 500, 81, 80.9) == ["d / n = 0.16"]  # one phrase for one regime


def test_the_figure_shows_the_tables_marks_and_what_they_mean():
    """nux54: the privacy-utility PNG showed no '*' although the table did; each row's label now carries
    the table's marks and the marks' legend lines are printed under the panels."""
    import matplotlib.pyplot as plt

    from mis_lightning.report import privacy_utility_figure

    rows = [dict(_marked_row("int8_weight_only", 0.0976, 160.9, baseline=0.0980), bits_per_weight=13.91),
            dict(_marked_row("int2", 0.0552, 109.4, baseline=0.0980), bits_per_weight=8.55, indicative="")]
    rows[0]["beyond_torchao"] = "Conv2d"  # ux55b: the scheme's own mark '^' too (ux54d)
    fig = privacy_utility_figure(rows)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["int2  (8.55 b/w)", "int8_weight_only ^  (13.91 b/w) *"], labels
    notes = " ".join(" ".join(t.get_text().split()) for t in fig.texts)
    assert "*: indicative only: an assumption of the analysis fails" in notes
    assert "^ after a scheme: not the release torchao's quantize_ makes" in notes
    plt.close(fig)
    # ux55b: a sweep's frontier.png carries aggregate.md's marks in its legend, explained under the axes
    # rv55u: job 1's rank-rule check found the shared baseline undetermined, job 0 did not run it: the line
    # carries the mark (it was left bare where the jobs' marks differed, while the notes explained undet.)
    fig = agg.frontier_figure([dict(r, job=i, **({"baseline_cutoff_sensitivity": 0.3} if i else {}))
                               for i, r in enumerate(rows)])
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "0: int8_weight_only ^ *" in names and "1: int2" in names, names
    assert "unquantized baseline undet." in names, names
    notes = " ".join(" ".join(t.get_text().split()) for t in fig.texts)
    assert "*: indicative only: an assumption of the analysis fails" in notes
    assert "^ after a scheme: not the release torchao's quantize_ makes" in notes
    plt.close(fig)
