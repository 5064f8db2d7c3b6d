"""Closed-form check behind ``benchmarks/real_grid_positions.py`` (cg30): per-row absmax grids
(``rtn_int<b>``'s rule, outer cells unbounded) on rows of Gaussian weights, ``sum kappa`` read at
``theta-hat = theta* + sigma xi`` over trainings against three references.

    python benchmarks/real_grid_closed_form.py --trainings 32

Per bits and spread ``S`` (rows ``theta* ~ N(0, S^2)`` in sd units of ``theta-hat``, 64 weights,
256 rows), the mean over trainings of ``sum kappa(theta-hat; grid of theta-hat)`` (the plug-in's
``kappa`` sum, independent form) divided by:

* ``sum kappa(theta*; grid of theta*)`` (the scheme applied to ``theta*`` itself);
* ``sum kappa(theta*; grid of theta*)`` with the plug-in also read on ``theta*``'s grid (the
  smoothing alone, grid held fixed);
* the mean over the same trainings of ``sum kappa(theta*; grid of theta-hat)`` (the cells of the
  grid each training released, read at ``theta*``: the release's quantity, docs/validation.md "Where the population weights sit in their cells").

numpy/scipy only.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import special


def kappa_grid(theta: np.ndarray, scale: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """``[rows, g]`` ``kappa`` (sd units: ``sigma = 1``) of round-to-nearest on ``q * scale``,
    ``q`` in ``[qmin, qmax]``, the outer cells unbounded; ``scale [rows, 1]``."""
    q = np.arange(qmin + 1, qmax + 1)
    a = (q - 0.5) * scale[..., None] - theta[..., None]
    inf = np.full(a.shape[:-1] + (1,), np.inf)
    a = np.concatenate([-inf, a, inf], -1)
    fin = np.isfinite(a)
    pdf = np.where(fin, np.exp(-0.5 * np.where(fin, a, 0.0) ** 2) / np.sqrt(2 * np.pi), 0.0)
    lo, hi = a[..., :-1], a[..., 1:]
    p = np.where(lo > 0, special.ndtr(-lo) - special.ndtr(-hi), special.ndtr(hi) - special.ndtr(lo))
    return np.where(p > 1e-300, (pdf[..., :-1] - pdf[..., 1:]) ** 2 / np.maximum(p, 1e-300), 0.0).sum(-1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainings", type=int, default=32)
    ap.add_argument("--spread", nargs="+", type=float, default=[1, 2, 3, 5, 8, 15])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    for bits in a.bits:
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        for S in a.spread:
            th = S * rng.standard_normal((256, 64))
            sc = np.abs(th).max(1, keepdims=True) / qmax
            k0 = kappa_grid(th, sc, qmin, qmax).sum()
            vals = []
            for _ in range(a.trainings):
                tt = th + rng.standard_normal(th.shape)
                s1 = np.abs(tt).max(1, keepdims=True) / qmax
                vals.append((kappa_grid(tt, s1, qmin, qmax).sum(), kappa_grid(tt, sc, qmin, qmax).sum(),
                             kappa_grid(th, s1, qmin, qmax).sum()))
            v = np.array(vals)
            print(f"int{bits} S={S:>4g} step/sd={float(np.mean(sc)):6.2f} | plug-in / grid at theta* "
                  f"{v[:, 0].mean() / k0:.4f} | grid fixed {v[:, 1].mean() / k0:.4f} | "
                  f"/ released grid at theta* {v[:, 0].mean() / v[:, 2].mean():.4f}", flush=True)


if __name__ == "__main__":
    main()
