"""CPU cost and peak memory of the per-record gradient check (nux53, ``check_record_gradients``)
against the batch's loss, on a language-model-shaped loss: outputs [B, T, V] logits,
cross-entropy per token, mean per record.

Usage (CPU seconds, two repeats, in this process)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python benchmarks/record_gradient_check.py

A/B of ``per_sample.GRADIENT_CHECK_LEAN`` (ux54b), each side in its own fresh process (so that its
peak resident memory is its own), alternating ``--rounds`` times::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python benchmarks/record_gradient_check.py \\
        --ab --size 16 256 32000 --rounds 2

prints per side: the check's CPU seconds, the process's peak RSS and its RSS before the check
(the outputs and targets held), and whether a batch-mean mixing loss is still refused.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mis_lightning.estimation import per_sample
from mis_lightning.estimation.per_sample import check_record_gradients, check_record_losses


def lm(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-record losses [B]: cross-entropy per token, mean over the record's T tokens."""
    return F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none").mean(-1)


def mixed(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``lm`` mixing the records through its gradient only (nux53): must be refused."""
    loss = lm(outputs, targets)
    return loss - loss.mean() + loss.mean().detach()


def main(b: int = 32, t: int = 128, v: int = 8000) -> None:
    torch.manual_seed(0)
    outputs, targets = torch.randn(b, t, v), torch.randint(0, v, (b, t))
    for _ in range(2):
        c0 = time.process_time()
        with torch.no_grad():
            losses = lm(outputs, targets)
        c1 = time.process_time()
        check_record_gradients(lm, outputs, targets, "lm")
        c2 = time.process_time()
        check_record_losses(lm, outputs, targets, losses, "lm")  # the value check, then the gradient check
        c3 = time.process_time()
        print(f"batch loss {c1 - c0:.3f} s; gradient check {c2 - c1:.3f} s; value + gradient checks {c3 - c2:.3f} s")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_side(lean: bool, b: int, t: int, v: int) -> None:
    """One fresh process's measure (``--side``): the check once, its CPU and the peak RSS."""
    per_sample.GRADIENT_CHECK_LEAN = lean
    torch.manual_seed(0)
    outputs, targets = torch.randn(b, t, v), torch.randint(0, v, (b, t))
    before = _peak_mib()
    c0 = time.process_time()
    check_record_gradients(lm, outputs, targets, "lm")
    cpu = time.process_time() - c0
    peak = _peak_mib()
    try:
        check_record_gradients(mixed, outputs, targets, "mixed")
        refused = False
    except ValueError:
        refused = True
    print(f"lean={lean}: check {cpu:.3f} s CPU; peak RSS {peak:.0f} MiB (before the check {before:.0f} MiB, "
          f"+{peak - before:.0f}); batch-mean mixing refused: {refused}", flush=True)


def ab(b: int, t: int, v: int, rounds: int) -> None:
    for _ in range(rounds):
        for lean in (False, True):
            subprocess.run([sys.executable, __file__, "--side", str(int(lean)), "--size", str(b), str(t), str(v)],
                           check=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs=3, default=None, metavar=("B", "T", "V"))
    ap.add_argument("--ab", action="store_true")
    ap.add_argument("--side", type=int, choices=(0, 1), default=None)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    size = tuple(args.size) if args.size else (32, 128, 8000)
    if args.side is not None:
        one_side(bool(args.side), *size)
    elif args.ab:
        ab(*size, args.rounds)
    else:
        main(*size)
