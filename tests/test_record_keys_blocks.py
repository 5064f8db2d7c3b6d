"""Record keys summed exactly before one reduction per block keep every key (pf23, issue 14's
CNN: the int64 remainder per byte was a third of the hashing's time); and the convolution
patches the per-layer estimation multiplies are the layer's own windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mis_lightning.estimation.records as records
from mis_lightning.estimation.linear_factors import _patches
from mis_lightning.estimation.records import _P31, _hash_weights, _index_weights, record_keys

CONVS = [
    (nn.Conv1d(4, 6, 3, padding=1), (5, 4, 11)),
    (nn.Conv2d(3, 8, 3, padding=1), (5, 3, 9, 7)),
    (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), groups=2), (3, 4, 10, 9)),
    (nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), (2, 3, 8, 8)),
    (nn.Conv2d(6, 6, 1, groups=3), (4, 6, 5, 5)),
    (nn.Conv3d(2, 4, 2, stride=2, groups=2), (2, 2, 6, 4, 4)),
]


@pytest.mark.parametrize("mod,shape", CONVS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_patches_are_the_im2col_windows_and_give_the_layer(mod, shape):
    """``[B, groups, C_in/G * prod(k), positions]`` holding exactly the windows (bitwise against
    ``F.unfold`` in 2-d), and the layer's output is the flattened kernel times the patches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    mod = mod.double()
    u = _patches(mod, x)
    b, G = x.shape[0], mod.groups
    out = mod(x)
    P = out[0, 0].numel()
    K = mod.weight[0].numel()
    assert u.shape == (b, G, K, P)
    if x.dim() == 4:
        xp, pad = x, mod.padding
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            xp, pad = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode), 0
        ref = F.unfold(xp, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)
        assert torch.equal(u, ref.reshape(b, G, K, P))
    w = mod.weight.reshape(G, -1, K)  # [G, O/G, K]
    y = torch.einsum("gok,bgkp->bgop", w, u).reshape(out.shape) + mod.bias.reshape(1, -1, *[1] * (x.dim() - 2))
    torch.testing.assert_close(y, out, rtol=1e-12, atol=1e-12)


def _reference_keys(leaves, b):
    """record_keys' definition: every byte's product reduced modulo 2^31 - 1, then summed; an
    integer row's trailing run of a negative value (padding: an ignore_index) read as zeros. A
    record of several dimensions weighs its bytes by their multi-index (``_index_weights``) and
    reads each last-dimension row's trailing negative run as zeros (nu44b)."""
    h = torch.zeros(b, dtype=torch.int64)
    for i, t in enumerate(leaves):
        several = t.dim() > 2
        raw = t.reshape(-1, t.shape[-1]) if several else t.reshape(b, -1)
        raw = raw.to(torch.float64) if raw.is_floating_point() else raw.to(torch.int64).clone()
        if not raw.is_floating_point():
            for row in raw:
                last, j = int(row[-1]), row.numel()
                while last < 0 and row.numel() > 1 and j > 0 and int(row[j - 1]) == last:
                    j -= 1
                if last < 0 and row.numel() > 1:
                    row[j:] = 0
        by = raw.contiguous().reshape(b, -1).view(torch.uint8).to(torch.int64)
        w = _index_weights(i, (*t.shape[1:], 8)) if several else _hash_weights(i, by.shape[1])
        h = (h * 1_000_003 + (by * w % _P31).sum(1)) % _P31
    return h


@pytest.mark.parametrize("block", [None, 40, 1000])
def test_record_keys_equal_the_per_byte_reduction_over_any_block_of_exact_sums(monkeypatch, block):
    """Summing the products exactly (int64) and reducing once per block gives the keys of
    reducing every product; ``block`` cuts the records' bytes into several blocks."""
    if block is not None:
        monkeypatch.setattr(records, "_SUM_BLOCK", block)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 3, 5, 5, generator=g) * 1e30  # large exponents: all byte values
    ids = torch.randint(-2 ** 62, 2 ** 62, (9, 17), generator=g)
    ids[:4, -3:] = -100  # padded with an ignore index: hashed as zeros
    edges = torch.randint(0, 40, (9, 2, 6), generator=g)
    edges[:3, :, -2:] = -1  # an edge list padded with -1: each row's trailing run hashed as zeros
    y = torch.randint(0, 10, (9,), generator=g)
    got = record_keys((x, ids, edges, y), None, 9)
    assert torch.equal(got, _reference_keys([x, ids, edges, y], 9))
    assert int(got.min()) >= 0 and int(got.max()) < _P31


def test_the_exact_block_sum_cannot_overflow():
    """255 x (2^31 - 2) per byte over a block, plus the running sum below 2^31 - 1: below 2^63."""
    assert records._SUM_BLOCK * 255 * (_P31 - 1) + _P31 < 2 ** 63


def test_the_float64_block_sums_are_exact_at_their_largest():
    """The keys' float64 GEMM (pf28: the weights in 16-bit halves) sums at most 2^20 products
    below 255 x 2^16 per block: below 2^53, exact in any order. Checked at the limit: records of
    only 0xFF bytes, one full block and a partial one, against the per-byte int64 reduction."""
    assert records._SUM_BLOCK * 255 * 0xFFFF < 2 ** 53
    n = (records._SUM_BLOCK + 4096) // 8
    x = torch.full((2, n), -1, dtype=torch.int64)  # every byte 0xFF
    x[1, ::7] = 2 ** 62 + 12345  # and a record of other bytes
    x[:, -1] = -2  # no trailing run of its last value: every -1 is hashed as it is
    got = record_keys(x, None, 2)
    assert torch.equal(got, _reference_keys([x], 2))
