"""Estimation under real conditions (issue 9): tied weights, train-mode models, broadcasting
losses, loader order, and the cost of the "auto" estimator."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from _nets import CNN  # tests/_nets.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.estimation import estimate
from mis_lightning.estimation.estimate import MomentAccumulator


def mse(o, t):
    return 0.5 * (o.squeeze(-1) - t) ** 2


def _data(n=300, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = X[:, 0] + 0.1 * torch.randn(n, generator=g)
    return X, y


# -- item 1: a weight used twice ------------------------------------------------------------------
class Tied(nn.Module):
    """``b`` shares ``a``'s weight."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Twice(nn.Module):
    """``a`` called twice in one forward."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.head = nn.Linear(d, d), nn.Linear(d, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Functional(nn.Module):
    """``a``'s weight also used by a functional call outside its layer."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.head = nn.Linear(d, d), nn.Linear(d, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(F.linear(h, self.a.weight)))


@pytest.mark.parametrize("cls", [Tied, Twice, Functional])
def test_shared_weight_factored_path_equals_torch_func(cls, monkeypatch):
    torch.manual_seed(0)
    m = cls().eval()
    X, y = _data()
    dl = DataLoader(TensorDataset(X, y), batch_size=100)
    kw = dict(mode="diagonal", hessian="ggn", num_records=64)
    if cls is Twice:
        # the per-layer program takes ``a``'s two calls as two positions (tw51) and corrects sigma by
        # its K-FAC factors, which the torch.func path has none of: the same estimator without it
        monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_CORRECTION", False)
    fast = estimate(m, dl, mse, use_factors=True, **kw)
    slow = estimate(m, dl, mse, use_factors=False, **kw)
    # Same float64 estimator on the same records: equal to rounding (1e-6 relative is loose;
    # the old factored path, which saw one use of the weight, was off by up to 11x).
    for k in slow.names:
        torch.testing.assert_close(fast.sigma[k], slow.sigma[k], rtol=1e-6, atol=0)
    assert fast.influence is not None and slow.influence is not None  # standardised per-sample gradients
    torch.testing.assert_close(fast.influence, slow.influence, rtol=1e-6, atol=1e-9)
    # The mean gradient over every use of the weight, as autograd sums it.
    m2 = copy.deepcopy(m).double()
    mse(m2(X.double()), y.double()).mean().backward()
    true = torch.cat([p.grad.reshape(-1) for p in m2.parameters()]).norm().item()
    assert fast.diagnostics["gradient_norm"] == pytest.approx(true, rel=1e-6)


# -- item 2: a model left in train mode ----------------------------------------------------------
def _train_mode_model():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 1))
    X, y = _data()
    with torch.no_grad():
        m(X)  # a training-mode forward: running statistics away from their defaults
    return m


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()])


def _assert_unchanged(m, snap):
    state, flags = snap
    now = m.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k  # incl. num_batches_tracked and running statistics
    assert [x.training for x in m.modules()] == flags


@pytest.mark.parametrize("estimation", ["exact", "diagonal"])
def test_train_mode_model_is_assessed_in_eval_mode_and_left_untouched(estimation):
    m = _train_mode_model()
    assert m.training
    snap = _snapshot(m)
    X, y = _data()
    dl = DataLoader(TensorDataset(X, y), batch_size=100)
    kw = dict(estimation=estimation, uncertainty_draws=0, num_records=64)
    r = ml.assess(m, ["rtn_int8"], dl, mse, **kw)
    _assert_unchanged(m, snap)
    r_eval = ml.assess(copy.deepcopy(m).eval(), ["rtn_int8"], dl, mse, **kw)
    assert r.schemes["rtn_int8"].leakage == pytest.approx(r_eval.schemes["rtn_int8"].leakage, rel=1e-12)
    assert r.baseline_leakage == pytest.approx(r_eval.baseline_leakage, rel=1e-12)
    # MISIndicator: same figures, model untouched.
    metric = ml.MISIndicator(m, mse, ["rtn_int8"], estimation=estimation, uncertainty_draws=0, num_records=64)
    for xb, yb in dl:
        metric.update(xb, yb)
    out = metric.compute()
    _assert_unchanged(m, snap)
    assert float(out["rtn_int8"]["leakage"]) == pytest.approx(r_eval.schemes["rtn_int8"].leakage, rel=1e-9)


def test_train_mode_model_above_exact_size_factored_path():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(8, 256), nn.BatchNorm1d(256), nn.Dropout(0.1), nn.Tanh(), nn.Linear(256, 1))
    X, y = _data()
    with torch.no_grad():
        m(X)
    snap = _snapshot(m)
    dl = DataLoader(TensorDataset(X, y), batch_size=100)
    r = ml.assess(m, ["rtn_int8"], dl, mse, uncertainty_draws=0, num_records=64)
    _assert_unchanged(m, snap)
    r_eval = ml.assess(copy.deepcopy(m).eval(), ["rtn_int8"], dl, mse, uncertainty_draws=0, num_records=64)
    assert r.estimation["mode"] == "diagonal"
    assert r.schemes["rtn_int8"].leakage == pytest.approx(r_eval.schemes["rtn_int8"].leakage, rel=1e-12)


# -- item 3: losses that broadcast --------------------------------------------------------------
def test_loss_mixing_records_through_its_gradient_only_is_refused_on_the_first_batch():
    """nux53: ``l - l.mean() + l.mean().detach()`` has per-record values (a record alone gives
    its entry) but each record's gradient alone is 0; refused on the first batch, naming the
    mixing. Per-record losses with label smoothing, ``ignore_index`` and a mean over each
    record's tokens pass (their cross-record gradients are exactly 0)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6)).eval()
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64, 2))
    y[::5, 0] = -100  # ignored tokens
    dl = DataLoader(TensorDataset(X, y), batch_size=16)

    def tokens(o, t, **kw):  # two tokens of 3 classes per record, the mean over a record's kept tokens
        each = F.cross_entropy(o.reshape(-1, 2, 3).transpose(1, 2), t, reduction="none", **kw)
        return each.sum(-1) / (t != -100).sum(-1).clamp_min(1)

    def mixed(o, t):
        loss = tokens(o, t)
        return loss - loss.mean() + loss.mean().detach()

    msg = (r"loss_fn '.*mixed' \(model outputs \[16, 6\], targets \[16, 2\]\) mixes the records through its "
           r"gradient: the loss of record 0 has a gradient in the outputs of record \d+ .* without batch statistics")
    for estimation in ("exact", "diagonal"):
        with pytest.raises(ValueError, match=msg):
            ml.assess(m, ["rtn_int8"], dl, mixed, estimation=estimation, uncertainty_draws=0)
    with pytest.raises(ValueError, match=msg):
        ml.MISIndicator(m, mixed, ["rtn_int8"]).update(X[:16], y[:16])
    for legit in (tokens, lambda o, t: tokens(o, t, label_smoothing=0.1)):
        ml.assess(m, ["rtn_int8"], dl, legit, uncertainty_draws=0)
    # low precision: a per-record loss's cross terms are exactly 0 in any dtype; the mixing (here
    # 0.13 of the largest entry in bfloat16) is refused although it is near bfloat16's 16 eps
    from mis_lightning.estimation.per_sample import check_record_gradients

    for dtype in (torch.bfloat16, torch.float16):
        out = m(X[:16]).to(dtype)
        check_record_gradients(tokens, out, y[:16], "tokens")
        with pytest.raises(ValueError, match="mixes the records through its gradient"):
            check_record_gradients(mixed, out, y[:16], "mixed")


class _HookNet(nn.Module):
    """A classifier whose per-record loss comes through the ``mis_per_sample_loss`` hook; ``kind``
    makes the hook's loss mix records in value or in gradient only, the forward mix them, or the
    forward hold dropout written in it."""

    def __init__(self, kind=""):
        super().__init__()
        self.kind, self.a, self.b = kind, nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h - h.mean(0) if self.kind == "forward" else h
        return self.b(F.dropout(h, 0.3, self.training) if self.kind == "dropout" else h)

    def mis_per_sample_loss(self, batch):
        x, y = batch
        loss = F.cross_entropy(self(x), y, reduction="none")
        if self.kind == "gradient":
            return loss - loss.mean() + loss.mean().detach()
        return loss / loss.mean().detach() if self.kind == "value" else loss


def test_a_loss_hook_gets_the_per_record_checks_of_a_loss_fn():
    """ux54b: a model giving its losses through ``mis_per_sample_loss(batch)`` got none of the
    first batch's per-record checks (the hook's losses were passed through, so checking them
    against themselves passed): a loss mixing records through its gradient only failed after the
    whole pass ("no record's gradient differs"), one normalised by the batch was blamed on the
    forward, and dropout written in forward went unseen (the train-mode probe called forward on
    the hook's batch). Each is now named on the first batch as for a ``loss_fn``; the plain hook
    and its forward-mixing twin keep their behaviour."""
    from mis_lightning.streaming import hook_program

    def program(kind):  # the estimation's program for the hook, as the Metric and the callback build it
        model = _HookNet(kind).eval()
        loss_fn, batch_fn, cls = hook_program(model)
        return cls(model, loss_fn, [n for n, _ in model.named_parameters()], batch_fn)

    torch.manual_seed(0)
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    hook = r"_HookNet.mis_per_sample_loss\(batch\)"
    for kind, msg in (("gradient", hook + r" mixes the records through its gradient: the loss of record 0 has a "
                                          r"gradient in the outputs of record \d+"),
                      ("value", hook + r" is not per-sample: the loss of record 0 computed alone"),
                      ("forward", r"model _HookNet: the model's output for record 0 computed alone differs")):
        with pytest.raises(ValueError, match=msg):
            program(kind).prepare(batch)  # the first batch's checks
    for kind in ("", "dropout"):
        p = program(kind)
        inputs, _, b = p.prepare(batch)
        assert p.random_in_train_mode(inputs, b) == (kind == "dropout"), kind  # read by MomentAccumulator._update


class _WeightedHook(_HookNet):
    """A hook reading a batch tensor of B entries that are not records (class weights)."""

    def mis_per_sample_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], weight=batch["w"][:3], reduction="none")


class _SeqFirstHook(nn.Module):
    """A hook whose model's output is sequence-first, ``[T, B, C]`` (nn.RNN's default layout)."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.RNN(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])

    def mis_per_sample_loss(self, batch):
        x, y = batch
        out = self(x.transpose(0, 1))
        return F.cross_entropy(out[-1], y, reduction="none") + 0.1 * out.square().sum((0, 2))


