"""Random draws that are a function of the record, not of its place in the data stream.

The sampled-label Gauss-Newton diagonal (``hessian="ggn_mc"``, method.md section 4, "Monte
Carlo Gauss-Newton") draws, per record, a label from the model's predictive distribution or
Rademacher signs. Drawn from one generator in batch order, the figure depended on the order
and the split of the records (another batch size, a shuffle, a DDP shard: 0.5895 vs 0.5874 on
a 10-class head, DDP vs one process). Here each draw is a counter-based hash of ``(seed,
record content key, draw index)`` (:func:`~mis_lightning.estimation.records.record_keys`):
the same records and weights give the same draws however they are batched, ordered or
sharded. The hash is a 32-bit integer mixer (Wellons' ``triple32``) evaluated in int64 torch
ops (every product below ``2^63``), vectorised over the batch, on the keys' device.

Law: per record, for a seed drawn at random, the words are uniform; a label drawn by inverse
CDF of a 53-bit uniform has probability ``p_c`` up to float64 rounding of the cumulative sums
(~1e-16), and a sign is one bit of a uniform 32-bit word (probability 1/2 exactly), so
``E[a a'] = L`` holds per record as before. Records with the same content (duplicates) get the
same draws: still unbiased, their Monte Carlo errors are no longer independent.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in ``[0, 2^32)`` without int64 overflow (``c`` split
    in 16-bit halves: each partial product is below ``2^48``)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """Wellons' ``triple32`` integer hash: a bijection of ``[0, 2^32)`` whose output bits each
    flip with probability 1/2 +- 2e-4 on an input bit's flip (the best known three-round one)."""
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ (x >> 14)


def _mix32_int(x: int) -> int:
    """:func:`_mix32` on one Python int (the per-draw-index constants)."""
    for sh, c in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
        x = ((x ^ (x >> sh)) * c) & _M32
    return x ^ (x >> 14)


@functools.lru_cache(maxsize=64)
def _index_words(s: int, words: int) -> tuple[int, ...]:
    """The draw indices' 32-bit constants ``mix(s + (j + 1) * golden)``, ``j < words``."""
    return tuple(_mix32_int((s + (j + 1) * 0x9E3779B9) & _M32) for j in range(words))


def _fold_seed(seed: int, stream: int) -> int:
    """A 64-bit seed and a stream number as one 32-bit word."""
    s = int(seed) & ((1 << 64) - 1)
    return ((s & _M32) ^ (s >> 32) ^ ((stream * 0x85EBCA6B) & _M32)) & _M32


def record_words(keys: Tensor, seed: int, words: int, stream: int = 0) -> Tensor:
    """``[b, words]`` int64 uniform 32-bit words (values in ``[0, 2^32)``), word ``j`` of record
    ``r`` a function of ``(seed, stream, keys[r], j)`` only: ``mix(mix(key ^ s) ^ c_j)`` with
    ``s`` the folded seed and ``c_j`` a hashed constant per index (two hashes per word, 3 int64
    passes each over ``[b, words]``: the cost is torch's per-op overhead at these sizes).

    Args:
        keys: ``[b]`` int64 record content keys (non-negative, below ``2^31``:
            :func:`~mis_lightning.estimation.records.record_keys`); their device is the output's.
        seed: the scoring seed (any int; folded to 32 bits).
        words: words per record (``>= 1``).
        stream: separates independent uses of the same keys and seed.

    Raises:
        ValueError: ``keys`` not a 1-D integer tensor, or ``words < 1``.
    """
    if keys.dim() != 1 or keys.is_floating_point() or keys.is_complex():
        raise ValueError(f"record keys must be a 1-D integer tensor, got {tuple(keys.shape)} {keys.dtype}")
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    s = _fold_seed(seed, stream)
    h = _mix32((keys.to(torch.int64) & _M32) ^ s).unsqueeze(1)  # [b, 1]
    c = torch.tensor(_index_words(s, words), dtype=torch.int64, device=keys.device)
    return _mix32(h ^ c)


def record_uniforms(keys: Tensor, seed: int, draws: int, stream: int = 0) -> Tensor:
    """``[b, draws]`` float64 uniforms in ``(0, 1)`` with 53 random bits (two words of
    :func:`record_words`), each a function of ``(seed, stream, key, draw index)``."""
    w = record_words(keys, seed, 2 * draws, stream)
    return ((w[:, 0::2] << 21) + (w[:, 1::2] >> 11)).to(torch.float64).add_(0.5).mul_(2.0 ** -53)


def record_labels(p: Tensor, keys: Tensor, seed: int, samples: int, stream: int = 0) -> Tensor:
    """``[samples, b]`` int64 labels, label ``s`` of record ``r`` drawn from the distribution
    ``p[r]`` (``[b, C]``, rows summing to 1) by inverse CDF of :func:`record_uniforms`."""
    u = record_uniforms(keys.to(p.device), seed, samples, stream)  # [b, S]
    cdf = torch.cumsum(p.to(torch.float64), -1)  # [b, C]
    y = torch.searchsorted(cdf, u, right=True)  # the first c with cdf_c > u
    return y.clamp_(max=p.shape[-1] - 1).T


def record_signs(keys: Tensor, seed: int, samples: int, width: int, stream: int = 0) -> Tensor:
    """``[samples, b, width]`` float64 Rademacher signs (``+-1``, each 1/2), entry ``(s, r, k)`` a
    function of ``(seed, stream, keys[r], s * width + k)`` (the low bit of a uniform word)."""
    w = record_words(keys, seed, samples * width, stream)
    return ((w & 1).to(torch.float64) * 2 - 1).reshape(-1, samples, width).transpose(0, 1)
