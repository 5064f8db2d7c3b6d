"""Capture every outermost ``factored_power_sums`` call of one scoring call (its arguments and
result to disk), then replay them in one process with a boolean switch off and on alternating call
by call (both ways under the same load: whole scoring calls swing by more than a power-sum change
on a shared machine). ps35/ps36's method, kept as a script.

    python benchmarks/power_sum_replay.py capture M DIR          # M: a model saved by first_call.py train
    python benchmarks/power_sum_replay.py replay DIR [REPS] [--switch MODULE.FLAG]
    python benchmarks/power_sum_replay.py count DIR [--records N]
    python benchmarks/power_sum_replay.py layout DIR [REPS]
    python benchmarks/power_sum_replay.py tolerance DIR [REPS] NAME:SETTINGS [NAME:SETTINGS ...]
    python benchmarks/power_sum_replay.py phases DIR
    python benchmarks/power_sum_replay.py batch DIR [PARAM] [REPS]
    python benchmarks/power_sum_replay.py held DIR [REPS] [--powers 2]

``capture`` runs the estimation and one ``score_schemes`` call (the 1e7 model: 121 calls, ~3 GB
under DIR; the row weights too, p46a). ``replay`` passes the same ``d``, mean gradient and variances
objects to consecutive calls where they are equal, as the scoring pass does for a chunk's calls (p48b:
``linear_factors.SHARED_CHUNK_SETUP`` keys a chunk's shared setup on them). ``replay`` times each call (CPU, one thread) per (caller, parameter, power), after one
warm-up round (the layers' PowerCaches), and counts the calls whose result with the switch on
differs from the captured one (default switch ``estimation.linear_factors.SKINNY_GEMM_TRANSPOSED``).
``count`` (ps37) counts the GEMMs' multiply-adds of the captured calls per (caller, parameter,
power): a power-p sum of a weight takes p binomial terms ``a = 1..p``, each a GEMM
``[R, in] x [in, rows * M]`` over the output rows that reach the GEMMs (the non-silent ones) and
the ``M`` columns (the signed float64 columns: their non-zero ``(row, column)`` blocks only,
``PACK_ZERO_BLOCKS``), against an Adam epoch's ``3 N sum(in * out)`` (forward, input and weight
gradients of every Linear layer over ``N`` records; ``out`` summed over the captured chunks).
``layout`` (ps37) replays the ``_distinct_list_sums`` calls with their columns as separate tensors,
stacked row by row into a held ``[c, M]`` buffer or column by column into a held ``[M, c]`` one
(``assess.COLUMN_MAJOR_STACK``; one column, and a chunk where more than
``assess.COLUMN_MAJOR_ROWS`` of the output rows reach the GEMMs, stay row-major as there), the
stack timed with the call, alternating call by call, and checks the two layouts' sums bitwise equal.
``tolerance`` (p49a) replays the calls under named variants of ``estimation.linear_factors``' settings
(``SETTINGS``: ``ATTR=VALUE`` pairs separated by ``;``, e.g. ``wide4:WIDE_FOURTH_POWER_RTOL=True``, or
``rtol:POWER_SUMS_F32_RTOL=1e-3``; empty: the defaults): per variant the records summed in float64 by power,
the largest relative difference of any entry from the float64 sums (``POWER_SUMS_F32`` empty) by power,
and CPU seconds per round by (parameter, power), the variants alternated round by round.
``phases`` (p49a) replays the calls twice (the first warms the caches) with ``linear_factors``' helpers
wrapped (:data:`PHASES`) and prints, per (caller, parameter, power), the CPU seconds exclusive of the
wrapped callees of each (``factored_power_sums``: its own work, e.g. the check ``A >= 0``).
``batch`` (p49a) times the float32 GEMMs over the inputs of the captured ``_distinct_list_sums`` calls of
one weight (default ``2.weight``) in their skinny shapes ``[rows * M, in] x [in, R]`` (``rows`` the non-silent
rows, random operands: the time of the shapes), one GEMM per call and term as now against one per
power and term over every call's blocks stacked (what a pass summing a layer's GEMM rows across its
chunks would run), alternated.
``held`` (p51b) replays the captured ``_distinct_list_sums`` calls of the weights (``--powers``: those
powers only; ``2``: what a later scoring call on the estimate sums, its fourth powers read back,
``assess.UNIT_SUMS_ONCE``) with each chunk's setup computed per call (fresh) and held from the round
before (``assess.HOLD_CHUNK_SETUP``: ``PowerCache.hold_setup``, the entries ``assess._UNHELD_SETUP``
dropped after each chunk), the two alternated round by round after one warm-up round of each; CPU
seconds per round by (parameter, power), the setups' bytes held, and the calls whose held result
differs from the captured one.
"""

