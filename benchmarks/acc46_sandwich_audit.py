"""acc44's audit trainings scored with the full correlated form through the sandwich's own factor
(rc46, ``estimate.SANDWICH_FACTOR = True``) and in ``R``'s own eigenspace (cf45's form, ``False``),
on the same trainings (acc46; docs/benchmarks.md, "acc44" for the attacks, "acc46" for this table).

The attack side does not depend on the form (it never calls the library's scoring): its figures are
acc44's (same seeds). This re-runs the indicator side only: ``benchmarks/acc44_softmax_audit.py``'s
``indicator`` per setting, and ``benchmarks/acc44_mlp_audit.py``'s trainings (``--mlp``), each assessed
twice, and prints the mean headline of each form, the largest per-training relative difference and the
lowest training's headline of each form (against acc44's attack).

    PYTHONPATH=. python benchmarks/acc46_sandwich_audit.py                 # the softmax settings
    PYTHONPATH=. python benchmarks/acc46_sandwich_audit.py --mlp           # acc44's MLP (4 trainings)

Runtime (1 thread): about 1-3 CPU min per softmax setting, 2 min for the MLP.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import acc44_mlp_audit as MA  # noqa: E402
from benchmarks import acc44_softmax_audit as SA  # noqa: E402
from mis_lightning.assess import assess  # noqa: E402

E = importlib.import_module("mis_lightning.estimation.estimate")  # the module (the package exports a function of that name)
# acc44's table rows (its command's flags): n, prior, lam, wd told, stratify is attack-side only
SETTINGS = {
    "--n 75": dict(n=75),
    "--n 150": dict(n=150),
    "--n 300": dict(n=300),
    "--n 150 --prior 0.95 0.04 0.01": dict(n=150, prior=[0.95, 0.04, 0.01]),
    "--n 300 --lam 0.1 --no-wd-told": dict(n=300, lam=0.1, wd_told=False),
}
SCHEMES = ["none", "int8_weight_only", "int8_weight_only_per_tensor", "float8_weight_only", "rtn_int4", "rtn_int2"]


def both(fn, *args):
    """``{True: fn(*args), False: fn(*args)}`` with ``SANDWICH_FACTOR`` set to each."""
    old, out = E.SANDWICH_FACTOR, {}
    try:
        for flag in (True, False):
            E.SANDWICH_FACTOR = flag
            out[flag] = fn(*args)
    finally:
        E.SANDWICH_FACTOR = old
    return out


def report(name: str, per: list[dict]) -> None:
    """``per``: one ``{flag: {scheme: leakage}}`` per training."""
    schemes = list(per[0][True])
    print(f"| {name} | " + " | ".join(
        f"{np.mean([p[True][s] for p in per]):.4f} / {np.mean([p[False][s] for p in per]):.4f} "
        f"({max(abs(p[True][s] / p[False][s] - 1) for p in per):.1e})" for s in schemes) + " |", flush=True)
    print(f"| {name}: lowest training, factor / R's eigenspace | " + " | ".join(
        f"{min(p[True][s] for p in per):.4f} / {min(p[False][s] for p in per):.4f}" for s in schemes) + " |", flush=True)


def softmax(trainings: int) -> None:
    print("| setting | " + " | ".join(SCHEMES) + " |  (mean headline factor / R's eigenspace (max rel. diff.))")
    for name, kw in SETTINGS.items():
        pop = SA.Pop(4, 3, kw.get("prior"), 1.0, 0)
        per = []
        for k in range(trainings):
            r = both(SA.indicator, pop, kw["n"], kw.get("lam", 1e-2), SCHEMES, k, kw.get("wd_told", True), 32)
            per.append({f: {s: v["res"][s][0] for s in SCHEMES} for f, v in r.items()})
        report(name, per)


def mlp(trainings: int) -> None:
    arch = MA.Arch(3, 3, 3)
    pop = MA.Pop(arch, 1.5, 0)
    lam, n = 1e-2, 300
    schemes = ["none", "int8_weight_only", "float8_weight_only", "rtn_int4", "rtn_int2"]
    g = torch.Generator().manual_seed(10_000)
    xp, yp = pop.draw((1, 30_000), g)
    th_pop, _, ok = MA.newton(arch, pop.teacher.clone(), xp, yp, 30_000 * lam, iters=60)
    assert bool(ok.all()), "population fit"

    def ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, t, reduction="none")

    per = []
    for k in range(trainings):
        gk = torch.Generator().manual_seed(20_000 + k)
        xk, yk = pop.draw((1, n), gk)
        th, _, okk = MA.newton(arch, th_pop.clone(), xk, yk, n * lam)
        if not bool(okk.all()):
            continue

        def one(th: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, k: int) -> dict:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = assess(arch.module(th[0]), schemes, DataLoader(TensorDataset(xk[0].float(), yk[0]), batch_size=n),
                             ce, estimation="exact", num_records=n, weight_decay=lam, uncertainty_draws=32, seed=k)
            return {s: rep.schemes[s].leakage for s in schemes}

        per.append(both(one, th, xk, yk, k))
    print("| MLP | " + " | ".join(schemes) + " |")
    report(f"MLP 3-3-3 d = {arch.d}, n = {n} ({len(per)} trainings)", per)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mlp", action="store_true", help="acc44's MLP instead of the softmax settings")
    ap.add_argument("--trainings", type=int, default=8)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    (mlp if a.mlp else softmax)(a.trainings)


if __name__ == "__main__":
    main()
