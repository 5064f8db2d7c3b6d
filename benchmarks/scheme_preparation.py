"""The scoring's scheme preparation on a saved model: ``scheme.apply`` per scheme as
``assess._prepare_scheme`` calls it (inside ``zero_counts_only``, the scale facts shared across the
schemes: ``scale_facts_shared``), with the zero count it reads;
CPU seconds, minor page faults and system seconds per scheme, and attributed exclusively (a
function's own, less the wrapped functions it calls) to torchao's ``quantize_``, the model copy,
the scale facts (``ParamGrid.reveal``), torchao's ``dequantize()`` and the rest of ``apply``
(fx35; docs/benchmarks.md, "fx35").

    python benchmarks/first_call.py train 1e7 M
    PYTHONPATH=$PWD python benchmarks/scheme_preparation.py M [--whole] [--schemes ...]

``--ab MODULE.FLAG`` (repeatable; p47c) instead: ``--rounds K`` pairs of the whole preparation (every
scheme, as above) with the boolean switches ``mis_lightning.MODULE.FLAG`` on and off, alternating which
goes first, after one warm-up round; CPU seconds and minor page faults of each round:

    PYTHONPATH=$PWD python benchmarks/scheme_preparation.py M --ab quantization.base.SHARE_REPLACED_WEIGHTS --rounds 8

``--whole``: outside both contexts (every grid keeps its whole ``dequantized`` tensor and computes
its own scale facts, as before fx35; the zeros counted in it). One thread, torchao imported before the timed region;
no estimation (``apply`` needs none).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout under test first
sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks.scoring_faults import _usage, _wrapper, print_exclusive  # noqa: E402  (the same fault/CPU accounting)


def _wrap(stats: dict, stack: list, owner: Any, name: str, label: str) -> None:
    setattr(owner, name, _wrapper(stats, stack, label, getattr(owner, name)))


def _available(specs: list[str]) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """``([(spec, scheme)], [(spec, why)])``: the schemes this machine can apply, in order, and the
    others with their exception's name (e.g. the CUDA-only tinygemm layout)."""
    from mis_lightning.quantization import get_scheme

    ok, skipped = [], []
    for spec in specs:
        scheme = get_scheme(spec)
        try:
            scheme.check_available()
        except Exception as exc:  # noqa: BLE001
            skipped.append((spec, type(exc).__name__))
            continue
        ok.append((spec, scheme))
    return ok, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a model saved by first_call.py train")
    ap.add_argument("--schemes", nargs="+", default=None, help="default: scale.py's COMMON_SCHEMES")
    ap.add_argument("--whole", action="store_true", help="whole dequantized tensors, own scale facts (before fx35)")
    ap.add_argument("--ab", action="append", default=[], metavar="MODULE.FLAG", help="switches to A/B (repeatable)")
    ap.add_argument("--rounds", type=int, default=6, help="--ab: pairs of rounds")
    args = ap.parse_args(argv)
    import torch

    from benchmarks.first_call import load_saved
    from benchmarks.scale import COMMON_SCHEMES
    from mis_lightning.quantization import base as qb
    from mis_lightning.quantization.torchao_backend import _import_torchao_quantization

    _import_torchao_quantization()
    import torchao.quantization as aoq

    stats: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])
    stack: list[list[float]] = []
    _wrap(stats, stack, qb.QuantizationScheme, "apply", "apply (the rest)")
    _wrap(stats, stack, qb, "private_copy", "private_copy (the model copy)")
    _wrap(stats, stack, aoq, "quantize_", "torchao quantize_")
    _wrap(stats, stack, qb.ParamGrid, "reveal", "ParamGrid.reveal (scale facts)")
    for cls in (aoq.Int8Tensor, aoq.IntxUnpackedToInt8Tensor, aoq.Float8Tensor):
        _wrap(stats, stack, cls, "dequantize", f"{cls.__name__}.dequantize")
    saved, model, *_ = load_saved(args.path)
    names = [n for n, _ in model.named_parameters()]
    shared: list = []  # the scale facts the schemes reveal alike, as score_schemes keeps them

    def counting() -> Any:
        if args.whole:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(qb.zero_counts_only())
        stack.enter_context(qb.scale_facts_shared(shared))
        return stack
    if args.ab:
        return _ab(args, model, names, counting)
    rows = []
    ok, skipped = _available(args.schemes or COMMON_SCHEMES)
    for spec, why in skipped:
        print(f"{spec}: skipped ({why})")
    s0 = _usage()
    for spec, scheme in ok:
        a = _usage()
        with counting():
            res = scheme.apply(model, params=names)
        zeros = sum(g.zero_count if g.zero_count is not None
                    else g.dequantized.numel() - int(torch.count_nonzero(g.dequantized)) for g in res.grids.values())
        del res
        b = _usage()
        rows.append((spec, b[2] - a[2], b[0] - a[0], b[1] - a[1], zeros))
    e = _usage()
    print(f"size {saved['size']} ({'whole dequantized' if args.whole else 'zero_counts_only'}): {e[2] - s0[2]:.2f} s CPU, "
          f"{e[0] - s0[0]} minor page faults, {e[1] - s0[1]:.2f} s system; load {os.getloadavg()[0]:.1f}")
    for spec, cpu, flt, sys_s, zeros in rows:
        print(f"  {spec:40s} {cpu:6.3f} s {flt:8d} faults {sys_s:5.2f} s system  zeros {zeros}")
    print_exclusive(stats, by=3)
    return 0


def _ab(args: argparse.Namespace, model: Any, names: list[str], counting: Any) -> int:
    """``--ab``: the whole preparation with the switches on and off, alternating (see the module doc)."""
    from benchmarks.first_call import switches
    from benchmarks.scale import COMMON_SCHEMES

    mods = switches(args.ab, "--ab")
    schemes = [scheme for _, scheme in _available(args.schemes or COMMON_SCHEMES)[0]]

    def round_(on: bool) -> tuple[float, int]:
        for m, attr in mods:
            setattr(m, attr, on)
        a = _usage()
        with counting():
            for scheme in schemes:
                scheme.apply(model, params=names)
        b = _usage()
        return b[2] - a[2], b[0] - a[0]

    round_(True)  # warm-up
    got: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
    for r in range(args.rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            got[on].append(round_(on))
    for on in (False, True):
        cpu = sorted(c for c, _ in got[on])
        flt = sorted(f for _, f in got[on])
        print(f"{'on ' if on else 'off'} median {cpu[len(cpu) // 2]:.3f} s CPU, {flt[len(flt) // 2]} faults |",
              " ".join(f"{c:.3f}" for c, _ in got[on]))
    print(f"on / off per pair: {' '.join(f'{a[0] / b[0]:.3f}' for a, b in zip(got[True], got[False]))}; "
          f"switches {' '.join(args.ab)}; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
