"""Chunked prefill with ADSC: a token budget of 24 per step splits prompts into chunks (also
inside images: vLLM's default, which the plugin keeps), so later chunks continue each stage's
compacted sequence where the earlier ones left it, and steps mix chunks of several requests with
decode tokens. Each request must still get what transformers' ADSC gives it alone.
(``test_chunked_images.py``: the same at LLaVA's 24x24 image size, issue 21's cases, a randomized
schedule.)
"""

from __future__ import annotations

import pytest

from tiny_checkpoint import REQUESTS, close_llm, greedy, make_llm

pytest.importorskip("vllm")

BUDGET = 24  # tokens per step: prompts of 36 and 37 tokens take two or more steps


@pytest.fixture(scope="module")
def llm(checkpoints):
    engine = make_llm(
        checkpoints["adsc"], enable_chunked_prefill=True, max_num_batched_tokens=BUDGET,
        max_num_seqs=4,
    )
    yield engine
    close_llm(engine)


def test_prompts_are_chunked(llm):
    cfg = llm.llm_engine.vllm_config.scheduler_config
    assert cfg.enable_chunked_prefill and not cfg.disable_chunked_mm_input
    assert cfg.max_num_batched_tokens == BUDGET


def test_chunked_batch_equals_hf_adsc(llm, hf_tokens):
    outs = llm.generate([r.vllm_prompt() for r in REQUESTS], [greedy(r.max_tokens) for r in REQUESTS])
    lengths = [len(o.prompt_token_ids) for o in outs]
    assert max(lengths) > BUDGET  # some prompts really were split
    got = {r.name: list(o.outputs[0].token_ids) for r, o in zip(REQUESTS, outs)}
    assert got == hf_tokens["adsc"]


def test_chunk_continues_the_compacted_sequence(llm, checkpoints):
    """One request of 39 tokens (BOS, 20 words, image, 2 words): the first step prefills 24
    tokens, the first 3 of the image included; the second step the other 13 and the text."""
    from tiny_checkpoint import Request, hf_greedy, load_hf, load_processor, prompt

    req = Request("cut", prompt(list(range(50, 72)), 1, image_at=[20]), (9,), 4)
    want = hf_greedy(load_hf(checkpoints["adsc"], adsc=True), load_processor(checkpoints["adsc"]), req)
    stages = []
    engine = llm.llm_engine
    engine.add_request("cut", req.vllm_prompt(), greedy(req.max_tokens))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        stages.append(llm.apply_model(lambda m: m.adsc.last_stage_tokens)[0])
    assert list(out.outputs[0].token_ids) == want
    # 4x4 -> 4x2 (odd columns) -> 2x2 (odd rows). Chunk 1: 21 text tokens and image tokens 0-2:
    # stage 1 keeps image token 1, stage 2 none. Chunk 2: image tokens 3-15 and 2 words: stage 1
    # keeps the other 7 of its 8, stage 2 all 4 of its 4.
    assert stages[0] == [24, 21 + 1, 21] and stages[1] == [15, 7 + 2, 4 + 2]
    assert all(s == [1, 1, 1] for s in stages[2:])
