"""The per-element work of a steady scoring call's cell moments, pass by pass (issue 13;
docs/benchmarks.md, "p58b"): what a fused kernel over the cascade would have to replace.

    python benchmarks/first_call.py train 1e5 /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cell_passes.py passes /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cell_passes.py ops /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cell_passes.py calls /tmp/m1e5.pt --rounds 5
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cell_passes.py compiled /tmp/m1e5.pt --rounds 5
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cell_passes.py wide /tmp/m1e5.pt --rounds 7
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/cell_passes.py unary

Every mode but ``unary`` runs the default "assess" estimation on a model saved by
``first_call.py train`` and one warm-up ``score_schemes`` call on scale.py's eight schemes.

``passes``: one more (steady) call with every outermost ``ParamGrid.element_moments`` call watched
by a ``TorchDispatchMode``: each ATen operator is charged to the innermost ``mis_lightning``
function that issued it, and its output's elements are counted. Per scheme and parameter's role
(``main``: the calls at theta-hat, ``pool``: at the pool sd, ``draws``: the bootstrap
draws' calls), the element passes (output elements per element of the calls) and the operators; then,
with ``--scheme S --param P --role R``, the same split by function for those calls alone (the
largest ``--top``). The counts are those of the real call (the chunk facts the grids share are
read as in any steady call); the mode's own cost inflates the time, so no time is printed.
``--writes`` leaves out views and bare allocations (slices, selects, expands, ``empty``: they
move no element, yet count their output's elements otherwise); ``--off MODULE.FLAG`` runs the
call with a switch of the library off (an A/B of counts in two runs).

``ops``: the same steady call by ATen operator (name and output dtype): calls, elements, and the
CPU time of the operators alone (``time.process_time`` around each, the mode's own cost outside:
the operators' share, not the call's).

``calls``: the outermost ``element_moments`` calls of a steady call recorded (inputs copied, as
``merged_moments.py``) and replayed, the median of ``--rounds`` per call, grouped by scheme,
parameter and role: ms and ns per element. (The replay misses the chunk facts shared by tensor
identity, e.g. the wide-sd form's per-block ``C3``: the replayed calls compute it per element.)

``compiled``: the same replay eager (``CompilePolicy("never")``) against the library's compiled
kernels (``"always"``: the fused affine window kernel and the outer-cell split under
``torch.compile``, self-checked), alternating per round after one compiling pass (its wall time
printed), and kappa's largest relative difference: what the fusion the library already has gives
on these calls, and what it costs once.

``wide``: the wide-sd closed form's calls (``ParamGrid._wide_closed``) of a steady call recorded
and replayed with ``functional.wide.FUSED_WIDE_SD`` off and on, alternating: whether ``ok`` and
``mean_abs`` agree bitwise where the gate holds, ``kappa``'s largest difference, and CPU ms by
grid (the replay misses the chunk facts shared by tensor identity, as ``calls``).

``unary``: CPU ns per element of the element-wise operators the cascade is made of, on 32,768
float64 elements (a block of ``kernel.EAGER_BLOCK``), the least of ``--rounds`` rounds of 200 calls.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))

_ROLES = {"moments": None, "_affine_draws_at_once": "draws", "_table_draws_at_once": "draws"}


def _steady(path: str) -> tuple[Any, Any, Any, Any]:
    """``(est, model, schemes, sc_cfg)`` after the estimation and one warm-up scoring call."""
    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes

    _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
    return est, model, COMMON_SCHEMES, sc_cfg


def _who(frame: Any) -> tuple[str, str]:
    """``(scheme, role)`` of an outermost ``element_moments`` call from its caller's frame (a
    ``moments`` call is the pool's when its sd is the joint pass's ``sg_pool``)."""
    caller = frame.f_code.co_name
    f = frame
    while f is not None and f.f_code.co_name != "_joint_sums":
        f = f.f_back
    scheme = "?" if f is None else f.f_locals["prep"].scheme.name
    if caller == "moments":
        pool = f is not None and frame.f_locals.get("sigma") is f.f_locals.get("sg_pool")
        return scheme, "pool" if pool else "main"
    return scheme, _ROLES.get(caller) or caller


def _innermost(skip: int) -> str:
    f = sys._getframe(skip)
    while f is not None:
        name = f.f_code.co_filename
        if "mis_lightning" in name:
            return f"{Path(name).stem}.{f.f_code.co_name}"
        f = f.f_back
    return "?"


# bare allocations: no element is read or written (with --writes, not counted)
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty"}


def _watched(path: str, by_op: bool, writes: bool = False) -> tuple[dict, dict]:
    """One steady call under a dispatch mode: per ``(scheme, param, role)`` the elements of its
    calls, and per ``(scheme, param, role, key)`` the operators and output elements, ``key`` the
    innermost function (or the operator and dtype with ``by_op``, with its own CPU time).
    ``writes``: views (``OpOverload.is_view``: slices, selects, expands, ...) and bare allocations
    are not counted (they move no element)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from mis_lightning.assess import score_schemes
    from mis_lightning.quantization import base as qb

    est, model, schemes, sc_cfg = _steady(path)
    elements: dict = collections.Counter()
    ops: dict = collections.Counter()
    out_el: dict = collections.Counter()
    secs: dict = collections.Counter()
    where: list = [None]

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            c0 = time.process_time()
            out = func(*args, **(kwargs or {}))
            dt = time.process_time() - c0
            if where[0] is None:
                return out
            if writes and (func.is_view or func.overloadpacket.__name__ in _ALLOCATIONS):
                return out
            o = out[0] if isinstance(out, (tuple, list)) and out else out
            n = o.numel() if isinstance(o, torch.Tensor) else 0
            if by_op:
                key = (func.overloadpacket.__name__, str(o.dtype).replace("torch.", "") if isinstance(o, torch.Tensor) else "")
            else:
                key = _innermost(2)
            k = (*where[0], key)
            ops[k] += 1
            out_el[k] += n
            secs[k] += dt
            return out

    orig = qb.ParamGrid.element_moments

    def watched(self, theta, *a, **kw):
        if where[0] is not None:
            return orig(self, theta, *a, **kw)
        scheme, role = _who(sys._getframe(1))
        where[0] = (scheme, self.name, role)
        elements[where[0]] += theta.shape[0]
        try:
            return orig(self, theta, *a, **kw)
        finally:
            where[0] = None

    qb.ParamGrid.element_moments = watched
    try:
        with Mode():
            score_schemes(est, model, schemes, scoring_config=sc_cfg)
    finally:
        qb.ParamGrid.element_moments = orig
    return elements, {"ops": ops, "el": out_el, "s": secs}


