"""KV caches for ADSC decoding.

Layer ``l`` of an ADSC model only ever sees the tokens alive in its stage, so its cache holds
exactly those: the stage's compacted prompt followed by the generated tokens (spec section 5). The
per-layer K/V tensors therefore have different lengths, e.g. ``[B, H, 40, D]`` in stage 0 and
``[B, H, 22, D]`` in stage 1 -- the memory saving is real, never a mask over a full-length buffer.

Besides the K/V tensors a cache carries an :class:`AdscCacheState`, the bookkeeping that later
forward calls need to continue the sequence without the plan of the prefill:

- ``valid[s]`` (bool ``[B, L_s]``): which slots of stage ``s``'s cache are real tokens (the
  compacted prompt mask, then ones for generated tokens) -- the key mask of every later step;
- ``next_pos`` (int64 ``[B]``): the position id the next token of each row gets (``n + t`` for a
  prompt of ``n`` real tokens after ``t`` generated ones, spec section 5).

Beam search, ``num_return_sequences`` expansion, contrastive/assisted decoding reorder, repeat,
select or crop the batch; every such method is overridden so the state follows the K/V tensors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

try:  # transformers is an optional dependency of adsc_ext
    from transformers.cache_utils import Cache, DynamicCache, StaticLayer
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("adsc_ext.hf needs the 'transformers' package (>= 5.17)") from exc

__all__ = ["AdscCacheState", "AdscCache", "AdscStaticCache", "AdscStaticLayer"]


class AdscCacheState:
    """Key masks and next position ids of the sequences in an ADSC cache (see module doc)."""

    def __init__(self, stage_of_layer: Sequence[int], valid: List[torch.Tensor], next_pos: torch.Tensor):
        self.stage_of_layer = tuple(int(s) for s in stage_of_layer)
        self.valid = list(valid)  # per stage: bool [B, L_s]
        self.next_pos = next_pos  # int64 [B]

    @property
    def num_stages(self) -> int:
        return len(self.valid)

    @property
    def batch_size(self) -> int:
        return int(self.next_pos.shape[0])

    def stage_lengths(self) -> List[int]:
        """Cached slots per stage (padding slots of a padded batch included)."""
        return [int(v.shape[1]) for v in self.valid]

    def append(self, seg_valid: Sequence[torch.Tensor], seg_real: torch.Tensor) -> None:
        """Record a forward segment: its per-stage slot masks and real-token count per row."""
        self.valid = [torch.cat([v, sv.to(v.dtype)], dim=1) for v, sv in zip(self.valid, seg_valid)]
        self.next_pos = self.next_pos + seg_real.to(self.next_pos)

    # --- batch surgery, mirrored from the K/V tensors --------------------------------------
    def index_select(self, idx: torch.Tensor) -> None:
        idx = idx.to(self.next_pos.device)
        self.valid = [v.index_select(0, idx.to(v.device)) for v in self.valid]
        self.next_pos = self.next_pos.index_select(0, idx)

    def repeat_interleave(self, repeats: int) -> None:
        self.valid = [v.repeat_interleave(repeats, dim=0) for v in self.valid]
        self.next_pos = self.next_pos.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` slots (generated tokens: the same in every stage)."""
        if tokens_to_remove > 0:
            raise ValueError("AdscCache.crop takes a negative number of tokens to remove")
        n = -int(tokens_to_remove)
        if n == 0:
            return
        removed = self.valid[0][:, -n:].sum(dim=1)
        self.valid = [v[:, :-n] for v in self.valid]
        self.next_pos = self.next_pos - removed.to(self.next_pos)


