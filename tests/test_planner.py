"""The privacy-aware planner (issue 16): MixedPrecisionScheme and plan()."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning import assess
from mis_lightning.assess import run_estimation
from mis_lightning.config import EstimationConfig
from mis_lightning.planning import PlanConfig, plan
from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.mixed import MixedPrecisionScheme

# the reports' and plans' figures are laid out, not rasterized: no test here reads one
# (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("layout_only_figures")

CANDS = ["rtn_int8", "rtn_int4", "rtn_int2"]
WD = 1e-3


def loss(o, t):
    return 0.5 * (o[:, 0] - t) ** 2


def _ranked_headline(monkeypatch) -> None:
    """This module's fixture reads its baseline 12% higher under the 100x finer rank rule, beyond
    ``report.UNDETERMINED_MOVE`` (10%): its headline is undetermined and the planner ranks no plan
    (cor52). The tests that check how a ranked choice is presented lift the limit (their logic is the
    figures', which the rule does not change)."""
    from mis_lightning import report

    monkeypatch.setattr(report, "UNDETERMINED_MOVE", 1.0)


@pytest.fixture(scope="module")
def setup():
    """A tiny tanh MLP without biases (3 weight matrices, 176 weights) fitted to a minimum of its
    ridge objective by L-BFGS, its train and validation loaders, and one estimate.

    Without biases because the planner's logic needs plans that differ: through the exact
    estimator's own factor (rc46; docs/benchmarks.md, "pl46") a plan hides only the directions its
    released weights do not observe, and with biases this MLP's 21 float biases and 21 row absmaxes
    (revealed by the stored scales) observe all 42 directions the gradient covariance's rule keeps,
    so every plan read the unquantized value. Here the 21 absmaxes leave 21 of the 42 hidden:
    int8 / int4 / int2 everywhere read 0.1234 / 0.1039 / 0.0878 against 0.1243 unquantized."""
    g = torch.Generator().manual_seed(0)
    n = 300
    X = torch.randn(2 * n, 6, generator=g)
    Y = torch.tanh(X @ torch.randn(6, generator=g) / 2) + 0.1 * torch.randn(2 * n, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12, bias=False), nn.Tanh(), nn.Linear(12, 8, bias=False), nn.Tanh(),
                          nn.Linear(8, 1, bias=False))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=400, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = loss(model(X[:n]), Y[:n]).mean() + 0.5 * WD * sum((p ** 2).sum() for p in model.parameters())
        obj.backward()
        return obj

    for _ in range(3):
        opt.step(closure)
    tr = DataLoader(TensorDataset(X[:n], Y[:n]), batch_size=100)
    va = DataLoader(TensorDataset(X[n:], Y[n:]), batch_size=300)
    est = run_estimation(model, tr, loss, EstimationConfig(weight_decay=WD))
    return model, tr, va, est, (X[n:], Y[n:])


def _search_choice(res):
    """The search's own choice (by the proxy) of a plan result: the final choice, unless a
    warning says it gave way ("the search's choice 'X' ... chosen instead"), then the row X."""
    head = "the search's choice '"
    named = [w[len(head):].split("'")[0] for w in res.warnings if w.startswith(head)]
    if not named:
        return res.chosen
    (name,) = named
    (p,) = {id(p): p for p in [*res.uniform.values(), *res.frontier] if p.name == name}.values()
    return p


def _table_utility(model, costs, interaction=None):
    """A utility set by construction (no machine's float rounding in it): ``1 + sum of the
    per-layer costs`` of the candidate each weight matrix holds (a float matrix costs 0),
    ``+ interaction[plan]`` for the plans named (a tuple of candidates per layer). The layers'
    candidates are recognised by their values (each candidate's dequantized grid; a matrix two
    candidates quantize alike, or holding neither a grid nor its float values, is an error)."""
    names = list(costs)
    deq = {c: get_scheme(c).apply(model).grids for c in CANDS}
    deq = {(n, c): deq[c][n].dequantized.float() for c in CANDS for n in names}
    params0 = dict(model.named_parameters())
    interaction = interaction or {}

    def held_by(n, w):
        hits = [c for c in CANDS if torch.equal(w, deq[n, c])]
        assert len(hits) == 1 or (not hits and torch.equal(w, params0[n].detach().float())), (n, hits)
        return hits[0] if hits else None

    def utility(m):
        params = dict(m.named_parameters())
        held = tuple(held_by(n, params[n].detach().float()) for n in names)
        v = 1.0 + sum(costs[n][c] for n, c in zip(names, held) if c is not None)
        return {"loss": v + interaction.get(held, 0.0)}

    return utility


def test_mixed_scheme_uses_each_candidates_backend():
    """Each parameter gets exactly its candidate's grid (as the uniform scheme would give it),
    bits per layer follow, biases stay float with the backend's reason; the model is untouched."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    mixed = MixedPrecisionScheme({"0": "int8_weight_only", "2.weight": "intx_weight_only_int2_g32"})
    res = mixed.apply(m)
    u8 = get_scheme("int8_weight_only").apply(m).grids["0.weight"]
    u2 = get_scheme("intx_weight_only_int2_g32").apply(m).grids["2.weight"]
    assert torch.equal(res.grids["0.weight"].dequantized, u8.dequantized)
    assert torch.equal(res.grids["2.weight"].dequantized, u2.dequantized)
    assert (res.grids["0.weight"].bits_per_weight, res.grids["2.weight"].bits_per_weight) == (
        u8.bits_per_weight, u2.bits_per_weight)
    # the scale-revealed elements are stamped per candidate, as apply() does for a uniform scheme
    assert torch.equal(res.grids["2.weight"].revealed, u2.revealed)
    assert type(res.model[0].weight).__name__ == "Int8Tensor"
    assert "bias" in res.unquantized["2.bias"]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_mixed_scheme_unknown_key():
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(KeyError, match=r"assignment key\(s\) \['fc9'\] match no parameter"):
        MixedPrecisionScheme({"fc9": "rtn_int8"}).apply(m)


def test_plan_prediction_matches_reassessment(setup):
    """The search's proxy equals the pipeline's re-assessed leakage of the real mixed copy
    within 2% (issue 16; here the pipeline's form is the Gaussian one, so they agree to
    rounding), and the predicted utility (float + sum of per-layer measured changes) lies
    within 2 standard errors of the measured validation loss (its noise over the 300 records);
    ``reassess=3`` re-assesses the search's choice and the runner-ups up to 3 plans."""
    model, tr, va, est, (Xv, Yv) = setup
    res = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, max_utility_loss=0.05,
               weight_decay=WD, uncertainty_draws=0, reassess=3)
    # the re-assessed mixed plans (a uniform plan on the frontier is its candidate's row):
    # reassess=3 counts the search's choice, so 3 mixed plans when it is mixed, the 2 runner-ups
    # when it is uniform (its candidate's row, scored anyway; which it is depends on the fixture's
    # figures), and the near-budget plans measured within the budget
    # (fewer when fewer mixed plans within the budget were scored: all of them are then
    # re-assessed, hence on the frontier, so the bound below is exact)
    assessed = [p for p in res.frontier if p.result is not None and p.name not in res.uniform]
    near = sum(c["reassessed"] for c in res.near_budget["checked"])
    within = [p for p in res.frontier if p.name not in res.uniform and p.utility_loss <= 0.05]
    assert len(assessed) == min(3 - (_search_choice(res).name in res.uniform), len(within)) + near
    assert not any(p.name in res.uniform for p in assessed)
    for p in assessed:
        assert p.result.leakage == pytest.approx(p.leakage, rel=0.02)
        qm = MixedPrecisionScheme(p.choices).apply(model).model  # the real mixed copy
        with torch.no_grad():
            per = loss(qm(Xv), Yv)
        se = float(per.std() / math.sqrt(per.numel()))
        assert abs(p.utility - float(per.mean())) <= 2 * se
        assert p.result.utility["loss"] == pytest.approx(float(per.mean()), rel=1e-5)
    # the reported numbers are the pipeline's: assess() on the plan's scheme gives the same
    rep = assess(model, [res.scheme], tr, loss, weight_decay=WD, uncertainty_draws=0, val_dataloader=va)
    assert rep.schemes[res.scheme.name].leakage == pytest.approx(res.leakage, rel=1e-9)
    # pl46: the cutoff check re-reads the unquantized figure itself (here, 176 weights and 300
    # records, it is set by the gradient covariance's rule: 0.1202 -> 0.1373 with the rule 100x
    # finer, a 14% move where this was written, against the check's 5%), named in the warnings
    from mis_lightning.report import CUTOFF_SENSITIVITY_MAX

    b = rep.diagnostics["baseline_cutoff_sensitivity"]
    assert b["move"] > CUTOFF_SENSITIVITY_MAX and any("of the unquantized baseline (" in w for w in rep.warnings)


