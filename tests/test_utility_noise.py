"""nux53 #10: the verdict's utility band set against the validation set's sampling noise.

The leakage side carries 80% intervals; the utility that decides the band carried none: a model
with random labels (accuracy 0.242-0.2465 for 4 classes, chance 0.25, 2,000 validation records)
read "safest with acc within 1% of the best (0.2465, bf16): intx_weight_only_int2" with nothing
saying that the gaps deciding the band (0.002-0.0045) are below each accuracy's standard error
sqrt(p(1-p)/m) = 0.0096, nor that the model is at chance. The clause is added; the scheme chosen
and every figure stay as they were.
"""

from __future__ import annotations

import math

import torch
from _table_lines import entry  # tests/_table_lines.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.report import Report, verdict


def _row(name: str, leak: float, acc: float) -> dict:
    return {"scheme": name, "leakage": leak, "leakage_p10": leak - 0.008, "leakage_p90": leak + 0.008,
            "baseline_leakage": 0.19, "utility_acc": acc}


def _chance_rows() -> list[dict]:
    """The newcomer's random-label run (a_rand3000.log): int2 reads the lowest leakage."""
    return [_row("bf16", 0.1899, 0.2465), _row("int8_weight_only", 0.1898, 0.2460),
            _row("intx_weight_only_int4", 0.1850, 0.2445), _row("intx_weight_only_int2", 0.1725, 0.2445),
            _row("intx_weight_only_int3", 0.1790, 0.2420)]


def test_a_band_decided_within_the_noise_and_an_accuracy_at_chance_are_said_nothing_chosen_changes():
    rows = _chance_rows()
    before = verdict(rows, "acc")
    line = verdict(rows, "acc", records=2000, classes={"acc": 4})
    se = math.sqrt(0.2465 * 0.7535 / 2000)  # 0.00964: the binomial error at the best accuracy
    assert f"{se:.4f}" == "0.0096"
    # the scheme chosen and its figures: the line without the clause, unchanged
    assert line.startswith(before), (before, line)
    assert before.startswith("verdict: safest with acc within 1% of the best (0.2465, bf16): "
                             "intx_weight_only_int2 (leakage 0.1725)"), before
    # the choice turns on int2 (the safest in the band): its 0.2445 is 0.00046 above the band's edge
    # 0.2465 * 0.99 = 0.24404; int3 (0.2420, outside) reads a higher leakage and does not decide it
    gap = 0.2445 - 0.2465 * 0.99
    assert (f"; the utility band's choice rests on acc gaps below its standard error (down to {gap:.3e} "
            "from the band's edge; se 0.0096 on 2,000 validation records") in line, line
    # chance's own error on 2,000 records: sqrt(0.25 * 0.75 / 2000) = 0.00968
    assert ("; the model's accuracy is at chance: the best acc 0.2465 is within 2 se (0.0097) of 1/4 = 0.2500"
            in line), line
    # far below chance (an accuracy of 0.05 on 4 classes): said as such
    low = [{**r, "utility_acc": r["utility_acc"] - 0.2} for r in rows]
    # (the accuracies at 5 decimals, as the verdict's band needs them: utility_digits; the errors at 4)
    assert ("; the model's accuracy is below chance: the best acc 0.04650 is more than 2 se (0.0097) below "
            "1/4 = 0.25000: no scheme's utility is told from guessing") in verdict(low, "acc", records=2000,
                                                                                 classes={"acc": 4})
    # without the class count: the noise clause only; without the record count: nothing
    assert "chance" not in verdict(rows, "acc", records=2000)
    assert verdict(rows, "acc", records=None, classes={"acc": 4}) == before


