"""A ``mis_per_sample_loss`` hook whose model output does not hold the records in dim 0, or that
calls the model several times, reads what the same model laid out batch-first reads (est57).

The hook's per-record reads (the exact estimator's leverage factors, the diagonal estimator's loss
directions) call it on one record alone, so the record's outputs are that call's whole output: a
per-token model on the tokens flattened (``[B*T, C]``), the batch concatenated with a transformed
copy (``[2B, C]``), a sequence-first RNN (``[T, B, C]``, records one at a time), or every output of a
hook calling the model twice (``self(x)``, ``self(0.5 x)``), joined, have the leverage correction
of their batch-first twins. Before, it was skipped with a warning only: the exact estimator's
figures read 3-7% low (0.152328 against 0.156941 for the flattened tokens, 0.172965 against 0.186034
for the two calls; docs/benchmarks.md "rv56r", "est57"). Where it still cannot run (a weight penalty
inside the hook) the rows are marked ``*`` and the warning's first sentence names what lets it run.
A second call under ``torch.no_grad()`` (``teacher``: a stop-gradient target) reads as its twin with
the target ``.detach()``-ed: forward AD does not see ``no_grad``, so the records' forward-over-reverse
Hessians carried the target's tangent (rv57a: 0.176771 against 0.181997, symmetric, unflagged); the
first such product is checked against reverse-over-reverse (``estimate._forward_ad_agrees``).

The hooks: ``benchmarks/rv56r_hook_layouts.py``'s ``indicator`` (``_Hooked``: ``flat`` / ``flat_bf``,
``cat`` / ``cat_bf`` / ``twice``, ``seq5`` / ``seq5_bf``, ``penalty`` / ``penalty_out``; 64 records,
``rtn_int4``). Reference: the batch-first twin of each hook (the same weights, the same losses: an
independent layout, read through the records-first path); equal to 1e-9 relative for the exact
estimator (float64; the two layouts' sums round differently, ~1e-15) and 1e-6 for the diagonal one
(its gradient sums in float32: 1.5e-9 relative measured on the flattened tokens).
"""

from __future__ import annotations

import pytest

# the hooks and their twins, run as the benchmark that prints the table in docs/benchmarks.md runs them
_assess = pytest.importorskip("benchmarks.rv56r_hook_layouts").indicator


@pytest.mark.parametrize("estimation", ["exact", "diagonal"])
@pytest.mark.parametrize("kind, twin", [("flat", "flat_bf"), ("cat", "cat_bf"), ("seq5", "seq5_bf"), ("twice", "cat_bf"),
                                       ("teacher", "teacher_bf")])
def test_a_hook_output_not_records_first_reads_as_its_batch_first_twin(kind: str, twin: str, estimation: str) -> None:
    hook, twin = _assess(kind, estimation).report, _assess(twin, estimation).report
    d = hook.diagnostics
    assert d.get("leverage_unavailable") is None and not d.get("leverage_not_run"), d.get("leverage_unavailable")
    if estimation == "exact":
        assert d["leverage_correction"] and d["leverage_curvature"] == "exact"
    else:  # the loss directions measured (rank of each record's loss Hessian), not 1 a record
        assert d.get("leverage_directions_note") is None
        assert d["leverage_directions"] == twin.diagnostics["leverage_directions"] > 1
    rel = 1e-9 if estimation == "exact" else 1e-6
    for s in ("rtn_int4",):
        assert hook.schemes[s].leakage == pytest.approx(twin.schemes[s].leakage, rel=rel), (kind, estimation)
        assert hook.schemes[s].baseline_leakage == pytest.approx(twin.schemes[s].baseline_leakage, rel=rel)


def test_a_correction_that_cannot_run_marks_the_rows_and_says_what_lets_it_run() -> None:
    """A weight penalty inside the hook (the loss reads the weights other than through the model's
    output) leaves no per-record factor to take the leverages from: its exact figures read 6% below
    those of the same objective with the penalty as weight decay (``penalty_out``), so the rows carry
    ``*`` with the phrase, and the warning's console line names the cure."""
    rep = _assess("penalty", "exact").report
    out = _assess("penalty_out", "exact").report
    assert rep.diagnostics["leverage_not_run"].startswith("ValueError: mis_per_sample_loss's per-record gradient")
    assert rep.schemes["rtn_int4"].leakage < 0.97 * out.schemes["rtn_int4"].leakage  # what the mark is for
    assert out.diagnostics["leverage_correction"] and "leverage_not_run" not in out.diagnostics
    row = next(r for r in rep.rows() if r["scheme"] == "rtn_int4")
    assert "leverage correction not run" in row["indicative"], row
    assert "leverage correction not run" not in next(r for r in out.rows() if r["scheme"] == "rtn_int4")["indicative"]
    star = next(w for w in rep.console_warnings() if w.startswith("figures marked *"))
    assert "could not run (figures can read low): leave weight penalties out of the hook (weight_decay= counts them)" \
        in star, star
    full = next(w for w in rep.warnings if w.startswith("the finite-sample (leverage) correction could not run"))
    assert "Its cause: the loss hook reads the weights other than through the model's output" in full, full


def test_each_cure_is_matched_by_its_own_refusal_only() -> None:
    """dd58: ``LEVERAGE_OFF_CURES`` matched words (``"holding"``, ``"calls the model"``), so a torch error
    holding the word, or the missing-forward refusal ("the assessment calls the model as it is
    released"), got a cure that was not theirs. Each key is now the phrase its refusal writes
    (estimation.per_sample): each real refusal gets its cure (the messages as raised, with their
    variable parts), anything else the generic one."""
    from mis_lightning.assess import LEVERAGE_OFF_CURES, leverage_off_warning
    from mis_lightning.estimation import per_sample as P

    generic = "leverage_correction=True raises naming the cause"
    raised = {P.HOOK_CALLS_REFUSED: f"ValueError: mis_per_sample_loss calls the model 2 time(s); {P.HOOK_CALLS_REFUSED}",
              P.WEIGHTS_OUTSIDE_OUTPUT: "ValueError: mis_per_sample_loss's per-record gradient of 'w' is not the model "
                                        f"output's Jacobian times dloss/doutput: {P.WEIGHTS_OUTSIDE_OUTPUT}",
              P.FACTORS_OVER_BUDGET: f"ValueError: 3 outputs x 51 weights x 512 records: {P.FACTORS_OVER_BUDGET}100",
              P.OUTPUT_NOT_FLOATING: f"ValueError: the model's output is a dict holding ['torch.int64']; {P.OUTPUT_NOT_FLOATING}"}
    assert set(raised) == {key for key, _, _ in LEVERAGE_OFF_CURES}
    for key, _, cure in LEVERAGE_OFF_CURES:
        assert leverage_off_warning(raised[key], 0.1).split(". Its cause")[0].endswith(cure), key
    for other in ("RuntimeError: a tensor holding a grad_fn cannot be converted (torch)",
                  "TypeError: _NoForward defines no forward method: the assessment calls the model as it is released",
                  "ValueError: the value exceeds budget for this call"):
        assert leverage_off_warning(other, 0.1).split(". Its cause")[0].endswith(generic), other
