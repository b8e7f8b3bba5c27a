"""Chunked prefill with ADSC: a token budget of 24 per step splits prompts into chunks (never
inside an image: the plugin sets ``disable_chunked_mm_input``), so later chunks continue each
stage's compacted sequence where the earlier ones left it, and steps mix chunks of several
requests with decode tokens. Each request must still get what transformers' ADSC gives it alone.
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
    assert cfg.enable_chunked_prefill and cfg.disable_chunked_mm_input
    assert cfg.max_num_batched_tokens == BUDGET


def test_chunked_batch_equals_hf_adsc(llm, hf_tokens):
    outs = llm.generate([r.vllm_prompt() for r in REQUESTS], [greedy(r.max_tokens) for r in REQUESTS])
    lengths = [len(o.prompt_token_ids) for o in outs]
    assert max(lengths) > BUDGET  # some prompts really were split
    got = {r.name: list(o.outputs[0].token_ids) for r, o in zip(REQUESTS, outs)}
    assert got == hf_tokens["adsc"]


def test_chunk_continues_the_compacted_sequence(llm, hf_tokens):
    """One request of 36 tokens (text, image, text, image): the first step prefills 20 tokens
    (the second image does not fit and is not split), the second step the last image."""
    req = next(r for r in REQUESTS if r.name == "img2")
    stages = []
    engine = llm.llm_engine
    engine.add_request("img2", req.vllm_prompt(), greedy(req.max_tokens))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        stages.append(llm.apply_model(lambda m: m.adsc.last_stage_tokens)[0])
    assert list(out.outputs[0].token_ids) == hf_tokens["adsc"]["img2"]
    # chunk 1: 1 + 1 + 16 + 2 tokens -> drops 8 then 4 image tokens; chunk 2: the 16-token image
    assert stages[0] == [20, 12, 8] and stages[1] == [16, 8, 4]
    assert all(s == [1, 1, 1] for s in stages[2:])