def _passes(path: str, scheme: str | None, param: str | None, role: str | None, top: int,
            writes: bool = False) -> None:
    elements, got = _watched(path, by_op=False, writes=writes)
    if writes:
        print("(--writes: views and bare allocations not counted)")
    ops, el = got["ops"], got["el"]
    per: dict = collections.defaultdict(lambda: [0, 0])
    for k in ops:
        per[k[:3]][0] += ops[k]
        per[k[:3]][1] += el[k]
    total_el = sum(elements.values())
    total_pass = sum(v[1] for v in per.values())
    print(f"steady call: {sum(v[0] for v in per.values()):,} operators in the cell-moment calls over "
          f"{total_el:,} elements: {total_pass / total_el:.0f} element passes on average; load {os.getloadavg()[0]:.1f}")
    print(f"{'scheme':36s} {'param':9s} {'role':5s} {'elements':>9s} {'operators':>9s} {'passes':>7s}")
    for k in sorted(per, key=lambda k: -per[k][1]):
        print(f"{k[0]:36s} {k[1]:9s} {k[2]:5s} {elements[k]:9,} {per[k][0]:9,} {per[k][1] / elements[k]:7.1f}")
    if scheme is None:
        return
    keys = [k for k in ops if k[0] == scheme and (param is None or k[1] == param) and (role is None or k[2] == role)]
    n = sum(elements[k] for k in {k[:3] for k in keys})
    if not n:
        print(f"no calls of {scheme} {param} {role}")
        return
    fn: dict = collections.defaultdict(lambda: [0, 0])
    for k in keys:
        fn[k[3]][0] += ops[k]
        fn[k[3]][1] += el[k]
    print(f"\n{scheme} {param or 'all'} {role or 'all'}: {n:,} elements, by innermost function "
          f"(the {top} with most element passes):")
    for f in sorted(fn, key=lambda f: -fn[f][1])[:top]:
        print(f"  {f:48s} operators {fn[f][0]:5d}  passes {fn[f][1] / n:7.1f}")