def _measured_loss(model, plan_point, tr, va):
    """The relative validation-loss change of a plan's real mixed copy against the float model's
    (one validation pass each, as the planner measures a plan: ``evaluate_utility``)."""
    from mis_lightning.evaluation import evaluate_utility

    scheme = MixedPrecisionScheme({g: get_scheme(c).calibrate(model, tr) for g, c in plan_point.choices.items()})
    f = evaluate_utility(model, va, loss)["loss"]
    return (evaluate_utility(scheme.apply(model).model, va, loss)["loss"] - f) / f


def test_plan_is_the_best_feasible_plan(setup):
    """All 27 plans are enumerated (proxy values): the chosen plan has the least leakage among
    the frontier plans whose real copies measure within the utility budget, leakages within
    LEAKAGE_TIE counting as tied and the least *measured* utility loss deciding among them (the
    planner chooses on measured utilities, pl44 / pl47: m48's machine predicted int8|int4|int8
    -0.00175 and int8|int4|int4 -0.00111 but measured -0.00228 and -0.00296, the leakages 3e-5
    apart); the budget holds on re-assessment (or a warning says it does not)."""
    model, tr, va, est, _ = setup
    budget = 0.02
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    res = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, max_utility_loss=budget,
               weight_decay=WD, uncertainty_draws=0, reassess=1, method="clt")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    model.eval()
    names = list(res.chosen.choices)
    assert len(names) == 3
    # the brute force over the frontier with each plan's measured utility loss: the least leakage
    # among those within the budget, leakages within LEAKAGE_TIE (relative) counting as tied
    # (a plan 0.002% leakier with a better loss lost to noise, fu19 p23), then the least measured
    # utility loss, then the fewest bits (planning._best's order)
    from mis_lightning.planning import LEAKAGE_TIE

    measured = {tuple(p.choices.values()): _measured_loss(model, p, tr, va) for p in res.frontier}
    ok = [p for p in res.frontier if measured[tuple(p.choices.values())] <= budget]
    best = min(p.leakage for p in ok)
    tied = [p for p in ok if p.leakage <= best * (1 + LEAKAGE_TIE)]
    want = min(tied, key=lambda p: (measured[tuple(p.choices.values())], p.bits_per_weight, p.leakage))
    assert res.chosen.choices == want.choices, (res.chosen, [(p.choices, measured[tuple(p.choices.values())]) for p in tied])
    ul = (res.utility - res.float_utility) / res.float_utility
    assert ul <= budget or any("does not meet the budget" in w for w in res.warnings)
    # strictly better than every uniform candidate that meets the same budget, or equal to one
    assert res.leakage <= min(u.result.leakage for u in res.uniform.values()
                              if (u.result.utility["loss"] - res.float_utility) / res.float_utility <= budget)
    # ux56b: the plan's table (mis_plan.md, plan.md) and figure carry the report's marks and their legend:
    # here d / n = 0.59 marks every figure '*' and the baseline is undetermined ('undet.')
    from mis_lightning.report import baseline_marks, leakage_marks, marks_legend

    report_rows = {r["scheme"]: r for r in res.report.rows()}
    shown = [report_rows[r["name"]] for r in res.rows()]
    assert all(" *" in leakage_marks(r) for r in shown) and baseline_marks(shown[0]) == " undet."
    table = res.table().splitlines()
    for r, rr in zip(res.rows(), shown):
        (line,) = [ln for ln in table if ln.startswith(f"| {r['name']}") or ln.startswith(f"| **{r['name']} (")]
        assert f"| {r['leakage']:.4g}{leakage_marks(rr)} |" in line
    chosen = next(ln for ln in table if ln.startswith("chosen: "))
    assert f"{res.leakage:.4g}{leakage_marks(report_rows[res.chosen.name])}" in chosen
    assert f"leakage {res.report.baseline_leakage:.4g} undet.;" in next(ln for ln in table if ln.startswith("float model"))
    legend = marks_legend(shown)
    assert table[table.index("marks (as in the report's table):") + 1:][:len(legend)] == legend
    assert any(ln.startswith("  *: indicative only: an assumption of the analysis fails for this figure (d / n = 0.59")
               for ln in legend)
    fig = res.figure()
    words = [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]
    assert {f"{k}{leakage_marks(report_rows[k])}" for k in res.uniform} <= set(words)
    notes = " ".join(" ".join(w.split()) for w in words)
    assert all(" ".join(ln.split()) in notes for ln in legend)
    assert "float model undet.;" in fig._suptitle.get_text()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plan_target_mis_minimises_size(setup):
    model, tr, va, est, _ = setup
    res0 = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, weight_decay=WD,
                uncertainty_draws=0, reassess=1, method="clt")
    target = 1.0 - 0.5 * (res0.report.baseline_leakage + res0.chosen.leakage)  # between float and the safest
    res = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, target_mis=target, weight_decay=WD,
               uncertainty_draws=0, reassess=1, method="clt")
    assert 1.0 - res.chosen.leakage >= target
    assert res.chosen.bits_per_weight == min(p.bits_per_weight for p in res.frontier if 1.0 - p.leakage >= target)


def test_plan_errors(setup):
    model, tr, va, est, _ = setup
    with pytest.raises(ValueError, match=r"plan\(\) needs val_dataloader="):
        plan(model, CANDS, tr, loss, estimate=est, weight_decay=WD)
    # the message names the budget that cannot be met, and what can be reached
    from mis_lightning.planning import PlanInfeasibleError

    # scheme objects as candidates are named by their names, not their reprs
    with pytest.raises(PlanInfeasibleError, match=r"no plan over the candidates \['rtn_int8', 'rtn_int4', 'rtn_int2'\] "
                                                  r"meets the budget .*: max_bits=1.0 is below the fewest reachable "
                                                  r"bits per weight \d"):
        plan(model, [get_scheme(c) for c in CANDS], tr, loss, val_dataloader=va, estimate=est, max_bits=1.0,
             weight_decay=WD, uncertainty_draws=0)
    with pytest.raises(ValueError, match=r"target_mis=0.9999 is above the highest reachable MIS"):
        plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, target_mis=0.9999, weight_decay=WD,
             uncertainty_draws=0)
    with pytest.raises(ValueError, match=r"utility_metric 'acc' is not among the measured utilities \['loss'\]"):
        plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, config=PlanConfig(utility_metric="acc"),
             weight_decay=WD)
    with pytest.raises(ValueError, match=r"PlanConfig.max_bits must be a number >= 0"):
        PlanConfig(max_bits=-1)


