"""The diagonal estimator against the exact one on models whose layers have a scale symmetry
(ln40; method.md section 6; mis_lightning/estimation/symmetries.py).

Per case: ``Conv1d(4, 8, 3)`` over ``[4, L]`` Gaussian inputs, then a normalisation (``--cases``:
``gn`` GroupNorm(2, 8), ``ln`` LayerNorm([8, L-2]), ``ln0`` the same without affine, ``tanh`` a
Tanh instead: the control without symmetry), flatten, ``Linear`` to 1 output (squared error) or
``C`` classes (cross-entropy); the target drawn from a teacher of the same class; the student fitted
by float64 L-BFGS. Then, with every record kept for nothing but the estimation (``num_records``
256, ``uncertainty_draws=0``), ``assess(..., estimation=e)`` for ``e`` in exact / diagonal / auto:
the leakage of ``rtn_int8`` and ``rtn_int4``, ``d_eff``, the exact estimator's flat directions, and
the estimator ``"auto"`` chose. ``mlp_ln`` / ``mlp_ln0`` / ``mlp_tanh`` (ln41): ``Flatten``,
``Linear(4 L, 16)``, LayerNorm(16) (``mlp_ln0``: no affine; ``mlp_tanh``: a Tanh instead), ReLU,
``Linear(16, C)``. ``--components``: which quantity is off, the diagonal estimate
scored with the exact estimator's sigma in place of its own (its influences and correlation kept),
and the diagonal / exact sigma per parameter tensor (median). ``--eps0``: the normalisation's
``eps`` set to 0 after the fit, so that its scale symmetry is exact and the exact estimator
projects it out (the figures should not move). Runtime: ~1-5 min CPU per case (the exact passes).

    python benchmarks/scale_symmetry.py                                 # gn ln ln0 tanh, n 4000, L 8
    python benchmarks/scale_symmetry.py --cases ln --classes 4 --length 32 --n 3000   # d = 1,548
    python benchmarks/scale_symmetry.py --cases gn ln0 --components
    python benchmarks/scale_symmetry.py --cases mlp_ln mlp_ln0 mlp_tanh --length 2 --n 1000 --components
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mis_lightning as ml  # noqa: E402
from mis_lightning.assess import score_schemes  # noqa: E402
from mis_lightning.estimation.estimate import estimate  # noqa: E402

SCHEMES = ["rtn_int8", "rtn_int4"]


def build(kind: str, length: int, classes: int) -> nn.Module:
    if kind.startswith("mlp_"):  # ln41: Flatten, Linear(4 L, 16), the norm, ReLU, Linear(16, C)
        norm = {"mlp_ln": [nn.LayerNorm(16)], "mlp_ln0": [nn.LayerNorm(16, elementwise_affine=False)],
                "mlp_tanh": [nn.Tanh()]}[kind]
        return nn.Sequential(nn.Flatten(), nn.Linear(4 * length, 16), *norm, nn.ReLU(), nn.Linear(16, classes)).double()
    pos = length - 2
    layers: list[nn.Module] = [nn.Conv1d(4, 8, 3)]
    layers += {"gn": [nn.GroupNorm(2, 8)], "ln": [nn.LayerNorm([8, pos])],
               "ln0": [nn.LayerNorm([8, pos], elementwise_affine=False)], "tanh": [nn.Tanh()]}[kind]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * pos, classes)).double()


def fitted(kind: str, n: int, length: int, classes: int, seed: int):
    """``(model, x, y, loss, max |grad|)``: the student at its L-BFGS minimum."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n, 4, length, generator=g, dtype=torch.float64)
    teacher = build(kind, length, classes)
    with torch.no_grad():
        out = teacher(x)
        if classes == 1:
            y = out[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        else:
            y = torch.distributions.Categorical(logits=out / out.std() * 1.5).sample()

    def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (o[:, 0] - t) ** 2 if classes == 1 else F.cross_entropy(o, t, reduction="none")

    m = build(kind, length, classes)
    opt = torch.optim.LBFGS(m.parameters(), max_iter=1000, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v = loss(m(x), y).mean()
        v.backward()
        return v

    for _ in range(5):
        opt.step(closure)
    closure()
    grad = max(float(p.grad.abs().max()) for p in m.parameters())
    return m.eval(), x, y, loss, grad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["gn", "ln", "ln0", "tanh"])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--length", type=int, default=8)
    ap.add_argument("--classes", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--components", action="store_true", help="the diagonal estimate with the exact sigma")
    ap.add_argument("--eps0", action="store_true", help="the norm's eps set to 0 after the fit")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for kind in a.cases:
        m, x, y, loss, grad = fitted(kind, a.n, a.length, a.classes, a.seed)
        for mod in m.modules() if a.eps0 else ():
            if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
                mod.eps = 0.0
        dl = DataLoader(TensorDataset(x, y), batch_size=500)
        d = sum(p.numel() for p in m.parameters())
        print(f"{kind}: d = {d}, n = {a.n}, L = {a.length}, classes {a.classes}, max |grad| {grad:.1e}", flush=True)
        ref = None
        for mode in ("exact", "diagonal", "auto"):
            t0 = time.process_time()
            r = ml.assess(m, SCHEMES, dl, loss, estimation=mode, uncertainty_draws=0, num_records=256)
            ref = ref or r
            dg = r.diagnostics
            print(f"  {mode:8s} {time.process_time() - t0:6.1f} s CPU  baseline {r.baseline_leakage:.4f} "
                  + " ".join(f"{s} {r.schemes[s].leakage:.4f} ({r.schemes[s].leakage / ref.schemes[s].leakage:.2f}x, "
                             f"d_eff {r.schemes[s].d_eff:.0f})" for s in SCHEMES)
                  + f"  flat {dg.get('flat_directions', '-')}, normalised {dg.get('normalised_layers', '-')}, "
                  f"marked {any(w.startswith('uncertain figures') for w in r.warnings)}; {r.estimation.get('estimator', r.estimation.get('mode'))}"
                  + f"; off-minimum {dg.get('not_at_minimum')} ({dg.get('minimum_offset_sd', float('nan')):.2g} sd), "
                  f"negative curvature {dg.get('negative_curvature')}, saddle not excluded "
                  f"{dg.get('curvature_unresolved')} (gradient norm ratio {dg.get('gradient_norm_ratio', float('nan')):.2g})",
                  flush=True)
        if a.components:
            ex = estimate(m, dl, loss, mode="exact", num_records=256)
            dg = estimate(m, dl, loss, mode="diagonal", num_records=256)
            swapped = dataclasses.replace(dg, sigma={k: ex.sigma[k].to(dg.sigma[k]) for k in dg.names})
            r = score_schemes(swapped, m, SCHEMES, uncertainty_draws=0)
            print("  diagonal with the exact sigma: " + " ".join(
                f"{s} {r.schemes[s].leakage:.4f} ({r.schemes[s].leakage / ref.schemes[s].leakage:.2f}x, "
                f"d_eff {r.schemes[s].d_eff:.0f})" for s in SCHEMES) + "; sigma diagonal / exact (median): " + ", ".join(
                f"{k} {float((dg.sigma[k] / ex.sigma[k]).median()):.3g}" for k in dg.names), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