def _ops(path: str, top: int) -> None:
    elements, got = _watched(path, by_op=True)
    ops, el, secs = got["ops"], got["el"], got["s"]
    by: dict = collections.defaultdict(lambda: [0, 0, 0.0])
    for k in ops:
        by[k[3]][0] += ops[k]
        by[k[3]][1] += el[k]
        by[k[3]][2] += secs[k]
    total = sum(v[2] for v in by.values())
    n = sum(elements.values())
    print(f"steady call's cell moments: {sum(v[0] for v in by.values()):,} operators, {n:,} elements, "
          f"operators' own CPU {total * 1e3:.1f} ms; load {os.getloadavg()[0]:.1f}")
    for k in sorted(by, key=lambda k: -by[k][2])[:top]:
        v = by[k]
        print(f"  {k[0]:24s} {k[1]:8s} calls {v[0]:6d}  passes {v[1] / n:6.1f}  CPU {v[2] * 1e3:7.2f} ms "
              f"({100 * v[2] / total:4.1f}%)  {v[2] / max(v[1], 1) * 1e9:6.2f} ns an output element")


def _recorded(path: str) -> tuple[list, Any]:
    from benchmarks.merged_moments import _recorded as rec

    return rec(path)


def _key(r: tuple) -> tuple:
    role = _ROLES.get(r[11].split("<")[0]) or r[11].split("<")[0]
    return r[12], r[0].name, role + (" kappa" if r[8] else "")


def _calls(path: str, rounds: int, top: int) -> None:
    rec, orig = _recorded(path)
    times: dict = collections.defaultdict(list)
    for _ in range(rounds):
        for i, r in enumerate(rec):
            c0 = time.process_time()
            orig(r[0], *r[1:11])
            times[i].append(time.process_time() - c0)
    rows: dict = collections.defaultdict(lambda: [0.0, 0, 0])
    for i, r in enumerate(rec):
        k = _key(r)
        rows[k][0] += statistics.median(times[i])
        rows[k][1] += r[1].shape[0]
        rows[k][2] += 1
    total = sum(v[0] for v in rows.values())
    n = sum(v[1] for v in rows.values())
    print(f"{len(rec)} calls, {n:,} elements: {total * 1e3:.1f} ms (medians of {rounds}), "
          f"{total / n * 1e9:.0f} ns an element; load {os.getloadavg()[0]:.1f}")
    for k in sorted(rows, key=lambda k: -rows[k][0])[:top]:
        v = rows[k]
        print(f"  {k[0]:36s} {k[1]:9s} {k[2]:12s} {v[2]:2d} calls {v[1]:7,} elements {v[0] * 1e3:7.2f} ms "
              f"{v[0] / v[1] * 1e9:7.0f} ns an element")
    per: dict = collections.Counter()
    for k, v in rows.items():
        per[k[0]] += v[0]
    print("by scheme (ms):", ", ".join(f"{s} {t * 1e3:.1f}" for s, t in per.most_common()))
    ints = [per[s] for s in ("int8_weight_only", "intx_weight_only_int4") if s in per]
    if "float8_weight_only" in per and ints:
        print("float8_weight_only / integer schemes: " + ", ".join(
            f"{per['float8_weight_only'] / t:.2f}" for t in ints) + " (int8_weight_only, intx_weight_only_int4)")


