"""Scale of ``assess`` against the cost of training (issue 13): MLPs of 1e5 to 1e8 weights.

Per model size, in a fresh subprocess (so that its peak RSS is its own):

* one Adam epoch over the same records and batches (n = 4096, batch 256; best of epochs 2-K of
  ``--epochs K`` epochs, default 3: the first warms up), the unit every other figure is given in;
* the estimation pass (``run_estimation`` with the default options) and the scoring of the
  schemes (``score_schemes`` with the default options: 16 bootstrap draws, auto method),
  in seconds and in Adam epochs, measured in the SAME process, back to back;
* the peak RSS of the process (``ru_maxrss``, MiB) and bytes per weight;
* the same times as process CPU time (``*_cpu_*``; on a shared machine wall times move 2-5x
  with the load, CPU times far less), and the minor page faults of the estimation and of the
  scoring (``*_minflt``: fresh pages mapped and zeroed by the kernel; pf40).

``--epochs K`` runs K Adam epochs in the same process before the estimation (``epochs_cpu_s``
lists each one's CPU time; the unit is the least of epochs 2-K, their median is
``epoch_adam_cpu_median_s``): more epochs make the unit steadier on a loaded machine.
``--off MODULE.FLAG`` (repeatable) sets a boolean switch ``mis_lightning.MODULE.FLAG`` False in
the child before anything runs (an A/B in one checkout, fresh processes):

    python benchmarks/scale.py --sizes 1e5 --off _heap.RAISE_MMAP_THRESHOLD

    python benchmarks/scale.py --sizes 1e5 1e6 1e7                # 8 common schemes
    python benchmarks/scale.py --sizes 1e7 3e7 --memory-only --schemes int8_weight_only \\
        int8_dynamic_activation_int8_weight intx_weight_only_int4 int4_weight_only_tinygemm
    python benchmarks/scale.py --json out.json

``--stages`` records the process's peak RSS per stage (``VmHWM`` of /proc/self/status, reset
between stages by writing 5 to /proc/self/clear_refs; where that is not allowed a sampling
thread keeps the running maximum of ``VmRSS``): model build + warm-up epoch, ``run_estimation``,
each scheme's ``_prepare_scheme`` (quantized copy and grids), the compile warm-up, the joint
sums (``_joint_sums``), each scheme's ``_finish_scheme`` (method, pool, interval), and
"other" for what lies between them:

    python benchmarks/scale.py --sizes 1e6 1e7 --memory-only --stages --schemes int8_weight_only \
        int8_dynamic_activation_int8_weight intx_weight_only_int4 intx_weight_only_int4_g32

``--preimport-torchao`` imports torchao before the epochs (its CPU time reported apart as
``torchao_import_cpu_s``), so that the scoring's first call no longer includes it: the split of
the first call's fixed costs between torchao's import (~0.4 s CPU, paid once by any process that
quantizes with torchao) and the library's own (docs/benchmarks.md, fc26). Off by default: the
headline first call includes the import.

``--calls K`` scores the schemes K times in the same process (the first call pays the
one-time costs: imports, compiles, kernel caches; later calls are the steady state), CPU time of
each in ``later_calls_cpu_s``. ``--profile PREFIX`` runs each scoring call under cProfile (timer:
process CPU time; the profiler adds its own overhead, so time a run without it) and writes
``PREFIX_SIZE_callI.prof`` and a text summary ``.prof.txt`` (70 rows by cumulative, 40 by own
time). ``--report PREFIX`` writes the last call's report to ``PREFIX_SIZE.json`` (``to_json()``),
for a field-by-field comparison of two checkouts with ``benchmarks/compare_reports.py``:

    python benchmarks/scale.py --sizes 1e6 --calls 2 --profile prof --report rep   # prof_1e6_call{1,2}.prof*

``--root PATH`` measures the ``mis_lightning`` of another checkout (e.g. ``git worktree add
../old COMMIT``) with this file's models, data and options: "before / after" figures of two
checkouts in fresh, interleaved processes (docs/benchmarks.md, "Before / after").

The line names the ``mis_lightning`` modules the timed calls compiled from source (no cached
bytecode: a checkout only ever imported under ``PYTHONDONTWRITEBYTECODE=1``; the first call's eight
quantization modules ~25 ms CPU at 1e5, p48c), which an installed package does not pay; ``python
-m compileall -q mis_lightning`` in the measured checkout writes it.

``--plain`` imports nothing of Lightning before the timed region (by default lightning_fabric is
imported first, as a Lightning user's process has it): the first call of a plain-PyTorch caller of
``assess`` (pf29). The result's ``lightning_loaded`` says whether the library loaded it itself.

Every run prints the compile stage as the library's progress hook reports it (``[progress]``
lines on stderr, when the compile policy compiles in this call) and, when compiled kernels ran,
the largest ``|compiled - eager|`` the first-use and periodic self-checks
(``mis_lightning/functional/fastpath.py``) saw on this run's own chunks, per path and thread
count (``compiled_vs_eager`` in the JSON; issue 13 asks for <= 1e-6 at 1 and 2 threads):

    MIS_LIGHTNING_COMPILE=always python benchmarks/scale.py --sizes 1e6 --threads 1 --memory-only
    MIS_LIGHTNING_COMPILE=always python benchmarks/scale.py --sizes 1e6 --threads 2 --memory-only

``--memory-only`` skips the Adam epochs (the 1e8 model's epoch alone takes minutes on one
core) and reports times in seconds only. ``--threads`` sets ``torch.set_num_threads`` in the
child; the OpenMP wait policy is whatever the environment says (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.assess_speed import ARCH, mlp  # noqa: E402

COMMON_SCHEMES = [
    "int8_weight_only", "int8_dynamic_activation_int8_weight", "intx_weight_only_int4",
    "int4_weight_only_tinygemm", "intx_weight_only_int4_g32", "float8_weight_only", "bf16", "fp16",
]


class StageMemory:
    """Peak RSS per stage: ``mark(stage)`` closes the stage that began at the previous mark.

    ``VmHWM`` (the kernel's RSS high-water mark) is reset at each mark through
    /proc/self/clear_refs; where that write is refused, a thread samples ``VmRSS`` every 20 ms
    and keeps its maximum since the last mark (it can miss a spike shorter than that).
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.reset_ok = self._reset()
        self._max = 0
        self._stop = threading.Event()
        if not self.reset_ok:
            threading.Thread(target=self._sample, daemon=True).start()
        self._start = self._kib("VmRSS")
        self._t0 = time.perf_counter()

    @staticmethod
    def _kib(field: str) -> int:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else 0

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._kib("VmRSS"))
            time.sleep(0.02)

    def mark(self, stage: str) -> None:
        rss = self._kib("VmRSS")
        peak = self._kib("VmHWM") if self.reset_ok else max(self._max, rss)
        now = time.perf_counter()
        self.rows.append({"stage": stage, "peak_mib": peak / 1024, "start_mib": self._start / 1024,
                          "end_mib": rss / 1024, "seconds": now - self._t0})
        print(f"  [stage] {stage}: peak {peak / 1024:.0f} MiB (start {self._start / 1024:.0f}, "
              f"end {rss / 1024:.0f}) {now - self._t0:.1f} s", file=sys.stderr, flush=True)
        if self.reset_ok:
            self._reset()
        self._max = rss
        self._start = rss
        self._t0 = time.perf_counter()


