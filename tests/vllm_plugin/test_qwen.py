"""Qwen2.5-VL served by the ADSC plugin (vLLM's CPU backend) against ``apply_adsc`` in transformers.

A tiny random Qwen2.5-VL (``qwen_checkpoint.py``) with the schedule ``2:2,4:2``; images of
different grids (4x6, 5x3, 8x8, 2x2 merged tokens), two in one request, and a text-only request:

- the per-step plan with a grid per image (``chunks.plan_grid_step``, from the M-RoPE positions)
  equals the compiled plan of the whole prompt (``adsc_ext.stage_plan`` with per-image spans), and
  refuses a run that is not one whole image;
- greedy tokens of one batched ``LLM.generate`` == ``apply_adsc``'s transformers ``generate`` on each
  request alone; each stage's tokens, K/V writes and KV blocks are spec section 4's lengths;
- chunked prefill at a small token budget (each image whole inside a chunk: the scheduler cuts a
  chunk that would end inside one), requests arriving at random steps, == transformers;
- a request with an image the schedule cannot downsample fails alone when it is added;
- the empty schedule == vLLM's own Qwen2.5-VL (run without plugins) == transformers.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engines import generate_tokens, hf_reference, vllm_own_tokens, clear_kv, kv_tokens_written
from qwen_checkpoint import (
    NUM_LAYERS, REQUESTS, SCHEDULE, VISION, Request, build_checkpoint, close_llm, greedy, hf_greedy,
    load_hf, load_processor, make_llm,
)

pytest.importorskip("vllm")


# ---- the per-step plan (no engine) ------------------------------------------------------------
def _mrope(items):
    """``(is_image [n], positions [3, n], spans [(start, h, w)])`` of one prompt of ``items`` (an int:
    that many text tokens; ``(h, w)``: an image), by transformers' ``get_rope_index`` rule: text
    continues a counter; an image at counter ``s`` is ``(s, s + r, s + c)``; after it the counter
    moves on by ``max(h, w)``."""
    img, pos, spans, cur = [], [], [], 0
    for it in items:
        if isinstance(it, int):
            img += [False] * it
            pos += [[cur + i] * 3 for i in range(it)]
            cur += it
        else:
            h, w = it
            spans.append((len(img), h, w))
            img += [True] * (h * w)
            pos += [[cur, cur + r, cur + c] for r in range(h) for c in range(w)]
            cur += max(h, w)
    return img, pos, spans


PROMPTS = [
    [2, (4, 6), 3],
    [5],
    [1, (5, 3), 2, (8, 8), 1],
    [(2, 2), 1],
    [3, (3, 5), (6, 2)],  # two adjacent images: one run of two grids (refused below)
]


def _packed(prompts):
    is_image, pos, spans, cu = [], [], [], [0]
    for b, items in enumerate(prompts):
        i, p, s = _mrope(items)
        spans += [(b, start, h, w) for start, h, w in s]
        is_image += i
        pos += p
        cu.append(len(is_image))
    return (torch.tensor(is_image), torch.tensor(pos).T.contiguous(), torch.tensor(spans, dtype=torch.int64),
            torch.tensor(cu, dtype=torch.int32))


@pytest.mark.parametrize("schedule", [SCHEDULE, "1:4", "1:2,2:2,3:2", ""])
def test_plan_grid_step_equals_the_compiled_plan(schedule):
    from adsc_ext import stage_plan
    from adsc_ext.integrations.vllm.chunks import plan_grid_step

    prompts = PROMPTS[:4]
    if schedule == "1:2,2:2,3:2":
        prompts = [p for p in prompts if (2, 2) not in p]  # 2x2 -> 2x1 -> 1x1 -> cannot halve
    is_image, pos, spans, cu = _packed(prompts)
    got = plan_grid_step(schedule, is_image, pos, cu)
    want = stage_plan(schedule, cu_seqlens=cu, image_spans=spans)
    assert len(got.stages) == len(want.stages)
    for g, w in zip(got.stages, want.stages):
        assert torch.equal(g.source_index.long(), w.source_index.long())
        assert torch.equal(g.index.long(), w.index.long())
        assert torch.equal(g.cu_seqlens.long(), w.cu_seqlens.long())
        assert torch.equal(g.cu_seqlens_cpu.long(), w.cu_seqlens.long())
    assert got.next_phase.tolist() == [0] * len(prompts)


def test_plan_grid_step_refuses_what_is_not_one_whole_image():
    from adsc_ext.integrations.vllm.chunks import ImageRunError, plan_grid_step

    is_image, pos, _, cu = _packed([[2, (4, 6), 3]])
    # a chunk that ends inside the image, in its second row (9 of its 24 tokens)
    with pytest.raises(ImageRunError, match="not one whole image"):
        plan_grid_step(SCHEDULE, is_image[:11], pos[:, :11], torch.tensor([0, 11], dtype=torch.int32))
    # a chunk that starts inside an image (its first token is not at (0, 0))
    with pytest.raises(ImageRunError, match="not one whole image"):
        plan_grid_step(SCHEDULE, is_image[8:], pos[:, 8:], torch.tensor([0, 21], dtype=torch.int32))
    # two adjacent images are one run of two grids: refused (Qwen's processor never makes it)
    is_image, pos, _, cu = _packed([PROMPTS[4]])
    with pytest.raises(ImageRunError):
        plan_grid_step(SCHEDULE, is_image, pos, cu)
    with pytest.raises(ImageRunError, match=r"M-RoPE positions \[3"):
        plan_grid_step(SCHEDULE, is_image, pos[0], cu)


def test_compacted_length_with_a_grid_per_image():
    """The KV managers' count: each image with its own grid's rule; an item whose grid is not
    known here (None) counts whole (more blocks than needed, never fewer)."""
    from adsc_ext.integrations.vllm.chunks import image_keep
    from adsc_ext.integrations.vllm.kv_groups import compacted_length
    from adsc_ext.schedule import Schedule

    places = [(2, 24, image_keep(SCHEDULE, 4, 6)), (30, 64, image_keep(SCHEDULE, 8, 8)), (100, 4, None)]
    lengths = Schedule.parse(SCHEDULE).stage_lengths(110, [(4, 6), (8, 8)])  # the 4 unknown: text
    assert [compacted_length(110, places, None, s) for s in range(3)] == lengths
    # a prefix that ends inside the first image: its first 8 tokens (row 0, 6 columns + 2)
    assert compacted_length(10, places, None, 1) == 10 - (8 - image_keep(SCHEDULE, 4, 6).kept(1, 8))
    assert compacted_length(10, places, None, 0) == 10


def test_processor_check_refuses_grids_the_schedule_cannot_take():
    """The per-request check (in vLLM's multimodal processor) on images and video frames."""
    from types import SimpleNamespace

    from adsc_ext.integrations.vllm.model import ImageGridError, _qwen_check
    from adsc_ext.testing.qwen import tiny_qwen_config

    def out(kind, thw, n):
        return {"mm_placeholders": {kind: [SimpleNamespace(length=n)]},
                "mm_kwargs": {kind: [{f"{kind}_grid_thw": SimpleNamespace(data=torch.tensor(thw))}]}}

    def processor(schedule):
        cfg = tiny_qwen_config("qwen2_5_vl", num_layers=NUM_LAYERS, adsc_schedule=schedule)
        return SimpleNamespace(info=SimpleNamespace(get_hf_config=lambda: cfg))

    three = processor("2:2,3:2,4:2")
    _qwen_check(three, out("video", [2, 8, 8], 2 * 16))  # two 4x4 frames: fine
    with pytest.raises(ImageGridError, match="video 0 of this request is a 2x2 grid"):
        _qwen_check(three, out("video", [2, 4, 4], 2 * 4))
    with pytest.raises(ImageGridError, match="image 0 of this request is a 2x2 grid"):
        _qwen_check(three, out("image", [1, 4, 4], 4))
    with pytest.raises(ImageGridError, match=r"is not 1 2x2-merged grid\(s\) of its 5 tokens"):
        _qwen_check(three, out("image", [1, 4, 4], 5))
    with pytest.raises(ImageGridError, match="without its image_grid_thw"):
        _qwen_check(three, {"mm_placeholders": {"image": [SimpleNamespace(length=4)]}, "mm_kwargs": {"image": [None]}})
    _qwen_check(processor("2:2,4:2"), out("image", [1, 4, 4], 4))  # 2x2 -> 2x1 -> 1x1: fine
    _qwen_check(processor(None), out("image", [1, 4, 4], 3))  # no schedule: vLLM's own model


def test_plan_grid_step_plans_a_video_as_frames():
    """A video run: ``t`` frames of one grid, the temporal row moving on per frame (Qwen2.5-VL:
    ``s + floor(i_t * interval)``), each frame downsampled as an image of the grid."""
    from adsc_ext import stage_plan
    from adsc_ext.integrations.vllm.chunks import plan_grid_step

    s, h, w, t, interval = 2, 3, 4, 3, 2
    is_image = [False, False] + [True] * (t * h * w) + [False]
    pos = [[0] * 3, [1] * 3]
    pos += [[s + i * interval, s + r, s + c] for i in range(t) for r in range(h) for c in range(w)]
    pos += [[s + (t - 1) * interval + 1] * 3]
    cu = torch.tensor([0, len(is_image)], dtype=torch.int32)
    got = plan_grid_step(SCHEDULE, torch.tensor(is_image), torch.tensor(pos).T.contiguous(), cu)
    spans = torch.tensor([(0, 2 + i * h * w, h, w) for i in range(t)], dtype=torch.int64)
    want = stage_plan(SCHEDULE, cu_seqlens=cu, image_spans=spans)
    for g, w_ in zip(got.stages, want.stages):
        assert torch.equal(g.source_index.long(), w_.source_index.long())


# ---- the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {
        "adsc": build_checkpoint(root / "adsc", schedule=SCHEDULE),
        "plain": build_checkpoint(root / "plain"),
        "adsc3": build_checkpoint(root / "adsc3", schedule="2:2,3:2,4:2"),
        "q2_adsc": build_checkpoint(root / "q2_adsc", schedule=SCHEDULE, arch="qwen2_vl"),
        "q2_plain": build_checkpoint(root / "q2_plain", arch="qwen2_vl"),
    }