from __future__ import annotations

import collections
import glob
import importlib
import inspect
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())  # the checkout under test first

CALLERS = ("_distinct_list_sums", "_joint_draw_sums", "_draw_sums", "_exact_fourth_sums_of")


def capture(path: str, out: str) -> None:
    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.estimation import linear_factors as LF

    AS = importlib.import_module("mis_lightning.assess")
    os.makedirs(out, exist_ok=True)
    _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    est = AS.run_estimation(model, loader, loss_fn, est_cfg)
    real = LF.factored_power_sums
    depth, n, xs = [0], [0], {}

    def wrapped(fac, g_mean, v_diag, A, power, bias=False, cache=None, row_weights=None):
        depth[0] += 1
        try:
            if depth[0] > 1:
                return real(fac, g_mean, v_diag, A, power, bias, cache, row_weights)
            stack = [f.function for f in inspect.stack()[1:6]]
            tag = next((c for c in stack if c in CALLERS), stack[0])
            if id(fac.x) not in xs:
                xs[id(fac.x)] = len(xs)
                torch.save(fac.x, f"{out}/x{xs[id(fac.x)]}.pt")
            torch.save(dict(d=fac.d, gm=g_mean, vd=v_diag, A=A, power=power, bias=bias, x=xs[id(fac.x)], tag=tag,
                            module=fac.module, weight=fac.weight, fbias=fac.bias, cache=id(cache), rw=row_weights),
                       f"{out}/c{n[0]:04d}.pt")
            got = real(fac, g_mean, v_diag, A, power, bias, cache, row_weights)
            torch.save(got, f"{out}/r{n[0]:04d}.pt")
            n[0] += 1
            return got
        finally:
            depth[0] -= 1

    LF.factored_power_sums = wrapped
    c0 = time.process_time()
    AS.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
    print(f"{n[0]} calls captured; scoring {time.process_time() - c0:.2f} s CPU")


