"""Third-party notices the library's own calls raise are silenced around those calls only (ux29:
torch's ``KernelPreference`` register_constant notice at torchao's import, and torch's
``torch.quantize_per_tensor ... deprecated`` from native_int8_dynamic, came before the table).
The user's own warnings and log records are never filtered."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from mis_lightning.quantization.native import quiet_deprecated_quantization
from mis_lightning.quantization.torchao_backend import _torchao_import_notices_filtered

ROOT = Path(__file__).resolve().parents[1]
# torch 2.13's words (torch/utils/_pytree.py), logged at torchao's first import
KERNEL_PREFERENCE = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                     "type. Calling register_constant() on Enum subclasses is deprecated and will be an error in a "
                     "future release.")
QINT8 = ("torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation functions that "
         "produce tensors with dtype torch.quint8, torch.qint8, and torch.qint32 are deprecated")


def test_torchaos_enum_registration_notice_is_dropped_during_its_import_only(caplog):
    log = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        with _torchao_import_notices_filtered():
            log.warning(KERNEL_PREFERENCE, "<enum 'KernelPreference'>")
            log.warning("another pytree notice")  # not torchao's: kept
        log.warning(KERNEL_PREFERENCE, "<enum 'UserEnum'>")  # after the import: the user's, kept
    got = [r.getMessage() for r in caplog.records]
    assert got == ["another pytree notice", KERNEL_PREFERENCE % "<enum 'UserEnum'>"]


FRESH = """
import warnings
import torch
from torch import nn
from mis_lightning.quantization import get_scheme
net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
for name in ("int8_weight_only", "native_int8_dynamic"):  # torchao's first import; torch.ao's qint8 tensors
    assert get_scheme(name).apply(net).grids
warnings.warn("the user's own notice")
"""


def test_a_fresh_process_shows_no_dependency_notice_and_the_users_own_warning():
    """torchao's import and the qint8 notice come once per process: a fresh one shows them (the
    old code printed both to stderr: "<enum 'KernelPreference'> is an Enum subclass ..." and
    "UserWarning: torch.quantize_per_tensor, ... are deprecated")."""
    proc = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the user's own notice" in proc.stderr
    assert "KernelPreference" not in proc.stderr and "register_constant" not in proc.stderr
    assert "quantize_per_tensor" not in proc.stderr


def test_the_users_own_warnings_pass_through_the_scope():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with quiet_deprecated_quantization():
            warnings.warn("the user's own notice", UserWarning, stacklevel=1)
            warnings.warn(QINT8, UserWarning, stacklevel=1)  # torch's, raised by the library's call: dropped
        warnings.warn(QINT8, UserWarning, stacklevel=1)  # outside: kept
    assert [str(w.message) for w in rec] == ["the user's own notice", QINT8]
