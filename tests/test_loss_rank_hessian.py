"""The loss Hessian in the outputs that counts the diagonal estimator's loss directions
(method.md section 4, "Finite-sample (leverage) correction") is formed reverse-over-reverse: the
matrix of torch.func.hessian (forward-over-reverse), without torch's first forward-AD use, which
compiles its jvp decompositions with TorchScript (~0.4 s CPU once per process: ~9 Adam epochs
of the 1e5-weight benchmark MLP; docs/benchmarks.md, pf28)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mis_lightning.estimation.per_sample import LossProgram

ROOT = Path(__file__).resolve().parents[1]


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).square().sum(-1)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_loss_output_hessians_are_the_forward_over_reverse_hessians(loss):
    """Against torch.func.hessian of the same per-record loss (loss_output_derivatives' second
    output), float64: equal to 1e-12 (the same derivatives in another order of products)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64) if loss == "mse" else torch.randint(0, 4, (6,), generator=g)
    prog = LossProgram(model, _mse if loss == "mse" else _ce, [n for n, _ in model.named_parameters()],
                       dtype=torch.float64)
    shape = prog.output_shape(x)
    got = prog.loss_output_hessians(x, y, shape)
    with torch.no_grad():
        out = model(x)
    ref = prog.loss_output_derivatives(out, y, shape)[1]
    assert got.shape == (6, 4, 4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_the_loss_rank_count_does_not_load_forward_ad():
    """A fresh process's estimation pass (diagonal estimator with the Gauss-Newton diagonal, the
    benchmark MLPs' path; the leverage's loss-rank count on the first batch) leaves torch's
    forward-AD decompositions unloaded (they were its largest first-call cost at 1e5 weights).
    The exact Hessian diagonal's own jvp still loads them where it is chosen."""
    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from mis_lightning.assess import run_estimation
        from mis_lightning.config import stage_configs
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        x = torch.randn(64, 8); y = torch.randn(64)
        loader = DataLoader(TensorDataset(x, y), batch_size=32)
        est_cfg, _, _ = stage_configs("assess", None, None, {"strict": False, "mode": "diagonal", "hessian": "ggn"})
        est = run_estimation(model, loader, lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, est_cfg)
        assert est.estimator.startswith("diagonal"), est.estimator
        print("loaded" if "torch._decomp.decompositions_for_jvp" in sys.modules else "not loaded")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "not loaded"