def _instrument(mem: StageMemory) -> None:
    """Wrap the scoring's stages (module globals of ``mis_lightning.assess``) with marks."""
    import importlib

    assess = importlib.import_module("mis_lightning.assess")  # the module (the package exports the function)
    F = importlib.import_module("mis_lightning.functional")

    def wrap(owner, attr: str, label) -> None:
        fn = getattr(owner, attr)

        def inner(*a, **k):
            mem.mark("other")
            out = fn(*a, **k)
            mem.mark(label(a, k, out))
            return out

        setattr(owner, attr, inner)

    wrap(assess, "_prepare_scheme", lambda a, k, out: f"prepare {a[2].name}")
    wrap(assess, "_joint_sums", lambda a, k, out: "joint sums")
    wrap(assess, "_finish_scheme", lambda a, k, out: f"finish {a[1].scheme.name}")
    wrap(F, "warm_up_compiled_kernel", lambda a, k, out: "compile warm-up")


def run_one(size: str, n: int, batch: int, schemes: list[str], threads: int, memory_only: bool,
            stages: bool = False, preimport_torchao: bool = False, calls: int = 1,
            profile: str | None = None, report: str | None = None, plain: bool = False,
            num_epochs: int = 3, off: list[str] | None = None) -> dict:
    import cProfile
    import io
    import pstats

    import torch

    from benchmarks.first_call import switch_off

    switch_off(off)

    mem = StageMemory() if stages else None
    if mem is not None:
        _instrument(mem)

    # One-time imports are not the estimation pass: the library's RNG isolation imports
    # lightning_fabric (with torchmetrics) at its first use, ~1 s of a first call in a process
    # that has not imported Lightning (a callback user's has). ``plain``: the process of a caller
    # of ``assess`` that imports nothing of Lightning, whose first call pays whatever the library
    # itself imports (pf29).
    if not plain:
        import lightning_fabric.utilities.seed  # noqa: F401

    torchao_cpu = None
    if preimport_torchao:  # the library's own import of it (the same logging filters)
        from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

        c0 = time.process_time()
        _import_torchao_quantization()
        torchao_cpu = time.process_time() - c0

    import mis_lightning
    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.config import stage_configs
    from mis_lightning.functional.fastpath import GUARD
    from mis_lightning.progress import STAGE_LABELS

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, F = mlp(size)
    d = sum(p.numel() for p in model.parameters())
    x = torch.randn(n, F)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)

    def loss_fn(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs, epochs_cpu = [], []
    for _ in range(1 if memory_only else max(1, num_epochs)):
        c0 = time.process_time()
        t0 = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
        epochs.append(time.perf_counter() - t0)
        epochs_cpu.append(time.process_time() - c0)
    # a trained model handed to assess: no optimizer state, no .grad (4 bytes per weight)
    opt.zero_grad(set_to_none=True)
    del opt
    epoch = min(epochs[1:]) if len(epochs) > 1 else epochs[0]
    epoch_cpu = min(epochs_cpu[1:]) if len(epochs_cpu) > 1 else epochs_cpu[0]
    timed_cpu = sorted(epochs_cpu[1:] or epochs_cpu)
    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    if mem is not None:
        mem.mark("build + warm-up epoch")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    modules0, started = set(sys.modules), time.time()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0 = time.process_time()
    t0 = time.perf_counter()
    est = run_estimation(model, loader, loss_fn, est_cfg)
    est_s = time.perf_counter() - t0
    est_cpu = time.process_time() - c0
    est_flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    if mem is not None:
        mem.mark("run_estimation")
    rss_est = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    times = []  # (wall, CPU) per call
    flts = []  # minor page faults per call
    compile_seen: list[tuple[int, float]] = []

    def compile_progress(stage: str, completed: int) -> None:
        # the library's progress hook: the up-front compile is a stage of its own (shown here as
        # ProgressDisplay would show it), the rest is left quiet
        if stage == "compile":
            compile_seen.append((completed, time.perf_counter()))
            print(f"  [progress] {STAGE_LABELS['compile']}: {'started' if completed == 0 else 'done'}"
                  + (f" ({compile_seen[-1][1] - compile_seen[-2][1]:.1f} s)" if completed else ""),
                  file=sys.stderr, flush=True)

    for call in range(1, calls + 1):
        prof = cProfile.Profile(time.process_time) if profile else None
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0 = time.process_time()
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        rep = score_schemes(est, model, schemes, scoring_config=sc_cfg, progress=compile_progress)
        if prof is not None:
            prof.disable()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
        flts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        if call == 1:
            uncached = _uncached_modules(set(sys.modules) - modules0, started)
        if prof is not None:
            out = f"{profile}_{size}_call{call}"
            prof.dump_stats(out + ".prof")
            txt = io.StringIO()
            txt.write(f"size {size} scoring call {call}: {times[-1][1]:.2f} s CPU (profiled)\n")
            pstats.Stats(prof, stream=txt).sort_stats("cumulative").print_stats(70)
            pstats.Stats(prof, stream=txt).sort_stats("tottime").print_stats(40)
            Path(out + ".prof.txt").write_text(txt.getvalue())
    score_s, score_cpu = times[0]
    if report:
        Path(f"{report}_{size}.json").write_text(rep.to_json())
    if mem is not None:
        mem.mark("other")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB (Linux: KiB)
    if mem is not None:  # clear_refs also resets ru_maxrss: the run's peak is the stages' largest
        peak = max(peak, *(st["peak_mib"] for st in mem.rows))
    return {
        "size": size, "mis_lightning": str(Path(mis_lightning.__file__).parent), "params": d, "n": n, "batch": batch, "threads": threads, "schemes": schemes,
        "epoch_adam_s": epoch, "estimation_s": est_s, "scoring_s": score_s,
        "estimation_epochs": est_s / epoch, "scoring_epochs": score_s / epoch,
        "total_epochs": (est_s + score_s) / epoch,
        # the same in process CPU time (a shared machine's load moves wall times 2-5x)
        "epoch_adam_cpu_s": epoch_cpu, "estimation_cpu_s": est_cpu, "scoring_cpu_s": score_cpu,
        "estimation_cpu_epochs": est_cpu / epoch_cpu, "scoring_cpu_epochs": score_cpu / epoch_cpu,
        "total_cpu_epochs": (est_cpu + score_cpu) / epoch_cpu,
        "epochs_cpu_s": epochs_cpu, "epoch_adam_cpu_median_s": timed_cpu[len(timed_cpu) // 2],
        "estimation_minflt": est_flt, "scoring_minflt": flts[0], "later_calls_minflt": flts[1:],
        "plain": plain, "off": off or [], "lightning_loaded": "lightning_fabric" in sys.modules,
        "torchao_import_cpu_s": torchao_cpu, "later_calls_cpu_s": [c for _, c in times[1:]],
        "uncached_modules": uncached,
        "peak_rss_mib": peak, "rss_before_estimation_mib": rss0, "rss_after_estimation_mib": rss_est,
        "bytes_per_weight": peak * 2**20 / d, "estimator": est.estimator,
        "influence_stored": est.influence_stored, "factored": est.factors is not None,
        "load_avg": os.getloadavg(),
        "stages": None if mem is None else mem.rows,
        # the self-check's samples of each compiled path against its eager arithmetic, on this
        # run's own chunks: {path: {threads: [largest |compiled - eager|, elements compared]}}
        "compiled_vs_eager": {p: {str(t): v for (q, t), v in getattr(GUARD, "observed", {}).items() if q == p}
                              for p in {q for q, _ in getattr(GUARD, "observed", {})}},
        "compile_stage_s": (compile_seen[1][1] - compile_seen[0][1]) if len(compile_seen) >= 2 else None,
        "paths_disabled": dict(GUARD.disabled),
        "results": {k: {"leakage": v.leakage, "interval": v.interval, "method": v.method, "error": v.error}
                    for k, v in rep.schemes.items()},
    }


def _uncached_modules(names: set[str], started: float) -> list[str]:
    """The ``mis_lightning`` modules among ``names`` (first imported in the timed region: the
    estimation and the first scoring call, from ``started``, ``time.time()``) without cached
    bytecode next to their source from before then: Python compiled them from source inside the
    timed calls (a checkout never imported without
    ``PYTHONDONTWRITEBYTECODE``; ~25 ms CPU for the first call's eight at 1e5, p48c), which an
    installed package does not pay. ``python -m compileall -q mis_lightning`` writes it."""
    import importlib.util

    out = []
    for n in sorted(names):
        f = getattr(sys.modules.get(n), "__file__", None)
        if n.split(".")[0] == "mis_lightning" and f and f.endswith(".py"):
            pyc = importlib.util.cache_from_source(f)
            if not os.path.exists(pyc) or not os.path.getmtime(f) <= os.path.getmtime(pyc) < started:
                out.append(n)
    return out


def use_root(root: Path | None) -> None:
    """Put ``root``'s ``mis_lightning`` first on ``sys.path`` (the child of ``--root``), ahead of
    this checkout (inserted at import), of PYTHONPATH and of the working directory that
    ``benchmarks.first_call`` puts first when it is imported: it is imported here, before, so that
    its insertion cannot come after this one (sm42: from e45338b to sm42 run_one imported it after
    the root was inserted, and every ``--root`` child measured the working directory's checkout;
    the JSON's ``mis_lightning`` field shows which one ran)."""
    import benchmarks.first_call  # noqa: F401 - its sys.path insertion first

    if root is not None:
        sys.path.insert(0, str(root))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1e5", "1e6", "1e7"], choices=list(ARCH))
    ap.add_argument("--n", type=int, default=4096, help="training records")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schemes", nargs="+", default=COMMON_SCHEMES)
    ap.add_argument("--memory-only", action="store_true", help="one warm-up epoch only (large sizes)")
    ap.add_argument("--epochs", type=int, default=3, metavar="K",
                    help="Adam epochs before the estimation; the unit: the least of epochs 2-K (see above)")
    ap.add_argument("--off", action="append", default=None, metavar="MODULE.FLAG",
                    help="set the switch mis_lightning.MODULE.FLAG False in the child (repeatable)")
    ap.add_argument("--stages", action="store_true", help="peak RSS per stage (see above)")
    ap.add_argument("--preimport-torchao", action="store_true",
                    help="import torchao before the epochs (its CPU time apart; see above)")
    ap.add_argument("--calls", type=int, default=1, help="scoring calls in one process (see above)")
    ap.add_argument("--profile", default=None, metavar="PREFIX", help="cProfile each scoring call (see above)")
    ap.add_argument("--report", default=None, metavar="PREFIX", help="write the report JSON (see above)")
    ap.add_argument("--plain", action="store_true", help="import nothing of Lightning first (see above)")
    ap.add_argument("--root", type=Path, default=None,
                    help="the checkout whose mis_lightning is measured (default: this file's)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        use_root(args.root)
        r = run_one(args.one, args.n, args.batch, args.schemes, args.threads, args.memory_only, args.stages,
                    args.preimport_torchao, args.calls, args.profile, args.report, args.plain, args.epochs,
                    args.off)
        print(json.dumps(r))
        return 0
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", size, "--n", str(args.n), "--batch", str(args.batch),
               "--threads", str(args.threads), "--schemes", *args.schemes]
        if args.memory_only:
            cmd.append("--memory-only")
        if args.stages:
            cmd.append("--stages")
        if args.preimport_torchao:
            cmd.append("--preimport-torchao")
        cmd += ["--calls", str(args.calls), "--epochs", str(args.epochs)]
        for flag in args.off or []:
            cmd += ["--off", flag]
        if args.plain:
            cmd.append("--plain")
        if args.root is not None:
            cmd += ["--root", str(args.root.resolve())]
        for flag, value in (("--profile", args.profile), ("--report", args.report)):
            if value:  # absolute: the child writes where the caller asked
                cmd += [flag, str(Path(value).resolve())]
        t0 = time.perf_counter()
        # the child's stage lines (stderr) go straight through: a long run shows where it is
        p = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=None if args.stages else subprocess.PIPE,
                           text=True)
        if p.returncode != 0:
            print(f"{size}: failed ({p.returncode})\n{(p.stderr or '')[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        for line in (p.stderr or "").splitlines():  # the child's progress lines (with --stages: shown live)
            if line.startswith("  [progress]"):
                print(line, flush=True)
        r["wall_s"] = time.perf_counter() - t0
        rows.append(r)
        print(f"{size} ({r['mis_lightning']}): d={r['params']:,} epoch {r['epoch_adam_s']:.3f}s | estimation {r['estimation_s']:.1f}s "
              f"= {r['estimation_epochs']:.1f} ep | scoring {len(r['schemes'])} schemes {r['scoring_s']:.1f}s "
              f"= {r['scoring_epochs']:.1f} ep | total {r['total_epochs']:.1f} ep | peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB ({r['bytes_per_weight']:.0f} B/weight) | load {r['load_avg'][0]:.1f}",
              flush=True)
        print(f"    CPU time: epoch {r['epoch_adam_cpu_s']:.3f}s | estimation {r['estimation_cpu_epochs']:.1f} ep | "
              f"scoring {r['scoring_cpu_s']:.1f}s = {r['scoring_cpu_epochs']:.1f} ep | total {r['total_cpu_epochs']:.1f} ep"
              f" ({r['estimation_cpu_s'] + r['scoring_cpu_s']:.2f}s; epoch median "
              f"{r['epoch_adam_cpu_median_s']:.3f}s) | minor faults: estimation {r['estimation_minflt']:,}, "
              f"scoring {r['scoring_minflt']:,}"
              + ("" if r["torchao_import_cpu_s"] is None else
                 f" | torchao import (before, apart) {r['torchao_import_cpu_s']:.2f}s")
              + "".join(f" | call {i} {c:.2f}s" for i, c in enumerate(r["later_calls_cpu_s"], 2)), flush=True)
        if r.get("uncached_modules"):
            print(f"    compiled from source in the timed calls (no cached bytecode; `python -m compileall -q "
                  f"mis_lightning` in {Path(r['mis_lightning']).parent} writes it): "
                  f"{len(r['uncached_modules'])} modules", flush=True)
        cve = r.get("compiled_vs_eager") or {}
        if cve or r.get("compile_stage_s") is not None:
            worst = max((v[0] for per in cve.values() for v in per.values()), default=float("nan"))
            print("    compiled vs eager (the self-check's samples of this run): "
                  + "; ".join(f"{p}: " + ", ".join(f"{t} thread(s) max {v[0]:.1e} over {v[1]:,} elements"
                                                   for t, v in sorted(per.items())) for p, per in sorted(cve.items()))
                  + f" | largest {worst:.1e} ({'<= 1e-6' if worst <= 1e-6 else 'ABOVE 1e-6'})"
                  + ("" if r.get("compile_stage_s") is None else f" | compile stage {r['compile_stage_s']:.1f} s")
                  + (f" | disabled: {r['paths_disabled']}" if r.get("paths_disabled") else ""), flush=True)
        for st in r.get("stages") or []:
            print(f"    {st['stage']:<45} peak {st['peak_mib']:8.0f} MiB = {st['peak_mib'] * 2**20 / r['params']:7.1f} "
                  f"B/weight (rise {st['peak_mib'] - st['start_mib']:7.0f} MiB), held after {st['end_mib']:8.0f} MiB, "
                  f"{st['seconds']:.1f} s")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
