"""A proof, per block of a grid, that weights lie strictly inside their own cell and bounds
(affine grids: :func:`affine_inside_gap`; float formats' tables: :func:`format_cell_bits` and
:func:`bounds_gap`).

The sd-0 point-mass test (:meth:`~mis_lightning.quantization.base.ParamGrid._inside`) asks of every
weight ``th`` whether ``th - lo > m s`` and ``hi - th > m s`` for its own cell's edges
``(q - z -/+ 1/2) s`` and its release's bounds, ``m = 1e-9``. Element-wise on per-element
expansions of the block's scale, zero point, codes and bounds that is ~25 float64 passes over a
chunk (4-5 ms per 2^18 weights, docs/benchmarks.md "p47b"). Here the same question is one number
per weight, computed on the blocks' own values (broadcast, no expansion):
``G = max(|th / s - (q - z)|, (th - (hi - s/2)) / s, ((lo + s/2) - th) / s)`` (cells), and
``G < 1/2 - m - PROOF_SLACK`` proves the test true (below); one reduction over a chunk then proves
every weight at once, the rest being tested as before. Only a sufficient condition: the caller
tests the weights it does not prove.

Why it is a proof (float64, ``u = 2^-53``). With ``|q - z| <= 2^16`` and ``|lo|, |hi| <= 2^16 s``
(the caller checks both), ``1 / s`` and each product and difference add a relative error of at
most ``u``, so a computed ``G < 1/2`` is within ``2^17 * 4u < 6e-11`` cells of the exact one, far
below ``PROOF_SLACK`` (``2^-30``, 9.3e-10). The exact distances are then above ``m (1 + 2^-40)``
cells, and the test's own float64 arithmetic (exact edges: small integers times a float32 scale;
one rounding of ``th - lo`` and of ``m s``) cannot turn them into ``<= m s``. NaN and infinite
weights give a NaN or infinite ``G`` (not proven). A float format's own cell is proven from the
format's bit patterns instead (:func:`format_cell_bits`), its bounds' terms as here
(:func:`bounds_gap`, which both take).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from .versions import tensor_version

# cells added to the margin before a weight counts as proven (above the float64 rounding of G,
# 6e-11 cells at the largest codes and bounds admitted, below the margin's own 1e-9)
PROOF_SLACK = 2.0**-30
# the largest |q - z| and |bound| / scale for which the rounding bound above holds
PROOF_MAX_CELLS = 2.0**16


def affine_inside_gap(th: Tensor, inv: Tensor, code: Tensor | None, zero_point: Tensor | None,
                      lower: Tensor, upper: Tensor, symmetric: bool) -> Tensor:
    """``G`` (float64, ``th``'s shape): per weight, the largest of ``|th * inv - (code - zero_point)|``
    (its offset from its own cell's centre, cells) and ``(th - upper) * inv``, ``(lower - th) *
    inv`` (``lower``, ``upper``: the release's bounds moved half a cell inwards, ``lo + s/2`` and
    ``hi - s/2``), so that ``G < 1/2 - margin - PROOF_SLACK`` proves the weight more than
    ``margin`` cells inside both (module docstring).

    Args:
        th: weights ``[rows, blocks, k]`` float64 (``k`` weights per block).
        inv: ``1 / scale`` per block ``[rows, blocks, 1]`` float64 (scale finite, positive).
        code: the backend's integer codes, ``th``'s shape, or ``None``: the nearest integer to
            ``th * inv + zero_point`` (the cell the weight lies in; unclamped: beyond the code range
            the outer cell holds the weight by more than a cell, so the test only errs on the safe
            side; ``x - round(x)`` is exact, the rounding bound above unchanged).
        zero_point: ``[rows, blocks, 1]`` (integer-valued), or ``None`` (0).
        lower, upper: ``[rows, blocks, 1]`` float64, as above.
        symmetric: ``lower == -upper`` for every block (absmax bounds): one term ``(|th| - upper)
            * inv`` for both.
    """
    g = th * inv
    if code is None:
        if zero_point is not None:
            g.add_(zero_point)
        g.sub_(torch.round(g))
    else:
        g.sub_(code)
        if zero_point is not None:
            g.add_(zero_point)
    return bounds_gap(th, inv, lower, upper, symmetric, into=g.abs_())


def bounds_gap(th: Tensor, inv: Tensor, lower: Tensor, upper: Tensor, symmetric: bool,
               into: Tensor | None = None, abs_th: Tensor | None = None) -> Tensor:
    """The bounds' terms of :func:`affine_inside_gap`, which float formats' tables take too (their
    own cell from :func:`format_cell_bits`): per weight ``max((th - upper) * inv, (lower - th) *
    inv)`` (float64, ``th``'s shape; ``symmetric``: ``(|th| - upper) * inv``), above ``1/2 -
    margin - PROOF_SLACK`` for a weight within ``margin`` cells of its release's bounds or beyond
    them; NaN propagates (not proven).

    Args:
        th, inv, lower, upper, symmetric: as :func:`affine_inside_gap`.
        into: a float64 tensor of ``th``'s shape (the own cell's term) maxed with the bounds' terms
            in place and returned (no tensor of the result's size allocated), or ``None``: a new
            tensor.
        abs_th: ``|th|``, a temporary the call may overwrite (``symmetric`` only; the caller
            has it): the symmetric term is computed in it.
    """
    if symmetric:
        b = (th.abs() if abs_th is None else abs_th).sub_(upper).mul_(inv)
        return b if into is None else torch.maximum(into, b, out=into)
    b = torch.sub(th, upper).mul_(inv)
    if into is None:
        return torch.maximum(b, torch.sub(lower, th).mul_(inv), out=b)
    torch.maximum(into, b, out=into)
    return torch.maximum(into, torch.sub(lower, th, out=b).mul_(inv), out=into)


# The proof's G in float32 (p50c): the chunk's weights cast to float32 once (every grid of the chunk
# reads them) and each grid's G computed in cells on float32 per-block values, ~4x cheaper a pass
# than float64 (2^18 weights: ~0.04 against ~0.15 ms); the limit lowered by f32_gap_error (below),
# the weights then left to the float64 test as before: the same mask. False: float64 (p47b)
PROOF_FLOAT32 = True
# the scales (parameter units per cell) for which the float32 form applies: 1 / s and th / s stay
# normal float32 numbers for every weight it can prove (none underflows; one that overflows is inf)
F32_SCALE_RANGE = (2.0**-100, 2.0**100)


def f32_gap_error(cells: float) -> float:
    """What :func:`gap_cells_f32`'s ``G`` may read below the exact ``G`` (cells) of a weight it
    reads below ``1/2``, on a grid whose blocks have ``|lower|, |upper| <= cells * s`` and
    ``|zero_point| <= cells``: ``2^-20 (cells + 1)``.

    Why (``u = 2^-24``, float32's unit roundoff; the scale in :data:`F32_SCALE_RANGE`): the
    weight's cast, ``1 / s``'s (float64, then float32) and the product each add a relative error
    of at most ``u`` (no underflow in that range), so ``|x32 - x| <= 3.02 u |x|`` for ``x = th /
    s``; the bounds' term below ``1/2`` puts ``|x| <= cells + 1``. The cell term ``|y - round(y)|``,
    ``y = x + z`` rounded once more (``u (2 cells + 1)``), is exact after that (Sterbenz) and moves
    by at most ``y``'s error (the distance to the nearest integer is 1-Lipschitz): ``< 5.1 u
    (cells + 1)``. The bounds' terms ``|x| - U`` or ``x - U``, ``L - x`` (``U, L``: the bounds in
    cells, rounded once to float32: ``u cells``) add ``x``'s error, ``U``'s and the subtraction's
    (``u |G32| <= u (cells + 1)``): ``< 5.1 u (cells + 1)``. Twice that, ``2^-20 (cells + 1)``, is
    returned."""
    return 2.0**-20 * (cells + 1.0)


def gap_cells_f32(th: Tensor, inv: Tensor, zero_point: Tensor | None, lower: Tensor, upper: Tensor,
                  symmetric: bool, own_cell: bool = True) -> Tensor:
    """:func:`affine_inside_gap`'s ``G`` (its ``code=None`` form: the nearest cell) computed in
    float32 in cells: ``max(|y - round(y)|, |x| - upper)`` (``symmetric``) or ``max(|y -
    round(y)|, x - upper, lower - x)``, ``x = th * inv``, ``y = x + zero_point``; ``own_cell``
    False: the bounds' terms alone (a float format's own cell is proven from its bits,
    :func:`format_cell_bits`, which takes float32 ``x`` too). ``G < 1/2 - margin - PROOF_SLACK - f32_gap_error(cells)``
    proves what ``affine_inside_gap``'s ``G < 1/2 - margin - PROOF_SLACK`` proves (the error bound
    there). NaN and infinite weights give NaN or inf (not proven).

    Args:
        th: weights ``[rows, blocks, k]`` float32.
        inv: ``1 / scale`` per block ``[rows, blocks, 1]`` float32 (scale in :data:`F32_SCALE_RANGE`).
        zero_point: ``[rows, blocks, 1]`` float32 integers (at most ``cells``), or ``None`` (0).
        lower, upper: ``[rows, blocks, 1]`` float32: the release's bounds moved half a cell
            inwards, in cells (``lo / s + 1/2``, ``hi / s - 1/2``), at most ``cells``.
        symmetric: ``lower == -upper`` for every block.
    """
    x = th * inv
    g = None
    if own_cell:
        g = x if zero_point is None else x + zero_point
        g = torch.sub(g, torch.round(g)).abs_()
    if symmetric:
        b = x.abs_().sub_(upper)
        return b if g is None else torch.maximum(g, b, out=g)
    lo = torch.sub(lower, x)
    b = x.sub_(upper)
    b = torch.maximum(b, lo, out=b)
    return b if g is None else torch.maximum(g, b, out=g)


# Where one reduction does not prove a chunk, the weights the proof left found run by run
# (unproven_weights) and tested with the revealed ones, the chunk then answered as a whole where
# every sd-0 one of them is inside (p50c): the float32 proof leaves a few weights near a cell's
# midpoint in most chunks (its error bound), and float8's bits proof a few near an edge. The same
# mask. False: the mask of the proven weights and its complement's sd-0 indices (p47b)
PROOF_LEFT_TESTED = True


def unproven_weights(g: Tensor, limit: float, own: Tensor | None = None) -> Tensor:
    """The indices (int64 ``[n]``, ascending) of the weights a proof did not prove: ``G`` not below
    ``limit`` (NaN included) or ``own`` False (a float format's own cell,
    :func:`format_cell_proven`), found per run of up to :data:`LEFT_RUN` consecutive weights (one
    ``amax`` per run, then the runs above the limit) where those runs hold at most an eighth of
    the weights, else over the whole of ``g``.

    Args:
        g: ``G`` per weight ``[c]`` (float32 or float64); written where ``own`` is False (``inf``).
        limit: the proof's limit (cells).
        own: ``[c]`` bool or ``None`` (every own cell proven).
    """
    if own is not None:
        g.masked_fill_(~own, math.inf)
    c = g.numel()
    run = min(c & -c, LEFT_RUN)  # (a power of two dividing c)
    if run >= 16:
        runs = torch.nonzero(~(g.view(-1, run).amax(1) < limit)).squeeze(-1)
        if 8 * run * runs.numel() <= c:
            ii = (runs.unsqueeze(1) * run + torch.arange(run, device=g.device)).view(-1)
            return ii[~(g[ii] < limit)]
    return torch.nonzero(~(g < limit)).squeeze(-1)


# weights per run in unproven_weights (cache-sized; the float32 proof leaves ~60 weights of a
# 2^18-weight int8 chunk, each in a run of its own)
LEFT_RUN = 512


def format_cell_bits(x: Tensor, dtype: torch.dtype, delta: float) -> tuple[Tensor, Tensor]:
    """The bit patterns (``uint8`` / ``int16`` views, ``x``'s shape) of ``max(x - delta, 0)`` and
    ``x + delta`` cast to the float format ``dtype``: where they are equal (and ``x`` is finite and
    at most :data:`PROOF_MAX_CELLS`), ``[x - delta, x + delta]`` lies in one cell of the format's
    table (every finite value, cells between the midpoints of neighbours, symmetric about 0; bf16
    / fp16 with the cast's overflow cells at the ends, float8 e4m3fn saturating into its top
    cell): the cast rounds to nearest, so both ends in one value's rounding interval (its cell,
    edges included) put ``x`` more than ``delta`` inside it less the rounding of ``x -/+ delta``
    (below ``2^-53 x``). Each end is first moved out by ``2^-23 x``: the cast may round through
    float32 (it does on this torch), which then cannot bring it back inside ``[x - delta, x +
    delta]`` (a weight on a midpoint, ``delta`` below float32's half ulp: both ends onto the
    midpoint, one tie). Below ``delta`` the lower end is 0: ``x + delta`` then in 0's cell puts
    ``-(delta - x)`` there too (symmetric cells). No conversion back to float64 (float8's runs at
    ~10 ns per element).

    Args:
        x: ``|weight| / scale`` (cells of the table's unit), float64, non-negative or NaN; or
            float32 computed as :func:`gap_cells_f32`'s ``x`` (the ends then moved out by ``2^-20
            x`` and ``2 delta``: float32's roundings of ``x`` and of the ends; :data:`PROOF_FLOAT32`).
        dtype: the format (8 or 16 bits).
        delta: the margin proven (cells), ``margin + PROOF_SLACK``.
    """
    lo, hi = _cell_ends(x, delta)
    return lo.to(dtype).view(_ints(dtype)), hi.to(dtype).view(_ints(dtype))


def _cell_ends(x: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """:func:`format_cell_bits`' two ends before the cast (``x``'s dtype; the same for every format)."""
    # (each end moved out by float32's relative ulp: torch casts float64 to these formats through
    # float32, and a second rounding must not bring an end back onto a midpoint; the test failed so)
    rel, d = _F32_ULP, delta
    if x.dtype == torch.float32:
        # x computed in float32 (gap_cells_f32's inputs: within 3.02 u |x| of the exact, u =
        # 2^-24): the ends moved out by 2^-20 |x| and 2 delta, each end's float32 rounding included
        # (x (1 - 2^-20) rounded twice stays below x - 10.8 u x; 2 delta less its rounding above delta)
        rel, d = _F32_ENDS, 2.0 * delta
    return torch.mul(x, 1.0 - rel).sub_(d).clamp_min_(0.0), torch.mul(x, 1.0 + rel).add_(d)


def format_cell_proven(x: Tensor, dtype: torch.dtype, margin: float) -> Tensor | None:
    """The proof of a float format's own cell: ``None`` where every ``x`` is proven more than
    ``margin`` cells inside its own cell of the format's table (:func:`format_cell_bits` with
    ``delta = margin + PROOF_SLACK``: both casts' bit patterns equal everywhere, and ``x`` at most
    :data:`PROOF_MAX_CELLS`), else ``[x.shape]`` bool: the weights so proven (the caller tests
    the others). NaN is not proven.

    Args:
        x, dtype: as :func:`format_cell_bits`.
        margin: cells (the sd-0 test's ``1e-9``).
    """
    lo, hi = format_cell_bits(x, dtype, margin + PROOF_SLACK)
    if bool(x.amax() <= PROOF_MAX_CELLS) and torch.equal(lo, hi):  # (one comparison: the common case)
        return None
    return (lo == hi) & (x <= PROOF_MAX_CELLS)


# The format proof on cache-sized blocks of a chunk (|theta| and the two casts of each block in
# the cache, not chunk-sized temporaries: the sd-0 test of the bf16 / fp16 casts' main calls on the
# 1e7 MLP's second layer, p49c); the same mask. False: format_cell_proven on the whole chunk
PROOF_BLOCKS = True
PROOF_BLOCK = 1 << 15


def format_cell_proven_abs(th: Tensor, dtype: torch.dtype, margin: float) -> Tensor | None:
    """:func:`format_cell_proven` of ``|th|`` (``th`` float64 ``[c]``), on blocks of
    :data:`PROOF_BLOCK` weights (:data:`PROOF_BLOCKS`): ``None`` where every block is proven
    whole, else the mask of :func:`format_cell_proven` (a block proven whole is ``True``
    throughout there too: every ``x`` finite, at most :data:`PROOF_MAX_CELLS`, both casts equal).
    With :data:`PROOF_FORMATS_SHARED`, the 16-bit formats asked for since the last
    :func:`release_shared_proofs` are proven together on each block (one ``|th|`` and one pair of
    float64 ends for all: the same numbers), the others' answers kept for their call on the same
    ``th`` (unchanged: its version counter) and margin."""
    if not PROOF_BLOCKS:
        return format_cell_proven(th.abs(), dtype, margin)
    shared = PROOF_FORMATS_SHARED and torch.finfo(dtype).bits == 16
    if shared:
        ver = tensor_version(th)
        if _PROVEN:
            ref, v, m, held = _PROVEN[0]
            if ref() is th and v is not None and v == ver and m == margin and dtype in held:
                return held.pop(dtype)
        dtypes = (dtype, *sorted((d for d in _FORMATS_ASKED if d != dtype), key=str))
        _FORMATS_ASKED.add(dtype)
        got = _proven_abs_blocks(th, dtypes, margin)
        _PROVEN[:] = [(weakref.ref(th), ver, margin, dict(zip(dtypes[1:], got[1:])))] if ver is not None else []
        return got[0]
    return _proven_abs_blocks(th, (dtype,), margin)[0]


def _proven_abs_blocks(th: Tensor, dtypes: tuple[torch.dtype, ...], margin: float) -> list[Tensor | None]:
    """:func:`format_cell_proven_abs`' answer for each format of ``dtypes`` (the same ``x``, ends and
    casts as :func:`format_cell_bits` per format: its float64 ends do not depend on the format)."""
    c = th.shape[0]
    outs: list[Tensor | None] = [None] * len(dtypes)
    delta = margin + PROOF_SLACK
    for s in range(0, c, PROOF_BLOCK):
        x = th[s:s + PROOF_BLOCK].abs()
        lo64, hi64 = _cell_ends(x, delta)  # (format_cell_bits' ends: formed once for every format)
        ends = [(lo64.to(dt).view(_ints(dt)), hi64.to(dt).view(_ints(dt))) for dt in dtypes]
        small = bool(x.amax() <= PROOF_MAX_CELLS)
        for i, (lo, hi) in enumerate(ends):
            out = outs[i]
            if small and torch.equal(lo, hi):
                if out is not None:
                    out[s:s + PROOF_BLOCK] = True
                continue
            if out is None:  # (the blocks before were proven whole)
                out = outs[i] = torch.ones(c, dtype=torch.bool, device=th.device)
            torch.logical_and(lo == hi, x <= PROOF_MAX_CELLS, out=out[s:s + PROOF_BLOCK])
    return outs


def _ints(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if torch.finfo(dtype).bits == 8 else torch.int16


# The bf16 and fp16 casts' proofs on the same chunk (the sd-0 test of each cast's main call on the
# 1e7 MLP's second layer) from one |theta| and one pair of float64 ends per block: ~0.6 ms of the
# ~1 ms proof per chunk and format (p51d); the 16-bit formats asked since the scoring pass began
# (release_shared_proofs, with ParamGrid's chunk facts) are proven together at each new theta, the
# others' answers kept for their call (one entry: the chunk's). The same masks. False: one proof
# per format and call
PROOF_FORMATS_SHARED = True
_FORMATS_ASKED: set[torch.dtype] = set()
_PROVEN: list[tuple[weakref.ref, int | None, float, dict[torch.dtype, Tensor | None]]] = []


def release_shared_proofs() -> None:
    """Forget the formats asked and the answers kept (:data:`PROOF_FORMATS_SHARED`)."""
    _FORMATS_ASKED.clear()
    _PROVEN.clear()


_F32_ULP = 2.0**-23
_F32_ENDS = 2.0**-20


__all__ = ["F32_SCALE_RANGE", "PROOF_FLOAT32", "PROOF_LEFT_TESTED", "PROOF_MAX_CELLS", "PROOF_SLACK", "affine_inside_gap", "bounds_gap",
           "f32_gap_error", "format_cell_bits", "format_cell_proven", "format_cell_proven_abs", "gap_cells_f32", "release_shared_proofs", "unproven_weights"]
