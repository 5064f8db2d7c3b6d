"""The per-layer estimation computes per-sample gradients from ONE forward and one backward
pass per batch for all parameter tensors (layer taps), and the scoring's per-parameter
power sums reuse the stored records' taps instead of passing through the model again. Every
number equals the per-record torch.func path (float64: the two differ by summation order,
~1e-13; tolerance 1e-6 relative as the issue states)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.estimation.estimate import MomentAccumulator, choose_estimator, reused_layers
from mis_lightning.estimation.linear_factors import LayerProgram


def _ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.f(x))


class _TF(nn.Module):
    """Embedding + TransformerEncoderLayer (MHA, LayerNorm, dropout) + head; ``tied``: the
    output head is the embedding table itself (logits over the vocabulary)."""

    def __init__(self, tied: bool = False, dropout: float = 0.0, V: int = 7, D: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, batch_first=True, dropout=dropout)
        self.head = nn.Linear(D, V if tied else 3, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class Atoms(nn.Module):
    """A message-passing-like model: a Linear over the atoms of a record, d = 50."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: [B, atoms, 3]
        return self.head(torch.relu(self.embed(x)).sum(1))


def _data(kind: str, n: int = 40):
    g = torch.Generator().manual_seed(3)
    if kind == "cnn":
        return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    # few tokens over length 5: every record repeats tokens (rows touched several times)
    X = torch.randint(0, 4 if kind != "tied" else 7, (n, 5), generator=g)
    return X, torch.randint(0, 7 if kind == "tied" else 3, (n,), generator=g)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "cnn":
        m = _CNN().eval()
        with torch.no_grad():
            for bn in (m.f[1], m.f[5]):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
        return m
    if kind == "tied":
        return _TF(tied=True).eval()
    if kind == "dropout_train":
        return _TF(dropout=0.3).train()  # left in train mode by the user
    return _TF().eval()


def _run(model: nn.Module, X, Y, fast: bool, **kw):
    kw.setdefault("dtype", torch.float64)
    acc = MomentAccumulator(model, _ce, mode="diagonal", hessian="ggn", use_factors=fast, num_records=12, **kw)
    for b in DataLoader(TensorDataset(X, Y), batch_size=16):
        acc.update(b)
    return acc, acc.finalize()


