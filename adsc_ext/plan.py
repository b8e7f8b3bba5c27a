"""The ADSC plan: for every stage of a schedule, how the batch's tokens are re-indexed.

A *stage* is a run of decoder layers that share one token layout. Stage 0 is the input layout;
stage ``s >= 1`` starts at the layer of the schedule's step ``s - 1``. For every stage the plan holds
the gather index from the previous stage's layout, the stage's ``cu_seqlens`` and max length, the
original position ids of the surviving tokens and the per-sequence lengths. It is computed for all
stages in one call (one kernel launch and one host-device synchronisation per batch on CUDA).

Two layouts:

- ``packed`` (varlen): tokens ``[T]``, sequences delimited by ``cu_seqlens [B+1]``; every stage is
  packed too: ``index`` is ``[T_s]``.
- ``padded``: tokens ``[B, S]`` with an attention mask; stage ``s >= 1`` is ``[B, S_s]`` with
  ``S_s`` the longest surviving sequence, padded on ``padding_side``; padding slots hold index
  ``-1`` and position id ``1``. Stage 0 is the input layout itself.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .schedule import Schedule

__all__ = ["StagePlan", "Plan", "PlanInputs", "normalize_plan_inputs", "SPAN_COLUMNS"]


@dataclass
class StagePlan:
    """The token layout of one stage. Shapes: packed ``[T_s]``; padded ``[B, S_s]``."""

    stage: int
    first_layer: int
    #: int32: row of the previous stage's layout that fills each slot (stage 0: its own row);
    #: ``-1`` marks padding. Feed it to :func:`adsc_ext.compact_tokens`.
    index: torch.Tensor
    #: int32: row of the stage-0 (input) layout of each slot; ``-1`` marks padding.
    source_index: torch.Tensor
    #: int64: the original position id of each slot (RoPE is not re-indexed); padding holds 1.
    position_ids: torch.Tensor
    #: int32 ``[B+1]``: offsets of the sequences if the stage were packed.
    cu_seqlens: torch.Tensor
    #: int32 ``[B]``: surviving tokens per sequence.
    seq_lens: torch.Tensor
    #: Longest sequence of the stage (a host int, as FlashAttention's varlen API wants it).
    max_seqlen: int
    #: Number of real (non-padding) tokens in the stage.
    num_tokens: int

    @property
    def attention_mask(self) -> torch.Tensor:
        """bool, same shape as ``index``: True for real tokens."""
        return self.source_index >= 0


@dataclass
class Plan:
    schedule: Schedule
    layout: str  # "packed" | "padded"
    batch_size: int
    stages: List[StagePlan] = field(default_factory=list)

    def stage_of_layer(self, layer: int) -> StagePlan:
        """The stage whose layout decoder layer ``layer`` runs on."""
        return self.stages[self.schedule.stage_of_layer(layer)]

    def __len__(self) -> int:
        return len(self.stages)


@dataclass
class PlanInputs:
    """Checked, normalised arguments of a plan call (shared by the op and the reference)."""

    layout: str
    input_ids: Optional[torch.Tensor]  # int64 [T] or [B, S] (None when spans are given)
    cu_seqlens: Optional[torch.Tensor]  # int32 [B+1]   (packed)
    attention_mask: Optional[torch.Tensor]  # [B, S]     (padded)
    #: int64 [N, 4] rows of (sequence, start position, h, w), or [N, 5] with a newline flag
    image_spans: Optional[torch.Tensor]
    num_tokens: int
    batch_size: int
    device: torch.device
    #: the image token id as a checked int64 value (-1 when images come from spans)
    image_token_id: int = -1


_INT64 = torch.iinfo(torch.int64)

#: Columns of ``image_spans``: (sequence, start, h, w) and, optionally, newline.
SPAN_COLUMNS = (4, 5)


def _token_id(value) -> int:
    """``image_token_id`` as an int64 value: an int (numpy and 0-d integer tensors included), never
    a float or a bool, within int64 (the op compares it with int64 token ids)."""
    if isinstance(value, bool):
        raise TypeError(f"image_token_id must be an int, got bool {value!r}")
    try:
        token = operator.index(value)
    except TypeError:
        raise TypeError(
            f"image_token_id must be an int, got {type(value).__name__} {value!r}"
        ) from None
    if not _INT64.min <= token <= _INT64.max:
        raise ValueError(
            f"image_token_id must fit int64 ({_INT64.min} .. {_INT64.max}), got {token}"
        )
    return token


def _as_long(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {t.dtype}")
    return t


def normalize_plan_inputs(
    *,
    input_ids: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    image_spans: Optional[torch.Tensor],
    image_token_id: Optional[int],
    grid: Sequence[int],
    padding_side: str,
) -> PlanInputs:
    """Check the arguments of a plan call and decide the layout.

    ``cu_seqlens`` selects the packed layout, ``attention_mask`` the padded one; with neither, a
    1-D ``input_ids`` is one packed sequence and a 2-D one a padded batch with no padding. Images
    come from exactly one of ``input_ids`` (runs of ``image_token_id``) and ``image_spans``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    h_w = tuple(grid) if grid is not None else ()
    if len(h_w) != 2 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in h_w):
        raise ValueError(f"grid must be two positive ints (height, width), got {grid!r}")
    if cu_seqlens is not None and attention_mask is not None:
        raise ValueError("give either cu_seqlens (packed layout) or attention_mask (padded), not both")
    if input_ids is None and image_spans is None:
        raise ValueError("give input_ids (images found by image_token_id) or image_spans")
    if input_ids is not None and image_spans is not None:
        # As the C ABI: the spans would silently win over the token ids.
        raise ValueError(
            "give either input_ids (images are runs of image_token_id) or image_spans, not both; "
            "with image_spans, cu_seqlens or attention_mask gives the layout"
        )
    if image_spans is None and image_token_id is None:
        raise ValueError("image_token_id is required when images are found from input_ids")
    token_id = -1 if image_token_id is None else _token_id(image_token_id)
    if input_ids is not None:
        input_ids = _as_long("input_ids", input_ids)
        if input_ids.dim() not in (1, 2):
            raise ValueError(
                f"input_ids must be [T] (packed) or [B, S] (padded), got shape {tuple(input_ids.shape)}"
            )

    if cu_seqlens is None and attention_mask is None:
        if input_ids is None:
            raise ValueError("with image_spans, give cu_seqlens or attention_mask for the layout")
        if input_ids.dim() == 1:
            n = input_ids.numel()  # int64 when int32 cannot hold it: the op then says "too many tokens"
            cu_dtype = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64
            cu_seqlens = torch.tensor([0, n], dtype=cu_dtype, device=input_ids.device)
        else:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)

    if cu_seqlens is not None:
        layout = "packed"
        cu_seqlens = _as_long("cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be [B+1] with B >= 0, got shape {tuple(cu_seqlens.shape)}")
        batch = cu_seqlens.numel() - 1
        device = cu_seqlens.device
        if input_ids is not None:
            if input_ids.dim() != 1:
                raise ValueError(
                    f"the packed layout (cu_seqlens) needs input_ids of shape [T], got {tuple(input_ids.shape)}"
                )
            num_tokens = input_ids.numel()
        else:
            # Without input_ids the total comes from the offsets themselves: one small read.
            num_tokens = int(cu_seqlens[-1])
    else:
        layout = "padded"
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [B, S], got shape {tuple(attention_mask.shape)}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
        if input_ids is not None and input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                f"must have the same shape"
            )
        batch = attention_mask.shape[0]
        num_tokens = attention_mask.numel()
        device = attention_mask.device

    if image_spans is not None:
        image_spans = _as_long("image_spans", image_spans)
        if image_spans.dim() != 2 or image_spans.shape[1] not in SPAN_COLUMNS:
            raise ValueError(
                f"image_spans must be [N, 4] rows of (sequence, start position, height, width), or "
                f"[N, 5] with a newline flag (1: each grid row ends with a newline token), got "
                f"shape {tuple(image_spans.shape)}"
            )
    for name, t in (("input_ids", input_ids), ("image_spans", image_spans)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the layout tensor is on {device}")
    return PlanInputs(layout, input_ids, cu_seqlens, attention_mask, image_spans, num_tokens, batch,
                      device, token_id)
