"""Throughput and peak memory of the cell-statistics kernels and of the Gaussian-form leakage.

Cases (each run in a fresh subprocess so that its peak resident memory can be read from
``getrusage``; torch's allocations are invisible to tracemalloc):

* ``cell_statistics`` and ``cell_moments`` on K = 8 cells per weight (9 edges, outer ones
  infinite), in chunks;
* ``affine_cell_moments`` on int8 grids in five regimes: very coarse (step 100 sd: 83%
  frozen), coarse (step 20 sd: 15% frozen, windows of 2 edges), K~8 (step 2 sd: window
  sums), fine (step 0.2 sd: fine-grid expansion) and a mix (20 / 2 / 0.2 sd, a third each);
* ``moments_from_alpha_fast`` eager against ``torch.compile`` in float64 and float32
  (compile time reported separately);
* the Gaussian-form leakage for R records streamed over coordinate chunks
  (``CltSums.add_``), alone and end to end with ``affine_cell_moments`` (mix regime).

Inputs are generated chunk by chunk outside the timed region. Peak memory is the growth of
the process's maximum resident set size over the run (inputs of one chunk included).
Each case runs with 1 thread and with ``--threads`` (default 2) threads; the table gives
the throughput per CPU-second with 1 thread (insensitive to other jobs on the machine) and
the wall-clock throughput with both thread counts. The measured processes run with
``OMP_WAIT_POLICY=PASSIVE`` (``--omp-active`` to disable): on a machine shared with other
jobs, OpenMP threads spinning at barriers made ``affine_cell_moments`` with 2 threads 16-25x
slower than with 1; with passive waiting 2 threads cost no more than 1.

    python benchmarks/cell_statistics_speed.py                 # d = 1e6 and 1e7
    python benchmarks/cell_statistics_speed.py --large         # also d = 1e8
    python benchmarks/cell_statistics_speed.py --sizes 1e6 --no-compile   # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

CHUNK = 1 << 18  # coordinates per chunk


class _Timer:
    """Accumulates wall-clock and process CPU seconds (all threads) over timed blocks."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _inputs(c: int, step_sd, gen, torch):
    """One chunk of weights on an int8 grid: theta, sigma, scale, zero point."""
    F64 = torch.float64
    scale = torch.full((c,), 0.01, dtype=F64)
    theta = torch.randn(c, dtype=F64, generator=gen) * 0.3
    if step_sd == "mix":
        h = torch.tensor([20.0, 2.0, 0.2], dtype=F64)[torch.randint(0, 3, (c,), generator=gen)]
    else:
        h = torch.full((c,), float(step_sd), dtype=F64)
    sigma = scale / h
    return theta, sigma, scale, torch.zeros(c, dtype=F64)


def _k8_boundaries(theta, scale, torch):
    """9 edges (8 cells): 7 round-to-nearest edges around theta's code, plus -inf and +inf."""
    q0 = torch.round(theta / scale)
    k = torch.arange(-3, 4, dtype=torch.float64) + 0.5
    edges = (q0.unsqueeze(-1) + k) * scale.unsqueeze(-1)
    inf = torch.full_like(edges[:, :1], math.inf)
    return torch.cat([-inf, edges, inf], dim=1)


def run_case(case: str, d: int, threads: int, records: int) -> dict:
    import torch

    from mis_lightning.functional import (
        CltSums,
        affine_boundaries,
        affine_cell_moments,
        cell_moments,
        cell_statistics,
    )
    from mis_lightning.functional.grids import moments_from_alpha_fast

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    base = _rss_mib()
    timer = _Timer()
    extra: dict = {}
    chunks = range(0, d, CHUNK)

    if case in ("cell_statistics", "cell_moments"):
        fn = cell_statistics if case == "cell_statistics" else cell_moments
        for a in chunks:
            c = min(CHUNK, d - a)
            theta, sigma, scale, _ = _inputs(c, 2.0, gen, torch)
            b = _k8_boundaries(theta, scale, torch)
            with timer:
                fn(theta, sigma, b)
    elif case.startswith("affine_"):
        regime = {"affine_frozen": 100.0, "affine_coarse": 20.0, "affine_k8": 2.0, "affine_fine": 0.2,
                  "affine_mix": "mix"}[case]
        frozen = 0
        for a in chunks:
            c = min(CHUNK, d - a)
            theta, sigma, scale, zp = _inputs(c, regime, gen, torch)
            with timer:
                m = affine_cell_moments(theta, sigma, scale, zp, -128, 127)
            frozen += int((m.kappa == 0).sum())
        extra["frozen"] = frozen / d
    elif case.startswith(("compile_", "eager_")):
        kind, dtype_name = case.split("_")
        dtype = {"f64": torch.float64, "f32": torch.float32}[dtype_name]
        fn = moments_from_alpha_fast
        if kind == "compile":
            fn = torch.compile(moments_from_alpha_fast, dynamic=False)
        rows = min(CHUNK, d)  # one static shape: no recompiles
        theta, sigma, scale, zp = _inputs(rows, 2.0, gen, torch)
        edges = affine_boundaries(theta, scale, zp, -128, 127, 4)  # 10 edges, K = 9 (window of 4)
        alpha = ((edges - theta.unsqueeze(-1)) / sigma.unsqueeze(-1)).to(dtype)
        t0 = time.perf_counter()
        out = fn(alpha)  # first call: compiles
        extra["first_call_s"] = time.perf_counter() - t0
        ref = moments_from_alpha_fast(alpha.double())
        extra["max_kappa_err_vs_f64"] = float((out.kappa.double() - ref.kappa).abs().max())
        calls = math.ceil(d / rows)
        for _ in range(calls):
            with timer:
                fn(alpha)
        extra["d_processed"] = calls * rows
    elif case in ("clt_stream", "clt_end_to_end"):
        sums = CltSums.zeros(records)
        for a in chunks:
            c = min(CHUNK, d - a)
            w = torch.randn(records, c, dtype=torch.float32, generator=gen)
            if case == "clt_stream":
                kappa = torch.rand(c, dtype=torch.float64, generator=gen)
                m4 = 3.0 * kappa.square()
                with timer:
                    sums.add_(w, kappa, m4)
            else:
                theta, sigma, scale, zp = _inputs(c, "mix", gen, torch)
                with timer:
                    m = affine_cell_moments(theta, sigma, scale, zp, -128, 127)
                    sums.add_(w, m.kappa, m.m4)
        with timer:
            sums.leakage(1000)
    else:
        raise ValueError(case)
    return {"case": case, "d": d, "threads": threads, "seconds": timer.wall, "cpu_seconds": timer.cpu,
            "peak_mib": _rss_mib() - base, **extra}


