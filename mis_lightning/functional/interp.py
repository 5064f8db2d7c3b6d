"""Interpolated cell moments of a small symmetric value table (float8): ``kappa`` and ``m4`` of a
weight whose sd spans many coarse cells, read from a table of exact sums (issue 13:
``fp8_weight_only`` at most 2x an integer scheme).

For a fixed table of values ``v`` (units of the scale) the moments of a weight depend on two
numbers only: its position ``x = theta / scale`` and its sd ``s = sigma / scale`` in those units,
and by the table's symmetry on ``|x|``. Where a float8 weight's 8.5-sd reach covers 20-50 cells
0.2-2 sd wide (sigma ~0.03-1 x the weight sd) the exact path sums every one of them (~20 ns per
edge, and no closed form of the per-cell series reaches 1e-10 there); here they are read from a
table instead:

* along ``|x|``: each value cell of ``|x|`` (edges the midpoints to the neighbouring values; the
  cell of 0 from 0, the top one up to the largest value) in ``SPLIT`` equal pieces, each a
  polynomial of degree ``DEGREE`` in its own coordinate ``t`` in ``[-1, 1]`` interpolating exact
  sums at Chebyshev nodes (the moments oscillate with a period of one cell, whose width changes
  at every binade edge: pieces never straddle a cell edge);
* along ``log2 s``: ``STENCIL``-point Lagrange interpolation between slices ``1 / PER_OCTAVE``
  octave apart, from ``2^LOG2_S_RANGE[0]`` to ``2^LOG2_S_RANGE[1]`` table units.

Octaves of ``s`` are built on first use (``PER_OCTAVE + STENCIL - 1`` slices of ``SPLIT`` x
``DEGREE + 1`` nodes per cell, summed by the exact path ``table._table_sum_moments``, within
~1e-11 of the sum over every cell; 0.1-1.2 s of CPU per octave on one loaded core; 2.4 MB each for
float8 e4m3), so that a model pays only for the sds it has. Exactness is not claimed: the error
against the exact sum over every cell is bounded by measurement (``TOLERANCE``, asserted in
tests/test_fp8_interp.py against the table built from all 256 bit patterns), and the callers use
the table only where that was measured: own cell at most ``MAX_OWN_STEP`` sd wide, ``s`` within
range, ``|x|`` at most the largest value (the unbounded top cell: its span below the largest
value at most ``MAX_OWN_STEP`` sd), tensors on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .cells import SQRT_2_OVER_PI, _pdf
from .versions import tensor_version

DEGREE = 7  # polynomial degree per cell along |x|
PER_OCTAVE = 32  # slices per octave of s
SPLIT = 4  # polynomial pieces per cell of |x|
STENCIL = 6  # Lagrange points along log2 s
# The range of log2(s) covered (units of the scale); outside it the callers sum exactly.
LOG2_S_RANGE = (-12.0, 10.0)
# Largest own-cell width in sd units the interpolation is used for (beyond it the weight sees
# few cells and the exact window is cheap; the polynomial's error grows with the width).
MAX_OWN_STEP = 4.0
# The interpolation's tolerance against the exact sum over every cell (absolute; kappa <= 1,
# m4 <= 3): asserted in tests/test_fp8_interp.py, measured <= 4.7e-9 / 1.2e-7 (docs/benchmarks.md).
TOLERANCE = {"kappa": 1e-7, "m4": 1e-6}


def _cheb_monomial(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev nodes of the first kind on [-1, 1] (``k + 1`` of them) and the matrix taking
    values there to monomial coefficients (``c = M @ f``, lowest power first)."""
    n = k + 1
    t = np.cos(np.pi * (np.arange(n) + 0.5) / n)[::-1].copy()
    van = np.vander(t, n, increasing=True)
    return t, np.linalg.inv(van)


