"""The 1e5 line's fixed costs (issue 13; docs/benchmarks.md, "p46c"): torchao's import, a first
call's extras by phase, and the steady call's time per parameter (the small ones by grid).

    python benchmarks/fixed_costs.py import --rounds 3
    python benchmarks/first_call.py train 1e5 /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py first /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py params /tmp/m1e5.pt --calls 6

``import``: CPU seconds of the library's ``import torchao.quantization`` in fresh processes that
imported torch and ``mis_lightning.assess`` only (a user who loads a trained model: no optimizer,
so no ``torch._dynamo`` yet), after one ``torch.optim.Adam`` step (whose constructor imports
``torch._dynamo`` and sympy), and of ``import torch._dynamo`` alone.

``first``: in one process (lightning_fabric imported, one Adam step, torchao imported before,
the default "assess" estimation), three ``score_schemes`` calls of scale.py's eight schemes, each
split into the scheme names' resolution (the registry's first load), ``_prepare_scheme``,
``_joint_sums``, ``_finish_scheme`` and the rest, CPU ms (minor page faults), and the joint pass
into its cell moments (main and pool calls), draws (sampled and whole), the main and pool
columns' power sums and the draws' power sums (each step's outermost calls).

``params``: after a warm-up call, the mean over ``--calls`` steady calls of each parameter's time
in the joint pass (from one parameter's influence reader to the next), and for parameters of at
most ``--small`` weights each grid's cell moments at theta-hat (``main``), in the pool protocol
(``pool``) and at the draws (``draws``), CPU ms per call. One thread; no profiler.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py est /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py heap /tmp/m1e5.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py tol /tmp/m1e5.pt --tol 1e-11

``est``: three default "assess" estimations in one process (lightning_fabric imported, one Adam
step before), each split by the accumulator's own steps (CPU ms, inclusive: a step's time holds
the steps it calls; the loader's batches are the part outside ``_update`` and ``finalize``), with
its system CPU and minor page faults (p58a: the first pass's fresh heap pages).

``heap``: the C heap (glibc ``mallinfo2``: the arena mapped from the kernel and the bytes in use,
MiB) and the minor page faults before and after the estimation and two scoring calls (torchao
imported before), and the largest in-use bytes seen at the joint pass's steps of the first call
(after each cell-moment call, draws' parts and power sums): where the first call grows the heap.
Linux with glibc only.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py once /tmp/m1e5.pt --calls 2

``once`` (p48c): in ``first``'s process (torchao imported before), ``--calls`` scoring calls, each
with the CPU ms of the one-time builds it ran (inclusive, outermost; the count in brackets): the
registry's first load, the float grids' value tables (``casts``), the value tables' layouts and
cores (``functional.table``: ``TableLayout``, the 16-bit casts' bit-pattern tables
``TableLayout.pattern_cells`` (p53b), ``_CoreRules`` and their quadrature rules, computed
on first use of each core), the series, run, cube and interpolation tables; then the
``mis_lightning`` modules the first call imported and the CPU ms of compiling their sources (what
the call pays where no bytecode is cached, under ``PYTHONDONTWRITEBYTECODE=1``).

``aoparts`` (p51e): torchao's import split, in fresh processes as scale.py's child has them before
the scoring (lightning_fabric imported, one Adam step, ``mis_lightning.assess`` imported): CPU
seconds of importing ``torch._inductor.decomposition`` (torchao's ``quant_primitives`` registers
its custom ops through ``torchao.utils._register_custom_op``, which imports it), then
``torch.distributed._tensor`` (the deprecated shim ``torchao.float8.distributed_utils`` imports),
then the library's ``import torchao.quantization`` (what is left: torchao's own modules); and, in
other processes, the whole import through the narrowest public module the library reads
(``torchao.quantization.quant_primitives``, ``beyond_linear``'s) and through
``torchao.quantization``: every ``torchao.*`` import runs ``torchao/__init__.py``, which imports
``torchao.quantization`` (and ``optim``, ``swizzle``, ``testing``) whatever was asked for.

    python benchmarks/fixed_costs.py aoparts --rounds 3
    python benchmarks/fixed_costs.py aoparts --rounds 3 --trainer

``aoneeds`` (p55b): in a fresh process as ``aoparts``' (scale.py's child), which of
``torch._dynamo``, ``torch._inductor.decomposition``, ``torch.distributed._tensor`` /
``.checkpoint`` / ``.tensor`` are imported before torchao, and for those torchao's import pulls,
the chain of modules that imported each (``python -X importtime``: wall ms); then, with a saved
model, the torchao modules whose code a steady scoring call of scale.py's schemes runs (cProfile).

    python benchmarks/fixed_costs.py aoneeds /tmp/m1e5.pt

``--trainer``: a ``lightning.pytorch.Trainer`` built first (a Lightning user's process), the whole
import timed as it comes and after a ``gc.collect()`` just before it (whether one of the
interpreter's full collections, whose cost grows with every Python object the process holds,
lands inside the import).

``faults`` (p51e): the first call's fresh heap pages. Fresh processes alternating (``--rounds``
pairs) as ``first`` (torchao imported before), one of each pair with ~110 MiB of the C heap
touched and freed before the first call (``M_TRIM_THRESHOLD`` raised in that process only, so
that glibc keeps the touched top of the heap): two scoring calls each, user and system CPU ms and
minor page faults per call. The difference of the first calls is what the fresh pages cost (the
kernel's zeroing and fault handling: system time, and the user time of first touches); the same
arithmetic runs in both.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py faults /tmp/m1e5.pt --rounds 3

``ops`` (p51e): after a warm-up call (torchao imported before), the ATen operators one steady
scoring call dispatches (a ``TorchDispatchMode`` counts each call of each operator overload
packet; composite operators count with the operators they call), the count of those returning at
most 64 elements, the 15 most called, and the per-operator floor on this machine (CPU microseconds
of ``torch.add`` on 16 float64 elements and of a masked gather ``x[mask]`` of 16, in the same
process): how much of a small model's call is the operators' count rather than their elements;
and (p52d) the operators by the function that dispatched them (the innermost ``mis_lightning``
frame): how many functions share them, the 15 with the most and their share (a loop that issued
most of them would be one place to batch).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py ops /tmp/m1e5.pt

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py split /tmp/m1e7.pt --calls 3

``split`` (p51a): what a first scoring call pays over a steady one, in ``first``'s process
(lightning_fabric imported, one Adam step: ``torch._dynamo`` imported before, as in scale.py's
child): torchao's import timed apart (CPU ms; scale.py's first call includes it), then
``--calls`` calls, each split into the fourth powers of the chunks' unit columns (the outermost
``linear_factors.factored_power_sums`` calls of power 4 on one column of ones, and with
``assess.UNIT_FOURTH_BATCHED`` (p52a) the ``assess._unit_fourth_batched`` calls that sum every chunk's at
once: the sums that ``assess.UNIT_SUMS_ONCE`` keeps in the estimate, computed by the first call on an
estimate and read back by the later ones), the one-time builds of ``once`` and the rest, with each call's minor page
faults (the unit columns' fourth powers also by parameter); then call 1 less call 2 by the same
parts. ``--off MODULE.FLAG`` (any mode but ``import``)
sets a switch of ``mis_lightning`` False first: with ``--off assess.UNIT_SUMS_ONCE`` every call sums
the unit columns, and call 1 less call 2 is the one-time costs alone. The registry's first load (its
backend modules' imports and the entry points, ``registry._load_backends``) is timed apart from the
builds, and each call's system CPU and the interpreter's collections (count and CPU ms by generation,
from ``gc.callbacks``) are printed (p56b). ``--inside`` (p56b): torchao is not imported before; the first call imports it, as
scale.py's does, and its import is timed there (the outermost
``torchao_backend._import_torchao_quantization`` calls), with the other modules the call imported.
The rest's share of the optimised cell-moment paths' sample checks is printed too (p58a: the
outermost ``fastpath.verify_sample`` calls of ``functional.affine`` and ``functional.table``,
inclusive; the first call on a path checks ``FIRST_SAMPLE`` elements against the reference).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py scaling /tmp/m1e5.pt --calls 5

``scaling`` (p52d): the largest parameter's cell-moment calls of a steady scoring call (one per
grid kind, scale count and main / pool form), each replayed on its first 256, 1,024, ... and all
of its elements: CPU ms per call (the least of ``--calls``). Flat rows would be per-call costs;
rows growing with the elements, per-element work. Then each whole call's ATen operators and the
elements their outputs hold per element of the call (views included): how many element-wise
passes an element's moments take.

``faultsby`` (p53b): where a first scoring call's fresh heap pages come from: in ``first``'s process
(torchao imported before), ``--calls`` scoring calls under a ``sys.setprofile`` hook that reads the
process's minor page faults at every call and return of a ``mis_lightning`` function and charges
each difference to the innermost such function then running (exclusive) and to every one on the
stack (inclusive, outermost recursion level): the 25 / 30 largest of each, per call. Faults only
(the hook's own time is not reported; time the calls without it).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py faultsby /tmp/m1e5.pt --calls 2

``window`` (p53b): the 1e5 line's timed window in one fresh process as scale.py's child has it
(lightning_fabric imported, Adam epochs on a copy of the model: the unit, the least of epochs 2-3
in CPU s), then the default "assess" estimation, the first and a second scoring call, each in user
and system CPU ms and minor page faults, the interpreter's collections by generation inside the
window (estimation and first call; count and CPU ms, from ``gc.callbacks``) and the window in
epochs; ``--apart``: torchao imported before the window, timed apart (the window without it).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py window /tmp/m1e5.pt [--apart]

``gate`` (p55b): steady scoring calls alternating the wide-sd closed form's gate, the checkout's
own (``WIDE_TOL``, ``WIDE_MAX_WINDOW``) and each ``--gate TOL,WINDOW``, ``--calls`` rounds: CPU s per
call, the report fields that move and the largest relative move by field.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py gate /tmp/m1e5.pt --calls 4 \
        --gate 1e-9,0.1 --gate 1e-9,0.5

``tol``: the wide-sd closed form's gate (``functional.wide.WIDE_TOL``, 1e-9) against ``--tol``
(``assess.UNIT_KAPPA_TOL`` and the series' ``functional.wide_series.SERIES_TOL`` kept): steady
scoring calls alternating (``--calls`` pairs, CPU s) and the reports' largest change of each
scheme's leakage and interval ends; then, per scheme and weight tensor, the elements the looser of
the two gates sends to the closed form and the tighter does not (at theta-hat and in the pool
protocol) and, on up to 40 of them, ``|kappa - exact|`` and ``|m4 - exact|`` of the paths (the
tighter gate) and of the closed form against the exact partition sums (tests/_wide_reference.py).

``cycles`` (p57b): what an estimation pass leaves to the interpreter's cyclic collector. In one
process (lightning_fabric imported, one Adam step, a warm-up estimation), ``--rounds`` pairs of
default "assess" estimations with ``estimation.estimate.LOSS_RANKS_WEAK`` on and off (alternating
which goes first): each one's CPU ms, the RSS when it returns, then a ``gc.collect(1)`` (the
collection that, left alone, first runs inside the next scoring call: at the imports of its
registry and of torchao): its CPU ms, the objects it found unreachable and the RSS it freed.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py cycles /tmp/m1e7.pt --rounds 3

``seed`` (p58a): the seeded ``isolated_rng`` block (``_rng._seed_global``) in fresh processes as
scale.py's child, ``_rng.SEED_ISOLATED_ONLY`` on and off alternating (``--rounds`` pairs): the first
block's CPU ms and minor faults (``torch.manual_seed``'s queued accelerator seeds each take a
``traceback.format_stack()``, whose first reads the stack's source files) and the mean of the next 20.

    python benchmarks/fixed_costs.py seed --rounds 3

``overlap`` (p59b): whether torchao's import, started in a background thread, overlaps the
estimation pass (torch's operators release the GIL) on this machine. Fresh processes as scale.py's
child (lightning_fabric imported, one Adam step, the saved model loaded), ``--rounds`` rounds of
three cases in alternating order: ``seq``, the library's filtered import of
``torchao.quantization`` then the default "assess" estimation (what every front end does now:
their scheme checks import it before the estimation); ``thread``, the same import in a
``threading.Thread`` started just before the estimation and joined after it; ``none``, the
estimation alone. Wall and CPU seconds of the whole, the estimation's own wall seconds and the wait
for the import (``seq``: the import itself; ``thread``: the join). An overlap shows as ``thread``'s
whole wall below ``seq``'s; CPU time cannot fall (both threads' CPU is the process's).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/fixed_costs.py overlap /tmp/m1e5.pt --rounds 3

``figure`` (p59b): the report figure the callback and the app write (``Report.plot`` and
``tracking.draw_figure``, Agg, 120 dpi) from a saved report JSON, ``--rounds`` pairs in one process
alternating as the library draws it and with ``report.figure_notes`` (the warnings and notes printed
under the panels) left out: CPU seconds of the plot and of the draw, the notes' characters, and
matplotlib's version (3.11 renders text glyph by glyph in Python, ``RendererAgg._draw_text_glyphs_and_boxes``).

    python benchmarks/first_call.py assess /tmp/m1e5.pt --json /tmp/r1e5.json
    python benchmarks/fixed_costs.py figure /tmp/r1e5.json --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(ROOT))

_IMPORT = """
import sys, time, torch
import mis_lightning.assess
if {adam}:
    m = torch.nn.Linear(3, 3); o = torch.optim.Adam(m.parameters()); m(torch.randn(2, 3)).sum().backward(); o.step()
