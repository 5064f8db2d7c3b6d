"""A researcher's conditions not met by earlier trials (nu48; docs/benchmarks.md, "nu48").

Each case builds a small model (one of the set-ups below), fits it to a minimum of its objective
(full-batch L-BFGS, L2 ``WD``), then

1. compares ``sigma`` of the exact and the diagonal estimators (``leverage_correction=False``, the
   exact Hessian) with an independent sandwich computed here by ``torch.func`` (per-record gradients
   of the objective, the Hessian of the mean loss, ``Sigma = H^+ G H^+`` (a symmetry's flat
   directions projected out) or its diagonal form
   ``sqrt(G_jj / n) / H_jj``, float64, on the same parameters; the diagonal estimator floors a
   weight's curvature against its gradient variance, so a few weights differ there by design);
2. scores the same weights and records through ``assess``, ``MISIndicator`` (one pass,
   ``num_training_records``) and ``MISCallback`` (a Lightning fit with ``lr=0``, so the weights are
   those assessed) and prints the leakage of each scheme from each, with the warnings' keywords.

    python benchmarks/nu48_trial.py              # every case (about a minute of CPU, one thread)
    python benchmarks/nu48_trial.py twice nobias # some of them (names below)
    python benchmarks/nu48_trial.py errors       # what a misconfiguration raises (each front end's first line)
    python benchmarks/nu48_trial.py bottleneck   # a rotation symmetry under weight decay (flat directions)
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.assess import run_estimation
from mis_lightning.config import EstimationConfig

torch.set_num_threads(1)
WD = 1e-2
N = 400
SCHEMES = ["none", "rtn_int8", "rtn_int4", "int8_weight_only"]


def ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="none")


def ce_smooth(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="none", label_smoothing=0.1)


class Twice(nn.Module):
    """One square Linear called twice (weight sharing across depth, not tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.sq = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.sq(h))
        h = torch.tanh(self.sq(h))
        return self.head(h)


class Siamese(nn.Module):
    """One encoder applied to both inputs of a record (``forward((a, b))``), a head on the pair."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = pair
        return self.head(torch.cat([torch.tanh(self.enc(a)), torch.tanh(self.enc(b))], -1))


def weighted_ce(o: torch.Tensor, t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-record sample weights carried with the labels: targets ``(label, weight)``."""
    return t[1] * F.cross_entropy(o, t[0], reduction="none")