def test_chance_is_judged_by_guessings_own_error_not_the_best_accuracys():
    """rv53b: 0.04 on 50 records of 1,000 classes is 2 hits where guessing expects 0.05 (a
    binomial tail of 1.2e-3): not at chance. The error at p, sqrt(0.04 * 0.96 / 50) = 0.028, put
    1/1000 + 2 se = 0.056 above it and said "at chance"; guessing's own, sqrt(0.001 * 0.999 / 50)
    = 0.0045, does not. 0.003 (within 2 of guessing's errors) is still said."""
    rows = [_row("int8_weight_only", 0.19, 0.04), _row("intx_weight_only_int4", 0.18, 0.04)]
    assert "chance" not in verdict(rows, "acc", records=50, classes={"acc": 1000})
    near = [{**r, "utility_acc": 0.003} for r in rows]
    assert ("the model's accuracy is at chance: the best acc 0.003000 is within 2 se (0.0045) of 1/1000"
            in verdict(near, "acc", records=50, classes={"acc": 1000}))


def test_a_band_resolved_beyond_the_noise_and_other_metrics_get_no_clause():
    rows = [_row("int8_weight_only", 0.19, 0.91), _row("intx_weight_only_int4", 0.18, 0.9095),
            _row("intx_weight_only_int2", 0.10, 0.70)]
    line = verdict(rows, "acc", records=2000, classes={"acc": 4})
    assert line == verdict(rows, "acc"), line  # int4 0.0086 above the edge 0.9009, int2 0.20 below it: se 0.0064
    assert "standard error" not in line and "chance" not in line
    # the same gaps on 20 records: within the noise (se 0.064)
    assert "rests on acc gaps below its standard error" in verdict(rows, "acc", records=20)
    # an rmse (not a share of records): no binomial error, no clause
    rmse = [{**r, "utility_rmse": 1 - r.pop("utility_acc")} for r in _chance_rows()]
    assert verdict(rmse, "rmse", records=2000, classes={"rmse": 4}) == verdict(rmse, "rmse")


def test_assess_records_the_validation_count_and_classes_and_the_table_says_chance(tmp_path):
    """End to end: a classifier trained on random labels (4 classes), its accuracy measured on
    m validation records by a torchmetrics MulticlassAccuracy: the report carries m (counted here
    from the loader) and the class count, the JSON keeps them, and the table's verdict says the
    accuracy is at chance."""
    from torchmetrics.classification import MulticlassAccuracy

    import mis_lightning as ml

    g = torch.Generator().manual_seed(0)
    n, m, k = 256, 300, 4
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, k, (n,), generator=g)
    xv, yv = torch.randn(m, 8, generator=g), torch.randint(0, k, (m,), generator=g)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, k))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=50)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    val = DataLoader(TensorDataset(xv, yv), batch_size=64)
    report = ml.assess(model, ["int8_weight_only", "intx_weight_only_int2"], DataLoader(TensorDataset(x, y), batch_size=64),
                       lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), val_dataloader=val,
                       metrics={"acc": MulticlassAccuracy(num_classes=k, average="micro")})
    assert report.utility_records == sum(len(b[1]) for b in val) == m
    assert report.utility_classes == {"acc": k}
    back = Report.from_json(report.to_json(tmp_path / "r.json") and tmp_path / "r.json")
    assert (back.utility_records, back.utility_classes) == (m, {"acc": k})
    # each scheme's own error (ux54c), a micro accuracy's the binomial at its value; kept in the JSON
    assert report.utility_errors["acc"]["average"] == "micro"
    for name, s in report.schemes.items():
        p = s.utility["acc"]
        assert math.isclose(report.utility_errors["acc"]["se"][name], math.sqrt(p * (1 - p) / m), rel_tol=1e-6)
    assert back.utility_errors == report.utility_errors
    best = max(s.utility["acc"] for s in report.schemes.values())
    se = math.sqrt(best * (1 - best) / m)
    text = report.table(utility_key="acc")
    at_chance = best <= 1 / k + 2 * se
    assert at_chance, best  # random labels: the held-out accuracy is chance's within 2 se
    assert "the model's accuracy is at chance" in entry(text, "verdict:"), text  # wrapped at 100 columns: joined


