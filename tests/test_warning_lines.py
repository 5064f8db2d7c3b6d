"""A warning's one console line (nux51 #9): its first sentence, or first clause, naming the culprit;
a prefix of the full text; `[...]` where text is left out."""

from __future__ import annotations

import pytest

from mis_lightning._warning_lines import MORE, WARNING_LINE_WIDTH, warning_line

# warnings as the library words them (nux51's CNN fit, session 51), figures as printed there
SADDLE = ("saddle not excluded: the Hessian's lowest eigenvalue reads -0.22 of the largest, within the precision this "
          "gradient allows (0.37 of the largest: gradient norm ratio 0.367), so whether the weights are at a minimum "
          "or near a saddle is not resolved; the figures use its magnitude either way; train further")
STATS = ("the release holds the running statistics of 1 normalisation layer(s) ('body.1'): float buffers "
         "(running_mean, running_var) computed from the training batches, released with every scheme and not scored, "
         "so every figure here is a lower bound for the release. They leak membership too")
REGIME = ("d / n = 0.193 is not small (58 assessed weights, 300 records): sigma, the influences and the unquantized "
          "baseline (d_eff = d) come from a normal approximation of the trained weights that needs d << n. To act: "
          "assess fewer weights (e.g. a head over a frozen encoder) or use more records")
LOADER = ("the training loader is shuffled with drop_last=True: each epoch leaves other records out; n counts every "
          "record it can draw (4000)")
LEVERAGE = ("finite-sample (leverage) correction: mean leverage 0.106 (max 0.294) of the stored records. Their "
            "influences are the leave-one-out shifts")


@pytest.mark.parametrize("text,line", [
    # the first clause where the first sentence is too long
    (STATS, "the release holds the running statistics of 1 normalisation layer(s) ('body.1')" + MORE),
    (REGIME, "d / n = 0.193 is not small (58 assessed weights, 300 records)" + MORE),
    # a first clause under 40 characters takes in the next one, to its comma
    (SADDLE, "saddle not excluded: the Hessian's lowest eigenvalue reads -0.22 of the largest" + MORE),
    # the first sentence, whole, where it fits (its colons included); "e.g." ends no sentence
    (LOADER, LOADER),
    (LEVERAGE, "finite-sample (leverage) correction: mean leverage 0.106 (max 0.294) of the stored records" + MORE),
    ("d / n is large (e.g. 0.3 here). Act", "d / n is large (e.g. 0.3 here)" + MORE),
    ("assess fewer weights, e.g. a head over a frozen encoder, or more records. Then", "assess fewer weights, "
     "e.g. a head over a frozen encoder, or more records" + MORE),
    ("the weights of a casino. Then more", "the weights of a casino" + MORE),  # "no" is a word, not a suffix
    # one short sentence: itself, nothing appended
    ("the model interpolates its training data", "the model interpolates its training data"),
])
def test_the_line_is_the_first_sentence_or_clause(text, line):
    assert warning_line(text) == line


def test_a_long_first_clause_is_cut_outside_brackets_and_is_a_prefix():
    names = ", ".join(f"'layer_{i}.weight' (kind {i})" for i in range(12))
    text = f"schemes leave layers in float: {names}; scored as unprotected"
    line = warning_line("the weights of " + names + " are left in float: every one")
    assert len(line) <= WARNING_LINE_WIDTH + len(MORE) and line.endswith(MORE)
    body = line.removesuffix(MORE)
    assert ("the weights of " + names).startswith(body) and body.count("(") == body.count(")")  # no bracket cut
    # under 40 characters: the next clause to its comma
    assert warning_line(text) == "schemes leave layers in float: 'layer_0.weight' (kind 0)" + MORE
    # one unbroken word: cut at the width
    assert warning_line("x" * 400) == "x" * WARNING_LINE_WIDTH + MORE


def test_whitespace_and_newlines_read_as_one_line_and_the_width_is_checked():
    assert warning_line("a warning\n  over two lines") == "a warning over two lines"
    # no clause end outside brackets between 40 characters and the width: cut at a space (the
    # culprits a bracket names are kept rather than the bracket left out)
    assert warning_line(REGIME, width=60) == "d / n = 0.193 is not small (58 assessed weights, 300" + MORE
    with pytest.raises(ValueError, match="width must be >= 40, got 39"):
        warning_line(REGIME, width=39)