class TiedAutoencoderHead(nn.Module):
    """An encoder Linear whose weight is used again, transposed, by ``F.linear`` in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 3)
        self.dec_bias = nn.Parameter(torch.zeros(5))
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        r = F.linear(h, self.enc.weight.t(), self.dec_bias)
        return self.head(torch.tanh(r))


def mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 2, bias=bias))


def frozen_bias() -> nn.Module:
    m = mlp()
    m[0].bias.requires_grad_(False)
    return m


def transposed_weight(m: nn.Module) -> nn.Module:
    """After the fit: the first Linear's weight Parameter becomes a non-contiguous (transposed) tensor
    of the same values (L-BFGS cannot train such a parameter: ``p.grad.view(-1)``)."""
    m[0].weight = nn.Parameter(m[0].weight.detach().t().contiguous().t())
    assert not m[0].weight.is_contiguous()
    return m


def to_bfloat16(m: nn.Module) -> nn.Module:
    """Trained in float32, released in bfloat16 (``model.bfloat16()``)."""
    return m.to(torch.bfloat16)


def embed() -> nn.Module:
    class E(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 3, padding_idx=0)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.emb(x).mean(1)))
    return E()


def mha() -> nn.Module:
    class A(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.reshape(x.shape[0], -1, 4)[:, :, :4]
            return self.head(self.att(h, h, h, need_weights=False)[0].mean(1))
    return A()


def sparse_embed() -> nn.Module:
    m = embed()
    m.emb.sparse = True  # sparse gradients (trained with SparseAdam / SGD in a recommender)
    return m


def to_float16(m: nn.Module) -> nn.Module:
    """Trained in float32, released in float16 (``model.half()``)."""
    return m.to(torch.float16)


def bilinear() -> nn.Module:
    class B(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Bilinear(5, 5, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.b(x, x)))
    return B()


def data(kind: str, n: int, seed: int) -> tuple[Any, Any]:
    """``(inputs, targets)``; either may be a tuple of tensors (``"pair"``: two inputs per record;
    ``"weighted"``: targets ``(label, sample weight)``)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "pair":
        a, b = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
        return (a, b), ((a - b)[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    if kind == "weighted":
        x, y = data("flat", n, seed)
        return x, (y, 0.5 + torch.rand(n, generator=g))
    if kind == "tokens":
        x = torch.randint(0, 6, (n, 4), generator=g)
        return x, ((x == 2).sum(1) + torch.randint(0, 2, (n,), generator=g) > 1).long()
    if kind == "mha":  # 3 tokens of 4 features
        x = torch.randn(n, 12, generator=g)
        return x, (x[:, 0] - x[:, 5] + 0.7 * torch.randn(n, generator=g) > 0).long()
    x = torch.randn(n, 5, generator=g)
    return x, (x[:, 0] - x[:, 1] + 0.7 * torch.randn(n, generator=g) > 0).long()


# name: (model factory, data kind, loss, dtype of the fit, change after the fit)
CASES: dict[str, tuple[Callable[[], nn.Module], str, Callable, torch.dtype, Callable | None]] = {
    "plain": (mlp, "flat", ce, torch.float32, None),
    "twice": (Twice, "flat", ce, torch.float32, None),
    "tied_transpose": (TiedAutoencoderHead, "flat", ce, torch.float32, None),
    "nobias": (lambda: mlp(bias=False), "flat", ce, torch.float32, None),
    "frozen_bias": (frozen_bias, "flat", ce, torch.float32, None),
    "transposed": (mlp, "flat", ce, torch.float32, transposed_weight),
    "float64": (mlp, "flat", ce, torch.float64, None),
    "bfloat16": (mlp, "flat", ce, torch.float32, to_bfloat16),
    "smooth": (mlp, "flat", ce_smooth, torch.float32, None),
    "embedding_pad": (embed, "tokens", ce, torch.float32, None),
    "bilinear": (bilinear, "flat", ce, torch.float32, None),
    "siamese": (Siamese, "pair", ce, torch.float32, None),
    "sample_weight": (mlp, "weighted", weighted_ce, torch.float32, None),
    "mha": (mha, "mha", ce, torch.float32, None),
    "sparse_embedding": (sparse_embed, "tokens", ce, torch.float32, None),
    "float16": (mlp, "flat", ce, torch.float32, to_float16),
}


class Regroup:
    """``batch_fn`` for a TensorDataset of the flattened leaves of ``(inputs, targets)``: the pair back."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def __call__(self, batch: list[torch.Tensor]) -> tuple[Any, Any]:
        return tree_unflatten(list(batch), self.spec)


def loader_of(x: Any, y: Any, batch_size: int = 100) -> tuple[DataLoader, Regroup | None]:
    """A loader of the records and the ``batch_fn`` that regroups them (``None``: plain pairs)."""
    leaves, spec = tree_flatten((x, y))
    if len(leaves) == 2:
        return DataLoader(TensorDataset(x, y), batch_size=batch_size), None
    return DataLoader(TensorDataset(*leaves), batch_size=batch_size), Regroup(spec)


def _floats(tree: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def fit(m: nn.Module, x: Any, y: Any, loss: Callable) -> nn.Module:
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, max_iter=400, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-15)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        obj = loss(m(x), y).mean() + WD / 2 * sum((p.float() ** 2).sum() for p in params)
        obj.backward()
        return obj
    for _ in range(6):
        opt.step(closure)
    return m


def reference_sigma(model: nn.Module, names: list[str], x: Any, y: Any, loss: Callable
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Exact and diagonal sandwich sd of each weight, float64, from torch.func (independent of the library)."""
    md = copy.deepcopy(model).double().eval()
    for mod in md.modules():  # the same math with dense gradients (vmap cannot batch sparse ones)
        if isinstance(mod, nn.Embedding):
            mod.sparse = False
    state = {k: v.detach().double() for k, v in md.named_parameters()}
    state.update({k: v.detach() for k, v in md.named_buffers()})
    sel = {k: state[k] for k in names}
    xd, y = _floats(x, torch.float64), _floats(y, torch.float64)

    def loss_one(p: dict, xi: Any, yi: Any) -> torch.Tensor:
        one = (lambda t: t.unsqueeze(0))
        return loss(functional_call(md, {**state, **p}, (tree_map(one, xi),)), tree_map(one, yi))[0]

    n = len(tree_flatten(x)[0][0])
    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(sel, xd, y)
    theta = torch.cat([sel[k].reshape(-1) for k in names])
    gm = torch.cat([g[k].reshape(n, -1) for k in names], 1) + WD * theta
    with sdpa_kernel(SDPBackend.MATH):  # forward-over-reverse through attention
        hd = hessian(lambda p: vmap(loss_one, in_dims=(None, 0, 0))(p, xd, y).mean())(sel)
    h = torch.cat([torch.cat([hd[a][b].reshape(sel[a].numel(), sel[b].numel()) for b in names], 1) for a in names])
    h = h + WD * torch.eye(len(theta), dtype=torch.float64)
    gc = gm.T @ gm / n
    # the sandwich on the identifiable part: the directions of a symmetry (no curvature of the
    # objective, 1e-6 of the largest, and no record's gradient along them, 1e-8) projected out
    # (torch.func's forward-over-reverse Hessian through Embedding(padding_idx) is not symmetric:
    # it is inverted as it comes where nothing is flat)
    ev, vec = torch.linalg.eigh(0.5 * (h + h.T))
    flat = (ev.abs() < 1e-6 * ev.abs().max()) & (torch.einsum("ij,ik,kj->j", vec, gc, vec) < 1e-8 * gc.diagonal().max())
    hi = (vec[:, ~flat] / ev[~flat]) @ vec[:, ~flat].T if flat.any() else torch.linalg.inv(h)
    full = ((hi @ gc @ hi).diagonal() / n).sqrt()
    diag = (gc.diagonal() / h.diagonal() ** 2 / n).sqrt()
    out_full, out_diag, o = {}, {}, 0
    for k in names:
        k1 = o + sel[k].numel()
        out_full[k], out_diag[k], o = full[o:k1], diag[o:k1], k1
    return out_full, out_diag


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative difference; 0 where both are 0 (a weight the data never moves)."""
    a = a.double()
    # the reference's round-off where the data never moves a weight (an embedding's padding row): 1e-8 sd, not 0
    b = b.nan_to_num(0.0)
    return (a - b).abs() / torch.maximum(b.abs(), 1e-6 * b.abs().max()).clamp_min(1e-300)


def callback_leakage(model: nn.Module, loader: DataLoader, loss: Callable, schemes: list[str],
                     batch_fn: Regroup | None) -> ml.Report:
    import pytorch_lightning as pl

    from mis_lightning import MISCallback

    class Wrap(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            x, y = batch if batch_fn is None else batch_fn(batch)
            return loss(self(x), y).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)

    cb = MISCallback(schemes, loss_fn=loss, weight_decay={f"net.{k}": WD for k, p in model.named_parameters()
                                                           if p.requires_grad}, num_records=512,
                     batch_fn=batch_fn)
    with tempfile.TemporaryDirectory() as root:
        tr = pl.Trainer(default_root_dir=root, max_epochs=1, callbacks=[cb], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        tr.fit(Wrap(), loader)
    return cb.report


def run(name: str) -> None:
    factory, kind, loss, dtype, after = CASES[name]
    torch.manual_seed(0)
    x, y = data(kind, N, 0)
    x = _floats(x, dtype)
    model = fit(factory().to(dtype), x, y, loss)
    if after is not None:
        model = after(model)
        x = _floats(x, next(model.parameters()).dtype)
    loader, batch_fn = loader_of(x, y)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    print(f"== {name}: {sum(model.get_parameter(k).numel() for k in names)} weights {names}")
    full, diag = reference_sigma(model, names, x, y, loss)
    for mode in ("exact", "diagonal"):
        try:
            est = run_estimation(model, loader, loss, EstimationConfig(mode=mode, hessian="exact", weight_decay=WD,
                                                                        leverage_correction=False), batch_fn=batch_fn)
            ref = full if mode == "exact" else diag
            rel = torch.cat([rel_err(est.sigma[k], ref[k]) for k in ref])
            print(f"   sigma {mode:8s} vs torch.func sandwich: max rel {rel.max():.2e}, "
                  f"{int((rel < 1e-6).sum())} of {rel.numel()} within 1e-6")
        except Exception as e:  # noqa: BLE001 - a trial: print what the researcher would see
            print(f"   sigma {mode}: {type(e).__name__}: {str(e)[:300]}")
    reports: dict[str, ml.Report | str] = {}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for front in ("assess", "metric", "callback"):
            try:
                if front == "assess":
                    reports[front] = ml.assess(model, SCHEMES, loader, loss, weight_decay=WD, strict=False,
                                               batch_fn=batch_fn)
                elif front == "metric":
                    met = ml.MISIndicator(model, loss, SCHEMES, weight_decay=WD, num_training_records=N,
                                          batch_fn=batch_fn)
                    for batch in loader:
                        met.update(batch)
                    met.compute()
                    reports[front] = met.report
                else:
                    reports[front] = callback_leakage(model, loader, loss, SCHEMES, batch_fn)
            except Exception as e:  # noqa: BLE001
                reports[front] = f"{type(e).__name__}: {str(e)[:300]}"
    for s in SCHEMES:
        row = []
        for front, rep in reports.items():
            if isinstance(rep, str):
                row.append(f"{front} -")
                continue
            r = rep.schemes[s]
            row.append(f"{front} {r.leakage:.6f}" if r.error is None else f"{front} error: {r.error[:60]}")
        print(f"   {s:18s} " + " | ".join(row))
    for front, rep in reports.items():
        if isinstance(rep, str):
            print(f"   {front} raised: {rep}")
    rep = reports.get("assess")
    if isinstance(rep, ml.Report):
        print(f"   estimator {rep.estimation.get('estimator')}; warnings:")
        for w in rep.warnings:
            print("     -", w[:240])


def bottleneck() -> None:
    """A 2-unit linear bottleneck (``Linear(4, 2, bias=False) -> Linear(2, 2, bias=False)``, MSE, n = 1,000,
    fitted in float64, released in float32): its rotation ``W1 -> R W1, W2 -> W2 R'`` keeps the loss and
    ``|theta|^2``, a flat direction of the penalised objective (``diagnostics["flat_directions"]``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    y = x[:, :2] @ torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=torch.float64) + 0.5 * torch.randn(
        1000, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = fit(nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False)).double(), x, y,
                squared_error).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(model, ["none", "rtn_int8", "rtn_int4", "rtn_int2"],
                        DataLoader(TensorDataset(x.float(), y.float()), batch_size=250), squared_error, weight_decay=WD)
    print(f"   bottleneck: flat directions {rep.diagnostics.get('flat_directions')}; "
          + ", ".join(f"{s} {r.leakage:.5f}" for s, r in rep.schemes.items()))


def squared_error(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((o - t) ** 2).sum(-1)


def errors() -> None:
    """What a researcher sees for a reduced loss, 3-tuple batches, a meta-device model, class weights held
    by a function (float32 arithmetic) against the same loss as an ``nn.Module``."""
    torch.manual_seed(0)
    x, y = data("flat", N, 0)
    model = fit(mlp(), x, y, ce)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    triples = DataLoader(TensorDataset(x, y, torch.rand(N)), batch_size=100)
    meta = copy.deepcopy(model).to("meta")
    cw = torch.tensor([0.3, 1.7])
    cases = {
        "loss reduced (reduction='sum')": lambda: ml.assess(
            model, ["rtn_int4"], loader, lambda o, t: F.cross_entropy(o, t, reduction="sum"), weight_decay=WD),
        "(x, y, sample weight) batches, no batch_fn": lambda: ml.assess(model, ["rtn_int4"], triples, ce),
        "model on the meta device": lambda: ml.assess(meta, ["rtn_int4"], loader, ce),
        "class weights: nn.CrossEntropyLoss(weight=w)": lambda: ml.assess(
            model, ["none", "rtn_int4"], loader, nn.CrossEntropyLoss(weight=cw, reduction="none"), weight_decay=WD),
        "class weights: a function holding w": lambda: ml.assess(
            model, ["none", "rtn_int4"], loader, lambda o, t: F.cross_entropy(o, t, weight=cw, reduction="none"),
            weight_decay=WD),
    }
    for label, call in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                rep = call()
                print(f"   {label}: " + ", ".join(f"{s} {r.leakage:.6f}" for s, r in rep.schemes.items()))
            except Exception as e:  # noqa: BLE001
                print(f"   {label}: {type(e).__name__}: {str(e)[:220]}")


if __name__ == "__main__":
    for case in sys.argv[1:] or list(CASES):
        {"errors": errors, "bottleneck": bottleneck}.get(case, lambda c=case: run(c))()
