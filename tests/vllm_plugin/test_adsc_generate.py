"""ADSC served by vLLM (CPU backend) against ADSC in transformers (``apply_adsc``).

One engine for the module, on the checkpoint whose config carries ``adsc_schedule``: a whole
batch is prefilled in one step (mixed lengths, 0/1/2 images), requests join while others decode,
and a request with images that do not match its prompt fails alone.
"""

from __future__ import annotations

import pytest
import torch

from engines import clear_kv, kv_tokens_written
from tiny_checkpoint import NUM_LAYERS, REQUESTS, SCHEDULE, close_llm, greedy, make_llm, prompt

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def llm(checkpoints):
    engine = make_llm(checkpoints["adsc"], enable_mm_embeds=True, block_size=32)
    yield engine
    close_llm(engine)


def _stage_tokens(llm):
    return llm.apply_model(lambda model: model.adsc.last_stage_tokens)[0]


def test_plugin_serves_the_adsc_class(llm):
    info = llm.apply_model(
        lambda m: (type(m).__name__, str(m.adsc.schedule), m.adsc.stage_layer_names)
    )[0]
    cls, schedule, names = info
    assert cls == "AdscLlavaForConditionalGeneration"
    assert schedule == SCHEDULE
    assert [len(n) for n in names] == [2, 2, 2] and sum(len(n) for n in names) == NUM_LAYERS
    cfg = llm.llm_engine.vllm_config
    assert cfg.cache_config.enable_prefix_caching is False  # switched off by the config hook
    assert cfg.scheduler_config.disable_chunked_mm_input is False  # chunks may split images


def test_batch_equals_hf_adsc(llm, hf_tokens):
    """All requests in one generate call (one prefill step, then batched decode steps in which
    requests finish at different steps) == transformers' ADSC on each request alone."""
    outs = llm.generate([r.vllm_prompt() for r in REQUESTS], [greedy(r.max_tokens) for r in REQUESTS])
    got = {r.name: list(o.outputs[0].token_ids) for r, o in zip(REQUESTS, outs)}
    assert got == hf_tokens["adsc"]


def test_one_image_request_compacts_each_stage(llm, hf_tokens):
    req = next(r for r in REQUESTS if r.name == "img1")
    outs = llm.generate([req.vllm_prompt()], [greedy(1)])
    assert list(outs[0].outputs[0].token_ids) == hf_tokens["adsc"]["img1"][:1]
    n = len(outs[0].prompt_token_ids)  # 16 image tokens + 5 text tokens
    # 4x4 -> 4x2 -> 2x2 vision tokens: the prefill's stages hold n, n-8, n-12 tokens
    assert _stage_tokens(llm) == [n, n - 8, n - 12]


def test_kv_written_only_for_kept_tokens(llm, hf_tokens):
    """Each stage's layers write K/V for the stage's tokens only: after one request of n prompt
    tokens and k new ones, a stage-s layer holds n_s + k - 1 written slots (the last token's
    K/V is never needed)."""
    req = next(r for r in REQUESTS if r.name == "img2")

    assert llm.apply_model(clear_kv)[0]
    outs = llm.generate([req.vllm_prompt()], [greedy(req.max_tokens)])
    assert list(outs[0].outputs[0].token_ids) == hf_tokens["adsc"]["img2"]
    n, k = len(outs[0].prompt_token_ids), req.max_tokens

    per_stage = [n, n - 2 * 8, n - 2 * 12]  # two images: 8 and 12 dropped tokens each
    stage_of = [0, 0, 1, 1, 2, 2]
    tensors = llm.apply_model(kv_tokens_written)[0]
    assert sorted(i for layers, _ in tensors for i in layers) == list(range(NUM_LAYERS))
    for layers, tokens in tensors:
        assert tokens == sum(per_stage[stage_of[i]] + k - 1 for i in layers), (layers, tokens)


def test_each_stage_has_its_own_kv_group(llm):
    """Per-stage KV-cache groups: each stage's layers have their own block table, and a request
    holds blocks for the stage's compacted length only (blocks of 32 tokens here)."""
    from adsc_ext.integrations.vllm.kv_groups import AdscStageManager

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    assert [type(m) for m in managers] == [AdscStageManager] * 3
    assert [m.kv_cache_spec.adsc_stage for m in managers] == [0, 1, 2]
    req = next(r for r in REQUESTS if r.name == "img2")  # 36 prompt tokens, two images
    engine = llm.llm_engine
    engine.add_request("kv", req.vllm_prompt(), greedy(2))
    blocks = [0, 0, 0]
    while engine.has_unfinished_requests():
        engine.step()
        # the only running request (the engine keeps its own id for it)
        held = [max((len(b) for b in m.req_to_blocks.values()), default=0) for m in managers]
        blocks = [max(a, b) for a, b in zip(blocks, held)]
    assert all(not any(m.req_to_blocks.values()) for m in managers)  # freed
    # stage lengths 36, 20, 12 -> 2, 1, 1 blocks of 32 (one group for all layers: 2 blocks of
    # every layer; here 4 blocks of 2 layers each instead of 2 of 6: 8 vs 12 layer-blocks)
    assert blocks == [2, 1, 1]