class _StackedHook(nn.Module):
    """A hook whose model stacks two heads ``[2, B, 1]`` and ``.squeeze()``s: ``[2, B]``, ``[2]`` for
    one record, ``[2, 2]`` for two (a squeezed ``[2, 3]`` batch-first head shows the same shapes)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        o = self.lin(x)
        return torch.stack([o[:, :1], o[:, 1:]]).squeeze()

    def mis_per_sample_loss(self, batch):
        x, y = batch
        return ((self(x).reshape(2, -1).T - y) ** 2).sum(-1)


class _FlatHook(_StackedHook):
    """A per-token model on the records' tokens flattened, ``[B, T, 4] -> [B*T, 2]``, its loss a mean
    over each record's tokens: the output's dim 0 holds T rows per record."""

    def forward(self, x):
        return self.lin(x.reshape(-1, 4))

    def mis_per_sample_loss(self, batch):
        return _flat_loss(self(batch[0]), batch[1])


def _flat_loss(o, y):  # the mean over each record's tokens of [B*T, 2] outputs against [B, T, 2] targets
    return ((o - y.reshape(-1, 2)) ** 2).sum(-1).reshape(len(y), -1).mean(1)


class _LabelledOnlyHook(_StackedHook):
    """A hook calling the model on the labelled records only (``self(x[keep])``; vmap cannot batch it)."""

    def forward(self, x):
        return self.lin(x)

    def mis_per_sample_loss(self, batch):
        x, y = batch
        keep = (y >= 0).all(1)
        return torch.zeros(len(x), dtype=x.dtype).index_put((keep.nonzero().squeeze(1),), ((self(x[keep]) - y[keep]) ** 2).sum(1))


def test_the_hook_checks_refuse_no_per_record_hook():
    """rv54b: ux54b's hook checks refused two per-record hooks the s53 code ran: one reading a
    batch tensor of B entries that are not records (cut per record, the hook raised torch's
    error), one whose model output is sequence-first with T = 4 steps (its steps read as the 4
    records checked: "mixes the records through its gradient").

    rv56: the outputs whose records are in dim 1 that the one- and two-record shapes read as
    records-first are refused, naming the layout: sequence-first with T = 1 step (``(1, 1, 3)``
    for one record) and two stacked heads squeezed to ``[2, B]`` (``(2,)`` one record, ``(2, 2)``
    two) by the batch's dim 0 in the first-batch checks; the stacked heads on a batch of two
    records (dim 0 is 2 there too) by the value of the two-record output's row 0; the same
    refusal for the plain loss, which blamed the loss ("is not per-sample ... broadcasting"). est57: a
    hook's output_shape takes the layouts the first batch lets through whole (its reads call the hook on
    one record alone), where it refused them and the leverage correction was skipped."""
    from mis_lightning.estimation.per_sample import LossProgram
    from mis_lightning.streaming import hook_program

    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    y2 = torch.randn(16, 2)
    records_dim = r"its dim 0 does not hold the records"
    for model, batch, bad in ((_StackedHook(), (x, y2), r"inside mis_per_sample_loss is \(2, 4\) for 4 records: " + records_dim),
                              (_SeqFirstHook(), (torch.randn(16, 1, 4), y), r"\(1, 4, 3\) for 4 records: " + records_dim),
                              # rv56r: a forward on some of the records (it failed in vmap's nonzero before) is named
                              (_LabelledOnlyHook(), (x, torch.where(torch.arange(16)[:, None] == 2, -1.0, y2.abs())),
                               r"\(3, 2\) for 4 records: .*the model called on some of the records only")):
        loss_fn, batch_fn, cls = hook_program(model.eval())
        prog = cls(model, loss_fn, [n for n, _ in model.named_parameters()], batch_fn)
        with pytest.raises(ValueError, match=bad):
            prog.prepare(batch)
    model = _StackedHook().eval()
    loss_fn, batch_fn, cls = hook_program(model)
    prog = cls(model, loss_fn, [n for n, _ in model.named_parameters()], batch_fn)
    inputs = prog.prepare((x[:2], y2[:2]))[0]
    # est57: a hook's per-record reads call it on one record alone: that call's whole output (2,) is the record's
    assert prog.output_shape(inputs) == (2,)
    plain = LossProgram(model, lambda o, t: ((o.T - t) ** 2).sum(-1), [n for n, _ in model.named_parameters()])
    with pytest.raises(ValueError, match=r"the model's output is \(2, 16\) for 16 records: " + records_dim):
        plain.prepare((x, y2))
    # rv56r: the plain loss names an output of several rows per record (it failed inside the loss before)
    flat = LossProgram(_FlatHook().eval(), _flat_loss, ["lin.weight", "lin.bias"])
    with pytest.raises(ValueError, match=r"the model's output is \(48, 2\) for 16 records: its dim 0 holds 3 rows"):
        flat.prepare((torch.randn(16, 3, 4), torch.randn(16, 3, 2)))
    # rv56r: a hook's other layouts whose dim 0 is not the records are not refused by the first batch (rv56 refused
    # them): sequence-first of T = 5 steps (not the 4 records checked), the tokens flattened [B*T, C]; est57: their
    # per-record reads take the hook's whole output on one record (output_shape: its shape; it refused them, naming
    # the layout, and the leverage correction was skipped: tests/test_hook_layout_leverage.py)
    for model, batch in ((_WeightedHook(), {"x": x, "y": y, "w": torch.ones(16)}),
                         (_SeqFirstHook(), (torch.randn(16, 4, 4), y)), (_SeqFirstHook(), (torch.randn(4, 4, 4), y[:4])),
                         (_SeqFirstHook(), (torch.randn(16, 5, 4), y)),
                         (_FlatHook(), (torch.randn(16, 3, 4), torch.randn(16, 3, 2)))):
        model.eval()
        loss_fn, batch_fn, cls = hook_program(model)
        prog = cls(model, loss_fn, [n for n, _ in model.named_parameters()], batch_fn)
        inputs = prog.prepare(batch)[0]
        if not isinstance(model, _WeightedHook):
            # rv55: the leverages read the output's dim 0 as the records: the T steps of one record,
            # (4, 1, 3), were read as 1 record of (1, 3) (T = B = 4 too); est57: the whole (T, 1, 3)
            t = batch[0].shape[1]
            assert prog.output_shape(inputs) == ((t, 1, 3) if isinstance(model, _SeqFirstHook) else (3, 2))


def test_gradient_neutral_batch_shift_passes_the_record_gradient_check_in_16_bit(monkeypatch):
    """rv53b: a per-record cross-entropy of logits shifted by the batch's max (``o - o.max()``, a
    hand-written stable softmax) has per-record gradients (the shift cancels under the softmax),
    but its path through the max leaves rounding in other records' outputs: 0.4 eps (0.0032) in
    bfloat16, 0.04 eps in float16; passed, while the batch-mean mixing (1/4 over the 4 records
    checked, 1/8 over the 8 of the s53 path) is still refused."""
    from mis_lightning.estimation import per_sample
    from mis_lightning.estimation.per_sample import check_record_gradients

    torch.manual_seed(0)
    x, y = torch.randn(16, 50) * 3, torch.randint(0, 50, (16,))

    def shifted(o, t):
        return F.cross_entropy(o - o.max(), t, reduction="none")

    def mixed(o, t):
        loss = shifted(o, t)
        return loss - loss.mean() + loss.mean().detach()

    for lean in (True, False):  # ux54b's switch: 4 records, no copies / the s53 path, 8 records
        monkeypatch.setattr(per_sample, "GRADIENT_CHECK_LEAN", lean)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            check_record_gradients(shifted, x.to(dtype), y, "shifted")
            with pytest.raises(ValueError, match="mixes the records through its gradient"):
                check_record_gradients(mixed, x.to(dtype), y, "mixed")
        with torch.inference_mode():  # a validation loop's outputs: differentiated through a copy
            out = x.clone()
        with pytest.raises(ValueError, match="mixes the records through its gradient"):
            check_record_gradients(mixed, out, y, "mixed")
        assert not x.requires_grad and x.grad is None  # the caller's outputs untouched


def test_broadcasting_loss_is_refused_on_the_first_batch():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1)).eval()
    X, y = _data()
    dl = DataLoader(TensorDataset(X, y), batch_size=100)

    def broadcast(o, t):  # [B, 1] against [B] -> [B, B] -> mean -> [B]: mixes the records
        return 0.5 * F.mse_loss(o, t, reduction="none").mean(-1)

    msg = (r"loss_fn '.*broadcast' \(model outputs \[100, 1\], targets \[100\]\) is not per-sample: "
           r"the loss of record 0 computed alone is .* but entry 0 of the batch's losses is")
    for estimation in ("exact", "diagonal"):
        with pytest.raises(ValueError, match=msg):
            ml.assess(m, ["rtn_int8"], dl, broadcast, estimation=estimation, uncertainty_draws=0)
    metric = ml.MISIndicator(m, broadcast, ["rtn_int8"])
    with pytest.raises(ValueError, match=msg):
        metric.update(X[:100], y[:100])
    # Wrong shapes: scalar and [B, 1].
    with pytest.raises(ValueError, match=r"loss_fn '.*<lambda>' \(model outputs \[100, 1\], targets \[100\]\) "
                                         r"must return per-sample losses of shape \[B\] = \[100\], got \[\]"):
        ml.assess(m, ["rtn_int8"], dl, lambda o, t: mse(o, t).mean(), uncertainty_draws=0)
    with pytest.raises(ValueError, match=r"got \[100, 1\]"):
        ml.assess(m, ["rtn_int8"], dl, lambda o, t: mse(o, t)[:, None], uncertainty_draws=0)
    # The correct loss passes.
    ml.assess(m, ["rtn_int8"], dl, mse, uncertainty_draws=0)



def test_a_loss_that_vmap_cannot_batch_is_named_on_the_first_batch():
    # torch's own gaussian_nll_loss tests torch.any(var < 0) (Python control flow on a tensor):
    # torch.func.vmap refuses it with a message naming neither the loss nor the model (fu27 #4);
    # the hand-written NLL (same values) passes.
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    X = torch.randn(120, 3)
    y = X[:, 0] + torch.randn(120)
    dl = DataLoader(TensorDataset(X, y), batch_size=40)

    def gnll(o, t):
        return F.gaussian_nll_loss(o[:, 0], t, o[:, 1].exp(), reduction="none")

    def gnll_by_hand(o, t):
        return 0.5 * (o[:, 1] + (o[:, 0] - t) ** 2 / o[:, 1].exp())

    with torch.no_grad():
        assert torch.allclose(gnll(m(X), y), gnll_by_hand(m(X), y), atol=1e-6)
    msg = r"loss_fn '.*gnll' \(model outputs \[40, 2\], targets \[40\]\) cannot run under torch.func.vmap"
    for estimation in ("exact", "diagonal"):
        with pytest.raises(ValueError, match=msg):
            ml.assess(m, ["rtn_int8"], dl, gnll, estimation=estimation, uncertainty_draws=0)
    with pytest.raises(ValueError, match=msg):
        ml.MISIndicator(m, gnll, ["rtn_int8"]).update(X[:40], y[:40])
    ml.assess(m, ["rtn_int8"], dl, gnll_by_hand, uncertainty_draws=0)

# -- item 10f: records selected by content -------------------------------------------------------
@pytest.mark.parametrize("width", [4, 256])  # exact sandwich / factored diagonal path
def test_leakage_does_not_depend_on_the_loader_order(width):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1)).eval()
    X, y = _data(n=400)
    ds = TensorDataset(X, y)
    plain = DataLoader(ds, batch_size=64)
    shuffled = DataLoader(ds, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(3))
    kw = dict(uncertainty_draws=0, num_records=64)  # 64 of 400 records: the choice matters
    a = ml.assess(m, ["rtn_int4"], plain, mse, **kw)
    b = ml.assess(m, ["rtn_int4"], shuffled, mse, **kw)
    # Same records, same order (by hash): only float64 summation order differs.
    assert b.schemes["rtn_int4"].leakage == pytest.approx(a.schemes["rtn_int4"].leakage, rel=0, abs=1e-9)
    assert b.baseline_leakage == pytest.approx(a.baseline_leakage, rel=0, abs=1e-9)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x)

    def mis_per_sample_loss(self, batch):
        x, y = batch
        return mse(self(x), y)


def test_hook_and_loss_fn_keep_the_same_records():
    torch.manual_seed(0)
    m = Hooked().eval()
    X, y = _data(n=400)
    dl = DataLoader(TensorDataset(X, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(5))
    # the records are the subject, not the correlated headline: the independent-coordinate form
    # (any leakage form reads the stored records; this one skips ~4 s of GHK per compute)
    kw = dict(uncertainty_draws=0, num_records=64, covariance="independent")
    hook = ml.MISIndicator(m, None, ["rtn_int4"], **kw)
    plain = ml.MISIndicator(m, mse, ["rtn_int4"], **kw)
    for batch in dl:
        hook.update(batch)
        plain.update(*batch)
    lh, lp = (float(x.compute()["rtn_int4"]["leakage"]) for x in (hook, plain))
    ref = ml.assess(m, ["rtn_int4"], DataLoader(TensorDataset(X, y), batch_size=400), mse, **kw)
    assert lh == pytest.approx(lp, rel=0, abs=1e-9)
    assert lp == pytest.approx(ref.schemes["rtn_int4"].leakage, rel=0, abs=1e-9)


# -- item 11: the "auto" estimator by cost -------------------------------------------------------


def ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


def test_auto_picks_a_cheap_estimator_for_a_cnn_and_exact_for_a_small_mlp():
    """The 1,466-weight CNN's exact Hessian is costly (n d x its forward's floats above
    EXACT_REUSE_MAX_COST): with n unknown (10,000 assumed) the diagonal sandwich; with n = 200
    known, the exact sandwich with the Hessian as Gauss-Newton + residual (gn28: the CNN is
    piecewise linear in each module's weights, n (d - 1,168) x floats within RESIDUAL_MAX_COST;
    it used to be the diagonal one, 20-58 % low on examples/cnn_callback.py); a small MLP: exact."""
    from mis_lightning.estimation.estimate import choose_estimator, forward_floats

    cnn = CNN()
    acc = MomentAccumulator(cnn, ce)
    assert acc.d == 1466
    # provisional until the first batch measures the forward: n d x floats per record decides
    assert "checked on the first batch" in acc.reason
    g0 = torch.Generator().manual_seed(0)
    acc.update((torch.randn(50, 1, 16, 16, generator=g0), torch.randint(0, 10, (50,), generator=g0)))
    assert acc.mode == "diagonal"  # (its Hessian: the sampled-label Gauss-Newton, 10 classes)
    assert "Conv2d" in acc.reason and "forward floats" in acc.reason
    mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    assert MomentAccumulator(mlp, mse).mode == "exact"
    # Records count in the cost: n d^2 above EXACT_MAX_COST -> diagonal.
    assert choose_estimator(mlp, 1000, n=10**6)[:2] == ("diagonal", "ggn")
    assert choose_estimator(mlp, 1000, n=10**3)[:2] == ("exact", "exact")
    # Explicit choices are kept.
    assert choose_estimator(cnn, 1466, "exact")[:2] == ("exact", "exact")
    # With n = 200 known (assess, a sized loader): the exact sandwich with the Gauss-Newton + residual
    # Hessian (its run and report: test_auto_takes_the_exact_sandwich_with_the_residual_for_the_example_cnn)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 1, 16, 16, generator=g)
    floats = forward_floats(cnn, X, 50)
    kw = dict(forward_floats=floats, outputs=10, largest=1168)
    mode, hessian, why = choose_estimator(cnn, 1466, n=200, **kw)
    assert (mode, hessian) == ("exact", "ggn_residual")
    assert why.startswith("auto: d = 1,466; Conv2d") and "residual's 298 columns" in why
    # n large enough that the residual's columns cost too much: the diagonal sandwich, as before
    assert choose_estimator(cnn, 1466, n=10**5, **kw)[:2] == ("diagonal", "ggn")
    # ... and so without the outputs (a loss hook) or with another Hessian asked for
    assert choose_estimator(cnn, 1466, n=200, forward_floats=floats, largest=1168)[:2] == ("diagonal", "ggn")
    assert choose_estimator(cnn, 1466, "auto", "ggn", n=200, **kw)[:2] == ("diagonal", "ggn")


class _BatchCentred(nn.Module):
    """A forward that mixes the records of a batch: inputs centred by the batch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x - x.mean(0, keepdim=True))


