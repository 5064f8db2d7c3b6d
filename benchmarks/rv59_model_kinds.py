"""The indicator against reference-model attacks on models beyond plain ``nn.Linear`` MLPs
(docs/benchmarks.md "rv59"), in the pool protocol of docs/validation.md ("Reference-model
attacks in the pool protocol").

One mode per model kind, each a small classifier with smooth activations (``K = 3`` classes,
``--n`` records per model, the pool ``2 n``):

* ``cnn``: ``Conv2d(1, 3, 3) -> tanh -> mean over rows -> Conv1d(3, 3, 2) -> tanh -> mean ->
  Linear(3, 3)`` on 6 x 6 images (d = 63);
* ``cnn-bn``: the same with ``BatchNorm2d(3)`` after the ``Conv2d``, fitted in train mode
  (full batch: its batch statistics are the training half's), released in eval mode with its
  running statistics (``momentum=None``: their cumulative average, the training half's);
* ``emb``: 4 tokens of a 12-word vocabulary -> ``Embedding(12, 6)`` -> mean -> ``LayerNorm(6)`` ->
  ``Linear(6, 12)`` whose weight is the embedding's (tied; logits over the vocabulary, the label a
  word), the batches dicts ``{"tokens", "label"}`` (``batch_fn``);
* ``mha``: 4 steps of 3 features -> ``Linear(3, 4)`` -> ``MultiheadAttention(4, 1)`` (residual) ->
  ``LayerNorm(4)`` -> mean over steps -> ``Linear(4, 3)`` (d = 119).

``--models`` copies, all from one initialisation, each fitted by full-batch L-BFGS in float64 on
the mean cross-entropy + ``decay / 2 |theta|^2`` over a random half of the pool
(``pool_splits``), then cast to float32 (torchao's schemes take float32). Every model is released
under each scheme through the library's own ``apply`` (``groundtruth.attacks.quantized``) and in
turn is the target with the others as its references: loss threshold, LiRA online / offline on
the logit-scaled confidence, RMIA online / offline (``classifier_pool_attacks.signals``); the
advantage is ``pool_advantage``'s (one threshold for all targets), mean +- s.e. over the targets.
The indicator: ``assess`` (its defaults: ``estimation="auto"``, the 80% interval) of the first
``--targets`` models on their own training half, with ``weight_decay=decay``; per scheme the
report's ``pool_leakage`` (the column to hold against these attacks), ``leakage`` and its
interval, and the ``*`` conditions (``report.regime_failures``) and warnings' first words.

    python benchmarks/rv59_model_kinds.py cnn --models 16 --targets 1
    python benchmarks/rv59_model_kinds.py emb --models 16 --targets 1 --n 1000
    python benchmarks/rv59_model_kinds.py bn-counter --n 400
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.classifier_pool_attacks import signals  # noqa: E402
from mis_lightning import assess  # noqa: E402
from mis_lightning.groundtruth.attacks import (  # noqa: E402
    lira_scores,
    pool_advantage,
    pool_splits,
    quantized,
    rmia_scores,
)
from mis_lightning.report import regime_failures  # noqa: E402

K = 3
SCHEMES = {
    "cnn": ["int8_weight_only", "intx_weight_only_int4", "float8_weight_only", "native_int8_per_row", "rtn_int4"],
    "cnn-bn": ["int8_weight_only", "intx_weight_only_int4", "rtn_int4"],
    "emb": ["rtn_int8", "rtn_int4", "native_int8_per_row", "bf16"],
    "mha": ["int8_weight_only", "intx_weight_only_int4", "float8_weight_only", "rtn_int4"],
}


class CNN(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3, momentum=None) if bn else nn.Identity()
        self.c1 = nn.Conv1d(3, 3, 2)
        self.h = nn.Linear(3, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.bn(self.c(x))).mean(2)
        return self.h(torch.tanh(self.c1(z)).mean(2))


class Emb(nn.Module):
    V = 12

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(self.V, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, self.V)
        self.out.weight = self.e.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.e(t).mean(1)))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.att = nn.MultiheadAttention(4, 1, batch_first=True)
        self.ln = nn.LayerNorm(4)
        self.h = nn.Linear(4, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inp(x)
        a, _ = self.att(z, z, z, need_weights=False)
        return self.h(self.ln(z + a).mean(1))


def pool(kind: str, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` records of ``kind``'s data: inputs and class labels (20% redrawn at random)."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("cnn", "cnn-bn"):
        x = torch.randn(N, 1, 6, 6, generator=g, dtype=torch.float64)
        y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, :, :3].mean((1, 2)) > 0).long()
    elif kind == "emb":
        x = torch.randint(0, Emb.V, (N, 4), generator=g)
        y = x[:, 0].clone()
    else:
        x = torch.randn(N, 4, 3, generator=g, dtype=torch.float64)
        y = (x[:, :, 0].sum(1) > 0).long() + (x[:, 0, 1] > 0).long()
    classes = Emb.V if kind == "emb" else K
    noisy = torch.rand(N, generator=g) < 0.2
    y[noisy] = torch.randint(0, classes, (int(noisy.sum()),), generator=g)
    return x, y


def build(kind: str) -> nn.Module:
    return {"cnn": lambda: CNN(False), "cnn-bn": lambda: CNN(True), "emb": Emb, "mha": MHA}[kind]()


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, decay: float, rounds: int) -> float:
    """Full-batch L-BFGS in float64 (train mode: a BatchNorm normalises by the half's statistics);
    returns the largest |gradient| of the objective at the end."""
    model.double().train()
    params = [p for p in model.parameters()]
    opt = torch.optim.LBFGS(params, max_iter=300, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ce(model(x), y).mean() + decay / 2 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(rounds):
        opt.step(closure)
    closure()
    return max(float(p.grad.abs().max()) for p in params)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Float inputs in float32 (the released models' dtype), token ids as they are."""
    return x.float() if x.is_floating_point() else x


class Records(Dataset):
    """Dict records ``{"tokens", "label"}`` (the ``emb`` mode's batches)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.x[i], "label": self.y[i]}


def bn_counter(a: argparse.Namespace) -> None:
    """``BatchNorm1d(8, momentum=None, affine=False) -> Linear(8, 2)`` trained in train mode (Adam, 20
    epochs of batches of 100: the running mean is the mean of the ``--n`` training inputs, ``N(2, I)``),
    the head then fitted in eval mode (L-BFGS, ``--decay``: a minimum of the model assessed), its state
    dict saved without ``num_batches_tracked`` and loaded into a fresh model (``strict=False``): the
    report's figures and whether it names the running statistics, beside the exact advantage of the
    running mean alone (``gaussian_mean_advantage(n, 8)``) and a real attack on it, simulated over
    ``--models`` x 10,000 training sets (the Neyman-Pearson statistic ``(z - mu) . (mean - mu)``, one
    threshold picked on half of them and read on the other half: members against fresh draws)."""
    from mis_lightning.groundtruth.ground_truth import gaussian_mean_advantage

    d, n = 8, a.n
    g = torch.Generator().manual_seed(a.seed)
    x = 2.0 + torch.randn(n, d, generator=g)
    y = ((x[:, 0] - 2.0) + 0.5 * torch.randn(n, generator=g) > 0).long()
    torch.manual_seed(a.seed)

    def make() -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(d, momentum=None, affine=False), nn.Linear(d, 2))

    model = make()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(20):
        for idx in torch.randperm(n, generator=g).split(100):
            opt.zero_grad()
            ce(model(x[idx]), y[idx]).mean().backward()
            opt.step()
    model.eval()  # the head polished with the statistics frozen (eval mode): at a minimum of the model assessed
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                              tolerance_change=1e-15)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = ce(model(x), y).mean() + a.decay / 2 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    lbfgs.step(closure)
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    loaded = make()
    loaded.load_state_dict(state, strict=False)
    gap = float((loaded[0].running_mean - x.mean(0)).abs().max())
    print(f"bn-counter: n = {n}, d = {d}; running mean - training mean {gap:.1e}; num_batches_tracked "
          f"{int(model[0].num_batches_tracked)} trained, {int(loaded[0].num_batches_tracked)} loaded", flush=True)
    schemes = a.schemes or ["rtn_int2", "rtn_int4", "int8_weight_only"]
    for name, m in (("trained", model), ("loaded", loaded)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = assess(m.eval(), schemes, DataLoader(list(zip(x, y)), batch_size=100), ce, weight_decay=a.decay)
        named = rep.diagnostics.get("running_statistics_layers")
        print(f"  {name}: baseline {rep.baseline_leakage:.4f}; running statistics named: {named}; " + "; ".join(
            f"{s} {rep.schemes[s].leakage:.4f} [{rep.schemes[s].interval[0]:.4f}, {rep.schemes[s].interval[1]:.4f}] "
            f"{'* ' + '; '.join(regime_failures(rep.diagnostics, rep.n, rep.d, rep.schemes[s].d_eff)) if regime_failures(rep.diagnostics, rep.n, rep.d, rep.schemes[s].d_eff) else ''}"
            for s in schemes), flush=True)
    exact = gaussian_mean_advantage(n, d)
    rng = np.random.default_rng(a.seed)
    sims = a.models * 10_000
    z = rng.standard_normal((sims, d))  # the member (mu = 0 in these units)
    mean = (z + np.sqrt(n - 1) * rng.standard_normal((sims, d))) / n  # with the other n - 1 records
    fresh = rng.standard_normal((sims, d))
    s_in, s_out = (z * mean).sum(1), (fresh * mean).sum(1)
    h = sims // 2  # the threshold picked on the first half, the advantage read on the second
    ts = np.quantile(np.concatenate([s_in[:h], s_out[:h]]), np.linspace(0.01, 0.99, 197))
    t = ts[int(np.argmax([(s_in[:h] >= t).mean() - (s_out[:h] >= t).mean() for t in ts]))]
    adv = float((s_in[h:] >= t).mean() - (s_out[h:] >= t).mean())
    se = float(np.sqrt(2 * 0.25 / (sims - h)))
    print(f"  the running mean alone: exact advantage {exact:.4f}; real attack {adv:.4f} +- {se:.4f} ({sims} training "
          "sets, the threshold picked on half of them)")


def linear_twins(a: argparse.Namespace) -> None:
    """Models linear in their weights whose estimator is exactly a plain ``nn.Linear``'s: the same
    ridge minimum read through (``tied-linear``) one ``Linear`` called on ``x1 + x2``, the same
    ``Linear`` called on ``x1`` and on ``x2``, and two ``Linear`` holders of one tied weight; or
    (``conv-linear``) a ``Conv2d(2, 2, 3, padding=1, stride=2)`` summed over positions and the
    ``Linear(18, 2)`` on its summed unfolded patches. Their figures must agree (the grids are per
    row of the same weights); ``estimation="exact"`` over every record (``num_records=n``)."""
    g = torch.Generator().manual_seed(a.seed)
    n, lam = a.n, 1e-3
    if a.kind == "tied-linear":
        d = 6
        x1, x2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
        feats, inputs = x1 + x2, torch.stack([x1, x2], 1).float()
        y = feats @ torch.linspace(-1, 1, d, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        y = y[:, None]
    else:
        x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
        feats, inputs = F.unfold(x, 3, padding=1, stride=2).sum(-1), x.float()
        y = feats @ (0.3 * torch.randn(18, 2, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(n, 2, generator=g,
                                                                                                  dtype=torch.float64)
    k = feats.shape[1]
    w = torch.linalg.solve(feats.T @ feats / n + lam * torch.eye(k, dtype=torch.float64), feats.T @ y / n).T.float()

    class Twin(nn.Module):
        def __init__(self, form: str) -> None:
            super().__init__()
            self.form = form
            self.a = nn.Conv2d(2, 2, 3, padding=1, stride=2, bias=False) if form == "conv" else \
                nn.Linear(k, w.shape[0], bias=False)
            if form == "tied":
                self.b = nn.Linear(k, w.shape[0], bias=False)
                self.b.weight = self.a.weight
            with torch.no_grad():
                self.a.weight.copy_(w.reshape(self.a.weight.shape))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.form == "conv":
                return self.a(x).sum((2, 3))
            if self.form == "sum":
                return self.a(x[:, 0] + x[:, 1]) if x.dim() == 3 else self.a(x)
            if self.form == "twice":
                return self.a(x[:, 0]) + self.a(x[:, 1])
            return self.a(x[:, 0]) + self.b(x[:, 1])

    forms = [("sum", inputs), ("twice", inputs), ("tied", inputs)] if a.kind == "tied-linear" else \
        [("conv", inputs), ("sum", feats.float())]
    schemes = a.schemes or ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int2", "float8_weight_only",
                            "rtn_int4"]
    mse = lambda o, t: 0.5 * ((o - t) ** 2).sum(-1)  # noqa: E731
    print(f"{a.kind}: n = {n}, d = {w.numel()}, ridge {lam:g}", flush=True)
    for form, inp in forms:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = assess(Twin(form), schemes, DataLoader(list(zip(inp, y.float())), batch_size=250), mse,
                         weight_decay=lam, estimation="exact", num_records=n, strict=False)
        print(f"  {form:6s} baseline {rep.baseline_leakage:.5f}; " + "; ".join(
            f"{s} {rep.schemes[s].leakage:.5f} [{rep.schemes[s].interval[0]:.5f}, {rep.schemes[s].interval[1]:.5f}]"
            if not rep.schemes[s].error else f"{s} failed" for s in schemes), flush=True)


def refusals(a: argparse.Namespace) -> None:
    """Set-ups whose figures would be wrong, each refused with its reason (the first words printed):
    dict batches without ``batch_fn``; ``nn.MultiheadAttention`` without ``batch_first=True`` on
    ``[B, T, E]`` inputs (attention across the batch: records mixed); an embedding tied to its
    output ``Linear`` under ``int8_weight_only`` and ``native_int8_dynamic`` (which leave the tied
    weight in float everywhere)."""
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(200, 4, 3, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long()

    class Mixed(nn.Module):  # batch_first forgotten: dim 0 (the batch) is read as the sequence
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.att, self.h = nn.Linear(3, 4), nn.MultiheadAttention(4, 1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.inp(x)
            return self.h((z + self.att(z, z, z, need_weights=False)[0]).mean(1))

    tokens = torch.randint(0, Emb.V, (200, 4), generator=g)
    cases = [("dict batches, no batch_fn", nn.Linear(3, 2), DataLoader([{"x": r[0], "y": t} for r, t in zip(x, y)],
                                                                        batch_size=50), ["rtn_int4"]),
             ("MultiheadAttention without batch_first", Mixed(), DataLoader(list(zip(x, y)), batch_size=50), ["rtn_int4"]),
             ("tied embedding, int8_weight_only", Emb(), DataLoader(list(zip(tokens, tokens[:, 0])), batch_size=50),
              ["int8_weight_only"]),
             ("tied embedding, native_int8_dynamic", Emb(), DataLoader(list(zip(tokens, tokens[:, 0])), batch_size=50),
              ["native_int8_dynamic"])]
    for what, model, loader, schemes in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assess(model, schemes, loader, ce, uncertainty_draws=0)
            print(f"  {what}: NOT refused")
        except Exception as e:  # noqa: BLE001 -- printed: each case's refusal is the finding
            print(f"  {what}: {type(e).__name__}: {str(e)[:160]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=sorted(SCHEMES) + sorted(OTHER_MODES))
    ap.add_argument("--n", type=int, default=600, help="records per model (the pool holds 2 n)")
    ap.add_argument("--decay", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--targets", type=int, default=2, help="models whose indicator is computed")
    ap.add_argument("--rounds", type=int, default=1, help="L-BFGS calls per fit (300 iterations each)")
    ap.add_argument("--schemes", nargs="+", default=None, help="default: the mode's list")
    ap.add_argument("--estimation", nargs="+", default=["auto"], help="the indicator's estimators (assess's estimation=)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.kind in OTHER_MODES:
        return OTHER_MODES[a.kind](a)
    schemes = a.schemes or SCHEMES[a.kind]
    t0 = time.time()
    N = 2 * a.n
    x, y = pool(a.kind, N, a.seed)
    member = pool_splits(N, a.models, a.n, seed=a.seed)
    models, grads = [], []
    for m in range(a.models):
        torch.manual_seed(a.seed)  # one initialisation for all
        model = build(a.kind)
        idx = torch.from_numpy(np.flatnonzero(member[m]))
        grads.append(fit(model, x[idx], y[idx], a.decay, a.rounds))
        models.append(model.float().eval())
    t_fit = time.time() - t0
    d = sum(p.numel() for p in models[0].parameters())
    acc = np.mean([float((mm(_f32(x[member[i]])).argmax(1) == y[member[i]]).double().mean())
                   for i, mm in enumerate(models)])
    print(f"{a.kind}: d = {d}, n = {a.n}, pool {N}, {a.models} models, decay {a.decay:g} (train acc {acc:.3f}, "
          f"max |grad| {max(grads):.1e}; fit {t_fit:.0f} s)", flush=True)
    best = {}
    for sch in ["none"] + schemes:
        sig = [signals(quantized(mm, sch), _f32(x), y) for mm in models]
        neg_loss, conf, py = (np.stack([s[k] for s in sig]) for k in range(3))
        scores = {"loss": neg_loss, "lira_on": lira_scores(conf, member, True), "lira_off": lira_scores(conf, member, False),
                  "rmia_on": rmia_scores(py, member, True), "rmia_off": rmia_scores(py, member, False)}
        res = {k: pool_advantage(v, member, seed=a.seed) for k, v in scores.items()}
        top = max(res, key=lambda k: res[k].advantage)
        best[sch] = (top, res[top].advantage, res[top].advantage_se)
        print(f"  attacks {sch:22s} " + " ".join(f"{k} {r.advantage:.4f}" for k, r in res.items())
              + f" | best {top} {res[top].advantage:.4f} +- {res[top].advantage_se:.4f}", flush=True)
    t_att = time.time() - t0 - t_fit
    for m, mode in [(m, e) for m in range(min(a.targets, a.models)) for e in a.estimation]:
        idx = np.flatnonzero(member[m])
        xs = _f32(x[idx])
        if a.kind == "emb":
            loader = DataLoader(Records(xs, y[idx]), batch_size=200)
            kw = {"batch_fn": lambda b: (b["tokens"], b["label"])}
        else:
            loader = DataLoader(list(zip(xs, y[idx])), batch_size=200)
            kw = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = assess(models[m], schemes, loader, ce, weight_decay=a.decay, strict=False,
                         estimation=mode, **kw)
        print(f"  indicator, target {m} ({rep.estimation.get('estimator') or rep.estimation.get('mode')}): baseline {rep.baseline_leakage:.4f} "
              f"pool {rep.baseline_pool_leakage:.4f}", flush=True)
        for sch in schemes:
            s = rep.schemes[sch]
            if s.error:
                print(f"    {sch:22s} failed: {s.error[:120]}")
                continue
            flags = regime_failures(rep.diagnostics, rep.n, rep.d, s.d_eff)
            lo, hi = s.interval if s.interval else (float("nan"), float("nan"))
            top, adv, se = best[sch]
            below = "BELOW" if s.pool_leakage < adv - 2 * se else "ok"
            print(f"    {sch:22s} leakage {s.leakage:.4f} [{lo:.4f}, {hi:.4f}] pool {s.pool_leakage:.4f} | best attack "
                  f"{top} {adv:.4f} +- {se:.4f}: pool {below} | float {1 - s.quantized_fraction:.1%} "
                  f"| * {'; '.join(flags) or '-'}", flush=True)
        for w in rep.warnings:
            print("    warning:", w[:110])
    print(f"  wall: fit {t_fit:.0f} s, attacks {t_att:.0f} s, indicator {time.time() - t0 - t_fit - t_att:.0f} s", flush=True)


OTHER_MODES = {"bn-counter": bn_counter, "tied-linear": linear_twins, "conv-linear": linear_twins,
               "refusals": refusals}


if __name__ == "__main__":
    main()
