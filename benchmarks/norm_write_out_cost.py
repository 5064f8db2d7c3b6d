"""Cost of the written-out ``F.layer_norm`` (lf41): where the estimation's per-sample program
evaluates it. Since lf41 only the second-derivative passes (``LossProgram.second_derivatives()``)
write it out; before (ln41) every pass of a model holding an affine ``nn.LayerNorm`` did.

In one process, interleaved (1 thread): ``--rounds`` rounds, each case once per round; the median
ms and the median ratio to the first case of its group, paired by round:
  * per-sample gradients (``vmap(grad)``) of ``--depth`` x (Linear(w, w), LayerNorm(w), ReLU) ->
    Linear(w, 1), batch ``--batch``: torch's kernel (now) against written out (ln41's first-order
    passes; the same code under ``second_derivatives()``);
  * the exact Hessian (``estimate._batch_hessian``'s one-chunk path) of a small MLP without any norm (d = 433) and
    with a LayerNorm (d = 465): the write-out mode on (now: every model's second-derivative passes)
    against a pass-through (no mode), and the old inner ``jacrev`` (``torch.func.hessian``) against
    the new inner ``grad`` (``jacfwd(grad)``).

    python benchmarks/norm_write_out_cost.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from mis_lightning.estimation.per_sample import LossProgram


def _mse(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (o[:, 0] - t) ** 2


def _ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def _program(model: nn.Module, dtype: torch.dtype) -> LossProgram:
    return LossProgram(model, _mse, [k for k, _ in model.named_parameters()], dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = a.width
    mlp = nn.Sequential(*[m for _ in range(a.depth) for m in (nn.Linear(w, w), nn.LayerNorm(w), nn.ReLU())],
                        nn.Linear(w, 1))
    prog = _program(mlp, torch.float32)
    x, y = torch.randn(a.batch, w), torch.randn(a.batch)

    def grads(written: bool) -> None:
        with prog.second_derivatives() if written else contextlib.nullcontext():
            prog.per_sample_grads(x, y)

    small = {"no norm": nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)),
             "LayerNorm": nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                        nn.Linear(16, 1))}
    xs, ys = torch.randn(128, 8, dtype=torch.float64), torch.randn(128, dtype=torch.float64)
    progs = {k: _program(m.double(), torch.float64) for k, m in small.items()}

    def hessian(kind: str, mode: bool, inner_grad: bool) -> None:
        """_batch_hessian's one-chunk path (d within hessian_chunk), its inner derivative either way"""
        p = progs[kind]
        names = list(p.params)
        shapes = {k: p.params[k].shape for k in names}
        sizes = [p.params[k].numel() for k in names]
        flat0 = torch.cat([p.params[k].reshape(-1) for k in names])

        def f(flat: torch.Tensor) -> torch.Tensor:
            params = {k: t.reshape(shapes[k]) for k, t in zip(names, torch.split(flat, sizes))}
            return _mse(p.outputs(params, xs), ys).sum()

        with p.second_derivatives() if mode else contextlib.nullcontext():
            (torch.func.jacfwd(torch.func.grad(f)) if inner_grad else torch.func.hessian(f))(flat0)

    cases = {
        "per-sample grads: torch's kernel (new)": lambda: grads(False),
        "per-sample grads: written out (ln41)": lambda: grads(True),
    }
    for kind in small:
        d = sum(t.numel() for t in progs[kind].params.values())
        cases[f"exact H {kind} d={d}: new (mode, inner grad)"] = lambda k=kind: hessian(k, True, True)
        cases[f"exact H {kind} d={d}: no mode, inner grad"] = lambda k=kind: hessian(k, False, True)
        # the old code: torch.func.hessian, written out only for a model holding an affine nn.LayerNorm
        cases[f"exact H {kind} d={d}: old (hessian{', mode' if kind == 'LayerNorm' else ''})"] = (
            lambda k=kind: hessian(k, k == "LayerNorm", False))
    for fn in cases.values():  # warm-up (first forward-AD use, imports)
        fn()
    # interleaved: each round runs every case once, in turn (the machine's load moves between rounds)
    got: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.rounds):
        for k, fn in cases.items():
            got[k].append(_ms(fn, 1))
    base = {k: next(b for b in cases if b.split(":")[0] == k.split(":")[0]) for k in cases}
    print(f"{'case':58s} median ms   median ratio to the group's first row (paired by round)")
    for k, v in got.items():
        ratio = statistics.median(t / r for t, r in zip(v, got[base[k]]))
        print(f"{k:58s} {statistics.median(v):8.1f}   {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