def _wide(path: str, rounds: int, top: int) -> None:
    """The wide-sd closed form's calls (``ParamGrid._wide_closed``) of a steady call recorded
    (inputs copied) and replayed with ``functional.wide.FUSED_WIDE_SD`` off and on, alternating
    per call and round: agreement where the gate holds, CPU ms (medians) by grid and call."""
    import torch

    from mis_lightning.assess import score_schemes
    from mis_lightning.functional import wide as W
    from mis_lightning.quantization import base as qb

    est, model, schemes, sc_cfg = _steady(path)
    orig = qb.ParamGrid._wide_closed
    rec: list = []

    def recording(self: Any, *a: Any) -> Any:
        rec.append((self, tuple(t.clone() if isinstance(t, torch.Tensor) else
                                tuple(x.clone() for x in t) if isinstance(t, tuple) else t for t in a)))
        return orig(self, *a)

    qb.ParamGrid._wide_closed = recording
    try:
        score_schemes(est, model, schemes, scoring_config=sc_cfg)
    finally:
        qb.ParamGrid._wide_closed = orig
    saved = W.FUSED_WIDE_SD
    times: dict = collections.defaultdict(list)
    kappa_diff, mean_abs_equal, ok_equal, taken = 0.0, True, True, 0
    try:
        for r in range(rounds):
            for i, (g, a) in enumerate(rec):
                outs = {}
                for on in ((False, True) if (r + i) % 2 == 0 else (True, False)):
                    W.FUSED_WIDE_SD = on
                    c0 = time.process_time()
                    outs[on] = orig(g, *a)
                    times[(i, on)].append(time.process_time() - c0)
                if r or outs[False] is None or outs[True] is None:
                    continue
                (_, k0, m0, ok0), (_, k1, m1, ok1) = outs[False], outs[True]
                ok_equal &= torch.equal(ok0, ok1)
                taken += int(ok0.sum())
                if bool(ok0.any()):
                    kappa_diff = max(kappa_diff, float((k0[ok0] - k1[ok0]).abs().max()))
                    if m0 is not None:
                        mean_abs_equal &= torch.equal(m0[ok0], m1[ok0])
    finally:
        W.FUSED_WIDE_SD = saved
    rows: dict = collections.defaultdict(lambda: [0.0, 0.0, 0, 0])
    for i, (g, a) in enumerate(rec):
        k = (g.name, g.kind, "kappa" if a[6] else "full")
        rows[k][0] += statistics.median(times[(i, False)])
        rows[k][1] += statistics.median(times[(i, True)])
        rows[k][2] += a[0].shape[0]
        rows[k][3] += 1
    off, on = sum(v[0] for v in rows.values()), sum(v[1] for v in rows.values())
    print(f"{len(rec)} calls, {sum(v[2] for v in rows.values()):,} elements, {taken:,} taken by the form: "
          f"off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms (medians of {rounds}); ok equal {ok_equal}, "
          f"mean_abs equal {mean_abs_equal}, kappa largest difference {kappa_diff:.1e}; load {os.getloadavg()[0]:.1f}")
    for k in sorted(rows, key=lambda k: -rows[k][0])[:top]:
        v = rows[k]
        print(f"  {k[0]:9s} {k[1]:7s} {k[2]:6s} {v[3]:2d} calls {v[2]:7,} elements off {v[0] * 1e3:6.2f} ms "
              f"on {v[1] * 1e3:6.2f} ms")


def _compiled(path: str, rounds: int, top: int) -> None:
    from mis_lightning.functional.kernel import CompilePolicy

    rec, orig = _recorded(path)
    pol = {"eager": CompilePolicy("never"), "compiled": CompilePolicy("always")}

    def run(r: tuple, p: str) -> Any:
        return orig(r[0], *r[1:7], pol[p], *r[8:11])

    w0 = time.perf_counter()
    for r in rec:
        run(r, "compiled")
    print(f"first compiled pass (compiles): {time.perf_counter() - w0:.1f} s wall", flush=True)
    times: dict = {p: collections.defaultdict(list) for p in pol}
    for rnd in range(rounds):
        for p in (("eager", "compiled") if rnd % 2 == 0 else ("compiled", "eager")):
            for i, r in enumerate(rec):
                c0 = time.process_time()
                run(r, p)
                times[p][i].append(time.process_time() - c0)
    diff = 0.0
    for r in rec:
        a, b = run(r, "eager").kappa, run(r, "compiled").kappa
        d = ((a - b).abs() / a.abs().clamp_min(1e-300)).nan_to_num(0.0)
        diff = max(diff, float(d.max()) if d.numel() else 0.0)
    rows: dict = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for i, r in enumerate(rec):
        k = _key(r)
        rows[k][0] += statistics.median(times["eager"][i])
        rows[k][1] += statistics.median(times["compiled"][i])
        rows[k][2] += r[1].shape[0]
    te, tc = sum(v[0] for v in rows.values()), sum(v[1] for v in rows.values())
    print(f"{len(rec)} calls: eager {te * 1e3:.1f} ms, compiled {tc * 1e3:.1f} ms (medians of {rounds}, "
          f"alternating); kappa's largest relative difference {diff:.1e}; load {os.getloadavg()[0]:.1f}")
    for k in sorted(rows, key=lambda k: -rows[k][0])[:top]:
        v = rows[k]
        print(f"  {k[0]:36s} {k[1]:9s} {k[2]:12s} {v[2]:7,} elements: eager {v[0] * 1e3:6.2f} ms, "
              f"compiled {v[1] * 1e3:6.2f} ms ({v[0] / v[2] * 1e9:.0f} -> {v[1] / v[2] * 1e9:.0f} ns an element)")


