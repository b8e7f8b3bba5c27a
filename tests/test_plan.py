"""The plan op (sequence re-indexing) against the plain-PyTorch reference, bit for bit."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import adsc_ext
from adsc_ext import Schedule, ScheduleError, stage_plan
from adsc_ext.reference import kept_image_indices, stage_plan_reference
from conftest import DEVICES

IMG = 32000  # image token id (LLaVA-1.5's is 32000)
MASK_DTYPES = [torch.bool, torch.int64, torch.int32, torch.uint8]


def assert_plans_equal(got, want):
    assert got.layout == want.layout and got.batch_size == want.batch_size
    assert got.schedule == want.schedule and len(got) == len(want)
    for g, w in zip(got.stages, want.stages):
        assert (g.stage, g.first_layer, g.max_seqlen, g.num_tokens) == (
            w.stage, w.first_layer, w.max_seqlen, w.num_tokens)
        for name in ("index", "source_index", "position_ids", "cu_seqlens", "seq_lens"):
            a, b = getattr(g, name), getattr(w, name)
            assert a.dtype == b.dtype, name
            assert a.device.type == b.device.type, name
            assert torch.equal(a.cpu(), b.cpu()), f"stage {g.stage} {name}:\n{a}\n!=\n{b}"


def random_sequence(rng, grid, max_pieces=4, text_only=False):
    """Token ids: text and runs of one or two whole images."""
    seq = []
    for _ in range(rng.randint(0, max_pieces)):
        if not text_only and rng.random() < 0.4:
            seq += [IMG] * (grid[0] * grid[1] * rng.randint(1, 2))
        else:
            seq += [rng.randint(1, 500) for _ in range(rng.randint(1, 6))]
    return seq


def packed(seqs, device="cpu"):
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=device)
    cu = torch.tensor([0] + [sum(map(len, seqs[: i + 1])) for i in range(len(seqs))],
                      dtype=torch.int32, device=device)
    return dict(input_ids=ids, cu_seqlens=cu)


def padded(seqs, side="left", extra=0, mask_dtype=torch.int64, device="cpu", rng=None):
    """[B, S] with padding on `side` ('mixed' picks per row, 'holes' puts it anywhere)."""
    S = max([len(s) for s in seqs], default=0) + extra
    ids = torch.zeros(len(seqs), S, dtype=torch.int64)
    mask = torch.zeros(len(seqs), S, dtype=mask_dtype)
    for b, s in enumerate(seqs):
        if side == "holes":  # padding anywhere, inside the sequence too
            slots = sorted(rng.sample(range(S), len(s)))
        else:
            row_side = side if side != "mixed" else rng.choice(["left", "right"])
            start = S - len(s) if row_side == "left" else 0
            slots = list(range(start, start + len(s)))
        ids[b, slots] = torch.tensor(s, dtype=torch.int64)
        mask[b, slots] = 1
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device))


def check(schedule, grid, batch, device="cpu", **kw):
    got = stage_plan(schedule, image_token_id=IMG, grid=grid, **batch, **kw)
    want = stage_plan_reference(schedule, image_token_id=IMG, grid=grid,
                                **{k: v.cpu() for k, v in batch.items()}, **kw)
    assert_plans_equal(got, want)
    if device != "cpu":
        assert got.stages[-1].index.device.type == "cuda"
    return got


@pytest.mark.parametrize("device", DEVICES)
def test_worked_example(device):
    """Spec section 4: an 8x8 image at positions 3..66, schedule 2:2,4:2,6:2."""
    ids = torch.full((70,), 7, dtype=torch.int64)
    ids[3:67] = IMG
    plan = check("2:2,4:2,6:2", (8, 8), packed([ids.tolist()], device), device)
    image_positions = [p for p in plan.stages[3].position_ids.tolist() if 3 <= p <= 66]
    assert image_positions == [14, 18, 30, 34, 46, 50, 62, 66]
    assert [s.num_tokens for s in plan.stages] == [70, 6 + 32, 6 + 16, 6 + 8]
    assert [s.first_layer for s in plan.stages] == [0, 2, 4, 6]
    # Stage 1 keeps columns 1,3,5,7 of every row: its first image slot comes from position 4.
    assert plan.stages[1].index[3].item() == 4


@pytest.mark.parametrize("device", DEVICES)
def test_llava_batch_mixed_image_counts(device):
    """LLaVA-1.5 shape: 24x24 images, default schedule, rows with 0, 1 and 2 images."""
    seqs = [[1, 2, 3], [5] * 4 + [IMG] * 576 + [9] * 30, [IMG] * 576 + [4] + [IMG] * 576 + [8, 8]]
    plan = check(adsc_ext.LLAVA15_DEFAULT, (24, 24), packed(seqs, device), device)
    assert plan.stages[3].seq_lens.tolist() == [3, 34 + 72, 72 + 1 + 72 + 2]
    for side in ("left", "right"):
        plan = check(adsc_ext.LLAVA15_DEFAULT, (24, 24), padded(seqs, side, device=device),
                     device, padding_side=side)
        assert plan.stages[3].index.shape == (3, 147)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid, schedule", [((7, 5), "1:2,2:2,3:2"), ((5, 7), "1:4,3:2"),
                                            ((3, 1), "2:2"), ((4, 4), "1:4,2:4"), ((1, 2), "1:2")])
def test_odd_grids_and_factor_4(device, grid, schedule):
    rng = random.Random(hash((grid, schedule)) & 0xFFFF)
    seqs = [random_sequence(rng, grid) for _ in range(6)] + [[IMG] * (grid[0] * grid[1])]
    check(schedule, grid, packed(seqs, device), device)
    check(schedule, grid, padded(seqs, "left", device=device), device, padding_side="left")
    check(schedule, grid, padded(seqs, "right", device=device), device, padding_side="right")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_padded_mixed_padding_and_mask_dtypes(device, mask_dtype):
    rng = random.Random(3)
    seqs = [random_sequence(rng, (3, 3)) for _ in range(5)]
    for out_side in ("left", "right"):
        batch = padded(seqs, "mixed", extra=2, mask_dtype=mask_dtype, device=device, rng=rng)
        plan = check("1:2,2:2", (3, 3), batch, device, padding_side=out_side)
        # Padding slots of the compacted stages sit on the requested side.
        m = plan.stages[2].attention_mask
        lens = plan.stages[2].seq_lens
        for b in range(m.shape[0]):
            real = m[b].nonzero().flatten().tolist()
            width = m.shape[1]
            want = list(range(width - lens[b], width)) if out_side == "left" else list(range(lens[b]))
            assert real == want


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batches_and_sequences(device):
    empty_ids = torch.zeros(0, dtype=torch.int64, device=device)
    # B = 0
    plan = check("1:2", (2, 2), dict(input_ids=empty_ids,
                                     cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device)), device)
    assert [s.num_tokens for s in plan.stages] == [0, 0] and plan.stages[1].max_seqlen == 0
    # empty sequences among others
    check("1:2", (2, 2), packed([[], [IMG] * 4 + [1], [], [2]], device), device)
    # all sequences empty
    check("1:2", (2, 2), packed([[], []], device), device)
    # padded with zero width and with zero rows
    check("1:2", (2, 2), dict(input_ids=torch.zeros(2, 0, dtype=torch.int64, device=device),
                              attention_mask=torch.zeros(2, 0, dtype=torch.bool, device=device)), device)
    check("1:2", (2, 2), dict(input_ids=torch.zeros(0, 4, dtype=torch.int64, device=device),
                              attention_mask=torch.zeros(0, 4, dtype=torch.bool, device=device)), device)


@pytest.mark.parametrize("device", DEVICES)
def test_no_images_and_empty_schedule(device):
    rng = random.Random(4)
    seqs = [random_sequence(rng, (2, 2), text_only=True) for _ in range(4)]
    plan = check("1:2,2:2", (2, 2), packed(seqs, device), device)
    for s in plan.stages[1:]:  # text is never dropped
        assert torch.equal(s.source_index, plan.stages[0].source_index)
    seqs = [random_sequence(rng, (2, 2)) for _ in range(4)]
    plan = check("", (2, 2), packed(seqs, device), device)
    assert len(plan) == 1
    assert torch.equal(plan.stages[0].index.cpu(), torch.arange(sum(map(len, seqs)), dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_spans_with_different_grids(device):
    """Spans give each image its own grid; input_ids are not needed."""
    spans = torch.tensor([[0, 1, 7, 5], [0, 36, 2, 2], [2, 0, 3, 1], [2, 3, 4, 8]], device=device)
    cu = torch.tensor([0, 40, 40, 75], dtype=torch.int32, device=device)
    got = stage_plan("1:2,2:2", cu_seqlens=cu, image_spans=spans)
    want = stage_plan_reference("1:2,2:2", cu_seqlens=cu.cpu(), image_spans=spans.cpu())
    assert_plans_equal(got, want)
    kept = kept_image_indices((7, 5), "1:2,2:2")[2]
    n0 = got.stages[2].cu_seqlens[1].item()
    image0 = [p for p in got.stages[2].position_ids[:n0].tolist() if 1 <= p < 36]
    assert image0 == [1 + r for r in kept]
    # Padded layout with spans (positions count real tokens only).
    batch = padded([[1] * 40, [], [1] * 35], "left", extra=1, device=device)
    got = stage_plan("1:2", attention_mask=batch["attention_mask"], image_spans=spans)
    want = stage_plan_reference("1:2", attention_mask=batch["attention_mask"].cpu(),
                                image_spans=spans.cpu())
    assert_plans_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_int64_inputs(device):
    rng = random.Random(5)
    seqs = [random_sequence(rng, (2, 3)) for _ in range(4)]
    batch = packed(seqs, device)
    wide = torch.stack([batch["input_ids"], torch.zeros_like(batch["input_ids"])], dim=1)
    ids = wide[:, 0]  # stride 2
    assert not ids.is_contiguous()
    cu64 = batch["cu_seqlens"].to(torch.int64)
    got = stage_plan("1:2", input_ids=ids, cu_seqlens=cu64, image_token_id=IMG, grid=(2, 3))
    want = stage_plan_reference("1:2", input_ids=ids.cpu(), cu_seqlens=cu64.cpu(),
                                image_token_id=IMG, grid=(2, 3))
    assert_plans_equal(got, want)
    pb = padded(seqs, "left", device=device)
    ids_t = pb["input_ids"].t().contiguous().t()  # column-major
    mask_t = pb["attention_mask"].t().contiguous().t()
    assert not ids_t.is_contiguous()
    got = stage_plan("1:2", input_ids=ids_t, attention_mask=mask_t, image_token_id=IMG, grid=(2, 3))
    want = stage_plan_reference("1:2", input_ids=ids_t.cpu(), attention_mask=mask_t.cpu(),
                                image_token_id=IMG, grid=(2, 3))
    assert_plans_equal(got, want)


def test_stage_of_layer_and_compaction_chain():
    """Composing the stage indices equals gathering by source_index from the input."""
    rng = random.Random(6)
    seqs = [random_sequence(rng, (4, 4)) for _ in range(5)]
    batch = padded(seqs, "left")
    plan = stage_plan("2:2,4:4", image_token_id=IMG, grid=(4, 4), **batch)
    assert plan.stage_of_layer(1).stage == 0 and plan.stage_of_layer(4).stage == 2
    x = torch.randn(*batch["input_ids"].shape, 8)
    h = adsc_ext.compact_tokens(x, plan.stages[0].index)
    for s in plan.stages[1:]:
        h = adsc_ext.compact_tokens(h, s.index)
        direct = adsc_ext.compact_tokens(x, s.source_index)
        assert torch.equal(h, direct)
        pos = adsc_ext.compact_tokens(batch["attention_mask"].cumsum(-1) - 1, s.source_index)
        assert torch.equal(pos[s.attention_mask], s.position_ids[s.attention_mask])


def test_opcheck_plan_ops():
    seqs = [[1, IMG, IMG, IMG, IMG, 2], [3]]
    b = packed(seqs)
    torch.library.opcheck(torch.ops.adsc.stage_plan_packed,
                          (b["input_ids"], b["cu_seqlens"], None, 7, IMG, 2, 2, [2]))
    p = padded(seqs)
    torch.library.opcheck(torch.ops.adsc.stage_plan_padded,
                          (p["input_ids"], p["attention_mask"], None, IMG, 2, 2, [2, 2], True))


# ---- spans with newline tokens (LLaVA-NeXT / OneVision anyres) and per-image grids ----------------
def check_spans(schedule, batch, spans, **kw):
    got = stage_plan(schedule, image_spans=spans, **batch, **kw)
    want = stage_plan_reference(schedule, image_spans=spans.cpu(),
                                **{k: v.cpu() for k, v in batch.items()}, **kw)
    assert_plans_equal(got, want)
    return got


def test_kept_image_indices_with_newlines():
    """Spec section 3, by hand: a 2x3 grid + newlines is offsets 0 1 2 [3] / 4 5 6 [7]."""
    assert kept_image_indices((2, 3), "1:2", newline=True) == [
        [0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 5, 6, 7]]          # columns 1, 2 + both newlines
    assert kept_image_indices((2, 3), "1:2,2:2,3:2", newline=True)[1:] == [
        [1, 2, 3, 5, 6, 7], [2, 3, 6, 7], [6, 7]]               # 2x2 -> width; 2x1 -> rows
    assert kept_image_indices((2, 3), "1:4", newline=True)[1] == [5, 6, 7]
    # without newline: raster indices, as before
    assert kept_image_indices((2, 3), "1:4")[1] == [4, 5]
    # the newline column never counts as a column: 3x2 + newline halves its rows (h > w)
    assert kept_image_indices((3, 2), "1:2", newline=True)[1] == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("device", DEVICES)
def test_newline_spans_worked_example(device):
    """A 2x3 grid + newlines at positions 1..8 of a 10-token sequence."""
    cu = torch.tensor([0, 10], dtype=torch.int32, device=device)
    spans = torch.tensor([[0, 1, 2, 3, 1]], device=device)
    for schedule, last in [("1:2", [0, 2, 3, 4, 6, 7, 8, 9]), ("1:2,2:2", [0, 3, 4, 7, 8, 9]),
                           ("1:2,2:2,3:2", [0, 7, 8, 9]), ("1:4", [0, 6, 7, 8, 9])]:
        plan = check_spans(schedule, dict(cu_seqlens=cu), spans)
        assert plan.stages[-1].position_ids.tolist() == last
    # newline = 0 in a 5-column span is the plain 4-column span
    plain = torch.tensor([[0, 1, 2, 3]], device=device)
    a = stage_plan("1:2,2:2", cu_seqlens=cu, image_spans=plain)
    b = stage_plan("1:2,2:2", cu_seqlens=cu, image_spans=torch.cat([plain, plain[:, :1] * 0], 1))
    assert_plans_equal(a, b)


def random_span_batch(rng, schedule, max_seqs=5, newline_share=0.5, grids=None):
    """Sequences of text and spans of their own grids (some with newline tokens), grids the
    schedule can downsample."""
    schedule = Schedule.coerce(schedule)
    seqs, spans = [], []
    for b in range(rng.randint(1, max_seqs)):
        n = 0
        for _ in range(rng.randint(0, 4)):
            h, w = rng.choice(grids) if grids else (rng.randint(2, 7), rng.randint(2, 7))
            try:
                schedule.grids((h, w))
            except ScheduleError:
                continue
            if rng.random() < 0.5:
                nl = int(rng.random() < newline_share)
                spans.append([b, n, h, w, nl])
                n += h * (w + nl)
            else:
                n += rng.randint(1, 4)
        seqs.append([1] * n)
    return seqs, torch.tensor(spans, dtype=torch.int64).reshape(-1, 5)


def layout_only(batch):
    """A batch's layout tensors (cu_seqlens or attention_mask): spans give the images."""
    return {k: v for k, v in batch.items() if k != "input_ids"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["1:2", "1:4", "1:2,2:2", "2:4,3:2", ""])
