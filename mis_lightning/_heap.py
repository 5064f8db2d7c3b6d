"""The C heap's mmap threshold, raised once per process before the first large pass.

glibc's ``malloc`` serves a block at least its *mmap threshold* long (128 KiB at start) with a
fresh ``mmap`` and returns it to the kernel when freed, so its pages are faulted in and zeroed
again on every use. Its threshold is dynamic: freeing such a block raises the threshold to
that block's size (up to 32 MiB on 64-bit, ``DEFAULT_MMAP_THRESHOLD_MAX``) and the heap's trim
threshold to twice it, after which blocks of up to that size are taken from the heap and reused.
A fresh process gets there only after the estimation's and scoring's own temporaries of growing
size have been mapped, faulted in and unmapped: the 1e5 benchmark MLP's first assessment took
70-82k minor page faults (0.95 s CPU). :func:`raise_mmap_threshold` allocates and frees one
block of :data:`HEAP_PRIME_BYTES` at the start of
:func:`~mis_lightning.estimation.estimate` and :func:`~mis_lightning.assess.score_schemes`,
which takes the threshold to that size at once (the block is never written: no page of it is
faulted in). glibc would have adapted the same way after a large enough temporary; nothing is
set for the process (no ``mallopt``: the threshold stays dynamic, as the user's process had it).

Only on Linux (through the process's own ``malloc`` and ``free``, the ones torch's CPU allocator
calls); elsewhere nothing is done. Under another ``malloc`` (musl, jemalloc preloaded) it is one
allocation and free of untouched memory: harmless. Measured figures: docs/benchmarks.md, "pf40".
"""

from __future__ import annotations

import ctypes
import sys

# Bytes of the block allocated and freed once: below glibc's largest dynamic mmap threshold on
# 64-bit (32 MiB: a block above it leaves the threshold where it was) and above the chunk-sized
# float64 temporaries of the scoring pass (2 MiB per 2^18-weight chunk) and the estimation's
# per-batch buffers of the benchmark MLPs (a few MiB), so that those are reused from the heap.
HEAP_PRIME_BYTES = 30 << 20
# False: no block (A/B benchmarks; a process where it is not wanted)
RAISE_MMAP_THRESHOLD = True

_done = False


def raise_mmap_threshold() -> None:
    """Allocate and free one untouched ``HEAP_PRIME_BYTES`` block, once per process (a no-op after
    the first call, off Linux, or with :data:`RAISE_MMAP_THRESHOLD` False). Raises nothing: a
    C library that cannot be loaded, or an allocation that fails, only forgoes the saving."""
    global _done
    if _done or not RAISE_MMAP_THRESHOLD or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        libc = ctypes.CDLL(None)  # the process's symbols: the malloc torch's allocator calls
        malloc, free = libc.malloc, libc.free
        malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        free.restype, free.argtypes = None, [ctypes.c_void_p]
        # (not a torch tensor: with deterministic algorithms on, torch fills new tensors, which
        # would fault the block in)
        block = malloc(HEAP_PRIME_BYTES)  # never written, so never faulted in
        if block:
            free(block)
    except (OSError, AttributeError):
        pass