@pytest.mark.parametrize("kind", ["cnn", "transformer", "tied", "dropout_train"])
def test_one_pass_statistics_and_power_sums_equal_per_record_torch_func(kind, monkeypatch):
    # the per-layer path's K-FAC correction of convolutions off: the torch.func path has none (kc32)
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_CORRECTION", False)
    model = _model(kind)
    X, Y = _data(kind)
    d = sum(p.numel() for p in model.parameters())
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    budget = 12 * d - 1  # the records, not their gradients, are stored: scoring recomputes them
    (fa, ea), (ta, eb) = _run(model, X, Y, True, budget=budget), _run(model, X, Y, False, budget=budget)
    assert isinstance(fa.factored, LayerProgram) and ta.factored is None
    assert ea.influence is None and eb.influence is None
    for k in ("g_sum", "g2_sum", "h_sum"):
        torch.testing.assert_close(fa.state[k], ta.state[k], rtol=1e-6, atol=1e-9 * float(ta.state[k].abs().max()))
    torch.testing.assert_close(fa.state["grad_norm_sq"], ta.state["grad_norm_sq"], rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(5)
    for n in eb.names:
        live = eb._v_diag[n] > 1e-20 * float(eb._v_diag[n].max())  # V = 0: 0/0 noise in both
        torch.testing.assert_close(ea.sigma[n][live], eb.sigma[n][live], rtol=1e-6, atol=0)
        numel = int(live.numel())
        cols = {p: torch.rand(numel, 3, generator=g, dtype=torch.float64) * live.unsqueeze(-1) for p in (2, 4)}
        got, want = ea.power_sums(n, cols), eb.power_sums(n, cols)
        for p in (2, 4):
            torch.testing.assert_close(got[p], want[p], rtol=1e-6, atol=1e-9 * float(want[p].abs().max()))
    # the model the user owns is untouched, train flags included (the estimation runs in eval mode)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_power_sums_of_float32_per_sample_gradients_match_float64(kind):
    """Float32 per-sample gradients (the fast programs' dtype above 1e4 weights): the scoring's
    power sums are formed in record blocks with the p = 2 product in float32. Against the
    float64 program on the same records: within 1e-4 relative (the float32 gradients' own
    rounding, ~1e-6, and the float32 product's, ~5e-7; a wrong block or index is O(1))."""
    model = _model(kind)
    X, Y = _data(kind, n=80)
    d = sum(p.numel() for p in model.parameters())
    (_, e32), (_, e64) = (_run(model, X, Y, True, budget=12 * d - 1, dtype=dt) for dt in (torch.float32, torch.float64))
    g = torch.Generator().manual_seed(7)
    for n in e64.names:
        live = e64._v_diag[n] > 1e-6 * float(e64._v_diag[n].max())  # rounding-noise V: no figure
        cols = {p: torch.rand(int(live.numel()), 5, generator=g, dtype=torch.float64) * live.unsqueeze(-1)
                for p in (2, 4)}
        got, want = e32.power_sums(n, cols), e64.power_sums(n, cols)
        for p in (2, 4):
            torch.testing.assert_close(got[p], want[p], rtol=1e-4, atol=1e-6 * float(want[p].abs().max()))


def test_tied_embedding_and_head_gradients_add_up():
    """Tied weights: the per-sample gradient of the shared table is the sum of both uses
    (before squaring); the fast path takes the tied model instead of falling back."""
    model = _model("tied")
    X, Y = _data("tied", 6)
    prog = LayerProgram(model, _ce, ["emb.weight"] + [n for n, _ in model.named_parameters() if n != "emb.weight"],
                        torch.float64)
    assert set(prog.slots["emb"].values()) == {"emb.weight"} and prog.slots["head"] == {"weight": "emb.weight"}
    got = prog.per_sample_grads(X, Y)["emb.weight"]
    from mis_lightning.estimation.per_sample import LossProgram
    ref = LossProgram(model, _ce, prog.names, dtype=torch.float64).per_sample_grads(X, Y)["emb.weight"]
    torch.testing.assert_close(got, ref.reshape(6, -1), rtol=1e-10, atol=1e-12)
    # both uses matter: the embedding's use alone differs from the sum by O(1)
    only_emb = LayerProgram(model, _ce, prog.names, torch.float64)
    del only_emb.slots["head"]
    assert float((only_emb.per_sample_grads(X, Y)["emb.weight"] - got).abs().max()) > 1e-3


def test_scoring_reuses_the_stored_records_taps_one_forward_for_all_parameters():
    """Old code: one forward/backward pass over the stored records per parameter (group) in
    scoring; now one per record block, whatever the number of parameter tensors."""
    torch.manual_seed(0)
    model = _TF(V=60).eval()  # d = 1,136 per record > its taps (776): the taps are kept
    X, Y = _data("transformer")
    d = sum(p.numel() for p in model.parameters())
    acc, est = _run(model, X, Y, True, budget=12 * d - 1)
    calls = []
    acc.factored.model.register_forward_hook(lambda *a: calls.append(1))
    cols = {2: torch.ones(1, 2, dtype=torch.float64)}
    for n in est.names:
        est.power_sums(n, {2: cols[2].expand(est.offsets[n][1] - est.offsets[n][0], 2)})
    assert len(est.names) == 14 and len(calls) == 1


def test_auto_estimator_counts_a_linear_over_atoms_as_weight_reuse(monkeypatch):
    """A Linear applied to [batch, atoms, features] reuses its weights over the atoms: the
    exact-Hessian rule (one use per record) does not hold, "auto" takes Gauss-Newton. (Its
    per-layer path gives the all-Linear classifier the K-FAC correction since kf33, which the
    torch.func path it is compared with has not: compared without it.)"""
    monkeypatch.setattr(importlib.import_module("mis_lightning.estimation.estimate"), "KFAC_CORRECTION", False)

    torch.manual_seed(0)
    m = Atoms().eval()
    X, Y = torch.randn(32, 5, 3), torch.randint(0, 2, (32,))
    assert reused_layers(m, X) == ["Linear layers on [B, 5, 3] (embed)"]
    assert reused_layers(m, X[:, :1]) == []  # one atom per record: no reuse
    assert reused_layers(m, X, ["head.weight", "head.bias"]) == []  # a frozen encoder: the head is used once
    assert choose_estimator(m, 50, n=32)[:2] == ("exact", "exact")  # the layer types alone
    # reuse seen, and a forward too costly for d passes of it: the diagonal sandwich
    assert choose_estimator(m, 50, n=10**6, reused=["Linear layers on [B, 5, 3] (embed)"],
                            forward_floats=1e3)[:2] == ("diagonal", "ggn")
    # ... cheap: still exact (the diagonal sigma ignores the correlation reuse creates)
    assert choose_estimator(m, 50, n=32, reused=["Linear layers on [B, 5, 3] (embed)"],
                            forward_floats=1e3)[:2] == ("exact", "exact")
    acc = MomentAccumulator(m, _ce, num_records=8, selection="hash", budget=2**27, n_hint=32)
    assert acc.mode == "exact"
    acc.update((X, Y))
    assert acc.mode == "exact" and "Linear layers on [B, 5, 3] (embed) reuse their weights, but the exact sandwich is cheap" in acc.reason
    acc = MomentAccumulator(m, _ce, num_records=8, selection="hash", n_hint=10**7)
    acc.update((X, Y))
    assert (acc.mode, acc.hessian) == ("diagonal", "ggn")
    assert acc.reason.startswith("auto: Linear layers on [B, 5, 3] (embed) make the exact Hessian costly "
                                 "(d = 50 passes of their forward, n d x forward floats = ")
    assert isinstance(acc.factored, LayerProgram)
    est = acc.finalize()
    ref = MomentAccumulator(m, _ce, num_records=8, selection="hash", mode="diagonal", hessian="ggn",
                            use_factors=False)
    ref.update((X, Y))
    want = ref.finalize()
    for n in est.names:
        torch.testing.assert_close(est.sigma[n], want.sigma[n], rtol=1e-6, atol=0)
    # one atom per record (one use per record) keeps the exact sandwich
    flat = MomentAccumulator(m, _ce, num_records=8)
    flat.update((X[:, :1], Y))
    assert flat.mode == "exact"


class _Twice(nn.Module):
    """A Linear called twice per forward (tw51's case) after a convolution."""

    def __init__(self):
        super().__init__()
        self.conv, self.sq = nn.Conv1d(1, 3, 2), nn.Linear(3, 3)

    def forward(self, x):
        return self.sq(torch.tanh(self.sq(self.conv(x).mean(-1))))


def test_the_estimators_reasons_name_layers_once():
    """tw51's "auto Hessian: layers called 2x per forward (sq) layers make the exact Hessian costly":
    each template appended "layers" to phrases that already said it. Every entry is now a noun phrase
    naming the layers (the layer types' "Conv1d layers", reused_layers' own), joined by "and", and
    each reason says "layers" once per entry."""
    m = _Twice().eval()
    X = torch.randn(8, 1, 5)
    reused = reused_layers(m, X)
    assert reused == ["layers called 2x per forward (sq)"]
    d = sum(p.numel() for p in m.parameters())
    reasons = [choose_estimator(m, d, "diagonal", n=32, reused=reused, forward_floats=1.0)[2],
               choose_estimator(m, d, n=32, reused=reused, forward_floats=1.0)[2],
               choose_estimator(m, d, n=10**6, reused=reused, forward_floats=1e3)[2]]
    assert reasons[0] == ("auto Hessian: Conv1d layers and layers called 2x per forward (sq) make the exact "
                          f"Hessian costly (d = {d} passes of their forward)")
    assert reasons[1].startswith(f"auto: d = {d} weights; Conv1d layers and layers called 2x per forward (sq) "
                                 "reuse their weights, but the exact sandwich is cheap")
    assert reasons[2].startswith("auto: Conv1d layers and layers called 2x per forward (sq) make the exact Hessian "
                                 "costly (d = ")
    for why in reasons:  # "layers" once per entry, never after a closing parenthesis
        assert why.count("layers") == 2 and ") layers" not in why


def test_metric_front_end_takes_the_same_choice_and_keeps_it_through_pickling():
    """MISIndicator (and the callback, which feeds it) resolve "auto" on the first batch the
    same way; an unpickled metric keeps the resolved estimator for its accumulated states."""
    import pickle

    from mis_lightning import MISIndicator

    torch.manual_seed(0)
    m = Atoms().eval()
    X, Y = torch.randn(32, 5, 3), torch.randint(0, 2, (32,))
    ref = MomentAccumulator(m, _ce, num_records=8, n_hint=32)
    ref.update((X[:16], Y[:16]))
    met = MISIndicator(m, _ce, ["int8_weight_only"], num_records=8, num_training_records=32)
    met.update(X[:16], Y[:16])
    # reuse seen, and cheap (32 records x 50 weights x this forward): exact, as assess
    assert (met.accumulator.mode, met.accumulator.hessian) == (ref.mode, ref.hessian) == ("exact", "exact")
    # n unknown (10^4 records assumed): the same model's exact pass would cost too much
    blind = MISIndicator(m, _ce, ["int8_weight_only"], num_records=8)
    blind.update(X[:16], Y[:16])
    assert (blind.accumulator.mode, blind.accumulator.hessian) == ("diagonal", "ggn")
    assert "n d x forward floats" in blind.accumulator.reason
    again = pickle.loads(pickle.dumps(met))
    assert (again.accumulator.mode, again.accumulator.hessian) == ("exact", "exact")
    assert again.accumulator.reason == met.accumulator.reason
    again.update(X[16:], Y[16:])
    met.update(X[16:], Y[16:])
    a, b = met.accumulator.finalize(met._states()), again.accumulator.finalize(again._states())
    for n in a.names:
        torch.testing.assert_close(a.sigma[n], b.sigma[n], rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss", ["ce", "label_smoothing", "class_weight_later", "temperature"])
def test_exact_gauss_newton_closed_form_only_for_softmax_cross_entropy(loss):
    """Softmax cross-entropy's Hessian in the outputs is taken in closed form (diag(p) - p p')
    once the first batch has checked the loss's own; a loss that differs from it (label
    smoothing: same Hessian, another gradient; class weights met only in a later batch; a
    temperature) must still give the torch.func path's Gauss-Newton diagonal to 1e-6."""
    w = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)
    fns = {
        "ce": _ce,
        "label_smoothing": lambda o, y: F.cross_entropy(o, y, reduction="none", label_smoothing=0.1),
        "class_weight_later": lambda o, y: F.cross_entropy(o, y, weight=w.to(o.dtype), reduction="none"),
        "temperature": lambda o, y: F.cross_entropy(o / 2.0, y, reduction="none"),
    }
    model = _model("transformer").double()
    X, Y = _data("transformer")
    Y[:16] = Y[:16].clamp(max=1)  # the first batch meets weight-1 classes only
    Y[16] = 2
    runs = []
    for fast in (True, False):
        acc = MomentAccumulator(model, fns[loss], mode="diagonal", hessian="ggn", use_factors=fast, num_records=12,
                                dtype=torch.float64)
        for b in DataLoader(TensorDataset(X, Y), batch_size=16):
            acc.update(b)
        runs.append(acc)
    fa, ta = runs
    assert isinstance(fa.factored, LayerProgram) and ta.factored is None
    torch.testing.assert_close(fa.state["h_sum"], ta.state["h_sum"], rtol=1e-6,
                               atol=1e-9 * float(ta.state["h_sum"].abs().max()))
    # softmax cross-entropy takes the closed form after its first batch; the others never do
    assert fa.factored._ce_hessian_checked is (loss in ("ce", "class_weight_later"))


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_exact_gauss_newton_takes_the_loss_gradient_as_one_direction(classes, monkeypatch):
    """Softmax cross-entropy: ``L = diag(p) - p p' = w e e' + (rank C - 2 rest)`` with
    ``e = dl/do`` and ``w = p_y / (1 - p_y)``, so the per-sample gradients' own squares carry
    one direction and only ``C - 2`` more backward passes run per batch. The diagonal equals
    the torch.func path's to 1e-6 relative (float64: summation order only), tied embedding
    head (sparse and dense uses of one table) and near-certain records (logits scaled by 30:
    ``1 - p_y`` down to ~1e-13, where ``w`` is large and ``e`` small) included."""
    V = 7

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tf = _TF(tied=True, V=V)
            self.out = nn.Linear(V, classes)

        def forward(self, x):
            return 30.0 * self.out(self.tf(x)) if classes == 7 else self.out(self.tf(x))

    torch.manual_seed(1)
    model = Head().double().eval()
    g = torch.Generator().manual_seed(5)
    X = torch.randint(0, V, (40, 5), generator=g)
    Y = torch.randint(0, classes, (40,), generator=g)
    passes = []
    orig = LayerProgram._add_squares
    monkeypatch.setattr(LayerProgram, "_add_squares", lambda self, *a, **k: (passes.append(1), orig(self, *a, **k))[1])
    fa, _ = _run(model, X, Y, fast=True)
    ta, _ = _run(model, X, Y, fast=False)
    assert isinstance(fa.factored, LayerProgram) and ta.factored is None
    # 3 batches (16, 16, 8 records); near-certain batches take the eigen-directions of L
    # (CE_BASE_WEIGHT_MAX) and drop those with no curvature
    assert len(passes) == 3 * (classes - 2) if classes < 7 else 0 < len(passes) <= 3 * (classes - 1)
    torch.testing.assert_close(fa.state["h_sum"], ta.state["h_sum"], rtol=1e-6,
                               atol=1e-9 * float(ta.state["h_sum"].abs().max()))
    if classes == 7:  # the near-certain regime was reached
        with torch.no_grad():
            p = torch.softmax(model(X), -1).gather(1, Y[:, None])
        assert float((1 - p).min()) < 1e-6


def test_exact_gauss_newton_of_near_certain_records_in_float32_is_finite(monkeypatch):
    """Logit gaps past ~100 make ``1 - p_y`` underflow in float32: the loss's own gradient
    ``e`` is 0 there while ``w = p_y / (1 - p_y)`` is infinite (from float64 logits), and
    ``0 * inf`` was a NaN curvature. Such batches take the eigen-directions of ``L``: the
    diagonal is finite and equals the path without the loss-gradient direction."""
    torch.manual_seed(2)
    model = _TF().eval()
    with torch.no_grad():
        model.head.weight.mul_(400.0)
    X, Y = _data("transformer")
    with torch.no_grad():
        Y = model(X).argmax(-1)  # the predicted labels: near-certain, gap > 100 for most
        top2 = model(X).topk(2, -1).values
    assert float((top2[:, 0] - top2[:, 1]).median()) > 100
    runs = []
    for split in (True, False):
        if not split:
            monkeypatch.setattr(LayerProgram, "_ce_directions", lambda self, *a: None)
        acc = MomentAccumulator(model, _ce, mode="diagonal", hessian="ggn", use_factors=True, num_records=12,
                                dtype=torch.float32)
        for b in DataLoader(TensorDataset(X, Y), batch_size=16):
            acc.update(b)
        assert isinstance(acc.factored, LayerProgram)
        runs.append(acc.state["h_sum"])
    assert bool(torch.isfinite(runs[0]).all())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6 * float(runs[1].abs().max()))