def test_a_failed_schemes_line_keeps_the_errors_cause():
    """rv53: the first-clause rule cut a failed scheme's warning after the error's class
    ("scheme 'needs_gpu' failed, no figures: SchemeUnavailableError [...]"): the console did not say
    why (the table's ``errors:`` did). Its line is cut by words at the width."""
    from mis_lightning.report import failure_warning

    error = ("SchemeUnavailableError: scheme 'needs_gpu' is unavailable: its kernel needs a CUDA GPU with compute "
             "capability 8.0 or newer and this machine has none; on CPU use 'int4_weight_only' instead")
    text = failure_warning("needs_gpu", error)
    line = warning_line(text)
    assert "needs a CUDA GPU" in line and line.endswith(MORE) and len(line) <= WARNING_LINE_WIDTH + len(MORE), line
    assert text.startswith(line[: -len(MORE)]), line
    assert warning_line(failure_warning("x", "ValueError: bad")) == "scheme 'x' failed, no figures: ValueError: bad"


def test_the_warnings_the_star_stands_for_are_one_console_line_naming_each():
    """nux55 (ux56a): a 3-layer CNN trained with Adam printed six warnings, three of them the * legend's
    list again (d / n, the diagonal estimator's leverage, not at a minimum). They are one console line
    now, at the first one's place, naming each failed assumption by the legend's phrase with what to do
    (not at a minimum by its own headline: its likely causes); every other warning keeps its first
    sentence, a phrase with no warning of its own claims nothing, and a table without * is unchanged.
    The report keeps every warning in full."""
    from mis_lightning.report import STAR_LINE, console_warnings

    dn = ("d / n = 2.63 is not small (5,258 assessed weights, 2,000 records): sigma ... come from a normal "
          "approximation that needs d << n. To act: assess fewer weights or use more records")
    lev = ("finite-sample (leverage) correction: mean leverage 0.265 per loss direction (2.39 per record over its 9 "
           "loss directions), from the Hessian diagonal. These figures may read below the exact estimator's")
    beyond = ("schemes 'a' and 'b' quantize Conv2d (c1.weight) beyond torchao's quantize_, which leaves them in "
              "float. The figures are of this wider release")
    mc = "the Hessian diagonal is a Monte Carlo estimate (hessian='ggn_mc'): median relative standard error 0.11"
    nam = ("the model is not at a minimum of the training loss (not converged, or another loss or weight decay): a "
           "Newton step to the minimum would move the weights 1.14 of their sds")
    rec = "the diagonal sandwich read a model with recurrent layers: its sigma's error has no stated bound"
    said = [dn, lev, beyond, mc, nam, rec, "no validation dataloader: the quantized copies' utility was not measured"]
    failed = ("d / n = 2.6; diagonal estimator at mean leverage 0.27 per direction: may read below the exact one; "
              "not at a minimum; saddle not excluded; diagonal sandwich over recurrent layers")
    rows = [{"indicative": failed}, {"indicative": "d / n = 2.6", "error": None}, {"error": "x", "indicative": "no"}]
    lines = console_warnings(said, rows)
    # one failed assumption a line under the lead (ux57: one line of ~370 characters); not converged: the cure
    star = (STAR_LINE + "\n    - d / n = 2.6 (assess fewer weights or use more records)\n    - diagonal estimator at "
            "mean leverage 0.27 per direction: may read below the exact one (estimation='exact' if affordable, for the more conservative figure)\n    - "
            "not at a minimum of the training loss (not converged, or another loss or weight decay); to converge: "
            "full-batch L-BFGS on the objective assessed" + MORE)
    assert lines == [star, warning_line(beyond), warning_line(mc), warning_line(rec), warning_line(said[-1])], lines
    # the diagonal estimator's remedy line (its figures "rows marked *") is the same assumption: claimed too
    remedy = ("the diagonal estimator's figures may read below the exact estimator's (rows marked *; mean leverage 0.27 "
              "per loss direction, above 0.04): measured under estimation='auto' ...")
    assert console_warnings([dn, remedy, lev, nam], rows) == [star]  # base: the remedy on a line of its own
    # d / n alone (the exact estimator's leverage note, ~d / n, the same regime): both in the * line, one item
    exact = ("finite-sample (leverage) correction: mean leverage 0.279 (max 1.65) of the stored records, above 0.1 (the "
             "figures are marked *: the asymptotic regime needs it small, as d / n)")
    assert console_warnings([exact, dn, mc], [{"indicative": "d / n = 0.57"}]) == [
        STAR_LINE + " d / n = 0.57 (assess fewer weights or use more records)" + MORE, warning_line(mc)]
    # a headline that does not suspect the training (dropout trained in train mode) names no L-BFGS cure
    drop = ("the model is not at a minimum of the training loss (likely: dropout 'drop' trained in train mode, "
            "assessed in eval mode): a Newton step ...")
    (line,) = console_warnings([drop], [{"indicative": "not at a minimum"}])
    assert line == f"{STAR_LINE} {warning_line(drop).removesuffix(MORE).removeprefix('the model is ')}{MORE}"
    assert "L-BFGS" not in line and "dropout 'drop'" in line
    # the recurrent phrase, not in STAR_WARNINGS, keeps its warning's own line (nothing dropped); "saddle not
    # excluded", with no warning here, adds nothing to the * line
    assert console_warnings(said, [{"indicative": None}]) == [warning_line(w) for w in said]  # no *: as before
    assert console_warnings([], rows) == []


