"""torchao's import-time notices about optional GPU kernel libraries it cannot load on a CPU
machine ("Failed to load .../_C_mxfp8...so", "Detected no triton") are not about the CPU schemes:
whichever library path imports torchao first does it through the filtered import (fu25 saw them
in every plain-Python ``assess``: the layer filter imported torchao unfiltered)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import torch, torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset
    import mis_lightning as ml
    torch.manual_seed(0)
    X = torch.randn(64, 4); y = X.sum(-1)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    ml.assess(m, ["int8_weight_only"], DataLoader(TensorDataset(X, y), batch_size=32),
              lambda o, t: (o[:, 0] - t) ** 2, strict=False, uncertainty_draws=0)
    print("done")
""")


def test_first_torchao_import_of_an_assessment_prints_no_kernel_notices():
    """A fresh interpreter: ``assess`` with a torchao scheme prints none of the notices (this can
    only fail on a machine where torchao cannot load those libraries, as the CPU machines here)."""
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done" in run.stdout
    assert "Failed to load" not in run.stderr and "Detected no triton" not in run.stderr, run.stderr[-2000:]