def replay(cap: str, reps: int, switch: str) -> None:
    from mis_lightning.estimation import linear_factors as LF

    mod, _, attr = switch.rpartition(".")
    sw = importlib.import_module("mis_lightning." + mod)
    if not isinstance(getattr(sw, attr), bool):
        raise SystemExit(f"--switch {switch}: not a boolean switch")
    torch.set_num_threads(1)
    xs = {int(f.rsplit("/x", 1)[-1][:-3]): torch.load(f) for f in glob.glob(f"{cap}/x*.pt")}
    files = sorted(glob.glob(f"{cap}/c*.pt"))
    tot: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    caches: dict[bool, dict[int, object]] = {False: {}, True: {}}
    differ = 0
    for rep in range(reps + 1):
        last: dict[str, torch.Tensor] = {}
        for i, f in enumerate(files):
            c = torch.load(f)
            for k in ("d", "gm", "vd"):  # one object where the scoring pass passed one (a chunk's calls: p48b)
                if k in last and last[k].shape == c[k].shape and torch.equal(last[k], c[k]):
                    c[k] = last[k]
                last[k] = c[k]
            key = (c["tag"], c["fbias"] if c["bias"] else c["weight"], c["power"])
            fac = LF.LinearFactors(module=c["module"], weight=c["weight"], bias=c["fbias"], x=xs[c["x"]], d=c["d"])
            for on in ((False, True) if (rep + i) % 2 else (True, False)):
                setattr(sw, attr, on)
                cache = caches[on].setdefault(c["cache"], LF.PowerCache())
                t0 = time.process_time()
                got = LF.factored_power_sums(fac, c["gm"], c["vd"], c["A"], c["power"], c["bias"], cache,
                                             row_weights=c.get("rw"))
                if rep:  # round 0 warms the caches
                    tot[key][on] += time.process_time() - t0
                elif on:
                    differ += not torch.equal(got, torch.load(f"{cap}/r{f[-7:]}"))
    print(f"switch {switch}; CPU s per round ({reps} rounds), off / on, by (caller, parameter, power):")
    total = [0.0, 0.0]
    for k, (off, on) in sorted(tot.items(), key=lambda kv: -kv[1][0]):
        print(f"  {k}: {off / reps:.3f} / {on / reps:.3f}")
        total[0] += off / reps
        total[1] += on / reps
    print(f"all {len(files)} calls: {total[0]:.3f} / {total[1]:.3f} s; "
          f"{differ} results differ from the captured ones with the switch on")


def count(cap: str, records: int) -> None:
    from mis_lightning.estimation import linear_factors as LF

    xs = {int(f.rsplit("/x", 1)[-1][:-3]): torch.load(f) for f in glob.glob(f"{cap}/x*.pt")}
    rows: dict[tuple, list] = collections.defaultdict(lambda: [0, 0, 0, 0.0, ""])
    layers: dict[str, list[int]] = {}
    for f in sorted(glob.glob(f"{cap}/c*.pt")):
        c = torch.load(f)
        x, d, A, p = xs[c["x"]], c["d"], c["A"], c["power"]
        R, in_f = x.shape
        key = (c["tag"], c["fbias"] if c["bias"] else c["weight"], p)
        r = rows[key]
        r[0] += 1
        r[1] += A.shape[1]
        if c["bias"]:
            r[4] = "bias: [R, out] x [out, M], no GEMM over the inputs"
            continue
        on = d.ne(0).any(0)  # the rows that reach the GEMMs (SKIP_SILENT_ROWS)
        live_rows = int(on.sum())
        signed = not bool(A.amin() >= 0)
        cols = live_rows * A.shape[1]
        if signed and LF.PACK_ZERO_BLOCKS:
            blk = A.reshape(d.shape[1], in_f, -1)[on].ne(0).any(1)  # [rows, M]
            if blk.sum() <= LF.PACK_FRACTION * blk.numel():
                cols = int(blk.sum())
        r[2] += live_rows
        r[3] += p * R * in_f * cols
        r[4] = "float64" if signed or p not in LF.POWER_SUMS_F32 else "float32"
        if c["tag"] == "_distinct_list_sums" and p == 2:
            layers.setdefault(c["weight"], [in_f, 0])[1] += d.shape[1]
    epoch = 3 * records * sum(i * o for i, o in layers.values())
    print(f"layers (in, out): {layers}; an epoch over {records} records: {epoch / 1e9:.1f} G multiply-adds")
    total = 0.0
    for (tag, name, p), (n, m, live, mac, kind) in rows.items():
        total += mac
        print(f"  {tag} {name} power {p}: {n} calls, {m / n:.1f} columns, {live / n:.1f} GEMM rows a call, "
              f"{p if mac else 0} GEMM terms a call, {mac / 1e9:.2f} G multiply-adds ({kind})")
    print(f"all: {total / 1e9:.2f} G multiply-adds = {total / epoch:.3f} of the epoch's")


