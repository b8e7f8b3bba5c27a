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
    with pytest.raises(ValueError, match=r"a plan takes 0 to \d+ tokens, got num_tokens=4294967296"):
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
