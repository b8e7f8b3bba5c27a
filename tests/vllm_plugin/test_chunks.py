"""The plugin's per-step plan (``integrations/vllm/chunks.py``) against the compiled whole-sequence
plan: however a batch of prompts is cut into chunks (inside images too), the tokens each stage
keeps, chunk after chunk, are exactly those :func:`adsc_ext.stage_plan` keeps for the whole
prompts. No engine: these run in a second or two (they need no vLLM, only the plugin's venv).
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adsc_ext import stage_plan
from adsc_ext.integrations.vllm.chunks import ImageKeep, image_keep, plan_step
from adsc_ext.reference import kept_image_indices

#: (grid, schedule) pairs the tests draw from: square, wide and odd grids, factors 2 and 4
CASES = [((4, 4), "2:2,4:2"), ((3, 5), "1:2,2:2"), ((2, 6), "3:4"), ((24, 24), "2:2,4:2"), ((5, 3), "1:4")]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("grid,schedule", CASES)
def test_image_keep_is_the_spec_rule(grid, schedule):
    keep = ImageKeep(schedule, grid)
    want = kept_image_indices(grid, schedule)
    assert [torch.nonzero(row).flatten().tolist() for row in keep.keep] == want
    hw = grid[0] * grid[1]
    for s, kept in enumerate(want):
        assert [keep.kept(s, k) for k in range(hw + 1)] == [sum(i < k for i in kept) for k in range(hw + 1)]
        assert keep.kept(s, 2 * hw + 3) == 2 * len(kept) + sum(i < 3 for i in kept)
    assert image_keep(schedule, *grid) is image_keep(schedule, *grid)  # cached


def _sequence(rng: random.Random, hw: int):
    """A prompt as image flags: text runs and runs of 1-3 adjacent images, 0-3 runs of images."""
    flags = [False] * rng.randint(1, 4)
    for _ in range(rng.randint(0, 3)):
        flags += [True] * (hw * rng.randint(1, 3))
        flags += [False] * rng.randint(0, 3)
    return flags


def _whole_plan(seqs, grid, schedule):
    """Kept positions per stage per sequence, from the compiled plan of the whole prompts."""
    ids = torch.tensor([int(f) for s in seqs for f in s], dtype=torch.int64)
    cu = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    plan = stage_plan(schedule, input_ids=ids, cu_seqlens=cu, image_token_id=1, grid=grid)
    starts = cu.tolist()
    out = []
    for st_ in plan.stages:
        per = [[] for _ in seqs]
        for row in st_.source_index.tolist():
            b = max(i for i in range(len(seqs)) if starts[i] <= row)
            per[b].append(row - starts[b])
        out.append(per)
    return out


def _check_step(plan, keep, is_image, cu):
    """Internal consistency of one step's plan."""
    T = is_image.shape[0]
    prev_source = torch.arange(T)
    for s, stage in enumerate(plan.stages):
        src = stage.source_index.long().cpu()
        assert stage.num_tokens == src.shape[0] == stage.index.shape[0]
        assert torch.equal(prev_source[stage.index.long().cpu()], src)  # index: rows of stage s-1
        assert torch.equal(stage.cu_seqlens.cpu(), stage.cu_seqlens_cpu)
        lens = stage.cu_seqlens_cpu[1:] - stage.cu_seqlens_cpu[:-1]
        assert torch.equal(lens, stage.seq_lens.cpu())
        assert stage.max_seqlen == (int(lens.max()) if lens.numel() else 0)
        for t in (stage.index, stage.source_index, stage.cu_seqlens, stage.seq_lens):
            assert t.dtype == torch.int32
        assert src.tolist() == sorted(src.tolist())  # kept tokens stay in order
        prev_source = src
    assert plan.stages[0].num_tokens == T


def _run_chunked(seqs, grid, schedule, cuts, device="cpu", order=None):
    """Feed ``seqs`` chunk by chunk (``cuts[b]``: chunk ends of sequence ``b``), several
    requests per step; returns kept positions per stage per sequence and the phases seen."""
    keep = ImageKeep(schedule, grid)
    S = keep.num_stages
    hw = keep.tokens_per_image
    got = [[[] for _ in seqs] for _ in range(S)]
    done = [0] * len(seqs)
    phase = [0] * len(seqs)
    pending = [list(c) for c in cuts]
    while any(pending):
        # a step: some requests (at least one) with their next chunk
        live = [b for b in range(len(seqs)) if pending[b]]
        step = [b for b in live if (order or random).random() < 0.7] or live[:1]
        flags, cu, ph = [], [0], []
        for b in step:
            end = pending[b].pop(0)
            flags += seqs[b][done[b]:end]
            cu.append(cu[-1] + end - done[b])
            ph.append(phase[b])
        is_image = torch.tensor(flags, dtype=torch.bool, device=device)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
        plan = plan_step(keep, is_image, cu_t, torch.tensor(ph, dtype=torch.int32, device=device))
        _check_step(plan, keep, is_image.cpu(), cu_t)
        for s, stage in enumerate(plan.stages):
            for row in stage.source_index.tolist():
                i = max(i for i in range(len(step)) if cu[i] <= row)
                b = step[i]
                got[s][b].append(done[b] + row - cu[i])
        for i, b in enumerate(step):
            done[b] = cu[i + 1] - cu[i] + done[b]
            phase[b] = int(plan.next_phase[i])
            # the phase is the unfinished image's tokens so far
            trail = 0
            while trail < done[b] and seqs[b][done[b] - 1 - trail]:
                trail += 1
            assert phase[b] == trail % hw
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid,schedule", CASES)
def test_chunks_cut_inside_images_keep_what_the_whole_prompt_keeps(grid, schedule, device):
    rng = random.Random(hash((grid, schedule)) & 0xFFFF)
    hw = grid[0] * grid[1]
    for _ in range(5):
        seqs = [_sequence(rng, hw) for _ in range(rng.randint(1, 4))]
        cuts = []
        for s in seqs:
            n = rng.randint(1, min(6, len(s)))
            cuts.append(sorted(set(rng.sample(range(1, len(s)), n - 1)) | {len(s)}) if len(s) > 1 else [1])
        assert _run_chunked(seqs, grid, schedule, cuts, device, rng) == _whole_plan(seqs, grid, schedule)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_chunkings(data):
    grid, schedule = data.draw(st.sampled_from(CASES[:3] + CASES[4:]))
    hw = grid[0] * grid[1]
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1)))
    seqs = [_sequence(rng, hw) for _ in range(data.draw(st.integers(1, 3)))]
    cuts = []
    for s in seqs:
        points = data.draw(st.lists(st.integers(1, len(s)), max_size=8))
        cuts.append(sorted(set(points) | {len(s)}))
    assert _run_chunked(seqs, grid, schedule, cuts, order=rng) == _whole_plan(seqs, grid, schedule)


