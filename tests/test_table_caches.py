"""The per-table caches' identity fast path (tb35): a value tensor seen before and unmodified
returns its entry without comparing its values (``runs.per_table``) or re-keying its bytes
(``interp.interp_table``); a modified one (its version bumped in place), or an entry replaced
in the cache, is never served stale."""

from __future__ import annotations

import torch

import mis_lightning.functional.interp as I
import mis_lightning.functional.table as T
from mis_lightning.quantization.casts import representable_values


def test_table_layout_identity_and_in_place_change():
    values = representable_values(torch.float16).clone()
    dev = torch.device("cpu")
    a = T.table_layout(values, dev)
    assert T.table_layout(values, dev) is a  # the fast path: the same object
    values.mul_(2.0)  # in place: same address and size, new version
    b = T.table_layout(values, dev)
    assert b is not a and torch.equal(b.values, values.to(torch.float64))
    assert torch.equal(b.mids, 0.5 * (b.values[1:] + b.values[:-1]))


def test_interp_table_identity_and_replaced_entry(monkeypatch):
    values = representable_values(torch.float8_e4m3fn).clone()
    t = I.interp_table(values)
    assert t is not None and I.interp_table(values) is t
    key = values.to(torch.float64).numpy().tobytes()
    fresh = I.InterpTable(values.to(torch.float64))
    monkeypatch.setitem(I._TABLES, key, fresh)  # a test (or a rebuild) replaces the entry
    assert I.interp_table(values) is fresh
    values.mul_(1.0)  # a new version (same values): re-keyed, the same entry
    assert I.interp_table(values) is fresh
    assert I.interp_table(torch.arange(300, dtype=torch.float64)) is None  # over 256 values


def test_seen_table_is_not_compared_again(monkeypatch):
    """The fast path itself (fails before tb35: every call compared the 65k values)."""
    values = representable_values(torch.bfloat16).clone()
    dev = torch.device("cpu")
    T.table_layout(values, dev)
    I.interp_table(values)
    calls = []
    real = torch.equal
    monkeypatch.setattr(torch, "equal", lambda *a: calls.append(1) or real(*a))
    real_bytes = torch.Tensor.numpy
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: calls.append(2) or real_bytes(self, *a, **k))
    T.table_layout(values, dev)
    I.interp_table(values)
    assert not calls
