"""The per-step plan of the vLLM plugin: each stage's tokens when a step's chunk of a request may
start or end inside an image.

vLLM's chunked prefill (on by default) splits a prompt wherever the step's token budget ends,
images included, so one step can hold the last 555 tokens of a 24x24 image, or its first 21.
:func:`adsc_ext.stage_plan` plans whole images only. This module plans any chunk, because the
downsampling rule depends only on the image grid (spec section 4): which rows and columns a stage
keeps is fixed by the grid, so the tokens a stage keeps of a partial image are exactly the whole
image's kept tokens that fall inside the chunk. Computed chunk by chunk, each stage sees the same
tokens in the same order as when the prompt is prefilled at once, and every kept token attends
(causally) to the same earlier kept tokens, whose K/V earlier chunks wrote: chunked and unchunked
prefill give the same result, wherever the chunk boundaries fall.

What a chunk needs to know is where in its image its first image token sits: the *phase*, the
number of image tokens the request's previous chunks left at the end of an unfinished image (0
when the previous chunk ended on text or on an image's last token). The plugin keeps it per
request across steps (:class:`~adsc_ext.integrations.vllm.model.AdscStages`).

Which tokens of one image each stage keeps comes from the compiled plan itself
(:class:`ImageKeep`, one :func:`adsc_ext.stage_plan` call on one whole image): the rule lives in
the core, once. :func:`plan_step` then maps every token of a step to its index within its image
and looks the answer up; it runs on the tokens' device with one host synchronisation per step
(the stage sizes), like ``stage_plan``.

Nothing here imports vLLM: the scheduler-side KV accounting (:mod:`.kv_groups`) and the tests use
it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Sequence

import torch

from ...schedule import Schedule

__all__ = [
    "ImageKeep", "StepStage", "StepPlan", "ImageRunError", "image_keep", "plan_step",
    "plan_grid_step", "plan_items_step", "plan_from_kept", "plan_text_step", "request_of_token",
]


class ImageKeep:
    """Which of one image's ``H*W`` tokens (raster order) each stage of ``schedule`` keeps.

    ``keep`` is bool ``[stages, H*W]`` (stage 0 keeps all); ``kept_prefix[s][k]`` is how many of
    the image's first ``k`` tokens stage ``s`` keeps (host lists, for the scheduler's block
    accounting).
    """

    def __init__(self, schedule, grid: Sequence[int]) -> None:
        from ... import stage_plan

        self.schedule = Schedule.coerce(schedule)
        self.grid = (int(grid[0]), int(grid[1]))
        hw = self.grid[0] * self.grid[1]
        self.tokens_per_image = hw
        plan = stage_plan(
            self.schedule, input_ids=torch.ones(hw, dtype=torch.int64),
            cu_seqlens=torch.tensor([0, hw], dtype=torch.int32), image_token_id=1, grid=self.grid,
        )
        keep = torch.zeros((len(plan.stages), hw), dtype=torch.bool)
        for s, st in enumerate(plan.stages):
            keep[s, st.source_index.long()] = True
        self.keep = keep
        prefix = torch.zeros((len(plan.stages), hw + 1), dtype=torch.int64)
        prefix[:, 1:] = keep.to(torch.int64).cumsum(1)
        self.kept_prefix: List[List[int]] = prefix.tolist()
        self._on: Dict[torch.device, torch.Tensor] = {}

    @property
    def num_stages(self) -> int:
        return int(self.keep.shape[0])

    def on(self, device) -> torch.Tensor:
        """``keep`` on ``device`` (copied once per device)."""
        device = torch.device(device)
        t = self._on.get(device)
        if t is None:
            t = self._on[device] = self.keep.to(device)
        return t

    def kept(self, stage: int, image_tokens: int) -> int:
        """Tokens stage ``stage`` keeps of the first ``image_tokens`` tokens of a run of adjacent
        images (whole images, then a partial one)."""
        full, rest = divmod(int(image_tokens), self.tokens_per_image)
        row = self.kept_prefix[stage]
        return full * row[-1] + row[rest]


@lru_cache(maxsize=None)
def image_keep(schedule: str, grid_h: int, grid_w: int) -> ImageKeep:
    """The (cached) :class:`ImageKeep` of a schedule's text form and a grid."""
    return ImageKeep(schedule, (grid_h, grid_w))