def _unary(rounds: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 15, dtype=torch.float64, generator=g) * 3
    y = torch.randn(1 << 15, dtype=torch.float64, generator=g) * 3
    m = x > 0
    idx = torch.randperm(1 << 15, generator=g)
    cases = {
        "x * y": lambda: x * y,
        "x.mul_(1.0) (in place)": lambda: x.mul_(1.0),
        "x > 0": lambda: x > 0,
        "minimum(x, y)": lambda: torch.minimum(x, y),
        "where(m, x, 0.0)": lambda: torch.where(m, x, 0.0),
        "where(m, x, y)": lambda: torch.where(m, x, y),
        "index_select(x, perm)": lambda: x.index_select(0, idx),
        "exp": lambda: torch.exp(x),
        "expm1": lambda: torch.expm1(x),
        "erf": lambda: torch.erf(x),
        "erfc": lambda: torch.erfc(x),
        "special.ndtr(-|x|)": lambda: torch.special.ndtr(-x.abs()),
        "erfc(|x| / sqrt 2) / 2": lambda: torch.erfc(x.abs().mul_(math.sqrt(0.5))).mul_(0.5),
        "x ** 4": lambda: x**4,
        "x.square().square()": lambda: x.square().square(),
    }
    for name, f in cases.items():
        best = math.inf
        for _ in range(rounds):
            f()
            c0 = time.process_time()
            for _ in range(200):
                f()
            best = min(best, (time.process_time() - c0) / 200)
        print(f"  {name:28s} {best / x.numel() * 1e9:6.2f} ns an element")
    print(f"load {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    ps = sub.add_parser("passes", help="element passes per scheme, parameter and role; by function")
    ps.add_argument("path", help="a model saved by first_call.py train")
    ps.add_argument("--scheme", default=None)
    ps.add_argument("--param", default=None)
    ps.add_argument("--role", choices=["main", "pool", "draws"], default=None)
    ps.add_argument("--top", type=int, default=25)
    ps.add_argument("--writes", action="store_true",
                    help="count only operators that write elements (no views, no bare allocations)")
    ps.add_argument("--off", action="append", default=[], metavar="MODULE.FLAG",
                    help="a mis_lightning switch set False for the run (e.g. functional.wide.FUSED_WIDE_SD)")
    op = sub.add_parser("ops", help="the cell moments of a steady call by ATen operator")
    op.add_argument("path")
    op.add_argument("--top", type=int, default=30)
    for name, helptext in (("calls", "the recorded calls replayed: ns an element"),
                           ("compiled", "the recorded calls eager and with the library's compiled kernels"),
                           ("wide", "the wide-sd closed form's calls replayed, FUSED_WIDE_SD off and on")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("path")
        c.add_argument("--rounds", type=int, default=5)
        c.add_argument("--top", type=int, default=16)
    un = sub.add_parser("unary", help="ns an element of the cascade's element-wise operators")
    un.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.mode == "passes":
        from benchmarks.first_call import switch_off

        switch_off(args.off)
        _passes(args.path, args.scheme, args.param, args.role, args.top, args.writes)
    elif args.mode == "ops":
        _ops(args.path, args.top)
    elif args.mode == "calls":
        _calls(args.path, args.rounds, args.top)
    elif args.mode == "compiled":
        _compiled(args.path, args.rounds, args.top)
    elif args.mode == "wide":
        _wide(args.path, args.rounds, args.top)
    else:
        _unary(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
