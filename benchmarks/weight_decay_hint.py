"""wd48: the weight-decay hint's figures (decay_gradient_cosine, decay_residual_ratio, weight_decay_implied) on
nux48's my_plain.py model (a 10-12-3 tanh MLP, n = 3000, 171 weights) under several trainings and decays
assessed. Usage: python benchmarks/weight_decay_hint.py [exact] [diagonal] | cost."""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml

torch.set_num_threads(1)

def data(seed=0, n=3000, p=10):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    logits = X[:, 0] * 1.5 - X[:, 1] + 0.8 * X[:, 2] * X[:, 3]
    y = (logits + 0.8 * torch.randn(n, generator=g) > 0).long() + (X[:, 4] > 1.0).long()
    return X, y

def loss(out, t):
    return F.cross_entropy(out, t, reduction="none")

def train(X, y, wd, how, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(X.shape[1], 12), nn.Tanh(), nn.Linear(12, 3))
    obj = lambda: loss(m(X), y).mean() + 0.5 * wd * sum(q.pow(2).sum() for q in m.parameters())
    if how == "lbfgs":
        opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe")
        def closure():
            opt.zero_grad()
            (value := obj()).backward()
            return value
        for _ in range(10):
            opt.step(closure)
    else:  # "adamK": K full-batch Adam steps
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(int(how[4:])):
            opt.zero_grad()
            obj().backward()
            opt.step()
    return m

def cost() -> None:
    """CPU seconds of _finalize_lean's added pass (the hint's two block sums) at d = 1e7, vs one of its
    sub-block passes (chunk() and a square: what the finalize does twice already)."""
    import importlib
    import time
    E = importlib.import_module("mis_lightning.estimation.estimate")
    d = 10_000_000
    theta = {"w": torch.randn(d)}
    g_out = torch.randn(d)
    st = {"g_sum": torch.randn(d), "g2_sum": torch.rand(d) * 10, "h_sum": torch.rand(d)}
    f64 = torch.float64
    terms = torch.empty(min(E.FINALIZE_CHUNK, d), dtype=f64)
    def theta_slice(a, b):
        return torch.cat([theta["w"][a:b]]).to(f64)
    def penalised(a, b, g):
        return g + 1e-3 * theta_slice(a, b)
    def added():  # the finalize's own helper, with its gradient and weights read as it reads them
        for a, b, subs in E._finalize_blocks(d):
            E._hint_block_sums(a, b, subs, terms, lambda s, e: penalised(s, e, g_out[s:e].to(f64)), theta_slice)
    def chunk_pass():
        for a, _b, subs in E._finalize_blocks(d):
            for s, e in subs:
                g = (st["g_sum"][s:e] / 3000).to(f64)
                v = (st["g2_sum"][s:e] / 3000).to(f64) - g.square()
                h = st["h_sum"][s:e].to(f64) / 3000
                torch.square(penalised(s, e, g) * h / (1.0 + v.abs()), out=terms[s - a: e - a])
    for _ in range(3):
        for f in (added, chunk_pass):
            t = time.process_time()
            f()
            print(f.__name__, round(time.process_time() - t, 3), flush=True)


KEYS = ["gradient_norm_ratio", "minimum_offset_sd", "not_at_minimum", "decay_gradient_cosine",
        "decay_residual_ratio", "weight_decay_implied", "weight_decay_mismatch"]
if sys.argv[1:] == ["cost"]:
    cost()
    sys.exit()
X, y = data()
dl = DataLoader(TensorDataset(X, y), batch_size=256)
cases = [(1e-3, "lbfgs", 0.0), (1e-3, "lbfgs", 1e-3), (1e-3, "lbfgs", 5e-4), (1e-2, "lbfgs", 0.0),
         (1e-4, "lbfgs", 0.0), (0.0, "lbfgs", 0.0), (1e-3, "adam20", 0.0), (1e-3, "adam200", 0.0),
         (0.0, "adam20", 0.0), (0.0, "adam200", 0.0), (1e-3, "adam2000", 0.0)]
print("trained_wd train assessed_wd | " + " ".join(KEYS))
for est in sys.argv[1:] or ["exact"]:
    for wd, how, wd_a in cases:
        m = train(X, y, wd, how)
        r = ml.assess(m, ["int8_weight_only"], dl, loss, weight_decay=wd_a, estimation=est)
        d = r.diagnostics
        print(est, wd, how, wd_a, "|", " ".join((f"{d.get(k):.3g}" if isinstance(d.get(k), float) else str(d.get(k))) for k in KEYS),
              "| leak", round(r.schemes["int8_weight_only"].leakage, 5), flush=True)
