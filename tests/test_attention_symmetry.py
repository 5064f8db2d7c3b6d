"""An attention head's query/key and value/output symmetries (nu49; method.md section 6, "When the
approximation holds"): within one head of ``nn.MultiheadAttention`` ``q -> A q, k -> A^-T k`` and
``v -> A v, W_o[:, head] -> W_o[:, head] A^-1`` leave every record's loss unchanged, and the
rotations (``A`` orthogonal) leave an L2 penalty unchanged too: flat directions of the penalised
objective. On a float32 fit the numerical rule of ``flat_directions`` did not resolve them (the
penalty's curvature along them sits near its cut) and the exact sandwich inverted rounding there:
``in_proj_weight``'s sigma up to 2.6x the reference (nu48). The estimator now reads them from the
model's structure (``symmetries.attention_head_tangents``).

The reference here is independent of the library: ``torch.func`` per-record gradients and Hessian
in float64 at the released float32 weights, the orbit's tangents from a forward-mode derivative of
the group action itself (``A = I + t X`` applied with ``torch.linalg.inv``, not the library's
closed form), the Hessian projected off them and inverted by an exact eigendecomposition.
"""

import copy
import importlib

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from mis_lightning.estimation import estimate as estimate_fn
from mis_lightning.estimation.symmetries import attention_head_tangents, attention_heads

N, E, HEADS, WD = 300, 4, 2, 1e-3


class Net(nn.Module):
    def __init__(self, batch_first: bool, bias: bool, bias_kv: bool, kdim: int | None) -> None:
        super().__init__()
        self.kdim = kdim
        self.att = nn.MultiheadAttention(E, HEADS, bias=bias, add_bias_kv=bias_kv, batch_first=batch_first,
                                         kdim=kdim, vdim=kdim)
        self.head = nn.Linear(E, 2)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 3, E)
        kv = h if self.kdim is None else torch.cat([h, h[..., :1]], -1)
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        out = self.att(h, kv, kv, need_weights=False)[0]
        # tanh: out_proj and head with only a mean between would make a linear bottleneck, whose
        # rotations are flat too (nu48's flat_directions finds some at this precision)
        return self.head(torch.tanh(out.mean(1 if self.batch_first else 0)))


def ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="none")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3 * E, generator=g)
    return x, (x[:, 0] - x[:, 5] + x[:, 10] + 0.7 * torch.randn(N, generator=g) > 0).long()


def _fit(m: nn.Module, x: torch.Tensor, y: torch.Tensor, wd: float) -> nn.Module:
    """Full-batch float32 L-BFGS to a minimum of ``mean CE + wd/2 |theta|^2`` (float32 precision:
    gradient norm ratio ~1e-5, the condition under which the numerical rule missed the heads)."""
    opt = torch.optim.LBFGS(m.parameters(), max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-15)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        obj = ce(m(x), y).mean() + wd / 2 * sum((p ** 2).sum() for p in m.parameters())
        obj.backward()
        return obj
    for _ in range(4):
        opt.step(closure)
    return m


def _action(p: dict, X: torch.Tensor, h: int, pair: str, m: nn.MultiheadAttention) -> dict:
    """The weights after ``A = I + X`` acts on head ``h`` (``"qk"``: queries by ``A``, keys by
    ``A^-T``; ``"vo"``: values by ``A``, out_proj's columns of the head by ``A^-1``)."""
    dh = m.head_dim
    A = torch.eye(dh, dtype=X.dtype) + X
    Ai = torch.linalg.inv(A)
    r = torch.arange(h * dh, (h + 1) * dh)
    p = dict(p)

    def rows(name: str, start: int, M: torch.Tensor) -> None:
        if name not in p:
            return
        w = p[name]
        flat = w.reshape(-1) if w.dim() == 3 else w  # bias_k / bias_v [1, 1, E]: the features
        idx = start + r
        p[name] = flat.index_copy(0, idx, M @ flat[idx]).reshape(w.shape)

    if pair == "qk":
        for name, third, M in (("att.in_proj_weight", 0, A), ("att.in_proj_weight", 1, Ai.T), ("att.in_proj_bias", 0, A),
                               ("att.in_proj_bias", 1, Ai.T), ("att.q_proj_weight", None, A),
                               ("att.k_proj_weight", None, Ai.T), ("att.bias_k", None, Ai.T)):
            rows(name, 0 if third is None else third * E, M)
    else:
        for name, third, M in (("att.in_proj_weight", 2, A), ("att.in_proj_bias", 2, A), ("att.v_proj_weight", None, A),
                               ("att.bias_v", None, A)):
            rows(name, 0 if third is None else third * E, M)
        out = p["att.out_proj.weight"]
        p["att.out_proj.weight"] = out.index_copy(1, r, out[:, r] @ Ai)
    return p


