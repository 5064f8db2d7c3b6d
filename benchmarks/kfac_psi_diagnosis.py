"""Why the K-FAC ``psi`` influences lower the diagonal estimator's headline on ReLU MLP classifiers
at weight decay 1e-2 (kfd34; docs/validation.md "The K-FAC correction for MLP classifiers on every diagonal path", "The K-FAC correction for MLP classifiers (2026-12-03)"). One case of
``benchmarks/kfac_classifier.py`` (the same data, model and L-BFGS fit, ``--fit-rounds`` calls of up
to 1,000 iterations), the exact estimator and the diagonal one (its default: the sampled-label
Gauss-Newton diagonal, kf33's K-FAC partial traces, ``psi`` influences), then:

* **scale**: per layer, the Kronecker model's diagonal ``diag((A / k) (x) (G / k))`` (A rescaled to
  the Gauss-Newton diagonal's trace, as the estimator does) over the exact Gauss-Newton diagonal,
  the sampled-label diagonal over the exact one, and the exact Hessian's within-layer diagonal
  ``H_jj - lambda`` over the Gauss-Newton one; the share of weights with ``GGN_jj < lambda``;
* **psi**: per layer, the median over weights of the cosine (over the 512 stored records) between
  a candidate's influences and the exact estimator's ``psi = -H^-1 (g - g_bar)``: the gradients
  (what the diagonal estimator stores without K-FAC), the estimator's K-FAC psi, and
  ``-B^-1 (g - g_bar)`` with ``B`` the exact ``H`` cut to its within-layer blocks (a Linear layer's
  weight and bias together), the exact Gauss-Newton cut the same way (+ lambda), and the whole
  exact ``H`` recomputed here (a check on the estimator's own);
* **headline**: the diagonal estimate scored (``score_schemes``, ``uncertainty_draws=0``) with its
  influences swapped for each candidate's (each weight's column scaled to unit mean square, times
  the estimate's leverage factor), under the diagonal estimator's ``sigma`` and under the exact
  one's; over the exact estimator's own figures. Which of sigma, the influences' correlation and
  the diagonal estimator's correlation model (a cross-fitted factor model of the stored
  influences) carries the gap.

    PYTHONPATH=. python benchmarks/kfac_psi_diagnosis.py --seeds 0 1 --fit-rounds 3 30
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import warnings
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kfac_classifier import SCHEMES, ce, data, fit, mlp  # noqa: E402
from mis_lightning.assess import run_estimation, score_schemes  # noqa: E402
from mis_lightning.config import EstimationConfig  # noqa: E402
from mis_lightning.estimation.records import record_keys  # noqa: E402

E = importlib.import_module("mis_lightning.estimation.estimate")


def estimate_keeping_state(model, loader, mode: str, decay: float):
    """``run_estimation`` that also returns the accumulator (its state holds the K-FAC factors)."""
    kept = {}
    orig = E.MomentAccumulator.finalize

    def finalize(self, state=None):
        kept["acc"] = self
        return orig(self, state)

    E.MomentAccumulator.finalize = finalize
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = run_estimation(model, loader, ce, EstimationConfig(mode=mode, weight_decay=decay))
    finally:
        E.MomentAccumulator.finalize = orig
    return est, kept["acc"]


def headline(est, model) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = score_schemes(est, model, SCHEMES, uncertainty_draws=0)
    return [rep.baseline_leakage] + [rep.schemes[s].leakage for s in SCHEMES]


def case(a: argparse.Namespace, seed: int, rounds: int) -> None:
    torch.set_num_threads(1)
    x, y = data(a.n, a.fan, a.classes, a.rho, seed)
    torch.manual_seed(seed)
    model = mlp(a.fan, a.hidden, a.classes, a.act).double()
    gmax = fit(model, x, y, a.decay, rounds)
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=250)
    exact, eacc = estimate_keeping_state(model, loader, "exact", a.decay)
    diag, dacc = estimate_keeping_state(model, loader, "diagonal", a.decay)
    names, off, n, R = exact.names, exact.offsets, exact.n, exact.influence.shape[0]
    d = exact.d
    acc = float((model(x).argmax(1) == y).double().mean())
    print(f"{a.act} {a.fan}-{'-'.join(map(str, a.hidden))}-{a.classes} decay {a.decay:g} seed {seed} rounds {rounds}: "
          f"d = {d}, train acc {acc:.3f}, max |grad| {gmax:.1e}; diagonal: {diag.estimator}", flush=True)
    lam = a.decay
    H = eacc.state["H_sum"].to(torch.float64) / n + lam * torch.eye(d, dtype=torch.float64)
    params = {k: p.detach() for k, p in model.named_parameters()}

    # per-record gradients (all n: g_bar) and the exact Gauss-Newton matrix, float64
    def loss1(p, xi, yi):
        return ce(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    g_all = vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)
    Gr = torch.cat([g_all[k].reshape(n, -1) for k in names], 1)
    gbar = Gr.mean(0)
    # the stored records (the default selection "hash": the R smallest content keys, sorted), centred
    stored = torch.sort(record_keys([x, y], None, n), stable=True).indices[:R]
    Gc = Gr[stored] - gbar

    def out1(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    J = vmap(torch.func.jacrev(out1), in_dims=(None, 0))(params, x)
    Jf = torch.cat([J[k].reshape(n, a.classes, -1) for k in names], 2)  # [n, C, d]
    pr = torch.softmax(model(x), 1).detach()
    Lh = torch.diag_embed(pr) - pr.unsqueeze(2) * pr.unsqueeze(1)
    GGN = torch.einsum("nci,ncd,ndj->ij", Jf, Lh, Jf) / n
    ggn_d = GGN.diagonal()
    h_mc = dacc.state["h_sum"].to(torch.float64) / n

    # layers: (module, [(name, slice)])
    layers: dict[str, list[tuple[str, slice]]] = {}
    for k in names:
        layers.setdefault(k.rpartition(".")[0], []).append((k, slice(*off[k])))
    block = torch.zeros(d, d, dtype=torch.float64)
    block_ggn = torch.zeros(d, d, dtype=torch.float64)
    for parts in layers.values():
        idx = torch.cat([torch.arange(s.start, s.stop) for _, s in parts])
        block[idx.unsqueeze(1), idx] = H[idx.unsqueeze(1), idx]
        block_ggn[idx.unsqueeze(1), idx] = GGN[idx.unsqueeze(1), idx]
    block_ggn += lam * torch.eye(d, dtype=torch.float64)

    # the estimator's Kronecker model's diagonal per weight (its _kfac_blocks: A rescaled to the trace)
    kdiag = torch.full((d,), float("nan"), dtype=torch.float64)
    prog = dacc._kron_program()
    for _, blk, parts in dacc._kfac_blocks(dacc.state, n, prog, []):
        A, G, k = parts[0][0], parts[0][1], parts[0][2]
        kd = (G.diagonal() / k).unsqueeze(1) * (A.diagonal() / k).unsqueeze(0)  # [out, p]
        if blk.weight is not None:
            kdiag[slice(*off[blk.weight])] = kd[:, : blk.fan].reshape(-1)
        if blk.bias is not None:
            kdiag[slice(*off[blk.bias])] = kd[:, -1]
    live = ggn_d > 1e-12 * float(ggn_d.max())
    print("  scale (medians over live weights; [p10, p90]):", flush=True)
    for parts in layers.values():
        for k, s in parts:
            lv = live[s]

            def q(t: torch.Tensor, lv: torch.Tensor = lv) -> str:
                t = t[lv]
                return f"{float(t.median()):.3g} [{float(t.quantile(0.1)):.3g}, {float(t.quantile(0.9)):.3g}]"
            print(f"    {k:9s} K-FAC diag / GGN diag {q(kdiag[s] / ggn_d[s])}; sampled-label / GGN {q(h_mc[s] / ggn_d[s])}; "
                  f"(H_jj - lambda) / GGN {q((H.diagonal()[s] - lam) / ggn_d[s])}; GGN_jj / lambda {q(ggn_d[s] / lam)}; "
                  f"share GGN_jj < lambda {float((ggn_d[s][lv] < lam).double().mean()):.2f}", flush=True)

    # candidates' influences [R, d] (unscaled psi or gradients)
    def solve(M: torch.Tensor) -> torch.Tensor:
        return -torch.linalg.solve(M, Gc.T).T

    cands = {
        "gradients": Gc,
        "K-FAC psi (estimator)": diag.influence.to(torch.float64),
        "block exact H": solve(block),
        "block GGN + lambda": solve(block_ggn),
        "full exact H": solve(H),
        "exact estimator": exact.influence.to(torch.float64),
    }
    ref = cands["exact estimator"]

    def cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u * v).sum(0) / (u.norm(dim=0) * v.norm(dim=0)).clamp_min(1e-300)

    print("  per-weight cosine with the exact estimator's influences (median per tensor; d-weighted mean):", flush=True)
    for nm, W in cands.items():
        c = cos(W, ref)
        print(f"    {nm:22s} " + " ".join(f"{k} {float(c[slice(*off[k])].median()):.3f}" for k in names)
              + f"  mean {float(c.mean()):.3f}", flush=True)
    rms = diag.unit_influence().to(torch.float64).square().mean(0).sqrt()
    print(f"  the estimator's stored influences' root mean square per weight (KFAC_INFLUENCE_SCALE "
          f"{getattr(E, 'KFAC_INFLUENCE_SCALE', 'sigma')!r}; unit influences): " + " ".join(
              f"{k} {float(rms[slice(*off[k])].median()):.3f} [{float(rms[slice(*off[k])].quantile(0.1)):.3f}, "
              f"{float(rms[slice(*off[k])].quantile(0.9)):.3f}]" for k in names), flush=True)
    own = headline(diag, model)
    ex = headline(exact, model)
    print("  the diagonal estimate as it is, over the exact estimator: " + " ".join(
        f"{s} {v / e:.3f}" for s, v, e in zip(["baseline"] + SCHEMES, own, ex)), flush=True)
    print("  exact estimator: " + " ".join(f"{s} {v:.4f}" for s, v in zip(["baseline"] + SCHEMES, ex)), flush=True)
    for lab, sig in (("diagonal sigma", diag.sigma), ("exact sigma", exact.sigma)):
        print(f"  headline / exact, the diagonal estimate with {lab} and the influences of:", flush=True)
        for nm, W in cands.items():
            rms = W.square().mean(0).sqrt()
            Wu = torch.where(rms > 0, W / rms.clamp_min(1e-300), torch.zeros(())) * diag.influence_scale
            est = dataclasses.replace(diag, sigma=sig, influence=Wu.to(diag.influence.dtype))
            hl = headline(est, model)
            print(f"    {nm:22s} " + " ".join(f"{s} {v / e:.3f}" for s, v, e in zip(["baseline"] + SCHEMES, hl, ex)),
                  flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--act", default="relu", choices=["relu", "tanh"])
    ap.add_argument("--hidden", nargs="*", type=int, default=[80])
    ap.add_argument("--fan", type=int, default=20)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--decay", type=float, default=1e-2)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--fit-rounds", nargs="+", type=int, default=[3])
    a = ap.parse_args(argv)
    for seed in a.seeds:
        for r in a.fit_rounds:
            case(a, seed, r)


if __name__ == "__main__":
    main()
