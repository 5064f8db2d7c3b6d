"""The version counter the caches key on, for every tensor kind.

A cache that reuses what it computed from a tensor object while ``t._version`` is unchanged (the
run / interpolation / layout tables, the grids' chunk facts, the power caches) cannot read the
counter of an inference tensor (made under ``torch.inference_mode``: it keeps none, and reading
``_version`` raises "Inference tensors do not track version counter"); such a tensor can still be
written in place inside inference mode, unseen. :func:`tensor_version` gives ``None`` there, and a
cache given ``None`` never takes that shortcut: it compares the values or recomputes (a
grid made by ``scheme.apply`` under inference mode failed in every ``moments`` call, and
``table_boundaries`` on an inference value table).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["tensor_version"]


def tensor_version(t: Tensor) -> int | None:
    """``t._version``, or ``None`` for an inference tensor (no version counter: a cache keyed on
    it must not hit)."""
    return None if t.is_inference() else t._version