before = "torch._dynamo" in sys.modules
c = time.process_time()
{what}
print(before, time.process_time() - c)
"""
_TORCHAO = ("from mis_lightning.quantization.torchao_backend import _import_torchao_quantization\n"
            "_import_torchao_quantization()")


def _imports(rounds: int) -> None:
    cases = (("torchao.quantization, no optimizer before", False, _TORCHAO),
             ("torchao.quantization, after an Adam step", True, _TORCHAO),
             ("torch._dynamo alone, no optimizer before", False, "import torch._dynamo"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    for label, adam, what in cases:
        out = []
        for _ in range(rounds):
            p = subprocess.run([sys.executable, "-c", _IMPORT.format(adam=adam, what=what)], env=env,
                               capture_output=True, text=True, check=True)
            before, t = p.stdout.split()[-2:]
            out.append(float(t))
        print(f"{label:44s} {' '.join(f'{t:.3f}' for t in out)} s CPU (torch._dynamo imported before: {before})")


_AOPARTS = """
import gc, sys, time, importlib
import lightning_fabric.utilities.seed, torch
if {trainer}:
    import lightning.pytorch as pl
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
m = torch.nn.Linear(3, 3); o = torch.optim.Adam(m.parameters()); m(torch.randn(2, 3)).sum().backward(); o.step()
import mis_lightning.assess
from mis_lightning.quantization.torchao_backend import _import_torchao_quantization, _torchao_import_notices_filtered
if {collect}:
    gc.collect()
out = []
for name in {names!r}:
    c = time.process_time()
    with _torchao_import_notices_filtered():
        _import_torchao_quantization() if name == "torchao.quantization" else importlib.import_module(name)
    out.append(time.process_time() - c)
