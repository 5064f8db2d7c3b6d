"""nu49: nu48's leftovers on researchers' models (docs/benchmarks.md, "nu49").

    python benchmarks/nu49_trial.py mha            # nn.MultiheadAttention: exact sigma vs torch.func, flat directions
    python benchmarks/nu49_trial.py classweights   # class weights held by a function vs an nn.Module loss
    python benchmarks/nu49_trial.py twice          # a Linear called twice: the K-FAC line, the figures vs the exact ones
    python benchmarks/nu49_trial.py wide           # a wider one (794 weights, n = 2,000) and its untied twin: sigma ratios

``mha`` fits nu48's case (``benchmarks/nu48_trial.py``: ``MultiheadAttention(4, 2)`` + Linear head, float32
L-BFGS, n = 400, wd 1e-2) and compares the exact estimator's sigma with a float64 ``torch.func`` sandwich
``H^+ Cov(g) H^+`` projected off the heads' rotation tangents (a forward-mode derivative of the group action)
whose curvature is below 1e-4 of the largest (the live head's; the other head's weights are ~1e-4, held by the
penalty), with and without the attention tangents (``symmetries.attention_heads`` returning nothing: the rule
before), and ``assess``'s figures. Each line prints with its A/B label.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.assess import run_estimation
from mis_lightning.config import EstimationConfig

sys.path.insert(0, "benchmarks")
import nu48_trial as t  # noqa: E402 - the cases of session 48

torch.set_num_threads(1)
EST = importlib.import_module("mis_lightning.estimation.estimate")
PS = importlib.import_module("mis_lightning.estimation.per_sample")


def _rotation_tangents(sel: dict, names: list[str], att: nn.MultiheadAttention, prefix: str) -> torch.Tensor:
    """``[d, k]`` each head's query/key and value/output rotations' tangents, by ``jvp`` of the action."""
    E, dh, cols = att.embed_dim, att.head_dim, []
    for h in range(att.num_heads):
        r = torch.arange(h * dh, (h + 1) * dh)
        for pair in ("qk", "vo"):
            for a in range(dh):
                for c in range(a + 1, dh):
                    X = torch.zeros(dh, dh, dtype=torch.float64)
                    X[a, c], X[c, a] = 1.0, -1.0

                    def act(s: torch.Tensor, X: torch.Tensor = X, pair: str = pair, r: torch.Tensor = r) -> dict:
                        A = torch.eye(dh, dtype=torch.float64) + s * X
                        Ai = torch.linalg.inv(A)
                        p = dict(sel)
                        W, b = p[prefix + "in_proj_weight"], p[prefix + "in_proj_bias"]
                        moves = ((0, A), (E, Ai.T)) if pair == "qk" else ((2 * E, A),)
                        for off, M in moves:
                            W = W.index_copy(0, off + r, M @ W[off + r])
                            b = b.index_copy(0, off + r, M @ b[off + r])
                        p[prefix + "in_proj_weight"], p[prefix + "in_proj_bias"] = W, b
                        if pair == "vo":
                            wo = p[prefix + "out_proj.weight"]
                            p[prefix + "out_proj.weight"] = wo.index_copy(1, r, wo[:, r] @ Ai)
                        return p
                    _, tan = jvp(act, (torch.tensor(0.0, dtype=torch.float64),),
                                 (torch.tensor(1.0, dtype=torch.float64),))
                    cols.append(torch.cat([tan[k].reshape(-1) for k in names]))
    return torch.stack(cols, 1)


def mha() -> None:
    torch.manual_seed(0)
    x, y = t.data("mha", t.N, 0)
    model = t.fit(t.mha(), x, y, t.ce)
    loader, _ = t.loader_of(x, y)
    names = [k for k, _ in model.named_parameters()]
    md = copy.deepcopy(model).double()
    sel = {k: v.detach() for k, v in md.named_parameters()}

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return t.ce(functional_call(md, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))[0]
    with sdpa_kernel(SDPBackend.MATH):
        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(sel, x.double(), y)
        hd = hessian(lambda p: vmap(loss_one, in_dims=(None, 0, 0))(p, x.double(), y).mean())(sel)
    G = torch.cat([g[k].reshape(t.N, -1) for k in names], 1)
    G = G - G.mean(0)
    h = torch.cat([torch.cat([hd[a][b].reshape(sel[a].numel(), sel[b].numel()) for b in names], 1) for a in names])
    h = 0.5 * (h + h.T) + t.WD * torch.eye(h.shape[0], dtype=torch.float64)
    T = _rotation_tangents(sel, names, md.att, "att.")
    curv = torch.einsum("ij,ik,kj->j", T, h, T) / T.square().sum(0) / torch.linalg.eigvalsh(h).abs().max()
    Q = torch.linalg.qr(T[:, curv.abs() <= 1e-4]).Q
    P = torch.eye(h.shape[0], dtype=torch.float64) - Q @ Q.T
    ev, vec = torch.linalg.eigh(P @ h @ P)
    keep = torch.ones_like(ev, dtype=torch.bool)
    keep[ev.abs().argsort()[: Q.shape[1]]] = False
    hi = (vec[:, keep] / ev[keep]) @ vec[:, keep].T
    ref = ((hi @ (G.T @ G / t.N) @ hi).diagonal() / t.N).clamp_min(0.0).sqrt()  # (rounding: -1e-20 on the k biases)
    print(f"   rotations' relative curvature {[f'{c:.2g}' for c in curv.tolist()]}; reference projects {Q.shape[1]}")
    big = ref >= 1e-3 * ref.max()
    for label, heads in (("before (no attention tangents)", lambda *a, **k: {}), ("after", EST.attention_heads)):
        orig, EST.attention_heads = EST.attention_heads, heads
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = run_estimation(model, loader, t.ce, EstimationConfig(mode="exact", hessian="exact",
                                                                            weight_decay=t.WD, leverage_correction=False))
                rep = ml.assess(model, ["none", "rtn_int8", "rtn_int4"], loader, t.ce, weight_decay=t.WD, strict=False)
        finally:
            EST.attention_heads = orig
        sig = torch.cat([est.sigma[k].reshape(-1).double() for k in names])
        rel = (sig - ref).abs() / ref
        print(f"   {label}: flat directions {est.diagnostics['flat_directions']}, sigma vs reference max rel "
              f"{float(rel[big].max()):.2e} ({int(big.sum())} weights with sd >= 1e-3 of the largest), the rest within "
              f"{float((sig - ref)[~big].abs().max() / ref.max()):.1e} of the largest; not_at_minimum "
              f"{rep.diagnostics.get('not_at_minimum')}; " + ", ".join(f"{s} {r.leakage:.6f}" for s, r in rep.schemes.items()))


def classweights() -> None:
    torch.manual_seed(0)
    x, y = t.data("flat", t.N, 0)
    model = t.fit(t.mlp(), x, y, t.ce)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    cw = torch.tensor([0.3, 1.7])
    losses = {"nn.CrossEntropyLoss(weight=w)": nn.CrossEntropyLoss(weight=cw, reduction="none"),
              "a function holding w": lambda o, tt: F.cross_entropy(o, tt, weight=cw, reduction="none")}
    for upcast in (False, True):
        PS.LOSS_UPCAST = upcast
        for label, fn in losses.items():
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                rep = ml.assess(model, ["none", "rtn_int4"], loader, fn, weight_decay=t.WD)
            warned = any("fails on float64 outputs" in str(w.message) for w in got)
            print(f"   LOSS_UPCAST={upcast} {label}: " + ", ".join(f"{s} {r.leakage:.6f}" for s, r in rep.schemes.items())
                  + f"; float32 warning {warned}")
    PS.LOSS_UPCAST = True


def twice() -> None:
    torch.manual_seed(0)
    x, y = t.data("flat", t.N, 0)
    model = t.fit(t.Twice(), x, y, t.ce)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = {m: ml.assess(model, ["none", "rtn_int4"], loader, t.ce, weight_decay=t.WD, estimation=m, strict=False)
               for m in ("exact", "diagonal")}
    for m, r in rep.items():
        print(f"   {m}: " + ", ".join(f"{s} {v.leakage:.6f}" for s, v in r.schemes.items())
              + f"; kfac_lost {r.diagnostics.get('kfac_lost')!r}, uncorrected {r.diagnostics.get('kfac_uncorrected_layers')}")
    d = rep["diagonal"]
    print("   diagonal rows: " + "; ".join(f"{row['scheme']} * {row.get('indicative')}" for row in d.rows()))
    print("   diagonal K-FAC line: " + next((w for w in d.warnings if "K-FAC correction" in w), "(none)")[:400])


def wide(width: int = 24, n: int = 2000) -> None:
    """The diagonal estimator's per-weight sigma over the exact estimator's, per layer (p10 / median / p90),
    on a tanh MLP calling a square Linear twice and on its untied twin (``sq2``: K-FAC-corrected)."""
    class Net(nn.Module):
        def __init__(self, tied: bool) -> None:
            super().__init__()
            self.tied = tied
            self.inp, self.sq, self.head = nn.Linear(5, width), nn.Linear(width, width), nn.Linear(width, 2)
            if not tied:
                self.sq2 = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.sq(torch.tanh(self.inp(x))))
            return self.head(torch.tanh((self.sq if self.tied else self.sq2)(h)))
    for tied in (True, False):
        torch.manual_seed(0)
        x, y = t.data("flat", n, 0)
        model = t.fit(Net(tied), x, y, t.ce)
        loader, _ = t.loader_of(x, y, 250)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = {m: run_estimation(model, loader, t.ce, EstimationConfig(mode=m, weight_decay=t.WD))
                   for m in ("exact", "diagonal")}
        dg = est["diagonal"].diagnostics
        print(f"   {'twice' if tied else 'untied'}: kfac_correction {dg.get('kfac_correction')}, uncorrected "
              f"{dg.get('kfac_uncorrected_layers')}")
        for k in est["exact"].sigma:
            r = (est["diagonal"].sigma[k].double() / est["exact"].sigma[k].double()).reshape(-1)
            q = torch.quantile(r[r.isfinite()], torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
            print(f"      {k:12s} diagonal / exact sigma: p10 {q[0]:.3g} median {q[1]:.3g} p90 {q[2]:.3g}")


if __name__ == "__main__":
    for case in sys.argv[1:] or ["mha", "classweights", "twice"]:
        print(f"== {case}")
        {"mha": mha, "classweights": classweights, "twice": twice, "wide": wide}[case]()