class _MCDropout(nn.Module):
    """Monte Carlo dropout: per-record, but random in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 12), nn.Linear(12, 1)

    def forward(self, x):
        return self.l2(F.dropout(torch.tanh(self.l1(x)), 0.2, training=True))


def test_a_random_forward_is_refused_as_random_not_as_mixing_records():
    """nux52 #5: an MC-dropout model was refused as "the forward pass mixes the records of a
    batch"; running the same record twice tells randomness from mixing. Every front end's check
    says it, and the RNG the user owns is unchanged."""
    torch.manual_seed(0)
    X, y = _data()
    dl = DataLoader(TensorDataset(X, y), batch_size=100)
    msg = r"model _MCDropout: the forward pass is random even in eval mode: record 0 computed alone twice"
    for estimation in ("exact", "diagonal"):
        model = _MCDropout().eval()
        state = torch.get_rng_state()
        with pytest.raises(ValueError, match=msg) as info:
            ml.assess(model, ["rtn_int8"], dl, mse, estimation=estimation, uncertainty_draws=0)
        assert "mixes the records" not in str(info.value) and "F.dropout(x, p, self.training)" in str(info.value)
        assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match=msg):
        ml.MISIndicator(_MCDropout().eval(), mse, ["rtn_int8"]).update(X[:100], y[:100])
    # the batch-mixing model is still named as such
    with pytest.raises(ValueError, match="mixes the records"):
        ml.assess(_BatchCentred().eval(), ["rtn_int8"], dl, mse, uncertainty_draws=0)


class _NoForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 1)


def test_a_model_without_forward_is_named_with_the_cures():
    """nux52 #6: torch's bare "Module [M] is missing the required forward function" came out of
    the estimation; assess and MISIndicator name the class and the cures."""
    X, y = _data()
    msg = r"^_NoForward defines no forward method: the assessment calls the model as it is released, model\(inputs\)"
    with pytest.raises(NotImplementedError, match=msg):
        ml.assess(_NoForward(), ["rtn_int8"], DataLoader(TensorDataset(X, y), batch_size=100), mse)
    with pytest.raises(NotImplementedError, match=msg):
        ml.MISIndicator(_NoForward(), mse, ["rtn_int8"]).update(X[:100], y[:100])


class _Squeezed(nn.Module):
    """Per-record, but its output loses the batch dimension for a single record."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 1)

    def forward(self, x):
        return self.net(x).squeeze()