@pytest.fixture(scope="module")
def hf(ckpts):
    """``reference(kind, requests) -> {name: tokens}``: transformers (``apply_adsc`` with the saved
    schedule for the ADSC checkpoints), each request alone (cached)."""
    return hf_reference(ckpts, load_hf, load_processor, hf_greedy)


@pytest.fixture(scope="module")
def config(ckpts):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ckpts["adsc"])


@pytest.fixture(scope="module")
def llm(ckpts):
    engine = make_llm(ckpts["adsc"], block_size=32)
    yield engine
    close_llm(engine)


def _spec_lengths(n: int, req: Request, schedule: str = SCHEDULE):
    from adsc_ext.schedule import Schedule

    return Schedule.parse(schedule).stage_lengths(n, req.grids)


def test_plugin_serves_the_adsc_qwen_class(llm):
    from adsc_ext.integrations.vllm.kv_groups import AdscStageManager

    cls, schedule, grid, names = llm.apply_model(
        lambda m: (type(m).__name__, str(m.adsc.schedule), m.adsc.grid, m.adsc.stage_layer_names)
    )[0]
    assert (cls, schedule, grid) == ("AdscQwen2_5_VLForConditionalGeneration", SCHEDULE, None)
    assert [len(n) for n in names] == [2, 2, 2] and sum(map(len, names)) == NUM_LAYERS
    cfg = llm.llm_engine.vllm_config
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.scheduler_config.disable_chunked_mm_input is True  # whole images per chunk
    assert cfg.model_config.multimodal_config.mm_processor_cache_gb == 0  # grids of every image
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    assert scheduler.adsc_whole_images is True
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    assert [type(m) for m in managers] == [AdscStageManager] * 3
    assert [(m.kv_cache_spec.adsc_grid_h, m.kv_cache_spec.adsc_merge) for m in managers] == [(0, 2)] * 3


