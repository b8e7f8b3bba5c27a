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


# ---- hardening (issue 14) ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_keys_that_alias_a_cache_are_refused(device):
    # With key a view of key_cache the result would depend on the write order (D5).
    key, value, (kc, vc), slots = case(torch.float32, (2, 8), 4, device, num_tokens=4, num_blocks=2)
    alias = kc.view(-1, 2, 8)[:4]
    before = kc.clone()
    with pytest.raises(ValueError, match="key_cache and key share memory"):
        write_paged_kv(alias, value, kc, vc, slots)
    with pytest.raises(ValueError, match="value_cache and value share memory"):
        write_paged_kv(key, vc.view(-1, 2, 8)[1:5], kc, vc, slots)
    with pytest.raises(ValueError, match="key_cache and value_cache share memory"):
        write_paged_kv(key, value, kc, kc, slots)
    assert torch.equal(kc, before)
    write_paged_kv(alias.clone(), value, kc, vc, slots)  # a copy is fine


@pytest.mark.parametrize("device", DEVICES)
def test_zero_block_caches_with_every_token_skipped(device):
    # Nothing to write: a no-op, not "caches must not be null" (D11).
    key = torch.randn(3, 2, 8, device=device)
    kc = torch.empty(0, 4, 2, 8, device=device)
    slots = torch.full((3,), -1, dtype=torch.int64, device=device)
    write_paged_kv(key, key.clone(), kc, kc.clone(), slots)
    with pytest.raises(IndexError):
        write_paged_kv(key, key.clone(), kc, kc.clone(), torch.tensor([-1, 0, -1], device=device))


def test_meta_caches_with_cpu_keys_raise():
    # A meta cache sends the call to the fake kernel, which must check devices (D4), not no-op.
    key, value, (kc, vc), slots = case(torch.float32, (2, 8), 4, "cpu")
    with pytest.raises(ValueError, match=r"key_cache must be on cpu.*got meta"):
        write_paged_kv(key, value, kc.to("meta"), vc.to("meta"), slots)
    with pytest.raises(ValueError, match=r"slot_mapping must be on meta.*got cpu"):
        write_paged_kv(key.to("meta"), value.to("meta"), kc.to("meta"), vc.to("meta"), slots)
    with pytest.raises(TypeError, match="slot_mapping must be int64"):
        write_paged_kv(key.to("meta"), value.to("meta"), kc.to("meta"), vc.to("meta"),
                       slots.int().to("meta"))
    write_paged_kv(key.to("meta"), value.to("meta"), kc.to("meta"), vc.to("meta"), slots.to("meta"))


# ---- hardening (issue 18): a slot mapping that lives inside a cache ----------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_slot_mapping_inside_a_cache_is_refused(device):
    # The first rows written rewrote the slots still to be read: a write anywhere (a segfault).
    key = torch.full((2, 1, 2), 2**40, dtype=torch.int64, device=device)
    kc = torch.zeros(2, 4, 1, 2, dtype=torch.int64, device=device)
    vc = torch.zeros_like(kc)
    slots = kc.view(-1)[:2]
    slots.copy_(torch.tensor([0, 1], device=device))
    before = (kc.clone(), vc.clone())
    with pytest.raises(ValueError, match="write_paged_kv: key_cache and slot_mapping overlap in memory"):
        write_paged_kv(key, key.clone(), kc, vc, slots)
    with pytest.raises(ValueError, match="value_cache and slot_mapping overlap"):
        write_paged_kv(key, key.clone(), kc, vc, vc.view(-1)[6:8])
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])  # nothing written
    write_paged_kv(key, key.clone(), kc, vc, slots.clone())  # a copy is fine
    want_k, want_v = before[0].clone(), before[1].clone()
    write_paged_kv_reference(key, key.clone(), want_k, want_v, torch.tensor([0, 1], device=device))
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
