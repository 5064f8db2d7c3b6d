"""A ``forward`` that returns more than the logits (``{"logits", "features"}``, ``(logits, h)``):
the outputs the loss does not read contribute nothing (mis_lightning/estimation/output_reads.py).

nux52 (session 52), findings 1 and 4: a 5-10-3 classifier returning its hidden features beside
the logits read every scheme's leakage 18-20% higher under the exact estimator (the leverages'
curvature projected onto the span of every output's Jacobian, the unread features' included;
max leverage 0.65 -> 2.27), and crashed the diagonal estimator (``'dict' object has no attribute
'numel'``). Each model here shares one trained network with its logits-only twin, so the figures
must agree to float rounding: the same float64 arithmetic on the same operands, only the output's
pytree differs (tolerance 1e-9 relative, far below the 1e-1 the bug moved them and the 1e-4 the
report prints).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _nets import fit_lbfgs_ce  # tests/_nets.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning import MISCallback, MISIndicator
from mis_lightning.estimation.output_reads import (
    OutputTree,
    flat_outputs,
    output_numel,
    sort_outputs,
    unflat_record,
)

SCHEMES = ["none", "int8_weight_only", "rtn_int4", "rtn_int2"]
SAME_DRAWS = dict(covariance="independent", mc_draws=1024)
KINDS = ("dict", "tuple", "list", "dict1", "tuple_detached")
REL = 1e-9


class _Outputs(nn.Module):
    """One network, its forward returning the logits as ``kind`` says (the loss reads the logits only)."""

    def __init__(self, body: nn.Module, head: nn.Module, kind: str) -> None:
        super().__init__()
        self.body, self.head, self.kind = body, head, kind

    def forward(self, x):
        h = self.body(x)
        logits = self.head(h)
        if self.kind == "dict":
            return {"logits": logits, "features": h}
        if self.kind == "tuple":
            return logits, h
        if self.kind == "list":
            return [h, logits, torch.tanh(h)]
        if self.kind == "dict1":
            return {"logits": logits}
        if self.kind == "tuple_detached":
            return logits, h.detach()
        if self.kind == "cat":  # one tensor [B, 3 + 10], the loss reading its first 3 columns (ux53)
            return torch.cat([logits, h], 1)
        return logits


def _logits(out):
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, list):
        return out[1]
    return out[0] if isinstance(out, tuple) else out


def _ce(out, y):
    return F.cross_entropy(_logits(out), y, reduction="none")


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = torch.distributions.Categorical(logits=2 * x @ torch.randn(5, 3, generator=g)).sample()
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(5, 10), nn.Tanh()), nn.Linear(10, 3)
    fit_lbfgs_ce(nn.Sequential(body, head).double(), x.double(), y, 1e-3, 3)
    body.float(), head.float()
    return body, head, DataLoader(TensorDataset(x, y), batch_size=100)


@pytest.fixture(scope="module")
def logits_only(trained):
    """``logits_only(estimation)``: the logits-only twin's ``assess`` report under that estimator,
    computed once for the file on first use (st59: the reference of both assess tests below,
    which computed it each). Read only: the tests compare their own model's report with it."""
    body, head, loader = trained
    reports = {}

    def report(estimation):
        if estimation not in reports:
            reports[estimation] = ml.assess(_Outputs(body, head, "tensor"), SCHEMES, loader, _ce, weight_decay=1e-3,
                                            estimation=estimation, uncertainty_draws=0, **SAME_DRAWS)
        return reports[estimation]

    return report


def _figures(rep, schemes=SCHEMES):
    """Each scheme's leakage and every leverage figure of the estimation and its diagnostics."""
    lev = {f"{part}.{k}": v for part, d in (("estimation", rep.estimation), ("diagnostics", rep.diagnostics))
           for k, v in d.items() if "leverage" in k and isinstance(v, (int, float))}
    return {**{s: rep.schemes[s].leakage for s in schemes}, **lev}


def _assert_same(rep, ref, what, schemes=SCHEMES):
    got, want = _figures(rep, schemes), _figures(ref, schemes)
    assert set(got) == set(want), what
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=REL, abs=1e-15), (what, k, got[k], v)
    assert rep.warnings == ref.warnings, what


