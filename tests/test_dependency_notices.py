"""Third-party notices the library's own calls raise are silenced around those calls only (ux29:
torch's ``KernelPreference`` register_constant notice at torchao's import, and torch's
``torch.quantize_per_tensor ... deprecated`` from native_int8_dynamic, came before the table).
The user's own warnings and log records are never filtered."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
from torch import nn

from mis_lightning.quantization import get_scheme
from mis_lightning.quantization.native import (
    _DEPRECATED_QUANTIZATION,
    quiet_deprecated_quantization,
)
from mis_lightning.quantization.torchao_backend import _torchao_import_notices_filtered

# torch 2.13's words (torch/utils/_pytree.py), logged at torchao's first import
KERNEL_PREFERENCE = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                     "type. Calling register_constant() on Enum subclasses is deprecated and will be an error in a "
                     "future release.")


def test_torchaos_enum_registration_notice_is_dropped_during_its_import_only(caplog):
    log = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        with _torchao_import_notices_filtered():
            log.warning(KERNEL_PREFERENCE, "<enum 'KernelPreference'>")
            log.warning("another pytree notice")  # not torchao's: kept
        log.warning(KERNEL_PREFERENCE, "<enum 'UserEnum'>")  # after the import: the user's, kept
    got = [r.getMessage() for r in caplog.records]
    assert got == ["another pytree notice", KERNEL_PREFERENCE % "<enum 'UserEnum'>"]


@pytest.mark.parametrize("scheme", ["native_int8_dynamic", "native_int8_per_row"])
def test_native_schemes_raise_no_deprecation_notice_and_leave_the_filters_as_they_were(scheme):
    """On the old code torch.ao.quantization's DeprecationWarning came out of every
    native_int8_dynamic call (the quantized tensors' UserWarning is once per process: an earlier
    test may have used it up, so only its absence is asserted)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        inner = list(warnings.filters)
        res = get_scheme(scheme).apply(net)
        assert warnings.filters == inner  # nothing left behind by the library's scope
    assert warnings.filters == before
    assert res.grids  # quantized
    noisy = [str(w.message)[:80] for w in rec
             if any(issubclass(w.category, c) and re.search(m, str(w.message)) for c, m in _DEPRECATED_QUANTIZATION)]
    assert noisy == []


def test_the_users_own_warnings_pass_through_the_scope():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with quiet_deprecated_quantization():
            warnings.warn("the user's own deprecation", DeprecationWarning, stacklevel=1)
            warnings.warn("torch.ao.quantization is deprecated", DeprecationWarning, stacklevel=1)  # ours
        warnings.warn("torch.ao.quantization is deprecated", DeprecationWarning, stacklevel=1)  # outside: kept
    assert [str(w.message) for w in rec] == ["the user's own deprecation", "torch.ao.quantization is deprecated"]
