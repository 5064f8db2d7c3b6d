"""Caches keyed by a tensor's address must not serve a table whose values changed: a value table
changed in place (or another table at a freed one's address) gets its own numbers. The release
codes' midpoints (``requantize._midpoints``) were keyed by ``data_ptr`` and size alone before s51
and returned the old table's midpoints; the fp16 / bf16 ties' moments (``table._TIE_MOMENTS``)
were keyed by ``id(layout)`` and the table's address, which a rebuilt layout can take over."""

from __future__ import annotations

import torch

from mis_lightning.functional import table as T
from mis_lightning.quantization import requantize


def test_midpoints_follow_a_table_changed_in_place():
    values = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float32)
    assert torch.equal(requantize._midpoints(values), torch.tensor([-0.5, 1.0], dtype=torch.float64))
    values[2] = 4.0  # same address, same size: the old key
    assert torch.equal(requantize._midpoints(values), torch.tensor([-0.5, 2.0], dtype=torch.float64))
    values[2] = 2.0  # and back
    assert torch.equal(requantize._midpoints(values), torch.tensor([-0.5, 1.0], dtype=torch.float64))


def test_midpoints_of_a_new_table_at_a_freed_address():
    """Tables allocated and freed in turn (the allocator hands the same address back as often as
    not): each call reads its own table's midpoints."""
    for k in range(1, 40):  # (freed at once by reference counting: no collection needed)
        values = torch.tensor([-1.0, 0.0, float(k)], dtype=torch.float32)
        got = requantize._midpoints(values)
        assert torch.equal(got, torch.tensor([-0.5, k / 2], dtype=torch.float64)), k
        del values


def test_table_layouts_never_share_a_serial():
    """The ties' cache key reads ``layout.serial``: a layout built after another was freed does
    not take its key (``id`` of a freed object is reused by CPython)."""
    seen = set()
    for k in range(8):
        values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0 + k], dtype=torch.float64)
        layout = T.TableLayout(values, torch.device("cpu"))
        assert layout.serial not in seen
        seen.add(layout.serial)
        del layout
