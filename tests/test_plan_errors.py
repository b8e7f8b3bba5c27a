"""Bad input to the plan: a clear exception saying what was expected and what was given."""

import pytest
import torch

from adsc_ext import ScheduleError, stage_plan
from adsc_ext.reference import stage_plan_reference
from conftest import DEVICES

IMG = 9


def ids_cu(seqs, device="cpu"):
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=device)
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    return ids, torch.tensor(cu, dtype=torch.int32, device=device)


def both_raise(exc, match, schedule="1:2", **kw):
    """The op and the reference reject the same input with the same exception type."""
    with pytest.raises(exc, match=match):
        stage_plan(schedule, **kw)
    with pytest.raises(exc):
        stage_plan_reference(schedule, **{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                          for k, v in kw.items()})


@pytest.mark.parametrize("device", DEVICES)
def test_partial_image_runs(device):
    ids, cu = ids_cu([[1, IMG, IMG, 2], [IMG] * 5], device)
    both_raise(ValueError, r"sequence 0: a run of 2 image tokens \(id 9\) at position 1 is not a "
               r"whole number of 2x2 images \(4 tokens each\)",
               input_ids=ids, cu_seqlens=cu, image_token_id=IMG, grid=(2, 2))
    ids, cu = ids_cu([[1], [IMG] * 5], device)
    both_raise(ValueError, "sequence 1: a run of 5 image tokens",
               input_ids=ids, cu_seqlens=cu, image_token_id=IMG, grid=(2, 2))
    # A run cut by a sequence boundary is two partial runs, not one image.
    ids, cu = ids_cu([[1, IMG, IMG], [IMG, IMG]], device)
    both_raise(ValueError, "not a whole number", input_ids=ids, cu_seqlens=cu,
               image_token_id=IMG, grid=(2, 2))
    # Padded: padding has no position, so it does not split a run (spec 3: consecutive positions).
    ids = torch.tensor([[IMG, IMG, 0, IMG, IMG, 0, IMG]], device=device)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 1]], device=device)
    both_raise(ValueError, "a run of 5 image tokens", input_ids=ids, attention_mask=mask,
               image_token_id=IMG, grid=(2, 2))
    mask[0, -1] = 0
    plan = stage_plan("1:2", input_ids=ids, attention_mask=mask, image_token_id=IMG, grid=(2, 2))
    assert plan.stages[1].position_ids.tolist() == [[1, 3]]  # one 2x2 image: columns 1 of each row


