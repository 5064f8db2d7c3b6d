"""Schemes whose order by leakage the figures do not resolve are said to be "not ranked beyond
their intervals" in every front end (ux29, from fu27/fu28), and the sweep's frontier draws every
scheme visibly (fu28: int8_weight_only hidden under bf16)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mis_lightning.app import aggregate as agg
from mis_lightning.report import NOT_RANKED, Report, SchemeResult, privacy_utility_figure, ties_line


def _scheme(name: str, leakage: float, interval: tuple[float, float] | None, loss: float) -> SchemeResult:
    return SchemeResult(name=name, leakage=leakage, mis=1 - leakage, baseline_leakage=0.0746, d_eff=3.0, d=5,
                        zero_fraction=0.0, pinned_fraction=0.0, bits_per_weight=8.0, method="clt",
                        interval=interval, quantized_fraction=1.0, utility={"loss": loss})


def _fu28_report() -> Report:
    """fu28's user run (user_adam.log): rtn_int4 0.05142 and rtn_int2 0.05140 print the same
    0.0514, each inside the other's interval, and rtn_int8's 0.0548 lies inside rtn_int4's;
    rtn_int1 (added) reads 0.0300 [0.0280, 0.0320], clearly below all three."""
    schemes = [_scheme("rtn_int8", 0.0548, (0.0510, 0.0586), 0.0478),
               _scheme("rtn_int4", 0.05142, (0.0460, 0.0797), 0.0471),
               _scheme("rtn_int2", 0.05140, (0.0447, 0.1071), 0.0640),
               _scheme("rtn_int1", 0.0300, (0.0280, 0.0320), 0.2000)]
    return Report(n=4000, d=5, estimation={}, diagnostics={}, schemes={s.name: s for s in schemes},
                  baseline_leakage=0.0746, baseline_mis=0.9254)


def test_schemes_not_resolved_by_their_intervals_are_named_in_the_table_json_and_figure(tmp_path):
    """The table printed the three figures and a verdict naming rtn_int4 "safest" with no line
    saying that rtn_int2 (same printed leakage) and rtn_int8 are not ranked against it: one
    line now names them, with or without the verdict (the planner's table leaves the verdict
    out), in the JSON (``not_ranked``) and under the figure (whose rows are "safest on top")."""
    rep = _fu28_report()
    want = (f"{NOT_RANKED}: rtn_int2 (0.0514), rtn_int4 (0.0514), rtn_int8 (0.0548) (each leakage inside "
            "its neighbour's 80% interval, or printed the same: their order is not a ranking)")
    for text in (rep.table(), rep.table(with_verdict=False)):
        assert want in text.splitlines()
        assert "rtn_int1 (0.0300)" not in text  # resolved: not in the line
    assert rep.not_ranked() == [["rtn_int2", "rtn_int4", "rtn_int8"]]
    assert json.loads(rep.to_json())["not_ranked"] == [["rtn_int2", "rtn_int4", "rtn_int8"]]
    assert Report.from_dict(json.loads(rep.to_json())).not_ranked() == rep.not_ranked()  # loads back
    shown = " ".join(t.get_text() for t in privacy_utility_figure(rep.rows()).texts)
    assert "note: " + NOT_RANKED in shown and "rtn_int2 (0.0514)" in shown
    # resolved orders: no line (rtn_int4 moved clear of rtn_int8's interval and vice versa)
    for s, iv in (("rtn_int8", (0.0540, 0.0556)), ("rtn_int4", (0.0500, 0.0530)), ("rtn_int2", (0.0447, 0.0513))):
        rep.schemes[s].interval = iv
    rep.schemes["rtn_int2"].leakage = 0.0490
    assert ties_line(rep.rows()) is None and NOT_RANKED not in rep.table() and rep.not_ranked() == []


def test_rows_without_intervals_are_tied_only_when_they_print_the_same():
    """uncertainty_draws=0: nothing to judge by but the printed figure; the unquantized row
    (no interval) is a point read against its neighbour's interval."""
    rows = [{"scheme": n, "leakage": lk, "leakage_p10": lo, "leakage_p90": hi}
            for n, lk, lo, hi in (("a", 0.05140, None, None), ("b", 0.05142, None, None),
                                  ("c", 0.0600, None, None))]
    assert ties_line(rows).startswith(f"{NOT_RANKED}: a (0.0514), b (0.0514) (")
    rows = [{"scheme": "none", "leakage": 0.2074, "leakage_p10": None, "leakage_p90": None},
            {"scheme": "rtn_int8", "leakage": 0.2073, "leakage_p10": 0.1976, "leakage_p90": 0.2154},
            {"scheme": "rtn_int4", "leakage": 0.1845, "leakage_p10": 0.1750, "leakage_p90": 0.1950}]
    assert ties_line(rows).startswith(f"{NOT_RANKED}: rtn_int8 (0.2073), none (0.2074) (")