def test_a_forward_that_mixes_records_is_refused_on_the_first_batch():
    """A model whose output for a record depends on the other records of its batch (centring
    by the batch mean) gave figures without a word (a fresh user's finding: int8 leakage equal
    to the baseline, every layer 0.024): per-sample gradients are taken one record at a time,
    so they described another function. assess and MISIndicator now refuse it on the first
    batch; a per-record model whose single-record output has another shape is not refused."""
    torch.manual_seed(0)
    X, y = _data()
    dl = DataLoader(TensorDataset(X, y), batch_size=100)
    msg = r"model _BatchCentred: the model's output for record 0 computed alone differs from its row in the batch"
    for estimation in ("exact", "diagonal"):
        with pytest.raises(ValueError, match=msg):
            ml.assess(_BatchCentred().eval(), ["rtn_int8"], dl, mse, estimation=estimation, uncertainty_draws=0)
    with pytest.raises(ValueError, match=msg):
        ml.MISIndicator(_BatchCentred().eval(), mse, ["rtn_int8"]).update(X[:100], y[:100])

    def flat_mse(o, t):
        return 0.5 * (o.reshape(-1) - t.reshape(-1)) ** 2

    ml.assess(_Squeezed().eval(), ["rtn_int8"], dl, flat_mse, uncertainty_draws=0)


def _absent_class_model(bias: float) -> tuple[nn.Module, DataLoader]:
    """A 10-16-3 classifier trained on classes 0 and 1 only; the third class's bias set to
    ``bias`` (probability ~ exp(bias) for every record)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    with torch.no_grad():
        m[2].bias[2] = bias
    return m, DataLoader(TensorDataset(x, y), batch_size=64)


@pytest.mark.parametrize("bias", [-18.0, -45.0])
@pytest.mark.parametrize("use_factors", [True, False])
def test_a_class_of_probability_near_zero_does_not_floor_every_weights_curvature(bias, use_factors):
    """fu23 F1: the diagonal sandwich floors ``H_jj`` at ``damping * r * V_jj``; with ``r`` the
    MAXIMUM of ``|H_kk| / V_kk``, a class of probability p ~ 0 (its head row has H/V ~ 1/p:
    1e8 at bias -18, 1e19 at -45) raised the floor above every other weight's curvature: the
    first layer's sigma read 1/5 of itself (bias -18) and 1e-13 of itself (-45, torch.func path;
    int4 and int8 then scored alike). With ``r`` the median, every sigma whose curvature is
    positive equals the undamped sandwich's (1e-9: the floor then binds nowhere)."""
    m, dl = _absent_class_model(bias)
    ce_ = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    kw = dict(mode="diagonal", hessian="ggn", use_factors=use_factors)
    damped, undamped = estimate(m, dl, ce_, **kw), estimate(m, dl, ce_, damping=0.0, **kw)
    for k in ("0.weight", "0.bias"):
        torch.testing.assert_close(damped.sigma[k], undamped.sigma[k], rtol=1e-9, atol=0.0)


