"""A researcher's own training (fu32): a Lightning module with an embedding tied to its output
layer, dict batches, a metric it logs itself, a Hydra sweep whose job reports are loaded back.
Each test is a surprise that run met: a name the user's model answers to refused, an error that
did not say where the fix goes, a reason that named the wrong layer, a loaded report that
recommended the one scheme of a sweep's job as the safest."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.assess import select_params
from mis_lightning.report import Report, SchemeResult, merge_scheme_warnings


class _TiedLM(nn.Module):
    """Embedding tied to the output Linear (the usual language-model tie): named_parameters
    lists the weight once, as 'emb.weight'; state_dict has 'head.weight' too."""

    def __init__(self, v: int = 6, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, v)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x).mean(1))))


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _loaders(n: int = 120):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (n, 3), generator=g)
    y = x[:, 0].clone()
    return (DataLoader(TensorDataset(x[: n - 40], y[: n - 40]), batch_size=40),
            DataLoader(TensorDataset(x[n - 40:], y[n - 40:]), batch_size=40))


def test_a_tied_weight_can_be_named_by_any_of_its_holders():
    """``params=['head.weight']`` (the output layer's name, as state_dict lists it) was refused:
    "params not in the model: ['head.weight'] (did you mean 'mid.weight' or 'emb.weight'?)", so the
    user could not name the layer they meant. Any holder's name now selects that one parameter,
    under the name the report uses (named_parameters'), once."""
    torch.manual_seed(0)
    m = _TiedLM()
    assert "head.weight" in m.state_dict() and "head.weight" not in dict(m.named_parameters())
    assert select_params(m, ["head.weight"]) == ["emb.weight"]
    assert select_params(m, ["head.weight", "mid.weight", "emb.weight"]) == ["emb.weight", "mid.weight"]
    with pytest.raises(KeyError, match="'hed.weight'"):  # a real typo is still refused
        select_params(m, ["hed.weight"])
    train, _ = _loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(m, ["rtn_int8"], train, _ce, params=["head.weight"], weight_decay=1e-2,
                        estimation="diagonal", num_records=16, uncertainty_draws=0)
    assert rep.d == m.emb.weight.numel() and list(rep.schemes["rtn_int8"].layers) == ["emb.weight"]


def test_an_unmeasured_utility_key_says_where_a_metric_is_added():
    """``utility_key='val_acc'`` (the key the module logs with self.log) was refused with "not a
    measured utility metric: the measured ones are ['loss']" and no word on how to measure it:
    each front end now names its own option (the callback's ``utility_metrics=``, assess's
    ``metrics=``) and says a logged key is not measured on the quantized copies; the app, whose
    metrics follow the task, gets no such advice."""
    from mis_lightning import MISCallback
    from mis_lightning.assess import check_utility_metric
    from mis_lightning.config import ScoringConfig

    with pytest.raises(ValueError, match=r"utility_key='val_acc' is not a measured utility metric") as e:
        MISCallback(["rtn_int8"], loss_fn=_ce, utility_key="val_acc")
    assert "utility_metrics={'val_acc': <a torchmetrics Metric>}" in str(e.value) and "self.log" in str(e.value)
    train, val = _loaders()
    with pytest.raises(ValueError, match=r"metrics=\{'val_acc'") as e:
        ml.assess(_TiedLM(), ["rtn_int8"], train, _ce, val_dataloader=val, utility_key="val_acc")
    assert "utility_metrics=" not in str(e.value)
    with pytest.raises(ValueError) as e:
        check_utility_metric(ScoringConfig(utility_key="acc"), {"rmse": None}, where="mis.scoring.utility_key",
                             metrics_option=None)
    assert str(e.value) == "mis.scoring.utility_key='acc' is not a measured utility metric: the measured ones are " \
                           "['loss', 'rmse']"


def test_the_tied_weight_reason_names_both_holders_and_reads_in_the_plural():
    """The reason a torchao scheme leaves a weight tied to an Embedding in float read "emb.weight
    (tied weight: also held by Embedding 'emb'.weight, which schemes 'a', 'b' and 'c' does not
    quantize together with this layer": the parameter is named after the embedding, and "this
    layer" (the Linear head the scheme does quantize) was never named. Both holders are named
    now, and the merged warning of several schemes says "do not"."""
    torch.manual_seed(0)
    m = _TiedLM()
    train, _ = _loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(m, ["int8_weight_only", "intx_weight_only_int4"], train, _ce, weight_decay=1e-2,
                        estimation="diagonal", num_records=16, uncertainty_draws=0)
    reason = rep.schemes["int8_weight_only"].float_params["emb.weight"]
    assert reason.startswith("tied weight: Linear 'head'.weight is also held by Embedding 'emb'.weight, which "
                             "scheme 'int8_weight_only' does not quantize with it")
    merged = [w for w in rep.warnings if "tied weight" in w]
    assert len(merged) == 1
    assert ("which schemes 'int8_weight_only' and 'intx_weight_only_int4' do not quantize with it"
            in merged[0]), merged[0]
    assert merge_scheme_warnings([("a", "scheme 'a' does not x"), ("b", "scheme 'b' does not x")]) == [
        "schemes 'a' and 'b' do not x"]


def _one_scheme_report() -> Report:
    r = SchemeResult(name="intx_weight_only_int4", leakage=0.22, mis=0.78, baseline_leakage=0.27, d_eff=3.0, d=4,
                     zero_fraction=0.0, pinned_fraction=0.0, bits_per_weight=6.0, method="clt",
                     utility={"auroc": 0.94})
    return Report(n=40, d=4, estimation={}, diagnostics={}, baseline_leakage=0.27, baseline_mis=0.73,
                  schemes={r.name: r})


def test_a_sweep_jobs_note_in_place_of_the_verdict_is_kept_in_its_json(tmp_path):
    """A sweep job's report.md says "verdict: none in this job, which assessed one scheme", but
    its report.json loaded with Report.from_json printed "verdict: safest with auroc within 1% of
    the best: intx_weight_only_int4", the one scheme it saw, which need not be the sweep's safest
    (fu32's sweep: int2 leaked 0.151 against int4's 0.226). The note is a field of the report,
    saved and loaded with it; a report without one keeps its JSON as before."""
    plain = _one_scheme_report()
    assert "verdict_note" not in plain.to_dict() and "verdict: safest" in plain.table()
    noted = _one_scheme_report()
    noted.verdict_note = "verdict: none in this job, which assessed one scheme (intx_weight_only_int4)"
    noted.to_json(tmp_path / "report.json")
    back = Report.from_json(tmp_path / "report.json")
    assert back.verdict_note == noted.verdict_note
    assert back.table() == noted.table() and "verdict: safest" not in back.table()
    assert noted.verdict_note in back.table()
    assert back.table(with_verdict=False) == plain.table(with_verdict=False)  # no verdict, no note
    assert back.table(verdict_note="other note").count("other note") == 1  # an explicit note wins


def test_a_monitor_on_a_utility_the_callback_does_not_measure_says_how_to_measure_it():
    """``EarlyStopping(monitor='mis/int8_weight_only/utility/val_acc')`` (the module logs val_acc
    itself) was refused with close spellings of the loss keys only; the message now says the
    utility keys come from ``utility_metrics=`` and how to add that one. A key that is no utility
    keeps the old message."""
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import EarlyStopping

    from mis_lightning import _lightning_support as lt
    from mis_lightning.tracking import metric_keys

    keys = metric_keys(["int8_weight_only"], [], "mis")
    trainer = SimpleNamespace(callbacks=[EarlyStopping(monitor="mis/int8_weight_only/utility/val_acc")])
    with pytest.raises(ValueError, match=r"MISCallback logs no such key") as e:
        lt.check_monitors(trainer, keys, "mis", 1)
    assert "pass MISCallback(utility_metrics={'val_acc': <a torchmetrics Metric>})" in str(e.value)
    trainer = SimpleNamespace(callbacks=[EarlyStopping(monitor="mis/int8_weight_only/mls")])
    with pytest.raises(ValueError, match=r"did you mean 'mis/int8_weight_only/mis'") as e:
        lt.check_monitors(trainer, keys, "mis", 1)
    assert "utility_metrics" not in str(e.value)


def test_a_dict_batch_without_batch_fn_names_its_keys_and_a_picklable_fix():
    """The Metric (and ``assess``) on dict batches said "got dict. Pass batch_fn=lambda batch:
    (inputs, targets)": no keys, and a lambda, which a pickled Metric (spawned workers,
    torch.save) cannot hold. It now names the keys, a module-level function and the
    ``mis_per_sample_loss`` hook, as the callback's message does."""
    m = ml.MISIndicator(_TiedLM(), _ce, ["rtn_int8"], num_records=8)
    x = torch.randint(0, 6, (8, 3))
    with pytest.raises(TypeError, match=r"got dict with keys \['x', 'y'\]: pass batch_fn=<a module-level function"
                                        r" batch -> \(inputs, targets\)>, or define mis_per_sample_loss"):
        m.update({"x": x, "y": x[:, 0]})


def test_loading_a_file_that_is_not_json_names_it_and_what_loads(tmp_path):
    """``Report.from_json("sweep/aggregate.csv")`` raised a bare "JSONDecodeError: Expecting
    value: line 1 column 1 (char 0)", naming neither the file nor what loads."""
    p = tmp_path / "aggregate.csv"
    p.write_text("job,scheme,leakage\n0,int8_weight_only,0.27\n")
    with pytest.raises(ValueError, match=r"aggregate.csv is not JSON \(Expecting value: line 1 column 1 \(char 0\)\)"
                                         r": Report.from_json reads a report saved as JSON") as e:
        Report.from_json(p)
    assert "each job's report.json loads" in str(e.value)


def _job(root, num: int, overrides: list[str], scheme: str, leakage: float, auroc: float, base: float = 0.27):
    import json

    d = root / f"{num}_{scheme}"
    d.mkdir(parents=True)
    row = {"scheme": scheme, "bits_per_weight": 4.0, "leakage": leakage, "mis": 1 - leakage,
           "leakage_p10": leakage - 0.01, "leakage_p90": leakage + 0.01, "baseline_leakage": base, "d_eff": 3.0,
           "d": 10, "zero_fraction": 0.0, "pinned_fraction": 0.0, "method": "clt", "error": "",
           "utility_auroc": auroc}
    (d / "result.json").write_text(json.dumps({"job": {"num": num, "overrides": overrides}, "rows": [row]}))


def test_a_sweep_over_schemes_alone_gets_a_verdict_in_its_aggregate(tmp_path):
    """Each job of ``mis-lightning -m quantizer=a,b,c`` points to aggregate.md for the comparison,
    which listed the rows and chose none: the README's question (which scheme is safest for the
    accuracy you need) went unanswered by its own sweep. Jobs that differ only in their schemes
    and share their unquantized baseline now get the table's verdict, rows named "<job>: <scheme>";
    jobs that trained other models (another seed override, or the same overrides with another
    baseline) are not compared."""
    from mis_lightning.app import aggregate as agg

    one = tmp_path / "one"
    for num, (s, lk, u) in enumerate([("int8", 0.27, 0.9425), ("int4", 0.226, 0.9401), ("int2", 0.151, 0.8945)]):
        _job(one, num, [f"quantizer={s}", "data=synthetic_logistic"], s, lk, u)
    agg.aggregate(one, verbose=False)
    md = (one / "aggregate.md").read_text()
    assert ("verdict across jobs 0, 1, 2 (the same training; only their schemes differ): safest with auroc "
            "within 1% of the best (0.9425, 0: int8): 1: int4 (leakage 0.2260)") in md
    # a sweep over seeds too: one verdict per seed, named by it
    two = tmp_path / "two"
    for num, (seed, s, lk) in enumerate([(1, "int8", 0.27), (1, "int2", 0.15), (2, "int8", 0.3), (2, "int2", 0.2)]):
        _job(two, num, [f"quantizer={s}", f"seed={seed}"], s, lk, 0.94, base=0.27 + seed / 100)
    agg.aggregate(two, verbose=False)
    lines = [x for x in (two / "aggregate.md").read_text().splitlines() if x.startswith("verdict")]
    assert [x.split(":")[0] for x in lines] == ["verdict across jobs 0, 1 (seed=1) (the same training; only their "
                                                 "schemes differ)", "verdict across jobs 2, 3 (seed=2) (the same "
                                                 "training; only their schemes differ)"]
    assert "1: int2 (leakage 0.1500)" in lines[0] and "3: int2 (leakage 0.2000)" in lines[1]
    # the same overrides but another baseline: another trained model, no comparison
    three = tmp_path / "three"
    _job(three, 0, ["quantizer=int8"], "int8", 0.27, 0.94, base=0.27)
    _job(three, 1, ["quantizer=int2"], "int2", 0.15, 0.94, base=0.31)
    agg.aggregate(three, verbose=False)
    assert ("verdict: none across jobs 0, 1: their unquantized baselines differ (0.2700 to 0.3100), so they "
            "assessed different trained models") in (three / "aggregate.md").read_text()
