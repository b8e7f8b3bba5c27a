"""LLaVA-OneVision served by the ADSC plugin (vLLM's CPU backend) against ``apply_adsc`` in
transformers.

A tiny random OneVision (``onevision_checkpoint.py``: 4x4 tokens per crop, schedule ``2:4,4:4``);
images of different sizes (two in one request), so each has its own anyres layout (the 4x4 base grid, then a
high-resolution grid of 4x4 to 12x12 tokens whose rows end with ``image_newline``), and a text-only
request:

- the per-step plan from the items' layouts (``chunks.plan_items_step``) equals the compiled plan
  of the whole batch (``adsc_ext.stage_plan`` with ``[N, 5]`` spans), and refuses items that are
  not whole in the step; the layout read from an image's embeddings is the processor's;
- greedy tokens of one batched ``LLM.generate`` == ``apply_adsc``'s transformers ``generate`` on each
  request alone; each stage runs spec section 4's lengths;
- chunked prefill at a small budget, requests arriving at random steps, == transformers (every
  image whole inside one chunk);
- a request with an image the schedule cannot downsample fails alone when it is added (and again
  when retried); the running requests and a later good one finish with their own tokens;
- the empty schedule == vLLM's own OneVision (run without plugins) == transformers.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engines import generate_tokens, hf_reference, vllm_own_tokens, clear_kv, kv_tokens_written
from onevision_checkpoint import (
    BAD_SIZE, IMAGE, NUM_LAYERS, REQUESTS, SCHEDULE, Request, build_checkpoint, close_llm, greedy, hf_greedy,
    load_hf, load_processor, make_llm,
)

pytest.importorskip("vllm")

SIDE = 4  # tokens per crop side
PINPOINTS = [(56 * i, 56 * j) for i in range(1, 4) for j in range(1, 4)]


def _layout(size):
    from adsc_ext.image_grids import anyres_layout

    return anyres_layout(size, PINPOINTS, 56, 14, max_crops=9)


def _item(size):
    from adsc_ext.models.llava_next import ImageItem

    return ImageItem.from_anyres(_layout(size))


# ---- the per-step plan (no engine) ------------------------------------------------------------
def _packed(prompts):
    """``(is_image [T], cu [B+1], items, spans [N, 5])`` of prompts of ``int`` (text tokens) and
    ``(h, w)`` (an image of that many pixels)."""
    is_image, cu, items, spans = [], [0], [], []
    for b, parts in enumerate(prompts):
        start = len(is_image)
        for p in parts:
            if isinstance(p, int):
                is_image += [False] * p
            else:
                it = _item(p)
                spans += [(b, len(is_image) - start + off, h, w, nl) for off, h, w, nl in it.units]
                items.append(it)
                is_image += [True] * it.tokens
        cu.append(len(is_image))
    return (torch.tensor(is_image, dtype=torch.bool), torch.tensor(cu, dtype=torch.int32), items,
            torch.tensor(spans, dtype=torch.int64).reshape(-1, 5))


PROMPTS = [
    [2, (100, 150), 3],
    [5],
    [(56, 56), 1],
    [1, (60, 170), 2, (130, 80), 1],  # two images in one request (a test of the plan only)
    [3, (90, 90)],
]


@pytest.mark.parametrize("schedule", [SCHEDULE, "1:2", "1:2,2:2,3:2", ""])
def test_plan_items_step_equals_the_compiled_plan(schedule):
    from adsc_ext import stage_plan
    from adsc_ext.integrations.vllm.chunks import plan_items_step

    is_image, cu, items, spans = _packed(PROMPTS)
    got = plan_items_step(schedule, is_image, cu, items)
    want = stage_plan(schedule, cu_seqlens=cu, image_spans=spans)
    assert len(got.stages) == len(want.stages)
    for g, w in zip(got.stages, want.stages):
        assert torch.equal(g.source_index.long(), w.source_index.long())
        assert torch.equal(g.index.long(), w.index.long())
        assert torch.equal(g.cu_seqlens.long(), w.cu_seqlens.long())
        assert torch.equal(g.cu_seqlens_cpu.long(), w.cu_seqlens.long())
    if schedule:
        assert got.stages[-1].num_tokens < got.stages[0].num_tokens  # else this proves little
    assert got.next_phase.tolist() == [0] * len(PROMPTS)


def test_plan_items_step_refuses_items_that_are_not_whole():
    from adsc_ext.integrations.vllm.chunks import ImageRunError, plan_items_step

    is_image, cu, items, _ = _packed([[2, (100, 150), 3]])
    # a chunk that ends inside the image: fewer image rows than the item's tokens
    with pytest.raises(ImageRunError, match="image tokens but its 1 image item"):
        plan_items_step(SCHEDULE, is_image[:40], torch.tensor([0, 40], dtype=torch.int32), items)
    # an item split between two requests
    with pytest.raises(ImageRunError, match="not one run of consecutive image tokens of one request"):
        plan_items_step(SCHEDULE, is_image, torch.tensor([0, 50, int(cu[-1])], dtype=torch.int32), items)
    # no image rows, no items: every stage keeps every token
    plan = plan_items_step(SCHEDULE, torch.zeros(7, dtype=torch.bool), torch.tensor([0, 3, 7], dtype=torch.int32), [])
    assert [st.num_tokens for st in plan.stages] == [7, 7, 7]


def test_layout_from_embeddings_is_the_processors():
    """``item_from_features`` (what the vLLM forward reads) gives the layout ``image_sizes`` gives,
    on features packed the way OneVision packs them (newline rows = ``image_newline``)."""
    from adsc_ext.models.llava_next import item_from_features

    newline = torch.randn(8)
    for size in [(100, 150), (56, 56), (60, 170), (130, 80), (168, 30)]:
        layout = _layout(size)
        rows = [torch.randn(SIDE * SIDE, 8)]
        for h, w, nl in layout.grids[1:]:
            grid = torch.randn(h, w, 8)
            rows.append(torch.cat([grid, newline.expand(h, 1, 8)], 1).reshape(-1, 8))
        feat = torch.cat(rows)
        assert item_from_features(0, feat, SIDE, newline) == _item(size), size


def test_processor_check_refuses_what_the_schedule_cannot_take():
    from types import SimpleNamespace

    from adsc_ext.integrations.vllm.model import ImageGridError, _onevision_check
    from adsc_ext.testing.llava_next import tiny_llava_onevision_config

    def out(size, n, kind="image"):
        return {"mm_placeholders": {kind: [SimpleNamespace(length=n)]},
                "mm_kwargs": {kind: [{"image_sizes": SimpleNamespace(data=torch.tensor(size))}]}}

    def processor(schedule):
        cfg = tiny_llava_onevision_config(num_layers=NUM_LAYERS, vision_aspect_ratio="anyres_max_9")
        if schedule is not None:
            cfg.adsc_schedule = schedule
        return SimpleNamespace(info=SimpleNamespace(get_hf_config=lambda: cfg))

    p = processor(SCHEDULE)
    _onevision_check(p, out([100, 150], _layout((100, 150)).tokens))  # 8x12 -> 4x6 -> 2x3: fine
    _onevision_check(p, out([100, 150], SIDE * SIDE + 1))  # a multi-image item: the base grid
    n_bad = _layout(BAD_SIZE).tokens
    with pytest.raises(ImageGridError, match="2x12 token grid, which adsc_schedule '2:4,4:4' cannot downsample"):
        _onevision_check(p, out(list(BAD_SIZE), n_bad))
    with pytest.raises(ImageGridError, match="has 7 placeholder tokens, not its anyres layout's 120"):
        _onevision_check(p, out([100, 150], 7))
    with pytest.raises(ImageGridError, match="without its image_sizes"):
        _onevision_check(p, {"mm_placeholders": {"image": [SimpleNamespace(length=4)]}, "mm_kwargs": {"image": [None]}})
    with pytest.raises(ImageGridError, match="has a video"):
        _onevision_check(p, {"mm_placeholders": {"video": [SimpleNamespace(length=197)]}, "mm_kwargs": {}})
    _onevision_check(processor("2:2"), out(list(BAD_SIZE), n_bad))  # 2x12 -> 2x6: fine
    _onevision_check(processor(None), out(list(BAD_SIZE), 3))  # no schedule: vLLM's own model


# ---- the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("onevision")
    return {"adsc": build_checkpoint(root / "adsc", schedule=SCHEDULE), "plain": build_checkpoint(root / "plain")}


@pytest.fixture(scope="module")
def hf(ckpts):
    """``reference(kind, requests) -> {name: tokens}``: transformers (``apply_adsc`` with the saved
    schedule for "adsc"), each request alone (cached)."""
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


def _spec_lengths(n: int, req: Request):
    from adsc_ext.schedule import Schedule

    grids = [g for _, h, w in req.images for g in _layout((h, w)).grids]
    return Schedule.parse(SCHEDULE).stage_lengths(n, grids)


def test_plugin_serves_the_adsc_onevision_class(llm):
    cls, schedule, per_item, names = llm.apply_model(
        lambda m: (type(m).__name__, str(m.adsc.schedule), m.adsc.per_item_layout, m.adsc.stage_layer_names)
    )[0]
    assert (cls, schedule, per_item) == ("AdscLlavaOnevisionForConditionalGeneration", SCHEDULE, True)
    assert [len(n) for n in names] == [2, 2, 2] and sum(map(len, names)) == NUM_LAYERS
    cfg = llm.llm_engine.vllm_config
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.scheduler_config.disable_chunked_mm_input is True  # whole images per chunk
    assert cfg.model_config.multimodal_config.mm_processor_cache_gb == 0  # image_sizes of every image
    assert llm.llm_engine.engine_core.engine_core.scheduler.adsc_whole_images is True


def test_batch_equals_hf_adsc(llm, hf, config):
    """All requests in one generate call (one prefill step with six image layouts, two of them in
    one request, and a text request, then batched decode steps) == transformers' ADSC on each request alone; the
    schedule changes what they generate."""
    got, _ = generate_tokens(llm, REQUESTS, config, greedy)
    assert got == hf("adsc", REQUESTS)
    plain = hf("plain", REQUESTS)
    assert sum(plain[r.name] != got[r.name] for r in REQUESTS if r.images) >= 3


def test_each_stage_holds_the_spec_lengths(llm, hf, config):
    """The prefill of each request alone runs spec section 4's L_s tokens in stage s (each image:
    its base grid and its high-resolution grid with newlines, downsampled)."""
    for req in REQUESTS:
        one = dataclasses.replace(req, max_tokens=1)
        got, outs = generate_tokens(llm, [one], config, greedy)
        assert got[one.name] == hf("adsc", [req])[req.name][:1]
        n = len(outs[0].prompt_token_ids)
        want = _spec_lengths(n, req)
        assert llm.apply_model(lambda m: m.adsc.last_stage_tokens)[0] == want, req.name
        if req.images:
            assert want[2] < want[1] < want[0]


def test_kv_writes_and_blocks_are_the_stage_lengths(llm, hf, config):
    """Each request alone: stage s's layers write K/V for exactly L_s + k - 1 tokens (k new tokens;
    the last one's K/V is never written), and its KV group holds ceil((L_s + k - 1) / block_size)
    blocks: the scheduler computes each image's layout from its image_sizes."""
    from adsc_ext.integrations.vllm.kv_groups import AdscStageManager

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    assert [type(m) for m in managers] == [AdscStageManager] * 3
    assert all(m.kv_cache_spec.adsc_anyres for m in managers)
    held = []
    free = scheduler._free_request

    def spy(request, *a, **kw):  # the blocks a request holds when it finishes (its last step's)
        held.append([max((len(b) for b in m.req_to_blocks.values()), default=0) for m in managers])
        return free(request, *a, **kw)

    scheduler._free_request = spy
    try:
        for req in (r for r in REQUESTS if r.images):
            _kv_run(llm, engine, req, config, hf, managers, held)
    finally:
        del scheduler._free_request