def test_app_mode_plan(tmp_path, capsys):
    """`mis-lightning mode=plan`: trains, plans over plan.candidates, writes plan.json / plan.md /
    plan_frontier.png beside the report of the uniform candidates and the re-assessed plans;
    a bad plan option fails before training (named)."""
    import json

    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from mis_lightning.app.job import run_job

    fast = ["data=synthetic_linear", "data.n_train=300", "data.n_val=200", "data.batch_size=300",
            "model=mlp_probe", "trainer.max_epochs=3", "mis.estimation.num_records=64",
            "mis.scoring.uncertainty_draws=0", "mis.scoring.method=clt", "logger=none", "progress=false", "mode=plan",
            "plan.candidates=[rtn_int8,rtn_int2]", "plan.reassess=2"]

    def cfg(extra, out):
        with initialize_config_module("mis_lightning.conf", version_base="1.3"):
            c = compose("config", overrides=[*fast, *extra, f"trainer.default_root_dir={out}"])
        with open_dict(c):
            c.output_dir = str(out)
        return c

    run_job(cfg(["plan.max_utility_loss=0.5"], tmp_path / "run"))
    out = tmp_path / "run"
    for f in ("plan.json", "plan.md", "plan_frontier.png", "report.json", "result.json"):
        assert (out / f).is_file(), f
    pj = json.loads((out / "plan.json").read_text())
    assert pj["budget"] == {"max_utility_loss": 0.5, "max_bits": None, "target_mis": None}
    rep = json.loads((out / "report.json").read_text())
    (chosen,) = [r for r in pj["rows"] if r["chosen"]]  # its report row: "plan", or a uniform candidate's
    assert {"rtn_int8", "rtn_int2", chosen["name"]} <= set(rep["schemes"])
    assert rep["schemes"][chosen["name"]]["leakage"] == pytest.approx(pj["leakage"])
    assert sum(r["choices"] == chosen["choices"] for r in pj["rows"]) == 1  # never assessed twice
    assert json.loads((out / "result.json").read_text())["plan"]["scheme"]["assignment"] == pj["scheme"]["assignment"]
    assert "plan (candidates ['rtn_int8', 'rtn_int2']" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"PlanConfig.max_bits must be a number >= 0 or None, got -1.0"):
        run_job(cfg(["plan.max_bits=-1"], tmp_path / "bad"))
    assert not (tmp_path / "bad" / "model.ckpt").exists()  # failed before training


def test_callback_plans_at_fit_end(tmp_path):
    """MISCallback(plan=...) plans after the end-of-fit assessment with the same estimate and
    writes mis_plan.json / mis_plan.png; the plan's leakage is the re-assessed one."""
    import json

    from mis_lightning import MISCallback

    cb = MISCallback(["rtn_int8"], dirpath=tmp_path, num_records=32, uncertainty_draws=0, method="clt",
                     plan={"candidates": ["rtn_int8", "rtn_int2"], "reassess": 1})
    _callback_fit(tmp_path, cb)
    assert cb.last_error is None and cb.plan_result is not None
    assert set(cb.plan_result.chosen.choices) == {"net.0.weight", "net.2.weight"}
    pj = json.loads((tmp_path / "mis_plan.json").read_text())
    assert pj["leakage"] == pytest.approx(cb.plan_result.report.schemes[cb.plan_result.chosen.name].leakage)
    assert (tmp_path / "mis_plan.png").is_file()
    # pl44: the table too (a plan over its budget is marked and warned there, not only in the JSON)
    assert (tmp_path / "mis_plan.md").read_text() == cb.plan_result.table() + "\n"
    with pytest.raises(KeyError):
        MISCallback(["rtn_int8"], plan={"candidates": ["rtn_int9"]})


def test_candidate_whose_proxy_misses_is_named(setup, monkeypatch):
    """A candidate whose proxy misses its re-assessed leakage by more than 2% is named in the
    warnings, with the size of the miss and, for non-nearest rounding (HQQ's optimised scales:
    the pipeline re-quantizes Monte Carlo draws, the search's proxy reads the released cells),
    that its rounding is not nearest; a candidate within 2% is not. The size of HQQ's real miss
    depends on the fitted weights, which depend on the machine's float32 kernels (the proxy read
    1.3-1.5% low on ChEMBL, docs/benchmarks.md, "Planner: the measurements formerly in docs/planner.md";
    on this fixture more than 2% low where the test was written, 1.2% low on an AVX512-FP16 Xeon): the miss is made certain by giving the search
    0.8 x the cells' kappa of every HQQ weight (the pipeline's own scoring untouched); rtn_int4
    (the Gaussian form, far below the unquantized baseline's cap, which moves rtn_int8 by about
    1%) is the candidate within 2%."""
    from mis_lightning import planning

    real = planning._grid_moments

    def hqq_kappa_low(grid, theta, sigma, chunk, *a, **k):  # the search's cell moments only
        kappa, m4, lam = real(grid, theta, sigma, chunk, *a, **k)
        return (0.8 * kappa if grid.rounding != "nearest" else kappa), m4, lam

    monkeypatch.setattr(planning, "_grid_moments", hqq_kappa_low)
    model, tr, va, est, _ = setup
    res = plan(model, ["rtn_int4", "intx_weight_only_int4_hqq"], tr, loss, val_dataloader=va, estimate=est,
               weight_decay=WD, uncertainty_draws=0, reassess=1)
    gaps = {k: u.reassessed("loss")["leakage"] / u.leakage - 1 for k, u in res.uniform.items()}
    named = {k for k in gaps if any(w.startswith(f"candidate {k!r}") for w in res.warnings)}
    assert named == {k for k, g in gaps.items() if abs(g) > 0.02}
    assert abs(gaps["rtn_int4"]) <= 0.02 and gaps["intx_weight_only_int4_hqq"] > 0.02, gaps
    (w,) = [w for w in res.warnings if w.startswith("candidate 'intx_weight_only_int4_hqq'")]
    assert "not nearest" in w and f"{100 * (1 / (1 + gaps['intx_weight_only_int4_hqq']) - 1):+.1f}%" in w


def test_utility_that_does_not_add_up_is_named(setup):
    """The predicted utility adds the per-layer changes measured one layer at a time; where the
    real copy's measured utility misses it by more than ADDITIVITY_TOLERANCE of the float
    model's (int2 everywhere here: 0.0133 predicted, 0.0142 measured against 0.0047, 20% of it,
    where this was written; the float32 kernels of other machines fit other weights), the rows
    are named in the warnings; rows within it (int8) are not."""
    from mis_lightning.planning import ADDITIVITY_TOLERANCE

    model, tr, va, est, _ = setup
    res = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, weight_decay=WD, uncertainty_draws=0,
               reassess=2)
    off = {r["name"] for r in res.rows()
           if abs(r["utility"] - r["predicted_utility"]) > ADDITIVITY_TOLERANCE * abs(res.float_utility)}
    (w,) = [w for w in res.warnings if w.startswith("the predicted loss")]
    assert "rtn_int2" in off and "rtn_int8" not in off
    assert {r["name"] for r in res.rows() if f"{r['name']} (predicted" in w} == off


