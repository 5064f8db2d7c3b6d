"""Peak bytes of the tensors torch allocates inside a block (tests of memory bounds).

A ``TorchDispatchMode`` sees every tensor an ATen operation returns; an output whose storage is
not one of the operation's inputs' is a new allocation (views and in-place results alias an
input and are not counted). Each new storage is counted while any tensor seen on it is alive
(weak references), so ``peak`` is the largest total of new, live tensor bytes during the block.
Memory an operation uses internally without returning it (LAPACK workspaces) is not seen: the
figure is a lower bound of the RSS rise, exact for what the library's own code keeps alive.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as lb: ...``; then ``lb.peak`` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage data_ptr -> [live tensors seen, bytes]

    def _drop(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                if key in inputs:  # an alias of a tensor from before the block
                    continue
                entry = self._refs[key] = [0, st.nbytes()]
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
            entry[0] += 1
            weakref.finalize(t, self._drop, key)
        return out
