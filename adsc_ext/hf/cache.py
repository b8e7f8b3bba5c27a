"""KV caches for ADSC decoding.

Layer ``l`` of an ADSC model only ever sees the tokens alive in its stage, so its cache holds
exactly those: the stage's compacted prompt followed by the generated tokens (spec section 5). The
per-layer K/V tensors therefore have different lengths, e.g. ``[B, H, 40, D]`` in stage 0 and
``[B, H, 22, D]`` in stage 1 -- the memory saving is real, never a mask over a full-length buffer.

Besides the K/V tensors a cache carries an :class:`AdscCacheState`, the bookkeeping that later
forward calls need to continue the sequence without the plan of the prefill:

- ``valid[s]`` (bool ``[B, L_s]``): which slots of stage ``s``'s cache are real tokens (the
  compacted prompt mask, then ones for generated tokens) -- the key mask of every later step;
- ``next_pos`` (int64 ``[B]``, or ``[C, B]`` for positions of ``C`` components such as M-RoPE's
  ``[4, B, S]``): the position id the next token of each row gets (``n + t`` for a prompt of
  ``n`` real tokens after ``t`` generated ones, spec section 5; the model spec's
  :meth:`~adsc_ext.models.ModelSpec.next_positions`, e.g. ``n + t + rope_delta`` in Qwen-VL's
  rotary rows).

Beam search, ``num_return_sequences`` expansion, contrastive/assisted decoding reorder, repeat,
select or crop the batch; every such method is overridden so the state follows the K/V tensors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

try:  # transformers is an optional dependency of adsc_ext
    from transformers import DynamicCache
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("adsc_ext.hf needs the 'transformers' package (>= 5.17)") from exc

from ._compat import layer_kv

__all__ = ["AdscCacheState", "AdscCache"]


class AdscCacheState:
    """Key masks and next position ids of the sequences in an ADSC cache (see module doc)."""

    def __init__(self, stage_of_layer: Sequence[int], valid: List[torch.Tensor], next_pos: torch.Tensor):
        self.stage_of_layer = tuple(int(s) for s in stage_of_layer)
        self.valid = list(valid)  # per stage: bool [B, L_s]
        self.next_pos = next_pos  # int64 [*components, B]

    @property
    def num_stages(self) -> int:
        return len(self.valid)

    @property
    def batch_size(self) -> int:
        return int(self.next_pos.shape[-1])

    def stage_lengths(self) -> List[int]:
        """Cached slots per stage (padding slots of a padded batch included)."""
        return [int(v.shape[1]) for v in self.valid]

    def advance(self, valid: Sequence[torch.Tensor], seg_real: Optional[torch.Tensor] = None, *,
                next_pos: Optional[torch.Tensor] = None) -> None:
        """Record a forward segment: ``valid[s]`` is stage ``s``'s key mask with the segment's
        slots appended (the mask the segment attended with); then either ``next_pos``, every row's
        next position (the model spec's rule), or ``seg_real``, the segment's real tokens per row
        (every component of the next positions advances by them)."""
        self.valid = list(valid)
        if next_pos is not None:
            self.next_pos = next_pos.to(self.next_pos)
        else:
            self.next_pos = self.next_pos + seg_real.to(self.next_pos)

    # --- batch surgery, mirrored from the K/V tensors --------------------------------------
    def index_select(self, idx: torch.Tensor) -> None:
        idx = idx.to(self.next_pos.device)
        self.valid = [v.index_select(0, idx.to(v.device)) for v in self.valid]
        self.next_pos = self.next_pos.index_select(-1, idx)

    def repeat_interleave(self, repeats: int) -> None:
        self.valid = [v.repeat_interleave(repeats, dim=0) for v in self.valid]
        self.next_pos = self.next_pos.repeat_interleave(repeats, dim=-1)

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

    Created by the ADSC model (``generate`` or ``model(..., use_cache=True)``), which also puts a
    fresh one in the place of an empty ``DynamicCache`` passed as the cache (``generate`` creates
    one and continues with the cache the model returns). A user may pass an empty
    ``AdscCache(config=model.config.get_text_config())`` too. After the first forward call
    ``cache.adsc`` holds the :class:`AdscCacheState`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adsc: Optional[AdscCacheState] = None

    def layer_lengths(self) -> List[int]:
        """Cached tokens of every layer (slot count: the K/V tensors' sequence length)."""
        return [0 if kv is None else int(kv[0].shape[-2]) for kv in map(layer_kv, self.layers)]

    def layer_nbytes(self) -> List[int]:
        """Bytes of K plus V of every layer."""
        return [0 if kv is None else sum(t.numel() * t.element_size() for t in kv) for kv in map(layer_kv, self.layers)]

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