def test_mixed_newline_and_plain_spans_packed_and_padded(device, schedule):
    """Newline and plain spans of different grids in one packed and one padded batch (both
    padding sides, also with padding inside the rows): bit for bit against the reference."""
    rng = random.Random(len(schedule) * 7 + 1)
    for _ in range(8):
        seqs, spans = random_span_batch(rng, schedule)
        spans = spans.to(device)
        check_spans(schedule, layout_only(packed(seqs, device)), spans)
        for side in ("left", "right", "holes"):
            batch = layout_only(padded(seqs, side, extra=rng.randint(0, 2), device=device, rng=rng))
            for out_side in ("left", "right"):
                check_spans(schedule, batch, spans, padding_side=out_side)


@pytest.mark.parametrize("device", DEVICES)
def test_plain_spans_of_different_grids_per_image(device):
    """[N, 4] spans: every image its own grid (Qwen2-VL's dynamic resolution), odd sides too."""
    rng = random.Random(12)
    grids = [(1, 2), (3, 1), (2, 2), (3, 5), (7, 4), (6, 6), (2, 9)]
    for _ in range(10):
        seqs, spans = random_span_batch(rng, "1:2", newline_share=0.0, grids=grids)
        assert not spans[:, 4].any()
        spans = spans[:, :4].contiguous().to(device)
        check_spans("1:2", layout_only(packed(seqs, device)), spans)
        check_spans("1:2", layout_only(padded(seqs, "left", extra=1, device=device)), spans)


