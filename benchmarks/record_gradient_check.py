"""CPU cost of the per-record gradient check (nux53, ``check_record_gradients``) against the
batch's loss, on a language-model-shaped loss: outputs [B, T, V] logits, cross-entropy per token,
mean per record. Usage: ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python
benchmarks/record_gradient_check.py`` (CPU seconds, two repeats)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mis_lightning.estimation.per_sample import check_record_gradients, check_record_losses


def lm(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-record losses [B]: cross-entropy per token, mean over the record's T tokens."""
    return F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none").mean(-1)


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


if __name__ == "__main__":
    main()
