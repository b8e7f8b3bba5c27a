"""apply_adsc on Qwen2-VL / Qwen2.5-VL / Qwen3-VL (tiny random models from transformers' own config
classes): spec section 6's equivalences, the per-layer cache lengths of spec section 4, positions
against transformers' own get_rope_index, videos, DeepStack, errors."""

import copy

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from adsc_ext.errors import AdscInputError, ScheduleError  # noqa: E402
from adsc_ext.hf import AdscCache, adsc_layout, apply_adsc  # noqa: E402
from adsc_ext.models import model_spec  # noqa: E402
from oracle import run_decoder  # noqa: E402
from adsc_ext.schedule import Schedule  # noqa: E402
from adsc_ext.testing.qwen import qwen_inputs, split_inputs, tiny_qwen  # noqa: E402

ATOL = 2e-5
ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
#: images of different grids in one left-padded batch (2x3 -> 2x2 -> 2x1, 3x2, 4x4), a row without
#: images, a video of 2 temporal patches of 2x2 (Qwen3: two runs)
ROWS = [["ab", ("image", 2, 3), "cd"], ["plain text"], ["y", ("image", 4, 4), "z", ("video", 2, 2, 2), "w", ("image", 3, 2)]]
SCHEDULE = {"qwen2_vl": "1:2,3:2", "qwen2_5_vl": "1:2,3:2", "qwen3_vl": "2:2,3:2"}  # Qwen3: DeepStack after layers 0, 1

_MODELS = {}


def model_for(arch, impl="sdpa", schedule=None, seed=0):
    """A fresh ADSC copy of a cached plain tiny model (building one is the slow part)."""
    key = (arch, impl, seed)
    if key not in _MODELS:
        _MODELS[key] = tiny_qwen(arch, seed=seed, attn_implementation=impl, num_layers=4)
    plain = _MODELS[key]
    return plain, apply_adsc(copy.deepcopy(plain), SCHEDULE[arch] if schedule is None else schedule)


def _features(model, kind, pix, grid):
    inner = model.model
    fn = inner.get_image_features if kind == "image" else inner.get_video_features
    out = fn(pix, grid, return_dict=True)
    return out


def naive_forward(model, one, schedule):
    """Spec oracle for ONE unpadded sequence (a batch of one from split_inputs): the model's own
    embeddings, vision features and get_rope_index; every decoder layer run by hand on the tokens
    alive at it (kept_image_indices per grid), with an explicit causal mask. Returns the last
    stage's logits [n_kept, V] and the kept indices."""
    schedule = Schedule.coerce(schedule)
    cfg = model.config
    inner = model.model
    text = inner.language_model
    ids = one["input_ids"]
    emb = model.get_input_embeddings()(ids)
    vis_mask = torch.zeros_like(ids, dtype=torch.bool)
    deep = {}
    for kind, pix, grid, tok in (("image", "pixel_values", "image_grid_thw", cfg.image_token_id),
                                 ("video", "pixel_values_videos", "video_grid_thw", cfg.video_token_id)):
        if grid not in one:
            continue
        out = _features(model, kind, one[pix], one[grid])
        feats = torch.cat(list(out.pooler_output))
        mask = ids == tok
        emb = emb.masked_scatter(mask[..., None], feats)
        vis_mask |= mask
        if getattr(out, "deepstack_features", None) is not None:
            # per item (split) from transformers 5.18; one [tokens, D] tensor per layer in 5.17
            deep[kind] = (mask, [f if torch.is_tensor(f) else torch.cat(list(f)) for f in out.deepstack_features])
    pos3, _ = inner.get_rope_index(ids, one["mm_token_type_ids"], image_grid_thw=one.get("image_grid_thw"),
                                   video_grid_thw=one.get("video_grid_thw"),
                                   second_per_grid_ts=one.get("second_per_grid_ts"))
    # the grids, in sequence order, and where each starts
    m = cfg.vision_config.spatial_merge_size
    row = ids[0].tolist()
    grids, p = [], 0
    items = {"image": iter(one.get("image_grid_thw", torch.zeros(0, 3)).tolist()),
             "video": iter(one.get("video_grid_thw", torch.zeros(0, 3)).tolist())}
    qwen3 = cfg.model_type == "qwen3_vl"
    frames_left = 0
    cur_video = None
    while p < len(row):
        tok = row[p]
        kind = "image" if tok == cfg.image_token_id else "video" if tok == cfg.video_token_id else None
        if kind is None:
            p += 1
            continue
        if kind == "video" and qwen3:
            if frames_left == 0:
                cur_video = next(items["video"])
                frames_left = int(cur_video[0])
            t, gh, gw = 1, cur_video[1], cur_video[2]
            frames_left -= 1
        else:
            t, gh, gw = next(items[kind])
        h, w = gh // m, gw // m
        for k in range(int(t)):
            grids.append((p + k * h * w, (h, w)))
        p += int(t) * h * w
    n_deep = len(deep.get("image", deep.get("video", (None, [])))[1])

    def deepstack(l, h, positions):
        if l >= n_deep:
            return h
        assert len(positions) == len(row), "DeepStack layers run before any boundary"
        h = h.clone()
        for kmask, feats in deep.values():
            h[kmask] = h[kmask] + feats[l]
        return h

    return run_decoder(text, model.lm_head, emb, [(start, g, 0) for start, g in grids], schedule,
                       rope_positions=lambda positions: pos3[:, :, positions], after_layer=deepstack)