# fu28's README sweep (readme_sweep/.../aggregate.md): job, scheme, rmse, leakage, p10, p90
FU28_SWEEP = [(0, "int8_weight_only", 0.6627, 0.0975, 0.0914, 0.1036),
              (1, "intx_weight_only_int4", 0.6714, 0.0887, 0.0793, 0.0953),
              (2, "intx_weight_only_int2", 0.7234, 0.0661, 0.0568, 0.0719),
              (3, "float8_weight_only", 0.6665, 0.0960, 0.0899, 0.1021),
              (4, "bf16", 0.6627, 0.0976, 0.0914, 0.1037),
              (5, "native_int8_dynamic", 0.6621, 0.0975, 0.0914, 0.1036)]


def _sweep_rows() -> list[dict]:
    return [{"job": j, "scheme": s, "leakage": lk, "leakage_p10": lo, "leakage_p90": hi, "utility_rmse": u,
             "baseline_leakage": 0.0976, "bits_per_weight": 12.0, "error": ""}
            for j, s, u, lk, lo, hi in FU28_SWEEP]


def test_sweep_frontier_shows_every_scheme_and_names_the_ties(tmp_path):
    """fu28: in frontier.png int8_weight_only's marker sat under bf16's (same rmse 0.6627,
    leakage 0.0975 / 0.0976) under a title "6 results, 6 distinct", and the legend listed the
    four 8-bit-or-wider schemes "safest first" in an order their intervals do not resolve.
    Now each marker of such a cluster is drawn beside the first (labelled "same point as"), the
    unresolved ones carry a tie letter explained in the legend's title, and aggregate.md has the
    table's line."""
    rows = _sweep_rows()
    fig = agg.frontier_figure(rows)
    ax = fig.axes[0]
    # each point an errorbar: its label on the container, its marker the container's data line
    labels = {c.get_label().split(" (")[0]: c for c in ax.containers}
    assert set(labels) >= {f"{j}: {s}" for j, s, *_ in FU28_SWEEP}
    # each scheme's marker at its own place on the canvas: no two within a marker's width
    fig.canvas.draw()
    pos = {k: c[0].get_transform().transform(c[0].get_xydata())[0] for k, c in labels.items()}
    marker_px = 6.0 * fig.dpi / 72.0
    keys = sorted(pos)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert max(abs(pos[a] - pos[b])) >= marker_px, (a, b, pos[a], pos[b])
    # the data are unchanged: the markers drawn offset keep their values
    assert tuple(labels["4: bf16"][0].get_xydata()[0]) == pytest.approx((0.6627, 0.0976))
    text = {k: c.get_label() for k, c in labels.items()}
    assert "same point as 0: int8_weight_only, drawn offset" in text["5: native_int8_dynamic"]
    assert "same point as 0: int8_weight_only, drawn offset" in text["4: bf16"]
    assert "same point as" not in text["0: int8_weight_only"] + text["2: intx_weight_only_int2"]
    # ux31 (fu30): the title counted them "6 distinct" beside a legend saying "same point as": the
    # title counts the points as drawn and says how many share another's
    assert ax.get_title() == ("Privacy-utility frontier (6 results at 4 distinct points;\n2 drawn offset: "
                              "the same point as another)")
    tied = sorted(k for k, t in text.items() if "(tie A)" in t)
    assert tied == ["0: int8_weight_only", "3: float8_weight_only", "4: bf16", "5: native_int8_dynamic"]
    assert NOT_RANKED in fig.legends[0].get_title().get_text()
    # aggregate.md: the same line as the table's, rows named as in the legend
    md = agg.markdown_table(rows)
    assert (f"{NOT_RANKED}: 3: float8_weight_only (0.0960), 0: int8_weight_only (0.0975), "
            "5: native_int8_dynamic (0.0975), 4: bf16 (0.0976) (") in md


