"""What a fresh interpreter imports (and prints) through the library's first calls: five
checks that each need a process that had not run them, in ONE subprocess, in an order where no
check can pass because of an earlier one (ts36: each was its own subprocess, ~5 CPU s apiece,
~3 s of it the interpreter's start and the torch and library imports; tc38 moved the fourth here
from tests/test_dependency_notices.py).

The order: an assessment with an rtn, a cast and a native scheme first (torchao, torch._dynamo
and sympy must stay unloaded: p46c), then the Gauss-Newton estimations (torch._dynamo, sympy and
the forward-AD decompositions must stay unloaded), then an assessment with an rtn scheme (lightning_fabric and
torchmetrics must stay unloaded), then ``assess`` with a torchao scheme, torchao's first import in
the process (asserted: not imported before), whose stderr must carry none of torchao's kernel
notices, then the dependency notices' part: a scheme built through ``get_scheme`` and the first
native (torch.ao) quantization of the process, then the user's own warning; the whole stderr must
carry torchao's import notice (logged at its import in the torchao part) and torch's qint8
deprecation (native_int8_dynamic's first call: no earlier part quantizes natively) nowhere, and
the user's warning. Each check asks whether a module is absent or a notice missing: the earlier
parts can only add modules or lines, so they can make a later check fail, never pass. (Moved here from
tests/test_loss_rank_hessian.py, tests/test_rng_isolation.py and tests/test_torchao_notices.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_FRESH_ESTIMATION = """
import sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from mis_lightning.assess import run_estimation
from mis_lightning.config import stage_configs
torch.manual_seed(0)
cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
runs = {"mse": (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)), torch.randn(64, 8), torch.randn(64),
                lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2),
        "cnn": (cnn, torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)),
                lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none")),
        "logcosh": (mlp, torch.randn(64, 8), torch.randn(64, 3), lambda o, t: torch.log(torch.cosh(o - t)).sum(-1))}
est_cfg, _, _ = stage_configs("assess", None, None, {"strict": False, "mode": "diagonal", "hessian": "ggn"})
for kind, (model, x, y, loss) in runs.items():
    est = run_estimation(model, DataLoader(TensorDataset(x, y), batch_size=32), loss, est_cfg)
    assert est.estimator.startswith("diagonal"), est.estimator
    print("estimation:", kind, "loaded" if "torch._decomp.decompositions_for_jvp" in sys.modules else "not loaded")
    if kind == "mse":  # no torch.func grad on a Linear-only model's first batch (the loss-rank count; pf30)
        print("estimation:", "dynamo", "imported" if "torch._dynamo" in sys.modules else "not imported")
        # no gradient tensor handed to autograd (its first import of sympy, ~0.4 s; es32)
        print("estimation:", "sympy", "imported" if "sympy" in sys.modules else "not imported")
"""

_NATIVE = """
import sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from mis_lightning.assess import run_estimation, score_schemes
from mis_lightning.config import stage_configs
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
x = torch.randn(64, 8); y = torch.randn(64)
est_cfg, sc_cfg, _ = stage_configs("assess", None, None, {"strict": False, "mode": "diagonal", "hessian": "ggn"})
est = run_estimation(model, DataLoader(TensorDataset(x, y), batch_size=32),
                     lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, est_cfg)
# the library's own rounding, a cast and a native (torch.ao) scheme: none needs torchao (p46c)
rep = score_schemes(est, model, ["rtn_int4", "bf16", "native_int4_per_row"], scoring_config=sc_cfg)
print("native:", sorted(k for k, r in rep.schemes.items() if r.error is None))
print("native:", sorted(m for m in ("torchao", "torch._dynamo", "sympy") if m in sys.modules))
"""

_FORWARD_AD = """
import sys, warnings, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from mis_lightning.assess import assess
JVP = "torch._decomp.decompositions_for_jvp"
print("jvp:", "loaded before" if JVP in sys.modules else "not loaded before")
torch.manual_seed(0)
x = torch.randn(64, 4); y = x.sum(-1)
model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    assess(model, ["rtn_int8"], DataLoader(TensorDataset(x, y), batch_size=32), lambda o, t: (o[:, 0] - t) ** 2,
           estimation="exact", uncertainty_draws=0, strict=False)