def test_classes_of_probability_near_zero_holding_most_weights_do_not_floor_the_others():
    """vf23: with the floor's scale the MEDIAN of ``H_kk / V_kk``, rows of classes the model gives
    p ~ 0 that hold most of the weights (a 30-class softmax regression with 3 classes present:
    90% of the weights) still set it: the present rows' sigma fell to ~1e-8 of itself (a
    100-class case: int8 leakage 0.0400 for 0.0721, no warning). The floor's scale is now a low
    quantile (5%): the present rows' sigma equals the undamped sandwich's (1e-9)."""
    g = torch.Generator().manual_seed(0)
    n, p, C, present = 600, 4, 30, 3
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=X @ torch.randn(p, present, generator=g, dtype=torch.float64)).sample()
    torch.manual_seed(0)
    m = nn.Linear(p, C).double()
    opt = torch.optim.LBFGS(m.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(X), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        m.bias[present:] = -60.0  # absent classes: p ~ 1e-26
        m.weight[present:] = 0.0
    dl = DataLoader(TensorDataset(X, y), batch_size=200)
    ce_ = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    kw = dict(mode="diagonal", hessian="ggn")
    damped, undamped = estimate(m, dl, ce_, **kw), estimate(m, dl, ce_, damping=0.0, **kw)
    torch.testing.assert_close(damped.sigma["weight"][:present], undamped.sigma["weight"][:present],
                               rtol=1e-9, atol=0.0)


# -- gn27: the exact sandwich with the Gauss-Newton Hessian (mode="exact", hessian="ggn") ---------


def _ar1_conv_data(n=400, seed=0):
    """A linear Conv1d over AR(1) inputs (rho = 0.9): its weights strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, 1, 24, generator=g)
    x = torch.zeros_like(e)
    x[..., 0] = e[..., 0]
    for t in range(1, 24):
        x[..., t] = 0.9 * x[..., t - 1] + (1 - 0.81) ** 0.5 * e[..., t]
    y = x[:, 0, 2:].mean(1) + 0.3 * torch.randn(n, generator=g)
    return x, y


def _fit_linear_conv(x, y):
    """``Conv1d(1, 1, 5) -> mean``: a linear model fitted by least squares (the exact minimum)."""
    m = nn.Sequential(nn.Conv1d(1, 1, 5, bias=False), nn.Flatten(), nn.Linear(20, 1, bias=False))
    with torch.no_grad():
        m[2].weight.fill_(1 / 20)
        m[2].weight.requires_grad_(False)
        F_ = torch.stack([x[:, 0, k:k + 20].mean(1) for k in range(5)], 1)  # the kernel's regressors
        m[0].weight.copy_(torch.linalg.lstsq(F_.double(), y.double()[:, None]).solution.float().reshape(1, 1, 5))
    return m.eval()


def test_exact_sandwich_with_the_gauss_newton_hessian_on_a_linear_convolution():
    """mode="exact", hessian="ggn" is the exact sandwich with the whole Gauss-Newton Hessian
    (gn27; it used to fall back to the exact Hessian without a word). A model linear in its
    weights has H = sum_i J_i' L_i J_i exactly, so its sigma, correlation and every scheme's
    leakage equal the exact-Hessian sandwich's to rounding (1e-6 relative: float64 sums of the
    same products in another order); the diagonal sandwich ignores the kernel's correlation
    (the check that the case discriminates: its int4 figure is > 10 % away; without the K-FAC
    correction, which since kc32 reads this convolution's correlation too)."""
    import importlib

    E = importlib.import_module("mis_lightning.estimation.estimate")
    x, y = _ar1_conv_data()
    m = _fit_linear_conv(x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=100)
    kw = dict(uncertainty_draws=0, num_records=32)
    ggn = ml.assess(m, ["rtn_int4"], dl, mse, estimation="exact", hessian="ggn", **kw)
    ref = ml.assess(m, ["rtn_int4"], dl, mse, estimation="exact", **kw)
    E.KFAC_CORRECTION = False
    try:
        diag = ml.assess(m, ["rtn_int4"], dl, mse, estimation="diagonal", **kw)
    finally:
        E.KFAC_CORRECTION = True
    assert ggn.estimation["mode"] == "exact" and ggn.estimation["hessian"] == "ggn"
    assert ggn.estimation["estimator"] == "exact sandwich (Gauss-Newton Hessian, per-sample gradients)"
    assert ref.estimation["estimator"] == "exact sandwich (full Hessian, per-sample gradients)"
    a, b = ggn.schemes["rtn_int4"].leakage, ref.schemes["rtn_int4"].leakage
    assert a == pytest.approx(b, rel=1e-6)
    assert ggn.baseline_leakage == pytest.approx(ref.baseline_leakage, rel=1e-6)
    assert abs(diag.schemes["rtn_int4"].leakage / b - 1) > 0.1


def test_the_gauss_newton_exact_sandwich_sums_each_records_j_l_j():
    """On a nonlinear CNN (where the Gauss-Newton Hessian differs from the Hessian) the exact
    mode's H_sum under hessian="ggn" is sum_i J_i' L_i J_i (the existing per-batch
    _batch_gauss_newton, another code path), and its gradient sums are the exact mode's."""
    from mis_lightning.estimation.estimate import _batch_gauss_newton

    torch.manual_seed(0)
    cnn = CNN().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(20, 1, 16, 16, generator=g), torch.randint(0, 10, (20,), generator=g)) for _ in range(2)]
    acc = MomentAccumulator(cnn, ce, mode="exact", hessian="ggn", num_records=8)
    assert (acc.mode, acc.hessian) == ("exact", "ggn")
    ref = MomentAccumulator(cnn, ce, mode="diagonal", hessian="ggn", num_records=8, use_factors=False)
    H = torch.zeros(acc.d, acc.d, dtype=torch.float64)
    for b in batches:
        acc.update(b)
        ref.update(b)
        x, t, _ = acc.program.prepare(b)
        H += _batch_gauss_newton(acc.program, x, t, acc.names, acc.d)
    scale = float(H.abs().max())
    assert float((acc.state["H_sum"] - H).abs().max()) <= 1e-10 * scale
    assert torch.allclose(torch.diagonal(acc.state["H_sum"]), ref.state["h_sum"], rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(acc.state["g_sum"], ref.state["g_sum"], rtol=1e-10, atol=1e-14)


# -- gn28: the exact Hessian as Gauss-Newton + residual for piecewise-linear CNNs -----------------


class _ExampleCNN(nn.Module):
    """examples/cnn_callback.py's CNN (396 weights, 4 classes, 8x8 inputs) as a plain module."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), act(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


class _TinyCNN(nn.Module):
    """115 weights, 3 classes: cheap enough for the whole exact Hessian in a test."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, twice: bool = False) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.c2, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
        self.act, self.twice = act(), twice

    def forward(self, x):
        h = nn.functional.max_pool2d(self.act(self.bn(self.c1(x))), 2)
        h = self.act(self.c2(h))
        if self.twice:  # the largest module applied twice: outputs quadratic in its weights
            h = self.act(self.c2(h[:, :2]))
        return self.head(h.mean((2, 3)))


def _cnn_data(n, shape=(1, 8, 8), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return x, torch.randint(0, classes, (n,), generator=g)


def _trained(model, x, y, steps=30):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_auto_takes_the_exact_sandwich_with_the_residual_for_the_example_cnn():
    """gn28: examples/cnn_callback.py's CNN at n = 256 (n d x forward floats above
    EXACT_REUSE_MAX_COST, so the exact Hessian's 396 columns were too costly and "auto" ran the
    diagonal sandwich: 20-58 % low there, with a "median variance inflation factor" warning):
    "auto" now runs the exact sandwich, its Hessian assembled as Gauss-Newton + the residual's
    columns off the largest module (conv 2, 296 weights, whose own residual block is zero: the
    first batch measures it, 0 here); the report names it and no longer warns about the diagonal
    estimator's correlated weights. Fails on the old code: mode "diagonal"."""
    x, y = _cnn_data(256)
    m = _trained(_ExampleCNN(), x, y)
    r = ml.assess(m, ["rtn_int4"], DataLoader(TensorDataset(x, y), batch_size=128), ce,
                  uncertainty_draws=0, num_records=64)
    assert (r.estimation["mode"], r.estimation["hessian"]) == ("exact", "ggn_residual")
    assert r.estimation["estimator"] == "exact sandwich (full Hessian as Gauss-Newton + residual, per-sample gradients)"
    assert "the residual's 100 columns off the largest module" in r.estimation["reason"]
    assert r.diagnostics["residual_skipped_block"] == ["net.4.weight", "net.4.bias"]
    assert r.diagnostics["residual_block_ratio"] <= 1e-8 and r.diagnostics["residual_columns"] == 100
    assert not any("variance inflation" in w for w in r.warnings)
    # a tanh CNN is not piecewise linear in its modules' weights: its choice is unchanged
    tanh = MomentAccumulator(_ExampleCNN(nn.Tanh).eval(), ce, n_hint=256)
    tanh.update((x[:128], y[:128]))
    assert (tanh.mode, tanh.hessian) == ("diagonal", "ggn")
    # ... nor one whose layer types allow it but whose forward does not (its largest module applied
    # twice): the first batch's check finds that module's residual block non-zero
    twice = MomentAccumulator(_TinyCNN(twice=True).eval(), ce, n_hint=10_000)
    twice.update((x[:64], y[:64] % 3))
    assert (twice.mode, twice.hessian) == ("diagonal", "ggn")


def _residual_and_batch_hessians(m, x, y):
    """The ggn_residual accumulator updated on two batches of 48 records, with the sums of the
    batches' exact Hessians (forward-over-reverse of the summed loss) and Gauss-Newton matrices:
    the references its H_sum is checked against."""
    from mis_lightning.estimation.estimate import _batch_gauss_newton, _batch_hessian

    acc = MomentAccumulator(m, ce, mode="exact", hessian="ggn_residual", num_records=16)
    H = torch.zeros(acc.d, acc.d, dtype=torch.float64)
    G = torch.zeros_like(H)
    for a in range(0, 96, 48):
        batch = (x[a:a + 48], y[a:a + 48])
        acc.update(batch)
        xb, yb, _ = acc.program.prepare(batch)
        H += _batch_hessian(acc.program, xb, yb, acc.names, acc.offsets, acc.d)
        G += _batch_gauss_newton(acc.program, xb, yb, acc.names, acc.d)
    return acc, H, G


@pytest.mark.parametrize("act, twice, skipped", [(nn.ReLU, False, True), (nn.Tanh, False, False),
                                                 (nn.ReLU, True, False)])
def test_the_residual_hessian_equals_the_exact_hessian(act, twice, skipped):
    """hessian="ggn_residual" sums J'LJ (per-record output Jacobians) and the residual term's
    columns (Hessian-vector products of sum_i e_i . o_i): their sum is the batch Hessian of the
    summed loss (_batch_hessian, forward-over-reverse of the loss itself), to 1e-10 of its
    largest entry (float64 rounding ~1e-14; the Gauss-Newton part alone is off by O(1) there).
    ReLU: the largest module's (c2) residual block is zero and skipped; tanh, or c2 applied
    twice: not zero (measured on the first batch), every column computed, still exact."""
    x, y = _cnn_data(96, classes=3, seed=1)
    acc, H, G = _residual_and_batch_hessians(_trained(_TinyCNN(act, twice), x, y, steps=10), x, y)
    scale = float(H.abs().max())
    assert float((acc.state["H_sum"] - H).abs().max()) <= 1e-10 * scale
    assert float((G - H).abs().max()) > 1e-3 * scale  # the residual term matters here
    est = acc.finalize()
    assert est.hessian == "ggn_residual"
    assert (est.diagnostics["residual_skipped_block"] == ["c2.weight", "c2.bias"]) is skipped
    assert est.diagnostics["residual_columns"] == (acc.d - 76 if skipped else acc.d)
    assert ("not zero" in est.reason) is not skipped


class _TanhFirstCNN(nn.Module):
    """111 weights, 3 classes: a functional tanh after the first convolution, so the outputs are
    affine in c2's (the largest module) and the head's weights but not in c1's."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        return self.head(torch.relu(self.c2(h)).mean((2, 3)))


def test_the_residual_keeps_the_own_block_of_a_module_not_found_zero():
    """cn29: batch_residual leaves a module's own rows out of its pass where the first batch finds
    its own residual block zero (as gn28 did for the largest module). c1 is followed by a tanh: its
    block is not zero (ratio O(1)) and must be kept; c2 (skipped, the largest) and the head are
    zero. H_sum equals the batch Hessians' sum to 1e-10 of its largest entry (float64 rounding
    ~1e-15), and the case discriminates: the residual's c1 block is above 1e-3 of that entry, so
    leaving it out would fail the bound (checked by forcing c1 into the zero blocks). Fails on
    the old code: no residual_zero_blocks diagnostics."""
    x, y = _cnn_data(96, classes=3, seed=2)
    acc, H, G = _residual_and_batch_hessians(_trained(_TanhFirstCNN(), x, y, steps=10), x, y)
    scale = float(H.abs().max())
    assert float((acc.state["H_sum"] - H).abs().max()) <= 1e-10 * scale
    c1 = torch.arange(*acc.offsets["c1.weight"])
    assert float((H - G)[c1][:, c1].abs().max()) > 1e-3 * scale  # c1's own residual block matters
    est = acc.finalize()
    assert est.diagnostics["residual_skipped_block"] == ["c2.weight", "c2.bias"]
    assert est.diagnostics["residual_zero_blocks"] == [["head.weight", "head.bias"]]
    assert est.diagnostics["residual_block_ratios"]["c1"] > 1e-3
    assert est.diagnostics["residual_block_ratios"]["head"] <= 1e-8


def test_the_residual_hessian_on_a_linear_convolution_is_the_gauss_newton_one():
    """A model linear in its weights (Conv1d + a fixed mean, least squares at its minimum) has
    H = J'LJ: the residual term is zero, and hessian="ggn_residual" gives the exact-Hessian
    sandwich's and the Gauss-Newton sandwich's figures to 1e-8 relative (float64 rounding)."""
    x, y = _ar1_conv_data()
    m = _fit_linear_conv(x, y)
    dl = DataLoader(TensorDataset(x, y), batch_size=100)
    kw = dict(uncertainty_draws=0, num_records=32, estimation="exact")
    res = ml.assess(m, ["rtn_int4"], dl, mse, hessian="ggn_residual", **kw)
    ggn = ml.assess(m, ["rtn_int4"], dl, mse, hessian="ggn", **kw)
    ref = ml.assess(m, ["rtn_int4"], dl, mse, **kw)
    assert res.estimation["hessian"] == "ggn_residual"
    for other in (ggn, ref):
        assert res.schemes["rtn_int4"].leakage == pytest.approx(other.schemes["rtn_int4"].leakage, rel=1e-8)
        assert res.baseline_leakage == pytest.approx(other.baseline_leakage, rel=1e-8)
    with pytest.raises(ValueError, match="use it with mode='exact'"):
        ml.assess(m, ["rtn_int4"], dl, mse, estimation="diagonal", hessian="ggn_residual", uncertainty_draws=0)


def test_a_metric_keeps_the_residual_hessian_through_pickling():
    """MISIndicator on the example CNN resolves "auto" on its first batch to the Gauss-Newton +
    residual exact sandwich, as assess does; an unpickled copy keeps that estimator (it used to be
    rebuilt without the output size "auto" weighed: the diagonal sandwich over exact-mode states)
    and finalizes to the same sigma (1e-12) after one more batch each."""
    import pickle

    x, y = _cnn_data(128)
    m = _trained(_ExampleCNN(), x, y, steps=5)
    met = ml.MISIndicator(m, ce, ["rtn_int4"], num_records=16, num_training_records=128)
    met.update(x[:64], y[:64])
    assert (met.accumulator.mode, met.accumulator.hessian) == ("exact", "ggn_residual")
    again = pickle.loads(pickle.dumps(met))
    assert (again.accumulator.mode, again.accumulator.hessian) == ("exact", "ggn_residual")
    assert again.accumulator.reason == met.accumulator.reason
    met.update(x[64:], y[64:])
    again.update(x[64:], y[64:])
    a, b = met.accumulator.finalize(met._states()), again.accumulator.finalize(again._states())
    assert a.diagnostics["residual_columns"] == b.diagnostics["residual_columns"] == 100
    for k in a.names:
        torch.testing.assert_close(a.sigma[k], b.sigma[k], rtol=1e-12, atol=0)


# -- nu44b: batches whose tensors have no common record dimension --------------------------------
class _ConcatGraphNet(nn.Module):
    """Sum over the atoms of each molecule (``index_add_`` on a PyG-style ``batch`` index), then a
    linear head: a model of concatenated graph batches."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, g):
        h = torch.tanh(self.embed(g["x"]))
        pooled = h.new_zeros(int(g["batch"].max()) + 1, h.shape[1]).index_add_(0, g["batch"], h)
        return self.head(pooled).squeeze(-1)


def _concat_graph_loader():
    """40 molecules of 2-4 atoms, batched 8 at a time as PyG would: atoms stacked, ``batch`` index."""
    g = torch.Generator().manual_seed(0)
    mols = [(torch.randn(int(k), 3, generator=g), torch.randn((), generator=g))
            for k in torch.randint(2, 5, (40,), generator=g)]

    def collate(items):
        batch = torch.cat([torch.full((x.shape[0],), i) for i, (x, _) in enumerate(items)])
        return {"x": torch.cat([x for x, _ in items]), "batch": batch}, torch.stack([y for _, y in items])

    return DataLoader(mols, batch_size=8, collate_fn=collate)


def mse_concat(o, t):
    return 0.5 * (o - t) ** 2


def test_a_batch_without_a_common_record_dimension_is_named_before_anything_runs(tmp_path):
    # nu44b: concatenated (PyG-style) graph batches hold no record dimension (x [atoms, F], batch
    # [atoms], targets [B]); assess blamed the loss ("must return per-sample losses of shape [B] =
    # [25], got [8]"), the callback failed inside the user's forward. Each front end now names the
    # layout with every tensor's shape, before the estimation (or training) starts.
    import pytorch_lightning as pl

    from mis_lightning import MISCallback

    model, loader = _ConcatGraphNet(), _concat_graph_loader()
    msg = (r"the batch's tensors do not share a first \(record\) dimension: inputs\['x'\] \[\d+, 3\], "
           r"inputs\['batch'\] \[\d+\], targets \[8\]\. Record i must be row i of every tensor")
    for estimation in ("exact", "diagonal"):
        with pytest.raises(ValueError, match=r"_ConcatGraphNet's training batches: " + msg):
            ml.assess(model, ["rtn_int8"], loader, mse_concat, estimation=estimation, uncertainty_draws=0)
    inputs, targets = next(iter(loader))
    with pytest.raises(ValueError, match=msg):
        ml.MISIndicator(model, mse_concat, ["rtn_int8"]).update(inputs, targets)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _ConcatGraphNet()

        def forward(self, g):
            return self.net(g)

        def training_step(self, batch, batch_idx):
            return mse_concat(self(batch[0]), batch[1]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[MISCallback(["rtn_int8"], loss_fn=mse_concat, uncertainty_draws=0)])
    with pytest.raises(ValueError, match=r"MISCallback: the first training batch: " + msg):
        trainer.fit(Module(), loader)
    assert trainer.global_step == 0  # before the first optimizer step


def _multitask_with_missing_labels():
    """A 3-task logistic model and 60 records, 30% of their labels missing (NaN)."""
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    X = torch.randn(60, 4)
    y = (torch.rand(60, 3) < 0.4).float()
    y[torch.rand(60, 3) < 0.3] = float("nan")
    return m, DataLoader(TensorDataset(X, y), batch_size=30)


def test_a_loss_normalised_over_the_batch_is_refused_with_the_per_record_cure():
    # nu44b: a multi-task loss masked for missing labels and divided by the batch's count of
    # observed labels (the usual training loss) mixes the records; the refusal named only the
    # broadcasting cause. It now names this one and the per-record form.
    m, dl = _multitask_with_missing_labels()

    def over_the_batch(o, t):
        seen = ~t.isnan()
        loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), reduction="none")
        return torch.where(seen, loss, 0.0).sum(-1) * len(t) / seen.sum()

    def per_record(o, t):
        seen = ~t.isnan()
        loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), reduction="none")
        return torch.where(seen, loss, 0.0).sum(-1) / seen.sum(-1).clamp_min(1)

    with pytest.raises(ValueError, match=r"over_the_batch' .* is not per-sample: .* Or by a normalisation over the "
                                         r"batch \(dividing by the batch's count of observed labels"):
        ml.assess(m, ["rtn_int8"], dl, over_the_batch, uncertainty_draws=0)
    ml.assess(m, ["rtn_int8"], dl, per_record, uncertainty_draws=0, weight_decay=1e-2)