@dataclass
class StepStage:
    """One stage's token layout in a step (the fields of :class:`adsc_ext.StagePlan` the plugin
    uses). Shapes: ``[T_s]`` tokens, ``[B]`` requests."""

    #: int64 ``[T_s]``: the request of each token
    request: torch.Tensor
    #: int32 ``[T_s]``: row of the previous stage's layout of each token (stage 0: its own row)
    index: torch.Tensor
    #: int32 ``[T_s]``: row of the step's (stage-0) layout of each token
    source_index: torch.Tensor
    #: int32 ``[B+1]``: the requests' token offsets in this stage (device) ...
    cu_seqlens: torch.Tensor
    #: ... and the same on the host (what attention metadata builders want as ``*_cpu``)
    cu_seqlens_cpu: torch.Tensor
    #: int32 ``[B]``: tokens of each request in this stage
    seq_lens: torch.Tensor
    max_seqlen: int
    num_tokens: int


@dataclass
class StepPlan:
    stages: List[StepStage]
    #: int32 ``[B]``: each request's phase after this step (see the module docstring)
    next_phase: torch.Tensor
    #: every stage is the step's own layout (a step without image tokens): nothing to compact
    identity: bool = False


def request_of_token(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 ``[T]``: the request of each token of a packed step (``cu_seqlens [B+1]``; requests
    may be empty). A scatter and a running sum: no reduction or host read, which matter on a
    busy CPU (``repeat_interleave`` with ``output_size`` reduces over threads there)."""
    cu = cu_seqlens.to(torch.int64)
    ends = torch.zeros(num_tokens + 1, dtype=torch.int64, device=cu.device)
    ends.scatter_add_(0, cu[1:], torch.ones_like(cu[1:]))
    return ends[:num_tokens].cumsum(0)


def plan_text_step(num_stages: int, cu_seqlens: torch.Tensor, phase: torch.Tensor) -> StepPlan:
    """The plan of a step without image tokens (decode steps, text chunks): every stage keeps
    every token. One host read (the offsets), nothing else to compute."""
    cu = cu_seqlens.to(torch.int64)
    cu_cpu = cu.cpu()
    T = int(cu_cpu[-1])
    q = cu[1:] - cu[:-1]
    q_cpu = cu_cpu[1:] - cu_cpu[:-1]
    rows = torch.arange(T, device=cu.device, dtype=torch.int32)
    stage = StepStage(
        request=request_of_token(cu, T), index=rows, source_index=rows,
        cu_seqlens=cu.to(torch.int32), cu_seqlens_cpu=cu_cpu.to(torch.int32),
        seq_lens=q.to(torch.int32), max_seqlen=int(q_cpu.max()) if q_cpu.numel() else 0,
        num_tokens=T,
    )
    # a chunk of text ends no image; a request without tokens keeps its phase
    next_phase = torch.where(q > 0, torch.zeros_like(q), phase.to(q)).to(torch.int32)
    return StepPlan(stages=[stage] * num_stages, next_phase=next_phase, identity=True)


def plan_step(
    keep: ImageKeep, is_image: torch.Tensor, cu_seqlens: torch.Tensor, phase: torch.Tensor
) -> StepPlan:
    """Plan one step of packed chunks.

    Args:
        keep: the schedule's :class:`ImageKeep`.
        is_image: bool ``[T]``: the step's image (embedding) tokens.
        cu_seqlens: int ``[B+1]``: each request's chunk, ``0 = cu[0] <= ... <= cu[B] = T``.
        phase: int ``[B]``: image tokens each request's earlier chunks left of an unfinished image
            (``0 <= phase < H*W``).

    Every run of image tokens is a run of adjacent images that starts ``phase`` tokens into its
    first image when it opens the chunk, else on an image's first token; the multimodal
    processor guarantees that each image is exactly ``H*W`` tokens (``model.ImageGridError``).
    """
    device = is_image.device
    T = int(is_image.shape[0])
    hw = keep.tokens_per_image
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    q = cu[1:] - cu[:-1]  # [B]
    rows = torch.arange(T, device=device)
    req = request_of_token(cu, T)  # [T]
    local = rows - cu[:-1][req]  # index within the request's chunk

    # Where the image run of each token started, in chunk-local indices: one past the last text
    # token before it, or -phase when the chunk opens with image tokens. A segmented running max
    # (requests shifted apart by K) finds it for every token at once.
    anchor = torch.where(is_image, torch.full_like(local, -hw), local + 1)
    opens = is_image & (local == 0)
    anchor = torch.where(opens, -phase.to(device=device, dtype=torch.int64)[req], anchor)
    K = T + hw + 1
    shift = req * K
    run_start = torch.cummax(anchor + shift, dim=0).values - shift  # [T]
    within = torch.where(is_image, (local - run_start).remainder(hw), torch.zeros_like(local))

    # keep_s[t]: text, or an image token whose place in its image stage s keeps
    kept = keep.on(device)[:, within] | ~is_image  # [S, T] bool
    last = (cu[1:] - 1).clamp(min=0)
    ended = (q - run_start[last]).remainder(hw) if T else torch.zeros_like(q)
    next_phase = torch.where(q > 0, ended, phase.to(device=device, dtype=torch.int64))
    return plan_from_kept(kept, cu, req, next_phase)


def plan_from_kept(kept: torch.Tensor, cu: torch.Tensor, req: torch.Tensor, next_phase: torch.Tensor) -> StepPlan:
    """The step's stages from ``kept`` (bool ``[S, T]``: which tokens each stage keeps, stage 0
    all), ``cu`` (int64 ``[B+1]``), ``req`` (the request of each token) and each request's phase
    after the step. Shared by every per-step planner (one grid, or a grid per image)."""
    S, T = int(kept.shape[0]), int(kept.shape[1])
    B = int(cu.shape[0]) - 1
    device = kept.device
    rows = torch.arange(T, device=device)
    counts = torch.zeros((S, T + 1), dtype=torch.int64, device=device)
    counts[:, 1:] = kept.to(torch.int64).cumsum(1)
    seq_lens = counts[:, cu[1:]] - counts[:, cu[:-1]]  # [S, B]
    cu_s = torch.zeros((S, B + 1), dtype=torch.int64, device=device)
    cu_s[:, 1:] = seq_lens.cumsum(1)
    longest = seq_lens.amax(dim=1) if B else torch.zeros(S, dtype=torch.int64, device=device)
    # The one host synchronisation: stage sizes, longest requests and offsets.
    host = torch.cat([counts[:, T:], longest[:, None], cu_s], dim=1).cpu()  # [S, 2 + B+1]

    stages: List[StepStage] = []
    prev_row = rows  # row of each step token in the previous stage's layout (where kept)
    for s in range(S):
        n = int(host[s, 0])
        if s == 0:
            source = rows
            index = rows
        else:
            # kept tokens in order: scatter each to its rank (dropped ones to a spare slot n)
            dest = torch.where(kept[s], counts[s, 1:] - 1, torch.full_like(rows, n))
            source = torch.empty(n + 1, dtype=torch.int64, device=device).scatter_(0, dest, rows)[:n]
            index = prev_row[source]
        prev_row = counts[s, 1:] - 1
        stages.append(
            StepStage(
                request=req[source],
                index=index.to(torch.int32),
                source_index=source.to(torch.int32),
                cu_seqlens=cu_s[s].to(torch.int32),
                cu_seqlens_cpu=host[s, 2:].to(torch.int32),
                seq_lens=seq_lens[s].to(torch.int32),
                max_seqlen=int(host[s, 1]),
                num_tokens=n,
            )
        )
    return StepPlan(stages=stages, next_phase=next_phase.to(torch.int32))



class ImageRunError(ValueError):
    """A step's run of image tokens is not one whole image whose grid its M-RoPE positions give."""