def test_chosen_plan_that_misses_its_budget_once_reassessed_gives_way(setup, monkeypatch):
    """The search chooses on the proxy; when the chosen plan's re-assessed release misses the
    budget (the CLI's ChEMBL plan read utility loss 0.028 against max_utility_loss 0.02 and was
    still reported "within the budget"), the best re-assessed plan that meets it is chosen
    instead, and said; when none does, the result says it is outside the budget."""
    _ranked_headline(monkeypatch)
    from mis_lightning import planning

    model, tr, va, est, _ = setup
    kw = dict(val_dataloader=va, estimate=est, weight_decay=WD, uncertainty_draws=0, reassess=3, method="clt")
    # the search's own choice (the final one can differ: a re-assessed runner-up tied on leakage
    # with a lower measured loss replaces it on some machines' fixture)
    first = _search_choice(plan(model, CANDS, tr, loss, max_utility_loss=0.5, **kw)).choices
    real = planning.PlanPoint.reassessed

    def worse_for_choice(self, metric):  # the search's own choice reads a large loss
        r = real(self, metric)
        if r is not None and self.choices == first:
            r = {**r, "utility": 10.0 * r["utility"]}
        return r

    monkeypatch.setattr(planning.PlanPoint, "reassessed", worse_for_choice)
    res = plan(model, CANDS, tr, loss, max_utility_loss=0.5, **kw)
    assert res.chosen.choices != first and res.within_budget
    assert any("misses the budget once re-assessed" in w and f"chosen instead: {res.chosen.name!r}" in w
               for w in res.warnings)
    ok = []
    for p in [*res.uniform.values(), *(q for q in res.frontier if q.result is not None and q.choices != first)]:
        r = p.reassessed("loss")
        if (r["utility"] - res.float_utility) / res.float_utility <= 0.5:
            ok.append(r["leakage"])
    assert min(ok) <= res.leakage <= min(ok) * (1 + planning.LEAKAGE_TIE)
    assert res.scheme.describe()["assignment"] == res.chosen.choices or res.chosen.name in res.uniform
    # the release is named as its report row (a fallback's "plan" row is the rejected plan's: fu19 W10)
    assert res.scheme.name == res.chosen.name and res.report.schemes[res.scheme.name].leakage == res.leakage
    assert "within the budget" in res.table()
    # ux31 (fu30): the tables mark the release and the rejected search choice; a user scanning the
    # report's table took the row "plan" (the rejected plan) for the recommendation
    rejected = _search_choice(res).name
    def over(p):
        return (p.reassessed("loss")["utility"] - res.float_utility) / res.float_utility > 0.5

    assert over(_search_choice(res))
    # nux54: which budget it misses is named (here the utility; the size budget is not set)
    assert res.report.row_notes == {res.chosen.name: "chosen", **{
        p.name: "over budget: utility" if over(p) else "not chosen"
        for p in res.frontier if p.result is not None and p.name not in res.uniform and p is not res.chosen},
        **{k: "over budget: utility" for k, p in res.uniform.items() if p is not res.chosen and over(p)}}
    rows = {ln.split("  ")[0]: ln for ln in res.report.table(with_verdict=False).splitlines()}
    assert f"{res.chosen.name} (chosen)" in rows and f"{rejected} (over budget: utility)" in rows
    assert "(over budget): misses the planner's budget named after it" in " ".join(res.report.table(with_verdict=False).split())  # the legend says what it means
    assert f"| {rejected} (over budget: utility) |" in res.table()


def test_size_budget_no_plan_can_meet_fails_before_the_estimation_pass(setup, monkeypatch, tmp_path):
    """Bits per weight depend on shapes and schemes only: ``max_bits`` below every plan's is
    refused before the estimation pass (plan) and before training (the callback), with the
    same fewest-bits figure the search would give."""
    from mis_lightning import planning
    from mis_lightning.planning import PlanInfeasibleError, check_size_budget

    model, tr, va, est, _ = setup
    with pytest.raises(PlanInfeasibleError) as late:
        plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, max_bits=1.0, weight_decay=WD,
             uncertainty_draws=0)
    with pytest.raises(PlanInfeasibleError) as early:
        check_size_budget(model, PlanConfig(candidates=CANDS, max_bits=1.0))
    fewest = lambda e: float(str(e.value).split("fewest reachable bits per weight ")[1].split()[0].rstrip(";"))  # noqa: E731
    assert fewest(early) == pytest.approx(fewest(late), rel=1e-3)

    def no_estimation(*a, **k):
        raise AssertionError("estimated before refusing the budget")

    monkeypatch.setattr(planning, "run_estimation", no_estimation)
    with pytest.raises(PlanInfeasibleError, match="max_bits=1.0 is below the fewest reachable bits per weight"):
        plan(model, CANDS, tr, loss, val_dataloader=va, max_bits=1.0, weight_decay=WD)
    check_size_budget(model, PlanConfig(candidates=CANDS, max_bits=32.0))  # reachable: no error