def test_a_loss_with_finite_values_but_nan_gradients_is_named_on_the_first_batch():
    # nu44b: missing labels (NaN) masked after the loss, torch.where(seen, bce(o, t), 0): finite
    # losses, NaN gradients (0 x NaN). The exact sandwich failed in linalg.eigh ("ill-conditioned"),
    # the diagonal one said no record's gradient differs from the others'; the callback trained
    # first. Now every front end names the loss and the cure on the first batch.
    m, dl = _multitask_with_missing_labels()

    def masked_after(o, t):
        seen = ~t.isnan()
        loss = F.binary_cross_entropy_with_logits(o, t, reduction="none")
        return torch.where(seen, loss, 0.0).sum(-1) / seen.sum(-1).clamp_min(1)

    def masked_before(o, t):
        seen = ~t.isnan()
        loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), reduction="none")
        return torch.where(seen, loss, 0.0).sum(-1) / seen.sum(-1).clamp_min(1)

    msg = (r"loss_fn '.*masked_after' \(model outputs \[30, 3\], targets \[30, 3\]\) gives finite losses but "
           r"non-finite gradients \(NaN or inf\) in weight, bias \(first: record \d+\).*replace the missing targets")
    for estimation in ("exact", "diagonal"):
        with pytest.raises(ValueError, match=msg):
            ml.assess(m, ["rtn_int8"], dl, masked_after, estimation=estimation, uncertainty_draws=0, weight_decay=1e-2)
    with pytest.raises(ValueError, match=msg):
        ml.MISIndicator(m, masked_after, ["rtn_int8"]).update(*next(iter(dl)))
    ml.assess(m, ["rtn_int8"], dl, masked_before, uncertainty_draws=0, weight_decay=1e-2)


