"""The wide-sd closed form (``quantization.base.WIDE_SD_CLOSED_FORM``, ``functional/wide.py``)
against an independent exact reference and against the grid paths it replaces, across its gate
(docs/validation.md, "The wide-sd closed form against an exact partition sum").

    PYTHONPATH=$PWD python benchmarks/wide_sd_check.py [--rows 16 --cols 64]

For each scheme (real backends on one Linear layer: per-row int8, per-group int4, the library's
RTN int4 whose bound cuts an inner cell, asymmetric min/max int4, float8 and bf16 value tables)
and each ``sd / step`` from 1 to 1e6 (the step: the element's scale), it scores every weight
with the switch on and off and prints, over the weights the closed form answered (``gated``):
the largest ``(kappa_cf - kappa_exact) / bound`` and ``(m4_exact - m4_cf) / bound`` (the
derived bound, ``functional.wide.wide_sd_error_bound``: both must lie in ``[0, 1]`` up to float
rounding), the largest ``|mean_abs_cf - mean_abs_exact|`` (an exact formula: float rounding
only), and over every weight the largest change of each field against the paths.

The exact reference (``tests/_wide_reference.py``) sums every cell of the partition clipped to the bounds (cells beyond them
are revealed: no deficit) by 16-point Gauss-Legendre quadrature in each cell's own coordinates:
``1 - kappa = sum p_k Var_k``, ``3 - m4 = sum (E[u^4; k] - p_k mu_k^4)`` and the own cell's
``E|u| - |E u|`` split at 0, each computed as a deficit (no ``1 - (1 - x)`` cancellation).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from tests._wide_reference import exact_deficits, partition_edges  # noqa: E402

F64 = torch.float64
SCHEMES = ("int8_weight_only", "intx_weight_only_int4_g32", "rtn_int4", "intx_weight_only_int4_g32_asym",
           "float8_weight_only", "bf16")
RATIOS = (1.0, 10.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5, 1e6)
SQ = float(np.sqrt(2.0 / np.pi))
ULP = 2.0**-53  # the rounding of a float64 near 1


def grid_of(scheme: str, rows: int, cols: int):
    import dataclasses

    from mis_lightning.quantization import get_scheme

    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    g = get_scheme(scheme).apply(torch.nn.Sequential(lin)).grids["0.weight"]
    if g.storage_dtype is not None:
        g = dataclasses.replace(g, storage_dtype=None)
    return g, lin.weight.detach().reshape(-1).to(F64)


def check(scheme: str, rows: int, cols: int, ratios=RATIOS, reference_max: int = 256) -> list[dict]:
    """One row per ratio (see the module doc); ``reference_max`` gated weights get the exact
    reference (evenly spaced)."""
    import mis_lightning.quantization.base as qb
    from mis_lightning.functional.wide import wide_sd_error_bound

    g, theta = grid_of(scheme, rows, cols)
    c = theta.numel()
    scale, zp, code, _, bounds = g._chunk_grid(0, c)
    gen = torch.Generator().manual_seed(1)
    spread = torch.exp(0.3 * torch.randn(c, generator=gen, dtype=F64))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    orig = qb.wide_sd_parts

    def spy(th, sg, lb, ub, cube, own_lo, own_hi):
        k, ma, ok = orig(th, sg, lb, ub, cube, own_lo, own_hi)
        seen.append((th.clone(), ok.clone()))
        return k, ma, ok

    rows_out = []
    try:
        qb.wide_sd_parts = spy
        for r in ratios:
            sigma = r * scale.to(F64) * spread
            seen.clear()
            qb.WIDE_SD_CLOSED_FORM = True
            new = g.moments(theta, sigma, 0, c)
            qb.WIDE_SD_CLOSED_FORM = False
            old = g.moments(theta, sigma, 0, c)
            gated = torch.zeros(c, dtype=torch.bool)
            if seen:
                th_ok = torch.cat([t[o] for t, o in seen])
                gated = torch.isin(theta, th_ok)
            row = {"scheme": scheme, "ratio": r, "gated": int(gated.sum()), "n": c}
            for f in ("kappa", "mean_abs", "m4", "coverage"):
                row["d_" + f] = float((getattr(new, f) - getattr(old, f)).abs().max())
            row["ungated_max_change"] = max(float((getattr(new, f) - getattr(old, f))[~gated].abs().max())
                                            if bool((~gated).any()) else 0.0 for f in ("kappa", "mean_abs", "m4"))
            ks, m4s, mas, pk, pm, worst_bound, worst_dev = [], [], [], [], [], 0.0, 0.0
            idx = torch.nonzero(gated).squeeze(-1)
            if idx.numel() > reference_max:
                idx = idx[torch.linspace(0, idx.numel() - 1, reference_max).long()]
            if idx.numel() and bounds is not None:
                lo, hi = bounds[0].to(F64), bounds[1].to(F64)
                _, _, bound = wide_sd_error_bound(sigma[idx], lo[idx], hi[idx], theta[idx],
                                                  _cube_of(g, lo[idx], hi[idx], scale[idx], zp[idx]))
                for j, i in enumerate(idx.tolist()):
                    e = partition_edges(g, i, float(lo[i]), float(hi[i]), float(scale[i]), float(zp[i]))
                    dk, dm, d4 = exact_deficits(float(theta[i]), float(sigma[i]), e)
                    b = float(bound[j])
                    # (kappa_cf - kappa_exact) / (bound + ulp): kappa is a float64 near 1, held to 2^-53
                    ks.append((dk - (1.0 - float(new.kappa[i]))) / (b + ULP))
                    m4s.append((d4 - (3.0 - float(new.m4[i]))) / b)
                    mas.append(abs((SQ - float(new.mean_abs[i])) - dm))
                    pk.append(abs(dk - (1.0 - float(old.kappa[i]))))
                    pm.append(abs((SQ - float(old.mean_abs[i])) - dm))
                    worst_bound = max(worst_bound, b)
                    worst_dev = max(worst_dev, dk)
            row.update(kappa_err_over_bound=(min(ks), max(ks)) if ks else None,
                       m4_err_over_bound=(min(m4s), max(m4s)) if m4s else None,
                       mean_abs_abs_err=max(mas) if mas else None, largest_bound=worst_bound,
                       path_kappa_err=max(pk) if pk else None, path_mean_abs_err=max(pm) if pm else None,
                       largest_deficit=worst_dev, checked=len(ks))
            rows_out.append(row)
    finally:
        qb.wide_sd_parts = orig
        qb.WIDE_SD_CLOSED_FORM = True
    return rows_out


def _cube_of(g, lo, hi, scale, zp):
    from mis_lightning.functional.wide import affine_cube_sum, table_cube_sum

    if g.kind == "affine":
        le, he, step = g._outer_edges(scale, zp)
        return affine_cube_sum(lo, hi, le, he, step)
    return table_cube_sum(lo, hi, scale.to(F64), g.values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| scheme | sd/step | gated | (k_cf - k_ex)/(bound+2^-53) | (m4_ex - m4_cf)/bound | mean_abs err "
          "| largest bound | largest 1-kappa | paths' err: kappa, mean_abs | change vs paths: kappa, mean_abs, m4 "
          "| ungated change |")
    print("|---" * 11 + "|")

    def rng(t):
        return "-" if t is None else f"[{t[0]:.3f}, {t[1]:.3f}]"

    def e(x):
        return "-" if x is None else f"{x:.1e}"

    for s in args.schemes:
        for row in check(s, args.rows, args.cols):
            print(f"| {row['scheme']} | {row['ratio']:.0e} | {row['gated']}/{row['n']} | "
                  f"{rng(row['kappa_err_over_bound'])} | {rng(row['m4_err_over_bound'])} | {e(row['mean_abs_abs_err'])} | "
                  f"{e(row['largest_bound'])} | {e(row['largest_deficit'])} | {e(row['path_kappa_err'])}, "
                  f"{e(row['path_mean_abs_err'])} | {row['d_kappa']:.1e}, {row['d_mean_abs']:.1e}, {row['d_m4']:.1e} | "
                  f"{row['ungated_max_change']:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