def test_the_reports_utilities_are_plain_dicts_torch_load_weights_only_reads(tmp_path):
    """rv53b: ``evaluate_utility`` returns a :class:`UtilityValues` (a dict subclass carrying the
    record count); the report's per-scheme utilities stay plain ``dict`` s of floats, as before, so
    ``torch.load``'s default ``weights_only=True`` reads a file holding them (it refuses the
    subclass: "Unsupported global: mis_lightning.evaluation.UtilityValues")."""
    import mis_lightning as ml

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    dl = DataLoader(TensorDataset(x, y), batch_size=16)
    report = ml.assess(model, ["rtn_int8"], dl, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
                       val_dataloader=dl, uncertainty_draws=0)
    utility = report.schemes["rtn_int8"].utility
    assert type(utility) is dict and report.utility_records == 64, (type(utility), report.utility_records)
    torch.save({"utility": utility}, tmp_path / "u.pt")
    assert torch.load(tmp_path / "u.pt", weights_only=True) == {"utility": utility}


def test_a_top_k_accuracy_gets_no_class_count():
    """rv53b: ``MulticlassAccuracy(num_classes=10, top_k=5)`` is at chance at 5/10, not 1/10: no
    class count is recorded for it (the verdict's chance clause would compare with 1/10)."""
    from torchmetrics.classification import MulticlassAccuracy

    from mis_lightning.assess import utility_classes

    assert utility_classes({"acc": MulticlassAccuracy(num_classes=10)}) == {"acc": 10}
    assert utility_classes({"acc": MulticlassAccuracy(num_classes=10, top_k=5)}) == {}


def test_a_macro_accuracy_gets_its_classes_binomial_errors_averaged():
    """ux54c (rv53b): ``MulticlassAccuracy``'s default ``average="macro"`` is the mean of the classes'
    recalls; its error is sqrt(sum_c r_c (1 - r_c) / m_c) / K, not the binomial of its value. Two
    classes of 990 and 10 validation records, recalls 0.9 and 0.5: macro 0.7, se 0.0792 (the
    binomial at 0.7 on 1,000 records reads 0.0145, 5.5x smaller); micro is the share 0.896 with
    the binomial's error. Measured through ``evaluate_utility`` (the model passes the logits through)."""
    from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy, MultilabelAccuracy

    from mis_lightning._accuracy_error import accuracy_error
    from mis_lightning.evaluation import evaluate_utility

    t = torch.cat([torch.zeros(990), torch.ones(10)]).long()
    pred = t.clone()
    pred[:99], pred[990:995] = 1, 0  # class 0: 891 of 990 right (0.9), class 1: 5 of 10 (0.5)
    logits = nn.functional.one_hot(pred, 2).float()
    values = evaluate_utility(nn.Identity(), DataLoader(TensorDataset(logits, t), batch_size=250),
                              lambda o, y: nn.functional.cross_entropy(o, y, reduction="none"),
                              {"acc": MulticlassAccuracy(num_classes=2), "micro": MulticlassAccuracy(
                                  num_classes=2, average="micro"), "weighted": MulticlassAccuracy(
                                  num_classes=2, average="weighted"), })
    assert abs(values["acc"] - 0.7) < 1e-6 and abs(values["micro"] - 0.896) < 1e-6  # float32 counts
    macro = math.sqrt(0.9 * 0.1 / 990 + 0.5 * 0.5 / 10) / 2
    assert values.errors["acc"]["average"] == "macro"
    assert math.isclose(values.errors["acc"]["se"], macro, rel_tol=1e-12)
    assert math.isclose(values.errors["acc"]["chance_se"], math.sqrt(0.25 / 990 + 0.25 / 10) / 2, rel_tol=1e-12)
    for key in ("micro", "weighted"):  # the weighted recall is the share of records too
        assert math.isclose(values.errors[key]["se"], math.sqrt(0.896 * 0.104 / 1000), rel_tol=1e-12), key
    # a binary accuracy: the share's error; a multilabel one: no error claimed (labels of one record
    # are not independent trials); not an accuracy: nothing recorded
    binary = BinaryAccuracy()
    binary.update(torch.tensor([0.9, 0.2, 0.7, 0.1]), torch.tensor([1, 0, 0, 0]))
    binary.compute()
    assert math.isclose(accuracy_error(binary)["se"], math.sqrt(0.75 * 0.25 / 4), rel_tol=1e-12)
    assert accuracy_error(MultilabelAccuracy(num_labels=3))["se"] is None
    assert accuracy_error(nn.Identity()) is None
    # the verdict: the macro error and its formula named; an average without a known error: no clause
    rows = [_row("int8_weight_only", 0.19, 0.70), _row("intx_weight_only_int4", 0.18, 0.6951)]
    errors = {"acc": {"average": "macro", "se": {"int8_weight_only": macro, "intx_weight_only_int4": macro},
                      "chance_se": 0.08}}
    line = verdict(rows, "acc", records=1000, errors=errors)
    assert line.startswith(verdict(rows, "acc"))  # nothing chosen changes
    assert ("rests on acc gaps below its standard error (down to 0.0021 from the band's edge; se 0.0792 on 1,000 "
            "validation records, macro average: the classes' binomial errors averaged;") in line, line
    # the binomial (0.0145) says the same of that gap; 0.67 outside the band (0.023 from its edge): only the macro error
    wider = [rows[0], _row("intx_weight_only_int4", 0.18, 0.67)]
    assert "standard error" not in verdict(wider, "acc", records=1000)
    assert "se 0.0792" in verdict(wider, "acc", records=1000, errors=errors)
    unknown = {"acc": {"average": "none", "se": {}, "chance_se": None}}
    assert verdict(rows, "acc", records=1000, classes={"acc": 2}, errors=unknown) == verdict(rows, "acc")


