"""A prototype of the sd-0 point-mass test from the grid's block structure (p43a; docs/benchmarks.md,
"p43a"): on the saved model's factored weights, for each affine grid with the backend's integer
codes (int8_weight_only, intx_weight_only_int4, intx_weight_only_int4_g32) and each chunk of whole
rows, the mask the scoring pass computes (``ParamGrid._inside`` in cache-sized blocks on
``_chunk_grid``'s per-element float64 tensors, as ``_point_split`` does) against a float32 test on
the block view, ``|theta / scale - (code - zero_point)| < 0.5 - tau``, whose passing weights are
inside by the float64 test's rules with room to spare, and the float64 test on the weights it
leaves. Prints both times and whether the masks are equal (they must be, bitwise).

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt
    python benchmarks/point_mass_prefilter.py /tmp/m1e7.pt [--param 2.weight]

Why the prefilter implies the test: with ``x = theta / scale`` (``theta`` and ``scale`` float32
values) and ``q = code - zero_point`` an integer, the float32 quotient and difference give
``|x - q| <= |r| (1 + 2^-23) + 2^-23 |x|``; with ``|r| < 0.5 - tau``, ``tau = 1e-9 + (Q + 2) 2^-22``
and ``Q`` the largest ``|q|`` of the grid, ``x`` lies inside ``(q - 0.5, q + 0.5)`` by more than
``1e-9 + (Q + 2) 2^-23`` cells, far above the float64 test's own roundings (``(Q + 2) 2^-52`` cells).
The bounds: ``theta > lower + room`` and ``theta < upper - room`` in float32 with ``room =
2^-20 (|lower| + |upper|) + 2e-9 scale`` per block, which covers the float32 roundings of the sum
and the comparison (each at most ``2^-24`` of ``|lower| + room``) and the float64 test's
``theta - lower > 1e-9 scale``; so the prefilter's ``True`` implies the float64 mask's, and the
weights it leaves (the revealed absmax of each block among them) take the float64 test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))

SCHEMES = ["int8_weight_only", "intx_weight_only_int4", "intx_weight_only_int4_g32"]


def current_inside(grid, theta64, a: int, b: int):  # noqa: ANN001, ANN201 - a benchmark's helper
    """``_point_split``'s ``inside`` mask as the scoring pass computes it (its _chunk_grid included)."""
    import torch

    from mis_lightning.functional.kernel import EAGER_BLOCK

    scale, zp, code, _, bounds = grid._chunk_grid(a, b)
    c = b - a
    out = torch.empty(c, dtype=torch.bool)
    for s in range(0, c, EAGER_BLOCK):
        sl = slice(s, s + EAGER_BLOCK)
        out[sl] = grid._inside(theta64[sl], scale[sl], zp[sl], code[sl],
                               None if bounds is None else (bounds[0][sl], bounds[1][sl]))
    return out


def block_inside(grid, theta32, a: int, b: int):  # noqa: ANN001, ANN201
    """The same mask from the block view: the float32 prefilter in row blocks of about
    ``EAGER_BLOCK`` weights, then the float64 test on the weights it leaves."""
    import torch

    from mis_lightning.functional.kernel import EAGER_BLOCK
    from mis_lightning.quantization.base import _POINT_MASS_MARGIN

    rows, cols = grid.shape
    br, bc = grid.block_size
    assert br == 1 and a % cols == 0 and b % cols == 0, "whole rows of a row-blocked grid only"
    r0, r1 = a // cols, b // cols
    g = cols // bc
    zp_all = grid.zero_point
    qmax = max(abs(grid.qmin), abs(grid.qmax)) + (0 if zp_all is None else int(zp_all.abs().max()))
    tau = _POINT_MASS_MARGIN + (qmax + 2) * 2.0 ** -22
    ok = torch.empty(b - a, dtype=torch.bool)
    step = max(1, EAGER_BLOCK // cols)
    for r in range(r0, r1, step):
        re = min(r + step, r1)
        th = theta32.reshape(-1)[(r - r0) * cols:(re - r0) * cols].view(re - r, g, bc)
        sc = grid.scale[r:re].reshape(re - r, g, 1)
        q = grid.codes.reshape(-1)[r * cols:re * cols].view(re - r, g, bc).to(torch.float32)
        if zp_all is not None:
            q = q.sub_(zp_all[r:re].reshape(re - r, g, 1))  # code - zero point: exact small integers
        o = torch.div(th, sc).sub_(q).abs_() < 0.5 - tau
        o &= sc > 0  # dead blocks: the float64 test
        if grid.support is not None:
            # th - lower > 1e-9 scale (the float64 test's bounds terms) with room for float32 rounding
            lo, hi = (t[r:re].reshape(re - r, g, 1) for t in grid.support)
            room = (lo.abs() + hi.abs()).mul_(2.0 ** -20).add_(2.0 * _POINT_MASS_MARGIN * sc)
            o &= th > lo + room
            o &= th < hi - room
        ok[(r - r0) * cols:(re - r0) * cols] = o.reshape(-1)
    rest = torch.nonzero(~ok).squeeze(-1)
    if rest.numel():
        scale, zpe, code, _, bounds = grid._chunk_grid(a, b)
        sel = lambda t: t.index_select(0, rest)  # noqa: E731
        ok[rest] = grid._inside(sel(theta32).to(torch.float64), sel(scale), sel(zpe), sel(code),
                                None if bounds is None else (sel(bounds[0]), sel(bounds[1])))
    return ok, rest.numel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--param", default="2.weight")
    ap.add_argument("--chunk", type=int, default=1 << 18)
    args = ap.parse_args(argv)
    import torch

    from benchmarks.first_call import load_saved
    from mis_lightning.assess import _prepare_scheme, resolve_schemes, run_estimation
    from mis_lightning.quantization.base import release_chunk_facts

    saved, model, loader, loss_fn, est_cfg, _ = load_saved(args.path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    theta = est.theta[args.param]
    cols = theta.shape[-1] if theta.dim() > 1 else theta.numel()
    step = max(1, args.chunk // cols) * cols
    for scheme in resolve_schemes(SCHEMES):
        grid = _prepare_scheme(est, model, scheme, 0).grids[args.param]
        t_old = t_new = 0.0
        same, left, n = True, 0, theta.numel()
        for a in range(0, n, step):
            b = min(a + step, n)
            th32 = theta.reshape(-1)[a:b]
            th64 = th32.to(torch.float64)  # (the pass's th_c, cast once per chunk for every scheme)
            release_chunk_facts()
            grid._chunk_grid(a, b)  # (kept: the pass computes it anyway, for the live weights' paths)
            for first in (a // step % 2, 1 - a // step % 2):  # alternating which goes first
                c0 = time.process_time()
                if first:
                    new, k = block_inside(grid, th32, a, b)
                    t_new += time.process_time() - c0
                else:
                    old = current_inside(grid, th64, a, b)
                    t_old += time.process_time() - c0
            same &= bool(torch.equal(old, new))
            left += k
        release_chunk_facts()
        print(f"{scheme.name:28s} {args.param}: float64 blocks {t_old:.3f} s, block-view prefilter {t_new:.3f} s "
              f"({t_new / t_old:.2f}x); float64 test on {left} of {n} weights; masks equal: {same}; "
              f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
