"""Where a scoring call's minor page faults or CPU go, by the Python line whose C call (a torch
operator, an allocation) took them; and what a fresh page costs on this machine (issue 13;
docs/benchmarks.md, "p55a").

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/ops_by_line.py lines /tmp/m1e7.pt --calls 2
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/ops_by_line.py lines /tmp/m1e7.pt --cpu --warm
    python benchmarks/ops_by_line.py pages --mib 400

``lines``: after the default "assess" estimation (``first_call.load_saved``) and torchao's import,
``--calls`` calls of ``score_schemes`` on scale.py's eight schemes (``--warm``: one untimed call
before them), each under ``sys.setprofile``: every C call's minor faults (``--cpu``: its CPU time)
are charged to the line of ``mis_lightning`` (or of the code it calls) that made it, and the
``--top`` largest are printed per call with the number of C calls. A fault is a fresh page of
memory mapped and zeroed by the kernel; the profile hook's own cost inflates Python-heavy code,
so read the CPU figures as shares, not as a call's time.

``pages``: the CPU time of the first touch of ``--mib`` MiB of fresh anonymous memory, page by page
(the faults a fresh buffer costs), with ``madvise(MADV_HUGEPAGE)`` (transparent huge pages, where
the kernel gives them: 512x fewer faults) and after one ``madvise(MADV_POPULATE_WRITE)`` (the pages
mapped in one system call, Linux 5.14+). Linux only.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import importlib
import mmap
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))

_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_PAGE = 4096


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _charged(run: Callable[[], Any], read: Callable[[], float]) -> dict[tuple, list[float]]:
    """``run()`` under ``sys.setprofile``: ``{(file, line, function, C callable): [read() charged, C calls]}``."""
    stats: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    started: dict[int, float] = {}

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            started[id(frame)] = read()
        elif event in ("c_return", "c_exception"):
            s = started.pop(id(frame), None)
            if s is not None:
                got = read() - s
                if got:
                    fn = frame.f_code.co_filename
                    key = (fn.split("mis_lightning/")[-1] if "mis_lightning/" in fn else fn, frame.f_lineno,
                           frame.f_code.co_name, getattr(arg, "__name__", "?"))
                    stats[key][0] += got
                    stats[key][1] += 1

    sys.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(None)
    return stats


def _lines(path: str, calls: int, cpu: bool, warm: bool, top: int) -> None:
    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES

    A = importlib.import_module("mis_lightning.assess")  # (the package exports the function assess)
    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    importlib.import_module("torchao.quantization")
    if warm:
        A.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
    read = time.process_time if cpu else _faults
    for call in range(calls):
        f0, t0 = _faults(), time.process_time()
        stats = _charged(lambda: A.score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg), read)
        total = sum(v[0] for v in stats.values())
        unit = "ms" if cpu else "faults"
        scale = 1e3 if cpu else 1
        print(f"size {saved['size']}, call {call + 1}{' after a warm-up' if warm else ''}: {_faults() - f0:,} minor "
              f"faults, {time.process_time() - t0:.2f} s CPU (profiled); in C calls {total * scale:,.0f} {unit}; "
              f"load {os.getloadavg()[0]:.1f}")
        for (fn, line, func, op), (v, n) in sorted(stats.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"{v * scale:10,.1f} {unit} {int(n):6d} calls  {fn}:{line} {func} -> {op}")


def _pages(mib: int) -> None:
    libc = ctypes.CDLL(None)
    n = mib << 20
    for how in ("touch", "MADV_HUGEPAGE", "MADV_POPULATE_WRITE"):
        m = mmap.mmap(-1, n + (2 << 20))
        view = memoryview(m)
        buf = ctypes.c_char.from_buffer(m)
        base = ctypes.addressof(buf)
        start = (base + (2 << 20) - 1) & ~((2 << 20) - 1)  # (2 MiB aligned: a huge page's boundary)
        off = start - base
        f0, t0 = _faults(), time.process_time()
        rc = 0
        if how != "touch":
            rc = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(n),
                              _MADV_HUGEPAGE if how == "MADV_HUGEPAGE" else _MADV_POPULATE_WRITE)
        for p in range(off, off + n, _PAGE):
            view[p] = 1
        dt, nf = time.process_time() - t0, _faults() - f0
        print(f"{how:20s} (madvise rc {rc}): {mib} MiB, {nf:,} faults, {dt * 1e3:.1f} ms CPU "
              f"({dt * 1e6 / max(n // _PAGE, 1):.2f} us a 4 KiB page); load {os.getloadavg()[0]:.1f}")
        del buf
        view.release()
        m.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    ln = sub.add_parser("lines", help="faults (or CPU) of a scoring call's C calls by Python line")
    ln.add_argument("path", help="a model saved by first_call.py train")
    ln.add_argument("--calls", type=int, default=1)
    ln.add_argument("--cpu", action="store_true", help="CPU time instead of minor faults")
    ln.add_argument("--warm", action="store_true", help="one untimed scoring call first")
    ln.add_argument("--top", type=int, default=30)
    pg = sub.add_parser("pages", help="CPU time of fresh pages")
    pg.add_argument("--mib", type=int, default=400)
    args = ap.parse_args(argv)
    if args.mode == "lines":
        _lines(args.path, args.calls, args.cpu, args.warm, args.top)
    else:
        _pages(args.mib)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