def layout(cap: str, reps: int) -> None:
    from mis_lightning.estimation import linear_factors as LF

    AS = importlib.import_module("mis_lightning.assess")
    torch.set_num_threads(1)
    xs = {int(f.rsplit("/x", 1)[-1][:-3]): torch.load(f) for f in glob.glob(f"{cap}/x*.pt")}
    calls = []
    for f in sorted(glob.glob(f"{cap}/c*.pt")):
        c = torch.load(f)
        if c["tag"] == "_distinct_list_sums":
            c["cols"] = [t.contiguous() for t in c.pop("A").unbind(1)]
            calls.append(c)
    caches: dict[bool, dict[int, object]] = {False: {}, True: {}}
    tot: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    differ = 0
    for rep in range(reps + 1):
        for i, c in enumerate(calls):
            fac = LF.LinearFactors(module=c["module"], weight=c["weight"], bias=c["fbias"], x=xs[c["x"]], d=c["d"])
            cols, got = c["cols"], {}
            few = c["bias"] or float(c["d"].ne(0).any(0).double().mean()) <= AS.COLUMN_MAJOR_ROWS
            for cm in ((False, True) if (rep + i) % 2 else (True, False)):
                cache = caches[cm].setdefault(c["cache"], LF.PowerCache())
                t0 = time.process_time()
                if cm and len(cols) > 1 and few and not c["bias"]:
                    A = torch.stack(cols, 0, out=cache.scratch(("columns", c["power"]), (len(cols), cols[0].numel()),
                                                               cols[0].dtype)).T
                else:
                    A = torch.stack(cols, 1, out=cache.scratch(("columns", c["power"]), (cols[0].numel(), len(cols)),
                                                               cols[0].dtype))
                got[cm] = LF.factored_power_sums(fac, c["gm"], c["vd"], A, c["power"], c["bias"], cache)
                if rep:  # round 0 warms the caches and their held buffers
                    tot[(c["fbias"] if c["bias"] else c["weight"], c["power"])][cm] += time.process_time() - t0
            differ += rep == 0 and not torch.equal(got[False], got[True])
    print(f"CPU s per round ({reps} rounds), stack + call, row-major / column-major, by (parameter, power):")
    total = [0.0, 0.0]
    for k, (rm, cm) in sorted(tot.items(), key=lambda kv: -kv[1][0]):
        print(f"  {k}: {rm / reps:.3f} / {cm / reps:.3f}")
        total[0] += rm / reps
        total[1] += cm / reps
    print(f"all {len(calls)} calls: {total[0]:.3f} / {total[1]:.3f} s; {differ} calls' sums differ between the layouts")


def _calls(cap: str) -> tuple[dict[int, torch.Tensor], list[dict]]:
    """The captured calls, a chunk's equal ``d``, mean gradient and variances one object (as replay)."""
    xs = {int(f.rsplit("/x", 1)[-1][:-3]): torch.load(f) for f in glob.glob(f"{cap}/x*.pt")}
    calls, last = [], {}
    for f in sorted(glob.glob(f"{cap}/c*.pt")):
        c = torch.load(f)
        c["file"] = f[:-3]
        for k in ("d", "gm", "vd"):
            if k in last and last[k].shape == c[k].shape and torch.equal(last[k], c[k]):
                c[k] = last[k]
            last[k] = c[k]
        calls.append(c)
    return xs, calls