class _Counted(nn.Module):
    """Counts its forward calls in an attribute (user code often keeps such state)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_plan_never_runs_the_callers_model(setup):
    """The float model's utility was measured on the caller's model itself (a forward that
    counts calls or keeps its output changed it); now on a private copy."""
    model, tr, va, _, _ = setup
    counted = _Counted(model)
    plan(counted, CANDS, tr, loss, val_dataloader=va, max_utility_loss=0.05, weight_decay=WD,
         uncertainty_draws=0, reassess=1)
    assert counted.calls == 0


def test_the_utility_metrics_direction_is_known_or_refused(setup):
    """fu19 W2: the direction was guessed from substrings of the name: "cross_entropy" (lower is
    better) was planned as higher-is-better, int2 everywhere (+536% against a 5% budget,
    reported within it); "neg_mse" the other way. Known names, the metric object, the explicit
    option, or an error before the estimation pass."""
    from mis_lightning.planning import lower_is_better

    model, tr, va, est, (Xv, Yv) = setup
    assert lower_is_better("cross_entropy") and lower_is_better("val_mape") and lower_is_better("loss")
    assert not lower_is_better("auroc") and not lower_is_better("test_r2")
    assert not lower_is_better("neg_mse", higher_is_better=True)
    with pytest.raises(ValueError, match=r"utility_metric 'neg_mse': its direction is unknown.*higher_is_better"):
        lower_is_better("neg_mse")

    def utility(m):
        with torch.no_grad():
            return {"cross_entropy": float(loss(m(Xv), Yv).mean())}  # a loss under another name

    res = plan(model, CANDS, tr, loss, utility_fn=utility, estimate=est, max_utility_loss=0.05,
               weight_decay=WD, uncertainty_draws=0, config=PlanConfig(utility_metric="cross_entropy"))
    assert res.lower_is_better
    assert "the report's table shows" not in res.table()  # the report shows cross_entropy too
    assert res.utility <= 1.05 * res.float_utility + 1e-12 and res.within_budget
    with pytest.raises(ValueError, match=r"'score': its direction is unknown"):
        plan(model, CANDS, tr, loss, utility_fn=lambda m: {"score": 1.0}, estimate=est, weight_decay=WD,
             config=PlanConfig(utility_metric="score"))
    # whole numbers only: reassess=2.5 failed after the candidates' evaluations (fu19 E6)
    with pytest.raises(ValueError, match=r"PlanConfig.reassess must be a whole number >= 1, got 2.5"):
        PlanConfig(reassess=2.5)
    assert PlanConfig(reassess=3.0).reassess == 3


def _callback_fit(tmp_path, cb, val=True, **trainer_kw):
    import pytorch_lightning as pl

    class Reg(pl.LightningModule):
        weight_decay = WD

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x):
            return self.net(x)

        def per_sample_loss(self, o, t):
            return loss(o, t)

        def training_step(self, b, i):
            return loss(self(b[0]), b[1]).mean()

        def validation_step(self, b, i):
            self.log("val_loss", loss(self(b[0]), b[1]).mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=2e-2)

    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 6, generator=g)
    Y = 3 + X[:, 0] - 0.5 * X[:, 1] + 0.1 * torch.randn(400, generator=g)
    tr = DataLoader(TensorDataset(X[:300], Y[:300]), batch_size=100)
    va = DataLoader(TensorDataset(X[300:], Y[300:]), batch_size=100)
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         **trainer_kw)
    trainer.fit(Reg(), tr, va if val else None)
    return trainer


def test_callback_plan_reads_the_metrics_direction_and_plans_with_every_n_val_epochs(tmp_path):
    """fu19 W1: MISCallback(plan=...) did not give the planner its utility metrics, so MAPE
    (torchmetrics: higher_is_better False) was planned by its name as higher-is-better: int2,
    +124% against a 5% budget, within_budget True. W4: with every_n_val_epochs the end of fit
    returned early and never planned."""
    from torchmetrics.regression import MeanAbsolutePercentageError

    from mis_lightning import MISCallback

    cb = MISCallback(["rtn_int8"], dirpath=tmp_path, num_records=32, uncertainty_draws=0, method="clt",
                     every_n_val_epochs=1, utility_metrics={"mape": MeanAbsolutePercentageError()},
                     output_transform=lambda o, t: (o[:, 0], t),
                     plan={"candidates": ["rtn_int8", "rtn_int2"], "reassess": 1, "utility_metric": "mape",
                           "max_utility_loss": 0.05})
    _callback_fit(tmp_path, cb)
    res = cb.plan_result
    assert cb.last_error is None and res is not None and (tmp_path / "mis_plan.json").is_file()
    assert res.lower_is_better and res.within_budget
    assert res.utility <= 1.05 * res.float_utility


def test_a_failed_plan_keeps_the_callbacks_report_and_plan_mistakes_fail_before_training(tmp_path):
    """fu19 W3: a plan that failed (no plan meets the budget) discarded the successful
    assessment (report None, mis_report.json only the error); E2: a utility_metric the callback
    does not measure, or no validation data, failed at the end of fit."""
    import json

    from mis_lightning import MISCallback

    cb = MISCallback(["rtn_int8"], dirpath=tmp_path, num_records=32, uncertainty_draws=0, method="clt",
                     plan={"candidates": ["rtn_int8", "rtn_int2"], "reassess": 1, "target_mis": 0.99999})
    (tmp_path / "mis_plan.png").write_bytes(b"an earlier fit's frontier")  # not left beside the error
    with pytest.warns(UserWarning, match=r"planning failed \(PlanInfeasibleError: .*the assessment's report is kept"):
        _callback_fit(tmp_path, cb)
    assert cb.report is not None and cb.last_error is None and cb.plan_result is None
    assert "rtn_int8" in json.loads((tmp_path / "mis_report.json").read_text())["schemes"]
    assert json.loads((tmp_path / "mis_plan.json").read_text())["error"].startswith("PlanInfeasibleError")
    assert cb.plan_error.startswith("PlanInfeasibleError") and not (tmp_path / "mis_plan.png").exists()
    assert "target_mis=0.99999 is above the highest reachable MIS" in (tmp_path / "mis_plan.md").read_text()
    with pytest.raises(ValueError, match=r"utility_metric 'rmse' is not measured: the callback measures \['loss'\]"):
        MISCallback(["rtn_int8"], plan={"utility_metric": "rmse"})
    steps = []
    cb = MISCallback(["rtn_int8"], dirpath=tmp_path, plan={"candidates": ["rtn_int8"]})
    with pytest.raises(ValueError, match=r"MISCallback\(plan=\.\.\.\) needs validation data"):
        _callback_fit(tmp_path, cb, val=False)
    cb = MISCallback(["rtn_int8"], dirpath=tmp_path, plan={"candidates": ["rtn_int8"]})
    with pytest.raises(ValueError, match=r"needs validation data"):
        _callback_fit(tmp_path, cb, limit_val_batches=0)
    assert not steps


#: the near-budget tests' utility by construction (_table_utility; float model 1.0, budget 0.01):
#: int4 (or int2) on any one layer costs more than the budget, so int8 on every layer is the only
#: plan predicted within it (the search's choice, whatever the leakages); the plan int4, int8,
#: int4 is predicted at +2.3%; uniform int4 misses its prediction (6.3%) by +4.2%, which sets the
#: margin's factor (0.667: the plan's margin 1.53%, its predicted loss minus margin 0.77%)
NEAR_COSTS = {"0.weight": {"rtn_int8": 0.0, "rtn_int4": 0.012, "rtn_int2": 2.0},
              "2.weight": {"rtn_int8": 0.0, "rtn_int4": 0.04, "rtn_int2": 3.0},
              "4.weight": {"rtn_int8": 0.0, "rtn_int4": 0.011, "rtn_int2": 0.05}}
NEAR_PLAN = ("rtn_int4", "rtn_int8", "rtn_int4")
UNIFORM_INT4 = ("rtn_int4",) * 3


def test_plan_predicted_over_the_budget_by_less_than_its_error_is_reassessed(setup, monkeypatch):
    """vf19's brute force (this fixture's model, on the machine of the time): at
    max_utility_loss=0.01 the additive prediction put int4|int8|int4 at +1.34% (over the
    budget), while its real copy measured +0.64% (the layers' errors partly cancel) and leaked
    least of every plan within the budget (0.1136 vs 0.1268 for int8 everywhere, which was
    chosen: the plan was never re-assessed). Plans predicted over the budget by less than the
    prediction's own error are now measured, and one measured within it is re-assessed and can
    be chosen; one measured over it never is (next test).

    Those losses differ by 1e-5 on a loss of 0.005 and move with the fitted weights, i.e. with
    the machine's float32 kernels (an AVX512-FP16 Xeon: +1.03% predicted, +0.84% measured), so
    the utility is set by construction (NEAR_COSTS: the plan predicted at +2.3%, measured at
    +0.64%, int8 everywhere the only plan predicted within the budget); the leakages are the
    fixture's own (int4 instead of int8 on layers 0 and 4: 13% less).

    pl47: the interaction search (``planning.INTERACTION_SEARCH``) measures the plan before this
    step (its interaction bound, 0.023, leaves it within the budget) and chooses it; the
    near-budget step, the backstop for plans that search leaves out, is tested without it."""
    from mis_lightning import planning

    model, tr, va, est, _ = setup
    utility = _table_utility(model, NEAR_COSTS, {NEAR_PLAN: -0.0166, UNIFORM_INT4: 0.042})
    kw = dict(utility_fn=utility, estimate=est, weight_decay=WD, uncertainty_draws=0, max_utility_loss=0.01)
    found = plan(model, CANDS, tr, loss, **kw)
    assert tuple(found.chosen.choices.values()) == NEAR_PLAN and found.within_budget
    assert [s["choices"] for s in found.near_budget["searched"] if s["lead"]] == [found.chosen.choices]
    assert not any(c["reassessed"] for c in found.near_budget["checked"])  # nothing left for that step
    monkeypatch.setattr(planning, "INTERACTION_SEARCH", False)
    res = plan(model, CANDS, tr, loss, **kw)
    assert res.leakage == found.leakage
    assert tuple(res.chosen.choices.values()) == NEAR_PLAN
    assert res.chosen.utility_loss == pytest.approx(0.023) and res.chosen.utility_loss > 0.01  # predicted over ...
    ul = (res.utility - res.float_utility) / res.float_utility
    assert ul == pytest.approx(0.0064) and ul <= 0.01 and res.within_budget  # ... measured within it
    assert res.report.schemes[res.scheme.name].leakage == res.leakage == res.chosen.result.leakage
    # below every other re-assessed plan within the budget, uniform int8 included
    for p in [*res.uniform.values(), *(q for q in res.frontier if q.result is not None)]:
        r = p.reassessed("loss")
        if (r["utility"] - res.float_utility) / res.float_utility <= 0.01 and p is not res.chosen:
            assert res.leakage < r["leakage"]
    near = res.near_budget
    assert near["factor"] == pytest.approx(0.042 / 0.063) and near["checked"]
    (c,) = [c for c in near["checked"] if c["reassessed"]]
    assert c["name"] == res.chosen.name and c["predicted_utility_loss"] > 0.01
    assert c["predicted_utility_loss"] - c["margin"] <= 0.01 and c["measured_utility_loss"] == pytest.approx(ul)
    assert any(f"chosen instead: {res.chosen.name!r} (predicted over max_utility_loss, measured within it)" in w
               for w in res.warnings)
    assert res.to_dict()["near_budget"]["checked"][0]["choices"] == near["checked"][0]["choices"]
    assert "near the budget" in res.table()
    # reassess_near_budget=0: the old behaviour (int8 on every layer, nothing measured)
    old = plan(model, CANDS, tr, loss, reassess_near_budget=0, **kw)
    assert old.chosen.name == "rtn_int8" and old.near_budget["checked"] == []
    assert old.leakage > res.leakage  # 0.1234 against 0.1069 where this was written


def test_near_budget_plan_measured_over_the_budget_is_never_chosen(setup):
    """A plan predicted just over the budget whose measured utility is over it too is measured,
    not re-assessed, and not chosen: the choice stays within the budget as measured (the
    utility by construction, as above, with int4|int8|int4 measured at +1.3%)."""
    model, tr, va, est, _ = setup
    utility = _table_utility(model, NEAR_COSTS, {NEAR_PLAN: -0.010, UNIFORM_INT4: 0.042})
    res = plan(model, CANDS, tr, loss, utility_fn=utility, estimate=est, weight_decay=WD, uncertainty_draws=0,
               max_utility_loss=0.01)
    checked = res.near_budget["checked"]
    assert any(tuple(c["choices"].values()) == NEAR_PLAN and not c["reassessed"]
               and c["measured_utility_loss"] == pytest.approx(0.013) for c in checked)
    assert all(not c["reassessed"] and c["measured_utility_loss"] > 0.01 for c in checked)
    assert (res.utility - res.float_utility) / res.float_utility <= 0.01 and res.within_budget
    assert res.chosen.name == "rtn_int8"  # the only plan predicted within the budget
    assert not any("measured within it" in w for w in res.warnings)
    assert not any(p.result is not None and p.name not in res.uniform and p.utility_loss > 0.01
                   for p in res.frontier)  # no near-budget plan re-assessed
    with pytest.raises(ValueError, match=r"reassess_near_budget must be a whole number >= 0, got -1"):
        PlanConfig(reassess_near_budget=-1)
    assert PlanConfig(reassess_near_budget=0.0).reassess_near_budget == 0


def test_a_choice_measured_over_the_budget_gives_way_before_reassessment(setup):
    """pl44's brute force: the additive prediction missed interacting layers' utility by up to
    100% of the float loss; the search's choice (and runner-up) re-assessed over the budget left the
    release to a uniform candidate up to 19% leakier than the best plan within it. The plans
    predicted within the budget are now measured first: the search's choice (a mixed plan, here
    int4|int8|int8, predicted and measured +1.2% without an interaction; +5.2% measured with one
    built against a 3% budget) is passed over, never re-assessed, and the next plan by the
    objective, measured within, is chosen (with reassess=1 the old code fell back to int8
    everywhere). Utilities by construction, as above."""
    model, tr, va, est, _ = setup
    kw = dict(estimate=est, weight_decay=WD, uncertainty_draws=0, max_utility_loss=0.03, reassess=1,
              reassess_near_budget=0)
    first = plan(model, CANDS, tr, loss, utility_fn=_table_utility(model, NEAR_COSTS), **kw).chosen
    assert first.name not in ("rtn_int8", "rtn_int4", "rtn_int2")  # a mixed plan within the budget
    key = tuple(first.choices.values())
    res = plan(model, CANDS, tr, loss, utility_fn=_table_utility(model, NEAR_COSTS, {key: 0.04}), **kw)
    assert not any(p.result is not None and p.choices == first.choices
                   for p in [*res.frontier, *res.uniform.values()])  # never re-assessed
    assert res.chosen.name not in res.uniform and res.within_budget
    (over,) = res.near_budget["measured_over"]
    assert over["choices"] == first.choices
    assert over["measured_utility_loss"] == pytest.approx(first.utility_loss + 0.04)
    assert (res.utility - res.float_utility) / res.float_utility <= 0.03
    assert res.leakage < res.uniform["rtn_int8"].result.leakage
    assert "measured over max_utility_loss before re-assessment" in res.table()


def test_the_pipeline_form_scores_every_plan_when_they_fit_its_budget(setup, monkeypatch):
    """pl44's brute force: the correlated form ranked int2|int2|int8 (0.0990) below int2|int2|int3
    (0.1000) while the independent form put it above, off its frontier: it was never scored by the
    pipeline's form and a plan 1% leakier was chosen. The stage's budget (MAX_EXACT plans) is now
    filled with the next plans by the independent form: here all 27 plans are scored by it (the
    old code scored the independent form's frontier and the uniform plans only)."""
    from mis_lightning import planning

    model, tr, va, est, _ = setup
    scored = set()
    real = planning._Proxy.__call__

    def spy(self, choice, draw_fraction=1.0):
        scored.add(tuple(choice))
        return real(self, choice, draw_fraction)

    monkeypatch.setattr(planning._Proxy, "__call__", spy)
    res = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, weight_decay=WD, uncertainty_draws=0,
               reassess=1, max_bits=12.0)
    # the fixture's scoring has the correlated form (else this stage would not run at all)
    assert planning._Proxy(est, [{}], [], planning.ScoringConfig()).pipeline_form
    assert len(scored) == 3 ** 3 <= planning.MAX_EXACT
    assert res.within_budget