print(" ".join(f"{{t:.4f}}" for t in out))
"""


def _aoparts(rounds: int, trainer: bool = False) -> None:
    cases = (("torch._inductor.decomposition", "torch.distributed._tensor", "torchao.quantization"),
             ("torchao.quantization.quant_primitives",), ("torchao.quantization",))
    if trainer:  # a Lightning Trainer built first; the import with and without a gc.collect() just before
        cases = (("torchao.quantization",), ("torchao.quantization", "collect"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    for case in cases:
        collect = case[-1] == "collect"
        names = case[:-1] if collect else case
        got: list[list[float]] = []
        for _ in range(rounds):
            code = _AOPARTS.format(names=names, trainer=trainer, collect=collect)
            p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            got.append([float(t) for t in p.stdout.split()[-len(names):]])
        for i, n in enumerate(names):
            label = n + (" (the rest)" if len(names) > 1 and i == len(names) - 1 else "") + (
                " after gc.collect()" if collect else "") + (" [Trainer built]" if trainer else "")
            print(f"{label:44s} {' '.join(f'{g[i]:.3f}' for g in got)} s CPU")
        if len(names) > 1:
            print(f"{'  together':44s} {' '.join(f'{sum(g):.3f}' for g in got)} s CPU")
    print(f"load {os.getloadavg()[0]:.1f}")


_AONEEDS = """
import sys
import lightning_fabric.utilities.seed, torch
m = torch.nn.Linear(3, 3); o = torch.optim.Adam(m.parameters()); m(torch.randn(2, 3)).sum().backward(); o.step()
import mis_lightning.assess
from mis_lightning.quantization.torchao_backend import _import_torchao_quantization
print("already imported: " + " ".join(n for n in {names!r} if n in sys.modules), flush=True)
print("<import>", file=sys.stderr, flush=True)
_import_torchao_quantization()
"""
# the upstream modules torchao's import pulls that cost most (p51e), the chain of importers of each
_AO_HEAVY = ("torch._dynamo", "torch._inductor.decomposition", "torch.distributed._tensor",
             "torch.distributed.checkpoint", "torch.distributed.tensor")


def _import_chains(trace: str, targets: tuple[str, ...]) -> dict[str, list[tuple[str, int]]]:
    """From ``python -X importtime``'s lines (post-order: a module's line follows its imports',
    nested two spaces a level), each target's chain of importers, outermost first, with each
    one's cumulative microseconds."""
    rows = []
    for line in trace.splitlines():
        if not line.startswith("import time:") or "| cumulative |" in line:
            continue
        _, cum, name = line[len("import time:"):].split("|")
        level = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((name.strip(), int(cum), level))
    out = {}
    for t in targets:
        at = next((i for i, r in enumerate(rows) if r[0] == t), None)
        if at is None:
            continue
        chain = [rows[at][:2]]
        level = rows[at][2]
        for name, cum, lv in rows[at + 1:]:
            if lv == level - 1:  # the first line one level up after it: the module that imported it
                chain.append((name, cum))
                level = lv
        out[t] = chain[::-1]
    return out


def _aoneeds(path: str | None) -> None:
    """(p55b) What the scoring path needs of torchao and why its import costs what it does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", _AONEEDS.format(names=_AO_HEAVY)], env=env,
                       capture_output=True, text=True, check=True)
    print(p.stdout.strip().splitlines()[-1] + " (before torchao's import, as in scale.py's child)")
    trace = p.stderr.split("<import>", 1)[1]
    for target, chain in _import_chains(trace, _AO_HEAVY).items():
        print(f"{target}: " + " <- ".join(f"{n} ({c / 1e3:.0f} ms)" for n, c in chain[::-1]))
    print("(-X importtime's cumulative wall ms, inflated by its own bookkeeping; CPU seconds by part: aoparts)")
    if not path:
        return
    import cProfile
    import pstats

    A, est, model, schemes, sc_cfg = _setup(path, adam=True)
    A.score_schemes(est, model, schemes, scoring_config=sc_cfg)  # (torchao imported here)
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
    prof.disable()
    mods: dict[str, list] = {}
    for (file, _, func), row in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        if "/torchao/" in file:
            mod = "torchao." + file.split("/torchao/", 1)[1].removesuffix(".py").replace("/", ".")
            got = mods.setdefault(mod, [0, 0.0, set()])
            got[0], got[1] = got[0] + row[1], got[1] + row[2]
            got[2].add(func)
    loaded = sorted(n for n in sys.modules if n == "torchao" or n.startswith("torchao."))
    print(f"a steady scoring call of {len(schemes)} schemes runs code of {len(mods)} of the {len(loaded)} torchao "
          "modules imported (calls, own CPU ms under cProfile, functions):")
    for mod in sorted(mods):
        calls, own, funcs = mods[mod]
        print(f"  {mod:72s} {calls:5d} {own * 1e3:6.1f}  {', '.join(sorted(funcs)[:5])}")
    print(f"load {os.getloadavg()[0]:.1f}")


def _gate(path: str, gates: list[str], calls: int) -> None:
    """(p55b) Steady scoring calls alternating the wide-sd closed form's gate: the checkout's own
    (``functional.wide.WIDE_TOL``, ``WIDE_MAX_WINDOW``) and each ``TOL,WINDOW`` of ``gates`` (the
    window set in every module that imported it), ``calls`` rounds; CPU s per call, and per gate
    the report fields that differ from the checkout's own and the largest relative move by field."""
    import json

    from benchmarks.compare_reports import flatten

    A, est, model, schemes, sc_cfg = _setup(path, adam=False)
    W = importlib.import_module("mis_lightning.functional.wide")
    owners = [W, A, importlib.import_module("mis_lightning.quantization.base")]
    configs = [(W.WIDE_TOL, W.WIDE_MAX_WINDOW)] + [tuple(float(x) for x in g.split(",")) for g in gates]

    def call(tol: float, window: float) -> tuple[float, dict]:
        W.WIDE_TOL = tol
        for m in owners:
            m.WIDE_MAX_WINDOW = window
        c = time.process_time()
        rep = A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        return time.process_time() - c, dict(flatten(json.loads(rep.to_json())))

    call(*configs[0])  # warm-up
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    reps: dict[tuple, dict] = {}
    for r in range(calls):
        for cfg in (configs if r % 2 == 0 else configs[::-1]):
            t, reps[cfg] = call(*cfg)
            times[cfg].append(t)
    call(*configs[0])
    own = reps[configs[0]]
    for cfg in configs:
        moves: dict[str, float] = {}
        for k, u in own.items():
            v = reps[cfg].get(k)
            if isinstance(u, float) and isinstance(v, float) and u != v and u == u:
                f = k.rsplit("/", 1)[-1].split("[")[0]
                moves[f] = max(moves.get(f, 0.0), abs(u - v) / max(abs(u), 1e-300))
        v = times[cfg]
        top = ", ".join(f"{f} {m:.1e}" for f, m in sorted(moves.items(), key=lambda x: -x[1])[:6])
        print(f"WIDE_TOL {cfg[0]:g}, WIDE_MAX_WINDOW {cfg[1]:g}: steady call median {sorted(v)[len(v) // 2]:.3f} s "
              f"({' '.join(f'{x:.3f}' for x in v)}); {sum(1 for k in own if own[k] != reps[cfg].get(k) and own[k] == own[k])}"
              f" of {len(own)} fields differ; largest relative moves: {top or 'none'}")
    print(f"load {os.getloadavg()[0]:.1f}")


def _faults_child(path: str, prefault: bool) -> None:
    import ctypes

    from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

    A, est, model, schemes, sc_cfg = _setup(path, adam=True)
    _import_torchao_quantization()
    if prefault:  # ~110 MiB of heap touched and freed; the top kept (this process only)
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        blocks = [libc.malloc(1 << 20) for _ in range(110)]  # below the mmap threshold: the heap
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        for b in blocks:
            libc.free(b)
    out = []
    for _ in range(2):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out += [(r1.ru_utime - r0.ru_utime) * 1e3, (r1.ru_stime - r0.ru_stime) * 1e3, r1.ru_minflt - r0.ru_minflt]
    print(" ".join(f"{x:.1f}" for x in out))


def _faults(path: str, rounds: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for r in range(rounds):
        for pre in ((False, True) if r % 2 == 0 else (True, False)):
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_faults_child", path]
                               + (["--prefault"] if pre else []), env=env, capture_output=True, text=True, check=True)
            u1, s1, f1, u2, s2, f2 = (float(x) for x in p.stdout.split()[-6:])
            print(f"{'heap touched before' if pre else 'fresh heap         '}: call 1 user {u1:.0f} sys {s1:.0f} "
                  f"= {u1 + s1:.0f} ms ({f1:,.0f} minor faults); call 2 user {u2:.0f} sys {s2:.0f} = {u2 + s2:.0f} ms "
                  f"({f2:,.0f}); load {os.getloadavg()[0]:.1f}")