def _reference_tangents(model: Net, sel: dict, names: list[str], rotations: bool) -> torch.Tensor:
    """``[d, k]`` the group's tangents, by forward-mode derivative of :func:`_action` at ``t = 0``."""
    dh, cols = model.att.head_dim, []
    for h in range(HEADS):
        for pair in ("qk", "vo"):
            for a in range(dh):
                for c in range(dh):
                    if rotations and c <= a:
                        continue
                    X = torch.zeros(dh, dh, dtype=torch.float64)
                    X[a, c] = 1.0
                    if rotations:
                        X[c, a] = -1.0
                    _, tan = jvp(lambda s, X=X, h=h, pair=pair: _action(sel, s * X, h, pair, model.att),
                                 (torch.tensor(0.0, dtype=torch.float64),), (torch.tensor(1.0, dtype=torch.float64),))
                    cols.append(torch.cat([tan[k].reshape(-1) for k in names]))
    return torch.stack(cols, 1)


def _reference_sigma(model: Net, x: torch.Tensor, y: torch.Tensor, wd: float) -> tuple[torch.Tensor, int]:
    """The sandwich's sd of each weight, float64 by ``torch.func`` (``H^+ Cov(g) H^+``), on the
    identifiable part: the Hessian projected off the rotations' tangents (:func:`_reference_tangents`) along which the objective's curvature is below 1e-4 of its largest
    (the heads this fit keeps alive; a head the penalty holds at 0 has no orbit), and the number of
    such directions."""
    md = copy.deepcopy(model).double()
    names = [k for k, _ in md.named_parameters()]
    sel = {k: v.detach() for k, v in md.named_parameters()}
    xd = x.double()

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return ce(functional_call(md, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))[0]

    with sdpa_kernel(SDPBackend.MATH):
        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(sel, xd, y)
        hd = hessian(lambda p: vmap(loss_one, in_dims=(None, 0, 0))(p, xd, y).mean())(sel)
    gm = torch.cat([g[k].reshape(N, -1) for k in names], 1)
    # centred (the records' gradient covariance, as the estimator's V): at the minimum the same as
    # g_i + wd theta, but a float32 fit's residual mean gradient has a Newton step of ~0.6 sd here
    gm = gm - gm.mean(0)
    h = torch.cat([torch.cat([hd[a][b].reshape(sel[a].numel(), sel[b].numel()) for b in names], 1) for a in names])
    h = 0.5 * (h + h.T) + wd * torch.eye(h.shape[0], dtype=torch.float64)
    top = float(torch.linalg.eigvalsh(h).abs().max())
    T = _reference_tangents(model, sel, names, rotations=True)
    T = T[:, T.norm(dim=0) > 0]
    curv = torch.einsum("ij,ik,kj->j", T, h, T) / T.square().sum(0)
    Q, sv, _ = torch.linalg.svd(T[:, curv.abs() <= 1e-4 * top], full_matrices=False)
    Q = Q[:, sv > 1e-9 * sv.max()]
    P = torch.eye(h.shape[0], dtype=torch.float64) - Q @ Q.T
    ev, vec = torch.linalg.eigh(P @ h @ P)
    keep = torch.ones_like(ev, dtype=torch.bool)
    keep[ev.abs().argsort()[: Q.shape[1]]] = False  # the projected directions' zeros
    hi = (vec[:, keep] / ev[keep]) @ vec[:, keep].T
    # (clamped: a k bias, whose data gradient is 0 by the softmax, reads -1e-20 by rounding)
    return ((hi @ (gm.T @ gm / N) @ hi).diagonal() / N).clamp_min(0.0).sqrt(), Q.shape[1]


# (batch_first, bias, add_bias_kv, kdim, wd)
CASES = [(True, True, False, None, WD), (False, True, False, None, WD), (True, False, False, None, WD),
         (True, True, True, None, WD), (False, True, False, 5, WD)]