class _Attn(nn.Module):
    """One nn.MultiheadAttention called as self-attention (query, key and value one tensor),
    with key = value another tensor of the same length, or of another length (cross-attention)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(6, 8)
        self.mem = nn.Linear(8, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        m = self.mem(h[:, :3] if self.how == "cross" else h)
        if self.how == "self":
            o = self.att(m, m, m, need_weights=False)[0]
        else:
            o = self.att(h, m, m, need_weights=False)[0]
        return self.head(o.mean(1))


@pytest.mark.parametrize("how", ["self", "kv", "cross"])
def test_attention_in_proj_per_sample_gradients_self_and_cross(how):
    """Self-attention's in_proj per-sample gradients come from one batched GEMM of the q/k/v
    output gradients side by side (no stacked inputs); key/value another tensor (same or
    another length) keeps the per-projection products. Both equal torch.func's."""
    from mis_lightning.estimation.linear_factors import _prepare, _same_tensor
    from mis_lightning.estimation.per_sample import LossProgram

    torch.manual_seed(0)
    model = _Attn(how).eval()
    X, Y = torch.randint(0, 6, (5, 4)), torch.randint(0, 3, (5,))
    names = [n for n, _ in model.named_parameters()]
    prog = LayerProgram(model, _ce, names, torch.float64)
    taps = prog.record_taps(X, Y, 5)
    x_att = taps.x["att"]
    assert _same_tensor(x_att) == (how == "self")
    assert ("xs" in _prepare(prog._mods["att"], x_att, prog.slots["att"])) == (how == "kv")
    got = prog.grads_from_taps(taps, names)
    ref = LossProgram(model, _ce, names, dtype=torch.float64).per_sample_grads(X, Y)
    for n in names:
        torch.testing.assert_close(got[n], ref[n].reshape(5, -1), rtol=1e-10, atol=1e-12)
    # records selected by an index (the stored records' taps): still one tensor, the same gradients
    rows = torch.tensor([3, 0, 4])
    sel = taps.rows(rows)
    assert _same_tensor(sel.x["att"]) == (how == "self")
    got = prog.grads_from_taps(sel, names)
    for n in names:
        torch.testing.assert_close(got[n], ref[n].reshape(5, -1)[rows], rtol=1e-10, atol=1e-12)


def test_per_layer_iteration_gives_the_per_chunk_gradients():
    """``iter_grads(per_layer=True)`` (the estimation's squares and sums, formed layer by layer
    while in cache) yields the same per-sample gradients as the per-chunk dicts; a tied
    parameter keeps one dict per chunk (its uses are added before any square)."""
    for kind in ("transformer", "tied"):
        model = _model(kind)
        X, Y = _data(kind, 12)
        prog = LayerProgram(model, _ce, [n for n, _ in model.named_parameters()], torch.float64)
        taps = prog.record_taps(X, Y, 12)
        whole = {(a, c): g for a, c, g in prog.iter_grads(taps)}
        parts = list(prog.iter_grads(taps, per_layer=True))
        if kind == "tied":
            assert len(parts) == len(whole)
        else:
            assert len(parts) == len(whole) * len(prog.slots)
        for a, c, g in parts:
            for n, v in g.items():
                want = whole[(a, c)][n]
                if hasattr(v, "dense"):
                    v, want = v.dense(c - a), want.dense(c - a)
                assert torch.equal(v, want)