def _ops(path: str) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

    A, est, model, schemes, sc_cfg = _setup(path, adam=True)
    _import_torchao_quantization()
    A.score_schemes(est, model, schemes, scoring_config=sc_cfg)  # the warm-up (first) call
    counts: collections.Counter = collections.Counter()
    sites: collections.Counter = collections.Counter()  # (p52d) by the innermost mis_lightning function
    small = [0]

    def site() -> str:
        f = sys._getframe(2)
        while f is not None and "mis_lightning" not in f.f_code.co_filename:
            f = f.f_back
        return "(outside)" if f is None else f"{f.f_code.co_filename.rsplit('mis_lightning/', 1)[-1]}:{f.f_code.co_name}"

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            counts[str(func.overloadpacket)] += 1
            small[0] += isinstance(out, torch.Tensor) and out.numel() <= 64
            sites[site()] += 1
            return out

    with _Count():
        A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
    total = sum(counts.values())
    print(f"a steady call: {total:,} ATen operator calls, {small[0]:,} of them returning at most "
          "64 elements; most called: " + ", ".join(f"{k} {v:,}" for k, v in counts.most_common(15)))
    top = sites.most_common(15)
    print(f"  by function (the innermost mis_lightning frame): {len(sites):,} functions; the 15 dispatching most "
          f"({sum(v for _, v in top) / total:.0%} of the operators): " + ", ".join(f"{k} {v:,}" for k, v in top))
    x, y = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    mask = x > 0
    for label, f in (("torch.add, 16 float64", lambda: torch.add(x, y)), ("x[mask], 16 float64", lambda: x[mask])):
        for _ in range(1000):
            f()
        c = time.process_time()
        for _ in range(20000):
            f()
        print(f"  floor: {label}: {(time.process_time() - c) / 20000 * 1e6:.2f} us CPU a call")
    print(f"load {os.getloadavg()[0]:.1f}")


class _Outputs:
    """A ``TorchDispatchMode`` (built on entry) counting the ATen operators run inside it and the
    elements of the tensors they return (``ops``, ``elements``)."""

    def __enter__(self) -> _Outputs:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.ops = self.elements = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                outer.ops += 1
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    outer.elements += t.numel() if hasattr(t, "numel") else 0
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


def _scaling(path: str, calls: int) -> None:
    """(p52d) The cell-moment calls of the largest parameter in a steady scoring call (one per
    grid kind, scale count and ``kappa_only``, as captured), each replayed on its first 256 ..
    all of its elements (the grid's own chunk facts for those elements): CPU ms per call, the
    least of ``calls`` rounds. A per-call cost would show as a flat row, per-element work as
    one growing with the elements."""
    A, est, model, schemes, sc_cfg = _setup(path, adam=False)
    qb = importlib.import_module("mis_lightning.quantization.base")
    big = max(est.theta, key=lambda n: est.theta[n].numel())
    A.score_schemes(est, model, schemes, scoring_config=sc_cfg)  # warm-up
    got: dict[tuple, tuple] = {}
    m0 = qb.ParamGrid.moments

    def capture(g: Any, th: Any, sg: Any, a: int, b: int, **k: Any) -> Any:
        if sys._getframe(1).f_code.co_name == "_joint_sums" and g.name == big and a == 0:
            cells = g.qmax - g.qmin + 1 if g.kind == "affine" else (0 if g.values is None else g.values.numel())
            got.setdefault((g.kind, cells, g.scale.numel(), bool(k.get("kappa_only"))), (g, th, sg, b, k))
        return m0(g, th, sg, a, b, **k)

    qb.ParamGrid.moments = capture
    A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
    qb.ParamGrid.moments = m0
    for (kind, cells, scales, ko), (g, th, sg, b, k) in got.items():
        sizes = [n for n in (256, 1024, 4096, 16384, 65536, 262144) if n < b] + [b]
        row = []
        for n in sizes:
            m0(g, th[:n], sg[:n], 0, n, **k)
            ts = []
            for _ in range(calls):
                c = time.process_time()
                m0(g, th[:n], sg[:n], 0, n, **k)
                ts.append(time.process_time() - c)
            row.append(f"{n:,} {min(ts) * 1e3:.2f}")
        with _Outputs() as outs:  # the whole call's operators and the elements they return
            m0(g, th, sg, 0, b, **k)
        print(f"{big} {kind} grid of {cells} values, {scales} scale(s), {'pool / kappa only' if ko else 'main'}: "
              + ", ".join(row) + f" ms; the whole call {outs.ops:,} operators returning {outs.elements / b:.0f}"
              " elements per element")
    print(f"load {os.getloadavg()[0]:.1f}")


def _faults_by(path: str, calls: int) -> None:
    from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

    A, est, model, schemes, sc_cfg = _setup(path, adam=True)
    _import_torchao_quantization()
    excl: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    stack: list[tuple[str, int]] = []  # (function, faults at its call)
    last = [0]

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event not in ("call", "return") or "mis_lightning" not in frame.f_code.co_filename:
            return
        f = faults()
        if stack:
            excl[stack[-1][0]] += f - last[0]
        last[0] = f
        co = frame.f_code
        key = f"{co.co_filename.rsplit('mis_lightning/', 1)[-1]}:{co.co_firstlineno} {co.co_name}"
        if event == "call":
            stack.append((key, f))
        elif stack:
            k, f0 = stack.pop()
            if all(k != s[0] for s in stack):  # the outermost level of a recursion only
                incl[k] += f - f0

    for call in range(1, calls + 1):
        excl.clear()
        incl.clear()
        stack.clear()
        f0 = last[0] = faults()
        sys.setprofile(hook)
        try:
            A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        finally:
            sys.setprofile(None)
        print(f"call {call}: {faults() - f0:,} minor faults; by the innermost mis_lightning function (exclusive):")
        for k, v in excl.most_common(25):
            print(f"  {v:8,}  {k}")
        print("  inclusive:")
        for k, v in incl.most_common(30):
            print(f"  {v:8,}  {k}")
    print(f"load {os.getloadavg()[0]:.1f}")


def _window(path: str, apart: bool) -> None:
    import copy
    import gc

    import lightning_fabric.utilities.seed  # noqa: F401 - a Lightning user's process has it
    import torch

    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES

    A = importlib.import_module("mis_lightning.assess")
    # (after the library's import: beyond_linear puts its checkout first on sys.path)
    from benchmarks.beyond_linear import epoch as adam_epoch

    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    twin = copy.deepcopy(model)  # the unit: Adam epochs of a copy, the least of epochs 2-3
    opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    epoch = min([adam_epoch(twin, loader, loss_fn, opt, cpu=True) for _ in range(3)][1:])

    def usage() -> tuple[float, float, int]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime, r.ru_minflt

    def part(label: str, a: tuple, b: tuple) -> None:
        print(f"{label:<32} user {1e3 * (b[0] - a[0]):6.0f} ms, system {1e3 * (b[1] - a[1]):4.0f} ms, "
              f"{b[2] - a[2]:7,} minor faults")

    if apart:
        from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

        u0 = usage()
        _import_torchao_quantization()
        part("torchao's import (apart)", u0, usage())
    gcs: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    began = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.process_time()
        else:
            gcs[info["generation"]][0] += 1
            gcs[info["generation"]][1] += time.process_time() - began[0]

    gc.callbacks.append(on_gc)
    u0, c0 = usage(), time.process_time()
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    u1, c1 = usage(), time.process_time()
    A.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
    u2, c2 = usage(), time.process_time()
    gc.callbacks.remove(on_gc)
    A.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
    u3 = usage()
    part("estimation", u0, u1)
    part("first scoring call", u1, u2)
    part("second scoring call", u2, u3)
    print("collections in the window: " + ", ".join(f"generation {g}: {n} ({1e3 * t:.1f} ms)"
                                                     for g, (n, t) in gcs.items()))
    print(f"epoch {epoch:.4f} s CPU; window (estimation + first call) {c2 - c0:.3f} s = {(c2 - c0) / epoch:.1f} epochs "
          f"(estimation {(c1 - c0) / epoch:.1f}){' without torchao import' if apart else ''}; load {os.getloadavg()[0]:.1f}")


