"""sm45: can one training's figures tell acc44's rare-class over-reading apart (item 5)?

acc44 (docs/benchmarks.md) found the unquantized headline 1.09x / 1.195x acc44's Gaussian reference
with a 1%-prior class at n / d = 20 / 10 (softmax regression, d = 15), against 0.99-1.04x elsewhere.
For 8 trainings per setting (acc44's `indicator` data and fits), two candidate signals a report
could compute: the exact estimator's largest leverage of a record (``diagnostics["max_leverage"]``),
and the fewest effective records along an eigendirection of the gradient covariance,
``(sum_i p_i^2)^2 / sum_i p_i^4`` of the records' centred gradients projected on it.

Run:  OMP_NUM_THREADS=1 python benchmarks/sm45_rare_class_signal.py   (~1 CPU min)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import acc44_softmax_audit as A  # noqa: E402

SETTINGS = [  # (n, prior, headline / Gaussian reference in acc44's table)
    (75, None, 1.023), (150, None, 1.024), (300, None, 1.026), (150, [0.85, 0.1, 0.05], 1.042),
    (300, [0.95, 0.04, 0.01], 1.091), (150, [0.95, 0.04, 0.01], 1.195), (750, [0.85, 0.1, 0.05], 1.000)]


def main() -> None:
    torch.set_num_threads(1)
    for n, prior, ratio in SETTINGS:
        pop = A.Pop(4, 3, prior, 1.0, 0)
        lev, neff, rare = [], [], []
        for k in range(8):
            g = torch.Generator().manual_seed(20_000 + k)
            x, y = pop.draw((1, n), g)
            th, _ = A.fit_base(A._aug(x), y, n * 1e-2, torch.cat([pop.W, pop.b[:, None]], -1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = A.assess(A.Softmax(th[0]), ["none"], DataLoader(TensorDataset(x[0].float(), y[0]), batch_size=n),
                               A.ce, estimation="exact", num_records=n, weight_decay=1e-2, uncertainty_draws=0, seed=k)
            lev.append(rep.diagnostics["max_leverage"])
            xa, t = A._aug(x)[0], th[0]
            p = torch.softmax(xa @ t.T, -1)
            G = ((p - torch.nn.functional.one_hot(y[0], 3).double())[:, :, None] * xa[:, None, :]).reshape(n, -1)
            Gc = G - G.mean(0)
            ev, U = torch.linalg.eigh(Gc.T @ Gc / n)
            P = Gc @ U
            e = P.square().sum(0) ** 2 / P.pow(4).sum(0)
            neff.append(float(e[ev > ev.max() * 1e-10].min()))
            rare.append(int(y[0].bincount(minlength=3).min()))
        print(f"n={n} prior={prior} (headline/ref {ratio}): max leverage {min(lev):.2f}-{max(lev):.2f}; fewest "
              f"effective records per direction {min(neff):.1f}-{max(neff):.1f} (median {sorted(neff)[4]:.1f}); "
              f"rarest class {min(rare)}-{max(rare)} records", flush=True)


if __name__ == "__main__":
    main()
