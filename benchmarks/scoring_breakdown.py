"""Where one steady ``score_schemes`` call goes, phase by phase and scheme by scheme, in CPU seconds
and in Adam epochs of the same model, beside each phase's memory-bandwidth / GEMM floor (issue 13;
docs/benchmarks.md, "p43a").

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/scoring_breakdown.py /tmp/m1e7.pt --calls 3

One thread, after the default "assess" estimation (``first_call.load_saved``) and one warm-up call
(torchao's import, the one-time tables), ``--calls`` calls are timed with the phases' functions
wrapped: each phase's time is *exclusive* (its own, less the wrapped functions it calls), summed
over the calls and divided by their number. The cell-moment calls of the joint pass are labelled
by scheme (the grid's owner) and role: ``main`` (at theta-hat), ``pool`` (at ``sigma / sqrt 2``),
``draws`` (the bootstrap draws' parts); ``--by-layer`` splits them by parameter, ``--inner`` times the
cell moments' parts (``ParamGrid._own_edges``, ``_inside``, ``_wide_closed``, ``table_cell_moments``,
...) under their phase's label, ``--ops N`` profiles one more call's aten operators, ``--off MODULE.FLAG``
sets a switch False (an A/B of one change in one checkout). The wrappers
cost ~2 us a call (a few thousand calls). Each row also counts its minor page faults (exclusive,
as the time): ``--first`` shows where a process's first call grows the heap (p44a: ~26k faults at
1e5 weights, in the power sums and the first layer's cell moments; a steady call ~2k).

The floors: ``bandwidth`` a 64 MiB float64 copy's bytes per second (read + write), ``sgemm`` /
``dgemm`` the rate of a ``[512, 1024] x [1024, 3328]`` product (the first layer's power-sum GEMM
shape), measured here, now, on one thread, in CPU time.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))


def floors() -> dict[str, float]:
    """This machine's one-thread copy bandwidth (bytes/s, read + write) and GEMM rates
    (multiply-adds/s, float32 and float64), medians of 5."""
    import torch

    def med(f: Callable[[], None], k: int = 5) -> float:
        ts = []
        for _ in range(k):
            c0 = time.process_time()
            f()
            ts.append(time.process_time() - c0)
        return sorted(ts)[k // 2]

    a = torch.randn(1 << 23, dtype=torch.float64)
    b = torch.empty_like(a)
    t = med(lambda: b.copy_(a))
    out = {"bandwidth": 2 * a.numel() * 8 / t}
    for dt in (torch.float32, torch.float64):
        x, w = torch.randn(512, 1024, dtype=dt), torch.randn(1024, 3328, dtype=dt)
        t = med(lambda x=x, w=w: torch.mm(x, w))
        out["sgemm" if dt == torch.float32 else "dgemm"] = 512 * 1024 * 3328 / t
    return out


class Timer:
    """Exclusive CPU time and minor page faults per label of wrapped functions (a stack of the
    open calls' child time and faults)."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])
        self.stack: list[list[float]] = []
        self.labels: list[str] = []
        self.on = False

    def wrap(self, f: Callable, label: Callable[..., str] | str) -> Callable:
        @functools.wraps(f)
        def g(*a: Any, **k: Any) -> Any:
            if not self.on:
                return f(*a, **k)
            name = label if isinstance(label, str) else label(*a, **k)
            s, f0 = time.process_time(), _minflt()
            self.stack.append([0.0, 0])
            self.labels.append(name)
            try:
                return f(*a, **k)
            finally:
                tot, faults = time.process_time() - s, _minflt() - f0
                child = self.stack.pop()
                self.labels.pop()
                st = self.stats[name]
                st[0] += 1
                st[1] += tot - child[0]
                st[2] += faults - child[1]
                if self.stack:
                    self.stack[-1][0] += tot
                    self.stack[-1][1] += faults
        return g


def _minflt() -> int:
    """The process's minor page faults so far (fresh pages the kernel maps and zeroes; pf40)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _phases(stats: dict[str, list[float]], calls: int, field: int = 1) -> dict[str, float]:
    """Seconds (``field`` 1; 2: minor page faults) per call by phase, all schemes (the label's
    part after ``scheme: ``)."""
    groups: dict[str, float] = collections.defaultdict(float)
    for name, v in stats.items():
        g = name.split(": ", 1)[1] if ": " in name else name
        groups[g.split(" (")[0].split(" / ")[0]] += v[field] / calls
    return groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--schemes", nargs="+", default=None, help="default: scale.py's COMMON_SCHEMES")
    ap.add_argument("--calls", type=int, default=2, help="steady calls timed (after one warm-up call)")
    ap.add_argument("--plain", type=int, default=0, metavar="N",
                    help="first N calls without the wrappers (their cost and the load's, apart)")
    ap.add_argument("--first", action="store_true", help="also the warm-up (first) call's phases")
    ap.add_argument("--by-layer", action="store_true", help="the cell moments' rows by scheme and parameter")
    ap.add_argument("--ops", type=int, default=0, metavar="N",
                    help="then one more call under torch.profiler: its N largest aten operators (self CPU)")
    ap.add_argument("--off", action="append", metavar="MODULE.FLAG",
                    help="set a boolean switch of mis_lightning False first (repeatable; first_call.py's --off)")
    ap.add_argument("--on", action="append", metavar="MODULE.FLAG",
                    help="set a boolean switch of mis_lightning True first (repeatable; after --off)")
    ap.add_argument("--inner", action="store_true",
                    help="also time the cell moments' parts (ParamGrid._own_moments, _path_moments, ...)")
    args = ap.parse_args(argv)
    from benchmarks.first_call import load_saved, switch_off, switch_on

    switch_off(args.off)
    switch_on(args.on)
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.quantization import base as qb

    A = importlib.import_module("mis_lightning.assess")
    lf = importlib.import_module("mis_lightning.estimation.linear_factors")
    mc = importlib.import_module("mis_lightning._modelcopy")
    T = Timer()
    owner: dict[int, str] = {}  # id(grid) -> scheme name (and the parameter's, --by-layer)
    seen: dict[tuple, int] = {}  # (grid, chunk start) -> moments calls from _joint_sums

    prep0 = A._prepare_scheme

    def prepare(est: Any, model: Any, scheme: Any, *a: Any, **k: Any) -> Any:
        p = prep0(est, model, scheme, *a, **k)
        for name, g in p.grids.items():
            owner[id(g)] = f"{scheme.name} [{name}]" if args.by_layer else scheme.name
        return p

    A._prepare_scheme = T.wrap(prepare, lambda est, model, scheme, *a, **k: f"{scheme.name}: prepare (rest)")
    cur: list[str] = ["?"]

    def apply_label(self: Any, *a: Any, **k: Any) -> str:
        cur[0] = self.name
        return f"{self.name}: apply (rest: grids' facts)"

    qb.QuantizationScheme.apply = T.wrap(qb.QuantizationScheme.apply, apply_label)
    copy0 = mc.private_copy
    qb.private_copy = T.wrap(copy0, lambda *a, **k: f"{cur[0]}: private copy")
    for cls in {type(s) for s in A.resolve_schemes(args.schemes or COMMON_SCHEMES)}:
        for klass in cls.__mro__:
            if "_quantize_copy" in vars(klass):
                klass._quantize_copy = T.wrap(vars(klass)["_quantize_copy"],  # type: ignore[attr-defined]
                                              lambda self, *a, **k: f"{self.name}: backend _quantize_copy")
                break
    qb.ParamGrid.reveal = T.wrap(qb.ParamGrid.reveal, lambda self, *a, **k: f"{owner.get(id(self), cur[0])}: reveal")

    mom0 = qb.ParamGrid.moments

    def mom_label(self: Any, th: Any, sg: Any, a: int = 0, b: int = 0, **k: Any) -> str:
        who = owner.get(id(self), "storage/other")
        caller = sys._getframe(2).f_code.co_name
        if caller == "_joint_sums":
            key = (id(self), a)
            seen[key] = seen.get(key, 0) + 1
            return f"{who}: moments {'main' if seen[key] % 2 == 1 else 'pool'}"
        return f"{who}: moments from {caller}"

    qb.ParamGrid.moments = T.wrap(mom0, mom_label)
    if hasattr(A, "_cast_live_kappa"):  # (p53a's casts on their live weights: main, then pool)
        def live_label(g: Any, th: Any, *rest: Any, **k: Any) -> str:
            key = ("live", id(g), id(th))  # (the chunk's live weights: one tensor for its main and pool calls)
            seen[key] = seen.get(key, 0) + 1
            return f"{owner.get(id(g), 'storage/other')}: moments {'main' if seen[key] % 2 == 1 else 'pool'} live"

        A._cast_live_kappa = T.wrap(A._cast_live_kappa, live_label)
        A._cast_live_facts = T.wrap(A._cast_live_facts, "joint pass: _cast_live_facts")
    for n in ("_draw_parts", "_sampled_draw_parts"):  # (a subset grid's inner call: its caller's owner)
        setattr(A, n, T.wrap(getattr(A, n), lambda g, *a, **k: f"{owner.get(id(g)) or T.labels[-1].split(':')[0]}: draws"))
    for n in ("_requantized_moments", "_joint_exact_fourth", "_record_correlation", "_floor_sensitivity"):
        setattr(A, n, T.wrap(getattr(A, n), n))
    A._finish_scheme = T.wrap(A._finish_scheme, lambda est, prep, *a, **k: f"{prep.scheme.name}: finish")
    def by_reader(n: str) -> Callable[..., str]:  # --by-layer: "power sums [parameter]: ..."
        return lambda reader, *a, **k: f"power sums [{reader.name}]: {n}" if args.by_layer else f"power sums: {n}"

    def by_factors(n: str) -> Callable[..., str]:  # the layer by its input width (the factors')
        return lambda fac, *a, **k: (f"power sums [in {fac.x.shape[1]}]: {n}" if args.by_layer
                                     else f"power sums: {n}")

    A._distinct_list_sums = T.wrap(A._distinct_list_sums, by_reader("_distinct_list_sums (rest)"))
    A._joint_draw_sums = T.wrap(A._joint_draw_sums, by_reader("_joint_draw_sums (rest)"))
    A._draw_sums = T.wrap(A._draw_sums, by_reader("_draw_sums"))
    lf.factored_power_sums = T.wrap(lf.factored_power_sums, by_factors("factored_power_sums"))
    for n in ("_even_power_sums_f32", "_binomial_sums_f64", "_even_sums_on_rows"):
        if hasattr(lf, n):
            setattr(lf, n, T.wrap(getattr(lf, n), by_factors(n)))
    if args.inner:
        def part(n: str) -> Callable[..., str]:  # the enclosing phase's label / the part
            return lambda *a, **k: (T.labels[-1].split(" / ")[0] if T.labels else "?") + " / " + n

        for n in ("_own_moments", "_path_moments", "_point_split", "_wide_sd", "_wide_closed", "_inside",
                  "_own_edges", "_chunk_grid", "_revealed_at"):
            setattr(qb.ParamGrid, n, T.wrap(getattr(qb.ParamGrid, n), part(n)))
        qb.table_cell_moments = T.wrap(qb.table_cell_moments, part("table_cell_moments"))
    # the joint pass's own parts (p49b: its "rest" was ~0.9-1.15 s of a 1e7 call, ~40% the sd-0 point masses)
    A._unit_columns = T.wrap(A._unit_columns, "joint pass: point masses (_unit_columns)")
    A._draw_normals = T.wrap(A._draw_normals, "joint pass: normals (_draw_normals)")
    A._draw_sample = T.wrap(A._draw_sample, "joint pass: _draw_sample")
    A._DeficitColumns.of = T.wrap(A._DeficitColumns.of, "joint pass: _DeficitColumns.of")
    for n in ("chunk_deficit_bound", "chunk_wide_deficit"):
        setattr(qb.ParamGrid, n, T.wrap(getattr(qb.ParamGrid, n), f"joint pass: {n}"))
    A._joint_sums = T.wrap(A._joint_sums, "joint pass (rest: chunk loop, casts, sums)")
    A.score_schemes = T.wrap(A.score_schemes, "score_schemes (rest)")
    A.release_chunk_facts = T.wrap(A.release_chunk_facts, "release_chunk_facts")

    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(args.path)
    epoch = float(saved["epoch"])
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    schemes = args.schemes or COMMON_SCHEMES
    T.on = args.first
    c0 = time.process_time()
    A.score_schemes(est, model, schemes, scoring_config=sc_cfg)  # warm-up
    plain = [time.process_time() - c0]
    T.on = False
    if args.first:  # the process's first call (torchao's import, one-time tables), by phase
        print(f"first call {plain[0]:.2f} s = {plain[0] / epoch:.2f} ep, by phase (minor page faults):")
        faults = _phases(T.stats, 1, field=2)
        for g, v in sorted(_phases(T.stats, 1).items(), key=lambda kv: -kv[1])[:14]:
            print(f"  {g:56s} {v:7.3f} s {v / epoch:7.3f} ep {faults[g]:8,.0f}")
        T.stats.clear()
        seen.clear()
    for _ in range(args.plain):
        c0 = time.process_time()
        A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        plain.append(time.process_time() - c0)
    ep = float(saved["epoch"])
    print(f"unwrapped calls (the first: warm-up) {' '.join(f'{t:.2f}' for t in plain)} s = "
          f"{' '.join(f'{t / ep:.2f}' for t in plain)} ep; load {os.getloadavg()[0]:.1f}")
    fl = floors()
    T.on = True
    totals = []
    for _ in range(args.calls):
        seen.clear()
        c0 = time.process_time()
        A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        totals.append(time.process_time() - c0)
    T.on = False
    fl2 = floors()
    k = args.calls
    tot = sum(totals) / k
    print(f"size {saved['size']}, d {est.d:,}, epoch {epoch:.3f} s; steady calls {' '.join(f'{t:.2f}' for t in totals)} s"
          f" (mean {tot:.2f} s = {tot / epoch:.2f} ep); load {os.getloadavg()[0]:.1f}")
    print("floors (before / after): copy bandwidth {:.1f} / {:.1f} GB/s, sgemm {:.1f} / {:.1f}, dgemm {:.1f} / {:.1f} "
          "G multiply-adds/s".format(fl["bandwidth"] / 1e9, fl2["bandwidth"] / 1e9, fl["sgemm"] / 1e9,
                                     fl2["sgemm"] / 1e9, fl["dgemm"] / 1e9, fl2["dgemm"] / 1e9))
    print(f"{'exclusive of the wrapped callees, per call':58s} {'calls':>6s} {'CPU s':>7s} {'epochs':>7s} {'faults':>7s}")
    acc = 0.0
    for name, v in sorted(T.stats.items(), key=lambda kv: -kv[1][1]):
        acc += v[1] / k
        print(f"{name:58s} {v[0] / k:6.0f} {v[1] / k:7.3f} {v[1] / k / epoch:7.3f} {v[2] / k:7,.0f}")
    print(f"{'sum of the rows':58s} {'':6s} {acc:7.3f} {acc / epoch:7.3f}")
    groups = _phases(T.stats, k)
    if args.by_layer:
        lay: dict[str, float] = collections.defaultdict(float)
        for name, v in T.stats.items():
            if " [" in name and ": " in name.split(" [", 1)[1]:
                head, rest = name.split(" [", 1)
                layer, role = rest.split("]: ", 1)
                lay[f"[{layer}] {role}"] += v[1] / k
        print("by parameter and role, all schemes:")
        for g, v in sorted(lay.items(), key=lambda kv: -kv[1]):
            print(f"  {g:56s} {v:7.3f} s {v / epoch:7.3f} ep")
    print("by phase, all schemes:")
    for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:56s} {v:7.3f} s {v / epoch:7.3f} ep")
    if args.ops:  # (the profiler's own cost inflates every row about alike: read the shares)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
