"""Attention for the runtime: packed (varlen) causal prefill and decode over a paged KV cache.

One :class:`Attention` object picks the backend and says which one it uses (``.name``):

- ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` for prefill and
  ``flash_attn.flash_attn_with_kvcache`` (block table) for decode; CUDA, flash-attn installed.
- ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` for prefill (CUDA only), and for
  decode with ``block_table`` / ``seqused_k`` where the installed torch has them (2.11+). The call
  adapts to the installed signature: ``window_size=(-1, 0)`` or the older ``is_causal=True``;
  ``enable_gqa`` where present, else K/V heads are repeated; ``scale`` where present, else only the
  default ``head_dim ** -0.5`` is accepted.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` per sequence (any device).

Decode reads the paged cache in place (:attr:`Attention.decode_path` ``"paged"``) when the backend
has a paged kernel and the block size is a multiple of 256 (what FlashAttention-2's paged kernels
accept, in flash-attn and in torch's own copy behind ``varlen_attn``); otherwise it gathers
(``"gather"``): the caller builds one :class:`GatherIndex` per stage and step (the blocks in use,
flattened, and the key mask) and every layer of the stage does one ``index_select`` of K and of V
and one masked SDPA (GQA without repeating K/V). If torch's ``varlen_attn`` refuses the block
table on its first paged call (its cuDNN backend, or a FlashAttention build without paged
support), a ``RuntimeWarning`` says so and decode gathers from then on.

``backend=None`` (auto) picks the first available of flash_attn, torch_varlen, sdpa.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import FrozenSet, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..errors import AdscInputError

__all__ = ["BACKENDS", "Attention", "GatherIndex", "available_backends", "gather_index", "paged_decode_gather",
           "select_backend"]

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")

#: FlashAttention-2's paged kernels need blocks of a multiple of this many tokens.
PAGED_BLOCK_MULTIPLE = 256

#: SDPA takes ``enable_gqa`` (K/V heads shared by groups of query heads) from torch 2.5.
_SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__.split("+")[0]) >= (2, 5)


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
    """Resolve a backend name (None / "auto" = best available); AdscInputError (a ValueError) for an
    unknown or unavailable one."""
    device = torch.device(device)
    if name is None or name == "auto":
        return available_backends(device)[0]
    if name not in BACKENDS:
        raise AdscInputError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} (or 'auto')")
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise AdscInputError(reason)
    return name


def _gqa(k: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    rep = heads // k.shape[dim]
    return k if rep == 1 else k.repeat_interleave(rep, dim=dim)


def _torch_varlen_params() -> FrozenSet[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


class Attention:
    """Prefill and decode attention with one backend (see the module docstring).

    ``block_size`` (of the paged KV cache, if known) decides :attr:`decode_path`; it is not kept.
    """

    def __init__(self, backend: Optional[str] = None, device="cpu", block_size: Optional[int] = None):
        self.name = select_backend(backend, device)
        self._tv = _torch_varlen_params() if self.name == "torch_varlen" else frozenset()
        if self.name == "torch_varlen" and not {"window_size", "is_causal"} & self._tv:
            raise ValueError("torch.nn.attention.varlen.varlen_attn takes neither window_size nor is_causal: "
                             f"this torch ({torch.__version__}) has an API adsc_ext does not know")
        paged = self.name == "flash_attn" or {"block_table", "seqused_k"} <= self._tv
        self._paged_checked = self.name != "torch_varlen"
        self._cu_q: Optional[torch.Tensor] = None
        self.decode_path = ("paged" if paged and block_size is not None and block_size % PAGED_BLOCK_MULTIPLE == 0
                            else "gather")

    def __repr__(self) -> str:
        return f"Attention(backend={self.name!r}, decode={self.decode_path!r})"

    def _torch_varlen(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, **paged):
        from torch.nn.attention.varlen import varlen_attn

        kw = dict(paged)
        if "window_size" in self._tv:
            kw["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kw["is_causal"] = causal
        if "scale" in self._tv:
            kw["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12 * scale:
            raise ValueError(f"this torch's varlen_attn has no scale argument and the model's scale {scale} is not "
                             f"head_dim ** -0.5; use backend='sdpa' or 'flash_attn'")
        gqa = q.shape[1] != k.shape[-2]
        if gqa and "enable_gqa" in self._tv:
            kw["enable_gqa"] = True
        elif gqa:
            k, v = _gqa(k, q.shape[1], k.dim() - 2), _gqa(v, q.shape[1], v.dim() - 2)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

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
            return self._torch_varlen(q, k, v, cu32, cu32, max_seqlen, max_seqlen, scale, True)
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
    def decode_cu_seqlens(self, seq_lens: torch.Tensor) -> Optional[torch.Tensor]:
        """int32 ``[B+1]`` running sum of ``seq_lens`` where the paged call reads it (torch's
        varlen path), else None: computed once per step and stage, not per layer."""
        if self.name != "torch_varlen":
            return None
        return F.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))

    def paged_decode(self, q, k_cache, v_cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, cu_seqlens_k: Optional[torch.Tensor] = None,
                     gather: Optional["GatherIndex"] = None) -> torch.Tensor:
        """q ``[B, H, D]`` (the newest token, already in the cache); caches
        ``[blocks, block_size, Hkv, D]``; block_tables int32 ``[B, max_blocks]``; seq_lens int32
        ``[B]`` (keys per sequence, the new one included) -> ``[B, H, D]``. ``cu_seqlens_k``
        (int32 ``[B+1]``, the running sum of ``seq_lens``) saves a cumsum per call on the paged
        varlen path; ``gather`` (from :func:`gather_index`) the index and mask of the gather path.
        Callers compute both once per step and stage."""
        bs = k_cache.shape[1]
        if self.decode_path != "paged" or bs % PAGED_BLOCK_MULTIPLE:
            if gather is None:
                gather = gather_index(block_tables, seq_lens, block_tables.shape[1], bs)
            return paged_decode_gather(q, k_cache, v_cache, gather, scale)
        if self.name == "flash_attn":
            from flash_attn import flash_attn_with_kvcache

            o = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=seq_lens,
                                        block_table=block_tables, softmax_scale=scale, causal=True)
            return o[:, 0]
        if not self._paged_checked:
            # torch's own FlashAttention may refuse block tables on some GPUs or builds (its
            # checks run on the host, when the call is made): then say so once and gather.
            try:
                out = self._torch_varlen_paged(q, k_cache, v_cache, block_tables, seq_lens, scale, cu_seqlens_k)
            except RuntimeError as exc:
                warnings.warn(f"varlen_attn refused the paged KV cache ({exc}); decode gathers the cache instead",
                              RuntimeWarning, stacklevel=2)
                self.decode_path = "gather"
                gather = gather_index(block_tables, seq_lens, block_tables.shape[1], bs)
                return paged_decode_gather(q, k_cache, v_cache, gather, scale)
            self._paged_checked = True
            return out
        return self._torch_varlen_paged(q, k_cache, v_cache, block_tables, seq_lens, scale, cu_seqlens_k)

    def _torch_varlen_paged(self, q, k_cache, v_cache, block_tables, seq_lens, scale, cu_seqlens_k):
        bs = k_cache.shape[1]
        B = q.shape[0]
        if cu_seqlens_k is None:
            cu_seqlens_k = F.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = self._cu_q
        if cu_q is None or cu_q.numel() != B + 1 or cu_q.device != q.device:
            cu_q = self._cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)  # reused across layers
        # One query per sequence attends to all its keys: no causal mask needed.
        return self._torch_varlen(q, k_cache, v_cache, cu_q, cu_seqlens_k, 1, block_tables.shape[1] * bs, scale,
                                  False, seqused_k=seq_lens, block_table=block_tables)


class GatherIndex(NamedTuple):
    """What the gather path needs for one stage and step (shared by the stage's layers)."""

    blocks: torch.Tensor  # int64 [B * width]: the blocks in use, row by row
    mask: torch.Tensor  # bool [B, 1, 1, width * block_size]: the keys each sequence has
    width: int  # blocks per sequence read (the longest sequence's blocks in use)


def gather_index(block_tables: torch.Tensor, seq_lens: torch.Tensor, width: int, block_size: int) -> GatherIndex:
    """The gather path's index and mask for ``block_tables [B, >= width]`` and ``seq_lens [B]``.

    ``width`` (a host int: the engine knows every sequence's length) is the number of blocks in use
    by the longest sequence, so the gather reads no reserved-but-empty blocks; a CUDA graph passes
    the whole table width instead, for static shapes."""
    B = block_tables.shape[0]
    width = max(1, min(int(width), block_tables.shape[1]))
    blocks = block_tables[:, :width].reshape(-1).long()
    keys = torch.arange(width * block_size, device=block_tables.device)
    mask = keys[None, :] < seq_lens.to(block_tables.device).long()[:, None]
    return GatherIndex(blocks, mask.view(B, 1, 1, width * block_size), width)


def paged_decode_gather(q, k_cache, v_cache, gather: GatherIndex, scale):
    """The gather fallback: the blocks in use of every sequence gathered to ``[B, width*bs, Hkv, D]``
    (one ``index_select`` each for K and V), then masked SDPA over them; K/V heads are not repeated
    for GQA (SDPA's ``enable_gqa``)."""
    B, H, D = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    n = gather.width * bs
    k = k_cache.index_select(0, gather.blocks).view(B, n, hkv, D).transpose(1, 2)  # [B, Hkv, n, D]
    v = v_cache.index_select(0, gather.blocks).view(B, n, hkv, D).transpose(1, 2)
    if hkv != H and not _SDPA_GQA:
        k, v = _gqa(k, H, 1), _gqa(v, H, 1)
    gqa = dict(enable_gqa=True) if hkv != H and _SDPA_GQA else {}
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=gather.mask, scale=scale, **gqa)
    return o[:, :, 0]