@pytest.mark.parametrize("estimation", ["exact", "diagonal"])
def test_unread_outputs_leave_assess_figures_unchanged(trained, logits_only, estimation):
    """Every estimator's figures of a model returning features beside its logits (a dict, a tuple,
    a list with the logits in the middle, a detached leaf) equal the logits-only twin's. On main
    3de7ae7 the exact estimator read ``dict`` / ``tuple`` / ``list`` 18-20% higher (max leverage
    ~3x) and the diagonal one raised AttributeError for every kind."""
    body, head, loader = trained
    kw = dict(weight_decay=1e-3, estimation=estimation, uncertainty_draws=0, **SAME_DRAWS)
    ref = logits_only(estimation)  # the tensor twin: the same kw, loss _ce
    if estimation == "exact":
        assert ref.diagnostics["leverage_curvature"] == "exact" and ref.diagnostics["max_leverage"] > 0
    for kind in KINDS:
        _assert_same(ml.assess(_Outputs(body, head, kind), SCHEMES, loader, _ce, **kw), ref, (estimation, kind))


@pytest.mark.parametrize("estimation", ["exact", "diagonal"])
def test_unread_outputs_leave_metric_figures_unchanged(trained, estimation):
    """The torchmetrics path (:class:`MISIndicator`, the records fed batch by batch) on a tuple
    output equals its tensor twin (on main 3de7ae7: 18-20% high under exact, AttributeError under
    diagonal)."""
    body, head, loader = trained
    out = {}
    for kind in ("tensor", "tuple"):
        met = MISIndicator(_Outputs(body, head, kind), _ce, SCHEMES, estimation=estimation, weight_decay=1e-3,
                           num_records=400, uncertainty_draws=0, **SAME_DRAWS)
        for x, y in loader:
            met.update(x, y)
        out[kind] = met.compute()
    for s in SCHEMES:
        got, want = float(out["tuple"][s]["leakage"]), float(out["tensor"][s]["leakage"])
        assert got == pytest.approx(want, rel=REL), (estimation, s, got, want)


class _Module(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = _Outputs(nn.Sequential(nn.Linear(5, 10), nn.Tanh()), nn.Linear(10, 3), kind)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _i):
        return _ce(self(batch[0]), batch[1]).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-2, weight_decay=1e-3)


@pytest.mark.parametrize("estimation", ["exact", "diagonal"])
def test_unread_outputs_leave_callback_figures_unchanged(trained, estimation, tmp_path):
    """The callback path (pre-training checks, estimation pass during training, assessment at the
    end): a dict output equals its tensor twin (same seed, same training: the loss reads the same
    logits). On main 3de7ae7 the diagonal estimator refused the dict model before training with a
    message naming neither the output nor a fix, and the exact one read it 18-20% high."""
    loader = trained[2]
    reports = {}
    for kind in ("tensor", "dict"):
        cb = MISCallback(schemes=SCHEMES[1:], loss_fn=_ce, estimation=estimation, uncertainty_draws=0, dirpath=tmp_path,
                         **SAME_DRAWS)
        pl.Trainer(max_epochs=3, callbacks=[cb], enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, deterministic=True).fit(_Module(kind), loader)
        reports[kind] = cb.report
    _assert_same(reports["dict"], reports["tensor"], estimation, SCHEMES[1:])


class _HookModule(_Module):
    def mis_per_sample_loss(self, batch):
        return _ce(self(batch[0]), batch[1])


def test_unread_outputs_under_the_loss_hook(trained, tmp_path):
    """``mis_per_sample_loss`` on a module whose forward returns a dict: the output captured inside
    the hook has its leaves sorted by what the hook's loss reads, so the leverage correction runs
    and the figures equal the tensor twin's (on main 3de7ae7 the correction was off for the dict,
    a warning said so, and its leakage read 6-9% low)."""
    loader = trained[2]
    reports = {}
    for kind in ("tensor", "dict"):
        cb = MISCallback(schemes=SCHEMES[1:], estimation="exact", uncertainty_draws=0, dirpath=tmp_path, **SAME_DRAWS)
        pl.Trainer(max_epochs=3, callbacks=[cb], enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, deterministic=True).fit(_HookModule(kind), loader)
        reports[kind] = cb.report
    assert reports["dict"].diagnostics["leverage_correction"]
    _assert_same(reports["dict"], reports["tensor"], "hook", SCHEMES[1:])


