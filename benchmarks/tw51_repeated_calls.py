"""tw51: an nn.Linear or a convolution called k > 1 times per forward in the diagonal estimator (docs/benchmarks.md, "tw51").

    python benchmarks/tw51_repeated_calls.py grads    # per-sample gradients, Gauss-Newton diagonal, K-FAC partial traces vs torch.func
    python benchmarks/tw51_repeated_calls.py twice    # fitted models: exact vs diagonal (REPEATED_LINEAR_CALLS on / off)
    python benchmarks/tw51_repeated_calls.py conv     # fitted convolutions called twice: exact vs diagonal (REPEATED_CONV_CALLS on / off)
    python benchmarks/tw51_repeated_calls.py wide     # nu49's 794-weight twice-called tanh MLP (n = 2,000) and its untied twin
    python benchmarks/tw51_repeated_calls.py ab       # models without a repeated call: reports with the switch on / off
    python benchmarks/tw51_repeated_calls.py ab DIR   # the same, each report also written to DIR/NAME.json (compare checkouts)

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
"diagonal" with ``REPEATED_LINEAR_CALLS = REPEATED_CONV_CALLS = False`` (the path before tw51), the diagonal's ratios to the exact
and its K-FAC diagnostics.

``conv`` fits (as ``twice``, n = 400, 3 classes from two thresholds of a noisy linear functional of
AR(1) inputs ``[B, 2, 5]``, rho 0.7) ``tests/test_repeated_calls.ConvTwice`` (``Conv1d(2, 2, 3)`` called twice,
then a Linear head) and a siamese one (one ``Conv1d(2, 2, 3)`` on both halves of ``[B, 2, 2, 5]``, a Linear head
on the pair), with the convolution untied (a second Conv1d) as a twin, and prints the same lines.

``ab`` assesses models that call every layer once and take the per-layer program (an MLP classifier, the
same on ``[B, 3, 5]`` inputs, a CNN with BatchNorm: ``tests/_nets.CNN`` on 200 random 8x8 images) with the
diagonal estimator, ``REPEATED_LINEAR_CALLS`` and ``REPEATED_CONV_CALLS`` on and off, and prints whether the two reports' JSON
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
from test_repeated_calls import ConvTwice, case, per_sample_errors  # noqa: E402 - tests/test_repeated_calls.py: the reference

torch.set_num_threads(1)
LF = importlib.import_module("mis_lightning.estimation.linear_factors")
SCHEMES = ["none", "rtn_int8", "rtn_int4"]


def grads() -> None:
    for kind, ks in (("flat", (2, 3)), ("seq", (2, 3)), ("mixed", (2,)), ("conv1d", (2,)), ("conv1d_groups", (2,)),
                     ("conv2d_strided", (2,))):
        for k in ks:
            for dt in (torch.float32, torch.float64):
                e = per_sample_errors(*case(kind, k, dt))
                print(f"   {kind} x{k} {str(dt)[6:]}: per-sample gradients {e['gradients']:.1e}, "
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
        LF.REPEATED_LINEAR_CALLS = LF.REPEATED_CONV_CALLS = False
        try:
            _line("diagonal (switch off)", _assess(model, x, y, "diagonal"), exact)
        finally:
            LF.REPEATED_LINEAR_CALLS = LF.REPEATED_CONV_CALLS = True


def twice() -> None:
    for name, k, untied, seq in (("twice", 2, False, False), ("3x", 3, False, False),
                                 ("twice [B, 3, 5]", 2, False, True), ("untied twin", 2, True, False)):
        torch.manual_seed(0)
        x, y = t.data("flat", t.N, 0)
        if seq:
            g = torch.Generator().manual_seed(1)
            x = x[:, None, :] + 0.3 * torch.randn(x.shape[0], 3, x.shape[1], generator=g)
        _compare(name, Repeated(k, untied, seq), x, y, untied)


class Siamese(nn.Module):
    """One ``Conv1d(2, 2, 3)`` applied to both halves of a record ``[2, 2, 5]``, a Linear head on the
    pair; ``untied``: a second convolution for the second half."""

    def __init__(self, untied: bool = False) -> None:
        super().__init__()
        self.untied = untied
        self.conv, self.head = nn.Conv1d(2, 2, 3, padding=1), nn.Linear(20, 3)
        if untied:
            self.conv2 = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.tanh(self.conv(x[:, 0])), torch.tanh((self.conv2 if self.untied else self.conv)(x[:, 1]))
        return self.head(torch.cat([a, b], 1).flatten(1))


class UntiedConvTwice(ConvTwice):
    """:class:`ConvTwice` with a second convolution for the second call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv2(torch.tanh(self.conv(x)))).flatten(1))


def conv(n: int = 400) -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(n, 4, 5, generator=g)
    for j in range(1, 5):  # AR(1) along the positions
        e[..., j] = 0.7 * e[..., j - 1] + (1 - 0.7 ** 2) ** 0.5 * e[..., j]
    s = e[:, 0].sum(1) - 0.5 * e[:, 1, :2].sum(1) + 0.5 * e[:, 2].sum(1) - 0.3 * e[:, 3, 3:].sum(1)
    s = s + 0.8 * torch.randn(n, generator=g)
    y = (s > s.quantile(1 / 3)).long() + (s > s.quantile(2 / 3)).long()
    for name, make, x, untied in (("conv twice", ConvTwice, e[:, :2], False),
                                  ("conv twice, untied twin", UntiedConvTwice, e[:, :2], True),
                                  ("siamese conv", Siamese, e.reshape(n, 2, 2, 5), False),
                                  ("siamese conv, untied twin", lambda: Siamese(True), e.reshape(n, 2, 2, 5), True)):
        torch.manual_seed(0)
        _compare(name, make(), x.contiguous(), y, untied)


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
            LF.REPEATED_LINEAR_CALLS = LF.REPEATED_CONV_CALLS = on
            try:
                reps.append(_assess(model.eval(), x, y, "diagonal").to_json())
            finally:
                LF.REPEATED_LINEAR_CALLS = LF.REPEATED_CONV_CALLS = True
        if out is not None:
            Path(out, f"{name}.json").write_text(reps[0])
        print(f"   {name}: reports with the switch on / off {'the same bytes' if reps[0] == reps[1] else 'DIFFER'}"
              f" ({len(reps[0]):,} characters)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["ab"] and len(sys.argv) == 3:
        ab(sys.argv[2])
        sys.exit()
    for what in sys.argv[1:] or ["grads", "twice", "ab"]:
        print(f"== {what}")
        {"grads": grads, "twice": twice, "conv": conv, "wide": wide, "ab": ab}[what]()
