"""Models that ``copy.deepcopy`` cannot copy: the step and the attribute are named, and a
non-leaf tensor kept on the module (``self.last_out = out``) no longer fails every scheme."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mis_lightning as ml
from mis_lightning._modelcopy import ModelCopyError, private_copy


def mse(o, t):
    return 0.5 * (o.squeeze(-1) - t) ** 2


class _Holder(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 1)
        self.lock = threading.Lock()  # e.g. a cache guard


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 4, generator=g)
    y = X[:, 0] + 0.1 * torch.randn(200, generator=g)
    return X, DataLoader(TensorDataset(X, y), batch_size=50)


def test_non_leaf_tensor_attribute_is_copied_detached():
    X, dl = _data()
    torch.manual_seed(0)
    m = nn.Linear(4, 1)
    ref = ml.assess(m, ["rtn_int4"], dl, mse, num_records=64, uncertainty_draws=0)
    out = m(X[:4])
    m.last_out = out  # non-leaf: copy.deepcopy(m) raises "Only Tensors created explicitly ..."
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(m)
    rep = ml.assess(m, ["rtn_int4"], dl, mse, num_records=64, uncertainty_draws=0)
    # the attribute plays no part in the figures: exactly the same number as without it
    assert rep.schemes["rtn_int4"].leakage == ref.schemes["rtn_int4"].leakage
    assert m.last_out is out and out.grad_fn is not None  # the user's attribute untouched
    c = private_copy(m, "test")
    assert c.last_out is not out and torch.equal(c.last_out, out) and c.last_out.grad_fn is None


def test_uncopyable_attribute_names_step_attribute_and_module():
    X, dl = _data()
    m = nn.Sequential(_Holder())
    msg = ("copying the model for scheme 'rtn_int4': attribute 'lock' of submodule '0' (_Holder) "
           "cannot be deep-copied (TypeError: cannot pickle '_thread.lock' object). The library "
           "quantizes and evaluates private copies so that your model is never changed: delete "
           "the attribute before assessing (del model.0.lock)")
    with pytest.raises(ModelCopyError) as info:
        ml.assess(m, ["rtn_int4"], dl, mse, num_records=64, uncertainty_draws=0)
    assert str(info.value).startswith(msg)
    assert isinstance(info.value.__cause__, TypeError)
    rep = ml.assess(m, ["rtn_int4", "none"], dl, mse, num_records=64, uncertainty_draws=0, strict=False)
    assert rep.schemes["rtn_int4"].error.startswith("ModelCopyError: " + msg)