def _kv_run(llm, engine, req, config, hf, managers, held):
    """One request alone; its K/V writes and its blocks (``held[-1]``: when it finished)."""
    assert llm.apply_model(clear_kv)[0]
    engine.add_request("kv", req.vllm_prompt(), greedy(req.max_tokens, config))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    blocks = held[-1]
    assert list(out.outputs[0].token_ids) == hf("adsc", [req])[req.name]
    n, k = len(out.prompt_token_ids), req.max_tokens
    per_stage = _spec_lengths(n, req)
    stage_of = [0, 0, 1, 1, 2, 2]
    tensors = llm.apply_model(kv_tokens_written)[0]
    assert sorted(i for layers, _ in tensors for i in layers) == list(range(NUM_LAYERS))
    assert blocks == [-(-(L + k - 1) // 32) for L in per_stage], (req.name, blocks, per_stage, tensors)
    for layers, tokens in tensors:
        assert tokens == sum(per_stage[stage_of[i]] + k - 1 for i in layers), (req.name, layers, tokens, per_stage)
    assert blocks[2] < blocks[0], req.name  # else the block count proves little
    assert all(not any(m.req_to_blocks.values()) for m in managers)  # freed


def test_compacted_length_of_anyres_items():
    """The KV managers' count for OneVision items: a whole item loses what its grids lose; a
    partial one (never scheduled for this model) counts whole."""
    from adsc_ext.integrations.vllm.kv_groups import anyres_keep, compacted_length
    from adsc_ext.schedule import Schedule
    from adsc_ext.testing.llava_next import tiny_llava_onevision_config
    from adsc_ext.integrations.vllm.kv_groups import anyres_spec

    geometry = anyres_spec(tiny_llava_onevision_config(vision_aspect_ratio="anyres_max_9"))
    a, b = anyres_keep(SCHEDULE, geometry, 100, 150), anyres_keep(SCHEDULE, geometry, 56, 56)
    na, nb = _layout((100, 150)).tokens, _layout((56, 56)).tokens
    assert (a.tokens, b.tokens) == (na, nb)
    places = [(2, na, a), (na + 5, nb, b)]
    n = na + nb + 9
    grids = _layout((100, 150)).grids + _layout((56, 56)).grids
    assert [compacted_length(n, places, None, s) for s in range(3)] == Schedule.parse(SCHEDULE).stage_lengths(n, grids)
    assert compacted_length(10, places, None, 2) == 10  # inside the first image: counted whole


# ---- chunked prefill: whole images, a small budget, random arrivals -----------------------------
def _random_requests(seed, count):
    from adsc_ext.schedule import Schedule, ScheduleError

    schedule = Schedule.parse(SCHEDULE)
    rng = random.Random(seed)
    out = []
    for i in range(count):
        images = ()
        text = " ".join(f"w{rng.randint(6, 63)}" for _ in range(rng.randint(1, 90)))
        if rng.random() < 0.75:
            while True:
                size = (rng.randint(40, 170), rng.randint(40, 170))
                try:
                    for h, w, _ in _layout(size).grids:
                        schedule.grids((h, w))
                    break
                except ScheduleError:
                    continue
            cut = rng.randint(0, len(text.split()))
            words = text.split()
            text = " ".join(words[:cut] + [IMAGE] + words[cut:])
            images = ((seed * 100 + i, *size),)
        out.append(Request(f"r{seed}_{i}", text, images, rng.randint(1, 5)))
    return out


@pytest.fixture(scope="module")
def llm_chunked(ckpts):
    # 192 tokens: the largest image (3x3 crops: 16 + 12 x 13 = 172 tokens) must fit a step (vLLM's
    # own check with disable_chunked_mm_input)
    engine = make_llm(ckpts["adsc"], enable_chunked_prefill=True, max_num_batched_tokens=192, block_size=32,
                      kv_cache_memory_bytes=16 << 20)
    yield engine
    close_llm(engine)


def test_chunked_prefill_keeps_images_whole(llm_chunked, hf, config):
    """Requests arrive at random steps into a 192-token budget: chunks cut the prompts (text
    anywhere, images never); every request's tokens == transformers' ADSC alone; every block is
    freed."""
    engine = llm_chunked.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    requests = _random_requests(3, 12)
    assert sum(bool(r.images) for r in requests) >= 6
    rng = random.Random(5)
    pending = list(requests)
    got, steps, partial = {}, 0, 0
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 3) if steps else 3):
            if pending:
                r = pending.pop(0)
                engine.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens, config))
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
        # requests whose prompt this step prefilled in part (chunked prefill at work)
        partial += sum(0 < q.num_computed_tokens < q.num_prompt_tokens for q in scheduler.requests.values())
        steps += 1
        assert steps < 2000
    assert partial > 0  # else nothing was chunked
    assert got == hf("adsc", requests)
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_request_with_an_image_the_schedule_cannot_take_fails_alone(llm_chunked, hf, config):
    """A 40x168 image's high-resolution grid is 2x12: 1x3 after the first factor-4 step, which the
    second cannot take. The request is refused when it is added (and again when a client retries
    it), holding no block; the running requests, and a good one added after, finish with their
    own tokens."""
    from adsc_ext.integrations.vllm.model import ImageGridError

    engine = llm_chunked.llm_engine
    good = [r for r in REQUESTS if r.name in ("img_100x150", "text")]
    for r in good:
        engine.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens, config))
    engine.step()
    bad = Request("bad", f"w1 {IMAGE} w2", ((7, *BAD_SIZE),), 2)
    for attempt in range(2):
        with pytest.raises(ImageGridError, match="2x12 token grid"):
            engine.add_request(f"bad{attempt}", bad.vllm_prompt(), greedy(2, config))
    later = next(r for r in REQUESTS if r.name == "img_60x170")
    engine.add_request(later.name, later.vllm_prompt(), greedy(later.max_tokens, config))
    scheduler = engine.engine_core.engine_core.scheduler
    assert not any(rid.startswith("bad") for rid in scheduler.requests)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
    assert got == hf("adsc", good + [later])
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