@pytest.mark.parametrize("batch_first,bias,bias_kv,kdim,wd", CASES)
def test_attention_heads_symmetries_are_projected_out_and_sigma_equals_the_reference(batch_first, bias, bias_kv,
                                                                                       kdim, wd):
    torch.manual_seed(0)
    x, y = _data()
    model = _fit(Net(batch_first, bias, bias_kv, kdim), x, y, wd)
    ref, k = _reference_sigma(model, x, y, wd)
    assert k >= 2  # a head alive in each pair at least: the case at issue
    names = [n for n, _ in model.named_parameters()]
    est = estimate_fn(model, DataLoader(TensorDataset(x, y), batch_size=100), ce, param_names=names, mode="exact",
                      hessian="exact", weight_decay=wd, leverage_correction=False)
    assert est.diagnostics["flat_directions"] >= k
    sigma = torch.cat([est.sigma[n].reshape(-1).double() for n in names])
    # 1e-4: the library and the reference differentiate the same float64 function (rounding 1e-12),
    # but a float32 fit is 1e-5 off its stationary point, where H along the projected directions
    # holds gradient-level terms (~1e-6 of the largest curvature) that the two projections (the
    # library's scaled eigenbasis, the reference's exact tangents) split differently; weights whose
    # sd is below 1e-3 of the largest (a head the penalty holds at 0) are read to 1e-3 of the largest
    big = ref >= 1e-3 * ref.max()
    rel = (sigma - ref).abs() / ref
    assert float(rel[big].max()) < 1e-4, (float(rel[big].max()), est.diagnostics["flat_directions"])
    assert float(torch.cat([(sigma - ref)[~big].abs(), ref.new_zeros(1)]).max()) < 1e-3 * float(ref.max())