def test_plan_table_says_which_utility_the_budget_reads_when_the_report_shows_another(setup):
    """fu25: the app's planner run printed the MIS table with rmse and the plan table and budget
    with loss (rmse^2 / 2), saying nothing; the plan table names the budget's metric then."""
    model, tr, va, est, (Xv, Yv) = setup

    def utility(m):
        with torch.no_grad():
            v = float(loss(m(Xv), Yv).mean())
            return {"loss": v, "rmse": (2 * v) ** 0.5}

    res = plan(model, ["rtn_int8", "rtn_int4"], tr, loss, utility_fn=utility, estimate=est, max_utility_loss=0.05,
               weight_decay=WD, uncertainty_draws=0)
    assert ("loss here is the mean per-sample loss, the utility the budget applies to "
            "(PlanConfig.utility_metric); the report's table shows rmse instead") in res.table()


def test_a_plan_swap_or_choice_inside_the_intervals_is_said_to_be_no_ranking(setup, monkeypatch):
    """fu27/fu28 (ux29): the search's choice 'plan' (leakage 0.1132 [0.1052, 0.1213], loss 0.005071)
    gave way to rtn_int4 (0.1119 [0.1036, 0.1216], loss 0.005164) with "is beaten once re-assessed"
    and the chosen line said "the least leakage": a difference inside both 80% intervals, and the
    plan it replaced has the better loss. The warning and the plan's table now say that the two are
    not ranked beyond their intervals (since pl48 such leakages tie and the utility decides the choice).
    Without the interaction search (pl47), which measures the plan the swap gives first: the
    fixture's swap is the additive search's."""
    _ranked_headline(monkeypatch)
    from mis_lightning import planning
    from mis_lightning.report import NOT_RANKED, _unresolved

    monkeypatch.setattr(planning, "INTERACTION_SEARCH", False)
    model, tr, va, est, _ = setup
    # the budget at which the search's choice gives way to a tied plan depends on the float32 L-BFGS
    # fit's last digits, which differ between CPUs (an AMD EPYC machine swaps at 0.06, not 0.05): the
    # first of these budgets that gives a swap is the case; none giving one fails the test
    for budget in (0.05, 0.06, 0.065):
        res = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, max_utility_loss=budget,
                   weight_decay=WD, reassess=3)
        swap = [w for w in res.warnings if w.startswith("the search's choice '")]
        if swap:
            break
    assert len(swap) == 1, res.warnings  # this fixture's figures give one swap (the case above)
    old = _search_choice(res).reassessed("loss")
    new = res.chosen.reassessed("loss")

    def row(r):
        return {"leakage": r["leakage"], "leakage_p10": r["interval"][0], "leakage_p90": r["interval"][1]}

    # the swap's point leakages may go either way (a tie: the utility decided); inside both intervals
    assert _unresolved(row(old), row(new)) and old["leakage"] != new["leakage"]
    assert f"The two are {NOT_RANKED}" in swap[0] and "is beaten" not in swap[0]
    # which of the two has the better loss is the fixture's (it changed with cf45's correlated
    # form); the statement that the replaced plan is as safe is the point
    assert f"{_search_choice(res).name!r} is as safe within the figures' uncertainty" in swap[0]
    # the chosen plan's own line names every re-assessed plan within the budget it is not ranked against
    assert _search_choice(res).name in res.not_ranked_against
    for k in res.not_ranked_against:
        r = next(x for x in res.rows() if x["name"] == k)
        assert _unresolved(row(new), row(r))
    line = next(ln for ln in res.table().splitlines() if ln.startswith(f"{NOT_RANKED}: {res.chosen.name} and "))
    assert all(f"{k} (leakage" in line for k in res.not_ranked_against)
    assert res.to_dict()["not_ranked_against"] == res.not_ranked_against