@pytest.mark.parametrize("device", DEVICES)
def test_span_inputs_non_contiguous_int32_and_empty(device):
    rng = random.Random(13)
    seqs, spans = random_span_batch(rng, "1:2", max_seqs=4)
    while spans.shape[0] < 3 or not spans[:, 4].any():  # a few spans, some with newlines
        seqs, spans = random_span_batch(rng, "1:2", max_seqs=4)
    batch = layout_only(packed(seqs, device))
    want = stage_plan_reference("1:2", image_spans=spans, **{k: v.cpu() for k, v in batch.items()})
    wide = torch.zeros(spans.shape[0], 7, dtype=torch.int64)
    wide[:, 1:6] = spans
    strided = wide.to(device)[:, 1:6]  # rows of stride 7: not contiguous
    assert not strided.is_contiguous()
    for given in (strided, spans.to(torch.int32).to(device), spans.t().contiguous().t().to(device)):
        assert_plans_equal(stage_plan("1:2", image_spans=given, **batch), want)
    # No spans at all: every token is text, in both column counts.
    for cols in (4, 5):
        empty = torch.zeros(0, cols, dtype=torch.int64, device=device)
        plan = check_spans("1:2,2:4", batch, empty)
        assert [s.num_tokens for s in plan.stages] == [sum(map(len, seqs))] * 3