def _gen(model, inp, n, **kw):
    cfg = model.config
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           suppress_tokens=[cfg.image_token_id, cfg.video_token_id], **kw)
    return g[:, inp["input_ids"].shape[1]:]


def _greedy_recompute(model, inp, steps):
    """Spec 6.2 oracle: the whole sequence re-run with the schedule at every step, no cache."""
    cfg = model.config
    cur = dict(inp)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            o = model(**cur, use_cache=False)
        last = o.logits[:, -1].clone()
        last[:, [cfg.image_token_id, cfg.video_token_id]] = -float("inf")
        nxt = last.argmax(-1)
        out.append(nxt)
        cur["input_ids"] = torch.cat([cur["input_ids"], nxt[:, None]], 1)
        cur["attention_mask"] = torch.cat([cur["attention_mask"], torch.ones_like(nxt[:, None])], 1)
        cur["mm_token_type_ids"] = torch.cat([cur["mm_token_type_ids"], torch.zeros_like(nxt[:, None], dtype=torch.int32)], 1)
    return torch.stack(out, 1)


# ---- 6.1 empty schedule == unmodified model ------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_empty_schedule_matches_unmodified(arch, impl):
    plain, model = model_for(arch, impl, "")
    inp = qwen_inputs(plain, ROWS)
    with torch.no_grad():
        ref = plain(**inp).logits
        got = model(**inp).logits
    m = inp["attention_mask"].bool()
    torch.testing.assert_close(got[m], ref[m], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(_gen(model, inp, 5), _gen(plain, inp, 5))


# ---- prefill == the oracle; batch == alone (6.3) ----------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefill_matches_oracle_and_alone(arch, impl):
    _, model = model_for(arch, impl)
    schedule = SCHEDULE[arch]
    inp = qwen_inputs(model, ROWS)
    with torch.no_grad():
        out = model(**inp)
    S = inp["input_ids"].shape[1]
    lay = adsc_layout(out)
    for b, one in enumerate(split_inputs(inp, model.config)):
        n = one["input_ids"].shape[1]
        with torch.no_grad():
            ref, kept = naive_forward(model, one, schedule)
            alone = model(**one)
        src = lay.source_index[b]
        real = src >= 0
        assert (src[real].long() - b * S - (S - n)).tolist() == kept
        torch.testing.assert_close(out.logits[b][real], ref, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(alone.logits[0], ref, atol=ATOL, rtol=1e-4)
        # every kept token keeps its four position components (text index, T, H, W)
        pos3, _ = model.model.get_rope_index(one["input_ids"], one["mm_token_type_ids"],
                                             image_grid_thw=one.get("image_grid_thw"),
                                             video_grid_thw=one.get("video_grid_thw"))
        want = torch.cat([torch.tensor(kept)[None], pos3[:, 0, kept]])
        assert torch.equal(lay.position_ids[:, b][:, real], want)


# ---- 6.2 cache == no cache; generate == recomputation; batch == alone --------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_generate_equals_recompute_and_alone(arch, impl):
    _, model = model_for(arch, impl)
    inp = qwen_inputs(model, ROWS)
    steps = 4
    cached = _gen(model, inp, steps)
    torch.testing.assert_close(cached, _greedy_recompute(model, inp, steps))
    for b, one in enumerate(split_inputs(inp, model.config)):
        torch.testing.assert_close(_gen(model, one, steps), cached[b:b + 1])


def test_decode_logits_match_recompute():
    """Stronger than tokens: every cached decode step's logits equal a full re-run's (positions
    n + t + rope_delta in the rotary rows)."""
    _, model = model_for("qwen2_5_vl", "eager")
    inp = qwen_inputs(model, ROWS)
    cur = dict(inp)
    with torch.no_grad():
        out = model(**inp, use_cache=True)
        cache = out.past_key_values
        for _ in range(3):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cur["input_ids"] = torch.cat([cur["input_ids"], nxt], 1)
            cur["attention_mask"] = torch.cat([cur["attention_mask"], torch.ones_like(nxt)], 1)
            cur["mm_token_type_ids"] = torch.cat([cur["mm_token_type_ids"], torch.zeros_like(nxt, dtype=torch.int32)], 1)
            out = model(input_ids=nxt, attention_mask=cur["attention_mask"], past_key_values=cache, use_cache=True)
            full = model(**cur, use_cache=False)
            torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_lengths_are_the_grids_stage_lengths(arch):
    """Spec section 4 per image: every row's cached tokens per stage are its text tokens plus each
    grid's tokens at the stage; a layer's K/V are as long as its stage's longest row."""
    _, model = model_for(arch)
    sched = Schedule.parse(SCHEDULE[arch])
    inp = qwen_inputs(model, ROWS)
    with torch.no_grad():
        out = model(**inp, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, AdscCache)
    spec = model_spec(model)
    want = []
    for one in split_inputs(inp, model.config):
        grids = spec.prompt_grids(one["input_ids"][0], **{k: v for k, v in one.items() if k != "input_ids"})
        want.append(sched.stage_lengths(one["input_ids"].shape[1], grids))
    got = [v.sum(dim=1).tolist() for v in cache.adsc.valid]  # per stage, per row
    assert [list(r) for r in zip(*got)] == want
    stage_of = [sched.stage_of_layer(l) for l in range(4)]
    assert cache.layer_lengths() == [max(w[s] for w in want) for s in stage_of]
    assert want[2][0] > want[2][1] > want[2][2]  # the saving is real
    g = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert g.past_key_values.layer_lengths() == [max(w[s] for w in want) + 2 for s in stage_of]


def test_positions_equal_get_rope_index():
    """The spec's M-RoPE rows (what runtimes without the model use) equal transformers' own, for
    images and videos of every architecture, left and right padding, Qwen2.5 video intervals."""
    rows = ROWS + [[("video", 3, 2, 1), "x"], [("image", 1, 5)]]
    for arch in ARCHS:
        plain, _ = model_for(arch, schedule="")
        spec = model_spec(plain)
        for side in ("left", "right"):
            for spg in (None, 0.5) if arch == "qwen2_5_vl" else (None,):
                inp = qwen_inputs(plain, rows, padding_side=side, second_per_grid_ts=spg)
                ref, delta = plain.model.get_rope_index(**{k: v for k, v in inp.items() if "pixel" not in k})
                got = spec.plan_inputs(inp["input_ids"], attention_mask=inp["attention_mask"],
                                       **{k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")})
                m = inp["attention_mask"].bool()
                assert torch.equal(got.position_ids[1:][:, m], ref[:, m]), (arch, side, spg)
                assert torch.equal(got.position_ids[0][m], (inp["attention_mask"].cumsum(1) - 1)[m])
                nxt = spec.next_positions(got.position_ids, m)
                assert torch.equal(nxt[1:], (m.sum(1) + delta[:, 0]).expand(3, -1)), (arch, side)
                assert torch.equal(nxt[0], m.sum(1))


# ---- generate's prefill: grids from the positions -----------------------------------------------------------
def test_grids_from_generate_positions():
    """Inside generate the forward gets no image_grid_thw: the spans come from the M-RoPE rows,
    and equal those from the grids."""
    plain, _ = model_for("qwen2_5_vl", schedule="")
    spec = model_spec(plain)
    inp = qwen_inputs(plain, ROWS)
    kw = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    by_grid = spec.plan_inputs(inp["input_ids"], attention_mask=inp["attention_mask"], **kw)
    pos = by_grid.position_ids
    by_pos = spec.plan_inputs(inp["input_ids"], attention_mask=inp["attention_mask"], position_ids=pos)
    assert torch.equal(by_pos.images["image_spans"], by_grid.images["image_spans"])
    assert torch.equal(by_pos.position_ids, pos)
    spans = by_grid.images["image_spans"].tolist()
    # row 0: bos a b <vs> (2x3 image at 4); row 2: 4x4 image, a 2-frame video of 2x2, a 3x2 image
    assert spans == [[0, 4, 2, 3], [2, 3, 4, 4], [2, 22, 2, 2], [2, 26, 2, 2], [2, 33, 3, 2]]


# ---- training: the loss of 6.4 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_loss_equals_reference(arch):
    _, model = model_for(arch, "eager")
    model.train()
    inp = qwen_inputs(model, ROWS)
    cfg = model.config
    labels = inp["input_ids"].clone()
    labels[inp["attention_mask"] == 0] = -100
    labels[(labels == cfg.image_token_id) | (labels == cfg.video_token_id)] = -100
    out = model(**inp, labels=labels)
    total, count = 0.0, 0
    mask = inp["attention_mask"].bool()
    for b, one in enumerate(split_inputs(inp, cfg)):
        logits, kept = naive_forward(model, one, SCHEDULE[arch])
        lab = labels[b][mask[b]]
        n = lab.numel()
        tgt = torch.tensor([lab[p + 1].item() if p + 1 < n else -100 for p in kept])
        total = total + torch.nn.functional.cross_entropy(logits.float(), tgt, ignore_index=-100, reduction="sum")
        count += int((tgt != -100).sum())
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for name, mod in (("vision", model.model.visual), ("llm", model.model.language_model)):
        grads = [p.grad for p in mod.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


# ---- packed inputs, chunked prefill ------------------------------------------------------------------------------
def test_packed_equals_padded():
    _, model = model_for("qwen2_5_vl")
    inp = qwen_inputs(model, ROWS)
    spec = model_spec(model)
    ones = split_inputs(inp, model.config)
    flat = torch.cat([o["input_ids"][0] for o in ones])[None]
    rows = []
    for o in ones:
        kw = {k: v for k, v in o.items() if k not in ("input_ids", "attention_mask")}
        rows.append(spec.plan_inputs(o["input_ids"][0], **kw).position_ids)
    pos = torch.cat(rows, dim=1)[:, None]  # [4, 1, T]: the text row restarts at every sequence
    kw = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        packed = model(input_ids=flat, position_ids=pos, **kw)
        padded = model(**inp)
    got = packed.logits[0][adsc_layout(packed).source_index[0] >= 0]
    ref = padded.logits[adsc_layout(padded).source_index >= 0]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


def test_chunked_prefill_with_whole_images_equals_one_prefill():
    _, model = model_for("qwen2_5_vl", "eager")
    rows = [["ab", ("image", 2, 3), "cd", ("image", 3, 2), "e"]]
    inp = qwen_inputs(model, rows)
    cut = 1 + 2 + 8  # bos, 2 text tokens, the first image with its start and end tokens
    g = inp["image_grid_thw"]
    first = {"input_ids": inp["input_ids"][:, :cut], "attention_mask": inp["attention_mask"][:, :cut],
             "pixel_values": inp["pixel_values"][:int(g[0].prod())], "image_grid_thw": g[:1]}
    second = {"input_ids": inp["input_ids"][:, cut:], "attention_mask": inp["attention_mask"],
              "pixel_values": inp["pixel_values"][int(g[0].prod()):], "image_grid_thw": g[1:]}
    with torch.no_grad():
        full = model(**inp, use_cache=True)
        c1 = model(**first, use_cache=True)
        c2 = model(**second, past_key_values=c1.past_key_values, use_cache=True)
    torch.testing.assert_close(c2.logits[:, -1], full.logits[:, -1], atol=ATOL, rtol=1e-4)
    assert c2.past_key_values.layer_lengths() == full.past_key_values.layer_lengths()


# ---- errors ---------------------------------------------------------------------------------------------------------
def test_errors():
    plain, model = model_for("qwen2_5_vl", schedule="1:2,2:2,3:2")
    # a 2x2 image under a 3-step schedule: 2x2 -> 2x1 -> 1x1 -> cannot halve
    inp = qwen_inputs(model, [["a", ("image", 2, 2), "b"]])
    with pytest.raises(AdscInputError, match=r"image 0 \(sequence 0, tokens 3..6\) is a 2x2 grid .* cannot downsample"):
        model(**inp)
    with pytest.raises(AdscInputError, match=r"video 0 .* is a 2x2 grid"):
        model(**qwen_inputs(model, [[("video", 2, 2, 2)]]))
    model = apply_adsc(copy.deepcopy(plain), "1:2")
    inp = qwen_inputs(model, [["a", ("image", 2, 3), "b"]])
    no_grid = {k: v for k, v in inp.items() if k != "image_grid_thw"}
    with pytest.raises(AdscInputError, match="no image_grid_thw was given"):
        model(**{k: v for k, v in no_grid.items() if k != "pixel_values"})
    bad = dict(inp, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(AdscInputError, match=r"image_grid_thw \[1, 4, 4\] gives 4 tokens .* its run has 6"):
        model(**bad)
    with pytest.raises(AdscInputError, match="multiples of spatial_merge_size 2"):
        model(**dict(inp, image_grid_thw=torch.tensor([[1, 3, 8]])))
    two = dict(inp, image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 6]]))
    with pytest.raises(AdscInputError, match="describes 2 image run"):
        model(**two)
    vid = qwen_inputs(model, [["a", ("video", 2, 2, 2), "b"]], second_per_grid_ts=0.5)
    with pytest.raises(AdscInputError, match="second_per_grid_ts has 0 entries for 1 video"):
        model(**dict(vid, second_per_grid_ts=torch.tensor([])))
    # a chunk continuing a cache with image tokens but no pixels
    out = model(input_ids=inp["input_ids"][:, :2], use_cache=True)
    with pytest.raises(AdscInputError, match="holds image tokens but no pixel_values"):
        model(input_ids=inp["input_ids"][:, 2:], attention_mask=torch.ones_like(inp["input_ids"]),
              past_key_values=out.past_key_values)


def test_deepstack_schedules_are_refused_before_the_last_injection():
    plain, _ = model_for("qwen3_vl", schedule="")
    with pytest.raises(ScheduleError, match=r"DeepStack .* after decoder layers 0..1.*>= 2"):
        apply_adsc(copy.deepcopy(plain), "1:2,3:2")
    apply_adsc(copy.deepcopy(plain), "2:2")  # first boundary after the last injection: fine
    spec = model_spec(plain)
    assert spec.deepstack_layers == 2 and spec.default_schedule() == "1:2,2:2,3:2"
    with pytest.raises(ScheduleError, match="DeepStack"):
        apply_adsc(copy.deepcopy(plain))  # the spec-2 default of 4 layers starts at layer 1


def test_default_schedule_and_config():
    from transformers import AutoModelForImageTextToText

    from adsc_ext.testing.qwen import qwen25_vl_7b_config

    with torch.device("meta"):  # the 7B's modules without memory: its spec and default schedule
        big = AutoModelForImageTextToText.from_config(qwen25_vl_7b_config())
    spec = model_spec(big)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (28, 28, 4, 128)
    assert spec.default_schedule() == "7:2,14:2,21:2"  # spec section 2's example
    plain, _ = model_for("qwen2_5_vl", schedule="")
    model = apply_adsc(copy.deepcopy(plain))
    assert model.config.adsc_schedule == "1:2,2:2,3:2"  # round(4/4), round(4/2), round(3*4/4)
    plain.config.adsc_schedule = "2:4"
    try:
        assert apply_adsc(copy.deepcopy(plain)).config.adsc_schedule == "2:4"
    finally:
        del plain.config.adsc_schedule


# ---- the vision tower as the export runs it -----------------------------------------------------------------
def test_vision_layout_equals_transformers_and_the_graph_equals_the_tower():
    """QwenVLSpec.vision_layout (host side of the exported vision graph) == transformers'
    vision_utils; QwenVisionGraph's masked-attention lowering == the model's own tower."""
    from transformers import vision_utils as vu

    from adsc_ext.export.onnx_graphs import QwenVisionGraph

    model = tiny_qwen("qwen2_5_vl", num_layers=2, vision_layers=3)
    spec = model_spec(model)
    vc = model.config.vision_config
    inp = qwen_inputs(model, [[("image", 3, 5), ("image", 2, 2), ("video", 3, 4, 3), ("image", 1, 7)]])
    grid = torch.cat([inp["image_grid_thw"], inp["video_grid_thw"]])
    pix = torch.cat([inp["pixel_values"], inp["pixel_values_videos"]])
    lay = spec.vision_layout(grid)
    win, cu_win = vu.get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    pos = vu.get_vision_position_ids(grid, vc.spatial_merge_size)
    cu = vu.get_vision_cu_seqlens(grid)
    unit = vc.spatial_merge_size ** 2
    order = (win[:, None] * unit + torch.arange(unit)).reshape(-1)

    def segments(c):
        return torch.repeat_interleave(torch.arange(len(c) - 1), (c[1:] - c[:-1]).long())

    assert torch.equal(lay["order"], order) and torch.equal(lay["restore"], torch.argsort(win))
    assert torch.equal(lay["position_ids"], pos[order])
    assert torch.equal(lay["full_segments"], segments(cu)) and torch.equal(lay["window_segments"], segments(cu_win))
    graph = QwenVisionGraph(model, spec)
    with torch.no_grad():
        got = graph(pix[lay["order"]], lay["position_ids"], lay["full_segments"], lay["window_segments"])[lay["restore"]]
        ref = model.model.visual(pix, grid_thw=grid).pooler_output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_generate_prefill_checks_the_vision_outputs_against_the_position_grids():
    """Inside generate (no grids, M-RoPE positions and the tower's outputs), runs whose grids the
    positions give must match the vision tower's feature rows."""
    plain, model = model_for("qwen2_5_vl")
    spec = model_spec(plain)
    inp = qwen_inputs(plain, [["a", ("image", 2, 3), "b", ("image", 3, 2)]])
    kw = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    pos = spec.plan_inputs(inp["input_ids"], attention_mask=inp["attention_mask"], **kw).position_ids
    with torch.no_grad():
        n = int(inp["image_grid_thw"][0].prod())  # the first image's patches only
        feats = plain.model.get_image_features(inp["pixel_values"][:n], inp["image_grid_thw"][:1], return_dict=True)
        with pytest.raises(AdscInputError, match="image tokens .12.* do not match the vision tower's 6 image feature rows"):
            model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], position_ids=pos,
                  mm_encoder_outputs={"image": feats})


def test_flash_attention_kwargs_with_a_stand_in(monkeypatch):
    """The flash path (2-D key masks, the text row as the layers' position ids) equals sdpa."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from test_hf_llava import _fake_flash  # transformers' flash semantics in plain PyTorch

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", _fake_flash)
    _, ref_model = model_for("qwen2_5_vl")
    _, model = model_for("qwen2_5_vl")
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    inp = qwen_inputs(model, ROWS)
    with torch.no_grad():
        got, ref = model(**inp), ref_model(**inp)
    m = adsc_layout(ref).source_index >= 0
    torch.testing.assert_close(got.logits[m], ref.logits[m], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(_gen(model, inp, 3), _gen(ref_model, inp, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_split_equals_the_decoder_layer(arch):
    """spec.attention_inputs -> attention -> spec.attention_output (what the engine and the ONNX
    graphs run) == transformers' own decoder layer (Qwen3: q_norm / k_norm before the rotary)."""
    plain, _ = model_for(arch, "eager", schedule="")
    spec = model_spec(plain)
    layer = spec.layers[1]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 7, spec.hidden_size, generator=g)
    pos = torch.cat([torch.arange(7)[None, None], torch.randint(0, 9, (3, 1, 7), generator=g)])
    cos, sin = spec.rotary(h, pos)
    with torch.no_grad():
        q, k, v = spec.attention_inputs(layer, h, cos, sin)
        rep = spec.num_heads // spec.num_kv_heads
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1),
            is_causal=True, scale=spec.scaling)
        got = spec.attention_output(layer, h, o.transpose(1, 2))
        mask = torch.zeros(1, 1, 7, 7).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), torch.finfo(h.dtype).min)
        ref = layer(h, attention_mask=mask, position_ids=pos[0], position_embeddings=(cos, sin))
    torch.testing.assert_close(got, ref[0] if isinstance(ref, tuple) else ref, atol=1e-5, rtol=1e-5)