# nux48: the README sweep's frontier (multirun 10-07-13): native_int8_dynamic, int8_weight_only and bf16
# coincide; the offset drew bf16 (rmse 0.6595) right of float8 (0.6626)
NUX48_SWEEP = [(0, "int8_weight_only", 0.6594668030738831, 0.09878015125750983),
               (1, "intx_weight_only_int4", 0.6647793650627136, 0.08946809204803251),
               (2, "intx_weight_only_int2", 0.7514483332633972, 0.0653967492896406),
               (3, "float8_weight_only", 0.6626124978065491, 0.09708956172965996),
               (4, "bf16", 0.6594573855400085, 0.09883944393997895),
               (5, "native_int8_dynamic", 0.6583467721939087, 0.0987608251631469)]


def _assert_drawn_in_order(xs, drawn):
    """Drawn positions keep the values' order: a strictly smaller value is drawn strictly left."""
    for i, a in enumerate(xs):
        for j, b in enumerate(xs):
            if a < b:
                assert drawn[i] < drawn[j], (i, j, a, b, drawn[i], drawn[j])


def test_offset_markers_never_drawn_past_another_points_utility():
    """nux48: bf16 (rmse 0.6595, same point as native_int8_dynamic) was drawn 14 points right,
    past float8 (0.6626). The offsets (data units, by leakage order as the panel passes them)
    keep every marker's drawn utility in the order of the values, and still move the hidden ones."""
    pts = sorted(NUX48_SWEEP, key=lambda r: r[3])
    xy, names = [(u, lk) for _, _, u, lk in pts], [s for _, s, _, _ in pts]
    dx, shift, same_as = agg._coincident_offsets(xy, names)
    assert shift == [0.0] * len(pts)  # distinct utilities: offsets in data units only
    xs = [u for u, _ in xy]
    _assert_drawn_in_order(xs, [x + d for x, d in zip(xs, dx)])
    moved = {n: d for n, d, s in zip(names, dx, same_as) if s is not None}
    assert set(moved) == {"int8_weight_only", "bf16"} and all(d > 0 for d in moved.values())
    # the figure: the markers' positions on the canvas in the same order
    rows = [{"job": j, "scheme": s, "leakage": lk, "utility_rmse": u, "bits_per_weight": 8.0, "error": ""}
            for j, s, u, lk in NUX48_SWEEP]
    fig = agg.frontier_figure(rows)
    fig.canvas.draw()
    lines = {ln.get_label().split(" (")[0]: ln for ln in fig.axes[0].get_lines() if ln.get_label()[0].isdigit()}
    order = sorted(lines)
    canvas_x = [lines[k].get_transform().transform(lines[k].get_xydata())[0][0] for k in order]
    _assert_drawn_in_order([lines[k].get_xydata()[0][0] for k in order], canvas_x)


def test_offsets_keep_order_on_random_clusters():
    """Random tight clusters beside single points: drawn = value + offset keeps the strict
    order of the values (the offsets are at most half the gap to another cluster's point)."""
    rng = np.random.default_rng(48)
    for _ in range(200):
        n = int(rng.integers(2, 9))
        xy = [(float(rng.choice([0.0, 1.0, 10.0]) + rng.normal(0, 0.05)), float(rng.normal(0, 0.01)))
              for _ in range(n)]
        xs = [x for x, _ in xy]
        dx, _, same_as = agg._coincident_offsets(xy, [str(i) for i in range(n)])
        _assert_drawn_in_order(xs, [x + d for x, d in zip(xs, dx)])
        assert all((d == 0) == (s is None) for d, s in zip(dx, same_as)) or min(xs) == max(xs)


def test_the_ties_line_quotes_each_figure_with_its_marks():
    """Read apart from the table (a sweep's aggregate prints it under a 9-row table; a log keeps
    the line alone), the ties line quoted bare figures that the table marks ``*``/``!``: each now
    carries the table's marks after it, as the table's cell."""
    rows = [{"scheme": "a", "leakage": 0.0548, "leakage_p10": 0.0510, "leakage_p90": 0.0586, "indicative": True,
             "baseline_leakage": 0.06},
            {"scheme": "b", "leakage": 0.05142, "leakage_p10": 0.0460, "leakage_p90": 0.0797,
             "baseline_leakage": 0.05}]
    line = ties_line(rows)
    assert line.startswith(f"{NOT_RANKED}: b (0.0514 !), a (0.0548 *) "), line  # base: b (0.0514), a (0.0548)