def _setup(path: str, adam: bool) -> tuple[Any, ...]:
    if adam:
        _adam_step()
    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES

    A = importlib.import_module("mis_lightning.assess")
    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    return A, est, model, COMMON_SCHEMES, sc_cfg


def _timed(owner: Any, attr: str, label: str, acc: collections.Counter, faults: collections.Counter | None = None,
           depth: list[int] | None = None, counts: collections.Counter | None = None) -> None:
    """Replace ``owner.attr`` by a wrapper that adds each call's CPU seconds to ``acc[label]`` (its
    minor page faults to ``faults[label]``, its calls to ``counts[label]``); inclusive (a call's time holds the wrapped calls it
    makes), or with ``depth`` (one ``[0]`` shared by a set of wrappers) the outermost calls of the
    set alone (a call made within another counts as the caller's)."""
    f0 = getattr(owner, attr)

    def w(*a: Any, **k: Any) -> Any:
        if depth is not None:
            if depth[0]:
                return f0(*a, **k)
            depth[0] += 1
        c = time.process_time()
        f = 0 if faults is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            return f0(*a, **k)
        finally:
            if depth is not None:
                depth[0] -= 1
            acc[label] += time.process_time() - c
            if counts is not None:
                counts[label] += 1
            if faults is not None:
                faults[label] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
    setattr(owner, attr, w)


def _first(path: str) -> None:
    from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

    A, est, model, schemes, sc_cfg = _setup(path, adam=True)
    _import_torchao_quantization()
    acc: collections.Counter = collections.Counter()
    flt: collections.Counter = collections.Counter()
    for n in ("resolve_schemes", "_prepare_scheme", "_joint_sums", "_finish_scheme"):
        _timed(A, n, n, acc, faults=flt)
    # within the joint pass, each step's outermost calls (a draw's cell moments count as the draw's)
    qb = importlib.import_module("mis_lightning.quantization.base")
    inner: collections.Counter = collections.Counter()
    depth = [0]
    for owner, attr, label in ((qb.ParamGrid, "moments", "cell moments"), (A, "_sampled_draw_parts", "sampled draws"),
                               (A, "_draw_parts", "draws"), (A, "_distinct_list_sums", "power sums"),
                               (A, "_joint_draw_sums", "draws' power sums")):
        _timed(owner, attr, label, inner, depth=depth)
    for i in range(3):
        acc.clear()
        flt.clear()
        inner.clear()
        c = time.process_time()
        A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        t = time.process_time() - c
        parts = ", ".join(f"{k} {v * 1e3:.1f} ({flt[k]:,})" for k, v in acc.items())
        print(f"call {i + 1}: {t * 1e3:.1f} ms: {parts}, rest {(t - sum(acc.values())) * 1e3:.1f}")
        print("  in _joint_sums: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in inner.items())
              + f", the rest {(acc['_joint_sums'] - sum(inner.values())) * 1e3:.1f}")
    print(f"load {os.getloadavg()[0]:.1f}")


_ONCE = (("mis_lightning.quantization.registry", "_load_backends"),
         ("mis_lightning.quantization.casts", "representable_values"),
         ("mis_lightning.quantization.casts", "cast_cell_values"),
         ("mis_lightning.functional.table", "TableLayout.__init__"),
         ("mis_lightning.functional.table", "TableLayout.pattern_cells"),
         ("mis_lightning.functional.table", "_CoreRules.__init__"),
         ("mis_lightning.functional.table", "_CoreRules.prepare"),
         ("mis_lightning.functional.wide_table", "SeriesTable.__init__"),
         ("mis_lightning.functional.runs", "RunTable.__init__"),
         ("mis_lightning.functional.wide", "CubeTable.__init__"),
         ("mis_lightning.functional.interp", "InterpTable.__init__"))


def _scored(A: Any, est: Any, model: Any, schemes: list[str], sc_cfg: Any) -> tuple[float, int]:
    """One ``score_schemes`` call: its CPU seconds and minor page faults."""
    c, f = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
    return time.process_time() - c, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f


def _time_builds(acc: collections.Counter, cnt: collections.Counter | None = None, label: str | None = None,
                 builds: tuple[tuple[str, str], ...] = _ONCE) -> None:
    """Wrap the one-time builds ``builds`` (default :data:`_ONCE`; outermost calls): CPU seconds in
    ``acc`` under each build's name, or all under ``label``; calls in ``cnt``."""
    depth = [0]
    for modname, dotted in builds:
        owner: Any = importlib.import_module(modname)
        *path_, attr = dotted.split(".")
        for p in path_:
            owner = getattr(owner, p)
        _timed(owner, attr, label or f"{modname.rsplit('.', 1)[-1]}.{dotted}", acc, depth=depth, counts=cnt)


def _once(path: str, calls: int) -> None:
    from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

    A, est, model, schemes, sc_cfg = _setup(path, adam=True)
    _import_torchao_quantization()
    acc: collections.Counter = collections.Counter()
    cnt: collections.Counter = collections.Counter()
    _time_builds(acc, cnt)
    before = set(sys.modules)
    for i in range(calls):
        acc.clear()
        cnt.clear()
        t, f = _scored(A, est, model, schemes, sc_cfg)
        print(f"call {i + 1}: {t * 1e3:.1f} ms ({f:,} minor faults); one-time builds {sum(acc.values()) * 1e3:.1f} ms: "
              + ", ".join(f"{k} {v * 1e3:.1f} ({cnt[k]})" for k, v in acc.items() if v >= 5e-5))
        if i == 0:
            ours = sorted(n for n in set(sys.modules) - before if n.split(".")[0] == "mis_lightning")
            c = time.process_time()
            for n in ours:
                f_ = sys.modules[n].__file__
                compile(Path(f_).read_text(), f_, "exec")
            print(f"  modules of mis_lightning the call imported: {len(ours)}, compiling their sources "
                  f"{(time.process_time() - c) * 1e3:.1f} ms ({', '.join(n.rsplit('.', 1)[-1] for n in ours)})")
    print(f"load {os.getloadavg()[0]:.1f}")


def _is_unit_fourth(A: Any, power: int) -> bool:
    """A power-4 call on one column of ones: the chunk's unit column (``assess.UNIT_SUMS_ONCE``'s
    sums, which a first call on an estimate computes and later calls read back)."""
    return power == 4 and A.dim() == 2 and A.shape[1] == 1 and bool((A == 1).all())


