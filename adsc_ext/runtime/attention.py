"""Attention for the runtime: packed (varlen) causal prefill and decode over a paged KV cache.

One :class:`Attention` object picks the backend and says which one it uses (``.name``):

- ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` for prefill and
  ``flash_attn.flash_attn_with_kvcache`` (block table) for decode; CUDA, flash-attn installed.
  flash-attn 2 needs paged blocks of a multiple of 256 tokens; with other block sizes decode
  falls back to the gather path.
- ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` for prefill (CUDA only); decode
  gathers the paged cache and runs SDPA.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` per sequence (any device);
  decode gathers the paged cache (``[B, blocks * block_size]`` keys with a length mask).

``backend=None`` (auto) picks the first available of flash_attn, torch_varlen, sdpa.
"""

from __future__ import annotations

import importlib.util
from typing import List, Optional

import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "Attention", "available_backends", "select_backend"]

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:
        return False
    return True


def _unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    if name == "sdpa":
        return None
    if device.type != "cuda":
        return f"attention backend {name!r} needs a CUDA device, the model is on {device}"
    if name == "flash_attn" and not _has_flash_attn():
        return "attention backend 'flash_attn' needs the flash-attn package (pip install flash-attn)"
    if name == "torch_varlen" and not _has_torch_varlen():
        return f"attention backend 'torch_varlen' needs torch.nn.attention.varlen (torch {torch.__version__} lacks it)"
    return None


def available_backends(device="cpu") -> List[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if _unavailable_reason(b, device) is None]


def select_backend(name: Optional[str] = None, device="cpu") -> str:
    """Resolve a backend name (None / "auto" = best available); ValueError for unknown or unavailable."""
    device = torch.device(device)
    if name is None or name == "auto":
        return available_backends(device)[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} (or 'auto')")
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(reason)
    return name


def _gqa(k: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    rep = heads // k.shape[dim]
    return k if rep == 1 else k.repeat_interleave(rep, dim=dim)


class Attention:
    """Prefill and decode attention with one backend (see the module docstring)."""

    def __init__(self, backend: Optional[str] = None, device="cpu"):
        self.name = select_backend(backend, device)

    def __repr__(self) -> str:
        return f"Attention(backend={self.name!r})"

    # ---- prefill: packed causal self-attention ---------------------------------------------------
    def varlen_prefill(self, q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                       cu_host: Optional[List[int]] = None) -> torch.Tensor:
        """Causal attention within each packed sequence. q ``[T, H, D]``, k/v ``[T, Hkv, D]`` -> ``[T, H, D]``.

        ``cu_host`` (the offsets as a host list) lets the SDPA path avoid reading ``cu_seqlens``.
        """
        cu32 = cu_seqlens.to(torch.int32)
        if self.name == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, cu32, cu32, max_seqlen, max_seqlen,
                                          softmax_scale=scale, causal=True)
        if self.name == "torch_varlen":
            from torch.nn.attention.varlen import varlen_attn

            return varlen_attn(q, k, v, cu32, cu32, max_seqlen, max_seqlen, scale=scale,
                               window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])
        cu = cu_host if cu_host is not None else cu_seqlens.tolist()
        H = q.shape[1]
        out = torch.empty_like(q)
        for i in range(len(cu) - 1):
            a, b = cu[i], cu[i + 1]
            if b <= a:
                continue
            qi = q[a:b].transpose(0, 1)
            ki = _gqa(k[a:b], H, 1).transpose(0, 1)
            vi = _gqa(v[a:b], H, 1).transpose(0, 1)
            o = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], is_causal=True, scale=scale)
            out[a:b] = o[0].transpose(0, 1)
        return out

    # ---- decode: one query per sequence over the paged cache --------------------------------------
    def paged_decode(self, q, k_cache, v_cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """q ``[B, H, D]`` (the newest token, already in the cache); caches
        ``[blocks, block_size, Hkv, D]``; block_tables int32 ``[B, max_blocks]``; seq_lens int32
        ``[B]`` (keys per sequence, the new one included) -> ``[B, H, D]``."""
        bs = k_cache.shape[1]
        if self.name == "flash_attn" and bs % 256 == 0:
            from flash_attn import flash_attn_with_kvcache

            o = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=seq_lens.to(torch.int32),
                                        block_table=block_tables.to(torch.int32), softmax_scale=scale,
                                        causal=True)
            return o[:, 0]
        return paged_decode_gather(q, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_decode_gather(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """The gather fallback: every sequence's blocks gathered to ``[B, nb*bs, Hkv, D]``, masked SDPA."""
    B, H, D = q.shape
    nb, bs = block_tables.shape[1], k_cache.shape[1]
    bt = block_tables.long()
    k = k_cache[bt].reshape(B, nb * bs, k_cache.shape[2], D)
    v = v_cache[bt].reshape(B, nb * bs, v_cache.shape[2], D)
    k = _gqa(k, H, 2).transpose(1, 2)  # [B, H, K, D]
    v = _gqa(v, H, 2).transpose(1, 2)
    mask = torch.arange(nb * bs, device=q.device)[None, :] < seq_lens.to(q.device).long()[:, None]
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale)
    return o[:, :, 0]
