"""Exact first-order leakage of a quantized release with correlated weights (the reference
for functional/correlated.py; method.md section 3, "Correlated coordinates").

In standardised units the quantity is ``E_U |w' R^-1 m(U)|`` with ``U ~ N(0, R)`` and
``m(U) = E[U | box of U]``, the box being one cell per coordinate (uniform grids of step
``h_j`` in sd units, boundaries at ``(k + offset_j) h_j``). Boxes are drawn with ``U``; each
distinct box's conditional mean is computed by the GHK simulator (Geweke-Hajivassiliou-Keane:
sequential truncated draws along the Cholesky factor, weighted by the conditional box
probabilities), which is consistent for the box mean of a correlated Gaussian. The draws per
box adapt to the number of distinct boxes (coarse grids: few boxes, many draws each); the
simulator's antithetic pairs remove most of the upward bias of ``E|.|`` from a noisy box mean
(with plain draws this reference read 8-sd mid-cell boxes 25x high). The GHK simulator itself
is the library's (``functional.correlated.truncated_gaussian_means``); what this module adds is
the quantity with every coordinate's box, with no channel and no regression decomposition.
:func:`bivariate_exact_mean_abs` is exact for ``d = 2`` with no simulation at all (the check
of both).
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


def _phi(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x.square()) / math.sqrt(2.0 * math.pi)


def _Phi(x: Tensor) -> Tensor:
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def bivariate_exact_mean_abs(rho: float, influence: Tensor, step: Tensor, offset: Tensor,
                             reach: float = 12.0, nodes: int = 256) -> Tensor:
    """``E_U |w' R^-1 m(U)|`` per record ``[R]`` for ``d = 2`` with every coordinate on its grid,
    by an exact sum over the cells (no Monte Carlo anywhere: an independent check of the GHK
    simulator and of :func:`exact_mean_abs`).

    ``U ~ N(0, [[1, rho], [rho, 1]])``. Per cell ``[a, b]``: its probability
    ``P = int_{a_1}^{b_1} phi(x) [Phi((b_2 - rho x) / s) - Phi((a_2 - rho x) / s)] dx``
    (``s = sqrt(1 - rho^2)``, Gauss-Legendre with ``nodes`` nodes) and its mean by Tallis'
    formula ``E[U_i 1{cell}] = sum_k R_ik (F_k(a_k) - F_k(b_k))``, ``F_k(x) = phi(x) P(other
    coordinate in its interval | U_k = x)``. Cells beyond ``reach`` sd are cut (mass < 1e-32).

    Args:
        rho: the correlation (``|rho| < 1``); influence: ``[R, 2]`` ``w``.
        step, offset: ``[2]`` grid steps (sd units) and boundary offsets (in steps, ``[0, 1)``).
    """
    import numpy as np

    if not abs(rho) < 1.0:
        raise ValueError(f"rho must lie in (-1, 1), got {rho}")
    step = step.to(torch.float64)
    offset = offset.to(torch.float64)
    s = math.sqrt(1.0 - rho * rho)
    edges = []
    for j in range(2):
        k = torch.arange(math.floor(-reach / float(step[j]) - 2), math.ceil(reach / float(step[j]) + 2),
                         dtype=torch.float64)
        e = ((k + offset[j]) * step[j]).clamp(-reach, reach)
        edges.append(torch.unique(e))
    x_gl, w_gl = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(nodes))

    def cond(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:  # P(lo <= other <= hi | this = x)
        return _Phi((hi - rho * x) / s) - _Phi((lo - rho * x) / s)

    a1, b1 = edges[0][:-1], edges[0][1:]
    a2, b2 = edges[1][:-1], edges[1][1:]
    A1, A2 = torch.meshgrid(a1, a2, indexing="ij")
    B1, B2 = torch.meshgrid(b1, b2, indexing="ij")
    A1, A2, B1, B2 = (t.reshape(-1) for t in (A1, A2, B1, B2))
    # P(cell) by Gauss-Legendre along the first coordinate
    xs = 0.5 * (B1 + A1).unsqueeze(1) + 0.5 * (B1 - A1).unsqueeze(1) * x_gl
    P = 0.5 * (B1 - A1) * (w_gl * _phi(xs) * cond(xs, A2.unsqueeze(1), B2.unsqueeze(1))).sum(1)
    F1 = _phi(A1) * cond(A1, A2, B2) - _phi(B1) * cond(B1, A2, B2)
    F2 = _phi(A2) * cond(A2, A1, B1) - _phi(B2) * cond(B2, A1, B1)
    m1 = (F1 + rho * F2) / P.clamp_min(1e-300)
    m2 = (rho * F1 + F2) / P.clamp_min(1e-300)
    keep = P > 0
    m = torch.stack([m1, m2], 1)[keep]
    R = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    a = torch.linalg.solve(R, influence.to(torch.float64).T).T
    return (P[keep].unsqueeze(1) * (m @ a.T).abs()).sum(0) / P[keep].sum()


def channel_quadratic(root: Tensor, coef: Tensor, kappa: Tensor, digits: int = 80) -> Tensor:
    """The Gaussian channel's ``s2 = Var E[w'R^+U | Y]`` per record ``[R]``, in ``digits``-digit
    arithmetic (mpmath), for a correlation given by a factor: the reference of the full form
    ``Correlation.quadratic`` on singular and near-singular ``R`` (method.md section 3,
    "Correlated coordinates").

    ``R = root root'`` (``root [d, r]`` of full column rank ``r <= d``; unit rows for a correlation) and ``w = root
    coef'`` (``coef [R, r]``), both formed exactly from the float64 entries, so ``w`` lies in
    ``R``'s range with no rank decision. ``Y_j = U_j + e_j``, ``Var e_j = (1 - kappa_j) / kappa_j``:
    coordinates with ``kappa = 0`` are left out, those with ``kappa = 1`` get ``Var e =
    10^-(digits / 2)`` (the exact observation as a limit: ``s2`` is continuous there), and
    ``s2 = w'(R + V)^-1 w`` by a direct solve (no eigendecomposition, no channel matrix, no
    cutoff: a construction independent of the library's).

    Raises:
        ValueError: ``kappa`` outside ``[0, 1]`` or shapes that do not match.
    """
    import mpmath

    d, r = root.shape
    if coef.shape[-1] != r or kappa.shape != (d,):
        raise ValueError(f"root {tuple(root.shape)}, coef {tuple(coef.shape)} and kappa {tuple(kappa.shape)} do not match")
    if bool(((kappa < 0) | (kappa > 1)).any()):
        raise ValueError("kappa must lie in [0, 1]")
    with mpmath.workdps(digits):
        tiny = mpmath.mpf(10) ** (-(digits // 2))
        on = [j for j in range(d) if float(kappa[j]) > 0]
        B = mpmath.matrix([[mpmath.mpf(float(root[j, i])) for i in range(r)] for j in on])
        V = [tiny if float(kappa[j]) == 1.0 else (1 - mpmath.mpf(float(kappa[j]))) / mpmath.mpf(float(kappa[j]))
             for j in on]
        A = B * B.T
        for i in range(len(on)):
            A[i, i] += V[i]
        out = []
        for row in coef.to(torch.float64).tolist():
            w = B * mpmath.matrix([mpmath.mpf(x) for x in row])
            out.append(float((w.T * mpmath.lu_solve(A, w))[0]))
    return torch.tensor(out, dtype=torch.float64)