def _split(path: str, calls: int, inside: bool = False) -> None:
    """``split``: what a first call pays over a steady one, by part (see the module docstring)."""
    A, est, model, schemes, sc_cfg = _setup(path, adam=True)
    once: collections.Counter = collections.Counter()
    reg = importlib.import_module("mis_lightning.quantization.registry")
    if inside:  # as in scale.py's child: the first call imports torchao (timed there, apart from the rest)
        modules0 = set(sys.modules)
        load0 = reg._load_backends

        def load() -> None:  # (the backend modules not imported before the call: torchao's timer after them)
            load0()
            tb = sys.modules["mis_lightning.quantization.torchao_backend"]
            if not hasattr(tb._import_torchao_quantization, "__wrapped_by_split__"):
                _timed(tb, "_import_torchao_quantization", "torchao", once, depth=[0])
                tb._import_torchao_quantization.__wrapped_by_split__ = True

        reg._load_backends = load
    else:
        from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

        c = time.process_time()
        _import_torchao_quantization()
        print(f"torchao's import (before the calls, apart): {(time.process_time() - c) * 1e3:.1f} ms CPU")
    # the registry's first load (its backend modules' imports, the entry points) apart from the tables
    # (the tables' label without it: before p57b it held the registry's load too, which the
    # summary's fixed part then counted twice)
    _timed(reg, "_load_backends", "registry", once, depth=[0])
    _time_builds(once, label="builds", builds=tuple(b for b in _ONCE if b[1] != "_load_backends"))
    checks = [0]  # (p58a) the optimised paths' sample checks (fastpath.verify_sample, outermost calls; inclusive)
    for modname in ("mis_lightning.functional.affine", "mis_lightning.functional.table"):
        _timed(importlib.import_module(modname), "verify_sample", "checks", once, depth=checks)
    lf = importlib.import_module("mis_lightning.estimation.linear_factors")
    f0 = lf.factored_power_sums
    unit: collections.Counter = collections.Counter()
    by_param: collections.Counter = collections.Counter()
    outer = [0]

    def fps(fac: Any, g: Any, v: Any, cols: Any, power: int, *a: Any, **k: Any) -> Any:
        if outer[0] or not _is_unit_fourth(cols, power):  # (the check outside the timed region)
            return f0(fac, g, v, cols, power, *a, **k)
        outer[0] += 1
        c, f = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            return f0(fac, g, v, cols, power, *a, **k)
        finally:
            outer[0] -= 1
            dt = time.process_time() - c
            unit["cpu"] += dt
            unit["faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
            unit["calls"] += 1
            by_param[fac.bias if k.get("bias", a[0] if a else False) else fac.weight] += dt

    lf.factored_power_sums = fps  # (the influence readers bind it when a call creates them)
    batched0 = A._unit_fourth_batched

    def batched(reader: Any, *a: Any) -> Any:  # (assess.UNIT_FOURTH_BATCHED: every chunk's at once)
        outer[0] += 1
        c, f = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            got = batched0(reader, *a)
        finally:
            outer[0] -= 1
            dt = time.process_time() - c
        if got is not None:
            unit["cpu"] += dt
            unit["faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
            unit["calls"] += 1
            by_param[reader.name] += dt
        return got

    A._unit_fourth_batched = batched
    import gc

    gcs: dict[int, list[float]] = {}
    began = [0.0]

    def on_gc(phase: str, info: dict) -> None:  # the interpreter's collections inside a call (CPU ms)
        if phase == "start":
            began[0] = time.process_time()
        else:
            got = gcs.setdefault(info["generation"], [0, 0.0])
            got[0] += 1
            got[1] += time.process_time() - began[0]

    gc.callbacks.append(on_gc)
    rows = []
    for i in range(calls):
        once.clear()
        unit.clear()
        by_param.clear()
        gcs.clear()
        s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        t, f = _scored(A, est, model, schemes, sc_cfg)
        sys_ms = (resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0) * 1e3
        # (the registry's load holds no table build; torchao's import holds neither)
        fixed = once["builds"] + once["registry"] + once["torchao"]
        rows.append((t, f, unit["cpu"], unit["faults"], int(unit["calls"]), fixed, once["checks"]))
        print(f"call {i + 1}: {t * 1e3:.1f} ms ({f:,} minor faults): "
              + (f"torchao's import {once['torchao'] * 1e3:.1f} ms, " if inside else "")
              + f"the registry's load {once['registry'] * 1e3:.1f} ms, the unit column's fourth powers "
              f"{unit['cpu'] * 1e3:.1f} ms ({int(unit['calls'])} calls, {unit['faults']:,} faults), one-time builds "
              f"{once['builds'] * 1e3:.1f} ms, the rest {(t - unit['cpu'] - fixed) * 1e3:.1f} ms (of it the fast "
              f"paths' sample checks {once['checks'] * 1e3:.1f} ms)")
        print(f"  of it system (kernel) CPU {sys_ms:.0f} ms; the collector: "
              + (", ".join(f"generation {g} {n} ({1e3 * c:.1f} ms)" for g, (n, c) in sorted(gcs.items())) or "none"))
        if inside and i == 0:
            new = sorted(m for m in set(sys.modules) - modules0 if not m.startswith(("torchao", "torch.", "mslk")))
            print(f"  modules the call imported besides torchao's and torch's: {len(new)} ({', '.join(new)})")
        if by_param:
            print("  the unit column's fourth powers by parameter: "
                  + ", ".join(f"{n} {v * 1e3:.1f}" for n, v in sorted(by_param.items(), key=lambda kv: -kv[1])) + " ms")
    gc.callbacks.remove(on_gc)
    if len(rows) > 1:
        d = [a - b for a, b in zip(rows[0], rows[1])]
        print(f"call 1 - call 2: {d[0] * 1e3:.1f} ms ({d[1]:,} faults) = the unit column's fourth powers "
              f"{d[2] * 1e3:.1f} + torchao's import, the registry's load and the one-time builds {d[5] * 1e3:.1f} "
              f"+ the rest {(d[0] - d[2] - d[5]) * 1e3:.1f} ms (of it the sample checks {d[6] * 1e3:.1f} ms)")
    print(f"load {os.getloadavg()[0]:.1f}")


def _params(path: str, calls: int, small: int) -> None:
    A, est, model, schemes, sc_cfg = _setup(path, adam=False)
    qb = importlib.import_module("mis_lightning.quantization.base")
    owner: dict[int, tuple[str, str]] = {}
    prep0 = A._prepare_scheme

    def prepare(est_: Any, model_: Any, scheme: Any, *a: Any, **k: Any) -> Any:
        p = prep0(est_, model_, scheme, *a, **k)
        for n, g in p.grids.items():
            owner[id(g)] = (n, scheme.name)
        return p

    A._prepare_scheme = prepare
    marks: list[tuple[str, float]] = []
    init0 = A._InfluenceReader.__init__

    def init(self: Any, est_: Any, name: str) -> None:
        marks.append((name, time.process_time()))
        init0(self, est_, name)

    A._InfluenceReader.__init__ = init
    js0 = A._joint_sums

    def js(*a: Any, **k: Any) -> Any:
        r = js0(*a, **k)
        marks.append(("", time.process_time()))
        return r

    A._joint_sums = js
    part: collections.Counter = collections.Counter()
    depth = [0]
    seen: collections.Counter = collections.Counter()

    def timed(f0: Any, role: Any) -> Any:
        def w(g: Any, *a: Any, **k: Any) -> Any:
            caller = sys._getframe(1).f_code.co_name
            depth[0] += 1
            c = time.process_time()
            try:
                return f0(g, *a, **k)
            finally:
                depth[0] -= 1
                n, s = owner.get(id(g), ("?", "?"))
                if depth[0] == 0 and n != "?" and est.theta[n].numel() <= small:
                    part[(n, s, role(g, caller, *a, **k))] += time.process_time() - c
        return w

    def mom_role(g: Any, caller: str, th: Any, sg: Any, a: int = 0, *_: Any, **__: Any) -> str:
        if caller != "_joint_sums":
            return caller
        seen[(id(g), a)] += 1  # the joint pass's main call comes before its pool call
        return "main" if seen[(id(g), a)] % 2 else "pool"

    qb.ParamGrid.moments = timed(qb.ParamGrid.moments, mom_role)
    A._draw_parts = timed(A._draw_parts, lambda *a, **k: "draws")
    A.score_schemes(est, model, schemes, scoring_config=sc_cfg)  # warm-up
    per: collections.Counter = collections.Counter()
    part.clear()
    c0 = time.process_time()
    for _ in range(calls):
        marks.clear()
        seen.clear()
        A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        for (n, t), (_, t2) in zip(marks, marks[1:]):
            per[n] += t2 - t
    print(f"steady call {(time.process_time() - c0) / calls * 1e3:.1f} ms; load {os.getloadavg()[0]:.1f}")
    print("joint pass per parameter: " + ", ".join(f"{n} {v / calls * 1e3:.1f}" for n, v in per.items()) + " ms")
    for (n, s, r), v in sorted(part.items()):
        print(f"  {n:12s} {s:36s} {r:5s} {v / calls * 1e3:6.2f} ms")


def _est(path: str) -> None:
    from benchmarks.first_call import load_saved

    _adam_step()
    A = importlib.import_module("mis_lightning.assess")
    E = importlib.import_module("mis_lightning.estimation.estimate")
    L = importlib.import_module("mis_lightning.estimation.linear_factors")
    acc: collections.Counter = collections.Counter()
    MA, FP = E.MomentAccumulator, L.FactoredProgram
    for owner, attr, label in ((MA, "__init__", "set-up"), (MA, "_update", "updates"),
                               (FP, "batch", "forward-backward"), (E, "record_keys", "record keys"),
                               (FP, "batch_sums", "gradient sums"), (FP, "kron_sums", "K-FAC sums"),
                               (MA, "finalize", "finalize"), (MA, "_kfac_factors", "K-FAC inflation")):
        _timed(owner, attr, label, acc)
    _, model, loader, loss_fn, est_cfg, _ = load_saved(path)
    for i in range(3):
        acc.clear()
        u0 = resource.getrusage(resource.RUSAGE_SELF)
        c = time.process_time()
        A.run_estimation(model, loader, loss_fn, est_cfg)
        t = time.process_time() - c
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        rest = t - acc["updates"] - acc["finalize"] - acc["set-up"]
        print(f"estimation {i + 1}: {t * 1e3:.1f} ms; " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in acc.items())
              + f"; the loader's batches and the rest {rest * 1e3:.1f}; system CPU {(u1.ru_stime - u0.ru_stime) * 1e3:.1f} "
              f"ms, {u1.ru_minflt - u0.ru_minflt:,} minor faults (p58a)")
    print(f"load {os.getloadavg()[0]:.1f}")


_SEED = """
import sys, time, resource
import lightning_fabric.utilities.seed, torch
m = torch.nn.Linear(3, 3); o = torch.optim.Adam(m.parameters()); m(torch.randn(2, 3)).sum().backward(); o.step()
import mis_lightning.assess
import mis_lightning._rng as rng
if {off}:
    rng.SEED_ISOLATED_ONLY = False
out = []
for i in range(21):
    c, f = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with rng.isolated_rng(seed=i):
        pass
    out.append((time.process_time() - c, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f))
print(out[0][0], out[0][1], sum(t for t, _ in out[1:]) / 20)
"""


def _seed(rounds: int) -> None:
    """``seed`` (p58a): a seeded ``isolated_rng`` block (the estimation pass runs two) in fresh
    processes as scale.py's child, ``_rng.SEED_ISOLATED_ONLY`` on and off alternating: the first
    block's CPU ms and minor faults, and the mean of the next 20."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    for r in range(rounds):
        for off in ((False, True) if r % 2 == 0 else (True, False)):
            p = subprocess.run([sys.executable, "-c", _SEED.format(off=off)], env=env, capture_output=True, text=True,
                               check=True)
            first, faults, then = p.stdout.split()[-3:]
            print(f"SEED_ISOLATED_ONLY {not off!s:5s}: first block {float(first) * 1e3:.2f} ms CPU "
                  f"({int(faults):,} minor faults), then {float(then) * 1e3:.3f} ms each")
    print(f"load {os.getloadavg()[0]:.1f}")


_OVERLAP = """
import json, os, sys, threading, time
sys.path.insert(0, os.getcwd())
from benchmarks.fixed_costs import _adam_step
_adam_step()
from benchmarks.first_call import load_saved
from mis_lightning.assess import run_estimation
from mis_lightning.quantization.torchao_backend import _import_torchao_quantization
saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved({path!r})
failed = []
def imp():
    try:
        _import_torchao_quantization()
    except BaseException as exc:  # reported, not swallowed
        failed.append(repr(exc))
c0, t0 = time.process_time(), time.perf_counter()
wait = 0.0
if {mode!r} == "seq":
    imp()
    wait = time.perf_counter() - t0
th = threading.Thread(target=imp, daemon=True) if {mode!r} == "thread" else None
if th is not None:
    th.start()
te = time.perf_counter()
run_estimation(model, loader, loss_fn, est_cfg)
te = time.perf_counter() - te
if th is not None:
    tj = time.perf_counter()
    th.join()
    wait = time.perf_counter() - tj
print(json.dumps({{"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "est_wall": te, "wait": wait,
                  "torchao": "torchao.quantization" in sys.modules, "failed": failed}}))
"""


def _overlap(path: str, rounds: int) -> None:
    """``overlap`` (p59b): torchao's import before the estimation, in a thread beside it, or not
    at all, in fresh processes alternating (see the module docstring)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    modes = ("seq", "thread", "none")
    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            p = subprocess.run([sys.executable, "-c", _OVERLAP.format(path=path, mode=mode)], env=env,
                               capture_output=True, text=True, check=True)
            o = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"round {r + 1} {mode:6s}: whole {o['wall']:.3f} s wall, {o['cpu']:.3f} s CPU | estimation "
                  f"{o['est_wall']:.3f} s wall | import / join wait {o['wait']:.3f} s | torchao imported "
                  f"{o['torchao']}{' | FAILED ' + str(o['failed']) if o['failed'] else ''} | load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)


def _figure(path: str, rounds: int) -> None:
    """``figure`` (p59b): the report figure's plot and draw with and without its notes (see the
    module docstring)."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import mis_lightning.report as R
    from mis_lightning.tracking import draw_figure

    rep = R.Report.from_json(path)
    chars = sum(len(w) for w in rep.warnings)
    print(f"matplotlib {matplotlib.__version__}; {len(rep.warnings)} warnings, {chars:,} characters")
    own = R.figure_notes
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for notes in ((True, False) if r % 2 == 0 else (False, True)):
                R.figure_notes = own if notes else (lambda *a, **k: None)
                try:
                    c0 = time.process_time()
                    fig = rep.plot()
                    c1 = time.process_time()
                    draw_figure(fig, Path(tmp) / "figure.png")
                    c2 = time.process_time()
                    plt.close(fig)
                finally:
                    R.figure_notes = own
                print(f"round {r + 1} {'with the notes   ' if notes else 'without the notes'}: plot {c1 - c0:.3f} s, "
                      f"draw {c2 - c1:.3f} s CPU | load {os.getloadavg()[0]:.1f}", flush=True)


def _cycles(path: str, rounds: int) -> None:
    """``cycles``: estimations with ``LOSS_RANKS_WEAK`` on and off, and what a ``gc.collect(1)``
    after each frees (see the module docstring)."""
    import gc

    _adam_step()
    A = importlib.import_module("mis_lightning.assess")
    E = importlib.import_module("mis_lightning.estimation.estimate")
    from benchmarks.first_call import load_saved

    _, model, loader, loss_fn, est_cfg, _ = load_saved(path)

    def rss() -> float:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024

    A.run_estimation(model, loader, loss_fn, est_cfg)  # (warm-up; its result freed)
    gc.collect()
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            E.LOSS_RANKS_WEAK = on
            gc.collect()
            r0, c = rss(), time.process_time()
            est = A.run_estimation(model, loader, loss_fn, est_cfg)
            t, r1 = time.process_time() - c, rss()
            c = time.process_time()
            n = gc.collect(1)
            tc, r2 = time.process_time() - c, rss()
            print(f"LOSS_RANKS_WEAK {'on ' if on else 'off'}: estimation {t * 1e3:.0f} ms, RSS {r0:.0f} -> {r1:.0f} MiB "
                  f"when it returns; then gc.collect(1) {tc * 1e3:.1f} ms, {n} objects unreachable, "
                  f"{r1 - r2:.0f} MiB freed", flush=True)
            del est
    print(f"load {os.getloadavg()[0]:.1f}")


def _adam_step() -> None:
    """What scale.py's child has done before the estimation: lightning_fabric imported, an Adam
    step taken (its constructor imports torch._dynamo and sympy)."""
    import lightning_fabric.utilities.seed  # noqa: F401
    import torch

    m = torch.nn.Linear(3, 3)
    o = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 3)).sum().backward()
    o.step()


def _heap(path: str) -> None:
    import ctypes

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2

    def heap() -> tuple[float, float, int]:
        m = libc.mallinfo2()
        return m.arena / 2**20, m.uordblks / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

    _adam_step()
    _import_torchao_quantization()
    A = importlib.import_module("mis_lightning.assess")
    qb = importlib.import_module("mis_lightning.quantization.base")
    _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    peak: list[Any] = [0.0, ""]

    def watch(owner: Any, attr: str) -> None:
        f0 = getattr(owner, attr)

        def w(*a: Any, **k: Any) -> Any:
            r = f0(*a, **k)
            used = heap()[1]
            if used > peak[0]:
                peak[0], peak[1] = used, attr
            return r
        setattr(owner, attr, w)

    for attr in ("_sampled_draw_parts", "_draw_parts", "_distinct_list_sums", "_joint_draw_sums"):
        watch(A, attr)
    watch(qb.ParamGrid, "moments")
    rows = [("start", *heap())]
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    rows.append(("estimation", *heap()))
    for i in range(2):
        peak[0] = 0.0
        A.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
        rows.append((f"scoring call {i + 1} (in use at most {peak[0]:.0f} MiB, after {peak[1]})", *heap()))
    for (label, arena, used, flt), (*_, flt0) in zip(rows, [rows[0]] + rows):
        print(f"{label}: arena {arena:.0f} MiB, in use {used:.0f} MiB; minor faults +{flt - flt0:,}")
    print(f"load {os.getloadavg()[0]:.1f}")


def _tol(path: str, tol: float, calls: int) -> None:
    import math

    import torch

    sys.path.insert(0, str(ROOT))
    from tests._wide_reference import exact_deficits, partition_edges

    A, est, model, schemes, sc_cfg = _setup(path, adam=False)
    W = importlib.import_module("mis_lightning.functional.wide")
    from mis_lightning.quantization import get_scheme

    base = W.WIDE_TOL

    def set_tol(t: float) -> None:
        W.WIDE_TOL = t

    def call(t: float) -> tuple[float, Any]:
        set_tol(t)
        c = time.process_time()
        rep = A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        return time.process_time() - c, rep

    call(base)
    call(tol)
    times: dict[float, list[float]] = {base: [], tol: []}
    reps: dict[float, Any] = {}
    for r in range(calls):
        for t in ((base, tol) if r % 2 == 0 else (tol, base)):
            s, reps[t] = call(t)
            times[t].append(s)
    set_tol(base)
    for t, v in times.items():
        print(f"WIDE_TOL {t:g}: steady call median {sorted(v)[len(v) // 2]:.3f} s ({' '.join(f'{x:.3f}' for x in v)})")
    for n, a in reps[base].schemes.items():
        b = reps[tol].schemes[n]
        if a.error:
            continue
        ends = max(abs(x - y) for x, y in zip(a.interval or (0.0, 0.0), b.interval or (0.0, 0.0)))
        print(f"  {n}: leakage {a.leakage:.12f} -> {b.leakage - a.leakage:+.1e}; interval ends {ends:.1e}")
    F64 = torch.float64
    tight, loose = min(base, tol), max(base, tol)
    names = [n for n in est.names if n.endswith("weight")]
    for scheme in dict.fromkeys(s for s in schemes):
        try:
            prep = get_scheme(scheme).apply(model)
        except Exception:  # noqa: BLE001 - unavailable here (tinygemm on CPU)
            continue
        for name in names:
            g = prep.grids.get(name)
            if g is None or g.support is None:
                continue
            th = est.theta[name].reshape(-1).to(F64)
            c = th.numel()
            scale, zp, _, _, bounds = g._chunk_grid(0, c)
            lo, hi = bounds[0].to(F64), bounds[1].to(F64)
            if g.kind == "affine":
                le, he, step = g._outer_edges(scale, zp)
                cube = W.affine_cube_sum(lo, hi, le, he, step)
            else:
                cube = W.table_cube_sum(lo, hi, scale.to(F64), g.values)
            for label, sg in (("theta-hat", est.sigma[name].reshape(-1).to(F64)),
                              ("pool", est.sigma[name].reshape(-1).to(F64) / math.sqrt(2.0))):
                _, _, bound = W.wide_sd_error_bound(sg, lo, hi, th, cube)
                new = (hi - lo <= W.WIDE_MAX_WINDOW * sg) & (th > lo) & (th < hi) & (bound > tight) & (bound <= loose)
                if not bool(new.any()):
                    continue
                set_tol(tight)
                paths = g.moments(th, sg, 0, c)
                set_tol(loose)
                closed = g.moments(th, sg, 0, c)
                set_tol(base)
                idx = torch.nonzero(new).squeeze(-1)
                pick = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(0))[:40]].tolist()
                err = {k: 0.0 for k in ("kp", "kc", "mp", "mc")}
                for i in pick:
                    dk, _, d4 = exact_deficits(float(th[i]), float(sg[i]), partition_edges(
                        g, i, float(lo[i]), float(hi[i]), float(scale[i]), float(zp[i])))
                    err["kp"] = max(err["kp"], abs(1.0 - float(paths.kappa[i]) - dk))
                    err["kc"] = max(err["kc"], abs(1.0 - float(closed.kappa[i]) - dk))
                    err["mp"] = max(err["mp"], abs(3.0 - float(paths.m4[i]) - d4))
                    err["mc"] = max(err["mc"], abs(3.0 - float(closed.m4[i]) - d4))
                print(f"  {scheme:28s} {name:9s} {label:9s}: {idx.numel():6d} of {c} closed at {loose:g} only; |kappa - exact| "
                      f"paths {err['kp']:.1e}, closed {err['kc']:.1e}; |m4 - exact| paths {err['mp']:.1e}, "
                      f"closed {err['mc']:.1e}")
    print(f"load {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("import", "aoparts", "aoneeds", "seed", "overlap", "figure", "first", "params", "est", "heap", "tol", "once", "faults",
                                     "ops", "split", "scaling", "faultsby", "window", "gate", "cycles", "_faults_child"))
    ap.add_argument("path", nargs="?", help="a model saved by first_call.py train (first, params); figure: a report JSON")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per case (import); pairs (cycles)")
    ap.add_argument("--calls", type=int, default=6, help="steady calls (params, tol); scoring calls (once, split, faultsby)")
    ap.add_argument("--small", type=int, default=4096, help="the small parameters' most weights (params)")
    ap.add_argument("--tol", type=float, default=1e-11, help="the other closed-form gate (tol)")
    ap.add_argument("--prefault", action="store_true", help=argparse.SUPPRESS)  # (faults' child)
    ap.add_argument("--apart", action="store_true", help="window: torchao imported before the window, timed apart")
    ap.add_argument("--inside", action="store_true",
                    help="split: torchao imported by the first call (as in scale.py), timed there")
    ap.add_argument("--trainer", action="store_true", help="aoparts: a lightning.pytorch Trainer built first")
    ap.add_argument("--gate", action="append", default=[], metavar="TOL,WINDOW",
                    help="gate: a wide-sd gate to alternate with the checkout's own (repeatable)")
    ap.add_argument("--off", action="append", default=None, metavar="MODULE.FLAG",
                    help="set the switch mis_lightning.MODULE.FLAG False before the calls (repeatable)")
    args = ap.parse_args(argv)
    if args.what == "import":
        _imports(args.rounds)
        return
    if args.what == "aoparts":
        _aoparts(args.rounds, args.trainer)
        return
    if args.what == "seed":
        _seed(args.rounds)
        return
    if args.what == "aoneeds":
        _aoneeds(args.path)
        return
    if args.what == "figure":
        if not args.path:
            ap.error("figure needs a report JSON's path")
        _figure(args.path, args.rounds)
        return
    if args.what == "overlap":
        if not args.path:
            ap.error("overlap needs the saved model's path")
        _overlap(args.path, args.rounds)
        return
    if not args.path:
        ap.error(f"{args.what} needs the saved model's path")
    import torch

    torch.set_num_threads(1)
    from benchmarks.first_call import switch_off

    switch_off(args.off)
    run = {"first": _first, "params": lambda p: _params(p, args.calls, args.small), "est": _est, "heap": _heap,
           "tol": lambda p: _tol(p, args.tol, args.calls), "once": lambda p: _once(p, args.calls),
           "faults": lambda p: _faults(p, args.rounds), "ops": _ops, "_faults_child": lambda p: _faults_child(p, args.prefault),
           "split": lambda p: _split(p, args.calls, args.inside), "faultsby": lambda p: _faults_by(p, args.calls),
           "window": lambda p: _window(p, args.apart), "scaling": lambda p: _scaling(p, args.calls),
           "gate": lambda p: _gate(p, args.gate, args.calls), "cycles": lambda p: _cycles(p, args.rounds)}
    run[args.what](args.path)


if __name__ == "__main__":
    main()