class InterpTable:
    """Lazily built interpolation table of one symmetric value table."""

    def __init__(self, values: Tensor) -> None:
        v = values.to(torch.float64).cpu()
        self.values = v
        self.mids = 0.5 * (v[1:] + v[:-1])
        pos = v[v >= 0]
        self.vmax = float(pos[-1])
        ends = torch.cat([pos.new_zeros(1), 0.5 * (pos[1:] + pos[:-1]), pos[-1:]])
        # each cell of |x| in SPLIT equal pieces, one polynomial each
        frac = torch.arange(SPLIT, dtype=torch.float64) / SPLIT
        lo = (ends[:-1].unsqueeze(-1) + frac * (ends[1:] - ends[:-1]).unsqueeze(-1)).reshape(-1)
        hi = torch.cat([lo[1:], ends[-1:]])
        self.lo, self.hi = lo, hi  # [pieces] the pieces of the cells of |x|
        self.bounds = torch.cat([lo, hi[-1:]])  # piece k holds bounds[k] <= |x| < bounds[k + 1]
        self.ncell = lo.numel()
        # each piece's own cell of |x| (the cell of 0 is symmetric; the top one unbounded)
        cell = torch.arange(self.ncell) // SPLIT
        self.own_lo = torch.where(cell == 0, -ends[1], ends[cell])
        self.own_hi = torch.where(cell == ends.numel() - 2, math.inf, ends[(cell + 1).clamp(max=ends.numel() - 1)])
        # the width the coverage rule (own cell at most MAX_OWN_STEP sd) reads: the own cell's,
        # and for the unbounded top cell its span up to the largest value (|x| beyond it sums
        # exactly): the pieces there are as wide as in a cell of that width, and the one edge
        # below is as far (a row's absmax weight sits there: every row has one)
        width = torch.where(cell == ends.numel() - 2, ends[-1] - ends[-2], self.own_hi - self.own_lo)
        self.ends = torch.stack([self.own_lo, self.own_hi, lo, hi, width], -1)  # [pieces, 5]
        self._bucket_lut()
        t, mono = _cheb_monomial(DEGREE)
        self.t_nodes = torch.from_numpy(t)
        self.mono = torch.from_numpy(mono)  # [K, K]
        self.l0 = LOG2_S_RANGE[0]
        self.noct = int(round(LOG2_S_RANGE[1] - LOG2_S_RANGE[0]))
        k = DEGREE + 1
        # coefficients (monomial, lowest power first) per octave of s, piece and slice, kappa's
        # and m4's apart: [octave, piece, _SEG, K] each, each octave's _SEG slices its PER_OCTAVE
        # own plus the neighbours its stencils reach (built on first use; torch.empty, so that
        # unbuilt octaves take no memory). ``blocks`` views the STENCIL consecutive slices from
        # each row as one row of STENCIL x K (overlapping rows): one gather per element and
        # moment, then one dot product with the Lagrange x power weights.
        self.store = tuple(torch.empty(self.noct, self.ncell, _SEG, k, dtype=torch.float64) for _ in range(2))
        self.blocks = tuple(st.view(-1).as_strided((st.numel() // k - STENCIL + 1, STENCIL * k), (k, 1))
                            for st in self.store)
        self.built = torch.zeros(self.noct, dtype=torch.bool)

    def _build(self, octaves: list[int]) -> None:
        """Exact sums at every piece's Chebyshev nodes for the octaves ``octaves`` of s (the
        exact path of the float-format cell sums, within ~1e-11 of the sum over every cell),
        turned into monomial coefficients."""
        from .table import _table_sum_moments  # the exact path (table.py imports this module)

        k = DEGREE + 1
        x = (self.lo.unsqueeze(-1) + (self.t_nodes + 1.0) * 0.5 * (self.hi - self.lo).unsqueeze(-1)).reshape(-1)
        for o in octaves:
            for a in range(0, _SEG, _BUILD_BATCH):  # several slices per call: fewer, larger groups
                js = torch.arange(a, min(a + _BUILD_BATCH, _SEG))
                g = o * PER_OCTAVE - (STENCIL // 2 - 1) + js  # global slice numbers
                s = (2.0 ** (self.l0 + g.to(torch.float64) / PER_OCTAVE)).repeat_interleave(x.numel())
                xs = x.repeat(js.numel())
                mm, _ = _table_sum_moments(xs, s, self.values, torch.ones_like(xs))
                f = torch.stack([mm.kappa, mm.m4]).reshape(2, js.numel(), self.ncell, k)  # node values
                c = torch.einsum("ab,qjnb->qnja", self.mono, f)  # [2, pieces, slices, K] monomial coefficients
                for st, cq in zip(self.store, c):
                    st[o, :, a : a + js.numel()] = cq
            self.built[o] = True

    def _piece(self, ax: Tensor) -> Tensor:
        """The piece ``[c]`` holding each ``|x|`` (``ax``, within the table): as
        ``searchsorted(bounds, ax, right=True) - 1`` (3-4x its speed on float8's ~500 bounds),
        from a bucket of ``(exponent, leading mantissa bits)`` that holds at most one bound."""
        mant, ex = torch.frexp(ax)  # ax = mant 2^ex, mant in [0.5, 1)
        q = (ex - (self.e0 + 1)) * self.rb + ((mant - 0.5) * (2 * self.rb)).long() + 1
        q = torch.where(ax < self.floor, 0, q).clamp_(0, self.lut.numel() - 1)
        p = self.lut.index_select(0, q)
        return (p + (ax >= self.bounds.index_select(0, p + 1)).long()).clamp_(max=self.ncell - 1)

    def _bucket_lut(self) -> None:
        """Buckets of ``|x|``: 0 below ``2^e0`` (``e0`` the exponent of the first positive bound's
        binade), then ``rb`` per binade; the piece at each bucket's start, with ``rb`` doubled
        until no bucket holds two bounds."""
        b = self.bounds
        self.e0 = int(torch.floor(torch.log2(b[1])))
        self.floor = 2.0**self.e0
        top = int(torch.floor(torch.log2(b[-1]))) + 1
        rb = 16
        while True:
            grid = (2.0 ** torch.arange(self.e0, top + 1, dtype=torch.float64)).unsqueeze(-1) * (
                1.0 + torch.arange(rb, dtype=torch.float64) / rb)
            starts = torch.cat([torch.zeros(1, dtype=torch.float64), grid.reshape(-1)])
            ends = torch.cat([starts[1:], torch.tensor([math.inf], dtype=torch.float64)])
            first = torch.searchsorted(b, starts, right=True) - 1
            inside = torch.searchsorted(b, ends, right=False) - torch.searchsorted(b, starts, right=True)
            if int(inside.max()) <= 1:
                break
            rb *= 2
        self.rb = rb
        self.lut = first.clamp(0, self.ncell - 1)

    def moments(self, x: Tensor, s: Tensor, min_build: int = 0,
                call_elements: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(done, kappa, mean_abs, m4)``, each ``[c]``: the mask of the elements at positions
        ``x`` and sds ``s`` (units of the scale) this table covers (``|x|`` within the table, own
        cell at most ``MAX_OWN_STEP`` sd wide, ``log2 s`` inside the octaves' range) and their
        ``kappa`` and ``m4`` from the table, ``mean_abs`` telescoped exactly over the own cell
        (``2 max(phi(l), phi(u))``); unspecified where not ``done``. An octave not built yet is
        built only if at least ``min_build`` of the covered elements fall in it (its stencils'
        reach); the others are left not ``done`` (the exact path), so that a call does not pay
        an octave's build (0.1-1.2 s) for a handful of weights. ``call_elements``: the size of
        the call these elements stand for (the others frozen, never covered; default ``c``):
        whether the covered ones are computed apart counts it."""
        c0 = x.numel()
        ax = x.abs()
        u = (torch.log2(s) - self.l0) * PER_OCTAVE
        ok = (ax <= self.vmax * (1.0 + _BEYOND_MAX)) & (u >= 0.0) & (u < self.noct * PER_OCTAVE)
        if not bool(ok.any()):  # e.g. every sd wider than 2^10 table units: no lookups
            z = torch.zeros_like(ax)
            return ok, z, z, z
        piece = self._piece(torch.where(ok, ax, 0.0))
        ends = self.ends.index_select(0, piece)  # [c, 5]: own cell, piece, own width
        lo, hi = ends[:, 0], ends[:, 1]
        done = ok & (ends[:, 4] <= MAX_OWN_STEP * s)
        if min_build > 0 and bool(done.any()):
            # per octave of s (of the stencil's first row, as below): unbuilt octaves that few
            # elements would use go to the exact path
            oct_ = torch.div(torch.floor(u).long(), PER_OCTAVE, rounding_mode="floor").clamp_(0, self.noct - 1)
            counts = torch.bincount(oct_[done], minlength=self.noct)
            skip = (~self.built) & (counts < min_build)
            if bool(skip[counts > 0].any()):
                done = done & ~skip[oct_]
        nd = int(done.sum())
        if nd == 0:
            z = torch.zeros_like(ax)
            return done, z, z, z
        ii = None
        if nd < _SUBSET * max(c0, call_elements or 0):  # few covered: compute those alone
            ii = torch.nonzero(done).squeeze(-1)
            ax, s, u, piece, ends = ax[ii], s[ii], u[ii], piece[ii], ends[ii]
            lo, hi = ends[:, 0], ends[:, 1]
        elif nd < c0:  # most covered: compute all, the others at a covered element's sd
            u = torch.where(done, u, u[torch.argmax(done.to(torch.uint8))])
        j0 = torch.floor(u)
        f = u - j0  # in [0, 1): between stencil nodes STENCIL/2 - 1 and STENCIL/2
        jl = j0.long()
        octave = torch.div(jl, PER_OCTAVE, rounding_mode="floor")
        # the stencil's first row: the octave's local slice jl - octave * PER_OCTAVE is row
        # STENCIL/2 - 1 of it
        rows = (octave * self.ncell + piece) * _SEG + (jl - octave * PER_OCTAVE)
        # only the octaves some element reads (not the gaps between); a count, not a sort
        missing = (torch.bincount(octave, minlength=self.noct) > 0) & ~self.built
        if bool(missing.any()):
            self._build([int(o) for o in torch.nonzero(missing).squeeze(-1)])
        plo, phi_ = ends[:, 2], ends[:, 3]
        t = (2.0 * ax - (plo + phi_)) / (phi_ - plo)
        mean_abs = (2.0 * _pdf(torch.minimum(ax - lo, hi - ax) / s)).clamp_(0.0, SQRT_2_OVER_PI)  # the nearer edge
        k, c = DEGREE + 1, t.numel()
        kappa, m4 = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
        # in blocks, into work buffers allocated once per call (fresh multi-MB tensors cost more
        # in page faults than the arithmetic): each moment is the dot product of the element's
        # STENCIL x K coefficients (one contiguous row of ``blocks``) with the outer product of
        # its Lagrange weights along log2 s ([f, f^2, ...] @ _LAGRANGE[1:] + _LAGRANGE[0]) and
        # the powers [1, t, ..., t^DEGREE]
        nb = min(_BLOCK, c)
        fp = torch.empty(nb, STENCIL - 1, dtype=torch.float64)
        w = torch.empty(nb, STENCIL, dtype=torch.float64)
        tp = torch.empty(nb, k, dtype=torch.float64)
        wt = torch.empty(nb, STENCIL, k, dtype=torch.float64)
        blk = torch.empty(nb, STENCIL * k, dtype=torch.float64)
        lag0, lag1 = _LAGRANGE[0], _LAGRANGE[1:]
        for a in range(0, c, _BLOCK):
            m = min(_BLOCK, c - a)
            fp[:m].copy_(f[a : a + m].unsqueeze(-1).expand(m, STENCIL - 1)).cumprod_(1)
            torch.addmm(lag0, fp[:m], lag1, out=w[:m])
            tp[:m].copy_(t[a : a + m].unsqueeze(-1).expand(m, k))
            tp[:m, 0] = 1.0
            tp[:m].cumprod_(1)
            wtb = torch.mul(w[:m].unsqueeze(-1), tp[:m].unsqueeze(1), out=wt[:m]).view(m, -1)
            bl, rb = blk[:m], rows[a : a + m]
            for src, dst in zip(self.blocks, (kappa, m4)):
                torch.index_select(src, 0, rb, out=bl)
                torch.sum(bl.mul_(wtb), 1, out=dst[a : a + m])
        kappa = kappa.clamp_(0.0, 1.0)
        if ii is not None:
            full = [torch.zeros(c0, dtype=torch.float64) for _ in range(3)]
            for dst, val in zip(full, (kappa, mean_abs, m4)):
                dst[ii] = val
            kappa, mean_abs, m4 = full
        return done, kappa, mean_abs, m4


_NODES = [float(i - (STENCIL // 2 - 1)) for i in range(STENCIL)]


# Lagrange basis on those nodes as polynomials in f: weights = [f^0 .. f^(P-1)] @ _LAGRANGE
_LAGRANGE = torch.from_numpy(np.linalg.inv(np.vander(np.array(_NODES), STENCIL, increasing=True)).copy())
_BLOCK = 4096
_BUILD_BATCH = 16
_SUBSET = 0.75  # below this covered share, the covered elements are computed apart
_SEG = PER_OCTAVE + STENCIL - 1  # slices stored per octave
# |x| up to this far (relative) beyond the largest value reads the top piece (t just above 1;
# the moments are smooth there, the top cell has no edge above): a row's absmax weight over its
# float32 scale lands up to ~6e-8 beyond it (fp23: 146 of 316 rows at 0.1 x the weight sd, one
# more exact call, ~3 ms per 1e5 weights)
_BEYOND_MAX = 1e-6


_TABLES: dict[bytes, InterpTable | None] = {}


def interp_table(values: Tensor) -> InterpTable | None:
    """The (cached) interpolation table of ``values``, or ``None`` where it does not apply (a table
    that is not symmetric about 0 or larger than 256 values)."""
    # a tensor object seen recently, unmodified since (held here: its address cannot be reused),
    # skips the key: 186 us per call for a 16-bit table's 65k values, ~400 calls per 1e7 scoring
    last = _RECENT.get(id(values))
    version = tensor_version(values)  # None: an inference tensor, keyed by its values every time
    if last is not None and version is not None and last[0] is values and last[1] == version \
            and _TABLES.get(last[3], 0) is last[2]:
        return last[2]  # (the key's hash is cached in its bytes object: no new hashing)
    key = values.detach().to(device="cpu", dtype=torch.float64).numpy().tobytes()
    if key not in _TABLES:
        v = values.to(torch.float64).cpu()
        ok = v.numel() <= 256 and bool(torch.equal(v, -v.flip(0)))
        _TABLES[key] = InterpTable(v) if ok else None  # type: ignore[assignment]
    _RECENT[id(values)] = (values, version, _TABLES[key], key)
    while len(_RECENT) > _RECENT_MAX:
        del _RECENT[next(iter(_RECENT))]
    return _TABLES[key]


# value tensors of the latest interp_table calls (a scoring pass alternates between its grids'
# tables: float8, bf16, fp16, ...), by id
_RECENT: dict[int, tuple] = {}
_RECENT_MAX = 16