def test_batch_equals_hf_adsc(llm, hf, config):
    """All requests in one generate call (one prefill step with four grids, then batched decode
    steps) == transformers' ADSC on each request alone; the schedule changes what they generate."""
    got, _ = generate_tokens(llm, REQUESTS, config, greedy)
    assert got == hf("adsc", REQUESTS)
    plain = hf("plain", REQUESTS)
    assert any(plain[r.name] != got[r.name] for r in REQUESTS if r.images)
    assert plain["video"] != got["video"]


def test_each_stage_holds_the_spec_lengths(llm, hf, config):
    """The prefill of each request alone: stage s runs spec section 4's L_s tokens, its layers write
    K/V for exactly L_s + k - 1 tokens (k new tokens; the last one's K/V is never written), and
    its KV group holds ceil(L_s / block_size) blocks."""
    for req in REQUESTS:
        one = dataclasses.replace(req, max_tokens=1)
        got, outs = generate_tokens(llm, [one], config, greedy)
        assert got[one.name] == hf("adsc", [req])[req.name][:1]
        n = len(outs[0].prompt_token_ids)
        assert llm.apply_model(lambda m: m.adsc.last_stage_tokens)[0] == _spec_lengths(n, req), req.name

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    for req in (r for r in REQUESTS if r.name in ("two_images", "video")):
        assert llm.apply_model(clear_kv)[0]
        engine.add_request("kv", req.vllm_prompt(), greedy(req.max_tokens, config))
        blocks, out = [0, 0, 0], None
        while engine.has_unfinished_requests():
            for o in engine.step():
                out = o
            held = [max((len(b) for b in m.req_to_blocks.values()), default=0) for m in managers]
            blocks = [max(a, b) for a, b in zip(blocks, held)]
        assert list(out.outputs[0].token_ids) == hf("adsc", [req])[req.name]
        n, k = len(out.prompt_token_ids), req.max_tokens
        per_stage = _spec_lengths(n, req)
        assert per_stage[1] < n and per_stage[2] < per_stage[1]
        stage_of = [0, 0, 1, 1, 2, 2]
        tensors = llm.apply_model(kv_tokens_written)[0]
        assert sorted(i for layers, _ in tensors for i in layers) == list(range(NUM_LAYERS))
        for layers, tokens in tensors:
            assert tokens == sum(per_stage[stage_of[i]] + k - 1 for i in layers), (req.name, layers, tokens)
        bs = 32
        assert blocks == [-(-(L + k - 1) // bs) for L in per_stage], req.name
        assert blocks[2] < blocks[0], req.name  # else the block count proves nothing
        assert all(not any(m.req_to_blocks.values()) for m in managers)  # freed


# ---- chunked prefill: whole images, a small budget, random arrivals -----------------------------
def _words(n, seed):
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def spy_encoder_cuts(scheduler) -> list:
    """Record every chunk the ADSC scheduler cuts where vLLM's own scheduler would not:
    ``(request_id, num_computed_tokens, vLLM's new tokens, ADSC's new tokens)`` per cut (undo with
    ``del scheduler._try_schedule_encoder_inputs``)."""
    cuts = []
    orig = type(scheduler)._try_schedule_encoder_inputs

    def spy(self, request, num_computed, num_new, *a, **kw):
        out = orig(self, request, num_computed, num_new, *a, **kw)
        plain = super(type(self), self)._try_schedule_encoder_inputs(request, num_computed, num_new, *a, **kw)
        if out[1] != plain[1]:
            cuts.append((request.request_id, num_computed, plain[1], out[1]))
        return out

    scheduler._try_schedule_encoder_inputs = spy.__get__(scheduler)
    return cuts


def _random_requests(seed, count):
    rng = random.Random(seed)
    out = []
    for i in range(count):
        k = rng.choice([0, 1, 1, 2])
        grids = [(rng.randint(2, 8), rng.randint(2, 8)) for _ in range(k)]
        parts = [_words(rng.randint(1, 120), seed * 100 + i)]
        for j in range(k):
            parts += [VISION, _words(rng.randint(1, 40), seed * 100 + i + 50 * (j + 1))]
        images = tuple((seed * 100 + i * 3 + j, h, w) for j, (h, w) in enumerate(grids))
        out.append(Request(f"r{seed}_{i}", "".join(parts), images, rng.randint(1, 6)))
    return out


@pytest.fixture(scope="module")
def llm_chunked(ckpts):
    # 72 tokens: the largest image the processor makes (8x8) must fit a step (vLLM's own check
    # with disable_chunked_mm_input)
    # (no videos: the processor's largest video is 448 tokens)
    engine = make_llm(ckpts["adsc3"], enable_chunked_prefill=True, max_num_batched_tokens=72, block_size=32,
                      kv_cache_memory_bytes=16 << 20, limit_mm_per_prompt={"image": 2, "video": 0})
    yield engine
    close_llm(engine)


def test_chunked_prefill_keeps_images_whole(llm_chunked, hf, config):
    """Requests arrive at random steps into a 72-token budget: chunks cut the prompts (text
    anywhere, images never: the scheduler cuts a chunk that would end inside an image back to
    before it); every request's tokens == transformers' ADSC alone; every block is freed."""
    engine = llm_chunked.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    # stages of 2, 1, 1 and 2 layers: vLLM splits them into six one-layer KV-cache groups, so a
    # stage's two layers have two block tables (each layer must write through its own)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    assert [m.kv_cache_spec.adsc_stage for m in managers] == [0, 0, 1, 2, 3, 3]
    # First two requests that force a cut at a 72-token budget: step 1 rolls both back to their
    # image (vLLM); step 2 gives "ahead" 72 tokens from its image on; step 3 leaves "behind",
    # which starts exactly at its 8x8 image, 39 tokens: vLLM would prefill 39 of its 64 image
    # tokens, the ADSC scheduler gives it none; step 4 prefills its image whole.
    forced = [
        Request("ahead", _words(20, 1) + VISION + _words(40, 2), ((11, 8, 8),), 3),
        Request("behind", _words(5, 3) + VISION + _words(5, 4), ((12, 8, 8),), 4),
    ]
    requests = forced + _random_requests(1, 14)
    rng = random.Random(7)
    pending = list(requests)
    got = {}
    cuts = spy_encoder_cuts(scheduler)
    try:
        steps = 0
        while pending or engine.has_unfinished_requests():
            for _ in range(rng.randint(0, 3) if steps > 3 else (2 if steps == 0 else 0)):
                if pending:
                    r = pending.pop(0)
                    engine.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens, config))
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
            assert steps < 2000
    finally:
        del scheduler._try_schedule_encoder_inputs
    assert got == hf("adsc3", requests)
    assert any(rid.startswith("behind") and computed == 6 for rid, computed, _, _ in cuts), cuts
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_request_with_an_image_the_schedule_cannot_take_fails_alone(llm_chunked, hf, config):
    """2x2 -> 2x1 -> 1x1 cannot be halved a third time: the request is refused when it is added,
    holding no block; the running ones finish with their own tokens."""
    from adsc_ext.integrations.vllm.model import ImageGridError

    engine = llm_chunked.llm_engine
    good = [r for r in REQUESTS if r.name in ("img_4x6", "text")]
    for r in good:
        engine.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens, config))
    engine.step()
    bad = next(r for r in REQUESTS if r.name == "img_2x2")
    for attempt in range(2):  # the same image again (a client's retry) is refused again
        with pytest.raises(ImageGridError, match="2x2 grid .* cannot downsample"):
            engine.add_request(f"bad{attempt}", bad.vllm_prompt(), greedy(2, config))
    scheduler = engine.engine_core.engine_core.scheduler
    assert not any(rid.startswith("bad") for rid in scheduler.requests)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
    assert got == hf("adsc3", good)
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