def tolerance(cap: str, reps: int, specs: list[str]) -> None:
    import ast

    from mis_lightning.estimation import linear_factors as LF

    torch.set_num_threads(1)
    variants = {}
    for spec in specs:
        name, _, sets = spec.partition(":")
        kv = [x.partition("=") for x in filter(None, sets.split(";"))]
        for k, _, _ in kv:
            if not hasattr(LF, k):
                raise SystemExit(f"{spec}: estimation.linear_factors has no {k}")
        variants[name] = {k: ast.literal_eval(v) for k, _, v in kv}
    defaults = {k: getattr(LF, k) for v in variants.values() for k in v} | {"POWER_SUMS_F32": LF.POWER_SUMS_F32}

    def apply(settings: dict) -> None:
        for k, v in (defaults | settings).items():
            setattr(LF, k, v)

    xs, calls = _calls(cap)

    def run(caches: dict) -> tuple[list[torch.Tensor], dict[tuple, float]]:
        got, t = [], collections.defaultdict(float)
        for c in calls:
            fac = LF.LinearFactors(module=c["module"], weight=c["weight"], bias=c["fbias"], x=xs[c["x"]], d=c["d"])
            cache = caches.setdefault(c["cache"], LF.PowerCache())
            t0 = time.process_time()
            got.append(LF.factored_power_sums(fac, c["gm"], c["vd"], c["A"], c["power"], c["bias"], cache,
                                              row_weights=c.get("rw")))
            t[(c["fbias"] if c["bias"] else c["weight"], c["power"])] += time.process_time() - t0
        return got, t

    apply({"POWER_SUMS_F32": frozenset()})
    ref = run({})[0]
    caches: dict[str, dict] = {n: {} for n in variants}
    for name, settings in variants.items():
        apply(settings)
        for k in LF.POWER_SUMS_F32_COUNTS:
            LF.POWER_SUMS_F32_COUNTS[k] = 0
        got = run(caches[name])[0]
        worst = {2: 0.0, 4: 0.0}
        for g, f, c in zip(got, ref, calls):
            rel = (g - f).abs() / f.abs().clamp_min(1e-300)
            worst[c["power"]] = max(worst[c["power"]], float(rel.max()) if rel.numel() else 0.0)
        n = LF.POWER_SUMS_F32_COUNTS
        print(f"{name}: records in float64 power 2 {n[(2, 'float64')]} of {n[(2, 'float64')] + n[(2, 'float32')]}, "
              f"power 4 {n[(4, 'float64')]} of {n[(4, 'float64')] + n[(4, 'float32')]}; largest |sum - float64 sum| / "
              f"|float64 sum| of any entry: power 2 {worst[2]:.3g}, power 4 {worst[4]:.3g}", flush=True)
    tot: dict[str, dict[tuple, float]] = {n: collections.defaultdict(float) for n in variants}
    names = list(variants)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            apply(variants[name])
            for k, v in run(caches[name])[1].items():
                tot[name][k] += v / reps
    apply({})
    keys = sorted(tot[names[0]], key=lambda k: -tot[names[0]][k])[:5]
    for name in names:
        print(f"{name}: all {sum(tot[name].values()):.3f} s a round; "
              + ", ".join(f"{k[0]} p{k[1]} {tot[name][k]:.3f}" for k in keys))
    print(f"load {os.getloadavg()[0]:.1f}")


PHASES = ("_even_power_sums_f32", "_even_sums_on_rows", "_binomial_sums_f64", "_zeroth_term", "_zeroth_rows",
          "_dead_rows", "_silent_rows", "_pow2_scale", "_nonzero_pairs", "_variance_power", "_zeroth_raw")


