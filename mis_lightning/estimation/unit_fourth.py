"""The fourth powers of a Linear layer's standardised influences, per record and chunk of output
rows, for a whole parameter at once: ``B_rk = sum_{j in chunk k} w_rj^4`` (the unit column's power-4
sums, ``kappa = 1``), the ``B`` of the Gaussian form's diagnostics (method.md section 3, "Gaussian
form's diagnostics": ``|s4| <= 3 B``, ``s22 <= B``; ``clt_error_estimate = 3 B / (24 s2^2)`` where the
scheme-free bounds settle the diagnostics).

``w_rj = -(g_rj - gbar_j) / sqrt(V_jj)`` with ``g_r = d_r x_r^T`` (weight) or ``d_r`` (bias), 0 where
``V_jj <= V_NONE`` (as :func:`~.linear_factors.factored_power_sums`, whose sums of a column of ones
these are within the same float32 tolerance). Why a function of its own (docs/benchmarks.md, "p52a"):
a chunk-by-chunk call of ``factored_power_sums`` on the column of ones read each chunk's rows in
their own small GEMMs, summed the ``a = 0`` term and formed ``A / V^2`` per chunk and fell back to
float64 per chunk (~0.5 s of the 1e7 MLP's first scoring call). Here:

* the ``a = 0`` term ``G_k = sum_{j in k} gbar_j^4 / V_jj^2`` over every row (``(gbar^2 / V)^2``
  in float64, in cache-sized blocks);
* the terms ``a = 1..4`` over the rows whose ``d`` is non-zero on some record only (a silent row's
  are exact zeros): four float32 GEMMs over the whole parameter's such rows (whole chunks in groups
  within :data:`GROUP_FLOATS`), ``M_a = (x / s_x)^a (Q_a)^T`` with ``Q_a = (s_V / V)^2 (gbar / s_g)^(4-a)``
  (powers of two ``s``: exact rescalings), in float32 partial sums of :data:`BLOCK` inputs added in
  float64 where that is cheap (few rows), then ``sum_{o in k} (d_ro / s_d)^a M_a[r, o]`` in float64
  (a GEMM with the chunks' indicator);
* per entry the run-time bound of :func:`~.linear_factors._even_power_sums_f32` (Higham and Mary's
  probabilistic bound at ``lambda = POWER_SUMS_F32_LAMBDA`` for the float32 sums, Cauchy-Schwarz for
  the odd terms, an underflow term), and the entries beyond ``POWER_SUMS_F32_RTOL`` relative (or
  not finite) recomputed in float64, chunk by chunk, as that function's callers do.

A bias: the rows whose ``d`` is non-zero on some record in float64 directly
(``((d - gbar)^2 / V)^2``), the others' constant ``G``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._precision import full_float32
from . import linear_factors as _lf

__all__ = ["unit_fourth_sums"]

# elements per block of the a = 0 term's float64 pass (two [G_BLOCK] float64 buffers: in L2)
G_BLOCK = 1 << 16
# float32 roundings the bound counts beyond the GEMM's sums (x^a: at most 3, from x / s_x and x^2 in
# float32; Q_a: at most 6, the quotient, its square and three products by gbar / s_g; the GEMM's
# products: 1; 12 >= 10 with slack for the float64 steps: d^a, the contraction over the outputs)
ROUNDINGS = 12
# inputs per float32 partial sum of the GEMM over the inputs where the float64 additions of the
# partials ([R, L] each) come to at most SPLIT_BUDGET elements a term
BLOCK = 256
SPLIT_BUDGET = 1 << 21
# float32 elements of a group's [rows, in] temporaries (whole chunks: the parameter's in one group up to
# 2^22 weights that reach the GEMMs, the 1e7 MLP's every layer)
GROUP_FLOATS = 1 << 22


def _abs_max(t: Tensor) -> float:
    """``max |t|`` by one ``aminmax`` pass (no ``|t|`` temporary); NaN where ``t`` holds one."""
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def _indicator(cid: Tensor, K: int, dtype: torch.dtype) -> Tensor:
    """``[L, K]`` the 0 / 1 matrix of the rows' chunks ``cid [L]``."""
    out = torch.zeros(cid.numel(), K, dtype=dtype)
    out[torch.arange(cid.numel()), cid] = 1.0
    return out


def _pow2_at_least(m: float) -> float:
    """The least power of two ``>= m`` (1.0 where ``m`` is 0 or not finite)."""
    if not (m > 0.0 and math.isfinite(m)):
        return 1.0
    mant, e = math.frexp(m)
    return math.ldexp(1.0, e - 1) if mant == 0.5 else math.ldexp(1.0, e)


def _pow2_at_most(m: float) -> float:
    """The greatest power of two ``<= m`` (``m > 0`` finite)."""
    mant, e = math.frexp(m)
    return math.ldexp(1.0, e - 1)