CASES = [
    ("cell_statistics", "plain `cell_statistics`, K = 8"),
    ("cell_moments", "`cell_moments`, K = 8"),
    ("affine_frozen", "`affine_cell_moments`, very coarse (100 sd)"),
    ("affine_coarse", "`affine_cell_moments`, coarse (20 sd)"),
    ("affine_k8", "`affine_cell_moments`, K~8 (2 sd)"),
    ("affine_fine", "`affine_cell_moments`, fine (0.2 sd)"),
    ("affine_mix", "`affine_cell_moments`, mix"),
    ("eager_f64", "`moments_from_alpha_fast` eager, float64 (10 edges)"),
    ("compile_f64", "`torch.compile`d, float64"),
    ("eager_f32", "`moments_from_alpha_fast` eager, float32"),
    ("compile_f32", "`torch.compile`d, float32"),
    ("clt_stream", "`CltSums.add_` streaming, R = {R} records"),
    ("clt_end_to_end", "`affine_cell_moments` (mix) + `CltSums.add_`, R = {R}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--large", action="store_true", help="also d = 1e8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--omp-active", action="store_true",
                    help="leave OMP_WAIT_POLICY alone (default: PASSIVE for the measured processes)")
    ap.add_argument("--cases", nargs="+", default=None, help="subset of case names")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process: one measurement, JSON on stdout
        print(json.dumps(run_case(args.case, args.d, args.threads, args.records)))
        return
    sizes = [int(s) for s in args.sizes] + ([int(1e8)] if args.large else [])
    cases = [(c, label) for c, label in CASES if (args.cases is None or c in args.cases)]
    if args.no_compile:
        cases = [(c, label) for c, label in cases if not c.startswith("compile_")]
    thread_counts = sorted({1, args.threads})
    results: dict = {}
    for case, _ in cases:
        for d in sizes:
            for t in thread_counts:
                cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--d", str(d),
                       "--threads", str(t), "--records", str(args.records)]
                env = dict(os.environ)
                if not args.omp_active:
                    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if out.returncode != 0:
                    lines = out.stderr.strip().splitlines()
                    results[(case, d, t)] = {"error": lines[-1] if lines else "failed"}
                else:
                    results[(case, d, t)] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  {case} d={d:.0e} threads={t}: {results[(case, d, t)]}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    omp = "default" if args.omp_active else os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    print(f"OMP_WAIT_POLICY: {omp}; chunk: {CHUNK} coordinates; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} on {os.cpu_count()} CPUs (other jobs share the machine: wall-clock figures "
          "with several threads suffer most)\n")
    cols = []
    for d in sizes:
        cols += [f"d={d:.0e}: per CPU-s, 1 thr", *(f"wall, {t} thr" for t in thread_counts), "peak MiB"]
    print("| kernel (weights/s) | " + " | ".join(cols) + " | notes |")
    print("|---|" + "---|" * len(cols) + "---|")
    for case, label in cases:
        cells, notes = [], []
        for d in sizes:
            r1 = results[(case, d, 1)]
            if "error" in r1:
                cells += ["error"] * (2 + len(thread_counts))
                notes.append(r1["error"][:80])
                continue
            cells.append(f"{r1.get('d_processed', d) / r1['cpu_seconds']:.3g}")
            for t in thread_counts:
                r = results[(case, d, t)]
                cells.append("error" if "error" in r else
                             f"{r.get('d_processed', d) / r['seconds']:.3g} ({r['seconds']:.1f} s)")
            cells.append(f"{max(r1['peak_mib'], results[(case, d, thread_counts[-1])].get('peak_mib', 0)):.0f}")
        r = results[(case, sizes[-1], 1)]
        if "frozen" in r:
            notes.append(f"frozen {r['frozen']:.0%}")
        if "first_call_s" in r and case.startswith("compile"):
            notes.append(f"compile (first call) {r['first_call_s']:.1f} s")
        if "max_kappa_err_vs_f64" in r and case.endswith("f32"):
            notes.append(f"kappa err vs float64 {r['max_kappa_err_vs_f64']:.1e}")
        print(f"| {label.format(R=args.records)} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")


if __name__ == "__main__":
    main()