def _per_record_masked(o, t):
    """Per-record masked mean of the observed labels' BCE (0 for a record with none observed)."""
    seen = ~t.isnan()
    loss = F.binary_cross_entropy_with_logits(o, t.nan_to_num(), reduction="none")
    return torch.where(seen, loss, 0.0).sum(-1) / seen.sum(-1).clamp_min(1)


class _WeightedRecords(TensorDataset):
    """Records ``(x, (y, w))``: targets with a sample weight."""

    def __getitem__(self, i):
        x, y, w = super().__getitem__(i)
        return x, (y, w)


def _assess_equals_members_alone(model, X, y, void, loss, lam, kw, w=None):
    """Assess ``(X, y)`` (targets ``(y, w)`` where sample weights ``w`` are given) with decay
    ``lam`` and ``X[~void]`` alone with ``lam N / n`` (the same objective), both estimators:
    equal ``n``, leakage and d_eff (1e-9 relative: float64 sums in another order) and one
    warning counting the left-out records. Returns the full reports."""
    N, n = len(y), int((~void).sum())

    def data(rows):
        return TensorDataset(X[rows], y[rows]) if w is None else _WeightedRecords(X[rows], y[rows], w[rows])

    out = []
    for estimation in ("exact", "diagonal"):
        # one batch each: the diagonal estimator reads the loss's directions per record on the first
        full = ml.assess(model, ["none", "rtn_int4"], DataLoader(data(slice(None)), batch_size=N), loss,
                         weight_decay=lam, estimation=estimation, **kw)
        ref = ml.assess(model, ["none", "rtn_int4"], DataLoader(data(~void), batch_size=N),
                        loss, weight_decay=lam * N / n, estimation=estimation, **kw)
        assert full.n == ref.n == n
        for k in ("none", "rtn_int4"):
            assert full.schemes[k].leakage == pytest.approx(ref.schemes[k].leakage, rel=1e-9)
            assert full.schemes[k].d_eff == pytest.approx(ref.schemes[k].d_eff, rel=1e-9)
        note = [w for w in full.warnings if "have every target missing" in w]
        assert len(note) == 1 and note[0].startswith(f"{N - n} of the {N} training records read"), full.warnings
        out.append((note[0], full))
    return out


def test_records_with_every_label_missing_are_not_members():
    # sm45 (nu44b's molecules): a record whose every label is missing has loss 0 whatever the
    # weights: training does not see it. Counted in n, its zero leakage lowered the average (here
    # 0.0618 -> 0.0859 once left out with 30% such records: docs/benchmarks.md "sm45").
    # Left out of n, with the weight decay scaled by N / n (the same objective), every figure
    # equals that of the labelled records alone to rounding (tolerance 1e-9 relative: float64
    # sums in another order); the report says how many were left out. Fails on the old code
    # (n = 60 and the headline 25% lower).
    m, dl = _multitask_with_missing_labels()
    X, y = dl.dataset.tensors
    y = y.clone()
    y[::4] = float("nan")  # 15 of the 60 records: every label missing
    void = y.isnan().all(1)
    lam, N, n = 1e-2, len(y), int((~void).sum())
    kw = dict(uncertainty_draws=0, num_records=64)
    for note, full in _assess_equals_members_alone(m, X, y, void, _per_record_masked, lam, kw):
        assert f"n = {n}" in note, full.warnings
        assert full.estimation["weight_decay"] == lam  # as told
    # the Metric (the callback's pass) reads the same: the batch with no label at all too
    metric = ml.MISIndicator(m, _per_record_masked, ["rtn_int4"], estimation="diagonal", weight_decay=lam,
                             num_training_records=N, **kw)
    for a in range(0, N, 16):
        metric.update(X[a:a + 16], y[a:a + 16])
    metric.update(X[:3], torch.full((3, 3), float("nan")))  # 3 more records, none labelled
    metric.compute()
    assert metric.report.n == n
    assert any(w.startswith(f"{N - n + 3} of the {N + 3} training records") for w in metric.report.warnings)
    # an imputing loss (NaN read as 0.5, unmasked) sees them: they stay members
    imputing = ml.assess(m, ["rtn_int4"], DataLoader(TensorDataset(X, y), batch_size=16),
                         lambda o, t: F.binary_cross_entropy_with_logits(o, t.nan_to_num(0.5), reduction="none").mean(-1),
                         weight_decay=lam, **kw)
    assert imputing.n == N and not any("every target missing" in w for w in imputing.warnings)


def test_records_without_labels_under_an_imputing_loss_flat_at_zero_stay_members():
    # rv45: sm45's rule read a record with every target NaN, loss exactly 0 and a zero gradient as
    # one the loss masks; a loss that imputes the missing labels is also exactly 0 and flat there
    # when the record sits past a hinge's margin, yet training sees it (a member). Now the loss must
    # also be 0 at outputs far from the model's. Fails on sm45's rule (n = 59, 5 records "without
    # loss"); the masking loss on the same records still leaves them out (n = 59).
    from mis_lightning.assess import run_estimation
    from mis_lightning.config import EstimationConfig

    torch.manual_seed(0)
    X = torch.randn(64, 3, dtype=torch.float64)
    y = torch.sign(X[:, :1])
    m = nn.Linear(3, 1).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[5.0, 0.0, 0.0]], dtype=torch.float64))
        m.bias.zero_()
    past = ((m(X) * y).squeeze(1) >= 1) & (y[:, 0] > 0)
    y[past.nonzero().squeeze(1)[:5]] = float("nan")   # imputed +1: hinge 0 and flat there

    def imputing(o, t):
        return F.relu(1 - o * torch.where(t.isnan(), torch.ones_like(t), t)).sum(-1)

    def masking(o, t):
        return torch.where(t.isnan(), 0.0, F.relu(1 - o * t.nan_to_num())).sum(-1)

    dl = DataLoader(TensorDataset(X, y), batch_size=16)
    est = run_estimation(m, dl, imputing, EstimationConfig(weight_decay=1e-2, mode="exact"))
    assert est.n == 64 and "records_without_loss" not in est.diagnostics
    est = run_estimation(m, dl, masking, EstimationConfig(weight_decay=1e-2, mode="exact"))
    assert est.n == 59 and est.diagnostics["records_without_loss"]["count"] == 5


def test_records_whose_every_label_is_an_ignore_index_are_left_out_as_the_nan_ones():
    # vb45: labels marked missing by cross_entropy's ignore_index (-100) on integer targets give a
    # loss of 0 at every output and a zero gradient, as the NaN case: the records are left out of n
    # with the decay scaled by N / n, and every figure equals that of the kept records alone
    # (tolerance 1e-9 relative: float64 sums in another order). A record with one of its two
    # positions labelled stays. Fails before (n = 60, integer targets never read).
    torch.manual_seed(0)
    m = nn.Linear(4, 6)  # 3 classes at 2 positions: outputs [B, 3, 2]
    X = torch.randn(60, 4)
    y = torch.randint(0, 3, (60, 2))
    y[::4] = -100          # 15 records: every label ignored
    y[1::8, 0] = -100      # partly ignored: members

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = m

        def forward(self, x):
            return self.l(x).reshape(-1, 3, 2)

    net = Net()

    def ce(o, t):
        return F.cross_entropy(o, t, ignore_index=-100, reduction="none").sum(-1)

    void = (y == -100).all(1)
    lam, n = 1e-2, int((~void).sum())
    kw = dict(uncertainty_draws=0, num_records=64)
    assert n == 45
    _assess_equals_members_alone(net, X, y, void, ce, lam, kw)
    # a multi-class hinge that imputes class 0 for an ignored label, every record far past its
    # margin: loss 0 and flat at theta-hat, yet trained on (members); one far output breaks the
    # margin o_0 - o_j (the probes sum to -6 o). Fails without the far outputs (n = 0).
    from mis_lightning.assess import run_estimation
    from mis_lightning.config import EstimationConfig

    def imputing(o, t):  # multi_margin_loss written out (its backward has no derivative)
        own = o.gather(1, t.clamp_min(0).unsqueeze(1))
        return (F.relu(1 - own + o).sum(1) - 1).sum(-1)  # the own class's term is relu(1) = 1

    with torch.no_grad():
        m.bias.zero_()
        m.bias[:2] = 100.0  # class 0 at both positions
    y_ign = torch.full_like(y, -100)
    assert bool((imputing(net(X), y_ign) == 0).all())
    est = run_estimation(net, DataLoader(TensorDataset(X, y_ign), batch_size=30), imputing,
                         EstimationConfig(weight_decay=1e-2, mode="exact"))
    assert est.n == 60 and "records_without_loss" not in est.diagnostics