def test_a_layer_above_the_whole_model_says_what_it_means_for_the_figures_first():
    """nux55: "one layer alone leaks more than the whole model (0.2023) unquantized [...]" alarmed and
    said nothing of what it means: the console line now leads with it (ux56a), the layers in full after."""
    from types import SimpleNamespace as ns

    from mis_lightning.assess import _consistency_warnings

    failed = ns(error="x", layers={"fc1.weight": ns(baseline_leakage=0.2116), "fc2.weight": ns(baseline_leakage=0.2381)})
    (w,) = _consistency_warnings(ns(baseline_leakage=0.2023, rows=lambda: [], schemes={"a": failed}), {}, None)
    assert warning_line(w) == ("the per-layer and whole-model figures are not reliable here, as one layer alone leaks "
                               "more than the whole model (0.2023) unquantized" + MORE)
    assert "fc1.weight (0.2116), fc2.weight (0.2381); releasing more weights cannot leak less" in w


def test_the_monte_carlo_hessian_line_says_the_error_and_the_fix():
    """ux56a: the sampled-label Gauss-Newton's console line named the estimator only ("the Hessian
    diagonal is a Monte Carlo estimate (hessian='ggn_mc', 1 sampled label(s) per record) [...]"):
    its first sentence, the console's line, now gives the error sigma carries and what lowers it."""
    from mis_lightning.estimation.estimate import estimator_warnings

    (w,) = [w for w in estimator_warnings({"ggn_mc_median_relative_error": 0.11, "ggn_mc_samples": 1,
                                           "ggn_mc_p90_relative_error": 0.3}) if "Monte Carlo" in w]
    line = warning_line(w)
    assert "median relative standard error 0.11" in line and "raise ggn_mc_samples or use hessian='ggn'" in line, line
    assert len(line) <= WARNING_LINE_WIDTH + len(MORE)


def test_the_l_bfgs_cures_say_relu_kinks_can_stall_it():
    """A ReLU classifier trained by Adam, then by full-batch L-BFGS as the cure said, kept its negative
    eigenvalue and every * (gradient 3e-3 to 6e-3: L-BFGS stalls at the kinks; the same model with GELU
    reached 5e-5 and no *; docs/benchmarks.md "nux58", ``benchmarks/relu_lbfgs_stall.py``): the
    curvature items of the * line and the not-at-a-minimum warning's cure say so; before, they named
    full-batch L-BFGS alone."""
    from mis_lightning.report import MINIMUM_CURE, STAR_LINE, console_warnings

    saddle = ("saddle not excluded: the Hessian's lowest eigenvalue reads -0.0021 of the largest, within the precision "
              "this gradient allows; the figures use its magnitude either way; train further")
    neg = ("the Hessian has negative curvature (1 of 99 eigenvalues negative): the weights are not at a strict minimum "
           "of the objective assessed; train to convergence")
    for w, phrase in ((saddle, "saddle not excluded"), (neg, "negative curvature")):
        (line,) = console_warnings([w], [{"indicative": phrase}])
        assert line.startswith(STAR_LINE) and "full-batch L-BFGS (ReLU kinks can stall it)" in line, line
    assert "ReLU-type activations L-BFGS can stall" in MINIMUM_CURE and "GELU or SiLU" in MINIMUM_CURE