@pytest.mark.parametrize("device", DEVICES)
def test_grid_that_the_schedule_cannot_downsample(device):
    ids, cu = ids_cu([[1, 2]], device)
    both_raise(ValueError, "cannot downsample a 1x2 image grid", schedule="1:2,2:2",
               input_ids=ids, cu_seqlens=cu, image_token_id=IMG, grid=(1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_cu_seqlens(device):
    ids = torch.ones(6, dtype=torch.int64, device=device)
    for cu, match in [([0, 4, 3, 6], r"never decrease.*cu_seqlens\[1\]=4, cu_seqlens\[2\]=3"),
                      ([1, 3, 6], r"start at 0"),
                      ([0, 3, 5], r"end at the number of tokens \(6\)"),
                      # several errors: the first sequence's is named (GPU as CPU)
                      ([1, 0, 5, 0], r"cu_seqlens\[0\]=1, cu_seqlens\[1\]=0")]:
        both_raise(ValueError, match, input_ids=ids,
                   cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
                   image_token_id=IMG, grid=(2, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_spans(device):
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    cases = [
        ([[1, 4, 2, 2]], r"image span 0 \(sequence 1, start 4, 2x2\) does not fit.*length \(6\)"),
        ([[2, 0, 1, 2]], r"0 <= sequence < 2"),
        ([[0, -1, 1, 2]], r"start >= 0"),
        ([[0, 0, 0, 2]], r"sides >= 1"),
        ([[1, 2, 1, 2], [1, 0, 1, 2]], r"sorted by \(sequence, start\)"),
        ([[1, 0, 1, 3], [1, 2, 1, 2]], r"must not overlap"),
        ([[1, 0, 1, 1]], r"1x1 grid that the schedule cannot downsample"),
        ([[1, 2**63 - 3, 2, 2], [1, 0, 2, 2]], r"image span 0 .* does not fit"),  # no wrap-around
        # Several bad spans: the first is named, on the GPU as on the CPU.
        ([[0, 0, 1, 2], [1, 5, 2, 2], [2, 0, 1, 2]], r"image span 1 \(sequence 1, start 5"),
    ]
    for spans, match in cases:
        both_raise(ValueError, match, cu_seqlens=cu,
                   image_spans=torch.tensor(spans, dtype=torch.int64, device=device))


def test_argument_errors():
    ids, cu = ids_cu([[1, 2, 3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    common = dict(image_token_id=IMG, grid=(2, 2))
    with pytest.raises(TypeError, match="input_ids must be an int64 .* got torch.float32"):
        stage_plan("1:2", input_ids=ids.float(), cu_seqlens=cu, **common)
    with pytest.raises(TypeError, match="attention_mask must be bool or integer, got torch.float32"):
        stage_plan("1:2", input_ids=ids[None], attention_mask=mask.float(), **common)
    with pytest.raises(ValueError, match=r"input_ids \(1, 3\) and attention_mask \(1, 4\)"):
        stage_plan("1:2", input_ids=ids[None], attention_mask=torch.ones(1, 4, dtype=torch.bool), **common)
    with pytest.raises(ValueError, match="not both"):
        stage_plan("1:2", input_ids=ids, cu_seqlens=cu, attention_mask=mask, **common)
    with pytest.raises(ValueError, match="image_token_id is required"):
        stage_plan("1:2", input_ids=ids, cu_seqlens=cu, grid=(2, 2))
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'top'"):
        stage_plan("1:2", input_ids=ids, cu_seqlens=cu, padding_side="top", **common)
    with pytest.raises(ValueError, match=r"grid must be two positive ints .* got \(0, 2\)"):
        stage_plan("1:2", input_ids=ids, cu_seqlens=cu, image_token_id=IMG, grid=(0, 2))
    with pytest.raises(ValueError, match=r"packed layout .* input_ids of shape \[T\]"):
        stage_plan("1:2", input_ids=ids[None], cu_seqlens=cu, **common)
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[B\+1\]"):
        stage_plan("1:2", input_ids=ids, cu_seqlens=cu[None], **common)
    with pytest.raises(ValueError, match=r"image_spans must be \[N, 4\]"):
        stage_plan("1:2", cu_seqlens=cu, image_spans=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="give input_ids .* or image_spans"):
        stage_plan("1:2", cu_seqlens=cu)
    with pytest.raises(ScheduleError, match="factor must be 2 or 4, got 3"):
        stage_plan("1:3", input_ids=ids, cu_seqlens=cu, **common)
    with pytest.raises(ScheduleError, match="layer must be >= 1"):
        stage_plan("0:2", input_ids=ids, cu_seqlens=cu, **common)


def test_raw_op_argument_errors():
    """The C++ front end checks too (callers may use torch.ops.adsc directly)."""
    ids, cu = ids_cu([[1, 2, 3]])
    op = torch.ops.adsc.stage_plan_packed
    with pytest.raises(ValueError, match="factor must be 2 or 4, got 3"):
        op(ids, cu, None, 3, IMG, 2, 2, [3])
    with pytest.raises(ValueError, match=r"input_ids of shape \[4\], got \[3\]"):
        op(ids, cu, None, 4, IMG, 2, 2, [2])
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        op(None, cu, None, 3, IMG, 2, 2, [2])
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64, got Float"):
        op(ids, cu.float(), None, 3, IMG, 2, 2, [2])
    with pytest.raises(ValueError, match="at most 16 steps"):
        op(ids, cu, None, 3, IMG, 2, 2, [2] * 17)
    # Refused before anything is allocated for it.
    with pytest.raises(ValueError, match=r"too many tokens: a plan takes at most \d+ tokens .*got 4294967296"):
        op(None, cu, torch.zeros(0, 4, dtype=torch.int64), 2**32, IMG, 2, 2, [2])
    # int64 offsets that would wrap when narrowed to int32.
    with pytest.raises(ValueError, match=r"cu_seqlens must hold int32 offsets"):
        op(ids, torch.tensor([0, 2**32 + 3]), None, 3, IMG, 2, 2, [2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch():
    ids, cu = ids_cu([[1, 2, 3]])
    with pytest.raises(ValueError, match="input_ids is on cpu but the layout tensor is on cuda"):
        stage_plan("1:2", input_ids=ids, cu_seqlens=cu.cuda(), image_token_id=IMG, grid=(2, 2))
    with pytest.raises(ValueError, match="input_ids must be on cuda"):
        torch.ops.adsc.stage_plan_packed(ids, cu.cuda(), None, 3, IMG, 2, 2, [2])


# ---- hardening (issue 14) ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_still_checks_the_grid(device):
    # An empty input_ids has a NULL data pointer; the grid must be checked all the same (D6).
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    both_raise(ValueError, r"cannot downsample a 1x1 image grid", input_ids=empty, cu_seqlens=cu,
               image_token_id=IMG, grid=(1, 1))
    mask = torch.zeros((0, 5), dtype=torch.bool, device=device)
    both_raise(ValueError, r"cannot downsample a 1x1 image grid", input_ids=torch.zeros((0, 5), dtype=torch.int64, device=device),
               attention_mask=mask, image_token_id=IMG, grid=(1, 1))
    assert stage_plan("1:2", input_ids=empty, cu_seqlens=cu, image_token_id=IMG, grid=(2, 2)).stages[1].num_tokens == 0


def test_meta_inputs_raise_instead_of_reading_an_uninitialised_summary():
    ids, cu = ids_cu([[1, IMG, IMG, IMG, IMG, 2]])
    with pytest.raises(ValueError, match=r"input_ids .* meta .* cpu|input_ids must be on cpu.*got meta"):
        stage_plan("1:2", input_ids=ids.to("meta"), cu_seqlens=cu, image_token_id=IMG, grid=(2, 2))
    with pytest.raises(ValueError, match="meta tensors"):
        stage_plan("1:2", input_ids=ids.to("meta"), cu_seqlens=cu.to("meta"), image_token_id=IMG,
                   grid=(2, 2))
    with pytest.raises(ValueError, match=r"input_ids must be on cpu.*got meta"):
        torch.ops.adsc.stage_plan_packed(ids.to("meta"), cu, None, 6, IMG, 2, 2, [2])
    with pytest.raises(ValueError, match="meta tensors"):
        torch.ops.adsc.stage_plan_padded(ids.view(1, 6).to("meta"), torch.ones((1, 6), dtype=torch.bool, device="meta"),
                                         None, IMG, 2, 2, [2], True)


def test_too_many_tokens_is_said_before_anything_is_allocated():
    # Expanded tensors: 2^30 and 2^42 elements that take no memory. Before the fix the packed call
    # failed in an int32 conversion and the padded one tried to allocate terabytes (D13).
    n = 2**30
    ids = torch.zeros(1, dtype=torch.int64).expand(n)
    with pytest.raises(ValueError, match=r"too many tokens: .*at most 1073741823 .*got 1073741824"):
        stage_plan("1:2", input_ids=ids, image_token_id=IMG, grid=(2, 2))
    with pytest.raises(ValueError, match=r"too many tokens"):
        torch.ops.adsc.stage_plan_packed(ids, torch.tensor([0, n], dtype=torch.int64), None, n, IMG, 2, 2, [2])
    mask = torch.ones((1, 1), dtype=torch.bool).expand(2**21, 2**21)
    big_ids = torch.zeros((1, 1), dtype=torch.int64).expand(2**21, 2**21)
    with pytest.raises(ValueError, match=r"too many tokens: .*got 4398046511104 \(2097152 x 2097152\)"):
        stage_plan("1:2", input_ids=big_ids, attention_mask=mask, image_token_id=IMG, grid=(2, 2))
    with pytest.raises(ValueError, match=r"too many tokens"):
        torch.ops.adsc.stage_plan_padded(big_ids, torch.ones((1, 1), dtype=torch.int32).expand(2**21, 2**21),
                                         None, IMG, 2, 2, [2], True)
    spans = torch.tensor([[0, 0, 2, 2]])
    with pytest.raises(ValueError, match=r"too many tokens"):
        stage_plan("1:2", image_spans=spans, cu_seqlens=torch.tensor([0, 2**31 + 5]))


def test_limits_come_from_the_compiled_core():
    from adsc_ext import _C, schedule

    assert (_C.MAX_STEPS, _C.PLAN_SUMMARY_HEADER, _C.PLAN_MAX_TOKENS) == (16, 8, 2**30 - 1)
    assert schedule.max_steps() == _C.MAX_STEPS
    ids, cu = ids_cu([[1, IMG, IMG, IMG, IMG, 2]])
    plan = stage_plan("1:2", input_ids=ids, cu_seqlens=cu, image_token_id=IMG, grid=(2, 2))
    assert [st.num_tokens for st in plan.stages] == [6, 4]


# ---- hardening (issue 18, "smaller") ---------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_input_ids_and_image_spans_together_are_refused(device):
    # The spans silently won over the token ids (the C ABI refuses both): refused, same words.
    ids, cu = ids_cu([[1, IMG, IMG, IMG, IMG, 2]], device)
    spans = torch.tensor([[0, 0, 2, 2]], device=device)
    both_raise(ValueError, r"give either input_ids \(images are runs of image_token_id\) or "
               r"image_spans, not both", input_ids=ids, cu_seqlens=cu, image_spans=spans,
               image_token_id=IMG, grid=(2, 2))
    both_raise(ValueError, "not both", input_ids=ids.view(1, 6), image_spans=spans,
               attention_mask=torch.ones(1, 6, dtype=torch.bool, device=device))
    # Each alone is fine (and the two describe different images here).
    a = stage_plan("1:2", input_ids=ids, cu_seqlens=cu, image_token_id=IMG, grid=(2, 2))
    b = stage_plan("1:2", cu_seqlens=cu, image_spans=spans)
    assert a.stages[1].position_ids.tolist() == [0, 2, 4, 5]
    assert b.stages[1].position_ids.tolist() == [1, 3, 4, 5]


@pytest.mark.parametrize("device", DEVICES)
def test_image_token_id_must_be_an_int_in_int64(device):
    ids, cu = ids_cu([[1, IMG, IMG, IMG, IMG, 2]], device)
    common = dict(input_ids=ids, cu_seqlens=cu, grid=(2, 2))
    # 9.7 was truncated to 9 (and found the image); 2**70 ended in an unreadable overflow message.
    both_raise(TypeError, r"image_token_id must be an int, got float 9\.7", image_token_id=9.7, **common)
    both_raise(TypeError, r"image_token_id must be an int, got float 9\.0", image_token_id=9.0, **common)
    both_raise(TypeError, r"image_token_id must be an int, got bool True", image_token_id=True, **common)
    both_raise(TypeError, r"image_token_id must be an int, got str '9'", image_token_id="9", **common)
    both_raise(ValueError, r"image_token_id must fit int64 \(-9223372036854775808 \.\. "
               r"9223372036854775807\), got 1180591620717411303424", image_token_id=2**70, **common)
    both_raise(ValueError, r"must fit int64 .* got -9223372036854775809", image_token_id=-2**63 - 1,
               **common)
    # Integers of any kind are fine, the int64 extremes included.
    import numpy as np

    for token in (IMG, np.int64(IMG), np.int32(IMG), torch.tensor(IMG)):
        plan = stage_plan("1:2", image_token_id=token, **common)
        assert plan.stages[1].num_tokens == 4
    for token in (2**63 - 1, -2**63):
        assert stage_plan("1:2", image_token_id=token, **common).stages[1].num_tokens == 6


@pytest.mark.parametrize("device", DEVICES)
def test_span_errors_print_int64_fields_exactly(device):
    # The C++ messages printed these fields through int32 (2**40 read as 0, 2**33 + 1 as 1).
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    cases = [
        ([[1, 2**40, 2, 2]], r"image span 0 \(sequence 1, start 1099511627776, 2x2\) does not fit"),
        ([[2**33 + 1, 0, 1, 2]], r"\(sequence 8589934593, start 0, 1x2\) does not fit"),
        ([[0, 0, 2**35, -2**40]], r"\(sequence 0, start 0, 34359738368x-1099511627776\)"),
        ([[1, -2**62, 1, 2]], r"start -4611686018427387904,"),
        ([[1, 0, 1, 2, 2**41]], r"image span 0 has newline = 2199023255552: expected 0"),
    ]
    for spans, match in cases:
        both_raise(ValueError, match, cu_seqlens=cu,
                   image_spans=torch.tensor(spans, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_newline_spans(device):
    cu = torch.tensor([0, 4, 13], dtype=torch.int32, device=device)
    cases = [
        # 2x3 + a newline per row = 8 tokens: from position 2 of a 9-token sequence it does not fit
        ([[1, 2, 2, 3, 1]], r"image span 0 \(sequence 1, start 2, 2x3 with a newline token per "
                            r"row\) does not fit.* start \+ h\*\(w\+1\) <= the sequence's length \(9\)"),
        ([[1, 0, 2, 2, 2]], r"image span 0 has newline = 2: expected 0 \(an h x w grid\) or 1"),
        ([[1, 0, 2, 2, -1]], r"has newline = -1"),
        # the newline tokens count in the order check: span 1 starts on span 0's last newline
        ([[1, 0, 2, 2, 1], [1, 5, 1, 2, 0]], r"span 1 starts at \(sequence 1, position 5\), before "
                                             r"the end of the previous span \(sequence 1, position 6\)"),
        # a 1-wide grid: 2x1 halves its rows once; the second step would halve a side of 1
        ([[1, 0, 2, 1, 1]], r"image span 0 has a 2x1 grid that the schedule cannot downsample"),
    ]
    for spans, match in cases:
        both_raise(ValueError, match, schedule="1:2,2:2", cu_seqlens=cu,
                   image_spans=torch.tensor(spans, dtype=torch.int64, device=device))
    plan = stage_plan("1:2", cu_seqlens=cu, image_spans=torch.tensor([[1, 0, 2, 1, 1]], device=device))
    assert plan.stages[1].seq_lens.tolist() == [4, 9 - 2]  # row 0 (token + newline) dropped


def test_image_spans_shape_errors():
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for shape in [(1, 3), (1, 6), (5,)]:
        with pytest.raises(ValueError, match=r"image_spans must be \[N, 4\] .* or \[N, 5\] with a "
                                             r"newline flag"):
            stage_plan("1:2", cu_seqlens=cu, image_spans=torch.zeros(shape, dtype=torch.int64))
    op = torch.ops.adsc.stage_plan_packed
    with pytest.raises(ValueError, match=r"image_spans must be \[N, 4\] .* or \[N, 5\]"):
        op(None, cu, torch.zeros(1, 6, dtype=torch.int64), 4, -1, 1, 1, [2])
    with pytest.raises(TypeError, match="image_spans must be an int64"):
        op(None, cu, torch.zeros(1, 5), 4, -1, 1, 1, [2])