def test_opcheck_plan_ops_with_newline_spans():
    spans = torch.tensor([[0, 1, 2, 3, 1], [1, 0, 2, 2, 0]])
    cu = torch.tensor([0, 10, 14], dtype=torch.int32)
    torch.library.opcheck(torch.ops.adsc.stage_plan_packed, (None, cu, spans, 14, -1, 1, 1, [2, 2]))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 4:] = False
    torch.library.opcheck(torch.ops.adsc.stage_plan_padded, (None, mask, spans, -1, 1, 1, [4], False))


# ---- properties --------------------------------------------------------------------------------

@st.composite
def plan_cases(draw):
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    steps = []
    layer = 0
    for factor in draw(st.lists(st.sampled_from([2, 4]), max_size=4)):
        layer += draw(st.integers(1, 3))
        steps.append((layer, factor))
    schedule = Schedule.coerce(steps)
    try:
        schedule.grids((h, w))
    except ScheduleError:
        schedule = Schedule.coerce([])
    rng = random.Random(draw(st.integers(0, 2**31)))
    seqs = [random_sequence(rng, (h, w)) for _ in range(draw(st.integers(0, 5)))]
    layout = draw(st.sampled_from(["packed", "left", "right", "mixed", "holes"]))
    out_side = draw(st.sampled_from(["left", "right"]))
    return schedule, (h, w), seqs, layout, out_side, rng


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_cases())
def test_plan_matches_reference_property(case):
    schedule, grid, seqs, layout, out_side, rng = case
    if layout == "packed":
        batch = packed(seqs)
    else:
        batch = padded(seqs, layout, extra=rng.randint(0, 3), rng=rng)
    check(schedule, grid, batch, padding_side=out_side)


