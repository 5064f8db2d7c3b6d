"""The library's RNG isolation (:mod:`mis_lightning._rng`) keeps the caller's global streams
(torch, numpy, random) without importing lightning_fabric: that import (with torchmetrics) was
~1 s CPU of a first call in a process that had not imported Lightning (pf29)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mis_lightning._rng import isolated_rng

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raises", [False, True])
def test_isolated_rng_restores_torch_numpy_and_random(raises):
    """After the block (returned or raised) the next draws of torch, numpy and random are the
    ones they would have been without it."""
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    try:
        with isolated_rng():
            torch.rand(100), np.random.rand(100), random.random()
            if raises:
                raise KeyError("inside")
    except KeyError:
        assert raises
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_an_assessment_does_not_import_lightning_fabric():
    """A fresh process's estimation and scoring (a small MLP, one scheme) leave lightning_fabric
    and torchmetrics unimported."""
    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from mis_lightning.assess import run_estimation, score_schemes
        from mis_lightning.config import stage_configs
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        x = torch.randn(64, 8); y = torch.randn(64)
        est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False})
        est = run_estimation(model, DataLoader(TensorDataset(x, y), batch_size=32),
                             lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, est_cfg)
        score_schemes(est, model, ["rtn_int4"], scoring_config=sc_cfg)
        print(sorted(m for m in ("lightning_fabric", "torchmetrics") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
