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

import mis_lightning as ml

sys.path.insert(0, "benchmarks")
import nu48_trial as t  # noqa: E402 - session 48's data, fit and loss

sys.path.insert(0, "tests")
from _nets import CNN, Repeated  # noqa: E402 - tests/_nets.py
from test_repeated_linear import per_sample_errors  # noqa: E402 - tests/test_repeated_linear.py: the reference

torch.set_num_threads(1)
LF = importlib.import_module("mis_lightning.estimation.linear_factors")
SCHEMES = ["none", "rtn_int8", "rtn_int4"]


def grads() -> None:
    for seq, mixed, ks in ((False, False, (2, 3)), (True, False, (2, 3)), (True, True, (2,))):
        for k in ks:
            for dt in (torch.float32, torch.float64):
                e = per_sample_errors(k, seq, mixed, dt)
                shape = "[B, 4] + [B, 6, 4] calls" if mixed else "[B, 6, 5]" if seq else "[B, 5]"
                print(f"   {shape} sq x{k} {str(dt)[6:]}: per-sample gradients {e['gradients']:.1e}, "
                      f"Gauss-Newton diagonal {e['gauss_newton']:.1e}, K-FAC partial traces {e['kfac_traces']:.1e}")


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


def _compare(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, untied: bool) -> None:
    """``model`` fitted, then assessed: exact, diagonal, and (a repeated call) diagonal with the switch off."""
    model = t.fit(model, x, y, t.ce)
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


def twice() -> None:
    for name, k, untied, seq in (("twice", 2, False, False), ("3x", 3, False, False),
                                 ("twice [B, 3, 5]", 2, False, True), ("untied twin", 2, True, False)):
        torch.manual_seed(0)
        x, y = t.data("flat", t.N, 0)
        if seq:
            g = torch.Generator().manual_seed(1)
            x = x[:, None, :] + 0.3 * torch.randn(x.shape[0], 3, x.shape[1], generator=g)
        _compare(name, Repeated(k, untied, seq), x, y, untied)


def wide(width: int = 24, n: int = 2000) -> None:
    for untied in (False, True):
        torch.manual_seed(0)
        x, y = t.data("flat", n, 0)
        _compare("untied twin" if untied else "twice", Repeated(2, untied, width=width), x, y, untied)


def ab(out: str | None = None) -> None:
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