def test_requests_joining_while_others_decode(llm, hf_tokens):
    """Continuous batching: requests are added between engine steps, so prefill steps mix with
    other requests' decode steps; each request gets what it gets alone."""
    engine = llm.llm_engine
    pending = list(REQUESTS)
    got, steps = {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 2 == 0:  # one new request every other step
            r = pending.pop(0)
            engine.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens))
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        assert steps < 200
    assert got == hf_tokens["adsc"]


def test_request_with_mismatched_images_fails_alone(llm, hf_tokens):
    """A request whose image embeddings are not a whole 4x4 grid is refused when it is added
    (ADSC's check in the multimodal processor: inside a forward the plan would fail every request
    of the step). The requests already running finish with their own tokens."""
    engine = llm.llm_engine
    good = [r for r in REQUESTS if r.name in ("img1", "text4")]
    for r in good:
        engine.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens))
    engine.step()
    bad = {"prompt": prompt([5, 6], 1), "multi_modal_data": {"image": torch.randn(1, 10, 128)}}
    with pytest.raises(ValueError, match="4x4 grid of vision tokens"):
        engine.add_request("bad", bad, greedy(4))
    scheduler = engine.engine_core.engine_core.scheduler
    assert not any(rid.startswith("bad") for rid in scheduler.requests)  # never scheduled
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
    assert got == {r.name: hf_tokens["adsc"][r.name] for r in good}
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block


def test_image_embeddings_of_a_whole_grid_are_served(llm):
    embeds = torch.randn(1, 16, 128)
    outs = llm.generate(
        [{"prompt": prompt([5, 6], 1), "multi_modal_data": {"image": embeds}}], [greedy(3)]
    )
    assert len(outs[0].outputs[0].token_ids) == 3


def test_request_table_follows_a_growing_block_count(llm, hf_tokens):
    """vLLM 0.34's extensible KV cache raises ``cache_config.num_gpu_blocks`` after start-up, in
    the config the model holds (the worker's). The per-request table is sized by it at every
    step: it grows at the next step, and requests still get their tokens."""
    extra = 37
    llm.generate([REQUESTS[0].vllm_prompt()], [greedy(1)])  # the table exists after a step

    def grow(model):
        cache = model.adsc.vllm_config.cache_config
        rows = model.adsc.requests.table.shape[0]
        assert rows == cache.num_gpu_blocks  # sized by the block count, not by the ids seen
        cache.num_gpu_blocks += extra
        return rows

    rows = llm.apply_model(grow)[0]
    try:
        outs = llm.generate([r.vllm_prompt() for r in REQUESTS], [greedy(r.max_tokens) for r in REQUESTS])
        got = {r.name: list(o.outputs[0].token_ids) for r, o in zip(REQUESTS, outs)}
        assert got == hf_tokens["adsc"]
        assert llm.apply_model(lambda m: m.adsc.requests.table.shape[0])[0] == rows + extra
    finally:
        def shrink(model):
            model.adsc.vllm_config.cache_config.num_gpu_blocks -= extra

        llm.apply_model(shrink)


def test_refused_request_retried_then_its_good_image_is_served(llm):
    """LLaVA-1.5 keeps vLLM's multimodal processor cache on (unlike Qwen and OneVision): only an
    embeddings input can be refused here (an image is always a whole grid), and a refusal leaves
    the front end's and the engine's caches in step. A request with a good and a bad image is
    refused, twice (a client's retry); the good image alone, served before and after, gives the
    same tokens."""
    assert llm.llm_engine.vllm_config.model_config.multimodal_config.mm_processor_cache_gb > 0
    engine = llm.llm_engine
    gen = torch.Generator().manual_seed(11)
    good, bad = torch.randn(16, 128, generator=gen), torch.randn(10, 128, generator=gen)
    alone = {"prompt": prompt([5, 6], 1), "multi_modal_data": {"image": good[None]}}

    def run(name):
        engine.add_request(name, alone, greedy(4))
        got = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got = list(out.outputs[0].token_ids)
        return got

    before = run("good-before")
    both = {"prompt": prompt([5, 6], 2), "multi_modal_data": {"image": [good, bad]}}
    for attempt in range(2):
        with pytest.raises(ValueError, match="image 1 of this request has 10"):
            engine.add_request(f"bad{attempt}", both, greedy(2))
    assert run("good-after") == before and len(before) == 4
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
