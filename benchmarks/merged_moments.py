"""What one cell-moment call per grid over every parameter tensor would save in a steady scoring
call: each ``ParamGrid.element_moments`` call of a steady call replayed as recorded and merged
(issue 13; docs/benchmarks.md, "p57a").

    python benchmarks/first_call.py train 1e5 /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/merged_moments.py merge /tmp/m1e5.pt --group scheme --calls moments
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/merged_moments.py merge /tmp/m1e5.pt --group scheme --calls all
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/merged_moments.py fixed /tmp/m1e5.pt --elements 128

Both modes run the default "assess" estimation on a model saved by ``first_call.py train``
(``first_call.load_saved``), one warm-up ``score_schemes`` call on scale.py's eight schemes, then a
second call that records every outermost ``ParamGrid.element_moments`` call (its grid, its
per-element inputs, the scheme whose pass made it and the caller: ``moments<_joint_sums`` for the
main and pool calls at theta-hat, ``_affine_draws_at_once`` / ``_table_draws_at_once`` for the
bootstrap draws). The recording copies the inputs, so that call's own time is inflated.

``merge``: groups the recorded calls by what the cell moments read of the grid besides its
per-element tensors (kind, code range, value table, storage and release dtypes, rounding, ...),
``kappa_only`` and whether codes and bounds are given, and with ``--group scheme`` by the scheme
too (``--group kind``: grids of different schemes with the same kind merged, e.g. int4 per row and
per group of 32). ``--calls moments``: the main and pool calls alone (one call per scheme over
every parameter: idea (a) of the brief); ``all``: the draws' calls too (the pool and draws calls,
both kappa-only, merged where they share a grid). Per group of at least two calls, alternating
over ``--rounds`` rounds, the CPU time (``time.process_time``, median) of the calls as recorded and
of one call on their concatenated inputs (the concatenation included; the revealed weights'
``known`` mask kept, ``path_elements`` dropped: the merged call is at least as large), and the
largest relative difference of kappa over the elements whose kappa is read (not ``known``).

``fixed``: the recorded calls replayed in full and on each call's first ``--elements`` elements
(the same grid and call; affine grids keep the full call's kernel paths through
``path_elements``): the second is the calls' size-independent part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _recorded(path: str) -> tuple[list[tuple], Any]:
    """``(calls, element_moments)``: the outermost ``element_moments`` calls of a steady scoring
    call of the saved model at ``path``, each ``(grid, theta, sigma, scale, zero_point, code,
    bounds, compile_policy, kappa_only, known, path_elements, caller, scheme)`` with every
    per-element tensor a ``[c]`` copy; and the unpatched method."""
    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.quantization import base as qb

    _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
    orig = qb.ParamGrid.element_moments
    rec: list[tuple] = []
    depth = [0]

    def recording(self, theta, sigma, scale, zero_point, code=None, bounds=None, compile_policy=None,
                  kappa_only=False, known=None, path_elements=None):
        if depth[0] == 0:
            c = theta.shape[0]

            def cp(t):
                return None if t is None else t.expand(c).clone()

            f = sys._getframe(1)
            caller = f.f_code.co_name + "<" + f.f_back.f_code.co_name
            while f is not None and f.f_code.co_name != "_joint_sums":
                f = f.f_back
            scheme = None if f is None else f.f_locals["prep"].scheme.name
            rec.append((self, theta.clone(), sigma.clone(), cp(scale), cp(zero_point), cp(code),
                        None if bounds is None else (cp(bounds[0]), cp(bounds[1])), compile_policy, kappa_only,
                        cp(known), path_elements, caller, scheme))
        depth[0] += 1
        try:
            return orig(self, theta, sigma, scale, zero_point, code, bounds, compile_policy, kappa_only, known,
                        path_elements)
        finally:
            depth[0] -= 1

    qb.ParamGrid.element_moments = recording
    try:
        c0 = time.process_time()
        score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
        print(f"steady call (recording) {time.process_time() - c0:.3f} s: {len(rec)} element_moments calls")
    finally:
        qb.ParamGrid.element_moments = orig
    return rec, orig


def _signature(r: tuple, by_scheme: bool) -> tuple:
    """What a merged call must share: the grid's fields the cell moments read besides its
    per-element tensors, ``kappa_only``, codes and bounds given or not (and the scheme)."""
    g = r[0]
    values = None if g.values is None else tuple(g.values.tolist())
    return (r[12] if by_scheme else "", g.kind, g.qmin, g.qmax, values, g.storage_dtype, g.quantize_arith,
            g.product_dtype, g.release_dtype, g.scale_rule, g.method, g.rounding, g.quotient_dtype, r[8],
            r[5] is None, r[6] is None)


def _merged(orig: Any, calls: list[tuple]) -> list:
    """Kappa of each of ``calls`` from one ``element_moments`` call on their concatenated inputs."""
    import torch

    cat = torch.cat
    th, sg, sc, zp = (cat([r[i] for r in calls]) for i in (1, 2, 3, 4))
    code = None if calls[0][5] is None else cat([r[5] for r in calls])
    bounds = None if calls[0][6] is None else (cat([r[6][0] for r in calls]), cat([r[6][1] for r in calls]))
    known = None
    if any(r[9] is not None for r in calls):
        known = cat([r[9] if r[9] is not None else torch.zeros(r[1].shape[0], dtype=torch.bool) for r in calls])
    mm = orig(calls[0][0], th, sg, sc, zp, code, bounds, calls[0][7], calls[0][8], known, None)
    return list(mm.kappa.split([r[1].shape[0] for r in calls]))


def _merge(path: str, group: str, which: str, rounds: int) -> None:
    rec, orig = _recorded(path)
    groups: dict[tuple, list[tuple]] = {}
    for r in rec:
        if which == "moments" and r[11] != "moments<_joint_sums":
            continue
        groups.setdefault(_signature(r, group == "scheme"), []).append(r)
    sep: dict[tuple, list[float]] = {k: [] for k in groups}
    mer: dict[tuple, list[float]] = {k: [] for k in groups}
    diff: dict[tuple, float] = {}
    for rnd in range(rounds):
        for k, calls in groups.items():
            if len(calls) < 2:
                continue
            ref: list = []
            got: list = []
            for merged in ((False, True) if rnd % 2 == 0 else (True, False)):
                c0 = time.process_time()
                if merged:
                    got = _merged(orig, calls)
                    mer[k].append(time.process_time() - c0)
                else:
                    ref = [orig(r[0], *r[1:11]).kappa for r in calls]
                    sep[k].append(time.process_time() - c0)
            d = 0.0
            for r, x, y in zip(calls, ref, got):
                read = (x == x) if r[9] is None else ~r[9]  # (kappa is never NaN on the read elements)
                if bool(read.any()):
                    d = max(d, float(((x - y).abs()[read] / x.abs()[read].clamp_min(1e-300)).max()))
            diff[k] = d
    total_sep = total_mer = 0.0
    for k, calls in groups.items():
        if len(calls) < 2:
            continue
        s, m = statistics.median(sep[k]) * 1e3, statistics.median(mer[k]) * 1e3
        total_sep, total_mer = total_sep + s, total_mer + m
        n = sum(r[1].shape[0] for r in calls)
        who = sorted({r[0].name for r in calls}, key=lambda s: [r[0].name for r in calls].index(s))
        print(f"{k[0][:26]:26s} {k[1]:6s} {k[2]:4d}..{k[3]:<4d} {'kappa-only' if k[13] else 'full      '} "
              f"{len(calls):2d} calls ({', '.join(who)}), {n:7,} elements: recorded {s:6.2f} ms, merged {m:6.2f} ms "
              f"({m * 1e6 / n:.0f} ns an element); kappa's largest relative difference {diff[k]:.1e}")
    print(f"groups of 2+ calls: recorded {total_sep:.1f} ms, merged {total_mer:.1f} ms (medians of {rounds} rounds); "
          f"load {os.getloadavg()[0]:.1f}")


def _fixed(path: str, elements: int, rounds: int) -> None:
    rec, orig = _recorded(path)

    def first(r: tuple) -> Any:
        def s(t):
            return None if t is None else t[:elements]

        g = r[0]
        pe = max(r[1].shape[0], r[10] or 0) if g.kind == "affine" and g.storage_dtype is None else None
        return orig(g, s(r[1]), s(r[2]), s(r[3]), s(r[4]), s(r[5]),
                    None if r[6] is None else (s(r[6][0]), s(r[6][1])), r[7], r[8], s(r[9]), pe)

    full: list[float] = []
    small: list[float] = []
    for _ in range(rounds):
        c0 = time.process_time()
        for r in rec:
            orig(r[0], *r[1:11])
        full.append(time.process_time() - c0)
        c0 = time.process_time()
        for r in rec:
            first(r)
        small.append(time.process_time() - c0)
    n = sum(r[1].shape[0] for r in rec)
    print(f"{len(rec)} element_moments calls, {n:,} elements: in full {statistics.median(full) * 1e3:.1f} ms, "
          f"on each one's first {elements} elements {statistics.median(small) * 1e3:.1f} ms "
          f"(medians of {rounds} rounds); load {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    mg = sub.add_parser("merge", help="the recorded cell-moment calls as recorded and merged per grid")
    mg.add_argument("path", help="a model saved by first_call.py train")
    mg.add_argument("--group", choices=["scheme", "kind"], default="scheme")
    mg.add_argument("--calls", choices=["moments", "all"], default="moments")
    mg.add_argument("--rounds", type=int, default=5)
    fx = sub.add_parser("fixed", help="the recorded calls in full and on their first elements")
    fx.add_argument("path", help="a model saved by first_call.py train")
    fx.add_argument("--elements", type=int, default=128)
    fx.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.mode == "merge":
        _merge(args.path, args.group, args.calls, args.rounds)
    else:
        _fixed(args.path, args.elements, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