def test_sort_outputs_keeps_the_leaves_the_loss_reads():
    """Read leaves are kept and differentiated; unread ones dropped (zeros in their place for the
    loss); a leaf read through its value only (a weight under ``detach``) kept but detached, so
    its Jacobian rows are zero and its values still reach the loss."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def forward(inp):
        o = lin(inp)
        return {"a": o, "b": o.square(), "w": o.sum(1, keepdim=True)}

    def loss(out, t):  # reads a; b not at all; w by value only
        return F.cross_entropy(out["a"], t, reduction="none") * out["w"].detach().sigmoid().squeeze(1)

    tree = sort_outputs(forward, loss, x, y, 6)
    assert isinstance(tree, OutputTree)
    names = ["a", "b", "w"]  # the dict's leaf order
    assert dict(zip(names, tree.kept)) == {"a": True, "b": False, "w": True}
    assert dict(zip(names, tree.live)) == {"a": True, "b": False, "w": False}
    assert output_numel(tree) == 4
    out = forward(x)
    flat = flat_outputs(out, tree)
    assert torch.equal(flat, torch.cat([out["a"], out["w"]], 1))
    jac_w = torch.autograd.grad(flat[:, 3].sum(), lin.weight, retain_graph=True)[0]
    jac_a = torch.autograd.grad(flat[:, 0].sum(), lin.weight)[0]
    assert not jac_w.any() and jac_a.any()  # the value-read leaf is detached, the read one is not
    back = unflat_record(flat[2], tree)
    assert torch.equal(back["a"], out["a"][2:3]) and torch.equal(back["w"], out["w"][2:3])
    assert torch.equal(back["b"], torch.zeros(1, 3))
    assert torch.allclose(loss(back, y[2:3]), loss(out, y)[2:3], rtol=1e-6)
    assert sort_outputs(lambda inp: lin(inp), loss, x, y, 6) == (3,)  # a tensor output: its shape


class _Tokens(nn.Module):
    """A token model ``[B, T] -> [B, T, 5]`` (or a dict with its features beside), T per batch."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.emb, self.head, self.as_dict = nn.Embedding(10, 4), nn.Linear(4, 5), as_dict

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        return {"logits": self.head(h), "features": h} if self.as_dict else self.head(h)


@pytest.mark.parametrize("as_dict", [False, True])
def test_each_batch_flattens_its_own_sequence_length(as_dict):
    """A sequence output padded per batch has another length in each batch: the layout's sorting
    is the first batch's, its shapes each batch's own (rv52b: the per-layer program kept the first
    batch's shape, and a later batch's outputs failed to reshape, a plain tensor output too)."""
    from mis_lightning.estimation.linear_factors import LayerProgram
    from mis_lightning.estimation.per_sample import LossProgram

    def loss(out, y):
        o = out["logits"] if isinstance(out, dict) else out
        return F.cross_entropy(o.transpose(1, 2), y, reduction="none").mean(-1)

    torch.manual_seed(0)
    m = _Tokens(as_dict).double()
    names = [n for n, _ in m.named_parameters()]
    lp = LayerProgram(m, loss, names, torch.float64, reference=LossProgram(m, loss, names, dtype=torch.float64))
    for t in (6, 9):
        lp.batch(torch.randint(0, 10, (8, t)), torch.randint(0, 5, (8, t)), 8)


@pytest.mark.parametrize("probe", [None, 8])
def test_a_leaf_read_on_later_records_of_the_first_batch_is_kept(monkeypatch, probe):
    """rv52b: a multi-task loss reads a regression head only where a record has its label; the first
    batch's first 8 records lack it. Sorted on the whole first batch (``PROBE_RECORDS = None``) the head
    is read (kept, differentiated) and a labelled record's loss through the flattened layout is its own
    (float64, exactly the same arithmetic: 1e-12); sorted on the first 8 only (the path before) the head
    was dropped and that loss read with zeros in its place (asserted to differ)."""
    from mis_lightning.estimation import output_reads as R

    monkeypatch.setattr(R, "PROBE_RECORDS", probe)
    torch.manual_seed(0)

    def loss(out, y):
        lo = torch.nn.functional.cross_entropy(out["logits"], y["cls"], reduction="none")
        m = ~torch.isnan(y["reg"])
        if m.any():
            lo = lo + torch.where(m, (out["reg"].squeeze(-1) - y["reg"].nan_to_num()) ** 2, torch.zeros_like(lo))
        return lo

    b = 16
    out = {"logits": torch.randn(b, 3, dtype=torch.float64), "reg": torch.randn(b, 1, dtype=torch.float64) + 3}
    y = {"cls": torch.randint(0, 3, (b,)), "reg": torch.randn(b, dtype=torch.float64)}
    y["reg"][:8] = float("nan")
    lay = R.sort_outputs(None, loss, None, y, b, outputs=out)
    i = 10
    o1 = {k: v[i:i + 1] for k, v in out.items()}
    y1 = {k: v[i:i + 1] for k, v in y.items()}
    seen = loss(R.unflat_record(R.flat_outputs(o1, lay).reshape(-1), lay), y1).item()
    if probe is None:
        assert all(lay.kept) and all(lay.live)
        assert seen == pytest.approx(loss(o1, y1).item(), rel=1e-12)
    else:
        assert not all(lay.kept)
        assert abs(seen - loss(o1, y1).item()) > 1e-3