def phases(cap: str) -> None:
    from mis_lightning.estimation import linear_factors as LF

    torch.set_num_threads(1)
    xs, calls = _calls(cap)
    stack: list[float] = []
    excl: dict[tuple, float] = collections.defaultdict(float)
    group: list[tuple] = [()]

    def wrap(name: str, f):
        def g(*a, **k):
            t0 = time.process_time()
            stack.append(0.0)
            try:
                return f(*a, **k)
            finally:
                dt = time.process_time() - t0
                excl[(group[0], name)] += dt - stack.pop()
                if stack:
                    stack[-1] += dt
        return g

    real = {n: getattr(LF, n) for n in PHASES + ("factored_power_sums",)}
    for n in real:
        setattr(LF, n, wrap(n, real[n]))
    caches: dict[int, object] = {}
    try:
        for _rep in range(2):  # (the first warms the caches)
            excl.clear()
            tot: dict[tuple, float] = collections.defaultdict(float)
            for c in calls:
                group[0] = (c["tag"], c["fbias"] if c["bias"] else c["weight"], c["power"])
                fac = LF.LinearFactors(module=c["module"], weight=c["weight"], bias=c["fbias"], x=xs[c["x"]], d=c["d"])
                cache = caches.setdefault(c["cache"], LF.PowerCache())
                t0 = time.process_time()
                LF.factored_power_sums(fac, c["gm"], c["vd"], c["A"], c["power"], c["bias"], cache, row_weights=c.get("rw"))
                tot[group[0]] += time.process_time() - t0
    finally:
        for n, f in real.items():
            setattr(LF, n, f)
    print("CPU s of one replay by (caller, parameter, power), then each function's own (exclusive) seconds:")
    for key, t in sorted(tot.items(), key=lambda kv: -kv[1]):
        parts = sorted(((n, v) for (g, n), v in excl.items() if g == key and v >= 0.002), key=lambda nv: -nv[1])
        print(f"  {key}: {t:.3f}: " + ", ".join(f"{n} {v:.3f}" for n, v in parts))
    print(f"all {len(calls)} calls: {sum(tot.values()):.3f} s; load {os.getloadavg()[0]:.1f}")


def batch(cap: str, param: str, reps: int) -> None:
    torch.set_num_threads(1)
    xs, calls = _calls(cap)
    shapes = [(int(c["d"].ne(0).any(0).sum()) * c["A"].shape[1], c["power"], xs[c["x"]].shape)
              for c in calls if c["tag"] == "_distinct_list_sums" and not c["bias"] and c["weight"] == param]
    if not shapes:
        raise SystemExit(f"no _distinct_list_sums calls of {param!r} in {cap}")
    R, in_f = shapes[0][2]
    g = torch.Generator().manual_seed(0)
    xa = [torch.rand(R, in_f, generator=g) for _ in range(4)]  # (x / 2^k)^a in float32, a = 1..4
    blocks = [(torch.rand(n, in_f, generator=g), p) for n, p, _ in shapes]
    stacked = {p: torch.cat([b for b, q in blocks if q == p]) for p in {q for _, q in blocks}}

    def per_call() -> None:
        for b, p in blocks:
            for a in range(p):
                torch.mm(b, xa[a].T)

    def one_per_term() -> None:
        for p, b in stacked.items():
            for a in range(p):
                torch.mm(b, xa[a].T)

    tot = [0.0, 0.0]
    for r in range(reps):
        for i, f in ((0, per_call), (1, one_per_term)) if r % 2 == 0 else ((1, one_per_term), (0, per_call)):
            t0 = time.process_time()
            f()
            tot[i] += time.process_time() - t0
    print(f"{param}: {len(shapes)} calls, GEMM columns {min(n for n, _, _ in shapes)}-{max(n for n, _, _ in shapes)}, "
          f"x^a [{R}, {in_f}]; CPU s a round ({reps} rounds): one GEMM per call and term {tot[0] / reps:.3f}, "
          f"one per power and term over all the calls' blocks {tot[1] / reps:.3f}; load {os.getloadavg()[0]:.1f}")