def test_records_of_sample_weight_zero_are_left_out_as_the_unlabelled_ones():
    # vb45 checked by hand, vb46 tests: targets (y, w), loss w * cross_entropy (5 classes); a
    # record of weight 0 has loss 0 whatever the weights, as one whose every label is missing:
    # left out of n with the decay scaled by N / n, every figure equals that of the records of
    # nonzero weight alone (tolerance 1e-9 relative: float64 sums in another order). Fails with
    # the test off (n = 40, the figures lowered).
    torch.manual_seed(0)
    m = nn.Linear(4, 5).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (40,))
    w = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64).repeat(10)
    w[::5] = 0.0  # 8 records
    void = w == 0

    def weighted(o, t):
        return t[1] * F.cross_entropy(o, t[0], reduction="none")

    lam, n = 1e-2, int((~void).sum())
    assert n == 32
    kw = dict(uncertainty_draws=0, num_records=64)
    _assess_equals_members_alone(m, X, y, void, weighted, lam, kw, w=w)
    # float 0/1 labels: a record labelled 0 is a candidate too (an all-zero float among the targets)
    # but trained on; each candidate is decided on its own loss. Failed before vb46 (n = 40: one
    # trained candidate kept its batch's weight-0 records counted)
    b = nn.Linear(4, 1).double()

    def weighted_bce(o, t):
        return t[1] * F.binary_cross_entropy_with_logits(o.squeeze(-1), t[0], reduction="none")

    _assess_equals_members_alone(b, X, (y % 2).double(), void, weighted_bce, lam, kw, w=w)


class _MaskedHook(nn.Module):
    """A 3-task logistic model whose per-record masked loss comes from ``mis_per_sample_loss``
    (``calls`` calls of the model inside it)."""

    def __init__(self, calls: int = 1) -> None:
        super().__init__()
        self.l, self.calls = nn.Linear(4, 3), calls

    def forward(self, x):
        return self.l(x)

    def mis_per_sample_loss(self, batch):
        x, y = batch
        return _per_record_masked(sum(self(x) for _ in range(self.calls)) / self.calls, y)


def test_a_loss_hooks_records_with_every_label_missing_are_not_members():
    # vb46: the mis_per_sample_loss hook's batches were not read for records without a loss (sm45
    # counted them: the figures lowered by about their share). Now the hook's batch is, as
    # loss_fn's targets: with 15 of 60 records unlabelled the Metric through the hook reads every
    # figure of the labelled records alone with the decay x N / n (tolerance 1e-9 relative: float64
    # sums in another order), both estimators. Fails before (n = 60). A hook calling the model
    # twice cannot be tested at far outputs: the records stay counted, with a warning.
    m, dl = _multitask_with_missing_labels()
    X, y = dl.dataset.tensors
    y = y.clone()
    y[::4] = float("nan")
    void = y.isnan().all(1)
    lam, N, n = 1e-2, len(y), int((~void).sum())
    hooked = _MaskedHook()
    hooked.l.load_state_dict(m.state_dict())
    # the records are the subject: the independent-coordinate form (skips the correlated form's ~1 s a compute)
    kw = dict(uncertainty_draws=0, num_records=64, covariance="independent")
    for estimation in ("exact", "diagonal"):
        got = []
        for rows, wd in ((slice(None), lam), (~void, lam * N / n)):
            metric = ml.MISIndicator(hooked, None, ["rtn_int4"], estimation=estimation, weight_decay=wd,
                                     num_training_records=N, **kw)
            metric.update((X[rows], y[rows]))
            metric.compute()
            got.append(metric.report)
        full, ref = got
        assert full.n == ref.n == n
        assert full.schemes["rtn_int4"].leakage == pytest.approx(ref.schemes["rtn_int4"].leakage, rel=1e-9)
        assert full.baseline_leakage == pytest.approx(ref.baseline_leakage, rel=1e-9)
        assert any(w.startswith(f"{N - n} of the {N} training records read") for w in full.warnings)
    twice = _MaskedHook(calls=2)
    twice.l.load_state_dict(m.state_dict())
    metric = ml.MISIndicator(twice, None, ["rtn_int4"], estimation="diagonal", weight_decay=lam, **kw)
    with pytest.warns(UserWarning, match=r"could not be tested for a loss that does not depend on the weights"):
        metric.update((X, y))
    metric.compute()
    assert metric.report.n == N


def test_a_loss_on_probabilities_with_sample_weights_zero_keeps_them_counted_with_a_warning():
    # rv46: a sigmoid model's probabilities with weighted binary_cross_entropy (raises outside
    # [0, 1]): vb46's per-record void test reached the far outputs for the weight-0 records and the
    # loss's error stopped the estimation (both estimators; before vb46 the batch's label-0
    # candidates returned first). The far outputs cannot be read, so the records stay counted
    # (n = 40, as before vb46) and a warning says why. Fails before the fix (RuntimeError).
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid()).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = (torch.rand(40) < 0.5).double()
    w = torch.ones(40, dtype=torch.float64)
    w[::5] = 0.0

    def weighted(o, t):
        return t[1] * F.binary_cross_entropy(o.squeeze(-1), t[0], reduction="none")

    with pytest.warns(UserWarning, match=r"could not be tested at far outputs"):
        r = ml.assess(m, ["rtn_int4"], DataLoader(_WeightedRecords(X, y, w), batch_size=40), weighted,
                      weight_decay=1e-2, estimation="diagonal", uncertainty_draws=0, num_records=64,
                      covariance="independent")
    assert r.n == 40 and r.schemes["rtn_int4"].leakage > 0


class _ProbabilityHook(nn.Module):
    """A 3-task model of probabilities (sigmoid) whose masked per-record binary_cross_entropy comes
    from ``mis_per_sample_loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        return torch.sigmoid(self.l(x))

    def mis_per_sample_loss(self, batch):
        x, y = batch
        seen = ~y.isnan()
        loss = F.binary_cross_entropy(self(x), torch.where(seen, y, 0.0), reduction="none")
        return torch.where(seen, loss, 0.0).sum(-1) / seen.sum(-1).clamp_min(1)


def _hook_keeps_unlabelled_records_counted(hook: nn.Module, warning: str) -> None:
    """60 records, a quarter with every label NaN, through ``hook``'s ``mis_per_sample_loss``: the
    unlabelled records cannot be tested at the far outputs, so they stay counted (n = 60) with
    ``warning``."""
    torch.manual_seed(0)
    X = torch.randn(60, 4)
    y = (torch.rand(60, 3) < 0.4).float()
    y[::4] = float("nan")
    metric = ml.MISIndicator(hook, None, ["rtn_int4"], estimation="diagonal", weight_decay=1e-2,
                             uncertainty_draws=0, num_records=64, covariance="independent")
    with pytest.warns(UserWarning, match=warning):
        metric.update((X, y))
    metric.compute()
    assert metric.report.n == 60


def test_a_loss_hook_on_probabilities_keeps_unlabelled_records_counted_with_a_warning():
    # rv46: the hook's far outputs (vb46) are probabilities outside [0, 1], where the hook's
    # binary_cross_entropy raises: the estimation stopped (RuntimeError). Now the records stay
    # counted (n = 60, as before vb46) with the warning. Fails before the fix.
    _hook_keeps_unlabelled_records_counted(
        _ProbabilityHook(), r"could not be tested for a loss that does not depend on the weights")


def test_a_loss_not_finite_at_the_far_outputs_keeps_the_records_counted_with_a_warning():
    # rv46: a hand-written weighted log-loss on a sigmoid's probabilities is NaN at the far outputs
    # (log of a negative number; 0 x NaN for a weight 0): the records were counted silently (every
    # figure lowered by their share, no word). Now the same n (40) with the warning. Fails before
    # (no warning).
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid()).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.ones(40, dtype=torch.float64)
    w = torch.ones(40, dtype=torch.float64)
    w[::5] = 0.0

    def weighted(o, t):
        p = o.squeeze(-1)
        return -t[1] * (t[0] * p.log() + (1 - t[0]) * (1 - p).log())

    with pytest.warns(UserWarning, match=r"could not be tested at far outputs .*not finite"):
        r = ml.assess(m, ["rtn_int4"], DataLoader(_WeightedRecords(X, y, w), batch_size=40), weighted,
                      weight_decay=1e-2, estimation="diagonal", uncertainty_draws=0, num_records=64,
                      covariance="independent")
    assert r.n == 40


class _LogHook(_ProbabilityHook):
    """:class:`_ProbabilityHook` with a hand-written log-loss masked by a product (NaN at probabilities
    outside [0, 1], kept by the mask)."""

    def mis_per_sample_loss(self, batch):
        x, y = batch
        seen = ~y.isnan()
        t = torch.where(seen, y, 0.0)
        p = self(x)
        loss = -(t * p.log() + (1 - t) * (1 - p).log())
        return (loss * seen).sum(-1) / seen.sum(-1).clamp_min(1)  # (masked by a product: 0 x NaN = NaN)


def test_a_loss_hook_not_finite_at_the_far_outputs_keeps_the_records_counted_with_a_warning():
    # rv46: NaN at the far outputs read as "not 0": the unlabelled records stayed counted silently.
    # Now with the warning (n = 60). Fails before (no warning).
    _hook_keeps_unlabelled_records_counted(_LogHook(), r"could not be tested .*not finite")