def plan_grid_step(schedule, is_image: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor) -> StepPlan:
    """Plan one step whose images each have their own grid (Qwen2-VL / Qwen2.5-VL): every run of
    image (or video) tokens is one whole image or video, its grid read from its M-RoPE positions.

    Args:
        schedule: the ADSC schedule (its text form or a :class:`~adsc_ext.Schedule`).
        is_image: bool ``[T]``: the step's image and video (embedding) tokens.
        positions: int ``[3, T]``: the step's M-RoPE positions. Inside an image that starts at
            rotary index ``s`` the rows are ``(s, s + r, s + c)`` for the token at row ``r`` and
            column ``c`` of the merged grid (``get_rope_index``), so ``r`` and ``c`` are the
            height and width rows minus ``s`` (the temporal row of the run's first token), and
            the grid is their largest values plus one. A video is ``t`` such grids in a row (its
            temporal row moves on per frame, the other two repeat); each frame is downsampled as
            an image of the grid (spec section 3), so a token's place in its frame is
            ``r * w + c`` in every frame.
        cu_seqlens: int ``[B+1]``: each request's chunk.

    Each run must be one whole image or video: it starts at ``(r, c) = (0, 0)`` and holds a whole
    number of ``h * w`` frames; a run that does not raises :class:`ImageRunError` (a chunk that
    starts inside an image, or ends inside one but not at the end of a grid row). A chunk that ends
    inside an image exactly at the end of a row looks like a whole smaller image: the positions
    cannot tell, so images split across chunks must not reach this plan. The plugin's scheduler
    keeps every image of such a model inside one chunk (:mod:`.kv_groups`). Two host reads: the
    runs' grids, then the stage sizes.
    """
    schedule = Schedule.coerce(schedule)
    text = str(schedule)
    device = is_image.device
    T = int(is_image.shape[0])
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    req = request_of_token(cu, T)
    if positions.dim() != 2 or positions.shape[0] != 3 or positions.shape[1] < T:
        raise ImageRunError(
            f"per-image grids need the step's M-RoPE positions [3, >= {T}], got {tuple(positions.shape)}"
        )
    pos = positions[:, :T].to(device=device, dtype=torch.int64)
    rows = torch.arange(T, device=device)
    local = rows - cu[:-1][req]
    prev_image = torch.zeros_like(is_image)
    prev_image[1:] = is_image[:-1]
    starts = is_image & ((local == 0) | ~prev_image)
    run = starts.to(torch.int64).cumsum(0) - 1  # run of each image token (text: meaningless)
    run = torch.where(is_image, run, torch.zeros_like(run))
    R = int(starts.sum())  # host read 1
    if R == 0:
        kept = torch.ones((len(schedule) + 1, T), dtype=torch.bool, device=device)
        return plan_from_kept(kept, cu, req, torch.zeros_like(cu[1:]))
    first = rows[starts]
    s0 = pos[0, first][run]  # the temporal row of each token's run start
    r = pos[1] - s0
    c = pos[2] - s0
    img = is_image.to(torch.int64)
    gh = torch.zeros(R, dtype=torch.int64, device=device).scatter_reduce_(
        0, run, torch.where(is_image, r, torch.zeros_like(r)), "amax", include_self=True) + 1
    gw = torch.zeros(R, dtype=torch.int64, device=device).scatter_reduce_(
        0, run, torch.where(is_image, c, torch.zeros_like(c)), "amax", include_self=True) + 1
    n = torch.zeros(R, dtype=torch.int64, device=device).scatter_add_(0, run, img)
    low = torch.full((R,), 1 << 40, dtype=torch.int64, device=device).scatter_reduce_(
        0, run, torch.where(is_image, torch.minimum(r, c), torch.full_like(r, 1 << 40)), "amin", include_self=True)
    head_ok = (r[first] == 0) & (c[first] == 0)
    host = torch.stack([gh, gw, n, low, head_ok.to(torch.int64), req[first]], dim=1).cpu().tolist()  # host read 2
    grids: Dict[tuple, int] = {}
    tables = []
    offset = 0
    run_offset = []
    for k, (h, w, cnt, lo, head, b) in enumerate(host):
        if cnt % (h * w) or lo < 0 or not head:
            raise ImageRunError(
                f"request {b} of this step: its run {k} of {cnt} vision tokens is not one whole "
                f"image or video (its M-RoPE positions span a {h}x{w} grid and start at (r, c) "
                f"{'(0, 0)' if head else 'other than (0, 0)'}): ADSC plans each image and video of "
                f"this model whole, inside one chunk"
            )
        if (h, w) not in grids:
            grids[(h, w)] = offset
            tables.append(image_keep(text, h, w).on(device))
            offset += h * w
        run_offset.append(grids[(h, w)])
    flat = torch.cat(tables, dim=1)  # [S, sum of distinct grids' tokens]
    base = torch.tensor(run_offset, dtype=torch.int64, device=device)
    index = torch.where(is_image, base[run] + r * gw[run] + c, torch.zeros_like(r))
    kept = flat[:, index] | ~is_image
    return plan_from_kept(kept, cu, req, torch.zeros_like(cu[1:]))