def held(cap: str, reps: int, powers: list[int] | None) -> None:
    from mis_lightning.estimation import linear_factors as LF

    AS = importlib.import_module("mis_lightning.assess")
    torch.set_num_threads(1)
    xs, calls = _calls(cap)
    calls = [c for c in calls if c["tag"] == "_distinct_list_sums" and not c["bias"]
             and (not powers or c["power"] in powers)]
    caches: dict[tuple, object] = {}
    setups: dict[tuple, dict] = {}
    tot: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    differ = 0

    def one_round(hold: bool, timed: bool) -> int:
        bad = 0
        for c in calls:
            fac = LF.LinearFactors(module=c["module"], weight=c["weight"], bias=c["fbias"], x=xs[c["x"]], d=c["d"])
            cache = caches.setdefault((hold, c["cache"]), LF.PowerCache())
            chunk = (c["weight"], id(c["d"]))  # (a chunk's calls share one d: _calls)
            memo = setups.setdefault(chunk, {}) if hold else None
            cache.hold_setup(memo)
            t0 = time.process_time()
            got = LF.factored_power_sums(fac, c["gm"], c["vd"], c["A"], c["power"], c["bias"], cache,
                                         row_weights=c.get("rw"))
            if memo is not None:
                for k in AS._UNHELD_SETUP:
                    memo.pop(k, None)
            dt = time.process_time() - t0
            cache.hold_setup(None)
            if timed:
                tot[(c["weight"], c["power"])][hold] += dt
            if hold and not torch.equal(got, c["result"]):
                bad += 1
        return bad

    for c in calls:
        c["result"] = torch.load(f"{cap}/r{c['file'][-4:]}.pt")  # (the captured result)
    one_round(False, False)
    one_round(True, False)
    for rep in range(reps):
        for hold in ((False, True) if rep % 2 == 0 else (True, False)):
            differ += one_round(hold, True)
    print(f"CPU s per round ({reps} rounds), the setups fresh / held, by (parameter, power):")
    total = [0.0, 0.0]
    for k, (fresh, kept) in sorted(tot.items()):
        print(f"  {k}: {fresh / reps:.3f} / {kept / reps:.3f}")
        total[0] += fresh / reps
        total[1] += kept / reps
    size = sum(AS._setup_bytes(m) for m in setups.values())
    print(f"all {len(calls)} calls: {total[0]:.3f} / {total[1]:.3f} s ({total[1] / total[0]:.3f}); setups held "
          f"{size / 2**20:.1f} MiB; {differ} held results differ from the captured ones; load {os.getloadavg()[0]:.1f}")


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("model")
    c.add_argument("dir")
    r = sub.add_parser("replay")
    r.add_argument("dir")
    r.add_argument("reps", nargs="?", type=int, default=3)
    r.add_argument("--switch", default="estimation.linear_factors.SKINNY_GEMM_TRANSPOSED", metavar="MODULE.FLAG")
    k = sub.add_parser("count")
    k.add_argument("dir")
    k.add_argument("--records", type=int, default=4096, help="the epoch's records (first_call.py: 4096)")
    lay = sub.add_parser("layout")
    lay.add_argument("dir")
    lay.add_argument("reps", nargs="?", type=int, default=3)
    tl = sub.add_parser("tolerance")
    tl.add_argument("dir")
    tl.add_argument("reps", type=int)
    tl.add_argument("variants", nargs="+", metavar="NAME:SETTINGS")
    ph = sub.add_parser("phases")
    ph.add_argument("dir")
    bt = sub.add_parser("batch")
    bt.add_argument("dir")
    bt.add_argument("param", nargs="?", default="2.weight")
    bt.add_argument("reps", nargs="?", type=int, default=4)
    hd = sub.add_parser("held")
    hd.add_argument("dir")
    hd.add_argument("reps", nargs="?", type=int, default=4)
    hd.add_argument("--powers", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "held":
        held(args.dir, args.reps, args.powers)
    elif args.cmd == "batch":
        batch(args.dir, args.param, args.reps)
    elif args.cmd == "phases":
        phases(args.dir)
    elif args.cmd == "tolerance":
        tolerance(args.dir, args.reps, args.variants)
    elif args.cmd == "layout":
        layout(args.dir, args.reps)
    elif args.cmd == "capture":
        capture(args.model, args.dir)
    elif args.cmd == "count":
        count(args.dir, args.records)
    else:
        replay(args.dir, args.reps, args.switch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