print("jvp:", "loaded" if JVP in sys.modules else "not loaded")
print("jvp:", sorted({str(w.message)[:40] for w in rec if issubclass(w.category, DeprecationWarning)}))
"""

_NO_FABRIC = """
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
print("rng:", sorted(m for m in ("lightning_fabric", "torchmetrics") if m in sys.modules))
"""

_TORCHAO_FIRST = """
import sys, torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
import mis_lightning as ml
print("torchao: imported before" if "torchao" in sys.modules else "torchao: first import next")
torch.manual_seed(0)
X = torch.randn(64, 4); y = X.sum(-1)
m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
seen = []
def loss(o, t):  # the estimation's first loss call: torchao imported by then (the scheme checks, up front)?
    if not seen:
        seen.append(1)
        print("torchao: imported before the estimation" if "torchao.quantization" in sys.modules
              else "torchao: not imported before the estimation")
    return (o[:, 0] - t) ** 2
ml.assess(m, ["int8_weight_only"], DataLoader(TensorDataset(X, y), batch_size=32), loss,
          strict=False, uncertainty_draws=0)
print("torchao: done")
"""

_NOTICES = """
import warnings
import torch
from torch import nn
from mis_lightning.quantization import get_scheme
net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
for name in ("int8_weight_only", "native_int8_dynamic"):  # torchao's scheme; torch.ao's qint8 tensors
    assert get_scheme(name).apply(net).grids
try:  # imports torchao.prototype.gptq (its Enum registration's notice), then needs CUDA
    get_scheme("gptq_int8_weight_only").check_available()
except Exception:
    pass
warnings.warn("the user's own notice")
print("notices: done")
"""

# each part in its own namespace (the same names are reused), one interpreter
_SCRIPT = "\n".join(f"exec(compile({part!r}, {name!r}, 'exec'), {{'__name__': '__main__'}})"
                    for name, part in (("native", _NATIVE), ("estimation", _FRESH_ESTIMATION), ("jvp", _FORWARD_AD),
                                       ("rng", _NO_FABRIC),
                                       ("torchao", _TORCHAO_FIRST), ("notices", _NOTICES)))


@pytest.fixture(scope="module")
def fresh():
    """The four parts' stdout lines by part (``{"estimation": [...], ...}``) and the process's stderr."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        part, sep, rest = line.partition(": ")
        if sep and part in ("native", "estimation", "jvp", "rng", "torchao", "notices"):
            lines.setdefault(part, []).append(rest)
    return lines, out.stderr


def test_gauss_newton_estimation_does_not_load_forward_ad(fresh):
    """A fresh process: the diagonal estimator with the Gauss-Newton diagonal on the benchmarks'
    kind of MLP (least squares; the leverage's loss-rank count on the first batch, pf28), on a small CNN
    (cross-entropy), then on an MLP with a log-cosh loss (the per-layer program's loss Hessian in
    the outputs, every batch) leaves torch's forward-AD decompositions unloaded (pf29: they loaded
    through ``_loss_derivatives``' torch.func.hessian on the CNN's first batch). The exact
    sandwich's jvp still loads them (``estimate.HESSIAN_FORWARD_AD``). The MLP's estimation does
    not import torch._dynamo either (pf30: the loss-rank count's torch.func ``grad`` did, ~1 s
    CPU, in a process that never ran an optimizer; now plain autograd), nor sympy (es32: the loss
    Hessian's batched backward handed autograd a gradient tensor, whose first use imports
    torch.fx.experimental.symbolic_shapes and sympy, ~0.4 s, most of a 1e5 MLP's estimation;
    fails on main). After the first part, which loads none of these."""
    assert fresh[0]["estimation"] == ["mse not loaded", "dynamo not imported", "sympy not imported",
                                      "cnn not loaded", "logcosh not loaded"]


def test_the_first_forward_ad_use_passes_on_no_torch_deprecation(fresh):
    """ux48: the process's first forward-AD dual tensor (the exact sandwich's jvp) imports torch's
    ``decompositions_for_jvp``, which calls ``torch.jit.script`` and raised its DeprecationWarning
    through ``MISIndicator.compute()``, ``assess`` and the callback; the library loads them first
    with that notice filtered (``per_sample.load_forward_ad_decompositions``). After the
    Gauss-Newton part, which leaves them unloaded (asserted), and before every part that loads
    them."""
    assert fresh[0]["jvp"] == ["not loaded before", "loaded", "[]"]


