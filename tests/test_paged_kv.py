"""Paged KV writes against the plain-PyTorch reference, bit for bit."""

import pytest
import torch

from adsc_ext import write_paged_kv
from adsc_ext.reference import write_paged_kv_reference
from conftest import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
HEAD_SHAPES = [(2, 8), (1, 3), (4, 64)]  # (num_kv_heads, head_dim); (1, 3) has odd rows
BLOCK_SIZES = [1, 4, 16]


def random_tensor(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype).to(device)
    return torch.randint(-100, 100, shape, generator=g).to(dtype).to(device)


def case(dtype, heads, block_size, device, num_tokens=13, num_blocks=6, seed=0):
    key = random_tensor((num_tokens, *heads), dtype, device, seed)
    value = random_tensor((num_tokens, *heads), dtype, device, seed + 1)
    caches = [random_tensor((num_blocks, block_size, *heads), dtype, device, seed + 2 + i)
              for i in range(2)]
    g = torch.Generator().manual_seed(seed + 5)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    if slots.numel() < num_tokens:  # fewer slots than tokens: the rest are padding
        slots = torch.cat([slots, torch.full((num_tokens - slots.numel(),), -1)])
    slots[::4] = -1
    return key, value, caches, slots.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEAD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, heads, block_size, device):
    key, value, (kc, vc), slots = case(dtype, heads, block_size, device)
    want_k, want_v = kc.clone(), vc.clone()
    write_paged_kv_reference(key, value, want_k, want_v, slots)
    write_paged_kv(key, value, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # randn data: no NaN


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_keys_and_empty(device):
    key, value, (kc, vc), slots = case(torch.float16, (2, 8), 4, device)
    wide = torch.cat([key, key], dim=1)  # key rows inside a wider buffer: strided tokens
    strided = wide[:, :2]
    assert not strided.is_contiguous()
    want_k, want_v = kc.clone(), vc.clone()
    write_paged_kv_reference(strided, value, want_k, want_v, slots)
    write_paged_kv(strided, value, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    before = kc.clone()
    write_paged_kv(key[:0], value[:0], kc, vc, slots[:0])
    assert torch.equal(kc, before)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    key, value, (kc, vc), slots = case(torch.float32, (2, 8), 4, device)
    before = kc.clone()
    bad = slots.clone()
    bad[1] = kc.shape[0] * kc.shape[1]
    with pytest.raises(IndexError, match=r"out of range|slots must be -1"):
        write_paged_kv(key, value, kc, vc, bad)
    assert torch.equal(kc, before)  # nothing written
    with pytest.raises(TypeError, match="slot_mapping must be int64, got Int"):
        write_paged_kv(key, value, kc, vc, slots.int())
    with pytest.raises(TypeError, match="share one dtype"):
        write_paged_kv(key.half(), value.half(), kc, vc, slots)
    with pytest.raises(ValueError, match=r"caches must be \[num_blocks, block_size\]"):
        write_paged_kv(key, value, kc[..., :4].contiguous(), vc[..., :4].contiguous(), slots)
    with pytest.raises(ValueError, match=r"slot_mapping must be \[13\]"):
        write_paged_kv(key, value, kc, vc, slots[:5])
    strided = torch.zeros(*kc.shape[:-1], 16, device=device)[..., :8]  # same shape, not contiguous
    with pytest.raises(ValueError, match="must be contiguous"):
        write_paged_kv(key, value, strided, strided.clone(), slots)
    with pytest.raises(ValueError, match="key and value must be"):
        write_paged_kv(key, value[:3], kc, vc, slots)


def test_opcheck():
    key, value, (kc, vc), slots = case(torch.float32, (2, 8), 4, "cpu")
    torch.library.opcheck(torch.ops.adsc.write_paged_kv, (key, value, kc, vc, slots, True))
