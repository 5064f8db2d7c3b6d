"""ex58: dg56's exact figure on kf33's ReLU 20-80-5 classifier (d = 2,085, n = 4,000) that no commit
reproduces, what the exact estimator reads when the weight decay it is told differs from the fit's, and
the scoring's per-layer eigendecompositions shared across schemes (docs/benchmarks.md, "ex58").

    python benchmarks/ex58_exact_check.py decay 1e-2 0      # the fit at decay 1e-2 assessed with weight_decay=0
    python benchmarks/ex58_exact_check.py decay 1e-2 1e-2   # ... with its own decay (dg57: 0.268 / 0.262 / 0.236)
    python benchmarks/ex58_exact_check.py basis 1e-2        # one exact estimate, scored with and without the cache
    python benchmarks/ex58_exact_check.py perturb 1e-2 1e-9 # the same fit from an initialisation moved by 1e-9 (relative)
    (``--load PATH``: the model's state saved by ``dg57_lira_auto.py attack ... --save``; else fitted here)

The model is dg56's: ``kfac_classifier.data(4000, 20, 5, 0.5, 0)``, ``torch.manual_seed(0)``, ``mlp(20, [80], 5)``
in float64, kf33's full-batch L-BFGS at the decay (~25 CPU s). One thread; ``uptime`` printed with every figure;
CPU seconds are ``time.process_time`` under the machine's load, compared only within one run.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning.config import EstimationConfig
from mis_lightning.estimation.estimate import estimate
from mis_lightning.functional import correlated

sys.path.insert(0, "benchmarks")
import kfac_classifier as kf  # noqa: E402 - kf33's classifiers and fit

torch.set_num_threads(1)
SCHEMES = ["none", "rtn_int8", "rtn_int4"]


def _uptime() -> str:
    return "load " + " / ".join(f"{v:.1f}" for v in os.getloadavg())


def model_and_loader(decay: float, load: str | None, nudge: float = 0.0) -> tuple[torch.nn.Module, DataLoader]:
    """dg56's model (above): loaded, or fitted from its initialisation times ``1 + nudge u`` (``u`` standard
    normal, seed 1; 0: dg56's own start)."""
    x, y = kf.data(4000, 20, 5, 0.5, 0)
    torch.manual_seed(0)
    model = kf.mlp(20, [80], 5, "relu").double()
    if load:
        model.load_state_dict(torch.load(load))
    else:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + nudge * torch.randn(p.shape, generator=g, dtype=p.dtype))
        t0 = time.process_time()
        grad = kf.fit(model, x, y, decay)
        print(f"   fit: max |gradient| {grad:.2e}, CPU {time.process_time() - t0:.0f} s", flush=True)
    return model.eval(), DataLoader(TensorDataset(x, y), batch_size=250)


def decay_mode(decay: float, told: float, load: str | None, nudge: float = 0.0) -> None:
    """``assess(estimation="exact")`` of the fit at ``decay`` told ``weight_decay=told``: the figures, the
    stored records' leverages and the warnings that name the decay or the fit's stationarity; ``nudge``: the
    fit from a moved start (:func:`model_and_loader`), its largest weight change against dg56's fit printed."""
    model, loader = model_and_loader(decay, load, nudge)
    if nudge:
        ref, _ = model_and_loader(decay, None)
        dw = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
        print(f"   max |w - w_dg56| {dw:.3g}", flush=True)
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ml.assess(model, SCHEMES, loader, kf.ce, strict=False, uncertainty_draws=0,
                        estimation_config=EstimationConfig(mode="exact", weight_decay=told))
    dg = rep.diagnostics
    print(f"== ReLU 20-80-5 fitted at decay {decay:g}, assessed with weight_decay={told:g}: exact "
          f"{' / '.join(f'{rep.schemes[s].leakage:.4g}' for s in SCHEMES)}; mean leverage {dg['mean_leverage']:.3g} "
          f"(max {dg['max_leverage']:.3g}, {dg.get('leverage_capped', 0)} capped of {rep.estimation['num_records']}); "
          f"CPU {time.process_time() - t0:.0f} s; {_uptime()}", flush=True)
    for w in rep.warnings:
        if any(k in w for k in ("weight_decay", "weight decay", "minimum", "stationary", "leverage")):
            print("   warning:", w[:400], flush=True)


def basis_mode(decay: float, load: str | None, rounds: int) -> None:
    """One exact estimate, scored ``rounds`` times each way, alternating: the per-layer blocks'
    eigendecompositions shared across schemes (``Correlation.restrict``'s cache, as committed) and
    rebuilt per call (the cache emptied before each restriction: the code before ex58). Prints each
    scoring's CPU seconds, the ``eigh`` calls by size, and whether every figure is bitwise the same."""
    model, loader = model_and_loader(decay, load)
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate(model, loader, kf.ce, mode="exact", weight_decay=decay)
    print(f"== exact estimate: CPU {time.process_time() - t0:.0f} s; {_uptime()}", flush=True)
    cached = correlated.Correlation.restrict

    def rebuilt(self: correlated.Correlation, index):  # type: ignore[no-untyped-def]
        self._blocks.clear()
        return cached(self, index)

    orig_eigh = torch.linalg.eigh
    counts: collections.Counter = collections.Counter()

    def counting_eigh(a, *args, **kw):  # type: ignore[no-untyped-def]
        counts[a.shape[-1]] += 1
        return orig_eigh(a, *args, **kw)

    figures: dict[str, list] = {"cached": [], "rebuilt": []}
    torch.linalg.eigh = counting_eigh
    try:
        for _ in range(rounds):
            for way in ("rebuilt", "cached"):
                correlated.Correlation.restrict = rebuilt if way == "rebuilt" else cached  # type: ignore[method-assign]
                counts.clear()
                t0 = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rep = ml.score_schemes(est, model, SCHEMES, uncertainty_draws=0)
                dt = time.process_time() - t0
                rows = [(r["scheme"], r.get("leakage"), r.get("leakage_low"), r.get("leakage_high")) for r in rep.rows()]
                figures[way].append(rows)
                print(f"   {way}: scoring CPU {dt:.1f} s; eigh calls by size {dict(sorted(counts.items()))}; "
                      f"{', '.join(f'{s} {v!r}' for s, v, _, _ in rows)}; {_uptime()}", flush=True)
    finally:
        correlated.Correlation.restrict = cached  # type: ignore[method-assign]
        torch.linalg.eigh = orig_eigh
    same = all(a == b for a in figures["cached"] for b in figures["rebuilt"])
    print(f"   every row's leakage and interval ends bitwise the same both ways: {same}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["decay", "basis", "perturb"])
    ap.add_argument("decay", type=float, help="the fit's weight decay (kf33: 1e-2 or 1e-3)")
    ap.add_argument("told", type=float, nargs="?", default=None,
                    help="decay: the weight_decay assess is told; perturb: the start's relative move")
    ap.add_argument("--load", default=None, help="a saved state of the model (else fitted here)")
    ap.add_argument("--rounds", type=int, default=2, help="basis: scorings each way")
    a = ap.parse_args()
    if a.mode == "decay":
        decay_mode(a.decay, a.decay if a.told is None else a.told, a.load)
    elif a.mode == "perturb":
        decay_mode(a.decay, a.decay, None, a.told or 1e-9)
    else:
        basis_mode(a.decay, a.load, a.rounds)


if __name__ == "__main__":
    main()