def test_a_sequence_model_padded_per_batch_is_refused_clearly_by_the_exact_estimator_and_read_by_the_diagonal():
    """rv52b #6: a token model ``[B, T] -> [B, T, V]`` whose batches have different T. The exact
    estimator's stored per-record leverage factors ``[g | J | L]`` need one output size per record: it
    failed with torch's bare ``shape '[16, 1, 6, 5]' is invalid``; now a ValueError naming the cause and
    the cures. The diagonal estimator reads every batch with its own shape."""
    torch.manual_seed(0)

    class Tok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 5)

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)))

    def loss(out, y):
        return torch.nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(-1)

    batches = [(torch.randint(0, 10, (16, t)), torch.randint(0, 5, (16, t))) for t in (6, 9, 7, 6)]
    with pytest.raises(ValueError, match="outputs per record change between batches.*pad every batch"):
        ml.assess(Tok(), ["none"], batches, loss, estimation="exact", strict=True)
    r = ml.assess(Tok(), ["none", "int8_weight_only"], batches, loss, estimation="diagonal", strict=True)
    assert all(0.0 <= s.leakage <= 1.0 for s in r.schemes.values())


# -- a leaf the first batch does not read (ux53) --------------------------------------------------
THR, HEAVY = 0.5, 4.0


class ScoredNet(nn.Module):
    """A classifier beside a fixed scoring head (not trained, not assessed): the loss weighs a record
    ``HEAVY`` times where its (detached) score is above ``THR``, so the ``"aux"`` leaf is value-read
    (kept, zero Jacobian rows) on a batch holding such a record and dropped on one without."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.cls, self.aux = nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Linear(8, 3), nn.Linear(5, 1)
        self.aux.requires_grad_(False)

    def forward(self, x):
        return {"logits": self.cls(self.body(x)), "aux": self.aux(x)}


def scored_loss(out, y):
    w = 1.0 + (HEAVY - 1.0) * (out["aux"].detach().squeeze(-1) > THR).to(out["logits"].dtype)
    return w * F.cross_entropy(out["logits"], y, reduction="none")


def scored_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """``(model, X [240, 5], y, above)``: trained (L-BFGS, L2 1e-3), its records ordered so that the
    ``above`` ones whose score exceeds ``THR`` come last (a first batch of 40 reads no score)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(240, 5, generator=g)
    y = (x[:, :3] + 0.5 * torch.randn(240, 3, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = ScoredNet()
    with torch.no_grad():
        hot = (model.aux(x).squeeze(-1) > THR).to(torch.int64)
    order = torch.argsort(hot, stable=True)
    x, y = x[order], y[order]
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(trained, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = scored_loss(model(x), y).mean() + 0.5e-3 * sum((p ** 2).sum() for p in trained)
        obj.backward()
        return obj

    opt.step(closure)
    return model, x, y, int(hot.sum())


@pytest.mark.parametrize("estimation", ["exact", "diagonal", "ggn"])
def test_a_leaf_first_read_after_the_first_batch_is_put_back(estimation):
    """ux53: the first batch of 40 holds no record whose score the loss reads, so the sorting drops
    ``"aux"``; 19 later records are weighed by it. Before, those records' losses were read with zeros
    in its place for the whole run (weight 1, not 4), silently: the diagonal estimators' figures
    moved (rtn_int2 0.0952 vs 0.0958 at weight 2); the exact estimator's did not (its per-record
    gradients and Hessians take the loss on the model's own output) but nothing said so. Now each later
    batch is checked (``output_reads.read_later``) and the leaf put back: the figures equal those of
    one batch of all 240 records (the leaf kept from the start; the same records, another batch
    composition: 1e-9 relative for the exact estimator, 1e-7 for the diagonal ones, whose float32
    passes move rtn_int2 by up to 1.2e-9 between batches of 40 and 240 with no leaf put back --
    the 240 records reversed, the leaf read from the first batch), and a warning names the leaf."""
    model, x, y, above = scored_case()
    assert 10 <= above <= 60
    kw = dict(estimation="diagonal", hessian="ggn") if estimation == "ggn" else dict(estimation=estimation)

    def run(bs):
        batches = [(x[a:a + bs], y[a:a + bs]) for a in range(0, 240, bs)]
        # t55: the independent-coordinate form and 1,024 Monte Carlo draws (SAME_DRAWS, as this module's other
        # tests): the leaf put back is a fact of the estimation (sigma, gradients, Gauss-Newton factors) that
        # every scoring form reads; the correlated form's Monte Carlo was ~80% of the test's CPU
        return ml.assess(model, ["none", "rtn_int4", "rtn_int2"], batches, scored_loss, weight_decay=1e-3,
                         uncertainty_draws=0, **kw, **SAME_DRAWS)

    whole, split = run(240), run(40)
    rel = REL if estimation == "exact" else 1e-7
    for s in ("none", "rtn_int4", "rtn_int2"):
        assert split.schemes[s].leakage == pytest.approx(whole.schemes[s].leakage, rel=rel), s
    assert not any("first batch" in w for w in whole.warnings)
    assert any("did not read the model's output ['aux'] on the first batch" in w for w in split.warnings)


def test_widened_rows_keep_each_records_factor():
    """``estimate._widened_rows``: stored rows ``[g | Q (K d) | S (K^2)]`` of K = 2 and 4 made one
    width: each record's ``g``, ``Q' S Q`` and the span of its ``Q`` rows unchanged (exact: zero rows
    and columns added, nothing rounded)."""
    from mis_lightning.estimation.estimate import _widened_rows

    g = torch.Generator().manual_seed(0)
    d = 6
    chunks = []
    for m, k in ((3, 2), (2, 4)):
        q, s = torch.randn(m, k, d, generator=g, dtype=torch.float64), torch.randn(m, k, k, generator=g,
                                                                                  dtype=torch.float64)
        chunks.append(torch.cat([torch.randn(m, d, generator=g, dtype=torch.float64), q.reshape(m, -1),
                                 s.reshape(m, -1)], 1))
    out = _widened_rows(chunks, d)
    assert [t.shape[1] for t in out] == [d + 4 * d + 16] * 2 and out[1] is chunks[1]
    for t, w in zip(chunks, out):
        k = 2 if t.shape[1] == d + 2 * d + 4 else 4
        q, s = t[:, d:d + k * d].reshape(-1, k, d), t[:, d + k * d:].reshape(-1, k, k)
        q2, s2 = w[:, d:d + 4 * d].reshape(-1, 4, d), w[:, d + 4 * d:].reshape(-1, 4, 4)
        assert torch.equal(w[:, :d], t[:, :d])
        assert torch.equal(q2.transpose(1, 2) @ s2 @ q2, q.transpose(1, 2) @ s @ q)
        assert torch.equal(torch.linalg.matrix_rank(q2), torch.linalg.matrix_rank(q))
    assert _widened_rows(chunks[:1], d) is not None and _widened_rows(chunks[:1], d)[0] is chunks[0]


def test_unread_entries_of_one_tensor():
    """ux53: ``output_reads.unread_entries`` marks the columns of a tensor output no record's loss
    reads (zero derivative in every record and the losses bitwise unchanged with them replaced); with a
    column read at a flat spot among them (``(o - t)^2`` with ``t = o``: zero derivative, but replaced
    values move the loss) none is marked; nor any of a loss reading them all, nor a pytree (sorted per
    leaf)."""
    from mis_lightning.estimation.output_reads import unread_entries

    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(16, 13, generator=g), torch.randint(0, 3, (16,), generator=g)
    mask = unread_entries(out, lambda o, t: F.cross_entropy(o[:, :3], t, reduction="none"), y, 16)
    assert mask.tolist() == [False] * 3 + [True] * 10
    assert unread_entries(out, lambda o, t: F.cross_entropy(o, t, reduction="none"), y, 16) is None
    t2 = out[:, :2] + 1
    assert int(unread_entries(out, lambda o, t: ((o[:, :2] - t) ** 2).sum(1), t2, 16).sum()) == 11
    t2[:, 1] = out[:, 1]  # column 1 read where its derivative is exactly 0
    assert unread_entries(out, lambda o, t: ((o[:, :2] - t) ** 2).sum(1), t2, 16) is None
    assert unread_entries({"a": out}, lambda o, t: o["a"][:, 0], y, 16) is None


def _ce3(o, y):
    return F.cross_entropy(o[:, :3], y, reduction="none")


@pytest.mark.parametrize("estimation", ["exact", "diagonal"])
def test_an_output_read_in_part_reads_as_its_twin(trained, logits_only, estimation):
    """ux53: a forward returning ``cat([logits, h], 1)`` ([B, 13]) to a loss reading ``[:, :3]``: the exact
    estimator's leverages took all 13 outputs' gradients into each record's span (before: 2-9% above
    the logits-only twin over four label draws, 0.1553 vs 0.1476 for ``none`` on one; max leverage 2.34
    vs 1.16). The 10 unread columns are now left out of the per-record factors, so every figure and
    leverage equals the twin's (the same float64 arithmetic on the same rows: 1e-9); the diagonal
    estimator's already did (its loss directions count the loss Hessian's rank). The twin is the file's
    ``logits_only`` report (its loss reads all 3 columns of its [B, 3] output, as ``_ce3`` would);
    no interval drawn (``uncertainty_draws=0``): the figures compared are the leakages and leverages."""
    body, head, loader = trained
    rep = ml.assess(_Outputs(body, head, "cat"), SCHEMES, loader, _ce3, estimation=estimation, weight_decay=1e-3,
                    uncertainty_draws=0, **SAME_DRAWS)
    _assert_same(rep, logits_only(estimation), estimation)


def test_an_entry_read_after_the_first_batch_is_read_from_then_on():
    """ux53: a [B, 4] output whose column 3 a multi-task loss reads only where a record has its label
    (``torch.where``: a derivative of exactly 0 and no effect on the loss elsewhere); the first batch has
    none, so the column is left out of the leverages' factors (``LossProgram.read_rows``); the next
    batch's labelled records read it, and from that batch on it is in (``LossProgram.prepare``): left
    out for the run, their factors would miss its rows (the leverage read low, the unsafe side)."""
    from mis_lightning.estimation.per_sample import LossProgram

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))

    def loss(o, t):
        lab = ~torch.isnan(t[:, 1])
        reg = torch.where(lab, (o[:, 3] - t[:, 1].nan_to_num()) ** 2, torch.zeros_like(o[:, 3]))
        return F.cross_entropy(o[:, :3], t[:, 0].long(), reduction="none") + reg

    def batch(labelled):
        t = torch.stack([torch.randint(0, 3, (20,)).double(), torch.randn(20, dtype=torch.float64)], 1)
        if not labelled:
            t[:, 1] = float("nan")
        return torch.randn(20, 5, dtype=torch.float64), t

    prog = LossProgram(net, loss, [n for n, _ in net.named_parameters()])
    prog.prepare(batch(False))
    assert prog.read_rows(4).tolist() == [True, True, True, False]
    prog.prepare(batch(False))
    assert prog.read_rows(4).tolist() == [True, True, True, False]
    prog.prepare(batch(True))
    assert prog.read_rows(4) is None


@pytest.mark.parametrize("estimation", ["exact", "diagonal"])
def test_unread_entries_searched_where_the_exact_factors_read_them_only(trained, estimation, monkeypatch):
    """rv53: ``unread_entries`` costs ~4 copies of the first batch's whole output and a backward
    (a [16, 256, 8000] float32 output: +0.5 GB peak RSS, 1.1 s CPU), and only the exact estimator's
    kept factors read its mask (``LossProgram.read_rows``). Searched in exact mode; not run in
    diagonal mode (before: run there too, and on every later batch while the mask was set)."""
    from mis_lightning.estimation import per_sample

    body, head, loader = trained
    calls = []
    real = per_sample.unread_entries
    monkeypatch.setattr(per_sample, "unread_entries", lambda *a, **k: calls.append(1) or real(*a, **k))
    ml.assess(_Outputs(body, head, "cat"), ["none"], loader, _ce3, estimation=estimation, weight_decay=1e-3,
              uncertainty_draws=0, **SAME_DRAWS)
    assert (len(calls) > 0) is (estimation == "exact"), calls