# Engines made and closed inside a test come after the tests of the module's engines: closing an
# in-process engine tears down vLLM's process-wide parallel state, which a live engine needs.
def test_qwen2_vl_batch_equals_hf_adsc(ckpts, hf, config):
    """Qwen2-VL (vLLM's ``Qwen2VLForConditionalGeneration``: the same text model and positions,
    videos without Qwen2.5's seconds per grid) through the same plugin code."""
    engine = make_llm(ckpts["q2_adsc"], block_size=32)
    try:
        assert engine.apply_model(lambda m: type(m).__name__)[0] == "AdscQwen2VLForConditionalGeneration"
        got, _ = generate_tokens(engine, REQUESTS, config, greedy)
    finally:
        close_llm(engine)
    assert got == hf("q2_adsc", REQUESTS)
    plain = hf("q2_plain", REQUESTS)
    assert plain["img_4x6"] != got["img_4x6"] and plain["video"] != got["video"]


def test_chunked_prefill_keeps_videos_whole(ckpts, hf, config):
    """A video is never split either: at a 448-token budget (the processor's largest video), step 1
    rolls "ahead" back to its video (vLLM) and "behind" too; step 2 gives "ahead" 429 tokens and
    would give "behind", which starts exactly at its 128-token video, 19 of them: the ADSC
    scheduler gives it none; its video is prefilled whole in step 3. Both == transformers."""
    from qwen_checkpoint import VIDEO

    requests = [
        Request("ahead", _words(350, 5) + VIDEO + _words(300, 6), (), 3, videos=((21, 4, 8, 8),)),
        Request("behind", _words(20, 7) + VIDEO + _words(5, 8), (), 4, videos=((22, 4, 8, 8),)),
    ]
    engine = make_llm(ckpts["adsc"], enable_chunked_prefill=True, max_num_batched_tokens=448, block_size=32,
                      max_model_len=1024, kv_cache_memory_bytes=16 << 20)
    try:
        llm = engine.llm_engine
        scheduler = llm.engine_core.engine_core.scheduler
        cuts = spy_encoder_cuts(scheduler)
        for r in requests:
            llm.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens, config))
        got = {}
        while llm.has_unfinished_requests():
            for out in llm.step():
                if out.finished:
                    got[out.request_id] = list(out.outputs[0].token_ids)
        pool = scheduler.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    finally:
        close_llm(engine)
    assert got == hf("adsc", requests)
    assert [(rid.split("-")[0], computed, plain, cut) for rid, computed, plain, cut in cuts] == [("behind", 21, 19, 0)]


# ---- the empty schedule ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_own_qwen(ckpts, tmp_path_factory):
    """Greedy tokens of vLLM's own Qwen2.5-VL (no plugin) on the plain checkpoint."""
    return vllm_own_tokens("qwen_checkpoint", ckpts["plain"], "Qwen2_5_VLForConditionalGeneration",
                           tmp_path_factory.mktemp("qwen_baseline"))


def test_vllm_own_qwen_equals_transformers(vllm_own_qwen, hf):
    """The setup itself: vLLM's Qwen2.5-VL and transformers' agree on the plain checkpoint."""
    assert vllm_own_qwen == hf("plain", REQUESTS)


def test_empty_schedule_equals_vllm_own_qwen(ckpts, vllm_own_qwen, config):
    engine = make_llm(ckpts["plain"], hf_overrides={"adsc_schedule": ""})
    try:
        kind = engine.apply_model(lambda m: (type(m).__name__, m.adsc is not None, str(m.adsc.schedule)))[0]
        assert kind == ("AdscQwen2_5_VLForConditionalGeneration", True, "")
        got, _ = generate_tokens(engine, REQUESTS, config, greedy)
    finally:
        close_llm(engine)
    assert got == vllm_own_qwen