def plan_items_step(schedule, is_image: torch.Tensor, cu_seqlens: torch.Tensor, items) -> StepPlan:
    """Plan one step whose images each have their own layout of grids (LLaVA-OneVision's anyres:
    a base grid, then a high-resolution grid whose rows end with a newline token), given as
    ``items``: the step's multimodal items in the order their embeddings fill the ``is_image``
    rows (requests in step order, items in prompt order), each an
    :class:`~adsc_ext.models.llava_next.ImageItem` (``tokens``, ``units = (offset, h, w, newline)``).

    Every item must lie whole inside the step (the plugin's scheduler keeps each item of such a
    model inside one chunk): the items' tokens must be exactly the step's ``is_image`` rows.
    Item ``k`` starts at the ``sum(tokens of items < k)``-th image row; its units become the
    ``[N, 5]`` image spans of the compiled plan (:func:`adsc_ext.stage_plan`), which keeps of each
    unit what ``apply_adsc`` keeps (tokens of no unit, such as a trailing newline, are kept like
    text). Two host reads: the image rows (with the step's offsets, in one copy), then the stage
    sizes.
    """
    from ... import stage_plan

    schedule = Schedule.coerce(schedule)
    device = is_image.device
    T = int(is_image.shape[0])
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    req = request_of_token(cu, T)
    rows = is_image.nonzero().flatten()
    n_img = int(rows.numel())
    total = sum(int(it.tokens) for it in items)
    if total != n_img:
        raise ImageRunError(
            f"this step has {n_img} image tokens but its {len(items)} image item(s) give {total} "
            f"embedding rows: ADSC plans each image of this model whole, inside one chunk"
        )
    if n_img == 0:
        kept = torch.ones((len(schedule) + 1, T), dtype=torch.bool, device=device)
        return plan_from_kept(kept, cu, req, torch.zeros_like(cu[1:]))
    # one copy to the host of what the loop reads (nonzero above already waited for the device)
    host = torch.cat([rows, cu, req.to(torch.int64)]).cpu().tolist()
    rows_h, cu_h, req_h = host[:n_img], host[n_img:n_img + cu.numel()], host[n_img + cu.numel():]
    spans = []
    first = 0
    for k, it in enumerate(items):
        start = rows_h[first]
        end = rows_h[first + it.tokens - 1]
        b = req_h[start]
        if end - start + 1 != it.tokens or req_h[end] != b:
            raise ImageRunError(
                f"image item {k} of this step ({it.tokens} tokens) is not one run of consecutive image "
                f"tokens of one request"
            )
        local = start - cu_h[b]
        spans += [(b, local + off, h, w, nl) for off, h, w, nl in it.units]
        first += it.tokens
    spans_t = torch.tensor(spans, dtype=torch.int64, device=device).reshape(-1, 5)
    plan = stage_plan(schedule, cu_seqlens=cu.to(torch.int32), image_spans=spans_t)
    kept = torch.zeros((len(plan.stages), T), dtype=torch.bool, device=device)
    for s, st in enumerate(plan.stages):
        kept[s, st.source_index.long()] = True
    return plan_from_kept(kept, cu, req, torch.zeros_like(cu[1:]))
