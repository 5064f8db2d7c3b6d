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
``_joint_sums``, ``_finish_scheme`` and the rest, CPU ms (minor page faults).

``params``: after a warm-up call, the mean over ``--calls`` steady calls of each parameter's time
in the joint pass (from one parameter's influence reader to the next), and for parameters of at
most ``--small`` weights each grid's cell moments at theta-hat (``main``), in the pool protocol
(``pool``) and at the draws (``draws``), CPU ms per call. One thread; no profiler.
"""

from __future__ import annotations

import argparse
import collections
import importlib
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


def _setup(path: str, adam: bool) -> tuple[Any, ...]:
    import torch

    if adam:
        import lightning_fabric.utilities.seed  # noqa: F401 - as scale.py's child has it

        m = torch.nn.Linear(3, 3)
        o = torch.optim.Adam(m.parameters())
        m(torch.randn(2, 3)).sum().backward()
        o.step()
    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES

    A = importlib.import_module("mis_lightning.assess")
    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path)
    est = A.run_estimation(model, loader, loss_fn, est_cfg)
    return A, est, model, COMMON_SCHEMES, sc_cfg


def _first(path: str) -> None:
    from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

    A, est, model, schemes, sc_cfg = _setup(path, adam=True)
    _import_torchao_quantization()
    acc: collections.Counter = collections.Counter()
    flt: collections.Counter = collections.Counter()

    def wrap(n: str) -> None:
        f0 = getattr(A, n)

        def w(*a: Any, **k: Any) -> Any:
            c, f = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            try:
                return f0(*a, **k)
            finally:
                acc[n] += time.process_time() - c
                flt[n] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
        setattr(A, n, w)

    for n in ("resolve_schemes", "_prepare_scheme", "_joint_sums", "_finish_scheme"):
        wrap(n)
    for i in range(3):
        acc.clear()
        flt.clear()
        c = time.process_time()
        A.score_schemes(est, model, schemes, scoring_config=sc_cfg)
        t = time.process_time() - c
        parts = ", ".join(f"{k} {v * 1e3:.1f} ({flt[k]:,})" for k, v in acc.items())
        print(f"call {i + 1}: {t * 1e3:.1f} ms: {parts}, rest {(t - sum(acc.values())) * 1e3:.1f}")
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("import", "first", "params"))
    ap.add_argument("path", nargs="?", help="a model saved by first_call.py train (first, params)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per case (import)")
    ap.add_argument("--calls", type=int, default=6, help="steady calls (params)")
    ap.add_argument("--small", type=int, default=4096, help="the small parameters' most weights (params)")
    args = ap.parse_args(argv)
    if args.what == "import":
        _imports(args.rounds)
        return
    if not args.path:
        ap.error(f"{args.what} needs the saved model's path")
    import torch

    torch.set_num_threads(1)
    (_first if args.what == "first" else lambda p: _params(p, args.calls, args.small))(args.path)


if __name__ == "__main__":
    main()
