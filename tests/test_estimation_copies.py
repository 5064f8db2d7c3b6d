"""The estimation pass's copies and conversions cut for speed keep every value (pf23, issue 14's
CNN): convolution patches copied once into their GEMM layout, chunk sums added to float64 sums
without a converted copy, record keys summed exactly before one reduction per block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mis_lightning.estimation.records as records
from mis_lightning.estimation.linear_factors import _patches
from mis_lightning.estimation.records import _P31, _hash_weights, record_keys

CONVS = [
    (nn.Conv1d(4, 6, 3, padding=1), (5, 4, 11)),
    (nn.Conv2d(3, 8, 3, padding=1), (5, 3, 9, 7)),
    (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), groups=2), (3, 4, 10, 9)),
    (nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), (2, 3, 8, 8)),
    (nn.Conv2d(6, 6, 1, groups=3), (4, 6, 5, 5)),
    (nn.Conv3d(2, 4, 2, stride=2, groups=2), (2, 2, 6, 4, 4)),
]


@pytest.mark.parametrize("mod,shape", CONVS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_patches_are_the_transposed_im2col_contiguous_and_give_the_layer(mod, shape):
    """``[B, G, positions, C_in/G * prod(k)]``, contiguous, holding exactly the windows: the
    layer's output is the patches times the flattened kernel (one batched GEMM per chunk)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    mod = mod.double()
    u = _patches(mod, x)
    b, G = x.shape[0], mod.groups
    out = mod(x)
    P = out[0, 0].numel()
    K = mod.weight[0].numel()
    assert u.shape == (b, G, P, K) and u.is_contiguous()
    if x.dim() == 4:  # against F.unfold's im2col [B, C * prod(k), P], bitwise (a pure copy)
        xp = x
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            xp = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
            pad = 0
        else:
            pad = mod.padding
        ref = F.unfold(xp, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)
        ref = ref.reshape(b, G, K, P).transpose(-1, -2)
        assert torch.equal(u, ref)
    w = mod.weight.reshape(G, -1, K)  # [G, O/G, K]
    y = torch.einsum("bgpk,gok->bgop", u, w).reshape(out.shape) + mod.bias.reshape(1, -1, *[1] * (x.dim() - 2))
    torch.testing.assert_close(y, out, rtol=1e-12, atol=1e-12)


def test_acc_add_equals_adding_the_converted_tensor_bit_for_bit():
    from mis_lightning.estimation.linear_factors import _acc_add

    g = torch.Generator().manual_seed(1)
    a = torch.zeros(5000, dtype=torch.float64)
    ref = a.clone()
    for _ in range(20):
        x = torch.randn(5000, generator=g) * 1e3  # float32
        _acc_add(a, x)
        ref += x.to(torch.float64)
    assert torch.equal(a, ref)
    lo = torch.zeros(7, dtype=torch.float32)  # a float64 tensor into float32 sums: converted first
    x = torch.full((7,), 1 + 2 ** -40, dtype=torch.float64)
    _acc_add(lo, x)
    assert torch.equal(lo, torch.ones(7))


def _reference_keys(leaves, b):
    """record_keys' definition: every byte's product reduced modulo 2^31 - 1, then summed."""
    h = torch.zeros(b, dtype=torch.int64)
    for i, t in enumerate(leaves):
        raw = t.reshape(b, -1)
        raw = raw.to(torch.float64) if raw.is_floating_point() else raw.to(torch.int64)
        by = raw.contiguous().view(torch.uint8).to(torch.int64)
        w = _hash_weights(i, by.shape[1])
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
    y = torch.randint(0, 10, (9,), generator=g)
    got = record_keys((x, ids, y), None, 9)
    assert torch.equal(got, _reference_keys([x, ids, y], 9))
    assert int(got.min()) >= 0 and int(got.max()) < _P31
