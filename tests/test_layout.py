"""The staged layout (adsc_ext.layout) against plain references: the stage map, the boundary
compaction (bit for bit with compact_tokens_reference), positions of any leading shape, the masks,
the paged-KV slot rule, the traced from_index constructor and moving a layout."""

import pytest
import torch

import adsc_ext
from adsc_ext.layout import (
    IGNORE_INDEX, StagedLayout, StageMap, causal_mask, gather_rows, kv_slots, packed_causal_mask,
)
from adsc_ext.reference import compact_tokens_reference, stage_plan_reference
from adsc_ext.runtime.kv_pool import StagedKVPool

TOK = 9
SCHED = "1:2,2:4"  # 4x4 -> 4x2 -> 2x1
GRID = (4, 4)


def _rows():
    """Three sequences: 1 image, none, 2 images; different lengths."""
    img = [TOK] * 16
    return [[1, 5, *img, 6], [1, 7, 8], [1, *img, 4, *img, 3, 2]]


def padded_plan(side="left"):
    rows = _rows()
    S = max(map(len, rows))
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(S - len(r), S) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask, adsc_ext.stage_plan(SCHED, input_ids=ids, attention_mask=mask, image_token_id=TOK, grid=GRID,
                                          padding_side=side)


def packed_plan():
    rows = _rows()
    ids = torch.tensor([t for r in rows for t in r])
    cu = torch.tensor([0, *torch.tensor([len(r) for r in rows]).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu, adsc_ext.stage_plan(SCHED, input_ids=ids, cu_seqlens=cu, image_token_id=TOK, grid=GRID)


# ---- the stage map ----------------------------------------------------------------------------------
def test_stage_map():
    m = StageMap("2:2,4:2", 6)
    assert m.stage_of_layer == (0, 0, 1, 1, 2, 2) and m.first_layers == (0, 2, 4) and m.num_stages == 3
    assert m.boundaries == {2: 1, 4: 2} and list(m.layers_of(1)) == [2, 3] and m.stage_layers()[2] == [4, 5]
    assert list(m.layers()) == [(0, 0, True), (1, 0, False), (2, 1, True), (3, 1, False), (4, 2, True),
                                (5, 2, False)]
    assert StageMap("", 3).stage_of_layer == (0, 0, 0) and StageMap([2], 6) == StageMap("2:4", 6)
    with pytest.raises(ValueError, match="past the model's 4 layers"):
        StageMap("4:2", 4)
    with pytest.raises(ValueError, match="increasing"):
        StageMap([3, 2], 6)


# ---- the boundary compaction ---------------------------------------------------------------------
def _chain_reference(x, plan, token_dims):
    """compact_tokens_reference stage by stage (the oracle of enter())."""
    out = [x]
    for st in plan.stages[1:]:
        out.append(compact_tokens_reference(out[-1], st.index.view(st.index.shape)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_enter_equals_the_reference_padded_and_packed(dtype):
    m = StageMap(SCHED, 3)
    _, _, pplan = padded_plan()
    B, S = pplan.stages[0].index.shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, S, 8, generator=g).to(dtype)
    cos = torch.randn(B, S, 4, generator=g).to(dtype)
    lay = StagedLayout.padded(m, pplan)
    want_h, want_c = _chain_reference(h, pplan, 2), _chain_reference(cos, pplan, 2)
    cur = (h, cos)
    for s in (1, 2):
        cur = lay.enter(s, *cur)
        assert torch.equal(cur[0], want_h[s]) and torch.equal(cur[1], want_c[s])
        assert cur[0].shape[:2] == lay.stages[s].shape
    assert lay.enter(0, h)[0] is h

    _, _, kplan = packed_plan()
    T = kplan.stages[0].num_tokens
    x = torch.randn(T, 6, generator=g).to(dtype)
    lay = StagedLayout.packed(m, kplan)
    want = _chain_reference(x, kplan, 1)
    cur = x
    for s in (1, 2):
        (cur,) = lay.enter(s, cur)
        assert torch.equal(cur, want[s])
    # [1, T] (Hugging Face's packed batch) and a tensor with a leading component dim (M-RoPE-like)
    lay1 = StagedLayout.packed(m, kplan, batch_dim=True)
    (y,) = lay1.enter(1, x[None])
    assert y.shape == (1, kplan.stages[1].num_tokens, 6) and torch.equal(y[0], want[1])
    three = torch.stack([x, x + 1, x * 2])  # [3, T, 6]
    (z,) = lay.enter(1, three, token_dim=1)
    assert torch.equal(z, torch.stack([want[1], _chain_reference(x + 1, kplan, 1)[1],
                                       _chain_reference(x * 2, kplan, 1)[1]]))


def test_enter_takes_non_contiguous_inputs_and_an_empty_batch():
    m = StageMap(SCHED, 3)
    _, _, pplan = padded_plan()
    B, S = pplan.stages[0].index.shape
    base = torch.randn(B, 8, S)
    h = base.transpose(1, 2)  # non-contiguous [B, S, 8]
    (got,) = StagedLayout.padded(m, pplan).enter(1, h)
    assert torch.equal(got, compact_tokens_reference(h.contiguous(), pplan.stages[1].index))
    empty = adsc_ext.stage_plan(SCHED, input_ids=torch.zeros(0, dtype=torch.long),
                                cu_seqlens=torch.zeros(1, dtype=torch.int32), image_token_id=TOK, grid=GRID)
    lay = StagedLayout.packed(m, empty)
    (e,) = lay.enter(1, torch.zeros(0, 5))
    assert e.shape == (0, 5) and lay.batch_size == 0
    assert lay.slot_mapping(1, torch.zeros(0, 1, dtype=torch.int32), 4).shape == (0,)


def test_gather_rows_is_compact_tokens_bit_for_bit():
    x = torch.randn(7, 3)
    idx = torch.tensor([-1, 6, 0, 3, -1], dtype=torch.int32)
    got = gather_rows(x, idx)
    assert torch.equal(got, adsc_ext.compact_tokens(x, idx)) and torch.equal(got[0], torch.zeros(3))


# ---- positions of any leading shape ---------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_keep_every_component(side):
    """Kept tokens keep all components of their position (M-RoPE [3, B, S]); padding gets 1."""
    m = StageMap(SCHED, 3)
    _, mask, plan = padded_plan(side)
    plain = StagedLayout.padded(m, plan)
    pos0 = plan.stages[0].position_ids
    mrope = torch.stack([pos0, pos0 * 10 + 3, pos0 * 100 + 7])  # [3, B, S], distinct components
    lay = StagedLayout.padded(m, plan, position_ids=mrope)
    for s, st in enumerate(lay.stages):
        src = plan.stages[s].source_index.long()
        want = torch.stack([c.reshape(-1)[src.clamp(min=0)].masked_fill(src < 0, 1) for c in mrope])
        assert torch.equal(st.position_ids, want if s else mrope)  # stage 0: the caller's, as given
        assert torch.equal(st.position_ids[0], plain.stages[s].position_ids)  # the plan's own positions
    _, _, kplan = packed_plan()
    kpos = torch.stack([kplan.stages[0].position_ids] * 3)  # [3, T]
    klay = StagedLayout.packed(m, kplan, position_ids=kpos)
    assert torch.equal(klay.stages[2].position_ids, torch.stack([kplan.stages[2].position_ids] * 3))


def test_continuation_offsets_and_text_segments():
    m = StageMap(SCHED, 3)
    _, mask, plan = padded_plan()
    next_pos = torch.tensor([5, 0, 2])
    cached = [torch.ones(3, L, dtype=torch.bool) for L in (4, 3, 2)]
    lay = StagedLayout.padded(m, plan, next_pos=next_pos, cache_valid=cached)
    for s, st in enumerate(lay.stages):
        p = plan.stages[s]
        assert torch.equal(st.position_ids, torch.where(p.attention_mask, p.position_ids + next_pos[:, None],
                                                        p.position_ids))
        assert st.offset == cached[s].shape[1] and st.keys.shape == (3, cached[s].shape[1] + st.shape[1])
    txt = StagedLayout.text(m, 3, 2, mask=torch.tensor([[0, 1], [1, 1], [1, 1]]), next_pos=next_pos,
                            cache_valid=cached)
    assert all(st.index is None for st in txt.stages)
    assert txt.stages[1].position_ids.tolist() == [[1, 5], [0, 1], [2, 3]]
    h = torch.randn(3, 2, 4)
    assert txt.enter(2, h)[0] is h


# ---- masks --------------------------------------------------------------------------------------------
def test_masks_against_loops():
    key = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 0, 1, 1]], dtype=torch.bool)
    got = causal_mask(key, 2, 3)
    for b in range(2):
        for i in range(2):
            for j in range(5):
                want = (bool(key[b, j]) and j <= 3 + i) or j == 3 + i
                assert bool(got[b, 0, i, j]) == want
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    pm = packed_causal_mask(cu, 5)[0, 0]
    seq = [0, 0, 2, 2, 2]
    assert pm.tolist() == [[seq[i] == seq[j] and j <= i for j in range(5)] for i in range(5)]
    m = StageMap(SCHED, 3)
    _, _, kplan = packed_plan()
    lay = StagedLayout.packed(m, kplan)
    assert torch.equal(lay.attention_mask(1), packed_causal_mask(kplan.stages[1].cu_seqlens,
                                                                 kplan.stages[1].num_tokens))