def test_attention_head_tangents_equal_the_group_actions_derivative_and_respect_frozen_tensors():
    """The closed-form tangents span the forward-mode derivative of the action (every generator
    without a penalty, the rotations with one), and a frozen ``in_proj_bias`` removes the query/key
    and value directions that would move it."""
    torch.manual_seed(1)
    model = Net(True, True, True, None)
    names = [k for k, _ in model.named_parameters()]
    # generic values (torch initialises in_proj_bias to 0, which every generator keeps)
    sel = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in model.named_parameters()}
    heads = attention_heads(model, names)
    assert heads == {"att": (HEADS, E // HEADS)}
    for wd in (0.0, 1e-2):
        ours = attention_head_tangents(heads, sel.get, names, dict.fromkeys(names, wd))
        theirs = _reference_tangents(model, sel, names, rotations=wd > 0)
        assert ours.shape == theirs.shape
        # the same generators, in any order
        assert float(torch.cdist(ours.T, theirs.T).min(1).values.max()) < 1e-12
    kept = [k for k in names if k != "att.in_proj_bias"]
    i0 = sum(sel[k].numel() for k in names[: names.index("att.in_proj_bias")])
    bias_rows = torch.arange(i0, i0 + sel["att.in_proj_bias"].numel())
    kept_rows = torch.tensor([i for i in range(sum(v.numel() for v in sel.values())) if i not in set(bias_rows.tolist())])
    for wd, count in ((1e-2, 0), (0.0, HEADS * 3)):
        frozen = attention_head_tangents(heads, sel.get, kept, dict.fromkeys(kept, wd))
        full = attention_head_tangents(heads, sel.get, names, dict.fromkeys(names, wd))
        # a generic bias: no rotation keeps a head's q and k biases (or its v bias); of all generators,
        # X = a c' with c orthogonal to b_q and a to b_k keeps both (1 a head), X = a c' with c
        # orthogonal to b_v the v bias (2 a head)
        assert frozen.shape[1] == count
        if count:  # each is a combination of the generators that leaves the frozen bias where it is
            c = torch.linalg.lstsq(full[kept_rows], frozen).solution
            assert torch.allclose(full[kept_rows] @ c, frozen, atol=1e-10)
            assert float((full[bias_rows] @ c).abs().max()) < 1e-10
    sub = type("Sub", (nn.MultiheadAttention,), {"forward": lambda self, *a, **k: super(type(self), self).forward(*a, **k)})
    other = nn.Sequential(sub(E, HEADS))
    assert attention_heads(other) == {}


def _frozen_span_reference(m, names, decay):
    """The tangents' span with the frozen projections' moves in full (no QR reduction): for each
    head and pair, every generator's moves of all present tensors, the combinations that leave the
    frozen ones unchanged by a full SVD (the form before rv49's reduction)."""
    S = importlib.import_module("mis_lightning.estimation.symmetries")
    params = {k: p.detach().double() for k, p in m.named_parameters()}
    offsets, o = {}, 0
    for k in names:
        offsets[k], o = (o, o + params[k].numel()), o + params[k].numel()
    cols = []
    for fqn, (num_heads, dh) in S.attention_heads(m, names).items():
        prefix = f"{fqn}." if fqn else ""
        for acts in S._HEAD_PAIRS.values():
            present = [(prefix + t, third, how) for t, third, how in acts if prefix + t in params]
            decayed = any(decay.get(k, 0.0) != 0.0 for k, _, _ in present)
            for h in range(num_heads):
                gens = [(a, c) for a in range(dh) for c in range(dh) if not decayed or a < c]
                A, Fz = [], []
                for a, c in gens:
                    X = torch.zeros(dh, dh, dtype=torch.float64)
                    X[a, c] = 1.0
                    if decayed:
                        X[c, a] = -1.0
                    moved = {k: torch.zeros_like(params[k]) for k, _, _ in present}
                    for k, third, how in present:
                        w, dw = params[k], moved[k]
                        if how == "right":
                            dw[:, h * dh:(h + 1) * dh] = -w[:, h * dh:(h + 1) * dh] @ X
                            continue
                        start = (max(third, 0) * w.shape[0] // 3 if third >= 0 else 0) + h * dh
                        M = X if how == "left" else -X.T
                        flat_w, flat_d = w.reshape(-1) if w.dim() != 2 else w, dw.view(-1) if w.dim() != 2 else dw
                        flat_d[start:start + dh] = M @ flat_w[start:start + dh]
                    col = torch.zeros(o, dtype=torch.float64)
                    for k in offsets:
                        if k in moved:
                            col[offsets[k][0]:offsets[k][1]] = moved[k].reshape(-1)
                    A.append(col)
                    Fz.append(torch.cat([moved[k].reshape(-1) for k in moved if k not in offsets] or [torch.zeros(0)]))
                A = torch.stack(A, 1)
                if Fz[0].numel():
                    _, sv, Vh = torch.linalg.svd(torch.stack(Fz, 1), full_matrices=True)
                    rank = int((sv > 1e-12 * float(sv.max())).sum())
                    A = A @ Vh[rank:].T
                cols.append(A)
    return torch.cat(cols, 1)


def _span(T):
    U, s, _ = torch.linalg.svd(T, full_matrices=False)
    r = int((s > 1e-9 * float(s.max())).sum()) if s.numel() else 0
    return U[:, :r] @ U[:, :r].T, r


@pytest.mark.parametrize("names, decay, kw", [
    (["0.in_proj_weight"], {"0.in_proj_weight": 1e-3}, {}),             # out_proj and the biases frozen
    (["0.in_proj_weight", "0.out_proj.weight"], {}, {"add_bias_kv": True}),  # the biases, bias_k / bias_v frozen
    (["0.out_proj.weight"], {}, {"bias": False}),                       # in_proj frozen, out_proj assessed
    (["0.in_proj_bias"], {}, {}),                                       # every projection frozen
])
def test_frozen_projections_reduced_give_the_same_span(names, decay, kw):
    """rv49: a partly assessed MultiheadAttention's frozen projections entered the SVD in full
    ([frozen elements, head_dim^2]: minutes at E = 64); each frozen head block is now its QR factor
    (the same Gram matrix). The tangents' span equals the unreduced form's (projections within 1e-9)."""
    S = importlib.import_module("mis_lightning.estimation.symmetries")
    torch.manual_seed(0)
    m = nn.Sequential(nn.MultiheadAttention(8, 2, **kw))
    with torch.no_grad():  # rank-deficient head blocks: the frozen ones then keep some combinations
        mha = m[0]
        mha.out_proj.weight[:, 1] = mha.out_proj.weight[:, 0]        # head 0's out_proj block: rank 3 of 4
        mha.in_proj_weight[17] = 2.0 * mha.in_proj_weight[16]        # head 0's value rows: rank 3 of 4
        mha.in_proj_weight[1] = mha.in_proj_weight[0]                # head 0's query rows: rank 3 of 4
        mha.in_proj_weight[9] = -mha.in_proj_weight[8]               # head 0's key rows: rank 3 of 4
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.normal_()                                # (initialised to 0: no moves)
    params = {k: p.detach().double() for k, p in m.named_parameters()}
    got = S.attention_head_tangents(S.attention_heads(m, names), lambda k: params.get(k), names, decay)
    ref = _frozen_span_reference(m, names, decay)
    (P1, r1), (P0, r0) = _span(got), _span(ref)
    assert r1 == r0 and r0 > 0  # (some combination kept: the frozen blocks matter)
    assert float((P1 - P0).abs().max()) <= 1e-9