def test_the_planner_s_warnings_quote_re_assessed_leakages_with_their_marks(setup, monkeypatch):
    """The swap warning quoted the two plans' re-assessed leakages bare while the plan's table and the
    report marked them '*' (ux57 left (b), nu58): a figure read apart from its mark. A fit marked
    outside the assumptions (here: "not trained in this fit", set on the estimate) and a search's
    choice that reads 10x its leakage once re-assessed (beaten): each figure the warning quotes
    carries its row's marks, as the table's."""
    import dataclasses
    import re

    _ranked_headline(monkeypatch)
    from mis_lightning import planning

    model, tr, va, est, _ = setup
    marked = dataclasses.replace(est, diagnostics={**est.diagnostics, "not_trained": True})
    kw = dict(val_dataloader=va, estimate=marked, weight_decay=WD, reassess=3, max_utility_loss=0.5,
              reassess_near_budget=0)
    first = _search_choice(plan(model, CANDS, tr, loss, **kw)).choices
    real = planning.PlanPoint.reassessed

    def beaten(self, metric):  # the search's own choice reads 10x its leakage (and interval) once re-assessed
        r = real(self, metric)
        if r is not None and self.choices == first:
            r = {**r, "leakage": 10 * r["leakage"], "interval": tuple(10 * x for x in r["interval"])}
        return r

    monkeypatch.setattr(planning.PlanPoint, "reassessed", beaten)
    res = plan(model, CANDS, tr, loss, **kw)
    (swap,) = [w for w in res.warnings if w.startswith("the search's choice '")]
    assert "is beaten once re-assessed" in swap
    number = r"[0-9.]+(?:e-?[0-9]+)?"
    assert re.search(rf"\(leakage {number} \* \[{number}, {number}\] vs {number} \* \[", swap), swap
    assert all(r.get("indicative") for r in res.report.rows() if not r.get("error"))  # the premise: all marked


def test_a_frozen_layer_is_planned_as_the_release_quantizes_it(setup):
    """pl44: every scheme quantizes the whole model in its scored copy (fz44), a frozen layer
    too; the plans left it in float (a uniform choice's row quantized it while ``res.scheme``,
    the release to apply, did not: the reported utility and size were not those of the model
    shipped). Now each plan assigns the frozen layer a candidate (its size and utility count, not
    its leakage), ``res.scheme`` applied gives the reported utility exactly, and ``bits_per_weight``
    / ``max_bits`` are the whole model's (the report's model b/w)."""
    import copy

    from mis_lightning.planning import PlanInfeasibleError, check_size_budget

    model0, tr, va, _, _ = setup
    model = copy.deepcopy(model0)
    model[0].requires_grad_(False)  # a frozen first layer (72 of the 176 weights)
    est = run_estimation(model, tr, loss, EstimationConfig(weight_decay=WD))
    assert "0.weight" not in est.names
    res = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, max_utility_loss=0.05,
               weight_decay=WD, uncertainty_draws=0, reassess=1, method="clt")
    assert res.scheme.scheme_for("0.weight") is not None and "0.weight" in res.chosen.choices
    shipped = res.scheme.apply(model)
    assert "0.weight" in shipped.grids
    with torch.no_grad():
        per = torch.cat([loss(shipped.model(x), y) for x, y in va])
    assert res.utility == pytest.approx(float(per.mean()), rel=1e-6)  # the model shipped
    whole = sum(p.numel() * (shipped.grids[k].bits_per_weight if k in shipped.grids else 32)
                for k, p in model.named_parameters()) / sum(p.numel() for p in model.parameters())
    assert res.bits_per_weight == pytest.approx(whole, rel=1e-9)
    for row in res.rows():  # every row's size is the whole model's, as the report's model b/w
        assert row["bits_per_weight"] == pytest.approx(res.report.schemes[row["name"]].model_bits_per_weight, rel=1e-9)
    # max_bits reads the whole model: int2 everywhere (the fewest bits of these candidates) is the
    # whole model's least size, above the assessed weights' least here (the frozen layer's 12
    # per-row scales over 6 inputs): a budget between the two is refused before
    # the estimation pass (the assessed weights alone would meet it), one above both is met
    g2 = get_scheme("rtn_int2").apply(model).grids
    size = lambda names: sum(p.numel() * (g2[k].bits_per_weight if k in g2 else 32)  # noqa: E731
                             for k, p in model.named_parameters() if k in names) / sum(
        p.numel() for k, p in model.named_parameters() if k in names)
    fewest_whole, fewest_assessed = size(dict(model.named_parameters())), size(est.names)
    assert fewest_whole > fewest_assessed + 0.5  # 5.82 against 4.77
    check_size_budget(model, PlanConfig(candidates=CANDS, max_bits=fewest_whole + 0.1))  # reachable
    with pytest.raises(PlanInfeasibleError, match="of the whole model"):
        check_size_budget(model, PlanConfig(candidates=CANDS, max_bits=(fewest_whole + fewest_assessed) / 2))


