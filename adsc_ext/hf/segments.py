"""The per-stage token layout of one forward call of an ADSC model (no transformers in here).

A forward call handles one *segment* of every sequence of the batch: the prompt, a prefill chunk,
or a decode step's new tokens. :func:`plan_segment` / :func:`packed_segment` plan it with
:func:`adsc_ext.stage_plan`; :func:`text_segment` lays out a segment without images (decode
steps), whose layout is the same in every stage. The masks are boolean ``[B, 1, q, K]``
"may attend" tensors; :mod:`adsc_ext.hf._compat` puts them in the attention implementation's
format. :func:`adsc_loss` is spec section 6.4's loss on the last stage's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..models.llava import AdscInputError, image_runs

IGNORE_INDEX = -100


@dataclass
class Stage:
    index: Optional[torch.Tensor]  # int32 gather index from the previous stage; None = same layout
    position_ids: torch.Tensor  # int64 [B, q_s] ([1, T_s] packed)
    valid: torch.Tensor  # bool, same shape
    source_index: Optional[torch.Tensor]  # int32 flat input rows, -1 padding; None = identity
    cu_seqlens: Optional[torch.Tensor]  # int32 [n+1] (packed layout)
    max_seqlen: int
    has_padding: bool


@dataclass
class Segment:
    layout: str  # "padded" | "packed"
    stages: List[Stage]
    real_per_row: torch.Tensor  # int64 [B]: real tokens of the segment per row


def check_images(setup, ids: torch.Tensor, valid: torch.Tensor, continuation: bool, packed_cu=None):
    """Readable errors for image tokens that do not form whole images (spec section 3)."""
    hw, (h, w) = setup.tokens_per_image, setup.grid
    tok = setup.image_token_id
    if packed_cu is not None:
        flat = ids.reshape(-1).tolist()
        cu = packed_cu.tolist()
        rows = [flat[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]
    else:
        rows = [[t for t, v in zip(r, m) if v] for r, m in zip(ids.tolist(), valid.tolist())]
    for b, row in enumerate(rows):
        for p, q in image_runs(row, tok):
            n = q - p
            if n % hw == 0:
                continue
            if q == len(row) and packed_cu is None:
                raise AdscInputError(
                    f"sequence {b}: the prompt (chunk) ends inside an image: its last {n} tokens are "
                    f"image tokens, not a multiple of {hw} ({h}x{w} tokens per image). An image must "
                    f"not be split across prefill chunks; end each chunk between whole images."
                )
            if p == 0 and continuation:
                raise AdscInputError(
                    f"sequence {b}: this prefill chunk starts inside an image: its first {n} tokens "
                    f"are image tokens, not a multiple of {hw} ({h}x{w} tokens per image). An image "
                    f"must not be split across prefill chunks."
                )
            raise AdscInputError(
                f"sequence {b}: image tokens must form whole images of {h}x{w} = {hw} tokens; got a "
                f"run of {n} image tokens (id {tok}) at position {p}"
            )


def padding_side(mask: Optional[torch.Tensor]) -> str:
    if mask is None:
        return "left"
    return "right" if bool((mask[:, -1] == 0).any()) else "left"


def plan_segment(setup, ids, seg_mask, next_pos) -> Segment:
    from ..ops import stage_plan

    B, q = ids.shape
    valid0 = seg_mask.bool() if seg_mask is not None else torch.ones(B, q, dtype=torch.bool, device=ids.device)
    plan = stage_plan(setup.schedule, input_ids=ids, attention_mask=valid0, image_token_id=setup.image_token_id,
                      grid=setup.grid, padding_side=padding_side(seg_mask))
    stages = []
    for s, st in enumerate(plan.stages):
        valid = st.attention_mask
        pos = st.position_ids
        if next_pos is not None:
            pos = torch.where(valid, pos + next_pos[:, None], pos)
        stages.append(Stage(st.index if s > 0 else None, pos, valid, st.source_index, st.cu_seqlens,
                             int(st.max_seqlen), int(st.num_tokens) != valid.numel()))
    return Segment("padded", stages, valid0.sum(dim=1))


def text_segment(setup, B, q, seg_mask, next_pos, device) -> Segment:
    """A segment with no images (decode steps): every stage has the input layout."""
    if seg_mask is None:
        valid = torch.ones(B, q, dtype=torch.bool, device=device)
        pos = torch.arange(q, device=device).expand(B, q)
    else:
        valid = seg_mask.bool()
        pos = (valid.long().cumsum(dim=1) - 1).masked_fill(~valid, 1)
    if next_pos is not None:
        pos = torch.where(valid, pos + next_pos[:, None], pos)
    st = Stage(None, pos, valid, None, None, q, seg_mask is not None)
    return Segment("padded", [st] * (len(setup.schedule) + 1), valid.sum(dim=1))


def packed_segment(setup, ids, cu) -> Segment:
    from ..ops import stage_plan

    flat = ids.reshape(-1)
    plan = stage_plan(setup.schedule, input_ids=flat, cu_seqlens=cu.to(torch.int32),
                      image_token_id=setup.image_token_id, grid=setup.grid)
    stages = [
        Stage(st.index if s > 0 else None, st.position_ids.unsqueeze(0), (st.source_index >= 0).unsqueeze(0),
               st.source_index.unsqueeze(0), st.cu_seqlens, int(st.max_seqlen), False)
        for s, st in enumerate(plan.stages)
    ]
    return Segment("packed", stages, torch.tensor([flat.numel()], device=ids.device))


def find_packed_cu(attention_mask, position_ids, cu_kw, B) -> Optional[torch.Tensor]:
    """cu_seqlens of a packed (padding-free) batch, or None if the batch is not packed."""
    if attention_mask is not None or B != 1:
        return None
    if cu_kw is not None:
        return cu_kw.to(torch.int64)
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(pos[1:] <= pos[:-1]).flatten() + 1
    if starts.numel() == 0:
        return None
    zero = torch.zeros(1, dtype=torch.int64, device=pos.device)
    end = torch.tensor([pos.numel()], dtype=torch.int64, device=pos.device)
    return torch.cat([zero, starts.to(torch.int64), end])


def causal_allowed(kv_valid: torch.Tensor, q: int, offset) -> torch.Tensor:
    """bool [B, 1, q, K]: query i (slot offset+i) sees key j iff j is real and j <= offset+i.

    A query also always sees its own slot, so padding queries stay finite (they are never read).
    """
    K = kv_valid.shape[1]
    dev = kv_valid.device
    qpos = torch.arange(q, device=dev)[:, None] + offset
    kpos = torch.arange(K, device=dev)[None, :]
    allowed = kv_valid[:, None, :] & (kpos <= qpos)[None]
    allowed = allowed | (kpos == qpos)[None]
    return allowed[:, None]


def packed_allowed(cu: torch.Tensor, T: int) -> torch.Tensor:
    dev = cu.device
    seg = torch.bucketize(torch.arange(T, device=dev), cu[1:].long(), right=True)
    i = torch.arange(T, device=dev)
    allowed = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    return allowed[None, None]


def adsc_loss(logits, labels, seg: Segment, packed_cu, num_items):
    """Spec 6.4: targets shifted on the input sequence, then compacted with the tokens."""
    labels = labels.to(logits.device)
    if packed_cu is not None:
        flat = labels.reshape(-1)
        shifted = torch.cat([flat[1:], flat.new_full((1,), IGNORE_INDEX)])
        ends = packed_cu[1:].to(flat.device) - 1
        shifted[ends[ends >= 0]] = IGNORE_INDEX
    else:
        if labels.shape != seg.stages[0].valid.shape:
            raise AdscInputError(
                f"labels must have the shape of input_ids {tuple(seg.stages[0].valid.shape)}, got {tuple(labels.shape)}"
            )
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        shifted = shifted.masked_fill(~seg.stages[0].valid, IGNORE_INDEX).reshape(-1)
    last = seg.stages[-1]
    if last.source_index is None:
        target = shifted.view(last.valid.shape)
    else:
        src = last.source_index.long()
        target = shifted[src.clamp(min=0)].masked_fill(src < 0, IGNORE_INDEX)
    if logits.shape[:-1] != target.shape:
        raise AdscInputError(
            f"the loss needs the logits of every token (logits_to_keep=0); got logits for "
            f"{tuple(logits.shape[:-1])} of {tuple(target.shape)} token slots"
        )
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items is not None:
        denom = num_items.to(total.device) if isinstance(num_items, torch.Tensor) else num_items
    else:
        denom = (target != IGNORE_INDEX).sum()
    return total / denom
