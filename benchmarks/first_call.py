"""The first ``run_estimation`` and ``score_schemes`` calls of a fresh process, as a user who
loads a trained model makes them (no optimizer, no Lightning in the process), in CPU time and
in Adam epochs of the same model (issue 13; docs/benchmarks.md, "pf30").

Two phases, each a fresh process:

    python benchmarks/first_call.py train 1e7 /tmp/m1e7.pt     # 3 Adam epochs; epoch CPU time
    python benchmarks/first_call.py assess /tmp/m1e7.pt --json /tmp/r.json [--prof /tmp/p]

``train`` builds ``assess_speed.mlp(SIZE)`` and the synthetic regression of scale.py (4,096
records, batch 256, seed 0), trains it 3 Adam epochs (lr 1e-3) and saves the weights, the data
and the epoch's CPU time (the least of epochs 2-3). ``assess`` loads them, runs the default
"assess" estimation and scores scale.py's eight schemes (``COMMON_SCHEMES``; ``--schemes``
others), then prints one
line: the CPU times (``time.process_time``, one thread) and their ratio to the epoch;
``--json`` writes the report (``Report.to_json``) for a field-by-field comparison of two
checkouts; ``--prof`` writes a cProfile of the scoring call (``PREFIX.prof``, ``PREFIX.txt``);
``--off MODULE.FLAG`` (repeatable) sets a module-level switch of ``mis_lightning`` False before
the calls, e.g. ``--off quantization.base.POINT_MASS_CLOSED_FORM`` (an A/B in one checkout);
``--on MODULE.FLAG`` sets a switch that is off by default True (e.g. ``assess.CAST_DRAWS_BOUNDED``).

``ab`` (pf40) scores the saved model repeatedly in one process after one estimation: a warm-up
call, then pairs with boolean switches on and off (alternating which goes first), CPU seconds of
each call and whether every report is the warm-up's (a pure-speed switch: bitwise the same):

    python benchmarks/first_call.py ab /tmp/m1e7.pt --rounds 4 --flag assess.MAIN_KAPPA_ONLY \
        --flag quantization.base.CUBE_KEPT_KAPPA_ONLY

To compare two checkouts, run ``assess`` alternately from each (``cd CHECKOUT &&
PYTHONPATH=$PWD python PATH/TO/first_call.py assess ...``) on the same saved model, one thread,
``OMP_WAIT_POLICY=PASSIVE``: old/new ratios within a pair, never absolute times across runs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first (PYTHONPATH=$PWD does the same)
sys.path.append(str(Path(__file__).resolve().parents[1]))


def switches(flags: list[str] | None, option: str) -> list[tuple[Any, str]]:
    """``(module, name)`` of each ``MODULE.FLAG`` (a module of mis_lightning, a boolean switch), in
    order. Raises SystemExit naming the command-line ``option`` on a flag that is not a boolean."""
    import importlib

    out = []
    for flag in flags or []:
        mod, _, attr = flag.rpartition(".")
        m = importlib.import_module("mis_lightning." + mod)
        if not isinstance(getattr(m, attr), bool):
            raise SystemExit(f"{option} {flag}: not a boolean switch")
        out.append((m, attr))
    return out


def switch_off(flags: list[str] | None) -> None:
    """Set each ``MODULE.FLAG`` (a module of mis_lightning, a boolean switch) to False (``--off``;
    A/B runs of one change in one checkout). Raises SystemExit on a flag that is not a boolean."""
    for m, attr in switches(flags, "--off"):
        setattr(m, attr, False)


def switch_on(flags: list[str] | None) -> None:
    """Set each ``MODULE.FLAG`` (a module of mis_lightning, a boolean switch) to True (``--on``: a
    switch off by default, e.g. ``assess.CAST_DRAWS_BOUNDED``). Raises SystemExit on a flag that
    is not a boolean."""
    for m, attr in switches(flags, "--on"):
        setattr(m, attr, True)


def _train(size: str, path: str) -> None:
    import torch

    from benchmarks.assess_speed import mlp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, n_in = mlp(size)
    n = 4096
    x = torch.randn(n, n_in)
    y = x[:, :8].sum(-1) / 3 + 0.5 * torch.randn(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ep = []
    for _ in range(3):
        c0 = time.process_time()
        for xb, yb in loader:
            opt.zero_grad()
            (0.5 * (model(xb).squeeze(-1) - yb) ** 2).mean().backward()
            opt.step()
        ep.append(time.process_time() - c0)
    torch.save({"size": size, "state": model.state_dict(), "x": x, "y": y, "epoch": min(ep[1:])}, path)
    print(f"size {size} epoch {min(ep[1:]):.3f} s CPU (epochs {', '.join(f'{e:.3f}' for e in ep)})")


def load_saved(path: str, dtype: str | None = None) -> tuple:
    """``(saved, model, loader, loss_fn, est_cfg, sc_cfg)`` of a model saved by ``train``: the MLP
    with its weights, the data in batches of 256, the squared-error loss per record (in float32)
    and the default "assess" configurations; one thread. ``dtype`` ("bfloat16", "float16"): the
    model and the inputs cast to it (weights stored in that format: their storage grid is the
    unquantized release, method.md section 5)."""
    import torch

    from benchmarks.assess_speed import mlp
    from mis_lightning.config import stage_configs

    torch.set_num_threads(1)
    saved = torch.load(path)
    model, _ = mlp(saved["size"])
    model.load_state_dict(saved["state"])
    x = saved["x"]
    if dtype is not None:
        model, x = model.to(getattr(torch, dtype)), x.to(getattr(torch, dtype))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, saved["y"]), batch_size=256)

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out.squeeze(-1).float() - t) ** 2

    est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
    return saved, model, loader, loss_fn, est_cfg, sc_cfg


def _assess(path: str, json_path: str | None, prof: str | None, schemes: list[str] | None,
            off: list[str] | None = None, dtype: str | None = None, on: list[str] | None = None) -> None:
    switch_off(off)
    switch_on(on)

    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes

    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path, dtype)
    epoch = float(saved["epoch"])
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0 = time.process_time()
    est = run_estimation(model, loader, loss_fn, est_cfg)
    e = time.process_time() - c0
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    dynamo = "torch._dynamo" in sys.modules
    pr = cProfile.Profile()
    c0 = time.process_time()
    if prof:
        pr.enable()
    rep = score_schemes(est, model, schemes or COMMON_SCHEMES, scoring_config=sc_cfg)
    if prof:
        pr.disable()
    s = time.process_time() - c0
    f2 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    line = (f"size {saved['size']} epoch {epoch:.3f} s; estimation {e:.2f} s = {e / epoch:.2f} ep; scoring {s:.2f} s"
            f" = {s / epoch:.2f} ep; total {(e + s) / epoch:.2f} ep; torch._dynamo after estimation: {dynamo};"
            f" peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB;"
            f" minor faults estimation {f1 - f0:,}, scoring {f2 - f1:,}; load {os.getloadavg()[0]:.1f}")
    print(line)
    if json_path:
        Path(json_path).write_text(rep.to_json())
    if prof:
        pr.dump_stats(prof + ".prof")
        st = io.StringIO()
        pstats.Stats(pr, stream=st).sort_stats("cumulative").print_stats(60)
        Path(prof + ".txt").write_text(line + "\n" + st.getvalue())


def _switches_ab(path: str, flags: list[str], rounds: int, schemes: list[str] | None, dtype: str | None) -> None:
    """One estimation, one warm-up scoring call, then ``rounds`` pairs of scoring calls with the
    switches ``flags`` (``MODULE.FLAG`` of ``mis_lightning``) on and off, alternating which goes
    first; CPU seconds of each call and whether every report equals the first one (JSON)."""
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.assess import run_estimation, score_schemes

    mods = switches(flags, "--flag")
    saved, model, loader, loss_fn, est_cfg, sc_cfg = load_saved(path, dtype)
    est = run_estimation(model, loader, loss_fn, est_cfg)

    def call(on: bool) -> tuple[float, str]:
        for m, attr in mods:
            setattr(m, attr, on)
        c0 = time.process_time()
        rep = score_schemes(est, model, schemes or COMMON_SCHEMES, scoring_config=sc_cfg)
        return time.process_time() - c0, rep.to_json()

    _, first = call(True)  # (the first call's one-time costs out of the pairs)
    times: dict[bool, list[float]] = {True: [], False: []}
    same = True
    for r in range(rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            t, js = call(on)
            times[on].append(t)
            same &= js == first
    epoch = float(saved["epoch"])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"size {saved['size']}; switches {' '.join(flags)}; every report equal: {same}")
    for on in (False, True):
        print(f"{'on ' if on else 'off'} median {med[on]:.2f} s = {med[on] / epoch:.2f} ep |",
              " ".join(f"{x:.2f}" for x in times[on]))
    print(f"on / off per pair: {' '.join(f'{a / b:.3f}' for a, b in zip(times[True], times[False]))}; "
          f"load {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("size")
    t.add_argument("path")
    a = sub.add_parser("assess")
    a.add_argument("path")
    a.add_argument("--json", default=None)
    a.add_argument("--prof", default=None)
    a.add_argument("--schemes", nargs="+", default=None, help="default: scale.py's COMMON_SCHEMES")
    a.add_argument("--off", action="append", default=None, metavar="MODULE.FLAG",
                   help="set mis_lightning.MODULE.FLAG False (repeatable)")
    a.add_argument("--on", action="append", default=None, metavar="MODULE.FLAG",
                   help="set mis_lightning.MODULE.FLAG True (repeatable; a switch off by default)")
    a.add_argument("--dtype", choices=["bfloat16", "float16"], default=None,
                   help="cast the model and inputs to this storage format (default: float32 as saved)")
    b = sub.add_parser("ab", help="switches on / off in one process, alternating (see _switches_ab)")
    b.add_argument("path")
    b.add_argument("--flag", action="append", required=True, metavar="MODULE.FLAG")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--schemes", nargs="+", default=None)
    b.add_argument("--dtype", choices=["bfloat16", "float16"], default=None)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        _train(args.size, args.path)
    elif args.cmd == "ab":
        _switches_ab(args.path, args.flag, args.rounds, args.schemes, args.dtype)
    else:
        _assess(args.path, args.json, args.prof, args.schemes, args.off, args.dtype, args.on)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