def test_the_figures_print_each_warning_by_its_console_line_and_say_where_it_is_in_full(tmp_path, monkeypatch):
    """Issue 13 (docs/benchmarks.md "fg59"): the privacy-utility figure printed every warning in full
    under its panels (a 1e5 MLP's five warnings: 4,336 characters, ~0.75 s of matplotlib's glyph-by-glyph
    text, ~7 epochs of the callback's line). It prints the console's lines now (each warning's first
    sentence, those the ``*`` stands for in one entry naming each): every one of them (a figure shared
    without the table keeps each caveat's headline, and its ``*`` marks and their legend), no warning's
    full text where its line leaves some out, and one line saying where each is in full, as each front
    end writes it (the callback's JSON beside the figure)."""
    import matplotlib.pyplot as plt

    from mis_lightning import tracking
    from mis_lightning.report import (
        WARNINGS_IN_FULL,
        Report,
        SchemeResult,
        console_warnings,
        failure_warning,
        privacy_utility_figure,
    )

    def shown(fig) -> str:
        text = " ".join(" ".join(t.get_text().split()) for t in fig.texts)
        plt.close(fig)
        return text

    def flat(s: str) -> str:
        return " ".join(s.split())

    dn = ("d / n = 2.63 is not small (5,258 assessed weights, 2,000 records): sigma, the influences and the unquantized "
          "baseline come from a normal approximation that needs d << n. To act: assess fewer weights or use more records")
    nam = ("the model is not at a minimum of the training loss (not converged, or another loss or weight decay): a "
           "Newton step to the minimum would move the weights 1.14 of their sds; train to convergence with full-batch "
           "L-BFGS (line_search_fn='strong_wolfe') on the same objective")
    beyond = ("schemes 'a' and 'b' quantize Conv2d (c1.weight) beyond torchao's quantize_, which leaves them in "
              "float. The figures are of this wider release, not of the model quantize_ makes")
    fail = failure_warning("int4_weight_only_tinygemm", "SchemeUnavailableError: scheme 'int4_weight_only_tinygemm' "
                           "is unavailable: torchao's tinygemm int4 layout needs a CUDA GPU (compute capability >= 8.0) "
                           "and its kernels; this torch has no CUDA device")
    short = "no validation dataloader: the quantized copies' utility was not measured"
    said = [beyond, dn, fail, nam, short]
    rows = [{"scheme": "a", "bits_per_weight": 8.5, "leakage": 0.1, "leakage_p10": 0.09, "leakage_p90": 0.11,
             "baseline_leakage": 0.12, "indicative": "d / n = 2.6; not at a minimum"},
            {"scheme": "b", "bits_per_weight": 4.5, "leakage": 0.2, "leakage_p10": 0.18, "leakage_p90": 0.22,
             "baseline_leakage": 0.12, "indicative": "d / n = 2.6; not at a minimum"}]
    lines = console_warnings(said, rows)
    assert len(lines) == 4 and lines != said  # the * entry holds dn and nam; the others a line each
    fig = privacy_utility_figure(rows, warnings=said)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    text = shown(fig)
    for line in lines:  # each console line, whole (the * entry's lead and each of its items)
        for part in line.split("\n"):
            assert flat(part) in text, part
    assert text.count("warning: ") == len(lines)
    for w in (dn, nam, beyond, fail):  # each cut on the console: its headline here, not its full text
        assert flat(w) not in text, w
    assert f"warning: {short}" in text  # one short sentence: whole, as on the console
    assert f"each warning in full: {WARNINGS_IN_FULL}" in text
    assert all(lab.endswith("*") for lab in labels) and "note: *: indicative only" in text  # the marks stay
    # nothing left out: no pointer; no warnings: no warning line
    assert "each warning in full" not in shown(privacy_utility_figure(rows[:1], warnings=[short]))
    assert "warning: " not in shown(privacy_utility_figure(rows[:1]))

    # Report.plot points where the front end says; the callback's publish_report to the JSON it writes
    res = SchemeResult(name="a", leakage=0.1, mis=0.9, baseline_leakage=0.12, d_eff=3.0, d=5, zero_fraction=0.0,
                       pinned_fraction=0.0, bits_per_weight=8.0, method="clt", interval=(0.09, 0.11),
                       quantized_fraction=1.0)
    rep = Report(n=100, d=5, estimation={}, diagnostics={}, schemes={"a": res}, baseline_leakage=0.12,
                 baseline_mis=0.88, warnings=[beyond, short])
    assert "each warning in full: report.md, written with this figure" in shown(
        rep.plot(warnings_in_full="report.md, written with this figure"))
    drawn: list[str] = []
    monkeypatch.setattr(tracking, "draw_figure", lambda fig, path, **kw: drawn.append(
        " ".join(" ".join(t.get_text().split()) for t in fig.texts)))
    json_path, _ = tracking.publish_report(tmp_path, rep, [], log_figure=False)
    assert f"each warning in full: {json_path.name}, written with this figure" in drawn[0], drawn
    assert flat(warning_line(beyond)) in drawn[0] and flat(beyond) not in drawn[0]