# ---- the empty schedule ------------------------------------------------------------------------
# (engines made and closed inside a test come after the module's engines' tests)


@pytest.fixture(scope="module")
def vllm_own_onevision(ckpts, tmp_path_factory):
    """Greedy tokens of vLLM's own LLaVA-OneVision (no plugin) on the plain checkpoint."""
    return vllm_own_tokens("onevision_checkpoint", ckpts["plain"], "LlavaOnevisionForConditionalGeneration",
                           tmp_path_factory.mktemp("onevision_baseline"))


def test_vllm_own_onevision_equals_transformers(vllm_own_onevision, hf):
    """The setup itself (the key rename included): vLLM's OneVision and transformers' agree on the
    plain checkpoint."""
    assert vllm_own_onevision == hf("plain", REQUESTS)


def test_empty_schedule_equals_vllm_own_onevision(ckpts, vllm_own_onevision, config):
    engine = make_llm(ckpts["plain"], hf_overrides={"adsc_schedule": ""})
    try:
        kind = engine.apply_model(lambda m: (type(m).__name__, m.adsc is not None, str(m.adsc.schedule)))[0]
        assert kind == ("AdscLlavaOnevisionForConditionalGeneration", True, "")
        got, _ = generate_tokens(engine, REQUESTS, config, greedy)
    finally:
        close_llm(engine)
    assert got == vllm_own_onevision
