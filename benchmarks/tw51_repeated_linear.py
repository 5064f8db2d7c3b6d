"""tw51: an nn.Linear called k > 1 times per forward in the diagonal estimator (docs/benchmarks.md, "tw51").

    python benchmarks/tw51_repeated_linear.py grads    # per-sample gradients, Gauss-Newton diagonal, K-FAC partial traces vs torch.func
    python benchmarks/tw51_repeated_linear.py twice    # fitted models: exact vs diagonal (REPEATED_LINEAR_CALLS on / off)
    python benchmarks/tw51_repeated_linear.py wide     # nu49's 794-weight twice-called tanh MLP (n = 2,000) and its untied twin
    python benchmarks/tw51_repeated_linear.py ab       # models without a repeated call: reports with the switch on / off
    python benchmarks/tw51_repeated_linear.py ab DIR   # the same, each report also written to DIR/NAME.json (compare checkouts)

``grads`` builds :class:`~mis_lightning.estimation.linear_factors.LayerProgram` on a tanh MLP whose square
Linear ``sq`` is called ``k`` times (``[B, 5]`` inputs, or ``[B, 6, 5]`` with a mean over the positions before
the head) and compares, on one batch of 16 records, its per-sample gradients with ``torch.func``'s
``vmap(grad)`` of the same model (``functional_call``), its Gauss-Newton diagonal (after ``batch_sums``: the
softmax loss gradient's share included) with ``sum_r J_r' L_r J_r`` (``jacrev`` Jacobians,
``L = diag(p) - p p'``), and its K-FAC factors (:data:`KFAC_CONV_FACTORS` ``"trace"``) with the partial traces of
that Gauss-Newton block of ``sq`` (max relative error to the largest entry, per quantity).

``twice`` fits nu48's 5-4-4-2 tanh MLP calling ``sq`` twice (``benchmarks/nu48_trial.py``: full-batch L-BFGS,
CE + wd 1e-2, n = 400), the same calling it 3 times, the twice model on ``[B, 3, 5]`` inputs (mean over the
positions before the head) and the untied twin (``sq2`` for the second call: one more layer, every layer once)
and prints ``assess``'s leakage (none / rtn_int8 / rtn_int4) with estimation="exact", "diagonal" and
"diagonal" with ``REPEATED_LINEAR_CALLS = False`` (the path before tw51), the diagonal's ratios to the exact
and its K-FAC diagnostics.

``ab`` assesses models that call every layer once and take the per-layer program (an MLP classifier, the
same on ``[B, 3, 5]`` inputs, a CNN with BatchNorm: ``tests/_nets.CNN`` on 200 random 8x8 images) with the
diagonal estimator, ``REPEATED_LINEAR_CALLS`` on and off, and prints whether the two reports' JSON
(``Report.to_json``) are the same bytes; with ``DIR`` it writes the first to ``DIR/mlp.json``, ``DIR/seq.json``,
``DIR/cnn.json`` (run from another checkout with its ``PYTHONPATH`` and ``cmp`` the files: a checkout without
the switch sets an attribute nothing reads).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import mis_lightning as ml

sys.path.insert(0, "benchmarks")
import nu48_trial as t  # noqa: E402 - session 48's data, fit and loss

torch.set_num_threads(1)
LF = importlib.import_module("mis_lightning.estimation.linear_factors")
SCHEMES = ["none", "rtn_int8", "rtn_int4"]


class Repeated(nn.Module):
    """``inp -> tanh -> (sq -> tanh) x k -> head``; ``untied``: the j-th call a layer of its own;
    ``seq``: inputs ``[B, T, 5]``, a mean over the positions before the head."""

    def __init__(self, k: int = 2, untied: bool = False, seq: bool = False, width: int = 4, out: int = 2) -> None:
        super().__init__()
        self.k, self.untied, self.seq = k, untied, seq
        self.inp, self.sq, self.head = nn.Linear(5, width), nn.Linear(width, width), nn.Linear(width, out)
        if untied:
            self.more = nn.ModuleList(nn.Linear(width, width) for _ in range(k - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for j in range(self.k):
            h = torch.tanh((self.more[j - 1] if self.untied and j else self.sq)(h))
        return self.head(h.mean(1) if self.seq else h)


def grads() -> None:
    f64 = torch.float64
    for seq in (False, True):
        for k in (2, 3):
            for dt in (torch.float32, f64):
                torch.manual_seed(0)
                m = Repeated(k, seq=seq, out=3).to(dt)
                b = 16
                x = torch.randn(b, *((6, 5) if seq else (5,)), dtype=dt)
                y = torch.randint(0, 3, (b,))
                names = [n for n, _ in m.named_parameters()]
                prog = LF.LayerProgram(m, t.ce, names, dt)
                prog.kron_rows = {mod: b for mod in prog.kron_layers()}
                fac = prog.batch(x, y, b)
                got = prog.grads_from_taps(fac[0], names)
                h = {n: v[2] for n, v in prog.batch_sums(fac, f64)[0].items()}
                A, G, _ = prog.kron_sums(fac, f64, prog.kron_rows)["sq"]
                prog.close()
                params = {n: p.detach() for n, p in m.named_parameters()}
                ref = vmap(grad(lambda p, xi, yi, m=m: t.ce(functional_call(m, p, (xi[None],)), yi[None])[0]),
                           in_dims=(None, 0, 0))(params, x, y)
                J = vmap(jacrev(lambda p, xi, m=m: functional_call(m, p, (xi[None],))[0]), in_dims=(None, 0))(params, x)
                pr = torch.softmax(m(x).detach().to(f64), -1)
                L = torch.diag_embed(pr) - pr[:, :, None] * pr[:, None, :]
                eg = max(float((got[n] - ref[n].reshape(b, -1)).abs().max() / ref[n].abs().max()) for n in names)
                eh = 0.0
                for n in names:
                    Jn = J[n].reshape(b, 3, -1).to(f64)
                    gg = torch.einsum("bcj,bcd,bdj->j", Jn, L, Jn)
                    eh = max(eh, float((h[n] - gg).abs().max() / gg.abs().max()))
                Js = torch.cat([J["sq.weight"].reshape(b, 3, 4, 4), J["sq.bias"].reshape(b, 3, 4, 1)], -1).to(f64)
                blk = torch.einsum("bcok,bcd,bdql->okql", Js, L, Js)  # the Gauss-Newton block [out, p, out, p]
                rA, rG = torch.einsum("okol->kl", blk), torch.einsum("okqk->oq", blk)
                ek = max(float((A[0] - rA).abs().max() / rA.abs().max()), float((G[0] - rG).abs().max() / rG.abs().max()))
                print(f"   {'[B, 6, 5]' if seq else '[B, 5]'} sq x{k} {str(dt)[6:]}: per-sample gradients {eg:.1e}, "
                      f"Gauss-Newton diagonal {eh:.1e}, K-FAC partial traces {ek:.1e}")


def _assess(model: nn.Module, x: torch.Tensor, y: torch.Tensor, estimation: str) -> ml.Report:
    loader, _ = t.loader_of(x, y, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ml.assess(model, SCHEMES, loader, t.ce, weight_decay=t.WD, estimation=estimation, strict=False)


def _line(label: str, rep: ml.Report, exact: ml.Report | None) -> None:
    figs = ", ".join(f"{s} {v.leakage:.6f}" + (f" ({v.leakage / exact.schemes[s].leakage:.3f}x)" if exact else "")
                     for s, v in rep.schemes.items())
    dg = rep.diagnostics
    kfac = (f"; kfac_correction {dg.get('kfac_correction')}, kfac_lost {dg.get('kfac_lost')!r}, "
            f"VIF median {dg.get('kfac_variance_inflation_median', float('nan')):.3g}") if exact else ""
    marks = sorted({w for row in rep.rows() for w in (row.get("indicative") or "").split("; ") if w})
    print(f"   {label:22s} {figs}{kfac}; marks {marks}")


def twice(cases: tuple[tuple[str, int, bool, bool], ...] = (("twice", 2, False, False), ("3x", 3, False, False),
                                                             ("twice [B, 3, 5]", 2, False, True),
                                                             ("untied twin", 2, True, False))) -> None:
    for name, k, untied, seq in cases:
        torch.manual_seed(0)
        x, y = t.data("flat", t.N, 0)
        if seq:
            g = torch.Generator().manual_seed(1)
            x = x[:, None, :] + 0.3 * torch.randn(x.shape[0], 3, x.shape[1], generator=g)
        model = t.fit(Repeated(k, untied, seq), x, y, t.ce)
        print(f"== {name}: {sum(p.numel() for p in model.parameters())} weights, n = {x.shape[0]}")
        exact = _assess(model, x, y, "exact")
        _line("exact", exact, None)
        _line("diagonal", _assess(model, x, y, "diagonal"), exact)
        if not untied:
            LF.REPEATED_LINEAR_CALLS = False
            try:
                _line("diagonal (switch off)", _assess(model, x, y, "diagonal"), exact)
            finally:
                LF.REPEATED_LINEAR_CALLS = True


def wide(width: int = 24, n: int = 2000) -> None:
    for untied in (False, True):
        torch.manual_seed(0)
        x, y = t.data("flat", n, 0)
        model = t.fit(Repeated(2, untied, width=width), x, y, t.ce)
        print(f"== {'untied twin' if untied else 'twice'}: {sum(p.numel() for p in model.parameters())} weights, n = {n}")
        exact = _assess(model, x, y, "exact")
        _line("exact", exact, None)
        _line("diagonal", _assess(model, x, y, "diagonal"), exact)
        if not untied:
            LF.REPEATED_LINEAR_CALLS = False
            try:
                _line("diagonal (switch off)", _assess(model, x, y, "diagonal"), exact)
            finally:
                LF.REPEATED_LINEAR_CALLS = True


def ab(out: str | None = None) -> None:
    sys.path.insert(0, "tests")
    from _nets import CNN  # tests/_nets.py

    torch.manual_seed(0)  # the models' initial weights
    g = torch.Generator().manual_seed(0)
    img = torch.randn(200, 1, 8, 8, generator=g)
    cases = {"mlp": (Repeated(2, untied=True), *t.data("flat", t.N, 0)),
             "seq": (Repeated(1, seq=True), torch.randn(t.N, 3, 5, generator=g), t.data("flat", t.N, 0)[1]),
             "cnn": (CNN(), img, torch.randint(0, 10, (200,), generator=g))}
    for name, (model, x, y) in cases.items():
        reps = []
        for on in (True, False):
            LF.REPEATED_LINEAR_CALLS = on
            try:
                reps.append(_assess(model.eval(), x, y, "diagonal").to_json())
            finally:
                LF.REPEATED_LINEAR_CALLS = True
        if out is not None:
            Path(out, f"{name}.json").write_text(reps[0])
        print(f"   {name}: reports with the switch on / off {'the same bytes' if reps[0] == reps[1] else 'DIFFER'}"
              f" ({len(reps[0]):,} characters)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["ab"] and len(sys.argv) == 3:
        ab(sys.argv[2])
        sys.exit()
    for case in sys.argv[1:] or ["grads", "twice", "ab"]:
        print(f"== {case}")
        {"grads": grads, "twice": twice, "wide": wide, "ab": ab}[case]()
