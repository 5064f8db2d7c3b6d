"""The scoring pass's cell-moment calls, captured once and replayed (issue 13; docs/benchmarks.md, "cm35").

The 1e7 scoring's main and pool calls of ``ParamGrid.moments`` (each chunk of each parameter,
once per distinct grid) cost seconds against a load-dependent noise of several seconds per
fresh-process run, so changes to them are measured here on the calls themselves, in one
process, with the changes on and off interleaved:

    python benchmarks/first_call.py train 1e7 M                     # the saved model (once)
    python benchmarks/moment_calls.py capture M CALLS.pt            # estimation + scoring; ~750 MB
    python benchmarks/moment_calls.py ab CALLS.pt --rounds 5 [--param 2.weight] [--flag NAME ...]

    python benchmarks/moment_calls.py timed M                       # the calls' share of one scoring
    python benchmarks/moment_calls.py versus CALLS.pt --root OLD --rounds 6   # this checkout against OLD

``timed`` runs the estimation and the scoring once, fresh, and prints the scoring's CPU seconds
and those spent in ``ParamGrid.moments`` (for old / new pairs of checkouts: run it from each,
ABBA order, ``PYTHONPATH=$PWD``). ``capture`` runs ``first_call.py assess``'s estimation and scoring and saves every
``ParamGrid.moments`` call (grid, weights, sd, range, ``kappa_only``). ``ab`` replays them under
``CompilePolicy("never")`` (the eager paths the 1e7 pass takes before its compile threshold),
``--rounds`` times with the switches on, then off, and prints the CPU seconds
(``time.process_time``, one thread) of each round and in how many calls the SHA-1 of the read
fields differs between the two ways (``kappa`` alone in ``kappa_only`` calls: the others are unread). ``--flag`` names boolean switches of
``mis_lightning.quantization.base`` to turn off (default: cm35's ``SHARE_EXPANSIONS`` and
``REVEALED_IN_PLACE``, plus the wide-sd form's C3 kept for the pool call, which ``--flag cube``
names: the replay then never finds a kept C3); ``--flag main`` replays the joint pass's main
calls (marked at capture) with every field, as before ``assess.MAIN_KAPPA_ONLY`` (pf40):

    python benchmarks/moment_calls.py ab CALLS.pt --rounds 5 --flag main --flag CUBE_KEPT_KAPPA_ONLY

``versus`` replays the calls with this checkout's
``ParamGrid`` and with another checkout's (``--root``: its ``mis_lightning`` copied into a temporary
folder as ``mis_lightning_old``, each grid rebuilt from its fields there), rounds interleaved in
one process (alternating which goes first), for changes without a switch (cm36); it also says
in how many calls the SHA-1 of the read fields differ, and ``--method NAME`` times the CPU seconds
spent inside ``ParamGrid.NAME`` on each side (wd38).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout under test first (PYTHONPATH=$PWD does the same)
sys.path.append(str(Path(__file__).resolve().parents[1]))

FIELDS = ("kappa", "mean_abs", "m4", "coverage")


def _capture(model_path: str, out: str) -> None:
    import torch

    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.quantization import base

    torch.set_num_threads(1)
    _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(model_path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    calls = []
    real = base.ParamGrid.moments

    def record(self, theta, sigma, start, end, use_codes=True, compile_policy=None, kappa_only=False):
        # the joint pass's main call of a scheme (its sd is the chunk's own, its grid not the
        # storage baseline's): what `ab --flag main` replays with kappa_only False
        f = sys._getframe(1)
        main = f.f_code.co_name == "_joint_sums" and sigma is f.f_locals.get("sg_c") \
            and self is not f.f_locals.get("sgrid")
        calls.append({"grid": self, "theta": theta, "sigma": sigma, "start": start, "end": end,
                      "use_codes": use_codes, "kappa_only": kappa_only, "main": main})
        return real(self, theta, sigma, start, end, use_codes, compile_policy, kappa_only)

    base.ParamGrid.moments = record
    try:
        score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
    finally:
        base.ParamGrid.moments = real
    torch.save(calls, out)
    print(f"{len(calls)} calls, {sum(c['theta'].numel() for c in calls):,} elements -> {out}")


def _timed(model_path: str) -> None:
    import torch

    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes
    from mis_lightning.quantization import base

    torch.set_num_threads(1)
    _, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(model_path)
    est = run_estimation(model, loader, loss_fn, est_cfg)
    spent = [0.0, 0]
    real = base.ParamGrid.moments

    def timed(self, *a, **k):
        t0 = time.process_time()
        try:
            return real(self, *a, **k)
        finally:
            spent[0] += time.process_time() - t0
            spent[1] += 1

    base.ParamGrid.moments = timed
    try:
        t0 = time.process_time()
        score_schemes(est, model, COMMON_SCHEMES, scoring_config=sc_cfg)
        s = time.process_time() - t0
    finally:
        base.ParamGrid.moments = real
    print(f"scoring {s:.2f} s; ParamGrid.moments {spent[0]:.2f} s over {spent[1]} calls; load {os.getloadavg()[0]:.1f}")


def _load_calls(path: str, param: str | None, share_pool_sd: bool) -> list[dict]:
    """The captured calls (``param``'s alone where given); ``share_pool_sd``: each chunk's pool
    calls given one sd tensor (the first of the bitwise-equal ones), as ``assess`` passes it since
    ws37 (one ``sd / sqrt(2)`` per chunk), for files captured before (a tensor per grid)."""
    import torch

    calls = torch.load(path, weights_only=False)
    if param:
        calls = [c for c in calls if c["grid"].name == param]
    if share_pool_sd:
        first: dict[tuple, object] = {}
        for c in calls:
            if c["kappa_only"]:
                key = (c["grid"].name, c["start"], c["end"])
                held = first.setdefault(key, c["sigma"])
                if held is not c["sigma"] and torch.equal(held, c["sigma"]):
                    c["sigma"] = held
    return calls


def _ab(path: str, rounds: int, param: str | None, flags: list[str], share_pool_sd: bool = False) -> None:
    import hashlib

    import torch

    import mis_lightning.quantization.base as qb
    from mis_lightning.functional import CompilePolicy

    torch.set_num_threads(1)
    calls = _load_calls(path, param, share_pool_sd)
    policy = CompilePolicy("never")
    get, put = qb._fact_get, qb._fact_put
    switches = [f for f in flags if f not in ("cube", "main")]
    for f in switches:
        if not isinstance(getattr(qb, f), bool):
            raise SystemExit(f"--flag {f}: not a boolean switch of quantization.base")

    def no_cube_get(kind, *a):
        return None if kind == "cube" else get(kind, *a)

    def no_cube_put(kind, *a):
        if kind != "cube":
            put(kind, *a)

    times: dict[bool, list[float]] = {True: [], False: []}
    sums: dict[bool, list[str]] = {}
    for r in range(rounds):
        for on in (True, False):
            if "cube" in flags:
                qb._fact_get, qb._fact_put = (get, put) if on else (no_cube_get, no_cube_put)
            for f in switches:
                setattr(qb, f, on)
            qb.release_chunk_facts()
            t0 = time.process_time()
            got = []
            for c in calls:
                # "main" off: the joint pass's main calls with every field (before assess.MAIN_KAPPA_ONLY)
                ko = c["kappa_only"] and (on or "main" not in flags or not c.get("main", False))
                mm = c["grid"].moments(c["theta"], c["sigma"], c["start"], c["end"], c["use_codes"], policy, ko)
                if r == 0:  # the fields read (kappa alone in kappa_only calls), bytes
                    fields = ("kappa",) if c["kappa_only"] else FIELDS
                    got.append(hashlib.sha1(b"".join(getattr(mm, f).contiguous().numpy().tobytes()
                                                     for f in fields)).hexdigest())
            times[on].append(time.process_time() - t0)
            if r == 0:
                sums[on] = got
    qb._fact_get, qb._fact_put = get, put
    differ = sum(x != y for x, y in zip(sums[True], sums[False]))
    print(f"{len(calls)} calls; off: {' '.join(flags)}; SHA-1 of the read fields differ in {differ} calls")
    for on in (True, False):
        t = sorted(times[on])
        print(f"{'on ' if on else 'off'} min {t[0]:.3f} s, median {t[len(t) // 2]:.3f} s |",
              " ".join(f"{x:.2f}" for x in times[on]))
    print(f"load {os.getloadavg()[0]:.1f}")


def _versus(path: str, root: str, rounds: int, param: str | None, share_pool_sd: bool = False,
            method: str | None = None) -> None:
    import importlib
    import shutil
    import tempfile

    import torch

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="moment_calls_")
    try:  # (the copy kept until the end: modules imported inside functions load from it)
        shutil.copytree(Path(root) / "mis_lightning", Path(tmp) / "mis_lightning_old")
        sys.path.insert(0, tmp)
        _versus_rounds(path, root, rounds, param, importlib.import_module("mis_lightning_old.quantization.base"),
                       importlib.import_module("mis_lightning_old.functional").CompilePolicy("never"), share_pool_sd,
                       method)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _versus_rounds(path: str, root: str, rounds: int, param: str | None, ob, old_policy,
                   share_pool_sd: bool = False, method: str | None = None) -> None:
    import dataclasses
    import hashlib

    import mis_lightning.quantization.base as qb
    from mis_lightning.functional import CompilePolicy

    calls = _load_calls(path, param, share_pool_sd)
    rebuilt: dict[int, object] = {}

    def old_grid(g):
        if id(g) not in rebuilt:
            rebuilt[id(g)] = ob.ParamGrid(**{f.name: getattr(g, f.name) for f in dataclasses.fields(g)})
        return rebuilt[id(g)]

    sides = {"new": (qb, calls, CompilePolicy("never")),
             "old": (ob, [dict(c, grid=old_grid(c["grid"])) for c in calls], old_policy)}
    # --method: CPU seconds inside ParamGrid.METHOD on each side (wd38: _wide_closed)
    inside = {"new": 0.0, "old": 0.0}
    if method:
        for side, mod in (("new", qb), ("old", ob)):
            real = getattr(mod.ParamGrid, method)

            def timed(self, *a, _real=real, _side=side, **k):
                t0 = time.process_time()
                try:
                    return _real(self, *a, **k)
                finally:
                    inside[_side] += time.process_time() - t0

            setattr(mod.ParamGrid, method, timed)

    def replay(side: str, digests: list[str] | None = None) -> tuple[float, float]:
        mod, cs, policy = sides[side]
        mod.release_chunk_facts()
        inside[side] = 0.0
        t0 = time.process_time()
        for c in cs:
            mm = c["grid"].moments(c["theta"], c["sigma"], c["start"], c["end"], c["use_codes"], policy,
                                   c["kappa_only"])
            if digests is not None:  # the fields read (kappa alone in kappa_only calls), bytes
                fields = ("kappa",) if c["kappa_only"] else FIELDS
                digests.append(hashlib.sha1(b"".join(getattr(mm, f).contiguous().numpy().tobytes()
                                                     for f in fields)).hexdigest())
        return time.process_time() - t0, inside[side]

    # (first-call costs out of the rounds; every call's read fields hashed on each side)
    dig: dict[str, list[str]] = {"new": [], "old": []}
    replay("new", dig["new"]), replay("old", dig["old"])
    differ = sum(a != b for a, b in zip(dig["new"], dig["old"]))
    times: dict[str, list[tuple[float, float]]] = {"new": [], "old": []}
    for r in range(rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            times[side].append(replay(side))
    med = {k: sorted(x[0] for x in v)[len(v) // 2] for k, v in times.items()}
    mid = {k: sorted(x[1] for x in v)[len(v) // 2] for k, v in times.items()}
    print(f"{len(calls)} calls; old: {root}; SHA-1 of the read fields differ in {differ} calls")
    for k in ("old", "new"):
        print(f"{k} median {med[k]:.3f} s" + (f" ({method} {mid[k]:.3f} s)" if method else ""), "|",
              " ".join(f"{x:.2f}" + (f"/{y:.2f}" if method else "") for x, y in times[k]))
    print(f"new / old (medians) {med['new'] / med['old']:.3f}; load {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("model")
    c.add_argument("out")
    t = sub.add_parser("timed")
    t.add_argument("model")
    a = sub.add_parser("ab")
    a.add_argument("calls")
    a.add_argument("--rounds", type=int, default=5)
    a.add_argument("--param", default=None, help="one parameter's calls (e.g. 2.weight)")
    a.add_argument("--flag", action="append", default=None,
                   help="a switch of quantization.base to turn off, 'cube' or 'main' (repeatable)")
    v = sub.add_parser("versus")
    v.add_argument("calls")
    v.add_argument("--root", required=True, help="the other checkout (e.g. a git worktree of the old commit)")
    v.add_argument("--rounds", type=int, default=6)
    v.add_argument("--param", default=None)
    v.add_argument("--method", default=None,
                   help="also time the CPU seconds inside ParamGrid.METHOD on each side (e.g. _wide_closed)")
    for p in (a, v):
        p.add_argument("--share-pool-sd", action="store_true",
                       help="one pool-call sd tensor per chunk (files captured before ws37's assess change)")
    args = ap.parse_args(argv)
    if args.cmd == "capture":
        _capture(args.model, args.out)
    elif args.cmd == "timed":
        _timed(args.model)
    elif args.cmd == "versus":
        _versus(args.calls, args.root, args.rounds, args.param, args.share_pool_sd, args.method)
    else:
        _ab(args.calls, args.rounds, args.param, args.flag or ["SHARE_EXPANSIONS", "REVEALED_IN_PLACE", "cube"],
            args.share_pool_sd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