@st.composite
def span_cases(draw):
    """Spans of random grids (sides 1..6, 1-wide ones included) with and without newline tokens,
    in any layout; grids the schedule cannot downsample are dropped from the batch."""
    steps, layer = [], 0
    for factor in draw(st.lists(st.sampled_from([2, 4]), max_size=3)):
        layer += draw(st.integers(1, 3))
        steps.append((layer, factor))
    schedule = Schedule.coerce(steps)
    rng = random.Random(draw(st.integers(0, 2**31)))
    seqs, spans = [], []
    for b in range(draw(st.integers(0, 4))):
        n = 0
        for _ in range(rng.randint(0, 4)):
            h, w, nl = rng.randint(1, 6), rng.randint(1, 6), rng.randint(0, 1)
            try:
                schedule.grids((h, w))
            except ScheduleError:
                n += rng.randint(0, 3)  # text instead
                continue
            spans.append([b, n, h, w, nl])
            n += h * (w + nl) + rng.randint(0, 2)
        seqs.append([1] * n)
    columns = draw(st.sampled_from([4, 5])) if not any(s[4] for s in spans) else 5
    spans = torch.tensor(spans, dtype=torch.int64).reshape(-1, 5)[:, :columns].contiguous()
    layout = draw(st.sampled_from(["packed", "left", "right", "holes"]))
    out_side = draw(st.sampled_from(["left", "right"]))
    return schedule, seqs, spans, layout, out_side, rng


def span_batch(seqs, layout, rng, device="cpu"):
    if layout == "packed":
        return layout_only(packed(seqs, device))
    return layout_only(padded(seqs, layout, extra=rng.randint(0, 2), device=device, rng=rng))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(span_cases())
def test_span_plan_matches_reference_property(case):
    schedule, seqs, spans, layout, out_side, rng = case
    check_spans(schedule, span_batch(seqs, layout, rng), spans, padding_side=out_side)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@settings(max_examples=60, deadline=None)
@given(span_cases())
def test_span_plan_cuda_matches_reference_property(case):
    schedule, seqs, spans, layout, out_side, rng = case
    check_spans(schedule, span_batch(seqs, layout, rng, "cuda"), spans.cuda(), padding_side=out_side)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@settings(max_examples=60, deadline=None)
@given(plan_cases())
def test_plan_cuda_matches_reference_property(case):
    schedule, grid, seqs, layout, out_side, rng = case
    batch = packed(seqs, "cuda") if layout == "packed" else padded(
        seqs, layout, extra=rng.randint(0, 2), device="cuda", rng=rng)
    check(schedule, grid, batch, "cuda", padding_side=out_side)