# ---- the paged KV slot rule ------------------------------------------------------------------------
def test_slot_mapping_is_the_pools_rule():
    m = StageMap(SCHED, 3)
    _, cu, plan = packed_plan()
    lay = StagedLayout.packed(m, plan)
    bs = 4
    lens = [[int(n) for n in st.seq_lens] for st in plan.stages]
    pool = StagedKVPool(m.stage_layers(), [40] * 3, block_size=bs, num_kv_heads=1, head_dim=2)
    context = torch.tensor([3, 0, 6])
    for r in range(3):
        pool.allocate(r, [L[r] + 6 for L in lens])
    for s in range(3):
        width = max(len(pool.tables[r][s]) for r in range(3))
        bt = torch.tensor(pool.block_table_rows(range(3), s, width)).view(3, width)
        # the paged rule spelled out here (pool.slots and slot_mapping both use kv_slots)
        table = [pool.tables[r][s] for r in range(3)]
        want = [table[r][p // bs] * bs + p % bs for r in range(3) for p in range(lens[s][r])]
        assert lay.slot_mapping(s, bt, bs).tolist() == want
        assert [x for r in range(3) for x in pool.slots(r, s, 0, lens[s][r])] == want
        want = [table[r][p // bs] * bs + p % bs for r in range(3) for p in range(int(context[r]), int(context[r]) + lens[s][r])]
        assert lay.slot_mapping(s, bt, bs, context=context).tolist() == want
    bt = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    assert kv_slots(bt, torch.tensor([0, 0, 1]), torch.tensor([0, 5, 4]), 4).tolist() == [12, 5, 8]
    txt = StagedLayout.text(m, 2, 2, mask=torch.tensor([[0, 1], [1, 1]]))
    assert txt.slot_mapping(0, bt, 4, context=torch.tensor([1, 3])).tolist() == [[-1, 13], [3, 8]]


# ---- the traced constructor equals the planned one -------------------------------------------------
def test_from_index_equals_padded():
    m = StageMap(SCHED, 3)
    _, mask, plan = padded_plan()
    planned = StagedLayout.padded(m, plan)
    valid = mask.bool()
    idx = [st.index for st in plan.stages[1:]]
    lay = StagedLayout.from_index(m, valid, idx, position_ids=plan.stages[0].position_ids)
    for a, b in zip(lay.stages, planned.stages):
        assert torch.equal(a.mask, b.mask) and a.shape == b.shape
        assert torch.equal(a.position_ids, b.position_ids)
        if a.stage:
            assert torch.equal(a.source_index.int(), b.source_index.int())
        assert torch.equal(lay.attention_mask(a.stage), planned.attention_mask(b.stage))
    bare = StagedLayout.from_index(m, valid, idx)  # what a graph needs: masks and indices
    assert all(st.position_ids is None for st in bare.stages[1:])
    h = torch.randn(*valid.shape, 3)
    assert torch.equal(bare.enter(1, h)[0], planned.enter(1, h)[0])


def test_with_tensors_moves_the_named_fields_only():
    m = StageMap(SCHED, 3)
    _, _, plan = packed_plan()
    lay = StagedLayout.packed(m, plan)
    fields = ("position_ids", "index", "cu_seqlens")
    parts = [t.to(torch.int64) + 0 for t in lay.tensors(fields)]  # stands for an upload's int64 views
    moved = lay.with_tensors(parts, fields)
    for a, b in zip(moved.stages, lay.stages):
        assert torch.equal(a.cu_seqlens, b.cu_seqlens) and a.cu_seqlens.dtype == b.cu_seqlens.dtype
        assert a.source_index is None and a.shape == b.shape and a.max_seqlen == b.max_seqlen
    x = torch.randn(plan.stages[0].num_tokens, 2)
    assert torch.equal(moved.enter(1, x)[0], lay.enter(1, x)[0])
    with pytest.raises(ValueError, match="unknown layout fields"):
        lay.with_tensors(parts, ("valid", "nope"))


def test_loss_targets_shift_then_compact():
    m = StageMap(SCHED, 3)
    ids, mask, plan = padded_plan()
    lay = StagedLayout.padded(m, plan)
    labels = torch.arange(ids.numel()).view(ids.shape) + 1000
    got = lay.loss_targets(labels)
    S = ids.shape[1]
    src = plan.stages[-1].source_index
    for b in range(ids.shape[0]):
        for j in range(src.shape[1]):
            r = int(src[b, j])
            if r < 0:
                assert got[b, j] == IGNORE_INDEX
            else:
                row, col = divmod(r, S)
                assert got[b, j] == (labels[row, col + 1] if col + 1 < S else IGNORE_INDEX)
    ref = stage_plan_reference(SCHED, input_ids=ids, attention_mask=mask, image_token_id=TOK, grid=GRID)
    assert torch.equal(ref.stages[-1].source_index.int(), src.int())  # the oracle plan agrees