def test_the_sweeps_aggregate_verdict_gets_the_same_noise_clause():
    """ux54c (ux53d left it): a sweep over schemes (one job each, ``-m quantizer=...``) has its
    verdict in aggregate.md only, by the same ``verdict`` on the jobs' rows; the jobs' validation
    counts and accuracy errors (result.json's ``utility_records`` / ``utility_classes`` /
    ``utility_errors``) now reach it, so it carries the clause a job's own table would: the
    newcomer's random-label rows, each scheme a job of 2,000 validation records."""
    from mis_lightning.app.aggregate import aggregate_verdicts, markdown_table, noise_of, rows_of

    rows = _chance_rows()
    se = {r["scheme"]: math.sqrt(r["utility_acc"] * (1 - r["utility_acc"]) / 2000) for r in rows}
    results = [{"job": {"num": i, "overrides": [f"quantizer={r['scheme']}", "seed=0"]}, "rows": [r],
                "utility_records": 2000, "utility_classes": {"acc": 4},
                "utility_errors": {"acc": {"average": "micro", "se": {r["scheme"]: se[r["scheme"]]},
                                           "chance_se": math.sqrt(0.25 * 0.75 / 2000)}}} for i, r in enumerate(rows)]
    single = verdict(rows, "acc", records=2000, classes={"acc": 4})
    clause = single[single.index("; the utility band's choice"):]
    assert "at chance" in clause
    [line] = aggregate_verdicts(rows_of(results), "acc", noise_of(results))
    assert line.startswith("verdict across jobs 0, 1, 2, 3, 4 (the same training; only their schemes differ): "
                           "safest with acc within 1% of the best (0.2465, 0: bf16): 3: intx_weight_only_int2"), line
    assert line.endswith(clause), (line, clause)
    assert line in markdown_table(rows_of(results), "acc", noise_of(results))
    # without the jobs' counts (result.json of before): no clause, as before; jobs measured on
    # different validation counts: none either (not one validation set)
    assert "standard error" not in aggregate_verdicts(rows_of(results), "acc")[0]
    results[1]["utility_records"] = 1000
    assert "standard error" not in aggregate_verdicts(rows_of(results), "acc", noise_of(results))[0]
