"""Exact first-order leakage of a quantized release with correlated weights (the reference
for functional/correlated.py; method.md section 3, "Correlated coordinates").

In standardised units the quantity is ``E_U |w' R^-1 m(U)|`` with ``U ~ N(0, R)`` and
``m(U) = E[U | box of U]``, the box being one cell per coordinate (uniform grids of step
``h_j`` in sd units, boundaries at ``(k + offset_j) h_j``). Boxes are drawn with ``U``; each
distinct box's conditional mean is computed by the GHK simulator (Geweke-Hajivassiliou-Keane:
sequential truncated draws along the Cholesky factor, weighted by the conditional box
probabilities), which is consistent for the box mean of a correlated Gaussian. The draws per
box adapt to the number of distinct boxes (coarse grids: few boxes, many draws each), which
keeps the upward bias of ``E|.|`` from a noisy box mean small. The GHK simulator itself is the
library's (``functional.correlated.truncated_gaussian_means``); what this module adds is the
quantity with every coordinate's box, with no channel and no regression decomposition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional.correlated import truncated_gaussian_means


def exact_mean_abs(corr: Tensor, influence: Tensor, step: Tensor, offset: Tensor, num_boxes: int = 4000,
                   budget: int = 6_000_000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``E_U |w' R^-1 m(U)|`` per record and its standard error (outer draws), both ``[R]``.

    Args:
        corr: ``[d, d]`` positive-definite correlation ``R``; influence: ``[R, d]`` ``w``.
        step, offset: ``[d]`` grid step (sd units) and boundary offset (in steps, ``[0, 1)``).
        num_boxes: outer draws of ``U``; budget: GHK draws x coordinates over all distinct boxes.
    """
    gen = torch.Generator().manual_seed(seed)
    corr = corr.to(torch.float64)
    chol = torch.linalg.cholesky(corr)
    d = corr.shape[0]
    U = torch.randn(num_boxes, d, dtype=torch.float64, generator=gen) @ chol.T
    cell = torch.floor(U / step - offset)
    uniq, inv = torch.unique(cell, dim=0, return_inverse=True)
    lo, hi = (uniq + offset) * step, (uniq + 1 + offset) * step
    draws = int(min(16384, max(256, budget // (len(uniq) * d))))
    per = max(1, 2_000_000 // (draws * d))
    m = torch.cat([truncated_gaussian_means(torch.zeros_like(lo[a : a + per]), chol, lo[a : a + per],
                                            hi[a : a + per], draws, gen)
                   for a in range(0, len(uniq), per)])[inv]
    a = torch.linalg.solve(corr, influence.to(torch.float64).T).T
    v = (m @ a.T).abs()
    return v.mean(0), v.std(0) / math.sqrt(num_boxes)