def _zeroth_terms(gm: Tensor, vd: Tensor, rows: int, K: int, among: Tensor | None) -> Tensor:
    """``[K]`` float64 ``G_k = sum_{j in chunk k} [V_j > V_NONE] (gbar_j^2 / V_j)^2`` of ``gm``, ``vd``
    ``[out, in]`` (any float dtype; chunks of ``rows`` output rows), in blocks of at most
    :data:`G_BLOCK` elements (whole rows; one row where a row is longer); ``among``: a ``[out]``
    mask of the rows summed (``None``: every row)."""
    out, in_f = gm.shape
    G = torch.zeros(K, dtype=torch.float64)
    step = max(1, G_BLOCK // max(in_f, 1))
    bg = torch.empty(min(step, out) * in_f, dtype=torch.float64)
    bv = torch.empty_like(bg)
    wide = vd.dtype == torch.float64  # (a float64 V can lie in (0, V_NONE]: masked always)
    zero = torch.zeros((), dtype=torch.float64)
    for k in range(K):
        for o0 in range(k * rows, min(out, (k + 1) * rows), step):
            o1 = min(out, (k + 1) * rows, o0 + step)
            n = (o1 - o0) * in_f
            g = bg[:n].copy_(gm[o0:o1].reshape(-1))
            v = bv[:n].copy_(vd[o0:o1].reshape(-1))
            c = g.square_().div_(v)  # (float32 inputs: gbar^2 exact, one rounding in the quotient)
            if among is not None:
                c.view(o1 - o0, in_f).masked_fill_(~among[o0:o1, None], 0.0)
            s = float(torch.dot(c, c))
            if wide or not math.isfinite(s):  # dead weights (V = 0: inf or NaN) as the power sums take them
                c = torch.where(v > _lf.V_NONE, c, zero)
                s = float(torch.dot(c, c))
            G[k] += s
    return G


@full_float32  # (its float32 GEMMs' bound is IEEE float32's, not bf16's / TF32's)
def unit_fourth_sums(d: Tensor, x: Tensor, g_mean: Tensor, v_diag: Tensor, bias: bool, rows: int,
                     cache: _lf.PowerCache | None = None) -> Tensor:
    """``[R, K]`` float64 ``sum_{j in chunk k} w_rj^4`` of one Linear parameter (see the module
    docstring), chunk ``k`` its output rows ``k rows .. (k + 1) rows - 1`` (``K = ceil(out / rows)``).

    Args:
        d: ``[R, out]`` float64, the per-record gradients at the layer's outputs (``LinearFactors.d``).
        x: ``[R, in]`` float64, the layer's inputs (not read for a bias).
        g_mean, v_diag: the parameter's mean gradient and gradient variances, ``[out * in]`` (a
            weight) or ``[out]`` (a bias), float32 or float64 (the estimate's held tensors).
        bias: whether the parameter is the bias.
        rows: output rows per chunk (``>= 1``).
        cache: the layer's :class:`~.linear_factors.PowerCache` (the scaled input powers ``a = 1, 2``
            that the power-2 sums hold); ``None``: computed here.

    Each entry is within ``POWER_SUMS_F32_RTOL`` relative of the exact sum (the float32 terms' run-time
    bound, method.md section 3, "Power sums in float32", in its Cauchy-Schwarz form whatever
    ``FOURTH_POWER_CS_BOUND``; else recomputed in float64; all of them where 4 is not in
    ``POWER_SUMS_F32``). ``POWER_SUMS_F32_COUNTS`` counts entries (a record and chunk each).

    Raises:
        ValueError: shapes that do not match or ``rows < 1``.
    """
    R, out = d.shape
    in_f = 1 if bias else x.shape[1]
    if rows < 1 or g_mean.numel() != out * in_f or v_diag.numel() != out * in_f or (not bias and x.shape[0] != R):
        raise ValueError(f"unit_fourth_sums: d {tuple(d.shape)}, x {tuple(x.shape)}, g_mean {tuple(g_mean.shape)}, "
                         f"v_diag {tuple(v_diag.shape)}, rows {rows} do not match")
    K = -(-out // rows)
    gm, vd = g_mean.reshape(out, in_f), v_diag.reshape(out, in_f)
    on = d.abs().amax(0) != 0  # the rows some record's gradient reaches (NaN: reached; one pass, no [R, out] mask)
    keep = on.nonzero().reshape(-1)
    G = _zeroth_terms(gm, vd, rows, K, ~on if bias else None)  # (a bias: its silent rows)
    total = G.unsqueeze(0).expand(R, K).clone()
    L = keep.numel()
    if L == 0:
        return total
    cid = keep // rows  # (non-decreasing: each chunk's rows are a slice of keep)
    if bias:  # float64 throughout on the rows that move: [R, L]
        v = vd.reshape(-1)[keep].to(torch.float64)
        c = ((d if L == out else d[:, keep]) - gm.reshape(-1)[keep].to(torch.float64)).square_().div_(v)
        if not bool(v.amin() > _lf.V_NONE):  # (NaN: False)
            c = torch.where(v > _lf.V_NONE, c, torch.zeros((), dtype=torch.float64))
        return total.add_(c.square_() @ _indicator(cid, K, torch.float64))
    cache = cache or _lf.PowerCache(budget=0)
    # whole chunks in groups of at most GROUP_FLOATS / in rows that reach the GEMMs (memory: a few
    # [rows, in] and [R, rows] temporaries a group, as the chunked sums' own)
    ends = torch.bincount(cid, minlength=K).cumsum(0).tolist()
    cap = max(1, GROUP_FLOATS // in_f)
    k0 = s0 = 0
    for k in range(K):
        if k + 1 < K and ends[k + 1] - s0 <= cap:
            continue
        if ends[k] > s0:  # (chunks k0..k, their rows keep[s0:ends[k]])
            sel = keep[s0: ends[k]]
            whole = s0 == 0 and ends[k] == out  # (every row: no gathered copies)
            _terms(total[:, k0: k + 1], G[k0: k + 1], d if whole else d[:, sel], x,
                   gm if whole else gm[sel], vd if whole else vd[sel], cid[s0: ends[k]] - k0, cache)
        k0, s0 = k + 1, ends[k]
    return total


def _terms(total: Tensor, G: Tensor, dL: Tensor, x: Tensor, gL: Tensor, vL: Tensor, cid: Tensor,
           cache: _lf.PowerCache) -> None:
    """Add the terms ``a = 1..4`` of :func:`unit_fourth_sums` to ``total [R, K]`` (a view: the group's
    chunks, whose ``a = 0`` terms are ``G [K]``): ``dL [R, L]``, ``gL``, ``vL`` ``[L, in]`` the group's
    rows that reach the GEMMs, ``cid [L]`` their chunks (``0..K-1``, non-decreasing)."""
    R, K = total.shape
    L, in_f = gL.shape
    v_least = float(vL.amin())
    live_all = v_least > _lf.V_NONE  # (NaN: False)
    if not live_all:
        v_least = float(torch.where(vL > _lf.V_NONE, vL, math.inf).amin())
    if not (v_least < math.inf):  # no live weight on these rows: G alone
        return
    sV = _pow2_at_most(v_least)
    sg = _pow2_at_least(_abs_max(gL))
    sx = float(cache.scale(x))
    sd = _pow2_at_least(_abs_max(dL))
    # Q_4 = (s_V / V)^2 in (0, 1], then Q_{a-1} = Q_a gbar / s_g: in the held tensors' dtype (float32 at
    # scale: one rounding each; float64: one when cast for the GEMM); dead weights 0. V / s_V >= 1 (exact
    # scaling; inf where V / s_V overflows: Q 0, an underflow the bound's last term covers)
    f32 = torch.float32
    work = vL.dtype if vL.dtype in (torch.float32, torch.float64) else f32
    if work == f32 and min(sV, sg) < 2.0 ** -100:  # (1 / s beyond float32's range: the chain in float64)
        work = torch.float64
    q = vL.to(work).mul(1.0 / sV).reciprocal_()
    if not live_all:
        q = torch.where(vL > _lf.V_NONE, q, torch.zeros((), dtype=work))
    q.square_()
    gs = gL.to(work) * (1.0 / sg)
    # the GEMM over the inputs in float32 partial sums of BLOCK inputs each, added in float64, where
    # that adds at most SPLIT_BUDGET elements a term (the second and last layers' few rows: the bound's
    # sqrt(in) -> sqrt(BLOCK), ~1,000 -> ~30 of the 1e7 MLP's 16,384 second-layer entries beyond it);
    # the contraction with d^a over the chunk's rows in float64 ([R, L], held buffers for the four terms)
    nb = in_f // BLOCK if in_f > BLOCK and in_f % BLOCK == 0 and R * L * (in_f // BLOCK) <= SPLIT_BUDGET else 1
    blk = in_f // nb
    part = torch.empty(R, L, dtype=f32)
    acc = torch.empty(R, L, dtype=torch.float64)
    ds = dL * (1.0 / sd)  # (d / s_d and its square only: d^3, d^4 as products into the sums, no [R, L] each)
    d2 = ds.square()
    dmul = {1: (ds,), 2: (d2,), 3: (d2, ds), 4: (d2, d2)}
    x1, x2 = cache.scaled_power32(x, 1), cache.scaled_power32(x, 2)
    xpow = {1: x1, 2: x2, 3: x1 * x2, 4: x2.square()}
    counts = torch.bincount(cid, minlength=K)
    # chunks of equal rows (every row reaching the GEMMs: the first layer): their sums by one reduction
    equal = L == K * int(counts[0]) and bool((counts == counts[0]).all())
    onehot = None if equal else _indicator(cid, K, torch.float64)
    T: dict[int, Tensor] = {}
    for a in range(4, 0, -1):
        if a < 4:
            q.mul_(gs)
        qa = q.T.to(f32)  # [in, L]
        for j in range(nb):
            torch.mm(xpow[a][:, j * blk: (j + 1) * blk], qa[j * blk: (j + 1) * blk], out=part)
            if j:
                acc.add_(part)
            else:
                acc.copy_(part)
        for f in dmul[a]:
            acc.mul_(f)
        per = acc.view(R, K, L // K).sum(2) if onehot is None else torch.mm(acc, onehot)
        T[a] = per.mul_(sg ** (4 - a) * (sx * sd) ** a / (sV * sV))
    total += -4.0 * T[1] + 6.0 * T[2] - 4.0 * T[3] + T[4]
    # the bound (linear_factors._even_power_sums_f32 with FOURTH_POWER_CS_BOUND): the float32 sums of
    # blk inputs (the contraction over the outputs is float64's)
    eps = (_lf.POWER_SUMS_F32_LAMBDA * math.sqrt(blk) + ROUNDINGS) * _lf._U32
    # underflow in the scaled float32 factors (each in [-1, 1]): 8 2^-126 a term, over the in * n_k terms
    # of chunk k's n_k rows that reach the GEMMs
    n_k = counts.to(torch.float64).unsqueeze(0)
    under = n_k * (sum(math.comb(4, a) * 8.0 * in_f * _lf._TINY32 * sg ** (4 - a) * (sx * sd) ** a
                       for a in range(1, 5)) / (sV * sV))
    t4 = T[4].clamp_min(0.0) * (1.0 + eps)
    t2 = T[2].clamp_min(0.0) * (1.0 + eps)
    err = eps * (t4 + 4.0 * (t4 * t2).sqrt() + 6.0 * t2 + 4.0 * (t2 * G.unsqueeze(0)).sqrt()) + under
    rtol = _lf._f32_rtol(4)
    bad = ~(torch.isfinite(total) & (err * (1.0 + rtol) <= rtol * total.clamp_min(0.0)))
    if 4 not in _lf.POWER_SUMS_F32:  # (the float64 path throughout, as factored_power_sums takes it)
        bad.fill_(True)
    nbad = int(bad.sum())
    _lf.POWER_SUMS_F32_COUNTS[(4, "float32")] += R * K - nbad
    _lf.POWER_SUMS_F32_COUNTS[(4, "float64")] += nbad
    if nbad:
        _float64_entries(total, bad, G, dL, x, gL, vL, cid)


def _powers64(t: Tensor) -> dict[int, Tensor]:
    """``{a: t^a}`` for ``a = 1..4`` (float64, by products)."""
    t2 = t.square()
    return {1: t, 2: t2, 3: t2 * t, 4: t2.square()}


def _float64_entries(total: Tensor, bad: Tensor, G: Tensor, dL: Tensor, x: Tensor, gL: Tensor, vL: Tensor,
                     cid: Tensor) -> None:
    """``total``'s entries ``bad [R, K]`` recomputed in float64 (the binomial expansion as
    ``factored_power_sums``' float64 sums take it), chunk by chunk: each chunk's failing records on
    its own rows (the 1e7 MLP's second layer: ~1,000 of 16,384 entries, ~6 of 128 rows a chunk), the
    failing records' input and derivative powers computed once."""
    recs_all = bad.any(1).nonzero().reshape(-1)
    at = torch.full((bad.shape[0],), -1, dtype=torch.long)
    at[recs_all] = torch.arange(recs_all.numel())
    xp = _powers64(x[recs_all])
    dp = _powers64(dL[recs_all])
    ends = torch.bincount(cid, minlength=bad.shape[1]).cumsum(0).tolist()
    for k in bad.any(0).nonzero().reshape(-1).tolist():
        recs = bad[:, k].nonzero().reshape(-1)
        ri = at[recs]
        s, e = (ends[k - 1] if k else 0), ends[k]
        g, v = gL[s:e].to(torch.float64), vL[s:e].to(torch.float64)
        q = torch.where(v > _lf.V_NONE, v.square().reciprocal(), torch.zeros((), dtype=torch.float64))
        t = torch.zeros(recs.numel(), dtype=torch.float64)
        for a in range(4, 0, -1):
            if a < 4:
                q = q * g
            t += (math.comb(4, a) * (-1.0) ** (4 - a)) * (torch.mm(xp[a][ri], q.T) * dp[a][ri, s:e]).sum(1)
        total[recs, k] = G[k] + t