def test_one_token_chunks():
    """The extreme schedule: every chunk one token (a prefill token by token)."""
    grid, schedule = (4, 4), "2:2,4:2"
    rng = random.Random(7)
    seqs = [_sequence(rng, 16) for _ in range(3)]
    cuts = [list(range(1, len(s) + 1)) for s in seqs]
    assert _run_chunked(seqs, grid, schedule, cuts, order=rng) == _whole_plan(seqs, grid, schedule)


def test_the_issue_cases_in_one_step():
    """Issue 21's two failures as one step: a chunk holding an image's first 256 tokens, and one
    starting 21 tokens into an image (555 tokens), next to a decode token."""
    keep = ImageKeep("2:2,4:2", (24, 24))
    is_image = torch.tensor([True] * 256 + [True] * 555 + [False] * 4 + [False], dtype=torch.bool)
    cu = torch.tensor([0, 256, 815, 816], dtype=torch.int32)
    plan = plan_step(keep, is_image, cu, torch.tensor([0, 21, 0], dtype=torch.int32))
    first = keep.kept_prefix
    assert plan.stages[1].seq_lens.tolist() == [first[1][256], first[1][576] - first[1][21] + 4, 1]
    assert plan.stages[2].seq_lens.tolist() == [first[2][256], first[2][576] - first[2][21] + 4, 1]
    assert plan.next_phase.tolist() == [256, 0, 0]


def test_requests_without_tokens_and_empty_steps():
    keep = ImageKeep("2:2,4:2", (4, 4))
    plan = plan_step(keep, torch.zeros(0, dtype=torch.bool), torch.zeros(1, dtype=torch.int32),
                     torch.zeros(0, dtype=torch.int32))
    assert [s.num_tokens for s in plan.stages] == [0, 0, 0] and plan.next_phase.numel() == 0
    # a request with no tokens this step keeps its phase
    is_image = torch.tensor([True] * 5, dtype=torch.bool)
    plan = plan_step(keep, is_image, torch.tensor([0, 0, 5], dtype=torch.int32), torch.tensor([7, 3], dtype=torch.int32))
    assert plan.next_phase.tolist() == [7, 8]
    assert plan.stages[0].seq_lens.tolist() == [0, 5]


def test_strided_inputs():
    """A mask and offsets that are views of larger tensors (the runner's buffers)."""
    keep = ImageKeep("2:2,4:2", (4, 4))
    mask = torch.tensor([False] * 2 + [True] * 16 + [False] * 2, dtype=torch.bool)
    is_image = torch.zeros(40, dtype=torch.bool)
    is_image[::2] = mask
    view = is_image[::2]
    assert not view.is_contiguous()
    cu = torch.tensor([0, 0, 10, 0, 20, 0], dtype=torch.int64)[::2]
    want = plan_step(keep, mask, cu.contiguous(), torch.zeros(2, dtype=torch.int32))
    got = plan_step(keep, view, cu, torch.zeros(2, dtype=torch.int32))
    for a, b in zip(want.stages, got.stages):
        assert torch.equal(a.source_index, b.source_index) and torch.equal(a.index, b.index)


@pytest.mark.parametrize("device", DEVICES)
def test_text_step_plan_is_the_plan_without_images(device):
    """``plan_text_step`` (decode steps and text chunks: the runner has no image embeddings for
    the step) equals ``plan_step`` on an all-text mask, and moves no phase of an empty request."""
    from adsc_ext.integrations.vllm.chunks import plan_text_step

    keep = ImageKeep("2:2,4:2", (4, 4))
    cu = torch.tensor([0, 1, 1, 9, 10], dtype=torch.int32, device=device)
    phase = torch.tensor([0, 5, 0, 0], dtype=torch.int32, device=device)
    want = plan_step(keep, torch.zeros(10, dtype=torch.bool, device=device), cu, phase)
    got = plan_text_step(keep.num_stages, cu, phase)
    assert got.identity and not want.identity
    assert torch.equal(got.next_phase, want.next_phase) and got.next_phase.tolist() == [0, 5, 0, 0]
    for a, b in zip(want.stages, got.stages):
        for field in ("request", "index", "source_index", "cu_seqlens", "cu_seqlens_cpu", "seq_lens"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), field
        assert (a.max_seqlen, a.num_tokens) == (b.max_seqlen, b.num_tokens)
