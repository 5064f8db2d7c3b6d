"""float8 cell moments, this checkout's fast path against another checkout's, and both against
an integer scheme, in one process (issue 13: ``fp8_weight_only`` at most 2x an integer scheme).

Settings as ``benchmarks/float_grid_speed.py``: ``sigma = r x weight sd`` (one ``Linear`` with
N(0, 0.05^2) weights, ``--d`` of them, sigma = r x 0.05 for each ``--ratios`` r) and ``mlp 1e5``
(the 98,817-parameter MLP of ``assess_speed.py`` after 3 Adam epochs, the sigmas of
``estimate(..., mode="diagonal", hessian="ggn")``). Per setting and thread count, interleaved
``--repeats`` times (best of each, after a warm-up; CPU time of the process, summed over its
threads, so that other processes on a loaded machine do not count; run with
``OMP_WAIT_POLICY=PASSIVE`` so that idle OpenMP threads do not spin):

* ``int8``: ``ParamGrid.moments`` of ``int8_weight_only`` (fused kernel, eager), chunks of 2^18;
* ``fp8 old`` / ``fp8 new``: ``table._table_fast_moments`` of ``float8_weight_only`` on the same
  chunks, from the checkout at ``--old-root`` (its ``functional/table.py`` loaded beside this
  one's; the modules it imports are this checkout's) and from this checkout.

It prints weights/s, fp8 / int8 for both, the speed-up, and the largest |new - old| and
|new - exact| of kappa, mean_abs and m4 (exact: the sum over every cell of the whole table).

    python benchmarks/fp8_core_speed.py --old-root /path/to/checkout-before --threads 1 2
    python benchmarks/fp8_core_speed.py --floor      # per-edge cost of an exact cell sum, 1 thread
    python benchmarks/fp8_core_speed.py --old-root PATH --counts --d 65536   # cells per weight
    python benchmarks/fp8_core_speed.py --profile 0.1 --d 2.5e5 [--old-root PATH]   # cProfile

``--floor`` times, on ``[30, 16384]`` sorted standardised edges (30 edges per weight, what a
float8 weight with sigma ~0.1-0.3 x the weight sd sums exactly), the density and tail alone
(``exp`` + ``ndtr``: the transcendental floor) and the whole exact cell sum of the fast path
(density, tails, ``table._cell_terms``, sums), eager and ``torch.compile``'d, in ns per edge.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("kappa", "mean_abs", "m4")


def _old_table(root: Path):
    path = root / "mis_lightning" / "functional" / "table.py"
    spec = importlib.util.spec_from_file_location("mis_lightning.functional._table_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _exact(th, sg, values, sc):
    from mis_lightning.functional.cells import moments_from_alpha

    mids = 0.5 * (values[1:] + values[:-1]).to(torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    out = {k: [] for k in KEYS}
    for a in range(0, th.numel(), 4096):
        e = torch.cat([-inf, mids, inf]).unsqueeze(0) * sc[a : a + 4096, None]
        mm = moments_from_alpha((e - th[a : a + 4096, None]) / sg[a : a + 4096, None])
        for k in out:
            out[k].append(getattr(mm, k))
    return {k: torch.cat(v) for k, v in out.items()}


def _items(model, theta, sigma, name):
    from mis_lightning.quantization import get_scheme

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grids = get_scheme(name).apply(model).grids
    return [(g, theta[p].reshape(-1).to(torch.float64), sigma[p].reshape(-1).to(torch.float64))
            for p, g in grids.items()]


def run(label, model, theta, sigma, old, chunk, repeats, threads, scheme="float8_weight_only"):
    from mis_lightning.functional import CompilePolicy
    from mis_lightning.functional import table as new

    policy = CompilePolicy("never")
    i8 = _items(model, theta, sigma, "int8_weight_only")
    f8 = _items(model, theta, sigma, scheme)
    n = sum(th.numel() for _, th, _ in f8)
    chunks = []
    for g, th, sg in f8:
        for a in range(0, th.numel(), chunk):
            b = min(a + chunk, th.numel())
            sc, _, _ = g.element_grid(a, b)
            chunks.append((th[a:b], sg[a:b], g.values, torch.where(sc > 0, sc, torch.ones_like(sc))))

    def int8():
        for g, th, sg in i8:
            for a in range(0, th.numel(), chunk):
                g.moments(th[a : a + chunk], sg[a : a + chunk], a, min(a + chunk, th.numel()),
                          compile_policy=policy)

    def fp8(mod):
        return [mod._table_fast_moments(*c)[0] for c in chunks]

    # agreement: new against old and against the exact sum over every cell
    got, before = fp8(new), fp8(old)
    d_old = max(float((getattr(x, k) - getattr(y, k)).abs().max()) for x, y in zip(got, before) for k in KEYS)
    d_ex = 0.0 if chunks and chunks[0][2].numel() <= 1024 else math.nan  # 16-bit tables: too many cells
    for x, c in zip(got, chunks if d_ex == 0.0 else []):
        ex = _exact(*c)
        d_ex = max(d_ex, max(float((getattr(x, k) - ex[k]).abs().max()) for k in KEYS))
    for t in threads:
        torch.set_num_threads(t)
        fns = {"int8": int8, "old": lambda: fp8(old), "new": lambda: fp8(new)}
        best = dict.fromkeys(fns, math.inf)
        for f in fns.values():
            f()  # warm-up
        for _ in range(repeats):
            for k, f in fns.items():
                s = time.process_time()
                f()
                best[k] = min(best[k], time.process_time() - s)
        print(f"| {label} | {t} | {n / best['int8']:.3g} | {n / best['old']:.3g} | {n / best['new']:.3g} | "
              f"{best['old'] / best['int8']:.1f} | {best['new'] / best['int8']:.1f} | "
              f"{best['old'] / best['new']:.2f}x | {d_old:.1e} | {d_ex:.1e} |", flush=True)


def floor(repeats: int) -> None:
    from mis_lightning.functional import table as T
    from mis_lightning.functional.cells import _pdf

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n, b = 30, 16384
    a = torch.sort(torch.randn(n, b, dtype=torch.float64, generator=gen) * 3, 0).values

    def transcendental(a):
        return torch.exp(a * a * -0.5), torch.special.ndtr(-a.abs())

    def cells(a):
        pdf, tail = _pdf(a), T._tails(a)
        t2, t4 = T._cell_terms(a[:-1], a[1:], pdf[:-1], pdf[1:], tail[:-1], tail[1:])
        return t2.sum(0), t4.sum(0)

    t0 = time.perf_counter()
    compiled = torch.compile(cells, dynamic=False)
    compiled(a)
    t_compile = time.perf_counter() - t0
    for name, f in (("exp + ndtr", transcendental), ("exact cell sum, eager", cells),
                    ("exact cell sum, compiled", compiled)):
        f(a)
        best = math.inf
        for _ in range(repeats):
            s = time.process_time()
            f(a)
            best = min(best, time.process_time() - s)
        print(f"{name}: {best / (n * b) * 1e9:.1f} ns per edge ({best / b * 1e9:.0f} ns per weight of {n} edges)")
    diff = max(float((x - y).abs().max()) for x, y in zip(compiled(a), cells(a)))
    print(f"compile {t_compile:.1f} s; max |compiled - eager| {diff:.1e}; load {os.getloadavg()[0]:.2f}")


def counts(label, model, theta, sigma, old) -> None:
    """Per setting, old and new: the fraction of weights on the closed-form core, the exact edges
    and quadrature nodes per core weight, and the exact cells per weight (``_cell_terms`` rows)."""
    from mis_lightning.functional import table as new

    def measure(mod, chunks):
        rec, cells = [], [0]
        kern, terms = mod._core_side_kernel, mod._cell_terms

        def k(u0, r, e_lo, e_hi, nodes, *rest):
            rec.append((u0.numel(), e_lo.shape[0] + e_hi.shape[0], nodes.numel()))
            return kern(u0, r, e_lo, e_hi, nodes, *rest)

        def t(lo, *rest):
            cells[0] += lo.numel()
            return terms(lo, *rest)

        mod._core_side_kernel, mod._cell_terms = k, t
        try:
            on_core = sum(int(mod._table_fast_moments(*c)[1].sum()) for c in chunks)
        finally:
            mod._core_side_kernel, mod._cell_terms = kern, terms
        n = sum(a for a, _, _ in rec)
        total = sum(c[0].numel() for c in chunks)
        return (f"core {on_core / total:.2f}, edges/core weight {sum(a * b for a, b, _ in rec) / max(n, 1):.1f}, "
                f"nodes/core weight {sum(a * q for a, _, q in rec) / max(n, 1):.1f}, "
                f"exact cells/weight {cells[0] / total:.1f}")

    chunks = []
    for g, th, sg in _items(model, theta, sigma, "float8_weight_only"):
        sc, _, _ = g.element_grid(0, th.numel())
        chunks.append((th, sg, g.values, torch.where(sc > 0, sc, torch.ones_like(sc))))
    print(f"{label}: old {measure(old, chunks)} | new {measure(new, chunks)}", flush=True)


def main(argv=None) -> int:
    from benchmarks.float_grid_speed import _mlp_case, _synthetic_case

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-root", type=Path, help="checkout whose table.py is 'old' (required unless --floor)")
    ap.add_argument("--floor", action="store_true", help="only the per-edge cost of the exact cell sums")
    ap.add_argument("--counts", action="store_true", help="only the cells and nodes each weight sums")
    ap.add_argument("--profile", type=float, default=None, metavar="R",
                    help="only cProfile the fast path at sigma = R x the weight sd (--old-root's if given)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.03, 0.1, 0.3, 1.0, 3.0, 10.0])
    ap.add_argument("--d", type=float, default=1e5, help="synthetic weights")
    ap.add_argument("--mlp", action="store_true", help="also the 1e5 MLP")
    ap.add_argument("--chunk", type=int, default=1 << 18)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--scheme", default="float8_weight_only", help="the float-format scheme timed (bf16, fp16)")
    args = ap.parse_args(argv)
    if args.floor:
        floor(args.repeats)
        return 0
    if args.profile is not None:
        import cProfile
        import pstats

        from mis_lightning.functional import table

        new = table if args.old_root is None else _old_table(args.old_root)
        torch.set_num_threads(1)
        model, theta, sigma = _synthetic_case(args.profile, int(args.d))
        (g, th, sg), = _items(model, theta, sigma, "float8_weight_only")
        sc, _, _ = g.element_grid(0, th.numel())
        new._table_fast_moments(th, sg, g.values, sc)  # warm-up: rules, tables
        prof = cProfile.Profile()
        prof.enable()
        new._table_fast_moments(th, sg, g.values, sc)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return 0
    if args.old_root is None:
        ap.error("--old-root is required")
    old = _old_table(args.old_root)
    if args.counts:
        torch.set_num_threads(1)
        for r in args.ratios:
            counts(f"sigma = {r:g} x weight sd", *_synthetic_case(r, int(args.d)), old)
        return 0
    print(f"scheme = {args.scheme}, old = {args.old_root}, chunk = {args.chunk}, load = {os.getloadavg()[0]:.2f}")
    print("weights per CPU-second")
    print("| setting | threads | int8 /s | fp8 old /s | fp8 new /s | old / int8 | new / int8 | speed-up "
          "| max abs new - old | max abs new - exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if args.mlp:
        torch.set_num_threads(1)
        run("mlp 1e5", *_mlp_case("1e5"), old, args.chunk, args.repeats, args.threads, args.scheme)
    for r in args.ratios:
        run(f"sigma = {r:g} x weight sd", *_synthetic_case(r, int(args.d)), old, args.chunk, args.repeats,
            args.threads, args.scheme)
    print(f"load at the end = {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
