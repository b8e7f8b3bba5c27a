"""Plain-PyTorch references of the ADSC ops: slow, obvious, and the oracle of the tests.

They are written from the spec (sections 3-5) with Python loops over sequences and images and share
no logic with the C++/CUDA core; the compiled ops must match them bit for bit.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .plan import Plan, StagePlan, normalize_plan_inputs
from .schedule import Schedule, ScheduleError, downsample_grid, kept_axis_indices, newline_flag

__all__ = [
    "kept_image_indices", "stage_plan_reference", "compact_tokens_reference",
    "write_paged_kv_reference",
]


def kept_image_indices(grid: Sequence[int], schedule, newline: bool = False) -> List[List[int]]:
    """Offsets (within the image's run of positions) of the tokens alive at each stage.

    An ``h x w`` image is ``h*w`` positions in raster order: the offsets are raster indices. With
    ``newline`` every grid row is followed by one newline token (LLaVA-NeXT / OneVision anyres), so
    the image is ``h*(w+1)`` positions and grid token ``(r, c)`` sits at ``r*(w+1) + c``; a row's
    newline token (offset ``r*(w+1) + w``) is alive exactly while its row is (spec section 3).
    """
    schedule = Schedule.coerce(schedule)
    h, w = int(grid[0]), int(grid[1])
    nl = newline_flag(newline)
    row_len = w + nl
    rows, cols = list(range(h)), list(range(w))

    def offsets():
        tail = [w] if nl else []  # the newline column, never halved
        return [r * row_len + c for r in rows for c in cols + tail]

    out = [offsets()]
    for step in schedule.steps:
        (_, _), halve_rows, halve_cols = downsample_grid((len(rows), len(cols)), step.factor)
        if halve_rows:
            rows = [rows[i] for i in kept_axis_indices(len(rows))]
        if halve_cols:
            cols = [cols[i] for i in kept_axis_indices(len(cols))]
        out.append(offsets())
    return out


def _find_images(ids: List[int], image_token_id: int, hw: int, seq: int) -> List[Tuple[int, int]]:
    """(start position, raster length) of every image in one sequence's token ids."""
    images, p = [], 0
    while p < len(ids):
        if ids[p] != image_token_id:
            p += 1
            continue
        q = p
        while q < len(ids) and ids[q] == image_token_id:
            q += 1
        if (q - p) % hw != 0:
            raise ValueError(
                f"sequence {seq}: a run of {q - p} image tokens at position {p} is not a whole "
                f"number of images of {hw} tokens"
            )
        images.extend((s, hw) for s in range(p, q, hw))
        p = q
    return images


def stage_plan_reference(
    schedule,
    *,
    input_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    image_spans: Optional[torch.Tensor] = None,
    image_token_id: Optional[int] = None,
    grid: Sequence[int] = (24, 24),
    padding_side: str = "left",
) -> Plan:
    """Reference of :func:`adsc_ext.stage_plan` (same arguments, same result)."""
    schedule = Schedule.coerce(schedule)
    inp = normalize_plan_inputs(
        input_ids=input_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
        image_spans=image_spans, image_token_id=image_token_id, grid=grid,
        padding_side=padding_side,
    )
    B, dev = inp.batch_size, inp.device
    ids = inp.input_ids.cpu().tolist() if inp.input_ids is not None else None

    # Stage-0 rows of each sequence, in position order.
    rows: List[List[int]] = []
    if inp.layout == "packed":
        cu = inp.cu_seqlens.cpu().tolist()
        if cu[0] != 0 or cu[-1] != inp.num_tokens or any(a > b for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to {inp.num_tokens}, got {cu}")
        rows = [list(range(cu[b], cu[b + 1])) for b in range(B)]
        seq_ids = [ids[cu[b]:cu[b + 1]] for b in range(B)] if ids is not None else None
        S = None
    else:
        mask = inp.attention_mask.cpu().tolist()
        S = inp.attention_mask.shape[1]
        rows = [[b * S + j for j in range(S) if mask[b][j]] for b in range(B)]
        seq_ids = [[ids[b][j] for j in range(S) if mask[b][j]] for b in range(B)] if ids is not None else None

    # Images of each sequence: (start position, h, w, newline).
    images: List[List[Tuple[int, int, int, int]]] = [[] for _ in range(B)]
    if inp.image_spans is not None:
        prev = None
        for i, row in enumerate(inp.image_spans.cpu().tolist()):
            b, start, h, w = row[:4]
            nl = row[4] if len(row) == 5 else 0
            if nl not in (0, 1):
                raise ValueError(f"image span {i} has newline = {nl}: expected 0 or 1")
            if not (0 <= b < B) or start < 0 or h < 1 or w < 1 or start + h * (w + nl) > len(rows[b]):
                raise ValueError(f"image span {i} {tuple(row)} does not fit its sequence")
            if prev is not None and (b < prev[0] or (b == prev[0] and start < prev[1])):
                raise ValueError(f"image span {i} is out of order")
            images[b].append((start, h, w, nl))
            prev = (b, start + h * (w + nl))
    else:
        gh, gw = int(grid[0]), int(grid[1])
        try:  # the model's grid must fit the schedule, whether or not this batch has images
            schedule.grids((gh, gw))
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        for b in range(B):
            images[b] = [(s, gh, gw, 0)
                         for s, _ in _find_images(seq_ids[b], inp.image_token_id, gh * gw, b)]

    # Positions alive at each stage, per sequence.
    n_stages = len(schedule) + 1
    alive = [[set(range(len(rows[b]))) for b in range(B)] for _ in range(n_stages)]
    kept_cache = {}
    for b in range(B):
        for start, h, w, nl in images[b]:
            if (h, w, nl) not in kept_cache:
                try:
                    kept_cache[(h, w, nl)] = kept_image_indices((h, w), schedule, newline=nl)
                except ScheduleError as exc:
                    raise ValueError(f"sequence {b}: image at position {start}: {exc}") from None
            kept = kept_cache[(h, w, nl)]
            span = set(start + r for r in range(h * (w + nl)))
            for s in range(1, n_stages):
                alive[s][b] -= span - set(start + r for r in kept[s])

    stages: List[StagePlan] = []
    prev_slot = None  # stage-0 row -> slot in the previous stage's layout
    layers = (0,) + schedule.layers
    for s in range(n_stages):
        per_seq = [sorted(alive[s][b]) for b in range(B)]
        lens = [len(p) for p in per_seq]
        cu_s = [0]
        for n in lens:
            cu_s.append(cu_s[-1] + n)
        max_len = max(lens, default=0)
        if inp.layout == "padded":
            width = S if s == 0 else max_len
            slots = [-1] * (B * width)
            pos = [1] * (B * width)
            src = [-1] * (B * width)
            slot_of = {}
            for b in range(B):
                for k, p in enumerate(per_seq[b]):
                    row = rows[b][p]
                    if s == 0:
                        slot = row
                    else:
                        off = width - lens[b] if padding_side == "left" else 0
                        slot = b * width + off + k
                    slot_of[row] = slot
                    src[slot], pos[slot] = row, p
                    slots[slot] = row if s == 0 else prev_slot[row]
            shape = (B, width)
        else:
            slots, pos, src, slot_of = [], [], [], {}
            for b in range(B):
                for p in per_seq[b]:
                    row = rows[b][p]
                    slot_of[row] = len(slots)
                    slots.append(row if s == 0 else prev_slot[row])
                    pos.append(p)
                    src.append(row)
            shape = (len(slots),)
        stages.append(
            StagePlan(
                stage=s,
                first_layer=layers[s],
                index=torch.tensor(slots, dtype=torch.int32, device=dev).reshape(shape),
                source_index=torch.tensor(src, dtype=torch.int32, device=dev).reshape(shape),
                position_ids=torch.tensor(pos, dtype=torch.int64, device=dev).reshape(shape),
                cu_seqlens=torch.tensor(cu_s, dtype=torch.int32, device=dev),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
                max_seqlen=max_len,
                num_tokens=cu_s[-1],
            )
        )
        prev_slot = slot_of
    return Plan(schedule=schedule, layout=inp.layout, batch_size=B, stages=stages)


def compact_tokens_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`adsc_ext.compact_tokens`.

    The leading ``index.dim()`` dims of ``x`` are its token dims, taken as one flat row axis;
    ``out[i] = x_flat[index[i]]``, and a row whose index is ``-1`` is zero.
    """
    k = index.dim()
    flat = x.reshape(math.prod(x.shape[:k]), *x.shape[k:])
    idx = index.reshape(-1).long()
    out = torch.zeros((idx.numel(), *x.shape[k:]), dtype=x.dtype, device=x.device)
    keep = idx >= 0
    out[keep] = flat[idx[keep]]
    return out.reshape(*index.shape, *x.shape[k:])


def write_paged_kv_reference(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Reference of :func:`adsc_ext.write_paged_kv`: in place, slot -1 skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, *key.shape[1:])[slots] = key[keep]
    value_cache.view(-1, *value.shape[1:])[slots] = value[keep]