class AdscCache(DynamicCache):
    """A dynamic cache whose layers hold only their stage's tokens (what ``generate`` uses).

    Created by the ADSC model (``generate`` or ``model(..., use_cache=True)``); a user may also
    pass an empty ``AdscCache()`` (or an empty ``DynamicCache``) as ``past_key_values``. After the
    first forward call ``cache.adsc`` holds the :class:`AdscCacheState`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adsc: Optional[AdscCacheState] = None

    def layer_lengths(self) -> List[int]:
        """Cached tokens of every layer (slot count: the K/V tensors' sequence length)."""
        return [int(layer.keys.shape[-2]) if layer.is_initialized else 0 for layer in self.layers]

    def layer_nbytes(self) -> List[int]:
        """Bytes of K plus V of every layer."""
        out = []
        for layer in self.layers:
            if not layer.is_initialized:
                out.append(0)
                continue
            out.append(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
        return out

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.adsc is not None:
            self.adsc.index_select(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.adsc is not None:
            self.adsc.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.adsc is not None:
            idx = indices
            if idx.dtype == torch.bool:
                idx = idx.nonzero().flatten()
            self.adsc.index_select(torch.as_tensor(idx, device=self.adsc.next_pos.device).long())

    def crop(self, tokens_to_remove: int) -> None:
        if self.adsc is None:
            return super().crop(tokens_to_remove)
        if tokens_to_remove > 0:  # legacy form: the absolute length to keep (of the stage-0 layers)
            tokens_to_remove = tokens_to_remove - self.get_seq_length()
        super().crop(tokens_to_remove)
        self.adsc.crop(tokens_to_remove)

    def reset(self):
        super().reset()
        self.adsc = None


# --------------------------------------------------------------------------------------------
# Static variant: fixed per-stage buffers for torch.compile-style decoding.
# --------------------------------------------------------------------------------------------


class AdscStaticLayer(StaticLayer):
    """A static layer whose capacity is set per stage when the ADSC prefill knows its length."""

    def __init__(self, max_cache_len: int = 0, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)


class AdscStaticCache(Cache):
    """Static ADSC cache: layer ``l`` owns a preallocated ``[B, H, L_s + max_new_tokens, D]`` buffer.

    ``L_s`` is the prompt length of ``l``'s stage, known once the prefill has been planned; the
    buffers are allocated then (their size differs per stage, so the saving is real) and written in
    place afterwards (``index_copy_``), so decode allocates nothing and shapes stay fixed.
    The key masks are fixed-size too: ``valid[s]`` is ``[B, L_s + max_new_tokens]`` and filled in
    place. Create it with the number of tokens that will be generated::

        cache = AdscStaticCache(model.config, max_new_tokens=32)
        model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    """

    # Not yet: the filled-slot counters are host ints (a new value every step), so a compiled
    # decode step would be re-specialised each step, and compiling it has not been verified on a
    # GPU. Claiming it would make generate() auto-compile on CUDA. The buffers already have fixed
    # per-stage sizes; turning the counters into device tensors is what remains.
    is_compileable = False

    def __init__(self, config, max_new_tokens: int, **kwargs):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n = int(text.num_hidden_layers)
        if int(max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        super().__init__(layers=[AdscStaticLayer(0) for _ in range(n)])
        self.adsc: Optional[AdscCacheState] = None
        self._filled: Optional[List[int]] = None  # host counters of filled slots per stage

    # ---- called by the ADSC model -----------------------------------------------------------
    def allocate(self, stage_of_layer: Sequence[int], stage_lengths: Sequence[int], batch: int, device) -> None:
        for l, layer in enumerate(self.layers):
            layer.max_cache_len = int(stage_lengths[stage_of_layer[l]]) + self.max_new_tokens
        caps = [int(L) + self.max_new_tokens for L in stage_lengths]
        valid = [torch.zeros(batch, c, dtype=torch.bool, device=device) for c in caps]
        self.adsc = AdscCacheState(stage_of_layer, valid, torch.zeros(batch, dtype=torch.long, device=device))
        self._filled = [0] * len(caps)

    def filled(self, stage: int) -> int:
        return 0 if self._filled is None else self._filled[stage]

    def record(self, seg_valid: Sequence[torch.Tensor], seg_real: torch.Tensor) -> None:
        for s, sv in enumerate(seg_valid):
            a, q = self._filled[s], sv.shape[1]
            if a + q > self.adsc.valid[s].shape[1]:
                raise ValueError(
                    f"AdscStaticCache is full: stage {s} holds {self.adsc.valid[s].shape[1]} slots "
                    f"({self.max_new_tokens} for new tokens), {a} used, {q} more requested"
                )
            self.adsc.valid[s][:, a:a + q] = sv
            self._filled[s] = a + q
        self.adsc.next_pos += seg_real.to(self.adsc.next_pos)

    # ---- Cache API ----------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._filled is None else self._filled[self.adsc.stage_of_layer[layer_idx]]

    def layer_lengths(self) -> List[int]:
        """Capacity (allocated slots) of every layer."""
        return [int(layer.max_cache_len) if layer.is_initialized else 0 for layer in self.layers]

    def layer_nbytes(self) -> List[int]:
        return [
            (layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
            if layer.is_initialized else 0
            for layer in self.layers
        ]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys.copy_(layer.keys.index_select(0, beam_idx.to(layer.keys.device)))
                layer.values.copy_(layer.values.index_select(0, beam_idx.to(layer.values.device)))
        if self.adsc is not None:
            idx = beam_idx.to(self.adsc.next_pos.device)
            for v in self.adsc.valid:
                v.copy_(v.index_select(0, idx))
            self.adsc.next_pos.copy_(self.adsc.next_pos.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("AdscStaticCache has a fixed batch; expand the inputs before the prefill")

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("AdscStaticCache has a fixed batch")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("AdscStaticCache cannot be cropped")

    def reset(self):
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
            layer.cumulative_length = torch.tensor(0, dtype=int)
        self.adsc = None
        self._filled = None