def test_a_plan_the_additive_prediction_puts_far_over_the_budget_is_measured_and_chosen(setup, monkeypatch):
    """pl47: the brute force (docs/benchmarks.md "pl46"/"pl47") found the best plan within
    max_utility_loss=0.307 predicted at +65% (measured +28%: the layers' errors cancel), beyond the
    near-budget margin, so the additive search chose a plan 8.95% leakier. Here int4|int4|int2 is
    predicted at +10.2% against a 3% budget and measures +2.2% (an interaction of -0.08 set by
    construction; every other plan adds up, so the near-budget margin is 0): the interaction search
    measures it (its bound 0.18 leaves it possible) and chooses it; without the search the choice
    is a leakier plan predicted within the budget. The plans measured are bounded
    (INTERACTION_CHECKS x groups x candidates) and the chosen plan's utility is the measured one."""
    from mis_lightning import planning

    model, tr, va, est, _ = setup
    far = ("rtn_int4", "rtn_int4", "rtn_int2")
    table = _table_utility(model, NEAR_COSTS, {far: -0.08})
    calls = []

    def utility(m):
        calls.append(1)
        return table(m)

    kw = dict(utility_fn=utility, estimate=est, weight_decay=WD, uncertainty_draws=0, max_utility_loss=0.03)
    res = plan(model, CANDS, tr, loss, **kw)
    assert tuple(res.chosen.choices.values()) == far and res.within_budget
    assert res.chosen.utility_loss == pytest.approx(0.102)  # predicted far over the budget ...
    ul = (res.utility - res.float_utility) / res.float_utility
    assert ul == pytest.approx(0.022) and ul <= 0.03  # ... measured within it: the reported utility
    searched = res.near_budget["searched"]
    (lead,) = [s for s in searched if s["lead"]]
    assert lead["choices"] == res.chosen.choices and lead["bound"] > 0.102 - 0.03
    # every plan the search measured before it leaks less and measured over the budget
    assert all(s["measured_utility_loss"] > 0.03 for s in searched[: searched.index(lead)])
    n_search = len(calls)
    monkeypatch.setattr(planning, "INTERACTION_SEARCH", False)
    calls.clear()
    old = plan(model, CANDS, tr, loss, **kw)
    assert tuple(old.chosen.choices.values()) != far and old.within_budget
    assert old.leakage > res.leakage * (1 + planning.LEAKAGE_TIE)  # the additive choice is leakier
    extra = n_search - len(calls)  # the search's cost: validation passes, bounded
    assert 0 < extra <= planning.INTERACTION_CHECKS * 3 * len(CANDS)
    assert "measured beyond the additive prediction" in res.table()


def test_no_plan_predicted_within_the_budget_but_one_measured_within_is_chosen(setup, monkeypatch):
    """pl47: where every plan's additive prediction is over max_utility_loss, the plans the
    interaction bound leaves within it are measured before PlanInfeasibleError: one measured
    within is chosen (with its measured utility); none within: the error, saying how many were
    measured. Utilities by construction: every candidate costs at least 0.01 on the first layer
    (the budget is 0.5%), int4|int4|int4 interacts by -0.03."""
    from mis_lightning import planning
    from mis_lightning.planning import PlanInfeasibleError

    model, tr, va, est, _ = setup
    costs = {n: {c: v + (0.01 if n == "0.weight" else 0.0) for c, v in NEAR_COSTS[n].items()} for n in NEAR_COSTS}
    kw = dict(estimate=est, weight_decay=WD, uncertainty_draws=0, max_utility_loss=0.005)
    res = plan(model, CANDS, tr, loss, utility_fn=_table_utility(model, costs, {UNIFORM_INT4: -0.07}), **kw)
    assert tuple(res.chosen.choices.values()) == UNIFORM_INT4 and res.within_budget
    assert res.chosen.utility_loss > 0.005 >= (res.utility - res.float_utility) / res.float_utility
    with pytest.raises(PlanInfeasibleError, match=r"plans predicted over max_utility_loss but within it by their "
                                                  r"interaction bound were measured: none is"):
        plan(model, CANDS, tr, loss, utility_fn=_table_utility(model, costs), **kw)
    monkeypatch.setattr(planning, "INTERACTION_SEARCH", False)
    with pytest.raises(PlanInfeasibleError, match="is below the least reachable utility loss"):
        plan(model, CANDS, tr, loss, utility_fn=_table_utility(model, costs, {UNIFORM_INT4: -0.07}), **kw)


def test_plans_not_ranked_by_leakage_are_chosen_among_by_the_utility(setup, monkeypatch):
    """pl48 (nux48): the planner chose 'plan' (leakage 0.0886 [0.0797, 0.0948], rmse 0.6752, loss
    +4.8%) over 'plan_1' (0.0888, the same interval, the float model's loss): 0.2% apart, beyond
    LEAKAGE_TIE (0.1%) but inside both 80% intervals, where its own table says the two are "not
    ranked beyond their intervals". Leakages each inside the other's interval now tie like those
    within LEAKAGE_TIE: the least measured utility loss, then the fewest bits decide. Here every
    re-assessed plan is given one wide interval (all tied): the choice is the brute force's least
    utility loss among the plans within the budget, not the least point leakage."""
    _ranked_headline(monkeypatch)
    from mis_lightning import planning
    from mis_lightning.report import NOT_RANKED

    model, tr, va, est, _ = setup
    real = planning.PlanPoint.reassessed

    def wide(self, metric):  # the real figures, every interval [0, 1]: each leakage inside the others'
        r = real(self, metric)
        return None if r is None else {**r, "interval": (0.0, 1.0)}

    monkeypatch.setattr(planning.PlanPoint, "reassessed", wide)
    budget = 0.5
    res = plan(model, CANDS, tr, loss, val_dataloader=va, estimate=est, max_utility_loss=budget,
               weight_decay=WD, uncertainty_draws=0, reassess=3, method="clt")
    ok = []
    for p in [*res.uniform.values(), *(q for q in res.frontier if q.result is not None)]:
        r = p.reassessed("loss")
        ul = (r["utility"] - res.float_utility) / res.float_utility
        if ul <= budget:
            ok.append((ul, r["bits_per_weight"], r["leakage"], p.name))
    least_leak = min(ok, key=lambda t: t[2])
    want = min(ok, key=lambda t: t[:3])
    assert want[3] != least_leak[3] and want[2] > least_leak[2] * (1 + planning.LEAKAGE_TIE), ok  # the case
    assert res.chosen.name == want[3], (res.chosen.name, ok)
    assert res.within_budget
    assert least_leak[3] in res.not_ranked_against
    assert f"{NOT_RANKED}: {res.chosen.name} and " in res.table()
    assert "then loss, then size decided" in res.table()