def test_an_assessment_does_not_import_lightning_fabric(fresh):
    """A fresh process's estimation and scoring (a small MLP, one scheme) leave lightning_fabric
    and torchmetrics unimported (the library's RNG isolation, :mod:`mis_lightning._rng`: that
    import with torchmetrics was ~1 s CPU of a first call in a process that had not imported
    Lightning; pf29). After the estimations of the first part, which import neither."""
    assert fresh[0]["rng"] == ["[]"]


def test_native_cast_and_rtn_schemes_import_no_torchao(fresh):
    """A fresh process's estimation (the diagonal Gauss-Newton one, which loads neither
    torch._dynamo nor sympy: the next part checks it) and scoring of ``rtn_int4`` (the
    library's own rounding), ``bf16`` (a cast) and ``native_int4_per_row`` (torch.ao's
    observer, fake quantization) import no torchao, nor what torchao's import pulls in a process
    that never ran an optimizer: torch._dynamo (``torchao.kernel.bsr_triton_ops``' ``from
    torch._dynamo.utils import warn_once``) and sympy, ~1.2 s CPU (docs/benchmarks.md, "p46c").
    Fails if the registry's scan, a backend module or a shared scoring path imports torchao for
    every scheme; the three schemes are checked scored. The first part of the process. Of the
    native schemes only ``native_int4_per_row``: it creates no qint8 tensor, whose
    once-per-process deprecation notice the last part checks is filtered (``native_int8_*``
    would use that once up here)."""
    assert fresh[0]["native"] == ["['bf16', 'native_int4_per_row', 'rtn_int4']", "[]"]


def test_first_torchao_import_of_an_assessment_prints_no_kernel_notices(fresh):
    """torchao's import-time notices about optional GPU kernel libraries it cannot load on a CPU
    machine ("Failed to load .../_C_mxfp8...so", "Detected no triton") are not about the CPU
    schemes: whichever library path imports torchao first does it through the filtered import
    (fu25 saw them in every plain-Python ``assess``: the layer filter imported torchao
    unfiltered). ``assess`` with a torchao scheme is torchao's first import in the process (the
    earlier parts do not import it: asserted), and the process's whole stderr is checked. This
    can only fail on a machine where torchao cannot load those libraries, as the CPU machines
    here. The import comes before the estimation's first loss call (``assess``' scheme checks
    read the scheme's layer filter, torchao's own), as the Metric's construction, the callback's
    ``setup`` and the app's availability check do theirs: no front end pays it between the
    estimation and the scoring (docs/benchmarks.md "p59b": a background-thread import beside the
    estimation did not overlap it)."""
    lines, stderr = fresh
    assert lines["torchao"] == ["first import next", "imported before the estimation", "done"]
    assert "Failed to load" not in stderr and "Detected no triton" not in stderr, stderr[-2000:]


def test_a_fresh_process_shows_no_dependency_notice_and_the_users_own_warning(fresh):
    """torchao's import and the qint8 notice come once per process: a fresh one shows them (the
    old code printed both to stderr: "<enum 'KernelPreference'> is an Enum subclass ..." and
    "UserWarning: torch.quantize_per_tensor, ... are deprecated"; nux43: torchao.prototype.gptq's
    "<enum 'ScaleCalculationMode'> ..." at a GPTQ scheme's availability check, as in
    examples/all_schemes.py). The last part of the process
    (its own subprocess before tc38: tests/test_dependency_notices.py): torchao was imported by
    the part before, whose import notice the whole stderr is checked for."""
    lines, stderr = fresh
    assert lines["notices"] == ["done"]
    assert "the user's own notice" in stderr
    assert "KernelPreference" not in stderr and "register_constant" not in stderr
    assert "ScaleCalculationMode" not in stderr  # nux43: torchao.prototype.gptq's, at a GPTQ scheme's check
    assert "quantize_per_tensor" not in stderr
